"""`diffpolicy dataset info | convert`: what they print, what they write, what they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from formats_helpers import tiny_store, tree_hash, write_robomimic

from diffpolicy.cli import main
from diffpolicy.data.episodes import EpisodeStore

pytest.importorskip("pyarrow")
pytest.importorskip("av")


def test_info_and_convert_round_trip(tmp_path, capsys):
    store = tiny_store(tmp_path / "a.zarr")
    store.attrs["fps"] = 15
    before = tree_hash(tmp_path / "a.zarr")

    assert main(["dataset", "info", str(tmp_path / "a.zarr")]) == 0
    out = capsys.readouterr().out
    assert "episodes 3, frames 44" in out and "fps 15" in out
    assert "top: shape [16, 16, 3] uint8" in out and "state: min [" in out

    assert main(["dataset", "convert", str(tmp_path / "a.zarr"), str(tmp_path / "le"), "--quiet"]) == 0
    assert "LeRobot v3.0" in capsys.readouterr().out
    assert main(["dataset", "info", str(tmp_path / "le"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "lerobot v3.0" and info["n_frames"] == 44 and info["fps"] == 15
    assert info["keys"]["top"]["source"] == "observation.images.top"
    assert info["stats_source"] == "the dataset's own stats"

    assert main(["dataset", "convert", str(tmp_path / "le"), str(tmp_path / "b.zarr"), "--quiet"]) == 0
    back = EpisodeStore.open(tmp_path / "b.zarr")
    assert back.episode_ends.tolist() == store.episode_ends.tolist()
    np.testing.assert_array_equal(back["state"][:], store["state"][:])

    # nothing is overwritten without --overwrite, and the source is untouched
    assert main(["dataset", "convert", str(tmp_path / "le"), str(tmp_path / "b.zarr"), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert tree_hash(tmp_path / "a.zarr") == before


def test_robomimic_to_lerobot_uses_control_freq(tmp_path, capsys):
    src = write_robomimic(tmp_path / "image.hdf5")
    assert main(["dataset", "convert", str(src), str(tmp_path / "le"), "--quiet"]) == 0
    info = json.loads((tmp_path / "le" / "meta" / "info.json").read_text())
    assert info["fps"] == 20 and info["total_episodes"] == 3
    assert info["features"]["observation.images.agentview_image"]["dtype"] == "video"
    assert info["features"]["observation.robot0_eef_pos"]["dtype"] == "float64"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary store is gone
    small = tmp_path / "small.zarr"
    assert main(["dataset", "convert", str(src), str(small), "--image-size", "8", "8", "--quiet"]) == 0
    assert EpisodeStore.open(small)["agentview_image"].shape == (39, 8, 8, 3)
    assert main(["dataset", "info", str(tmp_path / "nothing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_reports_a_missing_data_file_and_a_wrong_shape(tmp_path, capsys):
    store = tiny_store(tmp_path / "a.zarr")
    store.attrs["fps"] = 15
    folder = tmp_path / "le"
    assert main(["dataset", "convert", str(tmp_path / "a.zarr"), str(folder), "--quiet"]) == 0
    capsys.readouterr()
    info_path = folder / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.state"]["shape"] = [2, 2]
    info_path.write_text(json.dumps(info))
    assert main(["dataset", "info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "info.json" in err and "'observation.state'" in err and "[2, 2]" in err and "[4]" in err, err

    info["features"]["observation.state"]["shape"] = [4]
    info_path.write_text(json.dumps(info))
    data = folder / "data" / "chunk-000" / "file-000.parquet"
    data.unlink()
    assert main(["dataset", "info", str(folder)]) == 2  # the shipped stats.json is not enough to be healthy
    err = capsys.readouterr().err
    assert str(data) in err and "missing file" in err, err


def _convert(src, dst, *extra):
    return main(["dataset", "convert", str(src), str(dst), "--quiet", *extra])


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path, capsys, monkeypatch):
    """--overwrite writes the new dataset beside the old one and swaps them only when it is complete: a
    conversion that fails midway, or a swap that fails, leaves the old folder as it was."""
    import os

    import diffpolicy.data.formats.base as base
    import diffpolicy.data.formats.lerobot as lerobot

    store = tiny_store(tmp_path / "a.zarr")
    store.attrs["fps"] = 15
    assert _convert(tmp_path / "a.zarr", tmp_path / "le") == 0
    assert _convert(tmp_path / "le", tmp_path / "b.zarr") == 0
    old = {name: tree_hash(tmp_path / name) for name in ("le", "b.zarr")}
    capsys.readouterr()

    def leftovers():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))

    encode = lerobot._encode_video

    def encode_one_camera(path, frames, fps, crf):
        if "wrist" in str(path):
            raise RuntimeError("encoder died")
        return encode(path, frames, fps, crf)

    with monkeypatch.context() as m:  # export: the second camera fails
        m.setattr(lerobot, "_encode_video", encode_one_camera)
        assert _convert(tmp_path / "a.zarr", tmp_path / "le", "--overwrite") == 2
    assert "encoder died" in capsys.readouterr().err
    assert tree_hash(tmp_path / "le") == old["le"] and leftovers() == []

    add = base.EpisodeStore.add_episode
    calls = []

    def add_two(self, episode):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk trouble")
        return add(self, episode)

    with monkeypatch.context() as m:  # import: the second episode fails
        m.setattr(base.EpisodeStore, "add_episode", add_two)
        assert _convert(tmp_path / "le", tmp_path / "b.zarr", "--overwrite") == 2
    assert "disk trouble" in capsys.readouterr().err
    assert tree_hash(tmp_path / "b.zarr") == old["b.zarr"] and leftovers() == []

    replace = os.replace

    def refuse_new_into_place(src, dst):
        if ".tmp-" in Path(src).name and Path(dst).name in ("le", "b.zarr"):
            raise PermissionError(13, "Permission denied", str(dst))
        return replace(src, dst)

    with monkeypatch.context() as m:  # the swap itself fails
        m.setattr(base.os, "replace", refuse_new_into_place)
        assert _convert(tmp_path / "a.zarr", tmp_path / "le", "--overwrite") == 1
        assert _convert(tmp_path / "le", tmp_path / "b.zarr", "--overwrite") == 1
    capsys.readouterr()
    assert tree_hash(tmp_path / "le") == old["le"] and tree_hash(tmp_path / "b.zarr") == old["b.zarr"]
    assert leftovers() == []

    assert _convert(tmp_path / "a.zarr", tmp_path / "le", "--overwrite") == 0  # and it does replace
    assert leftovers() == []
