"""Numerical-fault guard: where did a NaN or inf first appear in a training step?

The guard hooks every layer that owns parameters (conv, linear, norm, embedding). On a checked
step it records max|x| of each tensor a layer touches, by role:

- ``input``, ``output`` — the layer's activations;
- ``weight``, ``bias`` (any parameter, by its name) — read before the layer's forward;
- ``grad_output`` — the layer gradient g_l arriving at the layer's output;
- ``grad_input`` — the gradient the layer sends back through its input;
- ``grad_weight``, ``grad_bias`` — the parameters' gradients after backward.

A record is a 0-d tensor from one fused min/max pass (NaN propagates, ±inf shows), computed
without a device sync; ``first_fault`` reads them all at once after backward, so a checked step
costs one sync. Records are in the order the values were computed, so the first non-finite one
is where the fault appeared. Parameter gradients are recorded on every step
(``record_parameter_gradients``), checked or not: they are few and small next to the
activations, and they are what would corrupt the weights.

The policy for a fault (stop, skip the step, raise the layer's precision and retry) is the
trainer's; this module only finds faults and raises a layer's precision on request.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> guard = NumericalGuard(model)
    >>> guard.start(step=1, layers=True)
    >>> with torch.no_grad():
    ...     model[2].weight[0, 0] = float("nan")
    >>> _ = model(torch.randn(3, 4))
    >>> print(guard.first_fault())
    nan in the weight of layer '2' (Linear) at step 1
    >>> guard.remove()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qtrain.protocol import is_quantized

POLICIES = ("stop", "skip", "raise-precision")


@dataclasses.dataclass(frozen=True)
class Fault:
    """The first non-finite tensor of a step.

    ``step`` counts from 1 (the step after which ``step`` steps are done); ``layer`` is the
    module's name in the model (``"(loss)"`` for the loss itself, ``"(unlocated)"`` when a
    quantizer refused NaN/inf on a step without per-layer records); ``persistent`` is True
    when the value lives in a parameter, which neither skipping nor retrying the step repairs.
    """

    step: int
    layer: str
    module: str  # the layer's type; "" for the loss and other places that are not a layer
    role: str
    value: str  # "nan" or "inf"
    persistent: bool = False

    def __str__(self) -> str:
        where = f" of layer {self.layer!r} ({self.module})" if self.module else ""
        return f"{self.value} in the {self.role}{where} at step {self.step}"


def _floating(value: Any) -> Iterator[torch.Tensor]:
    """The non-empty floating-point tensors in a hook's args or output (tuples/lists nested)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel():
            yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _floating(item)


def _peak(tensor: torch.Tensor) -> torch.Tensor:
    """max|x| as a float32 0-d tensor: NaN if any value is NaN, inf if any is infinite."""
    low, high = torch.aminmax(tensor.detach())
    return torch.maximum(high, -low).float()


class NumericalGuard:
    """Per-layer NaN/inf records of one model's training steps.

    Args:
        model: the model; hooks go on every module that owns parameters.
        gradients: record gradients. False under a loss scaler, whose scaled gradients may
            overflow on purpose (the scaler then skips the step itself).
    """

    def __init__(self, model: nn.Module, *, gradients: bool = True) -> None:
        self.model = model
        self.gradients = gradients
        self.raised: dict[str, int] = {}  # layer -> how many times its precision was raised
        self._layers_active = False
        self._step = 0
        self._where: list[tuple[str, nn.Module, str, bool]] = []  # (layer, module, role, param)
        self._peaks: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self.reattach()

    # ---- hooks ---------------------------------------------------------------------------
    def reattach(self) -> None:
        """Hook the model's current layers (after a recipe changed its structure)."""
        self.remove()
        for name, module in self.model.named_modules():
            if next(module.parameters(recurse=False), None) is not None:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook(name)))

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if not self._layers_active:
                return
            for x in _floating(args):
                self._record(name, module, "input", x)
                self._watch_gradient(name, module, "grad_input", x)
            for param_name, param in module.named_parameters(recurse=False):
                self._record(name, module, param_name, param, param=True)

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._layers_active:
                return
            for y in _floating(output):
                self._record(name, module, "output", y)
                self._watch_gradient(name, module, "grad_output", y)

        return hook

    def _watch_gradient(self, name: str, module: nn.Module, role: str, x: torch.Tensor) -> None:
        if self.gradients and x.requires_grad:
            # A tensor hook sees the gradient before the op that produced x consumes it, so
            # the record lands before any fault that gradient causes further back.
            x.register_hook(lambda grad: self._record(name, module, role, grad))

    def _record(
        self, name: str, module: nn.Module, role: str, tensor: torch.Tensor, param: bool = False
    ) -> None:
        if tensor.is_floating_point() and tensor.numel():
            self._where.append((name, module, role, param))
            self._peaks.append(_peak(tensor))

    # ---- one step ------------------------------------------------------------------------
    def start(self, step: int, layers: bool) -> None:
        """Begin recording step ``step`` (counted from 1); ``layers``: per-layer checks too."""
        self._step = step
        self._layers_active = layers
        self._where, self._peaks = [], []

    def stop(self) -> None:
        """Stop recording (evaluation passes are not checked); the records stay readable."""
        self._layers_active = False

    def record_parameter_gradients(self) -> None:
        """Record every layer's parameter gradients (call after backward)."""
        if not self.gradients:
            return
        found = [
            ((name, module, f"grad_{param_name}", False), param.grad)
            for name, module in self.model.named_modules()
            for param_name, param in module.named_parameters(recurse=False)
            if param.grad is not None and param.grad.numel()
        ]
        if found:
            where, grads = zip(*found, strict=True)
            # max|g| of every gradient in one fused kernel (the one torch's clip_grad_norm_ uses).
            peaks = torch._foreach_norm(list(grads), math.inf)
            self._where += where
            self._peaks += [peak.float() for peak in peaks]

    def first_fault(self) -> Fault | None:
        """The first non-finite record of the current step, or None (one device sync)."""
        if not self._peaks:
            return None
        peaks = torch.stack(self._peaks)
        bad = torch.nonzero(~torch.isfinite(peaks))
        if bad.numel() == 0:
            return None
        index = int(bad[0, 0])
        name, module, role, param = self._where[index]
        value = "nan" if bool(torch.isnan(peaks[index])) else "inf"
        return Fault(self._step, name, type(module).__name__, role, value, persistent=param)

    # ---- precision -----------------------------------------------------------------------
    def raise_precision(self, layer: str) -> bool:
        """Raise the precision floor of every quantized operand of ``layer`` one step
        (``QuantizedModule.raise_floor``): a precision schedule never goes below it.

        Returns False when the layer is not a quantized layer or is already full precision.
        """
        module = self.model.get_submodule(layer) if layer else self.model
        if not is_quantized(module) or not module.raise_floor():
            return False
        self.raised[layer] = self.raised.get(layer, 0) + 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """The raised layers with their floors, so a resumed run computes at the same
        precisions whatever its schedule says."""
        floors = {layer: self.model.get_submodule(layer).floor() for layer in self.raised}
        return {"raised": dict(self.raised), "floors": floors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` onto a freshly prepared model (an older state without
        floors is replayed as raises)."""
        self.raised = dict(state.get("raised", {}))
        floors = state.get("floors")
        if floors is None:
            counts, self.raised = self.raised, {}
            for layer, count in counts.items():
                for _ in range(count):
                    self.raise_precision(layer)
            return
        for layer, floor in floors.items():
            self.model.get_submodule(layer).set_floor(floor)
