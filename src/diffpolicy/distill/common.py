"""What the distillation objectives share: the teacher's deterministic DDIM solve, the consistency
distance d between a student's output and its target, and the one view of each camera that every network
of a training step sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffpolicy.config import DistillConfig
from diffpolicy.models.rgb import RgbEncoder
from diffpolicy.policy import DiffusionPolicy


@contextlib.contextmanager
def one_view(
    student: DiffusionPolicy, others: tuple[nn.Module, ...], obs: dict[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """`obs` with each camera window resized, cropped and augmented once per sample, as the training
    student's encoder does (a random crop shared over the window's frames, colour jitter), for the student
    and the `others` (teacher, target network, DMD's fake network) alike: their encoders take this view
    as it is while the context lasts. Without it the student saw a random crop, the teacher and the target
    a centre crop and the fake network a crop of its own, so each target was computed on another view.
    Observations without a camera, or a student not in training mode, pass through unchanged."""
    own = next((m for m in student.modules() if isinstance(m, RgbEncoder)), None)
    if own is None or not own.training:
        yield obs
        return
    with torch.no_grad():  # in the policy's normalized units, as its encoder sees them, then back
        view = dict(obs)
        for key in own.keys:
            x = student.normalizer.normalize(key, obs[key])
            view[key] = student.normalizer.unnormalize(key, own.preprocess(x, key))
    encoders = [m for net in (student, *others) for m in net.modules() if isinstance(m, RgbEncoder)]
    for encoder in encoders:
        encoder.given_view = True
    try:
        yield view
    finally:
        for encoder in encoders:
            encoder.given_view = False


def ddim_step(
    teacher: DiffusionPolicy, sample: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step of the teacher from x_t to x_s, per-sample timesteps (B,); s < 0 is the
    clean end (abar = 1).

    Equal to diffusers' DDIMScheduler.step(eta=0, set_alpha_to_one=True) (clipped x0, unclipped epsilon),
    which steps one scalar timestep per call; the diffusers LCM distillation script writes its DDIM
    solver out the same way.
    """
    out = teacher.call_net(sample, t, cond)
    x0 = teacher.predict_x0(out, sample, t)
    # diffusers clips x0 but keeps the noise estimate of the unclipped one
    eps = out if teacher.cfg.scheduler.prediction_type == "epsilon" else teacher.implied_noise(sample, x0, t)
    sched = teacher.noise_scheduler.config
    if sched.clip_sample:
        x0 = x0.clamp(-sched.clip_sample_range, sched.clip_sample_range)
    return teacher.ddim_jump(sample, x0, t, s, eps)


def teacher_solve(
    teacher: DiffusionPolicy,
    sample: torch.Tensor,
    t: torch.Tensor,
    steps: torch.Tensor,
    skip: int,
    cond: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps[b]` DDIM steps of size `skip` from x_t for each sample b: (x_u, u), u = t - steps * skip
    (u = -1: the clean end). Each call of the teacher runs only the samples that still have steps left.
    """
    if ((steps < 1) | (t - (steps - 1) * skip < 0)).any():
        raise ValueError(
            f"solver steps {steps.tolist()} from t = {t.tolist()} in steps of {skip}: each must be >= 1 and "
            "start at t >= 0 (a step below 0 ends at the clean end)"
        )
    x, now = sample.clone(), t.clone()
    for j in range(int(steps.max())):
        rows = (steps > j).nonzero().squeeze(1)
        x[rows] = ddim_step(teacher, x[rows], now[rows], now[rows] - skip, cond[rows])
        now[rows] -= skip
    return x, now.clamp(min=-1)


def masked_pseudo_huber(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, c: float
) -> torch.Tensor:
    """sqrt(d^2 + c^2) - c per entry where mask is True, averaged over all entries (as masked_mse)."""
    err = torch.sqrt(F.mse_loss(pred, target, reduction="none") + c * c) - c
    return (err * mask).mean()


def consistency_distance(
    student: DiffusionPolicy, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """d(pred, target): pseudo-Huber (distill.loss=huber, c = distill.huber_c) or squared error, masked."""
    if cfg.loss == "huber":
        return masked_pseudo_huber(pred, target, mask, cfg.huber_c)
    return student.masked_mse(pred, target, mask)
