"""Save and load Gaussians as the standard INRIA 3DGS PLY (binary little-endian, raw parameters)."""

from __future__ import annotations

import os

import numpy as np
import torch

from sparse3d.gaussians.container import Gaussians
from sparse3d.gaussians.sh import num_sh_bases, sh_degree_from_bases

__all__ = ["load_ply", "ply_property_names", "save_ply"]

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def ply_property_names(sh_degree: int, *, normals: bool = True) -> list[str]:
    """Vertex property names of a 3DGS PLY, in file order.

    ``x y z [nx ny nz] f_dc_0..2 f_rest_0..M-1 opacity scale_0..2 rot_0..3`` with
    ``M = 3 ((sh_degree + 1)^2 - 1)``; ``f_rest`` is channel-major (all red coefficients first).

    Args:
        sh_degree: SH degree in ``[0, 3]``.
        normals: Include the (all-zero) ``nx ny nz`` fields, as the INRIA code writes them.

    Returns:
        The property names.
    """
    rest = 3 * (num_sh_bases(sh_degree) - 1)
    names = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else [])
    names += [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(rest)]
    names += ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    return names


def save_ply(path: str | os.PathLike[str], gaussians: Gaussians, *, normals: bool = True) -> None:
    """Writes one sample as a 3DGS PLY that common viewers (SuperSplat, antimatter15/splat, INRIA) open.

    Stored values are the raw parameters: ``opacity = logit(o)``, ``scale_i = log(s_i)``, ``rot`` the
    quaternion ``(w, x, y, z)`` as given, ``f_dc`` the SH DC coefficients and ``f_rest`` the higher
    ones, channel-major. All properties are ``float`` (float32), binary little-endian. The scene is
    written in this library's world frame (no axis change).

    Args:
        path: Output file.
        gaussians: One sample (``batch_size == 1``); any float dtype/device.
        normals: Write zero ``nx ny nz`` fields.
    """
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"gaussians must be Gaussians, got {type(gaussians).__name__}")
    if gaussians.batch_size != 1:
        raise ValueError(f"save_ply writes one sample, got batch_size={gaussians.batch_size}; use .sample(i)")
    g = gaussians.detach().to(device="cpu", dtype=torch.float64)
    count = g.num_gaussians
    rest = g.sh[:, 1:, :].transpose(1, 2).reshape(count, -1)  # [N, 3 * (K - 1)] channel-major
    opacity_logit = torch.log(g.opacities) - torch.log1p(-g.opacities)
    columns = [g.means]
    if normals:
        columns.append(torch.zeros(count, 3, dtype=torch.float64))
    columns += [g.sh[:, 0, :], rest, opacity_logit[:, None], torch.log(g.scales), g.quats]
    values = torch.cat(columns, dim=1).numpy().astype("<f4")  # [N, P]
    names = ply_property_names(g.sh_degree, normals=normals)
    assert values.shape[1] == len(names)
    records = np.empty(count, dtype=[(name, "<f4") for name in names])
    for index, name in enumerate(names):
        records[name] = values[:, index]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(records.tobytes())


def _invalid(path: str | os.PathLike[str], problem: str) -> ValueError:
    """The error for a file that is not a readable 3DGS PLY, naming the file."""
    return ValueError(f"path: expected a binary 3DGS PLY file, got {os.fspath(path)!r}: {problem}")


def _parse_header(
    handle, path: str | os.PathLike[str]
) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    if handle.readline().strip() != b"ply":
        raise _invalid(path, "not a PLY file (the first line must be 'ply')")
    file_format, elements = None, []
    while True:
        raw = handle.readline()
        if not raw:
            raise _invalid(path, "the header has no 'end_header' line")
        words = raw.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            return file_format, elements, handle.tell()
        if words[0] == "format" and len(words) >= 2:
            file_format = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and len(words) >= 3:
            if not elements:
                raise _invalid(path, f"property {words[-1]!r} comes before any element")
            if words[1] == "list":
                raise _invalid(
                    path, f"list property {words[-1]!r} in element {elements[-1][0]!r} is not supported"
                )
            if words[1] not in _PLY_TYPES:
                raise _invalid(path, f"property {words[2]!r} has unknown type {words[1]!r}")
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        else:
            raise _invalid(path, f"unexpected header line {raw!r}")


def load_ply(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
) -> Gaussians:
    """Reads a 3DGS PLY written by [`save_ply`][sparse3d.gaussians.io.save_ply], INRIA 3DGS or gsplat.

    Activates the raw parameters (``sigmoid`` opacity, ``exp`` scale); quaternions are returned as
    stored. Normals are optional. Property types ``float``/``double`` (and integer types) are
    accepted, in little- or big-endian binary.

    Args:
        path: PLY file.
        device: Device of the returned tensors (default CPU).
        dtype: Float dtype of the returned tensors.
        strict: Raise on vertex properties other than the 3DGS ones and on elements other than
            ``vertex`` (if ``False`` they are ignored).

    Returns:
        Gaussians with ``batch_size == 1``.

    Raises:
        ValueError: The file is not a binary 3DGS PLY (malformed header, ASCII format, missing or, with
            ``strict``, extra properties or elements, truncated data); the message names the file.
    """
    with open(path, "rb") as handle:
        file_format, elements, start = _parse_header(handle, path)
        data = handle.read()
    if file_format not in ("binary_little_endian", "binary_big_endian"):
        raise _invalid(path, f"only binary PLY files are supported, got format {file_format!r}")
    if not elements or elements[0][0] != "vertex":
        raise _invalid(path, f"the first element must be 'vertex', got {[e[0] for e in elements]}")
    if strict and len(elements) > 1:
        raise _invalid(path, f"elements {[e[0] for e in elements[1:]]} besides 'vertex' (pass strict=False)")
    _, count, properties = elements[0]
    order = "<" if file_format == "binary_little_endian" else ">"
    record = np.dtype([(name, order + code) for name, code in properties])
    if len(data) < count * record.itemsize:
        raise _invalid(
            path, f"the data holds {len(data)} bytes, expected {count * record.itemsize} for {count} vertices"
        )
    rows = np.frombuffer(data, dtype=record, count=count)
    names = [name for name, _ in properties]
    rest_names = [name for name in names if name.startswith("f_rest_")]
    try:
        degree = sh_degree_from_bases(len(rest_names) // 3 + 1)
    except ValueError:
        degree = -1
    if degree < 0 or len(rest_names) % 3:
        raise _invalid(path, f"{len(rest_names)} f_rest fields, expected 0, 9, 24 or 45")
    with_normals = "nx" in names
    expected = ply_property_names(degree, normals=with_normals)
    missing = [name for name in expected if name not in names]
    if missing:
        raise _invalid(path, f"the vertex element lacks 3DGS properties {missing}")
    extra = [name for name in names if name not in expected]
    if strict and extra:
        raise _invalid(
            path, f"the vertex element has non-3DGS properties {extra} (pass strict=False to ignore)"
        )

    def column(*fields: str) -> torch.Tensor:
        stacked = np.stack([rows[name].astype(np.float64) for name in fields], axis=-1)
        return torch.from_numpy(stacked)  # [N, len(fields)] float64

    means = column("x", "y", "z")
    dc = column("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :]  # [N, 1, 3]
    if rest_names:
        rest = column(*[f"f_rest_{i}" for i in range(len(rest_names))])
        rest = rest.reshape(count, 3, -1).transpose(1, 2)  # [N, K - 1, 3]
    else:
        rest = torch.zeros(count, 0, 3, dtype=torch.float64)
    opacities = torch.sigmoid(column("opacity")[:, 0])
    scales = torch.exp(column("scale_0", "scale_1", "scale_2"))
    quats = column("rot_0", "rot_1", "rot_2", "rot_3")
    fields = [means, quats, scales, opacities, torch.cat([dc, rest], dim=1)]
    fields = [value.to(device=device, dtype=dtype) for value in fields]
    return Gaussians(*fields, check=False)
