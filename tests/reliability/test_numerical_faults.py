"""NaN/inf planted in each tensor role of a training run: where and when it is reported, and
what each ``on_nonfinite`` policy does. No fault ever leaves a non-finite checkpoint behind."""

from __future__ import annotations

import math
from math import inf
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import LAYER, faulty
from torch import nn

from qtrain import QuantSpec, formats
from qtrain.guard import Fault, NumericalGuard
from qtrain.ops import GemmConfig, raised_config
from qtrain.train import (
    CHECKPOINT_FILE,
    TIMING_KEYS,
    NumericalFaultError,
    TrainConfig,
    TrainConfigError,
    read_checkpoint,
    read_metrics,
    train,
)

ROLES = ("input", "weight", "output", "grad_output", "grad_weight", "loss")


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def faults(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "fault"]


def finite_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The run's checkpoint (checksum verified) after checking every tensor in it is finite."""
    state = read_checkpoint(run_dir / CHECKPOINT_FILE)
    tensors = list(state["model"].values()) + [
        v for s in state["optimizer"]["state"].values() for v in s.values()
    ]
    assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    return state


# ---- detection and the stop policy ----------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("role", ROLES)
def test_fault_is_reported_with_its_layer_role_and_step_and_stops_cleanly(
    tmp_path: Path, tiny_config: Any, role: str, value: float
) -> None:
    config = tiny_config(checkpoint_every=4, check_every=1)
    run = tmp_path / "run"
    with pytest.raises(NumericalFaultError) as caught:
        train(config, faulty(role=role, at_step=5, value=value), run)

    fault = caught.value.fault
    layer, module = ("(loss)", "") if role == "loss" else (LAYER, "QConv2d")
    # The first record of NaN/inf: the planted tensor itself, at the step it was planted.
    assert (fault.layer, fault.module, fault.role, fault.step) == (layer, module, role, 6)
    assert fault.value == ("nan" if math.isnan(value) else "inf")
    message = str(caught.value)
    assert f"the {role}" in message and "at step 6" in message and "on_nonfinite=stop" in message
    assert role == "loss" or f"layer '{LAYER}'" in message
    (record,) = faults(run)
    assert (record["layer"], record["role"], record["action"]) == (layer, role, "stop")

    state = finite_checkpoint(run)
    if role == "weight":
        # The weight itself is NaN/inf now: no checkpoint of it, the one of step 4 stays.
        assert "refusing to write a checkpoint" in message
        assert state["progress"]["step"] == 4
    else:
        # The state from before the faulty step: resuming starts right at it.
        assert state["progress"]["step"] == 5


@pytest.mark.parametrize(("recipe_name", "role"), [("fp32", "input"), ("sbm8", "grad_output"),
                                                  ("sbm8", "output")])  # fmt: skip
def test_fault_on_a_step_without_layer_checks_is_located_by_running_it_again(
    tmp_path: Path, tiny_config: Any, recipe_name: str, role: str
) -> None:
    # check_every=0: only the loss, the weight gradients and the quantizers see the fault
    # (fp32: a NaN loss; sbm8: a quantizer's NonFiniteError); the step is re-run checked.
    recipe = faulty(recipe_name, role=role, at_step=3)
    with pytest.raises(NumericalFaultError) as caught:
        train(tiny_config(check_every=0), recipe, tmp_path / "run")
    assert (caught.value.fault.layer, caught.value.fault.role) == (LAYER, role)
    assert recipe.attempts == 2


def test_transient_fault_that_does_not_come_back_is_recorded_and_training_goes_on(
    tmp_path: Path, tiny_config: Any
) -> None:
    recipe = faulty(role="output", at_step=3, times=1)
    summary = train(tiny_config(check_every=0), recipe, tmp_path / "run")
    assert summary["steps"] == 8 and recipe.attempts == 2
    (record,) = faults(tmp_path / "run")
    # The first attempt met it in a quantizer of a later layer; the checked re-run did not.
    assert (record["step"], record["layer"], record["action"]) == (4, "(unlocated)", "retried")


@pytest.mark.parametrize(
    ("corrupt_at", "checkpoint_every"),
    [(4, 2), (5, 4)],
    ids=["seen-by-the-checkpoint-after-step-6", "seen-by-the-evaluation-after-step-8"],
)
def test_fault_in_state_that_no_loss_sees_never_reaches_a_checkpoint(
    tmp_path: Path, tiny_config: Any, corrupt_at: int, checkpoint_every: int
) -> None:
    # Training-mode BN uses batch statistics: a NaN running variance reaches no training loss.
    recipe = faulty(role="none", corrupt_buffer_at=corrupt_at)
    with pytest.raises(NumericalFaultError, match="refusing to write a checkpoint") as caught:
        train(tiny_config(checkpoint_every=checkpoint_every), recipe, tmp_path / "run")
    assert (caught.value.fault.layer, caught.value.fault.role) == ("2.1", "running_var")
    assert finite_checkpoint(tmp_path / "run")["progress"]["step"] == 4


# ---- skip and raise-precision ----------------------------------------------------------------


def test_skip_drops_the_faulty_step_and_training_goes_on(tmp_path: Path, tiny_config: Any) -> None:
    config = tiny_config(on_nonfinite="skip", check_every=1, optimizer="adamw")
    summary = train(config, faulty(role="output", at_step=3), tmp_path / "run")

    assert summary["steps"] == 8
    (record,) = faults(tmp_path / "run")
    assert (record["step"], record["layer"], record["action"]) == (4, LAYER, "skip")
    state = finite_checkpoint(tmp_path / "run")
    # 7 updates, and the skipped step's forward left no trace in the running statistics.
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {7.0}
    assert int(state["model"]["0.1.num_batches_tracked"]) == 7


def test_raise_precision_raises_the_layer_and_retries_the_step(
    tmp_path: Path, tiny_config: Any
) -> None:
    config = tiny_config(on_nonfinite="raise-precision", check_every=1)
    recipe = faulty(role="grad_output", at_step=3, times=1)
    summary = train(config, recipe, tmp_path / "run")

    assert summary["steps"] == 8 and recipe.attempts == 2  # step 4 ran twice
    (record,) = faults(tmp_path / "run")
    assert (record["layer"], record["role"]) == (LAYER, "grad_output")
    assert record["action"] == "raise-precision"
    gemm = recipe.model.get_submodule(LAYER).config
    # sbm8: 8-bit input/weight/g_l -> 16 bits; the 16-bit grad-weight copy -> float.
    assert gemm.input_spec.bits == gemm.weight_spec.bits == gemm.grad_input_spec.bits == 16
    assert gemm.grad_weight_spec is None
    state = finite_checkpoint(tmp_path / "run")
    assert state["guard"]["raised"] == {LAYER: 1}
    # The floor the raise set: 16-bit operands, a float grad-weight copy (checkpointed so that
    # a resumed run, whatever its schedule, computes at it).
    floor = {"input_spec": 16, "weight_spec": 16, "grad_input_spec": 16, "grad_weight_spec": inf}
    assert state["guard"]["floors"] == {LAYER: floor}
    assert int(state["model"]["2.1.num_batches_tracked"]) == 8  # the retry counted once


def test_raise_precision_stops_once_the_layer_is_full_precision(
    tmp_path: Path, tiny_config: Any
) -> None:
    config = tiny_config(on_nonfinite="raise-precision", check_every=1)
    with pytest.raises(NumericalFaultError, match="no quantized operand to raise"):
        train(config, faulty(role="output", at_step=3), tmp_path / "run")
    actions = [r["action"] for r in faults(tmp_path / "run")]
    assert actions == ["raise-precision", "raise-precision", "stop"]  # 8 -> 16 bits -> float


@pytest.mark.parametrize(("recipe_name", "layer"), [("sbm8", "2.1"), ("fp32", LAYER)])
def test_raise_precision_stops_at_a_layer_without_quantized_operands(
    tmp_path: Path, tiny_config: Any, recipe_name: str, layer: str
) -> None:
    config = tiny_config(on_nonfinite="raise-precision", check_every=1)
    with pytest.raises(NumericalFaultError, match=f"{layer} has no quantized operand"):
        train(config, faulty(recipe_name, layer=layer, role="output", at_step=3), tmp_path / "r")


@pytest.mark.parametrize("policy", ["skip", "raise-precision"])
def test_a_non_finite_weight_stops_every_policy(
    tmp_path: Path, tiny_config: Any, policy: str
) -> None:
    config = tiny_config(on_nonfinite=policy, check_every=1)
    with pytest.raises(NumericalFaultError, match="cannot repair a non-finite weight"):
        train(config, faulty(role="weight", at_step=3), tmp_path / "run")


# ---- resume ----------------------------------------------------------------------------------


def test_stopped_run_resumes_with_another_policy(tmp_path: Path, tiny_config: Any) -> None:
    run = tmp_path / "run"
    with pytest.raises(NumericalFaultError):
        train(tiny_config(), faulty(role="input", at_step=5), run)
    again = faulty(role="input", at_step=5)
    summary = train(tiny_config(on_nonfinite="skip"), again, run, resume=True)
    assert summary["steps"] == 8
    # Records after the checkpoint's step are dropped on resume: the stop's too.
    assert [r["action"] for r in faults(run)] == ["skip"]


def test_raised_precision_is_restored_on_resume(tmp_path: Path, tiny_config: Any) -> None:
    config = tiny_config(
        epochs=2, on_nonfinite="raise-precision", check_every=1, checkpoint_every=4
    )
    fault = dict(role="output", at_step=3, times=1)
    train(config, faulty(**fault), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, faulty(**fault, crash_at=10), tmp_path / "resumed")
    train(config, faulty(**fault), tmp_path / "resumed", resume=True)

    expected = read_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)
    got = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)
    assert got["guard"] == expected["guard"]
    assert got["guard"]["raised"] == {LAYER: 1}
    assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])
    assert without_timings(read_metrics(tmp_path / "resumed")) == without_timings(
        read_metrics(tmp_path / "straight")
    )


# ---- the guard on its own --------------------------------------------------------------------


def test_guard_reports_the_first_non_finite_tensor_in_computation_order() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda m, a, out: out / 0)  # ±inf from layer 0 onwards
    guard = NumericalGuard(model)
    guard.start(step=7, layers=True)
    model(torch.randn(3, 4)).sum().backward()
    guard.record_parameter_gradients()
    assert guard.first_fault() == Fault(7, "0", "Linear", "output", "inf")
    guard.remove()


def test_guard_records_nothing_on_unchecked_steps_but_parameter_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    guard = NumericalGuard(model)
    guard.start(step=1, layers=False)
    model(torch.full((1, 4), math.inf)).sum().backward()
    guard.record_parameter_gradients()
    assert guard.first_fault() == Fault(1, "0", "Linear", "grad_weight", "inf")


@pytest.mark.parametrize(
    ("spec", "raised_bits"),
    [(QuantSpec(formats.Int(4)), 8), (QuantSpec(formats.Int(8)), 16),
     (QuantSpec(formats.Int(16)), None), (QuantSpec(formats.FP8_E4M3), None),
     (QuantSpec(formats.BlockFloat(4, block_size=8)), None)],
)  # fmt: skip
def test_raised_config_doubles_integer_bits_then_falls_back_to_float(
    spec: QuantSpec, raised_bits: int | None
) -> None:
    raised = raised_config(GemmConfig(spec, spec, spec, None))
    assert raised is not None and raised.grad_weight_spec is None
    for field in ("input_spec", "weight_spec", "grad_input_spec"):
        got = getattr(raised, field)
        assert (None if got is None else got.bits) == raised_bits
    assert raised_config(GemmConfig()) is None


def test_raised_config_keeps_saved_levels_only_up_to_8_bits() -> None:
    spec = QuantSpec(formats.Int(4))
    assert raised_config(GemmConfig(spec, spec, save_quantized_input=True)).save_quantized_input
    spec8 = QuantSpec(formats.Int(8))
    assert not raised_config(GemmConfig(spec8, save_quantized_input=True)).save_quantized_input


def test_policy_and_check_every_are_validated(tiny_config: Any) -> None:
    with pytest.raises(TrainConfigError, match="on_nonfinite 'retry'; choose from: stop, skip"):
        tiny_config(on_nonfinite="retry")
    with pytest.raises(TrainConfigError, match="check_every must be >= 0"):
        tiny_config(check_every=-1)
    assert TrainConfig.from_dict(tiny_config(check_every=3).to_dict()).check_every == 3
