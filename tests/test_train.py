"""train.py on a prepared dataset (rgb and a tiny VAE) end to end, the asset stream, the latent draw, errors,
and the default toy path."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recipes.flux3d import prepare, train
from recipes.flux3d.conditioning import (
    extractor_for_feature,
    find_feature_folder,
    pad_to_multiple,
    resize_to_multiple,
)
from recipes.flux3d.configs import toy
from recipes.flux3d.data import AssetDataset, list_assets, load_features, load_views
from recipes.flux3d.model import SMDiT
from sparse3d import SparseTensor
from tests.tiny_dataset import SIZE, R


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch):
    """Replaces train's SMDiT by a subclass that records every (x_t, t, image) it is called with."""
    calls = []

    class Recording(SMDiT):
        def forward(self, x_t, t, image):
            calls.append((x_t.detach(), t.detach(), image.detach().clone()))
            return super().forward(x_t, t, image)

    monkeypatch.setattr(train, "SMDiT", Recording)
    return calls


def _per_sample_coords(x: SparseTensor) -> list[torch.Tensor]:
    offsets = x.offsets.tolist()
    return [x.coords[offsets[b] : offsets[b + 1], 1:] for b in range(x.batch_size)]


def _same_voxels(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.shape != second.shape:
        return False
    return torch.equal(torch.unique(first.long(), dim=0), torch.unique(second.long(), dim=0))


def _common(out) -> list[str]:
    return ["--out", str(out), "--batch-size", "2", "--sample-steps", "2", "--device", "cpu"]


def test_rgb_dataset_end_to_end(prepared, tmp_path, recorded):
    metrics = train.main(["--data", str(prepared), "--steps", "3", *_common(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["losses"] == metrics["losses"] and len(metrics["losses"]) == 3
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    assert math.isfinite(metrics["sample_mse"])
    assets = list_assets(prepared)
    volumes = {sha: load_features(prepared / "features" / "rgb" / f"{sha}.npz") for sha in assets}
    channels = volumes[assets[0]][1].shape[1]
    assert channels == 3 and volumes[assets[0]][2] is None  # rgb: mu only
    data = metrics["data"]
    assert data["overrides"] == {"model.latent_channels": [8, 3], "model.image_channels": [8, 3]}
    assert data["heldout_asset"] == assets[-1] and data["train_assets"] == 2
    assert metrics["preset_config"]["model"]["latent_channels"] == 3
    # 3 training forwards (B = 2) then 2 Euler steps on the held-out asset (CFG: one doubled batch).
    assert len(recorded) == 3 + 2
    for x_t, t, image in recorded[:3]:
        assert x_t.feats.shape[1] == channels and x_t.batch_size == 2 and t.shape == (2,)
        assert tuple(x_t.spatial_shape) == (R, R, R)
        assert image.shape == (2, 3, SIZE, SIZE)  # rgb, pool 1: already a multiple of the patch size
        for b, coords in enumerate(_per_sample_coords(x_t)):
            matches = [sha for sha in assets if _same_voxels(coords, volumes[sha][0])]
            assert len(matches) == 1 and matches[0] != assets[-1]  # a training asset, never the held-out one
            rgb, _, _, _ = load_views(prepared / "renders_cond" / matches[0] / "transforms.json")
            if image[b].abs().sum() > 0:  # not dropped for CFG: one of the asset's condition views
                assert min(float((image[b] - view).abs().max()) for view in rgb) < 1e-6
    heldout_view = load_views(prepared / "renders_cond" / assets[-1] / "transforms.json", [0])[0]
    for x_t, _, image in recorded[3:]:
        assert all(_same_voxels(coords, volumes[assets[-1]][0]) for coords in _per_sample_coords(x_t))
        assert image.shape == (2, 3, SIZE, SIZE)  # [unconditional (zeros); held-out view]
        assert not image[0].any() and torch.equal(image[1], heldout_view[0])
    state = SMDiT(dataclasses.replace(toy().model, latent_channels=3, image_channels=3)).state_dict()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in state.items()}


def _tiny_vae(latent_channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def test_vae_features_draw_mu_plus_sigma_eps(prepared, tmp_path, recorded, monkeypatch):
    root = shutil.copytree(prepared, tmp_path / "data")
    _tiny_vae(4).save_pretrained(tmp_path / "vae")
    prepare.main(
        ["--root", str(root), "--extractor", "flux-vae", "--weights", str(tmp_path / "vae")]
        + ["--resolution", str(R), "--float32", "--quiet"]
    )
    with pytest.raises(ValueError, match=r"several feature folders \['flux_vae', 'rgb'\]"):
        train.main(["--data", str(root), "--steps", "1", *_common(tmp_path / "out")])
    draws, draw_latent = [], train.draw_latent

    def recording_draw(volume, has_std, generator):
        latent = draw_latent(volume, has_std, generator)
        draws.append((volume, has_std, latent))
        return latent

    monkeypatch.setattr(train, "draw_latent", recording_draw)
    metrics = train.main(
        ["--data", str(root), "--feature", "flux_vae", "--weights", str(tmp_path / "vae"), "--steps", "2"]
        + _common(tmp_path / "out")
    )
    assert metrics["data"]["extractor"] == "flux-vae" and metrics["data"]["latent"] == "mu + sigma * eps"
    assert metrics["data"]["overrides"]["model.latent_channels"] == [8, 4]
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    assert len(draws) == 2
    for volume, has_std, latent in draws:
        assert has_std and volume.feats.shape[1] == 8 and latent.feats.shape[1] == 4
        mean, std = volume.feats.chunk(2, dim=1)
        assert bool((std > 0).all())
        eps = (latent.feats - mean) / std
        assert 0.5 < float(eps.std()) < 1.5  # a real standard-normal draw, not mu
    for x_t, _, image in recorded[:2]:
        assert x_t.feats.shape[1] == 4
        assert image.shape == (2, 4, SIZE // 8, SIZE // 8)  # the VAE's stride 8; 4 x 4 is patch-aligned


def test_draw_latent_matches_reparameterization():
    generator = torch.Generator().manual_seed(3)
    coords = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    mean = torch.randn(3, 5, generator=generator)
    std = torch.rand(3, 5, generator=generator) + 0.1
    volume = SparseTensor(coords, torch.cat([mean, std], dim=1), batch_size=2, spatial_shape=4)
    first = train.draw_latent(volume, True, torch.Generator().manual_seed(11))
    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(first.feats, mean + std * eps)
    assert torch.equal(first.coords, volume.coords)
    shared = torch.Generator().manual_seed(11)
    a, b = train.draw_latent(volume, True, shared), train.draw_latent(volume, True, shared)
    assert not torch.allclose(a.feats, b.feats)  # a fresh eps per call
    assert train.draw_latent(volume, False, shared) is volume
    with pytest.raises(ValueError, match=r"volume: expected feats \[N, 2C\]"):
        train.draw_latent(volume.replace(mean[:, :3]), True, shared)


def test_stream_shuffles_epochs_and_reports_skips(prepared, tmp_path):
    root = shutil.copytree(prepared, tmp_path / "data")
    assets = list_assets(root)
    (root / "features" / "rgb" / f"{assets[1]}.npz").write_bytes(b"not an npz")
    dataset = AssetDataset(root, "rgb", cond_views=1)
    stream = train.AssetStream(dataset, [0, 1, 2], 1, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = [stream.next_items()[0].sha256 for _ in range(8)]
    # Each epoch yields the two readable assets once each, in a seeded order.
    for epoch in range(4):
        assert sorted(drawn[2 * epoch : 2 * epoch + 2]) == sorted([assets[0], assets[2]])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == stream.epochs >= 3
    assert all("skipped 1 of 3" in message for message in messages)
    assert dataset.num_skipped == 1 and assets[1] in dataset.skipped
    replay = train.AssetStream(
        AssetDataset(root, "rgb", cond_views=1), [0, 1, 2], 1, torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [replay.next_items()[0].sha256 for _ in range(8)] == drawn
    orders = set()
    for seed in range(6):
        other = train.AssetStream(dataset, [0, 2], 2, torch.Generator().manual_seed(seed))
        orders.add(tuple(item.sha256 for item in other.next_items()))
    assert len(orders) == 2  # the permutation depends on the seed
    for sha in assets:
        (root / "features" / "rgb" / f"{sha}.npz").write_bytes(b"")
    broken = train.AssetStream(AssetDataset(root, "rgb", cond_views=1), [0, 1, 2], 1, torch.Generator())
    with pytest.raises(RuntimeError, match="every one of the 3 training assets was skipped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            broken.next_items()


def test_corrupt_heldout_asset_is_skipped_and_reported(prepared, tmp_path):
    root = shutil.copytree(prepared, tmp_path / "data")
    assets = list_assets(root)
    (root / "features" / "rgb" / f"{assets[-1]}.npz").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3"):
        metrics = train.main(["--data", str(root), "--steps", "2", *_common(tmp_path / "out")])
    assert metrics["data"]["heldout_asset"] == assets[1]
    assert metrics["data"]["skipped_assets"] == 1 and assets[-1] in metrics["data"]["skipped"]
    assert all(math.isfinite(loss) for loss in metrics["losses"])


def test_clear_errors(prepared, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(prepared, bare, ignore=shutil.ignore_patterns("features"))
    with pytest.raises(FileNotFoundError, match=r"has no feature folders.*prepare\.py"):
        train.main(["--data", str(bare), *_common(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"feature: expected one of .*\['rgb'\].*got 'dinov2'"):
        train.main(["--data", str(prepared), "--feature", "dinov2", *_common(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        train.main(["--data", str(tmp_path / "missing"), *_common(tmp_path / "out")])
    with pytest.raises(SystemExit):
        train.main(["--feature", "rgb", *_common(tmp_path / "out")])
    with pytest.raises(ValueError, match="pool: only the rgb extractor pools"):
        train.main(
            ["--data", str(prepared), "--extractor", "dinov2", "--pool", "2", *_common(tmp_path / "o")]
        )
    # A custom feature name needs --extractor; an odd grid cannot be patchified 2 x 2 x 2.
    odd = shutil.copytree(prepared, tmp_path / "odd")
    prepare.main(
        ["--root", str(odd), "--extractor", "rgb", "--name", "rgb15", "--resolution", "15", "--quiet"]
    )
    with pytest.raises(ValueError, match="pass --extractor NAME"):
        train.main(["--data", str(odd), "--feature", "rgb15", *_common(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"divisible by voxel_patch = 2 .*got 15"):
        train.main(["--data", str(odd), "--feature", "rgb15", "--extractor", "rgb", *_common(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"'sdxl-vae' gives 4 channels but features/rgb has 3"):
        _tiny_vae(4).save_pretrained(tmp_path / "vae")
        train.main(
            ["--data", str(prepared), "--extractor", "sdxl-vae", "--weights", str(tmp_path / "vae")]
            + _common(tmp_path / "out")
        )


def test_feature_folder_helpers(tmp_path):
    (tmp_path / "features" / "b").mkdir(parents=True)
    assert find_feature_folder(tmp_path) == "b"
    (tmp_path / "features" / "a").mkdir()
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        find_feature_folder(tmp_path)
    assert find_feature_folder(tmp_path, "a") == "a"
    assert (
        extractor_for_feature("flux_vae") == "flux-vae" and extractor_for_feature("x", "dinov2") == "dinov2"
    )
    with pytest.raises(ValueError, match="extractor: expected one of"):
        extractor_for_feature("rgb", "clip")


@given(
    height=st.integers(1, 9), width=st.integers(1, 9), multiple=st.integers(1, 4), channels=st.integers(1, 3)
)
def test_pad_to_multiple_matches_dense_reference(height, width, multiple, channels):
    maps = torch.randn(2, channels, height, width)
    padded = pad_to_multiple(maps, multiple)
    expected = np.zeros((2, channels, -(-height // multiple) * multiple, -(-width // multiple) * multiple))
    expected[:, :, :height, :width] = maps.numpy()
    np.testing.assert_array_equal(padded.numpy(), expected.astype(np.float32))


@given(height=st.integers(8, 40), width=st.integers(8, 40), multiple=st.sampled_from([1, 2, 8]))
def test_resize_to_multiple(height, width, multiple):
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * 41 + width))
    out = resize_to_multiple(images, multiple)
    assert out.shape[2:] == (height - height % multiple, width - width % multiple)
    assert bool((out >= 0).all() and (out <= 1).all())
    if height % multiple == 0 and width % multiple == 0:
        assert out is images
    else:  # antialiased resize keeps the mean colour
        torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05, rtol=0)


def test_toy_default_path_unchanged(tmp_path, recorded):
    metrics = train.main(["--steps", "2", "--out", str(tmp_path / "toy"), "--device", "cpu"])
    written = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert "data" not in metrics and written["losses"] == metrics["losses"] and len(metrics["losses"]) == 2
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    assert metrics["preset_config"] == dataclasses.asdict(dataclasses.replace(toy(), steps=2))
    config = toy()
    assert recorded[0][0].feats.shape[1] == config.model.latent_channels
    assert recorded[0][2].shape == (
        config.batch_size,
        config.model.image_channels,
        config.resolution,
        config.resolution,
    )
    assert len(recorded) == 2 + config.sample_steps
    again = train.main(["--steps", "2", "--out", str(tmp_path / "toy2"), "--device", "cpu"])
    assert again["losses"] == metrics["losses"] and again["sample_mse"] == metrics["sample_mse"]
