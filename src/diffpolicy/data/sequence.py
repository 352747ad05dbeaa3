"""Windowed training samples from an :class:`~diffpolicy.data.episodes.EpisodeStore`.

Index convention (the one place it is defined; the controller and the policy follow it)
--------------------------------------------------------------------------------------
For an episode of length ``L``, current step ``t``, ``To = n_obs_steps`` and ``H = horizon``:

* observation window: steps ``t-To+1 .. t`` (``To`` frames, the last one is the current step);
* action window: steps ``t-To+1 .. t-To+H`` (``H`` actions, starting with the first observed step);
* executed actions: the ``n_action_steps`` actions at window offsets ``To-1 .. To-1+n_action_steps-1``,
  i.e. starting at the current step ``t``.

Steps outside ``[0, L-1]`` are clamped to the episode's first/last step (edge-repeat padding). Windows
never cross episodes.

Which windows exist is the original diffusion_policy's rule (``SequenceSampler`` / ``create_indices``
with ``pad_before = n_obs_steps - 1`` and ``pad_after``, default ``n_action_steps - 1``): a window may
start anywhere from ``pad_before`` steps before the episode to where it ends ``pad_after`` steps past
the episode's end, i.e. current steps ``t = 0 .. L - H + To - 1 + pad_after``. The loss covers all
``H`` actions, edge-repeated ones included, as in the original; ``mask_padded_actions=True`` instead
marks them in ``action_is_pad`` so that the policy's loss skips them (LeRobot's
``do_mask_loss_for_padding``).

Temporal subsampling (``frame_stride = k``, ``data.frame_stride``; e.g. 3 on a 30 fps recording): a window
takes every k-th frame, observations at ``t-(To-1)k, ..., t-k, t`` and actions at ``t-(To-1)k, ...,
t-(To-1)k+(H-1)k``, so the policy sees and predicts at ``fps / k``. Every phase offset is kept: an episode of
length ``L`` acts as ``k`` sub-episodes (phase ``p`` = frames ``p, p+k, p+2k, ...``, ``ceil((L-p)/k)`` of
them), and each sub-episode gets the windows, edge padding and short-episode rule above in its own frames.
So all frames remain in use (k times the windows of one phase, of k-fold shorter episodes) and no window mixes
phases; a split keeps all of an episode's sub-episodes on one side (it splits store episodes). The policy
then acts at ``fps / k``: the controller holds each action for ``k`` control steps (control.py).

Short episodes (``L < H``; with a frame stride, ``ceil(L / k) < H``): the one rule for every dataset format
is ``short_episodes``: ``"pad"`` (default) keeps them with the windows above, and at least the one at
``t = 0`` (padded at both ends; the original gives an episode shorter than ``H - pad_before - pad_after``
no window at all);
``"skip"`` drops them; ``"error"`` refuses the dataset. Either way the log says how many there were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffpolicy.data.episodes import EpisodeStore

__all__ = [
    "OBS_TYPES",
    "SHORT_EPISODES",
    "SPLIT_RULES",
    "SequenceDataset",
    "apply_short_rule",
    "features_key",
    "prepare_obs",
    "split_episodes",
    "split_store",
]

log = logging.getLogger(__name__)

OBS_TYPES = ("low_dim", "rgb")
FEATURES_SUFFIX = "@features"


def features_key(key: str) -> str:
    """The batch entry that carries camera `key`'s cached backbone feature maps in place of its frames
    (policy.vision.cache_features; BasePolicy.encode_obs reads it)."""
    return key + FEATURES_SUFFIX


# rows of the store (1-D or 2-D int64 array) -> their cached feature maps as one tensor (*rows.shape, C, h, w)
FeatureGather = Callable[[np.ndarray], torch.Tensor]
SHORT_EPISODES = ("pad", "skip", "error")  # what to do with episodes shorter than the horizon
SPLIT_RULES = ("auto", "random")  # auto: the dataset's own train/valid split when it has one


def prepare_obs(value: np.ndarray, obs_type: str) -> np.ndarray:
    """Convert stored/env observations to the policy's input layout.

    ``low_dim``: float32, shape unchanged. ``rgb``: ``(..., H, W, C)`` uint8 (0..255) or float in
    0..255 (the original Push-T data) -> float32 ``(..., C, H, W)`` in [0, 1]. Float frames are always
    divided by 255; SequenceDataset refuses stored float frames that are already in [0, 1].
    """
    arr = np.asarray(value)
    if obs_type == "low_dim":
        return arr.astype(np.float32, copy=False)
    if obs_type == "rgb":
        if arr.ndim < 3:
            raise ValueError(f"rgb observation must have shape (..., H, W, C), got {arr.shape}")
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise ValueError(f"rgb observation must be uint8 or float in 0..255, got dtype {arr.dtype}")
        out = np.moveaxis(arr, -1, -3).astype(np.float32)
        out *= np.float32(1.0 / 255.0)
        return out
    raise ValueError(f"unknown obs type {obs_type!r}; expected one of {OBS_TYPES}")


def split_episodes(
    n_episodes: int, val_ratio: float, seed: int, max_train_episodes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split episode ids ``0..n_episodes-1`` into sorted ``(train_ids, val_ids)`` with a seeded RNG.

    Whole episodes go to one side. With ``val_ratio > 0`` and more than one episode there is at least
    one validation episode; there is always at least one training episode. ``max_train_episodes``
    subsamples the training episodes (seeded), e.g. for data-scaling experiments.
    """
    if int(n_episodes) != n_episodes or n_episodes < 1:
        raise ValueError(f"n_episodes must be a positive integer, got {n_episodes}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if max_train_episodes is not None and max_train_episodes < 1:
        raise ValueError(f"max_train_episodes must be >= 1 or None, got {max_train_episodes}")
    n_episodes = int(n_episodes)
    n_val = round(n_episodes * val_ratio)
    if val_ratio > 0 and n_episodes > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, n_episodes - 1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_episodes)
    val_ids = perm[:n_val]
    train_ids = perm[n_val:]
    if max_train_episodes is not None and len(train_ids) > max_train_episodes:
        train_ids = rng.choice(train_ids, size=max_train_episodes, replace=False)
    return np.sort(train_ids).astype(np.int64), np.sort(val_ids).astype(np.int64)


def split_store(
    store: EpisodeStore,
    val_ratio: float,
    seed: int,
    max_train_episodes: int | None = None,
    rule: str = "auto",
    *,
    horizon: int | None = None,
    short_episodes: str = "pad",
    frame_stride: int = 1,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Sorted ``(train_ids, val_ids)`` of the episodes of ``store``, and a line saying which rule made them.

    ``rule="auto"`` uses the dataset's own split when its import recorded one (robomimic's ``mask/train``
    and ``mask/valid``, kept in the store's ``source.splits``; without ``valid`` the other episodes
    validate), else :func:`split_episodes` by ``val_ratio`` / ``seed``; ``rule="random"`` always uses
    :func:`split_episodes`. ``max_train_episodes`` subsamples the training side (seeded) either way. With
    ``horizon`` and ``short_episodes="skip"`` the episodes shorter than ``horizon`` are dropped before the
    split (so neither side is left with only short ones); ``"error"`` refuses them here.
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")
    n = store.n_episodes
    if n == 0:
        raise ValueError(f"episode store {_store_name(store)} holds no episodes (nothing to train on)")
    usable = np.arange(n, dtype=np.int64)
    skipped = ""
    if horizon is not None and short_episodes != "pad":
        usable, note = apply_short_rule(store, usable, horizon, short_episodes, frame_stride)
        skipped = f"; {note}" if note else ""
    source = store.attrs.get("source") or {}
    splits = source.get("splits") or {} if isinstance(source, dict) else {}
    if rule == "auto" and isinstance(splits, dict) and splits.get("train"):
        train = np.asarray(splits["train"], dtype=np.int64)
        val = np.asarray(
            splits["valid"] if splits.get("valid") else np.setdiff1d(np.arange(n), train), np.int64
        )
        bad = [int(i) for i in np.concatenate([train, val]) if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"episode store {_store_name(store)}: its recorded split names episode {bad[0]}, but it "
                f"holds {n} episodes (use data.split=random)"
            )
        train, val = np.intersect1d(train, usable), np.intersect1d(val, usable)
        if not len(train):
            raise ValueError(f"episode store {_store_name(store)}: the dataset's own train split is empty")
        if max_train_episodes is not None and len(train) > max_train_episodes:
            train = np.sort(np.random.default_rng(seed).choice(train, size=max_train_episodes, replace=False))
        fmt = source.get("format", "the dataset")
        has_valid = "mask/valid" if splits.get("valid") else "the other episodes"
        note = (
            f"split: {fmt}'s own mask/train ({len(train)} episodes) / {has_valid} ({len(val)}) "
            f"(data.split=auto; random splits by data.val_ratio instead){skipped}"
        )
        return train, val, note
    train_pos, val_pos = split_episodes(len(usable), val_ratio, seed, max_train_episodes)
    train, val = usable[train_pos], usable[val_pos]
    note = (
        f"split: random by data.val_ratio={val_ratio}, data.split_seed={seed} "
        f"({len(train)} train, {len(val)} val episodes){skipped}"
    )
    return train, val, note


def _store_name(store: EpisodeStore) -> str:
    return str(store.path) if store.path is not None else "<in memory>"


def apply_short_rule(
    store: EpisodeStore, ids: np.ndarray, horizon: int, mode: str, frame_stride: int = 1
) -> tuple[np.ndarray, str | None]:
    """Episodes ``ids`` of ``store`` after the short-episode rule (``mode`` in :data:`SHORT_EPISODES`, see
    the module docstring), and a line saying what was done (None when no episode is shorter than
    ``horizon``). ``"error"``, or ``"skip"`` with every episode short, raises a ValueError naming the store.
    With ``frame_stride`` k an episode's length counts in subsampled steps, ``ceil(L / k)``.
    """
    if mode not in SHORT_EPISODES:
        raise ValueError(f"short_episodes must be one of {SHORT_EPISODES}, got {mode!r}")
    lengths = -(-store.episode_lengths[ids] // frame_stride)
    short = lengths < horizon
    n_short = int(short.sum())
    if not n_short:
        return ids, None
    listed = ", ".join(
        f"{int(i)} ({int(n)} steps)" for i, n in zip(ids[short][:5], lengths[short][:5], strict=True)
    )
    strided = f" at data.frame_stride={frame_stride}" if frame_stride > 1 else ""
    what = (
        f"episode store {_store_name(store)}: {n_short} of the {len(ids)} episode(s) used are shorter than "
        f"policy.horizon={horizon}{strided}: {listed}{' ...' if n_short > 5 else ''}"
    )
    if mode == "error":
        raise ValueError(
            f"{what}; set data.short_episodes=pad (keep them, edge-padded) or skip (drop them), "
            "or lower policy.horizon"
        )
    if mode == "skip":
        if short.all():
            raise ValueError(f"{what}; skipping them leaves none (data.short_episodes=pad keeps them)")
        return ids[~short], f"{what}; skipped them (data.short_episodes=skip)"
    return ids, f"{what}; kept them, edge-padded (data.short_episodes=pad; skip drops them)"


def _contiguous_runs(starts: np.ndarray, stops: np.ndarray) -> list[tuple[int, int]]:
    """Merge sorted, non-overlapping [start, stop) ranges that touch into maximal runs."""
    runs: list[tuple[int, int]] = []
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


class SequenceDataset(Dataset):
    """Training windows (``n_obs_steps`` observations, ``horizon`` actions) over whole episodes.

    Items are ``{"obs": {key: float32 (To, *shape)}, "action": float32 (H, Da)}``, plus
    ``"action_is_pad": bool (H,)`` with ``mask_padded_actions``; rgb observations come out as float32
    (To, C, H, W) in [0, 1]. See the module docstring for the index convention, the windows and the
    short-episode rule.
    """

    def __init__(
        self,
        store: EpisodeStore | str | os.PathLike,
        shape_meta: Mapping[str, Any],
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        pad_after: int | None = None,
        episodes: Sequence[int] | None = None,
        action_key: str = "action",
        cache_in_memory: bool = True,
        short_episodes: str = "pad",
        mask_padded_actions: bool = False,
        frame_stride: int = 1,
        feature_keys: Sequence[str] = (),
    ):
        """`feature_keys`: camera keys whose frames are not read: their items carry cached backbone
        feature maps (`features_key(key)`) from the gathers `attach_features` is given."""
        for name, value in (
            ("horizon", horizon),
            ("n_obs_steps", n_obs_steps),
            ("n_action_steps", n_action_steps),
            ("frame_stride", frame_stride),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if horizon < n_obs_steps - 1 + n_action_steps:
            raise ValueError(
                f"horizon ({horizon}) must be >= n_obs_steps - 1 + n_action_steps "
                f"({n_obs_steps} - 1 + {n_action_steps}) so the executed actions fit in the window"
            )
        if pad_after is None:
            pad_after = n_action_steps - 1
        if int(pad_after) != pad_after or not 0 <= pad_after < horizon:
            raise ValueError(
                f"pad_after must be an integer in [0, horizon - 1 = {horizon - 1}], got {pad_after}"
            )
        if short_episodes not in SHORT_EPISODES:
            raise ValueError(f"short_episodes must be one of {SHORT_EPISODES}, got {short_episodes!r}")
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.pad_after = int(pad_after)
        self.action_key = action_key
        self.cache_in_memory = bool(cache_in_memory)
        self.short_episodes = short_episodes
        self.mask_padded_actions = bool(mask_padded_actions)
        self.frame_stride = int(frame_stride)
        self.feature_keys = sorted(feature_keys)
        self._features: dict[str, FeatureGather] = {}

        if isinstance(store, EpisodeStore):
            self._store: EpisodeStore | None = store
        else:
            self._store = EpisodeStore.open(store, mode="r")
        self._store_path: Path | None = self._store.path
        self._store_pid = os.getpid()
        n_total = self._store.n_episodes
        if n_total == 0:
            raise ValueError(
                f"episode store {_store_name(self._store)} holds no episodes (nothing to train on)"
            )
        self.obs_types, self.obs_shapes, self.action_dim = self._check_shape_meta(shape_meta, self._store)
        not_rgb = [k for k in self.feature_keys if self.obs_types.get(k) != "rgb"]
        if not_rgb:
            raise ValueError(f"feature_keys {not_rgb} are not camera (rgb) keys of shape_meta")
        for key, obs_type in self.obs_types.items():
            if obs_type == "rgb" and self._store[key].dtype.kind == "f":
                self._check_float_frames(key)

        # Episodes of this dataset: global step ranges and per-episode bases into the sample source.
        ids = (
            np.arange(n_total, dtype=np.int64)
            if episodes is None
            else self._check_episode_ids(episodes, n_total)
        )
        ids, note = apply_short_rule(self._store, ids, self.horizon, self.short_episodes, self.frame_stride)
        if note:
            log.warning("%s", note)
        self._episode_ids = ids
        all_ends = self._store.episode_ends
        self._ep_stops = all_ends[ids]
        self._ep_starts = np.where(ids > 0, all_ends[np.maximum(ids - 1, 0)], 0).astype(np.int64)
        self._ep_lengths = self._ep_stops - self._ep_starts

        # Sub-episodes (one per episode, or with frame_stride k one per phase p < min(k, L): frames p, p+k,
        # ...): the episode position, phase and length (in subsampled steps) of each.
        k = self.frame_stride
        phases = np.minimum(k, self._ep_lengths)
        self._sub_ep = np.repeat(np.arange(len(ids), dtype=np.int64), phases)
        self._sub_phase = np.arange(int(phases.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(phases) - phases, phases
        )
        self._sub_lengths = (self._ep_lengths[self._sub_ep] - self._sub_phase + k - 1) // k

        # Sample index: (sub-episode, current step t in it), t = 0 .. L - H + To - 1 + pad_after
        # (the original's window starts -pad_before .. L - H + pad_after); at least t = 0 per sub-episode.
        last_t = self._sub_lengths - self.horizon + self.n_obs_steps - 1 + self.pad_after
        counts = np.maximum(last_t, 0) + 1
        self._sample_sub = np.repeat(np.arange(len(self._sub_ep), dtype=np.int64), counts)
        offsets = np.cumsum(counts) - counts
        self._sample_t = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(offsets, counts)

        self._cache: dict[str, np.ndarray] | None = None
        if self.cache_in_memory:
            self._cache = {key: self._read_episodes(key) for key in self._needed_keys()}
            # Cached arrays hold only the selected episodes, back to back.
            self._bases = np.cumsum(self._ep_lengths) - self._ep_lengths
        else:
            self._bases = self._ep_starts.copy()

    # ------------------------------------------------------------------ validation helpers
    def _check_shape_meta(
        self, shape_meta: Mapping[str, Any], store: EpisodeStore
    ) -> tuple[dict[str, str], dict[str, tuple[int, ...]], int]:
        if "obs" not in shape_meta or "action" not in shape_meta:
            raise KeyError(f"shape_meta needs 'obs' and 'action' entries, got {sorted(shape_meta)}")
        obs_types: dict[str, str] = {}
        obs_shapes: dict[str, tuple[int, ...]] = {}
        for key, meta in shape_meta["obs"].items():
            obs_type = meta.get("type", "low_dim")
            if obs_type not in OBS_TYPES:
                raise ValueError(f"obs key {key!r}: unknown type {obs_type!r}; expected one of {OBS_TYPES}")
            if "shape" not in meta:
                raise KeyError(f"shape_meta obs key {key!r} has no 'shape'")
            declared = tuple(int(s) for s in meta["shape"])
            if key not in store:
                raise KeyError(f"obs key {key!r} not in episode store; store keys: {store.keys}")
            stored = tuple(store[key].shape[1:])
            dtype = store[key].dtype
            if obs_type == "rgb":
                if len(declared) != 3 or len(stored) != 3:
                    raise ValueError(
                        f"rgb key {key!r}: declared shape {list(declared)} must be [C, H, W] and stored "
                        f"per-step shape {stored} must be (H, W, C)"
                    )
                c, h, w = declared
                if stored != (h, w, c):
                    raise ValueError(
                        f"rgb key {key!r}: declared shape [C, H, W] = {list(declared)} but store holds "
                        f"(H, W, C) = {stored}"
                    )
                if dtype != np.uint8 and dtype.kind != "f":
                    raise ValueError(f"rgb key {key!r}: stored dtype {dtype} must be uint8 or float 0..255")
            else:
                if stored != declared:
                    raise ValueError(
                        f"low_dim key {key!r}: declared shape {list(declared)} but store holds "
                        f"per-step shape {list(stored)}"
                    )
                if dtype.kind not in "biuf":
                    raise ValueError(f"low_dim key {key!r}: stored dtype {dtype} is not numeric")
            obs_types[key] = obs_type
            obs_shapes[key] = declared
        if "action" in obs_types and self.action_key != "action":
            raise ValueError(
                "obs key 'action' would clash with the 'action' entry of items and normalizer data "
                f"(action_key is {self.action_key!r}); rename the obs key"
            )
        if "shape" not in shape_meta["action"]:
            raise KeyError("shape_meta['action'] has no 'shape'")
        declared_action = tuple(int(s) for s in shape_meta["action"]["shape"])
        if len(declared_action) != 1:
            raise ValueError(f"action shape must be [Da], got {list(declared_action)}")
        if self.action_key not in store:
            raise KeyError(f"action key {self.action_key!r} not in episode store; store keys: {store.keys}")
        stored_action = tuple(store[self.action_key].shape[1:])
        if stored_action != declared_action:
            raise ValueError(
                f"action key {self.action_key!r}: declared shape {list(declared_action)} but store holds "
                f"per-step shape {list(stored_action)}"
            )
        return obs_types, obs_shapes, declared_action[0]

    def _check_float_frames(self, key: str, n_frames: int = 64) -> None:
        """Refuse float frames already in [0, 1]: the rgb rule divides float frames by 255 (they are taken as
        0..255, like the original Push-T's), which would leave these in [0, 0.004] without a word.

        Looks at ``n_frames`` frames spread over the store (a 0..255 dataset whose every one of them is
        black, max <= 1, would be refused too; converting it loses nothing).
        """
        arr = self._store[key]
        steps = np.unique(np.linspace(0, arr.shape[0] - 1, min(n_frames, arr.shape[0])).astype(np.int64))
        high = max(float(np.max(np.asarray(arr[i : i + 1]))) for i in steps)
        if high <= 1.0:
            raise ValueError(
                f"rgb key {key!r} of episode store {_store_name(self._store)} holds float values in [0, 1] "
                f"(max {high:.3g} over {len(steps)} frames); float frames are read as 0..255 and divided by "
                "255, so these would train on [0, 0.004]: multiply by 255 (or store uint8) first"
            )

    @staticmethod
    def _check_episode_ids(episodes: Sequence[int], n_total: int) -> np.ndarray:
        ids = np.asarray(episodes)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("episodes must be a non-empty 1-D sequence of episode ids")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"episode ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= n_total)]
        if bad.size:
            raise ValueError(f"episode id {int(bad[0])} out of range for store with {n_total} episodes")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"episode id {int(unique[counts > 1][0])} listed more than once")
        return unique

    # ------------------------------------------------------------------ data access
    def _needed_keys(self) -> list[str]:
        return sorted({*self.obs_types, self.action_key} - set(self.feature_keys))

    def attach_features(self, gathers: Mapping[str, FeatureGather]) -> None:
        """Give every key of `feature_keys` its cached feature maps, as a function of store rows."""
        missing = [k for k in self.feature_keys if k not in gathers]
        if missing:
            raise ValueError(f"no cached features given for {missing}")
        self._features = {k: gathers[k] for k in self.feature_keys}

    def _obs_entries(self, obs_rows: np.ndarray, ep: np.ndarray) -> dict[str, torch.Tensor]:
        """The observation entries of sample rows `obs_rows` (rows of the sample source, (To,) or (B, To))
        of dataset episodes `ep` (scalar or (B, 1)): frames / low-dim values, or cached feature maps."""
        obs: dict[str, torch.Tensor] = {}
        for key, obs_type in self.obs_types.items():
            if key in self.feature_keys:
                if key not in self._features:
                    raise RuntimeError(
                        f"camera '{key}' reads cached features, but none were attached (attach_features)"
                    )
                store_rows = obs_rows - self._bases[ep] + self._ep_starts[ep]
                obs[features_key(key)] = self._features[key](store_rows)
                continue
            if self._cache is not None and obs_rows.ndim == 2:
                frames = self._cache[key][obs_rows]
            else:
                frames = self._read_rows(key, obs_rows - self._bases[ep], int(self._bases[ep]))
            obs[key] = torch.from_numpy(np.ascontiguousarray(prepare_obs(frames, obs_type)))
        return obs

    def _get_store(self) -> EpisodeStore:
        # In a DataLoader worker (unpickled, or forked: a zip file handle must not be shared across
        # processes) reopen path-backed stores read-only, once per process.
        if self._store_path is not None and (self._store is None or self._store_pid != os.getpid()):
            self._store = EpisodeStore.open(self._store_path, mode="r")
            self._store_pid = os.getpid()
        assert self._store is not None
        return self._store

    def _to_source_dtype(self, key: str, arr: np.ndarray) -> np.ndarray:
        # rgb stays in its stored dtype (uint8 is 4x smaller); everything else becomes float32.
        if self.obs_types.get(key) == "rgb":
            return arr
        return arr.astype(np.float32, copy=False)

    def _read_episodes(self, key: str) -> np.ndarray:
        """All steps of this dataset's episodes for ``key``: one read per contiguous run of episodes."""
        zarr_array = self._get_store()[key]
        runs = _contiguous_runs(self._ep_starts, self._ep_stops)
        parts = [np.asarray(zarr_array[a:b]) for a, b in runs]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return self._to_source_dtype(key, arr)

    def _read_rows(self, key: str, steps: np.ndarray, base: int) -> np.ndarray:
        """Rows ``base + steps`` of ``key`` (``steps`` sorted): reads only the span they cover."""
        if self._cache is not None:
            return self._cache[key][base + steps]
        lo, hi = int(steps[0]), int(steps[-1]) + 1
        block = np.asarray(self._get_store()[key][base + lo : base + hi])
        return self._to_source_dtype(key, block[steps - lo])

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return int(self._sample_t.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self._episode_ids.shape[0])

    @property
    def episode_ids(self) -> np.ndarray:
        """Sorted ids (in the store) of the episodes in this dataset."""
        return self._episode_ids.copy()

    @property
    def store(self) -> EpisodeStore:
        return self._get_store()

    def sample_location(self, index: int) -> tuple[int, int]:
        """``(episode_id, t)`` of sample ``index``: the store episode and the current step (frame) in it."""
        i = self._check_index(index)
        sub = self._sample_sub[i]
        t = int(self._sub_phase[sub]) + self.frame_stride * int(self._sample_t[i])
        return int(self._episode_ids[self._sub_ep[sub]]), t

    def _sub_rows(self, sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(length in subsampled steps, row of its first frame) of sub-episodes ``sub`` in the sample
        source (the cache or the store); step j of one is row ``first + frame_stride * j``."""
        return self._sub_lengths[sub], self._bases[self._sub_ep[sub]] + self._sub_phase[sub]

    def _check_index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"sample index {index} out of range for dataset with {n} samples")
        return i % n

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> dict[str, Any]:
        """One window, or with a sequence of indices the whole batch at once (see `get_batch`)."""
        if not isinstance(index, (int, np.integer)):
            return self.get_batch(index)
        i = self._check_index(index)
        t = int(self._sample_t[i])
        length, base = (int(x) for x in self._sub_rows(self._sample_sub[i]))
        first = t - self.n_obs_steps + 1
        k = self.frame_stride

        obs_steps = np.clip(np.arange(first, t + 1), 0, length - 1)
        obs = self._obs_entries(base + k * obs_steps, self._sub_ep[self._sample_sub[i]])

        raw_steps = np.arange(first, first + self.horizon)
        actions = self._read_rows(self.action_key, k * np.clip(raw_steps, 0, length - 1), base)
        return self._item(obs, actions, raw_steps, length)

    def _item(
        self, obs: dict[str, torch.Tensor], actions: np.ndarray, raw_steps: np.ndarray, length: Any
    ) -> dict[str, Any]:
        item = {"obs": obs, "action": torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32))}
        if self.mask_padded_actions:
            item["action_is_pad"] = torch.from_numpy((raw_steps < 0) | (raw_steps > length - 1))
        return item

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Windows ``indices`` stacked as a batch: exactly ``default_collate([self[i] for i in indices])``.

        One gather per key over the in-memory arrays instead of a Python loop over samples, and images
        converted to float once for the whole batch. A DataLoader uses it when its sampler yields index
        lists and ``batch_size=None`` (as the trainer's does).
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise ValueError("a batch needs a non-empty 1-D sequence of integer sample indices")
        n = len(self)
        if ((idx < -n) | (idx >= n)).any():
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"sample index {bad} out of range for dataset with {n} samples")
        idx = idx.astype(np.int64) % n
        if self._cache is None:  # reads are per sample anyway: collate the single windows
            from torch.utils.data import default_collate

            return default_collate([self[int(i)] for i in idx])
        length, base = (x[:, None] for x in self._sub_rows(self._sample_sub[idx]))
        k = self.frame_stride
        first = self._sample_t[idx][:, None] - self.n_obs_steps + 1
        obs_rows = base + k * np.clip(first + np.arange(self.n_obs_steps), 0, length - 1)  # (B, To)
        obs = self._obs_entries(obs_rows, self._sub_ep[self._sample_sub[idx]][:, None])
        raw_steps = first + np.arange(self.horizon)  # (B, H)
        actions = self._cache[self.action_key][base + k * np.clip(raw_steps, 0, length - 1)]
        return self._item(obs, actions, raw_steps, length)

    def get_normalizer_data(self) -> dict[str, np.ndarray]:
        """All steps of this dataset's episodes as ``(N, D)`` float32, per low-dim obs key and "action".

        rgb keys are omitted (images use a fixed [0, 1] -> [-1, 1] map).
        """
        out: dict[str, np.ndarray] = {}
        for key in [k for k, v in self.obs_types.items() if v == "low_dim"] + [self.action_key]:
            arr = self._cache[key] if self._cache is not None else self._read_episodes(key)
            name = "action" if key == self.action_key else key
            out[name] = np.asarray(arr, dtype=np.float32).reshape(arr.shape[0], -1)
        return out

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._store_path is not None:
            state["_store"] = None  # reopened lazily in the worker
        return state

    def __repr__(self) -> str:
        return (
            f"SequenceDataset(n_samples={len(self)}, n_episodes={self.n_episodes}, horizon={self.horizon}, "
            f"n_obs_steps={self.n_obs_steps}, n_action_steps={self.n_action_steps}, "
            f"pad_after={self.pad_after}, short_episodes={self.short_episodes!r}, "
            f"mask_padded_actions={self.mask_padded_actions}, frame_stride={self.frame_stride}, "
            f"obs={self.obs_types}, "
            f"cached={self.cache_in_memory})"
        )
