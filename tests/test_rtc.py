"""Asynchronous execution and real-time chunking (control.AsyncChunkController, guided_chunk)."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_policy import build

from diffpolicy.control import (
    AsyncChunkController,
    RecedingHorizonController,
    boundary_jerk,
    guided_chunk,
    rtc_weights,
)
from diffpolicy.policy import load_policy
from diffpolicy.training.trainer import Trainer


def test_rtc_weights_freeze_then_decay():
    w = rtc_weights(15, delay=3, overlap=8)
    assert list(w[:3]) == [1, 1, 1] and (w[8:] == 0).all()
    assert np.all(np.diff(w[3:8]) < 0) and 0 < w[7] < w[3] < 1


def obs_seq(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"pos": rng.normal(size=(2, 2)).astype(np.float32), "vel": rng.normal(size=(2, 3)).astype(np.float32)}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, traj_store):
    """A tiny trajectory2d policy trained for a few seconds (a random net's samples sit at the clip bounds,
    where no guidance can move them)."""
    run = tmp_path_factory.mktemp("rtc") / "run"
    cfg = tiny_config(
        f"data.path={traj_store}", "train.num_steps=200", "eval.n_episodes=0", "train.val_every=1000"
    )
    Trainer(cfg, run).fit()
    return load_policy(run / "checkpoints" / "latest")[0]


def test_guided_chunk_freezes_prefix_and_joins_smoother(trained):
    policy = trained
    obs = {"pos": torch.zeros(4, 2, 2), "vel": torch.zeros(4, 2, 2)}
    base = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    target = base + torch.tensor([0.3, -0.2])  # a previous chunk away from what the policy would sample
    w = torch.zeros(16)
    w[1:] = torch.from_numpy(rtc_weights(15, delay=3, overlap=8)).float()

    def chunk(strength):
        return guided_chunk(policy, obs, target, w, torch.Generator().manual_seed(0), max_guidance=strength)

    free, guided = chunk(0.0), chunk(5.0)
    for c in (free, guided):  # the frozen steps are exactly what runs during inference
        torch.testing.assert_close(c[:, 1:4], target[:, 1:4], rtol=0, atol=0)

    def join(c):  # the jump from the last frozen action to the first computed one
        return (c[:, 4] - c[:, 3]).norm(dim=-1).mean()

    assert join(guided) < 0.9 * join(free)
    soft = (w > 0) & (w < 1)
    assert (guided - target)[:, soft].norm(dim=-1).mean() < (free - target)[:, soft].norm(dim=-1).mean()


def test_sync_without_delay_is_receding_horizon_control():
    policy = build().eval()
    a = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(1))
    b = AsyncChunkController(policy, 0, "sync", generator=torch.Generator().manual_seed(1))
    for o in obs_seq(20):
        np.testing.assert_array_equal(a.act(o), b.act(o))
    assert b.switch_steps == [0, 8, 16]


@pytest.mark.parametrize("mode", ["sync", "naive", "ensemble", "rtc"])
def test_delayed_schedules(mode):
    policy = build().eval()
    c = AsyncChunkController(policy, 3, mode, generator=torch.Generator().manual_seed(1))
    actions = np.stack([c.act(o) for o in obs_seq(24)])
    assert np.isfinite(actions).all() and actions.shape == (24, 2, 2)
    if mode == "sync":  # chunks play 8 steps after holding the last command for 3
        assert c.switch_steps == [0, 11, 22]
        np.testing.assert_array_equal(actions[8:11], np.repeat(actions[7:8], 3, 0))
    else:  # requested every 8 steps, usable 3 steps later
        assert c.switch_steps == [0, 11, 19]
    b, inside = boundary_jerk(actions[:, 0], c.switch_steps)
    assert np.isfinite(b) and np.isfinite(inside)


def test_async_delay_must_fit_in_the_chunk():
    with pytest.raises(ValueError, match="n_action_steps \\+ delay"):
        AsyncChunkController(build().eval(), 9, "rtc")
    with pytest.raises(ValueError, match="mode"):
        AsyncChunkController(build().eval(), 1, "fast")
