"""GPU benchmark of qtrain's Triton quantizers and low-precision (int8, fp8) training.

On a CUDA GPU, in one run, written to benchmarks/results/gpu.json:
  1. kernels     — GB/s of each quantize kernel against the GPU's copy bandwidth (target: 70%),
                   and the int8/fp8 GEMMs against the bf16 one on the GPT-2-small shapes.
  2. train_step  — ms per training step (forward, backward, AdamW) of a GPT-2-small-sized model
                   and a wide MLP: bf16 autocast, qtrain int8 and fp8, and torchao's
                   int8_mixed_precision_training and float8 training when torchao is importable.
  3. loss_curves — a short byte-level GPT-2-small run (text corpus: Python's stdlib sources)
                   under bf16, qtrain int8 and qtrain fp8.

Without CUDA it stops with a message; ``--smoke`` runs every section at toy sizes on whatever
device there is (the CPU: figures mean nothing, it checks the script). Run it as
``python benchmarks/bench_gpu.py [--sections kernels,train_step,loss_curves] [--no-torchao]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import PerToken
from qtrain.api import quantize_
from qtrain.data import load_dataset
from qtrain.kernels import reference, triton_gemm, triton_quant
from qtrain.lowp import Float8TrainingConfig, Int8Gemm, Int8TrainingConfig
from qtrain.models import GPT

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
SECTIONS = ("kernels", "train_step", "loss_curves")
BANDWIDTH_TARGET = 0.70  # fraction of copy bandwidth a quantize kernel should reach
SPEEDUP_TARGET = 1.3  # training step speedup over bf16 autocast the int8 and fp8 variants aim at
# The stated tolerance of the loss-curve run: the 20-step moving average of the loss may differ
# from bf16's by at most this many nats at any step (CPU tiny-MLP runs: 0.003 int8, 0.016 fp8).
LOSS_GAP_TOLERANCE = {"qtrain int8 (triton GEMM)": 0.05, "qtrain fp8 tensor-wise": 0.08}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of a run, with its unit, in one place."""

    kernel_elements: int  # elements of the tensors the kernel benchmarks stream
    kernel_rows: int  # rows of the per-row (per-token) kernel benchmarks
    kernel_repeats: int  # timed calls per kernel (the median is kept)
    kernel_warmup: int  # untimed calls before them (autotuning, caches)
    gpt_layers: int
    gpt_dim: int
    gpt_heads: int
    gpt_vocab: int  # tokens (50304: GPT-2's 50257 padded to a multiple of 64)
    gpt_seq: int  # tokens per sequence
    gpt_batch: int  # sequences per step
    mlp_dim: int  # width of the wide MLP (hidden: 4×)
    mlp_blocks: int
    mlp_tokens: int  # rows per step
    warmup_steps: int  # untimed steps (torch.compile, autotuning)
    timed_steps: int
    loss_steps: int  # steps of the loss-curve run
    loss_vocab: int  # byte-level: 256
    learning_rate: float  # AdamW, after a linear warm-up of loss_steps // 10 steps
    compile: bool


FULL = Sizes(
    kernel_elements=2**26,
    kernel_rows=2**14,
    kernel_repeats=20,
    kernel_warmup=5,
    gpt_layers=12,
    gpt_dim=768,
    gpt_heads=12,
    gpt_vocab=50304,
    gpt_seq=1024,
    gpt_batch=8,
    mlp_dim=4096,
    mlp_blocks=2,
    mlp_tokens=16384,
    warmup_steps=10,
    timed_steps=30,
    loss_steps=300,
    loss_vocab=256,
    learning_rate=6e-4,
    compile=True,
)
SMOKE = Sizes(
    kernel_elements=2**12,
    kernel_rows=2**4,
    kernel_repeats=1,
    kernel_warmup=0,
    gpt_layers=1,
    gpt_dim=32,
    gpt_heads=2,
    gpt_vocab=64,
    gpt_seq=16,
    gpt_batch=2,
    mlp_dim=32,
    mlp_blocks=1,
    mlp_tokens=32,
    warmup_steps=1,
    timed_steps=2,
    loss_steps=3,
    loss_vocab=256,
    learning_rate=1e-3,
    compile=False,
)


# ---- timing --------------------------------------------------------------------------------------


def _sig(value: float) -> float:
    """``value`` to 4 significant digits (toy sizes give tiny figures: round() would zero them)."""
    return float(f"{value:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones;
    CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


# ---- 1. kernels ----------------------------------------------------------------------------------


def bench_kernels(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """GB/s of each kernel (bytes it must move / time) and its fraction of copy bandwidth."""
    impl, gemm = triton_quant.load(), triton_gemm.load()
    if impl is None or gemm is None:
        return {"skipped": "the Triton kernels do not run here (no CUDA, no TRITON_INTERPRET=1)"}
    if device.type == "cpu" and not triton_quant.interpreting():
        return {"skipped": "CPU tensors need TRITON_INTERPRET=1"}
    n, rows = sizes.kernel_elements, sizes.kernel_rows
    repeats, warmup = sizes.kernel_repeats, sizes.kernel_warmup
    x = torch.randn(n, device=device)
    copy_target = torch.empty_like(x)
    copy_gbs = 2 * 4 * n / time_ms(lambda: copy_target.copy_(x), device, repeats, warmup) / 1e6
    per_tensor = x.view(1, 1, n)
    per_token = x.view(1, rows, n // rows)
    scale_1, zero_1 = impl.absmax(per_tensor) / 127, torch.zeros(1, device=device)
    scale_rows, zero_rows = impl.absmax(per_token) / 127, torch.zeros(rows, device=device)
    bf16 = x.view(rows, n // rows).to(torch.bfloat16)
    bf16_column_major = bf16.t().contiguous().t()
    bound = torch.tensor(127.0, device=device)
    e4m3_bound = torch.tensor(448.0, device=device)
    # name: (function, bytes read + written by the kernel)
    cases: dict[str, tuple[Callable[[], Any], int]] = {}
    for name, module in (("triton", impl), ("reference", reference)):
        cases |= {
            f"{name}/absmax per-tensor": (lambda m=module: m.absmax(per_tensor), 4 * n),
            f"{name}/minmax per-token": (lambda m=module: m.minmax(per_token), 4 * n),
            f"{name}/fake_quant_int8 per-tensor nearest": (
                lambda m=module: m.fake_quant_int(
                    per_tensor, scale_1, zero_1, -127, 127, None, False
                ),
                8 * n,
            ),
            f"{name}/fake_quant_int8 per-token stochastic": (
                lambda m=module: m.fake_quant_int(
                    per_token, scale_rows, zero_rows, -127, 127, 7, False
                ),
                8 * n,
            ),
            f"{name}/quant_int8 per-token nearest": (
                lambda m=module: m.quant_int(per_token, scale_rows, zero_rows, -127, 127, None),
                8 * n,
            ),
            f"{name}/fake_quant_minifloat e4m3 nearest": (
                lambda m=module: m.fake_quant_minifloat(x, 4, 3, False, True, None),
                8 * n,
            ),
        }
    cases |= {
        "triton/quantize_rows bf16→int8 row-major (absmax fused)": (
            lambda: gemm.quantize_rows(bf16, bound, torch.int8),
            3 * n,
        ),
        "triton/quantize_rows bf16→int8 column-major (absmax fused)": (
            lambda: gemm.quantize_rows(bf16_column_major, bound, torch.int8),
            3 * n,
        ),
        "triton/quantize_rows bf16→e4m3 row-major (absmax fused)": (
            lambda: gemm.quantize_rows(bf16, e4m3_bound, torch.float8_e4m3fn),
            3 * n,
        ),
    }
    results = {}
    for name, (fn, moved) in cases.items():
        gbs = moved / time_ms(fn, device, repeats, warmup) / 1e6
        fraction = gbs / copy_gbs
        results[name] = {
            "GB/s": _sig(gbs),
            "fraction_of_copy": _sig(fraction),
            "meets_target": fraction >= BANDWIDTH_TARGET,
        }
    return {
        "elements": n,
        "copy_GB/s": _sig(copy_gbs),
        "target": BANDWIDTH_TARGET,
        "results": results,
        "gemm": bench_gemms(sizes, device),
    }


def bench_gemms(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """TFLOP/s of one GEMM per kind on the GPT shapes (M = batch·seq tokens): for reference."""
    m = sizes.gpt_batch * sizes.gpt_seq
    d = sizes.gpt_dim
    repeats, warmup = sizes.kernel_repeats, sizes.kernel_warmup
    out: dict[str, Any] = {}
    for k, n in ((d, 3 * d), (d, 4 * d), (4 * d, d)):
        kinds = _gemm_kinds(m, k, n, device)
        shape = f"{m}x{k}x{n}"
        out[shape] = {}
        for name, fn in kinds.items():
            try:
                out[shape][name] = _sig(2 * m * k * n / time_ms(fn, device, repeats, warmup) / 1e9)
            except Exception as error:  # a GEMM this device or build lacks
                out[shape][name] = f"error: {str(error).splitlines()[0][:200]}"
    return {"TFLOP/s": out}


# ---- models and variants -------------------------------------------------------------------------


def _gemm_kinds(m: int, k: int, n: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Name → one (M, K) × (K, N) product of that kind on random operands."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    qa = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    qb = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scale_a, scale_b = torch.rand(m, device=device), torch.rand(n, device=device)
    kinds: dict[str, Callable[[], Any]] = {
        "bf16 mm": lambda: a16 @ b16.t(),
        "int8 _int_mm (int32 out)": lambda: torch._int_mm(qa, qb.t()),
        "int8 triton (scaled bf16 out)": lambda: triton_gemm.int8_mm(
            qa, qb, scale_a, scale_b, None, torch.bfloat16
        ),
    }
    if device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9):
        fa, fb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        kinds["fp8 _scaled_mm (bf16 out)"] = lambda: torch._scaled_mm(
            fa, fb.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        )
    return kinds


def build_gpt(sizes: Sizes, vocab: int, device: torch.device) -> nn.Module:
    return GPT(
        vocab_size=vocab,
        block_size=sizes.gpt_seq,
        n_layer=sizes.gpt_layers,
        n_head=sizes.gpt_heads,
        n_embd=sizes.gpt_dim,
    ).to(device)


class WideMLP(nn.Module):
    """Pre-norm residual MLP blocks, d → 4d → d: a transformer's MLP without attention."""

    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(dim, 4 * dim) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(4 * dim, dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(F.gelu(up(norm(x))))
        return x


def _not_head(module: nn.Module, name: str) -> bool:
    # The vocabulary projection stays in bf16 in every variant (as torchao's recipes advise).
    return name != "head"


def _torchao_int8(model: nn.Module) -> nn.Module:
    from torchao import quantize_ as ao_quantize_
    from torchao.prototype import quantized_training

    if hasattr(quantized_training, "Int8MixedPrecisionTrainingConfig"):
        config = quantized_training.Int8MixedPrecisionTrainingConfig()
    else:
        config = quantized_training.int8_mixed_precision_training()
    ao_quantize_(
        model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and _not_head(m, name)
    )
    return model


def _torchao_float8(recipe: str | None) -> Callable[[nn.Module], nn.Module]:
    def convert(model: nn.Module) -> nn.Module:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = (
            Float8LinearConfig() if recipe is None else Float8LinearConfig.from_recipe_name(recipe)
        )
        return convert_to_float8_training(
            model, config=config, module_filter_fn=lambda m, name: _not_head(m, name)
        )

    return convert


def _qtrain(config: Any) -> Callable[[nn.Module], nn.Module]:
    return lambda model: quantize_(model, config, filter_fn=_not_head)


def variants(with_torchao: bool) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Name → conversion of an fp32 model; every variant then trains under bf16 autocast."""
    out: dict[str, Callable[[nn.Module], nn.Module]] = {
        "bf16 autocast": lambda model: model,
        "qtrain int8 (triton GEMM)": _qtrain(Int8TrainingConfig(gemm=Int8Gemm.TRITON)),
        "qtrain int8 (_int_mm)": _qtrain(Int8TrainingConfig(gemm=Int8Gemm.INT_MM)),
        "qtrain fp8 tensor-wise": _qtrain(Float8TrainingConfig()),
        "qtrain fp8 row-wise": _qtrain(Float8TrainingConfig(granularity=PerToken())),
    }
    if with_torchao:
        out |= {
            "torchao int8_mixed_precision_training": _torchao_int8,
            "torchao float8 tensor-wise": _torchao_float8(None),
            "torchao float8 row-wise": _torchao_float8("rowwise"),
        }
    return out


def torchao_version() -> str | None:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- 2. training step time -----------------------------------------------------------------------


class TrainStep:
    """One training step: loss under bf16 autocast (compiled or not), backward, AdamW."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        device: torch.device,
        lr: float,
        compile_: bool,
    ) -> None:
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
        self.loss_fn = torch.compile(loss_fn) if compile_ else loss_fn
        self.device_type = device.type

    def __call__(self) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _workloads(
    sizes: Sizes, device: torch.device
) -> dict[str, Callable[[], tuple[nn.Module, Callable]]]:
    """Name → (fresh fp32 model, its loss closure over a fixed batch)."""

    def gpt() -> tuple[nn.Module, Callable]:
        model = build_gpt(sizes, sizes.gpt_vocab, device)
        tokens = torch.randint(
            0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_seq + 1), device=device
        )

        def loss() -> torch.Tensor:
            logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        return model, loss

    def mlp() -> tuple[nn.Module, Callable]:
        model = WideMLP(sizes.mlp_dim, sizes.mlp_blocks).to(device)
        x = torch.randn(sizes.mlp_tokens, sizes.mlp_dim, device=device)
        return model, lambda: model(x).float().square().mean()

    return {
        f"gpt2-small-sized ({sizes.gpt_layers}x{sizes.gpt_dim}, seq {sizes.gpt_seq}, "
        f"batch {sizes.gpt_batch})": gpt,
        f"wide MLP ({sizes.mlp_blocks} blocks, {sizes.mlp_dim}->{4 * sizes.mlp_dim}, "
        f"{sizes.mlp_tokens} tokens)": mlp,
    }


def bench_train_step(sizes: Sizes, device: torch.device, with_torchao: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload, make in _workloads(sizes, device).items():
        rows: dict[str, Any] = {}
        for name, convert in variants(with_torchao).items():
            torch.manual_seed(0)
            try:
                model, loss_fn = make()
                convert(model)
                step = TrainStep(model, loss_fn, device, sizes.learning_rate, sizes.compile)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = time_ms(step, device, sizes.timed_steps, warmup=sizes.warmup_steps)
                rows[name] = {"ms_per_step": round(ms, 3)}
                if device.type == "cuda":
                    rows[name]["peak_memory_GiB"] = round(
                        torch.cuda.max_memory_allocated(device) / 2**30, 2
                    )
            except Exception as error:  # record and go on: one variant must not end the run
                rows[name] = {"error": _error_text(error)}
            finally:
                with contextlib.suppress(NameError):
                    del model, loss_fn, step
                _release(device)
        baseline = rows.get("bf16 autocast", {}).get("ms_per_step")
        for name, row in rows.items():
            if baseline and "ms_per_step" in row and name != "bf16 autocast":
                row["speedup_vs_bf16"] = round(baseline / row["ms_per_step"], 3)
                row["meets_1.3x_target"] = row["speedup_vs_bf16"] >= SPEEDUP_TARGET
        results[workload] = rows
    return results


# ---- 3. loss curves ------------------------------------------------------------------------------


def _batches(sizes: Sizes, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    data = load_dataset(
        "text",
        seq_len=sizes.gpt_seq,
        max_bytes=max(200_000, 4 * sizes.loss_steps * sizes.gpt_batch * sizes.gpt_seq),
        device=device,
    )
    g = torch.Generator().manual_seed(0)
    while True:
        index = torch.randint(0, len(data.train_x), (sizes.gpt_batch,), generator=g).to(device)
        yield data.train_x[index], data.train_y[index]


def bench_loss_curves(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    chosen = {
        k: v
        for k, v in variants(False).items()
        if k in ("bf16 autocast", "qtrain int8 (triton GEMM)", "qtrain fp8 tensor-wise")
    }
    curves: dict[str, Any] = {}
    warmup = max(1, sizes.loss_steps // 10)
    for name, convert in chosen.items():
        torch.manual_seed(0)
        try:
            model = convert(build_gpt(sizes, sizes.loss_vocab, device))
            batches = _batches(sizes, device)
            x, y = next(batches)

            def loss_fn(model=model, x=x, y=y) -> torch.Tensor:
                return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

            step = TrainStep(model, loss_fn, device, sizes.learning_rate, sizes.compile)
            losses = []
            for i in range(sizes.loss_steps):
                # In place: the compiled loss keeps reading the same input tensors.
                x_new, y_new = next(batches)
                x.copy_(x_new)
                y.copy_(y_new)
                for group in step.optimizer.param_groups:
                    group["lr"] = sizes.learning_rate * min(1.0, (i + 1) / warmup)
                losses.append(float(step()))
            curves[name] = [round(v, 5) for v in losses]
        except Exception as error:
            curves[name] = {"error": _error_text(error)}
        _release(device)
    summary = _curve_summary(curves)
    return {
        "steps": sizes.loss_steps,
        "tokens_per_step": sizes.gpt_batch * sizes.gpt_seq,
        "curves": curves,
        "summary": summary,
    }


def _curve_summary(curves: dict[str, Any], window: int = 20) -> dict[str, Any]:
    """Final loss (mean of the last ``window`` steps), the largest gap between each curve's
    moving average and bf16's, and whether it is within LOSS_GAP_TOLERANCE."""
    base = curves.get("bf16 autocast")
    if not isinstance(base, list):
        return {}
    window = max(1, min(window, len(base)))
    base_avg = torch.tensor(base).unfold(0, window, 1).mean(1)
    out = {}
    for name, losses in curves.items():
        if not isinstance(losses, list):
            continue
        avg = torch.tensor(losses).unfold(0, window, 1).mean(1)
        gap = float((avg - base_avg).abs().max())
        out[name] = {"final_loss": round(float(avg[-1]), 4), "max_gap_vs_bf16": round(gap, 4)}
        if name in LOSS_GAP_TOLERANCE:
            out[name]["tolerance"] = LOSS_GAP_TOLERANCE[name]
            out[name]["within_tolerance"] = gap <= LOSS_GAP_TOLERANCE[name]
    return out


# ---- the run -------------------------------------------------------------------------------------


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(error: Exception) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip().splitlines()[0][:300]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torchao": torchao_version(),
        "python": platform.python_version(),
        "triton_interpreter": triton_quant.interpreting(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes on any device (checks the script)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS)
    )
    parser.add_argument(
        "--no-torchao", action="store_true", help="skip torchao even where it is importable"
    )
    parser.add_argument("--no-compile", action="store_true", help="train steps in eager mode")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench_gpu.py: no CUDA device found. The GPU figures need one; run with --smoke "
            "for a toy-sized check of the script on this machine.",
            file=sys.stderr,
        )
        return 2
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    device = torch.device("cuda" if cuda else "cpu")
    sizes = SMOKE if args.smoke else FULL
    if args.no_compile:
        sizes = dataclasses.replace(sizes, compile=False)
    with_torchao = not args.no_torchao and torchao_version() is not None

    report: dict[str, Any] = {
        "environment": environment(device),
        "sizes": dataclasses.asdict(sizes),
        "smoke": args.smoke,
    }
    if not with_torchao:
        report["torchao"] = (
            "not measured: torchao not importable" if torchao_version() is None else "skipped"
        )
    runners = {
        "kernels": lambda: bench_kernels(sizes, device),
        "train_step": lambda: bench_train_step(sizes, device, with_torchao),
        "loss_curves": lambda: bench_loss_curves(sizes, device),
    }
    for section in SECTIONS:
        if section not in sections:
            report[section] = {"skipped": "not selected"}
            continue
        begin = time.perf_counter()
        report[section] = runners[section]()
        print(f"{section}: {time.perf_counter() - begin:.1f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("environment", "kernels", "train_step")}, indent=2, default=str
        )[:20000]
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
