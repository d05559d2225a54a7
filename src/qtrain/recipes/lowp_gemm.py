"""``int8-gemm`` and ``fp8-gemm``: training on real low-precision GEMMs (``qtrain.lowp``).

Every ``nn.Linear`` becomes a ``LowPrecisionLinear`` and every ``nn.Conv2d`` a
``LowPrecisionConv2d`` (its products on the im2col matrix), whose three products — forward
x·Wᵀ, grad-input g·W and grad-weight gᵀ·x — each quantize their two operands afresh with dynamic
absmax scales (per row of each operand, ``per_token``, or one per tensor, ``per_tensor``) and
multiply them in low precision, the scales applied to the int32/float32 result:

- ``int8-gemm``: x and W at ``bits``, the layer gradient g at ``grad_bits`` (levels within
  ±(2^(bits−1) − 1) in int8 storage; optionally stochastic rounding of g), products on
  ``torch._int_mm`` — the row-wise int8 training of torchao's prototype
  (``Int8MixedPrecisionTrainingConfig``) and of SwitchBack (Wortsman et al. 2023), here with
  the grad-weight product in int8 too;
- ``fp8-gemm``: e4m3 x and W, e5m2 gradients (Micikevicius et al. 2022), products on
  ``torch._scaled_mm``.

The optimizer's master weights, biases and every other op (BatchNorm, pooling, the im2col
unfold and the fold of the grad-input product onto x's pixels) stay in float32 — unless
``int8-gemm``'s ``amp`` is ``"bf16"``: then autocast runs those ops in bfloat16 (as
``amp-bf16`` does) around the int8 products, whose operands are quantized from the bfloat16
activations and whose float32 results are rounded to bfloat16 (torchao's int8 mixed-precision
training is used this way); the products themselves are the same int8 products.
``convolutions=false`` swaps only the linears (the convolutions then stay float32
``nn.Conv2d``, counted at 32×32 bits).

``emulate``: ``"auto"`` runs the real GEMMs where they are expected to be faster than the
twin — on CUDA where this torch build runs them (``qtrain.lowp.real_gemm_runs``; fp8 needs
compute capability 8.9+, row-wise scales 9.0+), and for int8 on a CPU with int8 dot-product
instructions (AMX-INT8, AVX512-VNNI or AVX-VNNI, ``qtrain.lowp_products.cpu_has_int8_dot``) —
and the emulated twin elsewhere: the same quantization with float matmuls, equal to the int8
path bit for bit and to the fp8 path up to the order of float32 sums. ``true`` forces the twin,
``false`` the real GEMMs. Why not "wherever it runs": torch 2.13 runs ``torch._int_mm`` and
fp8 ``torch._scaled_mm`` on any x86 CPU, but without those instructions (and no CPU has fp8
units) they are emulated inside oneDNN, far slower than the twin — measured on an AMD EPYC
without VNNI, an mlp step took 27.9× fp32 on the real int8 path and 2.4× on the twin
(docs/BENCHMARKS.md, "Low-precision GEMMs").

Example:
    >>> import torch
    >>> from qtrain.recipes import build_recipe
    >>> recipe = build_recipe("int8-gemm", {"bits": "6"})
    >>> model = recipe.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    >>> type(model[0]).__name__, recipe.metrics()
    ('LowPrecisionLinear', {'fw_bits': 6, 'grad_bits': 8, 'grad_weight_bits': 8})
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from qtrain.api import quantize_
from qtrain.quantizer import PerTensor, PerToken
from qtrain.recipes.base import Amp, Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int

if TYPE_CHECKING:
    from qtrain.lowp import (
        Float8TrainingConfig,
        Int8TrainingConfig,
        LowPrecisionConv2d,
        LowPrecisionLinear,
    )


def _lowp(module: str = "lowp") -> types.ModuleType:
    # qtrain.lowp and qtrain.lowp_products are imported when a recipe is used, not when recipes
    # are listed: they load torch._dynamo (for torch.compile), about 1.5 s that `import qtrain`
    # should not pay.
    return importlib.import_module(f"qtrain.{module}")


Granularity = Literal["per_token", "per_tensor"]
Emulate = Literal["auto"] | bool
_GRANULARITY = {"per_token": PerToken(), "per_tensor": PerTensor()}


@dataclasses.dataclass(frozen=True)
class Int8GemmConfig(RecipeConfig):
    """int8 GEMM training parameters (``qtrain.lowp.Int8TrainingConfig``'s)."""

    bits: int = 8  # x and W: levels within ±(2^(bits−1) − 1)
    grad_bits: int = 8  # the layer gradient, in both backward products
    stochastic_grad: bool = False  # unbiased stochastic rounding of the gradient operands
    granularity: Granularity = "per_token"  # absmax scale per operand row, or per tensor
    emulate: Emulate = "auto"  # "auto": the real GEMM where it is fast, else the exact twin
    convolutions: bool = True  # False: only the linear layers
    # "bf16": autocast around the int8 products — BatchNorm, activations and the unswapped ops
    # in bfloat16, the layers' outputs and x's gradients too (torchao's int8 training runs so)
    amp: Amp = "none"

    def validate(self) -> None:
        for name in ("bits", "grad_bits"):
            value = getattr(self, name)
            check_int(f"Int8GemmConfig.{name}", value, RecipeConfigError, low=2, high=8)

    def lowp_config(self, emulate: bool) -> Int8TrainingConfig:
        return _lowp().Int8TrainingConfig(
            bits=self.bits,
            grad_bits=self.grad_bits,
            stochastic_grad=self.stochastic_grad,
            granularity=_GRANULARITY[self.granularity],
            emulate=emulate,
            convolutions=self.convolutions,
        )


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig(RecipeConfig):
    """fp8 GEMM training parameters (``qtrain.lowp.Float8TrainingConfig``'s); the formats are
    fixed: e4m3 for x and W, e5m2 for gradients."""

    granularity: Granularity = "per_tensor"
    emulate: Emulate = "auto"
    convolutions: bool = True  # False: only the linear layers

    def lowp_config(self, emulate: bool) -> Float8TrainingConfig:
        return _lowp().Float8TrainingConfig(
            granularity=_GRANULARITY[self.granularity],
            emulate=emulate,
            convolutions=self.convolutions,
        )


class _LowPrecisionGemmRecipe(Recipe):
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` for its low-precision twin; no schedule,
    no hooks."""

    def __init__(self, config: RecipeConfig | None = None) -> None:
        super().__init__(config)
        self.emulated: bool | None = None  # which path ``prepare`` chose (None: not yet)
        self._layers: list[LowPrecisionLinear | LowPrecisionConv2d] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        device = next(model.parameters(), torch.empty(0)).device
        emulate = config.emulate
        if emulate == "auto":
            real = _lowp().real_gemm_runs(config.lowp_config(False), device)
            if device.type == "cpu":  # real only where the CPU has the instructions for it
                real = (
                    real
                    and isinstance(config, Int8GemmConfig)
                    and _lowp("lowp_products").cpu_has_int8_dot()
                )
            emulate = not real
        quantize_(model, config.lowp_config(emulate))
        self.emulated = emulate
        layer_types = _lowp().LOW_PRECISION_LAYERS
        self._layers = [m for m in model.modules() if isinstance(m, layer_types)]
        return model

    def metrics(self) -> dict[str, float]:
        """The narrowest bits in use over the layers: x and W, and the gradient operand of
        the grad-input and grad-weight products (empty when no layer was swapped)."""
        if not self._layers:
            return {}
        bits = [layer.role_bits() for layer in self._layers]
        return {
            "fw_bits": min(min(b["forward"]) for b in bits),
            "grad_bits": min(b["grad_input"][0] for b in bits),
            "grad_weight_bits": min(b["grad_weight"][0] for b in bits),
        }


@register_recipe
class Int8GemmRecipe(_LowPrecisionGemmRecipe):
    name = "int8-gemm"
    paper = "torchao int8 mixed-precision training; Wortsman et al., SwitchBack (NeurIPS 2023)"
    description = "real int8 GEMMs (torch._int_mm) for every linear and conv layer's products"
    config_class = Int8GemmConfig


@register_recipe
class Fp8GemmRecipe(_LowPrecisionGemmRecipe):
    name = "fp8-gemm"
    paper = "Micikevicius et al., FP8 Formats for Deep Learning (2022)"
    description = "real fp8 GEMMs (torch._scaled_mm; e4m3 x/W, e5m2 grads), linears and convs"
    config_class = Fp8GemmConfig
