"""Shared fixtures: a small trajectory2d demonstration store and tiny run configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffpolicy.collect import collect
from diffpolicy.config import RunConfig, load_config

# Small enough that a train step takes milliseconds on 2 CPU cores.
TINY = [
    "policy.unet.down_dims=[16,32]",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.unet.n_groups=4",
    "policy.transformer.n_layer=1",
    "policy.transformer.n_emb=32",
    "policy.transformer.n_head=2",
    "policy.scheduler.num_inference_steps=10",
    "train.batch_size=32",
    "train.num_steps=24",
    "train.warmup_steps=4",
    "train.log_every=4",
    "train.val_every=8",
    "train.checkpoint_every=8",
    "eval.n_episodes=4",
    "eval.n_envs=4",
    "eval.max_steps=40",
    "collect.n_episodes=12",
]


# The train / evaluate settings of a task's tiny collect -> train -> eval cycle (tests/test_<task>.py): every
# stage runs, on 2 episodes and a few steps; each task test adds its network and step counts.
TASK_CYCLE = [
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.val_every=0",
    "train.eval_every=0",
    "train.num_workers=0",
    "eval.n_episodes=2",
    "eval.n_envs=2",
    "eval.n_videos=1",
]

# A tiny U-Net with short chunks, for the task cycles whose presets use the U-Net.
TASK_CYCLE_UNET = [
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.scheduler.num_inference_steps=2",
]


def tiny_config(*overrides: str, preset: str = "trajectory2d_lowdim_unet") -> RunConfig:
    return load_config(preset, TINY + list(overrides))


def tiny_image_policy(*overrides: str, size: int = 32, crop: int = 28) -> torch.nn.Module:
    """A compact-CNN Push-T-like image policy (size x size camera + 2-D agent_pos, 2-D action) with a fitted
    normalizer and random weights: for tests of code around an image policy (export, serving)."""
    from diffpolicy.data.normalize import Normalizer
    from diffpolicy.policy import make_policy

    cfg = tiny_config("policy.vision.backbone=compact", *overrides, preset="pusht_image_unet_cpu")
    cfg.policy.vision.crop_shape = [crop, crop]
    meta = {
        "obs": {
            "image": {"shape": [3, size, size], "type": "rgb"},
            "agent_pos": {"shape": [2], "type": "low_dim"},
        },
        "action": {"shape": [2]},
    }
    policy = make_policy(cfg.policy, meta).eval()
    g = torch.Generator().manual_seed(0)
    data = {
        "agent_pos": torch.rand(100, 2, generator=g) * 512,
        "action": torch.rand(100, 2, generator=g) * 512,
    }
    kinds = {"image": "image", "agent_pos": "minmax", "action": "minmax"}
    policy.normalizer.load_state_dict(Normalizer.fit(data, kinds).state_dict())
    return policy


# One torch thread per test process: the suite runs one process per core (pytest -n auto), and results
# compared bit for bit with a 1-thread subprocess (tests/test_faults.py) need the same float reductions.
# Set at import as well as per test: module- and session-scoped fixtures run before any function-scoped
# autouse fixture, so a reference run built first in a fresh worker would otherwise use every core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # a test may change it; the next one starts from 1 again
    yield


@pytest.fixture(scope="session")
def traj_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "demos.zarr"
    collect(tiny_config(), path, progress=False)
    return path
