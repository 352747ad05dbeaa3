"""Distillation: a trained Diffusion Policy (the teacher) -> a 1-3 step ConsistencyPolicy student.

One module per objective, all run by the one DistillTrainer (`diffpolicy distill`, distill.objective):

    teacher.py      load_teacher, distill_config: the teacher checked, the run config derived from it
    common.py       the teacher's DDIM solve (ddim_step, teacher_solve) and the consistency distance
    consistency.py  cm: LCM-style consistency distillation (the default; its module docstring explains
                    the discrete-time recipe and why the student reads its network output as v)
    ctm.py          ctm: consistency trajectory distillation, a two-time student (Consistency Policy)
    dmd.py          dmd: distribution matching, DMD's KL or SiD's Fisher divergence (a fine-tune of cm)
    trainer.py      DistillTrainer: the Trainer with a student, a loss module and a target/fake network

What each objective did on Push-T: BENCHMARKS.md (the current recipe) and docs/research/ (every experiment).
"""

from diffpolicy.distill.common import consistency_distance, ddim_step, masked_pseudo_huber, teacher_solve
from diffpolicy.distill.consistency import ConsistencyDistillation
from diffpolicy.distill.ctm import ctm_loss, stop_index
from diffpolicy.distill.dmd import DistributionMatching, FakeScore, clean_estimate
from diffpolicy.distill.teacher import TeacherError, distill_config, load_teacher
from diffpolicy.distill.trainer import DistillTrainer

__all__ = [
    "ConsistencyDistillation",
    "DistillTrainer",
    "DistributionMatching",
    "FakeScore",
    "TeacherError",
    "clean_estimate",
    "consistency_distance",
    "ctm_loss",
    "ddim_step",
    "distill_config",
    "load_teacher",
    "masked_pseudo_huber",
    "stop_index",
    "teacher_solve",
]
