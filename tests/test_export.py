"""Export: integer weights packed into safetensors and loaded back to the trained model's
outputs; a QDQ ONNX graph run in onnxruntime against PyTorch; damaged files refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qtrain
from qtrain.cli import main
from qtrain.export import (
    Exported,
    ExportError,
    export_run,
    load_quantized,
    pack_int,
    read_quantized,
    unpack_int,
)
from qtrain.protocol import set_precision
from qtrain.ptq import (
    PTQError,
    PTQVariant,
    calibration_batches,
    float_model,
    ptq_variant,
    run_ptq,
)
from qtrain.recipes import build_recipe
from qtrain.train import load_run, train
from qtrain.train.run import evaluate
from test_hooks import tiny_config

# ---- packing ---------------------------------------------------------------------------------

GRIDS = [(bits, signed) for bits in (1, 2, 3, 4, 5, 8, 12, 16, 20) for signed in (True, False)]


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
@pytest.mark.parametrize("numel", [0, 1, 3, 5, 7, 1001])
def test_packed_levels_round_trip(bits: int, signed: bool, numel: int) -> None:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    generator = torch.Generator().manual_seed(bits * 1000 + numel)
    levels = torch.randint(low, high + 1, (numel,), generator=generator)
    levels[: min(numel, 2)] = torch.tensor([low, high])[: min(numel, 2)]  # the extremes
    packed = pack_int(levels, bits, signed)
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    assert packed.numel() == -(-numel // per_byte)
    unpacked = unpack_int(packed, bits, numel, signed)
    assert torch.equal(unpacked.long(), levels)
    # The smallest dtype that holds them: (u)int8 up to 8 bits, int16, else int32.
    assert unpacked.element_size() == (1 if bits <= 8 else 2 if signed and bits <= 16 else 4)
    assert unpacked.is_signed() == (signed or bits > 8)
    assert packed.dtype == (torch.uint8 if bits <= 4 else unpacked.dtype)


def test_ternary_and_int4_pack_four_and_two_values_a_byte_first_in_the_low_bits() -> None:
    ternary = pack_int(torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8), 2, signed=True)
    assert ternary.tolist() == [0b01_01_00_11, 0b11]
    int4 = pack_int(torch.tensor([-7, 7, 3], dtype=torch.int8), 4, signed=True)
    assert int4.tolist() == [0x79, 0x03]


def test_packing_refuses_levels_off_the_grid() -> None:
    with pytest.raises(ValueError, match="outside the 2-bit signed range -2..1"):
        pack_int(torch.tensor([0, 2]), 2, signed=True)
    with pytest.raises(ValueError, match="outside the 4-bit unsigned range 0..15"):
        pack_int(torch.tensor([-1]), 4, signed=False)
    with pytest.raises(ValueError, match="take 2 packed values, got 3"):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 4, 4, signed=False)


# ---- runs ------------------------------------------------------------------------------------

Trained = Callable[[str], Path]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny run of a recipe (cnn, width 4, one epoch of 8 steps), trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    overrides = {"cpt": {"eval_bits": 6}}  # evaluated at other bits than its last step ran at

    def run_of(name: str) -> Path:
        out = root / name
        if not out.exists():
            train(tiny_config(), build_recipe(name, overrides.get(name)), out)
        return out

    return run_of


def evaluated_model(run_dir: Path) -> tuple[nn.Module, torch.Tensor]:
    """The trained model at the precision it evaluates at, and the run's test inputs."""
    run = load_run(run_dir)
    precision = run.recipe.on_eval_start(run.model)
    if precision is not None:
        set_precision(run.model, precision)
    return run.model, run.data.test_x


@pytest.mark.parametrize(
    ("recipe", "grids"),
    [
        ("sbm8", {(8, False)}),
        ("cpt", {(6, False)}),  # its eval bits; the classifier stays float
        ("qat", {(4, True), (8, True)}),  # first and last layer at 8 bits
        ("bitnet", {(2, True)}),  # ternary; the first and last layer stay float
        ("ui8", {(8, True)}),
        ("int8-gemm", {(8, True)}),  # LowPrecisionLinear: it re-quantizes its loaded weight
    ],
)
def test_exported_model_loads_back_with_the_trained_models_outputs(
    trained: Trained, tmp_path: Path, recipe: str, grids: set[tuple[int, bool]]
) -> None:
    path = tmp_path / "model.safetensors"
    exported = export_run(trained(recipe), out=path)
    assert exported.path == path and exported.bytes == path.stat().st_size
    assert exported.max_abs_diff == 0.0

    manifest, tensors = read_quantized(path)
    assert {(r["bits"], r["signed"]) for r in manifest["layers"].values()} == grids
    for name, record in manifest["layers"].items():
        per_byte = 4 if record["bits"] <= 2 else 2 if record["bits"] <= 4 else 1
        numel = torch.Size(record["shape"]).numel()
        assert tensors[f"{name}.weight.levels"].numel() == -(-numel // per_byte)
        assert f"{name}.weight" not in tensors  # no float copy of an integer weight

    model, inputs = evaluated_model(trained(recipe))
    loaded = qtrain.load_quantized(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))


def test_a_run_without_integer_weights_is_refused(trained: Trained) -> None:
    with pytest.raises(ExportError, match="recipe fp32.*no layer with integer weights"):
        export_run(trained("fp32"))


@pytest.fixture(scope="module")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(trained("sbm8"), out=tmp_path_factory.mktemp("export") / "m.safetensors").path


def damaged_copy(source: Path, target: Path, change: Callable[[bytes], bytes]) -> Path:
    target.write_bytes(change(source.read_bytes()))
    return target


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def change_manifest_bits(data: bytes) -> bytes:
    return data.replace(b'\\"bits\\": 8', b'\\"bits\\": 7', 1)  # same length: the header parses


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (flip_last_byte, "do not match the SHA-256 recorded at export"),
        (change_manifest_bits, "do not match the SHA-256 recorded at export"),
        (lambda data: data[: header_end(data) + 10], "truncated or corrupted"),
        (lambda data: data[: header_end(data) - 10], "it is truncated"),
        (lambda data: data[:5], "it is truncated"),
    ],
    ids=["tensor-byte", "manifest", "cut-in-tensors", "cut-in-header", "cut-in-length"],
)
def test_a_damaged_file_is_refused_naming_it(
    exported: Path, tmp_path: Path, change: Callable[[bytes], bytes], message: str
) -> None:
    damaged = damaged_copy(exported, tmp_path / "damaged.safetensors", change)
    assert damaged.read_bytes() != exported.read_bytes()
    with pytest.raises(ExportError, match=message) as caught:
        load_quantized(damaged)
    assert str(damaged) in str(caught.value)


def test_files_that_are_not_qtrain_exports_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ExportError, match="not a qtrain export"):
        load_quantized(tmp_path / "other.safetensors")
    with pytest.raises(ExportError, match="cannot read"):
        load_quantized(tmp_path / "missing.safetensors")


def test_export_command_writes_the_file_and_prints_its_size_against_fp32(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new-dir" / "bitnet.safetensors"  # a directory that does not exist yet
    code = main(["export", str(trained("bitnet")), "--format", "safetensors", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert f"{out.stat().st_size:,} bytes" in printed and "fp32 state_dict" in printed


def test_export_command_reports_a_refusal_in_one_line(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", str(trained("fp32"))])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("qtrain: error: run ") and err.count("\n") == 1
    assert not (trained("fp32") / "model.safetensors").exists()


# ---- ONNX ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnxruntime() -> Any:
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason="ONNX export needs the onnx extra: qtrain[onnx]")
    return pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")


@pytest.mark.parametrize(
    ("recipe", "integer_weights"),
    [
        ("sbm8", 4),  # the cnn's three convs and its linear, uint8
        ("qat", 4),  # int8 initializers, 4-bit values in the middle layer
        ("cpt", 3),  # 6-bit grids; the classifier stays float
    ],
)
def test_onnx_graph_is_qdq_and_runs_in_onnxruntime_as_in_pytorch(
    trained: Trained, tmp_path: Path, onnxruntime: Any, recipe: str, integer_weights: int
) -> None:
    import onnx

    exported = export_run(trained(recipe), "onnx", tmp_path / "model.onnx")
    graph = onnx.load(str(exported.path)).graph
    initializers = {i.name: i.data_type for i in graph.initializer}
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequantized if initializers.get(n.input[0]) in integer]
    assert len(weights) == integer_weights
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) >= integer_weights  # one per quantized input at least
    assert len(dequantized) == len(quantized) + len(weights)

    model, inputs = evaluated_model(trained(recipe))
    check_onnx_outputs(onnxruntime, exported, model, inputs)


def check_onnx_outputs(
    onnxruntime: Any, exported: Exported, model: nn.Module, inputs: torch.Tensor
) -> None:
    """The graph as written agrees with PyTorch to float32 rounding on every output; in
    onnxruntime's default session (fused integer kernels that requantize with their own
    rounding) it predicts the same classes. Both differences are the ones reported."""
    outputs = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
        session = onnxruntime.InferenceSession(
            str(exported.path), options, providers=["CPUExecutionProvider"]
        )
        outputs[level] = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
    with torch.no_grad():
        expected = model(inputs)
    as_written, optimized = outputs["ORT_DISABLE_ALL"], outputs["ORT_ENABLE_ALL"]
    torch.testing.assert_close(as_written, expected, rtol=1e-5, atol=1e-5)
    assert exported.max_abs_diff == float((as_written - expected).abs().max())
    assert exported.optimized_max_abs_diff == float((optimized - expected).abs().max())
    agree = (optimized.argmax(1) == expected.argmax(1)).float().mean()
    assert agree >= 0.9, f"{agree:.0%} of predictions agree"


def test_onnx_refuses_activations_scaled_per_batch(
    trained: Trained, tmp_path: Path, onnxruntime: Any
) -> None:
    with pytest.raises(ExportError, match="ONNX export supports static activation scales"):
        export_run(trained("bitnet"), "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_export_without_the_extra_names_it(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec

    def without_onnx(name: str, *args: Any) -> Any:
        return None if name == "onnx" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_onnx)
    with pytest.raises(ExportError, match=r"pip install 'qtrain\[onnx\]'"):
        export_run(trained("sbm8"), "onnx")


def test_manifest_names_how_to_build_the_model(exported: Path) -> None:
    manifest, _ = read_quantized(exported)
    assert manifest["recipe"]["name"] == "sbm8"
    assert manifest["train"]["model"] == "cnn" and manifest["input_shape"] == [1, 8, 8]
    assert manifest["num_classes"] == 4
    assert json.loads(json.dumps(manifest)) == manifest


def test_a_self_compressed_run_exports_and_loads_at_its_reduced_shape(tmp_path: Path) -> None:
    sets = {"gamma": 2.0, "bits_lr": 2.0, "zero_shift_step": 10.0}  # removes within a few steps
    run_dir = tmp_path / "selfcompress"
    train(tiny_config(epochs=3), build_recipe("selfcompress", sets), run_dir)
    run = load_run(run_dir)
    assert run.summary["params_final"] < run.summary["params_initial"]  # channels were removed
    exported = export_run(run_dir, out=tmp_path / "model.safetensors")
    assert exported.max_abs_diff == 0.0
    loaded = qtrain.load_quantized(exported.path)
    shapes = {name: tuple(t.shape) for name, t in run.model.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in loaded.state_dict().items()} == shapes
    with torch.no_grad():
        assert torch.equal(loaded(run.data.test_x), run.model(run.data.test_x))


# ---- PTQ outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "variant"),
    [
        ("fp32", PTQVariant(4, 8, cle=True, bias_correction=True)),  # adds a classifier bias
        ("fp32", PTQVariant(2, None, granularity="per_tensor")),  # weight-only, packed 4 a byte
        ("sbm8", PTQVariant(8, 8, observer="mse")),  # Range BatchNorm dequantized, then folded
    ],
    ids=["fp32-w4a8-cle-bc", "fp32-w2", "sbm8-w8a8"],
)
def test_a_ptq_output_saves_and_loads_back_with_its_outputs(
    trained: Trained, tmp_path: Path, recipe: str, variant: PTQVariant
) -> None:
    run = load_run(trained(recipe))
    result = run_ptq(run, [variant], calib=2, save=["safetensors"], out=tmp_path)
    (row,) = result["variants"]
    (saved,) = row["files"]
    path = tmp_path / f"{variant.file_stem}.safetensors"
    assert saved["path"] == str(path) and saved["bytes"] == path.stat().st_size
    assert saved["max_abs_diff"] == 0.0  # (a model this small is mostly manifest: no size test)
    manifest, _ = read_quantized(path)
    assert manifest["ptq"] == variant.to_dict() and manifest["recipe"]["name"] == recipe
    assert {r["bits"] for r in manifest["layers"].values()} == {variant.w_bits}

    # The very model run_ptq evaluated, rebuilt by hand, against the loaded file.
    batches = calibration_batches(run.data, 2, run.config.batch_size, run.config.seed)
    model = ptq_variant(float_model(run.model), variant, batches)
    loaded = qtrain.load_quantized(path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())  # folded
    inputs = run.data.test_x
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    assert evaluate(loaded, build_recipe("fp32"), run.data, 64)[1] == row["test_acc"]


def test_a_ptq_output_exports_as_a_qdq_onnx_graph(
    trained: Trained, tmp_path: Path, onnxruntime: Any
) -> None:
    run = load_run(trained("fp32"))
    variant = PTQVariant(8, 8, bias_correction=True)
    result = run_ptq(run, [variant], calib=2, save=["onnx", "safetensors"], out=tmp_path)
    onnx_file, safetensors_file = result["variants"][0]["files"]
    assert onnx_file["format"] == "onnx" and safetensors_file["max_abs_diff"] == 0.0
    batches = calibration_batches(run.data, 2, run.config.batch_size, run.config.seed)
    model = ptq_variant(float_model(run.model), variant, batches)
    exported = Exported(
        Path(onnx_file["path"]), onnx_file["bytes"], onnx_file["fp32_bytes"],
        onnx_file["max_abs_diff"], onnx_file["checked_inputs"], onnx_file["optimized_max_abs_diff"],
    )  # fmt: skip
    check_onnx_outputs(onnxruntime, exported, model, run.data.test_x[: exported.checked_inputs])


def test_ptq_save_refuses_an_unknown_format_before_any_work(
    trained: Trained, tmp_path: Path
) -> None:
    run = load_run(trained("fp32"))
    with pytest.raises(PTQError, match="save.*safetensors, onnx"):
        run_ptq(run, [PTQVariant(8)], save=["pickle"], out=tmp_path)
    assert not list(tmp_path.iterdir())
    code = main(["ptq", str(trained("fp32")), "--save", "pickle", "--out", str(tmp_path)])
    assert code != 0 and not list(tmp_path.iterdir())
