"""Benchmark the SO-101 grasp-and-place scripted expert: success per object count, episode length, speed.

    python bench/so101_expert.py --objects 1,2,3 --seeds 0-49
    python bench/so101_expert.py --objects 3 --seeds 0-9 --workers 2

An episode succeeds when every object of the episode is in the container when the expert's plan ends
(home pose) within the object count's time limit (15 / 20 / 25 s at 30 Hz) -- what `diffpolicy collect`
keeps. Also measured: simulation speed without rendering (control steps per second of CPU time, the
expert's IK included, and of the physics alone). Prints one line per episode, a summary per object count
and finally all summaries as one JSON line.
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
    """'0-49' or '1,5,7' or '0-9,100000-100009' -> a list of seeds (ranges are inclusive)."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def run_episode(job: tuple[int, int]) -> dict[str, Any]:
    """One expert episode (n_objects, seed) through the task's own collect_episode; its outcome and CPU
    time (the IK included), plus the CPU time of replaying its actions in a fresh env (physics alone)."""
    from diffpolicy.tasks import make_task

    n_objects, seed = job
    task = make_task("so101_grasp", n_objects=n_objects)
    t0 = time.process_time()
    data, success = task.collect_episode(seed)
    expert_cpu = time.process_time() - t0
    env = task.make_env()
    env.reset(seed=seed)
    t0 = time.process_time()
    for action in data["action"]:
        env.step(action)
    physics_cpu = time.process_time() - t0
    env.close()
    steps = len(data["action"])
    return {
        "n_objects": n_objects,
        "seed": seed,
        "success": bool(success),
        "length": steps,
        "placed": int(data["reward"][-1, 0]),  # the reward is the number of objects in the container
        "expert_steps_per_cpu_s": steps / expert_cpu,
        "physics_steps_per_cpu_s": steps / physics_cpu,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", default="1,2,3", help="object counts, e.g. 1,2,3")
    parser.add_argument("--seeds", default="0-49", help="e.g. 0-49 or 1,5,7 (ranges inclusive)")
    parser.add_argument("--workers", type=int, default=1, help="processes (spawn); 1 = this process")
    parser.add_argument("--quiet", action="store_true", help="no per-episode lines")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    counts = [int(c) for c in args.objects.split(",")]
    jobs = [(n, s) for n in counts for s in parse_seeds(args.seeds)]

    t0 = time.perf_counter()
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    episodes = []
    try:
        for ep in pool.imap(run_episode, jobs, chunksize=1) if pool else map(run_episode, jobs):
            episodes.append(ep)
            if not args.quiet:
                status = "ok  " if ep["success"] else "FAIL"
                print(
                    f"objects {ep['n_objects']}  seed {ep['seed']:>6d}  {status}  steps {ep['length']:>3d}  "
                    f"placed {ep['placed']}  {ep['expert_steps_per_cpu_s']:.0f} steps/CPU-s with IK, "
                    f"{ep['physics_steps_per_cpu_s']:.0f} physics only",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    wall = time.perf_counter() - t0

    summaries = []
    for n in counts:
        eps = [e for e in episodes if e["n_objects"] == n]
        ok = np.array([e["success"] for e in eps])
        lengths = np.array([e["length"] for e in eps])
        summary = {
            "n_objects": n,
            "n_episodes": len(eps),
            "seeds": args.seeds,
            "success_rate": float(ok.mean()),
            "failed_seeds": [e["seed"] for e in eps if not e["success"]],
            "mean_length": float(lengths.mean()),
            "max_length": int(lengths.max()),
            "mean_fraction_placed": float(np.mean([e["placed"] / n for e in eps])),
            "expert_steps_per_cpu_s": float(np.mean([e["expert_steps_per_cpu_s"] for e in eps])),
            "physics_steps_per_cpu_s": float(np.mean([e["physics_steps_per_cpu_s"] for e in eps])),
        }
        summaries.append(summary)
        print(
            f"\n{n} object(s), {len(eps)} episodes: success {summary['success_rate']:.1%}, "
            f"length mean {summary['mean_length']:.0f} / max {summary['max_length']} steps, "
            f"{summary['physics_steps_per_cpu_s']:.0f} physics steps per CPU-second "
            f"({summary['physics_steps_per_cpu_s'] / 30:.0f}x real time at 30 Hz)"
        )
    print(f"({wall:.0f} s wall, {args.workers} worker(s))")
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main()
