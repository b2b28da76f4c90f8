"""Condition images of a prepared dataset as SMDiT inputs: the feature folder, the extractor that built it,
and the encoder that turns condition RGB ``[B, 3, H, W]`` into patch-aligned latents ``[B, C, h, w]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse3d.features import FeatureExtractor

__all__ = [
    "FEATURE_EXTRACTORS",
    "find_feature_folder",
    "extractor_for_feature",
    "resize_to_multiple",
    "pad_to_multiple",
    "ConditionEncoder",
]

FEATURE_EXTRACTORS = {"rgb": "rgb", "flux_vae": "flux-vae", "sdxl_vae": "sdxl-vae", "dinov2": "dinov2"}
"""``features/<name>`` folder -> extractor: what ``prepare.py`` records (its default ``--name`` is the
extractor name with ``-`` replaced by ``_``)."""


_EXTRACTOR_CLASSES = {
    "RGBFeatures": "rgb",
    "FluxVAEFeatures": "flux-vae",
    "SDXLVAEFeatures": "sdxl-vae",
    "DINOv2Features": "dinov2",
}


def find_feature_folder(root: str | os.PathLike[str], feature_name: str | None = None) -> str:
    """Picks the ``features/<name>`` subfolder of a prepared dataset.

    Args:
        root: Dataset folder.
        feature_name: The folder to use; ``None`` takes the only one present.

    Returns:
        The folder name.

    Raises:
        FileNotFoundError: ``root`` is not a folder, it has no feature folders, or ``feature_name`` is absent
            (the message lists what exists and how to make features).
        ValueError: Several feature folders and no ``feature_name`` (the message lists them).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data: expected a prepared dataset folder, got {root} (not a folder)")
    folder = root / "features"
    present = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    hint = f"run `python recipes/flux3d/prepare.py --root {root} --extractor rgb` first"
    if feature_name is not None:
        if feature_name not in present:
            raise FileNotFoundError(
                f"feature: expected one of the feature folders in {folder} ({present or 'none'}), "
                f"got {feature_name!r}" + ("" if present else f"; {hint}")
            )
        return feature_name
    if not present:
        raise FileNotFoundError(f"data: {root} has no feature folders under {folder}; {hint}")
    if len(present) > 1:
        raise ValueError(
            f"feature: {folder} holds several feature folders {present}; pick one with --feature"
        )
    return present[0]


def extractor_for_feature(
    feature_name: str, extractor: str | None = None, *, root: str | os.PathLike[str] | None = None
) -> str:
    """The extractor a ``features/<feature_name>`` folder was built with.

    Told, in this order, by ``extractor``, by the folder's ``features.json`` (``prepare.py`` records the
    extractor there) when ``root`` is given, or by the folder name.

    Args:
        feature_name: Feature folder name (``rgb``, ``flux_vae``, ``sdxl_vae``, ``dinov2`` as ``prepare.py``
            names them).
        extractor: Explicit extractor name for folders made with ``prepare.py --name`` (wins if given).
        root: Dataset folder, to read the recorded extractor.

    Returns:
        An extractor name of ``FEATURE_EXTRACTORS``'s values.

    Raises:
        ValueError: An unknown explicit name, or a folder name that names no extractor.
    """
    known = sorted(FEATURE_EXTRACTORS.values())
    if extractor is not None:
        if extractor not in known:
            raise ValueError(f"extractor: expected one of {known}, got {extractor!r}")
        return extractor
    if root is not None:
        from recipes.flux3d.data import FEATURES_RECORD, read_record

        settings = (read_record(Path(root) / "features" / feature_name / FEATURES_RECORD) or {}).get(
            "settings", {}
        )
        recorded = settings.get("extractor") or _EXTRACTOR_CLASSES.get(settings.get("extractor_class"))
        if recorded in known:
            return recorded
    if feature_name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"feature: cannot tell which extractor built features/{feature_name} (expected a folder named "
            f"{sorted(FEATURE_EXTRACTORS)}); pass --extractor NAME, one of {known}"
        )
    return FEATURE_EXTRACTORS[feature_name]


def resize_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Resizes images (antialiased bilinear) down to the nearest sides divisible by ``multiple``.

    Images whose sides already divide are returned unchanged.

    Args:
        images: Tensor ``[B, C, H, W]`` in ``[0, 1]``.
        multiple: Required divisor of ``H`` and ``W`` (e.g. the VAE's stride 8).

    Returns:
        Tensor ``[B, C, H', W']`` in ``[0, 1]`` with ``H' = max(multiple, H - H % multiple)`` (same for
        ``W``).
    """
    if multiple < 1:
        raise ValueError(f"multiple: expected >= 1, got {multiple}")
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {list(images.shape)}")
    height, width = images.shape[2:]
    target = (max(multiple, height - height % multiple), max(multiple, width - width % multiple))
    if target == (height, width):
        return images
    resized = F.interpolate(images, size=target, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)  # [B, C, H', W']


def pad_to_multiple(maps: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads feature maps at the bottom and right so ``h`` and ``w`` are divisible by ``multiple``.

    Args:
        maps: Tensor ``[B, C, h, w]``.
        multiple: Required divisor (SMDiT's ``image_patch``).

    Returns:
        Tensor ``[B, C, ceil(h / multiple) * multiple, ceil(w / multiple) * multiple]``; the original values
        sit in the top-left corner.
    """
    if multiple < 1:
        raise ValueError(f"multiple: expected >= 1, got {multiple}")
    if maps.dim() != 4:
        raise ValueError(f"maps: expected shape [B, C, h, w], got {list(maps.shape)}")
    height, width = maps.shape[2:]
    return F.pad(maps, (0, -width % multiple, 0, -height % multiple))  # [B, C, h', w']


class ConditionEncoder:
    """Encodes condition RGB with a feature extractor into SMDiT's image input.

    Pixels are resized down to a multiple of the extractor's stride when needed, encoded (for a VAE, the
    latent mean, as condition tokens are deterministic), then zero-padded to a multiple of ``patch_size``.

    Args:
        extractor: The extractor the DA-SLAT features were built with (on the device of the images).
        patch_size: SMDiT's ``image_patch``.
    """

    def __init__(self, extractor: FeatureExtractor, patch_size: int) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size: expected >= 1, got {patch_size}")
        self.extractor = extractor
        self.patch_size = patch_size

    @property
    def channels(self) -> int:
        """Channels ``C_img`` of the encoded images (the extractor's)."""
        return int(self.extractor.channels)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Encodes a batch of condition images.

        Args:
            images: Premultiplied RGB ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            float32 latents ``[B, C_img, h, w]`` with ``h`` and ``w`` divisible by ``patch_size``.
        """
        pixels = resize_to_multiple(images.float(), int(self.extractor.stride))  # [B, 3, H', W']
        maps = self.extractor(pixels).mean  # [B, C_img, h, w]
        return pad_to_multiple(maps.float(), self.patch_size)  # [B, C_img, h', w']
