"""An FSDP2 run's sharded checkpoints: every rank writes its shards of the model and optimizer
state (``torch.distributed.checkpoint``) into a directory of its own under ``checkpoint.dcp/``,
which the manifest of ``checkpoint.pt`` names with its checksum (``sharded_digest``);
``checkpoint.pt`` holds the model gathered whole, as ``load_run`` reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtrain import distributed
from qtrain.train.checkpoint import CHECKPOINT_FILE, sharded_digest
from qtrain.train.config import CheckpointError

# An FSDP2 run's sharded checkpoints (torch.distributed.checkpoint), one directory each.
SHARDED_DIR = "checkpoint.dcp"


def _save_sharded(
    out: Path,
    step: int,
    serial: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    context: distributed.Context,
) -> dict[str, Any]:
    """FSDP2: every rank writes its shards of the model and optimizer state into a new
    directory, the ``serial``-th of the run; returns what the manifest records of it (rank 0:
    with its checksum and the serial of the next one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDED_DIR}/step-{step:08d}-{serial}"
    if context.is_main:  # a directory of that name can only be a crash's leftover
        shutil.rmtree(out / name, ignore_errors=True)
    context.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / name)
    context.barrier()  # every shard is on disk before rank 0 vouches for them
    if not context.is_main:
        return {"dir": name}
    return {"dir": name, "sha256": sharded_digest(out / name), "serial": serial + 1}


def _gathered_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP2: the model's full state_dict on rank 0 (on the CPU), gathered from the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _remove_unused_sharded(out: Path, sharded: dict[str, Any]) -> None:
    """Once the new checkpoint.pt is in place, delete every sharded checkpoint but ``sharded``
    (the manifest's entry of the one it names): the previous one (needed only until that
    rename) and any a crash left half written."""
    keep = out / sharded["dir"]
    for directory in (out / SHARDED_DIR).glob("step-*"):
        if directory != keep:
            shutil.rmtree(directory, ignore_errors=True)


def _load_sharded(
    out: Path,
    sharded: dict[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """FSDP2: the model's and the optimizer's shards from the checkpoint's directory, after
    checking it against the manifest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if sharded is None:
        raise CheckpointError(f"{out / CHECKPOINT_FILE} names no sharded checkpoint")
    directory = out / sharded["dir"]
    if not directory.is_dir() or sharded_digest(directory) != sharded["sha256"]:
        raise CheckpointError(
            f"sharded checkpoint {directory} is missing or does not match its manifest "
            "(truncated or corrupted); refusing it"
        )
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=directory)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
    )
