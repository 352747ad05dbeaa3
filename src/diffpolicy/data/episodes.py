"""Episode storage in the original diffusion_policy ``ReplayBuffer`` layout, on zarr 3.

Layout (identical to the original code, so its zarr-2 datasets open unchanged)::

    <root>/
      data/<key>          one array per key, all episodes concatenated along the first (time) axis
      meta/episode_ends   int64, cumulative exclusive end index of each episode

Episode ``i`` covers steps ``episode_ends[i-1] .. episode_ends[i] - 1`` (with ``episode_ends[-1] := 0``).

Appends write the data arrays first and ``meta/episode_ends`` last, so an interrupted append leaves
every previous episode readable; reopening with ``mode="a"`` drops the orphaned tail steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, MemoryStore, ZipStore

__all__ = ["EpisodeStore", "EpisodeStoreError"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Time chunking: aim for chunks of about this many bytes, capped in steps so that lazy random
# access to low-dim keys does not read huge chunks for a single window.
_TARGET_CHUNK_BYTES = 2 * 1024 * 1024
_MAX_CHUNK_STEPS = 1024
_EPISODE_ENDS_CHUNK = 4096
# Bound on memory used when copying an array block by block (save_zip).
_COPY_BLOCK_BYTES = 64 * 1024 * 1024


class EpisodeStoreError(ValueError):
    """The store's contents are inconsistent, or an episode does not fit the store."""


def _time_chunk_steps(trailing_shape: tuple[int, ...], itemsize: int) -> int:
    """Steps per chunk so one chunk holds roughly ``_TARGET_CHUNK_BYTES`` (full trailing dims)."""
    step_bytes = max(1, math.prod(trailing_shape) * itemsize)
    return int(min(_MAX_CHUNK_STEPS, max(1, _TARGET_CHUNK_BYTES // step_bytes)))


def _is_zip_path(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


class EpisodeStore:
    """Episodes of time-aligned arrays (obs, actions, ...) in a zarr group.

    Construct with :meth:`create` or :meth:`open`. Reads are lazy (``store["action"]`` is a
    ``zarr.Array``); :meth:`get_episode` returns numpy arrays.
    """

    def __init__(self, root: zarr.Group, *, path: Path | None, read_only: bool, store: Any = None):
        """Wrap an already opened root group; use :meth:`create` / :meth:`open` instead."""
        self._root = root
        self._path = path
        self._read_only = read_only
        self._store = store
        self._arrays: dict[str, zarr.Array] = {}
        self._episode_ends = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: PathLike | None, overwrite: bool = False) -> EpisodeStore:
        """Create an empty store: a directory at ``path``, or in memory when ``path`` is None.

        An existing ``path`` is only replaced when ``overwrite=True``, so user data is never lost
        by accident. Use :meth:`save_zip` to produce a ``.zarr.zip`` file.
        """
        if path is None:
            store: Any = MemoryStore()
            root = zarr.open_group(store, mode="w", zarr_format=3)
            resolved = None
        else:
            resolved = Path(path)
            if _is_zip_path(resolved):
                raise ValueError(
                    f"EpisodeStore.create writes a directory store, got zip path {str(resolved)!r}; "
                    "create a directory (or in-memory) store and call save_zip()"
                )
            if resolved.exists() or resolved.is_symlink():
                if not overwrite:
                    raise FileExistsError(
                        f"{str(resolved)!r} already exists; pass overwrite=True to replace it"
                    )
                if resolved.is_dir() and not resolved.is_symlink():
                    shutil.rmtree(resolved)
                else:
                    resolved.unlink()
            store = LocalStore(resolved)
            root = zarr.open_group(store, mode="w", zarr_format=3)
        root.create_group("data")
        meta = root.create_group("meta")
        meta.create_array(
            "episode_ends", shape=(0,), chunks=(_EPISODE_ENDS_CHUNK,), dtype=np.int64, fill_value=0
        )
        out = cls(root, path=resolved, read_only=False, store=store)
        out._load_index(repair=False)
        return out

    @classmethod
    def open(cls, path: PathLike, mode: str = "r") -> EpisodeStore:
        """Open an existing store (directory or ``.zip``/``.zarr.zip`` file, zarr format 2 or 3).

        ``mode="r"`` is read-only; ``mode="a"`` allows appending to a directory store and drops
        orphaned steps left by an interrupted append. The store is validated (see :meth:`validate`).
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        resolved = Path(path)
        if not resolved.exists():
            raise FileNotFoundError(f"episode store {str(resolved)!r} does not exist")
        read_only = mode == "r"
        if resolved.is_file():
            if not _is_zip_path(resolved):
                raise ValueError(
                    f"{str(resolved)!r} is a file but not a .zip; expected a zarr directory or .zarr.zip"
                )
            if not read_only:
                raise ValueError(
                    f"zip store {str(resolved)!r} can only be opened read-only (mode='r'); "
                    "zarr zip stores are written once"
                )
            store: Any = ZipStore(resolved, mode="r")
        else:
            store = LocalStore(resolved, read_only=read_only)
        try:
            root = zarr.open_group(store, mode="r" if read_only else "r+")
        except (FileNotFoundError, KeyError) as exc:
            if isinstance(store, ZipStore):
                store.close()
            raise EpisodeStoreError(f"{str(resolved)!r} is not a zarr group: {exc}") from exc
        out = cls(root, path=resolved, read_only=read_only, store=store)
        try:
            out._load_index(repair=not read_only)
        except Exception:
            out.close()
            raise
        return out

    def close(self) -> None:
        """Release the underlying file handle (zip stores); directory stores need no closing."""
        if isinstance(self._store, ZipStore):
            self._store.close()

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the layout; raise :class:`EpisodeStoreError` naming the first problem found."""
        self._load_index(repair=False)

    def _load_index(self, repair: bool) -> None:
        """Validate the store, cache episode_ends and arrays; optionally drop orphaned tail steps."""
        root = self._root
        data = root.get("data")
        if data is None:
            raise EpisodeStoreError("store has no 'data' group")
        if not isinstance(data, zarr.Group):
            raise EpisodeStoreError("'data' is an array, expected a group of per-key arrays")
        meta = root.get("meta")
        if not isinstance(meta, zarr.Group):
            raise EpisodeStoreError("store has no 'meta' group (expected meta/episode_ends)")
        ends_arr = meta.get("episode_ends")
        if ends_arr is None:
            raise EpisodeStoreError("store has no 'meta/episode_ends' array")
        if not isinstance(ends_arr, zarr.Array):
            raise EpisodeStoreError("'meta/episode_ends' is a group, expected an array")
        if ends_arr.ndim != 1:
            raise EpisodeStoreError(f"episode_ends must be 1-D, got shape {ends_arr.shape}")
        if not np.issubdtype(ends_arr.dtype, np.integer):
            raise EpisodeStoreError(f"episode_ends must be integer, got dtype {ends_arr.dtype}")
        ends = np.asarray(ends_arr[:], dtype=np.int64)
        # An append interrupted between growing episode_ends and writing its new entry leaves a
        # trailing fill value (0). Appending mode drops it; read-only mode reports it.
        # Repairs are applied only after every check passed, so a failed open changes nothing.
        drop_last_end = bool(ends.size) and ends[-1] == 0 and repair
        if drop_last_end:
            ends = ends[:-1]
        hint = ""
        if ends.size and ends[-1] == 0:
            hint = " (probably an interrupted append; reopen with mode='a' to repair)"
        if ends.size and ends[0] <= 0:
            raise EpisodeStoreError(f"episode_ends must be positive, episode 0 ends at {int(ends[0])}{hint}")
        bad = np.flatnonzero(np.diff(ends) <= 0)
        if bad.size:
            i = int(bad[0]) + 1
            raise EpisodeStoreError(
                f"episode_ends not strictly increasing at episode {i} "
                f"({int(ends[i - 1])} then {int(ends[i])}){hint}"
            )
        n_steps = int(ends[-1]) if ends.size else 0

        arrays: dict[str, zarr.Array] = {}
        for name, node in data.members():
            if not isinstance(node, zarr.Array):
                raise EpisodeStoreError(f"data/{name} is a group, expected an array")
            if node.ndim < 1:
                raise EpisodeStoreError(f"key {name!r} is a scalar array, expected a time axis")
            arrays[name] = node

        orphaned: list[str] = []
        for name in sorted(arrays):
            length = arrays[name].shape[0]
            if length < n_steps:
                raise EpisodeStoreError(
                    f"key {name!r} has {length} steps but episode_ends says {n_steps} "
                    "(data shorter than episode_ends)"
                )
            if length > n_steps:
                if not repair:
                    raise EpisodeStoreError(
                        f"key {name!r} has {length} steps but episode_ends says {n_steps} "
                        "(data longer than episode_ends: probably an interrupted append; "
                        "reopen with mode='a' to drop the orphaned steps)"
                    )
                orphaned.append(name)
        if drop_last_end:
            logger.warning("dropping unfinished episode_ends entry %d (interrupted append)", ends.size)
            ends_arr.resize((ends.size,))
        for name in orphaned:
            arr = arrays[name]
            logger.warning(
                "dropping %d orphaned steps of key %r (interrupted append)", arr.shape[0] - n_steps, name
            )
            arr.resize((n_steps, *arr.shape[1:]))

        self._episode_ends = ends
        self._episode_ends_array = ends_arr
        self._data_group = data
        self._arrays = arrays

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path | None:
        """Filesystem location, or None for an in-memory store."""
        return self._path

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def keys(self) -> list[str]:
        """Sorted data keys."""
        return sorted(self._arrays)

    @property
    def episode_ends(self) -> np.ndarray:
        """Cumulative exclusive end index of each episode (int64 copy of the cached index)."""
        return self._episode_ends.copy()

    @property
    def n_episodes(self) -> int:
        return int(self._episode_ends.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if self._episode_ends.size else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        """Number of steps of each episode (int64)."""
        return np.diff(self._episode_ends, prepend=0)

    @property
    def attrs(self) -> Any:
        """The root group's attributes (dict-like, persisted): task name, collection seeds, ..."""
        return self._root.attrs

    def __len__(self) -> int:
        return self.n_episodes

    def __contains__(self, key: object) -> bool:
        return key in self._arrays

    def __repr__(self) -> str:
        where = "memory" if self._path is None else str(self._path)
        mode = "r" if self._read_only else "a"
        return (
            f"EpisodeStore({where!r}, mode={mode!r}, n_episodes={self.n_episodes}, "
            f"n_steps={self.n_steps}, keys={self.keys})"
        )

    # ------------------------------------------------------------------ reading
    def episode_slice(self, i: int) -> slice:
        """Step range of episode ``i`` (negative indices count from the end)."""
        n = self.n_episodes
        index = int(i)
        if not -n <= index < n:
            raise IndexError(f"episode index {i} out of range for store with {n} episodes")
        index %= n
        start = int(self._episode_ends[index - 1]) if index > 0 else 0
        return slice(start, int(self._episode_ends[index]))

    def __getitem__(self, key: str) -> zarr.Array:
        """The lazy zarr array holding ``key`` for all episodes."""
        try:
            return self._arrays[key]
        except KeyError:
            raise KeyError(f"key {key!r} not in episode store; available keys: {self.keys}") from None

    def get_episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read episode ``i`` into numpy arrays (all keys, or only ``keys``)."""
        sl = self.episode_slice(i)
        names = self.keys if keys is None else list(keys)
        return {name: np.asarray(self[name][sl]) for name in names}

    # ------------------------------------------------------------------ writing
    def add_episode(self, data: Mapping[str, np.ndarray]) -> None:
        """Append one episode: ``{key: array (T, ...)}`` with the same ``T >= 1`` for every key.

        The first episode fixes the key set and each key's trailing shape and dtype; later episodes
        must match (values are cast only when numpy can do so safely, or float to float).
        """
        if self._read_only:
            raise EpisodeStoreError("episode store is opened read-only; open it with mode='a' to append")
        if not data:
            raise EpisodeStoreError("episode has no keys")
        values: dict[str, np.ndarray] = {}
        length: int | None = None
        first_key = ""
        for key, value in data.items():
            if not isinstance(key, str) or not key or "/" in key or key.startswith("__"):
                raise EpisodeStoreError(
                    f"invalid key {key!r}: keys must be non-empty strings without '/' and not start with '__'"
                )
            arr = np.asarray(value)
            if arr.ndim < 1:
                raise EpisodeStoreError(f"key {key!r}: expected an array with a time axis, got a scalar")
            if arr.dtype == object or arr.dtype.kind in "USV":
                raise EpisodeStoreError(f"key {key!r}: unsupported dtype {arr.dtype}")
            if length is None:
                length, first_key = arr.shape[0], key
            elif arr.shape[0] != length:
                raise EpisodeStoreError(
                    f"key {key!r} has {arr.shape[0]} steps but key {first_key!r} has {length}; "
                    "all keys of an episode must have the same length"
                )
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))[0])
                raise EpisodeStoreError(f"key {key!r} contains non-finite values (first at step {bad})")
            values[key] = arr
        assert length is not None
        if length < 1:
            raise EpisodeStoreError("episode has 0 steps; episodes need at least 1 step")

        if self.n_episodes == 0 and self._arrays and not self._matches_schema(values):
            # Empty arrays left behind (e.g. by an interrupted first append): redefine the schema.
            for key in list(self._arrays):
                del self._data_group[key]
            self._arrays = {}

        if self._arrays:
            self._check_schema(values)
        else:
            for key, arr in values.items():
                trailing = arr.shape[1:]
                self._arrays[key] = self._data_group.create_array(
                    key,
                    shape=(0, *trailing),
                    chunks=(_time_chunk_steps(trailing, arr.dtype.itemsize), *trailing),
                    dtype=arr.dtype,
                )

        start = self.n_steps
        stop = start + length
        # Data first, episode_ends last: an interrupted append leaves earlier episodes intact.
        for key in sorted(values):
            target = self._arrays[key]
            target.resize((stop, *target.shape[1:]))
            target[start:stop] = values[key].astype(target.dtype, copy=False)
        n = self.n_episodes
        ends_arr = self._episode_ends_array
        ends_arr.resize((n + 1,))
        ends_arr[n] = stop
        self._episode_ends = np.append(self._episode_ends, np.int64(stop))

    def _matches_schema(self, values: Mapping[str, np.ndarray]) -> bool:
        try:
            self._check_schema(values)
        except EpisodeStoreError:
            return False
        return True

    def _check_schema(self, values: Mapping[str, np.ndarray]) -> None:
        missing = sorted(set(self._arrays) - set(values))
        if missing:
            raise EpisodeStoreError(f"episode is missing key(s) {missing}; store keys are {self.keys}")
        extra = sorted(set(values) - set(self._arrays))
        if extra:
            raise EpisodeStoreError(f"episode has extra key(s) {extra}; store keys are {self.keys}")
        for key, arr in values.items():
            target = self._arrays[key]
            if arr.shape[1:] != tuple(target.shape[1:]):
                raise EpisodeStoreError(
                    f"key {key!r} has per-step shape {arr.shape[1:]}, store has {tuple(target.shape[1:])}"
                )
            both_float = arr.dtype.kind == "f" and target.dtype.kind == "f"
            if not (both_float or np.can_cast(arr.dtype, target.dtype, casting="safe")):
                raise EpisodeStoreError(
                    f"key {key!r} has dtype {arr.dtype}, which cannot be stored safely as {target.dtype}"
                )

    def save_zip(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write a copy of the whole store to a ``.zarr.zip`` file (zarr format 3) and return its path.

        Writes to a temporary file in the same folder and renames it into place, so a failure never
        leaves a half-written file. An existing file is replaced only when ``overwrite=True``.
        """
        target = Path(path)
        if not _is_zip_path(target):
            raise ValueError(f"zip path must end with .zip (e.g. .zarr.zip), got {str(target)!r}")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
        if target.is_dir():
            raise IsADirectoryError(f"{str(target)!r} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            zip_store = ZipStore(tmp_name, mode="w")
            try:
                # Zip entries are written once: attributes and metadata go in at creation time.
                root = zarr.create_group(zip_store, zarr_format=3, attributes=dict(self.attrs.asdict()))
                data = root.create_group("data")
                for key in self.keys:
                    _copy_array(self._arrays[key], data, key, self.n_steps)
                meta = root.create_group("meta")
                meta.create_array(
                    "episode_ends",
                    data=self._episode_ends.copy(),
                    chunks=(_EPISODE_ENDS_CHUNK,),
                )
            finally:
                zip_store.close()
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return target


def _copy_array(source: zarr.Array, group: zarr.Group, name: str, n_steps: int) -> None:
    """Copy the first ``n_steps`` of ``source`` into a new array ``group[name]``, chunk-aligned blocks."""
    trailing = tuple(source.shape[1:])
    chunk_steps = _time_chunk_steps(trailing, source.dtype.itemsize)
    dest = group.create_array(
        name, shape=(n_steps, *trailing), chunks=(chunk_steps, *trailing), dtype=source.dtype
    )
    step_bytes = max(1, math.prod(trailing) * source.dtype.itemsize)
    block = max(1, _COPY_BLOCK_BYTES // (step_bytes * chunk_steps)) * chunk_steps
    for start in range(0, n_steps, block):
        stop = min(n_steps, start + block)
        dest[start:stop] = source[start:stop]
