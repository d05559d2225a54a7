"""Two of sbm8's layer kernels against what they replace, at the shapes of the train-step
benchmark's ResNet-9 (width 16, batch 256, 28×28):

- the bifurcated gradient copies: ``fake_quant_int_pair`` (one pass: the uint8 grad-input and
  uint16 grad-weight copies of g_l, one uniform per value) against two stochastic
  ``fake_quant_int`` passes, on the largest layer gradient (256×32×28×28);
- the 2×2 max pool: ``max_pool2x2`` and its backward against torch's
  ``max_pool2d_with_indices`` and its backward, at the net's three pools.

Medians of interleaved rounds (each timed call after an untimed one, as bench_quantize.py).

    python benchmarks/bench_layers.py                       # two threads' wall clock
    python benchmarks/bench_layers.py --clock cpu --threads 1
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from bench_quantize import (
    machine_info,
    median_times,
    set_clock_and_threads,
    timing_parser,
    write_json,
)
from qtrain.kernels import cpu_fused

GRADIENT_SHAPE = (1, 1, 256 * 32 * 28 * 28)  # the per-tensor view of the largest g_l
POOL_SHAPES = [(256, 32, 28, 28), (256, 64, 14, 14), (256, 128, 7, 7)]
POOL_ARGS = ([2, 2], [2, 2], [0, 0], [1, 1], False)


def _gradient_rows(ext) -> dict[str, Callable[[], object]]:
    g = torch.randn(GRADIENT_SHAPE, generator=torch.Generator().manual_seed(0))
    scale, zero = g.abs().max().reshape(1) / 127, torch.full((1,), 128.0)
    fine_scale, fine_zero = scale / 256, zero * 256

    def two_passes() -> object:
        return (
            ext.fake_quant_int(g, scale, zero, 0, 255, 11, False),
            ext.fake_quant_int(g, fine_scale, fine_zero, 0, 65535, 12, False),
        )

    return {
        "gradient copies: two stochastic passes": two_passes,
        "gradient copies: one pass (quantize_int_pair)": lambda: ext.fake_quant_int_pair(
            g, scale, zero, 0, 255, fine_scale, fine_zero, 0, 65535, 11
        ),
    }


def _pool_rows(ext) -> dict[str, Callable[[], object]]:
    rows: dict[str, Callable[[], object]] = {}
    for shape in POOL_SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *POOL_ARGS)
        _, where = ext.max_pool2x2(x)
        grad = torch.randn(indices.shape, generator=torch.Generator().manual_seed(2))
        name = "x".join(map(str, shape))
        rows[f"max pool {name}: torch forward"] = lambda x=x: (
            torch.ops.aten.max_pool2d_with_indices(x, *POOL_ARGS)
        )
        rows[f"max pool {name}: max_pool2x2"] = lambda x=x: ext.max_pool2x2(x)
        rows[f"max pool {name}: torch backward"] = lambda x=x, g=grad, i=indices: (
            torch.ops.aten.max_pool2d_with_indices_backward(g, x, *POOL_ARGS, i)
        )
        rows[f"max pool {name}: max_pool2x2_backward"] = lambda g=grad, w=where, s=shape: (
            ext.max_pool2x2_backward(g, w, *s[2:])
        )
    return rows


def main() -> None:
    parser = timing_parser(__doc__, "layers.json")
    args = parser.parse_args()
    clock = set_clock_and_threads(args.clock, args.threads)
    ext = cpu_fused.load()
    if ext is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    rows = {**_gradient_rows(ext), **_pool_rows(ext)}
    times = median_times(rows, max(args.rounds, 5), clock)
    results = [
        {"name": name, "median_ms": round(statistics.median(seconds) * 1e3, 3)}
        for name, seconds in times.items()
    ]
    write_json(
        args.out,
        {"machine": machine_info(), "clock": args.clock, "rounds": args.rounds, "rows": results},
    )
    width = max(len(row["name"]) for row in results)
    for row in results:
        print(f"{row['name']:{width}}  {row['median_ms']:9.3f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
