"""Real low-precision GEMMs on this CPU: are int8 (and fp8) products faster than float32 here?

(a) matmul — a (M, K) · bᵀ for b (N, K), the layout of ``F.linear`` and of ``qtrain.lowp``'s
    products (bᵀ column-major), at the shapes 4096×1024·1024×1024, 8192×576·576×64 and 2048³:
    float32, bfloat16, int8 ``torch._int_mm`` (int32 result) and, for reference, fp8 e4m3
    ``torch._scaled_mm`` (tensor-wise scales, float32 result). GFLOP/s = 2·M·K·N / median
    seconds; "× fp32" = fp32 seconds / row seconds (above 1: faster than fp32).
(b) training step — zero_grad + forward (under the recipe's autocast) + cross-entropy +
    backward + SGD step on one fixed synthetic batch, for recipes fp32, amp-bf16, int8-gemm
    with the real ``torch._int_mm`` products and with their emulated twin (exact float
    matmuls of the int8 levels), int8-gemm's real products under autocast bf16
    (``int8-real-bf16``: ``--set amp=bf16``), and fp8-gemm (real ``torch._scaled_mm``). Models from
    ``qtrain.models``: the mlp (784 → 256 → 256 → 10, batch 256), the small GPT (4 layers,
    n_embd 128, 4 heads, byte vocabulary, batch 8 × 64 tokens; attention, layer norms and
    embeddings stay float32 under every recipe: only its nn.Linear layers are swapped), and
    ResNet-9 at widths 16 and 64 on 28×28×1 inputs, batch 256, channels-last (every conv and
    the classifier swapped; BatchNorm and pooling stay float32).

Rows are timed in interleaved rounds, each timed call after an untimed one, and reported as
medians (``bench_quantize.median_times``); ratios are to fp32 measured in the same run.

    python benchmarks/bench_lowp_gemm.py          # writes benchmarks/results/lowp_gemm.json
    python benchmarks/bench_lowp_gemm.py --smoke  # toy sizes, one round: checks the script
    python benchmarks/bench_lowp_gemm.py --models resnet9-w16 --recipes fp32,amp-bf16,int8-twin

(c) the recipes on the emulated quantized layers with their products on the floats (the
    emulation) and as exact integer products (``--products``; qtrain.int_products): ui8 and
    sbm8 (all three products; sbm8's 16-bit grad-weight copy of g in two int8 limbs) and qat
    (LSQ W4A8: its forward product; its gradients are full precision), as ``ui8-float``,
    ``ui8-int8-twin``, ``ui8-int8-real``, ``sbm8-...``, ``qat-...``:

    python benchmarks/bench_lowp_gemm.py --no-matmul --out benchmarks/results/int_products.json \
        --recipes fp32,amp-bf16,ui8-float,ui8-int8-twin,ui8-int8-real,sbm8-float,\
sbm8-int8-twin,sbm8-int8-real
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import subprocess
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench_quantize import (
    machine_info,
    median_times,
    set_clock_and_threads,
    timing_parser,
    write_json,
)
from qtrain.api import use_products
from qtrain.models import build_model
from qtrain.recipes import Recipe, build_recipe

MATMUL_SHAPES = [(4096, 1024, 1024), (8192, 576, 64), (2048, 2048, 2048)]  # (M, K, N)
SMOKE_SHAPES = [(64, 32, 48)]
# name -> (recipe, overrides, GemmConfig.products of its emulated quantized layers)
RECIPES: dict[str, tuple[str, dict[str, object], str]] = {
    "fp32": ("fp32", {}, "float"),
    "amp-bf16": ("amp-bf16", {}, "float"),
    "int8-gemm real (torch._int_mm)": ("int8-gemm", {"emulate": False}, "float"),
    "int8-gemm emulated": ("int8-gemm", {"emulate": True}, "float"),
    # the same int8 products with autocast bf16 around them (BatchNorm, activations in bf16)
    "int8-gemm real, amp bf16": ("int8-gemm", {"emulate": False, "amp": "bf16"}, "float"),
    "fp8-gemm real (torch._scaled_mm)": ("fp8-gemm", {"emulate": False}, "float"),
    # the emulated recipes: the float emulation, and their integer products (int_products)
    **{
        f"{recipe} {products}": (recipe, {}, products)
        for recipe in ("ui8", "sbm8", "qat")
        for products in ("float", "int8-twin", "int8-real")
    },
}
# --recipes' short names for the rows above
RECIPE_KEYS = dict(
    zip(
        ["fp32", "amp-bf16", "int8-real", "int8-twin", "int8-real-bf16", "fp8-real"]
        + [f"{r}-{p}" for r in ("ui8", "sbm8", "qat") for p in ("float", "int8-twin", "int8-real")],
        RECIPES,
        strict=True,
    )
)
DEFAULT_RECIPES = ["fp32", "amp-bf16", "int8-real", "int8-twin", "fp8-real"]
RESNET9 = dict(name="resnet9", input_shape=(1, 28, 28), num_classes=10, channels_last=True)
# name -> (model builder arguments, batch); the smoke run shrinks them.
MODELS = {
    "mlp": (dict(name="mlp", input_shape=(1, 28, 28), num_classes=10, width=256), 256),
    "gpt": (dict(name="gpt", input_shape=(64,), num_classes=256, width=128, n_head=4), 8),
    "resnet9-w16": ({**RESNET9, "width": 16}, 256),
    "resnet9-w64": ({**RESNET9, "width": 64}, 256),
}
SMOKE_MODELS = {
    "mlp": (dict(name="mlp", input_shape=(1, 8, 8), num_classes=4, width=16), 16),
    "gpt": (dict(name="gpt", input_shape=(16,), num_classes=32, width=16, n_head=2), 2),
    "resnet9-w16": ({**RESNET9, "input_shape": (1, 8, 8), "width": 4}, 4),
    "resnet9-w64": ({**RESNET9, "input_shape": (1, 8, 8), "width": 8}, 4),
}


def lscpu() -> dict[str, object]:
    """lscpu's model name and flags (the SIMD extensions decide int8/bf16 GEMM speed), with
    the ones that matter for these GEMMs picked out."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    relevant = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f]
    return {"model_name": fields.get("Model name", "").strip(), "gemm_flags": relevant,
            "flags": flags}  # fmt: skip


def matmul_rows(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    qa = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    qb = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    fa, fb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones(())
    return {
        "fp32": lambda: a @ b.t(),
        "bf16": lambda: a16 @ b16.t(),
        "int8 torch._int_mm": lambda: torch._int_mm(qa, qb.t()),
        "fp8 e4m3 torch._scaled_mm": lambda: torch._scaled_mm(
            fa, fb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32
        ),
    }


def matmuls(shapes: list[tuple[int, int, int]], rounds: int, clock) -> list[dict[str, object]]:
    results = []
    for m, k, n in shapes:
        times = median_times(matmul_rows(m, k, n), rounds, clock)
        fp32 = statistics.median(times["fp32"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            results.append(
                {
                    "shape": f"{m}x{k}·{k}x{n}",
                    "name": name,
                    "median_ms": round(median * 1e3, 3),
                    "min_ms": round(min(seconds) * 1e3, 3),
                    "gflop_per_s": round(2 * m * k * n / median / 1e9, 2),
                    "ratio_to_fp32": round(fp32 / median, 3),
                }
            )
    return results


def step_function(model: nn.Module, recipe: Recipe, kwargs: dict, batch: int) -> Callable[[], None]:
    """One SGD training step on a fixed synthetic batch: images and their classes (mlp), or
    token ids and next tokens (gpt; logits (B, T, V))."""
    generator = torch.Generator().manual_seed(1)
    shape, classes = kwargs["input_shape"], kwargs["num_classes"]
    if kwargs["name"] == "gpt":
        inputs = torch.randint(0, classes, (batch, *shape), generator=generator)
        targets = torch.randint(0, classes, (batch, *shape), generator=generator)
    else:
        inputs = torch.randn(batch, *shape, generator=generator)
        targets = torch.randint(0, classes, (batch,), generator=generator)
        if kwargs.get("channels_last"):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with recipe.autocast("cpu") or contextlib.nullcontext():
            logits = model(inputs)
        F.cross_entropy(logits.float().flatten(0, -2), targets.flatten()).backward()
        optimizer.step()

    return step


def train_steps(
    models: dict, recipes: dict[str, tuple[str, dict, str]], rounds: int, clock
) -> list[dict[str, object]]:
    results = []
    for model_name, (kwargs, batch) in models.items():
        torch.manual_seed(0)
        build = {key: value for key, value in kwargs.items() if key != "channels_last"}
        base = build_model(**build).train()
        if kwargs.get("channels_last"):
            base = base.to(memory_format=torch.channels_last)
        steps, emulated = {}, {}
        for name, (recipe_name, overrides, products) in recipes.items():
            recipe = build_recipe(recipe_name, overrides)
            model = recipe.prepare(copy.deepcopy(base))
            if products != "float":
                use_products(model, products)
            steps[name] = step_function(model, recipe, kwargs, batch)
            emulated[name] = getattr(recipe, "emulated", None)
        for step in steps.values():  # warm-up: allocator, oneDNN primitive caches
            step()
        times = median_times(steps, rounds, clock)
        fp32 = statistics.median(times["fp32"]) if "fp32" in times else None
        for name, seconds in times.items():
            median = statistics.median(seconds)
            results.append(
                {
                    "model": model_name,
                    "batch": batch,
                    "name": name,
                    "emulated": emulated[name],
                    "median_ms": round(median * 1e3, 2),
                    "min_ms": round(min(seconds) * 1e3, 2),
                    "ratio_to_fp32": None if fp32 is None else round(median / fp32, 3),
                }
            )
    return results


def _selection(
    value: str | None, choices: dict, what: str, default: list[str] | None = None
) -> list[str]:
    if value is None:
        return list(choices) if default is None else default
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise SystemExit(f"--{what}: unknown {unknown}; choose from {', '.join(choices)}")
    return names


def main() -> None:
    parser = timing_parser(__doc__, "lowp_gemm.json")
    parser.set_defaults(rounds=5)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, one round")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    parser.add_argument(
        "--recipes",
        help=f"comma-separated, of {', '.join(RECIPE_KEYS)} "
        f"(default: {', '.join(DEFAULT_RECIPES)})",
    )
    parser.add_argument("--no-matmul", action="store_true", help="only the training steps")
    args = parser.parse_args()
    clock = set_clock_and_threads(args.clock, args.threads)
    rounds = 1 if args.smoke else max(args.rounds, 5)
    shapes = SMOKE_SHAPES if args.smoke else MATMUL_SHAPES
    all_models = SMOKE_MODELS if args.smoke else MODELS
    models = {name: all_models[name] for name in _selection(args.models, MODELS, "models")}
    keys = _selection(args.recipes, RECIPE_KEYS, "recipes", DEFAULT_RECIPES)
    recipes = {RECIPE_KEYS[key]: RECIPES[RECIPE_KEYS[key]] for key in keys}
    matmul = [] if args.no_matmul else matmuls(shapes, rounds, clock)
    steps = train_steps(models, recipes, rounds, clock)
    payload = {
        "machine": {**machine_info(), "lscpu": lscpu()},
        "rounds": rounds,
        "clock": args.clock,
        "smoke": args.smoke,
        "models": list(models),
        "recipes": list(recipes),
        "matmul": matmul,
        "train_step": steps,
    }
    write_json(args.out, payload)
    print(f"{'matmul':28} {'shape':18} {'median ms':>10} {'GFLOP/s':>8} {'× fp32':>7}")
    for row in matmul:
        print(
            f"{row['name']:28} {row['shape']:18} {row['median_ms']:10.2f} "
            f"{row['gflop_per_s']:8.1f} {row['ratio_to_fp32']:7.3f}"
        )
    print(f"\n{'train step':34} {'model':12} {'median ms':>10} {'÷ fp32':>7}")
    for row in steps:
        ratio = "" if row["ratio_to_fp32"] is None else f"{row['ratio_to_fp32']:7.3f}"
        print(f"{row['name']:34} {row['model']:12} {row['median_ms']:10.1f} {ratio}")
    slower = [r for r in matmul if r["name"].startswith("int8") and r["ratio_to_fp32"] < 1]
    if slower:
        print(f"\nint8 torch._int_mm is slower than fp32 at {len(slower)} of {len(matmul) // 4} "
              "shapes on this CPU")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
