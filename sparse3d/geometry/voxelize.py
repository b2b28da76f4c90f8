"""Voxelization in the world cube [-0.5, 0.5]^3: meshes (exact triangle-box overlap), points, Gaussians.

Voxel ``(i, j, k)`` of a resolution-``R`` grid is the closed box ``[i, i+1] x [j, j+1] x [k, k+1]`` in grid
units (world = grid / R - 0.5), centre ``((i, j, k) + 0.5) / R - 0.5``. Results are int32 coordinates
``[N, 3]``, unique and in canonical (x, y, z) lexicographic order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

from sparse3d.functional.coords import MAX_COORD, Reduce, unique_coords
from sparse3d.tensor import SparseTensor

__all__ = [
    "load_mesh",
    "normalize_vertices",
    "voxel_centers",
    "voxelize_mesh",
    "voxelize_meshes",
    "voxelize_points",
    "voxelize_gaussians",
    "voxels_to_sparse",
]

OutOfBounds = Literal["error", "clip", "drop"]


def load_mesh(path: str | os.PathLike[str], *, y_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads a triangle mesh (OBJ, GLB/glTF, PLY, ... anything trimesh reads) as vertices and faces.

    Scenes (GLB) are flattened into one mesh with their node transforms applied. Vertices are returned
    as stored; normalise them with [`normalize_vertices`][sparse3d.geometry.voxelize.normalize_vertices].
    Needs ``trimesh`` (the ``geometry`` extra), imported only here.

    Args:
        path: Mesh file.
        y_up: The file is Y-up (glTF's convention); rotate it to the Z-up world Blender and TRELLIS use,
            ``(x, y, z) -> (x, -z, y)``, as Blender's glTF importer does.

    Returns:
        ``(vertices [V, 3] float32, faces [F, 3] int64)``.

    Raises:
        ImportError: trimesh is not installed.
        ValueError: The file holds no triangles.
    """
    try:
        import trimesh
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mesh needs trimesh: pip install 'sparse3d[geometry]' (or pip install trimesh)"
        ) from error
    mesh = trimesh.load(os.fspath(path), force="mesh", process=False)
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32).reshape(-1, 3)
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64).reshape(-1, 3)
    if faces.shape[0] == 0:
        raise ValueError(f"path: expected a mesh with triangles, got none in {path}")
    if y_up:
        vertices = torch.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], dim=1)
    return vertices, faces


def normalize_vertices(vertices: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Scales and centres points so the bounding box's longest side is 1, centred at the origin.

    TRELLIS's normalisation: ``scale = 1 / max(bbox_max - bbox_min)``,
    ``offset = -scale * (bbox_min + bbox_max) / 2``, ``normalized = vertices * scale + offset``.

    Args:
        vertices: Tensor ``[V, 3]`` (V >= 1, not all equal).

    Returns:
        ``(normalized [V, 3], scale, offset [3])``.
    """
    _check_points(vertices, "vertices")
    low, high = vertices.amin(dim=0), vertices.amax(dim=0)
    extent = float((high - low).max())
    if not extent > 0:
        raise ValueError(f"vertices: expected a non-degenerate bounding box, got extent {extent}")
    scale = 1.0 / extent
    offset = -scale * (low + high) / 2
    return vertices * scale + offset, scale, offset


def voxel_centers(coords: torch.Tensor, resolution: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """World positions ``((i, j, k) + 0.5) / R - 0.5`` of voxel centres.

    Args:
        coords: Integer tensor ``[N, 3]`` of (i, j, k).
        resolution: Grid resolution ``R``.
        dtype: Floating dtype of the result.

    Returns:
        Tensor ``[N, 3]``.
    """
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords: expected shape [N, 3] of (i, j, k), got {list(coords.shape)}")
    return (coords.to(dtype) + 0.5) / resolution - 0.5


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or not 1 <= resolution < MAX_COORD:
        raise ValueError(f"resolution: expected an int in [1, {MAX_COORD}), got {resolution!r}")


def _check_points(points: torch.Tensor, name: str) -> None:
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [N, 3], got {list(points.shape)}")
    if not points.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {points.dtype}")
    if points.numel() and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def _outside(points: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: rows outside the closed cube [-0.5, 0.5]^3."""
    return (points.abs() > 0.5).any(dim=1)


def _out_of_bounds_error(name: str, points: torch.Tensor, outside: torch.Tensor, options: str) -> ValueError:
    row = int(outside.nonzero()[0])
    return ValueError(
        f"{name}: expected values in the world cube [-0.5, 0.5]^3, got {int(outside.sum())} rows outside "
        f"(e.g. row {row}: {points[row].tolist()}); normalise first or pass out_of_bounds={options}"
    )


def _sat_overlap(triangles: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Exact closed triangle-box overlap by the separating-axis theorem (13 axes).

    Args:
        triangles: float64 ``[M, 3, 3]`` (vertex, xyz) in grid units.
        cells: int64 ``[M, 3]`` lower corners of unit boxes.

    Returns:
        bool ``[M]``: True where the triangle touches or crosses the closed box.
    """
    vertices = triangles - (cells.to(triangles.dtype) + 0.5)[:, None, :]  # [M, 3, 3], box centred at 0
    edges = vertices.roll(-1, dims=1) - vertices  # [M, 3, 3]: v1 - v0, v2 - v1, v0 - v2
    # The three box-face axes hold by construction of the candidate cells (see voxelize_mesh).
    normal = torch.linalg.cross(edges[:, 0], edges[:, 1])  # [M, 3]
    overlap = (normal * vertices[:, 0]).sum(-1).abs() <= 0.5 * normal.abs().sum(-1)
    basis = torch.eye(3, dtype=triangles.dtype, device=triangles.device)
    axes = torch.linalg.cross(basis[None, :, None, :], edges[:, None, :, :])  # [M, 3 box, 3 edge, 3]
    projections = torch.einsum("mked,mvd->mkev", axes, vertices)  # [M, 3, 3, 3 vertices]
    radius = 0.5 * axes.abs().sum(-1)  # [M, 3, 3]
    separated = (projections.amin(-1) > radius) | (projections.amax(-1) < -radius)  # [M, 3, 3]
    return overlap & ~separated.flatten(1).any(dim=1)


def voxelize_mesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    resolution: int = 64,
    *,
    out_of_bounds: Literal["error", "clip", "crop"] = "error",
    chunk_size: int = 1 << 16,
) -> torch.Tensor:
    """Surface voxels of a triangle mesh: every cell whose closed box touches a triangle.

    Exact triangle-box overlap (separating-axis test, computed in float64), vectorised over the
    candidate cells of every triangle's bounding box and chunked to ``chunk_size`` candidates. Boxes
    are closed, so a triangle lying exactly on a cell face marks the cells on both sides, and a
    vertex on a grid corner marks all cells sharing it (inside the grid). Degenerate triangles
    (segments, points) mark the cells they touch.

    Args:
        vertices: Tensor ``[V, 3]`` in the world cube [-0.5, 0.5]^3.
        faces: Integer tensor ``[F, 3]`` of vertex indices.
        resolution: Grid resolution ``R``.
        out_of_bounds: What to do with vertices outside the cube: ``"error"`` (raise), ``"clip"``
            (clamp vertices onto the cube, as TRELLIS does before voxelizing) or ``"crop"`` (keep only
            the part of the surface inside the grid).
        chunk_size: Candidate (triangle, cell) pairs tested at once; bounds memory (~0.5 kB each).

    Returns:
        int32 tensor ``[N, 3]`` of unique (i, j, k) in lexicographic order, on the device of ``vertices``.
    """
    _check_resolution(resolution)
    _check_points(vertices, "vertices")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise ValueError(f"faces: expected an integer tensor [F, 3], got {faces.dtype} {list(faces.shape)}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ValueError(
            f"faces: expected indices in [0, {vertices.shape[0]}), got range "
            f"[{int(faces.min())}, {int(faces.max())}]"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    device = vertices.device
    points = vertices.to(torch.float64)
    outside = _outside(points)
    if bool(outside.any()):
        if out_of_bounds == "error":
            raise _out_of_bounds_error("vertices", points, outside, "'clip' or 'crop'")
        if out_of_bounds == "clip":
            points = points.clamp(-0.5, 0.5)
        elif out_of_bounds != "crop":
            raise ValueError(f"out_of_bounds: expected 'error', 'clip' or 'crop', got {out_of_bounds!r}")
    triangles = ((points + 0.5) * resolution)[faces.long()]  # [F, 3, 3] in grid units
    # Closed boxes: cell c overlaps [lo, hi] on an axis iff ceil(lo) - 1 <= c <= floor(hi). Every
    # candidate below therefore passes the three box-face axes of the separating-axis test.
    first = (torch.ceil(triangles.amin(dim=1)) - 1).long().clamp(min=0)  # [F, 3]
    last = torch.floor(triangles.amax(dim=1)).long().clamp(max=resolution - 1)  # [F, 3]
    extent = (last - first + 1).clamp(min=0)  # [F, 3]
    counts = extent.prod(dim=1)  # [F]
    ends = counts.cumsum(0)
    total = int(ends[-1]) if ends.numel() else 0
    found = []
    for start in range(0, total, chunk_size):
        candidate = torch.arange(start, min(start + chunk_size, total), device=device)
        tri = torch.searchsorted(ends, candidate, right=True)  # triangle of each candidate
        local = candidate - (ends[tri] - counts[tri])
        size_y, size_z = extent[tri, 1], extent[tri, 2]
        step = torch.stack([local // (size_y * size_z), (local // size_z) % size_y, local % size_z], dim=1)
        cells = first[tri] + step  # [M, 3]
        hit = _sat_overlap(triangles[tri], cells)
        cells = cells[hit]
        found.append(torch.unique((cells[:, 0] * resolution + cells[:, 1]) * resolution + cells[:, 2]))
    if not found:
        return torch.zeros(0, 3, dtype=torch.int32, device=device)
    keys = torch.unique(torch.cat(found))  # sorted = lexicographic (i, j, k)
    return torch.stack(
        [keys // (resolution * resolution), (keys // resolution) % resolution, keys % resolution], 1
    ).int()


def voxelize_meshes(
    meshes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    resolution: int = 64,
    *,
    out_of_bounds: Literal["error", "clip", "crop"] = "error",
    chunk_size: int = 1 << 16,
) -> SparseTensor:
    """Voxelizes a batch of meshes into one SparseTensor of occupancy (feats ones ``[N, 1]``).

    Args:
        meshes: ``B`` pairs ``(vertices [V_b, 3], faces [F_b, 3])``.
        resolution: Grid resolution ``R``.
        out_of_bounds: See [`voxelize_mesh`][sparse3d.geometry.voxelize.voxelize_mesh].
        chunk_size: See [`voxelize_mesh`][sparse3d.geometry.voxelize.voxelize_mesh].

    Returns:
        SparseTensor with ``batch_size = B``, ``spatial_shape = (R, R, R)``.
    """
    coords = [
        voxelize_mesh(v, f, resolution, out_of_bounds=out_of_bounds, chunk_size=chunk_size) for v, f in meshes
    ]
    return voxels_to_sparse(coords, resolution)


def voxelize_points(
    points: torch.Tensor,
    resolution: int = 64,
    feats: torch.Tensor | None = None,
    *,
    reduce: Reduce = "mean",
    out_of_bounds: OutOfBounds = "error",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The cells containing points, with duplicates merged explicitly (features reduced by ``reduce``).

    A point belongs to cell ``floor((p + 0.5) * R)``; points on the cube's upper faces (``p = 0.5``)
    belong to the last cell.

    Args:
        points: Tensor ``[P, 3]`` in world coordinates.
        resolution: Grid resolution ``R``.
        feats: Optional per-point features ``[P, ...]``, reduced per cell.
        reduce: ``"sum"``, ``"mean"``, ``"amax"`` or ``"amin"``.
        out_of_bounds: Points outside [-0.5, 0.5]^3: ``"error"`` (raise), ``"clip"`` (clamp onto the
            cube) or ``"drop"`` (exclude them; their ``inverse`` entry is ``-1``).

    Returns:
        ``(coords [N, 3] int32 unique and lexicographic, cell_feats [N, ...] or None, inverse [P] int64)``
        with ``coords[inverse[p]]`` the cell of point ``p``.
    """
    _check_resolution(resolution)
    _check_points(points, "points")
    if feats is not None and feats.shape[0] != points.shape[0]:
        raise ValueError(f"feats: expected {points.shape[0]} rows to match points, got {list(feats.shape)}")
    keep = None
    outside = _outside(points)
    if bool(outside.any()):
        if out_of_bounds == "error":
            raise _out_of_bounds_error("points", points, outside, "'clip' or 'drop'")
        if out_of_bounds == "clip":
            points = points.clamp(-0.5, 0.5)
        elif out_of_bounds == "drop":
            keep = ~outside
            points = points[keep]
            feats = feats[keep] if feats is not None else None
        else:
            raise ValueError(f"out_of_bounds: expected 'error', 'clip' or 'drop', got {out_of_bounds!r}")
    cells = torch.floor((points.to(torch.float64) + 0.5) * resolution).long().clamp(0, resolution - 1)
    batch = torch.zeros(cells.shape[0], 1, dtype=torch.long, device=cells.device)
    coords, cell_feats, inverse = unique_coords(torch.cat([batch, cells], dim=1), feats, reduce)
    if keep is not None:
        full = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
        full[keep] = inverse
        inverse = full
    return coords[:, 1:].contiguous(), cell_feats, inverse


def voxelize_gaussians(
    means: torch.Tensor,
    resolution: int = 64,
    *,
    opacities: torch.Tensor | None = None,
    min_opacity: float = 0.0,
    out_of_bounds: OutOfBounds = "error",
) -> torch.Tensor:
    """The cells containing Gaussian centres, optionally only of Gaussians above an opacity threshold.

    Args:
        means: Tensor ``[G, 3]`` of Gaussian centres in world coordinates.
        resolution: Grid resolution ``R``.
        opacities: Optional activated opacities ``[G]`` in (0, 1).
        min_opacity: Keep Gaussians with ``opacity > min_opacity`` (an explicit filter; needs ``opacities``
            when non-zero).
        out_of_bounds: See [`voxelize_points`][sparse3d.geometry.voxelize.voxelize_points].

    Returns:
        int32 tensor ``[N, 3]`` of unique (i, j, k) in lexicographic order.
    """
    if opacities is not None:
        if opacities.shape != means.shape[:1]:
            raise ValueError(f"opacities: expected shape [{means.shape[0]}], got {list(opacities.shape)}")
        means = means[opacities > min_opacity]
    elif min_opacity != 0.0:
        raise ValueError(f"min_opacity: given as {min_opacity} but opacities is None")
    return voxelize_points(means, resolution, out_of_bounds=out_of_bounds)[0]


def voxels_to_sparse(
    coords: Sequence[torch.Tensor], resolution: int, feats: Sequence[torch.Tensor] | None = None
) -> SparseTensor:
    """Packs per-sample voxel coordinates into a SparseTensor on an ``R^3`` grid.

    Args:
        coords: ``B`` int tensors ``[N_b, 3]`` of unique (i, j, k) in ``[0, R)``.
        resolution: Grid resolution ``R``.
        feats: Optional ``B`` feature tensors ``[N_b, ...]``; defaults to occupancy ones ``[N_b, 1]``.

    Returns:
        SparseTensor with ``batch_size = B`` and ``spatial_shape = (R, R, R)`` (validated).
    """
    _check_resolution(resolution)
    if feats is None:
        feats = [torch.ones(c.shape[0], 1, device=c.device) for c in coords]
    return SparseTensor.from_list(list(coords), list(feats), spatial_shape=resolution)
