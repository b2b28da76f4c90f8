"""MMDiT blocks over packed variable-length batches of two modalities (condition-image tokens, voxel tokens):
AdaLN-Zero modulation, FLUX-style double-stream and single-stream blocks, and the final AdaLN layer.

Each modality is a [`TokenStream`][sparse3d.nn.tokens.TokenStream]. The blocks take and return
``(image, voxels)``: the condition-image tokens are diffusers' ``encoder_hidden_states`` (FLUX's text /
context stream, first in the joint sequence) and the voxel tokens its ``hidden_states`` (FLUX's image
latents).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sparse3d.functional.attention import _validated_max, joint_attention
from sparse3d.functional.norm import _compute_dtype
from sparse3d.functional.rope import apply_rope, check_rope_tables
from sparse3d.nn.tokens import TokenStream

__all__ = [
    "AdaLNModulation",
    "DoubleStreamBlock",
    "FinalLayer",
    "MMDiTBlockConfig",
    "QKRMSNorm",
    "SingleStreamBlock",
    "batch_index_from_offsets",
]


@dataclass(frozen=True, kw_only=True)
class MMDiTBlockConfig:
    """Configuration of a [`DoubleStreamBlock`][sparse3d.nn.mmdit.DoubleStreamBlock] or
    [`SingleStreamBlock`][sparse3d.nn.mmdit.SingleStreamBlock].

    Attributes:
        dim: Token width ``D`` (both modalities).
        num_heads: Attention heads ``H``; ``D`` must be divisible by it (head dim ``D / H``).
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        norm_eps: Epsilon of the (affine-free) LayerNorms.
        qk_norm_eps: Epsilon of the query/key RMSNorms.
        attention_backend: Passed to
            [`joint_attention`][sparse3d.functional.attention.joint_attention] (``None``: automatic).
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    qk_norm_eps: float = 1e-6
    attention_backend: str | None = None

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_heads <= 0 or self.dim % self.num_heads:
            raise ValueError(
                f"dim, num_heads: expected positive with dim divisible by num_heads, "
                f"got dim={self.dim}, num_heads={self.num_heads}"
            )
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim / num_heads: expected an even head dim (RoPE pairs), got {self.head_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        """Per-head width ``D / H``."""
        return self.dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """MLP hidden width ``int(D * mlp_ratio)``."""
        return int(self.dim * self.mlp_ratio)


def batch_index_from_offsets(offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sample index of every token of a packed batch, without a host sync.

    Args:
        offsets: Integer offsets ``[B + 1]`` (first row of each sample, then the total).
        num_tokens: Total number of tokens ``T`` (must equal ``offsets[-1]``).

    Returns:
        int64 batch index ``[T]``.
    """
    counts = (offsets[1:] - offsets[:-1]).long()  # [B]
    samples = torch.arange(counts.shape[0], device=offsets.device)  # [B]
    return torch.repeat_interleave(samples, counts, output_size=num_tokens)  # [T]


def _check_streams(
    config: MMDiTBlockConfig, image: TokenStream, voxels: TokenStream, vec: torch.Tensor
) -> tuple[TokenStream, TokenStream]:
    """Checks shared by the blocks; returns the two streams with their ``max_length`` known.

    Shapes are checked without a host sync. Unless both streams carry ``max_length`` (then their offsets
    are trusted), the offsets' values are checked with one host sync, which also yields both maxima.
    """
    for name, stream in (("image", image), ("voxels", voxels)):
        if not isinstance(stream, TokenStream):
            raise TypeError(f"{name}: expected a TokenStream, got {type(stream).__name__}")
        if stream.feats.shape[1] != config.dim:
            raise ValueError(
                f"{name}: expected feats of shape [T, {config.dim}], got {list(stream.feats.shape)}"
            )
        check_rope_tables(stream.rope, stream.num_tokens, config.head_dim, name=f"{name}.rope")
    if image.batch_size != voxels.batch_size:
        raise ValueError(
            f"image, voxels: expected the same batch size, got {image.batch_size} and {voxels.batch_size}"
        )
    batch_size = voxels.batch_size
    if not isinstance(vec, torch.Tensor) or vec.dim() != 2 or tuple(vec.shape) != (batch_size, config.dim):
        shape = list(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
        raise ValueError(
            f"vec: expected one conditioning vector per sample, shape [{batch_size}, {config.dim}], "
            f"got {shape}"
        )
    if image.max_length is not None and voxels.max_length is not None:
        return image, voxels
    image_max, voxel_max = _validated_max(
        [
            ("image.offsets", image.offsets, image.num_tokens, "image.feats"),
            ("voxels.offsets", voxels.offsets, voxels.num_tokens, "voxels.feats"),
        ]
    )  # the one host sync
    return (
        dataclasses.replace(image, max_length=image_max),
        dataclasses.replace(voxels, max_length=voxel_max),
    )


def _modulate(
    normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch_index: torch.Tensor
) -> torch.Tensor:
    """``normed * (1 + scale) + shift`` with the per-sample vectors ``[B, D]`` gathered per token."""
    return normed * (1 + scale.index_select(0, batch_index)) + shift.index_select(0, batch_index)


def _gated(
    residual: torch.Tensor, gate: torch.Tensor, update: torch.Tensor, batch_index: torch.Tensor
) -> torch.Tensor:
    """``residual + gate * update`` with the per-sample gate ``[B, D]`` gathered per token."""
    return residual + gate.index_select(0, batch_index) * update


class AdaLNModulation(nn.Module):
    """AdaLN-Zero modulation: ``Linear(SiLU(vec))`` split into ``num_vectors`` vectors ``[B, D]``.

    Args:
        dim: Width ``D`` of the conditioning vector and of each output vector.
        num_vectors: Number of output vectors (6 for a double-stream branch, 3 single, 2 final).
    """

    def __init__(self, dim: int, num_vectors: int) -> None:
        super().__init__()
        self.num_vectors = num_vectors
        self.activation = nn.SiLU()
        self.linear = nn.Linear(dim, num_vectors * dim)
        # AdaLN-Zero (DiT): the projection starts at zero, so every shift, scale and gate is 0 and each
        # block starts as the identity map. (FLUX itself does not zero-init; loaded weights replace this.)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Computes the modulation vectors.

        Args:
            vec: Conditioning vectors ``[B, D]``.

        Returns:
            ``num_vectors`` tensors ``[B, D]``, in the order of the linear layer's output chunks.
        """
        hidden = self.linear(self.activation(vec))  # [B, num_vectors * D]
        return hidden.chunk(self.num_vectors, dim=1)


class QKRMSNorm(nn.Module):
    """RMSNorm over the head dimension, with a learned weight, computed in the wider of the input's dtype
    and float32 (float32 for bf16/fp16, float64 for float64).

    Args:
        head_dim: Normalised width ``D``.
        eps: Added to the mean square.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises ``x [..., D]``; the result has the dtype of ``x``."""
        compute = _compute_dtype(x.dtype)
        wide = x.to(compute)
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute)).to(x.dtype)


def _mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear - GELU(tanh) - Linear."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class DoubleStreamBlock(nn.Module):
    """FLUX/MMDiT double-stream block: separate weights per modality, one joint attention.

    Per sample, attention runs over that sample's image tokens followed by its voxel tokens (FLUX's
    ``cat([encoder_hidden_states, hidden_states])`` order), with no padding across samples. Each stream
    ``s`` (``image`` or ``voxel``) computes:

        shift1, scale1, gate1, shift2, scale2, gate2 = s_modulation(vec)       # 6 x [B, D]
        q, k, v = s_qkv(LN(x_s) * (1 + scale1) + shift1)                       # [T_s, H, D/H] each
        q, k = RoPE(s_query_norm(q)), RoPE(s_key_norm(k))
        a_image, a_voxel = joint_attention(...)
        x_s = x_s + gate1 * s_attn_out(a_s)
        x_s = x_s + gate2 * s_mlp(LN(x_s) * (1 + scale2) + shift2)

    The ``image_*`` weights are those diffusers' ``FluxTransformerBlock`` applies to
    ``encoder_hidden_states`` (``norm1_context``, ``add_q_proj``, ``ff_context``, ...), the ``voxel_*``
    weights those it applies to ``hidden_states``; see
    [`load_flux_double_block`][sparse3d.compat.flux.load_flux_double_block].

    Args:
        config: Block configuration.

    Examples:
        >>> from sparse3d.functional.rope import rope_frequencies
        >>> block = DoubleStreamBlock(MMDiTBlockConfig(dim=32, num_heads=2))
        >>> image_rope = rope_frequencies(torch.randn(8, 3), (4, 6, 6))  # ids of the image patches
        >>> voxel_rope = rope_frequencies(torch.randint(0, 4, (5, 3)), (4, 6, 6))  # voxel (x, y, z)
        >>> image = TokenStream.from_lengths(torch.randn(8, 32), [4, 4], image_rope)
        >>> voxels = TokenStream.from_lengths(torch.randn(5, 32), [2, 3], voxel_rope)
        >>> image, voxels = block(image, voxels, torch.randn(2, 32))
        >>> image.feats.shape, voxels.feats.shape
        (torch.Size([8, 32]), torch.Size([5, 32]))
    """

    def __init__(self, config: MMDiTBlockConfig) -> None:
        super().__init__()
        self.config = config
        dim, head_dim = config.dim, config.head_dim
        self.image_modulation = AdaLNModulation(dim, 6)
        self.voxel_modulation = AdaLNModulation(dim, 6)
        self.image_attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.voxel_attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.image_qkv = nn.Linear(dim, 3 * dim)
        self.voxel_qkv = nn.Linear(dim, 3 * dim)
        self.image_query_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.image_key_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.voxel_query_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.voxel_key_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.image_attn_out = nn.Linear(dim, dim)
        self.voxel_attn_out = nn.Linear(dim, dim)
        self.image_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.voxel_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.image_mlp = _mlp(dim, config.mlp_hidden_dim)
        self.voxel_mlp = _mlp(dim, config.mlp_hidden_dim)

    def forward(
        self, image: TokenStream, voxels: TokenStream, vec: torch.Tensor
    ) -> tuple[TokenStream, TokenStream]:
        """Runs the block on a packed batch.

        Args:
            image: Condition-image tokens ``[Ti, D]`` with RoPE tables ``[Ti, D / H]`` (diffusers'
                ``encoder_hidden_states``: FLUX's text / context stream).
            voxels: Voxel tokens ``[Tv, D]`` with RoPE tables ``[Tv, D / H]``, the same ``B`` (diffusers'
                ``hidden_states``).
            vec: Conditioning vector per sample ``[B, D]`` (e.g. the timestep embedding; diffusers' ``temb``).

        Returns:
            ``(image, voxels)``: the updated streams (same offsets and tables, feats ``[Ti, D]`` and
            ``[Tv, D]``), carrying both ``max_length`` values, so the next block skips the offsets check.

        Raises:
            TypeError: ``image`` or ``voxels`` is not a TokenStream.
            ValueError: Widths, RoPE tables, batch sizes, ``vec`` or the offsets do not fit.
        """
        cfg = self.config
        image, voxels = _check_streams(cfg, image, voxels, vec)
        image_tokens, voxel_tokens = image.feats, voxels.feats  # [Ti, D], [Tv, D]
        image_index = batch_index_from_offsets(image.offsets, image.num_tokens)  # [Ti]
        voxel_index = batch_index_from_offsets(voxels.offsets, voxels.num_tokens)  # [Tv]
        (
            image_shift_attn,
            image_scale_attn,
            image_gate_attn,
            image_shift_mlp,
            image_scale_mlp,
            image_gate_mlp,
        ) = self.image_modulation(vec)  # 6 x [B, D]
        (
            voxel_shift_attn,
            voxel_scale_attn,
            voxel_gate_attn,
            voxel_shift_mlp,
            voxel_scale_mlp,
            voxel_gate_mlp,
        ) = self.voxel_modulation(vec)  # 6 x [B, D]

        image_normed = _modulate(
            self.image_attn_norm(image_tokens), image_shift_attn, image_scale_attn, image_index
        )
        voxel_normed = _modulate(
            self.voxel_attn_norm(voxel_tokens), voxel_shift_attn, voxel_scale_attn, voxel_index
        )
        image_qkv = self.image_qkv(image_normed).unflatten(-1, (3, cfg.num_heads, cfg.head_dim))
        voxel_qkv = self.voxel_qkv(voxel_normed).unflatten(-1, (3, cfg.num_heads, cfg.head_dim))
        image_query, image_key, image_value = image_qkv.unbind(1)  # [Ti, H, D/H] each
        voxel_query, voxel_key, voxel_value = voxel_qkv.unbind(1)  # [Tv, H, D/H] each
        image_query = apply_rope(self.image_query_norm(image_query), *image.rope)
        image_key = apply_rope(self.image_key_norm(image_key), *image.rope)
        voxel_query = apply_rope(self.voxel_query_norm(voxel_query), *voxels.rope)
        voxel_key = apply_rope(self.voxel_key_norm(voxel_key), *voxels.rope)
        image_attn, voxel_attn = joint_attention(
            image_query,
            image_key,
            image_value,
            image.offsets,
            voxel_query,
            voxel_key,
            voxel_value,
            voxels.offsets,
            backend=cfg.attention_backend,
            max_seqlen=(image.max_length, voxels.max_length),
        )  # [Ti, H, D/H], [Tv, H, D/H]

        image_tokens = _gated(
            image_tokens, image_gate_attn, self.image_attn_out(image_attn.flatten(1)), image_index
        )
        image_normed = _modulate(
            self.image_mlp_norm(image_tokens), image_shift_mlp, image_scale_mlp, image_index
        )
        image_tokens = _gated(image_tokens, image_gate_mlp, self.image_mlp(image_normed), image_index)

        voxel_tokens = _gated(
            voxel_tokens, voxel_gate_attn, self.voxel_attn_out(voxel_attn.flatten(1)), voxel_index
        )
        voxel_normed = _modulate(
            self.voxel_mlp_norm(voxel_tokens), voxel_shift_mlp, voxel_scale_mlp, voxel_index
        )
        voxel_tokens = _gated(voxel_tokens, voxel_gate_mlp, self.voxel_mlp(voxel_normed), voxel_index)
        return image.replace(image_tokens), voxels.replace(voxel_tokens)


class SingleStreamBlock(nn.Module):
    """FLUX/MMDiT single-stream block: shared weights, parallel attention and MLP, one gate.

    Both modalities go through the same layers; attention is joint per sample (image tokens first, as
    diffusers' ``FluxSingleTransformerBlock`` sees ``cat([encoder_hidden_states, hidden_states])``):

        shift, scale, gate = modulation(vec)                                   # 3 x [B, D]
        h = LN(x) * (1 + scale) + shift
        q, k, v, m = linear_in(h)                     # fused: [T, 3 D + mlp_hidden]
        a = joint_attention(RoPE(RMSNorm_q(q)), RoPE(RMSNorm_k(k)), v)
        x = x + gate * linear_out(cat([a, GELU_tanh(m)]))                      # fused output projection

    Args:
        config: Block configuration.
    """

    def __init__(self, config: MMDiTBlockConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.modulation = AdaLNModulation(dim, 3)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.linear_in = nn.Linear(dim, 3 * dim + config.mlp_hidden_dim)
        self.query_norm = QKRMSNorm(config.head_dim, config.qk_norm_eps)
        self.key_norm = QKRMSNorm(config.head_dim, config.qk_norm_eps)
        self.mlp_activation = nn.GELU(approximate="tanh")
        self.linear_out = nn.Linear(dim + config.mlp_hidden_dim, dim)

    def forward(
        self, image: TokenStream, voxels: TokenStream, vec: torch.Tensor
    ) -> tuple[TokenStream, TokenStream]:
        """Runs the block on a packed batch.

        Args:
            image: Condition-image tokens ``[Ti, D]`` with RoPE tables ``[Ti, D / H]`` (diffusers'
                ``encoder_hidden_states``: FLUX's text / context stream).
            voxels: Voxel tokens ``[Tv, D]`` with RoPE tables ``[Tv, D / H]``, the same ``B`` (diffusers'
                ``hidden_states``).
            vec: Conditioning vector per sample ``[B, D]`` (e.g. the timestep embedding; diffusers' ``temb``).

        Returns:
            ``(image, voxels)``: the updated streams (same offsets and tables, feats ``[Ti, D]`` and
            ``[Tv, D]``), carrying both ``max_length`` values, so the next block skips the offsets check.

        Raises:
            TypeError: ``image`` or ``voxels`` is not a TokenStream.
            ValueError: Widths, RoPE tables, batch sizes, ``vec`` or the offsets do not fit.
        """
        cfg = self.config
        image, voxels = _check_streams(cfg, image, voxels, vec)
        num_image = image.num_tokens
        image_index = batch_index_from_offsets(image.offsets, num_image)  # [Ti]
        voxel_index = batch_index_from_offsets(voxels.offsets, voxels.num_tokens)  # [Tv]
        # Token-wise layers run on both streams at once (stream-major order; attention restores samples).
        tokens = torch.cat([image.feats, voxels.feats])  # [Ti + Tv, D]
        token_index = torch.cat([image_index, voxel_index])  # [Ti + Tv]
        rope_cos = torch.cat([image.rope[0], voxels.rope[0]])  # [Ti + Tv, D/H]
        rope_sin = torch.cat([image.rope[1], voxels.rope[1]])  # [Ti + Tv, D/H]

        shift, scale, gate = self.modulation(vec)  # 3 x [B, D]
        normed = _modulate(self.pre_norm(tokens), shift, scale, token_index)  # [Ti + Tv, D]
        qkv, mlp_hidden = self.linear_in(normed).split([3 * cfg.dim, cfg.mlp_hidden_dim], dim=-1)
        query, key, value = qkv.unflatten(-1, (3, cfg.num_heads, cfg.head_dim)).unbind(1)  # [Ti+Tv, H, D/H]
        query = apply_rope(self.query_norm(query), rope_cos, rope_sin)
        key = apply_rope(self.key_norm(key), rope_cos, rope_sin)
        image_attn, voxel_attn = joint_attention(
            query[:num_image],
            key[:num_image],
            value[:num_image],
            image.offsets,
            query[num_image:],
            key[num_image:],
            value[num_image:],
            voxels.offsets,
            backend=cfg.attention_backend,
            max_seqlen=(image.max_length, voxels.max_length),
        )  # [Ti, H, D/H], [Tv, H, D/H]
        attn = torch.cat([image_attn, voxel_attn]).flatten(1)  # [Ti + Tv, D]
        mlp_hidden = self.mlp_activation(mlp_hidden)  # [Ti + Tv, mlp_hidden]
        update = self.linear_out(torch.cat([attn, mlp_hidden], dim=-1))  # [Ti + Tv, D]
        tokens = _gated(tokens, gate, update, token_index)
        return image.replace(tokens[:num_image]), voxels.replace(tokens[num_image:])


class FinalLayer(nn.Module):
    """Final AdaLN-continuous norm and linear projection: ``Linear(LN(x) * (1 + scale) + shift)``.

    The modulation's chunks are ``(shift, scale)`` (BFL / DiT order; diffusers stores ``(scale, shift)``
    and [`load_flux_final_layer`][sparse3d.compat.flux.load_flux_final_layer] swaps them).

    Args:
        dim: Token width ``D``.
        out_channels: Output width ``C``.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, out_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.modulation = AdaLNModulation(dim, 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(dim, out_channels)
        # Zero-init output projection (DiT): the model predicts 0 at init.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """Projects tokens.

        Args:
            tokens: Tokens ``[T, D]`` of a packed batch.
            offsets: Integer offsets ``[B + 1]``.
            vec: Conditioning vector per sample ``[B, D]``.

        Returns:
            Outputs ``[T, C]``.
        """
        if tokens.dim() != 2 or offsets.dim() != 1 or vec.dim() != 2 or vec.shape[0] != offsets.shape[0] - 1:
            raise ValueError(
                f"tokens, offsets, vec: expected [T, D], [B + 1], [B, D], got {list(tokens.shape)}, "
                f"{list(offsets.shape)}, {list(vec.shape)}"
            )
        batch_index = batch_index_from_offsets(offsets, tokens.shape[0])  # [T]
        shift, scale = self.modulation(vec)  # 2 x [B, D]
        return self.linear(_modulate(self.norm(tokens), shift, scale, batch_index))  # [T, C]
