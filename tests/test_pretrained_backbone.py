"""Pretrained camera backbones from local files: frozen and fine-tuned training, clear errors, no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="camera observations need the 'vision' extra")

from diffpolicy.checkpoint import save_checkpoint  # noqa: E402
from diffpolicy.config import load_config  # noqa: E402
from diffpolicy.data.normalize import Normalizer  # noqa: E402
from diffpolicy.policy import load_policy, make_policy, normalizer_spec  # noqa: E402

SHAPE_META = {
    "obs": {"img": {"shape": [3, 40, 40], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}},
    "action": {"shape": [2]},
}


def image_policy(*overrides: str):
    cfg = load_config(
        None,
        [
            "policy.unet.down_dims=[16,32]",
            "policy.unet.diffusion_step_embed_dim=16",
            "policy.unet.n_groups=4",
            "policy.vision.crop_shape=[32,32]",
            "policy.vision.num_keypoints=4",
            "policy.vision.feature_dim=8",
            *overrides,
        ],
    )
    policy = make_policy(cfg.policy, SHAPE_META)
    spec = normalizer_spec(SHAPE_META, cfg.policy.normalization)
    data = {"agent_pos": torch.randn(64, 2), "action": torch.randn(64, 2)}
    policy.normalizer.load_state_dict(Normalizer.fit(data, {k: m for k, (m, _) in spec.items()}).state_dict())
    return policy, cfg


def train_steps(policy, n: int = 3) -> None:
    batch = {
        "obs": {"img": torch.rand(4, 2, 3, 40, 40), "agent_pos": torch.randn(4, 2, 2)},
        "action": torch.randn(4, 16, 2),
        "action_is_pad": torch.zeros(4, 16, dtype=torch.bool),
    }
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    policy.train()
    for _ in range(n):
        loss = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


def backbone_state(policy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy.obs_encoder.rgb.backbones.state_dict().items()}


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 'pretrained' ResNet18 state dict (random weights standing in for ImageNet ones) in a local file."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("frozen", [True, False])
def test_resnet_weights_load_from_a_local_file_and_train_frozen_or_not(resnet_file, frozen, tmp_path):
    path, state = resnet_file
    policy, cfg = image_policy(
        f"policy.vision.pretrained_weights={path}",
        f"policy.vision.freeze_backbone={frozen}",
        "policy.vision.imagenet_norm=true",
    )
    first_conv = policy.obs_encoder.rgb.backbones["img"][0].weight
    assert torch.equal(first_conv, state["conv1.weight"])  # the file's weights, not a fresh init
    before = backbone_state(policy)
    head_before = policy.obs_encoder.rgb.heads["img"][1].weight.clone()
    train_steps(policy)
    after = backbone_state(policy)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert (changed == []) if frozen else (len(changed) > 0)
    assert not torch.equal(head_before, policy.obs_encoder.rgb.heads["img"][1].weight)  # keypoints learn
    # The checkpoint holds the backbone itself: it loads after the weights file is gone.
    ckpt = save_checkpoint(tmp_path / "ckpt", policy.eval(), cfg)
    moved = path.with_suffix(".away")
    path.rename(moved)
    try:
        loaded, _ = load_policy(ckpt)
    finally:
        moved.rename(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())


def test_timm_vit_backbone_from_a_local_safetensors_file(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(2)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    policy, _ = image_policy(
        "policy.vision.backbone=timm:vit_tiny_patch16_224",
        f"policy.vision.pretrained_weights={path}",
        "policy.vision.freeze_backbone=true",
        "policy.vision.imagenet_norm=true",
    )
    backbone = policy.obs_encoder.rgb.backbones["img"]
    assert torch.equal(backbone.model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert policy.obs_encoder.rgb.heads["img"][0].grid.shape == (2 * 2, 2)  # 32x32 crop, 16-pixel patches
    before = backbone_state(policy)
    train_steps(policy, n=2)
    assert all(torch.equal(v, backbone_state(policy)[k]) for k, v in before.items())


def test_missing_or_mismatched_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        image_policy(f"policy.vision.pretrained_weights={tmp_path / 'nope.pth'}")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="do not fit vision.backbone 'resnet18'"):
        image_policy(f"policy.vision.pretrained_weights={wrong}")
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="not a state dict"):
        image_policy(f"policy.vision.pretrained_weights={junk}")
