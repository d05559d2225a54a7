"""CPT (Fu et al. 2021): the cyclic schedule against hand values, the precision range test on
synthetic accuracy curves, the quantizer it sets up, evaluation at b_max, resume mid-cycle."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qtrain import QConv2d, QLinear
from qtrain.cli import main
from qtrain.models import build_model
from qtrain.ops import Precision
from qtrain.quantizer import PerChannel, PerTensor, Rounding
from qtrain.recipes import RecipeConfigError, StepResult, build_recipe
from qtrain.recipes.cpt import CPT, CPTConfig, cyclic_bits, range_test_choice
from qtrain.train import CHECKPOINT_FILE, TIMING_KEYS, TrainConfig, read_metrics, train

SYNTHETIC = {"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4}


def small_config(**changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        model="cnn", data="synthetic", epochs=2, width=4, batch_size=32, log_every=1,
        quiet=True, data_kwargs=SYNTHETIC,
    )  # fmt: skip
    return TrainConfig(**{**options, **changes})


# ---- eq. 1 -------------------------------------------------------------------------------------


def test_cyclic_bits_by_hand() -> None:
    # 64 steps, 2 cycles: T = 32. b = 3 + 2.5·(1 − cos(π·phase)).
    expected = {
        0: 3,  # a cycle starts at b_min
        8: 4,  # 3 + 2.5·(1 − cos(π/4)) = 3.73
        16: 6,  # 3 + 2.5 = 5.5: half to even
        24: 7,  # 3 + 2.5·(1 + cos(π/4)) = 7.27
        31: 8,  # 7.99: the cycle's end reaches b_max
        32: 3,  # the next cycle
        63: 8,  # the last step
    }
    assert {t: cyclic_bits(t, 64, 3, 8, 2) for t in expected} == expected
    # A period that is not a whole number of steps: 100 steps, 3 cycles (T = 33.3).
    assert [cyclic_bits(t, 100, 2, 8, 3) for t in (0, 33, 34, 66, 67, 99)] == [2, 8, 2, 8, 2, 8]
    assert {cyclic_bits(t, 10, 8, 8, 4) for t in range(10)} == {8}  # b_min = b_max: static


def test_every_bit_width_between_appears_in_a_long_cycle() -> None:
    bits = [cyclic_bits(t, 1000, 3, 8, 1) for t in range(1000)]
    assert bits == sorted(bits) and set(bits) == {3, 4, 5, 6, 7, 8}


# ---- the precision range test --------------------------------------------------------------------


def test_range_test_picks_the_first_jump_above_the_threshold() -> None:
    curve = [(2, 0.10), (3, 0.11), (4, 0.14), (5, 0.40), (6, 0.70), (7, 0.72)]
    bits, why = range_test_choice(curve, threshold=0.05)
    assert bits == 5 and "0.14 at 4 bits -> 0.40 at 5 bits" in why
    assert range_test_choice(curve, threshold=0.28)[0] == 6  # 0.40 -> 0.70 is the first > 0.28


def test_range_test_without_a_jump_takes_the_largest_rise_or_the_lowest_bits() -> None:
    curve = [(2, 0.10), (3, 0.12), (4, 0.15), (5, 0.16)]
    assert range_test_choice(curve, threshold=0.05)[0] == 4
    flat = [(2, 0.30), (3, 0.30), (4, 0.29)]
    bits, why = range_test_choice(flat, threshold=0.05)
    assert bits == 2 and "no rise" in why


def _feed(recipe: CPT, accuracies: list[float], steps_per_bits: int, total: int) -> list[int]:
    """Run the recipe's schedule/on_step_end over fake steps with the given accuracy per
    bit-width window; returns the forward bits of every step."""
    bits, step = [], 0
    for accuracy in accuracies:
        for _ in range(steps_per_bits):
            bits.append(recipe.schedule(step, total).forward)
            correct = round(accuracy * 100)
            recipe.on_step_end(step, StepResult(1.0, correct, 100), nn.Identity(), None)
            step += 1
            if recipe.b_min is not None:
                return bits
    return bits


def test_auto_b_min_runs_the_test_then_cycles_from_the_choice() -> None:
    recipe = CPT(CPTConfig(b_min="auto", prt_steps=4, prt_threshold=0.1, cycles=2))
    bits = _feed(recipe, [0.1, 0.12, 0.15, 0.5, 0.6], steps_per_bits=4, total=200)
    assert bits == [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4  # 4 steps at each bit-width tried
    assert recipe.b_min == 5
    assert recipe.tried == [(2, 0.1), (3, 0.12), (4, 0.15), (5, 0.5)]
    events = recipe.events()
    assert [e["event"] for e in events] == ["range_test"] * 4 + ["b_min"]
    assert events[-1]["b_min"] == 5 and "0.15 at 4 bits -> 0.50 at 5 bits" in events[-1]["why"]
    assert recipe.events() == []  # drained
    # From here the cycle of eq. 1 with the chosen b_min.
    assert [recipe.schedule(t, 200).forward for t in (16, 99, 100)] == [
        cyclic_bits(t, 200, 5, 8, 2) for t in (16, 99, 100)
    ]


def test_default_test_length_shares_the_first_cycle_among_the_bit_widths() -> None:
    recipe = CPT(CPTConfig(b_min="auto", cycles=4))  # 2..8 bits: 7 bit-widths
    bits = [recipe.schedule(0, 280).forward]  # first cycle: 70 steps -> 10 per bit-width
    for step in range(10):
        recipe.on_step_end(step, StepResult(1.0, 0, 10), nn.Identity(), None)
    assert bits == [2] and recipe.tried == [(2, 0.0)] and recipe.schedule(10, 280).forward == 3


def test_range_test_that_reaches_b_max_without_a_jump_still_chooses() -> None:
    recipe = CPT(CPTConfig(b_min="auto", b_max=4, prt_steps=1, prt_threshold=0.5))
    _feed(recipe, [0.1, 0.2, 0.3], steps_per_bits=1, total=100)
    assert recipe.b_min == 3  # the largest rise (all equal: the first) reached 3 bits


# ---- config and model --------------------------------------------------------------------------


def test_config_is_validated() -> None:
    assert build_recipe("cpt", {"b_min": "auto"}).config.b_min == "auto"
    assert build_recipe("cpt", {"b_min": "4", "b_max": "6"}).config.b_min == 4
    for bad, field in (({"b_min": "9"}, "b_min"), ({"b_min": "sometimes"}, "b_min"),
                       ({"cycles": "0"}, "cycles"), ({"prt_threshold": "2"}, "prt_threshold"),
                       ({"bw_bits": "1"}, "bw_bits")):  # fmt: skip
        with pytest.raises(RecipeConfigError, match=field):
            build_recipe("cpt", bad)


def cnn() -> nn.Module:
    return build_model("cnn", input_shape=(1, 8, 8), num_classes=4, width=4)


def test_prepare_quantizes_all_but_the_classifier_with_cpts_quantizer() -> None:
    model = build_recipe("cpt").prepare(cnn())
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(isinstance(m, QConv2d) for m in layers[:-1])
    assert type(layers[-1]) is nn.Linear  # the classifier stays float32
    assert not any("RangeBatchNorm" in type(m).__name__ for m in model.modules())
    config = layers[0].config
    assert config.weight_spec.granularity == PerChannel(0)
    assert config.input_spec.granularity == PerTensor()
    assert config.grad_input_spec == config.grad_weight_spec  # no bifurcation
    assert config.grad_input_spec.rounding is Rounding.STOCHASTIC
    quantized = build_recipe("cpt", {"quantize_classifier": "true"})
    model = quantized.prepare(cnn())
    assert isinstance([m for m in model.modules() if isinstance(m, nn.Linear)][-1], QLinear)


def test_schedule_evaluation_and_metrics() -> None:
    recipe = build_recipe("cpt", {"b_min": 4, "bw_bits": 6, "cycles": 1})
    assert recipe.schedule(0, 10) == Precision(forward=4, backward=6)
    assert recipe.metrics() == {"fw_bits": 4, "bw_bits": 6, "b_min": 4}
    assert recipe.on_eval_start(nn.Identity()) == Precision(forward=8, backward=6)
    assert build_recipe("cpt", {"eval_bits": 5}).on_eval_start(nn.Identity()).forward == 5


# ---- in training ---------------------------------------------------------------------------------


def _layer_bits(model: nn.Module) -> list[int]:
    return [int(m.config.input_spec.bits) for m in model.modules() if isinstance(m, QConv2d)]


def test_training_follows_the_cycle_and_costs_less_than_static(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    class Watched(CPT):
        def prepare(self, model: nn.Module) -> nn.Module:
            model = super().prepare(model)
            model.register_forward_pre_hook(
                lambda m, _: seen.append(_layer_bits(m)) if m.training else None
            )
            return model

    config = small_config()
    cyclic = train(config, Watched(CPTConfig(cycles=2)), tmp_path / "cpt")
    total = cyclic["steps"]
    # Every quantized layer at the step's bits; evaluation (at b_max) is not a training step.
    assert seen == [[cyclic_bits(t, total, 3, 8, 2)] * 3 for t in range(total)]
    static = train(config, build_recipe("cpt", {"b_min": 8}), tmp_path / "static")
    gemms = [run["bitops_train"] - run["bitops_norm"] for run in (cyclic, static)]
    # Per step (b² + 2·8·b) / (3·64) for the quantized layers; the float classifier is the same.
    assert 0.4 < gemms[0] / gemms[1] < 0.8
    assert cyclic["bitops_norm"] == static["bitops_norm"] > 0  # float32 BatchNorm in both
    records = read_metrics(tmp_path / "cpt")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["metrics"]["fw_bits"] for r in steps] == [
        cyclic_bits(t, total, 3, 8, 2) for t in range(total)
    ]
    # The schedule step by step from the change records (record at step n: the n-th step).
    changes = {r["step"]: r["metrics"]["fw_bits"] for r in records if r["kind"] == "metrics"}
    per_step, bits = [], None
    for step in range(1, total + 1):
        bits = changes.get(step, bits)
        per_step.append(bits)
    assert per_step == [cyclic_bits(t, total, 3, 8, 2) for t in range(total)]
    assert len(changes) < total


def test_resume_mid_cycle_continues_the_same_schedule(tmp_path: Path) -> None:
    config = small_config(checkpoint_every=5)

    class Crash(CPT):
        def schedule(self, step: int, total_steps: int) -> Precision:
            if step == 11:
                raise KeyboardInterrupt("simulated kill")
            return super().schedule(step, total_steps)

    cpt = CPTConfig(b_min="auto", prt_steps=2, cycles=2)
    train(config, CPT(cpt), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, Crash(cpt), tmp_path / "resumed")
    train(config, CPT(cpt), tmp_path / "resumed", resume=True)

    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(tmp_path / "straight"))
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert straight["recipe"] == resumed["recipe"] and straight["recipe"]["b_min"] is not None
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])


def test_prt_command_picks_b_min_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "prt"
    data = ["--data-arg", "shape=[1,8,8]", "--data-arg", "size=256", "--data-arg", "num_classes=4"]
    model = ["--model", "cnn", "--width", "4", "--epochs", "2", "--batch-size", "32"]
    args = ["prt", *model, "--data", "synthetic", *data, "--quiet", "--set", "prt_steps=2"]
    args += ["--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "b_min = " in printed and " bits: training accuracy" in printed
    assert (out / "prt.png").stat().st_size > 0
    events = [r for r in read_metrics(out) if r["kind"] == "recipe"]
    assert events[-1]["event"] == "b_min"
    steps = max(r["step"] for r in read_metrics(out))
    assert steps == 2 * sum(e["event"] == "range_test" for e in events)  # stopped once chosen
    assert math.isfinite(events[0]["train_acc"])
