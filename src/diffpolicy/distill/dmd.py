"""Distribution matching (distill.objective=dmd): DMD's KL gradient or SiD's Fisher divergence
(distill.dmd_divergence), best as a fine-tune of a cm student.

distill.objective=dmd is distribution matching (DMD, Yin et al. 2024; One-Step Diffusion Policy, Wang et
al. 2024), best as a fine-tune of a cm student (distill.init_student). A consistency student must
reproduce one particular map, the teacher's ODE from each noise to its chunk; DMD asks only that its
1-step chunks x = f(z, T - 1) have the teacher's distribution for each observation:

* a "fake" score network, a copy of the teacher trained with the teacher's own DDPM loss, learns the
  distribution of the student's current 1-step chunks: distill.dmd_fake_updates optimizer steps
  (lr distill.dmd_fake_lr) on fresh chunks per student step (DMD2's two-time-scale rule, so it keeps up);
* the student's chunk x (with gradients) is noised to x_t at t uniform in [dmd_t_min, dmd_t_max] and
  moved along g = (x0_fake(x_t) - x0_teacher(x_t)) / mean|x - x0_teacher(x_t)|: the gradient of the KL
  between the two noised distributions in clean-chunk units, with DMD's per-sample normalization,
  written as the loss 0.5 ||x - stopgrad(x - g)||^2 (masked like the others). The teacher must predict
  v: its clean estimates near t = T are ill-conditioned otherwise;
* optionally (distill.dmd_regression_weight > 0) DMD's regression term: w ||x - ODE(z)||^2 against the
  teacher's DDIM chain from the same noise z along the consistency grid (the CM student's 1-step target),
  which keeps the student near the teacher's noise-to-chunk map; it costs a teacher call per grid point
  per step (about 1.8x a DMD step on CPU). On Push-T (4.2M pair, 30,000-step teacher, four seeds, w = 2)
  it makes the students the closest yet to the teacher's map, with its spread and smoothness, but 1-step
  success is level with plain DMD (0.714 vs 0.721 over 400 episodes; docs/research), so it is off by default.
* distill.dmd_divergence=fisher replaces DMD's KL gradient by Score identity Distillation's (SiD, Zhou
  et al. 2024) Fisher-divergence loss, d . ((x0_teacher - x) - alpha d) / mean|x - x0_teacher| with
  d = x0_teacher - x0_fake at x_t (alpha = distill.sid_alpha, the paper's 1.2). Its gradient keeps DMD's
  direction as the part that bypasses the networks and adds the part through both clean estimates'
  Jacobians (gradients flow through the frozen teacher and fake network into the chunk, about two extra
  backward passes per step, though on CPU a step took DMD's wall time). In image generation it beat DMD
  without a regression term or a GAN; on Push-T (1.18M pair, two seeds from the same CM starts, 400
  episodes; docs/research) 1 step 0.64 against DMD's 0.60 and CM's 0.61 (teacher 0.785; p = 0.11 against
  DMD) and 2 steps 0.755 against 0.74: not ranked apart from DMD, so kl stays the default.
There is no target network; the fake network and its optimizer are checkpointed with the run. On Push-T
(1.18M pair, three training seeds; docs/research) 3,000 steps at lr 1e-5 after 10,000 cm steps lift
1 step 0.56 -> 0.64 and 2 steps 0.62 -> 0.73 (level with the teacher's DDPM-100), on the 4.2M pair
(three seeds) 1 step 0.60 -> 0.65 and 2 steps 0.69 -> 0.73 (teacher 0.865); the 1-step gain varies
between reruns. More steps were worse, and nothing but rollouts says when to stop. The chunks come out wider
and rougher than the teacher's, as expected of an objective that ignores the ODE map.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from diffpolicy.config import DistillConfig
from diffpolicy.distill.common import one_view, teacher_solve
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy


class FakeScore:
    """DMD's "fake" score network: a copy of the teacher that keeps learning the student's 1-step chunks.

    Deliberately not an nn.Module attribute of the loss: it has its own optimizer and backward passes, and
    DistributedDataParallel around the loss would otherwise expect the student's backward to give it
    gradients. Under torchrun it gets its own DDP wrapper, so its updates average over ranks like the
    student's. No library ships this piece (diffusers' DMD code lives in research scripts, not an API).
    """

    def __init__(self, teacher: DiffusionPolicy, lr: float, distributed: bool) -> None:
        self.net = copy.deepcopy(teacher).requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        self.model: nn.Module = self.net
        if distributed:
            ids = [self.net.device.index] if self.net.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)

    def step(self, chunk: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step of the teacher's own DDPM loss on `chunk` (normalized generated actions)."""
        action = self.net.normalizer.unnormalize("action", chunk)
        with torch.enable_grad():
            loss = self.model({**batch, "action": action})
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return loss.detach()

    def clean_estimate(
        self, x_t: torch.Tensor, t: torch.Tensor, obs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return clean_estimate(self.net, x_t, t, obs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def clean_estimate(
    net: DiffusionPolicy, x_t: torch.Tensor, t: torch.Tensor, obs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """A diffusion policy's estimate of the clean (normalized) chunk at (x_t, t), per-sample timesteps."""
    return net.predict_x0(net.call_net(x_t, t, net.global_cond(net.encode_obs(obs))), x_t, t)


class DistributionMatching(nn.Module):
    """distill.objective=dmd: the student's 1-step chunks pulled towards the teacher's distribution.

    Per step: the fake score network takes distill.dmd_fake_updates steps on fresh 1-step chunks; then
    the student's chunk x (with gradients) is noised to x_t, t uniform in [dmd_t_min, dmd_t_max], and the
    loss 0.5 ||x - stopgrad(x - g)||^2 moves it along g = (x0_fake - x0_teacher) / mean|x - x0_teacher|
    (module docstring; distill.dmd_divergence=fisher uses SiD's loss instead, `fisher_loss`). Only the
    student is optimized by the Trainer.
    """

    def __init__(
        self, student: ConsistencyPolicy, teacher: DiffusionPolicy, cfg: DistillConfig, distributed: bool
    ) -> None:
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.fake = FakeScore(teacher, cfg.dmd_fake_lr, distributed)
        self.top = student.cfg.scheduler.num_train_timesteps - 1
        self.grid_size = student.cfg.consistency.original_inference_steps
        self.terms: dict[str, torch.Tensor] = {}

    def generate(self, cond: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The student's 1-step chunk from noise z (normalized, unclipped; gradients if enabled)."""
        top = torch.full((z.shape[0],), self.top, device=z.device)
        return self.student.consistency_output(z, top, cond)[0]

    def ode_chunk(self, z: torch.Tensor, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's DDIM solve from noise z at the top of the grid to the clean end, one grid step
        per call: the chunk a consistency student's 1-step map is distilled towards (the regression term)."""
        n, skip = z.shape[0], (self.top + 1) // self.grid_size
        cond = self.teacher.global_cond(self.teacher.encode_obs(obs))
        top = torch.full((n,), self.top, device=z.device)
        steps = torch.full((n,), self.grid_size, device=z.device)
        return teacher_solve(self.teacher, z, top, steps, skip, cond)[0]

    def regression(
        self, x: torch.Tensor, z: torch.Tensor, obs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """The regression term's masked mean squared error between chunk x (from noise z) and ODE(z)."""
        with torch.no_grad():
            ode = self.ode_chunk(z, obs)
        return self.student.masked_mse(x, ode, mask)

    @staticmethod
    def _scale(x: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DMD's per-sample normalization mean|x - x0_teacher| over the sample's real (unpadded) actions,
        shaped (B, 1, 1), without gradients."""
        m = mask.to(x.dtype)
        scale = ((x - real).detach().abs() * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
        return scale.clamp(min=1e-4).view(-1, 1, 1)

    @staticmethod
    def _gap(fake: torch.Tensor, real: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logged train/dmd_grad: mean |x0_fake - x0_teacher| / scale over unpadded entries."""
        m = mask.to(fake.dtype)
        return (((fake - real).detach() / scale).abs() * m).sum() / m.sum().clamp(min=1)

    def kl_loss(
        self, x: Tensor, x_t: Tensor, t: Tensor, obs: dict[str, Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """DMD: 0.5 ||x - stopgrad(x - g)||^2 with g = (x0_fake - x0_teacher) / scale at x_t, so the chunk
        moves along g and no gradient enters the score networks. Returns (loss, logged gap)."""
        with torch.no_grad():
            real = clean_estimate(self.teacher, x_t, t, obs)
            fake = self.fake.clean_estimate(x_t, t, obs)
            scale = self._scale(x, real, mask)
            grad = (fake - real) / scale
        return 0.5 * self.student.masked_mse(x, (x - grad).detach(), mask), self._gap(fake, real, scale, mask)

    def fisher_loss(
        self, x: Tensor, x_t: Tensor, t: Tensor, obs: dict[str, Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """SiD (Zhou et al. 2024): (d . ((x0_teacher - x) - alpha d)) / scale with d = x0_teacher - x0_fake,
        both clean estimates taken at x_t with gradients through them into the chunk (the networks' own
        weights stay as they are: the teacher is frozen, the fake learns only in FakeScore.step). Its
        gradient without the Jacobian terms is DMD's g; masked and averaged over all entries like the
        other losses. Returns (loss, logged gap)."""
        # gradients to the input only: none into the fake's weights (or its DDP reducer)
        self.fake.net.requires_grad_(False)
        try:
            real = clean_estimate(self.teacher, x_t, t, obs)
            fake = self.fake.clean_estimate(x_t, t, obs)
        finally:
            self.fake.net.requires_grad_(True)  # FakeScore trains all of its weights
        scale = self._scale(x, real, mask)
        d = real - fake
        per_entry = d * ((real - x) - self.cfg.sid_alpha * d) / scale
        return (per_entry * mask).mean(), self._gap(fake, real, scale, mask)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The DMD / SiD loss, with the student, the teacher and the fake network on one view of each
        camera (`one_view`)."""
        with one_view(self.student, (self.teacher, self.fake.net), batch["obs"]) as obs:
            return self._loss({**batch, "obs": obs})

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        student, obs = self.student, batch["obs"]
        x_data = student.normalizer.normalize("action", batch["action"])
        mask = student.loss_mask(batch, x_data, None)
        cond = student.global_cond(student.encode_obs(obs))
        for _ in range(self.cfg.dmd_fake_updates):
            with torch.no_grad():
                chunk = self.generate(cond, torch.randn_like(x_data))
            fake_loss = self.fake.step(chunk, batch)
        z = torch.randn_like(x_data)
        x = self.generate(cond, z)
        t = torch.randint(self.cfg.dmd_t_min, self.cfg.dmd_t_max + 1, (x.shape[0],), device=x.device)
        x_t = self.teacher.noise_scheduler.add_noise(x, torch.randn_like(x), t)  # gradients flow through x
        score_loss = self.fisher_loss if self.cfg.dmd_divergence == "fisher" else self.kl_loss
        loss, gap = score_loss(x, x_t, t, obs, mask)
        self.terms = {
            "train/fake_loss": fake_loss,
            "train/dmd_grad": gap,
            "train/data_mse": student.masked_mse(x.detach(), x_data, mask),  # a diagnostic only
        }
        if self.cfg.dmd_regression_weight > 0:
            regression = self.regression(x, z, obs, mask)
            loss = loss + self.cfg.dmd_regression_weight * regression
            self.terms["train/regression_mse"] = regression.detach()
        return loss
