"""Sparse norms against torch: group/instance norm per sample, layer norm per voxel, modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse3d import SparseTensor
from sparse3d.functional import group_norm, instance_norm, layer_norm
from sparse3d.nn import SparseGroupNorm, SparseInstanceNorm, SparseLayerNorm
from tests.strategies import sparse_tensors


def _group_norm_loop(x: SparseTensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """Reference: ``F.group_norm`` on each non-empty sample's ``[1, C, N_b]`` features."""
    rows = []
    for feats in x.feats.split(x.counts.tolist()):
        if feats.shape[0] == 0:
            continue
        # torch refuses one value per group; duplicating every row leaves the statistics unchanged.
        doubled = feats.repeat(2, 1)  # [2 N_b, C]
        out = F.group_norm(doubled.T[None], num_groups, weight, bias, eps)  # [1, C, 2 N_b]
        rows.append(out[0].T[: feats.shape[0]])
    return torch.cat(rows) if rows else x.feats * 0


@st.composite
def _grouped(draw: st.DrawFn) -> tuple[SparseTensor, int]:
    num_groups = draw(st.sampled_from([1, 2, 3]))
    x = draw(sparse_tensors(channels=num_groups * draw(st.integers(1, 3))))
    return x, num_groups


@given(case=_grouped(), affine=st.booleans(), seed=st.integers(0, 1000))
def test_group_norm_matches_per_sample_loop(case, affine: bool, seed: int) -> None:
    x, num_groups = case
    channels = x.feats.shape[1]
    generator = torch.Generator().manual_seed(seed)
    feats = x.feats.clone().requires_grad_(True)
    weight = torch.randn(channels, dtype=torch.float64, generator=generator).requires_grad_(affine)
    bias = torch.randn(channels, dtype=torch.float64, generator=generator).requires_grad_(affine)
    weight, bias = (weight, bias) if affine else (None, None)
    out = group_norm(x.replace(feats), num_groups, weight, bias, eps=1e-5)
    assert out.same_layout(x) and out.dtype == torch.float64
    assert torch.isfinite(out.feats).all()
    reference = _group_norm_loop(x.replace(feats), num_groups, weight, bias, 1e-5)
    torch.testing.assert_close(out.feats, reference, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(out.feats.shape, dtype=torch.float64, generator=generator)
    inputs = [feats] + ([weight, bias] if affine else [])
    grads = torch.autograd.grad((out.feats * upstream).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((reference * upstream).sum(), inputs, allow_unused=True)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        if grad_ref is None:  # every sample empty: weight and bias unused
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9)


@given(x=sparse_tensors(), seed=st.integers(0, 1000))
def test_group_norm_batched_equals_per_sample_and_permutes(x: SparseTensor, seed: int) -> None:
    out = group_norm(x, 1)
    for b in range(x.batch_size):
        torch.testing.assert_close(
            out.select([b]).feats, group_norm(x.select([b]), 1).feats, rtol=0, atol=1e-12
        )
    perm = torch.randperm(x.batch_size, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        group_norm(x.select(perm), 1).feats, out.select(perm).feats, rtol=0, atol=1e-12
    )


@given(x=sparse_tensors())
def test_instance_norm_matches_per_sample_loop(x: SparseTensor) -> None:
    channels = x.feats.shape[1]
    reference = _group_norm_loop(x, channels, None, None, 1e-5)
    torch.testing.assert_close(instance_norm(x).feats, reference, rtol=1e-10, atol=1e-10)
    module = SparseInstanceNorm(channels, affine=True, dtype=torch.float64)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    reference = _group_norm_loop(x, channels, module.weight, module.bias, 1e-5)
    torch.testing.assert_close(module(x).feats, reference, rtol=1e-10, atol=1e-10)


@given(x=sparse_tensors(channels=4), seed=st.integers(0, 1000))
def test_layer_norm_matches_torch(x: SparseTensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, dtype=torch.float64, generator=generator)
    bias = torch.randn(4, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        layer_norm(x, weight, bias, 1e-6).feats, F.layer_norm(x.feats, (4,), weight, bias, 1e-6)
    )
    torch.testing.assert_close(layer_norm(x).feats, F.layer_norm(x.feats, (4,)))
    module = SparseLayerNorm(4, eps=1e-6, dtype=torch.float64)
    reference = torch.nn.LayerNorm(4, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(module.parameters(), reference.parameters(), strict=True):
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=generator))
            q.copy_(p)
    torch.testing.assert_close(module(x).feats, reference(x.feats))
    assert module.state_dict().keys() == reference.state_dict().keys()


def test_group_norm_module_mirrors_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 3, 2, 1], [2, 1, 1, 1], [2, 0, 1, 0]])
    x = SparseTensor(coords, torch.randn(5, 6, generator=generator), batch_size=3)
    module = SparseGroupNorm(3, 6, eps=1e-4)
    reference = torch.nn.GroupNorm(3, 6, eps=1e-4)
    assert module.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        module.weight.normal_(generator=generator)
        module.bias.normal_(generator=generator)
        reference.load_state_dict(module.state_dict())
    expected = _group_norm_loop(x, 3, reference.weight, reference.bias, 1e-4)
    torch.testing.assert_close(module(x).feats, expected)
    assert SparseGroupNorm(3, 6, affine=False).weight is None
    assert not list(SparseLayerNorm(6, elementwise_affine=False).parameters())


def test_empty_samples_and_all_empty() -> None:
    coords = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 3, 2, 1]])
    x = SparseTensor(coords, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), batch_size=3)
    out = group_norm(x, 2)
    (grad,) = torch.autograd.grad(out.feats.square().sum() + out.feats.sum(), x.feats)
    assert torch.isfinite(out.feats).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.feats, _group_norm_loop(x, 2, None, None, 1e-5))
    empty = SparseTensor(
        torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4), batch_size=2, spatial_shape=4
    )
    assert group_norm(empty, 2).feats.shape == (0, 4)
    # A single voxel has zero variance: output 0 (then bias), never NaN.
    single = SparseTensor(coords[:1], torch.randn(1, 4), batch_size=2)
    assert torch.equal(group_norm(single, 4).feats, torch.zeros(1, 4))


def test_bf16_statistics_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = [300, 0, 200]
    keys = [torch.randperm(512, generator=generator)[:n].sort().values for n in counts]
    coords = [torch.stack([k // 64, (k // 8) % 8, k % 8], dim=1) for k in keys]  # unique (x, y, z) per sample
    # Large common offset: naive bf16 statistics would lose the per-voxel variation entirely.
    feats = (100.0 + torch.randn(500, 8, generator=generator)).to(torch.bfloat16)
    x = SparseTensor.from_list(coords, list(feats.split(counts)), spatial_shape=8)
    out = group_norm(x, 2)
    assert out.dtype == torch.bfloat16
    reference = _group_norm_loop(x.replace(feats.float()), 2, None, None, 1e-5)
    torch.testing.assert_close(out.feats.float(), reference, rtol=1e-2, atol=2e-2)
    layered = layer_norm(x)
    assert layered.dtype == torch.bfloat16
    torch.testing.assert_close(layered.feats.float(), F.layer_norm(feats.float(), (8,)), rtol=1e-2, atol=2e-2)


def test_gradcheck_tiny() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 3, 2, 1], [2, 1, 1, 1], [2, 0, 1, 0]])
    layout = SparseTensor(coords, torch.zeros(5, 4, dtype=torch.float64), batch_size=3)
    feats = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    inputs = (feats, weight, bias)
    assert torch.autograd.gradcheck(lambda f, w, b: group_norm(layout.replace(f), 2, w, b).feats, inputs)
    assert torch.autograd.gradgradcheck(lambda f, w, b: group_norm(layout.replace(f), 2, w, b).feats, inputs)
    assert torch.autograd.gradcheck(lambda f, w, b: layer_norm(layout.replace(f), w, b).feats, inputs)


def test_errors() -> None:
    x = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]), torch.randn(2, 6), spatial_shape=4)
    with pytest.raises(ValueError, match="num_groups: expected a divisor of the channel count 6, got 4"):
        group_norm(x, 4)
    with pytest.raises(ValueError, match="num_groups: expected a positive int, got 0"):
        group_norm(x, 0)
    with pytest.raises(ValueError, match=r"weight: expected shape \[6\], got \[5\]"):
        group_norm(x, 2, torch.ones(5))
    with pytest.raises(ValueError, match=r"bias: expected shape \[6\], got \[6, 1\]"):
        layer_norm(x, None, torch.ones(6, 1))
    with pytest.raises(ValueError, match=r"x.feats: expected shape \[N, C\], got \[2, 3, 2\]"):
        group_norm(x.replace(torch.randn(2, 3, 2)), 1)
    with pytest.raises(ValueError, match="num_groups: expected a divisor of num_channels=6, got 4"):
        SparseGroupNorm(4, 6)


@pytest.mark.gpu
def test_norms_are_bitwise_deterministic_on_cuda() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = [40_000, 0, 35_000, 30_000]
    keys = [torch.randperm(64**3, generator=generator)[:n].sort().values for n in counts]
    coords = [torch.stack([k // 4096, (k // 64) % 64, k % 64], dim=1) for k in keys]
    feats = [torch.randn(n, 64, generator=generator) for n in counts]
    x = SparseTensor.from_list(coords, feats, spatial_shape=64).to("cuda")
    weight = torch.randn(64, device="cuda")
    bias = torch.randn(64, device="cuda")
    upstream = torch.randn(
        x.feats.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)
    )
    for name, op in {
        "group_norm": lambda t, w, b: group_norm(t, 8, w, b),
        "layer_norm": lambda t, w, b: layer_norm(t, w, b),
        "group_norm_bf16": lambda t, w, b: group_norm(t.to(torch.bfloat16), 8, w, b),
    }.items():
        results = []
        for _ in range(2):
            inputs = [x.feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
            inputs.append(bias.clone().requires_grad_(True))
            out = op(x.replace(inputs[0]), inputs[1], inputs[2]).feats
            grads = torch.autograd.grad((out.float() * upstream).sum(), inputs)
            results.append((out.detach(), *grads))
        for first, second in zip(*results, strict=True):
            assert torch.equal(first, second), f"{name}: differs between runs"
    # Against the float64 per-sample reference.
    out = group_norm(x, 8, weight, bias).feats.cpu().double()
    reference = _group_norm_loop(
        x.to("cpu", torch.float64), 8, weight.cpu().double(), bias.cpu().double(), 1e-5
    )
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
