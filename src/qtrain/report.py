"""Reports: ``report.md`` with plots for one run, ``compare.md`` with a table for many.

A run's step records (``metrics.jsonl``, ``"kind": "step"``) are means over the run's
``log_every`` steps; every curve drawn from them says so in its legend. The recipe's
``metrics()`` (bits in use, clip values...) are plotted one panel per name; runs written
before ``metrics`` replaced ``bits`` are read too.

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

from qtrain.train import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics

REPORT_FILE = "report.md"
COMPARE_FILE = "compare.md"
COMPARE_PLOT = "compare.png"
COMPARE_CURVES = {"loss": "compare_loss.png", "acc": "compare_acc.png"}
PLOTS = {
    "curves": "curves.png",
    "metrics": "metrics.png",
    "bitops": "bitops.png",
    "params": "params.png",
}

# What a per-layer metric's figure shows, for the report's caption (others: its name).
PER_LAYER_CAPTIONS = {
    "d_c": "Cosine distance d_c = 1 − ⟨g, ĝ⟩/(|g|·|ĝ|) between each layer's gradient g and its "
    "quantized copy ĝ used for the grad-weight product, measured every `interval` steps",
    "d_c_grad_input": "Cosine distance d_c of each layer's grad-input copy of the gradient",
    "clip": "Each layer's gradient clip value c",
    "lr_scale": "Each layer's learning-rate factor φ(d_c) = max(exp(−α·d_c), β)",
    "inverted_t": "Fraction of each layer's grad-weight channels classified inverted-T "
    "(over the steps of the last `interval`)",
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


def _window(config: dict[str, Any]) -> int:
    """Steps each step record averages over (the run's ``log_every``)."""
    return config["train"]["log_every"]


def _plot_curves(steps: list[dict], epochs: list[dict], window: int, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, train_key, test_key in (
        (ax_loss, "loss", "train_loss", "test_loss"),
        (ax_acc, "accuracy", "train_acc", "test_acc"),
    ):
        step_key = "loss" if metric == "loss" else "acc"
        if steps:  # none in a run shorter than its window
            label = f"train {metric} (mean over {window} steps)"
            ax.plot(*_series(steps, step_key), lw=1, alpha=0.6, label=label)
        ax.plot(*_series(epochs, train_key), "o-", label=f"train {metric} (epoch)")
        ax.plot(*_series(epochs, test_key), "s-", label=f"test {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _recipe_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's recipe metrics (``"bits"`` in runs written before ``"metrics"``)."""
    return record.get("metrics", record.get("bits")) or {}


def _metric_keys(records: Sequence[dict[str, Any]], per_layer: bool = False) -> list[str]:
    """The names of the records' scalar metrics, or (``per_layer``) of their per-layer dicts."""
    keys: dict[str, None] = {}
    for record in records:
        keys.update(
            (key, None)
            for key, value in _recipe_metrics(record).items()
            if isinstance(value, dict) == per_layer
        )
    return list(keys)


def _plot_per_layer(records: list[dict], key: str, path: Path) -> None:
    """One line per layer of a per-layer metric over the run, each value held until the next
    record; a log scale where the layers' values span more than two decades."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for layer, value in _recipe_metrics(record).get(key, {}).items():
            series.setdefault(layer, []).append((record["epoch"], value))
    for layer, pairs in series.items():
        ax.step([e for e, _ in pairs], [v for _, v in pairs], where="post", lw=1, label=layer)
    values = [v for pairs in series.values() for _, v in pairs]
    if values and min(values) > 0 and max(values) > 100 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(f"{key} per layer")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _plot_metrics(records: list[dict], keys: list[str], path: Path) -> None:
    """One panel per metric over the run, each value held until the next record."""
    plt = _pyplot()
    size = (7, 1.2 + 1.8 * len(keys))
    fig, axes = plt.subplots(len(keys), 1, figsize=size, sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pairs = [
            (r["epoch"], _recipe_metrics(r)[key]) for r in records if key in _recipe_metrics(r)
        ]
        ax.step([e for e, _ in pairs], [v for _, v in pairs], where="post")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
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
    """Write ``report.md`` and its PNGs (curves, metrics, bitops, params) into ``run_dir``.

    The metrics plot is left out when the recipe reports none (fp32, for one).
    """
    run = Path(run_dir)
    records = read_metrics(run)
    config = json.loads((run / CONFIG_FILE).read_text())
    summary_path = run / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    all_records = sorted(steps + epochs, key=lambda r: r["step"])
    events = [r for r in records if r["kind"] == "recipe"]
    # Every step's metrics where the run recorded their changes, else the logged records'.
    changes = [r for r in records if r["kind"] == "metrics"]

    _plot_curves(steps, epochs, _window(config), run / PLOTS["curves"])
    _plot_single(
        all_records,
        {"bitops": "training BitOPs", "bitops_fp32": "same MACs at 32x32 bits"},
        "cumulative BitOPs",
        run / PLOTS["bitops"],
    )
    _plot_single(all_records, {"params": "parameters"}, "parameters", run / PLOTS["params"])
    metric_keys = _metric_keys(changes or all_records)
    if metric_keys:
        _plot_metrics(changes or all_records, metric_keys, run / PLOTS["metrics"])
    layer_plots = {key: f"metrics_{key}.png" for key in _metric_keys(changes, per_layer=True)}
    for key, name in layer_plots.items():
        _plot_per_layer(changes, key, run / name)

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
    lines += ["## Loss and accuracy", "", f"![curves]({PLOTS['curves']})", ""]
    lines += ["## Recipe metrics", ""]
    if metric_keys:
        lines += [f"![metrics]({PLOTS['metrics']})", ""]
    elif not layer_plots:
        lines += ["The recipe reports no metrics.", ""]
    for key, name in layer_plots.items():
        about = PER_LAYER_CAPTIONS.get(key, f"`{key}` of each layer")
        lines += [f"{about}:", "", f"![{key} per layer]({name})", ""]
    if events:
        lines += ["## Recipe decisions", "", "| step | event | values |", "|---|---|---|"]
        for event in events:
            values = {k: v for k, v in event.items() if k not in ("kind", "step", "event")}
            lines.append(f"| {event['step']} | {event['event']} | `{json.dumps(values)}` |")
        lines.append("")
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
    (means over seeds), runs (the summaries), run_dirs (their directories).
    """
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for run in map(Path, run_dirs):
        summary = json.loads((run / SUMMARY_FILE).read_text())
        groups.setdefault(summary["recipe"], []).append((run, summary))
    rows = []
    for recipe, pairs in groups.items():
        runs = [summary for _, summary in pairs]
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
                "run_dirs": [run for run, _ in pairs],
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


def _recipe_curves(
    run_dirs: Sequence[Path], key: str
) -> tuple[list[tuple[list[float], list[float]]], int] | None:
    """Each seed's training ``key`` per logged step as (epochs, values), and the steps each
    record averages over; None when no run of the recipe has step records (a run shorter
    than ``log_every`` steps has none)."""
    runs = [run for run in run_dirs if (run / METRICS_FILE).exists()]
    curves = [_series([r for r in read_metrics(run) if r["kind"] == "step"], key) for run in runs]
    seeds = [(run, curve) for run, curve in zip(runs, curves, strict=True) if curve[0]]
    if not seeds:
        return None
    # One config for every seed of a recipe, so one window.
    window = _window(json.loads((seeds[0][0] / CONFIG_FILE).read_text()))
    return [curve for _, curve in seeds], window


def _plot_compare_curves(rows: Sequence[dict[str, Any]], key: str, ylabel: str, path: Path) -> bool:
    """One line per recipe: the mean of its seeds at the steps all of them logged, each seed
    drawn thin beneath it. Returns False, writing nothing, when no run has step records."""
    curves = {row["recipe"]: _recipe_curves(row["run_dirs"], key) for row in rows}
    curves = {recipe: curve for recipe, curve in curves.items() if curve is not None}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for recipe, (seeds, window) in curves.items():
        by_epoch: dict[float, list[float]] = {}
        for epochs, values in seeds:
            for epoch, value in zip(epochs, values, strict=True):
                by_epoch.setdefault(epoch, []).append(value)
        common = [epoch for epoch, values in by_epoch.items() if len(values) == len(seeds)]
        label = f"{recipe}, mean over {window} steps"
        if len(seeds) > 1:
            label += f" (line: mean of {len(seeds)} seeds, thin: each seed)"
        mean = [statistics.fmean(by_epoch[epoch]) for epoch in common]
        (line,) = ax.plot(common, mean, lw=1.6, label=label)
        for epochs, values in seeds if len(seeds) > 1 else ():
            ax.plot(epochs, values, lw=0.6, alpha=0.35, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def write_compare(
    out_dir: str | os.PathLike[str], run_dirs: Sequence[str | os.PathLike[str]]
) -> Path:
    """Write ``compare.md`` and its plots into ``out_dir``: accuracy against training BitOPs
    (``compare.png``), and the recipes' training loss and accuracy per logged step
    (``compare_loss.png``, ``compare_acc.png``; left out for runs without step records)."""
    out = Path(out_dir)
    rows = compare_rows(run_dirs)
    _plot_compare(rows, out / COMPARE_PLOT)
    curves = [
        f"![{ylabel} per step]({COMPARE_CURVES[key]})"
        for key, ylabel in (("loss", "training loss"), ("acc", "training accuracy"))
        if _plot_compare_curves(rows, key, ylabel, out / COMPARE_CURVES[key])
    ] or ["No training curves: the runs logged no step records (fewer steps than log_every)."]
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
        *(line for plot in curves for line in (plot, "")),
        "Runs: " + ", ".join(f"[{Path(d).name}]({Path(d).name}/{REPORT_FILE})" for d in run_dirs),
        "",
    ]
    path = out / COMPARE_FILE
    path.write_text("\n".join(lines))
    return path
