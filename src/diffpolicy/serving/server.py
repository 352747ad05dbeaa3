"""A policy server: one process holds a checkpoint, any number of clients ask it for action chunks.

Transport: gRPC (HTTP/2), as LeRobot's asynchronous policy server uses. It gives deadlines, status codes
(a mismatched observation is INVALID_ARGUMENT with a message, not a dropped connection), concurrent
clients on one port, and clients in any language; `grpcio` is already installed with the core
dependencies (tensorboard requires it). No generated protobuf code is needed: the two methods carry
bytes in the explicit encoding of `serving/wire.py` (JSON header + raw numeric buffers, never pickle).

    /diffpolicy.PolicyServer/Info     -> {shape_meta, n_obs_steps, horizon, n_action_steps, action_dim,
                                          sampler, run: the task and eval settings (no paths)}
    /diffpolicy.PolicyServer/Predict  obs {key: (B, >= n_obs_steps, *shape)} -> action (B, n_action_steps,
                                      Da), action_pred (B, horizon, Da), latency (ms) for each stage

Each request is checked on its own before it joins a batch, so a bad one fails alone: malformed message,
wrong keys or shapes, NaN / infinite values, camera frames outside [0, 1], a seed outside [0, 2**64) or
more than `max_batch` rows -> INVALID_ARGUMENT; a message over the size limit (max_batch rows of the
policy's observations) or a full queue -> RESOURCE_EXHAUSTED; a request whose deadline passes while it
waits is dropped before the policy runs (DEADLINE_EXCEEDED). A batched call that still raises is retried
one request at a time, so only the request that breaks it gets the error (INTERNAL).

Batching: requests that arrive within `batch_window_ms` of the first waiting one (up to `max_batch` rows)
are stacked into one `predict_action` call and the rows split back. Noise: each client session has its
own torch.Generator (seeded by the client); a batch holding one session's requests draws from it, so a
lone client gets exactly the actions local evaluation gets with the same seed. A batch that mixes
sessions draws from the server's generator (still valid samples, no longer reproducible per client).
Latency per reply: queue (waiting for the batch), decode (message -> validated arrays), encode
(observation encoder), sample (the denoising loop and unnormalization), server (all of it); the client
adds roundtrip and transfer (roundtrip - server).

Access: with a `token` (or DIFFPOLICY_SERVE_TOKEN), every call must carry the gRPC metadata
`authorization: Bearer <token>` (compared in constant time) or gets UNAUTHENTICATED. The channel is not
encrypted: the token keeps strangers on a trusted network out; across untrusted networks, bind 127.0.0.1
and tunnel (ssh -L). Binding any other address without a token logs a warning.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from diffpolicy.policy import ObservationMismatch, check_camera_range, check_observation_shapes
from diffpolicy.serving.wire import WireError, decode, encode

SERVICE = "diffpolicy.PolicyServer"
TOKEN_ENV = "DIFFPOLICY_SERVE_TOKEN"  # the shared token, for `diffpolicy serve` and PolicyClient
# The client learns the policy's shapes only from Info, so its own limit is generous; the server sizes its
# limits from shape_meta x max_batch (message_limits).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
HEADER_ROOM = 64 * 1024  # a message's JSON header: keys, dtypes, shapes, session, seed, latencies
MAX_SEED = 2**64  # torch generators take seeds in [0, 2**64)
log = logging.getLogger("diffpolicy.serving")


def check_observation(
    obs: dict[str, np.ndarray], obs_meta: dict[str, Any], n_obs_steps: int, max_rows: int | None = None
) -> dict[str, np.ndarray]:
    """The policy's keys, each (B, n_obs_steps, *shape) float32 (the latest steps), finite, camera frames
    in [0, 1], B <= max_rows; or ObservationMismatch naming the key and what is wrong."""
    rows = check_observation_shapes(obs, obs_meta, n_obs_steps)
    if max_rows is not None and rows > max_rows:
        raise ObservationMismatch(
            f"the request has {rows} rows; this server takes at most {max_rows} per request "
            f"(--max-batch {max_rows}): split it"
        )
    window = {key: np.asarray(obs[key][:, -n_obs_steps:], dtype=np.float32) for key in obs_meta}
    for key, a in window.items():
        bad = ~np.isfinite(a)
        if bad.any():
            rows_bad = sorted({int(r) for r in np.nonzero(bad)[0]})
            raise ObservationMismatch(
                f"observation '{key}' holds NaN or infinite values (row(s) {rows_bad[:8]})"
            )
    check_camera_range(window, obs_meta)
    return window


def request_seed(meta: dict[str, Any]) -> int | None:
    """The seed a Predict header carries (None: none), or WireError unless an integer in [0, 2**64)."""
    seed = meta.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise WireError(f"seed {seed!r} is not an integer in [0, 2**64)")
    return seed


def message_limits(policy: torch.nn.Module, max_batch: int) -> tuple[int, int]:
    """(receive, send) message limits in bytes: max_batch rows of n_obs_steps observation steps (float64
    at most) in, max_batch rows of action + action_pred (float32) out, each plus room for the header."""
    obs_numbers = sum(math.prod(m["shape"]) for m in policy.shape_meta["obs"].values())
    receive = max_batch * policy.n_obs_steps * obs_numbers * 8 + HEADER_ROOM
    send = max_batch * (policy.horizon + policy.n_action_steps) * policy.action_dim * 4 + HEADER_ROOM
    return receive, send


def open_bind_warning(host: str, token: str | None) -> str | None:
    """The warning for serving on `host` without a token, or None when `host` is loopback or a token is
    set (any other address may be reachable from the network)."""
    if token:
        return None
    name = host.strip("[]")
    if name == "localhost":
        return None
    try:
        if ipaddress.ip_address(name).is_loopback:
            return None
    except ValueError:
        pass  # a host name or an interface: it may face the network
    return (
        f"serving on {host} without a token: anyone who can reach this port can query the policy. Set "
        f"--token (or {TOKEN_ENV}) and give it to clients, or bind 127.0.0.1 and tunnel (ssh -L)"
    )


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) any call without the metadata `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this server needs a token: missing or wrong (PolicyClient(token=...) or {TOKEN_ENV})",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        return self._deny


@dataclass
class _Request:
    obs: dict[str, np.ndarray]
    session: str
    seed: int | None
    received: float
    enqueued: float
    deadline: float | None = None  # perf_counter time after which nobody waits for the reply
    abandoned: bool = False  # the call ended (deadline, cancelled) before its reply
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    error: tuple[grpc.StatusCode, str] | None = None

    @property
    def rows(self) -> int:
        return next(iter(self.obs.values())).shape[0]

    def expired(self) -> bool:
        return self.abandoned or (self.deadline is not None and time.perf_counter() >= self.deadline)

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        self.error = (code, message)
        self.done.set()


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
        max_queue: int = 32,
        max_workers: int | None = None,
        token: str | None = None,
    ) -> None:
        """`run_config`: the run's config dict, of which Info tells clients the name, task and eval settings
        (nothing else: no paths). `max_batch`: most rows per policy call, and per request. `max_queue`:
        requests waiting for the policy before new ones get RESOURCE_EXHAUSTED. `max_workers`: gRPC
        threads, which also bound the calls in progress (default max_batch + max_queue + 4: every queued
        or batched request holds one). `token`: the shared token calls must carry (None: no check)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.policy = policy.eval()
        self.run_config = {k: v for k, v in (run_config or {}).items() if k in ("name", "task", "eval")}
        self.max_batch = max_batch
        self.batch_window = batch_window_ms / 1000
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.sessions: OrderedDict[str, torch.Generator] = OrderedDict()  # LRU, bounded
        self.obs_meta = policy.shape_meta["obs"]
        self.requests: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._carry: _Request | None = None  # taken from the queue, but did not fit the last batch
        self.stopped = threading.Event()
        self.batches_run = 0
        self.requests_dropped = 0  # their caller had gone (deadline passed, cancelled) before they ran
        self._encode_s = 0.0
        self._t_enc = 0.0
        self._hooks = [  # time the observation encoder inside predict_action; removed by stop()
            policy.obs_encoder.register_forward_pre_hook(self._encoder_started),
            policy.obs_encoder.register_forward_hook(self._encoder_finished),
        ]
        receive, send = message_limits(policy, max_batch)
        workers = max_workers or max_batch + max_queue + 4
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            interceptors=[_TokenCheck(token)] if token else None,
            options=[
                ("grpc.max_receive_message_length", receive),
                ("grpc.max_send_message_length", send),
            ],
            maximum_concurrent_rpcs=workers,  # beyond: RESOURCE_EXHAUSTED, not an unbounded backlog
        )
        handlers = {
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
            "Predict": grpc.unary_unary_rpc_method_handler(self._predict),
        }
        self.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.host = host
        warning = open_bind_warning(host, token)
        if warning:
            log.warning(warning)
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind the policy server to {host}:{port}")
        self._batcher = threading.Thread(target=self._batch_loop, name="policy-batcher", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def info(self) -> dict[str, Any]:
        """What a client needs: the policy's shapes and chunking, its sampler, the task and eval settings."""
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
            # the policy acts every frame_stride control steps (data.frame_stride): hold each action so long
            "frame_stride": int(getattr(p, "frame_stride", 1)),
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
        if self.stopped.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the policy server is shutting down")
        try:
            meta, arrays = decode(request)
            seed = request_seed(meta)
            session = meta.get("session", "")
            if not isinstance(session, str):
                raise WireError(f"session {session!r} is not a string")
            obs = check_observation(arrays, self.obs_meta, self.policy.n_obs_steps, self.max_batch)
        except (WireError, ObservationMismatch) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        now = time.perf_counter()
        req = _Request(obs, session, seed, received, now, None if remaining is None else now + remaining)
        context.add_callback(lambda: setattr(req, "abandoned", True))  # the call ended: skip its rows
        try:
            self.requests.put_nowait(req)
        except queue.Full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the policy server's queue is full ({self.requests.maxsize} requests waiting): retry later",
            )
        if not req.done.wait(None if remaining is None else max(remaining, 0.0)):
            req.abandoned = True
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no action chunk before the deadline")
        if req.error is not None:
            context.abort(*req.error)
        reply = req.reply
        reply["latency"]["decode_ms"] = 1000 * (req.enqueued - req.received)
        reply["latency"]["server_ms"] = 1000 * (time.perf_counter() - received)
        arrays = {"action": reply.pop("action"), "action_pred": reply.pop("action_pred")}
        return encode(reply, arrays)

    # ----- batching (one thread runs the policy) ------------------------------------------------
    def _take(self, until: float) -> _Request | None:
        """The next request whose caller still waits (the one left over from the last batch first), or
        None once `until` passes; the others are answered DEADLINE_EXCEEDED and never computed."""
        while True:
            if self._carry is not None:
                req, self._carry = self._carry, None
            else:
                try:
                    req = self.requests.get(timeout=max(0.0, until - time.perf_counter()))
                except queue.Empty:
                    return None
            if not self._drop_if_expired(req):
                return req

    def _drop_if_expired(self, req: _Request) -> bool:
        if not req.expired():
            return False
        self.requests_dropped += 1
        req.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the policy ran")
        return True

    def _next_batch(self) -> list[_Request]:
        first = self._take(time.perf_counter() + 0.05)
        if first is None:
            return []
        batch, rows = [first], first.rows
        until = time.perf_counter() + self.batch_window
        while rows < self.max_batch:
            req = self._take(until)
            if req is None:
                break
            if rows + req.rows > self.max_batch:
                self._carry = req  # first in the next batch
                break
            batch.append(req)
            rows += req.rows
        return batch

    def _batch_loop(self) -> None:
        while not self.stopped.is_set():
            batch = [r for r in self._next_batch() if not self._drop_if_expired(r)]
            if batch:
                self._run(batch)
        leftover = [self._carry] if self._carry is not None else []
        while not self.requests.empty():  # fail what arrived during shutdown
            leftover.append(self.requests.get_nowait())
        for req in leftover:
            req.fail(grpc.StatusCode.UNAVAILABLE, "the policy server is shutting down")

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
        """One policy call for `batch`; if it raises, each request again alone, so that only the one that
        breaks the call gets the error."""
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
        except Exception as e:
            if len(batch) > 1:
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), e)
                for req in batch:
                    if not self._drop_if_expired(req):
                        self._run([req])
                return
            log.exception("policy call failed")
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if isinstance(e, ObservationMismatch)
                else grpc.StatusCode.INTERNAL
            )
            batch[0].fail(code, f"{type(e).__name__}: {e}")
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
