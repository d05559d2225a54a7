"""Named quantization presets: ``quantize_(model, "sbm8")``.

A preset is a function returning a ``quantize_`` config; this module sits below the recipes,
which build their configs from the same functions, so the name and the recipe cannot drift.

>>> from torch import nn
>>> from qtrain import quantize_
>>> type(quantize_(nn.Sequential(nn.Linear(4, 2)), "sbm8")[0]).__name__
'QLinear'
"""

from __future__ import annotations

from collections.abc import Callable

from qtrain.api import FakeQuantConfig, QuantizedTrainingConfig, register_config_name
from qtrain.formats import Int
from qtrain.observers import Observer
from qtrain.ops import GemmConfig
from qtrain.quantizer import (
    AbsMax,
    AbsMean,
    Granularity,
    LearnedStep,
    MinMax,
    PerChannel,
    PerTensor,
    PerToken,
    QuantSpec,
    Rounding,
)


def sbm_quantization(
    bits: int = 8,
    grad_bits: int = 8,
    grad_weight_bits: int = 16,
    grad_rounding: Rounding = Rounding.STOCHASTIC,
    bifurcation: bool = True,
    range_batchnorm: bool = True,
    quantize_saved_activations: bool = True,
    range_momentum: float = 0.9,
    range_bn_chunks: int = 16,
    nonfinite_gradients: str = "error",
    quantize_batchnorm: bool = True,
    range_bn_spread: str = "range",
    range_bn_constant_scale: float = 1.0,
) -> QuantizedTrainingConfig:
    """SBM (Banner et al. 2018, METHODS.md §1): every conv/linear's three products quantized.

    Weights per-tensor min/max, nearest; activations the batch mean of per-sample min/max
    (running ranges in eval: the input observer), straight-through everywhere; g_l at
    ``grad_bits`` for the grad-input product and, with ``bifurcation``, a ``grad_weight_bits``
    copy for the grad-weight product. With ``range_batchnorm`` and ``quantize_batchnorm``, Range
    BN's input is quantized as an activation (``bits``) and the gradient reaching it as g_l
    (``grad_bits``, per tensor), as the authors' code does. One running-statistics rule for
    the input ranges and Range BN: run ← m·run + (1 − m)·batch, m = ``range_momentum`` (0.9,
    torch's BatchNorm rule; the authors' code has 0.1: measured in docs/RESULTS.md, issue 15).
    ``nonfinite_gradients="propagate"`` lets an overflowed gradient reach a loss scaler (fp16
    autocast) instead of raising.
    """
    weight = QuantSpec(Int(bits, signed=False), scale=MinMax())
    activation = QuantSpec(
        Int(bits, signed=False), scale=MinMax(batch_mean=True), clip_gradient=False
    )
    grad_input, grad_weight = (
        QuantSpec(
            Int(b, signed=False), scale=MinMax(), rounding=grad_rounding,
            nonfinite=nonfinite_gradients,
        )
        for b in (grad_bits, grad_weight_bits if bifurcation else grad_bits)
    )  # fmt: skip
    save_levels = quantize_saved_activations and bits <= 8
    return QuantizedTrainingConfig(
        GemmConfig(activation, weight, grad_input, grad_weight, save_levels),
        range_batchnorm=range_batchnorm,
        batchnorm_input_spec=activation if quantize_batchnorm else None,
        batchnorm_grad_spec=grad_input if quantize_batchnorm else None,
        batchnorm_momentum=1.0 - range_momentum,
        range_momentum=range_momentum,
        range_bn_chunks=range_bn_chunks,
        range_bn_spread=range_bn_spread,
        range_bn_constant_scale=range_bn_constant_scale,
        # Saved activations compact all the way: int8 GEMM inputs, ReLU masks, pool indices.
        compact_activations=save_levels,
    )


def precision_schedule_quantization(bits: int = 8, grad_bits: int = 8) -> QuantizedTrainingConfig:
    """The quantizer CPT and FracTrain run (their shared code base, METHODS.md §2–3): SBM's
    affine unsigned quantizer with weights per output channel (min/max, nearest), activations
    per tensor (batch mean of per-sample min/max), layer gradients per tensor with stochastic
    rounding and no bifurcation (one copy of g_l for both backward products); BatchNorm stays
    float32. Built at ``bits``/``grad_bits``; a schedule sets the bits each step."""
    unsigned = Int(bits, signed=False)
    weight = QuantSpec(unsigned, granularity=PerChannel(0), scale=MinMax())
    activation = QuantSpec(unsigned, scale=MinMax(batch_mean=True), clip_gradient=False)
    gradient = QuantSpec(Int(grad_bits, signed=False), scale=MinMax(), rounding=Rounding.STOCHASTIC)
    save_levels = bits <= 8  # the input's int levels are kept for backward while they fit a byte
    gemm = GemmConfig(activation, weight, gradient, gradient, save_levels)
    return QuantizedTrainingConfig(gemm, compact_activations=save_levels)


def symmetric_quantization(
    bits: int = 8,
    grad_rounding: Rounding = Rounding.STOCHASTIC,
    grad_weight_granularity: Granularity | None = None,
    observers: dict[str, Callable[[], Observer]] | None = None,
) -> QuantizedTrainingConfig:
    """The symmetric quantizer of Unified INT8 and Distribution-adaptive INT8 (METHODS.md
    §4–5) on every conv/linear: q = round(qmax·clamp(x, −c, c)/c). Weights and activations per
    tensor at c = max|x|, nearest; the layer gradient g_l with ``grad_rounding``, its
    grad-weight copy at ``grad_weight_granularity`` (None: per tensor; ``PerChannel(1)``: per
    output channel of g_l, (N, C_out, ...)). ``observers`` choose the gradients' clip values (e.g.
    ``{"grad_input": CosineClip}``: one clipped copy for both products); without them c =
    max|g|. BatchNorm stays float32."""
    signed = Int(bits)
    forward = QuantSpec(signed)
    grad_input = QuantSpec(signed, rounding=grad_rounding)
    granularity = grad_weight_granularity or PerTensor()
    grad_weight = QuantSpec(signed, granularity=granularity, rounding=grad_rounding)
    save_levels = bits <= 8  # the input's int levels are kept for backward while they fit a byte
    gemm = GemmConfig(forward, forward, grad_input, grad_weight, save_levels)
    return QuantizedTrainingConfig(gemm, compact_activations=save_levels, observers=observers)


def qat_quantization(
    weight_bits: int = 4,
    input_bits: int = 8,
    weight_granularity: Granularity | None = None,
    learned_step: bool = True,
    first_last_bits: int | None = 8,
) -> FakeQuantConfig:
    """Quantization-aware training (METHODS.md §7): fake-quantized weights (signed, at
    ``weight_granularity``: default per output channel) and inputs of every conv/linear,
    full-precision gradients. ``learned_step``: LSQ's learned steps (Esser et al. 2020) for
    both; else weights at max|w| per scale and inputs at their running min/max (unsigned,
    affine), straight-through with zero gradient outside the range. ``first_last_bits``: the
    first and last layer's weight and input bits (LSQ's 8), None: as the rest."""
    granularity = weight_granularity or PerChannel(0)

    def gemm(w_bits: int, a_bits: int) -> GemmConfig:
        if learned_step:
            weight = QuantSpec(Int(w_bits), granularity=granularity, scale=LearnedStep())
            activation = QuantSpec(Int(a_bits), scale=LearnedStep())
        else:
            weight = QuantSpec(Int(w_bits), granularity=granularity, scale=AbsMax())
            activation = QuantSpec(Int(a_bits, signed=False), scale=MinMax())
        return GemmConfig(input_spec=activation, weight_spec=weight)

    edges = None if first_last_bits is None else gemm(first_last_bits, first_last_bits)
    return FakeQuantConfig(gemm(weight_bits, input_bits), first_last=edges)


def bitnet_quantization(input_bits: int = 8, input_norm: bool = True) -> FakeQuantConfig:
    """BitNet b1.58 (Ma et al. 2024, METHODS.md §7): ternary weights W̃ = clamp(round(W/γ), −1,
    1)·γ, γ = mean|W| (``AbsMean`` on ``Int(2)``), inputs at ``input_bits`` absmax per token
    (per sample for a conv), the straight-through estimator everywhere (no clip mask: absmean
    weights beyond ±1.5γ pass their gradient, as BitNet's ``w + (q(w) − w).detach()``), and
    with ``input_norm`` linears as ``BitLinear`` (an RMSNorm before the activation quantizer).
    Gradients full precision."""
    weight = QuantSpec(Int(2), scale=AbsMean(), clip_gradient=False)
    per_token = QuantSpec(Int(input_bits), granularity=PerToken(), scale=AbsMax())
    per_sample = QuantSpec(Int(input_bits), granularity=PerChannel(0), scale=AbsMax())
    return FakeQuantConfig(
        GemmConfig(input_spec=per_token, weight_spec=weight),
        conv=GemmConfig(input_spec=per_sample, weight_spec=weight),
        input_norm=input_norm,
    )


register_config_name("sbm8", sbm_quantization)
