"""Image and regulariser losses for training Gaussian decoders: L1, SSIM, LPIPS, volume, opacity.

Images are channels-first ``[B, 3, H, W]`` in ``[0, 1]`` unless a function says otherwise;
[`GaussianLoss`][sparse3d.gaussians.losses.GaussianLoss] takes the renderer's channels-last images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.gaussians.container import Gaussians

__all__ = [
    "LPIPS",
    "GaussianLoss",
    "GaussianLossTerms",
    "gaussian_window",
    "l1_loss",
    "opacity_loss",
    "ssim",
    "volume_loss",
]


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 4:
        raise ValueError(f"pred must be [B, C, H, W], got shape {list(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {list(pred.shape)}, got {list(target.shape)}")


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error.

    Args:
        pred: Any shape.
        target: Same shape as ``pred``.

    Returns:
        Scalar ``mean(|pred - target|)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {list(pred.shape)}, got {list(target.shape)}")
    return (pred - target).abs().mean()


def gaussian_window(
    size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalised 2D Gaussian window (outer product of a 1D one), as in the 3DGS SSIM.

    Args:
        size: Window side in pixels (odd).
        sigma: Standard deviation in pixels.
        dtype: Output dtype.

    Returns:
        ``[size, size]`` weights summing to 1.
    """
    if size <= 0 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int, got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    line = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    line = line / line.sum()
    return torch.outer(line, line).to(dtype)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Structural similarity with a Gaussian window, as the 3DGS and TRELLIS training code.

    Local statistics are depthwise convolutions with the window and zero padding of
    ``window_size // 2`` (so borders see zeros, exactly as those codes do);
    ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2`` with ``R = data_range``.

    Args:
        pred: ``[B, C, H, W]`` images.
        target: ``[B, C, H, W]`` images.
        window_size: Odd window side.
        sigma: Window standard deviation.
        data_range: Dynamic range of the images (1 for [0, 1]).
        reduction: ``"mean"`` for a scalar, ``"none"`` for the ``[B, C, H, W]`` SSIM map.

    Returns:
        Scalar mean SSIM (1 for identical images), or the SSIM map.
    """
    _check_images(pred, target)
    channels = pred.shape[1]
    window = gaussian_window(window_size, sigma, dtype=pred.dtype).to(pred.device)
    window = window.expand(channels, 1, window_size, window_size)  # [C, 1, k, k]

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window, padding=window_size // 2, groups=channels)

    mean_pred, mean_target = blur(pred), blur(target)
    var_pred = blur(pred * pred) - mean_pred**2
    var_target = blur(target * target) - mean_target**2
    covariance = blur(pred * target) - mean_pred * mean_target
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    numerator = (2 * mean_pred * mean_target + c1) * (2 * covariance + c2)
    denominator = (mean_pred**2 + mean_target**2 + c1) * (var_pred + var_target + c2)
    ssim_map = numerator / denominator
    if reduction == "none":
        return ssim_map
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return ssim_map.mean()


def volume_loss(scales: torch.Tensor) -> torch.Tensor:
    """Volume regulariser: mean over Gaussians of the product of the three scales.

    Args:
        scales: ``[N, 3]`` activated scales.

    Returns:
        Scalar ``mean(s_x s_y s_z)`` (0 for no Gaussians).
    """
    if scales.dim() != 2 or scales.shape[1] != 3:
        raise ValueError(f"scales must be [N, 3], got {list(scales.shape)}")
    if scales.shape[0] == 0:
        return scales.sum()
    return scales.prod(dim=-1).mean()


def opacity_loss(opacities: torch.Tensor) -> torch.Tensor:
    """Opacity regulariser of TRELLIS: ``mean((1 - o)^2)``, pushing Gaussians towards opaque.

    Args:
        opacities: ``[N]`` activated opacities.

    Returns:
        Scalar (0 for no Gaussians).
    """
    if opacities.dim() != 1:
        raise ValueError(f"opacities must be [N], got {list(opacities.shape)}")
    if opacities.shape[0] == 0:
        return opacities.sum()
    return ((1.0 - opacities) ** 2).mean()


# --------------------------------------------------------------------------------------- LPIPS
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_ALEX_TAPS = (1, 4, 7, 9, 11)  # relu1 .. relu5


def _vgg16_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers[: _VGG16_TAPS[-1] + 1]), _VGG16_TAPS, (64, 128, 256, 512, 512)


def _alexnet_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    layers = [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    ]  # fmt: skip
    return nn.Sequential(*layers), _ALEX_TAPS, (64, 192, 384, 256, 256)


class _LinearHead(nn.Module):
    """1x1 convolution without bias; ``model.1`` keeps the key names of the LPIPS checkpoints."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS perceptual distance: a frozen VGG16 or AlexNet trunk plus learned linear heads.

    ``d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` with ``f_l`` the trunk
    activations at five ReLUs, ``n`` the unit normalisation over channels and ``w_l`` the
    non-negative head weights. Inputs are shifted and scaled by LPIPS's fixed constants first.

    Parameter names match torchvision's ``features.*`` and the LPIPS heads' ``lin{l}.model.1.weight``,
    so the torchvision ImageNet checkpoint and the LPIPS head file can be loaded without renaming.
    Weights are only read from local files (see
    [`from_pretrained`][sparse3d.gaussians.losses.LPIPS.from_pretrained]); the constructor
    initialises them at random.

    Args:
        net: ``"vgg"`` (as TRELLIS) or ``"alex"``.
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg") -> None:
        super().__init__()
        if net == "vgg":
            features, taps, channels = _vgg16_features()
        elif net == "alex":
            features, taps, channels = _alexnet_features()
        else:
            raise ValueError(f"net must be 'vgg' or 'alex', got {net!r}")
        self.net = net
        self.features = features
        self.taps = taps
        for index, width in enumerate(channels):
            self.add_module(f"lin{index}", _LinearHead(width))
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        net: Literal["vgg", "alex"] = "vgg",
    ) -> LPIPS:
        """Loads weights from local files only (``.safetensors`` or a torch ``.pt/.pth`` state dict).

        Give one file holding every weight (as saved from this class's ``state_dict()``), or
        several whose keys are merged, e.g. torchvision's ``vgg16-397923af.pth`` together with
        LPIPS's ``weights/v0.1/vgg.pth``. Keys ``classifier.*`` (torchvision's head) are skipped on
        purpose; any other unknown or missing key is an error.

        Args:
            paths: One path or a sequence of paths.
            net: Trunk architecture the weights belong to.

        Returns:
            The model in eval mode with gradients disabled for its parameters.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        state: dict[str, torch.Tensor] = {}
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LPIPS weights file not found: {os.fspath(path)!r}")
            if os.fspath(path).endswith(".safetensors"):
                from safetensors.torch import load_file

                loaded = load_file(os.fspath(path))
            else:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            state.update({k: v for k, v in loaded.items() if not k.startswith("classifier.")})
        model = cls(net)
        for key in list(state):
            if key.startswith("features.") and int(key.split(".")[1]) >= len(model.features):
                state.pop(key)  # torchvision's VGG16 has layers after relu5_3 that LPIPS never uses
        model.load_state_dict(state, strict=True)
        return model

    def forward(self, pred: torch.Tensor, target: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Per-image LPIPS distance.

        Args:
            pred: ``[B, 3, H, W]`` images.
            target: ``[B, 3, H, W]`` images.
            normalize: Inputs are in ``[0, 1]`` (mapped to ``[-1, 1]`` here); ``False`` if they
                already are in ``[-1, 1]``.

        Returns:
            ``[B]`` distances (0 for identical images).
        """
        _check_images(pred, target)
        if pred.shape[1] != 3:
            raise ValueError(f"LPIPS needs 3-channel images, got {pred.shape[1]} channels")
        if normalize:
            pred, target = 2 * pred - 1, 2 * target - 1
        both = torch.cat([pred, target])  # [2B, 3, H, W]
        hidden = (both - self.shift.to(both.dtype)) / self.scale.to(both.dtype)
        distance = torch.zeros(pred.shape[0], dtype=pred.dtype, device=pred.device)
        head = 0
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index not in self.taps:
                continue
            unit = hidden / (hidden.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            first, second = unit.chunk(2)
            difference = (first - second) ** 2  # [B, C_l, h, w]
            distance = distance + getattr(self, f"lin{head}")(difference).mean(dim=(1, 2, 3))
            head += 1
        return distance


# --------------------------------------------------------------------------------------- combined
@dataclass(frozen=True)
class GaussianLossTerms:
    """Individual (unweighted) loss terms and their weighted total; zero-weight terms are 0.

    Attributes:
        total: Weighted sum, the scalar to backpropagate.
        l1: Mean absolute error.
        ssim: ``1 - SSIM``.
        lpips: Mean LPIPS.
        volume: Mean product of scales.
        opacity: ``mean((1 - o)^2)``.
    """

    total: torch.Tensor
    l1: torch.Tensor
    ssim: torch.Tensor
    lpips: torch.Tensor
    volume: torch.Tensor
    opacity: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class GaussianLoss:
    """Decoder training loss; the defaults are TRELLIS's.

    ``total = l1_weight L1 + ssim_weight (1 - SSIM) + lpips_weight LPIPS
    + volume_weight mean(prod(scales)) + opacity_weight mean((1 - o)^2)``.

    Attributes:
        l1_weight: Weight of the L1 term.
        ssim_weight: Weight of ``1 - SSIM`` (11x11 window, sigma 1.5).
        lpips_weight: Weight of LPIPS (needs an [`LPIPS`][sparse3d.gaussians.losses.LPIPS] model).
        volume_weight: Weight of the volume regulariser.
        opacity_weight: Weight of the opacity regulariser.
        ssim_window: SSIM window size.
        ssim_sigma: SSIM window standard deviation.
    """

    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    lpips_weight: float = 0.2
    volume_weight: float = 1e4
    opacity_weight: float = 1e-3
    ssim_window: int = 11
    ssim_sigma: float = 1.5

    def __call__(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        gaussians: Gaussians | None = None,
        *,
        lpips: LPIPS | None = None,
    ) -> GaussianLossTerms:
        """Computes the loss on rendered images (channels last, as the renderer returns them).

        Args:
            pred: ``[..., H, W, 3]`` renders in ``[0, 1]`` (e.g. ``[C, H, W, 3]``).
            target: Same shape as ``pred``.
            gaussians: The rendered Gaussians; needed when a regulariser weight is non-zero.
            lpips: LPIPS model; needed when ``lpips_weight`` is non-zero.

        Returns:
            [`GaussianLossTerms`][sparse3d.gaussians.losses.GaussianLossTerms].
        """
        if pred.shape != target.shape or pred.dim() < 3 or pred.shape[-1] != 3:
            raise ValueError(
                f"pred and target must both be [..., H, W, 3], "
                f"got {list(pred.shape)} and {list(target.shape)}"
            )
        images = pred.reshape(-1, *pred.shape[-3:]).permute(0, 3, 1, 2)  # [B, 3, H, W]
        references = target.reshape(-1, *target.shape[-3:]).permute(0, 3, 1, 2)  # [B, 3, H, W]
        zero = pred.new_zeros(())
        terms = {
            "l1": l1_loss(images, references),
            "ssim": zero,
            "lpips": zero,
            "volume": zero,
            "opacity": zero,
        }
        if self.ssim_weight:
            terms["ssim"] = 1.0 - ssim(
                images.float(), references.float(), window_size=self.ssim_window, sigma=self.ssim_sigma
            )
        if self.lpips_weight:
            if lpips is None:
                raise ValueError(f"lpips_weight={self.lpips_weight} needs an LPIPS model, got lpips=None")
            terms["lpips"] = lpips(images.float(), references.float()).mean()
        if self.volume_weight or self.opacity_weight:
            if gaussians is None:
                raise ValueError("volume/opacity regularisers have non-zero weights but gaussians=None")
            if self.volume_weight:
                terms["volume"] = volume_loss(gaussians.scales)
            if self.opacity_weight:
                terms["opacity"] = opacity_loss(gaussians.opacities)
        total = (
            self.l1_weight * terms["l1"]
            + self.ssim_weight * terms["ssim"]
            + self.lpips_weight * terms["lpips"]
            + self.volume_weight * terms["volume"]
            + self.opacity_weight * terms["opacity"]
        )
        return GaussianLossTerms(total=total, **terms)
