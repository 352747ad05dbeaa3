"""EpisodeStore: layout, round trips, validation, crash safety and zarr-2 compatibility."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from diffpolicy.data import episodes as episodes_module
from diffpolicy.data.episodes import EpisodeStore, EpisodeStoreError


def make_episode(length: int, ep: int, image: bool = False) -> dict[str, np.ndarray]:
    """Episode whose values encode (episode, step) so reads can be checked exactly."""
    steps = np.arange(length, dtype=np.float32)
    out = {
        "action": np.stack([steps + 100 * ep, -steps], axis=1),
        "state": (steps + 100 * ep)[:, None].repeat(3, axis=1),
    }
    if image:
        img = np.zeros((length, 8, 6, 3), dtype=np.uint8)
        img[:] = (np.arange(length) + 10 * ep).astype(np.uint8)[:, None, None, None]
        out["image"] = img
    return out


def fill(store: EpisodeStore, lengths: list[int], image: bool = False) -> list[dict[str, np.ndarray]]:
    eps = [make_episode(n, i, image) for i, n in enumerate(lengths)]
    for ep in eps:
        store.add_episode(ep)
    return eps


def assert_same_episodes(store: EpisodeStore, eps: list[dict[str, np.ndarray]]) -> None:
    assert store.n_episodes == len(eps)
    for i, ep in enumerate(eps):
        got = store.get_episode(i)
        assert sorted(got) == sorted(ep)
        for key, value in ep.items():
            np.testing.assert_array_equal(got[key], value)


# ---------------------------------------------------------------------- basic API
def test_append_and_read_in_memory():
    store = EpisodeStore.create(None)
    assert store.n_episodes == 0 and store.n_steps == 0 and store.keys == []
    eps = fill(store, [5, 3, 4], image=True)
    assert store.keys == ["action", "image", "state"]
    np.testing.assert_array_equal(store.episode_ends, [5, 8, 12])
    assert store.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(store.episode_lengths, [5, 3, 4])
    assert store.n_steps == 12 and len(store) == 3
    assert store.episode_slice(1) == slice(5, 8)
    assert store.episode_slice(-1) == slice(8, 12)
    assert_same_episodes(store, eps)
    only = store.get_episode(2, keys=["state"])
    assert list(only) == ["state"]
    np.testing.assert_array_equal(only["state"], eps[2]["state"])
    assert "n_episodes=3" in repr(store) and "memory" in repr(store)


def test_episode_slice_out_of_range():
    store = EpisodeStore.create(None)
    fill(store, [2, 2])
    with pytest.raises(IndexError, match="episode index 2"):
        store.episode_slice(2)
    with pytest.raises(IndexError, match="-3"):
        store.get_episode(-3)


def test_lazy_read_returns_zarr_array():
    store = EpisodeStore.create(None)
    fill(store, [4, 6])
    arr = store["action"]
    assert isinstance(arr, zarr.Array)
    assert arr.shape == (10, 2)
    np.testing.assert_array_equal(arr[4:6, 0], [100, 101])
    with pytest.raises(KeyError, match=r"'nope'.*\['action', 'state'\]"):
        store["nope"]
    with pytest.raises(KeyError, match="nope"):
        store.get_episode(0, keys=["nope"])


def test_chunks_are_time_only_and_bounded():
    store = EpisodeStore.create(None)
    big = np.zeros((3, 96, 96, 3), dtype=np.uint8)
    store.add_episode({"image": big, "action": np.zeros((3, 2), np.float32)})
    img_chunks = store["image"].chunks
    assert img_chunks[1:] == (96, 96, 3)
    assert 1 < img_chunks[0] < 1000  # ~2 MB of frames, not one frame and not everything
    assert store["action"].chunks == (1024, 2)


def test_attrs_persist(tmp_path: Path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    store.attrs["task"] = "pusht"
    store.attrs["seeds"] = [1, 2]
    fill(store, [2])
    reopened = EpisodeStore.open(path)
    assert reopened.attrs["task"] == "pusht" and reopened.attrs["seeds"] == [1, 2]


# ---------------------------------------------------------------------- files
def test_directory_round_trip_and_append(tmp_path: Path):
    path = tmp_path / "demo.zarr"
    store = EpisodeStore.create(path)
    eps = fill(store, [3, 5])
    reopened = EpisodeStore.open(path)
    assert reopened.read_only
    assert_same_episodes(reopened, eps)
    with pytest.raises(EpisodeStoreError, match="read-only"):
        reopened.add_episode(make_episode(2, 2))

    appendable = EpisodeStore.open(str(path), mode="a")
    extra = make_episode(4, 2)
    appendable.add_episode(extra)
    final = EpisodeStore.open(path)
    assert_same_episodes(final, [*eps, extra])
    np.testing.assert_array_equal(final.episode_ends, [3, 8, 12])


def test_create_refuses_to_overwrite(tmp_path: Path):
    path = tmp_path / "demo.zarr"
    fill(EpisodeStore.create(path), [3])
    with pytest.raises(FileExistsError, match="demo.zarr"):
        EpisodeStore.create(path)
    assert EpisodeStore.open(path).n_episodes == 1  # untouched
    fresh = EpisodeStore.create(path, overwrite=True)
    assert fresh.n_episodes == 0
    assert EpisodeStore.open(path).n_episodes == 0


def test_create_rejects_zip_path(tmp_path: Path):
    with pytest.raises(ValueError, match="save_zip"):
        EpisodeStore.create(tmp_path / "x.zarr.zip")


def test_open_missing_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        EpisodeStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="mode"):
        EpisodeStore.open(tmp_path, mode="w")


def test_zip_round_trip(tmp_path: Path):
    store = EpisodeStore.create(tmp_path / "src.zarr")
    store.attrs["task"] = "toy"
    eps = fill(store, [3, 7, 2], image=True)
    zip_path = tmp_path / "out" / "demo.zarr.zip"
    assert store.save_zip(zip_path) == zip_path
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["demo.zarr.zip"]  # no temp left
    with EpisodeStore.open(zip_path) as zipped:
        assert zipped.read_only
        assert zipped.attrs["task"] == "toy"
        assert_same_episodes(zipped, eps)
    with pytest.raises(ValueError, match="read-only"):
        EpisodeStore.open(zip_path, mode="a")
    # zip entries are unique (zarr zip stores must be written once)
    names = zipfile.ZipFile(zip_path).namelist()
    assert len(names) == len(set(names))


def test_save_zip_refuses_overwrite_and_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = EpisodeStore.create(None)
    fill(store, [4])
    target = tmp_path / "demo.zarr.zip"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="demo.zarr.zip"):
        store.save_zip(target)
    assert target.read_bytes() == b"precious"

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(episodes_module, "_copy_array", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        store.save_zip(target, overwrite=True)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.zarr.zip"]  # temp file removed
    monkeypatch.undo()

    store.save_zip(target, overwrite=True)
    assert EpisodeStore.open(target).n_steps == 4
    with pytest.raises(ValueError, match=r"\.zip"):
        store.save_zip(tmp_path / "demo.zarr")


# ---------------------------------------------------------------------- add_episode checks
@pytest.mark.parametrize(
    ("episode", "match"),
    [
        ({"action": np.zeros((2, 2), np.float32)}, r"missing key\(s\) \['state'\]"),
        (
            {
                "action": np.zeros((2, 2), np.float32),
                "state": np.zeros((2, 3), np.float32),
                "extra": np.zeros((2,)),
            },
            r"extra key\(s\) \['extra'\]",
        ),
        ({"action": np.zeros((2, 3), np.float32), "state": np.zeros((2, 3), np.float32)}, "'action'.*shape"),
        (
            {"action": np.zeros((2, 2), np.float32), "state": np.zeros((3, 3), np.float32)},
            "'state' has 3 steps",
        ),
        ({"action": np.zeros((0, 2), np.float32), "state": np.zeros((0, 3), np.float32)}, "0 steps"),
        ({"action": np.zeros((2, 2), np.complex64), "state": np.zeros((2, 3))}, "'action'.*complex64"),
        ({"action": np.zeros(2, np.float32), "state": np.zeros((2, 3))}, "'action'.*shape"),
        ({"action": np.float32(1.0), "state": np.zeros((2, 3))}, "'action'.*scalar"),
        ({"bad/key": np.zeros((2, 2))}, "invalid key 'bad/key'"),
        ({}, "no keys"),
    ],
)
def test_add_episode_rejects_mismatch(episode, match):
    store = EpisodeStore.create(None)
    fill(store, [3])
    with pytest.raises(EpisodeStoreError, match=match):
        store.add_episode(episode)
    assert store.n_episodes == 1 and store["action"].shape[0] == 3  # nothing half-written


def test_add_episode_casts_safely():
    store = EpisodeStore.create(None)
    store.add_episode({"a": np.zeros((2, 2), np.float32), "i": np.zeros(2, np.int64)})
    store.add_episode({"a": np.ones((2, 2), np.float64), "i": np.ones(2, np.int32)})
    assert store["a"].dtype == np.float32 and store["i"].dtype == np.int64
    np.testing.assert_array_equal(store.get_episode(1)["a"], np.ones((2, 2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_add_episode_rejects_non_finite(bad):
    store = EpisodeStore.create(None)
    ep = make_episode(4, 0)
    ep["state"][2, 1] = bad
    with pytest.raises(EpisodeStoreError, match="'state'.*non-finite.*step 2"):
        store.add_episode(ep)
    assert store.n_episodes == 0


# ---------------------------------------------------------------------- validation
def _raw_store(path: Path, arrays: dict[str, np.ndarray], episode_ends: np.ndarray | None) -> Path:
    root = zarr.open_group(path, mode="w")
    data = root.create_group("data")
    for key, value in arrays.items():
        data.create_array(key, data=value)
    meta = root.create_group("meta")
    if episode_ends is not None:
        meta.create_array("episode_ends", data=episode_ends)
    return path


@pytest.mark.parametrize(
    ("arrays", "ends", "match"),
    [
        ({"a": np.zeros(10)}, np.array([4, 8, 6, 10]), "not strictly increasing at episode 2"),
        ({"a": np.zeros(10)}, np.array([4, 4, 10]), "not strictly increasing at episode 1"),
        ({"a": np.zeros(10)}, np.array([0, 10]), "positive"),
        ({"a": np.zeros(10)}, np.array([4.0, 10.0]), "integer"),
        ({"a": np.zeros(10)}, np.array([[4, 10]]), "1-D"),
        (
            {"a": np.zeros(10), "b": np.zeros(9)},
            np.array([4, 10]),
            "key 'b' has 9 steps but episode_ends says 10",
        ),
        (
            {"action": np.zeros(120)},
            np.array([50, 100]),
            "key 'action' has 120 steps but episode_ends says 100",
        ),
        ({"a": np.zeros(10)}, None, "meta/episode_ends"),
    ],
)
def test_validation_errors(tmp_path: Path, arrays, ends, match):
    path = _raw_store(tmp_path / "bad.zarr", arrays, ends)
    with pytest.raises(EpisodeStoreError, match=match):
        EpisodeStore.open(path)


def test_validation_missing_groups(tmp_path: Path):
    path = tmp_path / "nodata.zarr"
    root = zarr.open_group(path, mode="w")
    root.create_group("meta").create_array("episode_ends", data=np.array([3]))
    with pytest.raises(EpisodeStoreError, match="no 'data' group"):
        EpisodeStore.open(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EpisodeStoreError, match="not a zarr group"):
        EpisodeStore.open(tmp_path / "empty")


def test_validate_method_detects_later_corruption():
    store = EpisodeStore.create(None)
    fill(store, [3, 3])
    store.validate()
    store["state"].resize((5, 3))
    with pytest.raises(EpisodeStoreError, match="'state' has 5 steps but episode_ends says 6"):
        store.validate()


def test_interrupted_append_is_repaired_on_append_open(tmp_path: Path):
    path = tmp_path / "demo.zarr"
    store = EpisodeStore.create(path)
    eps = fill(store, [3, 4])
    # Simulate a crash after the data arrays were extended but before episode_ends was updated.
    for key in store.keys:
        arr = store[key]
        arr.resize((arr.shape[0] + 2, *arr.shape[1:]))
        arr[7:9] = 5
    with pytest.raises(EpisodeStoreError, match="data longer than episode_ends"):
        EpisodeStore.open(path)
    repaired = EpisodeStore.open(path, mode="a")
    assert repaired["action"].shape[0] == 7
    assert_same_episodes(repaired, eps)
    extra = make_episode(2, 2)
    repaired.add_episode(extra)
    assert_same_episodes(EpisodeStore.open(path), [*eps, extra])


@pytest.mark.parametrize("fail_on", ["meta/episode_ends", "data/state"])
def test_crash_during_append_keeps_previous_episodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
):
    path = tmp_path / "demo.zarr"
    eps = fill(EpisodeStore.create(path), [3, 4])
    store = EpisodeStore.open(path, mode="a")
    original = zarr.Array.__setitem__

    def crashing_setitem(self, selection, value):
        if self.path == fail_on:
            raise KeyboardInterrupt("simulated crash")
        original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crashing_setitem)
    with pytest.raises(KeyboardInterrupt):
        store.add_episode(make_episode(5, 2))
    monkeypatch.undo()

    with pytest.raises(EpisodeStoreError, match="interrupted append"):
        EpisodeStore.open(path)
    repaired = EpisodeStore.open(path, mode="a")
    assert_same_episodes(repaired, eps)
    assert all(repaired[key].shape[0] == 7 for key in repaired.keys)
    extra = make_episode(2, 2)
    repaired.add_episode(extra)
    assert_same_episodes(EpisodeStore.open(path), [*eps, extra])


def test_interrupted_first_append_allows_new_schema(tmp_path: Path):
    path = tmp_path / "demo.zarr"
    EpisodeStore.create(path)
    # A crash during the first append leaves a data array but no episode.
    zarr.open_group(path / "data", mode="r+").create_array("old", shape=(3, 2), dtype=np.float32)
    with pytest.raises(EpisodeStoreError, match="data longer"):
        EpisodeStore.open(path)
    repaired = EpisodeStore.open(path, mode="a")
    eps = fill(repaired, [2])
    assert repaired.keys == ["action", "state"]
    assert_same_episodes(EpisodeStore.open(path), eps)


# ---------------------------------------------------------------------- zarr 2 (original code) stores
def _write_zarr2_array(folder: Path, value: np.ndarray, chunk_len: int) -> None:
    """A zarr-2 array as the original code wrote it: .zarray JSON + raw little-endian C-order chunks."""
    folder.mkdir(parents=True)
    chunks = [chunk_len, *value.shape[1:]]
    meta = {
        "zarr_format": 2,
        "shape": list(value.shape),
        "chunks": chunks,
        "dtype": value.dtype.newbyteorder("<").str,
        "compressor": None,
        "fill_value": 0,
        "filters": None,
        "order": "C",
    }
    (folder / ".zarray").write_text(json.dumps(meta))
    le = value.astype(value.dtype.newbyteorder("<"))
    for c, start in enumerate(range(0, value.shape[0], chunk_len)):
        block = np.zeros((chunk_len, *value.shape[1:]), dtype=le.dtype)  # edge chunks are padded
        part = le[start : start + chunk_len]
        block[: len(part)] = part
        name = ".".join([str(c)] + ["0"] * (value.ndim - 1))
        (folder / name).write_bytes(block.tobytes(order="C"))


def _original_values() -> tuple[dict[str, np.ndarray], np.ndarray]:
    n = 11
    values = {
        "action": np.arange(2 * n, dtype=np.float32).reshape(n, 2) * 1.5,
        "state": np.arange(5 * n, dtype=np.float32).reshape(n, 5) - 7,
        "img": (np.arange(n * 4 * 4 * 3) % 251).astype(np.uint8).reshape(n, 4, 4, 3),
        "step": np.arange(n, dtype=np.int64),
    }
    return values, np.array([4, 9, 11], dtype=np.int64)


def _check_original(store: EpisodeStore, values: dict[str, np.ndarray], ends: np.ndarray) -> None:
    assert store.keys == sorted(values)
    np.testing.assert_array_equal(store.episode_ends, ends)
    for key, value in values.items():
        np.testing.assert_array_equal(store[key][:], value)
    np.testing.assert_array_equal(store.get_episode(1)["action"], values["action"][4:9])


def _zip_directory(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for root, _, files in os.walk(src):
            for name in files:
                full = Path(root) / name
                zf.write(full, full.relative_to(src).as_posix())
    return dest


def test_open_hand_written_zarr2_store(tmp_path: Path):
    values, ends = _original_values()
    root = tmp_path / "original.zarr"
    for group in (root, root / "data", root / "meta"):
        group.mkdir(parents=True, exist_ok=True)
        (group / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    for key, value in values.items():
        _write_zarr2_array(root / "data" / key, value, chunk_len=4)
    _write_zarr2_array(root / "meta" / "episode_ends", ends, chunk_len=2)
    assert (root / "data" / "action" / "2.0").exists() and (root / "meta" / "episode_ends" / "1").exists()

    _check_original(EpisodeStore.open(root), values, ends)
    with EpisodeStore.open(_zip_directory(root, tmp_path / "original.zarr.zip")) as zipped:
        _check_original(zipped, values, ends)


def test_open_zarr2_store_written_by_zarr_with_blosc(tmp_path: Path):
    numcodecs = pytest.importorskip("numcodecs")
    values, ends = _original_values()
    path = tmp_path / "blosc.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=2)
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    data = root.create_group("data")
    for key, value in values.items():
        arr = data.create_array(
            key, shape=value.shape, chunks=(4, *value.shape[1:]), dtype=value.dtype, compressors=blosc
        )
        arr[:] = value
    root.create_group("meta").create_array("episode_ends", data=ends, compressors=blosc)
    assert json.loads((path / "data" / "action" / ".zarray").read_text())["compressor"]["id"] == "blosc"

    _check_original(EpisodeStore.open(path), values, ends)
    with EpisodeStore.open(_zip_directory(path, tmp_path / "blosc.zarr.zip")) as zipped:
        _check_original(zipped, values, ends)
    # Appending keeps working on a zarr-2 directory store.
    store = EpisodeStore.open(path, mode="a")
    store.add_episode({key: value[:2] for key, value in values.items()})
    np.testing.assert_array_equal(EpisodeStore.open(path).episode_ends, [4, 9, 11, 13])


def test_training_on_an_empty_store_names_it(tmp_path: Path):
    """An EpisodeStore without episodes (e.g. a collection stopped before its first episode) is refused with
    its path, not with a bare 'n_episodes must be a positive integer'."""
    from diffpolicy.data.formats import FormatError, open_training_data

    path = tmp_path / "demos.zarr"
    EpisodeStore.create(path)
    with pytest.raises(FormatError, match="holds no episodes") as err:
        open_training_data(path, tmp_path / "imports")
    assert str(path) in str(err.value)
