"""Property-based fuzzing of specs × tensors: every input is handled correctly or refused.

Specs are drawn from raw constructor arguments, valid or not; tensors from every float dtype,
ranks 0..4 with empty dimensions, contiguous or not, values from ±1e-45 to the dtype's largest
(float32's for float64), with NaN/±inf planted. The contract checked on each case:

- construction either succeeds or raises ``FormatError``/``QuantSpecError`` naming the field;
- ``quantize``/``quantize_int``/``QLinear`` either return, or raise ``QuantSpecError``,
  ``NonFiniteError`` (only for NaN/inf input) or ``TypeError`` with a message — never another
  exception type;
- a result has the input's shape and dtype; finite input gives finite output (except where the
  format itself defines overflow to inf or NaN); NaN/inf input is refused under
  ``nonfinite="error"`` and passed through under ``"propagate"``;
- ``quantize`` equals the dequantized ``quantize_int`` (held in x's dtype's finite range), a
  torch-backed minifloat equals torch's cast, and symmetric integer rounding errs by at most
  half a step;
- no case runs longer than ``CASE_SECONDS`` (a hang fails the test).

The number of cases comes from the Hypothesis profile (tests/conftest.py: 25 per test in CI;
``HYPOTHESIS_PROFILE=thorough`` for 500); docs/RELIABILITY.md records a thorough run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtrain import formats
from qtrain.formats import BlockFloat, FormatError, Int, MiniFloat
from qtrain.nn import QLinear
from qtrain.ops import GemmConfig
from qtrain.quantizer import (
    AbsMax,
    Clip,
    LearnedStep,
    MinMax,
    NonFiniteError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    PowerOfTwo,
    QParams,
    QuantSpec,
    QuantSpecError,
    Rounding,
    quantize,
    quantize_int,
)

CASE_SECONDS = 20  # far above any legitimate case (milliseconds); only a hang reaches it
# A case takes milliseconds, so CI runs hundreds; QTRAIN_FUZZ_EXAMPLES sets more for a long run.
FUZZ = settings(
    max_examples=int(os.environ.get("QTRAIN_FUZZ_EXAMPLES", max(300, settings().max_examples))),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REFUSALS = (QuantSpecError, NonFiniteError, TypeError)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

F32_MAX = torch.finfo(torch.float32).max


@contextlib.contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (main thread, POSIX)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- strategies: constructor arguments, mostly valid, some not ---------------------------


def args(cls: type, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[type, dict]]:
    """(class, keyword arguments) to build inside the test, so a refusal is part of the test."""
    return st.tuples(st.just(cls), st.fixed_dictionaries(fields))


any_axis = st.one_of(st.integers(-1, 1), st.integers(-5, 4))  # some out of range on purpose
granularities = st.one_of(
    args(PerTensor),
    args(PerChannel, axis=any_axis),
    args(PerGroup, group_size=st.integers(1, 6), axis=any_axis),
    args(PerToken),
)
# Refused: <= 0, NaN, inf. Beyond float32's range (1e-300, 1e300) the scale is held inside it.
clip_values = st.one_of(
    st.floats(-1, 0),
    st.floats(1e-3, 1e3),
    st.floats(1e-300, 1e300),
    st.sampled_from([math.nan, math.inf]),
)
common = {"rounding": st.sampled_from(list(Rounding)), "nonfinite": st.sampled_from(
    ["error", "propagate"])}  # fmt: skip
int_formats = st.one_of(
    args(Int, bits=st.integers(2, 16), signed=st.booleans()),
    st.sampled_from([Int(1, signed=False), formats.INT8, formats.INT4, formats.UINT8]),
)
minifloats = st.one_of(
    args(MiniFloat, exponent_bits=st.integers(2, 8), mantissa_bits=st.integers(1, 23),
         has_inf=st.booleans(), saturate=st.booleans()),
    st.sampled_from([formats.FP8_E4M3, formats.FP8_E5M2, formats.BF16, formats.FP16]),
)  # fmt: skip
valid_spec_args = st.one_of(
    st.fixed_dictionaries({"format": int_formats, "granularity": granularities, "scale": st.one_of(
        st.none(), args(AbsMax), args(MinMax), args(PowerOfTwo), args(LearnedStep),
        args(Clip, value=st.floats(1e-3, 1e3))), **common}),
    st.fixed_dictionaries({"format": int_formats, "granularity": args(PerTensor),
                           "scale": args(MinMax, batch_mean=st.just(True)), **common}),
    st.fixed_dictionaries({"format": minifloats, "granularity": granularities,
                           "scale": st.one_of(st.none(), args(AbsMax)), **common}),
    st.fixed_dictionaries({"format": args(BlockFloat, mantissa_bits=st.integers(2, 16),
                                          block_size=st.integers(1, 6), axis=st.integers(-3, 3)),
                           "granularity": args(PerTensor), "scale": st.none(), **common}),
)  # fmt: skip
# Anything the constructors take a value for: out-of-range numbers, incompatible parts.
raw_spec_args = st.fixed_dictionaries({
    "format": st.one_of(
        args(Int, bits=st.integers(-1, 18), signed=st.booleans()),
        args(MiniFloat, exponent_bits=st.integers(1, 9), mantissa_bits=st.integers(-1, 24),
             has_inf=st.booleans(), saturate=st.booleans()),
        args(BlockFloat, mantissa_bits=st.integers(1, 17), block_size=st.integers(0, 6),
             axis=st.integers(-3, 3))),
    "granularity": st.one_of(granularities, args(PerGroup, group_size=st.integers(-1, 0))),
    "scale": st.one_of(st.none(), args(AbsMax), args(PowerOfTwo), args(LearnedStep),
                       args(MinMax, batch_mean=st.booleans()), args(Clip, value=clip_values)),
    "rounding": st.sampled_from(list(Rounding)),
    "nonfinite": st.sampled_from(["error", "propagate", "ignore"]),
})  # fmt: skip
spec_args = st.one_of(valid_spec_args, valid_spec_args, valid_spec_args, raw_spec_args)


def largest(dtype: torch.dtype) -> float:
    """The largest finite value a result in ``dtype`` may take (the quantizer computes in
    float32)."""
    return min(torch.finfo(dtype).max, F32_MAX)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A float tensor of any rank 0..4 (empty dimensions too), contiguous or not, values from
    tiny to the dtype's largest magnitude, possibly with NaN/±inf planted."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    limit = largest(dtype)
    elements = st.floats(-limit, limit, allow_nan=False, allow_subnormal=True, width=32)
    x = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements))).to(dtype)
    if draw(st.booleans()):  # every value at most the smallest normal number: subnormals, 0
        x = x / limit * torch.finfo(dtype).tiny
    if x.numel() and draw(st.integers(0, 3)) == 0:
        special = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    if x.dim() >= 2 and draw(st.booleans()):
        x = x.transpose(0, -1)  # a non-contiguous view of the same values
    return x


def build(args: tuple[type, dict[str, Any]] | Any) -> Any:
    return args if not isinstance(args, tuple) else args[0](**args[1])


def build_spec(raw: dict[str, Any]) -> QuantSpec | None:
    """The spec, or None when a constructor refused its arguments (with a proper error)."""
    try:
        parts = {key: build(value) for key, value in raw.items() if key != "scale"}
        scale = None if raw["scale"] is None else build(raw["scale"])
        return QuantSpec(**parts, scale=scale)
    except (FormatError, QuantSpecError) as err:
        assert str(err), "a refusal must say why"
        event("spec refused by its constructor")
        return None


# ---- reference checks -----------------------------------------------------------------------


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, like: torch.Tensor
) -> torch.Tensor:
    """(q − z)·s laid out as ``quantize_int`` documents (PerGroup: split the group axis), held
    in x's dtype's finite range as ``quantize`` holds it."""
    levels = q.to(torch.float32)
    if isinstance(spec.granularity, PerGroup) and like.dim():
        axis = spec.granularity.axis % like.dim()
        size = like.shape[axis]
        split = levels.unflatten(axis, (size // spec.granularity.group_size, -1))
        y = ((split - zero.unsqueeze(axis + 1)) * scale.unsqueeze(axis + 1)).flatten(axis, axis + 1)
    else:
        y = (levels - zero) * scale
    return y.clamp(-largest(like.dtype), largest(like.dtype)).to(like.dtype)


def format_may_overflow(spec: QuantSpec) -> bool:
    """A minifloat cast without a scale overflows to inf (or NaN without inf) by definition."""
    return isinstance(spec.format, MiniFloat) and spec.scale is None and not spec.format.saturate


def check_result(x: torch.Tensor, spec: QuantSpec, y: torch.Tensor) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    finite = torch.isfinite(x)
    if spec.int_format is not None:
        # Integer formats: NaN/inf was refused unless propagated, and then passes through.
        refused = spec.nonfinite == "error"
        assert not refused or bool(finite.all()), "NaN/inf input was not refused"
        assert torch.equal(y[~finite].isnan(), x[~finite].isnan())
        assert bool(torch.isfinite(y[finite]).all()), "finite input gave a non-finite output"
    else:
        assert bool(torch.isnan(y[x.isnan()]).all()), "a NaN input did not stay NaN"
        if not format_may_overflow(spec):
            assert bool(torch.isfinite(y[finite]).all()), "finite input gave a non-finite output"


def check_against_references(x: torch.Tensor, spec: QuantSpec, y: torch.Tensor) -> None:
    fmt = spec.format
    if x.numel() == 0:  # nothing to compare
        return
    if isinstance(fmt, MiniFloat) and spec.scale is None and spec.rounding is Rounding.NEAREST:
        # The presets are bit-exact with torch's casts, NaN/inf included whatever the policy.
        if fmt.torch_dtype is not None:
            expected = x.to(torch.float32).to(fmt.torch_dtype).to(torch.float32).to(x.dtype)
            torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
        return
    if spec.int_format is None or isinstance(spec.scale, LearnedStep):
        return
    if not bool(torch.isfinite(x).all()):
        return
    generator = torch.Generator().manual_seed(1)
    q, scale, zero = quantize_int(x, spec, generator=generator)
    expected = quantize(x, spec, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dequantize(q, scale, zero, spec, x), expected, rtol=0, atol=0)
    # A symmetric scale covers every value of a signed format (unsigned ones clip negatives).
    symmetric = isinstance(spec.scale, AbsMax | PowerOfTwo) and spec.int_format.signed
    if symmetric and spec.rounding is Rounding.NEAREST and x.dtype is torch.float32:
        step = dequantize(torch.ones_like(q), scale, torch.zeros_like(zero), spec, x)
        error = (y - x).abs()
        assert bool((error <= step * (0.5 + 1e-6)).all()), "rounding error above half a step"


# ---- the properties ---------------------------------------------------------------------------


def refused(err: Exception, x: torch.Tensor) -> None:
    """A refusal says why, and only NaN/inf input is refused as non-finite."""
    assert str(err), "a refusal must say why"
    if isinstance(err, NonFiniteError):
        assert not bool(torch.isfinite(x).all()), f"finite input refused as non-finite: {err}"
    event(f"refused: {type(err).__name__}")


# A learned step (LSQ) is the caller's tensor: zero, negative, NaN and inf ones must be refused.
steps = st.sampled_from([0.05, 0.05, 0.05, 1e-30, 3.0, 1e30, 0.0, -0.5, math.nan, math.inf])


@FUZZ
@given(raw=spec_args, x=tensors(), integer_input=st.sampled_from([False] * 7 + [True]),
       step=steps)  # fmt: skip
def test_quantize_handles_or_refuses_every_spec_and_tensor(
    raw: dict[str, Any], x: torch.Tensor, integer_input: bool, step: float
) -> None:
    spec = build_spec(raw)
    if spec is None:
        return
    if integer_input:
        x = x.nan_to_num().clamp(-100, 100).to(torch.int32)
    learned = isinstance(spec.scale, LearnedStep)
    with no_hang(CASE_SECONDS):
        try:
            y = quantize(x, spec, generator=torch.Generator().manual_seed(1),
                         step=torch.tensor(step) if learned else None)  # fmt: skip
        except REFUSALS as err:
            refused(err, x)
            return
        assert not learned or (math.isfinite(step) and step > 0), "a bad step was not refused"
        event("result checked" + ("" if bool(torch.isfinite(x).all()) else " (NaN/inf input)"))
        assert not integer_input, "an integer tensor must be refused"
        check_result(x, spec, y)
        check_against_references(x, spec, y)


@FUZZ
@given(raw=spec_args, x=tensors())
def test_quantize_int_handles_or_refuses(raw: dict[str, Any], x: torch.Tensor) -> None:
    spec = build_spec(raw)
    if spec is None:
        return
    with no_hang(CASE_SECONDS):
        try:
            q, scale, zero = quantize_int(x, spec)
        except REFUSALS as err:
            refused(err, x)
            return
    event("result checked")
    assert spec.int_format is not None, "quantize_int must refuse a minifloat"
    assert bool(torch.isfinite(x).all()), "quantize_int must refuse NaN/inf"
    assert q.shape == x.shape and q.dtype == spec.int_format.storage_dtype
    int_format = spec.int_format
    if q.numel():
        assert int_format.qmin <= int(q.min()) and int(q.max()) <= int_format.qmax
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())


int_specs = st.builds(
    QuantSpec,
    format=st.builds(Int, bits=st.integers(2, 16), signed=st.booleans()),
    granularity=st.one_of(
        st.just(PerTensor()),
        st.builds(PerChannel, axis=st.integers(-3, 2)),
        st.builds(PerGroup, group_size=st.integers(1, 4), axis=st.integers(-3, 2)),
        st.just(PerToken()),
    ),
    rounding=st.sampled_from(list(Rounding)),
    nonfinite=st.sampled_from(["error", "propagate"]),
)


@FUZZ
@given(
    specs=st.lists(st.one_of(st.none(), int_specs), min_size=4, max_size=4),
    batch=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    features=st.integers(1, 6),
    plant=st.sampled_from([None, math.nan, math.inf]),
    save_levels=st.booleans(),
)
def test_qlinear_forward_backward_handles_or_refuses(
    specs: list[QuantSpec | None],
    batch: list[int],
    features: int,
    plant: float | None,
    save_levels: bool,
) -> None:
    try:
        config = GemmConfig(*specs, save_quantized_input=save_levels)
        layer = QLinear(features, 3, config=config)
    except QuantSpecError:
        event("config refused by its constructor")
        return
    x = torch.randn(*batch, features, requires_grad=True)
    if plant is not None and x.numel():
        with torch.no_grad():
            x.view(-1)[0] = plant
    with no_hang(CASE_SECONDS):
        try:
            y = layer(x)
            y.sum().backward()
        except REFUSALS as err:
            refused(err, x.detach())
            return
    event("result checked")
    assert y.shape == (*batch, 3)
    if plant is None:
        assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(layer.weight.grad).all())


# ---- edges the fuzzed values reach rarely or not at all (once known gaps) ---------------------


def test_affine_range_beyond_float32_max_stays_finite() -> None:
    x = torch.tensor([3e38, -3e38, 1.0])
    assert bool(torch.isfinite(quantize(x, QuantSpec(Int(8, signed=False)))).all())
    y = quantize(torch.tensor([F32_MAX, -F32_MAX]), QuantSpec(Int(1, signed=False)))
    assert bool(torch.isfinite(y).all())


def test_batch_mean_range_of_values_near_float32_max_is_not_refused() -> None:
    x = torch.full((4, 3), 3e38)  # the per-sample maxima's float32 sum overflows
    y = quantize(x, QuantSpec(Int(8, signed=False), scale=MinMax(batch_mean=True)))
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(Int(8, signed=False)), QuantSpec(BlockFloat(2, block_size=1)),
     QuantSpec(Int(2), scale=PowerOfTwo()), QuantSpec(Int(4), scale=LearnedStep())],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_near_its_dtype_max_stays_finite(spec: QuantSpec, dtype: torch.dtype) -> None:
    top = largest(dtype)
    x = torch.tensor([top, -top, top / 2, 1.0]).to(dtype)
    step = torch.tensor(top / 4) if isinstance(spec.scale, LearnedStep) else None
    y = quantize(x, spec, step=step)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    # Held at the dtype's largest value where the grid reaches past it, as a saturating cast.
    torch.testing.assert_close(y[:2].float(), x[:2].float(), rtol=0.01, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -0.1])
def test_learned_step_must_be_finite_and_positive(bad: float) -> None:
    spec = QuantSpec(Int(4), scale=LearnedStep())
    with pytest.raises(QuantSpecError, match=r"step must be finite and > 0, got"):
        quantize(torch.randn(8), spec, step=torch.tensor(bad))
    per_channel = QuantSpec(Int(4), granularity=PerChannel(0), scale=LearnedStep())
    with pytest.raises(QuantSpecError, match="at index 1"):
        quantize(torch.randn(3, 4), per_channel, step=torch.tensor([0.1, bad, 0.1]))


def test_learned_step_of_the_wrong_size_or_type_is_refused() -> None:
    spec = QuantSpec(Int(4), granularity=PerChannel(0), scale=LearnedStep())
    with pytest.raises(QuantSpecError, match="step must hold 1 or 3 value"):
        quantize(torch.randn(3, 4), spec, step=torch.ones(4))
    with pytest.raises(TypeError, match="step must be a floating-point tensor, got float"):
        quantize(torch.randn(3, 4), spec, step=0.1)


def test_clip_value_beyond_float32_range_stays_finite() -> None:
    x = torch.tensor([0.0, 1.0, -2.0, 3e38])
    tiny = quantize(x, QuantSpec(Int(8), scale=Clip(1e-300)))
    assert bool(torch.isfinite(tiny).all()) and float(tiny.abs().max()) < 1e-30  # ≈ the clip
    huge = quantize(x, QuantSpec(Int(8), scale=Clip(1e300)))
    assert bool(torch.isfinite(huge).all())


def test_learned_step_refuses_nan_input() -> None:
    spec = QuantSpec(Int(4), scale=LearnedStep())
    with pytest.raises(NonFiniteError):
        quantize(torch.tensor([1.0, math.nan]), spec, step=torch.tensor(0.1))


def test_learned_step_propagates_nan_and_learns_from_finite_values() -> None:
    spec = QuantSpec(Int(4), scale=LearnedStep(), nonfinite="propagate")
    x = torch.tensor([0.3, math.nan, math.inf, -0.2], requires_grad=True)
    step = torch.tensor(0.1, requires_grad=True)
    y = quantize(x, spec, step=step)
    assert torch.isnan(y[1]) and y[2] == math.inf and bool(torch.isfinite(y[[0, 3]]).all())
    y[[0, 3]].sum().backward()
    assert bool(torch.isfinite(step.grad))


@pytest.mark.parametrize(
    ("qparams", "message"),
    [(QParams(torch.ones(5), torch.zeros(5)), "qparams.scale must hold 3 value"),
     (QParams(torch.ones(3), torch.zeros(2)), "qparams.zero_point must hold 3 value"),
     (QParams(torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3)), "scale 0.0 and zero point"),
     (QParams(torch.ones(3), torch.tensor([0.0, 0.0, math.nan])), "at index 2")],
)  # fmt: skip
def test_given_qparams_are_checked(qparams: QParams, message: str) -> None:
    spec = QuantSpec(Int(8), granularity=PerChannel(0))
    for call in (quantize, quantize_int):
        with pytest.raises(QuantSpecError, match=message):
            call(torch.randn(3, 4), spec, qparams=qparams)


def test_empty_tensor_is_checked_against_the_granularity() -> None:
    with pytest.raises(QuantSpecError, match="out of range"):
        quantize(torch.empty(0, 4), QuantSpec(Int(8), granularity=PerChannel(2)))


def test_float64_beyond_float32_range_is_refused_naming_it() -> None:
    with pytest.raises(QuantSpecError, match="beyond float32's range"):
        quantize(torch.tensor([1e300, 1.0], dtype=torch.float64), QuantSpec(Int(8)))


def test_propagate_keeps_a_saturating_minifloat_cast_like_torch() -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 500.0])
    y = quantize(x, QuantSpec(formats.FP8_E4M3, nonfinite="propagate"))
    torch.testing.assert_close(y, x.to(torch.float8_e4m3fn).float(), equal_nan=True)


def test_saved_levels_input_near_float32_max_stays_finite() -> None:
    # GemmConfig(save_quantized_input=True), SBM's default, fake-quantizes the input in ops'
    # own fused pass; it must hold a result past float32's largest value at it, as quantize does.
    spec = QuantSpec(Int(8, signed=False))
    layer = QLinear(4, 4, bias=False, config=GemmConfig(spec, save_quantized_input=True))
    x = torch.tensor([[3.4e38, -3.4e38, 1e38, 1.0]])
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4) * 1e-3)
    assert bool(torch.isfinite(layer(x)).all())
