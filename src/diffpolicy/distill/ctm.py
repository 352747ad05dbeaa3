"""Consistency trajectory distillation (distill.objective=ctm): a two-time student that jumps from any t
to any s <= t.

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
(1.18M pair, 10,000 steps, three training seeds; docs/research) ctm is worse than cm at 1 step (0.49 vs
0.61) and level at 2-3 steps: uniform stops give the 1-step jump (top of the grid to the clean end) 1 in
N x N samples; with half of the stops at the clean end (bench/experiments/ctm_stops.py) 0.58 over two seeds.

The grid, the noise draws and the solver spans are ConsistencyDistillation's (distill/consistency.py);
this module holds what is CTM's own: the stop points and the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from diffpolicy.distill.common import consistency_distance, teacher_solve


def stop_index(grid_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CTM's stop points: j uniform in 0..index for t = t_{index + 1}, s = t_j (j = 0: the clean end)."""
    u = torch.rand(grid_index.shape, generator=generator, device=grid_index.device)
    return (u * (grid_index + 1)).long().clamp(max=grid_index)


def ctm_loss(
    cd: Any,
    batch: dict[str, Any],
    x0: torch.Tensor,
    noise: torch.Tensor,
    grid_index: torch.Tensor,
    stop_index: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """distill.objective=ctm: d(g'(G(x_t, t, s), s), g'(G'(x_u, u, s), s)) with G the student's jump,
    G' / g' the target network's (jump / clean estimate), x_u the teacher's solve from x_t down to
    u >= s; plus the denoising term on the rows whose stop is the clean end (module docstring).

    `cd` is the ConsistencyDistillation module calling it: its student, teacher, target network, cfg and
    grid step k (skip); the loss's parts go to cd.terms for logging.
    """
    student, target, obs = cd.student, cd.target, batch["obs"]
    t = (grid_index + 1) * cd.skip - 1
    s = stop_index * cd.skip - 1  # -1: the clean end
    x_t = student.noise_scheduler.add_noise(x0, noise, t)
    clean = s < 0
    with torch.no_grad():
        teacher_cond = cd.teacher.global_cond(cd.teacher.encode_obs(obs))
        sub = cd.cfg.solver_substeps
        x_u, u = teacher_solve(cd.teacher, x_t, t, steps * sub, cd.skip // sub, teacher_cond)
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
    consistency = consistency_distance(student, pred, goal, mask, cd.cfg)
    if clean.any():  # the student's own clean estimate where it jumps to the clean end
        denoise = student.masked_mse(x0_student[clean], x0[clean], mask[clean])
    else:
        denoise = consistency.new_zeros(())
    cd.terms = {"train/consistency_loss": consistency.detach(), "train/denoise_loss": denoise.detach()}
    return consistency + cd.cfg.denoise_weight * denoise
