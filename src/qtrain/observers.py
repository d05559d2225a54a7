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

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qtrain import kernels
from qtrain.calibration import calibration_range, qparams_of
from qtrain.clipping import (
    check_recurrence,
    cosine_distance,
    cosine_optimal_clip,
    inverted_t_view,
    magnitude_aware_clip,
)
from qtrain.formats import BlockFloat, Int
from qtrain.quantizer import (
    _F32,
    LearnedStep,
    MinMax,
    PerTensor,
    QParams,
    QuantSpec,
    QuantSpecError,
    _check_finite,
    _CheckedQParams,
    _finite_only,
    _observed_qparams,
    _safe_scale,
    canonical_view,
    observe_range,
    qparams_from_range,
    quantize,
)
from qtrain.validation import check_int, check_number, matches, refuse

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

    def spec(self, spec: QuantSpec) -> QuantSpec:
        """The spec this observer quantizes with for a layer configured with ``spec`` (the
        same; an LSQ input step picks its grid's sign)."""
        return spec

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """``x`` fake-quantized under ``spec`` at this observer's qparams, with autograd's
        straight-through gradient (zero where a value was clipped): the path of layers whose
        backward is autograd's own (QAT's ``FakeQuantLinear``)."""
        return self.fake_quantize_observed(x, spec)[0]

    def fake_quantize_observed(
        self, x: torch.Tensor, spec: QuantSpec
    ) -> tuple[torch.Tensor, QParams | None, QuantSpec]:
        """``fake_quantize``'s x̂ with the qparams it used (None: the spec's rule measured
        x) and the spec it quantized with: what reads x̂'s integer levels back (QAT's forward
        on integer products), from one observation — a running range moves once a call.
        ``fake_quantize`` is its first value: a subclass that quantizes its own way (LSQ's
        learned step) overrides both from one body."""
        qparams = self.qparams(x, spec)
        return quantize(x, spec, qparams=qparams), qparams, spec

    def sync_tensors(self) -> list[torch.Tensor]:
        """The tensors of this observer whose values the ranks of a data-parallel run agree
        on (their mean): its non-empty floating-point buffers. A subclass adds state held
        elsewhere (LSQ's data-initialised step). The trainer averages those of every observer
        of the model in one collective per step (``qtrain.distributed``)."""
        return [b for b in self.buffers() if b.is_floating_point() and b.numel()]

    def sync(self, process_group: Any = None) -> None:
        """Agree across ranks on this observer alone: every tensor of ``sync_tensors()``
        becomes its mean over the ranks, in one collective. A no-op unless
        ``torch.distributed`` is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        buffers = self.sync_tensors()
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        dist.all_reduce(flat, group=process_group)
        flat /= dist.get_world_size(process_group)
        with torch.no_grad():
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


class GradientClip(Observer):
    """Symmetric integer quantization of a layer gradient g at a clip value per channel of the
    spec's granularity: q = round(qmax·clamp(g, −c, c)/c). This base clips at max|g| (plain
    absmax, the scale the spec's own AbsMax rule gives); subclasses choose c
    (``clip_values``). Every ``interval`` calls, starting with the first, it measures the
    cosine distance d_c between g and ĝ (``qtrain.clipping.cosine_distance``, in the form of
    the spec's rounding) into the ``distance`` buffer, so a run can watch how far its
    quantized gradients turn.

    Buffers: ``calls`` (calls so far), ``distance`` (d_c at the last measurement; −1
    before: a NaN would read as a fault to the trainer's checks). For a signed integer spec
    only (zero point 0).

    >>> import torch
    >>> from qtrain import QuantSpec, formats
    >>> observer = GradientClip(interval=10)
    >>> observer.qparams(torch.tensor([0.5, -2.0]), QuantSpec(formats.INT8)).scale
    tensor([0.0157])
    >>> int(observer.calls), float(observer.distance) < 1e-4
    (1, True)
    """

    def __init__(self, interval: int = 100) -> None:
        super().__init__()
        check_int(f"{type(self).__name__}.interval", interval, QuantSpecError, low=1)
        self.interval = interval
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("distance", torch.full((), -1.0))  # < 0: not measured yet

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        int_format = spec.int_format
        if int_format is None or not int_format.signed or isinstance(spec.format, BlockFloat):
            raise QuantSpecError(
                f"{type(self).__name__} clips symmetrically: it needs a signed integer spec "
                f"(formats.Int(bits)), got {spec}"
            )
        if x.numel() == 0:
            return None
        x3, _ = canonical_view(x.detach(), spec.granularity)
        source = _finite_only(x3) if spec.nonfinite == "propagate" else x3
        amax = kernels.implementation(source.device).absmax(source)
        if spec.nonfinite == "error":
            _check_finite(amax, spec)  # NaN/inf in g reaches max|g|
        measure = int(self.calls) % self.interval == 0
        with torch.no_grad():
            clip = self.clip_values(source, amax, spec, measure)
            if measure:
                d_c = cosine_distance(
                    source, clip.view(1, -1, 1), int_format.bits, spec.rounding.value
                )
                self.distance.fill_(d_c)
            self.calls += 1
        scale = torch.where(clip > 0, clip / int_format.qmax, torch.ones_like(clip))
        # g was checked (its max|g|) and the scale is finite and > 0: nothing left to check.
        return _CheckedQParams(scale.clamp(_F32.tiny, _F32.max), torch.zeros_like(scale))

    def clip_values(
        self, x3: torch.Tensor, amax: torch.Tensor, spec: QuantSpec, measure: bool
    ) -> torch.Tensor:
        """The clip value c per channel (shape (C,)) of g's canonical (O, C, I) view;
        ``amax`` is max|g| per channel, ``measure`` whether this call measures d_c."""
        return amax

    def extra_repr(self) -> str:
        return f"interval={self.interval}"


class CosineClip(GradientClip):
    """Unified INT8's direction-sensitive gradient clipping (Zhu et al. 2020, METHODS.md §4):
    every ``interval`` calls (the paper's 100 iterations), the clip c in (0, max|g|] that
    minimises the cosine distance d_c between g and ĝ (``qtrain.clipping.cosine_optimal_clip``,
    in the form of the spec's rounding); the calls between reuse it. d_c at the chosen c is the
    ``distance`` buffer, which the deviation-counteractive lr scaling reads.

    Buffers: ``clip`` (one c per channel of the spec's granularity; one per tensor as the paper
    has it), and ``calls``, ``distance`` (``GradientClip``).
    """

    def __init__(self, interval: int = 100, grid: int = 32, tolerance: float = 1e-3) -> None:
        super().__init__(interval)
        check_int("CosineClip.grid", grid, QuantSpecError, low=2)
        check_number("CosineClip.tolerance", tolerance, QuantSpecError, low=1e-9, high=1)
        self.grid, self.tolerance = grid, tolerance
        self.register_lazy_buffer("clip")

    def clip_values(
        self, x3: torch.Tensor, amax: torch.Tensor, spec: QuantSpec, measure: bool
    ) -> torch.Tensor:
        if measure or self.clip.numel() != amax.numel():
            bits, rounding = spec.int_format.bits, spec.rounding.value
            found = [
                cosine_optimal_clip(x3[:, channel], bits, rounding, self.grid, self.tolerance)
                for channel in range(x3.shape[1])
            ]
            self.clip = torch.tensor(found, dtype=torch.float32, device=x3.device)
        return self.clip

    def extra_repr(self) -> str:
        return f"interval={self.interval}, grid={self.grid}, tolerance={self.tolerance:g}"


class MagnitudeAwareClip(GradientClip):
    """Distribution-adaptive INT8's clip (Zhao et al. 2021, METHODS.md §5), each call, per
    channel of the spec's granularity (per output channel for the grad-weight copy of g_l,
    per tensor for the grad-input copy): a Gaussian channel (P(|g| > σ) > λ,
    ``qtrain.clipping.inverted_t_channels``) clips at max|g|; an inverted-T channel at
    s_t = (1 − k·A)·s_{t−1} + A·max|g|_t (``qtrain.clipping.magnitude_aware_clip``).

    The recurrence runs for every channel every call (starting at s_0 = max|g|_0), so a
    channel that turns inverted-T finds its state current. ``all_gaussian`` treats every
    channel as Gaussian (the ablation: plain per-channel absmax).

    Buffers: ``state`` (s_t per channel), ``inverted`` (1.0 where the last call classified the
    channel inverted-T), ``inverted_rate`` (per channel, the fraction of the calls of the last
    ``interval`` that found it inverted-T; the first call's classification until then),
    ``inverted_count`` (the running interval's count), and ``calls``, ``distance``
    (``GradientClip``).
    """

    def __init__(
        self,
        threshold: float = 0.3,
        k: float = 1.0,
        a: float = 0.8,
        all_gaussian: bool = False,
        interval: int = 100,
    ) -> None:
        super().__init__(interval)
        check_recurrence("MagnitudeAwareClip", k, a, QuantSpecError)
        if not (matches(threshold, float) and 0 < threshold < 1):
            refuse("MagnitudeAwareClip.threshold", threshold, "a number in (0, 1)", QuantSpecError)
        self.threshold, self.k, self.a, self.all_gaussian = threshold, k, a, all_gaussian
        for name in ("state", "inverted", "inverted_count", "inverted_rate"):
            self.register_lazy_buffer(name)

    def clip_values(
        self, x3: torch.Tensor, amax: torch.Tensor, spec: QuantSpec, measure: bool
    ) -> torch.Tensor:
        if self.all_gaussian:
            inverted = torch.zeros_like(amax, dtype=torch.bool)
        else:
            inverted = inverted_t_view(x3, self.threshold)
        if self.state.numel() != amax.numel():
            self.state = amax.clone()
        else:
            self.state = magnitude_aware_clip(self.state, amax, self.k, self.a)
        self.inverted = inverted.float()
        counted = self.inverted_count.numel() == amax.numel()  # False on the first call only
        if measure:
            self.inverted_rate = self.inverted_count / self.interval if counted else self.inverted
            self.inverted_count = torch.zeros_like(self.inverted)
        self.inverted_count = self.inverted_count + self.inverted
        return torch.where(inverted, self.state, amax)

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold:g}, k={self.k:g}, a={self.a:g}, "
            f"all_gaussian={self.all_gaussian}, interval={self.interval}"
        )


class LSQStep(Observer):
    """LSQ's learned step size (Esser et al. 2020, METHODS.md §7) for a ``LearnedStep()`` spec.

    ``step`` is a parameter with one value per scale of the spec's granularity (``channels``:
    1 per tensor, C_out per output channel), set from the first tensor quantized to
    2·mean|x|/sqrt(Q_P) per scale and learned from then on through ``quantize(x, spec,
    step=...)``, whose step gradient is scaled by 1/sqrt(N·Q_P) (N values per step).
    ``signed="auto"`` (activations) lets that first tensor choose the grid and keeps it:
    unsigned [0, 2^b − 1] when it has no negative value (after a ReLU), signed narrow
    [−(2^(b−1) − 1), 2^(b−1) − 1] otherwise. Buffers: ``initialised``, ``unsigned``.

    >>> from qtrain import formats
    >>> observer = LSQStep(signed="auto")
    >>> spec = QuantSpec(formats.Int(4), scale=LearnedStep())
    >>> y = observer.fake_quantize(torch.tensor([0.0, 1.0, 2.0, 3.0]), spec)
    >>> bool(observer.unsigned), round(float(observer.step.detach()), 4)   # 2·1.5/sqrt(15)
    (True, 0.7746)
    """

    def __init__(self, channels: int = 1, signed: bool | str = True) -> None:
        super().__init__()
        check_int("LSQStep.channels", channels, QuantSpecError, low=1)
        if signed not in (True, False, "auto"):
            refuse("LSQStep.signed", signed, "True, False or 'auto'", QuantSpecError)
        self.auto = signed == "auto"
        self.step = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("unsigned", torch.tensor(signed is False))

    def spec(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` on this observer's grid (signed or unsigned) with the learned step rule."""
        int_format = spec.int_format
        if not isinstance(spec.format, Int) or not isinstance(spec.scale, LearnedStep):
            raise QuantSpecError(f"LSQStep needs an integer spec with LearnedStep(), got {spec}")
        signed = not bool(self.unsigned)
        if int_format.signed == signed:
            return spec
        return dataclasses.replace(spec, format=Int(int_format.bits, signed=signed))

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return self._fake_quantize(x, spec)[0]

    def fake_quantize_observed(
        self, x: torch.Tensor, spec: QuantSpec
    ) -> tuple[torch.Tensor, QParams | None, QuantSpec]:
        x_hat, step, spec = self._fake_quantize(x, spec)
        return x_hat, _step_qparams(step.detach()), spec

    def _fake_quantize(
        self, x: torch.Tensor, spec: QuantSpec
    ) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
        """x̂, the step it used and the spec on this observer's grid (the float path asks for
        x̂ only: no qparams built on every call)."""
        if not bool(self.initialised) and x.numel():
            self._initialise(x.detach(), spec)
        # A step pushed to or below zero by an update keeps its size (and its gradient).
        step, spec = self.step.abs().clamp_min(_F32.tiny), self.spec(spec)
        return quantize(x, spec, step=step), step, spec

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor, spec: QuantSpec) -> None:
        if self.auto:
            self.unsigned.fill_(bool(x.min() >= 0))
        spec = self.spec(spec)
        x3, _ = canonical_view(x, spec.granularity)
        if x3.shape[1] != self.step.numel() and self.step.numel() != 1:
            raise QuantSpecError(
                f"LSQStep holds {self.step.numel()} steps; {spec.granularity!r} gives "
                f"{x3.shape[1]} scales on this tensor"
            )
        mean_abs = x3.abs().mean(dim=(0, 2)) if self.step.numel() > 1 else x3.abs().mean()
        self.step.copy_(_safe_scale(2 * mean_abs / spec.int_format.qmax**0.5).view_as(self.step))
        self.initialised.fill_(True)

    def sync_tensors(self) -> list[torch.Tensor]:
        """The step too: each rank sets it from its own first batch (2·mean|x|/sqrt(Q_P));
        their mean is the step of the global batch. After that the ranks' updates agree."""
        return [*super().sync_tensors(), self.step]

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        """The learned step as the scale (zero point 0), for export; None before the first
        tensor has set it."""
        if not bool(self.initialised):
            return None
        return _step_qparams(self.step.detach().abs().clamp_min(_F32.tiny))

    def extra_repr(self) -> str:
        signed = "auto" if self.auto else not bool(self.unsigned)
        return f"channels={self.step.numel()}, signed={signed}"


def _step_qparams(step: torch.Tensor) -> QParams:
    """A learned step (its |step| floored at the smallest normal) as QParams: one scale per
    step, zero point 0."""
    step = step.reshape(-1)
    return QParams(step, torch.zeros_like(step))


class CalibratedRange(Observer):
    """A post-training quantizer's activation range, calibrated on a few batches (PTQ,
    METHODS.md §7; ``qtrain.ptq``).

    While ``calibrating`` it records every tensor (running min/max, and a random sample of at
    most ``max_samples`` values for the percentile and MSE searches) and lets the spec's rule
    quantize it; ``finish()`` then fixes ``low``/``high`` by ``method``
    (``qtrain.calibration.calibration_range``) and from then on every tensor, in training or
    eval, is quantized on that range. Per tensor only.

    >>> from qtrain import formats
    >>> observer = CalibratedRange("minmax")
    >>> observer.calibrating = True
    >>> spec = QuantSpec(formats.UINT8)
    >>> _ = observer.qparams(torch.tensor([0.0, 2.0]), spec)
    >>> _ = observer.qparams(torch.tensor([1.0, 4.0]), spec)
    >>> observer.finish()
    >>> observer.low, observer.high
    (tensor([0.]), tensor([4.]))
    """

    def __init__(
        self, method: str = "minmax", percentile: float = 99.99, max_samples: int = 2**20
    ) -> None:
        super().__init__()
        calibration_range(torch.zeros(1, 1), method, Int(8), percentile)  # checks the arguments
        check_int("CalibratedRange.max_samples", max_samples, QuantSpecError, low=1)
        self.method, self.percentile, self.max_samples = method, percentile, max_samples
        self.calibrating = False
        self.register_lazy_buffer("low")
        self.register_lazy_buffer("high")
        self._samples: list[torch.Tensor] = []
        self._int_format: Int | None = None

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        if self.calibrating:
            self._record(x.detach(), spec)
            return None
        if not self.low.numel():
            raise QuantSpecError(
                "CalibratedRange has no range yet: run calibration batches with calibrating "
                "= True, then finish() (qtrain.ptq calibrates)"
            )
        return qparams_of(self.low, self.high, spec.int_format)

    def _record(self, x: torch.Tensor, spec: QuantSpec) -> None:
        if not isinstance(spec.granularity, PerTensor):
            raise QuantSpecError(f"CalibratedRange is per tensor, got {spec.granularity!r}")
        values = x.reshape(-1).float()
        values = values[torch.isfinite(values)]
        if not values.numel():
            return
        low, high = values.min().view(1), values.max().view(1)
        if self.low.numel():
            low, high = torch.minimum(low, self.low), torch.maximum(high, self.high)
        self.low, self.high = low, high
        if values.numel() > self.max_samples:
            values = values[
                torch.randperm(values.numel(), device=values.device)[: self.max_samples]
            ]
        self._samples.append(values)
        self._int_format = spec.int_format

    def finish(self) -> None:
        """Fix the range from what calibration recorded; stop recording."""
        self.calibrating = False
        if not self._samples:
            raise QuantSpecError("CalibratedRange.finish: no tensor was recorded")
        if self.method != "minmax":
            samples = torch.cat(self._samples)
            if samples.numel() > self.max_samples:
                keep = torch.randperm(samples.numel(), device=samples.device)[: self.max_samples]
                samples = samples[keep]
            low, high = calibration_range(
                samples.view(1, -1), self.method, self._int_format, self.percentile
            )
            self.low, self.high = low, high
        self._samples = []

    def extra_repr(self) -> str:
        return f"method={self.method}, percentile={self.percentile:g}"


class FixedQParams(Observer):
    """Qparams fixed once, e.g. a post-training quantizer's weight scales
    (``FixedQParams.calibrated``): buffers ``scale`` and ``zero_point``, one per scale of the
    spec's granularity (canonical (C,) shapes)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().float().reshape(-1).clone())

    @classmethod
    def calibrated(
        cls, x: torch.Tensor, spec: QuantSpec, method: str = "minmax", percentile: float = 99.99
    ) -> FixedQParams:
        """The qparams ``method`` finds for ``x`` under ``spec``, one per scale (a row of
        ``canonical_view(x, spec.granularity)``)."""
        x3, _ = canonical_view(x.detach(), spec.granularity)
        rows = x3.transpose(0, 1).reshape(x3.shape[1], -1)
        low, high = calibration_range(rows, method, spec.int_format, percentile)
        qparams = qparams_of(low, high, spec.int_format)
        return cls(qparams.scale, qparams.zero_point)

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams | None:
        return QParams(self.scale, self.zero_point)


def observed_values(
    observers: dict[str, Observer], read: Callable[[Observer], torch.Tensor]
) -> dict[str, float]:
    """``{name: float(read(observer))}`` (a buffer's mean) in one host transfer (one device
    sync), e.g. each layer's d_c; a value not measured yet (negative, or an empty buffer) is
    left out.

    >>> observed_values({"fc": GradientClip()}, lambda o: o.distance)
    {}
    """
    values = {name: _mean_or_nan(read(observer)) for name, observer in observers.items()}
    if not values:
        return {}
    numbers = torch.stack(list(values.values())).tolist()
    return {name: x for name, x in zip(values, numbers, strict=True) if x >= 0}


def _mean_or_nan(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float()
    return values.mean() if values.numel() else values.new_full((), -1.0)
