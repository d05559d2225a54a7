"""Training-step time of a ResNet-9-like net (width 16, batch 256, 1×28×28, 10 classes): fp32
vs SBM 8-bit training (``qtrain.quantize_(model, "sbm8")``: 8-bit weights, activations and
layer gradients, a 16-bit grad-weight copy, Range BatchNorm), under the reference and the
cpu_fused kernels. Ratios are to the fp32 step measured in the same run.

Diagnostic rows split the overhead: fp32 layers with Range BatchNorm only; sbm8 with plain
BatchNorm; and sbm8's layers without quantization (Range BN, compact ReLU and max pool on the
same kernels), against which sbm8's ratio is the cost of quantization alone. A step is zero_grad + forward + cross-entropy + backward + SGD step on one
fixed synthetic batch; configs are timed in interleaved rounds and reported as medians.

    python benchmarks/bench_train_step.py            # writes benchmarks/results/train_step.json
    python benchmarks/bench_train_step.py --profile  # + the top ops of the cpu_fused sbm8 step
    python benchmarks/bench_train_step.py --clock cpu --out benchmarks/results/train_step_cpu.json
    python benchmarks/bench_train_step.py --clock cpu --isolated 5   # one process per config
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qtrain
from bench_quantize import (
    CLOCKS,
    RESULTS,
    machine_info,
    median_times,
    set_clock_and_threads,
    write_json,
)
from qtrain.api import QuantizedTrainingConfig
from qtrain.kernels import Backend, cpu_fused, use_backend
from qtrain.models import build_model
from qtrain.ops import GemmConfig
from qtrain.recipes.sbm import SBMConfig

BATCH, INPUT_SHAPE, CLASSES, WIDTH = 256, (1, 28, 28), 10, 16
TARGET_RATIO = 1.15  # the target for sbm8 with the fast kernels

# name -> (quantize_ config or None for plain fp32, backend)
CONFIGS: dict[str, tuple[object | None, Backend]] = {
    "fp32": (None, Backend.REFERENCE),
    "sbm8 reference": ("sbm8", Backend.REFERENCE),
    "sbm8 cpu_fused": ("sbm8", Backend.CPU_FUSED),
    "fp32 + Range BN only": (
        QuantizedTrainingConfig(GemmConfig(), range_batchnorm=True),
        Backend.CPU_FUSED,
    ),
    "sbm8 with plain BN, cpu_fused": (
        SBMConfig(range_batchnorm=False).quantization_config(),
        Backend.CPU_FUSED,
    ),
    # sbm8's layers without any quantization: Range BN (+ fused ReLU), compact ReLU and max
    # pool on the same kernels. sbm8 / this row is the cost of quantization alone.
    "fp32 + Range BN + compact layers": (
        QuantizedTrainingConfig(GemmConfig(), range_batchnorm=True, compact_activations=True),
        Backend.CPU_FUSED,
    ),
}


def _step_function(model: nn.Module, backend: Backend) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, *INPUT_SHAPE, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with use_backend(backend):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()

    return step


def build_steps() -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = build_model("resnet9", input_shape=INPUT_SHAPE, num_classes=CLASSES, width=WIDTH)
    steps = {}
    for name, (config, backend) in CONFIGS.items():
        model = copy.deepcopy(base).train()
        if config is not None:
            qtrain.quantize_(model, config)
        steps[name] = _step_function(model, backend)
    return steps


def profile_step(step: Callable[[], None], rows: int) -> None:
    """Print the ops that take the most self time over three steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


ISOLATED = ("fp32", "sbm8 cpu_fused")  # the configs the --isolated mode compares


def _time_alone(name: str, rounds: int, clock: Callable[[], float]) -> float:
    """Median seconds per step of one config built alone in this process (--one mode)."""
    config, backend = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model("resnet9", input_shape=INPUT_SHAPE, num_classes=CLASSES, width=WIDTH)
    if config is not None:
        qtrain.quantize_(model.train(), config)
    step = _step_function(model.train(), backend)
    for _ in range(3):
        step()
    return statistics.median(median_times({name: step}, rounds, clock)[name])


def isolated(rounds: int, runs: int, clock_name: str, threads: int | None) -> list[dict]:
    """fp32 and sbm8 each in a fresh process, alternating, ``runs`` pairs: no allocator or
    cache state passes from one config to the other (in one process it does: glibc's malloc
    thresholds move with what earlier configs allocated and freed)."""
    pairs = []
    for _ in range(runs):
        pair = {}
        for name in ISOLATED:
            command = [sys.executable, __file__, "--one", name, "--rounds", str(rounds)]
            command += ["--batch", str(BATCH)]
            command += ["--clock", clock_name]
            command += [] if threads is None else ["--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            pair[name] = float(done.stdout.strip().splitlines()[-1])
        pair["ratio"] = pair["sbm8 cpu_fused"] / pair["fp32"]
        pairs.append(pair)
        print(
            f"fp32 {pair['fp32'] * 1e3:.1f} ms, sbm8 {pair['sbm8 cpu_fused'] * 1e3:.1f} ms: "
            f"{pair['ratio']:.3f}x"
        )
    return pairs


def _payload(args: argparse.Namespace, measured: float, **results: object) -> dict:
    """The JSON record: machine, setup, ``results`` and the target's verdict."""
    return {
        "machine": machine_info(),
        "model": {"name": "resnet9", "width": WIDTH, "input_shape": INPUT_SHAPE},
        "batch": BATCH,
        "rounds": max(args.rounds, 5),
        "clock": args.clock,
        **results,
        "target": {
            "target_ratio": TARGET_RATIO,
            "measured_ratio": measured,
            "met": measured <= TARGET_RATIO,
        },
    }


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median; >= 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("--profile", action="store_true", help="profile the cpu_fused sbm8 step")
    parser.add_argument(
        "--isolated",
        type=int,
        metavar="PAIRS",
        help="instead: fp32 and sbm8 each in a fresh process, PAIRS alternating pairs",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument("--one", choices=ISOLATED, help=argparse.SUPPRESS)  # child of --isolated
    args = parser.parse_args()
    BATCH = args.batch  # module-level: the step builders read it
    clock = set_clock_and_threads(args.clock, args.threads)
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    if args.one:
        print(_time_alone(args.one, max(args.rounds, 5), clock))
        return
    if args.isolated:
        pairs = isolated(max(args.rounds, 5), args.isolated, args.clock, args.threads)
        ratio = statistics.median(pair["ratio"] for pair in pairs)
        mode = "isolated: each config in its own process, alternating pairs"
        write_json(args.out, _payload(args, round(ratio, 3), mode=mode, pairs=pairs))
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(
            f"target: sbm8 ≤ {TARGET_RATIO}× fp32, median of {len(pairs)} pairs {ratio:.3f}× — "
            f"{verdict}; wrote {args.out}"
        )
        return
    steps = build_steps()
    for step in steps.values():  # a second warm-up: running ranges, allocator, oneDNN caches
        step()
    times = median_times(steps, max(args.rounds, 5), clock)
    fp32 = statistics.median(times["fp32"])
    rows = [
        {
            "name": name,
            "median_ms": round(statistics.median(seconds) * 1e3, 1),
            "min_ms": round(min(seconds) * 1e3, 1),
            "ratio_to_fp32": round(statistics.median(seconds) / fp32, 3),
        }
        for name, seconds in times.items()
    ]
    measured = next(row for row in rows if row["name"] == "sbm8 cpu_fused")["ratio_to_fp32"]
    write_json(args.out, _payload(args, measured, rows=rows))
    width = max(len(row["name"]) for row in rows)
    print(f"{'config':{width}}  median ms  × fp32")
    for row in rows:
        print(f"{row['name']:{width}}  {row['median_ms']:9.1f}  {row['ratio_to_fp32']:6.2f}")
    verdict = "met" if measured <= TARGET_RATIO else "NOT met"
    print(f"target: sbm8 cpu_fused ≤ {TARGET_RATIO}× fp32, measured {measured}× — {verdict}")
    print(f"wrote {args.out}")
    if args.profile:
        profile_step(steps["sbm8 cpu_fused"], rows=25)


if __name__ == "__main__":
    main()
