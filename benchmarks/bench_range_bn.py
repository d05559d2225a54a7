"""Range BatchNorm against torch's BatchNorm: forward + backward time over the BN layers of a
ResNet-9 (width 16, batch 256, 1×28×28), at the shapes the model feeds them.

Rows: ``nn.BatchNorm2d``, ``RangeBatchNorm2d`` on the reference backend (plain PyTorch) and on
cpu_fused (the fused kernels), with sbm8's 8-bit input and gradient, and with the mean-abs
spread (its statistics and backward in torch ops, its affine pass on the backend). Each row's
figure is the sum over the layers of the median per-layer time; rows are timed in interleaved
rounds (see ``bench_quantize.median_times``).

    python benchmarks/bench_range_bn.py --clock cpu --threads 1   # results/range_bn.json

``--channels-last`` times every layer on channels_last tensors, the layout of real training
(``qtrain train``'s batches make torch run the net NHWC).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from bench_quantize import (
    machine_info,
    median_times,
    set_clock_and_threads,
    timing_parser,
    write_json,
)
from bench_train_step import BATCH, CLASSES, INPUT_SHAPE, WIDTH  # the net the step times
from qtrain.kernels import Backend, cpu_fused, use_backend
from qtrain.models import build_model
from qtrain.presets import sbm_quantization
from qtrain.range_bn import RangeBatchNorm2d


def bn_input_shapes() -> list[tuple[int, ...]]:
    """The input shape of every BatchNorm2d of the model, in forward order."""
    model = build_model("resnet9", input_shape=INPUT_SHAPE, num_classes=CLASSES, width=WIDTH)
    shapes: list[tuple[int, ...]] = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda _m, inputs, _o: shapes.append(inputs[0].shape))
    with torch.no_grad():
        model(torch.zeros(BATCH, *INPUT_SHAPE))
    return [tuple(shape) for shape in shapes]


def _sbm8_range_bn(channels: int, **kwargs: object) -> RangeBatchNorm2d:
    """Range BN as sbm8 builds it: input and gradient specs, running input ranges."""
    config = sbm_quantization()
    return RangeBatchNorm2d(
        channels,
        input_spec=config.batchnorm_input_spec,
        grad_spec=config.batchnorm_grad_spec,
        input_observer=config.batchnorm_observer(),
        **kwargs,
    )


def _forward_backward(
    layer: nn.Module, backend: Backend, shape, layout: torch.memory_format
) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(shape, generator=generator).contiguous(memory_format=layout)

    def run() -> None:
        with use_backend(backend):
            x.grad = None
            layer(x).backward(grad)

    return run


def main() -> None:
    parser = timing_parser(__doc__, "range_bn.json")
    parser.add_argument("--channels-last", action="store_true", help="channels_last tensors")
    args = parser.parse_args()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    clock = set_clock_and_threads(args.clock, args.threads)
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    shapes = bn_input_shapes()
    layers = {
        "torch BatchNorm2d": (lambda c: nn.BatchNorm2d(c), Backend.REFERENCE),
        "RangeBatchNorm2d reference": (lambda c: RangeBatchNorm2d(c), Backend.REFERENCE),
        "RangeBatchNorm2d cpu_fused": (lambda c: RangeBatchNorm2d(c), Backend.CPU_FUSED),
        # sbm8's Range BN: 8-bit input (running ranges) and 8-bit gradient (issue 15).
        "RangeBatchNorm2d cpu_fused, 8-bit in/grad": (_sbm8_range_bn, Backend.CPU_FUSED),
        "RangeBatchNorm2d mean_abs, cpu_fused": (
            lambda c: RangeBatchNorm2d(c, spread="mean_abs"),
            Backend.CPU_FUSED,
        ),
        "RangeBatchNorm2d mean_abs, cpu_fused, 8-bit in/grad": (
            lambda c: _sbm8_range_bn(c, spread="mean_abs"),
            Backend.CPU_FUSED,
        ),
    }
    rows = {
        f"{name} {shape}": _forward_backward(make(shape[1]).train(), backend, shape, layout)
        for name, (make, backend) in layers.items()
        for shape in shapes
    }
    times = median_times(rows, max(args.rounds, 5), clock)
    totals = {
        name: sum(statistics.median(times[f"{name} {shape}"]) for shape in shapes) * 1e3
        for name in layers
    }
    baseline = totals["torch BatchNorm2d"]
    payload = {
        "machine": machine_info(),
        "model": {"name": "resnet9", "width": WIDTH, "input_shape": INPUT_SHAPE},
        "batch": BATCH,
        "channels_last": args.channels_last,
        "rounds": max(args.rounds, 5),
        "clock": args.clock,
        "shapes": shapes,
        "per_layer_ms": {
            name: round(statistics.median(seconds) * 1e3, 3) for name, seconds in times.items()
        },
        "rows": [
            {"name": name, "total_ms": round(total, 2), "ratio_to_bn": round(total / baseline, 3)}
            for name, total in totals.items()
        ],
    }
    write_json(args.out, payload)
    width = max(len(name) for name in totals)
    print(f"{'layer (fwd + bwd, all BN layers)':{width}}  total ms  × BN")
    for name, total in totals.items():
        print(f"{name:{width}}  {total:8.1f}  {total / baseline:5.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
