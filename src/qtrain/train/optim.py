"""A run's optimizer: SGD or AdamW over the recipe's parameter groups; rebuilt, keeping the
state that still fits, when a recipe changes the model's shape.

Example:
    >>> from qtrain.recipes import build_recipe
    >>> config = TrainConfig(model="mlp", data="synthetic", epochs=1, optimizer="adamw")
    >>> type(build_optimizer(config, build_recipe("fp32"), nn.Linear(2, 2))).__name__
    'AdamW'
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.recipes.base import Recipe
from qtrain.train.config import TrainConfig


def build_optimizer(config: TrainConfig, recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the recipe's parameter groups (or all parameters in one group).

    Each group keeps its peak learning rate in ``base_lr``; the trainer sets ``lr`` from it and
    the schedule every step, after which ``recipe.before_optimizer_step`` may rescale it.
    """
    groups = recipe.param_groups(model) or [{"params": list(model.parameters())}]
    groups = [{**g, "base_lr": g.get("lr", config.lr)} for g in groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _rebuild_optimizer(
    config: TrainConfig, recipe: Recipe, model: nn.Module, old: torch.optim.Optimizer
) -> torch.optim.Optimizer:
    """A new optimizer after the model changed shape, keeping the state that still fits.

    ``recipe.remap_optimizer_state()`` maps a new parameter to the old one whose state it keeps
    (identity when the recipe gives none); state tensors whose shape no longer matches the
    parameter are dropped rather than mis-applied.
    """
    new = build_optimizer(config, recipe, model)
    remap = recipe.remap_optimizer_state() or (lambda p: p)
    for group in new.param_groups:
        for param in group["params"]:
            source = remap(param)
            state = old.state.get(source) if source is not None else None
            if state and all(
                not torch.is_tensor(v) or v.dim() == 0 or v.shape == param.shape
                for v in state.values()
            ):
                new.state[param] = state
    return new
