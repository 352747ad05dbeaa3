"""Tiny diffpolicy checkpoints (random networks, fitted normalizers) of any task, exported for LeRobot:
the policy plumbing of the env and robot plugin tests (their actions mean nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot_policy_diffpolicy.export import export_checkpoint

from diffpolicy.checkpoint import save_checkpoint
from diffpolicy.config import load_config
from diffpolicy.data.normalize import Normalizer
from diffpolicy.policy import make_policy
from diffpolicy.tasks import make_task

TINY = [
    "policy.horizon=8",
    "policy.n_obs_steps=2",
    "policy.n_action_steps=4",
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.scheduler.num_inference_steps=3",
    "eval.num_inference_steps=3",
]


def make_task_checkpoint(path: Path, preset: str, *overrides: str, scale: float = 1.0) -> Path:
    """A checkpoint of `preset` (its task and task kwargs) shrunk by TINY and `overrides`, its normalizer
    fitted to uniform data in [0, scale) per low-dim key, exported (config.json etc.) for --policy.path."""
    cfg = load_config(preset, [*TINY, *overrides])
    meta = make_task(cfg.task.name, **cfg.task.kwargs).shape_meta()
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, meta).eval()
    g = torch.Generator().manual_seed(0)
    data: dict[str, Any] = {"action": torch.rand(200, *meta["action"]["shape"], generator=g) * scale}
    kinds = {"action": "minmax"}
    for key, m in meta["obs"].items():
        if m.get("type", "low_dim") == "rgb":
            kinds[key] = "image"
        else:
            data[key] = torch.rand(200, int(np.prod(m["shape"])), generator=g) * scale
            kinds[key] = "minmax"
    policy.normalizer.load_state_dict(Normalizer.fit(data, kinds).state_dict())
    save_checkpoint(path, policy, cfg)
    export_checkpoint(path, device="cpu")
    return path
