"""Autoguidance (Karras et al. 2024) for a diffusion-policy teacher, and DMD towards the guided teacher.

    # 1. the guided teacher in closed loop: v = v_good + g (v_good - v_bad), with a weaker model of the same
    #    recipe (here the 10,000-step teacher) as the bad one; any eval.* override, as for `diffpolicy eval`
    python bench/autoguidance.py eval --good runs/pusht_state_v_30k/checkpoints/latest \\
        --bad runs/pusht_state_v/checkpoints/latest --guidance 0.5 --episodes 200 \\
        --out runs/val_ag05_ddim10 eval.sampler=ddim eval.num_inference_steps=10 eval.seed=200000 \\
        eval.n_videos=0
    # 2. DMD whose "real" score is the guided teacher (everything else is `diffpolicy distill`'s)
    python bench/autoguidance.py distill --good runs/pusht_state_v_30k/checkpoints/latest \\
        --bad runs/pusht_state_v/checkpoints/latest --guidance 0.5 --run-dir runs/dmdag05_30kT_s0 \\
        distill.objective=dmd distill.init_student=runs/cd30kT_s0/checkpoints/latest distill.num_steps=3000 \\
        distill.lr=1e-5 train.batch_size=64 train.seed=0 eval.n_episodes=0

Classifier-free guidance needs an unconditional model, which a policy trained only with observations
does not have; autoguidance extrapolates away from a worse model of the same conditional distribution
instead, which sharpens samples towards where the good model is confident. A DMD student follows
whatever score it is given as "real", so a guided teacher would hand its students that sharpening too.
Since v-prediction is linear in the clean estimate at fixed x_t, guiding v guides the clean estimate
and the DDIM/DDPM steps alike. Both models must predict v and share the normalizer (same demonstrations).
Not part of the package: an experiment for issue 4 (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffpolicy.checkpoint import load_policy
from diffpolicy.config import ConfigError, with_overrides
from diffpolicy.distill import DistillTrainer, distill_config, load_teacher
from diffpolicy.evaluation import evaluate
from diffpolicy.policy import DiffusionPolicy
from diffpolicy.tasks import make_task


class Guided(nn.Module):
    """The good network's output pushed away from the bad one's: out = good + g (good - bad)."""

    def __init__(self, good: nn.Module, bad: nn.Module, guidance: float) -> None:
        super().__init__()
        self.good, self.bad, self.guidance = good, bad.requires_grad_(False).eval(), guidance

    def forward(self, sample: torch.Tensor, t: Any, **kwargs: Any) -> torch.Tensor:
        out = self.good(sample, t, **kwargs)
        if self.guidance == 0:
            return out
        with torch.no_grad():
            bad = self.bad(sample, t, **kwargs)
        return out + self.guidance * (out - bad)


def guide(good: DiffusionPolicy, bad_path: str, guidance: float) -> DiffusionPolicy:
    """Put the guided network into `good` (in place), after checking the bad model fits it."""
    bad, _ = load_teacher(bad_path, device=next(good.parameters()).device)
    for name, p in (("good", good), ("bad", bad)):
        if p.cfg.scheduler.prediction_type != "v_prediction":
            raise ConfigError(f"the {name} model predicts {p.cfg.scheduler.prediction_type}, not v")
    differs = good.normalizer.first_difference(bad.normalizer)
    if differs or good.shape_meta != bad.shape_meta:
        raise ConfigError(f"the two models do not share data: normalizer.{differs} / shape_meta differ")
    good.net = Guided(good.net, bad.net, guidance)
    return good


class GuidedDistillTrainer(DistillTrainer):
    """DistillTrainer whose teacher is guided once the fake network has copied the plain teacher."""

    def __init__(self, *args: Any, bad: str, guidance: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad, self.guidance = bad, guidance

    def _make_loss_module(self) -> nn.Module:
        module = super()._make_loss_module()  # FakeScore deep-copies the plain teacher here
        guide(self.teacher, self.bad, self.guidance)  # the loss module holds this same teacher object
        return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["eval", "distill"])
    ap.add_argument("--good", required=True)
    ap.add_argument("--bad", required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", help="eval: report folder")
    ap.add_argument("--run-dir", help="distill: run folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    if args.mode == "eval":
        policy, saved = load_policy(args.good)
        guide(policy, args.bad, args.guidance)
        cfg = with_overrides(saved, args.overrides)
        task = make_task(cfg.task.name, **cfg.task.kwargs)
        label = f"{args.good} guided by {args.bad} at {args.guidance}"
        report = evaluate(policy, task, cfg.eval, Path(args.out), n_episodes=args.episodes, label=label)
        print(f"success {report['success_rate']:.3f}  mean max reward {report['mean_max_reward']:.3f}")
        return
    cfg = distill_config(args.good, args.overrides)
    if cfg.distill.objective != "dmd":
        raise SystemExit("only distill.objective=dmd reads a guided teacher here")
    GuidedDistillTrainer(cfg, Path(args.run_dir), bad=args.bad, guidance=args.guidance).fit()


if __name__ == "__main__":
    main()
