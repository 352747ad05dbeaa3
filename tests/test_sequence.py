"""SequenceDataset: the index convention, padding, rgb handling, lazy/cached equality, splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.sequence import SequenceDataset, prepare_obs, split_episodes

IMG_H, IMG_W = 4, 5


def step_value(ep: int, step: int) -> int:
    return 100 * ep + step


def build_store(lengths: list[int], path: Path | None = None, image_dtype=np.uint8) -> EpisodeStore:
    """Episodes where every key at step s of episode e encodes 100*e + s (images: 10*e + s)."""
    store = EpisodeStore.create(path)
    for ep, length in enumerate(lengths):
        steps = np.arange(length)
        values = step_value(ep, steps).astype(np.float32)
        img = np.empty((length, IMG_H, IMG_W, 3), dtype=image_dtype)
        for c in range(3):
            img[..., c] = (10 * ep + steps + 50 * c)[:, None, None]
        store.add_episode(
            {
                "action": np.stack([values, -values], axis=1),
                "act2": values[:, None],
                "state": np.stack([values, values + 0.5, values * 2], axis=1),
                "image": img,
            }
        )
    return store


LOW_DIM_META = {"obs": {"state": {"shape": [3], "type": "low_dim"}}, "action": {"shape": [2]}}
RGB_META = {
    "obs": {
        "state": {"shape": [3], "type": "low_dim"},
        "image": {"shape": [3, IMG_H, IMG_W], "type": "rgb"},
    },
    "action": {"shape": [2]},
}


def item_steps(item: dict) -> tuple[list[int], list[int]]:
    """Decode (obs steps, action steps) from an item of a single-episode-0 dataset."""
    return item["obs"]["state"][:, 0].long().tolist(), item["action"][:, 0].long().tolist()


# ---------------------------------------------------------------------- the index convention
def test_interior_start_and_end_windows():
    ds = SequenceDataset(
        build_store([10]), LOW_DIM_META, horizon=8, n_obs_steps=2, n_action_steps=4, mask_padded_actions=True
    )
    # pad_after defaults to n_action_steps - 1 = 3: t = 0 .. L - H + To - 1 + pad_after = 10-8+1+3 = 6
    assert len(ds) == 7
    assert [ds.sample_location(i) for i in range(7)] == [(0, t) for t in range(7)]

    start = ds[0]  # t = 0: obs steps -1, 0 -> clamped to 0; actions -1 .. 6
    assert item_steps(start) == ([0, 0], [0, 0, 1, 2, 3, 4, 5, 6])
    assert start["action_is_pad"].tolist() == [True] + [False] * 7

    interior = ds[4]  # t = 4: obs 3, 4; actions 3 .. 10 (10 is past the end)
    assert item_steps(interior) == ([3, 4], [3, 4, 5, 6, 7, 8, 9, 9])
    assert interior["action_is_pad"].tolist() == [False] * 7 + [True]

    end = ds[-1]  # t = 6: actions 5 .. 12; executed actions (offset 1..4) = steps 6..9, all real
    assert item_steps(end) == ([5, 6], [5, 6, 7, 8, 9, 9, 9, 9])
    assert end["action_is_pad"].tolist() == [False] * 5 + [True] * 3
    executed = end["action"][ds.n_obs_steps - 1 : ds.n_obs_steps - 1 + ds.n_action_steps, 0]
    assert executed.tolist() == [6, 7, 8, 9]
    assert not end["action_is_pad"][1:5].any()

    # second action column and obs columns carry the same step
    assert torch.equal(end["action"][:, 1], -end["action"][:, 0])
    assert end["obs"]["state"][:, 1].tolist() == [5.5, 6.5]


def test_item_types_and_shapes():
    ds = SequenceDataset(
        build_store([10]), RGB_META, horizon=8, n_obs_steps=2, n_action_steps=4, mask_padded_actions=True
    )
    item = ds[3]
    assert item["obs"]["state"].dtype == torch.float32 and item["obs"]["state"].shape == (2, 3)
    assert item["obs"]["image"].dtype == torch.float32 and item["obs"]["image"].shape == (2, 3, IMG_H, IMG_W)
    assert item["action"].dtype == torch.float32 and item["action"].shape == (8, 2)
    assert item["action_is_pad"].dtype == torch.bool and item["action_is_pad"].shape == (8,)


def test_pad_after_zero_never_pads_the_end():
    ds = SequenceDataset(
        build_store([6]),
        LOW_DIM_META,
        horizon=4,
        n_obs_steps=2,
        n_action_steps=2,
        pad_after=0,
        mask_padded_actions=True,
    )
    assert len(ds) == 4  # t = 0 .. 6-4+1+0 = 3: the last window ends on the last step
    assert item_steps(ds[3]) == ([2, 3], [2, 3, 4, 5])
    assert not ds[3]["action_is_pad"].any()


@pytest.mark.parametrize("length", [1, 2, 3])
def test_episode_shorter_than_horizon_still_yields_one_sample(length: int):
    ds = SequenceDataset(
        build_store([length]),
        LOW_DIM_META,
        horizon=8,
        n_obs_steps=2,
        n_action_steps=4,
        mask_padded_actions=True,
    )
    assert len(ds) == 1
    obs, actions = item_steps(ds[0])
    assert obs == [0, 0]
    expected = [min(max(s, 0), length - 1) for s in range(-1, 7)]
    assert actions == expected
    assert ds[0]["action_is_pad"].tolist() == [s < 0 or s >= length for s in range(-1, 7)]


def test_single_obs_step():
    ds = SequenceDataset(
        build_store([6]), LOW_DIM_META, horizon=4, n_obs_steps=1, n_action_steps=4, mask_padded_actions=True
    )
    assert len(ds) == 6  # t = 0 .. 6-4+0+3
    for i in range(6):
        obs, actions = item_steps(ds[i])
        assert obs == [i]
        assert actions == [min(s, 5) for s in range(i, i + 4)]  # executed actions start at t (offset 0)
        assert ds[i]["action_is_pad"].tolist() == [s > 5 for s in range(i, i + 4)]


def test_windows_never_cross_episode_boundaries():
    lengths = [7, 2, 5, 1]
    ds = SequenceDataset(
        build_store(lengths),
        LOW_DIM_META,
        horizon=6,
        n_obs_steps=3,
        n_action_steps=2,
        mask_padded_actions=True,
    )
    expected_counts = [max(0, n - 6 + 2 + 1) + 1 for n in lengths]  # t = 0 .. L - H + To - 1 + pad_after
    assert len(ds) == sum(expected_counts)
    seen = []
    for i in range(len(ds)):
        ep, t = ds.sample_location(i)
        seen.append(ep)
        item = ds[i]
        length = lengths[ep]
        obs = item["obs"]["state"][:, 0].long().tolist()
        act = item["action"][:, 0].long().tolist()
        assert obs == [step_value(ep, min(max(s, 0), length - 1)) for s in range(t - 2, t + 1)]
        assert act == [step_value(ep, min(max(s, 0), length - 1)) for s in range(t - 2, t + 4)]
        pad = [s < 0 or s >= length for s in range(t - 2, t + 4)]
        assert item["action_is_pad"].tolist() == pad
    assert [seen.count(e) for e in range(4)] == expected_counts


def test_episode_subset_and_action_key():
    store = build_store([4, 5, 6])
    meta = {"obs": {"state": {"shape": [3]}}, "action": {"shape": [1]}}
    ds = SequenceDataset(
        store, meta, horizon=2, n_obs_steps=1, n_action_steps=2, episodes=[2, 0], action_key="act2"
    )
    assert ds.n_episodes == 2 and ds.episode_ids.tolist() == [0, 2]
    eps = {ds.sample_location(i)[0] for i in range(len(ds))}
    assert eps == {0, 2}
    last = ds[-1]
    assert last["action"][:, 0].tolist() == [step_value(2, 5), step_value(2, 5)]  # pad_after = 1
    data = ds.get_normalizer_data()
    assert sorted(data) == ["action", "state"]
    expected = np.concatenate([step_value(0, np.arange(4)), step_value(2, np.arange(6))]).astype(np.float32)
    np.testing.assert_array_equal(data["action"], expected[:, None])
    np.testing.assert_array_equal(data["state"][:, 0], expected)
    assert data["state"].shape == (10, 3) and data["state"].dtype == np.float32


def test_normalizer_data_omits_rgb_and_matches_lazy():
    store = build_store([3, 4])
    cached = SequenceDataset(store, RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    lazy = SequenceDataset(store, RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2, cache_in_memory=False)
    a, b = cached.get_normalizer_data(), lazy.get_normalizer_data()
    assert sorted(a) == ["action", "state"] == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["action"].shape == (7, 2)


# ---------------------------------------------------------------------- rgb
@pytest.mark.parametrize("image_dtype", [np.uint8, np.float32])
def test_rgb_conversion(image_dtype):
    ds = SequenceDataset(
        build_store([5, 5], image_dtype=image_dtype), RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2
    )
    i = next(i for i in range(len(ds)) if ds.sample_location(i) == (1, 2))
    img = ds[i]["obs"]["image"]
    assert img.shape == (2, 3, IMG_H, IMG_W)
    for k, step in enumerate([1, 2]):
        for c in range(3):
            expected = (10 * 1 + step + 50 * c) / 255.0
            torch.testing.assert_close(img[k, c], torch.full((IMG_H, IMG_W), expected))
    assert img.min() >= 0.0 and img.max() <= 1.0


def test_float_images_already_in_0_1_are_refused_by_key(tmp_path: Path):
    """Float frames are taken as 0..255 (the original Push-T's) and divided by 255 once; frames already in
    [0, 1] would train on [0, 0.004] without a word, so they are refused, naming the key and the store."""
    store = EpisodeStore.create(tmp_path / "unit.zarr")
    rng = np.random.default_rng(0)
    for n in (6, 5):
        store.add_episode(
            {
                "action": rng.normal(size=(n, 2)).astype(np.float32),
                "state": rng.normal(size=(n, 3)).astype(np.float32),
                "image": rng.uniform(0, 1, (n, IMG_H, IMG_W, 3)).astype(np.float32),
            }
        )
    for cached in (True, False):
        with pytest.raises(ValueError, match=r"rgb key 'image'.*unit.zarr.*float values in \[0, 1\]") as err:
            SequenceDataset(
                store, RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2, cache_in_memory=cached
            )
        assert "multiply by 255" in str(err.value)


class _RecordingArray:
    def __init__(self, array, log: list, key: str):
        self._array, self._log, self._key = array, log, key

    def __getitem__(self, sel):
        self._log.append((self._key, sel))
        return self._array[sel]

    def __getattr__(self, name):
        return getattr(self._array, name)


@pytest.fixture
def read_log(monkeypatch: pytest.MonkeyPatch) -> list:
    log: list = []
    original = EpisodeStore.__getitem__

    def recording(self, key):
        return _RecordingArray(original(self, key), log, key)

    monkeypatch.setattr(EpisodeStore, "__getitem__", recording)
    return log


def test_lazy_reads_only_needed_frames(read_log: list):
    store = build_store([30])
    ds = SequenceDataset(store, RGB_META, horizon=16, n_obs_steps=2, n_action_steps=8, cache_in_memory=False)
    read_log.clear()
    item = ds[10]
    image_reads = [sel for key, sel in read_log if key == "image"]
    action_reads = [sel for key, sel in read_log if key == "action"]
    assert image_reads == [slice(9, 11)]  # the To = 2 frames, not the 16-step window
    assert len(action_reads) == 1 and action_reads[0].stop - action_reads[0].start == 16
    assert item["obs"]["image"][:, 0, 0, 0].mul(255).round().tolist() == [9, 10]


def test_cache_reads_each_key_once(read_log: list):
    store = build_store([3, 4, 5, 6])
    SequenceDataset(store, RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    data_reads = [(key, sel) for key, sel in read_log if isinstance(sel, slice)]
    assert sorted(key for key, _ in data_reads) == ["action", "image", "state"]
    read_log.clear()
    # Episodes 0, 1 and 3: two contiguous runs -> two reads per key, only those steps.
    SequenceDataset(store, RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2, episodes=[0, 1, 3])
    image_reads = [sel for key, sel in read_log if key == "image" and isinstance(sel, slice)]
    assert image_reads == [slice(0, 7), slice(12, 18)]


def test_lazy_and_cached_items_identical(tmp_path: Path):
    store = build_store([9, 2, 6], path=tmp_path / "s.zarr")
    kwargs = dict(horizon=6, n_obs_steps=3, n_action_steps=3, episodes=[0, 2], mask_padded_actions=True)
    cached = SequenceDataset(store, RGB_META, **kwargs)
    lazy = SequenceDataset(tmp_path / "s.zarr", RGB_META, cache_in_memory=False, **kwargs)
    assert len(cached) == len(lazy) > 0
    for i in range(len(cached)):
        a, b = cached[i], lazy[i]
        assert torch.equal(a["action"], b["action"])
        assert torch.equal(a["action_is_pad"], b["action_is_pad"])
        for key in a["obs"]:
            assert torch.equal(a["obs"][key], b["obs"][key])


@pytest.mark.parametrize("as_zip", [False, True])
def test_dataloader_workers_lazy(tmp_path: Path, as_zip: bool):
    path = tmp_path / "s.zarr"
    store = build_store([8, 5, 7], path=path)
    if as_zip:
        path = store.save_zip(tmp_path / "s.zarr.zip")
    ds = SequenceDataset(
        str(path), RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2, cache_in_memory=False
    )
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)
    batches = list(loader)
    actions = torch.cat([b["action"] for b in batches])
    images = torch.cat([b["obs"]["image"] for b in batches])
    assert actions.shape == (len(ds), 4, 2) and images.shape == (len(ds), 2, 3, IMG_H, IMG_W)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(actions[i], item["action"])
        assert torch.equal(images[i], item["obs"]["image"])


# ---------------------------------------------------------------------- validation
def test_constructor_errors():
    store = build_store([5])
    with pytest.raises(KeyError, match=r"'wrist'.*\['act2', 'action', 'image', 'state'\]"):
        SequenceDataset(
            store,
            {"obs": {"wrist": {"shape": [3], "type": "rgb"}}, "action": {"shape": [2]}},
            horizon=4,
            n_obs_steps=2,
            n_action_steps=2,
        )
    with pytest.raises(KeyError, match="'act'"):
        SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2, action_key="act")
    with pytest.raises(ValueError, match=r"'state'.*\[4\].*\[3\]"):
        SequenceDataset(
            store,
            {"obs": {"state": {"shape": [4]}}, "action": {"shape": [2]}},
            horizon=4,
            n_obs_steps=2,
            n_action_steps=2,
        )
    with pytest.raises(ValueError, match=r"'image'.*\[3, 5, 4\].*\(4, 5, 3\)"):
        bad_rgb = {"obs": {"image": {"shape": [3, 5, 4], "type": "rgb"}}, "action": {"shape": [2]}}
        SequenceDataset(store, bad_rgb, horizon=4, n_obs_steps=2, n_action_steps=2)
    with pytest.raises(ValueError, match="'state'.*rgb"):
        SequenceDataset(
            store,
            {"obs": {"state": {"shape": [3], "type": "depth"}}, "action": {"shape": [2]}},
            horizon=4,
            n_obs_steps=2,
            n_action_steps=2,
        )
    with pytest.raises(ValueError, match=r"'action'.*\[3\].*\[2\]"):
        bad_action = {"obs": {}, "action": {"shape": [3]}}
        SequenceDataset(store, bad_action, horizon=4, n_obs_steps=2, n_action_steps=2)
    with pytest.raises(ValueError, match="horizon"):
        SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=4)
    with pytest.raises(ValueError, match="n_obs_steps"):
        SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=0, n_action_steps=2)
    with pytest.raises(ValueError, match="episode id 3 out of range"):
        SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2, episodes=[0, 3])
    with pytest.raises(ValueError, match="episode id 0 listed more than once"):
        SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2, episodes=[0, 0])
    ds = SequenceDataset(store, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    with pytest.raises(IndexError, match="sample index 4"):
        ds[len(ds)]


# ---------------------------------------------------------------------- prepare_obs
def test_prepare_obs():
    low = prepare_obs(np.arange(6, dtype=np.float64).reshape(2, 3), "low_dim")
    assert low.dtype == np.float32 and low.shape == (2, 3)
    frames = np.zeros((2, 3, 4, 5, 3), dtype=np.uint8)  # (B, T, H, W, C)
    frames[..., 1] = 255
    out = prepare_obs(frames, "rgb")
    assert out.dtype == np.float32 and out.shape == (2, 3, 3, 4, 5)
    assert out[:, :, 1].min() == 1.0 and out[:, :, 0].max() == 0.0
    np.testing.assert_array_equal(prepare_obs(frames.astype(np.float32), "rgb"), out)
    with pytest.raises(ValueError, match="unknown obs type 'depth'"):
        prepare_obs(frames, "depth")
    with pytest.raises(ValueError, match="int16"):
        prepare_obs(frames.astype(np.int16), "rgb")


# ---------------------------------------------------------------------- split_episodes
def test_split_episodes_properties():
    train, val = split_episodes(50, val_ratio=0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(50))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again = split_episodes(50, val_ratio=0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    other = split_episodes(50, val_ratio=0.2, seed=4)
    assert not np.array_equal(val, other[1])


def test_split_episodes_edge_cases():
    train, val = split_episodes(5, val_ratio=0.01, seed=0)
    assert len(val) == 1 and len(train) == 4
    train, val = split_episodes(5, val_ratio=0.99, seed=0)
    assert len(train) == 1 and len(val) == 4
    train, val = split_episodes(1, val_ratio=0.5, seed=0)
    assert train.tolist() == [0] and val.tolist() == []
    train, val = split_episodes(5, val_ratio=0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3, 4] and val.size == 0


def test_split_episodes_max_train():
    full_train, val = split_episodes(40, val_ratio=0.25, seed=7)
    train, val2 = split_episodes(40, val_ratio=0.25, seed=7, max_train_episodes=5)
    assert np.array_equal(val, val2)  # validation set unchanged by subsampling
    assert len(train) == 5 and set(train) <= set(full_train)
    assert np.array_equal(train, split_episodes(40, 0.25, 7, max_train_episodes=5)[0])
    assert len(split_episodes(40, 0.25, 7, max_train_episodes=100)[0]) == 30


def test_split_episodes_errors():
    with pytest.raises(ValueError, match="n_episodes"):
        split_episodes(0, 0.1, 0)
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(10, 1.0, 0)
    with pytest.raises(ValueError, match="max_train_episodes"):
        split_episodes(10, 0.1, 0, max_train_episodes=0)


# ---------------------------------------------------------------------- whole batches at once
@pytest.mark.parametrize("cached", [True, False])
def test_get_batch_equals_collated_single_windows(cached):
    from torch.utils.data import default_collate

    ds = SequenceDataset(
        build_store([3, 9, 5]),
        RGB_META,
        horizon=6,
        n_obs_steps=3,
        n_action_steps=2,
        cache_in_memory=cached,
        mask_padded_actions=True,
    )
    indices = [0, len(ds) - 1, 4, 4, 2, -1]  # episode starts and ends (both paddings), repeats, negatives
    batch = ds.get_batch(indices)
    expected = default_collate([ds[i] for i in indices])
    assert set(batch["obs"]) == {"state", "image"}
    for key in ("state", "image"):
        assert batch["obs"][key].dtype == expected["obs"][key].dtype
        assert torch.equal(batch["obs"][key], expected["obs"][key])
    assert torch.equal(batch["action"], expected["action"])
    assert torch.equal(batch["action_is_pad"], expected["action_is_pad"])
    assert torch.equal(ds[np.array(indices)]["action"], expected["action"])  # indexing by a sequence


def test_loader_with_index_list_sampler_yields_whole_batches():
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = SequenceDataset(build_store([7, 6]), RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    loader = DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), 4, drop_last=False), batch_size=None)
    batches = list(loader)
    assert [b["action"].shape[0] for b in batches] == [4, 4, len(ds) - 8]
    assert batches[0]["obs"]["image"].shape == (4, 2, 3, IMG_H, IMG_W)
    assert torch.equal(batches[1]["action"], torch.stack([ds[i]["action"] for i in range(4, 8)]))


def test_get_batch_rejects_bad_indices():
    ds = SequenceDataset(build_store([6]), LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    with pytest.raises(IndexError, match="out of range"):
        ds.get_batch([0, len(ds)])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ds.get_batch([])
    with pytest.raises(ValueError, match="integer"):
        ds.get_batch([0.5, 1.0])


# ---------------------------------------------------------------------- the original's sampling rule
def original_current_steps(length: int, horizon: int, n_obs: int, n_act: int) -> list[int]:
    """Current steps of the windows the original diffusion_policy samples from one episode.

    Its ``create_indices`` lets a window of ``horizon`` steps start at ``-pad_before .. L - H + pad_after``
    (its datasets use pad_before = n_obs_steps - 1, pad_after = n_action_steps - 1); the current step is the
    window's last observed one, start + n_obs_steps - 1.
    """
    pad_before, pad_after = min(n_obs - 1, horizon - 1), min(n_act - 1, horizon - 1)
    return [start + n_obs - 1 for start in range(-pad_before, length - horizon + pad_after + 1)]


@pytest.mark.parametrize(
    "horizon, n_obs, n_act",
    [(16, 2, 8), (10, 2, 8), (32, 2, 16), (8, 2, 4), (6, 3, 2), (4, 1, 4), (12, 4, 3)],
)
def test_window_starts_match_the_original_sampler(horizon, n_obs, n_act):
    lengths = [horizon, horizon + 1, horizon + 7, 40]
    ds = SequenceDataset(
        build_store(lengths), LOW_DIM_META, horizon=horizon, n_obs_steps=n_obs, n_action_steps=n_act
    )
    got = [ds.sample_location(i) for i in range(len(ds))]
    expected = [
        (e, t) for e, n in enumerate(lengths) for t in original_current_steps(n, horizon, n_obs, n_act)
    ]
    assert got == expected


def test_loss_trains_on_edge_repeated_actions_unless_masking_is_asked_for():
    """The original trains on all horizon actions, padded ones included; masking them is an opt-in."""
    from conftest import tiny_config

    from diffpolicy.data.normalize import Normalizer
    from diffpolicy.policy import make_policy

    store = build_store([12])
    kwargs = dict(horizon=16, n_obs_steps=2, n_action_steps=8)
    default = SequenceDataset(store, LOW_DIM_META, **kwargs)
    masked = SequenceDataset(store, LOW_DIM_META, mask_padded_actions=True, **kwargs)
    policy = make_policy(tiny_config().policy, LOW_DIM_META)
    policy.normalizer.load_state_dict(
        Normalizer.fit(default.get_normalizer_data(), {"state": "minmax", "action": "minmax"}).state_dict()
    )
    noise, timesteps = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([50])
    plain, marked = default.get_batch([len(default) - 1]), masked.get_batch([len(masked) - 1])
    # the last window (t = 4, actions at steps 3 .. 18) repeats the episode's last action 7 times
    assert "action_is_pad" not in plain and torch.equal(plain["action"], marked["action"])
    assert marked["action_is_pad"][0].tolist() == [False] * 9 + [True] * 7
    with torch.no_grad():
        loss_all = policy.compute_loss(plain, noise=noise, timesteps=timesteps)
        loss_masked = policy.compute_loss(marked, noise=noise, timesteps=timesteps)
        unmarked = {**marked, "action_is_pad": torch.zeros_like(marked["action_is_pad"])}
        assert torch.equal(loss_all, policy.compute_loss(unmarked, noise=noise, timesteps=timesteps))
    assert not torch.allclose(loss_all, loss_masked)


@pytest.mark.parametrize("mode", ["pad", "skip", "error"])
def test_short_episodes_rule(mode, caplog):
    lengths = [20, 5, 16, 3]  # horizon 16: episodes 1 and 3 are short
    kwargs = dict(horizon=16, n_obs_steps=2, n_action_steps=8, short_episodes=mode)
    store = build_store(lengths)
    if mode == "error":
        with pytest.raises(
            ValueError,
            match=r"2 of the 4 episode\(s\) used are shorter than policy.horizon=16: "
            r"1 \(5 steps\), 3 \(3 steps\).*data.short_episodes=pad.*skip",
        ):
            SequenceDataset(store, LOW_DIM_META, **kwargs)
        return
    with caplog.at_level("WARNING", logger="diffpolicy"):
        ds = SequenceDataset(store, LOW_DIM_META, **kwargs)
    assert "2 of the 4 episode(s) used are shorter than policy.horizon=16" in caplog.text
    episodes = {ds.sample_location(i)[0] for i in range(len(ds))}
    if mode == "skip":
        assert "skipped them" in caplog.text
        assert ds.episode_ids.tolist() == [0, 2] and episodes == {0, 2}
    else:
        assert "kept them, edge-padded" in caplog.text
        assert episodes == {0, 1, 2, 3}
        # an episode too short for the original's padding still gives its t = 0 window
        assert [ds.sample_location(i) for i in range(len(ds)) if ds.sample_location(i)[0] == 3] == [(3, 0)]
    with pytest.raises(ValueError, match="leaves none"):
        SequenceDataset(store, LOW_DIM_META, episodes=[1, 3], **{**kwargs, "short_episodes": "skip"})


def test_empty_store_is_named(tmp_path: Path):
    path = tmp_path / "empty.zarr"
    EpisodeStore.create(path)
    with pytest.raises(ValueError, match=rf"episode store {path} holds no episodes"):
        SequenceDataset(path, LOW_DIM_META, horizon=4, n_obs_steps=2, n_action_steps=2)
    from diffpolicy.data.sequence import split_store

    with pytest.raises(ValueError, match=rf"episode store {path} holds no episodes"):
        split_store(EpisodeStore.open(path), 0.1, 0)


def test_split_store_uses_the_datasets_own_split():
    from diffpolicy.data.sequence import split_store

    store = build_store([20] * 6)
    train, val, note = split_store(store, 0.5, 0)
    assert "random by data.val_ratio=0.5" in note and len(val) == 3
    store.attrs["source"] = {"format": "robomimic", "splits": {"train": [0, 2, 3, 5], "valid": [1, 4]}}
    train, val, note = split_store(store, 0.5, 0)
    assert train.tolist() == [0, 2, 3, 5] and val.tolist() == [1, 4]
    assert "robomimic's own mask/train (4 episodes) / mask/valid (2)" in note
    train, _, _ = split_store(store, 0.5, 0, max_train_episodes=2)
    assert len(train) == 2 and set(train) <= {0, 2, 3, 5}
    assert "random" in split_store(store, 0.5, 0, rule="random")[2]
    store.attrs["source"] = {"format": "robomimic", "splits": {"train": [0, 2, 3, 5]}}
    assert split_store(store, 0.5, 0)[1].tolist() == [1, 4]  # no mask/valid: the other episodes


def test_split_store_skips_short_episodes_before_splitting():
    from diffpolicy.data.sequence import split_store

    store = build_store([20, 5, 20, 3, 20, 20])
    train, val, note = split_store(store, 0.5, 0, horizon=16, short_episodes="skip")
    assert sorted([*train, *val]) == [0, 2, 4, 5] and len(val) == 2
    assert "2 of the 6 episode(s) used are shorter" in note and "skipped" in note
    with pytest.raises(ValueError, match="data.short_episodes=pad"):
        split_store(store, 0.5, 0, horizon=16, short_episodes="error")
    train, val, _ = split_store(store, 0.5, 0, horizon=16, short_episodes="pad")
    assert len(train) + len(val) == 6


def test_pad_after_beyond_the_window_is_refused():
    with pytest.raises(ValueError, match=r"pad_after must be an integer in \[0, horizon - 1 = 7\]"):
        SequenceDataset(
            build_store([10]), LOW_DIM_META, horizon=8, n_obs_steps=2, n_action_steps=4, pad_after=8
        )


def test_training_skips_or_pads_short_episodes_and_logs_the_count(tmp_path: Path):
    """Episodes shorter than the horizon neither stop training nor pass unseen: the user's choice
    (data.short_episodes) is applied and the run's log counts them."""
    from conftest import TINY
    from formats_helpers import train_and_act

    rng = np.random.default_rng(0)
    store = EpisodeStore.create(tmp_path / "demos.zarr")
    for n in (30, 5, 30, 9, 30, 30):
        store.add_episode({"state": rng.normal(size=(n, 3)), "action": rng.normal(size=(n, 2))})
    base = [
        *TINY,
        "task.name=",
        f"data.path={tmp_path / 'demos.zarr'}",
        "train.num_steps=2",
        "eval.n_episodes=0",
    ]
    base += ["data.val_ratio=0.34", "data.split_seed=0"]
    for mode in ("skip", "pad"):
        run = tmp_path / mode
        train_and_act("trajectory2d_lowdim_unet", [*base, f"data.short_episodes={mode}"], run)
        log = (run / "train.log").read_text()
        if mode == "skip":  # dropped before the split: one line for the whole store
            assert "2 of the 6 episode(s) used are shorter than policy.horizon=16: 1 (5 steps), 3 (9" in log
            assert "skipped them" in log and "(3 train, 1 val episodes)" in log
        else:  # kept: each of the train and validation sets counts its own
            counts = re.findall(r"(\d+) of the (\d+) episode\(s\) used are shorter .*kept them", log)
            assert sorted(counts) == [("1", "2"), ("1", "4")] and "(4 train, 2 val episodes)" in log
