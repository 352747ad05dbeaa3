"""DistillTrainer: the one trainer every distillation objective runs in.

Training reuses the Trainer (data, optimizer, LR schedule, EMA of the weights for the exported
student, checkpoints, resume, logs, final closed-loop evaluation): `DistillTrainer` only builds a
different policy (the student) and loss (`ConsistencyDistillation` or `DistributionMatching`) and
keeps the target (or fake) network updated and checkpointed. `distill.init_student` starts the
student from an earlier student's weights instead of the teacher's (fine-tuning with another
objective; resuming a run needs no such option).
The validation loss it logs is the student's DDPM loss on held-out windows.
"""

from __future__ import annotations

from typing import Any

from diffpolicy.checkpoint import CheckpointError
from diffpolicy.config import EmaConfig
from diffpolicy.distill.consistency import ConsistencyDistillation
from diffpolicy.distill.dmd import DistributionMatching
from diffpolicy.distill.teacher import TeacherError, load_teacher
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, load_policy
from diffpolicy.training.ema import EMA
from diffpolicy.training.trainer import Trainer, log


class DistillTrainer(Trainer):
    """The Trainer with a student initialized from the teacher and the consistency distillation loss.

    The run config comes from `distill_config`; everything else (data, optimizer, schedule, EMA of the
    exported weights, checkpoints, exact resume, logs, evaluation) is the Trainer's.
    """

    num_steps_key = "distill.num_steps"  # train.num_steps cannot be set in a distillation run
    # The student, teacher and target networks see one view of the frames (one_view), not cached maps.
    reads_cached_features = False

    def _load_teacher(self) -> DiffusionPolicy:
        """distill.teacher, checked against this run's task; also kept as self.teacher."""
        teacher, _ = load_teacher(self.cfg.distill.teacher, device=self.device)
        if teacher.shape_meta != self.shape_meta:
            raise TeacherError(
                f"the teacher was trained on observations/actions {teacher.shape_meta}, but task "
                f"'{self.cfg.task.name}' now has {self.shape_meta}"
            )
        self.teacher = teacher
        return teacher

    def _make_policy(self) -> ConsistencyPolicy:
        teacher = self._load_teacher()
        student = ConsistencyPolicy(self.cfg.policy, self.shape_meta)
        student.frame_stride = self.cfg.data.frame_stride  # the teacher's run's, as its windows were
        try:  # the teacher's networks and fitted normalizer
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        except RuntimeError as e:
            raise TeacherError(f"the student does not match the teacher's networks: {e}") from None
        # a CTM student's stop-time encoder is its only addition; it starts at zero (ConditionalUnet1D)
        new = [k for k in missing if not (student.is_ctm and k.startswith("net.stop_step_encoder."))]
        if new or unexpected:
            raise TeacherError(
                f"the student does not match the teacher's networks: missing {new}, unexpected {unexpected}"
            )
        if self.cfg.distill.init_student:
            self._load_init_student(student)
            return student
        kind = teacher.cfg.scheduler.prediction_type
        if kind != "v_prediction":  # the student reads the same weights as v: see distill/consistency.py
            log.info(
                "the teacher predicts %s; the student starts from its weights but relearns the high-noise end"
                " (a teacher trained with policy.scheduler.prediction_type=v_prediction starts it exactly)",
                kind,
            )
        return student

    def _load_init_student(self, student: ConsistencyPolicy) -> None:
        """Overwrite the teacher-initialized `student` with the weights of distill.init_student.

        Only a fresh run reads it: a resumed run restores its own weights over these. The normalizer
        must be the teacher's, since the loss normalizes data with the student's and feeds the teacher.
        """
        path = self.cfg.distill.init_student
        try:
            init, init_cfg = load_policy(path, device=self.device)
        except CheckpointError as e:
            raise TeacherError(f"cannot load distill.init_student: {e}") from None
        if not isinstance(init, ConsistencyPolicy):
            raise TeacherError(
                f"distill.init_student={path} holds a {type(init).__name__}, not a consistency-distilled "
                "student; leave it empty to start from the teacher"
            )
        source = init_cfg.distill.teacher or "unknown"
        differs = init.normalizer.first_difference(self.teacher.normalizer)
        if differs:
            raise TeacherError(
                f"distill.init_student={path} was fitted with other normalizer statistics than the "
                f"teacher's (normalizer.{differs} differs); it was distilled from {source}"
            )
        try:
            student.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise TeacherError(
                f"distill.init_student={path} does not match the teacher's networks: {e}"
            ) from None
        log.info("student initialized from %s (distilled from %s)", path, source)

    def _make_loss_module(self) -> ConsistencyDistillation | DistributionMatching:
        d = self.cfg.distill
        if d.objective == "dmd":  # no target network: the fake score network is its moving reference
            self.target = None
            if self.teacher.cfg.scheduler.prediction_type != "v_prediction":
                raise TeacherError(
                    "distill.objective=dmd scores chunks with the teacher's clean estimates up to t = "
                    f"{d.dmd_t_max}, which a {self.teacher.cfg.scheduler.prediction_type} teacher gives "
                    "ill-conditioned: use a teacher trained with "
                    "policy.scheduler.prediction_type=v_prediction"
                )
            if not d.init_student:
                log.info(
                    "dmd from the teacher's weights (whose 1-step map is DDIM-1's): fine-tuning a cm student "
                    "(distill.init_student) did better on Push-T (docs/research)"
                )
            return DistributionMatching(self.policy, self.teacher, d, distributed=self.world_size > 1)
        self.target = EMA(self.policy, EmaConfig(min_value=d.target_ema_decay, max_value=d.target_ema_decay))
        return ConsistencyDistillation(self.policy, self.teacher, self.target.model, d)

    def _after_optimizer_step(self, step: int) -> None:
        super()._after_optimizer_step(step)
        if self.target is not None:
            self.target.update(self.policy, step)  # every rank: each needs the target for its loss

    def _loss_terms(self) -> dict[str, float]:
        return {k: v.item() for k, v in self.loss_module.terms.items()}

    def _training_state(self, step: int) -> dict[str, Any]:
        if self.target is None:
            return {**super()._training_state(step), "fake": self.loss_module.fake.state_dict()}
        return {**super()._training_state(step), "target": self.target.state_dict()}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        if self.target is None:
            if "fake" not in state:
                raise CheckpointError(
                    "this run's checkpoint has no fake score network: it was not written by a "
                    "distill.objective=dmd run; use a fresh --run-dir"
                )
            self.loss_module.fake.load_state_dict(state["fake"])
        else:
            self.target.load_state_dict(state["target"])
