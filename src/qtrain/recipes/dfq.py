"""DFQ — dynamic fractional quantization, FracTrain (Fu et al., NeurIPS 2020; METHODS.md §3).

A small gate in front of every residual block picks, for each input sample, one of K
precision options; the block's convolutions run each sample at its option's bits. The gate
(the authors' code, after SkipNet): the block input average-pooled → 1×1 conv (32) → ReLU →
1×1 conv (16) → an LSTM cell (16) shared by all blocks, its state carried from block to block
within a forward and restarted with each batch → linear → K logits → softmax; forward a hard
one-hot of the argmax, backward the softmax's gradient (straight-through; no Gumbel noise,
as the authors). Options (CIFAR, K = 5): forward bits [3, 4, 4, 6, 6] with backward bits
[6, 6, 8, 8, 12], weights at 4 bits; the stem, the downsample (shortcut) convolutions and
the classifier stay float32. The quantizer is CPT's and PFQ's
(``qtrain.presets.precision_schedule_quantization``).

Per-sample execution: the block sorts its batch by option, so each option's samples are one
run of rows; every convolution of the block (``GatedConv2d``) runs each run as a quantized
GEMM of its own, at that option's bits, forward and backward (per-tensor scales of that
option's samples; the input's running range sees each run as a batch), and concatenates the
results. BatchNorm and everything else in the block see the whole batch at once, in the
sorted order, so batch statistics are those of the whole batch; the block's output goes back
to the input's order. Nothing runs K times: a step costs the chosen option's GEMM per
sample, plus one gather and one scatter per block. Each convolution reports its samples per
option through ``sample_role_bits()``, and the cost meter counts every sample at its own bits.

Gradient to the gate: the block output is multiplied by the chosen option's straight-through
mask value (exactly 1 forward), so the task loss reaches the gate through ⟨g, y⟩ of the
chosen option only. The authors compute all K options' outputs for every sample and mix them
by the mask, which also gives the options not chosen a gradient, at K times the compute.

Cost regulariser (the authors' ``train_dfq.py``): option k costs, per MAC and relative to
32×32 bits, c_k = (b_k·w + g_k·w + b_k·g_k)/32² (forward, grad-input, grad-weight products).
cost = Σ_blocks MACs_b · Σ_samples c_k (a sum over the batch, STE masks in place of the
one-hot choices); the loss adds reg·β·cost / mean_b(MACs_b), β = 1e-3. cp = the gated
convolutions' BitOPs as a percentage of their BitOPs at 32×32 = 100·cost / (3·B·Σ_b MACs_b);
reg = ``regulariser_sign(cp, target_cp, band)``. MACs_b are each block's real per-sample
MACs (the authors' code weights blocks equally unless given a file of per-layer FLOPs).

The gate's own layers (two 1×1 convs, the LSTM cell's two linear maps, the linear to K
logits) are plain float32 ``nn.Conv2d``/``nn.Linear`` layers, so the cost meter counts them too.

Metrics, every ``metrics_interval`` steps: ``cp`` (its mean over the interval), and per
option ``option{k}_fw{b}_bw{g}``: for each block, the fraction of the interval's samples that
chose option k (one report figure per option, a line per block); ``target_cp`` always.

Example:
    >>> [regulariser_sign(cp, 3.0, 0.2) for cp in (2.0, 2.9, 3.1, 3.5)]
    [-1.0, -0.1, 0.1, 1.0]
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qtrain.api import FilterFn, quantize_
from qtrain.models import BasicBlock
from qtrain.nn import QConv2d
from qtrain.ops import Precision
from qtrain.presets import precision_schedule_quantization
from qtrain.protocol import RoleBits
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int, check_number


def regulariser_sign(cp: float, target: float, band: float) -> float:
    """reg of the cost term: −1 below target − band (raise the cost), +1 at or above
    target + band (lower it), inside the band ±0.1 on either side of the target (the
    authors' ``relax``; with band 0 only ±1)."""
    if cp < target - band:
        return -1.0
    if cp >= target + band:
        return 1.0
    return 0.1 if cp >= target else -0.1


def option_cost(forward: int, backward: int, weight: int | None) -> float:
    """c_k: an option's BitOPs per MAC of its three products relative to 32×32 bits.

    >>> option_cost(3, 6, 4) * 1024      # 3·4 + 6·4 + 3·6
    54.0
    """
    w = forward if weight is None else weight
    return (forward * w + backward * w + forward * backward) / 32**2


def straight_through_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; forward the one-hot of its argmax (exactly), backward the
    softmax's gradient (straight-through).

    >>> straight_through_one_hot(torch.tensor([[0.1, 2.0, -1.0]]))
    tensor([[0., 1., 0.]])
    """
    prob = logits.softmax(-1)
    hard = F.one_hot(prob.argmax(-1), prob.shape[-1]).to(prob.dtype)
    return hard + (prob - prob.detach())  # prob − prob.detach() is exactly 0 forward


class GatedConv2d(QConv2d):
    """A ``QConv2d`` whose batch runs in consecutive runs of samples at several precisions.

    ``parts`` — [(samples, Precision)] in batch order, set by the ``GatedBlock`` before each
    call — splits the batch; each run is one quantized GEMM at its precision (the guard's
    floor still under it). ``sample_role_bits()`` reports the runs of the last call to the
    cost meter. With ``parts`` None it is a plain ``QConv2d``.
    """

    parts: list[tuple[int, Precision]] | None = None
    macs_per_sample = 0  # of the last call, for the cost regulariser
    _sample_bits: list[tuple[int, RoleBits]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is None:
            self._sample_bits = None
            return super().forward(x)
        outputs, self._sample_bits = [], []
        counts = [count for count, _ in self.parts]
        for chunk, (count, precision) in zip(x.split(counts), self.parts, strict=True):
            self.set_precision(precision)
            outputs.append(super().forward(chunk))
            self._sample_bits.append((count, self.role_bits()))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        kh, kw = self.kernel_size
        self.macs_per_sample = out[0].numel() * (self.in_channels // self.groups) * kh * kw
        return out

    def sample_role_bits(self) -> list[tuple[int, RoleBits]] | None:  # type: ignore[override]
        return self._sample_bits


def gate_embedding(channels: int, gate_channels: int, embedding: int) -> nn.Sequential:
    """A block's own part of its gate: (B, C, H, W) → (B, embedding)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(channels, gate_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(gate_channels, embedding, kernel_size=1),
        nn.Flatten(),
    )


class GateController(nn.Module):
    """The part of the gates every block shares: an LSTM cell over the blocks in order
    (``reset`` before the first block of a forward), a linear map of its hidden state to K
    logits, and ``straight_through_one_hot``. The cell is two ``nn.Linear`` maps (the cost
    meter counts them) with torch's gate order i, f, g, o."""

    def __init__(self, embedding: int, hidden: int, options: int) -> None:
        super().__init__()
        self.input_map = nn.Linear(embedding, 4 * hidden)
        self.hidden_map = nn.Linear(hidden, 4 * hidden, bias=False)
        self.logits = nn.Linear(hidden, options)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.state = None

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        gates = self.input_map(embedding)  # (B, 4·hidden)
        if self.state is not None:  # a zero state adds nothing: the first block skips it
            gates = gates + self.hidden_map(self.state[0])
        i, f, g, o = gates.chunk(4, dim=1)
        cell = torch.sigmoid(i) * torch.tanh(g)
        if self.state is not None:
            cell = cell + torch.sigmoid(f) * self.state[1]
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        self.state = (hidden, cell)
        return straight_through_one_hot(self.logits(hidden))


class GatedBlock(nn.Module):
    """A residual block behind its gate: each sample runs the block at the option its gate
    chose (the module docstring says how). The first block holds the shared controller as a
    submodule (one copy in the state_dict); the others refer to it without registering it.

    After a forward: ``last_mask`` (B, K), the straight-through one-hot choices, and
    ``last_counts``, samples per option."""

    def __init__(
        self,
        block: nn.Module,
        gate: nn.Module,
        controller: GateController,
        options: Sequence[Precision],
        index: int,
        blocks: int,
    ) -> None:
        super().__init__()
        self.block, self.gate = block, gate
        if index == 0:
            self.controller = controller
        self._controller = (controller,)  # a tuple: not registered a second time
        self.options = list(options)
        self.first, self.last = index == 0, index == blocks - 1
        self.convs = [m for m in block.modules() if isinstance(m, GatedConv2d)]  # not registered
        self.last_mask: torch.Tensor | None = None
        self.last_counts: list[int] = []

    @property
    def macs_per_sample(self) -> int:
        return sum(conv.macs_per_sample for conv in self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        controller = self._controller[0]
        if self.first:
            controller.reset()
        mask = controller(self.gate(x))  # (B, K)
        if self.last:
            controller.reset()  # no graph held between steps
        choice = mask.detach().argmax(1)
        self.last_mask = mask
        self.last_counts = torch.bincount(choice, minlength=len(self.options)).tolist()
        parts = [(n, self.options[k]) for k, n in enumerate(self.last_counts) if n]
        for conv in self.convs:
            conv.parts = parts
        if len(parts) == 1:
            out = self.block(x)
        else:  # each option's samples as one run of rows; back to the input's order after
            order = torch.argsort(choice, stable=True)
            inverse = torch.argsort(order)
            out = _Permute.apply(self.block(_Permute.apply(x, order, inverse)), inverse, order)
        chosen = mask.gather(1, choice[:, None]).to(out.dtype)  # 1.0, straight-through
        return out * chosen.view(-1, *[1] * (out.dim() - 1))


class _Permute(torch.autograd.Function):
    """x[order] along the batch, backward g[inverse]: two gathers (torch's own backward of
    an index scatters, several times slower on the CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gated_blocks(model: nn.Module) -> list[tuple[str, GatedBlock]]:
    """(name, block) of every gated block of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedBlock)]


@dataclasses.dataclass(frozen=True)
class DFQConfig(RecipeConfig):
    """DFQ's parameters: the options pair up (forward_bits[k] with backward_bits[k])."""

    forward_bits: tuple[int, ...] = (3, 4, 4, 6, 6)
    backward_bits: tuple[int, ...] = (6, 6, 8, 8, 12)
    weight_bits: int | None = 4  # None: each option's forward bits
    target_cp: float = 3.0  # % of the gated convolutions' BitOPs at 32×32 bits
    beta: float = 1e-3
    band: float = 0.0  # the ±0.1 band around the target (the authors' relax)
    gate_channels: int = 32  # the gate's first 1×1 conv (the authors' gate_dim)
    gate_embedding: int = 16  # its second 1×1 conv: the LSTM's input (embed_dim)
    gate_hidden: int = 16  # the LSTM's state (hidden_dim)
    full_precision_stem: bool = True
    full_precision_downsample: bool = True
    quantize_classifier: bool = False
    metrics_interval: int = 100  # steps per cp / option-share reading

    def validate(self) -> None:
        error = RecipeConfigError
        name = type(self).__name__
        if not self.forward_bits or len(self.forward_bits) != len(self.backward_bits):
            raise error(
                f"{name}.forward_bits and backward_bits must be non-empty and of one length, "
                f"got {list(self.forward_bits)} and {list(self.backward_bits)}"
            )
        for field in ("forward_bits", "backward_bits"):
            for bits in getattr(self, field):
                check_int(f"{name}.{field} item", bits, error, low=2, high=16)
        if self.weight_bits is not None:
            check_int(f"{name}.weight_bits", self.weight_bits, error, low=2, high=16)
        check_number(f"{name}.target_cp", self.target_cp, error, low=0, high=100)
        check_number(f"{name}.beta", self.beta, error, low=0, high=1e9)
        check_number(f"{name}.band", self.band, error, low=0, high=100)
        for field in ("gate_channels", "gate_embedding", "gate_hidden", "metrics_interval"):
            check_int(f"{name}.{field}", getattr(self, field), error, low=1)

    def option_costs(self) -> list[float]:
        """c_k of each option (``option_cost``)."""
        pairs = zip(self.forward_bits, self.backward_bits, strict=True)
        return [option_cost(f, b, self.weight_bits) for f, b in pairs]

    def cp_range(self) -> tuple[float, float]:
        """The cp the options can reach: every sample at the cheapest option, at the dearest
        (cp counts an option's three products against three at 32×32 bits: 100·c_k / 3)."""
        costs = self.option_costs()
        return 100 * min(costs) / 3, 100 * max(costs) / 3

    def targets(self) -> dict[str, float]:
        """The target cps a run aims at, by what sets them."""
        return {"target_cp": self.target_cp}

    def unreachable_targets(self) -> list[str]:
        """Why each target outside ``cp_range()`` cannot be met. There the regulariser's sign
        never changes and drives every gate to the cheapest (dearest) option until its softmax
        saturates; in a ``fractrain`` run the gates then no longer follow a later stage's
        target (docs/RESULTS.md, issue 21). Warned of, not refused: a run saved with one loads.
        """
        low, high = self.cp_range()
        return [
            f"{type(self).__name__}: {field} = {target:g} is outside the cp these options can "
            f"reach, [{low:.4g}, {high:.4g}] (every sample at the cheapest option, at the "
            "dearest): the gates will saturate on one end"
            for field, target in self.targets().items()
            if not low <= target <= high
        ]


@register_recipe
class DFQ(Recipe):
    name = "dfq"
    paper = "Fu et al., FracTrain (NeurIPS 2020): dynamic fractional quantization"
    description = (
        "a learned gate per residual block picks each sample's precision (one of K options); "
        "a cost regulariser steers the cost to target_cp"
    )
    config_class = DFQConfig

    def __init__(self, config: DFQConfig | None = None) -> None:
        super().__init__(config)
        config = self.config
        for why in config.unreachable_targets():
            warnings.warn(why, UserWarning, stacklevel=2)
            self.emit("unreachable_target", why=why)
        pairs = list(zip(config.forward_bits, config.backward_bits, strict=True))
        self.options = [
            Precision(forward=f, backward=b, weight=config.weight_bits) for f, b in pairs
        ]
        self.option_costs = config.option_costs()
        self.option_names = [f"option{k}_fw{f}_bw{b}" for k, (f, b) in enumerate(pairs)]
        # Layers outside the gates that are quantized at all run at the top option.
        self.top = Precision(forward=max(config.forward_bits), backward=max(config.backward_bits),
                             weight=config.weight_bits)  # fmt: skip
        self._steps, self._cp_sum = 0, 0.0  # the running metrics interval
        self._counts: dict[str, list[int]] = {}
        self._shown: dict[str, Any] = {}  # the last interval's metrics
        # This step's block names, cost, fp32 cost and choices, until sync.
        self._pending: tuple[list[str], list[float], torch.device] | None = None

    @property
    def target_cp(self) -> float:
        return self.config.target_cp

    # ---- model -------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicBlock)]
        if not blocks:
            raise RecipeConfigError(
                f"{self.name} gates residual blocks (qtrain.models.BasicBlock: resnet20, "
                f"resnet38, resnet74); {type(model).__name__} has none"
            )
        config = self.config
        quantization = precision_schedule_quantization(
            max(config.forward_bits), max(config.backward_bits)
        )
        quantize_(model, quantization, filter_fn=self._quantized_layers(model, blocks))
        controller = GateController(config.gate_embedding, config.gate_hidden, len(self.options))
        for index, (name, block) in enumerate(blocks):
            for attr in ("conv1", "conv2"):
                layer = getattr(block, attr)
                observers = dict(layer.observers)
                gated = GatedConv2d.from_float(layer, layer.base_config, layer.range_momentum,
                                               observers)  # fmt: skip
                setattr(block, attr, gated)
            gate = gate_embedding(block.conv1.in_channels, config.gate_channels,
                                  config.gate_embedding)  # fmt: skip
            wrapped = GatedBlock(block, gate, controller, self.options, index, len(blocks))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapped)
        device = next(model.parameters()).device
        return model.to(device)

    def _quantized_layers(self, model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> FilterFn:
        """Every module but the float ones: the stem (the first conv/linear outside the
        blocks), the blocks' shortcut convs, the classifier (the last conv/linear)."""
        config = self.config
        gemms = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        shortcuts = {
            f"{name}.shortcut.{child}"
            for name, block in blocks
            for child, m in block.shortcut.named_modules()
            if isinstance(m, nn.Conv2d)
        }
        in_blocks = tuple(f"{name}." for name, _ in blocks)
        float_layers = set()
        if config.full_precision_stem:
            float_layers.add(next(n for n in gemms if not n.startswith(in_blocks)))
        if config.full_precision_downsample:
            float_layers |= shortcuts
        if not config.quantize_classifier:
            float_layers.add(gemms[-1])
        return lambda _module, name: name not in float_layers

    # ---- per step ----------------------------------------------------------------------
    def schedule(self, step: int, total_steps: int) -> Precision:
        return self.top  # the gated convolutions set their own precision per run of samples

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        blocks = gated_blocks(model)
        masks = torch.stack([block.last_mask for _, block in blocks])  # (blocks, B, K)
        costs = torch.tensor(self.option_costs, device=masks.device, dtype=masks.dtype)
        per_sample = [float(block.macs_per_sample) for _, block in blocks]
        macs = torch.tensor(per_sample, device=masks.device)
        cost = ((masks @ costs).sum(1) * macs).sum()  # Σ_b MACs_b Σ_samples c_k
        fp32_cost = 3 * masks.shape[1] * sum(per_sample)  # the same MACs at 32×32 bits
        cost_value = cost.item()
        reg = regulariser_sign(100 * cost_value / fp32_cost, self.target_cp, self.config.band)
        counts = [c for _, block in blocks for c in block.last_counts]
        names = [name for name, _ in blocks]
        self._pending = (names, [cost_value, fp32_cost, *counts], masks.device)
        for _, block in blocks:
            block.last_mask = None
        return reg * self.config.beta * cost / macs.mean()

    def sync(self, process_group: Any = None) -> None:
        """The step's cost and choices into the metrics interval, summed over the ranks in a
        distributed run (each rank's regulariser reads its own batch's cp)."""
        if self._pending is None:
            return
        names, values, device = self._pending
        self._pending = None
        if process_group is not None:  # on the batch's device: nccl reduces CUDA tensors only
            flat = torch.tensor(values, dtype=torch.float64, device=device)
            dist.all_reduce(flat, group=process_group)
            values = flat.tolist()
        self._steps += 1
        self._cp_sum += 100 * values[0] / values[1]
        k = len(self.options)
        for index, name in enumerate(names):
            counts = self._counts.setdefault(name, [0] * k)
            step = values[2 + index * k : 2 + (index + 1) * k]
            self._counts[name] = [a + round(b) for a, b in zip(counts, step, strict=True)]
        if self._steps < self.config.metrics_interval:
            return
        shown: dict[str, Any] = {"cp": self._cp_sum / self._steps}
        for k, option in enumerate(self.option_names):
            shown[option] = {name: c[k] / sum(c) for name, c in self._counts.items()}
        self._shown = shown
        self._steps, self._cp_sum, self._counts = 0, 0.0, {}

    # ---- reporting and resume ------------------------------------------------------------
    def metrics(self) -> dict[str, float | dict[str, float]]:
        return {"target_cp": self.target_cp, **self._shown}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps, "cp_sum": self._cp_sum,
                "counts": {n: list(c) for n, c in self._counts.items()},
                "shown": dict(self._shown)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self._steps, self._cp_sum = int(state["steps"]), float(state["cp_sum"])
        self._counts = {n: [int(x) for x in c] for n, c in state["counts"].items()}
        self._shown = dict(state["shown"])
