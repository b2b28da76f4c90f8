"""Thin modules over the pooling ops: downsample, upsample, patchify/unpatchify, subdivide."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparse3d.functional.pooling import PoolReduce, downsample, patchify, subdivide, unpatchify, upsample
from sparse3d.tensor import SparseTensor

__all__ = ["SparseDownsample", "SparseUpsample", "SparsePatchify", "SparseUnpatchify", "SparseSubdivide"]


class SparseDownsample(nn.Module):
    """Pools each occupied block into its parent ([`downsample`][sparse3d.functional.pooling.downsample]).

    The child->parent map is memoised on the input's layout, so a later
    [`SparseUpsample`][sparse3d.nn.pooling.SparseUpsample] back onto that layout needs no lookup.

    Args:
        factor: Pooling factor, an int or one per axis.
        reduce: ``"mean"``, ``"amax"`` or ``"sum"`` over the occupied children.
    """

    def __init__(self, factor: int | Sequence[int] = 2, reduce: PoolReduce = "mean") -> None:
        super().__init__()
        self.factor = factor
        self.reduce = reduce

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Feats ``[N, ...]`` -> coarse feats ``[M, ...]``."""
        return downsample(x, self.factor, self.reduce)[0]

    def extra_repr(self) -> str:
        return f"factor={self.factor}, reduce={self.reduce!r}"


class SparseUpsample(nn.Module):
    """Nearest upsampling onto a given fine layout ([`upsample`][sparse3d.functional.pooling.upsample])."""

    def forward(self, coarse: SparseTensor, fine: SparseTensor) -> SparseTensor:
        """Coarse feats ``[M, ...]`` -> feats ``[N, ...]`` on ``fine``'s layout."""
        return upsample(coarse, fine)


class SparsePatchify(nn.Module):
    """Structured patchification ([`patchify`][sparse3d.functional.pooling.patchify]); drops the mask.

    Args:
        factor: Block size, an int or one per axis.
    """

    def __init__(self, factor: int | Sequence[int] = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Feats ``[N, C]`` -> token feats ``[M, F * C]``."""
        return patchify(x, self.factor)[0]

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class SparseUnpatchify(nn.Module):
    """Inverse of [`SparsePatchify`][sparse3d.nn.pooling.SparsePatchify] onto the fine layout."""

    def forward(self, tokens: SparseTensor, fine: SparseTensor) -> SparseTensor:
        """Token feats ``[M, F * C]`` -> feats ``[N, C]`` on ``fine``'s layout."""
        return unpatchify(tokens, fine)


class SparseSubdivide(nn.Module):
    """Splits each voxel into its children ([`subdivide`][sparse3d.functional.pooling.subdivide]).

    Args:
        factor: Refinement factor, an int or one per axis.
    """

    def __init__(self, factor: int | Sequence[int] = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Feats ``[N, ...]`` -> feats ``[N * F, ...]`` at ``stride / factor``."""
        return subdivide(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
