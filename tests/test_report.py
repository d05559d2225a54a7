"""Run reports (report.md + PNGs) and comparison tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtrain.recipes import build_recipe
from qtrain.report import PLOTS, compare_rows, format_table, write_compare, write_report
from qtrain.train import train
from test_train import NoisyRecipe, small_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_writes_every_plot_for_a_recipe_with_bits(tmp_path: Path) -> None:
    train(small_config(), NoisyRecipe(), tmp_path)
    report = write_report(tmp_path)
    text = report.read_text()
    for name in PLOTS.values():
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"({name})" in text
    assert "test accuracy (final)" in text and "qtrain train --config" in text


def test_report_of_a_full_precision_run_says_there_are_no_bit_widths(tmp_path: Path) -> None:
    train(small_config(), build_recipe("fp32"), tmp_path)
    text = write_report(tmp_path).read_text()
    assert not (tmp_path / PLOTS["bits"]).exists()
    assert "no bit-widths" in text
    assert (tmp_path / PLOTS["curves"]).read_bytes().startswith(PNG_MAGIC)


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
