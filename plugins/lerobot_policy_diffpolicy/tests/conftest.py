"""Tiny diffpolicy Push-T checkpoints (random networks, fitted normalizers), exported for LeRobot.

These tests run in a Python >= 3.12 environment with lerobot installed (scripts/lerobot-plugin-env.sh); the
main suite (tests/) never imports lerobot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffpolicy.checkpoint import save_checkpoint
from diffpolicy.config import load_config
from diffpolicy.data.normalize import Normalizer
from diffpolicy.policy import make_policy
from diffpolicy.tasks import make_task

TINY = [
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.scheduler.num_inference_steps=3",
]
# sampler settings per kind of checkpoint: DDPM (sampled with its own DDPM), flow, distilled (consistency)
KINDS = {
    "ddpm": (),
    "flow": ("policy.objective=flow", "policy.scheduler.sampler=euler"),
    "consistency": ("policy.type=consistency", "policy.scheduler.sampler=consistency"),
}


def make_checkpoint(path: Path, obs_type: str = "state", kind: str = "ddpm") -> Path:
    """A Push-T checkpoint of `kind` with random weights and a normalizer fitted to the workspace."""
    preset = "pusht_state_unet_cpu" if obs_type == "state" else "pusht_image_unet_cpu"
    extra = ["policy.vision.backbone=compact"] if obs_type == "image" else []
    cfg = load_config(preset, [*TINY, *extra, *KINDS[kind]])
    meta = make_task("pusht", obs_type=obs_type).shape_meta()
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, meta).eval()
    g = torch.Generator().manual_seed(0)
    data = {
        "agent_pos": torch.rand(200, 2, generator=g) * 512,
        "action": torch.rand(200, 2, generator=g) * 512,
    }
    kinds = {"agent_pos": "minmax", "action": "minmax"}
    if obs_type == "state":
        data["keypoint"] = torch.rand(200, 18, generator=g) * 512
        kinds["keypoint"] = "minmax"
    else:
        kinds["img"] = "image"
    policy.normalizer.load_state_dict(Normalizer.fit(data, kinds).state_dict())
    return save_checkpoint(path, policy, cfg)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def state_ckpt(tmp_path_factory) -> Path:
    from lerobot_policy_diffpolicy.export import export_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "state")
    export_checkpoint(path, device="cpu")
    return path


@pytest.fixture(scope="session")
def image_ckpt(tmp_path_factory) -> Path:
    from lerobot_policy_diffpolicy.export import export_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "image", obs_type="image")
    export_checkpoint(path, device="cpu")
    return path
