"""Coordinate hashing: packed int64 keys, lookup, unique with an explicit reduction, kernel maps.

Every op here is a plain-PyTorch reference that runs unchanged on CPU and CUDA. There is no hash
table: coordinates are packed into one int64 key each, sorted once, and looked up with
``torch.searchsorted``. Sorting is deterministic, so every map built here is too.

Key layout (bit 63 is always 0, so valid keys are non-negative and ``-1`` means "missing"):

    key = b << 48 | (x + 2^15) << 32 | (y + 2^15) << 16 | (z + 2^15)

with ``0 <= b < 2^15`` and ``-2^15 <= x, y, z < 2^15`` (stored voxels use ``0 <= x, y, z < 2^15``).
Because each field carries a ``2^15`` bias, adding a neighbour offset ``d = (dx, dy, dz)`` to a key
never carries between fields while ``c + d`` stays in that range:
``pack_keys(c + d) == pack_keys(c) + offset_keys(d)``. Negative neighbour coordinates simply produce
keys that no stored voxel has; so does a field that overflows past ``2^15`` (its digit decodes to a
negative coordinate), so lookups of neighbours with ``|d| < 2^15`` never return a wrong voxel.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "MAX_BATCH",
    "MAX_COORD",
    "pack_keys",
    "unpack_keys",
    "offset_keys",
    "lookup",
    "unique_coords",
    "kernel_offsets",
    "kernel_map",
    "invert_kernel_map",
    "segment_reduce",
    "coarse_coords",
    "child_slots",
    "subdivide_coords",
]

MAX_COORD = 1 << 15
"""Exclusive upper bound of every spatial coordinate."""
MAX_BATCH = 1 << 15
"""Exclusive upper bound of the batch index."""
_BIAS = 1 << 15

Reduce = Literal["sum", "mean", "amax", "amin"]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """Turns an int or a 3-sequence into a 3-tuple of positive ints, naming ``name`` on error."""
    items = value if isinstance(value, Sequence) else [value]
    if any(isinstance(v, bool) for v in items):  # True is an int to Python, never a size here
        raise TypeError(f"{name}: expected an int or 3 ints, got {value!r}")
    try:
        if isinstance(value, Sequence) or (isinstance(value, torch.Tensor) and value.dim() == 1):
            out = tuple(operator.index(v) for v in value)
        else:
            out = (operator.index(value),) * 3
    except TypeError:
        raise TypeError(f"{name}: expected an int or 3 ints, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints, got {value!r}")
    if any(v < 1 for v in out):
        raise ValueError(f"{name}: expected values >= 1, got {value!r}")
    return out  # type: ignore[return-value]


def pack_keys(coords: torch.Tensor) -> torch.Tensor:
    """Packs (batch, x, y, z) coordinates into one int64 key per row.

    Keys sort in (batch, x, y, z) lexicographic order.

    Args:
        coords: Integer tensor ``[N, 4]`` of (batch, x, y, z), ``0 <= batch < 2^15`` and
            ``-2^15 <= x, y, z < 2^15``.

    Returns:
        int64 tensor ``[N]``.
    """
    c = coords.long()
    return (c[:, 0] << 48) | ((c[:, 1] + _BIAS) << 32) | ((c[:, 2] + _BIAS) << 16) | (c[:, 3] + _BIAS)


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of [`pack_keys`][sparse3d.functional.coords.pack_keys].

    Args:
        keys: int64 tensor ``[N]``.

    Returns:
        int32 tensor ``[N, 4]`` of (batch, x, y, z).
    """
    mask = 0xFFFF
    b = keys >> 48
    x = ((keys >> 32) & mask) - _BIAS
    y = ((keys >> 16) & mask) - _BIAS
    z = (keys & mask) - _BIAS
    return torch.stack([b, x, y, z], dim=1).int()


def offset_keys(offsets: torch.Tensor) -> torch.Tensor:
    """Key increments of spatial offsets: ``pack_keys(c + d) == pack_keys(c) + offset_keys(d)``.

    The identity holds whenever ``c + d`` stays inside ``[-2^15, 2^15)`` on every axis (see the
    module docstring for what happens outside).

    Args:
        offsets: Integer tensor ``[K, 3]`` of (dx, dy, dz) with ``|d| < 2^15``.

    Returns:
        int64 tensor ``[K]``.
    """
    d = offsets.long()
    return (d[:, 0] << 32) + (d[:, 1] << 16) + d[:, 2]


def _sorted(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted keys and the permutation that sorts them (stable, hence deterministic)."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    return sorted_keys, perm


def _search(sorted_keys: torch.Tensor, perm: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row index (into the unsorted table) of each query key, ``-1`` where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(queries, -1)
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    found = sorted_keys[pos] == queries
    return torch.where(found, perm[pos], torch.full_like(pos, -1))


def lookup(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Finds the row of each query coordinate in a table of unique coordinates.

    Args:
        table: Integer tensor ``[N, 4]`` of unique (batch, x, y, z) rows.
        queries: Integer tensor ``[M, 4]`` of (batch, x, y, z) rows.

    Returns:
        int64 tensor ``[M]``: the row of ``table`` holding each query, ``-1`` where none does.
    """
    sorted_keys, perm = _sorted(pack_keys(table))
    return _search(sorted_keys, perm, pack_keys(queries))


def segment_reduce(
    values: torch.Tensor, lengths: torch.Tensor, reduce: Reduce, *, check: bool = False
) -> torch.Tensor:
    """Reduces consecutive runs of rows, deterministically (no atomics).

    Args:
        values: Tensor ``[N, ...]`` whose rows are grouped into consecutive segments; floating point,
            or integer for ``"sum"``, ``"amax"`` and ``"amin"``.
        lengths: Integer tensor ``[M]`` of non-negative segment lengths summing to ``N`` (zeros
            allowed), on the device of ``values``.
        reduce: ``"sum"``, ``"mean"``, ``"amax"`` or ``"amin"``. Empty segments give 0.
        check: Verify that ``lengths`` are non-negative and sum to ``N`` (costs one host sync, so it is
            off by default for the hot path, where lengths come from ``SparseTensor.counts`` and are
            valid by construction). Without it, invalid lengths are undefined behaviour.

    Returns:
        Tensor ``[M, ...]`` of the dtype of ``values``.

    Raises:
        ValueError: ``reduce`` is unknown, or ``lengths`` is not 1-D, or (with ``check``) has a
            negative entry or does not sum to ``N``.
        TypeError: ``"mean"`` of integer values.
    """
    name = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min"}.get(reduce)
    if name is None:
        raise ValueError(f"reduce: expected one of 'sum', 'mean', 'amax', 'amin', got {reduce!r}")
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths: expected a 1-D integer tensor [M], got {lengths.dtype} {list(lengths.shape)}"
        )
    lengths = lengths.long()
    if lengths.numel() == 0:
        if values.shape[0] != 0:
            raise ValueError(f"lengths: expected segments summing to N={values.shape[0]}, got no segments")
        return values.new_zeros((0, *values.shape[1:]))
    if check:
        total, smallest = torch.stack([lengths.sum(), lengths.min()]).tolist()
        if total != values.shape[0] or smallest < 0:
            raise ValueError(
                f"lengths: expected non-negative lengths summing to N={values.shape[0]}, got sum {total} "
                f"and min {smallest}"
            )
    if not values.dtype.is_floating_point:
        if reduce == "mean":
            raise TypeError(f"values: 'mean' needs a floating point dtype, got {values.dtype}")
        # Integer reductions are associative and exact, so a scatter is deterministic too.
        segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=values.device), lengths, output_size=values.shape[0]
        )  # [N]
        index = segment.view(-1, *[1] * (values.dim() - 1)).expand_as(values)
        out = values.new_zeros((lengths.numel(), *values.shape[1:]))
        return out.scatter_reduce(0, index, values, reduce, include_self=False)
    # No `initial`: it would take part in every segment (amax of negatives would give 0).
    out = torch.segment_reduce(values, name, lengths=lengths, axis=0, unsafe=True)
    empty = (lengths == 0).view(-1, *[1] * (values.dim() - 1))
    return torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out)


def unique_coords(
    coords: torch.Tensor, feats: torch.Tensor | None = None, reduce: Reduce = "sum"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merges duplicate coordinates, reducing their features explicitly.

    Nothing in sparse3d deduplicates silently; this is the op to call when duplicates are
    expected (e.g. after voxelizing points).

    Args:
        coords: Integer tensor ``[N, 4]`` of (batch, x, y, z), duplicates allowed.
        feats: Optional tensor ``[N, ...]`` of features.
        reduce: How duplicate rows' features combine: ``"sum"``, ``"mean"``, ``"amax"``, ``"amin"``.

    Returns:
        ``(unique_coords [M, 4] int32 in (batch, x, y, z) order, unique_feats [M, ...] or None,
        inverse [N] int64)`` with ``unique_coords[inverse] == coords``.

    Raises:
        ValueError: ``feats`` does not have ``N`` rows, or ``reduce`` is unknown.
    """
    keys = pack_keys(coords)
    unique_keys, inverse, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
    out_feats = None
    if feats is not None:
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats: expected {coords.shape[0]} rows to match coords, got {feats.shape[0]}")
        order = torch.sort(inverse, stable=True).indices
        out_feats = segment_reduce(feats[order], counts, reduce, check=False)  # counts sum to N
    return unpack_keys(unique_keys), out_feats, inverse


def kernel_offsets(
    kernel_size: int | Sequence[int] = 3,
    dilation: int | Sequence[int] = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Spatial offsets of a kernel, x slowest and z fastest.

    Offset ``k`` of axis ``a`` is ``(k - (size_a - 1) // 2) * dilation_a``: centred for odd sizes
    (``-1, 0, 1`` for 3), ``0, 1`` for size 2 and ``-1, 0, 1, 2`` for size 4. Flat index ``k`` matches
    ``weight.reshape(kx, ky, kz, ...)`` of a dense ``[kx, ky, kz]`` kernel.

    Args:
        kernel_size: Kernel size, an int or one per axis.
        dilation: Dilation, an int or one per axis.
        device: Device of the result.

    Returns:
        int32 tensor ``[K, 3]`` with ``K = kx * ky * kz``.
    """
    size = _triple(kernel_size, "kernel_size")
    dil = _triple(dilation, "dilation")
    axes = [(torch.arange(s, device=device) - (s - 1) // 2) * d for s, d in zip(size, dil, strict=True)]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1).int()


def kernel_map(
    in_coords: torch.Tensor,
    out_coords: torch.Tensor,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    transposed: bool = False,
    *,
    in_sorted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Builds the kernel map of a sparse convolution in one batched lookup.

    Entry ``[j, k]`` is the input row that kernel offset ``k`` brings to output row ``j``:

    * regular (``transposed=False``): input at ``out * stride + offset_k``;
    * transposed: input at ``(out - offset_k) / stride`` when that is an integer.

    With ``stride=1`` both reduce to the submanifold map ``in = out + offset_k``. Offsets follow
    [`kernel_offsets`][sparse3d.functional.coords.kernel_offsets].

    Args:
        in_coords: Integer tensor ``[N, 4]`` of unique input (batch, x, y, z).
        out_coords: Integer tensor ``[M, 4]`` of output (batch, x, y, z) on the output grid.
        kernel_size: Kernel size (int or 3 ints).
        stride: Stride (int or 3 ints).
        dilation: Dilation (int or 3 ints).
        transposed: Map of the transposed convolution.
        in_sorted: Optional precomputed ``torch.sort(pack_keys(in_coords), stable=True)``.

    Returns:
        int64 tensor ``[M, K]``; ``-1`` marks a missing neighbour.
    """
    s = torch.tensor(_triple(stride, "stride"), device=out_coords.device, dtype=torch.long)
    offsets = kernel_offsets(kernel_size, dilation, device=out_coords.device).long()  # [K, 3]
    sorted_keys, perm = in_sorted if in_sorted is not None else _sorted(pack_keys(in_coords))
    if not transposed:
        base = out_coords.long().clone()
        base[:, 1:] *= s
        queries = pack_keys(base)[:, None] + offset_keys(offsets)[None, :]  # [M, K]
        return _search(sorted_keys, perm, queries)
    shifted = out_coords[:, None, 1:].long() - offsets[None]  # [M, K, 3]
    divisible = (shifted % s == 0).all(dim=-1)  # [M, K]
    parent = torch.div(shifted, s, rounding_mode="floor")
    batch = out_coords[:, None, :1].long().expand(-1, offsets.shape[0], 1)
    queries = pack_keys(torch.cat([batch, parent], dim=-1).reshape(-1, 4)).view(divisible.shape)
    found = _search(sorted_keys, perm, queries)
    return torch.where(divisible, found, torch.full_like(found, -1))


def invert_kernel_map(kmap: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Inverts a kernel map: entry ``[i, k]`` is the output row that reads input ``i`` through offset ``k``.

    Each (input, offset) pair feeds at most one output in every convolution built by
    [`kernel_map`][sparse3d.functional.coords.kernel_map], so this is a scatter with unique
    destinations (deterministic).

    Args:
        kmap: int64 tensor ``[M, K]`` from `kernel_map`.
        num_inputs: Number of input rows ``N``.

    Returns:
        int64 tensor ``[N, K]``; ``-1`` where no output reads that pair.
    """
    num_out, num_k = kmap.shape
    inverse = torch.full(((num_inputs + 1) * num_k,), -1, dtype=torch.long, device=kmap.device)
    k = torch.arange(num_k, device=kmap.device).expand(num_out, num_k)
    rows = torch.arange(num_out, device=kmap.device)[:, None].expand(num_out, num_k)
    # Missing entries (-1) write into a spare row that is dropped below.
    dest = torch.where(kmap >= 0, kmap, num_inputs) * num_k + k
    inverse[dest.reshape(-1)] = rows.reshape(-1)
    return inverse.view(num_inputs + 1, num_k)[:num_inputs]


def coarse_coords(coords: torch.Tensor, factor: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parent cells of a ``factor``-times coarser grid: ``parent = floor(child / factor)``.

    Args:
        coords: Integer tensor ``[N, 4]`` of (batch, x, y, z), non-negative.
        factor: Coarsening factor, an int or one per axis.

    Returns:
        ``(parents [M, 4] int32, child_to_parent [N] int64)``: the unique parents in
        (batch, x, y, z) order and, for each child row, its parent's row.
    """
    f = torch.tensor(_triple(factor, "factor"), device=coords.device, dtype=torch.int32)
    scaled = coords.clone()
    scaled[:, 1:] = torch.div(coords[:, 1:], f, rounding_mode="floor")
    parent_keys, child_to_parent = torch.unique(pack_keys(scaled), sorted=True, return_inverse=True)
    return unpack_keys(parent_keys), child_to_parent


def child_slots(coords: torch.Tensor, factor: int | Sequence[int]) -> torch.Tensor:
    """Position of each child inside its parent's ``fx * fy * fz`` block, x slowest and z fastest.

    Args:
        coords: Integer tensor ``[N, 4]`` of (batch, x, y, z), non-negative.
        factor: Coarsening factor, an int or one per axis.

    Returns:
        int64 tensor ``[N]`` in ``[0, fx * fy * fz)``.
    """
    fx, fy, fz = _triple(factor, "factor")
    local = coords[:, 1:].long() % torch.tensor([fx, fy, fz], device=coords.device)
    return (local[:, 0] * fy + local[:, 1]) * fz + local[:, 2]


def subdivide_coords(coords: torch.Tensor, factor: int | Sequence[int] = 2) -> torch.Tensor:
    """All children of each cell on a ``factor``-times finer grid.

    Args:
        coords: Integer tensor ``[N, 4]`` of (batch, x, y, z).
        factor: Refinement factor, an int or one per axis.

    Returns:
        int32 tensor ``[N * fx * fy * fz, 4]``: the children of row ``i`` are rows
        ``i * F .. (i + 1) * F - 1`` in [`child_slots`][sparse3d.functional.coords.child_slots] order,
        so the batch column stays non-decreasing.
    """
    fx, fy, fz = _triple(factor, "factor")
    f = torch.tensor([fx, fy, fz], device=coords.device, dtype=torch.int32)
    local = kernel_offsets((fx, fy, fz), device=coords.device) + torch.tensor(
        [(fx - 1) // 2, (fy - 1) // 2, (fz - 1) // 2], device=coords.device, dtype=torch.int32
    )  # [F, 3] in [0, f)
    children = coords[:, None, 1:] * f + local[None]  # [N, F, 3]
    batch = coords[:, None, :1].expand(-1, local.shape[0], 1)
    return torch.cat([batch, children], dim=-1).reshape(-1, 4).int()
