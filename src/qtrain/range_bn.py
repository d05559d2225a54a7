"""Range BatchNorm (Banner et al. 2018): normalise each channel by a chunked range, not the std.

``RangeBatchNorm2d`` subclasses ``nn.BatchNorm2d`` and keeps its parameters, buffers and
state_dict keys, so BN weights load into it; its training forward and backward run on the
kernel backend (``range_bn_stats``, ``channel_affine``, ``range_bn_backward``). ``qtrain.nn``
re-exports the public names.

>>> import torch
>>> bn = RangeBatchNorm2d(3)
>>> bn(torch.randn(4, 3, 5, 5)).shape
torch.Size([4, 3, 5, 5])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtrain import kernels
from qtrain.observers import Observer
from qtrain.ops import quantize_grad
from qtrain.quantizer import QuantSpec, QuantSpecError, quantize
from qtrain.validation import check_int, check_type, matches, refuse

SPREADS = ("range", "mean_abs")  # RangeBatchNorm2d's spread estimates


def range_bn_constant(chunk_size: int) -> float:
    """C(n) of Banner et al.'s code: 0.5·0.35·(1 + sqrt(π·ln 4)) / sqrt(2·ln n)."""
    return 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(chunk_size))


class RangeBatchNorm2d(nn.BatchNorm2d):
    """Range BatchNorm (Banner et al. 2018): normalise by C(n)·range instead of the std.

    Per channel the B·H·W centred values are split into ``num_chunks`` chunks; range = mean of
    chunk maxima − mean of chunk minima; y = (x − μ)/(C(n)·range + eps)·γ + β, n = chunk size.
    ``constant`` replaces C(n) when given; ``constant_scale`` multiplies it (C(n) assumes
    independent Gaussian values: on a network's activations C(n)·range is off by a factor,
    docs/RESULTS.md, issue 15). ``spread="mean_abs"`` normalises by c·mean|x − μ| instead,
    c = sqrt(π/2) (σ for Gaussian values; ``constant`` and ``constant_scale`` apply to c):
    still no squares or square roots, but every value takes part in the spread and its
    gradient, where the range reads 2·K extremes per channel. The running "variance" stores
    the spread squared, so the state_dict keys and their meaning are those of
    ``nn.BatchNorm2d`` and BN weights load; ``momentum`` is torch's (the weight of the new
    batch).

    Optional ``input_spec`` fake-quantizes the input (straight-through), with the qparams of
    ``input_observer`` where given (e.g. ``RunningMinMax``: a MinMax spec's running range in
    eval, as the GEMM layers' inputs); ``grad_spec`` quantizes the gradient that reaches the
    normalisation (SBM runs both at 8 bits). ``fused_relu`` applies a ReLU to the output in
    the same pass (its backward mask is all the pair keeps besides the input); ``quantize_``
    sets it where a ReLU follows in a Sequential, whose ReLU then becomes a ``FusedReLU``
    pass-through. With both, the gradient is quantized after the ReLU's mask, where an unfused
    pair would quantize it: at the normalisation's output.
    """

    fused_relu: bool = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        num_chunks: int = 16,
        constant: float | None = None,
        constant_scale: float = 1.0,
        spread: str = "range",
        input_spec: QuantSpec | None = None,
        grad_spec: QuantSpec | None = None,
        input_observer: Observer | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_int("RangeBatchNorm2d.num_chunks", num_chunks, QuantSpecError, low=1)
        if constant is not None and not (matches(constant, float) and 0 < constant < math.inf):
            refuse(
                "RangeBatchNorm2d.constant", constant, "a finite number > 0 or None", QuantSpecError
            )
        if not (matches(constant_scale, float) and 0 < constant_scale < math.inf):
            refuse(
                "RangeBatchNorm2d.constant_scale",
                constant_scale,
                "a finite number > 0",
                QuantSpecError,
            )
        if spread not in SPREADS:
            refuse("RangeBatchNorm2d.spread", spread, f"one of {SPREADS}", QuantSpecError)
        for name, spec in (("input_spec", input_spec), ("grad_spec", grad_spec)):
            check_type(f"RangeBatchNorm2d.{name}", spec, QuantSpec | None, QuantSpecError)
        check_type(
            "RangeBatchNorm2d.input_observer", input_observer, Observer | None, QuantSpecError
        )
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.num_chunks = num_chunks
        self.constant = constant
        self.constant_scale = float(constant_scale)
        self.spread = spread
        self.input_spec = input_spec
        self.grad_spec = grad_spec
        # State_dict keys as a GEMM layer's: observers.input.*
        self.observers = nn.ModuleDict({} if input_observer is None else {"input": input_observer})

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, momentum: float | None = None, **kwargs: Any
    ) -> RangeBatchNorm2d:
        """A RangeBatchNorm2d sharing ``bn``'s parameters and buffers (``momentum``: None
        keeps ``bn``'s, torch's 0.1 where ``bn`` has none)."""
        if momentum is None:
            momentum = bn.momentum if bn.momentum is not None else 0.1
        new = cls(
            bn.num_features,
            bn.eps,
            momentum,
            bn.affine,
            device=bn.running_mean.device,
            **kwargs,
        )
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        return new.train(bn.training)

    def _chunks(self, x: torch.Tensor) -> int:
        per_channel = x[:, 0].numel()
        if per_channel < 2:
            raise ValueError("RangeBatchNorm2d needs at least 2 values per channel in training")
        return min(self.num_chunks, per_channel // 2)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean, chunked range and chunk size of a float32 (N, C, H, W) batch.

        The authors' chunks split each channel's B·H·W values, laid out sample by sample, into
        ``num_chunks`` equal runs; when the batch divides evenly a chunk is a group of whole
        samples, so the range reads x in place. The range is shift invariant, so centring by μ
        is not needed for it. Differentiable torch ops: the plain definition that training's
        fused ``_RangeNorm`` is tested against.
        """
        batch, channels = x.shape[:2]
        chunks = self._chunks(x)
        chunk_size = x[:, 0].numel() // chunks
        mean = x.mean(dim=(0, 2, 3))
        if batch % chunks == 0:
            pieces = x.reshape(chunks, batch // chunks, channels, -1)  # (chunks, B/chunks, C, HW)
            highs, lows = pieces.amax(dim=(1, 3)), pieces.amin(dim=(1, 3))  # (chunks, C)
            return mean, highs.mean(0) - lows.mean(0), chunk_size
        flat = x.transpose(0, 1).reshape(channels, -1)[:, : chunks * chunk_size]  # (C, B·H·W)
        pieces = flat.reshape(channels, chunks, chunk_size)
        return mean, pieces.amax(2).mean(1) - pieces.amin(2).mean(1), chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"RangeBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        if self.input_spec is not None:
            qparams = None
            if "input" in self.observers:
                qparams = self.observers["input"].qparams(x, self.input_spec)
            x = quantize(x, self.input_spec, qparams=qparams)
        if self.training:
            x = x.float()  # statistics in float32 whatever the input dtype (autocast: bf16/fp16)
            chunks = self._chunks(x)  # also checks there are 2 values per channel
            if self.spread == "range":
                constant = self.constant or range_bn_constant(x[:, 0].numel() // chunks)
                norm, args = _RangeNorm, (chunks,)
            else:
                constant = self.constant or math.sqrt(math.pi / 2)
                norm, args = _MeanAbsNorm, ()
            y, mean, spread = norm.apply(
                x,
                self.weight,
                self.bias,
                *args,
                constant * self.constant_scale,
                self.eps,
                self.fused_relu,
                self.grad_spec,
            )
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(spread.detach() ** 2, self.momentum)
            return y
        spread = self.running_var.sqrt()
        y = _affine(x, self.running_mean, spread, self.weight, self.bias, self.eps)
        if self.fused_relu:
            y = torch.relu(y)
        return quantize_grad(y, self.grad_spec)


def _affine_params(mean, spread, weight, bias, eps):
    """Per-channel (scale, shift) with (x − μ)/(spread + eps)·γ + β = x·scale + shift."""
    scale = 1.0 / (spread + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _affine(x, mean, spread, weight, bias, eps):
    """(x − μ)/(spread + eps)·γ + β per channel, as one multiply-add over x (autograd)."""
    scale, shift = _affine_params(mean, spread, weight, bias, eps)
    return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])


class _RangeNorm(torch.autograd.Function):
    """Range BN's training forward and backward (x: float32 (B, C, H, W)) on the kernel
    backend's ``range_bn_stats`` / ``channel_affine`` / ``range_bn_backward``: one read of x for
    all statistics, one pass for y; backward one read of g and x, one pass for grad_x.

    Chunks as the authors': each channel's B·H·W values, sample by sample, cut into K runs of
    n = ⌊B·H·W/K⌋ (a run may split a sample; the remainder is in no run but in the mean).
    y = (x − μ)·s·γ + β with s = 1/(C(n)·r + eps), r = mean_k max_k − mean_k min_k. Backward:
    ∂L/∂μ spreads evenly over the channel; ∂L/∂r = −C·γ·s²·Σg·(x − μ) goes to each run's max
    (+1/K) and min (−1/K) position, found in the forward. Where a run's extreme is tied, its
    first position takes it: a valid subgradient (autograd's amax would split it evenly).
    ``grad_spec`` quantizes the gradient of the normalisation's output (after a fused ReLU's
    mask) before it enters the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunks, constant, eps, relu, grad_spec):  # type: ignore[override]
        batch, channels = x.shape[:2]
        x3 = x.reshape(batch, channels, -1)
        impl = kernels.implementation(x.device)
        sums, rest, highs, high_index, lows, low_index = impl.range_bn_stats(x3, chunks)
        c = constant
        mean = ((sums.sum(0) + rest) / x3[:, 0].numel()).float()
        spread = (highs.mean(0) - lows.mean(0)) * c
        scale, shift = _affine_params(mean, spread, weight, bias, eps)
        if relu:  # a fused ReLU: y and its backward mask in the one pass
            y, zeroed = impl.channel_affine_relu(x, scale, shift)
        else:
            y, zeroed = impl.channel_affine(x, scale, shift), None
        ctx.save_for_backward(x, weight, high_index, low_index, mean, spread, zeroed)
        ctx.constant, ctx.eps, ctx.grad_spec = c, eps, grad_spec
        ctx.mark_non_differentiable(mean, spread)
        return y, mean, spread

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_spread):  # type: ignore[override]
        x, weight, high_index, low_index, mean, spread, zeroed = ctx.saved_tensors
        s = 1.0 / (spread + ctx.eps)
        gamma = weight if weight is not None else torch.ones_like(s)
        batch, channels = x.shape[:2]
        impl = kernels.implementation(x.device)
        grad, zeroed = _incoming_grad(grad, zeroed, ctx.grad_spec)
        grad_x, grad_gamma, grad_beta = impl.range_bn_backward(
            grad.reshape(batch, channels, -1),
            x.reshape(batch, channels, -1),
            mean,
            s,
            gamma.detach().float(),
            ctx.constant,
            high_index,
            low_index,
            zeroed,
        )
        grads_affine = (grad_gamma, grad_beta) if weight is not None else (None, None)
        return grad_x.view(x.shape), *grads_affine, None, None, None, None, None


def _incoming_grad(
    grad: torch.Tensor, zeroed: torch.Tensor | None, grad_spec: QuantSpec | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient a normalisation's backward starts from, float32: with ``grad_spec``, a
    fused ReLU's mask applied first (the gradient the normalisation receives), then
    quantized; the mask still to apply (None once applied)."""
    grad = grad.float()
    if grad_spec is None:
        return grad, zeroed
    if zeroed is not None:
        grad = kernels.implementation(grad.device).masked_zero(grad, zeroed)
    return quantize(grad, grad_spec), None


class _MeanAbsNorm(torch.autograd.Function):
    """The ``spread="mean_abs"`` normalisation's training forward and backward (x: float32
    (B, C, H, W)): y = (x − μ)·s·γ + β, s = 1/(c·m + eps), m = mean|x − μ| per channel.

    Backward, with n values per channel, g the incoming gradient and ∂L/∂m = −c·γ·s²·Σg·(x − μ):
    grad_x = γs·(g − Σg/n) + ∂L/∂m/n·(sign(x − μ) − Σsign/n) (the second term is m's own
    derivative with μ's through it); grad_gamma = s·Σg·(x − μ), grad_beta = Σg.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, constant, eps, relu, grad_spec):  # type: ignore[override]
        impl = kernels.implementation(x.device)
        mean = x.mean(dim=(0, 2, 3))
        spread = (x - mean.view(1, -1, 1, 1)).abs_().mean(dim=(0, 2, 3)) * constant
        scale, shift = _affine_params(mean, spread, weight, bias, eps)
        if relu:
            y, zeroed = impl.channel_affine_relu(x, scale, shift)
        else:
            y, zeroed = impl.channel_affine(x, scale, shift), None
        ctx.save_for_backward(x, weight, mean, spread, zeroed)
        ctx.constant, ctx.eps, ctx.grad_spec = constant, eps, grad_spec
        ctx.mark_non_differentiable(mean, spread)
        return y, mean, spread

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_spread):  # type: ignore[override]
        x, weight, mean, spread, zeroed = ctx.saved_tensors
        grad, zeroed = _incoming_grad(grad, zeroed, ctx.grad_spec)
        if zeroed is not None:
            grad = kernels.implementation(grad.device).masked_zero(grad, zeroed)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        n = x[:, 0].numel()
        s = 1.0 / (spread + ctx.eps)
        gamma = weight.detach().float() if weight is not None else torch.ones_like(s)
        centred = x - mean.view(shape)
        sum_g = grad.sum(dim=dims, dtype=torch.float64)
        sum_gx = (grad * centred).sum(dim=dims, dtype=torch.float64)
        sign = centred.sign_()
        sum_sign = sign.sum(dim=dims, dtype=torch.float64)
        slope = (gamma * s).double()
        grad_m = -ctx.constant * slope * s.double() * sum_gx
        grad_x = grad * slope.float().view(shape) + (-slope * sum_g / n).float().view(shape)
        grad_x += (sign - (sum_sign / n).float().view(shape)) * (grad_m / n).float().view(shape)
        affine = (
            ((sum_gx * s.double()).float(), sum_g.float()) if weight is not None else (None, None)
        )
        return grad_x, *affine, None, None, None, None
