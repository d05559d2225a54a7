"""PFQ (FracTrain, Fu et al. 2020): the loss-plateau indicator on synthetic loss sequences,
stage switches with their events, and resume in the middle of a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qtrain.ops import Precision
from qtrain.recipes import RecipeConfigError, StepResult, build_recipe
from qtrain.recipes.pfq import PFQ, PFQConfig, PlateauIndicator
from qtrain.train import CHECKPOINT_FILE, TIMING_KEYS, TrainConfig, read_metrics, train

SYNTHETIC = {"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4}


def test_indicator_switches_exactly_when_the_last_five_readings_are_flat() -> None:
    indicator = PlateauIndicator(epsilon=0.1, decay=0.5)
    # scale = mean of the first readings (here of 1.0 each): Δ_i = |L_i − L_last| / 1.0.
    readings = [1.0, 1.0, 1.0, 1.0, 1.2]  # Δ = 0.2 for the older four: not flat
    assert [indicator.add(x) for x in readings] == [None] * 5
    decision = indicator.add(1.15)  # window [1, 1, 1, 1.2, 1.15]: Δ up to 0.15 > 0.1
    assert decision is None
    decisions = [indicator.add(x) for x in (1.16, 1.17, 1.18)]  # window [1.2, 1.15 … 1.18]
    assert decisions[:2] == [None, None]  # 1.0 still in the window (Δ 0.16, 0.17)
    flat = decisions[2]  # window [1.2, 1.15, 1.16, 1.17, 1.18]: Δ ≤ 0.03 / scale
    assert flat is not None and flat["epsilon"] == 0.1
    scale = (4 * 1.0 + 1.2 + 1.15 + 1.16 + 1.17 + 1.18) / 9  # all 9 readings (fewer than 10)
    assert flat["scale"] == pytest.approx(scale)
    assert flat["deltas"] == pytest.approx([abs(x - 1.18) / scale for x in (1.2, 1.15, 1.16, 1.17)])
    assert indicator.epsilon == pytest.approx(0.05)  # ε ← decay·ε
    # The window starts afresh: five new readings before the next decision.
    assert [indicator.add(1.18) for _ in range(4)] == [None] * 4
    assert indicator.add(1.18) is not None


def test_scale_is_the_mean_of_the_first_ten_readings_only() -> None:
    indicator = PlateauIndicator(epsilon=0.0, decay=1.0)
    for x in [2.0] * 10 + [1.0] * 4:
        indicator.add(x)
    assert indicator.first == [2.0] * 10
    decision = indicator.add(1.0)
    assert decision is not None and decision["scale"] == 2.0 and decision["deltas"] == [0.0] * 4


def _run_losses(recipe: PFQ, losses: list[float]) -> list[Precision]:
    precisions = []
    for step, loss in enumerate(losses):
        precisions.append(recipe.schedule(step, 10_000))
        recipe.on_step_end(step, StepResult(loss, 0, 1), nn.Identity(), None)
    return precisions


def test_stages_advance_on_plateaus_and_stop_at_the_last() -> None:
    recipe = PFQ(PFQConfig(interval=2, epsilon=0.05, decay=0.5))
    # 5 flat intervals (10 steps) -> stage 1; 5 more -> stage 2; 5 more -> stage 3; then stay.
    precisions = _run_losses(recipe, [1.0] * 40)
    forward = [p.forward for p in precisions]
    assert forward == [3] * 10 + [4] * 10 + [6] * 10 + [8] * 10
    assert [p.backward for p in precisions[::10]] == [6, 6, 8, 8]
    events = recipe.events()
    assert [(e["event"], e["stage"], e["forward_bits"]) for e in events] == [
        ("stage", 1, 4), ("stage", 2, 6), ("stage", 3, 8)
    ]  # fmt: skip
    assert [e["epsilon"] for e in events] == [0.05, 0.025, 0.0125]
    assert recipe.metrics() == {"fw_bits": 8, "bw_bits": 8, "stage": 3}


def test_a_falling_loss_keeps_the_stage() -> None:
    recipe = PFQ(PFQConfig(interval=1, epsilon=0.05))
    # 10% less each step: over the last five readings the loss still falls by more than 5%
    # of the scale (the first readings' mean), so no plateau.
    precisions = _run_losses(recipe, [2.0 * 0.9**i for i in range(15)])
    assert {p.forward for p in precisions} == {3} and recipe.events() == []


def test_config_is_validated() -> None:
    two = build_recipe("pfq", {"forward_bits": "4,8", "backward_bits": "8,8"})
    assert two.config.forward_bits == (4, 8)
    with pytest.raises(RecipeConfigError, match="one length"):
        build_recipe("pfq", {"forward_bits": "4,8"})
    with pytest.raises(RecipeConfigError, match="interval"):
        build_recipe("pfq", {"interval": "0"})
    with pytest.raises(RecipeConfigError, match="forward_bits"):
        build_recipe("pfq", {"forward_bits": "1,8", "backward_bits": "8,8"})


def test_a_run_too_short_to_switch_says_so() -> None:
    recipe = PFQ(PFQConfig())  # interval 400: 5 readings need 2000 steps
    recipe.schedule(0, 1000)
    (event,) = recipe.events()
    assert event["event"] == "too_short" and "interval" in event["why"]


def small_config(**changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        model="cnn", data="synthetic", epochs=4, width=4, batch_size=32, log_every=1,
        quiet=True, data_kwargs=SYNTHETIC, checkpoint_every=5,
    )  # fmt: skip
    return TrainConfig(**{**options, **changes})


def test_resume_in_the_middle_of_a_stage_continues_the_same_stages(tmp_path: Path) -> None:
    pfq = PFQConfig(interval=1, epsilon=1.0, decay=0.9)  # switches every 5 steps

    class Crash(PFQ):
        def schedule(self, step: int, total_steps: int) -> Precision:
            if step == 12:
                raise KeyboardInterrupt("simulated kill")
            return super().schedule(step, total_steps)

    train(small_config(), PFQ(pfq), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(small_config(), Crash(pfq), tmp_path / "resumed")
    train(small_config(), PFQ(pfq), tmp_path / "resumed", resume=True)

    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    straight = strip(read_metrics(tmp_path / "straight"))
    assert strip(read_metrics(tmp_path / "resumed")) == straight
    switches = [r["step"] for r in straight if r["kind"] == "recipe" and r["event"] == "stage"]
    assert switches == [5, 10, 15]
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["recipe"]
    assert state["stage"] == 3
