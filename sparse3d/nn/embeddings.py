"""Embedding modules: sinusoidal timestep embedding, axial RoPE and MARoPE (image patches on a plane
outside the voxel volume)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparse3d.functional.rope import _check_axes_dims, marope_image_ids, rope_frequencies

__all__ = ["MARoPE", "RotaryEmbedding", "TimestepEmbedding", "timestep_features"]

RopeTables = tuple[torch.Tensor, torch.Tensor]


def timestep_features(
    timesteps: torch.Tensor,
    num_features: int = 256,
    *,
    max_period: float = 10000.0,
    time_scale: float = 1000.0,
) -> torch.Tensor:
    """Sinusoidal features of (fractional) timesteps, FLUX / diffusers convention.

    ``angles[b, k] = timesteps[b] * time_scale * max_period ** (-k / (num_features / 2))`` and the
    features are ``[cos(angles), sin(angles)]`` (cosines first), computed in float32. With the
    defaults this equals diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``
    applied to ``1000 * t``, which FLUX uses for ``t`` in ``[0, 1]``.

    Args:
        timesteps: Times ``[B]`` (``t`` in ``[0, 1]``; 0 is data, 1 is noise).
        num_features: Even number of output features ``F``.
        max_period: Longest period of the ladder.
        time_scale: Factor applied to ``timesteps`` first (1000 maps ``[0, 1]`` to FLUX's range).

    Returns:
        Float32 features ``[B, F]``.

    Raises:
        ValueError: ``timesteps`` is not 1-D or ``num_features`` is not a positive even number.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps: expected shape [B], got {list(timesteps.shape)}")
    if num_features <= 0 or num_features % 2:
        raise ValueError(f"num_features: expected a positive even number, got {num_features}")
    half = num_features // 2
    exponents = (
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = (timesteps.float() * time_scale)[:, None] * torch.exp(exponents)[None, :]  # [B, F/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [B, F]


class TimestepEmbedding(nn.Module):
    """Timestep embedding: sinusoidal features, then Linear - SiLU - Linear (FLUX's time embedder).

    Args:
        dim: Output width ``D``.
        num_features: Number of sinusoidal features ``F``.
        time_scale: See [`timestep_features`][sparse3d.nn.embeddings.timestep_features].
    """

    def __init__(self, dim: int, num_features: int = 256, *, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.time_scale = time_scale
        self.linear_in = nn.Linear(num_features, dim)
        self.activation = nn.SiLU()
        self.linear_out = nn.Linear(dim, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Embeds times.

        Args:
            timesteps: Times ``[B]``.

        Returns:
            Embeddings ``[B, D]`` in the parameters' dtype.
        """
        features = timestep_features(timesteps, self.num_features, time_scale=self.time_scale)  # [B, F]
        hidden = self.linear_in(features.to(self.linear_in.weight.dtype))  # [B, D]
        hidden = self.activation(hidden)
        return self.linear_out(hidden)  # [B, D]


class RotaryEmbedding(nn.Module):
    """Axial RoPE tables for float ids over any number of axes (no parameters).

    Args:
        axes_dims: Channels per axis (positive, even), summing to the attention head dimension.
        theta: Base of the frequency ladder.
    """

    def __init__(self, *, axes_dims: Sequence[int], theta: float = 10000.0) -> None:
        super().__init__()
        self.axes_dims = _check_axes_dims(axes_dims)
        self.theta = float(theta)

    @property
    def head_dim(self) -> int:
        """Head dimension these tables rotate: ``sum(axes_dims)``."""
        return sum(self.axes_dims)

    def forward(self, ids: torch.Tensor) -> RopeTables:
        """Computes ``(cos, sin)`` tables.

        Args:
            ids: Token positions ``[T, n_axes]`` with ``n_axes == len(axes_dims)``.

        Returns:
            ``(cos, sin)``, each float32 ``[T, head_dim]``.
        """
        return rope_frequencies(ids, self.axes_dims, theta=self.theta)

    def extra_repr(self) -> str:
        return f"axes_dims={list(self.axes_dims)}, theta={self.theta}"


class MARoPE(RotaryEmbedding):
    """Modality-aware RoPE (FLUX3D): voxels keep ``(x, y, z)``, image patches sit on a virtual plane.

    Voxel tokens use their grid coordinates as ids. Image patch ``(i, j)`` is placed on the plane
    ``ids[plane_axis] = plane_position`` just outside the volume, its other two coordinates stretched
    onto the voxel grid's extent (see
    [`marope_image_ids`][sparse3d.functional.rope.marope_image_ids]), so RoPE's distance decay biases
    each patch towards the voxels "behind" it without any camera. Defaults (our choice; the paper only
    says the plane lies outside the volume along the third dimension): plane on axis 2 (z) at -1,
    patch grid fitted to the voxel extent.

    Args:
        axes_dims: Channels per axis for ``(x, y, z)``, three positive even numbers summing to the
            head dimension.
        theta: Base of the frequency ladder.
        plane_axis: Axis carrying the plane coordinate (0, 1 or 2).
        plane_position: Plane coordinate, in voxel units (``-1``: one voxel before the first layer;
            ``grid_shape[plane_axis]``: one past the last).
        fit_to_grid: Stretch the patch grid onto the voxel grid (else raw patch indices).

    Examples:
        >>> rope = MARoPE(axes_dims=(4, 6, 6))
        >>> coords = torch.tensor([[0, 0, 0, 0], [0, 3, 1, 2]])
        >>> (image_cos, image_sin), (voxel_cos, voxel_sin) = rope(
        ...     coords, image_shape=(2, 2), grid_shape=(4, 4, 4), batch_size=1)
        >>> image_cos.shape, voxel_cos.shape
        (torch.Size([4, 16]), torch.Size([2, 16]))
    """

    def __init__(
        self,
        *,
        axes_dims: Sequence[int],
        theta: float = 10000.0,
        plane_axis: int = 2,
        plane_position: float = -1.0,
        fit_to_grid: bool = True,
    ) -> None:
        super().__init__(axes_dims=axes_dims, theta=theta)
        if len(self.axes_dims) != 3:
            raise ValueError(f"axes_dims: expected 3 widths for (x, y, z), got {list(axes_dims)}")
        if plane_axis not in (0, 1, 2):
            raise ValueError(f"plane_axis: expected 0, 1 or 2, got {plane_axis}")
        self.plane_axis = plane_axis
        self.plane_position = float(plane_position)
        self.fit_to_grid = fit_to_grid

    def voxel_ids(self, coords: torch.Tensor) -> torch.Tensor:
        """Ids of voxel tokens: their ``(x, y, z)``.

        Args:
            coords: Integer coordinates ``[N, 4]`` of (batch, x, y, z) or ``[N, 3]`` of (x, y, z).

        Returns:
            Float32 ids ``[N, 3]``.
        """
        if coords.dim() != 2 or coords.shape[1] not in (3, 4):
            raise ValueError(
                f"coords: expected shape [N, 4] (b, x, y, z) or [N, 3], got {list(coords.shape)}"
            )
        return coords[:, -3:].float()

    def image_ids(
        self,
        image_shape: Sequence[int],
        grid_shape: Sequence[int],
        *,
        batch_size: int = 1,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ids of the image patch tokens of ``batch_size`` samples, each one ``h x w`` image.

        Args:
            image_shape: Patch grid ``(h, w)``, tokens in row-major order.
            grid_shape: Voxel grid extent ``(X, Y, Z)`` in voxel-id units.
            batch_size: Number of samples ``B`` (packed sample-major).
            device: Device of the result.

        Returns:
            Float32 ids ``[B * h * w, 3]``.
        """
        one = marope_image_ids(
            image_shape,
            grid_shape,
            plane_axis=self.plane_axis,
            plane_position=self.plane_position,
            fit_to_grid=self.fit_to_grid,
            device=device,
        )  # [h*w, 3]
        return one.repeat(batch_size, 1)  # [B*h*w, 3]

    def forward(  # type: ignore[override]
        self,
        voxel_coords: torch.Tensor,
        *,
        image_shape: Sequence[int],
        grid_shape: Sequence[int],
        batch_size: int,
    ) -> tuple[RopeTables, RopeTables]:
        """RoPE tables for a packed batch of (image tokens, voxel tokens).

        Args:
            voxel_coords: Voxel coordinates ``[N, 4]`` (b, x, y, z) in token order.
            image_shape: Patch grid ``(h, w)`` of every sample's image.
            grid_shape: Voxel grid extent ``(X, Y, Z)``.
            batch_size: Number of samples ``B``.

        Returns:
            ``((image_cos, image_sin), (voxel_cos, voxel_sin))``: float32 ``[B * h * w, head_dim]`` and
            ``[N, head_dim]``.
        """
        image = self.image_ids(image_shape, grid_shape, batch_size=batch_size, device=voxel_coords.device)
        image_rope = rope_frequencies(image, self.axes_dims, theta=self.theta)
        voxel_rope = rope_frequencies(self.voxel_ids(voxel_coords), self.axes_dims, theta=self.theta)
        return image_rope, voxel_rope

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, plane_axis={self.plane_axis}, plane_position={self.plane_position}, "
            f"fit_to_grid={self.fit_to_grid}"
        )
