"""Hypothesis strategies for sparse layouts: random, surface-like (shells), with empty samples."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from sparse3d import SparseTensor


def _shell(generator: torch.Generator, size: int) -> torch.Tensor:
    """Voxels of a random sphere shell inside a ``size^3`` grid: a surface-like layout."""
    centre = torch.rand(3, generator=generator) * size
    radius = 1.0 + torch.rand(1, generator=generator).item() * size / 2
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    distance = (grid - centre).norm(dim=-1)
    return (distance - radius).abs().le(math.sqrt(3) / 2).nonzero().int()


def _random(generator: torch.Generator, size: int, density: float) -> torch.Tensor:
    return (torch.rand(size, size, size, generator=generator) < density).nonzero().int()


@st.composite
def layouts(
    draw: st.DrawFn,
    *,
    max_batch: int = 4,
    max_size: int = 8,
    min_size: int = 2,
    allow_empty: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Per-sample coordinates ``[N_b, 3]`` (unique, canonical order) and the grid size.

    Samples are random clouds or sphere shells; some may be empty when ``allow_empty``.
    """
    batch = draw(st.integers(1, max_batch))
    size = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["random", "shell", "empty"] if allow_empty else ["random", "shell"]))
        if kind == "empty":
            samples.append(torch.zeros(0, 3, dtype=torch.int32))
        elif kind == "shell":
            samples.append(_shell(generator, size))
        else:
            samples.append(_random(generator, size, draw(st.floats(0.05, 0.6))))
    return samples, size


@st.composite
def sparse_tensors(
    draw: st.DrawFn,
    *,
    channels: int | None = None,
    dtype: torch.dtype = torch.float64,
    max_batch: int = 4,
    max_size: int = 8,
    min_size: int = 2,
    allow_empty: bool = True,
) -> SparseTensor:
    """A SparseTensor with random features over a random layout from `layouts`."""
    coords, size = draw(
        layouts(max_batch=max_batch, max_size=max_size, min_size=min_size, allow_empty=allow_empty)
    )
    c = channels if channels is not None else draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    feats = [torch.randn(x.shape[0], c, generator=generator, dtype=dtype) for x in coords]
    return SparseTensor.from_list(coords, feats, spatial_shape=size)
