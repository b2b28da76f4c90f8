"""Dataset reader (our layout and a hand-made TRELLIS one), corrupted files, and prepare.py end to end."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recipes.flux3d import prepare
from recipes.flux3d.data import (
    AssetDataset,
    collate_assets,
    load_features,
    positions_to_coords,
    read_voxel_ply,
)
from recipes.flux3d.procedural import generate_dataset, write_voxel_ply
from sparse3d.features import RGBFeatures

SIZE, VIEWS, COND, R = 32, 6, 2, 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """Three training and one held-out procedural asset with rgb features at R = 16 (voxels at 16 too)."""
    root = tmp_path_factory.mktemp("data")
    generate_dataset(
        root,
        3,
        heldout=1,
        seed=3,
        image_size=SIZE,
        num_views=VIEWS,
        num_cond_views=COND,
        voxel_resolution=R,
        progress=False,
    )
    report = prepare.prepare_dataset(root, RGBFeatures(), "rgb", resolution=R, num_views=4, progress=False)
    assert report.written == 4 and not report.failed
    return root


def _copy(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "copy")


def _reference_rgb(root, sha, coords, views, resolution):
    """Per-voxel loop: project with the raw Blender c2w (numpy), bilinear-sample premultiplied RGB by hand."""
    from PIL import Image

    data = json.loads((root / "renders" / sha / "transforms.json").read_text())
    values = np.zeros((coords.shape[0], 3))
    counts = np.zeros(coords.shape[0])
    for index in views:
        frame = data["frames"][index]
        image = np.asarray(Image.open(root / "renders" / sha / frame["file_path"]), dtype=np.float64) / 255
        rgb = image[..., :3] * image[..., 3:]
        size = rgb.shape[0]
        c2w = np.array(frame["transform_matrix"])
        focal = size / 2 / math.tan(frame["camera_angle_x"] / 2)
        for n, voxel in enumerate(coords.numpy()):
            point = (voxel + 0.5) / resolution - 0.5
            local = np.linalg.inv(c2w) @ np.append(point, 1.0)  # OpenGL camera: x right, y up, looks down -z
            depth = -local[2]
            u, v = focal * local[0] / depth + size / 2, -focal * local[1] / depth + size / 2
            if depth <= 0 or not (0 <= u <= size and 0 <= v <= size):
                continue
            x = min(max(u - 0.5, 0), size - 1)
            y = min(max(v - 0.5, 0), size - 1)
            x0, y0 = min(int(x), size - 2), min(int(y), size - 2)
            fx, fy = x - x0, y - y0
            sample = (
                rgb[y0, x0] * (1 - fx) * (1 - fy)
                + rgb[y0, x0 + 1] * fx * (1 - fy)
                + rgb[y0 + 1, x0] * (1 - fx) * fy
                + rgb[y0 + 1, x0 + 1] * fx * fy
            )
            values[n] += sample
            counts[n] += 1
    return values / np.maximum(counts, 1)[:, None]


def test_reads_our_layout_and_features_match_a_reference(prepared) -> None:
    dataset = AssetDataset(prepared, "rgb", cond_views=COND)
    assert len(dataset) == 4
    items = list(dataset)
    assert len(items) == 4 and dataset.num_skipped == 0
    item = items[0]
    expected = positions_to_coords(read_voxel_ply(prepared / "voxels" / f"{item.sha256}.ply"), R)
    assert torch.equal(item.coords, expected)
    assert item.mean.shape == (expected.shape[0], 3) and item.std is None and item.resolution == R
    assert item.cond_images.shape == (COND, 3, SIZE, SIZE) and item.Ks.shape == (COND, 3, 3)
    assert torch.allclose(item.cond_images, item.cond_images * item.cond_alpha)  # premultiplied
    picks = torch.randperm(expected.shape[0], generator=torch.Generator().manual_seed(0))[:25]
    views = sorted({int(i) for i in np.linspace(0, VIEWS, 4, endpoint=False)})
    reference = _reference_rgb(prepared, item.sha256, expected[picks], views, R)
    np.testing.assert_allclose(item.mean[picks].numpy(), reference, atol=3e-3)  # stored as float16


def test_collate_builds_a_sparse_batch(prepared) -> None:
    dataset = AssetDataset(prepared, "rgb", cond_views=1)
    items = [dataset[0], None, dataset[2]]
    batch = collate_assets(items)
    assert batch.num_skipped == 1 and batch.sha256 == [items[0].sha256, items[2].sha256]
    latents = batch.latents
    assert latents.batch_size == 2 and latents.spatial_shape == (R, R, R)
    coords_list, feats_list = latents.to_list()
    for item, coords, feats in zip([items[0], items[2]], coords_list, feats_list, strict=True):
        assert torch.equal(coords[:, -3:], item.coords) and torch.equal(feats, item.mean)
    assert batch.cond_images.shape == (2, 1, 3, SIZE, SIZE) and batch.viewmats.shape == (2, 1, 4, 4)
    assert collate_assets([None, None]) is None
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_assets)
    assert sum(b.latents.batch_size for b in loader) == 4


def test_voxels_only_and_random_views(prepared) -> None:
    dataset = AssetDataset(prepared, None, resolution=8, cond_views=2, random_views=True, seed=1)
    item = dataset[1]
    full = positions_to_coords(read_voxel_ply(prepared / "voxels" / f"{item.sha256}.ply"), R)
    assert torch.equal(item.coords, torch.unique(full.long() // 2, dim=0).int())  # 16^3 -> 8^3
    assert item.mean is None and item.cond_images.shape[0] == 2
    too_many = AssetDataset(prepared, None, cond_views=3)
    assert too_many[0] is None and "expected >= 3 frames" in too_many.skipped[too_many.assets[0]]
    batch = collate_assets([item])
    assert batch.latents.feats.shape == (item.coords.shape[0], 0)


def test_corrupt_files_are_skipped_with_a_count_and_one_warning(prepared, tmp_path) -> None:
    root = _copy(prepared, tmp_path)
    dataset = AssetDataset(root, "rgb", cond_views=COND)
    ply, npz, png = dataset.assets[:3]
    data = (root / "voxels" / f"{ply}.ply").read_bytes()
    (root / "voxels" / f"{ply}.ply").write_bytes(data[: len(data) // 2])  # truncated PLY
    (root / "features" / "rgb" / f"{npz}.npz").write_bytes(b"PK\x03\x04 not really a zip")  # bad npz
    (root / "renders_cond" / png / "001.png").unlink()  # missing PNG
    with pytest.warns(RuntimeWarning, match="skipped 3 of 4") as record:
        items = list(dataset)
    assert len(record) == 1
    assert [item.sha256 for item in items] == [dataset.assets[3]]
    assert dataset.num_skipped == 3 and set(dataset.skipped) == {ply, npz, png}
    assert "truncated" in dataset.skipped[ply]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[3] is not None  # a good item never warns
    # a second epoch warns again, once
    with pytest.warns(RuntimeWarning, match="epoch 1"):
        assert len(list(dataset)) == 1


def _write_ascii_ply(path, positions) -> None:
    lines = ["ply", "format ascii 1.0", "comment written by hand", f"element vertex {len(positions)}"]
    lines += ["property double x", "property double y", "property double z", "end_header"]
    lines += [" ".join(f"{v:.9f}" for v in point) for point in positions]
    path.write_text("\n".join(lines) + "\n")


def test_reads_a_hand_made_trellis_folder(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    shas = ["a" * 64, "b" * 64, "c" * 64]
    (tmp_path / "voxels").mkdir()
    (tmp_path / "features" / "dinov2_vitl14_reg").mkdir(parents=True)
    header = "sha256,file_identifier,aesthetic_score,captions,local_path,rendered,voxelized,num_voxels,"
    header += "cond_rendered,feature_dinov2_vitl14_reg\n"
    lines = [header]
    indices = {}
    for number, sha in enumerate(shas):
        flag = number != 2  # the third asset was never featurised: left out, not counted as skipped
        lines.append(f'{sha},toys/{number}.blend,5.1,"[""a toy""]",raw/{number},True,True,7,True,{flag}\n')
        index = np.unique(rng.integers(0, 64, size=(7, 3)), axis=0).astype(np.uint8)
        indices[sha] = index
        _write_ascii_ply(tmp_path / "voxels" / f"{sha}.ply", (index + 0.5) / 64 - 0.5)
        tokens = rng.standard_normal((index.shape[0], 8)).astype(np.float16)
        np.savez(
            tmp_path / "features" / "dinov2_vitl14_reg" / f"{sha}.npz", indices=index, patchtokens=tokens
        )
        folder = tmp_path / "renders_cond" / sha
        folder.mkdir(parents=True)
        frames = []
        for view in range(2):
            pixels = rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGBA").save(folder / f"{view:03d}.png")
            c2w = np.eye(4)
            c2w[:3, 3] = [0.0, -2.0 - view, 0.0]
            c2w[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # looks along +y (-z of the camera), z up
            frames.append(
                {"file_path": f"{view:03d}.png", "camera_angle_x": 0.6981, "transform_matrix": c2w.tolist()}
            )
        (folder / "transforms.json").write_text(
            json.dumps({"scale": 1.0, "offset": [0, 0, 0], "frames": frames})
        )
    (tmp_path / "metadata.csv").write_text("".join(lines))

    dataset = AssetDataset(tmp_path, "dinov2_vitl14_reg", cond_views=2, image_size=8)
    assert dataset.assets == shas[:2]
    items = list(dataset)
    assert len(items) == 2 and dataset.num_skipped == 0
    for item in items:
        coords, tokens, std, resolution = load_features(
            tmp_path / "features" / "dinov2_vitl14_reg" / f"{item.sha256}.npz"
        )
        assert resolution == 64 and std is None and item.std is None
        assert torch.equal(item.coords, torch.from_numpy(indices[item.sha256].astype(np.int32)))
        assert torch.equal(item.mean, tokens)
        assert item.cond_images.shape == (2, 3, 8, 8)
        # OpenCV camera at (0, -2, 0) looking along +y: world +z is image up, i.e. camera -y
        viewmat = item.viewmats[0]
        np.testing.assert_allclose(viewmat[:3, :3].numpy(), [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-6)
        np.testing.assert_allclose(viewmat[:3, 3].numpy(), [0, 0, 2], atol=1e-6)
        focal = 8 / 2 / math.tan(0.6981 / 2)
        np.testing.assert_allclose(item.Ks[0].numpy(), [[focal, 0, 4], [0, focal, 4], [0, 0, 1]], rtol=1e-5)
    batch = collate_assets(items)
    assert batch.latents.feats.shape == (sum(i.coords.shape[0] for i in items), 8)
    # at stored size: RGB premultiplied by alpha, exactly
    item = AssetDataset(tmp_path, "dinov2_vitl14_reg", cond_views=2)[0]
    stored = np.asarray(Image.open(tmp_path / "renders_cond" / shas[0] / "001.png"), dtype=np.float32) / 255
    expected = torch.from_numpy(stored[..., :3] * stored[..., 3:]).permute(2, 0, 1)
    torch.testing.assert_close(item.cond_images[1], expected)
    torch.testing.assert_close(item.cond_alpha[1, 0], torch.from_numpy(stored[..., 3]))


def test_prepare_end_to_end_resumable_and_atomic(tmp_path, monkeypatch) -> None:
    root = tmp_path / "set"
    generate_dataset(
        root, 2, seed=5, image_size=SIZE, num_views=4, num_cond_views=0, voxel_resolution=32, progress=False
    )
    report = prepare.main(["--root", str(root), "--resolution", "16", "--views", "2", "--quiet"])
    assert report.written == 2 and report.existing == 0 and not report.failed
    outputs = sorted((root / "features" / "rgb").glob("*.npz"))
    assert len(outputs) == 2 and all(path.suffix == ".npz" for path in outputs)
    stamps = [path.stat().st_mtime_ns for path in outputs]
    metadata = (root / "metadata.csv").read_text()
    assert "feature_rgb" in metadata.splitlines()[0]
    for path in outputs:
        coords, mean, _, resolution = load_features(path)
        sha = path.stem
        assert resolution == 16 and mean.shape[1] == 3
        assert torch.equal(coords, positions_to_coords(read_voxel_ply(root / "voxels" / f"{sha}.ply"), 16))
    # second run does nothing
    again = prepare.main(["--root", str(root), "--resolution", "16", "--views", "2", "--quiet"])
    assert again.written == 0 and again.existing == 2
    assert [path.stat().st_mtime_ns for path in outputs] == stamps
    assert (root / "metadata.csv").read_text() == metadata
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    # a run killed while writing leaves neither a half-written npz nor a temporary file
    outputs[0].unlink()
    real_savez = np.savez

    def killed(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(root, RGBFeatures(), "rgb", resolution=16, num_views=2, progress=False)
    assert not outputs[0].exists()
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(prepare.np, "savez", real_savez)
    resumed = prepare.prepare_dataset(root, RGBFeatures(), "rgb", resolution=16, num_views=2, progress=False)
    assert resumed.written == 1 and resumed.existing == 1


def test_prepare_reports_corrupt_inputs(prepared, tmp_path) -> None:
    root = _copy(prepared, tmp_path)
    shutil.rmtree(root / "features")
    sha = AssetDataset(root, None).assets[0]
    (root / "renders" / sha / "002.png").write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning, match="1 assets have missing or corrupt inputs"):
        report = prepare.prepare_dataset(root, RGBFeatures(), "rgb", resolution=R, progress=False)
    assert report.written == 3 and set(report.failed) == {sha}
    assert not (root / "features" / "rgb" / f"{sha}.npz").exists()
    assert "feature_rgb" in (root / "metadata.csv").read_text()
    assert AssetDataset(root, "rgb").assets == [s for s in AssetDataset(root, None).assets if s != sha]


def test_missing_weights_for_vae_extractor_explain_themselves() -> None:
    with pytest.raises(ValueError, match="--weights PATH"):
        prepare.build_extractor("flux-vae")
    with pytest.raises(ValueError, match="expected one of"):
        prepare.build_extractor("clip")


@given(
    resolution=st.sampled_from([4, 16, 64]),
    data=st.data(),
)
def test_ply_positions_round_trip(tmp_path_factory, resolution: int, data) -> None:
    points = data.draw(
        st.lists(st.tuples(*[st.integers(0, resolution - 1)] * 3), min_size=0, max_size=40, unique=True)
    )
    coords = torch.tensor(points, dtype=torch.int32).reshape(-1, 3)
    path = tmp_path_factory.mktemp("ply") / "voxels.ply"
    write_voxel_ply(path, coords, resolution)
    back = positions_to_coords(read_voxel_ply(path), resolution)
    expected = torch.unique(coords.long(), dim=0).int() if len(points) else coords
    assert torch.equal(back, expected)
    if resolution > 4 and len(points):  # a coarser grid merges children into their parent voxels
        coarse = positions_to_coords(read_voxel_ply(path), resolution // 4)
        assert torch.equal(coarse, torch.unique(coords.long() // 4, dim=0).int())


@pytest.mark.gpu
def test_prepare_on_gpu_matches_cpu(prepared, tmp_path) -> None:
    sha = AssetDataset(prepared, None).assets[0]
    prepare.prepare_asset(
        prepared, sha, RGBFeatures(), tmp_path / "cpu.npz", resolution=R, store_dtype=np.float32
    )
    prepare.prepare_asset(
        prepared,
        sha,
        RGBFeatures(),
        tmp_path / "gpu.npz",
        resolution=R,
        device="cuda",
        store_dtype=np.float32,
    )
    cpu, gpu = load_features(tmp_path / "cpu.npz"), load_features(tmp_path / "gpu.npz")
    assert torch.equal(cpu[0], gpu[0])
    torch.testing.assert_close(cpu[1], gpu[1], atol=1e-5, rtol=1e-5)
