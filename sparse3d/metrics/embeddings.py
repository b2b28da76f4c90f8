"""Image embedding networks for FD/KD and CLIP score: images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, D]``.

DINOv2 (dgm-eval's protocol) and CLIP image features via transformers, imported lazily; weights are read
from local folders (or the local Hugging Face cache) only. Any callable with that signature also works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.features.extractors import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    _import_transformers,
    _load_dinov2,
    _missing_message,
    _resolve_local,
    check_images,
)

__all__ = [
    "CLIPImageEmbedding",
    "DINOv2Embedding",
    "ImageEmbedding",
    "clip_score",
]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DINO_LAYOUT = (
    "holding the transformers files `config.json` and `model.safetensors` of a Dinov2Model "
    "(dgm-eval uses ViT-L/14 without registers: a checkout of facebook/dinov2-large)"
)
_TRANSFORMERS_USER = "DINOv2Embedding and CLIPImageEmbedding need"
_CLIP_LAYOUT = (
    "holding the transformers files `config.json` and `model.safetensors` of a CLIPModel or "
    "CLIPVisionModelWithProjection (e.g. a checkout of openai/clip-vit-large-patch14)"
)


@runtime_checkable
class ImageEmbedding(Protocol):
    """Anything mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to one embedding per image ``[B, D]``.

    Plain functions and ``nn.Module`` instances qualify; the classes here also expose ``dim``.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - protocol
        """Embeds ``images [B, 3, H, W]`` in ``[0, 1]`` to ``[B, D]``."""
        ...


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1 or None, got {batch_size}")


class DINOv2Embedding(nn.Module):
    """DINOv2 image embedding as dgm-eval's FD/KD: the final-layer-normed CLS token.

    Each image is resized to ``image_size x image_size`` (bicubic, antialiased, aspect ratio not kept,
    clamped back to ``[0, 1]``), normalised with ImageNet statistics and encoded; the embedding is the
    model's ``pooler_output`` (CLS after the final layer norm, 1024-d for ViT-L/14). Inputs are
    expected as RGB; composite RGBA renders onto the background you evaluate with before calling
    (dgm-eval keeps the RGB under alpha, which for Blender's transparent film is black).

    Args:
        model: A transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``).
        image_size: Model input side in pixels (224 in dgm-eval).
        batch_size: Images encoded at once (``None``: all).
    """

    def __init__(self, model: nn.Module, *, image_size: int = 224, batch_size: int | None = None) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "patch_size"):
            raise TypeError(f"model: expected a transformers Dinov2Model, got {type(model).__name__}")
        patch_size = int(config.patch_size)
        if image_size < patch_size or image_size % patch_size:
            raise ValueError(
                f"image_size: expected a positive multiple of the patch size {patch_size}, got {image_size}"
            )
        _check_batch_size(batch_size)
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.batch_size = batch_size
        self.dim = int(config.hidden_size)
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD)[:, None, None], persistent=False)

    @classmethod
    def from_pretrained(
        cls, weights: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> DINOv2Embedding:
        """Loads DINOv2 from a local folder (or the local Hugging Face cache), never from the network.

        Args:
            weights: Folder with ``config.json`` + ``model.safetensors``, or a cached repo id.
            dtype: Weight dtype.
            **kwargs: Passed to the constructor (``image_size``, ``batch_size``).

        Returns:
            The embedding, in eval mode, without gradients.

        Raises:
            FileNotFoundError: No weights there; the message says which folder to provide.
        """
        model = _load_dinov2(
            weights, dtype=dtype, layout=_DINO_LAYOUT, user=_TRANSFORMERS_USER, extra="metrics"
        )
        return cls(model, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resizes and normalises images for the model.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``[B, 3, image_size, image_size]`` float32 normalised pixels.
        """
        size = (self.image_size, self.image_size)
        pixels = images.float()
        if tuple(pixels.shape[2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0.0, 1.0)
        mean, std = self.pixel_mean.to(pixels.device), self.pixel_std.to(pixels.device)
        return (pixels - mean) / std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeds images.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]`` (the range check reads two values to the host).

        Returns:
            ``[B, dim]`` float32 embeddings.
        """
        check_images(images)
        parameter = next(self.model.parameters())
        chunk = self.batch_size or max(1, images.shape[0])
        outputs = []
        for start in range(0, images.shape[0], chunk):
            pixels = self.preprocess(images[start : start + chunk].to(parameter.device))
            output = self.model(pixel_values=pixels.to(parameter.dtype))
            outputs.append(output.pooler_output.float())  # [b, dim]
        if not outputs:
            return torch.zeros(0, self.dim, device=parameter.device)
        return torch.cat(outputs)


def _image_embeds(output: Any) -> torch.Tensor:
    """Projected image embedding of a CLIP output (a tensor before transformers 5, a ModelOutput since)."""
    if isinstance(output, torch.Tensor):
        return output
    for field in ("image_embeds", "pooler_output"):
        value = getattr(output, field, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"model: could not find image embeddings in its output of type {type(output).__name__}")


class CLIPImageEmbedding(nn.Module):
    """CLIP image embedding (the projected image features ``get_image_features`` returns).

    Preprocessing follows the CLIP image processor on tensors: resize the shortest side to
    ``image_size`` (bicubic, antialiased), centre-crop to ``image_size x image_size``, normalise with
    CLIP's mean and std. (The Hugging Face processor resamples 8-bit PIL images, so values differ
    slightly.) transformers >= 5 returns a ``ModelOutput`` from ``get_image_features``; its
    ``pooler_output`` is the projected embedding and is used here (the torchmetrics ``CLIPScore`` bug
    of transformers 5 does not apply).

    Args:
        model: A transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection``.
        image_size: Model input side (``None``: the model's ``vision_config.image_size``).
        mean: Per-channel normalisation mean (``None``: CLIP's).
        std: Per-channel normalisation std (``None``: CLIP's).
        batch_size: Images encoded at once (``None``: all).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        vision_config = getattr(config, "vision_config", config)
        if (
            vision_config is None
            or not hasattr(vision_config, "image_size")
            or not hasattr(config, "projection_dim")
        ):
            raise TypeError(
                f"model: expected a transformers CLIPModel or CLIPVisionModelWithProjection, "
                f"got {type(model).__name__}"
            )
        image_size = int(vision_config.image_size) if image_size is None else int(image_size)
        if image_size < 1:
            raise ValueError(f"image_size: expected >= 1, got {image_size}")
        _check_batch_size(batch_size)
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.batch_size = batch_size
        self.dim = int(config.projection_dim)
        self.register_buffer("pixel_mean", torch.tensor(mean or _CLIP_MEAN)[:, None, None], persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std or _CLIP_STD)[:, None, None], persistent=False)

    @classmethod
    def from_pretrained(
        cls, weights: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> CLIPImageEmbedding:
        """Loads CLIP from a local folder (or the local Hugging Face cache), never from the network.

        A ``preprocessor_config.json`` in the folder, if present, supplies ``image_mean``,
        ``image_std`` and the crop size unless given in ``kwargs``.

        Args:
            weights: Folder with ``config.json`` + ``model.safetensors``, or a cached repo id.
            dtype: Weight dtype.
            **kwargs: Passed to the constructor (``image_size``, ``mean``, ``std``, ``batch_size``).

        Returns:
            The embedding, in eval mode, without gradients.

        Raises:
            FileNotFoundError: No weights there; the message says which folder to provide.
        """
        transformers = _import_transformers(_TRANSFORMERS_USER, "metrics")
        location, _ = _resolve_local(weights, None, "CLIP", _CLIP_LAYOUT)
        try:
            config = transformers.AutoConfig.from_pretrained(location, local_files_only=True)
            if config.model_type == "clip_vision_model":
                model_class = transformers.CLIPVisionModelWithProjection
            elif config.model_type == "clip":
                model_class = transformers.CLIPModel
            else:
                raise ValueError(f"model_type {config.model_type!r} is not a CLIP model")
            model = model_class.from_pretrained(location, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                _missing_message(weights, None, "CLIP", _CLIP_LAYOUT, f"{type(error).__name__}: {error}")
            ) from error
        processor_file = Path(location) / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            kwargs.setdefault("mean", tuple(processor["image_mean"]) if "image_mean" in processor else None)
            kwargs.setdefault("std", tuple(processor["image_std"]) if "image_std" in processor else None)
            crop = processor.get("crop_size")
            if isinstance(crop, dict):
                crop = crop.get("height", crop.get("shortest_edge"))
            kwargs.setdefault("image_size", crop)
        return cls(model, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resizes (shortest side), centre-crops and normalises images for the model.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``[B, 3, image_size, image_size]`` float32 normalised pixels.
        """
        pixels = images.float()
        height, width = pixels.shape[2:]
        scale = self.image_size / min(height, width)
        resized = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        if resized != (height, width):
            pixels = F.interpolate(pixels, size=resized, mode="bicubic", antialias=True).clamp(0.0, 1.0)
        top = (resized[0] - self.image_size) // 2
        left = (resized[1] - self.image_size) // 2
        pixels = pixels[:, :, top : top + self.image_size, left : left + self.image_size]  # [B, 3, s, s]
        mean, std = self.pixel_mean.to(pixels.device), self.pixel_std.to(pixels.device)
        return (pixels - mean) / std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeds images.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]`` (the range check reads two values to the host).

        Returns:
            ``[B, dim]`` float32 projected image embeddings (not normalised).
        """
        check_images(images)
        parameter = next(self.model.parameters())
        chunk = self.batch_size or max(1, images.shape[0])
        outputs = []
        for start in range(0, images.shape[0], chunk):
            pixels = self.preprocess(images[start : start + chunk].to(parameter.device)).to(parameter.dtype)
            if hasattr(self.model, "get_image_features"):
                output = self.model.get_image_features(pixel_values=pixels)
            else:
                output = self.model(pixel_values=pixels)
            outputs.append(_image_embeds(output).float())  # [b, dim]
        if not outputs:
            return torch.zeros(0, self.dim, device=parameter.device)
        return torch.cat(outputs)


def clip_score(
    images: torch.Tensor,
    references: torch.Tensor,
    embedding: ImageEmbedding,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Image-to-image CLIP score: ``100 cos(E(image), E(reference))`` per pair, as image-to-3D papers use.

    With ``reduction="mean"`` the mean over pairs is clamped at 0, as torchmetrics' ``CLIPScore``
    does; ``"none"`` returns the unclamped per-pair scores.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]`` (e.g. renders of the generated asset).
        references: ``[B, 3, H', W']`` images in ``[0, 1]`` paired with ``images`` (e.g. the input image).
        embedding: Image embedding, usually a
            [`CLIPImageEmbedding`][sparse3d.metrics.embeddings.CLIPImageEmbedding]; any callable
            ``[B, 3, H, W] -> [B, D]``.
        reduction: ``"mean"`` or ``"none"``.

    Returns:
        Scalar float32 score in ``[0, 100]``, or ``[B]`` per-pair scores in ``[-100, 100]``.
    """
    for name, tensor in (("images", images), ("references", references)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[1] != 3:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected a tensor of shape [B, 3, H, W], got {shape}")
    if images.shape[0] != references.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"references: expected the same (non-zero) batch size as images ({images.shape[0]}), "
            f"got {references.shape[0]}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    with torch.no_grad():
        image_embeds = embedding(images).float()
        reference_embeds = embedding(references).float()
    expected = (images.shape[0],)
    for name, tensor in (("images", image_embeds), ("references", reference_embeds)):
        if tensor.dim() != 2 or tuple(tensor.shape[:1]) != expected:
            raise ValueError(
                f"embedding: expected [B, D] with B = {images.shape[0]} for {name}, got {list(tensor.shape)}"
            )
    cosine = F.cosine_similarity(image_embeds, reference_embeds.to(image_embeds.device), dim=-1)  # [B]
    scores = 100.0 * cosine
    if reduction == "none":
        return scores
    return scores.mean().clamp(min=0.0)
