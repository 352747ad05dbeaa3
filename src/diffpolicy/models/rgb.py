"""Camera encoder: backbone -> spatial-softmax keypoints -> linear feature, one per camera and step.

Images arrive normalized to [-1, 1] as (B, T, C, H, W). Each frame is first resized when
`vision.resize_shape` is set (a 640x480 camera and an 84-pixel crop are not at one scale), then cropped:
in training each sample gets one random crop shared by all T frames of its observation window (so motion
between frames is not an artefact of the augmentation), at evaluation the crop is centred. Optional
brightness / contrast jitter is drawn per sample, shared across the window, on the whole batch at once.

Backbones (`vision.backbone`):
- a torchvision ResNet ("resnet18", the published encoder), BatchNorm replaced by GroupNorm because batch
  statistics behave badly with the small, highly correlated batches and the EMA weights diffusion
  training uses;
- "compact": a few 3x3 convolutions with GroupNorm, sized for CPUs. ResNet18 on an 84x84 crop costs
  ~0.65 GFLOP per frame and ends on a 3x3 map; four convolutions with strides 2, 1, 2, 1 cost ~0.08 GFLOP
  and keep a 21x21 map, so the keypoints can localize finely;
- "timm:<name>": any timm model that has `forward_intermediates` (ViTs such as DINOv2 or SigLIP, or
  ConvNets); its last feature map feeds the keypoints.
Pretrained weights are loaded only from a local file, never downloaded; `vision.freeze_backbone` keeps
them fixed, and `vision.cache_features` then has training read each frame's feature map from a cache
computed once (training/feature_cache.py) through `RgbEncoder.feature_map`, the same function the on-line
forward uses; the crop is then centred in training too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from diffpolicy.config import VisionConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_bf16(precision: str, device_type: str) -> bool:
    """Whether the backbone runs under bf16 autocast for `vision.precision` on this device type.

    "auto" picks bf16 only where it is fast: CUDA GPUs that support it, and CPUs whose oneDNN has native
    bf16 kernels (AVX512 or AMX). On an AVX2-only CPU bf16 is emulated and measured 24x slower than fp32
    for the compact CNN (docs/research/so101_grasp.md), so "auto" stays fp32 there."""
    if precision == "auto":
        if device_type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device_type == "cpu" and cpu_has_fast_bf16()
    return precision == "bf16"


def cpu_has_fast_bf16() -> bool:
    """oneDNN's own test for native bf16 kernels on this CPU (AVX512 BW/VL/DQ or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of 16 channels (at least one group), the replacement for BatchNorm here."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class CompactCnn(nn.Module):
    """3x3 convolutions (given channels and strides), each followed by GroupNorm and ReLU."""

    def __init__(self, in_channels: int, channels: list[int], strides: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out, stride in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(in_channels, out, 3, stride=stride, padding=1), group_norm(out), nn.ReLU()]
            in_channels = out
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TimmFeatureMap(nn.Module):
    """A timm model's last intermediate feature map, (B, C, h, w): patch tokens as a grid for ViTs."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(
                f"vision.backbone 'timm:{name}' needs the timm package (pip install timm)"
            ) from e
        kwargs = {"dynamic_img_size": True} if "vit" in name or "dinov2" in name or "siglip" in name else {}
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as e:  # timm raises RuntimeError for an unknown model name
            raise ValueError(f"vision.backbone: timm has no model '{name}' ({e})") from None
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"vision.backbone: timm model '{name}' has no forward_intermediates")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or torch file; a clear error instead of any download."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def make_backbone(cfg: VisionConfig, in_channels: int) -> nn.Module:
    """The feature-map network `cfg.backbone` names, with `cfg.pretrained_weights` loaded if given."""
    name = cfg.backbone
    if name == "compact":
        net: nn.Module = CompactCnn(in_channels, list(cfg.cnn_channels), list(cfg.cnn_strides))
        body = net
    elif name.startswith("timm:"):
        net = TimmFeatureMap(name.removeprefix("timm:"))
        body = net.model
    elif hasattr(torchvision.models, name) and name.startswith("resnet"):
        net = getattr(torchvision.models, name)(weights=None)
        body = net
    else:
        raise ValueError(
            f"unknown vision.backbone '{name}' (a torchvision resnet, 'compact', or 'timm:<model name>')"
        )
    if cfg.pretrained_weights:
        state = load_state_dict_file(cfg.pretrained_weights)
        # a classifier head the backbone does not use may be in the file (timm models here have none)
        expected = body.state_dict()
        missing = [k for k in expected if k not in state and not k.startswith(("fc.", "head."))]
        wrong = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or wrong:
            raise ValueError(
                f"pretrained weights {cfg.pretrained_weights} do not fit vision.backbone '{name}': "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, shape mismatches {wrong[:5]}"
            )
        body.load_state_dict(state, strict=False)
    if name.startswith("resnet"):
        if cfg.use_group_norm:
            net = _replace_batch_norm(net)
        net = nn.Sequential(*list(net.children())[:-2])  # drop global pooling and the classifier
    return net


def _replace_batch_norm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm(child.num_features))
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
    top = torch.randint(0, H - h + 1, (B,)).tolist()
    left = torch.randint(0, W - w + 1, (B,)).tolist()
    # One slice per sample: views, copied once by stack (a 5-index gather costs several times more).
    return torch.stack(
        [images[b, :, :, y : y + h, x : x + w] for b, (y, x) in enumerate(zip(top, left, strict=True))]
    )


def jitter_windows(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness and contrast jitter of [-1, 1] images (B, T, C, H, W), factors per sample, shared over T.

    Written here because torchvision's ColorJitter draws one factor for a whole batch tensor.
    """
    B = images.shape[0]
    shape = (B, 1, 1, 1, 1)
    brightness = torch.empty(shape, device=images.device).uniform_(1 - strength, 1 + strength)
    contrast = torch.empty(shape, device=images.device).uniform_(1 - strength, 1 + strength)
    x = (images + 1) * 0.5 * brightness  # in [0, 1] units
    mean = x.mean(dim=(2, 3, 4), keepdim=True)  # per frame grey level, as ColorJitter's contrast
    x = (x - mean) * contrast + mean
    return x.clamp(0, 1) * 2 - 1


class RgbEncoder(nn.Module):
    """{camera key: (B, T, C, H, W)} -> (B, T, n_cameras * feature_dim)."""

    # True while camera windows arrive already resized, cropped and augmented (`preprocess` is skipped):
    # distillation hands every network of a step one view per sample (distill/common.py, one_view).
    given_view = False

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: VisionConfig) -> None:
        super().__init__()
        self.keys = sorted(shapes)
        self.cfg = cfg
        self.resize = tuple(cfg.resize_shape) if cfg.resize_shape else None
        self.crop = {}
        for key in self.keys:
            C, H, W = shapes[key]
            H, W = self.resize or (H, W)
            crop = tuple(cfg.crop_shape) if cfg.crop_shape else (H, W)
            if crop[0] > H or crop[1] > W:
                where = "resized to vision.resize_shape" if self.resize else "images"
                raise ValueError(f"vision.crop_shape {crop} is larger than camera '{key}' {where} {(H, W)}")
            self.crop[key] = crop
        names = ["shared"] if cfg.share_backbone else self.keys
        if cfg.share_backbone and len({(shapes[k][0], *self.crop[k]) for k in self.keys}) > 1:
            raise ValueError(
                "vision.share_backbone needs all cameras to have the same channels and crop size"
            )
        self.backbones = nn.ModuleDict(
            {n: make_backbone(cfg, shapes[self.keys[0] if n == "shared" else n][0]) for n in names}
        )
        if cfg.freeze_backbone:
            self.backbones.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleDict()
        self.feature_shapes: dict[str, tuple[int, int, int]] = {}  # (C', h, w) of each camera's maps
        for key in self.keys:
            backbone = self.backbones["shared" if cfg.share_backbone else key]
            with torch.no_grad():
                probe = backbone(torch.zeros(1, shapes[key][0], *self.crop[key]))
            _, channels, fh, fw = probe.shape
            self.feature_shapes[key] = (channels, fh, fw)
            self.heads[key] = nn.Sequential(
                SpatialSoftmax(channels, fh, fw, cfg.num_keypoints),
                nn.Linear(cfg.num_keypoints * 2, cfg.feature_dim),
                nn.ReLU(),
            )
        self.output_dim = len(self.keys) * cfg.feature_dim

    def train(self, mode: bool = True) -> RgbEncoder:
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbones.eval()  # a frozen backbone keeps any normalization statistics it came with
        return self

    def preprocess(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """Resize, crop and (in training) jitter one camera's window (B, T, C, H, W), values in [-1, 1].

        With `vision.cache_features` the crop is centred in training too: the cached feature maps are of
        the one deterministic view (validate() refuses colour jitter with the cache)."""
        if self.given_view:
            return x
        if self.resize and tuple(x.shape[-2:]) != self.resize:
            B, T = x.shape[:2]
            x = F.interpolate(x.flatten(0, 1), size=self.resize, mode="bilinear", antialias=True)
            x = x.view(B, T, *x.shape[1:])
        x = crop_windows(x, self.crop[key], random=self.training and not self.cfg.cache_features)
        if self.training and self.cfg.color_jitter > 0:
            x = jitter_windows(x, self.cfg.color_jitter)
        return x

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype `vision.cache_features` stores feature maps in: bf16 under bf16 precision, else fp16
        (half the bytes of fp32; a ViT-S map of 6x9 patches is 41 KB per frame in 16 bits)."""
        return torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16

    def feature_map(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """One camera's window (B, T, C, H, W) in [-1, 1] -> the backbone's feature maps (B, T, C', h, w):
        preprocess, ImageNet normalization, the backbone at `vision.precision`; with
        `vision.cache_features` rounded to `cache_dtype`, on-line as in the cache, so that a policy
        trained on cached maps sees the same numbers at inference.

        The one path from pixels to the keypoint heads' input: `forward` calls it on-line, and the
        feature cache (training/feature_cache.py) calls it once per stored frame."""
        x = self.preprocess(x, key)
        B, T = x.shape[:2]
        x = x.flatten(0, 1)
        if self.cfg.imagenet_norm:
            x = ((x + 1) * 0.5 - self.mean) / self.std
        backbone = self.backbones["shared" if self.cfg.share_backbone else key]
        bf16 = backbone_bf16(self.cfg.precision, x.device.type)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            fmap = backbone(x)
        if self.cfg.cache_features:
            fmap = fmap.to(self.cache_dtype)
        return fmap.reshape(B, T, *fmap.shape[1:])

    def forward(
        self, images: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Per camera: `features[key]` (cached feature maps, (B, T, C', h, w)) when given, else the
        backbone on `images[key]`; then the keypoint head."""
        feats = []
        for key in self.keys:
            fmap = features[key] if features and key in features else self.feature_map(images[key], key)
            B, T = fmap.shape[:2]
            f = self.heads[key](fmap.flatten(0, 1).float())
            feats.append(f.view(B, T, -1))
        return torch.cat(feats, dim=-1)
