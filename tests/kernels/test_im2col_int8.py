"""cpu_fused's kernels of qtrain.lowp's int8 convolutions, against the compositions they fuse:
``im2col_int8`` (quantized im2col rows, never the float matrix) against ``quantize_rows_int8``
of ``im2col_nhwc``'s matrix — row-wise, and with per-column scales against the quantized
transpose, and its column absmax against that transpose's scales; ``int8_epilogue``
against lowp_products' PyTorch epilogue for every accumulator dtype; ``col2im_int8_epilogue``
against ``col2im_nhwc`` of the scaled matrix. All bit for bit, over the geometries, channel
counts and layouts of test_im2col, row and image pieces, non-finite values, one or two
threads; plus the argument checks and the torch.library registration.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_im2col import (
    BATCHES,
    CHANNELS,
    GEOMETRIES,
    INF,
    LAYOUTS,
    NAN,
    _assert_bitwise,
    _images,
    _laid_out,
    _pair,
    _threads,
)

from qtrain import lowp_products

BOUNDS = [127.0, 7.0]


def _bound(value: float) -> torch.Tensor:
    return torch.tensor(value)


def _scaled(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """lowp_products' PyTorch epilogue without bias:
    float32(acc)·scale_a[:, None]·scale_b[None, :]."""
    return acc.to(torch.float32, copy=True).mul_(scale_a.view(-1, 1)).mul_(scale_b.view(1, -1))


def _args(geometry) -> list[list[int]]:
    return [list(_pair(v)) for v in geometry]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_rowwise_levels_are_quantize_rows_of_the_im2col_matrix(fused, geometry):
    for batch, channels, layout in itertools.product(BATCHES, CHANNELS, LAYOUTS):
        x = _laid_out(_images(batch, channels, 7, 9, seed=channels + batch), layout)
        cols = fused.im2col_nhwc(x, *geometry)
        rows = cols.shape[0]
        bound = _bound(BOUNDS[channels % 2])
        for begin, end in [(0, rows), (1, rows), (rows // 3, rows // 2 + 1)]:
            q, scale = fused.im2col_int8(x, *geometry, rows=(begin, end), bound=bound)
            want_q, want_scale = fused.quantize_rows_int8(cols[begin:end], bound, True)
            assert q.dtype == torch.int8 and q.is_contiguous()
            assert torch.equal(q, want_q)
            _assert_bitwise(scale, want_scale)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_column_scales_and_levels_are_those_of_the_transposed_matrix(fused, geometry):
    for batch, channels, layout in itertools.product(BATCHES, CHANNELS, LAYOUTS):
        x = _laid_out(_images(batch, channels, 7, 9, seed=3 * channels + batch), layout)
        cols = fused.im2col_nhwc(x, *geometry)
        bound = _bound(BOUNDS[batch % 2])
        want_q, scale = fused.quantize_rows_int8(cols.t(), bound, True)
        rows = cols.shape[0]
        for begin, end in [(0, rows), (rows // 2, rows)]:
            q, returned = fused.im2col_int8(
                x, *geometry, rows=(begin, end), bound=bound, column_scale=scale
            )
            assert torch.equal(q, want_q.t()[begin:end])
            _assert_bitwise(returned, scale)


@pytest.mark.parametrize("geometry", GEOMETRIES[::3], ids=str)
def test_column_amax_over_pieces_gives_the_column_scales(fused, geometry):
    """The forward's rows give backward its column scales: the maximum over pieces of
    im2col_int8's column absmax, scaled as lowp does, is the scale quantize_rows_int8 gives
    the matrix's transpose, bit for bit."""
    for channels in CHANNELS:
        x = _images(3, channels, 7, 9, seed=channels).contiguous(memory_format=torch.channels_last)
        if channels == 3:
            x[1, 2, 3, 4] = NAN
        bound = _bound(BOUNDS[channels % 2])
        cols = fused.im2col_nhwc(x, *geometry)
        rows = cols.shape[0]
        amax = None
        for begin, end in [(0, rows // 3), (rows // 3, rows // 2), (rows // 2, rows)]:
            q, scale, piece = fused.im2col_int8(
                x, *geometry, rows=(begin, end), bound=bound, column_amax=True
            )
            assert piece.dtype == torch.int32 and (piece >= 0).all()
            amax = piece if amax is None else torch.maximum(amax, piece)
        got = lowp_products._scale_from_amax(amax.view(torch.float32), bound)
        want = fused.quantize_rows_int8(cols.t(), bound, True)[1]
        assert torch.equal(got.isnan(), want.isnan())
        _assert_bitwise(got[~got.isnan()], want[~want.isnan()])


def test_non_finite_values_and_zeros_quantize_as_the_composition(fused):
    x = _images(2, 5, 6, 7, seed=11)
    x[0, 1, 2, 3] = NAN
    x[1, 2, 0, 0] = INF
    x[1, 3, 5, 6] = -INF
    x[0, :, 4:, :] = 0.0
    x[1, 4] = 1e-30  # tiny: scales floored at the smallest normal float
    x = x.contiguous(memory_format=torch.channels_last)
    bound = _bound(127.0)
    for geometry in [(3, 1, 1, 1), (2, 2, 0, 1), (3, 1, 2, 2)]:
        cols = fused.im2col_nhwc(x, *geometry)
        q, scale = fused.im2col_int8(x, *geometry, bound=bound)
        want_q, want_scale = fused.quantize_rows_int8(cols, bound, True)
        assert torch.equal(q, want_q)
        assert torch.equal(scale.isnan(), want_scale.isnan())
        finite = ~scale.isnan()
        _assert_bitwise(scale[finite], want_scale[finite])
        want_q, column_scale = fused.quantize_rows_int8(cols.t(), bound, True)
        _, _, amax = fused.im2col_int8(x, *geometry, bound=bound, column_amax=True)
        got = lowp_products._scale_from_amax(amax.view(torch.float32), bound)
        assert torch.equal(got.isnan(), column_scale.isnan())
        finite = ~got.isnan()
        _assert_bitwise(got[finite], column_scale[finite])
        q, _ = fused.im2col_int8(x, *geometry, bound=bound, column_scale=column_scale)
        assert torch.equal(q, want_q.t())


def test_a_bfloat16_x_is_its_float32_widening_and_a_bfloat16_out_its_rounding(fused):
    x = _images(2, 5, 6, 7, seed=12).bfloat16().contiguous(memory_format=torch.channels_last)
    wide = x.float()
    bound = _bound(127.0)
    for geometry in [(3, 1, 1, 1), (2, 2, 0, 1)]:
        for column in (False, True):
            cols = fused.im2col_nhwc(wide, *geometry)
            scale = fused.quantize_rows_int8(cols.t(), bound, True)[1] if column else None
            got = fused.im2col_int8(x, *geometry, bound=bound, column_scale=scale, column_amax=True)
            want = fused.im2col_int8(
                wide, *geometry, bound=bound, column_scale=scale, column_amax=True
            )
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)
    generator = torch.Generator().manual_seed(8)
    acc = torch.randint(-(2**24), 2**24, (9, 6), dtype=torch.int32, generator=generator)
    scale_a, scale_b = torch.rand(9, generator=generator), torch.rand(6, generator=generator)
    bias = torch.randn(6, generator=generator)
    for b in (None, bias):
        out = torch.empty(9, 6, dtype=torch.bfloat16)
        fused.int8_epilogue(acc, scale_a, scale_b, b, out=out)
        want = fused.int8_epilogue(acc, scale_a, scale_b, b).bfloat16()
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_an_all_zero_input_has_scale_one(fused):
    x = torch.zeros(2, 3, 5, 5)
    q, scale = fused.im2col_int8(x, 3, 1, 1, bound=_bound(127.0))
    assert not q.any() and torch.equal(scale, torch.ones_like(scale))
    _, _, amax = fused.im2col_int8(x, 3, 1, 1, bound=_bound(127.0), column_amax=True)
    assert torch.equal(
        lowp_products._scale_from_amax(amax.view(torch.float32), 127.0), torch.ones(27)
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_epilogue_is_lowps_pytorch_epilogue(fused, dtype):
    generator = torch.Generator().manual_seed(3)
    wide = torch.randint(-(2**30), 2**30, (37, 29), generator=generator).to(dtype)
    for acc in [wide[:, :23], wide[5:6, :23], wide[:, :1], wide[:0, :23]]:  # strided rows
        rows, cols = acc.shape
        scale_a = torch.rand(rows, generator=generator) * 1e-3
        scale_b = torch.rand(cols, generator=generator)
        bias = torch.randn(cols, generator=generator)
        for b in (None, bias):
            want = _scaled(acc, scale_a, scale_b)
            if b is not None:
                want.add_(b)
            _assert_bitwise(fused.int8_epilogue(acc, scale_a, scale_b, b), want)
            out = torch.full((rows + 4, cols), 7.0)
            fused.int8_epilogue(acc, scale_a, scale_b, b, out=out[2 : rows + 2])
            _assert_bitwise(out[2 : rows + 2], want)
            assert (out[:2] == 7).all() and (out[rows + 2 :] == 7).all()
        if not rows:
            continue
        # one scale each, broadcast (per-tensor scaling)
        one_a, one_b = scale_a[:1].clone(), scale_b[:1].clone()
        want = _scaled(acc, one_a, one_b)
        _assert_bitwise(fused.int8_epilogue(acc, one_a, one_b), want)


def test_epilogue_overflows_and_propagates_like_the_composition(fused):
    acc = torch.tensor([[2**31 - 1, -(2**31), 0, 5]], dtype=torch.int32)
    scale_a = torch.tensor([3e38])
    scale_b = torch.tensor([1.0, 1.0, NAN, INF])
    want = _scaled(acc, scale_a, scale_b)
    got = fused.int8_epilogue(acc, scale_a, scale_b)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_col2im_epilogue_is_col2im_of_the_scaled_matrix(fused, geometry):
    generator = torch.Generator().manual_seed(5)
    for batch, channels in itertools.product([1, 4], [1, 16]):
        x_shape = (batch, channels, 7, 9)
        cols = fused.im2col_nhwc(torch.zeros(x_shape), *geometry).shape
        per_image = cols[0] // batch
        acc = torch.randint(-(2**20), 2**20, cols, dtype=torch.int32, generator=generator)
        scale_a = torch.rand(cols[0], generator=generator)
        scale_b = torch.rand(cols[1], generator=generator)
        want = fused.col2im_nhwc(_scaled(acc, scale_a, scale_b), x_shape, *geometry)
        got = torch.full(x_shape, NAN).contiguous(memory_format=torch.channels_last)
        pieces = [(0, batch)] if batch == 1 else [(0, 1), (1, 3), (3, 4)]
        for first, last in pieces:  # images in pieces, as lowp's grad-input runs them
            rows = slice(first * per_image, last * per_image)
            fused.col2im_int8_epilogue(
                acc[rows], scale_a[rows], scale_b, got, *geometry, image_begin=first
            )
        _assert_bitwise(got, want)


def _product_composition(fused, x, geometry, rows, bound, w, w_scale, bias, out_dtype):
    """im2col_int8's levels, torch._int_mm with W's levels, int8_epilogue: what the one-pass
    short-row forward fuses."""
    q, scale, amax = fused.im2col_int8(x, *geometry, rows=rows, bound=bound, column_amax=True)
    acc = lowp_products.levels_product(q, w, False)  # torch._int_mm, its CPU quirks handled
    out = torch.empty(acc.shape, dtype=out_dtype)
    return fused.int8_epilogue(acc, scale, w_scale, bias, out=out), amax


# Geometries whose rows hold at most 32 values at 1–3 channels (the one-pass forward's).
SHORT_ROWS = [(3, 1, 1, 1), (3, 2, 1, 1), ((2, 3), (2, 1), (0, 1), 2), (1, 1, 0, 1), (5, 1, 2, 2)]


@pytest.mark.parametrize("geometry", SHORT_ROWS, ids=str)
def test_the_short_row_forward_is_levels_product_and_epilogue_in_one_pass(fused, geometry):
    generator = torch.Generator().manual_seed(12)
    bound = _bound(127.0)
    for channels, outputs in [(1, 16), (3, 5), (2, 1)]:
        x = _images(3, channels, 7, 9, seed=channels).contiguous(memory_format=torch.channels_last)
        x[0, 0, 2, 3], x[1, 0, 4, 4], x[2, 0, 0, 0] = NAN, INF, 0.0
        cols = fused.im2col_nhwc(x, *geometry).shape
        if cols[1] > 32:
            continue
        w = torch.randint(-127, 128, (outputs, cols[1]), dtype=torch.int8, generator=generator)
        w_scale = torch.rand(outputs, generator=generator)
        bias = torch.randn(outputs, generator=generator)
        for (begin, end), with_bias, dtype in itertools.product(
            [(0, cols[0]), (cols[0] // 3, cols[0] // 2 + 1)],
            [False, True],
            [torch.float32, torch.bfloat16],
        ):
            want, want_amax = _product_composition(
                fused, x, geometry, (begin, end), bound, w, w_scale, bias if with_bias else None,
                dtype,
            )  # fmt: skip
            wide = torch.full((end - begin, outputs + 3), 7.0, dtype=dtype)  # rows apart
            got = wide[:, 1 : outputs + 1]
            amax = fused.im2col_int8_product(
                x, *geometry, rows=(begin, end), bound=bound, weight_levels=w,
                weight_scale=w_scale, bias=bias if with_bias else None, column_amax=True, out=got,
            )  # fmt: skip
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got[~got.isnan()], want[~want.isnan()])
            assert torch.equal(amax, want_amax)
            assert (wide[:, 0] == 7).all() and (wide[:, -2:] == 7).all()  # nothing else written
        x16 = x.to(torch.bfloat16)  # widened exactly, as im2col_int8 reads it
        got = torch.empty(cols[0], outputs)
        assert fused.im2col_int8_product(
            x16, *geometry, bound=bound, weight_levels=w, weight_scale=w_scale, out=got
        ) is None  # fmt: skip
        want, _ = _product_composition(
            fused, x16, geometry, (0, cols[0]), bound, w, w_scale, None, torch.float32
        )
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("geometry", SHORT_ROWS, ids=str)
def test_the_short_row_grad_weight_is_the_exact_product_of_the_levels(fused, geometry):
    generator = torch.Generator().manual_seed(13)
    bound = _bound(127.0)
    for channels, outputs in [(1, 16), (3, 5), (2, 1)]:
        x = _images(3, channels, 7, 9, seed=channels).contiguous(memory_format=torch.channels_last)
        x[1, 0, 4, 4] = 1e6  # a large value: that column's other levels round to 0
        cols = fused.im2col_nhwc(x, *geometry)
        if cols.shape[1] > 32:
            continue
        column_scale = fused.quantize_rows_int8(cols.t(), bound, True)[1]
        for begin, end in [(0, cols.shape[0]), (cols.shape[0] // 3, cols.shape[0] // 2 + 1)]:
            g = torch.randint(-127, 128, (outputs, end - begin), dtype=torch.int8,
                              generator=generator)  # fmt: skip
            for operand in (x, x.to(torch.bfloat16)):
                q, _ = fused.im2col_int8(
                    operand, *geometry, rows=(begin, end), bound=bound, column_scale=column_scale
                )
                got = fused.im2col_int8_grad_weight(
                    operand, *geometry, rows=(begin, end), bound=bound,
                    column_scale=column_scale, g_levels=g,
                )  # fmt: skip
                assert got.dtype == torch.int64
                assert torch.equal(got, g.long() @ q.long())


def test_the_short_row_grad_weight_sums_beyond_int32(fused):
    """160,000 rows of levels ±127 against g's ±127: 2.6e9, beyond int32, summed exactly."""
    x = torch.full((1, 1, 400, 400), 3.0).contiguous(memory_format=torch.channels_last)
    bound = _bound(127.0)
    column_scale = torch.full((9,), 3.0 / 127)
    g = torch.full((2, 160_000), 127, dtype=torch.int8)
    g[1] = -127
    got = fused.im2col_int8_grad_weight(x, 3, 1, 1, bound=bound, column_scale=column_scale,
                                        g_levels=g)  # fmt: skip
    q, _ = fused.im2col_int8(x, 3, 1, 1, bound=bound, column_scale=column_scale)
    want = g.long() @ q.long()
    assert want.abs().max() > 2**31 and torch.equal(got, want)


def test_the_short_row_forward_checks_its_arguments(fused):
    x, bound = torch.ones(1, 2, 5, 5), _bound(127.0)
    w, w_scale, out = torch.ones(4, 18, dtype=torch.int8), torch.ones(4), torch.empty(9, 4)
    product = fused.im2col_int8_product
    with pytest.raises(RuntimeError, match="rows of kh·kw·C <= 32 values only, got 50"):
        product(torch.ones(1, 2, 9, 9), 5, bound=bound, weight_levels=w, weight_scale=w_scale,
                out=torch.empty(25, 4))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"weight_levels must be an int8 \(C_out, 18\)"):
        product(x, 3, bound=bound, weight_levels=w.float(), weight_scale=w_scale, out=out)
    with pytest.raises(RuntimeError, match=r"out must be \(9, 4\)"):
        product(x, 3, bound=bound, weight_levels=w, weight_scale=w_scale, out=out[:8])
    with pytest.raises(RuntimeError, match="weight_scale must hold 4 float32 values"):
        product(x, 3, bound=bound, weight_levels=w, weight_scale=torch.ones(3), out=out)
    with pytest.raises(RuntimeError, match="bias must hold 4 float32 values"):
        product(x, 3, bound=bound, weight_levels=w, weight_scale=w_scale, bias=torch.ones(5),
                out=out)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"g_levels must be an int8 \(C_out, 9\)"):
        fused.im2col_int8_grad_weight(x, 3, bound=bound, column_scale=torch.ones(18),
                                      g_levels=torch.ones(4, 8, dtype=torch.int8))  # fmt: skip
    with pytest.raises(RuntimeError, match="column_scale must hold 18 float32 values"):
        fused.im2col_int8_grad_weight(x, 3, bound=bound, column_scale=torch.ones(17),
                                      g_levels=torch.ones(4, 9, dtype=torch.int8))  # fmt: skip
    args = _args((3, 1, 1, 1))
    x = _images(2, 1, 7, 9, seed=3)
    w, out = torch.ones(4, 9, dtype=torch.int8), torch.empty(5, 4)
    torch.library.opcheck(
        torch.ops.qtrain.im2col_int8_product,
        (x, *args, 2, 7, bound, w, w_scale, torch.ones(4), True, out),
    )
    torch.library.opcheck(
        torch.ops.qtrain.im2col_int8_grad_weight,
        (x, *args, 2, 7, bound, torch.rand(9) + 0.1, torch.ones(3, 5, dtype=torch.int8)),
    )


def test_one_and_two_threads_give_the_same_bits(fused):
    x = _images(3, 16, 28, 28, seed=6).contiguous(memory_format=torch.channels_last)
    bound = _bound(127.0)
    for geometry in [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2)]:
        results = []
        for count in (1, 2):
            with _threads(count):
                q, scale, amax = fused.im2col_int8(x, *geometry, bound=bound, column_amax=True)
                column = lowp_products._scale_from_amax(amax.view(torch.float32), bound)
                acc = q.to(torch.int32)
                grad = torch.empty_like(x)
                fused.col2im_int8_epilogue(acc, scale, column, grad, *geometry)
                results.append((q, scale, amax, grad, fused.int8_epilogue(acc, scale, column)))
        for one, two in zip(*results, strict=True):
            assert torch.equal(one, two)


def test_the_kernels_check_their_arguments(fused):
    x = torch.ones(1, 2, 5, 5)
    bound = _bound(127.0)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        fused.im2col_int8(x.double(), 3, bound=bound)
    with pytest.raises(RuntimeError, match=r"rows must satisfy 0 <= row_begin <= row_end <= 9"):
        fused.im2col_int8(x, 3, rows=(0, 10), bound=bound)
    with pytest.raises(RuntimeError, match=r"bound must be in \[1, 127\]"):
        fused.im2col_int8(x, 3, bound=_bound(200.0))
    with pytest.raises(RuntimeError, match="column_scale must be a float32 CPU tensor of"):
        fused.im2col_int8(x, 3, bound=bound, column_scale=torch.ones(17))
    with pytest.raises(RuntimeError, match="stride must be two ints >= 1"):
        fused.im2col_int8(x, 3, stride=0, bound=bound)
    acc = torch.ones(9, 18, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="acc must be int32, int64, float32 or float64"):
        fused.int8_epilogue(acc.to(torch.int16), torch.ones(9), torch.ones(18))
    with pytest.raises(RuntimeError, match="scale_b must hold 18 float32 values"):
        fused.int8_epilogue(acc, torch.ones(9), torch.ones(17))
    with pytest.raises(RuntimeError, match="unit column stride"):
        fused.int8_epilogue(acc.t(), torch.ones(18), torch.ones(9))
    with pytest.raises(RuntimeError, match="out must be float32 or bfloat16"):
        fused.int8_epilogue(acc, torch.ones(9), torch.ones(18), out=torch.empty(9, 18).double())
    grad = torch.empty(1, 2, 5, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="grad_x must be a float32 .* channels-last"):
        fused.col2im_int8_epilogue(acc, torch.ones(25), torch.ones(18), torch.empty(1, 2, 5, 5), 3)
    with pytest.raises(RuntimeError, match=r"acc must be \(images·H'·W', kh·kw·C\)"):
        fused.col2im_int8_epilogue(acc[:8], torch.ones(8), torch.ones(18), grad, 3)
    with pytest.raises(RuntimeError, match=r"images \[1, 2\) outside the batch of 1"):
        fused.col2im_int8_epilogue(
            torch.ones(9, 18, dtype=torch.int32), torch.ones(9), torch.ones(18), grad, 3,
            image_begin=1,
        )  # fmt: skip


def test_ops_pass_opcheck(fused):
    x = _images(2, 3, 7, 9, seed=7).contiguous(memory_format=torch.channels_last)
    bound = _bound(127.0)
    for geometry in [(3, 1, 1, 1), ((2, 3), (2, 1), (0, 1), 2)]:
        args = _args(geometry)
        cols = fused.im2col_nhwc(x, *geometry)
        scale = fused.quantize_rows_int8(cols.t(), bound, True)[1]
        torch.library.opcheck(torch.ops.qtrain.im2col_int8, (x, *args, 0, 5, bound, None))
        torch.library.opcheck(torch.ops.qtrain.im2col_int8, (x, *args, 2, 9, bound, scale))
        torch.library.opcheck(torch.ops.qtrain.im2col_int8, (x, *args, 1, 7, bound, None, True))
        q, row_scale = fused.im2col_int8(x, *geometry, bound=bound)
        acc = q.to(torch.int32)
        torch.library.opcheck(torch.ops.qtrain.int8_epilogue, (acc, row_scale, scale, None))
        torch.library.opcheck(
            torch.ops.qtrain.int8_epilogue_out,
            (acc, row_scale, scale, None, torch.empty(acc.shape)),
        )
        grad = torch.empty_like(x)
        torch.library.opcheck(
            torch.ops.qtrain.col2im_int8_epilogue, (acc, row_scale, scale, grad, *args, 0)
        )


def test_lowp_epilogue_takes_the_fused_kernel_and_keeps_its_bits(fused):
    generator = torch.Generator().manual_seed(9)
    acc = torch.randint(-(2**24), 2**24, (40, 24), dtype=torch.int32, generator=generator)
    scale_a, scale_b = torch.rand(40, generator=generator), torch.rand(24, generator=generator)
    bias = torch.randn(24, generator=generator)
    assert lowp_products._fused_epilogue(acc) is not None
    want = _scaled(acc, scale_a, scale_b).add_(bias)
    _assert_bitwise(lowp_products._epilogue(acc, scale_a, scale_b, bias, torch.float32), want)
    assert (
        lowp_products._epilogue(acc, scale_a, scale_b, bias, torch.bfloat16).dtype == torch.bfloat16
    )


def test_empty_cached_gives_the_shape_and_dtype_asked(fused):
    like = torch.empty(0)
    cases = [([3, 5], torch.float32), ([0], torch.int8), ([2, 2048, 1024], torch.float32)]
    for sizes, dtype in cases:
        t = fused.empty_cached(like, sizes, dtype)
        assert list(t.shape) == sizes and t.dtype == dtype and t.is_contiguous()
        t.fill_(1)  # writable, all of it
        assert int(t.sum()) == t.numel()
    # schema and fake tensor only: an uninitialised output differs between runs by design
    torch.library.opcheck(
        torch.ops.qtrain.empty_cached,
        (like, [4, 6], torch.float32),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(RuntimeError, match="sizes must be non-negative"):
        fused.empty_cached(like, [3, -1], torch.float32)
