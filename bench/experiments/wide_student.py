"""Capacity experiment: distill a teacher into a *wider* student than itself.

    python bench/experiments/wide_student.py --teacher runs/pusht_state_v_small/checkpoints/latest \\
        --init runs/pusht_state_v/checkpoints/latest --run-dir runs/cd_small_wide \\
        distill.num_steps=10000 train.batch_size=64 eval.n_episodes=0

`diffpolicy distill` gives the student the teacher's networks, so a student's capacity is tied to its
teacher's. Here the student takes the U-Net of `--init` (another v-prediction policy trained on the same
demonstrations, hence the same normalizer statistics) and its weights, and distills `--teacher`'s
probability-flow ODE with the unchanged objective. Comparing its 1-step success with the same-size
student's, against the same teacher, asks whether the one-call map is short of capacity. The starting
weights are a different denoiser of the same data, which is a confound:
`bench/experiments/consistency_fit.py` with each teacher tells which of the two ODEs the student ends up
following. Not part of the package: a result, not a feature (docs/research, issue 4).
"""

from __future__ import annotations

import argparse
import dataclasses

from diffpolicy.distill import DistillTrainer, TeacherError, distill_config
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, load_policy
from diffpolicy.training.trainer import log


class WideStudentTrainer(DistillTrainer):
    """DistillTrainer whose student has the networks and weights of `init` instead of the teacher's."""

    def __init__(self, *args, init: DiffusionPolicy, **kwargs) -> None:
        self.init = init
        super().__init__(*args, **kwargs)

    def _make_policy(self) -> ConsistencyPolicy:
        teacher = self._load_teacher()
        differs = self.init.normalizer.first_difference(teacher.normalizer)
        if differs:
            raise TeacherError(f"--init normalizes otherwise than the teacher (normalizer.{differs})")
        student = ConsistencyPolicy(self.cfg.policy, self.shape_meta)
        student.load_state_dict(self.init.state_dict())
        n = sum(p.numel() for p in student.parameters()) / 1e6
        log.info("wide student: %.2fM parameters, initialized from --init", n)
        return student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--init", required=True, help="v-prediction diffusion checkpoint: the student's nets")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("overrides", nargs="*", help="distill.* / train.* overrides, as for `diffpolicy distill`")
    args = ap.parse_args()

    init, init_cfg = load_policy(args.init)
    if type(init) is not DiffusionPolicy or init_cfg.policy.scheduler.prediction_type != "v_prediction":
        raise SystemExit("--init must be a diffusion policy trained with v_prediction, as a teacher")
    cfg = distill_config(args.teacher, args.overrides)
    if init_cfg.policy.net != cfg.policy.net:
        raise SystemExit(f"--init has a {init_cfg.policy.net}, the teacher a {cfg.policy.net}")
    cfg.policy = dataclasses.replace(
        cfg.policy, unet=init_cfg.policy.unet, transformer=init_cfg.policy.transformer
    )
    WideStudentTrainer(cfg, args.run_dir, resume=True, init=init).fit()


if __name__ == "__main__":
    main()
