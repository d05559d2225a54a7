"""The trainer: one loop for every recipe, driven only through the recipe hooks.

A run writes one directory (DESIGN.md, "Runs and artifacts"):

- ``config.json``  — the ``TrainConfig``, the recipe's name and config, library versions;
- ``metrics.jsonl`` — one JSON object per logged step (``"kind": "step"``) and per epoch
  (``"kind": "epoch"``);
- ``checkpoint.pt`` — the latest checkpoint, written atomically every ``checkpoint_every``
  steps and at the end; loaded only with ``torch.load(..., weights_only=True)``, after its
  SHA-256 is checked against ``checkpoint.manifest.json`` (``read_checkpoint``);
- ``summary.json`` — the final figures.

Every step is guarded against NaN/inf (``qtrain.guard``, docs/RELIABILITY.md): a fault is
reported with its layer and tensor role, and ``on_nonfinite`` stops the run, skips the step or
raises the layer's precision and retries. No checkpoint is written with a non-finite tensor.

Example:
    >>> from qtrain.recipes import build_recipe
    >>> config = TrainConfig(model="cnn", data="synthetic", epochs=1, quiet=True)
    >>> summary = train(config, build_recipe("fp32"), "runs/example")  # doctest: +SKIP
    >>> 0.0 <= summary["test_acc"] <= 1.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import data as qdata
from qtrain import models as qmodels
from qtrain.cost import CostMeter, StepCost, model_bits
from qtrain.guard import POLICIES, Fault, NumericalGuard
from qtrain.quantizer import NonFiniteError
from qtrain.protocol import set_precision
from qtrain.recipes.base import Recipe, StepResult

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.manifest.json"

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")

# Keys of metric records that measure time; they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"wall_seconds", "epoch_seconds", "samples_per_second"})

# Options a resumed run may change: they decide nothing unless a fault happens (the guard's)
# or only how progress is shown.
RESUME_MUTABLE = frozenset({"quiet", "on_nonfinite", "check_every"})

# Attempts of one step: the first, one re-run with every layer checked to locate a fault, and
# precision raises (each layer at most 3: 4 -> 8 -> 16 bits -> float).
MAX_STEP_ATTEMPTS = 8

_CHECKPOINT_KEYS = ("format", "model", "optimizer", "grad_scaler", "recipe", "rng", "progress")


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the recipe. Frozen, validated, JSON.

    Units: ``lr`` is the peak learning rate per step; ``weight_decay`` is PyTorch's (SGD: L2
    coefficient, AdamW: decoupled); ``warmup_fraction`` is a fraction of all steps (onecycle:
    where the peak sits; cosine: linear warm-up before the decay; unused by step/constant);
    ``checkpoint_every``, ``log_every`` are steps (``checkpoint_every=0``: only at the end);
    ``eval_every`` is epochs (the last epoch is always evaluated). ``width`` is the model's base
    width (None: the model's default); ``train_subset``/``test_subset`` cap the number of
    examples (None: all). ``model_kwargs``/``data_kwargs`` go to ``build_model``/``load_dataset``.
    ``on_nonfinite`` is what a NaN/inf in a step does: ``stop``, ``skip`` the step, or
    ``raise-precision`` of the faulty layer and retry; ``check_every`` is steps between
    per-layer checks (0: none; the loss and the weight gradients are checked every step, and a
    fault they see is located by re-running the step with every layer checked).

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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            # JSON has one number type: accept an integral value for an int field, any number
            # for a float field, and store it as the declared type.
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _check_type(f.name, value, f.type))
        self._validate()

    def _validate(self) -> None:
        _choice("model", self.model, sorted(qmodels.MODELS))
        _choice("data", self.data, sorted(qdata.DATASETS))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("on_nonfinite", self.on_nonfinite, POLICIES)
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TrainConfigError(f"unknown train option(s) {unknown}; allowed: {names}")
        try:
            return cls(**data)
        except TypeError as err:  # a required option is missing
            raise TrainConfigError(str(err)) from None

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def with_changes(self, **changes: Any) -> TrainConfig:
        """A copy with some options changed (validated like a new config)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _choice(name: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise TrainConfigError(f"unknown {name} {value!r}; choose from: {', '.join(choices)}")


_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_type(name: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against a field annotation written as text (``from __future__``)."""
    if annotation.endswith(" | None"):
        if value is None:
            return None
        annotation = annotation.removesuffix(" | None")
    if annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise TrainConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    expected = _SIMPLE_TYPES[annotation]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not ok:
        raise TrainConfigError(f"{name} must be of type {annotation}, got {value!r}")
    return value


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


# ---- files --------------------------------------------------------------------------------


def _write_temp(path: Path, write: Callable[[Any], Any]) -> Path:
    """Write a temp file beside ``path`` with ``write(file)`` and fsync it; return its path."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` and fsync the directory so the rename is durable."""
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync is POSIX only
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a torn one.
    """
    _commit(_write_temp(path, write), path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _sha256(path: Path) -> tuple[str, int]:
    """Hex SHA-256 and size in bytes of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(MANIFEST_FILE)


def _write_checkpoint(
    path: Path, state: dict[str, Any], step: int, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Write ``state`` to ``path`` durably, with its checksum in the manifest; return its entry.

    ``previous`` is the manifest entry of the file now at ``path`` (None if there is none).
    Order: the new file under a temp name, the manifest naming its checksum and the previous
    one, then the rename. A crash at any point leaves a file that the manifest vouches for:
    the previous one before the rename, the new one after.
    """
    tmp = _write_temp(path, lambda f: torch.save(state, f))
    digest, size = _sha256(tmp)
    entry = {"file": path.name, "sha256": digest, "bytes": size, "step": step}
    _write_json(_manifest_path(path), {**entry, "previous": previous})
    _commit(tmp, path)
    return entry


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
            raise ValueError("no sha256 entry")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint manifest {manifest}: {err}") from None
    return data


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by ``train``: checksum verified, nothing but data unpickled.

    The file's SHA-256 must match its manifest (``checkpoint.manifest.json`` beside it), and it
    is loaded with ``torch.load(weights_only=True)``, which builds only tensors and plain
    containers and refuses any other object instead of running its code. A checkpoint from a
    qtrain without manifests (none beside it) is loaded with a warning. Raises
    ``CheckpointError`` naming the file when it is truncated, corrupted or unsafe.

    Example:
        >>> state = read_checkpoint("runs/example/checkpoint.pt")  # doctest: +SKIP
        >>> state["progress"]["step"]  # doctest: +SKIP
        63
    """
    path = Path(path)
    _verify_checkpoint(path)
    return _load_checkpoint_data(path)


def _verify_checkpoint(path: Path) -> dict[str, Any] | None:
    """The manifest entry that ``path``'s checksum matches (None: no manifest, legacy)."""
    manifest = _manifest_path(path)
    if not manifest.exists():
        warnings.warn(
            f"checkpoint {path} has no {MANIFEST_FILE} beside it (written by an older qtrain?): "
            "its integrity is not verified",
            stacklevel=3,
        )
        return None
    expected = _read_manifest(manifest)
    digest, size = _sha256(path)
    for entry in (expected, expected.get("previous")):
        if entry and entry.get("sha256") == digest:
            return {k: v for k, v in entry.items() if k != "previous"}
    raise CheckpointError(
        f"checkpoint {path} does not match its manifest {manifest.name} ({size} bytes, sha256 "
        f"{digest[:16]}…; expected {expected.get('bytes')} bytes, sha256 "
        f"{expected['sha256'][:16]}…): the file is truncated or corrupted; refusing it"
    )


def _load_checkpoint_data(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's restricted unpickler names what it refused in a long multi-line message.
        text = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe is not None:
            raise CheckpointError(
                f"refusing to load {path}: unpickling it would call {unsafe.group(1)}, which "
                "could run code; a checkpoint holds only tensors and plain data"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.DOTALL)
        raise _unreadable(path, reason.group(1) if reason else _first_line(err)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(path, _first_line(err)) from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a qtrain checkpoint: it lacks {missing}")
    return state


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read checkpoint {path}: {reason} (truncated, corrupted, or not a checkpoint)"
    )


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def versions() -> dict[str, str]:
    """Versions recorded in ``config.json`` so a run can be repeated."""
    try:
        qtrain_version = importlib.metadata.version("qtrain")
    except importlib.metadata.PackageNotFoundError:
        qtrain_version = "unknown (not installed)"
    return {
        "qtrain": qtrain_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ---- randomness ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from (torch CPU and CUDA, Python, NumPy)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- optimizer ----------------------------------------------------------------------------


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


# ---- the run ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Meter:
    """Running sums of the task loss and accuracy over a window of steps."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.count += count

    def means(self) -> tuple[float, float]:
        n = max(self.count, 1)
        return self.loss_sum / n, self.correct / n


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


def _task_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and the number of correct predictions.

    logits (B, C) with targets (B,), or per-position logits (B, T, C) with targets (B, T) for
    language models; the loss is in float32 whatever dtype autocast produced.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, correct


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that first resizes tensors a recipe shrank during training.

    A recipe may change the model's shape (channels removed); a fresh model has the original
    shapes, so each mismatched parameter/buffer takes the checkpoint's shape before loading.
    """
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            own[name].data = torch.empty_like(tensor, device=own[name].device)
    model.load_state_dict(state)


@dataclasses.dataclass
class _StepSnapshot:
    """What a step changes before its optimizer update: buffers (running statistics, running
    ranges) and the RNG streams. Restored when a step is abandoned at a fault, so a skipped
    step leaves no trace and a retried one draws the same random numbers as the first try."""

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


class _Trainer:
    """One run: data, model, optimizer, recipe and the bookkeeping around them."""

    def __init__(self, config: TrainConfig, recipe: Recipe) -> None:
        self.config = config
        self.recipe = recipe
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError("device cuda requested but torch.cuda.is_available() is False")
        _check_keywords(
            f"data {config.data}",
            "data_kwargs",
            qdata.DATASETS[config.data],
            config.data_kwargs,
            supplied=1,
        )
        _check_keywords(
            f"model {config.model}",
            "model_kwargs",
            qmodels.MODELS[config.model],
            config.model_kwargs,
            supplied=3,
        )
        seed_everything(config.seed)
        try:
            self.dataset = qdata.load_dataset(
                config.data,
                data_dir=config.data_dir,
                train_subset=config.train_subset,
                test_subset=config.test_subset,
                seed=config.seed,
                device=self.device,
                download=config.download,
                **config.data_kwargs,
            )
            model = qmodels.build_model(
                config.model,
                input_shape=self.dataset.input_shape,
                num_classes=self.dataset.num_classes,
                width=config.width,
                **config.model_kwargs,
            )
        except (ValueError, TypeError, OSError, KeyError) as err:
            raise TrainConfigError(str(err) or repr(err)) from err
        self.model = recipe.prepare(model.to(self.device)).to(self.device)
        self.optimizer = build_optimizer(config, recipe, self.model)
        self.scaler = recipe.grad_scaler(self.device.type)
        # Under a loss scaler, scaled gradients overflow on purpose: the scaler skips the step.
        self.guard = NumericalGuard(self.model, gradients=self.scaler is None)
        self.steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.progress = _Progress(params_initial=_params(self.model))
        self.checkpoint_entry: dict[str, Any] | None = None  # manifest entry of the file on disk

    # ---- checkpoints ----
    def save_checkpoint(self, path: Path) -> None:
        """Write the checkpoint, after the metrics it covers are on disk.

        Raises ``NumericalFaultError`` instead of writing a non-finite model or optimizer state.
        """
        fault = self._state_fault()
        if fault is not None:
            raise NumericalFaultError(
                f"{fault}: refusing to write a checkpoint with it; {self._kept_checkpoint(path)}",
                fault,
            )
        state = {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "recipe": self.recipe.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": _rng_state(),
            "progress": self.progress.to_dict(),
        }
        # A resumed run keeps the metrics up to the checkpoint's step: they must be durable first.
        self.metrics.flush()
        os.fsync(self.metrics.fileno())
        self.checkpoint_entry = _write_checkpoint(
            path, state, self.progress.step, self.checkpoint_entry
        )

    def load_checkpoint(self, path: Path) -> None:
        self.checkpoint_entry = _verify_checkpoint(path)
        # On the CPU: RNG states must be CPU tensors; model and optimizer copy to their device.
        state = _load_checkpoint_data(path)
        # The recipe first, so it can restore any structure its state describes; then shapes.
        self.recipe.load_state_dict(state["recipe"], self.model)
        _load_model_state(self.model, state["model"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.optimizer = build_optimizer(self.config, self.recipe, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.progress = _Progress.from_dict(state["progress"])
        # Restored last: the RNG state must be exactly as it was after the checkpoint's step.
        _set_rng_state(state["rng"])

    def _state_fault(self) -> Fault | None:
        """The first non-finite tensor of the model's or the optimizer's state."""
        step = self.progress.step
        for key, tensor in self.model.state_dict().items():
            if _is_nonfinite(tensor):
                layer, _, role = key.rpartition(".")
                module = type(self.model.get_submodule(layer)).__name__
                return Fault(step, layer, module, role, _nonfinite_kind(tensor), persistent=True)
        names = {param: name for name, param in self.model.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, tensor in state.items():
                if _is_nonfinite(tensor):
                    role = f"optimizer {key} of {names.get(param, 'a parameter')}"
                    kind = _nonfinite_kind(tensor)
                    return Fault(step, "(optimizer)", "", role, kind, persistent=True)
        return None

    def _kept_checkpoint(self, path: Path) -> str:
        if self.checkpoint_entry is None:
            return "no checkpoint was written"
        return f"{path} still holds step {self.checkpoint_entry['step']}"

    # ---- steps ----
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.recipe.autocast(self.device.type) or contextlib.nullcontext()

    def _guarded_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int] | None:
        """A training step under ``on_nonfinite``; returns None when the step was skipped.

        A fault is found before the optimizer update; the step's buffers, RNG streams and cost
        are then rolled back, so the model is exactly as before the step. A fault seen by the
        every-step checks (loss, weight gradients, a quantizer's NaN/inf error) on a step
        without per-layer checks is located by running the step again with them.
        """
        every = self.config.check_every
        check_layers = every > 0 and self.progress.step % every == 0
        unlocated: Fault | None = None
        for _ in range(MAX_STEP_ATTEMPTS):
            snapshot = _StepSnapshot.take(self.model, self.recipe)
            try:
                result = self._train_step(x, y, check_layers)
            except _StepFault as signal:
                fault = signal.fault
            else:
                if unlocated is not None:  # did not come back with every layer checked
                    self._report_fault(unlocated, "retried")
                return result
            snapshot.restore()
            self.meter.pop()  # an abandoned attempt is not training cost
            if not check_layers:
                check_layers, unlocated = True, fault
                continue
            unlocated = None
            action, reason = self._apply_policy(fault)
            self._report_fault(fault, action)
            if action == "skip":
                self.progress.step += 1
                return None
            if action == "stop":
                self._stop(fault, reason)
        self._stop(fault, f"still non-finite after {MAX_STEP_ATTEMPTS} attempts")

    def _apply_policy(self, fault: Fault) -> tuple[str, str]:
        """(action taken, why) for a located fault; raises the layer's precision if asked."""
        policy = self.config.on_nonfinite
        if policy == "stop":
            return "stop", "on_nonfinite=stop"
        if fault.persistent:
            return "stop", f"on_nonfinite={policy} cannot repair a non-finite {fault.role}"
        if policy == "skip":
            return "skip", ""
        if self.guard.raise_precision(fault.layer):
            return "raise-precision", ""
        return "stop", f"on_nonfinite={policy}: {fault.layer} has no quantized operand to raise"

    def _report_fault(self, fault: Fault, action: str) -> None:
        record = {"kind": "fault", "step": fault.step, **dataclasses.asdict(fault)}
        _write_record(self.metrics, {**record, "action": action})
        if not self.config.quiet:
            from tqdm.auto import tqdm

            tqdm.write(f"qtrain: {fault} -> {action}", file=sys.stderr)

    def _stop(self, fault: Fault, reason: str) -> NoReturn:
        """Checkpoint the state from before the faulty step, then raise NumericalFaultError."""
        path = self.out / CHECKPOINT_FILE
        try:
            self._sync_wall()
            self.save_checkpoint(path)
            kept = f"{path} holds step {self.progress.step}"
        except NumericalFaultError as refused:
            kept = str(refused)
        raise NumericalFaultError(f"{fault}; training stopped ({reason}); {kept}", fault)

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, check_layers: bool
    ) -> tuple[float, int]:
        """One step; raises ``_StepFault`` before the optimizer update if a NaN/inf shows."""
        config, recipe, model, step = self.config, self.recipe, self.model, self.progress.step
        set_precision(model, recipe.schedule(step, self.total_steps))
        factor = lr_factor(config.schedule, step, self.total_steps, config.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        model.train()
        guard = self.guard
        guard.start(step + 1, check_layers)
        try:
            with self._autocast():
                logits = model(x)
            loss, correct = _task_loss(logits, y, config.label_smoothing)
            extra = recipe.extra_loss(model)
            objective = loss if extra is None else loss + extra
            # One sync for the three numbers the step needs on the host.
            values = torch.stack([loss.detach(), objective.detach().float(), correct.float()])
            loss_value, objective_value, correct_count = values.tolist()
            if not math.isfinite(objective_value):
                kind = "nan" if math.isnan(objective_value) else "inf"
                raise _StepFault(guard.first_fault() or Fault(step + 1, "(loss)", "", "loss", kind))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(objective).backward()
            else:
                objective.backward()
                guard.record_parameter_gradients()
            fault = guard.first_fault()
            if fault is not None:
                raise _StepFault(fault)
        except NonFiniteError as err:
            # A quantizer refused NaN/inf; with layers checked, the records say where.
            unlocated = Fault(step + 1, "(unlocated)", "", "quantizer input", "nan or inf")
            raise _StepFault(guard.first_fault() or unlocated) from err
        finally:
            guard.stop()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # hooks see true gradients, not scaled ones
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.optimizer.step()
        result = StepResult(loss_value, int(correct_count), y.numel())
        if recipe.on_step_end(step, result, model, self.optimizer):
            self.progress.cost += self.meter.pop()
            self.meter.remove()
            self.meter = CostMeter(model)
            self.guard.reattach()
            self.optimizer = _rebuild_optimizer(config, recipe, model, self.optimizer)
        self.progress.cost += self.meter.pop()
        self.progress.step += 1
        return loss_value, int(correct_count)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy; not counted as training cost."""
        model, ds = self.model, self.dataset
        model.eval()
        total = _Meter()
        with self.meter.paused():
            for start in range(0, len(ds.test_y), self.config.batch_size):
                x = ds.test_x[start : start + self.config.batch_size]
                y = ds.test_y[start : start + self.config.batch_size]
                with self._autocast():
                    logits = model(x)
                loss, correct = _task_loss(logits, y, 0.0)
                total.add(loss.item(), int(correct.item()), y.numel())
        return total.means()

    def _checked_evaluation(self) -> tuple[float, float]:
        """``evaluate()``; a NaN/inf test loss stops the run.

        Evaluation changes nothing, so no policy applies: a non-finite result comes from the
        model's state (reported as such when a tensor of it is NaN/inf) or from an overflow.
        """
        try:
            test_loss, test_acc = self.evaluate()
            kind = "nan" if math.isnan(test_loss) else "inf"
        except NonFiniteError:
            test_loss, test_acc, kind = math.nan, 0.0, "nan or inf"
        if math.isfinite(test_loss):
            return test_loss, test_acc
        fault = self._state_fault() or Fault(self.progress.step, "(evaluation)", "", "loss", kind)
        self._report_fault(fault, "stop")
        self._stop(fault, "evaluation")

    def _record(self, kind: str, **fields: Any) -> dict[str, Any]:
        p = self.progress
        return {
            "kind": kind,
            "step": p.step,
            "epoch": p.step / self.steps_per_epoch,
            **fields,
            "lr": self.optimizer.param_groups[0]["lr"],
            "bits": self.recipe.metrics(),
            "params": _params(self.model),
            "bitops": p.cost.total_bitops,
            "bitops_fp32": p.cost.bitops_fp32,
            "wall_seconds": p.wall_seconds + (time.perf_counter() - self.session_start),
        }

    # ---- the loop ----
    def run(self, out: Path, resume: bool) -> dict[str, Any]:
        config = self.config
        self.out = out
        checkpoint = out / CHECKPOINT_FILE
        metrics_path = out / METRICS_FILE
        if resume and checkpoint.exists():
            self.load_checkpoint(checkpoint)
            kept = [r for r in read_metrics(out) if r["step"] <= self.progress.step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            _atomic_write(metrics_path, lambda f: f.write(text.encode()))
        else:
            out.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
        _write_json(
            out / CONFIG_FILE,
            {
                "train": config.to_dict(),
                "recipe": self.recipe.name,
                "recipe_config": self.recipe.config.to_dict(),
                "versions": versions(),
            },
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter = CostMeter(self.model)
        self.session_start = time.perf_counter()
        self.metrics = open(metrics_path, "a")  # noqa: SIM115  (closed in finally, spans the loop)
        try:
            self._loop(checkpoint)
        finally:
            self.metrics.close()
            self.meter.remove()
            self.guard.remove()
        summary = self.summary()
        _write_json(out / SUMMARY_FILE, summary)
        return summary

    def _loop(self, checkpoint: Path) -> None:
        config, p = self.config, self.progress
        bar = _progress_bar(self.total_steps, p.step, config.quiet)
        # Throughput of this process only (not checkpointed: it is a timing, not a result).
        window_samples, window_clock = 0, time.perf_counter()
        try:
            while p.step < self.total_steps:
                epoch, first = divmod(p.step, self.steps_per_epoch)
                epoch_start = time.perf_counter() - p.epoch_elapsed
                batches = self.dataset.train_batches(
                    config.batch_size, epoch=epoch, seed=config.seed, augment=config.augment
                )
                for x, y in _skip(batches, first):
                    outcome = self._guarded_step(x, y)
                    if outcome is not None:
                        loss, correct = outcome
                        p.window.add(loss, correct, y.numel())
                        p.epoch_meter.add(loss, correct, y.numel())
                    p.epoch_elapsed = time.perf_counter() - epoch_start
                    window_samples += len(y)
                    bar.update(1)
                    if p.step % config.log_every == 0:
                        window_loss, window_acc = p.window.means()
                        record = self._record("step", loss=window_loss, acc=window_acc)
                        now = time.perf_counter()
                        record["samples_per_second"] = window_samples / (now - window_clock)
                        window_samples, window_clock = 0, now
                        _write_record(self.metrics, record)
                        _bar_postfix(bar, record)
                        p.window = _Meter()
                    if p.step % self.steps_per_epoch == 0:
                        self._end_epoch(epoch)
                    if (
                        config.checkpoint_every and p.step % config.checkpoint_every == 0
                    ) or p.step == self.total_steps:
                        self._sync_wall()
                        self.save_checkpoint(checkpoint)
        finally:
            bar.close()

    def _sync_wall(self) -> None:
        now = time.perf_counter()
        self.progress.wall_seconds += now - self.session_start
        self.session_start = now

    def _end_epoch(self, epoch: int) -> None:
        config, p = self.config, self.progress
        p.epoch_seconds.append(p.epoch_elapsed)
        p.epoch_elapsed = 0.0
        train_loss, train_acc = p.epoch_meter.means()
        p.epoch_meter = _Meter()
        p.final_train_loss = train_loss
        fields: dict[str, Any] = {"train_loss": train_loss, "train_acc": train_acc}
        last = epoch + 1 == config.epochs
        if (epoch + 1) % config.eval_every == 0 or last:
            test_loss, test_acc = self._checked_evaluation()
            p.test_acc = test_acc
            p.best_test_acc = max(test_acc, p.best_test_acc or 0.0)
            fields |= {"test_loss": test_loss, "test_acc": test_acc}
        record = self._record("epoch", **fields)
        record["epoch_seconds"] = p.epoch_seconds[-1]
        _write_record(self.metrics, record)

    def summary(self) -> dict[str, Any]:
        p = self.progress
        self._sync_wall()
        peak, source = _peak_memory(self.device)
        return {
            "recipe": self.recipe.name,
            "model": self.config.model,
            "dataset": self.config.data,
            "epochs": self.config.epochs,
            "seed": self.config.seed,
            "steps": p.step,
            "test_acc": p.test_acc,
            "best_test_acc": p.best_test_acc,
            "final_train_loss": p.final_train_loss,
            "bitops_train": p.cost.total_bitops,
            "bitops_fp32_equiv": p.cost.bitops_fp32,
            "bitops_by_role": p.cost.bitops,
            "macs_by_role": p.cost.macs,
            "energy_pj": p.cost.energy_pj,
            "params_initial": p.params_initial,
            "params_final": _params(self.model),
            "model_bits": int(model_bits(self.model)),
            "bits": self.recipe.metrics(),
            "epoch_seconds": p.epoch_seconds,
            "wall_seconds": p.wall_seconds,
            "peak_memory_bytes": peak,
            "peak_memory_source": source,
            "device": str(self.device),
        }


def _write_record(metrics: Any, record: dict[str, Any]) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()  # a crash loses at most the record being written


def _skip(batches: Iterator[Any], count: int) -> Iterator[Any]:
    for index, batch in enumerate(batches):
        if index >= count:
            yield batch


def _progress_bar(total: int, initial: int, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=quiet, unit="step", dynamic_ncols=True, leave=False
    )


def _bar_postfix(bar: Any, record: dict[str, Any]) -> None:
    bits = "/".join(f"{v:g}" for v in record["bits"].values()) or "32"
    bar.set_postfix(
        loss=f"{record['loss']:.3f}",
        acc=f"{record['acc']:.3f}",
        bits=bits,
        img_s=f"{record['samples_per_second']:.0f}",
        refresh=False,
    )


def _check_run_dir(out: Path, resume: bool) -> None:
    if not resume and out.exists() and any(out.iterdir()):
        raise TrainConfigError(f"run directory {out} is not empty (resume it or choose another)")


def train(
    config: TrainConfig, recipe: Recipe, out_dir: str | os.PathLike[str], *, resume: bool = False
) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data`` with ``recipe``; write the run to ``out_dir``.

    With ``resume=True`` the run continues from ``out_dir/checkpoint.pt`` (or starts fresh if
    there is none) and ends with the same weights and metrics as an uninterrupted run — bit for
    bit on CPU. Data and model are set up before anything is written, so a bad option leaves
    no directory behind. Returns the summary (also written to ``summary.json``).

    Example:
        >>> from qtrain.recipes import build_recipe
        >>> cfg = TrainConfig(model="mlp", data="synthetic", epochs=1, quiet=True)
        >>> train(cfg, build_recipe("fp32"), "runs/doc")["epochs"]  # doctest: +SKIP
        1
    """
    out = Path(out_dir)
    _check_run_dir(out, resume)
    if resume and (out / CONFIG_FILE).exists():
        saved = json.loads((out / CONFIG_FILE).read_text())
        _check_same_run(saved, config, recipe)
    trainer: _Trainer | None = None
    try:
        trainer = _Trainer(config, recipe)
        return trainer.run(out, resume)
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        if trainer is None:
            where, hint = "while loading data and model", "--train-subset or a smaller --width"
        else:
            where, hint = f"at step {trainer.progress.step + 1}", "a smaller --batch-size"
        raise OutOfMemoryError(
            f"out of memory {where} with batch size {config.batch_size} on {config.device} "
            f"({_first_line(err)}); try {hint}"
        ) from err


# Messages of allocation failures: CUDA's, and the CPU allocator's (RuntimeError).
_OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return not isinstance(err, RunError) and any(m in text for m in _OUT_OF_MEMORY)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_nonfinite(value: Any) -> bool:
    """A floating-point tensor holding NaN or inf."""
    return (
        torch.is_tensor(value)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _nonfinite_kind(tensor: torch.Tensor) -> str:
    return "nan" if bool(torch.isnan(tensor).any()) else "inf"


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
            _check_type(f"{option}.{key}", value, annotation)


def _check_same_run(saved: dict[str, Any], config: TrainConfig, recipe: Recipe) -> None:
    """A resumed run must keep its config (only the ``RESUME_MUTABLE`` options may change)."""
    # Through TrainConfig, so that options added since the run started take their defaults.
    saved_train = TrainConfig.from_dict(saved["train"]).to_dict()
    ours = config.to_dict()
    changed = sorted(k for k, v in ours.items() if k not in RESUME_MUTABLE and saved_train[k] != v)
    if changed:
        raise TrainConfigError(f"cannot resume with changed train options: {changed}")
    if saved["recipe"] != recipe.name or saved["recipe_config"] != recipe.config.to_dict():
        raise TrainConfigError(
            f"cannot resume run of recipe {saved['recipe']} {saved['recipe_config']} with "
            f"{recipe.name} {recipe.config.to_dict()}"
        )
