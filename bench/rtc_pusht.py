"""Synchronous execution vs temporal ensembling vs real-time chunking under inference delay (issues 31, 38).

For each simulated delay (milliseconds of policy time, turned into control steps at --control-hz) and
each execution mode of control.AsyncChunkController, rolls a checkpoint out on the same seeds and reports
the success rate and the jerk at chunk boundaries (mean |a_t - 2 a_{t-1} + a_{t-2}| at the steps where a
new chunk takes over, in action units) against the same statistic inside chunks. Prints a markdown table
and writes JSON. Never asserts. DDPM- and flow-trained checkpoints alike (a flow policy: eval.sampler=euler).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/rtc_pusht.py --checkpoint RUN/checkpoints/latest \\
        --episodes 50 --delays-ms 0 100 300 --modes sync ensemble naive rtc --out bench/notes/rtc_pusht.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffpolicy.config import with_overrides
from diffpolicy.control import RTC_MAX_GUIDANCE, AsyncChunkController, boundary_jerk
from diffpolicy.evaluation import configure_inference, run_rollouts, wilson_interval
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task


class _Recording(AsyncChunkController):
    """Keeps every episode batch's switch steps (the schedule is the same for all envs of a batch)."""

    soft_mask_at_zero = False

    def reset(self) -> None:
        if hasattr(self, "switch_steps"):
            self.schedules.append(list(self.switch_steps))
        else:
            self.schedules: list[list[int]] = []
        super().reset()

    def _request(self) -> np.ndarray:
        if self.soft_mask_at_zero and self.mode == "rtc" and self.delay == 0 and self.current is not None:
            return self._guided()  # Black et al.'s rule at delay 0: no frozen step, the soft mask still pulls
        return super()._request()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=100_000, help="evaluation seeds start here")
    parser.add_argument("--delays-ms", type=float, nargs="*", default=[0, 100, 300])
    parser.add_argument("--modes", nargs="*", default=["sync", "ensemble", "naive", "rtc"])
    parser.add_argument("--control-hz", type=float, default=10.0, help="Push-T: 10 Hz")
    parser.add_argument(
        "--max-guidance",
        type=float,
        default=None,
        help="beta, Black et al.'s clip of the guidance weight (1 - tau) / (tau r^2) on the velocity "
        f"(default by objective: flow {RTC_MAX_GUIDANCE['flow']:g}, theirs; DDPM "
        f"{RTC_MAX_GUIDANCE['ddpm']:g}, PiGDM nearly unclipped)",
    )
    parser.add_argument(
        "--soft-mask-at-zero",
        action="store_true",
        help="rtc at delay 0 guides towards the previous chunk's tail as Black et al. (the controller "
        "plays fresh unguided chunks there, as sync)",
    )
    parser.add_argument("--n-envs", type=int, default=10)
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("overrides", nargs="*", help="eval.* overrides (sampler, steps, n_action_steps)")
    args = parser.parse_args()
    policy, saved = load_policy(args.checkpoint)
    cfg = with_overrides(saved, args.overrides)
    cfg.eval.n_envs = args.n_envs
    configure_inference(policy, cfg.eval)
    policy.eval()
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    rows = []
    print("| delay ms (steps) | mode | success (95% CI) | boundary jerk | in-chunk jerk | wall s |")
    print("|---|---|---|---|---|---|")
    for delay_ms in args.delays_ms:
        delay = round(delay_ms * args.control_hz / 1000)
        for mode in args.modes:
            controller = _Recording(
                policy,
                delay,
                mode,
                n_action_steps=cfg.eval.n_action_steps,
                ensemble_decay=cfg.eval.ensemble_decay,
                generator=torch.Generator(device=policy.device).manual_seed(args.first_seed),
                max_guidance=args.max_guidance,
            )
            controller.soft_mask_at_zero = args.soft_mask_at_zero
            t0 = time.perf_counter()
            rollouts = run_rollouts(policy, task, cfg.eval, args.episodes, args.first_seed, controller)
            controller.reset()
            schedule = max(controller.schedules, key=len)
            jerks = np.array([boundary_jerk(r.actions, schedule) for r in rollouts])
            wins = sum(r.success for r in rollouts)
            lo, hi = wilson_interval(wins, len(rollouts))
            row = {
                "delay_ms": delay_ms,
                "delay_steps": delay,
                "mode": mode,
                "success_rate": wins / len(rollouts),
                "success_ci95": [lo, hi],
                "boundary_jerk": float(np.nanmean(jerks[:, 0])),
                "inside_jerk": float(np.nanmean(jerks[:, 1])),
                "wall_s": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"| {delay_ms:g} ({delay}) | {mode} | {row['success_rate']:.2f} ({lo:.2f}-{hi:.2f}) | "
                f"{row['boundary_jerk']:.2f} | {row['inside_jerk']:.2f} | {row['wall_s']:.0f} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "episodes": args.episodes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
