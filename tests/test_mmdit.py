"""Tests of the MMDiT blocks: diffusers FLUX equivalence, packed batch == per-sample loop, permutation
equivariance, AdaLN-Zero identity at init, gradients, bf16 autocast, the TokenStream type and input errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.compat.flux import load_flux_double_block, load_flux_final_layer, load_flux_single_block
from sparse3d.functional.rope import grid_ids, marope_image_ids, rope_frequencies
from sparse3d.nn import TokenStream
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


def _inputs(image_counts: list[int], voxel_counts: list[int], seed: int, dtype: torch.dtype = torch.float32):
    """Random image and voxel streams (random float ids; ``max_length`` left unknown) and vectors."""
    generator = torch.Generator().manual_seed(seed)
    num_image, num_voxels = sum(image_counts), sum(voxel_counts)
    image_feats = torch.randn(num_image, DIM, generator=generator, dtype=dtype)
    voxel_feats = torch.randn(num_voxels, DIM, generator=generator, dtype=dtype)
    vec = torch.randn(len(image_counts), DIM, generator=generator, dtype=dtype)
    image_ids = torch.randn(num_image, 3, generator=generator) * 4
    voxel_ids = torch.randint(0, 6, (num_voxels, 3), generator=generator).float()
    image = TokenStream(image_feats, _offsets(image_counts), rope_frequencies(image_ids, AXES))
    voxels = TokenStream(voxel_feats, _offsets(voxel_counts), rope_frequencies(voxel_ids, AXES))
    return image, voxels, vec


def _sample(stream: TokenStream, sample: int) -> TokenStream:
    """Sample ``sample`` of ``stream`` as a stream of its own."""
    start, end = stream.offsets[sample].item(), stream.offsets[sample + 1].item()
    rope = (stream.rope[0][start:end], stream.rope[1][start:end])
    return TokenStream.from_lengths(stream.feats[start:end], [end - start], rope)


# ------------------------------------------------------------------------------------------- FLUX parity


def _flux_setup(subset: bool):
    """Image tokens on the MARoPE plane + a 3^3 voxel grid, full or a random subset."""
    generator = torch.Generator().manual_seed(1)
    image_ids = marope_image_ids((4, 4), (3, 3, 3))  # [16, 3]
    voxel_ids = grid_ids((3, 3, 3))  # [27, 3]
    if subset:
        voxel_ids = voxel_ids[torch.randperm(27, generator=generator)[:11]]
    image_feats = torch.randn(image_ids.shape[0], DIM, generator=generator)
    voxel_feats = torch.randn(voxel_ids.shape[0], DIM, generator=generator)
    temb = torch.randn(1, DIM, generator=generator)
    return image_ids, voxel_ids, image_feats, voxel_feats, temb


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
    image_ids, voxel_ids, image_feats, voxel_feats, temb = _flux_setup(subset)
    # diffusers: ids of the concatenated sequence, encoder_hidden_states (our image tokens) first.
    flux_cos, flux_sin = FluxPosEmbed(10000, list(AXES))(torch.cat([image_ids, voxel_ids]))
    with torch.no_grad():
        expected_image, expected_voxels = theirs(
            hidden_states=voxel_feats[None],
            encoder_hidden_states=image_feats[None],
            temb=temb,
            image_rotary_emb=(flux_cos, flux_sin),
        )
        num_image = image_feats.shape[0]
        for image_rope, voxel_rope in (
            ((flux_cos[:num_image], flux_sin[:num_image]), (flux_cos[num_image:], flux_sin[num_image:])),
            (rope_frequencies(image_ids, AXES), rope_frequencies(voxel_ids, AXES)),
        ):
            image = TokenStream(image_feats, _offsets([num_image]), image_rope)
            voxels = TokenStream(voxel_feats, _offsets([voxel_feats.shape[0]]), voxel_rope)
            out_image, out_voxels = ours(image, voxels, temb)
            # Bitwise: the same float32 operations in the same order as diffusers.
            assert (out_image.feats - expected_image[0]).abs().max() == 0.0
            assert (out_voxels.feats - expected_voxels[0]).abs().max() == 0.0
    # The blocks do change their inputs (the comparison is not trivially identity == identity).
    assert (expected_voxels[0] - voxel_feats).abs().max() > 1e-2


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
    block = _randomize(block_class(CONFIG), seed=seed % 1000)
    image, voxels, vec = _inputs([c for c, _ in counts], [n for _, n in counts], seed)
    with torch.no_grad():
        out_image, out_voxels = block(image, voxels, vec)
        assert out_image.offsets is image.offsets and out_voxels.rope is voxels.rope  # the same layout
        for sample in range(len(counts)):
            one_image, one_voxels = block(
                _sample(image, sample), _sample(voxels, sample), vec[sample : sample + 1]
            )
            torch.testing.assert_close(
                _sample(out_image, sample).feats, one_image.feats, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                _sample(out_voxels, sample).feats, one_voxels.feats, atol=1e-5, rtol=1e-5
            )


def test_packed_batch_b3_different_counts() -> None:
    """The fixed B = 3 case of the brief, against the dense single-sample path; and samples interact
    only within themselves (a different vec for sample 1 leaves samples 0 and 2 unchanged)."""
    block = _randomize(DoubleStreamBlock(CONFIG), seed=7)
    image, voxels, vec = _inputs([4, 7, 2], [9, 3, 12], seed=11)
    with torch.no_grad():
        out_image, out_voxels = block(image, voxels, vec)
        changed_vec = vec.clone()
        changed_vec[1] += 1.0
        changed_image, changed_voxels = block(image, voxels, changed_vec)
    out_voxels, changed_voxels = out_voxels.feats, changed_voxels.feats
    out_image, changed_image = out_image.feats, changed_image.feats
    assert torch.equal(out_voxels[:9], changed_voxels[:9]) and torch.equal(
        out_voxels[12:], changed_voxels[12:]
    )
    assert torch.equal(out_image[:4], changed_image[:4]) and torch.equal(out_image[11:], changed_image[11:])
    assert not torch.allclose(out_voxels[9:12], changed_voxels[9:12])


@pytest.mark.parametrize("block_class", BLOCKS)
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_tokens_with_ids_permutes_outputs(block_class, seed) -> None:
    block = _randomize(block_class(CONFIG), seed=seed % 1000)
    image, voxels, vec = _inputs([3, 5], [8, 6], seed)
    generator = torch.Generator().manual_seed(seed)
    # A permutation inside each sample (samples stay contiguous and in order).
    voxel_perm = torch.cat(
        [torch.randperm(8, generator=generator), 8 + torch.randperm(6, generator=generator)]
    )
    image_perm = torch.cat(
        [torch.randperm(3, generator=generator), 3 + torch.randperm(5, generator=generator)]
    )

    def permuted(stream: TokenStream, perm: torch.Tensor) -> TokenStream:
        return TokenStream(stream.feats[perm], stream.offsets, (stream.rope[0][perm], stream.rope[1][perm]))

    with torch.no_grad():
        out_image, out_voxels = block(image, voxels, vec)
        permuted_image, permuted_voxels = block(
            permuted(image, image_perm), permuted(voxels, voxel_perm), vec
        )
    torch.testing.assert_close(permuted_voxels.feats, out_voxels.feats[voxel_perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted_image.feats, out_image.feats[image_perm], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- init, grads, autocast


@pytest.mark.parametrize("block_class", BLOCKS)
def test_adaln_zero_init_is_identity(block_class) -> None:
    block = block_class(CONFIG)
    image, voxels, vec = _inputs([3, 2], [5, 4], seed=0)
    out_image, out_voxels = block(image, voxels, vec)
    assert torch.equal(out_image.feats, image.feats) and torch.equal(out_voxels.feats, voxels.feats)
    layer = FinalLayer(DIM, 6)
    assert torch.equal(layer(voxels.feats, voxels.offsets, vec), torch.zeros(9, 6))


@pytest.mark.parametrize("block_class", BLOCKS)
def test_gradients_reach_every_parameter(block_class) -> None:
    block = _randomize(block_class(CONFIG), seed=5)
    image, voxels, vec = _inputs([3, 2], [5, 4], seed=1)
    leaves = [image.feats.requires_grad_(), voxels.feats.requires_grad_(), vec.requires_grad_()]
    out_image, out_voxels = block(image, voxels, vec)
    (out_image.feats.square().sum() + out_voxels.feats.square().sum()).backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for leaf in leaves:
        assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("block_class", BLOCKS)
def test_bf16_autocast_runs_close_to_float32(block_class) -> None:
    block = _randomize(block_class(CONFIG), seed=9)
    image, voxels, vec = _inputs([4, 3], [6, 8], seed=2)
    with torch.no_grad():
        reference = block(image, voxels, vec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(image, voxels, vec)
    for got, expected in zip(low, reference, strict=True):
        assert torch.isfinite(got.feats).all()
        error = (got.feats.float() - expected.feats).abs().max() / expected.feats.abs().max()
        assert error < 5e-2, error


# ------------------------------------------------------------------------------------------ TokenStream


@pytest.mark.parametrize("block_class", BLOCKS)
def test_blocks_check_offsets_once_and_hand_on_max_length(block_class, monkeypatch) -> None:
    """The first block validates the offsets (one host sync) and returns streams that carry the per-sample
    maxima; the next block then never reads a tensor on the host (equal lengths: attention needs no sync
    either), and the result does not depend on whether the maxima were validated or given."""
    block = _randomize(block_class(CONFIG), seed=2)
    image, voxels, vec = _inputs([3, 3], [7, 7], seed=4)
    with torch.no_grad():
        first_image, first_voxels = block(image, voxels, vec)
        assert (image.max_length, voxels.max_length) == (None, None)
        assert (first_image.max_length, first_voxels.max_length) == (3, 7)
        syncs = []
        for name in ("tolist", "item", "__bool__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(
                torch.Tensor,
                name,
                lambda self, *a, _name=name, _f=original: syncs.append(_name) or _f(self, *a),
            )
        block(image, voxels, vec)
        assert syncs == ["tolist"]  # the probe sees the one sync that validates unknown offsets
        syncs.clear()
        second_image, second_voxels = block(first_image, first_voxels, vec)
        monkeypatch.undo()
        assert syncs == []
        # Supplying the maxima by hand gives the same result as validating them.
        given_image = TokenStream(first_image.feats, first_image.offsets, first_image.rope, 3)
        given_voxels = TokenStream(first_voxels.feats, first_voxels.offsets, first_voxels.rope, 7)
        same_image, same_voxels = block(given_image, given_voxels, vec)
    assert torch.equal(same_image.feats, second_image.feats) and torch.equal(
        same_voxels.feats, second_voxels.feats
    )


def test_token_stream_construction_and_errors() -> None:
    rope = rope_frequencies(torch.zeros(5, 3), AXES)
    feats = torch.randn(5, DIM)
    stream = TokenStream.from_lengths(feats, torch.tensor([2, 0, 3]), rope)
    assert stream.offsets.dtype == torch.int32 and stream.offsets.tolist() == [0, 2, 2, 5]
    assert (stream.batch_size, stream.num_tokens, stream.max_length) == (3, 5, 3)
    wider = stream.replace(torch.zeros(5, 2 * DIM))
    assert wider.offsets is stream.offsets and wider.rope is stream.rope and wider.max_length == 3
    assert stream.feats is feats  # replace() returned a new stream; the old one is unchanged
    with pytest.raises(Exception, match="cannot assign"):
        stream.feats = feats  # frozen
    with pytest.raises(ValueError, match=r"feats: expected \[5, D\]"):
        stream.replace(torch.zeros(4, DIM))
    with pytest.raises(
        ValueError, match=r"lengths: expected counts summing to the 5 rows of feats, got \[2, 2\]"
    ):
        TokenStream.from_lengths(feats, [2, 2], rope)
    with pytest.raises(ValueError, match="lengths: expected one or more non-negative ints"):
        TokenStream.from_lengths(feats, [6, -1], rope)
    with pytest.raises(TypeError, match=r"offsets: expected dtype int32 \(or int64\), got torch.float32"):
        TokenStream(feats, torch.tensor([0.0, 5.0]), rope)
    with pytest.raises(ValueError, match=r"offsets: expected shape \[B \+ 1\] with B >= 1, got \[1\]"):
        TokenStream(feats, torch.tensor([0]), rope)
    with pytest.raises(ValueError, match=r"feats: expected a tensor of tokens \[T, D\], got \[5\]"):
        TokenStream(feats[:, 0], _offsets([5]), rope)
    with pytest.raises(ValueError, match=r"rope: expected cos of shape \[5, head_dim\]"):
        TokenStream(feats, _offsets([5]), rope_frequencies(torch.zeros(4, 3), AXES))
    with pytest.raises(ValueError, match="rope: expected a pair"):
        TokenStream(feats, _offsets([5]), rope[0])
    with pytest.raises(ValueError, match="max_length: expected None or an int >= 0, got -1"):
        TokenStream(feats, _offsets([5]), rope, -1)
    with pytest.raises(TypeError, match="max_length: expected None or an int"):
        TokenStream(feats, _offsets([5]), rope, 2.5)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="dim divisible by num_heads"):
        MMDiTBlockConfig(dim=30, num_heads=4)
    block = DoubleStreamBlock(CONFIG)
    image, voxels, vec = _inputs([3, 2], [5, 4], seed=0)
    # RoPE axes summing to 12, not the head dim 16.
    wrong_axes = TokenStream(voxels.feats, voxels.offsets, rope_frequencies(torch.zeros(9, 3), (4, 4, 4)))
    with pytest.raises(ValueError, match=r"voxels.rope: expected cos of shape \[9, 16\]"):
        block(image, wrong_axes, vec)
    # Streams passed as bare tensors, or swapped with the vector.
    with pytest.raises(TypeError, match="image: expected a TokenStream, got Tensor"):
        block(image.feats, voxels, vec)
    with pytest.raises(TypeError, match="voxels: expected a TokenStream, got Tensor"):
        block(image, vec, voxels)
    # Mismatched batch sizes between modalities.
    one_sample = TokenStream(image.feats, _offsets([5]), image.rope)
    with pytest.raises(ValueError, match="same batch size, got 1 and 2"):
        block(one_sample, voxels, vec)
    with pytest.raises(
        ValueError, match=r"vec: expected one conditioning vector per sample, shape \[2, 32\]"
    ):
        block(image, voxels, vec[:1])
    # Offsets that do not add up to the tokens.
    short = TokenStream(voxels.feats, _offsets([5, 3]), voxels.rope)
    with pytest.raises(
        ValueError, match=r"voxels.offsets: expected offsets\[0\] == 0 and offsets\[-1\] == 9"
    ):
        block(image, short, vec)
    narrow = TokenStream(voxels.feats[:, :16], voxels.offsets, voxels.rope)
    with pytest.raises(ValueError, match=r"voxels: expected feats of shape \[T, 32\]"):
        block(image, narrow, vec)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("block_class", BLOCKS)
def test_cuda_matches_cpu_reference(block_class) -> None:
    """On CUDA, with uneven lengths and an empty image sample: float32 matches the CPU result and bf16
    autocast (the automatic attention backend) stays close to it."""
    block = _randomize(block_class(MMDiTBlockConfig(dim=128, num_heads=2)), seed=3)
    generator = torch.Generator().manual_seed(0)
    image_counts, voxel_counts = [64, 0, 100], [300, 17, 513]
    image_feats = torch.randn(sum(image_counts), 128, generator=generator)
    voxel_feats = torch.randn(sum(voxel_counts), 128, generator=generator)
    vec = torch.randn(3, 128, generator=generator)
    image_rope = rope_frequencies(torch.randn(len(image_feats), 3, generator=generator) * 8, (20, 22, 22))
    voxel_rope = rope_frequencies(
        torch.randint(0, 16, (len(voxel_feats), 3), generator=generator), (20, 22, 22)
    )
    image = TokenStream(image_feats, _offsets(image_counts), image_rope)
    voxels = TokenStream(voxel_feats, _offsets(voxel_counts), voxel_rope)

    def cuda(stream: TokenStream) -> TokenStream:
        return TokenStream(stream.feats.cuda(), stream.offsets.cuda(), tuple(t.cuda() for t in stream.rope))

    with torch.no_grad():
        reference = block(image, voxels, vec)
        cuda_block = block.cuda()
        full = cuda_block(cuda(image), cuda(voxels), vec.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = cuda_block(cuda(image), cuda(voxels), vec.cuda())
    for got, expected in zip(full, reference, strict=True):
        torch.testing.assert_close(got.feats.cpu(), expected.feats, atol=1e-3, rtol=1e-3)
    for got, expected in zip(low, reference, strict=True):
        assert (got.feats.float().cpu() - expected.feats).abs().max() / expected.feats.abs().max() < 5e-2
