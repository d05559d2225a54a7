"""FracTrain — PFQ's stages × DFQ (Fu et al., NeurIPS 2020, §3.3; METHODS.md §3).

DFQ (``qtrain.recipes.dfq``: gates, options, cost regulariser) whose target cp rises by
stages: stage s aims at ``target_cp + s·target_step``, for ``turning_points + 1`` stages. The
next stage starts when PFQ's loss-plateau indicator (``qtrain.recipes.pfq.PlateauIndicator``,
the same ``interval``, ε and decay) says the training loss has flattened, as the authors'
``train_frac.py`` (ε = 0.15, decay = 0.4). The options stay the same in every stage: the
indicator schedules the target cost, not the bits. After the last turning point the indicator
is no longer read.

Targets: the authors' CIFAR defaults are 1.5, 2.0, 2.5, 3.0 (target 1.5, step 0.5, 3 turning
points), but their options include skipping a block, which we do not offer: with ours no cost
below 1.76 is reachable (every sample at 3/6 bits). A first target below it kept the
regulariser's sign fixed until the gates saturated on the cheapest options, and they then did
not follow the later, higher targets (docs/RESULTS.md, issue 21). So a first or last target
outside ``cp_range()`` is warned of (a run event too), and the defaults are 2.0, 2.5, 3.0
(step 0.5, 2 turning points): the authors' last target, reached from a first one the options
can meet.

The indicator reads the task loss (the authors' reads the loss with the cost term added).
Each switch is a recipe event with the indicator's values; stage and indicator survive resume.

Example:
    >>> recipe = FracTrain()
    >>> [recipe.config.stage_target(s) for s in range(3)]
    [2.0, 2.5, 3.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from qtrain.ops import Precision
from qtrain.recipes.base import RecipeConfigError, StepResult, register_recipe
from qtrain.recipes.dfq import DFQ, DFQConfig
from qtrain.recipes.pfq import IntervalPlateau, PFQConfig, PlateauIndicator
from qtrain.validation import check_int, check_number


@dataclasses.dataclass(frozen=True)
class FracTrainConfig(DFQConfig):
    """DFQ's parameters (``target_cp``: the first stage's target) and the stages'."""

    target_cp: float = 2.0
    target_step: float = 0.5  # the target's rise per stage (cp percentage points)
    turning_points: int = 2  # stage switches at most
    interval: int = PFQConfig.interval
    epsilon: float = PFQConfig.epsilon
    decay: float = PFQConfig.decay

    def stage_target(self, stage: int) -> float:
        """The target cp of stage ``stage`` (0: the first)."""
        return self.target_cp + stage * self.target_step

    def targets(self) -> dict[str, float]:
        last = self.stage_target(self.turning_points)
        return {"target_cp (the first stage's)": self.target_cp, "the last stage's target": last}

    def validate(self) -> None:
        super().validate()
        error = RecipeConfigError
        check_number("FracTrainConfig.target_step", self.target_step, error, low=0, high=100)
        check_int("FracTrainConfig.turning_points", self.turning_points, error, low=0)
        last = self.stage_target(self.turning_points)
        if last > 100:
            raise error(f"FracTrainConfig: the last stage's target cp {last:g} is above 100")
        check_int("FracTrainConfig.interval", self.interval, error, low=1)
        check_number("FracTrainConfig.epsilon", self.epsilon, error, low=0, high=1e9)
        check_number("FracTrainConfig.decay", self.decay, error, low=0, high=1)


@register_recipe
class FracTrain(DFQ):
    name = "fractrain"
    paper = "Fu et al., FracTrain (NeurIPS 2020): PFQ's stages with DFQ's rising target cost"
    description = "dfq whose target cp rises by target_step at each loss plateau (pfq's indicator)"
    config_class = FracTrainConfig

    def __init__(self, config: FracTrainConfig | None = None) -> None:
        super().__init__(config)
        self.stage = 0
        config = self.config
        self.plateau = IntervalPlateau(
            config.interval, PlateauIndicator(config.epsilon, config.decay)
        )

    @property
    def target_cp(self) -> float:
        return self.config.stage_target(self.stage)

    def schedule(self, step: int, total_steps: int) -> Precision:
        why = self.plateau.too_short(step, total_steps)
        if why is not None:
            self.emit("too_short", why=why)
        return super().schedule(step, total_steps)

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        if self.stage >= self.config.turning_points:
            return False
        values = self.plateau.add(result.loss)
        if values is not None:
            self.stage += 1
            self.emit("stage", stage=self.stage, target_cp=self.target_cp, **values)
        return False

    def metrics(self) -> dict[str, float | dict[str, float]]:
        return {**super().metrics(), "stage": self.stage}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage, **self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self.stage = int(state["stage"])
        self.plateau.load_state_dict(state)
