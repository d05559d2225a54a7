"""What ``summary.json`` holds: a run's final figures — accuracy and loss, training cost
(BitOPs, MACs, energy), size (parameters, model bits), time, peak memory, and which products ran
as exact integer products.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch import nn

from qtrain.cost import model_bits
from qtrain.recipes.base import Recipe
from qtrain.train.config import TrainConfig
from qtrain.train.progress import _Progress


def _run_summary(
    config: TrainConfig,
    recipe: Recipe,
    model: nn.Module,
    progress: _Progress,
    device: torch.device,
) -> dict[str, Any]:
    """The run's summary, from its progress (wall time already synced) and its trained model."""
    p = progress
    peak, source = _peak_memory(device)
    return {
        "recipe": recipe.name,
        "model": config.model,
        "dataset": config.data,
        "epochs": config.epochs,
        "seed": config.seed,
        "steps": p.step,
        "test_acc": p.test_acc,
        "best_test_acc": p.best_test_acc,
        "final_train_loss": p.final_train_loss,
        "bitops_train": p.cost.total_bitops,
        "bitops_fp32_equiv": p.cost.bitops_fp32,
        "bitops_by_role": p.cost.bitops,
        "macs_by_role": p.cost.macs,
        # Of bitops_train and the MACs: the normalisation layers' part.
        "bitops_norm": p.cost.norm_bitops,
        "macs_norm": p.cost.norm_macs,
        "energy_pj": p.cost.energy_pj,
        "params_initial": p.params_initial,
        "params_final": _params(model),
        "model_bits": int(model_bits(model)),
        "metrics": recipe.metrics(),
        "epoch_seconds": p.epoch_seconds,
        "wall_seconds": p.wall_seconds,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "device": str(device),
        # Which products of each quantized layer ran as exact integer products (--products)
        "integer_products": _integer_products(model, config.products),
    }


def _integer_products(model: nn.Module, products: str) -> dict[str, list[str]]:
    if products == "float":
        return {}
    # Imported here: int_products loads torch._dynamo (through qtrain.lowp_products).
    from qtrain.int_products import integer_product_roles

    return integer_product_roles(model)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"
