"""Exact resume under SIGKILL: a real ``qtrain train`` process, killed at random steps between
checkpoints and once inside a checkpoint commit, resumed each time, ends bit for bit where an
uninterrupted run ends — weights, optimizer state, RNG streams, metrics and summary.

The recipe is sbm8, so stochastic-rounding draws, running input ranges, Range BN statistics and
SGD momentum all have to survive the kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain.train import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    TIMING_KEYS,
    read_checkpoint,
    read_metrics,
)

CHILD = Path(__file__).with_name("killable_train.py")
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 3, 8, 5
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
KILLS = 3
# Seeds of the choice of kill steps; a longer campaign: QTRAIN_KILL_SEEDS=1,2,3,4,5,6.
SEEDS = [int(s) for s in os.environ.get("QTRAIN_KILL_SEEDS", "6").split(",")]
ARGS = [
    "train", "--recipe", "sbm8", "--model", "cnn", "--data", "synthetic",
    "--epochs", str(EPOCHS), "--width", "4", "--batch-size", "32", "--quiet",
    "--checkpoint-every", str(CHECKPOINT_EVERY), "--log-every", "3",
    "--data-arg", "shape=[1,8,8]", "size=256", "test_size=64", "num_classes=4",
]  # fmt: skip
TIMEOUT = 300  # seconds for one process; they take a few
# One intra-op thread, as conftest.one_thread gives the in-process tests (same reason).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def checkpoint_step(out: Path) -> int:
    """The step of the run's checkpoint (0: none yet)."""
    manifest = out / MANIFEST_FILE
    return json.loads(manifest.read_text())["step"] if manifest.exists() else 0


def kill_at(point: str, out: Path, logs: Path) -> None:
    """Run ``train --resume`` until it holds at ``point``, then SIGKILL it."""
    ready = logs / "ready"
    log_path = logs / f"{point.replace(':', '-')}.log"
    command = [sys.executable, str(CHILD), point, str(ready), "--", *ARGS, "--out", str(out)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--resume"], stdout=log, stderr=subprocess.STDOUT, env=ENV
        )
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"{point} never reached:\n{log_path.read_text()}")
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    ready.unlink()


def final_state(out: Path) -> dict[str, Any]:
    state = read_checkpoint(out / CHECKPOINT_FILE)
    for key in ("wall_seconds", "epoch_seconds", "epoch_elapsed"):
        del state["progress"][key]
    return state


def assert_same(expected: Any, got: Any, where: str = "checkpoint") -> None:
    """Equal nested checkpoint contents, tensors compared with ``torch.equal``."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(got) and torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            assert_same(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(got), where
        for index, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert expected == got, where


def without_timings(record: dict[str, Any]) -> dict[str, Any]:
    timings = TIMING_KEYS | {"peak_memory_bytes"}
    return {k: v for k, v in record.items() if k not in timings}


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkilled_and_resumed_run_equals_the_uninterrupted_run(tmp_path: Path, seed: int) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted run goes on beside the interrupted one.
    uninterrupted = subprocess.Popen(
        [sys.executable, "-m", "qtrain.cli", *ARGS, "--out", str(straight)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    candidates = [s for s in range(1, TOTAL_STEPS) if s % CHECKPOINT_EVERY]
    kill_steps = sorted(random.Random(seed).sample(candidates, KILLS))
    for step in kill_steps:
        kill_at(f"step:{step}", resumed, tmp_path)
        # Killed between checkpoints: the work since the last one is lost and redone.
        assert checkpoint_step(resumed) == step - step % CHECKPOINT_EVERY < step

    # Killed inside a checkpoint commit: the manifest already names the new file, the old one
    # is still in place; resuming must accept the old one (the manifest's "previous" entry).
    kill_at("commit:1", resumed, tmp_path)
    manifest = json.loads((resumed / MANIFEST_FILE).read_text())
    assert manifest["previous"] is not None and manifest["step"] > manifest["previous"]["step"]

    finished = subprocess.run(
        [sys.executable, "-m", "qtrain.cli", *ARGS, "--out", str(resumed), "--resume"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=ENV,
    )
    assert finished.returncode == 0, finished.stderr
    output, _ = uninterrupted.communicate(timeout=TIMEOUT)
    assert uninterrupted.returncode == 0, output

    assert_same(final_state(straight), final_state(resumed))
    assert [without_timings(r) for r in read_metrics(resumed)] == [
        without_timings(r) for r in read_metrics(straight)
    ]
    summaries = [json.loads((run / SUMMARY_FILE).read_text()) for run in (straight, resumed)]
    assert without_timings(summaries[0]) == without_timings(summaries[1])
    assert summaries[1]["steps"] == TOTAL_STEPS
