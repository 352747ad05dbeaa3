"""Consistency distillation: a trained Diffusion Policy (the teacher) -> a 1-3 step ConsistencyPolicy.

Issue 4 asks for Consistency Policy (Prasad et al. 2024), which distils an EDM teacher with the CTM
recipe. Our teachers are DDPM epsilon- (or sample-) prediction models over T = 100 discrete steps, so
there is no EDM teacher to distil. What we do instead is the discrete-time equivalent of the same
recipe, Latent Consistency Model (LCM) consistency distillation, plus Consistency Policy's auxiliary
denoising loss:

* skip grid: with N = policy.consistency.original_inference_steps and k = T // N, the grid is
  t_i = i k - 1, i = 1..N (LCM's, and what diffusers' LCMScheduler samples from). Per sample draw i,
  set t = t_i ("t_{n+k}") and s = t - k ("t_n"). Below the first grid point, s = -1 stands for the clean
  end, abar = 1 (as the last step of DDIMScheduler with set_alpha_to_one, which our teachers sample
  with), and the target there is the teacher's clean estimate itself. LCM instead clamps s to 0, where
  abar_0 = 0.9994 leaves noise of std 0.025 in every target: invisible in image latents, but jitter in
  an action chunk;
* forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I), x0 the normalized chunk;
* one teacher ODE step: x_s = sqrt(abar_s) x0_T + sqrt(1 - abar_s) eps_T, where x0_T / eps_T are the
  teacher's clean-chunk / noise estimates at (x_t, t), x0_T clipped to [-1, 1] when the teacher clips
  (exactly diffusers' DDIMScheduler.step with eta = 0, the probability-flow ODE's DDIM solver);
* student f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) with LCM's scalings
  c_skip = 0.25 / ((l t)^2 + 0.25), c_out = l t / sqrt((l t)^2 + 0.25), l = timestep_scaling, so that
  f(x, 0) = x (the boundary condition). The student starts as a copy of the teacher's weights (and keeps
  its normalizer) but reads its network output F as v: x0_theta = sqrt(abar_t) x - sqrt(1 - abar_t) F.
  This is EDM's preconditioning (D = c_skip x + c_out F with unit-variance data) in discrete VP form,
  and it is well-conditioned at every t. Reading F as epsilon, x0 = (x - sqrt(1 - abar) F) / sqrt(abar)
  amplifies F's error by 1 / sqrt(abar_99) ~ 2000 at the top of our squaredcos_cap_v2 schedule (LCM's
  Stable Diffusion schedule ends at ~15x, which is why LCM gets away with epsilon); the first tiny run
  with the epsilon reading had losses in the thousands. Where abar ~ 1 (low noise), v ~ epsilon, so an
  epsilon teacher's weights are a good start where the consistency targets are anchored, and a poor one at
  high noise (at t = 99 the student first reads x0 ~ -x). A teacher trained with
  policy.scheduler.prediction_type=v_prediction (the EDM-style teacher parameterization the issue asks for)
  gives the student the teacher's exact function as its start;
* how far the teacher solves (distill.solver_span): LCM's target takes one grid step, s = t - k, and
  leaves the rest of the way to the target network, so a 1-step student's target at the top of the grid
  is N bootstrapped jumps away from anything the teacher said. CTM's "soft consistency" instead lets the
  teacher solve m grid steps, m uniform in 1..i (`uniform`), and `full` always solves to the clean end
  (m = i: the target is the teacher's own DDIM-i result from x_t, plain trajectory distillation with no
  target network in the loop). One grid step is what LCM and Consistency Policy's default use; the
  longer spans cost (i + 1) / 2 and i teacher calls per sample instead of 1;
* how finely the teacher solves (distill.solver_substeps = m): each grid step of k timesteps is m DDIM
  steps of k / m. With m = 1 (LCM) the chain of targets down the grid is, in the limit, the teacher's
  DDIM-N on the trailing grid: on Push-T 0.695 against 0.815 for DDIM-100, the ODE solved at every
  timestep (BENCHMARKS.md), and a student learns the map its targets define. m = k makes each target an
  exact DDIM-T solve between grid points at m teacher calls per sample. On Push-T m = 5 and 10 left 1-step
  success where m = 1 has it (0.67, 0.64 vs 0.645), and so did m = 5 fine-tuning the 20,000-step student
  (0.70 vs 0.72): the student's own fit error is several times the gap between the coarse and fine
  solves, so the default stays 1;
* what the top of the grid learns (distill.top_target): 1-step sampling calls the student once, at
  t_N = T - 1, on pure noise. With `ode` its target there is the consistency target above, i.e. in the
  limit the teacher's probability-flow ODE from t = T - 1 (DDIM on the grid, diffusers' "trailing"
  spacing). With `ddim` the student's input there is pure noise and its target is the teacher's DDIM-N
  sampler as shipped (`eval.sampler=ddim eval.num_inference_steps=N` with the teacher's
  policy.scheduler.timestep_spacing; the default, diffusers' "leading", starts at t = T - k and feeds that
  step pure noise although the forward process still has sqrt(abar) = 0.15 of signal there), solved in
  full from the same noise. On Push-T the two teacher samplers differ: DDIM-10 leading 0.79, trailing
  0.695 over the same 200 episodes (BENCHMARKS.md). Learning the leading sampler's map did not lift
  1-step success (0.61); longer distillation moved it more (`ode`, 20,000 steps: 0.72 against 0.66 at
  10,000, paired p = 0.13; level with the trailing sampler whose map it learns). Chained steps below the
  top keep the consistency targets;
* target network f_target: an EMA of the student (decay distill.target_ema_decay, LCM's 0.95),
  evaluated without gradient at (x_s, s), and f_target = x_s at s = -1 (the boundary condition);
* loss = d(f_theta(x_t, t), f_target(x_s, s)) + w * ||x0_theta(x_t, t) - x0||^2,
  d = pseudo-Huber sqrt(a^2 + c^2) - c per entry (distill.loss=huber, c = distill.huber_c, LCM's) or
  squared error (distill.loss=mse); w = distill.denoise_weight. Both terms are masked like the policy's
  own loss (padded actions contribute zero) and averaged over all entries (BasePolicy.masked_mse).

Why this is the equivalent: EDM/CTM distillation solves the teacher's probability-flow ODE from a
noisier to a less noisy point with one solver step (Heun there, DDIM here, which is the exact
first-order solver of a discrete-time DDPM's ODE), and trains the student to give the same clean
output at both points as an EMA target network does, with c_skip / c_out that enforce f(x, ~0) = x.
CTM's denoising score matching term is the auxiliary loss on the student's clean-chunk estimate.
One difference matters: CTM's network is conditioned on both the start and end time, so its DSM term
trains an "infinitesimal jump" output that does not compete with the jump to t = 0. Our default student
(distill.objective=cm) has one time input; its x0 estimate is the jump to t = 0, and the denoising
target E[x0 | x_t] averages over modes at high noise. A small weight w (default 0.1) keeps the term a
regularizer rather than a pull towards the mode average.

distill.objective=ctm is the two-time version, as Consistency Policy trains it (their code, not only the
CTM paper), in our discrete VP form:

* the student's network gets the stop time s as a second input (ConditionalUnet1D(stop_time_embed=True),
  policy.consistency.ctm; its encoder starts at zero, so the student starts as the teacher for every s)
  and jumps G(x_t, t, s) = DDIM move from t to s with its own clean estimate g(x_t, t, s) (v reading);
  G(x_t, t, t) = x_t, G(x_t, t, -1) = g. No LCM c_skip / c_out: the boundary is in the DDIM move;
* per sample: t = t_i (i uniform in 1..N as above), s = t_j with j uniform in 0..i-1 (j = 0: the clean
  end), and the teacher solves from t down to u = t - m k >= s (distill.solver_span as above, counted to
  s instead of to the clean end; `one`: one grid step, Consistency Policy's ode_steps_max = 1);
* target at s: G'(x_u, u, s) with G' the target network (x_u itself where u = s). Both it and the
  student's G(x_t, t, s) are carried to the clean end by the target network's g'(., s, -1) and compared
  there with d (CTM's comparison in data space); where s is the clean end they are compared directly;
* denoising term: w ||g(x_t, t, -1) - x0||^2 on the samples whose stop is the clean end (Consistency
  Policy's DSM is this jump to the clean end too; computing it on those samples costs no extra call).
One step samples g(x_T, T - 1, -1); chains re-noise as the CM student does. A training step costs about
1.5 times a CM step (the target network's two extra calls, one with gradients to its input). On Push-T
(1.18M pair, 10,000 steps, three training seeds; BENCHMARKS.md) ctm is worse than cm at 1 step (0.49 vs
0.61) and level at 2-3 steps: uniform stops give the 1-step jump (top of the grid to the clean end) 1 in
N x N samples; with half of the stops at the clean end (bench/ctm_stops.py) 0.58 over two seeds.

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
  success is level with plain DMD (0.714 vs 0.721 over 400 episodes; BENCHMARKS.md), so it is off by default.
* distill.dmd_divergence=fisher replaces DMD's KL gradient by Score identity Distillation's (SiD, Zhou
  et al. 2024) Fisher-divergence loss, d . ((x0_teacher - x) - alpha d) / mean|x - x0_teacher| with
  d = x0_teacher - x0_fake at x_t (alpha = distill.sid_alpha, the paper's 1.2). Its gradient keeps DMD's
  direction as the part that bypasses the networks and adds the part through both clean estimates'
  Jacobians (gradients flow through the frozen teacher and fake network into the chunk, about two extra
  backward passes per step, though on CPU a step took DMD's wall time). In image generation it beat DMD
  without a regression term or a GAN; on Push-T (1.18M pair, two seeds from the same CM starts, 400
  episodes; BENCHMARKS.md) 1 step 0.64 against DMD's 0.60 and CM's 0.61 (teacher 0.785; p = 0.11 against
  DMD) and 2 steps 0.755 against 0.74: not ranked apart from DMD, so kl stays the default.
There is no target network; the fake network and its optimizer are checkpointed with the run. On Push-T
(1.18M pair, three training seeds; BENCHMARKS.md) 3,000 steps at lr 1e-5 after 10,000 cm steps lift
1 step 0.56 -> 0.64 and 2 steps 0.62 -> 0.73 (level with the teacher's DDPM-100), on the 4.2M pair
(three seeds) 1 step 0.60 -> 0.65 and 2 steps 0.69 -> 0.73 (teacher 0.865); the 1-step gain varies
between reruns. More steps were worse, and nothing but rollouts says when to stop. The chunks come out wider
and rougher than the teacher's, as expected of an objective that ignores the ODE map.

Training reuses the Trainer (data, optimizer, LR schedule, EMA of the weights for the exported
student, checkpoints, resume, logs, final closed-loop evaluation): `DistillTrainer` only builds a
different policy (the student) and loss (`ConsistencyDistillation` or `DistributionMatching`) and
keeps the target (or fake) network updated and checkpointed. `distill.init_student` starts the
student from an earlier student's weights instead of the teacher's (fine-tuning with another
objective; resuming a run needs no such option).
The validation loss it logs is the student's DDPM loss on held-out windows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffpolicy.checkpoint import CheckpointError
from diffpolicy.config import ConfigError, DistillConfig, EmaConfig, RunConfig, validate, with_overrides
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, load_policy, make_scheduler
from diffpolicy.training.ema import EMA
from diffpolicy.training.trainer import Trainer, log


class TeacherError(ValueError):
    """The teacher checkpoint is missing, corrupt, or not a policy we can distil."""


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusionPolicy, RunConfig]:
    """Load and check a teacher: a diffusion policy with global observation conditioning, frozen."""
    try:
        policy, cfg = load_policy(path, device=device)
    except CheckpointError as e:
        raise TeacherError(f"cannot load the teacher: {e}") from None
    if isinstance(policy, ConsistencyPolicy):
        raise TeacherError(
            f"the teacher {path} is already consistency-distilled; distil from its diffusion teacher "
            f"({cfg.distill.teacher or 'unknown'})"
        )
    if not isinstance(policy, DiffusionPolicy):
        raise TeacherError(
            f"the teacher {path} holds a {type(policy).__name__}, not a DiffusionPolicy: only diffusion "
            "policies can be distilled"
        )
    if not cfg.policy.obs_as_global_cond:
        raise TeacherError(
            f"the teacher {path} uses inpainting conditioning (policy.obs_as_global_cond=false); "
            "distillation supports global observation conditioning only"
        )
    return policy.requires_grad_(False).eval(), cfg


# Budget keys that DistillConfig owns for a distillation run (one knob each).
_OWNED = {
    "train.num_steps": "distill.num_steps",
    "train.lr": "distill.lr",
    "train.warmup_steps": "distill.warmup_steps",
}


def distill_config(teacher: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The distillation run's config: the teacher's run config, turned into a consistency policy.

    Only policy.consistency.* and policy.scheduler.num_inference_steps may change the policy (the student
    has the teacher's networks); train.num_steps / lr / warmup_steps come from distill.* .
    """
    overrides = list(overrides or [])
    _, teacher_cfg = load_teacher(teacher)
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in _OWNED:
            raise ConfigError(f"'{key}' is set by '{_OWNED[key]}' in a distillation run; override that")
        if key == "distill.teacher":
            raise ConfigError("the teacher is given by --teacher, not distill.teacher")
        if key == "policy.consistency.ctm":
            raise ConfigError("'policy.consistency.ctm' is set by 'distill.objective' in a distillation run")
        if key.startswith("policy.") and not key.startswith(
            ("policy.consistency.", "policy.scheduler.num_inference_steps")
        ):
            raise ConfigError(
                f"'{key}': the student has the teacher's networks; only policy.consistency.* and "
                "policy.scheduler.num_inference_steps may be overridden"
            )
    base = [
        f"name={teacher_cfg.name}-consistency",
        "policy.type=consistency",
        "policy.scheduler.sampler=consistency",
        "policy.scheduler.prediction_type=v_prediction",  # see the module docstring
        "policy.scheduler.num_inference_steps=1",
        "eval.sampler=null",  # the teacher's evaluation sampler does not apply to the student
        "eval.num_inference_steps=null",
        "eval.timestep_spacing=null",
        f"distill.teacher={Path(teacher).resolve()}",
    ]
    cfg = with_overrides(teacher_cfg, base + overrides)
    cfg.run_dir = ""  # the teacher's run folder is not this run's (--run-dir or a fresh default)
    cfg.train.num_steps, cfg.train.lr = cfg.distill.num_steps, cfg.distill.lr
    cfg.train.warmup_steps = cfg.distill.warmup_steps
    cfg.policy.consistency.ctm = cfg.distill.objective == "ctm"  # a two-time student network
    if not cfg.data.path:  # the teacher trained on <its run folder>/demos.zarr
        demos = Path(teacher).resolve().parent.parent / "demos.zarr"
        if not demos.exists():
            raise ConfigError(
                f"the teacher's config has no data.path and {demos} does not exist: pass data.path=<store>"
            )
        cfg.data.path = str(demos)
    validate(cfg)
    return cfg


def ddim_step(
    teacher: DiffusionPolicy, sample: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step of the teacher from x_t to x_s, per-sample timesteps (B,); s < 0 is the
    clean end (abar = 1).

    Equal to diffusers' DDIMScheduler.step(eta=0, set_alpha_to_one=True) (clipped x0, unclipped epsilon),
    which steps one scalar timestep per call; the diffusers LCM distillation script writes its DDIM
    solver out the same way.
    """
    out = teacher.call_net(sample, t, cond)
    x0 = teacher.predict_x0(out, sample, t)
    # diffusers clips x0 but keeps the noise estimate of the unclipped one
    eps = out if teacher.cfg.scheduler.prediction_type == "epsilon" else teacher.implied_noise(sample, x0, t)
    sched = teacher.noise_scheduler.config
    if sched.clip_sample:
        x0 = x0.clamp(-sched.clip_sample_range, sched.clip_sample_range)
    return teacher.ddim_jump(sample, x0, t, s, eps)


def teacher_solve(
    teacher: DiffusionPolicy,
    sample: torch.Tensor,
    t: torch.Tensor,
    steps: torch.Tensor,
    skip: int,
    cond: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps[b]` DDIM steps of size `skip` from x_t for each sample b: (x_u, u), u = t - steps * skip
    (u = -1: the clean end). Each call of the teacher runs only the samples that still have steps left.
    """
    if ((steps < 1) | (t - (steps - 1) * skip < 0)).any():
        raise ValueError(
            f"solver steps {steps.tolist()} from t = {t.tolist()} in steps of {skip}: each must be >= 1 and "
            "start at t >= 0 (a step below 0 ends at the clean end)"
        )
    x, now = sample.clone(), t.clone()
    for j in range(int(steps.max())):
        rows = (steps > j).nonzero().squeeze(1)
        x[rows] = ddim_step(teacher, x[rows], now[rows], now[rows] - skip, cond[rows])
        now[rows] -= skip
    return x, now.clamp(min=-1)


def masked_pseudo_huber(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, c: float
) -> torch.Tensor:
    """sqrt(d^2 + c^2) - c per entry where mask is True, averaged over all entries (as masked_mse)."""
    err = torch.sqrt(F.mse_loss(pred, target, reduction="none") + c * c) - c
    return (err * mask).mean()


class ConsistencyDistillation(nn.Module):
    """The distillation loss: student (trained), teacher (frozen), target network (EMA of the student).

    The Trainer calls it like a policy: `sample_training_noise` draws the per-step randomness for the global
    batch, `forward(batch, noise, grid_index)` returns the loss. Only the student is optimized.
    """

    def __init__(
        self,
        student: ConsistencyPolicy,
        teacher: DiffusionPolicy,
        target: ConsistencyPolicy,
        cfg: DistillConfig,
    ) -> None:
        super().__init__()
        self.student, self.teacher, self.target, self.cfg = student, teacher, target, cfg
        steps = student.cfg.scheduler.num_train_timesteps
        self.grid_size = student.cfg.consistency.original_inference_steps
        self.skip = steps // self.grid_size  # k
        self.ddim_start: int | None = None
        if cfg.top_target == "ddim":  # where the teacher's own DDIM-N sampler starts, and its step
            ddim = make_scheduler(teacher.cfg.scheduler, "ddim")
            ddim.set_timesteps(self.grid_size)
            start, gaps = int(ddim.timesteps[0]), (-ddim.timesteps.diff()).unique().tolist()
            if gaps not in ([], [self.skip]):
                raise ValueError(
                    f"the teacher's DDIM-{self.grid_size} timesteps {ddim.timesteps.tolist()} "
                    f"are not evenly spaced by k = {self.skip}"
                )
            self.ddim_start = start
        self.terms: dict[str, torch.Tensor] = {}  # the last loss's parts, for logging

    def sample_training_noise(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Forward-process noise, grid indices (t = t_{index + 1}) and the teacher's solver steps for a
        whole (global) batch."""
        s = self.student
        noise = torch.randn((batch_size, s.horizon, s.trajectory_dim), generator=generator, device=device)
        index = torch.randint(0, self.grid_size, (batch_size,), generator=generator, device=device)
        if self.cfg.objective == "ctm":
            stop = self.stop_index(index, generator)
            return {
                "noise": noise,
                "grid_index": index,
                "stop_index": stop,
                "solver_steps": self.solver_steps(index, generator, stop),
            }
        steps = self.solver_steps(index, generator)
        return {"noise": noise, "grid_index": index, "solver_steps": steps}

    @staticmethod
    def stop_index(grid_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """CTM's stop points: j uniform in 0..index for t = t_{index + 1}, s = t_j (j = 0: the clean end)."""
        u = torch.rand(grid_index.shape, generator=generator, device=grid_index.device)
        return (u * (grid_index + 1)).long().clamp(max=grid_index)

    def solver_steps(
        self,
        grid_index: torch.Tensor,
        generator: torch.Generator | None = None,
        stop_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """How many grid steps the teacher solves from t = t_{index + 1} (distill.solver_span), at most
        down to the stop point t_{stop_index} (default: the clean end)."""
        most = grid_index + 1 - (0 if stop_index is None else stop_index)
        if self.cfg.solver_span == "one":
            return torch.ones_like(grid_index)
        if self.cfg.solver_span == "full":
            return most
        u = torch.rand(grid_index.shape, generator=generator, device=grid_index.device)
        return 1 + (u * most).long().clamp(max=most - 1)  # uniform in 1..most

    def forward(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        grid_index: torch.Tensor | None = None,
        solver_steps: torch.Tensor | None = None,
        stop_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Consistency loss + denoise_weight * auxiliary denoising loss (see the module docstring)."""
        student, obs = self.student, batch["obs"]
        x0 = student.normalizer.normalize("action", batch["action"])
        B = x0.shape[0]
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.device, x0.dtype)
        if grid_index is None:
            grid_index = torch.randint(0, self.grid_size, (B,), device=x0.device)
        grid_index = grid_index.to(x0.device)
        ctm = self.cfg.objective == "ctm"
        if ctm:
            stop_index = self.stop_index(grid_index) if stop_index is None else stop_index.to(x0.device)
        elif stop_index is not None:
            raise ValueError("stop_index belongs to distill.objective=ctm")
        if solver_steps is None:
            solver_steps = self.solver_steps(grid_index, stop_index=stop_index)
        steps = solver_steps.to(x0.device)
        shapes = [noise.shape == x0.shape, grid_index.shape == (B,), steps.shape == (B,)]
        if ctm:
            shapes.append(stop_index.shape == (B,) and bool((stop_index <= grid_index).all()))
        if not all(shapes):
            stop = None if stop_index is None else tuple(stop_index.shape)
            raise ValueError(
                f"noise {tuple(noise.shape)} / grid_index {tuple(grid_index.shape)} / solver_steps "
                f"{tuple(steps.shape)} / stop_index {stop} do not fit the action chunk {tuple(x0.shape)} "
                "(or a stop index exceeds its grid index)"
            )
        if ctm:
            return self._ctm_loss(batch, x0, noise, grid_index, stop_index, steps)
        t, x_t, f_target = self.targets(obs, x0, noise, grid_index, steps)
        cond = student.global_cond(student.encode_obs(obs))
        f_student, x0_student = student.consistency_output(x_t, t, cond)
        mask = student.loss_mask(batch, x0, None)
        if self.cfg.loss == "huber":
            consistency = masked_pseudo_huber(f_student, f_target, mask, self.cfg.huber_c)
        else:
            consistency = student.masked_mse(f_student, f_target, mask)
        denoise = student.masked_mse(x0_student, x0, mask)
        self.terms = {"train/consistency_loss": consistency.detach(), "train/denoise_loss": denoise.detach()}
        return consistency + self.cfg.denoise_weight * denoise

    def _ctm_loss(
        self,
        batch: dict[str, Any],
        x0: torch.Tensor,
        noise: torch.Tensor,
        grid_index: torch.Tensor,
        stop_index: torch.Tensor,
        steps: torch.Tensor,
    ) -> torch.Tensor:
        """distill.objective=ctm: d(g'(G(x_t, t, s), s), g'(G'(x_u, u, s), s)) with G the student's jump,
        G' / g' the target network's (jump / clean estimate), x_u the teacher's solve from x_t down to
        u >= s; plus the denoising term on the rows whose stop is the clean end (module docstring)."""
        student, target, obs = self.student, self.target, batch["obs"]
        t = (grid_index + 1) * self.skip - 1
        s = stop_index * self.skip - 1  # -1: the clean end
        x_t = student.noise_scheduler.add_noise(x0, noise, t)
        clean = s < 0
        with torch.no_grad():
            teacher_cond = self.teacher.global_cond(self.teacher.encode_obs(obs))
            sub = self.cfg.solver_substeps
            x_u, u = teacher_solve(self.teacher, x_t, t, steps * sub, self.skip // sub, teacher_cond)
            target_cond = target.global_cond(target.encode_obs(obs))
            at_stop = x_u.clone()  # where the teacher reached s itself, its result is the target there
            rows = (u > s).nonzero().squeeze(1)
            if len(rows):
                at_stop[rows] = target.jump(x_u[rows], u[rows], s[rows], target_cond[rows])[0]
        cond = student.global_cond(student.encode_obs(obs))
        pred, x0_student = student.jump(x_t, t, s, cond)
        goal = at_stop
        mid = (~clean).nonzero().squeeze(1)
        if len(mid):  # compare at the clean end: both through the target network's jump from s
            to_clean = torch.full_like(mid, -1)
            mapped = target.jump(pred[mid], s[mid], to_clean, target_cond[mid])[1]
            pred = pred.index_put((mid,), mapped)
            with torch.no_grad():
                goal = goal.index_put((mid,), target.jump(goal[mid], s[mid], to_clean, target_cond[mid])[1])
        mask = student.loss_mask(batch, x0, None)
        if self.cfg.loss == "huber":
            consistency = masked_pseudo_huber(pred, goal, mask, self.cfg.huber_c)
        else:
            consistency = student.masked_mse(pred, goal, mask)
        if clean.any():  # the student's own clean estimate where it jumps to the clean end
            denoise = student.masked_mse(x0_student[clean], x0[clean], mask[clean])
        else:
            denoise = consistency.new_zeros(())
        self.terms = {"train/consistency_loss": consistency.detach(), "train/denoise_loss": denoise.detach()}
        return consistency + self.cfg.denoise_weight * denoise

    @torch.no_grad()
    def targets(
        self,
        obs: dict[str, torch.Tensor],
        x0: torch.Tensor,
        noise: torch.Tensor,
        grid_index: torch.Tensor,
        steps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, x_t, f_target): the student's timesteps and inputs, and the consistency targets."""
        t = (grid_index + 1) * self.skip - 1  # t_{n+k}
        x_t = self.student.noise_scheduler.add_noise(x0, noise, t)
        teacher, target = self.teacher, self.target
        teacher_cond = teacher.global_cond(teacher.encode_obs(obs))
        start = t
        if self.ddim_start is not None:  # top_target=ddim: the teacher's DDIM-N sampler from pure noise
            top = grid_index == self.grid_size - 1
            x_t = torch.where(top.view(-1, 1, 1), noise, x_t)  # what 1-step sampling feeds the student
            start = torch.where(top, self.ddim_start, t)
            steps = torch.where(top, self.grid_size, steps)
        # s = t - steps * k; -1 (below the first grid point): the clean end, see the module docstring.
        # Each grid step of k timesteps is solver_substeps DDIM steps of k / solver_substeps.
        sub = self.cfg.solver_substeps
        x_s, s = teacher_solve(teacher, x_t, start, steps * sub, self.skip // sub, teacher_cond)
        f_target = x_s  # the boundary, f = x at the clean end; the target network everywhere else
        if (s >= 0).any():
            f_net, _ = target.consistency_output(
                x_s, s.clamp(min=0), target.global_cond(target.encode_obs(obs))
            )
            f_target = torch.where((s < 0).view(-1, 1, 1), x_s, f_net)
        return t, x_t, f_target


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
        self,
        x: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        obs: dict[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD: 0.5 ||x - stopgrad(x - g)||^2 with g = (x0_fake - x0_teacher) / scale at x_t, so the chunk
        moves along g and no gradient enters the score networks. Returns (loss, logged gap)."""
        with torch.no_grad():
            real = clean_estimate(self.teacher, x_t, t, obs)
            fake = self.fake.clean_estimate(x_t, t, obs)
            scale = self._scale(x, real, mask)
            grad = (fake - real) / scale
        return 0.5 * self.student.masked_mse(x, (x - grad).detach(), mask), self._gap(fake, real, scale, mask)

    def fisher_loss(
        self,
        x: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        obs: dict[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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


class DistillTrainer(Trainer):
    """The Trainer with a student initialized from the teacher and the consistency distillation loss.

    The run config comes from `distill_config`; everything else (data, optimizer, schedule, EMA of the
    exported weights, checkpoints, exact resume, logs, evaluation) is the Trainer's.
    """

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
        if kind != "v_prediction":  # the student reads the same weights as v: see the module docstring
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
                    "(distill.init_student) did better on Push-T (BENCHMARKS.md)"
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
