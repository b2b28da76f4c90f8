"""Dataset reader for TRELLIS-layout folders (real TRELLIS preparations and our procedural ones alike).

One code path: ``metadata.csv``, ``renders[_cond]/<sha256>/transforms.json`` + PNGs, ``voxels/<sha256>.ply``,
``features/<name>/<sha256>.npz``. On top of the file readers:

- **Records.** ``procedural.py`` writes ``dataset.json`` and ``prepare.py`` writes
  ``features/<name>/features.json``: the settings a folder was made with and whether its generation
  completed. Readers refuse a folder whose record says it is incomplete
  ([`check_complete`][recipes.flux3d.data.check_complete]); folders without a record (TRELLIS's own) are
  read as they are.
- **Split.** [`split_assets`][recipes.flux3d.data.split_assets] returns ``(train, heldout)`` asset ids: from
  the ``split`` column of ``metadata.csv`` (procedural data: held-out assets come from a seed stream
  disjoint from the training one), otherwise from a seeded hash rule stored once in ``split.json``.
- **Statistics.** ``features/<name>/stats.json`` holds the per-channel mean and std of ``mu`` over the
  training split ([`FeatureStats`][recipes.flux3d.data.FeatureStats]).
- **Training data.** [`open_assets`][recipes.flux3d.data.open_assets] opens a split once (features checked
  against the voxels, views listed, images optionally decoded into memory; unusable assets skipped with
  one warning, or a clear error when none is usable);
  [`DecoderDataset`][recipes.flux3d.data.DecoderDataset] and
  [`LatentDataset`][recipes.flux3d.data.LatentDataset] serve it to a ``DataLoader`` by
  ``(index, item_seed)`` keys, so every item is reproducible under any number of workers.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import operator
import os
import random
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse3d import SparseTensor
from sparse3d.geometry import read_transforms, reparameterize, scale_intrinsics

__all__ = [
    "CORRUPT_ERRORS",
    "DATASET_RECORD",
    "FEATURES_RECORD",
    "STATS_FILE",
    "SPLIT_FILE",
    "SPLITS",
    "HELDOUT_FRACTION",
    "DatasetError",
    "UnusableAssetError",
    "is_true",
    "write_atomic",
    "read_record",
    "write_record",
    "check_settings",
    "check_complete",
    "read_metadata",
    "write_metadata_table",
    "list_assets",
    "heldout_rule",
    "split_assets",
    "read_voxel_ply",
    "positions_to_coords",
    "load_features",
    "read_rgba",
    "load_rgba",
    "load_views",
    "FeatureStats",
    "compute_feature_stats",
    "load_feature_stats",
    "Views",
    "OpenedAsset",
    "read_asset_volume",
    "open_views",
    "straight_to_float",
    "BACKGROUNDS",
    "AssetStore",
    "open_assets",
    "DecoderItem",
    "DecoderBatch",
    "DecoderDataset",
    "LatentItem",
    "LatentBatch",
    "LatentDataset",
    "collate_decoder",
    "collate_latents",
    "make_loader",
    "AssetItem",
    "AssetBatch",
    "AssetDataset",
    "collate_assets",
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

DATASET_RECORD = "dataset.json"
"""``procedural.py``'s record in the dataset folder: ``complete``, counts, seeds, settings, the command."""
FEATURES_RECORD = "features.json"
"""``prepare.py``'s record in ``features/<name>/``: ``complete``, settings, counts, failed assets."""
STATS_FILE = "stats.json"
"""Per-channel statistics of ``mu`` over the training split, in ``features/<name>/``."""
SPLIT_FILE = "split.json"
"""The stored split rule of a folder whose ``metadata.csv`` has no ``split`` column."""
SPLITS = ("train", "heldout")
"""Values of the ``split`` column."""
HELDOUT_FRACTION = 0.1
"""Default held-out fraction of the hash rule (folders without a ``split`` column)."""

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


class DatasetError(ValueError):
    """A dataset folder that cannot be used as a whole: empty, incomplete, or without a usable asset."""


class UnusableAssetError(ValueError):
    """One asset's files are missing or corrupt.

    Args:
        reason: Short category, e.g. ``"features npz unreadable"`` or ``"render image empty (0 bytes)"``
            (counted in error summaries).
        detail: The file and what is wrong with it.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_true(value: object) -> bool:
    """Whether a ``metadata.csv`` cell means true (``True``, ``true``, ``1``, ``yes``)."""
    return str(value).strip().lower() in ("true", "1", "1.0", "yes")


# ---------------------------------------------------------------------------------------------- records


def write_atomic(path: str | os.PathLike[str], payload: bytes, *, sync: bool = False) -> None:
    """Writes ``payload`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file: it sees the old one or the new one.

    Args:
        path: The file.
        payload: Its bytes.
        sync: ``fsync`` before the rename (survives a power cut, slower).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_record(path: str | os.PathLike[str]) -> dict | None:
    """Reads a JSON record (``dataset.json``, ``features.json``, ``split.json``...); ``None`` if absent.

    Raises:
        ValueError: The file exists but is not a JSON object (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"path: {path} is not a readable JSON record ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(record, dict):
        raise ValueError(f"path: expected a JSON object in {path}, got {type(record).__name__}")
    return record


def write_record(path: str | os.PathLike[str], record: Mapping) -> None:
    """Writes a JSON record atomically (non-finite floats are refused, so the file stays valid JSON)."""
    write_atomic(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value))  # tuples -> lists, as they come back from a record


def check_settings(recorded: Mapping, requested: Mapping, *, where: str, fix: str) -> None:
    """Refuses to continue work made with other settings.

    Settings missing from ``recorded`` (records of an older version) are not compared.

    Args:
        recorded: Settings in the folder's record.
        requested: Settings of this run.
        where: What was made, for the message (e.g. ``"features/rgb"``).
        fix: What the user can do (e.g. ``"pass --overwrite to rebuild it"``).

    Raises:
        ValueError: A setting differs; the message names it and both values.
    """
    for name, value in _jsonable(dict(requested)).items():  # type: ignore[union-attr]
        if name in recorded and recorded[name] != value:
            raise ValueError(
                f"{name}: {where} was made with {name}={recorded[name]!r}, this run asks for {value!r}; "
                f"use the recorded value, or {fix}"
            )


def _incomplete_message(record: Mapping, what: str, folder: Path) -> str:
    done, total = record.get("done"), record.get("total")
    progress = f" ({done} of {total} assets done)" if done is not None and total is not None else ""
    command = record.get("command")
    how = f"re-run `{command}`" if command else "re-run the command that made it with the same settings"
    return (
        f"data: {what} {folder} is incomplete: its generation did not finish{progress} "
        f"({folder / ('dataset.json' if what == 'dataset' else FEATURES_RECORD)} says complete: false); "
        f"{how} to finish it (it resumes where it stopped)"
    )


def check_complete(root: str | os.PathLike[str], feature_name: str | None = None) -> None:
    """Refuses a dataset (and its ``features/<feature_name>``) whose generation record says incomplete.

    A folder without a record (``dataset.json``, ``features/<name>/features.json``) is accepted: it was
    not made by our scripts (e.g. a TRELLIS preparation).

    Args:
        root: Dataset folder.
        feature_name: Feature folder to check too.

    Raises:
        DatasetError: A record says ``complete: false``; the message says how to finish it.
    """
    root = Path(root)
    record = read_record(root / DATASET_RECORD)
    if record is not None and record.get("complete") is not True:
        raise DatasetError(_incomplete_message(record, "dataset", root))
    if feature_name is not None:
        folder = root / "features" / feature_name
        record = read_record(folder / FEATURES_RECORD)
        if record is not None and record.get("complete") is not True:
            raise DatasetError(_incomplete_message(record, "feature folder", folder))


# --------------------------------------------------------------------------------------------- metadata


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
    write_atomic(Path(root) / "metadata.csv", buffer.getvalue().encode("utf-8"))


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


def _no_assets_message(root: Path, require: Sequence[str]) -> str:
    columns, rows = read_metadata(root)
    if not root.is_dir():
        return f"data: expected a dataset folder, got {root} (not a folder)"
    if not columns:
        return (
            f"data: {root} holds no assets: no metadata.csv and no voxels/*.ply; make a dataset with "
            f"`python recipes/flux3d/procedural.py --out {root}` or point to a TRELLIS-layout folder"
        )
    if not rows:
        return f"data: {root / 'metadata.csv'} lists no assets (only a header)"
    filters = [
        f"{column} = True: {sum(is_true(row[column]) for row in rows)}"
        for column in require
        if column in columns
    ]
    hint = ""
    if any(column.startswith("feature_") for column in require):
        hint = f"; make features with `python recipes/flux3d/prepare.py --root {root}`"
    return (
        f"data: none of the {len(rows)} assets in {root / 'metadata.csv'} passes the filters "
        f"({', '.join(filters)}){hint}"
    )


# ------------------------------------------------------------------------------------------------ split


def heldout_rule(sha256: str, seed: int, fraction: float) -> bool:
    """The stored split rule: an asset is held out when ``sha256("<seed>:<id>")``, read as a number in
    ``[0, 1)`` (its first 8 bytes, little-endian, over ``2^64``), is below ``fraction``.

    Args:
        sha256: Asset id.
        seed: Split seed.
        fraction: Expected held-out fraction in ``[0, 1]``.

    Returns:
        Whether the asset is held out.
    """
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0**64


def split_assets(
    root: str | os.PathLike[str],
    *,
    require: Sequence[str] = (),
    heldout_fraction: float | None = None,
    seed: int | None = None,
) -> tuple[list[str], list[str]]:
    """The training and held-out asset ids of a dataset folder; the two lists are disjoint.

    - ``metadata.csv`` with a ``split`` column (``procedural.py`` writes one): ``train`` / ``heldout`` rows.
      Procedural held-out assets come from a seed stream disjoint from the training one.
    - Otherwise (e.g. a TRELLIS folder): the hash rule [`heldout_rule`][recipes.flux3d.data.heldout_rule]
      with ``(seed, heldout_fraction)`` stored in ``split.json`` on the first call and read back on every
      later one, so the split never changes under a run.

    Refuses an incomplete dataset ([`check_complete`][recipes.flux3d.data.check_complete]) and one without
    assets.

    Args:
        root: Dataset folder.
        require: Boolean metadata columns that must be true where present (as
            [`list_assets`][recipes.flux3d.data.list_assets]; e.g. ``feature_<name>``).
        heldout_fraction: Fraction of the rule (default ``HELDOUT_FRACTION``); only for folders without a
            ``split`` column, and it must match a stored ``split.json``.
        seed: Seed of the rule (default 0); same conditions.

    Returns:
        ``(train_ids, heldout_ids)`` in ``metadata.csv`` order.

    Raises:
        DatasetError: Incomplete or empty dataset (the message says what is missing).
        ValueError: A bad ``split`` value, a fraction outside ``[0, 1]``, or ``heldout_fraction``/``seed``
            that disagree with the folder's stored split.
    """
    root = Path(root)
    check_complete(root)
    ids = list_assets(root, require)
    if not ids:
        raise DatasetError(_no_assets_message(root, require))
    columns, rows = read_metadata(root)
    if "split" in columns:
        if heldout_fraction is not None or seed is not None:
            raise ValueError(
                f"heldout_fraction: {root / 'metadata.csv'} has a 'split' column, which decides the split; "
                f"got heldout_fraction={heldout_fraction}, seed={seed} (leave them unset)"
            )
        split_of = {row["sha256"]: row["split"].strip() for row in rows}
        bad = sorted({split_of[sha] for sha in ids} - set(SPLITS))
        if bad:
            raise ValueError(f"split: expected values {SPLITS} in {root / 'metadata.csv'}, got {bad}")
        return [sha for sha in ids if split_of[sha] == "train"], [
            sha for sha in ids if split_of[sha] == "heldout"
        ]
    path = root / SPLIT_FILE
    record = read_record(path)
    if record is None:
        fraction = HELDOUT_FRACTION if heldout_fraction is None else float(heldout_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"heldout_fraction: expected a value in [0, 1], got {fraction}")
        record = {
            "rule": "heldout if int.from_bytes(sha256(f'{seed}:{id}')[:8], 'little') / 2**64 < fraction",
            "seed": 0 if seed is None else int(seed),
            "fraction": fraction,
            "num_assets": len(ids),
            "heldout": [sha for sha in ids if heldout_rule(sha, 0 if seed is None else int(seed), fraction)],
        }
        write_record(path, record)
    else:
        for name, value in (("heldout_fraction", heldout_fraction), ("seed", seed)):
            stored = record.get("fraction" if name == "heldout_fraction" else "seed")
            if value is not None and value != stored:
                raise ValueError(
                    f"{name}: {path} stores the split with {name}={stored}, got {value}; leave it unset, or "
                    f"delete {path} to re-split (evaluations made before are then not comparable)"
                )
    heldout = {sha for sha in ids if heldout_rule(sha, int(record["seed"]), float(record["fraction"]))}
    return [sha for sha in ids if sha not in heldout], [sha for sha in ids if sha in heldout]


# ------------------------------------------------------------------------------------------------ files


def read_voxel_ply(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads the vertex positions of a PLY file (ascii or binary, any numeric x/y/z types).

    TRELLIS's ``voxels/<sha256>.ply`` holds one vertex per active voxel at its centre.

    Args:
        path: PLY file.

    Returns:
        float64 array ``[N, 3]``.

    Raises:
        ValueError: Not a PLY, no x/y/z, malformed, or fewer bytes/values than the header announces
            (truncated); every message names the file.
    """
    try:
        return _read_voxel_ply(path)
    except (ValueError, IndexError, UnicodeError) as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"path: {path} is a malformed PLY ({type(error).__name__}: {error})") from error


def _read_voxel_ply(path: str | os.PathLike[str]) -> np.ndarray:
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
        ValueError: Not a readable npz (truncated, not a zip), missing arrays, mismatched rows, out-of-grid
            or duplicate indices, non-finite values; every message names the file.
    """
    try:
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
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"path: {path} is not a readable npz ({type(error).__name__}: {error})") from error
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


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error)


def read_rgba(path: str | os.PathLike[str], size: int | None = None) -> torch.Tensor:
    """Decodes an image as uint8 straight (not premultiplied) RGBA ``[4, H, W]``, optionally LANCZOS-resized.

    Args:
        path: PNG (or any format PIL reads).
        size: Resize to ``size x size`` (default: as stored).

    Returns:
        uint8 tensor ``[4, H, W]``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a readable image (truncated, empty, not an image); the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGBA")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            array = np.array(image, dtype=np.uint8)  # [H, W, 4], a copy
    except FileNotFoundError:
        raise
    except _IMAGE_ERRORS as error:
        raise ValueError(f"path: {path} is not a readable image ({type(error).__name__}: {error})") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [4, H, W]


def load_rgba(path: str | os.PathLike[str], size: int | None = None) -> torch.Tensor:
    """Loads a PNG as float32 RGBA ``[4, H, W]`` in ``[0, 1]``, optionally LANCZOS-resized to ``size``."""
    return read_rgba(path, size).float() / 255.0


def _read_frames(transforms_path: str | os.PathLike[str]):
    try:
        return read_transforms(transforms_path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        if str(transforms_path) in str(error):
            raise
        raise ValueError(
            f"path: {transforms_path} is not a readable transforms.json ({type(error).__name__}: {error})"
        ) from error


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
    frames = _read_frames(transforms_path)  # normalised intrinsics (W = H = 1)
    chosen = list(range(len(frames))) if indices is None else list(indices)
    if any(i < 0 or i >= len(frames) for i in chosen):
        raise ValueError(f"indices: expected frames in [0, {len(frames)}), got {chosen}")
    images = torch.stack([load_rgba(frames.image_paths[i], size) for i in chosen])  # [V, 4, H, W]
    height, width = images.shape[2:]
    if height != width:
        raise ValueError(
            f"transforms_path: expected square images, got {width} x {height} in {transforms_path}"
        )
    alpha = images[:, 3:]
    rgb = images[:, :3] * alpha
    Ks = scale_intrinsics(frames.Ks[chosen], float(width), float(height))
    return rgb, alpha, frames.viewmats[chosen], Ks


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FeatureStats:
    """Per-channel statistics of DA-SLAT ``mu`` over a dataset's training split (``stats.json``).

    The decoder and SMDiT stages train on normalised latents ``(mu - mean) / std`` (and ``sigma / std``, so
    ``mu + sigma * eps`` is normalised as a whole); a latent leaving the pipeline (a generated volume, an
    exported feature) is un-normalised with [`denormalize`][recipes.flux3d.data.FeatureStats.denormalize].

    Attributes:
        mean: float32 ``[C]``.
        std: float32 ``[C]``, population std over all training voxels, ``> 0``.
        num_assets: Training assets pooled.
        num_voxels: Voxels pooled.
    """

    mean: torch.Tensor
    std: torch.Tensor
    num_assets: int
    num_voxels: int

    def __post_init__(self) -> None:
        if self.mean.dim() != 1 or self.std.shape != self.mean.shape:
            raise ValueError(
                f"mean, std: expected two [C] tensors, got {list(self.mean.shape)} and {list(self.std.shape)}"
            )
        if not bool(torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise ValueError("mean, std: expected finite values, got NaN or inf")
        flat = (self.std <= 0).nonzero()[:, 0].tolist()
        if flat:
            raise ValueError(
                f"std: expected > 0 in every channel (a latent is divided by it), got 0 in channels {flat}: "
                "those channels are constant over the training split"
            )

    @property
    def channels(self) -> int:
        """``C``."""
        return int(self.mean.shape[0])

    def _check(self, values: torch.Tensor, name: str) -> None:
        if values.dim() != 2 or values.shape[1] != self.channels:
            raise ValueError(f"{name}: expected shape [N, {self.channels}], got {list(values.shape)}")

    def normalize(
        self, mean: torch.Tensor, std: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``((mu - mean) / std, sigma / std)``.

        Args:
            mean: ``mu`` ``[N, C]``.
            std: ``sigma`` ``[N, C]`` or ``None``.

        Returns:
            The normalised pair (``None`` stays ``None``).
        """
        self._check(mean, "mean")
        scale = self.std.to(mean)
        normalised = (mean - self.mean.to(mean)) / scale
        if std is None:
            return normalised, None
        self._check(std, "std")
        return normalised, std / scale

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Back to feature units: ``latents * std + mean``, for ``[N, C]``."""
        self._check(latents, "latents")
        return latents * self.std.to(latents) + self.mean.to(latents)

    def to_dict(self) -> dict:
        """JSON-ready form (what ``stats.json`` holds)."""
        return {
            "mean": [float(v) for v in self.mean.double()],
            "std": [float(v) for v in self.std.double()],
            "num_assets": self.num_assets,
            "num_voxels": self.num_voxels,
            "split": "train",
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> FeatureStats:
        """Inverse of [`to_dict`][recipes.flux3d.data.FeatureStats.to_dict]."""
        return cls(
            mean=torch.tensor(values["mean"], dtype=torch.float32),
            std=torch.tensor(values["std"], dtype=torch.float32),
            num_assets=int(values["num_assets"]),
            num_voxels=int(values["num_voxels"]),
        )


def compute_feature_stats(
    root: str | os.PathLike[str], feature_name: str, assets: Sequence[str]
) -> FeatureStats:
    """Per-channel mean and population std of ``mu`` over every voxel of ``assets`` (float64, one pass).

    Per-asset moments are merged with Chan et al.'s pairwise update, so the result matches the
    statistics of all voxels concatenated.

    Args:
        root: Dataset folder.
        feature_name: ``features/<name>`` folder.
        assets: Asset ids (the training split).

    Returns:
        The statistics.

    Raises:
        ValueError: No assets or no voxels, or an unreadable npz (the message names it).
    """
    if not assets:
        raise ValueError("assets: expected at least one training asset to compute statistics over, got none")
    count, mean, m2 = 0, None, None
    for sha in assets:
        _, values, _, _ = load_features(Path(root) / "features" / feature_name / f"{sha}.npz")
        values = values.double()  # [N, C]
        n = values.shape[0]
        if n == 0:
            continue
        asset_mean = values.mean(dim=0)
        asset_m2 = (values - asset_mean).square().sum(dim=0)
        if mean is None:
            count, mean, m2 = n, asset_mean, asset_m2
            continue
        delta = asset_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + asset_m2 + delta.square() * (count * n / total)
        count = total
    if mean is None:
        raise ValueError(
            f"assets: the {len(assets)} training assets of features/{feature_name} have no voxels"
        )
    std = (m2 / count).sqrt()
    return FeatureStats(mean=mean.float(), std=std.float(), num_assets=len(assets), num_voxels=count)


def load_feature_stats(root: str | os.PathLike[str], feature_name: str) -> FeatureStats:
    """Reads ``features/<feature_name>/stats.json`` (written by ``prepare.py``).

    Raises:
        FileNotFoundError: No statistics (the message says how to make them).
    """
    path = Path(root) / "features" / feature_name / STATS_FILE
    record = read_record(path)
    if record is None:
        raise FileNotFoundError(
            f"stats: expected the feature statistics {path}, got no such file; re-run "
            f"`python recipes/flux3d/prepare.py --root {root} --name {feature_name}` (it writes them, also "
            "for folders whose features are all done)"
        )
    try:
        return FeatureStats.from_dict(record)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"path: {path} is not a valid statistics record ({type(error).__name__}: {error})"
        ) from error


# ------------------------------------------------------------------------------------------- opened data


@dataclass(frozen=True)
class Views:
    """The cameras of one ``renders[_cond]/<id>/`` folder and, when cached, its decoded images.

    Attributes:
        viewmats: OpenCV world-to-camera ``[V, 4, 4]`` float32.
        Ks: Pixel intrinsics ``[V, 3, 3]`` of images of ``size``.
        paths: The ``V`` image files.
        size: ``(W, H)`` of the images served (stored size, or the requested resize).
        resize: Side the images are resized to on decode (``None``: as stored).
        images: uint8 straight RGBA ``[V, 4, H, W]`` when cached, else ``None`` (decoded on demand).
    """

    viewmats: torch.Tensor
    Ks: torch.Tensor
    paths: tuple[Path, ...]
    size: tuple[int, int]
    resize: int | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def rgba(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 straight RGBA ``[v, 4, H, W]`` of the frames ``indices`` (indexing the cache, or decoding).

        Raises:
            ValueError: A frame decodes to another size than the folder's first image (names the file).
        """
        if self.images is not None:
            return self.images[list(indices)]
        images = []
        for index in indices:
            image = read_rgba(self.paths[index], self.resize)
            if (image.shape[2], image.shape[1]) != self.size:
                raise ValueError(
                    f"path: expected a {self.size[0]} x {self.size[1]} image (the size of the folder's first "
                    f"frame), got {image.shape[2]} x {image.shape[1]} in {self.paths[index]}"
                )
            images.append(image)
        return torch.stack(images)  # [v, 4, H, W]

    def cached(self) -> Views:
        """The same views with every image decoded into memory."""
        if self.images is not None:
            return self
        return dataclasses.replace(self, images=self.rgba(range(len(self))))


@dataclass(frozen=True)
class OpenedAsset:
    """One asset opened once: its latent volume checked against its voxels, its views listed.

    Attributes:
        sha256: Asset id.
        coords: int32 ``[N, 3]`` voxel indices at ``resolution``.
        mean: float32 ``[N, C]`` DA-SLAT ``mu``.
        std: float32 ``[N, C]`` ``sigma``, or ``None`` (deterministic extractors, e.g. ``rgb``).
        resolution: Grid resolution ``R``.
        renders: ``renders/<id>/`` views (decoder targets), or ``None`` when not opened.
        cond: ``renders_cond/<id>/`` views (condition images; ``renders/`` when the folder has no
            ``renders_cond``), or ``None`` when not opened.
    """

    sha256: str
    coords: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor | None
    resolution: int
    renders: Views | None = None
    cond: Views | None = None

    def nbytes(self) -> int:
        """Bytes of the decoded images this asset holds or would hold when cached."""
        total = 0
        for views in (self.renders, self.cond):
            if views is not None:
                total += len(views) * views.size[0] * views.size[1] * 4
        return total


def _require_file(path: Path, what: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UnusableAssetError(f"{what} missing", str(path)) from None
    if size == 0:
        raise UnusableAssetError(f"{what} empty (0 bytes)", str(path))


def read_asset_volume(
    root: str | os.PathLike[str],
    sha256: str,
    feature_name: str | None,
    resolution: int = 64,
    check_voxels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """One asset's voxels and features, every failure named by a short reason.

    Args:
        root: Dataset folder.
        sha256: Asset id.
        feature_name: ``features/<name>`` to read, or ``None`` for the voxels of ``voxels/<id>.ply`` only.
        resolution: Grid of the PLY-only read, and of TRELLIS npz files that store none.
        check_voxels: Check the npz indices against the PLY (the same voxel set).

    Returns:
        ``(coords int32 [N, 3], mean [N, C] or None, std [N, C] or None, resolution)``.

    Raises:
        UnusableAssetError: A file is missing, empty or unreadable, or the voxels disagree with the
            features; ``reason`` is the category (e.g. ``"voxel PLY missing"``).
    """
    root = Path(root)
    ply = root / "voxels" / f"{sha256}.ply"

    def voxels(at: int) -> torch.Tensor:
        _require_file(ply, "voxel PLY")
        try:
            return positions_to_coords(read_voxel_ply(ply), at)
        except CORRUPT_ERRORS as error:
            raise UnusableAssetError("voxel PLY unreadable", str(error)) from error

    if feature_name is None:
        return voxels(resolution), None, None, resolution
    npz = root / "features" / feature_name / f"{sha256}.npz"
    _require_file(npz, "features npz")
    try:
        coords, mean, std, resolution = load_features(npz, resolution)
    except CORRUPT_ERRORS as error:
        raise UnusableAssetError("features npz unreadable", str(error)) from error
    if check_voxels:
        from_ply = voxels(resolution)
        if not _same_set(coords, from_ply):
            raise UnusableAssetError(
                "voxels disagree with features",
                f"{ply} has {from_ply.shape[0]} voxels, {npz} {coords.shape[0]}, at resolution {resolution}",
            )
    return coords, mean, std, resolution


def open_views(
    folder: str | os.PathLike[str], what: str = "render", size: int | None = None, min_views: int = 1
) -> Views:
    """Reads the cameras of a ``renders[_cond]/<id>/`` folder and checks its images without decoding them.

    Every image must exist and be non-empty; the first one's header gives the size (unless ``size``).

    Args:
        folder: The folder with ``transforms.json``.
        what: Name of the folder's role in error reasons (``"render"``, ``"condition render"``).
        size: Images are resized to ``size x size`` on decode (intrinsics follow).
        min_views: Minimum number of frames.

    Returns:
        [`Views`][recipes.flux3d.data.Views] without cached images.

    Raises:
        UnusableAssetError: Missing, empty or unreadable ``transforms.json`` or image, or too few frames.
    """
    folder = Path(folder)
    transforms = folder / "transforms.json"
    _require_file(transforms, f"{what} transforms.json")
    try:
        frames = _read_frames(transforms)
    except CORRUPT_ERRORS as error:
        raise UnusableAssetError(f"{what} transforms.json unreadable", str(error)) from error
    if len(frames) < min_views:
        raise UnusableAssetError(
            f"{what}: too few views", f"{transforms}: expected >= {min_views} frames, got {len(frames)}"
        )
    for path in frames.image_paths:
        _require_file(path, f"{what} image")
    if size is None:
        from PIL import Image

        try:
            with Image.open(frames.image_paths[0]) as image:
                width, height = image.size
        except _IMAGE_ERRORS as error:
            raise UnusableAssetError(
                f"{what} image unreadable", f"{frames.image_paths[0]}: {type(error).__name__}: {error}"
            ) from error
    else:
        width = height = size
    return Views(
        viewmats=frames.viewmats,
        Ks=scale_intrinsics(frames.Ks, float(width), float(height)),
        paths=tuple(frames.image_paths),
        size=(int(width), int(height)),
        resize=size,
    )


def _same_set(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.shape != second.shape:
        return False
    key = lambda c: c[:, 0].long() * (1 << 42) + c[:, 1].long() * (1 << 21) + c[:, 2].long()  # noqa: E731
    return bool(torch.equal(key(first).sort().values, key(second).sort().values))


class AssetStore:
    """The usable assets of one split, opened by [`open_assets`][recipes.flux3d.data.open_assets].

    Indexing gives an [`OpenedAsset`][recipes.flux3d.data.OpenedAsset]; the datasets index it by position.

    Attributes:
        root: Dataset folder.
        feature_name: The ``features/<name>`` folder read.
        split: ``"train"``, ``"heldout"``, or ``"explicit"`` (ids given by the caller).
        assets: The usable assets, in ``metadata.csv`` order.
        skipped: Asset id -> reason, for the assets left out at open.
        cached: Whether the images are decoded in memory.
    """

    def __init__(
        self,
        root: Path,
        feature_name: str,
        split: str,
        assets: list[OpenedAsset],
        skipped: dict[str, str],
        cached: bool,
    ) -> None:
        self.root = root
        self.feature_name = feature_name
        self.split = split
        self.assets = assets
        self.skipped = skipped
        self.cached = cached

    def __len__(self) -> int:
        return len(self.assets)

    def __getitem__(self, index: int) -> OpenedAsset:
        return self.assets[index]

    @property
    def sha256(self) -> list[str]:
        """The usable assets' ids."""
        return [asset.sha256 for asset in self.assets]

    @property
    def resolution(self) -> int:
        """Grid resolution ``R`` of the features."""
        return self.assets[0].resolution

    @property
    def channels(self) -> int:
        """Channels ``C`` of ``mu``."""
        return int(self.assets[0].mean.shape[1])

    @property
    def has_std(self) -> bool:
        """Whether the features store ``sigma`` (the latent is then ``mu + sigma * eps``)."""
        return self.assets[0].std is not None

    def summary(self) -> dict:
        """JSON-ready description: root, feature, split, counts, skip reasons (counted), resolution."""
        return {
            "root": str(self.root),
            "feature": self.feature_name,
            "split": self.split,
            "assets": len(self.assets),
            "skipped": len(self.skipped),
            "skip_reasons": dict(Counter(reason.split(": ")[0] for reason in self.skipped.values())),
            "cached": self.cached,
            "resolution": self.resolution,
            "channels": self.channels,
            "has_std": self.has_std,
        }


def _reason_counts(errors: Mapping[str, UnusableAssetError]) -> str:
    counts = Counter(error.reason for error in errors.values())
    return ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())


def open_assets(
    root: str | os.PathLike[str],
    feature_name: str | None = None,
    *,
    split: str = "train",
    assets: Sequence[str] | None = None,
    renders: bool = True,
    cond_renders: bool = True,
    image_size: int | None = None,
    cond_image_size: int | None = None,
    min_views: int = 1,
    cache: bool | str = "auto",
    cache_limit_bytes: int = 4 << 30,
    check_voxels: bool = True,
    default_resolution: int = 64,
    threads: int | None = None,
    progress: bool = True,
) -> AssetStore:
    """Opens one split of a prepared dataset once, for the training datasets.

    Feeds the [`DecoderDataset`][recipes.flux3d.data.DecoderDataset] and the
    [`LatentDataset`][recipes.flux3d.data.LatentDataset].

    Per asset, once: the npz is read and validated, its voxels are checked against ``voxels/<id>.ply``
    (``check_voxels``), ``transforms.json`` is read and every image is checked to exist and be non-empty.
    With the cache on, every image is decoded (and resized) into uint8 memory with a progress bar, so a
    training step only indexes tensors; otherwise workers decode the images they need. Assets that fail
    are skipped, counted in ``skipped`` and reported in one warning; if none is usable the call raises,
    listing the reasons with their counts.

    Args:
        root: Dataset folder with ``features/<name>/`` from ``prepare.py``.
        feature_name: ``features/<name>`` folder (default: the only one present).
        split: ``"train"`` or ``"heldout"`` (by [`split_assets`][recipes.flux3d.data.split_assets]).
        assets: Explicit asset ids instead of a split (e.g. one asset for sampling).
        renders: Open ``renders/`` (decoder targets).
        cond_renders: Open ``renders_cond/`` (condition views; ``renders/`` if an asset has none).
        image_size: Resize ``renders/`` images to this side (default: as stored).
        cond_image_size: Resize condition images to this side (default: as stored).
        min_views: Minimum frames per opened folder (e.g. the decoder's views per step).
        cache: ``True``, ``False`` or ``"auto"`` (cache when the decoded images fit in
            ``cache_limit_bytes``).
        cache_limit_bytes: Memory budget of ``"auto"``.
        check_voxels: Cross-check the npz indices against the voxel PLY.
        default_resolution: Grid resolution of TRELLIS npz files that store none.
        threads: Threads decoding at open (default: up to 8, one per CPU core).
        progress: Show progress bars.

    Returns:
        An [`AssetStore`][recipes.flux3d.data.AssetStore].

    Raises:
        DatasetError: Incomplete dataset or features, no assets in the split, or no usable asset (with the
            reasons counted, e.g. ``features npz unreadable: 1, render image empty (0 bytes): 1``).
        ValueError: Bad arguments, or usable assets that disagree on resolution, channels or ``sigma``.
    """
    from tqdm.auto import tqdm

    from recipes.flux3d.conditioning import find_feature_folder

    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if cache not in (True, False, "auto"):
        raise ValueError(f"cache: expected True, False or 'auto', got {cache!r}")
    for name, value in (("image_size", image_size), ("cond_image_size", cond_image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected >= 1 or None, got {value}")
    if min_views < 1:
        raise ValueError(f"min_views: expected >= 1, got {min_views}")
    feature_name = find_feature_folder(root, feature_name)
    check_complete(root, feature_name)
    if assets is None:
        train, heldout = split_assets(root, require=[f"feature_{feature_name}"])
        ids, label = (train if split == "train" else heldout), split
        if not ids:
            raise DatasetError(
                f"data: the {split} split of {root} is empty ({len(train)} training, {len(heldout)} held-out "
                "assets); make held-out assets with `procedural.py --heldout N`, or a split.json with a "
                "larger fraction"
            )
    else:
        ids, label = list(assets), "explicit"
        if not ids:
            raise ValueError("assets: expected at least one asset id, got none")
    workers = threads or max(1, min(8, os.cpu_count() or 1))

    def open_one(sha: str) -> OpenedAsset:
        coords, mean, std, resolution = read_asset_volume(
            root, sha, feature_name, default_resolution, check_voxels
        )
        render_views = cond_views = None
        if renders:
            render_views = open_views(root / "renders" / sha, "render", image_size, min_views)
        if cond_renders:
            folder = root / "renders_cond" / sha
            if not folder.is_dir():
                folder = root / "renders" / sha
            cond_views = open_views(folder, "condition render", cond_image_size, 1)
        return OpenedAsset(sha, coords, mean, std, resolution, render_views, cond_views)

    def attempt(function: Callable[[], OpenedAsset]) -> OpenedAsset | UnusableAssetError:
        try:
            return function()
        except UnusableAssetError as error:
            return error
        except CORRUPT_ERRORS as error:
            return UnusableAssetError("unreadable", f"{type(error).__name__}: {error}")

    opened: dict[str, OpenedAsset] = {}
    errors: dict[str, UnusableAssetError] = {}
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda sha: attempt(lambda: open_one(sha)), ids)
        for sha, result in zip(
            ids, tqdm(results, total=len(ids), desc="open", disable=not progress), strict=True
        ):
            (errors if isinstance(result, UnusableAssetError) else opened)[sha] = result  # type: ignore[index]
        footprint = sum(asset.nbytes() for asset in opened.values())
        use_cache = bool(cache) if cache != "auto" else footprint <= cache_limit_bytes
        if use_cache and opened:

            def decode(asset: OpenedAsset) -> OpenedAsset:
                try:
                    return dataclasses.replace(
                        asset,
                        renders=None if asset.renders is None else asset.renders.cached(),
                        cond=None if asset.cond is None else asset.cond.cached(),
                    )
                except CORRUPT_ERRORS as error:
                    raise UnusableAssetError("image unreadable", str(error)) from error

            keys = list(opened)
            results = pool.map(lambda sha: attempt(lambda: decode(opened[sha])), keys)
            bar = tqdm(
                results,
                total=len(keys),
                desc=f"cache images ({footprint / 2**20:.0f} MiB)",
                disable=not progress,
            )
            for sha, result in zip(keys, bar, strict=True):
                if isinstance(result, UnusableAssetError):
                    errors[sha] = result
                    del opened[sha]
                else:
                    opened[sha] = result
    usable = [opened[sha] for sha in ids if sha in opened]
    skipped = {sha: str(errors[sha]) for sha in ids if sha in errors}
    what = f"features/{feature_name} of {root}"
    if not usable:
        first = next(iter(skipped.items()))
        raise DatasetError(
            f"data: none of the {len(ids)} {label} assets of {what} is usable ({_reason_counts(errors)}); "
            f"first: {first[0]}: {first[1]}"
        )
    if skipped:
        first = next(iter(skipped.items()))
        warnings.warn(
            f"data: skipped {len(skipped)} of {len(ids)} {label} assets of {what} with missing or corrupt "
            f"files ({_reason_counts(errors)}; first: {first[0]}: {first[1]}); see AssetStore.skipped",
            RuntimeWarning,
            stacklevel=2,
        )
    reference = usable[0]
    for asset in usable[1:]:
        for name, mine, theirs in (
            ("resolution", asset.resolution, reference.resolution),
            ("channels", int(asset.mean.shape[1]), int(reference.mean.shape[1])),
            ("sigma stored", asset.std is not None, reference.std is not None),
        ):
            if mine != theirs:
                raise ValueError(
                    f"data: expected one {name} across {what}, got {theirs} for {reference.sha256} and "
                    f"{mine} for {asset.sha256}; re-run prepare.py with --overwrite"
                )
    return AssetStore(root, feature_name, label, usable, skipped, use_cache and bool(usable))


# ------------------------------------------------------------------------------------------ the datasets


def _parse_key(key: object) -> tuple[int, int]:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        try:
            return operator.index(key[0]), operator.index(key[1])
        except TypeError:
            pass
    raise TypeError(
        f"key: expected (index, item_seed), two ints (the engine's loader yields them), got {key!r}"
    )


def _latent(
    asset: OpenedAsset, noisy: bool, stats: FeatureStats | None, generator: torch.Generator
) -> torch.Tensor:
    """``mu + sigma * eps`` (``noisy`` and ``sigma`` stored) or ``mu``, then normalised by ``stats``."""
    mean, std = asset.mean, asset.std
    if stats is not None:
        mean, std = stats.normalize(mean, std)
    if noisy and std is not None:
        return reparameterize(mean, std, generator)
    return mean


class _BatchMethods:
    """``pin_memory`` (called by the DataLoader with ``pin_memory=True``) and ``to`` for batch dataclasses."""

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]):
        values = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, SparseTensor):
                value = SparseTensor(
                    function(value.coords),
                    function(value.feats),
                    batch_size=value.batch_size,
                    spatial_shape=value.spatial_shape,
                    stride=value.stride,
                    check=False,
                )
            elif isinstance(value, torch.Tensor):
                value = function(value)
            values[field.name] = value
        return dataclasses.replace(self, **values)  # type: ignore[type-var]

    def pin_memory(self):
        """The batch with every tensor in page-locked memory (fast, asynchronous host-to-device copies)."""
        return self._map(lambda tensor: tensor.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """The batch on ``device`` (``non_blocking`` overlaps the copy from pinned memory)."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _pack(coords: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], resolution: int) -> SparseTensor:
    # Coordinates were validated at open (in the grid, unique per asset): no second check per step.
    return SparseTensor.from_list(list(coords), list(feats), spatial_shape=resolution, check=False)


def _one_resolution(items: Sequence[DecoderItem | LatentItem]) -> int:
    resolutions = sorted({item.resolution for item in items})
    if len(resolutions) > 1:
        raise ValueError(f"items: expected one resolution in a batch, got {resolutions}")
    return resolutions[0]


def _stack(values: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    shapes = sorted({tuple(value.shape) for value in values})
    if len(shapes) > 1:
        raise ValueError(
            f"items: expected equal {name} shapes in a batch (open the assets with an image size), "
            f"got {shapes}"
        )
    return torch.stack(list(values))


def straight_to_float(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 straight RGBA ``[..., 4, H, W]`` -> float32 ``(rgb [..., 3, H, W], alpha [..., 1, H, W])``, the
    rgb premultiplied by alpha (black background), as ``load_views`` returns it."""
    values = images.float() / 255.0
    alpha = values[..., 3:, :, :]
    return values[..., :3, :, :] * alpha, alpha


@dataclass(frozen=True)
class DecoderItem:
    """One decoder-stage item.

    Attributes:
        sha256: Asset id.
        coords: int32 ``[N, 3]``.
        feats: float32 ``[N, C]`` decoder input (normalised when the dataset has ``stats``).
        images: uint8 straight RGBA ``[K, 4, H, W]`` of the target views.
        viewmats: ``[K, 4, 4]`` OpenCV world-to-camera.
        Ks: ``[K, 3, 3]`` pixel intrinsics.
        background: float32 ``[3]`` colour the targets are composited on.
        frames: The ``K`` frame indices of ``renders/<id>/transforms.json``.
        resolution: Grid resolution ``R``.
    """

    sha256: str
    coords: torch.Tensor
    feats: torch.Tensor
    images: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    background: torch.Tensor
    frames: tuple[int, ...]
    resolution: int


@dataclass(frozen=True)
class DecoderBatch(_BatchMethods):
    """A collated decoder batch (``B`` assets, ``K`` views each).

    Attributes:
        volume: SparseTensor with feats ``[N, C]``.
        images: uint8 straight RGBA ``[B, K, 4, H, W]``.
        viewmats: ``[B, K, 4, 4]``.
        Ks: ``[B, K, 3, 3]``.
        backgrounds: float32 ``[B, 3]``.
        sha256: The ``B`` asset ids.
    """

    volume: SparseTensor
    images: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    backgrounds: torch.Tensor
    sha256: list[str]

    def targets(self) -> torch.Tensor:
        """Float32 targets ``[B, K, H, W, 3]`` composited on each asset's background, on the batch's device:
        ``rgb * alpha + (1 - alpha) * background`` (channels last, as the renderer returns colours)."""
        rgb, alpha = straight_to_float(self.images)  # [B, K, 3, H, W], [B, K, 1, H, W]
        background = self.backgrounds.to(rgb)[:, None, :, None, None]  # [B, 1, 3, 1, 1]
        return (rgb + (1.0 - alpha) * background).permute(0, 1, 3, 4, 2)  # [B, K, H, W, 3]


def collate_decoder(items: Sequence[DecoderItem]) -> DecoderBatch:
    """Packs decoder items into a [`DecoderBatch`][recipes.flux3d.data.DecoderBatch] (one SparseTensor)."""
    if not items:
        raise ValueError("items: expected at least one item, got none")
    return DecoderBatch(
        volume=_pack([i.coords for i in items], [i.feats for i in items], _one_resolution(items)),
        images=_stack([i.images for i in items], "images"),
        viewmats=torch.stack([i.viewmats for i in items]),
        Ks=torch.stack([i.Ks for i in items]),
        backgrounds=torch.stack([i.background for i in items]),
        sha256=[i.sha256 for i in items],
    )


class _StoreDataset(torch.utils.data.Dataset):
    """What both training datasets share: the store, the latent options, ``(index, item_seed)`` keys."""

    def __init__(self, store: AssetStore, noisy: bool, stats: FeatureStats | None) -> None:
        if stats is not None and stats.channels != store.channels:
            raise ValueError(
                f"stats: expected {store.channels} channels (the features'), got {stats.channels}"
            )
        self.store = store
        self.noisy = noisy
        self.stats = stats

    def __len__(self) -> int:
        return len(self.store)

    def _asset(self, key: object) -> tuple[OpenedAsset, torch.Generator]:
        index, item_seed = _parse_key(key)
        return self.store[index], torch.Generator().manual_seed(item_seed)


BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
"""Named backgrounds of the [`DecoderDataset`][recipes.flux3d.data.DecoderDataset] (or ``"random"``)."""


class DecoderDataset(_StoreDataset):
    """Decoder-stage items: an asset's latent volume and ``K`` target views with their cameras.

    ``dataset[(index, item_seed)]`` draws everything random from
    ``torch.Generator().manual_seed(item_seed)``, in this order: the ``K`` views (without replacement), the
    background (``"random"``), then ``eps`` of ``mu + sigma * eps``. The same key gives the same item in any
    process, so a run is reproducible under any number of DataLoader workers.

    Args:
        store: The opened split (with ``renders``).
        views_per_item: ``K`` random views per item.
        frames: Fixed frame indices instead of random ones (e.g. evaluation views).
        background: ``"white"``, ``"black"``, ``"random"`` (one uniform colour per item) or an RGB triple.
        noisy: Draw ``mu + sigma * eps`` (``mu`` when the features store no ``sigma`` or ``noisy=False``).
        stats: Normalise the latent with these training-split statistics (see
            [`FeatureStats`][recipes.flux3d.data.FeatureStats]); ``None`` keeps feature units.
    """

    def __init__(
        self,
        store: AssetStore,
        *,
        views_per_item: int = 2,
        frames: Sequence[int] | None = None,
        background: str | Sequence[float] = "white",
        noisy: bool = True,
        stats: FeatureStats | None = None,
    ) -> None:
        if not len(store) or store[0].renders is None:
            raise ValueError("store: expected assets opened with renders=True, got none")
        if frames is not None:
            frames = [operator.index(frame) for frame in frames]
            views_per_item = len(frames)
        if views_per_item < 1:
            raise ValueError(f"views_per_item: expected >= 1, got {views_per_item}")
        needed = views_per_item if frames is None else max(frames) + 1
        for asset in store:
            if len(asset.renders) < needed or (frames is not None and min(frames) < 0):  # type: ignore[arg-type]
                raise ValueError(
                    f"{'frames' if frames is not None else 'views_per_item'}: expected "
                    f"{frames if frames is not None else views_per_item} within the {len(asset.renders)} "  # type: ignore[arg-type]
                    f"render views of asset {asset.sha256}"
                )
        if isinstance(background, str):
            if background not in (*BACKGROUNDS, "random"):
                raise ValueError(
                    f"background: expected one of {[*BACKGROUNDS, 'random']} or an RGB triple, "
                    f"got {background!r}"
                )
            self._background = None if background == "random" else torch.tensor(BACKGROUNDS[background])
        else:
            colour = torch.as_tensor(background, dtype=torch.float32)
            if colour.shape != (3,) or not bool(((colour >= 0) & (colour <= 1)).all()):
                raise ValueError(f"background: expected an RGB triple in [0, 1], got {background!r}")
            self._background = colour
        super().__init__(store, noisy, stats)
        self.views_per_item = views_per_item
        self.frames = frames

    collate = staticmethod(collate_decoder)

    def __getitem__(self, key: tuple[int, int]) -> DecoderItem:
        asset, generator = self._asset(key)
        views = asset.renders
        assert views is not None
        if self.frames is None:
            chosen = torch.randperm(len(views), generator=generator)[: self.views_per_item].tolist()
        else:
            chosen = list(self.frames)
        background = torch.rand(3, generator=generator) if self._background is None else self._background
        return DecoderItem(
            sha256=asset.sha256,
            coords=asset.coords,
            feats=_latent(asset, self.noisy, self.stats, generator),
            images=views.rgba(chosen),
            viewmats=views.viewmats[chosen],
            Ks=views.Ks[chosen],
            background=background,
            frames=tuple(chosen),
            resolution=asset.resolution,
        )


@dataclass(frozen=True)
class LatentItem:
    """One SMDiT-stage item.

    Attributes:
        sha256: Asset id.
        coords: int32 ``[N, 3]``.
        feats: float32 ``[N, C]`` the clean latent ``x0`` (normalised when the dataset has ``stats``).
        cond_image: uint8 straight RGBA ``[4, H, W]`` of one condition view (the stage encodes it on the GPU).
        viewmat: ``[4, 4]`` its OpenCV world-to-camera matrix.
        K: ``[3, 3]`` its pixel intrinsics.
        frame: Its frame index in ``renders_cond/<id>/transforms.json``.
        resolution: Grid resolution ``R``.
    """

    sha256: str
    coords: torch.Tensor
    feats: torch.Tensor
    cond_image: torch.Tensor
    viewmat: torch.Tensor
    K: torch.Tensor
    frame: int
    resolution: int


@dataclass(frozen=True)
class LatentBatch(_BatchMethods):
    """A collated SMDiT batch.

    Attributes:
        latents: SparseTensor with feats ``[N, C]`` (``x0``).
        cond_images: uint8 straight RGBA ``[B, 4, H, W]``.
        viewmats: ``[B, 4, 4]`` of the condition views.
        Ks: ``[B, 3, 3]``.
        sha256: The ``B`` asset ids.
    """

    latents: SparseTensor
    cond_images: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    sha256: list[str]

    def cond_rgb(self) -> torch.Tensor:
        """Premultiplied float32 RGB ``[B, 3, H, W]`` in ``[0, 1]`` (the condition encoder's input), on the
        batch's device."""
        return straight_to_float(self.cond_images)[0]


def collate_latents(items: Sequence[LatentItem]) -> LatentBatch:
    """Packs SMDiT items into a [`LatentBatch`][recipes.flux3d.data.LatentBatch] (one SparseTensor)."""
    if not items:
        raise ValueError("items: expected at least one item, got none")
    return LatentBatch(
        latents=_pack([i.coords for i in items], [i.feats for i in items], _one_resolution(items)),
        cond_images=_stack([i.cond_image for i in items], "cond_image"),
        viewmats=torch.stack([i.viewmat for i in items]),
        Ks=torch.stack([i.K for i in items]),
        sha256=[i.sha256 for i in items],
    )


class LatentDataset(_StoreDataset):
    """SMDiT-stage items: an asset's latent volume and one condition view.

    ``dataset[(index, item_seed)]`` draws from ``torch.Generator().manual_seed(item_seed)``: first the
    condition view (uniform over the asset's condition frames), then ``eps`` of ``mu + sigma * eps``.
    The condition image is returned raw (uint8); the stage encodes batches of them on the GPU.

    Args:
        store: The opened split (with ``cond_renders``).
        cond_view: A fixed condition frame instead of a random one (e.g. ``0`` for evaluation).
        noisy: Draw ``mu + sigma * eps`` (``mu`` when the features store no ``sigma`` or ``noisy=False``).
        stats: Normalise the latent with these training-split statistics; ``None`` keeps feature units.
    """

    def __init__(
        self,
        store: AssetStore,
        *,
        cond_view: int | None = None,
        noisy: bool = True,
        stats: FeatureStats | None = None,
    ) -> None:
        if not len(store) or store[0].cond is None:
            raise ValueError("store: expected assets opened with cond_renders=True, got none")
        if cond_view is not None:
            for asset in store:
                if not 0 <= cond_view < len(asset.cond):  # type: ignore[arg-type]
                    raise ValueError(
                        f"cond_view: expected a frame in [0, {len(asset.cond)}) of asset {asset.sha256}, "  # type: ignore[arg-type]
                        f"got {cond_view}"
                    )
        super().__init__(store, noisy, stats)
        self.cond_view = cond_view

    collate = staticmethod(collate_latents)

    def __getitem__(self, key: tuple[int, int]) -> LatentItem:
        asset, generator = self._asset(key)
        views = asset.cond
        assert views is not None
        if self.cond_view is None:
            frame = int(torch.randint(len(views), (1,), generator=generator))
        else:
            frame = self.cond_view
        return LatentItem(
            sha256=asset.sha256,
            coords=asset.coords,
            feats=_latent(asset, self.noisy, self.stats, generator),
            cond_image=views.rgba([frame])[0],
            viewmat=views.viewmats[frame],
            K=views.Ks[frame],
            frame=frame,
            resolution=asset.resolution,
        )


def make_loader(
    dataset: DecoderDataset | LatentDataset,
    sampler: Sequence[tuple[int, int]] | torch.utils.data.Sampler | Iterator[tuple[int, int]],
    *,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``(index, item_seed)`` keys with the dataset's collate function.

    Workers are persistent and each keeps ``prefetch_factor`` batches in flight; with ``pin_memory``
    batches arrive in page-locked memory, so ``batch.to(device, non_blocking=True)`` overlaps the copy.

    Args:
        dataset: A [`DecoderDataset`][recipes.flux3d.data.DecoderDataset] or
            [`LatentDataset`][recipes.flux3d.data.LatentDataset].
        sampler: Iterable of keys (e.g. the engine's resumable loader's sampler); may be endless.
        batch_size: Items per batch.
        workers: Worker processes (0: load in the calling process).
        pin_memory: Pin batches (default: when CUDA is available).
        prefetch_factor: Batches prefetched per worker.
        drop_last: Drop a last incomplete batch.

    Returns:
        The DataLoader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers: expected >= 0, got {workers}")
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor: expected >= 1, got {prefetch_factor}")
    options: dict = {}
    if workers:
        options = {"prefetch_factor": prefetch_factor, "persistent_workers": True}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,  # type: ignore[arg-type]
        collate_fn=dataset.collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        **options,
    )


# ------------------------------------------------------------------------------- per-asset reader


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
    """Per-asset items of a TRELLIS-layout folder, read from disk on every access (the first reader).

    The training stages use [`open_assets`][recipes.flux3d.data.open_assets] with the
    [`DecoderDataset`][recipes.flux3d.data.DecoderDataset] or the
    [`LatentDataset`][recipes.flux3d.data.LatentDataset] instead (split-aware, checked once, cached).
    This reader lists every asset (no split) and refuses an incomplete dataset or feature folder.

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
        check_complete(self.root, feature_name)
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
        coords, mean, std, resolution = read_asset_volume(
            self.root, sha, self.feature_name, self.resolution, self.check_voxels
        )
        item = AssetItem(sha256=sha, coords=coords, mean=mean, std=std, resolution=resolution)
        if self.cond_views == 0:
            return item
        transforms = self.root / "renders_cond" / sha / "transforms.json"
        if not transforms.is_file():
            transforms = self.root / "renders" / sha / "transforms.json"
        num_frames = len(_read_frames(transforms))
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
