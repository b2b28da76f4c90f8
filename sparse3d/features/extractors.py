"""Image feature extractors behind one protocol: images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``FeatureMaps``.

FLUX VAE and SDXL VAE (diffusers ``AutoencoderKL``), DINOv2 patch tokens (transformers) and raw RGB.
Weights are only ever read from local folders or the local Hugging Face cache; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureMaps",
    "FeatureExtractor",
    "FluxVAEFeatures",
    "SDXLVAEFeatures",
    "DINOv2Features",
    "RGBFeatures",
    "check_images",
    "FLUX_VAE_SHIFT",
    "FLUX_VAE_SCALE",
    "SDXL_VAE_SCALE",
]

FLUX_VAE_SHIFT = 0.1159
"""FLUX.1 VAE latent shift: normalised latent ``= (z - shift) * scale``."""
FLUX_VAE_SCALE = 0.3611
"""FLUX.1 VAE latent scale."""
SDXL_VAE_SCALE = 0.13025
"""SDXL VAE latent scale (no shift)."""

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureMaps:
    """Per-image feature maps that tile the whole input image.

    Feature cell ``(r, c)`` of an ``[h, w]`` map covers input pixels
    ``[c W / w, (c + 1) W / w) x [r H / h, (r + 1) H / h)``, the convention of
    [`project_features`][sparse3d.geometry.project.project_features].

    Attributes:
        mean: Tensor ``[B, C, h, w]`` (float32): the feature (for a VAE, the latent mean).
        std: Tensor ``[B, C, h, w]`` (float32) of the latent std for stochastic encoders, else ``None``.
        stride: Nominal input pixels per feature cell along each axis (8 for the FLUX VAE).
    """

    mean: torch.Tensor
    std: torch.Tensor | None
    stride: int


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to ``FeatureMaps``.

    Attributes:
        channels: Feature channels ``C``.
        stride: Nominal downsampling factor of the maps.
    """

    channels: int
    stride: int

    def __call__(self, images: torch.Tensor) -> FeatureMaps:  # pragma: no cover - protocol
        """Encodes ``images [B, 3, H, W]`` in ``[0, 1]``."""
        ...


def check_images(images: torch.Tensor, name: str = "images", multiple_of: int = 1) -> None:
    """Raises a clear error unless ``images`` is a floating ``[B, 3, H, W]`` tensor with values in ``[0, 1]``.

    Args:
        images: Tensor to check.
        name: Argument name used in the message.
        multiple_of: ``H`` and ``W`` must be multiples of this.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [B, 3, H, W], got {list(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor with values in [0, 1], got {images.dtype}")
    if images.numel():
        low, high = float(images.amin()), float(images.amax())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name}: expected values in [0, 1], got range [{low:.4g}, {high:.4g}]")
    height, width = images.shape[2:]
    if height % multiple_of or width % multiple_of:
        raise ValueError(f"{name}: expected H and W to be multiples of {multiple_of}, got {height} x {width}")


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the VAE feature extractors need diffusers: pip install 'sparse3d[diffusion]'"
        ) from error
    return diffusers


def _import_transformers(user: str = "DINOv2Features needs", extra: str = "diffusion") -> Any:
    """Imports transformers lazily; ``user`` names what needs it in the error message."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{user} transformers: pip install 'sparse3d[{extra}]' (or pip install transformers)"
        ) from error
    return transformers


def _resolve_local(path: str | os.PathLike[str], subfolder: str | None, what: str, layout: str) -> tuple:
    """Finds ``config.json`` in ``path`` or ``path/subfolder``; a non-folder is a cache repo id."""
    root = Path(path)
    text = os.fspath(path)
    looks_like_path = (
        root.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or root.exists()
    )
    if looks_like_path and not root.is_dir():
        raise FileNotFoundError(_missing_message(path, subfolder, what, layout, "no such folder"))
    if root.is_dir():
        if subfolder is not None:
            if (root / subfolder / "config.json").is_file():
                return str(root), subfolder
        elif (root / "config.json").is_file():
            return str(root), None
        elif (root / "vae" / "config.json").is_file() and what.endswith("VAE"):
            return str(root), "vae"
        raise FileNotFoundError(_missing_message(path, subfolder, what, layout, "it has no config.json"))
    return str(path), subfolder  # a repo id, looked up in the local Hugging Face cache only


def _missing_message(path: Any, subfolder: str | None, what: str, layout: str, reason: str) -> str:
    where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    return (
        f"weights: no local {what} weights at {where}: {reason}. Nothing is downloaded. Supply a local "
        f"folder {layout}, or a Hugging Face repo id already present in the local cache (e.g. fetched "
        "earlier with `huggingface-cli download`), and pass it as `weights=` / `--weights PATH`."
    )


_VAE_LAYOUT = (
    "holding the diffusers AutoencoderKL files `config.json` and `diffusion_pytorch_model.safetensors` "
    "(e.g. the `vae/` folder of a FLUX.1 or SDXL checkout; a model root with a `vae/` subfolder also works)"
)
_DINO_LAYOUT = (
    "holding the transformers files `config.json` and `model.safetensors` of a Dinov2Model or "
    "Dinov2WithRegistersModel (e.g. a checkout of facebook/dinov2-large)"
)


def _load_dinov2(
    weights: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    layout: str = _DINO_LAYOUT,
    user: str = "DINOv2Features needs",
    extra: str = "diffusion",
) -> nn.Module:
    """A transformers DINOv2 model from a local folder or the local cache; never from the network.

    Shared by [`DINOv2Features`][sparse3d.features.extractors.DINOv2Features] and the metrics'
    DINOv2 embedding; ``layout``, ``user`` and ``extra`` only word the error messages.
    """
    transformers = _import_transformers(user, extra)
    location, _ = _resolve_local(weights, None, "DINOv2", layout)
    try:
        return transformers.AutoModel.from_pretrained(location, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            _missing_message(weights, None, "DINOv2", layout, type(error).__name__)
        ) from error


class _VAEFeatures(nn.Module):
    """Shared machinery: a diffusers ``AutoencoderKL`` encoder, normalised latent mean and std."""

    default_shift: float = 0.0
    default_scale: float = 1.0
    name: str = "VAE"

    def __init__(
        self,
        vae: nn.Module,
        *,
        shift_factor: float | None = None,
        scaling_factor: float | None = None,
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(vae, "encode") or not hasattr(vae, "config"):
            raise TypeError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1 or None, got {batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.shift_factor = float(self.default_shift if shift_factor is None else shift_factor)
        self.scaling_factor = float(self.default_scale if scaling_factor is None else scaling_factor)
        self.normalize = normalize
        self.batch_size = batch_size
        self.channels = int(vae.config.latent_channels)
        self.stride = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> _VAEFeatures:
        """Loads the VAE from a local folder (or the local Hugging Face cache), never from the network.

        Args:
            weights: A folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``, a model root
                with a ``vae/`` subfolder, or a repo id already in the local Hugging Face cache.
            subfolder: Subfolder holding the VAE (``"vae"`` for a full FLUX/SDXL checkout).
            dtype: Weight dtype.
            **kwargs: Passed to the constructor (``shift_factor``, ``scaling_factor``, ``normalize``,
                ``batch_size``).

        Returns:
            The extractor, in eval mode, without gradients.

        Raises:
            FileNotFoundError: No weights there; the message says which layout and argument to use.
        """
        diffusers = _import_diffusers()
        location, subfolder = _resolve_local(weights, subfolder, cls.name, _VAE_LAYOUT)
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(
                location, subfolder=subfolder, local_files_only=True, torch_dtype=dtype
            )
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                _missing_message(weights, subfolder, cls.name, _VAE_LAYOUT, f"{type(error).__name__}")
            ) from error
        return cls(vae, **kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureMaps:
        """Encodes images to latent mean and std maps.

        Args:
            images: Tensor ``[B, 3, H, W]`` in ``[0, 1]``, ``H`` and ``W`` multiples of ``stride``.

        Returns:
            ``FeatureMaps`` with float32 ``mean`` and ``std``
            ``[B, C, H / stride, W / stride]``; with ``normalize`` the mean is ``(mu - shift) * scale`` and
            the std ``sigma * scale``.
        """
        check_images(images, multiple_of=self.stride)
        parameter = next(self.vae.parameters())
        chunk = self.batch_size or max(1, images.shape[0])
        means, stds = [], []
        for start in range(0, images.shape[0], chunk):
            pixels = images[start : start + chunk].to(parameter.device, parameter.dtype) * 2.0 - 1.0
            posterior = self.vae.encode(pixels).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        mean = torch.cat(means) if means else images.new_zeros(0, self.channels, 0, 0)
        std = torch.cat(stds) if stds else torch.zeros_like(mean)
        if self.normalize:
            mean = (mean - self.shift_factor) * self.scaling_factor
            std = std * self.scaling_factor
        return FeatureMaps(mean=mean, std=std, stride=self.stride)


class FluxVAEFeatures(_VAEFeatures):
    """FLUX.1 VAE encoder features: 16-channel latent mean and std at stride 8 (DA-SLAT's input).

    Normalisation defaults to FLUX's ``(mu - 0.1159) * 0.3611`` and ``sigma * 0.3611``. Build it with
    ``from_pretrained`` from a local folder,
    or wrap an ``AutoencoderKL`` you already hold.

    Args:
        vae: A diffusers ``AutoencoderKL``.
        shift_factor: Latent shift (default ``FLUX_VAE_SHIFT``).
        scaling_factor: Latent scale (default ``FLUX_VAE_SCALE``).
        normalize: Apply shift and scale (``False`` returns the raw posterior).
        batch_size: Images encoded at once (``None``: all).
    """

    default_shift = FLUX_VAE_SHIFT
    default_scale = FLUX_VAE_SCALE
    name = "FLUX VAE"


class SDXLVAEFeatures(_VAEFeatures):
    """SDXL VAE encoder features: 4-channel latent mean and std at stride 8, scaled by ``0.13025``.

    Args:
        vae: A diffusers ``AutoencoderKL``.
        shift_factor: Latent shift (default 0).
        scaling_factor: Latent scale (default ``SDXL_VAE_SCALE``).
        normalize: Apply shift and scale.
        batch_size: Images encoded at once (``None``: all).
    """

    default_shift = 0.0
    default_scale = SDXL_VAE_SCALE
    name = "SDXL VAE"


class DINOv2Features(nn.Module):
    """DINOv2 patch tokens as a feature map (CLS and register tokens dropped), via transformers.

    Images are resized (bicubic, antialiased) to ``image_size`` (a multiple of the patch size) and
    normalised with ImageNet statistics. ``last_hidden_state`` is already layer-normed by the model's
    final (affine) norm; with ``trellis_norm=True`` the pre-norm tokens get a plain, non-affine layer
    norm instead, as TRELLIS's feature extraction does.

    Args:
        model: A transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
        image_size: Side of the square model input in pixels (default 518 = 37 patches of 14).
        trellis_norm: Use TRELLIS's non-affine norm of the pre-norm tokens.
        batch_size: Images encoded at once (``None``: all).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int = 518,
        trellis_norm: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "patch_size"):
            raise TypeError(f"model: expected a transformers Dinov2Model, got {type(model).__name__}")
        self.patch_size = int(config.patch_size)
        if image_size < self.patch_size or image_size % self.patch_size:
            raise ValueError(
                f"image_size: expected a positive multiple of the patch size {self.patch_size}, "
                f"got {image_size}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1 or None, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.trellis_norm = trellis_norm
        self.batch_size = batch_size
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.channels = int(config.hidden_size)
        self.stride = self.patch_size
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD)[:, None, None], persistent=False)

    @classmethod
    def from_pretrained(
        cls, weights: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> DINOv2Features:
        """Loads DINOv2 from a local folder (or the local Hugging Face cache), never from the network.

        Args:
            weights: Folder with ``config.json`` + ``model.safetensors``, or a cached repo id.
            dtype: Weight dtype.
            **kwargs: Passed to the constructor.

        Returns:
            The extractor.

        Raises:
            FileNotFoundError: No weights there; the message says which layout and argument to use.
        """
        return cls(_load_dinov2(weights, dtype=dtype), **kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureMaps:
        """Encodes images to patch-token maps.

        Args:
            images: Tensor ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``FeatureMaps`` with ``mean``
            ``[B, D, image_size / 14, image_size / 14]`` and ``std=None``.
        """
        check_images(images)
        parameter = next(self.model.parameters())
        grid = self.image_size // self.patch_size
        chunk = self.batch_size or max(1, images.shape[0])
        maps = []
        for start in range(0, images.shape[0], chunk):
            pixels = images[start : start + chunk].to(parameter.device, torch.float32)
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
            ).clamp(0.0, 1.0)
            pixels = (pixels - self.pixel_mean.to(pixels.device)) / self.pixel_std.to(pixels.device)
            output = self.model(
                pixel_values=pixels.to(parameter.dtype), output_hidden_states=self.trellis_norm
            )
            if self.trellis_norm:
                tokens = output.hidden_states[-1].float()
                tokens = F.layer_norm(tokens, tokens.shape[-1:])
            else:
                tokens = output.last_hidden_state.float()
            tokens = tokens[:, 1 + self.num_register_tokens :]  # [b, grid * grid, D]
            if tokens.shape[1] != grid * grid:
                raise RuntimeError(
                    f"DINOv2 returned {tokens.shape[1]} patch tokens, expected {grid * grid} "
                    f"for {self.image_size} px"
                )
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid))  # [b, D, g, g]
        mean = torch.cat(maps) if maps else images.new_zeros(0, self.channels, grid, grid)
        return FeatureMaps(mean=mean, std=None, stride=self.stride)


class RGBFeatures(nn.Module):
    """Raw RGB as features (no weights), optionally average-pooled by ``pool`` (the CPU demo's extractor).

    Args:
        pool: Average-pooling window and stride (1 keeps full resolution).
    """

    def __init__(self, pool: int = 1) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool: expected >= 1, got {pool}")
        self.pool = pool
        self.channels = 3
        self.stride = pool

    def forward(self, images: torch.Tensor) -> FeatureMaps:
        """Returns the (pooled) images.

        Args:
            images: Tensor ``[B, 3, H, W]`` in ``[0, 1]``, ``H`` and ``W`` multiples of ``pool``.

        Returns:
            ``FeatureMaps`` with ``mean [B, 3, H / pool, W / pool]``
            (float32) and ``std=None``.
        """
        check_images(images, multiple_of=self.pool)
        mean = images.float()
        if self.pool > 1:
            mean = F.avg_pool2d(mean, self.pool)  # [B, 3, H / pool, W / pool]
        return FeatureMaps(mean=mean, std=None, stride=self.pool)
