"""Tests of `SparseTensor`: constructors, converters, same-layout ops, files and input errors.

Every property is checked against a per-sample Python loop or a dense reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from sparse3d import SparseTensor
from tests.strategies import layouts, sparse_tensors


def _per_sample(x: SparseTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample (coords [N_b, 3], feats [N_b, ...]) by masking the batch column (no offsets used)."""
    return [(x.coords[x.coords[:, 0] == b, 1:], x.feats[x.coords[:, 0] == b]) for b in range(x.batch_size)]


def _shuffle_within_samples(x: SparseTensor, seed: int) -> SparseTensor:
    """The same voxels with the rows of every sample randomly permuted (samples stay in order)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(x.num_voxels, generator=generator, dtype=torch.float64)
    order = torch.argsort(x.coords[:, 0].double() + noise * 0.5)  # [N], batch stays the major key
    return SparseTensor(
        x.coords[order], x.feats[order], batch_size=x.batch_size, spatial_shape=x.spatial_shape
    )


def _meta_tensor(x: SparseTensor) -> SparseTensor:
    """The same layout on the ``meta`` device (a stand-in for "another device" on CPU-only machines)."""
    return SparseTensor(
        x.coords.to("meta"),
        x.feats.to("meta"),
        batch_size=x.batch_size,
        spatial_shape=x.spatial_shape,
        check=False,
    )


# ---------------------------------------------------------------------------- constructors, converters


@given(layouts(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_from_list_to_list_round_trip_and_offsets(layout, channels, seed):
    coords, size = layout
    generator = torch.Generator().manual_seed(seed)
    feats = [torch.randn(c.shape[0], channels, generator=generator) for c in coords]
    x = SparseTensor.from_list(coords, feats, spatial_shape=size)

    assert x.batch_size == len(coords)
    assert x.coords.dtype == torch.int32 and x.offsets.dtype == torch.int32
    counts = [c.shape[0] for c in coords]
    assert x.counts.tolist() == counts
    expected_offsets = [0]
    for n in counts:
        expected_offsets.append(expected_offsets[-1] + n)
    assert x.offsets.tolist() == expected_offsets
    assert x.batch_index.tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    assert torch.equal(x.batch_index, x.coords[:, 0].long())
    for b in range(x.batch_size):
        rows = slice(expected_offsets[b], expected_offsets[b + 1])
        assert (x.coords[rows, 0] == b).all()

    out_coords, out_feats = x.to_list()
    assert len(out_coords) == len(coords)
    for b in range(len(coords)):
        assert torch.equal(out_coords[b], coords[b].int())
        assert torch.equal(out_feats[b], feats[b])


@given(layouts(max_batch=3), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_constructor_defaults_and_trailing_empty_samples(layout, extra, seed):
    coords, size = layout
    generator = torch.Generator().manual_seed(seed)
    feats = [torch.randn(c.shape[0], 2, generator=generator) for c in coords]
    packed = SparseTensor.from_list(coords, feats)
    nonempty = [b for b, c in enumerate(coords) if c.shape[0]]

    # Defaults: batch_size = max(batch) + 1 and spatial_shape = max(coords) + 1 (1 when empty).
    x = SparseTensor(packed.coords, packed.feats)
    assert x.batch_size == (max(nonempty) + 1 if nonempty else 1)
    if nonempty:
        assert list(x.spatial_shape) == (packed.coords[:, 1:].amax(dim=0) + 1).tolist()
    else:
        assert x.spatial_shape == (1, 1, 1)

    # Trailing empty samples exist only through batch_size, in both constructors.
    y = SparseTensor(packed.coords.long(), packed.feats, batch_size=len(coords) + extra, spatial_shape=size)
    assert y.counts.tolist() == [c.shape[0] for c in coords] + [0] * extra
    assert y.offsets.tolist()[-extra - 1 :] == [packed.num_voxels] * (extra + 1)
    z = SparseTensor.from_list(
        coords + [torch.zeros(0, 3, dtype=torch.int64)] * extra,
        feats + [torch.zeros(0, 2)] * extra,
        spatial_shape=size,
    )
    assert z.batch_size == y.batch_size and torch.equal(z.offsets, y.offsets)
    assert torch.equal(z.coords, y.coords) and torch.equal(z.feats, y.feats)
    padded, mask = z.to_padded()
    assert padded.shape[0] == z.batch_size and not mask[len(coords) :].any()


def test_single_sample_and_all_empty():
    one = SparseTensor.from_list([torch.tensor([[2, 0, 1], [0, 3, 0]])], [torch.tensor([[1.0], [2.0]])])
    assert one.batch_size == 1 and one.offsets.tolist() == [0, 2]
    assert one.to_dense()[0, 0, 2, 0, 1] == 1.0 and one.to_dense()[0, 0, 0, 3, 0] == 2.0
    empty = SparseTensor.from_list([torch.zeros(0, 3, dtype=torch.int32)] * 2, [torch.zeros(0, 4)] * 2)
    assert empty.num_voxels == 0 and empty.offsets.tolist() == [0, 0, 0]
    padded, mask = empty.to_padded()
    assert padded.shape == (2, 0, 4) and mask.shape == (2, 0)
    assert empty.to_dense().shape == (2, 4, 1, 1, 1) and not empty.to_dense().any()


@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_from_dense_to_dense_round_trip(batch, channels, size, seed):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, channels, size, size + 1, size, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, size, size + 1, size, generator=generator) < 0.3

    x = SparseTensor.from_dense(dense, mask, stride=2)
    assert x.stride == (2, 2, 2) and x.spatial_shape == (size, size + 1, size) and x.batch_size == batch
    # Per-cell loop: one row per occupied cell, in (batch, x, y, z) order, holding that cell's channels.
    cells = [tuple(c) for c in mask.nonzero().tolist()]
    assert [tuple(c) for c in x.coords.tolist()] == cells
    for row, (b, i, j, k) in enumerate(cells):
        assert torch.equal(x.feats[row], dense[b, :, i, j, k])
    x.validate()

    # dense -> sparse -> dense keeps the occupied cells and fills the rest.
    back = x.to_dense(fill_value=-7.0)
    occupied = mask[:, None].expand_as(dense)
    assert torch.equal(back[occupied], dense[occupied])
    assert (back[~occupied] == -7.0).all()

    # Default mask: any non-zero channel.
    sparse_dense = dense * mask[:, None]
    assert torch.equal(SparseTensor.from_dense(sparse_dense).coords, x.coords)


@given(sparse_tensors(), st.integers(1, 3))
def test_to_dense_vs_voxel_loop_with_trailing_dims(x, heads):
    feats = torch.arange(x.num_voxels * heads * 2, dtype=torch.float64).reshape(x.num_voxels, heads, 2)
    y = x.replace(feats)
    dense = y.to_dense(fill_value=0.5)
    assert dense.shape == (y.batch_size, heads, 2, *y.spatial_shape)
    reference = torch.full((y.batch_size, *y.spatial_shape, heads, 2), 0.5, dtype=torch.float64)
    for (b, i, j, k), value in zip(y.coords.tolist(), feats, strict=True):
        reference[b, i, j, k] = value
    assert torch.equal(dense, reference.permute(0, 4, 5, 1, 2, 3))


@given(sparse_tensors())
def test_to_padded_vs_per_sample_loop(x):
    padded, mask = x.to_padded(pad_value=-1.0)
    length = max(int(x.counts.max()), 0)
    assert padded.shape == (x.batch_size, length, *x.feats.shape[1:]) and mask.dtype == torch.bool
    for b, (_, feats) in enumerate(_per_sample(x)):
        n = feats.shape[0]
        assert torch.equal(padded[b, :n], feats)
        assert (padded[b, n:] == -1.0).all()
        assert mask[b].tolist() == [True] * n + [False] * (length - n)


# ---------------------------------------------------------------------------- same-layout ops


@given(sparse_tensors(channels=3))
def test_replace_shares_layout_and_cache(x):
    keys = x.sorted_keys()
    y = x.replace(x.feats * 2)
    assert y.coords is x.coords and y.offsets is x.offsets and y.sorted_keys() is keys
    assert torch.equal(y.feats, x.feats * 2) and y.same_layout(x)
    built = []
    assert x.cached("probe", lambda: built.append(1) or "value") == "value"
    assert y.cached("probe", lambda: built.append(1) or "other") == "value" and built == [1]
    with pytest.raises(
        ValueError, match=rf"feats: expected {x.num_voxels} rows, got shape \[{x.num_voxels + 1}"
    ):
        x.replace(torch.zeros(x.num_voxels + 1, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"feats: expected device cpu, got meta"):
        x.replace(torch.zeros(x.num_voxels, 3, device="meta"))


@given(sparse_tensors(channels=2), st.integers(1, 3))
def test_cat_channels(x, extra):
    y = x.replace(torch.ones(x.num_voxels, extra, dtype=x.dtype))
    z = x.cat_channels(y, x)
    assert z.same_layout(x)
    assert torch.equal(z.feats, torch.cat([x.feats, y.feats, x.feats], dim=-1))


def test_cat_channels_layout_error():
    x = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]]), torch.zeros(2, 1), spatial_shape=2)
    other = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0]]), torch.zeros(2, 1), spatial_shape=2)
    with pytest.raises(
        ValueError,
        match=r"others\[0\]: expected a SparseTensor with the same layout as self .*, got coords at row 1: "
        r"\[0, 0, 1, 0\] vs \[0, 1, 0, 0\] \(others\[0\] vs self\)",
    ):
        x.cat_channels(other)


@given(sparse_tensors(channels=3), st.floats(-3, 3, allow_nan=False, allow_infinity=False).filter(bool))
def test_arithmetic_matches_feature_arithmetic(x, scalar):
    y = x.replace(torch.rand_like(x.feats) + 0.5)
    row = torch.tensor([1.0, -2.0, 0.25], dtype=x.dtype)  # broadcasts over [N, 3]
    column = torch.rand(x.num_voxels, 1, dtype=x.dtype) + 1.0  # broadcasts over channels
    f, g = x.feats, y.feats
    cases = [
        (x + y, f + g),
        (x - y, f - g),
        (x * y, f * g),
        (x / y, f / g),
        (x + scalar, f + scalar),
        (scalar + x, scalar + f),
        (scalar - x, scalar - f),
        (scalar * x, scalar * f),
        (scalar / y, scalar / g),
        (x * row, f * row),
        (row - x, row - f),
        (x / column, f / column),
        (x * torch.tensor(2.0), f * 2.0),
        (-x, -f),
    ]
    for result, expected in cases:
        assert isinstance(result, SparseTensor) and result.same_layout(x)
        assert torch.equal(result.feats, expected)


def test_arithmetic_errors():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    x = SparseTensor(coords, torch.ones(3, 2), spatial_shape=(2, 2, 1))
    moved = SparseTensor(coords + torch.tensor([0, 0, 1, 0]), torch.ones(3, 2), spatial_shape=(2, 2, 1))
    # The message names the field that differs (the two reprs alone can be identical).
    same_layout = r"other: expected a SparseTensor with the same layout as self .*, got "
    with pytest.raises(ValueError, match=same_layout + r"coords at row 0: \[0, 0, 1, 0\] vs \[0, 0, 0, 0\]"):
        x + moved
    more_samples = SparseTensor(coords, torch.ones(3, 2), batch_size=3)
    with pytest.raises(ValueError, match=same_layout + r"batch_size 3 vs 2"):
        x * more_samples
    larger_grid = SparseTensor(coords, torch.ones(3, 2), spatial_shape=8)  # same rows, another grid
    with pytest.raises(ValueError, match=same_layout + r"spatial_shape \(8, 8, 8\) vs \(2, 2, 1\)"):
        x + larger_grid
    coarser = SparseTensor(coords, torch.ones(3, 2), spatial_shape=(2, 2, 1), stride=2)
    with pytest.raises(ValueError, match=same_layout + r"stride \(2, 2, 2\) vs \(1, 1, 1\)"):
        x + coarser
    fewer = SparseTensor(coords[:2], torch.ones(2, 2), batch_size=2, spatial_shape=(2, 2, 1))
    with pytest.raises(ValueError, match=same_layout + r"num_voxels 2 vs 3"):
        x + fewer
    with pytest.raises(TypeError, match=r"other: expected feats dtype torch.float32, got torch.float64"):
        x - x.to(torch.float64)
    with pytest.raises(ValueError, match=r"other: expected device cpu, got meta"):
        x + _meta_tensor(x)
    with pytest.raises(ValueError, match=r"other: expected device cpu, got meta"):
        x * torch.ones(2, device="meta")
    with pytest.raises(
        ValueError, match=r"other: expected a tensor broadcastable to feats \[3, 2\].*\[3, 1, 2\]"
    ):
        x + torch.ones(3, 1, 2)
    assert x.same_layout(x.to(torch.float64))


@given(sparse_tensors(channels=2, dtype=torch.float64))
def test_to_dtype_keeps_layout(x):
    x.sorted_keys()
    y = x.to(torch.float32)
    assert y.dtype == torch.float32 and y.coords is x.coords and y.offsets is x.offsets
    assert y.coords.dtype == torch.int32 and y.same_layout(x) and y.sorted_keys() is x.sorted_keys()
    assert torch.equal(y.feats, x.feats.float())
    z = x.detach()
    assert z.same_layout(x) and torch.equal(z.feats, x.feats)


@given(sparse_tensors(max_batch=4), st.data())
def test_select_vs_per_sample_loop(x, data):
    samples = data.draw(st.lists(st.integers(0, x.batch_size - 1), min_size=1, max_size=6))
    index = samples if data.draw(st.booleans()) else torch.tensor(samples)
    y = x.select(index)
    y.validate()
    assert y.batch_size == len(samples) and y.spatial_shape == x.spatial_shape
    per_sample = _per_sample(x)
    y_list = _per_sample(y)
    for new, old in enumerate(samples):
        assert torch.equal(y_list[new][0], per_sample[old][0])
        assert torch.equal(y_list[new][1], per_sample[old][1])
    assert y.counts.tolist() == [per_sample[b][0].shape[0] for b in samples]


def test_select_errors():
    x = SparseTensor(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"samples: expected indices in \[0, 2\), got \[0, 2\]"):
        x.select([0, 2])
    with pytest.raises(ValueError, match=r"samples: expected at least one sample index"):
        x.select([])


@given(sparse_tensors(), st.integers(0, 2**31 - 1))
def test_canonical_is_independent_of_row_order(x, seed):
    shuffled = _shuffle_within_samples(x, seed)
    a, b = x.canonical(), shuffled.canonical()
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert torch.equal(a.offsets, shuffled.offsets)
    # Canonical order is lexicographic (batch, x, y, z), and the rows keep their features.
    rows = a.coords.tolist()
    assert rows == sorted(rows)
    lookup = {tuple(c): f for c, f in zip(shuffled.coords.tolist(), shuffled.feats, strict=True)}
    for c, f in zip(rows, a.feats, strict=True):
        assert torch.equal(lookup[tuple(c)], f)
    order = shuffled.canonical_order()
    assert torch.equal(shuffled.coords[order], a.coords)


# ---------------------------------------------------------------------------- files


@given(sparse_tensors(dtype=torch.float32), st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_save_load_round_trip(tmp_path_factory, x, dtype):
    x = SparseTensor(
        x.coords,
        x.feats.to(dtype),
        batch_size=x.batch_size + 1,
        spatial_shape=x.spatial_shape,
        stride=(1, 2, 4),
    )
    path = tmp_path_factory.mktemp("files") / "x.safetensors"
    x.save(path)
    y = SparseTensor.load(path)
    assert y.batch_size == x.batch_size and y.spatial_shape == x.spatial_shape and y.stride == x.stride
    assert y.coords.dtype == torch.int32 and torch.equal(y.coords, x.coords)
    assert y.feats.dtype == dtype and torch.equal(y.feats.view(torch.uint8), x.feats.view(torch.uint8))
    assert torch.equal(y.offsets, x.offsets)


def test_save_load_empty(tmp_path):
    x = SparseTensor.from_list([torch.zeros(0, 3, dtype=torch.int32)] * 3, [torch.zeros(0, 2, 2)] * 3)
    x.save(tmp_path / "empty.safetensors")
    y = SparseTensor.load(str(tmp_path / "empty.safetensors"))
    assert y.batch_size == 3 and y.feats.shape == (0, 2, 2) and y.offsets.tolist() == [0, 0, 0, 0]


def test_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"coords": torch.zeros(1, 4, dtype=torch.int32), "feats": torch.zeros(1, 1)}, str(plain))
    with pytest.raises(ValueError, match=r"path: expected a sparse3d.SparseTensor file .*plain.safetensors"):
        SparseTensor.load(plain)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(
        ValueError, match=r"path: expected a sparse3d.SparseTensor .safetensors file, got .*garbage"
    ):
        SparseTensor.load(garbage)


# ---------------------------------------------------------------------------- integer dtypes

INTEGER_DTYPES = [
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
]


@given(sparse_tensors(channels=1), st.sampled_from(INTEGER_DTYPES))
def test_every_integer_dtype_gives_the_int64_layout(x, dtype):
    """Coordinates of any integer dtype build the same tensor as int64 ones (values fit every dtype)."""
    wide = x.coords.long()
    narrow = SparseTensor(wide.to(dtype), x.feats, batch_size=x.batch_size)  # spatial_shape inferred
    reference = SparseTensor(wide, x.feats, batch_size=x.batch_size)
    assert narrow.coords.dtype == torch.int32 and torch.equal(narrow.coords, reference.coords)
    assert narrow.spatial_shape == reference.spatial_shape and torch.equal(narrow.offsets, reference.offsets)
    coords, feats = x.to_list()
    packed = SparseTensor.from_list([c.to(dtype) for c in coords], feats)
    assert torch.equal(packed.coords, SparseTensor.from_list(coords, feats).coords)


@given(st.sampled_from(INTEGER_DTYPES), st.integers(-(2**40), 2**40), st.integers(1, 3))
def test_integer_dtype_range_check_is_true(dtype, value, axis):
    """Accepted iff 0 <= value < 2^15, for every dtype that can hold the value; the error quotes it."""
    info = torch.iinfo(dtype)
    value = min(max(value, info.min), info.max)  # a value this dtype can hold
    coords = torch.zeros(1, 4, dtype=torch.int64)
    coords[0, axis] = value
    coords = coords.to(dtype)
    if 0 <= value < 2**15:
        x = SparseTensor(coords, torch.zeros(1, 1))
        assert x.coords[0, axis].item() == value and x.spatial_shape[axis - 1] == value + 1
    else:
        with pytest.raises(ValueError, match=rf"coords: expected .*, got \[[0, ]*{value}[, 0]*\] at row 0"):
            SparseTensor(coords, torch.zeros(1, 1), spatial_shape=2**15)


# ---------------------------------------------------------------------------- input errors


def test_error_float_coords():
    with pytest.raises(TypeError, match=r"coords: expected an integer dtype .*, got torch.float32"):
        SparseTensor(torch.zeros(2, 4), torch.zeros(2, 1))
    with pytest.raises(TypeError, match=r"coords\[1\]: expected an integer dtype .*, got torch.float64"):
        SparseTensor.from_list(
            [torch.zeros(1, 3, dtype=torch.int32), torch.full((1, 3), 0.5, dtype=torch.float64)],
            [torch.zeros(1, 1), torch.zeros(1, 1)],
        )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_error_negative_coords(dtype):
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, -3, 1]], dtype=dtype)
    with pytest.raises(ValueError, match=r"coords: expected .*non-negative|coords: expected 0 <= ") as info:
        SparseTensor(coords, torch.zeros(2, 1))
    assert "[0, 2, -3, 1] at row 1" in str(info.value)
    with pytest.raises(ValueError, match=r"\[0, 2, -3, 1\] at row 1"):
        SparseTensor(coords, torch.zeros(2, 1), batch_size=1, spatial_shape=8)
    with pytest.raises(ValueError, match=r"coords: expected .*, got \[1, -1, 0, 0\]"):
        SparseTensor.from_list(
            [torch.zeros(0, 3, dtype=torch.int32), torch.tensor([[-1, 0, 0]])],
            [torch.zeros(0, 1), torch.zeros(1, 1)],
        )


def test_error_coords_outside_spatial_shape():
    coords = torch.tensor([[0, 1, 1, 1], [1, 1, 4, 0]])
    with pytest.raises(
        ValueError, match=r"coords: expected x, y, z inside spatial_shape=\(4, 4, 4\), got \[1, 4, 0\]"
    ):
        SparseTensor(coords, torch.zeros(2, 1), spatial_shape=4)
    with pytest.raises(ValueError, match=r"got \[0, 40000, 0, 0\] at row 0"):
        SparseTensor(torch.tensor([[0, 40000, 0, 0]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"got \[0, 4294967296, 0, 0\] at row 0"):  # would wrap to 0 in int32
        SparseTensor(torch.tensor([[0, 2**32, 0, 0]]), torch.zeros(1, 1), batch_size=1, spatial_shape=4)


def test_error_duplicates_within_a_sample_but_not_across_samples():
    coords = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 2, 3], [1, 1, 2, 3]])
    with pytest.raises(
        ValueError, match=r"coords: expected unique coordinates within a sample, got \[0, 1, 2, 3\]"
    ):
        SparseTensor(coords, torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"at rows \[0, 2\]"):
        SparseTensor(coords, torch.zeros(4, 1))
    same_in_two_samples = SparseTensor(coords[[0, 1, 3]], torch.zeros(3, 1))
    assert same_in_two_samples.counts.tolist() == [2, 1]


def test_error_rows_not_contiguous():
    coords = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(
        ValueError,
        match=r"coords: rows of each sample must be contiguous .*got batch 1 at row 1 then 0 at row 2",
    ):
        SparseTensor(coords, torch.zeros(3, 1))


def test_error_length_and_shape_mismatch():
    with pytest.raises(
        ValueError, match=r"feats: expected 3 rows to match coords \[N, 4\], got shape \[2, 5\]"
    ):
        SparseTensor(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 5))
    with pytest.raises(
        ValueError, match=r"coords: expected shape \[N, 4\] of \(batch, x, y, z\), got \[3, 3\]"
    ):
        SparseTensor(torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 5))
    with pytest.raises(
        ValueError, match=r"coords\[0\]: expected shape \[N, 3\] of \(x, y, z\), got \[2, 4\]"
    ):
        SparseTensor.from_list([torch.zeros(2, 4, dtype=torch.int32)], [torch.zeros(2, 1)])
    with pytest.raises(
        ValueError, match=r"feats\[1\]: expected 1 rows to match coords\[1\], got shape \[2, 1\]"
    ):
        SparseTensor.from_list(
            [torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32)],
            [torch.zeros(1, 1), torch.zeros(2, 1)],
        )
    with pytest.raises(ValueError, match=r"feats\[1\]: expected trailing shape \[1\] .*got \[2\]"):
        SparseTensor.from_list(
            [torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32)],
            [torch.zeros(1, 1), torch.zeros(1, 2)],
        )
    with pytest.raises(
        ValueError, match=r"coords and feats: expected two non-empty lists of equal length, got 2 and 1"
    ):
        SparseTensor.from_list([torch.zeros(0, 3, dtype=torch.int32)] * 2, [torch.zeros(0, 1)])
    with pytest.raises(ValueError, match=r"dense: expected shape \[B, C, X, Y, Z\], got \[2, 3, 4\]"):
        SparseTensor.from_dense(torch.zeros(2, 3, 4))
    with pytest.raises(
        ValueError, match=r"mask: expected bool of shape \[1, 2, 2, 2\] .*got torch.bool \[1, 2, 2\]"
    ):
        SparseTensor.from_dense(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_error_device_mismatch():
    with pytest.raises(ValueError, match=r"feats: expected device cpu \(that of coords\), got meta"):
        SparseTensor(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 2, device="meta"))
    with pytest.raises(
        ValueError, match=r"coords\[0\] and feats\[0\]: expected device cpu .*got cpu and meta"
    ):
        SparseTensor.from_list([torch.zeros(1, 3, dtype=torch.int32)], [torch.zeros(1, 2, device="meta")])


def test_error_batch_size_too_small_and_bad_metadata():
    coords = torch.tensor([[0, 0, 0, 0], [2, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"coords: batch index must be < batch_size=2, got max 2"):
        SparseTensor(coords, torch.zeros(2, 1), batch_size=2)
    with pytest.raises(ValueError, match=r"batch_size: expected >= 1, got 0"):
        SparseTensor(coords[:0], torch.zeros(0, 1), batch_size=0)
    with pytest.raises(ValueError, match=r"spatial_shape: expected an int or 3 ints, got \(4, 4\)"):
        SparseTensor(coords, torch.zeros(2, 1), spatial_shape=(4, 4))
    with pytest.raises(TypeError, match=r"stride: expected an int or 3 ints, got \(2.5, 1, 1\)"):
        SparseTensor(coords, torch.zeros(2, 1), stride=(2.5, 1, 1))
    with pytest.raises(TypeError, match=r"batch_size: expected an int, got 2.0"):
        SparseTensor(coords, torch.zeros(2, 1), batch_size=2.0)
    with pytest.raises(ValueError, match=r"stride: expected values >= 1, got 0"):
        SparseTensor(coords, torch.zeros(2, 1), stride=0)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@given(sparse_tensors(channels=3, dtype=torch.float32), st.integers(0, 2**31 - 1))
def test_cuda_matches_cpu(x, seed):
    cuda = x.to("cuda")
    assert cuda.coords.device.type == "cuda" and cuda.offsets.device.type == "cuda"
    again = SparseTensor(cuda.coords, cuda.feats, batch_size=x.batch_size, spatial_shape=x.spatial_shape)
    assert torch.equal(again.offsets.cpu(), x.offsets)
    assert torch.equal(cuda.to_dense().cpu(), x.to_dense())
    padded, mask = cuda.to_padded()
    expected_padded, expected_mask = x.to_padded()
    assert torch.equal(padded.cpu(), expected_padded) and torch.equal(mask.cpu(), expected_mask)
    samples = [x.batch_size - 1, 0, 0]
    assert torch.equal(cuda.select(samples).feats.cpu(), x.select(samples).feats)
    shuffled = _shuffle_within_samples(x, seed)
    assert torch.equal(shuffled.to("cuda").canonical().coords.cpu(), x.canonical().coords)
    assert torch.equal((cuda * 2 + cuda).feats.cpu(), (x * 2 + x).feats)
    cpu_dense = x.to_dense()
    assert torch.equal(
        SparseTensor.from_dense(cpu_dense.cuda(), cpu_dense.ne(0).any(1).cuda()).coords.cpu(),
        SparseTensor.from_dense(cpu_dense, cpu_dense.ne(0).any(1)).coords,
    )
