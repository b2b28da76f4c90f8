"""MMDiT blocks over packed variable-length batches of two modalities (condition tokens, voxel tokens):
AdaLN-Zero modulation, FLUX-style double-stream and single-stream blocks, and the final AdaLN layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse3d.functional.attention import joint_attention
from sparse3d.functional.rope import apply_rope, check_rope_tables

__all__ = [
    "AdaLNModulation",
    "DoubleStreamBlock",
    "FinalLayer",
    "MMDiTBlockConfig",
    "QKRMSNorm",
    "SingleStreamBlock",
    "batch_index_from_offsets",
]

RopeTables = tuple[torch.Tensor, torch.Tensor]


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


def _check_inputs(
    config: MMDiTBlockConfig,
    context: torch.Tensor,
    context_offsets: torch.Tensor,
    latent: torch.Tensor,
    latent_offsets: torch.Tensor,
    vec: torch.Tensor,
    context_rope: RopeTables,
    latent_rope: RopeTables,
    max_seqlen: int | tuple[int, int] | None,
) -> int:
    """Checks shared by the blocks; returns the longest joint sequence.

    Shapes are checked without a host sync. Unless ``max_seqlen`` is given (then the offsets are trusted),
    the offsets' values are checked with one host sync, which also yields ``max_seqlen``.
    """
    for name, tokens in (("context", context), ("latent", latent)):
        if tokens.dim() != 2 or tokens.shape[1] != config.dim:
            raise ValueError(f"{name}: expected tokens of shape [T, {config.dim}], got {list(tokens.shape)}")
    for name, offsets in (("context_offsets", context_offsets), ("latent_offsets", latent_offsets)):
        if offsets.dim() != 1 or offsets.shape[0] < 2 or offsets.dtype.is_floating_point:
            raise ValueError(
                f"{name}: expected integer offsets of shape [B + 1] with B >= 1, "
                f"got {offsets.dtype} {list(offsets.shape)}"
            )
    if context_offsets.shape[0] != latent_offsets.shape[0]:
        raise ValueError(
            f"context_offsets, latent_offsets: expected the same batch size, got "
            f"{context_offsets.shape[0] - 1} and {latent_offsets.shape[0] - 1}"
        )
    batch_size = latent_offsets.shape[0] - 1
    if vec.dim() != 2 or tuple(vec.shape) != (batch_size, config.dim):
        raise ValueError(
            f"vec: expected one conditioning vector per sample, shape [{batch_size}, {config.dim}], "
            f"got {list(vec.shape)}"
        )
    check_rope_tables(context_rope, context.shape[0], config.head_dim, name="context_rope")
    check_rope_tables(latent_rope, latent.shape[0], config.head_dim, name="latent_rope")
    if max_seqlen is not None:
        return max_seqlen
    context_lengths = context_offsets.diff().long()  # [B]
    latent_lengths = latent_offsets.diff().long()  # [B]
    stats = torch.stack(
        [
            context_offsets[0].long(),
            context_offsets[-1].long(),
            latent_offsets[0].long(),
            latent_offsets[-1].long(),
            torch.minimum(context_lengths.min(), latent_lengths.min()),
            context_lengths.max(),
            latent_lengths.max(),
        ]
    ).tolist()  # the one host sync
    for name, first, last, rows in (
        ("context_offsets", stats[0], stats[1], context.shape[0]),
        ("latent_offsets", stats[2], stats[3], latent.shape[0]),
    ):
        if first != 0 or last != rows:
            raise ValueError(
                f"{name}: expected offsets[0] == 0 and offsets[-1] == {rows}, got {first} and {last}"
            )
    if stats[4] < 0:
        raise ValueError(
            f"context_offsets, latent_offsets: expected non-decreasing offsets, got a step {stats[4]}"
        )
    return int(stats[5]), int(stats[6])  # per-modality maxima: joint_attention spots equal lengths


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
    """RMSNorm over the head dimension, with a learned weight, computed in float32.

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
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear - GELU(tanh) - Linear."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class DoubleStreamBlock(nn.Module):
    """FLUX/MMDiT double-stream block: separate weights per modality, one joint attention.

    Per sample, attention runs over that sample's context tokens followed by its latent tokens (FLUX's
    ``cat([context, x])`` order), with no padding across samples. Each stream ``s`` computes:

        shift1, scale1, gate1, shift2, scale2, gate2 = modulation_s(vec)      # 6 x [B, D]
        q, k, v = qkv_s(LN(x_s) * (1 + scale1) + shift1)                       # [T_s, H, D/H] each
        q, k = RoPE(RMSNorm_q(q)), RoPE(RMSNorm_k(k))
        a_context, a_latent = joint_attention(...)
        x_s = x_s + gate1 * attn_out_s(a_s)
        x_s = x_s + gate2 * mlp_s(LN(x_s) * (1 + scale2) + shift2)

    Args:
        config: Block configuration.
    """

    def __init__(self, config: MMDiTBlockConfig) -> None:
        super().__init__()
        self.config = config
        dim, head_dim = config.dim, config.head_dim
        self.context_modulation = AdaLNModulation(dim, 6)
        self.latent_modulation = AdaLNModulation(dim, 6)
        self.context_attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.latent_attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.context_qkv = nn.Linear(dim, 3 * dim)
        self.latent_qkv = nn.Linear(dim, 3 * dim)
        self.context_query_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.context_key_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.latent_query_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.latent_key_norm = QKRMSNorm(head_dim, config.qk_norm_eps)
        self.context_attn_out = nn.Linear(dim, dim)
        self.latent_attn_out = nn.Linear(dim, dim)
        self.context_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.latent_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.context_mlp = _mlp(dim, config.mlp_hidden_dim)
        self.latent_mlp = _mlp(dim, config.mlp_hidden_dim)

    def forward(
        self,
        context: torch.Tensor,
        context_offsets: torch.Tensor,
        latent: torch.Tensor,
        latent_offsets: torch.Tensor,
        vec: torch.Tensor,
        context_rope: RopeTables,
        latent_rope: RopeTables,
        *,
        max_seqlen: int | tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the block on a packed batch.

        Args:
            context: Condition tokens ``[Tc, D]``, samples contiguous and in order.
            context_offsets: Integer offsets ``[B + 1]`` of ``context``.
            latent: Latent (voxel) tokens ``[Tl, D]``.
            latent_offsets: Integer offsets ``[B + 1]`` of ``latent`` (same ``B``).
            vec: Conditioning vector per sample ``[B, D]`` (e.g. the timestep embedding).
            context_rope: ``(cos, sin)`` tables ``[Tc, D / H]`` in ``context`` order.
            latent_rope: ``(cos, sin)`` tables ``[Tl, D / H]`` in ``latent`` order.
            max_seqlen: Longest joint sequence ``max_b (Tc_b + Tl_b)`` (an upper bound is fine), or the
                longest sample of each stream ``(max_b Tc_b, max_b Tl_b)``, which also lets equal-length
                batches skip the token permutation. Passing it skips the one host sync that validates the
                offsets (they are then trusted).

        Returns:
            ``(context, latent)``: updated tokens ``[Tc, D]`` and ``[Tl, D]``.
        """
        cfg = self.config
        max_seqlen = _check_inputs(
            cfg, context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope, max_seqlen
        )
        context_index = batch_index_from_offsets(context_offsets, context.shape[0])  # [Tc]
        latent_index = batch_index_from_offsets(latent_offsets, latent.shape[0])  # [Tl]
        (
            context_shift_attn,
            context_scale_attn,
            context_gate_attn,
            context_shift_mlp,
            context_scale_mlp,
            context_gate_mlp,
        ) = self.context_modulation(vec)  # 6 x [B, D]
        (
            latent_shift_attn,
            latent_scale_attn,
            latent_gate_attn,
            latent_shift_mlp,
            latent_scale_mlp,
            latent_gate_mlp,
        ) = self.latent_modulation(vec)  # 6 x [B, D]

        context_normed = _modulate(
            self.context_attn_norm(context), context_shift_attn, context_scale_attn, context_index
        )
        latent_normed = _modulate(
            self.latent_attn_norm(latent), latent_shift_attn, latent_scale_attn, latent_index
        )
        context_qkv = self.context_qkv(context_normed).unflatten(-1, (3, cfg.num_heads, cfg.head_dim))
        latent_qkv = self.latent_qkv(latent_normed).unflatten(-1, (3, cfg.num_heads, cfg.head_dim))
        context_query, context_key, context_value = context_qkv.unbind(1)  # [Tc, H, D/H] each
        latent_query, latent_key, latent_value = latent_qkv.unbind(1)  # [Tl, H, D/H] each
        context_query = apply_rope(self.context_query_norm(context_query), *context_rope)
        context_key = apply_rope(self.context_key_norm(context_key), *context_rope)
        latent_query = apply_rope(self.latent_query_norm(latent_query), *latent_rope)
        latent_key = apply_rope(self.latent_key_norm(latent_key), *latent_rope)
        context_attn, latent_attn = joint_attention(
            context_query,
            context_key,
            context_value,
            context_offsets,
            latent_query,
            latent_key,
            latent_value,
            latent_offsets,
            backend=cfg.attention_backend,
            max_seqlen=max_seqlen,
        )  # [Tc, H, D/H], [Tl, H, D/H]

        context = _gated(
            context, context_gate_attn, self.context_attn_out(context_attn.flatten(1)), context_index
        )
        context_normed = _modulate(
            self.context_mlp_norm(context), context_shift_mlp, context_scale_mlp, context_index
        )
        context = _gated(context, context_gate_mlp, self.context_mlp(context_normed), context_index)

        latent = _gated(latent, latent_gate_attn, self.latent_attn_out(latent_attn.flatten(1)), latent_index)
        latent_normed = _modulate(
            self.latent_mlp_norm(latent), latent_shift_mlp, latent_scale_mlp, latent_index
        )
        latent = _gated(latent, latent_gate_mlp, self.latent_mlp(latent_normed), latent_index)
        return context, latent


class SingleStreamBlock(nn.Module):
    """FLUX/MMDiT single-stream block: shared weights, parallel attention and MLP, one gate.

    Both modalities go through the same layers; attention is joint per sample (context first):

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
        self,
        context: torch.Tensor,
        context_offsets: torch.Tensor,
        latent: torch.Tensor,
        latent_offsets: torch.Tensor,
        vec: torch.Tensor,
        context_rope: RopeTables,
        latent_rope: RopeTables,
        *,
        max_seqlen: int | tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the block on a packed batch.

        Args:
            context: Condition tokens ``[Tc, D]``, samples contiguous and in order.
            context_offsets: Integer offsets ``[B + 1]`` of ``context``.
            latent: Latent (voxel) tokens ``[Tl, D]``.
            latent_offsets: Integer offsets ``[B + 1]`` of ``latent`` (same ``B``).
            vec: Conditioning vector per sample ``[B, D]``.
            context_rope: ``(cos, sin)`` tables ``[Tc, D / H]`` in ``context`` order.
            latent_rope: ``(cos, sin)`` tables ``[Tl, D / H]`` in ``latent`` order.
            max_seqlen: Longest joint sequence ``max_b (Tc_b + Tl_b)`` (an upper bound is fine), or the
                longest sample of each stream ``(max_b Tc_b, max_b Tl_b)``, which also lets equal-length
                batches skip the token permutation. Passing it skips the one host sync that validates the
                offsets (they are then trusted).

        Returns:
            ``(context, latent)``: updated tokens ``[Tc, D]`` and ``[Tl, D]``.
        """
        cfg = self.config
        max_seqlen = _check_inputs(
            cfg, context, context_offsets, latent, latent_offsets, vec, context_rope, latent_rope, max_seqlen
        )
        num_context = context.shape[0]
        context_index = batch_index_from_offsets(context_offsets, num_context)  # [Tc]
        latent_index = batch_index_from_offsets(latent_offsets, latent.shape[0])  # [Tl]
        # Token-wise layers run on both streams at once (stream-major order; attention restores samples).
        tokens = torch.cat([context, latent])  # [Tc + Tl, D]
        token_index = torch.cat([context_index, latent_index])  # [Tc + Tl]
        rope_cos = torch.cat([context_rope[0], latent_rope[0]])  # [Tc + Tl, D/H]
        rope_sin = torch.cat([context_rope[1], latent_rope[1]])  # [Tc + Tl, D/H]

        shift, scale, gate = self.modulation(vec)  # 3 x [B, D]
        normed = _modulate(self.pre_norm(tokens), shift, scale, token_index)  # [Tc + Tl, D]
        qkv, mlp_hidden = self.linear_in(normed).split([3 * cfg.dim, cfg.mlp_hidden_dim], dim=-1)
        query, key, value = qkv.unflatten(-1, (3, cfg.num_heads, cfg.head_dim)).unbind(1)  # [Tc+Tl, H, D/H]
        query = apply_rope(self.query_norm(query), rope_cos, rope_sin)
        key = apply_rope(self.key_norm(key), rope_cos, rope_sin)
        context_attn, latent_attn = joint_attention(
            query[:num_context],
            key[:num_context],
            value[:num_context],
            context_offsets,
            query[num_context:],
            key[num_context:],
            value[num_context:],
            latent_offsets,
            backend=cfg.attention_backend,
            max_seqlen=max_seqlen,
        )  # [Tc, H, D/H], [Tl, H, D/H]
        attn = torch.cat([context_attn, latent_attn]).flatten(1)  # [Tc + Tl, D]
        mlp_hidden = self.mlp_activation(mlp_hidden)  # [Tc + Tl, mlp_hidden]
        update = self.linear_out(torch.cat([attn, mlp_hidden], dim=-1))  # [Tc + Tl, D]
        tokens = _gated(tokens, gate, update, token_index)
        return tokens[:num_context], tokens[num_context:]


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
