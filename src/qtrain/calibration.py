"""Calibration ranges for post-training quantization (METHODS.md §7): from sample values, the
range [low, high] a quantizer should cover, one per row (a channel, or the whole tensor).

- ``"minmax"``: the observed extremes (nothing clips);
- ``"percentile"``: the ``p``-th and (100 − p)-th percentiles (outliers clip);
- ``"mse"``: the extremes scaled by the factor α in (0, 1] (a grid of ``grid`` points) whose
  quantization has the smallest mean squared error on the values.

A signed integer format is symmetric (the range ±max(|low|, |high|), zero point 0); an unsigned
one is affine (``qtrain.quantizer.qparams_from_range``: the covering integer zero point).
``qparams_of`` turns a range into the quantizer's qparams. The observers that apply them are
``qtrain.observers.CalibratedRange`` (activations, over calibration batches) and
``qtrain.observers.FixedQParams`` (weights, once).

>>> import torch
>>> from qtrain import formats
>>> x = torch.cat([torch.randn(1, 10000), torch.tensor([[40.0]])], dim=1)   # one outlier
>>> low, high = calibration_range(x, "minmax", formats.Int(4))
>>> float(high)
40.0
>>> low, high = calibration_range(x, "mse", formats.Int(4))
>>> float(high) < 10                                    # the outlier is clipped
True
"""

from __future__ import annotations

from typing import Literal

import torch

from qtrain.formats import Int
from qtrain.quantizer import QParams, QuantSpecError, qparams_from_range
from qtrain.validation import check_int, check_number, refuse

Method = Literal["minmax", "percentile", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")


def qparams_of(low: torch.Tensor, high: torch.Tensor, int_format: Int) -> QParams:
    """Scale and zero point per row for the range [low, high]: symmetric for a signed format
    (scale = max(|low|, |high|)/qmax, an all-zero row scale 1), else affine."""
    if int_format.signed:
        amax = torch.maximum(low.abs(), high.abs())
        scale = torch.where(amax > 0, amax / int_format.qmax, torch.ones_like(amax))
        return QParams(scale.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(scale))
    return qparams_from_range(low, high, int_format)


def fake_quantize_rows(values: torch.Tensor, qparams: QParams, int_format: Int) -> torch.Tensor:
    """``values`` (rows, n) on each row's grid, nearest rounding: the reference the MSE search
    scores ranges with."""
    scale = qparams.scale.view(-1, 1)
    zero_point = qparams.zero_point.view(-1, 1)
    levels = torch.clamp(torch.round(values / scale) + zero_point, int_format.qmin, int_format.qmax)
    return (levels - zero_point) * scale


def calibration_range(
    values: torch.Tensor,
    method: str,
    int_format: Int,
    percentile: float = 99.99,
    grid: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), each of shape (rows,), for the rows of ``values`` (rows, n) by ``method``.

    Args:
        values: finite sample values, one row per scale (per tensor: one row).
        method: "minmax", "percentile" or "mse".
        int_format: the format the range will be quantized to (its sign decides symmetric or
            affine; the MSE search scores that quantizer).
        percentile: p in (50, 100] for "percentile".
        grid: the number of scale factors the "mse" search tries.
    """
    if method not in METHODS:
        refuse("calibration method", method, f"one of {METHODS}", QuantSpecError)
    check_number("percentile", percentile, QuantSpecError, low=50.0, high=100.0)
    check_int("grid", grid, QuantSpecError, low=1)
    if values.dim() != 2 or values.shape[1] == 0:
        raise QuantSpecError(
            f"calibration_range needs values of shape (rows, n > 0), got {tuple(values.shape)}"
        )
    values = values.float()
    if method == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100], device=values.device)
        low, high = torch.quantile(values, q, dim=1)
        return low, high
    low, high = values.amin(dim=1), values.amax(dim=1)
    if method == "minmax":
        return low, high
    best_error = torch.full_like(low, torch.inf)
    best_factor = torch.ones_like(low)
    for step in range(1, grid + 1):
        factor = step / grid
        qparams = qparams_of(low * factor, high * factor, int_format)
        error = (fake_quantize_rows(values, qparams, int_format) - values).square().mean(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_factor = torch.where(better, torch.full_like(best_factor, factor), best_factor)
    return low * best_factor, high * best_factor
