"""Write tests/data/lerobot_v30_tiny (a LeRobot v3.0 dataset written by the real `lerobot` package) and
tests/data/lerobot_v30_tiny.npz (every frame as LeRobot's own loader returns it), for
tests/test_formats_lerobot.py::test_reads_a_dataset_written_by_lerobot.

Run it in an environment with lerobot 0.6.x (not diffpolicy's: lerobot pins its own torch), from the
repository root::

    /path/to/lerobot-venv/bin/python scripts/make_lerobot_fixture.py [--out tests/data]

The dataset uses lerobot's defaults (its default video codec, libsvtav1 in 0.6.x, CRF 30, a keyframe every
2 frames) on 3 tiny episodes: a 32x32 camera, a (2,) state, Push-T-like (9, 2) keypoints, a (2,) action,
a (1,) reward, and three task strings (episode 2 changes task half-way, so per-frame task indices matter).
The .npz holds what ``LeRobotDataset(...)[i]`` returns for every frame (uint8 frames, with
``return_uint8=True``), the task string of every frame, and which lerobot version and video backend decoded
them. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

NAME = "lerobot_v30_tiny"
FPS = 10
SIZE = 32
LENGTHS = (12, 9, 14)
TASKS = ("push the T into the target", "reach the goal", "hold still")
FEATURES = {
    "observation.images.top": {
        "dtype": "video",
        "shape": (SIZE, SIZE, 3),
        "names": ["height", "width", "channels"],
    },
    "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    "observation.environment_state": {"dtype": "float32", "shape": (9, 2), "names": None},
    "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
}


def episode_frames(index: int, length: int, rng: np.random.Generator) -> list[dict]:
    """Smooth moving images (a codec keeps their content) and random low-dim values."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    frames = []
    for t in range(length):
        cx, cy = 8 + t + 3 * index, 12 + (t % 5)
        blob = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 40.0)
        img = np.stack([30 + 4 * xx + blob, 60 + 3 * yy + 0.5 * blob, 200 - 2 * xx - 2 * yy], -1)
        task = TASKS[index] if index < 2 else TASKS[0 if t < length // 2 else 2]  # episode 2 changes task
        frames.append(
            {
                "observation.images.top": np.clip(img, 0, 255).astype(np.uint8),
                "observation.state": rng.normal(size=2).astype(np.float32),
                "observation.environment_state": (rng.normal(size=(9, 2)) * 50 + 256).astype(np.float32),
                "action": rng.uniform(-1, 1, 2).astype(np.float32),
                "next.reward": rng.uniform(0, 1, 1).astype(np.float32),
                "task": task,
            }
        )
    return frames


def main() -> None:
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data")
    args = parser.parse_args()
    out = Path(args.out)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / NAME
        ds = LeRobotDataset.create(
            repo_id=f"diffpolicy/{NAME}", fps=FPS, features=FEATURES, root=root, use_videos=True
        )
        for i, n in enumerate(LENGTHS):
            for frame in episode_frames(i, n, rng):
                ds.add_frame(frame)
            ds.save_episode(parallel_encoding=False)
        ds.finalize()

        loaded = LeRobotDataset(f"diffpolicy/{NAME}", root=root, video_backend="pyav", return_uint8=True)
        keys = [k for k in FEATURES if k != "task"]
        values: dict[str, list[np.ndarray]] = {k: [] for k in [*keys, "episode_index", "task_index"]}
        tasks = []
        for i in range(len(loaded)):
            item = loaded[i]
            for k in values:
                v = item[k].numpy()
                if k == "observation.images.top":
                    v = np.moveaxis(v, 0, -1)  # LeRobot returns (C, H, W)
                values[k].append(v)
            tasks.append(item["task"])
        expected = {k.replace(".", "_"): np.stack(v) for k, v in values.items()}
        expected["task"] = np.array(tasks)
        expected["lerobot_version"] = np.array(lerobot.__version__)
        expected["video_backend"] = np.array("pyav")
        codec = json.loads((root / "meta" / "info.json").read_text())["features"]["observation.images.top"]
        expected["video_codec"] = np.array(codec["info"]["video.codec"])

        target = out / NAME
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(root, target)
        for folder in sorted(target.rglob("*"), reverse=True):  # lerobot leaves an empty images/ folder
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    np.savez_compressed(out / f"{NAME}.npz", **expected)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"wrote {target} ({size / 1024:.0f} KiB, codec {expected['video_codec']}) and {NAME}.npz")


if __name__ == "__main__":
    main()
