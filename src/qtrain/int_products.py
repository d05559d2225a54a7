"""Exact integer products for ``qtrain.ops``' quantized GEMMs (``GemmConfig.products``).

The emulation (``products="float"``) computes each product of a quantized layer on the
fake-quantized floats: ``F.linear(x̂, ŵ)`` with x̂ = s_x·(q_x − z_x), summed in float32. Where
both operands of a product are integer levels whose scale and zero point are constant along that
product's reduction dimension, the product is also

    s_a·s_b·Σ_k (q_a − z_a)(q_b − z_b)

— integer matrix products and a scale epilogue. The levels of an 8-bit format span at most 255
steps, so they fit int8 once shifted: u = (q − z) − d with d = qmin − z + 128 per scale (d = 0
where q − z already fits int8, as symmetric signed levels do), and

    Σ_k (u_a + d_a)(u_b + d_b) = u_a·u_bᵀ + d_b·Σ_k u_a + d_a·Σ_k u_b + K·d_a·d_b

— an int8 × int8 → int32 product (``torch._int_mm``) and rank-one corrections. Levels of 9 to
16 bits (SBM's 16-bit grad-weight copy of g, DFQ's 12-bit gradients) are shifted into int16 and
split into two int8 limbs, u = 256·h + (l − 128) + 128: their products take two int8 products
(weighted 256 and 1) instead of one. Every term is an exact integer, summed in float64 (exact
below 2^53). This covers the symmetric recipes (ui8, daint8) and the affine unsigned ones
(sbm8, cpt, pfq, fractrain, dfq) alike.

The twin (``products="int8-twin"``) computes the same integers with float matmuls of the limbs
(float32 while K·128² < 2^24, else float64: exact either way), so it equals the real products
bit for bit on any machine. The emulation sums rounded float products instead: its results
differ from both in the last bits.

Which products qualify is decided per call (a schedule may change the bits): ``product_roles``
tells for a layer config. Minifloat operands, scales that run along a product's reduction (CPT's
per-output-channel weights in the grad-input product, per-feature activations), learned steps,
``nonfinite="propagate"`` specs, autocast and tensors that are not float32 keep the float
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

from qtrain import im2col, lowp_products, ops
from qtrain.formats import Int
from qtrain.quantizer import PerChannel, PerTensor, QParams, QuantSpec
from qtrain.quantspec import LearnedStep

# The twin's float32 matmul is exact while K·128² < 2^24 (shifted levels lie in [−128, 127]).
_EXACT_FLOAT32_DEPTH = 2**24 // 128**2
# int32 is exact for two narrow operands while 4·K·255² < 2^31 (the four terms of the shifted
# product, each at most K·255² in magnitude).
_INT32_DEPTH = 2**31 // (4 * 255**2)
# One torch._int_mm of limbs in [−128, 127] is exact in its int32 while K·128² < 2^31; deeper
# products run in pieces of this depth, summed in float64.
_INT_MM_DEPTH = (2**31 - 1) // 128**2


def real_route(products: str, device: torch.device) -> bool | None:
    """How ``products`` runs on ``device``: True for ``torch._int_mm``, False for the twin,
    None for the float emulation. ``int8`` picks the real product on CUDA and on CPUs with
    int8 dot-product units (AMX, VNNI), where it is fast; the twin elsewhere."""
    if products == "float":
        return None
    if products == "int8":
        return device.type == "cuda" or lowp_products.cpu_has_int8_dot()
    return products == "int8-real"


def _operand_ok(spec: QuantSpec | None, learned_step: bool = False) -> bool:
    """An integer spec (at most 16 bits) whose levels and qparams are finite by construction;
    a learned step (LSQ) only where the caller has the step the quantizer used
    (``learned_step``: QAT's forward)."""
    return (
        spec is not None
        and isinstance(spec.format, Int)
        and spec.format.bits <= 16
        and spec.nonfinite == "error"
        and (learned_step or not isinstance(spec.scale, LearnedStep))
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
    ulps of an integer of at most 65535 in magnitude (16 bits). Per-channel qparams follow the
    spec's axis."""
    scale = qparams.scale.to(torch.float32)
    if scale.numel() == 1:
        view = scale.reshape(())
    else:
        axis = spec.granularity.axis % t.dim()
        view = scale.view([-1 if d == axis else 1 for d in range(t.dim())])
    values = (t.to(torch.float32) / view).round_()  # in place: one fresh tensor, not two
    return IntegerValues(values, scale.reshape(-1), qparams.zero_point.reshape(-1), spec.format)


def offsets(operand: IntegerValues) -> torch.Tensor | None:
    """d per scale (float64): the shift that brings q − z into int8 (a format of up to 8 bits)
    or int16 (up to 16 bits: ``wide``); None where all are 0."""
    fmt = operand.format
    half = 2 ** (15 if wide(operand) else 7)
    low = fmt.qmin - operand.zero_point.to(torch.float64)
    high = fmt.qmax - operand.zero_point.to(torch.float64)
    fits = (low >= -half) & (high <= half - 1)
    if bool(fits.all()):
        return None
    return torch.where(fits, 0.0, low + half)


def wide(operand: IntegerValues) -> bool:
    """Levels of 9–16 bits: two int8 limbs per value (``exact_product``)."""
    return operand.format.bits > 8


def _limbs(
    values: torch.Tensor, offset: torch.Tensor | None, is_wide: bool
) -> tuple[list[tuple[torch.Tensor, float]], torch.Tensor | None]:
    """values − offset as int8-valued limbs with their weights, and the total offset D with
    values = Σ weight·limb + D. A wide u ∈ [−2^15, 2^15) is 256·h + (l − 128) + 128 with
    h = ⌊u/256⌋ ∈ [−128, 127] and l − 128 ∈ [−128, 127]. int8 ``values`` of a narrow operand
    are u already (``_shifted``)."""
    if values.dtype == torch.int8:
        return [(values, 1.0)], offset
    u = values if offset is None else values - _column(offset, values.dtype)
    if not is_wide:
        return [(u, 1.0)], offset
    high = torch.floor(u * (1.0 / 256))  # exact: |u| < 2^15, a power-of-two scale
    low = u - 256 * high - 128
    total = torch.full((1,), 128.0, dtype=torch.float64, device=u.device)
    return [(high, 256.0), (low, 1.0)], total if offset is None else offset + 128


def exact_product(
    a: torch.Tensor,
    a_offset: torch.Tensor | None,
    a_scale: torch.Tensor,
    a_wide: bool,
    b: torch.Tensor,
    b_offset: torch.Tensor | None,
    b_scale: torch.Tensor,
    b_wide: bool,
    real: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 (a·bᵀ)·a_scale[:, None]·b_scale[None, :] (+ bias) for a (M, K), b (N, K) of
    integer values q − z: ``exact_acc``'s integers, then the scale epilogue."""
    acc = exact_acc(a, a_offset, a_wide, b, b_offset, b_wide, real)
    return lowp_products._epilogue(acc, a_scale, b_scale, bias, torch.float32, overwrite=True)


def exact_acc(
    a: torch.Tensor,
    a_offset: torch.Tensor | None,
    a_wide: bool,
    b: torch.Tensor,
    b_offset: torch.Tensor | None,
    b_wide: bool,
    real: bool,
) -> torch.Tensor:
    """a·bᵀ for a (M, K), b (N, K) of integer values q − z, exact (int32 where it holds every
    partial sum, else float64): each operand less its offset (scalar or per row; None: zero)
    as int8 limbs (one, or two for a wide operand), multiplied by ``torch._int_mm`` (``real``)
    or an exact float matmul (the twin), then the weighted sum and the rank-one corrections of
    the offsets (exact below 2^53). The operand with fewer rows has its limbs stacked into one
    matrix, with a row of ones where the other's offset correction needs the other's sums
    (Σ_k): one product per limb of the other operand gives every term. Linear in the
    reduction: the accs of pieces of K sum to the whole one."""
    k = a.shape[1]
    a_limbs, a_total = _limbs(a, a_offset, a_wide)
    b_limbs, b_total = _limbs(b, b_offset, b_wide)
    if real:  # int8 once per limb, not once per product it enters (a wide operand: two)
        a_limbs = [(limb.to(torch.int8), weight) for limb, weight in a_limbs]
        b_limbs = [(limb.to(torch.int8), weight) for limb, weight in b_limbs]
    # int32 holds every partial sum of two 8-bit operands' terms (|q − z| ≤ 255) up to this K.
    dtype = torch.int32 if not (a_wide or b_wide) and k <= _INT32_DEPTH else torch.float64
    swap = b.shape[0] < a.shape[0]  # stack b's limbs (the result's columns), else a's
    small, small_total = (b_limbs, b_total) if swap else (a_limbs, a_total)
    big, big_total = (a_limbs, a_total) if swap else (b_limbs, b_total)
    rows = small[0][0].shape[0]
    parts = [limb for limb, _ in small]
    if small_total is not None:  # the big operand's sums, for the small one's offsets
        parts.append(torch.ones(1, k, dtype=parts[0].dtype, device=parts[0].device))
    stack = parts[0] if len(parts) == 1 else torch.cat(parts)

    def block(product: torch.Tensor, index: int) -> torch.Tensor:  # rows/columns of one part
        part = slice(index * rows, (index + 1) * rows)
        return product[:, part] if swap else product[part]

    acc = big_sums = None
    for limb, big_weight in big:
        product = (
            _integer_matmul(limb, stack, real, dtype)
            if swap
            else _integer_matmul(stack, limb, real, dtype)
        )
        if len(small) == 1 and len(big) == 1 and big_weight * small[0][1] == 1:
            acc = block(product, 0)  # one plain product: the result (or a view of it)
        else:
            for index, (_, small_weight) in enumerate(small):
                weight = int(big_weight * small_weight)
                term = block(product, index)
                acc = term * weight if acc is None else acc.add_(term, alpha=weight)
        if small_total is not None:
            sums = block(product, len(small)).reshape(-1) * int(big_weight)
            big_sums = sums if big_sums is None else big_sums.add_(sums)
    small_sums = None
    if big_total is not None:
        small_sums = sum(
            int(weight) * stack[index * rows : (index + 1) * rows].sum(1, dtype=dtype)
            for index, (_, weight) in enumerate(small)
        )
    # Σ_k of each operand's rows, as far as the offsets' terms need them; then the rank-one
    # terms a_total ⊗ (Σ_k b + K·b_total) and Σ_k a ⊗ b_total, added in place.
    sum_a, sum_b = (big_sums, small_sums) if swap else (small_sums, big_sums)
    m, n = acc.shape
    if a_total is not None:
        row = sum_b if b_total is None else sum_b + k * _vector(b_total, n, dtype)
        acc.addr_(_vector(a_total, m, dtype), row)
    if b_total is not None:
        acc.addr_(sum_a, _vector(b_total, n, dtype))
    return acc


def _vector(total: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """An offset per row (or one for all) as a vector of ``size`` (materialised: addr_ with a
    stride-0 vector along the rows runs ~5× slower)."""
    return total.to(dtype).reshape(-1).expand(size).contiguous()


def _integer_matmul(a: torch.Tensor, b: torch.Tensor, real: bool, dtype) -> torch.Tensor:
    """a·bᵀ of int8-valued operands, exact, in ``dtype`` (int32 or float64): ``torch._int_mm``
    (int32, exact while K·128² < 2^31), or float32 matmuls (exact while K·128² < 2^24), over
    slices of K summed in float64 where K is deeper."""
    k = a.shape[1]
    depth = _INT_MM_DEPTH if real else _EXACT_FLOAT32_DEPTH
    acc = None
    for start in range(0, k, depth) if k > depth else [0]:
        part = slice(start, start + depth)
        if real:
            product = lowp_products._int_mm(a[:, part].to(torch.int8), b[:, part].to(torch.int8))
        else:
            product = a[:, part].to(torch.float32) @ b[:, part].to(torch.float32).t()
        if k <= depth:
            return product.to(dtype)
        acc = product.double() if acc is None else acc.add_(product)
    return acc.to(dtype)


def _column(offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return offset.to(dtype).view(-1, 1)


def _shifted(values: torch.Tensor, offset: torch.Tensor | None, dim: int) -> torch.Tensor:
    """A narrow operand's values less its offsets (one, or one per index of ``dim``) as int8:
    the limb ``_limbs`` would make of each piece, made once for the whole operand — the
    convolutions' kernels then move 1-byte levels instead of 4-byte floats."""
    if offset is not None:
        view = [-1 if d == dim % values.dim() else 1 for d in range(values.dim())]
        values = values - offset.to(values.dtype).view(view if offset.numel() > 1 else [])
    return values.to(torch.int8)


def _pad_value(offset: torch.Tensor | None) -> int:
    """The shifted zero −d that the padding of an im2col matrix of shifted levels reads."""
    return 0 if offset is None else -int(offset.item())


# ---- the three products of a linear layer and of a convolution --------------------------------


def _matrix(operand: IntegerValues, rows: torch.Tensor) -> tuple:
    """``exact_product``'s (values, offsets, scales, wide) of an operand whose values are
    ``rows``."""
    return rows, offsets(operand), operand.scale, wide(operand)


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


def _geometry(weight: torch.Tensor, conv_args) -> im2col.ConvGeometry:
    stride, padding, dilation, groups = conv_args
    return im2col.ConvGeometry(
        tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), groups
    )


def _part(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows of a per-row vector (per-tensor ones, shape (1,), serve every group)."""
    return t if t is None or t.numel() == 1 else t[rows]


def _grad_rows(g: IntegerValues) -> torch.Tensor:
    """g (B, C_out, H', W') as the (B·H'·W', C_out) matrix of the im2col route."""
    return g.values.permute(0, 2, 3, 1).reshape(-1, g.values.shape[1])


# Convolutions without groups on the CPU (cpu_fused's channels-last im2col) run each product in
# pieces — rows of the im2col matrix (forward), whole images (grad-input), depth (grad-weight)
# — so that a piece's float values, int8 limbs and products stay in cache and no product
# allocates fresh pages; the same integers, so the same bits as one product over everything.
_PIECE_BYTES = 4 << 20
_DEPTH_PIECE_BYTES = 32 << 20


def _values_nhwc(
    operand: IntegerValues, offset: torch.Tensor | None
) -> tuple[torch.Tensor, int, int]:
    """An operand's values channels-last, converted once (the kernels read them per piece),
    with the value its im2col's padding reads and the bytes a value: a narrow one's shifted
    int8 levels (``_shifted``), a wide one's float32 values."""
    if wide(operand):
        return operand.values.contiguous(memory_format=torch.channels_last), 0, 4
    levels = _shifted(operand.values.contiguous(memory_format=torch.channels_last), offset, 1)
    return levels, _pad_value(offset), 1


def conv_forward(x, w, bias, conv_args, real: bool) -> torch.Tensor:
    """conv2d(x̂, ŵ) + b through x̂'s im2col matrix, per group; a channels-last result."""
    y = conv_forward_rows(x, w, bias, conv_args, real)
    return _conv_output(y, x.values.shape, w.values, conv_args)


def _conv_output(y: torch.Tensor, x_shape, weight: torch.Tensor, conv_args) -> torch.Tensor:
    """The (B·H'·W', C_out) product matrix read as the (B, C_out, H', W') output: a
    channels-last view."""
    batch, _, height, width = x_shape
    out_height, out_width = _geometry(weight, conv_args).output_size(height, width)
    return y.view(batch, out_height, out_width, -1).permute(0, 3, 1, 2)


def conv_forward_rows(x, w, bias, conv_args, real: bool) -> torch.Tensor:
    """``conv_forward``'s result as the (B·H'·W', C_out) matrix of its im2col product."""
    geometry = _geometry(w.values, conv_args)
    batch, _, height, width = x.values.shape
    out_height, out_width = geometry.output_size(height, width)
    fused = im2col.fused_unfolding(x.values, geometry)
    w2 = im2col.weight_rows(w.values, fused)
    x_offset, w_offset = offsets(x), offsets(w)
    if fused is not None:  # in pieces of rows
        values, pad, value_bytes = _values_nhwc(x, x_offset)
        args = geometry.args()
        rows = batch * out_height * out_width
        y = fused.empty_cached(values, [rows, w2.shape[0]], torch.float32)  # filled by pieces
        row_bytes = value_bytes * w2.shape[1] + 8 * y.shape[1]  # operand, int32 acc, float32 y
        for piece in im2col.pieces(y.shape[0], 1, row_bytes, _PIECE_BYTES):
            cols = fused.im2col_nhwc(values, *args, rows=(piece.start, piece.stop), pad_value=pad)
            y[piece] = exact_product(
                cols, x_offset, x.scale, wide(x), w2, w_offset, w.scale, wide(w), real, bias
            )
        return y
    cols = im2col.im2col(x.values, geometry, fused)
    parts = []
    for c, o in zip(
        im2col.group_slices(cols.shape[1], geometry.groups),
        im2col.group_slices(w2.shape[0], geometry.groups),
        strict=True,
    ):
        parts.append(
            exact_product(
                cols[:, c], x_offset, x.scale, wide(x), w2[o], _part(w_offset, o),
                _part(w.scale, o), wide(w), real, None if bias is None else bias[o],
            )
        )  # fmt: skip
    return im2col.cat(parts, dim=1)


def conv_grad_input(g, w, x_shape, conv_args, real: bool) -> torch.Tensor:
    """The gradient of the convolution's input: ĝ's rows times ŵ's rows, folded back."""
    geometry = _geometry(w.values, conv_args)
    probe = torch.empty(0, dtype=torch.float32, device=g.values.device)
    fused = im2col.fused_unfolding(probe, geometry)
    rows = _grad_rows(g)
    w2 = im2col.weight_rows(w.values, fused)
    g_offset, w_offset = offsets(g), offsets(w)
    if fused is not None and geometry.groups == 1 and not geometry.pointwise():
        batch, channels, height, width = x_shape
        nhwc = [batch, height, width, channels]  # channels-last, filled image by image
        grad_x = fused.empty_cached(rows, nhwc, torch.float32).permute(0, 3, 1, 2)
        per_image = rows.shape[0] // batch
        image_bytes = 4 * per_image * (rows.shape[1] + w2.shape[1])
        for piece in im2col.pieces(rows.shape[0], per_image, image_bytes, _PIECE_BYTES):
            first, last = piece.start // per_image, piece.stop // per_image
            grad_cols = exact_product(
                rows[piece], g_offset, g.scale, wide(g), w2.t(), w_offset, w.scale, wide(w), real
            )
            grad_x[first:last] = im2col.col2im(
                grad_cols, (last - first, channels, height, width), geometry, fused
            )
        return grad_x
    parts = [
        exact_product(
            rows[:, o], g_offset, g.scale, wide(g), w2[o].t(), w_offset, w.scale, wide(w), real
        )
        for o in im2col.group_slices(w2.shape[0], geometry.groups)
    ]
    return im2col.col2im(im2col.cat(parts, dim=1), x_shape, geometry, fused)


def conv_grad_weight(g, x, weight: torch.Tensor, conv_args, real: bool) -> torch.Tensor:
    """The gradient of W: ĝ's rows (transposed) times x̂'s im2col matrix (transposed)."""
    geometry = _geometry(weight, conv_args)
    fused = im2col.fused_unfolding(x.values, geometry)
    rows = _grad_rows(g)
    g_offset, x_offset = offsets(g), offsets(x)
    if fused is not None:  # in pieces of depth, their integers summed exactly in float64
        values, pad, value_bytes = _values_nhwc(x, x_offset)
        if not wide(g):  # g's offsets: one, or one per output channel (rows of the product)
            rows = _shifted(rows, g_offset, 1)
        args = geometry.args()
        columns = im2col.weight_rows(weight, fused).shape[1]
        acc = None
        depth_pieces = im2col.pieces(
            rows.shape[0], 1, value_bytes * columns, _DEPTH_PIECE_BYTES, most=_INT32_DEPTH
        )
        for piece in depth_pieces:
            cols = fused.im2col_nhwc(values, *args, rows=(piece.start, piece.stop), pad_value=pad)
            part = exact_acc(
                rows[piece].t(), g_offset, wide(g), cols.t(), x_offset, wide(x), real
            ).to(torch.float64)
            acc = part if acc is None else acc.add_(part)
        grad_rows = lowp_products._epilogue(
            acc, g.scale, x.scale, None, torch.float32, overwrite=True
        )
        return im2col.weight_grad(grad_rows, weight, fused)
    cols = im2col.im2col(x.values, geometry, fused)
    parts = [
        exact_product(
            rows[:, o].t(), _part(g_offset, o), _part(g.scale, o), wide(g), cols[:, c].t(),
            x_offset, x.scale, wide(x), real,
        )
        for c, o in zip(
            im2col.group_slices(cols.shape[1], geometry.groups),
            im2col.group_slices(rows.shape[1], geometry.groups),
            strict=True,
        )
    ]  # fmt: skip
    return im2col.weight_grad(im2col.cat(parts), weight, fused)


def fake_quant_roles(config) -> set[str]:
    """The products of a QAT layer (``FakeQuantLinear``, ``FakeQuantConv2d``) with ``config``
    that run as integer products: its forward, where ``config.products`` asks for them and
    x's scale (one per tensor: a learned step or a range) and W's (per tensor or per output
    channel) are constant along the reduction; its backward is full precision."""
    if config.products == "float":
        return set()
    x, w = config.input_spec, config.weight_spec
    qualifies = _operand_ok(x, learned_step=True) and _operand_ok(w, learned_step=True)
    return {"forward"} if qualifies and _rows_ok(x, None) and _rows_ok(w, 0) else set()


class _FakeQuantForward(torch.autograd.Function):
    """QAT's forward product x̂·ŵᵀ + b (a convolution: conv2d(x̂, ŵ) + b) as an exact integer
    product of the operands' levels, returned as the product's (rows, out) matrix (the caller
    views it as the output: a Function's own views would refuse in-place ops after it);
    backward as autograd's for F.linear / F.conv2d on the same x̂ and ŵ (full-precision
    gradients, bit for bit the float layer's)."""

    @staticmethod
    def forward(ctx, x_hat, w_hat, bias, x_levels, w_levels, conv_args, real):  # type: ignore[override]
        x = integer_values(x_hat, *x_levels)
        w = integer_values(w_hat, *w_levels)
        bias32 = None if bias is None else bias.to(torch.float32)
        if conv_args is None:
            x.values = x.values.reshape(-1, x.values.shape[-1])
            y = linear_forward(x, w, bias32, real)
        else:
            y = conv_forward_rows(x, w, bias32, conv_args, real)
        ctx.save_for_backward(x_hat, w_hat)
        ctx.conv_args, ctx.has_bias = conv_args, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_hat, w_hat = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        conv_args = ctx.conv_args
        if conv_args is None:
            grad_x, grad_w = ops._linear_grads(
                grad if need_x else None, grad if need_w else None, x_hat, w_hat
            )
            grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        else:
            grad = _conv_output(grad, x_hat.shape, w_hat, conv_args)
            mask = [need_x, need_w, ctx.has_bias and need_b]
            grad_x, grad_w, grad_b = ops._conv_backward(grad, x_hat, w_hat, conv_args, mask)
        return grad_x, grad_w, grad_b, None, None, None, None


def fake_quant_forward(
    config,
    x_hat: torch.Tensor,
    x_levels: tuple[QParams, QuantSpec],
    w_hat: torch.Tensor,
    w_levels: tuple[QParams, QuantSpec],
    bias: torch.Tensor | None,
    conv_args=None,
) -> torch.Tensor | None:
    """QAT's forward product on integer levels (``_FakeQuantForward``), or None where it runs
    on the floats: ``config.products`` float, the operands' specs not qualifying
    (``fake_quant_roles``), autocast, tensors that are not float32, an empty batch.
    ``x_levels``/``w_levels``: the qparams each operand was fake-quantized with and the spec
    (an LSQ step's grid: signed or unsigned) — its levels are read back from x̂ exactly.
    ``conv_args``: (stride, padding, dilation, groups) of a convolution, None for a linear."""
    if not fake_quant_roles(config) or x_levels[0] is None or w_levels[0] is None:
        return None  # (an LSQ step not set yet: no tensor has reached it)
    if x_hat.dtype != torch.float32 or w_hat.dtype != torch.float32 or x_hat.numel() == 0:
        return None
    if torch.is_autocast_enabled(x_hat.device.type):
        return None
    real = bool(real_route(config.products, x_hat.device))
    y = _FakeQuantForward.apply(x_hat, w_hat, bias, x_levels, w_levels, conv_args, real)
    if conv_args is None:
        return y.view(*x_hat.shape[:-1], y.shape[-1])
    return _conv_output(y, x_hat.shape, w_hat, conv_args)


def integer_product_roles(model: torch.nn.Module) -> dict[str, list[str]]:
    """Per quantized layer whose config asks for integer products (``qtrain.ops``' ``QLinear``,
    ``QConv2d``; QAT's ``FakeQuantLinear``, ``FakeQuantConv2d``), the products that qualify at
    its bits in force (for a linear, on 2-d inputs); empty where every product runs on floats.

    >>> from torch import nn
    >>> from qtrain.api import quantize_, use_products
    >>> from qtrain.presets import sbm_quantization
    >>> model = quantize_(nn.Sequential(nn.Linear(4, 3)), sbm_quantization())
    >>> integer_product_roles(model), use_products(model, "int8")
    ({}, 1)
    >>> integer_product_roles(model)
    {'0': ['forward', 'grad_input', 'grad_weight']}
    """
    from qtrain.api import quantized_modules

    roles = {}
    for name, module in quantized_modules(model):
        found = module.integer_roles()
        if found:
            roles[name] = sorted(found)
    return roles


# ---- the route of one call ------------------------------------------------------------------


class IntegerRoute:
    """The products of one call of ``qtrain.ops``' quantized GEMM that run as exact integer
    products, and the qparams their operands were quantized with (``qparams`` by role: the
    op fills it in the forward, and ``ops._gradient_copies`` for the gradient copies)."""

    def __init__(self, config, real: bool, roles: set[str]) -> None:
        self.config = config
        self.real = real
        self.roles = roles
        self.qparams: dict[str, QParams | None] = {}

    @staticmethod
    def of(config, x: torch.Tensor, weight: torch.Tensor, conv_args) -> IntegerRoute | None:
        """The route for a call of ``qtrain.ops``' quantized GEMM with ``config`` (a
        ``GemmConfig``), or None: float products (``products="float"``, autocast, a tensor
        that is not float32, no product whose operands qualify)."""
        if config.products == "float":
            return None
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        grad_dim = x.dim() if conv_args is not None else (2 if x.dim() == 2 else None)
        roles = product_roles(config, conv_args is not None, grad_dim)
        if not roles:
            return None
        return IntegerRoute(config, bool(real_route(config.products, x.device)), roles)

    def operand(self, t: torch.Tensor, role: str, spec: QuantSpec) -> IntegerValues:
        return integer_values(t, self.qparams[role], spec)

    def forward(self, x_q, w_q, bias, conv_args) -> torch.Tensor:
        config = self.config
        x = self.operand(x_q, "input", config.input_spec)
        w = self.operand(w_q, "weight", config.weight_spec)
        bias = None if bias is None else bias.to(torch.float32)
        if conv_args is None:
            return linear_forward(x, w, bias, self.real)
        return conv_forward(x, w, bias, conv_args, self.real)

    def backward(self, g_in, g_w, x_q, w_q, conv_args):
        """(grad of x, grad of W) for the products this route takes; None for the others."""
        config = self.config
        grad_x = grad_w = None
        if g_in is not None and "grad_input" in self.roles:
            g = self.operand(g_in, "grad_input", config.grad_input_spec)
            w = self.operand(w_q, "weight", config.weight_spec)
            if conv_args is None:
                grad_x = linear_grad_input(g, w, self.real)
            else:
                grad_x = conv_grad_input(g, w, x_q.shape, conv_args, self.real)
        if g_w is not None and "grad_weight" in self.roles:
            g = self.operand(g_w, "grad_weight", config.grad_weight_spec)
            x = self.operand(x_q, "input", config.input_spec)
            if conv_args is None:
                grad_w = linear_grad_weight(g, x, self.real)
            else:
                grad_w = conv_grad_weight(g, x, w_q, conv_args, self.real)
        return grad_x, grad_w
