"""Kernel backends for the quantizer's primitives.

A backend implements the functions of ``qtrain.kernels.reference`` (same names, same
signatures, same results — bit-exact for nearest rounding and for stochastic rounding with the
same seed; Range BN's sums within float32 summation error of the reference's float64).
``Backend.AUTO`` picks the fastest one available for the tensor's device.

>>> from qtrain.kernels import Backend, use_backend
>>> with use_backend(Backend.REFERENCE):
...     pass
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections.abc import Callable, Iterator

import torch

from qtrain.kernels import reference


class Backend(enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CPU_FUSED = "cpu_fused"
    TRITON = "triton"


# Backend -> loader returning the implementing module, or None when unavailable here.
_LOADERS: dict[Backend, Callable[[], types.ModuleType | None]] = {
    Backend.REFERENCE: lambda: reference,
}
# Device type -> backends AUTO tries, fastest first.
_AUTO_ORDER: dict[str, list[Backend]] = {"cpu": [Backend.REFERENCE]}

_current = Backend.AUTO


def register_backend(
    backend: Backend, loader: Callable[[], types.ModuleType | None], devices: list[str]
) -> None:
    """Make ``backend`` available and preferred by AUTO on ``devices`` (first registered wins)."""
    _LOADERS[backend] = loader
    for device in devices:
        order = _AUTO_ORDER.setdefault(device, [Backend.REFERENCE])
        order.insert(0, backend)


def parse_backend(value: Backend | str) -> Backend:
    if isinstance(value, Backend):
        return value
    try:
        return Backend(value)
    except ValueError:
        allowed = ", ".join(b.value for b in Backend)
        raise ValueError(f"backend must be one of {allowed}; got {value!r}") from None


def set_backend(backend: Backend | str) -> None:
    """Choose the backend globally."""
    global _current
    _current = parse_backend(backend)


def get_backend() -> Backend:
    return _current


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[None]:
    """Choose the backend inside a ``with`` block."""
    global _current
    previous, _current = _current, parse_backend(backend)
    try:
        yield
    finally:
        _current = previous


def implementation(device: torch.device, backend: Backend | str | None = None) -> types.ModuleType:
    """The module implementing the primitives for ``device`` under ``backend`` (or the current)."""
    chosen = parse_backend(backend) if backend is not None else _current
    if chosen is Backend.AUTO:
        for candidate in _AUTO_ORDER.get(device.type, [Backend.REFERENCE]):
            module = _LOADERS[candidate]()
            if module is not None:
                return module
        return reference
    loader = _LOADERS.get(chosen)
    module = loader() if loader is not None else None
    if module is None:
        raise RuntimeError(f"backend {chosen.value!r} is not available on this machine")
    return module


def is_dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill their memory span once, each dimension's stride the product of
    the sizes of those inside it (contiguous in some order of the dims: contiguous,
    channels_last, a permutation of either). Such a tensor's memory, read in order, is a
    permutation of its values, which element-wise kernels may walk as a flat array."""
    expected = 1
    for size, stride in sorted(
        ((size, stride) for size, stride in zip(x.shape, x.stride(), strict=True) if size != 1),
        key=lambda pair: pair[1],
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def with_strides(x: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """x laid out with ``strides`` (dense for x's shape): x itself where it already is, else a
    copy."""
    if x.stride() == tuple(strides):
        return x
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device).copy_(x)


# Importing a backend module registers it; nothing is built or imported until first use.
from qtrain.kernels import cpu_fused, triton_quant  # noqa: E402, F401
