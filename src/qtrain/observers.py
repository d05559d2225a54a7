"""Observers: the home of a quantizer's data-dependent state, one per quantized operand role.

A ``QuantSpec`` says how a tensor is quantized; some scale rules need state that outlives one
call — SBM's running activation ranges, a clip value refreshed every N steps, a per-channel
clip recurrence, a calibration histogram, a learned step. An observer owns that state as
``nn.Module`` buffers (or parameters), so it is in ``state_dict`` and every checkpoint, and
answers one question: the qparams for this tensor under this spec (``qparams(x, spec)``;
None: let the spec's own rule measure x). The quantized GEMM op asks the observer of each
role it quantizes — input and weight in forward, the layer gradient's two copies in backward.

A new scale rule with state is a new ``Observer`` subclass; nothing else changes.

Roles (``ROLES``): ``input``, ``weight``, ``grad_input`` (g_l for the grad-input product),
``grad_weight`` (the copy of g_l for the grad-weight product).

>>> import torch
>>> from qtrain import QuantSpec, formats
>>> observer = RunningMinMax(momentum=0.1)
>>> spec = QuantSpec(formats.UINT8)
>>> _ = observer.qparams(torch.tensor([-1.0, 3.0]), spec)   # training: the batch's own range
>>> observer.low, observer.high
(tensor([-1.]), tensor([3.]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtrain.quantizer import (
    MinMax,
    QParams,
    QuantSpec,
    QuantSpecError,
    _CheckedQParams,
    _observed_qparams,
    observe_range,
    qparams_from_range,
)
from qtrain.validation import check_number

ROLES = ("input", "weight", "grad_input", "grad_weight")


class Observer(nn.Module):
    """Base observer: no state; the spec's own rule measures each tensor.

    Subclasses keep their state in buffers and override ``qparams``. Buffers registered with
    ``register_lazy_buffer`` start empty and take their shape from the first tensor observed
    (or from a state_dict); a plain module's state_dict, which lacks them, leaves them empty.
    """

    _lazy: tuple[str, ...] = ()

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        """Scale and zero point for ``x`` under ``spec``; None: the spec's rule measures x."""
        return None

    def sync(self, process_group: Any = None) -> None:
        """Agree across ranks: every floating-point buffer becomes its mean over the ranks,
        in one collective. A no-op unless ``torch.distributed`` is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        buffers = [b for b in self.buffers() if b.is_floating_point() and b.numel()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        dist.all_reduce(flat, group=process_group)
        flat /= dist.get_world_size(process_group)
        for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
            buffer.copy_(part.view_as(buffer))

    def register_lazy_buffer(self, name: str) -> None:
        """An empty buffer that takes its shape from the first value assigned or loaded."""
        self.register_buffer(name, torch.zeros(0), persistent=True)
        self._lazy = (*self._lazy, name)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in self._lazy:
            key = prefix + name
            own = getattr(self, name)
            if key in state_dict:
                # The saved shape; the loader copies the values in, keeping our device and dtype.
                setattr(self, name, own.new_empty(state_dict[key].shape))
            else:  # a state_dict without observer state (a plain layer's): keep ours
                state_dict[key] = own
        super()._load_from_state_dict(state_dict, prefix, *args)


class RunningMinMax(Observer):
    """SBM's running ranges (Banner et al. 2018) for a ``MinMax`` scale rule.

    Training: each batch is quantized with its own (checked) range, which then enters the
    running range: run ← m·run + (1 − m)·batch (the first batch initialises it). Eval: the
    running range; before any training batch, the batch's own range. For a spec whose rule is
    not MinMax it defers to the spec (returns None).
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        check_number("RunningMinMax.momentum", momentum, QuantSpecError, low=0.0, high=1.0)
        self.momentum = float(momentum)
        self.register_lazy_buffer("low")
        self.register_lazy_buffer("high")

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        if not isinstance(spec.scale, MinMax) or x.numel() == 0:
            return None
        if self.training:
            low, high = observe_range(x, spec)
            # Checked (nonfinite='error') before the running range takes this batch's range in.
            qparams = _observed_qparams(low, high, spec, [spec.int_format])[0]
            with torch.no_grad():
                if self.low.numel() != low.numel():
                    self.low, self.high = low.clone(), high.clone()
                else:
                    self.low.mul_(self.momentum).add_(low, alpha=1 - self.momentum)
                    self.high.mul_(self.momentum).add_(high, alpha=1 - self.momentum)
            # From this batch's own checked range: the quantizer need not check x again.
            return _CheckedQParams(qparams.scale, qparams.zero_point)
        if self.low.numel():
            return qparams_from_range(self.low, self.high, spec.int_format)
        return None

    def extra_repr(self) -> str:
        return f"momentum={self.momentum:g}"
