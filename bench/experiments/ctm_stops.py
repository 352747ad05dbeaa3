"""CTM experiment: how often should a CTM student's training jump stop at the clean end?

    python bench/experiments/ctm_stops.py --clean-stop 0.5 \\
        --teacher runs/pusht_state_v_small/checkpoints/latest \\
        --run-dir runs/ctm_small_clean50 distill.num_steps=10000 train.batch_size=64 eval.n_episodes=0

`distill.objective=ctm` draws the stop point s uniformly below t, as Consistency Policy does, so the
jump that 1-step sampling makes (from the top of the grid to the clean end) is 1 in N x N of the
training samples (1% on a grid of 10), against 1 in N for the CM student. Here a fraction `--clean-stop`
of the samples stops at the clean end instead and the rest keep the uniform draw: 1 moves the objective
to CM's (with the CTM parameterization), 0 is `distill.objective=ctm` itself. Not part of the package:
a result, not a feature (docs/research, issue 4).
"""

from __future__ import annotations

import argparse

import torch

from diffpolicy.config import EmaConfig
from diffpolicy.distill import ConsistencyDistillation, DistillTrainer, distill_config
from diffpolicy.training.ema import EMA
from diffpolicy.training.trainer import log


class CleanStopDistillation(ConsistencyDistillation):
    """The CTM loss with a fraction `clean_stop` of the stop points moved to the clean end."""

    clean_stop = 0.0

    def stop_index(self, grid_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        uniform = super().stop_index(grid_index, generator)
        u = torch.rand(grid_index.shape, generator=generator, device=grid_index.device)
        return torch.where(u < self.clean_stop, torch.zeros_like(uniform), uniform)


class CleanStopTrainer(DistillTrainer):
    def __init__(self, *args, clean_stop: float, **kwargs) -> None:
        self.clean_stop = clean_stop
        super().__init__(*args, **kwargs)

    def _make_loss_module(self) -> CleanStopDistillation:
        decay = self.cfg.distill.target_ema_decay
        self.target = EMA(self.policy, EmaConfig(min_value=decay, max_value=decay))
        loss = CleanStopDistillation(self.policy, self.teacher, self.target.model, self.cfg.distill)
        loss.clean_stop = self.clean_stop
        log.info("CTM stops: %.0f%% at the clean end, the rest uniform below t", 100 * self.clean_stop)
        return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean-stop", type=float, required=True, help="fraction of stops at the clean end")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("overrides", nargs="*", help="distill.* / train.* overrides, as for `diffpolicy distill`")
    args = ap.parse_args()
    if not 0.0 <= args.clean_stop <= 1.0:
        raise SystemExit(f"--clean-stop must be in [0, 1], got {args.clean_stop}")
    cfg = distill_config(args.teacher, ["distill.objective=ctm", *args.overrides])
    CleanStopTrainer(cfg, args.run_dir, resume=True, clean_stop=args.clean_stop).fit()


if __name__ == "__main__":
    main()
