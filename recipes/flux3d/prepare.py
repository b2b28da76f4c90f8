"""Builds DA-SLAT feature volumes for every asset of a TRELLIS-layout dataset folder (resumable, atomic).

For each asset: voxels from ``voxels/<id>.ply``, views and cameras from ``renders/<id>/transforms.json``,
features per view, projected onto the voxel centres and averaged; written to ``features/<name>/<id>.npz``.
``python recipes/flux3d/prepare.py --root DIR [--extractor rgb | --extractor flux-vae --weights PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.data import (  # noqa: E402
    CORRUPT_ERRORS,
    is_true,
    list_assets,
    load_views,
    positions_to_coords,
    read_metadata,
    read_voxel_ply,
    write_metadata_table,
)
from sparse3d.features import (  # noqa: E402
    DINOv2Features,
    FeatureExtractor,
    FluxVAEFeatures,
    RGBFeatures,
    SDXLVAEFeatures,
)
from sparse3d.geometry import project_features  # noqa: E402

__all__ = ["EXTRACTORS", "PrepareReport", "build_extractor", "prepare_asset", "prepare_dataset", "main"]

EXTRACTORS = ("rgb", "flux-vae", "sdxl-vae", "dinov2")
"""Extractor names accepted by ``--extractor``."""


@dataclass
class PrepareReport:
    """What a ``prepare_dataset`` run did.

    Attributes:
        written: Assets whose npz was written by this run.
        existing: Assets skipped because their npz already existed (done earlier).
        failed: Asset id -> reason, for missing or corrupt inputs (nothing written for them).
    """

    written: int = 0
    existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def build_extractor(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    pool: int = 1,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """Makes an extractor by name.

    Args:
        name: One of ``EXTRACTORS``.
        weights: Local weights folder (or cached repo id), required for all but ``rgb``.
        pool: Average-pooling factor of ``rgb``.
        device: Device of the model.

    Returns:
        The extractor, on ``device``.
    """
    if name not in EXTRACTORS:
        raise ValueError(f"name: expected one of {EXTRACTORS}, got {name!r}")
    if name == "rgb":
        return RGBFeatures(pool)
    if weights is None:
        raise ValueError(
            f"weights: extractor {name!r} needs local weights: pass --weights PATH (a folder with the "
            "model's config.json and safetensors; nothing is downloaded), or use --extractor rgb"
        )
    loader = {"flux-vae": FluxVAEFeatures, "sdxl-vae": SDXLVAEFeatures, "dinov2": DINOv2Features}[name]
    return loader.from_pretrained(weights).to(device)


def _view_indices(num_frames: int, num_views: int | None) -> list[int]:
    if num_views is None or num_views >= num_frames:
        return list(range(num_frames))
    if num_views < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    # Evenly spread over the Hammersley order (its first frames all sit at low pitch).
    return sorted({int(i) for i in np.linspace(0, num_frames, num_views, endpoint=False)})


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.npz.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # atomic: a killed run never leaves a half-written npz
    finally:
        if temporary.exists():
            temporary.unlink()


def prepare_asset(
    root: str | os.PathLike[str],
    sha256: str,
    extractor: FeatureExtractor,
    output: str | os.PathLike[str],
    *,
    resolution: int = 64,
    num_views: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    store_dtype: np.dtype | type = np.float16,
) -> int:
    """Computes one asset's feature volume and writes it atomically to ``output``.

    The npz holds ``indices`` (uint8 for ``R <= 256``) ``[N, 3]``, ``mean`` ``[N, C]``, ``std`` ``[N, C]``
    (stochastic extractors only), ``num_views`` ``[N]`` and ``resolution``.

    Args:
        root: Dataset folder.
        sha256: Asset id.
        extractor: Feature extractor.
        output: The npz path.
        resolution: Voxel grid resolution of the volume (voxels of the PLY are merged to it).
        num_views: Views used (evenly spread; default all).
        batch_size: Views encoded at once.
        device: Device for extraction and projection.
        store_dtype: dtype of ``mean``/``std`` on disk.

    Returns:
        Number of voxels written.
    """
    root = Path(root)
    coords = positions_to_coords(read_voxel_ply(root / "voxels" / f"{sha256}.ply"), resolution)
    transforms = root / "renders" / sha256 / "transforms.json"
    with open(transforms, encoding="utf-8") as handle:
        num_frames = len(json.load(handle).get("frames", []))
    chosen = _view_indices(num_frames, num_views)
    rgb, _, viewmats, Ks = load_views(transforms, chosen)  # Ks in pixels of the stored images
    height, width = rgb.shape[2:]
    means, stds = [], []
    for start in range(0, rgb.shape[0], batch_size):
        maps = extractor(rgb[start : start + batch_size].to(device))
        means.append(maps.mean)
        if maps.std is not None:
            stds.append(maps.std)
    projected = project_features(
        coords.to(device),
        resolution,
        viewmats.to(device),
        Ks.to(device),
        (width, height),
        torch.cat(means).to(device),
        torch.cat(stds).to(device) if stds else None,
    )
    arrays = {
        "indices": coords.numpy().astype(np.uint8 if resolution <= 256 else np.int32),
        "mean": projected.mean.cpu().numpy().astype(store_dtype),
        "num_views": projected.num_views.cpu().numpy().astype(np.int32),
        "resolution": np.array(resolution, dtype=np.int32),
    }
    if projected.std is not None:
        arrays["std"] = projected.std.cpu().numpy().astype(store_dtype)
    _atomic_savez(Path(output), arrays)
    return int(coords.shape[0])


def prepare_dataset(
    root: str | os.PathLike[str],
    extractor: FeatureExtractor,
    feature_name: str,
    *,
    resolution: int = 64,
    num_views: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    store_dtype: np.dtype | type = np.float16,
    progress: bool = True,
) -> PrepareReport:
    """Builds ``features/<feature_name>/<id>.npz`` for every rendered and voxelized asset; resumable.

    Assets whose npz exists are skipped (files are only ever created by an atomic rename, so an
    existing file is complete). Assets with missing or corrupt inputs are reported, not raised, with
    one summary warning. ``metadata.csv`` (if present) gets a ``feature_<feature_name>`` column.

    Args:
        root: Dataset folder.
        extractor: Feature extractor.
        feature_name: Output subfolder name.
        resolution: Voxel grid resolution.
        num_views: Views per asset (evenly spread; default all).
        batch_size: Views encoded at once.
        device: Device for extraction and projection.
        store_dtype: dtype of features on disk.
        progress: Show a tqdm progress bar.

    Returns:
        A ``PrepareReport``.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: expected a dataset folder, got {root}")
    if not feature_name or "/" in feature_name or feature_name.startswith("."):
        raise ValueError(f"feature_name: expected a plain folder name, got {feature_name!r}")
    folder = root / "features" / feature_name
    folder.mkdir(parents=True, exist_ok=True)
    report = PrepareReport()
    done: set[str] = set()
    for sha in tqdm(
        list_assets(root, ("rendered", "voxelized")), desc=f"features/{feature_name}", disable=not progress
    ):
        output = folder / f"{sha}.npz"
        if output.exists():
            report.existing += 1
            done.add(sha)
            continue
        try:
            prepare_asset(
                root,
                sha,
                extractor,
                output,
                resolution=resolution,
                num_views=num_views,
                batch_size=batch_size,
                device=device,
                store_dtype=store_dtype,
            )
        except CORRUPT_ERRORS as error:
            report.failed[sha] = f"{type(error).__name__}: {error}"
            continue
        report.written += 1
        done.add(sha)
    if report.failed:
        sha, reason = next(iter(report.failed.items()))
        warnings.warn(
            f"prepare: {len(report.failed)} assets have missing or corrupt inputs and were skipped "
            f"(first: {sha}: {reason})",
            RuntimeWarning,
            stacklevel=2,
        )
    columns, rows = read_metadata(root)
    if columns and (report.written or report.failed):
        column = f"feature_{feature_name}"
        columns = columns if column in columns else [*columns, column]
        for row in rows:
            sha = row["sha256"]
            row[column] = str(sha not in report.failed and (sha in done or is_true(row.get(column, ""))))
        write_metadata_table(root, columns, rows)
    return report


def main(argv: Sequence[str] | None = None) -> PrepareReport:
    """Command line: ``python recipes/flux3d/prepare.py --root DIR [--extractor ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder (TRELLIS layout)")
    parser.add_argument("--extractor", choices=EXTRACTORS, default="rgb")
    parser.add_argument("--weights", default=None, help="local weights folder (all extractors but rgb)")
    parser.add_argument("--name", default=None, help="features/<name> subfolder (default: extractor name)")
    parser.add_argument("--views", type=int, default=None, help="views per asset (default: all)")
    parser.add_argument("--resolution", type=int, default=64, help="voxel grid resolution")
    parser.add_argument("--pool", type=int, default=1, help="average pooling of the rgb extractor")
    parser.add_argument("--batch-size", type=int, default=8, help="views encoded at once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    extractor = build_extractor(args.extractor, args.weights, pool=args.pool, device=args.device)
    name = args.name or args.extractor.replace("-", "_")
    start = time.perf_counter()
    report = prepare_dataset(
        args.root,
        extractor,
        name,
        resolution=args.resolution,
        num_views=args.views,
        batch_size=args.batch_size,
        device=args.device,
        store_dtype=np.float32 if args.float32 else np.float16,
        progress=not args.quiet,
    )
    print(
        f"features/{name}: wrote {report.written}, already done {report.existing}, "
        f"failed {len(report.failed)} "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return report


if __name__ == "__main__":
    main()
