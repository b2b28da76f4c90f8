"""Image feature extractors (FLUX VAE, SDXL VAE, DINOv2, raw RGB) behind one protocol, for DA-SLAT volumes."""

from sparse3d.features.extractors import (
    FLUX_VAE_SCALE,
    FLUX_VAE_SHIFT,
    SDXL_VAE_SCALE,
    DINOv2Features,
    FeatureExtractor,
    FeatureMaps,
    FluxVAEFeatures,
    RGBFeatures,
    SDXLVAEFeatures,
    check_images,
)

__all__ = [
    "FLUX_VAE_SCALE",
    "FLUX_VAE_SHIFT",
    "SDXL_VAE_SCALE",
    "DINOv2Features",
    "FeatureExtractor",
    "FeatureMaps",
    "FluxVAEFeatures",
    "RGBFeatures",
    "SDXLVAEFeatures",
    "check_images",
]
