"""A policy server: one process holds a checkpoint, any number of clients ask it for action chunks.

Transport: gRPC (HTTP/2), as LeRobot's asynchronous policy server uses. It gives deadlines, status codes
(a mismatched observation is INVALID_ARGUMENT with a message, not a dropped connection), concurrent
clients on one port, and clients in any language; `grpcio` is already installed with the core
dependencies (tensorboard requires it). No generated protobuf code is needed: the two methods carry
bytes in the explicit encoding of `serving/wire.py` (JSON header + raw numeric buffers, never pickle).

    /diffpolicy.PolicyServer/Info     -> {shape_meta, n_obs_steps, horizon, n_action_steps, run config}
    /diffpolicy.PolicyServer/Predict  obs {key: (B, >= n_obs_steps, *shape)} -> action (B, n_action_steps,
                                      Da), action_pred (B, horizon, Da), latency (ms) for each stage

Batching: requests that arrive within `batch_window_ms` of the first waiting one (up to `max_batch` rows)
are stacked into one `predict_action` call and the rows split back. Noise: each client session has its
own torch.Generator (seeded by the client); a batch holding one session's requests draws from it, so a
lone client gets exactly the actions local evaluation gets with the same seed. A batch that mixes
sessions draws from the server's generator (still valid samples, no longer reproducible per client).
Latency per reply: queue (waiting for the batch), decode (message -> validated arrays), encode
(observation encoder), sample (the denoising loop and unnormalization), server (all of it); the client
adds roundtrip and transfer (roundtrip - server).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from diffpolicy.policy import ObservationMismatch, check_observation_shapes
from diffpolicy.serving.wire import WireError, decode, encode

SERVICE = "diffpolicy.PolicyServer"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
log = logging.getLogger("diffpolicy.serving")


def check_observation(
    obs: dict[str, np.ndarray], obs_meta: dict[str, Any], n_obs_steps: int
) -> dict[str, np.ndarray]:
    """The policy's keys, each (B, n_obs_steps, *shape) float32 (the latest steps); or ObservationMismatch
    naming the key and the expected shape."""
    check_observation_shapes(obs, obs_meta, n_obs_steps)
    return {key: np.asarray(obs[key][:, -n_obs_steps:], dtype=np.float32) for key in obs_meta}


@dataclass
class _Request:
    obs: dict[str, np.ndarray]
    session: str
    seed: int | None
    received: float
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    error: str | None = None

    @property
    def rows(self) -> int:
        return next(iter(self.obs.values())).shape[0]


class PolicyServer:
    """Serves `policy` over gRPC on host:port (port 0 picks a free one; see `.port`). Use `start()` and
    `stop()`, or a `with` block."""

    def __init__(
        self,
        policy: torch.nn.Module,
        run_config: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 64,
        batch_window_ms: float = 2.0,
        seed: int = 0,
        max_workers: int = 16,
    ) -> None:
        self.policy = policy.eval()
        self.run_config = run_config or {}
        self.max_batch = max_batch
        self.batch_window = batch_window_ms / 1000
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.sessions: OrderedDict[str, torch.Generator] = OrderedDict()  # LRU, bounded
        self.obs_meta = policy.shape_meta["obs"]
        self.requests: queue.Queue[_Request] = queue.Queue()
        self.stopped = threading.Event()
        self.batches_run = 0
        self._encode_s = 0.0
        self._t_enc = 0.0
        self._hooks = [  # time the observation encoder inside predict_action; removed by stop()
            policy.obs_encoder.register_forward_pre_hook(self._encoder_started),
            policy.obs_encoder.register_forward_hook(self._encoder_finished),
        ]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
        handlers = {
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
            "Predict": grpc.unary_unary_rpc_method_handler(self._predict),
        }
        self.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.host = host
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind the policy server to {host}:{port}")
        self._batcher = threading.Thread(target=self._batch_loop, name="policy-batcher", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def info(self) -> dict[str, Any]:
        p = self.policy
        return {
            "policy_class": type(p).__name__,
            "shape_meta": p.shape_meta,
            "n_obs_steps": p.n_obs_steps,
            "horizon": p.horizon,
            "n_action_steps": p.n_action_steps,
            "action_dim": p.action_dim,
            "sampler": getattr(p, "sampler_name", None),
            "num_inference_steps": getattr(p, "num_inference_steps", None),
            "run": self.run_config,
        }

    # ----- lifecycle ----------------------------------------------------------------------------
    def start(self) -> PolicyServer:
        self._batcher.start()
        self.grpc.start()
        log.info("policy server on %s", self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop accepting requests, let in-flight ones finish for up to `grace` seconds, end the batcher."""
        if self.stopped.is_set():
            return
        self.grpc.stop(grace).wait()
        self.stopped.set()
        if self._batcher.is_alive():
            self._batcher.join(timeout=grace + 5)
        for hook in self._hooks:
            hook.remove()

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_until_signal(self, max_seconds: float | None = None) -> None:
        """Block until SIGINT / SIGTERM (or `max_seconds`), then stop cleanly. Main thread only."""
        requested = threading.Event()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, lambda *_: requested.set())
        try:
            requested.wait(max_seconds)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()  # in-flight requests still get their chunks (grace period)

    # ----- RPC handlers (gRPC worker threads) ---------------------------------------------------
    def _info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return encode(self.info())

    def _predict(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        received = time.perf_counter()
        try:
            meta, arrays = decode(request)
            obs = check_observation(arrays, self.obs_meta, self.policy.n_obs_steps)
        except (WireError, ObservationMismatch) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.stopped.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the policy server is shutting down")
        seed = meta.get("seed")
        req = _Request(
            obs,
            str(meta.get("session", "")),
            None if seed is None else int(seed),
            received,
            time.perf_counter(),
        )
        self.requests.put(req)
        remaining = context.time_remaining()
        if not req.done.wait(None if remaining is None else max(remaining, 0.0)):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no action chunk before the deadline")
        if req.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, req.error)
        reply = req.reply
        reply["latency"]["decode_ms"] = 1000 * (req.enqueued - req.received)
        reply["latency"]["server_ms"] = 1000 * (time.perf_counter() - received)
        arrays = {"action": reply.pop("action"), "action_pred": reply.pop("action_pred")}
        return encode(reply, arrays)

    # ----- batching (one thread runs the policy) ------------------------------------------------
    def _next_batch(self) -> list[_Request]:
        try:
            first = self.requests.get(timeout=0.05)
        except queue.Empty:
            return []
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self.batch_window
        while rows < self.max_batch:
            try:
                req = self.requests.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if rows + req.rows > self.max_batch:
                self.requests.put(req)  # next batch
                break
            batch.append(req)
            rows += req.rows
        return batch

    def _batch_loop(self) -> None:
        while not self.stopped.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)
        while not self.requests.empty():  # fail what arrived during shutdown
            req = self.requests.get_nowait()
            req.error = "the policy server is shutting down"
            req.done.set()

    def _session_generator(self, batch: list[_Request]) -> torch.Generator:
        for req in batch:  # a seed (re)starts its session's noise stream
            if req.seed is not None:
                self.sessions[req.session] = torch.Generator(device=self.policy.device).manual_seed(req.seed)
                self.sessions.move_to_end(req.session)
                while len(self.sessions) > 1024:
                    self.sessions.popitem(last=False)
        sessions = {r.session for r in batch}
        if len(sessions) == 1 and batch[0].session in self.sessions:
            return self.sessions[batch[0].session]
        return self.generator

    def _encoder_started(self, *_: Any) -> None:
        self._t_enc = time.perf_counter()

    def _encoder_finished(self, *_: Any) -> None:
        self._encode_s += time.perf_counter() - self._t_enc

    def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            device = self.policy.device
            obs = {
                k: torch.from_numpy(np.concatenate([r.obs[k] for r in batch])).to(device)
                for k in self.obs_meta
            }
            generator = self._session_generator(batch)
            self._encode_s = 0.0
            out = self.policy.predict_action(obs, generator=generator)
            action = out["action"].float().cpu().numpy()
            action_pred = out["action_pred"].float().cpu().numpy()
        except Exception as e:  # the error goes back to every client of the batch
            log.exception("policy call failed")
            for req in batch:
                req.error = f"{type(e).__name__}: {e}"
                req.done.set()
            return
        total = time.perf_counter() - started
        self.batches_run += 1
        row = 0
        for req in batch:
            n = req.rows
            req.reply = {
                "batch_rows": int(action.shape[0]),
                "batch_requests": len(batch),
                "latency": {
                    "queue_ms": 1000 * (started - req.enqueued),
                    "encode_ms": 1000 * self._encode_s,
                    "sample_ms": 1000 * (total - self._encode_s),
                },
                "action": action[row : row + n],
                "action_pred": action_pred[row : row + n],
            }
            row += n
            req.done.set()
