"""Post-training quantization (METHODS.md §7): a trained run's model quantized without training.

The steps, on the float version of a run's model (``dequantize_`` of whatever recipe trained
it):

1. ``fold_batchnorm``: every BatchNorm2d that follows a Conv2d in a Sequential is folded into
   the conv's weight and bias (the deployed network has no BatchNorm).
2. ``equalize`` (cross-layer equalization, Nagel et al., ICCV 2019): for each pair of layers
   A → B whose path passes only ReLU, max pooling or identity (positively homogeneous, per
   channel), channel i of A is divided by s_i and B's input channel i multiplied by it,
   s_i = sqrt(r_A,i · r_B,i)/r_B,i (r: max|w| of the channel), so both ranges become
   sqrt(r_A,i · r_B,i); the float network's outputs do not change. Pairs come from a torch.fx
   trace (``equalization_pairs``).
3. Quantize every conv and linear (``ptq_quantization``): weights symmetric at ``w_bits`` per
   output channel or per tensor, their range found once by the observer method
   (``qtrain.calibration``: min/max, percentile or MSE); inputs (``a_bits``, affine unsigned)
   on a range calibrated over ``calib`` training batches (``CalibratedRange``).
4. ``correct_bias`` (empirical bias correction, Nagel et al. 2019): layer by layer in module
   order, the mean output shift per channel between the quantized and the float network over
   the calibration batches is subtracted from the layer's bias.

``run_ptq`` evaluates each ``PTQVariant`` on the run's test split and returns the rows of
``ptq.json``; ``torch_ao_ptq`` is PyTorch's own post-training quantization (FX graph mode, x86
backend, default qconfig) on the same model and calibration batches, for comparison.

Example:
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> _ = model.eval()(torch.randn(2, 1, 8, 8))
    >>> fold_batchnorm(model), type(model[1]).__name__
    (1, 'Identity')
    >>> equalization_pairs(model)
    [('0', '3')]
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qtrain.api import QuantizedTrainingConfig, dequantize_, quantize_, quantized_modules
from qtrain.configs import Config
from qtrain.data import Dataset
from qtrain.export import FORMATS, SUFFIXES, ExportError, _require_onnx, write_checked
from qtrain.formats import Int
from qtrain.observers import CalibratedRange, FixedQParams
from qtrain.ops import GemmConfig
from qtrain.quantizer import MinMax, PerChannel, PerTensor, QuantSpec
from qtrain.recipes import build_recipe
from qtrain.train.run import evaluate
from qtrain.validation import check_int, refuse

Granularity = Literal["per_channel", "per_tensor"]
_GEMMS = (nn.Conv2d, nn.Linear)
# Modules and functions that map each channel on its own and commute with a positive scale.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d)


class PTQError(ValueError):
    """A PTQ request that cannot be carried out (bad variant, untraceable model for CLE...)."""


@dataclasses.dataclass(frozen=True)
class PTQVariant(Config):
    """One post-training quantization of a model.

    Args:
        w_bits: weight bits (symmetric).
        a_bits: input bits of every conv/linear (affine unsigned); None: weight-only.
        granularity: the weights' scales, "per_channel" (output channel) or "per_tensor".
        observer: how ranges are found, "minmax", "percentile" or "mse".
        cle: cross-layer equalization first.
        bias_correction: empirical bias correction after quantizing.
        percentile: the percentile of the "percentile" observer.
    """

    w_bits: int = 8
    a_bits: int | None = None
    granularity: Granularity = "per_channel"
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    cle: bool = False
    bias_correction: bool = False
    percentile: float = 99.99

    error: ClassVar[type[Exception]] = PTQError

    def validate(self) -> None:
        check_int("w_bits", self.w_bits, PTQError, low=2, high=16)
        if self.a_bits is not None:
            check_int("a_bits", self.a_bits, PTQError, low=2, high=16)
        if not 50 < self.percentile <= 100:
            refuse("percentile", self.percentile, "a number in (50, 100]", PTQError)

    @property
    def name(self) -> str:
        bits = f"W{self.w_bits}" + (f"A{self.a_bits}" if self.a_bits else "")
        extras = [t for t, on in (("CLE", self.cle), ("bias corr.", self.bias_correction)) if on]
        return " ".join([bits, self.granularity.replace("_", "-"), self.observer, *extras])

    @property
    def file_stem(self) -> str:
        """The name as a file name: ``w4a8-per-channel-minmax-cle-bias-corr``."""
        return self.name.lower().replace(".", "").replace(" ", "-")


def variants(
    w_bits: Sequence[int],
    a_bits: Sequence[int | None],
    granularities: Sequence[str],
    observers: Sequence[str],
    cle: bool,
    bias_correction: bool,
) -> list[PTQVariant]:
    """Every combination of the given values; ``cle``/``bias_correction`` add the variants
    with them (so both flags give plain, +CLE, +bias correction and both)."""
    bools = [False, True]
    return [
        PTQVariant(w, a, g, o, c, b)  # type: ignore[arg-type]
        for w, a, g, o, c, b in itertools.product(
            w_bits, a_bits, granularities, observers, bools[: 1 + cle], bools[: 1 + bias_correction]
        )
    ]


# ---- 1. BatchNorm folding --------------------------------------------------------------------


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into the
    conv (w ← w·γ/σ per output channel, b ← (b − μ)·γ/σ + β, with the running statistics)
    and replace it by ``nn.Identity``. Returns how many were folded. The model must be in
    eval mode (the folded network is the eval-mode network)."""
    if model.training:
        raise PTQError("fold_batchnorm folds running statistics: put the model in eval() first")
    folded = 0
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for index in range(len(sequential) - 1):
            conv, norm = sequential[index], sequential[index + 1]
            if type(conv) is not nn.Conv2d or type(norm) is not nn.BatchNorm2d:
                continue
            std = torch.sqrt(norm.running_var + norm.eps)
            gamma = norm.weight if norm.affine else torch.ones_like(std)
            beta = norm.bias if norm.affine else torch.zeros_like(std)
            factor = gamma / std
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            conv.weight.mul_(factor.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - norm.running_mean) * factor + beta)
            sequential[index + 1] = nn.Identity()
            folded += 1
    return folded


# ---- 2. Cross-layer equalization -------------------------------------------------------------


def equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(A, B) names of conv/linear layers where A's output reaches only B, through ReLU, max
    pooling or identity modules alone (each node on the path with one user): pairs whose
    channels can be rescaled without changing the network. Found on a torch.fx trace;
    grouped convolutions and shape changes (flatten) end a path."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001  (fx raises many kinds for untraceable code)
        raise PTQError(
            f"cross-layer equalization needs a torch.fx trace of {type(model).__name__}: "
            f"{type(err).__name__}: {err}"
        ) from err
    modules = dict(model.named_modules())

    def gemm(node: torch.fx.Node) -> bool:
        module = modules.get(node.target) if node.op == "call_module" else None
        return isinstance(module, _GEMMS) and getattr(module, "groups", 1) == 1

    def homogeneous(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), _HOMOGENEOUS_MODULES)
        return node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS

    pairs = []
    for node in graph.nodes:
        if not gemm(node):
            continue
        current = node
        while len(current.users) == 1:
            (current,) = current.users
            if gemm(current):
                pairs.append((str(node.target), str(current.target)))
                break
            if not homogeneous(current):
                break
    return pairs


@torch.no_grad()
def equalize(model: nn.Module, pairs: Iterable[tuple[str, str]], iterations: int = 20) -> None:
    """Cross-layer equalization of ``pairs`` (``equalization_pairs``), repeated
    ``iterations`` times so that chains A → B → C settle."""
    pairs = list(pairs)
    for _ in range(iterations):
        for first_name, second_name in pairs:
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            if second.weight.shape[1] != first.weight.shape[0]:
                continue  # a shape change on the path: not a channel-for-channel pair
            range_first = first.weight.abs().flatten(1).amax(1)
            range_second = second.weight.abs().transpose(0, 1).flatten(1).amax(1)
            ok = (range_first > 0) & (range_second > 0)
            scale = torch.where(ok, torch.sqrt(range_first * range_second) / range_second, 1.0)
            shape = (-1,) + (1,) * (first.weight.dim() - 1)
            first.weight.div_(scale.view(shape))
            if first.bias is not None:
                first.bias.div_(scale)
            second.weight.mul_(scale.view((1, -1) + (1,) * (second.weight.dim() - 2)))


# ---- 3. Quantization and calibration ---------------------------------------------------------


def ptq_quantization(variant: PTQVariant) -> QuantizedTrainingConfig:
    """Every conv/linear with the variant's weight spec and (when ``a_bits``) an affine
    unsigned input spec on a calibrated range; no gradient specs (inference)."""
    granularity = PerChannel(0) if variant.granularity == "per_channel" else PerTensor()
    weight = QuantSpec(Int(variant.w_bits), granularity=granularity)
    activation = None
    if variant.a_bits is not None:
        activation = QuantSpec(Int(variant.a_bits, signed=False), scale=MinMax())

    def observer() -> CalibratedRange:
        return CalibratedRange(variant.observer, variant.percentile)

    return QuantizedTrainingConfig(GemmConfig(activation, weight), observers={"input": observer})


def quantize_model(model: nn.Module, variant: PTQVariant) -> nn.Module:
    """``model`` (float, BN folded) quantized as ``variant`` says, in place: the weights'
    qparams fixed now (``FixedQParams.calibrated``), the inputs' left to ``calibrate``."""
    quantize_(model, ptq_quantization(variant))
    for _, layer in quantized_modules(model):
        spec = layer.config.weight_spec
        layer.observers["weight"] = FixedQParams.calibrated(
            layer.weight, spec, variant.observer, variant.percentile
        )
        if layer.config.input_spec is None:
            del layer.observers["input"]  # weight-only: nothing to calibrate
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = False) -> None:
    """Run ``batches`` through ``model`` with every ``CalibratedRange`` recording, then fix
    their ranges. A progress bar unless ``progress`` is False."""
    observers = [m for m in model.modules() if isinstance(m, CalibratedRange)]
    if not observers:
        return
    for observer in observers:
        observer.calibrating = True
    model.eval()
    for x in _progress(batches, "calibration", progress):
        model(x)
    for observer in observers:
        observer.finish()


# ---- 4. Bias correction ----------------------------------------------------------------------


@torch.no_grad()
def correct_bias(
    quantized: nn.Module, reference: nn.Module, batches: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Empirical bias correction: for each quantized layer in module order, the mean shift of
    its output per channel (over samples and positions) between ``quantized`` and the float
    ``reference`` network on ``batches`` is subtracted from its bias (a zero bias is added to
    a layer without one). Later layers see the earlier ones corrected. Returns the mean
    |shift| removed per layer."""
    quantized.eval()
    reference.eval()
    removed = {}
    for name, layer in quantized_modules(quantized):
        twin = reference.get_submodule(name)
        shift = _mean_output(quantized, layer, batches) - _mean_output(reference, twin, batches)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias.sub_(shift)
        removed[name] = float(shift.abs().mean())
    return removed


def _mean_output(
    model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor]
) -> torch.Tensor:
    total: list[torch.Tensor] = []

    channel = 1 if isinstance(layer, nn.Conv2d) else -1  # (N, C, H, W) or (..., C)

    def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        total.append(output.float().movedim(channel, 0).flatten(1).mean(1))

    handle = layer.register_forward_hook(record)
    try:
        for x in batches:
            model(x)
    finally:
        handle.remove()
    return torch.stack(total).mean(0)


# ---- the whole procedure ---------------------------------------------------------------------


def float_model(model: nn.Module) -> nn.Module:
    """A float copy of a run's model (quantized layers back to torch's), BN folded, eval."""
    plain = dequantize_(copy.deepcopy(model)).eval()
    fold_batchnorm(plain)
    return plain


def calibration_batches(dataset: Dataset, count: int, batch_size: int, seed: int = 0) -> list:
    """The first ``count`` training batches of a seeded shuffle, without augmentation."""
    check_int("calib", count, PTQError, low=1)
    batches = dataset.train_batches(batch_size, epoch=0, seed=seed, augment=False)
    return [x for x, _ in itertools.islice(batches, count)]


def ptq_variant(
    plain: nn.Module, variant: PTQVariant, batches: Sequence[torch.Tensor], progress: bool = False
) -> nn.Module:
    """The quantized model of one variant, from the BN-folded float model ``plain`` (kept)."""
    reference = copy.deepcopy(plain)
    if variant.cle:
        equalize(reference, equalization_pairs(reference))
    model = quantize_model(copy.deepcopy(reference), variant)
    calibrate(model, batches, progress)
    if variant.bias_correction:
        correct_bias(model, reference, batches)
    return model.eval()


@torch.no_grad()
def skeleton(model: nn.Module, variant: PTQVariant, keys: Iterable[str]) -> nn.Module:
    """The structure of ``variant``'s model made from a freshly built run model, its values
    still to be loaded (``qtrain.load_quantized`` of a PTQ output): float, BatchNorm folded,
    quantized, and a zero bias on each quantized layer that lacks one where ``keys`` (the
    saved tensors' names) hold one (bias correction adds them)."""
    model = dequantize_(model).eval()
    fold_batchnorm(model)
    quantize_model(model, variant)
    keys = set(keys)
    for name, layer in quantized_modules(model):
        if layer.bias is None and (f"{name}.bias" if name else "bias") in keys:
            layer.bias = nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]))
    return model


@torch.no_grad()
def torch_ao_ptq(plain: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """PyTorch's own post-training quantization of ``plain``: FX graph mode, the x86 backend's
    default qconfig (per-channel int8 weights, histogram-observed uint8 activations),
    calibrated on ``batches``; the converted model runs int8 kernels on the CPU."""
    with warnings.catch_warnings():  # torch.ao announces its move to torchao on every call
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        mapping = get_default_qconfig_mapping("x86")
        prepared = prepare_fx(copy.deepcopy(plain).eval(), mapping, (batches[0],))
        for x in batches:
            prepared(x)
        return convert_fx(prepared)


def run_ptq(
    run: Any,
    variant_list: Sequence[PTQVariant],
    calib: int = 8,
    compare_torch: bool = False,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
    save: Sequence[str] = (),
    out: str | os.PathLike[str] | None = None,
    check_batch: int = 64,
) -> dict[str, Any]:
    """Every variant of ``run`` (a ``qtrain.load_run`` result) evaluated on its test split:
    ``{"run": ..., "fp32": {"test_acc", "test_loss"}, "calib": ..., "variants": [...]}``.
    ``fp32`` is the float, BN-folded version of the run's model; ``compare_torch`` adds
    PyTorch's own PTQ (``torch_ao_ptq``) as a variant named "torch.ao x86 default".
    ``report`` receives one line per finished variant.

    ``save``: formats of ``qtrain.export`` ("safetensors", "onnx") in which each variant's
    model is written to ``out`` as ``<variant.file_stem>.<suffix>`` and checked on
    ``check_batch`` test inputs (loaded back with ``qtrain.load_quantized``, or run in
    onnxruntime); each variant's row lists its ``files`` (path, bytes, the fp32 state_dict's
    bytes, the largest output difference). torch.ao's model is not saved."""
    if not variant_list and not compare_torch:
        raise PTQError("no PTQ variant to run")
    for format in save:
        if format not in FORMATS:
            refuse("save", format, f"one of: {', '.join(FORMATS)}", PTQError)
    if save and out is None:
        raise PTQError("save: give the directory to write the models to (out)")
    if "onnx" in save:
        _require_onnx()  # before any work
    if run.config.device != "cpu" and compare_torch:
        raise PTQError(
            "torch.ao's quantized kernels run on the CPU: load the run with device='cpu'"
        )
    dataset, batch_size = run.data, run.config.batch_size
    fp32_recipe = build_recipe("fp32")
    plain = float_model(run.model)
    batches = calibration_batches(dataset, calib, batch_size, run.config.seed)

    def score(model: nn.Module) -> dict[str, float]:
        loss, acc = evaluate(model, fp32_recipe, dataset, batch_size)
        return {"test_acc": acc, "test_loss": loss}

    result: dict[str, Any] = {
        "run": {
            "path": str(run.path),
            "recipe": run.recipe.name,
            "test_acc": run.summary.get("test_acc"),
        },
        "calib": {"batches": len(batches), "batch_size": batch_size},
        "fp32": score(plain),
        "variants": [],
    }
    for variant in variant_list:
        model = ptq_variant(plain, variant, batches, progress)
        row = {"name": variant.name, **variant.to_dict(), **score(model)}
        if save:
            row["files"] = [
                _save_variant(run, model, variant, format, out, check_batch) for format in save
            ]
        result["variants"].append(row)
        if report:
            report(f"{row['name']}: {100 * row['test_acc']:.2f}%")
    if compare_torch:
        row = {
            "name": "torch.ao x86 default",
            "w_bits": 8,
            "a_bits": 8,
            "granularity": "per_channel",
            "observer": "torch default (histogram)",
            "cle": False,
            "bias_correction": False,
            **score(torch_ao_ptq(plain, batches)),
        }
        result["variants"].append(row)
        if report:
            report(f"{row['name']}: {100 * row['test_acc']:.2f}%")
    return result


def _save_variant(
    run: Any, model: nn.Module, variant: PTQVariant, format: str, out: Any, check_batch: int
) -> dict[str, Any]:
    path = Path(out) / f"{variant.file_stem}{SUFFIXES[format]}"
    try:
        exported = write_checked(
            model, path, format, config=run.config, recipe=run.recipe,
            input_shape=run.data.input_shape, num_classes=run.data.num_classes,
            inputs=run.data.test_x[:check_batch], ptq=variant.to_dict(),
        )  # fmt: skip
    except ExportError as err:
        raise PTQError(f"variant {variant.name!r}: {err}") from None
    return {
        "format": format,
        "path": str(exported.path),
        "bytes": exported.bytes,
        "fp32_bytes": exported.fp32_bytes,
        "max_abs_diff": exported.max_abs_diff,
        "optimized_max_abs_diff": exported.optimized_max_abs_diff,
        "checked_inputs": exported.checked_inputs,
    }


def format_ptq(result: dict[str, Any]) -> str:
    """``run_ptq``'s result as a markdown table (ptq.md)."""
    fp32 = result["fp32"]["test_acc"]
    lines = [
        f"# PTQ of {result['run']['path']} ({result['run']['recipe']})",
        "",
        f"Calibration: {result['calib']['batches']} training batches of "
        f"{result['calib']['batch_size']}. fp32 (BN folded): {100 * fp32:.2f}%.",
        "",
        "| variant | w bits | a bits | granularity | observer | CLE | bias corr. | test acc % "
        "| Δ vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["variants"]:
        lines.append(
            f"| {row['name']} | {row['w_bits']} | {row['a_bits'] or 'float'} | "
            f"{row['granularity']} | {row['observer']} | {'yes' if row['cle'] else 'no'} | "
            f"{'yes' if row['bias_correction'] else 'no'} | {100 * row['test_acc']:.2f} | "
            f"{100 * (row['test_acc'] - fp32):+.2f} |"
        )
    files = [(row["name"], f) for row in result["variants"] for f in row.get("files", ())]
    if files:
        lines += [
            "",
            "| variant | file | bytes | of fp32 | max abs diff (checked inputs) |",
            "|---|---|---|---|---|",
        ]
        for name, f in files:
            lines.append(
                f"| {name} | {Path(f['path']).name} | {f['bytes']:,} | "
                f"{f['bytes'] / f['fp32_bytes']:.1%} | {f['max_abs_diff']:.3g} "
                f"({f['checked_inputs']}, {_CHECKED[f['format']]}) |"
            )
    return "\n".join(lines) + "\n"


_CHECKED = {"safetensors": "loaded back", "onnx": "onnxruntime, graph as written"}


def _progress(items: Sequence[Any], what: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="batch", leave=False)
