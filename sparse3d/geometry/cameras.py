"""Cameras: Hammersley-sphere and orbit sampling, look-at, FoV <-> intrinsics, TRELLIS ``transforms.json``.

Convention (gsplat's): OpenCV camera axes (x right, y down, z forward), world-to-camera 4x4 ``viewmats``
and pixel intrinsics ``Ks``. The world is the TRELLIS/Blender frame (Z up), objects in [-0.5, 0.5]^3.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CameraFrames",
    "hammersley_sequence",
    "sphere_hammersley",
    "orbit_angles",
    "spherical_to_cartesian",
    "look_at",
    "sphere_cameras",
    "focal_from_fov",
    "fov_from_focal",
    "intrinsics_from_fov",
    "fov_from_intrinsics",
    "scale_intrinsics",
    "from_blender_c2w",
    "to_blender_c2w",
    "read_transforms",
    "write_transforms",
]


def _radical_inverse_base2(index: torch.Tensor) -> torch.Tensor:
    """Van der Corput radical inverse in base 2 of non-negative int64 indices, as float64 in [0, 1)."""
    result = torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    remaining = index.clone()
    scale = 0.5
    while bool((remaining > 0).any()):
        result += (remaining & 1).double() * scale
        remaining = remaining >> 1
        scale *= 0.5
    return result


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    out = tuple(float(v) for v in value)
    if len(out) != 2:
        raise ValueError(f"{name}: expected 2 numbers, got {value!r}")
    return out  # type: ignore[return-value]


def hammersley_sequence(
    num_points: int,
    offset: Sequence[float] = (0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The 2D Hammersley point set ``(u_i, v_i) = ((i + o_u) / n, radical_inverse_2(i) + o_v mod 1)``.

    Args:
        num_points: Number of points ``n >= 1``.
        offset: ``(o_u, o_v)`` with ``0 <= o_u < 1`` (a shift of ``u`` by a fraction of one step) and any
            ``o_v`` (wrapped). TRELLIS draws a random offset per asset so views differ between assets.
        device: Device of the result.

    Returns:
        float64 tensor ``[n, 2]`` of ``(u, v)`` in ``[0, 1)^2``.
    """
    if num_points < 1:
        raise ValueError(f"num_points: expected >= 1, got {num_points}")
    offset_u, offset_v = _pair(offset, "offset")
    if not 0.0 <= offset_u < 1.0:
        raise ValueError(f"offset: expected offset[0] in [0, 1), got {offset_u}")
    index = torch.arange(num_points, device=device, dtype=torch.int64)
    u = (index.double() + offset_u) / num_points
    v = torch.remainder(_radical_inverse_base2(index) + offset_v, 1.0)
    return torch.stack([u, v], dim=1)


def sphere_hammersley(
    num_points: int,
    offset: Sequence[float] = (0.0, 0.0),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-area Hammersley directions on the unit sphere, as (yaw, pitch) angles.

    ``u`` is mapped to ``sin(pitch) = 2u - 1`` (equal-area in height), ``v`` to ``yaw = 2 pi v``, as in
    TRELLIS's renderer. Turn the angles into camera positions with
    [`spherical_to_cartesian`][sparse3d.geometry.cameras.spherical_to_cartesian].

    Args:
        num_points: Number of directions ``n``.
        offset: Hammersley offset, see [`hammersley_sequence`][sparse3d.geometry.cameras.hammersley_sequence].
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``(yaw [n], pitch [n])`` in radians, yaw in ``[0, 2 pi)``, pitch in ``[-pi/2, pi/2)``.
    """
    uv = hammersley_sequence(num_points, offset, device=device)
    pitch = torch.asin((2.0 * uv[:, 0] - 1.0).clamp(-1.0, 1.0))
    yaw = 2.0 * math.pi * uv[:, 1]
    return yaw.to(dtype), pitch.to(dtype)


def orbit_angles(
    num_views: int,
    pitch: float = math.radians(30.0),
    start_yaw: float = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced yaw angles on one orbit at a fixed pitch (e.g. 4 views at 0/90/180/270 degrees).

    Args:
        num_views: Number of views ``n >= 1``.
        pitch: Elevation above the XY plane, radians.
        start_yaw: Yaw of the first view, radians.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``(yaw [n], pitch [n])`` in radians, ``yaw_i = start_yaw + 2 pi i / n``.
    """
    if num_views < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    index = torch.arange(num_views, dtype=torch.float64, device=device)
    yaw = start_yaw + 2.0 * math.pi * index / num_views
    return yaw.to(dtype), torch.full_like(yaw, pitch).to(dtype)


def spherical_to_cartesian(
    yaw: torch.Tensor, pitch: torch.Tensor, radius: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Points ``radius * (cos yaw cos pitch, sin yaw cos pitch, sin pitch)`` (Z up).

    Args:
        yaw: Tensor ``[n]`` of azimuths (radians, from +X towards +Y).
        pitch: Tensor ``[n]`` of elevations (radians, positive towards +Z).
        radius: Distance from the origin, a number or a tensor ``[n]``.

    Returns:
        Tensor ``[n, 3]``.
    """
    if yaw.shape != pitch.shape:
        raise ValueError(
            f"yaw and pitch: expected equal shapes, got {list(yaw.shape)} and {list(pitch.shape)}"
        )
    direction = torch.stack(
        [torch.cos(yaw) * torch.cos(pitch), torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch)], dim=-1
    )
    radius = torch.as_tensor(radius, dtype=direction.dtype, device=direction.device)
    return direction * (radius[..., None] if radius.dim() else radius)


def look_at(
    eye: torch.Tensor,
    target: torch.Tensor | Sequence[float] = (0.0, 0.0, 0.0),
    up: torch.Tensor | Sequence[float] = (0.0, 0.0, 1.0),
) -> torch.Tensor:
    """OpenCV world-to-camera matrices of cameras at ``eye`` looking at ``target``.

    Camera axes in world coordinates: ``forward = normalize(target - eye)`` (camera +z),
    ``right = normalize(forward x up)`` (camera +x), ``down = forward x right`` (camera +y), so ``up``
    appears upwards in the image. This is the camera Blender's TRACK_TO constraint (track -Z, up Y)
    builds, expressed in OpenCV axes. Where ``forward`` is parallel to ``up`` (a camera straight above
    or below the target) the world axis least aligned with ``forward`` replaces ``up``.

    Args:
        eye: Tensor ``[C, 3]`` (or ``[3]``) of camera centres in world coordinates.
        target: Point looked at, ``[3]`` or ``[C, 3]``.
        up: World up direction, ``[3]`` or ``[C, 3]``.

    Returns:
        Tensor ``[C, 4, 4]`` (``[4, 4]`` for a ``[3]`` eye): ``x_cam = R x_world + t`` with rows of
        ``R`` = (right, down, forward) and ``t = -R eye``.
    """
    single = eye.dim() == 1
    eye = eye.reshape(-1, 3)  # [C, 3]
    if not eye.dtype.is_floating_point:
        raise TypeError(f"eye: expected a floating tensor, got {eye.dtype}")
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device).expand_as(eye)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = target - eye
    length = forward.norm(dim=-1, keepdim=True)
    if bool((length <= 0).any()):
        raise ValueError("eye and target: expected distinct points, got eye == target for some camera")
    forward = forward / length
    right = torch.linalg.cross(forward, up)
    degenerate = right.norm(dim=-1) <= 1e-6 * up.norm(dim=-1)
    if bool(degenerate.any()):
        axes = torch.eye(3, dtype=eye.dtype, device=eye.device)
        fallback = axes[forward.abs().argmin(dim=-1)]  # [C, 3]
        right = torch.where(degenerate[:, None], torch.linalg.cross(forward, fallback), right)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward], dim=1)  # [C, 3, 3], rows = camera axes
    viewmats = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    viewmats[:, :3, :3] = rotation
    viewmats[:, :3, 3] = -(rotation @ eye[:, :, None])[:, :, 0]
    viewmats[:, 3, 3] = 1.0
    return viewmats[0] if single else viewmats


def focal_from_fov(fov: float | torch.Tensor, size: float) -> float | torch.Tensor:
    """Focal length in pixels of a field of view spanning ``size`` pixels: ``size / 2 / tan(fov / 2)``."""
    if isinstance(fov, torch.Tensor):
        return size / 2.0 / torch.tan(fov / 2.0)
    return size / 2.0 / math.tan(fov / 2.0)


def fov_from_focal(focal: float | torch.Tensor, size: float) -> float | torch.Tensor:
    """Field of view (radians) of a focal length over ``size`` pixels: ``2 atan(size / 2 / focal)``."""
    if isinstance(focal, torch.Tensor):
        return 2.0 * torch.atan(size / 2.0 / focal)
    return 2.0 * math.atan(size / 2.0 / focal)


def intrinsics_from_fov(
    fov_x: float | torch.Tensor,
    width: float,
    height: float,
    *,
    fov_y: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pixel intrinsics of a pinhole camera with the principal point at the image centre.

    Pixel coordinates are continuous with the image spanning ``[0, W] x [0, H]``; pixel ``(r, c)`` has
    its centre at ``(c + 0.5, r + 0.5)``, so the principal point is ``(W / 2, H / 2)``. With
    ``width = height = 1`` this gives TRELLIS's normalised intrinsics (``fx = 0.5 / tan(fov / 2)``,
    ``cx = cy = 0.5``).

    Args:
        fov_x: Horizontal field of view in radians (Blender's ``camera_angle_x``), a number or ``[C]``.
        width: Image width ``W`` in pixels.
        height: Image height ``H`` in pixels.
        fov_y: Vertical field of view; defaults to square pixels (``fy = fx``).
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        Tensor ``[3, 3]`` (or ``[C, 3, 3]`` for a tensor ``fov_x [C]``).
    """
    fov_x_t = torch.as_tensor(fov_x, dtype=torch.float64, device=device)
    if bool(((fov_x_t <= 0) | (fov_x_t >= math.pi)).any()):
        raise ValueError(f"fov_x: expected radians in (0, pi), got {fov_x_t.tolist()}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height: expected positive sizes, got {width} and {height}")
    fx = width / 2.0 / torch.tan(fov_x_t / 2.0)
    if fov_y is None:
        fy = fx
    else:
        fov_y_t = torch.as_tensor(fov_y, dtype=torch.float64, device=device)
        if bool(((fov_y_t <= 0) | (fov_y_t >= math.pi)).any()):
            raise ValueError(f"fov_y: expected radians in (0, pi), got {fov_y_t.tolist()}")
        fy = (height / 2.0 / torch.tan(fov_y_t / 2.0)).expand_as(fx)
    Ks = torch.zeros(*fx.shape, 3, 3, dtype=torch.float64, device=device)
    Ks[..., 0, 0] = fx
    Ks[..., 1, 1] = fy
    Ks[..., 0, 2] = width / 2.0
    Ks[..., 1, 2] = height / 2.0
    Ks[..., 2, 2] = 1.0
    return Ks.to(dtype)


def fov_from_intrinsics(Ks: torch.Tensor, width: float, height: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical fields of view of pixel intrinsics.

    Args:
        Ks: Tensor ``[..., 3, 3]``.
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        ``(fov_x [...], fov_y [...])`` in radians (``2 atan(W / 2 / fx)``, ``2 atan(H / 2 / fy)``).
    """
    if Ks.shape[-2:] != (3, 3):
        raise ValueError(f"Ks: expected shape [..., 3, 3], got {list(Ks.shape)}")
    return 2.0 * torch.atan(width / 2.0 / Ks[..., 0, 0]), 2.0 * torch.atan(height / 2.0 / Ks[..., 1, 1])


def scale_intrinsics(Ks: torch.Tensor, scale_x: float, scale_y: float | None = None) -> torch.Tensor:
    """Intrinsics of the same camera for an image resized by ``(scale_x, scale_y)``.

    With the ``[0, W]`` continuous pixel convention a resize scales ``fx, cx`` by ``scale_x`` and
    ``fy, cy`` by ``scale_y`` (no half-pixel shift). E.g. normalised TRELLIS intrinsics times 512 give
    the intrinsics of the 512 px render.

    Args:
        Ks: Tensor ``[..., 3, 3]``.
        scale_x: New width / old width.
        scale_y: New height / old height; defaults to ``scale_x``.

    Returns:
        Tensor ``[..., 3, 3]``.
    """
    if Ks.shape[-2:] != (3, 3):
        raise ValueError(f"Ks: expected shape [..., 3, 3], got {list(Ks.shape)}")
    scale_y = scale_x if scale_y is None else scale_y
    out = Ks.clone()
    out[..., 0, :] *= scale_x
    out[..., 1, :] *= scale_y
    return out


def _check_matrices(matrices: torch.Tensor, name: str) -> None:
    if matrices.shape[-2:] != (4, 4):
        raise ValueError(f"{name}: expected shape [..., 4, 4], got {list(matrices.shape)}")
    if not matrices.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {matrices.dtype}")


def from_blender_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """Blender/OpenGL camera-to-world matrices (``transforms.json``) to OpenCV world-to-camera ``viewmats``.

    Exactly the conversion TRELLIS's loaders use: negate the camera's y and z axes (columns 1 and 2 of
    the rotation; OpenGL looks down -z with +y up, OpenCV looks down +z with +y down), then invert.
    The inverse is computed in float64.

    Args:
        c2w: Tensor ``[..., 4, 4]`` of camera-to-world matrices (Blender ``matrix_world``).

    Returns:
        Tensor ``[..., 4, 4]`` of world-to-camera matrices, dtype of ``c2w``.
    """
    _check_matrices(c2w, "c2w")
    flipped = c2w.to(torch.float64).clone()
    flipped[..., :3, 1:3] *= -1.0
    return torch.linalg.inv(flipped).to(c2w.dtype)


def to_blender_c2w(viewmats: torch.Tensor) -> torch.Tensor:
    """Inverse of [`from_blender_c2w`][sparse3d.geometry.cameras.from_blender_c2w].

    Args:
        viewmats: Tensor ``[..., 4, 4]`` of OpenCV world-to-camera matrices.

    Returns:
        Tensor ``[..., 4, 4]`` of Blender/OpenGL camera-to-world matrices.
    """
    _check_matrices(viewmats, "viewmats")
    c2w = torch.linalg.inv(viewmats.to(torch.float64))
    c2w[..., :3, 1:3] *= -1.0
    return c2w.to(viewmats.dtype)


def sphere_cameras(
    yaw: torch.Tensor,
    pitch: torch.Tensor,
    *,
    radius: float = 2.0,
    fov: float = math.radians(40.0),
    image_size: int | Sequence[int] = 512,
    target: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on a sphere around ``target`` looking at it (Z up): TRELLIS's setup with its defaults.

    Args:
        yaw: Tensor ``[C]`` of azimuths (radians), e.g. from
            [`sphere_hammersley`][sparse3d.geometry.cameras.sphere_hammersley].
        pitch: Tensor ``[C]`` of elevations (radians).
        radius: Distance from ``target``.
        fov: Horizontal field of view (radians).
        image_size: ``W`` (square) or ``(W, H)`` in pixels.
        target: Point the cameras look at.

    Returns:
        ``(viewmats [C, 4, 4], Ks [C, 3, 3])``, dtype of ``yaw``.
    """
    width, height = _size(image_size)
    centre = torch.as_tensor(target, dtype=yaw.dtype, device=yaw.device)
    eye = spherical_to_cartesian(yaw, pitch, radius) + centre
    viewmats = look_at(eye, centre)
    Ks = intrinsics_from_fov(fov, width, height, dtype=yaw.dtype, device=yaw.device)
    return viewmats, Ks.expand(yaw.shape[0], 3, 3).clone()


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int]:
    if image_size is None:
        return 1, 1
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size: expected W or (W, H) of positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


@dataclass(frozen=True)
class CameraFrames:
    """Cameras and images of one ``transforms.json``.

    Attributes:
        viewmats: OpenCV world-to-camera matrices ``[C, 4, 4]`` (float32).
        Ks: Pixel intrinsics ``[C, 3, 3]`` for images of ``image_size`` (float32).
        image_paths: ``C`` image paths, resolved against the folder of the json file.
        image_size: ``(W, H)`` the intrinsics refer to; ``(1, 1)`` means normalised intrinsics.
        scale: The asset's normalisation scale (``None`` if absent).
        offset: The asset's normalisation offset ``(x, y, z)`` (``None`` if absent); the normalised
            mesh is ``vertices * scale + offset``.
    """

    viewmats: torch.Tensor
    Ks: torch.Tensor
    image_paths: list[Path]
    image_size: tuple[int, int]
    scale: float | None = None
    offset: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return self.viewmats.shape[0]


def read_transforms(
    path: str | os.PathLike[str], image_size: int | Sequence[int] | None = None
) -> CameraFrames:
    """Reads a TRELLIS/Blender ``transforms.json`` into OpenCV ``viewmats``, pixel ``Ks`` and image paths.

    Each frame holds ``file_path``, ``camera_angle_x`` (horizontal FoV, radians) and ``transform_matrix``
    (camera-to-world, OpenGL axes), converted with
    [`from_blender_c2w`][sparse3d.geometry.cameras.from_blender_c2w]. Intrinsics assume square pixels
    and a centred principal point.

    Args:
        path: The json file.
        image_size: ``W`` or ``(W, H)`` of the images the intrinsics are for; ``None`` gives normalised
            intrinsics (``W = H = 1``, TRELLIS's convention), which
            [`scale_intrinsics`][sparse3d.geometry.cameras.scale_intrinsics] turns into pixels.

    Returns:
        A [`CameraFrames`][sparse3d.geometry.cameras.CameraFrames].

    Raises:
        ValueError: The file has no frames, or a frame lacks a field or has a malformed matrix.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    frames = data.get("frames") if isinstance(data, dict) else None
    if not frames:
        raise ValueError(
            f"path: expected a transforms.json with a non-empty 'frames' list, got none in {path}"
        )
    width, height = _size(image_size)
    matrices, fovs, paths = [], [], []
    for i, frame in enumerate(frames):
        missing = [key for key in ("file_path", "camera_angle_x", "transform_matrix") if key not in frame]
        if missing:
            raise ValueError(f"path: frame {i} of {path} lacks {missing}")
        matrix = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        if matrix.shape != (4, 4):
            raise ValueError(
                f"path: frame {i} of {path}: expected a 4x4 transform_matrix, got shape {list(matrix.shape)}"
            )
        matrices.append(matrix)
        fovs.append(float(frame["camera_angle_x"]))
        paths.append(path.parent / frame["file_path"])
    viewmats = from_blender_c2w(torch.stack(matrices)).float()
    Ks = intrinsics_from_fov(torch.tensor(fovs, dtype=torch.float64), width, height)
    offset = data.get("offset")
    return CameraFrames(
        viewmats=viewmats,
        Ks=Ks,
        image_paths=paths,
        image_size=(width, height),
        scale=float(data["scale"]) if "scale" in data else None,
        offset=tuple(float(o) for o in offset) if offset is not None else None,  # type: ignore[arg-type]
    )


def write_transforms(
    path: str | os.PathLike[str],
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    file_paths: Sequence[str],
    image_size: int | Sequence[int],
    *,
    scale: float = 1.0,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> None:
    """Writes cameras as a TRELLIS/Blender ``transforms.json``, atomically (inverse of ``read_transforms``).

    Only ``fx`` is stored (as ``camera_angle_x``), so ``Ks`` must have square pixels and a centred
    principal point; anything else raises rather than being silently lost.

    Args:
        path: Output json file.
        viewmats: OpenCV world-to-camera matrices ``[C, 4, 4]``.
        Ks: Pixel intrinsics ``[C, 3, 3]`` for images of ``image_size``.
        file_paths: ``C`` image paths relative to the json's folder (e.g. ``"000.png"``).
        image_size: ``W`` or ``(W, H)``.
        scale: The asset's normalisation scale.
        offset: The asset's normalisation offset.
    """
    width, height = _size(image_size)
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats: expected shape [C, 4, 4], got {list(viewmats.shape)}")
    if Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(f"Ks: expected shape [{viewmats.shape[0]}, 3, 3], got {list(Ks.shape)}")
    if len(file_paths) != viewmats.shape[0]:
        raise ValueError(f"file_paths: expected {viewmats.shape[0]} paths, got {len(file_paths)}")
    Ks64 = Ks.detach().double().cpu()
    expected = intrinsics_from_fov(
        fov_from_intrinsics(Ks64, width, height)[0], width, height, dtype=torch.float64
    )
    if not torch.allclose(Ks64, expected, rtol=1e-5, atol=1e-6 * max(width, height)):
        raise ValueError(
            "Ks: expected square pixels and the principal point at the image centre "
            f"({width / 2}, {height / 2}) (all transforms.json can store), got {Ks64[0].tolist()} for view 0"
        )
    c2w = to_blender_c2w(viewmats.detach().double().cpu())
    fov_x = fov_from_intrinsics(Ks64, width, height)[0]
    data = {
        "aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
        "scale": float(scale),
        "offset": [float(o) for o in offset],
        "frames": [
            {"file_path": str(name), "camera_angle_x": float(fov), "transform_matrix": matrix.tolist()}
            for name, fov, matrix in zip(file_paths, fov_x.tolist(), c2w, strict=True)
        ],
    }
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(temporary, path)  # atomic: a killed writer never leaves a half-written file
