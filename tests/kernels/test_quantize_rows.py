"""cpu_fused.quantize_rows_int8 against its twin ``qtrain.lowp_products._quantize_twin``
(int8): the same levels and the same scale bits, for nearest and stochastic rounding, per row
and per tensor, on contiguous operands, transposed ones (grad-weight's gᵀ and xᵀ) and other
strides, with edge values, low-precision inputs, empty operands, on one or two threads; the
same levels written as float32 (``levels_dtype``), bit for bit the int8 levels converted, in
every one of those cases; plus the torch.library registration.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qtrain import lowp_products

NAN, INF = float("nan"), float("inf")
BITS = range(2, 9)
# Hash-key seeds: small, beyond 32 bits, negative.
SEEDS = [None, 0, 2**40 + 7, -3]
# (R, K): a scalar, odd sizes, few long rows, many short ones, and (48, 200): whole 16 × 64
# tiles of the transposed path beside ragged ones.
SHAPES = [(1, 1), (3, 5), (17, 33), (1000, 7), (7, 1000), (48, 200)]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _bound(bits: int) -> torch.Tensor:
    return torch.tensor(2.0 ** (bits - 1) - 1)


def _keys(seed: int | None) -> torch.Tensor | None:
    return None if seed is None else lowp_products._hash_keys(torch.tensor(seed))


def _laid_out(a: torch.Tensor, layout: str) -> torch.Tensor:
    """``a``'s values as a contiguous matrix, as the transpose of one, or as a strided view."""
    if layout == "transposed":
        return a.t().contiguous().t()
    if layout == "strided":
        return torch.stack([a, a], dim=2)[:, :, 0]  # column stride 2
    return a.contiguous()


def _assert_twin(
    fused, a: torch.Tensor, bound: torch.Tensor, rowwise: bool, keys: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused levels and scale equal the twin's: levels exactly, scales bit for bit where
    they are numbers and NaN where the twin's is. A NaN scale's bits are not compared: torch's
    depend on its reduction path (0xFFFFFFFF from its vectorised maximum in most rows of a
    transposed operand, the row's |NaN| elsewhere). The float32 levels are the int8 levels
    converted, bit for bit (+0 for level 0), with the very same scale bits."""
    levels, scale = fused.quantize_rows_int8(a, bound, rowwise, keys)
    expected_levels, expected_scale = lowp_products._quantize_twin(
        a, torch.int8, bound, keys, rowwise
    )
    assert levels.dtype == torch.int8 and levels.is_contiguous()
    assert torch.equal(levels, expected_levels)
    assert scale.dtype == torch.float32 and scale.shape == expected_scale.shape
    nan = expected_scale.isnan()
    assert torch.equal(scale.isnan(), nan)
    assert torch.equal(scale[~nan].view(torch.int32), expected_scale[~nan].view(torch.int32))
    float_levels, float_scale = fused.quantize_rows_int8(a, bound, rowwise, keys, torch.float32)
    assert float_levels.dtype == torch.float32 and float_levels.is_contiguous()
    assert torch.equal(float_levels.view(torch.int32), levels.to(torch.float32).view(torch.int32))
    assert torch.equal(float_scale.view(torch.int32), scale.view(torch.int32))
    return levels, scale


def _values(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Normal values whose magnitudes differ by row, from 1e-3 to 1e3."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 3, shape[0]).view(-1, 1)
    return torch.randn(shape, generator=generator) * magnitudes


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "per_tensor"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_the_twin(fused, shape, layout, rowwise, seed):
    a = _laid_out(_values(shape, seed=shape[0] * shape[1]), layout)
    for bits in BITS:
        _assert_twin(fused, a, _bound(bits), rowwise, _keys(seed))


def _edge_rows() -> torch.Tensor:
    """One row per edge case, 9 values each."""
    normal = torch.randn(9, generator=torch.Generator().manual_seed(0)).tolist()
    return torch.tensor(
        [
            [0.0] * 9,  # all zero: scale 1
            [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0],
            [1e-40, -1e-40, 3e-41, 0.0, -1e-45, 1e-45, 2e-40, -5e-41, 1e-40],  # scale FLT_MIN
            [3e38, -3e38, 1e38, 1.0, -1.0, 0.0, 2.9e38, -1e-30, 1e30],  # huge
            [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 7.0, 0.0],  # scale 2: v on .5 ties
            [NAN, *normal[:8]],
            [*normal[:4], -NAN, *normal[4:8]],
            [INF, *normal[:8]],
            [*normal[:8], -INF],
            [INF, -INF, 0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5],
            normal,
        ]
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "per_tensor"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_edge_values_equal_the_twin(fused, layout, rowwise, seed):
    edges = _edge_rows()
    for bits in BITS:
        # Each edge row alone (per tensor: the operand is that row) and all of them together.
        for rows in [edges[i : i + 1] for i in range(len(edges))] + [edges]:
            _assert_twin(fused, _laid_out(rows, layout), _bound(bits), rowwise, _keys(seed))
            _assert_twin(fused, _laid_out(rows.t(), layout), _bound(bits), rowwise, _keys(seed))


def test_ties_round_half_to_even_and_non_finite_rows_give_zero_levels(fused):
    levels, scale = _assert_twin(fused, _edge_rows(), _bound(8), True, None)
    assert levels[4].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 0]  # scale 2: v = 0.5, 1.5, 2.5, ...
    assert scale[4].item() == 2.0 and scale[0].item() == scale[1].item() == 1.0
    assert scale[2].item() == torch.finfo(torch.float32).tiny
    assert scale[5].isnan() and scale[6].isnan() and scale[7].isinf() and scale[9].isinf()
    # float('nan') and -nan: torch's NaN bits for a contiguous operand.
    assert scale[5:7].view(torch.int32).tolist() == [0x7FC00000] * 2
    assert not levels[5:10].any()  # a NaN or inf row: every level 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_inputs_equal_the_twin(fused, dtype, layout):
    a = _values((33, 70), seed=1).to(dtype)
    a[3, 5], a[7, :] = NAN, 0.0
    a = _laid_out(a, layout)
    for rowwise in (True, False):
        for seed in SEEDS:
            _assert_twin(fused, a, _bound(8), rowwise, _keys(seed))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_empty_operands_give_empty_levels_and_scale_one(fused, shape, layout):
    a = torch.empty(shape) if layout == "contiguous" else torch.empty(shape[::-1]).t()
    for seed in (None, 0):
        levels, scale = fused.quantize_rows_int8(a, _bound(8), True, _keys(seed))
        assert levels.shape == shape and levels.dtype == torch.int8
        assert torch.equal(scale, torch.ones(shape[0]))
        levels, scale = fused.quantize_rows_int8(a, _bound(8), True, _keys(seed), torch.float32)
        assert levels.shape == shape and levels.dtype == torch.float32
        assert torch.equal(scale, torch.ones(shape[0]))
        levels, scale = fused.quantize_rows_int8(a, _bound(8), False, _keys(seed))
        assert levels.shape == shape and torch.equal(scale, torch.ones(1))
    if shape == (0, 5):  # the twin's amax(dim=1) takes no rows of 5 (it raises on the others)
        _assert_twin(fused, a, _bound(8), True, None)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_one_and_two_threads_give_the_twin(fused, layout):
    a = _laid_out(_values((160, 1031), seed=3), layout)  # past one chunk per thread (2^15)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for rowwise in (True, False):
                for seed in (None, 5):
                    _assert_twin(fused, a, _bound(8), rowwise, _keys(seed))
    finally:
        torch.set_num_threads(threads)


@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 70),
    values=st.lists(st.floats(width=32), min_size=1, max_size=200),
    bits=st.integers(2, 8),
    rowwise=st.booleans(),
    transposed=st.booleans(),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
)
def test_any_float32_values_equal_the_twin(
    fused, rows, cols, values, bits, rowwise, transposed, seed
):
    cycled = values * (rows * cols // len(values) + 1)
    a = torch.tensor(cycled[: rows * cols], dtype=torch.float32).view(rows, cols)
    _assert_twin(
        fused, _laid_out(a, "transposed") if transposed else a, _bound(bits), rowwise, _keys(seed)
    )


def test_checks_its_arguments(fused):
    a = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="2-D floating-point"):
        fused.quantize_rows_int8(torch.ones(2, 3, 4), _bound(8), True, None)
    with pytest.raises(RuntimeError, match="2-D floating-point"):
        fused.quantize_rows_int8(torch.ones(2, 3, dtype=torch.int32), _bound(8), True, None)
    with pytest.raises(RuntimeError, match=r"bound must be in \[1, 127\]"):
        fused.quantize_rows_int8(a, torch.tensor(128.0), True, None)
    with pytest.raises(RuntimeError, match="one value"):
        fused.quantize_rows_int8(a, torch.ones(2), True, None)
    with pytest.raises(RuntimeError, match="keys"):
        fused.quantize_rows_int8(a, _bound(8), True, torch.ones(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="levels_dtype must be int8 or float32"):
        fused.quantize_rows_int8(a, _bound(8), True, None, torch.int16)


def test_op_passes_opcheck_and_compiles_into_one_graph(fused):
    a = _values((6, 40), seed=4)
    keys = _keys(7)
    for operand in (a, a.t().contiguous().t(), a[:, ::2], a.to(torch.bfloat16)):
        for rowwise in (True, False):
            for k in (None, keys):
                torch.library.opcheck(
                    torch.ops.qtrain.quantize_rows_int8, (operand, _bound(8), rowwise, k)
                )
                torch.library.opcheck(
                    torch.ops.qtrain.quantize_rows_int8,
                    (operand, _bound(8), rowwise, k, torch.float32),
                )

    def step(x: torch.Tensor) -> torch.Tensor:
        levels, scale = fused.quantize_rows_int8(x.t(), _bound(8), True, keys)
        return levels.float() * scale.view(-1, 1)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a), step(a))


@pytest.mark.parametrize("length", [1, 15, 16, 17, 32, 48, 63, 64, 65, 128, 129, 200])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_lengths_around_the_vector_widths_equal_the_twin(fused, length, layout):
    """Levels are written 16 values at a time and stored 64 at a time, with masked tails:
    every length around those widths, with a NaN, ±inf, zeros and ties in one row each, per
    row and per tensor, and subnormal rows (the scale floored at the smallest normal)."""
    a = _values((6, length), seed=length)
    a[1, length // 2] = NAN
    a[2, -1] = INF
    a[3, 0] = -INF
    a[4] = 0.0
    a[5] = torch.arange(length, dtype=torch.float32) - length / 2 + 0.5  # ties at scale 1
    a[5, 0] = 127.0 * 2  # the row's scale 2: every other value a tie
    for rowwise in (True, False):
        _assert_twin(fused, _laid_out(a, layout), _bound(8), rowwise, None)
        _assert_twin(fused, _laid_out(a[[0, 4, 5]], layout), _bound(4), rowwise, None)
    subnormal = torch.full((2, length), 1e-39)
    subnormal[1, 0] = -4e-39
    for rowwise in (True, False):
        _assert_twin(fused, _laid_out(subnormal, layout), _bound(8), rowwise, None)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (1000, 7), (7, 1000), (48, 200)])
def test_both_operands_of_a_gradient_in_one_call_equal_the_two_calls(fused, shape):
    """quantize_rows_int8_both: the rows' levels (one bound) and the transposed operand's (the
    other), bitwise the two quantize_rows_int8 calls — edge values in rows and columns, a
    bfloat16 input, an empty one."""
    a = _values(shape, seed=shape[0])
    if a.numel() > 2:
        a[0, -1], a[-1, 0] = NAN, INF
        a[shape[0] // 2] = 0.0
    for rows_bits, cols_bits in [(8, 8), (8, 5), (3, 8)]:
        for operand in (a, a.to(torch.bfloat16)):
            got = fused.quantize_rows_int8_both(operand, _bound(rows_bits), _bound(cols_bits))
            want = (
                *fused.quantize_rows_int8(operand, _bound(rows_bits), True),
                *fused.quantize_rows_int8(operand.t(), _bound(cols_bits), True),
            )
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                if g.is_floating_point():
                    assert torch.equal(g.isnan(), w.isnan())
                    assert torch.equal(
                        g[~g.isnan()].view(torch.int32), w[~w.isnan()].view(torch.int32)
                    )
                else:
                    assert torch.equal(g, w)
    empty = fused.quantize_rows_int8_both(torch.empty(0, 4), _bound(8), _bound(8))
    assert empty[0].shape == (0, 4) and empty[2].shape == (4, 0) and (empty[3] == 1).all()
    finite = _values(shape, seed=1)  # opcheck compares NaN as unequal
    torch.library.opcheck(torch.ops.qtrain.quantize_rows_int8_both, (finite, _bound(8), _bound(6)))
