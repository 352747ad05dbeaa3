"""Unit tests for the noise-prediction networks (ConditionalUnet1D, TransformerForDiffusion)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffpolicy.models.embeddings import SinusoidalPosEmb, expand_timesteps
from diffpolicy.models.transformer import TransformerForDiffusion
from diffpolicy.models.unet1d import ConditionalResidualBlock1D, ConditionalUnet1D

B = 3


def small_unet(**overrides) -> ConditionalUnet1D:
    kwargs = dict(input_dim=2, global_cond_dim=6, diffusion_step_embed_dim=16, down_dims=(16, 32))
    kwargs.update(overrides)
    return ConditionalUnet1D(**kwargs)


def small_transformer(**overrides) -> TransformerForDiffusion:
    kwargs = dict(
        input_dim=2, output_dim=2, horizon=8, n_obs_steps=3, cond_dim=5, n_layer=2, n_head=2, n_emb=16
    )
    kwargs.update(overrides)
    return TransformerForDiffusion(**kwargs)


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_pos_emb_shape_and_values():
    emb = SinusoidalPosEmb(8)
    out = emb(torch.tensor([0, 1, 100]))
    assert out.shape == (3, 8)
    assert torch.allclose(out[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin(0)=0, cos(0)=1
    assert torch.allclose(emb(torch.tensor([1.0, 2.0])), emb(torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="even"):
        SinusoidalPosEmb(7)


def test_expand_timesteps():
    assert expand_timesteps(4, B, torch.device("cpu")).tolist() == [4] * B
    assert expand_timesteps(torch.tensor(4), B, torch.device("cpu")).shape == (B,)
    assert expand_timesteps(torch.tensor([4]), B, torch.device("cpu")).shape == (B,)
    with pytest.raises(ValueError, match=r"a \(3,\) tensor, got shape \(2,\)"):
        expand_timesteps(torch.zeros(2), B, torch.device("cpu"))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides, horizon",
    [
        ({}, 8),
        ({"kernel_size": 3}, 4),
        ({"cond_predict_scale": False}, 8),
        ({"down_dims": (16, 32, 64)}, 12),
        ({"down_dims": (16,)}, 5),
        ({"global_cond_dim": None, "input_dim": 7}, 8),  # inpainting: actions + obs features
    ],
)
def test_unet_output_shape(overrides, horizon):
    net = small_unet(**overrides)
    x = torch.randn(B, horizon, net.input_dim)
    cond = torch.randn(B, net.global_cond_dim) if net.global_cond_dim else None
    out = net(x, torch.randint(0, 100, (B,)), global_cond=cond)
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_cond_layers": 2},
        {"causal_attn": False},
        {"n_obs_steps": 1},
        {"output_dim": 4},
        {"cond_dim": 0, "n_obs_steps": 0, "input_dim": 6, "output_dim": 6},  # inpainting style
        {"cond_dim": 0, "n_cond_layers": 1},
    ],
)
def test_transformer_output_shape(overrides):
    net = small_transformer(**overrides)
    x = torch.randn(B, net.horizon, net.input_dim)
    cond = torch.randn(B, net.n_obs_steps, net.cond_dim) if net.cond_dim else None
    out = net(x, torch.randint(0, 100, (B,)), cond=cond)
    assert out.shape == (B, net.horizon, net.output_dim)


# ---------------------------------------------------------------- timesteps and conditioning


def _both_nets():
    torch.manual_seed(0)
    unet = small_unet().eval()
    tf = small_transformer().eval()
    unet_args = (torch.randn(B, 8, 2), torch.randn(B, 6))
    tf_args = (torch.randn(B, 8, 2), torch.randn(B, 3, 5))
    return [(unet, unet_args), (tf, tf_args)]


@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_timestep_forms_agree(index):
    net, (x, cond) = _both_nets()[index]
    with torch.no_grad():
        ref = net(x, torch.full((B,), 7), cond)
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.full((B,), 7.0)):
            assert torch.allclose(net(x, t, cond), ref, atol=1e-6)
        assert not torch.allclose(net(x, 8, cond), ref)
        # Per-sample timesteps: each row matches the same row run with a shared timestep.
        mixed = net(x, torch.tensor([7, 50, 99]), cond)
        assert torch.allclose(mixed[0], ref[0], atol=1e-6)
        assert torch.allclose(mixed[1], net(x, 50, cond)[1], atol=1e-6)


@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_conditioning_changes_output(index):
    net, (x, cond) = _both_nets()[index]
    with torch.no_grad():
        diff = (net(x, 3, cond) - net(x, 3, torch.randn_like(cond))).abs()
        assert diff.amax(dim=(1, 2)).min() > 1e-6  # every sample in the batch reacts


@pytest.mark.parametrize("index", [0, 1], ids=["unet", "transformer"])
def test_eval_is_deterministic_and_train_uses_dropout(index):
    net, (x, cond) = _both_nets()[index]
    with torch.no_grad():
        assert torch.equal(net(x, 3, cond), net(x, 3, cond))
    if isinstance(net, TransformerForDiffusion):
        net.train()
        torch.manual_seed(1)
        assert not torch.allclose(net(x, 3, cond), net(x, 3, cond))


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_unet_film_path_gets_gradients(cond_predict_scale):
    net = small_unet(cond_predict_scale=cond_predict_scale)
    cond = torch.randn(B, 6, requires_grad=True)
    net(torch.randn(B, 8, 2), 10, cond).square().mean().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    blocks = [m for m in net.modules() if isinstance(m, ConditionalResidualBlock1D)]
    assert len(blocks) == 2 * 2 + 2 + 2 * 1  # two per down level, mid, two per up level
    for block in blocks:
        film = block.cond_encoder[1]
        assert film.out_features == block.out_channels * (2 if cond_predict_scale else 1)
        assert film.weight.grad is not None and film.weight.grad.abs().sum() > 0
    step_encoder_grad = net.diffusion_step_encoder[1].weight.grad
    assert step_encoder_grad is not None and step_encoder_grad.abs().sum() > 0


# ---------------------------------------------------------------- causal masking


def _changed_steps(net, x, cond, x2, cond2) -> torch.Tensor:
    with torch.no_grad():
        diff = (net(x, 5, cond) - net(x2, 5, cond2)).abs().amax(dim=(0, 2))
    return diff > 1e-6


@pytest.mark.parametrize("n_cond_layers", [0, 1])
def test_transformer_causal_self_attention(n_cond_layers):
    torch.manual_seed(0)
    net = small_transformer(n_cond_layers=n_cond_layers).eval()
    x, cond = torch.randn(B, 8, 2), torch.randn(B, 3, 5)
    k = 4
    x2 = x.clone()
    x2[:, k] += 1.0
    changed = _changed_steps(net, x, cond, x2, cond)
    assert not changed[:k].any()
    assert changed[k:].all()


@pytest.mark.parametrize("n_cond_layers", [0, 1])
def test_transformer_causal_memory_mask(n_cond_layers):
    """Action step t sees the diffusion-step token and observation steps <= t."""
    torch.manual_seed(0)
    net = small_transformer(n_cond_layers=n_cond_layers).eval()
    x, cond = torch.randn(B, 8, 2), torch.randn(B, 3, 5)
    for s in range(3):
        cond2 = cond.clone()
        cond2[:, s] += 1.0
        changed = _changed_steps(net, x, cond, x, cond2)
        if n_cond_layers == 0:  # MLP encoder keeps tokens separate, so the rule is exact
            assert not changed[:s].any(), f"obs step {s} leaked into action steps < {s}"
        assert changed[s:].all()
    # With an attention encoder obs tokens mix freely, so only the step token is guaranteed visible.
    with torch.no_grad():
        assert not torch.allclose(net(x, 5, cond)[:, 0], net(x, 6, cond)[:, 0])


def test_transformer_non_causal_sees_everything():
    torch.manual_seed(0)
    net = small_transformer(causal_attn=False).eval()
    x, cond = torch.randn(B, 8, 2), torch.randn(B, 3, 5)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert _changed_steps(net, x, cond, x2, cond).all()
    cond2 = cond.clone()
    cond2[:, -1] += 1.0
    assert _changed_steps(net, x, cond, x, cond2).all()
    assert net.tgt_mask is None and net.memory_mask is None


def test_transformer_masks_not_in_state_dict():
    net = small_transformer()
    assert not any("mask" in k for k in net.state_dict())


# ---------------------------------------------------------------- optimizer groups


@pytest.mark.parametrize("n_cond_layers", [0, 2])
def test_optim_groups_cover_all_parameters_once(n_cond_layers):
    net = small_transformer(n_cond_layers=n_cond_layers)
    decay_group, no_decay_group = net.get_optim_groups(weight_decay=1e-3)
    assert decay_group["weight_decay"] == 1e-3 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in net.parameters()}

    assert id(net.pos_emb) in no_decay and id(net.cond_pos_emb) in no_decay
    assert id(net.head.weight) in decay and id(net.head.bias) in no_decay
    for module in net.modules():
        if isinstance(module, nn.LayerNorm):
            assert id(module.weight) in no_decay and id(module.bias) in no_decay
        if isinstance(module, nn.MultiheadAttention):
            assert id(module.in_proj_weight) in decay and id(module.in_proj_bias) in no_decay
    torch.optim.AdamW(net.get_optim_groups(1e-3), lr=1e-4)  # usable as-is


def test_transformer_init():
    net = small_transformer(n_emb=64)
    assert net.head.bias.abs().sum() == 0
    assert 0.01 < net.head.weight.std().item() < 0.03
    assert 0.01 < net.pos_emb.std().item() < 0.03


# ---------------------------------------------------------------- validation errors


def test_unet_shape_errors():
    net = small_unet(down_dims=(16, 32, 64))
    cond = torch.randn(B, 6)
    with pytest.raises(ValueError, match=r"shape \(B, T, 2\), got \(3, 8, 3\)"):
        net(torch.randn(B, 8, 3), 1, cond)
    with pytest.raises(ValueError, match=r"shape \(B, T, 2\), got \(8, 2\)"):
        net(torch.randn(8, 2), 1, cond)
    with pytest.raises(ValueError, match=r"horizon T=10 must be divisible by 4.*down_dims=\(16, 32, 64\)"):
        net(torch.randn(B, 10, 2), 1, cond)
    with pytest.raises(ValueError, match=r"global_cond must have shape \(3, 6\), got \(3, 5\)"):
        net(torch.randn(B, 8, 2), 1, torch.randn(B, 5))
    with pytest.raises(ValueError, match="required"):
        net(torch.randn(B, 8, 2), 1)
    with pytest.raises(ValueError, match="global_cond_dim=None"):
        small_unet(global_cond_dim=None)(torch.randn(B, 8, 2), 1, cond)
    with pytest.raises(ValueError, match=r"timestep .* got shape \(2,\)"):
        net(torch.randn(B, 8, 2), torch.zeros(2), cond)
    with pytest.raises(ValueError, match="n_groups"):
        small_unet(down_dims=(12, 32))


def test_transformer_shape_errors():
    net = small_transformer()
    cond = torch.randn(B, 3, 5)
    with pytest.raises(ValueError, match=r"horizon=8.*got \(3, 6, 2\)"):
        net(torch.randn(B, 6, 2), 1, cond)
    with pytest.raises(ValueError, match=r"input_dim=2.*got \(3, 8, 4\)"):
        net(torch.randn(B, 8, 4), 1, cond)
    with pytest.raises(ValueError, match=r"cond must have shape \(3, 3, 5\).*got \(3, 2, 5\)"):
        net(torch.randn(B, 8, 2), 1, torch.randn(B, 2, 5))
    with pytest.raises(ValueError, match="required"):
        net(torch.randn(B, 8, 2), 1)
    with pytest.raises(ValueError, match="cond_dim=0"):
        small_transformer(cond_dim=0)(torch.randn(B, 8, 2), 1, cond)
    with pytest.raises(ValueError, match="divisible by n_head"):
        small_transformer(n_emb=10, n_head=4)


# ---------------------------------------------------------------- learning


def _overfit(net: nn.Module, x, t, cond, target, steps: int = 200) -> tuple[float, float]:
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = (net(x, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-10:])


def test_unet_overfits_tiny_batch():
    torch.manual_seed(0)
    net = small_unet()
    x, cond, target = torch.randn(4, 8, 2), torch.randn(4, 6), torch.randn(4, 8, 2)
    first, last = _overfit(net, x, torch.tensor([1, 20, 40, 80]), cond, target)
    assert last < first / 10, (first, last)


def test_transformer_overfits_tiny_batch():
    torch.manual_seed(0)
    net = small_transformer(n_emb=32, p_drop_attn=0.0)
    x, cond, target = torch.randn(4, 8, 2), torch.randn(4, 3, 5), torch.randn(4, 8, 2)
    first, last = _overfit(net, x, torch.tensor([1, 20, 40, 80]), cond, target)
    assert last < first / 10, (first, last)
