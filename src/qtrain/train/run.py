"""A run's model, built once for every use: training, resume and ``load_run``.

The trainer and ``load_run`` build a run's data and model with the same ``build``, replay a
checkpoint onto the fresh model with the same ``restore_model``, and evaluate with the same
``evaluate``; so a loaded run is the trained model to the bit, and scores the test accuracy
its ``summary.json`` reports.

Example:
    >>> run = load_run("runs/sbm8-resnet9")  # doctest: +SKIP
    >>> run.evaluate()["test_acc"] == run.summary["test_acc"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import data as qdata
from qtrain import models as qmodels
from qtrain.api import use_products
from qtrain.data import Dataset
from qtrain.guard import NumericalGuard
from qtrain.protocol import set_precision
from qtrain.recipes import RECIPES, Recipe
from qtrain.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    SUMMARY_FILE,
    _rng_state,
    _set_rng_state,
    read_checkpoint,
    seed_everything,
)
from qtrain.train.config import (
    CheckpointError,
    RunError,
    TrainConfig,
    TrainConfigError,
    _check_keywords,
)


class RunNotFoundError(RunError):
    """A run directory is missing, or is not a qtrain run (it has no config.json)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Which data a run uses: its ``TrainConfig``'s data options, and ``load`` to get it.

    Example:
        >>> spec = DatasetSpec("synthetic", kwargs={"shape": [1, 8, 8], "size": 64})
        >>> spec.load().input_shape
        (1, 8, 8)
    """

    name: str
    data_dir: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0  # picks the subsets, and draws synthetic data
    download: bool = False

    @classmethod
    def of(cls, config: TrainConfig) -> DatasetSpec:
        return cls(
            config.data,
            config.data_dir,
            dict(config.data_kwargs),
            config.train_subset,
            config.test_subset,
            config.seed,
            config.download,
        )

    def load(self, device: str | torch.device = "cpu") -> Dataset:
        """The dataset on ``device`` (``qtrain.data.load_dataset``)."""
        return qdata.load_dataset(
            self.name,
            data_dir=self.data_dir,
            train_subset=self.train_subset,
            test_subset=self.test_subset,
            seed=self.seed,
            device=device,
            download=self.download,
            **self.kwargs,
        )


def build(config: TrainConfig, recipe: Recipe) -> tuple[Dataset, nn.Module]:
    """The run's data and its freshly prepared model, as every run builds them.

    Everything is seeded first, so the model's initial weights are the run's. The data gives
    the model its input shape and classes; ``recipe.prepare`` then swaps its layers.
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device cuda requested but torch.cuda.is_available() is False")
    data_builder, model_builder = qdata.DATASETS[config.data], qmodels.MODELS[config.model]
    _check_keywords(f"data {config.data}", "data_kwargs", data_builder, config.data_kwargs, 1)
    _check_keywords(f"model {config.model}", "model_kwargs", model_builder, config.model_kwargs, 3)
    seed_everything(config.seed)
    try:
        dataset = DatasetSpec.of(config).load(device)
        model = qmodels.build_model(
            config.model,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            width=config.width,
            **config.model_kwargs,
        )
    except (ValueError, TypeError, OSError, KeyError) as err:
        raise TrainConfigError(str(err) or repr(err)) from err
    model = recipe.prepare(model.to(device)).to(device)
    if config.products != "float" and not use_products(model, config.products):
        raise TrainConfigError(
            f"products={config.products} changes the products of the emulated quantized "
            f"layers (qtrain.ops' and QAT's), and recipe {recipe.name} has none (int8-gemm and "
            "fp8-gemm run real low-precision products of their own; fp32 and amp none)"
        )
    return dataset, model


def restore_model(
    state: dict[str, Any], model: nn.Module, recipe: Recipe, guard: NumericalGuard
) -> None:
    """Replay a checkpoint onto the freshly prepared ``model``: the recipe's state first (it
    may replay structural changes, such as removed channels), the guard's precision floors,
    then the weights at the checkpoint's shapes."""
    recipe.load_state_dict(state["recipe"], model)
    guard.load_state_dict(state.get("guard", {}))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in state["model"].items():
        if name in own and own[name].shape != tensor.shape:
            own[name].data = torch.empty_like(tensor, device=own[name].device)
    model.load_state_dict(state["model"])


@dataclasses.dataclass
class _Meter:
    """Running sums of the task loss and accuracy over a window of steps."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.count += count

    def means(self) -> tuple[float, float]:
        n = max(self.count, 1)
        return self.loss_sum / n, self.correct / n


def task_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and the number of correct predictions.

    logits (B, C) with targets (B,), or per-position logits (B, T, C) with targets (B, T) for
    language models; the loss is in float32 whatever dtype autocast produced.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, correct


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The recipe's autocast for a forward pass on ``device`` (or none)."""
    return recipe.autocast(device.type) or contextlib.nullcontext()


def evaluate(
    model: nn.Module, recipe: Recipe, dataset: Dataset, batch_size: int
) -> tuple[float, float]:
    """Test loss and accuracy of ``dataset``'s test split, as every run evaluates.

    The model runs at the precision ``recipe.on_eval_start`` returns (None: the one it has),
    in eval mode, under the recipe's autocast. The next training step's schedule sets the
    training precision again.
    """
    return evaluate_sums(model, recipe, dataset, batch_size).means()


def eval_batch_count(dataset: Dataset, batch_size: int) -> int:
    """How many batches of ``batch_size`` the test split makes (the last may be short)."""
    return -(-len(dataset.test_y) // batch_size)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    recipe: Recipe,
    dataset: Dataset,
    batch_size: int,
    batches: Sequence[int] | None = None,
    idle: int = 0,
) -> _Meter:
    """``evaluate``'s sums over the test batches numbered ``batches`` (None: all): the batches
    every run evaluates, each as in a single process, whichever rank runs it. ``idle`` more
    forward passes (of batch 0, not counted) keep the ranks of an FSDP2 run in step: each of
    its forward passes gathers the parameters from every rank."""
    precision = recipe.on_eval_start(model)
    if precision is not None:
        set_precision(model, precision)
    model.eval()
    total = _Meter()
    counted = list(range(eval_batch_count(dataset, batch_size)) if batches is None else batches)
    for position, index in enumerate([*counted, *[0] * idle]):
        start = index * batch_size
        x = dataset.test_x[start : start + batch_size]
        y = dataset.test_y[start : start + batch_size]
        with autocast(recipe, dataset.device):
            logits = model(x)
        if position >= len(counted):
            continue
        loss, correct = task_loss(logits, y)
        total.add(loss.item(), int(correct.item()), y.numel())
    return total


def read_run_config(run_dir: Path) -> tuple[TrainConfig, Recipe]:
    """The ``TrainConfig`` and a fresh recipe of the run in ``run_dir`` (its config.json)."""
    if not run_dir.is_dir():
        raise RunNotFoundError(f"no run directory {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunNotFoundError(f"{run_dir} is not a qtrain run: it has no {CONFIG_FILE}")
    saved = json.loads(path.read_text())
    name = saved["recipe"]
    if name not in RECIPES:
        raise TrainConfigError(
            f"{path}: recipe {name!r} is not registered; known: {', '.join(sorted(RECIPES))}"
        )
    recipe_class = RECIPES[name]
    recipe = recipe_class(recipe_class.config_class.from_dict(saved["recipe_config"]))
    return TrainConfig.from_dict(saved["train"]), recipe


@dataclasses.dataclass
class Run:
    """A run loaded back by ``load_run``: its model at the final shape, weights and precision.

    Attributes:
        path: the run directory.
        config: the run's ``TrainConfig`` (``device`` as loaded).
        recipe: the recipe, with the state of the checkpoint.
        model: the trained model, in eval mode.
        dataset: which data the run used (``run.dataset.load()`` loads it again).
        data: the dataset as loaded to build the model, on the model's device.
        summary: ``summary.json`` (empty when the run has not finished).
        step: training steps done at the checkpoint.
    """

    path: Path
    config: TrainConfig
    recipe: Recipe
    model: nn.Module
    dataset: DatasetSpec
    data: Dataset = dataclasses.field(repr=False)
    summary: dict[str, Any]
    step: int

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """``test_loss`` and ``test_acc`` on the test split of ``dataset`` (default: the
        run's), evaluated as the trainer evaluates: the same batches, the recipe's eval
        precision and autocast. The run's own data scores its summary's ``test_acc``."""
        data = self.data if dataset is None else dataset
        test_loss, test_acc = evaluate(self.model, self.recipe, data, self.config.batch_size)
        return {"test_loss": test_loss, "test_acc": test_acc}


def load_run(run_dir: str | os.PathLike[str], *, device: str | None = None) -> Run:
    """The trained model of the run in ``run_dir``, with its recipe, config and data.

    The model is built as the trainer builds it (the data gives its input shape and classes,
    then ``recipe.prepare``); the checkpoint — checksum verified, loaded as data only — is
    replayed onto it as on resume (the recipe's state, the guard's floors, the weights), and
    it is set to the precision its last training step ran at. ``device`` overrides the run's
    (e.g. ``"cpu"`` for a run trained on a GPU). Global RNG streams are left as they were.

    Raises ``RunNotFoundError`` for a missing directory or one without config.json,
    ``CheckpointError`` for a missing or damaged checkpoint.

    Example:
        >>> run = load_run("runs/sbm8-resnet9")  # doctest: +SKIP
        >>> run.evaluate()  # doctest: +SKIP
        {'test_loss': 0.31, 'test_acc': 0.902}
    """
    path = Path(run_dir)
    config, recipe = read_run_config(path)
    if device is not None:
        config = config.with_changes(device=device)
    checkpoint = path / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise CheckpointError(f"run {path} has no {CHECKPOINT_FILE}: nothing to load")
    state = read_checkpoint(checkpoint)
    rng = _rng_state()
    try:
        data, model = build(config, recipe)
    finally:
        _set_rng_state(rng)
    guard = NumericalGuard(model)
    restore_model(state, model, recipe, guard)
    guard.remove()
    step = state["progress"]["step"]
    if step:
        total_steps = config.epochs * data.steps_per_epoch(config.batch_size)
        set_precision(model, recipe.schedule(step - 1, total_steps))
    summary_path = path / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path, config, recipe, model.eval(), DatasetSpec.of(config), data, summary, step)


def init_from_run(model: nn.Module, config: TrainConfig, dataset: Dataset) -> dict[str, int]:
    """Start ``model`` (freshly prepared for ``config``, whose ``init`` names a run directory)
    from that run's trained weights: QAT's usual workflow, fine-tuning a trained float model.

    Every tensor of the plain architecture (``config.model`` as ``build_model`` makes it:
    weights, biases, BatchNorm statistics) is copied from the source run's model bit for bit,
    whatever recipe trained it (its quantized layers keep the plain names). Tensors that only
    the new recipe has (observers, learned steps, BitLinear's norms) keep their fresh
    initialisation; a learned step then initialises from the loaded weights at the first
    step. Global RNG streams are left as they were.

    Returns counts: ``{"loaded": n, "fresh": m}``. Raises ``TrainConfigError`` naming the
    first tensor the source lacks or holds at another shape (a different model or width).
    """
    rng = _rng_state()
    try:
        source = load_run(config.init, device=config.device).model.state_dict()
        with torch.device("meta"):
            plain = qmodels.build_model(
                config.model,
                input_shape=dataset.input_shape,
                num_classes=dataset.num_classes,
                width=config.width,
                **config.model_kwargs,
            )
    finally:
        _set_rng_state(rng)
    target = model.state_dict()
    names = list(plain.state_dict())
    for name in names:
        if name not in source:
            raise TrainConfigError(
                f"init {config.init}: its model has no {name!r}; --init needs a run of the same "
                f"model ({config.model}, width {config.width})"
            )
        if source[name].shape != target[name].shape:
            raise TrainConfigError(
                f"init {config.init}: {name!r} has shape {tuple(source[name].shape)} there and "
                f"{tuple(target[name].shape)} here; --init needs a run of the same model and width"
            )
    with torch.no_grad():
        for name in names:
            target[name].copy_(source[name])
    return {"loaded": len(names), "fresh": len(target) - len(names)}
