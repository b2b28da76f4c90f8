"""Procedural stand-ins for DA-SLAT volumes and condition-image latents, generated in memory.

Used by the debug preset and the README's default run: no weights, no data set, no download. Each asset is
a random shape (sphere shell, box shell or torus) on a ``resolution^3`` grid whose voxels carry smooth,
shape-dependent features; its "condition image latent" is the orthographic projection of those features
along +z, so the condition really determines the target and a model can learn the mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse3d import SparseTensor

__all__ = ["ToyBatch", "toy_shape", "toy_batch"]


@dataclass(frozen=True)
class ToyBatch:
    """One batch of procedural training data.

    Attributes:
        latents: Target volumes, a SparseTensor with feats ``[N, C]``.
        images: Condition-image latents ``[B, C, R, R]`` (channels first, like a VAE latent).
    """

    latents: SparseTensor
    images: torch.Tensor


def toy_shape(kind: str, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Surface voxels of a random shape.

    Args:
        kind: ``"sphere"``, ``"box"`` or ``"torus"``.
        resolution: Grid size ``R``.
        generator: Source of randomness.

    Returns:
        int32 tensor ``[N, 3]`` of unique (x, y, z) in canonical order.
    """
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution - 0.5
    p = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # [R, R, R, 3]
    centre = (torch.rand(3, generator=generator) - 0.5) * 0.2
    size = 0.25 + 0.15 * torch.rand(3, generator=generator)
    q = p - centre
    if kind == "sphere":
        distance = q.norm(dim=-1) - size[0]
    elif kind == "box":
        distance = (q.abs() - size).clamp(min=0).norm(dim=-1) + (q.abs() - size).amax(dim=-1).clamp(max=0)
    elif kind == "torus":
        ring = torch.stack([q[..., :2].norm(dim=-1) - size[0], q[..., 2]], dim=-1)
        distance = ring.norm(dim=-1) - 0.4 * size[1]
    else:
        raise ValueError(f"kind: expected 'sphere', 'box' or 'torus', got {kind!r}")
    shell = distance.abs() <= math.sqrt(3) / (2 * resolution)
    return shell.nonzero().int()


def toy_batch(
    batch_size: int, resolution: int = 16, channels: int = 8, *, generator: torch.Generator
) -> ToyBatch:
    """A batch of procedural assets with matching condition-image latents.

    Voxel features are ``sin`` waves of the voxel position with random frequencies and phases per channel
    (per asset), so each asset has its own "texture"; the image is the mean of the features along z.

    Args:
        batch_size: Number of assets ``B``.
        resolution: Grid size ``R`` (the image latent is ``R x R``).
        channels: Feature channels ``C``.
        generator: Source of randomness (the batch is a pure function of its state).

    Returns:
        A `ToyBatch`.
    """
    coords, feats, images = [], [], []
    kinds = ("sphere", "box", "torus")
    for _ in range(batch_size):
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
        xyz = toy_shape(kind, resolution, generator)
        position = (xyz.float() + 0.5) / resolution  # [N, 3] in (0, 1)
        frequency = 1.0 + 3.0 * torch.rand(3, channels, generator=generator)
        phase = 2 * math.pi * torch.rand(channels, generator=generator)
        f = torch.sin(2 * math.pi * position @ frequency + phase)  # [N, C]
        dense = torch.zeros(channels, resolution, resolution, resolution)
        dense[:, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = f.T
        hits = torch.zeros(resolution, resolution, resolution)
        hits[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = 1.0
        image = dense.sum(dim=-1) / hits.sum(dim=-1).clamp(min=1)  # [C, R, R]
        coords.append(xyz)
        feats.append(f)
        images.append(image)
    latents = SparseTensor.from_list(coords, feats, spatial_shape=resolution)
    return ToyBatch(latents=latents, images=torch.stack(images))
