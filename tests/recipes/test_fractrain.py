"""FracTrain (Fu et al. 2020): DFQ whose target cost rises one step at each of PFQ's loss
plateaus, up to the last turning point; its stages in a run and across resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from symmetric_int8 import killed_and_resumed, small_config
from torch import nn

from qtrain.recipes import RecipeConfigError, StepResult, build_recipe
from qtrain.recipes.dfq import DFQ
from qtrain.recipes.fractrain import FracTrain, FracTrainConfig
from qtrain.train import read_metrics


def _targets(recipe: FracTrain, losses: list[float]) -> list[float]:
    targets = []
    for step, loss in enumerate(losses):
        recipe.schedule(step, 10_000)
        targets.append(recipe.target_cp)
        recipe.on_step_end(step, StepResult(loss, 0, 1), nn.Identity(), None)
    return targets


def test_target_rises_at_each_plateau_until_the_last_turning_point() -> None:
    config = FracTrainConfig(target_cp=2.0, target_step=0.25, turning_points=2, interval=2,
                             epsilon=0.05, decay=0.5)  # fmt: skip
    recipe = FracTrain(config)
    # Flat losses: 5 intervals (10 steps) per plateau reading.
    targets = _targets(recipe, [1.0] * 40)
    assert targets[:10] == [2.0] * 10 and targets[10:20] == [2.25] * 10
    assert targets[20:] == [2.5] * 20  # two turning points: the third stage is the last
    stages = [e for e in recipe.events() if e["event"] == "stage"]
    assert [(e["stage"], e["target_cp"]) for e in stages] == [(1, 2.25), (2, 2.5)]
    assert stages[0]["deltas"] == [0.0] * 4 and stages[0]["epsilon"] == 0.05
    # After the last turning point the indicator is no longer read.
    indicator = recipe.plateau.indicator
    assert indicator.window == [] and indicator.epsilon == pytest.approx(0.0125)
    assert recipe.metrics()["stage"] == 2 and recipe.metrics()["target_cp"] == 2.5


def test_a_falling_loss_keeps_the_first_target() -> None:
    recipe = FracTrain(FracTrainConfig(interval=1))
    # 0.1 less each step: over five readings 0.4, more than ε = 0.15 of the scale (≤ 2).
    assert set(_targets(recipe, [2.0 - 0.1 * i for i in range(15)])) == {2.0}
    assert recipe.events() == []


def test_defaults_end_at_the_authors_last_target_and_the_rest_is_dfq() -> None:
    recipe = build_recipe("fractrain")
    assert isinstance(recipe, DFQ)
    config = recipe.config
    # The authors' 1.5 first target needs their skip-the-block option: ours start at 2.0.
    assert (config.target_cp, config.target_step, config.turning_points) == (2.0, 0.5, 2)
    assert (config.interval, config.epsilon, config.decay) == (400, 0.15, 0.4)
    assert config.forward_bits == (3, 4, 4, 6, 6) and config.weight_bits == 4


def test_config_is_validated() -> None:
    with pytest.raises(RecipeConfigError, match="last stage's target cp 101"):
        FracTrainConfig(target_cp=98.0, target_step=1.0, turning_points=3)
    with pytest.warns(UserWarning, match=r"the last stage's target = 5 is outside .*4\.688\]"):
        FracTrain(FracTrainConfig(target_cp=2.0, target_step=1.0, turning_points=3))
    # The authors' first target: below every option here (they can skip a block).
    with pytest.warns(UserWarning, match=r"first stage's\) = 1.5 is outside .*\[1\.758, "):
        FracTrain(FracTrainConfig(target_cp=1.5))
    with pytest.raises(RecipeConfigError, match="interval"):
        FracTrainConfig(interval=0)
    with pytest.raises(RecipeConfigError, match="one length"):
        FracTrainConfig(forward_bits=(3,), backward_bits=(6, 8))


def test_a_run_too_short_to_switch_says_so() -> None:
    recipe = FracTrain()
    recipe.schedule(0, 1000)
    (event,) = recipe.events()
    assert event["event"] == "too_short" and "5 intervals of 400" in event["why"]


def test_stages_in_a_run_survive_resume(tmp_path: Path) -> None:
    config = small_config(model="resnet20", width=None, model_kwargs={"base_channels": 4},
                          checkpoint_every=4)  # fmt: skip
    fractrain = FracTrainConfig(target_cp=1.8, target_step=0.4, turning_points=3, interval=1,
                                epsilon=1.0, decay=0.9)  # switches every 5 steps  # fmt: skip

    # Checkpointed at step 8, three readings into the second stage's window; killed at 9.
    killed_and_resumed(config, lambda: FracTrain(fractrain), 9, tmp_path)
    records = read_metrics(tmp_path / "straight")
    switches = [(r["step"], r["target_cp"]) for r in records
                if r["kind"] == "recipe" and r["event"] == "stage"]  # fmt: skip
    assert switches == [(5, 2.2), (10, 2.6), (15, 3.0)]
