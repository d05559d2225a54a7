"""The ``qtrain`` command line: ``recipes``, ``train``, ``compare``, ``prt``, ``report``.

Every usage error (unknown recipe/model/dataset, bad ``--set`` key or value, bad option value,
a non-empty run directory) is one line on stderr and exit code 2, and nothing is written: all
options are validated, and data and model set up, before a directory is created. A run that
cannot go on (a NaN/inf under ``--on-nonfinite stop``, a corrupted or unsafe checkpoint, out of
memory) is one line on stderr and exit code 1, without a stack trace.

Example:
    >>> from qtrain.cli import main
    >>> main(["recipes"])  # doctest: +SKIP
    >>> main(["train", "--recipe", "fp32", "--model", "cnn", "--data", "synthetic",
    ...       "--epochs", "1", "--out", "runs/cnn"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from qtrain import distributed, ptq
from qtrain.data import DATASETS
from qtrain.export import FORMATS, export_run
from qtrain.guard import POLICIES
from qtrain.models import MODELS
from qtrain.ops import PRODUCTS
from qtrain.recipes import RECIPES, Recipe, RecipeConfigError, build_recipe, iter_recipes
from qtrain.recipes.cpt import CPTConfig, RangeTest, plot_range_test
from qtrain.report import COMPARE_FILE, compare_rows, format_table, write_compare, write_report
from qtrain.train import (
    CONFIG_FILE,
    OPTIMIZERS,
    RESUME_MUTABLE,
    SCHEDULES,
    RunError,
    TrainConfig,
    TrainConfigError,
    load_run,
    read_metrics,
    train,
)
from qtrain.train.checkpoint import _atomic_write, _write_json


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage and exits; we want one line and nothing else.
        raise UsageError(message)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def _one_of(choices: Sequence[str]) -> str:
    return "one of: " + ", ".join(choices)


def _json_value(text: str) -> Any:
    """A ``--data-arg``/``--model-arg`` value: JSON when it parses (numbers, lists), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# (flag, TrainConfig field, argparse keywords); every default is "absent" so that options
# given explicitly can be told from values taken from --config or a resumed run's config.
_TRAIN_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"help": _one_of(sorted(MODELS))}),
    ("--data", "data", {"help": "dataset, " + _one_of(sorted(DATASETS))}),
    ("--epochs", "epochs", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {"help": "cpu, cuda or cuda:N"}),
    ("--width", "width", {"type": int, "help": "model base width"}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--lr", "lr", {"type": float, "help": "peak learning rate"}),
    ("--optimizer", "optimizer", {"help": _one_of(OPTIMIZERS)}),
    ("--momentum", "momentum", {"type": float}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--schedule", "schedule", {"help": "learning rate, " + _one_of(SCHEDULES)}),
    ("--warmup-fraction", "warmup_fraction", {"type": float}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--train-subset", "train_subset", {"type": int}),
    ("--test-subset", "test_subset", {"type": int}),
    ("--checkpoint-every", "checkpoint_every", {"type": int, "help": "steps (0: at end only)"}),
    ("--eval-every", "eval_every", {"type": int, "help": "epochs"}),
    ("--log-every", "log_every", {"type": int, "help": "steps"}),
    ("--on-nonfinite", "on_nonfinite", {"help": "at a NaN/inf, " + _one_of(POLICIES)}),
    ("--check-every", "check_every", {"type": int, "help": "steps between per-layer checks"}),
    ("--data-dir", "data_dir", {}),
    (
        "--init",
        "init",
        {
            "metavar": "RUN_DIR",
            "help": "start from this run's trained weights ({seed}: each seed's)",
        },
    ),
    (
        "--distributed",
        "distributed",
        {
            "help": "one process per rank under torchrun (torchrun --nproc-per-node N -m qtrain "
            "train ...), --batch-size the global batch: " + _one_of(distributed.MODES)
        },
    ),
    (
        "--sync-batchnorm",
        "sync_batchnorm",
        {"action": "store_true", "help": "BatchNorm statistics over the global batch (CUDA)"},
    ),
    (
        "--products",
        "products",
        {
            "help": "how quantized layers multiply: float (the emulation), int8 (exact integer "
            "products where the operands qualify: torch._int_mm on AMX/VNNI CPUs and CUDA, "
            "else the exact twin); int8-twin and int8-real force a route; " + _one_of(PRODUCTS)
        },
    ),
    ("--download", "download", {"action": "store_true", "help": "fetch missing data"}),
    ("--no-augment", "augment", {"action": "store_false"}),
    ("--quiet", "quiet", {"action": "store_true", "help": "no progress bar"}),
]


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    for flag, field, kwargs in _TRAIN_OPTIONS:
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, **kwargs)
    parser.add_argument(
        "--set",
        dest="sets",
        nargs="+",
        action="extend",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="recipe parameter",
    )
    parser.add_argument(
        "--model-arg",
        dest="model_args",
        nargs="+",
        action="extend",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
    )
    parser.add_argument(
        "--data-arg",
        dest="data_args",
        nargs="+",
        action="extend",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")


def build_parser() -> argparse.ArgumentParser:
    """The ``qtrain`` argument parser (errors raise ``UsageError`` instead of exiting)."""
    parser = _Parser(prog="qtrain", description="Quantized training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("recipes", help="list recipes with their paper")
    p_train = sub.add_parser("train", help="train one model with one recipe")
    p_train.add_argument("--recipe", default=argparse.SUPPRESS, help=_one_of(sorted(RECIPES)))
    p_train.add_argument("--config", type=Path, help="a run's config.json to start from")
    p_train.add_argument("--out", type=Path, help="run directory (default runs/<name>)")
    _add_train_options(p_train)
    p_compare = sub.add_parser("compare", help="train several recipes x seeds and tabulate")
    p_compare.add_argument(
        "--recipes", required=True, help="comma-separated, each " + _one_of(sorted(RECIPES))
    )
    p_compare.add_argument("--seeds", default="0", help="comma-separated integers")
    p_compare.add_argument("--out", type=Path, required=True)
    _add_train_options(p_compare)
    p_prt = sub.add_parser(
        "prt",
        help="CPT's precision range test alone: pick b_min, plot accuracy against bits",
        description="Train with recipe cpt and b_min=auto until the range test picks b_min "
        "(give the --epochs of the real run: the test runs at the start of its lr schedule); "
        "--set takes cpt's parameters (prt_start, prt_steps, prt_threshold, b_max, bw_bits).",
    )
    p_prt.add_argument("--out", type=Path, required=True, help="run directory (+ prt.png)")
    _add_train_options(p_prt)
    p_ptq = sub.add_parser(
        "ptq",
        help="post-training quantization of a run: calibration, CLE, bias correction",
        description="Quantize a trained run's model without training and evaluate each "
        "variant on its test split. --w-bits, --a-bits, --granularity and --observer take "
        "comma-separated lists (every combination runs); --cle and --bias-correction add "
        "the variants with them. Writes ptq.json and ptq.md in --out (default RUN_DIR/ptq); "
        "--save writes each variant's model there too.",
    )
    p_ptq.add_argument("run_dir", type=Path)
    p_ptq.add_argument("--w-bits", default="8", help="weight bits, e.g. 8 or 8,4")
    p_ptq.add_argument(
        "--a-bits", default="none", help="input bits; 'none' (default): weight-only, e.g. 8,none"
    )
    p_ptq.add_argument("--granularity", default="per_channel", help="per_channel, per_tensor")
    p_ptq.add_argument("--observer", default="minmax", help="minmax, percentile, mse")
    p_ptq.add_argument("--percentile", type=float, default=99.99)
    p_ptq.add_argument("--calib", type=int, default=8, help="calibration batches (training)")
    p_ptq.add_argument("--cle", action="store_true", help="add cross-layer equalization")
    p_ptq.add_argument("--bias-correction", action="store_true", help="add bias correction")
    p_ptq.add_argument(
        "--compare-torch", action="store_true", help="add PyTorch's own PTQ (torch.ao, x86)"
    )
    p_ptq.add_argument(
        "--save",
        default="",
        help="also write each variant's model to --out and check it: safetensors, onnx or "
        "both (comma-separated); load with qtrain.load_quantized",
    )
    p_ptq.add_argument("--out", type=Path, help="output directory (default RUN_DIR/ptq)")
    p_ptq.add_argument("--quiet", action="store_true", help="no progress bar")
    p_report = sub.add_parser("report", help="write report.md (run) or compare.md (compare dir)")
    p_report.add_argument("run_dir", type=Path)
    p_export = sub.add_parser(
        "export",
        help="write a run's quantized model: integer weights (safetensors) or QDQ ONNX",
        description="Export the trained model of RUN_DIR at the precision it evaluates at, "
        "then check the file against it on the run's test inputs (loaded back with "
        "qtrain.load_quantized, or run in onnxruntime). ONNX needs qtrain[onnx].",
    )
    p_export.add_argument("run_dir", type=Path)
    p_export.add_argument("--format", choices=FORMATS, default="safetensors")
    p_export.add_argument("--out", type=Path, help="file (default RUN_DIR/model.<format>)")
    return parser


# ---- building configs ------------------------------------------------------------------------


def _explicit_train_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        field: getattr(args, field) for _, field, _ in _TRAIN_OPTIONS if hasattr(args, field)
    }
    if args.model_args:
        options["model_kwargs"] = {k: _json_value(v) for k, v in args.model_args}
    if args.data_args:
        options["data_kwargs"] = {k: _json_value(v) for k, v in args.data_args}
    return options


def _train_config(base: dict[str, Any], explicit: dict[str, Any]) -> TrainConfig:
    merged = {**base, **explicit}
    missing = [f"--{name}" for name in ("model", "data", "epochs") if name not in merged]
    if missing:
        raise UsageError(f"missing required option(s): {', '.join(missing)}")
    return TrainConfig.from_dict(merged)


def _recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        build_recipe(name)  # raises the registry's unknown-recipe error
    return RECIPES[name]


def _recipe(name: str, base_config: dict[str, Any] | None, sets: dict[str, str]) -> Recipe:
    """Recipe ``name`` from a saved config (None: the defaults) with ``--set`` overrides."""
    cls = _recipe_class(name)
    config = cls.config_class.from_dict(base_config or {})
    return cls(config.with_overrides(sets) if sets else config)


def _prepare_out(out: Path, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse a non-empty directory unless resuming; with --overwrite remove an old run
    (``remove=False``: only the checks, as a distributed run's ranks other than 0 do)."""
    if resume or not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} is not empty; pass --resume to continue it or --overwrite")
    ours = [out / CONFIG_FILE, out / COMPARE_FILE, *out.glob(f"*/{CONFIG_FILE}")]
    if not any(path.exists() for path in ours):
        raise UsageError(f"{out} does not look like a qtrain run; refusing to delete it")
    if remove:
        shutil.rmtree(out)


@contextlib.contextmanager
def _processes(config: TrainConfig, out: Path, resume: bool, overwrite: bool) -> Iterator[bool]:
    """The run's process group (``--distributed``; none for one process) with ``out``
    prepared by rank 0 once every rank has checked it; yields whether this process reports
    (rank 0 writes reports and prints; the other ranks only train)."""
    with distributed.session(config.distributed, config.device) as context:
        main = context is None or context.is_main
        _prepare_out(out, resume, overwrite, remove=main)
        if context is not None:
            context.barrier()
        yield main


# ---- commands ------------------------------------------------------------------------------


def _cmd_recipes(args: argparse.Namespace) -> int:
    for cls in iter_recipes():
        print(f"{cls.name:<14} {cls.description}  [{cls.paper}]")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    explicit = _explicit_train_options(args)
    sets = dict(args.sets)
    base: dict[str, Any] = {}
    if args.config is not None:
        base = _read_json(args.config)
    saved_path = args.out / CONFIG_FILE if args.out is not None else None
    resuming_saved = args.resume and saved_path is not None and saved_path.exists()
    if resuming_saved:
        base = _read_json(saved_path)
        changed = sorted(
            k for k, v in explicit.items() if k not in RESUME_MUTABLE and base["train"].get(k) != v
        )
        if "recipe" in args and args.recipe != base["recipe"]:
            changed.append("recipe")
        if changed or sets:
            raise UsageError(
                f"cannot change {', '.join(changed) or '--set'} when resuming {args.out}"
            )
    name = getattr(args, "recipe", base.get("recipe"))
    if name is None:
        raise UsageError("missing required option: --recipe")
    config = _train_config(base.get("train", {}), explicit)
    recipe = _recipe(name, base.get("recipe_config") if base.get("recipe") == name else None, sets)
    out = args.out or Path("runs") / f"{name}-{config.model}-{config.data}-s{config.seed}"
    with _processes(config, out, args.resume, args.overwrite) as main:
        summary = train(config, recipe, out, resume=args.resume)
        if not main:
            return 0
    _write_run_report(out)
    print(
        f"{name} {config.model}/{config.data}: test acc {100 * summary['test_acc']:.2f}%, "
        f"BitOPs {summary['bitops_train']:.3g}, {summary['wall_seconds']:.0f} s -> {out}"
    )
    return 0


def _seeded_init(explicit: dict[str, Any], seed: int) -> dict[str, Any]:
    """The seed, and ``--init`` with ``{seed}`` replaced by it (one source run per seed)."""
    init = explicit.get("init")
    return {"seed": seed, **({"init": init.replace("{seed}", str(seed))} if init else {})}


def _cmd_compare(args: argparse.Namespace) -> int:
    explicit = _explicit_train_options(args)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if not names:
        raise UsageError("--recipes needs at least one recipe name")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    sets = dict(args.sets)
    fields = {n: {f.name for f in dataclasses.fields(_recipe_class(n).config_class)} for n in names}
    unmatched = sorted(k for k in sets if not any(k in f for f in fields.values()))
    if unmatched:
        allowed = sorted(set().union(*fields.values()))
        raise RecipeConfigError(
            f"--set {unmatched} matches no parameter of {names}; allowed: {allowed}"
        )
    # Each recipe takes the --set keys it has, so one command can tune a shared parameter.
    overrides = {n: {k: v for k, v in sets.items() if k in fields[n]} for n in names}
    for name in names:  # validate every value before writing anything
        try:
            _recipe(name, None, overrides[name])
        except RecipeConfigError as err:
            if not overrides[name]:
                raise
            given = " ".join(f"{k}={v}" for k, v in overrides[name].items())
            raise RecipeConfigError(f"recipe {name!r} with --set {given}: {err}") from None
    configs = {s: _train_config({}, {**explicit, **_seeded_init(explicit, s)}) for s in seeds}
    run_dirs = []
    total = len(names) * len(seeds)
    with _processes(configs[seeds[0]], args.out, args.resume, args.overwrite) as main:
        for name in names:
            for seed in seeds:
                run_dir = args.out / f"{name}-s{seed}"
                run_dirs.append(run_dir)
                if not configs[seed].quiet and main:
                    where = f"{name} seed {seed} -> {run_dir}"
                    print(f"[{len(run_dirs)}/{total}] {where}", file=sys.stderr)
                # A fresh recipe per run: recipes keep per-run state.
                recipe = _recipe(name, None, overrides[name])
                train(configs[seed], recipe, run_dir, resume=args.resume)
                if main:
                    _write_run_report(run_dir)
        if not main:
            return 0
    print(format_table(compare_rows(run_dirs)))
    try:
        print(f"-> {write_compare(args.out, run_dirs)}", file=sys.stderr)
    except ImportError:
        print("no compare.md: matplotlib is not installed (qtrain[plot])", file=sys.stderr)
    return 0


def _cmd_prt(args: argparse.Namespace) -> int:
    config = _train_config({}, _explicit_train_options(args))
    sets = {**dict(args.sets), "b_min": "auto"}
    recipe = RangeTest(CPTConfig().with_overrides(sets))
    with _processes(config, args.out, args.resume, args.overwrite) as main:
        train(config, recipe, args.out, resume=args.resume)
        if not main:
            return 0
    for bits, accuracy in recipe.tried:
        print(f"{bits:>2} bits: training accuracy {100 * accuracy:6.2f}%")
    if recipe.b_min is None:
        raise RunError(
            f"the range test did not finish in {config.epochs} epoch(s): it needs "
            f"{recipe.config.b_max - recipe.config.prt_start + 1} x prt_steps steps; "
            "raise --epochs or lower prt_steps"
        )
    why = next(e["why"] for e in read_metrics(args.out) if e.get("event") == "b_min")
    try:
        plot = plot_range_test(recipe.tried, recipe.b_min, str(args.out / "prt.png"))
    except ImportError:
        plot = "no plot: matplotlib is not installed (qtrain[plot])"
    print(f"b_min = {recipe.b_min} ({why}) -> {plot}")
    return 0


def _cmd_ptq(args: argparse.Namespace) -> int:
    def listed(text: str, parse: Any, what: str) -> list[Any]:
        try:
            return [parse(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise UsageError(f"{what} expects a comma-separated list, got {text!r}") from None

    a_bits = listed(args.a_bits, lambda t: None if t.lower() == "none" else int(t), "--a-bits")
    variant_list = ptq.variants(
        listed(args.w_bits, int, "--w-bits"),
        a_bits,
        listed(args.granularity, str, "--granularity"),
        listed(args.observer, str, "--observer"),
        args.cle,
        args.bias_correction,
    )
    variant_list = [v.with_changes(percentile=args.percentile) for v in variant_list]
    save = listed(args.save, str, "--save")
    for format in save:
        if format not in FORMATS:
            raise UsageError(f"--save takes {', '.join(FORMATS)}; got {format!r}")
    out = args.out or args.run_dir / "ptq"
    run = load_run(args.run_dir, device="cpu")
    result = ptq.run_ptq(
        run,
        variant_list,
        calib=args.calib,
        compare_torch=args.compare_torch,
        progress=not args.quiet,
        report=None if args.quiet else lambda line: print(line, file=sys.stderr),
        save=save,
        out=out,
    )
    out.mkdir(parents=True, exist_ok=True)
    table = ptq.format_ptq(result)
    _write_json(out / "ptq.json", result)
    _atomic_write(out / "ptq.md", lambda f: f.write(table.encode()))
    print(table)
    print(f"-> {out / 'ptq.json'}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    run = args.run_dir
    if (run / CONFIG_FILE).exists():
        print(write_report(run))
        return 0
    runs = sorted(d for d in run.glob("*/summary.json"))
    if not runs:
        raise UsageError(f"{run} holds neither a run (config.json) nor finished runs to compare")
    print(write_compare(run, [r.parent for r in runs]))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    exported = export_run(args.run_dir, args.format, args.out)
    size, fp32 = exported.bytes, exported.fp32_bytes
    print(f"{exported.path}: {size:,} bytes; fp32 state_dict {fp32:,} bytes ({size / fp32:.1%})")
    how = "loaded back" if args.format == "safetensors" else "in onnxruntime, as written"
    print(
        f"{how}: max |output - trained model's| = {exported.max_abs_diff:.3g} on "
        f"{exported.checked_inputs} test inputs"
    )
    if exported.optimized_max_abs_diff is not None:
        print(
            "in onnxruntime's default session (fused integer kernels): "
            f"{exported.optimized_max_abs_diff:.3g}"
        )
    return 0


def _write_run_report(run_dir: Path) -> None:
    try:
        write_report(run_dir)
    except ImportError:
        print("no report.md: matplotlib is not installed (qtrain[plot])", file=sys.stderr)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict) or "train" not in data:
        raise UsageError(f"{path} is not a qtrain run config (no 'train' section)")
    return data


_COMMANDS = {
    "recipes": _cmd_recipes,
    "train": _cmd_train,
    "compare": _cmd_compare,
    "report": _cmd_report,
    "prt": _cmd_prt,
    "ptq": _cmd_ptq,
    "export": _cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qtrain`` command; returns the exit code (2 for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _COMMANDS[args.command](args)
    except (
        UsageError,
        TrainConfigError,
        RecipeConfigError,
        ptq.PTQError,
        distributed.DistributedError,
    ) as err:
        _print_error(err)
        return 2
    except RunError as err:
        _print_error(err)
        return 1


def _print_error(err: Exception) -> None:
    message = " ".join(str(err).split())
    print(f"qtrain: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
