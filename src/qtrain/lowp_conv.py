"""``LowPrecisionConv2d``: a convolution's three products as int8 or fp8 GEMMs on its im2col
matrix (``qtrain.im2col``), with ``qtrain.lowp``'s operands, products and layer protocol; and
the ``quantize_`` handler of ``Int8TrainingConfig`` / ``Float8TrainingConfig`` that swaps linears
and convolutions. ``qtrain.lowp`` re-exports what is public here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import im2col, kernels
from qtrain.api import FilterFn, register_handler
from qtrain.lowp import (
    Float8TrainingConfig,
    Int8TrainingConfig,
    LowPrecisionConfig,
    LowPrecisionLinear,
    _compute_dtype,
    _LowPrecisionLayer,
    _matrix_backward,
    _Plan,
    _product,
    _save_for_backward,
    initial_bounds,
)


class _LowPrecisionConv2d(torch.autograd.Function):
    """A 2-D convolution as matrix products on im2col(x) (rows: output pixels) and W (rows:
    output channels), per group, each product as the plan says; returns the (B·H'·W', C_out)
    matrix. It keeps x, not its k²-times larger im2col matrix, and unfolds again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, bounds, geometry):  # type: ignore[override]
        compute_dtype = _compute_dtype(x)
        fused = im2col.fused_unfolding(x, geometry)
        cols = im2col.im2col(x, geometry, fused)
        w2 = im2col.weight_rows(weight, fused)
        col_groups = im2col.group_slices(cols.shape[1], geometry.groups)
        out_groups = im2col.group_slices(w2.shape[0], geometry.groups)
        y = im2col.cat(
            [
                _product(
                    cols[:, c],
                    w2[o],
                    plan.forward,
                    plan,
                    bounds,
                    None,
                    compute_dtype,
                    None if bias is None else bias[o],
                )
                for c, o in zip(col_groups, out_groups, strict=True)
            ],
            dim=1,
        )
        _save_for_backward(ctx, x, weight, bias, plan, bounds, compute_dtype, geometry.groups)
        ctx.geometry = geometry
        ctx.fused_unfolding = fused is not None  # backward unfolds as forward did
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bounds, seeds = ctx.saved_tensors
        geometry: im2col.ConvGeometry = ctx.geometry
        fused = None
        if ctx.fused_unfolding:
            fused = kernels.implementation(x.device, kernels.Backend.CPU_FUSED)
        cols = im2col.im2col(x, geometry, fused)
        w2 = im2col.weight_rows(weight, fused)
        col_groups = im2col.group_slices(cols.shape[1], geometry.groups)
        out_groups = im2col.group_slices(w2.shape[0], geometry.groups)
        grads = [
            _matrix_backward(ctx, grad_out[:, o], cols[:, c], w2[o], bounds, seeds, group)
            for group, (c, o) in enumerate(zip(col_groups, out_groups, strict=True))
        ]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cols = im2col.cat([gx for gx, _ in grads], dim=1)  # type: ignore[misc]
            grad_x = im2col.col2im(grad_cols, x.shape, geometry, fused).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_rows = im2col.cat([gw for _, gw in grads])  # type: ignore[misc]
            grad_w = im2col.weight_grad(grad_rows, weight, fused).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _apply_conv(x, weight, bias, plan: _Plan, bounds: torch.Tensor, geometry) -> torch.Tensor:
    batch, _, height, width = x.shape
    out_height, out_width = geometry.output_size(height, width)
    y = _LowPrecisionConv2d.apply(x, weight, bias, plan, bounds, geometry)
    # (B·H'·W', C_out) read as (B, C_out, H', W'): a channels-last tensor, no copy.
    return y.view(batch, out_height, out_width, -1).permute(0, 3, 1, 2)


def _conv_arguments(conv: nn.Conv2d) -> tuple[Any, ...]:
    """nn.Conv2d's positional arguments (in, out, kernel, stride, padding, dilation, groups,
    bias, padding mode) that build a conv of ``conv``'s shape."""
    return (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )


class LowPrecisionConv2d(_LowPrecisionLayer, nn.Conv2d):
    """``nn.Conv2d`` whose forward, grad-input and grad-weight products are int8 or fp8 GEMMs
    on the im2col matrix; the same parameters and state_dict keys.

    The convolution is the product im2col(x) · Wᵀ, im2col(x) (B·H'·W', C·kh·kw) holding one
    receptive field per row and W reshaped to (C_out, C·kh·kw): so the three products and their
    row-wise scales are ``LowPrecisionLinear``'s — one scale per receptive field and per output
    channel in the forward, per output pixel and per (c, kh, kw) column of W in the grad-input
    product (whose result is folded back onto x's pixels in float32), per output channel and
    per (c, kh, kw) feature in the grad-weight product. Groups run one product set per group;
    non-zero padding modes and ``padding="same"`` pad x first. The output is channels-last in
    memory (the product's rows are pixels). The layer keeps x for backward and unfolds it
    again there: memory as a float conv's, the im2col work twice. 1×1 convolutions with stride
    1 and no padding skip im2col (a view of channels-last x). On the CPU, without groups,
    cpu_fused's channels-last im2col/col2im build the matrix with (kh, kw, c) columns (W's
    rows permuted to match: the same sums, so the same integer products); elsewhere F.unfold
    and F.fold, (c, kh, kw).

    >>> conv = LowPrecisionConv2d(3, 8, 3, padding=1, config=Int8TrainingConfig())
    >>> conv(torch.randn(2, 3, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: LowPrecisionConfig,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._init_precision(config, device)
        # Padding done by F.pad first (a padding mode other than zeros, or "same", which may
        # be uneven); then the products see zero explicit padding.
        self._pre_pad = self.padding_mode != "zeros" or isinstance(self.padding, str)
        self.geometry = im2col.ConvGeometry(
            kernel=tuple(self.kernel_size),  # type: ignore[arg-type]
            stride=tuple(self.stride),  # type: ignore[arg-type]
            padding=(0, 0) if self._pre_pad else tuple(self.padding),  # type: ignore[arg-type]
            dilation=tuple(self.dilation),  # type: ignore[arg-type]
            groups=self.groups,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: LowPrecisionConfig) -> LowPrecisionConv2d:
        """A LowPrecisionConv2d sharing ``conv``'s parameters."""
        layer = cls(*_conv_arguments(conv), device="meta", config=config)
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.bounds = initial_bounds(config, conv.weight.device)
        layer.train(conv.training)
        return layer

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with these parameters."""
        plain = nn.Conv2d(*_conv_arguments(self), device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} takes a batched (B, C, H, W) input, got shape "
                f"{list(x.shape)}"
            )
        if self._pre_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        return _apply_conv(x, self.weight, self.bias, self.plan, self.bounds.float(), self.geometry)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._bits_repr()}"


LOW_PRECISION_LAYERS = (LowPrecisionLinear, LowPrecisionConv2d)


@register_handler(Int8TrainingConfig)
@register_handler(Float8TrainingConfig)
def _swap_layers(
    model: nn.Module, config: LowPrecisionConfig, filter_fn: FilterFn | None
) -> nn.Module:
    """Replace every plain ``nn.Linear`` and ``nn.Conv2d`` (not subclasses; convolutions only
    with ``config.convolutions``) that ``filter_fn`` accepts."""
    swaps = {nn.Linear: LowPrecisionLinear.from_linear}
    if config.convolutions:
        swaps[nn.Conv2d] = LowPrecisionConv2d.from_conv
    for name, module in list(model.named_modules()):
        swap = swaps.get(type(module))  # type: ignore[call-overload]
        if not name or swap is None:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swap(module, config))
    return model
