"""qtrain.clipping: Unified INT8's cosine-optimal clip and lr factor, Distribution-adaptive
INT8's channel classifier and clip recurrence (METHODS.md §4–5), against brute force and
hand values."""

from __future__ import annotations

import math

import pytest
import torch

from qtrain import Clip, QuantSpec, Rounding, formats, quantize
from qtrain.clipping import (
    ClippingError,
    cosine_distance,
    cosine_optimal_clip,
    inverted_t_channels,
    lr_scale,
    magnitude_aware_clip,
)


def heavy_tailed(kind: str, n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Synthetic gradients: Student-t (ν = 2, 3), or Laplace with a few large outliers."""
    torch.manual_seed(seed)
    if kind == "laplace+outliers":
        g = torch.distributions.Laplace(0.0, 1e-3).sample((n,))
        g[torch.randperm(n)[:5]] = torch.tensor([0.2, -0.15, 0.1, -0.3, 0.05])
        return g
    return 1e-4 * torch.distributions.StudentT(float(kind[-1])).sample((n,))


def literal_distance(g: torch.Tensor, clip: float, bits: int = 8) -> float:
    """1 − ⟨g, ĝ⟩/(|g|·|ĝ|) in float64 with ĝ = round(qmax·clamp(g, −c, c)/c)·c/qmax."""
    qmax = 2 ** (bits - 1) - 1
    g64 = g.double()
    g_hat = torch.round(g64.clamp(-clip, clip) / clip * qmax) * clip / qmax
    return float(1 - g64 @ g_hat / (g64.norm() * g_hat.norm()))


@pytest.mark.parametrize("kind", ["t2", "t3", "laplace+outliers"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cosine_optimal_clip_matches_a_brute_force_grid(kind: str, rounding: str) -> None:
    g = heavy_tailed(kind)
    top = float(g.abs().max())
    clip = cosine_optimal_clip(g, rounding=rounding)
    distance = cosine_distance(g, clip, rounding=rounding)
    assert 0 < clip <= top
    grid = [top * k / 500 for k in range(1, 501)]
    best = min(cosine_distance(g, c, rounding=rounding) for c in grid)
    # The search finds the best of 500 evenly spaced clips, to 0.1% of the distance.
    assert distance <= best * 1.001
    assert distance <= cosine_distance(g, top, rounding=rounding)  # never worse than absmax


def test_cosine_distance_is_the_literal_formula() -> None:
    g = heavy_tailed("t3")
    for clip in (1e-4, 5e-4, float(g.abs().max())):
        assert cosine_distance(g, clip) == pytest.approx(literal_distance(g, clip), rel=1e-3)
    # By hand: g = (1, −0.5, 0.25), c = 1 at 2 bits (qmax 1): ĝ = (1, 0, 0) (half to even).
    assert cosine_distance(torch.tensor([1.0, -0.5, 0.25]), 1.0, bits=2) == pytest.approx(
        1 - 1 / math.sqrt(1.3125)
    )
    assert cosine_distance(torch.zeros(5), 1.0) == 0.0  # nothing to turn
    assert cosine_distance(torch.tensor([1e-3, -1e-3]), 1.0, bits=2) == 1.0  # all to zero


def test_stochastic_distance_is_what_draws_of_the_quantizer_average_to() -> None:
    g = heavy_tailed("laplace+outliers", n=100_000)
    clip = 5e-3
    spec = QuantSpec(formats.INT8, scale=Clip(clip), rounding=Rounding.STOCHASTIC)
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(8):
        g_hat = quantize(g, spec, generator=generator).double()
        draws.append(float(1 - g.double() @ g_hat / (g.double().norm() * g_hat.norm())))
    expected = cosine_distance(g, clip, rounding="stochastic")
    assert sum(draws) / len(draws) == pytest.approx(expected, rel=0.01)
    assert expected > cosine_distance(g, clip)  # SR's noise turns ĝ further than nearest


def test_per_channel_clips_broadcast() -> None:
    g = torch.stack([torch.linspace(-1, 1, 101), torch.linspace(-10, 10, 101)])  # (2, 101)
    per_channel = cosine_distance(g, torch.tensor([[1.0], [10.0]]))
    one_clip = cosine_distance(g, 10.0)
    assert per_channel < one_clip  # the small channel keeps its 8 bits


def test_search_edge_cases() -> None:
    assert cosine_optimal_clip(torch.zeros(10)) == 0.0
    spike = torch.zeros(100)
    spike[3] = -2.0
    assert cosine_optimal_clip(spike) == pytest.approx(2.0)  # one value: no clip loses nothing
    g = heavy_tailed("t2")
    assert cosine_optimal_clip(g.view(20, 1000)) == cosine_optimal_clip(g)  # any shape
    assert cosine_optimal_clip(g, grid=8) > 0


def test_lr_scale_by_hand() -> None:
    assert lr_scale(0.0) == 1.0
    assert lr_scale(0.01) == pytest.approx(math.exp(-0.2))  # 0.8187
    assert lr_scale(0.05) == pytest.approx(math.exp(-1))  # 0.3679
    assert lr_scale(0.1151) == pytest.approx(0.1, abs=1e-4)  # e^(−20·0.1151) ≈ β
    assert lr_scale(0.2) == 0.1  # the floor β
    assert lr_scale(0.2, beta=0.01) == pytest.approx(math.exp(-4))
    assert lr_scale(0.1, alpha=10, beta=0.5) == 0.5


def gaussian_and_laplace_channels(n: int = 20_000) -> torch.Tensor:
    """A conv-shaped gradient (N, C, H, W) with channels Gaussian, Laplace, Gaussian, sparse
    (90% zeros: sharp at 0, long-tailed), uniform (Gaussian-like by the rule: P = 0.42)."""
    generator = torch.Generator().manual_seed(1)
    gaussian = torch.randn(n, generator=generator)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    sparse = torch.randn(n, generator=generator) * (torch.rand(n, generator=generator) < 0.1)
    uniform = torch.rand(n, generator=generator) * 2 - 1
    channels = [gaussian, laplace, 3 * gaussian, sparse, uniform]
    return torch.stack(channels).T.reshape(n // 4, 4, len(channels)).permute(0, 2, 1)[..., None]


def test_classifier_on_gaussian_and_laplace_channels() -> None:
    g = gaussian_and_laplace_channels()  # (5000, 5, 4, 1)
    assert inverted_t_channels(g).tolist() == [False, True, False, True, False]
    channels_last = g.permute(0, 2, 3, 1)  # the same channels on the last axis
    assert inverted_t_channels(channels_last, axis=-1).tolist() == [False, True, False, True, False]
    # λ moves the boundary: P(|g| > σ) ≈ 0.317 (Gaussian), 0.243 (Laplace).
    assert inverted_t_channels(g, threshold=0.2).tolist()[:2] == [False, False]
    assert inverted_t_channels(g, threshold=0.35).tolist()[:3] == [True, True, True]
    assert inverted_t_channels(torch.zeros(4, 2)).tolist() == [False, False]  # nothing to clip


def test_recurrence_over_a_hand_sequence() -> None:
    maxima = [1.0, 2.0, 0.5, 0.5, 4.0]
    state, states = maxima[0], [maxima[0]]  # s_0 = max|g|_0
    for current in maxima[1:]:
        state = magnitude_aware_clip(state, current)
        states.append(state)
    # s_t = 0.2·s_{t−1} + 0.8·max_t: 1 → 1.8 → 0.76 → 0.552 → 3.3104
    assert states == pytest.approx([1.0, 1.8, 0.76, 0.552, 3.3104])
    per_channel = magnitude_aware_clip(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]))
    assert per_channel.tolist() == pytest.approx([1.8, 0.4])
    assert magnitude_aware_clip(1.0, 2.0, k=0.5, a=0.5) == pytest.approx(0.75 + 1.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cosine_optimal_clip(torch.ones(3), bits=1), "bits must be an int in 2..16"),
        (lambda: cosine_optimal_clip(torch.ones(3), rounding="up"), "'nearest' or 'stochastic'"),
        (lambda: cosine_optimal_clip(torch.ones(3), grid=1), "grid must be an int >= 2"),
        (lambda: cosine_optimal_clip(torch.ones(3), tolerance=0), "tolerance must be a number"),
        (lambda: cosine_optimal_clip(torch.tensor([1.0, math.nan])), "NaN or inf"),
        (lambda: cosine_optimal_clip(torch.arange(3)), "floating-point tensor"),
        (lambda: cosine_distance(torch.ones(3), 0.0), "clip must be a finite number > 0"),
        (lambda: cosine_distance(torch.ones(3), torch.tensor(-1.0)), "finite values >= 0"),
        (lambda: lr_scale(-0.1), "d_c must be a number in"),
        (lambda: lr_scale(0.1, beta=0), r"beta must be a number in \(0, 1\]"),
        (lambda: lr_scale(0.1, alpha=-1), "alpha must be a number"),
        (lambda: inverted_t_channels(torch.ones(3, 2), threshold=1.0), r"in \(0, 1\)"),
        (lambda: inverted_t_channels(torch.ones(3, 2), axis=2), "axis must be an int in -2..1"),
        (lambda: inverted_t_channels(torch.tensor(1.0)), "at least one dimension"),
        (lambda: magnitude_aware_clip(1.0, 1.0, k=2.0), r"k·A in \[0, 1\]"),
        (lambda: magnitude_aware_clip(1.0, 1.0, a=0.0), "A > 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClippingError, match=message):
        call()
