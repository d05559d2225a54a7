"""Recipes int8-gemm and fp8-gemm (qtrain.lowp): config, which GEMM path runs, cost, training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import lowp_products
from qtrain.cli import main
from qtrain.cost import CostMeter
from qtrain.lowp import (
    Float8TrainingConfig,
    Int8TrainingConfig,
    LowPrecisionConv2d,
    LowPrecisionLinear,
)
from qtrain.models import build_model
from qtrain.ops import Precision
from qtrain.quantizer import PerTensor, PerToken
from qtrain.recipes import RECIPES, RecipeConfigError, build_recipe
from qtrain.recipes.lowp_gemm import Int8GemmConfig


def mlp() -> nn.Module:
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=4, width=16)


def test_configs_validate_and_round_trip() -> None:
    config = Int8GemmConfig(bits=6, grad_bits=7, stochastic_grad=True, granularity="per_tensor")
    assert Int8GemmConfig.from_dict(json.loads(config.to_json())) == config
    recipe = build_recipe("int8-gemm", {"bits": "4", "emulate": "true"})
    assert (recipe.config.bits, recipe.config.emulate) == (4, True)
    assert build_recipe("fp8-gemm", {"emulate": "auto"}).config.emulate == "auto"
    with pytest.raises(RecipeConfigError, match="bits must be an int in 2..8, got 9"):
        build_recipe("int8-gemm", {"bits": "9"})
    with pytest.raises(RecipeConfigError, match="granularity"):
        build_recipe("int8-gemm", {"granularity": "per_channel"})
    with pytest.raises(RecipeConfigError, match="emulate"):
        build_recipe("fp8-gemm", {"emulate": "sometimes"})
    with pytest.raises(RecipeConfigError, match="unknown parameter 'bits'"):
        build_recipe("fp8-gemm", {"bits": "8"})  # fp8 formats are fixed


def test_recipes_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"int8-gemm", "fp8-gemm"} <= set(RECIPES)
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "int8-gemm" in names and "fp8-gemm" in names


def test_prepare_swaps_linears_with_the_configured_layer() -> None:
    recipe = build_recipe(
        "int8-gemm", {"bits": 6, "grad_bits": 7, "stochastic_grad": True, "emulate": True}
    )
    model = recipe.prepare(mlp())
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 3 and all(isinstance(m, LowPrecisionLinear) for m in layers)
    assert layers[0].config == Int8TrainingConfig(
        bits=6, grad_bits=7, stochastic_grad=True, granularity=PerToken(), emulate=True
    )
    assert recipe.emulated is True
    fp8 = build_recipe("fp8-gemm", {"granularity": "per_token"})
    layer = fp8.prepare(mlp())[1]
    assert layer.config == Float8TrainingConfig(granularity=PerToken(), emulate=fp8.emulated)
    assert build_recipe("fp8-gemm").config.granularity == "per_tensor"
    assert isinstance(
        build_recipe("int8-gemm", {"granularity": "per_tensor"})
        .prepare(mlp())[1]
        .config.granularity,
        PerTensor,
    )


@pytest.mark.parametrize("int8_dot", [True, False])
def test_auto_takes_the_real_gemm_on_a_cpu_only_for_int8_with_int8_dot_instructions(
    monkeypatch: pytest.MonkeyPatch, int8_dot: bool
) -> None:
    # torch 2.13 runs torch._int_mm and fp8 torch._scaled_mm on any CPU, but only int8 with
    # VNNI/AMX beats the emulated twin; no CPU has fp8 units.
    monkeypatch.setattr(lowp_products, "cpu_has_int8_dot", lambda: int8_dot)
    int8 = build_recipe("int8-gemm")
    assert int8.prepare(mlp())[1].config.emulate is (not int8_dot)
    assert int8.emulated is (not int8_dot)
    fp8 = build_recipe("fp8-gemm")
    assert fp8.prepare(mlp())[1].config.emulate is True and fp8.emulated is True
    forced = build_recipe("int8-gemm", {"emulate": False})
    assert forced.prepare(mlp())[1].config.emulate is False


def test_metrics_report_the_bits_in_use() -> None:
    recipe = build_recipe("int8-gemm", {"bits": 4, "grad_bits": 6})
    assert recipe.metrics() == {}  # nothing prepared: no low-precision layer
    model = recipe.prepare(mlp())
    assert recipe.metrics() == {"fw_bits": 4, "grad_bits": 6, "grad_weight_bits": 6}
    model[1].raise_floor()  # the guard keeps one layer at 8 bits; the others stay at 4/6
    assert recipe.metrics() == {"fw_bits": 4, "grad_bits": 6, "grad_weight_bits": 6}
    for layer in model.modules():
        if isinstance(layer, LowPrecisionLinear):
            layer.set_precision(Precision(forward=3, backward=5))
    assert recipe.metrics() == {"fw_bits": 3, "grad_bits": 5, "grad_weight_bits": 5}
    fp8 = build_recipe("fp8-gemm")
    fp8.prepare(mlp())
    assert fp8.metrics() == {"fw_bits": 8, "grad_bits": 8, "grad_weight_bits": 8}


def test_on_a_cnn_every_conv_and_linear_is_swapped_and_counts_8x8_bits() -> None:
    model = build_recipe("int8-gemm").prepare(
        build_model("cnn", input_shape=(1, 8, 8), num_classes=4, width=2)
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is LowPrecisionConv2d for m in convs)
    assert isinstance(model[-1], LowPrecisionLinear)
    meter = CostMeter(model)
    F.cross_entropy(model(torch.randn(3, 1, 8, 8)), torch.tensor([0, 1, 2])).backward()
    cost = meter.pop()
    # 3 samples; convs 1→2 at 8×8, 2→4 at 4×4, 4→8 at 2×2 pixels (3×3 kernels); head 8→4.
    gemm_macs = 3 * (2 * 64 * 9 + 4 * 16 * 18 + 8 * 4 * 36 + 8 * 4)
    norm_macs = 3 * 2 * (2 * 64 + 4 * 16 + 8 * 4)  # BatchNorm in float32: x and its square
    assert cost.macs["forward"] == gemm_macs + norm_macs
    assert cost.bitops["forward"] == gemm_macs * 8 * 8 + norm_macs * 32 * 32


def test_convolutions_false_swaps_only_the_linear_and_convs_count_32_bits() -> None:
    model = build_recipe("int8-gemm", {"convolutions": "false"}).prepare(
        build_model("cnn", input_shape=(1, 8, 8), num_classes=4, width=2)
    )
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    head = model[-1]
    assert isinstance(head, LowPrecisionLinear)
    meter = CostMeter(model)
    F.cross_entropy(model(torch.randn(3, 1, 8, 8)), torch.tensor([0, 1, 2])).backward()
    cost = meter.pop()
    head_macs = 3 * 8 * 4  # 3 samples × 4w = 8 features × 4 classes
    conv_macs = cost.macs["forward"] - head_macs
    assert cost.bitops["forward"] == conv_macs * 32 * 32 + head_macs * 8 * 8


@pytest.mark.parametrize("recipe", ["int8-gemm", "fp8-gemm"])
def test_a_training_run_counts_8x8_bitops_for_the_linear_products(
    tmp_path: Path, recipe: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "train", "--recipe", recipe, "--model", "mlp", "--data", "synthetic", "--epochs", "1",
        "--width", "16", "--batch-size", "32", "--quiet", "--out", str(out),
        "--data-arg", "shape=[1,8,8]", "size=1024", "test_size=128", "num_classes=4",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # The mlp: 64 → 16 → 16 → 4. Per example the forward and grad-weight products run
    # 64·16 + 16·16 + 16·4 = 1344 MACs; grad-input skips the first layer (the data needs no
    # gradient): 16·16 + 16·4 = 320. One epoch of 1024 examples (32 full batches).
    examples = 1024
    macs = {
        "forward": 1344 * examples,
        "grad_input": 320 * examples,
        "grad_weight": 1344 * examples,
    }
    assert summary["macs_by_role"] == macs
    assert summary["bitops_by_role"] == {role: 8 * 8 * n for role, n in macs.items()}
    assert summary["bitops_fp32_equiv"] == 32 * 32 * sum(macs.values())
    # Weights as deployed: int8/fp8 values plus 32-bit scales (int8 per row, fp8 one per
    # tensor); biases at 32 bits.
    weights, rows, biases = 64 * 16 + 16 * 16 + 16 * 4, 16 + 16 + 4, 16 + 16 + 4
    scales = rows if recipe == "int8-gemm" else 3
    assert summary["model_bits"] == 8 * weights + 32 * scales + 32 * biases
    assert summary["test_acc"] > 0.9  # chance is 0.25; fp32 and both recipes measure 1.0


def test_benchmark_script_smoke_runs(tmp_path: Path) -> None:
    out = tmp_path / "lowp_gemm.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lowp_gemm.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {row["name"] for row in report["matmul"]} >= {"fp32", "bf16", "int8 torch._int_mm"}
    steps = {(row["model"], row["name"]): row for row in report["train_step"]}
    assert steps[("mlp", "int8-gemm emulated")]["emulated"] is True
    assert steps[("gpt", "int8-gemm real (torch._int_mm)")]["emulated"] is False


def test_epoch_benchmark_smoke_runs(tmp_path: Path) -> None:
    """benchmarks/bench_epoch.py: each recipe its own `qtrain train` process, options after a
    colon passed as --set, epoch times and ratios to fp32's run of the same round."""
    out = tmp_path / "epoch.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_epoch.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--recipes", "fp32,int8-gemm:amp=bf16",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["commands"]["int8-gemm:amp=bf16"].endswith("--set amp=bf16")
    rows = {row["recipe"]: row for row in report["summary"]}
    assert rows["fp32"]["ratio_to_fp32"] == [1.0]
    assert rows["int8-gemm:amp=bf16"]["epoch_seconds"][0] > 0
    assert len(report["runs"]) == 2 and report["machine"]["lscpu"]
