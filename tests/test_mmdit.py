"""Tests of the MMDiT blocks: diffusers FLUX equivalence, packed batch == per-sample loop, permutation
equivariance, AdaLN-Zero identity at init, gradients, bf16 autocast and input errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.compat.flux import load_flux_double_block, load_flux_final_layer, load_flux_single_block
from sparse3d.functional.rope import grid_ids, marope_image_ids, rope_frequencies
from sparse3d.nn.mmdit import DoubleStreamBlock, FinalLayer, MMDiTBlockConfig, SingleStreamBlock

DIM, HEADS, AXES = 32, 2, (4, 6, 6)
CONFIG = MMDiTBlockConfig(dim=DIM, num_heads=HEADS)
BLOCKS = [DoubleStreamBlock, SingleStreamBlock]


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (gates non-zero, norm weights away from 1) so no chunk-order bug hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + std * noise if "norm" in name and "modulation" not in name else std * noise)
    return module


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(context_counts: list[int], latent_counts: list[int], seed: int):
    """Random packed tokens, offsets, per-sample vectors and RoPE tables (random float ids)."""
    generator = torch.Generator().manual_seed(seed)
    num_context, num_latent = sum(context_counts), sum(latent_counts)
    context = torch.randn(num_context, DIM, generator=generator)
    latent = torch.randn(num_latent, DIM, generator=generator)
    vec = torch.randn(len(context_counts), DIM, generator=generator)
    context_ids = torch.randn(num_context, 3, generator=generator) * 4
    latent_ids = torch.randint(0, 6, (num_latent, 3), generator=generator).float()
    return (
        context,
        _offsets(context_counts),
        latent,
        _offsets(latent_counts),
        vec,
        rope_frequencies(context_ids, AXES),
        rope_frequencies(latent_ids, AXES),
    )


# ------------------------------------------------------------------------------------------- FLUX parity


def _flux_setup(subset: bool):
    """Image tokens on the MARoPE plane (context) + a 3^3 voxel grid (latent), full or a random subset."""
    generator = torch.Generator().manual_seed(1)
    image_ids = marope_image_ids((4, 4), (3, 3, 3))  # [16, 3]
    voxel_ids = grid_ids((3, 3, 3))  # [27, 3]
    if subset:
        voxel_ids = voxel_ids[torch.randperm(27, generator=generator)[:11]]
    context = torch.randn(image_ids.shape[0], DIM, generator=generator)
    latent = torch.randn(voxel_ids.shape[0], DIM, generator=generator)
    temb = torch.randn(1, DIM, generator=generator)
    return image_ids, voxel_ids, context, latent, temb


@pytest.mark.parametrize("subset", [False, True], ids=["dense-grid", "voxel-subset"])
@pytest.mark.parametrize("kind", ["double", "single"])
def test_matches_diffusers_flux_blocks(kind: str, subset: bool) -> None:
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    if kind == "double":
        theirs, ours, load = (
            FluxTransformerBlock(DIM, HEADS, DIM // HEADS),
            DoubleStreamBlock(CONFIG),
            load_flux_double_block,
        )
    else:
        theirs = FluxSingleTransformerBlock(DIM, HEADS, DIM // HEADS)
        ours, load = SingleStreamBlock(CONFIG), load_flux_single_block
    _randomize(theirs, seed=3)
    load(ours, theirs.state_dict())
    image_ids, voxel_ids, context, latent, temb = _flux_setup(subset)
    # diffusers: ids of the concatenated sequence, context first, through FluxPosEmbed.
    flux_cos, flux_sin = FluxPosEmbed(10000, list(AXES))(torch.cat([image_ids, voxel_ids]))
    with torch.no_grad():
        expected_context, expected_latent = theirs(
            hidden_states=latent[None],
            encoder_hidden_states=context[None],
            temb=temb,
            image_rotary_emb=(flux_cos, flux_sin),
        )
        num_context = context.shape[0]
        offsets_context = _offsets([num_context])
        offsets_latent = _offsets([latent.shape[0]])
        for context_rope, latent_rope in (
            (
                (flux_cos[:num_context], flux_sin[:num_context]),
                (flux_cos[num_context:], flux_sin[num_context:]),
            ),
            (rope_frequencies(image_ids, AXES), rope_frequencies(voxel_ids, AXES)),
        ):
            out_context, out_latent = ours(
                context, offsets_context, latent, offsets_latent, temb, context_rope, latent_rope
            )
            assert (out_context - expected_context[0]).abs().max() <= 1e-5
            assert (out_latent - expected_latent[0]).abs().max() <= 1e-5
    # The blocks do change their inputs (the comparison is not trivially identity == identity).
    assert (expected_latent[0] - latent).abs().max() > 1e-2


def test_final_layer_matches_diffusers() -> None:
    from diffusers.models.normalization import AdaLayerNormContinuous

    norm_out = _randomize(AdaLayerNormContinuous(DIM, DIM, elementwise_affine=False, eps=1e-6), seed=4)
    proj_out = _randomize(torch.nn.Linear(DIM, 8), seed=5)
    state = {f"norm_out.{k}": v for k, v in norm_out.state_dict().items()}
    state |= {f"proj_out.{k}": v for k, v in proj_out.state_dict().items()}
    ours = FinalLayer(DIM, 8)
    load_flux_final_layer(ours, state)
    tokens, temb = torch.randn(10, DIM), torch.randn(1, DIM)
    with torch.no_grad():
        expected = proj_out(norm_out(tokens[None], temb))[0]
        assert (ours(tokens, _offsets([10]), temb) - expected).abs().max() <= 1e-5


def test_loader_rejects_wrong_keys_and_shapes() -> None:
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    state = FluxTransformerBlock(DIM, HEADS, DIM // HEADS).state_dict()
    with pytest.raises(KeyError, match="missing"):
        load_flux_double_block(DoubleStreamBlock(CONFIG), {k: v for k, v in state.items() if "ff." not in k})
    with pytest.raises(ValueError, match="expected shape"):
        load_flux_double_block(
            DoubleStreamBlock(MMDiTBlockConfig(dim=DIM, num_heads=HEADS, mlp_ratio=2.0)), state
        )
    prefixed = {f"transformer_blocks.0.{k}": v for k, v in state.items()}
    load_flux_double_block(DoubleStreamBlock(CONFIG), prefixed, prefix="transformer_blocks.0.")


# --------------------------------------------------------------------------------------- packed batches


@pytest.mark.parametrize("block_class", BLOCKS)
@given(
    counts=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_batch_equals_per_sample(block_class, counts, seed) -> None:
    context_counts = [c for c, _ in counts]
    latent_counts = [n for _, n in counts]
    block = _randomize(block_class(CONFIG), seed=seed % 1000)
    context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope = _inputs(
        context_counts, latent_counts, seed
    )
    with torch.no_grad():
        out_context, out_latent = block(
            context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope
        )
        for sample in range(len(counts)):
            c0, c1 = context_offsets[sample].item(), context_offsets[sample + 1].item()
            l0, l1 = latent_offsets[sample].item(), latent_offsets[sample + 1].item()
            one_context, one_latent = block(
                context[c0:c1],
                _offsets([c1 - c0]),
                latent[l0:l1],
                _offsets([l1 - l0]),
                vec[sample : sample + 1],
                (context_rope[0][c0:c1], context_rope[1][c0:c1]),
                (latent_rope[0][l0:l1], latent_rope[1][l0:l1]),
            )
            torch.testing.assert_close(out_context[c0:c1], one_context, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out_latent[l0:l1], one_latent, atol=1e-5, rtol=1e-5)


def test_packed_batch_b3_different_counts() -> None:
    """The fixed B = 3 case of the brief, against the dense single-sample path; and samples interact
    only within themselves (a different vec for sample 1 leaves samples 0 and 2 unchanged)."""
    block = _randomize(DoubleStreamBlock(CONFIG), seed=7)
    inputs = list(_inputs([4, 7, 2], [9, 3, 12], seed=11))
    with torch.no_grad():
        out_context, out_latent = block(*inputs)
        inputs[4] = inputs[4].clone()
        inputs[4][1] += 1.0
        changed_context, changed_latent = block(*inputs)
    assert torch.equal(out_latent[:9], changed_latent[:9]) and torch.equal(
        out_latent[12:], changed_latent[12:]
    )
    assert torch.equal(out_context[:4], changed_context[:4]) and torch.equal(
        out_context[11:], changed_context[11:]
    )
    assert not torch.allclose(out_latent[9:12], changed_latent[9:12])


@pytest.mark.parametrize("block_class", BLOCKS)
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_tokens_with_ids_permutes_outputs(block_class, seed) -> None:
    block = _randomize(block_class(CONFIG), seed=seed % 1000)
    context_counts, latent_counts = [3, 5], [8, 6]
    context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope = _inputs(
        context_counts, latent_counts, seed
    )
    generator = torch.Generator().manual_seed(seed)
    # A permutation inside each sample (samples stay contiguous and in order).
    latent_perm = torch.cat(
        [torch.randperm(8, generator=generator), 8 + torch.randperm(6, generator=generator)]
    )
    context_perm = torch.cat(
        [torch.randperm(3, generator=generator), 3 + torch.randperm(5, generator=generator)]
    )
    with torch.no_grad():
        out_context, out_latent = block(
            context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope
        )
        permuted_context, permuted_latent = block(
            context[context_perm],
            context_offsets,
            latent[latent_perm],
            latent_offsets,
            vec,
            (context_rope[0][context_perm], context_rope[1][context_perm]),
            (latent_rope[0][latent_perm], latent_rope[1][latent_perm]),
        )
    torch.testing.assert_close(permuted_latent, out_latent[latent_perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted_context, out_context[context_perm], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- init, grads, autocast


@pytest.mark.parametrize("block_class", BLOCKS)
def test_adaln_zero_init_is_identity(block_class) -> None:
    block = block_class(CONFIG)
    inputs = _inputs([3, 2], [5, 4], seed=0)
    out_context, out_latent = block(*inputs)
    assert torch.equal(out_context, inputs[0]) and torch.equal(out_latent, inputs[2])
    layer = FinalLayer(DIM, 6)
    assert torch.equal(layer(inputs[2], inputs[3], inputs[4]), torch.zeros(9, 6))


@pytest.mark.parametrize("block_class", BLOCKS)
def test_gradients_reach_every_parameter(block_class) -> None:
    block = _randomize(block_class(CONFIG), seed=5)
    inputs = list(_inputs([3, 2], [5, 4], seed=1))
    for index in (0, 2, 4):
        inputs[index] = inputs[index].requires_grad_()
    out_context, out_latent = block(*inputs)
    (out_context.square().sum() + out_latent.square().sum()).backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for index in (0, 2, 4):
        assert inputs[index].grad.abs().sum() > 0


@pytest.mark.parametrize("block_class", BLOCKS)
def test_bf16_autocast_runs_close_to_float32(block_class) -> None:
    block = _randomize(block_class(CONFIG), seed=9)
    inputs = _inputs([4, 3], [6, 8], seed=2)
    with torch.no_grad():
        reference = block(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(*inputs)
    for got, expected in zip(low, reference, strict=True):
        assert torch.isfinite(got).all()
        error = (got.float() - expected).abs().max() / expected.abs().max()
        assert error < 5e-2, error


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="dim divisible by num_heads"):
        MMDiTBlockConfig(dim=30, num_heads=4)
    block = DoubleStreamBlock(CONFIG)
    inputs = _inputs([3, 2], [5, 4], seed=0)
    context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope = inputs
    # RoPE axes summing to 12, not the head dim 16.
    wrong_axes = rope_frequencies(torch.zeros(9, 3), (4, 4, 4))
    with pytest.raises(ValueError, match=r"latent_rope: expected cos of shape \[9, 16\]"):
        block(context, context_offsets, latent, latent_offsets, vec, context_rope, wrong_axes)
    # Ids of the wrong length (one table row per token).
    short = rope_frequencies(torch.zeros(4, 3), AXES)
    with pytest.raises(ValueError, match=r"context_rope: expected cos of shape \[5, 16\]"):
        block(context, context_offsets, latent, latent_offsets, vec, short, latent_rope)
    # Mismatched batch sizes between modalities.
    with pytest.raises(ValueError, match="same batch size, got 1 and 2"):
        block(context, _offsets([5]), latent, latent_offsets, vec, context_rope, latent_rope)
    with pytest.raises(
        ValueError, match=r"vec: expected one conditioning vector per sample, shape \[2, 32\]"
    ):
        block(context, context_offsets, latent, latent_offsets, vec[:1], context_rope, latent_rope)
    # Offsets that do not add up to the tokens.
    with pytest.raises(
        ValueError, match=r"latent_offsets: expected offsets\[0\] == 0 and offsets\[-1\] == 9"
    ):
        block(context, context_offsets, latent, _offsets([5, 3]), vec, context_rope, latent_rope)
    with pytest.raises(ValueError, match=r"latent: expected tokens of shape \[T, 32\]"):
        block(context, context_offsets, latent[:, :16], latent_offsets, vec, context_rope, latent_rope)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("block_class", BLOCKS)
def test_cuda_matches_cpu_reference(block_class) -> None:
    """On CUDA, with uneven lengths and an empty context sample: float32 matches the CPU result and bf16
    autocast (the automatic attention backend) stays close to it."""
    block = _randomize(block_class(MMDiTBlockConfig(dim=128, num_heads=2)), seed=3)
    generator = torch.Generator().manual_seed(0)
    context_counts, latent_counts = [64, 0, 100], [300, 17, 513]
    context = torch.randn(sum(context_counts), 128, generator=generator)
    latent = torch.randn(sum(latent_counts), 128, generator=generator)
    vec = torch.randn(3, 128, generator=generator)
    context_rope = rope_frequencies(torch.randn(len(context), 3, generator=generator) * 8, (20, 22, 22))
    latent_rope = rope_frequencies(torch.randint(0, 16, (len(latent), 3), generator=generator), (20, 22, 22))
    inputs = (
        context,
        _offsets(context_counts),
        latent,
        _offsets(latent_counts),
        vec,
        context_rope,
        latent_rope,
    )
    with torch.no_grad():
        reference = block(*inputs)
        cuda_block = block.cuda()
        cuda_inputs = [
            tuple(t.cuda() for t in item) if isinstance(item, tuple) else item.cuda() for item in inputs
        ]
        full = cuda_block(*cuda_inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = cuda_block(*cuda_inputs)
    for got, expected in zip(full, reference, strict=True):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=1e-3)
    for got, expected in zip(low, reference, strict=True):
        assert (got.float().cpu() - expected).abs().max() / expected.abs().max() < 5e-2
