"""Minari datasets in a local folder (``metadata.json`` + ``main_data.hdf5``, or Minari's arrow layout).

PATH may be the dataset folder (``~/.minari/datasets/D4RL/pointmaze/large-v2``), its ``data`` folder or
the ``main_data.hdf5`` file. Episodes are read through minari's own ``MinariDataset`` (so hdf5, arrow and
JPEG-encoded images all work); nothing is downloaded.

Observations: a ``Dict`` space gives one store key per part (nested parts joined with ``_``), a ``Box``
space the key ``obs``. Minari stores T+1 observations for T actions (the last one follows the final
action); the last is dropped so every step pairs the observation seen with the action taken.

``flatten`` names vector parts to concatenate, in that order, into one low-dim key ``state``:

* ``None`` (default): goal-style data (a dict with ``observation`` and ``desired_goal``, as PointMaze;
  seed 000 trains on those two) flattens ``observation`` + ``desired_goal``; any other dataset trains as
  it is (a Box observation as ``obs``, a dict as its parts);
* ``[]``: every part is its own input; a list: those parts (each must exist).

After flattening, ``shape_meta`` holds ``state`` and every camera (an image cannot be concatenated);
the other parts (e.g. ``achieved_goal``, which repeats the position) stay in the store, and
``data.obs_keys`` may name any of them, flattened or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffpolicy.data.formats.base import (
    ForeignDataset,
    FormatError,
    check_finite,
    check_lengths,
    obs_spec,
    require,
)

__all__ = ["read_minari"]

FLATTEN_KEY = "state"
GOAL_PARTS = ("observation", "desired_goal")  # goal-style dict observations flatten these by default


def _data_dir(path: Path) -> Path:
    p = path.parent if path.is_file() else path
    if (p / "data" / "metadata.json").is_file():
        p = p / "data"
    if not (p / "metadata.json").is_file():
        raise FormatError(path, "not a Minari dataset (no metadata.json)")
    return p


def _flat_parts(obs: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{part: array} of a (nested) dict observation; a plain array is ``obs``."""
    if not isinstance(obs, dict):
        return {prefix or "obs": np.asarray(obs)}
    out: dict[str, np.ndarray] = {}
    for key, value in obs.items():
        out.update(_flat_parts(value, f"{prefix}_{key}" if prefix else str(key)))
    return out


def _hdf5_without_episodes(path: Path) -> bool:
    """Whether ``path`` opens as HDF5 and holds no ``episode_*`` group (an empty dataset file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return not any(name.startswith("episode_") for name in f)
    except OSError:
        return False


def read_minari(path: str | os.PathLike, flatten: Sequence[str] | None = None) -> ForeignDataset:
    """Describe a local Minari dataset for import (see the module docstring for keys and flattening)."""
    minari = require("minari")
    gym_spaces = require("gymnasium.spaces")
    root = _data_dir(Path(path))
    data_file = root / "main_data.hdf5"
    where = data_file if data_file.exists() else root
    if data_file.is_file() and data_file.stat().st_size == 0:
        raise FormatError(
            data_file, "the file is empty (0 bytes): the dataset was never written, or truncated"
        )
    try:
        dataset = minari.MinariDataset(root)
        if dataset.total_episodes == 0:
            raise FormatError(where, "holds no episodes (the metadata lists none)")
        lengths = [
            int(m["total_steps"]) for m in dataset.storage.get_episode_metadata(dataset.episode_indices)
        ]
        first = next(dataset.iterate_episodes())
    except FormatError:
        raise
    except (OSError, KeyError, ValueError, StopIteration, AssertionError) as e:
        if data_file.is_file() and _hdf5_without_episodes(data_file):
            raise FormatError(data_file, "holds no episodes (no episode_* groups)") from None
        raise FormatError(where, f"cannot read the Minari dataset (corrupt or incomplete?): {e!r}") from None
    if not isinstance(dataset.action_space, gym_spaces.Box):
        raise FormatError(
            root / "metadata.json", f"action space {dataset.action_space} is not a Box (continuous)"
        )
    parts = _flat_parts(first.observations)
    if flatten is None:
        flatten = list(GOAL_PARTS) if all(k in parts for k in GOAL_PARTS) else []
    flatten = list(flatten)
    if flatten and FLATTEN_KEY in parts:
        raise FormatError(
            root / "metadata.json",
            f"an observation part is already named {FLATTEN_KEY!r}; flatten_obs=[] keeps the parts as "
            "they are",
        )
    missing = [k for k in flatten if k not in parts]
    if missing:
        raise FormatError(
            root / "metadata.json",
            f"observation parts {missing} to flatten are missing (missing features); has {sorted(parts)}",
        )
    obs_meta: dict[str, Any] = {}
    for key, value in parts.items():
        spec = obs_spec(key, tuple(value.shape[1:]), value.dtype)
        if spec is not None:
            obs_meta[key] = spec
    if flatten:
        bad = [
            k
            for k in flatten
            if obs_meta.get(k, {}).get("type") != "low_dim" or len(obs_meta[k]["shape"]) != 1
        ]
        if bad:
            raise FormatError(
                root / "metadata.json", f"observation parts {bad} are not vectors; cannot flatten them"
            )
        shape_meta_obs = {
            FLATTEN_KEY: {"shape": [sum(obs_meta[k]["shape"][0] for k in flatten)], "type": "low_dim"},
            **{k: m for k, m in obs_meta.items() if m["type"] == "rgb"},
        }
    else:
        shape_meta_obs = obs_meta
    action_dim = int(np.prod(dataset.action_space.shape))
    shape_meta = {"obs": shape_meta_obs, "action": {"shape": [action_dim]}}
    keys = list(obs_meta)

    def episodes(low_dim_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        read = [k for k in keys if not (low_dim_only and obs_meta[k]["type"] == "rgb")]
        try:
            for episode in dataset.iterate_episodes():
                where_ep = f"episode {episode.id}"
                actions = np.asarray(episode.actions).reshape(len(episode.actions), action_dim)
                n = len(actions)
                obs = _flat_parts(episode.observations)
                out = {k: obs[k][:n] if len(obs[k]) == n + 1 else obs[k] for k in read}
                check_lengths(where, where_ep, {**{k: len(v) for k, v in out.items()}, "actions": n})
                check_finite(where, f"{where_ep} actions", actions)
                if flatten:
                    out[FLATTEN_KEY] = np.concatenate([out[k] for k in flatten], axis=1)
                out["action"] = actions
                yield out
        except (OSError, KeyError, ValueError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(where, f"cannot read episode data (corrupt?): {e!r}") from None

    meta = dataset.storage.metadata
    return ForeignDataset(
        path=Path(path),
        format="minari",
        episode_lengths=lengths,
        shape_meta=shape_meta,
        episodes=episodes,
        fps=None,
        source_names={**{k: f"observations/{k}" for k in keys}, "action": "actions"},
        attrs={
            "dataset_id": meta.get("dataset_id"),
            "flatten": {FLATTEN_KEY: list(flatten)} if flatten else {},
            "minari_version": meta.get("minari_version"),
        },
    )
