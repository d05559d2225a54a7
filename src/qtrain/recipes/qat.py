"""QAT with learned step sizes — Esser et al., "Learned Step Size Quantization", ICLR 2020
(METHODS.md §7).

Quantization-aware training for a model that will be *deployed* at low bits: the forward pass
of every conv and linear runs on fake-quantized weights (fp32 shadow weights underneath) and
inputs; backward is autograd's through the straight-through estimator, at full precision
(zero gradient outside the clip range, as ``torch.fake_quantize_*``). With LSQ (``lsq``, the
default) the step sizes are learned (``qtrain.observers.LSQStep``):

    x̂ = round(clip(x/s, −Q_N, Q_P))·s,   ∂x̂/∂s = round(x/s) − x/s inside, −Q_N or Q_P outside,

the step gradient scaled by 1/sqrt(N·Q_P), s initialised to 2·mean|x|/sqrt(Q_P) from the first
batch. Weights are signed, one step per output channel (``w_granularity``); inputs one step per
layer, unsigned after a ReLU. The first and last layers run at ``first_last_bits`` (LSQ's 8).
Steps take no weight decay. ``lsq=false``: max|w| weight scales and running min/max inputs.

The usual workflow fine-tunes a trained float model: ``qtrain train --recipe qat --init RUN``.

Example:
    >>> from torch import nn
    >>> model = QAT().prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8),
    ...                                     nn.ReLU(), nn.Linear(8, 2)))
    >>> [type(m).__name__ for m in model if not isinstance(m, nn.ReLU)]
    ['FakeQuantLinear', 'FakeQuantLinear', 'FakeQuantLinear']
    >>> model[2].role_bits()["forward"]     # 8-bit inputs × 4-bit weights
    (8.0, 4.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from qtrain.api import quantize_
from qtrain.observers import LSQStep
from qtrain.presets import qat_quantization
from qtrain.quantizer import PerChannel, PerTensor
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int

GRANULARITIES = {"per_channel": PerChannel(0), "per_tensor": PerTensor()}


@dataclasses.dataclass(frozen=True)
class QATConfig(RecipeConfig):
    """QAT's parameters: W4A8 per output channel with LSQ, first and last layer at 8 bits."""

    w_bits: int = 4
    a_bits: int = 8
    w_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    lsq: bool = True  # learned steps; False: max|w| weights, running min/max inputs
    first_last_bits: int | None = 8  # None: the first and last layer as the rest

    def validate(self) -> None:
        for name in ("w_bits", "a_bits", "first_last_bits"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"QATConfig.{name}", value, RecipeConfigError, low=2, high=16)


@register_recipe
class QAT(Recipe):
    name = "qat"
    paper = "Esser et al., Learned Step Size Quantization (ICLR 2020)"
    description = "fake-quantized weights/inputs (W4A8 per channel), LSQ learned steps, fp32 grads"
    config_class = QATConfig

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        quantization = qat_quantization(
            config.w_bits,
            config.a_bits,
            GRANULARITIES[config.w_granularity],
            config.lsq,
            config.first_last_bits,
        )
        return quantize_(model, quantization)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """The learned steps without weight decay (it would shrink them toward zero); the
        rest as the run sets it."""
        steps = [m.step for m in model.modules() if isinstance(m, LSQStep)]
        if not steps:
            return None
        ids = {id(p) for p in steps}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": steps, "weight_decay": 0.0}]

    def metrics(self) -> dict[str, float]:
        config = self.config
        return {"w_bits": config.w_bits, "a_bits": config.a_bits}
