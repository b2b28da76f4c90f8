"""Pooling ops against dense references: downsample, upsample, patchify/unpatchify, subdivide."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse3d import SparseTensor
from sparse3d.functional import downsample, patchify, subdivide, unpatchify, upsample
from sparse3d.nn import SparseDownsample, SparsePatchify, SparseSubdivide, SparseUnpatchify, SparseUpsample
from tests.strategies import sparse_tensors

FACTORS = st.sampled_from([1, 2, 3, (1, 2, 3), (2, 1, 2), (3, 2, 1)])
REDUCES = st.sampled_from(["mean", "amax", "sum"])


def _triple(factor: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (factor,) * 3 if isinstance(factor, int) else tuple(factor)


def _occupancy(x: SparseTensor) -> torch.Tensor:
    """Dense bool occupancy ``[B, X, Y, Z]``."""
    ones = torch.ones(x.num_voxels, 1, dtype=torch.float64)
    return x.replace(ones).to_dense()[:, 0] > 0


def _pad_to(dense: torch.Tensor, factor: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pads the three trailing axes of ``[B, C, X, Y, Z]`` up to multiples of ``factor``."""
    pads = []
    for size, f in zip(reversed(dense.shape[2:]), reversed(factor), strict=True):
        pads += [0, (-size) % f]
    return F.pad(dense, pads, value=value)


def _at(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, C]`` of a dense ``[B, C, X, Y, Z]`` grid at (b, x, y, z) coordinates."""
    c = coords.long()
    return dense.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def _dense_pool(x: SparseTensor, factor: tuple[int, int, int], reduce: str) -> torch.Tensor:
    """Dense pooling over occupied cells only, ``[B, C, Xc, Yc, Zc]``."""
    num_slots = math.prod(factor)
    if reduce == "amax":
        return F.max_pool3d(_pad_to(x.to_dense(fill_value=-math.inf), factor, -math.inf), factor, factor)
    total = F.avg_pool3d(_pad_to(x.to_dense(), factor, 0.0), factor, factor) * num_slots
    if reduce == "sum":
        return total
    occupancy = _pad_to(_occupancy(x)[:, None].double(), factor, 0.0)
    count = F.avg_pool3d(occupancy, factor, factor) * num_slots
    return total / count.clamp(min=1)


def _shuffled_rows(x: SparseTensor, seed: int) -> SparseTensor:
    """Same voxels, rows shuffled within each sample (a valid, non-canonical layout, no memo)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(x.num_voxels, generator=generator)
    order = torch.sort(x.batch_index.double() + noise, stable=True).indices
    return SparseTensor(
        x.coords[order],
        x.feats[order],
        batch_size=x.batch_size,
        spatial_shape=x.spatial_shape,
        stride=x.stride,
    )


def _fresh(x: SparseTensor) -> SparseTensor:
    """Same layout without any memo."""
    return SparseTensor(
        x.coords.clone(), x.feats, batch_size=x.batch_size, spatial_shape=x.spatial_shape, stride=x.stride
    )


# --------------------------------------------------------------------------- downsample


@given(x=sparse_tensors(), factor=FACTORS, reduce=REDUCES)
def test_downsample_matches_dense_pooling(x: SparseTensor, factor, reduce: str) -> None:
    f = _triple(factor)
    feats = x.feats.clone().requires_grad_(True)
    x = x.replace(feats)
    coarse, child_to_parent = downsample(x, factor, reduce)
    coarse.validate()
    occupied = F.max_pool3d(_pad_to(_occupancy(x)[:, None].double(), f, 0.0), f, f)[:, 0] > 0
    assert torch.equal(coarse.coords, occupied.nonzero().int())
    assert coarse.stride == f and coarse.batch_size == x.batch_size
    assert coarse.spatial_shape == tuple(-(-s // g) for s, g in zip(x.spatial_shape, f, strict=True))
    expected_parent = torch.div(x.coords[:, 1:], torch.tensor(f, dtype=torch.int32), rounding_mode="floor")
    assert torch.equal(coarse.coords[child_to_parent, 1:], expected_parent)
    assert torch.equal(coarse.coords[child_to_parent, 0], x.coords[:, 0])

    reference = _at(_dense_pool(x, f, reduce), coarse.coords)
    torch.testing.assert_close(coarse.feats, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(reference)
    (grad,) = torch.autograd.grad((coarse.feats * upstream).sum(), feats)
    (grad_ref,) = torch.autograd.grad((reference * upstream).sum(), feats)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


@given(x=sparse_tensors(), factor=FACTORS, reduce=REDUCES, seed=st.integers(0, 1000))
def test_downsample_batched_equals_per_sample_and_permutes(x: SparseTensor, factor, reduce, seed) -> None:
    coarse, _ = downsample(x, factor, reduce)
    for b in range(x.batch_size):
        single, _ = downsample(x.select([b]), factor, reduce)
        part = coarse.select([b])
        assert torch.equal(single.coords, part.coords)
        assert torch.equal(single.feats, part.feats)
    perm = torch.randperm(x.batch_size, generator=torch.Generator().manual_seed(seed))
    permuted, _ = downsample(x.select(perm), factor, reduce)
    expected = coarse.select(perm)
    assert torch.equal(permuted.coords, expected.coords) and torch.equal(permuted.feats, expected.feats)
    assert torch.equal(permuted.offsets, expected.offsets)


@given(x=sparse_tensors(allow_empty=False), reduce=REDUCES)
def test_downsample_factor_one_is_identity(x: SparseTensor, reduce: str) -> None:
    coarse, child_to_parent = downsample(x, 1, reduce)
    assert torch.equal(coarse.coords, x.coords) and torch.equal(coarse.feats, x.feats)
    assert torch.equal(child_to_parent, torch.arange(x.num_voxels))


def test_downsample_empty_and_single_voxel() -> None:
    empty = SparseTensor(
        torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 3), batch_size=2, spatial_shape=4
    )
    for reduce in ("mean", "amax", "sum"):
        coarse, child_to_parent = downsample(empty, 2, reduce)
        assert (
            coarse.num_voxels == 0 and coarse.offsets.tolist() == [0, 0, 0] and child_to_parent.numel() == 0
        )
    one = SparseTensor(torch.tensor([[0, 3, 1, 2]]), torch.tensor([[-1.5, 2.0]]), spatial_shape=4)
    for reduce in ("mean", "amax", "sum"):
        coarse, _ = downsample(one, 2, reduce)
        assert coarse.coords.tolist() == [[0, 1, 0, 1]]
        assert torch.equal(coarse.feats, one.feats)


# --------------------------------------------------------------------------- upsample


@given(x=sparse_tensors(), factor=FACTORS)
def test_upsample_of_downsample_restores_layout_with_parent_means(x: SparseTensor, factor) -> None:
    f = torch.tensor(_triple(factor), dtype=torch.int32)
    coarse, child_to_parent = downsample(x, factor, "mean")
    # Brute-force parent means: voxels sharing batch and floor(c / f) form a block.
    key = torch.cat([x.coords[:, :1], torch.div(x.coords[:, 1:], f, rounding_mode="floor")], dim=1)
    same = (key[:, None, :] == key[None, :, :]).all(dim=-1).double()  # [N, N]
    means = same @ x.feats / same.sum(dim=1, keepdim=True).clamp(min=1)
    for restored in (
        upsample(coarse, x),  # memo of the downsample
        upsample(coarse, x, child_to_parent),  # explicit map
        upsample(coarse, _fresh(x)),  # lookup
    ):
        assert torch.equal(restored.coords, x.coords) and restored.stride == x.stride
        torch.testing.assert_close(restored.feats, means, rtol=1e-12, atol=1e-12)


@given(x=sparse_tensors(), factor=FACTORS, seed=st.integers(0, 1000))
def test_upsample_matches_dense_nearest(x: SparseTensor, factor, seed: int) -> None:
    f = _triple(factor)
    coarse, _ = downsample(x, factor, "sum")
    coarse_feats = torch.randn_like(coarse.feats).requires_grad_(True)
    coarse = coarse.replace(coarse_feats)
    fine = _shuffled_rows(x, seed)
    out = upsample(coarse, fine)
    assert torch.equal(out.coords, fine.coords)
    dense = coarse.to_dense()
    for axis, g in enumerate(f):
        dense = dense.repeat_interleave(g, dim=2 + axis)
    reference = _at(dense, fine.coords)
    assert torch.equal(out.feats, reference)
    upstream = torch.randn_like(reference)
    (grad,) = torch.autograd.grad((out.feats * upstream).sum(), coarse_feats)
    (grad_ref,) = torch.autograd.grad((reference * upstream).sum(), coarse_feats)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_upsample_errors() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0], [1, 3, 3, 3]])
    fine = SparseTensor(coords, torch.randn(3, 2), batch_size=2, spatial_shape=4)
    coarse, _ = downsample(fine, 2)
    partial = SparseTensor(coarse.coords[:2], coarse.feats[:2], batch_size=2, spatial_shape=2, stride=2)
    with pytest.raises(ValueError, match=r"fine: every voxel needs a parent in coarse.*\[1, 3, 3, 3\]"):
        upsample(partial, fine)
    fine_stride_2 = SparseTensor(coords, torch.randn(3, 2), batch_size=2, spatial_shape=4, stride=2)
    with pytest.raises(ValueError, match=r"coarse.stride: expected a multiple of fine.stride=\(2, 2, 2\)"):
        upsample(SparseTensor(coarse.coords, coarse.feats, spatial_shape=2, stride=3), fine_stride_2)
    three = SparseTensor(coarse.coords, coarse.feats, batch_size=3, spatial_shape=2, stride=2)
    with pytest.raises(ValueError, match=r"coarse.batch_size: expected 2 \(that of fine\), got 3"):
        upsample(three, fine)
    with pytest.raises(ValueError, match=r"child_to_parent: expected an integer tensor \[3\]"):
        upsample(coarse, fine, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="coarse and fine: expected SparseTensor"):
        upsample(coarse.feats, fine)


# --------------------------------------------------------------------------- patchify / unpatchify


@given(x=sparse_tensors(), factor=FACTORS)
def test_patchify_matches_dense_blocks(x: SparseTensor, factor) -> None:
    f = _triple(factor)
    num_slots = math.prod(f)
    tokens, occupancy = patchify(x, factor)
    coarse, _ = downsample(x, factor)
    assert torch.equal(tokens.coords, coarse.coords) and tokens.stride == coarse.stride
    assert tokens.feats.shape == (coarse.num_voxels, num_slots * x.feats.shape[1])
    dense = _pad_to(x.to_dense(), f, 0.0)
    batch, channels, size_x, size_y, size_z = dense.shape
    blocks = dense.view(batch, channels, size_x // f[0], f[0], size_y // f[1], f[1], size_z // f[2], f[2])
    blocks = blocks.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, Xc, Yc, Zc, fx, fy, fz, C]
    blocks = blocks.reshape(batch, size_x // f[0], size_y // f[1], size_z // f[2], num_slots * channels)
    c = tokens.coords.long()
    assert torch.equal(tokens.feats, blocks[c[:, 0], c[:, 1], c[:, 2], c[:, 3]])
    occupied = _pad_to(_occupancy(x)[:, None].double(), f, 0.0)[:, 0]
    occupied = occupied.view(batch, size_x // f[0], f[0], size_y // f[1], f[1], size_z // f[2], f[2])
    occupied = occupied.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, *blocks.shape[1:4], num_slots) > 0
    assert torch.equal(occupancy, occupied[c[:, 0], c[:, 1], c[:, 2], c[:, 3]])


@given(x=sparse_tensors(), factor=FACTORS, seed=st.integers(0, 1000))
def test_unpatchify_inverts_patchify_bitwise(x: SparseTensor, factor, seed: int) -> None:
    tokens, _ = patchify(x, factor)
    assert torch.equal(unpatchify(tokens, x).feats, x.feats)
    assert torch.equal(unpatchify(tokens, _fresh(x)).feats, x.feats)
    shuffled = _shuffled_rows(x, seed)
    assert torch.equal(unpatchify(tokens, shuffled).feats, shuffled.feats)
    tokens_shuffled, _ = patchify(shuffled, factor)
    assert torch.equal(tokens_shuffled.feats, tokens.feats)  # token order is canonical
    # Gradient of the round trip is the identity.
    feats = x.feats.clone().requires_grad_(True)
    upstream = torch.randn_like(feats)
    (grad,) = torch.autograd.grad(
        (unpatchify(patchify(x.replace(feats), factor)[0], x).feats * upstream).sum(), feats
    )
    assert torch.equal(grad, upstream)


@given(x=sparse_tensors(), factor=FACTORS, seed=st.integers(0, 1000))
def test_patchify_batched_equals_per_sample_and_permutes(x: SparseTensor, factor, seed: int) -> None:
    tokens, occupancy = patchify(x, factor)
    for b in range(x.batch_size):
        single, single_occupancy = patchify(x.select([b]), factor)
        rows = slice(int(tokens.offsets[b]), int(tokens.offsets[b + 1]))
        assert torch.equal(single.feats, tokens.feats[rows])
        assert torch.equal(single_occupancy, occupancy[rows])
        assert torch.equal(unpatchify(single, x.select([b])).feats, x.select([b]).feats)
    perm = torch.randperm(x.batch_size, generator=torch.Generator().manual_seed(seed))
    permuted, _ = patchify(x.select(perm), factor)
    assert torch.equal(permuted.feats, tokens.select(perm).feats)


def test_patchify_errors() -> None:
    x = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]), torch.randn(2, 3), spatial_shape=4)
    with pytest.raises(ValueError, match=r"x.feats: expected shape \[N, C\]"):
        patchify(x.replace(torch.randn(2, 3, 2)), 2)
    tokens, _ = patchify(x, 2)
    with pytest.raises(ValueError, match=r"tokens.feats: expected shape \[M, F \* C\] with F = 8"):
        unpatchify(tokens.replace(tokens.feats[:, :20]), x)
    with pytest.raises(ValueError, match=r"tokens.stride: expected a multiple of fine.stride=\(2, 2, 2\)"):
        fine = SparseTensor(x.coords, x.feats, spatial_shape=4, stride=2)
        unpatchify(SparseTensor(tokens.coords, tokens.feats, spatial_shape=2, stride=(4, 4, 3)), fine)


# --------------------------------------------------------------------------- subdivide


@given(x=sparse_tensors(max_size=5), factor=FACTORS)
def test_subdivide_matches_repeat_interleave(x: SparseTensor, factor) -> None:
    f = _triple(factor)
    x = SparseTensor(x.coords, x.feats.clone().requires_grad_(True), spatial_shape=x.spatial_shape,
                     batch_size=x.batch_size, stride=tuple(2 * g for g in f))  # fmt: skip
    fine = subdivide(x, factor)
    fine.validate()
    assert fine.stride == (2, 2, 2) and fine.spatial_shape == tuple(
        s * g for s, g in zip(x.spatial_shape, f, strict=True)
    )
    dense = x.to_dense()
    occupancy = _occupancy(x)[:, None].double()
    for axis, g in enumerate(f):
        dense = dense.repeat_interleave(g, dim=2 + axis)
        occupancy = occupancy.repeat_interleave(g, dim=2 + axis)
    assert torch.equal(_occupancy(fine), occupancy[:, 0] > 0)
    assert torch.equal(fine.to_dense(), dense)
    upstream = torch.randn_like(fine.feats)
    (grad,) = torch.autograd.grad((fine.feats * upstream).sum(), x.feats)
    (grad_ref,) = torch.autograd.grad((_at(dense, fine.coords) * upstream).sum(), x.feats)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    # Round trips: every parent is full, so mean-pooling restores x; upsample restores the copies.
    back, _ = downsample(fine, factor)
    assert torch.equal(back.canonical().coords, x.canonical().coords)
    torch.testing.assert_close(back.canonical().feats, x.canonical().feats, rtol=1e-12, atol=1e-12)
    assert torch.equal(upsample(x, fine).feats, fine.feats)
    assert torch.equal(upsample(x, _fresh(fine)).feats, fine.feats)


def test_subdivide_errors_and_factor_validation() -> None:
    x = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]), torch.randn(2, 3), spatial_shape=4, stride=2)
    message = r"factor: expected a divisor of x.stride=\(2, 2, 2\) per axis, got 3"
    with pytest.raises(ValueError, match=message):
        subdivide(x, 3)
    for bad, error in [(0, ValueError), ((1, 2), ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="factor: expected"):
            downsample(x, bad)
        with pytest.raises(error, match="factor: expected"):
            patchify(x, bad)
        with pytest.raises(error, match="factor: expected"):
            subdivide(x, bad)
    with pytest.raises(ValueError, match="reduce: expected one of 'mean', 'amax', 'sum', got 'min'"):
        downsample(x, 2, "min")


# --------------------------------------------------------------------------- gradcheck, modules


def test_gradcheck_tiny() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 3, 2, 1], [2, 1, 1, 1], [2, 0, 1, 0]])
    layout = SparseTensor(coords, torch.zeros(5, 2, dtype=torch.float64), batch_size=3, spatial_shape=4)
    feats = torch.randn(5, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    for reduce in ("mean", "amax", "sum"):
        assert torch.autograd.gradcheck(
            lambda f, r=reduce: downsample(layout.replace(f), (2, 1, 2), r)[0].feats, feats
        )
    coarse, _ = downsample(layout, 2)
    coarse_feats = torch.randn(
        coarse.num_voxels, 2, dtype=torch.float64, generator=generator, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda f: upsample(coarse.replace(f), layout).feats, coarse_feats)
    assert torch.autograd.gradcheck(lambda f: patchify(layout.replace(f), 2)[0].feats, feats)
    tokens, _ = patchify(layout, 2)
    token_feats = torch.randn(
        tokens.feats.shape, dtype=torch.float64, generator=generator, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda f: unpatchify(tokens.replace(f), layout).feats, token_feats)
    strided = SparseTensor(coords, feats.detach(), batch_size=3, spatial_shape=4, stride=2)
    assert torch.autograd.gradcheck(lambda f: subdivide(strided.replace(f), 2).feats, feats)


def test_modules_match_functional() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 3, 2, 1], [1, 1, 1, 1]])
    x = SparseTensor(coords, torch.randn(4, 3), spatial_shape=4, stride=2)
    coarse = SparseDownsample(2, "amax")(x)
    assert torch.equal(coarse.feats, downsample(x, 2, "amax")[0].feats)
    assert torch.equal(SparseUpsample()(coarse, x).feats, upsample(coarse, x).feats)
    tokens = SparsePatchify(2)(x)
    assert torch.equal(SparseUnpatchify()(tokens, x).feats, x.feats)
    assert torch.equal(SparseSubdivide(2)(x).feats, subdivide(x, 2).feats)


# --------------------------------------------------------------------------- GPU determinism


def _large_layout(device: str, num_samples: int = 6, size: int = 64) -> SparseTensor:
    """About 100k voxels: thick random shells, one empty sample."""
    generator = torch.Generator().manual_seed(0)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    coords, feats = [], []
    for b in range(num_samples):
        if b == 1:
            coords.append(torch.zeros(0, 3, dtype=torch.int32))
        else:
            radius = size * (0.25 + 0.15 * torch.rand(1, generator=generator).item())
            shell = ((grid - size / 2).norm(dim=-1) - radius).abs() < 2.0
            coords.append(shell.nonzero().int())
        feats.append(torch.randn(coords[-1].shape[0], 16, generator=generator))
    return SparseTensor.from_list(coords, feats, spatial_shape=size).to(device)


@pytest.mark.gpu
def test_ops_are_bitwise_deterministic_on_cuda() -> None:
    x = _large_layout("cuda")
    assert x.num_voxels > 80_000

    def run(op):
        feats = x.feats.clone().requires_grad_(True)
        layout = _fresh(x.replace(feats))
        out = op(layout)
        upstream = torch.randn(
            out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda"
        )
        (grad,) = torch.autograd.grad((out * upstream).sum(), feats)
        return out.detach(), grad

    ops = {
        **{f"downsample_{r}": (lambda t, r=r: downsample(t, 2, r)[0].feats) for r in ("mean", "amax", "sum")},
        "upsample": lambda t: upsample(downsample(t, 2)[0], t).feats,
        "upsample_lookup": lambda t: upsample(downsample(t, 2)[0], _fresh(t)).feats,
        "patchify": lambda t: patchify(t, 2)[0].feats,
        "unpatchify": lambda t: unpatchify(patchify(t, 2)[0].replace(patchify(t, 2)[0].feats * 2), t).feats,
        "subdivide": lambda t: subdivide(SparseTensor(t.coords, t.feats, batch_size=t.batch_size,
                                                      spatial_shape=t.spatial_shape, stride=2), 2).feats,
    }  # fmt: skip
    for name, op in ops.items():
        first, second = run(op), run(op)
        assert torch.equal(first[0], second[0]), f"{name}: forward differs between runs"
        assert torch.equal(first[1], second[1]), f"{name}: backward differs between runs"
    # Upsample's backward sums many children into one parent: check it separately.
    coarse, _ = downsample(x, 2)
    grads = []
    for _ in range(2):
        coarse_feats = coarse.feats.clone().requires_grad_(True)
        out = upsample(coarse.replace(coarse_feats), x)
        upstream = torch.randn(
            out.shape, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda"
        )
        grads.append(torch.autograd.grad((out.feats * upstream).sum(), coarse_feats)[0])
    assert torch.equal(grads[0], grads[1])
