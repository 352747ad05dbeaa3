"""Frozen-backbone feature cache (policy.vision.cache_features): each stored frame's feature map, computed
once, so that training costs only the keypoint heads and the noise net.

The maps come from `RgbEncoder.feature_map` in eval mode, the function that runs the backbone on-line
(the normalizer's image map, the deterministic resize / centre crop, ImageNet normalization, the backbone at
`vision.precision`, rounding to `cache_dtype`): a checkpoint trained on the cache runs the same backbone on
raw camera frames at inference and sees the same numbers (tests/test_feature_cache.py).

One .npy file per camera, (n_frames, C', h, w) over every row of the episode store (train and validation
windows share it), written in chunks of frames (bounded memory), read memory-mapped. bf16 maps are stored
as their 16-bit patterns (int16) (numpy has no bf16). The file name is a hash of everything the maps depend
on (`cache_key`): the dataset (path, episode boundaries, frame shape, a sample of frames), the camera, the
backbone's name and actual weights (a pretrained file or a seeded random init alike), the preprocessing
and precision; a changed dataset or backbone gets a new file and a stale one is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.sequence import FeatureGather, prepare_obs
from diffpolicy.models.rgb import RgbEncoder

log = logging.getLogger("diffpolicy")

CACHE_VERSION = 1
SAMPLED_FRAMES = 32  # frames hashed into the dataset's part of the key (a re-recorded dataset differs)


def _hash_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(store: EpisodeStore, key: str) -> dict[str, Any]:
    """What identifies camera `key`'s frames in `store` without reading them all: path, episode
    boundaries, shape, dtype and a hash of SAMPLED_FRAMES frames spread over the store."""
    arr = store[key]
    n = int(arr.shape[0])
    rows = np.unique(np.linspace(0, n - 1, min(SAMPLED_FRAMES, n)).astype(np.int64))
    h = hashlib.sha256()
    for r in rows:
        h.update(np.ascontiguousarray(np.asarray(arr[r : r + 1])).tobytes())
    ends = np.asarray(store.episode_ends, dtype=np.int64)
    return {
        "path": str(Path(store.path).resolve()) if store.path is not None else None,
        "episode_ends": hashlib.sha256(ends.tobytes()).hexdigest(),
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "frames": h.hexdigest(),
    }


def cache_key(encoder: RgbEncoder, image_map: list[float], store: EpisodeStore, key: str) -> dict[str, Any]:
    """Everything camera `key`'s cached maps depend on. `image_map`: the policy normalizer's values for
    pixels 0, 0.5 and 1 of this key (what the backbone's input was made from)."""
    cfg = encoder.cfg
    backbone = encoder.backbones["shared" if cfg.share_backbone else key]
    return {
        "version": CACHE_VERSION,
        "camera": key,
        "dataset": dataset_fingerprint(store, key),
        "backbone": cfg.backbone,
        "weights": _hash_tensors(backbone.state_dict()),
        "image_map": [round(float(v), 7) for v in image_map],
        "resize_shape": list(encoder.resize) if encoder.resize else None,
        "crop": list(encoder.crop[key]),
        "imagenet_norm": cfg.imagenet_norm,
        "precision": cfg.precision,
        "dtype": str(encoder.cache_dtype),
        "feature_shape": list(encoder.feature_shapes[key]),
    }


def _file_stem(key: str, spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
    return f"{safe}-{digest}"


def _gather(arr: np.ndarray, dtype: torch.dtype) -> FeatureGather:
    def gather(rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr[np.asarray(rows, dtype=np.int64)]))
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    return gather


def cache_bytes(n_frames: int, feature_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The size of one camera's cache file: n_frames maps of `feature_shape` in `dtype`."""
    return int(n_frames * np.prod(feature_shape) * torch.empty((), dtype=dtype).element_size())


@torch.inference_mode()
def build_or_open(
    policy: Any, store: EpisodeStore, folder: str | Path, chunk: int = 256
) -> dict[str, FeatureGather]:
    """The cached feature maps of every camera of `policy` over `store`, as gathers by store row: opened
    when a file with this exact key exists in `folder`, else computed (on the policy's device, in chunks
    of `chunk` frames) and written first."""
    encoder = policy.obs_encoder.rgb
    if encoder is None:
        raise ValueError("policy.vision.cache_features: the policy has no camera inputs to cache")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(policy.parameters()).device
    was_training = encoder.training
    encoder.eval()  # the deterministic view (centre crop), as at inference
    gathers: dict[str, FeatureGather] = {}
    try:
        for key in encoder.keys:
            pixels = torch.tensor([0.0, 0.5, 1.0], device=device)
            image_map = policy.normalizer.normalize(key, pixels).tolist()
            spec = cache_key(encoder, image_map, store, key)
            stem = _file_stem(key, spec)
            path, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
            if path.is_file() and meta_path.is_file():
                log.info("feature cache: camera '%s' from %s", key, path)
            else:
                _build(encoder, policy.normalizer, store, key, spec, path, meta_path, chunk, device)
            arr = np.load(path, mmap_mode="r")
            gathers[key] = _gather(arr, encoder.cache_dtype)
            others = [p for p in folder.glob(f"{stem.rsplit('-', 1)[0]}-*.npy") if p != path]
            if others:
                size = sum(p.stat().st_size for p in others) / 1e9
                log.info(
                    "feature cache: %d other file(s) for camera '%s' in %s (%.2f GB; other datasets, "
                    "weights or settings): not used, not removed",
                    len(others),
                    key,
                    folder,
                    size,
                )
    finally:
        encoder.train(was_training)
    return gathers


def _build(
    encoder: RgbEncoder,
    normalizer: Any,
    store: EpisodeStore,
    key: str,
    spec: dict[str, Any],
    path: Path,
    meta_path: Path,
    chunk: int,
    device: torch.device,
) -> None:
    frames = store[key]
    n = int(frames.shape[0])
    shape = tuple(encoder.feature_shapes[key])
    bf16 = encoder.cache_dtype == torch.bfloat16
    size = cache_bytes(n, shape, encoder.cache_dtype)
    log.info(
        "feature cache: computing camera '%s' for %d frames (%s maps, %s, %.2f GB) into %s",
        key,
        n,
        "x".join(map(str, shape)),
        encoder.cache_dtype,
        size / 1e9,
        path,
    )
    tmp = path.with_suffix(".npy.partial")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16 if bf16 else np.float16, shape=(n, *shape))
    t0 = time.perf_counter()
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = torch.from_numpy(prepare_obs(np.asarray(frames[a:b]), "rgb")).to(device)[:, None]  # (n,1,C,H,W)
        fmap = encoder.feature_map(normalizer.normalize(key, x), key)[:, 0].cpu()
        out[a:b] = (fmap.view(torch.int16) if bf16 else fmap).numpy()
    out.flush()
    del out
    seconds = time.perf_counter() - t0
    tmp.replace(path)
    meta = {**spec, "n_frames": n, "bytes": size, "seconds": round(seconds, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    log.info(
        "feature cache: camera '%s' done in %.1f min (%.2f ms per frame)",
        key,
        seconds / 60,
        1e3 * seconds / n,
    )
