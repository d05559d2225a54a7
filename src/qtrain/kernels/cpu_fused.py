"""The ``cpu_fused`` backend: fused, vectorised, multi-threaded C++ kernels for the CPU.

Same primitives, signatures and results as ``qtrain.kernels.reference`` — bit-identical, for
nearest rounding and for stochastic rounding with the same seed — including the ops layer's
``fake_quant_int_levels`` (x̂ for the GEMM and the levels to save for backward, in one pass) and
``dequant_int``; plus ``quant_int_levels`` (levels straight into int8/int16 storage). It also
serves ``qtrain.lowp``'s kernels, which live in ``qtrain.kernels.cpu_gemm`` (operand levels,
im2col and its adjoint, the int8 convolution route's quantized rows and fused epilogues),
under the same names.

``csrc/quant.cpp`` is compiled on first use, never at import, with ``-O3 -march=native
-fopenmp`` into ``$QTRAIN_CACHE_DIR`` (default ``~/.cache/qtrain``)``/ext-<key>``; the key hashes
the source, the flags, the torch build and the CPU's instruction-set flags, because
``-march=native`` code must not run on another CPU. Later processes load the cached library
without a compiler. The kernels are ``torch.library`` operators (``torch.ops.qtrain.*``) with
fake implementations, so ``torch.compile`` traces them as real ops. Where the build fails (no
compiler), ``load`` returns None and ``Backend.AUTO`` uses the reference, after one warning.

Outputs of 8 MiB and more are allocated on transparent huge pages, and their memory is kept
when they are freed (at most 256 MiB in all) for the next output of the same size: fresh pages
cost a fault and a zeroing each, about as long as a quantize pass.

>>> import torch
>>> from qtrain.kernels import Backend, implementation
>>> impl = implementation(torch.device("cpu"), Backend.CPU_FUSED)  # builds on first use
>>> x3 = torch.tensor([[[0.3, -1.0, 0.5]]])
>>> y3, _ = impl.fake_quant_int(x3, impl.absmax(x3) / 127, torch.zeros(1), -127, 127, None, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from qtrain.kernels import Backend, cpu_gemm, is_dense, reference, register_backend, with_strides

# qtrain.lowp's kernels live in cpu_gemm; this module (what kernels.implementation returns)
# serves them under the same names.
from qtrain.kernels.cpu_gemm import (  # noqa: F401  (re-exported)
    IntPair,
    col2im_int8_epilogue,
    col2im_nhwc,
    conv_output_size,
    empty_cached,
    im2col_int8,
    im2col_int8_grad_weight,
    im2col_int8_product,
    im2col_nhwc,
    int8_epilogue,
    quantize_rows_int8,
    quantize_rows_int8_both,
)

_NAME = "qtrain_cpu_fused"
_SOURCE = Path(__file__).parent / "csrc" / "quant.cpp"
# -ffp-contract=off: no fused multiply-adds, so every float operation rounds where the
# reference's does (bit-exact results). -fno-trapping-math (as torch builds): floor() may then
# vectorise; no value changes. OpenMP resolves to torch's own runtime at load time.
_CFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-trapping-math",
]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_available: bool | None = None  # None: not tried yet


def cache_dir() -> Path:
    """Where the compiled library lives: one directory per (source, flags, torch, CPU)."""
    root = os.environ.get("QTRAIN_CACHE_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "qtrain")
    return Path(root) / f"ext-{_build_key()}"


def _build_key() -> str:
    digest = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        " ".join(_CFLAGS + _LDFLAGS).encode(),
        f"{torch.__version__} {torch.version.git_version} {platform.machine()}".encode(),
        _cpu_flags().encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` compiles for)."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags")
        return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))
    return platform.processor()


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Make the ``ninja`` installed beside this Python findable even in a non-activated venv."""
    if shutil.which("ninja") is not None:
        yield
        return
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), previous])
    try:
        yield
    finally:
        os.environ["PATH"] = previous


def _build_and_load() -> None:
    directory = cache_dir()
    library = directory / f"{_NAME}.so"
    # A lock file means another process is building: let cpp_extension wait for it.
    if library.exists() and not (directory / "lock").exists():
        torch.ops.load_library(str(library))
    else:
        from torch.utils import cpp_extension  # imports setuptools: only when building

        directory.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            cpp_extension.load(
                name=_NAME,
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                build_directory=str(directory),
                is_python_module=False,
            )
    _register_fakes()


def load() -> types.ModuleType | None:
    """This module, once its library is built and loaded; None where it cannot be built.

    The first failure warns once; later calls return None quietly.
    """
    global _available
    if _available is not None:  # the fast path: AUTO asks on every call
        return sys.modules[__name__] if _available else None
    with _lock:
        if _available is None:
            try:
                _build_and_load()
                _available = True
            except Exception as error:  # no compiler, no ninja, a failed build: fall back
                _available = False
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                warnings.warn(
                    f"qtrain: cpu_fused kernels unavailable ({reason}); using the reference",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return sys.modules[__name__] if _available else None


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile / FakeTensor trace the ops without data."""

    def like(x: torch.Tensor, wanted: bool, dtype: torch.dtype) -> torch.Tensor:
        return x.new_empty(x.shape if wanted else (0,), dtype=dtype)

    @torch.library.register_fake("qtrain::minmax")
    def _minmax(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x3.new_empty(x3.shape[1]), x3.new_empty(x3.shape[1])

    @torch.library.register_fake("qtrain::absmax")
    def _absmax(x3: torch.Tensor) -> torch.Tensor:
        return x3.new_empty(x3.shape[1])

    @torch.library.register_fake("qtrain::range_bn_stats")
    def _range_bn_stats(x3, chunks):
        pairs = (chunks, x3.shape[1])
        sums = x3.new_empty(pairs, dtype=torch.float64)
        rest = x3.new_empty(x3.shape[1], dtype=torch.float64)
        index = x3.new_empty(pairs, dtype=torch.int64)
        return sums, rest, x3.new_empty(pairs), index, x3.new_empty(pairs), torch.empty_like(index)

    @torch.library.register_fake("qtrain::channel_affine")
    def _channel_affine(x, scale, shift):
        return torch.empty_like(x)

    @torch.library.register_fake("qtrain::zero_mask")
    def _zero_mask(y):
        return torch.empty_like(y, dtype=torch.bool)

    @torch.library.register_fake("qtrain::masked_zero")
    def _masked_zero(grad, mask):
        return torch.empty_like(grad)

    @torch.library.register_fake("qtrain::channel_affine_relu")
    def _channel_affine_relu(x, scale, shift):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("qtrain::range_bn_backward")
    def _range_bn_backward(
        grad3, x3, mean, inv_spread, gamma, constant, high_index, low_index, zero_mask=None
    ):
        return torch.empty_like(x3), mean.new_empty(mean.shape), mean.new_empty(mean.shape)

    @torch.library.register_fake("qtrain::quantize_int")
    def _quantize_int(
        x3, scale, zero_point, qmin, qmax, seed, want_fake, want_mask, levels_dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            like(x3, want_fake, torch.float32),
            like(x3, want_mask, torch.bool),
            like(x3, levels_dtype is not None, levels_dtype or torch.bool),
        )

    @torch.library.register_fake("qtrain::quantize_int_pair")
    def _quantize_int_pair(x3, scale_a, zp_a, qmin_a, qmax_a, scale_b, zp_b, qmin_b, qmax_b, seed):
        return torch.empty_like(x3), torch.empty_like(x3)

    def pooled(like: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        layout = torch.contiguous_format if like.is_contiguous() else torch.channels_last
        shape = (*like.shape[:2], height, width)
        return torch.empty(shape, dtype=dtype, device=like.device, memory_format=layout)

    @torch.library.register_fake("qtrain::max_pool2x2")
    def _max_pool2x2(x):
        height, width = x.shape[2] // 2, x.shape[3] // 2
        return pooled(x, height, width, torch.float32), pooled(x, height, width, torch.uint8)

    @torch.library.register_fake("qtrain::max_pool2x2_backward")
    def _max_pool2x2_backward(grad, where, height, width):
        return pooled(grad, height, width, torch.float32)

    @torch.library.register_fake("qtrain::dequantize_int")
    def _dequantize_int(levels3, scale, zero_point) -> torch.Tensor:
        return levels3.new_empty(levels3.shape, dtype=torch.float32)

    @torch.library.register_fake("qtrain::fake_quant_minifloat")
    def _fake_quant_minifloat(x, exponent_bits, mantissa_bits, has_inf, saturate, seed):
        return torch.empty_like(x)

    cpu_gemm.register_fakes()


# ---- the primitives (reference.py's names and signatures) ----------------------------------


def _seed64(seed: int | None) -> int | None:
    """The seed mod 2^64 as a signed 64-bit int (what an ``int?`` op argument holds)."""
    if seed is None:
        return None
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _per_channel(value: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter as the ops take it: contiguous 1-D float32. Most already are,
    and then pass untouched: three no-op tensor calls per parameter add up to a few hundred per
    training step."""
    if value.dim() == 1 and value.dtype == torch.float32 and value.is_contiguous():
        return value
    return value.reshape(-1).to(torch.float32).contiguous()


def minmax(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-C minimum and maximum of an (O, C, I) float32 view (NaN propagates)."""
    low, high = torch.ops.qtrain.minmax(x3.contiguous())
    return low, high


def absmax(x3: torch.Tensor) -> torch.Tensor:
    """Per-C max |x| of an (O, C, I) float32 view (NaN propagates)."""
    return torch.ops.qtrain.absmax(x3.contiguous())


def _channel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the layer kernels (Range BN, channel_affine, the 2×2 pool) take it: contiguous, or
    channels-last (C innermost, the other dims in order: a channels_last (B, C, H, W) tensor or
    its (B, C, H·W) view) as it is; else a contiguous copy."""
    if x.is_contiguous() or (x.dim() >= 3 and x.movedim(1, -1).is_contiguous()):
        return x
    return x.contiguous()


def range_bn_stats(
    x3: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range BatchNorm's per-(run, channel) sums, extremes and their first positions, and the
    sums outside the runs (see ``reference.range_bn_stats``), in one read of x (contiguous or
    channels-last)."""
    return torch.ops.qtrain.range_bn_stats(_channel_layout(x3), chunks)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = x·scale[c] + shift[c] over a float32 (B, C, ...) tensor (a multiply, then an add),
    in x's layout when that is contiguous or channels_last."""
    return torch.ops.qtrain.channel_affine(
        _channel_layout(x), _per_channel(scale), _per_channel(shift)
    )


def channel_affine_relu(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(x·scale[c] + shift[c]) and its ReLU-backward mask, in one pass (see
    ``reference.channel_affine_relu``)."""
    return torch.ops.qtrain.channel_affine_relu(
        _channel_layout(x), _per_channel(scale), _per_channel(shift)
    )


def zero_mask(y: torch.Tensor) -> torch.Tensor:
    """[y ≤ 0] as bool, one byte per value, in y's layout when dense (see
    ``reference.zero_mask``)."""
    if y.dtype != torch.float32:
        return reference.zero_mask(y)
    return torch.ops.qtrain.zero_mask(y if is_dense(y) else y.contiguous())


def masked_zero(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad`` with zeros where ``mask`` is True (see ``reference.masked_zero``)."""
    if grad.dtype != torch.float32 or grad.shape != mask.shape:
        return reference.masked_zero(grad, mask)
    mask = mask if is_dense(mask) else mask.contiguous()
    return torch.ops.qtrain.masked_zero(with_strides(grad, mask.stride()), mask)


def max_pool2x2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's 2×2, stride-2 max pool and each max's window position as uint8 (see
    ``reference.max_pool2x2``), in one pass, in x's layout (contiguous or channels_last)."""
    if x.dtype != torch.float32:
        return reference.max_pool2x2(x)
    return torch.ops.qtrain.max_pool2x2(_channel_layout(x))


def max_pool2x2_backward(
    grad: torch.Tensor, where: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The max pool's input gradient from the window positions, in one pass (see
    ``reference.max_pool2x2_backward``)."""
    if grad.dtype != torch.float32:
        return reference.max_pool2x2_backward(grad, where, height, width)
    where = _channel_layout(where)
    return torch.ops.qtrain.max_pool2x2_backward(
        with_strides(grad, where.stride()), where, height, width
    )


def range_bn_backward(
    grad3: torch.Tensor,
    x3: torch.Tensor,
    mean: torch.Tensor,
    inv_spread: torch.Tensor,
    gamma: torch.Tensor,
    constant: float,
    high_index: torch.Tensor,
    low_index: torch.Tensor,
    zero_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range BatchNorm's backward (see ``reference.range_bn_backward``): one read of g and x
    (through a fused ReLU's ``zero_mask`` if given) for the sums, one pass writing grad_x (in
    x's layout, contiguous or channels-last)."""
    x3 = _channel_layout(x3)
    if zero_mask is not None:
        zero_mask = with_strides(zero_mask.reshape(x3.shape), x3.stride())
    return torch.ops.qtrain.range_bn_backward(
        with_strides(grad3, x3.stride()),
        x3,
        _per_channel(mean),
        _per_channel(inv_spread),
        _per_channel(gamma),
        constant,
        high_index.contiguous(),
        low_index.contiguous(),
        zero_mask,
    )


def _quantize_int(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
    want_fake: bool,
    want_mask: bool,
    levels_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.qtrain.quantize_int(
        x3.contiguous(),
        _per_channel(scale),
        _per_channel(zero_point),
        qmin,
        qmax,
        _seed64(seed),
        want_fake,
        want_mask,
        levels_dtype,
    )


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
    fake, mask, _ = _quantize_int(x3, scale, zero_point, qmin, qmax, seed, True, want_mask, None)
    return fake, (mask if want_mask else None)


def fake_quant_int_pair(
    x3: torch.Tensor,
    scale_a: torch.Tensor,
    zero_point_a: torch.Tensor,
    qmin_a: int,
    qmax_a: int,
    scale_b: torch.Tensor,
    zero_point_b: torch.Tensor,
    qmin_b: int,
    qmax_b: int,
    seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ of x3 on two grids in one pass, one uniform per index for both (see
    ``reference.fake_quant_int_pair``)."""
    return torch.ops.qtrain.quantize_int_pair(
        x3.contiguous(),
        _per_channel(scale_a),
        _per_channel(zero_point_a),
        qmin_a,
        qmax_a,
        _per_channel(scale_b),
        _per_channel(zero_point_b),
        qmin_b,
        qmax_b,
        _seed64(seed),
    )


def quant_int(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
) -> torch.Tensor:
    """Integer levels clamp(round(x/s) + z, qmin, qmax) as float32 (caller casts)."""
    return quant_int_levels(x3, scale, zero_point, qmin, qmax, seed, torch.float32)


def quant_int_levels(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``quant_int`` written straight in ``dtype`` (float32, int8, uint8, int16 or int32).

    Equals ``reference.quant_int(...).to(dtype)`` for finite input; NaN is stored as level 0.
    """
    return _quantize_int(x3, scale, zero_point, qmin, qmax, seed, False, False, dtype)[2]


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
    """``fake_quant_int`` that also returns the levels in ``dtype``, from the same single pass
    (NaN stored as level 0 in an integer dtype).

    For saved activations: the GEMM uses x̂ now, backward keeps 1-byte levels and rebuilds x̂
    bit-exactly with ``dequant_int(levels, scale, zero_point)``.
    """
    fake, mask, levels = _quantize_int(
        x3, scale, zero_point, qmin, qmax, seed, True, want_mask, dtype
    )
    return fake, (mask if want_mask else None), levels


def dequant_int(
    levels3: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """(levels − z)·s in float32 from an (O, C, I) view of stored levels."""
    return torch.ops.qtrain.dequantize_int(
        levels3.contiguous(), _per_channel(scale), _per_channel(zero_point)
    )


def fake_quant_minifloat(
    x: torch.Tensor,
    exponent_bits: int,
    mantissa_bits: int,
    has_inf: bool,
    saturate: bool,
    seed: int | None,
) -> torch.Tensor:
    """Round float32 ``x`` onto a minifloat grid (subnormals, overflow and NaN as torch casts)."""
    return torch.ops.qtrain.fake_quant_minifloat(
        x.contiguous(), exponent_bits, mantissa_bits, has_inf, saturate, _seed64(seed)
    )


register_backend(Backend.CPU_FUSED, load, ["cpu"])
