"""LeRobot v3.0 writer and v3.0 / v2.1 reader: round trips, layout, bad input, training from a folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from formats_helpers import BRIEF_IMAGE_TRAINING, lerobot_v3_to_v21, tiny_store, train_and_act, tree_hash

from diffpolicy.cli import main
from diffpolicy.config import load_config
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.formats import (
    FormatError,
    detect_format,
    import_dataset,
    open_training_data,
    read_dataset,
)
from diffpolicy.data.formats.lerobot import feature_to_key, key_to_feature, write_lerobot
from diffpolicy.training.trainer import Trainer

pytest.importorskip("pyarrow")
pytest.importorskip("av")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# Video round trip through libx264 (yuv420p, CRF 18) on the smooth 16x16 test images: measured mean
# absolute error ~1.3 uint8 levels (max 5); asserted with some margin.
VIDEO_MEAN_ABS_TOL = 3.0


@pytest.fixture
def store(tmp_path):
    return tiny_store(tmp_path / "store.zarr")


@pytest.fixture
def folder(store, tmp_path):
    return write_lerobot(store, tmp_path / "src" / "koch", fps=30, task="pick the cube", progress=False)


def assert_same_store(a: EpisodeStore, b: EpisodeStore) -> None:
    assert a.episode_ends.tolist() == b.episode_ends.tolist()
    assert a.keys == b.keys
    for key in a.keys:
        x, y = a[key][:], b[key][:]
        assert x.shape == y.shape and x.dtype == y.dtype, key
        if x.dtype == np.uint8:
            assert np.abs(x.astype(np.int16) - y).mean() <= VIDEO_MEAN_ABS_TOL, key
        else:
            np.testing.assert_array_equal(x, y, err_msg=key)  # bit-exact


def test_key_mapping():
    for name, key in [
        ("observation.images.laptop", "laptop"),
        ("observation.image", "image"),
        ("observation.state", "state"),
        ("observation.environment_state", "environment_state"),
        ("action", "action"),
        ("next.reward", "reward"),  # LeRobot's reward after the frame's action: our tasks' `reward`
        ("next.done", "next_done"),
    ]:
        assert feature_to_key(name) == key
    assert key_to_feature("laptop", True) == "observation.images.laptop"
    assert key_to_feature("image", True) == "observation.image"
    assert key_to_feature("state", False) == "observation.state"
    assert key_to_feature("reward", False) == "next.reward"  # not observation.reward: no policy input


def test_reward_is_written_as_next_reward_and_read_back_as_no_observation(tmp_path):
    direct = EpisodeStore.create(tmp_path / "with_reward.zarr")  # a per-step reward, as collect stores it
    rng = np.random.default_rng(0)
    for n in (12, 9):
        direct.add_episode(
            {
                "state": rng.normal(size=(n, 3)).astype(np.float32),
                "action": rng.normal(size=(n, 2)).astype(np.float32),
                "reward": rng.integers(0, 3, (n, 1)).astype(np.float32),
            }
        )
    direct.attrs.update({"fps": 30})
    folder = write_lerobot(direct, tmp_path / "lerobot", progress=False)
    features = json.loads((folder / "meta" / "info.json").read_text())["features"]
    assert features["next.reward"] == {"dtype": "float32", "shape": [1], "names": None}
    assert not any(name.startswith("observation.") and "reward" in name for name in features)
    dataset = read_dataset(folder)
    assert set(dataset.shape_meta["obs"]) == {"state"}  # the reward is no policy input
    back = import_dataset(dataset, tmp_path / "back.zarr", progress=False)
    assert_same_store(direct, back)  # `reward` again, bit-exact


def test_store_to_v3_to_store_round_trip(store, folder, tmp_path):
    before = tree_hash(store.path)
    assert detect_format(folder) == "lerobot"
    info = json.loads((folder / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 30 and info["total_episodes"] == 3
    assert info["total_frames"] == 44 and info["splits"] == {"train": "0:3"}
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    assert (folder / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4").is_file()
    episodes = pq.read_table(folder / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == [15, 12, 17]
    assert [e["dataset_from_index"] for e in episodes] == [0, 15, 27]
    assert episodes[1]["videos/observation.images.top/from_timestamp"] == pytest.approx(15 / 30)
    assert episodes[0]["tasks"] == ["pick the cube"]
    tasks = pq.read_table(folder / "meta" / "tasks.parquet")
    assert tasks.column("task").to_pylist() == ["pick the cube"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((folder / "meta" / "stats.json").read_text())
    assert set(stats["action"]) >= {"min", "max", "mean", "std", "count"}
    assert np.asarray(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)

    ds = read_dataset(folder)
    assert ds.fps == 30 and ds.episode_lengths == [15, 12, 17]
    assert ds.shape_meta == {
        "obs": {
            "environment_state": {"shape": [3], "type": "low_dim"},
            "state": {"shape": [4], "type": "low_dim"},
            "top": {"shape": [3, 16, 16], "type": "rgb"},
            "wrist": {"shape": [3, 16, 16], "type": "rgb"},
        },
        "action": {"shape": [2]},
    }
    back = import_dataset(ds, tmp_path / "back.zarr", progress=False)
    assert_same_store(store, back)
    assert tree_hash(store.path) == before

    # LeRobot -> store -> LeRobot keeps every feature name and every low-dim value
    again = write_lerobot(back, tmp_path / "again", progress=False)
    info2 = json.loads((again / "meta" / "info.json").read_text())
    assert info2["features"].keys() == info["features"].keys() and info2["fps"] == 30
    a = pq.read_table(folder / "data" / "chunk-000" / "file-000.parquet")
    b = pq.read_table(again / "data" / "chunk-000" / "file-000.parquet")
    assert a.equals(b)


def test_v21_reads_like_v3(folder, tmp_path):
    v21 = lerobot_v3_to_v21(folder, tmp_path / "v21")
    a = import_dataset(read_dataset(folder), tmp_path / "a.zarr", progress=False)
    b = import_dataset(read_dataset(v21), tmp_path / "b.zarr", progress=False)
    assert read_dataset(v21).format == "lerobot v2.1"
    assert read_dataset(v21).attrs["tasks"] == ["push"]  # meta/tasks.jsonl
    assert_same_store(a, b)


def test_writer_never_overwrites(store, folder):
    with pytest.raises(FileExistsError):
        write_lerobot(store, folder, progress=False)


def _edit_info(folder, fn):
    path = folder / "meta" / "info.json"
    info = json.loads(path.read_text())
    fn(info)
    path.write_text(json.dumps(info))


def _edit_parquet(path, fn):
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_action(table):
    action = table.column("action").combine_chunks()
    values = action.flatten().to_numpy().copy()
    values[7] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), 2)
    return table.set_column(table.column_names.index("action"), "action", column)


def _longer(table):
    lengths = table.column("length").to_numpy().copy()
    lengths[1] += 1
    return table.set_column(table.column_names.index("length"), "length", pa.array(lengths))


DATA = ("data", "chunk-000", "file-000.parquet")
VIDEO = ("videos", "observation.images.top", "chunk-000", "file-000.mp4")
EPISODES = ("meta", "episodes", "chunk-000", "file-000.parquet")


@pytest.mark.parametrize(
    "where, edit, problem",
    [
        (
            ("meta", "info.json"),
            lambda f: _edit_info(f, lambda i: i["features"].pop("action")),
            "missing feature",
        ),
        (
            ("meta", "info.json"),
            lambda f: _edit_info(
                f, lambda i: i["features"]["observation.images.top"]["info"].update({"video.codec": "nosuch"})
            ),
            "unsupported codec",
        ),
        (EPISODES, lambda f: _edit_parquet(f.joinpath(*EPISODES), _longer), "mismatched lengths"),
        (DATA, lambda f: _truncate(f.joinpath(*DATA)), "corrupt"),
        (VIDEO, lambda f: _truncate(f.joinpath(*VIDEO)), "mp4"),
        (DATA, lambda f: _edit_parquet(f.joinpath(*DATA), _nan_action), "NaN"),
    ],
    ids=["missing-feature", "codec", "lengths", "corrupt-parquet", "corrupt-mp4", "nan-action"],
)
def test_bad_input_names_file_and_problem(folder, tmp_path, where, edit, problem):
    edit(folder)
    before = tree_hash(folder)
    with pytest.raises(FormatError) as err:
        import_dataset(read_dataset(folder), tmp_path / "out.zarr", progress=False)
    message = str(err.value)
    assert problem in message, message
    # the episodes file is where the mismatch is declared; the data file is where it shows
    assert str(folder.joinpath(*where)) in message or str(folder.joinpath(*DATA)) in message, message
    assert not (tmp_path / "out.zarr").exists()
    assert tree_hash(folder) == before


def test_short_episodes_follow_one_rule_for_every_format(store, folder, tmp_path):
    """Episodes shorter than the horizon meet the same rule (data.short_episodes, in SequenceDataset) from a
    LeRobot folder as from the EpisodeStore it was written from; the import refuses nothing."""
    from diffpolicy.data.sequence import SequenceDataset

    imported, _, note = open_training_data(folder, tmp_path / "imports")
    assert "imported 3 episodes" in note
    kwargs = dict(
        shape_meta={"obs": {"state": {"shape": [4]}}, "action": {"shape": [2]}},
        horizon=16,
        n_obs_steps=2,
        n_action_steps=8,
    )
    for source in (store, imported):
        with pytest.raises(
            ValueError,
            match=r"2 of the 3 episode\(s\) used are shorter than policy.horizon=16: 0 \(15 steps\), 1 \(12",
        ):
            SequenceDataset(source, short_episodes="error", **kwargs)
        assert SequenceDataset(source, short_episodes="skip", **kwargs).episode_ids.tolist() == [2]
    padded = [SequenceDataset(source, **kwargs) for source in (store, imported)]
    assert [padded[0].sample_location(i) for i in range(len(padded[0]))] == [
        padded[1].sample_location(i) for i in range(len(padded[1]))
    ]
    # the import is reused while the source is unchanged
    store2, shape_meta, note = open_training_data(folder, tmp_path / "imports")
    assert "reusing the import" in note and store2.n_episodes == 3
    assert sorted(shape_meta["obs"]) == ["environment_state", "state", "top", "wrist"]
    (folder / "meta" / "stats.json").write_text("{}")  # an edited source is imported again
    _, _, note = open_training_data(folder, tmp_path / "imports")
    assert "imported 3 episodes" in note


def test_two_camera_policy_trains_from_lerobot_folder(folder, tmp_path, capsys):
    before = tree_hash(folder)
    overrides = [*TINY, *BRIEF_IMAGE_TRAINING, "task.name=", f"data.path={folder}", "policy.horizon=8"]
    overrides.append("policy.n_action_steps=4")
    policy, _, action = train_and_act("pusht_image_unet_cpu", overrides, tmp_path / "run")
    assert sorted(policy.shape_meta["obs"]) == ["environment_state", "state", "top", "wrist"]
    assert action.shape == (1, 4, 2)
    assert tree_hash(folder) == before
    # no task, no simulator: `diffpolicy eval` says so instead of failing on an unknown task
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "latest")]) == 2
    assert "without a task" in capsys.readouterr().err


def _pusht_like_store(path):
    """Push-T state demonstrations' keys and dtypes: keypoint (9, 2), agent_pos, state, action, n_contacts."""
    rng = np.random.default_rng(3)
    store = EpisodeStore.create(path)
    for n in (40, 33, 47, 36):
        walk = np.cumsum(rng.normal(size=(n, 2)), 0).astype(np.float32) + 256
        store.add_episode(
            {
                "keypoint": (rng.normal(size=(n, 9, 2)) * 50 + 256).astype(np.float32),
                "agent_pos": walk,
                "state": rng.normal(size=(n, 5)).astype(np.float32),
                "action": walk + rng.normal(size=(n, 2)).astype(np.float32),
                "n_contacts": rng.integers(0, 3, (n, 1)).astype(np.float32),
            }
        )
    store.attrs.update({"task": "pusht", "fps": 10})
    return store


def test_pusht_state_round_trip_trains_identically(tmp_path):
    """Push-T-like data through LeRobot v3 and back: bit-identical, and it trains to the same losses."""
    direct = _pusht_like_store(tmp_path / "pusht.zarr")
    folder = write_lerobot(direct, tmp_path / "pusht_lerobot", progress=False)
    info = json.loads((folder / "meta" / "info.json").read_text())
    assert info["features"]["observation.keypoint"]["shape"] == [9, 2] and info["fps"] == 10
    data = pq.read_table(folder / "data" / "chunk-000" / "file-000.parquet")
    assert data.schema.field("observation.n_contacts").type == pa.float32()  # shape [1]: a scalar column
    back = import_dataset(read_dataset(folder), tmp_path / "back.zarr", progress=False)
    assert_same_store(direct, back)

    losses = []
    for name, path in (("direct", direct.path), ("lerobot", folder)):
        cfg = load_config(
            "pusht_state_transformer_cpu",
            [
                *TINY,
                "task.name=",
                f"data.path={path}",
                "data.obs_keys=[keypoint,agent_pos]",
                "train.num_steps=20",
                "train.log_every=1",
                "train.val_every=20",
                "train.checkpoint_every=20",
                "eval.n_episodes=0",
            ],
        )
        Trainer(cfg, tmp_path / name, show_progress=False).fit()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["train/loss"] for line in lines if "train/loss" in line])
    assert len(losses[0]) == 20 and losses[0] == losses[1]


def test_several_data_and_video_files(store, tmp_path, monkeypatch):
    """Episodes spread over several files (timestamps restart in each mp4) read back like one file."""
    import diffpolicy.data.formats.lerobot as lerobot

    monkeypatch.setattr(lerobot, "DATA_FILE_MB", 30 * 1572 / 2**20)  # 30 frames of this store per file
    folder = write_lerobot(store, tmp_path / "multi", fps=30, progress=False)
    episodes = pq.read_table(folder.joinpath(*EPISODES)).to_pylist()
    assert [e["data/file_index"] for e in episodes] == [0, 0, 1]
    assert [e["videos/observation.images.top/from_timestamp"] for e in episodes] == [0.0, 0.5, 0.0]
    assert (folder / "videos" / "observation.images.top" / "chunk-000" / "file-001.mp4").is_file()
    assert_same_store(store, import_dataset(read_dataset(folder), tmp_path / "back.zarr", progress=False))


def test_image_features_stored_in_parquet(store, tmp_path):
    """dtype 'image' features (PNG bytes in the parquet rows, no mp4) are decoded with Pillow."""
    import io

    from PIL import Image

    folder = write_lerobot(store, tmp_path / "img", fps=30, progress=False)
    data_path = folder.joinpath(*DATA)
    table = pq.read_table(data_path)
    for key in ("top", "wrist"):
        cells = []
        for frame in store[key][:]:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": None})
        table = table.append_column(f"observation.images.{key}", pa.array(cells))

    def to_images(info):
        for key in ("top", "wrist"):
            ft = info["features"][f"observation.images.{key}"]
            ft["dtype"] = "image"
            ft.pop("info")
        info["video_path"] = None

    pq.write_table(table, data_path)
    _edit_info(folder, to_images)
    back = import_dataset(read_dataset(folder), tmp_path / "back.zarr", progress=False)
    np.testing.assert_array_equal(back["top"][:], store["top"][:])  # PNG is lossless
    np.testing.assert_array_equal(back["state"][:], store["state"][:])


def test_cameras_resized_once_at_import(folder, store, tmp_path):
    imported, shape_meta, _ = open_training_data(folder, tmp_path / "imports", image_size=[8, 12])
    assert shape_meta["obs"]["top"] == {"shape": [3, 8, 12], "type": "rgb"}
    assert imported["top"].shape == (44, 8, 12, 3) and imported.attrs["image_size"] == [8, 12]
    np.testing.assert_array_equal(imported["state"][:], store["state"][:])
    mean_before = store["wrist"][:].reshape(44, -1, 3).mean(1)
    assert np.abs(imported["wrist"][:].reshape(44, -1, 3).mean(1) - mean_before).max() < 3
    # another size is another import; the same size reuses it
    other, _, note = open_training_data(folder, tmp_path / "imports", image_size=[16, 16])
    assert other.path != imported.path and "imported" in note
    _, _, note = open_training_data(folder, tmp_path / "imports", image_size=[8, 12])
    assert "reusing the import" in note


# ------------------------------------------------------------------------------------ LeRobot's own rules
QUANTILES = ("q01", "q10", "q50", "q90", "q99")  # the quantiles lerobot 0.6 writes for every feature
FIXTURE = Path(__file__).parent / "data" / "lerobot_v30_tiny"  # written by lerobot 0.6.1 itself


def test_stats_keep_the_features_last_axis_as_lerobot_does(tmp_path):
    """LeRobot reduces a feature's stats over every axis but the last (its get_feature_stats feeds
    RunningQuantileStats (-1, D) rows): Push-T's (9, 2) keypoints get (2,) stats, not (18,), or
    `lerobot-train` fails on "size of tensor a (2) must match ... (18)". Images get (3, 1, 1) in [0, 1]."""
    store = _pusht_like_store(tmp_path / "pusht.zarr")
    folder = write_lerobot(store, tmp_path / "pusht_lerobot", progress=False)
    stats = json.loads((folder / "meta" / "stats.json").read_text())
    keypoint = stats["observation.keypoint"]
    assert np.shape(keypoint["mean"]) == (2,)
    assert set(keypoint) == {"min", "max", "mean", "std", "count", *QUANTILES}
    rows = store["keypoint"][:].reshape(-1, 2).astype(np.float64)
    for name in ("min", "max", "mean", "std"):
        np.testing.assert_allclose(keypoint[name], getattr(rows, name)(0), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(keypoint["q50"], np.median(rows, 0), rtol=1e-6)
    assert keypoint["count"] == [store.n_steps]  # frames, not frames x 9
    assert np.shape(stats["observation.n_contacts"]["mean"]) == (1,)
    assert np.shape(stats["action"]["q99"]) == (2,)
    episodes = pq.read_table(folder.joinpath(*EPISODES)).to_pylist()
    first = store["keypoint"][: episodes[0]["length"]].reshape(-1, 2)
    np.testing.assert_allclose(episodes[0]["stats/observation.keypoint/mean"], first.mean(0), rtol=1e-6)
    assert episodes[0]["stats/observation.keypoint/count"] == [episodes[0]["length"]]

    cameras = write_lerobot(tiny_store(tmp_path / "cams.zarr"), tmp_path / "cams", fps=30, progress=False)
    top = json.loads((cameras / "meta" / "stats.json").read_text())["observation.images.top"]
    assert set(top) == {"min", "max", "mean", "std", "count", *QUANTILES}
    assert all(np.shape(top[k]) == (3, 1, 1) for k in top if k != "count")
    assert 0 <= np.min(top["q01"]) <= np.max(top["q99"]) <= 1


def test_reads_a_dataset_written_by_lerobot(tmp_path, capsys):
    """A folder written by lerobot 0.6.1 itself (scripts/make_lerobot_fixture.py: its default AV1 codec,
    (9, 2) keypoints, three tasks): the import equals what LeRobot's own loader returned, frame for frame
    (measured: every pixel identical; AV1 decoding is bit-exact by specification)."""
    expected = np.load(FIXTURE.with_suffix(".npz"))
    assert str(expected["video_codec"]) == "av1"
    before = tree_hash(FIXTURE)
    store = import_dataset(read_dataset(FIXTURE), tmp_path / "tiny.zarr", progress=False)
    assert store.episode_lengths.tolist() == [12, 9, 14]
    np.testing.assert_array_equal(store["top"][:], expected["observation_images_top"])
    for key in ("state", "environment_state"):
        np.testing.assert_array_equal(store[key][:], expected[f"observation_{key}"])
    np.testing.assert_array_equal(store["action"][:], expected["action"])
    np.testing.assert_array_equal(store["reward"][:, 0], expected["next_reward"])
    tasks = store.attrs["source"]["tasks"]
    assert [tasks[i] for i in store["task_index"][:]] == expected["task"].tolist()
    assert main(["dataset", "info", str(FIXTURE)]) == 0
    assert (
        "tasks (3): 'push the T into the target'; 'reach the goal'; 'hold still'" in capsys.readouterr().out
    )
    assert tree_hash(FIXTURE) == before


def _tasks(folder: Path) -> dict[int, str]:
    table = pq.read_table(folder / "meta" / "tasks.parquet").to_pylist()
    return {row["task_index"]: row["task"] for row in table}


def test_lerobot_round_trip_keeps_tasks_and_lerobots_stats_layout(tmp_path):
    """LeRobot (written by lerobot) -> EpisodeStore -> LeRobot: the tasks table, every frame's task and
    every episode's task list survive; stats.json and the per-episode stats have LeRobot's own features,
    stat names and shapes, and the low-dim values LeRobot computed."""
    store = import_dataset(read_dataset(FIXTURE), tmp_path / "tiny.zarr", progress=False)
    again = write_lerobot(store, tmp_path / "again", progress=False)
    assert _tasks(again) == _tasks(FIXTURE) and len(_tasks(FIXTURE)) == 3
    info = json.loads((again / "meta" / "info.json").read_text())
    assert info["total_tasks"] == 3 and "observation.task_index" not in info["features"]
    column = "task_index"
    data = [pq.read_table(f.joinpath(*DATA), columns=[column]).column(column) for f in (FIXTURE, again)]
    assert data[0].to_pylist() == data[1].to_pylist() and len(set(data[0].to_pylist())) == 3
    episodes = [pq.read_table(f.joinpath(*EPISODES)).to_pylist() for f in (FIXTURE, again)]
    assert [sorted(e["tasks"]) for e in episodes[0]] == [sorted(e["tasks"]) for e in episodes[1]]

    theirs = json.loads((FIXTURE / "meta" / "stats.json").read_text())
    ours = json.loads((again / "meta" / "stats.json").read_text())
    assert ours.keys() == theirs.keys()
    for feature, values in theirs.items():
        assert ours[feature].keys() == values.keys(), feature
        for stat, value in values.items():
            assert np.shape(ours[feature][stat]) == np.shape(value), (feature, stat)
            assert np.shape(episodes[1][0][f"stats/{feature}/{stat}"]) == np.shape(value), (feature, stat)
        if info["features"][feature]["dtype"] != "video":  # lerobot's image stats are of the frames
            for stat in ("min", "max", "mean", "std", "count"):  # before encoding; ours of decoded ones
                np.testing.assert_allclose(ours[feature][stat], values[stat], rtol=1e-5, err_msg=feature)


def test_tasks_given_at_export_replace_the_stores(tmp_path):
    store = import_dataset(read_dataset(FIXTURE), tmp_path / "tiny.zarr", progress=False)
    one = write_lerobot(store, tmp_path / "one", task="stack", progress=False)
    assert _tasks(one) == {0: "stack"}
    assert set(pq.read_table(one.joinpath(*DATA)).column("task_index").to_pylist()) == {0}


def test_wrong_declared_shape_names_file_key_and_shapes(folder, tmp_path):
    _edit_info(folder, lambda i: i["features"]["observation.state"].update(shape=[5]))
    with pytest.raises(FormatError) as err:
        import_dataset(read_dataset(folder), tmp_path / "out.zarr", progress=False)
    message = str(err.value)
    for part in ("info.json", "'observation.state'", "[5]", "[4]", str(folder.joinpath(*DATA))):
        assert part in message, message
    _edit_info(folder, lambda i: i["features"]["observation.images.top"].update(shape=[8, 16, 3]))
    _edit_info(folder, lambda i: i["features"]["observation.state"].update(shape=[4]))
    with pytest.raises(FormatError, match=r"observation.images.top.*\[8, 16, 3\].*\[16, 16, 3\]"):
        import_dataset(read_dataset(folder), tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_missing_data_file_is_found_when_the_folder_is_opened(folder):
    folder.joinpath(*DATA).unlink()
    with pytest.raises(FormatError, match="missing file") as err:
        read_dataset(folder)
    assert str(folder.joinpath(*DATA)) in str(err.value)


def test_frames_with_a_task_the_table_lacks_are_named(tmp_path):
    import shutil

    folder = shutil.copytree(FIXTURE, tmp_path / "tiny")
    _edit_parquet(folder / "meta" / "tasks.parquet", lambda t: t.slice(0, 2))  # drop task 2
    with pytest.raises(FormatError, match="episode 2: task_index 2 is not in the tasks table") as err:
        import_dataset(read_dataset(folder), tmp_path / "out.zarr", progress=False)
    assert str(folder.joinpath(*DATA)) in str(err.value)
