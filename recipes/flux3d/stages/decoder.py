"""The decoder stage: normalised DA-SLAT latents -> ``K`` Gaussians per voxel, supervised by renders of
random views (L1 + SSIM (+ LPIPS) + volume/opacity regularisers), on the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from recipes.flux3d.configs import DecoderStageConfig, config_to_dict
from recipes.flux3d.data import (
    AssetStore,
    DecoderBatch,
    DecoderDataset,
    FeatureStats,
    collate_decoder,
    load_feature_stats,
    open_assets,
)
from recipes.flux3d.engine import ResumableLoader, enable_activation_checkpointing, write_json
from recipes.flux3d.pipeline import decoder_config_to_dict, save_module
from sparse3d.gaussians import (
    LPIPS,
    GaussianDecoder,
    GaussianDecoderConfig,
    GaussianLoss,
    render_batch,
    save_grid,
)
from sparse3d.gaussians.viz import to_uint8

__all__ = ["DecoderStage", "adapt_decoder_config", "render_decoded"]


def adapt_decoder_config(
    config: GaussianDecoderConfig, channels: int, resolution: int
) -> GaussianDecoderConfig:
    """The decoder config for data with ``channels`` latent channels on an ``R = resolution`` grid; the
    initial
    Gaussian scale keeps its fraction of a voxel."""
    head = config.head
    head = dataclasses.replace(
        head, resolution=resolution, scale_bias=head.scale_bias * head.resolution / resolution
    )
    return GaussianDecoderConfig(
        transformer=dataclasses.replace(config.transformer, in_channels=channels), head=head
    )


def render_decoded(
    decoder: GaussianDecoder, batch: DecoderBatch, size: int, background: torch.Tensor | None = None
) -> torch.Tensor:
    """Decodes ``batch.volume`` and renders every asset from its views: ``[B, K, H, W, 3]`` float32.

    ``background`` ``[B, 3]`` (default: the batch's backgrounds)."""
    gaussians = decoder(batch.volume)
    backgrounds = batch.backgrounds if background is None else background
    views = batch.viewmats.shape[1]
    colours = backgrounds[:, None, :].expand(-1, views, -1).float()  # [B, K, 3]
    out = render_batch(gaussians.to(torch.float32), batch.viewmats, batch.Ks, size, size, colours)
    return out.colors.float()


class DecoderStage:
    """What the engine trains for the decoder ([`Stage`][recipes.flux3d.engine.Stage]).

    Args:
        config: The stage's settings.
        root: Prepared dataset folder (``features/<name>/`` with ``stats.json``).
        feature: ``features/<name>`` folder (default: the only one).
        progress: Progress bars while opening the data.
    """

    name = "decoder"

    def __init__(
        self,
        config: DecoderStageConfig,
        root: str | Path,
        feature: str | None = None,
        *,
        progress: bool = True,
    ) -> None:
        self.settings = config
        self.root = Path(root)
        size = config.render_size
        self.train: AssetStore = open_assets(
            self.root, feature, split="train", cond_renders=False, image_size=size,
            min_views=config.views_per_step, progress=progress,
        )  # fmt: skip
        self.feature = self.train.feature_name
        self.heldout: AssetStore = open_assets(
            self.root, self.feature, split="heldout", cond_renders=False, image_size=size,
            min_views=config.eval_views, progress=progress,
        )  # fmt: skip
        self.stats: FeatureStats = load_feature_stats(self.root, self.feature)
        self.model_config = adapt_decoder_config(config.model, self.train.channels, self.train.resolution)
        self.loss_fn = GaussianLoss(
            lpips_weight=config.lpips_weight if config.lpips_weights else 0.0, ssim_weight=config.ssim_weight
        )
        self.lpips = LPIPS.from_pretrained(config.lpips_weights) if config.lpips_weights else None
        count = (
            len(self.heldout) if config.eval_assets is None else min(config.eval_assets, len(self.heldout))
        )
        frames = list(range(config.eval_views))
        self._eval = DecoderDataset(
            self.heldout, frames=frames, background="white", noisy=False, stats=self.stats
        )
        self._eval_indices = list(range(count))

    def config(self) -> dict[str, Any]:
        return {
            "stage": config_to_dict(self.settings),
            "model": decoder_config_to_dict(self.model_config),
            "data": {"train": self.train.summary(), "heldout": self.heldout.summary()},
            "stats": self.stats.to_dict(),
        }

    def build_model(self) -> GaussianDecoder:
        model = GaussianDecoder(self.model_config)
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing(model.transformer.blocks)
        return model

    def loader(self, *, seed: int, batch_size: int) -> ResumableLoader:
        dataset = DecoderDataset(
            self.train, views_per_item=self.settings.views_per_step, background=self.settings.background,
            noisy=True, stats=self.stats,
        )  # fmt: skip
        workers = self.settings.workers
        return ResumableLoader(
            dataset, range(len(self.train)), batch_size, seed=seed, collate_fn=collate_decoder,
            num_workers=workers, pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
        )  # fmt: skip

    def loss(self, model: GaussianDecoder, batch: DecoderBatch, generator: torch.Generator):
        gaussians = model(batch.volume)
        views = batch.viewmats.shape[1]
        backgrounds = batch.backgrounds[:, None, :].expand(-1, views, -1).float()  # [B, K, 3]
        size = self.settings.render_size
        renders = render_batch(
            gaussians.to(torch.float32), batch.viewmats, batch.Ks, size, size, backgrounds
        ).colors
        terms = self.loss_fn(renders.float(), batch.targets(), gaussians, lpips=self.lpips)
        logged = {"l1": terms.l1.detach(), "ssim": terms.ssim.detach(), "volume": terms.volume.detach()}
        return terms.total, logged

    def _psnrs(self, model: GaussianDecoder, zero_input: bool) -> tuple[list[float], list[torch.Tensor]]:
        device = next(model.parameters()).device
        values, pictures = [], []
        size = self.settings.render_size
        for index in self._eval_indices:
            batch = collate_decoder([self._eval[(index, 0)]]).to(device)
            if zero_input:
                batch = dataclasses.replace(
                    batch, volume=batch.volume.replace(torch.zeros_like(batch.volume.feats))
                )
            renders = render_decoded(model, batch, size).clamp(0, 1)  # [1, K, H, W, 3]
            target = batch.targets()
            mse = (renders - target).square().mean(dim=(2, 3, 4))[0]  # [K]
            values.append(float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()))
            pictures.append(torch.cat([target[0], renders[0]], dim=2).cpu())  # [K, H, 2W, 3]
        return values, pictures

    def evaluate(self, model: GaussianDecoder, step: int, out_dir: Path) -> dict[str, float]:
        """Held-out PSNR of the decoded true latents and of a zero input (the decoder must use its input)."""
        truth, pictures = self._psnrs(model, zero_input=False)
        zeros, _ = self._psnrs(model, zero_input=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [picture.reshape(-1, *picture.shape[2:]) for picture in pictures[:4]]  # [K H, 2W, 3] each
        grid = torch.cat(rows, dim=1) if rows else None  # assets side by side
        if grid is not None:
            save_grid(to_uint8(grid[None]), out_dir / "heldout.png")
        metrics = {
            "heldout_psnr": sum(truth) / len(truth),
            "heldout_psnr_zero_input": sum(zeros) / len(zeros),
            "heldout_assets": len(truth),
        }
        write_json(out_dir / "eval.json", {**metrics, "per_asset": truth, "per_asset_zero_input": zeros})
        return metrics

    def export(self, model: GaussianDecoder, out_dir: Path) -> None:
        save_module(model, out_dir, decoder_config_to_dict(self.model_config))
        write_json(out_dir / "stats.json", self.stats.to_dict())
