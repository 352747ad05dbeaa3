"""A tiny collect -> train -> eval cycle on Push-T (state and image), small enough for CI."""

import json

import pytest

pytest.importorskip("gym_pusht")

from diffpolicy.cli import main  # noqa: E402
from diffpolicy.data.episodes import EpisodeStore  # noqa: E402

TINY_NET = [
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.scheduler.num_inference_steps=4",
    "train.batch_size=8",
    "train.num_steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.val_every=0",
    "train.checkpoint_every=3",
    "train.num_workers=0",
    "eval.n_episodes=2",
    "eval.n_envs=2",
    "eval.max_steps=24",
    "eval.n_videos=1",
]


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("pusht_state_unet_cpu", []),
        (
            "pusht_image_unet_cpu",
            [
                "policy.vision.backbone=resnet18",
                "policy.vision.num_keypoints=4",
                "policy.vision.feature_dim=8",
                "policy.vision.crop_shape=[84,84]",
            ],
        ),
    ],
)
def test_collect_train_eval(tmp_path, preset, extra):
    pytest.importorskip("torchvision")
    data = tmp_path / "demos.zarr"
    assert main(["collect", "--preset", preset, "--episodes", "2", "--workers", "1", "--out", str(data)]) == 0
    store = EpisodeStore.open(data)
    assert store.n_episodes == 2
    assert {"state", "keypoint", "agent_pos", "action", "n_contacts"} <= set(store.keys)
    assert ("img" in store.keys) == ("image" in preset)
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--preset", preset, "--run-dir", str(run), f"data.path={data}", "data.val_ratio=0"]
            + TINY_NET
            + extra
        )
        == 0
    )
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["task"] == "pusht" and report["n_episodes"] == 2
    episodes = report["episodes"]
    assert [e["seed"] for e in episodes] == [100_000, 100_001]  # eval.seed onwards, none from the demos
    for e in episodes:  # Push-T: reward = clip(coverage / 0.95), success = coverage > 0.95
        assert e["success"] == (e["max_reward"] >= 1.0) and 0.0 < e["max_reward"] <= 1.0
        assert e["length"] == 24 or e["success"]  # eval.max_steps unless solved earlier
    assert report["mean_max_reward"] == pytest.approx(sum(e["max_reward"] for e in episodes) / 2)
    assert report["success_rate"] == sum(e["success"] for e in episodes) / 2
    assert any(v.endswith(".mp4") for v in report["videos"])
