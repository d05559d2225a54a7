"""Data-parallel training on PyTorch's own engine: ``torchrun``, DDP and FSDP2.

``qtrain train --distributed ddp|fsdp`` under ``torchrun --nproc-per-node N -m qtrain train
...`` runs one process per rank; the trainer (``qtrain.train``) asks this module for the
process group (``session``), wraps the model (``wrap``) and, once per step, agrees on
everything the ranks must share (``agree_step``):

- the step's task loss, correct predictions, targets, samples and cost (MACs, BitOPs,
  energy): summed over ranks, so metrics, BitOPs and the recipes' ``on_step_end`` see the
  global batch — PFQ's loss plateaus and CPT's range test decide alike on every rank;
- every quantizer's data-dependent state (``state_tensors``): each persistent floating-point
  buffer of the model (observers' running ranges, clip values, per-channel clip state,
  distances; Range BN and BatchNorm running statistics) and each observer's own extra
  tensors (``Observer.sync_tensors``, e.g. LSQ's data-initialised steps) becomes its mean over
  the ranks; a boolean buffer holds where it holds on every rank;
- under FSDP2, the gradients of the parameters it leaves replicated (observers' parameters,
  e.g. LSQ steps: FSDP2 does not reduce them), averaged before the optimizer step.

All of it travels in one float64 ``all_reduce`` per step, after backward and before the
optimizer step (UI8's learning-rate scaling reads the agreed d_c). Model gradients are
DDP's / FSDP2's own collectives. Averaging identical values in float64 gives them back
exactly, so state that already agrees is left bit for bit as it was.

Example (two processes on one machine, gloo on the CPU):
    $ torchrun --nproc-per-node 2 -m qtrain train --distributed ddp --recipe sbm8 \\
        --model cnn --data synthetic --epochs 1 --out runs/ddp
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qtrain.cost import ROLES, StepCost
from qtrain.observers import Observer

MODES = ("none", "ddp", "fsdp")

# torchrun sets these; RANK and WORLD_SIZE are what a process needs to join its group.
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """The process group cannot be set up (not under torchrun, a bad backend or device)."""


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in a data-parallel run.

    Attributes:
        mode: ``"ddp"`` or ``"fsdp"``.
        rank, world_size: this process's rank among ``world_size`` processes.
        local_rank: its rank on its machine (its GPU index under nccl).
        device: the device this rank computes on (``cuda:<local_rank>`` for a CUDA run).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
    """

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        """What config.json records of the run's processes."""
        return {"mode": self.mode, "world_size": self.world_size, "backend": self.backend}


@contextlib.contextmanager
def session(mode: str, device: str) -> Iterator[Context | None]:
    """The process group of a ``--distributed`` run (None for ``mode="none"``).

    Joins the group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) with gloo for a CPU run and nccl for a CUDA run (each
    rank on ``cuda:LOCAL_RANK``), unless ``torch.distributed`` is initialised already; a group
    created here is destroyed on exit. Leaving the block normally waits for every rank.
    """
    if mode == "none":
        yield None
        return
    if mode not in MODES:
        raise DistributedError(f"unknown distributed mode {mode!r}; choose from {MODES}")
    device_type = torch.device(device).type
    backend = "nccl" if device_type == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        missing = [name for name in _ENV if name not in os.environ]
        if missing:
            raise DistributedError(
                f"--distributed {mode} runs one process per rank under torchrun "
                f"(torchrun --nproc-per-node N -m qtrain train ...); {', '.join(missing)} "
                "not set"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_id = None
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank)
        dist.init_process_group(backend, device_id=device_id)
        created = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    compute = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    try:
        yield Context(mode, rank, world_size, local_rank, compute, dist.get_backend())
        # No rank leaves before every rank is done. Gloo drops a finished collective's work on
        # its own thread, and where that frees a tensor Python created (all_gather_object's
        # buffers) the thread takes the GIL: a process already finalizing its interpreter then
        # aborts ("terminate called without an active exception"). The barrier's work holds no
        # Python tensor and finishes only after the last collective's, so the process exits
        # with the gloo threads idle (DDP keeps the group alive past destroy_process_group).
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams (stochastic rounding, dropout): distinct per
    rank, a pure function of the run's seed, so a run repeats (and resumes) exactly."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**63


# ---- wrapping ------------------------------------------------------------------------------


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """The module the training forward runs through: ``DistributedDataParallel`` around
    ``model`` (``model`` stays the one the recipes, the checkpoints and the cost meter see), or
    ``model`` itself sharded in place by FSDP2's ``fully_shard`` (each direct child with
    parameters, then the root; observers' parameters stay replicated: ``ignored_params``).

    DDP does not broadcast buffers: the step's agreement averages them instead.
    """
    if context.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # Buffers are agreed by the step's collective, not broadcast from rank 0 each forward.
        names = inspect.signature(DistributedDataParallel).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    ignored = set(replicated_parameters(model))
    # Gathered layer by layer in forward, kept to the end of backward: an in-place op on a
    # layer's output view (a ReLU after int8-gemm's layers) hides that output from FSDP2's
    # pre-backward hook, which would otherwise leave the layer's weight freed in backward.
    options = {"mesh": mesh, "ignored_params": ignored, "reshard_after_forward": False}
    # FSDP2 warns of exactly that case at every such layer; kept gathered, it is harmless.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    for child in model.children():
        if any(p not in ignored for p in child.parameters()):
            fully_shard(child, **options)
    fully_shard(model, **options)
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP2 leaves whole on every rank: those of observers (LSQ's steps), which
    observers set from data and read outside a layer's forward."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Observer):
            for param in module.parameters():
                found.setdefault(id(param), param)
    return list(found.values())


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Plain BatchNorm layers (exactly ``nn.BatchNorm1d/2d/3d``; Range BN and other subclasses
    keep their own statistics) as ``nn.SyncBatchNorm``: batch statistics over the global
    batch, one collective per layer and pass. CUDA only (torch's SyncBatchNorm)."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for name, module in list(model.named_modules()):
        if name and type(module) in plain:
            sync = nn.SyncBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            ).to(next(itertools.chain(module.parameters(), module.buffers())).device)
            sync.load_state_dict(module.state_dict())
            sync.train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, sync)
    return model


# ---- the step's agreement ------------------------------------------------------------------


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors whose values the ranks agree on after each step, in a fixed order (the
    model's): every persistent, non-empty floating-point or boolean buffer, then each
    observer's ``sync_tensors()`` beyond its buffers (LSQ's steps)."""
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        for name, buffer in module._buffers.items():
            if buffer is None or name in skip or not buffer.numel():
                continue
            if buffer.is_floating_point() or buffer.dtype == torch.bool:
                found.setdefault(id(buffer), buffer)
        if isinstance(module, Observer):
            for tensor in module.sync_tensors():
                found.setdefault(id(tensor), tensor)
    return list(found.values())


def _cost_numbers(cost: StepCost) -> list[float]:
    return [
        *(float(cost.macs[r]) for r in ROLES),
        *(cost.bitops[r] for r in ROLES),
        cost.energy_pj,
        float(cost.norm_macs),
        cost.norm_bitops,
    ]


def _cost_of(numbers: Sequence[float]) -> StepCost:
    cost = StepCost()
    n = len(ROLES)
    for i, role in enumerate(ROLES):
        cost.macs[role] = round(numbers[i])
        cost.bitops[role] = numbers[n + i]
    cost.energy_pj = numbers[2 * n]
    cost.norm_macs = round(numbers[2 * n + 1])
    cost.norm_bitops = numbers[2 * n + 2]
    return cost


@dataclasses.dataclass(frozen=True)
class StepTotals:
    """One step over all ranks: mean task loss, correct predictions, targets and samples of
    the global batch, its cost, and whether a rank saw a non-finite gradient (FSDP2)."""

    loss: float
    correct: int
    count: int
    samples: int
    cost: StepCost
    gradients_finite: bool


_STEP_FIELDS = 5  # loss·count, correct, count, samples, max|local gradient|


def agree_step(
    model: nn.Module,
    loss: float,
    correct: int,
    count: int,
    samples: int,
    cost: StepCost,
    device: torch.device,
    gradient_check: Sequence[torch.Tensor] = (),
) -> StepTotals:
    """One all_reduce for the whole step: the step's numbers and cost summed, the
    quantizer state (``state_tensors``) averaged in place, the gradients of FSDP2's replicated
    parameters averaged in place; ``gradient_check`` (local gradient shards) is checked for
    NaN/inf on every rank at once."""
    world = dist.get_world_size()
    tensors = state_tensors(model)
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    peak = 0.0
    if gradient_check:
        peaks = torch._foreach_norm(list(gradient_check), math.inf)
        peak = float(torch.stack(peaks).max())
    head = [loss * count, float(correct), float(count), float(samples), peak]
    head += _cost_numbers(cost)
    parts = [torch.tensor(head, dtype=torch.float64, device=device)]
    parts += [t.detach().reshape(-1).to(device, torch.float64) for t in (*tensors, *grads)]
    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    dist.all_reduce(flat)
    numbers = flat[: len(head)].tolist()
    sizes = [t.numel() for t in (*tensors, *grads)]
    values = flat[len(head) :].split(sizes) if sizes else []
    with torch.no_grad():
        for target, total in zip((*tensors, *grads), values, strict=True):
            if target.dtype == torch.bool:
                target.copy_((total == world).view_as(target))
            else:
                target.copy_((total / world).view_as(target))
    total_count = round(numbers[2])
    return StepTotals(
        loss=numbers[0] / max(total_count, 1),
        correct=round(numbers[1]),
        count=total_count,
        samples=round(numbers[3]),
        cost=_cost_of(numbers[_STEP_FIELDS:]),
        gradients_finite=math.isfinite(numbers[4]),
    )


def all_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """``values`` summed over the ranks (float64; one collective)."""
    flat = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return flat.tolist()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
