"""Camera backbones for the SO-101 image policy: the compact CNN trained end to end against frozen ViTs whose
feature maps are cached once per frame (policy.vision.cache_features), issue 39 deliverable 5.

    nice -n 19 env OMP_NUM_THREADS=1 python bench/vision_backbones.py [--frames 8] [--steps 2]

Per backbone: input size (after the preset's resize / centre crop), parameters, milliseconds per frame of
the backbone alone (a batch of --frames frames, one thread), the peak rise of the process's resident
memory during the first batch (the working set; later batches reuse it), the bytes per frame of its
feature map (the cache stores 16-bit maps), training samples/s (--batch windows of 2 steps x 2 cameras
+ 6 joints; the compact CNN trains end to end on frames, the ViTs train their keypoint heads and the
U-Net on cached maps; data loading not included), and what caching the SO-101 dataset costs (82k frames
x 2 cameras: minutes at this speed on one thread, and gigabytes; data.frame_stride keeps every phase, so
every frame is cached whatever the stride).

Times are CPU seconds of this process (time.process_time, one thread), not wall time, so that a machine
shared with other jobs inflates them less; they still share caches and memory bandwidth. The ViTs have
RANDOM weights (timm, pretrained=False): nothing is downloaded, and speed and memory do not depend on
the weights. Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace

import torch

from diffpolicy.config import load_config
from diffpolicy.data.normalize import Normalizer
from diffpolicy.data.sequence import features_key
from diffpolicy.policy import make_policy, normalizer_spec
from diffpolicy.training.feature_cache import cache_bytes

SO101_FRAMES = 82_000  # the SO-101 image dataset of the notes' mix (200 episodes, 30 fps), per camera
CAMERAS = ("side", "top")
SHAPE_META = {
    "obs": {
        **{k: {"shape": [3, 96, 128], "type": "rgb"} for k in CAMERAS},
        "state": {"shape": [6], "type": "low_dim"},
    },
    "action": {"shape": [6]},
}

# name, preset, overrides of its policy.vision
ROWS = [
    ("compact CNN (end to end)", "so101_grasp_image_unet_cpu", {}),
    ("compact CNN (end to end), fp32", "so101_grasp_image_unet_cpu", {"precision": "fp32"}),
    ("DINOv2 ViT-S/14, 84x126 crop", "so101_grasp_image_dinov2_cpu", {}),
    ("DINOv2 ViT-S/14, 84x126, bf16", "so101_grasp_image_dinov2_cpu", {"precision": "bf16"}),
    (
        "DINOv2 ViT-S/14, resized 168x224",
        "so101_grasp_image_dinov2_cpu",
        {"resize_shape": [168, 224], "crop_shape": [168, 224]},
    ),
    (
        "SigLIP ViT-B/16, 96x128",
        "so101_grasp_image_dinov2_cpu",
        {"backbone": "timm:vit_base_patch16_siglip_224", "crop_shape": [96, 128]},
    ),
]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The peak rise of resident memory while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def build(preset: str, vision: dict):
    cfg = load_config(preset)
    cfg.policy = replace(cfg.policy, vision=replace(cfg.policy.vision, **vision))
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, SHAPE_META)
    spec = normalizer_spec(SHAPE_META, cfg.policy.normalization)
    data = {"state": torch.randn(256, 6), "action": torch.randn(256, 6)}
    policy.normalizer.load_state_dict(Normalizer.fit(data, {k: m for k, (m, _) in spec.items()}).state_dict())
    return policy, cfg


def backbone_ms(policy, frames: int, repeats: int) -> tuple[float, float]:
    """CPU ms per frame of one camera's backbone path (resize, crop, normalize, backbone) on a batch of
    `frames` frames, and the peak memory rise during one batch."""
    encoder = policy.obs_encoder.rgb.eval()
    x = torch.rand(frames, 1, 3, 96, 128) * 2 - 1
    with torch.inference_mode():
        with PeakRss() as mem:  # the first batch: its working set (later ones reuse the freed blocks)
            encoder.feature_map(x, "top")
        t0 = time.process_time()
        for _ in range(repeats):
            encoder.feature_map(x, "top")
        seconds = time.process_time() - t0
    return 1e3 * seconds / (repeats * frames), mem.rise_mb


def train_samples_per_s(policy, cfg, batch: int, steps: int) -> tuple[float, float]:
    """Training windows per CPU second (forward, backward, AdamW) and the peak memory rise: on frames for
    a backbone that trains, on random cached-size maps for a cached one."""
    To, H = cfg.policy.n_obs_steps, cfg.policy.horizon
    encoder = policy.obs_encoder.rgb
    obs: dict[str, torch.Tensor] = {"state": torch.randn(batch, To, 6)}
    for k in CAMERAS:
        if cfg.policy.vision.cache_features:
            shape = encoder.feature_shapes[k]
            obs[features_key(k)] = torch.randn(batch, To, *shape).to(encoder.cache_dtype)
        else:
            obs[k] = torch.rand(batch, To, 3, 96, 128)
    data = {"obs": obs, "action": torch.randn(batch, H, 6)}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    policy.train()

    def step() -> None:
        loss = policy.compute_loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with PeakRss() as mem:  # the first step: its working set, AdamW's state included
        step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    seconds = time.process_time() - t0
    return batch * steps / seconds, mem.rise_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8, help="frames per backbone batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="training windows per step (the presets' 64)")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps")
    ap.add_argument("--rows", default="", help="comma-separated row numbers (0-based) to run; default all")
    args = ap.parse_args()
    torch.set_num_threads(1)
    picked = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    print(
        f"torch {torch.__version__}, 1 thread, CPU time (time.process_time); ViT weights RANDOM (timm "
        f"pretrained=False, nothing downloaded); SO-101 dataset {SO101_FRAMES} frames x {len(CAMERAS)} "
        "cameras"
    )
    print(
        "| backbone | input | params | ms/frame | peak mem rise | map per frame | train samples/s "
        "(peak mem rise) | cache SO-101: CPU-min / GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, preset, vision in picked:
        policy, cfg = build(preset, vision)
        encoder = policy.obs_encoder.rgb
        backbone = encoder.backbones["top"]
        n_params = sum(p.numel() for p in backbone.parameters())
        ms, mem = backbone_ms(policy, args.frames, args.repeats)
        sps, train_mem = train_samples_per_s(policy, cfg, args.batch, args.steps)
        shape = encoder.feature_shapes["top"]
        cached = cfg.policy.vision.cache_features
        h, w = encoder.crop["top"]
        if cached:
            per_frame = cache_bytes(1, shape, encoder.cache_dtype)
            total = cache_bytes(SO101_FRAMES * len(CAMERAS), shape, encoder.cache_dtype) / 1e9
            minutes = ms * SO101_FRAMES * len(CAMERAS) / 6e4
            cache = f"{minutes:.0f} / {total:.1f}"
            mapcol = f"{'x'.join(map(str, shape))}, {per_frame / 1e3:.1f} kB"
        else:
            cache, mapcol = "- (trains on frames)", f"{'x'.join(map(str, shape))} (fp32, not stored)"
        precision = cfg.policy.vision.precision
        print(
            f"| {name} | {h}x{w} {precision} | {n_params / 1e6:.1f}M | {ms:.1f} | {mem:.0f} MB | {mapcol} | "
            f"{sps:.0f} ({train_mem:.0f} MB) | {cache} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
