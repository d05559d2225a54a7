"""Plain-PyTorch reference kernels. Every other backend is tested against these.

All integer kernels work on a canonical view: a contiguous float32 tensor of shape (O, C, I)
with one scale and zero point per C (per-tensor: C = 1; per-channel: the channel axis;
per-token/per-group: one "channel" per row/group with the values along I). The quantizer
(``qtrain.quantizer``) builds that view, so kernels never see granularities.

The layer kernels (Range BN, the ReLU masks, the 2×2 max pool) take a batch in any layout and
give their results in the layout torch's ops would: a channels_last batch stays channels_last
(the fused backends keep contiguous and channels-last layouts, and copy others to contiguous).

Stochastic rounding draws its uniforms from a counter-based hash of (seed, linear index in
the canonical view): the same seed gives the same result on any backend, any thread count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(h: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(h * c) mod 2^32 for h < 2^32 held in int64, without int64 overflow."""
    low = h * (c & 0xFFFF)
    high = ((h * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(h: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer finaliser (lowbias32 constants): a bijection with good avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys derived from a 64-bit seed (shared by every backend)."""
    seed &= (1 << 64) - 1
    key0 = _mix32((seed & _MASK32) ^ _GOLDEN)
    key1 = _mix32(((seed >> 32) & _MASK32) ^ key0)
    return int(key0), int(key1)


def uniform_bits(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """24-bit uniform integers in [0, 2^24) for elements 0..numel-1 (int64 tensor).

    u_i = mix32(mix32(lo32(i) ^ key0) ^ ((hi32(i) + key1) mod 2^32)) >> 8
    """
    key0, key1 = seed_keys(seed)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    h = _mix32((index & _MASK32) ^ key0)
    h = _mix32(h ^ (((index >> 32) + key1) & _MASK32))
    return h >> 8


def uniform(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 uniforms in [0, 1) on a 2^-24 grid, from ``uniform_bits``."""
    return uniform_bits(seed, numel, device).to(torch.float32) * (2.0**-24)


def round_values(v: torch.Tensor, seed: int | None) -> torch.Tensor:
    """Round to integers: nearest-even when ``seed`` is None, else stochastic.

    Stochastic: floor(v) + [u < v - floor(v)], exactly unbiased up to the 2^-24 grid of u.
    """
    if seed is None:
        return torch.round(v)
    floor = torch.floor(v)
    u = uniform(seed, v.numel(), v.device).view(v.shape)
    return floor + (u < (v - floor)).to(v.dtype)


def minmax(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-C minimum and maximum of an (O, C, I) view (NaN propagates)."""
    flat = x3.transpose(0, 1).reshape(x3.shape[1], -1)
    return flat.amin(dim=1), flat.amax(dim=1)


def absmax(x3: torch.Tensor) -> torch.Tensor:
    """Per-C max |x| of an (O, C, I) view (NaN propagates)."""
    return x3.abs().transpose(0, 1).reshape(x3.shape[1], -1).amax(dim=1)


def range_bn_stats(
    x3: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range BatchNorm's training statistics of a float32 (B, C, HW) batch, chunked as the
    authors do: each channel's B·HW values, laid out sample by sample, are cut into ``chunks``
    runs of n = ⌊B·HW / K⌋ values (the last B·HW − K·n are in no run).

    Returns (sums, rest, high, high_index, low, low_index): ``sums`` (K, C) float64, each run's
    sum; ``rest`` (C,) float64, the sum of the values in no run; the others (K, C): each run's
    maximum and minimum and the first position of each in the run (position i of run k is the
    channel's sample-major position k·n + i). +0 and −0 tie; a run that holds a NaN has NaN as
    both extremes, at its first NaN.
    """
    batch, channels, spatial = x3.shape
    run = batch * spatial // chunks
    flat = x3.transpose(0, 1).reshape(channels, -1)  # (C, B·HW), sample-major per channel
    runs = flat[:, : chunks * run].reshape(channels, chunks, run).transpose(0, 1)  # (K, C, n)
    high, high_index = runs.max(dim=2)
    low, low_index = runs.min(dim=2)
    rest = flat[:, chunks * run :].double().sum(dim=1)
    return runs.double().sum(dim=2), rest, high, high_index, low, low_index


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = x·scale[c] + shift[c] over a float32 (B, C, ...) tensor (a multiply, then an add)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


def channel_affine_relu(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(``channel_affine(x, scale, shift)``), its ReLU-backward mask ``zero_mask``)."""
    y = torch.relu(channel_affine(x, scale, shift))
    return y, zero_mask(y)


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
    """Range BatchNorm's backward for y = (x − μ)·s·γ + β, s = 1/(C(n)·r + eps), r = mean_k
    max_k − mean_k min_k over the runs of ``range_bn_stats`` (whose indices it takes).

    Returns (grad_x, grad_gamma, grad_beta): with n values per channel,
    grad_x = g·(γs) − γs·Σg/n, plus ∂L/∂r = −C(n)·γ·s²·Σg·(x − μ) shared over the chunks,
    +1/K at each chunk's max and −1/K at its min; grad_gamma = s·Σg·(x − μ), grad_beta = Σg.
    Sums in float64. ``zero_mask``: a fused ReLU's mask (``channel_affine_relu``); g is zeroed
    where it is set first, as the ReLU's backward does.
    """
    if zero_mask is not None:
        grad3 = masked_zero(grad3, zero_mask.view(grad3.shape))
    batch, channels, spatial = x3.shape
    chunks = high_index.shape[0]
    run = batch * spatial // chunks
    g64 = grad3.double()
    sum_g = g64.sum(dim=(0, 2))
    sum_gx = (g64 * (x3 - mean.view(1, -1, 1)).double()).sum(dim=(0, 2))
    slope64 = gamma.double() * inv_spread.double()
    slope = slope64.float()
    offset = (-slope64 * sum_g / (batch * spatial)).float()
    share = (-constant * slope64 * inv_spread.double() * sum_gx / chunks).float()
    grad_x = grad3 * slope.view(1, -1, 1) + offset.view(1, -1, 1)
    run_start = (torch.arange(chunks, device=x3.device) * run)[:, None]
    channel = torch.arange(channels, device=x3.device).expand(chunks, channels)
    for index, sign in ((high_index, 1.0), (low_index, -1.0)):
        position = run_start + index  # the channel's sample-major position
        grad_x.index_put_(
            (position // spatial, channel, position % spatial),
            sign * share.expand(chunks, channels),
            accumulate=True,
        )
    return grad_x, (sum_gx * inv_spread.double()).float(), sum_g.float()


def zero_mask(y: torch.Tensor) -> torch.Tensor:
    """[y ≤ 0] as bool: where a ReLU with output y has zero gradient (torch's
    ``threshold_backward``; a NaN output is not ≤ 0, its gradient passes)."""
    return y <= 0


def masked_zero(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad`` with zeros where ``mask`` is True: a ReLU's backward from ``zero_mask``."""
    return torch.where(mask, 0.0, grad)


def max_pool2x2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's 2×2, stride-2 max pool of a (B, C, H, W) tensor (floor mode), with each max's
    position in its window (0..3, row by row) as uint8 instead of an int64 flat index."""
    y, indices = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    width = x.shape[-1]
    where = indices // width % 2 * 2 + indices % width % 2
    return y, where.to(torch.uint8)


def max_pool2x2_backward(
    grad: torch.Tensor, where: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """torch's max-pool backward for ``max_pool2x2`` of an input of spatial size (height,
    width): the flat indices rebuilt from the window positions."""
    out_h, out_w = grad.shape[-2:]
    rows = torch.arange(out_h, device=grad.device).view(-1, 1) * 2
    columns = torch.arange(out_w, device=grad.device) * 2
    at = where.long()
    indices = (rows + at // 2) * width + columns + at % 2
    # Only the stand-in's shape and layout are read.
    layout = torch.contiguous_format if grad.is_contiguous() else torch.channels_last
    stand_in = torch.empty(
        (*grad.shape[:2], height, width), dtype=grad.dtype, device=grad.device, memory_format=layout
    )
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad, stand_in, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
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
    """x̂ = (clamp(round(x·(1/s)) + z, qmin, qmax) − z)·s, as torch.fake_quantize_* computes it.

    Returns x̂ and, when asked, the STE mask (True where round(x/s) + z was inside the range).
    """
    q, mask = _quant_levels(x3, scale, zero_point, qmin, qmax, seed, want_mask)
    s = scale.view(1, -1, 1)
    z = zero_point.view(1, -1, 1)
    return (q - z) * s, mask


def pair_of(fake_quant: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> Callable:
    """``fake_quant_int_pair`` from a backend's ``fake_quant_int``: one call per grid, on the
    same seed."""

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
        """x̂ of x3 on two grids (SBM's bifurcated copies of a gradient): ``fake_quant_int``
        on each with the same seed, so both round with the one uniform per index."""
        fake_a = fake_quant(x3, scale_a, zero_point_a, qmin_a, qmax_a, seed, False)[0]
        fake_b = fake_quant(x3, scale_b, zero_point_b, qmin_b, qmax_b, seed, False)[0]
        return fake_a, fake_b

    return fake_quant_int_pair


fake_quant_int_pair = pair_of(fake_quant_int)


def quant_int(
    x3: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    seed: int | None,
) -> torch.Tensor:
    """Integer levels clamp(round(x/s) + z, qmin, qmax) as float32 (caller casts)."""
    return _quant_levels(x3, scale, zero_point, qmin, qmax, seed, False)[0]


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
    """``fake_quant_int`` that also returns the levels in ``dtype``, from the one rounding.

    For saved activations: the GEMM uses x̂ now, backward keeps the (1-byte) levels and rebuilds
    x̂ bit-exactly with ``dequant_int(levels, scale, zero_point)``. NaN has no integer level: it
    is stored as 0 (a float ``dtype`` keeps it).
    """
    q, mask = _quant_levels(x3, scale, zero_point, qmin, qmax, seed, want_mask)
    s = scale.view(1, -1, 1)
    z = zero_point.view(1, -1, 1)
    return (q - z) * s, mask, stored_levels(q, dtype)


def stored_levels(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 levels in a storage ``dtype``; NaN has no integer level and is stored as 0."""
    if dtype.is_floating_point:
        return q.to(dtype)
    return torch.where(torch.isnan(q), 0.0, q).to(dtype)


def dequant_int(
    levels3: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """x̂ = (levels − z)·s in float32 from an (O, C, I) view of stored levels: for levels from
    ``fake_quant_int_levels``, bit-identical to its x̂."""
    s = scale.view(1, -1, 1)
    z = zero_point.view(1, -1, 1)
    return (levels3.to(torch.float32) - z) * s


def _quant_levels(x3, scale, zero_point, qmin, qmax, seed, want_mask):
    inv_scale = (1.0 / scale).view(1, -1, 1)
    z = zero_point.view(1, -1, 1)
    shifted = round_values(x3 * inv_scale, seed) + z
    mask = ((shifted >= qmin) & (shifted <= qmax)) if want_mask else None
    return shifted.clamp(qmin, qmax), mask


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2^n in float32 for integer n in [-126, 127], built from the bit pattern."""
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def _ldexp(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x·2^n in two exact steps, so n may exceed the float32 exponent range (|n| <= 252)."""
    first = torch.div(exponent, 2, rounding_mode="floor")
    return x * _pow2(first) * _pow2(exponent - first)


def fake_quant_minifloat(
    x: torch.Tensor,
    exponent_bits: int,
    mantissa_bits: int,
    has_inf: bool,
    saturate: bool,
    seed: int | None,
) -> torch.Tensor:
    """Round float32 ``x`` onto a minifloat grid (subnormals, overflow and NaN as torch casts)."""
    bias = 2 ** (exponent_bits - 1) - 1
    min_exponent = 1 - bias
    top = 2**exponent_bits - 1
    max_exponent = (top - 1 if has_inf else top) - bias
    max_mantissa = 2.0 - 2.0 ** -(mantissa_bits if has_inf else mantissa_bits - 1)
    max_value = max_mantissa * 2.0**max_exponent

    _, frexp_exponent = torch.frexp(x)
    # |x| = m·2^e with m in [1, 2): e = frexp exponent − 1; subnormals share min_exponent.
    exponent = (frexp_exponent.to(torch.int64) - 1).clamp(min=min_exponent)
    quantum_exponent = exponent - mantissa_bits
    levels = round_values(_ldexp(x, -quantum_exponent), seed)
    y = _ldexp(levels, quantum_exponent)

    overflow = y.abs() > max_value
    if saturate:
        y = torch.where(overflow, torch.copysign(torch.tensor(max_value), x), y)
    elif has_inf:
        y = torch.where(overflow, torch.copysign(torch.tensor(float("inf")), x), y)
    else:
        y = torch.where(overflow, torch.tensor(float("nan")), y)
    # torch.frexp leaves inf/NaN unspecified: set their result by the format's semantics.
    infinite = torch.isinf(x)
    if saturate:
        special = torch.copysign(torch.tensor(max_value), x)
    elif has_inf:
        special = x
    else:
        special = torch.full_like(x, float("nan"))
    y = torch.where(infinite, special, y)
    return torch.where(torch.isnan(x), x, y)
