"""Recipe presets: plain functions returning flat configs (``toy()``, ``paper()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from recipes.flux3d.model import SMDiTConfig

__all__ = ["TrainConfig", "toy", "paper", "PRESETS"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyperparameters of the SMDiT stage.

    Attributes:
        model: The SMDiT architecture.
        resolution: Voxel grid size ``R`` of the latents (taken from the data with ``--data``).
        batch_size: Assets per step.
        steps: Optimiser steps.
        learning_rate: AdamW learning rate (the paper's value was lost in extraction; 1e-4 as TRELLIS).
        weight_decay: AdamW weight decay.
        condition_dropout: Probability of replacing a sample's image by zeros (for CFG).
        time_mean: Mean of the logit-normal time sampler (TRELLIS: 1.0).
        time_std: Std of the logit-normal time sampler (TRELLIS: 1.0).
        sample_steps: Euler steps at inference (paper: 50).
        guidance: Classifier-free guidance scale ``w`` in ``v_u + w (v_c - v_u)``.
        seed: Seed of data, noise and initialisation.
        log_every: Steps between progress-bar updates of the loss.
    """

    model: SMDiTConfig = field(default_factory=SMDiTConfig)
    resolution: int = 64
    batch_size: int = 8
    steps: int = 200_000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    condition_dropout: float = 0.1
    time_mean: float = 1.0
    time_std: float = 1.0
    sample_steps: int = 50
    guidance: float = 3.0
    seed: int = 0
    log_every: int = 10


def toy() -> TrainConfig:
    """A minute on 2 CPU cores: 16^3 procedural latents with 8 channels, width 64, 2 + 2 blocks."""
    model = SMDiTConfig(
        latent_channels=8,
        image_channels=8,
        dim=64,
        num_heads=4,
        num_double_blocks=2,
        num_single_blocks=2,
        axes_dims=(4, 6, 6),
    )
    return TrainConfig(
        model=model, resolution=16, batch_size=4, steps=150, learning_rate=1e-3, sample_steps=10, log_every=5
    )


def paper() -> TrainConfig:
    """The paper's SMDiT: 12 double + 12 single blocks, 16 heads x 72 (width 1152), 64^3 DA-SLAT volumes."""
    return TrainConfig()


PRESETS = {"toy": toy, "paper": paper}
