"""Paired image metrics for evaluation: per-image PSNR, SSIM and LPIPS.

Images are channels-first ``[B, C, H, W]``; every metric is computed per image, then averaged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.gaussians.losses import LPIPS
from sparse3d.gaussians.losses import ssim as _ssim_map

__all__ = ["LPIPSMetric", "psnr", "ssim"]

Reduction = Literal["mean", "none"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, image in (("pred", pred), ("target", target)):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
        if not image.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating tensor, got {image.dtype}")
    if pred.dim() != 4:
        raise ValueError(f"pred: expected shape [B, C, H, W], got {list(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target: expected the shape of pred {list(pred.shape)}, got {list(target.shape)}")
    if pred.shape[0] == 0:
        raise ValueError(f"pred: expected at least one image, got shape {list(pred.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(R^2 / MSE)``, then averaged over images.

    The MSE is taken per image over ``(C, H, W)`` (as image-to-3D papers report it), not pooled over the
    batch as torchmetrics' default does; identical images give ``inf``.

    Args:
        pred: ``[B, C, H, W]`` images.
        target: ``[B, C, H, W]`` images.
        data_range: Dynamic range ``R`` of the images (1 for ``[0, 1]``, 255 for 8-bit values).
        reduction: ``"mean"`` for the scalar mean over images, ``"none"`` for the ``[B]`` values.

    Returns:
        Scalar (float32) mean PSNR in dB, or ``[B]`` per-image values.
    """
    _check_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range: expected > 0, got {data_range}")
    difference = pred.float() - target.float()
    mse = difference.square().mean(dim=(1, 2, 3))  # [B]
    values = 10.0 * torch.log10(data_range**2 / mse)
    return _reduce(values, reduction)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    padding: Literal["reflect", "valid"] = "reflect",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity per image, then averaged over images; the evaluation counterpart of the loss.

    Uses the Gaussian-window SSIM map of the training loss ([`ssim`][sparse3d.gaussians.losses.ssim],
    ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``), which zero-pads the borders. Here the borders are handled
    as evaluation code does instead:

    - ``"reflect"`` (default): images are reflect-padded by ``window_size // 2`` and the map is averaged
      over the full image, as torchmetrics' ``StructuralSimilarityIndexMeasure`` (1.9) does.
    - ``"valid"``: only windows fully inside the image are averaged (a border of ``window_size // 2``
      dropped), as scikit-image's ``structural_similarity`` with ``gaussian_weights=True``.

    Args:
        pred: ``[B, C, H, W]`` images.
        target: ``[B, C, H, W]`` images.
        data_range: Dynamic range ``R`` of the images (1 for ``[0, 1]``).
        window_size: Odd Gaussian window side.
        sigma: Window standard deviation in pixels.
        padding: ``"reflect"`` or ``"valid"``, see above.
        reduction: ``"mean"`` for the scalar mean over images, ``"none"`` for the ``[B]`` values.

    Returns:
        Scalar (float32) mean SSIM (1 for identical images), or ``[B]`` per-image values.
    """
    _check_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range: expected > 0, got {data_range}")
    if padding not in ("reflect", "valid"):
        raise ValueError(f"padding: expected 'reflect' or 'valid', got {padding!r}")
    border = window_size // 2
    height, width = pred.shape[2:]
    smallest = border + 1 if padding == "reflect" else 2 * border + 1
    if height < smallest or width < smallest:
        raise ValueError(
            f"pred: expected H and W >= {smallest} for window_size {window_size} and padding {padding!r}, "
            f"got {height} x {width}"
        )
    pred, target = pred.float(), target.float()
    if padding == "reflect":
        pred = F.pad(pred, (border, border, border, border), mode="reflect")  # [B, C, H + 2r, W + 2r]
        target = F.pad(target, (border, border, border, border), mode="reflect")  # [B, C, H + 2r, W + 2r]
    ssim_map = _ssim_map(
        pred, target, window_size=window_size, sigma=sigma, data_range=data_range, reduction="none"
    )  # [B, C, h, w]; only windows away from the zero padding are kept below
    inner = ssim_map[:, :, border : ssim_map.shape[2] - border, border : ssim_map.shape[3] - border]
    return _reduce(inner.mean(dim=(1, 2, 3)), reduction)


class LPIPSMetric(nn.Module):
    """LPIPS as an evaluation metric: per-image distances of images in ``[0, 1]``, averaged.

    Wraps [`LPIPS`][sparse3d.gaussians.losses.LPIPS] (frozen, eval mode, local weights only) and runs it
    without gradients.

    Args:
        lpips: The LPIPS network, usually from
            [`from_pretrained`][sparse3d.metrics.image.LPIPSMetric.from_pretrained].
    """

    def __init__(self, lpips: LPIPS) -> None:
        super().__init__()
        if not isinstance(lpips, LPIPS):
            raise TypeError(f"lpips: expected a sparse3d.gaussians.losses.LPIPS, got {type(lpips).__name__}")
        self.lpips = lpips.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        net: Literal["vgg", "alex"] = "vgg",
    ) -> LPIPSMetric:
        """Loads LPIPS weights from local files (see [`LPIPS.from_pretrained`][sparse3d.gaussians.losses.LPIPS.from_pretrained]).

        Args:
            paths: One weights file or several whose keys are merged (trunk + linear heads).
            net: ``"vgg"`` or ``"alex"``.

        Returns:
            The metric.
        """  # noqa: E501
        return cls(LPIPS.from_pretrained(paths, net=net))

    @torch.no_grad()
    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, *, reduction: Reduction = "mean"
    ) -> torch.Tensor:
        """Computes LPIPS distances.

        Args:
            pred: ``[B, 3, H, W]`` images in ``[0, 1]``.
            target: ``[B, 3, H, W]`` images in ``[0, 1]``.
            reduction: ``"mean"`` for the scalar mean over images, ``"none"`` for the ``[B]`` values.

        Returns:
            Scalar mean distance (0 for identical images), or ``[B]`` per-image distances.
        """
        _check_pair(pred, target)
        if pred.shape[1] != 3:
            raise ValueError(f"pred: expected 3 channels [B, 3, H, W], got {list(pred.shape)}")
        for name, image in (("pred", pred), ("target", target)):
            low, high = float(image.amin()), float(image.amax())
            if low < 0.0 or high > 1.0:
                raise ValueError(f"{name}: expected values in [0, 1], got range [{low:.4g}, {high:.4g}]")
        parameter = next(self.lpips.parameters())
        distances = self.lpips(
            pred.to(parameter.device, parameter.dtype),
            target.to(parameter.device, parameter.dtype),
            normalize=True,
        )  # [B]
        return _reduce(distances, reduction)
