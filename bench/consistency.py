"""Benchmark a consistency-distilled student against its diffusion teacher, in one run, on the same seeds.

    python bench/consistency.py --teacher runs/demo/diffusion/checkpoints/latest \\
        --student runs/t2d_consistency/checkpoints/latest --episodes 50 --out bench_consistency.json

Settings: teacher DDPM-100, DDIM-10 and DDIM-1; student consistency 1-, 2- and 3-step. For each: closed-loop
success rate, mean max reward and the task's metrics (evaluator, the teacher's eval config, seeds
eval.seed ..), and the median latency of one fresh chunk at batch 1 (`diffpolicy.bench.median_ms`, same
synthetic observation window for all, timed after the evaluations in interleaved rounds). `--episodes 0`
times only. Prints a markdown table; writes JSON with everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffpolicy.bench import machine_info, median_ms, synthetic_obs
from diffpolicy.distill import load_teacher
from diffpolicy.evaluation import evaluate
from diffpolicy.policy import ConsistencyPolicy, load_policy
from diffpolicy.tasks import make_task
from diffpolicy.training.trainer import resolve_device

SETTINGS = (
    ("teacher", "ddpm", 100),
    ("teacher", "ddim", 10),
    ("teacher", "ddim", 1),
    ("student", "consistency", 1),
    ("student", "consistency", 2),
    ("student", "consistency", 3),
)


def run(
    teacher_path: str,
    student_path: str,
    episodes: int | None,
    device_name: str,
    warmup: int,
    repeats: int,
    out_dir: Path,
    rounds: int = 3,
) -> dict[str, Any]:
    """Evaluate and time every setting; returns {"machine", "rows", ...}."""
    device = resolve_device(device_name)
    teacher, cfg = load_teacher(teacher_path, device=device)
    student, _ = load_policy(student_path, device=device)
    if not isinstance(student, ConsistencyPolicy):
        raise SystemExit(f"{student_path} holds a {type(student).__name__}, not a ConsistencyPolicy")
    if student.shape_meta != teacher.shape_meta:
        raise SystemExit("the student and the teacher have different observation/action shapes")
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    obs1 = synthetic_obs(teacher.shape_meta, 1, teacher.n_obs_steps, device)
    rows = []
    for who, sampler, steps in SETTINGS:
        if episodes == 0:  # latency only
            rows.append({"setting": f"{who} {sampler}-{steps}"})
            continue
        policy = teacher if who == "teacher" else student
        eval_cfg = dataclasses.replace(
            cfg.eval, sampler=sampler, num_inference_steps=steps, n_episodes=episodes or cfg.eval.n_episodes
        )
        name = f"{who} {sampler}-{steps}"
        report = evaluate(policy, task, eval_cfg, out_dir / name.replace(" ", "_"), label=name)
        metrics = {k: v for k, v in report["task_metrics"].items() if isinstance(v, int | float)}
        rows.append(
            {
                "setting": name,
                "success_rate": report["success_rate"],
                "success_ci95": report["success_ci95"],
                "mean_max_reward": report["mean_max_reward"],
                "n_episodes": report["n_episodes"],
                "seeds": report["seeds"],
                "task_metrics": metrics,
            }
        )
        print(f"{name}: success {report['success_rate']:.3f}", flush=True)
    # Latency after all evaluations, in interleaved rounds, so that load from other processes on a shared
    # machine falls on every setting alike; a setting's figure is the median of its round medians.
    per_round: list[list[float]] = [[] for _ in SETTINGS]
    for _ in range(rounds):
        for i, (who, sampler, steps) in enumerate(SETTINGS):
            policy = teacher if who == "teacher" else student
            policy.set_sampler(sampler, steps)
            per_round[i].append(median_ms(lambda p=policy: p.predict_action(obs1), device, warmup, repeats))
    for row, times in zip(rows, per_round, strict=True):
        row["chunk_ms"] = statistics.median(times)
    return {
        "teacher": str(teacher_path),
        "student": str(student_path),
        "machine": machine_info(device),
        "warmup": warmup,
        "repeats": repeats,
        "rounds": rounds,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    metric_keys = sorted({k for r in result["rows"] for k in r.get("task_metrics", {})})
    header = ["setting", "success (95% CI)", "mean max reward", "ms / chunk (batch 1)", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    evaluated = "success_rate" in result["rows"][0]
    for r in result["rows"]:
        if evaluated:
            lo, hi = r["success_ci95"]
            outcome = [f"{r['success_rate']:.2f} ({lo:.2f}-{hi:.2f})", f"{r['mean_max_reward']:.3f}"]
        else:
            outcome = ["-", "-"]
        cells = [
            r["setting"],
            *outcome,
            f"{r['chunk_ms']:.2f}",
            *(f"{r['task_metrics'].get(k, float('nan')):.3g}" for k in metric_keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if evaluated:
        seeds = result["rows"][0]["seeds"]
        lines.append(
            f"\n{result['rows'][0]['n_episodes']} episodes per setting, seeds {seeds[0]}..{seeds[-1]}; "
            f"{result['machine']}"
        )
    else:
        lines.append(f"\nlatency only (--episodes 0); {result['machine']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the diffusion teacher's checkpoint folder")
    parser.add_argument("--student", required=True, help="the consistency student's checkpoint folder")
    parser.add_argument(
        "--episodes", type=int, help="episodes per setting (default: the teacher's eval; 0: latency only)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed chunks per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--reports", help="folder for the evaluation reports (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(
            args.teacher,
            args.student,
            args.episodes,
            args.device,
            args.warmup,
            args.repeats,
            Path(args.reports or tmp),
            args.rounds,
        )
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
