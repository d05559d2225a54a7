"""Every public constructor and CLI option checks its values, and a refusal is one message
naming the parameter, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qtrain import QuantSpec, formats, quantize, quantize_
from qtrain.api import QuantizedTrainingConfig
from qtrain.cli import main
from qtrain.formats import BlockFloat, Int, MiniFloat
from qtrain.kernels import parse_backend
from qtrain.nn import QConv2d, QLinear, RangeBatchNorm2d
from qtrain.ops import GemmConfig
from qtrain.quantizer import (
    Clip,
    LearnedStep,
    MinMax,
    PerChannel,
    PerGroup,
    PerToken,
    QParams,
    quantize_int,
)
from qtrain.recipes import RECIPES, RecipeConfigError, build_recipe
from qtrain.recipes.amp import AmpFP16Config
from qtrain.recipes.sbm import SBMConfig
from qtrain.train import TrainConfig, TrainConfigError, train

INT8 = QuantSpec(formats.INT8)


def refusal(call: Callable[[], Any]) -> str:
    """The message of the error ``call`` raises (a ValueError subclass or a TypeError)."""
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message.strip(), "one message, one line"
    return message


def case(call: Callable[[], Any], *fragments: str) -> Any:
    return pytest.param(call, fragments)


CONSTRUCTORS = {
    # formats
    "Int.bits range": case(lambda: Int(0), "Int.bits", "0", "1..16"),
    "Int.bits type": case(lambda: Int(8.0), "Int.bits", "8.0", "int in 1..16"),
    "Int signed 1 bit": case(lambda: Int(1, signed=True), "Int(bits=1, signed=True)", ">= 2"),
    "Int.signed type": case(lambda: Int(8, signed="yes"), "signed", "'yes'", "bool"),
    "MiniFloat.exponent_bits": case(lambda: MiniFloat(9, 3), "exponent_bits", "9", "2..8"),
    "MiniFloat.mantissa_bits": case(lambda: MiniFloat(4, 24), "mantissa_bits", "24", "0..23"),
    "MiniFloat no inf, no mantissa": case(
        lambda: MiniFloat(4, 0, has_inf=False), "without inf", "mantissa_bits >= 1"
    ),
    "MiniFloat.has_inf type": case(
        lambda: MiniFloat(4, 3, has_inf=1), "has_inf", "1", "bool"
    ),
    "MiniFloat.saturate type": case(
        lambda: MiniFloat(4, 3, saturate="yes"), "MiniFloat.saturate", "'yes'", "bool"
    ),
    "BlockFloat.mantissa_bits": case(lambda: BlockFloat(1), "mantissa_bits", "1", "2..16"),
    "BlockFloat.block_size": case(lambda: BlockFloat(4, block_size=0), "block_size", "0", ">= 1"),
    "BlockFloat.axis type": case(lambda: BlockFloat(4, axis="a"), "axis", "'a'", "int"),
    # quantizer parts and specs
    "PerGroup.group_size range": case(lambda: PerGroup(0), "PerGroup.group_size", "0", ">= 1"),
    "PerGroup.group_size type": case(lambda: PerGroup(2.5), "group_size", "2.5", "positive int"),
    "PerChannel.axis type": case(
        lambda: quantize(torch.randn(3, 4), QuantSpec(formats.INT8, granularity=PerChannel("0"))),
        "PerChannel.axis", "'0'", "int",
    ),
    "PerGroup.axis type": case(lambda: PerGroup(2, axis=1.0), "PerGroup.axis", "1.0", "int"),
    "Clip.value range": case(lambda: Clip(0), "Clip.value", "0", "finite number > 0"),
    "Clip.value nan": case(lambda: Clip(math.nan), "Clip.value", "nan", "finite number > 0"),
    "Clip.value bool": case(lambda: Clip(True), "Clip.value", "True", "number"),
    "MinMax.batch_mean type": case(
        lambda: MinMax(batch_mean="x"), "batch_mean", "'x'", "bool"
    ),
    "QuantSpec.format": case(
        lambda: QuantSpec("int8"), "QuantSpec.format", "'int8'", "Int, MiniFloat or BlockFloat"
    ),
    "QuantSpec.granularity": case(
        lambda: QuantSpec(formats.INT8, granularity="tensor"), "granularity", "'tensor'",
        "PerTensor()",
    ),
    "QuantSpec.scale": case(
        lambda: QuantSpec(formats.INT8, scale="absmax"), "QuantSpec.scale", "'absmax'", "AbsMax()"
    ),
    "QuantSpec.rounding": case(
        lambda: QuantSpec(formats.INT8, rounding="nearest"), "rounding", "'nearest'",
        "Rounding.NEAREST",
    ),
    "QuantSpec.nonfinite": case(
        lambda: QuantSpec(formats.INT8, nonfinite="ignore"), "nonfinite", "'ignore'",
        "'error' or 'propagate'",
    ),
    "QuantSpec.clip_gradient type": case(
        lambda: QuantSpec(formats.INT8, clip_gradient="no"), "clip_gradient", "'no'"
    ),
    "minifloat with an integer scale rule": case(
        lambda: QuantSpec(formats.FP8_E4M3, scale=MinMax()), "scale", "MinMax", "AbsMax()"
    ),
    "block float with a granularity": case(
        lambda: QuantSpec(BlockFloat(4), granularity=PerChannel(0)), "granularity",
        "PerChannel", "defaults",
    ),
    "batch-mean range per channel": case(
        lambda: QuantSpec(formats.INT8, granularity=PerChannel(0), scale=MinMax(batch_mean=True)),
        "batch_mean", "PerChannel", "PerTensor()",
    ),
    # a spec against a tensor
    "axis beyond the rank": case(
        lambda: quantize(torch.randn(3, 4), QuantSpec(formats.INT8, granularity=PerChannel(2))),
        "PerChannel.axis=2", "out of range for a 2-d tensor",
    ),
    "per-token on a scalar": case(
        lambda: quantize(torch.tensor(1.0), QuantSpec(formats.INT8, granularity=PerToken())),
        "PerToken", "at least one dimension",
    ),
    "group not dividing": case(
        lambda: quantize(torch.randn(3, 8), QuantSpec(formats.INT8, granularity=PerGroup(3))),
        "group_size=3", "size 8", "must divide",
    ),
    "x not a tensor": case(lambda: quantize([1.0], INT8), "x must be a torch.Tensor", "list"),
    "x not floating": case(
        lambda: quantize(torch.arange(3), INT8), "floating-point", "torch.int64"
    ),
    "spec not a spec": case(
        lambda: quantize(torch.randn(3), "int8"), "spec must be a QuantSpec", "str"
    ),
    "quantize_int of a minifloat": case(
        lambda: quantize_int(torch.randn(3), QuantSpec(formats.FP8_E4M3)), "quantize_int",
        "fp8_e4m3", "integer or block format",
    ),
    "learned step missing": case(
        lambda: quantize(torch.randn(3), QuantSpec(formats.INT8, scale=LearnedStep())),
        "LearnedStep()", "step=tensor",
    ),
    "qparams of the wrong size": case(
        lambda: quantize(torch.randn(3, 4), QuantSpec(formats.INT8, granularity=PerChannel(0)),
                         qparams=QParams(torch.ones(5), torch.zeros(5))),
        "qparams", "5", "3",
    ),
    "learned step NaN": case(
        lambda: quantize(torch.randn(3), QuantSpec(formats.INT8, scale=LearnedStep()),
                         step=torch.tensor(math.nan)),
        "step", "nan", "finite and > 0",
    ),
    "qparams with a zero scale": case(
        lambda: quantize(torch.randn(3), INT8, qparams=QParams(torch.zeros(1), torch.zeros(1))),
        "qparams", "finite scale > 0", "scale 0.0",
    ),
    # ops, modules, quantize_
    "GemmConfig spec type": case(
        lambda: GemmConfig(input_spec="int8"), "GemmConfig.input_spec", "'int8'",
        "QuantSpec or None",
    ),
    "GemmConfig saved levels of 16 bits": case(
        lambda: GemmConfig(QuantSpec(Int(16)), save_quantized_input=True),
        "save_quantized_input", "<= 8 bits",
    ),
    "QLinear.range_momentum": case(
        lambda: QLinear(4, 3, range_momentum=1.5), "range_momentum", "1.5", "[0, 1]"
    ),
    "QLinear.range_momentum type": case(
        lambda: QLinear(4, 3, range_momentum="a"), "range_momentum", "'a'"
    ),
    "QConv2d.range_momentum type": case(
        lambda: QConv2d(3, 4, 3, range_momentum=None), "QConv2d.range_momentum", "None",
        "number in [0, 1]",
    ),
    "QLinear.config": case(lambda: QLinear(4, 3, config="x"), "config must be a GemmConfig", "str"),
    "QConv2d padding mode": case(
        lambda: QConv2d(3, 4, 3, padding="same"), "padding='same'", "numeric zero padding"
    ),
    "RangeBatchNorm2d.num_chunks": case(
        lambda: RangeBatchNorm2d(4, num_chunks=0), "num_chunks", "0", ">= 1"
    ),
    "RangeBatchNorm2d.num_chunks type": case(
        lambda: RangeBatchNorm2d(4, num_chunks=2.5), "num_chunks", "2.5", "int"
    ),
    "RangeBatchNorm2d.input_spec": case(
        lambda: RangeBatchNorm2d(4, input_spec="int8"), "input_spec", "'int8'",
        "QuantSpec or None",
    ),
    "RangeBatchNorm2d.constant": case(
        lambda: RangeBatchNorm2d(4, constant=-1.0), "constant", "-1.0", "> 0"
    ),
    "QuantizedTrainingConfig.gemm": case(
        lambda: QuantizedTrainingConfig("x"), "QuantizedTrainingConfig.gemm", "'x'", "GemmConfig"
    ),
    "QuantizedTrainingConfig.range_momentum": case(
        lambda: QuantizedTrainingConfig(GemmConfig(), range_momentum=2.0), "range_momentum",
        "2.0", "[0, 1]",
    ),
    "QuantizedTrainingConfig.range_bn_chunks": case(
        lambda: QuantizedTrainingConfig(GemmConfig(), range_bn_chunks=0), "range_bn_chunks",
        "0", ">= 1",
    ),
    "QuantizedTrainingConfig.range_batchnorm type": case(
        lambda: QuantizedTrainingConfig(GemmConfig(), range_batchnorm="yes"), "range_batchnorm",
        "'yes'", "bool",
    ),
    "quantize_ config name": case(
        lambda: quantize_(nn.Linear(2, 2), "int3"), "unknown config name 'int3'", "choose from"
    ),
    "backend name": case(lambda: parse_backend("gpu"), "backend", "'gpu'", "auto, reference"),
    # recipes built directly (build_recipe and --set coerce types first: see below)
    "SBMConfig.bifurcation type": case(
        lambda: SBMConfig(bifurcation="no"), "bifurcation", "'no'"
    ),
    "SBMConfig.range_momentum type": case(
        lambda: SBMConfig(range_momentum="x"), "range_momentum", "'x'"
    ),
    "SBMConfig.bits type": case(lambda: SBMConfig(bits=8.0), "SBMConfig.bits", "8.0", "int"),
    "SBMConfig.grad_rounding": case(
        lambda: SBMConfig(grad_rounding="up"), "grad_rounding", "'up'", "stochastic, nearest"
    ),
    "SBMConfig.amp": case(lambda: SBMConfig(amp="fp8"), "amp", "'fp8'", "none, bf16, fp16"),
    "AmpFP16Config.init_scale type": case(
        lambda: AmpFP16Config(init_scale="big"), "init_scale", "'big'", "number"
    ),
    "recipe name": case(lambda: build_recipe("sbm4"), "unknown recipe 'sbm4'", "choose from"),
}  # fmt: skip


@pytest.mark.parametrize(("call", "fragments"), CONSTRUCTORS.values(), ids=CONSTRUCTORS.keys())
def test_constructor_refuses_a_bad_value_naming_it(
    call: Callable[[], Any], fragments: tuple[str, ...]
) -> None:
    message = refusal(call)
    assert all(f in message for f in fragments), f"{message!r} lacks one of {fragments}"


# ---- recipe parameters (build_recipe(name, overrides) is what --set uses) --------------------

# Text that is not a value of the type at all.
NOT_OF_TYPE = {int: ("1.5", "an integer"), float: ("fast", "a number"), bool: ("maybe", "true")}
RECIPE_PARAMS = [
    pytest.param(name, field.name, id=f"{name}.{field.name}")
    for name, cls in sorted(RECIPES.items())
    for field in dataclasses.fields(cls.config_class)
    if typing.get_type_hints(cls.config_class)[field.name] in NOT_OF_TYPE
]


@pytest.mark.parametrize(("name", "field"), RECIPE_PARAMS)
def test_every_recipe_parameter_refuses_a_value_of_another_type(name: str, field: str) -> None:
    kind = typing.get_type_hints(RECIPES[name].config_class)[field]
    text, allowed = NOT_OF_TYPE[kind]
    message = refusal(lambda: build_recipe(name, {field: text}))
    assert repr(field) in message and text in message and allowed in message


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_refuses_an_unknown_parameter_listing_the_allowed(name: str) -> None:
    message = refusal(lambda: build_recipe(name, {"no_such": "1"}))
    fields = [f.name for f in dataclasses.fields(RECIPES[name].config_class)]
    assert "'no_such'" in message and f"allowed: {sorted(fields)}" in message


@pytest.mark.parametrize(
    ("name", "field", "value", "allowed"),
    [("sbm8", "bits", "1", "2..16"), ("sbm8", "grad_weight_bits", "17", "2..16"),
     ("sbm8", "grad_rounding", "up", "stochastic, nearest"), ("sbm8", "amp", "fp8", "bf16"),
     ("sbm8", "range_momentum", "1.5", "[0, 1]"), ("sbm8", "range_bn_chunks", "0", ">= 1"),
     ("amp-fp16", "init_scale", "-1", "> 0"), ("amp-fp16", "growth_interval", "0", ">= 1")],
)  # fmt: skip
def test_recipe_parameter_out_of_range_is_refused(
    name: str, field: str, value: str, allowed: str
) -> None:
    with pytest.raises(RecipeConfigError) as caught:
        build_recipe(name, {field: value})
    message = str(caught.value)
    assert field in message and value in message and allowed in message


# ---- TrainConfig ------------------------------------------------------------------------------

TRAIN_OPTIONS = {
    "model": ({"model": "vgg"}, "model", "'vgg'", "choose from: cnn"),
    "data": ({"data": "imagenet"}, "data", "'imagenet'", "choose from:"),
    "optimizer": ({"optimizer": "lion"}, "optimizer", "'lion'", "sgd, adamw"),
    "schedule": ({"schedule": "linear"}, "schedule", "'linear'", "onecycle"),
    "on_nonfinite": ({"on_nonfinite": "retry"}, "on_nonfinite", "'retry'", "raise-precision"),
    "epochs": ({"epochs": 0}, "epochs", "0", ">= 1"),
    "epochs type": ({"epochs": "3"}, "epochs", "'3'", "int"),
    "batch_size": ({"batch_size": 0}, "batch_size", "0", ">= 1"),
    "eval_every": ({"eval_every": 0}, "eval_every", "0", ">= 1"),
    "log_every": ({"log_every": 0}, "log_every", "0", ">= 1"),
    "width": ({"width": 0}, "width", "0", ">= 1"),
    "train_subset": ({"train_subset": -5}, "train_subset", "-5", ">= 1"),
    "test_subset": ({"test_subset": 0}, "test_subset", "0", ">= 1"),
    "checkpoint_every": ({"checkpoint_every": -1}, "checkpoint_every", "-1", ">= 0"),
    "check_every": ({"check_every": -1}, "check_every", "-1", ">= 0"),
    "lr": ({"lr": 0.0}, "lr", "0.0", "positive"),
    "lr nan": ({"lr": math.nan}, "lr", "nan", "positive"),
    "lr type": ({"lr": "fast"}, "'lr'", "'fast'", "a number"),
    "momentum": ({"momentum": 1.0}, "momentum", "1.0", "[0, 1)"),
    "nesterov": ({"momentum": 0.0}, "nesterov", "momentum", "> 0"),
    "weight_decay": ({"weight_decay": math.nan}, "weight_decay", "nan", "finite number >= 0"),
    "warmup_fraction": ({"warmup_fraction": 1.0}, "warmup_fraction", "1.0", "[0, 1)"),
    "label_smoothing": ({"label_smoothing": -0.1}, "label_smoothing", "-0.1", "[0, 1)"),
    "seed": ({"seed": -1}, "seed", "-1", "0..2**63-1"),
    "device": ({"device": "meta"}, "device", "'meta'", "cpu, cuda or cuda:N"),
    "quiet type": ({"quiet": "yes"}, "'quiet'", "'yes'", "true/false"),
    "augment type": ({"augment": 1}, "'augment'", "1", "true/false"),
    "model_kwargs type": ({"model_kwargs": []}, "model_kwargs", "[]", "mapping"),
    "unknown option": ({"bogus": 1}, "'bogus'", "allowed: ['model'"),
}


@pytest.mark.parametrize(("changes", "fragments"), [(c, f) for c, *f in TRAIN_OPTIONS.values()],
                         ids=TRAIN_OPTIONS.keys())  # fmt: skip
def test_train_config_refuses_a_bad_value_naming_it(
    tiny_config: Any, changes: dict[str, Any], fragments: list[str]
) -> None:
    data = {**tiny_config().to_dict(), **changes}
    message = refusal(lambda: TrainConfig.from_dict(data))
    assert all(f in message for f in fragments), f"{message!r} lacks one of {fragments}"


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [({"model_kwargs": {"depth": 2}}, ["model_kwargs", "'depth'", "allowed: none"]),
     ({"data_kwargs": {"size": "x"}}, ["data_kwargs 'size'", "'x'", "an integer"]),
     ({"data_kwargs": {"sizes": 9}}, ["data_kwargs", "'sizes'", "allowed: shape, num_classes"])],
)  # fmt: skip
def test_model_and_data_arguments_are_checked_before_anything_is_written(
    tmp_path: Path, tiny_config: Any, changes: dict[str, Any], fragments: list[str]
) -> None:
    config = tiny_config(**{k: {**getattr(tiny_config(), k), **v} for k, v in changes.items()})
    with pytest.raises(TrainConfigError) as caught:
        train(config, build_recipe("fp32"), tmp_path / "run")
    assert all(f in str(caught.value) for f in fragments), str(caught.value)
    assert not (tmp_path / "run").exists()


# ---- the command line -------------------------------------------------------------------------

TINY = [
    "--recipe", "sbm8", "--model", "cnn", "--data", "synthetic", "--epochs", "1", "--width",
    "4", "--batch-size", "32", "--quiet",
    "--data-arg", "shape=[1,8,8]", "size=256", "test_size=64", "num_classes=4",
]  # fmt: skip
CLI_OPTIONS = {
    "--epochs": (["--epochs", "two"], "--epochs", "'two'", "int"),
    "--epochs range": (["--epochs", "0"], "epochs", "0", ">= 1"),
    "--seed": (["--seed", "-3"], "seed", "-3", "0..2**63-1"),
    "--device": (["--device", "tpu"], "device", "'tpu'", "cpu, cuda"),
    "--width": (["--width", "0"], "width", "0", ">= 1"),
    "--batch-size": (["--batch-size", "0"], "batch_size", "0", ">= 1"),
    "--lr": (["--lr", "nan"], "lr", "nan", "positive"),
    "--optimizer": (["--optimizer", "lion"], "optimizer", "'lion'", "sgd, adamw"),
    "--momentum": (["--momentum", "1.5"], "momentum", "1.5", "[0, 1)"),
    "--weight-decay": (["--weight-decay", "-1"], "weight_decay", "-1", ">= 0"),
    "--schedule": (["--schedule", "linear"], "schedule", "'linear'", "onecycle"),
    "--warmup-fraction": (["--warmup-fraction", "2"], "warmup_fraction", "2", "[0, 1)"),
    "--label-smoothing": (["--label-smoothing", "1"], "label_smoothing", "1", "[0, 1)"),
    "--train-subset": (["--train-subset", "0"], "train_subset", "0", ">= 1"),
    "--test-subset": (["--test-subset", "x"], "--test-subset", "'x'", "int"),
    "--checkpoint-every": (["--checkpoint-every", "-2"], "checkpoint_every", "-2", ">= 0"),
    "--eval-every": (["--eval-every", "0"], "eval_every", "0", ">= 1"),
    "--log-every": (["--log-every", "0"], "log_every", "0", ">= 1"),
    "--on-nonfinite": (["--on-nonfinite", "ignore"], "on_nonfinite", "'ignore'", "stop, skip"),
    "--check-every": (["--check-every", "-1"], "check_every", "-1", ">= 0"),
    "--set range": (["--set", "bits=1"], "bits", "1", "2..16"),
    "--set type": (["--set", "bifurcation=maybe"], "'bifurcation'", "'maybe'", "true/false"),
    "--set name": (["--set", "bitz=4"], "'bitz'", "allowed: ['amp', 'bifurcation'"),
    "--set syntax": (["--set", "bits"], "key=value", "'bits'"),
    "--model-arg": (["--model-arg", "depth=3"], "model_kwargs", "'depth'", "allowed: none"),
    "--data-arg name": (["--data-arg", "sizes=9"], "data_kwargs", "'sizes'", "allowed: shape"),
    "--data-arg type": (["--data-arg", "noise=loud"], "data_kwargs 'noise'", "'loud'", "a number"),
    "--data-arg shape": (["--data-arg", "shape=[1,8.5,8]"], "shape", "8.5", "int"),
}


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [pytest.param(v[0], v[1:], id=k) for k, v in CLI_OPTIONS.items()],
)
def test_cli_option_with_a_bad_value_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "run"
    code = main(["train", *TINY, *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("qtrain: error: ")
    assert all(f in err for f in fragments), f"{err!r} lacks one of {fragments}"
    assert not out.exists()


def test_cli_resume_may_change_only_how_faults_are_handled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--checkpoint-every", "4", "--out", str(out)]) == 0
    resume = ["train", "--resume", "--out", str(out)]
    assert main([*resume, "--on-nonfinite", "skip", "--check-every", "2"]) == 0
    capsys.readouterr()
    assert main([*resume, "--lr", "0.5"]) == 2
    assert "cannot change lr" in capsys.readouterr().err
