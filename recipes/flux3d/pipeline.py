"""`FLUX3DPipeline`: what users hold — condition encoder, SMDiT, Gaussian decoder and the data options, saved
and loaded as one folder (a config JSON and safetensors per component, as diffusers pipelines are).

    pipe = FLUX3DPipeline.from_pretrained("out/toy/pipeline")
    gaussians = pipe(image, layout, steps=50, guidance=3.0, seed=0)      # -> sparse3d.gaussians.Gaussians

On disk::

    pipeline/
      pipeline.json            components, latent statistics, sampling defaults, format version
      smdit/config.json        SMDiTConfig            smdit/model.safetensors
      decoder/config.json      GaussianDecoderConfig  decoder/model.safetensors
      encoder/config.json      the condition encoder (rgb: its pooling; a VAE: diffusers' own folder beside)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import sparse3d.flow as flow
from recipes.flux3d.conditioning import ConditionEncoder
from recipes.flux3d.data import FeatureStats
from recipes.flux3d.model import SMDiT, SMDiTConfig
from sparse3d import SparseTensor
from sparse3d.gaussians import (
    GaussianDecoder,
    GaussianDecoderConfig,
    GaussianHeadConfig,
    Gaussians,
    SparseTransformerConfig,
)

__all__ = [
    "FORMAT_VERSION",
    "SamplingOptions",
    "FLUX3DPipeline",
    "decoder_config_to_dict",
    "decoder_config_from_dict",
    "smdit_config_from_dict",
    "save_module",
    "load_module_state",
]

FORMAT_VERSION = 1
"""Version of the on-disk layout written by ``save_pretrained``."""


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """Sampling defaults stored with a pipeline (each call can override them).

    Attributes:
        steps: Euler steps from ``t = 1`` to 0 (paper: 50).
        guidance: CFG scale ``w`` in ``v = v_u + w (v_c - v_u)``; the unconditional pass sees a zero image.
        guidance_interval: Guidance applies for ``t`` in this interval, the conditional velocity elsewhere.
        shift: Static time shift of the grid (1 = none).
    """

    steps: int = 50
    guidance: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0


def _json(path: Path, values: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=1, allow_nan=False))
    os.replace(tmp, path)


def save_module(module: torch.nn.Module, folder: Path, config: dict) -> None:
    """Writes ``folder/config.json`` and ``folder/model.safetensors`` (temp files + ``os.replace``)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, tmp)
    os.replace(tmp, folder / "model.safetensors")
    _json(folder / "config.json", config)


def load_module_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads ``folder/config.json`` and ``folder/model.safetensors``; the error names what is missing."""
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"pipeline: expected {folder / name} (written by save_pretrained), got none"
            )
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


def smdit_config_from_dict(values: dict) -> SMDiTConfig:
    """Rebuilds an ``SMDiTConfig`` from its ``dataclasses.asdict`` form (tuples restored)."""
    values = dict(values)
    values["axes_dims"] = tuple(values["axes_dims"])
    return SMDiTConfig(**values)


def decoder_config_to_dict(config: GaussianDecoderConfig) -> dict:
    """``GaussianDecoderConfig`` as nested JSON-ready dicts."""
    return dataclasses.asdict(config)


def decoder_config_from_dict(values: dict) -> GaussianDecoderConfig:
    """Inverse of [`decoder_config_to_dict`][recipes.flux3d.pipeline.decoder_config_to_dict]."""
    return GaussianDecoderConfig(
        transformer=SparseTransformerConfig(**values["transformer"]),
        head=GaussianHeadConfig(**values["head"]),
    )


def build_condition_extractor(config: dict, folder: Path | None = None) -> Any:
    """Rebuilds a condition extractor from its saved config.

    Args:
        config: ``{"name": "rgb", "pool": k}``, or
            ``{"name": "flux-vae" | "sdxl-vae" | "dinov2", "weights": path}``;
            a VAE saved inside the pipeline (``folder / "vae"``) is preferred to ``weights``.
        folder: The pipeline's ``encoder/`` folder.

    Returns:
        The extractor (CPU).
    """
    from sparse3d.features import DINOv2Features, FluxVAEFeatures, RGBFeatures, SDXLVAEFeatures

    name = config.get("name")
    if name == "rgb":
        return RGBFeatures(int(config.get("pool", 1)))
    loaders = {"flux-vae": FluxVAEFeatures, "sdxl-vae": SDXLVAEFeatures, "dinov2": DINOv2Features}
    if name not in loaders:
        raise ValueError(f"encoder: expected name 'rgb' or one of {sorted(loaders)}, got {name!r}")
    weights = folder / "vae" if folder is not None and (folder / "vae").is_dir() else config.get("weights")
    if weights is None:
        raise FileNotFoundError(
            f"encoder: {name!r} needs weights: none inside the pipeline and no 'weights' path"
        )
    return loaders[name].from_pretrained(weights)


def _as_layout(layout: SparseTensor | torch.Tensor, resolution: int, channels: int) -> SparseTensor:
    if isinstance(layout, SparseTensor):
        coords = layout.coords
        batch = layout.batch_size
        feats = torch.zeros(coords.shape[0], channels)
        return SparseTensor(
            coords, feats.to(coords.device), spatial_shape=layout.spatial_shape, batch_size=batch
        )
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2 or layout.shape[1] != 3:
        shape = list(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise ValueError(f"layout: expected a SparseTensor or voxel indices [N, 3], got {shape}")
    coords = torch.cat([torch.zeros_like(layout[:, :1]), layout], dim=1).int()
    return SparseTensor(
        coords, torch.zeros(coords.shape[0], channels, device=coords.device), spatial_shape=resolution
    )


class FLUX3DPipeline:
    """Image + voxel layout -> 3D Gaussians: encode the image, sample a DA-SLAT latent with SMDiT (Euler,
    classifier-free guidance), decode it with the Gaussian decoder.

    Args:
        smdit: The velocity model (trained on normalised latents).
        decoder: The Gaussian decoder (trained on the same normalised latents).
        encoder: The condition encoder (the extractor the DA-SLAT features were built with, or its own).
        encoder_config: How to rebuild the encoder (``{"name": "rgb", "pool": k}`` or a VAE's), saved as is.
        stats: The training split's per-channel latent statistics: SMDiT and the decoder work on
            ``(mu - mean) / std``.
        resolution: Voxel grid resolution ``R`` of the layouts.
        image_size: Side the condition image is resized to before encoding (as in training).
        sampling: Default sampling options.
    """

    def __init__(
        self,
        smdit: SMDiT,
        decoder: GaussianDecoder,
        encoder: ConditionEncoder,
        *,
        encoder_config: dict,
        stats: FeatureStats,
        resolution: int,
        image_size: int,
        sampling: SamplingOptions | None = None,
    ) -> None:
        channels = smdit.config.latent_channels
        if decoder.config.transformer.in_channels != channels or stats.channels != channels:
            raise ValueError(
                f"decoder, stats: expected {channels} latent channels (SMDiT's), got "
                f"{decoder.config.transformer.in_channels} and {stats.channels}"
            )
        if encoder.channels != smdit.config.image_channels:
            raise ValueError(
                f"encoder: expected {smdit.config.image_channels} channels (SMDiT's image_channels), got "
                f"{encoder.channels}"
            )
        self.smdit = smdit.eval()
        self.decoder = decoder.eval()
        self.encoder = encoder
        self.encoder_config = dict(encoder_config)
        self.stats = stats
        self.resolution = int(resolution)
        self.image_size = int(image_size)
        self.sampling = sampling or SamplingOptions()

    @property
    def device(self) -> torch.device:
        """Device of the models."""
        return next(self.smdit.parameters()).device

    def to(self, device: torch.device | str) -> FLUX3DPipeline:
        """Moves the models (and the encoder) to ``device``; returns ``self``."""
        self.smdit.to(device)
        self.decoder.to(device)
        extractor = self.encoder.extractor
        if isinstance(extractor, torch.nn.Module):
            extractor.to(device)
        return self

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Writes the pipeline folder (layout in the module docstring); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_module(self.smdit, folder / "smdit", dataclasses.asdict(self.smdit.config))
        save_module(self.decoder, folder / "decoder", decoder_config_to_dict(self.decoder.config))
        (folder / "encoder").mkdir(exist_ok=True)
        extractor = self.encoder.extractor
        if hasattr(extractor, "vae"):  # a VAE extractor: diffusers' own folder format
            extractor.vae.save_pretrained(folder / "encoder" / "vae", safe_serialization=True)
        _json(folder / "encoder" / "config.json", self.encoder_config)
        _json(
            folder / "pipeline.json",
            {
                "format_version": FORMAT_VERSION,
                "resolution": self.resolution,
                "image_size": self.image_size,
                "image_patch": self.encoder.patch_size,
                "stats": self.stats.to_dict(),
                "sampling": dataclasses.asdict(self.sampling),
            },
        )
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], device: torch.device | str = "cpu"
    ) -> FLUX3DPipeline:
        """Loads a folder written by
        [`save_pretrained`][recipes.flux3d.pipeline.FLUX3DPipeline.save_pretrained].

        Args:
            folder: The pipeline folder.
            device: Device of the models.

        Returns:
            The pipeline, models in eval mode.
        """
        folder = Path(folder)
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"pipeline: expected {folder / 'pipeline.json'} (a folder written by save_pretrained or "
                "train.py), "
                "got none"
            )
        meta = json.loads((folder / "pipeline.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"pipeline: expected format_version {FORMAT_VERSION}, got {meta.get('format_version')!r}"
            )
        smdit_values, smdit_state = load_module_state(folder / "smdit")
        smdit = SMDiT(smdit_config_from_dict(smdit_values))
        smdit.load_state_dict(smdit_state, strict=True)
        decoder_values, decoder_state = load_module_state(folder / "decoder")
        decoder = GaussianDecoder(decoder_config_from_dict(decoder_values))
        decoder.load_state_dict(decoder_state, strict=True)
        encoder_config = json.loads((folder / "encoder" / "config.json").read_text())
        extractor = build_condition_extractor(encoder_config, folder / "encoder")
        sampling = dict(meta["sampling"])
        sampling["guidance_interval"] = tuple(sampling["guidance_interval"])
        pipe = cls(
            smdit,
            decoder,
            ConditionEncoder(extractor, int(meta["image_patch"])),
            encoder_config=encoder_config,
            stats=FeatureStats.from_dict(meta["stats"]),
            resolution=int(meta["resolution"]),
            image_size=int(meta["image_size"]),
            sampling=SamplingOptions(**sampling),
        )
        return pipe.to(device)

    # ------------------------------------------------------------------ inference
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Encodes condition images as in training.

        Args:
            image: Premultiplied RGB (black background) ``[3, H, W]`` or ``[B, 3, H, W]`` float in ``[0, 1]``,
                or RGBA (premultiplied here); resized to the pipeline's ``image_size`` when it differs.

        Returns:
            Encoded condition ``[B, C_img, h, w]`` on the pipeline's device.
        """
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
            shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a [3 or 4, H, W] or [B, 3 or 4, H, W] tensor, got {shape}")
        images = image[None] if image.dim() == 3 else image
        if images.shape[1] not in (3, 4):
            raise ValueError(f"image: expected 3 (RGB) or 4 (RGBA) channels, got {images.shape[1]}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.float()
        if images.shape[1] == 4:
            images = images[:, :3] * images[:, 3:]
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = torch.nn.functional.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            ).clamp(0, 1)
        return self.encoder(images.to(self.device))

    @torch.no_grad()
    def generate_latent(
        self,
        image: torch.Tensor,
        layout: SparseTensor | torch.Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        progress: bool = True,
        normalized: bool = False,
    ) -> SparseTensor:
        """Samples the DA-SLAT latent of ``layout`` conditioned on ``image``.

        Args:
            image: Condition image(s), see
                [`encode_image`][recipes.flux3d.pipeline.FLUX3DPipeline.encode_image].
            layout: A SparseTensor (its coords; feats unused) or voxel indices ``[N, 3]`` at ``resolution``.
            steps: Euler steps (default: the pipeline's).
            guidance: CFG scale ``w`` (default: the pipeline's).
            seed: Seed of the initial noise (drawn on the CPU: the same on every device).
            progress: Show a progress bar.
            normalized: Return the normalised latent (the decoder's input) instead of DA-SLAT units.

        Returns:
            SparseTensor on the layout with feats ``[N, C]``.
        """
        steps = self.sampling.steps if steps is None else steps
        guidance = self.sampling.guidance if guidance is None else guidance
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        template = _as_layout(layout, self.resolution, self.smdit.config.latent_channels).to(self.device)
        condition = self.encode_image(image)
        if condition.shape[0] != template.batch_size:
            raise ValueError(
                f"image: expected {template.batch_size} images (one per layout sample), got "
                f"{condition.shape[0]}"
            )
        velocity = flow.ClassifierFreeGuidance(
            self.smdit,
            guidance,
            condition={"image": condition},
            null_condition={"image": torch.zeros_like(condition)},
            interval=tuple(self.sampling.guidance_interval),
        )
        times = flow.time_grid(steps, shift=self.sampling.shift, device=self.device)
        generator = torch.Generator().manual_seed(int(seed))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            latent = flow.generate(velocity, template, times, generator=generator, progress=progress).sample
        latent = latent.replace(latent.feats.float())
        return latent if normalized else latent.replace(self.stats.denormalize(latent.feats))

    @torch.no_grad()
    def decode(self, latent: SparseTensor, *, normalized: bool = False) -> Gaussians:
        """Decodes a DA-SLAT latent (in DA-SLAT units unless ``normalized``) into Gaussians."""
        feats = latent.feats.float() if normalized else self.stats.normalize(latent.feats.float())[0]
        volume = latent.replace(feats).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.decoder(volume)

    def __call__(
        self,
        image: torch.Tensor,
        layout: SparseTensor | torch.Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> Gaussians:
        """Image + layout -> Gaussians (one set per layout sample, packed).

        Args:
            image: Condition image(s) ``[3, H, W]`` / ``[B, 3, H, W]`` (RGB premultiplied, or RGBA).
            layout: The voxel layout: a SparseTensor with ``B`` samples or indices ``[N, 3]``.
            steps: Euler steps (default: the pipeline's, paper 50).
            guidance: CFG scale (default: the pipeline's).
            seed: Noise seed.
            progress: Show a progress bar.

        Returns:
            [`Gaussians`][sparse3d.gaussians.Gaussians], ``K`` per voxel, float32.
        """
        latent = self.generate_latent(
            image, layout, steps=steps, guidance=guidance, seed=seed, progress=progress, normalized=True
        )
        return self.decode(latent, normalized=True)
