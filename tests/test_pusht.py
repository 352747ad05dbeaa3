"""Push-T task: exact state restore, env contract, scripted expert, collected data, drawing."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from diffpolicy.tasks import make_task  # noqa: E402
from diffpolicy.tasks.base import Rollout  # noqa: E402
from diffpolicy.tasks.pusht import (  # noqa: E402
    BLOCK_KEYPOINTS_LOCAL,
    PushTExpert,
    PushTTask,
    block_keypoints_local,
    count_contacts,
    get_state,
    goal_distance,
    physics_step,
    set_state,
)

QUICK_SEEDS = (21, 10)  # the expert solves these in 40 and 76 steps


def _pushing_env(n_steps: int = 9):
    """Seed 0 with the agent pushing the block steadily, so a contact (and pymunk's caches) exist.

    Returns the env and the push: targets a0 + u * 15 * k, continued by `_push_targets`."""
    env = PushTTask().make_env()
    env.reset(seed=0)
    a0 = get_state(env)[:2]
    u = np.array(env.unwrapped.block.position) - a0
    u /= np.linalg.norm(u)
    for k in range(1, n_steps + 1):
        env.step((a0 + u * 15.0 * k).astype(np.float32))
    assert count_contacts(env) > 0
    return env, (a0, u, n_steps)


def _push_targets(push, n: int, sideways: float = 0.0) -> list[np.ndarray]:
    a0, u, done = push
    side = np.array([-u[1], u[0]])
    return [(a0 + u * 15.0 * (done + k) + side * sideways * k).astype(np.float32) for k in range(1, n + 1)]


def _trajectory(env, actions) -> np.ndarray:
    out = []
    for a in actions:
        physics_step(env, a)
        out.append(get_state(env))
    return np.array(out)


def test_physics_step_matches_env_step_bitwise():
    env_a, push = _pushing_env()
    env_b, _ = _pushing_env()
    actions = _push_targets(push, 8, sideways=3.0)
    for a in actions:
        env_a.step(a)
        physics_step(env_b, a)
        np.testing.assert_array_equal(get_state(env_a), get_state(env_b))


def test_set_state_restores_exactly():
    env, push = _pushing_env()
    state = get_state(env)
    assert np.abs(state[2:4]).max() > 100.0, "the agent should be moving (into the block)"
    actions = _push_targets(push, 10, sideways=2.0)
    live = _trajectory(env, actions)

    set_state(env, state)
    np.testing.assert_allclose(get_state(env), state, rtol=0, atol=1e-9)
    first = _trajectory(env, actions)
    set_state(env, state)
    _trajectory(env, _push_targets(push, 6, sideways=-4.0))  # something else in between
    set_state(env, state)
    second = _trajectory(env, actions)
    # Bit for bit: merely setting the bodies would leave pymunk's contact cache from the run in between.
    np.testing.assert_array_equal(first, second)
    assert np.abs(first[-1, 4:7] - state[4:7]).max() > 1.0, "the actions should move the block"
    # The live env kept pymunk's contact cache; restoring drops it, which changes results only in the noise.
    np.testing.assert_allclose(first, live, atol=0.05)

    other = PushTTask().make_env()  # a restore into another env gives the same trajectory too
    other.reset(seed=123)
    set_state(other, state)
    np.testing.assert_array_equal(_trajectory(other, actions), first)


def test_set_state_sets_angle_before_position():
    # The T rotates about its centre of gravity, 45 px from its origin: a wrong order would move it.
    env = PushTTask().make_env()
    env.reset(seed=0)
    state = np.array([100.0, 100.0, 0.0, 0.0, 300.0, 250.0, 2.5, 0.0, 0.0, 0.0])
    set_state(env, state)
    np.testing.assert_allclose(get_state(env), state, atol=1e-9)


def test_keypoints_match_the_original_definition():
    np.testing.assert_allclose(block_keypoints_local(), BLOCK_KEYPOINTS_LOCAL, rtol=0, atol=1e-9)


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_env_contract(obs_type):
    task = make_task("pusht", obs_type=obs_type, render_size=128)
    assert task.name == "pusht" and task.max_episode_steps == 300 and task.vector_mode == "async"
    meta = task.shape_meta()
    env = task.make_env(render=True)
    obs, info = env.reset(seed=1)
    assert set(obs) == set(meta["obs"]) == set(env.observation_space.spaces)
    assert info["is_success"] is False
    for _ in range(3):
        assert env.observation_space.contains(obs)
        for key, m in meta["obs"].items():
            if m["type"] == "rgb":
                assert obs[key].dtype == np.uint8
                c, h, w = m["shape"]
                assert obs[key].shape == (h, w, c)
            else:
                assert obs[key].dtype == np.float32 and list(obs[key].shape) == m["shape"]
        obs, reward, terminated, truncated, info = env.step(np.array([256.0, 256.0], dtype=np.float32))
        assert isinstance(info["is_success"], bool) and 0.0 <= reward <= 1.0
        assert not terminated and not truncated
    assert env.action_space.shape == tuple(meta["action"]["shape"]) and env.action_space.dtype == np.float32
    np.testing.assert_allclose(obs["agent_pos"], get_state(env)[:2], atol=1e-4)
    frame = env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    for bad in ([np.nan, 1.0], [1.0, np.inf]):
        with pytest.raises(ValueError):
            env.step(np.array(bad, dtype=np.float32))
    env.step(np.array([-50.0, 900.0], dtype=np.float32))  # out-of-range targets are clipped
    assert np.all(env.unwrapped.agent.position[0] >= 0) and env.unwrapped.agent.position[1] <= 512


def test_unknown_obs_type():
    with pytest.raises(ValueError):
        PushTTask(obs_type="depth")


def test_keypoints_follow_the_block():
    env = PushTTask().make_env()
    obs, _ = env.reset(seed=4)
    kp = obs["keypoint"].astype(np.float64)
    state = get_state(env)
    c, s = math.cos(state[6]), math.sin(state[6])
    expected = BLOCK_KEYPOINTS_LOCAL @ np.array([[c, -s], [s, c]]).T + state[4:6]
    np.testing.assert_allclose(kp, expected, atol=1e-3)
    # gym-pusht's 8 outline keypoints: the outline corners lie within the original keypoints' extent
    corners = env.unwrapped.get_keypoints(env.unwrapped._block_shapes)
    assert corners.shape == (8, 2) and np.all(np.linalg.norm(corners - kp.mean(0), axis=1) < 100)


def test_success_terminates_and_time_limit_truncates():
    env = PushTTask().make_env()
    env.reset(seed=0)
    goal = np.array([256.0, 256.0, math.pi / 4])
    set_state(env, np.array([50.0, 50.0, 0.0, 0.0, *goal, 0.0, 0.0, 0.0]))  # the block on the goal
    _, reward, terminated, truncated, info = env.step(np.array([50.0, 50.0], dtype=np.float32))
    assert terminated and info["is_success"] and reward == 1.0 and not truncated
    assert goal_distance(goal) < 1e-9

    env.reset(seed=0)
    for t in range(1, 301):
        _, _, terminated, truncated, _ = env.step(np.array([10.0, 10.0], dtype=np.float32))
        assert truncated == (t == 300) and not terminated


def test_expert_solves_quick_seeds():
    task = PushTTask()
    for seed in QUICK_SEEDS:
        env = task.make_env()
        env.reset(seed=seed)
        expert = PushTExpert(seed)
        for _ in range(300):
            _, _, terminated, truncated, info = env.step(expert.act(env))
            if terminated or truncated:
                break
        assert info["is_success"], f"the expert failed on seed {seed}"


def test_collect_episode_data_and_alignment():
    task = PushTTask()
    data, success = task.collect_episode(QUICK_SEEDS[0])
    assert success
    n = len(data["action"])
    assert 0 < n <= 300
    expected = {
        "state": ((n, 5), np.float32),
        "keypoint": ((n, 9, 2), np.float32),
        "agent_pos": ((n, 2), np.float32),
        "action": ((n, 2), np.float32),
        "n_contacts": ((n, 1), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in data.items()} == expected
    assert np.all((data["action"] >= 0) & (data["action"] <= 512))
    assert data["n_contacts"].max() >= 1 and set(np.unique(data["n_contacts"])) <= {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(data["state"][:, :2], data["agent_pos"])
    # Replaying the actions reproduces every observation, each recorded before its action.
    env = task.make_env()
    obs, _ = env.reset(seed=QUICK_SEEDS[0])
    for t in range(n):
        np.testing.assert_array_equal(obs["agent_pos"], data["agent_pos"][t])
        np.testing.assert_array_equal(obs["keypoint"], data["keypoint"][t])
        obs, _, terminated, _, info = env.step(data["action"][t])
    assert terminated and info["is_success"]
    # Deterministic per seed.
    again, _ = task.collect_episode(QUICK_SEEDS[0])
    np.testing.assert_array_equal(again["action"], data["action"])


def test_collect_episode_image():
    data, success = PushTTask(obs_type="image").collect_episode(QUICK_SEEDS[0])
    assert success
    n = len(data["action"])
    assert data["img"].shape == (n, 96, 96, 3) and data["img"].dtype == np.uint8
    assert {"state", "keypoint", "agent_pos", "action", "n_contacts", "img"} == set(data)


@pytest.mark.parametrize("size", [96, 256])
def test_draw_chunk(size):
    task = PushTTask(render_size=size)
    env = task.make_env(render=True)
    env.reset(seed=0)
    frame = env.render()
    before = frame.copy()
    chunk = np.array([[100.0, 100.0], [120.0, 110.0], [140.0, 125.0], [160.0, 140.0]])
    drawn = task.draw_chunk(frame, chunk)
    np.testing.assert_array_equal(frame, before)  # the input frame is left alone
    assert drawn.shape == frame.shape and drawn.dtype == np.uint8
    changed = np.any(drawn != frame, axis=-1)
    assert changed.sum() > 0
    ys, xs = np.nonzero(changed)  # drawn where the chunk is, scaled from 512-space
    assert abs(xs.mean() - 130 * size / 512) < 0.1 * size and abs(ys.mean() - 119 * size / 512) < 0.1 * size


def test_summarize(tmp_path):
    def rollout(seed, rewards, success):
        r = np.asarray(rewards, dtype=np.float64)
        return Rollout(seed=seed, success=success, length=len(r), rewards=r, actions=np.zeros((len(r), 2)))

    rollouts = [rollout(0, [0.2, 0.5, 1.0], True), rollout(1, [0.1, 0.3, 0.2, 0.4], False)]
    summary = PushTTask().summarize(rollouts, tmp_path)
    assert summary["mean_final_reward"] == pytest.approx(0.7)
    assert summary["mean_success_step"] == 3.0 and summary["max_reward_above_0.9"] == 0.5
    assert PushTTask().summarize(rollouts[1:], tmp_path)["mean_success_step"] is None
