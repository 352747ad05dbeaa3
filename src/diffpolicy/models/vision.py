"""Observation encoder: turns a window of (normalized) observations into one feature vector per step.

Low-dim keys are concatenated as they are. Camera keys go through a ResNet with spatial-softmax
keypoints (see `RgbEncoder`); the per-step features of all keys are concatenated in a fixed (sorted)
key order so a checkpoint always sees the same layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffpolicy.config import VisionConfig


class ObsEncoder(nn.Module):
    """obs dict {key: (B, T, *shape)} -> features (B, T, output_dim)."""

    def __init__(self, obs_meta: dict[str, Any], vision: VisionConfig) -> None:
        super().__init__()
        self.low_dim_keys = sorted(k for k, m in obs_meta.items() if m.get("type", "low_dim") == "low_dim")
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m.get("type") == "rgb")
        unknown = [k for k, m in obs_meta.items() if m.get("type", "low_dim") not in ("low_dim", "rgb")]
        if unknown:
            raise ValueError(f"observation keys {unknown} have an unknown type (expected low_dim or rgb)")
        self.shapes = {k: tuple(int(s) for s in m["shape"]) for k, m in obs_meta.items()}
        for k in self.low_dim_keys:  # low-dim inputs arrive flattened (see BasePolicy.encode_obs)
            self.shapes[k] = (math.prod(self.shapes[k]),)
        self.rgb = None
        rgb_dim = 0
        if self.rgb_keys:
            from diffpolicy.models.rgb import RgbEncoder  # torchvision is needed only for camera inputs

            self.rgb = RgbEncoder({k: self.shapes[k] for k in self.rgb_keys}, vision)
            rgb_dim = self.rgb.output_dim
        self.output_dim = sum(self.shapes[k][0] for k in self.low_dim_keys) + rgb_dim
        if self.output_dim == 0:
            raise ValueError("the observation spec has no keys: nothing to condition the policy on")

    def forward(
        self, obs: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`features`: cached backbone feature maps (B, T, C', h, w) of some camera keys (policy.vision.
        cache_features), which then need no frames in `obs`."""
        features = features or {}
        lead: tuple[int, ...] | None = None
        for key in self.low_dim_keys + self.rgb_keys:
            if key in features:
                x, want = features[key], self.rgb.feature_shapes[key]
                what = f"cached features of '{key}'"
            elif key not in obs:
                raise KeyError(f"observation key '{key}' is missing (got {sorted(obs)})")
            else:
                x, want, what = obs[key], self.shapes[key], f"observation '{key}'"
                if key in self.rgb_keys and self.rgb.given_view:  # already resized and cropped (one_view)
                    want = (want[0], *self.rgb.crop[key])
            if x.dim() != 2 + len(want) or tuple(x.shape[2:]) != want:
                raise ValueError(
                    f"{what} must have shape (B, T, {', '.join(map(str, want))}), got {tuple(x.shape)}"
                )
            if lead is None:
                lead = tuple(x.shape[:2])
            elif tuple(x.shape[:2]) != lead:
                raise ValueError(f"{what} has batch/time {tuple(x.shape[:2])}, others {lead}")
        feats = [obs[k] for k in self.low_dim_keys]
        if self.rgb is not None:
            feats.append(self.rgb({k: obs[k] for k in self.rgb_keys if k not in features}, features))
        return torch.cat(feats, dim=-1)
