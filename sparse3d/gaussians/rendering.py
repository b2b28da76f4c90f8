"""Differentiable rendering of 3D Gaussians: gsplat on CUDA, and an exact plain-PyTorch reference.

The reference follows gsplat 1.5's constants (2D blur ``eps2d``, opacity-aware 3.33-sigma extent,
alpha cap 0.999 and threshold 1/255, transmittance cut-off 1e-4, pixel centres at +0.5) so the two
agree on the same scene; it evaluates every (pixel, Gaussian) pair densely and is meant for CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from sparse3d.gaussians.container import Gaussians
from sparse3d.gaussians.sh import eval_sh, num_sh_bases

__all__ = [
    "ALPHA_MAX",
    "ALPHA_THRESHOLD",
    "TRANSMITTANCE_MIN",
    "Projection",
    "RenderOutput",
    "project_gaussians",
    "quat_to_rotmat",
    "rasterize_reference",
    "render",
    "render_batch",
]

ALPHA_THRESHOLD = 1.0 / 255.0
"""A Gaussian whose alpha at a pixel is below this is skipped there."""
ALPHA_MAX = 0.999
"""Per-Gaussian alpha is capped at this value."""
TRANSMITTANCE_MIN = 1e-4
"""Compositing stops before the Gaussian that would bring transmittance to or below this."""

Backend = Literal["auto", "torch", "gsplat"]
RasterizeMode = Literal["classic", "antialiased"]


@dataclass(frozen=True)
class RenderOutput:
    """Rendered images, channels last.

    Attributes:
        colors: ``[C, H, W, 3]`` (or ``[B, C, H, W, 3]`` from
            [`render_batch`][sparse3d.gaussians.rendering.render_batch]) RGB, background composited.
        alphas: ``[C, H, W, 1]`` accumulated opacity ``1 - T_final``.
        depths: ``[C, H, W, 1]`` expected camera-space depth ``sum(w z) / max(alpha, 1e-10)``
            (gsplat's ``"RGB+ED"``); 0 where nothing was hit.
    """

    colors: torch.Tensor
    alphas: torch.Tensor
    depths: torch.Tensor


@dataclass(frozen=True)
class Projection:
    """Gaussians projected into ``C`` cameras (the reference's intermediate result).

    Attributes:
        means2d: ``[C, N, 2]`` pixel positions ``(u, v)``.
        conics: ``[C, N, 3]`` inverse 2D covariance ``(a, b, c)`` of ``[[a, b], [b, c]]`` after the blur.
        depths: ``[C, N]`` camera-space z.
        opacities: ``[C, N]`` opacities (times the antialiasing compensation in that mode).
        colors: ``[C, N, 3]`` view-dependent RGB ``max(sh + 0.5, 0)``.
        valid: ``[C, N]`` bool: inside the near/far range, positive 2D determinant, opacity >= 1/255.
    """

    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    valid: torch.Tensor


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of (not necessarily unit) quaternions ``(w, x, y, z)``.

    Args:
        quats: ``[..., 4]`` quaternions; normalised here.

    Returns:
        ``[..., 3, 3]`` rotation matrices.
    """
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)  # [..., 3, 3]


def _check_cameras(viewmats: torch.Tensor, Ks: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if not isinstance(viewmats, torch.Tensor) or viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        shape = list(viewmats.shape) if isinstance(viewmats, torch.Tensor) else type(viewmats).__name__
        raise ValueError(f"viewmats must be a tensor [C, 4, 4] (world to camera), got {shape}")
    if not isinstance(Ks, torch.Tensor) or Ks.shape != (viewmats.shape[0], 3, 3):
        shape = list(Ks.shape) if isinstance(Ks, torch.Tensor) else type(Ks).__name__
        raise ValueError(f"Ks must be a tensor [{viewmats.shape[0]}, 3, 3] (one per viewmat), got {shape}")
    for name, value in (("viewmats", viewmats), ("Ks", Ks)):
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device}, expected {like.device} (the Gaussians' device)")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
    return viewmats.to(like.dtype), Ks.to(like.dtype)


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_background(
    background: torch.Tensor | None, cameras: int, like: torch.Tensor
) -> torch.Tensor | None:
    if background is None:
        return None
    background = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if background.shape == (3,):
        return background.expand(cameras, 3)
    if background.shape != (cameras, 3):
        raise ValueError(f"background must have shape [3] or [{cameras}, 3], got {list(background.shape)}")
    return background


def _resolve_degree(sh: torch.Tensor, sh_degree: int | None) -> int:
    available = sh.shape[1]
    if sh_degree is None:
        return {1: 0, 4: 1, 9: 2, 16: 3}[available]
    if num_sh_bases(sh_degree) > available:
        raise ValueError(
            f"sh_degree={sh_degree} needs {num_sh_bases(sh_degree)} SH coefficients, have {available}"
        )
    return sh_degree


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    sh: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    antialiased: bool = False,
) -> Projection:
    """EWA projection of 3D Gaussians into pinhole cameras, as gsplat's fused projection.

    ``Sigma = R S S^T R^T`` is rotated into the camera, ``cov2d = J Sigma_c J^T`` with the perspective
    Jacobian ``J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]`` where ``tx/z, ty/z`` are clamped to
    the image's field of view widened by 30 % (so off-screen Gaussians do not blow up), then
    ``eps2d`` is added to the diagonal. In antialiased mode the opacity is multiplied by
    ``sqrt(det(cov2d) / det(cov2d + eps2d I))``.

    Args:
        means: ``[N, 3]`` world positions.
        quats: ``[N, 4]`` quaternions ``(w, x, y, z)``.
        scales: ``[N, 3]`` activated scales.
        opacities: ``[N]`` activated opacities.
        sh: ``[N, K, 3]`` SH coefficients.
        viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV: x right, y down, z forward).
        Ks: ``[C, 3, 3]`` pixel intrinsics.
        width: Image width in pixels.
        height: Image height in pixels.
        sh_degree: SH degree to evaluate.
        near_plane: Gaussians with camera z below this are culled.
        far_plane: Gaussians with camera z above this are culled.
        eps2d: Isotropic 2D blur added to the projected covariance (pixels^2).
        antialiased: Apply the Mip-Splatting opacity compensation.

    Returns:
        The [`Projection`][sparse3d.gaussians.rendering.Projection].
    """
    rotation = viewmats[:, :3, :3]  # [C, 3, 3]
    translation = viewmats[:, :3, 3]  # [C, 3]
    means_cam = torch.einsum("cij,nj->cni", rotation, means) + translation[:, None]  # [C, N, 3]
    axes = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3] = R diag(s)
    covariance = axes @ axes.transpose(1, 2)  # [N, 3, 3]
    covariance_cam = torch.einsum("cij,njk,clk->cnil", rotation, covariance, rotation)  # [C, N, 3, 3]

    x, y, z = means_cam.unbind(-1)  # [C, N] each
    valid = (z >= near_plane) & (z <= far_plane)
    z = torch.where(valid, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(
        [fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(*z.shape, 2, 3)  # [C, N, 2, 3]
    cov2d = jacobian @ covariance_cam @ jacobian.transpose(-1, -2)  # [C, N, 2, 2]
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_original = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [C, N, 3]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [C, N, 2]
    opacity = opacities.expand(viewmats.shape[0], -1)  # [C, N]
    if antialiased:
        opacity = opacity * torch.sqrt(torch.clamp(det_original / det, min=0.0))
    valid = valid & (opacity >= ALPHA_THRESHOLD)

    camera_positions = -torch.einsum("cji,cj->ci", rotation, translation)  # [C, 3] = -R^T t
    directions = means[None] - camera_positions[:, None]  # [C, N, 3]
    colors = torch.clamp_min(eval_sh(sh[None], directions, sh_degree) + 0.5, 0.0)  # [C, N, 3]
    return Projection(means2d, conics, means_cam[..., 2], opacity, colors, valid)


def _composite_camera(
    means2d: torch.Tensor,
    conics: torch.Tensor,
    opacities: torch.Tensor,
    features: torch.Tensor,
    width: int,
    height: int,
    pixel_chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of depth-sorted 2D Gaussians of one camera.

    Args:
        means2d: ``[M, 2]``; conics ``[M, 3]``; opacities ``[M]``; features ``[M, F]``; sorted near to far.

    Returns:
        ``([H * W, F] accumulated features, [H * W] final transmittance)``.
    """
    count = means2d.shape[0]
    device, dtype = means2d.device, means2d.dtype
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    pixels = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1) + 0.5  # [P, 2] pixel centres (u, v)
    chunk = pixel_chunk or max(1, (1 << 22) // max(count, 1))
    accumulated, transmittance = [], []
    for start in range(0, pixels.shape[0], chunk):
        delta = means2d[None] - pixels[start : start + chunk, None]  # [p, M, 2]
        dx, dy = delta.unbind(-1)
        sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy  # [p, M]
        alpha = torch.clamp_max(opacities * torch.exp(-sigma), ALPHA_MAX)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
        after = torch.cumprod(1.0 - alpha, dim=1)  # [p, M] transmittance after each Gaussian
        # T is non-increasing, so "stop before the first Gaussian with T_after <= 1e-4" keeps exactly
        # the Gaussians whose T_after (computed with all alphas) is above the cut-off.
        keep = after > TRANSMITTANCE_MIN
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)  # [p, M]
        weights = alpha * before
        accumulated.append(weights @ features)  # [p, F]
        transmittance.append(torch.prod(1.0 - alpha, dim=1))  # [p]
    return torch.cat(accumulated), torch.cat(transmittance)


def rasterize_reference(
    gaussians: Gaussians,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    *,
    sh_degree: int | None = None,
    rasterize_mode: RasterizeMode = "classic",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    pixel_chunk: int | None = None,
) -> RenderOutput:
    """Plain-PyTorch renderer of one sample: exact alpha compositing, differentiable by autograd.

    For each camera, valid Gaussians (see
    [`project_gaussians`][sparse3d.gaussians.rendering.project_gaussians])
    are sorted by camera z; for each pixel centre ``p = (j + 0.5, i + 0.5)`` and Gaussian ``k``,
    ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``d = mean2d - p``,
    ``alpha = min(0.999, o exp(-sigma))`` (skipped if ``sigma < 0`` or ``alpha < 1/255``), and
    ``C = sum_k c_k alpha_k T_k + T_final * background`` with ``T_k = prod_{j<k} (1 - alpha_j)``,
    stopping before the first Gaussian that would bring ``T`` to ``<= 1e-4``. The ``[pixels, N]``
    alphas are evaluated densely in chunks of ``pixel_chunk`` pixels: memory and time are
    ``O(H W N)``, fine for small images and scenes. gsplat's tile culling is not needed: outside
    its opacity-aware box every alpha is below the threshold anyway.

    Args:
        gaussians: One sample (``batch_size == 1``).
        viewmats: ``[C, 4, 4]`` world-to-camera matrices (OpenCV), cast to the Gaussians' dtype.
        Ks: ``[C, 3, 3]`` pixel intrinsics.
        width: Image width.
        height: Image height.
        background: ``[3]`` or ``[C, 3]`` colour behind the Gaussians; ``None`` is black.
        sh_degree: SH degree to evaluate; ``None`` uses all coefficients.
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (opacity compensation).
        near_plane: Near culling plane (camera z).
        far_plane: Far culling plane.
        eps2d: 2D blur in pixels^2.
        pixel_chunk: Pixels per dense block; default keeps blocks near 4M entries.

    Returns:
        [`RenderOutput`][sparse3d.gaussians.rendering.RenderOutput] with ``[C, H, W, *]`` images.
    """
    _check_size(width, height)
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    if gaussians.batch_size != 1:
        raise ValueError(f"render takes one sample, got batch_size={gaussians.batch_size}; use render_batch")
    viewmats, Ks = _check_cameras(viewmats, Ks, gaussians.means)
    cameras = viewmats.shape[0]
    background = _check_background(background, cameras, gaussians.means)
    degree = _resolve_degree(gaussians.sh, sh_degree)
    projection = project_gaussians(
        gaussians.means,
        gaussians.quats,
        gaussians.scales,
        gaussians.opacities,
        gaussians.sh,
        viewmats,
        Ks,
        width,
        height,
        sh_degree=degree,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        antialiased=rasterize_mode == "antialiased",
    )
    colors, alphas, depths = [], [], []
    for camera in range(cameras):
        visible = torch.nonzero(projection.valid[camera]).squeeze(1)  # [M]
        order = visible[torch.argsort(projection.depths[camera, visible], stable=True)]
        features = torch.cat(
            [projection.colors[camera, order], projection.depths[camera, order, None]], dim=-1
        )  # [M, 4] = RGB + depth
        accumulated, transmittance = _composite_camera(
            projection.means2d[camera, order],
            projection.conics[camera, order],
            projection.opacities[camera, order],
            features,
            width,
            height,
            pixel_chunk,
        )
        alpha = (1.0 - transmittance)[:, None]  # [P, 1]
        rgb = accumulated[:, :3]
        if background is not None:
            rgb = rgb + transmittance[:, None] * background[camera]
        colors.append(rgb.reshape(height, width, 3))
        alphas.append(alpha.reshape(height, width, 1))
        depths.append((accumulated[:, 3:] / alpha.clamp(min=1e-10)).reshape(height, width, 1))
    return RenderOutput(torch.stack(colors), torch.stack(alphas), torch.stack(depths))


def _gsplat_available() -> bool:
    return importlib.util.find_spec("gsplat") is not None


def _render_gsplat(
    gaussians: Gaussians,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None,
    *,
    sh_degree: int | None,
    rasterize_mode: RasterizeMode,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> RenderOutput:
    _check_size(width, height)
    if gaussians.batch_size != 1:
        raise ValueError(f"render takes one sample, got batch_size={gaussians.batch_size}; use render_batch")
    # gsplat's CUDA ops fail on CPU tensors only at the first kernel: check before importing.
    for name, value in (("gaussians", gaussians.means), ("viewmats", viewmats), ("Ks", Ks)):
        if not value.is_cuda:
            raise RuntimeError(f"backend='gsplat' needs CUDA tensors, but {name} is on {value.device}")
    if gaussians.dtype != torch.float32:
        raise TypeError(f"backend='gsplat' needs float32 Gaussians, got {gaussians.dtype}")
    viewmats, Ks = _check_cameras(viewmats, Ks, gaussians.means)
    background = _check_background(background, viewmats.shape[0], gaussians.means)
    degree = _resolve_degree(gaussians.sh, sh_degree)
    from gsplat import rasterization

    output, alphas, _ = rasterization(
        gaussians.means,
        gaussians.quats,
        gaussians.scales,
        gaussians.opacities,
        gaussians.sh,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=degree,
        render_mode="RGB+ED",
        rasterize_mode=rasterize_mode,
    )
    colors = output[..., :3]  # [C, H, W, 3]
    if background is not None:
        # Composited here, as gsplat would (colour + T_final * background with T_final = 1 - alpha):
        # gsplat 1.5.3 rejects `backgrounds` in its default packed mode (it checks an image shape of ()).
        colors = colors + (1.0 - alphas) * background[:, None, None, :]
    return RenderOutput(colors, alphas, output[..., 3:4])


def render(
    gaussians: Gaussians,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    *,
    sh_degree: int | None = None,
    backend: Backend = "auto",
    rasterize_mode: RasterizeMode = "classic",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> RenderOutput:
    """Renders one sample of Gaussians from ``C`` cameras (differentiable).

    Args:
        gaussians: One sample (``batch_size == 1``); see
            [`render_batch`][sparse3d.gaussians.rendering.render_batch] for packed batches.
        viewmats: ``[C, 4, 4]`` world-to-camera matrices, OpenCV axes (x right, y down, z forward).
        Ks: ``[C, 3, 3]`` pixel intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``.
        width: Image width in pixels.
        height: Image height in pixels.
        background: ``[3]`` or ``[C, 3]`` colour; ``None`` is black.
        sh_degree: SH degree to evaluate; ``None`` uses all of the Gaussians' coefficients.
        backend: ``"gsplat"`` (CUDA tensors and the gsplat package required, float32),
            ``"torch"`` ([`rasterize_reference`][sparse3d.gaussians.rendering.rasterize_reference]), or
            ``"auto"``: gsplat when the Gaussians are on CUDA and gsplat is installed, else torch.
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (Mip-Splatting opacity compensation).
        near_plane: Gaussians closer than this (camera z) are culled.
        far_plane: Gaussians farther than this are culled.
        eps2d: 2D blur added to projected covariances (pixels^2).

    Returns:
        [`RenderOutput`][sparse3d.gaussians.rendering.RenderOutput]: colours ``[C, H, W, 3]``,
        alphas ``[C, H, W, 1]``, expected depths ``[C, H, W, 1]``.
    """
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"gaussians must be Gaussians, got {type(gaussians).__name__}")
    if backend not in ("auto", "torch", "gsplat"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    if backend == "auto":
        backend = "gsplat" if gaussians.means.is_cuda and _gsplat_available() else "torch"
    options = dict(sh_degree=sh_degree, rasterize_mode=rasterize_mode, near_plane=near_plane)
    options.update(far_plane=far_plane, eps2d=eps2d)
    if backend == "gsplat":
        return _render_gsplat(gaussians, viewmats, Ks, width, height, background, **options)
    return rasterize_reference(gaussians, viewmats, Ks, width, height, background, **options)


def render_batch(
    gaussians: Gaussians,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    **options: object,
) -> RenderOutput:
    """Renders every sample of a packed batch, each from its own ``C`` cameras.

    Args:
        gaussians: ``B`` samples.
        viewmats: ``[B, C, 4, 4]`` per-sample cameras, or ``[C, 4, 4]`` shared by all samples.
        Ks: ``[B, C, 3, 3]`` or ``[C, 3, 3]`` (same convention as ``viewmats``).
        width: Image width.
        height: Image height.
        background: ``[3]``, ``[C, 3]`` or ``[B, C, 3]``; ``None`` is black.
        **options: Keyword options of [`render`][sparse3d.gaussians.rendering.render].

    Returns:
        [`RenderOutput`][sparse3d.gaussians.rendering.RenderOutput] with ``[B, C, H, W, *]`` images.
    """
    size = gaussians.batch_size
    if viewmats.dim() == 3:
        viewmats = viewmats.expand(size, *viewmats.shape)
    if Ks.dim() == 3:
        Ks = Ks.expand(size, *Ks.shape)
    if viewmats.dim() != 4 or viewmats.shape[0] != size:
        raise ValueError(f"viewmats must be [{size}, C, 4, 4] or [C, 4, 4], got {list(viewmats.shape)}")
    if Ks.dim() != 4 or Ks.shape[0] != size:
        raise ValueError(f"Ks must be [{size}, C, 3, 3] or [C, 3, 3], got {list(Ks.shape)}")
    if background is not None:
        background = torch.as_tensor(background)
        if background.dim() == 3 and background.shape[0] != size:
            raise ValueError(
                f"background must be [3], [C, 3] or [{size}, C, 3], got {list(background.shape)}"
            )
    outputs = []
    for index, sample in enumerate(gaussians.unbind()):
        sample_background = (
            background[index] if background is not None and background.dim() == 3 else background
        )
        outputs.append(
            render(sample, viewmats[index], Ks[index], width, height, sample_background, **options)
        )
    return RenderOutput(
        torch.stack([o.colors for o in outputs]),
        torch.stack([o.alphas for o in outputs]),
        torch.stack([o.depths for o in outputs]),
    )
