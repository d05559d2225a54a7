"""Run files: written atomically in a durable order, checkpoints verified against the checksums
in their manifest, truncated or corrupted ones refused with an error naming the file, and a
pickle that would run code refused without running it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import faulty

from qtrain.cli import main
from qtrain.train import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    TIMING_KEYS,
    CheckpointError,
    read_checkpoint,
    read_metrics,
    train,
)

CLI_TINY = [
    "train", "--recipe", "sbm8", "--model", "cnn", "--data", "synthetic", "--epochs", "1",
    "--width", "4", "--batch-size", "32", "--quiet", "--checkpoint-every", "4",
    "--data-arg", "shape=[1,8,8]", "size=256", "test_size=64", "num_classes=4",
]  # fmt: skip


class Crash(BaseException):
    """A simulated crash: nothing in the trainer catches it, as nothing catches a SIGKILL."""


@pytest.fixture
def crashed_run(tmp_path: Path, tiny_config: Any) -> Path:
    """A sbm8 run crashed in step 7, with checkpoints after steps 2, 4 and 6."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(checkpoint_every=2), faulty(role="none", crash_at=6), run)
    return run


def resume(run: Path, tiny_config: Any) -> dict[str, Any]:
    return train(tiny_config(checkpoint_every=2), faulty(role="none"), run, resume=True)


# ---- corrupted and truncated files ------------------------------------------------------------


def truncate(keep: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return damage


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "empty": truncate(lambda size: 0),
    "one-byte": truncate(lambda size: 1),
    "half": truncate(lambda size: size // 2),
    "last-byte-missing": truncate(lambda size: size - 1),
    "one-bit-flipped": flip_a_byte,
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_checkpoint_is_refused_with_an_error_naming_it(
    crashed_run: Path, tiny_config: Any, damage: Callable[[Path], None]
) -> None:
    checkpoint = crashed_run / CHECKPOINT_FILE
    damage(checkpoint)
    for load in (lambda: read_checkpoint(checkpoint), lambda: resume(crashed_run, tiny_config)):
        with pytest.raises(CheckpointError, match="truncated or corrupted") as caught:
            load()
        assert str(checkpoint) in str(caught.value)


@pytest.mark.parametrize("damage", [DAMAGES["half"], DAMAGES["last-byte-missing"]])
def test_truncated_checkpoint_without_a_manifest_is_refused_by_the_loader(
    crashed_run: Path, damage: Callable[[Path], None]
) -> None:
    # A checkpoint of a qtrain before manifests: the zip reader still finds the damage.
    (crashed_run / MANIFEST_FILE).unlink()
    damage(crashed_run / CHECKPOINT_FILE)
    with (
        pytest.warns(UserWarning, match="integrity is not verified"),
        pytest.raises(CheckpointError, match="cannot read checkpoint .*checkpoint.pt"),
    ):
        read_checkpoint(crashed_run / CHECKPOINT_FILE)


def test_intact_checkpoint_without_a_manifest_still_resumes(
    crashed_run: Path, tiny_config: Any
) -> None:
    (crashed_run / MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="no checkpoint.manifest.json"):
        assert resume(crashed_run, tiny_config)["steps"] == 8


def test_cli_reports_a_damaged_checkpoint_in_one_line_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main([*CLI_TINY, "--out", str(run)]) == 0
    DAMAGES["half"](run / CHECKPOINT_FILE)
    capsys.readouterr()
    assert main([*CLI_TINY, "--out", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qtrain: error: checkpoint")
    assert str(run / CHECKPOINT_FILE) in err and "Traceback" not in err


# ---- pickles that would run code ----------------------------------------------------------------


class RunsCode:
    """Unpickling this object runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_torch_checkpoint(real: Path, marker: Path, out: Path) -> None:
    """A real checkpoint with the payload hidden in it, written by torch.save (zip format)."""
    state = read_checkpoint(real)
    state["progress"] = RunsCode(marker)
    torch.save(state, out)


def crafted_plain_pickle(real: Path, marker: Path, out: Path) -> None:
    """The payload as a bare pickle (the format of torch.save before zip files)."""
    out.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))


@pytest.mark.parametrize("craft", [crafted_torch_checkpoint, crafted_plain_pickle])
@pytest.mark.parametrize("manifest", ["matching", "absent"])
def test_pickle_that_would_run_code_is_refused_and_never_run(
    crashed_run: Path, tiny_config: Any, craft: Callable[..., None], manifest: str
) -> None:
    marker = crashed_run.parent / "code-ran"
    checkpoint = crashed_run / CHECKPOINT_FILE
    crafted = crashed_run.parent / "crafted.pt"
    craft(checkpoint, marker, crafted)
    # The file is a working exploit: an unrestricted load runs its code (then may fail).
    with contextlib.suppress(Exception):
        torch.load(crafted, weights_only=False)
    assert marker.exists()
    marker.unlink()

    shutil.copy(crafted, checkpoint)
    manifest_path = crashed_run / MANIFEST_FILE
    if manifest == "absent":
        manifest_path.unlink()
        expect_warning: Any = pytest.warns(UserWarning, match="integrity is not verified")
    else:  # who can write the checkpoint can write its manifest as well
        data = checkpoint.read_bytes()
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": 6}
        manifest_path.write_text(json.dumps({"file": CHECKPOINT_FILE, **entry, "previous": None}))
        expect_warning = contextlib.nullcontext()
    with expect_warning, pytest.raises(CheckpointError, match="refusing to load .*run code"):
        resume(crashed_run, tiny_config)
    assert not marker.exists()


# ---- durable order and crashes inside a write --------------------------------------------------


def test_files_are_written_through_fsynced_temps_in_a_durable_order(
    tmp_path: Path, tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        fsync(fd)

    def logged_replace(src: Any, dst: Any) -> None:
        events.append(("rename", f"{Path(src).name} -> {Path(dst).name}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    train(tiny_config(checkpoint_every=4), faulty(role="none"), tmp_path / "run")

    commit = ("rename", ".checkpoint.pt.tmp -> checkpoint.pt")
    assert events.count(commit) == 2  # after steps 4 and 8
    first = events.index(commit)
    # Metrics on disk, then the new file, then the manifest naming it, then the rename, and
    # the directory entry made durable.
    assert events[first - 5 : first + 2] == [
        ("fsync", "metrics.jsonl"),
        ("fsync", ".checkpoint.pt.tmp"),
        ("fsync", ".checkpoint.manifest.json.tmp"),
        ("rename", ".checkpoint.manifest.json.tmp -> checkpoint.manifest.json"),
        ("fsync", "run"),
        commit,
        ("fsync", "run"),
    ]
    for name in ("config.json", "summary.json"):
        rename = ("rename", f".{name}.tmp -> {name}")
        assert events[events.index(rename) - 1] == ("fsync", f".{name}.tmp")


@pytest.mark.parametrize("crash_in", ["manifest", "rename"])
def test_crash_inside_a_checkpoint_write_loses_nothing(
    tmp_path: Path, tiny_config: Any, monkeypatch: pytest.MonkeyPatch, crash_in: str
) -> None:
    config = tiny_config(checkpoint_every=2)
    train(config, faulty(role="none"), tmp_path / "straight")

    replace = os.replace
    commits = 0

    def crashing_replace(src: Any, dst: Any) -> None:
        nonlocal commits
        target = {"manifest": MANIFEST_FILE, "rename": CHECKPOINT_FILE}[crash_in]
        if Path(dst).name == target:
            commits += 1
            if commits == 3:  # the checkpoint after step 6; the one of step 4 is on disk
                raise Crash
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(Crash):
        train(config, faulty(role="none"), tmp_path / "resumed")
    monkeypatch.setattr(os, "replace", replace)
    # A record torn by the crash, as a kill in the middle of a write would leave it.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "step", "st')
    train(config, faulty(role="none"), tmp_path / "resumed", resume=True)

    expected = read_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)["model"]
    got = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    def records(run: str) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_metrics(tmp_path / run)
        ]

    assert records("resumed") == records("straight")
