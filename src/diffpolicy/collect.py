"""Demonstration collection: run a task's scripted expert over seeds, in parallel, into an EpisodeStore."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffpolicy.config import ConfigError, RunConfig
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.tasks import make_task

log = logging.getLogger("diffpolicy")

_worker_task = None


def _init_worker(name: str, kwargs: dict[str, Any]) -> None:
    global _worker_task
    _worker_task = make_task(name, **kwargs)


def _collect_one(seed: int) -> tuple[int, dict[str, np.ndarray], bool]:
    data, ok = _worker_task.collect_episode(seed)
    return seed, data, ok


def _episodes(cfg: RunConfig, seeds: list[int]) -> Iterator[tuple[int, dict[str, np.ndarray], bool]]:
    """Yields (seed, episode, success) in seed order, from worker processes when n_workers > 1."""
    args = (cfg.task.name, cfg.task.kwargs)
    if cfg.collect.n_workers <= 1:
        _init_worker(*args)
        yield from map(_collect_one, seeds)
        return
    ctx = mp.get_context("spawn")  # fork is unsafe once torch/zarr threads exist
    with ctx.Pool(cfg.collect.n_workers, initializer=_init_worker, initargs=args) as pool:
        yield from pool.imap(_collect_one, seeds, chunksize=1)


def recorded_seeds(store: EpisodeStore) -> list[int] | None:
    """The seeds a store's episodes started from, as `collect` / `diffpolicy record` wrote them (None if the
    store does not say: data from elsewhere)."""
    seeds = store.attrs.get("seeds")
    return None if seeds is None else [int(s) for s in seeds]


def check_unseen_evaluation_seeds(
    cfg: RunConfig, store: EpisodeStore, where: str | Path, periodic: bool = True
) -> None:
    """Refuse evaluation seed ranges (eval.seed, and train.eval_seed when `periodic` and periodic
    evaluations run) that hold a demonstration's seed: a policy would be scored on start states it was
    trained on. Only stores that record their seeds are checked; `where` names the store in the message."""
    seeds = recorded_seeds(store)
    if not seeds or not cfg.task.name:
        return
    ranges = [("eval.seed", cfg.eval.seed, cfg.eval.n_episodes)]
    if periodic and cfg.train.eval_every:
        ranges.append(("train.eval_seed", cfg.train.eval_seed, cfg.train.eval_episodes))
    for key, start, n in ranges:
        seen = sorted(s for s in seeds if start <= s < start + n)
        if seen:
            shown = ", ".join(map(str, seen[:5])) + (", ..." if len(seen) > 5 else "")
            raise ConfigError(
                f"{key}={start} ({n} episodes) would evaluate on the start states of demonstrations in "
                f"{where} (seeds {shown}; it records seeds {min(seeds)}..{max(seeds)}): choose {key} "
                f"above {max(seeds)} or below {min(seeds) - n + 1}"
            )


def collect(
    cfg: RunConfig, output: str | Path, overwrite: bool = False, progress: bool = True
) -> EpisodeStore:
    """Collect `cfg.collect.n_episodes` expert episodes (successful ones unless keep_failed) into `output`.

    Seeds run from cfg.collect.seed upwards; failed episodes are skipped and replaced by the next seeds,
    but the seed range may never reach the evaluation seeds (cfg.eval.seed and above) nor the periodic
    evaluations' validation seeds (cfg.train.eval_seed and above).
    """
    cc = cfg.collect
    n_wanted = cc.n_episodes
    if n_wanted < 1:
        raise ConfigError("collect.n_episodes must be >= 1")
    seed_limit = None
    held_out = (
        (cfg.eval.seed, cfg.eval.n_episodes, "evaluation seeds"),
        (cfg.train.eval_seed, cfg.train.eval_episodes, "validation seeds (train.eval_seed)"),
    )
    for start, n, what in held_out:
        if cc.seed < start:
            seed_limit = start if seed_limit is None else min(seed_limit, start)
        elif cc.seed < start + n:  # the range is start .. start + n - 1
            end = start + n - 1
            raise ConfigError(f"collection seeds from {cc.seed} would overlap the {what} {start}..{end}")
    max_attempts = 2 * n_wanted + 20
    last = cc.seed + max_attempts if seed_limit is None else min(cc.seed + max_attempts, seed_limit)
    store = EpisodeStore.create(output, overwrite=overwrite)
    store.attrs.update({"task": cfg.task.name, "task_kwargs": cfg.task.kwargs, "collect_seed_start": cc.seed})
    kept, failed, seeds_used = 0, 0, []
    bar = tqdm(total=n_wanted, desc=f"collect {cfg.task.name}", disable=not progress, dynamic_ncols=True)
    episodes = _episodes(cfg, list(range(cc.seed, last)))
    try:
        for seed, data, ok in episodes:
            if kept >= n_wanted:
                break
            if not ok:
                failed += 1
                if not cc.keep_failed:
                    continue
            store.add_episode(data)
            seeds_used.append(seed)
            kept += 1
            bar.update(1)
            bar.set_postfix(failed=failed)
    finally:
        episodes.close()
        bar.close()
    store.attrs.update({"seeds": seeds_used, "n_failed": failed})
    if kept < n_wanted:
        raise RuntimeError(
            f"the {cfg.task.name} expert succeeded on only {kept} of {kept + failed} seeds "
            f"({cc.seed}..{last - 1}); {output} holds those {kept} episodes"
        )
    log.info("collected %d episodes (%d failed attempts) into %s", kept, failed, output)
    return store
