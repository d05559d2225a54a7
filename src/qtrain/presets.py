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

from qtrain.api import QuantizedTrainingConfig, register_config_name
from qtrain.formats import Int
from qtrain.observers import Observer
from qtrain.ops import GemmConfig
from qtrain.quantizer import Granularity, MinMax, PerChannel, PerTensor, QuantSpec, Rounding


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


register_config_name("sbm8", sbm_quantization)
