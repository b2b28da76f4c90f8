"""What each stage trains on the shared engine (``recipes.flux3d.engine.fit``): a model, a data stream, a
loss, an evaluation and an export, each small."""

from recipes.flux3d.stages.decoder import DecoderStage, adapt_decoder_config, render_decoded
from recipes.flux3d.stages.smdit import SMDiTStage, encoder_config_for, sample_latents

__all__ = [
    "DecoderStage",
    "SMDiTStage",
    "adapt_decoder_config",
    "encoder_config_for",
    "render_decoded",
    "sample_latents",
]
