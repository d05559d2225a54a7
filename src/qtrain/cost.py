"""Cost meter: multiply-accumulates per GEMM role, BitOPs, weight bits and a 45 nm energy estimate.

BitOPs of a product = MACs × bits of operand a × bits of operand b (32 for full precision;
16 for a plain layer under bf16/fp16 autocast). Each training step of a layer has three products
of equal MAC count: forward, grad-input (skipped when the layer input needs no gradient, e.g.
the first layer) and grad-weight (skipped when the weight is frozen).

The bits come from the quantized-module protocol (``qtrain.protocol``): a layer's
``role_bits``, or, for a layer whose precision differs per input sample (DFQ), its
``sample_role_bits``: then the call's MACs are split per sample (MACs / batch size × samples)
and each part is counted at its own bits. Weight storage is each layer's
``weight_storage_bits``.

Normalisation layers (BatchNorm, Range BN) are counted too, per element of their output, as
multiply-accumulates of a value with a per-channel float32 coefficient: forward 1 (the affine
x·a + b; plain BN 2, its variance squares every value, Range BN's range needs comparisons
only), grad-input 2 (x̂·k and a·(…) of dx = a·(dy − mean dy − x̂·mean(dy·x̂))), grad-weight 1
(Σ dy·x̂ for γ; β's Σ dy adds only). The value's bits are Range BN's ``input_spec`` and
``grad_spec`` bits where it has them, else the input's float bits; the coefficient is 32 bits.
These MACs enter the per-role totals and are also kept apart (``norm_macs``, ``norm_bitops``).

Energy per MAC (Horowitz, ISSCC 2014, 45 nm, as the SBM poster uses it): one multiply plus one
add of the wider operand's class — int8: 0.2 + 0.03 pJ, fp16: 1.1 + 0.4 pJ, fp32: 3.7 + 0.9 pJ
(operands of ≤ 8 bits use the int8 row, ≤ 16 bits the fp16 row, wider the fp32 row).

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(4, 3, bias=False)
>>> meter = CostMeter(layer)
>>> _ = layer(torch.randn(2, 4))
>>> meter.pop().macs["forward"]     # 2 rows × 4 inputs × 3 outputs
24
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from qtrain.protocol import RoleBits, is_quantized
from qtrain.range_bn import RangeBatchNorm2d

ROLES = ("forward", "grad_input", "grad_weight")

# pJ per multiply and per add, by operand class (Horowitz 2014, 45 nm).
ENERGY_PJ = {"int8": (0.2, 0.03), "fp16": (1.1, 0.4), "fp32": (3.7, 0.9)}


def mac_energy_pj(bits_a: float, bits_b: float) -> float:
    """Energy of one multiply-accumulate whose wider operand has max(bits_a, bits_b) bits."""
    widest = max(bits_a, bits_b)
    mul, add = ENERGY_PJ["int8" if widest <= 8 else "fp16" if widest <= 16 else "fp32"]
    return mul + add


@dataclasses.dataclass
class StepCost:
    """Accumulated cost: MACs and BitOPs per role, the fp32-equivalent BitOPs, energy (pJ)."""

    macs: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    bitops: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    energy_pj: float = 0.0
    norm_macs: int = 0  # of the totals: normalisation layers' MACs and BitOPs
    norm_bitops: float = 0.0

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    @property
    def total_bitops(self) -> float:
        return sum(self.bitops.values())

    @property
    def bitops_fp32(self) -> float:
        return self.total_macs * 32.0 * 32.0

    def add(self, role: str, macs: int, bits_a: float, bits_b: float) -> None:
        self.macs[role] += macs
        self.bitops[role] += macs * bits_a * bits_b
        self.energy_pj += macs * mac_energy_pj(bits_a, bits_b)

    def __iadd__(self, other: StepCost) -> StepCost:
        for role in ROLES:
            self.macs[role] += other.macs[role]
            self.bitops[role] += other.bitops[role]
        self.energy_pj += other.energy_pj
        self.norm_macs += other.norm_macs
        self.norm_bitops += other.norm_bitops
        return self

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f"macs_{r}": self.macs[r] for r in ROLES}
        out.update({f"bitops_{r}": self.bitops[r] for r in ROLES})
        out.update(
            bitops_total=self.total_bitops,
            bitops_fp32_equiv=self.bitops_fp32,
            energy_pj=self.energy_pj,
            macs_norm=self.norm_macs,
            bitops_norm=self.norm_bitops,
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> StepCost:
        cost = cls()
        for role in ROLES:
            cost.macs[role] = int(data[f"macs_{role}"])
            cost.bitops[role] = float(data[f"bitops_{role}"])
        cost.energy_pj = float(data["energy_pj"])
        cost.norm_macs = int(data.get("macs_norm", 0))  # absent before norms were counted
        cost.norm_bitops = float(data.get("bitops_norm", 0.0))
        return cost


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one forward product of a linear or conv layer producing ``output``."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features


def _autocast_bits(device_type: str) -> float:
    if torch.is_autocast_enabled(device_type):
        return float(torch.finfo(torch.get_autocast_dtype(device_type)).bits)
    return 32.0


def _batch_size(module: nn.Module, output: torch.Tensor) -> int:
    """Samples in a call: the leading dim of a batched output (an unbatched call: 1)."""
    batched = output.dim() == 4 if isinstance(module, nn.Conv2d) else output.dim() > 1
    return output.shape[0] if batched else 1


def _call_parts(module: nn.Module, macs: int, output: torch.Tensor) -> list[tuple[int, RoleBits]]:
    """(MACs, role bits) parts of one call: all its MACs at the layer's ``role_bits`` (the
    float precision for a plain layer), or MACs / batch size × n for each ``(n, role bits)``
    of a quantized layer's ``sample_role_bits``."""
    float_bits = _autocast_bits(output.device.type)
    if not is_quantized(module):
        return [(macs, dict.fromkeys(ROLES, (float_bits, float_bits)))]
    samples: Sequence[tuple[int, RoleBits]] | None = module.sample_role_bits()
    if samples is None:
        return [(macs, module.role_bits(float_bits))]
    batch = _batch_size(module, output)
    if sum(n for n, _ in samples) != batch:
        raise ValueError(
            f"{type(module).__name__}.sample_role_bits() counts "
            f"{sum(n for n, _ in samples)} samples for a batch of {batch}"
        )
    return [(macs // batch * n, bits) for n, bits in samples]


# MACs per output element of a normalisation layer, by role (see the module docstring).
_NORM_MACS = {"forward": 1, "grad_input": 2, "grad_weight": 1}


def _norm_parts(module: nn.Module, output: torch.Tensor) -> tuple[dict[str, int], RoleBits]:
    """MACs per role and operand bits of one normalisation call."""
    float_bits = float(torch.finfo(output.dtype).bits) if output.is_floating_point() else 32.0
    macs = {role: per * output.numel() for role, per in _NORM_MACS.items()}
    input_spec = getattr(module, "input_spec", None)
    grad_spec = getattr(module, "grad_spec", None)
    if isinstance(module, RangeBatchNorm2d):  # float32 statistics, no squares
        float_bits = 32.0
    elif module.training:
        macs["forward"] += output.numel()  # the squares of the variance
    value_bits = input_spec.bits if input_spec is not None else float_bits
    grad_bits = grad_spec.bits if grad_spec is not None else float_bits
    bits = {
        "forward": (value_bits, 32.0),
        "grad_input": (grad_bits, 32.0),
        "grad_weight": (grad_bits, 32.0),
    }
    return macs, bits


def _roles(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """The products a call costs: forward; grad-input where the input needs a gradient,
    grad-weight where the weight does (neither without autograd)."""
    roles = ["forward"]
    if torch.is_grad_enabled():
        if inputs[0].requires_grad:
            roles.append("grad_input")
        if module.weight is not None and module.weight.requires_grad:
            roles.append("grad_weight")
    return roles


class CostMeter:
    """Counts the cost of every conv/linear and normalisation call of a model through
    forward hooks.

    Call ``pop()`` after each training step to take the cost since the previous pop; wrap
    evaluation in ``with meter.paused():`` so it is not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self._cost = StepCost()
        self._paused = False
        self._handles = [
            module.register_forward_hook(self._hook)
            for module in model.modules()
            if isinstance(module, nn.Linear | nn.Conv2d)
        ] + [
            module.register_forward_hook(self._norm_hook)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]

    def _hook(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if self._paused:
            return
        roles = _roles(module, inputs)
        for macs, bits in _call_parts(module, layer_macs(module, output), output):
            for role in roles:
                self._cost.add(role, macs, *bits[role])

    def _norm_hook(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if self._paused:
            return
        roles = _roles(module, inputs)
        macs, bits = _norm_parts(module, output)
        for role in roles:
            self._cost.add(role, macs[role], *bits[role])
            self._cost.norm_macs += macs[role]
            self._cost.norm_bitops += macs[role] * bits[role][0] * bits[role][1]

    def pop(self) -> StepCost:
        cost, self._cost = self._cost, StepCost()
        return cost

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def model_bits(model: nn.Module) -> int:
    """Bits to store the model's parameters: the ``weight`` of every quantized layer as its
    ``weight_storage_bits()`` says (values and scales, as deployed); every other parameter
    at 32 bits. A weight shared by several layers counts once."""
    total = 0
    counted: set[int] = set()
    for module in model.modules():
        if is_quantized(module) and id(module.weight) not in counted:
            counted.add(id(module.weight))
            total += module.weight_storage_bits()
    for param in model.parameters():
        if id(param) not in counted:
            counted.add(id(param))
            total += param.numel() * 32
    return total
