"""Diffusion-step embeddings shared by the noise-prediction networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPosEmb(nn.Module):
    """Map scalar timesteps (B,) to (B, dim) sin/cos features at log-spaced frequencies.

    The first half of the output holds sines, the second half cosines; frequencies go from 1 down
    to 1/10000 so both coarse and fine differences between diffusion steps are visible to the net.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 2 or dim % 2 != 0:
            raise ValueError(f"SinusoidalPosEmb dim must be an even number >= 2, got {dim}")
        self.dim = dim

    def forward(self, timesteps: Tensor) -> Tensor:
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
        half = self.dim // 2
        exponent = -math.log(10000.0) / max(half - 1, 1)
        freqs = torch.exp(torch.arange(half, device=timesteps.device, dtype=torch.float32) * exponent)
        args = timesteps.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def expand_timesteps(timestep: Tensor | int | float, batch_size: int, device: torch.device) -> Tensor:
    """Turn a python number, a 0-d / (1,) tensor or a (B,) tensor into a (B,) tensor on `device`.

    Samplers usually pass one shared step for the whole batch while training passes one per sample;
    both networks accept either through this function.
    """
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    t = t.to(device)
    if t.ndim == 0 or t.shape == (1,):
        return t.reshape(1).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(
            f"timestep must be a scalar, a 0-d tensor or a ({batch_size},) tensor, got shape {tuple(t.shape)}"
        )
    return t
