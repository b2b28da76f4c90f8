"""Normalisation of sparse features: per-voxel layer norm and per-sample group / instance norm.

Statistics are computed in at least float32 (float32 for bf16/fp16, float64 for float64); the
result is cast back to the input dtype.
Per-sample statistics use sorted segment reductions over the packed rows: no padding, no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse3d.functional.coords import segment_reduce
from sparse3d.tensor import SparseTensor

__all__ = ["layer_norm", "group_norm", "instance_norm"]


class _SegmentSum(torch.autograd.Function):
    """Sums consecutive row segments; backward broadcasts (a gather, deterministic)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, lengths: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lengths, batch_index)
        return segment_reduce(values, lengths, "sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        lengths, batch_index = ctx.saved_tensors
        return _SegmentBroadcast.apply(grad, lengths, batch_index), None, None


class _SegmentBroadcast(torch.autograd.Function):
    """Copies each segment's value to its rows; backward is a sorted segment sum (no atomic scatter)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, lengths: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lengths, batch_index)
        return values.index_select(0, batch_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        lengths, batch_index = ctx.saved_tensors
        return _SegmentSum.apply(grad, lengths, batch_index), None, None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for reduced-precision (and integer) inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _check_affine(tensor: torch.Tensor | None, channels: int, name: str) -> None:
    if tensor is not None and tuple(tensor.shape) != (channels,):
        raise ValueError(f"{name}: expected shape [{channels}], got {list(tensor.shape)}")


def layer_norm(
    x: SparseTensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> SparseTensor:
    """Per-voxel layer norm over the channels: ``F.layer_norm`` on ``x.feats`` over the last dimension.

    Each voxel is normalised on its own, so the batch structure plays no role. (TRELLIS's
    ``SparseLayerNorm`` instead pools statistics over a whole sample; that is
    [`group_norm`][sparse3d.functional.norm.group_norm] with one group.)

    Args:
        x: SparseTensor with feats ``[N, ..., C]``.
        weight: Optional scale ``[C]``.
        bias: Optional shift ``[C]``.
        eps: Added to the variance.

    Returns:
        SparseTensor with the same layout and dtype, feats ``[N, ..., C]``.
    """
    channels = x.feats.shape[-1]
    _check_affine(weight, channels, "weight")
    _check_affine(bias, channels, "bias")
    dtype = _compute_dtype(x.feats.dtype)
    weight = None if weight is None else weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = F.layer_norm(x.feats.to(dtype), (channels,), weight, bias, eps)
    return x.replace(out.to(x.feats.dtype))


def group_norm(
    x: SparseTensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> SparseTensor:
    """Group norm over each sample's voxels: statistics per (sample, group) over rows and group channels.

    Matches ``F.group_norm`` applied to each sample's features laid out as ``[1, C, N_b]``. The mean
    and the (biased) variance are computed in two passes, in float32 (float64 for float64 input),
    with sorted segment sums over the packed rows (deterministic forward and backward, no padding,
    no host sync). Empty samples have no rows and do not affect the others. A sample with a single
    value per group (where ``torch.nn.GroupNorm`` raises in training) normalises to 0 (then ``bias``).

    Args:
        x: SparseTensor with feats ``[N, C]``.
        num_groups: Number of channel groups ``G``; must divide ``C``.
        weight: Optional per-channel scale ``[C]``.
        bias: Optional per-channel shift ``[C]``.
        eps: Added to the variance.

    Returns:
        SparseTensor with the same layout and dtype, feats ``[N, C]``.

    Raises:
        ValueError: feats are not ``[N, C]``, ``num_groups`` does not divide ``C``, or an affine
            parameter has the wrong shape.
    """
    feats = x.feats
    if feats.dim() != 2:
        raise ValueError(f"x.feats: expected shape [N, C], got {list(feats.shape)}")
    num_rows, channels = feats.shape
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups: expected a divisor of the channel count {channels}, got {num_groups}")
    _check_affine(weight, channels, "weight")
    _check_affine(bias, channels, "bias")
    group_size = channels // num_groups
    lengths = x.counts.long()  # [B]
    batch_index = x.batch_index  # [N]
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = _compute_dtype(feats.dtype)
        values = feats.to(dtype).view(num_rows, num_groups, group_size)  # [N, G, Cg]
        count = (
            (lengths * group_size).clamp(min=1).to(dtype)[:, None]
        )  # [B, 1]; empty samples: no rows use it
        mean = _SegmentSum.apply(values.sum(dim=2), lengths, batch_index) / count  # [B, G]
        centred = values - _SegmentBroadcast.apply(mean, lengths, batch_index)[:, :, None]  # [N, G, Cg]
        var = _SegmentSum.apply(centred.square().sum(dim=2), lengths, batch_index) / count  # [B, G]
        rstd = torch.rsqrt(var + eps)  # [B, G]
        out = centred * _SegmentBroadcast.apply(rstd, lengths, batch_index)[:, :, None]  # [N, G, Cg]
        out = out.view(num_rows, channels)  # [N, C]
        if weight is not None:
            out = out * weight.to(dtype)
        if bias is not None:
            out = out + bias.to(dtype)
    return x.replace(out.to(feats.dtype))


def instance_norm(
    x: SparseTensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> SparseTensor:
    """Instance norm: [`group_norm`][sparse3d.functional.norm.group_norm] with one group per channel.

    Args:
        x: SparseTensor with feats ``[N, C]``.
        weight: Optional per-channel scale ``[C]``.
        bias: Optional per-channel shift ``[C]``.
        eps: Added to the variance.

    Returns:
        SparseTensor with the same layout and dtype, feats ``[N, C]``.
    """
    if x.feats.dim() != 2:
        raise ValueError(f"x.feats: expected shape [N, C], got {list(x.feats.shape)}")
    return group_norm(x, x.feats.shape[1], weight, bias, eps)
