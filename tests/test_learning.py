"""A DDPM-trained policy learns: a conditional, two-mode action distribution fitted in seconds.

The only end-to-end learning checks (demo, Push-T) are `slow`; this one runs in CI and fails when the
DDPM loss, the sampler or the normalizer is broken (each was broken once and made it fail)."""

import torch
from conftest import tiny_config

from diffpolicy.data.normalize import Normalizer
from diffpolicy.policy import DiffusionPolicy, make_policy

SHAPE_META = {"obs": {"pos": {"shape": [2], "type": "low_dim"}}, "action": {"shape": [1]}}
# Observation side p = -1 or +1; its action chunk holds one of two constants with equal odds, in
# environment units (not [-1, 1], so that a normalizer that does not round-trip shows).
MODES = {-1.0: (20.0, 40.0), 1.0: (60.0, 80.0)}


def draw(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    side = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    upper = torch.randint(0, 2, (n,), generator=generator).float()
    action = 50 + 20 * side + 10 * (2 * upper - 1)
    pos = torch.stack([side, torch.zeros(n)], dim=1)
    return {"obs": {"pos": pos[:, None].expand(n, 2, 2)}, "action": action[:, None, None].expand(n, 4, 1)}


def test_a_ddpm_policy_learns_a_conditional_two_mode_distribution():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = tiny_config(
        "policy.horizon=4",
        "policy.n_action_steps=2",
        "policy.unet.down_dims=[32,64]",
        "policy.scheduler.num_inference_steps=10",  # DDPM, 10 of the 100 training steps
    )
    policy = make_policy(cfg.policy, SHAPE_META)
    assert isinstance(policy, DiffusionPolicy) and policy.cfg.objective == "ddpm"
    fit = draw(2048, g)
    data = {"pos": fit["obs"]["pos"].reshape(-1, 2), "action": fit["action"].reshape(-1, 1)}
    policy.normalizer.load_state_dict(
        Normalizer.fit(data, {"pos": "minmax", "action": "minmax"}).state_dict()
    )
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-3)
    for _ in range(200):  # ~15 CPU-s; 0.98 / 1.0 of the chunks land on a mode (0.85 required)
        loss = policy.compute_loss(draw(128, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    for side, modes in MODES.items():
        obs = {"pos": torch.tensor([side, 0.0]).expand(200, 2, 2)}
        with torch.no_grad():
            chunks = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))["action_pred"]
        assert chunks.shape == (200, 4, 1)
        mean = chunks.mean(dim=(1, 2))
        near = [((mean - m).abs() < 5).float().mean().item() for m in modes]
        # both of this side's modes, little mass between or on the other side's modes
        assert min(near) >= 0.25 and sum(near) >= 0.85, (side, near, mean[:10])
        assert (chunks.std(dim=1) < 3).float().mean() >= 0.85  # each chunk holds one constant
