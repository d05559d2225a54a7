"""The trainer: one loop for every recipe, driven only through the recipe hooks.

A run writes one directory (DESIGN.md, "Runs and artifacts"):

- ``config.json``  — the ``TrainConfig``, the recipe's name and config, library versions;
- ``metrics.jsonl`` — one JSON object per logged step (``"kind": "step"``) and per epoch
  (``"kind": "epoch"``);
- ``checkpoint.pt`` — the latest checkpoint, written atomically every ``checkpoint_every``
  steps and at the end; loaded only with ``torch.load(..., weights_only=True)``;
- ``summary.json`` — the final figures.

Example:
    >>> from qtrain.recipes import build_recipe
    >>> config = TrainConfig(model="cnn", data="synthetic", epochs=1, quiet=True)
    >>> summary = train(config, build_recipe("fp32"), "runs/example")  # doctest: +SKIP
    >>> 0.0 <= summary["test_acc"] <= 1.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import data as qdata
from qtrain import models as qmodels
from qtrain.cost import CostMeter, StepCost, model_bits
from qtrain.recipes.base import Recipe

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")

# Keys of metric records that measure time; they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"wall_seconds", "epoch_seconds", "samples_per_second"})


class TrainConfigError(ValueError):
    """A training option has a bad value, or the run cannot be set up (data, model, run dir)."""


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
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise TrainConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise TrainConfigError("nesterov needs momentum > 0")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise TrainConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise TrainConfigError(
                f"device must be cpu, cuda or cuda:N, got {self.device!r}"
            ) from None

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


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a torn one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync makes the rename durable (POSIX only)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


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


class _Trainer:
    """One run: data, model, optimizer, recipe and the bookkeeping around them."""

    def __init__(self, config: TrainConfig, recipe: Recipe) -> None:
        self.config = config
        self.recipe = recipe
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError("device cuda requested but torch.cuda.is_available() is False")
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
        self.steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.progress = _Progress(params_initial=_params(self.model))

    # ---- checkpoints ----
    def save_checkpoint(self, path: Path) -> None:
        state = {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "recipe": self.recipe.state_dict(),
            "rng": _rng_state(),
            "progress": self.progress.to_dict(),
        }
        _atomic_write(path, lambda f: torch.save(state, f))

    def load_checkpoint(self, path: Path) -> None:
        # On the CPU: RNG states must be CPU tensors; model and optimizer copy to their device.
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The recipe first, so it can restore any structure its state describes; then shapes.
        self.recipe.load_state_dict(state["recipe"])
        _load_model_state(self.model, state["model"])
        self.optimizer = build_optimizer(self.config, self.recipe, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.progress = _Progress.from_dict(state["progress"])
        # Restored last: the RNG state must be exactly as it was after the checkpoint's step.
        _set_rng_state(state["rng"])

    # ---- steps ----
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.recipe.autocast(self.device.type) or contextlib.nullcontext()

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        config, recipe, model, step = self.config, self.recipe, self.model, self.progress.step
        recipe.on_step_start(step, self.total_steps, model)
        factor = lr_factor(config.schedule, step, self.total_steps, config.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        model.train()
        with self._autocast():
            logits = model(x)
        loss, correct = _task_loss(logits, y, config.label_smoothing)
        extra = recipe.extra_loss(model)
        objective = loss if extra is None else loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            # Hooks see true gradients, not scaled ones.
            self.scaler.unscale_(self.optimizer)
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            objective.backward()
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.optimizer.step()
        loss_value = loss.item()
        if recipe.on_step_end(step, loss_value, model, self.optimizer):
            self.progress.cost += self.meter.pop()
            self.meter.remove()
            self.meter = CostMeter(model)
            self.optimizer = _rebuild_optimizer(config, recipe, model, self.optimizer)
        self.progress.cost += self.meter.pop()
        self.progress.step += 1
        return loss_value, int(correct.item())

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

    def _record(self, kind: str, **fields: Any) -> dict[str, Any]:
        p = self.progress
        return {
            "kind": kind,
            "step": p.step,
            "epoch": p.step / self.steps_per_epoch,
            **fields,
            "lr": self.optimizer.param_groups[0]["lr"],
            "bits": self.recipe.bits_summary(self.model),
            "params": _params(self.model),
            "bitops": p.cost.total_bitops,
            "bitops_fp32": p.cost.bitops_fp32,
            "wall_seconds": p.wall_seconds + (time.perf_counter() - self.session_start),
        }

    # ---- the loop ----
    def run(self, out: Path, resume: bool) -> dict[str, Any]:
        config = self.config
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
        try:
            self._loop(metrics_path, checkpoint)
        finally:
            self.meter.remove()
        summary = self.summary()
        _write_json(out / SUMMARY_FILE, summary)
        return summary

    def _loop(self, metrics_path: Path, checkpoint: Path) -> None:
        config, p = self.config, self.progress
        bar = _progress_bar(self.total_steps, p.step, config.quiet)
        # Throughput of this process only (not checkpointed: it is a timing, not a result).
        window_samples, window_clock = 0, time.perf_counter()
        metrics = open(metrics_path, "a")  # noqa: SIM115  (closed in finally, spans the loop)
        try:
            while p.step < self.total_steps:
                epoch, first = divmod(p.step, self.steps_per_epoch)
                epoch_start = time.perf_counter() - p.epoch_elapsed
                batches = self.dataset.train_batches(
                    config.batch_size, epoch=epoch, seed=config.seed, augment=config.augment
                )
                for x, y in _skip(batches, first):
                    loss, correct = self._train_step(x, y)
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
                        _write_record(metrics, record)
                        _bar_postfix(bar, record)
                        p.window = _Meter()
                    if p.step % self.steps_per_epoch == 0:
                        self._end_epoch(metrics, epoch)
                    if (
                        config.checkpoint_every and p.step % config.checkpoint_every == 0
                    ) or p.step == self.total_steps:
                        self._sync_wall()
                        self.save_checkpoint(checkpoint)
        finally:
            metrics.close()
            bar.close()

    def _sync_wall(self) -> None:
        now = time.perf_counter()
        self.progress.wall_seconds += now - self.session_start
        self.session_start = now

    def _end_epoch(self, metrics: Any, epoch: int) -> None:
        config, p = self.config, self.progress
        p.epoch_seconds.append(p.epoch_elapsed)
        p.epoch_elapsed = 0.0
        train_loss, train_acc = p.epoch_meter.means()
        p.epoch_meter = _Meter()
        p.final_train_loss = train_loss
        fields: dict[str, Any] = {"train_loss": train_loss, "train_acc": train_acc}
        last = epoch + 1 == config.epochs
        if (epoch + 1) % config.eval_every == 0 or last:
            test_loss, test_acc = self.evaluate()
            p.test_acc = test_acc
            p.best_test_acc = max(test_acc, p.best_test_acc or 0.0)
            fields |= {"test_loss": test_loss, "test_acc": test_acc}
        record = self._record("epoch", **fields)
        record["epoch_seconds"] = p.epoch_seconds[-1]
        _write_record(metrics, record)

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
            "bits": self.recipe.bits_summary(self.model),
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
    trainer = _Trainer(config, recipe)
    return trainer.run(out, resume)


def _check_same_run(saved: dict[str, Any], config: TrainConfig, recipe: Recipe) -> None:
    """A resumed run must keep its config (only ``quiet`` may change)."""
    saved_train = {**saved["train"], "quiet": config.quiet}
    if saved_train != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if saved_train.get(k) != v)
        raise TrainConfigError(f"cannot resume with changed train options: {changed}")
    if saved["recipe"] != recipe.name or saved["recipe_config"] != recipe.config.to_dict():
        raise TrainConfigError(
            f"cannot resume run of recipe {saved['recipe']} {saved['recipe_config']} with "
            f"{recipe.name} {recipe.config.to_dict()}"
        )
