"""The triton backend against the reference kernels: bit-exact results for nearest and
stochastic rounding with the same seed, edge values, the GEMM kernels of ``triton_gemm``
(``quantize_rows`` against ``qtrain.lowp_products``' PyTorch twin, ``int8_mm`` against
``torch._int_mm`` + the same epilogue), registration and the loaders.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on small CPU
tensors; with CUDA they are compiled and run on the GPU, against the same expectations.
"""

from __future__ import annotations

import pytest
import torch

from qtrain import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, Rounding, formats
from qtrain import quantize as quantize_tensor
from qtrain.kernels import (
    Backend,
    implementation,
    reference,
    triton_gemm,
    triton_quant,
    use_backend,
)
from qtrain.lowp_products import _epilogue, _hash_keys, _quantize_twin
from qtrain.quantizer import MinMax, quantize_int

pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
# The interpreter computes in numpy, which warns on inf − inf and the like, as a GPU does not.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN, INF = float("nan"), float("inf")
SEEDS = [None, 12345, 2**40 + 7, 2**64 - 1]
# (O, C, I): per-tensor, a ragged per-tensor block, O > 1, per-token rows, one value per scale.
SHAPES = [(1, 1, 1), (1, 1, 1500), (3, 4, 17), (1, 9, 16), (5, 7, 1)]
MINIFLOATS = [
    formats.FP8_E4M3,
    formats.FP8_E5M2,
    formats.BF16,
    formats.FP16,
    formats.MiniFloat(2, 1, has_inf=False, saturate=True),
    formats.MiniFloat(3, 2, has_inf=False),
]


def _loaded(load):
    """The module ``load()`` returns; on a machine without CUDA, under the interpreter (kept on
    while the fixture lives)."""
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE.type == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        module = load()
        assert module is not None
        yield module


@pytest.fixture(scope="module")
def impl():
    """The backend module (triton_quant)."""
    yield from _loaded(triton_quant.load)


@pytest.fixture(scope="module")
def gemm():
    """The GEMM kernels' module (triton_gemm)."""
    yield from _loaded(triton_gemm.load)


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes, dtypes and bit patterns; any NaN matches any NaN at the same place (the
    sign of a NaN that arithmetic produces is unspecified)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    actual, expected = actual.float(), expected.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def _values(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normal values spread over many binades, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g))
    return x.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
def test_reductions_match_reference(impl, shape):
    x3 = _values(shape)
    _same(impl.absmax(x3), reference.absmax(x3))
    for got, want in zip(impl.minmax(x3), reference.minmax(x3), strict=True):
        _same(got, want)


def test_reductions_propagate_nan_and_inf(impl):
    x3 = _values((2, 3, 40))
    x3[1, 0, 5] = NAN
    x3[0, 1, 7] = -INF
    _same(impl.absmax(x3), reference.absmax(x3))
    for got, want in zip(impl.minmax(x3), reference.minmax(x3), strict=True):
        _same(got, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_int_matches_reference(impl, shape, seed):
    x3 = _values(shape, seed=1)
    channels = shape[1]
    scale = (reference.absmax(x3) / 100).clamp_min(1e-30)
    zero = torch.arange(channels, dtype=torch.float32, device=DEVICE) - channels // 2
    # qmin/qmax beyond the scale's range: both clamps and the STE mask are exercised.
    got, got_mask = impl.fake_quant_int(x3, scale, zero, -90, 90, seed, True)
    want, want_mask = reference.fake_quant_int(x3, scale, zero, -90, 90, seed, True)
    _same(got, want)
    assert torch.equal(got_mask, want_mask)
    _same(
        impl.quant_int(x3, scale, zero, 0, 255, seed),
        reference.quant_int(x3, scale, zero, 0, 255, seed),
    )


def test_fake_quant_int_keeps_nan(impl):
    x3 = torch.tensor([[[NAN, 1.0, -INF, 0.3, -0.0]]], device=DEVICE)
    one, zero = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    for seed in (None, 7):
        got, mask = impl.fake_quant_int(x3, one, zero, -7, 7, seed, True)
        want, want_mask = reference.fake_quant_int(x3, one, zero, -7, 7, seed, True)
        _same(got, want)
        assert torch.equal(mask, want_mask)


@pytest.mark.parametrize("seed", [None, 2**40 + 7])
def test_fake_quant_int_pair_matches_reference(impl, seed):
    x3 = _values((3, 4, 17), seed=4)
    x3[0, 0, :3] = torch.tensor([NAN, INF, -INF], device=DEVICE)
    scale = (reference.absmax(x3.nan_to_num(0.0, 0.0, 0.0)) / 100).clamp_min(1e-30)
    zero = torch.full((4,), 60.0, device=DEVICE)
    args = (x3, scale, zero, 0, 120, scale / 300, zero * 300, 0, 65535, seed)
    for got, want in zip(
        impl.fake_quant_int_pair(*args), reference.fake_quant_int_pair(*args), strict=True
    ):
        _same(got, want)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.float32])
def test_saved_levels_and_their_dequantization_match_reference(impl, dtype):
    x3 = _values((3, 4, 17), seed=2)
    x3[0, 0, :4] = torch.tensor([NAN, INF, -INF, -0.0], device=DEVICE)
    scale = (reference.absmax(x3.nan_to_num(0.0, 0.0, 0.0)) / 100).clamp_min(1e-30)
    zero = torch.full((4,), 60.0, device=DEVICE)  # levels 0..120 fit every storage dtype
    for seed in (None, 2**40 + 7):
        args = (x3, scale, zero, 0, 120, seed, True, dtype)
        for got, want in zip(
            impl.fake_quant_int_levels(*args), reference.fake_quant_int_levels(*args), strict=True
        ):
            _same(got, want)
        levels = reference.fake_quant_int_levels(*args)[2]
        _same(impl.dequant_int(levels, scale, zero), reference.dequant_int(levels, scale, zero))


@pytest.mark.parametrize("seed", [None, 99, 2**40 + 7])
@pytest.mark.parametrize("fmt", MINIFLOATS, ids=str)
def test_fake_quant_minifloat_matches_reference(impl, fmt, seed):
    # Values across float32's whole range (subnormals of the format and of float32, overflow),
    # and the specials.
    x = torch.randn(1200, generator=torch.Generator().manual_seed(3)) * torch.logspace(
        -44, 38, 1200
    )
    x[:6] = torch.tensor([INF, -INF, NAN, -0.0, 0.0, 1e-45])
    x = x.to(DEVICE)
    args = (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf, fmt.saturate, seed)
    _same(impl.fake_quant_minifloat(x, *args), reference.fake_quant_minifloat(x, *args))


def _operand(layout: str) -> torch.Tensor:
    """A (40, 70) operand with a NaN row entry, an all-zero row and a large outlier."""
    a = _values((40, 70), seed=5)
    a[3, 5] = NAN
    a[7] = 0.0
    a[9, 2] = 3e4
    if layout == "column-major":
        return a.t().contiguous().t()
    return a.to(torch.bfloat16) if layout == "bfloat16" else a


@pytest.mark.parametrize("layout", ["row-major", "column-major", "bfloat16"])
@pytest.mark.parametrize(
    "dtype, bound, stochastic",
    [
        (torch.int8, 127.0, False),
        (torch.int8, 127.0, True),
        (torch.int8, 7.0, True),
        (torch.float8_e4m3fn, 448.0, False),
        (torch.float8_e5m2, 57344.0, False),
    ],
)
def test_quantize_rows_matches_twin(gemm, layout, dtype, bound, stochastic):
    a = _operand(layout)
    bound_t = torch.tensor(bound, device=DEVICE)
    keys = _hash_keys(torch.tensor(2**40 + 7, device=DEVICE)) if stochastic else None
    q, scale = gemm.quantize_rows(a, bound_t, dtype, keys)
    want_q, want_scale = _quantize_twin(a, dtype, bound_t, keys, rowwise=True)
    _same(q, want_q)
    _same(scale, want_scale)


def test_quantize_rows_with_given_scale(gemm):
    a = _operand("row-major")[10:]  # no NaN: the tensor-wise scale is finite
    bound = torch.tensor(127.0, device=DEVICE)
    want_q, want_scale = _quantize_twin(a, torch.int8, bound, None, rowwise=False)
    q, scale = gemm.quantize_rows(a, bound, torch.int8, None, want_scale)
    _same(q, want_q)
    _same(scale, want_scale)


@pytest.mark.parametrize("m, k, n", [(40, 72, 56), (5, 33, 7)])
@pytest.mark.parametrize("row_scales", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_mm_matches_int_mm_and_epilogue(gemm, m, k, n, row_scales, out_dtype):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(DEVICE)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(DEVICE)
    scale_a = torch.rand(m if row_scales else 1, generator=g).to(DEVICE)
    scale_b = torch.rand(n if row_scales else 1, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    # The CPU's _int_mm takes any shape; it is the exact int32 product in both cases.
    acc = torch._int_mm(a.cpu(), b.cpu().t()).to(DEVICE)
    for with_bias in (None, bias):
        want = _epilogue(acc, scale_a, scale_b, with_bias, out_dtype)
        _same(gemm.int8_mm(a, b, scale_a, scale_b, with_bias, out_dtype), want)
    # A column-major B (e.g. a transposed weight) is read through its strides.
    column_major = b.t().contiguous().t()
    want = _epilogue(acc, scale_a, scale_b, None, out_dtype)
    _same(gemm.int8_mm(a, column_major, scale_a, scale_b, None, out_dtype), want)


SPECS = [
    QuantSpec(formats.INT8),
    QuantSpec(formats.Int(4), granularity=PerChannel(0), rounding=Rounding.STOCHASTIC),
    QuantSpec(formats.UINT8, granularity=PerToken(), scale=MinMax()),
    QuantSpec(formats.Int(6), granularity=PerGroup(8)),
    QuantSpec(formats.FP8_E4M3, granularity=PerTensor(), rounding=Rounding.STOCHASTIC),
    QuantSpec(formats.FP8_E5M2),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantizer_through_the_backend_matches_reference(impl, spec):
    x = _values((6, 32), seed=8)
    results = []
    for backend in (Backend.REFERENCE, Backend.TRITON):
        with use_backend(backend):
            g = torch.Generator().manual_seed(4)
            results.append(quantize_tensor(x, spec, generator=g))
    _same(results[1], results[0])
    if spec.int_format is not None and spec.rounding is Rounding.NEAREST:
        with use_backend(Backend.TRITON):
            levels, scale, zero = quantize_int(x, spec)
        with use_backend(Backend.REFERENCE):
            want = quantize_int(x, spec)
        for got, expected in zip((levels, scale, zero), want, strict=True):
            _same(got, expected)


def test_operators_trace_with_fake_tensors(impl, gemm):
    """The torch.library registrations (schemas, fake kernels) pass torch's own checks."""
    x3 = _values((1, 3, 8))
    torch.library.opcheck(
        torch.ops.qtrain.triton_channel_reduce.default, (x3, True), test_utils="test_faketensor"
    )
    bound = torch.tensor(127.0, device=DEVICE)
    torch.library.opcheck(
        torch.ops.qtrain.triton_quantize_rows.default,
        (x3[0], bound, None, None, torch.int8),
        test_utils="test_faketensor",
    )


def test_auto_picks_triton_only_on_cuda(impl):
    assert implementation(torch.device("cpu"), Backend.AUTO) is not triton_quant
    if torch.cuda.is_available():
        assert implementation(torch.device("cuda"), Backend.AUTO) is triton_quant


def test_loader_reports_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_quant, "_cuda_available", lambda: False)
    assert triton_quant.load() is None
    with pytest.raises(RuntimeError, match="triton"):
        implementation(torch.device("cpu"), Backend.TRITON)


def test_gemm_loader_reports_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_quant, "_cuda_available", lambda: False)
    assert triton_gemm.load() is None


def test_stochastic_rounding_is_unbiased_at_and_near_both_range_ends(impl) -> None:
    """The affine grid of a range straddling zero holds both ends (``MinMax``); the triton
    rounding keeps the mean of many draws at x there, as the CPU backends do
    (tests/test_quantizer.py has the same check with the nudged grid failing it)."""
    from qtrain.quantizer import qparams_from_range

    low, high, n = -1.0, 3.0, 20_000
    qparams = qparams_from_range(torch.tensor([low]), torch.tensor([high]), formats.UINT8)
    step = float(qparams.scale)
    near = torch.tensor([0.0, 0.1, 0.3, 0.49, 0.7, 0.95])
    probes = torch.cat([low + near * step, high - near * step])
    x3 = probes.repeat(n).view(1, 1, -1).to(DEVICE)
    scale, zero = qparams.scale.to(DEVICE), qparams.zero_point.to(DEVICE)
    y, _ = impl.fake_quant_int(x3, scale, zero, 0, 255, 2024, False)
    mean = y.view(n, -1).double().mean(0).cpu()
    assert (mean - probes.double()).abs().max().item() <= 5 * step / (2 * n**0.5) + step * 2**-24
