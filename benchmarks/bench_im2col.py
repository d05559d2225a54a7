"""A convolution's matrices in qtrain.lowp on the CPU: PyTorch's F.unfold / F.fold against the
fused channels-last ``cpu_fused.im2col_nhwc`` / ``col2im_nhwc``, and the emulated product's
float32 levels: ``quantize_rows_int8`` then ``.to(torch.float32)`` against the same levels
written as float32 by the kernel (``levels_dtype=torch.float32``).

For 3×3 convolutions (stride 1, padding 1) on x (128, 16, 28, 28), (128, 32, 14, 14) and
(256, 64, 28, 28):
- im2col: lowp's ``F.unfold(x).transpose(1, 2).reshape(-1, C·9)`` on contiguous x, against
  ``im2col_nhwc`` on channels-last x (the layout lowp's convolutions return) and on contiguous
  x (converted inside);
- col2im: ``F.fold`` of the (B·L, C·9) gradient as lowp's ``_col2im`` calls it, against
  ``col2im_nhwc``;
- levels of the im2col matrix, per row and per tensor, nearest rounding: int8 then
  ``.to(torch.float32)`` against float32 levels directly; int8 levels alone are timed too
  ("int8_ms"), for what the conversion costs.
"speedup" = PyTorch median / fused median, timed in the same interleaved rounds
(``bench_quantize.median_times``), so load from other processes hits both alike: read the
ratios, not the absolute times. Each row also records that the results agree (im2col bit for
bit with the reordered F.unfold, col2im within float32 rounding of F.fold, float32 levels bit
for bit with the int8 ones converted).

    python benchmarks/bench_im2col.py --clock cpu --rounds 9
        # one thread (the default here), timed by its CPU time: steadier on a shared machine;
        # writes benchmarks/results/im2col.json
    python benchmarks/bench_im2col.py --smoke  # toy sizes, one round: checks the script

Outputs of 4 MiB to 256 MiB come from cpu_fused's cached huge-page allocator; PyTorch's large
outputs (and the fused ones beyond 256 MiB: the (256, 64, 28, 28) matrices, 462 MB) are fresh
pages, whose first-touch faults are part of what is timed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench_quantize import (
    median_times,
    run_kernel_rows,
    write_json,
)
from qtrain.kernels import cpu_fused

SHAPES = [(128, 16, 28, 28), (128, 32, 14, 14), (256, 64, 28, 28)]
KERNEL, STRIDE, PADDING, DILATION = 3, 1, 1, 1
BOUND = torch.tensor(127.0)


def unfold_rows(x: torch.Tensor) -> torch.Tensor:
    """lowp's im2col today: columns (c, i, j)."""
    cols = F.unfold(x, KERNEL, DILATION, PADDING, STRIDE)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def unfold_reordered(x: torch.Tensor) -> torch.Tensor:
    """unfold_rows with columns reordered to im2col_nhwc's (i, j, c)."""
    batch, channels = x.shape[:2]
    cols = F.unfold(x, KERNEL, DILATION, PADDING, STRIDE)
    cols = cols.view(batch, channels, KERNEL, KERNEL, -1).permute(0, 4, 2, 3, 1)
    return cols.reshape(-1, KERNEL * KERNEL * channels)


def fold_rows(grad_cols: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """lowp's col2im today: F.fold of a (B·L, C·k·k) gradient, columns (c, i, j)."""
    batch, _, height, width = x_shape
    grad = grad_cols.view(batch, -1, grad_cols.shape[1]).transpose(1, 2)
    return F.fold(grad, (height, width), KERNEL, DILATION, PADDING, STRIDE)


def cases(x_shape: tuple[int, int, int, int]) -> list[dict[str, object]]:
    """For one input shape: each operation with its PyTorch and fused rows (and for the levels
    the int8 row), and whether their results agree."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator)
    x_last = x.contiguous(memory_format=torch.channels_last)
    geometry = (KERNEL, STRIDE, PADDING, DILATION)
    cols = cpu_fused.im2col_nhwc(x_last, *geometry)
    grad_cols = torch.randn(cols.shape, generator=generator)
    grad_nhwc = grad_cols.view(x_shape[0], -1, KERNEL, KERNEL, x_shape[1])
    grad_unfold = grad_nhwc.permute(0, 1, 4, 2, 3).reshape(grad_cols.shape)  # columns (c, i, j)
    im2col_exact = torch.equal(cols.view(torch.int32), unfold_reordered(x).view(torch.int32))
    fold_close = torch.allclose(
        cpu_fused.col2im_nhwc(grad_cols, x.shape, *geometry),
        fold_rows(grad_unfold, x.shape),
        rtol=1e-5,
        atol=1e-5,
    )
    out: list[dict[str, object]] = [
        {
            "operation": "im2col, channels-last x",
            "torch": lambda: unfold_rows(x),
            "fused": lambda: cpu_fused.im2col_nhwc(x_last, *geometry),
            "agree": im2col_exact,
        },
        {
            "operation": "im2col, contiguous x",
            "torch": lambda: unfold_rows(x),
            "fused": lambda: cpu_fused.im2col_nhwc(x, *geometry),
            "agree": im2col_exact,
        },
        {
            "operation": "col2im",
            "torch": lambda: fold_rows(grad_unfold, x.shape),
            "fused": lambda: cpu_fused.col2im_nhwc(grad_cols, x.shape, *geometry),
            "agree": fold_close,
        },
    ]
    for rowwise in (True, False):
        granularity = "per-row" if rowwise else "per-tensor"
        levels, scale = cpu_fused.quantize_rows_int8(cols, BOUND, rowwise)
        float_levels, float_scale = cpu_fused.quantize_rows_int8(
            cols, BOUND, rowwise, None, torch.float32
        )
        levels_exact = torch.equal(
            float_levels.view(torch.int32), levels.to(torch.float32).view(torch.int32)
        ) and torch.equal(float_scale, scale)

        def levels_as(dtype: torch.dtype, rowwise: bool = rowwise) -> torch.Tensor:
            return cpu_fused.quantize_rows_int8(cols, BOUND, rowwise, None, dtype)[0]

        out.append(
            {
                "operation": f"float32 levels, {granularity}",
                "torch": lambda levels_as=levels_as: levels_as(torch.int8).to(torch.float32),
                "fused": lambda levels_as=levels_as: levels_as(torch.float32),
                "int8": lambda levels_as=levels_as: levels_as(torch.int8),
                "agree": levels_exact,
            }
        )
    return out


def benchmark(scale: int, rounds: int, clock: Callable[[], float]) -> list[dict[str, object]]:
    if cpu_fused.load() is None:
        raise SystemExit("the cpu_fused extension could not be built: nothing to compare")
    results = []
    for shape in SHAPES:
        x_shape = (shape[0] // scale, *shape[1:])
        rows: dict[str, Callable[[], object]] = {}
        shape_results = []
        for case in cases(x_shape):
            timed = [name for name in ("torch", "fused", "int8") if name in case]
            rows |= {f"{name} {case['operation']}": case[name] for name in timed}
            shape_results.append(
                {"x": list(x_shape), "operation": case["operation"], "agree": case["agree"]}
            )
        times = median_times(rows, rounds, clock)
        for result in shape_results:
            for name in ("torch", "fused", "int8"):
                key = f"{name} {result['operation']}"
                if key in times:
                    result[f"{name}_ms"] = round(statistics.median(times[key]) * 1e3, 3)
            result["speedup"] = round(result["torch_ms"] / result["fused_ms"], 2)
        results += shape_results
    return results


def main() -> None:
    args, head, results = run_kernel_rows(__doc__, "im2col.json", benchmark, threads=1)
    payload = {
        **head,
        "geometry": {"kernel": KERNEL, "stride": STRIDE, "padding": PADDING, "dilation": DILATION},
        "torch_rows": {
            "im2col": "F.unfold(x).transpose(1, 2).reshape(-1, C*9), x contiguous",
            "col2im": "F.fold(grad.view(B, L, C*9).transpose(1, 2))",
            "float32 levels": "quantize_rows_int8(cols)[0].to(torch.float32)",
        },
        "note": "torch and fused rows timed in the same interleaved rounds: compare the "
        "speedups (ratios within this run), not absolute times across runs",
        "rows": results,
    }
    write_json(args.out, payload)
    print(
        f"{'x':16} {'operation':28} {'torch ms':>9} {'fused ms':>9} {'speedup':>8} {'int8 ms':>9}"
    )
    for row in results:
        x = "×".join(map(str, row["x"]))
        int8 = f"{row['int8_ms']:9.2f}" if "int8_ms" in row else ""
        print(
            f"{x:16} {row['operation']:28} {row['torch_ms']:9.2f} {row['fused_ms']:9.2f} "
            f"{row['speedup']:8.1f} {int8:>9}{'' if row['agree'] else '  RESULTS DIFFER'}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
