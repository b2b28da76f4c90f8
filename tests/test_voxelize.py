"""Tests of sparse3d.geometry.voxelize: exact triangle-box voxelization, points, Gaussians, mesh files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import trimesh
from hypothesis import given
from hypothesis import strategies as st

from sparse3d import SparseTensor
from sparse3d.geometry import (
    load_mesh,
    normalize_vertices,
    voxel_centers,
    voxelize_gaussians,
    voxelize_mesh,
    voxelize_meshes,
    voxelize_points,
    voxels_to_sparse,
)


def _touches(triangle: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    """Reference: clip the triangle against the six closed half-spaces of the box (Sutherland-Hodgman)."""
    polygon = [p for p in triangle]
    for axis in range(3):
        for sign, bound in ((1.0, high[axis]), (-1.0, low[axis])):
            clipped = []
            for a, b in zip(polygon, polygon[1:] + polygon[:1], strict=True):
                da, db = sign * (a[axis] - bound), sign * (b[axis] - bound)
                if da <= 0:
                    clipped.append(a)
                if (da < 0 < db) or (db < 0 < da):
                    clipped.append(a + da / (da - db) * (b - a))
            polygon = clipped
            if not polygon:
                return False
    return True


def _brute_force(triangles_world: np.ndarray, resolution: int) -> set[tuple[int, int, int]]:
    """All cells of the grid touched by any triangle, by clipping against every cell."""
    grid = (triangles_world.astype(np.float64) + 0.5) * resolution
    cells = set()
    for i, j, k in itertools.product(range(resolution), repeat=3):
        low = np.array([i, j, k], dtype=np.float64)
        if any(_touches(t, low, low + 1) for t in grid):
            cells.add((i, j, k))
    return cells


def _as_set(coords: torch.Tensor) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in coords.tolist()}


def _check_canonical(coords: torch.Tensor) -> None:
    assert coords.dtype == torch.int32 and coords.dim() == 2 and coords.shape[1] == 3
    keys = (coords[:, 0].long() * 2**20 + coords[:, 1].long()) * 2**20 + coords[:, 2].long()
    assert bool((keys.diff() > 0).all()), "coords must be unique and in lexicographic order"


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.05, 0.3, 1.2]))
def test_single_triangle_matches_brute_force(seed: int, scale: float) -> None:
    resolution = 6
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-0.4, 0.4, size=3)
    triangle = centre + rng.uniform(-0.5, 0.5, size=(3, 3)) * scale  # may stick out of the cube
    out_of_bounds = "crop" if np.abs(triangle).max() > 0.5 else "error"
    coords = voxelize_mesh(
        torch.from_numpy(triangle), torch.tensor([[0, 1, 2]]), resolution, out_of_bounds=out_of_bounds
    )
    _check_canonical(coords)
    assert _as_set(coords) == _brute_force(triangle[None], resolution)


def test_small_mesh_matches_brute_force_and_chunking() -> None:
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    vertices = torch.tensor(mesh.vertices) + torch.tensor([0.03, -0.05, 0.02], dtype=torch.float64)
    faces = torch.tensor(mesh.faces)
    coords = voxelize_mesh(vertices, faces, 7)
    assert _as_set(coords) == _brute_force(vertices[faces].numpy(), 7)
    assert torch.equal(voxelize_mesh(vertices, faces, 7, chunk_size=5), coords)


def test_icosphere_shell_matches_the_analytic_band() -> None:
    """Every cell touched lies in the shell band; every cell straddling the whole band is touched.

    The mesh surface lies between radius ``r_in`` (closest face plane) and ``r`` (the vertices). A cell
    can only touch it if its nearest point is within ``r`` and its farthest corner beyond ``r_in``; a
    cell reaching both inside ``r_in`` and outside ``r`` must cross the closed surface.
    """
    resolution, radius = 32, 0.37
    centre = np.array([0.013, -0.021, 0.007])
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    vertices = torch.tensor(mesh.vertices + centre, dtype=torch.float32)
    faces = torch.tensor(mesh.faces)
    coords = voxelize_mesh(vertices, faces, resolution)
    _check_canonical(coords)

    triangles = mesh.vertices[mesh.faces]  # [F, 3, 3], centred at the sphere centre
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    inner = np.abs((normals * triangles[:, 0]).sum(1)).min()
    assert radius - inner < 0.01  # a thin band, so the check is tight

    axis = np.arange(resolution)
    low = (
        np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) / resolution - 0.5 - centre
    )
    high = low + 1.0 / resolution
    nearest = np.linalg.norm(np.clip(0.0, low, high), axis=1)
    farthest = np.linalg.norm(np.maximum(np.abs(low), np.abs(high)), axis=1)
    margin = 1e-6
    allowed = (nearest <= radius + margin) & (farthest >= inner - margin)
    required = (nearest < inner - margin) & (farthest > radius + margin)
    flat = (coords[:, 0].long() * resolution + coords[:, 1].long()) * resolution + coords[:, 2].long()
    produced = np.zeros(resolution**3, dtype=bool)
    produced[flat.numpy()] = True
    assert not (produced & ~allowed).any()
    assert not (required & ~produced).any()
    assert required.sum() > 0.8 * produced.sum()


def test_triangle_on_cell_faces_marks_both_sides() -> None:
    resolution = 8
    grid = np.array([[3.0, 1.0, 1.0], [3.0, 5.0, 1.0], [3.0, 1.0, 5.0]])  # in the plane x = 3 (grid units)
    coords = voxelize_mesh(torch.tensor(grid / resolution - 0.5), torch.tensor([[0, 1, 2]]), resolution)
    expected = {
        (i, j, k)
        for i in (2, 3)
        for j in range(resolution)
        for k in range(resolution)
        if max(j, 1) + max(k, 1) <= 6
    }
    assert _as_set(coords) == expected

    # On the cube's outer faces only the inside cells exist.
    for x, i in ((0.0, 0), (8.0, 7)):
        face = grid.copy()
        face[:, 0] = x
        coords = voxelize_mesh(torch.tensor(face / resolution - 0.5), torch.tensor([[0, 1, 2]]), resolution)
        assert _as_set(coords) == {(i, j, k) for _, j, k in expected}

    # A degenerate triangle (a point) on a grid corner touches the 8 cells sharing it.
    corner = torch.full((3, 3), 4.0 / resolution - 0.5, dtype=torch.float64)
    coords = voxelize_mesh(corner, torch.tensor([[0, 1, 2]]), resolution)
    assert _as_set(coords) == set(itertools.product((3, 4), repeat=3))


def test_mesh_bounds_handling() -> None:
    vertices = torch.tensor([[-0.6, 0.0, 0.0], [0.2, 0.1, 0.0], [0.2, -0.1, 0.05]])
    faces = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="vertices: expected values in the world cube"):
        voxelize_mesh(vertices, faces, 8)
    cropped = voxelize_mesh(vertices, faces, 8, out_of_bounds="crop")
    assert _as_set(cropped) == _brute_force(vertices[None].numpy(), 8)
    clipped = voxelize_mesh(vertices, faces, 8, out_of_bounds="clip")
    assert _as_set(clipped) == _brute_force(vertices.clamp(-0.5, 0.5)[None].numpy(), 8)
    with pytest.raises(ValueError, match="faces"):
        voxelize_mesh(vertices, torch.tensor([[0, 1, 3]]), 8)


def test_points_merge_duplicates_explicitly() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(300, 3, generator=generator) - 0.5
    points = torch.cat([points, points[:50], torch.tensor([[0.5, 0.5, -0.5]])])  # duplicates + corner
    feats = torch.randn(points.shape[0], 4, generator=generator)
    coords, cell_feats, inverse = voxelize_points(points, 4, feats, reduce="mean")
    _check_canonical(coords)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for row, point in enumerate(points.tolist()):
        cell = tuple(min(int(np.floor((p + 0.5) * 4)), 3) for p in point)
        groups.setdefault(cell, []).append(row)
    assert _as_set(coords) == set(groups)
    assert coords.shape[0] < points.shape[0]
    for row, cell in enumerate(coords.tolist()):
        torch.testing.assert_close(cell_feats[row], feats[groups[tuple(cell)]].mean(0))
    assert torch.equal(coords[inverse].long(), torch.tensor([list(_cell) for _cell in _cells(points, 4)]))
    assert tuple(coords[inverse[-1]].tolist()) == (3, 3, 0)
    # Voxel centres fall back into their own cells.
    again, _, _ = voxelize_points(voxel_centers(coords, 4), 4)
    assert torch.equal(again, coords)


def _cells(points: torch.Tensor, resolution: int) -> list[list[int]]:
    return [
        [min(int(np.floor((p + 0.5) * resolution)), resolution - 1) for p in point]
        for point in points.tolist()
    ]


def test_points_out_of_bounds() -> None:
    points = torch.tensor([[0.0, 0.0, 0.0], [0.7, 0.0, 0.0], [0.3, 0.3, 0.3]])
    with pytest.raises(ValueError, match="points: expected values in the world cube"):
        voxelize_points(points, 8)
    coords, _, inverse = voxelize_points(points, 8, out_of_bounds="drop")
    assert inverse.tolist()[1] == -1 and coords.shape[0] == 2
    coords, _, inverse = voxelize_points(points, 8, out_of_bounds="clip")
    assert coords[inverse[1]].tolist() == [7, 4, 4]
    with pytest.raises(ValueError, match="finite"):
        voxelize_points(torch.tensor([[float("nan"), 0.0, 0.0]]), 8)


def test_gaussians_to_voxels() -> None:
    means = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.01, 0.01], [0.3, -0.2, 0.1], [-0.4, 0.4, 0.4]])
    opacities = torch.tensor([0.9, 0.8, 0.05, 0.5])
    coords = voxelize_gaussians(means, 8, opacities=opacities, min_opacity=0.1)
    assert _as_set(coords) == {tuple(c) for c in _cells(means[[0, 1, 3]], 8)}
    assert _as_set(voxelize_gaussians(means, 8)) == {tuple(c) for c in _cells(means, 8)}
    with pytest.raises(ValueError, match="min_opacity"):
        voxelize_gaussians(means, 8, min_opacity=0.5)


def test_batch_to_sparse_tensor_matches_per_sample() -> None:
    meshes = [
        (torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces))
        for m in (
            trimesh.creation.icosphere(subdivisions=1, radius=0.3),
            trimesh.creation.box(extents=(0.5, 0.3, 0.2)),
        )
    ]
    batch = voxelize_meshes(meshes, 16)
    assert isinstance(batch, SparseTensor) and batch.batch_size == 2 and batch.spatial_shape == (16, 16, 16)
    per_sample, feats = batch.to_list()
    for (vertices, faces), coords, occupancy in zip(meshes, per_sample, feats, strict=True):
        assert torch.equal(coords, voxelize_mesh(vertices, faces, 16))
        assert torch.equal(occupancy, torch.ones(coords.shape[0], 1))
    with pytest.raises(ValueError, match="spatial_shape"):
        voxels_to_sparse([torch.tensor([[0, 0, 16]])], 16)


@pytest.mark.parametrize("suffix", ["obj", "ply", "glb"])
def test_load_mesh_round_trip(tmp_path, suffix: str) -> None:
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.35)
    path = tmp_path / f"mesh.{suffix}"
    mesh.export(path)
    vertices, faces = load_mesh(path)
    assert vertices.dtype == torch.float32 and faces.dtype == torch.int64
    expected = voxelize_mesh(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces), 16)
    assert torch.equal(voxelize_mesh(vertices, faces, 16), expected)
    rotated, _ = load_mesh(path, y_up=True)
    torch.testing.assert_close(rotated, torch.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], 1))


def test_normalize_vertices() -> None:
    vertices = torch.tensor([[1.0, 2.0, 3.0], [5.0, 3.0, 3.5], [2.0, 2.5, 4.0]])
    normalized, scale, offset = normalize_vertices(vertices)
    assert scale == pytest.approx(0.25)
    torch.testing.assert_close(normalized, vertices * scale + offset)
    torch.testing.assert_close(normalized.amax(0) + normalized.amin(0), torch.zeros(3))
    assert float((normalized.amax(0) - normalized.amin(0)).max()) == pytest.approx(1.0)


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cpu = voxelize_mesh(vertices, faces, 64)
    gpu = voxelize_mesh(vertices.cuda(), faces.cuda(), 64)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    points = torch.rand(10000, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    assert torch.equal(voxelize_points(points.cuda(), 64)[0].cpu(), voxelize_points(points, 64)[0])
