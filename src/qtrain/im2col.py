"""A 2-D convolution as matrix products on its im2col matrix: the geometry, the unfolding of x
into one receptive field per row (and its adjoint, the fold), W's matching rows, and groups.

Shared by ``qtrain.lowp_conv`` (``LowPrecisionConv2d``: int8/fp8 GEMMs with per-row scales) and
``qtrain.int_products`` (exact integer products of ``qtrain.ops``' quantized convolutions). On
the CPU, without groups, cpu_fused's channels-last kernels build the matrix with (kh, kw, c)
columns; elsewhere ``F.unfold``/``F.fold`` with (c, kh, kw) columns — ``weight_rows`` orders W's
columns to match either way.

>>> import torch
>>> g = ConvGeometry(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
>>> im2col(torch.randn(2, 4, 5, 5), g, None).shape
torch.Size([50, 36])
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

from qtrain import kernels


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's shape parameters, zero padding explicit (hashable: a Function arg)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def args(self) -> tuple[tuple[int, int], ...]:
        """(kernel, stride, padding, dilation): the cpu_fused conv kernels' geometry arguments."""
        return self.kernel, self.stride, self.padding, self.dilation

    def pointwise(self) -> bool:
        """A 1×1 convolution with stride 1 and no padding: x's pixels are the rows, no im2col."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(
                (height, width), self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )


def fused_unfolding(x: torch.Tensor, geometry: ConvGeometry) -> types.ModuleType | None:
    """cpu_fused, where its channels-last im2col/col2im serve (the kernels' backend gives
    them, a float32 CPU x, no groups, not a pointwise conv): their matrix is ordered
    (kh, kw, c) per row, one copy of C floats per kernel offset, not F.unfold's (c, kh, kw)."""
    if geometry.groups != 1 or geometry.pointwise():
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    impl = kernels.implementation(x.device)
    return impl if hasattr(impl, "im2col_nhwc") else None


def im2col(x: torch.Tensor, geometry: ConvGeometry, fused: types.ModuleType | None) -> torch.Tensor:
    """x (B, C, H, W) as the (B·H'·W', C·kh·kw) matrix whose rows are the receptive fields:
    columns (c, kh, kw) as F.unfold orders them, or (kh, kw, c) from ``fused`` (then
    ``weight_rows`` orders W's rows so too); a view of channels-last x for 1×1 convs."""
    if geometry.pointwise():
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if fused is not None:
        g = geometry
        return fused.im2col_nhwc(x, g.kernel, g.stride, g.padding, g.dilation)
    cols = F.unfold(x, geometry.kernel, geometry.dilation, geometry.padding, geometry.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def col2im(
    grad_cols: torch.Tensor,
    x_shape: torch.Size,
    geometry: ConvGeometry,
    fused: types.ModuleType | None,
) -> torch.Tensor:
    """The gradient of x from that of its im2col matrix (overlapping fields summed)."""
    batch, channels, height, width = x_shape
    if geometry.pointwise():
        return grad_cols.view(batch, height, width, channels).permute(0, 3, 1, 2)
    g = geometry
    if fused is not None:
        return fused.col2im_nhwc(
            grad_cols, list(x_shape), g.kernel, g.stride, g.padding, g.dilation
        )
    grad = grad_cols.view(batch, -1, grad_cols.shape[1]).transpose(1, 2)
    return F.fold(grad, (height, width), g.kernel, g.dilation, g.padding, g.stride)


def weight_rows(weight: torch.Tensor, fused: types.ModuleType | None) -> torch.Tensor:
    """W (C_out, C, kh, kw) as rows in the im2col matrix's column order."""
    if fused is not None:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(weight.shape[0], -1)


def weight_grad(grad_rows: torch.Tensor, weight: torch.Tensor, fused) -> torch.Tensor:
    """The gradient of W from that of ``weight_rows(W)``."""
    if fused is None:
        return grad_rows.view(weight.shape)
    out_channels, channels, kh, kw = weight.shape
    return grad_rows.view(out_channels, kh, kw, channels).permute(0, 3, 1, 2).contiguous()


def cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat without its copy for one part (a convolution without groups)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def group_slices(total: int, groups: int) -> list[slice]:
    size = total // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def pieces(
    total: int, unit: int, unit_bytes: int, budget: int, most: int | None = None
) -> list[slice]:
    """[0, total) as slices of whole units (``unit`` rows of ``unit_bytes`` bytes each) of about
    ``budget`` bytes, at most ``most`` rows: the pieces a product runs in, so that each piece's
    operands and result stay in cache and a loop of them reuses memory."""
    units = max(1, budget // max(1, unit_bytes))
    if most is not None:
        units = max(1, min(units, most // unit))
    step = units * unit
    return [slice(start, min(total, start + step)) for start in range(0, total, step)]
