"""Exponential moving average of model weights with the warmup schedule used by Diffusion Policy.

decay(step) = 1 - (1 + step / inv_gamma) ** -power, clamped to [min_value, max_value]. Early in training
the average follows the model closely; later it smooths over roughly 1 / (1 - decay) steps. Evaluation
and checkpoints for inference use the averaged weights. (torch.optim.swa_utils.AveragedModel has no
warmup schedule and diffusers' EMAModel expects its own save format, so this small class is ours.)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffpolicy.config import EmaConfig


def ema_decay(step: int, cfg: EmaConfig) -> float:
    """The decay applied at optimizer step `step` (0 before `update_after_step`)."""
    step = step - cfg.update_after_step - 1
    if step <= 0:
        return 0.0
    value = 1.0 - (1.0 + step / cfg.inv_gamma) ** -cfg.power
    return float(min(max(value, cfg.min_value), cfg.max_value))


class EMA:
    """Holds an averaged copy of `model`; call `update(model, step)` after every optimizer step."""

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self.decay = ema_decay(step, self.cfg)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp: ema += (1 - decay) * (param - ema); one fused foreach call for all tensors.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        # Buffers (normalizer statistics, norm running stats) are copied, not averaged.
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
