"""robomimic HDF5 import: layout, shape_meta, bad input, and a two-camera policy trained from it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY
from formats_helpers import (
    BRIEF_IMAGE_TRAINING,
    ROBOMIMIC_CAMERAS,
    ROBOMIMIC_LOW_DIM,
    train_and_act,
    tree_hash,
    write_robomimic,
)

from diffpolicy.data.formats import FormatError, detect_format, import_dataset, read_dataset


@pytest.fixture
def robomimic_file(tmp_path):
    (tmp_path / "src").mkdir()
    return write_robomimic(tmp_path / "src" / "image.hdf5")


def test_reads_layout_and_infers_shape_meta(robomimic_file, tmp_path):
    before = tree_hash(robomimic_file)
    assert detect_format(robomimic_file) == "robomimic"
    ds = read_dataset(robomimic_file)
    assert ds.episode_lengths == [14, 12, 13]
    assert ds.shape_meta["action"] == {"shape": [7]}
    for key in ROBOMIMIC_CAMERAS:
        assert ds.shape_meta["obs"][key] == {"shape": [3, 16, 16], "type": "rgb"}
    for key, dim in ROBOMIMIC_LOW_DIM.items():
        assert ds.shape_meta["obs"][key] == {"shape": [dim], "type": "low_dim"}
    store = import_dataset(ds, tmp_path / "out.zarr", progress=False)
    assert store.episode_ends.tolist() == [14, 26, 39]
    assert store.attrs["source"]["splits"] == {"train": [0, 1], "valid": [2]}
    assert store.attrs["source"]["env_args"]["env_name"] == "Lift"
    import h5py

    with h5py.File(robomimic_file) as f:
        np.testing.assert_array_equal(store.get_episode(1)["action"], f["data/demo_1/actions"][:])
        np.testing.assert_array_equal(
            store.get_episode(2)["agentview_image"], f["data/demo_2/obs/agentview_image"][:]
        )
    assert tree_hash(robomimic_file) == before


def _edit(path, fn):
    import h5py

    with h5py.File(path, "a") as f:
        fn(f)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda f: f["data/demo_1/obs"].__delitem__("robot0_eef_pos"), "missing features"),
        (lambda f: f["data/demo_1"].__delitem__("actions"), "missing feature"),
        (
            lambda f: (
                f["data/demo_2"].__delitem__("actions"),
                f["data/demo_2"].create_dataset("actions", data=np.zeros((5, 7))),
            ),
            "mismatched lengths",
        ),
        (lambda f: f["data/demo_0/actions"].__setitem__((3, 2), np.nan), "NaN"),
    ],
    ids=["missing-obs", "missing-actions", "lengths", "nan-action"],
)
def test_bad_input_names_file_and_problem(robomimic_file, tmp_path, edit, problem):
    _edit(robomimic_file, edit)
    before = tree_hash(robomimic_file)
    with pytest.raises(FormatError) as err:
        import_dataset(read_dataset(robomimic_file), tmp_path / "out.zarr", progress=False)
    assert str(robomimic_file) in str(err.value) and problem in str(err.value)
    assert not (tmp_path / "out.zarr").exists()
    assert tree_hash(robomimic_file) == before


def test_corrupt_hdf5(robomimic_file):
    data = robomimic_file.read_bytes()
    robomimic_file.write_bytes(data[: len(data) // 3])
    before = tree_hash(robomimic_file)
    with pytest.raises(FormatError, match="corrupt") as err:
        read_dataset(robomimic_file)
    assert str(robomimic_file) in str(err.value)
    assert tree_hash(robomimic_file) == before


def test_two_camera_transformer_trains_and_predicts(robomimic_file, tmp_path):
    """The seed-001 preset (two cameras, eef pos/quat, gripper) trains from the file and acts."""
    before = tree_hash(robomimic_file)
    overrides = [*TINY, *BRIEF_IMAGE_TRAINING, f"data.path={robomimic_file}"]
    policy, cfg, action = train_and_act("robomimic_image_transformer", overrides, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "imported 3 episodes" in log and "shape_meta from the dataset" in log
    assert "split: robomimic's own mask/train (2 episodes) / mask/valid (1)" in log  # the file's split
    assert sorted(policy.shape_meta["obs"]) == sorted(cfg.data.obs_keys)
    assert action.shape == (1, 8, 7)
    assert tree_hash(robomimic_file) == before


def test_demos_in_numeric_order_and_the_files_own_split(tmp_path):
    """demo_10 sorts before demo_2 as text; robomimic's loader orders demos by number, and so does the
    import. The file's mask/train and mask/valid make the training split (named in the note)."""
    import h5py

    from diffpolicy.data.formats import open_training_data
    from diffpolicy.data.sequence import split_store

    path = tmp_path / "low_dim.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in (10, 2, 0, 11, 1):  # written out of order; h5py lists them as text: 0, 1, 10, 11, 2
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=np.full((3 + i, 2), float(i)))
            demo.create_group("obs").create_dataset("pos", data=np.full((3 + i, 2), float(i)))
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_1", b"demo_11"], dtype="S"))
        f.create_dataset("mask/valid", data=np.array([b"demo_10", b"demo_2"], dtype="S"))
    assert read_dataset(path).attrs["demos"] == ["demo_0", "demo_1", "demo_2", "demo_10", "demo_11"]
    store, _, _ = open_training_data(path, tmp_path / "imports")
    assert [float(store.get_episode(k)["action"][0, 0]) for k in range(5)] == [0, 1, 2, 10, 11]
    assert store.episode_lengths.tolist() == [3, 4, 5, 13, 14]
    train, val, note = split_store(store, val_ratio=0.05, seed=42)
    assert train.tolist() == [0, 1, 4] and val.tolist() == [2, 3]  # demo_0, demo_1, demo_11 / demo_2, demo_10
    assert "robomimic's own mask/train (3 episodes) / mask/valid (2)" in note
    train, val, note = split_store(store, val_ratio=0.2, seed=42, rule="random")
    assert len(val) == 1 and "random by data.val_ratio=0.2" in note
