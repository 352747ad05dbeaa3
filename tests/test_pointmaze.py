"""PointMaze: the env runs headless with the task's observation dict, the BFS + PD expert solves mazes,
a tiny collect -> train -> eval cycle runs for state and image, and the expert writes a Minari dataset
that the Minari importer reads back."""

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics", reason="the pointmaze task needs the [pointmaze] extra")

from conftest import TASK_CYCLE, TASK_CYCLE_UNET  # noqa: E402

from diffpolicy.cli import main  # noqa: E402
from diffpolicy.data.episodes import EpisodeStore  # noqa: E402
from diffpolicy.tasks import make_task  # noqa: E402
from diffpolicy.tasks.pointmaze import cell_path  # noqa: E402

TINY = [
    *TASK_CYCLE,
    *TASK_CYCLE_UNET,
    "train.num_steps=6",
    "train.checkpoint_every=3",
    "eval.max_steps=20",
]


def test_cell_path_is_shortest_and_refuses_walled_goals():
    maze = [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 0, 1, 1, 1],
    ]
    assert cell_path(maze, (1, 1), (4, 1)) == [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (4, 1)]
    assert cell_path(maze, (3, 3), (3, 3)) == [(3, 3)]
    with pytest.raises(ValueError, match="no path"):
        cell_path([[0, 1, 0]], (0, 0), (0, 2))


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_env_matches_shape_meta_headless(obs_type):
    task = make_task("pointmaze", obs_type=obs_type, image_size=64)
    env = task.make_env(render=True)
    obs, info = env.reset(seed=3)
    meta = task.shape_meta()
    assert set(obs) == set(meta["obs"]) and info["is_success"] is False
    for key, spec in meta["obs"].items():
        shape = obs[key].shape if spec["type"] == "low_dim" else obs[key].transpose(2, 0, 1).shape
        assert list(shape) == spec["shape"], key
    if obs_type == "image":
        assert obs["image"].dtype == np.uint8 and obs["image"].std() > 5  # a real render, not a blank frame
    frame = env.render()
    assert frame.shape == ((64, 64, 3) if obs_type == "image" else (256, 256, 3))
    obs, _, _, _, info = env.step(np.zeros(2))
    assert "is_success" in info
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.nan, 0.0]))
    env.close()


@pytest.mark.parametrize("maze", ["medium", "large"])
def test_expert_reaches_goal(maze):
    task = make_task("pointmaze", maze=maze)
    for seed in (11, 12):
        data, ok = task.collect_episode(seed)
        assert ok, f"expert failed on {maze} seed {seed}"
        n = len(data["action"])
        assert data["observation"].shape == (n, 4) and data["desired_goal"].shape == (n, 2)
        assert np.abs(data["action"]).max() <= 1.0
        final = data["observation"][-1, :2]
        assert np.linalg.norm(final - data["desired_goal"][-1]) < 1.0


def test_unknown_maze_is_named():
    with pytest.raises(ValueError, match="unknown maze 'huge'"):
        make_task("pointmaze", maze="huge")


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("pointmaze_state_unet_cpu", []),
        (
            "pointmaze_image_unet_cpu",
            [
                "task.kwargs.image_size=48",
                "policy.vision.crop_shape=[44,44]",
                "policy.vision.cnn_channels=[8,8]",
                "policy.vision.cnn_strides=[2,2]",
                "policy.vision.num_keypoints=4",
                "policy.vision.feature_dim=8",
            ],
        ),
    ],
)
def test_collect_train_eval(tmp_path, preset, extra):
    data = tmp_path / "demos.zarr"
    collect = ["collect", "--preset", preset, "--episodes", "2", "--workers", "1", "--out", str(data)]
    assert main(collect + extra[:1]) == 0
    store = EpisodeStore.open(data)
    assert store.n_episodes == 2 and "action" in store.keys
    run = tmp_path / "run"
    train = ["train", "--preset", preset, "--run-dir", str(run), f"data.path={data}", "data.val_ratio=0"]
    assert main(train + TINY + extra) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["task"] == "pointmaze" and report["n_episodes"] == 2
    assert report["temporal_ensemble"] is True
    assert {"far_success_rate", "mean_steps_to_goal", "plot"} <= set(report["task_metrics"])
    assert any(v.endswith(".mp4") for v in report["videos"])


def test_expert_writes_a_minari_dataset_the_importer_reads(tmp_path):
    pytest.importorskip("jax", reason="minari's DataCollector needs minari[create]")
    from diffpolicy.data.formats import read_dataset
    from diffpolicy.tasks.pointmaze import write_minari

    out = write_minari(tmp_path / "pm_minari", n_episodes=3, seed=5)
    with pytest.raises(FileExistsError):
        write_minari(out, n_episodes=1)
    dataset = read_dataset(out, "minari")
    assert dataset.shape_meta["obs"] == {"state": {"shape": [6], "type": "low_dim"}}
    assert dataset.shape_meta["action"] == {"shape": [2]}
    episodes = list(dataset.episodes())
    assert len(episodes) == 3
    for ep in episodes:
        assert ep["state"].shape == (len(ep["action"]), 6)
        np.testing.assert_allclose(ep["state"][:, 4:], ep["desired_goal"])
