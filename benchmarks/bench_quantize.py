"""Quantize throughput on 16M float32 values: reference vs cpu_fused vs torch, against the
memory bandwidth of ``torch.add(x, 1, out=y)`` measured in the same run.

Every row is timed once per round (after one untimed call), rounds interleaved, and reported
as the median over rounds, so load from other processes hits all rows alike. Throughput counts
8 bytes per element (one float32 read, one written) whatever a row really moves, so rows
compare as elements per second.

    python benchmarks/bench_quantize.py            # writes benchmarks/results/quantize.json
    python benchmarks/bench_quantize.py --clock cpu --out benchmarks/results/quantize_cpu.json
        # one thread, timed by its CPU time: steady figures on a machine shared with others
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qtrain
from qtrain import PerChannel, QuantSpec, Rounding, formats
from qtrain.kernels import Backend, cpu_fused, reference, use_backend

RESULTS = Path(__file__).parent / "results"
BYTES_PER_ELEMENT = 8
# The targets, as fractions of torch.add's bandwidth (int8, per-tensor, scale included).
TARGETS = {"nearest": 0.5, "stochastic": 0.35}


def machine_info() -> dict[str, object]:
    """CPU, cores, threads, versions and load: what a reader needs to compare figures."""
    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " + uncommitted changes" if changes else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "qtrain": qtrain.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0],
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timing_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: --rounds, --threads, --clock, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median; >= 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=Path, default=RESULTS / out)
    return parser


def set_clock_and_threads(clock: str, threads: int | None) -> Callable[[], float]:
    """The timer for ``clock``; ``cpu`` (this thread's CPU time, blind to time spent waiting
    for a core that other processes hold) needs all work on this thread: one torch thread."""
    if clock == "cpu":
        if threads not in (None, 1):
            raise SystemExit("--clock cpu measures this thread only: use it with --threads 1")
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return CLOCKS[clock]


def median_times(
    rows: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of each row over ``rounds`` interleaved rounds.

    Each timed call follows an untimed call of the same row: on the machine of
    docs/BENCHMARKS.md the first large allocation after another row freed much memory ran up to
    10× slower, a cost that would otherwise be charged to whichever row comes next.
    """
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            run()
            start = clock()
            run()
            times[name].append(clock() - start)
    return times


def run_kernel_rows(
    doc: str,
    out: str,
    benchmark: Callable[[int, int, Callable[[], float]], list[dict[str, object]]],
    threads: int | None = None,
) -> tuple[argparse.Namespace, dict[str, object], list[dict[str, object]]]:
    """The shared main of the kernel-against-PyTorch benchmarks: the timing options and
    ``--smoke`` (toy sizes, one round), at least 7 rounds, ``benchmark(shrink, rounds,
    clock)`` run (shrink: 64 for a smoke run, else 1), and the payload's common head (the
    machine, rounds, clock, smoke) with its rows. ``threads``: the default of ``--threads``."""
    parser = timing_parser(doc, out)
    if threads is not None:
        parser.set_defaults(threads=threads)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, one round")
    args = parser.parse_args()
    clock = set_clock_and_threads(args.clock, args.threads)
    rounds = 1 if args.smoke else max(args.rounds, 7)
    rows = benchmark(64 if args.smoke else 1, rounds, clock)
    head = {"machine": machine_info(), "rounds": rounds, "clock": args.clock, "smoke": args.smoke}
    return args, head, rows


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _quantize_rows(x: torch.Tensor, matrix: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The public ``qtrain.quantize`` (scale pass included) under each backend."""
    rows: dict[str, Callable[[], object]] = {}
    generator = torch.Generator().manual_seed(0)
    for backend in (Backend.REFERENCE, Backend.CPU_FUSED):
        for rounding in Rounding:
            per_tensor = QuantSpec(formats.INT8, rounding=rounding)
            per_channel = QuantSpec(formats.INT8, granularity=PerChannel(0), rounding=rounding)
            for name, tensor, spec in (
                ("int8 per-tensor", x, per_tensor),
                ("int8 per-channel", matrix, per_channel),
            ):

                def run(tensor=tensor, spec=spec, backend=backend) -> torch.Tensor:
                    with use_backend(backend):
                        return qtrain.quantize(tensor, spec, generator=generator)

                rows[f"{backend.value} quantize {name} {rounding.value}"] = run
    return rows


def benchmark(numel: int, rounds: int, clock: str) -> dict[str, object]:
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    matrix = x.view(4096, -1)  # a weight-like (out_channels, rest) matrix
    x3 = x.view(1, 1, -1)
    scale = reference.absmax(x3) / 127
    zero = torch.zeros(1)
    levels = cpu_fused.quant_int_levels(x3, scale, zero, -127, 127, None, torch.int8)
    e4m3 = formats.FP8_E4M3
    e4m3_args = (e4m3.exponent_bits, e4m3.mantissa_bits, e4m3.has_inf, e4m3.saturate)
    rows: dict[str, Callable[[], object]] = {
        "torch.add(x, 1, out=y)": lambda: torch.add(x, 1, out=out),
        "torch.fake_quantize_per_tensor_affine": lambda: torch.fake_quantize_per_tensor_affine(
            x, float(scale), 0, -127, 127
        ),
        **_quantize_rows(x, matrix),
        "cpu_fused absmax (scale pass only)": lambda: cpu_fused.absmax(x3),
        "cpu_fused fake_quant_int nearest (given scale)": lambda: cpu_fused.fake_quant_int(
            x3, scale, zero, -127, 127, None, False
        ),
        "cpu_fused fake_quant_int stochastic (given scale)": lambda: cpu_fused.fake_quant_int(
            x3, scale, zero, -127, 127, 1, False
        ),
        "cpu_fused quant_int_levels int8 stochastic": lambda: cpu_fused.quant_int_levels(
            x3, scale, zero, -127, 127, 1, torch.int8
        ),
        "cpu_fused dequant_int int8": lambda: cpu_fused.dequant_int(levels, scale, zero),
        "reference fake_quant_minifloat fp8_e4m3 nearest": lambda: reference.fake_quant_minifloat(
            x, *e4m3_args, None
        ),
        "cpu_fused fake_quant_minifloat fp8_e4m3 nearest": lambda: cpu_fused.fake_quant_minifloat(
            x, *e4m3_args, None
        ),
        "cpu_fused fake_quant_minifloat fp8_e4m3 stochastic": lambda: (
            cpu_fused.fake_quant_minifloat(x, *e4m3_args, 1)
        ),
        "torch x.to(float8_e4m3fn)": lambda: x.to(torch.float8_e4m3fn),
        "torch x.to(float8_e4m3fn).float()": lambda: x.to(torch.float8_e4m3fn).float(),
    }
    times = median_times(rows, rounds, CLOCKS[clock])
    baseline = statistics.median(times["torch.add(x, 1, out=y)"])
    results = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        results.append(
            {
                "name": name,
                "median_ms": round(median * 1e3, 3),
                "min_ms": round(min(seconds) * 1e3, 3),
                "gb_per_s": round(BYTES_PER_ELEMENT * numel / median / 1e9, 2),
                "ratio_to_add": round(baseline / median, 3),
            }
        )
    by_name = {row["name"]: row for row in results}
    targets = {
        rounding: {
            "target_ratio": target,
            "measured_ratio": by_name[f"cpu_fused quantize int8 per-tensor {rounding}"][
                "ratio_to_add"
            ],
        }
        for rounding, target in TARGETS.items()
    }
    for entry in targets.values():
        entry["met"] = entry["measured_ratio"] >= entry["target_ratio"]
    return {
        "machine": machine_info(),
        "numel": numel,
        "rounds": rounds,
        "clock": clock,
        "bytes_per_element": BYTES_PER_ELEMENT,
        "rows": results,
        "targets": targets,
    }


def main() -> None:
    parser = timing_parser(__doc__, "quantize.json")
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    args = parser.parse_args()
    set_clock_and_threads(args.clock, args.threads)
    payload = benchmark(args.numel, max(args.rounds, 5), args.clock)
    write_json(args.out, payload)
    width = max(len(row["name"]) for row in payload["rows"])
    print(f"{'row':{width}}  median ms    GB/s  × add")
    for row in payload["rows"]:
        print(
            f"{row['name']:{width}}  {row['median_ms']:9.2f}  {row['gb_per_s']:6.2f}"
            f"  {row['ratio_to_add']:5.2f}"
        )
    for rounding, entry in payload["targets"].items():
        verdict = "met" if entry["met"] else "NOT met"
        print(
            f"target {rounding}: ≥ {entry['target_ratio']}× add, measured "
            f"{entry['measured_ratio']}× — {verdict}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
