"""Tiny datasets in foreign formats, written the way their own tools lay them out, for the format tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from diffpolicy.data.episodes import EpisodeStore

# A few steps of a tiny image policy on 16x16 cameras (12x12 crops), no closed-loop evaluation.
BRIEF_IMAGE_TRAINING = [
    "policy.vision.crop_shape=[12,12]",
    "train.batch_size=4",
    "train.num_steps=3",
    "train.val_every=3",
    "train.checkpoint_every=3",
    "train.eval_every=0",
    "eval.n_episodes=0",
]


def train_and_act(preset: str, overrides: list[str], run: Path):
    """`diffpolicy train --preset PRESET --run-dir RUN OVERRIDES...`, then reload the checkpoint and
    sample one action chunk from random observations; returns (policy, its run config, the chunk)."""
    import torch

    from diffpolicy.cli import main
    from diffpolicy.policy import load_policy

    assert main(["train", "--preset", preset, "--run-dir", str(run), *overrides]) == 0
    policy, cfg = load_policy(run / "checkpoints" / "latest")
    obs = {k: torch.rand(1, cfg.policy.n_obs_steps, *m["shape"]) for k, m in policy.shape_meta["obs"].items()}
    with torch.no_grad():
        action = policy.predict_action(obs)["action"]
    assert torch.isfinite(action).all()
    return policy, cfg, action


ROBOMIMIC_LOW_DIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
ROBOMIMIC_CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")


def write_robomimic(path: Path, lengths=(14, 12, 13), image: int = 16, seed: int = 0) -> Path:
    """A robomimic-layout HDF5 (data/demo_N/obs/<key>, actions, mask/train|valid, env_args), via h5py."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = int(sum(lengths))
        data.attrs["env_args"] = json.dumps(
            {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}
        )
        for i, n in enumerate(lengths):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = n
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)))
            demo.create_dataset("rewards", data=np.zeros(n))
            demo.create_dataset("dones", data=np.zeros(n, dtype=np.int64))
            obs = demo.create_group("obs")
            for key, dim in ROBOMIMIC_LOW_DIM.items():
                obs.create_dataset(key, data=rng.normal(size=(n, dim)))
            for key in ROBOMIMIC_CAMERAS:
                obs.create_dataset(key, data=rng.integers(0, 256, (n, image, image, 3), dtype=np.uint8))
        mask = f.create_group("mask")
        names = [f"demo_{i}".encode() for i in range(len(lengths))]
        mask.create_dataset("train", data=np.array(names[:-1], dtype="S"))
        mask.create_dataset("valid", data=np.array(names[-1:], dtype="S"))
    return path


def tiny_store(
    path: Path | None, lengths=(15, 12, 17), image: int | None = 16, seed: int = 0
) -> EpisodeStore:
    """An EpisodeStore with two cameras (when image), a state, an environment state and an action."""
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    for n in lengths:
        ep = {
            "state": rng.normal(size=(n, 4)).astype(np.float32),
            "environment_state": rng.normal(size=(n, 3)).astype(np.float32),
            "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        }
        if image:
            t = np.arange(n)[:, None, None, None]
            yy, xx = (g[None, ..., None] for g in np.mgrid[:image, :image])
            # smooth images (codecs keep them nearly exact) that change every frame
            ep["top"] = np.clip(40 + 4 * t + 5 * xx + np.array([0, 30, 60]), 0, 255).astype(np.uint8)
            ep["wrist"] = np.clip(200 - 3 * t - 6 * yy + np.array([10, 0, 20]), 0, 255).astype(np.uint8)
        store.add_episode(ep)
    return store


def tree_hash(path: Path) -> str:
    """One hash of every file under ``path`` (names and bytes), to show a source was left unchanged."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def lerobot_v3_to_v21(src: Path, dst: Path) -> Path:
    """Rewrite a v3.0 folder in the v2.1 layout: one parquet and one mp4 per episode, episodes.jsonl."""
    import av
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from diffpolicy.data.formats.lerobot import _encode_video

    info = json.loads((src / "meta" / "info.json").read_text())
    video_keys = [k for k, ft in info["features"].items() if ft["dtype"] == "video"]
    data = pq.read_table(src / "data" / "chunk-000" / "file-000.parquet")
    episodes = pq.read_table(src / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    frames = {}
    for key in video_keys:
        with av.open(str(src / "videos" / key / "chunk-000" / "file-000.mp4")) as c:
            frames[key] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    (dst / "meta").mkdir(parents=True)
    lines = []
    for ep in episodes:
        i, a, b = ep["episode_index"], ep["dataset_from_index"], ep["dataset_to_index"]
        part = data.filter(pc.equal(data["episode_index"], i))
        (dst / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(part, dst / "data" / "chunk-000" / f"episode_{i:06d}.parquet")
        for key in video_keys:
            path = dst / "videos" / "chunk-000" / key / f"episode_{i:06d}.mp4"
            _encode_video(path, frames[key][a:b], info["fps"], 18)
        lines.append(json.dumps({"episode_index": i, "tasks": ep["tasks"], "length": ep["length"]}))
    (dst / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    (dst / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "push"}) + "\n")
    info.update(
        codebase_version="v2.1",
        data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        total_chunks=1,
        total_videos=len(video_keys) * len(episodes),
    )
    (dst / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return dst
