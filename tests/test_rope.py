"""Tests of the RoPE family: axial RoPE properties, diffusers FLUX parity, MARoPE, anchor id builders."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.functional.rope import (
    apply_rope,
    diagonal_ids,
    grid_ids,
    index_axis_ids,
    marope_image_ids,
    rope_frequencies,
    shifted_ids,
    sincos_embedding,
)
from sparse3d.nn.embeddings import MARoPE, RotaryEmbedding, TimestepEmbedding, timestep_features

AXES_CHOICES = [(8,), (4, 6), (4, 6, 6), (2, 4, 4, 6), (16, 24, 24)]


@st.composite
def rope_cases(draw: st.DrawFn) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Axis widths, float ids [T, n_axes] (negative, fractional), queries and keys [T, H, D]."""
    axes_dims = draw(st.sampled_from(AXES_CHOICES))
    num_tokens = draw(st.integers(1, 12))
    heads = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    ids = (torch.rand(num_tokens, len(axes_dims), generator=generator) - 0.3) * 40  # [T, n_axes]
    query = torch.randn(num_tokens, heads, sum(axes_dims), generator=generator)
    key = torch.randn(num_tokens, heads, sum(axes_dims), generator=generator)
    return axes_dims, ids, query, key


@given(rope_cases())
def test_rope_preserves_norms(case) -> None:
    axes_dims, ids, query, _ = case
    cos, sin = rope_frequencies(ids, axes_dims)
    rotated = apply_rope(query, cos, sin)
    # Each interleaved pair is a 2-D rotation: the norm of every pair is preserved.
    pair_norms = query.unflatten(-1, (-1, 2)).norm(dim=-1)
    rotated_pair_norms = rotated.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(rotated_pair_norms, pair_norms, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated, query)  # random non-zero ids do rotate


@given(rope_cases(), st.integers(0, 2**31 - 1))
def test_rope_scores_depend_only_on_id_differences(case, seed) -> None:
    axes_dims, ids, query, key = case
    generator = torch.Generator().manual_seed(seed)
    shift = (torch.rand(len(axes_dims), generator=generator) - 0.5) * 30  # one random float shift per axis
    scores = []
    for positions in (ids, ids + shift):
        cos, sin = rope_frequencies(positions, axes_dims)
        rotated_query, rotated_key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        scores.append(torch.einsum("thd,shd->hts", rotated_query, rotated_key))  # [H, T, T]
    torch.testing.assert_close(scores[1], scores[0], atol=2e-4, rtol=1e-4)
    # And the scores do depend on the differences: moving one token on one axis changes its row.
    moved = ids.clone()
    moved[0, 0] += 1.7
    cos, sin = rope_frequencies(moved, axes_dims)
    changed = torch.einsum("thd,shd->hts", apply_rope(query, cos, sin), apply_rope(key, cos, sin))
    if ids.shape[0] > 1:
        assert not torch.allclose(changed[:, 0, 1:], scores[0][:, 0, 1:], atol=1e-4)


@given(rope_cases())
def test_rope_identity_at_zero(case) -> None:
    axes_dims, ids, query, _ = case
    cos, sin = rope_frequencies(torch.zeros_like(ids), axes_dims)
    assert torch.equal(apply_rope(query, cos, sin), query)


def test_rope_matches_explicit_complex_rotation() -> None:
    """Reference: each pair is a complex number multiplied by exp(i * id * theta^(-2k/d)) per axis."""
    generator = torch.Generator().manual_seed(0)
    axes_dims = (4, 6, 6)
    ids = torch.randn(7, 3, generator=generator, dtype=torch.float64) * 5
    query = torch.randn(7, 2, 16, generator=generator, dtype=torch.float64)
    angles = []
    for axis, width in enumerate(axes_dims):
        for k in range(width // 2):
            angles.append(ids[:, axis] * 10000.0 ** (-2 * k / width))
    angle = torch.stack(angles, dim=1)  # [T, 8]
    complex_query = torch.view_as_complex(query.unflatten(-1, (-1, 2)).contiguous())  # [T, H, 8]
    expected = torch.view_as_real(
        complex_query * torch.polar(torch.ones_like(angle), angle)[:, None]
    ).flatten(-2)
    cos, sin = rope_frequencies(ids, axes_dims)
    torch.testing.assert_close(apply_rope(query.float(), cos, sin), expected.float(), atol=1e-5, rtol=1e-5)


@given(rope_cases())
def test_rope_matches_diffusers_flux(case) -> None:
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes_dims, ids, query, _ = case
    reference_cos, reference_sin = FluxPosEmbed(10000, list(axes_dims))(ids)
    cos, sin = rope_frequencies(ids, axes_dims)
    assert torch.equal(cos, reference_cos) and torch.equal(sin, reference_sin)
    reference = apply_rotary_emb(query[None], (reference_cos, reference_sin), sequence_dim=1)[0]
    torch.testing.assert_close(apply_rope(query, cos, sin), reference, atol=1e-6, rtol=0)


def test_apply_rope_dtype_contract() -> None:
    ids = torch.randn(5, 3) * 50
    query = torch.randn(5, 2, 16)
    cos, sin = rope_frequencies(ids, (4, 6, 6))
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    low = apply_rope(query.bfloat16(), cos, sin)
    assert low.dtype == torch.bfloat16
    # Computed in float32: the bf16 result is the float32 result rounded once.
    expected = apply_rope(query.bfloat16().float(), cos, sin).bfloat16()
    assert torch.equal(low, expected)


def test_rope_errors() -> None:
    ids = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="axes_dims"):
        rope_frequencies(ids, (4, 6, 5))
    with pytest.raises(ValueError, match=r"ids: expected shape \[T, 3\]"):
        rope_frequencies(torch.zeros(4, 2), (4, 6, 6))
    with pytest.raises(ValueError, match="summing to the head dimension 32"):
        rope_frequencies(ids, (4, 6, 6), head_dim=32)
    cos, sin = rope_frequencies(ids, (4, 6, 6))
    with pytest.raises(ValueError, match=r"cos of shape \[4, 32\]"):
        apply_rope(torch.zeros(4, 2, 32), cos, sin)
    with pytest.raises(ValueError, match=r"cos of shape \[5, 16\]"):
        apply_rope(torch.zeros(5, 2, 16), cos, sin)
    with pytest.raises(ValueError, match="axes_dims"):
        MARoPE(axes_dims=(8, 8))


def test_grid_ids_matches_meshgrid_and_centering() -> None:
    ids = grid_ids((2, 3, 4))
    mesh = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij"), -1)
    assert torch.equal(ids, mesh.reshape(-1, 3).float())
    centred = grid_ids((4, 5), center=True)
    assert centred[:, 0].unique().tolist() == [-2.0, -1.0, 0.0, 1.0]  # Qwen: -(h - h//2) ... h//2 - 1
    assert centred[:, 1].unique().tolist() == [-3.0, -2.0, -1.0, 0.0, 1.0]


@pytest.mark.parametrize("plane_axis", [0, 1, 2])
def test_marope_image_ids_plane_and_fit(plane_axis: int) -> None:
    grid = (8, 6, 4)
    ids = marope_image_ids((4, 2), grid, plane_axis=plane_axis, plane_position=-1.0)
    assert ids.shape == (8, 3)
    assert torch.all(ids[:, plane_axis] == -1.0)  # on the plane, outside [0, grid)
    in_plane = [axis for axis in range(3) if axis != plane_axis]
    for column, axis, count in ((0, in_plane[0], 4), (1, in_plane[1], 2)):
        values = ids[:, axis]
        # Fitted: patch centres spread evenly over the voxel extent, symmetric about its centre.
        assert math.isclose(values.min().item() + values.max().item(), grid[axis] - 1, abs_tol=1e-5)
        step = grid[axis] / count
        expected = (grid_ids((4, 2))[:, column] + 0.5) * step - 0.5
        torch.testing.assert_close(values, expected)
    raw = marope_image_ids((4, 2), grid, plane_axis=plane_axis, plane_position=9.0, fit_to_grid=False)
    assert torch.all(raw[:, plane_axis] == 9.0)
    assert torch.equal(raw[:, in_plane], grid_ids((4, 2)))


def test_marope_identity_when_image_matches_grid() -> None:
    ids = marope_image_ids((5, 5), (5, 5, 5))
    torch.testing.assert_close(ids[:, :2], grid_ids((5, 5)))


def test_marope_module_tables() -> None:
    rope = MARoPE(axes_dims=(4, 6, 6), plane_axis=0, plane_position=4.0)
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0], [1, 3, 3, 1]], dtype=torch.int32)
    (image_cos, image_sin), (voxel_cos, voxel_sin) = rope(
        coords, image_shape=(2, 3), grid_shape=(4, 4, 4), batch_size=2
    )
    image_ids = marope_image_ids((2, 3), (4, 4, 4), plane_axis=0, plane_position=4.0).repeat(2, 1)
    expected_image = rope_frequencies(image_ids, (4, 6, 6))
    expected_voxel = rope_frequencies(coords[:, 1:].float(), (4, 6, 6))
    assert torch.equal(image_cos, expected_image[0]) and torch.equal(image_sin, expected_image[1])
    assert torch.equal(voxel_cos, expected_voxel[0]) and torch.equal(voxel_sin, expected_voxel[1])
    plain = RotaryEmbedding(axes_dims=(4, 6, 6))
    assert torch.equal(plain(image_ids)[0], image_cos)


@given(
    shapes=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=4),
    form=st.sampled_from(["pairs", "lists", "tensor"]),
    plane_axis=st.sampled_from([0, 1, 2]),
)
def test_marope_ragged_images_match_per_sample_calls(shapes, form, plane_axis) -> None:
    """Per-sample image shapes (different token counts per sample): the image tables are those of one call
    per sample, concatenated in sample order, in every accepted form; the voxel tables do not change."""
    rope = MARoPE(axes_dims=(4, 6, 6), plane_axis=plane_axis, plane_position=-2.0)
    grid = (5, 3, 4)
    coords = torch.tensor([[b, b, 2, 3 - b] for b in range(len(shapes))], dtype=torch.int32)
    given_shapes = {
        "pairs": shapes,
        "lists": tuple(list(shape) for shape in shapes),
        "tensor": torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2),
    }[form]
    (image_cos, image_sin), voxel_rope = rope(coords, image_shape=given_shapes, grid_shape=grid)
    expected_cos, expected_sin = [], []
    for b, shape in enumerate(shapes):
        (one_cos, one_sin), _ = rope(coords[b : b + 1], image_shape=shape, grid_shape=grid, batch_size=1)
        expected_cos.append(one_cos)
        expected_sin.append(one_sin)
    assert image_cos.shape == (sum(h * w for h, w in shapes), 16)
    assert torch.equal(image_cos, torch.cat(expected_cos)) and torch.equal(image_sin, torch.cat(expected_sin))
    assert torch.equal(voxel_rope[0], rope(coords, image_shape=(1, 1), grid_shape=grid, batch_size=1)[1][0])
    ids = rope.image_ids(given_shapes, grid, batch_size=len(shapes))
    expected_ids = [
        marope_image_ids(shape, grid, plane_axis=plane_axis, plane_position=-2.0) for shape in shapes
    ]
    assert torch.equal(ids, torch.cat(expected_ids))


def test_marope_shared_shape_equals_repeated_per_sample_shapes() -> None:
    rope = MARoPE(axes_dims=(4, 6, 6))
    coords = torch.zeros(0, 4, dtype=torch.int32)
    shared = rope(coords, image_shape=(3, 2), grid_shape=(4, 4, 4), batch_size=3)
    per_sample = rope(coords, image_shape=[(3, 2)] * 3, grid_shape=(4, 4, 4), batch_size=3)
    assert torch.equal(shared[0][0], per_sample[0][0]) and torch.equal(shared[0][1], per_sample[0][1])
    wide = rope(
        coords, image_shape=torch.tensor([3, 2]), grid_shape=(4, 4, 4), batch_size=3, dtype=torch.float64
    )
    assert wide[0][0].dtype == torch.float64 and torch.equal(wide[0][0].float(), shared[0][0])


def test_marope_image_shape_errors() -> None:
    rope = MARoPE(axes_dims=(4, 6, 6))
    coords = torch.zeros(0, 4, dtype=torch.int32)
    grid = (4, 4, 4)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1 with one shared image_shape"):
        rope(coords, image_shape=(2, 2), grid_shape=grid)
    with pytest.raises(
        ValueError, match="batch_size: expected the number of per-sample image shapes, 2, got 3"
    ):
        rope(coords, image_shape=[(2, 2), (1, 3)], grid_shape=grid, batch_size=3)
    with pytest.raises(ValueError, match=r"image_shape: expected \(h, w\), a sequence of B pairs"):
        rope(coords, image_shape=(2, 2, 2), grid_shape=grid, batch_size=1)
    with pytest.raises(ValueError, match=r"image_shape: expected \(h, w\), a sequence of B pairs"):
        rope(coords, image_shape=[(2, 2), (1, 3, 1)], grid_shape=grid)
    with pytest.raises(ValueError, match="got a tensor of shape \\[2, 3\\]"):
        rope(coords, image_shape=torch.zeros(2, 3, dtype=torch.int64), grid_shape=grid)
    with pytest.raises(TypeError, match="image_shape: expected an integer tensor, got torch.float32"):
        rope(coords, image_shape=torch.tensor([[2.0, 2.0]]), grid_shape=grid)
    with pytest.raises(ValueError, match="image_shape: expected non-negative integer sizes"):
        rope(coords, image_shape=[(2, -1)], grid_shape=grid)
    with pytest.raises(ValueError, match="image_shape: expected non-negative integer sizes"):
        rope(coords, image_shape=[(2, 1.5)], grid_shape=grid)


def test_marope_relative_bias_prefers_nearby_voxels() -> None:
    """With all-equal q/k content, RoPE scores decay with distance: a patch scores higher against the
    voxel right behind it than against a voxel on the far side of the grid (the MARoPE intuition)."""
    rope = MARoPE(axes_dims=(8, 12, 12))
    grid = (8, 8, 8)
    image_ids = rope.image_ids((8, 8), grid)  # patch (i, j) -> (i, j, -1)
    voxel_ids = grid_ids(grid)
    image_cos, image_sin = rope(torch.zeros(0, 4), image_shape=(8, 8), grid_shape=grid, batch_size=1)[0]
    voxel_cos, voxel_sin = rope_frequencies(voxel_ids, rope.axes_dims)
    ones = torch.ones(1, 1, 32)
    query = apply_rope(ones.expand(64, 1, 32), image_cos, image_sin)[:, 0]  # [64, 32]
    key = apply_rope(ones.expand(512, 1, 32), voxel_cos, voxel_sin)[:, 0]  # [512, 32]
    scores = query @ key.T  # [64, 512]
    patch = 0  # at (0, 0, -1)
    near = (voxel_ids == torch.tensor([0.0, 0.0, 0.0])).all(1).nonzero().item()
    far = (voxel_ids == torch.tensor([7.0, 7.0, 7.0])).all(1).nonzero().item()
    assert scores[patch, near] > scores[patch, far]
    assert torch.equal(image_ids[:, 2], torch.full((64,), -1.0))


def test_anchor_id_builders() -> None:
    ids = grid_ids((2, 3))
    kontext = index_axis_ids(ids, 1)
    assert kontext.shape == (6, 3) and torch.all(kontext[:, 0] == 1) and torch.equal(kontext[:, 1:], ids)
    omini = shifted_ids(ids, (0.0, -3.0), scale=2.0)
    # Scaled by 2 with centres aligned: row r -> 2r + 0.5, then shifted.
    torch.testing.assert_close(omini, torch.stack([ids[:, 0] * 2 + 0.5, ids[:, 1] * 2 + 0.5 - 3.0], 1))
    diagonal = diagonal_ids(4, start=5, num_axes=3)
    assert diagonal.tolist() == [[5.0] * 3, [6.0] * 3, [7.0] * 3, [8.0] * 3]
    with pytest.raises(ValueError, match="shift"):
        shifted_ids(ids, (1.0, 2.0, 3.0))


def test_sincos_embedding_matches_per_axis_loop() -> None:
    ids = torch.tensor([[0.0, 1.5], [-2.0, 3.0], [7.0, 0.25]])
    features = sincos_embedding(ids, (4, 6))
    rows = []
    for position in ids.tolist():
        row = []
        for value, width in zip(position, (4, 6), strict=True):
            frequencies = [10000.0 ** (-2 * k / width) for k in range(width // 2)]
            row += [math.sin(value * f) for f in frequencies] + [math.cos(value * f) for f in frequencies]
        rows.append(row)
    torch.testing.assert_close(features, torch.tensor(rows), atol=1e-6, rtol=0)


def test_timestep_features_match_diffusers() -> None:
    from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
    from diffusers.models.embeddings import Timesteps

    from sparse3d.compat.flux import load_flux_timestep_embedding

    timesteps = torch.tensor([0.0, 0.25, 0.999, 1.0])
    reference = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(timesteps * 1000)
    torch.testing.assert_close(timestep_features(timesteps), reference, atol=0, rtol=0)
    torch.manual_seed(0)
    theirs = DiffusersTimestepEmbedding(256, 32)
    ours = TimestepEmbedding(32)
    load_flux_timestep_embedding(ours, theirs.state_dict(), prefix="")
    torch.testing.assert_close(ours(timesteps), theirs(reference), atol=1e-6, rtol=0)
