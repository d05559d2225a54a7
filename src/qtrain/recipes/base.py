"""The recipe interface: a recipe is the policy of one method over time and space.

A recipe is built from a frozen, validated, JSON-serialisable config. The trainer reaches a
recipe only through these hooks (and the registry in ``qtrain.recipes``), never by name, so a
new method is one new file under ``recipes/``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from qtrain.configs import Config
from qtrain.ops import Precision


class RecipeConfigError(ValueError):
    """A recipe parameter has a bad name, type or value."""


# The type of a recipe config's optional ``amp`` field, and the autocast dtype of each value.
Amp = Literal["none", "bf16", "fp16"]
AMP_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(typing.get_args(Amp), (None, torch.bfloat16, torch.float16), strict=True)
)


@dataclasses.dataclass(frozen=True)
class RecipeConfig(Config):
    """Base of every recipe config: a ``qtrain.configs.Config`` (frozen, every field checked
    against its annotation, then ``validate``; one JSON scheme) that also takes ``--set``
    text."""

    error: ClassVar[type[Exception]] = RecipeConfigError

    def with_overrides(self, overrides: dict[str, Any]) -> RecipeConfig:
        """Apply overrides: ``--set key=value`` strings, parsed by the field's type, or values
        already of that type (``{"bits": 6, "bifurcation": False}``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise RecipeConfigError(
                f"unknown parameter {unknown[0]!r} for {type(self).__name__}; "
                f"allowed: {sorted(names)}"
            )
        changes = {
            key: _parse_text(key, raw) if isinstance(raw, str) else raw
            for key, raw in overrides.items()
        }
        return self.with_changes(**changes)


def _parse_text(key: str, raw: str) -> Any:
    """Parse a ``--set`` value: JSON if it parses (numbers, true/false, lists), else a string.

    A bare comma list (``3,4,6``) is read as a list.
    """
    text = raw.strip()
    if "," in text and not text.startswith("["):
        text = f"[{text}]"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.startswith("["):
            raise RecipeConfigError(f"parameter {key!r}: cannot parse {raw!r} as a list") from None
        return raw


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one training step measured: the task loss (mean over the batch, without the
    recipe's extra loss), the number of correct predictions, and the number of targets."""

    loss: float
    correct: int
    count: int


class Recipe:
    """Base recipe: full precision, no hooks. Subclasses override what their method needs.

    Lifecycle, in the trainer's order (docs/DESIGN.md lists each hook with the method that
    needs it):

    - ``prepare(model)`` once: swap layers (usually ``qtrain.quantize_``);
    - ``param_groups(model)``: optimizer groups (per-layer learning rates);
    - each step: ``schedule(step, total_steps)`` → the trainer sets that precision on every
      quantized layer (the guard's floor stays under it) → forward under ``autocast()`` →
      task loss + ``extra_loss(model)`` → backward (through ``grad_scaler``) →
      ``before_optimizer_step`` → optimizer step → ``on_step_end(step, result, ...)`` (True
      when the model's shape changed: the trainer rebuilds the optimizer, keeping surviving
      state through ``remap_optimizer_state``) → ``sync()`` (agree across ranks);
    - ``metrics()`` whenever the trainer logs (metrics.jsonl, progress bar, report plots);
      ``events()`` after every step (decisions, into metrics.jsonl); ``finished()`` after
      every step (True stops the run early);
    - ``on_eval_start(model)`` before each evaluation: a precision to evaluate at;
    - ``state_dict()`` in every checkpoint; ``load_state_dict(state, model)`` on resume and in
      ``load_run``, before the weights load, so structural changes can be replayed first.

    ``schedule`` must be a pure function of the step and the recipe's state: the guard
    re-runs a step after restoring the recipe's state, and resume replays it.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[RecipeConfig]] = RecipeConfig
    # False: the hooks read or reshape parameters outside the forward pass (a size loss over
    # learned bits, channel removal), which FSDP2's sharded parameters do not allow; the
    # trainer then refuses ``--distributed fsdp`` (DDP keeps whole parameters on every rank).
    shardable: ClassVar[bool] = True

    def __init__(self, config: RecipeConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise RecipeConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(self.config).__name__}"
            )
        self._events: list[dict[str, Any]] = []

    # ---- model set-up -------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap/annotate the model's layers (usually via ``qtrain.quantize_``); return it."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (e.g. one per layer for UI8's lr scaling), or None.

        A group's ``lr`` is its peak learning rate; the trainer's schedule scales it."""
        return None

    # ---- per-step hooks -------------------------------------------------------------------
    def schedule(self, step: int, total_steps: int) -> Precision | dict[str, Precision] | None:
        """The precision of step ``step`` (0-based) of ``total_steps`` (CPT, PFQ): one for
        every quantized layer, a dict by layer name, or None for the configured bits.

        Pure: the same step and recipe state give the same answer (retries, resume)."""
        return None

    def autocast(self, device_type: str) -> torch.autocast | None:
        """An autocast context for the forward pass, or None.

        A config with an ``amp`` field ("none", "bf16", "fp16") composes autocast with the
        recipe's own quantization: the operands without a spec run in that dtype.
        """
        dtype = AMP_DTYPES[getattr(self.config, "amp", "none")]
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else None

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        """A GradScaler when the config's ``amp`` is fp16 (narrow exponent range), else None."""
        if getattr(self.config, "amp", "none") == "fp16":
            return torch.amp.GradScaler(device_type)
        return None

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the task loss (size loss, gate cost), or None."""
        return None

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        """Adjust gradients or per-group learning rates (e.g. UI8's lr scaling); each group's
        ``lr`` already holds the run's schedule for this step."""

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        """Observe the step (PFQ's loss plateaus); True if the model's parameters changed
        shape (self-compression removed channels)."""
        return False

    def remap_optimizer_state(self) -> Callable[[nn.Parameter], nn.Parameter | None] | None:
        """After a shape change: maps each new parameter to the old one whose state it keeps."""
        return None

    def sync(self, process_group: Any = None) -> None:
        """Agree on recipe state across ranks that the trainer does not agree on already; the
        trainer calls it after every step (``process_group``: the run's; None in a single
        process, where there is nothing to agree on).

        What the trainer agrees on in its one collective per step (``qtrain.distributed``):
        the ``StepResult`` that ``on_step_end`` sees is the global batch's (so decisions made
        from it — PFQ's stage, CPT's range test — are the same on every rank), and every
        observer's state and persistent floating-point buffer of the model is averaged. A
        recipe with state of its own drawn from the local batch (statistics not kept in
        buffers) agrees on it here."""

    # ---- evaluation and reporting ---------------------------------------------------------
    def on_eval_start(self, model: nn.Module) -> Precision | dict[str, Precision] | None:
        """The precision to evaluate at (CPT: b_max), or None for the current schedule's."""
        return None

    def emit(self, event: str, **values: Any) -> None:
        """Record a decision for ``events()``: its name and JSON-able values (the trainer adds
        the step, so ``kind`` and ``step`` are not values' names)."""
        reserved = sorted({"kind", "step"} & set(values))
        if reserved:
            raise ValueError(f"emit({event!r}): {reserved} is set by the trainer, not a value")
        self._events.append({"event": event, **values})

    def events(self) -> list[dict[str, Any]]:
        """Decisions made since the last call (``emit``), each a dict with an ``"event"`` name
        (CPT's range-test choice, a PFQ stage switch with the indicator values that caused
        it). The trainer drains them after every step into metrics.jsonl (``"kind":
        "recipe"``) and prints them unless quiet."""
        events, self._events = self._events, []
        return events

    def finished(self) -> bool:
        """True ends the run after this step (e.g. the precision range test run alone)."""
        return False

    def metrics(self) -> dict[str, float | dict[str, float]]:
        """Named scalars for metrics.jsonl, the progress bar and the report's plots (bits in
        use, clip values, the fraction of channels removed...), or per-layer values as a
        ``{layer name: value}`` dict: those reach only metrics.jsonl's change records and the
        report (one figure each, a line per layer), so return summaries that change rarely
        (say, at a refresh interval) rather than every step."""
        return {}

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State needed for exact resume (PFQ's stage, CPT's range-test choice): tensors and
        plain containers only (checkpoints load with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore ``state_dict()``; ``model`` is the freshly prepared model, before its
        weights load, so structural changes (removed channels) can be replayed on it."""


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: add a recipe to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in RECIPES:
        raise ValueError(f"recipe {cls.name!r} registered twice")
    RECIPES[cls.name] = cls
    return cls


def build_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Build a registered recipe by name with optional overrides (``--set`` text or values)."""
    if name not in RECIPES:
        raise RecipeConfigError(
            f"unknown recipe {name!r}; choose from: {', '.join(sorted(RECIPES))}"
        )
    cls = RECIPES[name]
    config = cls.config_class()
    if overrides:
        config = config.with_overrides(overrides)
    return cls(config)


def iter_recipes() -> Iterator[type[Recipe]]:
    yield from (RECIPES[name] for name in sorted(RECIPES))
