"""Attention modules on SparseTensors: full or windowed self-attention, cross-attention to dense tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.functional.attention import (
    cross_attention,
    varlen_attention,
    window_partition,
    windowed_attention,
)
from sparse3d.functional.norm import _compute_dtype
from sparse3d.tensor import SparseTensor

__all__ = ["RopeHook", "SparseCrossAttention", "SparseSelfAttention"]

RopeHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``rope(query [N, H, D], key [N, H, D]) -> (query, key)``: rotates queries and keys before attention."""


def _head_rms_norm(tokens: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """RMS norm over the head dim, computed in the wider of the input's dtype and float32, returned in the
    input dtype."""
    compute = _compute_dtype(tokens.dtype)
    weight = None if norm.weight is None else norm.weight.to(compute)
    return F.rms_norm(tokens.to(compute), norm.normalized_shape, weight, norm.eps).to(tokens.dtype)


def _max_length(x: SparseTensor) -> int:
    """Longest sample of ``x`` (one host sync, cached on the layout)."""
    return x.cached("max_sample_length", lambda: int(x.offsets.diff().max()))


class SparseSelfAttention(nn.Module):
    r"""Multi-head self-attention within each sample of a SparseTensor, optionally in swin windows.

    ``x [N, dim] -> qkv [N, 3, H, D] -> (RMS qk-norm) -> (rope) -> attention -> out projection``.
    Without ``window`` every voxel attends to all voxels of its sample
    ([`varlen_attention`][sparse3d.functional.attention.varlen_attention]); with ``window`` only to the
    voxels of its window cell ([`windowed_attention`][sparse3d.functional.attention.windowed_attention]).
    Layout-derived data (the window partition, the longest sample) is cached on the input's layout.

    Args:
        dim: Feature width ``C`` (``= H * D``).
        num_heads: Number of heads ``H``.
        qk_norm: RMS-normalise queries and keys per head (learnable ``[D]`` scale, float32 or wider math).
        window: Window size (int or 3 ints) for windowed attention; ``None`` for full attention.
        shift: Shift the windows by half a window (odd swin blocks).
        qkv_bias: Bias in the qkv projection.
        backend: Attention backend passed to the functional op (``None`` chooses automatically).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_norm: bool = True,
        window: int | Sequence[int] | None = None,
        shift: bool = False,
        qkv_bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if shift and window is None:
            raise ValueError("shift: expected False without a window, got True")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.shift = shift
        self.backend = backend
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.query_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.key_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor, rope: RopeHook | None = None) -> SparseTensor:
        """Attends within each sample (or window).

        Args:
            x: SparseTensor with feats ``[N, dim]``.
            rope: Optional hook ``rope(query, key) -> (query, key)`` on ``[N, H, D]`` tensors.

        Returns:
            SparseTensor with the same layout and feats ``[N, dim]``.
        """
        if x.feats.dim() != 2 or x.feats.shape[1] != self.dim:
            raise ValueError(f"x: expected feats [N, {self.dim}], got {list(x.feats.shape)}")
        num = x.num_voxels
        qkv = self.to_qkv(x.feats).view(num, 3, self.num_heads, self.head_dim)  # [N, 3, H, D]
        query, key, value = qkv.unbind(dim=1)  # each [N, H, D]
        if self.query_norm is not None:
            query = _head_rms_norm(query, self.query_norm)
            key = _head_rms_norm(key, self.key_norm)
        if rope is not None:
            query, key = rope(query, key)
            query, key = query.to(value.dtype), key.to(value.dtype)
        if self.window is None:
            longest = _max_length(x)
            out = varlen_attention(
                query,
                key,
                value,
                x.offsets,
                x.offsets,
                backend=self.backend,
                max_seqlen_q=longest,
                max_seqlen_kv=longest,
            )  # [N, H, D]
        else:
            partition = x.cached(
                ("window_partition", self.window, self.shift),
                lambda: window_partition(x.coords, self.window, shift=self.shift),
            )
            out = windowed_attention(
                query,
                key,
                value,
                x.coords,
                self.window,
                shift=self.shift,
                backend=self.backend,
                partition=partition,
            )  # [N, H, D]
        return x.replace(self.to_out(out.reshape(num, self.dim)))  # [N, dim]


class SparseCrossAttention(nn.Module):
    r"""Cross-attention from the voxels of each sample to that sample's dense condition tokens.

    ``x [N, dim] -> query [N, H, D]``; ``context [B, L, context_dim] -> key, value [B, L, H, D]``;
    [`cross_attention`][sparse3d.functional.attention.cross_attention]; out projection.

    Args:
        dim: Voxel feature width ``C`` (``= H * D``).
        context_dim: Condition token width.
        num_heads: Number of heads ``H``.
        qk_norm: RMS-normalise queries and keys per head.
        backend: Attention backend passed to the functional op (``None`` chooses automatically).
    """

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, *, qk_norm: bool = False, backend: str | None = None
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        self.dim = dim
        self.context_dim = context_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.to_query = nn.Linear(dim, dim)
        self.to_key_value = nn.Linear(context_dim, 2 * dim)
        self.query_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.key_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: SparseTensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> SparseTensor:
        """Attends from voxels to condition tokens.

        Args:
            x: SparseTensor with feats ``[N, dim]`` and ``B`` samples.
            context: Condition tokens ``[B, L, context_dim]``.
            context_mask: Optional bool ``[B, L]``, True for real tokens (False = padding, ignored).

        Returns:
            SparseTensor with the same layout and feats ``[N, dim]``.
        """
        if x.feats.dim() != 2 or x.feats.shape[1] != self.dim:
            raise ValueError(f"x: expected feats [N, {self.dim}], got {list(x.feats.shape)}")
        if context.dim() != 3 or context.shape[0] != x.batch_size or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context: expected [B, L, context_dim] = [{x.batch_size}, L, {self.context_dim}], got "
                f"{list(context.shape)}"
            )
        num, (batch, length) = x.num_voxels, context.shape[:2]
        query = self.to_query(x.feats).view(num, self.num_heads, self.head_dim)  # [N, H, D]
        key_value = self.to_key_value(context).view(batch, length, 2, self.num_heads, self.head_dim)
        key, value = key_value.unbind(dim=2)  # each [B, L, H, D]
        if self.query_norm is not None:
            query = _head_rms_norm(query, self.query_norm)
            key = _head_rms_norm(key, self.key_norm)
        out = cross_attention(
            query,
            x.offsets,
            key,
            value,
            key_padding_mask=context_mask,
            backend=self.backend,
            max_seqlen_q=_max_length(x),
        )  # [N, H, D]
        return x.replace(self.to_out(out.reshape(num, self.dim)))  # [N, dim]
