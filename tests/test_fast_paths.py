"""Fast paths match the plain PyTorch computation they replace (issue 5): the U-Net's GEMM convolutions
(models/gemm_conv.py) and the fused AdamW (training/optim.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffpolicy.config import TrainConfig
from diffpolicy.models import gemm_conv
from diffpolicy.models.gemm_conv import GemmConv1d, GemmConvTranspose1d
from diffpolicy.models.unet1d import ConditionalUnet1D
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
