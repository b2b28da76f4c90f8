"""Reading a user's inputs for the pipeline (a condition image, a voxel layout, or a held-out asset) and
writing one sample's outputs (PLY, turntable, picture)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from recipes.flux3d.data import (
    load_features,
    open_assets,
    positions_to_coords,
    read_voxel_ply,
    straight_to_float,
)
from recipes.flux3d.pipeline import FLUX3DPipeline
from sparse3d import SparseTensor
from sparse3d.gaussians import save_grid, save_ply
from sparse3d.gaussians.viz import save_turntable, to_uint8

__all__ = ["load_condition_image", "load_layout", "heldout_input", "sample_to_folder"]


def load_condition_image(path: str | Path, size: int) -> torch.Tensor:
    """Loads a condition image as premultiplied RGB ``[3, size, size]`` in ``[0, 1]`` (black background).

    An RGBA image is premultiplied by its alpha; an RGB image is taken as already on black. A square image of
    another side is resized to ``size`` (the side the pipeline was trained at), with a note.

    Raises:
        ValueError: Not a square RGB/RGBA image (names the file, the mode and the size).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image: expected an image file, got {path} (no such file)")
    with Image.open(path) as image:
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(
                f"--image: expected an RGB or RGBA image, got mode {image.mode!r} in {path} "
                "(convert it first)"
            )
        if image.width != image.height:
            raise ValueError(
                f"--image: expected a square image, got {image.width} x {image.height} in {path}"
            )
        if image.width != size:
            print(f"note: --image is {image.width} px; resized to {size} px, the pipeline's", file=sys.stderr)
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    rgba = torch.from_numpy(array.copy()).permute(2, 0, 1)  # [4, H, W]
    return straight_to_float(rgba)[0]  # [3, H, W]


def load_layout(path: str | Path, resolution: int) -> SparseTensor:
    """Reads a voxel layout: a TRELLIS voxel PLY (positions in ``[-0.5, 0.5]^3``) or a features npz.

    Raises:
        ValueError: Another grid resolution than the pipeline's, or an unreadable file (names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--layout: expected a .ply or .npz file, got {path} (no such file)")
    if path.suffix == ".ply":
        coords = positions_to_coords(read_voxel_ply(path), resolution)
    elif path.suffix == ".npz":
        coords, _, _, stored = load_features(path, default_resolution=resolution)
        if stored != resolution:
            raise ValueError(
                f"--layout: expected a {resolution}^3 grid (the pipeline's), got {stored}^3 in {path}"
            )
    else:
        raise ValueError(f"--layout: expected a .ply or .npz file, got {path}")
    coords = torch.cat([torch.zeros_like(coords[:, :1]), coords.int()], dim=1)
    return SparseTensor(coords, torch.zeros(coords.shape[0], 1), spatial_shape=resolution)


def heldout_input(
    root: str | Path, asset: int, view: int, pipe: FLUX3DPipeline
) -> tuple[torch.Tensor, SparseTensor]:
    """Held-out asset ``asset``'s condition view ``view`` (premultiplied ``[3, H, W]``) and voxel layout."""
    store = open_assets(root, split="heldout", renders=False, cond_image_size=pipe.image_size, progress=False)
    if not 0 <= asset < len(store):
        raise ValueError(f"--asset: expected a held-out asset index in [0, {len(store)}), got {asset}")
    opened = store[asset]
    if not 0 <= view < len(opened.cond):
        raise ValueError(f"--view: expected a condition view in [0, {len(opened.cond)}), got {view}")
    image = straight_to_float(opened.cond.rgba([view]))[0][0]
    coords = torch.cat([torch.zeros_like(opened.coords[:, :1]), opened.coords], dim=1)
    return image, SparseTensor(coords, torch.zeros(coords.shape[0], 1), spatial_shape=opened.resolution)


def sample_to_folder(
    pipe: FLUX3DPipeline,
    image: torch.Tensor,
    layout: SparseTensor,
    out: str | Path,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    size: int = 256,
    frames: int = 24,
) -> dict[str, str]:
    """Runs the pipeline once and writes ``gaussians.ply``, ``turntable.gif`` and ``grid.png`` into
    ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gaussians = pipe(image, layout, steps=steps, guidance=guidance, seed=seed).to(torch.float32)
    save_ply(out / "gaussians.ply", gaussians.to("cpu"))
    views = save_turntable(gaussians, out / "turntable.gif", num_views=frames, image_size=size)
    picked = views[:: max(1, frames // 4)][:4]  # four views around the object
    condition = torch.nn.functional.interpolate(image[None].float(), size=(size, size))[0]  # [3, H, W]
    condition = to_uint8(condition.permute(1, 2, 0))[None]
    save_grid(np.concatenate([condition, picked]), out / "grid.png", columns=5)
    return {
        "ply": str(out / "gaussians.ply"),
        "turntable": str(out / "turntable.gif"),
        "grid": str(out / "grid.png"),
    }
