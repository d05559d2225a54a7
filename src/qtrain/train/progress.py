"""What a step and a checkpoint carry besides model, optimizer and recipe.

``_Progress`` is the trainer's own state that ``checkpoint.pt`` holds (step, meters, cost,
accuracies, timings); ``_StepSnapshot`` is what a step changes before its optimizer update,
restored when the step is abandoned at a NaN/inf; ``_StepFault`` is how a step says it met one.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from qtrain.cost import StepCost
from qtrain.guard import Fault
from qtrain.recipes.base import Recipe
from qtrain.train.checkpoint import _rng_state, _set_rng_state
from qtrain.train.run import _Meter


@dataclasses.dataclass
class _Progress:
    """Trainer state beyond model/optimizer/recipe that a checkpoint must carry."""

    step: int = 0
    window: _Meter = dataclasses.field(default_factory=_Meter)
    epoch_meter: _Meter = dataclasses.field(default_factory=_Meter)
    cost: StepCost = dataclasses.field(default_factory=StepCost)
    test_acc: float | None = None
    best_test_acc: float | None = None
    final_train_loss: float | None = None
    params_initial: int = 0
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)
    epoch_elapsed: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Progress:
        parts = {key: _Meter(**data[key]) for key in ("window", "epoch_meter")}
        return cls(**{**data, **parts, "cost": StepCost(**data["cost"])})


@dataclasses.dataclass
class _StepSnapshot:
    """What a step changes before its optimizer update: buffers (running statistics, running
    ranges), the recipe's state and the RNG streams. Restored when a step is abandoned at a
    fault, so a skipped step leaves no trace and a retried one draws the same random numbers
    as the first try."""

    buffers: list[tuple[nn.Module, str, torch.Tensor]]
    rng: dict[str, Any]
    recipe: Recipe
    recipe_state: dict[str, Any]
    model: nn.Module

    @classmethod
    def take(cls, model: nn.Module, recipe: Recipe) -> _StepSnapshot:
        buffers = [
            (module, name, buffer.clone())
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        state = copy.deepcopy(recipe.state_dict())
        return cls(buffers, _rng_state(), recipe, state, model)

    def restore(self) -> None:
        self.recipe.load_state_dict(copy.deepcopy(self.recipe_state), self.model)
        for module, name, saved in self.buffers:
            current = module._buffers[name]
            if current is not None and current.shape == saved.shape:
                current.copy_(saved)
            else:  # the step (re)allocated it, e.g. the first running range
                module._buffers[name] = saved
        _set_rng_state(self.rng)


class _StepFault(Exception):
    """A step met a NaN/inf before its optimizer update (internal to the trainer)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(str(fault))
        self.fault = fault
