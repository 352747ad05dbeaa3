"""Receding-horizon control: the one code path that runs a policy in an environment.

Every `n_action_steps` steps the controller asks the policy for a fresh chunk from the last n_obs_steps
observations; in between it plays the chunk's actions. A chunk's executable part starts at the
current step (offset n_obs_steps-1 of the predicted horizon, see data/sequence.py) and is
horizon - n_obs_steps + 1 steps long. With temporal ensembling, every step's action is a weighted
average over all stored chunks that cover it (ACT's rule: weight exp(-decay * i), i = 0 the oldest).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from diffpolicy.data.sequence import prepare_obs


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


class RecedingHorizonController:
    """Feeds a batch of N environments: `act(obs)` takes {key: (N, ...)} numpy obs, returns (N, Da)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        n_action_steps: int | None = None,
        temporal_ensemble: bool = False,
        ensemble_decay: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.policy = policy
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

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
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
# Chunking Flow Policies"), for DDPM / DDIM sampling
# --------------------------------------------------------------------------------------------------

ASYNC_MODES = ("sync", "naive", "ensemble", "rtc")


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


def guided_chunk(
    policy: torch.nn.Module,
    obs: dict[str, torch.Tensor],
    target: torch.Tensor,
    weights: torch.Tensor,
    generator: torch.Generator | None = None,
    max_guidance: float = 1000.0,
) -> torch.Tensor:
    """A chunk (B, horizon, Da) in environment units that continues `target` where `weights` (horizon,) > 0.

    Pseudo-inverse guidance (PiGDM), as real-time chunking uses it: at every denoising step the network's
    clean estimate x0(x_t) is pulled towards the target by the gradient of the weighted error,
    J^T diag(W) (y - x0), J = dx0/dx_t (one backward pass through the noise net per step), with guidance
    weight min(max_guidance, 1 / r_t^2), r_t^2 = 1 - abar_t (Black et al. clip at 5 for flow matching;
    with DDIM 10 steps on Push-T a clip of 5 barely moved the joins, 1000 - nearly the unclipped PiGDM
    weight - nearly halved the boundary jerk, bench/notes/serving.md); the corrected estimate goes through the
    policy's own diffusers scheduler step. Because the gradient flows through the network, the free part
    of the chunk bends to join the frozen prefix smoothly instead of being pasted next to it. The steps
    with weight 1 are finally set to the target exactly (those are the actions that execute).
    """
    if not policy.cfg.obs_as_global_cond:
        raise ValueError("real-time chunking needs policy.obs_as_global_cond=true")
    if getattr(policy.cfg, "objective", "ddpm") != "ddpm":
        raise ValueError(
            "real-time chunking guides DDPM / DDIM sampling; a flow-matching policy is not supported yet"
        )
    kind = policy.cfg.scheduler.prediction_type
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
        alphas = policy.noise_scheduler.alphas_cumprod.to(features.device, features.dtype)
        policy.set_sampling_timesteps(features.device)
        for t in policy.sampler.timesteps:
            t_b = torch.full((B,), int(t), device=features.device, dtype=torch.long)
            with torch.enable_grad():
                x = sample.detach().requires_grad_(True)
                x0 = policy.predict_x0(policy.call_net(x, t_b, cond), x, t_b)
                (grad,) = torch.autograd.grad(0.5 * (W * (y - x0)).pow(2).sum(), x)  # -J^T W (y - x0)
            x0 = x0.detach()
            abar = alphas[int(t)]
            guidance = min(max_guidance, float(1.0 / (1.0 - abar).clamp_min(1e-6)))
            eps = (sample - abar.sqrt() * x0) / (1 - abar).sqrt()
            eps = eps + (1 - abar).sqrt() * guidance * grad  # the score gains guidance * J^T W (y - x0)
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
                overlap is a soft guidance target (`guided_chunk`), so consecutive chunks join smoothly.
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
        max_guidance: float = 1000.0,
    ) -> None:
        if mode not in ASYNC_MODES:
            raise ValueError(f"mode {mode!r} is not one of {ASYNC_MODES}")
        super().__init__(policy, n_action_steps, mode == "ensemble", ensemble_decay, generator)
        self.delay, self.mode, self.max_guidance = int(delay), mode, max_guidance
        self.executable = policy.horizon - policy.n_obs_steps + 1
        if mode != "sync" and self.n_action_steps + self.delay > self.executable:
            raise ValueError(
                f"asynchronous execution needs n_action_steps + delay <= {self.executable} (the chunk must "
                f"cover the steps until the next one arrives); got {self.n_action_steps} + {self.delay}"
            )

    def reset(self) -> None:
        super().reset()
        self.pending: tuple[int, int, np.ndarray] | None = None  # (start step, due step, chunk)
        self.current: tuple[int, np.ndarray] | None = None  # (start step, chunk)
        self.last_action: np.ndarray | None = None
        self.next_request = 0
        self.switch_steps: list[int] = []

    def _request(self) -> np.ndarray:
        """A new chunk's executable part (N, L, Da) for the current step, guided in rtc mode."""
        if self.mode != "rtc" or self.current is None:
            return self._predict()
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

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        self._push(obs)
        if self.step == self.next_request:
            chunk = self._request()
            due = self.step + (
                0 if self.current is None else self.delay
            )  # episode start: nothing to wait for
            self.pending = (self.step, due, chunk)
            self.next_request = (due if self.mode == "sync" else self.step) + self.n_action_steps
        if self.pending is not None and self.step >= self.pending[1]:
            start, due, chunk = self.pending
            self.pending = None
            if self.mode == "sync":
                start = due  # the robot waited: the chunk plays from its first action
            self.current = (start, chunk)
            self.last_chunk = chunk[:, self.step - start :]
            self.ensembler.add(start, chunk)
            self.switch_steps.append(self.step)
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
