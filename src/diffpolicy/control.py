"""Receding-horizon control: the one code path that runs a policy in an environment.

Every `n_action_steps` steps the controller asks the policy for a fresh chunk from the last n_obs_steps
observations; in between it plays the chunk's actions. A chunk's executable part starts at the
current step (offset n_obs_steps-1 of the predicted horizon, see data/sequence.py) and is
horizon - n_obs_steps + 1 steps long. With temporal ensembling, every step's action is a weighted
average over all stored chunks that cover it (ACT's rule: weight exp(-decay * i), i = 0 the oldest).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffpolicy.data.sequence import prepare_obs
from diffpolicy.policy import ConsistencyPolicy, DiffusionPolicy, FlowPolicy


class TemporalEnsembler:
    """Stores overlapping chunks (start step, (N, L, Da)) and blends the ones covering a step."""

    def __init__(self, decay: float = 0.1) -> None:
        self.decay = decay
        self.chunks: list[tuple[int, np.ndarray]] = []

    def reset(self) -> None:
        self.chunks.clear()

    def add(self, start: int, chunk: np.ndarray) -> None:
        self.chunks.append((start, chunk))

    def _covering(self, t: int) -> list[tuple[int, np.ndarray]]:
        self.chunks = [(s, c) for s, c in self.chunks if s + c.shape[1] > t]  # drop expired chunks
        covering = [(s, c) for s, c in self.chunks if s <= t]
        if not covering:
            raise RuntimeError(f"no predicted chunk covers step {t}")
        return covering

    def newest(self, t: int) -> np.ndarray:
        s, c = self._covering(t)[-1]
        return c[:, t - s]

    def blend(self, t: int) -> np.ndarray:
        covering = self._covering(t)
        weights = np.exp(-self.decay * np.arange(len(covering)))
        weights /= weights.sum()
        return sum(w * c[:, t - s] for w, (s, c) in zip(weights, covering, strict=True))


def check_frame_stride(task: Any, frame_stride: int) -> None:
    """Refuse, naming the reason, to run a policy trained with data.frame_stride > 1 in a task whose actions
    are not absolute targets (Task.absolute_actions): holding a velocity or a delta for k control steps
    would move k times as far as the demonstrations did."""
    if frame_stride > 1 and not getattr(task, "absolute_actions", False):
        raise ValueError(
            f"the policy was trained with data.frame_stride={frame_stride}: it acts every {frame_stride} "
            f"control steps and the controller holds each action that long, which only fits absolute "
            f"actions (targets), and task {getattr(task, 'name', task)!r} does not declare them "
            "(Task.absolute_actions): train it with data.frame_stride=1"
        )


class RecedingHorizonController:
    """Feeds a batch of N environments: `act(obs)` takes {key: (N, ...)} numpy obs, returns (N, Da).

    With a frame stride k (the policy's `frame_stride`, its run's data.frame_stride) the policy runs at
    the environment's rate / k: `act` passes every k-th observation to the policy (so its observation
    window is k control steps apart, as in training) and holds each of its actions for k control steps.
    `step` counts policy steps, `env_step` control steps.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        n_action_steps: int | None = None,
        temporal_ensemble: bool = False,
        ensemble_decay: float = 0.1,
        generator: torch.Generator | None = None,
        frame_stride: int | None = None,
    ) -> None:
        self.policy = policy
        self.frame_stride = int(getattr(policy, "frame_stride", 1) if frame_stride is None else frame_stride)
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride={self.frame_stride} must be >= 1")
        self.obs_meta = policy.shape_meta["obs"]
        self.n_obs_steps = policy.n_obs_steps
        self.n_action_steps = policy.n_action_steps if n_action_steps is None else int(n_action_steps)
        executable = policy.horizon - policy.n_obs_steps + 1
        if not 1 <= self.n_action_steps <= executable:
            raise ValueError(
                f"n_action_steps={self.n_action_steps} must be in [1, {executable}] "
                f"(horizon - n_obs_steps + 1)"
            )
        self.temporal_ensemble = temporal_ensemble
        self.ensembler = TemporalEnsembler(ensemble_decay)
        self.generator = generator
        self.reset()

    def reset(self) -> None:
        """Forget history and queued actions (call at every episode start)."""
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        self.ensembler.reset()
        self.step = 0
        self.env_step = 0
        self.held: np.ndarray | None = None  # the action held between policy steps (frame_stride > 1)
        self.last_chunk: np.ndarray | None = None  # newest chunk's executable part, (N, L, Da)

    def _push(self, obs: dict[str, np.ndarray]) -> None:
        frame = {}
        for key, meta in self.obs_meta.items():
            if key not in obs:
                raise KeyError(f"environment observation lacks '{key}' (got {sorted(obs)})")
            value = obs[key]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            rgb = meta.get("type", "low_dim") == "rgb"
            per_env = "(N, H, W, C) camera frames" if rgb else f"(N, {', '.join(map(str, meta['shape']))})"
            rank = 4 if rgb else 1 + len(meta["shape"])
            if arr.ndim != rank or (not rgb and np.prod(arr.shape[1:]) != np.prod(meta["shape"])):
                raise ValueError(
                    f"environment observation '{key}' has shape {arr.shape}; the controller takes one row "
                    f"per environment, {per_env} (a single environment: add a batch axis, obs[None])"
                )
            if rgb and arr.dtype.kind == "f" and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(
                    f"camera observation '{key}' has values in [{arr.min():.4g}, {arr.max():.4g}]; the "
                    "controller takes frames as uint8 or float in 0..255 (as environments render them)"
                )
            frame[key] = prepare_obs(arr, meta.get("type", "low_dim"))
        sizes = {len(v) for v in frame.values()}
        started = len(next(iter(self.history[0].values()))) if self.history else None
        if len(sizes) > 1 or (started is not None and sizes != {started}):
            raise ValueError(
                f"observation keys hold {sorted(sizes)} environments but this episode began with {started}: "
                "one row per environment; call reset() when the number of environments changes"
                if started is not None
                else f"observation keys disagree on the number of environments: {sorted(sizes)}"
            )
        if not self.history:  # episode start: the window is filled with the first observation
            self.history.extend([frame] * self.n_obs_steps)
        else:
            self.history.append(frame)

    def _window(self) -> dict[str, torch.Tensor]:
        """The observation window {key: (N, n_obs_steps, ...)} on the policy's device."""
        device = self.policy.device
        return {
            k: torch.from_numpy(np.stack([h[k] for h in self.history], axis=1)).to(device)
            for k in self.obs_meta
        }

    def _predict(self) -> np.ndarray:
        out = self.policy.predict_action(self._window(), generator=self.generator)
        start = self.n_obs_steps - 1
        return out["action_pred"][:, start:].float().cpu().numpy()

    def fresh_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Add `obs` to the window and return a fresh chunk's executable part (N, L, Da) without queuing
        it: for callers that schedule chunks themselves (LeRobot's async policy server)."""
        self._push(obs)
        return self._predict()

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The action for this control step: a new policy step every frame_stride control steps, else the
        action held since the last one."""
        if self.env_step % self.frame_stride == 0:
            self.held = self._policy_step(obs)
        self.env_step += 1
        return self.held

    def _policy_step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        self._push(obs)
        if self.step % self.n_action_steps == 0:
            self.last_chunk = self._predict()
            self.ensembler.add(self.step, self.last_chunk)
        action = (
            self.ensembler.blend(self.step) if self.temporal_ensemble else self.ensembler.newest(self.step)
        )
        self.step += 1
        return action


# --------------------------------------------------------------------------------------------------
# Asynchronous execution and real-time chunking (Black et al. 2025, "Real-Time Execution of Action
# Chunking Flow Policies"), for DDPM / DDIM and flow-matching sampling
# --------------------------------------------------------------------------------------------------

ASYNC_MODES = ("sync", "naive", "ensemble", "rtc")

# Black et al.'s beta, the clip of the guidance weight (1 - tau) / (tau r_tau^2) on the velocity, by training
# objective; chosen by measurement on trained Push-T state policies (bench/notes/serving.md, issue 38).
# Flow (guided Euler, 4 steps): the paper's 5; 1000 overshoots (boundary jerk 32.7 vs 23.2 at 300 ms, in-chunk
# jerk 17.0 vs 6.4), 20 and 100 change nothing. DDPM / DDIM 10: the weight near the clean end matters;
# 5 barely smooths (jerk 21.2 at 300 ms vs naive 26.3), 100 and 1000 give identical chunks (the weight never
# exceeds ~100 at DDIM-10's timesteps) with jerk 13.3 and success 0.66 vs sync 0.54 at 300 ms.
RTC_MAX_GUIDANCE = {"flow": 5.0, "ddpm": 1000.0}


def default_max_guidance(policy: torch.nn.Module) -> float:
    """The guidance clip real-time chunking uses for `policy` unless told otherwise (`RTC_MAX_GUIDANCE`)."""
    return RTC_MAX_GUIDANCE["flow" if isinstance(policy, FlowPolicy) else "ddpm"]


def rtc_weights(executable: int, delay: int, overlap: int) -> np.ndarray:
    """Guidance weights over a chunk's executable steps: 1 for the `delay` frozen steps (they run from the
    previous chunk while this one is computed), then an exponential decay to 0 at the end of the overlap
    with the previous chunk (`overlap` steps from the current one), 0 after it (Black et al. eq. 5)."""
    w = np.zeros(executable)
    w[:delay] = 1.0
    span = overlap - delay
    if span > 0:
        c = (overlap - np.arange(delay, overlap)) / (span + 1)
        w[delay:overlap] = c * np.expm1(c) / np.expm1(1.0)
    return w


def guidance_weight(tau: float, max_guidance: float) -> float:
    """Black et al.'s guidance weight on the velocity at flow time tau (0 noise, 1 clean):
    min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2) the PiGDM variance of the
    clean chunk given the noisy one; beta = max_guidance where the weight is unbounded (tau = 0 or 1)."""
    if tau <= 0.0 or tau >= 1.0:
        return float(max_guidance)
    return min(float(max_guidance), (tau**2 + (1 - tau) ** 2) / (tau * (1 - tau)))


def check_rtc_policy(policy: torch.nn.Module) -> None:
    """Refuse, naming the reason, a policy whose sampler real-time chunking cannot guide."""
    if isinstance(policy, ConsistencyPolicy):
        raise ValueError(
            "real-time chunking guides DDPM / DDIM and flow-matching sampling; a consistency-distilled "
            "student (ConsistencyPolicy, from diffpolicy distill) samples with LCM / CTM jumps, which "
            "pseudo-inverse guidance does not describe: use its teacher for mode='rtc', or mode='naive' / "
            "'ensemble' with the student"
        )
    if not isinstance(policy, DiffusionPolicy):
        raise ValueError(
            f"real-time chunking needs a diffusion or flow-matching policy, not a {type(policy).__name__}"
        )
    if not policy.cfg.obs_as_global_cond:
        raise ValueError("real-time chunking needs policy.obs_as_global_cond=true")


def check_max_guidance(max_guidance: float | None, policy: torch.nn.Module) -> float:
    """`max_guidance` as a float (None: `default_max_guidance(policy)`), or a ValueError naming it when it is
    negative or not finite."""
    if max_guidance is None:
        return default_max_guidance(policy)
    if not (math.isfinite(max_guidance) and max_guidance >= 0):
        raise ValueError(
            f"max_guidance={max_guidance} must be a finite number >= 0 (Black et al.'s beta, the clip of the "
            f"guidance weight; by default {RTC_MAX_GUIDANCE['flow']:g} for flow policies and "
            f"{RTC_MAX_GUIDANCE['ddpm']:g} for DDPM ones, 0 turns guidance off)"
        )
    return float(max_guidance)


def guided_chunk(
    policy: torch.nn.Module,
    obs: dict[str, torch.Tensor],
    target: torch.Tensor,
    weights: torch.Tensor,
    generator: torch.Generator | None = None,
    max_guidance: float | None = None,
) -> torch.Tensor:
    """A chunk (B, horizon, Da) in environment units that continues `target` where `weights` (horizon,) > 0.

    Pseudo-inverse guidance (PiGDM), as real-time chunking uses it (Black et al. 2025, eq. 2-4): at every
    denoising step the network's clean estimate x0(x_t) is pulled towards the target y by the
    vector-Jacobian product J^T diag(W) (y - x0), J = dx0/dx_t (one backward pass through the noise net per
    network call), with weight min(beta, (1 - tau) / (tau r_tau^2)) on the velocity (`guidance_weight`),
    beta = max_guidance (None: `default_max_guidance`, by objective). A flow policy integrates the guided
    velocity v - weight * J^T W (y - x0), x0 = x_s - s v, with its own Euler (or Heun) steps
    (`FlowPolicy.integrate`); a DDPM policy's timestep t
    is the flow time tau = sqrt(abar_t) / (sqrt(abar_t) + sqrt(1 - abar_t)) of the same path rescaled, and
    the weight goes onto the score (weight * tau / (1 - tau), which is PiGDM's 1 / r_t^2 = 1 / (1 - abar_t)
    unclipped) before the policy's own diffusers scheduler step. Because the correction flows back through
    the network, the free part of the chunk bends to join the frozen prefix instead of being pasted next to
    it. The steps with weight 1 are finally set to the target exactly (those actions run from the previous
    chunk while this one is computed).
    """
    check_rtc_policy(policy)
    max_guidance = check_max_guidance(max_guidance, policy)
    with torch.inference_mode(False), torch.no_grad():
        features = policy.encode_obs({k: v.clone() for k, v in obs.items()})
        cond = policy.global_cond(features)
        y = policy.normalizer.normalize("action", target.to(features.dtype))
        W = weights.to(features.device, features.dtype).view(1, -1, 1)
        B = features.shape[0]
        shape = (B, policy.horizon, policy.action_dim)
        sample = policy.noise_scale * torch.randn(
            shape, device=features.device, dtype=features.dtype, generator=generator
        )

        def correction(x: torch.Tensor, clean: Callable[[torch.Tensor], torch.Tensor]):
            """(x0, J^T W (y - x0)) for the clean estimate x0 = clean(x)."""
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                x0 = clean(x)
                (vjp,) = torch.autograd.grad(x0, x, grad_outputs=W * (y - x0.detach()))
            return x0.detach(), vjp

        if isinstance(policy, FlowPolicy):
            T = policy.cfg.scheduler.num_train_timesteps

            def guided_velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                s = float(timestep) / T  # 1 noise, 0 clean: tau = 1 - s
                out: dict[str, torch.Tensor] = {}

                def clean(x: torch.Tensor) -> torch.Tensor:
                    out["v"] = policy.call_net(x, timestep, cond)
                    return x - s * out["v"]

                _, vjp = correction(x, clean)
                # this policy's velocity is noise - x0, the paper's is x0 - noise: the correction's sign flips
                return out["v"].detach() - guidance_weight(1 - s, max_guidance) * vjp

            sample = policy.integrate(sample, guided_velocity)
        else:
            kind = policy.cfg.scheduler.prediction_type
            alphas = policy.noise_scheduler.alphas_cumprod.to(features.device, features.dtype)
            policy.set_sampling_timesteps(features.device)
            for t in policy.sampler.timesteps:
                t_b = torch.full((B,), int(t), device=features.device, dtype=torch.long)

                def clean(x: torch.Tensor, t_b: torch.Tensor = t_b) -> torch.Tensor:
                    return policy.predict_x0(policy.call_net(x, t_b, cond), x, t_b)

                x0, vjp = correction(sample, clean)
                abar = alphas[int(t)]
                tau = float(abar.sqrt() / (abar.sqrt() + (1 - abar).sqrt()))
                on_score = guidance_weight(tau, max_guidance) * tau / (1 - tau)
                eps = (sample - abar.sqrt() * x0) / (1 - abar).sqrt()
                eps = eps - (1 - abar).sqrt() * on_score * vjp  # the score gains on_score * J^T W (y - x0)
                x0 = (sample - (1 - abar).sqrt() * eps) / abar.sqrt()
                if kind == "epsilon":
                    out = eps
                elif kind == "sample":
                    out = x0
                else:  # v_prediction
                    out = abar.sqrt() * eps - (1 - abar).sqrt() * x0
                sample = policy.sampler.step(out, t, sample, generator=generator).prev_sample
        chunk = policy.normalizer.unnormalize("action", sample)
        frozen = (weights >= 1.0).to(chunk.device).view(1, -1, 1)
        chunk = torch.where(frozen, target.to(chunk.dtype), chunk)
        return policy.check_actions(chunk).detach()


class AsyncChunkController(RecedingHorizonController):
    """Receding-horizon control with inference that takes `delay` control steps (simulated, in policy
    time: a chunk requested at step s from the observation at s becomes usable at s + delay).

    modes:
      sync      the robot holds its last command while each chunk is computed (delay steps of waiting
                per chunk), then plays n_action_steps of it: no discontinuity from latency, but pauses;
      naive     asynchronous: the next chunk is requested n_action_steps after the previous one while the
                previous one keeps executing, and replaces it on arrival (at its index `delay`);
      ensemble  asynchronous, every step blends all arrived chunks that cover it (ACT's temporal
                ensembling with weights exp(-decay * i));
      rtc       asynchronous with real-time chunking: the request carries the previous chunk's actions for
                the coming steps; the `delay` that will run during inference are frozen, the rest of the
                overlap is a soft guidance target (`guided_chunk`, clip `max_guidance`), so consecutive
                chunks join smoothly. At delay 0 nothing runs during inference, so nothing is frozen and
                the chunk is not guided: rtc is then synchronous execution, action for action (Black et
                al.'s soft mask would still pull the new chunk towards the old plan's tail, which only
                delays the reaction to the newest observation; bench/notes/serving.md, issue 38).
    Asynchronous modes keep one request in flight, as Black et al.'s d <= s <= H - d: a chunk arrives
    before the next is requested (delay <= n_action_steps) and covers the steps until then
    (n_action_steps + delay <= horizon - n_obs_steps + 1). sync takes any delay.
    `switch_steps` lists the steps at which a new chunk took over (for boundary-jerk statistics).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        delay: int,
        mode: str = "rtc",
        n_action_steps: int | None = None,
        ensemble_decay: float = 0.1,
        generator: torch.Generator | None = None,
        max_guidance: float | None = None,
    ) -> None:
        if mode not in ASYNC_MODES:
            raise ValueError(f"mode {mode!r} is not one of {ASYNC_MODES}")
        if int(delay) != delay or delay < 0:
            raise ValueError(f"delay={delay} must be a whole number of control steps >= 0")
        super().__init__(policy, n_action_steps, mode == "ensemble", ensemble_decay, generator)
        self.delay, self.mode = int(delay), mode
        self.max_guidance = check_max_guidance(max_guidance, policy)
        self.executable = policy.horizon - policy.n_obs_steps + 1
        if mode != "sync" and self.delay > self.n_action_steps:
            raise ValueError(
                f"asynchronous execution keeps one request in flight: delay={self.delay} must be <= "
                f"n_action_steps={self.n_action_steps} (a chunk must arrive before the next is requested)"
            )
        if mode != "sync" and self.n_action_steps + self.delay > self.executable:
            raise ValueError(
                f"asynchronous execution needs n_action_steps + delay <= {self.executable} (the chunk must "
                f"cover the steps until the next one arrives); got {self.n_action_steps} + {self.delay}"
            )
        if mode == "rtc":
            check_rtc_policy(policy)

    def reset(self) -> None:
        super().reset()
        self.pending: tuple[int, int, np.ndarray] | None = None  # (start step, due step, chunk)
        self.current: tuple[int, np.ndarray] | None = None  # (start step, chunk)
        self.last_action: np.ndarray | None = None
        self.next_request = 0
        self.switch_steps: list[int] = []

    def _request(self) -> np.ndarray:
        """A new chunk's executable part (N, L, Da) for the current step, guided in rtc mode."""
        if self.mode != "rtc" or self.current is None or self.delay == 0:
            return self._predict()
        return self._guided()

    def _guided(self) -> np.ndarray:
        """The rtc request: a chunk guided to continue the current one (frozen for `delay` steps, then
        Black et al.'s soft mask over the rest of the overlap)."""
        start, chunk = self.current
        offset = self.step - start
        overlap = chunk.shape[1] - offset  # steps of the current chunk still ahead
        to = self.n_obs_steps - 1
        target = np.zeros((chunk.shape[0], self.policy.horizon, chunk.shape[2]), dtype=np.float32)
        target[:, to : to + overlap] = chunk[:, offset:]
        weights = np.zeros(self.policy.horizon, dtype=np.float32)
        weights[to:] = rtc_weights(self.executable, min(self.delay, overlap), overlap)
        device = self.policy.device
        out = guided_chunk(
            self.policy,
            self._window(),
            torch.from_numpy(target).to(device),
            torch.from_numpy(weights),
            self.generator,
            self.max_guidance,
        )
        return out[:, to:].float().cpu().numpy()

    def _arrive(self) -> None:
        """Install the pending chunk once its due step has come."""
        if self.pending is None or self.step < self.pending[1]:
            return
        start, due, chunk = self.pending
        self.pending = None
        if self.mode == "sync":
            start = due  # the robot waited: the chunk plays from its first action
        self.current = (start, chunk)
        self.last_chunk = chunk[:, self.step - start :]
        self.ensembler.add(start, chunk)
        self.switch_steps.append(self.step)

    def _policy_step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        self._push(obs)
        # a chunk due now arrives before the next request is issued (delay == n_action_steps), which in
        # rtc mode must continue it
        self._arrive()
        if self.step == self.next_request:
            chunk = self._request()
            # the episode's first chunk: nothing to wait for
            due = self.step + (0 if self.current is None else self.delay)
            self.pending = (self.step, due, chunk)
            self.next_request = (due if self.mode == "sync" else self.step) + self.n_action_steps
            self._arrive()  # delay 0 and the episode's first chunk: usable at once
        if self.current is None or (self.mode == "sync" and self.pending is not None):
            action = self.last_action  # synchronous waiting: hold the last command
        elif self.temporal_ensemble:
            action = self.ensembler.blend(self.step)
        else:
            start, chunk = self.current
            action = chunk[:, self.step - start]
        self.last_action = action
        self.step += 1
        return action


def boundary_jerk(actions: np.ndarray, switch_steps: list[int]) -> tuple[float, float]:
    """(mean |second difference| of the actions at the steps where a new chunk took over, the same at all
    other steps): how much a chunk boundary jolts the commands, against the policy's own smoothness."""
    a = np.asarray(actions, dtype=np.float64)
    if len(a) < 3:
        return float("nan"), float("nan")
    jerk = np.linalg.norm(a[2:] - 2 * a[1:-1] + a[:-2], axis=-1)  # jerk[i] is at step i + 2
    at = np.zeros(len(jerk), dtype=bool)
    for s in switch_steps:
        if 2 <= s < len(a):
            at[s - 2] = True
    inside = jerk[~at]
    return (
        float(jerk[at].mean()) if at.any() else float("nan"),
        float(inside.mean()) if len(inside) else float("nan"),
    )
