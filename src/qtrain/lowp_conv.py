"""``LowPrecisionConv2d``: a convolution's three products as int8 or fp8 GEMMs on its im2col
matrix (``qtrain.im2col``), with ``qtrain.lowp``'s plan and layer protocol and
``qtrain.lowp_products``' quantization and products; and the ``quantize_`` handler of
``Int8TrainingConfig`` / ``Float8TrainingConfig`` that swaps linears and convolutions.
``qtrain.lowp`` re-exports what is public here.
"""

from __future__ import annotations

import math
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
    _save_for_backward,
    initial_bounds,
)
from qtrain.lowp_products import (
    _EXACT_FLOAT32_DEPTH,
    INT32_DEPTH,
    _hash_keys,
    _product,
    _quantize,
    _scale_from_amax,
    gradient_levels,
    levels_product,
)


class _LowPrecisionConv2d(torch.autograd.Function):
    """A 2-D convolution as matrix products on im2col(x) (rows: output pixels) and W (rows:
    output channels), per group, each product as the plan says; returns the (B·H'·W', C_out)
    matrix. It keeps x, not its k²-times larger im2col matrix, and unfolds again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, bounds, geometry):  # type: ignore[override]
        compute_dtype = _compute_dtype(x)
        ctx.int8_rows = _int8_rows(x, weight, plan, geometry)
        if ctx.int8_rows is not None:
            y, ctx.column_amax = _forward_int8_rows(
                ctx.int8_rows, x, weight, bias, plan, bounds, geometry, compute_dtype,
                ctx.needs_input_grad[1],
            )  # fmt: skip
            _save_for_backward(ctx, x, weight, bias, plan, bounds, compute_dtype)
            ctx.geometry, ctx.fused_unfolding = geometry, True
            return y.to(compute_dtype)
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
        if ctx.int8_rows is not None:
            return _backward_int8_rows(ctx, grad_out, x, weight, bounds, seeds)
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


# ---- the CPU's int8 route: im2col rows quantized in cache, products in pieces -----------------

# The pieces of the chunked products: about this many bytes of a piece's int8 operand rows and
# int32 product (forward, grad-input), so that a piece stays in cache between its product and
# its epilogue, and no product allocates fresh pages (their faults cost as much as the
# product); grad-weight sums its pieces' (C_out, kh·kw·C) products, so its pieces are deeper.
_PIECE_BYTES = 4 << 20
_DEPTH_PIECE_BYTES = 32 << 20
# Receptive fields of at most this many values (a first layer's 9 or 27) run the forward and
# grad-weight products in one pass each of cpu_fused's, whose exact integer dot products
# replace torch._int_mm there: it runs so short a reduction at a fraction of its speed (K = 9:
# 35 GMAC/s in a ResNet-9 step), and the int8 matrices between were more passes.
_SHORT_ROWS = 32


def _int8_rows(x: torch.Tensor, weight: torch.Tensor, plan: _Plan, geometry):
    """cpu_fused, where the int8 route on quantized im2col rows serves: a CPU x in float32,
    bfloat16 or float16 (autocast's activations: converted to float32 once), no groups, not
    pointwise, every product int8 with row-wise scales, the kernels built; else None (the
    im2col matrix in float, then ``_product``)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if geometry.groups != 1 or geometry.pointwise() or not x.numel() or not weight.numel():
        return None
    fused = kernels.implementation(x.device)
    if not hasattr(fused, "im2col_int8") or not plan.rowwise:
        return None
    products = (plan.forward, plan.grad_input, plan.grad_weight)
    if any(operands is None or operands[0].dtype != torch.int8 for operands in products):
        return None
    return fused


def _rows_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: float32 or bfloat16 (widened exactly in the kernel), channels-
    last; converted once per call, not once per piece (im2col_int8 converts what it gets)."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.float32)
    return x.contiguous(memory_format=torch.channels_last)


def _product_buffer(pieces: list[slice], columns: int, plan: _Plan, device) -> torch.Tensor | None:
    """One int32 buffer for the pieces' products (the largest piece's rows), so that a loop of
    pieces allocates once; None for the twin (float products) and for a single piece."""
    if plan.emulate or len(pieces) < 2:
        return None
    rows = max(piece.stop - piece.start for piece in pieces)
    return torch.empty(rows, columns, dtype=torch.int32, device=device)


def _rows_of(buffer: torch.Tensor | None, piece: slice) -> torch.Tensor | None:
    return None if buffer is None else buffer[: piece.stop - piece.start]


def _forward_int8_rows(
    fused, x, weight, bias, plan: _Plan, bounds, geometry, compute_dtype, column_amax: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (B·H'·W', C_out): per piece of rows, their im2col levels with a scale per row
    (built in cache, never as a float matrix), the exact product with W's levels, the
    epilogue into y's rows. Bitwise the im2col route's result. With ``column_amax``, also the
    im2col matrix's column absmax (float32 bits in int32) from the same rows: grad-weight's
    scales of x, without reading x again in backward."""
    left, right = plan.forward
    x = _rows_input(x)
    w2 = im2col.weight_rows(weight, fused)
    qw, scale_w = _quantize(w2, right, bounds[right.bound], None, plan)
    batch, _, height, width = x.shape
    rows, cols = batch * math.prod(geometry.output_size(height, width)), qw.shape[1]
    # Written in the compute dtype: float32, or bfloat16 under autocast (rounded from float32,
    # as .to() rounds); others (float16) converted by the caller.
    out_dtype = compute_dtype if compute_dtype == torch.bfloat16 else torch.float32
    y = fused.empty_cached(x, [rows, qw.shape[0]], out_dtype)  # filled by the kernels
    bias32 = None if bias is None else bias.to(torch.float32)
    if cols <= _SHORT_ROWS and not plan.emulate:  # one pass: levels, products, epilogue
        amax = fused.im2col_int8_product(
            x, *geometry.args(), bound=bounds[left.bound], weight_levels=qw,
            weight_scale=scale_w, bias=bias32, column_amax=column_amax, out=y,
        )  # fmt: skip
        return y, amax
    # int8 levels in, int32 out
    pieces = im2col.pieces(rows, 1, cols + 4 * qw.shape[0], _PIECE_BYTES)
    buffer = _product_buffer(pieces, qw.shape[0], plan, x.device)
    amax = None
    for piece in pieces:
        qx, scale_x, piece_amax = fused.im2col_int8(
            x, *geometry.args(), rows=(piece.start, piece.stop), bound=bounds[left.bound],
            column_amax=column_amax,
        )  # fmt: skip
        if column_amax:  # bit patterns of non-negative floats: ordered as the floats
            amax = piece_amax if amax is None else torch.maximum(amax, piece_amax)
        acc = levels_product(qx, qw, plan.emulate, _rows_of(buffer, piece))
        fused.int8_epilogue(acc, scale_x, scale_w, bias32, out=y[piece])
    return y, amax


def _backward_int8_rows(ctx, grad_out, x, weight, bounds, seeds):
    """The gradients of x, W and the bias on the int8 route: g's levels per output pixel
    times W's per (i, j, c) column, scaled and folded back onto x's pixels a piece of images at
    a time (grad-input); g's levels per output channel times x's im2col levels per column,
    built a piece of rows at a time (short rows: in one pass) and summed exactly (grad-weight).
    g's two sets of levels come from one kernel where neither rounds stochastically."""
    fused, plan, geometry = ctx.int8_rows, ctx.plan, ctx.geometry
    g2 = grad_out.to(torch.float32)
    w2 = im2col.weight_rows(weight, fused)
    grad_x = grad_w = grad_b = None
    both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1]
    g_levels = gradient_levels(g2, plan, bounds, both, seeds is not None)  # one kernel, or None
    if ctx.needs_input_grad[0]:
        left, right = plan.grad_input
        if g_levels is not None:
            qg, scale_g = g_levels[:2]
        else:
            keys = _hash_keys(seeds[0, 0]) if seeds is not None else None
            qg, scale_g = _quantize(g2, left, bounds[left.bound], keys, plan)
        qw, scale_w = _quantize(w2.t(), right, bounds[right.bound], None, plan)
        batch, channels, height, width = x.shape  # channels-last, filled image by image
        grad_x = fused.empty_cached(x, [batch, height, width, channels], torch.float32)
        grad_x = grad_x.permute(0, 3, 1, 2)
        per_image = qg.shape[0] // x.shape[0]
        image_bytes = per_image * (qg.shape[1] + 4 * qw.shape[0])  # int8 g rows in, int32 out
        pieces = im2col.pieces(qg.shape[0], per_image, image_bytes, _PIECE_BYTES)
        buffer = _product_buffer(pieces, qw.shape[0], plan, x.device)
        for piece in pieces:
            acc = levels_product(qg[piece], qw, plan.emulate, _rows_of(buffer, piece))
            fused.col2im_int8_epilogue(
                acc, scale_g[piece], scale_w, grad_x, *geometry.args(),
                image_begin=piece.start // per_image,
            )  # fmt: skip
        grad_x = grad_x.to(x.dtype)
    if ctx.needs_input_grad[1]:
        left, right = plan.grad_weight
        if g_levels is not None:
            qg_t, scale_g = g_levels[2:]
        else:
            keys = _hash_keys(seeds[1, 0]) if seeds is not None else None
            qg_t, scale_g = _quantize(g2.t(), left, bounds[left.bound], keys, plan)
        args, x_rows = geometry.args(), _rows_input(x)
        # x's column scales from the forward's rows' absmax (bitwise those of
        # quantize_rows_int8(im2col(x)ᵀ))
        scale_cols = _scale_from_amax(ctx.column_amax.view(torch.float32), bounds[right.bound])
        cols = w2.shape[1]
        if cols <= _SHORT_ROWS and not plan.emulate:  # one pass, the int64 sums exact
            acc = fused.im2col_int8_grad_weight(
                x_rows, *args, bound=bounds[right.bound], column_scale=scale_cols,
                g_levels=qg_t,
            )  # fmt: skip
        else:
            acc = _grad_weight_acc(fused, x_rows, args, qg_t, scale_cols, bounds[right.bound], plan)
        grad_rows = fused.int8_epilogue(acc, scale_g, scale_cols)
        grad_w = im2col.weight_grad(grad_rows, weight, fused).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
    return grad_x, grad_w, grad_b, None, None, None


def _grad_weight_acc(fused, x_rows, args, qg_t, scale_cols, bound, plan: _Plan) -> torch.Tensor:
    """gᵀ's levels times x's im2col levels (a scale per column), the im2col rows built a depth
    piece at a time: each piece's product exact — int32 (real), float32 (the twin) — and their
    sum in int32 while the whole depth fits it, else in int64 (the twin: float64)."""
    acc, depth, cols = None, qg_t.shape[1], scale_cols.numel()
    if plan.emulate:
        most, sum_dtype = _EXACT_FLOAT32_DEPTH, torch.float64
    else:
        most, sum_dtype = INT32_DEPTH, torch.int32 if depth <= INT32_DEPTH else torch.int64
    for piece in im2col.pieces(depth, 1, cols, _DEPTH_PIECE_BYTES, most):
        qx, _ = fused.im2col_int8(
            x_rows, *args, rows=(piece.start, piece.stop), bound=bound, column_scale=scale_cols
        )
        part = levels_product(qg_t[:, piece], qx.t(), plan.emulate).to(sum_dtype)
        acc = part if acc is None else acc.add_(part)
    return acc


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
