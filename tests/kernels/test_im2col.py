"""cpu_fused.im2col_nhwc and col2im_nhwc, qtrain.lowp's convolution matrices, against references
built from F.unfold and F.fold (their columns reordered from (c, i, j) to (i, j, c)): im2col bit
for bit (it only moves data, non-finite values included), col2im within float32 rounding (it
sums in its own order), the two adjoint, over kernel, stride, padding and dilation, channel
counts, odd image sizes and input layouts, on one or two threads; plus the argument checks and
the torch.library registration.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from qtrain.kernels.cpu_fused import IntPair, conv_output_size

NAN, INF = float("nan"), float("inf")
KERNELS: list[IntPair] = [1, 3, (2, 3), 5]
STRIDES: list[IntPair] = [1, 2, (2, 1)]
PADDINGS: list[IntPair] = [0, 1, 2, (0, 1)]
DILATIONS: list[IntPair] = [1, 2]
# (kernel, stride, padding, dilation), those whose output fits a 7 × 9 image.
GEOMETRIES = [
    geometry
    for geometry in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS)
    if min(conv_output_size((7, 9), *geometry)) >= 1
]
CHANNELS = [1, 3, 16, 33]
BATCHES = [1, 3]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _pair(value: IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def reference_im2col(x, kernel, stride, padding, dilation) -> torch.Tensor:
    """F.unfold's (B, C·kh·kw, L), columns (c, i, j), as (B·L, kh·kw·C), columns (i, j, c)."""
    kh, kw = _pair(kernel)
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)
    batch, channels = x.shape[:2]
    return (
        cols.view(batch, channels, kh, kw, -1)
        .permute(0, 4, 2, 3, 1)
        .reshape(-1, kh * kw * channels)
    )


def reference_col2im(cols, x_shape, kernel, stride, padding, dilation) -> torch.Tensor:
    """F.fold of the (B·L, kh·kw·C) matrix reordered to F.unfold's layout."""
    batch, channels, height, width = x_shape
    kh, kw = _pair(kernel)
    blocks = cols.view(batch, -1, kh, kw, channels).permute(0, 4, 2, 3, 1)
    blocks = blocks.reshape(batch, channels * kh * kw, -1)
    return F.fold(blocks, (height, width), (kh, kw), dilation, padding, stride)


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values contiguous, channels-last, or as a view with gaps between channels."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.stack([x, x], dim=2)[:, :, 0]
    return x.contiguous()


def _images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(
        batch, channels, height, width, generator=torch.Generator().manual_seed(seed)
    )


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_im2col_equals_unfold_bit_for_bit(fused, geometry):
    for batch, channels, layout in itertools.product(BATCHES, CHANNELS, LAYOUTS):
        x = _laid_out(_images(batch, channels, 7, 9, seed=channels), layout)
        cols = fused.im2col_nhwc(x, *geometry)
        assert cols.is_contiguous()
        _assert_bitwise(cols, reference_im2col(x, *geometry))


@pytest.mark.parametrize(
    ("size", "geometry"),
    [
        ((5, 5), (5, 1, 0, 1)),  # a 1 × 1 output
        ((1, 1), (3, 1, 1, 1)),  # one pixel, all but the kernel's centre in the padding
        ((3, 2), ((3, 2), 1, 0, 1)),  # the kernel is the whole image
        ((4, 6), (1, 1, 2, 1)),  # output larger than the input: whole rows of padding
        ((9, 7), (3, 2, 2, 2)),  # the dilated kernel steps over the border
        ((2, 2), (3, 3, 1, 1)),  # stride larger than the image: one output pixel
    ],
    ids=str,
)
def test_im2col_and_col2im_at_the_edges_of_the_geometry(fused, size, geometry):
    x = _images(2, 5, *size, seed=1)
    cols = fused.im2col_nhwc(x, *geometry)
    _assert_bitwise(cols, reference_im2col(x, *geometry))
    grad = torch.randn_like(cols)
    torch.testing.assert_close(
        fused.col2im_nhwc(grad, x.shape, *geometry), reference_col2im(grad, x.shape, *geometry)
    )


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_int8_levels_unfold_with_their_pad_value(fused, geometry):
    """int8 x (integer levels shifted by an offset d): the same movement, the padding reading
    pad_value (−d, the shifted zero) — the reference's matrix of x − pad_value, plus it."""
    for (batch, channels, layout), pad in itertools.product(
        itertools.product(BATCHES, CHANNELS, LAYOUTS), [0, -128, 127, -7]
    ):
        levels = (_images(batch, channels, 7, 9, seed=channels) * 40).round().clamp(-128, 127)
        x = _laid_out(levels.to(torch.int8), layout)
        cols = fused.im2col_nhwc(x, *geometry, pad_value=pad)
        assert cols.dtype == torch.int8 and cols.is_contiguous()
        expected = reference_im2col(levels - pad, *geometry) + pad
        assert torch.equal(cols, expected.to(torch.int8))
        rows = cols.shape[0]
        piece = fused.im2col_nhwc(x, *geometry, rows=(rows // 3, rows // 2), pad_value=pad)
        assert torch.equal(piece, cols[rows // 3 : rows // 2])


def test_im2col_rows_are_the_rows_of_the_whole_matrix(fused):
    x = _images(3, 5, 7, 9, seed=4).contiguous(memory_format=torch.channels_last)
    for geometry in [(3, 1, 1, 1), (3, 2, 1, 1), ((2, 3), (2, 1), (0, 1), 2)]:
        whole = fused.im2col_nhwc(x, *geometry)
        rows = whole.shape[0]
        for begin, end in [(0, rows), (0, 1), (rows // 3, rows // 2 + 1), (rows, rows)]:
            _assert_bitwise(fused.im2col_nhwc(x, *geometry, rows=(begin, end)), whole[begin:end])
    with pytest.raises(RuntimeError, match="rows must satisfy 0 <= row_begin <= row_end"):
        fused.im2col_nhwc(x, 3, 1, 1, 1, rows=(5, 4))


def test_im2col_copies_non_finite_values_and_signed_zeros(fused):
    x = _images(2, 3, 7, 9, seed=2)
    x.view(-1)[::5] = NAN
    x.view(-1)[1::7] = INF
    x.view(-1)[2::11] = -INF
    x.view(-1)[3::13] = -0.0
    x.view(-1)[4::17] = -NAN
    for layout in LAYOUTS:
        for geometry in [(3, 1, 1, 1), ((2, 3), (2, 1), (0, 1), 2)]:
            _assert_bitwise(
                fused.im2col_nhwc(_laid_out(x, layout), *geometry), reference_im2col(x, *geometry)
            )


def test_im2col_with_ints_and_pairs_and_keywords(fused):
    x = _images(1, 4, 7, 9, seed=3)
    expected = reference_im2col(x, (3, 3), (2, 2), (1, 1), (1, 1))
    _assert_bitwise(fused.im2col_nhwc(x, 3, 2, 1, 1), expected)
    _assert_bitwise(fused.im2col_nhwc(x, (3, 3), stride=(2, 2), padding=(1, 1)), expected)


def test_im2col_example_columns_are_kernel_offset_then_channel(fused):
    x = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    cols = fused.im2col_nhwc(x, (1, 2))
    assert cols.tolist() == [[0.0, 4.0, 1.0, 5.0], [2.0, 6.0, 3.0, 7.0]]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_col2im_equals_fold(fused, geometry):
    for batch, channels in itertools.product(BATCHES, CHANNELS):
        x_shape = (batch, channels, 7, 9)
        rows = (
            batch * conv_output_size((7, 9), *geometry)[0] * conv_output_size((7, 9), *geometry)[1]
        )
        kh, kw = _pair(geometry[0])
        grad = torch.randn(rows, kh * kw * channels, generator=torch.Generator().manual_seed(batch))
        grad_x = fused.col2im_nhwc(grad, x_shape, *geometry)
        assert grad_x.shape == x_shape and grad_x.dtype == torch.float32
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(grad_x, reference_col2im(grad, x_shape, *geometry))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_col2im_is_the_adjoint_of_im2col(fused, geometry):
    """⟨im2col(x), Y⟩ = ⟨x, col2im(Y)⟩, exactly: small integer values make every float32 sum of
    col2im and every float64 product and sum exact, so no rounding can hide an error."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randint(-8, 9, (3, 16, 7, 9), generator=generator).float()
    cols = fused.im2col_nhwc(x, *geometry)
    y = torch.randint(-8, 9, cols.shape, generator=generator).float()
    left = (cols.double() * y.double()).sum()
    right = (x.double() * fused.col2im_nhwc(y, x.shape, *geometry).double()).sum()
    assert left.item() == right.item()


@pytest.mark.parametrize(
    "x_shape",
    # Bands cut inside an image (B·H rows split between two threads) and within a lone image.
    [(3, 16, 28, 28), (1, 16, 96, 96)],
    ids=str,
)
def test_one_and_two_threads_give_the_same_bits(fused, x_shape):
    x = _images(*x_shape, seed=6).contiguous(memory_format=torch.channels_last)
    for geometry in [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2)]:
        results = []
        for count in (1, 2):
            with _threads(count):
                cols = fused.im2col_nhwc(x, *geometry)
                results.append((cols, fused.col2im_nhwc(cols, x.shape, *geometry)))
        (cols_one, grad_one), (cols_two, grad_two) = results
        _assert_bitwise(cols_two, cols_one)
        _assert_bitwise(grad_two, grad_one)
        _assert_bitwise(cols_one, reference_im2col(x, *geometry))
        torch.testing.assert_close(grad_one, reference_col2im(cols_one, x.shape, *geometry))


def test_empty_batches_and_channels(fused):
    for x_shape in [(0, 3, 7, 9), (2, 0, 7, 9)]:
        x = torch.empty(x_shape)
        cols = fused.im2col_nhwc(x, 3, 1, 1, 1)
        assert cols.shape == (x_shape[0] * 63, 9 * x_shape[1])
        grad_x = fused.col2im_nhwc(cols, x_shape, 3, 1, 1, 1)
        assert grad_x.shape == x_shape


def test_im2col_checks_its_arguments(fused):
    x = torch.ones(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="x must be"):
        fused.im2col_nhwc(torch.ones(2, 5, 5), 3)
    with pytest.raises(RuntimeError, match="x must be float32 or int8, got Double"):
        fused.im2col_nhwc(x.double(), 3)
    with pytest.raises(RuntimeError, match="pad_value must be 0 for float32 x and in"):
        fused.im2col_nhwc(x, 3, pad_value=1)
    with pytest.raises(RuntimeError, match=r"in \[-128, 127\] for int8 x, got 128"):
        fused.im2col_nhwc(x.to(torch.int8), 3, pad_value=128)
    with pytest.raises(RuntimeError, match="kernel must be two ints >= 1"):
        fused.im2col_nhwc(x, (0, 3))
    with pytest.raises(RuntimeError, match="stride must be two ints >= 1"):
        fused.im2col_nhwc(x, 3, stride=0)
    with pytest.raises(RuntimeError, match="stride must be two ints >= 1"):
        fused.im2col_nhwc(x, 3, stride=(1, -2))
    with pytest.raises(RuntimeError, match="padding must be two ints >= 0"):
        fused.im2col_nhwc(x, 3, padding=-1)
    with pytest.raises(RuntimeError, match="dilation must be two ints >= 1"):
        fused.im2col_nhwc(x, 3, dilation=0)
    with pytest.raises(RuntimeError, match=r"dilated kernel \(7\) is larger than the width"):
        fused.im2col_nhwc(x, (1, 4), dilation=2)
    with pytest.raises(RuntimeError, match="kernel"):
        torch.ops.qtrain.im2col_nhwc(x, [3, 3, 3], [1, 1], [0, 0], [1, 1])


def test_col2im_checks_its_arguments(fused):
    cols = torch.ones(9, 18)  # a 2-channel 5 × 5 image, kernel 3
    with pytest.raises(RuntimeError, match="x_shape must be four sizes"):
        fused.col2im_nhwc(cols, (2, 5, 5), 3)
    with pytest.raises(RuntimeError, match="x_shape must be four sizes"):
        fused.col2im_nhwc(cols, (1, -2, 5, 5), 3)
    with pytest.raises(RuntimeError, match="cols must be float32"):
        fused.col2im_nhwc(cols.double(), (1, 2, 5, 5), 3)
    with pytest.raises(RuntimeError, match=r"cols must be the .* = \(9, 18\)"):
        fused.col2im_nhwc(torch.ones(9, 17), (1, 2, 5, 5), 3)
    with pytest.raises(RuntimeError, match="stride must be two ints >= 1"):
        fused.col2im_nhwc(cols, (1, 2, 5, 5), 3, stride=0)
    with pytest.raises(RuntimeError, match="height with padding"):
        fused.col2im_nhwc(cols, (1, 2, 2, 5), 3)


def test_ops_pass_opcheck_and_compile_into_one_graph(fused):
    x = _images(2, 3, 7, 9, seed=7)
    for layout in LAYOUTS:
        for geometry in [(3, 1, 1, 1), ((2, 3), (2, 1), (0, 1), 2)]:
            kernel, stride, padding, dilation = (list(_pair(v)) for v in geometry)
            operand = _laid_out(x, layout)
            torch.library.opcheck(
                torch.ops.qtrain.im2col_nhwc, (operand, kernel, stride, padding, dilation)
            )
            levels = operand.round().to(torch.int8)
            torch.library.opcheck(
                torch.ops.qtrain.im2col_nhwc,
                (levels, kernel, stride, padding, dilation, 0, None, -3),
            )
            cols = torch.ops.qtrain.im2col_nhwc(operand, kernel, stride, padding, dilation)
            torch.library.opcheck(
                torch.ops.qtrain.col2im_nhwc,
                (torch.randn_like(cols), list(x.shape), kernel, stride, padding, dilation),
            )

    def round_trip(images: torch.Tensor) -> torch.Tensor:
        return fused.col2im_nhwc(fused.im2col_nhwc(images, 3, 1, 1), images.shape, 3, 1, 1)

    compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)
    _assert_bitwise(compiled(x), round_trip(x))
