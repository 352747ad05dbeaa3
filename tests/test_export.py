"""TorchScript export: the exported encoder + noise net, with the Python sampling loop, match PyTorch."""

import pytest
import torch
from conftest import tiny_config, tiny_image_policy
from test_policy import batch, build

from diffpolicy.checkpoint import save_checkpoint
from diffpolicy.cli import main
from diffpolicy.control import RecedingHorizonController
from diffpolicy.serving.export import ExportedPolicy, example_obs, export_policy

TOLERANCE = 1e-5  # absolute, on actions in environment units (measured: 0.0, bit-identical on CPU)


def agree(policy, exported, obs):
    for seed in (0, 1):
        a = policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))
        b = exported.predict_action(obs, generator=torch.Generator().manual_seed(seed))
        for key in ("action", "action_pred"):
            assert a[key].shape == b[key].shape
            torch.testing.assert_close(b[key], a[key], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        ("policy.net=unet",),
        ("policy.net=transformer",),
        ("policy.net=unet", "policy.scheduler.sampler=ddim", "policy.scheduler.num_inference_steps=4"),
    ],
)
def test_low_dim_export_matches_pytorch(tmp_path, overrides):
    policy = build(*overrides).eval()
    exported = ExportedPolicy(export_policy(policy, tmp_path / "export"))
    agree(policy, exported, batch(B=5)["obs"])  # a batch size other than the traced one (2)
    obs = {"pos": torch.zeros(2, 2).numpy(), "vel": torch.ones(2, 3).numpy()}
    local = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(3))
    remote = RecedingHorizonController(exported, generator=torch.Generator().manual_seed(3))
    for _ in range(9):
        torch.testing.assert_close(
            torch.tensor(remote.act(obs)), torch.tensor(local.act(obs)), atol=TOLERANCE, rtol=0
        )


def test_tiny_image_policy_export_matches_pytorch(tmp_path):
    policy = tiny_image_policy("policy.vision.precision=fp32")
    exported = ExportedPolicy(export_policy(policy, tmp_path / "export"))
    agree(policy, exported, example_obs(policy.shape_meta, policy.n_obs_steps, batch=3))


def test_rejects_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="global observation conditioning"):
        export_policy(build("policy.obs_as_global_cond=false"), tmp_path / "x")
    with pytest.raises(ValueError, match="not MseBCPolicy"):
        export_policy(build("policy.type=mse_bc"), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a diffpolicy export"):
        ExportedPolicy(tmp_path)


def test_cli_export_never_replaces_a_folder_silently(tmp_path, capsys):
    """An export goes where the docs say (<checkpoint>-torchscript beside the checkpoint); a second export
    there, or into a folder holding anything else, is refused and leaves the folder as it was; --overwrite
    replaces an earlier export only."""
    policy = build().eval()
    path = save_checkpoint(tmp_path / "ckpt", policy, tiny_config())
    assert main(["export", "--checkpoint", str(path)]) == 0
    assert "max |action - PyTorch| = 0" in capsys.readouterr().out
    out = tmp_path / "ckpt-torchscript"
    before = (out / "noise_net.pt").read_bytes()
    assert main(["export", "--checkpoint", str(path)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert (out / "noise_net.pt").read_bytes() == before
    assert main(["export", "--checkpoint", str(path), "--overwrite"]) == 0
    agree(policy, ExportedPolicy(out), batch(B=2)["obs"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a diffpolicy export"):
        export_policy(policy, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main(["export", "--checkpoint", str(path), "--out", str(path / "ts")]) == 2
    assert "inside the checkpoint folder" in capsys.readouterr().err
