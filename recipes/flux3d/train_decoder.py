"""Train the decoder-only Gaussian decoder: DA-SLAT voxel features -> ``K`` Gaussians per voxel, supervised
by the asset's multi-view renders (L1 + SSIM (+ LPIPS) plus volume/opacity regularisers).

    python recipes/flux3d/train_decoder.py --data data/proc --steps 500 --out out/decoder

Each step draws ``--batch-size`` training assets from a seeded shuffle (the last readable asset is held out),
takes ``mu + sigma * eps`` (``mu`` when the features store no ``sigma``) as the decoder input, renders the
Gaussians from ``--views-per-step`` random views of ``renders/<id>/transforms.json`` and compares them with
those views' RGBA composited on the background. LPIPS is used only with ``--lpips PATH`` (local weights);
otherwise its weight is 0 and the summary says so. Writes ``decoder.safetensors`` and ``decoder.json`` (the
config, read by ``sample.py``), ``metrics.json`` (loss curve, held-out PSNR at start and end),
``heldout.png`` (top row: targets, bottom row: renders of the held-out views) and ``heldout.ply``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from recipes.flux3d.conditioning import find_feature_folder  # noqa: E402
from recipes.flux3d.data import CORRUPT_ERRORS, AssetDataset, AssetItem, load_views  # noqa: E402
from recipes.flux3d.train import AssetStream  # noqa: E402
from sparse3d import SparseTensor  # noqa: E402
from sparse3d.gaussians import (  # noqa: E402
    LPIPS,
    GaussianDecoder,
    GaussianDecoderConfig,
    GaussianHeadConfig,
    GaussianLoss,
    Gaussians,
    SparseTransformerConfig,
    decoder_paper,
    decoder_tiny,
    render_batch,
    save_grid,
    save_ply,
)
from sparse3d.gaussians.viz import to_uint8  # noqa: E402
from sparse3d.geometry import read_transforms, reparameterize  # noqa: E402

__all__ = [
    "DECODER_PRESETS",
    "BACKGROUNDS",
    "DecoderTrainConfig",
    "TargetViews",
    "decoder_config_for",
    "decoder_config_from_dict",
    "save_decoder",
    "load_decoder",
    "load_target_views",
    "asset_volume",
    "psnr",
    "render_views",
    "train_decoder",
    "main",
]

DECODER_PRESETS = {"tiny": decoder_tiny, "paper": decoder_paper}
"""Decoder presets by name (``--preset``); input channels and resolution are replaced by the data's."""

BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
"""Fixed background colours; ``"random"`` draws one colour per asset and step (held-out checks use white)."""

_DEFAULT_LEARNING_RATES = {"tiny": 3e-3, "paper": 1e-4}


@dataclass(frozen=True, kw_only=True)
class DecoderTrainConfig:
    """Hyperparameters of the decoder stage.

    Attributes:
        preset: Decoder preset name (``tiny`` or ``paper``).
        steps: Optimiser steps.
        batch_size: Assets per step.
        views_per_step: Random views rendered per asset and step.
        image_size: Side of the target and rendered images (``None``: as stored).
        learning_rate: AdamW learning rate (``tiny``: 3e-3 as the CPU overfit test; ``paper``: 1e-4, TRELLIS).
        weight_decay: AdamW weight decay.
        background: ``white``, ``black`` or ``random``.
        eval_views: Held-out views (the first ones of the held-out asset) for the PSNR check and the grid.
        lpips_weight: LPIPS weight (0 without ``--lpips`` weights).
        seed: Seed of initialisation, asset order, views, backgrounds and ``eps``.
        backend: Renderer backend (``auto``: gsplat on CUDA when installed, else the torch reference).
    """

    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 1
    views_per_step: int = 2
    image_size: int | None = None
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    background: str = "white"
    eval_views: int = 4
    lpips_weight: float = 0.0
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.preset not in DECODER_PRESETS:
            raise ValueError(f"preset: expected one of {sorted(DECODER_PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "views_per_step", "eval_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.background not in (*BACKGROUNDS, "random"):
            raise ValueError(
                f"background: expected one of {[*BACKGROUNDS, 'random']}, got {self.background!r}"
            )


@dataclass(frozen=True)
class TargetViews:
    """Target images of one asset with their cameras.

    Attributes:
        images: ``[V, H, W, 3]`` RGB composited on ``background`` (channels last, as the renderer returns).
        viewmats: ``[V, 4, 4]`` OpenCV world-to-camera.
        Ks: ``[V, 3, 3]`` pixel intrinsics.
        background: ``[3]`` background colour.
    """

    images: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    background: torch.Tensor


def decoder_config_for(
    preset: str, in_channels: int, resolution: int, *, num_gaussians: int | None = None
) -> GaussianDecoderConfig:
    """A decoder preset adapted to the data: input channels ``C`` of ``mu`` and grid resolution ``R``.

    Args:
        preset: ``tiny`` or ``paper``.
        in_channels: Channels of the DA-SLAT features.
        resolution: Voxel grid resolution of the features.
        num_gaussians: Override of ``K`` (default: the preset's).

    Returns:
        The configuration.
    """
    if preset not in DECODER_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(DECODER_PRESETS)}, got {preset!r}")
    config = DECODER_PRESETS[preset](resolution)
    head = config.head
    if num_gaussians is not None:
        head = dataclasses.replace(head, num_gaussians=num_gaussians)
    return GaussianDecoderConfig(
        transformer=dataclasses.replace(config.transformer, in_channels=in_channels), head=head
    )


def decoder_config_from_dict(values: dict) -> GaussianDecoderConfig:
    """Rebuilds a [`GaussianDecoderConfig`][sparse3d.gaussians.decoder.GaussianDecoderConfig] from
    ``dataclasses.asdict`` output (as stored in ``decoder.json``)."""
    transformer = dict(values["transformer"])
    if isinstance(transformer.get("window"), list):
        transformer["window"] = tuple(transformer["window"])
    return GaussianDecoderConfig(
        transformer=SparseTransformerConfig(**transformer), head=GaussianHeadConfig(**values["head"])
    )


def save_decoder(decoder: GaussianDecoder, out_dir: Path, data: dict) -> Path:
    """Writes ``decoder.safetensors`` and ``decoder.json`` (``{"decoder_config", "data"}``) into ``out_dir``.

    Args:
        decoder: The trained decoder.
        out_dir: Output folder (created).
        data: JSON-ready description of the features it was trained on (feature name, channels, ...).

    Returns:
        The checkpoint path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "decoder.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}, path)
    saved = {"decoder_config": dataclasses.asdict(decoder.config), "data": data}
    (out_dir / "decoder.json").write_text(json.dumps(saved, indent=1))
    return path


def load_decoder(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[GaussianDecoder, dict]:
    """Loads a decoder saved by `save_decoder`.

    Args:
        checkpoint: ``decoder.safetensors``; its config is read from ``decoder.json`` in the same folder.
        device: Device of the returned model.

    Returns:
        ``(decoder in eval mode, the saved "data" description)``.

    Raises:
        FileNotFoundError: The checkpoint or its ``decoder.json`` is missing.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"decoder: expected a decoder checkpoint file (decoder.safetensors from train_decoder.py), got "
            f"{checkpoint} (no such file)"
        )
    config_path = checkpoint.with_name("decoder.json")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"decoder: expected its config {config_path} next to {checkpoint.name} (written by "
            f"train_decoder.py), got no such file"
        )
    saved = json.loads(config_path.read_text())
    decoder = GaussianDecoder(decoder_config_from_dict(saved["decoder_config"]))
    decoder.load_state_dict(load_file(checkpoint), strict=True)
    return decoder.to(device).eval(), saved.get("data") or {}


def load_target_views(
    root: str | Path,
    sha256: str,
    indices: list[int] | None,
    background: torch.Tensor,
    *,
    image_size: int | None = None,
) -> TargetViews:
    """Loads views of ``renders/<sha256>/transforms.json`` composited on a background.

    ``image = rgb * alpha + (1 - alpha) * background`` (the reader's RGB is premultiplied).

    Args:
        root: Dataset folder.
        sha256: Asset id.
        indices: Frames to load (``None``: all).
        background: ``[3]`` colour in ``[0, 1]``.
        image_size: Resize to this side (intrinsics follow).

    Returns:
        `TargetViews` on the CPU.
    """
    rgb, alpha, viewmats, Ks = load_views(
        Path(root) / "renders" / sha256 / "transforms.json", indices, image_size
    )
    images = rgb + (1.0 - alpha) * background.view(1, 3, 1, 1)  # [V, 3, H, W]
    return TargetViews(images.permute(0, 2, 3, 1).contiguous(), viewmats, Ks, background)  # [V, H, W, 3]


def asset_volume(
    item: AssetItem, *, noisy: bool, generator: torch.Generator | None = None, batch_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input rows of one asset: ``mu + sigma * eps`` (``noisy`` and ``sigma`` stored) or ``mu``.

    Args:
        item: Reader item with ``mean`` (and optionally ``std``).
        noisy: Add ``sigma * eps`` when the features store ``sigma``.
        generator: CPU generator of ``eps``.
        batch_index: Batch column of the returned coordinates.

    Returns:
        ``(coords int32 [N, 4], feats float32 [N, C])``.
    """
    if item.mean is None:
        raise ValueError(f"item: expected DA-SLAT features (mean), got none for asset {item.sha256}")
    feats = item.mean
    if noisy and item.std is not None:
        feats = reparameterize(item.mean, item.std, generator)
    column = torch.full((item.coords.shape[0], 1), batch_index, dtype=torch.int32)
    return torch.cat([column, item.coords], dim=1), feats  # [N, 4], [N, C]


def psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]`` (all elements pooled).

    Args:
        images: Any shape, e.g. ``[V, H, W, 3]``.
        targets: Same shape.

    Returns:
        ``-10 log10(mean((images - targets)^2))`` (``inf`` for identical images).
    """
    if images.shape != targets.shape:
        raise ValueError(
            f"images, targets: expected equal shapes, got {list(images.shape)} and {list(targets.shape)}"
        )
    mse = float((images.float().clamp(0, 1) - targets.float()).square().mean())
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def _volume(
    rows: list[tuple[torch.Tensor, torch.Tensor]], resolution: int, device: torch.device
) -> SparseTensor:
    coords = torch.cat([c for c, _ in rows])  # [N, 4]
    feats = torch.cat([f for _, f in rows])  # [N, C]
    return SparseTensor(coords, feats, batch_size=len(rows), spatial_shape=resolution).to(device)


def render_views(
    decoder: GaussianDecoder, volume: SparseTensor, views: list[TargetViews], backend: str
) -> tuple[Gaussians, torch.Tensor]:
    """Decodes a batch of voxel latents and renders sample ``b`` from ``views[b]`` (bf16 autocast on CUDA).

    Args:
        decoder: The decoder.
        volume: SparseTensor with feats ``[N, C]`` and ``B`` samples.
        views: ``B`` target views (equal image sizes); their cameras and backgrounds are used.
        backend: Renderer backend.

    Returns:
        ``(Gaussians of the batch, colours [B, V, H, W, 3])``.
    """
    device = volume.device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        gaussians = decoder(volume)
    height, width = views[0].images.shape[1:3]
    output = render_batch(
        gaussians,
        torch.stack([v.viewmats for v in views]).to(device),
        torch.stack([v.Ks for v in views]).to(device),
        int(width),
        int(height),
        torch.stack([v.background.expand(v.viewmats.shape[0], 3) for v in views]).to(device),
        backend=backend,
    )
    return gaussians, output.colors


def _heldout_item(dataset: AssetDataset, train_indices: list[int]) -> tuple[int, AssetItem]:
    index = len(dataset) - 1
    while index >= 0 and (item := dataset[index]) is None:
        index -= 1
    if index <= 0:
        raise ValueError(
            f"data: expected at least 2 readable assets in {dataset.root} (features/{dataset.feature_name}; "
            f"one is held out), got {len(dataset) - dataset.num_skipped}; skipped: {dataset.skipped}"
        )
    train_indices.extend(i for i in range(len(dataset)) if i != index)
    return index, item


def train_decoder(
    root: str | Path,
    config: DecoderTrainConfig,
    out_dir: Path,
    device: torch.device,
    *,
    feature_name: str | None = None,
    lpips: LPIPS | None = None,
) -> dict:
    """Trains the decoder on a prepared dataset and writes its outputs (see the module docstring).

    Args:
        root: Dataset folder with ``features/<name>/*.npz`` and ``renders/<id>/``.
        config: Hyperparameters.
        out_dir: Output folder.
        device: Device of the model.
        feature_name: ``features/<name>`` folder (default: the only one).
        lpips: LPIPS model (required when ``config.lpips_weight > 0``).

    Returns:
        The metrics (also written to ``out_dir / "metrics.json"``).
    """
    if config.lpips_weight and lpips is None:
        raise ValueError(f"lpips: lpips_weight={config.lpips_weight} needs an LPIPS model, got None")
    feature_name = find_feature_folder(root, feature_name)
    dataset = AssetDataset(root, feature_name, cond_views=0)
    if len(dataset) < 2:
        raise ValueError(
            f"data: expected at least 2 assets with features/{feature_name} in {root} (one is held out), "
            f"got {len(dataset)}"
        )
    train_indices: list[int] = []
    heldout_index, heldout = _heldout_item(dataset, train_indices)
    channels, resolution = int(heldout.mean.shape[1]), int(heldout.resolution)
    has_std = heldout.std is not None

    torch.manual_seed(config.seed)
    decoder = GaussianDecoder(decoder_config_for(config.preset, channels, resolution)).to(device)
    optimizer = torch.optim.AdamW(
        decoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = GaussianLoss(lpips_weight=config.lpips_weight)
    if lpips is not None:
        lpips = lpips.to(device)
    stream = AssetStream(dataset, train_indices, 1, torch.Generator().manual_seed(config.seed + 2))
    view_generator = torch.Generator().manual_seed(config.seed + 3)
    latent_generator = torch.Generator().manual_seed(config.seed + 4)
    skipped_views: dict[str, str] = {}

    eval_background = torch.tensor(BACKGROUNDS.get(config.background, BACKGROUNDS["white"]))
    num_frames = len(read_transforms(dataset.root / "renders" / heldout.sha256 / "transforms.json"))
    eval_views = load_target_views(
        dataset.root,
        heldout.sha256,
        list(range(min(config.eval_views, num_frames))),
        eval_background,
        image_size=config.image_size,
    )
    eval_volume = _volume([asset_volume(heldout, noisy=False)], resolution, device)

    def evaluate() -> tuple[float, Gaussians, torch.Tensor]:
        decoder.eval()
        with torch.no_grad():
            gaussians, colors = render_views(decoder, eval_volume, [eval_views], config.backend)
        decoder.train()
        return psnr(colors[0].cpu(), eval_views.images), gaussians, colors[0].cpu()

    psnr_start = evaluate()[0]
    losses, terms_log = [], {"l1": [], "ssim": [], "lpips": [], "volume": [], "opacity": []}
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="decoder", unit="step")
    for _ in bar:
        rows, views = [], []
        while len(rows) < config.batch_size:
            item = stream.next_items()[0]
            try:
                frames = len(read_transforms(dataset.root / "renders" / item.sha256 / "transforms.json"))
                if frames < config.views_per_step:
                    raise ValueError(f"expected >= {config.views_per_step} render views, got {frames}")
                chosen = torch.randperm(frames, generator=view_generator)[: config.views_per_step].tolist()
                if config.background == "random":
                    background = torch.rand(3, generator=view_generator)
                else:
                    background = torch.tensor(BACKGROUNDS[config.background])
                target = load_target_views(
                    dataset.root, item.sha256, chosen, background, image_size=config.image_size
                )
            except CORRUPT_ERRORS as error:
                if item.sha256 not in skipped_views:
                    warnings.warn(
                        f"data: skipping asset {item.sha256} (renders unreadable: {type(error).__name__}: "
                        f"{error}); further skips are counted in metrics.json",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                skipped_views[item.sha256] = f"{type(error).__name__}: {error}"
                if len(skipped_views) >= len(train_indices):
                    raise RuntimeError(
                        f"data: the renders of every training asset are unreadable: {skipped_views}"
                    ) from error
                continue
            rows.append(asset_volume(item, noisy=True, generator=latent_generator, batch_index=len(rows)))
            views.append(target)
        if len({tuple(v.images.shape) for v in views}) > 1:
            raise ValueError(
                f"data: render sizes differ within a batch {sorted({tuple(v.images.shape) for v in views})}; "
                f"pass --image-size"
            )
        volume = _volume(rows, resolution, device)
        gaussians, colors = render_views(decoder, volume, views, config.backend)
        targets = torch.stack([v.images for v in views]).to(device)  # [B, V, H, W, 3]
        terms = loss_fn(colors, targets, gaussians, lpips=lpips)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        losses.append(float(terms.total.detach()))
        for name in terms_log:
            terms_log[name].append(float(getattr(terms, name).detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    train_seconds = time.perf_counter() - start
    dataset.end_epoch()

    psnr_end, gaussians, rendered = evaluate()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_summary = {
        "root": str(dataset.root),
        "feature": feature_name,
        "latent_channels": channels,
        "resolution": resolution,
        "has_std": has_std,
        "input": "mu + sigma * eps" if has_std else "mu (the features store no sigma)",
    }
    save_decoder(decoder, out_dir, data_summary)
    save_ply(out_dir / "heldout.ply", gaussians)
    save_grid(
        to_uint8(torch.cat([eval_views.images, rendered])), out_dir / "heldout.png", columns=len(rendered)
    )
    window = max(1, min(20, len(losses) // 5))
    metrics = {
        "config": dataclasses.asdict(config),
        "decoder_config": dataclasses.asdict(decoder.config),
        "device": str(device),
        "parameters": sum(p.numel() for p in decoder.parameters()),
        "lpips": "on" if config.lpips_weight else "off (no --lpips weights given: weight 0)",
        "data": {
            **data_summary,
            "train_assets": len(train_indices),
            "heldout_asset": heldout.sha256,
            "heldout_views": eval_views.images.shape[0],
            "heldout_voxels": int(heldout.coords.shape[0]),
            "skipped_assets": dataset.num_skipped,
            "skipped": dict(list(dataset.skipped.items())[:10]),
            "skipped_renders": skipped_views,
        },
        "steps": config.steps,
        "train_seconds": round(train_seconds, 2),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "psnr_heldout_start": psnr_start,
        "psnr_heldout_end": psnr_end,
        "num_gaussians_heldout": gaussians.num_gaussians,
        "losses": losses,
        "loss_terms": terms_log,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring); returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--feature", default=None, help="features/<NAME> folder (default: the only one)")
    parser.add_argument("--preset", choices=sorted(DECODER_PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1, help="assets per step")
    parser.add_argument("--views-per-step", type=int, default=2, help="random views rendered per asset")
    parser.add_argument("--image-size", type=int, default=None, help="resize renders to this side")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (tiny 3e-3, paper 1e-4)")
    parser.add_argument("--background", choices=[*BACKGROUNDS, "random"], default="white")
    parser.add_argument("--eval-views", type=int, default=4, help="held-out views for PSNR and the grid")
    parser.add_argument("--lpips", nargs="+", default=None, help="local LPIPS weight file(s); else no LPIPS")
    parser.add_argument("--lpips-net", choices=["vgg", "alex"], default="vgg")
    parser.add_argument("--lpips-weight", type=float, default=0.2)
    parser.add_argument("--backend", choices=["auto", "torch", "gsplat"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/decoder"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lpips = LPIPS.from_pretrained(args.lpips, net=args.lpips_net) if args.lpips else None
    config = DecoderTrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        views_per_step=args.views_per_step,
        image_size=args.image_size,
        learning_rate=_DEFAULT_LEARNING_RATES[args.preset] if args.lr is None else args.lr,
        background=args.background,
        eval_views=args.eval_views,
        lpips_weight=args.lpips_weight if lpips is not None else 0.0,
        seed=args.seed,
        backend=args.backend,
    )
    metrics = train_decoder(args.data, config, args.out, device, feature_name=args.feature, lpips=lpips)
    summary = {
        k: v for k, v in metrics.items() if k not in ("losses", "loss_terms", "config", "decoder_config")
    }
    print(json.dumps(summary, indent=1))
    return metrics


if __name__ == "__main__":
    main()
