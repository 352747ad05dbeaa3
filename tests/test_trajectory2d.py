import numpy as np
import pytest

from diffpolicy.tasks import make_task
from diffpolicy.tasks.base import Rollout
from diffpolicy.tasks.trajectory2d import FOLLOW_MAX_DISTANCE, distance_to_path, figure_eight, mode_side


@pytest.fixture(scope="module")
def task():
    return make_task("trajectory2d")


def rollout(seed, positions, success):
    positions = np.asarray(positions, dtype=np.float32)
    return Rollout(
        seed=seed,
        success=success,
        length=len(positions) - 1,
        rewards=np.zeros(len(positions) - 1),
        actions=positions[1:],
        low_dim_obs={"pos": positions},
    )


def test_expert_succeeds_in_both_directions(task):
    directions = []
    for seed in range(30):
        episode, ok = task.collect_episode(seed)
        assert ok and episode["pos"].shape == episode["action"].shape and episode["pos"].shape[1] == 2
        assert distance_to_path(episode["pos"]).mean() < 0.01
        directions.append(mode_side(episode["pos"]))
    assert set(directions) == {1, -1}
    assert 0.2 < np.mean(np.array(directions) > 0) < 0.8


def test_distance_to_path():
    on = figure_eight(np.linspace(0, 2 * np.pi, 37))
    assert distance_to_path(on).max() < 1e-3
    # near the origin the path runs along the diagonals, so (0, 0.3) is 0.3 / sqrt(2) away
    assert distance_to_path(np.array([[0.0, 0.3]]))[0] == pytest.approx(0.3 / np.sqrt(2), abs=0.01)


def test_modes_are_classified(task, tmp_path):
    forward, ok = task.collect_episode(seed=next(s for s in range(50) if task_direction(task, s) > 0))
    reverse, _ = task.collect_episode(seed=next(s for s in range(50) if task_direction(task, s) < 0))
    stuck = np.zeros((100, 2))
    # mode averaging: straight through the right lobe's middle, then back on the lower branch
    shortcut = reverse["pos"].copy()
    right = shortcut[:, 0] > 0
    shortcut[right, 1] = np.where(shortcut[right, 1] < 0, shortcut[right, 1] * 0.3, 0.0)
    rollouts = [
        rollout(0, forward["pos"], True),
        rollout(1, reverse["pos"], True),
        rollout(2, stuck, False),
        rollout(3, shortcut, True),
    ]
    summary = task.summarize(rollouts, tmp_path)
    assert summary["modes"] == ["forward", "reverse", "none", "none"]
    assert summary["forward_fraction"] == summary["reverse_fraction"] == summary["no_mode_fraction"] / 2
    assert summary["follow_max_distance"] == FOLLOW_MAX_DISTANCE
    assert distance_to_path(shortcut).mean() < 0.1  # a mean-distance criterion alone would not catch it
    assert (tmp_path / "rollouts.png").stat().st_size > 1000


def task_direction(task, seed):
    episode, _ = task.collect_episode(seed)
    return mode_side(episode["pos"])


def test_env_contract(task):
    env = task.make_env(render=True)
    obs, info = env.reset(seed=5)
    assert obs["pos"].dtype == np.float32 and np.linalg.norm(obs["pos"]) <= 0.1 + 1e-6
    assert info["is_success"] is False
    obs, reward, terminated, truncated, info = env.step(np.array([1.0, 1.0]))
    assert np.linalg.norm(obs["pos"] - 0) <= 0.1 + 0.12 + 1e-6  # speed-limited
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
    with pytest.raises(ValueError, match="non-finite action"):
        env.step(np.array([np.nan, 0.0]))
