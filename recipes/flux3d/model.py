"""SMDiT: the FLUX3D sparse-structure multimodal diffusion transformer, assembled from sparse3d blocks.

Voxel latents are grouped ``2 x 2 x 2`` by structured patchification, condition-image latents ``2 x 2``;
both become tokens of width ``dim``, positioned by MARoPE (voxels at their coarse (x, y, z), image patches on
a virtual plane outside the volume), and run through double-stream then single-stream MMDiT blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import sparse3d.functional as F
from sparse3d import SparseTensor
from sparse3d.nn import (
    DoubleStreamBlock,
    FinalLayer,
    MARoPE,
    MMDiTBlockConfig,
    SingleStreamBlock,
    TimestepEmbedding,
)

__all__ = ["SMDiTConfig", "SMDiT"]


@dataclass(frozen=True, kw_only=True)
class SMDiTConfig:
    """Hyperparameters of [`SMDiT`][recipes.flux3d.model.SMDiT] (paper size by default: 12 + 12 blocks,
    16 heads x 72, width 1152, ~820M parameters).

    Attributes:
        latent_channels: Channels ``C`` of the voxel latents (16 for DA-SLAT from the FLUX VAE).
        image_channels: Channels of the condition-image latent (16 for the FLUX VAE).
        dim: Token width.
        num_heads: Attention heads; ``dim / num_heads`` must equal ``sum(axes_dims)``.
        num_double_blocks: Double-stream blocks.
        num_single_blocks: Single-stream blocks.
        mlp_ratio: MLP hidden width over ``dim``.
        voxel_patch: Structured patchification factor ``f`` (tokens of ``f^3 C`` channels).
        image_patch: Image patch size ``p`` (tokens of ``p^2 C`` channels).
        axes_dims: Head-dim slice per RoPE axis (x, y, z).
        rope_theta: RoPE base.
        plane_position: MARoPE: coordinate of the virtual image plane along z (outside ``[0, Z)``).
    """

    latent_channels: int = 16
    image_channels: int = 16
    dim: int = 1152
    num_heads: int = 16
    num_double_blocks: int = 12
    num_single_blocks: int = 12
    mlp_ratio: float = 4.0
    voxel_patch: int = 2
    image_patch: int = 2
    axes_dims: tuple[int, int, int] = (24, 24, 24)
    rope_theta: float = 10000.0
    plane_position: float = -1.0


class SMDiT(nn.Module):
    """Velocity model ``v(x_t, t | image)`` over a sparse voxel layout.

    Args:
        config: Hyperparameters.
    """

    def __init__(self, config: SMDiTConfig) -> None:
        super().__init__()
        self.config = config
        block = MMDiTBlockConfig(dim=config.dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio)
        if sum(config.axes_dims) != block.head_dim:
            raise ValueError(
                f"axes_dims: expected to sum to dim / num_heads = {block.head_dim}, got {config.axes_dims}"
            )
        voxel_width = config.voxel_patch**3 * config.latent_channels
        image_width = config.image_patch**2 * config.image_channels
        self.latent_in = nn.Linear(voxel_width, config.dim)
        self.context_in = nn.Linear(image_width, config.dim)
        self.time_embed = TimestepEmbedding(config.dim)
        self.rope = MARoPE(
            axes_dims=config.axes_dims, theta=config.rope_theta, plane_position=config.plane_position
        )
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(block) for _ in range(config.num_double_blocks))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(block) for _ in range(config.num_single_blocks))
        self.final = FinalLayer(config.dim, voxel_width)

    def forward(self, x_t: SparseTensor, t: torch.Tensor, image: torch.Tensor) -> SparseTensor:
        """Predicts the velocity.

        Args:
            x_t: Noisy voxel latents, feats ``[N, C]``.
            t: Times ``[B]`` in ``[0, 1]`` (0 = data, 1 = noise).
            image: Condition-image latents ``[B, C_img, h, w]`` with ``h, w`` divisible by ``image_patch``.

        Returns:
            Velocity on ``x_t``'s layout, feats ``[N, C]``.
        """
        cfg = self.config
        batch, _, height, width = image.shape
        if batch != x_t.batch_size:
            raise ValueError(f"image: expected batch size {x_t.batch_size} (that of x_t), got {batch}")
        p = cfg.image_patch
        if height % p or width % p:
            raise ValueError(f"image: expected height and width divisible by {p}, got {height} x {width}")
        # Voxel tokens: one per occupied f^3 block.
        voxels, _ = F.patchify(x_t, cfg.voxel_patch)  # feats [M, f^3 C]
        latent = self.latent_in(voxels.feats)  # [M, D]
        # Image tokens: p x p patches, row-major, sample after sample.
        h, w = height // p, width // p
        patches = image.reshape(batch, -1, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
        context = self.context_in(patches.reshape(batch * h * w, -1))  # [B h w, D]
        context_offsets = torch.arange(batch + 1, device=image.device, dtype=torch.int32) * (h * w)
        vec = self.time_embed(t)  # [B, D]
        context_rope, latent_rope = self.rope(
            voxels.coords, image_shape=(h, w), grid_shape=voxels.spatial_shape, batch_size=batch
        )
        max_seqlen = (h * w, int(voxels.counts.max()))  # per-stream maxima: the one host sync of the forward
        for block in self.double_blocks:
            context, latent = block(
                context, context_offsets, latent, voxels.offsets, vec, context_rope, latent_rope,
                max_seqlen=max_seqlen,
            )  # fmt: skip
        for block in self.single_blocks:
            context, latent = block(
                context, context_offsets, latent, voxels.offsets, vec, context_rope, latent_rope,
                max_seqlen=max_seqlen,
            )  # fmt: skip
        out = self.final(latent, voxels.offsets, vec)  # [M, f^3 C]
        return F.unpatchify(voxels.replace(out), x_t)  # [N, C] on x_t's layout
