"""Check a LeRobot folder written by `diffpolicy dataset convert` with lerobot's own code; exit 1 on any
mismatch.

Run it in an environment with lerobot 0.6.x (lerobot pins its own torch, so not diffpolicy's)::

    diffpolicy dataset convert data/pusht.zarr runs/pusht_lerobot --fps 10
    /path/to/lerobot-venv/bin/python scripts/check_lerobot_export.py runs/pusht_lerobot

What it checks, each with lerobot's functions (nothing re-implemented here):

1. ``LeRobotDataset(root=FOLDER)`` opens it offline (pyav video backend) and every frame loads: all
   features, the right shapes, a task string;
2. stats: ``meta/stats.json`` has, for every feature, the stat names and shapes that lerobot's
   ``get_feature_stats`` gives on the frames the loader returns (images as lerobot's
   ``compute_episode_stats`` reduces them: per channel, scaled to [0, 1]), with the same min / max / mean /
   std (to float32 precision; cameras within 2.5 uint8 levels, min / max within 10, as our stats are of
   the frames before lossy encoding, like lerobot's own), and quantiles inside [min, max];
3. the per-episode stats in ``meta/episodes`` pass lerobot's ``aggregate_stats`` (its type and shape
   checks), and aggregate to stats.json's min / max / mean / std;
4. lerobot's ``NormalizerProcessorStep`` built from ``dataset.meta.stats`` normalizes a whole-dataset
   batch with every mode (MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10) and ``UnnormalizerProcessorStep``
   undoes it; under MEAN_STD the low-dim features come out with mean 0 and std 1 per component.
   This is where a (2,) vs (18,) stats shape made ``lerobot-train`` fail.

End to end, ``lerobot-train --dataset.root=FOLDER --dataset.repo_id=local/NAME --dataset.video_backend=pyav
--policy.type=diffusion --policy.device=cpu --policy.pretrained_backbone_weights=null
--policy.use_group_norm=true --policy.crop_shape="[12, 12]" --policy.push_to_hub=false --steps=3
--batch_size=4 --num_workers=0 --wandb.enable=false`` (needs lerobot[training,diffusion]) trains on an
export with (9, 2) keypoints, a state and a 16x16 camera; on an export of the old writer it stopped with
"The size of tensor a (2) must match the size of tensor b (18)".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FAILURES: list[str] = []
CHECKED = [0]
VERBOSE = [False]


def check(ok: bool, what: str) -> None:
    CHECKED[0] += 1
    if VERBOSE[0] or not ok:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        FAILURES.append(what)


def close(a, b, atol: float, rtol: float = 1e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=rtol))


def main() -> int:
    import torch
    from lerobot.configs.types import FeatureType, NormalizationMode
    from lerobot.datasets.compute_stats import aggregate_stats, get_feature_stats
    from lerobot.datasets.io_utils import load_nested_dataset
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.processor import NormalizerProcessorStep, UnnormalizerProcessorStep
    from lerobot.processor.converters import batch_to_transition, transition_to_batch
    from lerobot.utils.feature_utils import dataset_to_policy_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every check, not only failures")
    args = parser.parse_args()
    VERBOSE[0] = args.verbose
    root = args.folder.resolve()

    print(f"1. LeRobotDataset({root})")
    ds = LeRobotDataset(f"local/{root.name}", root=root, video_backend="pyav", return_uint8=True)
    features = ds.meta.features
    numeric = [k for k, ft in features.items() if ft["dtype"] not in ("video", "image", "string", "language")]
    cameras = [k for k, ft in features.items() if ft["dtype"] in ("video", "image")]
    items = [ds[i] for i in range(len(ds))]
    check(len(items) == ds.meta.total_frames, f"{len(items)} frames load (info.json: {ds.meta.total_frames})")
    for key in [*numeric, *cameras]:
        shape = tuple(items[0][key].shape)
        declared = tuple(features[key]["shape"])
        if key in cameras:
            declared = (declared[2], declared[0], declared[1])  # the loader returns (C, H, W)
        check(shape == declared or (declared == (1,) and shape == ()), f"{key}: frames {shape} ({declared})")
    check(all(isinstance(it["task"], str) for it in items), "every frame has a task string")
    tasks = sorted({it["task"] for it in items})
    check(len(tasks) == ds.meta.total_tasks, f"{len(tasks)} distinct tasks {tasks} (info.json: total_tasks)")

    print("2. meta/stats.json against lerobot's get_feature_stats on the loaded frames")
    stats = ds.meta.stats
    data = {k: np.stack([np.asarray(it[k]) for it in items]) for k in [*numeric, *cameras]}
    for key in [*numeric, *cameras]:
        if key in cameras:
            theirs = get_feature_stats(data[key], axis=(0, 2, 3), keepdims=True)
            theirs = {k: v if k == "count" else np.squeeze(v / 255.0, axis=0) for k, v in theirs.items()}
            atol = 2.5 / 255
        else:
            arr = data[key].astype(np.float64)
            theirs = get_feature_stats(arr, axis=0, keepdims=arr.ndim == 1)
            atol = 1e-6
        ours = {k: np.asarray(v) for k, v in stats[key].items()}
        check(set(ours) == set(theirs), f"{key}: stat names {sorted(ours)}")
        for name, value in theirs.items():
            if name in ours:
                check(ours[name].shape == value.shape, f"{key}/{name}: shape {ours[name].shape}")
        for name in ("min", "max", "mean", "std"):
            tol = atol * (4 if key in cameras and name in ("min", "max") else 1)  # extremes move most
            a, b = np.asarray(ours[name], float), np.asarray(theirs[name], float)
            gap = (
                f"off by {np.abs(a - b).max():.3g}" if a.shape == b.shape else f"shape {a.shape} vs {b.shape}"
            )
            check(close(a, b, tol), f"{key}/{name} equals lerobot's ({gap})")
        check(int(ours["count"][0]) == len(items), f"{key}/count = {int(ours['count'][0])} frames")
        for name in (k for k in ours if k.startswith("q")):
            inside = np.all(ours[name] >= ours["min"] - 1e-9) and np.all(ours[name] <= ours["max"] + 1e-9)
            check(bool(inside), f"{key}/{name} inside [min, max]")

    print("3. per-episode stats through lerobot's aggregate_stats")
    per_episode = []
    for ep in load_nested_dataset(root / "meta" / "episodes"):  # meta.episodes drops the stats columns
        one = {}
        for key in [*numeric, *cameras]:
            one[key] = {
                name: np.asarray(ep[f"stats/{key}/{name}"])
                for name in stats[key]
                if f"stats/{key}/{name}" in ep
            }
        per_episode.append(one)
    try:
        total = aggregate_stats(per_episode)
        check(True, f"aggregate_stats accepts {len(per_episode)} episodes' stats")
        for key in [*numeric, *cameras]:
            for name in ("min", "max", "mean", "std", "count"):
                check(close(total[key][name], stats[key][name], 1e-6), f"{key}/{name}: episodes agree")
    except Exception as e:  # its shape checks raise ValueError; a broadcast failure something else
        check(False, f"aggregate_stats: {type(e).__name__}: {e}")

    print("4. lerobot's normalizers on a whole-dataset batch")
    policy_features = dataset_to_policy_features(features)
    batch = {k: torch.as_tensor(data[k]) for k in policy_features}
    for key in cameras:
        batch[key] = batch[key].float() / 255.0  # what the loader returns without return_uint8
    for mode in NormalizationMode:
        if mode is NormalizationMode.IDENTITY:
            continue
        norm_map = {
            t: mode for t in (FeatureType.VISUAL, FeatureType.STATE, FeatureType.ENV, FeatureType.ACTION)
        }
        try:
            normalize = NormalizerProcessorStep(features=policy_features, norm_map=norm_map, stats=stats)
            unnormalize = UnnormalizerProcessorStep(features=policy_features, norm_map=norm_map, stats=stats)
            out = transition_to_batch(normalize(batch_to_transition(dict(batch))))
            back = transition_to_batch(unnormalize(batch_to_transition(dict(out))))
            same = all(close(back[k], batch[k], 1e-3, 1e-4) for k in policy_features)
            check(same, f"{mode.value}: normalize + unnormalize gives the batch back")
            if mode is NormalizationMode.MEAN_STD:
                for key in numeric:
                    if key not in policy_features:
                        continue
                    x = (
                        out[key]
                        .double()
                        .reshape(len(items), -1, out[key].shape[-1] if out[key].ndim > 1 else 1)
                    )
                    x = x.reshape(-1, x.shape[-1])
                    spread = x.std(0, unbiased=False)
                    ok = torch.allclose(x.mean(0), torch.zeros_like(spread), atol=1e-4) and bool(
                        ((spread - 1).abs() < 1e-3).logical_or(spread == 0).all()
                    )
                    check(ok, f"MEAN_STD {key}: mean 0, std 1 per component")
        except Exception as e:
            check(False, f"{mode.value}: {type(e).__name__}: {e}")

    if FAILURES:
        print(f"\n{len(FAILURES)} of {CHECKED[0]} checks FAILED:", *FAILURES, sep="\n  ")
        return 1
    summary = json.dumps({"frames": len(items), "features": len(features), "tasks": tasks})
    print(f"\nall {CHECKED[0]} checks passed ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
