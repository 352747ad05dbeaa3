"""Policy server + client on loopback: identical actions to local control, batching, errors, shutdown."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_image_policy

from diffpolicy.config import EvalConfig
from diffpolicy.control import RecedingHorizonController
from diffpolicy.evaluation import run_rollouts
from diffpolicy.policy import load_policy
from diffpolicy.serving.client import PolicyClient, PolicyServerError, RemotePolicy
from diffpolicy.serving.server import ObservationMismatch, PolicyServer
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


def test_concurrent_clients_are_batched(served):
    import threading

    server, policy, _ = served
    results, errors = {}, []

    def ask(i):
        try:
            with PolicyClient(server.address, timeout=20) as c:
                results[i] = c.predict(obs_batch(B=1 + i % 2, seed=i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 6
    for i, r in results.items():
        assert r.action.shape == (1 + i % 2, policy.n_action_steps, 2)
        assert r.action_pred.shape == (1 + i % 2, policy.horizon, 2)
        assert np.isfinite(r.action).all()
    assert max(r.batch_rows for r in results.values()) > 2  # at least one call stacked several clients


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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
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
        with PolicyClient(address, timeout=20) as client:
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
    policy = tiny_image_policy(size=96, crop=84)  # at 32x32 the two layouts happened to round alike
    assert policy.cfg.vision.precision == "bf16"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8) for _ in range(6)]  # (N, H, W, C)
    local = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(3))
    with PolicyServer(policy, batch_window_ms=5) as server, PolicyClient(server.address, timeout=20) as c:
        remote = RecedingHorizonController(RemotePolicy(c), generator=torch.Generator().manual_seed(3))
        for i, frame in enumerate(frames):
            obs = {"image": frame, "agent_pos": np.full((2, 2), 10.0 * i, dtype=np.float32)}
            np.testing.assert_array_equal(local.act(obs), remote.act(obs))
