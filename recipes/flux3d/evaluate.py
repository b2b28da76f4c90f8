"""Evaluate generated assets against ground truth: SMDiT samples and decoded ground-truth latents, rendered
and scored with ``sparse3d.metrics`` (PSNR/SSIM/LPIPS, CLIP score, FD/KD).

    python recipes/flux3d/evaluate.py --smdit out/proc/model.safetensors \\
        --decoder out/decoder/decoder.safetensors --data data/proc --views 4 --image-size 512 \\
        --dinov2 weights/dinov2-vitl14 --clip weights/clip-vit-l14 --out out/eval

For each evaluated asset (default: the held-out one, i.e. the last readable asset, as ``train.py`` and
``train_decoder.py`` hold it out; ``--assets N`` the last ``N`` readable assets; ``--assets all`` every one)
the SMDiT generates a latent on the asset's voxel layout from its condition view ``--view`` (CFG Euler, noise
seeded by ``--seed + asset index``); the decoder turns it into Gaussians ("generated"), and also decodes the
asset's ground-truth DA-SLAT ``mu`` ("reconstructed", the decoder's upper bound). Both are rendered:

- at the asset's own ``renders/`` cameras (white background): PSNR, SSIM and (with ``--lpips``) LPIPS
  against the dataset's renders;
- at the protocol cameras (TRELLIS-style: ``--views`` 4 or 8 yaws from 0 degrees, pitch 30 degrees,
  radius 2, FoV 40 degrees, ``--image-size`` pixels, white background): CLIP score (with ``--clip``)
  ``100 cos(CLIP(condition), CLIP(render))`` averaged over views, the condition view composited on
  white; FD/KD (with ``--dinov2`` and/or ``--clip``) over all assets between the generated renders and the
  reconstructed renders (the "real" side).

Writes ``metrics.json`` (per-asset values, means, FD/KD, and the metrics skipped with the reason) and
``grids/<index>_<sha256>.png`` (top row: condition view, generated protocol renders; bottom row: blank,
reconstructed protocol renders). Nothing is downloaded: a metric whose weights are not given is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

from recipes.flux3d.conditioning import ConditionEncoder, find_feature_folder  # noqa: E402
from recipes.flux3d.data import AssetDataset, AssetItem  # noqa: E402
from recipes.flux3d.prepare import build_extractor  # noqa: E402
from recipes.flux3d.sample import generate_latent, load_smdit  # noqa: E402
from recipes.flux3d.train_decoder import BACKGROUNDS, asset_volume, load_decoder, load_target_views  # noqa: E402
from sparse3d import SparseTensor  # noqa: E402
from sparse3d.gaussians import GaussianDecoder, Gaussians, render, save_grid  # noqa: E402
from sparse3d.gaussians.viz import to_uint8  # noqa: E402
from sparse3d.geometry.cameras import orbit_angles, sphere_cameras  # noqa: E402
from sparse3d.metrics import (  # noqa: E402
    CLIPImageEmbedding,
    DINOv2Embedding,
    FeatureDistances,
    LPIPSMetric,
    clip_score,
    psnr,
    ssim,
)

__all__ = ["protocol_cameras", "decode", "render_images", "select_assets", "evaluate", "main"]

PROTOCOL_PITCH_DEGREES = 30.0
"""Camera elevation of the protocol views."""
PROTOCOL_RADIUS = 2.0
"""Camera distance from the origin of the protocol views."""
PROTOCOL_FOV_DEGREES = 40.0
"""Horizontal field of view of the protocol views."""


def protocol_cameras(num_views: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation cameras: ``num_views`` yaws evenly spaced from 0, pitch 30 deg, radius 2, FoV 40 deg.

    Args:
        num_views: Views on the orbit (4 gives yaw 0/90/180/270 degrees, 8 gives 45 degree steps).
        image_size: Square image side in pixels.

    Returns:
        ``(viewmats [V, 4, 4], Ks [V, 3, 3])`` float32 on the CPU (OpenCV world-to-camera, pixel intrinsics).
    """
    if num_views < 1:
        raise ValueError(f"views: expected >= 1, got {num_views}")
    if image_size < 1:
        raise ValueError(f"image_size: expected >= 1, got {image_size}")
    yaw, pitch = orbit_angles(num_views, math.radians(PROTOCOL_PITCH_DEGREES))  # [V], [V]
    return sphere_cameras(
        yaw, pitch, radius=PROTOCOL_RADIUS, fov=math.radians(PROTOCOL_FOV_DEGREES), image_size=image_size
    )


@torch.no_grad()
def decode(decoder: GaussianDecoder, volume: SparseTensor) -> Gaussians:
    """Decodes one voxel latent into Gaussians (bf16 autocast on CUDA, as ``train_decoder.render_views``).

    Args:
        decoder: The Gaussian decoder.
        volume: SparseTensor with one sample, feats ``[N, C]``.

    Returns:
        Gaussians of the sample.
    """
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=volume.device.type == "cuda"):
        return decoder(volume)


@torch.no_grad()
def render_images(
    gaussians: Gaussians,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Renders one sample and returns channels-first images clamped to ``[0, 1]`` for the metrics.

    Args:
        gaussians: One sample.
        viewmats: ``[V, 4, 4]`` world-to-camera matrices.
        Ks: ``[V, 3, 3]`` intrinsics.
        width: Image width.
        height: Image height.
        background: ``[3]`` colour.
        backend: Renderer backend (``"auto"``: gsplat on CUDA, the torch reference otherwise).

    Returns:
        ``[V, 3, H, W]`` float32 images on the Gaussians' device.
    """
    device = gaussians.means.device
    colors = render(
        gaussians,
        viewmats.to(device),
        Ks.to(device),
        int(width),
        int(height),
        background.to(device),
        backend=backend,
    ).colors  # [V, H, W, 3]
    return colors.float().clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()  # [V, 3, H, W]


def select_assets(dataset: AssetDataset, assets: str) -> list[tuple[int, AssetItem]]:
    """The readable assets to evaluate, in dataset order.

    Args:
        dataset: The reader (its unreadable items are ``None`` and recorded in ``dataset.skipped``).
        assets: ``"heldout"`` (the last readable asset, as the train scripts hold it out), ``"all"``, or a
            positive integer ``N`` as a string (the last ``N`` readable assets).

    Returns:
        ``[(dataset index, item)]``.

    Raises:
        ValueError: A malformed ``assets`` or no readable asset.
    """
    if assets == "heldout":
        count = 1
    elif assets == "all":
        count = len(dataset)
    else:
        try:
            count = int(assets)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"assets: expected 'heldout', 'all' or a positive integer, got {assets!r}")
    chosen: list[tuple[int, AssetItem]] = []
    for index in range(len(dataset) - 1, -1, -1):
        if len(chosen) == count:
            break
        item = dataset[index]
        if item is not None:
            chosen.append((index, item))
    if not chosen:
        raise ValueError(
            f"data: expected at least one readable asset in {dataset.root}, got none; "
            f"skipped: {dataset.skipped}"
        )
    return chosen[::-1]


def _condition_on_white(item: AssetItem, view: int) -> torch.Tensor:
    """Condition view ``view`` composited on white, ``[1, 3, H, W]`` (the reader's RGB is premultiplied)."""
    image = item.cond_images[view : view + 1]  # [1, 3, H, W]
    if item.cond_alpha is None:
        return image.clamp(0.0, 1.0)
    return (image + (1.0 - item.cond_alpha[view : view + 1])).clamp(0.0, 1.0)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def evaluate(
    smdit_path: str | Path,
    decoder_path: str | Path,
    root: str | Path,
    out_dir: str | Path,
    *,
    assets: str = "heldout",
    views: int = 4,
    image_size: int = 512,
    steps: int = 50,
    guidance: float = 3.0,
    view: int = 0,
    seed: int = 0,
    weights: str | None = None,
    dinov2: str | Path | None = None,
    clip: str | Path | None = None,
    lpips: list[str | Path] | None = None,
    lpips_net: str = "vgg",
    backend: str = "auto",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Generates, decodes, renders and scores assets (see the module docstring).

    Args:
        smdit_path: SMDiT ``model.safetensors`` (``config.json`` beside it).
        decoder_path: ``decoder.safetensors`` (``decoder.json`` beside it).
        root: Prepared dataset folder.
        out_dir: Output folder (``metrics.json``, ``grids/``).
        assets: ``"heldout"``, ``"all"`` or ``"N"`` (see
            [`select_assets`][recipes.flux3d.evaluate.select_assets]).
        views: Protocol views per asset (4 or 8).
        image_size: Side of the protocol renders.
        steps: Euler steps.
        guidance: CFG scale ``w`` in ``v_u + w (v_c - v_u)``.
        view: Condition view index.
        seed: Base seed; asset ``i`` uses noise seeded by ``seed + i``; KD subsets use ``seed``.
        weights: Local weights of the condition extractor (VAE / DINOv2 features).
        dinov2: Local DINOv2 folder for FD/KD (``None``: skipped).
        clip: Local CLIP folder for the CLIP score and FD/KD (``None``: skipped).
        lpips: Local LPIPS weight files (``None``: LPIPS skipped).
        lpips_net: LPIPS trunk, ``"vgg"`` or ``"alex"``.
        backend: Renderer backend.
        device: Device of the models.
        progress: Show the progress bar over assets.

    Returns:
        The summary written to ``metrics.json``.
    """
    if views not in (4, 8):
        raise ValueError(f"views: expected 4 or 8 (the TRELLIS-style protocol), got {views}")
    device = torch.device(device)
    root, out_dir = Path(root), Path(out_dir)
    model, config, data_options = load_smdit(smdit_path, device)
    decoder, decoder_data = load_decoder(decoder_path, device)
    if not data_options:
        raise ValueError(
            f"smdit: {smdit_path} was trained without --data (toy latents); evaluate.py needs a model "
            f"trained on a prepared dataset"
        )
    in_channels = decoder.config.transformer.in_channels
    if in_channels != config.model.latent_channels:
        raise ValueError(
            f"decoder: expected {config.model.latent_channels} input channels (the SMDiT's latent channels), "
            f"got {in_channels}"
        )
    feature = find_feature_folder(root, data_options["feature"])
    dataset = AssetDataset(root, feature, cond_views=view + 1, image_size=data_options.get("image_size"))
    chosen = select_assets(dataset, assets)
    encoder = ConditionEncoder(
        build_extractor(data_options["extractor"], weights, pool=data_options.get("pool", 1), device=device),
        config.model.image_patch,
    )

    skipped: dict[str, str] = {}
    lpips_metric = None
    if lpips:
        lpips_metric = LPIPSMetric.from_pretrained([str(p) for p in lpips], net=lpips_net).to(device)
    else:
        skipped["lpips"] = "no --lpips weights given"
    clip_embedding = None
    if clip is not None:
        clip_embedding = CLIPImageEmbedding.from_pretrained(clip).to(device)
    else:
        skipped["clip_score"] = "no --clip weights given"
    distances: dict[str, FeatureDistances] = {}
    for name, path, loader in (("dinov2", dinov2, DINOv2Embedding), ("clip", clip, CLIPImageEmbedding)):
        if path is None:
            skipped[f"fd_kd_{name}"] = f"no --{name} weights given"
        elif name == "clip":
            distances[name] = FeatureDistances(clip_embedding)
        else:
            distances[name] = FeatureDistances(loader.from_pretrained(path).to(device))

    white = torch.tensor(BACKGROUNDS["white"])
    protocol_viewmats, protocol_Ks = protocol_cameras(views, image_size)
    grids_dir = out_dir / "grids"
    grids_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, item in tqdm(chosen, desc="evaluate", unit="asset", disable=not progress):
        if (
            item.mean is None
            or item.mean.shape[1] != in_channels
            or item.resolution != decoder.config.head.resolution
        ):
            got = None if item.mean is None else item.mean.shape[1]
            raise ValueError(
                f"data: expected features with {in_channels} channels at resolution "
                f"{decoder.config.head.resolution} (the models'), got {got} at {item.resolution} "
                f"for {item.sha256}"
            )
        if item.cond_images is None or item.cond_images.shape[0] <= view:
            raise ValueError(
                f"view: expected a condition view index < the asset's condition views, got {view}"
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
            generator=torch.Generator().manual_seed(seed + index),
            progress=False,
        )
        gaussians = {"generated": decode(decoder, latent), "reconstructed": decode(decoder, truth)}

        targets = load_target_views(root, item.sha256, None, white)
        target_images = targets.images.permute(0, 3, 1, 2).to(device)  # [V_d, 3, H, W]
        height, width = targets.images.shape[1:3]
        condition = _condition_on_white(item, view).to(device)  # [1, 3, H_c, W_c]
        record = {
            "index": index,
            "sha256": item.sha256,
            "voxels": int(coords.shape[0]),
            "dataset_views": int(targets.images.shape[0]),
            "latent_mse": float((latent.feats - truth.feats).square().mean()),
        }
        protocol_renders = {}
        for name, splats in gaussians.items():
            renders = render_images(splats, targets.viewmats, targets.Ks, width, height, white, backend)
            scores = {
                "psnr": float(psnr(renders, target_images)),
                "ssim": float(ssim(renders, target_images)),
            }
            if lpips_metric is not None:
                scores["lpips"] = float(lpips_metric(renders, target_images))
            protocol = render_images(
                splats, protocol_viewmats, protocol_Ks, image_size, image_size, white, backend
            )  # [V, 3, S, S]
            protocol_renders[name] = protocol
            if clip_embedding is not None:
                references = condition.expand(protocol.shape[0], -1, -1, -1)  # [V, 3, H_c, W_c]
                scores["clip_score"] = float(
                    clip_score(protocol, references, clip_embedding, reduction="none").mean()
                )
            record[name] = scores
        for metric in distances.values():
            metric.update(protocol_renders["reconstructed"], real=True)
            metric.update(protocol_renders["generated"], real=False)
        blank = torch.ones_like(protocol_renders["generated"][:1])
        shown = F.interpolate(condition, size=(image_size, image_size), mode="bilinear", antialias=True)
        rows = torch.cat(
            [shown.clamp(0, 1), protocol_renders["generated"], blank, protocol_renders["reconstructed"]]
        )
        save_grid(
            to_uint8(rows.permute(0, 2, 3, 1).cpu()),  # [2 (V + 1), S, S, 3]
            grids_dir / f"{index:04d}_{item.sha256}.png",
            columns=views + 1,
        )
        records.append(record)

    means = {
        name: {key: _mean([r[name][key] for r in records]) for key in records[0][name]}
        for name in ("generated", "reconstructed")
    }
    means["latent_mse"] = _mean([r["latent_mse"] for r in records])
    distribution = {}
    for name, metric in distances.items():
        if metric.num_real < 2 or metric.num_generated < 2:
            skipped[f"fd_kd_{name}"] = (
                f"FD/KD need >= 2 renders per side, got {metric.num_real} real and "
                f"{metric.num_generated} generated"
            )
            continue
        scores = metric.compute(
            subsets=100,
            subset_size=min(1000, metric.num_real, metric.num_generated),
            generator=torch.Generator().manual_seed(seed),
        )
        distribution[name] = {
            "fd": float(scores.fd),
            "kd_mean": float(scores.kd_mean),
            "kd_std": float(scores.kd_std),
            "num_real": scores.num_real,
            "num_generated": scores.num_generated,
        }
    summary = {
        "assets": records,
        "mean": means,
        "distribution": distribution,
        "skipped": skipped,
        "unreadable": dict(dataset.skipped),
        "protocol": {
            "views": views,
            "yaw_degrees": [360.0 * i / views for i in range(views)],
            "pitch_degrees": PROTOCOL_PITCH_DEGREES,
            "radius": PROTOCOL_RADIUS,
            "fov_degrees": PROTOCOL_FOV_DEGREES,
            "image_size": image_size,
            "background": "white",
        },
        "settings": {
            "assets": assets,
            "steps": steps,
            "guidance": guidance,
            "view": view,
            "seed": seed,
            "backend": backend,
            "device": str(device),
            "feature": feature,
        },
        "smdit": {
            "checkpoint": str(smdit_path),
            "model": dataclasses.asdict(config.model),
            "data": data_options,
        },
        "decoder": {"checkpoint": str(decoder_path), "data": decoder_data},
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring); returns the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smdit", type=Path, required=True, help="SMDiT model.safetensors from train.py")
    parser.add_argument(
        "--decoder", type=Path, required=True, help="decoder.safetensors from train_decoder.py"
    )
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument(
        "--assets",
        default="heldout",
        help="'heldout' (last readable asset), 'all', or N (the last N readable)",
    )
    parser.add_argument("--views", type=int, default=4, choices=[4, 8], help="protocol views (yaw steps)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the protocol renders")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale w in v_u + w (v_c - v_u)")
    parser.add_argument("--view", type=int, default=0, help="condition view index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="local weights of the condition extractor")
    parser.add_argument("--dinov2", default=None, help="local DINOv2 folder (FD/KD); skipped when absent")
    parser.add_argument(
        "--clip", default=None, help="local CLIP folder (CLIP score, FD/KD); skipped when absent"
    )
    parser.add_argument(
        "--lpips", nargs="+", default=None, help="local LPIPS weight files; skipped when absent"
    )
    parser.add_argument("--lpips-net", choices=["vgg", "alex"], default="vgg")
    parser.add_argument("--backend", choices=["auto", "torch", "gsplat"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("out/eval"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    summary = evaluate(
        args.smdit,
        args.decoder,
        args.data,
        args.out,
        assets=args.assets,
        views=args.views,
        image_size=args.image_size,
        steps=args.steps,
        guidance=args.guidance,
        view=args.view,
        seed=args.seed,
        weights=args.weights,
        dinov2=args.dinov2,
        clip=args.clip,
        lpips=args.lpips,
        lpips_net=args.lpips_net,
        backend=args.backend,
        device=args.device,
    )
    print(json.dumps({k: summary[k] for k in ("mean", "distribution", "skipped")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
