"""What Range BN's normalisation does on real activations during a short run (issue 15).

Trains one run with ``qtrain.train`` (the CLI's trainer) and, every ``--every`` steps, reads
each Range BN layer's training input and records per channel:

- ``std_ratio``: the standard deviation of Range BN's normalised value (x − μ)/(C(n)·r).
  BatchNorm's is 1 by construction; Range BN's is 1 only where C(n)·r equals the standard
  deviation, i.e. for Gaussian values.
- ``mad_ratio``: the same for a mean-absolute-deviation spread sqrt(π/2)·E|x − μ| (also 1 for
  Gaussian values), to see whether another square-free spread stays nearer 1.
- ``excess_kurtosis`` of x (0 for Gaussian values), how far the values are from Gaussian.
- ``chunk_cv_*``: how noisy each spread estimate is from chunk to chunk.
- ``grad_cosine_*_vs_bn`` and ``grad_peak_to_rms_*``: for the layer's real input and the real
  gradient at its output, how the gradient at the input under the range (and under the
  mean-absolute-deviation spread) compares with BatchNorm's: its cosine, and how much it
  piles onto a few values (peak |grad| / RMS).

    python benchmarks/diagnose_range_bn.py --recipe sbm8 --seed 0 \\
        --out benchmarks/results/2026-12-07/range_bn_diagnostics.json

The JSON holds per layer and step the channel mean, min and max of each statistic, the run's
summary (test accuracy, final training loss) and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from bench_quantize import machine_info
from qtrain.range_bn import RangeBatchNorm2d, range_bn_constant
from qtrain.recipes import build_recipe
from qtrain.train import TrainConfig, train

CHUNKS = (16, 128, 1024)  # the layer's own count first: ``std_ratio`` is at num_chunks


def _range_spread(bn: RangeBatchNorm2d, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """C(n)·r of x with ``chunks`` chunks per channel (Range BN's definition)."""
    own, bn.num_chunks = bn.num_chunks, chunks
    try:
        _, spread, chunk = bn._batch_range(x)
    finally:
        bn.num_chunks = own
    return (bn.constant or range_bn_constant(chunk)) * spread


def channel_statistics(bn: RangeBatchNorm2d, x: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel std of the Range BN (at the layer's and at other chunk counts) and
    mean-absolute-deviation normalisations, and the excess kurtosis of x, for one (B, C, H, W)
    training batch."""
    x = x.detach().float()
    centred = x - x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = centred.pow(2).mean(dim=(0, 2, 3)).sqrt()
    mad = centred.abs().mean(dim=(0, 2, 3)) * math.sqrt(math.pi / 2)
    kurtosis = centred.pow(4).mean(dim=(0, 2, 3)) / std.pow(4) - 3
    stats = {
        "std_ratio": (std / _range_spread(bn, x, bn.num_chunks)).tolist(),
        "mad_ratio": (std / mad).tolist(),
        "excess_kurtosis": kurtosis.tolist(),
    }
    for chunks in CHUNKS:
        stats[f"std_ratio_chunks{chunks}"] = (std / _range_spread(bn, x, chunks)).tolist()
    stats.update(_chunk_noise(centred, bn.num_chunks))
    return stats


def _chunk_noise(centred: torch.Tensor, chunks: int) -> dict[str, list[float]]:
    """How noisy each spread estimate is: Range BN's spread is the mean of its chunks' ranges
    (mean of maxima − mean of minima), so the coefficient of variation of the chunk ranges
    across chunks, per channel, is its relative noise × sqrt(chunks). The same for the
    standard deviation and the mean absolute deviation of each chunk (about the batch mean).
    Needs a batch of whole-sample chunks (batch divisible by ``chunks``)."""
    batch, channels = centred.shape[:2]
    if batch % chunks:
        return {}
    pieces = centred.reshape(chunks, -1, channels, centred[0, 0].numel()).transpose(1, 2)
    pieces = pieces.reshape(chunks, channels, -1)  # (chunks, C, values of the chunk)
    estimates = {
        "range": pieces.amax(2) - pieces.amin(2),
        "std": pieces.pow(2).mean(2).sqrt(),
        "mad": pieces.abs().mean(2),
    }
    return {f"chunk_cv_{k}": (v.std(0) / v.mean(0)).tolist() for k, v in estimates.items()}


def _normalised(kind: str, bn: RangeBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with a ``kind`` spread ("range": the authors' C(n)·range, "std":
    BatchNorm's, "mean_abs": sqrt(π/2)·mean|x − μ|), in differentiable torch ops."""
    mean = x.mean(dim=(0, 2, 3))
    centred = x - mean.view(1, -1, 1, 1)
    if kind == "range":
        _, spread, chunk = bn._batch_range(x)
        spread = spread * (bn.constant or range_bn_constant(chunk)) * bn.constant_scale
    elif kind == "std":
        spread = centred.pow(2).mean(dim=(0, 2, 3)).sqrt()
    else:
        spread = centred.abs().mean(dim=(0, 2, 3)) * math.sqrt(math.pi / 2)
    y = centred / (spread + bn.eps).view(1, -1, 1, 1)
    y = y * bn.weight.detach().view(1, -1, 1, 1) + bn.bias.detach().view(1, -1, 1, 1)
    return torch.relu(y) if bn.fused_relu else y


def gradient_statistics(
    bn: RangeBatchNorm2d, x: torch.Tensor, grad: torch.Tensor
) -> dict[str, list[float]]:
    """Where the normalisation sends the gradient: for the layer's real input x and the real
    gradient at its output, the gradient at x under the range, the std (BatchNorm) and the
    mean-absolute-deviation spreads. Per channel: the cosine of the range's and of the
    mean-abs gradient with BatchNorm's, and each one's peak |grad| / its RMS."""
    grads = {}
    for kind in ("range", "std", "mean_abs"):
        leaf = x.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():  # called from a gradient hook, where grad mode is off
            _normalised(kind, bn, leaf).backward(grad.float())
        grads[kind] = leaf.grad.transpose(0, 1).reshape(x.shape[1], -1)  # (C, values)
    stats = {}
    for kind in ("range", "mean_abs"):
        cosine = torch.nn.functional.cosine_similarity(grads[kind], grads["std"], dim=1)
        stats[f"grad_cosine_{kind}_vs_bn"] = cosine.tolist()
    for kind, g in grads.items():
        peak = g.abs().amax(1) / g.pow(2).mean(1).sqrt().clamp(min=1e-30)
        stats[f"grad_peak_to_rms_{kind}"] = peak.tolist()
    return stats


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="sbm8")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--every", type=int, default=5, help="steps between readings")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    recipe = build_recipe(args.recipe, dict(item.split("=", 1) for item in args.set))
    readings: dict[str, list[dict]] = {}
    calls = {"n": 0}
    prepare = recipe.prepare

    def prepare_with_hooks(model: torch.nn.Module) -> torch.nn.Module:
        model = prepare(model)
        bns = [(n, m) for n, m in model.named_modules() if isinstance(m, RangeBatchNorm2d)]
        if not bns:
            raise SystemExit(f"recipe {args.recipe} {args.set} has no Range BN layer to read")

        def counter(module, inputs):  # one training forward = one step
            if module.training:
                calls["n"] += 1

        model.register_forward_pre_hook(counter)
        for name, bn in bns:

            def read(module, inputs, output, name=name):
                step = calls["n"] - 1
                if not (module.training and step % args.every == 0):
                    return
                x = inputs[0].detach()
                stats = channel_statistics(module, x)
                row = {"step": step, **{k: _summary(v) for k, v in stats.items()}}
                readings.setdefault(name, []).append(row)

                def read_gradient(grad, module=module, x=x, row=row):
                    stats = gradient_statistics(module, x, grad)
                    row.update({k: _summary(v) for k, v in stats.items()})

                if output.requires_grad:
                    output.register_hook(read_gradient)

            bn.register_forward_hook(read)
        return model

    recipe.prepare = prepare_with_hooks
    config = TrainConfig(
        model="resnet9",
        data="fashion-mnist",
        epochs=args.epochs,
        width=16,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        seed=args.seed,
        quiet=True,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(config, recipe, run_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/diagnose_range_bn.py "
        + " ".join(
            [
                f"--recipe {args.recipe}",
                *(f"--set {s}" for s in args.set),
                f"--seed {args.seed}",
                f"--epochs {args.epochs}",
                f"--train-subset {args.train_subset}",
                f"--batch-size {args.batch_size}",
            ]
        ),  # fmt: skip
        "machine": machine_info(),
        "test_acc": summary["test_acc"],
        "final_train_loss": summary["final_train_loss"],
        "layers": readings,
    }
    out.write_text(json.dumps(result, indent=1))
    for name, rows in readings.items():
        first, last = rows[0], rows[-1]
        print(
            f"{name:24s} std ratio {first['std_ratio']['mean']:.3f} -> "
            f"{last['std_ratio']['mean']:.3f}  mad ratio {last['mad_ratio']['mean']:.3f}  "
            + " ".join(f"K{k} {last[f'std_ratio_chunks{k}']['mean']:.3f}" for k in CHUNKS)
            + "  "
            f"kurtosis {first['excess_kurtosis']['mean']:.2f} -> "
            f"{last['excess_kurtosis']['mean']:.2f}  chunk cv "
            + " ".join(f"{k} {last[f'chunk_cv_{k}']['mean']:.3f}" for k in ("range", "std", "mad"))
        )
    for name, rows in readings.items():
        cosines = [
            r["grad_cosine_range_vs_bn"]["mean"] for r in rows if "grad_cosine_range_vs_bn" in r
        ]
        mad = [
            r["grad_cosine_mean_abs_vs_bn"]["mean"] for r in rows if "grad_cosine_range_vs_bn" in r
        ]
        peaks = [r["grad_peak_to_rms_range"]["mean"] for r in rows if "grad_peak_to_rms_range" in r]
        bn_peaks = [r["grad_peak_to_rms_std"]["mean"] for r in rows if "grad_peak_to_rms_std" in r]
        if cosines:
            print(
                f"{name:24s} grad cosine with BN: range {statistics.fmean(cosines):.3f} "
                f"mean_abs {statistics.fmean(mad):.3f}; peak/rms range "
                f"{statistics.fmean(peaks):.1f} BN {statistics.fmean(bn_peaks):.1f}"
            )
    print(f"test_acc {summary['test_acc']:.4f}  final_train_loss {summary['final_train_loss']:.4f}")


if __name__ == "__main__":
    main()
