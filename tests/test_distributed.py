"""Data-parallel training (issue 22): DDP and FSDP2 ranks on gloo, spawned by the tests.

A 2-rank run with batch B/2 per rank follows a 1-process run with batch B: exactly (to
float32 summation order) where the maths allows — no per-batch statistics, no stochastic
rounding — and within a stated tolerance where each rank's quantizers see half the batch
(per-batch ranges and scales, stochastic rounding streams that differ per rank). After every
step every rank holds the same quantizer state (and, under DDP, the same parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qtrain import distributed
from qtrain.recipes import RECIPES, Recipe, build_recipe
from qtrain.train import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    TIMING_KEYS,
    TrainConfig,
    TrainConfigError,
    load_run,
    read_metrics,
    train,
)

SYNTHETIC = {"shape": [1, 8, 8], "size": 256, "test_size": 64, "num_classes": 4}
WORLD = 2

# Short intervals so that the recipes' decisions (stage switches, clip searches, the range
# test) happen within a test's 16 steps.
SETS: dict[str, dict[str, Any]] = {
    "sbm": {"bits": 6},
    "pfq": {"interval": 2},
    "cpt": {"cycles": 2},
    "ui8": {"interval": 2},
    "daint8": {"interval": 2},
    "dfq": {"metrics_interval": 2},
    "fractrain": {"metrics_interval": 2, "interval": 2},
}
# Recipes that gate residual blocks train a small ResNet-20 (with BatchNorm) instead.
RESIDUAL = {"dfq", "fractrain"}

# Loss trajectory of 2 ranks x B/2 against 1 process x B (MLP, 16 steps), per step:
# |2-rank - 1-process| <= rtol * |1-process|.
EXACT = 1e-5  # same maths, float32 summation order only
TOLERANCE: dict[str, float] = {
    "fp32": EXACT,
    "bitnet": EXACT,  # per-token activations, per-tensor absmean weights: nothing per batch
    "selfcompress": EXACT,  # weights only: the same removals at the same steps
    "amp-fp16": 1e-3,  # fp16 rounding of GEMMs over B/2 rows instead of B
    "amp-bf16": 1e-2,  # bf16 rounding, likewise
}
# Everything else quantizes with per-batch ranges or scales (each rank's half batch), draws
# stochastic rounding per rank, or (qat) scales LSQ's step gradient by 1/sqrt(N·Q_P) with the
# rank's N: measured up to 2.3% (pfq, fp8-gemm) on this model.
STATISTICAL = 0.06
# With BatchNorm each rank normalises its half batch by its own statistics (SyncBatchNorm is
# CUDA only): 2 x B/2 is other maths than 1 x B. Absolute loss difference per step, measured
# up to 0.13 (CNN fp32; ResNet-20 fp32, dfq, fractrain) and 0.25 (CNN sbm8, whose loss jumps
# from step to step), and of the mean loss over the 16 steps, measured up to 0.04.
BATCH_STATISTICS = 0.4
BATCH_STATISTICS_MEAN = 0.15


def assert_close_with_batchnorm(name: str, ours: list[float], theirs: list[float]) -> None:
    assert ours[0] != theirs[0]  # not the same maths
    worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    assert worst <= BATCH_STATISTICS, f"{name}: loss {ours} vs {theirs}"
    mean = abs(sum(ours) - sum(theirs)) / len(ours)
    assert mean <= BATCH_STATISTICS_MEAN, f"{name}: loss {ours} vs {theirs}"


def small_config(**changes: Any) -> TrainConfig:
    """16 steps of a 2-layer MLP on synthetic data (no BatchNorm: see the CNN test)."""
    options: dict[str, Any] = dict(
        model="mlp", data="synthetic", epochs=2, width=16, batch_size=32, log_every=1,
        augment=False, quiet=True, data_kwargs=SYNTHETIC,
    )  # fmt: skip
    return TrainConfig(**{**options, **changes})


def recipe_config(name: str, **changes: Any) -> TrainConfig:
    """``small_config`` for recipe ``name``: a ResNet-20 of base width 4 on 3x8x8 inputs for
    the recipes that gate residual blocks (at lr 0.02: at 0.1 their loss jumps about)."""
    if name in RESIDUAL:
        data = {**SYNTHETIC, "shape": [3, 8, 8]}
        changes = dict(model="resnet20", model_kwargs={"base_channels": 4}, lr=0.02,
                       data_kwargs=data, **changes)  # fmt: skip
    return small_config(**changes)


# ---- running ranks ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(target: Callable[..., None], *args: Any, timeout: float = 300.0) -> None:
    """``target(rank, *args)`` in WORLD spawned processes joined in one gloo group."""
    context = mp.start_processes(
        _rank_main,
        args=(_free_port(), target, args),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout:.0f} s")


def _digest(tensors: list[torch.Tensor], extra: Any = None) -> str:
    digest = hashlib.sha256(json.dumps(extra, default=str, sort_keys=True).encode())
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def recording(recipe: Recipe, log: list[dict[str, str]], parameters: bool) -> Recipe:
    """``recipe`` that records, after every step's sync, digests of the state the ranks must
    agree on (with ``parameters``: the parameters too) and of this rank's RNG stream."""

    class Recording(type(recipe)):  # type: ignore[misc, valid-type]
        def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
            self.recorded = super().prepare(model)
            return self.recorded

        def sync(self, process_group: Any = None) -> None:
            super().sync(process_group)
            tensors = distributed.state_tensors(self.recorded)
            if parameters:
                tensors += list(self.recorded.parameters())
            log.append(
                {
                    "state": _digest(tensors, self.state_dict()),
                    "rng": _digest([torch.get_rng_state()]),
                }
            )

    return Recording(recipe.config)


def _train_recipes(
    rank: int, root: str, names: list[str], mode: str, changes: dict[str, Any]
) -> None:
    """One distributed run per recipe; each rank writes its per-step digests."""
    logs: dict[str, list[dict[str, str]]] = {}
    for name in names:
        logs[name] = []
        recipe = recording(build_recipe(name, SETS.get(name)), logs[name], mode == "ddp")
        train(recipe_config(name, distributed=mode, **changes), recipe, f"{root}/{name}")
    Path(root, f"digests-{rank}.json").write_text(json.dumps(logs))


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "step"]


def assert_follows(names: list[str], root: Path, tmp: Path, changes: dict[str, Any]) -> None:
    """Each 2-rank run against its 1-process twin, and the ranks' per-step digests."""
    digests = [json.loads((root / f"digests-{rank}.json").read_text()) for rank in range(WORLD)]
    for name in names:
        reference = tmp / "one" / name
        train(recipe_config(name, **changes), build_recipe(name, SETS.get(name)), reference)
        ours, theirs = step_losses(root / name), step_losses(reference)
        assert len(ours) == len(theirs) == 16
        rtol = TOLERANCE.get(name, STATISTICAL)
        if name in RESIDUAL:
            assert_close_with_batchnorm(name, ours, theirs)
        else:
            worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))
            assert worst <= rtol, f"{name}: loss {ours} vs {theirs} (worst relative {worst:.2g})"
        summary = json.loads((root / name / "summary.json").read_text())
        one = json.loads((reference / "summary.json").read_text())
        assert summary["steps"] == one["steps"]
        if rtol == EXACT:  # the same products on the same operands: the same BitOPs
            assert summary["bitops_train"] == one["bitops_train"]
            assert summary["test_acc"] == one["test_acc"]
        per_rank = [d[name] for d in digests]
        assert len(per_rank[0]) == 16
        assert [s["state"] for s in per_rank[0]] == [s["state"] for s in per_rank[1]], name
        # Stochastic-rounding streams: each rank's own.
        assert all(a["rng"] != b["rng"] for a, b in zip(*per_rank, strict=True)), name


# ---- two ranks against one process ---------------------------------------------------------


def test_ddp_two_ranks_follow_one_process(tmp_path: Path) -> None:
    """fp32 exactly; sbm8 (running ranges, SR), qat (LSQ steps set from each rank's first
    batch, then averaged) and selfcompress (channels removed, DDP rebuilt) on 2 ranks."""
    names = ["fp32", "sbm8", "qat", "selfcompress"]
    run_ranks(_train_recipes, str(tmp_path / "ddp"), names, "ddp", {})
    assert_follows(names, tmp_path / "ddp", tmp_path, {})
    events = [r for r in read_metrics(tmp_path / "ddp" / "selfcompress") if r["kind"] == "recipe"]
    assert any(e["event"] == "removed" for e in events)  # the rebuild was exercised
    config = json.loads((tmp_path / "ddp" / "fp32" / "config.json").read_text())
    assert config["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_recipe_follows_one_process(tmp_path: Path, mode: str) -> None:
    """Every registered recipe (FSDP2: every shardable one) on 2 ranks against 1 process."""
    names = [n for n in sorted(RECIPES) if mode == "ddp" or RECIPES[n].shardable]
    run_ranks(_train_recipes, str(tmp_path / mode), names, mode, {}, timeout=900)
    assert_follows(names, tmp_path / mode, tmp_path, {})


def _train_cnn(rank: int, root: str, names: list[str]) -> None:
    for name in names:
        config = small_config(model="cnn", width=4, distributed="ddp")
        train(config, build_recipe(name), f"{root}/{name}")


@pytest.mark.slow
def test_batchnorm_per_rank_statistics(tmp_path: Path) -> None:
    """A CNN with BatchNorm (Range BN under sbm8): each rank normalises its half batch with its
    own statistics (SyncBatchNorm is CUDA only), so 2 x B/2 is not 1 x B; the trajectories
    stay close (``BATCH_STATISTICS``)."""
    names = ["fp32", "sbm8"]
    run_ranks(_train_cnn, str(tmp_path / "ddp"), names)
    for name in names:
        reference = tmp_path / "one" / name
        train(small_config(model="cnn", width=4), build_recipe(name), reference)
        ours, theirs = step_losses(tmp_path / "ddp" / name), step_losses(reference)
        assert_close_with_batchnorm(name, ours, theirs)


# ---- checkpoints --------------------------------------------------------------------------


class Interrupted(Exception):
    """A run stopped on purpose at a given step (on every rank)."""


def interrupted(recipe: Recipe, at: int) -> Recipe:
    class Stopping(type(recipe)):  # type: ignore[misc, valid-type]
        def schedule(self, step: int, total_steps: int) -> Any:
            if step == at:
                raise Interrupted(step)
            return super().schedule(step, total_steps)

    return Stopping(recipe.config)


def _straight_interrupted_resumed(rank: int, root: str, name: str, mode: str) -> None:
    config = small_config(distributed=mode, checkpoint_every=3)
    train(config, build_recipe(name), f"{root}/straight")
    with pytest.raises(Interrupted):
        train(config, interrupted(build_recipe(name), 10), f"{root}/resumed")
    train(config, build_recipe(name), f"{root}/resumed", resume=True)


def assert_same_run(straight: Path, resumed: Path) -> None:
    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert strip(read_metrics(resumed)) == strip(read_metrics(straight))
    a = torch.load(straight / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(resumed / CHECKPOINT_FILE, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fsdp_checkpoints_and_resumes(tmp_path: Path) -> None:
    """FSDP2 with sbm8 (running ranges, per-rank SR streams): a run interrupted at step 10 and
    resumed from its step-9 checkpoint (sharded model and optimizer from
    torch.distributed.checkpoint, each rank's RNG stream) ends as the straight run, bit for
    bit; load_run reads the gathered copy and scores the run's test accuracy."""
    root = tmp_path / "fsdp"
    run_ranks(_straight_interrupted_resumed, str(root), "sbm8", "fsdp")
    assert_same_run(root / "straight", root / "resumed")
    manifest = json.loads((root / "resumed" / MANIFEST_FILE).read_text())
    sharded = root / "resumed" / manifest["sharded"]["dir"]
    shards = sorted(p.name for p in sharded.iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert list(sharded.parent.iterdir()) == [sharded]  # older ones are deleted once replaced
    run = load_run(root / "resumed")
    summary = json.loads((root / "resumed" / "summary.json").read_text())
    assert run.evaluate()["test_acc"] == summary["test_acc"]
    assert run.step == 16


@pytest.mark.slow
def test_ddp_checkpoints_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "ddp"
    run_ranks(_straight_interrupted_resumed, str(root), "ui8", "ddp")
    assert_same_run(root / "straight", root / "resumed")
    state = torch.load(root / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert state["distributed"]["world_size"] == 2 and len(state["distributed"]["rng"]) == 2


# ---- a killed rank, through torchrun and the command line ----------------------------------


def _torchrun(out: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc-per-node={WORLD}",
        f"--master-port={_free_port()}",
        "-m", "qtrain", "train", "--distributed", "ddp", "--recipe", "sbm8",
        "--model", "mlp", "--width", "16", "--data", "synthetic", "--data-arg", "shape=[1,8,8]",
        "size=2048", "test_size=64", "num_classes=4", "--epochs", "2", "--batch-size", "32",
        "--no-augment", "--checkpoint-every", "8", "--log-every", "4", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _workers(launcher: int) -> list[int]:
    """The worker processes torchrun started (children of its agent)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_killed_rank_leaves_a_run_that_resumes(tmp_path: Path) -> None:
    """`torchrun -m qtrain train --distributed ddp`: rank 1 killed (SIGKILL) after a
    checkpoint; torchrun stops rank 0; `--resume` under torchrun continues from the
    checkpoint and ends where an uninterrupted run ends."""
    straight = _torchrun(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()
    out = tmp_path / "killed"
    launcher = _torchrun(out)
    deadline = time.monotonic() + 600
    manifest = out / MANIFEST_FILE
    while not manifest.exists():
        assert launcher.poll() is None, launcher.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = _workers(launcher.pid)
    assert len(workers) == WORLD
    os.kill(workers[-1], signal.SIGKILL)
    assert launcher.wait(timeout=600) != 0
    step = json.loads(manifest.read_text())["step"]
    assert 0 < step < 128
    resumed = _torchrun(out, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()
    assert_same_run(tmp_path / "straight", out)


def _leave_session(rank: int, root: str) -> None:
    """Rank 0 lingers in the session; rank 1 records whether rank 0 was done when it left."""
    with distributed.session("ddp", "cpu"):
        if rank == 0:
            time.sleep(0.5)
            Path(root, "rank0-done").touch()
    if rank == 1:
        Path(root, "rank1-left").write_text(str(Path(root, "rank0-done").exists()))


def test_no_rank_leaves_a_session_before_the_others(tmp_path: Path) -> None:
    """A rank that exits while gloo's thread still holds its last collective's work (Python
    tensors of all_gather_object, which that thread frees under the GIL) aborts in interpreter
    teardown; a session ends with every rank done, so none exits that early."""
    run_ranks(_leave_session, str(tmp_path))
    assert (tmp_path / "rank1-left").read_text() == "True"


# ---- options ------------------------------------------------------------------------------


def test_options_a_distributed_run_refuses() -> None:
    with pytest.raises(TrainConfigError, match="stops at a NaN/inf"):
        small_config(distributed="ddp", on_nonfinite="skip")
    with pytest.raises(TrainConfigError, match="CUDA"):
        small_config(distributed="ddp", sync_batchnorm=True)
    with pytest.raises(TrainConfigError, match="unknown distributed"):
        small_config(distributed="horovod")


def test_cli_needs_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qtrain.cli import main

    env = {name: os.environ.pop(name) for name in ("RANK", "WORLD_SIZE") if name in os.environ}
    try:
        options = ["--model", "mlp", "--data", "synthetic", "--epochs", "1"]
        code = main(["train", "--recipe", "fp32", *options, "--distributed", "ddp",
                     "--out", str(tmp_path / "run")])  # fmt: skip
    finally:
        os.environ.update(env)
    assert code == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_python_m_qtrain_is_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qtrain", "recipes"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "sbm8" in result.stdout


# ---- what the ranks agree on --------------------------------------------------------------


def test_state_tensors_are_the_quantizers_state() -> None:
    """Running ranges, BatchNorm statistics, LSQ's steps and flags; not counters, not
    non-persistent buffers, not empty (not yet observed) lazy buffers."""
    from torch import nn

    from qtrain import formats
    from qtrain.observers import LSQStep, RunningMinMax
    from qtrain.quantizer import QuantSpec

    observer, step = RunningMinMax(), LSQStep(signed="auto")
    model = nn.ModuleDict({"bn": nn.BatchNorm1d(3), "range": observer, "lsq": step})
    model.register_buffer("derived", torch.ones(2), persistent=False)
    found = {id(t) for t in distributed.state_tensors(model)}
    assert id(observer.low) not in found  # empty until the first tensor
    bn = model["bn"]
    assert {id(bn.running_mean), id(bn.running_var), id(step.step)} <= found
    assert {id(step.initialised), id(step.unsigned)} <= found
    assert id(bn.num_batches_tracked) not in found and id(model.derived) not in found
    observer.qparams(torch.tensor([0.0, 2.0]), QuantSpec(formats.UINT8))
    assert id(observer.low) in {id(t) for t in distributed.state_tensors(model)}


def test_sync_batchnorm_replaces_plain_batchnorm_only() -> None:
    from torch import nn

    from qtrain.nn import RangeBatchNorm2d

    model = nn.Sequential(nn.BatchNorm2d(4), RangeBatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    model[0].running_mean.fill_(0.5)
    distributed.to_sync_batchnorm(model)
    assert [type(m).__name__ for m in (model[0], model[1], model[2][0])] == [
        "SyncBatchNorm", "RangeBatchNorm2d", "SyncBatchNorm",
    ]  # fmt: skip
    assert torch.equal(model[0].running_mean, torch.full((4,), 0.5))
