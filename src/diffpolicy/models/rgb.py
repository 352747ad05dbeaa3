"""Camera encoder: torchvision ResNet (GroupNorm) -> spatial-softmax keypoints -> linear feature.

Images arrive normalized to [-1, 1] as (B, T, C, H, W). In training each sample gets one random crop
shared by all T frames of its observation window (so motion between frames is not an artefact of the
augmentation); at evaluation the crop is centred. BatchNorm is replaced by GroupNorm because batch
statistics behave badly with the small, highly correlated batches and the EMA weights diffusion
training uses. Pretrained weights are loaded only from a local file, never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from diffpolicy.config import VisionConfig


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, H, W) -> expected image coordinates of K learned keypoints, (B, K * 2).

    Written here because torchvision has no such layer; it is the keypoint bottleneck of Levine et al.
    that Diffusion Policy's vision encoder uses.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int) -> None:
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.keypoints(features).flatten(2)  # (B, K, H*W)
        attention = logits.softmax(dim=-1)
        return (attention @ self.grid.to(attention.dtype)).flatten(1)  # (B, K * 2)


def _group_norm_resnet(name: str, weights_path: str | None, use_group_norm: bool) -> nn.Module:
    if not hasattr(torchvision.models, name):
        raise ValueError(f"unknown torchvision backbone '{name}'")
    net = getattr(torchvision.models, name)(weights=None)
    if weights_path:
        path = Path(weights_path)
        if not path.exists():
            raise FileNotFoundError(f"pretrained weights {path} not found (weights are never downloaded)")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if use_group_norm:
        net = _replace_batch_norm(net)
    return nn.Sequential(*list(net.children())[:-2])  # drop global pooling and the classifier


def _replace_batch_norm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(max(1, child.num_features // 16), child.num_features))
        else:
            _replace_batch_norm(child)
    return module


def crop_windows(images: torch.Tensor, size: tuple[int, int], random: bool) -> torch.Tensor:
    """Crop (B, T, C, H, W) to (B, T, C, h, w); random offsets are per sample, shared across T."""
    B, T, C, H, W = images.shape
    h, w = size
    if (h, w) == (H, W):
        return images
    if h > H or w > W:
        raise ValueError(f"crop {size} is larger than the image {(H, W)}")
    if not random:
        top, left = (H - h) // 2, (W - w) // 2
        return images[..., top : top + h, left : left + w]
    top = torch.randint(0, H - h + 1, (B,), device=images.device)
    left = torch.randint(0, W - w + 1, (B,), device=images.device)
    rows = (top[:, None] + torch.arange(h, device=images.device))[:, None, None, :, None]  # (B,1,1,h,1)
    cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, None, None, :]  # (B,1,1,1,w)
    b = torch.arange(B, device=images.device)[:, None, None, None, None]
    t = torch.arange(T, device=images.device)[None, :, None, None, None]
    c = torch.arange(C, device=images.device)[None, None, :, None, None]
    return images[b, t, c, rows, cols]


class RgbEncoder(nn.Module):
    """{camera key: (B, T, C, H, W)} -> (B, T, n_cameras * feature_dim)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: VisionConfig) -> None:
        super().__init__()
        self.keys = sorted(shapes)
        self.cfg = cfg
        self.crop = {}
        for key in self.keys:
            C, H, W = shapes[key]
            crop = tuple(cfg.crop_shape) if cfg.crop_shape else (H, W)
            if crop[0] > H or crop[1] > W:
                raise ValueError(f"vision.crop_shape {crop} is larger than camera '{key}' images {(H, W)}")
            self.crop[key] = crop
        names = ["shared"] if cfg.share_backbone else self.keys
        if cfg.share_backbone and len({self.crop[k] for k in self.keys}) > 1:
            raise ValueError("vision.share_backbone needs all cameras to have the same (cropped) size")
        self.backbones = nn.ModuleDict(
            {n: _group_norm_resnet(cfg.backbone, cfg.pretrained_weights, cfg.use_group_norm) for n in names}
        )
        self.heads = nn.ModuleDict()
        for key in self.keys:
            backbone = self.backbones["shared" if cfg.share_backbone else key]
            with torch.no_grad():
                C = shapes[key][0]
                probe = backbone(torch.zeros(1, C, *self.crop[key]))
            _, channels, fh, fw = probe.shape
            self.heads[key] = nn.Sequential(
                SpatialSoftmax(channels, fh, fw, cfg.num_keypoints),
                nn.Linear(cfg.num_keypoints * 2, cfg.feature_dim),
                nn.ReLU(),
            )
        self.output_dim = len(self.keys) * cfg.feature_dim

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        for key in self.keys:
            x = crop_windows(images[key], self.crop[key], random=self.training)
            B, T = x.shape[:2]
            backbone = self.backbones["shared" if self.cfg.share_backbone else key]
            f = self.heads[key](backbone(x.flatten(0, 1)))
            feats.append(f.view(B, T, -1))
        return torch.cat(feats, dim=-1)
