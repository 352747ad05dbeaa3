"""Image data path: windows per second gathered one at a time (collated) against whole batches (get_batch).

    python bench/image_data.py data/pusht_image.zarr [--batch 64] [--batches 50]

Reads the store the way training does (the pusht_image_unet_cpu preset's windows, episodes cached in memory
as uint8) and prints samples/s for both paths, in one process, plus their ratio. Timings only: nothing here
asserts on time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from torch.utils.data import default_collate

from diffpolicy.config import load_config
from diffpolicy.tasks import make_task
from diffpolicy.training.trainer import make_dataset


def samples_per_s(fetch, batches: list[np.ndarray]) -> float:
    fetch(batches[0])  # warm-up
    start = time.perf_counter()
    for idx in batches:
        fetch(idx)
    return len(batches) * len(batches[0]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--preset", default="pusht_image_unet_cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    cfg = load_config(args.preset)
    shape_meta = make_task(cfg.task.name, **cfg.task.kwargs).shape_meta()
    dataset = make_dataset(cfg, args.store, shape_meta)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(dataset), args.batch) for _ in range(args.batches)]
    single = samples_per_s(lambda idx: default_collate([dataset[int(i)] for i in idx]), batches)
    whole = samples_per_s(dataset.get_batch, batches)
    print(f"{len(dataset)} windows, batch {args.batch}, {args.batches} batches")
    print(f"one window at a time, collated: {single:8.0f} samples/s")
    print(f"whole batch (get_batch):        {whole:8.0f} samples/s   ({whole / single:.1f}x)")


if __name__ == "__main__":
    main()
