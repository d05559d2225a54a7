"""The trainer's small helpers: checks of a run's options, its metrics records and progress
bar, and what counts as running out of memory or as a non-finite tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch

from qtrain import distributed
from qtrain.recipes.base import Recipe
from qtrain.train.config import RESUME_MUTABLE, RunError, TrainConfig, TrainConfigError


def _check_distributed(config: TrainConfig, recipe: Recipe, context: distributed.Context) -> None:
    """What a distributed run needs of its options, checked alike on every rank."""
    world = context.world_size
    if config.batch_size % world:
        raise TrainConfigError(
            f"batch_size {config.batch_size} is the global batch: it must split evenly among "
            f"{world} processes (batch_size / {world} per rank)"
        )
    if context.mode == "fsdp" and not recipe.shardable:
        raise TrainConfigError(
            f"recipe {recipe.name} reads or reshapes whole parameters between steps, which "
            "FSDP2's shards do not allow; use --distributed ddp"
        )


def _check_same_run(
    saved: dict[str, Any],
    config: TrainConfig,
    recipe: Recipe,
    context: distributed.Context | None = None,
) -> None:
    """A resumed run must keep its config (only the ``RESUME_MUTABLE`` options may change)
    and, distributed, its number of processes."""
    world = saved.get("distributed", {}).get("world_size", 1)
    if context is not None and world != context.world_size:
        raise TrainConfigError(
            f"cannot resume a run of {world} process(es) with {context.world_size}: each "
            "rank's share of the data and its random streams are the run's own"
        )
    # Through TrainConfig, so that options added since the run started take their defaults.
    saved_train = TrainConfig.from_dict(saved["train"]).to_dict()
    ours = config.to_dict()
    changed = sorted(k for k, v in ours.items() if k not in RESUME_MUTABLE and saved_train[k] != v)
    if changed:
        raise TrainConfigError(f"cannot resume with changed train options: {changed}")
    if saved["recipe"] != recipe.name or saved["recipe_config"] != recipe.config.to_dict():
        raise TrainConfigError(
            f"cannot resume run of recipe {saved['recipe']} {saved['recipe_config']} with "
            f"{recipe.name} {recipe.config.to_dict()}"
        )


def _write_record(metrics: Any, record: dict[str, Any]) -> None:
    if metrics is None:  # a distributed run's rank other than 0
        return
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()  # a crash loses at most the record being written


def _skip(batches: Iterator[Any], count: int) -> Iterator[Any]:
    for index, batch in enumerate(batches):
        if index >= count:
            yield batch


def _progress_bar(total: int, initial: int, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=quiet, unit="step", dynamic_ncols=True, leave=False
    )


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A recipe's metrics without its per-layer dicts."""
    return {key: value for key, value in metrics.items() if not isinstance(value, dict)}


def _bar_postfix(bar: Any, record: dict[str, Any]) -> None:
    postfix = {"loss": f"{record['loss']:.3f}", "acc": f"{record['acc']:.3f}"}
    for key, value in record["metrics"].items():
        postfix.setdefault(key, f"{value:g}")
    postfix["img_s"] = f"{record['samples_per_second']:.0f}"
    bar.set_postfix(postfix, refresh=False)


# Messages of allocation failures: CUDA's, and the CPU allocator's (RuntimeError).
_OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return not isinstance(err, RunError) and any(m in text for m in _OUT_OF_MEMORY)


def _is_nonfinite(value: Any) -> bool:
    """A floating-point tensor holding NaN or inf."""
    return (
        torch.is_tensor(value)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _nonfinite_kind(tensor: torch.Tensor) -> str:
    return "nan" if bool(torch.isnan(tensor).any()) else "inf"
