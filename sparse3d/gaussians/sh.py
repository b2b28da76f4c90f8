"""Real spherical harmonics up to degree 3 in the 3DGS / gsplat convention, and RGB <-> SH0."""

from __future__ import annotations

import math

import torch

__all__ = [
    "SH_C0",
    "MAX_SH_DEGREE",
    "eval_sh",
    "num_sh_bases",
    "rgb_to_sh",
    "sh_basis",
    "sh_degree_from_bases",
    "sh_to_rgb",
]

MAX_SH_DEGREE = 3
"""Highest supported SH degree (16 coefficients per channel)."""

SH_C0 = 0.28209479177387814
"""Degree-0 basis value ``1 / (2 sqrt(pi))``; RGB = 0.5 + SH_C0 * f_dc."""

_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for a degree: ``(degree + 1) ** 2``.

    Args:
        degree: SH degree in ``[0, 3]``.

    Returns:
        ``(degree + 1) ** 2``.
    """
    if not isinstance(degree, int) or not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"degree must be an int in [0, {MAX_SH_DEGREE}], got {degree!r}")
    return (degree + 1) ** 2


def sh_degree_from_bases(num_bases: int) -> int:
    """Inverse of [`num_sh_bases`][sparse3d.gaussians.sh.num_sh_bases].

    Args:
        num_bases: Number of coefficients per channel; must be 1, 4, 9 or 16.

    Returns:
        The SH degree.
    """
    degree = math.isqrt(num_bases) - 1
    if num_bases < 1 or (degree + 1) ** 2 != num_bases or degree > MAX_SH_DEGREE:
        raise ValueError(f"number of SH coefficients must be one of 1, 4, 9, 16, got {num_bases}")
    return degree


def sh_basis(directions: torch.Tensor, degree: int) -> torch.Tensor:
    """Evaluates the real SH basis functions at unit directions.

    The sign and ordering convention is the one of the INRIA 3DGS code and gsplat (for example
    basis 1 is ``-C1 * y``), so coefficients are interchangeable with their checkpoints and PLY files.

    Args:
        directions: ``[..., 3]`` directions; they are normalised here (zero vectors give NaN).
        degree: SH degree in ``[0, 3]``.

    Returns:
        ``[..., (degree + 1) ** 2]`` basis values.
    """
    count = num_sh_bases(degree)
    if directions.shape[-1] != 3:
        raise ValueError(f"directions must have shape [..., 3], got {tuple(directions.shape)}")
    unit = directions / directions.norm(dim=-1, keepdim=True)
    x, y, z = unit.unbind(-1)
    bases = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        xy, yz, xz = x * y, y * z, x * z
        bases += [
            _C2[0] * xy,
            _C2[1] * yz,
            _C2[2] * (2.0 * zz - xx - yy),
            _C2[3] * xz,
            _C2[4] * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            _C3[0] * y * (3.0 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4.0 * zz - xx - yy),
            _C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            _C3[4] * x * (4.0 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3.0 * yy),
        ]
    basis = torch.stack(bases, dim=-1)  # [..., K]
    assert basis.shape[-1] == count
    return basis


def eval_sh(coefficients: torch.Tensor, directions: torch.Tensor, degree: int | None = None) -> torch.Tensor:
    """Evaluates SH colours ``sum_k basis_k(dir) * coefficients[k]`` (without the +0.5 offset).

    Args:
        coefficients: ``[..., K, 3]`` SH coefficients, ``K >= (degree + 1) ** 2``; extra
            (higher-degree) coefficients are ignored only when ``degree`` is given explicitly.
        directions: ``[..., 3]`` view directions (broadcastable to the leading dims), normalised here.
        degree: SH degree to use; ``None`` uses the degree implied by ``K``.

    Returns:
        ``[..., 3]`` raw SH colour; renderers add 0.5 and clamp at 0.
    """
    if coefficients.dim() < 2 or coefficients.shape[-1] != 3:
        raise ValueError(f"coefficients must have shape [..., K, 3], got {tuple(coefficients.shape)}")
    num_bases = coefficients.shape[-2]
    if degree is None:
        degree = sh_degree_from_bases(num_bases)
    count = num_sh_bases(degree)
    if count > num_bases:
        raise ValueError(f"degree {degree} needs {count} coefficients per channel, got K={num_bases}")
    basis = sh_basis(directions, degree)  # [..., count]
    return (basis.unsqueeze(-1) * coefficients[..., :count, :]).sum(dim=-2)


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """Degree-0 SH coefficient giving a view-independent colour: ``(rgb - 0.5) / SH_C0``.

    Args:
        rgb: ``[..., 3]`` colours (any range; 0..1 for displayable colours).

    Returns:
        ``[..., 3]`` DC coefficients (``f_dc`` in PLY files).
    """
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh_dc: torch.Tensor) -> torch.Tensor:
    """Colour of a degree-0 coefficient, ``0.5 + SH_C0 * sh_dc`` (not clamped).

    Args:
        sh_dc: ``[..., 3]`` DC coefficients.

    Returns:
        ``[..., 3]`` colours.
    """
    return sh_dc * SH_C0 + 0.5
