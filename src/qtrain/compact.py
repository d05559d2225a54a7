"""Compact saved activations: ReLU and max pool that keep less for backward than torch's own.

``CompactReLU`` keeps a 1-byte mask instead of its float32 output, ``CompactMaxPool2d`` where
each maximum was instead of its input; results and gradients are torch's, bit for bit.
``fuse_range_bn_relu`` runs a ReLU inside the preceding ``RangeBatchNorm2d`` and leaves a
``FusedReLU`` pass-through in its place. ``qtrain.nn`` re-exports the public names.

>>> import torch
>>> CompactReLU()(torch.tensor([-1.0, 2.0], requires_grad=True)).tolist()
[0.0, 2.0]
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain import kernels
from qtrain.range_bn import RangeBatchNorm2d


class CompactReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-byte mask for backward instead of its float32 output.

    The gradient is torch's (``threshold_backward``: zero where the output is ≤ 0, passed
    through elsewhere, NaN outputs included), so training is bit-identical; only the memory held
    for backward changes: 1 byte per value instead of 4, and the output itself is no longer
    kept alive by this layer (a following quantized GEMM keeps int8 levels of it).
    """

    @classmethod
    def from_relu(cls, relu: nn.ReLU) -> CompactReLU:
        return cls(inplace=relu.inplace).train(relu.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu_(x) if self.inplace else torch.relu(x)
        return _MaskedReLU.apply(x, self.inplace)


class _MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        y = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        # Where threshold_backward zeroes the gradient: [y ≤ 0], one byte per value.
        ctx.save_for_backward(kernels.implementation(y.device).zero_mask(y))
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (zeroed,) = ctx.saved_tensors
        return kernels.implementation(grad.device).masked_zero(grad, zeroed), None


class FusedReLU(nn.ReLU):
    """The place of a ReLU that runs inside the preceding ``RangeBatchNorm2d``
    (``fused_relu=True``): a pass-through. ``dequantize_`` turns it back into ``nn.ReLU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fuse_range_bn_relu(model: nn.Module) -> int:
    """In every ``nn.Sequential`` of ``model``, let each ``RangeBatchNorm2d`` directly
    followed by a ReLU apply it: set ``fused_relu`` and put a ``FusedReLU``
    in the ReLU's place. Returns the number of pairs fused. The same results, one pass and one
    saved float tensor fewer per pair."""
    fused = 0
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for first, second in zip(names, names[1:], strict=False):
            bn, relu = sequential._modules[first], sequential._modules[second]
            if (
                isinstance(bn, RangeBatchNorm2d)
                and not bn.fused_relu
                and type(relu) in (nn.ReLU, CompactReLU)
            ):
                bn.fused_relu = True
                sequential._modules[second] = FusedReLU(relu.inplace).train(relu.training)
                fused += 1
    return fused


class CompactMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps only where each maximum was for backward, not its input.

    The common 2×2, stride-2 pool (no padding or dilation) of a contiguous or channels_last
    input runs on the kernel backend's ``max_pool2x2``: each maximum's position in its window
    is kept as one byte (torch keeps an int64 index and the input). Other pools run torch's own
    ops (``max_pool2d_with_indices`` and its backward) and keep the int64 indices only. Either
    way results and gradients are torch's, bit for bit (ties to the first maximum, NaN
    propagated).
    """

    @classmethod
    def from_maxpool(cls, pool: nn.MaxPool2d) -> CompactMaxPool2d:
        if pool.return_indices:
            raise ValueError("CompactMaxPool2d: a pool that returns its indices stays as it is")
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, False, pool.ceil_mode)
        return new.train(pool.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 4:
            return super().forward(x)
        pair = nn.modules.utils._pair
        stride = pair(self.stride if self.stride is not None else self.kernel_size)
        args = (pair(self.kernel_size), stride, pair(self.padding), pair(self.dilation))
        height, width = x.shape[-2:]
        if (
            args == ((2, 2), (2, 2), (0, 0), (1, 1))
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and min(height, width) >= 2
            and not (self.ceil_mode and (height % 2 or width % 2))
        ):
            return _WindowMaxPool.apply(x)
        return _IndexMaxPool.apply(x, args, self.ceil_mode)


class _WindowMaxPool(torch.autograd.Function):
    """The 2×2, stride-2 max pool on the kernel backend: one byte per output kept."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        y, where = kernels.implementation(x.device).max_pool2x2(x)
        ctx.save_for_backward(where)
        ctx.size = tuple(x.shape[-2:])
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (where,) = ctx.saved_tensors
        return kernels.implementation(grad.device).max_pool2x2_backward(grad, where, *ctx.size)


class _IndexMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args, ceil_mode):  # type: ignore[override]
        y, indices = torch.ops.aten.max_pool2d_with_indices(x, *args, ceil_mode)
        ctx.save_for_backward(indices)
        ctx.args, ctx.ceil_mode = args, ceil_mode
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()
        )
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        # The backward op reads only the input's shape and layout: an unwritten stand-in.
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        stand_in = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=layout)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, stand_in, *ctx.args, ctx.ceil_mode, indices
        )
        return grad_x, None, None
