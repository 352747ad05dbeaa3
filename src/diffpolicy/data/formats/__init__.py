"""Datasets in other formats: detection, import into an EpisodeStore, shape_meta, the training entry point.

Formats (one reader module each; nothing outside this package knows about them):

* ``episode_store``: our own zarr layout (the original diffusion_policy ReplayBuffer), used as it is;
* ``lerobot``: a local LeRobot dataset folder (``meta/info.json``), codebase v3.0 or v2.1 (lerobot.py,
  which also writes v3.0);
* ``robomimic``: a robomimic ``.hdf5`` file (robomimic.py);
* ``minari``: a local Minari dataset folder (``metadata.json`` + ``main_data.hdf5``, or its parent)
  (minari.py).

How ``data.path=PATH`` trains on a foreign dataset: :func:`open_training_data` detects the format and
imports the dataset ONCE into an EpisodeStore under ``data.import_dir`` (default ``<run_dir>/imported``;
point several runs at one folder to share an import). The store is named ``<source name>-<fingerprint>.zarr``;
the fingerprint hashes the source's absolute path, every source file's size and mtime, and the import
options, so an edited source is imported again and an unchanged one is reused. The source is only ever
opened read-only and nothing is written inside or beside it. ``diffpolicy dataset convert SRC DST`` does
the same import (or an EpisodeStore -> LeRobot v3.0 export) explicitly.

``shape_meta`` comes from the task when the run has one (its keys must be in the data); without a task
(``task.name=""``) it is the one the importer read from the dataset's own metadata, optionally narrowed
to ``data.obs_keys``.

Key names: store keys may not contain ``/`` and policy keys may not contain ``.`` (config overrides and
torch module names split on dots), so LeRobot feature names are mapped (see lerobot.py:
``observation.images.<cam>`` -> ``<cam>``, ``observation.image`` -> ``image``, ``observation.state`` ->
``state``, ``observation.environment_state`` -> ``environment_state``, ``action`` -> ``action``) and the
original names are kept in the store's ``source.names`` so the LeRobot writer restores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.formats.base import ForeignDataset, FormatError, import_dataset, low_dim_stats, obs_spec

__all__ = [
    "FORMATS",
    "ForeignDataset",
    "FormatError",
    "describe",
    "detect_format",
    "import_dataset",
    "open_training_data",
    "read_dataset",
    "store_shape_meta",
]

log = logging.getLogger(__name__)

FORMATS = ("episode_store", "lerobot", "robomimic", "minari")
# Minari: None flattens goal-style observations (observation + desired_goal) and leaves others as they are
DEFAULT_FLATTEN: Sequence[str] | None = None


def detect_format(path: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` ``path`` holds (by its files, never by reading data)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "meta" / "info.json").is_file():
            return "lerobot"
        if (p / "metadata.json").is_file() or (p / "data" / "metadata.json").is_file():
            return "minari"
        if (p / "zarr.json").is_file() or (p / ".zgroup").is_file():
            return "episode_store"
    elif p.suffix.lower() == ".zip":
        return "episode_store"
    elif p.suffix.lower() in (".hdf5", ".h5", ".he5"):
        return "minari" if (p.parent / "metadata.json").is_file() else "robomimic"
    raise FormatError(
        p,
        "unknown dataset format: expected an EpisodeStore (.zarr folder or .zarr.zip), a LeRobot folder "
        "(meta/info.json), a robomimic .hdf5 file or a Minari folder (metadata.json + main_data.hdf5)",
    )


def read_dataset(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    flatten_obs: Sequence[str] | None = DEFAULT_FLATTEN,
) -> ForeignDataset:
    """Open a foreign dataset read-only and describe it (see each reader for its layout and key names)."""
    fmt = fmt or detect_format(path)
    if fmt == "lerobot":
        from diffpolicy.data.formats.lerobot import read_lerobot

        return read_lerobot(path)
    if fmt == "robomimic":
        from diffpolicy.data.formats.robomimic import read_robomimic

        return read_robomimic(path)
    if fmt == "minari":
        from diffpolicy.data.formats.minari import read_minari

        return read_minari(path, flatten=flatten_obs)
    raise ValueError(f"no reader for format {fmt!r}; readers: lerobot, robomimic, minari")


def _fingerprint(path: Path, options: dict[str, Any]) -> str:
    """Hash of the source's absolute path, its files' sizes and mtimes, and the import options."""
    h = hashlib.sha256(json.dumps({"path": str(path.resolve()), **options}, sort_keys=True).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def store_shape_meta(store: EpisodeStore, action_key: str = "action") -> dict[str, Any]:
    """The store's recorded shape_meta (written by an import), else one inferred from its arrays."""
    saved = store.attrs.get("shape_meta")
    if isinstance(saved, dict) and "obs" in saved and "action" in saved:
        return json.loads(json.dumps(saved))
    if action_key not in store:
        raise FormatError(store.path or "<memory>", f"no '{action_key}' array (missing feature)")
    obs = {}
    for key in store.keys:
        if key == action_key:
            continue
        arr = store[key]
        spec = obs_spec(key, tuple(arr.shape[1:]), arr.dtype)
        if spec is not None:
            obs[key] = spec
    return {"obs": obs, "action": {"shape": [int(np.prod(store[action_key].shape[1:]))]}}


def _select(
    shape_meta: dict[str, Any],
    obs_keys: Sequence[str] | None,
    where: Path | str,
    store: EpisodeStore | None = None,
    action_key: str = "action",
) -> dict[str, Any]:
    """``shape_meta`` narrowed to ``obs_keys``; with ``store``, a key the store holds but ``shape_meta`` does
    not list (e.g. a Minari part that was flattened into ``state``) is described from its array."""
    if not obs_keys:
        return shape_meta
    shape_meta = json.loads(json.dumps(shape_meta))
    for key in obs_keys:
        if store is not None and key not in shape_meta["obs"] and key in store and key != action_key:
            arr = store[key]
            spec = obs_spec(key, tuple(arr.shape[1:]), arr.dtype)
            if spec is None:
                raise FormatError(
                    where,
                    f"data.obs_keys names {key!r} of shape {list(arr.shape[1:])}, neither rgb nor low-dim",
                )
            shape_meta["obs"][key] = spec
    missing = [k for k in obs_keys if k not in shape_meta["obs"]]
    if missing:
        raise FormatError(
            where,
            f"data.obs_keys {missing} are not in the dataset (missing features); "
            f"it has {sorted(shape_meta['obs'])}",
        )
    return {"obs": {k: shape_meta["obs"][k] for k in obs_keys}, "action": shape_meta["action"]}


def open_training_data(
    path: str | os.PathLike,
    import_dir: str | os.PathLike,
    *,
    obs_keys: Sequence[str] | None = None,
    task_shape_meta: dict[str, Any] | None = None,
    flatten_obs: Sequence[str] | None = DEFAULT_FLATTEN,
    action_key: str = "action",
    image_size: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[EpisodeStore, dict[str, Any], str]:
    """The EpisodeStore to train on, its shape_meta, and one line saying what was done.

    An EpisodeStore is opened as it is; any other format is imported once into ``import_dir`` (see the
    module docstring) and the import is reused while the source is unchanged; ``image_size`` ([H, W])
    resizes its cameras once at import. A store without episodes is refused here, naming it; episodes
    shorter than the horizon follow ``data.short_episodes`` in SequenceDataset, whatever the format.
    """
    source = Path(path)
    fmt = detect_format(source)
    if fmt == "episode_store":
        if image_size:
            raise ValueError(
                f"data.image_size resizes imported datasets; {source} is an EpisodeStore, used as is"
            )
        store = EpisodeStore.open(source)
        note = f"data {source}: EpisodeStore"
    else:
        options = {
            "format": fmt,
            "flatten_obs": None if flatten_obs is None else list(flatten_obs),
            "image_size": image_size and list(image_size),
        }
        name = source.stem if source.is_file() else source.name
        target = Path(import_dir) / f"{name}-{_fingerprint(source, options)}.zarr"
        if target.exists():
            store = EpisodeStore.open(target)
            note = f"data {source} ({fmt}): reusing the import {target}"
        else:
            dataset = read_dataset(source, fmt, flatten_obs=flatten_obs)
            store = import_dataset(dataset, target, progress=progress, image_size=image_size)
            note = f"data {source} ({dataset.format}): imported {store.n_episodes} episodes into {target}"
    if store.n_episodes == 0:
        what = "EpisodeStore" if fmt == "episode_store" else f"{fmt} dataset"
        raise FormatError(
            source,
            f"the {what} holds no episodes, so there is nothing to train on (was its recording or "
            "collection stopped before the first episode was saved?)",
        )
    if task_shape_meta is not None:
        shape_meta = _select(task_shape_meta, obs_keys, source)
        missing = [k for k in [*shape_meta["obs"], action_key] if k not in store]
        if missing:
            raise FormatError(
                source, f"the task needs {missing}, which the dataset lacks; it has {store.keys}"
            )
    else:
        shape_meta = _select(store_shape_meta(store, action_key), obs_keys, source, store, action_key)
        note += f"; shape_meta from the dataset: {json.dumps(shape_meta)}"
    return store, shape_meta, note


def _summary_stats(values: np.ndarray) -> dict[str, Any]:
    full = low_dim_stats(values)
    return {k: full[k] for k in ("min", "max", "mean", "std") if k in full}


def describe(
    path: str | os.PathLike, flatten_obs: Sequence[str] | None = DEFAULT_FLATTEN, progress: bool = False
) -> dict[str, Any]:
    """What ``diffpolicy dataset info`` prints: format, episodes, frames, fps, keys with shapes, shape_meta,
    the task strings (LeRobot), the groups of a collection mix (``mix``: per group its task_kwargs, task
    string, episodes, frames, seed range; from the per-episode records `collect` keeps) and per-key stats
    of the low-dim keys (the dataset's own stats when it ships them, else computed)."""
    fmt = detect_format(path)
    out: dict[str, Any] = {"path": str(path), "format": fmt}
    if fmt == "episode_store":
        store = EpisodeStore.open(path)
        lengths = store.episode_lengths
        out.update(fps=store.attrs.get("fps"), shape_meta=store_shape_meta(store))
        out["keys"] = {
            k: {"shape": list(store[k].shape[1:]), "dtype": str(store[k].dtype)} for k in store.keys
        }
        out["stats"] = {
            k: _summary_stats(store[k][:])
            for k in store.keys
            if not (store[k].dtype == np.uint8 and store[k].ndim == 4) and store[k].dtype.kind in "biuf"
        }
    else:
        ds = read_dataset(path, fmt, flatten_obs=flatten_obs)
        lengths = np.asarray(ds.episode_lengths)
        out.update(format=ds.format, fps=ds.fps, shape_meta=ds.shape_meta)
        if ds.attrs.get("tasks"):
            out["tasks"] = ds.attrs["tasks"]
        out["keys"] = {k: {"source": v} for k, v in ds.source_names.items()}
        for k, meta in ds.shape_meta["obs"].items():
            out["keys"].setdefault(k, {}).update(shape=meta["shape"], type=meta["type"])
        out["keys"].setdefault("action", {}).update(shape=ds.shape_meta["action"]["shape"], type="action")
        if ds.stats:
            key_of = {name: key for key, name in ds.source_names.items()}
            out["stats"] = {key_of.get(name, name): v for name, v in ds.stats.items()}
            out["stats_source"] = "the dataset's own stats"
        else:
            columns: dict[str, list[np.ndarray]] = {}
            from tqdm.auto import tqdm

            for episode in tqdm(ds.episodes(low_dim_only=True), total=ds.n_episodes, disable=not progress):
                for k, v in episode.items():
                    columns.setdefault(k, []).append(v)
            out["stats"] = {k: _summary_stats(np.concatenate(v)) for k, v in columns.items()}
    records = store.attrs.get("episodes") if fmt == "episode_store" else ds.attrs.get("episodes")
    if isinstance(records, list) and len(records) == len(lengths) and any("group" in r for r in records):
        from diffpolicy.collect import mix_summary

        groups = mix_summary(records, lengths)
        if len(groups) > 1 or (fmt == "episode_store" and store.attrs.get("mix")):
            out["mix"] = groups
    out.update(
        n_episodes=int(len(lengths)),
        n_frames=int(lengths.sum()),
        episode_length={"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())}
        if len(lengths)
        else {},
    )
    return out
