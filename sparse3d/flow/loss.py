"""Flow-matching training loss (per-sample velocity MSE) and condition dropout for classifier-free guidance.

Works on dense batches ``[B, ...]`` and on SparseTensors, where a sample's loss averages its own voxels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sparse3d.flow.path import (
    FlowTensor,
    _check_flow_tensor,
    _check_same_structure,
    _like,
    _values,
    batch_size_of,
)
from sparse3d.functional.coords import segment_reduce
from sparse3d.tensor import SparseTensor

__all__ = ["DroppedCondition", "drop_condition", "flow_matching_loss", "per_sample_mse"]


def per_sample_mse(prediction: FlowTensor, target: FlowTensor) -> torch.Tensor:
    """Mean squared error of each sample, over that sample's voxels (or positions) and channels.

    Dense ``[B, ...]``: the mean over all non-batch dimensions. SparseTensor with feats ``[N, ...]``: a
    segment mean over the sample's rows (no Python loop over samples), so a sample with many voxels
    weighs as much as one with few. Computed in float32 (float64 inputs stay float64).

    Args:
        prediction: Model output, dense ``[B, ...]`` or SparseTensor.
        target: Target of the same type, shape and layout (e.g. ``PathSample.target``).

    Returns:
        Tensor ``[B]``; an empty sample of a SparseTensor gives 0.
    """
    _check_flow_tensor(prediction, "prediction")
    _check_same_structure(prediction, target, "prediction", "target")
    dtype = torch.promote_types(_values(prediction).dtype, torch.float32)
    error = (_values(prediction).to(dtype) - _values(target).to(dtype)).square()
    per_row = error.flatten(1).mean(dim=1) if error.dim() > 1 else error  # [B] dense, [N] sparse
    if isinstance(prediction, SparseTensor):
        return segment_reduce(per_row, prediction.counts.long(), "mean")  # [B]
    return per_row


def flow_matching_loss(
    prediction: FlowTensor,
    target: FlowTensor,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Velocity MSE: per-sample means, then the mean over the batch.

    Per-sample means as in [`per_sample_mse`][sparse3d.flow.per_sample_mse].

    ``loss = sum_b w_b mse_b / B'`` where ``B'`` counts the samples with at least one element (empty
    samples of a SparseTensor have no loss and do not dilute the mean). Weights multiply; they are not
    normalised (as in diffusers' ``weighting`` factor).

    Args:
        prediction: Model output, dense ``[B, ...]`` or SparseTensor.
        target: Target of the same type, shape and layout.
        weights: Optional per-sample weights ``[B]`` (e.g. a function of ``t``).

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    losses = per_sample_mse(prediction, target)  # [B]
    batch = batch_size_of(prediction)
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (batch,):
            shape = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights: expected a tensor of shape [B]=[{batch}], got {shape}")
        losses = losses * weights.to(device=losses.device, dtype=losses.dtype)
    if isinstance(prediction, SparseTensor):
        nonempty = (prediction.counts > 0).sum().clamp(min=1).to(losses.dtype)
    else:
        nonempty = torch.tensor(float(max(batch, 1)), dtype=losses.dtype, device=losses.device)
    return losses.sum() / nonempty


@dataclass(frozen=True)
class DroppedCondition:
    """Result of [`drop_condition`][sparse3d.flow.drop_condition].

    Attributes:
        condition: The condition with dropped samples replaced by the null condition (same structure).
        dropped: bool tensor ``[B]``, True where a sample's condition was replaced.
    """

    condition: Any
    dropped: torch.Tensor


def _replace_samples(value: FlowTensor, null: Any, dropped: torch.Tensor, name: str) -> FlowTensor:
    """``value`` with the samples in ``dropped`` replaced by ``null`` (broadcast to one sample)."""
    _check_flow_tensor(value, name)
    values = _values(value)
    sample_shape = values.shape[1:]
    if null is None:
        null_values = values.new_zeros(())
    else:
        null_values = _values(null) if isinstance(null, SparseTensor) else torch.as_tensor(null)
        null_values = null_values.to(device=values.device, dtype=values.dtype)
        full_ok = isinstance(value, torch.Tensor) and null_values.shape == values.shape
        try:
            sample_ok = torch.broadcast_shapes(null_values.shape, sample_shape) == sample_shape
        except RuntimeError:
            sample_ok = False
        if not (sample_ok or full_ok):
            raise ValueError(
                f"null[{name!r}]: expected a shape broadcastable to one sample {list(sample_shape)} or "
                f"the full {list(values.shape)}, got {list(null_values.shape)}"
            )
    per_row = dropped[value.batch_index] if isinstance(value, SparseTensor) else dropped  # [N] or [B]
    mask = per_row.reshape(-1, *([1] * (values.dim() - 1)))  # [N or B, 1, ...]
    return _like(value, torch.where(mask, null_values, values))


def drop_condition(
    condition: FlowTensor | Mapping[str, FlowTensor],
    probability: float,
    *,
    null: Any = None,
    dropped: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DroppedCondition:
    """Replaces each sample's condition by a null condition with probability ``probability`` (CFG training).

    The same samples are dropped in every entry of a mapping (all inputs of one condition go
    together). The default null condition is zeros, as in TRELLIS; pass ``null`` for a learned or
    encoded empty condition. Gradients flow to the kept samples and to a tensor ``null``.

    Args:
        condition: A dense tensor ``[B, ...]``, a SparseTensor, or a mapping of names to those (equal ``B``).
        probability: Drop probability in ``[0, 1]``.
        null: None (zeros), or a tensor broadcastable to one sample (``[...]``) or the full ``[B, ...]``;
            for a mapping, a mapping with a value (or None) for every key.
        dropped: Optional bool tensor ``[B]`` to use instead of drawing the mask.
        generator: Generator for the mask.

    Returns:
        A [`DroppedCondition`][sparse3d.flow.DroppedCondition] with the new condition and the mask ``[B]``.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability: expected a value in [0, 1], got {probability}")
    entries = dict(condition) if isinstance(condition, Mapping) else {"condition": condition}
    if not entries:
        raise ValueError("condition: expected at least one tensor, got an empty mapping")
    if isinstance(condition, Mapping):
        nulls = dict(null) if isinstance(null, Mapping) else ({} if null is None else None)
        if nulls is None:
            raise TypeError(
                f"null: expected None or a mapping for a mapping condition, got {type(null).__name__}"
            )
        unknown = set(nulls) - set(entries)
        if unknown:
            raise ValueError(f"null: keys {sorted(unknown)} are not in condition (keys {sorted(entries)})")
    else:
        nulls = {"condition": null}
    for key, value in entries.items():
        _check_flow_tensor(value, f"condition[{key!r}]")
    batches = {key: batch_size_of(value) for key, value in entries.items()}
    batch = next(iter(batches.values()))
    if any(b != batch for b in batches.values()):
        raise ValueError(f"condition: expected the same batch size in every entry, got {batches}")
    device = _values(next(iter(entries.values()))).device
    if dropped is None:
        gen_device = generator.device if generator is not None else "cpu"
        draws = torch.rand(batch, generator=generator, device=gen_device)
        dropped = (draws < probability).to(device)
    elif dropped.dtype != torch.bool or dropped.shape != (batch,):
        raise ValueError(
            f"dropped: expected a bool tensor of shape [B]=[{batch}], got {dropped.dtype} "
            f"{list(dropped.shape)}"
        )
    dropped = dropped.to(device)
    out = {key: _replace_samples(value, nulls.get(key), dropped, key) for key, value in entries.items()}
    result = out if isinstance(condition, Mapping) else out["condition"]
    return DroppedCondition(condition=result, dropped=dropped)
