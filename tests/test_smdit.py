"""SMDiT with ragged condition images (one size per sample) against per-sample calls, and its input forms."""

from __future__ import annotations

import pytest
import torch

from recipes.flux3d.model import SMDiT, SMDiTConfig
from sparse3d import SparseTensor
from sparse3d.functional.rope import marope_image_ids, rope_frequencies

CONFIG = SMDiTConfig(
    latent_channels=2,
    image_channels=3,
    dim=24,
    num_heads=2,
    num_double_blocks=1,
    num_single_blocks=1,
    axes_dims=(4, 4, 4),
)


def _model(seed: int = 0) -> SMDiT:
    """Random weights everywhere: the zero-initialised final layer and gates would hide every difference."""
    model = SMDiT(CONFIG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def _latents(counts: list[int], seed: int = 1) -> SparseTensor:
    """``B`` samples with ``counts[b]`` distinct voxels each on a 6^3 grid, 2 channels."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for b, count in enumerate(counts):
        cells = torch.randperm(216, generator=generator)[:count]
        xyz = torch.stack([cells // 36, cells // 6 % 6, cells % 6], dim=1)
        xyz = xyz[torch.argsort(xyz[:, 0] * 36 + xyz[:, 1] * 6 + xyz[:, 2])]
        rows.append(torch.cat([torch.full((count, 1), b), xyz], dim=1))
    coords = torch.cat(rows).int()
    return SparseTensor(coords, torch.randn(coords.shape[0], 2, generator=generator), spatial_shape=6)


def _sample(x: SparseTensor, b: int) -> SparseTensor:
    start, end = x.offsets[b].item(), x.offsets[b + 1].item()
    coords = x.coords[start:end].clone()
    coords[:, 0] = 0
    return SparseTensor(coords, x.feats[start:end], spatial_shape=x.spatial_shape)


def test_ragged_images_match_per_sample_calls() -> None:
    model = _model()
    x_t = _latents([9, 4, 12])
    t = torch.tensor([0.2, 0.5, 0.9])
    generator = torch.Generator().manual_seed(2)
    images = [
        torch.randn(3, height, width, generator=generator) for height, width in ((4, 4), (2, 6), (6, 2))
    ]
    seen = []
    hook = model.double_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        ragged = model(x_t, t, images)
    hook.remove()
    # Image tokens of sample b: (h_b / 2) x (w_b / 2) patches on the MARoPE plane of the 3^3 token grid.
    (image,) = seen
    assert image.offsets.tolist() == [0, 4, 7, 10] and image.max_length == 4
    expected = rope_frequencies(
        torch.cat([marope_image_ids(shape, (3, 3, 3)) for shape in ((2, 2), (1, 3), (3, 1))]), (4, 4, 4)
    )
    assert torch.equal(image.rope[0], expected[0]) and torch.equal(image.rope[1], expected[1])
    with torch.no_grad():
        for b, image in enumerate(images):
            one = model(_sample(x_t, b), t[b : b + 1], image[None])
            start, end = x_t.offsets[b].item(), x_t.offsets[b + 1].item()
            torch.testing.assert_close(ragged.feats[start:end], one.feats, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged.coords, x_t.coords)
    # The images matter: another image for sample 1 changes sample 1 only.
    with torch.no_grad():
        changed = model(x_t, t, [images[0], torch.zeros(3, 2, 6), images[2]])
    start, end = x_t.offsets[1].item(), x_t.offsets[2].item()
    assert not torch.allclose(changed.feats[start:end], ragged.feats[start:end])
    assert torch.equal(changed.feats[:start], ragged.feats[:start])
    assert torch.equal(changed.feats[end:], ragged.feats[end:])


def test_list_of_equal_images_equals_batched_tensor() -> None:
    model = _model(seed=3)
    x_t = _latents([5, 7])
    t = torch.tensor([0.1, 0.7])
    image = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x_t, t, image).feats, model(x_t, t, list(image)).feats)


def test_image_errors_name_the_argument() -> None:
    model = _model()
    x_t = _latents([3, 2])
    t = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"image: expected 2 tensors \[C_img, h_b, w_b\]"):
        model(x_t, t, [torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match=r"image: expected 2 tensors \[C_img, h_b, w_b\]"):
        model(x_t, t, [torch.zeros(3, 4, 4), torch.zeros(1, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"image: expected \[B, C_img, h, w\] with batch size B = 2"):
        model(x_t, t, torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="image: expected height and width divisible by 2, got 4 x 3"):
        model(x_t, t, [torch.zeros(3, 4, 4), torch.zeros(3, 4, 3)])


@pytest.mark.gpu
def test_cuda_ragged_images_match_cpu() -> None:
    """On CUDA (the automatic attention backend, per-sample flash loop for unequal lengths), ragged images
    give the CPU result in float32."""
    model = _model(seed=5)
    x_t = _latents([9, 4, 12])
    t = torch.tensor([0.2, 0.5, 0.9])
    generator = torch.Generator().manual_seed(6)
    images = [
        torch.randn(3, height, width, generator=generator) for height, width in ((4, 4), (2, 6), (6, 2))
    ]
    with torch.no_grad():
        reference = model(x_t, t, images)
        on_gpu = SparseTensor(x_t.coords.cuda(), x_t.feats.cuda(), spatial_shape=x_t.spatial_shape)
        out = model.cuda()(on_gpu, t.cuda(), [image.cuda() for image in images])
    assert out.feats.is_cuda
    torch.testing.assert_close(out.feats.cpu(), reference.feats, atol=1e-4, rtol=1e-4)
