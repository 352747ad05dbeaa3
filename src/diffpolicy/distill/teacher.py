"""The teacher of a distillation run: loading and checking it, and the run config derived from it."""

from __future__ import annotations

from pathlib import Path

import torch

from diffpolicy.checkpoint import CheckpointError
from diffpolicy.config import ConfigError, RunConfig, validate, with_overrides
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, load_policy


class TeacherError(ValueError):
    """The teacher checkpoint is missing, corrupt, or not a policy we can distil."""


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusionPolicy, RunConfig]:
    """Load and check a teacher: a diffusion policy with global observation conditioning, frozen."""
    try:
        policy, cfg = load_policy(path, device=device)
    except CheckpointError as e:
        raise TeacherError(f"cannot load the teacher: {e}") from None
    if isinstance(policy, ConsistencyPolicy):
        raise TeacherError(
            f"the teacher {path} is already consistency-distilled; distil from its diffusion teacher "
            f"({cfg.distill.teacher or 'unknown'})"
        )
    if not isinstance(policy, DiffusionPolicy):
        raise TeacherError(
            f"the teacher {path} holds a {type(policy).__name__}, not a DiffusionPolicy: only diffusion "
            "policies can be distilled"
        )
    if cfg.policy.objective != "ddpm":
        raise TeacherError(
            f"the teacher {path} was trained by flow matching (policy.objective={cfg.policy.objective}); "
            "distillation follows a DDPM teacher's ODE. A flow policy samples in 1-4 Euler steps without it"
        )
    if not cfg.policy.obs_as_global_cond:
        raise TeacherError(
            f"the teacher {path} uses inpainting conditioning (policy.obs_as_global_cond=false); "
            "distillation supports global observation conditioning only"
        )
    return policy.requires_grad_(False).eval(), cfg


# Budget keys that DistillConfig owns for a distillation run (one knob each).
_OWNED = {
    "train.num_steps": "distill.num_steps",
    "train.lr": "distill.lr",
    "train.warmup_steps": "distill.warmup_steps",
}


def distill_config(teacher: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The distillation run's config: the teacher's run config, turned into a consistency policy.

    Only policy.consistency.* and policy.scheduler.num_inference_steps may change the policy (the student
    has the teacher's networks); train.num_steps / lr / warmup_steps come from distill.* .
    """
    overrides = list(overrides or [])
    _, teacher_cfg = load_teacher(teacher)
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in _OWNED:
            raise ConfigError(f"'{key}' is set by '{_OWNED[key]}' in a distillation run; override that")
        if key == "distill.teacher":
            raise ConfigError("the teacher is given by --teacher, not distill.teacher")
        if key == "policy.consistency.ctm":
            raise ConfigError("'policy.consistency.ctm' is set by 'distill.objective' in a distillation run")
        if key.startswith("policy.") and not key.startswith(
            ("policy.consistency.", "policy.scheduler.num_inference_steps")
        ):
            raise ConfigError(
                f"'{key}': the student has the teacher's networks; only policy.consistency.* and "
                "policy.scheduler.num_inference_steps may be overridden"
            )
    base = [
        f"name={teacher_cfg.name}-consistency",
        "policy.type=consistency",
        "policy.scheduler.sampler=consistency",
        "policy.scheduler.prediction_type=v_prediction",  # see distill/consistency.py
        "policy.scheduler.num_inference_steps=1",
        "eval.sampler=null",  # the teacher's evaluation sampler does not apply to the student
        "eval.num_inference_steps=null",
        "eval.timestep_spacing=null",
        f"distill.teacher={Path(teacher).resolve()}",
    ]
    cfg = with_overrides(teacher_cfg, base + overrides)
    cfg.run_dir = ""  # the teacher's run folder is not this run's (--run-dir or a fresh default)
    cfg.train.num_steps, cfg.train.lr = cfg.distill.num_steps, cfg.distill.lr
    cfg.train.warmup_steps = cfg.distill.warmup_steps
    cfg.policy.consistency.ctm = cfg.distill.objective == "ctm"  # a two-time student network
    if not cfg.data.path:  # the teacher trained on <its run folder>/demos.zarr
        demos = Path(teacher).resolve().parent.parent / "demos.zarr"
        if not demos.exists():
            raise ConfigError(
                f"the teacher's config has no data.path and {demos} does not exist: pass data.path=<store>"
            )
        cfg.data.path = str(demos)
    validate(cfg)
    return cfg
