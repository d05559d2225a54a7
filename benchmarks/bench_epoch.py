"""End to end: `qtrain train`'s epoch time per recipe on this CPU (issue 23's end-to-end figure).

Each run is its own `python -m qtrain train` process on the same data, model, batch and seed;
the recipes take turns over ``--repeats`` rounds (so a drift of the machine's speed spreads
over all of them), and each run's ``epoch_seconds`` and peak memory come from its
``summary.json``. Ratios are to fp32's run of the same round, and their medians over the
rounds. A recipe is a name, or a name and ``--set`` options after colons:
``int8-gemm:amp=bf16``, ``int8-gemm:amp=bf16:emulate=true``.

    python benchmarks/bench_epoch.py     # ResNet-9 w64, 1 epoch of 5,120 images, batch 256
    python benchmarks/bench_epoch.py --smoke  # a tiny MLP on synthetic data: checks the script
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_lowp_gemm import lscpu
from bench_quantize import RESULTS, machine_info, write_json

DEFAULT_RECIPES = "fp32,amp-bf16,int8-gemm,int8-gemm:amp=bf16"
# The run: ResNet-9 w64 on Fashion-MNIST, one epoch of 5,120 images (20 steps).
RUN = ["--model", "resnet9", "--width", "64", "--data", "fashion-mnist", "--epochs", "1",
       "--train-subset", "5120", "--test-subset", "1000", "--batch-size", "256"]  # fmt: skip
SMOKE_RUN = ["--model", "mlp", "--width", "16", "--data", "synthetic", "--epochs", "1",
             "--batch-size", "32"]  # fmt: skip


def recipe_command(recipe: str, run: list[str], seed: int, out: Path) -> list[str]:
    """The `qtrain train` command of ``recipe`` ("name" or "name:key=value[:key=value...]")."""
    name, *options = recipe.split(":")
    command = [sys.executable, "-m", "qtrain", "train", "--recipe", name, *run]
    command += ["--seed", str(seed), "--quiet", "--out", str(out)]
    if options:
        command += ["--set", *options]
    return command


def run_recipe(recipe: str, run: list[str], seed: int, out: Path) -> dict[str, object]:
    command = recipe_command(recipe, run, seed, out)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "recipe": recipe,
        "epoch_seconds": summary["epoch_seconds"][0],
        "wall_seconds": summary["wall_seconds"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "test_acc": summary["test_acc"],
    }


def summarise(runs: list[dict[str, object]], recipes: list[str]) -> list[dict[str, object]]:
    """Per recipe: the median epoch time, and the median over rounds of its ratio to fp32's
    run of the same round (None without an fp32 run)."""
    rows = []
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        ratios = []
        for run in mine:
            base = [r for r in runs if r["recipe"] == "fp32" and r["round"] == run["round"]]
            if base:
                ratios.append(run["epoch_seconds"] / base[0]["epoch_seconds"])
        rows.append(
            {
                "recipe": recipe,
                "median_epoch_seconds": statistics.median(r["epoch_seconds"] for r in mine),
                "epoch_seconds": [r["epoch_seconds"] for r in mine],
                "ratio_to_fp32": [round(x, 3) for x in ratios],
                "median_ratio_to_fp32": round(statistics.median(ratios), 3) if ratios else None,
                "peak_memory_bytes": [r["peak_memory_bytes"] for r in mine],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=DEFAULT_RECIPES,
                        help=f"comma-separated recipes, name[:key=value]... (default: "
                             f"{DEFAULT_RECIPES})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny MLP on synthetic data")
    parser.add_argument("--out", type=Path, default=RESULTS / "epoch_cpu.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    recipes = [recipe for recipe in args.recipes.split(",") if recipe]
    run = SMOKE_RUN if args.smoke else RUN
    runs = []
    with tempfile.TemporaryDirectory(prefix="qtrain-epoch-") as scratch:
        for round_index in range(args.repeats):
            for index, recipe in enumerate(recipes):
                out = Path(scratch, f"r{round_index}-{index}")
                row = run_recipe(recipe, run, args.seed, out)
                runs.append({**row, "round": round_index})
                print(f"round {round_index} {recipe:28} epoch {row['epoch_seconds']:8.2f} s")
    payload = {
        "machine": {**machine_info(), "lscpu": lscpu()},
        "smoke": args.smoke,
        "commands": {
            r: shlex.join(recipe_command(r, run, args.seed, Path("OUT"))) for r in recipes
        },
        "runs": runs,
        "summary": summarise(runs, recipes),
    }
    write_json(args.out, payload)
    print(f"\n{'recipe':28} {'median epoch s':>15} {'÷ fp32 (median of rounds)':>26}")
    for row in payload["summary"]:
        ratio = "" if row["median_ratio_to_fp32"] is None else f"{row['median_ratio_to_fp32']:.3f}"
        print(f"{row['recipe']:28} {row['median_epoch_seconds']:15.2f} {ratio:>26}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
