"""Normalisation modules on SparseTensor, mirroring ``torch.nn`` (affine parameters, ``eps``)."""

from __future__ import annotations

import torch
from torch import nn

from sparse3d.functional.norm import group_norm, instance_norm, layer_norm
from sparse3d.tensor import SparseTensor

__all__ = ["SparseLayerNorm", "SparseGroupNorm", "SparseInstanceNorm"]


def _parameter(enabled: bool, value: float, num_channels: int, factory: dict) -> nn.Parameter | None:
    """A ``[C]`` parameter filled with ``value``, or None when disabled."""
    return nn.Parameter(torch.full((num_channels,), value, **factory)) if enabled else None


class SparseLayerNorm(nn.Module):
    """Per-voxel layer norm over the channels (``nn.LayerNorm`` on ``x.feats``), stats in float32.

    Args:
        num_channels: Channel count ``C``.
        eps: Added to the variance.
        elementwise_affine: Learn a per-channel scale (initialised to 1).
        bias: Learn a per-channel shift (initialised to 0); only with ``elementwise_affine``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", _parameter(elementwise_affine, 1.0, num_channels, factory))
        self.register_parameter("bias", _parameter(elementwise_affine and bias, 0.0, num_channels, factory))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Normalises ``x.feats`` ``[N, ..., C]`` per voxel; returns the same layout."""
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class SparseGroupNorm(nn.Module):
    """Group norm with statistics per (sample, group) over all voxels of the sample, in float32.

    Args:
        num_groups: Number of channel groups ``G``; must divide ``num_channels``.
        num_channels: Channel count ``C``.
        eps: Added to the variance.
        affine: Learn a per-channel scale (1) and shift (0).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_groups: expected a divisor of num_channels={num_channels}, got {num_groups}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", _parameter(affine, 1.0, num_channels, factory))
        self.register_parameter("bias", _parameter(affine, 0.0, num_channels, factory))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Normalises ``x.feats`` ``[N, C]`` per sample and group; returns the same layout."""
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class SparseInstanceNorm(nn.Module):
    """Instance norm: per (sample, channel) statistics over the sample's voxels, in float32.

    Args:
        num_channels: Channel count ``C``.
        eps: Added to the variance.
        affine: Learn a per-channel scale (1) and shift (0); off by default, as ``nn.InstanceNorm3d``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", _parameter(affine, 1.0, num_channels, factory))
        self.register_parameter("bias", _parameter(affine, 0.0, num_channels, factory))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Normalises ``x.feats`` ``[N, C]`` per sample and channel; returns the same layout."""
        return instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"
