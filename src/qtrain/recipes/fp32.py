"""``fp32``: the full-precision baseline every other recipe is compared against.

Example:
    >>> from qtrain.recipes import build_recipe
    >>> build_recipe("fp32").metrics()
    {}
"""

from __future__ import annotations

from qtrain.recipes.base import Recipe, register_recipe


@register_recipe
class FP32Recipe(Recipe):
    """No quantization and no hooks: the base class already is the fp32 recipe."""

    name = "fp32"
    paper = "-"
    description = "full-precision (float32) baseline"
