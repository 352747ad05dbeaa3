"""ALOHA transfer-cube: env shapes, agreement with gym-aloha, the scripted expert, and a tiny
collect -> train -> eval cycle through the CLI (state and image), each a few seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports MuJoCo (headless rendering)
pytest.importorskip("gym_aloha")
pytest.importorskip("dm_control")

from conftest import TASK_CYCLE, TASK_CYCLE_UNET  # noqa: E402

from diffpolicy.cli import main  # noqa: E402
from diffpolicy.data.episodes import EpisodeStore  # noqa: E402
from diffpolicy.tasks import make_task  # noqa: E402
from diffpolicy.tasks.aloha_transfer_cube import (  # noqa: E402
    AlohaTransferCubeEnv,
    cube_start_pose,
)

_RENDERER_ERROR: list[str | None] = []


def _renderer_error() -> str | None:
    """Why MuJoCo cannot render offscreen here (None when it can); checked once per session."""
    if not _RENDERER_ERROR:
        try:
            env = AlohaTransferCubeEnv(obs_type="image", image_shape=(24, 32))
            env.reset(seed=0)
            env.close()
            _RENDERER_ERROR.append(None)
        except Exception as e:  # any GL failure: no EGL library, no device, no context
            backend = os.environ["MUJOCO_GL"]
            _RENDERER_ERROR.append(f"MuJoCo cannot render offscreen (MUJOCO_GL={backend}): {e}")
    return _RENDERER_ERROR[0]


def needs_renderer() -> None:
    reason = _renderer_error()
    if reason:
        pytest.skip(reason + " -- run scripts/headless-gl.sh")


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_observations_match_shape_meta(obs_type):
    if obs_type == "image":
        needs_renderer()
    cameras = ["top", "left_wrist"]  # more than one camera: one key each
    task = make_task("aloha_transfer_cube", obs_type=obs_type, image_shape=[48, 64], cameras=cameras)
    meta = task.shape_meta()
    assert meta["action"]["shape"] == [14]
    env = task.make_env()
    obs, info = env.reset(seed=0)
    assert info["is_success"] is False
    for _ in range(2):
        assert set(obs) == set(meta["obs"])
        for key, m in meta["obs"].items():
            if m["type"] == "rgb":
                c, h, w = m["shape"]
                assert obs[key].shape == (h, w, c) and obs[key].dtype == np.uint8
                assert obs[key].std() > 0  # an actual picture, not a blank buffer
            else:
                assert list(obs[key].shape) == m["shape"] and obs[key].dtype == np.float32
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(obs["agent_pos"].copy())
        assert reward == 0.0 and not terminated and not truncated
    env.close()


def test_state_env_never_renders(monkeypatch):
    """The state variant's speed comes from rendering nothing per step."""
    env = make_task("aloha_transfer_cube").make_env()
    calls = []
    monkeypatch.setattr(type(env.unwrapped), "render_camera", lambda *a, **k: calls.append(a))
    obs, _ = env.reset(seed=1)
    for _ in range(3):
        obs, *_ = env.step(obs["agent_pos"].copy())
    assert calls == []
    env.close()


def test_same_physics_as_gym_aloha():
    """Same seed and actions: the same MuJoCo state as gym-aloha's own (rendering) AlohaEnv."""
    needs_renderer()  # gym-aloha renders three cameras every step
    from gym_aloha.env import AlohaEnv

    task = make_task("aloha_transfer_cube")
    targets, _ = task.expert.joint_targets(cube_start_pose(3))
    ref = AlohaEnv("transfer_cube", obs_type="pixels_agent_pos")
    ref.reset(seed=3)
    env = task.make_env()
    env.reset(seed=3)
    for action in targets[:3]:
        _, ref_reward, *_ = ref.step(action)
        _, reward, *_ = env.step(action)
        assert np.array_equal(ref._env.physics.data.qpos, env.unwrapped.physics.data.qpos)
        assert reward == ref_reward
    env.close()


def test_expert_transfers_the_cube():
    task = make_task("aloha_transfer_cube")
    for seed in (0, 1):
        data, success = task.collect_episode(seed)
        assert success, f"expert failed on seed {seed}"
        n = len(data["action"])
        assert data["reward"][-1, 0] == 4 and n < task.max_episode_steps  # ends on the transfer
        assert {k: v.shape for k, v in data.items()} == {
            "agent_pos": (n, 14),
            "cube_pose": (n, 7),
            "agent_vel": (n, 14),
            "action": (n, 14),
            "reward": (n, 1),
        }
        np.testing.assert_allclose(data["cube_pose"][0], cube_start_pose(seed), atol=1e-6)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="obs_type"):
        make_task("aloha_transfer_cube", obs_type="pixels")
    with pytest.raises(ValueError, match="camera"):
        make_task("aloha_transfer_cube", obs_type="image", cameras=["wrist"])
    with pytest.raises(ValueError, match="image_shape"):
        make_task("aloha_transfer_cube", obs_type="image", image_shape=[96])
    env = make_task("aloha_transfer_cube").make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(14,\)"):
        env.step(np.zeros(16))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.full(14, np.nan))
    env.close()


TINY_NET = [
    *TASK_CYCLE,
    *TASK_CYCLE_UNET,
    "train.num_steps=4",
    "train.checkpoint_every=2",
    "eval.max_steps=12",
]


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("aloha_transfer_cube_state_unet_cpu", []),
        (
            "aloha_transfer_cube_image_unet_cpu",
            [
                "task.kwargs.image_shape=[48,64]",
                "policy.vision.crop_shape=[44,60]",
                "policy.vision.cnn_channels=[8,8]",
                "policy.vision.cnn_strides=[2,2]",
                "policy.vision.num_keypoints=4",
                "policy.vision.feature_dim=8",
            ],
        ),
    ],
)
def test_collect_train_eval(tmp_path, preset, extra):
    needs_renderer()  # the evaluation writes a video
    data = tmp_path / "demos.zarr"
    args = ["collect", "--preset", preset, "--episodes", "2", "--workers", "1", "--out", str(data)]
    assert main(args + extra) == 0
    store = EpisodeStore.open(data)
    assert store.n_episodes == 2
    assert {"agent_pos", "cube_pose", "action"} <= set(store.keys)
    assert ("top" in store.keys) == ("image" in preset)
    run = tmp_path / "run"
    train = ["train", "--preset", preset, "--run-dir", str(run), f"data.path={data}", "data.val_ratio=0"]
    assert main(train + TINY_NET + extra) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["task"] == "aloha_transfer_cube" and report["n_episodes"] == 2
    assert 0.0 <= report["mean_max_reward"] <= 4.0
    assert {"reached_lifted", "reached_transferred"} <= set(report["task_metrics"])
    assert any(v.endswith(".mp4") for v in report["videos"])
