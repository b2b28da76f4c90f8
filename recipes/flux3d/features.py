"""Builds DA-SLAT feature volumes for every asset of a TRELLIS-layout dataset folder (resumable, atomic).

For each asset: voxels from ``voxels/<id>.ply``, views and cameras from ``renders/<id>/transforms.json``,
features per view, projected onto the voxel centres and averaged; written to ``features/<name>/<id>.npz``.
``features/<name>/features.json`` records the settings and whether the run completed, ``stats.json`` the
per-channel mean and std of ``mu`` over the training split (the stages normalise latents with it).
``python recipes/flux3d/prepare.py --root DIR [--extractor rgb | --extractor flux-vae --weights PATH]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.data import (  # noqa: E402
    CORRUPT_ERRORS,
    FEATURES_RECORD,
    STATS_FILE,
    DatasetError,
    UnusableAssetError,
    check_settings,
    compute_feature_stats,
    is_true,
    list_assets,
    open_views,
    read_asset_volume,
    read_metadata,
    read_record,
    split_assets,
    straight_to_float,
    write_atomic,
    write_metadata_table,
    write_record,
)
from sparse3d.features import (  # noqa: E402
    DINOv2Features,
    FeatureExtractor,
    FluxVAEFeatures,
    RGBFeatures,
    SDXLVAEFeatures,
)
from sparse3d.geometry import project_features  # noqa: E402

__all__ = [
    "EXTRACTORS",
    "PrepareReport",
    "build_extractor",
    "extractor_settings",
    "prepare_asset",
    "prepare_dataset",
    "main",
]

EXTRACTORS = ("rgb", "flux-vae", "sdxl-vae", "dinov2")
"""Extractor names accepted by ``--extractor``."""


@dataclass
class PrepareReport:
    """What a ``prepare_dataset`` run did.

    Attributes:
        written: Assets whose npz was written by this run.
        existing: Assets skipped because their npz already existed (done earlier).
        failed: Asset id -> reason, for missing or corrupt inputs (nothing written for them).
        reasons: Failure category -> count (e.g. ``{"render image empty (0 bytes)": 2}``).
        train_assets: Training assets with features (the statistics' population).
        heldout_assets: Held-out assets with features.
    """

    written: int = 0
    existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    train_assets: int = 0
    heldout_assets: int = 0


def build_extractor(
    name: str,
    weights: str | Path | None = None,
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


def extractor_settings(extractor: FeatureExtractor) -> dict[str, object]:
    """What identifies an extractor object in ``features.json``: class, channels, stride (rgb: the pool)."""
    return {
        "extractor_class": type(extractor).__name__,
        "channels": int(extractor.channels),
        "stride": int(extractor.stride),
    }


def _view_indices(num_frames: int, num_views: int | None) -> list[int]:
    if num_views is None or num_views >= num_frames:
        return list(range(num_frames))
    if num_views < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    # Evenly spread over the Hammersley order (its first frames all sit at low pitch).
    return sorted({int(i) for i in np.linspace(0, num_frames, num_views, endpoint=False)})


def _savez_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def prepare_asset(
    root: str | Path,
    sha256: str,
    extractor: FeatureExtractor,
    output: str | Path,
    *,
    resolution: int = 64,
    num_views: int | None = None,
    image_size: int | None = None,
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
        image_size: Resize the renders to this side before encoding (default: as stored).
        batch_size: Views encoded at once.
        device: Device for extraction and projection.
        store_dtype: dtype of ``mean``/``std`` on disk.

    Returns:
        Number of voxels written.

    Raises:
        UnusableAssetError: A missing, empty or unreadable input (``reason`` says which).
    """
    root = Path(root)
    coords, _, _, _ = read_asset_volume(root, sha256, None, resolution, check_voxels=False)
    views = open_views(root / "renders" / sha256, "render", image_size)
    chosen = _view_indices(len(views), num_views)
    try:
        rgb, _ = straight_to_float(views.rgba(chosen))  # [V, 3, H, W] premultiplied
    except CORRUPT_ERRORS as error:
        raise UnusableAssetError("render image unreadable", str(error)) from error
    viewmats, Ks = views.viewmats[chosen], views.Ks[chosen]  # Ks in pixels of the (resized) images
    width, height = views.size
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
    # atomic: a killed run never leaves a half-written npz
    write_atomic(Path(output), _savez_bytes(arrays), sync=True)
    return int(coords.shape[0])


def _command(root: Path, feature_name: str, settings: Mapping[str, object]) -> str:
    flags = [f"--root {root}", f"--name {feature_name}", f"--resolution {settings['resolution']}"]
    if "extractor" in settings:
        flags.append(f"--extractor {settings['extractor']}")
    if settings.get("weights") is not None:
        flags.append(f"--weights {settings['weights']}")
    if settings.get("pool", 1) != 1:
        flags.append(f"--pool {settings['pool']}")
    for key, flag in (("views", "--views"), ("image_size", "--image-size")):
        if settings.get(key) is not None:
            flags.append(f"{flag} {settings[key]}")
    if settings.get("dtype") == "float32":
        flags.append("--float32")
    return "python recipes/flux3d/prepare.py " + " ".join(flags)


def prepare_dataset(
    root: str | Path,
    extractor: FeatureExtractor,
    feature_name: str,
    *,
    resolution: int = 64,
    num_views: int | None = None,
    image_size: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    store_dtype: np.dtype | type = np.float16,
    settings: Mapping[str, object] | None = None,
    overwrite: bool = False,
    heldout_fraction: float | None = None,
    split_seed: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Builds ``features/<feature_name>/<id>.npz`` for every rendered and voxelized asset; resumable.

    ``features.json`` records the settings (the extractor's class, channels and stride, the resolution,
    views, image size and dtype, plus ``settings``) with ``complete: false`` before the first asset and
    ``complete: true`` at the end; readers refuse an incomplete folder. A run over a folder made with other
    settings is refused, naming the setting and both values, unless ``overwrite`` (every npz is rebuilt).
    Assets whose npz exists are skipped (files are only ever created by an atomic rename, so an existing
    file is complete). Assets with missing or corrupt inputs are reported, not raised, with one summary
    warning; if no training asset is left the run raises. ``metadata.csv`` (if present) gets a
    ``feature_<feature_name>`` column, and ``stats.json`` the per-channel mean and std of ``mu`` over the
    training split (train/held-out by [`split_assets`][recipes.flux3d.data.split_assets], which stores a
    ``split.json`` for folders without a ``split`` column).

    Args:
        root: Dataset folder.
        extractor: Feature extractor.
        feature_name: Output subfolder name.
        resolution: Voxel grid resolution.
        num_views: Views per asset (evenly spread; default all).
        image_size: Resize renders to this side before encoding (default: as stored).
        batch_size: Views encoded at once.
        device: Device for extraction and projection.
        store_dtype: dtype of features on disk.
        settings: More settings to record and compare (``main`` adds the extractor name, weights, pool).
        overwrite: Rebuild every npz, also over a folder made with other settings.
        heldout_fraction: Held-out fraction of the split rule for folders without a ``split`` column.
        split_seed: Seed of that rule.
        progress: Show a tqdm progress bar.

    Returns:
        A ``PrepareReport``.

    Raises:
        DatasetError: Empty or incomplete dataset, or no training asset whose features could be built (the
            reasons are counted in the message).
        ValueError: Settings that differ from the folder's record, or a bad argument.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: expected a dataset folder, got {root}")
    if not feature_name or "/" in feature_name or feature_name.startswith("."):
        raise ValueError(f"feature_name: expected a plain folder name, got {feature_name!r}")
    for name, value in (("resolution", resolution), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    for name, value in (("num_views", num_views), ("image_size", image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected >= 1 or None, got {value}")
    train, heldout = split_assets(
        root, require=("rendered", "voxelized"), heldout_fraction=heldout_fraction, seed=split_seed
    )  # refuses an empty or incomplete dataset
    ids = list_assets(root, ("rendered", "voxelized"))
    requested = {
        **extractor_settings(extractor),
        "resolution": resolution,
        "views": num_views,
        "image_size": image_size,
        "dtype": np.dtype(store_dtype).name,
        **(settings or {}),
    }
    folder = root / "features" / feature_name
    record = read_record(folder / FEATURES_RECORD)
    fix = "pass --overwrite to rebuild every feature, or --name NEW for a separate folder"
    if not overwrite:
        if record is not None:
            check_settings(
                record.get("settings", {}), requested, where=f"features/{feature_name} of {root}", fix=fix
            )
        elif folder.is_dir() and any(folder.glob("*.npz")):
            raise ValueError(
                f"feature_name: {folder} holds npz files but no {FEATURES_RECORD} (made by another tool or "
                f"an older version), so its settings are unknown; {fix}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "complete": False,
        "command": _command(root, feature_name, requested),
        "settings": requested,
        "total": len(ids),
        "done": 0,
    }
    write_record(folder / FEATURES_RECORD, record)
    report = PrepareReport()
    done: set[str] = set()
    reasons: Counter[str] = Counter()
    for sha in tqdm(ids, desc=f"features/{feature_name}", disable=not progress):
        output = folder / f"{sha}.npz"
        if output.exists() and not overwrite:
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
                image_size=image_size,
                batch_size=batch_size,
                device=device,
                store_dtype=store_dtype,
            )
        except UnusableAssetError as error:
            report.failed[sha] = str(error)
            reasons[error.reason] += 1
            continue
        except CORRUPT_ERRORS as error:
            report.failed[sha] = f"{type(error).__name__}: {error}"
            reasons["unreadable input"] += 1
            continue
        report.written += 1
        done.add(sha)
    report.reasons = dict(reasons.most_common())
    summary = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    if report.failed:
        sha, reason = next(iter(report.failed.items()))
        warnings.warn(
            f"prepare: {len(report.failed)} assets have missing or corrupt inputs and were skipped "
            f"({summary}; first: {sha}: {reason})",
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
    usable_train = [sha for sha in train if sha in done]
    report.train_assets = len(usable_train)
    report.heldout_assets = sum(sha in done for sha in heldout)
    if not usable_train:
        raise DatasetError(
            f"data: no training asset of {root} has features/{feature_name}: {len(train)} training assets, "
            f"{sum(sha in report.failed for sha in train)} failed ({summary or 'no failures'}); "
            f"first: {next(iter(report.failed.items()), ('-', '-'))}"
        )
    stats = compute_feature_stats(root, feature_name, usable_train)
    write_record(folder / STATS_FILE, stats.to_dict())
    write_record(
        folder / FEATURES_RECORD,
        record
        | {
            "complete": True,
            "done": len(done),
            "counts": {"train": report.train_assets, "heldout": report.heldout_assets},
            "failed": report.failed,
        },
    )
    return report


def main(argv: Sequence[str] | None = None) -> PrepareReport:
    """Command line: ``python recipes/flux3d/prepare.py --root DIR [--extractor ...]``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", required=True, help="dataset folder (TRELLIS layout)")
    parser.add_argument("--extractor", choices=EXTRACTORS, default="rgb", help="feature extractor")
    parser.add_argument("--weights", default=None, help="local weights folder (all extractors but rgb)")
    parser.add_argument("--name", default=None, help="features/<name> subfolder; None: the extractor name")
    parser.add_argument("--views", type=int, default=None, help="views per asset, evenly spread; None: all")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize renders to this side before encoding; None: as stored",
    )
    parser.add_argument("--resolution", type=int, default=64, help="voxel grid resolution")
    parser.add_argument("--pool", type=int, default=1, help="average pooling of the rgb extractor")
    parser.add_argument("--batch-size", type=int, default=8, help="views encoded at once")
    parser.add_argument("--device", default="cpu", help="device of extraction and projection")
    parser.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild every feature, also over other settings"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=None,
        help="held-out fraction of the stored split rule, for folders without a split column; None: 0.1",
    )
    parser.add_argument("--split-seed", type=int, default=None, help="seed of that rule; None: 0")
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
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        store_dtype=np.float32 if args.float32 else np.float16,
        settings={"extractor": args.extractor, "weights": args.weights, "pool": args.pool},
        overwrite=args.overwrite,
        heldout_fraction=args.heldout_fraction,
        split_seed=args.split_seed,
        progress=not args.quiet,
    )
    print(
        f"features/{name}: wrote {report.written}, already done {report.existing}, "
        f"failed {len(report.failed)} ({report.train_assets} training, {report.heldout_assets} held-out "
        f"assets with features) in {time.perf_counter() - start:.1f} s; statistics in "
        f"{Path(args.root) / 'features' / name / STATS_FILE}",
        file=sys.stderr,
    )
    return report


if __name__ == "__main__":
    main()
