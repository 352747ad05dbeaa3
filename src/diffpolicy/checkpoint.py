"""Checkpoint folders: everything needed to rebuild a policy, and optionally to resume training.

    <checkpoint>/
      config.yaml         format tag, policy class, shape_meta, the full run config, step, metrics
      model.safetensors   policy weights (EMA weights when EMA is on), normalizer statistics included
      training_state.pt   only in resumable checkpoints: raw weights, optimizer, LR schedule, EMA, RNG

A folder is written under a temporary name and renamed into place, so a reader never sees a half-written
checkpoint; the previous version is removed only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffpolicy.config import ConfigError, RunConfig, from_dict, to_dict

FORMAT = "diffpolicy-checkpoint/1"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, corrupt or does not match the policy it describes."""


def save_checkpoint(
    path: str | Path,
    policy: torch.nn.Module,
    run_cfg: RunConfig,
    step: int = 0,
    metrics: dict[str, float] | None = None,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint folder at `path` (replacing an older one there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        meta = {
            "format": FORMAT,
            "policy_class": type(policy).__name__,
            "shape_meta": policy.shape_meta,
            "step": int(step),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "run": to_dict(run_cfg),
        }
        with open(tmp / CONFIG_FILE, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.yaml, validated."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        with open(cfg_file) as f:
            meta = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{cfg_file} is corrupt: {e}") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a {FORMAT} config (format={found!r})")
    for key in ("policy_class", "shape_meta", "run"):
        if key not in meta:
            raise CheckpointError(f"{cfg_file} lacks '{key}'")
    return meta


def read_config(path: str | Path) -> tuple[dict[str, Any], RunConfig]:
    """The checkpoint's validated config.yaml and the run config inside it.

    Rebuilding the policy is `diffpolicy.policy.load_policy` (or `<PolicyClass>.from_pretrained`): this
    module knows the folder format, not the policy classes, so that policy.py depends on it and never the
    other way round.
    """
    path = Path(path)
    meta = read_meta(path)
    try:
        run_cfg = from_dict(meta["run"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return meta, run_cfg


def load_weights(policy: torch.nn.Module, path: str | Path) -> None:
    """Load the checkpoint's weights into `policy`, built from the same checkpoint's config."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated: {e}") from None
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: saved {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights} does not match the policy its config describes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {wrong[:5]}"
        )
    policy.load_state_dict(state)
    if not policy.normalizer.is_fitted:
        raise CheckpointError(f"{path}: the normalizer was saved unfitted")


def load_training_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINING_STATE_FILE
    if not file.exists():
        raise CheckpointError(f"{path} cannot resume training: {TRAINING_STATE_FILE} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated pickles/zips
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
