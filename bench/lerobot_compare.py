"""Time LeRobot's DiffusionPolicy at the configuration of diffpolicy's `pusht_image_unet` preset.

Runs in a separate environment that has `lerobot[diffusion]` installed (diffpolicy is not importable
there), see bench/compare_lerobot.md for the recipe. It measures what `diffpolicy bench` measures, the
same way (medians after warm-up, synthetic inputs, no data loading):

- train step: `policy.forward(batch)` (loss) + backward + optimizer step at batch 64. By default the
  optimizer is LeRobot's own preset, as its users train (`config.get_optimizer_preset().build(...)`:
  Adam, lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, with torch's default implementation, a
  per-tensor loop on CPU); `--optimizer ours` gives it diffpolicy's optimizer instead (AdamW with the
  same hyper-parameters, fused), to separate the optimizer from the networks;
- fresh chunk: `predict_action_chunk` at batch 1 with empty observation queues, with DDPM-100 and
  DDIM-10 (a policy built with `noise_scheduler_type="DDIM"`, loaded with the same weights).

LeRobot normalizes in a separate processor pipeline, so unlike diffpolicy's policy the timed calls
include no (un)normalization; at batch 1 or 64 that is microseconds next to a 262.7M-parameter network.
The output JSON has the layout of `diffpolicy bench --out` so bench/ratios.py can compare the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
SAMPLERS = (("ddpm", 100), ("ddim", 10))

# diffpolicy's `pusht_image_unet` preset, in LeRobot's terms (src/diffpolicy/configs/pusht_image_unet.yaml).
PUSHT_IMAGE_UNET: dict[str, Any] = dict(
    n_obs_steps=2,
    horizon=16,
    n_action_steps=8,
    vision_backbone="resnet18",
    pretrained_backbone_weights=None,  # random init (ours: vision.pretrained_weights=null)
    use_group_norm=True,  # BatchNorm -> GroupNorm(num_features // 16), same rule as ours
    crop_shape=(84, 84),
    crop_is_random=True,  # random in train, centre in eval, as ours
    spatial_softmax_num_keypoints=32,  # feature dim = 2 * 32 = 64 = our vision.feature_dim
    use_separate_rgb_encoder_per_camera=True,  # ours: share_backbone=false (one camera either way)
    down_dims=(512, 1024, 2048),
    kernel_size=5,
    n_groups=8,
    diffusion_step_embed_dim=128,
    use_film_scale_modulation=True,  # ours: unet.cond_predict_scale=true
    noise_scheduler_type="DDPM",
    num_train_timesteps=100,
    beta_schedule="squaredcos_cap_v2",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    num_inference_steps=100,
    do_mask_loss_for_padding=True,  # ours masks padded actions whenever action_is_pad is given
)
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.95, 0.999), 1e-6  # our preset's train.lr / betas / weight_decay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls (as diffpolicy.bench)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, or the process's peak RSS on CPU (as diffpolicy.bench)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_config(device: torch.device, **overrides: Any) -> DiffusionConfig:
    """LeRobot's DiffusionConfig for Push-T image (96x96x3 camera + 2-d agent position, 2-d action)."""
    kwargs = {**PUSHT_IMAGE_UNET, **overrides}
    return DiffusionConfig(
        input_features={
            IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(2,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        device=device.type,
        **kwargs,
    )


def synthetic_batch(cfg: DiffusionConfig, batch: int, device: torch.device, train: bool) -> dict:
    """Random observation windows (images in [0, 1]) and, for training, an action chunk + padding mask."""
    out = {
        IMAGE_KEY: torch.rand(batch, cfg.n_obs_steps, 3, 96, 96, device=device),
        STATE_KEY: torch.randn(batch, cfg.n_obs_steps, 2, device=device),
    }
    if train:
        out["action"] = torch.randn(batch, cfg.horizon, 2, device=device)
        out["action_is_pad"] = torch.zeros(batch, cfg.horizon, dtype=torch.bool, device=device)
    return out


def make_optimizer(policy: DiffusionPolicy, kind: str, device: torch.device) -> torch.optim.Optimizer:
    """`lerobot`: the policy's own optimizer preset; `ours`: diffpolicy's fused AdamW settings."""
    if kind == "lerobot":
        return policy.config.get_optimizer_preset().build(policy.get_optim_params())
    kwargs = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **kwargs)


def time_train_step(
    policy: DiffusionPolicy,
    batch_size: int,
    optimizer_kind: str,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> float:
    """Median ms of loss (`policy.forward`) + backward + optimizer step on a synthetic batch."""
    batch = synthetic_batch(policy.config, batch_size, device, train=True)
    optimizer = make_optimizer(policy, optimizer_kind, device)
    policy.train()

    def train_step() -> None:
        loss, _ = policy.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_ms(train_step, device, warmup, repeats)


def bench_lerobot(
    device: torch.device,
    batch_size: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    optimizer_kind: str = "lerobot",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row in the layout of diffpolicy.bench.bench_preset, for LeRobot's DiffusionPolicy."""
    cfg = make_config(device, **(overrides or {}))
    policy = DiffusionPolicy(cfg).to(device)
    n_params = sum(p.numel() for p in policy.parameters())
    row: dict[str, Any] = {
        "preset": "lerobot_diffusion[pusht_image_unet]",
        "device": str(device),
        "params_m": n_params / 1e6,
        "params": n_params,
        "params_by_part": {
            "rgb_encoder": sum(p.numel() for p in policy.diffusion.rgb_encoder.parameters()),
            "unet": sum(p.numel() for p in policy.diffusion.unet.parameters()),
        },
        "batch_size": batch_size,
        "optimizer": optimizer_kind,
    }
    ms = time_train_step(policy, batch_size, optimizer_kind, device, warmup, repeats)
    row["train_step_ms"] = ms
    row["train_samples_per_s"] = batch_size / ms * 1000
    policy.zero_grad(set_to_none=True)  # the optimizer state went with time_train_step

    obs1 = synthetic_batch(cfg, 1, device, train=False)
    state = policy.state_dict()
    for sampler, steps in SAMPLERS:
        if (sampler, steps) != ("ddpm", cfg.num_inference_steps):
            sampler_cfg = dataclasses.replace(
                cfg, noise_scheduler_type=sampler.upper(), num_inference_steps=steps
            )
            policy = DiffusionPolicy(sampler_cfg).to(device)
            policy.load_state_dict(state)
        policy.eval()
        policy.reset()  # empty queues: predict_action_chunk uses the given window as it is

        last: dict[str, torch.Tensor] = {}

        def chunk(p: DiffusionPolicy = policy, out: dict[str, torch.Tensor] = last) -> None:
            out["action"] = p.predict_action_chunk(obs1)

        chunk_ms = median_ms(chunk, device, warmup, repeats)
        actions = last["action"]  # checked after timing so that no extra call is made
        if tuple(actions.shape) != (1, cfg.n_action_steps, 2) or not torch.isfinite(actions).all():
            raise RuntimeError(f"unexpected action chunk {tuple(actions.shape)} from {sampler}-{steps}")
        row[f"chunk_ms[{sampler}-{steps}]"] = chunk_ms
        row[f"per_action_ms[{sampler}-{steps}]"] = chunk_ms / cfg.n_action_steps
    row["peak_memory_mb"] = peak_memory_mb(device)
    return row


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions and thread count, as diffpolicy.bench.machine_info plus the LeRobot packages."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lerobot": version("lerobot"),
        "diffusers": version("diffusers"),
        "torchvision": version("torchvision"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(row: dict[str, Any]) -> str:
    """A two-column Markdown table of the row's scalar entries."""
    lines = ["| metric | value |", "|---|---|"]
    for key, value in row.items():
        if isinstance(value, dict):
            continue
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    if not _ or key not in {f.name for f in dataclasses.fields(DiffusionConfig)}:
        raise SystemExit(f"bad override '{text}': expected FIELD=JSON_VALUE with a DiffusionConfig field")
    value = json.loads(raw)
    return key, tuple(value) if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    """Command line: time LeRobot's DiffusionPolicy, print a table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizer", choices=("ours", "lerobot"), default="lerobot")
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument(
        "overrides", nargs="*", help='DiffusionConfig overrides as FIELD=JSON, e.g. down_dims="[64,128,256]"'
    )
    args = ap.parse_args(argv)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    overrides = dict(_parse_override(o) for o in args.overrides)
    row = bench_lerobot(device, args.batch_size, args.warmup, args.repeats, args.optimizer, overrides)
    result = {
        "machine": machine_info(device),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "rows": [row],
    }
    print(format_table(row))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
