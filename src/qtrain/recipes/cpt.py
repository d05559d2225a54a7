"""CPT — Fu et al., "CPT: Efficient Deep Neural Network Training via Cyclic Precision",
ICLR 2021 (METHODS.md §2).

Forward bits follow a cosine cycle between b_min and b_max (eq. 1 below); backward bits stay
at ``bw_bits`` (the paper found cyclic backward precision less stable). The quantizer is the
SBM one as the paper uses it: weights per output channel (min/max, nearest), activations per
tensor (batch mean of per-sample min/max), layer gradients per tensor with stochastic
rounding and no bifurcation; BatchNorm stays float32 and so does the classifier unless
``quantize_classifier``. Evaluation runs at ``eval_bits`` (default b_max: the paper reports
the model at its top precision).

``b_min = "auto"`` runs the precision range test (PRT, §3.3) inside the first cycle: from
``prt_start`` bits upward, ``prt_steps`` iterations at each bit-width (default: the first
cycle's steps shared evenly by the bit-widths up to b_max), watching the training accuracy;
b_min is the first bit-width whose accuracy beats the previous one's by more than
``prt_threshold``. Each bit-width tried, with the accuracy seen, and the choice with its
reason are recipe events in metrics.jsonl and report.md.

Example:
    >>> [cyclic_bits(t, 64, 3, 8, 2) for t in (0, 8, 16, 24, 31, 32)]
    [3, 4, 6, 7, 8, 3]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from torch import nn

from qtrain.api import except_classifier, quantize_
from qtrain.ops import Precision
from qtrain.presets import precision_schedule_quantization
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, StepResult, register_recipe
from qtrain.validation import check_int, check_number


def cyclic_bits(step: int, total_steps: int, b_min: int, b_max: int, cycles: int) -> int:
    """Eq. 1: b_t = rint(b_min + ½(b_max − b_min)(1 − cos(π·(t mod T)/T))), T = total / N.

    Each of the ``cycles`` cycles rises from b_min towards b_max; ``rint`` rounds half to even
    (as NumPy's rint, the authors' code)."""
    period = total_steps / cycles
    phase = (step % period) / period
    return round(b_min + 0.5 * (b_max - b_min) * (1 - math.cos(math.pi * phase)))


@dataclasses.dataclass(frozen=True)
class CPTConfig(RecipeConfig):
    """CPT's parameters (the paper's defaults; ``b_min=b_max`` is static training)."""

    b_min: int | Literal["auto"] = 3
    b_max: int = 8
    bw_bits: int = 8  # the layer gradients' bits, constant
    cycles: int = 32  # cycles over the whole run (the paper's N)
    eval_bits: int | None = None  # forward bits at evaluation; None: b_max
    quantize_classifier: bool = False  # the paper keeps the last (FC) layer in float32
    prt_start: int = 2  # the range test's first bit-width
    prt_steps: int | None = None  # iterations per bit-width; None: the first cycle split evenly
    prt_threshold: float = 0.05  # the accuracy jump (0..1) that picks b_min

    def validate(self) -> None:
        error = RecipeConfigError
        for name in ("b_max", "bw_bits", "prt_start"):
            check_int(f"CPTConfig.{name}", getattr(self, name), error, low=2, high=16)
        if self.b_min != "auto":
            check_int("CPTConfig.b_min", self.b_min, error, low=2, high=self.b_max)
        elif self.prt_start > self.b_max:
            raise error(f"CPTConfig.prt_start must be <= b_max={self.b_max}, got {self.prt_start}")
        if self.eval_bits is not None:
            check_int("CPTConfig.eval_bits", self.eval_bits, error, low=2, high=16)
        check_int("CPTConfig.cycles", self.cycles, error, low=1)
        if self.prt_steps is not None:
            check_int("CPTConfig.prt_steps", self.prt_steps, error, low=1)
        check_number("CPTConfig.prt_threshold", self.prt_threshold, error, low=0, high=1)


def range_test_choice(accuracies: list[tuple[int, float]], threshold: float) -> tuple[int, str]:
    """b_min from the range test's (bits, training accuracy) pairs in rising bits: the first
    bit-width whose accuracy beats the previous one's by more than ``threshold``; with no such
    jump, the bit-width after the largest rise (the lowest one if accuracy never rose).

    >>> range_test_choice([(2, 0.10), (3, 0.12), (4, 0.40), (5, 0.45)], 0.05)
    (4, 'first jump above 0.05: 0.12 at 3 bits -> 0.40 at 4 bits')
    """
    pairs = zip(accuracies, accuracies[1:], strict=False)
    jumps = [(bits, acc - low_acc, low_bits, low_acc) for (low_bits, low_acc), (bits, acc) in pairs]
    for bits, jump, low_bits, low_acc in jumps:
        if jump > threshold:
            high_acc = low_acc + jump
            why = f"first jump above {threshold:g}: {low_acc:.2f} at {low_bits} bits -> "
            return bits, why + f"{high_acc:.2f} at {bits} bits"
    if not jumps or max(j[1] for j in jumps) <= 0:
        return accuracies[0][0], f"no rise in accuracy above {accuracies[0][0]} bits"
    bits, jump, _, _ = max(jumps, key=lambda j: j[1])
    return bits, f"no jump above {threshold:g}; the largest rise ({jump:.2f}) reached {bits} bits"


@register_recipe
class CPT(Recipe):
    name = "cpt"
    paper = (
        "Fu et al., CPT: Efficient Deep Neural Network Training via Cyclic Precision (ICLR 2021)"
    )
    description = "cyclic forward precision b_min..b_max (cosine), constant backward bits; PRT"
    config_class = CPTConfig

    def __init__(self, config: CPTConfig | None = None) -> None:
        super().__init__(config)
        self.b_min: int | None = None if self.config.b_min == "auto" else self.config.b_min
        self.tried: list[tuple[int, float]] = []  # the range test: (bits, training accuracy)
        self._window = [0, 0]  # correct, count at the bit-width under test
        self._bits = self.config.b_max  # the last scheduled forward bits, for metrics()
        self._steps_per_bits = self.config.prt_steps or 1  # the range test's, set by schedule

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        quantization = precision_schedule_quantization(config.b_max, config.bw_bits)
        keep = None if config.quantize_classifier else except_classifier(model)
        return quantize_(model, quantization, filter_fn=keep)

    def schedule(self, step: int, total_steps: int) -> Precision:
        config = self.config
        if self.b_min is None:  # the range test: one bit-width after another
            self._steps_per_bits = config.prt_steps or max(
                1, int(total_steps / config.cycles) // (config.b_max - config.prt_start + 1)
            )
            bits = min(config.prt_start + len(self.tried), config.b_max)
        else:
            bits = cyclic_bits(step, total_steps, self.b_min, config.b_max, config.cycles)
        self._bits = bits
        return Precision(forward=bits, backward=config.bw_bits)

    def on_step_end(self, step: int, result: StepResult, model: nn.Module, optimizer: Any) -> bool:
        config = self.config
        if self.b_min is not None:
            return False
        self._window[0] += result.correct
        self._window[1] += result.count
        if (step + 1) % self._steps_per_bits:
            return False
        bits = config.prt_start + len(self.tried)
        accuracy = self._window[0] / max(self._window[1], 1)
        self.tried.append((bits, accuracy))
        self._window = [0, 0]
        self.emit("range_test", bits=bits, train_acc=accuracy)
        # Read after every bit-width: a jump above the threshold is always the newest pair.
        jumped = len(self.tried) > 1 and accuracy - self.tried[-2][1] > config.prt_threshold
        if jumped or bits >= config.b_max:
            self.b_min, why = range_test_choice(self.tried, config.prt_threshold)
            self.emit("b_min", b_min=self.b_min, why=why)
        return False

    def on_eval_start(self, model: nn.Module) -> Precision:
        config = self.config
        return Precision(forward=config.eval_bits or config.b_max, backward=config.bw_bits)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"fw_bits": self._bits, "bw_bits": self.config.bw_bits}
        if self.b_min is not None:
            out["b_min"] = self.b_min
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"b_min": self.b_min, "tried": [list(t) for t in self.tried],
                "window": list(self._window)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.b_min = state["b_min"]
        self.tried = [(int(b), float(a)) for b, a in state["tried"]]
        self._window = list(state["window"])


class RangeTest(CPT):
    """CPT's precision range test run alone (``qtrain prt``): the run ends once b_min is
    chosen. Not registered: a run of it is recorded as ``cpt`` with ``b_min="auto"``."""

    def finished(self) -> bool:
        return self.b_min is not None


def plot_range_test(tried: list[tuple[int, float]], b_min: int, path: str) -> str:
    """A PNG of training accuracy against forward bits, b_min marked; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits, accuracy = zip(*tried, strict=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(bits, [100 * a for a in accuracy], marker="o")
    ax.axvline(b_min, color="tab:red", linestyle="--", label=f"b_min = {b_min}")
    ax.set_xlabel("forward bits")
    ax.set_ylabel("training accuracy % (mean over the bit-width's steps)")
    ax.set_title("CPT precision range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
