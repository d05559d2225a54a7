"""Running out of memory: one line naming the batch size, exit code 1, no stack trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain.cli import main
from qtrain.recipes import RECIPES
from qtrain.recipes.fp32 import FP32Recipe
from qtrain.train import OutOfMemoryError, train

CLI_TINY = [
    "train", "--recipe", "fp32", "--model", "cnn", "--data", "synthetic", "--epochs", "1",
    "--width", "4", "--batch-size", "32", "--quiet",
    "--data-arg", "size=256", "test_size=64", "num_classes=4",
]  # fmt: skip

# What each allocator raises when it cannot serve a request (messages as torch words them).
ALLOCATION_FAILURES = {
    "cuda": torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 1.25 GiB is free."
    ),
    "cpu": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
    ),
    "python": MemoryError(),
}


def recipe_failing_at(step: int, error: BaseException) -> type[FP32Recipe]:
    class FailingStep(FP32Recipe):
        def schedule(self, at: int, total_steps: int) -> None:
            if at == step:
                raise error

    return FailingStep


@pytest.mark.parametrize("error", ALLOCATION_FAILURES.values(), ids=ALLOCATION_FAILURES.keys())
def test_out_of_memory_in_a_step_is_one_line_with_the_batch_size(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    monkeypatch.setitem(RECIPES, "fp32", recipe_failing_at(2, error))
    code = main([*CLI_TINY, "--out", str(tmp_path / "run"), "--data-arg", "shape=[1,8,8]"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("qtrain: error: out of memory at step 3 with batch size 32 on cpu")
    assert "; try a smaller --batch-size" in err


def test_a_real_allocation_failure_is_reported_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 10^6 × 10^6 pixels: the synthetic set's class patterns alone need about 2.5 TB.
    code = main(
        [*CLI_TINY, "--out", str(tmp_path / "run"), "--data-arg", "shape=[1,1000000,1000000]"]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "out of memory while loading data and model with batch size 32 on cpu" in err
    assert "can't allocate memory" in err and "try --train-subset" in err


def test_other_runtime_errors_are_not_mistaken_for_memory(tmp_path: Path, tiny_config: Any) -> None:
    failing = recipe_failing_at(1, RuntimeError("shape mismatch in layer 3"))
    with pytest.raises(RuntimeError, match="shape mismatch") as caught:
        train(tiny_config(), failing(), tmp_path / "run")
    assert not isinstance(caught.value, OutOfMemoryError)
