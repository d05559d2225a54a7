"""PFQ — progressive fractional quantization, FracTrain (Fu et al., NeurIPS 2020; METHODS.md §3).

Training runs through precision stages, low to high — by default forward bits [3, 4, 6, 8]
with backward bits [6, 6, 8, 8] — and moves to the next stage when the training loss
plateaus. The indicator (the paper's): every ``interval`` iterations the interval's mean loss
L_e is recorded; scale = the mean of the first 10 L_e (of those so far while there are fewer);
over the last 5 L_e, Δ_i = |L_i − L_last| / scale for the 4 older ones; when every Δ_i ≤ ε the
next stage starts and ε ← decay·ε. After a switch the window starts afresh (5 new intervals at
the new precision before the next decision; the scale is kept). Quantizer, BatchNorm and
classifier as in CPT (``qtrain.presets.precision_schedule_quantization``). Evaluation runs at
the current stage's bits.

Each switch is a recipe event in metrics.jsonl with the Δ_i, ε and scale that caused it; the
stage and the indicator's state survive resume. With the paper's interval (400) a run needs at
least 5 intervals to switch at all: a run shorter than that says so as an event.

Example:
    >>> indicator = PlateauIndicator(epsilon=0.15, decay=0.4)
    >>> [indicator.add(loss) is not None for loss in (2.0, 1.5, 1.2, 1.19, 1.18, 1.18, 1.17)]
    [False, False, False, False, False, False, True]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from qtrain.api import except_classifier, quantize_
from qtrain.ops import Precision
from qtrain.presets import precision_schedule_quantization
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, StepResult, register_recipe
from qtrain.validation import check_int, check_number

WINDOW = 5  # the L_e the indicator compares (the last one against the 4 before it)
SCALE_INTERVALS = 10  # the L_e whose mean is the loss scale


@dataclasses.dataclass
class PlateauIndicator:
    """FracTrain's loss-plateau indicator over interval mean losses (see the module docstring).

    ``add(L_e)`` returns None, or the dict of indicator values when it says "next stage"."""

    epsilon: float
    decay: float
    first: list[float] = dataclasses.field(default_factory=list)  # up to 10 L_e: the scale
    window: list[float] = dataclasses.field(default_factory=list)  # the last L_e, up to 5

    def add(self, interval_loss: float) -> dict[str, Any] | None:
        if len(self.first) < SCALE_INTERVALS:
            self.first.append(interval_loss)
        self.window = [*self.window, interval_loss][-WINDOW:]
        if len(self.window) < WINDOW:
            return None
        scale = sum(self.first) / len(self.first)
        last = self.window[-1]
        deltas = [abs(loss - last) / scale for loss in self.window[:-1]]
        if max(deltas) > self.epsilon:
            return None
        values = {"deltas": deltas, "epsilon": self.epsilon, "scale": scale}
        self.epsilon *= self.decay
        self.window = []
        return values


@dataclasses.dataclass
class IntervalPlateau:
    """The indicator as the recipes feed it: the task loss of every step, its mean over each
    ``interval`` steps to a ``PlateauIndicator``; with its state for resume (PFQ and
    FracTrain share it)."""

    interval: int
    indicator: PlateauIndicator
    loss_sum: float = 0.0  # the running interval's loss (sum over steps)
    steps: int = 0
    warned: bool = False

    def too_short(self, step: int, total_steps: int) -> str | None:
        """Once, at step 0 of a run too short for any switch: why (else None)."""
        if step != 0 or total_steps >= WINDOW * self.interval or self.warned:
            return None
        self.warned = True
        return (
            f"{total_steps} steps < {WINDOW} intervals of {self.interval}: "
            "no stage switch can happen; lower --set interval"
        )

    def add(self, loss: float) -> dict[str, Any] | None:
        """A step's loss; the indicator's values when an interval ends on a plateau."""
        self.loss_sum += loss
        self.steps += 1
        if self.steps < self.interval:
            return None
        interval_loss = self.loss_sum / self.steps
        self.loss_sum, self.steps = 0.0, 0
        return self.indicator.add(interval_loss)

    def state_dict(self) -> dict[str, Any]:
        indicator = self.indicator
        return {"epsilon": indicator.epsilon, "first": list(indicator.first),
                "window": list(indicator.window), "sum": self.loss_sum, "count": self.steps,
                "warned": self.warned}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indicator = PlateauIndicator(
            float(state["epsilon"]), self.indicator.decay, list(state["first"]),
            list(state["window"]),
        )  # fmt: skip
        self.loss_sum, self.steps = float(state["sum"]), int(state["count"])
        self.warned = bool(state["warned"])


@dataclasses.dataclass(frozen=True)
class PFQConfig(RecipeConfig):
    """PFQ's parameters; the stage lists pair up (forward_bits[i] with backward_bits[i])."""

    forward_bits: tuple[int, ...] = (3, 4, 6, 8)
    backward_bits: tuple[int, ...] = (6, 6, 8, 8)
    interval: int = 400  # iterations per indicator reading (the paper's)
    epsilon: float = 0.15  # the first plateau threshold (paper example 0.05)
    decay: float = 0.4  # ε ← decay·ε after each switch (paper example 0.3)
    quantize_classifier: bool = False

    def validate(self) -> None:
        error = RecipeConfigError
        if not self.forward_bits or len(self.forward_bits) != len(self.backward_bits):
            raise error(
                "PFQConfig.forward_bits and backward_bits must be non-empty and of one length, "
                f"got {list(self.forward_bits)} and {list(self.backward_bits)}"
            )
        for name in ("forward_bits", "backward_bits"):
            for bits in getattr(self, name):
                check_int(f"PFQConfig.{name} item", bits, error, low=2, high=16)
        check_int("PFQConfig.interval", self.interval, error, low=1)
        check_number("PFQConfig.epsilon", self.epsilon, error, low=0, high=1e9)
        check_number("PFQConfig.decay", self.decay, error, low=0, high=1)


@register_recipe
class PFQ(Recipe):
    name = "pfq"
    paper = "Fu et al., FracTrain (NeurIPS 2020): progressive fractional quantization"
    description = "precision stages low to high, switched when the training loss plateaus"
    config_class = PFQConfig

    def __init__(self, config: PFQConfig | None = None) -> None:
        super().__init__(config)
        self.stage = 0
        config = self.config
        self.plateau = IntervalPlateau(
            config.interval, PlateauIndicator(config.epsilon, config.decay)
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        quantization = precision_schedule_quantization(
            max(config.forward_bits), max(config.backward_bits)
        )
        keep = None if config.quantize_classifier else except_classifier(model)
        return quantize_(model, quantization, filter_fn=keep)

    def _precision(self) -> Precision:
        config = self.config
        return Precision(forward=config.forward_bits[self.stage],
                         backward=config.backward_bits[self.stage])  # fmt: skip

    def schedule(self, step: int, total_steps: int) -> Precision:
        why = self.plateau.too_short(step, total_steps)
        if why is not None:
            self.emit("too_short", why=why)
        return self._precision()

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        values = self.plateau.add(result.loss)
        if values is not None and self.stage + 1 < len(self.config.forward_bits):
            self.stage += 1
            precision = self._precision()
            self.emit("stage", stage=self.stage, forward_bits=precision.forward,
                      backward_bits=precision.backward, **values)  # fmt: skip
        return False

    def metrics(self) -> dict[str, float]:
        precision = self._precision()
        return {"fw_bits": precision.forward, "bw_bits": precision.backward, "stage": self.stage}

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.stage = int(state["stage"])
        self.plateau.load_state_dict(state)
