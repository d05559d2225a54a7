"""The ``triton`` backend's kernels for the low-precision GEMMs of ``qtrain.lowp`` (called by
``qtrain.lowp_products`` on CUDA):

* ``quantize_rows`` — per-row (or given) absmax scale and int8/fp8 quantization fused in one
  kernel: the row is read, reduced and quantized by the same program, so it comes from DRAM
  once (its second read hits the cache); any strides, so a transposed operand is quantized
  without a copy, and the result is written row-major, ready for the GEMM.
* ``int8_mm`` — an int8 × int8 → int32 matmul with the per-row × per-column scales (and bias)
  applied in its epilogue, so the int32 product never goes to memory.

Kernels are ``torch.library`` operators (``torch.ops.qtrain.triton_quantize_rows``,
``torch.ops.qtrain.triton_int8_mm``) with fake implementations, loaded as ``triton_quant``'s
are: ``load`` returns None where ``triton_quant.load()`` does, and ``TRITON_INTERPRET=1`` runs
them on CPU tensors. They call ``triton_quant``'s device functions (rounding, minifloat, fp8 and
bfloat16 bit patterns), and Triton resolves a call by name through the calling kernel's module
globals: the first ``load()`` jits ``triton_quant``'s functions, binds the ones called here to
their jitted forms under the same names, then jits this module's kernels.

>>> import os, torch
>>> os.environ["TRITON_INTERPRET"] = "1"  # CPU: run the kernels in Triton's interpreter
>>> from qtrain.kernels import triton_gemm
>>> gemm = triton_gemm.load()
>>> a = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
>>> q, scale = gemm.quantize_rows(a, torch.tensor(127.0), torch.int8)
>>> q.tolist()
[[64, -127], [127, 0]]
>>> gemm.int8_mm(q, q, scale, scale, None, torch.float32)  # ≈ a·aᵀ
tensor([[1.2540, 1.0079],
        [1.0079, 4.0000]])
"""

from __future__ import annotations

import functools
import sys
import types

import torch

from qtrain.kernels import triton_quant

# The helpers shared with triton_quant. The device functions among them (the names in
# triton_quant._KERNELS) are rebound to their jitted forms by _jit_kernels().
from qtrain.kernels.triton_quant import (
    _bf16_bits,
    _cdiv,
    _encode_fp8,
    _index_64,
    _launch_options,
    _maximum,
    _minifloat,
    _round,
    _scale_from_amax,
)

# triton.language, bound by _jit_kernels(): the kernels below are plain functions until then.
tl: types.ModuleType | None = None

_ROW_TILE = 4096  # elements per (rows × columns) tile of quantize_rows
_FP8_FORMATS = {
    # dtype: (mantissa bits, min exponent, bias, max value, has inf, saturate)
    torch.float8_e4m3fn: (3, -6, 7, 448.0, False, True),
    torch.float8_e5m2: (2, -14, 15, 57344.0, True, False),
}


# ---- kernels ---------------------------------------------------------------------------------


def _quantize_rows_kernel(
    a_ptr,
    q_ptr,
    scale_ptr,
    bound_ptr,
    keys_ptr,
    rows,
    cols,
    stride_row,
    stride_col,
    HAS_SCALE: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    FP8: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    HAS_INF: tl.constexpr,
    SATURATE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows of ``a`` (any strides) → row-major int8 levels or fp8 codes, with their scales.

    int8: scale = absmax/qmax, levels = clamp(round(a·(1/scale)), ±qmax) (NaN → 0); fp8:
    scale = absmax/max, codes = fp8(clamp(a/scale, ±max)) — the same operations, in the same
    order, as ``qtrain.lowp_products``' PyTorch twin, so the two agree bit for bit.
    """
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    bound = tl.load(bound_ptr)
    if HAS_SCALE:
        if ROW_SCALES:
            scale = tl.load(scale_ptr + r, mask=row_ok, other=1.0)
        else:
            scale = tl.load(scale_ptr + r * 0)
    else:
        amax = tl.full((BLOCK_R,), 0.0, tl.float32)
        nan = tl.full((BLOCK_R,), 0, tl.int32)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            inside = row_ok[:, None] & (c < cols)[None, :]
            offsets = r[:, None] * stride_row + c[None, :] * stride_col
            x = tl.load(a_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.reduce(tl.abs(x), 1, _maximum))
            nan = tl.maximum(nan, tl.reduce((x != x).to(tl.int32), 1, _maximum))
        scale = _scale_from_amax(tl.where(nan > 0, float("nan"), amax), bound)
        tl.store(scale_ptr + r, scale, mask=row_ok)
    inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    # Second pass over the same rows: just read by this program, they come from the cache.
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        inside = row_ok[:, None] & (c < cols)[None, :]
        offsets = r[:, None] * stride_row + c[None, :] * stride_col
        x = tl.load(a_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        index = r[:, None] * cols + c[None, :]
        if FP8:
            v = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + scale[:, None])
            v = tl.where(v > MAX_VALUE, MAX_VALUE, tl.where(v < -MAX_VALUE, -MAX_VALUE, v))
            y = _minifloat(
                v,
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
            tl.store(q_ptr + index, _encode_fp8(y, MANTISSA, MIN_EXPONENT, BIAS), mask=inside)
        else:
            v = _round(x * inv_scale[:, None], index, keys_ptr, STOCHASTIC, INDEX_64)
            v = tl.where(v > bound, bound, tl.where(v < -bound, -bound, v))
            tl.store(q_ptr + index, tl.where(v != v, 0.0, v).to(tl.int8), mask=inside)


def _int8_mm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    scale_a_ptr,
    scale_b_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    ROW_SCALES_A: tl.constexpr,
    ROW_SCALES_B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = (A·Bᵀ)·scale_a ⊗ scale_b (+ bias) for int8 A (M, K), B (N, K); int32 accumulation.

    Epilogue in the PyTorch twin's order: float32(acc)·scale_a·scale_b + bias, then the cast.
    """
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    # Grouped order: GROUP_M row blocks share the B tiles they read while those are in L2.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & (k < K)[None, :], other=0)
        b = tl.load(b_ptrs, mask=(k < K)[:, None] & (rn < N)[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if ROW_SCALES_A:
        scale_a = tl.load(scale_a_ptr + rm, mask=rm < M, other=1.0)
    else:
        scale_a = tl.load(scale_a_ptr + rm * 0)
    if ROW_SCALES_B:
        scale_b = tl.load(scale_b_ptr + rn, mask=rn < N, other=1.0)
    else:
        scale_b = tl.load(scale_b_ptr + rn * 0)
    out = acc.to(tl.float32) * scale_a[:, None] * scale_b[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    inside = (rm < M)[:, None] & (rn < N)[None, :]
    if OUT_BF16:  # out_ptr points at the bfloat16 output viewed as int16
        tl.store(out_ptrs, _bf16_bits(out), mask=inside)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=inside)


_KERNELS = ("_quantize_rows_kernel", "_int8_mm_kernel")


# ---- loading ---------------------------------------------------------------------------------


@functools.cache
def _jit_kernels() -> None:
    """Jit the kernels above, after triton_quant's functions: the device functions they call
    become, under the same names here, triton_quant's jitted forms (Triton resolves a kernel's
    calls through its own module's globals)."""
    global tl
    import triton

    triton_quant._jit_kernels()
    tl = triton_quant.tl
    module = globals()
    for name in triton_quant._KERNELS:
        if name in module:  # a device function imported from triton_quant
            module[name] = getattr(triton_quant, name)
    for name in _KERNELS:
        module[name] = triton.jit(module[name])
    # The matmul is autotuned on GPUs (H100-sized tiles); the interpreter runs one small tile.
    if triton_quant.interpreting():
        configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    else:
        configs = [
            triton.Config(
                {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                num_stages=stages,
                num_warps=warps,
            )
            for m, n, k, stages, warps in (
                (128, 256, 128, 3, 8),
                (256, 128, 128, 3, 8),
                (128, 128, 128, 4, 8),
                (128, 128, 64, 4, 4),
                (64, 128, 128, 4, 4),
                (128, 64, 128, 4, 4),
                (64, 64, 128, 4, 4),
                (32, 64, 128, 4, 4),
            )
        ]
    module["_int8_mm_kernel"] = triton.autotune(configs, key=["M", "N", "K"])(
        module["_int8_mm_kernel"]
    )


def load() -> types.ModuleType | None:
    """This module, when triton_quant's kernels run here (CUDA, or ``TRITON_INTERPRET=1``);
    else None."""
    if triton_quant.load() is None:
        return None
    _jit_kernels()
    return sys.modules[__name__]


# ---- operators -------------------------------------------------------------------------------


@torch.library.custom_op("qtrain::triton_quantize_rows", mutates_args=())
def _quantize_rows_op(
    a: torch.Tensor,
    bound: torch.Tensor,
    keys: torch.Tensor | None,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = a.shape
    q = torch.empty((rows, cols), dtype=dtype, device=a.device)
    if scale is None:
        out_scale = torch.empty(rows, dtype=torch.float32, device=a.device)
    else:  # a copy: an operator's outputs must not alias its inputs
        out_scale = scale.to(torch.float32).reshape(-1).clone()
    fp8 = _FP8_FORMATS.get(dtype)
    mantissa, min_exponent, bias, max_value, has_inf, saturate = fp8 or (0, 0, 0, 0.0, 0, 0)
    # Tiles of _ROW_TILE elements: long along a row when rows are contiguous (coalesced along
    # them), 32 rows wide when a is column-major (coalesced across rows).
    if a.stride(1) == 1 or cols == 1:
        block_c = min(_next_power_of_2(cols), _ROW_TILE)
        block_r = max(1, _ROW_TILE // block_c)
    else:
        block_r = 32
        block_c = _ROW_TILE // block_r
    _quantize_rows_kernel[(_cdiv(rows, block_r),)](
        a,
        q.view(torch.uint8) if fp8 else q,
        out_scale,
        bound,
        a if keys is None else keys,
        rows,
        cols,
        a.stride(0),
        a.stride(1),
        HAS_SCALE=scale is not None,
        ROW_SCALES=scale is not None and scale.numel() > 1,
        FP8=fp8 is not None,
        MANTISSA=mantissa,
        MIN_EXPONENT=min_exponent,
        BIAS=bias,
        MAX_VALUE=max_value,
        HAS_INF=bool(has_inf),
        SATURATE=bool(saturate),
        STOCHASTIC=keys is not None,
        INDEX_64=_index_64(a),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        **_launch_options(),
    )
    return q, out_scale


@_quantize_rows_op.register_fake
def _(a, bound, keys, scale, dtype):
    rows = a.shape[0]
    out_scale = a.new_empty(rows if scale is None else scale.numel(), dtype=torch.float32)
    return a.new_empty(a.shape, dtype=dtype), out_scale


@torch.library.custom_op("qtrain::triton_int8_mm", mutates_args=())
def _int8_mm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    scale_a = scale_a.reshape(-1).to(torch.float32)
    scale_b = scale_b.reshape(-1).to(torch.float32)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    bf16 = out_dtype == torch.bfloat16
    _int8_mm_kernel[grid](
        a,
        b,
        out.view(torch.int16) if bf16 else out,
        scale_a,
        scale_b,
        a if bias is None else bias,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        ROW_SCALES_A=scale_a.numel() > 1,
        ROW_SCALES_B=scale_b.numel() > 1,
        HAS_BIAS=bias is not None,
        OUT_BF16=bf16,
        **_launch_options(),
    )
    return out


@_int8_mm_op.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ---- the GEMMs' operands and products ------------------------------------------------------


def quantize_rows(
    a: torch.Tensor,
    bound: torch.Tensor,
    dtype: torch.dtype,
    keys: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of a 2-D ``a`` (any strides) to ``dtype``, written row-major.

    Args:
        a: (R, L) float tensor.
        bound: 0-d float32 tensor: qmax for int8 (a tensor, so bit-widths change without
            recompiling), the format's max value for fp8.
        dtype: ``torch.int8``, ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        keys: stochastic rounding: the int64 (2,) hash keys of the seed; None rounds to nearest.
        scale: given scales ((R,) or one value, float32) instead of each row's absmax / bound.

    Returns:
        (q, scale): q (R, L) in ``dtype`` with a ≈ q·scale, scale (R,) float32 (or the given).
    """
    return _quantize_rows_op(a, bound, keys, scale, dtype)


def int8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(a·bᵀ)·scale_a[:, None]·scale_b[None, :] (+ bias) in ``out_dtype``, one kernel.

    ``a`` (M, K) and ``b`` (N, K) are int8 with any strides; the scales have one value per row
    of their operand, or a single value.
    """
    if a.numel() >= 2**31 or b.numel() >= 2**31:
        raise ValueError("int8_mm: operands of 2^31 elements or more are not supported")
    return _int8_mm_op(a, b, scale_a, scale_b, bias, out_dtype)
