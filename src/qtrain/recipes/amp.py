"""``amp-bf16`` and ``amp-fp16``: PyTorch automatic mixed precision (torch.autocast).

The forward pass runs eligible ops (GEMMs, convolutions) in the half-precision dtype; weights and
the optimizer stay in float32. fp16 has a narrow exponent range, so its loss is scaled by a
``torch.amp.GradScaler`` to keep small gradients from flushing to zero; bf16 has float32's range
and needs no scaler. The dtype is fixed by the recipe name, not by a parameter.

Example:
    >>> import torch
    >>> from qtrain.recipes import build_recipe
    >>> recipe = build_recipe("amp-bf16")
    >>> with recipe.autocast("cpu"):
    ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int, refuse

_PAPER = "Micikevicius et al., Mixed Precision Training, ICLR 2018"


class _AutocastRecipe(Recipe):
    """Forward under ``torch.autocast`` with the subclass's ``dtype``."""

    dtype: ClassVar[torch.dtype]
    _bits: ClassVar[int] = 16

    def autocast(self, device_type: str) -> torch.autocast:
        return torch.autocast(device_type, dtype=self.dtype)

    def metrics(self) -> dict[str, float]:
        # Autocast GEMMs take 16-bit operands; gradients flow back through them in 16 bits too.
        return {"fw_bits": self._bits, "bw_bits": self._bits}


@register_recipe
class AmpBF16Recipe(_AutocastRecipe):
    """bfloat16 autocast; no loss scaling (bf16 shares float32's exponent range)."""

    name = "amp-bf16"
    paper = _PAPER
    description = "autocast mixed precision in bfloat16"
    dtype = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class AmpFP16Config(RecipeConfig):
    """Loss-scaler settings (``torch.amp.GradScaler``'s own defaults).

    init_scale: the first loss scale; growth_interval: steps without overflow before it doubles.
    """

    init_scale: float = 65536.0
    growth_interval: int = 2000

    def validate(self) -> None:
        if not 0 < self.init_scale < math.inf:
            allowed = "a finite number > 0"
            refuse("AmpFP16Config.init_scale", self.init_scale, allowed, RecipeConfigError)
        check_int("AmpFP16Config.growth_interval", self.growth_interval, RecipeConfigError, low=1)


@register_recipe
class AmpFP16Recipe(_AutocastRecipe):
    """float16 autocast with dynamic loss scaling."""

    name = "amp-fp16"
    paper = _PAPER
    description = "autocast mixed precision in float16 with a dynamic loss scaler"
    config_class = AmpFP16Config
    dtype = torch.float16

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler:
        config: AmpFP16Config = self.config  # type: ignore[assignment]
        return torch.amp.GradScaler(
            device_type, init_scale=config.init_scale, growth_interval=config.growth_interval
        )
