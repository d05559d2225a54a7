"""A run directory's files: written atomically, checkpoints checksummed and loaded as data only.

- ``config.json`` — the ``TrainConfig``, the recipe's name and config, library versions;
- ``metrics.jsonl`` — one JSON object per logged step, epoch or fault;
- ``checkpoint.pt`` — model, optimizer, recipe, guard, RNG streams and progress, written
  atomically with its SHA-256 in ``checkpoint.manifest.json``; loaded only with
  ``torch.load(..., weights_only=True)`` after the checksum matches (``read_checkpoint``);
- ``summary.json`` — the final figures;
- ``checkpoint.dcp/`` — an FSDP2 run's sharded model and optimizer state
  (``torch.distributed.checkpoint``, one directory per checkpoint), which the manifest names
  with a checksum (``sharded_digest``); its ``checkpoint.pt`` holds the model gathered whole.

A distributed run's rank 0 writes every file but the shards (docs/SCALING.md).

Example:
    >>> state = read_checkpoint("runs/example/checkpoint.pt")  # doctest: +SKIP
    >>> state["progress"]["step"]  # doctest: +SKIP
    63
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtrain.train.config import CheckpointError, _first_line

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.manifest.json"

# Keys of metric records that measure time; they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"wall_seconds", "epoch_seconds", "samples_per_second"})

_CHECKPOINT_KEYS = ("format", "model", "optimizer", "grad_scaler", "recipe", "rng", "progress")


def _write_temp(path: Path, write: Callable[[Any], Any]) -> Path:
    """Write a temp file beside ``path`` with ``write(file)`` and fsync it; return its path."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` and fsync the directory so the rename is durable."""
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync is POSIX only
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a torn one.
    """
    _commit(_write_temp(path, write), path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _sha256(path: Path) -> tuple[str, int]:
    """Hex SHA-256 and size in bytes of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sharded_digest(directory: Path) -> str:
    """SHA-256 over a sharded checkpoint directory: each file's name and SHA-256, sorted."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(directory)}\0{_sha256(file)[0]}\n".encode())
    return digest.hexdigest()


def _manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(MANIFEST_FILE)


def _write_checkpoint(
    path: Path,
    state: dict[str, Any],
    step: int,
    previous: dict[str, Any] | None,
    sharded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``state`` to ``path`` durably, with its checksum in the manifest; return its entry.

    ``previous`` is the manifest entry of the file now at ``path`` (None if there is none).
    ``sharded`` names the sharded checkpoint written with it (an FSDP2 run's directory and
    its checksum, ``sharded_digest``), which the entry then vouches for too.
    Order: the new file under a temp name, the manifest naming its checksum and the previous
    one, then the rename. A crash at any point leaves a file that the manifest vouches for:
    the previous one before the rename, the new one after.
    """
    tmp = _write_temp(path, lambda f: torch.save(state, f))
    digest, size = _sha256(tmp)
    entry = {"file": path.name, "sha256": digest, "bytes": size, "step": step}
    if sharded is not None:
        entry["sharded"] = sharded
    _write_json(_manifest_path(path), {**entry, "previous": previous})
    _commit(tmp, path)
    return entry


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
            raise ValueError("no sha256 entry")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint manifest {manifest}: {err}") from None
    return data


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by ``train``: checksum verified, nothing but data unpickled.

    The file's SHA-256 must match its manifest (``checkpoint.manifest.json`` beside it), and it
    is loaded with ``torch.load(weights_only=True)``, which builds only tensors and plain
    containers and refuses any other object instead of running its code. A checkpoint from a
    qtrain without manifests (none beside it) is loaded with a warning. Raises
    ``CheckpointError`` naming the file when it is truncated, corrupted or unsafe.

    Example:
        >>> state = read_checkpoint("runs/example/checkpoint.pt")  # doctest: +SKIP
        >>> state["progress"]["step"]  # doctest: +SKIP
        63
    """
    path = Path(path)
    _verify_checkpoint(path)
    return _load_checkpoint_data(path)


def _verify_checkpoint(path: Path) -> dict[str, Any] | None:
    """The manifest entry that ``path``'s checksum matches (None: no manifest, legacy)."""
    manifest = _manifest_path(path)
    if not manifest.exists():
        warnings.warn(
            f"checkpoint {path} has no {MANIFEST_FILE} beside it (written by an older qtrain?): "
            "its integrity is not verified",
            stacklevel=3,
        )
        return None
    expected = _read_manifest(manifest)
    digest, size = _sha256(path)
    for entry in (expected, expected.get("previous")):
        if entry and entry.get("sha256") == digest:
            return {k: v for k, v in entry.items() if k != "previous"}
    raise CheckpointError(
        f"checkpoint {path} does not match its manifest {manifest.name} ({size} bytes, sha256 "
        f"{digest[:16]}…; expected {expected.get('bytes')} bytes, sha256 "
        f"{expected['sha256'][:16]}…): the file is truncated or corrupted; refusing it"
    )


def _load_checkpoint_data(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's restricted unpickler names what it refused in a long multi-line message.
        text = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe is not None:
            raise CheckpointError(
                f"refusing to load {path}: unpickling it would call {unsafe.group(1)}, which "
                "could run code; a checkpoint holds only tensors and plain data"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.DOTALL)
        raise _unreadable(path, reason.group(1) if reason else _first_line(err)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(path, _first_line(err)) from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a qtrain checkpoint: it lacks {missing}")
    return state


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read checkpoint {path}: {reason} (truncated, corrupted, or not a checkpoint)"
    )


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def versions() -> dict[str, str]:
    """Versions recorded in ``config.json`` so a run can be repeated."""
    try:
        qtrain_version = importlib.metadata.version("qtrain")
    except importlib.metadata.PackageNotFoundError:
        qtrain_version = "unknown (not installed)"
    return {
        "qtrain": qtrain_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ---- randomness ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from (torch CPU and CUDA, Python, NumPy)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
