"""The quantized-module protocol: the few questions every quantized layer answers.

The cost meter, ``dequantize_``, the trainer's precision schedule, the numerical guard and
export ask a layer these questions instead of testing its type, so a new kind of quantized
layer (emulated ``QLinear``/``QConv2d``, real int8/fp8 GEMM ``LowPrecisionLinear``, a
self-compressing conv, a ``BitLinear``) only has to answer them:

- ``role_bits(float_bits)``: operand bits of the forward, grad-input and grad-weight products
  as they run now (``float_bits`` for an operand kept in floating point);
- ``sample_role_bits()``: for a layer whose precision differs per input sample (DFQ), how many
  samples of the last forward ran at which role bits; None when all ran at ``role_bits``;
- ``weight_storage_bits()``: bits to store the weight as deployed (values and scales);
- ``quantized_weight()``: the integer weight with its scale and zero point, for export;
- ``to_float()``: the plain torch module with the same parameters;
- ``set_precision(precision)``: the bit-widths a schedule sets (None: the configured ones);
- ``raise_floor()``: the guard's one-step precision raise, a floor no schedule undoes;
  ``floor()`` / ``set_floor(floor)`` read and restore it (resume).

>>> from torch import nn
>>> from qtrain.nn import QLinear
>>> isinstance(QLinear(4, 2), QuantizedModule), isinstance(nn.Linear(4, 2), QuantizedModule)
(True, False)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from qtrain.ops import Precision

RoleBits = dict[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight as integers: ``weight ≈ (levels − zero_point) · scale``.

    ``scale``/``zero_point`` broadcast against ``levels`` (per tensor: one element; per output
    channel: shape (C_out, 1, ...)). ``bits`` is the format's width (levels may be stored
    wider, e.g. 4-bit values in int8); ``signed`` says which integer range they span.
    """

    levels: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool

    def dequantize(self) -> torch.Tensor:
        return (self.levels.float() - self.zero_point.float()) * self.scale


@runtime_checkable
class QuantizedModule(Protocol):
    """What the cost meter, ``dequantize_``, schedules, the guard and export ask a layer."""

    def role_bits(self, float_bits: float = 32.0) -> RoleBits: ...

    def sample_role_bits(self) -> Sequence[tuple[int, RoleBits]] | None: ...

    def weight_storage_bits(self) -> int: ...

    def quantized_weight(self) -> QuantizedWeight | None: ...

    def to_float(self) -> nn.Module: ...

    def set_precision(self, precision: Precision | None) -> None: ...

    def raise_floor(self) -> bool: ...

    def floor(self) -> dict[str, float]: ...

    def set_floor(self, floor: dict[str, float]) -> None: ...


@functools.cache
def _follows_protocol(module_type: type) -> bool:
    # The protocol's methods are class attributes: one check per class, not per module and
    # step (a runtime-checkable isinstance looks up every method each time).
    return issubclass(module_type, QuantizedModule)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` follows the protocol (``isinstance(module, QuantizedModule)``)."""
    return _follows_protocol(type(module))


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedModule]]:
    """(name, layer) of every module of ``model`` that follows the protocol, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]


def set_precision(model: nn.Module, precision: Precision | dict[str, Precision] | None) -> None:
    """Apply a schedule's precision to every quantized layer (a dict: per layer name; layers
    it does not name go back to their configured bits). The guard's floors stay in force."""
    for name, layer in quantized_layers(model):
        layer.set_precision(precision.get(name) if isinstance(precision, dict) else precision)
