"""Training memory of sbm8 with quantized saved activations vs float saved activations vs fp32.

Two figures per configuration, each from a fresh subprocess so nothing is shared:
- ``saved_bytes``: bytes of the distinct tensor storages autograd holds for backward after one
  forward pass (counted exactly with ``torch.autograd.graph.saved_tensors_hooks``);
- ``peak_rss_bytes``: the process's peak resident set size over 3 training steps
  (``resource.getrusage``), minus the peak RSS after building the model and the batch.

Usage: python benchmarks/bench_memory.py [--batch 256] [--width 16] [--channels-last] [--out FILE]

``--channels-last`` feeds the batch in channels-last memory format, as ``qtrain train``'s
augmented batches come (torch then runs the net NHWC, and so do qtrain's layers).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

CONFIGS = {
    "fp32": ("fp32", {}),
    "sbm8 (int8 saved activations)": ("sbm8", {}),
    "sbm8 (float saved activations)": ("sbm8", {"quantize_saved_activations": "false"}),
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(
    recipe_name: str, overrides: dict[str, str], batch: int, width: int, channels_last: bool
) -> dict:
    """One configuration, in this process."""
    import torch.nn.functional as F

    from qtrain.models import build_model
    from qtrain.recipes import build_recipe

    torch.manual_seed(0)
    recipe = build_recipe(recipe_name, overrides)
    model = recipe.prepare(
        build_model("resnet9", input_shape=(1, 28, 28), num_classes=10, width=width)
    )
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    parameter_bytes = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in parameter_bytes)
    baseline = _peak_rss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {"saved_bytes": saved, "peak_rss_bytes": _peak_rss() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one configuration
    args = parser.parse_args()
    if args.one:
        recipe_name, overrides = CONFIGS[args.one]
        measured = measure(recipe_name, overrides, args.batch, args.width, args.channels_last)
        print(json.dumps(measured))
        return
    rows = []
    for name in CONFIGS:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--batch",
                str(args.batch),
                "--width",
                str(args.width),
                *(["--channels-last"] if args.channels_last else []),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append({"name": name, **json.loads(child.stdout.strip().splitlines()[-1])})
    fp32 = rows[0]
    for row in rows:
        row["saved_ratio_to_fp32"] = round(row["saved_bytes"] / fp32["saved_bytes"], 3)
        row["peak_rss_ratio_to_fp32"] = round(row["peak_rss_bytes"] / fp32["peak_rss_bytes"], 3)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "name": "resnet9",
            "width": args.width,
            "input_shape": [1, 28, 28],
            "batch": args.batch,
            "channels_last": args.channels_last,
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['name']:34s} saved {row['saved_bytes'] / 2**20:8.1f} MiB "
            f"(x{row['saved_ratio_to_fp32']:.3f})  peak RSS +{row['peak_rss_bytes'] / 2**20:8.1f} "
            f"MiB (x{row['peak_rss_ratio_to_fp32']:.3f})"
        )


if __name__ == "__main__":
    main()
