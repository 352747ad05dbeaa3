"""The training loop: data -> policy.compute_loss -> AdamW -> EMA, with validation, closed-loop evaluation,
top-k and `latest` checkpoints, exact resume, and one run folder holding everything the run produced.

    <run_dir>/config.yaml       the resolved RunConfig
    <run_dir>/train.log         log lines; metrics.jsonl: one JSON line per logged step; tb/: tensorboard
    <run_dir>/checkpoints/latest          resumable (weights, optimizer, LR schedule, EMA, RNG, step)
    <run_dir>/checkpoints/previous        the latest before it, kept until a newer one is in place
    <run_dir>/checkpoints/topk/step=..-score=..   the k best by closed-loop score (inference only)
    <run_dir>/eval_during_training/   periodic closed-loop evaluations (train.eval_every)
    <run_dir>/eval/             final closed-loop evaluation report, plots, videos

Periodic evaluations run on a validation range of start states (train.eval_seed, logged as val/...) and
rank the top-k checkpoints; the final one runs on the evaluation seeds (eval.seed, logged as eval/...), so
a checkpoint is never picked on the episodes it is reported on. With train.eval_every=0 nothing is
ranked and checkpoints/topk is not written (`latest` holds the final weights).

Multi-process / multi-GPU: launch the same command with `torchrun --nproc_per_node N -m diffpolicy.cli
train ...`. PyTorch DDP (gloo on CPU, nccl on GPU) averages gradients; train.batch_size is the GLOBAL
batch, split evenly over ranks; the normalizer is fitted once on rank 0 and broadcast; EMA, validation,
evaluation, logs and checkpoints live on rank 0. Per-step training noise comes from a generator seeded
by (seed, step) over the global batch, so N processes train exactly like one (up to float summation
order) for the same global batch.

A run folder belongs to one process at a time (`files.RunLock` on `<run_dir>/.lock`). At start-up a
checkpoint swap that a crash interrupted is completed (`checkpoint.recover_checkpoint`); a corrupt `latest`
falls back to `previous` with a warning; a resume is checked against the config stored in the checkpoint
(only RESUMABLE_CHANGES may differ); a finished run, or any run with `resume=False`, is refused unless
`overwrite=True`, which moves the old outputs aside into `<run_dir>/replaced-<time>/`. See
docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler
from tqdm.auto import tqdm

from diffpolicy.checkpoint import (
    CheckpointError,
    UnsafeCheckpoint,
    load_training_state,
    read_config,
    recover_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from diffpolicy.collect import check_unseen_evaluation_seeds
from diffpolicy.config import ConfigError, RunConfig, load_config, save_yaml, to_dict
from diffpolicy.control import check_frame_stride
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.formats import detect_format, open_training_data
from diffpolicy.data.normalize import Normalizer
from diffpolicy.data.sequence import SequenceDataset, split_store
from diffpolicy.files import RunLock
from diffpolicy.interrupt import graceful_stop, stop_requested
from diffpolicy.policy import BasePolicy, make_policy, normalizer_spec
from diffpolicy.tasks import Task, make_task
from diffpolicy.training.ema import EMA
from diffpolicy.training.optim import make_lr_schedule, make_optimizer

log = logging.getLogger("diffpolicy")


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the run stopped and the last good checkpoint was kept."""


class ResumeMismatch(RuntimeError):
    """A run folder holds a run with a different configuration than the one asked for."""


class RunExists(RuntimeError):
    """The run folder holds a run that this command would overwrite or relabel (see `overwrite`)."""


class RunFinished(RunExists):
    """The run folder holds this very run, finished: there is nothing left to train or evaluate."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochBatchSampler(Sampler[list[int]]):
    """Endless batches from a seeded permutation per epoch, resumable at any step.

    Batch `s` is a pure function of (seed, s), so a resumed run sees exactly the batches the killed run
    would have seen. Each rank takes its own slice of the global batch (DDP).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty: no windows to sample")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = max(1, n // self.global_batch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if len(perm) < self.global_batch:  # tiny datasets: repeat the permutation to fill one batch
            perm = np.resize(perm, self.global_batch)
        return perm

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = self._epoch_order(epoch)
            for s in range(pos, self.steps_per_epoch):
                chunk = order[s * self.global_batch : (s + 1) * self.global_batch]
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            step = (epoch + 1) * self.steps_per_epoch


def make_dataset(
    cfg: RunConfig,
    store: EpisodeStore | str | Path,
    shape_meta: dict[str, Any],
    episodes: Sequence[int] | None = None,
    feature_keys: Sequence[str] = (),
) -> SequenceDataset:
    """The training windows a run reads from `store` (its policy's horizon / steps, its data settings);
    `feature_keys`: cameras read as cached backbone features (policy.vision.cache_features)."""
    p = cfg.policy
    return SequenceDataset(
        store,
        shape_meta=shape_meta,
        horizon=p.horizon,
        n_obs_steps=p.n_obs_steps,
        n_action_steps=p.n_action_steps,
        pad_after=cfg.data.pad_after,
        episodes=episodes,
        action_key=cfg.data.action_key,
        cache_in_memory=cfg.data.cache_in_memory,
        short_episodes=cfg.data.short_episodes,
        mask_padded_actions=cfg.data.mask_padded_actions,
        frame_stride=cfg.data.frame_stride,
        feature_keys=feature_keys,
    )


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def _rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain data (numpy's key array as a tensor), which
    `torch.load(weights_only=True)` reads back without allowing any pickled object."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor, or an ndarray in states written before issue 38
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


# Keys a resumed run may change without invalidating what was trained so far: how long it runs (never below
# the step the checkpoint reached; a cosine LR schedule then continues on the new length), how often it
# logs, validates, evaluates and checkpoints, data-loading workers, the final evaluation's settings and the
# run's name / folder. Every other key (policy, data, optimizer, seeds, ...) is fixed for the run's life.
RESUMABLE_CHANGES = (
    "train.num_steps",
    "distill.num_steps",  # a distillation run's train.num_steps (see config.DistillConfig)
    "train.eval_every",
    "train.val_every",
    "train.checkpoint_every",
    "train.stop_at_step",
    "train.max_minutes",
    "train.log_every",
    "train.num_workers",
    "eval.",
    "name",
    "run_dir",
)


class Trainer:
    # The key that sets train.num_steps on the command line, for messages (a distillation's is its own).
    num_steps_key = "train.num_steps"
    # Whether policy.vision.cache_features applies (distillation hands its networks frames: one_view).
    reads_cached_features = True

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        task: Task | None = None,
        resume: bool = True,
        show_progress: bool | None = None,
        overwrite: bool = False,
    ) -> None:
        """`resume`: continue the run in `run_dir` if there is one (False refuses to touch an existing
        run); `overwrite`: move an existing run's outputs aside and start again from step 0."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # task.name="" trains on a dataset alone (no simulator): no closed-loop evaluation
        self.task = task or (make_task(cfg.task.name, **cfg.task.kwargs) if cfg.task.name else None)
        if self.task is None and (cfg.train.eval_every or cfg.eval.n_episodes):
            raise ConfigError(
                "task.name is empty (no simulator), so there is nothing to evaluate in closed loop: "
                "set train.eval_every=0 and eval.n_episodes=0"
            )
        if self.task is not None and (cfg.train.eval_every or cfg.eval.n_episodes):
            try:
                check_frame_stride(self.task, cfg.data.frame_stride)  # before training, not after it
            except ValueError as e:
                raise ConfigError(
                    f"{e}, or evaluate nothing (train.eval_every=0 eval.n_episodes=0)"
                ) from None
        self.resume = resume
        self.overwrite = overwrite
        # torchrun sets these; a plain launch is rank 0 of 1
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        self.show_progress = self.is_main and (
            sys.stderr.isatty() if show_progress is None else show_progress
        )
        self.device = resolve_device(cfg.train.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                f"{self.world_size} processes"
            )
        self.local_batch = cfg.train.batch_size // self.world_size
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._finished = False  # set for the final save, which marks the run as done

    # ----- set-up ---------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = (
            logging.FileHandler(self.run_dir / "train.log") if self.is_main else logging.NullHandler()
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self._log_handler = handler

    def _resume_point(self) -> tuple[Path, dict[str, Any], RunConfig] | None:
        """The checkpoint to resume from: `latest`, or `previous` when `latest` is missing or corrupt
        (with a warning naming what is wrong), as (path, training state, its run config); None when the
        folder holds no checkpoint. Raises CheckpointError when checkpoints exist but none loads, so a run
        never silently starts again from step 0 over a checkpoint the user has, and UnsafeCheckpoint at
        once for a training state holding pickled objects (someone replaced it: no quiet fallback)."""
        problems = []
        for name in ("latest", "previous"):
            path = self.ckpt_dir / name
            if not path.exists():
                continue
            try:
                _, saved = read_config(path)
                state = load_training_state(path)
            except UnsafeCheckpoint:
                raise
            except CheckpointError as e:
                problems.append(str(e))
                log.warning("cannot resume from %s: %s", path, e)
                continue
            if problems:
                log.warning("resuming from %s (step %d) instead", path, int(state["step"]))
            return path, state, saved
        if problems:
            raise CheckpointError(
                f"no checkpoint in {self.ckpt_dir} loads: {'; '.join(problems)}. Nothing was changed; "
                "pass --overwrite (Trainer(overwrite=True)) to move them aside and start again"
            )
        return None

    def _prepare_run_folder(self) -> tuple[Path, dict[str, Any]] | None:
        """Recover interrupted saves, refuse what would overwrite or relabel a run, check a resume against
        the config stored in its checkpoint, and write config.yaml; returns what to resume from."""
        for note in recover_checkpoint(self.ckpt_dir / "latest", self.ckpt_dir / "previous") + (
            recover_checkpoints(self.ckpt_dir / "topk")
        ):
            log.warning("%s", note)
        config_file = self.run_dir / "config.yaml"
        if self.overwrite:
            self._move_old_run_aside()
        point = self._resume_point()
        if point is None and config_file.exists() and not self.resume:
            raise RunExists(
                f"{self.run_dir} already holds a run (its config.yaml, no checkpoint yet) and --no-resume "
                "refuses to continue it: use another run folder, or --overwrite to move it aside"
            )
        if point is not None:
            path, state, saved = point
            step = int(state["step"])
            if not self.resume:
                raise RunExists(
                    f"{self.run_dir} already holds a run (checkpoint {path} at step {step}) and --no-resume "
                    "refuses to continue it: use another run folder, or --overwrite to move it aside"
                )
            self._check_resume(path, saved, step, finished=bool(state.get("finished", False)))
        if self.is_main:
            save_yaml(self.cfg, config_file)
        return None if point is None else point[:2]

    def _reads_minari(self) -> bool:
        """Whether this run's data.path is a Minari dataset (True where that cannot be told)."""
        if not self.cfg.data.path:
            return False  # the run's own demos.zarr
        try:
            return detect_format(self.cfg.data.path) == "minari"
        except (OSError, ValueError):
            return True

    def _check_resume(self, path: Path, saved: RunConfig, step: int, finished: bool) -> None:
        """Refuse to resume the checkpoint at `path` (its stored config `saved`, at `step`) with a config
        that changes a key fixed for the run's life, shortens it below `step`, or reruns a finished run."""
        config_file = self.run_dir / "config.yaml"
        if config_file.exists():
            try:  # keys added to the config since the run began read as their defaults, as from_pretrained
                load_config(config_file)  # reads an old checkpoint: a release must not strand a run
            except ConfigError as e:
                raise ResumeMismatch(
                    f"{config_file} no longer loads as a run config ({e}); use another run folder"
                ) from None
        diffs = [
            d for d in _config_diff(to_dict(saved), to_dict(self.cfg)) if not d.startswith(RESUMABLE_CHANGES)
        ]
        if not self._reads_minari():  # data.flatten_obs shapes Minari imports only (its default changed
            diffs = [d for d in diffs if not d.startswith("data.flatten_obs:")]  # in issue 38: no stranding)
        if diffs:
            raise ResumeMismatch(
                f"{self.run_dir} already holds a run with a different configuration (checkpoint {path}): "
                f"{'; '.join(diffs)}. These keys cannot change mid-run; use another run folder (or resume "
                "with the same config)."
            )
        num_steps, key = self.cfg.train.num_steps, self.num_steps_key
        if num_steps < step:
            raise RunExists(
                f"{key}={num_steps} is below the step the run in {self.run_dir} already reached "
                f"({step}, checkpoint {path}): a checkpoint is never relabelled; evaluate it as it is, or "
                "use another run folder / --overwrite to train again"
            )
        if finished and num_steps == step:
            raise RunFinished(
                f"{self.run_dir} holds a finished run (step {step} of {key}={num_steps}); nothing "
                f"to do. Raise {key} to continue it, evaluate it with diffpolicy eval, or use "
                "another run folder / --overwrite to train again"
            )
        if finished and (self.run_dir / "eval").exists():  # its final report stays, under its step
            os.replace(self.run_dir / "eval", self.run_dir / f"eval_step{step:07d}")

    def _move_old_run_aside(self) -> None:
        """--overwrite: move everything the old run produced into <run_dir>/replaced-<time>/ (nothing is
        deleted); the inputs (demos.zarr, data.path, data.import_dir inside the folder) stay."""
        keep = {".lock", "demos.zarr", "imported"}
        for p in (self.cfg.data.path, self.cfg.data.import_dir):
            if p and Path(p).resolve().parent == self.run_dir.resolve():
                keep.add(Path(p).name)
        old = [e for e in self.run_dir.iterdir() if e.name not in keep and not e.name.startswith("replaced-")]
        if not old:
            return
        aside = self.run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for entry in old:
            os.replace(entry, aside / entry.name)
        # The open train.log moved with the old run: reopen it in the run folder, or this run would log
        # into the replaced one.
        log.removeHandler(self._log_handler)
        self._log_handler.close()
        self._setup_logging()
        log.warning("--overwrite: moved the previous run's outputs to %s", aside)

    def _build_data(self) -> None:
        cfg = self.cfg
        path = cfg.data.path or str(self.run_dir / "demos.zarr")
        # Foreign formats are imported once into an EpisodeStore (rank 0 first, the others then reuse it).
        if self.world_size > 1 and not self.is_main:
            dist.barrier()
        store, self.shape_meta, note = open_training_data(
            path,
            cfg.data.import_dir or self.run_dir / "imported",
            obs_keys=cfg.data.obs_keys,
            task_shape_meta=self.task.shape_meta() if self.task is not None else None,
            flatten_obs=cfg.data.flatten_obs,
            action_key=cfg.data.action_key,
            image_size=cfg.data.image_size,
            progress=self.show_progress,
        )
        if self.world_size > 1 and self.is_main:
            dist.barrier()
        if self.task is not None:
            check_unseen_evaluation_seeds(cfg, store, path)
        log.info("%s", note)
        train_ids, val_ids, split_note = split_store(
            store,
            cfg.data.val_ratio,
            cfg.data.split_seed,
            cfg.data.max_train_episodes,
            cfg.data.split,
            horizon=cfg.policy.horizon,
            short_episodes=cfg.data.short_episodes,
            frame_stride=cfg.data.frame_stride,
        )
        log.info("data %s: %s", path, split_note)
        k = cfg.data.frame_stride
        if k > 1:
            fps = store.attrs.get("fps") or (self.task.fps if self.task is not None else None)
            rate = f"{fps:g} fps / {k} = {fps / k:g} Hz" if fps else ""
            log.info(
                "data.frame_stride=%d: windows take one frame in %d (all %d phases kept); the policy acts "
                "at the dataset's rate / %d%s, holding each action %d control steps",
                cfg.data.frame_stride,
                cfg.data.frame_stride,
                cfg.data.frame_stride,
                cfg.data.frame_stride,
                f" ({rate})" if rate else "",
                cfg.data.frame_stride,
            )
        cached = [k for k, m in self.shape_meta["obs"].items() if m.get("type") == "rgb"]
        if not (cfg.policy.vision.cache_features and self.reads_cached_features):
            cached = []
        self.train_set = make_dataset(cfg, store, self.shape_meta, train_ids, cached)
        self.val_set = make_dataset(cfg, store, self.shape_meta, val_ids, cached) if len(val_ids) else None
        log.info(
            "data %s: %d episodes (%d train, %d val), %d training windows",
            path,
            store.n_episodes,
            len(train_ids),
            len(val_ids),
            len(self.train_set),
        )

    def _make_policy(self) -> BasePolicy:
        """The policy to train, with its normalizer fitted on the training set (once, on rank 0)."""
        cfg = self.cfg
        policy = make_policy(cfg.policy, self.shape_meta)
        policy.frame_stride = cfg.data.frame_stride  # the controller holds each action this many steps
        modes = {
            k: mode for k, (mode, _) in normalizer_spec(self.shape_meta, cfg.policy.normalization).items()
        }
        # Fitted once (rank 0) and shared, so every rank normalizes identically.
        state = (
            [Normalizer.fit(self.train_set.get_normalizer_data(), modes).state_dict()]
            if self.is_main
            else [None]
        )
        if self.world_size > 1:
            dist.broadcast_object_list(state, src=0)
        policy.normalizer.load_state_dict(state[0])
        return policy

    def _make_loss_module(self) -> torch.nn.Module:
        """What turns a batch into the training loss: the policy itself (distillation wraps it)."""
        return self.policy

    def _build_policy(self) -> None:
        cfg = self.cfg
        self.policy: BasePolicy = self._make_policy().to(self.device)
        self.loss_module = self._make_loss_module().to(self.device)
        # DDP broadcasts rank 0's initial weights and averages gradients; everything else uses self.policy.
        self.model: torch.nn.Module = self.loss_module
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.loss_module, device_ids=ids)
        self.optimizer = make_optimizer(self.policy.optim_groups(cfg.train), cfg.train, self.device)
        self.lr_schedule = make_lr_schedule(self.optimizer, cfg.train)
        self.ema = EMA(self.policy, cfg.train.ema) if cfg.train.ema.enabled and self.is_main else None
        v = cfg.policy.vision
        if v.freeze_backbone and not v.pretrained_weights and self.policy.obs_encoder.rgb is not None:
            log.warning(
                "policy.vision.freeze_backbone with no policy.vision.pretrained_weights: the %s backbone "
                "keeps its RANDOM initial weights. Fine to measure speed; for a real policy pass "
                "policy.vision.pretrained_weights=/path/to/weights (a local file; nothing is downloaded)",
                v.backbone,
            )
        n_params = sum(p.numel() for p in self.policy.parameters())
        log.info(
            "policy %s/%s: %.2fM parameters on %s",
            cfg.policy.type,
            cfg.policy.net,
            n_params / 1e6,
            self.device,
        )

    def _attach_feature_cache(self) -> None:
        """policy.vision.cache_features: the frozen backbone's maps of every stored frame, computed once
        (rank 0 first, the others then open its files) and handed to the datasets in place of frames."""
        from diffpolicy.training.feature_cache import build_or_open

        v = self.cfg.policy.vision
        folder = Path(v.feature_cache_dir) if v.feature_cache_dir else self.run_dir / "feature_cache"
        log.info(
            "policy.vision.cache_features: training reads cached %s feature maps (the centre crop, as at "
            "inference: no random crop); checkpoints keep the backbone and run it on camera frames",
            v.backbone,
        )
        if self.world_size > 1 and not self.is_main:
            dist.barrier()
        gathers = build_or_open(self.policy, self.train_set.store, folder)
        if self.world_size > 1 and self.is_main:
            dist.barrier()
        self.train_set.attach_features(gathers)
        if self.val_set is not None:
            self.val_set.attach_features(gathers)

    @property
    def eval_policy(self) -> BasePolicy:
        """The weights used for validation, evaluation and inference checkpoints (EMA when enabled)."""
        return self.ema.model if self.ema is not None else self.policy

    # ----- checkpoints ------------------------------------------------------------------------------
    def _training_state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "model": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "topk": self.topk,
            "elapsed_s": self.elapsed_s(),
            "finished": self._finished,
        }

    def save_latest(self, step: int) -> None:
        """Write checkpoints/latest, keeping the one it replaces as checkpoints/previous."""
        save_checkpoint(
            self.ckpt_dir / "latest",
            self.eval_policy,
            self.cfg,
            step=step,
            training_state=self._training_state(step),
            previous=self.ckpt_dir / "previous",
        )

    def _restore(self, state: dict[str, Any]) -> None:
        """Put back what `_training_state` saved (weights, optimizer, schedule, EMA, RNG, top-k)."""
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.topk = state.get("topk", [])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._t0 = time.perf_counter()

    def _update_topk(self, step: int, score: float, metrics: dict[str, float]) -> None:
        k = self.cfg.train.top_k
        if k <= 0:
            return
        if len(self.topk) >= k and score <= min(s for s, _ in self.topk):
            return
        path = self.ckpt_dir / "topk" / f"step={step:07d}-score={score:.3f}"
        save_checkpoint(path, self.eval_policy, self.cfg, step=step, metrics=metrics)
        self.topk.append((score, str(path)))
        self.topk.sort(key=lambda item: -item[0])
        while len(self.topk) > k:
            _, worst = self.topk.pop()
            shutil.rmtree(worst, ignore_errors=True)

    # ----- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, max_batches: int = 20) -> float | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        policy = self.eval_policy
        policy.eval()
        batches = BatchSampler(SequentialSampler(self.val_set), self.cfg.train.batch_size, drop_last=False)
        loader = DataLoader(self.val_set, sampler=batches, batch_size=None)  # whole batches: get_batch
        losses = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(12345)  # same noise every time, so values are comparable across steps
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                losses.append(policy.compute_loss(to_device(batch, self.device)).item())
        return float(np.mean(losses))

    def closed_loop_eval(
        self, step: int, n_episodes: int, out_dir: Path, seed: int | None = None
    ) -> dict[str, Any]:
        """Roll out the eval weights for n_episodes from `seed` (default eval.seed), RNG state untouched."""
        from diffpolicy.evaluation import evaluate

        eval_cfg = self.cfg.eval if seed is None else dataclasses.replace(self.cfg.eval, seed=seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            report = evaluate(
                self.eval_policy,
                self.task,
                eval_cfg,
                out_dir,
                n_episodes=n_episodes,
                label=f"{self.cfg.name} step {step}",
            )
        return report

    # ----- the loop -----------------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        """Wall-clock seconds this run has spent since step 0, summed over its resumed sessions."""
        return self._elapsed_before + time.perf_counter() - self._t0

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(
                json.dumps({"step": step, "elapsed_min": round(self.elapsed_s() / 60, 3), **metrics}) + "\n"
            )

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.num_steps (resuming from `latest` if present), then evaluate.

        A run folder that this call created is removed again when the run is refused (or fails) before
        its first training step: a refusal leaves nothing behind."""
        from torch.utils.tensorboard import SummaryWriter

        tc = self.cfg.train
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # generous timeout: the other ranks wait while rank 0 evaluates in closed loop
            dist.init_process_group(backend, timeout=timedelta(hours=2))
        created = self.is_main and not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir).acquire() if self.is_main else None  # before anything is written
        try:
            self._setup_logging()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self._elapsed_before, self._t0 = 0.0, time.perf_counter()
        started = refused = False
        try:
            point = self._prepare_run_folder()
            seed_everything(tc.seed)
            self._build_data()
            self._build_policy()
            self.topk: list[tuple[float, str]] = []
            start = 0
            if point is not None:
                path, state = point
                self._restore(state)
                start = int(state["step"])
                log.info("resumed from %s at step %d", path, start)
            if self.train_set.feature_keys:
                self._attach_feature_cache()
            if self.is_main:
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            sampler = EpochBatchSampler(
                len(self.train_set),
                self.local_batch,
                tc.seed,
                start_step=start,
                rank=self.rank,
                world_size=self.world_size,
            )
            loader = DataLoader(
                self.train_set,
                sampler=sampler,  # yields index lists: the dataset gathers each batch at once (get_batch)
                batch_size=None,
                num_workers=tc.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=tc.num_workers > 0,
                # its own generator: creating the iterator must not consume the global RNG, or a
                # resumed run would draw different noise than the run it continues
                generator=torch.Generator().manual_seed(tc.seed),
            )
            started = True
            if start and self._should_pause(start):  # rerun of a paused run with the same pause settings
                log.warning(
                    "the run is already paused at step %d of %d (train.stop_at_step=%d, train.max_minutes=%g;"
                    " %.3g minutes trained): nothing to do; raise them (0: off) to continue",
                    start,
                    tc.num_steps,
                    tc.stop_at_step,
                    tc.max_minutes,
                    self.elapsed_s() / 60,
                )
                return {"paused_at_step": start, "already_paused": True}
            with graceful_stop():  # SIGINT / SIGTERM: save a checkpoint and return (see _train_loop)
                paused_at = self._train_loop(start, iter(loader))
                if paused_at is not None:
                    if not self.is_main:  # rank 0 reports (and prints) for the run
                        return {}
                    stopped = {"interrupted": self._stopped_by} if self._stopped_by else {}
                    return {"paused_at_step": paused_at, **stopped}
                return self._finish()
        except BaseException:
            refused = created and not started
            raise
        finally:
            if hasattr(self, "writer"):
                self.writer.close()
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            if self.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
            if lock is not None:
                lock.release()
            if refused:  # everything in it is this call's: config.yaml, train.log, .lock, an import
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def _should_pause(self, done: int) -> bool:
        """train.stop_at_step / train.max_minutes reached (never at the last step: that one finishes).
        Under DDP rank 0's clock decides for every rank."""
        tc = self.cfg.train
        if done >= tc.num_steps:
            return False
        pause = bool(tc.stop_at_step and done >= tc.stop_at_step)
        if tc.max_minutes:
            late = torch.tensor(float(self.elapsed_s() >= 60 * tc.max_minutes), device=self.device)
            if self.world_size > 1:
                dist.broadcast(late, src=0)
            pause = pause or bool(late.item())
        return pause

    def _train_loop(self, start: int, batches: Iterator) -> int | None:
        """Train from step `start`; returns the step it paused at, or None when it reached num_steps.

        A SIGINT / SIGTERM (`interrupt.graceful_stop`) ends the step in progress, saves `latest` at it and
        pauses there (self._stopped_by names the signal); the request travels in the per-step all-reduce,
        so every DDP rank stops after the same step."""
        tc = self.cfg.train
        self._stopped_by: str | None = None
        params = [p for p in self.policy.parameters() if p.requires_grad]
        autocast = tc.mixed_precision == "bf16"
        bar = tqdm(
            total=tc.num_steps,
            initial=start,
            desc=self.cfg.name,
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        self.policy.train()
        t_last, last_step = time.perf_counter(), start
        rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        for step in range(start, tc.num_steps):
            batch = to_device(next(batches), self.device)
            extra = {}
            if hasattr(self.loss_module, "sample_training_noise"):
                g = torch.Generator(self.device).manual_seed(tc.seed * 1_000_003 + step)
                noise = self.loss_module.sample_training_noise(tc.batch_size, g, self.device)
                extra = {k: v[rows] for k, v in noise.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = self.model(batch, **extra)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip_norm if tc.grad_clip_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # One small all-reduce keeps the stop decisions and the logged loss identical on every rank.
            signalled = torch.tensor(float(stop_requested() is not None), device=grad_norm.device)
            stats = torch.stack([loss.detach().float(), grad_norm.detach().float(), signalled])
            if self.world_size > 1:
                dist.all_reduce(stats)
                stats /= self.world_size
            if not torch.isfinite(stats).all():
                latest = self.ckpt_dir / "latest"
                kept = latest if latest.exists() else "none (no checkpoint was written yet)"
                raise TrainingDiverged(
                    f"loss became {stats[0].item()} at step {step}; training stopped before the update. "
                    f"The last good checkpoint is {kept}."
                )
            self.optimizer.step()
            self.lr_schedule.step()
            done = step + 1
            self._after_optimizer_step(done)
            bar.update(1)
            if stats[2] > 0:  # a signal reached some rank: stop here, even at the last step
                self._stopped_by = stop_requested() or "a signal to another rank"
            pause = self._stopped_by is not None or (
                bool(tc.stop_at_step or tc.max_minutes) and self._should_pause(done)
            )
            if not self.is_main:
                if pause:
                    bar.close()
                    return done
                continue  # logging, validation, evaluation and checkpoints belong to rank 0
            if done % tc.log_every == 0 or done == tc.num_steps:
                now = time.perf_counter()
                metrics = {
                    "train/loss": stats[0].item(),
                    "train/lr": self.lr_schedule.get_last_lr()[0],
                    "train/grad_norm": stats[1].item(),
                    "train/steps_per_s": (done - last_step) / max(now - t_last, 1e-9),
                }
                if self.ema is not None:
                    metrics["train/ema_decay"] = self.ema.decay
                metrics.update(self._loss_terms())
                t_last, last_step = now, done
                self._log_metrics(done, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
                log.info(
                    "step %d loss %.5f lr %.3g grad %.3g",
                    done,
                    metrics["train/loss"],
                    metrics["train/lr"],
                    metrics["train/grad_norm"],
                )
            if self._stopped_by is None and tc.val_every and done % tc.val_every == 0:
                val = self.validation_loss()
                if val is not None:
                    self._log_metrics(done, {"val/loss": val})
                    log.info("step %d val loss %.5f", done, val)
                self.policy.train()
            periodic_eval = tc.eval_every and (done % tc.eval_every == 0 or done == tc.num_steps)
            if self._stopped_by is None and periodic_eval:
                # the last step too, so that the final weights compete for the top k on the same episodes
                out = self.run_dir / "eval_during_training" / f"step{done:07d}"
                report = self.closed_loop_eval(done, tc.eval_episodes, out, seed=tc.eval_seed)
                if report.get("interrupted"):  # a partial report ranks nothing; the next step pauses
                    log.warning("step %d: the evaluation was interrupted; partial report in %s", done, out)
                else:
                    self._after_eval(done, report, prefix="val")
                self.policy.train()
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                self.save_latest(done)
            if pause:
                if not (tc.checkpoint_every and done % tc.checkpoint_every == 0):
                    self.save_latest(done)
                if self._stopped_by is not None:
                    log.warning(
                        "stopped by %s at step %d of %d: checkpoint %s saved; run the same command again "
                        "to resume",
                        self._stopped_by,
                        done,
                        tc.num_steps,
                        self.ckpt_dir / "latest",
                    )
                    bar.close()
                    return done
                log.info(
                    "paused at step %d of %d after %.1f training minutes (train.stop_at_step=%d, "
                    "train.max_minutes=%g); rerun with a higher limit (0: off) to resume",
                    done,
                    tc.num_steps,
                    self.elapsed_s() / 60,
                    tc.stop_at_step,
                    tc.max_minutes,
                )
                bar.close()
                return done
        bar.close()
        return None

    def _after_optimizer_step(self, step: int) -> None:
        """Runs after every optimizer step (`step` = steps done): the EMA of the weights."""
        if self.ema is not None:
            self.ema.update(self.policy, step)

    def _loss_terms(self) -> dict[str, float]:
        """Components of the last training loss to log next to train/loss (none for plain training)."""
        return {}

    def _after_eval(self, step: int, report: dict[str, Any], prefix: str) -> None:
        """Log a closed-loop evaluation as `prefix`/...; rank the checkpoint in the top k when it is a
        periodic one (prefix val): the final evaluation's episodes (prefix eval) never choose a checkpoint."""
        metrics = {
            f"{prefix}/success_rate": report["success_rate"],
            f"{prefix}/mean_max_reward": report["mean_max_reward"],
        }
        self._log_metrics(step, metrics)
        log.info(
            "step %d %s success %.3f mean max reward %.3f (seeds from %d)",
            step,
            prefix,
            report["success_rate"],
            report["mean_max_reward"],
            report["seeds"][0],
        )
        if prefix == "val":
            self._update_topk(step, report["mean_max_reward"], metrics)

    def _finish(self) -> dict[str, Any]:
        tc = self.cfg.train
        if not self.is_main:
            return {}
        if self.cfg.eval.n_episodes == 0:
            self._finished = True
            self.save_latest(tc.num_steps)
            report: dict[str, Any] = {"n_episodes": 0}
            log.info("finished; final evaluation skipped (eval.n_episodes=0)")
        else:
            self.save_latest(tc.num_steps)  # a crash during the evaluation keeps the trained weights
            report = self.closed_loop_eval(tc.num_steps, self.cfg.eval.n_episodes, self.run_dir / "eval")
            if report.get("interrupted"):  # not finished: the same command reruns the final evaluation
                log.warning(
                    "the final evaluation was interrupted by %s after %d of %d episodes (partial report in "
                    "%s); run the same command again to evaluate in full",
                    report["interrupted"],
                    report["n_episodes"],
                    report["n_episodes_planned"],
                    self.run_dir / "eval",
                )
                return report
            self._after_eval(tc.num_steps, report, prefix="eval")
            self._finished = True
            self.save_latest(tc.num_steps)  # records the final top-k list and marks the run finished
            log.info(
                "finished: success %.3f (95%% CI %.3f-%.3f) over %d episodes; report %s",
                report["success_rate"],
                *report["success_ci95"],
                report["n_episodes"],
                self.run_dir / "eval",
            )
        plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
        return report


def plot_training_curves(metrics_file: Path, out: Path) -> Path | None:
    """Loss (and validation loss, success rate when present) against step."""
    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    series: dict[str, tuple[list, list]] = {}
    timed: dict[str, tuple[list, list]] = {}  # success rates against training minutes (older runs: none)
    for row in rows:
        for key in ("train/loss", "val/loss", "val/success_rate", "eval/success_rate"):
            if key in row:
                series.setdefault(key, ([], []))
                series[key][0].append(row["step"])
                series[key][1].append(row[key])
                if "elapsed_min" in row and key.endswith("success_rate"):
                    timed.setdefault(key, ([], []))
                    timed[key][0].append(row["elapsed_min"])
                    timed[key][1].append(row[key])
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(13.5 if timed else 9, 3.2))
    for key in ("train/loss", "val/loss"):
        if key in series:
            axes[0].plot(*series[key], label=key)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for key, style in (("val/success_rate", "o-"), ("eval/success_rate", "s")):
        if key in series:
            axes[1].plot(*series[key], style, label=key)
    if any(key in series for key in ("val/success_rate", "eval/success_rate")):
        axes[1].legend()
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("closed-loop success rate")
    if timed:
        for key, style in (("val/success_rate", "o-"), ("eval/success_rate", "s")):
            if key in timed:
                axes[2].plot(*timed[key], style, label=key)
        axes[2].legend()
        axes[2].set_ylim(-0.05, 1.05)
        axes[2].set_xlabel("wall-clock training minutes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
