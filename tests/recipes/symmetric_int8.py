"""Checks shared by the tests of the symmetric-int8 recipes (ui8, daint8): their BitOPs on a
toy network, and a run killed then resumed against one that was not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qtrain.cost import CostMeter
from qtrain.recipes import Recipe, build_recipe
from qtrain.train import CHECKPOINT_FILE, TIMING_KEYS, TrainConfig, read_metrics, train

SYNTHETIC = {"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4}


def small_config(**changes: Any) -> TrainConfig:
    """A few steps of the small CNN on synthetic data (2 epochs unless ``changes`` say)."""
    options: dict[str, Any] = dict(
        model="cnn", data="synthetic", epochs=2, width=4, batch_size=32, log_every=2,
        quiet=True, data_kwargs=SYNTHETIC,
    )  # fmt: skip
    return TrainConfig(**{**options, **changes})


def assert_eight_by_eight_bitops(recipe: str) -> None:
    """Every product of two linear layers costs MACs × 8 × 8 (the first has no grad-input)."""
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    build_recipe(recipe).prepare(model)
    meter = CostMeter(model)
    model(torch.randn(4, 6)).sum().backward()
    first, second = 4 * 6 * 5, 4 * 5 * 3
    assert meter.pop().bitops == {"forward": (first + second) * 64, "grad_input": second * 64,
                                  "grad_weight": (first + second) * 64}  # fmt: skip


def assert_gemms_eight_by_eight(summary: dict[str, Any]) -> None:
    """A run's GEMM BitOPs (all but the float32 normalisation layers') are MACs × 8 × 8."""
    gemm_macs = sum(summary["macs_by_role"].values()) - summary["macs_norm"]
    assert summary["bitops_train"] - summary["bitops_norm"] == gemm_macs * 64
    assert summary["bitops_norm"] == summary["macs_norm"] * 32 * 32


def killed_and_resumed(
    config: TrainConfig, make: Callable[[], Recipe], kill_at: int, out: Path
) -> dict[str, torch.Tensor]:
    """Train straight, then again killed at step ``kill_at`` and resumed; assert the two runs'
    metrics and final checkpoints are equal. Returns the killed run's checkpointed model."""
    recipe = make()

    class Killed(type(recipe)):  # type: ignore[misc]
        def schedule(self, step: int, total_steps: int) -> Any:
            if step == kill_at:
                raise KeyboardInterrupt("simulated kill")
            return super().schedule(step, total_steps)

    train(config, recipe, out / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, Killed(recipe.config), out / "resumed")
    killed = torch.load(out / "resumed" / CHECKPOINT_FILE, weights_only=True)["model"]
    train(config, make(), out / "resumed", resume=True)

    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert strip(read_metrics(out / "resumed")) == strip(read_metrics(out / "straight"))
    straight = torch.load(out / "straight" / CHECKPOINT_FILE, weights_only=True)["model"]
    resumed = torch.load(out / "resumed" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    return killed
