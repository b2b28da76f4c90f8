"""Tests of the coordinate ops in `sparse3d.functional.coords` against Python dicts and brute-force loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d import SparseTensor
from sparse3d.functional import (
    MAX_BATCH,
    MAX_COORD,
    child_slots,
    coarse_coords,
    lookup,
    offset_keys,
    pack_keys,
    segment_reduce,
    subdivide_coords,
    unique_coords,
    unpack_keys,
)
from sparse3d.functional.coords import _search
from tests.strategies import sparse_tensors

REDUCERS = {
    "sum": lambda rows: rows.sum(dim=0),
    "mean": lambda rows: rows.mean(dim=0),
    "amax": lambda rows: rows.amax(dim=0),
    "amin": lambda rows: rows.amin(dim=0),
}

batches = st.integers(0, MAX_BATCH - 1)
signed = st.integers(-MAX_COORD, MAX_COORD - 1)
# Values near the limits of every field are drawn often, not just by luck.
edgy_signed = st.one_of(
    signed, st.sampled_from([-MAX_COORD, -MAX_COORD + 1, -1, 0, 1, MAX_COORD - 2, MAX_COORD - 1])
)
edgy_batches = st.one_of(batches, st.sampled_from([0, 1, MAX_BATCH - 2, MAX_BATCH - 1]))
signed_rows = st.lists(
    st.tuples(edgy_batches, edgy_signed, edgy_signed, edgy_signed), min_size=1, max_size=40
)


def _groups(coords: torch.Tensor) -> dict[tuple[int, ...], list[int]]:
    """Rows of each distinct coordinate, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, c in enumerate(coords.tolist()):
        groups.setdefault(tuple(c), []).append(row)
    return groups


# ---------------------------------------------------------------------------- keys


@given(signed_rows)
def test_pack_unpack_round_trip_near_limits(rows):
    coords = torch.tensor(rows, dtype=torch.int64)
    keys = pack_keys(coords)
    assert keys.dtype == torch.int64 and (keys >= 0).all()
    back = unpack_keys(keys)
    assert back.dtype == torch.int32 and torch.equal(back, coords.int())
    assert torch.equal(pack_keys(coords.int()), keys)


@given(signed_rows)
def test_key_order_is_lexicographic(rows):
    keys = pack_keys(torch.tensor(rows)).tolist()
    by_key = [row for _, row in sorted(zip(keys, rows, strict=True))]
    assert by_key == sorted(rows)
    assert len(set(keys)) == len(set(rows))


@given(st.data())
def test_offset_keys_additivity(data):
    rows = data.draw(signed_rows)
    coords = torch.tensor(rows)
    # Offsets chosen so that c + d stays inside the key range on every axis.
    deltas = [
        [data.draw(st.integers(-MAX_COORD - c[axis], MAX_COORD - 1 - c[axis])) for axis in (1, 2, 3)]
        for c in rows
    ]
    delta = torch.tensor(deltas)
    moved = coords.clone()
    moved[:, 1:] += delta
    assert torch.equal(pack_keys(moved), pack_keys(coords) + offset_keys(delta))


@given(st.data())
def test_key_arithmetic_never_finds_a_wrong_voxel(data):
    """Neighbour keys built by addition, even when a field overflows, only ever hit the true neighbour."""
    near_top = st.one_of(st.integers(0, 3), st.integers(MAX_COORD - 4, MAX_COORD - 1))
    rows = data.draw(
        st.lists(
            st.tuples(st.integers(0, 2), near_top, near_top, near_top), min_size=1, max_size=30, unique=True
        )
    )
    table = torch.tensor(rows)
    shifts = st.one_of(st.integers(-MAX_COORD + 1, MAX_COORD - 1), st.integers(-5, 5))
    delta = torch.tensor(data.draw(st.lists(st.tuples(shifts, shifts, shifts), min_size=1, max_size=8)))
    sorted_keys, perm = torch.sort(pack_keys(table), stable=True)
    queries = pack_keys(table)[:, None] + offset_keys(delta)[None, :]  # [N, K]
    found = _search(sorted_keys, perm, queries)
    index = {c: row for row, c in enumerate(rows)}
    for row, (b, x, y, z) in enumerate(rows):
        for k, (dx, dy, dz) in enumerate(delta.tolist()):
            assert int(found[row, k]) == index.get((b, x + dx, y + dy, z + dz), -1)


@given(st.integers(0, 2**31 - 1), st.integers(1, 200), st.integers(0, 60))
def test_lookup_vs_dict(seed, table_size, num_queries):
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.randint(0, 6, (table_size, 4), generator=generator)
    candidates[:, 0] = candidates[:, 0] % 3
    table = torch.tensor(list(dict.fromkeys(tuple(c) for c in candidates.tolist())))  # unique, random order
    # Queries: hits from the table, misses, and neighbours with negative coordinates.
    queries = torch.cat(
        [
            table[torch.randint(0, table.shape[0], (num_queries,), generator=generator)],
            torch.randint(-2, 8, (num_queries, 4), generator=generator).clamp(min=0),
            torch.randint(-3, 3, (num_queries, 4), generator=generator).abs() * torch.tensor([1, -1, 1, -1]),
        ]
    )
    found = lookup(table, queries)
    index = {tuple(c): row for row, c in enumerate(table.tolist())}
    assert found.dtype == torch.int64
    assert found.tolist() == [index.get(tuple(q), -1) for q in queries.tolist()]
    assert (lookup(table[:0], queries) == -1).all()


# ---------------------------------------------------------------------------- reductions


@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=12),
    st.integers(1, 3),
    st.sampled_from(list(REDUCERS)),
    st.integers(0, 2**31 - 1),
)
def test_segment_reduce_vs_loop(lengths, channels, reduce, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), channels, generator=generator, dtype=torch.float64) - 2.0  # mostly < 0
    values.requires_grad_(True)
    out = segment_reduce(values, torch.tensor(lengths), reduce)
    start = 0
    expected = []
    for n in lengths:
        rows = values[start : start + n]
        expected.append(REDUCERS[reduce](rows) if n else rows.sum(dim=0))  # zeros, in the graph
        start += n
    expected = torch.stack(expected)
    assert out.shape == (len(lengths), channels)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), values)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), values)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.sampled_from(["sum", "amax", "amin"]))
def test_segment_reduce_integers_vs_loop(lengths, reduce):
    values = torch.arange(sum(lengths) * 2).reshape(-1, 2) * torch.tensor([-1, 3]) - 5  # [N, 2] int64
    out = segment_reduce(values, torch.tensor(lengths, dtype=torch.int32), reduce)
    assert out.dtype == torch.int64
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    expected = [
        REDUCERS[reduce](values[s : s + n]).tolist() if n else [0, 0]
        for s, n in zip(starts, lengths, strict=True)
    ]
    assert out.tolist() == expected


def test_segment_reduce_errors():
    values = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"lengths: expected non-negative lengths summing to N=5, got sum 4"):
        segment_reduce(values, torch.tensor([1, 3]), "sum", check=True)
    with pytest.raises(ValueError, match=r"lengths: expected .*N=5, got sum 5 and min -1"):
        segment_reduce(values, torch.tensor([6, -1]), "sum", check=True)
    with pytest.raises(ValueError, match=r"lengths: expected segments summing to N=5, got no segments"):
        segment_reduce(values, torch.zeros(0, dtype=torch.long), "sum")
    with pytest.raises(ValueError, match=r"reduce: expected one of .*got 'max'"):
        segment_reduce(values, torch.tensor([5]), "max")
    with pytest.raises(TypeError, match=r"values: 'mean' needs a floating point dtype, got torch.int64"):
        segment_reduce(values.long(), torch.tensor([5]), "mean")
    assert segment_reduce(values[:0], torch.zeros(0, dtype=torch.long), "mean").shape == (0, 2)


@given(st.integers(0, 2**31 - 1), st.integers(0, 60), st.sampled_from(list(REDUCERS)))
def test_unique_coords_vs_group_loop(seed, num, reduce):
    generator = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 3, (num, 4), generator=generator)  # many duplicates
    feats = torch.randn(num, 2, generator=generator, dtype=torch.float64) - 1.0
    unique, merged, inverse = unique_coords(coords, feats, reduce)
    groups = _groups(coords)
    assert unique.dtype == torch.int32 and inverse.dtype == torch.int64
    assert unique.tolist() == sorted(list(c) for c in groups)  # canonical (batch, x, y, z) order
    assert torch.equal(unique[inverse], coords.int())  # the inverse property
    for row, c in enumerate(unique.tolist()):
        expected = REDUCERS[reduce](feats[groups[tuple(c)]])
        torch.testing.assert_close(merged[row], expected, rtol=1e-12, atol=1e-12)
    unique_only, none, inverse_only = unique_coords(coords)
    assert none is None and torch.equal(unique_only, unique) and torch.equal(inverse_only, inverse)
    # The merged result is a valid layout.
    if num:
        SparseTensor(unique, merged, spatial_shape=3)


def test_unique_coords_feats_length_error():
    with pytest.raises(ValueError, match=r"feats: expected 3 rows to match coords, got 2"):
        unique_coords(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 1))


# ---------------------------------------------------------------------------- hierarchy


factors = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))


def _factor_triple(factor: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (factor,) * 3 if isinstance(factor, int) else factor


@given(sparse_tensors(max_size=9), factors)
def test_coarse_coords_and_child_slots_vs_brute_force(x, factor):
    fx, fy, fz = _factor_triple(factor)
    parents, child_to_parent = coarse_coords(x.coords, factor)
    rows = x.coords.tolist()
    brute_parents = [(b, i // fx, j // fy, k // fz) for b, i, j, k in rows]
    assert parents.dtype == torch.int32 and child_to_parent.dtype == torch.int64
    assert parents.tolist() == sorted(list(p) for p in set(brute_parents))
    assert [tuple(parents[p].tolist()) for p in child_to_parent] == brute_parents

    slots = child_slots(x.coords, factor)
    assert slots.tolist() == [((i % fx) * fy + j % fy) * fz + k % fz for _, i, j, k in rows]
    # Slots never collide inside one parent block (coordinates are unique).
    for parent in set(brute_parents):
        block = [int(slots[r]) for r, p in enumerate(brute_parents) if p == parent]
        assert len(block) == len(set(block)) and all(0 <= s < fx * fy * fz for s in block)


@given(sparse_tensors(max_size=5), factors)
def test_subdivide_then_coarsen_gives_back_parents(x, factor):
    fx, fy, fz = _factor_triple(factor)
    children = subdivide_coords(x.coords, factor)
    block = fx * fy * fz
    assert children.dtype == torch.int32 and children.shape == (x.num_voxels * block, 4)
    # Brute force: every child of every parent, children of row i in rows i * F .. (i + 1) * F - 1.
    expected = [
        [b, i * fx + di, j * fy + dj, k * fz + dk]
        for b, i, j, k in x.coords.tolist()
        for di, dj, dk in itertools.product(range(fx), range(fy), range(fz))
    ]
    assert children.tolist() == expected
    # Batch column stays non-decreasing, and the children form a valid finer layout.
    fine = SparseTensor(children, torch.zeros(children.shape[0], 1), batch_size=x.batch_size)
    assert torch.equal(fine.offsets, x.offsets * block)
    # Coarsening gives back the parents; slots are a permutation of 0..F-1 within each block.
    parents, child_to_parent = coarse_coords(children, factor)
    assert torch.equal(parents, x.canonical().coords)
    assert torch.equal(parents[child_to_parent], x.coords.repeat_interleave(block, dim=0))
    slots = child_slots(children, factor).view(-1, block)  # [N, F]
    assert torch.equal(slots, torch.arange(block).expand_as(slots))


def test_factor_errors():
    coords = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"factor: expected values >= 1, got 0"):
        coarse_coords(coords, 0)
    with pytest.raises(ValueError, match=r"factor: expected an int or 3 ints, got \(2, 2\)"):
        subdivide_coords(coords, (2, 2))
    with pytest.raises(TypeError, match=r"factor: expected an int or 3 ints, got 1.5"):
        child_slots(coords, 1.5)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@given(st.integers(0, 2**31 - 1), st.integers(1, 3000), st.sampled_from(list(REDUCERS)))
def test_cuda_matches_cpu(seed, num, reduce):
    generator = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 12, (num, 4), generator=generator)
    coords[:, 0] %= 3
    feats = torch.randn(num, 8, generator=generator)
    unique, merged, inverse = unique_coords(coords, feats, reduce)
    unique_gpu, merged_gpu, inverse_gpu = unique_coords(coords.cuda(), feats.cuda(), reduce)
    assert torch.equal(unique_gpu.cpu(), unique) and torch.equal(inverse_gpu.cpu(), inverse)
    torch.testing.assert_close(merged_gpu.cpu(), merged)
    assert torch.equal(lookup(unique.cuda(), coords.cuda()).cpu(), lookup(unique, coords))
    parents, child_to_parent = coarse_coords(unique.cuda(), 2)
    assert torch.equal(parents.cpu(), coarse_coords(unique, 2)[0])
    assert torch.equal(subdivide_coords(unique.cuda(), 2).cpu(), subdivide_coords(unique, 2))
    assert torch.equal(child_slots(unique.cuda(), 2).cpu(), child_slots(unique, 2))
