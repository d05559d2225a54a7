"""Every recipe hook through a toy recipe on a tiny run: the trainer calls each one where the
Recipe docstring says, and what a hook returns reaches the layers, the optimizer, the files
and a resumed run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qtrain
from qtrain import GemmConfig, Observer, Precision, QuantizedTrainingConfig, QuantSpec, formats
from qtrain.protocol import quantized_layers
from qtrain.recipes import Recipe, RecipeConfig, StepResult
from qtrain.train import (
    CHECKPOINT_FILE,
    SUMMARY_FILE,
    TIMING_KEYS,
    TrainConfig,
    lr_factor,
    read_checkpoint,
    read_metrics,
    train,
)
from qtrain.train.loop import _bar_postfix

# 256 examples of 1×8×8 in 4 classes, batch 32: 8 steps per epoch. The cnn at width 4 has the
# convs 0.0, 2.0, 4.0 (each followed by a BN) and the linear 7.
STEPS_PER_EPOCH = 8
LAYERS = ("0.0", "2.0", "4.0", "7")
BITS = (8, 6, 4)  # the toy schedule's cycle


def tiny_config(**changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        model="cnn",
        data="synthetic",
        epochs=1,
        width=4,
        batch_size=32,
        log_every=2,
        quiet=True,
        data_kwargs={"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4},
    )
    return TrainConfig(**{**options, **changes})


def int_gemm(bits: int = 8) -> GemmConfig:
    spec = QuantSpec(formats.Int(bits))
    return GemmConfig(spec, spec, spec, spec)


def spec_bits(layer: nn.Module) -> tuple[float, ...]:
    """The bits a layer computes at now: input, weight, grad-input and grad-weight operands."""
    config = layer.config
    specs = (config.input_spec, config.weight_spec, config.grad_input_spec, config.grad_weight_spec)
    return tuple(spec.bits for spec in specs)


class Toy(Recipe):
    """Quantizes every conv/linear to 8-bit integers and records, per training step (the step
    its ``schedule`` was last asked for) and per evaluation, the bits each layer computed at.

    Subclasses override the hook under test. Not registered: the trainer needs no registry.
    ``crash_at``: the step whose ``schedule`` raises KeyboardInterrupt (a kill).
    """

    name = "toy"
    observers: dict[str, Any] | None = None

    def __init__(self, config: RecipeConfig | None = None, *, crash_at: int | None = None) -> None:
        super().__init__(config)
        self.crash_at = crash_at
        self.step = -1
        self.train_bits: dict[int, dict[str, tuple[float, ...]]] = {}  # the step's last attempt
        self.eval_bits: list[dict[str, tuple[float, ...]]] = []  # one per evaluation batch

    def prepare(self, model: nn.Module) -> nn.Module:
        config = QuantizedTrainingConfig(int_gemm(), observers=self.observers)
        model = qtrain.quantize_(model, config)
        self.model = model
        for name, layer in quantized_layers(model):
            layer.register_forward_pre_hook(self._recorder(name))
        return model

    def _recorder(self, name: str) -> Any:
        def record(layer: nn.Module, args: Any) -> None:
            if layer.training:
                self.train_bits.setdefault(self.step, {})[name] = spec_bits(layer)
            else:
                if name == LAYERS[0]:
                    self.eval_bits.append({})
                self.eval_bits[-1][name] = spec_bits(layer)

        return record

    def schedule(self, step: int, total_steps: int) -> Precision | None:
        # Not pure, as a schedule should be: the recorder needs to know which step runs.
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        self.step = step
        return None


def uniform(bits: float) -> dict[str, tuple[float, ...]]:
    return {name: (bits,) * 4 for name in LAYERS}


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def checkpoint_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / CHECKPOINT_FILE)["model"]


def interrupted_then_resumed(
    config: TrainConfig, recipe: type[Toy], crash_at: int, run_dir: Path
) -> tuple[dict[str, Any], Toy]:
    """Train until a hook raises at step ``crash_at``, then resume with a fresh recipe."""
    with pytest.raises(KeyboardInterrupt):
        train(config, recipe(crash_at=crash_at), run_dir)
    resumed = recipe()
    return train(config, resumed, run_dir, resume=True), resumed


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights (and observer buffers) and identical records."""
    expected, got = checkpoint_model(a), checkpoint_model(b)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_timings(read_metrics(a)) == without_timings(read_metrics(b))


# ---- schedule --------------------------------------------------------------------------------


class Cyclic(Toy):
    """Every layer's bits cycle through ``BITS``, one bit-width a step."""

    def schedule(self, step: int, total_steps: int) -> Precision:
        super().schedule(step, total_steps)
        bits = BITS[step % len(BITS)]
        return Precision(forward=bits, backward=bits)


def test_schedule_sets_every_quantized_layers_bits_each_step(tmp_path: Path) -> None:
    recipe = Cyclic()
    train(tiny_config(epochs=2), recipe, tmp_path)
    steps = 2 * STEPS_PER_EPOCH
    assert recipe.train_bits == {s: uniform(BITS[s % len(BITS)]) for s in range(steps)}


# ---- extra loss ------------------------------------------------------------------------------


class WeightPenalty(Toy):
    """A strong L2 penalty on every weight, through the objective only."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return sum(layer.weight.square().sum() for _, layer in quantized_layers(model))


def test_extra_loss_enters_the_objective_but_not_the_recorded_loss(tmp_path: Path) -> None:
    plain, penalised = Toy(), WeightPenalty()
    train(tiny_config(), plain, tmp_path / "plain")
    train(tiny_config(), penalised, tmp_path / "penalised")

    def weight_norm(run_dir: Path) -> float:
        model = checkpoint_model(run_dir)
        return sum(float(model[f"{name}.weight"].norm()) for name in LAYERS)

    assert weight_norm(tmp_path / "penalised") < 0.5 * weight_norm(tmp_path / "plain")
    # The records hold the task loss, which the penalty does not include: cross-entropy of 4
    # classes starts near log(4) whatever the penalty.
    first = next(r for r in read_metrics(tmp_path / "penalised") if r["kind"] == "step")
    assert first["loss"] < 2 * math.log(4)


# ---- per-layer learning rates ----------------------------------------------------------------


class TwoLearningRates(Toy):
    """Convolutions at a peak lr of 0.02, the rest at 0.2; records every group's lr per step."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[list[float]] = []

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        convs = [p for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
        rest = [p for p in model.parameters() if all(p is not c for c in convs)]
        return [{"params": convs, "lr": 0.02}, {"params": rest, "lr": 0.2}]

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def test_param_groups_follow_the_schedule_times_their_own_peak(tmp_path: Path) -> None:
    recipe = TwoLearningRates()
    config = tiny_config(epochs=2, schedule="onecycle", warmup_fraction=0.25)
    train(config, recipe, tmp_path)
    total = 2 * STEPS_PER_EPOCH
    factors = [lr_factor("onecycle", s, total, 0.25) for s in range(total)]
    assert recipe.lrs == [[0.02 * f, 0.2 * f] for f in factors]
    assert max(lr for lrs in recipe.lrs for lr in lrs) == pytest.approx(0.2)


# ---- the order of the per-step hooks, and sync -----------------------------------------------


class Logged(Toy):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def schedule(self, step: int, total_steps: int) -> None:
        self.calls.append("schedule")
        return super().schedule(step, total_steps)

    def extra_loss(self, model: nn.Module) -> None:
        self.calls.append("extra_loss")

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        self.calls.append("before_optimizer_step")

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        assert 0 <= result.correct <= result.count == 32 and math.isfinite(result.loss)
        self.calls.append("on_step_end")
        return False

    def sync(self, process_group: Any = None) -> None:
        assert process_group is None  # single process
        self.calls.append("sync")

    def on_eval_start(self, model: nn.Module) -> None:
        assert model is self.model
        self.calls.append("on_eval_start")


def test_per_step_hooks_run_in_the_documented_order_with_sync_after_every_step(
    tmp_path: Path,
) -> None:
    recipe = Logged()
    train(tiny_config(), recipe, tmp_path)
    step = ["schedule", "extra_loss", "before_optimizer_step", "on_step_end", "sync"]
    assert recipe.calls == step * STEPS_PER_EPOCH + ["on_eval_start"]


# ---- on_eval_start ---------------------------------------------------------------------------


class EvalAtEight(Toy):
    """Trains at 4 bits; evaluates at 8 (CPT's evaluation at b_max)."""

    def schedule(self, step: int, total_steps: int) -> Precision:
        super().schedule(step, total_steps)
        return Precision(forward=4, backward=4)

    def on_eval_start(self, model: nn.Module) -> Precision:
        return Precision(forward=8, backward=8)


class EvalAsTrained(EvalAtEight):
    def on_eval_start(self, model: nn.Module) -> None:
        return None


def test_on_eval_start_precision_holds_for_the_evaluation_only(tmp_path: Path) -> None:
    recipe = EvalAtEight()
    train(tiny_config(epochs=2), recipe, tmp_path)  # an evaluation between two epochs
    assert len(recipe.eval_bits) == 2 * 2  # two evaluations of the 64 test examples
    assert all(bits == uniform(8) for bits in recipe.eval_bits)
    # The schedule sets the training precision again on the step after an evaluation.
    assert set(recipe.train_bits) == set(range(2 * STEPS_PER_EPOCH))
    assert all(bits == uniform(4) for bits in recipe.train_bits.values())


def test_on_eval_start_none_evaluates_at_the_current_precision(tmp_path: Path) -> None:
    recipe = EvalAsTrained()
    train(tiny_config(), recipe, tmp_path)
    assert recipe.eval_bits and all(bits == uniform(4) for bits in recipe.eval_bits)


# ---- metrics ---------------------------------------------------------------------------------


class Counting(Cyclic):
    """Reports the bits of the step just done and how many steps it has seen."""

    def __init__(self, config: RecipeConfig | None = None, *, crash_at: int | None = None) -> None:
        super().__init__(config, crash_at=crash_at)
        self.steps_seen = 0

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        self.steps_seen += 1
        return False

    def metrics(self) -> dict[str, float]:
        return {"fw_bits": BITS[self.step % len(BITS)], "steps_seen": self.steps_seen}


def test_metrics_reach_every_record_and_the_summary(tmp_path: Path) -> None:
    summary = train(tiny_config(), Counting(), tmp_path)
    records = [r for r in read_metrics(tmp_path) if r["kind"] in ("step", "epoch")]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 8]
    for record in records:
        step = record["step"]
        assert record["metrics"] == {"fw_bits": BITS[(step - 1) % 3], "steps_seen": step}
        assert "bits" not in record
    assert summary["metrics"] == {"fw_bits": BITS[7 % 3], "steps_seen": 8}
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["metrics"] == summary["metrics"]


def test_progress_bar_shows_the_metrics() -> None:
    class Bar:
        def set_postfix(self, postfix: dict[str, str], refresh: bool) -> None:
            self.postfix = postfix

    bar = Bar()
    record = {"loss": 0.5, "acc": 0.75, "samples_per_second": 1000.0}
    _bar_postfix(bar, {**record, "metrics": {"fw_bits": 6, "clip": 0.25}})
    assert bar.postfix == {
        "loss": "0.500",
        "acc": "0.750",
        "fw_bits": "6",
        "clip": "0.25",
        "img_s": "1000",
    }


# ---- state for resume ------------------------------------------------------------------------


class Stateful(Toy):
    """State that decides the training: a loss average (scaling a weight penalty) and a count
    of steps (choosing the bits). Lost or stale state on resume would change the weights."""

    def __init__(self, config: RecipeConfig | None = None, *, crash_at: int | None = None) -> None:
        super().__init__(config, crash_at=crash_at)
        self.loss_average = torch.tensor(0.0)
        self.steps_seen = 0

    def schedule(self, step: int, total_steps: int) -> Precision:
        super().schedule(step, total_steps)
        bits = 8 if self.steps_seen % 2 else 6
        return Precision(forward=bits, backward=bits)

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        weight = model.get_submodule("7").weight
        return 1e-2 * self.loss_average * weight.square().sum()

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        self.loss_average = 0.9 * self.loss_average + 0.1 * result.loss
        self.steps_seen += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"loss_average": self.loss_average.clone(), "steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.loss_average = state["loss_average"].clone()
        self.steps_seen = state["steps_seen"]


def test_recipe_state_survives_a_kill_and_resume_bit_exactly(tmp_path: Path) -> None:
    config = tiny_config(epochs=2, checkpoint_every=5)
    straight = Stateful()
    expected = train(config, straight, tmp_path / "straight")
    resumed_summary, resumed = interrupted_then_resumed(config, Stateful, 12, tmp_path / "resumed")

    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert resumed.steps_seen == straight.steps_seen == 2 * STEPS_PER_EPOCH
    assert torch.equal(resumed.loss_average, straight.loss_average)
    assert resumed_summary["test_acc"] == expected["test_acc"]
    saved = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["recipe"]
    assert saved["steps_seen"] == 2 * STEPS_PER_EPOCH


# ---- observers -------------------------------------------------------------------------------


class CountingObserver(Observer):
    """Counts the training batches it was asked about; the spec's own rule measures them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> None:
        if self.training:
            self.calls += 1
        return None


class Observed(Toy):
    observers = {"weight": CountingObserver}


def test_observer_state_survives_a_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(epochs=2, checkpoint_every=5)
    train(config, Observed(), tmp_path / "straight")
    interrupted_then_resumed(config, Observed, 9, tmp_path / "resumed")

    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    counts = checkpoint_model(tmp_path / "resumed")
    # One weight quantization per training step and layer; none in evaluation.
    for name in LAYERS:
        assert int(counts[f"{name}.observers.weight.calls"]) == 2 * STEPS_PER_EPOCH


# ---- the guard's floor under a schedule ------------------------------------------------------


class FourBitsWithAFault(Toy):
    """Schedules 4 bits every step; a NaN appears in layer 2.0's output on the first attempt
    of step ``FAULT_STEP``."""

    FAULT_STEP = 3

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        self.fired = False
        # Registered before the trainer's guard hooks the layer, so the guard sees the NaN.
        model.get_submodule("2.0").register_forward_hook(self._plant)
        return model

    def _plant(self, layer: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.step != self.FAULT_STEP or self.fired or not layer.training:
            return None
        self.fired = True
        planted = output.detach().clone()
        planted.view(-1)[0] = math.nan
        return planted

    def schedule(self, step: int, total_steps: int) -> Precision:
        super().schedule(step, total_steps)
        return Precision(forward=4, backward=4)


def test_raised_precision_floor_outlasts_the_schedule_and_survives_resume(tmp_path: Path) -> None:
    config = tiny_config(
        epochs=2, on_nonfinite="raise-precision", check_every=1, checkpoint_every=5
    )
    straight = FourBitsWithAFault()
    train(config, straight, tmp_path / "straight")
    _, resumed = interrupted_then_resumed(config, FourBitsWithAFault, 7, tmp_path / "resumed")

    (fault,) = [r for r in read_metrics(tmp_path / "straight") if r["kind"] == "fault"]
    assert (fault["layer"], fault["role"], fault["action"]) == ("2.0", "output", "raise-precision")
    raised = {**uniform(4), "2.0": (8,) * 4}  # the schedule still says 4 for every layer
    step = FourBitsWithAFault.FAULT_STEP
    assert all(straight.train_bits[s] == uniform(4) for s in range(step))
    assert all(straight.train_bits[s] == raised for s in range(step, 2 * STEPS_PER_EPOCH))
    # The resumed run started from the checkpoint of step 5, after the raise.
    assert sorted(resumed.train_bits) == list(range(5, 2 * STEPS_PER_EPOCH))
    assert all(bits == raised for bits in resumed.train_bits.values())
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
