"""Turntables of Gaussians: views on an orbit rendered to frames, saved as GIF, MP4 or a PNG grid.

Pillow (and imageio-ffmpeg for MP4) are imported lazily, only when a file is written.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from sparse3d.gaussians.container import Gaussians
from sparse3d.gaussians.rendering import Backend, render
from sparse3d.geometry.cameras import orbit_angles, sphere_cameras

__all__ = ["save_gif", "save_grid", "save_mp4", "save_turntable", "to_uint8", "turntable_frames"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Converts ``[..., H, W, 3]`` images in ``[0, 1]`` to uint8 (clamped, rounded).

    Args:
        images: Float images, channels last.

    Returns:
        uint8 array of the same shape.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def turntable_frames(
    gaussians: Gaussians,
    *,
    num_views: int = 36,
    radius: float = 2.0,
    pitch_deg: float = 20.0,
    fov_deg: float = 40.0,
    image_size: int | Sequence[int] = 256,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    background: Sequence[float] = (1.0, 1.0, 1.0),
    backend: Backend = "auto",
    views_per_call: int = 8,
) -> np.ndarray:
    """Renders one sample from ``num_views`` cameras evenly spaced on an orbit (Z up) around ``target``.

    Cameras come from [`orbit_angles`][sparse3d.geometry.cameras.orbit_angles] and
    [`sphere_cameras`][sparse3d.geometry.cameras.sphere_cameras] (TRELLIS's defaults: radius 2, FoV 40).

    Args:
        gaussians: One sample (``batch_size == 1``).
        num_views: Number of frames.
        radius: Camera distance from ``target``.
        pitch_deg: Camera elevation above the XY plane in degrees.
        fov_deg: Horizontal field of view in degrees.
        image_size: ``W`` (square) or ``(W, H)``.
        target: Point looked at.
        background: RGB background in ``[0, 1]``.
        backend: Renderer backend (see [`render`][sparse3d.gaussians.rendering.render]).
        views_per_call: Views rendered per call (bounds memory of the torch reference).

    Returns:
        uint8 frames ``[num_views, H, W, 3]``.
    """
    dtype, device = gaussians.dtype, gaussians.device
    yaw, pitch = orbit_angles(num_views, math.radians(pitch_deg), dtype=dtype, device=device)
    viewmats, Ks = sphere_cameras(
        yaw, pitch, radius=radius, fov=math.radians(fov_deg), image_size=image_size, target=target
    )
    width, height = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    color = torch.tensor(background, dtype=dtype, device=device)
    frames = []
    for start in range(0, num_views, views_per_call):
        views = slice(start, start + views_per_call)
        output = render(
            gaussians, viewmats[views], Ks[views], int(width), int(height), color, backend=backend
        )
        frames.append(to_uint8(output.colors))
    return np.concatenate(frames)


def _check_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = to_uint8(frames) if frames.is_floating_point() else frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"frames must be uint8 [V, H, W, 3] with V >= 1, got {frames.dtype} {list(frames.shape)}"
        )
    return frames


def save_gif(frames: np.ndarray | torch.Tensor, path: str | os.PathLike[str], *, fps: float = 12.0) -> None:
    """Writes frames as a looping GIF (Pillow).

    Args:
        frames: uint8 ``[V, H, W, 3]`` (float tensors in ``[0, 1]`` are converted).
        path: Output ``.gif``.
        fps: Frames per second.
    """
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    duration = max(1, round(1000.0 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False)


def save_mp4(frames: np.ndarray | torch.Tensor, path: str | os.PathLike[str], *, fps: float = 24.0) -> None:
    """Writes frames as an H.264 MP4; needs the optional ``imageio`` and ``imageio-ffmpeg`` packages.

    Args:
        frames: uint8 ``[V, H, W, 3]``.
        path: Output ``.mp4``.
        fps: Frames per second.
    """
    if importlib.util.find_spec("imageio") is None or importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ImportError("save_mp4 needs the 'imageio' and 'imageio-ffmpeg' packages; use save_gif instead")
    import imageio.v2 as imageio

    frames = _check_frames(frames)
    with imageio.get_writer(os.fspath(path), fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)


def save_grid(
    frames: np.ndarray | torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    columns: int | None = None,
    background: int = 255,
) -> np.ndarray:
    """Tiles frames into one image (row-major) and optionally writes it as PNG.

    Args:
        frames: uint8 ``[V, H, W, 3]``.
        path: Output ``.png``; ``None`` only returns the grid.
        columns: Frames per row; default ``ceil(sqrt(V))``.
        background: Grey level of unused cells.

    Returns:
        uint8 grid ``[rows * H, columns * W, 3]``.
    """
    frames = _check_frames(frames)
    count, height, width, _ = frames.shape
    columns = columns or math.ceil(math.sqrt(count))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(count / columns)
    grid = np.full((rows * columns, height, width, 3), background, dtype=np.uint8)
    grid[:count] = frames
    grid = grid.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4)  # [rows, H, columns, W, 3]
    grid = grid.reshape(rows * height, columns * width, 3)
    if path is not None:
        from PIL import Image

        Image.fromarray(grid).save(path)
    return grid


def save_turntable(
    gaussians: Gaussians, path: str | os.PathLike[str], *, fps: float = 12.0, **options: object
) -> np.ndarray:
    """Renders a turntable and writes it; the format follows the suffix (``.gif``, ``.mp4``, ``.png`` grid).

    Args:
        gaussians: One sample.
        path: Output file.
        fps: Frames per second (GIF/MP4).
        **options: Keyword options of [`turntable_frames`][sparse3d.gaussians.viz.turntable_frames].

    Returns:
        The uint8 frames ``[V, H, W, 3]``.
    """
    suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
    if suffix not in ("gif", "mp4", "png"):
        raise ValueError(f"path must end in .gif, .mp4 or .png, got {os.fspath(path)!r}")
    frames = turntable_frames(gaussians, **options)
    if suffix == "gif":
        save_gif(frames, path, fps=fps)
    elif suffix == "mp4":
        save_mp4(frames, path, fps=fps)
    else:
        save_grid(frames, path)
    return frames
