"""The low-precision products under ``qtrain.lowp``'s layers: one operand quantized to int8
levels or fp8 values with an absmax scale per row or per tensor (``_quantize``), and the
product ``a · bᵀ`` of two such operands followed by the scale epilogue (``_product``), with the
capability probes that say where the real products run and are fast. ``qtrain.lowp`` builds the
configs, the plan, the autograd function and the layers on it.

int8: ``torch._int_mm`` (int32) followed by the scale epilogue, or on CUDA qtrain's Triton
matmul with the epilogue fused (``Int8Gemm``); fp8: ``torch._scaled_mm`` with the scales. The
emulated twin (``plan.emulate``) quantizes the same way and runs float matmuls in place of the
low-precision GEMMs — for int8 an exact float matmul of the levels followed by the same
epilogue, so it equals the int8 path bit for bit; for fp8 a float32 matmul of the dequantized
operands, which is what ``torch._scaled_mm`` computes on the CPU (up to oneDNN's per-CPU choice
of accumulation order). On the CPU both real products run in torch 2.13 (``torch._int_mm`` on
int8 tensors, ``torch._scaled_mm`` on fp8 ones through oneDNN); ``cpu_has_int8_dot`` tells
whether the int8 one is fast there.
"""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qtrain import kernels
from qtrain.kernels import reference, triton_gemm, triton_quant

if TYPE_CHECKING:
    from qtrain.lowp import _Operand, _Plan


_FP8_FORWARD = torch.float8_e4m3fn
_FP8_GRAD = torch.float8_e5m2
_FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in (_FP8_FORWARD, _FP8_GRAD)}
_TINY = torch.finfo(torch.float32).tiny
# _int_mm and _scaled_mm (cuBLASLt) want K and N multiples of 16 and _int_mm more than 16 rows;
# other shapes are zero-padded (zeros add nothing to the product) and the result cut back.
_ALIGN = 16
_INT_MM_MIN_ROWS = 17
# A float32 matmul of int8 levels is exact while every partial sum stays below 2^24.
_EXACT_FLOAT32_DEPTH = 2**24 // 127**2


class Int8Gemm(enum.Enum):
    """Which int8 GEMM runs the products on CUDA (the CPU always uses ``torch._int_mm``)."""

    INT_MM = "int_mm"  # torch._int_mm (cuBLASLt), then the scales as an elementwise epilogue
    TRITON = "triton"  # qtrain's Triton int8 matmul with the scales in its epilogue


# ---- where the real products run --------------------------------------------------------------


@functools.cache
def _real_gemm_runs(fp8: bool, rowwise: bool, device: str) -> bool:
    try:
        if fp8:
            a = torch.ones(32, 16, device=device).to(_FP8_FORWARD)
            scale_a = torch.ones((32, 1) if rowwise else (), device=device)
            scale_b = torch.ones((1, 32) if rowwise else (), device=device)
            torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
        else:
            a = torch.ones(32, 16, dtype=torch.int8, device=device)
            torch._int_mm(a, a.t())
    except (RuntimeError, AttributeError, TypeError):  # NotImplementedError is a RuntimeError
        return False
    return True


@functools.cache
def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions that make ``torch._int_mm`` fast
    (AMX-INT8, AVX512-VNNI or AVX-VNNI in /proc/cpuinfo's flags; False where that file is
    missing). Without them oneDNN emulates the int8 product, far slower than a float32 one."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = {flag for line in cpuinfo if line.startswith("flags") for flag in line.split()}
    except OSError:
        return False
    return bool(flags & {"amx_int8", "avx512_vnni", "avx_vnni"})


# ---- quantization of one operand --------------------------------------------------------------


@torch.compiler.assume_constant_result
def _triton_runs() -> bool:
    """Whether the Triton kernels run here (decided once; a constant to torch.compile)."""
    return triton_gemm.load() is not None


def _uses_triton(a: torch.Tensor, plan: _Plan) -> bool:
    return a.is_cuda and not plan.emulate and _triton_runs()


def _hash_keys(seed: torch.Tensor) -> torch.Tensor:
    """reference.seed_keys of a seed held in an int64 tensor (seeds are drawn inside the graph,
    so a compiled step does not specialise on them)."""
    mask = 0xFFFFFFFF
    key0 = reference._mix32((seed & mask) ^ reference._GOLDEN)
    key1 = reference._mix32(((seed >> 32) & mask) ^ key0)
    return torch.stack([key0, key1])


def _uniform(keys: torch.Tensor, numel: int) -> torch.Tensor:
    """reference.uniform for the seed whose hash keys are ``keys``: float32 on a 2^-24 grid."""
    mask = 0xFFFFFFFF
    index = torch.arange(numel, dtype=torch.int64, device=keys.device)
    h = reference._mix32((index & mask) ^ keys[0])
    h = reference._mix32(h ^ (((index >> 32) + keys[1]) & mask))
    return (h >> 8).to(torch.float32) * 2.0**-24


def _scale_from_amax(amax: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """absmax / bound, at least the smallest normal float, 1 for all-zero rows; NaN and inf
    stay, so a non-finite operand gives a non-finite product (a grad scaler sees it)."""
    scale = amax / bound
    scale = torch.where(scale < _TINY, _TINY, scale)
    return torch.where(amax == 0, 1.0, scale)


def _quantize_twin(
    a: torch.Tensor,
    dtype: torch.dtype,
    bound: torch.Tensor,
    keys: torch.Tensor | None,
    rowwise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of ``triton_gemm.quantize_rows`` (same operations, same order)."""
    a32 = a.to(torch.float32)
    amax = a32.abs().amax(dim=1) if rowwise else a32.abs().amax().reshape(1)
    scale = _scale_from_amax(amax, bound)
    s = scale.view(-1, 1)
    if dtype in _FP8_MAX:
        limit = _FP8_MAX[dtype]
        return (a32 / s).clamp(-limit, limit).to(dtype), scale
    v = a32 * (1.0 / s)
    if keys is None:
        levels = torch.round(v)
    else:
        floor = torch.floor(v)
        levels = floor + (_uniform(keys, v.numel()).view(v.shape) < v - floor).to(v.dtype)
    levels = torch.clamp(levels, -bound, bound)
    return torch.where(levels.isnan(), 0.0, levels).to(torch.int8), scale


def _quantize(
    a: torch.Tensor,
    operand: _Operand,
    bound: torch.Tensor,
    keys: torch.Tensor | None,
    plan: _Plan,
    float_levels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): a ≈ q·scale[:, None], q row-major in the operand's dtype, scale (R,) or (1,).

    int8 on the CPU: the ``cpu_fused`` kernel where the kernels' backend gives it (one or two
    passes over a, bit-identical to the twin), else ``_quantize_twin``; on CUDA the Triton
    kernel unless emulating. ``float_levels``: the fused kernel may write the int8 levels as
    float32 values (for the twin's float matmul: no int8 → float32 pass); q is then float32."""
    if operand.dtype == torch.int8 and a.device.type == "cpu":
        fused = getattr(kernels.implementation(a.device), "quantize_rows_int8", None)
        if fused is not None:
            levels_dtype = torch.float32 if float_levels else torch.int8
            return fused(a, bound, plan.rowwise, keys, levels_dtype=levels_dtype)
    if not _uses_triton(a, plan):
        return _quantize_twin(a, operand.dtype, bound, keys, plan.rowwise)
    scale = None
    if not plan.rowwise:
        flat = a if a.is_contiguous() else a.t()  # every operand is a matrix or its transpose
        amax = triton_quant.absmax(flat.reshape(1, 1, -1))
        scale = _scale_from_amax(amax, bound)
    return triton_gemm.quantize_rows(a, bound, operand.dtype, keys, scale)


# ---- the low-precision products ---------------------------------------------------------------


def _pad(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """q zero-padded to (rows, cols); fp8 through its bytes (F.pad has no fp8 kernels)."""
    pad = (0, cols - q.shape[1], 0, rows - q.shape[0])
    if not any(pad):
        return q
    if q.dtype in _FP8_MAX:
        return F.pad(q.view(torch.uint8), pad).view(q.dtype)
    return F.pad(q, pad)


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _epilogue(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    overwrite: bool = False,
) -> torch.Tensor:
    """float32(acc)·scale_a[:, None]·scale_b[None, :] (+ bias): triton_gemm.int8_mm's order.
    ``overwrite``: a float32 acc may be scaled in place (the caller no longer needs it).
    acc·scale_a comes first, so it overflows to inf where |acc|·scale_a passes float32's max
    even if the product with scale_b would not (operands of absmax ≳ 1e34 with 127-level
    sums of ~10⁵); float32 F.linear/F.conv2d overflow from about 1e38. On the CPU, cpu_fused's
    ``int8_epilogue`` does the same roundings in one pass."""
    fused = _fused_epilogue(acc)
    if fused is not None:
        out = fused(acc, scale_a, scale_b, _cast(bias, torch.float32))
        return out.to(out_dtype)
    # In place on a tensor of its own — acc's float32 copy, or a float32 acc the caller gives
    # up (``overwrite``) — the same roundings as out-of-place, without two (M, N) allocations.
    out = acc.to(torch.float32)
    if out is acc and not overwrite:
        out = out.clone()
    out.mul_(scale_a.view(-1, 1)).mul_(scale_b.view(1, -1))
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return out.to(out_dtype)


def _fused_epilogue(acc: torch.Tensor):
    """cpu_fused's ``int8_epilogue`` where it serves ``acc`` (a CPU matrix, unit column
    stride), else None."""
    if acc.device.type != "cpu" or acc.dim() != 2 or (acc.shape[1] > 1 and acc.stride(1) != 1):
        return None
    return getattr(kernels.implementation(acc.device), "int8_epilogue", None)


def _int8_product(qa, qb, scale_a, scale_b, bias, out_dtype, plan: _Plan) -> torch.Tensor:
    triton = qa.is_cuda and not plan.emulate and plan.int8_gemm is not Int8Gemm.INT_MM
    if triton and qa.shape[1] <= INT32_DEPTH and _triton_runs():
        return triton_gemm.int8_mm(qa, qb, scale_a, scale_b, bias, out_dtype)
    acc = levels_product(qa, qb, plan.emulate)
    return _epilogue(acc, scale_a, scale_b, bias, out_dtype, overwrite=True)


# int32 holds a sum of K products of two int8 levels (|q| ≤ 127) exactly while K·127² < 2^31.
INT32_DEPTH = (2**31 - 1) // 127**2


def levels_product(
    qa: torch.Tensor, qb: torch.Tensor, emulate: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """qa · qbᵀ of int8-valued levels qa (M, K), qb (N, K), exact: ``torch._int_mm`` in int32
    (depths beyond ``INT32_DEPTH`` in pieces, summed in int64), or with ``emulate`` the twin's
    float matmul (float32 while every partial sum stays below 2^24, else float64). The same
    integers either way, so the same float32 once converted. ``out``: a contiguous int32
    (M, N) buffer the CPU's int32 product may write (a loop of pieces then allocates once)."""
    k = qa.shape[1]
    if emulate:
        dtype = torch.float32 if k <= _EXACT_FLOAT32_DEPTH else torch.float64
        with torch.autocast(qa.device.type, enabled=False):  # exact: never a bf16 matmul
            return qa.to(dtype) @ qb.to(dtype).t()
    if k <= INT32_DEPTH:
        return _int_mm(qa, qb, out)
    acc = None
    for start in range(0, k, INT32_DEPTH):
        part = slice(start, start + INT32_DEPTH)
        piece = _int_mm(qa[:, part], qb[:, part]).to(torch.int64)
        acc = piece if acc is None else acc.add_(piece)
    return acc


def _int_mm(qa: torch.Tensor, qb: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """qa · qbᵀ in int32 by ``torch._int_mm`` for int8 qa (M, K), qb (N, K); on CUDA
    zero-padded to the shapes cuBLASLt takes (also ``qtrain.int_products``' real route). The
    CPU's takes any shape and row- or column-major operands (qbᵀ is passed as the view it is)
    but returns wrong values (torch 2.13) for K = 1 with N ≥ 2, padded here to K = 2 with
    zeros, and for operands whose size-1 dimensions have unusual strides (a (1, K) row with
    strides (1, 1)), copied here to row-major first. ``out`` (CPU): the int32 result's buffer."""
    if qa.device.type == "cpu":
        if qa.shape[1] == 1:
            qa, qb = F.pad(qa, (0, 1)), F.pad(qb, (0, 1))
        qa, qb_t = _plain_layout(qa), _plain_layout(qb.t())
        if out is None:
            return torch._int_mm(qa, qb_t)
        return torch._int_mm(qa, qb_t, out=out)
    (m, k), n = qa.shape, qb.shape[0]
    padded_k = _round_up(k)
    qa = _pad(qa.contiguous(), max(m, _INT_MM_MIN_ROWS), padded_k)
    qb = _pad(qb.contiguous(), _round_up(n), padded_k)
    # qbᵀ is column-major: the layout cuBLASLt's int8 kernels take without a copy.
    return torch._int_mm(qa, qb.t())[:m, :n]


def _plain_layout(m: torch.Tensor) -> torch.Tensor:
    """m (R, C) itself if row-major with strides (C, 1), or — both sizes above 1 — row-major
    with rows apart (strides (L, 1), L ≥ C: a slice of a wider matrix, such as a depth piece)
    or column-major (strides (1, L), L ≥ R); else a row-major copy."""
    rows, cols = m.shape
    row_stride, col_stride = m.stride()
    apart = (col_stride == 1 and row_stride >= cols) or (row_stride == 1 and col_stride >= rows)
    if (row_stride, col_stride) == (cols, 1) or (rows > 1 and cols > 1 and apart):
        return m
    return torch.empty((rows, cols), dtype=m.dtype, device=m.device).copy_(m)


def _float8_product(qa, qb, scale_a, scale_b, bias, out_dtype, plan: _Plan) -> torch.Tensor:
    (m, k), n = qa.shape, qb.shape[0]
    if plan.emulate:
        out = (qa.to(torch.float32) * scale_a.view(-1, 1)) @ (
            qb.to(torch.float32) * scale_b.view(-1, 1)
        ).t()
        out = out.to(out_dtype)
    else:
        padded_k, padded_n = _round_up(k), _round_up(n)
        qa = _pad(qa, m, padded_k)
        qb = _pad(qb, padded_n, padded_k)
        if plan.rowwise:
            scale_a = scale_a.view(-1, 1)
            scale_b = F.pad(scale_b, (0, padded_n - n), value=1.0).view(1, -1)
        else:
            scale_a, scale_b = scale_a.view(()), scale_b.view(())
        out = torch._scaled_mm(qa, qb.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
        out = out[:, :n]
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out


def gradient_levels(
    g: torch.Tensor, plan: _Plan, bounds: torch.Tensor, both: bool, stochastic: bool
) -> tuple[torch.Tensor, ...] | None:
    """A layer gradient g (R, C)'s int8 levels for both of its products from one kernel
    (``cpu_fused.quantize_rows_int8_both``: two passes over g instead of three): (row levels,
    row scales) for grad-input and (g's columns as rows, their scales) for grad-weight — the
    bits ``_quantize`` gives each. None where it does not serve: one product only (``both``
    false), stochastic rounding, emulation, a scale per tensor, fp8, an empty g, or no fused
    kernels (the caller quantizes each operand itself)."""
    if not both or stochastic or plan.emulate or not plan.rowwise or g.numel() == 0:
        return None
    if plan.grad_input is None or plan.grad_weight is None or g.device.type != "cpu":
        return None
    if plan.grad_input[0].dtype != torch.int8 or plan.grad_weight[0].dtype != torch.int8:
        return None
    fused = getattr(kernels.implementation(g.device), "quantize_rows_int8_both", None)
    if fused is None:
        return None
    return fused(g, bounds[plan.grad_input[0].bound], bounds[plan.grad_weight[0].bound])


def _product(
    a: torch.Tensor,
    b: torch.Tensor,
    operands: tuple[_Operand, _Operand] | None,
    plan: _Plan,
    bounds: torch.Tensor,
    seed: torch.Tensor | None,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    levels_a: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """a · bᵀ (+ bias) for a (M, K), b (N, K): low precision as ``operands`` say, or else in
    ``compute_dtype``; the result is in ``compute_dtype``. Empty operands (no rows to scale)
    take the full-precision path. ``levels_a``: a's (levels, scales), quantized already
    (``gradient_levels``)."""
    if operands is None or a.numel() == 0 or b.numel() == 0:
        return F.linear(a.to(compute_dtype), b.to(compute_dtype), _cast(bias, compute_dtype))
    left, right = operands
    if levels_a is not None:
        qa, scale_a = levels_a
    else:
        keys = _hash_keys(seed) if seed is not None and left.grad else None
        qa, scale_a = _quantize(a, left, bounds[left.bound], keys, plan, plan.emulate)
    qb, scale_b = _quantize(b, right, bounds[right.bound], None, plan, plan.emulate)
    multiply = _int8_product if left.dtype == torch.int8 else _float8_product
    return multiply(qa, qb, scale_a, scale_b, bias, compute_dtype, plan)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
