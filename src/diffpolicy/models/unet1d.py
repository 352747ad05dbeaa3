"""1-D temporal U-Net noise network with FiLM conditioning (Chi et al., Diffusion Policy, CNN variant).

The network denoises an action sequence (B, T, D). Convolutions run over time, channels-first
internally. The diffusion step embedding, optionally concatenated with a global observation feature,
modulates every residual block through FiLM (per-channel scale and bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffpolicy.models.embeddings import SinusoidalPosEmb, expand_timesteps
from diffpolicy.models.gemm_conv import GemmConv1d, GemmConvTranspose1d


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length-preserving ("same" padding, odd kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            GemmConv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM after the first; 1x1 conv on the skip path when channels change.

    c_in / c_out channels, cond_dim the condition's width, kernel / groups the convolutions' kernel size
    and GroupNorm groups, film_scale: FiLM predicts a per-channel scale as well as a bias.
    """

    def __init__(
        self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int, film_scale: bool
    ) -> None:
        super().__init__()
        self.out_channels = c_out
        self.cond_predict_scale = film_scale
        self.block1 = Conv1dBlock(c_in, c_out, kernel, groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, groups)
        film_dim = 2 * c_out if film_scale else c_out
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_dim))
        self.residual_conv = GemmConv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, C_in, T), cond: (B, cond_dim) -> (B, C_out, T)."""
        h = self.block1(x)
        film = self.cond_encoder(cond).unsqueeze(-1)  # (B, film_dim, 1), broadcast over time
        if self.cond_predict_scale:
            scale, bias = film.chunk(2, dim=1)
            h = scale * h + bias
        else:
            h = h + film
        h = self.block2(h)
        return h + self.residual_conv(x)


class Resample1d(nn.Module):
    """Halve the time length with a strided convolution, or double it (`up`) with a transposed one."""

    def __init__(self, channels: int, up: bool = False) -> None:
        super().__init__()
        if up:
            self.conv = GemmConvTranspose1d(channels, channels, kernel_size=4, stride=2, padding=1)
        else:
            self.conv = GemmConv1d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ConditionalUnet1D(nn.Module):
    """Temporal U-Net over (B, T, input_dim) sequences, conditioned on diffusion step + global feature.

    Down path: per level two residual blocks then a stride-2 downsample (none at the deepest level).
    Mid: two residual blocks at the deepest width. Up path: per remaining level, concatenate the
    matching skip, two residual blocks, then upsample, so T must be divisible by 2**(len(down_dims)-1).
    The output has the input's shape: it can be read as predicted noise or as a predicted sample.

    With `stop_time_embed` the net takes a second time, the stop time s of a consistency trajectory
    model's jump from t to s (CTM, Kim et al. 2024; `diffpolicy distill distill.objective=ctm`). Its
    embedding (same form as the diffusion step's) is added to the step embedding; the encoder's last
    layer starts at zero, so a student built from a teacher's weights starts as the teacher for every s.
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        stop_time_embed: bool = False,
    ) -> None:
        super().__init__()
        down_dims = tuple(down_dims)
        if len(down_dims) == 0:
            raise ValueError("down_dims must name at least one level, got ()")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to preserve the time length, got {kernel_size}")
        bad = [d for d in down_dims if d % n_groups != 0]
        if bad:
            raise ValueError(f"every entry of down_dims must be divisible by n_groups={n_groups}, got {bad}")
        self.input_dim = input_dim
        self.global_cond_dim = global_cond_dim or 0
        self.down_dims = down_dims

        dsed = diffusion_step_embed_dim

        def step_encoder() -> nn.Sequential:
            return nn.Sequential(
                SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
            )

        self.diffusion_step_encoder = step_encoder()
        self.stop_step_encoder = step_encoder() if stop_time_embed else None
        if self.stop_step_encoder is not None:
            nn.init.zeros_(self.stop_step_encoder[-1].weight)
            nn.init.zeros_(self.stop_step_encoder[-1].bias)
        cond_dim = dsed + self.global_cond_dim

        def res_block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                c_in, c_out, cond_dim, kernel_size, n_groups, cond_predict_scale
            )

        widths = (input_dim, *down_dims)
        levels = list(zip(widths[:-1], widths[1:], strict=True))  # (c_in, c_out) per resolution level

        self.down_modules = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            is_deepest = i == len(levels) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        res_block(c_in, c_out),
                        res_block(c_out, c_out),
                        nn.Identity() if is_deepest else Resample1d(c_out),
                    ]
                )
            )

        mid_dim = down_dims[-1]
        self.mid_modules = nn.ModuleList([res_block(mid_dim, mid_dim), res_block(mid_dim, mid_dim)])

        # Mirror every level that was downsampled: input = current width + skip width (same c_out).
        self.up_modules = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up_modules.append(
                nn.ModuleList([res_block(2 * c_out, c_in), res_block(c_in, c_in), Resample1d(c_in, up=True)])
            )

        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            GemmConv1d(down_dims[0], input_dim, 1),
        )

    def num_params(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | int | float,
        global_cond: Tensor | None = None,
        stop_timestep: Tensor | int | float | None = None,
    ) -> Tensor:
        """Predict (B, T, input_dim) from sample (B, T, input_dim), a scalar or (B,) timestep and
        global_cond (B, global_cond_dim), which must be None when the net has no global condition.
        stop_timestep (scalar or (B,)) is required by, and only accepted by, a net with stop_time_embed."""
        self._check_inputs(sample, global_cond)
        batch_size = sample.shape[0]
        t = expand_timesteps(timestep, batch_size, sample.device)
        cond = self.diffusion_step_encoder(t)
        if (stop_timestep is None) != (self.stop_step_encoder is None):
            raise ValueError(
                "stop_timestep is required by a net built with stop_time_embed=True and accepted by no other"
            )
        if self.stop_step_encoder is not None:
            cond = cond + self.stop_step_encoder(expand_timesteps(stop_timestep, batch_size, sample.device))
        cond = cond.to(sample.dtype)
        if global_cond is not None:
            cond = torch.cat([cond, global_cond], dim=-1)

        x = sample.transpose(1, 2)  # (B, D, T): convolve over time
        skips = []
        for res1, res2, downsample in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid_modules:
            x = res(x, cond)
        # The deepest skip sits at the mid resolution; the shallowest is never re-used (as published).
        for res1, res2, upsample in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, cond), cond))
        x = self.final_conv(x)
        return x.transpose(1, 2)

    def _check_inputs(self, sample: Tensor, global_cond: Tensor | None) -> None:
        if sample.ndim != 3 or sample.shape[-1] != self.input_dim:
            raise ValueError(f"sample must have shape (B, T, {self.input_dim}), got {tuple(sample.shape)}")
        factor = 2 ** (len(self.down_dims) - 1)
        horizon = sample.shape[1]
        if horizon % factor != 0:
            raise ValueError(
                f"horizon T={horizon} must be divisible by {factor} = 2**(len(down_dims)-1) "
                f"for down_dims={self.down_dims}"
            )
        if self.global_cond_dim == 0:
            if global_cond is not None:
                raise ValueError(
                    f"global_cond given with shape {tuple(global_cond.shape)} but the net was built "
                    "with global_cond_dim=None"
                )
            return
        expected = (sample.shape[0], self.global_cond_dim)
        if global_cond is None:
            raise ValueError(f"global_cond of shape {expected} is required (global_cond_dim set), got None")
        if tuple(global_cond.shape) != expected:
            raise ValueError(f"global_cond must have shape {expected}, got {tuple(global_cond.shape)}")
