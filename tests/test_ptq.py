"""Post-training quantization: BatchNorm folding and cross-layer equalization keep the float
network's outputs, CLE equalises the ranges, bias correction removes the mean output shift,
the calibration ranges, and ``run_ptq`` / ``qtrain ptq`` on a small trained run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from qtrain import QuantSpec, formats, quantize
from qtrain.calibration import calibration_range, qparams_of
from qtrain.cli import main
from qtrain.models import build_model
from qtrain.observers import CalibratedRange, FixedQParams
from qtrain.ptq import (
    PTQError,
    PTQVariant,
    calibrate,
    correct_bias,
    equalization_pairs,
    equalize,
    fold_batchnorm,
    quantize_model,
    run_ptq,
    variants,
)
from qtrain.quantizer import PerChannel, QuantSpecError
from qtrain.recipes import build_recipe
from qtrain.train import load_run, train

SYNTHETIC = {"shape": [1, 8, 8], "size": 512, "test_size": 256, "num_classes": 4}


def resnet(seed: int = 0) -> nn.Module:
    """A ResNet-9 whose BatchNorms have non-trivial statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_folding_batchnorm_keeps_the_eval_outputs() -> None:
    model = resnet()
    x = torch.randn(8, 1, 16, 16)
    before = model(x)
    assert fold_batchnorm(model) == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(PTQError, match="eval"):
        fold_batchnorm(resnet().train())


def test_equalization_keeps_the_outputs_and_equalises_the_ranges() -> None:
    model = resnet(1)
    fold_batchnorm(model)
    # Give one pair very unequal channel ranges, as trained networks often have.
    first, second = model.prep[0], model.layer1[0][0]
    with torch.no_grad():
        first.weight.mul_(torch.logspace(-2, 1, first.weight.shape[0]).view(-1, 1, 1, 1))
    x = torch.randn(8, 1, 16, 16)
    before = model(x)
    pairs = equalization_pairs(model)
    assert pairs == [
        ("prep.0", "layer1.0.0"),
        ("layer1.2.body.0.0", "layer1.2.body.1.0"),
        ("layer2.0.0", "layer3.0.0"),
        ("layer3.2.body.0.0", "layer3.2.body.1.0"),
    ]
    equalize(model, pairs)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    out_ranges = first.weight.abs().flatten(1).amax(1)
    in_ranges = second.weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(out_ranges, in_ranges, rtol=1e-5, atol=0)


def test_equalization_refuses_a_model_fx_cannot_trace() -> None:
    gpt = build_model("gpt", input_shape=(8,), num_classes=256, width=16, n_head=2, n_layer=1)
    with pytest.raises(PTQError, match="torch.fx"):
        equalization_pairs(gpt)


def test_bias_correction_removes_the_mean_output_shift_of_a_toy_layer() -> None:
    # 3-bit weights of a linear layer whose inputs have a non-zero mean: the quantization
    # error of the weights shifts the mean output; bias correction takes that shift out.
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Linear(32, 16)).eval()
    model = quantize_model(nn.Sequential(nn.Linear(32, 16)).eval(), PTQVariant(w_bits=3))
    model.load_state_dict(reference.state_dict(), strict=False)
    model[0].observers["weight"] = FixedQParams.calibrated(
        model[0].weight, model[0].config.weight_spec
    )
    calibration = [torch.randn(64, 32) + 1.0 for _ in range(4)]
    fresh = torch.randn(512, 32) + 1.0

    def mean_error(x: torch.Tensor) -> float:
        return float((model(x) - reference(x)).detach().mean(0).abs().mean())

    before = mean_error(fresh)
    correct_bias(model, reference, calibration)
    after = mean_error(fresh)
    assert before > 0.01 and after < before / 5


def test_calibration_ranges() -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 2000)
    low, high = calibration_range(x, "minmax", formats.UINT8)
    assert torch.equal(low, x.amin(1)) and torch.equal(high, x.amax(1))
    low, high = calibration_range(x, "percentile", formats.UINT8, percentile=99.0)
    expected = torch.quantile(x, torch.tensor([0.01, 0.99]), dim=1)
    torch.testing.assert_close(torch.stack([low, high]), expected)
    heavy = torch.distributions.StudentT(3.0).sample((1, 20000))  # long-tailed
    for int_format in (formats.Int(4), formats.Int(4, signed=False)):
        errors = {}
        for method in ("minmax", "mse"):
            qparams = qparams_of(*calibration_range(heavy, method, int_format), int_format)
            spec = QuantSpec(int_format)
            errors[method] = float((quantize(heavy, spec, qparams=qparams) - heavy).square().mean())
        assert errors["mse"] < errors["minmax"] / 2
    with pytest.raises(QuantSpecError, match="calibration method"):
        calibration_range(x, "kl", formats.UINT8)


def test_calibrated_range_refuses_to_quantize_before_calibration() -> None:
    observer = CalibratedRange("mse")
    with pytest.raises(QuantSpecError, match="no range yet"):
        observer.qparams(torch.ones(3), QuantSpec(formats.UINT8))
    with pytest.raises(QuantSpecError, match="calibration method"):
        CalibratedRange("max")


def test_weights_are_quantized_at_their_fixed_scales_and_export_as_such() -> None:
    torch.manual_seed(3)
    model = resnet()
    fold_batchnorm(model)
    quantize_model(model, PTQVariant(w_bits=4, a_bits=8, observer="mse"))
    calibrate(model, [torch.randn(16, 1, 16, 16) for _ in range(2)])
    layer = model.layer2[0][0]
    observer = layer.observers["weight"]
    assert observer.scale.shape == (layer.weight.shape[0],)  # per output channel
    quantized = layer.quantized_weight()
    spec = QuantSpec(formats.Int(4), granularity=PerChannel(0))
    qparams = observer.qparams(layer.weight, spec)
    assert torch.equal(
        quantized.dequantize(), quantize(layer.weight.detach(), spec, qparams=qparams)
    )
    assert quantized.levels.abs().max() <= 7


def test_variants_cover_every_combination() -> None:
    names = [v.name for v in variants([8, 4], [8], ["per_channel"], ["minmax"], True, True)]
    assert len(names) == 8 and "W4A8 per-channel minmax CLE bias corr." in names
    with pytest.raises(PTQError, match="w_bits"):
        PTQVariant(w_bits=1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qtrain.train import TrainConfig

    out = tmp_path_factory.mktemp("ptq") / "fp32"
    config = TrainConfig(
        model="cnn",
        data="synthetic",
        epochs=2,
        width=8,
        batch_size=32,
        quiet=True,
        data_kwargs=SYNTHETIC,
    )
    train(config, build_recipe("fp32"), out)
    return out


def test_w8a8_ptq_stays_near_fp32_and_torch_ao_runs_beside_it(trained_run: Path) -> None:
    run = load_run(trained_run)
    result = run_ptq(run, [PTQVariant(8, 8)], calib=4, compare_torch=True)
    fp32 = result["fp32"]["test_acc"]
    assert math.isclose(fp32, run.summary["test_acc"], abs_tol=0.02)  # BN folded: ≈ the run
    ours, theirs = result["variants"]
    assert ours["name"] == "W8A8 per-channel minmax" and abs(ours["test_acc"] - fp32) <= 0.02
    assert theirs["name"] == "torch.ao x86 default" and abs(theirs["test_acc"] - fp32) <= 0.05


def test_ptq_command_writes_its_table_and_json(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ptq"
    code = main(
        [
            "ptq",
            str(trained_run),
            "--w-bits",
            "4",
            "--a-bits",
            "8,none",
            "--cle",
            "--calib",
            "2",
            "--quiet",
            "--save",
            "safetensors",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "ptq.json").read_text())
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert saved == sorted(
        f"{v['name'].lower().replace(' ', '-')}.safetensors" for v in result["variants"]
    )
    assert all(v["files"][0]["max_abs_diff"] == 0.0 for v in result["variants"])
    assert [v["name"] for v in result["variants"]] == [
        "W4A8 per-channel minmax",
        "W4A8 per-channel minmax CLE",
        "W4 per-channel minmax",
        "W4 per-channel minmax CLE",
    ]
    assert set(result["variants"][0]) >= {
        "w_bits",
        "a_bits",
        "granularity",
        "observer",
        "cle",
        "bias_correction",
        "test_acc",
    }
    table = (out / "ptq.md").read_text()
    assert "| W4 per-channel minmax CLE |" in table
    assert "| W4 per-channel minmax CLE | w4-per-channel-minmax-cle.safetensors |" in table
    assert main(["ptq", str(trained_run), "--w-bits", "x"]) == 2
    assert main(["ptq", str(tmp_path / "absent")]) == 1
    assert "no run directory" in capsys.readouterr().err
