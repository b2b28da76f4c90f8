"""`SparseConv3d`: a sparse 3D convolution layer holding a ``[K, C_in, C_out]`` weight."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparse3d.functional.conv import _LAYOUT_RULES, LayoutRule, sparse_conv3d, weight_from_dense
from sparse3d.functional.coords import _triple
from sparse3d.tensor import SparseTensor

__all__ = ["SparseConv3d"]


class SparseConv3d(nn.Module):
    """Sparse 3D convolution layer: submanifold (``stride=1``), strided, or transposed.

    See [`sparse_conv3d`][sparse3d.functional.conv.sparse_conv3d] for the exact semantics of each mode and
    the output layouts. The weight is ``[K, C_in, C_out]`` with ``K = kx * ky * kz`` in
    [`kernel_offsets`][sparse3d.functional.coords.kernel_offsets] order, initialised like ``nn.Conv3d``
    (kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
    ``fan_in = K * C_in``; the bias uses the same bound).

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: Kernel size, an int or 3 ints.
        stride: Stride, an int or 3 ints.
        dilation: Dilation, an int or 3 ints.
        bias: Learn an additive bias ``[C_out]``.
        transposed: Transposed (upsampling) convolution.
        layout_rule: Output voxels without ``out_layout``: ``"parents"`` (default: submanifold, parents of a
            downsample, children of a subdivide) or ``"reached"`` (every voxel the kernel reaches, as spconv's
            ``SparseConv3d``); see [`LayoutRule`][sparse3d.functional.conv.LayoutRule].

    Examples:
        >>> from sparse3d import SparseTensor
        >>> x = SparseTensor(torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2]]), torch.randn(2, 16))
        >>> conv = SparseConv3d(16, 32, kernel_size=3)
        >>> conv(x).feats.shape  # submanifold: same voxels, 32 channels
        torch.Size([2, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        transposed: bool = False,
        layout_rule: LayoutRule = "parents",
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels: expected >= 1, got {in_channels} and {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        if layout_rule not in _LAYOUT_RULES:
            raise ValueError(f"layout_rule: expected one of {_LAYOUT_RULES}, got {layout_rule!r}")
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        self.dilation = _triple(dilation, "dilation")
        self.transposed = transposed
        self.layout_rule = layout_rule
        num_k = math.prod(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(num_k, in_channels, out_channels))  # [K, C_in, C_out]
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises weight and bias like ``nn.Conv3d`` (``fan_in = K * C_in``)."""
        bound = 1.0 / math.sqrt(self.weight.shape[0] * self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv3d | nn.ConvTranspose3d, *, layout_rule: LayoutRule = "parents"
    ) -> SparseConv3d:
        """Builds a layer with the same weights as a dense ``nn.Conv3d`` / ``nn.ConvTranspose3d``.

        Padding is not copied: the sparse layer's padding is implied by its kernel offsets (the dense
        equivalent uses ``padding = dilation * ((size - 1) // 2)``).

        Args:
            conv: A dense convolution with ``groups == 1``.
            layout_rule: Output-layout rule of the new layer (``"reached"`` computes the dense convolution
                at every output voxel where its input window is not empty).

        Returns:
            A SparseConv3d on the same device and dtype.
        """
        if conv.groups != 1:
            raise ValueError(f"conv: expected groups=1, got {conv.groups}")
        transposed = isinstance(conv, nn.ConvTranspose3d)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            transposed=transposed,
            layout_rule=layout_rule,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight_from_dense(conv.weight, transposed=transposed))
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, input: SparseTensor, out_layout: SparseTensor | None = None) -> SparseTensor:
        """Applies the convolution.

        Args:
            input: SparseTensor with feats ``[N, C_in]``.
            out_layout: Optional output layout (e.g. the layout before a downsample, for a transposed
                convolution).

        Returns:
            SparseTensor with feats ``[M, C_out]``.
        """
        return sparse_conv3d(
            input,
            self.weight,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            transposed=self.transposed,
            out_layout=out_layout,
            layout_rule=self.layout_rule,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, transposed={self.transposed}, "
            f"layout_rule={self.layout_rule!r}"
        )
