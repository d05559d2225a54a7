"""How closely exported ONNX graphs follow the PyTorch models they came from, on many test
images: ONNX Runtime with its graph optimizations off (the graph as written) and in its default
session (fused integer kernels such as QLinearConv, which requantize with their own rounding).

Each pair is ONNX_FILE=REFERENCE, the reference a run directory (``qtrain.load_run``, at the
precision it evaluates at) or a ``.safetensors`` export (``qtrain.load_quantized``: a PTQ
output). The test images are the reference run's (for a file: the run its manifest names).

    python benchmarks/onnx_agreement.py --images 2000 --json benchmarks/results/onnx.json \\
        runs/x/model.onnx=runs/x \\
        runs/x/ptq/w8a8-per-channel-minmax.onnx=runs/x/ptq/w8a8-per-channel-minmax.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnxruntime
import torch

import qtrain
from qtrain.export import read_quantized
from qtrain.protocol import set_precision
from qtrain.train.config import TrainConfig
from qtrain.train.run import DatasetSpec


def reference(path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """The PyTorch model and the test images of its run."""
    if path.suffix == ".safetensors":
        manifest, _ = read_quantized(path)
        config = TrainConfig.from_dict(manifest["train"])
        return qtrain.load_quantized(path), DatasetSpec.of(config).load().test_x
    run = qtrain.load_run(path)
    precision = run.recipe.on_eval_start(run.model)
    if precision is not None:
        set_precision(run.model, precision)
    return run.model.eval(), run.data.test_x


def outputs(onnx_file: Path, inputs: torch.Tensor, optimized: bool) -> torch.Tensor:
    options = onnxruntime.SessionOptions()
    if not optimized:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        str(onnx_file), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: x.numpy()})[0] for x in inputs.split(500)]
    return torch.cat([torch.from_numpy(c) for c in chunks])


def compare(onnx_file: Path, ref: Path, images: int) -> dict:
    model, test_x = reference(ref)
    inputs = test_x[:images]
    with torch.no_grad():
        expected = torch.cat([model(x) for x in inputs.split(500)])
    row = {"onnx": str(onnx_file), "reference": str(ref), "images": len(inputs)}
    for label, optimized in (("as_written", False), ("optimized", True)):
        out = outputs(onnx_file, inputs, optimized)
        close = torch.isclose(out, expected, rtol=1e-5, atol=1e-5).all(dim=1)
        row[label] = {
            "max_abs_diff": float((out - expected).abs().max()),
            "samples_within_1e-5": float(close.float().mean()),
            "same_prediction": float((out.argmax(1) == expected.argmax(1)).float().mean()),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="ONNX_FILE=RUN_DIR_OR_SAFETENSORS")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        onnx_file, _, ref = pair.partition("=")
        row = compare(Path(onnx_file), Path(ref), args.images)
        print(json.dumps(row))
        rows.append(row)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
