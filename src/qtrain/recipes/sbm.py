"""SBM: Banner, Hubara, Hoffer, Soudry, "Scalable Methods for 8-bit Training of Neural
Networks", NeurIPS 2018 (METHODS.md §1).

Every conv and linear layer — first and last included — computes its three products on
quantized operands: weights (per-tensor min/max, nearest) and activations (batch mean of
per-sample min/max, running ranges in eval) at ``bits``; the layer gradient g_l at
``grad_bits`` with stochastic rounding for the grad-input product g_l·W; and, with
``bifurcation``, a separate ``grad_weight_bits`` copy of g_l for the grad-weight product g_lᵀ·x.
Range BatchNorm replaces BatchNorm; its input is quantized at ``bits`` and the gradient reaching
it at ``grad_bits`` (``quantize_batchnorm``), as in the authors' code. The update stays in fp32
(the optimizer's master weights).

All quantizers are GEMMLOWP-style affine unsigned (zero point nudged to an integer, range
widened to include 0 so zero is exact) with the straight-through estimator; the activation
quantizer passes the gradient everywhere as the authors' code does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from qtrain.api import QuantizedTrainingConfig, quantize_
from qtrain.presets import sbm_quantization
from qtrain.quantizer import Rounding
from qtrain.recipes.base import Amp, Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int, check_number


@dataclasses.dataclass(frozen=True)
class SBMConfig(RecipeConfig):
    """SBM parameters; the ablation switches of the paper are the four booleans/roundings."""

    bits: int | None = None  # weights and activations: recipe "sbm" needs it, "sbm8" is 8
    grad_bits: int = 8  # g_l for the grad-input product
    grad_weight_bits: int = 16  # the bifurcated copy of g_l for the grad-weight product
    grad_rounding: Literal["stochastic", "nearest"] = "stochastic"  # the paper: SR is essential
    bifurcation: bool = True  # False: the grad-weight product uses the grad_bits copy too
    range_batchnorm: bool = True  # False: plain BatchNorm (the paper: Range BN ≈ BN)
    quantize_batchnorm: bool = True  # Range BN's input at bits, its gradient at grad_bits
    # Keep the GEMMs' quantized inputs as int levels for backward, ReLU outputs as 1-byte masks and
    # max-pool inputs as their indices only (the same maths, less memory).
    quantize_saved_activations: bool = True
    # Running input ranges and Range BN statistics: run <- m·run + (1 - m)·batch. 0.9 is
    # torch's BatchNorm rule (0.1 on the new batch); the authors' code has 0.1 (docs/RESULTS.md).
    range_momentum: float = 0.9
    range_bn_chunks: int = 16
    # Range BN's spread: the authors' chunked range, or c·mean|x − μ| (RangeBatchNorm2d).
    range_bn_spread: Literal["range", "mean_abs"] = "range"
    range_bn_constant_scale: float = 1.0  # multiplies the spread's constant (C(n) or c)
    amp: Amp = "none"  # compose with autocast: "bf16" | "fp16" for the unquantized ops

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SBMConfig:
        # A run saved before Range BN was quantized (issue 15) has no "quantize_batchnorm":
        # it trained with Range BN in float32, and loads so.
        if isinstance(data, dict):
            data = {"quantize_batchnorm": False, **data}
        return super().from_dict(data)

    def validate(self) -> None:
        error = RecipeConfigError
        for name in ("bits", "grad_bits", "grad_weight_bits"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"{type(self).__name__}.{name}", value, error, low=2, high=16)
        check_number("SBMConfig.range_momentum", self.range_momentum, error, low=0, high=1)
        check_int("SBMConfig.range_bn_chunks", self.range_bn_chunks, error, low=1)
        check_number(
            "SBMConfig.range_bn_constant_scale", self.range_bn_constant_scale, error,
            low=1e-3, high=1e3,
        )  # fmt: skip

    def quantization_config(self) -> QuantizedTrainingConfig:
        # Under fp16 loss scaling an overflowed (inf) gradient must reach the GradScaler, which
        # skips that step; elsewhere a non-finite gradient is an error.
        return sbm_quantization(
            self.bits,
            self.grad_bits,
            self.grad_weight_bits,
            Rounding(self.grad_rounding),
            self.bifurcation,
            self.range_batchnorm,
            self.quantize_saved_activations,
            self.range_momentum,
            self.range_bn_chunks,
            nonfinite_gradients="propagate" if self.amp == "fp16" else "error",
            quantize_batchnorm=self.quantize_batchnorm,
            range_bn_spread=self.range_bn_spread,
            range_bn_constant_scale=self.range_bn_constant_scale,
        )


@register_recipe
class SBM(Recipe):
    name = "sbm"
    paper = "Banner et al., Scalable Methods for 8-bit Training of Neural Networks (NeurIPS 2018)"
    description = (
        "static low-bit training: W/A/G quantized, bifurcated 16-bit grad-weight copy, SR, Range BN"
    )
    config_class = SBMConfig

    def __init__(self, config: SBMConfig | None = None) -> None:
        super().__init__(config)
        if self.config.bits is None:
            raise RecipeConfigError(
                "recipe 'sbm' needs its bit-width: --set bits=N (an int in 2..16); "
                "'sbm8' is SBM at the paper's 8 bits"
            )

    def prepare(self, model: nn.Module) -> nn.Module:
        return quantize_(model, self.config.quantization_config())

    def metrics(self) -> dict[str, float]:
        config = self.config
        grad_weight_bits = config.grad_weight_bits if config.bifurcation else config.grad_bits
        return {
            "fw_bits": config.bits,
            "grad_bits": config.grad_bits,
            "grad_weight_bits": grad_weight_bits,
        }


@dataclasses.dataclass(frozen=True)
class SBM8Config(SBMConfig):
    """SBM's parameters with the bit-width fixed at the paper's 8 (other bits: recipe "sbm")."""

    bits: int | None = 8

    def validate(self) -> None:
        super().validate()
        if self.bits != 8:
            raise RecipeConfigError(
                f"SBM8Config.bits must be 8, got {self.bits!r}: for other bit-widths use "
                f"recipe 'sbm' --set bits={self.bits}"
            )


@register_recipe
class SBM8(SBM):
    name = "sbm8"
    description = "SBM at 8 bits (8/8/8 with a 16-bit grad-weight copy), the paper's setting"
    config_class = SBM8Config
