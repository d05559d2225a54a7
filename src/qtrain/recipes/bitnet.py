"""BitNet b1.58 — Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58
Bits", 2024 (METHODS.md §7).

Every conv and linear but the first and the last (the input layer and the classifier or
language-model head stay float32, as BitNet keeps its embeddings and head) computes with
ternary weights and 8-bit activations:

    W̃ = clamp(round(W/γ), −1, 1)·γ,  γ = mean|W|      (absmean, per layer)
    x̃ = round(127·x/max|x|)·max|x|/127                 (absmax, per token; per sample for a conv)

with the straight-through estimator for both and fp32 shadow weights and gradients. A linear
layer normalises its input first (``qtrain.nn.BitLinear``: an RMSNorm before the activation
quantizer, the paper's placement), so in the GPT the attention and MLP output projections see
normalised inputs too; the blocks keep their own pre-norms. ``input_norm=false`` drops it.

Example:
    >>> from torch import nn
    >>> model = BitNet().prepare(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)))
    >>> [type(m).__name__ for m in model]
    ['Linear', 'BitLinear', 'Linear']
    >>> sorted(set(model[1].quantized_weight().levels.unique().tolist())) <= [-1, 0, 1]
    True
"""

from __future__ import annotations

import dataclasses

from torch import nn

from qtrain.api import except_first_last, quantize_
from qtrain.presets import bitnet_quantization
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int


@dataclasses.dataclass(frozen=True)
class BitNetConfig(RecipeConfig):
    """BitNet b1.58's parameters: 8-bit activations, the RMSNorm inside each BitLinear."""

    a_bits: int = 8
    input_norm: bool = True

    def validate(self) -> None:
        check_int("BitNetConfig.a_bits", self.a_bits, RecipeConfigError, low=2, high=16)


@register_recipe
class BitNet(Recipe):
    name = "bitnet"
    paper = "Ma et al., The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits (2024)"
    description = "ternary absmean weights, 8-bit per-token absmax activations, STE, fp32 grads"
    config_class = BitNetConfig

    def prepare(self, model: nn.Module) -> nn.Module:
        quantization = bitnet_quantization(self.config.a_bits, self.config.input_norm)
        return quantize_(model, quantization, filter_fn=except_first_last(model))

    def metrics(self) -> dict[str, float]:
        return {"a_bits": self.config.a_bits}
