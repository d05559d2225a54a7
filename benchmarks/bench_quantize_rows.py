"""Quantizing one int8 GEMM operand: ``qtrain.lowp_products._quantize_twin`` (about eight
PyTorch passes) against the fused ``cpu_fused.quantize_rows_int8`` (one or two), bit-identical
results.

Operands: a linear layer's three products for x (8192, 1024), W (1024, 1024) and g (8192,
1024) — forward x and W, grad-input g and Wᵀ, grad-weight gᵀ and xᵀ, the transposes read in
place — and a convolution's im2col matrix (50176, 144) (a 3×3 conv of 16 channels on a batch
of 16 at 56×56) and its transpose. Each is timed per row (lowp's ``PerToken()``) and per
tensor with round-to-nearest, and the gradient operands g and gᵀ also with stochastic rounding
(lowp's option for them). "speedup" = twin median / fused median, both timed in the same
interleaved rounds (``bench_quantize.median_times``), so load from other processes hits both
alike: the ratios are the figures to read, not the absolute times.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantize_rows.py --threads 1
        # writes benchmarks/results/quantize_rows.json
    python benchmarks/bench_quantize_rows.py --smoke  # toy sizes, one round: checks the script
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from bench_quantize import (
    median_times,
    run_kernel_rows,
    write_json,
)
from qtrain import lowp_products
from qtrain.kernels import cpu_fused

BITS = 8
SEED = 1234


def operands(scale: int) -> dict[str, torch.Tensor]:
    """The operands by name, sizes divided by ``scale`` (1: the real ones)."""
    generator = torch.Generator().manual_seed(0)
    tokens, features, pixels = 8192 // scale, 1024 // scale, 50176 // scale
    x = torch.randn(tokens, features, generator=generator)
    weight = torch.randn(features, features, generator=generator) / features**0.5
    grad = torch.randn(tokens, features, generator=generator) * 1e-3
    im2col = torch.randn(pixels, 144, generator=generator)
    return {
        "forward x": x,
        "forward W": weight,
        "grad-input g": grad,
        "grad-input Wᵀ": weight.t(),
        "grad-weight gᵀ": grad.t(),
        "grad-weight xᵀ": x.t(),
        "conv im2col": im2col,
        "conv im2colᵀ": im2col.t(),
    }


def cases(scale: int) -> list[dict[str, object]]:
    """(operand, granularity, rounding) combinations with their tensors and keys."""
    keys = lowp_products._hash_keys(torch.tensor(SEED))
    out = []
    for name, a in operands(scale).items():
        for rowwise in (True, False):
            stochastic = rowwise and name in ("grad-input g", "grad-weight gᵀ")
            for case_keys in (None, keys) if stochastic else (None,):
                out.append(
                    {
                        "operand": name,
                        "shape": list(a.shape),
                        "layout": "contiguous" if a.is_contiguous() else "transposed",
                        "granularity": "per-row" if rowwise else "per-tensor",
                        "rounding": "nearest" if case_keys is None else "stochastic",
                        "a": a,
                        "rowwise": rowwise,
                        "keys": case_keys,
                    }
                )
    return out


def label(case: dict[str, object]) -> str:
    return f"{case['operand']} {case['granularity']} {case['rounding']}"


def benchmark(scale: int, rounds: int, clock: Callable[[], float]) -> list[dict[str, object]]:
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    bound = torch.tensor(2.0 ** (BITS - 1) - 1)
    rows: dict[str, Callable[[], object]] = {}
    results = []
    for case in cases(scale):
        args = (case["a"], bound, case["rowwise"], case["keys"])

        def twin(a=case["a"], rowwise=case["rowwise"], keys=case["keys"]):
            return lowp_products._quantize_twin(a, torch.int8, bound, keys, rowwise)

        def fused(args=args):
            return cpu_fused.quantize_rows_int8(*args)

        levels, scales = fused()
        twin_levels, twin_scales = twin()
        identical = torch.equal(levels, twin_levels) and torch.equal(scales, twin_scales)
        rows[f"twin {label(case)}"] = twin
        rows[f"fused {label(case)}"] = fused
        results.append(
            {k: v for k, v in case.items() if k not in ("a", "rowwise", "keys")}
            | {"bit_identical": identical}
        )
    times = median_times(rows, rounds, clock)
    for result in results:
        twin_s = statistics.median(times[f"twin {label(result)}"])
        fused_s = statistics.median(times[f"fused {label(result)}"])
        result |= {
            "twin_ms": round(twin_s * 1e3, 3),
            "fused_ms": round(fused_s * 1e3, 3),
            "speedup": round(twin_s / fused_s, 2),
        }
    return results


def main() -> None:
    args, head, results = run_kernel_rows(__doc__, "quantize_rows.json", benchmark)
    payload = {
        **head,
        "bits": BITS,
        "note": "twin and fused timed in the same interleaved rounds: compare the speedups "
        "(ratios within this run), not absolute times across runs",
        "rows": results,
    }
    write_json(args.out, payload)
    print(f"{'operand':44} {'shape':14} {'twin ms':>9} {'fused ms':>9} {'speedup':>8}")
    for row in results:
        shape = "×".join(map(str, row["shape"]))
        print(
            f"{label(row):44} {shape:14} {row['twin_ms']:9.2f} {row['fused_ms']:9.3f} "
            f"{row['speedup']:8.1f}{'' if row['bit_identical'] else '  NOT bit-identical'}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
