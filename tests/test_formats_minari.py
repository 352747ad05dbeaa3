"""Minari import: a dataset written by minari's own DataCollector imports, flattens and trains."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY
from formats_helpers import train_and_act, tree_hash

from diffpolicy.data.formats import FormatError, detect_format, import_dataset, read_dataset

minari = pytest.importorskip("minari")
pytest.importorskip("jax")  # minari's DataCollector needs it (minari[create])
gym = pytest.importorskip("gymnasium")
spaces = gym.spaces

LENGTH = 20


class GoalReachEnv(gym.Env):
    """A PointMaze-like goal-reaching point with a Dict observation (observation, desired/achieved goal)."""

    def __init__(self) -> None:
        box = lambda n: spaces.Box(-10.0, 10.0, (n,), np.float64)  # noqa: E731
        self.observation_space = spaces.Dict(
            {"observation": box(4), "desired_goal": box(2), "achieved_goal": box(2)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _obs(self) -> dict:
        return {
            "observation": np.r_[self.pos, self.vel],
            "desired_goal": self.goal.copy(),
            "achieved_goal": self.pos.copy(),
        }

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.vel = self.np_random.uniform(-1, 1, 2), np.zeros(2)
        self.goal, self.t = self.np_random.uniform(-1, 1, 2), 0
        return self._obs(), {}

    def step(self, action):
        self.vel = 0.5 * self.vel + 0.1 * np.asarray(action, np.float64)
        self.pos, self.t = self.pos + self.vel, self.t + 1
        return self._obs(), -float(np.linalg.norm(self.pos - self.goal)), False, self.t >= LENGTH, {}


@pytest.fixture
def minari_folder(tmp_path, monkeypatch):
    """test/goal-v0 written by minari.DataCollector (4 episodes of 20 steps) into a temporary root."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = minari.DataCollector(GoalReachEnv())
    for seed in range(4):
        env.reset(seed=seed)
        done = False
        while not done:
            goal = env.unwrapped.goal - env.unwrapped.pos
            _, _, term, trunc, _ = env.step(np.clip(goal, -1, 1).astype(np.float32))
            done = term or trunc
    with pytest.warns(UserWarning):
        env.create_dataset(dataset_id="test/goal-v0", algorithm_name="scripted")
    return tmp_path / "minari" / "test" / "goal-v0"


def test_reads_and_flattens_like_seed_000(minari_folder, tmp_path):
    before = tree_hash(minari_folder)
    assert detect_format(minari_folder) == "minari"
    ds = read_dataset(minari_folder)
    assert ds.episode_lengths == [LENGTH] * 4
    assert ds.shape_meta == {"obs": {"state": {"shape": [6], "type": "low_dim"}}, "action": {"shape": [2]}}
    store = import_dataset(ds, tmp_path / "goal.zarr", progress=False)
    assert store.episode_ends.tolist() == [20, 40, 60, 80]
    ep = store.get_episode(1)
    np.testing.assert_array_equal(ep["state"], np.concatenate([ep["observation"], ep["desired_goal"]], 1))
    raw = next(minari.MinariDataset(minari_folder / "data").iterate_episodes(episode_indices=[1]))
    np.testing.assert_array_equal(ep["observation"], raw.observations["observation"][:-1])
    np.testing.assert_array_equal(ep["action"], raw.actions)
    # flatten=[] keeps the parts as separate inputs
    parts = read_dataset(minari_folder, flatten_obs=[]).shape_meta["obs"]
    assert sorted(parts) == ["achieved_goal", "desired_goal", "observation"]
    assert tree_hash(minari_folder) == before


def test_bad_input(minari_folder):
    with pytest.raises(FormatError, match="missing features") as err:
        read_dataset(minari_folder, flatten_obs=["observation", "goal"])
    assert "metadata.json" in str(err.value)
    data = minari_folder / "data" / "main_data.hdf5"
    data.write_bytes(data.read_bytes()[:2000])
    before = tree_hash(minari_folder)
    with pytest.raises(FormatError, match="corrupt") as err:
        read_dataset(minari_folder)
    assert str(data) in str(err.value)
    assert tree_hash(minari_folder) == before


def test_trains_from_minari_folder(minari_folder, tmp_path):
    overrides = [*TINY, "task.name=", f"data.path={minari_folder}", "train.num_steps=4", "eval.n_episodes=0"]
    policy, _, action = train_and_act("trajectory2d_lowdim_unet", overrides, tmp_path / "run")
    assert policy.shape_meta["obs"] == {"state": {"shape": [6], "type": "low_dim"}}
    assert action.shape[-1] == 2
