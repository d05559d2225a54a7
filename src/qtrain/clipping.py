"""Gradient clipping for symmetric int8 training: the formulas of Unified INT8 (Zhu et al.,
CVPR 2020; METHODS.md §4) and Distribution-adaptive INT8 (Zhao et al., AAAI 2021; §5).

Both quantize a gradient g with the symmetric quantizer q = round(qmax·clamp(g, −c, c)/c),
ĝ = q·c/qmax (qmax = 2^(bits−1) − 1, 127 at 8 bits) and choose the clip value c:

- ``cosine_optimal_clip``: Unified INT8's direction-sensitive clip, the c in (0, max|g|] that
  minimises the cosine distance d_c = 1 − ⟨g, ĝ⟩/(|g|·|ĝ|) (``cosine_distance``);
- ``lr_scale``: Unified INT8's deviation-counteractive learning-rate factor φ(d_c);
- ``inverted_t_channels``: Distribution-adaptive INT8's per-channel test, Gaussian or
  inverted-T (sharp and long-tailed);
- ``magnitude_aware_clip``: its clip recurrence for inverted-T channels.

The observers that apply them during training (state per layer, in checkpoints) are
``qtrain.observers.CosineClip`` and ``qtrain.observers.MagnitudeAwareClip``.

>>> import torch
>>> g = torch.distributions.StudentT(2.0).sample((4096,)) * 1e-3
>>> c = cosine_optimal_clip(g)
>>> 0 < c <= float(g.abs().max())
True
>>> cosine_distance(g, c) <= cosine_distance(g, float(g.abs().max()))
True
>>> round(lr_scale(0.01), 4), lr_scale(0.5)
(0.8187, 0.1)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from qtrain.quantizer import PerChannel, canonical_view
from qtrain.validation import check_int, check_number, matches, refuse

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...: golden-section step

RoundingName = Literal["nearest", "stochastic"]


class ClippingError(ValueError):
    """A clipping function got a bad argument."""


def _check_gradient(what: str, g: torch.Tensor) -> None:
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        kind = f"dtype {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
        raise ClippingError(f"{what}: g must be a floating-point tensor, got {kind}")
    if g.numel() and not bool(torch.isfinite(g).all()):
        raise ClippingError(f"{what}: g has NaN or inf values")


def _check_rounding(what: str, rounding: str) -> None:
    if rounding not in ("nearest", "stochastic"):
        refuse(f"{what}.rounding", rounding, "'nearest' or 'stochastic'", ClippingError)


def _distance(unit: torch.Tensor, clip: torch.Tensor | float, qmax: int, rounding: str) -> float:
    """``cosine_distance`` of g = ``unit`` (g/|g|, float32) without checks.

    1 − cos(u, v) = ½·|u/|u| − v/|v||²: a sum of squares, free of the cancellation in
    1 − ⟨u, v⟩/(|u||v|) when d_c is 1e-5 and float32 sums carry 1e-7 relative error."""
    if isinstance(clip, torch.Tensor):
        # An all-zero channel (clip 0) quantizes to zeros, as the quantizer's scale 1 does.
        scale = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))
    else:
        scale = clip / qmax
    levels = (unit / scale).clamp_(-qmax, qmax)  # in units of the scale: clamp(g, −c, c)/s
    if rounding == "nearest":
        g_hat = levels.round_().mul_(scale)
        variance = 0.0
    else:  # stochastic: E[ĝ] = clamp(g, −c, c) and Var[ĝ] = s²·f(1 − f), f = y − floor(y)
        frac = levels - torch.floor(levels)
        variance = float((frac.mul_(1 - frac).mul_(torch.as_tensor(scale) ** 2)).sum())
        g_hat = levels.mul_(scale)
    norm = float(torch.linalg.vector_norm(g_hat))
    if norm == 0:
        return 1.0
    direction = 0.5 * float(torch.linalg.vector_norm(unit - g_hat.div_(norm)) ** 2)
    # With the variance, |ĝ| grows by sqrt(1 + r), r = Var/|E ĝ|²: cos shrinks by that factor.
    shrink = -math.expm1(-0.5 * math.log1p(variance / norm**2))
    return min(1.0, direction + (1 - direction) * shrink)


def _unit(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(g/|g| as float32, |g|); the distances and clips run on g/|g|, so no float32 square
    of a gradient underflows or overflows. An all-zero g gives (g, 0.0)."""
    g32 = g.detach().float()
    norm = float(torch.linalg.vector_norm(g32))
    return (g32 if norm == 0 else g32 / norm), norm


def cosine_distance(
    g: torch.Tensor,
    clip: float | torch.Tensor,
    bits: int = 8,
    rounding: RoundingName = "nearest",
) -> float:
    """d_c = 1 − ⟨g, ĝ⟩/(|g|·|ĝ|): how far the symmetric ``bits``-bit quantization ĝ of g
    clipped at ``clip`` turns g's direction (Unified INT8, §4).

    Args:
        g: the gradient (any shape).
        clip: the clip value c > 0, or a tensor of them broadcastable against g (one per
            channel, e.g. shape (1, C, 1, 1) for a conv gradient's channels); an entry 0
            quantizes its values to 0.
        bits: 2..16 (qmax = 2^(bits−1) − 1).
        rounding: ``"nearest"`` (half to even, as the quantizer): the distance of the one ĝ;
            ``"stochastic"``: the distance with ⟨g, ĝ⟩ and |ĝ|² replaced by their expectations
            under stochastic rounding (E[ĝ] = clamp(g, −c, c), Var = s²·f(1 − f) per value) —
            deterministic, and what one draw's distance concentrates around for large g.

    Returns 0 for an all-zero g, 1 when every value quantizes to 0.

    >>> round(cosine_distance(torch.tensor([1.0, -0.5, 0.25]), 1.0, bits=2), 4)  # ĝ = (1, 0, 0)
    0.1271
    """
    _check_gradient("cosine_distance", g)
    check_int("cosine_distance.bits", bits, ClippingError, low=2, high=16)
    _check_rounding("cosine_distance", rounding)
    if isinstance(clip, torch.Tensor):
        if not bool(torch.isfinite(clip).all()) or bool((clip < 0).any()):
            raise ClippingError("cosine_distance.clip must hold finite values >= 0")
    elif not (matches(clip, float) and math.isfinite(clip) and clip > 0):
        refuse("cosine_distance.clip", clip, "a finite number > 0 or a tensor", ClippingError)
    unit, norm = _unit(g)
    return 0.0 if norm == 0 else _distance(unit, clip / norm, 2 ** (bits - 1) - 1, rounding)


def cosine_optimal_clip(
    g: torch.Tensor,
    bits: int = 8,
    rounding: RoundingName = "nearest",
    grid: int = 32,
    tolerance: float = 1e-3,
) -> float:
    """Unified INT8's direction-sensitive clip: the c in (0, max|g|] that minimises the
    cosine distance d_c between g and its symmetric ``bits``-bit quantization ĝ clipped at c.

    The search is deterministic: d_c at the ``grid`` points c_k = k·max|g|/grid, then a
    golden-section search on the bracket [c_{k−1}, c_{k+1}] around the best of them until it
    is narrower than ``tolerance``·max|g|; the result is the best c evaluated (the larger one
    on a tie). About ``grid`` + 1.44·ln(2/(grid·tolerance)) passes over g (41 by default).

    Args:
        g: the gradient (any shape; one clip for the whole tensor).
        bits: 2..16.
        rounding: the distance's form (see ``cosine_distance``): ``"nearest"`` or
            ``"stochastic"`` (the expected distance under stochastic rounding, for a
            quantizer that rounds stochastically).
        grid: the coarse grid's points (>= 2).
        tolerance: the refined bracket's width relative to max|g|, in (0, 1].

    Returns 0.0 for an all-zero g (nothing to clip); ``cosine_distance(g, c)`` is the
    distance reached.

    >>> g = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([50.0])])  # one outlier
    >>> cosine_optimal_clip(g) < 50.0
    True
    """
    _check_gradient("cosine_optimal_clip", g)
    check_int("cosine_optimal_clip.bits", bits, ClippingError, low=2, high=16)
    _check_rounding("cosine_optimal_clip", rounding)
    check_int("cosine_optimal_clip.grid", grid, ClippingError, low=2)
    check_number("cosine_optimal_clip.tolerance", tolerance, ClippingError, low=1e-9, high=1)
    unit, norm = _unit(g.reshape(-1))
    if norm == 0:
        return 0.0
    top = float(unit.abs().max())  # max|g|/|g|: the search runs on g/|g| and scales c back
    qmax = 2 ** (bits - 1) - 1
    seen: dict[float, float] = {}

    def distance(c: float) -> float:
        if c not in seen:
            seen[c] = _distance(unit, c, qmax, rounding)
        return seen[c]

    # Coarse grid c_k = k·max|g|/grid, k = 1..grid; then golden-section search on the
    # bracket around the best grid point, down to tolerance·max|g|.
    cells = [top * k / grid for k in range(1, grid + 1)]
    best = min(range(grid), key=lambda k: (distance(cells[k]), -k))
    low = cells[best - 1] if best > 0 else top / grid / 2
    high = cells[min(best + 1, grid - 1)]
    left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    while high - low > tolerance * top:
        if distance(left) <= distance(right):
            high, right = right, left
            left = high - GOLDEN * (high - low)
        else:
            low, left = left, right
            right = low + GOLDEN * (high - low)
    clip = min(seen, key=lambda c: (seen[c], -c))  # the best point evaluated; ties: the larger c
    return min(clip * norm, float(g.detach().abs().max()))


def lr_scale(d_c: float, alpha: float = 20.0, beta: float = 0.1) -> float:
    """Unified INT8's deviation-counteractive learning-rate factor φ(d_c) = max(e^(−α·d_c), β):
    a layer whose quantized gradient turns further from the true one takes smaller steps.

    Args:
        d_c: the layer's cosine distance, in [0, 2].
        alpha: the decay rate (>= 0; the paper's 20).
        beta: the floor, in (0, 1] (the paper's 0.1).

    >>> lr_scale(0.0), round(lr_scale(0.05), 4), lr_scale(0.2)
    (1.0, 0.3679, 0.1)
    """
    check_number("lr_scale.d_c", d_c, ClippingError, low=0, high=2)
    check_number("lr_scale.alpha", alpha, ClippingError, low=0, high=1e6)
    if not (matches(beta, float) and 0 < beta <= 1):
        refuse("lr_scale.beta", beta, "a number in (0, 1]", ClippingError)
    return max(math.exp(-alpha * d_c), beta)


def inverted_t_channels(g: torch.Tensor, axis: int = 1, threshold: float = 0.3) -> torch.Tensor:
    """Distribution-adaptive INT8's classifier (§5): per channel along ``axis``, True where
    the channel's gradient is inverted-T (sharp and long-tailed), False where Gaussian.

    A channel is Gaussian if P(|g| > σ) > λ (``threshold``, the paper's 0.3), σ the channel's
    standard deviation (about its mean, over all its values); a Gaussian has P ≈ 0.317, a
    Laplace e^(−√2) ≈ 0.243. An all-zero channel counts as Gaussian (nothing to clip).

    Args:
        g: the gradient, e.g. a conv layer's output gradient (N, C, H, W) with ``axis=1``.
        axis: the channel axis.
        threshold: λ, in (0, 1).

    Returns a bool tensor of shape (C,).

    >>> gen = torch.Generator().manual_seed(0)
    >>> gaussian = torch.randn(4096, 1, generator=gen)
    >>> laplace = torch.distributions.Laplace(0.0, 1.0).sample((4096, 1))
    >>> inverted_t_channels(torch.cat([gaussian, laplace], 1)).tolist()
    [False, True]
    """
    _check_gradient("inverted_t_channels", g)
    if g.dim() == 0:
        raise ClippingError("inverted_t_channels: g needs at least one dimension, got a scalar")
    check_int("inverted_t_channels.axis", axis, ClippingError, low=-g.dim(), high=g.dim() - 1)
    if not (matches(threshold, float) and 0 < threshold < 1):
        refuse("inverted_t_channels.threshold", threshold, "a number in (0, 1)", ClippingError)
    return inverted_t_view(canonical_view(g.detach(), PerChannel(axis))[0], threshold)


def inverted_t_view(x3: torch.Tensor, threshold: float) -> torch.Tensor:
    """``inverted_t_channels`` of a float32 (O, C, I) view (``quantizer.canonical_view``),
    unchecked: True per C where P(|g| > σ) <= λ."""
    sigma = x3.std(dim=(0, 2), correction=0, keepdim=True)
    tail = (x3.abs() > sigma).float().mean(dim=(0, 2))
    return (tail <= threshold) & (sigma.view(-1) > 0)


def check_recurrence(what: str, k: float, a: float, error: type[Exception]) -> None:
    """Refuse a magnitude-aware recurrence that does not settle: A in (0, 1e6], k·A in [0, 1]."""
    check_number(f"{what}.k", k, error, low=0, high=1e6)
    check_number(f"{what}.a", a, error, low=0, high=1e6)
    if a == 0 or k * a > 1:
        raise error(f"{what} needs A > 0 and k·A in [0, 1], got k={k}, A={a}")


def magnitude_aware_clip(
    previous: torch.Tensor | float,
    current_max: torch.Tensor | float,
    k: float = 1.0,
    a: float = 0.8,
) -> torch.Tensor | float:
    """Distribution-adaptive INT8's magnitude-aware clip recurrence (§5) for an inverted-T
    channel: s_t = (1 − k·A)·s_{t−1} + A·max|g|_t (k = 1, A = 0.8: the paper's). The
    recurrence starts at s_0 = max|g|_0; floats or tensors (one value per channel).

    Args:
        previous: s_{t−1}.
        current_max: max|g|_t, this step's largest magnitude.
        k, a: the paper's k and A (k·A in [0, 1], A > 0).

    >>> magnitude_aware_clip(1.0, 2.0)  # 0.2·1 + 0.8·2
    1.8
    """
    check_recurrence("magnitude_aware_clip", k, a, ClippingError)
    return (1 - k * a) * previous + a * current_max
