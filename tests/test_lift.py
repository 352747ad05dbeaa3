"""robosuite Lift (tasks/lift.py): headless env, observation spec, scripted expert, tiny collect -> train ->
eval through the CLI. robosuite is installed with `pip install --no-deps robosuite==1.5.2` next to the
`lift` extra (its mink pin would force numpy<2), so these tests skip where that step was not run."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip(
    "robosuite",
    reason="robosuite is not installed: pip install -e '.[lift]' && pip install --no-deps robosuite==1.5.2",
)

from conftest import TASK_CYCLE  # noqa: E402

from diffpolicy.cli import main  # noqa: E402
from diffpolicy.data.episodes import EpisodeStore  # noqa: E402
from diffpolicy.tasks import make_task  # noqa: E402
from diffpolicy.tasks.lift import LiftEnv, LiftExpert  # noqa: E402


@pytest.fixture(scope="module")
def renderer_ok() -> None:
    """Skip the camera tests, with the reason, where no offscreen OpenGL (EGL / OSMesa) can start."""
    try:
        env = LiftEnv("image")
    except Exception as e:  # the GL context is made in robosuite's constructor
        pytest.skip(f"no headless renderer for MuJoCo (MUJOCO_GL egl/osmesa): {e}")
    env.close()


def check_obs(obs: dict[str, np.ndarray], shape_meta: dict) -> None:
    assert set(obs) == set(shape_meta["obs"])
    for key, meta in shape_meta["obs"].items():
        if meta["type"] == "rgb":
            c, h, w = meta["shape"]
            assert obs[key].shape == (h, w, c) and obs[key].dtype == np.uint8, key
        else:
            assert obs[key].shape == tuple(meta["shape"]) and obs[key].dtype == np.float32, key
            assert np.all(np.isfinite(obs[key])), key


def test_state_env_matches_shape_meta_without_rendering():
    task = make_task("lift", obs_type="state")
    meta = task.shape_meta()
    assert meta["action"]["shape"] == [7]
    assert set(meta["obs"]) == {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"}
    env = task.make_env()
    try:
        assert (
            env.unwrapped.suite_env.sim._render_context_offscreen is None
        )  # the state variant never renders
        obs, info = env.reset(seed=0)
        check_obs(obs, meta)
        assert info["is_success"] is False
        for _ in range(3):
            obs, reward, terminated, truncated, info = env.step(np.zeros(7, dtype=np.float32))
        check_obs(obs, meta)
        assert reward == 0.0 and not terminated and not truncated
        with pytest.raises(RuntimeError, match="without rendering"):
            env.unwrapped.render()
    finally:
        env.close()


def test_reset_seed_fixes_the_initial_state():
    env = LiftEnv("state")
    try:
        a = env.reset(seed=7)[0]["object"]
        env.step(np.ones(7))
        b = env.reset(seed=7)[0]["object"]
        c = env.reset(seed=8)[0]["object"]
    finally:
        env.close()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[:3], c[:3])  # another cube placement


def test_image_env_cameras_and_render(renderer_ok):
    task = make_task("lift", obs_type="image", render_size=64)
    meta = task.shape_meta()
    assert meta["obs"]["agentview_image"] == {"shape": [3, 84, 84], "type": "rgb"}
    assert meta["obs"]["robot0_eye_in_hand_image"] == {"shape": [3, 84, 84], "type": "rgb"}
    assert "object" not in meta["obs"]
    env = task.make_env(render=True)
    try:
        obs, _ = env.reset(seed=1)
        check_obs(obs, meta)
        obs, *_ = env.step(np.zeros(7))
        check_obs(obs, meta)
        frame = env.render()
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        for key in ("agentview_image", "robot0_eye_in_hand_image"):
            assert obs[key].std() > 5, f"{key} is blank"
        # Upright images: the agentview camera sees the floor behind the table at the top and the white
        # table below, so the top rows are darker than the bottom rows.
        img = obs["agentview_image"].astype(float)
        assert img[:10].mean() < img[-10:].mean()
    finally:
        env.close()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="obs_type"):
        make_task("lift", obs_type="depth")
    with pytest.raises(ValueError, match="vector_mode"):
        make_task("lift", vector_mode="threads")
    with pytest.raises(ValueError, match="render_quality"):
        make_task("lift", render_quality="ultra")
    env = LiftEnv("state")
    try:
        env.reset(seed=0)
        with pytest.raises(ValueError, match="7-D action"):
            env.step(np.zeros(6))
        with pytest.raises(ValueError, match="non-finite"):
            env.step(np.array([0, 0, np.nan, 0, 0, 0, 0]))
    finally:
        env.close()


def test_expert_lifts_the_cube_with_varied_demonstrations():
    task = make_task("lift", obs_type="state")
    episodes = [task.collect_episode(seed) for seed in (0, 1)]
    for data, success in episodes:
        assert success
        assert data["action"].shape[1] == 7 and np.all(np.abs(data["action"]) <= 1.0)
        assert len(data["action"]) < task.max_episode_steps
        assert {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"} <= set(data)
        assert data["cube_height"][0, 0] < 0.035  # starts on (robosuite drops it from 1 cm above) the table
        assert data["action"][0, 6] == -1.0 and data["action"][-1, 6] == 1.0  # open, then closed
    a, b = (d["action"] for d, _ in episodes)
    n = min(len(a), len(b))
    assert not np.allclose(a[:n], b[:n])
    # The same seed gives the same demonstration.
    again, _ = task.collect_episode(0)
    np.testing.assert_array_equal(again["action"], episodes[0][0]["action"])


def test_expert_config_is_sampled_per_seed():
    e1, e2 = LiftExpert(0), LiftExpert(1)
    assert (e1.hover, e1.depth, e1.max_step) != (e2.hover, e2.depth, e2.max_step)


TINY = [
    *TASK_CYCLE,
    "policy.scheduler.num_inference_steps=4",
    "train.num_steps=6",
    "train.checkpoint_every=3",
    "eval.max_steps=16",
    "task.kwargs.vector_mode=sync",
]


def _cycle(tmp_path, preset: str, extra: list[str], image: bool) -> None:
    data = tmp_path / "demos.zarr"
    assert main(["collect", "--preset", preset, "--episodes", "2", "--workers", "1", "--out", str(data)]) == 0
    store = EpisodeStore.open(data)
    assert store.n_episodes == 2
    assert {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object", "action"} <= set(store.keys)
    assert ("agentview_image" in store.keys) == image
    run = tmp_path / "run"
    args = ["train", "--preset", preset, "--run-dir", str(run), f"data.path={data}", "data.val_ratio=0"]
    assert main(args + TINY + extra) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["task"] == "lift" and report["n_episodes"] == 2
    assert any(v.endswith(".mp4") for v in report["videos"])


def test_collect_train_eval_state(tmp_path):
    extra = [
        "policy.unet.down_dims=[16,32]",
        "policy.unet.n_groups=4",
        "policy.unet.diffusion_step_embed_dim=16",
    ]
    _cycle(tmp_path, "lift_state_unet_cpu", extra, image=False)


def test_collect_train_eval_image_transformer(tmp_path, renderer_ok):
    pytest.importorskip("torchvision")
    # The preset's structure (two cameras, 76x76 crops, causal transformer) with a tiny CNN in place of
    # two ResNet-18s, so the cycle stays within seconds of CPU.
    extra = [
        "policy.vision.backbone=compact",
        "policy.vision.cnn_channels=[8,8]",
        "policy.vision.cnn_strides=[2,2]",
        "policy.transformer.n_layer=1",
        "policy.transformer.n_emb=16",
        "policy.transformer.n_head=2",
        "policy.vision.num_keypoints=4",
        "policy.vision.feature_dim=8",
    ]
    _cycle(tmp_path, "lift_image_transformer", extra, image=True)
