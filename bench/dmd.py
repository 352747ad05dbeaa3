"""Experiment: fine-tune a 1-step student by distribution matching (DMD / OneDP) instead of consistency.

    python bench/dmd.py --teacher runs/pusht_state_v_small/checkpoints/latest --run-dir runs/dmd_small \\
        distill.init_student=runs/cd_small/checkpoints/latest distill.num_steps=3000 distill.lr=1e-5 \\
        train.batch_size=64 eval.n_episodes=0

Why: a consistency student must reproduce one particular map, the teacher's ODE from each noise to its
chunk, and at CPU scale its 1 step stays at 0.6-0.7 of Push-T episodes against the teacher's 0.8-0.87
(BENCHMARKS.md, issue 4). Distribution matching (Yin et al. 2024, DMD; One-Step Diffusion Policy, Wang et
al. 2024) asks only that the 1-step chunks have the teacher's distribution for each observation, which a
small network may fit more easily than the ODE map. The generator is the student's 1-step sampler
x = f(z, T - 1) (here started from a consistency student, so it starts near the teacher's
distribution); per step:

* a "fake" score network (a copy of the teacher, trained with the teacher's own DDPM v-loss) learns the
  distribution of the generator's chunks, `--fake-updates` optimizer steps per generator step on fresh
  generator samples (the two-time-scale rule of DMD2, so that it keeps up with the generator);
* the generator's chunk x is noised to x_t at t uniform in [--t-min, --t-max], and moved along
  (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)| (the KL gradient between the two noised
  distributions in clean-chunk units, with DMD's per-sample normalization), written as the loss
  0.5 ||x - stopgrad(x - g)||^2. Padded actions (past an episode's end) are masked out, since the
  teacher never learned them.

Not part of the package: an experiment judged in BENCHMARKS.md. The fake network and its optimizer are
checkpointed with the run, so a run resumes; the exported student is the Trainer's EMA, as always.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffpolicy.distill import DistillTrainer, distill_config
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy
from diffpolicy.training.trainer import log


def clean_estimate(net: DiffusionPolicy, x_t: torch.Tensor, t: torch.Tensor, obs: dict) -> torch.Tensor:
    """A diffusion policy's estimate of the clean chunk at (x_t, t), per-sample timesteps."""
    return net.predict_x0(net.call_net(x_t, t, net.global_cond(net.encode_obs(obs))), x_t, t)


class DistributionMatching(nn.Module):
    """The generator's DMD loss; updates the fake score network inside forward (module docstring)."""

    def __init__(
        self,
        student: ConsistencyPolicy,
        teacher: DiffusionPolicy,
        fake_updates: int,
        fake_lr: float,
        t_range: tuple[int, int],
    ) -> None:
        super().__init__()
        if teacher.cfg.scheduler.prediction_type != "v_prediction":
            raise SystemExit(
                "bench/dmd.py trains the fake score network with the v-loss: use a v-prediction teacher"
            )
        self.student, self.teacher = student, teacher
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=fake_lr, weight_decay=0.0)
        self.fake_updates, self.t_range = fake_updates, t_range
        self.terms: dict[str, torch.Tensor] = {}

    def generate(self, cond: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The student's 1-step chunk from fresh noise (normalized, unclipped, with gradients)."""
        z = torch.randn(shape, device=cond.device, dtype=cond.dtype)
        top = torch.full(
            (shape[0],), self.student.noise_scheduler.config.num_train_timesteps - 1, device=cond.device
        )
        return self.student.consistency_output(z, top, cond)[0]

    def _fake_step(self, x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step of the fake network's own DDPM loss on the generator's chunks x."""
        action = self.fake.normalizer.unnormalize("action", x)
        loss = self.fake.compute_loss({**batch, "action": action})
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.fake_opt.step()
        return loss.detach()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        student, teacher, obs = self.student, self.teacher, batch["obs"]
        x_data = student.normalizer.normalize("action", batch["action"])
        mask = student.loss_mask(batch, x_data, None)
        cond = student.global_cond(student.encode_obs(obs))
        with torch.enable_grad():  # the fake network's own updates, on chunks it cannot backprop into
            for _ in range(self.fake_updates):
                with torch.no_grad():
                    x_fake = self.generate(cond, x_data.shape)
                fake_loss = self._fake_step(x_fake, batch)
        x = self.generate(cond, x_data.shape)
        lo, hi = self.t_range
        t = torch.randint(lo, hi + 1, (x.shape[0],), device=x.device)
        with torch.no_grad():
            x_t = teacher.noise_scheduler.add_noise(x, torch.randn_like(x), t)
            real, fake = clean_estimate(teacher, x_t, t, obs), clean_estimate(self.fake, x_t, t, obs)
            m = mask.to(x.dtype)
            scale = ((x - real).abs() * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
            grad = (fake - real) / scale.clamp(min=1e-4).view(-1, 1, 1)
            goal = x - grad
        loss = 0.5 * (F.mse_loss(x, goal, reduction="none") * m).sum() / m.sum().clamp(min=1)
        self.terms = {
            "train/fake_loss": fake_loss,
            "train/dmd_grad": (grad.abs() * m).sum() / m.sum(),
            "train/data_mse": ((x.detach() - x_data) ** 2 * m).sum() / m.sum(),  # a diagnostic only
        }
        return loss


class DmdTrainer(DistillTrainer):
    def __init__(self, *args, fake_updates: int, fake_lr: float, t_range: tuple[int, int], **kwargs) -> None:
        self.dmd = {"fake_updates": fake_updates, "fake_lr": fake_lr, "t_range": t_range}
        super().__init__(*args, **kwargs)

    def _make_loss_module(self) -> DistributionMatching:
        log.info("distribution matching: %s", self.dmd)
        return DistributionMatching(self.policy, self.teacher, **self.dmd)

    def _after_optimizer_step(self, step: int) -> None:
        super(DistillTrainer, self)._after_optimizer_step(step)  # the EMA; there is no target network

    def _training_state(self, step: int) -> dict[str, Any]:
        state = super(DistillTrainer, self)._training_state(step)
        return {
            **state,
            "fake": self.loss_module.fake.state_dict(),
            "fake_opt": self.loss_module.fake_opt.state_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        super(DistillTrainer, self)._restore(state)
        self.loss_module.fake.load_state_dict(state["fake"])
        self.loss_module.fake_opt.load_state_dict(state["fake_opt"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--fake-updates", type=int, default=2, help="fake-score steps per generator step")
    ap.add_argument("--fake-lr", type=float, default=1e-4)
    ap.add_argument("--t-min", type=int, default=2)
    ap.add_argument("--t-max", type=int, default=97)
    ap.add_argument("overrides", nargs="*", help="distill.* / train.* overrides, as for `diffpolicy distill`")
    args = ap.parse_args()
    if args.fake_updates < 1 or not 0 <= args.t_min <= args.t_max:
        raise SystemExit("--fake-updates must be >= 1 and 0 <= --t-min <= --t-max")
    cfg = distill_config(args.teacher, args.overrides)
    if cfg.distill.objective != "cm":
        raise SystemExit("the generator is a one-time (cm) student: leave distill.objective at cm")
    trainer = DmdTrainer(
        cfg,
        args.run_dir,
        resume=True,
        fake_updates=args.fake_updates,
        fake_lr=args.fake_lr,
        t_range=(args.t_min, args.t_max),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
