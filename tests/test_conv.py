"""Tests of sparse convolution, kernel maps and backend dispatch against dense conv and brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse3d.functional.conv as conv_module
import sparse3d.kernels as kernels
from sparse3d import SparseTensor
from sparse3d.functional import (
    conv_output_layout,
    invert_kernel_map,
    kernel_map,
    kernel_offsets,
    sparse_conv3d,
    weight_from_dense,
    weight_from_minkowski,
    weight_from_spconv,
    weight_to_dense,
    weight_to_minkowski,
    weight_to_spconv,
)
from sparse3d.functional.coords import _triple, pack_keys
from sparse3d.kernels import available_backends, current_backend, use_backend
from sparse3d.nn import SparseConv3d
from tests.strategies import layouts, sparse_tensors

# ---------------------------------------------------------------------------------------------- helpers


def _with_stride(x: SparseTensor, stride: int) -> SparseTensor:
    """Same coords and feats, declared at ``stride`` (needed as input of a default transposed conv)."""
    return SparseTensor(
        x.coords, x.feats, batch_size=x.batch_size, spatial_shape=x.spatial_shape, stride=stride, check=False
    )


def dense_reference(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_layout: SparseTensor,
    kernel_size: int,
    stride: int,
    dilation: int,
    transposed: bool,
) -> torch.Tensor:
    """The dense conv (or transposed conv) of the densified input, read at ``out_layout``'s coords."""
    size, s, d = _triple(kernel_size, "k"), _triple(stride, "s"), _triple(dilation, "d")
    centre = [(k - 1) // 2 for k in size]
    dense = x.to_dense()  # [B, C_in, X, Y, Z], zero outside the active sites
    out_shape = out_layout.spatial_shape
    if not transposed:
        pads: list[int] = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            low = centre[axis] * d[axis]
            high = (size[axis] - 1 - centre[axis]) * d[axis] + s[axis] * out_shape[axis]
            pads += [low, high]
        out = F.conv3d(F.pad(dense, pads), weight_to_dense(weight, size), bias, stride=s, dilation=d)
    else:
        padded = F.pad(dense, (0, 1, 0, 1, 0, 1))  # one spare cell so the output covers X * s
        padding = [c * dd for c, dd in zip(centre, d, strict=True)]
        out = F.conv_transpose3d(
            padded,
            weight_to_dense(weight, size, transposed=True),
            bias,
            stride=s,
            padding=padding,
            dilation=d,
        )
    assert all(out.shape[2 + a] >= out_shape[a] for a in range(3)), (out.shape, out_shape)
    c = out_layout.coords.long()
    return out.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]  # [M, C_out]


def _random_params(c_in: int, c_out: int, kernel_size: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    num_k = math.prod(_triple(kernel_size, "k"))
    weight = torch.randn(num_k, c_in, c_out, generator=generator, dtype=dtype)
    bias = torch.randn(c_out, generator=generator, dtype=dtype)
    return weight, bias


def _check_against_dense(
    x, weight, bias, kernel_size, stride, dilation, transposed, out_layout=None, layout_rule="parents"
):
    """Forward and backward (feats, weight, bias) of the sparse conv equal the dense reference."""
    feats = x.feats.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    x = x.replace(feats)
    y = sparse_conv3d(
        x,
        weight,
        bias,
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        transposed=transposed,
        out_layout=out_layout,
        layout_rule=layout_rule,
    )
    layout = out_layout if out_layout is not None else y
    ref = dense_reference(x, weight, bias, layout, kernel_size, stride, dilation, transposed)
    torch.testing.assert_close(y.feats, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad((y.feats * upstream).sum(), (feats, weight, bias), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (feats, weight, bias), allow_unused=True)
    for name, got, want in zip(("feats", "weight", "bias"), grads, ref_grads, strict=True):
        got = torch.zeros_like(want) if got is None and want is not None else got
        want = torch.zeros_like(got) if want is None and got is not None else want
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    return y


# ---------------------------------------------------------------------------------------------- vs dense


@pytest.mark.parametrize(("kernel_size", "dilation"), [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
@given(x=sparse_tensors(max_size=6), c_out=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_submanifold_matches_dense(x, c_out, seed, kernel_size, dilation):
    weight, bias = _random_params(x.feats.shape[1], c_out, kernel_size, seed)
    y = _check_against_dense(x, weight, bias, kernel_size, 1, dilation, False)
    assert torch.equal(y.coords, x.coords) and y.stride == x.stride


@pytest.mark.parametrize(("kernel_size", "stride", "dilation"), [(2, 2, 1), (3, 2, 1), (3, 2, 2), (1, 3, 1)])
@given(x=sparse_tensors(max_size=7), c_out=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_strided_matches_dense(x, c_out, seed, kernel_size, stride, dilation):
    weight, bias = _random_params(x.feats.shape[1], c_out, kernel_size, seed)
    y = _check_against_dense(x, weight, bias, kernel_size, stride, dilation, False)
    # Output layout: exactly the parents floor(coords / s), at stride s, on a ceil(shape / s) grid.
    parents = x.coords.clone()
    parents[:, 1:] //= stride
    expected = torch.unique(parents, dim=0)
    assert torch.equal(y.coords, expected.int())
    assert y.stride == (stride,) * 3
    assert y.spatial_shape == tuple(-(-a // stride) for a in x.spatial_shape)


@pytest.mark.parametrize(("kernel_size", "stride"), [(2, 2), (3, 2)])
@given(x=sparse_tensors(max_size=5), c_out=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_transposed_default_layout_matches_dense(x, c_out, seed, kernel_size, stride):
    x = _with_stride(x, stride)
    weight, bias = _random_params(x.feats.shape[1], c_out, kernel_size, seed)
    y = _check_against_dense(x, weight, bias, kernel_size, stride, 1, True)
    assert y.num_voxels == x.num_voxels * stride**3 and y.stride == (1, 1, 1)
    # Children are exactly the cells whose parent is active.
    parents = y.coords.clone()
    parents[:, 1:] //= stride
    assert torch.equal(torch.unique(parents, dim=0).int(), torch.unique(x.coords, dim=0).int())


@pytest.mark.parametrize(("kernel_size", "dilation"), [(3, 1), (2, 1), (3, 2)])
@given(fine=sparse_tensors(max_size=8), c_out=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_transposed_with_out_layout_matches_dense(fine, c_out, seed, kernel_size, dilation):
    """Transposed conv from a downsampled layout back onto the layout before the downsample."""
    layout = conv_output_layout(fine, stride=2)
    generator = torch.Generator().manual_seed(seed)
    coarse = layout.replace(torch.randn(layout.num_voxels, 3, generator=generator, dtype=torch.float64))
    weight, bias = _random_params(3, c_out, kernel_size, seed + 1)
    y = _check_against_dense(coarse, weight, bias, kernel_size, 2, dilation, True, out_layout=fine)
    assert torch.equal(y.coords, fine.coords) and y.stride == fine.stride


@given(x=sparse_tensors(max_size=6), seed=st.integers(0, 2**31 - 1))
def test_strided_then_transposed_round_trip_matches_dense(x, seed):
    """A down conv then an up conv back onto the fine layout equals the dense pipeline."""
    w_down, b_down = _random_params(x.feats.shape[1], 2, 3, seed)
    w_up, b_up = _random_params(2, 2, 3, seed + 1)
    coarse = sparse_conv3d(x, w_down, b_down, kernel_size=3, stride=2)
    fine = sparse_conv3d(coarse, w_up, b_up, kernel_size=3, stride=2, transposed=True, out_layout=x)
    dense_coarse = dense_reference(x, w_down, b_down, coarse, 3, 2, 1, False)
    torch.testing.assert_close(coarse.feats, dense_coarse)
    ref = dense_reference(coarse, w_up, b_up, x, 3, 2, 1, True)
    torch.testing.assert_close(fine.feats, ref)


@pytest.mark.parametrize(
    ("kernel_size", "stride", "transposed"), [(3, 1, False), (3, 2, False), (2, 2, True)]
)
@settings(max_examples=8)
@given(x=sparse_tensors(max_size=5, min_size=4, channels=3), seed=st.integers(0, 2**31 - 1))
def test_row_chunking_matches_dense(x, seed, kernel_size, stride, transposed):
    """Tiny gather chunks (several rows each) give the dense result forward and backward."""
    x = _with_stride(x, stride) if transposed else x
    weight, bias = _random_params(3, 2, kernel_size, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_module, "GATHER_CHUNK_ELEMENTS", 16 * 3 * math.prod(_triple(kernel_size, "k")))
        _check_against_dense(x, weight, bias, kernel_size, stride, 1, transposed)


def offsets_of_batch(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """int32 ``[B + 1]`` offsets counted from a batch column."""
    counts = torch.bincount(batch.long(), minlength=batch_size)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()


def dense_conv_with_support(x, weight, bias, kernel_size, stride, dilation, transposed):
    """``F.conv3d`` (or ``F.conv_transpose3d``) with ``padding = d * ((k - 1) // 2)`` of the densified input,
    its support (cells whose window holds an active input: the dense conv of the occupancy with a kernel of
    ones is positive) and the output extent."""
    size, s, d = _triple(kernel_size, "k"), _triple(stride, "s"), _triple(dilation, "d")
    padding = [dd * ((k - 1) // 2) for k, dd in zip(size, d, strict=True)]
    occupancy = x.replace(torch.ones(x.num_voxels, 1, dtype=torch.float64)).to_dense()  # [B, 1, X, Y, Z]
    ones = torch.ones(1, 1, *size, dtype=torch.float64)
    conv = F.conv_transpose3d if transposed else F.conv3d
    reach = conv(occupancy, ones, stride=s, padding=padding, dilation=d)[:, 0]  # [B, X', Y', Z']
    dense_weight = weight_to_dense(weight, size, transposed=transposed)
    out = conv(x.to_dense(), dense_weight, bias, stride=s, padding=padding, dilation=d)  # [B, C_out, ...]
    support = reach > 0.5
    return support.nonzero(), out.permute(0, 2, 3, 4, 1)[support], tuple(out.shape[2:])


REACHED_CASES = [
    # (kernel_size, stride, dilation, transposed)
    (3, 2, 1, False),  # spconv's SparseConv3d(k=3, s=2, p=1)
    (3, 1, 1, False),  # full (non-submanifold) conv: the layout dilates
    (2, 2, 1, False),
    ((3, 2, 5), (2, 1, 2), (2, 1, 1), False),
    (3, 2, 1, True),  # spconv's SparseConvTranspose3d(k=3, s=2, p=1)
    (2, 2, 1, True),
]


@pytest.mark.parametrize(("kernel_size", "stride", "dilation", "transposed"), REACHED_CASES)
@settings(max_examples=10)
@given(x=sparse_tensors(max_size=6, max_batch=3), c_out=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_reached_layout_matches_dense_conv(x, c_out, seed, kernel_size, stride, dilation, transposed):
    """layout_rule="reached": the output voxels are the support of the dense convolution (spconv's rule)
    and the features (and gradients) equal the dense convolution there."""
    s = _triple(stride, "s")
    if transposed:
        x = _with_stride(x, stride)
    weight, bias = _random_params(x.feats.shape[1], c_out, kernel_size, seed)
    # Features and gradients at the produced voxels (against the dense reference read at those voxels) ...
    y = _check_against_dense(
        x, weight, bias, kernel_size, stride, dilation, transposed, layout_rule="reached"
    )
    # ... and the voxels are exactly the support of F.conv3d / F.conv_transpose3d with standard padding.
    support, expected, shape = dense_conv_with_support(
        x, weight, bias, kernel_size, stride, dilation, transposed
    )
    assert y.spatial_shape == shape
    assert torch.equal(y.coords, support.int())
    expected_stride = tuple(a // b if transposed else a * b for a, b in zip(x.stride, s, strict=True))
    assert y.stride == expected_stride
    SparseTensor(y.coords, y.feats, batch_size=y.batch_size, spatial_shape=y.spatial_shape)  # validates
    assert torch.equal(y.offsets, offsets_of_batch(y.coords[:, 0], y.batch_size))
    torch.testing.assert_close(y.feats, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(x=sparse_tensors(max_size=8), seed=st.integers(0, 2**31 - 1))
def test_reached_layout_extends_parents_with_the_same_features(x, seed):
    """k = 3, stride 2: the spconv layout holds every parent voxel, with the parents rule's features."""
    weight, bias = _random_params(x.feats.shape[1], 2, 3, seed)
    parents = sparse_conv3d(x, weight, bias, stride=2)
    reached = sparse_conv3d(x, weight, bias, stride=2, layout_rule="reached")
    assert parents.spatial_shape == reached.spatial_shape and parents.stride == reached.stride
    table = {tuple(c): i for i, c in enumerate(reached.coords.tolist())}
    rows = torch.tensor(
        [table[tuple(c)] for c in parents.coords.tolist()], dtype=torch.long
    )  # KeyError if absent
    torch.testing.assert_close(reached.feats[rows], parents.feats, rtol=1e-12, atol=1e-12)


def test_layout_rule_module_and_errors():
    x = _tiny()
    layer = SparseConv3d(4, 5, kernel_size=3, stride=2, layout_rule="reached")
    expected = sparse_conv3d(x, layer.weight, layer.bias, stride=2, layout_rule="reached")
    assert torch.equal(layer(x).coords, expected.coords) and "layout_rule='reached'" in repr(layer)
    dense = torch.nn.Conv3d(4, 5, kernel_size=3, stride=2, padding=1).double()
    from_dense = SparseConv3d.from_dense(dense, layout_rule="reached")
    x64 = x.to(torch.float64)
    support, expected_feats, _ = dense_conv_with_support(
        x64, from_dense.weight, from_dense.bias, 3, 2, 1, False
    )
    torch.testing.assert_close(
        from_dense(x64).feats, dense(x64.to_dense()).permute(0, 2, 3, 4, 1)[support.unbind(1)]
    )
    torch.testing.assert_close(from_dense(x64).feats, expected_feats)
    weight = torch.randn(27, 4, 5)
    with pytest.raises(
        ValueError, match=r"layout_rule: expected one of \('parents', 'reached'\), got 'spconv'"
    ):
        sparse_conv3d(x, weight, stride=2, layout_rule="spconv")
    with pytest.raises(ValueError, match=r"layout_rule: expected one of \('parents', 'reached'\), got 'all'"):
        SparseConv3d(4, 5, layout_rule="all")
    with pytest.raises(ValueError, match=r"layout_rule: out_layout already fixes the output voxels"):
        sparse_conv3d(x, weight, stride=2, out_layout=conv_output_layout(x, stride=2), layout_rule="reached")
    flat = SparseTensor(torch.tensor([[0, 0, 1, 1]]), torch.randn(1, 4), spatial_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"kernel_size: the dense output grid .* is empty \(\(0, 3, 3\)\)"):
        conv_output_layout(flat, layout_rule="reached", kernel_size=2)


def test_spconv_and_minkowski_weight_converters():
    """Round trips, and each converted entry is where the other library's kernel order puts it."""
    generator = torch.Generator().manual_seed(0)
    for size in [(3, 3, 3), (3, 2, 1), (2, 2, 2)]:
        weight = torch.randn(math.prod(size), 3, 4, generator=generator)
        spconv = weight_to_spconv(weight, size)
        assert spconv.shape == (4, *size, 3)
        assert torch.equal(weight_from_spconv(spconv), weight)
        # spconv KRSC [C_out, kx, ky, kz, C_in] is F.conv3d's [C_out, C_in, kx, ky, kz] with C_in moved last
        assert torch.equal(spconv, weight_to_dense(weight, size).permute(0, 2, 3, 4, 1))
        minkowski = weight_to_minkowski(weight, size)
        assert minkowski.shape == weight.shape
        assert torch.equal(weight_from_minkowski(minkowski, size), weight)
        # MinkowskiEngine enumerates offsets with x fastest (its region iterator advances axis 0 first)
        ranges = [range(-((k - 1) // 2), k - (k - 1) // 2) for k in size]
        ours = {tuple(o): i for i, o in enumerate(kernel_offsets(size).tolist())}
        order = [(dx, dy, dz) for dz in ranges[2] for dy in ranges[1] for dx in ranges[0]]
        for j, offset in enumerate(order):
            assert torch.equal(minkowski[j], weight[ours[offset]]), (size, offset)
    with pytest.raises(
        ValueError, match=r"weight: expected shape \[K=27, C_in, C_out\] for kernel_size=\(3, 3, 3\)"
    ):
        weight_to_minkowski(torch.randn(8, 3, 4), 3)
    with pytest.raises(ValueError, match=r"weight: expected spconv's shape \[C_out, kx, ky, kz, C_in\]"):
        weight_from_spconv(torch.randn(27, 3, 4))


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    ("kernel_size", "stride", "dilation", "transposed"),
    [(3, 1, 1, False), (2, 1, 2, False), (3, 2, 1, False), (2, 2, 1, True), (3, 2, 1, True)],
)
def test_gradcheck(kernel_size, stride, dilation, transposed):
    generator = torch.Generator().manual_seed(0)
    coords = [
        torch.randint(0, 4, (8, 3), generator=generator),
        torch.randint(0, 4, (4, 3), generator=generator),
    ]
    coords = [torch.unique(c, dim=0) for c in coords]
    feats = [torch.randn(c.shape[0], 2, generator=generator, dtype=torch.float64) for c in coords]
    x = SparseTensor.from_list(coords, feats, spatial_shape=4, stride=stride if transposed else 1)
    weight, bias = _random_params(2, 2, kernel_size, 1)

    def run(f, w, b):
        return sparse_conv3d(
            x.replace(f),
            w,
            b,
            kernel_size=kernel_size,
            stride=stride,
            dilation=dilation,
            transposed=transposed,
        ).feats

    inputs = (x.feats.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True))
    assert torch.autograd.gradcheck(run, inputs)


# ---------------------------------------------------------------------------------------------- invariants

_MODES = [
    pytest.param(3, 1, False, id="subm3"),
    pytest.param(3, 2, False, id="strided3"),
    pytest.param(2, 2, True, id="transposed2"),
]


def _conv(x, kernel_size, stride, transposed, weight, bias):
    return sparse_conv3d(x, weight, bias, kernel_size=kernel_size, stride=stride, transposed=transposed)


@pytest.mark.parametrize(("kernel_size", "stride", "transposed"), _MODES)
@given(x=sparse_tensors(max_size=6, channels=2), seed=st.integers(0, 2**31 - 1))
def test_batched_equals_per_sample_loop(x, seed, kernel_size, stride, transposed):
    x = _with_stride(x, stride) if transposed else x
    weight, bias = _random_params(2, 3, kernel_size, seed)
    y = _conv(x, kernel_size, stride, transposed, weight, bias)
    coords, feats = [], []
    for b in range(x.batch_size):
        single = _conv(x.select([b]), kernel_size, stride, transposed, weight, bias)  # B = 1, maybe empty
        c = single.coords.clone()
        c[:, 0] = b
        coords.append(c)
        feats.append(single.feats)
    assert torch.equal(torch.cat(coords), y.coords)
    torch.testing.assert_close(torch.cat(feats), y.feats, rtol=1e-12, atol=1e-12)
    assert torch.equal(y.offsets[1:] - y.offsets[:-1], torch.tensor([f.shape[0] for f in feats]).int())


@pytest.mark.parametrize(("kernel_size", "stride", "transposed"), _MODES)
@given(x=sparse_tensors(max_size=6, channels=2), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_permuting_samples_permutes_outputs(x, seed, data, kernel_size, stride, transposed):
    x = _with_stride(x, stride) if transposed else x
    perm = data.draw(st.permutations(range(x.batch_size)))
    weight, bias = _random_params(2, 3, kernel_size, seed)
    y = _conv(x, kernel_size, stride, transposed, weight, bias)
    y_perm = _conv(x.select(perm), kernel_size, stride, transposed, weight, bias)
    expected = y.select(perm)
    assert torch.equal(y_perm.coords, expected.coords)
    torch.testing.assert_close(y_perm.feats, expected.feats, rtol=1e-12, atol=1e-12)


def test_empty_input_and_empty_samples():
    x = SparseTensor(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 3), batch_size=2, spatial_shape=4)
    weight = torch.randn(27, 3, 5, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    for stride in (1, 2):
        y = sparse_conv3d(x, weight, bias, stride=stride)
        assert y.feats.shape == (0, 5) and y.batch_size == 2
        y.feats.sum().backward()
        assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros(5))


def test_cached_maps_do_not_change_results():
    generator = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.randint(0, 6, (60, 3), generator=generator), dim=0)
    x = SparseTensor.from_list(
        [coords], [torch.randn(coords.shape[0], 2, dtype=torch.float64, generator=generator)]
    )
    weight, bias = _random_params(2, 2, 3, 0)
    first = sparse_conv3d(x, weight, bias, stride=2)
    second = sparse_conv3d(x.replace(x.feats * 1), weight, bias, stride=2)  # cache hit through replace
    fresh = sparse_conv3d(SparseTensor(x.coords.clone(), x.feats.clone()), weight, bias, stride=2)
    assert torch.equal(first.feats, second.feats) and torch.equal(first.feats, fresh.feats)
    assert first.coords is second.coords  # the output layout is cached on the input layout


# ------------------------------------------------------------------------------------------ autocast, module


def test_cpu_autocast_bf16_runs_gemm_in_bf16():
    generator = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(0, 8, (200, 3), generator=generator), dim=0)
    x = SparseTensor.from_list(
        [coords], [torch.randn(coords.shape[0], 8, generator=generator)], spatial_shape=8
    )
    weight = torch.randn(27, 8, 4, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_conv3d(x, weight, bias)
    assert y.feats.dtype == torch.bfloat16
    ref = dense_reference(x, weight.detach(), bias.detach(), x, 3, 1, 1, False)
    torch.testing.assert_close(y.feats.float(), ref, rtol=2e-2, atol=0.15)
    y.feats.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    ref_grad = torch.autograd.grad(dense_reference(x, weight, bias, x, 3, 1, 1, False).sum(), weight)[0]
    torch.testing.assert_close(weight.grad, ref_grad, rtol=2e-2, atol=0.2)


def test_weight_conversions_round_trip_and_match_dense_module():
    torch.manual_seed(0)
    dense_conv = torch.nn.Conv3d(3, 4, kernel_size=(3, 2, 1), padding=0).double()
    w = weight_from_dense(dense_conv.weight)
    assert w.shape == (6, 3, 4)
    assert torch.equal(weight_to_dense(w, (3, 2, 1)), dense_conv.weight)
    dense_t = torch.nn.ConvTranspose3d(3, 4, kernel_size=3).double()
    assert torch.equal(
        weight_to_dense(weight_from_dense(dense_t.weight, transposed=True), 3, True), dense_t.weight
    )
    # Offset k of the sparse weight is dense index (i, j, l) = unravel(k): check one entry explicitly.
    offsets = kernel_offsets((3, 2, 1))
    k = 4  # (i, j, l) = (2, 0, 0) -> offset (1, 0, 0)
    assert offsets[k].tolist() == [1, 0, 0]
    assert torch.equal(w[k], dense_conv.weight[:, :, 2, 0, 0].t())


@given(x=sparse_tensors(max_size=6, channels=3))
def test_module_from_dense_matches_nn_conv3d(x):
    torch.manual_seed(0)
    dense_conv = torch.nn.Conv3d(3, 2, kernel_size=3, padding=1).double()
    layer = SparseConv3d.from_dense(dense_conv)
    y = layer(x)
    ref = dense_conv(x.to_dense())
    c = x.coords.long()
    torch.testing.assert_close(y.feats, ref.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]])


def test_module_init_bounds_like_nn_conv3d():
    torch.manual_seed(0)
    layer = SparseConv3d(16, 32, kernel_size=3)
    bound = 1 / math.sqrt(27 * 16)
    assert layer.weight.shape == (27, 16, 32)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    # Uniform(-b, b) has std b / sqrt(3); nn.Conv3d's init gives the same.
    dense = torch.nn.Conv3d(16, 32, kernel_size=3)
    torch.testing.assert_close(layer.weight.std(), dense.weight.std(), rtol=0.05, atol=0)
    assert layer.bias.abs().max() <= bound


# ---------------------------------------------------------------------------------------------- errors


def _tiny(dtype=torch.float32):
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [1, 0, 0, 0]])
    return SparseTensor(coords, torch.randn(3, 4, dtype=dtype), spatial_shape=4)


def test_errors():
    x = _tiny()
    with pytest.raises(ValueError, match=r"weight: expected shape \[K=27, C_in=4"):
        sparse_conv3d(x, torch.randn(26, 4, 5))
    with pytest.raises(ValueError, match=r"weight: .*C_in=4.*got \[27, 3, 5\]"):
        sparse_conv3d(x, torch.randn(27, 3, 5))
    with pytest.raises(ValueError, match=r"weight: .*K=8"):
        sparse_conv3d(x, torch.randn(27, 4, 5), kernel_size=2)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32.*got torch.float64"):
        sparse_conv3d(x, torch.randn(27, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight: expected device cpu.*got meta"):
        sparse_conv3d(x, torch.randn(27, 4, 5, device="meta"))
    with pytest.raises(ValueError, match=r"bias: expected shape \[5\]"):
        sparse_conv3d(x, torch.randn(27, 4, 5), torch.randn(4))
    with pytest.raises(TypeError, match="bias: expected dtype"):
        sparse_conv3d(x, torch.randn(27, 4, 5), torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out_layout: expected stride input.stride / stride"):
        sparse_conv3d(
            _with_stride(x, 2),
            torch.randn(8, 4, 5),
            kernel_size=2,
            stride=2,
            transposed=True,
            out_layout=_with_stride(x, 2),
        )
    with pytest.raises(ValueError, match=r"out_layout: expected stride input.stride \* stride"):
        sparse_conv3d(x, torch.randn(8, 4, 5), kernel_size=2, stride=2, out_layout=x)
    with pytest.raises(ValueError, match="stride: a transposed convolution refines the grid"):
        sparse_conv3d(x, torch.randn(8, 4, 5), kernel_size=2, stride=2, transposed=True)
    with pytest.raises(ValueError, match="input: expected feats"):
        sparse_conv3d(x.replace(torch.randn(3, 4, 2)), torch.randn(27, 4, 5))
    with pytest.raises(TypeError, match="input: expected floating-point"):
        sparse_conv3d(x.replace(torch.ones(3, 4, dtype=torch.int64)), torch.randn(27, 4, 5))


def test_backend_registry_and_errors(monkeypatch):
    x = _tiny()
    weight = torch.randn(27, 4, 5)
    assert available_backends()[0] == "torch" and current_backend() == "torch"
    with pytest.raises(ValueError, match=r"backend: expected one of \['torch', 'spconv'\].*got 'nope'"):
        sparse_conv3d(x, weight, backend="nope")
    with pytest.raises(ValueError, match="backend: expected one of"):
        with use_backend("nope"):
            pass
    assert current_backend() == "torch"
    if "spconv" not in available_backends():
        with pytest.raises(ValueError, match=r"'spconv' is not available.*available backends: \['torch'\]"):
            sparse_conv3d(x, weight, backend="spconv")
    # Pretend spconv is installed: the context selects it, the per-call argument wins over the context.
    monkeypatch.setattr(kernels, "_spconv_importable", lambda: True)
    with use_backend("spconv"):
        assert current_backend() == "spconv"
        reference = sparse_conv3d(x, weight, backend="torch")
        with pytest.raises(ValueError, match="backend 'spconv' needs CUDA"):
            sparse_conv3d(x, weight)
        with pytest.raises(NotImplementedError, match="'spconv' supports only submanifold"):
            sparse_conv3d(x, torch.randn(27, 4, 5), stride=2)
    assert current_backend() == "torch"
    torch.testing.assert_close(reference.feats, sparse_conv3d(x, weight).feats)


# ---------------------------------------------------------------------------------------------- kernel maps


def _brute_force_map(in_coords, out_coords, kernel_size, stride, dilation, transposed):
    table = {tuple(c): i for i, c in enumerate(in_coords.tolist())}
    offsets = kernel_offsets(kernel_size, dilation).tolist()
    s = _triple(stride, "s")
    rows = []
    for b, *q in out_coords.tolist():
        row = []
        for off in offsets:
            if transposed:
                diff = [qq - o for qq, o in zip(q, off, strict=True)]
                if any(v % ss for v, ss in zip(diff, s, strict=True)):
                    row.append(-1)
                    continue
                target = [v // ss for v, ss in zip(diff, s, strict=True)]
            else:
                target = [qq * ss + o for qq, ss, o in zip(q, s, off, strict=True)]
            row.append(table.get((b, *target), -1))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(offsets))


@pytest.mark.parametrize(
    ("kernel_size", "stride", "dilation", "transposed"),
    [
        (3, 1, 1, False),
        (3, 1, 2, False),
        (2, 1, 1, False),
        (3, 2, 1, False),
        (2, 2, 2, False),
        (2, 2, 1, True),
        (3, 2, 1, True),
        (3, 2, 2, True),
        ((1, 2, 3), (1, 2, 3), 1, False),
    ],
)
@given(data=layouts(max_size=7, max_batch=3), seed=st.integers(0, 2**31 - 1))
def test_kernel_map_matches_brute_force(data, seed, kernel_size, stride, dilation, transposed):
    samples, size = data
    x = SparseTensor.from_list(samples, [torch.zeros(c.shape[0], 1) for c in samples], spatial_shape=size)
    if transposed:
        x = _with_stride(x, 2)
        out = conv_output_layout(x, stride=stride, transposed=True)
    else:
        out = conv_output_layout(x, stride=stride)
    kmap = kernel_map(x.coords, out.coords, kernel_size, stride, dilation, transposed)
    assert torch.equal(
        kmap, _brute_force_map(x.coords, out.coords, kernel_size, stride, dilation, transposed)
    )
    # invert_kernel_map: inverse[i, k] = j exactly when kmap[j, k] = i.
    inverse = invert_kernel_map(kmap, x.num_voxels)
    assert inverse.shape == (x.num_voxels, kmap.shape[1])
    j, k = (kmap >= 0).nonzero(as_tuple=True)
    assert torch.equal(inverse[kmap[j, k], k], j)
    assert int((inverse >= 0).sum()) == int((kmap >= 0).sum())


# ---------------------------------------------------------------------------------------------- GPU


def _surface_layout(device: torch.device, size: int = 128) -> torch.Tensor:
    """Two sphere shells (~100k voxels together at size 128) in a ``size^3`` grid: int32 coords ``[N, 4]``."""
    axis = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # [S, S, S, 3]
    shells = []
    for b, radius in enumerate((size * 0.4, size * 0.36)):
        distance = (grid - size / 2).norm(dim=-1)
        cells = (distance - radius).abs().le(math.sqrt(3) / 2).nonzero().int()  # [N_b, 3]
        shells.append(torch.cat([torch.full_like(cells[:, :1], b), cells], dim=1))
    return torch.cat(shells)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_forward_backward_bitwise_deterministic(dtype):
    device = torch.device("cuda")
    coords = _surface_layout(device)
    assert coords.shape[0] > 80_000
    generator = torch.Generator(device=device).manual_seed(0)
    feats = torch.randn(coords.shape[0], 64, device=device, dtype=dtype, generator=generator)
    weight = (torch.randn(27, 64, 64, device=device, generator=generator) / 40).to(dtype)
    bias = torch.randn(64, device=device, generator=generator).to(dtype)
    upstream = torch.randn(coords.shape[0], 64, device=device, dtype=dtype, generator=generator)

    def run():
        x = SparseTensor(coords, feats.clone().requires_grad_(True), spatial_shape=128)
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        y = sparse_conv3d(x, w, b)
        y.feats.backward(upstream)
        return y.feats.detach(), x.feats.grad, w.grad, b.grad

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # And the result is right: the same conv in float64 (checked against dense conv on CPU above).
    x64 = SparseTensor(coords, feats.double(), spatial_shape=128)
    ref = sparse_conv3d(x64, weight.double(), bias.double()).feats
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(first[0].double(), ref, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel_size", "stride"), [(3, 2), (3, 1), (2, 2)])
def test_gpu_reached_layout_matches_spconv_sparse_conv3d(kernel_size, stride):
    """layout_rule="reached" against spconv's (or spconv-triton's) regular SparseConv3d, when installed."""
    if "spconv" not in available_backends():
        pytest.skip("spconv / spconv_triton not installed")
    from sparse3d.kernels.spconv import import_spconv

    spconv = import_spconv()
    device = torch.device("cuda")
    coords = _surface_layout(device, size=32)
    generator = torch.Generator(device=device).manual_seed(0)
    x = SparseTensor(
        coords, torch.randn(coords.shape[0], 8, device=device, generator=generator), spatial_shape=32
    )
    weight = torch.randn(kernel_size**3, 8, 16, device=device, generator=generator) / 10
    bias = torch.randn(16, device=device, generator=generator)
    ours = sparse_conv3d(x, weight, bias, kernel_size=kernel_size, stride=stride, layout_rule="reached")
    module = spconv.SparseConv3d(8, 16, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=True)
    module = module.to(device)
    with torch.no_grad():
        module.weight.copy_(weight_to_spconv(weight, kernel_size))
        module.bias.copy_(bias)
    theirs = module(spconv.SparseConvTensor(x.feats, x.coords, list(x.spatial_shape), x.batch_size))
    assert list(theirs.spatial_shape) == list(ours.spatial_shape)
    order = torch.argsort(pack_keys(theirs.indices.int()))
    assert torch.equal(theirs.indices.int()[order], ours.coords)
    torch.testing.assert_close(theirs.features[order], ours.feats, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_autocast_and_spconv_backend_agree():
    device = torch.device("cuda")
    coords = _surface_layout(device, size=64)
    generator = torch.Generator(device=device).manual_seed(1)
    x = SparseTensor(
        coords, torch.randn(coords.shape[0], 32, device=device, generator=generator), spatial_shape=64
    )
    weight = torch.randn(27, 32, 16, device=device, generator=generator) / 20
    bias = torch.randn(16, device=device, generator=generator)
    reference = sparse_conv3d(x.to(torch.float64), weight.double(), bias.double()).feats
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sparse_conv3d(x, weight, bias)
    assert y.feats.dtype == torch.bfloat16
    torch.testing.assert_close(y.feats.double(), reference, rtol=3e-2, atol=5e-2)
    if "spconv" in available_backends():
        y_spconv = sparse_conv3d(x, weight, bias, backend="spconv")
        torch.testing.assert_close(y_spconv.feats.double(), reference, rtol=1e-3, atol=1e-3)
