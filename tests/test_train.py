"""The trainer: learning, resume equivalence, config round-trip, run artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qtrain.recipes import StepResult, build_recipe
from qtrain.recipes.fp32 import FP32Recipe
from qtrain.train import (
    CHECKPOINT_FILE,
    TIMING_KEYS,
    TrainConfig,
    TrainConfigError,
    lr_factor,
    read_metrics,
    train,
)

# 2000 examples / batch 32 = 63 steps per epoch (the last batch short), 10 classes.
SYNTHETIC = {"shape": [1, 16, 16], "size": 2000, "test_size": 500}
STEPS_PER_EPOCH = 63


def small_config(**changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        model="cnn",
        data="synthetic",
        epochs=1,
        width=8,
        batch_size=32,
        lr=0.1,
        log_every=7,
        quiet=True,
        data_kwargs=SYNTHETIC,
    )
    return TrainConfig(**{**options, **changes})


class NoisyRecipe(FP32Recipe):
    """Exercises the hooks: draws from the global RNG into the loss (so the weights depend on
    the RNG stream being restored on resume), keeps state, reports bits; can crash on purpose.
    """

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.steps_seen = 0

    def schedule(self, step: int, total_steps: int) -> None:
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated kill")

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        weight = next(model.parameters())
        return 1e-3 * torch.rand(()) * weight.square().sum()

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        self.steps_seen += 1
        return False

    def metrics(self) -> dict[str, float]:
        return {"fw_bits": 8 if self.steps_seen < 50 else 4}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.steps_seen = state["steps_seen"]


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["model"]


def test_one_epoch_synthetic_run_learns(tmp_path: Path) -> None:
    summary = train(small_config(), build_recipe("fp32"), tmp_path / "run")
    # Chance is 10% (10 balanced classes); an untrained model scores 10% ± 1.3% (1 std over
    # 500 test examples). These settings measured 99.8%; 60% leaves a wide margin for
    # platform numerics while still meaning the model learned.
    assert summary["test_acc"] >= 0.6
    design_keys = {
        "recipe", "model", "dataset", "epochs", "test_acc", "best_test_acc",
        "final_train_loss", "bitops_train", "bitops_fp32_equiv", "params_initial",
        "params_final", "model_bits", "epoch_seconds", "wall_seconds", "peak_memory_bytes",
    }  # fmt: skip
    assert design_keys | {"peak_memory_source", "energy_pj", "bitops_by_role"} <= summary.keys()
    assert summary["bitops_train"] > 0 and len(summary["epoch_seconds"]) == 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved == summary
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(7, 64, 7))
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["step"] == STEPS_PER_EPOCH and epoch["test_acc"] == summary["test_acc"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(config["train"]) == small_config()
    assert config["recipe"] == "fp32" and "torch" in config["versions"]


@pytest.mark.parametrize(
    ("recipe_name", "checkpoint_every", "crash_at"),
    [
        ("fp32", STEPS_PER_EPOCH, STEPS_PER_EPOCH + 5),  # 1 epoch, then resume
        ("fp32", 20, 70),  # mid-epoch, mid-log-window checkpoint
        ("amp-fp16", 20, 70),  # the grad scaler's state travels too
    ],
)
def test_resume_gives_the_uninterrupted_result(
    tmp_path: Path, recipe_name: str, checkpoint_every: int, crash_at: int
) -> None:
    config = small_config(epochs=2, checkpoint_every=checkpoint_every)

    def recipe(crash_at: int | None = None) -> NoisyRecipe:
        base = type(build_recipe(recipe_name))
        # The same hooks on top of the named recipe, under the named recipe's name.
        cls = type("Noisy", (NoisyRecipe, base), {"name": recipe_name})
        return cls(crash_at)

    straight = train(config, recipe(), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, recipe(crash_at), tmp_path / "resumed")
    resumed = train(config, recipe(), tmp_path / "resumed", resume=True)

    expected, got = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_timings(read_metrics(tmp_path / "resumed")) == without_timings(
        read_metrics(tmp_path / "straight")
    )
    timings = {"epoch_seconds", "wall_seconds", "peak_memory_bytes"}
    assert {k: v for k, v in resumed.items() if k not in timings} == {
        k: v for k, v in straight.items() if k not in timings
    }


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    first = train(small_config(), build_recipe("fp32"), tmp_path / "run")
    again = train(small_config(), build_recipe("fp32"), tmp_path / "run", resume=True)
    assert again["test_acc"] == first["test_acc"] and again["steps"] == first["steps"]
    assert len(read_metrics(tmp_path / "run")) == len(read_metrics(tmp_path / "run"))


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    train(small_config(), build_recipe("fp32"), tmp_path / "run")
    with pytest.raises(TrainConfigError, match="lr"):
        train(small_config(lr=0.2), build_recipe("fp32"), tmp_path / "run", resume=True)


def test_refuses_a_non_empty_run_dir(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(TrainConfigError, match="not empty"):
        train(small_config(), build_recipe("fp32"), tmp_path / "run")


def test_config_json_round_trip() -> None:
    config = small_config(optimizer="adamw", schedule="cosine", train_subset=100, seed=3)
    assert TrainConfig.from_json(config.to_json()) == config
    # JSON's numbers: an integral float for an int field and an int for a float field.
    data = {**config.to_dict(), "epochs": 2.0, "lr": 1}
    assert TrainConfig.from_dict(data).epochs == 2 and TrainConfig.from_dict(data).lr == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "vgg"}, "choose from: cnn, gpt, mlp, resnet20"),
        ({"data": "imagenet"}, "choose from: .*fashion-mnist"),
        ({"optimizer": "lion"}, "choose from: sgd, adamw"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be"),
        ({"epochs": "3"}, "'epochs': expected an integer"),
        ({"device": "gpu0"}, "device must be"),
        ({"bogus": 1}, "unknown train option"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_dict({**small_config().to_dict(), **changes})


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_lr_schedules_peak_at_one_and_never_go_negative(schedule: str) -> None:
    factors = [lr_factor(schedule, s, 100, 0.2) for s in range(100)]
    assert max(factors) == pytest.approx(1.0) and min(factors) >= 0
    if schedule in ("onecycle", "cosine"):
        assert factors[19] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.0)


@pytest.mark.slow
def test_resnet9_fashion_mnist_reaches_90_percent(tmp_path: Path) -> None:
    # Full training set, 2 epochs of the default recipe (SGD-Nesterov, one-cycle, lr 0.1).
    # Measured once: 91.5% test accuracy, 388 s on 2 CPU cores shared with other jobs (an idle
    # machine runs an epoch in about 30 s). 4-epoch runs of the same model reach 92.6% ± 0.3%
    # over 3 seeds (docs/RESULTS.md), so the 90% floor has a margin of about 5 seed-stds.
    config = TrainConfig(
        model="resnet9", data="fashion-mnist", epochs=2, width=16, log_every=100, quiet=True
    )
    summary = train(config, build_recipe("fp32"), tmp_path / "run")
    assert summary["test_acc"] >= 0.90
