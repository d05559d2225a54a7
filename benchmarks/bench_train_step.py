"""Training-step time of a ResNet-9-like net (width 16, batch 256, 1×28×28, 10 classes): fp32
vs SBM 8-bit training (``qtrain.quantize_(model, "sbm8")``: 8-bit weights, activations and
layer gradients, a 16-bit grad-weight copy, Range BatchNorm), under the reference and the
cpu_fused kernels. Ratios are to the fp32 step measured in the same run.

Diagnostic rows split the overhead: fp32 layers with Range BatchNorm only; sbm8 with plain
BatchNorm; and sbm8's layers without quantization (Range BN, compact ReLU and max pool on the
same kernels), against which sbm8's ratio is the cost of quantization alone. A step is
zero_grad + forward + cross-entropy + backward + SGD step on one fixed synthetic batch; configs
are timed in interleaved rounds and reported as medians.

    python benchmarks/bench_train_step.py            # writes benchmarks/results/train_step.json
    python benchmarks/bench_train_step.py --profile  # + the top ops of the cpu_fused sbm8 step
    python benchmarks/bench_train_step.py --clock cpu --out benchmarks/results/train_step_cpu.json
    python benchmarks/bench_train_step.py --clock cpu --isolated 5   # one process per config
    python benchmarks/bench_train_step.py --isolated 5 --trainer     # qtrain train's own step

The --isolated mode also records each process's minor page faults and system CPU time per
step: glibc's malloc settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, which
the child processes inherit) change them, and with them the step times.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import qtrain
from bench_quantize import (
    machine_info,
    median_times,
    set_clock_and_threads,
    timing_parser,
    write_json,
)
from qtrain.api import QuantizedTrainingConfig
from qtrain.kernels import Backend, cpu_fused, use_backend
from qtrain.models import build_model
from qtrain.ops import GemmConfig
from qtrain.presets import sbm_quantization

BATCH, INPUT_SHAPE, CLASSES, WIDTH = 256, (1, 28, 28), 10, 16
TARGET_RATIO = 1.15  # the target for sbm8 with the fast kernels
CHANNELS_LAST = False  # --channels-last: the synthetic batch in channels-last memory format

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
        sbm_quantization(range_batchnorm=False),
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
    if CHANNELS_LAST:  # as the trainer's augmented batches are: torch's convs then run NHWC
        images = images.contiguous(memory_format=torch.channels_last)
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


# The synthetic batch is random and (unless --channels-last) NCHW, where torch's fp32 convolutions
# and max pool run slower than in real training (docs/BENCHMARKS.md): the verdict says so.
SYNTHETIC_CAVEAT = (
    "note: synthetic batch; fp32 trains faster on real augmented batches (NHWC): "
    "--isolated N --trainer measures the real-training ratio"
)

# --trainer: the recipe each compared config trains with in ``qtrain train``.
RECIPES = {"fp32": "fp32", "sbm8 cpu_fused": "sbm8"}


def _trainer_step_function(name: str) -> Callable[[], None]:
    """The trainer's own step (``qtrain train``: recipe, optimizer, cost meter, loss and
    accuracy) on successive augmented Fashion-MNIST batches, as a training run takes them."""
    from qtrain.cost import CostMeter
    from qtrain.recipes import build_recipe
    from qtrain.train import TrainConfig, _Trainer

    config = TrainConfig(
        model="resnet9", data="fashion-mnist", width=WIDTH, batch_size=BATCH, epochs=1, quiet=True
    )
    trainer = _Trainer(config, build_recipe(RECIPES[name]))
    trainer.meter = CostMeter(trainer.model)
    batches = iter(())
    epoch = 0

    def step() -> None:
        nonlocal batches, epoch
        batch = next(batches, None)
        if batch is None:
            batches = iter(trainer.dataset.train_batches(BATCH, epoch=epoch, augment=True))
            epoch += 1
            batch = next(batches)
        trainer._train_step(*batch, False)

    return step


def _time_alone(
    name: str, rounds: int, clock: Callable[[], float], in_trainer: bool = False
) -> dict[str, float]:
    """One config built alone in this process (--one mode): median seconds per step, and the
    process's minor page faults and system CPU seconds per step over the timed rounds."""
    if in_trainer:
        step = _trainer_step_function(name)
    else:
        config, backend = CONFIGS[name]
        torch.manual_seed(0)
        model = build_model("resnet9", input_shape=INPUT_SHAPE, num_classes=CLASSES, width=WIDTH)
        if config is not None:
            qtrain.quantize_(model.train(), config)
        step = _step_function(model.train(), backend)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = statistics.median(median_times({name: step}, rounds, clock)[name])
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = 2 * rounds  # median_times runs an untimed step before each timed one
    return {
        "seconds": seconds,
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
    }


def isolated(
    rounds: int, runs: int, clock_name: str, threads: int | None, in_trainer: bool = False
) -> list[dict]:
    """fp32 and sbm8 each in a fresh process, alternating, ``runs`` pairs: no allocator or
    cache state passes from one config to the other (in one process it does: glibc's malloc
    thresholds move with what earlier configs allocated and freed). ``in_trainer``: each
    process times the trainer's step on real batches instead of the synthetic step."""
    pairs = []
    for _ in range(runs):
        pair = {}
        for name in ISOLATED:
            command = [sys.executable, __file__, "--one", name, "--rounds", str(rounds)]
            command += ["--batch", str(BATCH)]
            command += ["--clock", clock_name]
            command += [] if threads is None else ["--threads", str(threads)]
            command += ["--trainer"] if in_trainer else []
            command += ["--channels-last"] if CHANNELS_LAST else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            alone = json.loads(done.stdout.strip().splitlines()[-1])
            pair[name] = alone.pop("seconds")
            pair[f"{name} process"] = alone
        pair["ratio"] = pair["sbm8 cpu_fused"] / pair["fp32"]
        pairs.append(pair)
        faults = [pair[f"{name} process"]["minor_faults_per_step"] for name in ISOLATED]
        print(
            f"fp32 {pair['fp32'] * 1e3:.1f} ms, sbm8 {pair['sbm8 cpu_fused'] * 1e3:.1f} ms: "
            f"{pair['ratio']:.3f}x (minor page faults per step {faults[0]:.0f}, {faults[1]:.0f})"
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
            "batch": "trainer (real, augmented)" if args.trainer else "synthetic",
        },
    }


def main() -> None:
    global BATCH, CHANNELS_LAST
    parser = timing_parser(__doc__, "train_step.json")
    parser.add_argument("--profile", action="store_true", help="profile the cpu_fused sbm8 step")
    parser.add_argument(
        "--isolated",
        type=int,
        metavar="PAIRS",
        help="instead: fp32 and sbm8 each in a fresh process, PAIRS alternating pairs",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="the synthetic batch in channels-last memory format, as `qtrain train`'s augmented "
        "batches are (with one input channel torch then runs the whole net NHWC)",
    )
    parser.add_argument(
        "--trainer",
        action="store_true",
        help="with --isolated: time `qtrain train`'s own step (recipes fp32 and sbm8, real "
        "augmented Fashion-MNIST batches) instead of the synthetic step",
    )
    parser.add_argument("--one", choices=ISOLATED, help=argparse.SUPPRESS)  # child of --isolated
    args = parser.parse_args()
    BATCH, CHANNELS_LAST = args.batch, args.channels_last  # module-level: the builders read them
    clock = set_clock_and_threads(args.clock, args.threads)
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    if args.one:
        print(json.dumps(_time_alone(args.one, max(args.rounds, 5), clock, args.trainer)))
        return
    if args.trainer and not args.isolated:
        parser.error("--trainer times processes of one config each: use it with --isolated")
    if args.isolated:
        pairs = isolated(max(args.rounds, 5), args.isolated, args.clock, args.threads, args.trainer)
        ratio = statistics.median(pair["ratio"] for pair in pairs)
        mode = "isolated: each config in its own process, alternating pairs"
        if args.trainer:
            mode += "; the trainer's step on augmented Fashion-MNIST batches"
        write_json(args.out, _payload(args, round(ratio, 3), mode=mode, pairs=pairs))
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(
            f"target: sbm8 ≤ {TARGET_RATIO}× fp32, median of {len(pairs)} pairs {ratio:.3f}× — "
            f"{verdict}; wrote {args.out}"
        )
        if not args.trainer:
            print(SYNTHETIC_CAVEAT)
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
    print(SYNTHETIC_CAVEAT)
    print(f"wrote {args.out}")
    if args.profile:
        profile_step(steps["sbm8 cpu_fused"], rows=25)


if __name__ == "__main__":
    main()
