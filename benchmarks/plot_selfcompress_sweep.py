"""A self-compression γ sweep: test accuracy against the bits and the weights left, as a
markdown table (stdout), a JSON file and a PNG of two panels (the paper's trade-off curves).

Each run directory is a finished ``selfcompress`` run; ``--fp32`` runs (same model, data and
budget) give the reference accuracy (their mean, a dashed line).

    python benchmarks/plot_selfcompress_sweep.py runs/i18/sc-g* --fp32 runs/i19/fp32-s0/fp32-s0 \\
        --png docs/figures/i18_gamma_sweep.png --json benchmarks/results/i18_gamma_sweep.json

Per run: γ (the run's recipe config), test accuracy, bits per weight at the end (the weights'
storage, ceil(b) bits per weight of each live channel plus a 32-bit exponent per channel, over
the original network's weight count), bits left as a percentage of the float32 network's
(that / 32), weights left (of the original), the model's bits as ``summary.json`` counts them
(the weights' storage plus float BatchNorm), training BitOPs over the fp32 runs' (mean; the
same epochs are required), and the last epoch's time and BitOPs over the first's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

from bench_quantize import write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    last: dict = {}
    epochs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("kind") == "metrics" and "bits_per_weight" in event.get("metrics", {}):
            last = event["metrics"]
        if event.get("kind") == "epoch":
            epochs.append(event)
    seconds = summary["epoch_seconds"]
    return {
        "run": str(run),
        "gamma": config["recipe_config"].get("gamma"),
        "seed": config["train"]["seed"],
        "test_acc": summary["test_acc"],
        "bits_per_weight": last["bits_per_weight"],
        "bits_left": last["bits_per_weight"] / 32,
        "weights_left": last["weights_left"],
        "removed_channels": last["removed_channels"],
        "channels": last.get("channels", {}),
        "params_initial": summary["params_initial"],
        "params_final": summary["params_final"],
        "model_bits": summary["model_bits"],
        "bitops_train": summary["bitops_train"],
        "epochs": summary["epochs"],
        "epoch_seconds": seconds,
        "last_over_first_epoch": seconds[-1] / seconds[0],
        "bitops_last_over_first_epoch": _epoch_bitops_ratio(epochs),
    }


def _epoch_bitops_ratio(epochs: list[dict]) -> float | None:
    """The last epoch's training BitOPs over the first's (cumulative counts per epoch event):
    the work the removals took away, free of the machine's load."""
    if len(epochs) < 2:
        return None
    totals = [e["bitops"] for e in epochs]
    per_epoch = [totals[0]] + [b - a for a, b in zip(totals, totals[1:], strict=False)]
    return per_epoch[-1] / per_epoch[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fp32", nargs="+", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--title", default="selfcompress γ sweep")
    args = parser.parse_args()
    rows = sorted((read_run(r) for r in args.runs), key=lambda r: r["gamma"])
    summaries = [json.loads((r / "summary.json").read_text()) for r in args.fp32]
    budgets = {s["epochs"] for s in summaries} | {r["epochs"] for r in rows}
    if len(budgets) != 1:
        parser.error(f"the runs and the --fp32 runs must train the same epochs, got {budgets}")
    fp32 = [s["test_acc"] for s in summaries]
    reference = statistics.mean(fp32)
    fp32_bitops = statistics.mean(s["bitops_train"] for s in summaries)
    for r in rows:
        r["bitops_ratio"] = r["bitops_train"] / fp32_bitops

    print(
        "| γ | test acc % | Δ vs fp32 | bits/weight | bits left | weights left | "
        "model bits | BitOPs / fp32 run | last/first epoch time | last/first epoch BitOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ops = r["bitops_last_over_first_epoch"]
        print(
            f"| {r['gamma']:g} | {100 * r['test_acc']:.2f} | "
            f"{100 * (r['test_acc'] - reference):+.2f} | {r['bits_per_weight']:.2f} | "
            f"{100 * r['bits_left']:.1f}% | {100 * r['weights_left']:.1f}% | "
            f"{r['model_bits']:,} | {r['bitops_ratio']:.3f} | "
            f"{r['last_over_first_epoch']:.2f} | {'—' if ops is None else f'{ops:.2f}'} |"
        )

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, label in (
        (axes[0], "bits_left", "bits left (% of the float32 network's)"),
        (axes[1], "weights_left", "weights left (% of the original)"),
    ):
        xs = [100 * r[key] for r in rows]
        ys = [100 * r["test_acc"] for r in rows]
        axis.plot(xs, ys, "o-")
        for x, y, r in zip(xs, ys, rows, strict=True):
            axis.annotate(f"γ={r['gamma']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
        axis.axhline(100 * reference, ls="--", color="gray", label=f"fp32 {100 * reference:.2f}%")
        axis.axhline(100 * reference - 1, ls=":", color="gray", label="fp32 − 1 point")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(loc="lower right")
    figure.suptitle(args.title)
    figure.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.png, dpi=120)
    write_json(args.json, {
        "fp32": {"runs": [str(r) for r in args.fp32], "test_acc": fp32,
                 "bitops_train": fp32_bitops},
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
