"""What decides a training run besides the recipe (``TrainConfig``), its learning-rate
schedule (``lr_factor``), and the errors a run raises.

Example:
    >>> c = TrainConfig(model="cnn", data="synthetic", epochs=2, lr=0.05)
    >>> TrainConfig.from_json(c.to_json()) == c
    True
    >>> round(lr_factor("onecycle", 1, 10, 0.2), 2)
    1.0
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from qtrain import data as qdata
from qtrain import models as qmodels
from qtrain.configs import Config, from_jsonable
from qtrain.distributed import MODES
from qtrain.guard import POLICIES, Fault
from qtrain.ops import PRODUCTS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")

# Options a resumed run may change: they decide nothing unless a fault happens (the guard's)
# or only how progress is shown.
RESUME_MUTABLE = frozenset({"quiet", "on_nonfinite", "check_every"})


class TrainConfigError(ValueError):
    """A training option has a bad value, or the run cannot be set up (data, model, run dir)."""


class RunError(RuntimeError):
    """A run could not go on for a reason its message explains (the CLI exits 1, no trace)."""


class CheckpointError(RunError):
    """A checkpoint is missing, truncated, corrupted, or holds objects that are not data."""


class NumericalFaultError(RunError):
    """Training stopped at a NaN/inf (``on_nonfinite="stop"``, or no policy could repair it)."""

    def __init__(self, message: str, fault: Fault) -> None:
        super().__init__(message)
        self.fault = fault


class OutOfMemoryError(RunError):
    """The run needs more memory than the device has for the chosen batch size."""


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, for one-line reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Everything that decides a training run besides the recipe. Frozen, validated, JSON.

    Units: ``lr`` is the peak learning rate per step; ``weight_decay`` is PyTorch's (SGD: L2
    coefficient, AdamW: decoupled); ``warmup_fraction`` is a fraction of all steps (onecycle:
    where the peak sits; cosine: linear warm-up before the decay; unused by step/constant);
    ``checkpoint_every``, ``log_every`` are steps (``checkpoint_every=0``: only at the end);
    ``eval_every`` is epochs (the last epoch is always evaluated). ``width`` is the model's base
    width (None: the model's default); ``train_subset``/``test_subset`` cap the number of
    examples (None: all). ``model_kwargs``/``data_kwargs`` go to ``build_model``/``load_dataset``.
    ``init`` is another run's directory whose trained weights the model starts from (QAT's
    fine-tuning of a float model; ``qtrain.train.init_from_run``).
    ``on_nonfinite`` is what a NaN/inf in a step does: ``stop``, ``skip`` the step, or
    ``raise-precision`` of the faulty layer and retry; ``check_every`` is steps between
    per-layer checks (0: none; the loss and the weight gradients are checked every step, and a
    fault they see is located by re-running the step with every layer checked).
    ``distributed`` is ``none`` (one process), ``ddp`` or ``fsdp`` (FSDP2): one process per rank
    under torchrun, ``batch_size`` the global batch (``batch_size / world size`` per rank;
    ``qtrain.distributed``); ``sync_batchnorm`` turns plain BatchNorm layers into SyncBatchNorm
    (CUDA only). ``products`` is how the quantized layers' products run
    (``qtrain.ops.GemmConfig.products``: ``float``, ``int8``, ``int8-twin``, ``int8-real``).

    Example:
        >>> c = TrainConfig(model="cnn", data="synthetic", epochs=2, lr=0.05)
        >>> TrainConfig.from_json(c.to_json()) == c
        True
        >>> c.with_changes(epochs=3).epochs
        3
    """

    model: str
    data: str
    epochs: int
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"
    width: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    eval_every: int = 1
    log_every: int = 50
    checkpoint_every: int = 0
    on_nonfinite: str = "stop"
    check_every: int = 0
    quiet: bool = False
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str | None = None
    distributed: str = "none"
    sync_batchnorm: bool = False
    products: str = "float"

    error: ClassVar[type[Exception]] = TrainConfigError
    option: ClassVar[str] = "train option"

    def validate(self) -> None:
        _choice("model", self.model, sorted(qmodels.MODELS))
        _choice("data", self.data, sorted(qdata.DATASETS))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("on_nonfinite", self.on_nonfinite, POLICIES)
        _choice("distributed", self.distributed, MODES)
        _choice("products", self.products, PRODUCTS)
        for name in ("epochs", "batch_size", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("width", "train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainConfigError(f"{name} must be >= 1 (or unset), got {value}")
        if self.checkpoint_every < 0:
            raise TrainConfigError(
                f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}"
            )
        if self.check_every < 0:
            raise TrainConfigError(
                f"check_every must be >= 0 (0: no per-layer checks), got {self.check_every}"
            )
        if not 0 <= self.seed < 2**63:
            raise TrainConfigError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise TrainConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise TrainConfigError("nesterov needs momentum > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise TrainConfigError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise TrainConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        try:
            device_type = torch.device(self.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cpu", "cuda"):
            raise TrainConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.distributed != "none" and self.on_nonfinite != "stop":
            # Skipping or retrying a step needs every rank to agree on the fault first.
            raise TrainConfigError(
                f"on_nonfinite={self.on_nonfinite} is for one process; a distributed run stops "
                "at a NaN/inf (resume it from its last checkpoint)"
            )
        if self.sync_batchnorm and (self.distributed == "none" or device_type != "cuda"):
            raise TrainConfigError(
                "sync_batchnorm needs a distributed run on CUDA (torch's SyncBatchNorm has no "
                "CPU kernel); on the CPU each rank normalises with its own batch statistics"
            )


def _choice(name: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise TrainConfigError(f"unknown {name} {value!r}; choose from: {', '.join(choices)}")


# The plain parameter types a model or dataset builder may annotate (annotations are text).
_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def lr_factor(schedule: str, step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate for 0-based ``step`` of ``total_steps``.

    ``onecycle`` is the piecewise-linear triangle of Page's DAWNBench ResNet-9 (0 → peak at
    ``warmup_fraction`` → 0), ``cosine`` a linear warm-up then a half cosine to 0, ``step``
    divides by 10 at 50% and 75% of training.

    Example:
        >>> [round(lr_factor("onecycle", s, 10, 0.2), 2) for s in (0, 1, 5, 9)]
        [0.5, 1.0, 0.5, 0.0]
    """
    # The factor is taken at the end of the step (step + 1) so the first step does not waste
    # an update at lr = 0 and the last one lands on the schedule's final value.
    t = (step + 1) / total_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if t <= 0.5 else 0.1 if t <= 0.75 else 0.01
    if t < warmup_fraction:
        return t / warmup_fraction
    decay = (t - warmup_fraction) / (1 - warmup_fraction)
    if schedule == "onecycle":
        return 1.0 - decay
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * decay))
    raise TrainConfigError(f"unknown schedule {schedule!r}; choose from: {', '.join(SCHEDULES)}")


def _check_keywords(
    what: str, option: str, builder: Callable[..., Any], given: dict[str, Any], supplied: int
) -> None:
    """Check ``model_kwargs``/``data_kwargs`` against the builder's keyword parameters.

    ``supplied`` leading parameters are the trainer's own; a value whose parameter is annotated
    with a plain type (int, float, bool, str) must have that type.
    """
    bound = builder.keywords if isinstance(builder, functools.partial) else {}
    signature = list(inspect.signature(builder).parameters.values())[supplied:]
    params = {
        p.name: p
        for p in signature
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in bound
    }
    unknown = sorted(set(given) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature):
        raise TrainConfigError(
            f"{option}: {what} takes no {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(params) or 'none'}"
        )
    for key, value in given.items():
        annotation = params[key].annotation if key in params else None
        if isinstance(annotation, str) and annotation.removesuffix(" | None") in _SIMPLE_TYPES:
            kind = _SIMPLE_TYPES[annotation.removesuffix(" | None")]
            if value is not None or not annotation.endswith(" | None"):
                from_jsonable(f"{option} {key!r}", value, kind, TrainConfigError)
