"""Run reports (report.md + PNGs) and comparison tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qtrain.recipes import build_recipe
from qtrain.report import (
    COMPARE_CURVES,
    PLOTS,
    compare_rows,
    format_table,
    write_compare,
    write_report,
)
from qtrain.train import train
from test_train import NoisyRecipe, small_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_writes_every_plot_for_a_recipe_with_metrics(tmp_path: Path) -> None:
    train(small_config(), NoisyRecipe(), tmp_path)
    report = write_report(tmp_path)
    text = report.read_text()
    for name in PLOTS.values():
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"({name})" in text
    assert "test accuracy (final)" in text and "qtrain train --config" in text


def test_report_of_a_full_precision_run_says_there_are_no_metrics(tmp_path: Path) -> None:
    train(small_config(), build_recipe("fp32"), tmp_path)
    text = write_report(tmp_path).read_text()
    assert not (tmp_path / PLOTS["metrics"]).exists()
    assert "no metrics" in text
    assert (tmp_path / PLOTS["curves"]).read_bytes().startswith(PNG_MAGIC)


def test_report_reads_the_bits_key_of_runs_written_before_metrics(tmp_path: Path) -> None:
    train(small_config(), NoisyRecipe(), tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    old = [
        {**{k: v for k, v in r.items() if k != "metrics"}, "bits": r["metrics"]} for r in records
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in old))
    write_report(tmp_path)
    assert (tmp_path / PLOTS["metrics"]).read_bytes().startswith(PNG_MAGIC)


def test_curves_name_the_window_their_step_records_average_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(small_config(log_every=5), build_recipe("fp32"), tmp_path)
    labels = plotted_labels(monkeypatch)
    write_report(tmp_path)
    assert "train loss (mean over 5 steps)" in labels
    assert "train accuracy (mean over 5 steps)" in labels


def plotted_labels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The labels of the lines plotted from now on (filled in as the plots are drawn)."""
    from matplotlib.axes import Axes

    labels: list[str] = []
    plot = Axes.plot

    def recording_plot(self: Axes, *args: Any, **kwargs: Any) -> Any:
        labels.append(kwargs.get("label", ""))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    return labels


def fake_run(root: Path, recipe: str, seed: int, acc: float, bitops: float) -> Path:
    run = root / f"{recipe}-s{seed}"
    run.mkdir(parents=True)
    summary = {
        "recipe": recipe, "model": "cnn", "dataset": "synthetic", "epochs": 1, "seed": seed,
        "test_acc": acc, "bitops_train": bitops, "bitops_fp32_equiv": 4e12,
        "model_bits": 8_000_000, "wall_seconds": 10.0,
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_compare_aggregates_seeds_and_writes_table_and_plot(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path, "fp32", 0, 0.90, 4e12),
        fake_run(tmp_path, "fp32", 1, 0.92, 4e12),
        fake_run(tmp_path, "low", 0, 0.88, 1e12),
    ]
    fp32, low = compare_rows(runs)
    assert fp32["acc_mean"] == pytest.approx(0.91)
    assert fp32["acc_std"] == pytest.approx(0.0141421, rel=1e-4)  # sample std of 0.90, 0.92
    assert low["bitops_ratio"] == pytest.approx(0.25) and low["acc_std"] == 0.0
    table = format_table([fp32, low])
    assert "| fp32 | 2 | 91.00 ± 1.41 | 4e+12 | 1.000 | 1.000 | 10 |" in table
    assert "| low | 1 | 88.00 | 1e+12 | 0.250 |" in table
    path = write_compare(tmp_path, runs)
    assert "91.00 ± 1.41" in path.read_text()
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)


def test_compare_without_step_records_writes_no_curves(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "fp32", 0, 0.90, 4e12), fake_run(tmp_path, "low", 0, 0.88, 1e12)]
    text = write_compare(tmp_path, runs).read_text()
    assert not any((tmp_path / name).exists() for name in COMPARE_CURVES.values())
    assert not any(name in text for name in COMPARE_CURVES.values())


def test_compare_overlays_each_recipes_step_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = []
    for recipe, seed in (("fp32", 0), ("fp32", 1), ("amp-bf16", 0)):
        runs.append(tmp_path / f"{recipe}-s{seed}")
        train(small_config(seed=seed, train_subset=320), build_recipe(recipe), runs[-1])
    labels = plotted_labels(monkeypatch)
    text = write_compare(tmp_path, runs).read_text()
    for name in COMPARE_CURVES.values():
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"({name})" in text
    # Per plot: fp32's mean line and its two seeds drawn thin (unlabelled), amp-bf16's line.
    named = [label for label in labels if label]
    assert named == [
        "fp32, mean over 7 steps (line: mean of 2 seeds, thin: each seed)",
        "amp-bf16, mean over 7 steps",
    ] * len(COMPARE_CURVES)
