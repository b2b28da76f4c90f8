"""Evaluation metrics for image-to-3D: PSNR, SSIM, LPIPS, CLIP score, and FD/KD over pluggable embeddings.

Nothing here imports torchmetrics; transformers is imported only when a DINOv2 or CLIP embedding is loaded.
"""

from sparse3d.metrics.distribution import (
    DistributionScores,
    FeatureDistances,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    kernel_distance,
)
from sparse3d.metrics.embeddings import CLIPImageEmbedding, DINOv2Embedding, ImageEmbedding, clip_score
from sparse3d.metrics.image import LPIPSMetric, psnr, ssim

__all__ = [
    "CLIPImageEmbedding",
    "DINOv2Embedding",
    "DistributionScores",
    "FeatureDistances",
    "ImageEmbedding",
    "LPIPSMetric",
    "clip_score",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "kernel_distance",
    "psnr",
    "ssim",
]
