"""The training loop: one for every recipe, driven only through the recipe hooks.

Each step, in order (``qtrain.recipes.base.Recipe`` documents every hook):
``schedule`` sets the step's precision on every quantized layer (the guard's floors stay
under it) → forward under the recipe's autocast → task loss + ``extra_loss`` → backward →
``before_optimizer_step`` → optimizer step → ``on_step_end`` (a changed model shape rebuilds
the optimizer) → ``sync``. ``metrics()`` goes into every logged record (its per-layer dicts
only into the change records); before each evaluation ``on_eval_start`` may set the precision
to evaluate at.

Every step is guarded against NaN/inf (``qtrain.guard``, docs/RELIABILITY.md): a fault is
reported with its layer and tensor role, and ``on_nonfinite`` stops the run, skips the step or
raises the layer's precision and retries. No checkpoint is written with a non-finite tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from qtrain.cost import CostMeter, StepCost, model_bits
from qtrain.guard import Fault, NumericalGuard
from qtrain.protocol import set_precision
from qtrain.quantizer import NonFiniteError
from qtrain.recipes.base import Recipe, StepResult
from qtrain.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    _atomic_write,
    _load_checkpoint_data,
    _rng_state,
    _set_rng_state,
    _verify_checkpoint,
    _write_checkpoint,
    _write_json,
    read_metrics,
    versions,
)
from qtrain.train.config import (
    RESUME_MUTABLE,
    NumericalFaultError,
    OutOfMemoryError,
    RunError,
    TrainConfig,
    TrainConfigError,
    _first_line,
    lr_factor,
)
from qtrain.train.run import (
    _Meter,
    autocast,
    build,
    evaluate,
    init_from_run,
    restore_model,
    task_loss,
)

# Attempts of one step: the first, one re-run with every layer checked to locate a fault, and
# precision raises (each layer at most 3: 4 -> 8 -> 16 bits -> float).
MAX_STEP_ATTEMPTS = 8


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
    if not resume and out.exists() and any(out.iterdir()):
        raise TrainConfigError(f"run directory {out} is not empty (resume it or choose another)")
    if resume and (out / CONFIG_FILE).exists():
        _check_same_run(json.loads((out / CONFIG_FILE).read_text()), config, recipe)
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


class _Trainer:
    """One run: data, model, optimizer, recipe and the bookkeeping around them."""

    def __init__(self, config: TrainConfig, recipe: Recipe) -> None:
        self.config = config
        self.recipe = recipe
        self.device = torch.device(config.device)
        self.dataset, self.model = build(config, recipe)
        self.optimizer = build_optimizer(config, recipe, self.model)
        self.scaler = recipe.grad_scaler(self.device.type)
        # Under a loss scaler, scaled gradients overflow on purpose: the scaler skips the step.
        self.guard = NumericalGuard(self.model, gradients=self.scaler is None)
        self.steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.progress = _Progress(params_initial=_params(self.model))
        self.checkpoint_entry: dict[str, Any] | None = None  # manifest entry of the file on disk

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
            changes = [r["metrics"] for r in kept if r["kind"] == "metrics"]
            self.last_metrics = changes[-1] if changes else None
        else:
            if config.init is not None:
                counts = init_from_run(self.model, config, self.dataset)
                if not config.quiet:
                    loaded, fresh = counts["loaded"], counts["fresh"]
                    message = f"init: {loaded} tensors from {config.init}, {fresh} fresh"
                    print(message + " (quantizer state)", file=sys.stderr)
            out.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
            self.last_metrics = None
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
                    self._write_events()
                    self._write_metric_changes()
                    finished = self.recipe.finished()
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
                        (config.checkpoint_every and p.step % config.checkpoint_every == 0)
                        or p.step == self.total_steps
                        or finished
                    ):
                        self._sync_wall()
                        self.save_checkpoint(checkpoint)
                    if finished:
                        return
        finally:
            bar.close()

    def _write_metric_changes(self) -> None:
        """The recipe's metrics of every step, written when they change (``"kind":
        "metrics"``; the record at step n holds those of the n-th step): a precision schedule
        is in metrics.jsonl step by step without a line per step."""
        metrics = self.recipe.metrics()
        if metrics and metrics != self.last_metrics:
            p = self.progress
            epoch = p.step / self.steps_per_epoch
            record = {"kind": "metrics", "step": p.step, "epoch": epoch, "metrics": metrics}
            _write_record(self.metrics, record)
            self.last_metrics = metrics

    def _write_events(self) -> None:
        for event in self.recipe.events():
            _write_record(self.metrics, {"kind": "recipe", "step": self.progress.step, **event})
            if not self.config.quiet:
                from tqdm.auto import tqdm

                text = ", ".join(f"{k}={v}" for k, v in event.items())
                tqdm.write(f"qtrain: {self.recipe.name}: {text}", file=sys.stderr)

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

    # ---- one step ----
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
            with autocast(recipe, self.device):
                logits = model(x)
            loss, correct = task_loss(logits, y, config.label_smoothing)
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
        recipe.sync()
        self.progress.cost += self.meter.pop()
        self.progress.step += 1
        return loss_value, int(correct_count)

    # ---- the guard's policies ----
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

    # ---- evaluation ----
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (``qtrain.train.run.evaluate``); not training cost."""
        with self.meter.paused():
            return evaluate(self.model, self.recipe, self.dataset, self.config.batch_size)

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
        restore_model(state, self.model, self.recipe, self.guard)
        self.optimizer = build_optimizer(self.config, self.recipe, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.progress = _Progress.from_dict(state["progress"])
        # Restored last: the RNG state must be exactly as it was after the checkpoint's step.
        _set_rng_state(state["rng"])

    def _kept_checkpoint(self, path: Path) -> str:
        if self.checkpoint_entry is None:
            return "no checkpoint was written"
        return f"{path} still holds step {self.checkpoint_entry['step']}"

    # ---- records ----
    def _record(self, kind: str, **fields: Any) -> dict[str, Any]:
        p = self.progress
        return {
            "kind": kind,
            "step": p.step,
            "epoch": p.step / self.steps_per_epoch,
            **fields,
            "lr": self.optimizer.param_groups[0]["lr"],
            # Per-layer dicts are in the change records ("kind": "metrics") alone.
            "metrics": scalar_metrics(self.recipe.metrics()),
            "params": _params(self.model),
            "bitops": p.cost.total_bitops,
            "bitops_fp32": p.cost.bitops_fp32,
            "wall_seconds": p.wall_seconds + (time.perf_counter() - self.session_start),
        }

    def _sync_wall(self) -> None:
        now = time.perf_counter()
        self.progress.wall_seconds += now - self.session_start
        self.session_start = now

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
            # Of bitops_train and the MACs: the normalisation layers' part.
            "bitops_norm": p.cost.norm_bitops,
            "macs_norm": p.cost.norm_macs,
            "energy_pj": p.cost.energy_pj,
            "params_initial": p.params_initial,
            "params_final": _params(self.model),
            "model_bits": int(model_bits(self.model)),
            "metrics": self.recipe.metrics(),
            "epoch_seconds": p.epoch_seconds,
            "wall_seconds": p.wall_seconds,
            "peak_memory_bytes": peak,
            "peak_memory_source": source,
            "device": str(self.device),
        }


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


# ---- what a step and a checkpoint carry ---------------------------------------------------


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


# ---- small helpers ------------------------------------------------------------------------


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


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A recipe's metrics without its per-layer dicts."""
    return {key: value for key, value in metrics.items() if not isinstance(value, dict)}


def _bar_postfix(bar: Any, record: dict[str, Any]) -> None:
    postfix = {"loss": f"{record['loss']:.3f}", "acc": f"{record['acc']:.3f}"}
    for key, value in record["metrics"].items():
        postfix.setdefault(key, f"{value:g}")
    postfix["img_s"] = f"{record['samples_per_second']:.0f}"
    bar.set_postfix(postfix, refresh=False)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


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


def _is_nonfinite(value: Any) -> bool:
    """A floating-point tensor holding NaN or inf."""
    return (
        torch.is_tensor(value)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _nonfinite_kind(tensor: torch.Tensor) -> str:
    return "nan" if bool(torch.isnan(tensor).any()) else "inf"
