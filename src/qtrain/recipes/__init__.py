"""Recipes: one file per method, registered by name in ``RECIPES``.

Example:
    >>> from qtrain.recipes import RECIPES, build_recipe
    >>> "fp32" in RECIPES
    True
    >>> build_recipe("amp-fp16", {"init_scale": "1024"}).config.init_scale
    1024.0
"""

from qtrain.recipes import (  # noqa: F401  (importing a recipe module registers it)
    amp,
    bitnet,
    cpt,
    daint8,
    dfq,
    fp32,
    fractrain,
    lowp_gemm,
    pfq,
    qat,
    sbm,
    selfcompress,
    ui8,
)
from qtrain.recipes.base import (
    RECIPES,
    Recipe,
    RecipeConfig,
    RecipeConfigError,
    StepResult,
    build_recipe,
    iter_recipes,
    register_recipe,
)

__all__ = [
    "RECIPES",
    "Recipe",
    "RecipeConfig",
    "RecipeConfigError",
    "StepResult",
    "build_recipe",
    "iter_recipes",
    "register_recipe",
]
