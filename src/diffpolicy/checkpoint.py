"""Checkpoint folders: everything needed to rebuild a policy, and optionally to resume training.

    <checkpoint>/
      config.yaml         format tag, policy class, shape_meta, the full run config, step, metrics
      model.safetensors   policy weights (EMA weights when EMA is on), normalizer statistics included
      training_state.pt   only in resumable checkpoints: raw weights, optimizer, LR schedule, EMA, RNG;
                          tensors and plain data only, read with torch.load(weights_only=True), so a
                          crafted file cannot run code (pickle's arbitrary objects are refused)

A folder is written under a temporary name and renamed into place, so a reader never sees a half-written
checkpoint; the previous version is removed (or kept as `previous`) only after the new one is in place, and
`recover_checkpoint` finishes a swap that a crash interrupted (see there for the hidden names used).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffpolicy.config import ConfigError, RunConfig, from_dict, to_dict
from diffpolicy.files import fsync_dir, make_temp_dir, share_like_umask

FORMAT = "diffpolicy-checkpoint/1"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, corrupt or does not match the policy it describes."""


class UnsafeCheckpoint(CheckpointError):
    """A training state holds objects other than tensors and plain data: loading it could run code."""


def _sibling(path: Path, kind: str) -> Path:
    """`.NAME.KIND` beside `path`: the hidden names a checkpoint swap uses (new, old, tmp-*, trash-*)."""
    return path.parent / f".{path.name}.{kind}"


_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old|tmp-[0-9a-f]+|trash-[0-9a-f]+)$")


def _discard(path: Path) -> None:
    """Remove a folder by first renaming it to a trash name, so a crash mid-delete never leaves a
    half-deleted folder under a name that recovery would trust."""
    if not path.exists():
        return
    trash = _sibling(path, f"trash-{secrets.token_hex(4)}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_checkpoint(path: str | Path, previous: str | Path | None = None) -> list[str]:
    """Finish or undo a checkpoint swap that a crash interrupted; returns what was done, for the log.

    A save writes `.NAME.tmp-*` (incomplete), renames it to `.NAME.new` once complete and synced, moves the
    current `NAME` to `previous` (or `.NAME.old`), then renames `.NAME.new` to `NAME`. Whatever instant a
    crash hits, one of those names holds a complete checkpoint: a `.NAME.new` is put in place, a lone
    `.NAME.old` is put back, and incomplete temporaries are removed. Call it only while owning the folder
    (the run lock): it moves folders.
    """
    path = Path(path)
    notes: list[str] = []
    if not path.parent.is_dir():
        return notes
    for entry in path.parent.iterdir():
        m = _HIDDEN.match(entry.name)
        ours = m is not None and m["name"] in (path.name, Path(previous).name if previous else None)
        if ours and m["kind"].startswith(("tmp-", "trash-")):
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed the incomplete temporary {entry}")
    new, old = _sibling(path, "new"), _sibling(path, "old")
    if new.is_dir():
        if path.exists():
            if previous is not None:
                _discard(Path(previous))
                os.replace(path, previous)
            else:
                _discard(path)
        os.replace(new, path)
        notes.append(f"completed an interrupted save: {new} -> {path}")
    elif old.is_dir() and not path.exists():
        os.replace(old, path)
        notes.append(f"restored {path} from {old} (a save was interrupted before the new copy was ready)")
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if notes:
        fsync_dir(path.parent)
    return notes


def recover_checkpoints(folder: str | Path) -> list[str]:
    """`recover_checkpoint` for every checkpoint in `folder` with leftovers of an interrupted save."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {m["name"] for e in folder.iterdir() if (m := _HIDDEN.match(e.name))}
    return [note for name in sorted(names) for note in recover_checkpoint(folder / name)]


@contextlib.contextmanager
def _naming_os_errors(file: Path) -> Iterator[None]:
    """A failing write of `file` (a full disk, a read-only mount) raises OSError naming it, whichever
    library wrote it: Python's own write errors lack the name, safetensors wraps them in a SafetensorError
    ("... (os error 28)"), so that the CLI can say `the disk is full (<file>)`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(file)) from None
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None


class _KeepOSError:
    """The file torch.save writes to: it keeps the OSError of a failing write, which torch's zip writer
    replaces with a RuntimeError about stream positions (`[enforce fail at inline_container.cc]`)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, file: Path) -> None:
    with _naming_os_errors(file), open(file, "wb") as f:
        out = _KeepOSError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def save_checkpoint(
    path: str | Path,
    policy: torch.nn.Module,
    run_cfg: RunConfig,
    step: int = 0,
    metrics: dict[str, float] | None = None,
    training_state: dict[str, Any] | None = None,
    previous: str | Path | None = None,
) -> Path:
    """Write a checkpoint folder at `path`, replacing an older one there with no instant at which a crash
    loses both (see `recover_checkpoint`). With `previous`, the replaced copy is kept there (itself
    replacing the one before) instead of deleted, so one corrupt file cannot end a run. The folder and
    its files get the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(path, previous)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        meta = {
            "format": FORMAT,
            "policy_class": type(policy).__name__,
            "shape_meta": policy.shape_meta,
            "step": int(step),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "run": to_dict(run_cfg),
        }
        with _naming_os_errors(tmp / CONFIG_FILE), open(tmp / CONFIG_FILE, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        with _naming_os_errors(tmp / WEIGHTS_FILE):
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        if training_state is not None:
            _torch_save(training_state, tmp / TRAINING_STATE_FILE)
        share_like_umask(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        new = _sibling(path, "new")
        os.replace(tmp, new)  # from here on a complete copy exists under a name recovery trusts
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if path.exists():
        if previous is not None:
            _discard(Path(previous))
            os.replace(path, previous)
        else:
            os.replace(path, _sibling(path, "old"))
    os.replace(new, path)
    fsync_dir(path.parent)
    shutil.rmtree(_sibling(path, "old"), ignore_errors=True)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.yaml, validated."""
    path = Path(path)
    if not path.is_dir():
        pending = [p for p in (_sibling(path, "new"), _sibling(path, "old")) if p.is_dir()]
        hint = (
            f" (a save was interrupted; the complete copy is {pending[0]}: rerun the training command in "
            "this run folder to put it back)"
            if pending
            else ""
        )
        raise CheckpointError(f"checkpoint folder {path} does not exist{hint}")
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


# Training states written before issue 38 hold numpy's RNG state as an array; these globals rebuild
# a plain ndarray and nothing else (PyTorch's documented allowlist for numpy arrays). numpy 1.x pickles
# name the module numpy.core, numpy 2.x numpy._core.
_NUMPY_ARRAY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
]


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint's training_state.pt, read with `torch.load(weights_only=True)`: tensors, numbers,
    strings and containers only. Raises UnsafeCheckpoint (without running anything) for a file holding
    any other object, CheckpointError for a missing, corrupt or truncated one."""
    file = Path(path) / TRAINING_STATE_FILE
    if not file.exists():
        raise CheckpointError(f"{path} cannot resume training: {TRAINING_STATE_FILE} is missing")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UnsafeCheckpoint(
                f"{file} holds objects other than tensors and plain data ({found[1]}): it was not written by "
                "diffpolicy, and loading it could run code, so it was not loaded and nothing was changed. "
                "Restore the file from a copy you trust, or move the run folder aside"
            ) from None
        # not a PyTorch file at all; torch's message is a page of advice to load it with weights_only=False
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e))
        raise CheckpointError(
            f"{file} is corrupt or truncated: {detail[1] if detail else str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # torch raises many types for truncated pickles/zips
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a diffpolicy training state (no 'step')")
    return state
