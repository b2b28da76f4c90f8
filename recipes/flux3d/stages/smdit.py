"""The SMDiT stage: rectified flow on normalised DA-SLAT latents, conditioned on the encoded condition view
(encoded on the training device in batches), on the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

import sparse3d.flow as flow
from recipes.flux3d.conditioning import ConditionEncoder
from recipes.flux3d.configs import SamplingConfig, SMDiTStageConfig, config_to_dict
from recipes.flux3d.data import (
    AssetStore,
    FeatureStats,
    LatentBatch,
    LatentDataset,
    collate_latents,
    load_feature_stats,
    open_assets,
)
from recipes.flux3d.engine import ResumableLoader, enable_activation_checkpointing, write_json
from recipes.flux3d.model import SMDiT, SMDiTConfig
from recipes.flux3d.pipeline import build_condition_extractor, save_module

__all__ = ["SMDiTStage", "encoder_config_for", "sample_latents"]


def encoder_config_for(extractor: str, pool: int = 1, weights: str | None = None) -> dict:
    """The saved form of a condition encoder (see ``build_condition_extractor``)."""
    config: dict[str, Any] = {"name": extractor}
    if extractor == "rgb":
        config["pool"] = int(pool)
    else:
        config["weights"] = None if weights is None else str(weights)
    return config


@torch.no_grad()
def sample_latents(
    model: SMDiT,
    template: Any,
    condition: torch.Tensor,
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    progress: bool = False,
) -> Any:
    """Euler + CFG sampling of normalised latents on ``template``'s layout (the unconditional pass sees
    zeros)."""
    velocity = flow.ClassifierFreeGuidance(
        model,
        sampling.guidance,
        condition={"image": condition},
        null_condition={"image": torch.zeros_like(condition)},
        interval=tuple(sampling.guidance_interval),
    )
    times = flow.time_grid(sampling.steps, shift=sampling.shift, device=condition.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=condition.device.type == "cuda"):
        sample = flow.generate(velocity, template, times, generator=generator, progress=progress).sample
    return sample.replace(sample.feats.float())


class SMDiTStage:
    """What the engine trains for SMDiT ([`Stage`][recipes.flux3d.engine.Stage]).

    Args:
        config: The stage's settings.
        root: Prepared dataset folder.
        encoder_config: The condition encoder (``encoder_config_for``).
        sampling: Sampling settings of the evaluation.
        feature: ``features/<name>`` folder (default: the only one).
        progress: Progress bars while opening the data.
    """

    name = "smdit"

    def __init__(
        self,
        config: SMDiTStageConfig,
        root: str | Path,
        encoder_config: dict,
        sampling: SamplingConfig,
        feature: str | None = None,
        *,
        progress: bool = True,
    ) -> None:
        self.settings = config
        self.root = Path(root)
        self.sampling = sampling
        self.train: AssetStore = open_assets(
            self.root, feature, split="train", renders=False, cond_image_size=config.cond_image_size,
            progress=progress,
        )  # fmt: skip
        self.feature = self.train.feature_name
        self.heldout: AssetStore = open_assets(
            self.root, self.feature, split="heldout", renders=False, cond_image_size=config.cond_image_size,
            progress=progress,
        )  # fmt: skip
        self.stats: FeatureStats = load_feature_stats(self.root, self.feature)
        self.encoder_config = dict(encoder_config)
        extractor = build_condition_extractor(self.encoder_config)
        self.encoder = ConditionEncoder(extractor, config.model.image_patch)
        self.model_config: SMDiTConfig = dataclasses.replace(
            config.model, latent_channels=self.train.channels, image_channels=self.encoder.channels
        )
        if self.train.resolution % config.model.voxel_patch:
            raise ValueError(
                f"data: expected a grid resolution divisible by voxel_patch={config.model.voxel_patch}, got "
                f"{self.train.resolution}"
            )
        self.time_sampler = flow.TimeSampler(
            distribution="logit_normal", mean=config.time_mean, std=config.time_std
        )
        self.path = flow.LinearPath()
        count = min(config.eval_assets, len(self.heldout))
        self._eval = LatentDataset(self.heldout, cond_view=0, noisy=False, stats=self.stats)
        self._eval_indices = list(range(count))

    def config(self) -> dict[str, Any]:
        return {
            "stage": config_to_dict(self.settings),
            "model": dataclasses.asdict(self.model_config),
            "encoder": self.encoder_config,
            "sampling": config_to_dict(self.sampling),
            "data": {"train": self.train.summary(), "heldout": self.heldout.summary()},
            "stats": self.stats.to_dict(),
        }

    def build_model(self) -> SMDiT:
        model = SMDiT(self.model_config)
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing([*model.double_blocks, *model.single_blocks])
        return model

    def loader(self, *, seed: int, batch_size: int) -> ResumableLoader:
        dataset = LatentDataset(self.train, noisy=True, stats=self.stats)
        workers = self.settings.workers
        return ResumableLoader(
            dataset, range(len(self.train)), batch_size, seed=seed, collate_fn=collate_latents,
            num_workers=workers, pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
        )  # fmt: skip

    def encode(self, batch: LatentBatch) -> torch.Tensor:
        """The batch's condition images, encoded on the batch's device ``[B, C_img, h, w]``."""
        images = batch.cond_rgb()
        extractor = self.encoder.extractor
        if isinstance(extractor, torch.nn.Module):
            extractor.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder(images)

    def loss(self, model: SMDiT, batch: LatentBatch, generator: torch.Generator):
        x0 = batch.latents
        images = self.encode(batch)
        dropped = flow.drop_condition(images, self.settings.condition_dropout, generator=generator)
        t = self.time_sampler(x0.batch_size, generator=generator, device=images.device)
        sample = self.path.sample(x0, t, noise=flow.noise_like(x0, generator=generator))
        prediction = model(sample.x_t, sample.t, dropped.condition)
        return flow.flow_matching_loss(prediction, sample.target), {}

    def evaluate(self, model: SMDiT, step: int, out_dir: Path) -> dict[str, float]:
        """Held-out latent error of guided samples from each asset's condition view 0, against the error when
        conditioned on another asset's view (SMDiT must use its condition) and the data's mean square."""
        device = next(model.parameters()).device
        batches = [collate_latents([self._eval[(index, 0)]]).to(device) for index in self._eval_indices]
        errors, wrong, scale = [], [], []
        for position, batch in enumerate(batches):
            other = batches[(position + 1) % len(batches)]
            truth = batch.latents
            right = sample_latents(model, truth, self.encode(batch), self.sampling, seed=position)
            errors.append(float((right.feats - truth.feats).square().mean()))
            if len(batches) > 1:
                swapped = sample_latents(model, truth, self.encode(other), self.sampling, seed=position)
                wrong.append(float((swapped.feats - truth.feats).square().mean()))
            scale.append(float(truth.feats.square().mean()))
        metrics = {
            "heldout_latent_mse": sum(errors) / len(errors),
            "heldout_latent_mse_other_image": sum(wrong) / len(wrong) if wrong else float("nan"),
            "heldout_mean_square": sum(scale) / len(scale),
            "heldout_assets": len(errors),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "eval.json", {**metrics, "per_asset": errors, "per_asset_other_image": wrong})
        return metrics

    def export(self, model: SMDiT, out_dir: Path) -> None:
        save_module(model, out_dir, dataclasses.asdict(self.model_config))
        write_json(out_dir / "encoder.json", self.encoder_config)
        write_json(out_dir / "stats.json", self.stats.to_dict())
