"""Shared by both export formats: the format names and file suffixes, ``ExportError``, integer
packing (``pack_int``, ``unpack_int``) and the layer helpers that both the safetensors file
(``qtrain.export.safetensors_file``) and the ONNX graph (``qtrain.export.onnx_graph``) use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.ops import GemmConfig
from qtrain.protocol import QuantizedWeight, quantized_layers
from qtrain.train.config import RunError

FORMATS = ("safetensors", "onnx")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx"}


class ExportError(RunError):
    """A model cannot be exported as asked, or an exported file is damaged or not qtrain's."""


# ---- packing -------------------------------------------------------------------------------


def _field_bits(bits: int) -> int | None:
    """Bits of one packed field: 2 (four to a byte), 4 (two to a byte); None: not packed."""
    return 2 if bits <= 2 else 4 if bits <= 4 else None


def _storage_dtype(bits: int, signed: bool) -> torch.dtype:
    if not (isinstance(bits, int) and 1 <= bits <= 32):
        raise ValueError(f"bits must be an int in 1..32, got {bits!r}")
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed and bits <= 16 else torch.int32


def pack_int(levels: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer levels of ``bits`` bits (signed: two's complement, −2^(b−1)..2^(b−1) − 1;
    unsigned: 0..2^b − 1) as a flat tensor: up to 2 bits four to a byte, up to 4 bits two to a
    byte (uint8, the first value in the lowest bits, the last byte padded with zeros), wider
    ones one per element in the smallest dtype that holds them (``Int(bits,
    signed).storage_dtype``). ``unpack_int`` inverts it.

    >>> pack_int(torch.tensor([-1, 0, 1, 1, -1]), 2, signed=True)  # ternary: 4 per byte
    tensor([83,  3], dtype=torch.uint8)
    """
    dtype = _storage_dtype(bits, signed)
    flat = levels.reshape(-1)
    if flat.is_floating_point() or flat.is_complex() or flat.dtype == torch.bool:
        raise ValueError(f"pack_int: levels must be an integer tensor, got dtype {flat.dtype}")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"pack_int: levels span {int(flat.min())}..{int(flat.max())}, outside the {bits}-bit "
            f"{kind} range {low}..{high}"
        )
    width = _field_bits(bits)
    if width is None:
        return flat.to(dtype).contiguous()
    per_byte = 8 // width
    fields = (flat.to(torch.int32) & (2**width - 1)).to(torch.uint8)
    fields = F.pad(fields, (0, -fields.numel() % per_byte)).view(-1, per_byte)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=fields.device)
    return (fields << shifts).sum(1, dtype=torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, numel: int, signed: bool) -> torch.Tensor:
    """The ``numel`` levels that ``pack_int(levels, bits, signed)`` packed, flat, in the
    smallest dtype that holds them.

    >>> unpack_int(torch.tensor([83, 3], dtype=torch.uint8), 2, 5, signed=True)
    tensor([-1,  0,  1,  1, -1], dtype=torch.int8)
    """
    dtype = _storage_dtype(bits, signed)
    width = _field_bits(bits)
    flat = packed.reshape(-1)
    expected = numel if width is None else -(-numel // (8 // width))
    if flat.numel() != expected:
        raise ValueError(
            f"unpack_int: {numel} levels of {bits} bits take {expected} packed values, "
            f"got {flat.numel()}"
        )
    if width is None:
        return flat.to(dtype)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=flat.device)
    fields = ((flat.unsqueeze(1) >> shifts) & (2**width - 1)).reshape(-1)[:numel].to(torch.int16)
    if signed:  # sign-extend each two's complement field
        fields = torch.where(fields >= 2 ** (width - 1), fields - 2**width, fields)
    return fields.to(dtype)


def _packing(bits: int, signed: bool) -> str:
    width = _field_bits(bits)
    if width is None:
        return str(_storage_dtype(bits, signed)).removeprefix("torch.")
    return f"{8 // width} per byte"


# ---- layer helpers of both formats --------------------------------------------------------


def _gemm_config(layer: nn.Module) -> GemmConfig | None:
    """The GemmConfig a layer runs with, for the layers that take one (``set_config``):
    emulated and fake-quantized conv/linear layers; None for others (``LowPrecisionLinear``)."""
    config = getattr(layer, "config", None)
    return config if isinstance(config, GemmConfig) and hasattr(layer, "set_config") else None


def _require_integer_weights(
    model: nn.Module, what: str
) -> dict[str, tuple[nn.Module, QuantizedWeight]]:
    """{name: (layer, its integer weight)} of the quantized layers that have one (a float or
    non-integer weight is stored as it is, and quantized at load by its layer); refused when
    none has: a float model gains nothing."""
    found = {}
    for name, layer in quantized_layers(model):
        qweight = layer.quantized_weight()
        if qweight is not None:
            found[name] = (layer, qweight)
    if not found:
        raise ExportError(
            f"{what} has no layer with integer weights: nothing to export as integers (its "
            "layers compute in floating point, as fp32, amp and fp8 recipes train)"
        )
    return found


def _granularity(name: str, qweight: QuantizedWeight) -> str:
    """ "per_tensor" or "per_channel" (one scale per output channel, axis 0); other layouts
    (groups) are refused: ``QuantizedWeight.dequantize`` does not broadcast them."""
    shape, scale_shape = tuple(qweight.levels.shape), tuple(qweight.scale.shape)
    if qweight.scale.numel() == 1:
        return "per_tensor"
    if shape and scale_shape == (shape[0],) + (1,) * (len(shape) - 1):
        return "per_channel"
    raise ExportError(
        f"layer {name!r}: a weight of shape {list(shape)} with scales of shape "
        f"{list(scale_shape)} is neither per tensor nor per output channel; export supports those"
    )
