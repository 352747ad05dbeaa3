"""Writes the tiny reference checkpoints that tests/test_old_checkpoints.py loads.

Run once per checkpoint format change, never to "fix" a failing load test: the point of these folders is
that they were written by older code. Each folder holds a policy with random weights (seed 0) and a
normalizer fitted to random data, and expected.json holds its predicted action for a fixed observation
batch and sampling seed, computed when it was saved.

    PYTHONPATH=src python tests/data/checkpoints/make_checkpoints.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for conftest.tiny_config

from conftest import tiny_config  # noqa: E402

from diffpolicy.checkpoint import save_checkpoint  # noqa: E402
from diffpolicy.data.normalize import Normalizer  # noqa: E402
from diffpolicy.policy import make_policy  # noqa: E402

SHAPE_META = {
    "obs": {"pos": {"shape": [2], "type": "low_dim"}, "vel": {"shape": [3], "type": "low_dim"}},
    "action": {"shape": [2]},
}
CONSISTENCY = (
    "policy.type=consistency",
    "policy.scheduler.sampler=consistency",
    "policy.scheduler.prediction_type=v_prediction",
    "policy.scheduler.num_inference_steps=2",
)
SMALL = (  # a few KB of weights per checkpoint
    "policy.unet.down_dims=[8]",
    "policy.unet.diffusion_step_embed_dim=8",
    "policy.unet.kernel_size=3",
    "policy.unet.n_groups=2",
    "policy.transformer.n_emb=16",
)
# folder name -> config overrides (on tests/conftest.py's TINY trajectory2d config)
POLICIES: dict[str, tuple[str, ...]] = {
    "diffusion_unet": ("policy.net=unet",),
    "diffusion_transformer": ("policy.net=transformer",),
    "mse_bc_unet": ("policy.type=mse_bc", "policy.net=unet"),
    "consistency_unet": (*CONSISTENCY, "policy.net=unet"),
    "consistency_ctm_unet": (*CONSISTENCY, "policy.net=unet", "policy.consistency.ctm=true"),
}


def observation() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pos": torch.randn(2, 2, 2, generator=g), "vel": torch.randn(2, 2, 3, generator=g)}


def predict(policy) -> torch.Tensor:
    return policy.predict_action(observation(), generator=torch.Generator().manual_seed(0))["action"]


def build(overrides: tuple[str, ...]):
    cfg = tiny_config(*SMALL, *overrides)
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, SHAPE_META)
    g = torch.Generator().manual_seed(0)
    data = {
        "pos": torch.randn(500, 2, generator=g),
        "vel": torch.randn(500, 3, generator=g),
        "action": torch.randn(500, 2, generator=g) * 3 + 1,
    }
    fitted = Normalizer.fit(data, {"pos": "minmax", "vel": "gaussian", "action": "minmax"})
    policy.normalizer.load_state_dict(fitted.state_dict())
    return policy.eval(), cfg


def main() -> None:
    torch.set_num_threads(1)
    for name, overrides in POLICIES.items():
        policy, cfg = build(overrides)
        path = save_checkpoint(HERE / name, policy, cfg, step=1)
        expected = {
            "policy_class": type(policy).__name__,
            "overrides": [*SMALL, *overrides],
            "action": predict(policy).tolist(),
        }
        (path / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        size = sum(p.stat().st_size for p in path.iterdir())
        print(f"{name}: {type(policy).__name__}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
