"""SMDiT: the FLUX3D sparse-structure multimodal diffusion transformer, assembled from sparse3d blocks.

Voxel latents are grouped ``2 x 2 x 2`` by structured patchification, condition-image latents ``2 x 2``;
both become tokens of width ``dim``, positioned by MARoPE (voxels at their coarse (x, y, z), image patches on
a virtual plane outside the volume), and run through double-stream then single-stream MMDiT blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    TokenStream,
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

    def forward(
        self, x_t: SparseTensor, t: torch.Tensor, image: torch.Tensor | Sequence[torch.Tensor]
    ) -> SparseTensor:
        """Predicts the velocity.

        Args:
            x_t: Noisy voxel latents, feats ``[N, C]``.
            t: Times ``[B]`` in ``[0, 1]`` (0 = data, 1 = noise).
            image: Condition-image latents ``[B, C_img, h, w]``, or one ``[C_img, h_b, w_b]`` per sample
                (condition images of different sizes), with heights and widths divisible by
                ``image_patch``.

        Returns:
            Velocity on ``x_t``'s layout, feats ``[N, C]``.
        """
        cfg = self.config
        batch = x_t.batch_size
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[0] != batch:
                raise ValueError(
                    f"image: expected [B, C_img, h, w] with batch size B = {batch} (that of x_t), got "
                    f"{list(image.shape)}"
                )
            groups = [image]  # one group of B images of one size
        else:
            groups = [one[None] for one in image]  # B groups of one image each: [1, C_img, h_b, w_b]
            if len(groups) != batch or any(group.dim() != 4 for group in groups):
                shapes = [list(one.shape) for one in image]
                raise ValueError(
                    f"image: expected {batch} tensors [C_img, h_b, w_b] (one per sample of x_t), got {shapes}"
                )
        p = cfg.image_patch
        # Image tokens: p x p patches, row-major, sample after sample.
        patch_rows, patch_grids = [], []
        for group in groups:
            count, _, height, width = group.shape
            if height % p or width % p:
                raise ValueError(f"image: expected height and width divisible by {p}, got {height} x {width}")
            h, w = height // p, width // p
            patches = group.reshape(count, -1, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # [n, h, w, p, p, C]
            patch_rows.append(patches.reshape(count * h * w, -1))  # [n h w, p p C]
            patch_grids += [(h, w)] * count
        context = self.context_in(torch.cat(patch_rows))  # [sum_b h_b w_b, D]
        # Voxel tokens: one per occupied f^3 block.
        voxels, _ = F.patchify(x_t, cfg.voxel_patch)  # feats [M, f^3 C]
        latent = self.latent_in(voxels.feats)  # [M, D]
        vec = self.time_embed(t)  # [B, D]
        image_rope, voxel_rope = self.rope(
            voxels.coords,
            image_shape=patch_grids,
            grid_shape=voxels.spatial_shape,
            dtype=torch.promote_types(latent.dtype, torch.float32),
        )
        image_stream = TokenStream.from_lengths(context, [h * w for h, w in patch_grids], image_rope)
        # The longest voxel sample is the one host sync of the forward; the blocks then trust the offsets.
        voxel_stream = TokenStream(latent, voxels.offsets, voxel_rope, int(voxels.counts.max()))
        for block in self.double_blocks:
            image_stream, voxel_stream = block(image_stream, voxel_stream, vec)
        for block in self.single_blocks:
            image_stream, voxel_stream = block(image_stream, voxel_stream, vec)
        out = self.final(voxel_stream.feats, voxel_stream.offsets, vec)  # [M, f^3 C]
        return F.unpatchify(voxels.replace(out), x_t)  # [N, C] on x_t's layout
