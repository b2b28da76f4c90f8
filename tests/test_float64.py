"""float64 end to end: the MMDiT blocks, the Gaussian decoder's transformer block and SMDiT pass float64
`torch.autograd.gradcheck` (finite differences agree with autograd only if no step rounds to float32), and
the RoPE / RMSNorm / timestep pieces match float64 references. Tiny sizes, CPU, a few seconds in all."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from recipes.flux3d.model import SMDiT, SMDiTConfig
from sparse3d import SparseTensor
from sparse3d.functional.rope import apply_rope, rope_frequencies
from sparse3d.gaussians import SparseTransformer, SparseTransformerBlock, SparseTransformerConfig
from sparse3d.gaussians.decoder import axial_split
from sparse3d.nn import DoubleStreamBlock, MMDiTBlockConfig, SingleStreamBlock, TokenStream
from sparse3d.nn.embeddings import timestep_features
from sparse3d.nn.mmdit import QKRMSNorm

DIM, HEADS, AXES = 12, 2, (2, 2, 2)  # head dim 6
CONFIG = MMDiTBlockConfig(dim=DIM, num_heads=HEADS, mlp_ratio=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (a second one only adds scheduling latency on a busy machine,
    ~20x on two shared cores), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Random float64 weights everywhere (zero-initialised gates and projections included), norm weights
    away from 1, so that every path carries gradient."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else std * noise)
    return module


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def _streams(image_counts: list[int], voxel_counts: list[int], seed: int):
    """Ragged float64 image and voxel streams (float64 RoPE tables) and per-sample vectors."""
    generator = torch.Generator().manual_seed(seed)
    num_image, num_voxels = sum(image_counts), sum(voxel_counts)
    image_ids = torch.randn(num_image, 3, generator=generator, dtype=torch.float64) * 3
    voxel_ids = torch.randint(0, 4, (num_voxels, 3), generator=generator)
    image = TokenStream(
        torch.randn(num_image, DIM, generator=generator, dtype=torch.float64),
        _offsets(image_counts),
        rope_frequencies(image_ids, AXES, dtype=torch.float64),
    )
    voxels = TokenStream(
        torch.randn(num_voxels, DIM, generator=generator, dtype=torch.float64),
        _offsets(voxel_counts),
        rope_frequencies(voxel_ids, AXES, dtype=torch.float64),
    )
    vec = torch.randn(len(image_counts), DIM, generator=generator, dtype=torch.float64)
    return image, voxels, vec


@pytest.mark.parametrize("block_class", [DoubleStreamBlock, SingleStreamBlock])
def test_mmdit_blocks_gradcheck(block_class) -> None:
    """Both streams and ``vec`` (full Jacobian), then every parameter (fast mode: one random direction)."""
    block = _randomize(block_class(CONFIG), seed=1)
    image, voxels, vec = _streams([2, 3], [3, 1], seed=2)

    def run(image_feats, voxel_feats, vec):
        out_image, out_voxels = block(image.replace(image_feats), voxels.replace(voxel_feats), vec)
        assert out_image.feats.dtype == out_voxels.feats.dtype == torch.float64
        return out_image.feats, out_voxels.feats

    inputs = (image.feats.requires_grad_(), voxels.feats.requires_grad_(), vec.requires_grad_())
    assert gradcheck(run, inputs)

    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())

    def run_params(*values):
        out_image, out_voxels = functional_call(
            block, dict(zip(names, values, strict=True)), (image, voxels, vec.detach())
        )
        return out_image.feats, out_voxels.feats

    assert gradcheck(run_params, params, fast_mode=True)


@pytest.mark.parametrize("window", [None, 2], ids=["full", "windowed"])
def test_decoder_transformer_block_gradcheck(window) -> None:
    """The Gaussian decoder's block (qk-norm, 3D RoPE hook) and, through it, a 2-layer RoPE stack."""
    # Windows of 2^3 cells hold 3, 2 and 2 voxels (and one alone), so attention mixes voxels in either mode.
    coords = torch.tensor(
        [
            [0, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 1],
            [0, 2, 2, 2],
            [0, 3, 3, 2],
            [1, 0, 0, 1],
            [1, 1, 1, 0],
            [1, 3, 2, 3],
        ]
    )
    feats = torch.randn(coords.shape[0], DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block = _randomize(SparseTransformerBlock(DIM, HEADS, mlp_ratio=1.0, window=window), 4)
    cos, sin = rope_frequencies(coords[:, 1:], axial_split(DIM // HEADS))

    def run(values):
        x = SparseTensor(coords, values)
        return block(x, lambda q, k: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))).feats

    assert gradcheck(run, (feats.clone().requires_grad_(),))

    config = SparseTransformerConfig(
        in_channels=3, dim=DIM, num_layers=2, num_heads=HEADS, mlp_ratio=1.0, window=window, position="rope"
    )
    stack = _randomize(SparseTransformer(config), seed=5)
    latents = torch.randn(coords.shape[0], 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert gradcheck(lambda values: stack(SparseTensor(coords, values)).feats, (latents.requires_grad_(),))


def _smdit_inputs(ragged: bool):
    """Two samples on a 4^3 grid, 2 latent channels; condition images 4 x 4 (or 4 x 4 and 2 x 6)."""
    generator = torch.Generator().manual_seed(7)
    coords = torch.tensor(
        [[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 3, 1], [0, 3, 3, 3], [1, 0, 1, 2], [1, 1, 1, 3], [1, 3, 0, 0]],
        dtype=torch.int32,
    )
    feats = torch.randn(coords.shape[0], 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    if ragged:
        image = [
            torch.randn(2, 4, 4, generator=generator, dtype=torch.float64),
            torch.randn(2, 2, 6, generator=generator, dtype=torch.float64),
        ]
    else:
        image = [torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64)]
    return coords, feats, t, image


@pytest.mark.parametrize("ragged", [False, True], ids=["batched-image", "ragged-images"])
def test_smdit_gradcheck(ragged: bool) -> None:
    """The recipe's SMDiT in float64, through the noisy latents, the times and the condition images."""
    config = SMDiTConfig(
        latent_channels=2,
        image_channels=2,
        dim=DIM,
        num_heads=HEADS,
        num_double_blocks=1,
        num_single_blocks=1,
        mlp_ratio=1.0,
        axes_dims=AXES,
    )
    model = _randomize(SMDiT(config), seed=8, std=0.2)
    coords, feats, t, image = _smdit_inputs(ragged)

    def run(values, times, *images):
        x_t = SparseTensor(coords, values, spatial_shape=4)
        out = model(x_t, times, list(images) if ragged else images[0])
        assert out.feats.dtype == torch.float64 and torch.equal(out.coords, x_t.coords)
        return out.feats

    inputs = (feats.requires_grad_(), t.requires_grad_(), *(one.requires_grad_() for one in image))
    assert gradcheck(run, inputs)


# ------------------------------------------------------------------------------- the pieces, in float64


def test_apply_rope_float64_matches_complex_reference() -> None:
    """float64 queries rotate in float64: against a complex-number reference with float64 angles, the error
    is at float64 round-off, a million times below float32's."""
    generator = torch.Generator().manual_seed(9)
    ids = (torch.randn(7, 3, generator=generator, dtype=torch.float64) * 160).round() / 4  # exact in float32
    query = torch.randn(7, 2, 16, generator=generator, dtype=torch.float64)
    cos, sin = rope_frequencies(ids, (4, 6, 6), dtype=torch.float64)
    assert cos.dtype == sin.dtype == torch.float64
    angles = torch.cat(
        [
            ids[:, axis, None] * 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
            for axis, width in enumerate((4, 6, 6))
        ],
        dim=1,
    )  # [7, 8]
    expected = torch.view_as_real(
        torch.view_as_complex(query.unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    ).flatten(-2)  # [7, 2, 16]
    rotated = apply_rope(query, cos, sin)
    assert rotated.dtype == torch.float64
    assert (rotated - expected).abs().max() < 1e-12
    # float32 tables are the float64 ones rounded once; rotating by them is off at float32 precision.
    cos32, sin32 = rope_frequencies(ids, (4, 6, 6))
    assert (
        cos32.dtype == torch.float32 and torch.equal(cos32, cos.float()) and torch.equal(sin32, sin.float())
    )
    assert (apply_rope(query, cos32, sin32) - expected).abs().max() > 1e-9


def test_qk_rms_norm_and_timestep_features_float64() -> None:
    generator = torch.Generator().manual_seed(10)
    norm = QKRMSNorm(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=generator, dtype=torch.float64) + 0.5)
    x = torch.randn(5, 2, 6, generator=generator, dtype=torch.float64) * 1e3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    out = norm(x)
    assert out.dtype == torch.float64 and (out - expected).abs().max() < 1e-13
    # Still float32 math (and output dtype) for reduced precision: bf16 in, float32 stats, bf16 out.
    low = norm.float()(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, norm(x.bfloat16().float()).bfloat16())

    t = torch.tensor([0.0, 0.123456789012, 1.0], dtype=torch.float64)
    features = timestep_features(t, 8)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float64) / 4)
    angles = 1000.0 * t[:, None] * frequencies
    assert features.dtype == torch.float64
    assert (features - torch.cat([angles.cos(), angles.sin()], dim=1)).abs().max() < 1e-12
    assert timestep_features(t.float(), 8).dtype == torch.float32
