"""Evaluation of an assembled [`FLUX3DPipeline`][recipes.flux3d.pipeline.FLUX3DPipeline] on held-out assets
(generated from seeds never used in training): generation from each asset's condition view, reconstruction
(the decoder on the true latent) and the decoder on a zero input (the floor a decoder that ignores its input
reaches), scored against the asset's own renders; pictures, a PLY and a turntable of the first asset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from recipes.flux3d.data import AssetStore, open_assets, straight_to_float
from recipes.flux3d.engine import write_json
from recipes.flux3d.pipeline import FLUX3DPipeline
from sparse3d import SparseTensor
from sparse3d.gaussians import Gaussians, render, save_grid, save_ply
from sparse3d.gaussians.viz import save_turntable, to_uint8
from sparse3d.metrics import psnr, ssim

__all__ = ["EvalResult", "evaluate_pipeline", "render_views"]

WHITE = (1.0, 1.0, 1.0)


@dataclass
class EvalResult:
    """What [`evaluate_pipeline`][recipes.flux3d.evaluation.evaluate_pipeline] measured and wrote.

    Attributes:
        metrics: Means over assets (``generated_psnr``, ``reconstructed_psnr``, ``zero_input_psnr``, SSIMs,
            ``generated_psnr_input_view``) and the number of assets.
        per_asset: One dict per asset.
        files: Name -> path of every file written.
    """

    metrics: dict[str, Any]
    per_asset: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def render_views(gaussians: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, size: int) -> torch.Tensor:
    """Renders one sample on white, clamped: ``[V, 3, H, W]`` float32."""
    device = gaussians.means.device
    background = torch.tensor(WHITE, device=device)
    colours = render(
        gaussians.to(torch.float32), viewmats.to(device), Ks.to(device), size, size, background
    ).colors
    return colours.float().clamp(0, 1).permute(0, 3, 1, 2)  # [V, 3, H, W]


def _on_white(images: torch.Tensor) -> torch.Tensor:
    rgb, alpha = straight_to_float(images)
    return rgb + (1.0 - alpha)  # [V, 3, H, W]


def _scores(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    return float(psnr(pred, target.to(pred))), float(ssim(pred, target.to(pred)))


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None and math.isfinite(row[key])]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate_pipeline(
    pipe: FLUX3DPipeline,
    root: str | Path,
    out_dir: str | Path,
    *,
    feature: str | None = None,
    assets: int | None = None,
    views: int = 4,
    render_size: int = 256,
    cond_view: int = 0,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    turntable_frames: int = 24,
    store: AssetStore | None = None,
    progress: bool = True,
) -> EvalResult:
    """Scores the pipeline on the held-out split of a prepared dataset and writes pictures.

    For held-out asset ``i`` (noise seed ``seed + i``): the condition view ``cond_view`` and the true voxel
    layout go through the pipeline ("generated"); the true latent and a zero latent go through the decoder
    ("reconstructed", "zero input"). Each is rendered at the first ``views`` cameras of the asset's
    ``renders/`` on white and scored by PSNR / SSIM against those renders; the generated asset is also
    rendered from the condition view's own camera and scored against the condition image.

    Args:
        pipe: The pipeline.
        root: Prepared dataset folder.
        out_dir: Output folder: ``metrics.json``, ``grid.png``, ``grids/<i>.png``, ``sample.ply``,
            ``turntable.gif``.
        feature: ``features/<name>`` folder (default: the only one).
        assets: Evaluate the first ``assets`` held-out assets (``None``: all).
        views: Scored views per asset.
        render_size: Side of the scored renders.
        cond_view: Condition frame used as the input image.
        seed: Base noise seed.
        steps: Euler steps (default: the pipeline's).
        guidance: CFG scale (default: the pipeline's).
        turntable_frames: Frames of the first asset's turntable.
        store: An already opened held-out store (else opened here).
        progress: Progress bar over assets.

    Returns:
        An [`EvalResult`][recipes.flux3d.evaluation.EvalResult].
    """
    out_dir = Path(out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    if store is None:
        store = open_assets(
            root, feature, split="heldout", image_size=render_size, cond_image_size=pipe.image_size,
            min_views=views, progress=progress,
        )  # fmt: skip
    count = len(store) if assets is None else min(int(assets), len(store))
    if count < 1:
        raise ValueError(f"assets: expected >= 1 held-out assets to evaluate, got {count}")
    device = pipe.device
    rows: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    summary_rows = []
    for index in tqdm(range(count), desc="evaluate", disable=not progress):
        asset = store[index]
        frames = list(range(views))
        target = _on_white(asset.renders.rgba(frames))  # [V, 3, H, W]
        cond_rgba = asset.cond.rgba([cond_view])  # [1, 4, h, w]
        cond_rgb, _ = straight_to_float(cond_rgba)  # premultiplied, as in training
        coords = torch.cat([torch.zeros_like(asset.coords[:, :1]), asset.coords], dim=1)
        truth = SparseTensor(coords, asset.mean, spatial_shape=asset.resolution).to(device)
        generated = pipe(cond_rgb, truth, steps=steps, guidance=guidance, seed=seed + index, progress=False)
        reconstructed = pipe.decode(truth)
        zero = pipe.decode(truth.replace(torch.zeros_like(truth.feats)), normalized=True)
        viewmats, Ks = asset.renders.viewmats[frames], asset.renders.Ks[frames]
        images = {
            name: render_views(gaussians, viewmats, Ks, render_size)
            for name, gaussians in (
                ("generated", generated),
                ("reconstructed", reconstructed),
                ("zero_input", zero),
            )
        }
        row: dict[str, Any] = {"sha256": asset.sha256, "voxels": int(asset.coords.shape[0])}
        for name, image in images.items():
            row[f"{name}_psnr"], row[f"{name}_ssim"] = _scores(image, target)
        cond_size = int(cond_rgba.shape[-1])
        input_view = render_views(
            generated, asset.cond.viewmats[[cond_view]], asset.cond.Ks[[cond_view]], cond_size
        )
        row["generated_psnr_input_view"], row["generated_ssim_input_view"] = _scores(
            input_view, _on_white(cond_rgba)
        )
        rows.append(row)
        # Picture: condition view | ground truth views / reconstructed / generated.
        condition = torch.nn.functional.interpolate(_on_white(cond_rgba), size=(render_size, render_size))
        blank = torch.ones_like(condition)
        strip = [
            torch.cat([condition.cpu(), target.cpu()]),
            torch.cat([blank.cpu(), images["reconstructed"].cpu()]),
            torch.cat([blank.cpu(), images["generated"].cpu()]),
        ]
        grid = torch.cat(strip).permute(0, 2, 3, 1)  # [3 (V + 1), H, W, 3]
        path = out_dir / "grids" / f"{index:03d}_{asset.sha256[:12]}.png"
        save_grid(to_uint8(grid), path, columns=views + 1)
        if index < 4:
            summary_rows.append(grid)
        if index == 0:
            save_ply(out_dir / "sample.ply", generated.to(torch.float32).to("cpu"))
            files["ply"] = str(out_dir / "sample.ply")
            save_turntable(
                generated.to(torch.float32),
                out_dir / "turntable.gif",
                num_views=turntable_frames,
                image_size=render_size,
            )
            files["turntable"] = str(out_dir / "turntable.gif")
    save_grid(to_uint8(torch.cat(summary_rows)), out_dir / "grid.png", columns=views + 1)
    files["grid"] = str(out_dir / "grid.png")
    files["per_asset_grids"] = str(out_dir / "grids")
    keys = [key for key in rows[0] if key.endswith(("_psnr", "_ssim", "_input_view"))]
    metrics: dict[str, Any] = {key: _mean(rows, key) for key in keys}
    metrics.update(
        assets=len(rows),
        heldout_assets_available=len(store),
        views_per_asset=views,
        render_size=render_size,
        cond_view=cond_view,
        steps=pipe.sampling.steps if steps is None else steps,
        guidance=pipe.sampling.guidance if guidance is None else guidance,
        split="heldout",
    )
    files["metrics"] = str(out_dir / "metrics.json")
    write_json(out_dir / "metrics.json", {"metrics": metrics, "per_asset": rows, "files": files})
    return EvalResult(metrics=metrics, per_asset=rows, files=files)
