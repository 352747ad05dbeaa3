"""Can DMD2's discriminator tell a consistency student's 1-step chunks from demonstrations? (issue 4)

    python bench/dmd_gan_probe.py --teacher runs/pusht_state_v/checkpoints/latest \\
        --student runs/cd_4m_s0/checkpoints/latest --t-min 2 --t-max 15 --steps 400

Trains only the fake score network with its discriminator head (distill.dmd_gan_weight > 0,
distill.dmd_disc_weight 1) on the student's fresh 1-step chunks against the demonstration chunks of the
same windows, both noised to t uniform in [t_min, t_max], and prints the discriminator's loss every 50
steps (log 4 = 1.386 is chance). The student is not trained. A GAN term can only steer the student where
this loss falls well below chance within a distillation's budget.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from diffpolicy.distill import DistillTrainer, distill_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, help="a consistency student (distill.init_student)")
    parser.add_argument("--t-min", type=int, default=2)
    parser.add_argument("--t-max", type=int, default=15)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4, help="the fake network's and head's lr")
    parser.add_argument("--run-dir", default="runs/dmd_gan_probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = distill_config(
        args.teacher,
        [
            "distill.objective=dmd",
            f"distill.init_student={args.student}",
            "train.batch_size=64",
            "eval.n_episodes=0",
            "distill.dmd_gan_weight=0.01",
            "distill.dmd_disc_weight=1",
            f"distill.dmd_fake_lr={args.lr}",
            f"distill.dmd_head_lr={args.lr}",
        ],
    )
    trainer = DistillTrainer(cfg, args.run_dir)
    trainer._build_data()
    trainer._build_policy()
    dmd = trainer.loss_module
    loader = DataLoader(trainer.train_set, batch_size=64, shuffle=True, drop_last=True)
    losses: list[float] = []
    while len(losses) < args.steps:
        for batch in loader:
            student = dmd.student
            real = student.normalizer.normalize("action", batch["action"])
            with torch.no_grad():
                chunk = dmd.generate(student.global_cond(student.encode_obs(batch["obs"])), real.shape)
            t = torch.randint(args.t_min, args.t_max + 1, (real.shape[0],))
            weight = (~batch["action_is_pad"]).all(1)
            dmd.fake.step(chunk, batch, real=real, real_weight=weight, t=t, disc_weight=1.0)
            losses.append(dmd.fake.disc_loss.item())
            if len(losses) % 50 == 0:
                print(f"step {len(losses)}: discriminator loss {sum(losses[-50:]) / 50:.3f} (chance 1.386)")
            if len(losses) >= args.steps:
                break


if __name__ == "__main__":
    main()
