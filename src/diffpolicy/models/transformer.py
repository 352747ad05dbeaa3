"""Time-series diffusion transformer (Chi et al., Diffusion Policy, transformer variant; minGPT style).

Noisy action tokens are the decoder input; the condition (one diffusion-step token followed by one
token per observation step) is encoded and read through cross-attention. With `causal_attn`, action
token t attends only to action tokens <= t and to the step token plus observation steps <= t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffpolicy.models.embeddings import SinusoidalPosEmb, expand_timesteps


class TransformerForDiffusion(nn.Module):
    """Encoder-decoder transformer mapping (B, horizon, input_dim) to (B, horizon, output_dim).

    `cond_dim=0` (or `n_obs_steps=0`) leaves only the diffusion-step token as condition, which is
    what inpainting-style conditioning needs.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int = 0,
        cond_dim: int = 0,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        if n_emb % n_head != 0:
            raise ValueError(f"n_emb={n_emb} must be divisible by n_head={n_head}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.horizon = horizon
        self.cond_dim = cond_dim
        # Observation tokens exist only when there is something to embed.
        self.n_obs_steps = n_obs_steps if cond_dim > 0 else 0
        self.causal_attn = causal_attn
        n_cond_tokens = 1 + self.n_obs_steps

        # Action tokens.
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)

        # Condition tokens: diffusion step, then observations.
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if cond_dim > 0 else None
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond_tokens, n_emb))

        layer_kwargs = dict(
            d_model=n_emb,
            nhead=n_head,
            dim_feedforward=4 * n_emb,
            dropout=p_drop_attn,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        if n_cond_layers > 0:
            encoder_layer = nn.TransformerEncoderLayer(**layer_kwargs)
            self.encoder: nn.Module = nn.TransformerEncoder(
                encoder_layer, num_layers=n_cond_layers, enable_nested_tensor=False
            )
        else:
            self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))

        decoder_layer = nn.TransformerDecoderLayer(**layer_kwargs)
        self.decoder = nn.TransformerDecoder(decoder_layer, num_layers=n_layer)

        if causal_attn:
            # Float masks: 0 where attention is allowed, -inf where it is not.
            t = torch.arange(horizon)[:, None]
            s_self = torch.arange(horizon)[None, :]
            s_cond = torch.arange(n_cond_tokens)[None, :]
            # Cond token 0 is the step token; token s >= 1 is observation step s-1, seen from t >= s-1.
            self.register_buffer("tgt_mask", _float_mask(s_self <= t), persistent=False)
            self.register_buffer("memory_mask", _float_mask(s_cond <= t + 1), persistent=False)
        else:
            self.register_buffer("tgt_mask", None, persistent=False)
            self.register_buffer("memory_mask", None, persistent=False)

        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)

        self.apply(_init_weights)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        nn.init.normal_(self.cond_pos_emb, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def get_optim_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: decay weight matrices; never decay biases, norms or position embeddings."""
        decay, no_decay = set(), set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                is_exempt = (
                    param_name.endswith("bias")
                    or isinstance(module, (nn.LayerNorm, nn.Embedding))
                    or param_name in ("pos_emb", "cond_pos_emb")
                )
                is_matrix = (isinstance(module, nn.Linear) and param_name == "weight") or (
                    isinstance(module, nn.MultiheadAttention) and param_name == "in_proj_weight"
                )
                if is_exempt:
                    no_decay.add(full_name)
                elif is_matrix:
                    decay.add(full_name)

        params = dict(self.named_parameters())
        both = decay & no_decay
        missing = params.keys() - (decay | no_decay)
        assert not both, f"parameters in both optimizer groups: {sorted(both)}"
        assert not missing, f"parameters in no optimizer group: {sorted(missing)}"
        return [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]

    def forward(self, sample: Tensor, timestep: Tensor | int | float, cond: Tensor | None = None) -> Tensor:
        """Predict (B, horizon, output_dim) from sample (B, horizon, input_dim), a scalar or (B,) timestep
        and cond (B, n_obs_steps, cond_dim), which must be None when cond_dim == 0."""
        self._check_inputs(sample, cond)
        batch_size = sample.shape[0]
        t = expand_timesteps(timestep, batch_size, sample.device)

        cond_tokens = self.time_emb(t).to(sample.dtype)[:, None, :]  # (B, 1, n_emb)
        if self.cond_obs_emb is not None:
            cond_tokens = torch.cat([cond_tokens, self.cond_obs_emb(cond)], dim=1)
        memory = self.encoder(self.drop(cond_tokens + self.cond_pos_emb))

        x = self.drop(self.input_emb(sample) + self.pos_emb)
        x = self.decoder(x, memory, tgt_mask=self.tgt_mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))

    def _check_inputs(self, sample: Tensor, cond: Tensor | None) -> None:
        if sample.ndim != 3 or tuple(sample.shape[1:]) != (self.horizon, self.input_dim):
            raise ValueError(
                f"sample must have shape (B, horizon={self.horizon}, input_dim={self.input_dim}), "
                f"got {tuple(sample.shape)}"
            )
        if self.cond_obs_emb is None:
            if cond is not None:
                raise ValueError(
                    f"cond given with shape {tuple(cond.shape)} but the net was built with cond_dim=0"
                )
            return
        expected_cond = (sample.shape[0], self.n_obs_steps, self.cond_dim)
        if cond is None:
            raise ValueError(f"cond of shape {expected_cond} (B, n_obs_steps, cond_dim) required, got None")
        if tuple(cond.shape) != expected_cond:
            raise ValueError(
                f"cond must have shape {expected_cond} (B, n_obs_steps, cond_dim), got {tuple(cond.shape)}"
            )


def _float_mask(allowed: Tensor) -> Tensor:
    """Boolean 'may attend' matrix -> additive float mask (0 allowed, -inf blocked)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _init_weights(module: nn.Module) -> None:
    """GPT-style init: normal(0, 0.02) weights, zero biases, identity LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.MultiheadAttention):
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            weight = getattr(module, name)
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=0.02)
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            bias = getattr(module, name)
            if bias is not None:
                nn.init.zeros_(bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
