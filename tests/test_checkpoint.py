import pytest
import torch
import yaml
from conftest import tiny_config
from test_policy import SHAPE_META, batch, build

from diffpolicy.checkpoint import CheckpointError, save_checkpoint
from diffpolicy.policy import DiffusionPolicy, MseBCPolicy, load_policy


def predict(policy):
    return policy.predict_action(batch()["obs"], generator=torch.Generator().manual_seed(0))["action"]


def saved(tmp_path, *overrides):
    policy = build(*overrides).eval()
    path = save_checkpoint(tmp_path / "ckpt", policy, tiny_config(*overrides), step=7)
    return policy, path


@pytest.mark.parametrize("net", ["unet", "transformer"])
def test_roundtrip_without_training_objects(tmp_path, net):
    policy, path = saved(tmp_path, f"policy.net={net}")
    loaded = DiffusionPolicy.from_pretrained(path)
    assert torch.equal(predict(policy), predict(loaded))
    _, cfg = load_policy(path)
    assert cfg.policy.net == net
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    policy, path = saved(tmp_path)
    save_checkpoint(path, policy, tiny_config(), step=8)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert yaml.safe_load((path / "config.yaml").read_text())["step"] == 8


def test_wrong_class(tmp_path):
    _, path = saved(tmp_path)
    with pytest.raises(TypeError, match="not a MseBCPolicy"):
        MseBCPolicy.from_pretrained(path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        load_policy(tmp_path / "empty")
    _, path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_policy(path)


def test_truncated_weights(tmp_path):
    _, path = saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_policy(path)


def test_config_that_does_not_match_the_weights(tmp_path):
    _, path = saved(tmp_path)
    meta = yaml.safe_load((path / "config.yaml").read_text())
    meta["run"]["policy"]["unet"]["down_dims"] = [16, 64]
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match="does not match the policy"):
        load_policy(path)


def test_garbage_config(tmp_path):
    _, path = saved(tmp_path)
    (path / "config.yaml").write_text("format: something-else\n")
    with pytest.raises(CheckpointError, match="is not a diffpolicy-checkpoint"):
        load_policy(path)
    (path / "config.yaml").write_text("{{{ not yaml")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_policy(path)


def test_shape_meta_travels_with_the_checkpoint(tmp_path):
    _, path = saved(tmp_path)
    policy, _ = load_policy(path)
    assert policy.shape_meta == SHAPE_META
