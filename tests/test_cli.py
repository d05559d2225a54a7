"""The ``qtrain`` command line: listing, training, resuming, comparing, and its error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtrain.cli import main
from qtrain.data import DATASETS
from qtrain.guard import POLICIES
from qtrain.models import MODELS
from qtrain.recipes import RECIPES
from qtrain.train import OPTIMIZERS, SCHEDULES, read_metrics

TINY = [
    "--model", "cnn", "--data", "synthetic", "--epochs", "1", "--width", "4",
    "--batch-size", "32", "--quiet",
    "--data-arg", "shape=[1,8,8]", "size=256", "test_size=64", "num_classes=4",
]  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_recipes_lists_fp32_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["recipes"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "full-precision" in lines["fp32"] and "amp-bf16" in lines


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--recipe", "nope", *TINY], "unknown recipe 'nope'; choose from: amp-bf16, amp-fp16"),
        (["--recipe", "fp32", *TINY, "--model", "vgg"], "choose from: cnn, gpt, mlp, resnet20"),
        (["--recipe", "fp32", *TINY, "--data", "imagenet"], "choose from: cifar10, fashion-mnist"),
        (["--recipe", "amp-fp16", *TINY, "--set", "bogus=1"], "allowed: ['growth_interval'"),
        (["--recipe", "amp-fp16", *TINY, "--set", "init_scale=big"], "expected a number"),
        (["--recipe", "fp32", *TINY, "--set", "novalue"], "expected key=value"),
        (["--recipe", "fp32", *TINY, "--epochs", "two"], "invalid int value: 'two'"),
        (["--recipe", "fp32", *TINY, "--epochs", "0"], "epochs must be >= 1"),
        (["--recipe", "fp32", *TINY, "--optimizer", "lion"], "choose from: sgd, adamw"),
        (["--recipe", "fp32", *TINY, "--data-arg", "size=0"], "synthetic needs"),
        (["--model", "cnn", "--data", "synthetic", "--epochs", "1"], "missing required option"),
    ],
)
def test_train_errors_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    out_dir = tmp_path / "run"
    code, out, err = run(["train", *argv, "--out", str(out_dir)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qtrain: error:")
    assert expected in err
    assert not out_dir.exists()


def test_compare_errors_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "cmp"
    for argv, expected in [
        (["--recipes", "fp32,nope"], "unknown recipe 'nope'"),
        (["--recipes", "fp32", "--seeds", "1,x"], "comma-separated integers"),
        (["--recipes", "fp32,amp-bf16", "--set", "init_scale=8"], "matches no parameter"),
    ]:
        code, _, err = run(["compare", *argv, *TINY, "--out", str(out_dir)], capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err
    assert not out_dir.exists()


def test_train_writes_a_run_refuses_to_overwrite_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    code, out, _ = run(["train", "--recipe", "fp32", *TINY, "--out", str(out_dir)], capsys)
    assert code == 0 and "test acc" in out
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "report.md"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())

    code, _, err = run(["train", "--recipe", "fp32", *TINY, "--out", str(out_dir)], capsys)
    assert code == 2 and "not empty" in err

    # --resume needs no other option: the run's config.json has them all.
    code, _, _ = run(["train", "--resume", "--quiet", "--out", str(out_dir)], capsys)
    assert code == 0
    assert json.loads((out_dir / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    code, _, err = run(["train", "--resume", "--epochs", "3", "--out", str(out_dir)], capsys)
    assert code == 2 and "cannot change epochs" in err

    # config.json alone repeats the run.
    again = tmp_path / "again"
    code, _, _ = run(
        ["train", "--config", str(out_dir / "config.json"), "--out", str(again)], capsys
    )
    assert code == 0
    assert json.loads((again / "summary.json").read_text())["test_acc"] == summary["test_acc"]

    code, _, _ = run(
        ["train", "--recipe", "fp32", *TINY, "--seed", "1", "--out", str(out_dir), "--overwrite"],
        capsys,
    )
    assert code == 0 and json.loads((out_dir / "config.json").read_text())["train"]["seed"] == 1


def test_compare_runs_each_recipe_and_seed_and_tabulates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--recipes", "fp32,amp-bf16", "--seeds", "0,1", *TINY, "--out", str(out_dir)]
    argv += ["--log-every", "2"]  # step records for the curves (8 steps per run)
    code, out, _ = run(argv, capsys)
    assert code == 0
    for name in ("fp32-s0", "fp32-s1", "amp-bf16-s0", "amp-bf16-s1"):
        assert (out_dir / name / "summary.json").is_file()
        assert read_metrics(out_dir / name)[-1]["kind"] == "epoch"
    assert (out_dir / "compare.md").is_file() and (out_dir / "compare.png").stat().st_size > 0
    for plot in ("compare_loss.png", "compare_acc.png"):
        assert (out_dir / plot).stat().st_size > 0 and plot in (out_dir / "compare.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("| fp32") or "amp-bf16" in line]
    assert len(rows) == 2 and " ± " in rows[0]
    assert "| fp32 | 2 |" in (out_dir / "compare.md").read_text()

    code, out, _ = run(["report", str(out_dir)], capsys)
    assert code == 0 and out.strip().endswith("compare.md")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_lists_what_each_option_chooses_from(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for names in (MODELS, DATASETS, RECIPES, OPTIMIZERS, SCHEDULES, POLICIES):
        assert "one of: " + ", ".join(sorted(names) if isinstance(names, dict) else names) in text


def test_compare_sets_a_shared_parameter_on_each_recipe_that_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["compare", *TINY, "--out", str(out_dir), "--set", "bits=6"]
    code, _, err = run([*argv[:1], "--recipes", "sbm,sbm8", *argv[1:]], capsys)
    assert code == 2 and err.count("\n") == 1 and not out_dir.exists()
    assert "recipe 'sbm8' with --set bits=6: SBM8Config.bits must be 8, got 6" in err
    assert "use recipe 'sbm' --set bits=6" in err

    code, _, err = run(["compare", "--recipes", "sbm,fp32", *TINY, "--out", str(out_dir)], capsys)
    assert code == 2 and "recipe 'sbm' needs its bit-width: --set bits=N" in err

    code, _, _ = run([*argv[:1], "--recipes", "sbm,fp32", *argv[1:]], capsys)
    assert code == 0
    saved = json.loads((out_dir / "sbm-s0" / "config.json").read_text())
    assert saved["recipe"] == "sbm" and saved["recipe_config"]["bits"] == 6
