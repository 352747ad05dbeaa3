"""Fast paths match the plain PyTorch computation they replace (issue 5): the U-Net's GEMM convolutions
(models/gemm_conv.py), the fused AdamW (training/optim.py), and the inference fast paths of
DiffusionPolicy.set_fast_paths (bf16 autocast, torch.compile) plus bf16 autocast in training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from diffpolicy.bench import build_policy
from diffpolicy.config import TrainConfig
from diffpolicy.models import gemm_conv
from diffpolicy.models.gemm_conv import GemmConv1d, GemmConvTranspose1d
from diffpolicy.models.unet1d import ConditionalUnet1D
from diffpolicy.policy import DiffusionPolicy
from diffpolicy.training.optim import make_optimizer


@pytest.fixture
def always_gemm(monkeypatch):
    """Route every convolution, however narrow, through the GEMM forms."""
    monkeypatch.setattr(gemm_conv, "MIN_GEMM_WIDTH", 1)


def _grads(out: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.square().sum(), tensors)


@pytest.mark.parametrize(
    "c_in,c_out,kernel,stride,padding,length,batch",
    [(12, 8, 5, 1, 2, 16, 3), (16, 16, 3, 2, 1, 8, 1), (32, 4, 1, 1, 0, 4, 2), (8, 8, 3, 1, 0, 7, 2)],
)
def test_conv_matches_conv1d_with_gradients(always_gemm, c_in, c_out, kernel, stride, padding, length, batch):
    torch.manual_seed(0)
    conv = GemmConv1d(c_in, c_out, kernel, stride=stride, padding=padding)
    x = torch.randn(batch, c_in, length, requires_grad=True)
    out = conv(x)
    ref = F.conv1d(x, conv.weight, conv.bias, stride, padding)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        _grads(out, x, conv.weight, conv.bias), _grads(ref, x, conv.weight, conv.bias), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # the oneDNN weight copy
        torch.testing.assert_close(conv(x), ref.detach(), rtol=1e-5, atol=1e-5)
    assert conv._gemm.key is not None


@pytest.mark.parametrize("c_in,c_out,length,batch", [(16, 16, 4, 2), (24, 8, 8, 1)])
def test_transposed_conv_matches_conv_transpose1d(always_gemm, c_in, c_out, length, batch):
    torch.manual_seed(0)
    up = GemmConvTranspose1d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    x = torch.randn(batch, c_in, length, requires_grad=True)
    out = up(x)
    ref = F.conv_transpose1d(x, up.weight, up.bias, stride=2, padding=1)
    assert out.shape == ref.shape == (batch, c_out, 2 * length)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, x, up.weight), _grads(ref, x, up.weight), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(up(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_weight_copy_follows_weight_updates(always_gemm):
    """In-place updates (optimizer, EMA, load_state_dict) must reach the cached oneDNN copy."""
    torch.manual_seed(0)
    conv = GemmConv1d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 6)
    with torch.inference_mode():
        conv(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    conv.load_state_dict({"weight": conv.weight.detach() + 1.0, "bias": conv.bias.detach()})
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, padding=1))
    conv.train()
    assert conv._gemm.key is None  # train() drops the copy


def test_state_dict_is_plain_conv():
    conv, ref = GemmConv1d(4, 6, 3), torch.nn.Conv1d(4, 6, 3)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(conv.state_dict())
    up, ref_up = GemmConvTranspose1d(4, 6, 4, 2, 1), torch.nn.ConvTranspose1d(4, 6, 4, 2, 1)
    ref_up.load_state_dict(up.state_dict())


def test_unet_gemm_matches_native(monkeypatch):
    """The whole U-Net, forward and backward, with every conv as a GEMM vs none."""
    torch.manual_seed(0)
    net = ConditionalUnet1D(
        input_dim=3, global_cond_dim=5, down_dims=[16, 32, 64], diffusion_step_embed_dim=8
    )
    x, cond, t = torch.randn(4, 8, 3), torch.randn(4, 5), torch.tensor([0, 10, 50, 99])

    def run(width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(gemm_conv, "MIN_GEMM_WIDTH", width)
        net.zero_grad()
        out = net(x, t, global_cond=cond)
        out.square().mean().backward()
        with torch.inference_mode():
            fast = net.eval()(x, t, global_cond=cond)
        net.train()
        return out.detach(), torch.cat([p.grad.flatten() for p in net.parameters()]), fast

    native, gemm = run(10**9), run(1)
    for got, want in zip(gemm, native, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_adamw_matches_foreach():
    """make_optimizer's fused AdamW (CPU too) takes the same steps as the foreach implementation."""
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-3, weight_decay=1e-2)
    a = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = make_optimizer([{"params": a, "weight_decay": cfg.weight_decay}], cfg, torch.device("cpu"))
    assert fused.defaults["fused"]
    ref = torch.optim.AdamW(b, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


SHAPE_META = {"obs": {"pos": {"shape": [4], "type": "low_dim"}}, "action": {"shape": [2]}}


def _policy(net: str) -> DiffusionPolicy:
    """A tiny policy with random weights and a normalizer fitted to random data, sampling DDIM-10."""
    torch.manual_seed(0)
    cfg = tiny_config(f"policy.net={net}", "policy.scheduler.sampler=ddim")
    return build_policy(cfg, SHAPE_META, torch.device("cpu")).eval()


def _chunk(policy: DiffusionPolicy) -> torch.Tensor:
    obs = {"pos": torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))}
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(2))["action_pred"]


@pytest.mark.parametrize("net,gemm", [("unet", False), ("unet", True), ("transformer", False)])
def test_bf16_inference_tracks_fp32(net, gemm, monkeypatch):
    if gemm:  # every U-Net convolution through the GEMM forms (autocast meets the oneDNN weight copy)
        monkeypatch.setattr(gemm_conv, "MIN_GEMM_WIDTH", 1)
    policy = _policy(net)
    ref = _chunk(policy)
    policy.set_fast_paths(precision="bf16")
    got = _chunk(policy)
    assert got.dtype == ref.dtype == torch.float32
    assert not torch.equal(got, ref)  # bf16 really ran
    # bf16 keeps ~3 significant digits per call; over ten denoising steps of a random network the chunk
    # moves by ~0.1-0.6% of the action range on average (measured), a few percent at worst
    span = (ref.max() - ref.min()).item()
    err = (got - ref).abs()
    assert err.mean() < 0.01 * span and err.max() < 0.05 * span
    policy.set_fast_paths()
    assert torch.equal(_chunk(policy), ref)


def test_compiled_inference_matches_eager():
    policy = _policy("unet")
    keys = set(policy.state_dict())
    ref = _chunk(policy)
    policy.set_fast_paths(compile_mode="default")
    assert set(policy.state_dict()) == keys  # the compiled function is not a submodule
    torch.testing.assert_close(_chunk(policy), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_chunk(policy), ref, rtol=1e-4, atol=1e-4)  # replay, no recompile needed


def test_fast_path_choices_are_checked():
    policy = _policy("unet")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        policy.set_fast_paths(precision="fp16")
    with pytest.raises(ValueError, match="compile_mode 'fast'"):
        policy.set_fast_paths(compile_mode="fast")


@pytest.mark.parametrize("net", ["unet", "transformer"])
def test_bf16_training_loss_and_gradients_track_fp32(net):
    """train.mixed_precision=bf16 runs compute_loss under autocast: same loss and gradient direction."""
    policy = _policy(net).train()
    g = torch.Generator().manual_seed(3)
    batch = {"obs": {"pos": torch.randn(8, 2, 4, generator=g)}, "action": torch.rand(8, 16, 2, generator=g)}
    noise = policy.sample_training_noise(8, torch.Generator().manual_seed(4), torch.device("cpu"))

    def loss_and_grad(bf16: bool) -> tuple[float, torch.Tensor]:
        policy.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = policy.compute_loss(batch, **noise)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    assert loss16 == pytest.approx(loss32, rel=3e-2)
    # measured at random init: 0.9998 (U-Net), 0.92 (transformer: attention/LayerNorm gradients are the
    # noisiest in bf16); a broken cast path gives unrelated gradients
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.9
