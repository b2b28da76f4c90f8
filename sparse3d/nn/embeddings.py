"""Embedding modules: sinusoidal timestep embedding, axial RoPE and MARoPE (image patches on a plane
outside the voxel volume)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparse3d.functional.norm import _compute_dtype
from sparse3d.functional.rope import _check_axes_dims, marope_image_ids, rope_frequencies
from sparse3d.nn.tokens import RopeTables

__all__ = [
    "ImageShapes",
    "MARoPE",
    "RotaryEmbedding",
    "TimestepEmbedding",
    "timestep_features",
]


def timestep_features(
    timesteps: torch.Tensor,
    num_features: int = 256,
    *,
    max_period: float = 10000.0,
    time_scale: float = 1000.0,
) -> torch.Tensor:
    """Sinusoidal features of (fractional) timesteps, FLUX / diffusers convention.

    ``angles[b, k] = timesteps[b] * time_scale * max_period ** (-k / (num_features / 2))`` and the
    features are ``[cos(angles), sin(angles)]`` (cosines first), computed in float32 (float64 for float64
    timesteps). With the
    defaults this equals diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``
    applied to ``1000 * t``, which FLUX uses for ``t`` in ``[0, 1]``.

    Args:
        timesteps: Times ``[B]`` (``t`` in ``[0, 1]``; 0 is data, 1 is noise).
        num_features: Even number of output features ``F``.
        max_period: Longest period of the ladder.
        time_scale: Factor applied to ``timesteps`` first (1000 maps ``[0, 1]`` to FLUX's range).

    Returns:
        Features ``[B, F]``, float32 (float64 for float64 timesteps).

    Raises:
        ValueError: ``timesteps`` is not 1-D or ``num_features`` is not a positive even number.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps: expected shape [B], got {list(timesteps.shape)}")
    if num_features <= 0 or num_features % 2:
        raise ValueError(f"num_features: expected a positive even number, got {num_features}")
    half = num_features // 2
    compute = _compute_dtype(timesteps.dtype)
    exponents = -math.log(max_period) * torch.arange(half, dtype=compute, device=timesteps.device) / half
    angles = (timesteps.to(compute) * time_scale)[:, None] * torch.exp(exponents)[None, :]  # [B, F/2]
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


ImageShapes = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
"""One patch grid ``(h, w)`` for all samples, or one per sample (``B`` pairs or an int tensor ``[B, 2]``)."""


def _image_shapes(
    image_shape: ImageShapes, batch_size: int | None = None, *, default_batch_size: int | None = None
) -> list[tuple[int, int]]:
    """One ``(h, w)`` per sample, from one shared shape or from per-sample shapes.

    Args:
        image_shape: ``(h, w)`` shared by all samples, ``B`` pairs ``(h_b, w_b)``, or an integer tensor
            ``[2]`` or ``[B, 2]`` (read on the host).
        batch_size: ``B``: required with a shared shape (unless ``default_batch_size``); with per-sample
            shapes ``None`` or their count.
        default_batch_size: ``B`` for a shared shape when ``batch_size`` is ``None``.

    Returns:
        ``B`` pairs of non-negative ints.

    Raises:
        TypeError: ``image_shape`` is a floating, complex or bool tensor.
        ValueError: ``image_shape`` is neither one pair nor ``B`` pairs of non-negative ints, or
            ``batch_size`` is missing or disagrees.

    Examples:
        >>> _image_shapes((2, 3), batch_size=2)
        [(2, 3), (2, 3)]
        >>> _image_shapes(torch.tensor([[2, 3], [4, 1]]))
        [(2, 3), (4, 1)]
    """
    expected = "(h, w), a sequence of B pairs (h_b, w_b) or an integer tensor [B, 2]"
    if isinstance(image_shape, torch.Tensor):
        if (
            image_shape.dtype.is_floating_point
            or image_shape.dtype.is_complex
            or image_shape.dtype == torch.bool
        ):
            raise TypeError(f"image_shape: expected an integer tensor, got {image_shape.dtype}")
        if image_shape.shape == (2,):
            shared, values = True, [tuple(image_shape.tolist())]
        elif image_shape.dim() == 2 and image_shape.shape[1] == 2:
            shared, values = False, [tuple(pair) for pair in image_shape.tolist()]
        else:
            raise ValueError(
                f"image_shape: expected {expected}, got a tensor of shape {list(image_shape.shape)}"
            )
    else:
        items = list(image_shape)
        nested = [
            (isinstance(item, Sequence) and not isinstance(item, str))
            or (isinstance(item, torch.Tensor) and item.dim() > 0)
            for item in items
        ]
        if len(items) == 2 and not any(nested):
            shared, values = True, [tuple(items)]
        elif items and all(nested) and all(len(item) == 2 for item in items):
            shared, values = False, [tuple(item) for item in items]
        else:
            raise ValueError(f"image_shape: expected {expected}, got {image_shape!r}")
    pairs = []
    for pair in values:
        try:
            height, width = (int(n) for n in pair)
        except (TypeError, ValueError):
            raise ValueError(f"image_shape: expected integer sizes, got {pair!r}") from None
        if height < 0 or width < 0 or (height, width) != tuple(pair):
            raise ValueError(f"image_shape: expected non-negative integer sizes (h, w), got {pair!r}")
        pairs.append((height, width))
    if shared:
        batch_size = default_batch_size if batch_size is None else batch_size
        if batch_size is None:
            raise ValueError("batch_size: expected an int >= 1 with one shared image_shape (h, w), got None")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        return pairs * batch_size
    if batch_size is not None and batch_size != len(pairs):
        raise ValueError(
            f"batch_size: expected the number of per-sample image shapes, {len(pairs)}, got {batch_size}"
        )
    return pairs


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

    def forward(self, ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> RopeTables:
        """Computes ``(cos, sin)`` tables.

        Args:
            ids: Token positions ``[T, n_axes]`` with ``n_axes == len(axes_dims)``.
            dtype: Dtype of the tables (float32, or float64 for a float64 model).

        Returns:
            ``(cos, sin)``, each ``[T, head_dim]`` of ``dtype``.
        """
        return rope_frequencies(ids, self.axes_dims, theta=self.theta, dtype=dtype)

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
        image_shape: ImageShapes,
        grid_shape: Sequence[int],
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ids of the image patch tokens of a batch: one ``h x w`` shape for all, or one per sample.

        Args:
            image_shape: Patch grid ``(h, w)`` of every sample's image, or one per sample: a sequence of
                ``B`` pairs ``(h_b, w_b)`` or an integer tensor ``[B, 2]`` (read on the host). Tokens are
                row-major within each image, images in sample order.
            grid_shape: Voxel grid extent ``(X, Y, Z)`` in voxel-id units.
            batch_size: Number of samples ``B``: with one shared ``(h, w)`` 1 unless given; with per-sample
                shapes ``None`` or their count.
            device: Device of the result.

        Returns:
            Float32 ids ``[sum_b h_b * w_b, 3]`` (``[B * h * w, 3]`` for one shared shape).

        Raises:
            TypeError: ``image_shape`` is a floating or bool tensor.
            ValueError: ``image_shape`` is neither one pair nor ``B`` pairs, or ``batch_size`` disagrees.
        """
        per_sample = _image_shapes(image_shape, batch_size, default_batch_size=1)
        tables: dict[tuple[int, int], torch.Tensor] = {}
        for shape in per_sample:
            if shape not in tables:
                tables[shape] = marope_image_ids(
                    shape,
                    grid_shape,
                    plane_axis=self.plane_axis,
                    plane_position=self.plane_position,
                    fit_to_grid=self.fit_to_grid,
                    device=device,
                )  # [h*w, 3]
        if len(tables) == 1:  # one shape for all samples (the common case): a single repeat
            (one,) = tables.values()
            return one.repeat(len(per_sample), 1)  # [B*h*w, 3]
        return torch.cat([tables[shape] for shape in per_sample])  # [sum_b h_b*w_b, 3]

    def forward(  # type: ignore[override]
        self,
        voxel_coords: torch.Tensor,
        *,
        image_shape: ImageShapes,
        grid_shape: Sequence[int],
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[RopeTables, RopeTables]:
        """RoPE tables for a packed batch of (image tokens, voxel tokens).

        Args:
            voxel_coords: Voxel coordinates ``[N, 4]`` (b, x, y, z) in token order.
            image_shape: Patch grid ``(h, w)`` of every sample's image, or one per sample (ragged
                condition images): a sequence of ``B`` pairs ``(h_b, w_b)`` or an integer tensor ``[B, 2]``
                (read on the host: one sync if it lives on a GPU).
            grid_shape: Voxel grid extent ``(X, Y, Z)``.
            batch_size: Number of samples ``B``: required with one shared ``(h, w)``; with per-sample shapes
                optional (checked against their count).
            dtype: Dtype of the tables (float32, or float64 for a float64 model).

        Returns:
            ``((image_cos, image_sin), (voxel_cos, voxel_sin))``: ``[sum_b h_b * w_b, head_dim]`` (image
            tokens of sample 0, then sample 1, ...) and ``[N, head_dim]``, of ``dtype``.

        Raises:
            TypeError: ``image_shape`` is a floating or bool tensor.
            ValueError: ``image_shape`` is neither one pair nor ``B`` pairs, or ``batch_size`` disagrees.
        """
        per_sample = _image_shapes(image_shape, batch_size)  # B pairs (h_b, w_b)
        image = self.image_ids(per_sample, grid_shape, device=voxel_coords.device)
        image_rope = rope_frequencies(image, self.axes_dims, theta=self.theta, dtype=dtype)
        voxel_rope = rope_frequencies(
            self.voxel_ids(voxel_coords), self.axes_dims, theta=self.theta, dtype=dtype
        )
        return image_rope, voxel_rope

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, plane_axis={self.plane_axis}, plane_position={self.plane_position}, "
            f"fit_to_grid={self.fit_to_grid}"
        )
