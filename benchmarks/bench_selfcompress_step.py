"""The training step of self-compressed networks against the same network before compression:
what the removed channels save in wall time, free of the load that skews a run's epoch times.

For each finished ``selfcompress`` run: the model as the run ends (``qtrain.load_run``: the
removals replayed, the learned bits) and the same architecture freshly prepared by the recipe
(every channel, ``bits_init`` bits). One training step each — forward, the size loss, backward,
SGD — on one batch of the run's training images, alternated A, B, A, B, ... and timed per
step; the medians and their ratio. One thread unless ``--threads``.

    python benchmarks/bench_selfcompress_step.py runs/i18/sc2-g* --repeats 15 \\
        --json benchmarks/results/selfcompress_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qtrain
from bench_distributed import lscpu
from bench_quantize import machine_info, write_json
from qtrain.models import build_model
from qtrain.recipes import build_recipe


def stepper(model: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor):
    """A closure running one training step of ``model`` (the recipe's size loss included)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        extra = recipe.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def measure(run_dir: Path, batch: int, repeats: int) -> dict:
    run = qtrain.load_run(run_dir)
    config = run.config
    recipe_config = json.loads((run_dir / "config.json").read_text())["recipe_config"]
    fresh_recipe = build_recipe("selfcompress", recipe_config)
    fresh = build_model(
        config.model,
        input_shape=run.data.input_shape,
        num_classes=run.data.num_classes,
        width=config.width,
        **config.model_kwargs,
    )
    fresh = fresh_recipe.prepare(fresh)
    x, y = run.data.train_x[:batch].float(), run.data.train_y[:batch]
    steps = {"initial": stepper(fresh, fresh_recipe, x, y),
             "compressed": stepper(run.model, run.recipe, x, y)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step(), step()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    medians = {name: statistics.median(t) for name, t in times.items()}
    weights = {
        name: sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        for name, model in (("initial", fresh), ("compressed", run.model))
    }
    return {
        "run": str(run_dir),
        "gamma": recipe_config.get("gamma"),
        "test_acc": run.summary.get("test_acc"),
        "weights": weights,
        "weights_left": weights["compressed"] / weights["initial"],
        "step_ms": {name: 1000 * m for name, m in medians.items()},
        "compressed_over_initial": medians["compressed"] / medians["initial"],
        "repeats": repeats,
        "batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| run | γ | weights left | step ms, initial | step ms, compressed | ratio |")
    print("|---|---|---|---|---|---|")
    for run_dir in args.runs:
        row = measure(run_dir, args.batch, args.repeats)
        rows.append(row)
        ms = row["step_ms"]
        print(
            f"| {run_dir} | {row['gamma']:g} | {100 * row['weights_left']:.1f}% | "
            f"{ms['initial']:.1f} | {ms['compressed']:.1f} | {row['compressed_over_initial']:.2f} |"
        )
    write_json(args.json, {
        "machine": {**machine_info(), "lscpu": lscpu()},
        "command": " ".join(["python", *sys.argv]),
        "threads": args.threads,
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
