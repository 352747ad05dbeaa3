"""robomimic HDF5 datasets (read-only), in robomimic's documented layout::

    data/                 attrs: total, env_args (JSON string)
      demo_<i>/           attrs: num_samples
        actions           (T, Da)
        obs/<key>         (T, ...)   e.g. agentview_image (T, 84, 84, 3) uint8, robot0_eef_pos (T, 3)
        next_obs/, rewards, dones, states   (not needed for behaviour cloning; ignored)
    mask/train, mask/valid  demo names (bytes) of robomimic's own split

Demos are read in robomimic's order (by the number after ``demo_``). Store keys are robomimic's obs
keys unchanged, plus ``action``. ``shape_meta`` is inferred from the arrays: (H, W, C) uint8 (or any key
named ``*image*``) is ``rgb``, vectors are ``low_dim``; anything else (e.g. float depth maps) is skipped
and listed in the store's ``source.skipped``. The fps is robosuite's ``control_freq`` from ``env_args``;
the ``mask/*`` split and ``env_args`` are kept in the store's attrs (``source.splits`` as episode ids,
``source.env_args``). Training splits by ``mask/train`` / ``mask/valid`` (``data.split=auto``, see
``diffpolicy.data.sequence.split_store``).
"""

from __future__ import annotations

import json
import os
import re
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

__all__ = ["is_robomimic", "read_robomimic"]

_HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")


def is_robomimic(path: str | os.PathLike) -> bool:
    """An HDF5 file (by suffix) that is not a Minari main_data.hdf5."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in _HDF5_SUFFIXES and not (p.parent / "metadata.json").exists()


def _demo_order(names: Sequence[str]) -> list[str]:
    def number(name: str) -> tuple[int, str]:
        m = re.search(r"(\d+)$", name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=number)


def _with_feature_axis(values: Any) -> np.ndarray:
    """(T,) scalars become (T, 1), matching their shape_meta [1]."""
    arr = np.asarray(values)
    return arr[:, None] if arr.ndim == 1 else arr


def _open(path: Path) -> Any:
    h5py = require("h5py")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FormatError(path, f"not a readable HDF5 file (corrupt or truncated?): {e}") from None


def read_robomimic(path: str | os.PathLike, obs_keys: Sequence[str] | None = None) -> ForeignDataset:
    """Describe a robomimic HDF5 file for import (``obs_keys``: only these, default every usable key)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    with _open(path) as f:
        try:
            data = f["data"]
        except KeyError:
            raise FormatError(path, "missing group 'data' (not a robomimic dataset)") from None
        except OSError as e:
            raise FormatError(path, f"corrupt HDF5 file: {e}") from None
        demos = _demo_order([k for k in data if k.startswith("demo")])
        if not demos:
            raise FormatError(path, "group 'data' holds no demo_* groups")
        first = data[demos[0]]
        for name in ("actions", "obs"):
            if name not in first:
                hint = (
                    "; a raw robosuite demo file has only states: extract observations with robomimic's "
                    "dataset_states_to_obs.py"
                    if name == "obs"
                    else ""
                )
                raise FormatError(path, f"data/{demos[0]} is missing '{name}' (missing feature){hint}")
        available = list(first["obs"].keys())
        wanted = list(obs_keys) if obs_keys else available
        missing = [k for k in wanted if k not in available]
        if missing:
            raise FormatError(
                path, f"data/{demos[0]}/obs is missing {missing} (missing features); has {available}"
            )
        obs_meta: dict[str, Any] = {}
        skipped: list[str] = []
        for key in wanted:
            ds = first["obs"][key]
            spec = obs_spec(key, tuple(ds.shape[1:]), ds.dtype)
            if spec is None:
                if obs_keys:
                    raise FormatError(
                        path, f"obs key {key!r} of shape {ds.shape[1:]} is neither rgb nor low-dim"
                    )
                skipped.append(key)
                continue
            obs_meta[key] = spec
        action_shape = first["actions"].shape
        if len(action_shape) != 2:
            raise FormatError(path, f"data/{demos[0]}/actions must be (T, Da), got {action_shape}")
        lengths = []
        for demo in demos:
            group = data[demo]
            if "actions" not in group or "obs" not in group:
                raise FormatError(path, f"data/{demo} is missing 'actions' or 'obs' (missing feature)")
            lengths.append(int(group["actions"].shape[0]))
        splits = {}
        if "mask" in f:
            order = {name: i for i, name in enumerate(demos)}
            for split in f["mask"]:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][split][:]]
                splits[split] = sorted(order[n] for n in names if n in order)
        env_args = data.attrs.get("env_args")
        env_args = env_args.decode() if isinstance(env_args, bytes) else env_args
    shape_meta = {"obs": obs_meta, "action": {"shape": [int(action_shape[1])]}}
    keys = list(obs_meta)

    def episodes(low_dim_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        read = [k for k in keys if not (low_dim_only and obs_meta[k]["type"] == "rgb")]
        with _open(path) as f:
            for demo in demos:
                where = f"data/{demo}"
                try:
                    group = f["data"][demo]
                    missing = [k for k in read if k not in group["obs"]]
                    if missing:
                        raise FormatError(path, f"{where}/obs is missing {missing} (missing features)")
                    episode = {k: _with_feature_axis(group["obs"][k][:]) for k in read}
                    episode["action"] = np.asarray(group["actions"][:])
                except OSError as e:
                    raise FormatError(path, f"{where}: corrupt HDF5 data: {e}") from None
                check_lengths(path, where, {k: len(v) for k, v in episode.items()})
                check_finite(path, f"{where}/actions", episode["action"])
                yield episode

    try:
        env_meta = json.loads(env_args) if env_args else None
    except json.JSONDecodeError:
        env_meta = env_args
    # robosuite's control frequency is the rate at which actions were recorded
    fps = (env_meta.get("env_kwargs") or {}).get("control_freq") if isinstance(env_meta, dict) else None
    return ForeignDataset(
        path=path,
        format="robomimic",
        episode_lengths=lengths,
        shape_meta=shape_meta,
        episodes=episodes,
        fps=float(fps) if fps else None,
        source_names={**{k: f"obs/{k}" for k in keys}, "action": "actions"},
        attrs={"demos": demos, "splits": splits, "env_args": env_meta, "skipped": skipped},
    )
