"""Recipe presets as plain functions returning one flat-ish, frozen config per stage.

``toy()`` runs the whole pipeline on 2 CPU cores in minutes, ``small()`` on one H200 in about 20 minutes,
``paper()`` has the paper's sizes and schedule. Every value can be overridden from the command line with
``--set section.field=value`` (e.g. ``--set decoder.optim.lr=3e-4 smdit.model.dim=256``), parsed by the
field's type ([`apply_overrides`][recipes.flux3d.configs.apply_overrides]).

Values the paper lost in extraction (learning rates, warmup, EMA, time sampler) are TRELLIS's or chosen and
documented here.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from recipes.flux3d.engine import OptimConfig
from recipes.flux3d.model import SMDiTConfig
from sparse3d.gaussians import GaussianDecoderConfig, decoder_paper, decoder_tiny
from sparse3d.gaussians.decoder import SparseTransformerConfig

__all__ = [
    "DataConfig",
    "FeatureConfig",
    "DecoderStageConfig",
    "SMDiTStageConfig",
    "SamplingConfig",
    "EvalConfig",
    "RecipeConfig",
    "toy",
    "small",
    "paper",
    "PRESETS",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The procedural dataset (``procedural.py``) the presets train on.

    Attributes:
        num_assets: Training assets.
        heldout: Held-out assets, generated from a seed stream disjoint from the training one.
        image_size: Side of the multi-view renders (decoder targets, DA-SLAT input).
        views: Hammersley views per asset.
        cond_views: Condition views per asset.
        cond_image_size: Side of the condition renders (default ``image_size``).
        voxel_resolution: Voxel grid resolution ``R``.
        seed: Dataset seed.
        workers: Generator processes.
    """

    num_assets: int = 200
    heldout: int = 32
    image_size: int = 128
    views: int = 24
    cond_views: int = 4
    cond_image_size: int | None = None
    voxel_resolution: int = 32
    seed: int = 0
    workers: int = 1


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """DA-SLAT features (``prepare.py``).

    Attributes:
        extractor: ``rgb``, ``flux-vae``, ``sdxl-vae`` or ``dinov2``.
        weights: Local weights of a VAE / DINOv2 extractor (nothing is downloaded).
        pool: Average pooling of the ``rgb`` extractor (its latent stride).
        views: Views averaged per voxel (default: all).
    """

    extractor: str = "rgb"
    weights: str | None = None
    pool: int = 1
    views: int | None = None


@dataclass(frozen=True, kw_only=True)
class DecoderStageConfig:
    """The decoder stage: DA-SLAT latents (normalised per channel) -> Gaussians, by multi-view rendering.

    Attributes:
        model: The Gaussian decoder; ``in_channels`` and the head's ``resolution`` are taken from the data.
        optim: Optimiser, schedule, steps and batch size.
        views_per_step: Target views rendered per asset and step.
        render_size: Side of the training renders (targets are resized to it).
        background: ``white``, ``black`` or ``random`` (a colour per asset and step).
        lpips_weight: LPIPS weight (needs ``lpips_weights``; 0 without).
        lpips_weights: Local LPIPS weights file.
        ssim_weight: Weight of ``1 - SSIM``.
        eval_assets: Held-out assets scored at each evaluation (``None``: all).
        eval_views: Views per held-out asset scored.
        workers: DataLoader workers.
        activation_checkpointing: Recompute the transformer blocks in the backward pass.
    """

    model: GaussianDecoderConfig = field(default_factory=lambda: decoder_paper(64))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(steps=100_000, lr=1e-4, batch_size=8, warmup_steps=1000)
    )
    views_per_step: int = 4
    render_size: int = 512
    background: str = "random"
    lpips_weight: float = 0.2
    lpips_weights: str | None = None
    ssim_weight: float = 0.2
    eval_assets: int | None = 8
    eval_views: int = 4
    workers: int = 4
    activation_checkpointing: bool = False


@dataclass(frozen=True, kw_only=True)
class SMDiTStageConfig:
    """The SMDiT stage: rectified flow on normalised DA-SLAT latents, conditioned on the encoded image.

    Attributes:
        model: SMDiT; ``latent_channels`` and ``image_channels`` are taken from the data.
        optim: Optimiser, schedule, steps and batch size.
        condition_dropout: Probability of a zero image (for classifier-free guidance).
        time_mean: Mean of the logit-normal time sampler (TRELLIS 1.0).
        time_std: Std of the logit-normal time sampler (TRELLIS 1.0).
        cond_image_size: Side condition images are resized to before encoding (``None``: as stored).
        eval_assets: Held-out assets generated at each evaluation.
        workers: DataLoader workers.
        activation_checkpointing: Recompute the MMDiT blocks in the backward pass.
    """

    model: SMDiTConfig = field(default_factory=SMDiTConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(steps=200_000, lr=1e-4, batch_size=8, warmup_steps=1000)
    )
    condition_dropout: float = 0.1
    time_mean: float = 1.0
    time_std: float = 1.0
    cond_image_size: int | None = None
    eval_assets: int = 4
    workers: int = 4
    activation_checkpointing: bool = False


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Inference defaults stored in the pipeline.

    Attributes:
        steps: Euler steps (paper: 50).
        guidance: CFG scale ``w`` in ``v = v_u + w (v_c - v_u)``.
        guidance_interval: ``t`` range where guidance applies.
        shift: Static time shift of the sampling grid.
    """

    steps: int = 50
    guidance: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The final evaluation of the assembled pipeline on held-out assets.

    Attributes:
        assets: Held-out assets evaluated (``None``: all of them).
        render_size: Side of the evaluation renders.
        turntable_frames: Frames of the turntable GIF.
    """

    assets: int | None = None
    render_size: int = 256
    turntable_frames: int = 24


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """Everything one run of ``train.py`` needs, stage by stage.

    Attributes:
        name: The preset's name.
        data: Procedural data.
        features: DA-SLAT extraction.
        decoder: Decoder stage.
        smdit: SMDiT stage.
        sampling: Inference defaults.
        eval: Final evaluation.
    """

    name: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    smdit: SMDiTStageConfig = field(default_factory=SMDiTStageConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _decoder(
    *, dim: int, layers: int, heads: int, gaussians: int, window: int | None, resolution: int
) -> GaussianDecoderConfig:
    base = decoder_tiny(resolution)
    transformer = SparseTransformerConfig(
        in_channels=base.transformer.in_channels, dim=dim, num_layers=layers, num_heads=heads, window=window
    )
    head = dataclasses.replace(base.head, num_gaussians=gaussians)
    return GaussianDecoderConfig(transformer=transformer, head=head)


def toy() -> RecipeConfig:
    """The default of ``train.py``: the whole pipeline on 2 CPU cores in minutes (16^3 grids, 32 px renders,
    a 2-layer decoder and a 2 + 2-block SMDiT): a result you can look at, not a converged model."""
    model = SMDiTConfig(
        latent_channels=3,
        image_channels=3,
        dim=64,
        num_heads=4,
        num_double_blocks=2,
        num_single_blocks=2,
        axes_dims=(4, 6, 6),
    )
    return RecipeConfig(
        name="toy",
        data=DataConfig(num_assets=24, heldout=4, image_size=32, views=12, cond_views=2, voxel_resolution=16),
        features=FeatureConfig(extractor="rgb", pool=4),
        decoder=DecoderStageConfig(
            model=_decoder(dim=64, layers=2, heads=4, gaussians=2, window=None, resolution=16),
            optim=OptimConfig(
                steps=300, lr=3e-3, batch_size=2, warmup_steps=20, ema_decay=0.99, checkpoint_every=100,
                log_every=10,
            ),
            views_per_step=2,
            render_size=32,
            background="white",
            lpips_weight=0.0,
            eval_assets=4,
            eval_views=4,
            workers=0,
        ),
        smdit=SMDiTStageConfig(
            model=model,
            optim=OptimConfig(
                steps=400, lr=1e-3, batch_size=8, warmup_steps=20, ema_decay=0.99, checkpoint_every=100,
                log_every=10,
            ),
            eval_assets=4,
            workers=0,
        ),
        sampling=SamplingConfig(steps=20, guidance=2.0),
        eval=EvalConfig(assets=None, render_size=64, turntable_frames=12),
    )  # fmt: skip


def small() -> RecipeConfig:
    """One H200: each stage within ~6 minutes, the whole pipeline within ~20 (32^3 grids, 256 px renders)."""
    model = SMDiTConfig(
        latent_channels=3,
        image_channels=3,
        dim=384,
        num_heads=6,
        num_double_blocks=4,
        num_single_blocks=4,
        axes_dims=(20, 22, 22),
    )
    return RecipeConfig(
        name="small",
        data=DataConfig(
            num_assets=400, heldout=32, image_size=256, views=24, cond_views=4, cond_image_size=256,
            voxel_resolution=32, workers=16,
        ),
        features=FeatureConfig(extractor="rgb", pool=8),
        decoder=DecoderStageConfig(
            model=_decoder(dim=384, layers=6, heads=6, gaussians=16, window=None, resolution=32),
            optim=OptimConfig(
                steps=4000, lr=5e-4, batch_size=8, warmup_steps=200, ema_decay=0.999, checkpoint_every=1000,
                log_every=50, eval_every=2000,
            ),
            views_per_step=4,
            render_size=256,
            background="random",
            lpips_weight=0.0,
            eval_assets=None,
            eval_views=8,
            workers=8,
        ),
        smdit=SMDiTStageConfig(
            model=model,
            optim=OptimConfig(
                steps=6000, lr=3e-4, batch_size=32, warmup_steps=200, ema_decay=0.999, checkpoint_every=1000,
                log_every=50, eval_every=3000,
            ),
            eval_assets=8,
            workers=8,
        ),
        sampling=SamplingConfig(steps=50, guidance=3.0),
        eval=EvalConfig(assets=None, render_size=256, turntable_frames=24),
    )  # fmt: skip


def paper() -> RecipeConfig:
    """The paper's sizes and schedule: 64^3 DA-SLAT from the FLUX VAE at 512 px renders, the 85M decoder
    (12 layers, 768 wide, K = 32) for 100K steps, SMDiT 12 + 12 blocks (16 x 72, 819M) for 200K steps, batch 8
    per GPU on 8 GPUs (here: per process). Needs local FLUX VAE weights (``--set features.weights=PATH``)."""
    model = SMDiTConfig()
    return RecipeConfig(
        name="paper",
        data=DataConfig(
            num_assets=2000, heldout=64, image_size=512, views=150, voxel_resolution=64, workers=16
        ),
        features=FeatureConfig(extractor="flux-vae"),
        decoder=DecoderStageConfig(model=decoder_paper(64)),
        smdit=SMDiTStageConfig(model=model, cond_image_size=512),
    )


PRESETS: dict[str, Callable[[], RecipeConfig]] = {"toy": toy, "small": small, "paper": paper}
"""Presets by name (``--preset``)."""


# ------------------------------------------------------------------------------------- overrides
def _parse_value(text: str, kind: Any, name: str) -> Any:
    """Parses ``text`` as a value of the annotated type ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, options[0], name)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {name}: expected true or false, got {text!r}")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(
                f"--set {name}: expected a value of type {kind.__name__}, got {text!r}"
            ) from None
    if origin is tuple:
        parts = [part for part in text.replace("(", "").replace(")", "").split(",") if part.strip()]
        args = typing.get_args(kind)
        types_ = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(types_) != len(parts):
            raise ValueError(f"--set {name}: expected {len(types_)} comma-separated values, got {text!r}")
        return tuple(_parse_value(part.strip(), t, name) for part, t in zip(parts, types_, strict=True))
    raise ValueError(f"--set {name}: fields of type {kind} cannot be set from the command line")


def _replace_path(config: Any, path: Sequence[str], text: str, full: str) -> Any:
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not a config section")
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    head = path[0]
    if head not in names:
        raise ValueError(
            f"--set {full}: {type(config).__name__} has no field {head!r} (fields: {sorted(names)})"
        )
    if len(path) == 1:
        value = _parse_value(text, hints[head], full)
    else:
        value = _replace_path(getattr(config, head), path[1:], text, full)
    return dataclasses.replace(config, **{head: value})


def apply_overrides(config: RecipeConfig, overrides: Sequence[str]) -> RecipeConfig:
    """Applies ``section.field=value`` overrides (values parsed by the field's type; ``none`` for None).

    Args:
        config: A preset.
        overrides: e.g. ``["decoder.optim.lr=3e-4", "smdit.model.num_heads=8", "features.weights=/w/flux"]``.

    Returns:
        The new config (validated by each dataclass's own checks).

    Raises:
        ValueError: An unknown field, a section set as a value, or a value of the wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set: expected section.field=value, got {item!r}")
        key, text = item.split("=", 1)
        config = _replace_path(config, key.strip().split("."), text.strip(), key.strip())
    return config


def config_to_dict(config: Any) -> dict:
    """A config as JSON-ready nested dicts."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _from_dict(kind: Any, values: Any) -> Any:
    if dataclasses.is_dataclass(kind) and isinstance(values, dict):
        hints = typing.get_type_hints(kind)
        return kind(**{name: _from_dict(hints[name], value) for name, value in values.items()})
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return None if values is None else _from_dict(options[0], values)
    if origin is tuple and isinstance(values, list):
        return tuple(values)
    return values


def config_from_dict(values: dict) -> RecipeConfig:
    """Inverse of [`config_to_dict`][recipes.flux3d.configs.config_to_dict] for a ``RecipeConfig``."""
    return _from_dict(RecipeConfig, values)
