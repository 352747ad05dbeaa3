import pytest
import torch

pytest.importorskip("torchvision", reason="camera observations need the 'vision' extra")

from diffpolicy.config import VisionConfig  # noqa: E402
from diffpolicy.models.rgb import RgbEncoder, SpatialSoftmax, crop_windows  # noqa: E402
from diffpolicy.models.vision import ObsEncoder  # noqa: E402


def test_spatial_softmax_finds_the_hot_spot():
    layer = SpatialSoftmax(1, 5, 7, num_keypoints=1)
    with torch.no_grad():
        layer.keypoints.weight.fill_(1.0)
        layer.keypoints.bias.zero_()
    fmap = torch.zeros(1, 1, 5, 7)
    fmap[0, 0, 4, 6] = 100.0  # bottom-right corner
    assert torch.allclose(layer(fmap), torch.tensor([[1.0, 1.0]]), atol=1e-4)


def test_random_crop_is_shared_across_the_window_and_centre_crop_is_centred():
    B, T = 6, 3
    base = torch.arange(10 * 12, dtype=torch.float32).view(1, 1, 1, 10, 12)
    images = base.expand(B, T, 2, 10, 12).clone()
    images[:, 1] += 1000  # frames differ, crops must still match
    torch.manual_seed(0)
    out = crop_windows(images, (6, 8), random=True)
    assert out.shape == (B, T, 2, 6, 8)
    assert torch.equal(out[:, 0], out[:, 1] - 1000) and torch.equal(out[:, 0], out[:, 2])
    corners = {int(out[b, 0, 0, 0, 0]) for b in range(B)}
    assert len(corners) > 1  # samples get different crops
    centre = crop_windows(images, (6, 8), random=False)
    assert int(centre[0, 0, 0, 0, 0]) == 2 * 12 + 2


def test_encoder_shapes_group_norm_and_modes():
    cfg = VisionConfig(crop_shape=[76, 76], num_keypoints=8, feature_dim=16)
    enc = RgbEncoder({"cam": (3, 84, 84), "wrist": (3, 84, 84)}, cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    x = {k: torch.rand(2, 2, 3, 84, 84) * 2 - 1 for k in ("cam", "wrist")}
    enc.eval()
    a, b = enc(x), enc(x)
    assert a.shape == (2, 2, 32) and torch.equal(a, b)  # centre crop: deterministic
    enc.train()
    assert not torch.equal(enc(x), enc(x))  # random crops
    shared = RgbEncoder({"cam": (3, 84, 84), "wrist": (3, 84, 84)}, VisionConfig(share_backbone=True))
    assert len(shared.backbones) == 1 and len(enc.backbones) == 2


def test_obs_encoder_concatenates_low_dim_and_camera_features():
    meta = {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    enc = ObsEncoder(meta, VisionConfig(num_keypoints=4, feature_dim=8)).eval()
    obs = {"image": torch.rand(3, 2, 3, 96, 96), "agent_pos": torch.rand(3, 2, 2)}
    out = enc(obs)
    assert out.shape == (3, 2, 2 + 8) and enc.output_dim == 10
    assert torch.equal(out[..., :2], obs["agent_pos"])


def test_bad_vision_settings():
    with pytest.raises(ValueError, match="larger than camera"):
        RgbEncoder({"cam": (3, 64, 64)}, VisionConfig(crop_shape=[84, 84]))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        RgbEncoder({"cam": (3, 96, 96)}, VisionConfig(pretrained_weights="/nonexistent/resnet18.pth"))


# ---------------------------------------------------------------------- backbones, resize, jitter, bf16
def test_compact_backbone_keeps_a_fine_keypoint_map_and_is_small():
    cfg = VisionConfig(backbone="compact", cnn_channels=[8, 8, 16], cnn_strides=[2, 1, 2], num_keypoints=4)
    enc = RgbEncoder({"cam": (3, 96, 96)}, cfg)
    assert enc.heads["cam"][0].grid.shape == (21 * 21, 2)  # 84 -> 42 -> 42 -> 21
    assert sum(p.numel() for p in enc.parameters()) < 10_000
    assert enc({"cam": torch.rand(2, 3, 3, 96, 96) * 2 - 1}).shape == (2, 3, 64)


def test_resize_before_crop_for_large_camera_frames():
    cfg = VisionConfig(
        backbone="compact", cnn_channels=[4], cnn_strides=[2], resize_shape=[48, 64], crop_shape=[40, 56]
    )
    enc = RgbEncoder({"cam": (3, 480, 640)}, cfg).eval()
    frames = torch.rand(1, 2, 3, 480, 640) * 2 - 1
    assert enc.preprocess(frames, "cam").shape == (1, 2, 3, 40, 56)
    assert enc({"cam": frames}).shape == (1, 2, cfg.feature_dim)
    with pytest.raises(ValueError, match="resized to vision.resize_shape"):
        RgbEncoder({"cam": (3, 480, 640)}, VisionConfig(resize_shape=[32, 32], crop_shape=[40, 40]))


def test_color_jitter_is_per_sample_shared_across_the_window_and_only_in_training():
    cfg = VisionConfig(
        backbone="compact", cnn_channels=[4], cnn_strides=[2], crop_shape=None, color_jitter=0.4
    )
    enc = RgbEncoder({"cam": (3, 16, 16)}, cfg)
    frame = torch.rand(1, 1, 3, 16, 16) * 2 - 1
    window = frame.expand(5, 2, 3, 16, 16)  # five samples, two identical frames each
    out = enc.preprocess(window, "cam")
    assert torch.allclose(out[:, 0], out[:, 1])  # one factor for the whole window
    assert not torch.allclose(out[0], out[1])  # different factors per sample
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(enc.eval().preprocess(window, "cam"), window)


def test_bf16_backbone_matches_fp32_closely():
    torch.manual_seed(0)
    fp32 = RgbEncoder({"cam": (3, 32, 32)}, VisionConfig(backbone="compact", crop_shape=None)).eval()
    bf16 = RgbEncoder(
        {"cam": (3, 32, 32)}, VisionConfig(backbone="compact", crop_shape=None, precision="bf16")
    )
    bf16.load_state_dict(fp32.state_dict())
    x = {"cam": torch.rand(4, 2, 3, 32, 32) * 2 - 1}
    a, b = fp32(x), bf16.eval()(x)
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05)
    b.sum().backward()  # gradients reach the backbone through the autocast region
    assert all(p.grad is not None for p in bf16.backbones.parameters())


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_uses_bf16_only_where_the_cpu_is_fast_at_it(monkeypatch, fast):
    # bf16 is emulated on AVX2-only CPUs (24x slower for the compact CNN): "auto" must then stay fp32
    import diffpolicy.models.rgb as rgb

    monkeypatch.setattr(rgb, "cpu_has_fast_bf16", lambda: fast)
    enc = RgbEncoder(
        {"cam": (3, 32, 32)}, VisionConfig(backbone="compact", crop_shape=None, precision="auto")
    ).eval()
    fmap = enc.feature_map(torch.rand(1, 1, 3, 32, 32) * 2 - 1, "cam")
    assert fmap.dtype == (torch.bfloat16 if fast else torch.float32)
    assert rgb.backbone_bf16("bf16", "cpu") and not rgb.backbone_bf16("fp32", "cpu")


def test_unknown_backbones_and_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown vision.backbone 'vgg11'"):
        RgbEncoder({"cam": (3, 32, 32)}, VisionConfig(backbone="vgg11", crop_shape=None))
    from diffpolicy.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cnn_channels"):
        load_config(None, ["policy.vision.cnn_channels=[8,8]", "policy.vision.cnn_strides=[2]"])
    with pytest.raises(ConfigError, match="color_jitter"):
        load_config(None, ["policy.vision.color_jitter=1.5"])
    with pytest.raises(ConfigError, match="resize_shape"):
        load_config(None, ["policy.vision.resize_shape=[0,10]"])
    with pytest.raises(ConfigError, match="policy.vision.precision"):
        load_config(None, ["policy.vision.precision=fp16"])
