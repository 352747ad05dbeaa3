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
        self.n_action_steps = n_action_steps or policy.n_action_steps
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
            frame[key] = prepare_obs(np.asarray(obs[key]), meta.get("type", "low_dim"))
        if not self.history:  # episode start: the window is filled with the first observation
            self.history.extend([frame] * self.n_obs_steps)
        else:
            self.history.append(frame)

    def _predict(self) -> np.ndarray:
        device = self.policy.device
        window = {
            k: torch.from_numpy(np.stack([h[k] for h in self.history], axis=1)).to(device)
            for k in self.obs_meta
        }
        out = self.policy.predict_action(window, generator=self.generator)
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
