"""Policy server + client on loopback: identical actions to local control, batching, errors, shutdown."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_image_policy

from diffpolicy.config import EvalConfig
from diffpolicy.control import RecedingHorizonController
from diffpolicy.evaluation import run_rollouts
from diffpolicy.policy import load_policy
from diffpolicy.serving.client import PolicyClient, PolicyServerError, RemotePolicy
from diffpolicy.serving.server import (
    GRPC_OPTIONS,
    SERVICE,
    TOKEN_ENV,
    ObservationMismatch,
    PolicyServer,
    open_bind_warning,
)
from diffpolicy.serving.wire import WireError, decode, encode
from diffpolicy.tasks import make_task
from diffpolicy.training.trainer import Trainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, traj_store) -> Path:
    run = tmp_path_factory.mktemp("serve") / "run"
    cfg = tiny_config(f"data.path={traj_store}", "train.num_steps=8", "eval.n_episodes=0")
    Trainer(cfg, run).fit()
    return run / "checkpoints" / "latest"


@pytest.fixture
def served(checkpoint):
    policy, cfg = load_policy(checkpoint)
    from diffpolicy.config import to_dict

    server = PolicyServer(policy, to_dict(cfg), batch_window_ms=20).start()
    try:
        yield server, policy, cfg
    finally:
        server.stop()


def obs_batch(B=3, To=2, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(B, To, 2)).astype(np.float32) for k in ("pos", "vel")}


def test_wire_roundtrip_and_rejects_objects():
    a = {"x": np.arange(6, dtype=np.float64).reshape(2, 3), "m": np.array([True, False])}
    meta, back = decode(encode({"k": 1}, a))
    assert meta == {"k": 1} and all(np.array_equal(a[k], back[k]) and a[k].dtype == back[k].dtype for k in a)
    with pytest.raises(WireError, match="dtype"):
        encode({}, {"o": np.array([object()])})
    with pytest.raises(WireError):
        decode(encode({}, a)[:-3])


def test_served_rollouts_match_local_evaluation(served, checkpoint):
    server, policy, cfg = served
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    ecfg = EvalConfig(n_envs=2, max_steps=24)
    local = run_rollouts(policy, task, ecfg, n_episodes=2, first_seed=100)
    with PolicyClient(server.address, timeout=20) as client:
        remote = RemotePolicy(client)
        served_rollouts = run_rollouts(remote, task, ecfg, n_episodes=2, first_seed=100)
    for a, b in zip(local, served_rollouts, strict=True):
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.success == b.success
    lat = remote.latencies[0]
    for key in (
        "queue_ms",
        "decode_ms",
        "encode_ms",
        "sample_ms",
        "server_ms",
        "roundtrip_ms",
        "transfer_ms",
    ):
        assert lat[key] >= 0, key
    assert lat["roundtrip_ms"] >= lat["server_ms"] >= lat["sample_ms"]


def test_controller_chunks_equal_through_server(served):
    server, policy, _ = served
    obs = {"pos": np.zeros((2, 2), dtype=np.float32), "vel": np.ones((2, 2), dtype=np.float32)}
    local = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(5))
    with PolicyClient(server.address, timeout=20) as client:
        remote = RecedingHorizonController(RemotePolicy(client), generator=torch.Generator().manual_seed(5))
        for _ in range(10):
            np.testing.assert_array_equal(local.act(obs), remote.act(obs))


def test_concurrent_clients_get_their_own_rows(checkpoint):
    """Six clients at once, batched into shared policy calls: each gets the chunk its own observation gets
    when sent alone (a deterministic sampler, so any row mixed up or misrouted shows)."""
    policy = deterministic(load_policy(checkpoint)[0])
    obs = {i: obs_batch(B=1 + i % 2, seed=i) for i in range(6)}
    results, errors = {}, []

    with PolicyServer(policy, batch_window_ms=50) as server:
        with PolicyClient(server.address, timeout=20) as c:
            solo = {i: c.predict(o) for i, o in obs.items()}
        assert {r.batch_rows for r in solo.values()} == {1, 2}

        def ask(i):
            try:
                with PolicyClient(server.address, timeout=20) as c:
                    results[i] = c.predict(obs[i])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(i,)) for i in obs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors and len(results) == 6
    for i, r in results.items():
        assert r.action.shape == (1 + i % 2, policy.n_action_steps, 2)
        np.testing.assert_allclose(r.action_pred, solo[i].action_pred, rtol=0, atol=1e-5)
    assert max(r.batch_rows for r in results.values()) > 2  # at least one call stacked several clients
    firsts = [r.action_pred[0, 0] for r in solo.values()]
    assert min(np.abs(a - b).max() for a in firsts for b in firsts if a is not b) > 1e-3  # rows differ


def test_mismatched_observation_names_key_and_shape(served):
    server, _, _ = served
    with PolicyClient(server.address, timeout=10) as client:
        assert client.info()["shape_meta"]["obs"]["pos"]["shape"] == [2]
        with pytest.raises(
            ObservationMismatch, match=r"'pos' has shape \(3, 2, 5\), expected \(B, >= 2, 2\)"
        ):
            client.predict({**obs_batch(), "pos": np.zeros((3, 2, 5), np.float32)})
        with pytest.raises(ObservationMismatch, match=r"lacks key\(s\) \['pos'\]"):
            client.predict({"position": np.zeros((3, 2, 2), np.float32), "vel": obs_batch()["vel"]})
        assert client.predict(obs_batch()).action.shape[0] == 3  # the server still serves


def test_stopped_server_refuses_cleanly(checkpoint):
    policy, cfg = load_policy(checkpoint)
    server = PolicyServer(policy).start()
    address = server.address
    server.stop()
    assert not server._batcher.is_alive()
    with PolicyClient(address, timeout=2) as client, pytest.raises(PolicyServerError, match="UNAVAILABLE"):
        client.predict(obs_batch())


def test_cli_serve_stops_on_sigterm(checkpoint):
    """Also: the token comes from the environment (kept out of the process list) and is enforced."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    env[TOKEN_ENV] = "t0ken"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffpolicy.cli",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            "0",
            "--max-seconds",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        address = line.split(" on ")[1].split()[0]
        with (
            PolicyClient(address, timeout=20, token="") as client,
            pytest.raises(PolicyServerError, match="UNAUTHENTICATED"),
        ):
            client.predict(obs_batch(B=1))
        with PolicyClient(address, timeout=20, token="t0ken") as client:
            assert client.predict(obs_batch(B=1)).action.shape == (1, 8, 2)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "stopped after 1 batches" in proc.stdout.read()
        assert time.time() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_eval_remote_matches_local(served, checkpoint, tmp_path, capsys):
    import json

    from diffpolicy.cli import main

    server, _, _ = served
    common = ["--episodes", "2", "eval.n_envs=2", "eval.max_steps=16"]
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "local"), *common]) == 0
    assert main(["eval", "--remote", server.address, "--out", str(tmp_path / "remote"), *common]) == 0
    assert "mean latency (ms): queue_ms" in capsys.readouterr().out
    local, remote = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("local", "remote"))
    assert local["episodes"] == remote["episodes"] and local["mean_max_reward"] == remote["mean_max_reward"]


def test_image_policy_chunks_equal_through_server():
    """A bf16 compact-CNN image policy gives bit-identical chunks locally (channels-last-strided frames from
    the controller) and through the server (contiguous off the wire): the policy's actions do not depend on
    the memory layout of its inputs (bf16 convolutions round differently per layout)."""
    # bf16 explicitly (the preset's "auto" is fp32 on CPUs without native bf16 kernels); at 32x32 the two
    # layouts happened to round alike
    policy = tiny_image_policy("policy.vision.precision=bf16", size=96, crop=84)
    assert policy.cfg.vision.precision == "bf16"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8) for _ in range(6)]  # (N, H, W, C)
    local = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(3))
    with PolicyServer(policy, batch_window_ms=5) as server, PolicyClient(server.address, timeout=20) as c:
        remote = RecedingHorizonController(RemotePolicy(c), generator=torch.Generator().manual_seed(3))
        for i, frame in enumerate(frames):
            obs = {"image": frame, "agent_pos": np.full((2, 2), 10.0 * i, dtype=np.float32)}
            np.testing.assert_array_equal(local.act(obs), remote.act(obs))


# ----- the documented import ------------------------------------------------------------------------------


def test_documented_imports_work_and_stay_lazy():
    """README: `from diffpolicy.serving import PolicyClient`; importing the package alone loads no gRPC (an
    optional extra), only asking for a name that needs it does."""
    import diffpolicy.serving as serving
    from diffpolicy.serving import ExportedPolicy, PolicyClient, PolicyServer
    from diffpolicy.serving import RemotePolicy as Remote
    from diffpolicy.serving.export import ExportedPolicy as exported_cls
    from diffpolicy.serving.server import PolicyServer as server_cls

    assert PolicyClient is serving.client.PolicyClient and Remote is RemotePolicy
    assert PolicyServer is server_cls and ExportedPolicy is exported_cls
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        serving.Nope  # noqa: B018
    code = "import sys, diffpolicy.serving; assert 'grpc' not in sys.modules and 'torch' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ----- malformed traffic: each bad request fails alone, with its own status code ------------------------


def raw_message(header: object, *buffers: bytes) -> bytes:
    """A wire message with a hand-written header (encode() would refuse to write a malformed one)."""
    text = json.dumps(header).encode()
    return struct.pack("<I", len(text)) + text + b"".join(buffers)


def raw_call(address: str, payload: bytes, timeout: float = 20, metadata=None, method: str = "Predict"):
    """(status code, reply bytes or error details) of one call with raw bytes."""
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        try:
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            return grpc.StatusCode.OK, call(payload, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            return e.code(), e.details()


def random_obs(policy, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Distinct observations of the policy's shapes (frames in [0, 1]), n_obs_steps steps."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, meta in policy.shape_meta["obs"].items():
        shape = (rows, policy.n_obs_steps, *meta["shape"])
        rgb = meta.get("type") == "rgb"
        out[key] = (rng.uniform(size=shape) if rgb else rng.normal(size=shape)).astype(np.float32)
    return out


class Gate:
    """Stands in for the served policy's predict_action: holds each call until `open` is set (so requests
    sent meanwhile queue and are batched together), records the observations of every call, and raises
    for a batch holding a `poison` value (a request that passes the server's checks but breaks the call)."""

    def __init__(self, policy, poison: float | None = None) -> None:
        self.real, self.poison = policy.predict_action, poison
        self.entered, self.open = threading.Event(), threading.Event()
        self.calls: list[dict[str, np.ndarray]] = []

    def __call__(self, obs, generator=None):
        self.entered.set()
        assert self.open.wait(20)
        self.calls.append({k: v.cpu().numpy().copy() for k, v in obs.items()})
        if self.poison is not None and any((v == self.poison).any() for v in obs.values()):
            raise RuntimeError("poisoned row")
        return self.real(obs, generator=generator)

    def saw(self, value: float) -> bool:
        return any((v == value).any() for call in self.calls for v in call.values())


def deterministic(policy):
    """DDIM (eta 0) from x_T = 0: the chunk is a function of the observation alone, so a row's answer
    must not depend on the rows batched with it."""
    policy.set_sampler("ddim", 4)
    policy.noise_scale = 0.0
    return policy


def send_batched(server, gate, bad: list[bytes], good: list[dict], bad_timeout: float | None = None):
    """Hold the policy on a first request, send `bad` raw messages and `good` observations concurrently,
    wait until each one is queued or answered (and, with a short `bad_timeout`, until the bad ones gave
    up), then release: whatever got into the queue runs as one batch. Returns the (code, reply) of each
    bad message and each good observation."""
    results: dict[tuple[str, int], tuple] = {}
    hold = threading.Thread(
        target=lambda: results.__setitem__(("hold", 0), raw_call(server.address, encode({}, good[0])))
    )
    hold.start()
    assert gate.entered.wait(20)
    threads = [
        threading.Thread(
            target=lambda i=i, m=m: results.__setitem__(
                ("bad", i), raw_call(server.address, m, bad_timeout or 20)
            )
        )
        for i, m in enumerate(bad)
    ] + [
        threading.Thread(
            target=lambda i=i, o=o: results.__setitem__(("good", i), raw_call(server.address, encode({}, o)))
        )
        for i, o in enumerate(good)
    ]
    for t in threads:
        t.start()

    def ready():
        if bad_timeout is not None and not all(("bad", i) in results for i in range(len(bad))):
            return False  # the bad ones must have given up first
        return server.requests.qsize() + len(results) >= len(threads)

    waited = 0.0
    while not ready() and waited < 20:
        time.sleep(0.02)
        waited += 0.02
    gate.open.set()
    for t in [hold, *threads]:
        t.join(30)
    assert results[("hold", 0)][0] == grpc.StatusCode.OK
    return [results[("bad", i)] for i in range(len(bad))], [results[("good", i)] for i in range(len(good))]


@pytest.fixture
def gated(checkpoint, monkeypatch):
    """A deterministic served policy behind a Gate, max-batch 8; yields (server, gate, policy)."""

    def make(policy=None, poison=None, **kwargs):
        policy = deterministic(policy or load_policy(checkpoint)[0])
        gate = Gate(policy, poison)
        monkeypatch.setattr(policy, "predict_action", gate)
        server = PolicyServer(policy, **{"max_batch": 8, "batch_window_ms": 20, **kwargs}).start()
        servers.append(server)
        return server, gate, policy

    servers: list[PolicyServer] = []
    yield make
    for server in servers:
        server.stop()


def _obs_header(obs: dict[str, np.ndarray], **spec_changes) -> dict:
    return {
        "meta": {},
        "arrays": [
            {"key": k, "dtype": "<f4", "shape": list(v.shape), **spec_changes.get(k, {})}
            for k, v in obs.items()
        ],
    }


def _bad_messages(policy):
    obs = random_obs(policy, 2, seed=50)
    nan, inf = dict(obs), dict(obs)
    nan["pos"] = obs["pos"].copy()
    nan["pos"][1, -1, 0] = np.nan
    inf["vel"] = obs["vel"].copy()
    inf["vel"][0, 0, 1] = -np.inf
    buffers = [v.tobytes() for v in obs.values()]
    no_dtype = _obs_header(obs)
    del no_dtype["arrays"][0]["dtype"]
    return {
        "nan": (encode({}, nan), "'pos' holds NaN"),
        "inf": (encode({}, inf), "'vel' holds"),
        "seed 2**64": (encode({"seed": 2**64}, obs), r"seed"),
        "negative seed": (encode({"seed": -1}, obs), r"seed"),
        "non-numeric seed": (encode({"seed": "abc"}, obs), r"seed"),
        "fractional seed": (encode({"seed": 1.5}, obs), r"seed"),
        "missing dtype": (raw_message(no_dtype, *buffers), "dtype"),
        "non-integer shape": (raw_message(_obs_header(obs, pos={"shape": [2, "two", 2]}), *buffers), "shape"),
        "fractional shape": (raw_message(_obs_header(obs, pos={"shape": [2, 2.0, 2]}), *buffers), "shape"),
        "negative shape": (raw_message(_obs_header(obs, pos={"shape": [-2, 2, 2]}), *buffers), "shape"),
        "unknown dtype": (raw_message(_obs_header(obs, pos={"dtype": "x9"}), *buffers), "dtype"),
        "header not an object": (raw_message([1, 2]), "header"),
        "rows over max-batch": (encode({}, random_obs(policy, 9, seed=1)), "9 rows.*--max-batch 8"),
    }


BAD = [
    "nan",
    "inf",
    "seed 2**64",
    "negative seed",
    "non-numeric seed",
    "fractional seed",
    "missing dtype",
    "non-integer shape",
    "fractional shape",
    "negative shape",
    "unknown dtype",
    "header not an object",
    "rows over max-batch",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_request_fails_alone_with_invalid_argument(gated, case):
    server, gate, policy = gated()
    message, reason = _bad_messages(policy)[case]
    good = [random_obs(policy, 1 + i, seed=i) for i in range(2)]
    (bad,), replies = send_batched(server, gate, [message], good)
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert re.search(reason, bad[1]), bad[1]
    assert "Traceback" not in bad[1]
    for obs, (code, reply) in zip(good, replies, strict=True):
        assert code == grpc.StatusCode.OK, reply
        assert decode(reply)[1]["action"].shape[0] == len(obs["pos"])
    assert [len(c["pos"]) for c in gate.calls] == [1, 1 + 2]  # the good requests were batched together


def test_camera_values_out_of_range_fail_alone(gated):
    server, gate, policy = gated(tiny_image_policy("policy.vision.precision=fp32"))
    bad = random_obs(policy, 1, seed=9)
    bad["image"] *= 255.0  # 0..255 frames where the policy takes [0, 1]
    good = [random_obs(policy, 2, seed=i) for i in range(2)]
    ((code, details),), replies = send_batched(server, gate, [encode({}, bad)], good)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "camera observation 'image'" in details, details
    assert [c for c, _ in replies] == [grpc.StatusCode.OK] * 2


def test_message_over_the_size_limit_is_refused(gated):
    """The gRPC limit follows shape_meta x max-batch: a 20,000-row message never reaches the policy."""
    server, gate, policy = gated()
    huge = encode({}, random_obs(policy, 20_000, seed=3))
    good = [random_obs(policy, 2, seed=i) for i in range(2)]
    ((code, details),), replies = send_batched(server, gate, [huge], good)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert [c for c, _ in replies] == [grpc.StatusCode.OK] * 2
    assert max(len(c["pos"]) for c in gate.calls) <= 8


def test_failing_batch_is_retried_one_request_at_a_time(gated):
    """A request that passes the checks yet breaks the batched call fails alone (INTERNAL); the others of
    its batch get their chunks from a retry."""
    server, gate, policy = gated(poison=1234.0)
    poisoned = random_obs(policy, 1, seed=7)
    poisoned["pos"][0, -1, 0] = 1234.0
    good = [random_obs(policy, 1 + i, seed=i) for i in range(3)]
    ((code, details),), replies = send_batched(server, gate, [encode({}, poisoned)], good)
    assert code == grpc.StatusCode.INTERNAL and "poisoned row" in details, (code, details)
    assert [c for c, _ in replies] == [grpc.StatusCode.OK] * 3


def test_full_queue_is_refused_with_resource_exhausted(gated):
    server, gate, policy = gated(max_queue=2)
    good = [random_obs(policy, 1, seed=i) for i in range(3)]
    results = {}
    hold = threading.Thread(target=lambda: results.update(hold=raw_call(server.address, encode({}, good[0]))))
    hold.start()
    assert gate.entered.wait(20)
    queued = [
        threading.Thread(
            target=lambda i=i: results.update({i: raw_call(server.address, encode({}, good[i]))})
        )
        for i in (1, 2)
    ]
    for t in queued:
        t.start()
    for _ in range(500):
        if server.requests.qsize() == 2:
            break
        time.sleep(0.02)
    code, details = raw_call(server.address, encode({}, good[0]), timeout=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details, (code, details)
    gate.open.set()
    for t in [hold, *queued]:
        t.join(30)
    assert [results[k][0] for k in ("hold", 1, 2)] == [grpc.StatusCode.OK] * 3


def test_expired_request_is_dropped_before_the_policy_runs(gated):
    """A caller whose deadline passed while queued gets DEADLINE_EXCEEDED and its rows are never computed;
    the requests queued with it are answered."""
    server, gate, policy = gated()
    late = random_obs(policy, 1, seed=5)
    late["pos"][0, -1, 0] = 777.0
    good = [random_obs(policy, 2, seed=i) for i in range(2)]
    ((code, _),), replies = send_batched(server, gate, [encode({}, late)], good, bad_timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [c for c, _ in replies] == [grpc.StatusCode.OK] * 2
    assert not gate.saw(777.0)


# ----- access: what Info tells, who may call ----------------------------------------------------------------


def test_info_gives_clients_what_they_need_and_no_paths(served, traj_store):
    server, policy, _ = served
    with PolicyClient(server.address, timeout=10) as client:
        info = client.info()
    assert info["n_obs_steps"] == policy.n_obs_steps and info["shape_meta"] == policy.shape_meta
    assert info["run"]["task"]["name"] == "trajectory2d" and "n_envs" in info["run"]["eval"]
    assert set(info["run"]) <= {"name", "task", "eval"}
    assert str(traj_store) not in json.dumps(info) and "data" not in info["run"]


def test_token_is_required_when_set(checkpoint, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    policy = deterministic(load_policy(checkpoint)[0])
    obs = random_obs(policy, 1, seed=0)
    with PolicyServer(policy, token="s3cret") as server:
        for token in (None, "wrong", "s3cret-and-more", ""):
            with PolicyClient(server.address, timeout=10, token=token) as client:
                with pytest.raises(PolicyServerError, match="UNAUTHENTICATED"):
                    client.info()
                with pytest.raises(PolicyServerError, match="UNAUTHENTICATED"):
                    client.predict(obs)
        with PolicyClient(server.address, timeout=10, token="s3cret") as client:
            assert client.predict(obs).action.shape == (1, policy.n_action_steps, 2)
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        with PolicyClient(server.address, timeout=10) as client:
            assert client.info()["horizon"] == policy.horizon
        code, details = raw_call(server.address, encode({}, obs), metadata=[("authorization", "Bearer no")])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details
        assert server.batches_run == 1


def test_open_binds_without_a_token_are_warned_about():
    assert open_bind_warning("127.0.0.1", None) is None
    assert open_bind_warning("localhost", None) is None
    assert open_bind_warning("::1", None) is None and open_bind_warning("[::1]", None) is None
    assert open_bind_warning("0.0.0.0", "s3cret") is None
    for host in ("0.0.0.0", "[::]", "192.168.1.20", "robot.local"):
        warning = open_bind_warning(host, None)
        assert warning is not None and "--token" in warning and host in warning


# ----- eval --remote reports ------------------------------------------------------------------------------


def test_cli_eval_remote_never_overwrites_a_report(served, tmp_path, monkeypatch, capsys):
    from diffpolicy.cli import main

    server, _, _ = served
    monkeypatch.chdir(tmp_path)
    common = ["--remote", server.address, "--episodes", "1", "eval.n_envs=1", "eval.max_steps=4"]
    assert main(["eval", *common]) == 0
    assert main(["eval", *common]) == 0  # within the same second: still a new folder
    reports = sorted(tmp_path.glob("runs/*/report.json"))
    assert len(reports) == 2, reports
    out = tmp_path / "mine"
    assert main(["eval", *common, "--out", str(out)]) == 0
    before = (out / "report.json").read_text()
    assert main(["eval", *common, "--out", str(out)]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before


def test_cli_eval_remote_refuses_sampler_overrides(capsys):
    """The sampler is the server's (diffpolicy serve eval.sampler=...): --remote refuses these overrides
    rather than ignore them."""
    from diffpolicy.cli import main

    assert main(["eval", "--remote", "127.0.0.1:9", "eval.sampler=ddim", "eval.n_envs=1"]) == 2
    err = capsys.readouterr().err
    assert "['eval.sampler=ddim']" in err and "diffpolicy serve" in err
