"""``cpu_fused``'s kernels for ``qtrain.lowp``'s products (served by the ``cpu_fused`` module,
which re-exports every name here): a GEMM operand's int8 levels and scales
(``quantize_rows_int8``), a convolution's channels-last im2col matrix and its adjoint
(``im2col_nhwc``, ``col2im_nhwc``), and the int8 convolution route's quantized im2col rows
(``im2col_int8``), fused epilogues (``int8_epilogue``, ``col2im_int8_epilogue``) and cached
outputs (``empty_cached``). The C++ lives in ``csrc/quant.cpp`` beside the quantizer's
kernels (one library); ``register_fakes`` gives torch.compile their shapes.
"""

from __future__ import annotations

import torch


def register_fakes() -> None:
    """Shape-only implementations of this module's ops (called once the library is loaded)."""

    @torch.library.register_fake("qtrain::quantize_rows_int8")
    def _quantize_rows_int8(a, bound, rowwise, keys, levels_dtype=torch.int8):
        scales = a.shape[0] if rowwise else 1
        return a.new_empty(a.shape, dtype=levels_dtype), a.new_empty(scales, dtype=torch.float32)

    @torch.library.register_fake("qtrain::quantize_rows_int8_both")
    def _quantize_rows_int8_both(a, bound_rows, bound_cols):
        rows, cols = a.shape
        return (
            a.new_empty((rows, cols), dtype=torch.int8),
            a.new_empty(rows, dtype=torch.float32),
            a.new_empty((cols, rows), dtype=torch.int8),
            a.new_empty(cols, dtype=torch.float32),
        )

    @torch.library.register_fake("qtrain::im2col_nhwc")
    def _im2col_nhwc(x, kernel, stride, padding, dilation, row_begin=0, row_end=None, pad=0):
        batch, channels, height, width = x.shape
        out_h, out_w = conv_output_size((height, width), kernel, stride, padding, dilation)
        rows = (batch * out_h * out_w if row_end is None else row_end) - row_begin
        return x.new_empty((rows, kernel[0] * kernel[1] * channels))

    @torch.library.register_fake("qtrain::col2im_nhwc")
    def _col2im_nhwc(cols, x_shape, kernel, stride, padding, dilation):
        return cols.new_empty(x_shape, dtype=torch.float32).contiguous(
            memory_format=torch.channels_last
        )

    @torch.library.register_fake("qtrain::im2col_int8")
    def _im2col_int8(
        x, kernel, stride, padding, dilation, row_begin, row_end, bound, column, amax=False
    ):
        batch, channels, height, width = x.shape
        if row_end is None:
            out_h, out_w = conv_output_size((height, width), kernel, stride, padding, dilation)
            row_end = batch * out_h * out_w
        rows, cols = row_end - row_begin, kernel[0] * kernel[1] * channels
        scales = cols if column is not None else rows
        levels = x.new_empty((rows, cols), dtype=torch.int8)
        amax_bits = x.new_empty(cols if amax else 0, dtype=torch.int32)
        return levels, x.new_empty(scales, dtype=torch.float32), amax_bits

    @torch.library.register_fake("qtrain::empty_cached")
    def _empty_cached(like, sizes, dtype):
        return like.new_empty(sizes, dtype=dtype)

    @torch.library.register_fake("qtrain::int8_epilogue")
    def _int8_epilogue(acc, scale_a, scale_b, bias):
        return acc.new_empty(acc.shape, dtype=torch.float32)

    @torch.library.register_fake("qtrain::im2col_int8_product")
    def _im2col_int8_product(x, kernel, stride, padding, dilation, *args_and_out):
        channels, amax = x.shape[1], args_and_out[-2]
        return x.new_empty(kernel[0] * kernel[1] * channels if amax else 0, dtype=torch.int32)

    @torch.library.register_fake("qtrain::im2col_int8_grad_weight")
    def _im2col_int8_grad_weight(x, kernel, stride, padding, dilation, *args):
        channels, g_levels = x.shape[1], args[-1]
        return x.new_empty((g_levels.shape[0], kernel[0] * kernel[1] * channels), dtype=torch.int64)

    @torch.library.register_fake("qtrain::int8_epilogue_out")
    def _int8_epilogue_out(acc, scale_a, scale_b, bias, out) -> None:
        return None

    @torch.library.register_fake("qtrain::col2im_int8_epilogue")
    def _col2im_int8_epilogue(acc, scale_a, scale_b, grad_x, *geometry) -> None:
        return None


# ---- qtrain.lowp's GEMM operands ---------------------------------------------------------------


def quantize_rows_int8(
    a: torch.Tensor,
    bound: torch.Tensor,
    rowwise: bool,
    keys: torch.Tensor | None = None,
    levels_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qtrain.lowp_products._quantize_twin(a, torch.int8, bound, keys, rowwise)`` in one
    fused pass (two where the amax must be known first): bit-identical levels and scales. A row
    holding a NaN has a NaN scale and levels 0 there too; the NaN's bits may differ (torch's
    depend on its reduction path).

    ``levels_dtype=torch.float32`` writes the same levels as float32 values (exact integers in
    [−bound, bound], +0 for 0), bit-identical to the int8 levels ``.to(torch.float32)`` with the
    same scales, for the emulated product: torch's int8 → float32 conversion of a large operand
    takes longer than this whole pass.

    ``a``: a 2-D float32, bfloat16 or float16 CPU tensor (converted to float32 first); a
    contiguous matrix or the transpose of one is read in place, other strides are copied to
    contiguous. ``bound``: a tensor of one value in [1, 127] (2^(bits−1) − 1). ``keys``: None
    for round-to-nearest-even, else lowp_products' ``_hash_keys`` (two int64) for stochastic
    rounding with the uniform of each level's flat row-major index. Returns the row-major int8
    levels (R, K) and the float32 scales, (R,) when ``rowwise`` else (1,); an empty ``a`` gives
    scale 1.

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> a = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    >>> q, scale = fused.quantize_rows_int8(a.t().contiguous().t(), torch.tensor(127.0), True)
    >>> q.tolist(), scale.tolist()
    ([[64, -127], [127, 0]], [0.007874015718698502, 0.015748031437397003])
    """
    return torch.ops.qtrain.quantize_rows_int8(a, bound, rowwise, keys, levels_dtype)


# ---- qtrain.lowp's convolutions: im2col and its adjoint ------------------------------------------

IntPair = int | tuple[int, int]


def _pair(value: IntPair) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _geometry(kernel: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair):
    """The four int[2] arguments of the conv kernels, from ints or pairs."""
    return _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)


def conv_output_size(
    size: tuple[int, int], kernel: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair
) -> tuple[int, int]:
    """(H', W') of a convolution of an H × W input: (H + 2p − d·(k − 1) − 1) // s + 1 each."""
    return tuple(  # type: ignore[return-value]
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, *_geometry(kernel, stride, padding, dilation), strict=True)
    )


def quantize_rows_int8_both(
    a: torch.Tensor, bound_rows: torch.Tensor, bound_cols: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``quantize_rows_int8(a, bound_rows, True)`` and ``quantize_rows_int8(a.t(), bound_cols,
    True)`` (nearest rounding) in two passes over ``a`` instead of three — a layer gradient's
    operands for its grad-input product (a scale per row) and its grad-weight product (a scale
    per column, levels transposed): the rows' pass also gathers the columns' absmax. Bitwise
    the two calls. Returns (row levels, row scales, transposed levels (C, R), column scales).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> a, bound = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor(127.0)
    >>> q_rows, s_rows, q_cols, s_cols = fused.quantize_rows_int8_both(a, bound, bound)
    >>> torch.equal(q_cols, fused.quantize_rows_int8(a.t(), bound, True)[0])
    True
    """
    return torch.ops.qtrain.quantize_rows_int8_both(a, bound_rows, bound_cols)


def im2col_nhwc(
    x: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    rows: tuple[int, int] | None = None,
    pad_value: int = 0,
) -> torch.Tensor:
    """x's im2col matrix with channels innermost: the row-major (B·H'·W', kh·kw·C) matrix of
    x's dtype whose row (b·H' + oh)·W' + ow holds, for each kernel offset (i, j) in row-major
    order, the C channels of x[b, :, oh·sh − ph + i·dh, ow·sw − pw + j·dw], zeros where that
    pixel lies in the padding. Pure data movement: values are copied bit for bit (NaN, inf, −0).
    int8 x (integer levels): the padding reads ``pad_value`` (levels shifted by an offset d:
    −d, the shifted zero); float32 x: 0 only.

    It equals ``F.unfold(x, kernel, dilation, padding, stride)`` — (B, C·kh·kw, L), columns
    (c, i, j) — with its columns reordered to (i, j, c) and rows (b, l), so a convolution weight
    (C_out, C, kh, kw) multiplies it as ``weight.permute(0, 2, 3, 1).reshape(C_out, -1)``.

    ``x``: a float32 or int8 (B, C, H, W) CPU tensor, fastest channels-last
    (``torch.channels_last``): each block (i, j) is then one copy of C contiguous values;
    other layouts are converted first. ``kernel``, ``stride`` and ``dilation``: positive ints
    or pairs (h, w); ``padding``: non-negative. Multi-threaded over rows; H' and W' must be at
    least 1. ``rows`` = (begin, end): only those rows of the matrix (for products run in
    pieces).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> x = torch.arange(8.0).view(1, 2, 2, 2)  # channels 0..3 and 4..7
    >>> fused.im2col_nhwc(x, (1, 2))  # two rows (oh = 0, 1), blocks j = 0, 1 of both channels
    tensor([[0., 4., 1., 5.],
            [2., 6., 3., 7.]])
    """
    begin, end = (0, None) if rows is None else rows
    return torch.ops.qtrain.im2col_nhwc(
        x, *_geometry(kernel, stride, padding, dilation), begin, end, pad_value
    )


def col2im_nhwc(
    cols: torch.Tensor,
    x_shape: tuple[int, int, int, int] | torch.Size,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """The adjoint of ``im2col_nhwc``: the gradient of x (shape ``x_shape`` = (B, C, H, W))
    from the gradient ``cols`` (B·H'·W', kh·kw·C) of its im2col matrix, every block summed back
    onto its input pixel, padding dropped. Returns a float32 (B, C, H, W) tensor in
    channels-last memory format.

    Equals ``F.fold`` of ``cols`` reordered to F.unfold's layout, within float32 rounding: each
    pixel sums 0 + its blocks in the order of the rows that hold them (kernel offsets (i, j)
    descending), while F.fold has its own order. Deterministic: threads own bands of input rows
    (no atomics), and the result is bitwise the same on any number of threads. ``cols`` must be
    float32 (a non-contiguous one is copied first).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> fused.col2im_nhwc(torch.ones(3, 2), (1, 1, 1, 4), (1, 2))
    tensor([[[[1., 2., 2., 1.]]]])
    """
    return torch.ops.qtrain.col2im_nhwc(
        cols, list(x_shape), *_geometry(kernel, stride, padding, dilation)
    )


# ---- qtrain.lowp's int8 convolutions: quantized im2col rows and fused epilogues ------------------


def im2col_int8(
    x: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    rows: tuple[int, int] | None = None,
    bound: torch.Tensor,
    column_scale: torch.Tensor | None = None,
    column_amax: bool = False,
) -> tuple[torch.Tensor, ...]:
    """int8 levels of rows ``rows`` = [begin, end) (default: all) of ``im2col_nhwc(x, ...)``,
    without building the float32 matrix: each row is built in a buffer and quantized while in
    cache. Without ``column_scale``: a scale per row from its absmax — bitwise
    ``quantize_rows_int8(im2col_nhwc(x)[begin:end], bound, True)``; with ``column_scale`` (one
    float32 scale per column): those, as ``quantize_rows_int8``
    gives the transposed matrix, transposed back (and a copy of the scales is returned). Nearest
    rounding. Returns (row-major int8 levels, scales); with ``column_amax`` also each column's
    absmax over these rows as float32 bit patterns in an int32 (K,) tensor (``.view(
    torch.float32)`` reads them; the maximum over pieces is the matrix's: the absmax that
    ``quantize_rows_int8`` of the matrix's transpose scales by).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> x = torch.tensor([[[[1.0, -2.0, 0.5]]]])  # (1, 1, 1, 3)
    >>> q, scale = fused.im2col_int8(x, (1, 2), bound=torch.tensor(127.0))
    >>> q.tolist(), scale.tolist()
    ([[64, -127], [-127, 32]], [0.015748031437397003, 0.015748031437397003])
    """
    begin, end = (0, None) if rows is None else rows
    levels, scale, amax = torch.ops.qtrain.im2col_int8(
        x, *_geometry(kernel, stride, padding, dilation), begin, end, bound,
        column_scale, column_amax,
    )  # fmt: skip
    return (levels, scale, amax) if column_amax else (levels, scale)


def im2col_int8_product(
    x: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    rows: tuple[int, int] | None = None,
    bound: torch.Tensor,
    weight_levels: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    column_amax: bool = False,
    out: torch.Tensor,
) -> torch.Tensor | None:
    """The forward of a convolution with short im2col rows (kh·kw·C ≤ 32 values: a first
    layer's 9 or 27) in one pass, without the int8 matrix: ``out`` (the rows ``rows`` of the
    (B·H'·W', C_out) product, float32 or bfloat16, rows may be apart) set to
    ``int8_epilogue(levels · weight_levelsᵀ, scale, weight_scale, bias)`` for ``levels, scale
    = im2col_int8(x, ..., rows=rows, bound=bound)`` — bit for bit: each tile of fields is
    quantized as ``im2col_int8`` does, multiplied with W's int8 levels (C_out, K) in int32 (the
    exact integers ``torch._int_mm`` gives) and scaled in the epilogue's order. With
    ``column_amax``, returns im2col_int8's column absmax bits of these rows.

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> x, bound = torch.tensor([[[[1.0, -2.0, 0.5]]]]), torch.tensor(127.0)
    >>> w, w_scale = torch.tensor([[1, 2], [3, -1]], dtype=torch.int8), torch.tensor([0.5, 2.0])
    >>> y = torch.empty(2, 2)
    >>> fused.im2col_int8_product(x, (1, 2), bound=bound, weight_levels=w, weight_scale=w_scale,
    ...                           out=y)
    >>> q, scale = fused.im2col_int8(x, (1, 2), bound=bound)
    >>> torch.equal(y, fused.int8_epilogue(torch._int_mm(q, w.t()), scale, w_scale))
    True
    """
    begin, end = (0, None) if rows is None else rows
    amax = torch.ops.qtrain.im2col_int8_product(
        x, *_geometry(kernel, stride, padding, dilation), begin, end, bound, weight_levels,
        weight_scale, bias, column_amax, out,
    )  # fmt: skip
    return amax if column_amax else None


def im2col_int8_grad_weight(
    x: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    rows: tuple[int, int] | None = None,
    bound: torch.Tensor,
    column_scale: torch.Tensor,
    g_levels: torch.Tensor,
) -> torch.Tensor:
    """The grad-weight product of a convolution with short im2col rows (kh·kw·C ≤ 32) in one
    pass, without the int8 matrix: the int64 (C_out, K) ``g_levels · levels`` for ``levels, _
    = im2col_int8(x, ..., rows=rows, bound=bound, column_scale=column_scale)`` and
    ``g_levels`` int8 (C_out, rows) — the exact integers of ``torch._int_mm`` on them (summed
    over any depth in int64), for ``int8_epilogue``.

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> x, bound = torch.tensor([[[[1.0, -2.0, 0.5]]]]), torch.tensor(127.0)
    >>> g = torch.tensor([[3, -1], [0, 2]], dtype=torch.int8)  # (C_out, rows)
    >>> scale = torch.tensor([1 / 127, 2 / 127])
    >>> fused.im2col_int8_grad_weight(x, (1, 2), bound=bound, column_scale=scale, g_levels=g)
    tensor([[ 508, -413],
            [-254,   64]])
    """
    begin, end = (0, None) if rows is None else rows
    return torch.ops.qtrain.im2col_int8_grad_weight(
        x, *_geometry(kernel, stride, padding, dilation), begin, end, bound, column_scale,
        g_levels,
    )  # fmt: skip


def int8_epilogue(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32(acc)·scale_a[:, None]·scale_b[None, :] (+ bias), rounded in that order — bitwise
    ``qtrain.lowp_products._epilogue`` — in one pass. ``acc``: an int32, int64, float32 or float64
    (M, N) matrix with unit column stride (rows may be apart: a slice of a padded product);
    the scales: (M,) and (N,) float32, or one value each; ``bias``: (N,) float32. ``out``: a
    float32 (M, N) matrix with unit column stride to write (e.g. rows of a larger result).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> acc = torch.tensor([[2, -4]], dtype=torch.int32)
    >>> fused.int8_epilogue(acc, torch.tensor([0.5]), torch.tensor([1.0, 0.25]))
    tensor([[ 1.0000, -0.5000]])
    """
    if out is None:
        return torch.ops.qtrain.int8_epilogue(acc, scale_a, scale_b, bias)
    torch.ops.qtrain.int8_epilogue_out(acc, scale_a, scale_b, bias, out)
    return out


def empty_cached(like: torch.Tensor, sizes: list[int] | torch.Size, dtype: torch.dtype):
    """An uninitialised CPU tensor from the extension's output allocator: from 4 MiB on
    transparent huge pages, and a freed block of the same size reused (up to 256 MiB kept) —
    for a result written in pieces every step, whose fresh pages would otherwise fault in one
    at a time. ``like``: any CPU tensor (routes the call; not read).

    >>> import torch
    >>> from qtrain.kernels.cpu_fused import load
    >>> fused = load()  # builds on first use
    >>> fused.empty_cached(torch.empty(0), [2, 3], torch.float32).shape
    torch.Size([2, 3])
    """
    return torch.ops.qtrain.empty_cached(like, list(sizes), dtype)


def col2im_int8_epilogue(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    grad_x: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    image_begin: int = 0,
) -> None:
    """Set images [image_begin, image_begin + n) of ``grad_x`` (float32 (B, C, H, W),
    channels-last) to ``col2im_nhwc(int8_epilogue(acc, scale_a, scale_b))`` of those images —
    bitwise — in one pass: ``acc`` is the (n·H'·W', kh·kw·C) grad-input product of their im2col
    rows (int32, int64, float32 or float64, unit column stride)."""
    torch.ops.qtrain.col2im_int8_epilogue(
        acc, scale_a, scale_b, grad_x, *_geometry(kernel, stride, padding, dilation),
        image_begin,
    )  # fmt: skip
