"""The tiny prepared dataset shared by the recipe's end-to-end tests (train, stage 2, evaluate)."""

from __future__ import annotations

from pathlib import Path

from recipes.flux3d import features as prepare
from recipes.flux3d.shapes import generate_dataset

SIZE, VIEWS, COND, R = 32, 4, 4, 16
"""Image size (px), views, condition views and voxel resolution of the tiny dataset."""


def make_prepared_dataset(root: Path, heldout: int = 0) -> Path:
    """Three procedural training assets (32 px, 4 views, 4 condition views, R = 16) and ``heldout`` held-out
    ones (a disjoint seed stream), with rgb features and their statistics, in ``root``."""
    generate_dataset(
        root,
        3,
        heldout=heldout,
        seed=5,
        image_size=SIZE,
        num_views=VIEWS,
        num_cond_views=COND,
        voxel_resolution=R,
        progress=False,
    )
    prepare.main(["--root", str(root), "--extractor", "rgb", "--resolution", str(R), "--quiet"])
    return root
