"""Data-path benchmark: batches/s of the decoder and SMDiT datasets through the DataLoader, and the data-wait
share of real training steps fed by them. Writes one JSON object (stdout and ``--out``).

    python benchmarks/data.py --out benchmarks/results/data_h200.json          # GPU machine (16 cores)
    python benchmarks/data.py --assets 4 --image-size 32 --resolution 16 --views 6 --workers 0 2 \
        --batches 5 --device cpu                                                # a CPU smoke run

It generates a procedural dataset (default 64 assets at 32^3, 128 px, 24 views + 4 condition views; kept
in ``--root`` and resumed when the folder exists), prepares rgb features, opens the training split with and
without the image cache, and times:

- ``loader``: batches/s of ``DecoderDataset`` (``--decoder-batch`` assets, ``--views-per-item`` views) and
  ``LatentDataset`` (``--batch`` assets) with 0 / 4 / 8 workers, each batch moved to ``--device``;
- ``steps`` (``--no-steps`` skips them): steps/s and the share of each step spent waiting for data, for
  the toy SMDiT at batch ``--batch`` (condition images encoded on the device in one batch) and the tiny
  decoder (renders of ``--views-per-item`` views), cached images, one step synchronised at a time. On a
  CPU a decoder step takes seconds: keep ``--steps`` small there.

Targets of issue 10: the data wait < 10 % of the step time; the toy SMDiT at batch 16 >= 20 steps/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.flux3d import features as prepare  # noqa: E402
from recipes.flux3d.data import (  # noqa: E402
    DecoderDataset,
    LatentDataset,
    load_feature_stats,
    make_loader,
    open_assets,
)
from recipes.flux3d.shapes import generate_dataset  # noqa: E402


def keys(length: int, seed: int) -> Iterator[tuple[int, int]]:
    """Endless ``(index, item_seed)`` keys: a seeded permutation per epoch (a stand-in for the engine's
    resumable sampler)."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count():
        for index in torch.randperm(length, generator=generator).tolist():
            yield index, (seed << 32) + epoch * length + index


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(dataset, batch_size: int, workers: int, batches: int, device: torch.device) -> dict:
    """Batches/s of the loader, each batch moved to ``device`` (after ``workers + 2`` warm-up batches)."""
    loader = make_loader(dataset, keys(len(dataset), 0), batch_size=batch_size, workers=workers)
    iterator = iter(loader)
    for _ in range(workers + 2):
        next(iterator).to(device, non_blocking=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator).to(device, non_blocking=True)
    _sync(device)
    seconds = time.perf_counter() - start
    del iterator, loader
    return {
        "workers": workers,
        "batch_size": batch_size,
        "batches_per_s": round(batches / seconds, 2),
        "items_per_s": round(batches * batch_size / seconds, 1),
    }


def smdit_step(store, stats, args, device: torch.device):
    """The toy SMDiT's training step on a LatentBatch (rgb condition latents pooled by ``--pool``)."""
    import sparse3d.flow as flow
    from recipes.flux3d.conditioning import ConditionEncoder
    from recipes.flux3d.configs import toy
    from recipes.flux3d.model import SMDiT
    from sparse3d.features import RGBFeatures

    config = toy()
    model_config = dataclasses.replace(
        config.model, latent_channels=store.channels, image_channels=store.channels
    )
    torch.manual_seed(0)
    model = SMDiT(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    encoder = ConditionEncoder(RGBFeatures(args.pool).to(device), model_config.image_patch)
    path = flow.LinearPath()
    sampler = flow.TimeSampler(distribution="logit_normal", mean=config.time_mean, std=config.time_std)
    generator = torch.Generator().manual_seed(1)

    def step(batch) -> float:
        images = encoder(batch.cond_rgb())  # [B, C_img, h, w], encoded on the device in one batch
        x0 = batch.latents
        t = sampler(x0.batch_size, generator=generator).to(device)
        sample = path.sample(x0, t, noise=flow.noise_like(x0, generator=generator).to(device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(sample.x_t, sample.t, images)
        loss = flow.flow_matching_loss(prediction, sample.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return LatentDataset(store, stats=stats), args.batch, step


def decoder_step(store, stats, args, device: torch.device):
    """The tiny Gaussian decoder's training step on a DecoderBatch (render + L1/SSIM + regularisers)."""
    from sparse3d.gaussians import (
        GaussianDecoder,
        GaussianDecoderConfig,
        GaussianLoss,
        decoder_tiny,
        render_batch,
    )

    preset = decoder_tiny(store.resolution)
    config = GaussianDecoderConfig(
        transformer=dataclasses.replace(preset.transformer, in_channels=store.channels), head=preset.head
    )
    torch.manual_seed(0)
    decoder = GaussianDecoder(config).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    loss_fn = GaussianLoss(lpips_weight=0.0)  # LPIPS needs local weights; the step cost without it

    def step(batch) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            gaussians = decoder(batch.volume)
        height, width = batch.images.shape[-2:]
        backgrounds = batch.backgrounds[:, None].expand(-1, batch.viewmats.shape[1], 3)
        colors = render_batch(
            gaussians, batch.viewmats, batch.Ks, int(width), int(height), backgrounds
        ).colors
        loss = loss_fn(colors, batch.targets(), gaussians).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    dataset = DecoderDataset(store, views_per_item=args.views_per_item, background="random", stats=stats)
    return dataset, args.decoder_batch, step


def time_steps(name, build, store, stats, args, workers: int, device: torch.device) -> dict:
    """Steps/s and data-wait share of ``--steps`` training steps (after ``--warmup`` steps)."""
    dataset, batch_size, step = build(store, stats, args, device)
    loader = make_loader(dataset, keys(len(dataset), 1), batch_size=batch_size, workers=workers)
    iterator = iter(loader)
    for _ in range(args.warmup):
        step(next(iterator).to(device, non_blocking=True))
    _sync(device)
    waits, totals = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = next(iterator).to(device, non_blocking=True)
        waited = time.perf_counter() - start
        step(batch)  # float(loss) synchronises, as logging a loss does
        totals.append(time.perf_counter() - start)
        waits.append(waited)
    del iterator, loader
    return {
        "stage": name,
        "workers": workers,
        "batch_size": batch_size,
        "steps_per_s": round(len(totals) / sum(totals), 2),
        "data_wait_share": round(sum(waits) / sum(totals), 4),
        "median_step_ms": round(sorted(totals)[len(totals) // 2] * 1e3, 2),
        "median_wait_ms": round(sorted(waits)[len(waits) // 2] * 1e3, 3),
    }


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (default: a temporary one)")
    parser.add_argument("--assets", type=int, default=64, help="training assets")
    parser.add_argument("--resolution", type=int, default=32, help="voxel grid resolution")
    parser.add_argument("--image-size", type=int, default=128, help="render side in pixels")
    parser.add_argument("--views", type=int, default=24, help="render views per asset")
    parser.add_argument("--cond-views", type=int, default=4, help="condition views per asset")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8], help="DataLoader workers")
    parser.add_argument("--batch", type=int, default=16, help="SMDiT batch size")
    parser.add_argument("--decoder-batch", type=int, default=4, help="decoder batch size")
    parser.add_argument("--views-per-item", type=int, default=4, help="decoder target views per asset")
    parser.add_argument("--pool", type=int, default=4, help="rgb pooling of the condition images")
    parser.add_argument("--batches", type=int, default=100, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--no-steps", action="store_true", help="time the loaders only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    temporary = None
    root = args.root
    if root is None:
        temporary = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = Path(temporary.name)
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    generate_dataset(
        root,
        args.assets,
        seed=0,
        image_size=args.image_size,
        num_views=args.views,
        num_cond_views=args.cond_views,
        voxel_resolution=args.resolution,
        workers=max(1, min(cores, args.assets)),
        progress=False,
    )
    generate_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prepare.main(["--root", str(root), "--resolution", str(args.resolution), "--quiet"])
    prepare_seconds = time.perf_counter() - start
    stats = load_feature_stats(root, "rgb")
    report: dict = {
        "benchmark": "data",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_cores": cores,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "dataset": {
            "assets": args.assets,
            "resolution": args.resolution,
            "image_size": args.image_size,
            "views": args.views,
            "cond_views": args.cond_views,
            "generate_seconds": round(generate_seconds, 1),
            "prepare_seconds": round(prepare_seconds, 1),
        },
        "open": {},
        "loader": [],
        "steps": [],
    }
    for cache in (True, False):
        start = time.perf_counter()
        store = open_assets(root, "rgb", cache=cache, progress=False)
        report["open"]["cached" if cache else "lazy"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "assets": len(store),
            "image_mib": round(sum(asset.nbytes() for asset in store) / 2**20, 1),
        }
        label = "cached" if cache else "lazy"
        for workers in args.workers:
            for name, dataset, batch_size in (
                (
                    "decoder",
                    DecoderDataset(store, views_per_item=args.views_per_item, stats=stats),
                    args.decoder_batch,
                ),
                ("smdit", LatentDataset(store, stats=stats), args.batch),
            ):
                row = {"dataset": name, "images": label}
                try:
                    row |= time_loader(dataset, batch_size, workers, args.batches, device)
                except Exception as error:  # a failing configuration is reported, not fatal
                    row |= {"workers": workers, "error": f"{type(error).__name__}: {error}"}
                report["loader"].append(row)
                print(json.dumps(row), file=sys.stderr)
        if cache and not args.no_steps:  # the stages cache when the images fit, as here
            for workers in args.workers:
                for name, build in (("smdit", smdit_step), ("decoder", decoder_step)):
                    try:
                        row = {"images": label} | time_steps(name, build, store, stats, args, workers, device)
                    except Exception as error:
                        row = {"stage": name, "images": label, "workers": workers}
                        row |= {"error": f"{type(error).__name__}: {error}"}
                    report["steps"].append(row)
                    print(json.dumps(row), file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if temporary is not None:
        temporary.cleanup()
    return report


if __name__ == "__main__":
    main()
