"""Collection mixes (groups of episodes with their own task kwargs) and `collect --format lerobot`: seeds,
per-episode records, `dataset info`, and the LeRobot dataset read back for training (two cameras)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import TINY
from toy_grasp import SIDE, TOP, ToyGraspTask, camera

import diffpolicy.collect as collect_module
from diffpolicy.cli import main
from diffpolicy.config import ConfigError, collect_counts, load_config
from diffpolicy.data.formats import describe, import_dataset, read_dataset

pytest.importorskip("pyarrow")
pytest.importorskip("av")

# The user's recording plan (seed 003): 50 episodes with one object, 50 with two, 100 with three.
USER_MIX = [
    {"n_episodes": 50, "task_kwargs": {"n_objects": 1}},
    {"n_episodes": 50, "task_kwargs": {"n_objects": 2}},
    {"n_episodes": 100, "task_kwargs": {"n_objects": 3}},
]
SMALL_MIX = [
    {"n_episodes": 2, "task_kwargs": {"n_objects": 1}},
    {"n_episodes": 1, "task_kwargs": {"n_objects": 2}},
    {"n_episodes": 2, "task_kwargs": {"n_objects": 3}, "description": "stack all three"},
]


@pytest.fixture
def toy(monkeypatch):
    """`make_task("toy_grasp", ...)` inside collect builds the test's ToyGraspTask."""
    real = collect_module.make_task

    def make(name, **kwargs):
        return ToyGraspTask(**kwargs) if name == "toy_grasp" else real(name, **kwargs)

    monkeypatch.setattr(collect_module, "make_task", make)


def preset(tmp_path, mix, **collect):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"task": {"name": "toy_grasp"}, "collect": {"mix": mix, **collect}}))
    return path


def test_mix_counts_scale_to_episodes_and_bad_mixes_are_refused(tmp_path):
    p = preset(tmp_path, USER_MIX)
    assert collect_counts(load_config(p).collect) == [50, 50, 100]
    assert collect_counts(load_config(p, ["collect.n_episodes=20"]).collect) == [5, 5, 10]
    assert collect_counts(load_config(p, ["collect.n_episodes=7"]).collect) == [2, 2, 3]  # sums to 7
    assert collect_counts(load_config(None, []).collect) == [200]  # no mix: the old default
    with pytest.raises(ConfigError, match="cannot keep the 3 groups"):
        load_config(p, ["collect.n_episodes=2"])
    with pytest.raises(ConfigError, match=r"collect.mix\[0\] and collect.mix\[2\] have the same task_kwargs"):
        load_config(preset(tmp_path, [*USER_MIX[:2], {"n_episodes": 3, "task_kwargs": {"n_objects": 1}}]))
    with pytest.raises(ConfigError, match=r"collect.mix\[1\].n_episodes=0 must be >= 1"):
        load_config(preset(tmp_path, [USER_MIX[0], {"n_episodes": 0, "task_kwargs": {"n_objects": 2}}]))
    with pytest.raises(ConfigError, match="collect.format='hdf5' is not one of"):
        load_config(p, ["collect.format=hdf5"])


def test_kwargs_the_task_refuses_name_the_group_before_any_episode(tmp_path, toy):
    cfg = load_config(preset(tmp_path, [USER_MIX[0], {"n_episodes": 1, "task_kwargs": {"n_objects": 4}}]))
    with pytest.raises(ConfigError, match=r"collect.mix\[1\].task_kwargs \{'n_objects': 4\}: n_objects=4"):
        collect_module.collect(cfg, tmp_path / "out.zarr", progress=False)
    cfg = load_config(preset(tmp_path, [USER_MIX[0], {"n_episodes": 1, "task_kwargs": {"colour": "red"}}]))
    with pytest.raises(ConfigError, match=r"collect.mix\[1\].task_kwargs.*refuses them"):
        collect_module.collect(cfg, tmp_path / "out2.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out2.zarr").exists()


def test_groups_run_on_disjoint_seeds_with_their_kwargs_recorded(tmp_path, toy):
    # the expert fails on every third seed: failed seeds are replaced, and never reused by the next group
    cfg = load_config(preset(tmp_path, SMALL_MIX), ["task.kwargs={fail_every: 3}", "collect.seed=1"])
    store = collect_module.collect(cfg, tmp_path / "mix.zarr", progress=False)
    records = store.attrs["episodes"]
    assert [r["group"] for r in records] == [0, 0, 1, 2, 2]
    assert [r["task_kwargs"]["n_objects"] for r in records] == [1, 1, 2, 3, 3]
    assert all(r["task_kwargs"]["fail_every"] == 3 for r in records)  # task.kwargs under the group's
    # seeds 1, 2 (group 0); 3 fails, 4 (group 1); 5, 6 fails, 7 (group 2)
    assert [r["seed"] for r in records] == store.attrs["seeds"] == [1, 2, 4, 5, 7]
    assert [g["seed_range"] for g in store.attrs["mix"]] == [[1, 2], [3, 4], [5, 7]]
    assert [g["n_failed"] for g in store.attrs["mix"]] == [0, 1, 1]
    assert store.attrs["n_failed"] == 2
    # each group's kwargs reached its task: n objects -> 10 + 8 n steps
    assert store.episode_lengths.tolist() == [18, 18, 26, 34, 34]
    assert [r["task"] for r in records][1:4] == [
        "grasp 1 object and place them in the container",
        "grasp 2 objects and place them in the container",
        "stack all three",
    ]
    assert store.attrs["fps"] == 30.0


def test_collect_writes_lerobot_v3_with_the_mix_and_dataset_info_shows_it(tmp_path, toy, capsys):
    out = tmp_path / "koch_grasp"
    argv = ["collect", "--preset", str(preset(tmp_path, SMALL_MIX)), "--format", "lerobot", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "wrote 5 episodes (130 frames, 30 fps)" in printed and "group 2 (n_objects=3): 2 episodes" in printed
    )
    assert main(argv) == 2  # never over an existing dataset
    assert "already exists" in capsys.readouterr().err

    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 30 and info["robot_type"] == "toy_arm"
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert sorted(p.parent.parent.name for p in out.glob("videos/*/chunk-*/*.mp4")) == [
        "observation.images.side",
        "observation.images.top",
    ]
    ds = describe(out)
    assert ds["fps"] == 30.0 and ds["n_episodes"] == 5
    assert ds["tasks"] == [
        "grasp 1 object and place them in the container",
        "grasp 2 objects and place them in the container",
        "stack all three",
    ]
    assert [(g["task_kwargs"], g["n_episodes"], g["frames"]) for g in ds["mix"]] == [
        ({"n_objects": 1}, 2, 36),
        ({"n_objects": 2}, 1, 26),
        ({"n_objects": 3}, 2, 68),
    ]
    assert main(["dataset", "info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "fps 30.0" in shown and "mix (3 groups):" in shown
    assert "group 1 (n_objects=2): 1 episodes, 26 frames, mean 0.9 s, seeds 2..2" in shown

    # `--episodes N` scales the mix: 3 episodes keep one per group
    assert main([*argv[:-1], str(tmp_path / "scaled"), "--episodes", "3"]) == 0
    assert [g["n_episodes"] for g in describe(tmp_path / "scaled")["mix"]] == [1, 1, 1]


def test_lerobot_dataset_reads_back_frame_exact_and_trains_two_cameras(tmp_path, toy):
    """collect -> LeRobot v3 -> the import training uses: every frame where it was recorded (low-dim
    values bit-exact, each camera frame closest to its own step's and within the codec's error), the
    per-episode records and seeds kept; then a two-camera policy trains from the folder, resizing
    before cropping, with a frame stride."""
    cfg = load_config(preset(tmp_path, SMALL_MIX))
    folder = collect_module.collect_lerobot(cfg, tmp_path / "lerobot", progress=False)
    back = import_dataset(read_dataset(folder), tmp_path / "back.zarr", progress=False)
    direct = collect_module.collect(cfg, tmp_path / "direct.zarr", progress=False)
    assert back.episode_lengths.tolist() == direct.episode_lengths.tolist() == [18, 18, 26, 34, 34]
    for key in ("state", "action"):
        np.testing.assert_array_equal(back[key][:], direct[key][:], err_msg=key)
    for key, size, offset in (("top", TOP, 20), ("side", SIDE, 15)):
        frames = back[key][:].astype(np.int16)
        assert frames.shape == direct[key].shape
        assert np.abs(frames - direct[key][:]).mean() <= 3.0, key
        for i in range(back.n_episodes):
            part = frames[back.episode_slice(i)]
            for t, frame in enumerate(part):  # the right step: its own is much closer than any other's
                errors = [np.abs(frame - camera(s, size, offset)).mean() for s in range(len(part))]
                assert int(np.argmin(errors)) == t, (key, i, t)
    assert back.attrs["seeds"] == direct.attrs["seeds"] == [0, 1, 2, 3, 4]
    assert [r["group"] for r in back.attrs["episodes"]] == [0, 0, 1, 2, 2]
    assert back.attrs["episodes"][3]["task"] == "stack all three"

    from formats_helpers import train_and_act

    overrides = [
        *TINY,
        "task.name=",
        f"data.path={folder}",
        "data.frame_stride=3",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        "policy.vision.backbone=compact",
        "policy.vision.resize_shape=[12,16]",  # both cameras to 12x16 first, then the 10x14 crop
        "policy.vision.crop_shape=[10,14]",
        "train.batch_size=4",
        "train.num_steps=2",
        "train.val_every=2",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "eval.n_episodes=0",
    ]
    policy, saved, action = train_and_act("pusht_image_unet_cpu", overrides, tmp_path / "run")
    assert sorted(policy.shape_meta["obs"]) == ["side", "state", "top"]
    assert policy.shape_meta["obs"]["top"]["shape"] == [3, *TOP] and action.shape == (1, 4, 2)
    assert saved.data.frame_stride == 3 and policy.frame_stride == 3


def test_lerobot_output_needs_the_tasks_control_rate_and_checks_before_collecting(tmp_path, monkeypatch):
    class NoRate(ToyGraspTask):
        fps = None

    calls = []

    def make(name, **kwargs):
        calls.append(kwargs)
        return NoRate(**kwargs)

    monkeypatch.setattr(collect_module, "make_task", make)
    cfg = load_config(preset(tmp_path, SMALL_MIX))
    with pytest.raises(ConfigError, match=r"declares no control rate \(Task.fps\)"):
        collect_module.collect_lerobot(cfg, tmp_path / "out", progress=False)
    assert calls == [{"n_objects": 1}] and not (tmp_path / "out").exists()  # refused before any episode
