"""The ``triton`` backend: the quantizer's primitives as Triton kernels for CUDA GPUs.

Same primitives, signatures and results as ``qtrain.kernels.reference`` — bit-identical for
nearest rounding and for stochastic rounding with the same seed, because stochastic rounding
draws its uniforms from the reference's counter-based hash (``reference.uniform_bits``),
computed here on uint32 lanes, instead of Triton's Philox: one seed gives one result on every
backend. The kernels for the low-precision GEMMs of ``qtrain.lowp`` (``quantize_rows``,
``int8_mm``) live in ``qtrain.kernels.triton_gemm`` and call the device functions here.

Kernels are ``torch.library`` operators (``torch.ops.qtrain.triton_*``) with fake
implementations, so ``torch.compile`` traces them as opaque ops. The kernels are jitted on the
first ``load()``, not when qtrain is imported: the import stays cheap, and
``TRITON_INTERPRET=1`` set any time before that selects Triton's interpreter, which runs the
kernels on CPU tensors — how CI tests them. Where Triton is missing, or there is neither CUDA
nor interpreter mode, ``load`` returns None and ``Backend.AUTO`` falls back to the reference.

>>> import os, torch
>>> os.environ["TRITON_INTERPRET"] = "1"  # CPU: run the kernels in Triton's interpreter
>>> from qtrain.kernels import triton_quant
>>> impl = triton_quant.load()
>>> x3 = torch.tensor([[[0.3, -1.0, 0.5]]])
>>> impl.fake_quant_int(x3, impl.absmax(x3) / 127, torch.zeros(1), -127, 127, None, False)[0]
tensor([[[ 0.2992, -1.0000,  0.5039]]])
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import types

import torch

from qtrain.kernels import Backend, reference, register_backend

# triton.language, bound by _jit_kernels(): the kernels below are plain functions until then.
tl: types.ModuleType | None = None

_BLOCK = 1024  # elements per program of the elementwise and reduction kernels
_REDUCE_PROGRAMS = 1024  # programs a per-channel reduction aims for (≈ 8 per SM on an H100)


# ---- device functions ----------------------------------------------------------------------
# Only Triton builtins (tl.full, tl.reduce, ...), not triton.language.standard's jitted helpers
# (tl.zeros, tl.max, tl.cdiv): those are compiled-mode functions when triton was imported
# before TRITON_INTERPRET=1 was set, and the interpreter cannot call them.


def _maximum(a, b):
    return tl.maximum(a, b)


def _minimum(a, b):
    return tl.minimum(a, b)


def _mix32(h):
    """reference._mix32 on uint32 lanes: the multiplications wrap mod 2^32 by themselves."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


def _copysign(magnitude, sign):
    """|magnitude| with the sign bit of ``sign`` (also for ±0 and NaN, as torch.copysign)."""
    bits = magnitude.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return (bits | ((sign.to(tl.uint32, bitcast=True) >> 31) << 31)).to(tl.float32, bitcast=True)


def _rint(v):
    """Round half to even, as torch.round. libdevice.rint is unavailable to the interpreter:
    adding 2^23 to |v| < 2^23 makes the float unit round it to an integer (RNE) instead."""
    magnitude = tl.abs(v)
    rounded = tl.where(magnitude < 8388608.0, (magnitude + 8388608.0) - 8388608.0, magnitude)
    return _copysign(rounded, v)


def _round(v, index, keys_ptr, STOCHASTIC: tl.constexpr, INDEX_64: tl.constexpr):
    """reference.round_values: nearest-even, or floor(v) + [u < v − floor(v)] with u the
    reference's counter hash of (seed keys, linear index)."""
    if STOCHASTIC:
        key0 = tl.load(keys_ptr).to(tl.uint32)
        key1 = tl.load(keys_ptr + 1).to(tl.uint32)
        low = index.to(tl.uint32)
        high = (index >> 32).to(tl.uint32) if INDEX_64 else tl.full(low.shape, 0, tl.uint32)
        h = _mix32(_mix32(low ^ key0) ^ (high + key1))
        u = (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        floor = tl.math.floor(v)
        return floor + (u < v - floor).to(tl.float32)
    else:
        return _rint(v)


def _pow2(n):
    """Exact 2^n in float32 for integer n in [-126, 127], from the bit pattern."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


def _ldexp(x, n):
    """x·2^n in the reference's two exact steps (|n| may exceed the float32 exponent range)."""
    half = n >> 1  # floor(n / 2), as the reference's torch.div(..., rounding_mode="floor")
    return x * _pow2(half) * _pow2(n - half)


def _minifloat(
    x,
    index,
    keys_ptr,
    MANTISSA: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    HAS_INF: tl.constexpr,
    SATURATE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """reference.fake_quant_minifloat on float32 lanes."""
    bits = x.to(tl.int32, bitcast=True)
    # The biased exponent field gives frexp's exponent − 1 for normal numbers; zero and float32
    # subnormals read −127 and, like the reference's, are clamped to the format's min exponent.
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXPONENT)
    quantum = exponent - MANTISSA
    y = _ldexp(_round(_ldexp(x, -quantum), index, keys_ptr, STOCHASTIC, INDEX_64), quantum)
    overflow = tl.abs(y) > MAX_VALUE
    if SATURATE:
        special = _copysign(tl.full(x.shape, MAX_VALUE, tl.float32), x)
        y = tl.where(overflow, special, y)
    elif HAS_INF:
        y = tl.where(overflow, _copysign(tl.full(x.shape, float("inf"), tl.float32), x), y)
        special = x
    else:
        special = tl.full(x.shape, float("nan"), tl.float32)
        y = tl.where(overflow, special, y)
    infinite = (bits & 0x7FFFFFFF) == 0x7F800000
    y = tl.where(infinite, special, y)
    return tl.where(x != x, x, y)


def _encode_fp8(y, MANTISSA: tl.constexpr, MIN_EXPONENT: tl.constexpr, BIAS: tl.constexpr):
    """The fp8 bit pattern of a float32 value already on the fp8 grid and within its range
    (the interpreter's own float32 → fp8 cast rounds wrongly, so the bits are built here)."""
    bits = y.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    normal = ((exponent + BIAS) << MANTISSA).to(tl.uint32) | (
        (bits >> (23 - MANTISSA)) & ((1 << MANTISSA) - 1)
    )
    # Subnormals (and zero) count multiples of the smallest subnormal 2^(min_exponent − M).
    subnormal = _ldexp(tl.abs(y), tl.full(exponent.shape, MANTISSA - MIN_EXPONENT, tl.int32))
    code = tl.where(exponent >= MIN_EXPONENT, normal, subnormal.to(tl.uint32))
    code = tl.where(y != y, 0x7F, code)  # NaN: all ones but the sign, as torch casts it
    return (code | ((bits >> 31) << 7)).to(tl.uint8)


def _bf16_bits(x):
    """The bfloat16 bit pattern of float32 ``x``, rounded to nearest even (the interpreter's
    float32 → bfloat16 cast does not round to nearest even)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


def _scale_from_amax(amax, bound):
    """absmax / bound, kept ≥ the smallest normal float (1/scale finite) and 1 for an all-zero
    row; NaN and inf stay, so a non-finite operand makes the product non-finite."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 0.0, tl.float32) + bound)
    scale = tl.where(scale < 1.1754943508222875e-38, 1.1754943508222875e-38, scale)
    return tl.where(amax == 0.0, 1.0, scale)


# ---- kernels ---------------------------------------------------------------------------------


def _channel_offsets(j, c, C, I, SINGLE_O: tl.constexpr):
    """Memory offsets of elements j of channel c in a contiguous (O, C, I) view."""
    if SINGLE_O:
        return c * I + j
    else:
        o = j // I
        return o * (C * I) + c * I + (j - o * I)


def _reduce_kernel(
    x_ptr,
    low_ptr,
    high_ptr,
    C,
    I,
    per_channel,
    chunk,
    ABSMAX: tl.constexpr,
    SINGLE_O: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial per-channel max|x| (or min and max) of program (channel c, split s) into
    [s, c] of the outputs; NaN propagates through a flag (tl.maximum drops NaN on GPUs)."""
    c = tl.program_id(0)
    split = tl.program_id(1)
    if INDEX_64:
        c = c.to(tl.int64)
        split = split.to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, per_channel)
    lanes = tl.arange(0, BLOCK)
    high = tl.full((BLOCK,), -float("inf"), tl.float32)
    low = tl.full((BLOCK,), float("inf"), tl.float32)
    nan = tl.full((BLOCK,), 0, tl.int32)
    for j0 in range(start, end, BLOCK):
        j = j0 + lanes
        inside = j < end
        x = tl.load(x_ptr + _channel_offsets(j, c, C, I, SINGLE_O), mask=inside, other=0.0)
        x = x.to(tl.float32)
        nan = tl.maximum(nan, (x != x).to(tl.int32))
        if ABSMAX:
            high = tl.maximum(high, tl.abs(x))
        else:
            high = tl.maximum(high, tl.where(inside, x, -float("inf")))
            low = tl.minimum(low, tl.where(inside, x, float("inf")))
    any_nan = tl.reduce(nan, 0, _maximum) > 0
    out = split * C + c
    tl.store(high_ptr + out, tl.where(any_nan, float("nan"), tl.reduce(high, 0, _maximum)))
    if not ABSMAX:
        tl.store(low_ptr + out, tl.where(any_nan, float("nan"), tl.reduce(low, 0, _minimum)))


def _quant_int_kernel(
    x_ptr,
    inv_scale_ptr,
    scale_ptr,
    zero_ptr,
    keys_ptr,
    out_ptr,
    mask_ptr,
    numel,
    C,
    I,
    qmin,
    qmax,
    FAKE: tl.constexpr,
    WANT_MASK: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PER_TENSOR: tl.constexpr,
    SINGLE_O: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """reference._quant_levels (+ dequantization when FAKE) over a contiguous (O, C, I) view."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    x = tl.load(x_ptr + index, mask=inside, other=0.0)
    if PER_TENSOR:
        channel = index * 0
    elif SINGLE_O:
        channel = index // I
    else:
        channel = (index // I) % C
    inv_scale = tl.load(inv_scale_ptr + channel, mask=inside, other=1.0)
    zero = tl.load(zero_ptr + channel, mask=inside, other=0.0)
    shifted = _round(x * inv_scale, index, keys_ptr, STOCHASTIC, INDEX_64) + zero
    if WANT_MASK:
        tl.store(mask_ptr + index, (shifted >= qmin) & (shifted <= qmax), mask=inside)
    # torch.clamp keeps NaN, tl.minimum/maximum would drop it: clamp with comparisons.
    levels = tl.where(shifted < qmin, qmin, tl.where(shifted > qmax, qmax, shifted))
    if FAKE:
        scale = tl.load(scale_ptr + channel, mask=inside, other=1.0)
        tl.store(out_ptr + index, (levels - zero) * scale, mask=inside)
    else:
        tl.store(out_ptr + index, levels, mask=inside)


def _minifloat_kernel(
    x_ptr,
    out_ptr,
    keys_ptr,
    numel,
    MANTISSA: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    HAS_INF: tl.constexpr,
    SATURATE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    x = tl.load(x_ptr + index, mask=inside, other=0.0)
    y = _minifloat(
        x,
        index,
        keys_ptr,
        MANTISSA,
        MIN_EXPONENT,
        MAX_VALUE,
        HAS_INF,
        SATURATE,
        STOCHASTIC,
        INDEX_64,
    )
    tl.store(out_ptr + index, y, mask=inside)


_KERNELS = (
    "_maximum",
    "_minimum",
    "_mix32",
    "_copysign",
    "_rint",
    "_round",
    "_pow2",
    "_ldexp",
    "_minifloat",
    "_encode_fp8",
    "_bf16_bits",
    "_scale_from_amax",
    "_channel_offsets",
    "_reduce_kernel",
    "_quant_int_kernel",
    "_minifloat_kernel",
)


# ---- loading ---------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _jit_kernels() -> None:
    """Jit the functions above in place: each module global becomes its jitted form, so that
    kernels find the jitted helpers they call by name (how Triton resolves calls)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    module = globals()
    for name in _KERNELS:
        module[name] = triton.jit(module[name])


def load() -> types.ModuleType | None:
    """This module, when Triton can run here (CUDA, or ``TRITON_INTERPRET=1``); else None."""
    if not _triton_importable() or not (_cuda_available() or interpreting()):
        return None
    _jit_kernels()
    return sys.modules[__name__]


def _launch_options() -> dict[str, bool]:
    # No fused multiply-adds: every float operation rounds where PyTorch's does (bit-exact).
    return {"enable_fp_fusion": False}


def _index_64(*tensors: torch.Tensor) -> bool:
    return any(t.numel() >= 2**31 for t in tensors)


def _keys(seed: int | None, device: torch.device) -> torch.Tensor | None:
    """The reference's two 32-bit hash keys of ``seed`` as an int64 tensor on ``device``."""
    if seed is None:
        return None
    return torch.tensor(reference.seed_keys(seed), dtype=torch.int64, device=device)


# ---- operators -------------------------------------------------------------------------------


@torch.library.custom_op("qtrain::triton_channel_reduce", mutates_args=())
def _channel_reduce(x3: torch.Tensor, absmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _, channels, inner = x3.shape
    per_channel = x3.numel() // channels
    splits = max(1, min(_cdiv(per_channel, _BLOCK), _REDUCE_PROGRAMS // channels))
    chunk = _cdiv(_cdiv(per_channel, splits), _BLOCK) * _BLOCK
    splits = _cdiv(per_channel, chunk)
    high = x3.new_empty((splits, channels), dtype=torch.float32)
    low = high if absmax else torch.empty_like(high)
    _reduce_kernel[(channels, splits)](
        x3,
        low,
        high,
        channels,
        inner,
        per_channel,
        chunk,
        ABSMAX=absmax,
        SINGLE_O=x3.shape[0] == 1,
        INDEX_64=_index_64(x3),
        BLOCK=_BLOCK,
        **_launch_options(),
    )
    # amax/amin over the splits propagate the NaN a split found.
    return (x3.new_empty(0) if absmax else low.amin(0)), high.amax(0)


@_channel_reduce.register_fake
def _(x3: torch.Tensor, absmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    channels = x3.shape[1]
    return x3.new_empty(0 if absmax else channels), x3.new_empty(channels)


@torch.library.custom_op("qtrain::triton_quant_int", mutates_args=())
def _quant_int_op(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    keys: torch.Tensor | None,
    fake: bool,
    want_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, channels, inner = x3.shape
    scale = scale.reshape(-1).to(torch.float32).contiguous()
    inv_scale = 1.0 / scale  # PyTorch's IEEE division, exactly as the reference computes it
    zero_point = zero_point.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty_like(x3)
    mask = torch.empty(x3.shape if want_mask else (0,), dtype=torch.bool, device=x3.device)
    grid = (_cdiv(x3.numel(), _BLOCK),)
    _quant_int_kernel[grid](
        x3,
        inv_scale,
        scale,
        zero_point,
        x3 if keys is None else keys,
        out,
        mask if want_mask else out,
        x3.numel(),
        channels,
        inner,
        float(qmin),
        float(qmax),
        FAKE=fake,
        WANT_MASK=want_mask,
        STOCHASTIC=keys is not None,
        PER_TENSOR=channels == 1,
        SINGLE_O=x3.shape[0] == 1,
        INDEX_64=_index_64(x3),
        BLOCK=_BLOCK,
        **_launch_options(),
    )
    return out, mask


@_quant_int_op.register_fake
def _(x3, scale, zero_point, qmin, qmax, keys, fake, want_mask):
    mask = x3.new_empty(x3.shape if want_mask else (0,), dtype=torch.bool)
    return torch.empty_like(x3), mask


@torch.library.custom_op("qtrain::triton_fake_quant_minifloat", mutates_args=())
def _minifloat_op(
    x: torch.Tensor,
    exponent_bits: int,
    mantissa_bits: int,
    has_inf: bool,
    saturate: bool,
    keys: torch.Tensor | None,
) -> torch.Tensor:
    bias = 2 ** (exponent_bits - 1) - 1
    top = 2**exponent_bits - 1
    max_exponent = (top - 1 if has_inf else top) - bias
    max_mantissa = 2.0 - 2.0 ** -(mantissa_bits if has_inf else mantissa_bits - 1)
    out = torch.empty_like(x)
    _minifloat_kernel[(_cdiv(x.numel(), _BLOCK),)](
        x,
        out,
        x if keys is None else keys,
        x.numel(),
        MANTISSA=mantissa_bits,
        MIN_EXPONENT=1 - bias,
        MAX_VALUE=math.ldexp(max_mantissa, max_exponent),
        HAS_INF=has_inf,
        SATURATE=saturate,
        STOCHASTIC=keys is not None,
        INDEX_64=_index_64(x),
        BLOCK=_BLOCK,
        **_launch_options(),
    )
    return out


@_minifloat_op.register_fake
def _(x, exponent_bits, mantissa_bits, has_inf, saturate, keys):
    return torch.empty_like(x)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the primitives (reference.py's names and signatures) ----------------------------------


def minmax(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-C minimum and maximum of an (O, C, I) view (NaN propagates)."""
    if x3.numel() == 0:
        return reference.minmax(x3)
    return _channel_reduce(x3.contiguous(), False)


def absmax(x3: torch.Tensor) -> torch.Tensor:
    """Per-C max |x| of an (O, C, I) view (NaN propagates)."""
    if x3.numel() == 0:
        return reference.absmax(x3)
    return _channel_reduce(x3.contiguous(), True)[1]


def fake_quant_int(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
    want_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x̂ = (clamp(round(x·(1/s)) + z, qmin, qmax) − z)·s and, when asked, the STE mask."""
    fake, mask = _quant_int_op(
        x3.contiguous(), scale, zero_point, qmin, qmax, _keys(seed, x3.device), True, want_mask
    )
    return fake, (mask if want_mask else None)


def quant_int(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
) -> torch.Tensor:
    """Integer levels clamp(round(x/s) + z, qmin, qmax) as float32 (caller casts)."""
    keys = _keys(seed, x3.device)
    return _quant_int_op(x3.contiguous(), scale, zero_point, qmin, qmax, keys, False, False)[0]


def fake_quant_int_levels(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
    want_mask: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``fake_quant_int`` and the levels in ``dtype`` (two launches on the same seed)."""
    fake, mask = fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, want_mask)
    levels = quant_int(x3, scale, zero_point, qmin, qmax, seed)
    return fake, mask, reference.stored_levels(levels, dtype)


# x̂ on two grids: two launches on one seed (the CPU kernel fuses them).
fake_quant_int_pair = reference.pair_of(fake_quant_int)


# The reference's PyTorch ops (element-wise, reductions, index_put) run on the GPU as they are.
dequant_int = reference.dequant_int
range_bn_stats = reference.range_bn_stats
channel_affine = reference.channel_affine
channel_affine_relu = reference.channel_affine_relu
zero_mask = reference.zero_mask
masked_zero = reference.masked_zero
range_bn_backward = reference.range_bn_backward
max_pool2x2 = reference.max_pool2x2
max_pool2x2_backward = reference.max_pool2x2_backward


def fake_quant_minifloat(
    x: torch.Tensor,
    exponent_bits: int,
    mantissa_bits: int,
    has_inf: bool,
    saturate: bool,
    seed: int | None,
) -> torch.Tensor:
    """Round float32 ``x`` onto a minifloat grid (subnormals, overflow and NaN as torch casts)."""
    keys = _keys(seed, x.device)
    return _minifloat_op(x.contiguous(), exponent_bits, mantissa_bits, has_inf, saturate, keys)


register_backend(Backend.TRITON, load, ["cuda"])
