"""Multi-view feature projection: sample per-view feature maps at projected voxel centres and average them.

This builds DA-SLAT volumes (per-voxel mean and std of FLUX VAE latents, averaged over views) and,
with other feature maps, TRELLIS-style feature volumes. An optional depth test skips occluded views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sparse3d.geometry.voxelize import voxel_centers
from sparse3d.tensor import SparseTensor

__all__ = [
    "ProjectedFeatures",
    "project_points",
    "project_features",
    "reparameterize",
    "split_mean_std",
    "sample_latent",
]


def project_points(
    points: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projects world points into pinhole cameras (OpenCV axes).

    ``x_cam = R p + t`` (from ``viewmats``), then ``(u, v, 1) = K x_cam / z_cam``. Pixel coordinates are
    continuous: the image spans ``[0, W] x [0, H]`` and pixel ``(r, c)`` has its centre at
    ``(c + 0.5, r + 0.5)``.

    Args:
        points: Tensor ``[N, 3]`` of world positions.
        viewmats: Tensor ``[V, 4, 4]`` of world-to-camera matrices.
        Ks: Tensor ``[V, 3, 3]`` of pixel intrinsics.

    Returns:
        ``(pixels [V, N, 2] of (u, v), depth [V, N])``; ``depth`` is the camera-space ``z`` (points with
        ``depth <= 0`` are behind the camera and their ``pixels`` are meaningless).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape [N, 3], got {list(points.shape)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats: expected shape [V, 4, 4], got {list(viewmats.shape)}")
    if Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(
            f"Ks: expected shape [{viewmats.shape[0]}, 3, 3] to match viewmats, got {list(Ks.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(points.dtype, viewmats.dtype), torch.float32)
    points, viewmats, Ks = points.to(dtype), viewmats.to(dtype), Ks.to(dtype)
    camera = points @ viewmats[:, :3, :3].transpose(1, 2) + viewmats[:, None, :3, 3]  # [V, N, 3]
    image = camera @ Ks.transpose(1, 2)  # [V, N, 3]
    depth = camera[..., 2]
    return image[..., :2] / depth[..., None], depth


@dataclass(frozen=True)
class ProjectedFeatures:
    """Per-voxel features averaged over views.

    Attributes:
        coords: int32 ``[N, 3]`` voxel coordinates (i, j, k).
        resolution: Grid resolution ``R``.
        mean: float32 ``[N, C]``: the average over contributing views of the sampled mean maps
            (0 where no view contributes).
        std: float32 ``[N, C]`` averaged the same way (see ``std_reduce``), or ``None``.
        num_views: int64 ``[N]``: how many views contributed to each voxel.
    """

    coords: torch.Tensor
    resolution: int
    mean: torch.Tensor
    std: torch.Tensor | None
    num_views: torch.Tensor

    def to_sparse_tensor(self) -> SparseTensor:
        """Packs the features into a one-sample SparseTensor on an ``R^3`` grid.

        Returns:
            SparseTensor with feats ``cat(mean, std)`` ``[N, 2C]`` (``[N, C]`` without std), rows in the
            order of ``coords``.
        """
        feats = self.mean if self.std is None else torch.cat([self.mean, self.std], dim=1)
        batch = torch.zeros(self.coords.shape[0], 1, dtype=torch.int32, device=self.coords.device)
        return SparseTensor(
            torch.cat([batch, self.coords.int()], dim=1), feats, batch_size=1, spatial_shape=self.resolution
        )


def _check_maps(maps: torch.Tensor, name: str, num_views: int) -> None:
    if maps.dim() != 4 or maps.shape[0] != num_views:
        raise ValueError(f"{name}: expected shape [V={num_views}, C, h, w], got {list(maps.shape)}")
    if not maps.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {maps.dtype}")


def project_features(
    coords: torch.Tensor,
    resolution: int,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    image_size: int | Sequence[int],
    mean_maps: torch.Tensor,
    std_maps: torch.Tensor | None = None,
    *,
    depth_maps: torch.Tensor | None = None,
    depth_tolerance: float = 2.0 / 64,
    near: float = 1e-6,
    std_reduce: Literal["mean", "rms"] = "mean",
    views_per_chunk: int | None = None,
) -> ProjectedFeatures:
    """Samples per-view feature maps at every voxel centre and averages over the views that see it.

    Pixel convention: each feature map ``[h, w]`` tiles the whole image, so feature cell ``(r, c)``
    covers image pixels ``[c W / w, (c + 1) W / w) x [r H / h, (r + 1) H / h)`` and holds the value at
    its centre. For the FLUX VAE (stride 8) cell ``c`` is centred at continuous image coordinate
    ``8 c + 4``, i.e. between integer pixels ``8 c + 3`` and ``8 c + 4``. A point at continuous pixel
    coordinate ``(u, v)`` is sampled bilinearly at normalised position ``(2 u / W - 1, 2 v / H - 1)``
    with ``align_corners=False``; between the outermost cell centres and the image border the border
    value is used (``padding_mode="border"``).

    A view contributes to a voxel when the centre projects in front of the camera (``depth > near``)
    and inside the image (``0 <= u <= W``, ``0 <= v <= H``) and, if ``depth_maps`` are given, it is
    not occluded: ``depth <= rendered_depth + depth_tolerance`` with the rendered depth read at the
    pixel containing ``(u, v)`` (nearest, no interpolation across silhouettes). TRELLIS instead averages
    over all views with zeros outside the frame and no visibility test.

    Work is vectorised over voxels and chunked over views; views are accumulated one at a time in
    order, so the result does not depend on ``views_per_chunk`` (bitwise).

    Args:
        coords: Integer tensor ``[N, 3]`` of voxel (i, j, k) on an ``R^3`` grid of the world cube.
        resolution: Grid resolution ``R``.
        viewmats: OpenCV world-to-camera matrices ``[V, 4, 4]``.
        Ks: Pixel intrinsics ``[V, 3, 3]`` for images of ``image_size`` (normalised TRELLIS intrinsics go
            with ``image_size=1``).
        image_size: ``W`` or ``(W, H)``, the image the intrinsics refer to.
        mean_maps: Feature maps ``[V, C, h, w]`` (e.g. the FLUX VAE latent mean, ``h = H / 8``).
        std_maps: Optional maps ``[V, C, h, w]`` of the latent std, averaged the same way.
        depth_maps: Optional rendered camera-space depth ``[V, H_d, W_d]`` (``z``, not ray length) covering
            the same image; background must be ``+inf`` (or beyond the object). Enables the depth test.
        depth_tolerance: Slack of the depth test in world units (default two voxels at ``R = 64``; a
            surface voxel's centre can lie up to ``sqrt(3) / (2 R)`` off the surface).
        near: Minimum camera depth of a contributing point.
        std_reduce: ``"mean"`` averages the stds, ``"rms"`` takes ``sqrt(mean(std^2))``.
        views_per_chunk: Views processed at once; default keeps each chunk near 2^25 elements.

    Returns:
        A [`ProjectedFeatures`][sparse3d.geometry.project.ProjectedFeatures] with float32 ``mean`` and
        ``std`` ``[N, C]`` and ``num_views [N]``.
    """
    if coords.dim() != 2 or coords.shape[1] != 3 or coords.dtype.is_floating_point:
        raise ValueError(
            f"coords: expected an integer tensor [N, 3], got {coords.dtype} {list(coords.shape)}"
        )
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats: expected shape [V, 4, 4], got {list(viewmats.shape)}")
    num_views = viewmats.shape[0]
    _check_maps(mean_maps, "mean_maps", num_views)
    if std_maps is not None:
        _check_maps(std_maps, "std_maps", num_views)
        if std_maps.shape != mean_maps.shape:
            raise ValueError(f"std_maps: expected shape {list(mean_maps.shape)}, got {list(std_maps.shape)}")
    if depth_maps is not None and (depth_maps.dim() != 3 or depth_maps.shape[0] != num_views):
        raise ValueError(f"depth_maps: expected shape [V={num_views}, H, W], got {list(depth_maps.shape)}")
    if std_reduce not in ("mean", "rms"):
        raise ValueError(f"std_reduce: expected 'mean' or 'rms', got {std_reduce!r}")
    for name, tensor in (
        ("viewmats", viewmats),
        ("Ks", Ks),
        ("mean_maps", mean_maps),
        ("std_maps", std_maps),
    ):
        if tensor is not None and tensor.device != coords.device:
            raise ValueError(f"{name}: expected device {coords.device} (that of coords), got {tensor.device}")
    if isinstance(image_size, int):
        width, height = image_size, image_size
    else:
        width, height = (float(s) for s in image_size)
    num_voxels, channels = coords.shape[0], mean_maps.shape[1]
    if views_per_chunk is None:
        per_view = max(1, num_voxels * (channels * (2 if std_maps is not None else 1) + 8))
        views_per_chunk = max(1, min(num_views, (1 << 25) // per_view))
    if views_per_chunk < 1:
        raise ValueError(f"views_per_chunk: expected >= 1, got {views_per_chunk}")

    centres = voxel_centers(coords, resolution)  # [N, 3]
    mean_sum = torch.zeros(num_voxels, channels, dtype=torch.float32, device=coords.device)
    std_sum = torch.zeros_like(mean_sum) if std_maps is not None else None
    count = torch.zeros(num_voxels, dtype=torch.int64, device=coords.device)
    for start in range(0, num_views, views_per_chunk):
        views = slice(start, min(start + views_per_chunk, num_views))
        pixels, depth = project_points(centres, viewmats[views], Ks[views])  # [v, N, 2], [v, N]
        u, v = pixels[..., 0], pixels[..., 1]
        valid = (depth > near) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)  # [v, N]
        if depth_maps is not None:
            maps = depth_maps[views]
            depth_h, depth_w = maps.shape[1:]
            col = torch.floor(torch.where(valid, u, 0) * (depth_w / width)).long().clamp(0, depth_w - 1)
            row = torch.floor(torch.where(valid, v, 0) * (depth_h / height)).long().clamp(0, depth_h - 1)
            rendered = maps.flatten(1).gather(1, row * depth_w + col).to(depth.dtype)  # [v, N]
            valid &= depth <= rendered + depth_tolerance
        grid = torch.stack([2 * u / width - 1, 2 * v / height - 1], dim=-1)  # [v, N, 2]
        grid = torch.where(valid[..., None], grid, 0).float()[:, None]  # [v, 1, N, 2]
        sampled = F.grid_sample(
            mean_maps[views].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )[:, :, 0].transpose(1, 2)  # [v, N, C]
        sampled_std = None
        if std_maps is not None:
            sampled_std = F.grid_sample(
                std_maps[views].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
            )[:, :, 0].transpose(1, 2)  # [v, N, C]
            if std_reduce == "rms":
                sampled_std = sampled_std.square()
        for view in range(valid.shape[0]):  # sequential, so chunking never changes the sums
            mask = valid[view, :, None]
            mean_sum += torch.where(mask, sampled[view], 0)
            if std_sum is not None and sampled_std is not None:
                std_sum += torch.where(mask, sampled_std[view], 0)
        count += valid.sum(dim=0)
    denominator = count.clamp(min=1)[:, None].float()
    mean = mean_sum / denominator
    std = None
    if std_sum is not None:
        std = std_sum / denominator
        if std_reduce == "rms":
            std = std.sqrt()
    return ProjectedFeatures(coords=coords, resolution=resolution, mean=mean, std=std, num_views=count)


def reparameterize(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draws ``mean + std * eps`` with ``eps ~ N(0, I)`` from ``generator``.

    Args:
        mean: Tensor ``[N, C]``.
        std: Tensor ``[N, C]`` (non-negative).
        generator: Optional ``torch.Generator`` on the device of ``mean``.

    Returns:
        Tensor ``[N, C]``.
    """
    if mean.shape != std.shape:
        raise ValueError(f"std: expected shape {list(mean.shape)} to match mean, got {list(std.shape)}")
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + std * eps


def split_mean_std(volume: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits the feats ``[N, 2C]`` of a DA-SLAT volume into ``(mean [N, C], std [N, C])``."""
    feats = volume.feats
    if feats.dim() != 2 or feats.shape[1] % 2:
        raise ValueError(
            f"volume: expected feats [N, 2C] of concatenated (mean, std), got {list(feats.shape)}"
        )
    return feats.chunk(2, dim=1)  # type: ignore[return-value]


def sample_latent(volume: SparseTensor, generator: torch.Generator | None = None) -> SparseTensor:
    """A training sample ``mu + sigma * eps`` of a DA-SLAT volume (the paper's stochastic latent).

    Args:
        volume: SparseTensor with feats ``[N, 2C] = cat(mean, std)`` (e.g. from
            [`ProjectedFeatures.to_sparse_tensor`][sparse3d.geometry.project.ProjectedFeatures.to_sparse_tensor]).
        generator: Optional ``torch.Generator`` on the volume's device.

    Returns:
        SparseTensor with the same layout and feats ``[N, C]``.
    """
    mean, std = split_mean_std(volume)
    return volume.replace(reparameterize(mean, std, generator))
