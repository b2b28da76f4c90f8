"""Tests of sparse3d.functional.attention and sparse3d.nn.attention against hand-written dense loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse3d import SparseTensor
from sparse3d.functional.attention import (
    available_backends,
    cross_attention,
    interleave_index,
    joint_attention,
    varlen_attention,
    window_partition,
    windowed_attention,
)
from sparse3d.nn.attention import SparseCrossAttention, SparseSelfAttention
from tests.strategies import sparse_tensors

CPU_BACKENDS = ["reference", "padded", "masked", "auto"]
GPU_BACKENDS = ["reference", "padded", "masked", "varlen", "flex", "flash_attn", "auto"]


# ---------------------------------------------------------------------------------------------- references


def dense_attention(query, key, value, scale=None):
    """softmax(scale * q k^T) v by hand for one sample: [L, H, D], [S, H, D], [S, H, Dv] -> [L, H, Dv]."""
    if key.shape[0] == 0:
        return value.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.einsum("lhd,shd->hls", query, key) * scale  # [H, L, S]
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights, value)  # [L, H, Dv]


def loop_attention(query, key, value, offsets_q, offsets_kv, scale=None):
    """Per-sample dense attention, concatenated."""
    bq, bk = offsets_q.tolist(), offsets_kv.tolist()
    outs = [
        dense_attention(query[bq[b] : bq[b + 1]], key[bk[b] : bk[b + 1]], value[bk[b] : bk[b + 1]], scale)
        for b in range(len(bq) - 1)
    ]
    return torch.cat(outs)


def offsets_of(lengths):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


def packed(lengths, heads, dim, generator, dtype=torch.float64, requires_grad=False):
    tokens = torch.randn(sum(lengths), heads, dim, generator=generator, dtype=dtype)
    return tokens.requires_grad_(requires_grad)


@st.composite
def length_pairs(draw, max_batch=4, max_len=7):
    """Per-sample (query, key) lengths including empty samples and samples with queries but no keys."""
    batch = draw(st.integers(1, max_batch))
    pairs = [(draw(st.integers(0, max_len)), draw(st.integers(0, max_len))) for _ in range(batch)]
    seed = draw(st.integers(0, 2**31 - 1))
    return [p[0] for p in pairs], [p[1] for p in pairs], seed


# ---------------------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=length_pairs())
def test_varlen_matches_dense_loop(backend, case):
    lengths_q, lengths_kv, seed = case
    generator = torch.Generator().manual_seed(seed)
    heads, dim, value_dim = 2, 6, 5
    query = packed(lengths_q, heads, dim, generator)
    key = packed(lengths_kv, heads, dim, generator)
    value = packed(lengths_kv, heads, value_dim, generator)
    offsets_q, offsets_kv = offsets_of(lengths_q), offsets_of(lengths_kv)
    out = varlen_attention(query, key, value, offsets_q, offsets_kv, backend=backend)
    expected = loop_attention(query, key, value, offsets_q, offsets_kv)
    assert out.shape == (sum(lengths_q), heads, value_dim)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "auto", "padded", "reference"])
@given(
    batch=st.integers(1, 4), length_q=st.integers(1, 6), length_kv=st.integers(0, 6), seed=st.integers(0, 99)
)
def test_varlen_equal_lengths(backend, batch, length_q, length_kv, seed):
    generator = torch.Generator().manual_seed(seed)
    query = packed([length_q] * batch, 3, 4, generator)
    key = packed([length_kv] * batch, 3, 4, generator)
    value = packed([length_kv] * batch, 3, 4, generator)
    offsets_q, offsets_kv = offsets_of([length_q] * batch), offsets_of([length_kv] * batch)
    out = varlen_attention(query, key, value, offsets_q, offsets_kv, backend=backend, scale=0.3)
    torch.testing.assert_close(out, loop_attention(query, key, value, offsets_q, offsets_kv, scale=0.3))


@pytest.mark.parametrize("backend", ["reference", "padded", "masked"])
def test_varlen_gradients_match_loop(backend):
    generator = torch.Generator().manual_seed(0)
    lengths_q, lengths_kv = [3, 0, 5, 2], [4, 2, 1, 0]
    tensors = [
        packed(lengths_q, 2, 4, generator, requires_grad=True),
        packed(lengths_kv, 2, 4, generator, requires_grad=True),
        packed(lengths_kv, 2, 3, generator, requires_grad=True),
    ]
    offsets_q, offsets_kv = offsets_of(lengths_q), offsets_of(lengths_kv)
    weights = torch.randn(sum(lengths_q), 2, 3, generator=generator, dtype=torch.float64)
    out = varlen_attention(*tensors, offsets_q, offsets_kv, backend=backend)
    grads = torch.autograd.grad((out * weights).sum(), tensors)
    expected = loop_attention(*tensors, offsets_q, offsets_kv)
    expected_grads = torch.autograd.grad((expected * weights).sum(), tensors)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected_grad)
    # Queries of the sample without keys get zero gradient, and everything is finite.
    assert torch.all(grads[0][8:] == 0) and all(torch.isfinite(g).all() for g in grads)


def test_varlen_gradcheck():
    generator = torch.Generator().manual_seed(1)
    lengths_q, lengths_kv = [2, 3], [3, 1]
    tensors = [
        packed(lengths_q, 1, 3, generator, requires_grad=True),
        packed(lengths_kv, 1, 3, generator, requires_grad=True),
        packed(lengths_kv, 1, 2, generator, requires_grad=True),
    ]
    offsets_q, offsets_kv = offsets_of(lengths_q), offsets_of(lengths_kv)
    for backend in ("padded", "reference"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, b=backend: varlen_attention(q, k, v, offsets_q, offsets_kv, backend=b), tensors
        )


@given(case=length_pairs(), data=st.data())
def test_varlen_permuting_samples_permutes_outputs(case, data):
    lengths_q, lengths_kv, seed = case
    generator = torch.Generator().manual_seed(seed)
    query = packed(lengths_q, 2, 4, generator)
    key = packed(lengths_kv, 2, 4, generator)
    value = packed(lengths_kv, 2, 4, generator)
    offsets_q, offsets_kv = offsets_of(lengths_q), offsets_of(lengths_kv)
    out = varlen_attention(query, key, value, offsets_q, offsets_kv)
    perm = data.draw(st.permutations(range(len(lengths_q))))
    bq, bk = offsets_q.tolist(), offsets_kv.tolist()

    def take(tokens, bounds):
        return torch.cat([tokens[bounds[b] : bounds[b + 1]] for b in perm])

    permuted = varlen_attention(
        take(query, bq),
        take(key, bk),
        take(value, bk),
        offsets_of([lengths_q[b] for b in perm]),
        offsets_of([lengths_kv[b] for b in perm]),
    )
    torch.testing.assert_close(permuted, take(out, bq))


def test_varlen_max_seqlen_skips_sync_and_agrees():
    generator = torch.Generator().manual_seed(2)
    lengths = [4, 1, 6]
    query, key, value = (packed(lengths, 2, 4, generator) for _ in range(3))
    offsets = offsets_of(lengths)
    for backend in CPU_BACKENDS:
        # An upper bound for the maxima is allowed.
        out = varlen_attention(
            query, key, value, offsets, offsets, backend=backend, max_seqlen_q=8, max_seqlen_kv=6
        )
        torch.testing.assert_close(out, loop_attention(query, key, value, offsets, offsets))


# ---------------------------------------------------------------------------------------------- isolation

POISONS = [
    ("query", math.nan),
    ("key", math.nan),
    ("key", math.inf),
    ("key", -math.inf),
    ("value", math.nan),
    ("value", math.inf),
    ("value", -math.inf),
]


def _forward_backward(backend, tensors, offsets_q, offsets_kv, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = varlen_attention(*inputs, offsets_q, offsets_kv, backend=backend)
    return out.detach(), [g.detach() for g in torch.autograd.grad(out, inputs, grad_out)]


def check_isolation(backend, lengths_q, lengths_kv, poisoned, device, dtype, bitwise_grads=True):
    """Poisons one row of sample ``poisoned`` (NaN / Inf in its query, key or value): the outputs of the
    other samples stay bitwise equal, and so do the gradients reaching their rows (from a loss on them)."""
    generator = torch.Generator().manual_seed(0)
    offsets_q, offsets_kv = offsets_of(lengths_q).to(device), offsets_of(lengths_kv).to(device)
    tensors = [
        packed(lengths, 2, 16, generator, dtype=torch.float32).to(device=device, dtype=dtype)
        for lengths in (lengths_q, lengths_kv, lengths_kv)
    ]
    rows = {"query": offsets_q, "key": offsets_kv, "value": offsets_kv}
    clean_q = torch.ones(sum(lengths_q), dtype=torch.bool, device=device)
    clean_q[offsets_q[poisoned] : offsets_q[poisoned + 1]] = False
    clean_kv = torch.ones(sum(lengths_kv), dtype=torch.bool, device=device)
    clean_kv[offsets_kv[poisoned] : offsets_kv[poisoned + 1]] = False
    grad_out = torch.randn(sum(lengths_q), 2, 16, generator=generator).to(device=device, dtype=dtype)
    grad_out[~clean_q] = 0  # the loss only sees the clean samples
    expected, expected_grads = _forward_backward(backend, tensors, offsets_q, offsets_kv, grad_out)
    assert expected.isfinite().all()
    for name, value in POISONS:
        index = ("query", "key", "value").index(name)
        poisoned_tensors = [t.clone() for t in tensors]
        first = int(rows[name][poisoned])
        poisoned_tensors[index][first + 1, 1, 3] = value  # one entry of one row of the poisoned sample
        out, grads = _forward_backward(backend, poisoned_tensors, offsets_q, offsets_kv, grad_out)
        assert torch.equal(out[clean_q], expected[clean_q]), (name, value)
        for grad, expected_grad, clean in zip(
            grads, expected_grads, (clean_q, clean_kv, clean_kv), strict=True
        ):
            if bitwise_grads:
                assert torch.equal(grad[clean], expected_grad[clean]), (name, value)
            else:  # some CUDA backward kernels accumulate with atomics: equal up to rounding, never NaN
                torch.testing.assert_close(grad[clean], expected_grad[clean], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "sdpa"])
def test_backends_isolate_samples(backend):
    if backend == "sdpa":  # equal lengths only
        check_isolation(backend, [4, 4, 4], [5, 5, 5], 1, "cpu", torch.float32)
        return
    # sample 2 has keys but no queries, sample 3 queries but no keys
    check_isolation(backend, [3, 5, 0, 4, 2], [4, 6, 2, 0, 3], 1, "cpu", torch.float32)
    check_isolation(backend, [3, 5, 2], [2, 6, 3], 0, "cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_never_wins_over_very_low_real_scores(backend, dtype):
    """Real keys whose scores are far below any finite padding score still get all the weight: sample 0
    (fewer keys than the longest sample) scores q.k * scale = -8000 (fp16) or -1.4e6 (fp32)."""
    lengths_q, lengths_kv = [3, 4], [2, 6]
    offsets_q, offsets_kv = offsets_of(lengths_q), offsets_of(lengths_kv)
    magnitude = (50.0, 40.0) if dtype == torch.float16 else (300.0, 300.0)
    generator = torch.Generator().manual_seed(0)
    query = torch.full((7, 2, 16), magnitude[0]) + torch.rand(7, 2, 16, generator=generator)
    key = torch.full((8, 2, 16), -magnitude[1]) + torch.rand(8, 2, 16, generator=generator)
    value = torch.randn(8, 2, 16, generator=generator)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = varlen_attention(query, key, value, offsets_q, offsets_kv, backend=backend)
    expected = loop_attention(query.double(), key.double(), value.double(), offsets_q, offsets_kv)
    # Scores near -1e6 carry float32 rounding of ~0.1 (fp16: ~4 near -8000), hence the loose bounds;
    # padding winning would give outputs near 0 instead of (nearly) one value row.
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_joint_attention_isolates_samples(backend):
    generator = torch.Generator().manual_seed(0)
    lengths_a, lengths_b = [2, 3, 1], [4, 2, 5]
    offsets_a, offsets_b = offsets_of(lengths_a), offsets_of(lengths_b)
    tensors_a = [packed(lengths_a, 2, 8, generator) for _ in range(3)]
    tensors_b = [packed(lengths_b, 2, 8, generator) for _ in range(3)]
    expected = joint_attention(*tensors_a, offsets_a, *tensors_b, offsets_b, backend=backend)
    for index in range(3):  # query, key, value of modality b, sample 1
        poisoned = [t.clone() for t in tensors_b]
        poisoned[index][int(offsets_b[1])] = math.nan
        out = joint_attention(*tensors_a, offsets_a, *poisoned, offsets_b, backend=backend)
        for got, want, offsets in zip(out, expected, (offsets_a, offsets_b), strict=True):
            clean = torch.ones(got.shape[0], dtype=torch.bool)
            clean[offsets[1] : offsets[2]] = False
            assert torch.equal(got[clean], want[clean]), index


# ---------------------------------------------------------------------------------------------- joint


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=8)
@given(case=length_pairs(max_len=6))
def test_joint_matches_concatenation(backend, case):
    lengths_a, lengths_b, seed = case
    generator = torch.Generator().manual_seed(seed)
    heads, dim = 2, 4
    tensors_a = [packed(lengths_a, heads, dim, generator, requires_grad=True) for _ in range(3)]
    tensors_b = [packed(lengths_b, heads, dim, generator, requires_grad=True) for _ in range(3)]
    offsets_a, offsets_b = offsets_of(lengths_a), offsets_of(lengths_b)
    out_a, out_b = joint_attention(*tensors_a, offsets_a, *tensors_b, offsets_b, backend=backend, scale=0.4)
    ba, bb = offsets_a.tolist(), offsets_b.tolist()
    expected_a, expected_b = [], []
    for b in range(len(lengths_a)):
        q, k, v = (
            torch.cat([a[ba[b] : ba[b + 1]], t[bb[b] : bb[b + 1]]])
            for a, t in zip(tensors_a, tensors_b, strict=True)
        )
        joint = dense_attention(q, k, v, scale=0.4)
        expected_a.append(joint[: lengths_a[b]])
        expected_b.append(joint[lengths_a[b] :])
    expected_a, expected_b = torch.cat(expected_a), torch.cat(expected_b)
    torch.testing.assert_close(out_a, expected_a)
    torch.testing.assert_close(out_b, expected_b)
    if sum(lengths_a) + sum(lengths_b) == 0:
        return
    weights_a = torch.randn(out_a.shape, generator=generator, dtype=out_a.dtype)
    weights_b = torch.randn(out_b.shape, generator=generator, dtype=out_b.dtype)
    inputs = [*tensors_a, *tensors_b]
    grads = torch.autograd.grad((out_a * weights_a).sum() + (out_b * weights_b).sum(), inputs)
    expected_grads = torch.autograd.grad(
        (expected_a * weights_a).sum() + (expected_b * weights_b).sum(), inputs, allow_unused=True
    )
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, torch.zeros_like(grad) if expected_grad is None else expected_grad)


def test_interleave_index_example():
    offsets_a = torch.tensor([0, 2, 3], dtype=torch.int32)
    offsets_b = torch.tensor([0, 1, 4], dtype=torch.int32)
    index_a, index_b, offsets_joint = interleave_index(offsets_a, offsets_b, 3, 4)
    # joint = [a0 a0 b0 | a1 b1 b1 b1]
    assert index_a.tolist() == [0, 1, 3]
    assert index_b.tolist() == [2, 4, 5, 6]
    assert offsets_joint.tolist() == [0, 3, 7]


@pytest.mark.parametrize("max_seqlen", [None, (2, 5), 7, (3, 5)])
@pytest.mark.parametrize("lengths_b", [[5, 5, 5], [5, 4, 5]])
def test_joint_equal_lengths_fast_path_matches_interleaved(max_seqlen, lengths_b):
    """Equal per-modality lengths take the cat + batched SDPA path; it must equal the permutation path.

    ``(2, 5)`` (exact maxima) and ``None`` (maxima from the sync) take the fast path when every sample has
    2 + 5 tokens; ``7`` (joint only) and ``(3, 5)`` (an upper bound) must not, and unequal voxel counts
    never do. All agree with the interleaved reference.
    """
    generator = torch.Generator().manual_seed(11)
    lengths_a = [2, 2, 2]
    tensors_a = [packed(lengths_a, 2, 4, generator, requires_grad=True) for _ in range(3)]
    tensors_b = [packed(lengths_b, 2, 4, generator, requires_grad=True) for _ in range(3)]
    offsets = offsets_of(lengths_a), offsets_of(lengths_b)
    out = joint_attention(*tensors_a, offsets[0], *tensors_b, offsets[1], max_seqlen=max_seqlen)
    expected = joint_attention(*tensors_a, offsets[0], *tensors_b, offsets[1], backend="reference")
    inputs = [*tensors_a, *tensors_b]
    weights = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in out]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights, strict=True)), inputs)
    expected_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(expected, weights, strict=True)), inputs
    )
    for got, want in zip([*out, *grads], [*expected, *expected_grads], strict=True):
        torch.testing.assert_close(got, want)


def test_joint_one_output_unused_still_differentiable():
    generator = torch.Generator().manual_seed(3)
    tensors_a = [packed([2, 3], 1, 4, generator, requires_grad=True) for _ in range(3)]
    tensors_b = [packed([4, 1], 1, 4, generator, requires_grad=True) for _ in range(3)]
    _, out_b = joint_attention(*tensors_a, offsets_of([2, 3]), *tensors_b, offsets_of([4, 1]))
    out_b.sum().backward()
    # out_b depends on the keys and values of modality a, not on its queries.
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors_a[1:])
    assert tensors_a[0].grad is None or torch.all(tensors_a[0].grad == 0)


# ---------------------------------------------------------------------------------------------- windowed


def brute_force_windows(query, key, value, coords, window, shift):
    """Attention restricted to pairs in the same (batch, cell), one output row at a time."""
    offset = window // 2 if shift else 0
    cells = torch.cat([coords[:, :1], torch.div(coords[:, 1:] + offset, window, rounding_mode="floor")], 1)
    out = torch.empty(query.shape[0], query.shape[1], value.shape[-1], dtype=query.dtype)
    for i in range(query.shape[0]):
        same = (cells == cells[i]).all(dim=1)
        out[i] = dense_attention(query[i : i + 1], key[same], value[same])[0]
    return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=8)
@given(x=sparse_tensors(channels=1, max_size=6, max_batch=3), window=st.sampled_from([2, 3, 4]))
def test_windowed_matches_brute_force(shift, backend, x, window):
    generator = torch.Generator().manual_seed(x.num_voxels)
    query, key, value = (
        torch.randn(x.num_voxels, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    out = windowed_attention(
        query, key, value, x.coords, window, shift=shift, offsets=x.offsets, backend=backend
    )
    expected = brute_force_windows(query, key, value, x.coords, window, shift)
    torch.testing.assert_close(out, expected)


@settings(max_examples=8)
@given(x=sparse_tensors(channels=1, max_size=6, max_batch=3))
def test_windowed_single_window_equals_full_attention(x):
    generator = torch.Generator().manual_seed(7)
    query, key, value = (
        torch.randn(x.num_voxels, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    out = windowed_attention(query, key, value, x.coords, 8)
    expected = varlen_attention(query, key, value, x.offsets, x.offsets, backend="reference")
    torch.testing.assert_close(out, expected)
    # A shifted window of 16 (offset 8) still covers the whole 8^3 grid with one cell.
    torch.testing.assert_close(windowed_attention(query, key, value, x.coords, 16, shift=True), expected)


def test_window_partition_groups_and_gradients():
    coords = torch.tensor(
        [[0, 0, 0, 0], [0, 3, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0], [1, 2, 2, 2]], dtype=torch.int32
    )
    partition = window_partition(coords, 2)
    assert partition.offsets.tolist() == [0, 2, 3, 4, 5]
    assert partition.max_size == 2
    assert torch.equal(partition.order[partition.inverse], torch.arange(5))
    shifted = window_partition(coords, 2, shift=True)  # cells floor((xyz + 1) / 2)
    assert shifted.offsets.tolist() == [0, 1, 2, 3, 4, 5]
    generator = torch.Generator().manual_seed(4)
    tensors = [
        torch.randn(5, 1, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    assert torch.autograd.gradcheck(lambda q, k, v: windowed_attention(q, k, v, coords, 2), tensors)


# ---------------------------------------------------------------------------------------------- cross


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=8)
@given(case=length_pairs(max_len=5), length=st.integers(1, 5), use_mask=st.booleans())
def test_cross_matches_loop(backend, case, length, use_mask):
    lengths_q, _, seed = case
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths_q)
    query = packed(lengths_q, 2, 4, generator, requires_grad=True)
    key = torch.randn(batch, length, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    value = torch.randn(batch, length, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(batch, length, generator=generator) < 0.6 if use_mask else None
    offsets_q = offsets_of(lengths_q)
    out = cross_attention(query, offsets_q, key, value, key_padding_mask=mask, backend=backend)
    bounds = offsets_q.tolist()
    expected = []
    for b in range(batch):
        keep = mask[b] if mask is not None else torch.ones(length, dtype=torch.bool)
        expected.append(dense_attention(query[bounds[b] : bounds[b + 1]], key[b][keep], value[b][keep]))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    if out.numel():
        weights = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), [query, key, value], allow_unused=True)
        expected_grads = [None] * 3
        if expected.requires_grad:  # False when every key is padding: the output is constant 0
            expected_grads = torch.autograd.grad(
                (expected * weights).sum(), [query, key, value], allow_unused=True
            )
        for grad, expected_grad, tensor in zip(grads, expected_grads, [query, key, value], strict=True):
            zeros = torch.zeros_like(tensor)
            torch.testing.assert_close(
                zeros if grad is None else grad, zeros if expected_grad is None else expected_grad
            )


# ---------------------------------------------------------------------------------------------- errors


def _triple_tokens(lengths_q=(2, 3), lengths_kv=(2, 3), dim=4, value_dim=4):
    generator = torch.Generator().manual_seed(0)
    return (
        packed(lengths_q, 2, dim, generator),
        packed(lengths_kv, 2, dim, generator),
        packed(lengths_kv, 2, value_dim, generator),
    )


def test_errors_are_clear():
    query, key, value = _triple_tokens()
    offsets = offsets_of([2, 3])
    with pytest.raises(ValueError, match=r"key: expected head dim D=4 \(that of query\), got 5"):
        varlen_attention(query, torch.randn(5, 2, 5, dtype=torch.float64), value, offsets, offsets)
    with pytest.raises(ValueError, match=r"offsets_q: expected offsets\[0\] == 0 and offsets\[-1\] == 5"):
        varlen_attention(query, key, value, offsets_of([2, 4]), offsets)
    with pytest.raises(ValueError, match=r"offsets_q and offsets_kv: expected the same number of samples"):
        varlen_attention(query, key, value, offsets_of([2, 3]), offsets_of([1, 1, 3]))
    with pytest.raises(ValueError, match=r"heads"):
        varlen_attention(query, key[:, :1], value[:, :1], offsets, offsets)
    with pytest.raises(TypeError, match=r"key: expected dtype torch.float64"):
        varlen_attention(query, key.float(), value, offsets, offsets)
    with pytest.raises(ValueError, match=r"backend: 'sdpa' needs equal"):
        varlen_attention(query, key, value, offsets, offsets, backend="sdpa")
    with pytest.raises(ValueError, match=r"backend: expected None, 'auto' or one of"):
        varlen_attention(query, key, value, offsets, offsets, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"backend: 'varlen' needs CUDA"):
            varlen_attention(query, key, value, offsets, offsets, backend="varlen")
    with pytest.raises(ValueError, match=r"len\(offsets_a\) == len\(offsets_b\)"):
        joint_attention(query, key, value, offsets, query, key, value, offsets_of([1, 1, 3]))
    with pytest.raises(ValueError, match=r"query_b: expected \[\*, H, D\]"):
        small = torch.randn(5, 2, 3, dtype=torch.float64)
        joint_attention(query, key, value, offsets, small, small, value, offsets)
    with pytest.raises(ValueError, match=r"offsets_b: expected offsets\[0\] == 0 and offsets\[-1\] == 5"):
        joint_attention(query, key, value, offsets, query, key, value, offsets_of([2, 2]))
    with pytest.raises(ValueError, match=r"key and value: expected B=2 samples"):
        cross_attention(query, offsets, torch.randn(3, 4, 2, 4), torch.randn(3, 4, 2, 4))
    with pytest.raises(ValueError, match=r"coords: expected 5 rows"):
        windowed_attention(query, key, value, torch.zeros(4, 4, dtype=torch.int32), 2)


# ---------------------------------------------------------------------------------------------- modules


def _batch_of(samples, channels, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    feats = [torch.randn(c.shape[0], channels, generator=generator, dtype=dtype) for c in samples]
    return SparseTensor.from_list(samples, feats, spatial_shape=8)


SAMPLES = [
    torch.tensor([[0, 0, 0], [1, 0, 0], [5, 5, 5], [6, 7, 1], [2, 2, 2]], dtype=torch.int32),
    torch.zeros(0, 3, dtype=torch.int32),
    torch.tensor([[3, 3, 3], [4, 4, 4], [7, 7, 7]], dtype=torch.int32),
]


@pytest.mark.parametrize("window,shift", [(None, False), (4, False), (4, True)])
def test_self_attention_module_packed_equals_per_sample_and_grads(window, shift):
    torch.manual_seed(0)
    module = SparseSelfAttention(16, 4, window=window, shift=shift).double()
    x = _batch_of(SAMPLES, 16, torch.float64)
    out = module(x)
    assert out.coords is x.coords and out.feats.shape == (x.num_voxels, 16)
    bounds = x.offsets.tolist()
    for b, coords in enumerate(SAMPLES):
        if coords.shape[0] == 0:
            continue
        single = SparseTensor.from_list([coords], [x.feats[bounds[b] : bounds[b + 1]]], spatial_shape=8)
        torch.testing.assert_close(out.feats[bounds[b] : bounds[b + 1]], module(single).feats)
    out.feats.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_self_attention_rope_hook_is_applied():
    torch.manual_seed(0)
    module = SparseSelfAttention(8, 2, qk_norm=False).double()
    x = _batch_of(SAMPLES, 8, torch.float64)

    def rope(query, key):
        assert query.shape == (x.num_voxels, 2, 4) and key.shape == query.shape
        return query.flip(-1), 2 * key

    out = module(x, rope=rope)
    qkv = module.to_qkv(x.feats).view(-1, 3, 2, 4)
    expected = loop_attention(qkv[:, 0].flip(-1), 2 * qkv[:, 1], qkv[:, 2], x.offsets, x.offsets)
    torch.testing.assert_close(out.feats, module.to_out(expected.reshape(-1, 8)))


def test_cross_attention_module_matches_loop_and_grads():
    torch.manual_seed(0)
    module = SparseCrossAttention(16, 6, 4, qk_norm=True).double()
    x = _batch_of(SAMPLES, 16, torch.float64)
    context = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    out = module(x, context, mask)
    bounds = x.offsets.tolist()
    for b in range(3):
        if bounds[b] == bounds[b + 1]:
            continue
        single = SparseTensor.from_list([SAMPLES[b]], [x.feats[bounds[b] : bounds[b + 1]]], spatial_shape=8)
        expected = module(single, context[b : b + 1, mask[b]])
        torch.testing.assert_close(out.feats[bounds[b] : bounds[b + 1]], expected.feats)
    out.feats.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("window", [None, 4])
def test_modules_run_under_bf16_autocast_on_cpu(window):
    torch.manual_seed(0)
    module = SparseSelfAttention(16, 2, window=window)
    cross = SparseCrossAttention(16, 8, 2)
    x = _batch_of(SAMPLES, 16)
    context = torch.randn(3, 4, 8)
    reference = cross(module(x), context).feats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cross(module(x), context).feats
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_module_errors():
    with pytest.raises(ValueError, match=r"dim: expected a multiple of num_heads=3, got 16"):
        SparseSelfAttention(16, 3)
    module = SparseCrossAttention(16, 8, 2)
    x = _batch_of(SAMPLES, 16)
    with pytest.raises(ValueError, match=r"context: expected \[B, L, context_dim\] = \[3, L, 8\]"):
        module(x, torch.randn(2, 4, 8))


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_case(lengths_q, lengths_kv, heads=4, dim=64, dtype=torch.bfloat16, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda lengths, d: torch.randn(  # noqa: E731
        sum(lengths), heads, d, device="cuda", dtype=dtype, generator=generator
    ).requires_grad_(True)
    return (
        make(lengths_q, dim),
        make(lengths_kv, dim),
        make(lengths_kv, dim),
        offsets_of(lengths_q).cuda(),
        offsets_of(lengths_kv).cuda(),
    )


def _run(backend, query, key, value, offsets_q, offsets_kv, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    out = varlen_attention(*inputs, offsets_q, offsets_kv, backend=backend)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 72])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, dim, dtype):
    if backend not in available_backends("cuda", dtype) and backend != "auto":
        pytest.skip(f"{backend} not available for {dtype}")
    lengths_q, lengths_kv = [200, 0, 517, 64, 130], [200, 3, 517, 0, 300]
    query, key, value, offsets_q, offsets_kv = _gpu_case(lengths_q, lengths_kv, dim=dim, dtype=dtype)
    grad_out = torch.randn(sum(lengths_q), 4, dim, device="cuda", dtype=dtype)
    # The reference in float64 on the same inputs: the standard for every backend.
    inputs64 = [t.detach().double().requires_grad_(True) for t in (query, key, value)]
    expected = loop_attention(*inputs64, offsets_q, offsets_kv)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())
    out, grads = _run(backend, query, key, value, offsets_q, offsets_kv, grad_out)
    tolerance = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), expected_grad, atol=4 * tolerance, rtol=4 * tolerance)
    # The sample with queries but no keys (sample 3) is exactly zero.
    assert torch.all(out[717:781] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_agree_with_reference_bf16(backend):
    """Same bf16 inputs through the CUDA backend and the reference loop: within ~2e-3 (unit variance)."""
    if backend not in available_backends("cuda", torch.bfloat16) and backend != "auto":
        pytest.skip(f"{backend} not available")
    query, key, value, offsets_q, offsets_kv = _gpu_case([1000, 333, 2048], [1000, 333, 2048], dim=72)
    grad_out = torch.randn_like(query)
    out, grads = _run(backend, query, key, value, offsets_q, offsets_kv, grad_out)
    expected, expected_grads = _run("reference", query, key, value, offsets_q, offsets_kv, grad_out)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-3, rtol=2e-2)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=1e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", [*GPU_BACKENDS, "sdpa"])
def test_gpu_backends_isolate_samples(backend, dtype):
    """As test_backends_isolate_samples, on CUDA: outputs bitwise, gradients up to atomics' rounding."""
    if backend not in available_backends("cuda", dtype) and backend not in ("auto", "sdpa"):
        pytest.skip(f"{backend} not available for {dtype}")
    if backend == "sdpa":
        check_isolation(backend, [64, 64, 64], [80, 80, 80], 1, "cuda", dtype, bitwise_grads=False)
        return
    lengths_q, lengths_kv = [37, 130, 0, 64, 200], [50, 129, 3, 0, 255]  # ragged, block boundaries shared
    check_isolation(backend, lengths_q, lengths_kv, 1, "cuda", dtype, bitwise_grads=False)
    check_isolation(backend, lengths_q, lengths_kv, 4, "cuda", dtype, bitwise_grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_padding_never_wins_over_very_low_real_scores(backend, dtype):
    if backend not in available_backends("cuda", dtype) and backend != "auto":
        pytest.skip(f"{backend} not available for {dtype}")
    lengths_q, lengths_kv = [3, 40], [2, 70]
    offsets_q, offsets_kv = offsets_of(lengths_q).cuda(), offsets_of(lengths_kv).cuda()
    generator = torch.Generator().manual_seed(0)
    query = torch.full((43, 2, 16), 50.0) + torch.rand(43, 2, 16, generator=generator)
    key = torch.full((72, 2, 16), -40.0) + torch.rand(72, 2, 16, generator=generator)
    value = torch.randn(72, 2, 16, generator=generator)
    query, key, value = (t.to(device="cuda", dtype=dtype) for t in (query, key, value))
    out = varlen_attention(query, key, value, offsets_q, offsets_kv, backend=backend)
    expected = loop_attention(query.double(), key.double(), value.double(), offsets_q, offsets_kv)
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa", "padded", "varlen"])
def test_gpu_joint_and_windowed_match_cpu(backend):
    generator = torch.Generator().manual_seed(0)
    lengths_a, lengths_b = [64, 64], [256, 256]
    tensors_a = [packed(lengths_a, 4, 64, generator, dtype=torch.float32) for _ in range(3)]
    tensors_b = [packed(lengths_b, 4, 64, generator, dtype=torch.float32) for _ in range(3)]
    offsets_a, offsets_b = offsets_of(lengths_a), offsets_of(lengths_b)
    expected = joint_attention(*tensors_a, offsets_a, *tensors_b, offsets_b, backend="reference")
    cuda = [t.cuda().bfloat16() for t in (*tensors_a, *tensors_b)]
    out = joint_attention(*cuda[:3], offsets_a.cuda(), *cuda[3:], offsets_b.cuda(), backend=backend)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
    if backend == "sdpa":
        return
    coords = torch.cat(
        [torch.zeros(300, 1, dtype=torch.long), torch.randint(0, 16, (300, 3), generator=generator)], 1
    ).int()
    coords = torch.unique(coords, dim=0)
    q, k, v = (torch.randn(coords.shape[0], 4, 64, generator=generator) for _ in range(3))
    expected = windowed_attention(q, k, v, coords, 4, shift=True, backend="reference")
    got = windowed_attention(
        q.cuda().bfloat16(),
        k.cuda().bfloat16(),
        v.cuda().bfloat16(),
        coords.cuda(),
        4,
        shift=True,
        backend=backend,
    )
    torch.testing.assert_close(got.float().cpu(), expected, atol=2e-2, rtol=2e-2)
