"""Flow matching (policy.objective=flow): the path and its target, the samplers against a known ODE, a
two-mode toy distribution recovered in a few steps, checkpoints, and the clear refusals."""

import pytest
import torch
from conftest import tiny_config

from diffpolicy.config import ConfigError
from diffpolicy.data.normalize import Normalizer
from diffpolicy.distill.teacher import TeacherError, load_teacher
from diffpolicy.policy import FlowPolicy, load_policy, make_policy
from diffpolicy.training.trainer import Trainer

FLOW = ("policy.objective=flow", "policy.scheduler.sampler=euler", "policy.scheduler.num_inference_steps=4")
SHAPE_META = {"obs": {"pos": {"shape": [2], "type": "low_dim"}}, "action": {"shape": [1]}}


def flow_policy(*overrides: str) -> FlowPolicy:
    cfg = tiny_config(*FLOW, "policy.horizon=8", "policy.n_action_steps=4", *overrides)
    policy = make_policy(cfg.policy, SHAPE_META)
    # identity-like normalization: actions already in [-1, 1], observations in [-1, 1]
    data = {"pos": torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), "action": torch.tensor([[-1.0], [1.0]])}
    fitted = Normalizer.fit(data, {"pos": "minmax", "action": "minmax"})
    policy.normalizer.load_state_dict(fitted.state_dict())
    return policy


def test_objective_builds_a_flow_policy_and_checks_its_sampler():
    assert isinstance(flow_policy(), FlowPolicy)
    # the preset's DDPM sampler follows an objective set above it (tests/test_config.py has the rule) ...
    assert tiny_config("policy.objective=flow").policy.scheduler.sampler == "euler"
    with pytest.raises(ConfigError, match="policy.scheduler.sampler='ddpm' does not fit"):
        tiny_config("policy.objective=flow", "policy.scheduler.sampler=ddpm")  # ... one named with it not
    with pytest.raises(ConfigError, match="policy.scheduler.sampler='euler' does not fit"):
        tiny_config("policy.scheduler.sampler=euler")
    with pytest.raises(ConfigError, match="policy.objective=flow is for policy.type=diffusion"):
        tiny_config(*FLOW, "policy.type=mse_bc")
    with pytest.raises(ConfigError, match="policy.flow.time_sampling"):
        tiny_config(*FLOW, "policy.flow.time_sampling=cosine")
    policy = flow_policy()
    with pytest.raises(ValueError, match="not one of \\('euler', 'heun'\\)"):
        policy.set_sampler("ddim", 10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        policy.set_sampler("euler", 4, "trailing")


def test_path_target_and_time_input():
    policy = flow_policy()
    x0, noise = torch.randn(3, 8, 1), torch.randn(3, 8, 1)
    s = torch.tensor([0.0, 0.25, 1.0])
    noisy, target, net_t = policy.noised_and_target(x0, noise, s)
    assert torch.allclose(noisy[0], x0[0]) and torch.allclose(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.allclose(target, noise - x0)
    assert torch.allclose(net_t, s * policy.cfg.scheduler.num_train_timesteps)


@pytest.mark.parametrize("kind", ["beta", "uniform", "logit_normal"])
def test_training_times(kind):
    policy = flow_policy(f"policy.flow.time_sampling={kind}")
    s = policy.draw_training_times((20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert s.min() >= 0 and s.max() <= 1
    mean = {"beta": 1 - 0.999 + 0.999 * 1.5 / 2.5, "uniform": 0.5, "logit_normal": 0.5}[kind]
    assert abs(s.mean().item() - mean) < 0.01
    again = policy.draw_training_times((20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(s, again)  # one generator draw: DDP ranks share it exactly


def gaussian_velocity(m: float, c: float):
    """The exact flow velocity E[noise - x0 | x_s = x] for data N(m, c^2) and noise N(0, 1)."""

    def velocity(x, t, cond):
        s = (t / 100.0).to(x.dtype)
        a = 1 - s
        var = a**2 * c**2 + s**2
        x0 = m + a * c**2 * (x - a * m) / var
        eps = s * (x - a * m) / var
        return eps - x0

    return velocity


def test_samplers_solve_a_known_ode(monkeypatch):
    """Data N(m, c^2): the ODE carries the noise z to m + c z. Both samplers converge to it at their order
    (doubling the steps halves Euler's error and quarters Heun's), Heun ten times closer at equal calls."""
    policy = flow_policy("policy.scheduler.clip_sample=false")
    monkeypatch.setattr(policy, "_denoise_call", gaussian_velocity(0.3, 0.5))
    z = torch.randn(16, 8, 1, generator=torch.Generator().manual_seed(0))

    def error(sampler: str, steps: int) -> float:
        policy.set_sampler(sampler, steps)
        assert policy.network_calls == (2 * steps - 1 if sampler == "heun" else steps)
        return (policy._sample_loop(z.clone(), None, z, None, None) - (0.3 + 0.5 * z)).abs().max().item()

    assert error("heun", 32) < 5e-3 and error("euler", 64) < 5e-2
    assert 1.7 < error("euler", 32) / error("euler", 64) < 2.3
    assert 3.0 < error("heun", 16) / error("heun", 32) < 5.0
    assert error("heun", 32) < error("euler", 64) / 10  # 63 calls against 64


def test_one_euler_step_gives_the_mean(monkeypatch):
    """From s = 1 one Euler step lands on E[x0]: why multimodal data needs a few steps, not one."""
    policy = flow_policy("policy.scheduler.clip_sample=false")
    monkeypatch.setattr(policy, "_denoise_call", gaussian_velocity(0.3, 0.5))
    policy.set_sampler("euler", 1)
    z = torch.randn(4, 8, 1)
    assert torch.allclose(policy._sample_loop(z.clone(), None, z, None, None), torch.full_like(z, 0.3))


def test_two_modes_are_recovered_in_four_steps():
    """Actions +-0.7 (normalized) with equal odds for one observation: a trained flow policy samples both
    modes in 4 Euler steps, each >= 25% of chunks, and little mass between them."""
    torch.manual_seed(0)
    policy = flow_policy("policy.flow.time_sampling=uniform")
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    obs = {"pos": torch.zeros(128, 2, 2)}
    for _ in range(250):
        sign = torch.randint(0, 2, (128, 1, 1)).float() * 2 - 1
        loss = policy.compute_loss({"obs": obs, "action": (0.7 * sign).expand(128, 8, 1)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    chunks = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))["action_pred"]
    mean = chunks.mean(dim=(1, 2))
    upper, lower = (mean > 0.35).float().mean(), (mean < -0.35).float().mean()
    assert upper >= 0.25 and lower >= 0.25, (upper, lower)
    assert upper + lower >= 0.9


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, traj_store):
    run = tmp_path_factory.mktemp("flow") / "run"
    cfg = tiny_config(f"data.path={traj_store}", *FLOW, "eval.n_episodes=2", "eval.n_envs=2")
    report = Trainer(cfg, run).fit()
    return run, report


def test_flow_run_trains_saves_loads_and_evaluates(flow_run):
    run, report = flow_run
    assert report["n_episodes"] == 2 and report["sampler"] == "flow Euler"
    policy, cfg = load_policy(run / "checkpoints" / "latest")
    assert isinstance(policy, FlowPolicy) and cfg.policy.objective == "flow"
    again = FlowPolicy.from_pretrained(run / "checkpoints" / "latest")
    obs = {k: torch.rand(3, 2, *v["shape"]) for k, v in policy.shape_meta["obs"].items()}
    for sampler in ("euler", "heun"):
        policy.set_sampler(sampler, 2)
        again.set_sampler(sampler, 2)
        a = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
        b = again.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_flow_policies_refuse_what_they_do_not_support(flow_run):
    run, _ = flow_run
    with pytest.raises(TeacherError, match="flow matching"):
        load_teacher(run / "checkpoints" / "latest")  # (real-time chunking guides flow: tests/test_rtc.py)
