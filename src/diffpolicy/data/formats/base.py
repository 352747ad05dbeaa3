"""What every dataset reader returns, and the one import path from a reader into an EpisodeStore.

A reader (lerobot.py, robomimic.py, minari.py) opens a foreign dataset read-only and describes it as a
:class:`ForeignDataset`: its episodes as ``{store_key: array (T, ...)}`` dicts, the ``shape_meta`` taken
from the dataset's own metadata, and what the store keys were called in the source. :func:`import_dataset`
writes those episodes into a new EpisodeStore (atomically: a temporary folder renamed into place), so the
trainer and SequenceDataset only ever see EpisodeStores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffpolicy.data.episodes import EpisodeStore, EpisodeStoreError
from diffpolicy.files import make_temp_dir, replace_folder

__all__ = [
    "ForeignDataset",
    "FormatError",
    "atomic_folder",
    "check_finite",
    "check_lengths",
    "image_histogram",
    "image_stats",
    "import_dataset",
    "low_dim_stats",
    "QUANTILES",
    "obs_spec",
    "require",
    "resize_frames",
]


class FormatError(ValueError):
    """A foreign dataset cannot be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def require(module: str, extra: str = "formats") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"reading this dataset needs '{module}': pip install 'diffpolicy[{extra}]'"
        ) from e


@dataclass
class ForeignDataset:
    """A dataset in another format, described for import (nothing is read until ``episodes()``)."""

    path: Path
    format: str  # e.g. "lerobot v3.0", "robomimic", "minari"
    episode_lengths: list[int]
    # {"obs": {store_key: {"shape": [...], "type": "low_dim" | "rgb"}}, "action": {"shape": [Da]}}
    shape_meta: dict[str, Any]
    # episodes(low_dim_only=False) yields one {store_key: array (T, ...)} per episode, in order (without
    # images when low_dim_only, e.g. for stats); raises FormatError on bad data
    episodes: Callable[..., Iterator[dict[str, np.ndarray]]]
    fps: float | None = None
    source_names: dict[str, str] = field(default_factory=dict)  # store key -> name in the source
    attrs: dict[str, Any] = field(default_factory=dict)  # extra JSON metadata kept in the store
    stats: dict[str, dict[str, Any]] | None = None  # the dataset's own stats, when it ships them

    @property
    def n_episodes(self) -> int:
        return len(self.episode_lengths)

    @property
    def n_frames(self) -> int:
        return int(sum(self.episode_lengths))


def obs_spec(key: str, trailing_shape: tuple[int, ...], dtype: Any) -> dict[str, Any] | None:
    """shape_meta entry of a stored (T, ...) array: ``rgb`` [C, H, W] for (H, W, 1|3) uint8 images (or any
    key named ``*image*``), ``low_dim`` for other numeric arrays (scalars as [1], e.g. Push-T keypoints
    [9, 2]), None for what training cannot use (float (H, W, 1|3) maps such as depth, strings)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in trailing_shape)
    if len(shape) == 3 and shape[-1] in (1, 3):
        if dtype == np.uint8 or "image" in key:
            return {"shape": [shape[2], shape[0], shape[1]], "type": "rgb"}
        return None
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer):
        return {"shape": list(shape) or [1], "type": "low_dim"}
    return None


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on error it is removed.

    A failure never leaves a half-written ``target``; an existing one is replaced only with ``overwrite``,
    and only once the new one is complete (:func:`diffpolicy.files.replace_folder`: a failed conversion or
    a failed swap leaves it as it was).
    """
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp-")  # the user's umask, not mkdtemp's 0700
    try:
        yield tmp
        replace_folder(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def import_dataset(
    dataset: ForeignDataset,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    image_size: Sequence[int] | None = None,
) -> EpisodeStore:
    """Write ``dataset``'s episodes into a new EpisodeStore at ``dst`` and open it read-only.

    The store is built in a temporary folder beside ``dst`` and renamed into place when complete, so an
    interrupted import never leaves a half store at ``dst``. ``dst`` is replaced only with ``overwrite``.
    ``image_size`` ([H, W]) resizes every camera once, at import (e.g. 480x640 recordings to 96x128, so
    that the store and training fit in memory); a deployed policy must see frames resized the same way.
    The store's attrs record the source (path, format, fps, original key names), ``shape_meta`` and
    ``image_size``; the dataset's per-episode records (``attrs["episodes"]``), when it has them, become the
    store's (and their seeds its ``seeds``).
    """
    target = Path(dst)
    shape_meta = json.loads(json.dumps(dataset.shape_meta))
    cameras = [k for k, m in shape_meta["obs"].items() if m["type"] == "rgb"]
    if image_size is not None:
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be [H, W], got {list(image_size)}")
        for key in cameras:
            shape_meta["obs"][key]["shape"][1:] = [int(image_size[0]), int(image_size[1])]
    if target.resolve() == dataset.path.resolve() or dataset.path.resolve() in target.resolve().parents:
        raise ValueError(f"refusing to write {target} inside the source dataset {dataset.path}")
    with atomic_folder(target, overwrite) as tmp:
        store = EpisodeStore.create(tmp, overwrite=True)
        bar = tqdm(
            total=dataset.n_frames,
            desc=f"import {dataset.path.name}",
            unit="frame",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for i, episode in enumerate(dataset.episodes()):
                if image_size is not None:
                    for key in cameras:
                        episode[key] = resize_frames(episode[key], image_size)
                try:
                    store.add_episode(episode)
                except EpisodeStoreError as e:
                    raise FormatError(dataset.path, f"episode {i}: {e}") from None
                bar.update(len(next(iter(episode.values()))))
        if store.n_episodes != dataset.n_episodes:
            raise FormatError(
                dataset.path, f"metadata lists {dataset.n_episodes} episodes but {store.n_episodes} were read"
            )
        source = {k: v for k, v in dataset.attrs.items() if k != "episodes"}
        store.attrs.update(
            {
                "source": {
                    "path": str(dataset.path.resolve()),
                    "format": dataset.format,
                    "names": dataset.source_names,
                    **source,
                },
                "fps": dataset.fps,
                "shape_meta": shape_meta,
                "image_size": list(image_size) if image_size is not None else None,
            }
        )
        # Per-episode records (a LeRobot dataset written by `collect`: seed, group, task_kwargs) stay
        # per-episode records, and their seeds the store's seeds, which train / eval check against.
        records = dataset.attrs.get("episodes")
        if isinstance(records, list) and len(records) == store.n_episodes:
            store.attrs["episodes"] = records
            if all(isinstance(r.get("seed"), int) for r in records):
                store.attrs["seeds"] = [r["seed"] for r in records]
    return EpisodeStore.open(target)


def resize_frames(frames: np.ndarray, size: Sequence[int], block: int = 64) -> np.ndarray:
    """uint8 (N, H, W, C) frames resized to (N, size[0], size[1], C): bilinear with antialiasing (area-like
    when shrinking), in blocks of frames so a long 480x640 episode never becomes one huge float tensor."""
    import torch
    import torch.nn.functional as F

    h, w = int(size[0]), int(size[1])
    if frames.shape[1:3] == (h, w):
        return frames
    out = np.empty((len(frames), h, w, frames.shape[-1]), dtype=np.uint8)
    for start in range(0, len(frames), block):
        x = torch.from_numpy(np.ascontiguousarray(frames[start : start + block])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + block] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # what LeRobot (0.4 and later) stores as q01, q10, ... q99


def _quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


def low_dim_stats(values: np.ndarray) -> dict[str, Any]:
    """min / max / mean / std / count and the :data:`QUANTILES` of a (T, ..., D) array, as JSON lists.

    Reduced over every axis but the last, as LeRobot does (its stats code treats all leading axes as
    samples): Push-T's (T, 9, 2) keypoints get (2,) stats over their 9 T points, a (T, D) vector (D,),
    scalars (T,) or (T, 1) get (1,). ``count`` is T, the number of frames. A LeRobot normalizer
    broadcasts these against the feature, so any other shape fails there.
    """
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return {"count": [0]}
    x = arr.reshape(-1, arr.shape[-1] if arr.ndim > 1 else 1)
    out = {
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "count": [int(len(arr))],
    }
    for q, value in zip(QUANTILES, np.quantile(x, QUANTILES, axis=0), strict=True):
        out[_quantile_name(q)] = value.tolist()
    return out


def image_histogram(frames: np.ndarray) -> np.ndarray:
    """Per-channel counts of each level of uint8 (N, H, W, C) frames, (C, 256): histograms of several
    episodes add up to the dataset's, from which :func:`image_stats` gets exact stats and quantiles."""
    flat = np.asarray(frames, dtype=np.uint8).reshape(-1, frames.shape[-1])
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])


def image_stats(histogram: np.ndarray, n_frames: int) -> dict[str, Any]:
    """LeRobot's per-channel image stats from an :func:`image_histogram`: min / max / mean / std and the
    :data:`QUANTILES` of the pixel values scaled to [0, 1], each shaped (C, 1, 1); ``count`` is the number
    of frames. Quantiles are exact (the smallest level whose cumulative share reaches q)."""
    hist = np.asarray(histogram, dtype=np.float64)
    levels = np.arange(256) / 255.0
    n = hist.sum(1)
    mean = hist @ levels / n
    std = np.sqrt(np.maximum(hist @ levels**2 / n - mean**2, 0.0))
    seen = hist > 0
    cdf = np.cumsum(hist, 1) / n[:, None]
    per = {
        "min": levels[seen.argmax(1)],
        "max": levels[255 - seen[:, ::-1].argmax(1)],
        "mean": mean,
        "std": std,
    }
    for q in QUANTILES:
        per[_quantile_name(q)] = levels[(cdf >= q - 1e-12).argmax(1)]
    out: dict[str, Any] = {k: v.reshape(-1, 1, 1).tolist() for k, v in per.items()}
    out["count"] = [int(n_frames)]
    return out


def check_finite(path: Path, what: str, values: np.ndarray) -> None:
    """Raise FormatError naming the first step where ``values`` has a NaN or inf."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1) if len(arr) else np.zeros(0, bool)
        if bad.any():
            raise FormatError(
                path, f"{what} has NaN/inf values (first at step {int(np.flatnonzero(bad)[0])})"
            )


def check_lengths(path: Path, where: str, lengths: Mapping[str, int]) -> None:
    """Raise FormatError when the arrays of one episode disagree on their number of steps."""
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise FormatError(path, f"{where}: mismatched lengths ({listed})")
