"""Rotary position embeddings (RoPE) over any number of axes, with float ids, and id builders.

RoPE here follows FLUX: interleaved pairs ``(x[2k], x[2k+1])``, one frequency band per axis, the axes'
widths summing to the head dimension. The id builders place tokens of different modalities in one frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparse3d.functional.norm import _compute_dtype

__all__ = [
    "apply_rope",
    "check_rope_tables",
    "diagonal_ids",
    "grid_ids",
    "index_axis_ids",
    "marope_image_ids",
    "rope_frequencies",
    "shifted_ids",
    "sincos_embedding",
]


def _check_axes_dims(axes_dims: Sequence[int], head_dim: int | None = None) -> tuple[int, ...]:
    """Validates RoPE axis widths: positive even integers, summing to ``head_dim`` when given."""
    dims = tuple(int(d) for d in axes_dims)
    if len(dims) == 0 or any(d <= 0 or d % 2 for d in dims):
        raise ValueError(f"axes_dims: expected one or more positive even integers, got {list(axes_dims)}")
    if head_dim is not None and sum(dims) != head_dim:
        raise ValueError(
            f"axes_dims: expected widths summing to the head dimension {head_dim}, "
            f"got {list(dims)} (sum {sum(dims)})"
        )
    return dims


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (angles of large positions stay exact), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_ids(
    ids: torch.Tensor, num_axes: int | None, name: str = "ids", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Validates an id table ``[T, n_axes]`` and returns it as ``dtype`` (float32 by default)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [T, n_axes], got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.dtype.is_complex:
        raise TypeError(f"{name}: expected a real (float or integer) dtype, got {ids.dtype}")
    if ids.dim() != 2 or (num_axes is not None and ids.shape[1] != num_axes):
        expected = f"[T, {num_axes}]" if num_axes is not None else "[T, n_axes]"
        raise ValueError(f"{name}: expected shape {expected}, got {list(ids.shape)}")
    return ids.to(dtype)


def rope_frequencies(
    ids: torch.Tensor,
    axes_dims: Sequence[int],
    *,
    theta: float = 10000.0,
    head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of axial RoPE for float token ids.

    Axis ``i`` owns ``axes_dims[i]`` consecutive channels; within them, pair ``k`` rotates by the angle
    ``ids[:, i] * theta ** (-2k / axes_dims[i])``. Each angle is repeated for the two channels of its
    pair (interleaved layout), exactly as FLUX / diffusers' ``FluxPosEmbed``: ids are rounded to
    float32, the angles and their cosines are evaluated in float64 (float32 on devices without float64,
    such as MPS) and the tables are returned in float32. With ``dtype=torch.float64`` the ids keep
    float64 and the tables are returned unrounded, for float64 models.

    Args:
        ids: Token positions ``[T, n_axes]``, any real dtype (converted to float32, or to float64 when
            ``dtype`` is float64). Negative and fractional positions are allowed.
        axes_dims: Channels per axis, ``n_axes`` positive even integers.
        theta: Base of the geometric frequency ladder.
        head_dim: If given, ``sum(axes_dims)`` must equal it.
        dtype: Floating dtype of the tables (float32 by default, FLUX's).

    Returns:
        ``(cos, sin)``, each ``[T, sum(axes_dims)]`` of ``dtype`` on the device of ``ids``.

    Raises:
        ValueError: ``axes_dims`` are not positive even integers, do not sum to ``head_dim``, or
            their count differs from ``ids.shape[1]``.
        TypeError: ``dtype`` is not a floating dtype.
    """
    dims = _check_axes_dims(axes_dims, head_dim)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype}")
    positions = _check_ids(ids, len(dims), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if not theta > 0:
        raise ValueError(f"theta: expected a positive number, got {theta}")
    wide = _wide_dtype(positions.device)
    cos_parts, sin_parts = [], []
    for axis, width in enumerate(dims):
        exponents = torch.arange(0, width, 2, dtype=wide, device=positions.device) / width  # [width/2]
        frequencies = 1.0 / (theta**exponents)  # [width/2]
        angles = positions[:, axis].to(wide)[:, None] * frequencies[None, :]  # [T, width/2]
        cos_parts.append(angles.cos().to(dtype).repeat_interleave(2, dim=1))  # [T, width]
        sin_parts.append(angles.sin().to(dtype).repeat_interleave(2, dim=1))  # [T, width]
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def check_rope_tables(
    rope: tuple[torch.Tensor, torch.Tensor], num_tokens: int, head_dim: int, name: str = "rope"
) -> None:
    """Checks that ``rope = (cos, sin)`` are tables ``[num_tokens, head_dim]``.

    Args:
        rope: ``(cos, sin)`` as returned by [`rope_frequencies`][sparse3d.functional.rope.rope_frequencies].
        num_tokens: Expected number of rows ``T`` (one per token, in token order).
        head_dim: Expected width ``D``.
        name: Argument name used in the error message.

    Raises:
        ValueError: The tables are not a pair of ``[num_tokens, head_dim]`` tensors.
    """
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        raise ValueError(f"{name}: expected a pair (cos, sin) of tensors [T, D], got {type(rope).__name__}")
    for part, table in zip(("cos", "sin"), rope, strict=True):
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (num_tokens, head_dim):
            shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(
                f"{name}: expected {part} of shape [{num_tokens}, {head_dim}] (one row per token, "
                f"width = head dim), got {shape}"
            )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved channel pairs of ``x`` by the angles in ``(cos, sin)``.

    For each pair ``(a, b) = (x[..., 2k], x[..., 2k+1])`` the output is
    ``(a cos - b sin, a sin + b cos)``. Computed in the wider of ``x``'s dtype and float32 (float32 for
    bf16/fp16, float64 for float64); the result has the dtype of ``x``.

    Args:
        x: Queries or keys ``[T, H, D]``.
        cos: Cosine table ``[T, D]`` from [`rope_frequencies`][sparse3d.functional.rope.rope_frequencies]
            (any floating dtype; cast to the compute dtype).
        sin: Sine table ``[T, D]``.

    Returns:
        Rotated tensor ``[T, H, D]``, dtype of ``x``.

    Raises:
        ValueError: ``x`` is not ``[T, H, D]`` with even ``D``, or the tables are not ``[T, D]``.
    """
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape [T, H, D] with even D, got {list(x.shape)}")
    check_rope_tables((cos, sin), x.shape[0], x.shape[-1], name="(cos, sin)")
    compute = _compute_dtype(x.dtype)
    wide = x.to(compute)
    pairs = wide.unflatten(-1, (-1, 2))  # [T, H, D/2, 2]
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # [T, H, D]
    out = wide * cos.to(compute)[:, None, :] + rotated * sin.to(compute)[:, None, :]  # [T, H, D]
    return out.to(x.dtype)


def grid_ids(
    shape: Sequence[int], *, center: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """Float ids of every cell of a dense grid, in row-major order (``meshgrid(..., indexing="ij")``).

    Args:
        shape: Grid extent per axis, e.g. ``(h, w)`` for an image or ``(X, Y, Z)`` for a voxel grid.
        center: Centre each axis as Qwen-Image's ``scale_rope`` does: ``-(n - n//2) ... n//2 - 1``
            instead of ``0 ... n - 1``.
        device: Device of the result.

    Returns:
        Float32 ids ``[prod(shape), len(shape)]``.
    """
    sizes = [int(n) for n in shape]
    if len(sizes) == 0 or any(n < 0 for n in sizes):
        raise ValueError(f"shape: expected one or more non-negative sizes, got {list(shape)}")
    axes = []
    for n in sizes:
        axis = torch.arange(n, dtype=torch.float32, device=device)
        axes.append(axis - (n - n // 2) if center else axis)
    mesh = torch.meshgrid(*axes, indexing="ij")  # len(shape) x [*shape]
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)  # [prod(shape), len(shape)]


def marope_image_ids(
    image_shape: Sequence[int],
    grid_shape: Sequence[int],
    *,
    plane_axis: int = 2,
    plane_position: float = -1.0,
    fit_to_grid: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MARoPE ids of an image's patches: a virtual plane just outside the voxel volume.

    Patch ``(i, j)`` (row, column) of an ``h x w`` patch grid lands at coordinate ``plane_position`` on
    ``plane_axis``; ``i`` and ``j`` go to the two other axes, in increasing axis order (the default
    ``plane_axis=2`` maps ``i -> x``, ``j -> y`` and puts the plane at ``z = -1``, one voxel before the
    first layer). With ``fit_to_grid`` the patch grid is stretched onto the voxel grid's extent so that
    patch centres cover voxel centres: ``x = (i + 0.5) * X / h - 0.5`` (identity when ``h == X``);
    without it, ``x = i``. The paper places image patches on a plane "outside the voxel volume" along
    the third dimension and leaves the rest open; the scaling and the default offset are our choice.

    Args:
        image_shape: Patch grid ``(h, w)``; tokens are expected in row-major order.
        grid_shape: Voxel grid extent ``(X, Y, Z)`` in the same units as the voxel ids.
        plane_axis: The axis (0, 1 or 2) that carries the plane coordinate.
        plane_position: The plane's coordinate on ``plane_axis`` (e.g. ``-1`` or ``grid_shape[axis]``).
        fit_to_grid: Stretch the patch grid onto the voxel extent (else use raw patch indices).
        device: Device of the result.

    Returns:
        Float32 ids ``[h * w, 3]``.

    Raises:
        ValueError: Bad shapes or ``plane_axis``.
    """
    if len(image_shape) != 2 or any(int(n) < 0 for n in image_shape):
        raise ValueError(f"image_shape: expected (h, w) with non-negative sizes, got {list(image_shape)}")
    if len(grid_shape) != 3 or any(int(n) <= 0 for n in grid_shape):
        raise ValueError(f"grid_shape: expected (X, Y, Z) with positive sizes, got {list(grid_shape)}")
    if plane_axis not in (0, 1, 2):
        raise ValueError(f"plane_axis: expected 0, 1 or 2, got {plane_axis}")
    height, width = int(image_shape[0]), int(image_shape[1])
    in_plane = [axis for axis in range(3) if axis != plane_axis]
    patch = grid_ids((height, width), device=device)  # [h*w, 2] (i, j)
    if fit_to_grid:
        extent = torch.tensor(
            [float(grid_shape[in_plane[0]]), float(grid_shape[in_plane[1]])], device=patch.device
        )
        counts = torch.tensor([float(max(height, 1)), float(max(width, 1))], device=patch.device)
        patch = (patch + 0.5) * (extent / counts) - 0.5  # [h*w, 2]
    ids = torch.full((patch.shape[0], 3), float(plane_position), dtype=torch.float32, device=patch.device)
    ids[:, in_plane] = patch  # [h*w, 3]
    return ids


def index_axis_ids(ids: torch.Tensor, index: float) -> torch.Tensor:
    """Prepends an index axis filled with ``index`` (FLUX Kontext: 0 for the target, 1 for a condition).

    Args:
        ids: Ids ``[T, n_axes]``.
        index: Value of the new leading axis for every token.

    Returns:
        Float32 ids ``[T, n_axes + 1]``.
    """
    positions = _check_ids(ids, None)
    column = positions.new_full((positions.shape[0], 1), float(index))  # [T, 1]
    return torch.cat([column, positions], dim=1)


def shifted_ids(
    ids: torch.Tensor, shift: Sequence[float] | torch.Tensor, *, scale: float = 1.0
) -> torch.Tensor:
    """Scales and shifts ids (OminiControl): ``ids * scale + (scale - 1) / 2 + shift``.

    ``scale`` stretches a small condition grid over a larger one, keeping cell centres aligned;
    ``shift`` moves it (e.g. beside the target for subject-driven tasks).

    Args:
        ids: Ids ``[T, n_axes]``.
        shift: Offset per axis, ``n_axes`` values.
        scale: Stretch factor applied to every axis.

    Returns:
        Float32 ids ``[T, n_axes]``.
    """
    positions = _check_ids(ids, None)
    offset = torch.as_tensor(shift, dtype=torch.float32, device=positions.device).reshape(-1)  # [n_axes]
    if offset.numel() != positions.shape[1]:
        raise ValueError(f"shift: expected {positions.shape[1]} values (one per axis), got {offset.numel()}")
    return positions * float(scale) + (float(scale) - 1.0) / 2.0 + offset[None, :]


def diagonal_ids(
    num_tokens: int, *, start: float, num_axes: int = 3, device: torch.device | str | None = None
) -> torch.Tensor:
    """Ids on the grid's diagonal (Qwen-Image MSRoPE): token ``k`` at ``(start + k) * (1, ..., 1)``.

    Qwen-Image places text token ``k`` at ``m + k`` on every axis, ``m`` past the image's extent, so
    conditioning tokens never collide with grid positions.

    Args:
        num_tokens: Number of tokens ``T``.
        start: Position of the first token on every axis.
        num_axes: Number of axes.
        device: Device of the result.

    Returns:
        Float32 ids ``[T, num_axes]``.
    """
    if num_tokens < 0 or num_axes < 1:
        raise ValueError(f"num_tokens, num_axes: expected >= 0 and >= 1, got {num_tokens} and {num_axes}")
    line = torch.arange(num_tokens, dtype=torch.float32, device=device) + float(start)  # [T]
    return line[:, None].expand(num_tokens, num_axes).contiguous()  # [T, num_axes]


def sincos_embedding(ids: torch.Tensor, axes_dims: Sequence[int], *, theta: float = 10000.0) -> torch.Tensor:
    """Absolute sin-cos position features (additive, not rotary), one band per axis.

    Axis ``i`` gives ``axes_dims[i]`` features ``[sin(p f_0), ..., sin(p f_{d/2-1}), cos(p f_0), ...]``
    with ``p = ids[:, i]`` and the RoPE frequencies ``f_k = theta ** (-2k / d)``. This is the usual
    DiT/MAE embedding generalised to any number of axes; it is the baseline to compare RoPE against.

    Args:
        ids: Token positions ``[T, n_axes]``.
        axes_dims: Features per axis (positive, even).
        theta: Base of the frequency ladder.

    Returns:
        Float32 features ``[T, sum(axes_dims)]``.
    """
    dims = _check_axes_dims(axes_dims)
    positions = _check_ids(ids, len(dims))
    wide = _wide_dtype(positions.device)
    parts = []
    for axis, width in enumerate(dims):
        exponents = torch.arange(0, width, 2, dtype=wide, device=positions.device) / width  # [width/2]
        angles = positions[:, axis].to(wide)[:, None] / (theta**exponents)[None, :]  # [T, width/2]
        parts.append(torch.cat([angles.sin(), angles.cos()], dim=1).float())  # [T, width]
    return torch.cat(parts, dim=1)
