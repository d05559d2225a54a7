"""``load_run``: a run's trained model back, built and evaluated as the trainer does, so that
it scores exactly the test accuracy of the run's summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qtrain
from qtrain.recipes import RECIPES, Recipe, build_recipe
from qtrain.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    SUMMARY_FILE,
    CheckpointError,
    DatasetSpec,
    RunNotFoundError,
    TrainConfig,
    TrainConfigError,
    load_run,
    read_checkpoint,
    read_metrics,
    train,
)
from test_hooks import STEPS_PER_EPOCH, EvalAsTrained, EvalAtEight, FourBitsWithAFault, tiny_config


def final_test_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if r["kind"] == "epoch"][-1]["test_loss"]


@pytest.mark.parametrize("recipe_name", ["fp32", "sbm8", "amp-bf16"])
def test_loaded_run_scores_the_summarys_test_accuracy(tmp_path: Path, recipe_name: str) -> None:
    config = tiny_config(epochs=2)
    summary = train(config, build_recipe(recipe_name), tmp_path)

    run = load_run(tmp_path)
    result = run.evaluate()
    assert result["test_acc"] == summary["test_acc"]
    assert result["test_loss"] == final_test_loss(tmp_path)
    assert run.summary == summary == json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert run.config == config and run.step == 2 * STEPS_PER_EPOCH
    assert run.recipe.name == recipe_name and not run.model.training
    weights = read_checkpoint(tmp_path / CHECKPOINT_FILE)["model"]
    state = run.model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert run.dataset == DatasetSpec(
        "synthetic", kwargs=config.data_kwargs, train_subset=None, test_subset=None, seed=0
    )
    assert torch.equal(run.dataset.load().test_x, run.data.test_x)


@pytest.mark.parametrize("recipe", [EvalAsTrained, EvalAtEight], ids=["current", "eval-bits"])
def test_loaded_run_evaluates_at_the_precision_the_trainer_evaluated_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: type[Recipe]
) -> None:
    # Both train at 4 bits; EvalAtEight evaluates at 8 (on_eval_start), EvalAsTrained at the
    # precision of the last step. The layers' configured bits, 8, would miss the first.
    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    summary = train(tiny_config(), recipe(), tmp_path)
    run = load_run(tmp_path)
    assert run.evaluate() == {
        "test_loss": final_test_loss(tmp_path),
        "test_acc": summary["test_acc"],
    }


def test_loaded_run_keeps_the_guards_raised_floors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(RECIPES, FourBitsWithAFault.name, FourBitsWithAFault)
    config = tiny_config(on_nonfinite="raise-precision", check_every=1)
    summary = train(config, FourBitsWithAFault(), tmp_path)
    run = load_run(tmp_path)
    assert set(run.model.get_submodule("2.0").floor().values()) == {8}
    assert run.model.get_submodule("4.0").floor() == {}
    assert run.evaluate()["test_acc"] == summary["test_acc"]


def test_an_unfinished_run_loads_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(checkpoint_every=3), EvalAsTrained(crash_at=5), tmp_path)
    with pytest.raises(TrainConfigError, match="recipe 'toy' is not registered"):
        load_run(tmp_path)  # a run's recipe must be registered to rebuild it
    monkeypatch.setitem(RECIPES, EvalAsTrained.name, EvalAsTrained)
    run = load_run(tmp_path)
    assert run.summary == {} and run.step == 3


def test_load_run_is_exported_and_leaves_the_rng_streams_alone(tmp_path: Path) -> None:
    train(tiny_config(), build_recipe("fp32"), tmp_path)
    assert qtrain.load_run is load_run
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_run(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_a_run_trained_elsewhere_loads_on_another_device(tmp_path: Path) -> None:
    train(tiny_config(), build_recipe("fp32"), tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    saved["train"]["device"] = "cuda"  # as if trained on a GPU
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    run = load_run(tmp_path, device="cpu")
    assert run.config.device == "cpu" and run.config == TrainConfig.from_dict(
        {**saved["train"], "device": "cpu"}
    )


def test_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(RunNotFoundError, match=f"no run directory {missing}"):
        load_run(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunNotFoundError, match=f"{empty} is not a qtrain run: it has no config"):
        load_run(empty)

    run = tmp_path / "run"
    train(tiny_config(), build_recipe("fp32"), run)
    checkpoint = run / CHECKPOINT_FILE
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {checkpoint} does not match"):
        load_run(run)
    checkpoint.unlink()
    with pytest.raises(CheckpointError, match=f"run {run} has no checkpoint.pt"):
        load_run(run)
