"""Demonstration collection: run a task's scripted expert over seeds, in parallel, into an EpisodeStore
(or, through it, a LeRobot v3.0 dataset: `collect_lerobot`, `diffpolicy collect --format lerobot`).

A collection mix (`collect.mix`) records groups of episodes with different task kwargs, the way a user
records a real dataset in batches (e.g. 50 episodes with one object, 50 with two, 100 with three):

    collect:
      mix:
        - {n_episodes: 50, task_kwargs: {n_objects: 1}}
        - {n_episodes: 50, task_kwargs: {n_objects: 2}}
        - {n_episodes: 100, task_kwargs: {n_objects: 3}}

The groups run one after the other on consecutive seeds (no seed is shared between groups); every episode's
seed, group, task kwargs and task string are kept (the store's attrs["episodes"], a LeRobot dataset's
meta/episodes columns) and `diffpolicy dataset info` shows the mix. `--episodes N` (collect.n_episodes)
scales a mix to N episodes in its proportions (largest remainders, at least one per group).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffpolicy.config import ConfigError, MixGroup, RunConfig, collect_counts
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.tasks import make_task
from diffpolicy.tasks.base import Task

log = logging.getLogger("diffpolicy")

_worker_task = None


def _init_worker(name: str, kwargs: dict[str, Any]) -> None:
    global _worker_task
    _worker_task = make_task(name, **kwargs)


def _collect_one(seed: int) -> tuple[int, dict[str, np.ndarray], bool]:
    data, ok = _worker_task.collect_episode(seed)
    return seed, data, ok


def _episodes(
    name: str, kwargs: dict[str, Any], n_workers: int, seeds: list[int], task: Task
) -> Iterator[tuple[int, dict[str, np.ndarray], bool]]:
    """Yields (seed, episode, success) in seed order, from worker processes when n_workers > 1 (`task`,
    built with `kwargs`, runs them in this process otherwise)."""
    global _worker_task
    if n_workers <= 1:
        _worker_task = task
        yield from map(_collect_one, seeds)
        return
    ctx = mp.get_context("spawn")  # fork is unsafe once torch/zarr threads exist
    with ctx.Pool(n_workers, initializer=_init_worker, initargs=(name, kwargs)) as pool:
        yield from pool.imap(_collect_one, seeds, chunksize=1)


def _group_task(cfg: RunConfig, index: int, group: MixGroup) -> tuple[Task, dict[str, Any]]:
    """The task of one mix group (task.kwargs updated by the group's task_kwargs), and those kwargs; a
    ConfigError naming the group when the task refuses them."""
    kwargs = {**cfg.task.kwargs, **group.task_kwargs}
    try:
        return make_task(cfg.task.name, **kwargs), kwargs
    except TypeError as e:  # an argument the task's constructor does not take
        if not cfg.collect.mix:
            raise
        raise ConfigError(
            f"collect.mix[{index}].task_kwargs {dict(group.task_kwargs)}: task {cfg.task.name!r} refuses "
            f"them: {e}"
        ) from None
    except ValueError as e:
        if not cfg.collect.mix:
            raise
        raise ConfigError(f"collect.mix[{index}].task_kwargs {dict(group.task_kwargs)}: {e}") from None


def kwargs_label(kwargs: dict[str, Any]) -> str:
    """'n_objects=2, seed_region=left' (or 'default kwargs') for logs and `dataset info`."""
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "default kwargs"


def mix_summary(records: list[dict[str, Any]], lengths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per group of a collection mix: its task_kwargs, task string, episode count, seed range and (with the
    episodes' `lengths`) frames, from the per-episode records `collect` stores (attrs["episodes"]; a
    LeRobot dataset written by collect carries them as its episodes' diffpolicy/* columns)."""
    groups: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(records):
        g = groups.setdefault(
            int(r.get("group", 0)),
            {
                "group": int(r.get("group", 0)),
                "task_kwargs": r.get("task_kwargs") or {},
                "task": r.get("task"),
                "n_episodes": 0,
                "seeds": [],
                "frames": 0,
            },
        )
        g["n_episodes"] += 1
        if r.get("seed") is not None:
            g["seeds"].append(int(r["seed"]))
        if lengths is not None:
            g["frames"] += int(lengths[i])
    out = []
    for g in sorted(groups.values(), key=lambda x: x["group"]):
        seeds = g.pop("seeds")
        g["seed_range"] = [min(seeds), max(seeds)] if seeds else None
        if lengths is None:
            g.pop("frames")
        out.append(g)
    return out


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


def _seed_limit(cfg: RunConfig) -> int | None:
    """The first seed above cfg.collect.seed that collection may not reach (evaluation or validation
    seeds), None when there is none; a ConfigError when collection would start inside such a range."""
    cc, seed_limit = cfg.collect, None
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
    return seed_limit


def collect(
    cfg: RunConfig, output: str | Path, overwrite: bool = False, progress: bool = True
) -> EpisodeStore:
    """Collect expert episodes (successful ones unless keep_failed) into an EpisodeStore at `output`.

    Without a mix: `cfg.collect.n_episodes` (null: 200) episodes of the task built with task.kwargs. With
    `cfg.collect.mix`: each group in turn, its own count (or its share of collect.n_episodes, see
    config.collect_counts) of episodes of the task built with task.kwargs updated by the group's
    task_kwargs. Seeds run from cfg.collect.seed upwards; failed episodes are skipped and replaced by the
    next seeds; a group starts at the seed after the last one the group before it tried, so no seed is
    shared between groups. The whole range may never reach the evaluation seeds (cfg.eval.seed and above)
    nor the periodic evaluations' validation seeds (cfg.train.eval_seed and above).

    The store's attrs record: task, task_kwargs, fps (the task's control rate), seeds (every kept
    episode's, in order), n_failed, `episodes` (per episode: seed, group, task_kwargs, task = the group's
    task string) and, with a mix, `mix` (per group: task_kwargs, task, n_episodes, seed_range, n_failed).
    `cfg.collect.format` is the CLI's choice of writer: collect_lerobot writes a LeRobot dataset.
    """
    cc = cfg.collect
    if not cfg.task.name:
        raise ConfigError("collect needs a task (task.name): it runs the task's scripted expert")
    counts = collect_counts(cc)
    groups = cc.mix or [MixGroup(n_episodes=counts[0])]
    tasks = [_group_task(cfg, i, g) for i, g in enumerate(groups)]  # refuses bad kwargs before any work
    seed_limit = _seed_limit(cfg)
    store = EpisodeStore.create(output, overwrite=overwrite)
    store.attrs.update(
        {
            "task": cfg.task.name,
            "task_kwargs": cfg.task.kwargs,
            "collect_seed_start": cc.seed,
            "fps": tasks[0][0].fps,
            "robot_type": tasks[0][0].robot_type,
        }
    )
    records: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    failed_total = 0
    next_seed = cc.seed
    bar = tqdm(total=sum(counts), desc=f"collect {cfg.task.name}", disable=not progress, dynamic_ncols=True)
    try:
        for index, (group, (task, kwargs), n_wanted) in enumerate(zip(groups, tasks, counts, strict=True)):
            description = group.description or task.description()
            first = next_seed
            max_attempts = 2 * n_wanted + 20
            last = first + max_attempts if seed_limit is None else min(first + max_attempts, seed_limit)
            kept, failed = 0, 0
            episodes = _episodes(cfg.task.name, kwargs, cc.n_workers, list(range(first, last)), task)
            try:
                for seed, data, ok in episodes:
                    next_seed = seed + 1
                    if not ok:
                        failed += 1
                        if not cc.keep_failed:
                            continue
                    store.add_episode(data)
                    records.append({"seed": seed, "group": index, "task_kwargs": kwargs, "task": description})
                    kept += 1
                    bar.update(1)
                    bar.set_postfix(failed=failed_total + failed)
                    if kept == n_wanted:
                        break
            finally:
                episodes.close()
            failed_total += failed
            summary.append(
                {
                    "task_kwargs": kwargs,
                    "task": description,
                    "n_episodes": kept,
                    "seed_range": [first, next_seed - 1],
                    "n_failed": failed,
                }
            )
            if kept < n_wanted:
                where = f" (collect.mix[{index}], {kwargs_label(kwargs)})" if cc.mix else ""
                raise RuntimeError(
                    f"the {cfg.task.name} expert{where} succeeded on only {kept} of {kept + failed} seeds "
                    f"({first}..{last - 1}); {output} holds the {len(records)} episodes kept so far"
                )
    finally:
        bar.close()
        store.attrs.update(
            {"seeds": [r["seed"] for r in records], "n_failed": failed_total, "episodes": records}
        )
        if cc.mix:
            store.attrs["mix"] = summary
    log.info(
        "collected %d episodes (%d failed attempts) into %s%s",
        len(records),
        failed_total,
        output,
        "".join(
            f"\n  group {i} ({kwargs_label(g['task_kwargs'])}): {g['n_episodes']} episodes, seeds "
            f"{g['seed_range'][0]}..{g['seed_range'][1]}, {g['n_failed']} failed"
            for i, g in enumerate(summary)
        )
        if cc.mix
        else "",
    )
    return store


def collect_lerobot(
    cfg: RunConfig, output: str | Path, overwrite: bool = False, progress: bool = True
) -> Path:
    """`collect` into a LeRobot v3.0 folder at `output` (data/formats/lerobot.py's writer): fps = the task's
    control rate, one mp4 per camera, every episode's task string in the tasks table (a mix's groups have
    their own), the per-episode records (seed, group, task_kwargs) as diffpolicy/* columns of
    meta/episodes. The episodes go through a temporary EpisodeStore beside `output`, removed afterwards;
    `output` is replaced only with `overwrite`, and is checked before any episode is collected."""
    import tempfile

    from diffpolicy.data.formats.lerobot import write_lerobot

    target = Path(output)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass --overwrite to replace it")
    if not cfg.task.name:
        raise ConfigError("collect needs a task (task.name): it runs the task's scripted expert")
    task, _ = _group_task(cfg, 0, cfg.collect.mix[0] if cfg.collect.mix else MixGroup())
    if not task.fps:
        raise ConfigError(
            f"task {cfg.task.name!r} declares no control rate (Task.fps), which a LeRobot dataset needs: "
            "collect an EpisodeStore (--format zarr) and convert it with `diffpolicy dataset convert --fps`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.collect-", dir=target.parent) as tmp:
        store = collect(cfg, Path(tmp) / "store.zarr", progress=progress)
        write_lerobot(store, target, overwrite=overwrite, progress=progress)
    return target
