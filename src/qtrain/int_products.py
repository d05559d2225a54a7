"""Exact integer products for ``qtrain.ops``' quantized GEMMs (``GemmConfig.products``).

The emulation (``products="float"``) computes each product of a quantized layer on the
fake-quantized floats: ``F.linear(x̂, ŵ)`` with x̂ = s_x·(q_x − z_x), summed in float32. Where
both operands of a product are integer levels of at most 8 bits whose scale and zero point are
constant along that product's reduction dimension, the product is also

    s_a·s_b·Σ_k (q_a − z_a)(q_b − z_b)

— one integer matrix product and a scale epilogue. The levels of an 8-bit format span at most
255 steps, so they fit int8 once shifted: u = (q − z) − d with d = qmin − z + 128 per row of
scales (d = 0 where q − z already fits int8, as symmetric signed levels do), and

    Σ_k (u_a + d_a)(u_b + d_b) = u_a·u_bᵀ + d_b·Σ_k u_a + d_a·Σ_k u_b + K·d_a·d_b

— an int8 × int8 → int32 product (``torch._int_mm``) and rank-one corrections, every term an
exact integer (the corrections in float64, exact below 2^53). This covers the symmetric
recipes (ui8, daint8) and the affine unsigned ones (sbm8, cpt, pfq, fractrain, dfq) alike.

The twin (``products="int8-twin"``) computes the same integers with a float matmul of the
shifted levels (float32 while K·128² < 2^24, else float64: exact either way), so it equals the
real product bit for bit on any machine. The emulation sums rounded float products instead:
its result differs from both in the last bits (docs/RECIPES.md, "int8 products").

Which products qualify is decided per call (a schedule may raise an operand past 8 bits):
``product_roles`` tells for a layer config. Operands at more than 8 bits (sbm8's 16-bit
grad-weight copy of g), minifloats, per-input-channel scales of W in the grad-input product
(CPT's per-output-channel weights: the scale runs along that product's reduction), learned
steps, ``nonfinite="propagate"`` specs, autocast and non-float32 tensors keep the float
product.

>>> import torch
>>> from qtrain import QuantSpec, formats
>>> from qtrain.ops import GemmConfig, quantized_linear
>>> spec = QuantSpec(formats.Int(8))
>>> config = GemmConfig(spec, spec, spec, spec, products="int8-twin")
>>> sorted(product_roles(config, conv=False))
['forward', 'grad_input', 'grad_weight']
>>> quantized_linear(torch.randn(4, 16), torch.randn(3, 16), None, config).shape
torch.Size([4, 3])
"""

from __future__ import annotations

import dataclasses

import torch

from qtrain import lowp
from qtrain.formats import Int
from qtrain.quantizer import PerChannel, PerTensor, QParams, QuantSpec
from qtrain.quantspec import LearnedStep

# The twin's float32 matmul is exact while K·128² < 2^24 (shifted levels lie in [−128, 127]).
_EXACT_FLOAT32_DEPTH = 2**24 // 128**2


def real_route(products: str, device: torch.device) -> bool | None:
    """How ``products`` runs on ``device``: True for ``torch._int_mm``, False for the twin,
    None for the float emulation. ``int8`` picks the real product on CUDA and on CPUs with
    int8 dot-product units (AMX, VNNI), where it is fast; the twin elsewhere."""
    if products == "float":
        return None
    if products == "int8":
        return device.type == "cuda" or lowp.cpu_has_int8_dot()
    return products == "int8-real"


def _operand_ok(spec: QuantSpec | None) -> bool:
    """An integer spec of at most 8 bits whose levels and qparams are finite by construction."""
    return (
        spec is not None
        and isinstance(spec.format, Int)
        and spec.format.bits <= 8
        and spec.nonfinite == "error"
        and not isinstance(spec.scale, LearnedStep)
    )


def _rows_ok(spec: QuantSpec, row_axis: int | None) -> bool:
    """Whether the spec's scales are constant along the reduction: one per tensor, or one per
    index of ``row_axis`` (the operand's axis that indexes the product's rows or columns)."""
    granularity = spec.granularity
    if isinstance(granularity, PerTensor):
        return True
    return (
        isinstance(granularity, PerChannel)
        and row_axis is not None
        and (granularity.axis == row_axis)
    )


def product_roles(config, conv: bool, grad_dim: int | None = None) -> set[str]:
    """The products of a layer with ``config`` (a ``GemmConfig``) that run as integer products.

    Rows of each product (the axis a per-channel scale may follow): forward — W's output
    channels (axis 0); grad-input — none of g's or W's axes (both reduce over the output
    channels); grad-weight — g's output channels (axis 1 of a (N, C_out, ...) gradient:
    ``grad_dim`` is its number of dimensions, 4 for a convolution, 2 for a linear on
    matrices), while x is reduced over its samples and must be per tensor."""
    if config.products == "float":
        return set()
    x, w, g_in, g_w = (
        config.input_spec,
        config.weight_spec,
        config.grad_input_spec,
        config.grad_weight_spec,
    )
    g_axis = 1 if grad_dim == (4 if conv else 2) else None
    roles = set()
    if _operand_ok(x) and _operand_ok(w) and _rows_ok(x, None) and _rows_ok(w, 0):
        roles.add("forward")
    if _operand_ok(g_in) and _operand_ok(w) and _rows_ok(g_in, None) and _rows_ok(w, None):
        roles.add("grad_input")
    if _operand_ok(g_w) and _operand_ok(x) and _rows_ok(g_w, g_axis) and _rows_ok(x, None):
        roles.add("grad_weight")
    return roles


@dataclasses.dataclass
class IntegerValues:
    """An operand's q − z as float32 integers (any shape), with the scale, zero point and
    format to read rows of it: value ≈ scale·(q − z)."""

    values: torch.Tensor
    scale: torch.Tensor  # (C,) or (1,)
    zero_point: torch.Tensor
    format: Int


def integer_values(t: torch.Tensor, qparams: QParams, spec: QuantSpec) -> IntegerValues:
    """q − z of a fake-quantized tensor t = (q − z)·s, read back exactly: t/s is within a few
    ulps of an integer of at most 255 in magnitude. Per-channel qparams follow the spec's axis."""
    scale = qparams.scale.to(torch.float32)
    if scale.numel() == 1:
        view = scale.reshape(())
    else:
        axis = spec.granularity.axis % t.dim()
        view = scale.view([-1 if d == axis else 1 for d in range(t.dim())])
    values = torch.round(t.to(torch.float32) / view)
    return IntegerValues(values, scale.reshape(-1), qparams.zero_point.reshape(-1), spec.format)


def offsets(operand: IntegerValues) -> torch.Tensor | None:
    """d per scale (float64): the shift that brings q − z into int8; None where all are 0."""
    fmt = operand.format
    low = fmt.qmin - operand.zero_point.to(torch.float64)
    high = fmt.qmax - operand.zero_point.to(torch.float64)
    fits = (low >= -128) & (high <= 127)
    if bool(fits.all()):
        return None
    return torch.where(fits, 0.0, low + 128)


def exact_product(
    a: torch.Tensor,
    a_offset: torch.Tensor | None,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_offset: torch.Tensor | None,
    b_scale: torch.Tensor,
    real: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 (a·bᵀ)·a_scale[:, None]·b_scale[None, :] (+ bias) for a (M, K), b (N, K) of
    integer values q − z, each product term exact: a − a_offset[:, None] and b − b_offset
    as int8, multiplied by ``torch._int_mm`` (``real``) or an exact float matmul (the twin),
    then the rank-one corrections of the offsets (scalars or per row; None: zero)."""
    k = a.shape[1]
    ua = a if a_offset is None else a - _column(a_offset, a.dtype)
    ub = b if b_offset is None else b - _column(b_offset, b.dtype)
    if real:
        acc = _int_mm(ua.to(torch.int8), ub.to(torch.int8))
    else:
        dtype = torch.float32 if k <= _EXACT_FLOAT32_DEPTH else torch.float64
        acc = ua.to(dtype) @ ub.to(dtype).t()
    if a_offset is not None or b_offset is not None:
        acc = acc.to(torch.float64)
        if b_offset is not None:
            acc += ua.sum(1, dtype=torch.float64).view(-1, 1) * b_offset.view(1, -1)
        if a_offset is not None:
            acc += a_offset.view(-1, 1) * ub.sum(1, dtype=torch.float64).view(1, -1)
        if a_offset is not None and b_offset is not None:
            acc += k * a_offset.view(-1, 1) * b_offset.view(1, -1)
    return lowp._epilogue(acc, a_scale, b_scale, bias, torch.float32, overwrite=True)


def _column(offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return offset.to(dtype).view(-1, 1)


def _int_mm(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """qa · qbᵀ in int32 by ``torch._int_mm``, zero-padded to the shapes it takes."""
    (m, k), n = qa.shape, qb.shape[0]
    padded_k = lowp._round_up(k)
    qa = lowp._pad(qa.contiguous(), max(m, lowp._INT_MM_MIN_ROWS), padded_k)
    qb = lowp._pad(qb.contiguous(), lowp._round_up(n), padded_k)
    return torch._int_mm(qa, qb.t())[:m, :n]


# ---- the three products of a linear layer and of a convolution --------------------------------


def _matrix(operand: IntegerValues, rows: torch.Tensor) -> tuple:
    """(values, offsets, scales) of a product operand whose values are ``rows``."""
    return rows, offsets(operand), operand.scale


def linear_forward(x, w, bias, real: bool) -> torch.Tensor:
    """y = x̂·ŵᵀ + b for ``IntegerValues`` x (..., in) and w (out, in)."""
    x2 = x.values.reshape(-1, x.values.shape[-1])
    y = exact_product(*_matrix(x, x2), *_matrix(w, w.values), real, bias)
    return y if x.values.dim() == 2 else y.reshape(*x.values.shape[:-1], -1)


def linear_grad_input(g, w, real: bool) -> torch.Tensor:
    """ĝ·ŵ for g (..., out): the gradient of the layer input (as g's leading shape)."""
    g2 = g.values.reshape(-1, g.values.shape[-1])
    grad = exact_product(*_matrix(g, g2), *_matrix(w, w.values.t()), real)
    return grad.reshape(*g.values.shape[:-1], -1)


def linear_grad_weight(g, x, real: bool) -> torch.Tensor:
    """ĝᵀ·x̂: the gradient of W (out, in)."""
    g2 = g.values.reshape(-1, g.values.shape[-1]).t()
    x2 = x.values.reshape(-1, x.values.shape[-1]).t()
    return exact_product(*_matrix(g, g2), *_matrix(x, x2), real)


def _geometry(weight: torch.Tensor, conv_args) -> lowp._ConvGeometry:
    stride, padding, dilation, groups = conv_args
    return lowp._ConvGeometry(
        tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), groups
    )


def _part(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows of a per-row vector (per-tensor ones, shape (1,), serve every group)."""
    return t if t is None or t.numel() == 1 else t[rows]


def _grad_rows(g: IntegerValues) -> torch.Tensor:
    """g (B, C_out, H', W') as the (B·H'·W', C_out) matrix of the im2col route."""
    return g.values.permute(0, 2, 3, 1).reshape(-1, g.values.shape[1])


def conv_forward(x, w, bias, conv_args, real: bool) -> torch.Tensor:
    """conv2d(x̂, ŵ) + b through x̂'s im2col matrix, per group; a channels-last result."""
    geometry = _geometry(w.values, conv_args)
    batch, _, height, width = x.values.shape
    fused = lowp._fused_unfolding(x.values, geometry)
    cols = lowp._im2col(x.values, geometry, fused)
    w2 = lowp._weight_rows(w.values, fused)
    x_offset, w_offset = offsets(x), offsets(w)
    parts = []
    for c, o in zip(
        lowp._group_slices(cols.shape[1], geometry.groups),
        lowp._group_slices(w2.shape[0], geometry.groups),
        strict=True,
    ):
        parts.append(
            exact_product(
                cols[:, c], x_offset, x.scale, w2[o], _part(w_offset, o), _part(w.scale, o),
                real, None if bias is None else bias[o],
            )
        )  # fmt: skip
    out_height, out_width = geometry.output_size(height, width)
    y = lowp._cat(parts, dim=1)
    return y.view(batch, out_height, out_width, -1).permute(0, 3, 1, 2)


def conv_grad_input(g, w, x_shape, conv_args, real: bool) -> torch.Tensor:
    """The gradient of the convolution's input: ĝ's rows times ŵ's rows, folded back."""
    geometry = _geometry(w.values, conv_args)
    probe = torch.empty(0, dtype=torch.float32, device=g.values.device)
    fused = lowp._fused_unfolding(probe, geometry)
    rows = _grad_rows(g)
    w2 = lowp._weight_rows(w.values, fused)
    g_offset, w_offset = offsets(g), offsets(w)
    parts = [
        exact_product(rows[:, o], g_offset, g.scale, w2[o].t(), w_offset, w.scale, real)
        for o in lowp._group_slices(w2.shape[0], geometry.groups)
    ]
    return lowp._col2im(lowp._cat(parts, dim=1), x_shape, geometry, fused)


def conv_grad_weight(g, x, weight: torch.Tensor, conv_args, real: bool) -> torch.Tensor:
    """The gradient of W: ĝ's rows (transposed) times x̂'s im2col matrix (transposed)."""
    geometry = _geometry(weight, conv_args)
    fused = lowp._fused_unfolding(x.values, geometry)
    cols = lowp._im2col(x.values, geometry, fused)
    rows = _grad_rows(g)
    g_offset, x_offset = offsets(g), offsets(x)
    parts = [
        exact_product(
            rows[:, o].t(), _part(g_offset, o), _part(g.scale, o), cols[:, c].t(), x_offset,
            x.scale, real,
        )
        for c, o in zip(
            lowp._group_slices(cols.shape[1], geometry.groups),
            lowp._group_slices(rows.shape[1], geometry.groups),
            strict=True,
        )
    ]  # fmt: skip
    return lowp._weight_grad(lowp._cat(parts), weight, fused)
