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


class PendulumLikeEnv(gym.Env):
    """A plain Box observation (like Pendulum-v1's cos, sin, angular velocity): no dict, no goal."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-8.0, 8.0, (3,), np.float32)
        self.action_space = spaces.Box(-2.0, 2.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.th, self.t = self.np_random.uniform(-np.pi, np.pi), 0
        return self._obs(), {}

    def _obs(self):
        return np.array([np.cos(self.th), np.sin(self.th), 0.1 * self.th], np.float32)

    def step(self, action):
        self.th, self.t = self.th + 0.05 * float(action[0]), self.t + 1
        return self._obs(), 0.0, False, self.t >= LENGTH, {}


class CameraGoalEnv(GoalReachEnv):
    """GoalReachEnv with a camera part: a goal-style dict observation that also holds an image."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Dict(
            {**self.observation_space.spaces, "image": spaces.Box(0, 255, (8, 8, 3), np.uint8)}
        )

    def _obs(self) -> dict:
        return {**super()._obs(), "image": np.full((8, 8, 3), 10 * self.t, np.uint8)}


def write_minari(env: gym.Env, dataset_id: str, root) -> object:
    collector = minari.DataCollector(env)
    for seed in range(3):
        collector.reset(seed=seed)
        done = False
        while not done:
            _, _, term, trunc, _ = collector.step(env.action_space.sample())
            done = term or trunc
    with pytest.warns(UserWarning):
        collector.create_dataset(dataset_id=dataset_id, algorithm_name="random")
    return root / "minari" / dataset_id


def test_plain_box_observations_import_and_train_as_they_are(tmp_path, monkeypatch):
    """Pendulum-style data (a Box observation) works with the defaults: its one key is `obs`."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    folder = write_minari(PendulumLikeEnv(), "test/pendulum-v0", tmp_path)
    ds = read_dataset(folder)
    assert ds.shape_meta == {"obs": {"obs": {"shape": [3], "type": "low_dim"}}, "action": {"shape": [1]}}
    overrides = [*TINY, "task.name=", f"data.path={folder}", "train.num_steps=2", "eval.n_episodes=0"]
    policy, _, action = train_and_act("trajectory2d_lowdim_unet", overrides, tmp_path / "run")
    assert policy.shape_meta["obs"] == {"obs": {"shape": [3], "type": "low_dim"}}
    assert action.shape[-1] == 1


def test_dict_observations_keep_cameras_and_every_part_stays_selectable(tmp_path, monkeypatch):
    from diffpolicy.data.formats import open_training_data

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    folder = write_minari(CameraGoalEnv(), "test/camera-goal-v0", tmp_path)
    # goal-style parts are flattened into `state`; the camera stays an input of its own
    assert read_dataset(folder).shape_meta["obs"] == {
        "state": {"shape": [6], "type": "low_dim"},
        "image": {"shape": [3, 8, 8], "type": "rgb"},
    }
    # data.obs_keys may name any part the store keeps, flattened or not
    store, meta, _ = open_training_data(folder, tmp_path / "imports", obs_keys=["achieved_goal", "image"])
    assert meta["obs"] == {
        "achieved_goal": {"shape": [2], "type": "low_dim"},
        "image": {"shape": [3, 8, 8], "type": "rgb"},
    }
    assert {"achieved_goal", "observation", "desired_goal", "state", "image"} <= set(store.keys)


class PartsEnv(GoalReachEnv):
    """A dict observation that is not goal-style (no observation / desired_goal parts)."""

    def __init__(self) -> None:
        super().__init__()
        box = spaces.Box(-10.0, 10.0, (2,), np.float64)
        self.observation_space = spaces.Dict({"position": box, "velocity": box})

    def _obs(self) -> dict:
        return {"position": self.pos.copy(), "velocity": self.vel.copy()}


def test_dict_observations_without_goal_parts_keep_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    folder = write_minari(PartsEnv(), "test/parts-v0", tmp_path)
    assert read_dataset(folder).shape_meta["obs"] == {
        "position": {"shape": [2], "type": "low_dim"},
        "velocity": {"shape": [2], "type": "low_dim"},
    }
    # a flatten list the user names must exist
    with pytest.raises(FormatError, match=r"parts \['observation'\] to flatten are missing"):
        read_dataset(folder, flatten_obs=["observation", "position"])
    assert sorted(read_dataset(folder, flatten_obs=["position", "velocity"]).shape_meta["obs"]) == ["state"]


def test_empty_main_data_file_is_named(minari_folder):
    import h5py

    data = minari_folder / "data" / "main_data.hdf5"
    data.write_bytes(b"")
    with pytest.raises(FormatError, match=r"main_data.hdf5: the file is empty \(0 bytes\)") as err:
        read_dataset(minari_folder)
    assert str(data) in str(err.value)
    h5py.File(data, "w").close()  # a valid HDF5 file without a single episode
    with pytest.raises(FormatError, match=r"main_data.hdf5: holds no episodes") as err:
        read_dataset(minari_folder)
