"""Control for distill.dmd_regression_weight: the regression term alone, without distribution matching.

    python bench/experiments/regression_only.py --teacher runs/pusht_state_v_30k/checkpoints/latest \\
        --run-dir runs/regonly_30kT_s0 distill.init_student=runs/cd30kT_s0/checkpoints/latest \\
        distill.num_steps=3000 distill.lr=1e-5 train.batch_size=64 train.seed=0 eval.n_episodes=0

A DMD fine-tune (distill.objective=dmd) lifts a consistency student's 1-step success. Is that the
distribution-matching term, or just more training of the 1-step map on a fresh schedule? This runs
`diffpolicy distill` with objective=dmd and the regression term only: the student's 1-step chunk from
noise z against the teacher's grid ODE solve from the same z, w = distill.dmd_regression_weight
(default here 2, as in the runs it controls), no fake-network updates and no
DMD term. Everything else (data, schedule, EMA, checkpoints) is the package's. Not part of the package:
a control for one experiment (docs/research, issue 4).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from diffpolicy.distill import DistillTrainer, DistributionMatching, distill_config


def regression_only(self: DistributionMatching, batch: dict[str, Any]) -> torch.Tensor:
    """DistributionMatching.forward without the fake network and the distribution-matching term."""
    student, obs = self.student, batch["obs"]
    x_data = student.normalizer.normalize("action", batch["action"])
    mask = student.loss_mask(batch, x_data, None)
    z = torch.randn_like(x_data)
    x = self.generate(student.global_cond(student.encode_obs(obs)), z)
    regression = self.regression(x, z, obs, mask)
    self.terms = {
        "train/regression_mse": regression.detach(),
        "train/data_mse": student.masked_mse(x.detach(), x_data, mask),
    }
    return self.cfg.dmd_regression_weight * regression


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for `diffpolicy distill`")
    args = ap.parse_args()
    overrides = ["distill.objective=dmd", "distill.dmd_regression_weight=2", *args.overrides]
    cfg = distill_config(args.teacher, overrides)
    if cfg.distill.dmd_regression_weight <= 0:
        raise SystemExit("distill.dmd_regression_weight must be > 0: it is the only term here")
    DistributionMatching.forward = regression_only  # this process only
    DistillTrainer(cfg, Path(args.run_dir)).fit()


if __name__ == "__main__":
    main()
