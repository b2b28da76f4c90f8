"""Procedural textured assets rendered by our own sphere tracer, written in the TRELLIS on-disk layout.

From a seed: unions of spheres, boxes, tori and cylinders with high-frequency textures (checkers,
stripes, glyph text, polygon logos), RGBA renders from Hammersley cameras plus condition views, and
surface voxels. Run ``python recipes/flux3d/procedural.py --out DIR --num-assets N --heldout H``: held-out
assets come from a seed stream disjoint from the training one, ``metadata.csv`` marks them in its ``split``
column, and ``dataset.json`` records the settings and whether the generation completed (re-running the same
command resumes an interrupted one).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.data import (  # noqa: E402
    DATASET_RECORD,
    SPLITS,
    check_settings,
    read_record,
    read_voxel_ply,
    write_atomic,
    write_metadata_table,
    write_record,
)
from sparse3d.geometry import (  # noqa: E402
    sphere_cameras,
    sphere_hammersley,
    voxel_centers,
    write_transforms,
)

__all__ = [
    "Primitive",
    "AssetSpec",
    "TextureOptions",
    "HELDOUT_SEED_OFFSET",
    "KINDS",
    "TEXTURES",
    "METADATA_COLUMNS",
    "sample_asset",
    "asset_sdf",
    "render_asset",
    "surface_voxels",
    "write_voxel_ply",
    "condition_cameras",
    "generate_asset",
    "generate_dataset",
    "write_metadata",
    "main",
]

KINDS = ("sphere", "box", "torus", "cylinder")
"""Primitive kinds."""
TEXTURES = ("checker", "stripes", "glyphs", "logo")
"""Texture kinds."""
HELDOUT_SEED_OFFSET = 2_147_483_647
"""Held-out assets of a dataset with seed ``s`` come from stream ``s + HELDOUT_SEED_OFFSET`` (a large odd
number, 2^31 - 1), disjoint from the training stream ``s``."""
METADATA_COLUMNS = (
    "sha256",
    "file_identifier",
    "aesthetic_score",
    "captions",
    "local_path",
    "rendered",
    "voxelized",
    "num_voxels",
    "cond_rendered",
    "split",
)
"""The ``metadata.csv`` columns written here: TRELLIS's, plus ``split`` (``train`` / ``heldout``);
``prepare.py`` adds ``feature_<name>`` columns."""


@dataclass(frozen=True, kw_only=True)
class TextureOptions:
    """What the procedural textures look like (the ``small`` preset wants high frequencies).

    Attributes:
        kinds: Texture kinds drawn from (a subset of ``TEXTURES``), e.g. ``("checker", "stripes")``.
        cells: Checker cells and stripe periods per texture tile; each texture draws one. A tile covers
            0.25–0.6 world units, so 8 periods on a 0.25 tile are one voxel wide at ``R = 32``.
        colours: Colours of a checker or stripe pattern (2: two-colour patterns).
        size: Texture image side in pixels.
    """

    kinds: tuple[str, ...] = TEXTURES
    cells: tuple[int, ...] = (2, 4, 8)
    colours: int = 2
    size: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "cells", tuple(int(c) for c in self.cells))
        unknown = [kind for kind in self.kinds if kind not in TEXTURES]
        if not self.kinds or unknown:
            raise ValueError(f"kinds: expected a non-empty subset of {TEXTURES}, got {list(self.kinds)}")
        if self.size < 8:
            raise ValueError(f"size: expected >= 8 texture pixels, got {self.size}")
        if not 2 <= self.colours <= 16:
            raise ValueError(f"colours: expected 2 to 16 colours, got {self.colours}")
        bad = [c for c in self.cells if not 1 <= c or c * self.colours > self.size]
        if not self.cells or bad:
            raise ValueError(
                f"cells: expected counts >= 1 with cells * colours <= size ({self.size}) so every band is at "
                f"least a pixel, got {list(self.cells)}"
            )

    def changed(self) -> dict:
        """The options that differ from the defaults (JSON-ready)."""
        default = TextureOptions()
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) != getattr(default, f.name)
        }


_LIGHTS = ((4.0, 1.0, 6.0, 0.75), (-3.0, -2.0, 2.0, 0.3), (0.0, 0.0, -1.0, 0.15))  # direction, intensity
_AMBIENT = 0.25


@dataclass(frozen=True)
class Primitive:
    """One primitive in the normalised world frame.

    Attributes:
        kind: One of ``KINDS``; its local axis of symmetry (torus, cylinder) is local ``z``.
        centre: float64 ``[3]`` world position.
        rotation: float64 ``[3, 3]``; columns are the local axes in world coordinates
            (``world = centre + rotation @ local``).
        params: Sizes: sphere ``(radius,)``, box ``(hx, hy, hz)`` half-extents, torus
            ``(major, minor)`` radii, cylinder ``(radius, half_height)``.
        texture: Texture image ``[3, T, T]`` in ``[0, 1]`` (float32).
        texture_kind: One of ``TEXTURES``.
        tile: World size of one texture tile.
    """

    kind: str
    centre: torch.Tensor
    rotation: torch.Tensor
    params: tuple[float, ...]
    texture: torch.Tensor
    texture_kind: str
    tile: float


@dataclass(frozen=True)
class AssetSpec:
    """A procedural asset: a union of primitives, normalised as TRELLIS does (longest bbox side 1, centred).

    Attributes:
        primitives: The primitives.
        seed: Dataset seed.
        index: Asset index within the dataset.
        scale: Normalisation scale applied to the raw shape.
        offset: Normalisation offset ``(x, y, z)``.
        textures: The texture options it was drawn with.
    """

    primitives: tuple[Primitive, ...]
    seed: int
    index: int
    scale: float
    offset: tuple[float, float, float]
    textures: TextureOptions = field(default_factory=lambda: TextureOptions())

    def description(self) -> dict:
        """A JSON-serialisable summary of the shape and textures, hashed into ``sha256`` (texture options
        only where they differ from the defaults, so default assets keep their ids)."""
        options = self.textures.changed()
        return ({"texture_options": options} if options else {}) | {
            "seed": self.seed,
            "index": self.index,
            "primitives": [
                {
                    "kind": p.kind,
                    "centre": [round(v, 6) for v in p.centre.tolist()],
                    "rotation": [round(v, 6) for v in p.rotation.flatten().tolist()],
                    "params": [round(v, 6) for v in p.params],
                    "texture": p.texture_kind,
                    "tile": round(p.tile, 6),
                }
                for p in self.primitives
            ],
        }

    @property
    def sha256(self) -> str:
        """Hex sha256 of ``description()`` (the asset id in the TRELLIS layout)."""
        text = json.dumps(self.description(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def caption(self) -> str:
        """A plain-text caption, e.g. ``"a checker-textured torus and a glyphs-textured box"``."""
        parts = [f"a {p.texture_kind}-textured {p.kind}" for p in self.primitives]
        return " and ".join(parts)


# ----------------------------------------------------------------------------------------------- shapes


def _random_rotation(rng: torch.Generator) -> torch.Tensor:
    quaternion = torch.randn(4, generator=rng, dtype=torch.float64)
    w, x, y, z = (quaternion / quaternion.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


def _uniform(rng: torch.Generator, low: float, high: float, count: int = 1) -> list[float]:
    return (low + (high - low) * torch.rand(count, generator=rng, dtype=torch.float64)).tolist()


def _half_extents(kind: str, rotation: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
    """Exact world-axis half-extents ``[3]`` of a rotated primitive's bounding box."""
    axis = rotation[:, 2]  # local z in world coordinates
    across = (1.0 - axis.square()).clamp(min=0.0).sqrt()
    if kind == "sphere":
        return torch.full((3,), params[0], dtype=torch.float64)
    if kind == "box":
        return rotation.abs() @ torch.tensor(params, dtype=torch.float64)
    if kind == "torus":
        return params[0] * across + params[1]
    if kind == "cylinder":
        return params[0] * across + params[1] * axis.abs()
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _texture(kind: str, size: int, rng: random.Random, options: TextureOptions | None = None) -> torch.Tensor:
    """A ``[3, size, size]`` texture in ``[0, 1]`` drawn with PIL.

    Checkers and stripes take their cell / period count from ``options.cells`` and cycle through
    ``options.colours`` colours (each at least 200 levels, summed over RGB, from the one before it).
    """
    from PIL import Image, ImageDraw, ImageFont

    options = options or TextureOptions()

    def colour() -> tuple[int, int, int]:
        return tuple(rng.randrange(256) for _ in range(3))  # type: ignore[return-value]

    palette = [colour()]
    for _ in range(options.colours - 1):
        candidate = colour()
        while sum(abs(a - b) for a, b in zip(palette[-1], candidate, strict=True)) < 200:
            candidate = colour()
        palette.append(candidate)
    background, foreground = palette[0], palette[1]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if kind == "checker":
        cells = rng.choice(options.cells)
        step = size // cells
        for row in range(cells):
            for col in range(cells):
                if (row + col) % len(palette):
                    fill = palette[(row + col) % len(palette)]
                    draw.rectangle([col * step, row * step, (col + 1) * step - 1, (row + 1) * step - 1], fill)
    elif kind == "stripes":
        count = rng.choice(options.cells)
        step = size // count
        band = step // len(palette)  # one period: palette[1], palette[2], ..., then the background
        for index in range(count):
            for number, fill in enumerate(palette[1:]):
                top = index * step + number * band
                draw.rectangle([0, top, size - 1, top + band - 1], fill)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.ROTATE_90)
    elif kind == "glyphs":
        font = ImageFont.load_default(size=max(8, size // 10))
        lines = size // max(8, size // 10)
        for line in range(lines):
            text = "".join(rng.choice(string.ascii_uppercase + string.digits + "  ") for _ in range(12))
            draw.text((2, line * (size // lines)), text, fill=foreground, font=font)
    elif kind == "logo":
        for _ in range(rng.randint(2, 5)):
            centre_x, centre_y = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size
            radius = rng.uniform(0.1, 0.3) * size
            corners = rng.randint(3, 7)
            angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(corners))
            points = [(centre_x + radius * math.cos(a), centre_y + radius * math.sin(a)) for a in angles]
            draw.polygon(points, fill=colour())
    else:
        raise ValueError(f"kind: expected one of {TEXTURES}, got {kind!r}")
    array = np.asarray(image, dtype=np.float32) / 255.0  # [T, T, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, T, T]


def sample_asset(seed: int, index: int, *, textures: TextureOptions | None = None) -> AssetSpec:
    """Draws asset ``index`` of dataset ``seed`` (independent of how many assets are generated).

    1 to 3 primitives with random sizes, positions and rotations, each with its own texture, then
    TRELLIS's normalisation from the exact bounding box: ``scale = 1 / longest side``, centred at the
    origin, so the asset touches ``[-0.5, 0.5]^3`` on its longest axis.

    Args:
        seed: Dataset seed.
        index: Asset index.
        textures: Texture options (default ``TextureOptions()``); non-default options enter ``sha256``.

    Returns:
        The normalised ``AssetSpec``.
    """
    if index < 0:
        raise ValueError(f"index: expected >= 0, got {index}")
    textures = textures or TextureOptions()
    key = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")
    rng = torch.Generator().manual_seed(key)
    text_rng = random.Random(key)
    count = 1 + int(torch.multinomial(torch.tensor([0.35, 0.4, 0.25]), 1, generator=rng))
    raw = []
    for number in range(count):
        kind = KINDS[int(torch.randint(len(KINDS), (1,), generator=rng))]
        if kind == "sphere":
            params = tuple(_uniform(rng, 0.25, 0.5))
        elif kind == "box":
            params = tuple(_uniform(rng, 0.12, 0.45, 3))
        elif kind == "torus":
            params = (*_uniform(rng, 0.25, 0.45), *_uniform(rng, 0.08, 0.16))
        else:
            params = (*_uniform(rng, 0.12, 0.35), *_uniform(rng, 0.15, 0.45))
        centre = torch.zeros(3, dtype=torch.float64)
        if number:
            centre = torch.tensor(_uniform(rng, -0.35, 0.35, 3), dtype=torch.float64)
        rotation = _random_rotation(rng)
        texture_kind = textures.kinds[int(torch.randint(len(textures.kinds), (1,), generator=rng))]
        tile = _uniform(rng, 0.25, 0.6)[0]
        raw.append((kind, centre, rotation, params, texture_kind, tile))
    low = torch.stack([c - _half_extents(k, r, p) for k, c, r, p, _, _ in raw]).amin(dim=0)
    high = torch.stack([c + _half_extents(k, r, p) for k, c, r, p, _, _ in raw]).amax(dim=0)
    scale = 1.0 / float((high - low).max())
    offset = -scale * (low + high) / 2
    primitives = tuple(
        Primitive(
            kind=kind,
            centre=centre * scale + offset,
            rotation=rotation,
            params=tuple(value * scale for value in params),
            texture=_texture(texture_kind, textures.size, text_rng, textures),
            texture_kind=texture_kind,
            tile=tile,
        )
        for kind, centre, rotation, params, texture_kind, tile in raw
    )
    return AssetSpec(primitives, seed, index, scale, tuple(offset.tolist()), textures)  # type: ignore[arg-type]


def _primitive_sdf(primitive: Primitive, local: torch.Tensor) -> torch.Tensor:
    """Exact signed distance ``[M]`` of local points ``[M, 3]`` to one primitive."""
    params = primitive.params
    if primitive.kind == "sphere":
        return local.norm(dim=-1) - params[0]
    if primitive.kind == "box":
        excess = local.abs() - torch.tensor(params, dtype=local.dtype, device=local.device)
        outside = excess.clamp(min=0.0).norm(dim=-1)
        return outside + excess.amax(dim=-1).clamp(max=0.0)
    radial = local[:, :2].norm(dim=-1)
    if primitive.kind == "torus":
        return torch.stack([radial - params[0], local[:, 2]], dim=-1).norm(dim=-1) - params[1]
    excess = torch.stack([radial - params[0], local[:, 2].abs() - params[1]], dim=-1)  # cylinder
    return excess.clamp(min=0.0).norm(dim=-1) + excess.amax(dim=-1).clamp(max=0.0)


def _local(primitive: Primitive, points: torch.Tensor) -> torch.Tensor:
    rotation = primitive.rotation.to(points)
    return (points - primitive.centre.to(points)) @ rotation  # [M, 3] local coordinates


@dataclass(frozen=True)
class _Prepared:
    """An asset's transforms in one dtype/device: ``local = points @ rotations + bias`` for all primitives."""

    spec: AssetSpec
    rotations: torch.Tensor  # [3, 3P]
    bias: torch.Tensor  # [3P]

    @staticmethod
    def build(spec: AssetSpec, dtype: torch.dtype, device: torch.device) -> _Prepared:
        rotations = torch.cat([p.rotation for p in spec.primitives], dim=1)  # [3, 3P]
        bias = torch.cat([-(p.centre @ p.rotation) for p in spec.primitives])  # [3P]
        return _Prepared(spec, rotations.to(dtype=dtype, device=device), bias.to(dtype=dtype, device=device))

    def sdf(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = torch.addmm(self.bias, points, self.rotations)  # [M, 3P]
        local = local.reshape(points.shape[0], -1, 3)  # [M, P, 3]
        distances = [_primitive_sdf(p, local[:, i]) for i, p in enumerate(self.spec.primitives)]
        if len(distances) == 1:
            return distances[0], torch.zeros_like(distances[0], dtype=torch.int64)
        return torch.stack(distances, dim=1).min(dim=1)


def asset_sdf(spec: AssetSpec, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distance of the union (minimum over primitives) and the nearest primitive's index.

    Exact outside the shape; inside it is ``-max(depth in each primitive)``, a bound on the true depth.

    Args:
        spec: The asset.
        points: Tensor ``[M, 3]`` of world points.

    Returns:
        ``(sdf [M], primitive [M] int64)``.
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape [M, 3], got {list(points.shape)}")
    return _Prepared.build(spec, points.dtype, points.device).sdf(points)


# --------------------------------------------------------------------------------------------- renderer


def _trace(
    prepared: _Prepared, origins: torch.Tensor, directions: torch.Tensor, max_steps: int, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere-traces rays ``[M, 3]`` (unit directions); returns ``(hit [M] bool, distance t [M])``."""
    # Start and stop where the ray meets the world cube (slab test), padded by epsilon.
    low = torch.full((3,), -0.5 - 2 * epsilon, dtype=origins.dtype, device=origins.device)
    inverse = 1.0 / torch.where(directions.abs() < 1e-12, 1e-12, directions)
    near_planes, far_planes = (low - origins) * inverse, (-low - origins) * inverse
    t = torch.minimum(near_planes, far_planes).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(near_planes, far_planes).amin(dim=-1)
    hit = torch.zeros(origins.shape[0], dtype=torch.bool, device=origins.device)
    active = (t < t_far).nonzero()[:, 0]
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        points = torch.addcmul(origins[active], t[active, None], directions[active])
        distance, _ = prepared.sdf(points)
        converged = distance < epsilon
        hit[active[converged]] = True
        t[active] = t[active] + distance.clamp(min=0.0)
        running = ~converged & (t[active] < t_far[active])
        active = active[running]
    return hit, t


def _normals(prepared: _Prepared, points: torch.Tensor, step: float = 5e-4) -> torch.Tensor:
    """Unit SDF gradients ``[M, 3]`` from four tetrahedral samples."""
    corners = torch.tensor(
        [[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=points.dtype, device=points.device
    )
    samples = (points[None] + step * corners[:, None]).reshape(-1, 3)  # [4M, 3]
    distance, _ = prepared.sdf(samples)
    distance = distance.reshape(4, -1)  # [4, M]
    gradient = (distance[:, :, None] * corners[:, None]).sum(dim=0)  # [M, 3]
    return F.normalize(gradient, dim=-1)


def _albedo(prepared: _Prepared, points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Triplanar texture lookup ``[M, 3]`` in each hit point's nearest primitive's local frame."""
    _, nearest = prepared.sdf(points)
    colour = torch.zeros_like(points)
    for index, primitive in enumerate(prepared.spec.primitives):
        mask = nearest == index
        if not bool(mask.any()):
            continue
        local = _local(primitive, points[mask])
        local_normal = normals[mask] @ primitive.rotation.to(points)
        axis = local_normal.abs().argmax(dim=-1)  # project along the dominant normal axis
        u = torch.where(axis == 0, local[:, 1], local[:, 0])
        v = torch.where(axis == 2, local[:, 1], local[:, 2])
        uv = torch.stack([u, v], dim=-1) / primitive.tile
        grid = (torch.remainder(uv, 1.0) * 2.0 - 1.0).float()[None, None]  # [1, 1, m, 2]
        texture = primitive.texture.to(points.device)[None]  # [1, 3, T, T]
        sampled = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border", align_corners=False)
        colour[mask] = sampled[0, :, 0].T.to(points.dtype)  # [m, 3]
    return colour


def render_asset(
    spec: AssetSpec,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    image_size: int | Sequence[int],
    *,
    max_steps: int = 96,
    epsilon: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders RGBA images and depth by sphere tracing the analytic SDF (vectorised over pixels).

    Rays leave the camera centre through pixel centres ``(c + 0.5, r + 0.5)``; a ray hits when the SDF
    drops below ``epsilon``. Shading is Lambert with three fixed world-space lights plus ambient on the
    triplanar-textured albedo; RGB is 0 and alpha 0 where nothing is hit (no anti-aliasing).

    Args:
        spec: The asset.
        viewmats: OpenCV world-to-camera matrices ``[V, 4, 4]``.
        Ks: Pixel intrinsics ``[V, 3, 3]``.
        image_size: ``W`` or ``(W, H)``.
        max_steps: Sphere-tracing steps per ray.
        epsilon: Hit threshold in world units (well below a pixel's footprint).

    Returns:
        ``(rgba [V, H, W, 4] float32 in [0, 1], depth [V, H, W] float32)``; ``depth`` is camera-space
        ``z`` of the hit, ``+inf`` for background.
    """
    width, height = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats: expected shape [V, 4, 4], got {list(viewmats.shape)}")
    if Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(f"Ks: expected shape [{viewmats.shape[0]}, 3, 3], got {list(Ks.shape)}")
    dtype, device = torch.float32, viewmats.device
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    pixels = torch.stack([cols, rows, torch.ones_like(cols)], dim=-1).reshape(-1, 3)  # [H*W, 3]
    rotation, translation = viewmats[:, :3, :3].to(dtype), viewmats[:, :3, 3].to(dtype)
    camera_dirs = pixels @ torch.linalg.inv(Ks.to(dtype)).transpose(1, 2)  # [V, H*W, 3], z = 1
    world_dirs = camera_dirs @ rotation  # R^T d, [V, H*W, 3]
    centres = -(rotation.transpose(1, 2) @ translation[:, :, None])[:, :, 0]  # [V, 3]
    norms = world_dirs.norm(dim=-1, keepdim=True)
    directions = (world_dirs / norms).reshape(-1, 3)  # [V*H*W, 3]
    origins = centres[:, None].expand_as(world_dirs).reshape(-1, 3)
    prepared = _Prepared.build(spec, dtype, device)
    hit, t = _trace(prepared, origins, directions, max_steps, epsilon)
    rgb = torch.zeros_like(origins)
    if bool(hit.any()):
        points = origins[hit] + t[hit, None] * directions[hit]
        normals = _normals(prepared, points)
        albedo = _albedo(prepared, points, normals)
        light = torch.full((points.shape[0],), _AMBIENT, dtype=dtype, device=device)
        for x, y, z, intensity in _LIGHTS:
            direction = F.normalize(torch.tensor([x, y, z], dtype=dtype, device=device), dim=0)
            light = light + intensity * (normals @ direction).clamp(min=0.0)
        rgb[hit] = (albedo * light[:, None]).clamp(0.0, 1.0)
    depth = torch.where(hit, t / norms.reshape(-1), torch.inf)  # ray length -> camera z (z of dir is 1)
    views = viewmats.shape[0]
    rgba = torch.cat([rgb, hit[:, None].to(dtype)], dim=-1).reshape(views, height, width, 4)
    return rgba, depth.reshape(views, height, width)


def surface_voxels(spec: AssetSpec, resolution: int, *, chunk: int = 1 << 18) -> torch.Tensor:
    """Voxels whose centre lies within half a cell diagonal of the surface: ``|sdf| <= sqrt(3) / (2 R)``.

    For a smooth surface this is the set a triangle-box voxelizer finds (a voxel the surface crosses
    has its centre within half a diagonal of it), plus a few cells near the surface's corners.

    Args:
        spec: The asset.
        resolution: Grid resolution ``R``.
        chunk: Voxel centres evaluated at once.

    Returns:
        int32 ``[N, 3]`` voxel coordinates in lexicographic order.
    """
    if resolution < 1:
        raise ValueError(f"resolution: expected >= 1, got {resolution}")
    band = math.sqrt(3.0) / (2.0 * resolution)
    prepared = _Prepared.build(spec, torch.float64, torch.device("cpu"))
    # Coarse-to-fine: the SDF is 1-Lipschitz, so a block of B^3 voxels whose centre is farther than
    # band + (block half-diagonal - voxel half-diagonal) from the surface holds no surface voxel.
    block = 4 if resolution % 4 == 0 and resolution >= 16 else 1
    blocks = resolution // block
    axis = torch.arange(blocks, dtype=torch.int64)
    coarse = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # [b^3, 3]
    centres = (coarse.double() + 0.5) / blocks - 0.5
    slack = band + math.sqrt(3.0) * (block - 1) / (2.0 * resolution)
    near = coarse[prepared.sdf(centres)[0].abs() <= slack]  # [n, 3]
    local = torch.stack(torch.meshgrid(*[torch.arange(block)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    candidates = (near[:, None] * block + local[None]).reshape(-1, 3)  # [n * B^3, 3]
    keep = []
    for start in range(0, candidates.shape[0], chunk):
        coords = candidates[start : start + chunk]
        sdf, _ = prepared.sdf(voxel_centers(coords, resolution, dtype=torch.float64))
        keep.append(sdf.abs() <= band)
    voxels = candidates[torch.cat(keep)] if keep else candidates
    keys = (voxels[:, 0] * resolution + voxels[:, 1]) * resolution + voxels[:, 2]
    return voxels[keys.argsort()].to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------- layout


def write_voxel_ply(path: str | os.PathLike[str], coords: torch.Tensor, resolution: int) -> None:
    """Writes voxel centres ``(idx + 0.5) / R - 0.5`` as a vertex-only binary PLY (float x, y, z), atomically.

    This is the TRELLIS ``voxels/<sha256>.ply`` format; read it back with
    ``recipes.flux3d.data.read_voxel_ply``.

    Args:
        path: Output file.
        coords: Integer tensor ``[N, 3]`` of voxel indices.
        resolution: Grid resolution ``R``.
    """
    positions = voxel_centers(coords, resolution, dtype=torch.float64).numpy().astype("<f4")  # [N, 3]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {positions.shape[0]}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    )
    write_atomic(Path(path), header.encode("ascii") + positions.tobytes())


def _write_png(path: Path, rgba: torch.Tensor) -> None:
    from PIL import Image

    array = (rgba.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()  # [H, W, 4]
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGBA").save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def condition_cameras(
    num_views: int,
    image_size: int,
    generator: torch.Generator,
    *,
    fov_range: tuple[float, float] = (math.radians(10.0), math.radians(70.0)),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random condition cameras as TRELLIS's ``renders_cond``: random direction, random FoV, the radius at
    which the sphere bounding the unit cube just fills the view (``sqrt(3) / 2 / sin(fov / 2)``).

    Args:
        num_views: Number of cameras.
        image_size: Square image side in pixels.
        generator: Source of randomness.
        fov_range: ``(min, max)`` FoV in radians.

    Returns:
        ``(viewmats [V, 4, 4], Ks [V, 3, 3])`` float32.
    """
    viewmats, Ks = [], []
    for _ in range(num_views):
        values = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        yaw = torch.tensor([2 * math.pi * values[0]])
        pitch = torch.tensor([math.asin(2 * values[1] - 1) * 0.8])
        fov = fov_range[0] + (fov_range[1] - fov_range[0]) * values[2]
        radius = math.sqrt(3.0) / 2.0 / math.sin(fov / 2.0)
        view, K = sphere_cameras(yaw, pitch, radius=radius, fov=fov, image_size=image_size)
        viewmats.append(view)
        Ks.append(K)
    return torch.cat(viewmats), torch.cat(Ks)


def _render_folder(
    folder: Path,
    spec: AssetSpec,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    image_size: int,
    max_steps: int,
    views_per_batch: int,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{view:03d}.png" for view in range(viewmats.shape[0])]
    for start in range(0, viewmats.shape[0], views_per_batch):
        stop = min(start + views_per_batch, viewmats.shape[0])
        rgba, _ = render_asset(spec, viewmats[start:stop], Ks[start:stop], image_size, max_steps=max_steps)
        for offset, image in enumerate(rgba):
            _write_png(folder / names[start + offset], image)
    # transforms.json last: its presence means the folder is complete.
    write_transforms(
        folder / "transforms.json", viewmats, Ks, names, image_size, scale=spec.scale, offset=spec.offset
    )


def generate_asset(
    root: str | os.PathLike[str],
    seed: int,
    index: int,
    *,
    image_size: int = 128,
    num_views: int = 24,
    num_cond_views: int = 4,
    cond_image_size: int | None = None,
    voxel_resolution: int = 64,
    max_steps: int = 96,
    views_per_batch: int = 8,
    textures: TextureOptions | None = None,
    split: str = "train",
    resume: bool = False,
) -> dict[str, object]:
    """Generates, renders and voxelizes one asset into ``root`` (TRELLIS layout); returns its metadata row.

    Writes ``renders/<sha256>/{000..}.png`` + ``transforms.json`` (Hammersley cameras, radius 2, FoV 40°,
    a random offset per asset), ``renders_cond/<sha256>/`` (random FoV in 10–70°), and, last,
    ``voxels/<sha256>.ply``: every file is written atomically, so an existing PLY means the asset is done.

    Args:
        root: Dataset folder.
        seed: Seed of the asset's stream (the dataset seed, or the held-out stream's).
        index: Asset index.
        image_size: Render side in pixels.
        num_views: Hammersley views.
        num_cond_views: Condition views (0 for none).
        cond_image_size: Condition render side (default ``image_size``).
        voxel_resolution: Voxel grid resolution ``R``.
        max_steps: Sphere-tracing steps per ray.
        views_per_batch: Views traced at once (bounds memory).
        textures: Texture options (default ``TextureOptions()``).
        split: The ``split`` column of the row (``train`` or ``heldout``).
        resume: Return the row of an asset already done (its PLY exists) without rendering it again.

    Returns:
        The ``metadata.csv`` row (keys ``METADATA_COLUMNS``).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    root = Path(root)
    spec = sample_asset(seed, index, textures=textures)
    sha = spec.sha256
    ply = root / "voxels" / f"{sha}.ply"
    row = {
        "sha256": sha,
        "file_identifier": f"procedural/{seed}/{index}",
        "aesthetic_score": 5.0,
        "captions": json.dumps([spec.caption]),
        "local_path": "",
        "rendered": True,
        "voxelized": True,
        "num_voxels": 0,
        "cond_rendered": bool(num_cond_views),
        "split": split,
    }
    if resume and ply.is_file():
        return row | {"num_voxels": int(read_voxel_ply(ply).shape[0])}
    camera_rng = torch.Generator().manual_seed(int(sha[:15], 16))
    offset = torch.rand(2, generator=camera_rng, dtype=torch.float64).tolist()
    yaw, pitch = sphere_hammersley(num_views, offset)
    viewmats, Ks = sphere_cameras(yaw, pitch, radius=2.0, fov=math.radians(40.0), image_size=image_size)
    _render_folder(root / "renders" / sha, spec, viewmats, Ks, image_size, max_steps, views_per_batch)
    if num_cond_views:
        size = cond_image_size or image_size
        cond_viewmats, cond_Ks = condition_cameras(num_cond_views, size, camera_rng)
        _render_folder(
            root / "renders_cond" / sha, spec, cond_viewmats, cond_Ks, size, max_steps, views_per_batch
        )
    coords = surface_voxels(spec, voxel_resolution)
    (root / "voxels").mkdir(parents=True, exist_ok=True)
    write_voxel_ply(ply, coords, voxel_resolution)
    return row | {"num_voxels": int(coords.shape[0])}


def write_metadata(root: str | os.PathLike[str], rows: Sequence[dict[str, object]]) -> None:
    """Writes ``metadata.csv`` (columns ``METADATA_COLUMNS`` plus any others the rows hold), atomically."""
    columns = list(METADATA_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    write_metadata_table(root, columns, rows)


def _command(root: Path, num_assets: int, heldout: int, settings: dict) -> str:
    """The command line that makes (or finishes) this dataset."""
    flags = [
        f"--out {root}",
        f"--num-assets {num_assets}",
        f"--heldout {heldout}",
        f"--seed {settings['seed']}",
        f"--resolution {settings['image_size']}",
        f"--views {settings['num_views']}",
        f"--cond-views {settings['num_cond_views']}",
        f"--voxel-resolution {settings['voxel_resolution']}",
        f"--max-steps {settings['max_steps']}",
    ]
    if settings["cond_image_size"] is not None:
        flags.append(f"--cond-resolution {settings['cond_image_size']}")
    textures = settings["textures"]
    for name, flag in (("kinds", "--textures"), ("cells", "--texture-cells")):
        if name in textures:
            flags.append(f"{flag} {','.join(str(v) for v in textures[name])}")
    for name, flag in (("colours", "--texture-colours"), ("size", "--texture-size")):
        if name in textures:
            flags.append(f"{flag} {textures[name]}")
    return "python recipes/flux3d/procedural.py " + " ".join(flags)


def generate_dataset(
    root: str | os.PathLike[str],
    num_assets: int,
    *,
    heldout: int = 0,
    seed: int = 0,
    image_size: int = 128,
    num_views: int = 24,
    num_cond_views: int = 4,
    cond_image_size: int | None = None,
    voxel_resolution: int = 64,
    max_steps: int = 96,
    textures: TextureOptions | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Generates a procedural dataset into ``root`` in the TRELLIS layout, resumably.

    Training asset ``i`` is asset ``i`` of stream ``seed``; held-out asset ``j`` is asset ``j`` of stream
    ``seed + HELDOUT_SEED_OFFSET``, so evaluation runs on shapes and textures from seeds never used for
    training. ``metadata.csv`` gets a ``split`` column (``train`` / ``heldout``).

    ``dataset.json`` records the settings, counts, seeds and the command line: written with
    ``complete: false`` before the first asset and ``complete: true`` after ``metadata.csv``, so readers
    refuse a dataset whose generation was interrupted. Running the same command again resumes: assets whose
    files are done are kept. Other settings than the recorded ones are refused (naming the setting) unless
    ``overwrite``, which renders every asset again.

    Args:
        root: Output folder (created).
        num_assets: Training assets.
        heldout: Held-out assets.
        seed: Dataset seed; asset ``i`` depends only on ``(seed, i)``.
        image_size: Render side in pixels.
        num_views: Hammersley views per asset.
        num_cond_views: Condition views per asset.
        cond_image_size: Condition render side (default ``image_size``).
        voxel_resolution: Voxel grid resolution ``R``.
        max_steps: Sphere-tracing steps per ray.
        textures: Texture options (default ``TextureOptions()``).
        workers: Processes (each single-threaded); 1 generates in this process.
        overwrite: Regenerate every asset, also over a dataset made with other settings.
        progress: Show a tqdm progress bar.

    Returns:
        The metadata rows (training rows first).

    Raises:
        ValueError: Bad counts or sizes, or settings that differ from the folder's record (without
            ``overwrite``).
    """
    from tqdm.auto import tqdm

    for name, value, low in (
        ("num_assets", num_assets, 0),
        ("heldout", heldout, 0),
        ("image_size", image_size, 1),
        ("num_views", num_views, 1),
        ("num_cond_views", num_cond_views, 0),
        ("voxel_resolution", voxel_resolution, 1),
        ("max_steps", max_steps, 1),
        ("workers", workers, 1),
    ):
        if value < low:
            raise ValueError(f"{name}: expected >= {low}, got {value}")
    if num_assets + heldout == 0:
        raise ValueError("num_assets: expected at least one asset (num_assets + heldout >= 1), got 0")
    textures = textures or TextureOptions()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": seed,
        "heldout_seed": seed + HELDOUT_SEED_OFFSET,
        "image_size": image_size,
        "num_views": num_views,
        "num_cond_views": num_cond_views,
        "cond_image_size": cond_image_size,
        "voxel_resolution": voxel_resolution,
        "max_steps": max_steps,
        "textures": textures.changed(),
    }
    record_path = root / DATASET_RECORD
    record = read_record(record_path)
    fix = f"pass --overwrite to render every asset again, or use another --out folder than {root}"
    if not overwrite:
        if record is not None:
            check_settings(record.get("settings", {}), settings, where=f"the dataset {root}", fix=fix)
        elif (root / "metadata.csv").exists():
            raise ValueError(
                f"root: {root} holds a dataset without {DATASET_RECORD} (made by another tool or an older "
                f"version), so its settings are unknown; {fix}"
            )
    jobs = [(seed, index, "train") for index in range(num_assets)]
    jobs += [(seed + HELDOUT_SEED_OFFSET, index, "heldout") for index in range(heldout)]
    command = _command(root, num_assets, heldout, settings)
    record = {
        "complete": False,
        "generator": "recipes/flux3d/procedural.py",
        "command": command,
        "counts": {"train": num_assets, "heldout": heldout},
        "seeds": {"train": seed, "heldout": seed + HELDOUT_SEED_OFFSET},
        "settings": settings,
        "done": 0,
        "total": len(jobs),
    }
    write_record(record_path, record)
    task = functools.partial(
        _generate_job,
        root,
        dict(
            image_size=image_size,
            num_views=num_views,
            num_cond_views=num_cond_views,
            cond_image_size=cond_image_size,
            voxel_resolution=voxel_resolution,
            max_steps=max_steps,
            textures=textures,
            resume=not overwrite,
        ),
    )
    bar = tqdm(total=len(jobs), desc="assets", disable=not progress)
    rows = []

    def finished(row: dict[str, object]) -> None:
        rows.append(row)
        bar.update()
        write_record(record_path, record | {"done": len(rows)})

    if workers == 1:
        for job in jobs:
            finished(task(job))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for row in pool.imap(task, jobs):
                finished(row)
    bar.close()
    train_ids = {row["sha256"] for row in rows if row["split"] == "train"}
    overlap = [row["sha256"] for row in rows if row["split"] == "heldout" and row["sha256"] in train_ids]
    if overlap:  # different seed streams: only a sha256 collision could do this
        raise RuntimeError(f"heldout: assets {overlap} are both training and held-out assets")
    write_metadata(root, rows)
    write_record(record_path, record | {"done": len(rows), "complete": True})
    return rows


def _generate_job(root: Path, options: dict, job: tuple[int, int, str]) -> dict[str, object]:
    seed, index, split = job
    return generate_asset(root, seed, index, split=split, **options)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python recipes/flux3d/procedural.py --out DIR --num-assets N --heldout H ...``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--num-assets", type=int, default=100, help="training assets")
    parser.add_argument(
        "--heldout", type=int, default=0, help="held-out assets, from a seed stream disjoint from training's"
    )
    parser.add_argument("--resolution", type=int, default=128, help="render side in pixels")
    parser.add_argument("--views", type=int, default=24, help="Hammersley views per asset")
    parser.add_argument("--cond-views", type=int, default=4, help="condition views per asset")
    parser.add_argument(
        "--cond-resolution", type=int, default=None, help="condition render side; None: --resolution"
    )
    parser.add_argument("--voxel-resolution", type=int, default=64, help="voxel grid resolution")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--max-steps", type=int, default=96, help="sphere-tracing steps per ray")
    parser.add_argument(
        "--textures",
        type=lambda text: tuple(text.split(",")),
        default=",".join(TEXTURES),
        help=f"comma-separated texture kinds drawn from, of {','.join(TEXTURES)}",
    )
    parser.add_argument(
        "--texture-cells",
        type=_int_list,
        default=",".join(str(c) for c in TextureOptions().cells),
        help="comma-separated checker cells / stripe periods per texture tile (one drawn per texture)",
    )
    parser.add_argument(
        "--texture-colours", type=int, default=2, help="colours of each checker or stripe pattern"
    )
    parser.add_argument("--texture-size", type=int, default=128, help="texture image side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes, each single-threaded")
    parser.add_argument("--threads", type=int, default=1, help="torch threads when --workers 1")
    parser.add_argument(
        "--overwrite", action="store_true", help="render every asset again, also over other settings"
    )
    args = parser.parse_args(argv)
    try:
        textures = TextureOptions(
            kinds=args.textures,
            cells=args.texture_cells,
            colours=args.texture_colours,
            size=args.texture_size,
        )
    except ValueError as error:
        flags = {"kinds": "--textures", "cells": "--texture-cells", "colours": "--texture-colours"}
        name = str(error).split(":")[0]
        parser.error(f"{flags.get(name, '--texture-size')}: {str(error).split(': ', 1)[1]}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = generate_dataset(
        args.out,
        args.num_assets,
        heldout=args.heldout,
        seed=args.seed,
        image_size=args.resolution,
        num_views=args.views,
        num_cond_views=args.cond_views,
        cond_image_size=args.cond_resolution,
        voxel_resolution=args.voxel_resolution,
        max_steps=args.max_steps,
        textures=textures,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    heldout = sum(row["split"] == "heldout" for row in rows)
    print(
        f"wrote {len(rows) - heldout} training and {heldout} held-out assets to {args.out} "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
