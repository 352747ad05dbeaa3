"""Wide 1-D convolutions computed as one matrix product on CPU (im2col + GEMM): same results, faster.

Why this exists: the U-Net's deep levels convolve 1024-4096 channels over 4-8 time steps. On CPU, PyTorch
sends such convolutions either to its native `slow_conv2d` (batch 1: its `use_mkldnn` heuristic keeps
"small" inputs off oneDNN) or to oneDNN, which for these shapes spends its time on weight layout and
tiny-tile work. Unfolding the input window (C_in x K values per output step) and multiplying by the
convolution weight viewed as a (C_out, C_in * K) matrix -- a free view, no copy -- is one MKL GEMM, which
reads the weight once at close to memory speed. Measured on the 2-core CPU (bench/notes/speed.md): a
2048-channel, kernel-5 convolution over 4 steps goes from 14.7 to 10.2 ms at batch 1, 56 to 26 ms at
batch 10, and 674 to 303 ms for forward + backward at batch 64; below ~1024 channels the native paths win,
hence the `MIN_GEMM_WIDTH` threshold. Without autograd (inference) the GEMM runs on oneDNN against a
copy of the weight in oneDNN's layout, made once and refreshed whenever the weight changes (its version
counter): MKL's GEMM re-packs the weight on every call, which costs more than the product itself when
the output has 4-40 rows (2048 x 10240 weight, 4 rows: 8.9 -> 4.8 ms, against a 3.3 ms read floor).
That copy doubles these layers' weight memory while it exists; `train()` drops it.
On CUDA the modules are plain nn.Conv1d / nn.ConvTranspose1d (cuDNN). No library ships this as a drop-in
module; parameters and state-dict keys are exactly nn.Conv1d's / nn.ConvTranspose1d's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Smallest C_in * kernel_size that takes the GEMM form (the measured crossover, bench/notes/speed.md: with
# autograd, 1024 channels x kernel 5 gain and 512 x 5 lose; without it, a lower threshold gained ~5% on the
# paper U-Net, within noise, so one threshold serves both). Set it huge to compare with native convolutions.
MIN_GEMM_WIDTH = 4096


class _Gemm:
    """rows @ matrix.T (+ bias) for a conv module, choosing between F.linear and a cached oneDNN copy."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: Tensor | None = None

    def clear(self) -> None:
        self.key = self.packed = None

    @staticmethod
    def applies(module: nn.Module, x: Tensor, width: int) -> bool:
        """Whether the GEMM form is used for input x of a conv module whose GEMM has `width` columns."""
        if x.device.type != "cpu" or module.groups != 1 or module.dilation != (1,):
            return False
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
        return width >= MIN_GEMM_WIDTH

    @staticmethod
    def no_grad(x: Tensor, weight: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return (
            not needs_grad
            and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        )

    def __call__(self, rows: Tensor, matrix: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`matrix` is a view of `weight`, whose storage and version counter key the oneDNN copy."""
        if not self.no_grad(rows, weight):
            return F.linear(rows, matrix, bias)
        key = (weight.data_ptr(), weight._version, tuple(matrix.shape))
        if key != self.key:
            with torch.inference_mode():
                self.packed = matrix.contiguous().to_mkldnn()
            self.key = key
        return torch.ops.aten.mkldnn_linear(rows.contiguous().to_mkldnn(), self.packed, bias).to_dense()


class _WithGemm:
    """Mixin for the conv modules: owns their _Gemm, whose weight copy train() drops."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._gemm = _Gemm()

    def train(self, mode: bool = True):
        self._gemm.clear()
        return super().train(mode)


class GemmConv1d(_WithGemm, nn.Conv1d):
    """nn.Conv1d that runs wide CPU convolutions as im2col + one GEMM."""

    def forward(self, x: Tensor) -> Tensor:
        width = self.in_channels * self.kernel_size[0]
        if not _Gemm.applies(self, x, width):
            return super().forward(x)
        pad = self.padding[0]
        if pad:
            x = F.pad(x, (pad, pad))
        cols = x.unfold(2, self.kernel_size[0], self.stride[0])  # (B, C_in, L_out, K)
        batch, _, length, _ = cols.shape
        cols = cols.transpose(1, 2).reshape(batch * length, width)  # rows ordered (C_in, K) like the weight
        out = self._gemm(cols, self.weight.view(self.out_channels, width), self.weight, self.bias)
        return out.view(batch, length, self.out_channels).transpose(1, 2)


class GemmConvTranspose1d(_WithGemm, nn.ConvTranspose1d):
    """nn.ConvTranspose1d that runs wide CPU transposed convolutions as one GEMM + col2im (F.fold)."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None or self.output_padding != (0,):
            return super().forward(x, output_size)
        if not _Gemm.applies(self, x, self.in_channels * self.kernel_size[0]):
            return super().forward(x)
        batch, channels, length = x.shape
        k, stride, pad = self.kernel_size[0], self.stride[0], self.padding[0]
        # Each input step scatters a (C_out, K) patch: one GEMM against the (C_in, C_out * K) weight view,
        # then F.fold sums the overlapping patches into the output sequence.
        rows = x.transpose(1, 2).reshape(batch * length, channels)
        cols = self._gemm(rows, self.weight.view(channels, -1).t(), self.weight, None)
        cols = cols.view(batch, length, -1).transpose(1, 2)  # (B, C_out * K, L)
        out_len = (length - 1) * stride - 2 * pad + k
        out = F.fold(cols, (1, out_len), kernel_size=(1, k), stride=(1, stride), padding=(0, pad))
        out = out.view(batch, self.out_channels, out_len)
        return out if self.bias is None else out + self.bias[:, None]
