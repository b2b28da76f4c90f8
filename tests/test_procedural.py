"""Procedural assets: determinism, TRELLIS layout, renderer against analytic rays, voxels on silhouettes."""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch

from recipes.flux3d import features as prepare
from recipes.flux3d import shapes as procedural
from recipes.flux3d.data import AssetDataset, DatasetError, load_rgba, read_voxel_ply, split_assets
from recipes.flux3d.shapes import (
    AssetSpec,
    Primitive,
    TextureOptions,
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
    """Every file's bytes, but ``dataset.json`` (its command names the folder)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "dataset.json"
    }


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
    first, second = (json.loads((r / "dataset.json").read_text()) for r in (root, tmp_path))
    assert first["settings"] == second["settings"] and first["complete"] is second["complete"] is True
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


def _small(root, num_assets: int, **options):
    settings = dict(
        image_size=16, num_views=2, num_cond_views=1, voxel_resolution=8, max_steps=48, progress=False
    )
    return generate_dataset(root, num_assets, **(settings | options))


def test_heldout_assets_come_from_a_disjoint_seed_stream(tmp_path) -> None:
    rows = _small(tmp_path, 2, heldout=1, seed=4)
    assert [row["split"] for row in rows] == ["train", "train", "heldout"]
    assert [row["sha256"] for row in rows] == [
        sample_asset(4, 0).sha256,
        sample_asset(4, 1).sha256,
        sample_asset(4 + procedural.HELDOUT_SEED_OFFSET, 0).sha256,
    ]
    assert rows[2]["file_identifier"] == f"procedural/{4 + procedural.HELDOUT_SEED_OFFSET}/0"
    with open(tmp_path / "metadata.csv", newline="") as handle:
        assert [row["split"] for row in csv.DictReader(handle)] == ["train", "train", "heldout"]
    record = json.loads((tmp_path / "dataset.json").read_text())
    assert record["complete"] is True and record["counts"] == {"train": 2, "heldout": 1}
    assert record["seeds"] == {"train": 4, "heldout": 4 + procedural.HELDOUT_SEED_OFFSET}
    assert "--num-assets 2 --heldout 1 --seed 4" in record["command"]


def test_an_interrupted_run_is_refused_until_resumed(tmp_path, monkeypatch) -> None:
    real = procedural.generate_asset
    rendered = []

    def generate(*args, **kwargs):
        if len(rendered) == 1:
            raise KeyboardInterrupt  # killed while making the second asset
        row = real(*args, **kwargs)
        rendered.append(row["sha256"])
        return row

    monkeypatch.setattr(procedural, "generate_asset", generate)
    with pytest.raises(KeyboardInterrupt):
        _small(tmp_path, 2, heldout=1)
    record = json.loads((tmp_path / "dataset.json").read_text())
    assert record["complete"] is False and record["done"] == 1 and record["total"] == 3
    with pytest.raises(
        DatasetError,
        match=r"incomplete.*\(1 of 3 assets done\).*re-run `python recipes/flux3d/"
        r"procedural.py --out .* --num-assets 2 --heldout 1",
    ):
        split_assets(tmp_path)
    with pytest.raises(DatasetError, match="incomplete"):
        prepare.main(["--root", str(tmp_path), "--quiet"])
    with pytest.raises(DatasetError, match="incomplete"):
        AssetDataset(tmp_path, None)
    # the same settings resume: the finished asset is kept, not rendered again
    monkeypatch.setattr(procedural, "generate_asset", real)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "renders").rglob("*.png")}
    monkeypatch.setattr(procedural, "render_asset", _counting(procedural.render_asset, calls := []))
    rows = _small(tmp_path, 2, heldout=1)
    assert len(rows) == 3 and [row["sha256"] for row in rows[:1]] == rendered
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert len(calls) == 2 * 2  # renders and condition renders of the two missing assets
    assert [row["num_voxels"] for row in rows[:1]] == [
        read_voxel_ply(tmp_path / "voxels" / f"{sha}.ply").shape[0] for sha in rendered
    ]
    assert json.loads((tmp_path / "dataset.json").read_text())["complete"] is True
    assert [len(ids) for ids in split_assets(tmp_path)] == [2, 1]
    # other settings are refused, naming the setting and both values; --overwrite renders again
    with pytest.raises(
        ValueError, match="image_size: the dataset .* made with image_size=16, this run asks for 24"
    ):
        _small(tmp_path, 2, heldout=1, image_size=24)
    with pytest.raises(ValueError, match="textures: .*made with textures={}"):
        _small(tmp_path, 2, textures=TextureOptions(kinds=("stripes",)))
    rows = _small(tmp_path, 1, image_size=24, overwrite=True)
    assert load_rgba(tmp_path / "renders" / rows[0]["sha256"] / "000.png").shape == (4, 24, 24)


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def _transitions(texture: torch.Tensor) -> tuple[int, int]:
    """Colour changes along the middle row and the middle column of a ``[3, T, T]`` texture."""
    size = texture.shape[-1]
    row, column = texture[:, size // 2 + 1], texture[:, :, size // 2 + 1]
    count = lambda line: int((line[:, 1:] != line[:, :-1]).any(0).sum())  # noqa: E731
    return count(row), count(column)


@pytest.mark.parametrize("cells, colours", [(2, 2), (8, 3), (16, 4)])
def test_checker_and_stripe_options(cells: int, colours: int) -> None:
    options = TextureOptions(kinds=("checker", "stripes"), cells=(cells,), colours=colours, size=128)
    checker = procedural._texture("checker", 128, random.Random(0), options)
    colours_used = {tuple(v) for v in checker.reshape(3, -1).T.tolist()}
    assert len(colours_used) == colours
    assert _transitions(checker) == (cells - 1, cells - 1)
    stripes = procedural._texture("stripes", 128, random.Random(1), options)
    assert len({tuple(v) for v in stripes.reshape(3, -1).T.tolist()}) == colours
    assert sorted(_transitions(stripes)) == [0, cells * colours - 1]  # bands across one axis only
    with pytest.raises(ValueError, match="cells: expected counts >= 1 with cells \\* colours <= size"):
        TextureOptions(cells=(64,), colours=4, size=128)
    with pytest.raises(ValueError, match="kinds: expected a non-empty subset"):
        TextureOptions(kinds=("plaid",))


@pytest.mark.parametrize("size", [96, pytest.param(256, marks=pytest.mark.slow)])
def test_high_frequency_stripes_reach_the_renders_of_32_cube_grids(tmp_path, size: int) -> None:
    """The ``small`` preset's data: stripes of several frequencies and colours, renders at 256 px for 32^3
    (one 8x VAE latent pixel then covers about 1.5 voxels); 96 px in the default suite."""
    edges = []
    for cells in (2, 8):
        options = TextureOptions(kinds=("stripes",), cells=(cells,), colours=3)
        row = generate_asset(
            tmp_path / str(cells),
            0,
            4,
            image_size=size,
            num_views=1,
            num_cond_views=0,
            voxel_resolution=32,
            max_steps=64,
            textures=options,
        )
        image = load_rgba(tmp_path / str(cells) / "renders" / row["sha256"] / "000.png")
        assert image.shape == (4, size, size)
        assert (
            read_voxel_ply(tmp_path / str(cells) / "voxels" / f"{row['sha256']}.ply").shape[0]
            == row["num_voxels"]
        )
        inside = (image[3, 1:, 1:] > 0) & (image[3, :-1, 1:] > 0) & (image[3, 1:, :-1] > 0)
        gradient = (image[:3, 1:, 1:] - image[:3, :-1, 1:]).abs().sum(0) + (
            image[:3, 1:, 1:] - image[:3, 1:, :-1]
        ).abs().sum(0)
        edges.append(float(gradient[inside].mean()))
        assert sample_asset(0, 4, textures=options).sha256 == row["sha256"] != sample_asset(0, 4).sha256
    assert edges[1] > 2.5 * edges[0]  # four times the stripes, about four times the colour edges


def test_cli_options_are_checked(tmp_path) -> None:
    with pytest.raises(SystemExit):
        procedural.main(["--out", str(tmp_path), "--texture-colours", "1"])
    with pytest.raises(SystemExit):
        procedural.main(["--out", str(tmp_path), "--texture-cells", "2,x"])
    assert not (tmp_path / "dataset.json").exists()
