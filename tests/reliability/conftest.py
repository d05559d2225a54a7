"""Shared set-up of the reliability tests: a tiny run that trains in well under a second."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from qtrain.train import TrainConfig

# 256 examples of 1×8×8 in 4 classes, batch 32: 8 steps per epoch. The cnn at width 4 has
# layers 0.0 (conv), 0.1 (BN), 2.0, 2.1, 4.0, 4.1 and 7 (linear).
TINY_DATA = {"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4}
STEPS_PER_EPOCH = 8


@pytest.fixture
def tiny_config() -> Any:
    """``tiny_config(**changes)``: the tiny run's TrainConfig with some options changed."""

    def make(**changes: Any) -> TrainConfig:
        options: dict[str, Any] = dict(
            model="cnn",
            data="synthetic",
            epochs=1,
            width=4,
            batch_size=32,
            log_every=2,
            quiet=True,
            data_kwargs=TINY_DATA,
        )
        return TrainConfig(**{**options, **changes})

    return make


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these tiny tensors gain nothing from more, and on a loaded
    machine every parallel region waits for descheduled threads (measured: 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
