"""A recipe that plants NaN/inf faults and crashes on purpose, for the reliability tests."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtrain.recipes import build_recipe
from qtrain.recipes.base import Recipe

LAYER = "2.0"  # the cnn's second conv: a QConv2d under sbm8, an nn.Conv2d under fp32


class Inject:
    """Recipe mixin: plants ``value`` in tensor ``role`` of ``layer`` at step ``at_step``
    (0-based, as recipe hooks count) on the first ``times`` attempts of that step (None: all).

    Optionally raises KeyboardInterrupt at step ``crash_at`` (a crash), or writes ``value``
    into a BatchNorm running variance after step ``corrupt_buffer_at`` (a fault no loss sees).
    """

    def setup(
        self,
        layer: str = LAYER,
        role: str = "output",
        at_step: int = 5,
        value: float = math.nan,
        times: int | None = None,
        crash_at: int | None = None,
        corrupt_buffer_at: int | None = None,
    ) -> None:
        self.layer, self.role, self.at_step = layer, role, at_step
        self.value, self.times = value, times
        self.crash_at, self.corrupt_buffer_at = crash_at, corrupt_buffer_at
        self.step = -1
        self.fired = 0
        self.attempts = 0  # forward passes of step ``at_step``

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)  # type: ignore[misc]
        self.model = model
        module = model.get_submodule(self.layer)
        # Registered before the trainer's guard, so the guard sees what these hooks plant.
        module.register_forward_pre_hook(self._before_forward)
        module.register_forward_hook(self._after_forward)
        module.weight.register_hook(self._weight_gradient)
        return model

    def schedule(self, step: int, total_steps: int) -> Any:
        # Not pure, as a schedule should be: the injector only notes which step runs.
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        self.step = step
        return super().schedule(step, total_steps)  # type: ignore[misc]

    def on_step_end(self, step: int, result: Any, model: nn.Module, optimizer: Any) -> bool:
        if step == self.corrupt_buffer_at:
            model.get_submodule("2.1").running_var[0] = self.value
        return super().on_step_end(step, result, model, optimizer)  # type: ignore[misc]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self._fire("loss"):
            return torch.tensor(self.value)
        return super().extra_loss(model)  # type: ignore[misc]

    def _fire(self, role: str) -> bool:
        hit = (
            role == self.role
            and self.step == self.at_step
            and self.model.training
            and (self.times is None or self.fired < self.times)
        )
        self.fired += hit
        return hit

    def _plant(self, tensor: torch.Tensor) -> torch.Tensor:
        planted = tensor.detach().clone()
        planted.view(-1)[0] = self.value
        return planted

    def _weight_gradient(self, grad: torch.Tensor) -> torch.Tensor | None:
        return self._plant(grad) if self._fire("grad_weight") else None

    def _before_forward(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
        self.attempts += self.step == self.at_step and module.training
        if self._fire("weight"):
            with torch.no_grad():
                module.weight.view(-1)[0] = self.value
        if self._fire("input"):
            return (self._plant(args[0]),)
        return None

    def _after_forward(self, module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        if self._fire("grad_output"):
            output.register_hook(self._plant)
        if self._fire("output"):
            return self._plant(output)
        return None


def faulty(recipe_name: str = "sbm8", **fault: Any) -> Recipe:
    """The named recipe with a fault planted (under the recipe's own name)."""
    base = type(build_recipe(recipe_name))
    recipe = type("Faulty", (Inject, base), {"name": recipe_name})()
    recipe.setup(**fault)
    return recipe
