"""Asynchronous execution and real-time chunking (control.AsyncChunkController, guided_chunk).

The guidance is checked against a policy whose clean estimate is a known linear map of the noisy sample,
so Black et al.'s correction J^T W (y - x0) and its weight have an exact answer; the schedules against
every delay each mode accepts, for a DDPM-trained and a flow-matching policy.
"""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_policy import build

from diffpolicy.control import (
    ASYNC_MODES,
    RTC_MAX_GUIDANCE,
    AsyncChunkController,
    RecedingHorizonController,
    boundary_jerk,
    guided_chunk,
    rtc_weights,
)
from diffpolicy.policy import load_policy
from diffpolicy.training.trainer import Trainer

DDPM = ("policy.scheduler.sampler=ddim", "policy.scheduler.num_inference_steps=2")
FLOW = ("policy.objective=flow", "policy.scheduler.sampler=euler", "policy.scheduler.num_inference_steps=2")
OBJECTIVES = {"ddpm": DDPM, "flow": FLOW}


def test_rtc_weights_freeze_then_decay():
    w = rtc_weights(15, delay=3, overlap=8)
    assert list(w[:3]) == [1, 1, 1] and (w[8:] == 0).all()
    assert np.all(np.diff(w[3:8]) < 0) and 0 < w[7] < w[3] < 1
    c = 5 / 6  # Black et al. eq. 5 at the first soft step: c = (overlap - delay) / (overlap - delay + 1)
    assert w[3] == pytest.approx(c * math.expm1(c) / math.expm1(1))


def obs_seq(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"pos": rng.normal(size=(2, 2)).astype(np.float32), "vel": rng.normal(size=(2, 3)).astype(np.float32)}
        for _ in range(n)
    ]


# ----- the guidance against a known answer ---------------------------------------------------------


def linear_policy(objective):
    """A tiny policy whose network is the fixed linear map x -> M x of the flattened chunk (B, H * Da): its
    clean estimate is linear in the sample, x0 = M x (DDPM, sample prediction) or x - s M x (flow)."""
    overrides = ("policy.scheduler.clip_sample=false", "policy.scheduler.prediction_type=sample")
    policy = build(*OBJECTIVES[objective], *overrides)
    n = policy.horizon * policy.action_dim
    M = torch.randn(n, n, generator=torch.Generator().manual_seed(3)) / (2 * n**0.5)  # not symmetric
    policy.call_net = lambda x, t, cond, **_: (x.flatten(1) @ M.T).view_as(x)
    return policy.eval(), M.double()


def paper_weight(tau, beta):
    """Black et al.'s guidance weight min(beta, (1 - tau) / (tau r^2)),
    r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2), at flow time tau (0 noise, 1 clean); beta at tau = 0."""
    if tau == 0:
        return beta
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    return min(beta, (1 - tau) / (tau * r2))


def expected_guided_chunk(policy, M, noise, y, W, beta):
    """The guided sampler of Black et al. written out with the explicit Jacobian of the linear policy, in
    normalized units (B, H * Da), float64."""
    x, y = noise.double().flatten(1), y.double().flatten(1)
    Wf = W.double().repeat_interleave(policy.action_dim)
    eye = torch.eye(M.shape[0], dtype=torch.float64)
    if policy.cfg.objective == "flow":  # s = 1 - tau: 1 noise, 0 clean; Euler steps of 1/2
        for s, s_next in ((1.0, 0.5), (0.5, 0.0)):
            v = x @ M.T
            J = eye - s * M  # x0 = x - s v
            correction = (Wf * (y - x @ J.T)) @ J  # rows of J^T W (y - x0)
            # this velocity is noise - x0, the paper's x0 - noise
            v = v - paper_weight(1 - s, beta) * correction
            x = x + (s_next - s) * v
        return x
    abar = policy.noise_scheduler.alphas_cumprod.double()
    policy.set_sampling_timesteps(torch.device("cpu"))
    steps = [int(t) for t in policy.sampler.timesteps]
    assert steps == [50, 0]
    for t, t_prev in zip(steps, [*steps[1:], None], strict=True):
        a, a_prev = abar[t], (abar[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=torch.float64))
        x0 = x @ M.T
        correction = (Wf * (y - x0)) @ M  # J = M
        # the equivalent flow time of x_t = sqrt(a) x0 + sqrt(1 - a) eps, and the paper's weight on the
        # velocity brought back to the score: v = x / tau + (1 - tau) / tau * score
        tau = float(a.sqrt() / (a.sqrt() + (1 - a).sqrt()))
        on_score = paper_weight(tau, beta) * tau / (1 - tau)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * on_score * correction
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM, eta = 0
    return x


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("beta", [None, 5.0, 1000.0])  # None: the default (by objective)
def test_guidance_matches_black_et_al_on_a_linear_policy(objective, beta):
    policy, M = linear_policy(objective)
    B, H, Da = 3, policy.horizon, policy.action_dim
    obs = {"pos": torch.zeros(B, 2, 2), "vel": torch.zeros(B, 2, 3)}
    target = torch.randn(B, H, Da, generator=torch.Generator().manual_seed(4)) * 3 + 1
    W = torch.linspace(0.9, 0.05, H)  # soft weights only (1 would mean frozen: set to the target afterwards)
    kwargs = {} if beta is None else {"max_guidance": beta}
    got = guided_chunk(policy, obs, target, W, torch.Generator().manual_seed(5), **kwargs)
    noise = torch.randn(B, H, Da, generator=torch.Generator().manual_seed(5))
    y = policy.normalizer.normalize("action", target)
    want = expected_guided_chunk(
        policy, M, noise, y, W, RTC_MAX_GUIDANCE[objective] if beta is None else beta
    )
    want = policy.normalizer.unnormalize("action", want.float().view(B, H, Da))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unguided = guided_chunk(policy, obs, target, W, torch.Generator().manual_seed(5), max_guidance=0.0)
    assert (got - unguided).abs().max() > 1e-2  # the guidance moved the chunk


def test_guidance_refuses_what_it_cannot_guide():
    policy = build(*DDPM).eval()
    obs = {"pos": torch.zeros(1, 2, 2), "vel": torch.zeros(1, 2, 3)}
    target, W = torch.zeros(1, 16, 2), torch.ones(16)
    for beta in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_guidance"):
            guided_chunk(policy, obs, target, W, max_guidance=beta)
    student = build("policy.type=consistency", "policy.scheduler.sampler=consistency").eval()
    with pytest.raises(ValueError, match="consistency-distilled"):
        guided_chunk(student, obs, target, W)
    with pytest.raises(ValueError, match="consistency-distilled"):
        AsyncChunkController(student, 1, "rtc")
    AsyncChunkController(student, 1, "naive")  # the other modes run any policy


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


def test_default_guidance_joins_a_trained_policy_to_the_previous_chunk(trained):
    policy = trained
    obs = {"pos": torch.zeros(4, 2, 2), "vel": torch.zeros(4, 2, 2)}
    base = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    target = base + torch.tensor([0.3, -0.2])  # a previous chunk away from what the policy would sample
    w = torch.zeros(16)
    w[1:] = torch.from_numpy(rtc_weights(15, delay=3, overlap=8)).float()
    free = guided_chunk(policy, obs, target, w, torch.Generator().manual_seed(0), max_guidance=0.0)
    guided = guided_chunk(policy, obs, target, w, torch.Generator().manual_seed(0))  # the defaults

    def join(c):  # the jump from the last frozen action to the first computed one
        return (c[:, 4] - c[:, 3]).norm(dim=-1).mean()

    assert join(guided) < 0.9 * join(free)
    soft = (w > 0) & (w < 1)
    assert (guided - target)[:, soft].norm(dim=-1).mean() < (free - target)[:, soft].norm(dim=-1).mean()


# ----- schedules -----------------------------------------------------------------------------------


class Recording(AsyncChunkController):
    """Keeps every chunk it requested: (request step, chunk)."""

    def reset(self) -> None:
        super().reset()
        self.requested: list[tuple[int, np.ndarray]] = []

    def _request(self) -> np.ndarray:
        chunk = super()._request()
        self.requested.append((self.step, chunk))
        return chunk


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_every_delay_the_controller_accepts_runs_on_schedule(objective, mode):
    """7 actions per chunk of 15 executable steps: asynchronous modes take delays 0..7 (d <= s, one request
    in flight, and s + d <= 15), sync any; each chunk plays from its arrival at the index it was due."""
    policy = build(*OBJECTIVES[objective]).eval()
    s = 7
    for d in range(s + 1 if mode != "sync" else 10):
        c = Recording(policy, d, mode, n_action_steps=s, generator=torch.Generator().manual_seed(1))
        n = 2 * (s + d) + 2
        actions = np.stack([c.act(o) for o in obs_seq(n)])
        assert np.isfinite(actions).all() and actions.shape == (n, 2, 2)
        if mode == "sync":  # hold the last command for d steps, then play s actions
            requests = [0, *range(s, n, s + d)]
            switches = [0] + [r + d for r in requests[1:] if r + d < n]
            starts = switches
        else:  # a request every s steps, usable d steps later (the first at once)
            requests = list(range(0, n, s))
            switches = [0] + [r + d for r in requests[1:] if r + d < n]
            starts = requests
        assert [r for r, _ in c.requested] == requests, d
        assert c.switch_steps == switches, d
        if mode == "ensemble":
            continue
        for k in range(n):
            i = max(j for j, sw in enumerate(switches) if sw <= k)
            chunk = c.requested[i][1]
            held = mode == "sync" and i + 1 < len(requests) and requests[i + 1] <= k
            expected = actions[k - 1] if held else chunk[:, k - starts[i]]
            np.testing.assert_array_equal(actions[k], expected, err_msg=f"delay {d}, step {k}")
        b, inside = boundary_jerk(actions[:, 0], c.switch_steps)
        assert np.isfinite(b) and np.isfinite(inside)
    if mode != "sync":  # 7 was the largest
        with pytest.raises(ValueError, match="delay=8 must be <= n_action_steps=7"):
            Recording(policy, s + 1, mode, n_action_steps=s)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_rtc_continues_the_actions_that_run_during_inference(objective):
    """In rtc mode a chunk requested at step t is guided towards the current chunk's actions for t, t + 1,
    ...: the d that run while it is computed are its frozen prefix, taken from the right place of the previous
    chunk (an unguided naive request does not match them). The controller's guidance clip defaults to
    its objective's default, RTC_MAX_GUIDANCE (the paper's beta, 5, for flow)."""
    policy = build(*OBJECTIVES[objective]).eval()
    s, d = 5, 3

    def run(mode, **kwargs):
        c = Recording(policy, d, mode, n_action_steps=s, generator=torch.Generator().manual_seed(1), **kwargs)
        for o in obs_seq(11):
            c.act(o)
        return [chunk for _, chunk in c.requested]

    rtc, naive = run("rtc"), run("naive")
    first, second = rtc[:2]
    np.testing.assert_allclose(second[:, :d], first[:, s : s + d], rtol=0, atol=1e-6)  # frozen prefix
    assert not np.allclose(naive[1][:, :d], first[:, s : s + d])
    default = RTC_MAX_GUIDANCE[
        objective
    ]  # flow: the paper's 5; DDPM: 1000 (measured, bench/notes/serving.md)
    np.testing.assert_array_equal(run("rtc", max_guidance=default)[1], second)
    other = 5.0 if default == 1000.0 else 1000.0
    assert not np.allclose(run("rtc", max_guidance=other)[1][:, d:], second[:, d:])


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_rtc_without_delay_is_synchronous_execution(objective):
    """At delay 0 nothing runs while a chunk is computed: rtc plays fresh, unguided chunks, action for action
    what sync and naive play (see AsyncChunkController)."""
    policy = build(*OBJECTIVES[objective]).eval()
    runs = {
        mode: AsyncChunkController(policy, 0, mode, generator=torch.Generator().manual_seed(1))
        for mode in ("sync", "naive", "rtc")
    }
    rhc = RecedingHorizonController(policy, generator=torch.Generator().manual_seed(1))
    for o in obs_seq(20):
        a = rhc.act(o)
        for c in runs.values():
            np.testing.assert_array_equal(c.act(o), a)
    assert runs["rtc"].switch_steps == [0, 8, 16]


def test_async_delay_must_fit_in_the_chunk():
    policy = build().eval()
    with pytest.raises(ValueError, match="n_action_steps \\+ delay"):
        AsyncChunkController(policy, 8, "rtc")  # 8 + 8 > 15 executable steps
    with pytest.raises(ValueError, match="delay=6 must be <= n_action_steps=5"):
        AsyncChunkController(policy, 6, "naive", n_action_steps=5)  # two requests would be in flight
    with pytest.raises(ValueError, match="delay"):
        AsyncChunkController(policy, -1, "sync")
    with pytest.raises(ValueError, match="mode"):
        AsyncChunkController(policy, 1, "fast")
    with pytest.raises(ValueError, match="max_guidance"):
        AsyncChunkController(policy, 1, "rtc", max_guidance=-5.0)
    AsyncChunkController(policy, 30, "sync")  # sync waits for each chunk: any delay
