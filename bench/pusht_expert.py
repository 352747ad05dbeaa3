"""Benchmark the Push-T scripted expert: success rate, episode length, reward and planning time per seed.

    python bench/pusht_expert.py --seeds 0-99
    python bench/pusht_expert.py --seeds 0-9,100000-100009 --workers 2

An episode succeeds when coverage > 0.95 is reached within the 300-step limit. Prints one line per episode,
a summary, and finally the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np


def parse_seeds(spec: str) -> list[int]:
    """'0-99' or '1,5,7' or '0-9,100000-100009' -> a list of seeds (ranges are inclusive)."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            seeds += list(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


def run_episode(seed: int) -> dict[str, Any]:
    """One expert episode on seed; its outcome and wall-clock time (planning included)."""
    from diffpolicy.tasks.pusht import PushTExpert, PushTTask

    task = PushTTask()
    t0 = time.perf_counter()
    env = task.make_env()
    expert = PushTExpert(seed)
    env.reset(seed=seed)
    rewards: list[float] = []
    success = False
    for _ in range(task.max_episode_steps):
        _, reward, terminated, truncated, info = env.step(expert.act(env))
        rewards.append(reward)
        success = success or bool(info["is_success"])
        if terminated or truncated:
            break
    env.close()
    return {
        "seed": seed,
        "success": success,
        "length": len(rewards),
        "max_reward": max(rewards),
        "final_reward": rewards[-1],
        "n_plans": expert.n_plans,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-99", help="e.g. 0-99 or 1,5,7 (ranges inclusive)")
    parser.add_argument("--workers", type=int, default=1, help="processes (spawn); 1 = this process")
    parser.add_argument("--quiet", action="store_true", help="no per-episode lines")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.perf_counter()
    if args.workers <= 1:
        episodes_iter = map(run_episode, seeds)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(args.workers)
        episodes_iter = pool.imap(run_episode, seeds, chunksize=1)
    episodes = []
    try:
        for ep in episodes_iter:
            episodes.append(ep)
            if not args.quiet:
                status = "ok  " if ep["success"] else "FAIL"
                print(
                    f"seed {ep['seed']:>7d}  {status}  steps {ep['length']:>3d}  "
                    f"max_reward {ep['max_reward']:.3f}  plans {ep['n_plans']:>3d}  {ep['seconds']:.2f} s",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    wall = time.perf_counter() - t0

    lengths = np.array([e["length"] for e in episodes])
    ok = np.array([e["success"] for e in episodes])
    summary = {
        "n_episodes": len(episodes),
        "seeds": args.seeds,
        "workers": args.workers,
        "success_rate": float(ok.mean()),
        "failed_seeds": [e["seed"] for e in episodes if not e["success"]],
        "mean_length": float(lengths.mean()),
        "median_length": float(np.median(lengths)),
        "max_length_success": int(lengths[ok].max()) if ok.any() else None,
        "mean_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
        "seconds_per_episode": float(np.mean([e["seconds"] for e in episodes])),
        "wall_seconds": wall,
    }
    print(
        f"\n{summary['n_episodes']} episodes: success {summary['success_rate']:.1%}, "
        f"length mean {summary['mean_length']:.1f} / median {summary['median_length']:.0f}, "
        f"mean max reward {summary['mean_max_reward']:.3f}, "
        f"{summary['seconds_per_episode']:.2f} s/episode ({wall:.1f} s wall, {args.workers} worker(s))"
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
