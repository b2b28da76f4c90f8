"""Dataset reader (our layout and a hand-made TRELLIS one), corrupted files, and prepare.py end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recipes.flux3d import data
from recipes.flux3d import features as prepare
from recipes.flux3d.conditioning import extractor_for_feature
from recipes.flux3d.data import (
    AssetDataset,
    DatasetError,
    DecoderDataset,
    FeatureStats,
    LatentDataset,
    collate_assets,
    collate_decoder,
    collate_latents,
    compute_feature_stats,
    load_feature_stats,
    load_features,
    load_views,
    make_loader,
    open_assets,
    positions_to_coords,
    read_rgba,
    read_voxel_ply,
    split_assets,
    straight_to_float,
)
from recipes.flux3d.shapes import HELDOUT_SEED_OFFSET, generate_dataset, sample_asset, write_voxel_ply
from sparse3d import SparseTensor
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


# ------------------------------------------------------------------ split, records, statistics, datasets


def _keys(count: int, length: int, seed: int) -> list[tuple[int, int]]:
    """A stand-in for the engine's resumable sampler: seeded (index, item_seed) keys."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(length, (count,), generator=generator).tolist()
    seeds = torch.randint(2**62, (count,), generator=generator).tolist()
    return list(zip(indices, seeds, strict=True))


def test_procedural_split_holds_out_assets_of_another_seed_stream(prepared) -> None:
    train, heldout = split_assets(prepared)
    assert len(train) == 3 and len(heldout) == 1 and not set(train) & set(heldout)
    assert train == [sample_asset(3, index).sha256 for index in range(3)]
    assert heldout == [sample_asset(3 + HELDOUT_SEED_OFFSET, 0).sha256]
    # the held-out asset is not among the first training assets of the training stream either
    assert heldout[0] not in {sample_asset(3, index).sha256 for index in range(64)}
    store = open_assets(prepared, "rgb", split="train", progress=False)
    assert store.sha256 == train and store.split == "train"
    dataset = DecoderDataset(store, views_per_item=2)
    seen = {dataset[key].sha256 for key in _keys(40, len(dataset), 0)}
    assert seen == set(train)  # every training asset, never the held-out one
    assert open_assets(prepared, "rgb", split="heldout", progress=False).sha256 == heldout
    with pytest.raises(ValueError, match="has a 'split' column"):
        split_assets(prepared, heldout_fraction=0.5)


def test_hash_split_is_stored_once_and_follows_the_rule(tmp_path) -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    (tmp_path / "metadata.csv").write_text("sha256,rendered\n" + "".join(f"{sha},True\n" for sha in ids))
    train, heldout = split_assets(tmp_path, heldout_fraction=0.2, seed=7)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["fraction"] == 0.2 and record["seed"] == 7 and record["heldout"] == heldout
    # the rule, recomputed by hand
    expected = [
        sha
        for sha in ids
        if int.from_bytes(hashlib.sha256(f"7:{sha}".encode()).digest()[:8], "little") < 0.2 * 2**64
    ]
    assert heldout == expected and train == [sha for sha in ids if sha not in set(expected)]
    assert abs(len(heldout) - 400) < 3 * math.sqrt(2000 * 0.2 * 0.8)
    assert split_assets(tmp_path) == (train, heldout)  # read back, not re-drawn
    with pytest.raises(
        ValueError, match="heldout_fraction: .* stores the split with heldout_fraction=0.2, got 0.5"
    ):
        split_assets(tmp_path, heldout_fraction=0.5)
    with pytest.raises(ValueError, match="seed=7, got 8"):
        split_assets(tmp_path, seed=8)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metadata.csv").write_text((tmp_path / "metadata.csv").read_text())
    assert split_assets(other, heldout_fraction=0.2, seed=8)[1] != heldout  # the seed matters


def test_statistics_cover_the_training_split_only(prepared) -> None:
    train, heldout = split_assets(prepared)
    stats = load_feature_stats(prepared, "rgb")
    values = torch.cat(
        [load_features(prepared / "features" / "rgb" / f"{sha}.npz")[1] for sha in train]
    ).double()
    torch.testing.assert_close(stats.mean.double(), values.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.std.double(), values.std(0, unbiased=False), atol=1e-6, rtol=0)
    assert stats.num_assets == 3 and stats.num_voxels == values.shape[0]
    everything = compute_feature_stats(prepared, "rgb", train + heldout)
    assert not torch.allclose(everything.mean, stats.mean)  # the held-out asset would change them
    # normalised training latents have zero mean and unit std per channel; denormalize undoes it
    store = open_assets(prepared, "rgb", renders=False, progress=False)
    dataset = LatentDataset(store, stats=stats)
    feats = torch.cat([dataset[(i, 0)].feats for i in range(len(dataset))]).double()
    torch.testing.assert_close(feats.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        feats.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(stats.denormalize(dataset[(0, 0)].feats), store[0].mean, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="std: expected > 0 in every channel.*channels \\[1\\]"):
        FeatureStats(mean=torch.zeros(2), std=torch.tensor([1.0, 0.0]), num_assets=1, num_voxels=1)


def _with_sigma(prepared, tmp_path):
    """A copy whose npz files also store a sigma (as a VAE extractor's would)."""
    root = _copy(prepared, tmp_path)
    for path in (root / "features" / "rgb").glob("*.npz"):
        with np.load(path) as data:
            arrays = dict(data)
        arrays["std"] = (0.05 + 0.1 * np.abs(arrays["mean"].astype(np.float32))).astype(np.float16)
        np.savez(path, **arrays)
    return root


def test_items_draw_everything_from_the_item_seed(prepared, tmp_path) -> None:
    root = _with_sigma(prepared, tmp_path)
    store = open_assets(root, "rgb", progress=False)
    assert store.has_std
    stats = load_feature_stats(root, "rgb")
    dataset = DecoderDataset(store, views_per_item=3, background="random", stats=stats)
    asset = store[1]
    item = dataset[(1, 1234)]
    # the documented order: views, background, eps
    generator = torch.Generator().manual_seed(1234)
    frames = torch.randperm(VIEWS, generator=generator)[:3].tolist()
    background = torch.rand(3, generator=generator)
    eps = torch.randn(asset.mean.shape, generator=generator)
    expected = (asset.mean - stats.mean) / stats.std + asset.std / stats.std * eps
    assert list(item.frames) == frames and torch.equal(item.background, background)
    torch.testing.assert_close(item.feats, expected, atol=1e-6, rtol=1e-6)
    rgb, alpha, viewmats, Ks = load_views(root / "renders" / asset.sha256 / "transforms.json", frames)
    assert torch.equal(item.viewmats, viewmats) and torch.equal(item.Ks, Ks)
    served_rgb, served_alpha = straight_to_float(item.images)
    torch.testing.assert_close(served_rgb, rgb)
    torch.testing.assert_close(served_alpha, alpha)
    again = dataset[(1, 1234)]
    assert torch.equal(again.feats, item.feats) and again.frames == item.frames
    other = dataset[(1, 1235)]
    assert not torch.equal(other.feats, item.feats)
    # SMDiT items: the condition view, then eps
    latents = LatentDataset(store)
    item = latents[(2, 99)]
    generator = torch.Generator().manual_seed(99)
    frame = int(torch.randint(COND, (1,), generator=generator))
    eps = torch.randn(store[2].mean.shape, generator=generator)
    assert item.frame == frame
    torch.testing.assert_close(item.feats, store[2].mean + store[2].std * eps)
    assert torch.equal(LatentDataset(store, noisy=False)[(2, 99)].feats, store[2].mean)
    with pytest.raises(TypeError, match=r"key: expected \(index, item_seed\)"):
        latents[2]


def test_batches_are_the_same_under_any_number_of_workers(prepared, tmp_path) -> None:
    root = _with_sigma(prepared, tmp_path)
    store = open_assets(root, "rgb", progress=False)
    keys = _keys(6, len(store), 3)
    for dataset in (DecoderDataset(store, views_per_item=2, background="random"), LatentDataset(store)):
        runs = [list(make_loader(dataset, keys, batch_size=2, workers=workers)) for workers in (0, 2)]
        for first, second in zip(*runs, strict=True):
            for field in dataclasses.fields(first):
                a, b = getattr(first, field.name), getattr(second, field.name)
                if isinstance(a, SparseTensor):
                    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
                elif isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), field.name
                else:
                    assert a == b


def test_collated_batches_match_per_asset_readers(prepared) -> None:
    store = open_assets(prepared, "rgb", progress=False)
    decoder = DecoderDataset(store, frames=[0, 3], background=(0.2, 0.4, 0.6))
    items = [decoder[(2, 0)], decoder[(0, 5)]]
    batch = collate_decoder(items).to("cpu")
    coords, feats = batch.volume.to_list()
    assert batch.volume.spatial_shape == (R, R, R) and batch.sha256 == [store[2].sha256, store[0].sha256]
    targets = batch.targets()
    assert targets.shape == (2, 2, SIZE, SIZE, 3)
    for b, asset in enumerate([store[2], store[0]]):
        assert torch.equal(coords[b][:, -3:], asset.coords) and torch.equal(feats[b], asset.mean)
        rgb, alpha, viewmats, Ks = load_views(prepared / "renders" / asset.sha256 / "transforms.json", [0, 3])
        reference = rgb + (1 - alpha) * torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
        torch.testing.assert_close(targets[b], reference.permute(0, 2, 3, 1))
        assert torch.equal(batch.viewmats[b], viewmats) and torch.equal(batch.Ks[b], Ks)
    latents = LatentDataset(store, cond_view=1)
    batch = collate_latents([latents[(i, 0)] for i in range(3)])
    rgb, _, viewmats, Ks = load_views(prepared / "renders_cond" / store[1].sha256 / "transforms.json", [1])
    torch.testing.assert_close(batch.cond_rgb()[1], rgb[0])
    assert batch.cond_images.dtype == torch.uint8 and torch.equal(batch.Ks[1], Ks[0])
    with pytest.raises(ValueError, match="frames: expected \\[0, 6\\] within the 6 render views"):
        DecoderDataset(store, frames=[0, 6])


def test_open_reads_each_asset_once_and_the_cache_serves_every_step(prepared, tmp_path, monkeypatch) -> None:
    root = _copy(prepared, tmp_path)
    calls = []
    real = data.read_voxel_ply
    monkeypatch.setattr(data, "read_voxel_ply", lambda path: calls.append(path) or real(path))
    cached = open_assets(root, "rgb", cache=True, progress=False)
    lazy = open_assets(root, "rgb", cache=False, progress=False)
    assert len(calls) == 6  # one voxel check per asset and store, at open
    assert cached.cached and not lazy.cached and lazy[0].renders.images is None
    assert cached[0].renders.images.dtype == torch.uint8
    assert cached[0].renders.images.shape == (VIEWS, 4, SIZE, SIZE)
    keys = _keys(8, 3, 1)
    for dataset_type in (DecoderDataset, LatentDataset):
        for key in keys:
            a, b = dataset_type(cached)[key], dataset_type(lazy)[key]
            assert all(
                torch.equal(getattr(a, f.name), getattr(b, f.name))
                for f in dataclasses.fields(a)
                if isinstance(getattr(a, f.name), torch.Tensor)
            )
    assert len(calls) == 6  # no per-step voxel check
    shutil.rmtree(root / "renders")
    shutil.rmtree(root / "renders_cond")
    assert DecoderDataset(cached)[(0, 1)].images.shape == (2, 4, SIZE, SIZE)  # served from memory
    with pytest.raises(FileNotFoundError):
        DecoderDataset(lazy)[(0, 1)]
    small = open_assets(prepared, "rgb", image_size=16, cond_image_size=8, cache="auto", progress=False)
    assert small.cached and small[0].renders.images.shape[-1] == 16 and small[0].cond.images.shape[-1] == 8
    assert torch.equal(small[0].renders.Ks, lazy[0].renders.Ks * torch.tensor([[0.5], [0.5], [1.0]]))
    assert not open_assets(prepared, "rgb", cache="auto", cache_limit_bytes=1000, progress=False).cached


def test_no_usable_training_asset_fails_fast_with_counted_reasons(prepared, tmp_path) -> None:
    root = _copy(prepared, tmp_path)
    first, second, third = split_assets(root)[0]
    (root / "features" / "rgb" / f"{first}.npz").write_bytes(
        (root / "features" / "rgb" / f"{first}.npz").read_bytes()[:100]
    )
    (root / "renders" / second / "002.png").write_bytes(b"")
    (root / "voxels" / f"{third}.ply").unlink()
    with pytest.raises(DatasetError) as caught:
        open_assets(root, "rgb", progress=False)
    message = str(caught.value)
    assert "none of the 3 train assets" in message
    for reason in ("features npz unreadable: 1", "render image empty (0 bytes): 1", "voxel PLY missing: 1"):
        assert reason in message
    # one bad asset among good ones: skipped, counted, one warning
    (root / "voxels" / f"{third}.ply").write_bytes((prepared / "voxels" / f"{third}.ply").read_bytes())
    (root / "renders" / second / "002.png").write_bytes(
        (prepared / "renders" / second / "002.png").read_bytes()
    )
    with pytest.warns(
        RuntimeWarning, match="skipped 1 of 3 train assets .*features npz unreadable: 1"
    ) as record:
        store = open_assets(root, "rgb", progress=False)
    assert len(record) == 1 and store.sha256 == [second, third] and set(store.skipped) == {first}
    assert store.summary()["skip_reasons"] == {"features npz unreadable": 1}
    # a truncated image is found when the cache decodes it
    data_png = (root / "renders" / third / "001.png").read_bytes()
    (root / "renders" / third / "001.png").write_bytes(data_png[: len(data_png) // 2])
    with pytest.warns(RuntimeWarning, match="skipped 2 of 3"):
        assert open_assets(root, "rgb", cache=True, progress=False).sha256 == [second]


def test_file_errors_name_the_file(tmp_path) -> None:
    npz = tmp_path / "a.npz"
    np.savez(npz, indices=np.zeros((2, 3), np.uint8), mean=np.zeros((2, 3), np.float16))
    npz.write_bytes(npz.read_bytes()[:-30])
    with pytest.raises(ValueError, match=f"{npz} is not a readable npz"):
        load_features(npz)
    ply = tmp_path / "a.ply"
    ply.write_text("ply\nformat ascii 1.0\nelement vertex many\nproperty float x\nend_header\n")
    with pytest.raises(ValueError, match=f"{ply} is a malformed PLY"):
        read_voxel_ply(ply)
    header = "ply\nformat ascii 1.0\nelement vertex 1\n" + "".join(f"property float {c}\n" for c in "xyz")
    ply.write_text(header + "end_header\n1 a 2\n")
    with pytest.raises(ValueError, match=f"{ply} is a malformed PLY"):
        read_voxel_ply(ply)
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{png} is not a readable image"):
        read_rgba(png)
    (tmp_path / "transforms.json").write_text("{not json")
    with pytest.raises(ValueError, match="transforms.json is not a readable transforms.json"):
        load_views(tmp_path / "transforms.json")


def test_prepare_records_its_settings_and_refuses_a_mismatch(prepared, tmp_path) -> None:
    root = _copy(prepared, tmp_path)
    record = json.loads((root / "features" / "rgb" / "features.json").read_text())
    assert record["complete"] is True and record["counts"] == {"train": 3, "heldout": 1}
    settings = record["settings"]
    assert (
        settings["extractor_class"] == "RGBFeatures"
        and settings["resolution"] == R
        and settings["views"] == 4
    )
    stamps = {p: p.stat().st_mtime_ns for p in (root / "features" / "rgb").glob("*.npz")}
    # the bug of issue 10: --resolution 8 over a 16^3 folder said "already done" and kept the old features
    with pytest.raises(
        ValueError, match="resolution: .* made with resolution=16, this run asks for 8.*--overwrite"
    ):
        prepare.main(["--root", str(root), "--resolution", "8", "--views", "4", "--quiet"])
    with pytest.raises(ValueError, match="stride: .* stride=1, this run asks for 2"):
        prepare.main(["--root", str(root), "--resolution", str(R), "--views", "4", "--pool", "2", "--quiet"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    report = prepare.main(
        ["--root", str(root), "--resolution", "8", "--views", "4", "--overwrite", "--quiet"]
    )
    assert report.written == 4 and report.existing == 0
    assert all(load_features(p)[3] == 8 for p in stamps)
    assert (
        json.loads((root / "features" / "rgb" / "features.json").read_text())["settings"]["resolution"] == 8
    )
    # features of another tool (no features.json) are not silently extended
    (root / "features" / "rgb" / "features.json").unlink()
    with pytest.raises(ValueError, match="holds npz files but no features.json"):
        prepare.main(["--root", str(root), "--resolution", "8", "--views", "4", "--quiet"])


def test_interrupted_prepare_is_refused_until_finished(prepared, tmp_path, monkeypatch) -> None:
    root = _copy(prepared, tmp_path)
    shutil.rmtree(root / "features")
    real = prepare.prepare_asset
    count = []

    def interrupted(*args, **kwargs):
        if count:
            raise KeyboardInterrupt
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "prepare_asset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--root", str(root), "--resolution", str(R), "--quiet"])
    for open_call in (lambda: open_assets(root, "rgb", progress=False), lambda: AssetDataset(root, "rgb")):
        with pytest.raises(
            DatasetError, match=r"features/rgb is incomplete.*re-run `python recipes/flux3d/prepare.py --root"
        ):
            open_call()
    monkeypatch.setattr(prepare, "prepare_asset", real)
    report = prepare.main(["--root", str(root), "--resolution", str(R), "--quiet"])
    assert report.existing == 1 and report.written == 3
    assert len(open_assets(root, "rgb", progress=False)) == 3


def test_prepare_refuses_empty_and_unusable_datasets(prepared, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no assets: no metadata.csv and no voxels"):
        prepare.main(["--root", str(empty), "--quiet"])
    (empty / "metadata.csv").write_text("sha256,rendered,voxelized\n")
    with pytest.raises(DatasetError, match="lists no assets"):
        prepare.main(["--root", str(empty), "--quiet"])
    root = _copy(prepared, tmp_path)
    shutil.rmtree(root / "features")
    train, _ = split_assets(root)
    for sha in train:
        (root / "renders" / sha / "000.png").write_bytes(b"")
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(
            DatasetError, match="no training asset .* 3 failed .*render image empty \\(0 bytes\\): 3"
        ),
    ):
        prepare.main(["--root", str(root), "--resolution", str(R), "--quiet"])
    assert not (root / "features" / "rgb" / "stats.json").exists()
    with pytest.raises(DatasetError, match="incomplete"):
        open_assets(root, "rgb", progress=False)


def test_feature_folder_records_its_extractor(prepared, tmp_path) -> None:
    root = _copy(prepared, tmp_path)
    (root / "features" / "rgb").rename(root / "features" / "mine")
    with pytest.raises(ValueError, match="cannot tell which extractor"):
        extractor_for_feature("mine")
    assert extractor_for_feature("mine", root=root) == "rgb"
    assert extractor_for_feature("mine", "dinov2", root=root) == "dinov2"


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu(prepared) -> None:
    store = open_assets(prepared, "rgb", progress=False)
    loader = make_loader(LatentDataset(store), _keys(4, 3, 0), batch_size=2, workers=2, pin_memory=True)
    for batch in loader:
        assert batch.cond_images.is_pinned() and batch.latents.feats.is_pinned()
        moved = batch.to("cuda", non_blocking=True)
        assert moved.latents.device.type == "cuda" and moved.cond_rgb().device.type == "cuda"
        torch.testing.assert_close(moved.cond_rgb().cpu(), batch.cond_rgb())
