"""Procedural assets: determinism, TRELLIS layout, renderer against analytic rays, voxels on silhouettes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from recipes.flux3d import procedural
from recipes.flux3d.data import load_rgba, read_voxel_ply
from recipes.flux3d.procedural import (
    AssetSpec,
    Primitive,
    asset_sdf,
    generate_asset,
    generate_dataset,
    render_asset,
    sample_asset,
    surface_voxels,
)
from sparse3d.geometry import project_points, read_transforms, scale_intrinsics, sphere_cameras, voxel_centers

SIZE, VIEWS, COND, R = 48, 6, 2, 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("procedural")
    rows = generate_dataset(
        root,
        3,
        seed=7,
        image_size=SIZE,
        num_views=VIEWS,
        num_cond_views=COND,
        voxel_resolution=R,
        progress=False,
    )
    return root, rows


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path, dataset) -> None:
    root, rows = dataset
    assert sample_asset(7, 1).sha256 == sample_asset(7, 1).sha256
    assert sample_asset(7, 1).sha256 != sample_asset(8, 1).sha256
    assert sample_asset(7, 1).sha256 != sample_asset(7, 2).sha256
    again = generate_dataset(
        tmp_path,
        3,
        seed=7,
        image_size=SIZE,
        num_views=VIEWS,
        num_cond_views=COND,
        voxel_resolution=R,
        progress=False,
    )
    assert again == rows
    assert _tree(tmp_path) == _tree(root)  # byte-identical files
    other = generate_asset(
        tmp_path / "other", 8, 0, image_size=SIZE, num_views=2, num_cond_views=0, voxel_resolution=R
    )
    assert other["sha256"] != rows[0]["sha256"]


def test_normalised_like_trellis() -> None:
    for index in range(6):
        spec = sample_asset(3, index)
        # the exact bounding box has longest side 1 and is centred: check with SDF samples on a fine grid
        axis = torch.linspace(-0.55, 0.55, 111, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        inside = grid[asset_sdf(spec, grid)[0] <= 0]
        low, high = inside.amin(0), inside.amax(0)
        assert float((high - low).max()) == pytest.approx(1.0, abs=0.03)
        assert torch.allclose((low + high) / 2, torch.zeros(3, dtype=torch.float64), atol=0.02)


def test_layout_files_parse(dataset) -> None:
    root, rows = dataset
    with open(root / "metadata.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["sha256"] for row in table] == [row["sha256"] for row in rows]
    for column in ("file_identifier", "aesthetic_score", "captions", "rendered", "voxelized", "num_voxels"):
        assert column in table[0]
    for row in table:
        sha = row["sha256"]
        assert json.loads(row["captions"]) and row["rendered"] == "True"
        data = json.loads((root / "renders" / sha / "transforms.json").read_text())
        assert data["aabb"] == [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]] and len(data["frames"]) == VIEWS
        for frame in data["frames"]:
            assert frame["camera_angle_x"] == pytest.approx(math.radians(40))
            c2w = np.array(frame["transform_matrix"])
            assert np.linalg.norm(c2w[:3, 3]) == pytest.approx(2.0)  # radius 2
            # Blender/OpenGL: the camera looks down its -Z axis, towards the origin
            assert np.allclose(-c2w[:3, 2], -c2w[:3, 3] / 2.0, atol=1e-6)
            image = load_rgba(root / "renders" / sha / frame["file_path"])
            assert image.shape == (4, SIZE, SIZE)
        cond = read_transforms(root / "renders_cond" / sha / "transforms.json")
        assert len(cond) == COND
        positions = read_voxel_ply(root / "voxels" / f"{sha}.ply")
        assert positions.shape == (int(row["num_voxels"]), 3)
        index = np.floor((positions + 0.5) * R)
        np.testing.assert_allclose(positions, (index + 0.5) / R - 0.5, atol=1e-6)  # voxel centres


def _sphere_spec(radius: float) -> AssetSpec:
    primitive = Primitive(
        kind="sphere",
        centre=torch.zeros(3, dtype=torch.float64),
        rotation=torch.eye(3, dtype=torch.float64),
        params=(radius,),
        texture=torch.full((3, 4, 4), 0.5),
        texture_kind="checker",
        tile=0.5,
    )
    return AssetSpec((primitive,), seed=0, index=0, scale=1.0, offset=(0.0, 0.0, 0.0))


def test_renderer_matches_analytic_sphere() -> None:
    spec = _sphere_spec(0.45)
    yaw, pitch = torch.tensor([0.3, 2.0]), torch.tensor([0.4, -0.7])
    viewmats, Ks = sphere_cameras(yaw, pitch, radius=2.0, fov=math.radians(40.0), image_size=40)
    rgba, depth = render_asset(spec, viewmats, Ks, 40)
    # analytic ray / sphere intersection through pixel centres
    rows, cols = torch.meshgrid(torch.arange(40) + 0.5, torch.arange(40) + 0.5, indexing="ij")
    pixels = torch.stack([cols, rows, torch.ones_like(cols)], -1).reshape(-1, 3)
    for view in range(2):
        rotation, translation = viewmats[view, :3, :3], viewmats[view, :3, 3]
        centre = -rotation.T @ translation
        rays = pixels @ torch.linalg.inv(Ks[view]).T @ rotation  # camera z = 1, [P, 3] world
        a = (rays * rays).sum(-1)
        b = 2 * rays @ centre
        c = centre @ centre - 0.45**2
        disc = b * b - 4 * a * c
        hit = disc >= 0
        t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)  # camera z, since rays have z = 1
        rendered_hit = rgba[view, ..., 3].reshape(-1) > 0
        assert int((rendered_hit != hit).sum()) <= 4  # only grazing pixels may differ
        both = rendered_hit & hit
        torch.testing.assert_close(depth[view].reshape(-1)[both], t[both], atol=2e-3, rtol=0)
        assert bool(torch.isinf(depth[view].reshape(-1)[~rendered_hit]).all())


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_surface_voxels_match_brute_force(resolution: int) -> None:
    spec = sample_asset(11, 2)
    axis = torch.arange(resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    sdf, _ = asset_sdf(spec, voxel_centers(grid, resolution, dtype=torch.float64))
    expected = grid[sdf.abs() <= math.sqrt(3) / (2 * resolution)]
    assert torch.equal(surface_voxels(spec, resolution).long(), expected)


def _footprint_hits(coords, resolution, viewmats, Ks, alpha) -> torch.Tensor:
    """Fraction per view of voxels whose footprint disc (radius sqrt(3)/(2R), projected) touches alpha > 0."""
    centres = voxel_centers(coords, resolution, dtype=torch.float64)
    pixels, depth = project_points(centres, viewmats.double(), Ks.double())  # [V, N, 2], [V, N]
    radius = Ks[:, 0, 0, None].double() * math.sqrt(3) / (2 * resolution) / depth  # [V, N] px
    size = alpha.shape[-1]
    reach = int(math.ceil(float(radius.max()))) + 1
    fractions = []
    for view in range(viewmats.shape[0]):
        touched = torch.zeros(centres.shape[0], dtype=torch.bool)
        base = torch.floor(pixels[view]).long()
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                px, py = base[:, 0] + dx, base[:, 1] + dy
                inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
                centre = torch.stack([px + 0.5, py + 0.5], -1).double()
                near = (centre - pixels[view]).norm(dim=-1) <= radius[view] + math.sqrt(0.5)
                on = alpha[view, py.clamp(0, size - 1), px.clamp(0, size - 1)] > 0
                touched |= inside & near & on
        fractions.append(float(touched.double().mean()))
    return torch.tensor(fractions)


@pytest.mark.parametrize("folder", ["renders", "renders_cond"])
def test_voxels_project_onto_silhouettes(dataset, folder: str) -> None:
    root, rows = dataset
    for row in rows:
        sha = row["sha256"]
        frames = read_transforms(root / folder / sha / "transforms.json")
        alpha = torch.stack([load_rgba(path)[3] for path in frames.image_paths])  # [V, H, W]
        Ks = scale_intrinsics(frames.Ks, alpha.shape[-1])
        positions = read_voxel_ply(root / "voxels" / f"{sha}.ply")
        coords = torch.from_numpy(np.floor((positions + 0.5) * R)).long()
        fractions = _footprint_hits(coords, R, frames.viewmats, Ks, alpha)
        assert bool((fractions >= 0.99).all()), fractions
        # the check can fail: voxels moved by a quarter of the cube miss the silhouettes
        shifted = _footprint_hits((coords + R // 4).clamp(max=R - 1), R, frames.viewmats, Ks, alpha)
        assert float(shifted.min()) < 0.9, shifted


def test_cli(tmp_path) -> None:
    procedural.main(
        [
            "--out",
            str(tmp_path),
            "--num-assets",
            "1",
            "--resolution",
            "16",
            "--views",
            "2",
            "--cond-views",
            "1",
        ]
    )
    assert (tmp_path / "metadata.csv").is_file()
    assert len(list((tmp_path / "voxels").glob("*.ply"))) == 1
