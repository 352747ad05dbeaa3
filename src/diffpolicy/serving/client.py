"""Python client of the policy server, and `RemotePolicy`, which lets the receding-horizon controller
(and so `diffpolicy eval --remote`) run a served policy exactly as it runs a local one."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from diffpolicy.serving.server import GRPC_OPTIONS, MAX_SEED, SERVICE, TOKEN_ENV, ObservationMismatch
from diffpolicy.serving.wire import decode, encode


class PolicyServerError(RuntimeError):
    """The server failed to answer (unreachable, shutting down, busy, deadline passed, token refused, or the
    policy raised)."""


@dataclass
class PolicyReply:
    action: np.ndarray  # (B, n_action_steps, Da), the chunk to execute from the current step
    action_pred: np.ndarray  # (B, horizon, Da), the whole predicted chunk
    latency: dict[str, float]  # ms: queue, decode, encode, sample, server, roundtrip, transfer
    batch_rows: int  # rows of the batched policy call this reply came from


class PolicyClient:
    """Talks to a `diffpolicy serve` server at host:port. `session` names this client's noise stream;
    `token` is the server's shared token (default: the DIFFPOLICY_SERVE_TOKEN environment variable)."""

    def __init__(
        self, address: str, timeout: float = 30.0, session: str | None = None, token: str | None = None
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.session = session or uuid.uuid4().hex
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._info = self.channel.unary_unary(f"/{SERVICE}/Info")
        self._predict = self.channel.unary_unary(f"/{SERVICE}/Predict")
        self._meta: dict[str, Any] | None = None

    def _call(self, method: Any, payload: bytes) -> bytes:
        try:
            return method(payload, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ObservationMismatch(e.details()) from None
            raise PolicyServerError(
                f"policy server at {self.address}: {e.code().name}: {e.details()}"
            ) from None

    def info(self) -> dict[str, Any]:
        """The served policy's shape_meta, n_obs_steps, horizon, n_action_steps, action_dim, sampler, and
        `run`: the run's name, task and eval settings (cached)."""
        if self._meta is None:
            self._meta, _ = decode(self._call(self._info, encode({})))
        return self._meta

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None) -> PolicyReply:
        """An action chunk for obs {key: (B, >= n_obs_steps, *shape)}; `seed` restarts the session noise."""
        meta: dict[str, Any] = {"session": self.session}
        if seed is not None:
            if not 0 <= int(seed) < MAX_SEED:
                raise ValueError(f"seed {seed} is not in [0, 2**64)")
            meta["seed"] = int(seed)
        t0 = time.perf_counter()
        reply, arrays = decode(self._call(self._predict, encode(meta, obs)))
        latency = dict(reply["latency"])
        latency["roundtrip_ms"] = 1000 * (time.perf_counter() - t0)
        latency["transfer_ms"] = latency["roundtrip_ms"] - latency["server_ms"]
        return PolicyReply(arrays["action"], arrays["action_pred"], latency, int(reply["batch_rows"]))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemotePolicy:
    """Stands in for a policy in RecedingHorizonController / evaluate: `predict_action` asks the server.

    A new torch.Generator passed to `predict_action` sends its initial seed once, so the server's session
    stream starts where a local generator with that seed would: same seeds, same actions.
    """

    training = False

    def __init__(self, client: PolicyClient) -> None:
        self.client = client
        info = client.info()
        self.shape_meta = info["shape_meta"]
        self.n_obs_steps = int(info["n_obs_steps"])
        self.horizon = int(info["horizon"])
        self.n_action_steps = int(info["n_action_steps"])
        self.action_dim = int(info["action_dim"])
        self.sampler_name = info.get("sampler")
        self.num_inference_steps = info.get("num_inference_steps")
        self.frame_stride = int(info.get("frame_stride", 1))  # a server from before strides: 1
        self.device = torch.device("cpu")
        self.latencies: list[dict[str, float]] = []
        self._generator: torch.Generator | None = None

    def eval(self) -> RemotePolicy:
        return self

    def train(self, mode: bool = True) -> RemotePolicy:
        return self

    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        seed = None
        if generator is not None and generator is not self._generator:
            self._generator, seed = generator, generator.initial_seed()
        reply = self.client.predict({k: v.cpu().numpy() for k, v in obs.items()}, seed=seed)
        self.latencies.append(reply.latency)
        return {"action": torch.tensor(reply.action), "action_pred": torch.tensor(reply.action_pred)}
