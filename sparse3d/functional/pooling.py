"""Sparse down/upsampling, structured patchification and subdivision between grid levels.

Every op is deterministic on GPU: children are scattered into a dense ``[M, F, ...]`` patch tensor
(unique destinations) and reduced over the slot axis; no atomic scatter-add appears forward or backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparse3d.functional.coords import _triple, child_slots, coarse_coords, lookup, subdivide_coords
from sparse3d.tensor import SparseTensor

__all__ = ["downsample", "upsample", "patchify", "unpatchify", "subdivide"]

PoolReduce = Literal["mean", "amax", "sum"]

_CACHE_KEY = "sparse3d.functional.pooling.parents"
_CHILDREN_KEY = "sparse3d.functional.pooling.children"


@dataclass(frozen=True)
class _Parents:
    """Coarse layout of a fine layout: parents, child->parent map, child slots, coarse offsets."""

    coords: torch.Tensor  # [M, 4] int32, canonical order
    child_to_parent: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64 in [0, F)
    offsets: torch.Tensor  # [B + 1] int32
    cache: dict[Any, Any] = field(default_factory=dict)  # shared by every coarse tensor built from here


def _parents(x: SparseTensor, factor: tuple[int, int, int]) -> _Parents:
    """Parent layout of ``x`` on the ``factor``-times coarser grid (memoised on the layout)."""

    def build() -> _Parents:
        parents, child_to_parent = coarse_coords(x.coords, factor)
        slots = child_slots(x.coords, factor)
        bounds = torch.arange(x.batch_size + 1, device=x.coords.device, dtype=torch.int32)
        offsets = torch.searchsorted(parents[:, 0].contiguous(), bounds).to(torch.int32)
        return _Parents(parents, child_to_parent, slots, offsets)

    return x.cached((_CACHE_KEY, factor), build)


def _coarse_tensor(
    x: SparseTensor, factor: tuple[int, int, int], parents: _Parents, feats: torch.Tensor
) -> SparseTensor:
    shape = tuple(-(-s // f) for s, f in zip(x.spatial_shape, factor, strict=True))
    stride = tuple(s * f for s, f in zip(x.stride, factor, strict=True))
    return SparseTensor._from_parts(
        parents.coords, feats, parents.offsets, x.batch_size, shape, stride, parents.cache
    )


def _scatter_patches(
    feats: torch.Tensor, parents: _Parents, num_slots: int, fill_value: float
) -> torch.Tensor:
    """Children's features in a dense ``[M, F, ...]`` patch tensor (unique destinations, no atomics)."""
    num_parents = parents.coords.shape[0]
    patches = feats.new_full((num_parents * num_slots, *feats.shape[1:]), fill_value)
    destination = parents.child_to_parent * num_slots + parents.slots  # [N], unique
    patches = patches.index_put((destination,), feats)
    return patches.view(num_parents, num_slots, *feats.shape[1:])  # [M, F, ...]


def _occupancy(parents: _Parents, num_slots: int) -> torch.Tensor:
    num_parents = parents.coords.shape[0]
    mask = torch.zeros(num_parents * num_slots, dtype=torch.bool, device=parents.coords.device)
    mask[parents.child_to_parent * num_slots + parents.slots] = True
    return mask.view(num_parents, num_slots)  # [M, F]


def downsample(
    x: SparseTensor, factor: int | Sequence[int] = 2, reduce: PoolReduce = "mean"
) -> tuple[SparseTensor, torch.Tensor]:
    """Pools each occupied ``fx * fy * fz`` block of voxels into its parent voxel.

    Parents come from [`coarse_coords`][sparse3d.functional.coords.coarse_coords]: coordinates
    ``floor(c / factor)``, canonical (batch, x, y, z) order, ``stride * factor`` and
    ``spatial_shape = ceil(spatial_shape / factor)``. Features are reduced over the parent's
    occupied children only (empty cells are not zeros: a mean divides by the number of children).

    Args:
        x: SparseTensor with feats ``[N, ...]``.
        factor: Pooling factor, an int or one per axis (``1`` leaves an axis unchanged).
        reduce: ``"mean"``, ``"amax"`` or ``"sum"`` over the occupied children.

    Returns:
        ``(coarse, child_to_parent)``: the pooled SparseTensor with feats ``[M, ...]`` and an int64
        ``[N]`` map from each row of ``x`` to its parent's row in ``coarse``. The map is also
        memoised on ``x``'s layout, so [`upsample`][sparse3d.functional.pooling.upsample] finds it.

    Raises:
        ValueError: ``factor`` or ``reduce`` is invalid.
    """
    f = _triple(factor, "factor")
    if reduce not in ("mean", "amax", "sum"):
        raise ValueError(f"reduce: expected one of 'mean', 'amax', 'sum', got {reduce!r}")
    parents = _parents(x, f)
    num_slots = f[0] * f[1] * f[2]
    feats = x.feats
    if reduce == "amax":
        if feats.dtype.is_floating_point:
            fill = float("-inf")
        elif feats.dtype == torch.bool:
            fill = False
        else:
            fill = torch.iinfo(feats.dtype).min
        pooled = _scatter_patches(feats, parents, num_slots, fill).amax(dim=1)  # [M, ...]
    else:
        pooled = _scatter_patches(feats, parents, num_slots, 0).sum(dim=1)  # [M, ...]
        if reduce == "mean":
            counts = _occupancy(parents, num_slots).sum(dim=1).to(pooled.dtype)  # [M]
            pooled = pooled / counts.view(-1, *([1] * (pooled.dim() - 1)))
    return _coarse_tensor(x, f, parents, pooled), parents.child_to_parent


def _level_factor(coarse: SparseTensor, fine: SparseTensor, coarse_name: str) -> tuple[int, int, int]:
    """Factor between two levels from their strides, validating batch size and device."""
    if not isinstance(coarse, SparseTensor) or not isinstance(fine, SparseTensor):
        raise TypeError(
            f"{coarse_name} and fine: expected SparseTensor, got {type(coarse).__name__} and "
            f"{type(fine).__name__}"
        )
    if any(c % s != 0 for c, s in zip(coarse.stride, fine.stride, strict=True)):
        raise ValueError(
            f"{coarse_name}.stride: expected a multiple of fine.stride={fine.stride} per axis "
            f"(fine.stride * factor == {coarse_name}.stride), got {coarse.stride}"
        )
    if coarse.batch_size != fine.batch_size:
        raise ValueError(
            f"{coarse_name}.batch_size: expected {fine.batch_size} (that of fine), got {coarse.batch_size}"
        )
    if coarse.device != fine.device:
        raise ValueError(f"{coarse_name}: expected device {fine.device} (that of fine), got {coarse.device}")
    return tuple(c // s for c, s in zip(coarse.stride, fine.stride, strict=True))  # type: ignore[return-value]


def _same_coords(first: torch.Tensor, second: torch.Tensor) -> bool:
    return first is second or (first.shape == second.shape and bool(torch.equal(first, second)))


def _child_map(
    coarse: SparseTensor,
    fine: SparseTensor,
    factor: tuple[int, int, int],
    child_to_parent: torch.Tensor | None,
    coarse_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(child_to_parent [N] int64, slots [N] int64)`` of ``fine`` into ``coarse``."""
    if child_to_parent is not None:
        if (
            not isinstance(child_to_parent, torch.Tensor)
            or child_to_parent.shape != (fine.num_voxels,)
            or child_to_parent.dtype.is_floating_point
            or child_to_parent.dtype == torch.bool
        ):
            got = (
                f"{child_to_parent.dtype} {list(child_to_parent.shape)}"
                if isinstance(child_to_parent, torch.Tensor)
                else type(child_to_parent).__name__
            )
            raise ValueError(f"child_to_parent: expected an integer tensor [{fine.num_voxels}], got {got}")
        return child_to_parent.long(), child_slots(fine.coords, factor)
    memo = fine.cache.get((_CACHE_KEY, factor))  # left by downsample / patchify of fine
    if memo is not None and _same_coords(memo.coords, coarse.coords):
        return memo.child_to_parent, memo.slots
    parent_coords = fine.cache.get((_CHILDREN_KEY, factor))  # left by subdivide into fine
    if parent_coords is not None and _same_coords(parent_coords, coarse.coords):
        num_slots = factor[0] * factor[1] * factor[2]
        rows = torch.arange(parent_coords.shape[0], device=fine.coords.device)
        slots = torch.arange(num_slots, device=fine.coords.device)
        return rows.repeat_interleave(num_slots), slots.repeat(parent_coords.shape[0])  # [N], [N]
    query = fine.coords.clone()
    f = torch.tensor(factor, device=fine.coords.device, dtype=torch.int32)
    query[:, 1:] = torch.div(fine.coords[:, 1:], f, rounding_mode="floor")
    found = lookup(coarse.coords, query)
    missing = found < 0
    if bool(missing.any()):
        row = int(missing.nonzero()[0])
        raise ValueError(
            f"fine: every voxel needs a parent in {coarse_name} (factor {factor}); voxel "
            f"{fine.coords[row].tolist()} at row {row} has parent {query[row].tolist()}, which "
            f"{coarse_name} lacks"
        )
    return found, child_slots(fine.coords, factor)


def upsample(
    coarse: SparseTensor, fine: SparseTensor, child_to_parent: torch.Tensor | None = None
) -> SparseTensor:
    """Nearest upsampling onto a given fine layout: each fine voxel takes its parent's features.

    The factor is ``coarse.stride / fine.stride`` per axis. The parent of fine voxel ``c`` is the
    coarse voxel ``floor(c / factor)`` of the same sample. Implemented as a gather from
    ``coarse.feats`` expanded to ``[M, F, ...]`` at (parent, slot) pairs, which are unique, so the
    backward (a sum over the slot axis) is deterministic.

    Args:
        coarse: SparseTensor with feats ``[M, ...]``.
        fine: SparseTensor whose layout the result takes (its features are ignored).
        child_to_parent: Optional int64 ``[N]`` row of each fine voxel's parent in ``coarse``, as
            returned by [`downsample`][sparse3d.functional.pooling.downsample]; it is trusted, not
            checked. When omitted it is taken from the layout memo of a previous ``downsample`` of
            ``fine`` or computed by lookup (one host sync to check that every parent exists).

    Returns:
        SparseTensor with ``fine``'s layout and feats ``[N, ...]``.

    Raises:
        ValueError: The strides are not multiples (``fine.stride * factor != coarse.stride``), the
            batch sizes or devices differ, ``child_to_parent`` has the wrong shape, or a fine voxel
            has no parent in ``coarse``.
    """
    factor = _level_factor(coarse, fine, "coarse")
    c2p, slots = _child_map(coarse, fine, factor, child_to_parent, "coarse")
    num_slots = factor[0] * factor[1] * factor[2]
    feats = coarse.feats
    expanded = feats[:, None].expand(feats.shape[0], num_slots, *feats.shape[1:])  # [M, F, ...]
    return fine.replace(expanded[c2p, slots])  # [N, ...]


def patchify(x: SparseTensor, factor: int | Sequence[int] = 2) -> tuple[SparseTensor, torch.Tensor]:
    """Structured patchification: each occupied ``fx * fy * fz`` block becomes one token.

    A token's features are its children's features concatenated in
    [`child_slots`][sparse3d.functional.coords.child_slots] order (x slowest, z fastest), zeros
    for empty children: channel ``slot * C + c``. The token layout is the one
    [`downsample`][sparse3d.functional.pooling.downsample] produces. Invert with
    [`unpatchify`][sparse3d.functional.pooling.unpatchify].

    Args:
        x: SparseTensor with feats ``[N, C]``.
        factor: Block size, an int or one per axis.

    Returns:
        ``(tokens, occupancy)``: tokens with feats ``[M, F * C]`` (``F = fx * fy * fz``) and a bool
        ``[M, F]`` mask of the occupied children of each token.

    Raises:
        ValueError: ``factor`` is invalid or feats are not ``[N, C]``.
    """
    f = _triple(factor, "factor")
    if x.feats.dim() != 2:
        raise ValueError(f"x.feats: expected shape [N, C], got {list(x.feats.shape)}")
    parents = _parents(x, f)
    num_slots = f[0] * f[1] * f[2]
    patches = _scatter_patches(x.feats, parents, num_slots, 0)  # [M, F, C]
    tokens = patches.reshape(patches.shape[0], num_slots * x.feats.shape[1])  # [M, F * C]
    return _coarse_tensor(x, f, parents, tokens), _occupancy(parents, num_slots)


def unpatchify(
    tokens: SparseTensor, fine: SparseTensor, child_to_parent: torch.Tensor | None = None
) -> SparseTensor:
    """Inverse of [`patchify`][sparse3d.functional.pooling.patchify] onto the fine layout.

    Each fine voxel reads its slot's ``C`` channels from its parent token, so
    ``unpatchify(patchify(x, f)[0], x)`` equals ``x`` bitwise. Channels of empty slots are dropped
    by design (they hold the zeros ``patchify`` wrote, or model outputs at unoccupied positions).
    The factor is ``tokens.stride / fine.stride`` per axis.

    Args:
        tokens: SparseTensor with feats ``[M, F * C]``, ``F = fx * fy * fz``.
        fine: SparseTensor whose layout the result takes (its features are ignored).
        child_to_parent: Optional int64 ``[N]`` map, as for
            [`upsample`][sparse3d.functional.pooling.upsample].

    Returns:
        SparseTensor with ``fine``'s layout and feats ``[N, C]``.

    Raises:
        ValueError: Strides, batch sizes or devices are inconsistent, the channel count is not a
            multiple of ``F``, or a fine voxel has no token.
    """
    factor = _level_factor(tokens, fine, "tokens")
    num_slots = factor[0] * factor[1] * factor[2]
    feats = tokens.feats
    if feats.dim() != 2 or feats.shape[1] % num_slots != 0:
        raise ValueError(
            f"tokens.feats: expected shape [M, F * C] with F = {num_slots} (factor {factor}), got "
            f"{list(feats.shape)}"
        )
    c2p, slots = _child_map(tokens, fine, factor, child_to_parent, "tokens")
    patches = feats.view(feats.shape[0], num_slots, feats.shape[1] // num_slots)  # [M, F, C]
    return fine.replace(patches[c2p, slots])  # [N, C]


def subdivide(x: SparseTensor, factor: int | Sequence[int] = 2) -> SparseTensor:
    """Splits every voxel into its ``fx * fy * fz`` children, copying its features.

    Children come from [`subdivide_coords`][sparse3d.functional.coords.subdivide_coords]: row
    ``i``'s children are rows ``i * F .. (i + 1) * F - 1`` in child-slot order.

    Args:
        x: SparseTensor with feats ``[N, ...]`` and a stride divisible by ``factor``.
        factor: Refinement factor, an int or one per axis.

    Returns:
        SparseTensor with feats ``[N * F, ...]``, ``stride / factor`` and
        ``spatial_shape * factor``.

    Raises:
        ValueError: ``factor`` is invalid or does not divide ``x.stride``.
    """
    f = _triple(factor, "factor")
    if any(s % g != 0 for s, g in zip(x.stride, f, strict=True)):
        raise ValueError(f"factor: expected a divisor of x.stride={x.stride} per axis, got {factor!r}")
    num_slots = f[0] * f[1] * f[2]
    coords = subdivide_coords(x.coords, f)  # [N * F, 4]
    feats = x.feats[:, None].expand(x.feats.shape[0], num_slots, *x.feats.shape[1:])  # [N, F, ...]
    feats = feats.reshape(x.feats.shape[0] * num_slots, *x.feats.shape[1:])  # [N * F, ...]
    shape = tuple(s * g for s, g in zip(x.spatial_shape, f, strict=True))
    stride = tuple(s // g for s, g in zip(x.stride, f, strict=True))
    fine = SparseTensor._from_parts(coords, feats, x.offsets * num_slots, x.batch_size, shape, stride)
    # Remember the parent layout: upsample/unpatchify from x onto this layout then skip the lookup.
    fine.cache[(_CHILDREN_KEY, f)] = x.coords
    return fine
