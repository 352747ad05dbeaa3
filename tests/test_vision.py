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
