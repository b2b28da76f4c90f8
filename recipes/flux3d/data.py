"""Dataset reader for TRELLIS-layout folders (real TRELLIS preparations and our procedural ones alike).

One code path: ``metadata.csv``, ``renders[_cond]/<sha256>/transforms.json`` + PNGs, ``voxels/<sha256>.ply``,
``features/<name>/<sha256>.npz``. Missing or corrupt files skip the asset (counted, warned once per epoch).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse3d import SparseTensor
from sparse3d.geometry import read_transforms, scale_intrinsics

__all__ = [
    "AssetItem",
    "AssetBatch",
    "AssetDataset",
    "collate_assets",
    "read_metadata",
    "write_metadata_table",
    "list_assets",
    "read_voxel_ply",
    "positions_to_coords",
    "load_features",
    "load_rgba",
    "load_views",
    "is_true",
    "CORRUPT_ERRORS",
]

CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
    IndexError,
)
"""Exceptions that mark an asset's files as missing or corrupt (the asset is skipped, not the epoch)."""

_PLY_TYPES = {
    "char": "i1",
    "uchar": "u1",
    "short": "i2",
    "ushort": "u2",
    "int": "i4",
    "uint": "u4",
    "float": "f4",
    "double": "f8",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float32": "f4",
    "float64": "f8",
}


def is_true(value: object) -> bool:
    """Whether a ``metadata.csv`` cell means true (``True``, ``true``, ``1``, ``yes``)."""
    return str(value).strip().lower() in ("true", "1", "1.0", "yes")


def read_metadata(root: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Reads ``root/metadata.csv`` as ``(columns, rows)`` of strings (empty lists if the file is absent)."""
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [dict(row) for row in reader]
        return list(reader.fieldnames or []), rows


def write_metadata_table(
    root: str | os.PathLike[str], columns: Sequence[str], rows: Sequence[dict[str, object]]
) -> None:
    """Writes ``root/metadata.csv`` atomically (temporary file in the same folder, then ``os.replace``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in columns})
    path = Path(root) / "metadata.csv"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(temporary, path)


def list_assets(root: str | os.PathLike[str], require: Sequence[str] = ()) -> list[str]:
    """Asset ids (sha256) of a dataset folder, in ``metadata.csv`` order.

    Rows whose column in ``require`` exists and is false are left out (e.g. ``feature_<name>`` for
    assets TRELLIS never featurised); a required column that is absent filters nothing. Without a
    ``metadata.csv`` the ids are the stems of ``voxels/*.ply``, sorted.

    Args:
        root: Dataset folder.
        require: Boolean metadata columns that must be true where present.

    Returns:
        The ids.
    """
    root = Path(root)
    columns, rows = read_metadata(root)
    if not columns:
        return sorted(path.stem for path in (root / "voxels").glob("*.ply"))
    if "sha256" not in columns:
        raise ValueError(f"root: expected a 'sha256' column in {root / 'metadata.csv'}, got {columns}")
    present = [column for column in require if column in columns]
    return [row["sha256"] for row in rows if all(is_true(row[column]) for column in present)]


def read_voxel_ply(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads the vertex positions of a PLY file (ascii or binary, any numeric x/y/z types).

    TRELLIS's ``voxels/<sha256>.ply`` holds one vertex per active voxel at its centre.

    Args:
        path: PLY file.

    Returns:
        float64 array ``[N, 3]``.

    Raises:
        ValueError: Not a PLY, no x/y/z, or fewer bytes/values than the header announces (truncated).
    """
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise ValueError(f"path: {path} is not a PLY file (first line is not 'ply')")
        file_format, elements = None, []
        while True:
            line = handle.readline()
            if not line:
                raise ValueError(f"path: {path} has no 'end_header' line")
            words = line.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                file_format = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property" and elements:
                if words[1] == "list":
                    elements[-1][2].append((words[4], None))
                elif words[1] in _PLY_TYPES:
                    elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
                else:
                    raise ValueError(f"path: {path} has a property of unknown type {words[1]!r}")
        body = handle.read()
    if not elements or elements[0][0] != "vertex":
        raise ValueError(
            f"path: {path}: expected 'vertex' as the first element, got {[e[0] for e in elements]}"
        )
    _, count, properties = elements[0]
    names = [name for name, _ in properties]
    if not {"x", "y", "z"} <= set(names) or any(code is None for _, code in properties):
        raise ValueError(f"path: {path}: expected scalar vertex properties x, y, z, got {names}")
    if file_format == "ascii":
        values = np.array(body.split()[: count * len(names)], dtype=np.float64)
        if values.size != count * len(names):
            raise ValueError(
                f"path: {path} is truncated: {values.size} values, expected {count * len(names)}"
            )
        table = values.reshape(count, len(names))  # [N, P]
        return table[:, [names.index(axis) for axis in "xyz"]]
    if file_format not in ("binary_little_endian", "binary_big_endian"):
        raise ValueError(f"path: {path} has unknown format {file_format!r}")
    order = "<" if file_format == "binary_little_endian" else ">"
    record = np.dtype([(name, order + code) for name, code in properties])
    if len(body) < count * record.itemsize:
        raise ValueError(
            f"path: {path} is truncated: {len(body)} bytes of vertex data, expected {count * record.itemsize}"
        )
    rows = np.frombuffer(body, dtype=record, count=count)
    return np.stack([rows[axis].astype(np.float64) for axis in "xyz"], axis=1)


def positions_to_coords(positions: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """Voxel indices ``floor((p + 0.5) * R)`` of world points, merged to unique voxels (sorted).

    Points at TRELLIS voxel centres give back their indices; positions of a finer grid give the
    coarser voxels that contain them (e.g. a 64^3 PLY read at ``R = 32``).

    Args:
        positions: Array ``[N, 3]`` in the world cube ``[-0.5, 0.5]^3``.
        resolution: Grid resolution ``R``.

    Returns:
        int32 tensor ``[M, 3]``, unique rows in lexicographic order.

    Raises:
        ValueError: A point lies outside the cube (``index < 0`` or ``>= R``).
    """
    points = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"positions: expected shape [N, 3], got {list(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("positions: expected finite values, got NaN or inf")
    index = torch.floor((points + 0.5) * resolution).long()
    outside = (index < 0) | (index >= resolution)
    if bool(outside.any()):
        row = int(outside.any(dim=1).nonzero()[0])
        raise ValueError(
            f"positions: expected points in [-0.5, 0.5)^3 (grid {resolution}), got {points[row].tolist()}"
        )
    return torch.unique(index, dim=0).to(torch.int32)


def load_features(
    path: str | os.PathLike[str], default_resolution: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Reads a ``features/<name>/<sha256>.npz``: ours (``indices``, ``mean``, ``std``, ``resolution``) or
    TRELLIS's (``indices`` uint8, ``patchtokens``).

    Args:
        path: The npz file.
        default_resolution: Grid resolution when the file does not store one (TRELLIS: 64).

    Returns:
        ``(coords int32 [N, 3], mean float32 [N, C], std float32 [N, C] or None, resolution)``.

    Raises:
        ValueError: Missing arrays, mismatched rows, out-of-grid or duplicate indices, non-finite values.
    """
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        if "indices" not in data.files:
            raise ValueError(f"path: {path} lacks 'indices' (has {data.files})")
        key = "mean" if "mean" in data.files else "patchtokens" if "patchtokens" in data.files else None
        if key is None:
            raise ValueError(f"path: {path} lacks 'mean' or 'patchtokens' (has {data.files})")
        indices = np.asarray(data["indices"]).astype(np.int64)
        mean = np.asarray(data[key]).astype(np.float32)
        std = np.asarray(data["std"]).astype(np.float32) if "std" in data.files else None
        resolution = int(data["resolution"]) if "resolution" in data.files else default_resolution
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ValueError(f"path: {path}: expected indices [N, 3], got {list(indices.shape)}")
    if mean.ndim != 2 or mean.shape[0] != indices.shape[0]:
        raise ValueError(f"path: {path}: expected {key} [{indices.shape[0]}, C], got {list(mean.shape)}")
    if std is not None and std.shape != mean.shape:
        raise ValueError(f"path: {path}: expected std {list(mean.shape)}, got {list(std.shape)}")
    if indices.size and (indices.min() < 0 or indices.max() >= resolution):
        raise ValueError(f"path: {path}: indices outside [0, {resolution})")
    if np.unique(indices, axis=0).shape[0] != indices.shape[0]:
        raise ValueError(f"path: {path}: duplicate voxel indices")
    if not np.isfinite(mean).all() or (std is not None and not np.isfinite(std).all()):
        raise ValueError(f"path: {path}: non-finite feature values")
    coords = torch.from_numpy(indices).to(torch.int32)
    return coords, torch.from_numpy(mean), None if std is None else torch.from_numpy(std), resolution


def load_rgba(path: str | os.PathLike[str], size: int | None = None) -> torch.Tensor:
    """Loads a PNG as float32 RGBA ``[4, H, W]`` in ``[0, 1]``, optionally LANCZOS-resized to ``size``."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGBA")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 4]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [4, H, W]


def load_views(
    transforms_path: str | os.PathLike[str],
    indices: Sequence[int] | None = None,
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loads views of a ``transforms.json`` as premultiplied RGB, alpha and OpenCV cameras.

    RGB is multiplied by alpha (black background), as TRELLIS's loaders do.

    Args:
        transforms_path: The json file.
        indices: Frames to load (default all).
        size: Resize the (square) images to this side; intrinsics follow.

    Returns:
        ``(rgb [V, 3, H, W], alpha [V, 1, H, W], viewmats [V, 4, 4], Ks [V, 3, 3])`` float32, ``Ks`` in
        pixels of the returned images.
    """
    frames = read_transforms(transforms_path)  # normalised intrinsics (W = H = 1)
    chosen = list(range(len(frames))) if indices is None else list(indices)
    if any(i < 0 or i >= len(frames) for i in chosen):
        raise ValueError(f"indices: expected frames in [0, {len(frames)}), got {chosen}")
    images = torch.stack([load_rgba(frames.image_paths[i], size) for i in chosen])  # [V, 4, H, W]
    height, width = images.shape[2:]
    if height != width:
        raise ValueError(f"transforms_path: expected square images, got {width} x {height}")
    alpha = images[:, 3:]
    rgb = images[:, :3] * alpha
    Ks = scale_intrinsics(frames.Ks[chosen], float(width), float(height))
    return rgb, alpha, frames.viewmats[chosen], Ks


@dataclass(frozen=True)
class AssetItem:
    """One asset, ready to become a row block of a SparseTensor.

    Attributes:
        sha256: Asset id.
        coords: int32 ``[N, 3]`` voxel indices at ``resolution``.
        mean: float32 ``[N, C]`` per-voxel features (DA-SLAT ``mu``; TRELLIS patch tokens), or ``None``
            when the dataset reads voxels only.
        std: float32 ``[N, C]`` DA-SLAT ``sigma`` or ``None``.
        resolution: Grid resolution ``R``.
        cond_images: float32 ``[V, 3, H, W]`` condition RGB premultiplied by alpha, or ``None``.
        cond_alpha: float32 ``[V, 1, H, W]`` or ``None``.
        viewmats: OpenCV world-to-camera ``[V, 4, 4]`` of the condition views, or ``None``.
        Ks: Pixel intrinsics ``[V, 3, 3]`` of the condition images, or ``None``.
    """

    sha256: str
    coords: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None
    resolution: int
    cond_images: torch.Tensor | None = None
    cond_alpha: torch.Tensor | None = None
    viewmats: torch.Tensor | None = None
    Ks: torch.Tensor | None = None


class AssetDataset(torch.utils.data.Dataset):
    """Per-asset items of a TRELLIS-layout folder (TRELLIS's own preparations or ours).

    ``dataset[i]`` returns an ``AssetItem``, or ``None`` when the asset's
    files are missing or corrupt (truncated PLY, bad npz, missing or unreadable PNG, malformed json); the
    asset is then counted in ``skipped`` (id -> reason) and ``num_skipped``, never raised.
    ``collate_assets`` drops ``None`` items. Iterating the dataset
    (``for item in dataset``) yields the good items and, at the end of the pass, emits one
    ``warnings.warn`` summarising that epoch's skips (also callable as ``end_epoch()``). With DataLoader
    workers each worker counts its own skips; sum ``AssetBatch.num_skipped`` in the training loop.

    Voxels come from the feature npz (``indices``, at the feature resolution) and are cross-checked
    against ``voxels/<id>.ply`` when ``check_voxels``; with ``feature_name=None`` they come from the
    PLY at ``resolution``. Condition views come from ``renders_cond/<id>/`` (or ``renders/<id>/`` if
    that is absent).

    Args:
        root: Dataset folder.
        feature_name: Subfolder of ``features/`` to read (``None``: voxels only).
        resolution: Grid resolution for PLY-only reading and for TRELLIS npz files without one.
        cond_views: Condition views per item (0 for none).
        image_size: Resize condition images to this side (default: as stored).
        random_views: Draw condition views at random (seeded by ``seed``, the epoch and the index);
            otherwise take the first ``cond_views`` frames.
        seed: Seed of the view draws.
        check_voxels: Cross-check npz indices against the voxel PLY.
        assets: Explicit ids (default: ``list_assets``, requiring
            ``feature_<name>`` where the metadata has that column).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        feature_name: str | None = None,
        *,
        resolution: int = 64,
        cond_views: int = 1,
        image_size: int | None = None,
        random_views: bool = False,
        seed: int = 0,
        check_voxels: bool = True,
        assets: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: expected a dataset folder, got {self.root} (not a folder)")
        if cond_views < 0:
            raise ValueError(f"cond_views: expected >= 0, got {cond_views}")
        if resolution < 1:
            raise ValueError(f"resolution: expected >= 1, got {resolution}")
        self.feature_name = feature_name
        self.resolution = resolution
        self.cond_views = cond_views
        self.image_size = image_size
        self.random_views = random_views
        self.seed = seed
        self.check_voxels = check_voxels
        require = [f"feature_{feature_name}"] if feature_name else ["voxelized"]
        self.assets = list(assets) if assets is not None else list_assets(self.root, require)
        self.skipped: dict[str, str] = {}
        self.epoch = 0
        self._epoch_skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.assets)

    @property
    def num_skipped(self) -> int:
        """Distinct assets skipped so far in this process."""
        return len(self.skipped)

    def _load(self, index: int) -> AssetItem:
        sha = self.assets[index]
        std = mean = None
        if self.feature_name is not None:
            path = self.root / "features" / self.feature_name / f"{sha}.npz"
            coords, mean, std, resolution = load_features(path, self.resolution)
            if self.check_voxels:
                from_ply = positions_to_coords(
                    read_voxel_ply(self.root / "voxels" / f"{sha}.ply"), resolution
                )
                if not _same_set(coords, from_ply):
                    raise ValueError(
                        f"voxels/{sha}.ply and the features disagree: {from_ply.shape[0]} vs "
                        f"{coords.shape[0]} voxels at resolution {resolution}"
                    )
        else:
            resolution = self.resolution
            coords = positions_to_coords(read_voxel_ply(self.root / "voxels" / f"{sha}.ply"), resolution)
        item = AssetItem(sha256=sha, coords=coords, mean=mean, std=std, resolution=resolution)
        if self.cond_views == 0:
            return item
        transforms = self.root / "renders_cond" / sha / "transforms.json"
        if not transforms.is_file():
            transforms = self.root / "renders" / sha / "transforms.json"
        with open(transforms, encoding="utf-8") as handle:
            num_frames = len(json.load(handle).get("frames", []))
        if num_frames < self.cond_views:
            raise ValueError(f"{transforms}: expected >= {self.cond_views} frames, got {num_frames}")
        if self.random_views:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            chosen = rng.sample(range(num_frames), self.cond_views)
        else:
            chosen = list(range(self.cond_views))
        rgb, alpha, viewmats, Ks = load_views(transforms, chosen, self.image_size)
        return AssetItem(
            sha256=sha,
            coords=coords,
            mean=mean,
            std=std,
            resolution=resolution,
            cond_images=rgb,
            cond_alpha=alpha,
            viewmats=viewmats,
            Ks=Ks,
        )

    def __getitem__(self, index: int) -> AssetItem | None:
        """The asset at ``index``, or ``None`` (counted in ``skipped``) if its files are missing/corrupt."""
        if not 0 <= index < len(self.assets):
            raise IndexError(f"index: expected 0 <= index < {len(self.assets)}, got {index}")
        try:
            return self._load(index)
        except CORRUPT_ERRORS as error:
            reason = f"{type(error).__name__}: {error}"
            self.skipped[self.assets[index]] = reason
            self._epoch_skipped[self.assets[index]] = reason
            return None

    def end_epoch(self) -> int:
        """Warns once with this epoch's skip summary (if any) and starts a new epoch; returns the count."""
        count = len(self._epoch_skipped)
        if count:
            sha, reason = next(iter(self._epoch_skipped.items()))
            warnings.warn(
                f"AssetDataset({self.root}): skipped {count} of {len(self.assets)} assets with missing or "
                f"corrupt files in epoch {self.epoch} (first: {sha}: {reason}); see dataset.skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        self._epoch_skipped = {}
        self.epoch += 1
        return count

    def __iter__(self) -> Iterator[AssetItem]:
        """One epoch over the good assets, then ``end_epoch()``."""
        for index in range(len(self.assets)):
            item = self[index]
            if item is not None:
                yield item
        self.end_epoch()


def _same_set(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.shape != second.shape:
        return False
    key = lambda c: c[:, 0].long() * (1 << 42) + c[:, 1].long() * (1 << 21) + c[:, 2].long()  # noqa: E731
    return bool(torch.equal(key(first).sort().values, key(second).sort().values))


@dataclass(frozen=True)
class AssetBatch:
    """A collated batch.

    Attributes:
        latents: SparseTensor of the batch's voxels; feats ``[N, 2C] = cat(mean, std)`` (DA-SLAT, draw
            ``mu + sigma * eps`` with ``sparse3d.geometry.sample_latent``), ``[N, C]`` without std, or
            ``[N, 0]`` for voxels-only datasets.
        cond_images: ``[B, V, 3, H, W]`` premultiplied RGB, or ``None``.
        cond_alpha: ``[B, V, 1, H, W]`` or ``None``.
        viewmats: ``[B, V, 4, 4]`` or ``None``.
        Ks: ``[B, V, 3, 3]`` or ``None``.
        sha256: The ``B`` asset ids.
        num_skipped: ``None`` items dropped from this batch (skipped assets).
    """

    latents: SparseTensor
    cond_images: torch.Tensor | None
    cond_alpha: torch.Tensor | None
    viewmats: torch.Tensor | None
    Ks: torch.Tensor | None
    sha256: list[str]
    num_skipped: int


def collate_assets(items: Sequence[AssetItem | None]) -> AssetBatch | None:
    """Collates items into a SparseTensor batch, dropping ``None`` (skipped) items.

    Args:
        items: Items from ``AssetDataset``.

    Returns:
        An ``AssetBatch``, or ``None`` if every item was skipped (skip
        the step).

    Raises:
        ValueError: Items disagree on resolution, channels, std presence or condition-image size.
    """
    good = [item for item in items if item is not None]
    if not good:
        return None
    first = good[0]
    for item in good[1:]:
        if item.resolution != first.resolution:
            raise ValueError(f"items: expected one resolution, got {first.resolution} and {item.resolution}")
        if (item.mean is None) != (first.mean is None) or (item.std is None) != (first.std is None):
            raise ValueError("items: expected all items with or all without mean/std features")
    feats = []
    for item in good:
        if item.mean is None:
            feats.append(torch.zeros(item.coords.shape[0], 0))
        else:
            feats.append(item.mean if item.std is None else torch.cat([item.mean, item.std], dim=1))
    batch = torch.cat(
        [torch.full((item.coords.shape[0], 1), b, dtype=torch.int32) for b, item in enumerate(good)]
    )  # [N, 1]
    coords = torch.cat([batch, torch.cat([item.coords for item in good])], dim=1)  # [N, 4]
    latents = SparseTensor(coords, torch.cat(feats), batch_size=len(good), spatial_shape=first.resolution)

    def stack(name: str) -> torch.Tensor | None:
        values = [getattr(item, name) for item in good]
        if any(value is None for value in values):
            return None
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) > 1:
            raise ValueError(f"items: expected equal {name} shapes (pass image_size), got {sorted(shapes)}")
        return torch.stack(values)

    return AssetBatch(
        latents=latents,
        cond_images=stack("cond_images"),
        cond_alpha=stack("cond_alpha"),
        viewmats=stack("viewmats"),
        Ks=stack("Ks"),
        sha256=[item.sha256 for item in good],
        num_skipped=len(items) - len(good),
    )
