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

With ``distributed`` (``ddp`` or ``fsdp``, one process per rank under torchrun) each rank
trains on its share of every global batch, through DDP or FSDP2 (``qtrain.distributed``);
after backward one collective sums the step's loss, counts and cost over the ranks and
averages the quantizers' state, before ``before_optimizer_step``, so every hook sees the
global step and the same state on every rank. Only rank 0 writes the run directory (FSDP2's
sharded checkpoint aside: each rank writes its shards). A NaN/inf stops a distributed run.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from qtrain import distributed
from qtrain.cost import CostMeter
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
    seed_everything,
    versions,
)
from qtrain.train.config import (
    CheckpointError,
    NumericalFaultError,
    OutOfMemoryError,
    RunError,
    TrainConfig,
    TrainConfigError,
    _first_line,
    lr_factor,
)
from qtrain.train.optim import _rebuild_optimizer, build_optimizer
from qtrain.train.progress import _Progress, _StepFault, _StepSnapshot
from qtrain.train.run import (
    _Meter,
    autocast,
    build,
    eval_batch_count,
    evaluate,
    evaluate_sums,
    init_from_run,
    restore_model,
    task_loss,
)
from qtrain.train.sharded import (
    _gathered_model,
    _load_sharded,
    _remove_unused_sharded,
    _save_sharded,
)
from qtrain.train.summary import _params, _run_summary
from qtrain.train.support import (
    _bar_postfix,
    _check_distributed,
    _check_same_run,
    _is_nonfinite,
    _is_out_of_memory,
    _nonfinite_kind,
    _progress_bar,
    _skip,
    _write_record,
    scalar_metrics,
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
    with distributed.session(config.distributed, config.device) as context:
        if not resume and out.exists() and any(out.iterdir()):
            raise TrainConfigError(
                f"run directory {out} is not empty (resume it or choose another)"
            )
        if resume and (out / CONFIG_FILE).exists():
            _check_same_run(json.loads((out / CONFIG_FILE).read_text()), config, recipe, context)
        if context is not None:
            context.barrier()  # every rank has looked at the directory before rank 0 writes
        return _train(config, recipe, out, resume, context)


def _train(
    config: TrainConfig,
    recipe: Recipe,
    out: Path,
    resume: bool,
    context: distributed.Context | None,
) -> dict[str, Any]:
    trainer: _Trainer | None = None
    try:
        trainer = _Trainer(config, recipe, context)
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

    def __init__(
        self, config: TrainConfig, recipe: Recipe, context: distributed.Context | None = None
    ) -> None:
        self.config = config
        self.recipe = recipe
        self.context = context  # None: a single process
        self.main = context is None or context.is_main  # the process that writes the run
        if context is None:
            self.device = torch.device(config.device)
            self.dataset, self.model = build(config, recipe)
        else:
            _check_distributed(config, recipe, context)
            self.device = context.device
            self.dataset, self.model = build(config.with_changes(device=str(self.device)), recipe)
        # The module the training forward runs through: DDP's wrapper around the model, or the
        # model itself (one process; FSDP2 shards it in place). Hooks always get the model.
        self.wrapped = self.model
        self.reshaped = False  # the model changed shape this step (a new DDP wrapper is due)
        self.optimizer = build_optimizer(config, recipe, self.model)
        self.scaler = recipe.grad_scaler(self.device.type)
        # Under a loss scaler, scaled gradients overflow on purpose: the scaler skips the step.
        self.guard = NumericalGuard(self.model, gradients=self.scaler is None)
        if context is None:
            self.steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        else:
            # Every rank runs the steps of the rank with the fewest examples.
            self.steps_per_epoch = len(self._loader(context.world_size - 1))
            # The model's initial weights are the seed's on every rank; what is drawn from now
            # on (stochastic rounding, dropout) differs per rank, reproducibly.
            seed_everything(distributed.rank_seed(config.seed, context.rank))
        self.total_steps = config.epochs * self.steps_per_epoch
        self.progress = _Progress(params_initial=_params(self.model))
        self.checkpoint_entry: dict[str, Any] | None = None  # manifest entry of the file on disk
        self.checkpoint_serial = 0  # numbers an FSDP2 run's sharded checkpoint directories

    # ---- distributed set-up ----
    def _loader(self, rank: int) -> Any:
        """Rank ``rank``'s share of the training batches: batch_size / world size examples of
        each global batch (``Dataset.train_loader``)."""
        config, world = self.config, self.context.world_size
        augment = self.dataset.default_augment if config.augment else None
        return self.dataset.train_loader(
            config.batch_size // world,
            seed=config.seed,
            augment=augment,
            rank=rank,
            world_size=world,
        )

    def _distribute(self) -> None:
        """Wrap the (restored) model for its ranks; the optimizer follows its parameters."""
        context = self.context
        if self.config.sync_batchnorm:
            distributed.to_sync_batchnorm(self.model)
        self.wrapped = distributed.wrap(self.model, context)
        self.optimizer = build_optimizer(self.config, self.recipe, self.model)
        # FSDP2's gradients are shards: the step's agreement checks them instead of the guard.
        self.guard.gradients = self.guard.gradients and context.mode == "ddp"
        self.guard.reattach()

    # ---- the loop ----
    def run(self, out: Path, resume: bool) -> dict[str, Any]:
        config = self.config
        self.out = out
        checkpoint = out / CHECKPOINT_FILE
        metrics_path = out / METRICS_FILE
        if resume and checkpoint.exists():
            self.load_checkpoint(checkpoint)
            kept = [r for r in read_metrics(out) if r["step"] <= self.progress.step]
            if self.main:
                text = "".join(json.dumps(r) + "\n" for r in kept)
                _atomic_write(metrics_path, lambda f: f.write(text.encode()))
            changes = [r["metrics"] for r in kept if r["kind"] == "metrics"]
            self.last_metrics = changes[-1] if changes else None
        else:
            if config.init is not None:
                counts = init_from_run(self.model, config, self.dataset)
                if not config.quiet and self.main:
                    loaded, fresh = counts["loaded"], counts["fresh"]
                    message = f"init: {loaded} tensors from {config.init}, {fresh} fresh"
                    print(message + " (quantizer state)", file=sys.stderr)
            if self.context is not None:
                self._distribute()
            if self.main:
                out.mkdir(parents=True, exist_ok=True)
                metrics_path.write_text("")
            self.last_metrics = None
        run_config = {
            "train": config.to_dict(),
            "recipe": self.recipe.name,
            "recipe_config": self.recipe.config.to_dict(),
            "versions": versions(),
        }
        if self.context is not None:
            run_config["distributed"] = self.context.describe()
        if self.main:
            _write_json(out / CONFIG_FILE, run_config)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter = CostMeter(self.model)
        self.session_start = time.perf_counter()
        # Only rank 0 writes records; the others build the same ones (metrics() may gather).
        self.metrics = open(metrics_path, "a") if self.main else None  # noqa: SIM115  (closed in finally)
        try:
            self._loop(checkpoint)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.meter.remove()
            self.guard.remove()
        summary = self.summary()
        if self.main:
            _write_json(out / SUMMARY_FILE, summary)
        return summary

    def _loop(self, checkpoint: Path) -> None:
        config, p = self.config, self.progress
        bar = _progress_bar(self.total_steps, p.step, config.quiet or not self.main)
        # Throughput of this session (not checkpointed: it is a timing, not a result); of all
        # ranks together in a distributed run.
        window_samples, window_clock = 0, time.perf_counter()
        try:
            while p.step < self.total_steps:
                epoch, first = divmod(p.step, self.steps_per_epoch)
                epoch_start = time.perf_counter() - p.epoch_elapsed
                for x, y in _skip(self._batches(epoch), first):
                    outcome = self._guarded_step(x, y)
                    samples = len(y)
                    if outcome is not None:
                        loss, correct, count, samples = outcome
                        p.window.add(loss, correct, count)
                        p.epoch_meter.add(loss, correct, count)
                    p.epoch_elapsed = time.perf_counter() - epoch_start
                    window_samples += samples
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

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of ``epoch``: this rank's share of them in a distributed run."""
        config = self.config
        if self.context is None:
            return self.dataset.train_batches(
                config.batch_size, epoch=epoch, seed=config.seed, augment=config.augment
            )
        return itertools.islice(self._loader(self.context.rank).epoch(epoch), self.steps_per_epoch)

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
            if not self.config.quiet and self.main:
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
    ) -> tuple[float, int, int, int]:
        """One step; raises ``_StepFault`` before the optimizer update if a NaN/inf shows.

        Returns the task loss (the batch's mean), correct predictions, targets and samples:
        of the global batch in a distributed run."""
        config, recipe, model, step = self.config, self.recipe, self.model, self.progress.step
        set_precision(model, recipe.schedule(step, self.total_steps))
        factor = lr_factor(config.schedule, step, self.total_steps, config.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.wrapped.train()
        guard = self.guard
        guard.start(step + 1, check_layers)
        try:
            with autocast(recipe, self.device):
                logits = self.wrapped(x)
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
        count, samples = y.numel(), len(y)
        if self.context is not None:
            loss_value, correct_count, count, samples = self._agree(
                loss_value, int(correct_count), count, samples
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # hooks see true gradients, not scaled ones
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            recipe.before_optimizer_step(step, model, self.optimizer)
            self.optimizer.step()
        result = StepResult(loss_value, int(correct_count), count)
        if recipe.on_step_end(step, result, model, self.optimizer):
            self.progress.cost += self.meter.pop()
            self.meter.remove()
            self.meter = CostMeter(model)
            self.guard.reattach()
            self.optimizer = _rebuild_optimizer(config, recipe, model, self.optimizer)
            self.reshaped = self.context is not None  # rewrapped once this step's graph is gone
        if self.context is None:
            recipe.sync()
        else:
            recipe.sync(dist.group.WORLD)
        self.progress.cost += self.meter.pop()
        self.progress.step += 1
        return loss_value, int(correct_count), count, samples

    def _agree(
        self, loss: float, correct: int, count: int, samples: int
    ) -> tuple[float, int, int, int]:
        """The distributed step's one collective (``qtrain.distributed.agree_step``): global
        loss, counts and cost; the quantizers' state averaged over the ranks."""
        check: list[torch.Tensor] = []
        if self.context.mode == "fsdp" and self.scaler is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            check = [distributed.local(grad) for grad in grads]
        totals = distributed.agree_step(
            self.model, loss, correct, count, samples, self.meter.pop(), self.device, check
        )
        self.progress.cost += totals.cost
        if not totals.gradients_finite:
            step = self.progress.step + 1
            raise _StepFault(Fault(step, "(gradients)", "", "a weight gradient", "nan or inf"))
        return totals.loss, totals.correct, totals.count, totals.samples

    def _rewrap(self) -> None:
        """The model changed shape (a recipe removed channels, at the same step on every
        rank: its decision reads parameters and state the ranks agree on): a new DDP wrapper
        for the new parameters (DDP checks that their shapes agree across the ranks).

        Called after the step's autograd graph is gone: the old wrapper's reducer and that
        graph hold the parameters' gradient accumulators, which remember the old shapes."""
        if self.context.mode != "ddp":
            raise RunError(
                f"recipe {self.recipe.name} changed the model's shape, which FSDP2's shards "
                "cannot follow; use --distributed ddp"
            )
        self.wrapped = self.model
        gc.collect()
        self.wrapped = distributed.wrap(self.model, self.context)
        self.reshaped = False

    # ---- the guard's policies ----
    def _guarded_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int, int] | None:
        """A training step under ``on_nonfinite``; returns None when the step was skipped.

        A fault is found before the optimizer update; the step's buffers, RNG streams and cost
        are then rolled back, so the model is exactly as before the step. A fault seen by the
        every-step checks (loss, weight gradients, a quantizer's NaN/inf error) on a step
        without per-layer checks is located by running the step again with them. A
        distributed run stops at its first fault (the ranks would have to agree on each retry).
        """
        every = self.config.check_every
        check_layers = every > 0 and self.progress.step % every == 0
        if self.context is not None:
            try:
                result = self._train_step(x, y, check_layers)
            except _StepFault as signal:
                self._report_fault(signal.fault, "stop")
                self._stop(signal.fault, "a distributed run stops at a NaN/inf")
            if self.reshaped:
                self._rewrap()
            return result
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
        """Checkpoint the state from before the faulty step, then raise NumericalFaultError.

        A distributed run keeps its last checkpoint: writing one takes every rank, and a rank
        that met the fault alone is not in step with the others."""
        path = self.out / CHECKPOINT_FILE
        if self.context is not None:
            message = f"{fault}; training stopped ({reason}); {self._kept_checkpoint(path)}"
            raise NumericalFaultError(message, fault)
        try:
            self._sync_wall()
            self.save_checkpoint(path)
            kept = f"{path} holds step {self.progress.step}"
        except NumericalFaultError as refused:
            kept = str(refused)
        raise NumericalFaultError(f"{fault}; training stopped ({reason}); {kept}", fault)

    def _state_fault(self) -> Fault | None:
        """The first non-finite tensor of the model's or the optimizer's state (this rank's
        shards of it under FSDP2)."""
        step = self.progress.step
        for key, tensor in self.model.state_dict().items():
            if _is_nonfinite(distributed.local(tensor)):
                layer, _, role = key.rpartition(".")
                module = type(self.model.get_submodule(layer)).__name__
                return Fault(step, layer, module, role, _nonfinite_kind(tensor), persistent=True)
        names = {param: name for name, param in self.model.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, tensor in state.items():
                if _is_nonfinite(distributed.local(tensor)):
                    role = f"optimizer {key} of {names.get(param, 'a parameter')}"
                    kind = _nonfinite_kind(distributed.local(tensor))
                    return Fault(step, "(optimizer)", "", role, kind, persistent=True)
        return None

    # ---- evaluation ----
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (``qtrain.train.run.evaluate``); not training cost.

        Distributed: rank r evaluates test batches r, r + world size, ... (the batches of a
        single process), and the sums are added over the ranks."""
        config, context = self.config, self.context
        with self.meter.paused():
            if context is None:
                return evaluate(self.model, self.recipe, self.dataset, config.batch_size)
            batches = eval_batch_count(self.dataset, config.batch_size)
            mine = range(context.rank, batches, context.world_size)
            idle = -(-batches // context.world_size) - len(mine) if context.mode == "fsdp" else 0
            total = evaluate_sums(
                self.model, self.recipe, self.dataset, config.batch_size, mine, idle
            )
            loss_sum, correct, count = distributed.all_sum(
                [total.loss_sum, total.correct, total.count], self.device
            )
            return loss_sum / max(count, 1), correct / max(count, 1)

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

        Distributed: every rank takes part (the RNG streams of every rank are gathered; FSDP2
        gathers the model and writes its sharded state) and rank 0 writes ``checkpoint.pt``:
        the model whole, as ``load_run`` reads it; DDP's optimizer state (the same on every
        rank); under FSDP2 the sharded model and optimizer state (``torch.distributed
        .checkpoint``, a directory under ``checkpoint.dcp/`` that the manifest names with its
        checksum); and ``distributed``: the mode, world size and each rank's RNG state.
        """
        context = self.context
        fault = self._state_fault()
        if context is not None and context.mode == "fsdp":  # each rank saw its shards only
            (faulty,) = distributed.all_sum([float(fault is not None)], self.device)
            if faulty and fault is None:
                kind = "nan or inf"
                fault = Fault(self.progress.step, "(another rank)", "", "state", kind, True)
        if fault is not None:
            raise NumericalFaultError(
                f"{fault}: refusing to write a checkpoint with it; {self._kept_checkpoint(path)}",
                fault,
            )
        state = {
            "format": 1,
            "model": self.model.state_dict() if context is None else None,
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "recipe": self.recipe.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": _rng_state(),
            "progress": self.progress.to_dict(),
        }
        sharded = None
        if context is not None:
            rng = distributed.gather_objects(state["rng"])
            state["distributed"] = {**context.describe(), "rng": rng}
            if context.mode == "ddp":
                state["model"] = self.model.state_dict()
            else:
                sharded = _save_sharded(
                    path.parent,
                    self.progress.step,
                    self.checkpoint_serial,
                    self.model,
                    self.optimizer,
                    context,
                )
                self.checkpoint_serial += 1
                state["model"], state["optimizer"] = _gathered_model(self.model), {}
        if not self.main:
            self.checkpoint_entry = {"step": self.progress.step}
            return
        # A resumed run keeps the metrics up to the checkpoint's step: they must be durable first.
        self.metrics.flush()
        os.fsync(self.metrics.fileno())
        self.checkpoint_entry = _write_checkpoint(
            path, state, self.progress.step, self.checkpoint_entry, sharded
        )
        if sharded is not None:
            _remove_unused_sharded(path.parent, self.checkpoint_entry["sharded"])

    def load_checkpoint(self, path: Path) -> None:
        self.checkpoint_entry = _verify_checkpoint(path)
        # On the CPU: RNG states must be CPU tensors; model and optimizer copy to their device.
        state = _load_checkpoint_data(path)
        context = self.context
        saved = state.get("distributed")
        if context is not None:
            world = saved["world_size"] if saved else 1
            if world != context.world_size:
                raise CheckpointError(
                    f"{path} was written by {world} process(es); resume it with as many "
                    f"(this run has {context.world_size}): each rank's data and random "
                    "streams are the run's own"
                )
        # The model as saved (whole), then wrapped for the ranks: restore_model may replay a
        # recipe's structural changes, which a wrapper or FSDP2's shards cannot follow.
        restore_model(state, self.model, self.recipe, self.guard)
        if context is not None:
            self._distribute()
        self.optimizer = build_optimizer(self.config, self.recipe, self.model)
        sharded = (self.checkpoint_entry or {}).get("sharded")
        if context is not None and context.mode == "fsdp":
            _load_sharded(path.parent, sharded, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.progress = _Progress.from_dict(state["progress"])
        if sharded is not None:
            self.checkpoint_serial = int(sharded["serial"])
        # Restored last: the RNG state must be exactly as it was after the checkpoint's step.
        _set_rng_state(state["rng"] if context is None else saved["rng"][context.rank])

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
        self._sync_wall()
        return _run_summary(self.config, self.recipe, self.model, self.progress, self.device)
