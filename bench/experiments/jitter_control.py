"""Control for distill.objective=dmd: does a student succeed more often only because its chunks are noisier?

    python bench/experiments/jitter_control.py --checkpoint runs/cd_small/checkpoints/latest --sigma 0.0155 \\
        --episodes 200 --out runs/eval200_cd_small_jitter_1 eval.num_inference_steps=1

Distribution-matched students (distill.objective=dmd) roll out better than the consistency students they
start from, and their chunks are rougher (bench/experiments/consistency_fit.py). This adds independent
Gaussian noise of std `--sigma` (normalized action units, [-1, 1]) to every action of every sampled
chunk, before unnormalizing, and evaluates as `diffpolicy eval` does. Independent noise adds 6 sigma^2 to the
roughness (mean squared second difference) and 2 sigma^2 to the spread (two samples' mean squared
difference), so sigma can be matched to the roughness measured for a DMD student. Not part of the
package: a control for one experiment (docs/research, issue 4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffpolicy.config import with_overrides
from diffpolicy.evaluation import evaluate
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sigma", type=float, required=True, help="std of the added noise, normalized units")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="eval.* overrides, as for `diffpolicy eval`")
    args = ap.parse_args()
    if args.sigma < 0:
        raise SystemExit(f"--sigma must be >= 0, got {args.sigma}")
    policy, saved = load_policy(args.checkpoint)
    sample_loop = policy._sample_loop

    def noisy_loop(sample, cond, cond_traj, cond_mask, generator):  # type: ignore[no-untyped-def]
        out = sample_loop(sample, cond, cond_traj, cond_mask, generator)
        return out + args.sigma * torch.randn(out.shape, generator=generator, dtype=out.dtype)

    policy._sample_loop = noisy_loop  # the clean chunk, then the noise; unnormalized after this
    cfg = with_overrides(saved, args.overrides)
    cfg.eval.n_episodes = args.episodes
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    report = evaluate(policy, task, cfg.eval, Path(args.out), label=f"{args.checkpoint} + noise {args.sigma}")
    print(f"success {report['success_rate']:.3f}, mean max reward {report['mean_max_reward']:.3f}")


if __name__ == "__main__":
    main()
