"""The trainer: one loop for every recipe, driven only through the recipe hooks.

A run writes one directory (DESIGN.md, "Runs and artifacts"): ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` with its manifest, and ``summary.json``
(``qtrain.train.checkpoint``); ``load_run`` gives the trained model back.

- ``config``: ``TrainConfig``, the learning-rate schedule, the errors a run raises;
- ``checkpoint``: the run directory's files — atomic writes, checksummed checkpoints, RNG state;
- ``run``: a run's data and model as every run builds them, its evaluation, ``load_run``;
- ``loop``: the trainer itself and ``train`` — in one process, or one per rank under torchrun
  (``TrainConfig.distributed``: DDP or FSDP2; ``qtrain.distributed``, docs/SCALING.md);
- ``optim``: the optimizer, and its rebuild when a recipe changes the model's shape;
- ``progress``: what a step and a checkpoint carry (progress, a step's snapshot, its fault);
- ``sharded``: an FSDP2 run's sharded checkpoints under ``checkpoint.dcp/``;
- ``summary``: the figures of ``summary.json``;
- ``support``: the trainer's small helpers (option checks, records, progress bar, fault tests).

Example:
    >>> from qtrain.recipes import build_recipe
    >>> config = TrainConfig(model="cnn", data="synthetic", epochs=1, quiet=True)
    >>> summary = train(config, build_recipe("fp32"), "runs/example")  # doctest: +SKIP
    >>> load_run("runs/example").evaluate()["test_acc"] == summary["test_acc"]  # doctest: +SKIP
    True
"""

from qtrain.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TIMING_KEYS,
    read_checkpoint,
    read_metrics,
    seed_everything,
    versions,
)
from qtrain.train.config import (
    OPTIMIZERS,
    RESUME_MUTABLE,
    SCHEDULES,
    CheckpointError,
    NumericalFaultError,
    OutOfMemoryError,
    RunError,
    TrainConfig,
    TrainConfigError,
    lr_factor,
)
from qtrain.train.loop import MAX_STEP_ATTEMPTS, _Trainer, train
from qtrain.train.optim import build_optimizer
from qtrain.train.run import (
    DatasetSpec,
    Run,
    RunNotFoundError,
    evaluate,
    init_from_run,
    load_run,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "MAX_STEP_ATTEMPTS",
    "METRICS_FILE",
    "OPTIMIZERS",
    "RESUME_MUTABLE",
    "SCHEDULES",
    "SUMMARY_FILE",
    "TIMING_KEYS",
    "CheckpointError",
    "DatasetSpec",
    "NumericalFaultError",
    "OutOfMemoryError",
    "Run",
    "RunError",
    "RunNotFoundError",
    "TrainConfig",
    "TrainConfigError",
    "_Trainer",
    "build_optimizer",
    "evaluate",
    "init_from_run",
    "load_run",
    "lr_factor",
    "read_checkpoint",
    "read_metrics",
    "seed_everything",
    "train",
    "versions",
]
