import pytest
import torch
from conftest import tiny_config

from diffpolicy.data.normalize import Normalizer
from diffpolicy.policy import DiffusionPolicy, MseBCPolicy, NonFiniteActionError, make_policy

SHAPE_META = {
    "obs": {"pos": {"shape": [2], "type": "low_dim"}, "vel": {"shape": [3], "type": "low_dim"}},
    "action": {"shape": [2]},
}


def build(*overrides: str):
    cfg = tiny_config(*overrides)
    policy = make_policy(cfg.policy, SHAPE_META)
    g = torch.Generator().manual_seed(0)
    data = {
        "pos": torch.randn(500, 2, generator=g),
        "vel": torch.randn(500, 3, generator=g),
        "action": torch.randn(500, 2, generator=g) * 3 + 1,
    }
    fitted = Normalizer.fit(data, {"pos": "minmax", "vel": "gaussian", "action": "minmax"})
    policy.normalizer.load_state_dict(fitted.state_dict())
    return policy


def batch(B=4, To=2, H=16):
    g = torch.Generator().manual_seed(1)
    return {
        "obs": {"pos": torch.randn(B, To, 2, generator=g), "vel": torch.randn(B, To, 3, generator=g)},
        "action": torch.randn(B, H, 2, generator=g),
        "action_is_pad": torch.zeros(B, H, dtype=torch.bool),
    }


VARIANTS = [
    ("policy.net=unet",),
    ("policy.net=transformer",),
    ("policy.net=unet", "policy.obs_as_global_cond=false"),
    ("policy.net=transformer", "policy.obs_as_global_cond=false"),
    ("policy.net=unet", "policy.scheduler.prediction_type=sample"),
    ("policy.net=unet", "policy.scheduler.sampler=ddim", "policy.scheduler.num_inference_steps=4"),
    ("policy.type=mse_bc", "policy.net=unet"),
    ("policy.type=mse_bc", "policy.net=transformer"),
    ("policy.objective=flow", "policy.scheduler.sampler=euler", "policy.scheduler.num_inference_steps=4"),
    ("policy.net=transformer", "policy.objective=flow", "policy.scheduler.sampler=heun"),
    ("policy.obs_as_global_cond=false", "policy.objective=flow", "policy.scheduler.sampler=euler"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_loss_and_prediction_shapes(overrides):
    policy = build(*overrides)
    loss = policy.compute_loss(batch())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in policy.net.parameters() if p.requires_grad)
    policy.eval()
    out = policy.predict_action(batch()["obs"], generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (4, 8, 2) and out["action_pred"].shape == (4, 16, 2)
    # executed actions are the chunk from offset n_obs_steps - 1 (the current step)
    assert torch.equal(out["action"], out["action_pred"][:, 1:9])
    assert torch.isfinite(out["action_pred"]).all()


def test_loss_excludes_padded_actions():
    policy = build()
    b = batch()
    b["action_is_pad"][:, 12:] = True
    b["action_is_pad"][0, :1] = True
    preds = []
    original = policy.call_net
    policy.call_net = lambda *a: preds.append(original(*a)) or preds[-1]
    torch.manual_seed(0)
    loss = policy.compute_loss(b)
    torch.manual_seed(0)
    noise = torch.randn(4, 16, 2)  # the first draw compute_loss makes is the noise
    keep = ~b["action_is_pad"]
    expected = (((preds[0] - noise) ** 2) * keep[..., None]).sum() / noise.numel()
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, ((preds[0] - noise) ** 2).mean())


def test_observation_encoded_once_per_chunk():
    policy = build("policy.scheduler.num_inference_steps=10").eval()
    calls = []
    policy.obs_encoder.register_forward_hook(lambda *a: calls.append(1))
    policy.predict_action(batch()["obs"])
    assert len(calls) == 1


def test_sampling_is_seeded():
    policy = build().eval()
    obs = batch()["obs"]
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    c = policy.predict_action(obs, generator=torch.Generator().manual_seed(4))["action"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_scale_scales_the_initial_noise():
    """noise_scale multiplies x_T: with DDIM (no injected noise) at scale 0 every seed gives one chunk."""
    policy = build("policy.scheduler.sampler=ddim", "policy.scheduler.num_inference_steps=4").eval()
    obs = batch()["obs"]
    starts = []
    policy.net.register_forward_pre_hook(lambda m, args: starts.append(args[0].clone()))
    policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    policy.noise_scale = 0.5
    policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(starts[4], 0.5 * starts[0])  # the first call of each chunk sees x_T
    policy.noise_scale = 0.0
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(4))["action"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", ["diffusion", "mse_bc"])
def test_non_finite_actions_never_leave_the_policy(cls):
    policy = build(f"policy.type={cls}").eval()
    obs = batch()["obs"]
    obs["pos"][0, -1, 0] = float("nan")
    with pytest.raises(NonFiniteActionError):
        policy.predict_action(obs)


def test_missing_and_misshapen_observations():
    policy = build().eval()
    obs = batch()["obs"]
    with pytest.raises(KeyError, match="'vel' is missing"):
        policy.predict_action({"pos": obs["pos"]})
    with pytest.raises(ValueError, match="'vel'.*3"):
        policy.predict_action({"pos": obs["pos"], "vel": obs["vel"][..., :2]})


def test_types():
    assert isinstance(build(), DiffusionPolicy)
    assert isinstance(build("policy.type=mse_bc"), MseBCPolicy)
    with pytest.raises(ValueError, match="obs_as_global_cond"):
        build("policy.type=mse_bc", "policy.obs_as_global_cond=false")


def test_transformer_optim_groups_cover_all_parameters():
    cfg = tiny_config("policy.net=transformer")
    policy = build("policy.net=transformer")
    groups = policy.optim_groups(cfg.train)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(policy.parameters()))
    assert {g["weight_decay"] for g in groups} >= {0.0, cfg.train.weight_decay}


@pytest.mark.parametrize(
    "overrides", [("policy.net=unet",), ("policy.net=transformer",), ("policy.obs_as_global_cond=false",)]
)
def test_noise_samples_per_obs_is_the_mean_of_k_single_losses(overrides):
    """K noised copies per observation encoding: exactly the mean of K ordinary losses (padding included)."""
    k = 3
    multi = build(*overrides, f"policy.noise_samples_per_obs={k}").eval()  # eval: no dropout
    single = build(*overrides)
    single.load_state_dict(multi.state_dict())
    single.eval()
    b = batch()
    b["action_is_pad"][0, -3:] = True
    noise = multi.sample_training_noise(4, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert noise["noise"].shape == (4, k, 16, single.trajectory_dim) and noise["timesteps"].shape == (4, k)
    loss = multi.compute_loss(b, **noise)
    parts = [single.compute_loss(b, noise["noise"][:, i], noise["timesteps"][:, i]) for i in range(k)]
    assert torch.allclose(loss, torch.stack(parts).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 noise sample"):
        multi.compute_loss(b, noise["noise"][:, 0], noise["timesteps"][:, 0])
    assert torch.isfinite(multi.compute_loss(b))  # its own draws


def test_one_noise_sample_draws_what_the_paper_loss_always_drew():
    policy = build()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = policy.sample_training_noise(4, g1, torch.device("cpu"))
    assert torch.equal(drawn["noise"], torch.randn(4, 16, policy.trajectory_dim, generator=g2))
    assert drawn["timesteps"].shape == (4,)


def test_one_registry_serves_configs_and_checkpoints():
    from diffpolicy.config import _CHOICES
    from diffpolicy.policy import OBJECTIVES, POLICY_TYPES, policy_class

    assert set(POLICY_TYPES) == set(_CHOICES["policy.type"])
    assert set(OBJECTIVES) == set(_CHOICES["policy.objective"])
    for name, cls in POLICY_TYPES.items():
        assert policy_class(name) is cls and policy_class(cls.__name__) is cls
    for cls in OBJECTIVES.values():
        assert policy_class(cls.__name__) is cls
    assert policy_class("NoSuchPolicy") is None
