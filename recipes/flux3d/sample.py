"""Sample one asset end to end: SMDiT generates its voxel latent from a condition view (CFG Euler), the
Gaussian decoder turns it into Gaussians, written as a PLY, a turntable GIF and a PNG grid.

    python recipes/flux3d/sample.py --smdit out/proc/model.safetensors \\
        --decoder out/decoder/decoder.safetensors --data data/proc --asset 0 --steps 50 --guidance 3 \\
        --out out/sample

The voxel layout is the asset's (``features/<name>/<id>.npz``); the condition image is its condition view
``--view`` encoded as ``train.py`` did (extractor, pooling and resize from ``config.json`` next to the SMDiT
checkpoint). Writes ``gaussians.ply``, ``latent.npz`` (the generated latent in the features' npz format:
``indices``, ``mean``, ``resolution``), ``turntable.gif``, ``grid.png`` (rows: the asset's renders, the
decoded true ``mu``, the decoded sample) and ``sample.json`` (latent error and PSNRs against the renders).
Deterministic given ``--seed``. CPU by default; ``--device cuda`` for the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import load_file  # noqa: E402

import sparse3d.flow as flow  # noqa: E402
from recipes.flux3d.conditioning import ConditionEncoder, find_feature_folder  # noqa: E402
from recipes.flux3d.configs import TrainConfig  # noqa: E402
from recipes.flux3d.data import AssetDataset, list_assets  # noqa: E402
from recipes.flux3d.model import SMDiT, SMDiTConfig  # noqa: E402
from recipes.flux3d.prepare import build_extractor  # noqa: E402
from recipes.flux3d.train_decoder import (  # noqa: E402
    BACKGROUNDS,
    asset_volume,
    load_decoder,
    load_target_views,
    psnr,
    render_views,
)
from sparse3d import SparseTensor  # noqa: E402
from sparse3d.gaussians import save_grid, save_ply, save_turntable  # noqa: E402
from sparse3d.gaussians.viz import to_uint8  # noqa: E402
from sparse3d.geometry import read_transforms  # noqa: E402

__all__ = ["load_smdit", "generate_latent", "sample", "main"]


def load_smdit(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[SMDiT, TrainConfig, dict]:
    """Loads an SMDiT checkpoint written by ``train.py`` with its ``config.json``.

    Args:
        checkpoint: ``model.safetensors``; ``config.json`` (``{"train_config", "data"}``) must sit beside it.
        device: Device of the model.

    Returns:
        ``(model in eval mode, its TrainConfig, the data options: feature, extractor, pool, image_size)``;
        the data options are ``{}`` for a run without ``--data``.

    Raises:
        FileNotFoundError: The checkpoint or its ``config.json`` is missing.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"smdit: expected an SMDiT checkpoint file (model.safetensors from train.py), got {checkpoint} "
            f"(no such file)"
        )
    config_path = checkpoint.with_name("config.json")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"smdit: expected its config {config_path} next to {checkpoint.name} (written by train.py), got "
            f"no such file; re-run train.py to write it"
        )
    saved = json.loads(config_path.read_text())
    values = dict(saved["train_config"])
    model_values = dict(values.pop("model"))
    model_values["axes_dims"] = tuple(model_values["axes_dims"])
    config = TrainConfig(model=SMDiTConfig(**model_values), **values)
    model = SMDiT(config.model)
    model.load_state_dict(load_file(checkpoint), strict=True)
    return model.to(device).eval(), config, saved.get("data") or {}


@torch.no_grad()
def generate_latent(
    model: SMDiT,
    layout: SparseTensor,
    image: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    progress: bool = True,
) -> SparseTensor:
    """Generates a voxel latent on a given layout by CFG Euler sampling from ``t = 1`` (noise) to 0.

    Guidance: ``v = v_u + w (v_c - v_u)`` with ``v_u`` conditioned on a zero image.

    Args:
        model: The SMDiT.
        layout: SparseTensor whose coords give the voxels (feats ``[N, C]`` unused, only shape and dtype).
        image: Encoded condition image ``[B, C_img, h, w]``.
        steps: Euler steps.
        guidance: ``w``.
        generator: CPU generator of the initial noise (same noise on every device).
        progress: Show a progress bar.

    Returns:
        SparseTensor on ``layout``'s layout with feats ``[N, C]``.
    """
    velocity = flow.ClassifierFreeGuidance(
        model, guidance, condition={"image": image}, null_condition={"image": torch.zeros_like(image)}
    )
    times = flow.time_grid(steps, device=layout.device)
    return flow.generate(velocity, layout, times, generator=generator, progress=progress).sample


def _asset_item(root: Path, feature: str, asset: int, view: int, image_size: int | None):
    """The asset's item (features and condition view ``view``) by index into ``list_assets`` order."""
    assets = list_assets(root, [f"feature_{feature}"])
    if not 0 <= asset < len(assets):
        raise ValueError(
            f"asset: expected an index in [0, {len(assets)}) of the assets in {root}, got {asset}"
        )
    dataset = AssetDataset(root, feature, cond_views=view + 1, image_size=image_size, assets=[assets[asset]])
    item = dataset[0]
    if item is None:
        raise ValueError(f"asset: asset {asset} ({assets[asset]}) is unreadable: {dataset.skipped}")
    return item


def sample(
    smdit_path: str | Path,
    decoder_path: str | Path,
    root: str | Path,
    asset: int,
    out_dir: Path,
    *,
    steps: int = 50,
    guidance: float = 3.0,
    view: int = 0,
    seed: int = 0,
    weights: str | None = None,
    turntable_views: int = 24,
    render_size: int = 128,
    grid_views: int = 4,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Generates, decodes and writes one asset (see the module docstring).

    Args:
        smdit_path: SMDiT ``model.safetensors`` (``config.json`` beside it).
        decoder_path: ``decoder.safetensors`` (``decoder.json`` beside it).
        root: Prepared dataset folder.
        asset: Index of the asset in the dataset's order.
        out_dir: Output folder.
        steps: Euler steps.
        guidance: CFG scale ``w``.
        view: Condition view index.
        seed: Seed of the initial noise.
        weights: Local extractor weights (VAE / DINOv2 features).
        turntable_views: Frames of the turntable GIF.
        render_size: Side of the turntable frames.
        grid_views: Renders of the asset shown in the grid (its first views, at their stored size).
        backend: Renderer backend.
        device: Device of the models.
        progress: Show the sampler's progress bar.

    Returns:
        The summary written to ``sample.json``.
    """
    device = torch.device(device)
    root = Path(root)
    model, config, data_options = load_smdit(smdit_path, device)
    decoder, decoder_data = load_decoder(decoder_path, device)
    if not data_options:
        raise ValueError(
            f"smdit: {smdit_path} was trained without --data (toy latents); sample.py needs a model "
            f"trained on a prepared dataset"
        )
    feature = find_feature_folder(root, data_options["feature"])
    in_channels = decoder.config.transformer.in_channels
    if in_channels != config.model.latent_channels:
        raise ValueError(
            f"decoder: expected {config.model.latent_channels} input channels (the SMDiT's latent channels), "
            f"got {in_channels}"
        )
    item = _asset_item(root, feature, asset, view, data_options.get("image_size"))
    if item.mean.shape[1] != in_channels or item.resolution != decoder.config.head.resolution:
        resolution = decoder.config.head.resolution
        raise ValueError(
            f"data: expected features with {in_channels} channels at resolution {resolution} "
            f"(the models'), got {item.mean.shape[1]} at {item.resolution} in features/{feature}"
        )
    encoder = ConditionEncoder(
        build_extractor(data_options["extractor"], weights, pool=data_options.get("pool", 1), device=device),
        config.model.image_patch,
    )
    image = encoder(item.cond_images[view : view + 1].to(device))  # [1, C_img, h, w]
    coords, mean = asset_volume(item, noisy=False)  # [N, 4], [N, C]
    truth = SparseTensor(coords, mean, batch_size=1, spatial_shape=item.resolution).to(device)
    latent = generate_latent(
        model,
        truth,
        image,
        steps=steps,
        guidance=guidance,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
    )
    background = torch.tensor(BACKGROUNDS["white"])
    frames = len(read_transforms(root / "renders" / item.sha256 / "transforms.json"))
    targets = load_target_views(root, item.sha256, list(range(min(grid_views, frames))), background)
    with torch.no_grad():
        gaussians, generated = render_views(decoder, latent, [targets], backend)
        _, reference = render_views(decoder, truth, [targets], backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_ply(out_dir / "gaussians.ply", gaussians)
    np.savez(
        out_dir / "latent.npz",
        indices=latent.coords[:, 1:].cpu().numpy(),
        mean=latent.feats.float().cpu().numpy(),
        resolution=np.int64(item.resolution),
    )
    save_turntable(
        gaussians,
        out_dir / "turntable.gif",
        num_views=turntable_views,
        image_size=render_size,
        backend=backend,
    )
    rows = torch.cat([targets.images, reference[0].cpu(), generated[0].cpu()])  # [3 V, H, W, 3]
    save_grid(to_uint8(rows), out_dir / "grid.png", columns=targets.images.shape[0])
    summary = {
        "asset": asset,
        "sha256": item.sha256,
        "view": view,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "device": str(device),
        "voxels": int(coords.shape[0]),
        "gaussians_per_voxel": decoder.config.head.num_gaussians,
        "num_gaussians": gaussians.num_gaussians,
        "latent_mse": float((latent.feats - truth.feats).square().mean()),
        "latent_mean_square": float(truth.feats.square().mean()),
        "psnr_generated": psnr(generated[0].cpu(), targets.images),
        "psnr_decoded_mu": psnr(reference[0].cpu(), targets.images),
        "smdit": {
            "checkpoint": str(smdit_path),
            "model": dataclasses.asdict(config.model),
            "data": data_options,
        },
        "decoder": {"checkpoint": str(decoder_path), "data": decoder_data},
    }
    (out_dir / "sample.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring); returns the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smdit", type=Path, required=True, help="SMDiT model.safetensors from train.py")
    parser.add_argument(
        "--decoder", type=Path, required=True, help="decoder.safetensors from train_decoder.py"
    )
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--asset", type=int, required=True, help="asset index in the dataset's order")
    parser.add_argument("--view", type=int, default=0, help="condition view index")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale w in v_u + w (v_c - v_u)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights", default=None, help="local weights of the flux-vae/sdxl-vae/dinov2 extractor"
    )
    parser.add_argument("--turntable-views", type=int, default=24)
    parser.add_argument("--render-size", type=int, default=128, help="side of the turntable frames")
    parser.add_argument("--grid-views", type=int, default=4)
    parser.add_argument("--backend", choices=["auto", "torch", "gsplat"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("out/sample"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    summary = sample(
        args.smdit,
        args.decoder,
        args.data,
        args.asset,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
        view=args.view,
        seed=args.seed,
        weights=args.weights,
        turntable_views=args.turntable_views,
        render_size=args.render_size,
        grid_views=args.grid_views,
        backend=args.backend,
        device=args.device,
    )
    print(json.dumps({k: v for k, v in summary.items() if k not in ("smdit", "decoder")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
