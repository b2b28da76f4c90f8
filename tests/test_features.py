"""Feature extractors: FLUX/SDXL VAE against diffusers, DINOv2 against transformers, RGB against pooling."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
import transformers

from sparse3d.features import (
    FLUX_VAE_SCALE,
    FLUX_VAE_SHIFT,
    SDXL_VAE_SCALE,
    DINOv2Features,
    FeatureExtractor,
    FluxVAEFeatures,
    RGBFeatures,
    SDXLVAEFeatures,
)


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


@pytest.fixture(scope="module")
def flux_vae_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("flux")
    vae = _tiny_vae(16)
    vae.save_pretrained(root / "vae")
    return root, vae


def _images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_flux_vae_matches_diffusers(flux_vae_root) -> None:
    root, vae = flux_vae_root
    images = _images()
    extractor = FluxVAEFeatures.from_pretrained(root)  # model root: finds vae/ by itself
    assert isinstance(extractor, FeatureExtractor)
    maps = extractor(images)
    with torch.no_grad():
        posterior = vae.eval().encode(images * 2 - 1).latent_dist
    assert maps.stride == 8 and extractor.channels == 16
    assert maps.mean.shape == (3, 16, 4, 4)
    torch.testing.assert_close(
        maps.mean, (posterior.mean - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(maps.std, posterior.std * FLUX_VAE_SCALE, atol=1e-6, rtol=0)
    # the folder itself, raw posterior, chunked batches
    raw = FluxVAEFeatures.from_pretrained(root / "vae", normalize=False, batch_size=2)(images)
    torch.testing.assert_close(raw.mean, posterior.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(raw.std, posterior.std, atol=1e-6, rtol=0)
    custom = FluxVAEFeatures(vae, shift_factor=0.5, scaling_factor=2.0)(images)
    torch.testing.assert_close(custom.mean, (posterior.mean - 0.5) * 2.0, atol=1e-6, rtol=0)


def test_sdxl_vae_scaling(tmp_path) -> None:
    vae = _tiny_vae(4)
    vae.save_pretrained(tmp_path)
    images = _images(2)
    maps = SDXLVAEFeatures.from_pretrained(tmp_path)(images)
    with torch.no_grad():
        posterior = vae.eval().encode(images * 2 - 1).latent_dist
    torch.testing.assert_close(maps.mean, posterior.mean * SDXL_VAE_SCALE, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps.std, posterior.std * SDXL_VAE_SCALE, atol=1e-6, rtol=0)


@pytest.mark.parametrize("where", ["missing", "empty", "subfolder", "repo"])
def test_missing_weights_say_how_to_supply_them(tmp_path, where: str) -> None:
    kwargs = {}
    if where == "missing":
        path = tmp_path / "nowhere"
    elif where == "empty":
        path = tmp_path
    elif where == "subfolder":
        path, kwargs = tmp_path, {"subfolder": "vae"}
    else:
        path = "nobody-owns-this/flux3d-test-model-not-cached"
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        FluxVAEFeatures.from_pretrained(path, **kwargs)
    assert "--weights" in str(info.value) and "Nothing is downloaded" in str(info.value)


def test_bad_images_raise(flux_vae_root) -> None:
    _, vae = flux_vae_root
    extractor = FluxVAEFeatures(vae)
    with pytest.raises(ValueError, match=r"images: expected values in \[0, 1\]"):
        extractor(_images() * 2)
    with pytest.raises(ValueError, match="multiples of 8"):
        extractor(_images(size=30))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        extractor(torch.rand(1, 4, 32, 32))


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_patch_tokens(tmp_path, registers: int) -> None:
    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    model.save_pretrained(tmp_path)
    extractor = DINOv2Features.from_pretrained(tmp_path, image_size=56)
    images = _images(2, size=40)
    maps = extractor(images)
    assert maps.std is None and maps.mean.shape == (2, 32, 4, 4)
    # reference: resize + ImageNet normalisation by hand, tokens after CLS and registers, row-major grid
    pixels = F.interpolate(images, size=(56, 56), mode="bicubic", antialias=True).clamp(0, 1)
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    with torch.no_grad():
        tokens = model.eval()(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + registers + 16
    expected = tokens[:, 1 + registers :].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps.mean, expected, atol=1e-5, rtol=1e-5)
    # TRELLIS-style norm: plain layer norm of the pre-norm tokens
    trellis = DINOv2Features(model, image_size=56, trellis_norm=True)(images)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    hidden = F.layer_norm(hidden, hidden.shape[-1:])[:, 1 + registers :]
    torch.testing.assert_close(
        trellis.mean, hidden.reshape(2, 4, 4, 32).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5
    )


def test_dinov2_missing_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DINOv2Features.from_pretrained(tmp_path / "absent")


@pytest.mark.parametrize("pool", [1, 4])
def test_rgb_features(pool: int) -> None:
    images = _images(2, size=16)
    maps = RGBFeatures(pool)(images)
    expected = images.reshape(2, 3, 16 // pool, pool, 16 // pool, pool).mean(dim=(3, 5))
    torch.testing.assert_close(maps.mean, expected)
    assert maps.std is None and maps.stride == pool
    with pytest.raises(ValueError, match="pool"):
        RGBFeatures(0)
