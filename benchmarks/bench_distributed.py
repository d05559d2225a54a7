"""Training throughput of one process against two (DDP, FSDP2) on this machine's CPU cores.

Each row runs ``qtrain train`` on a small CNN (width 16, 1×28×28 synthetic images, 10
classes, global batch 128) in its own processes, one thread each (``OMP_NUM_THREADS=1``):

- ``1 process``: ``python -m qtrain train ...``;
- ``ddp 2 processes`` / ``fsdp 2 processes``: ``torchrun --nproc-per-node 2 -m qtrain train
  --distributed ddp|fsdp ...`` (gloo), 64 examples per rank and step.

Throughput is the trainer's own ``samples_per_second`` (global samples per second of the
logged windows, after the first window: start-up and first-call costs excluded), median over
the windows of a run, then median over ``--repeats`` runs. Rows run interleaved (one run of
each row per round). The 2-process rows need two free cores to show their speed-up: the JSON
records the load average before and after each run.

    python benchmarks/bench_distributed.py     # writes benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_quantize import machine_info, write_json

TRAIN = [
    "--model", "cnn", "--width", "16", "--data", "synthetic",
    "--data-arg", "shape=[1,28,28]", "size=4096", "test_size=256", "num_classes=10",
    "--batch-size", "128", "--epochs", "2", "--no-augment", "--log-every", "4", "--quiet",
]  # fmt: skip

ROWS = {
    "1 process": (1, "none"),
    "ddp 2 processes": (2, "ddp"),
    "fsdp 2 processes": (2, "fsdp"),
}


def lscpu() -> dict[str, str]:
    """lscpu's model name and flags (what the kernels may use)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags")
    return {key: fields[key].strip() for key in keep if key in fields}


def run(recipe: str, processes: int, mode: str, out: Path) -> dict[str, float]:
    """One training run; its steady throughput and wall time (process start included)."""
    python = Path(sys.executable)
    if processes == 1:
        command = [str(python), "-m", "qtrain", "train"]
    else:
        torchrun = str(python.with_name("torchrun"))
        command = [torchrun, f"--nproc-per-node={processes}", "-m", "qtrain", "train"]
        command += ["--distributed", mode]
    command += ["--recipe", recipe, *TRAIN, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    records = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"kind": "step"' in line
    ]
    rates = [r["samples_per_second"] for r in records[1:]]
    return {
        "samples_per_second": statistics.median(rates),
        "wall_seconds": wall,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="fp32,sbm8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.json"))
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        r: {row: [] for row in ROWS} for r in recipes
    }
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for recipe in recipes:
                for row, (processes, mode) in ROWS.items():
                    out = Path(tmp) / f"{recipe}-{mode}-{repeat}"
                    results[recipe][row].append(run(recipe, processes, mode, out))
                    print(f"{recipe:6s} {row:18s} {results[recipe][row][-1]}", file=sys.stderr)
    summary = {}
    for recipe, rows in results.items():
        base = statistics.median(r["samples_per_second"] for r in rows["1 process"])
        summary[recipe] = {
            row: {
                "samples_per_second": statistics.median(r["samples_per_second"] for r in runs),
                "speedup": statistics.median(r["samples_per_second"] for r in runs) / base,
                "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            }
            for row, runs in rows.items()
        }
    payload = {
        "machine": {**machine_info(), "lscpu": lscpu()},
        "command": " ".join(["python", *sys.argv]),
        "train_options": TRAIN,
        "summary": summary,
        "runs": results,
    }
    write_json(args.out, payload)
    for recipe, rows in summary.items():
        for row, figures in rows.items():
            print(
                f"{recipe:6s} {row:18s} {figures['samples_per_second']:8.0f} samples/s "
                f"x{figures['speedup']:.2f}  ({figures['wall_seconds']:.1f} s wall)"
            )


if __name__ == "__main__":
    main()
