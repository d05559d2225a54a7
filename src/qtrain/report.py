"""Reports: ``report.md`` with plots for one run, ``compare.md`` with a table for many.

Plots need matplotlib (the ``plot`` extra); it is imported only when a report is written, so
training works without it.

Example:
    >>> from qtrain.report import write_report, write_compare
    >>> write_report("runs/fp32-cnn")  # doctest: +SKIP
    PosixPath('runs/fp32-cnn/report.md')
    >>> write_compare("runs/cmp", ["runs/cmp/fp32-s0", "runs/cmp/amp-bf16-s0"])  # doctest: +SKIP
    PosixPath('runs/cmp/compare.md')
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qtrain.train import CONFIG_FILE, SUMMARY_FILE, read_metrics

REPORT_FILE = "report.md"
COMPARE_FILE = "compare.md"
COMPARE_PLOT = "compare.png"
PLOTS = {
    "curves": "curves.png",
    "bits": "bits.png",
    "bitops": "bitops.png",
    "params": "params.png",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epoch, value) pairs of the records that have ``key``."""
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _plot_curves(steps: list[dict], epochs: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, train_key, test_key in (
        (ax_loss, "loss", "train_loss", "test_loss"),
        (ax_acc, "accuracy", "train_acc", "test_acc"),
    ):
        step_key = "loss" if metric == "loss" else "acc"
        ax.plot(*_series(steps, step_key), lw=1, alpha=0.6, label=f"train {metric} (window)")
        ax.plot(*_series(epochs, train_key), "o-", label=f"train {metric} (epoch)")
        ax.plot(*_series(epochs, test_key), "s-", label=f"test {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _bit_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record.get("bits") or {}))
    return list(keys)


def _plot_bits(records: list[dict], keys: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key in keys:
        pairs = [(r["epoch"], r["bits"][key]) for r in records if key in (r.get("bits") or {})]
        ax.step([e for e, _ in pairs], [b for _, b in pairs], where="post", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_single(
    records: list[dict], keys: dict[str, str], ylabel: str, path: Path, log: bool = False
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key, label in keys.items():
        ax.plot(*_series(records, key), label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _fmt_sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` and its PNGs (curves, bits, bitops, params) into ``run_dir``.

    The bit-width plot is left out when the recipe reports no bit-widths (full precision).
    """
    run = Path(run_dir)
    records = read_metrics(run)
    config = json.loads((run / CONFIG_FILE).read_text())
    summary_path = run / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    all_records = sorted(records, key=lambda r: r["step"])

    _plot_curves(steps, epochs, run / PLOTS["curves"])
    _plot_single(
        all_records,
        {"bitops": "training BitOPs", "bitops_fp32": "same MACs at 32x32 bits"},
        "cumulative BitOPs",
        run / PLOTS["bitops"],
    )
    _plot_single(all_records, {"params": "parameters"}, "parameters", run / PLOTS["params"])
    bit_keys = _bit_keys(all_records)
    if bit_keys:
        _plot_bits(all_records, bit_keys, run / PLOTS["bits"])

    train = config["train"]
    lines = [
        f"# Run report: {config['recipe']} / {train['model']} / {train['data']}",
        "",
        f"Recipe config: `{json.dumps(config['recipe_config'], sort_keys=True)}`  ",
        f"Repeat with: `qtrain train --config {run / CONFIG_FILE}`  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in config['versions'].items())}",
        "",
    ]
    if summary:
        ratio = (
            summary["bitops_train"] / summary["bitops_fp32_equiv"]
            if summary["bitops_fp32_equiv"]
            else None
        )
        rows = [
            ("test accuracy (final)", _fmt_pct(summary["test_acc"])),
            ("test accuracy (best)", _fmt_pct(summary["best_test_acc"])),
            ("final train loss", f"{summary['final_train_loss']:.4f}"),
            ("training BitOPs", _fmt_sci(summary["bitops_train"])),
            ("same MACs at fp32 (BitOPs)", _fmt_sci(summary["bitops_fp32_equiv"])),
            ("BitOPs / fp32", "-" if ratio is None else f"{ratio:.3f}"),
            ("energy estimate (pJ)", _fmt_sci(summary.get("energy_pj"))),
            (
                "parameters (initial -> final)",
                f"{summary['params_initial']} -> {summary['params_final']}",
            ),
            (
                "model size (bits)",
                f"{summary['model_bits']} ({summary['model_bits'] / 8e6:.3f} MB)",
            ),
            (
                "epochs / seconds per epoch",
                f"{summary['epochs']} / " + ", ".join(f"{s:.1f}" for s in summary["epoch_seconds"]),
            ),
            ("wall time (s)", f"{summary['wall_seconds']:.1f}"),
            (
                "peak memory",
                f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['peak_memory_source']})",
            ),
        ]
        lines += ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    else:
        lines += ["The run has not finished: no summary.json yet.", ""]
    lines += ["## Loss and accuracy", "", f"![curves]({PLOTS['curves']})", "", "## Bit-widths", ""]
    if bit_keys:
        lines += [f"![bits]({PLOTS['bits']})", ""]
    else:
        lines += ["The recipe reports no bit-widths: full precision throughout.", ""]
    lines += [
        "## Cumulative training BitOPs",
        "",
        f"![bitops]({PLOTS['bitops']})",
        "",
        "## Parameter count",
        "",
        f"![params]({PLOTS['params']})",
        "",
    ]
    path = run / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


# ---- comparisons -------------------------------------------------------------------------


def compare_rows(run_dirs: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One row per recipe (in first-seen order) aggregating its finished runs over seeds.

    Keys: recipe, seeds, acc_mean, acc_std (sample std; 0 for one seed), bitops,
    bitops_ratio (training BitOPs / the same MACs at 32x32 bits), model_bits, wall_seconds
    (means over seeds), runs (the summaries).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in run_dirs:
        summary = json.loads((Path(run) / SUMMARY_FILE).read_text())
        groups.setdefault(summary["recipe"], []).append(summary)
    rows = []
    for recipe, runs in groups.items():
        accs = [r["test_acc"] for r in runs]
        rows.append(
            {
                "recipe": recipe,
                "seeds": [r["seed"] for r in runs],
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "bitops": statistics.fmean(r["bitops_train"] for r in runs),
                "bitops_ratio": statistics.fmean(
                    r["bitops_train"] / r["bitops_fp32_equiv"] for r in runs
                ),
                "model_bits": statistics.fmean(r["model_bits"] for r in runs),
                "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
                "runs": runs,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``compare_rows`` output.

    Example:
        >>> row = dict(recipe="fp32", seeds=[0], acc_mean=0.9, acc_std=0.0, bitops=2e15,
        ...            bitops_ratio=1.0, model_bits=3.2e7, wall_seconds=61.0)
        >>> print(format_table([row]).splitlines()[2])
        | fp32 | 1 | 90.00 | 2e+15 | 1.000 | 4.000 | 61 |
    """
    lines = [
        "| recipe | seeds | test acc % (mean ± std) | training BitOPs | BitOPs / fp32 "
        "| model MB | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{100 * r['acc_mean']:.2f}"
        if len(r["seeds"]) > 1:
            acc += f" ± {100 * r['acc_std']:.2f}"
        lines.append(
            f"| {r['recipe']} | {len(r['seeds'])} | {acc} | {r['bitops']:.3g} "
            f"| {r['bitops_ratio']:.3f} | {r['model_bits'] / 8e6:.3f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _plot_compare(rows: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.scatter(
            [s["bitops_train"] for s in r["runs"]],
            [100 * s["test_acc"] for s in r["runs"]],
            alpha=0.35,
        )
        ax.errorbar(
            r["bitops"],
            100 * r["acc_mean"],
            yerr=100 * r["acc_std"],
            fmt="o",
            capsize=3,
            color=ax.collections[-1].get_facecolor()[0][:3],
            label=r["recipe"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("training BitOPs")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_compare(
    out_dir: str | os.PathLike[str], run_dirs: Sequence[str | os.PathLike[str]]
) -> Path:
    """Write ``compare.md`` (table, plot, run list) and ``compare.png`` into ``out_dir``."""
    out = Path(out_dir)
    rows = compare_rows(run_dirs)
    _plot_compare(rows, out / COMPARE_PLOT)
    first = rows[0]["runs"][0]
    lines = [
        f"# Comparison: {first['model']} on {first['dataset']}, {first['epochs']} epochs",
        "",
        format_table(rows),
        "",
        "BitOPs / fp32: training BitOPs divided by the same multiply-accumulates at 32x32 bits.",
        "",
        f"![accuracy vs training BitOPs]({COMPARE_PLOT})",
        "",
        "Runs: " + ", ".join(f"[{Path(d).name}]({Path(d).name}/{REPORT_FILE})" for d in run_dirs),
        "",
    ]
    path = out / COMPARE_FILE
    path.write_text("\n".join(lines))
    return path
