"""Tests of 3DGS PLY files and turntable outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse3d.gaussians import Gaussians, load_ply, ply_property_names, render, save_grid, save_ply
from sparse3d.gaussians.sh import num_sh_bases
from sparse3d.gaussians.viz import save_gif, save_turntable, turntable_frames
from sparse3d.geometry.cameras import orbit_angles, sphere_cameras

FIELDS = ("means", "quats", "scales", "opacities", "sh")


def make(count: int, degree: int, seed: int = 0, dtype=torch.float32) -> Gaussians:
    generator = torch.Generator().manual_seed(seed)
    return Gaussians(
        (torch.rand(count, 3, generator=generator) - 0.5).to(dtype) * 0.8,
        torch.randn(count, 4, generator=generator).to(dtype),
        torch.exp(torch.rand(count, 3, generator=generator) * 2 - 5).to(dtype),
        (torch.rand(count, generator=generator) * 0.98 + 0.01).to(dtype),
        torch.randn(count, num_sh_bases(degree), 3, generator=generator).to(dtype) * 0.5,
    )


def read_header(path) -> list[str]:
    lines = []
    with open(path, "rb") as handle:
        while True:
            line = handle.readline()
            lines.append(line.decode("ascii").rstrip("\n"))
            if line == b"end_header\n":
                return lines


@pytest.mark.parametrize("degree", [0, 1, 3])
@pytest.mark.parametrize("normals", [True, False])
def test_ply_round_trip(tmp_path, degree, normals):
    gaussians = make(50, degree, seed=degree)
    path = tmp_path / "scene.ply"
    save_ply(path, gaussians, normals=normals)
    loaded = load_ply(path)
    assert loaded.batch_size == 1 and loaded.sh_degree == degree
    for name in ("means", "quats", "sh"):
        assert torch.equal(getattr(loaded, name), getattr(gaussians, name)), (
            name
        )  # stored verbatim in float32
    torch.testing.assert_close(loaded.scales, gaussians.scales, rtol=2e-6, atol=0)
    torch.testing.assert_close(loaded.opacities, gaussians.opacities, rtol=0, atol=2e-7)
    doubled = load_ply(path, dtype=torch.float64)
    assert doubled.dtype == torch.float64


def test_ply_layout_is_the_inria_one(tmp_path):
    gaussians = make(4, 3)
    path = tmp_path / "scene.ply"
    save_ply(path, gaussians)
    header = read_header(path)
    rest = [f"f_rest_{i}" for i in range(45)]
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *rest, "opacity"]
    names += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert header == ["ply", "format binary_little_endian 1.0", "element vertex 4"] + [
        f"property float {name}" for name in names
    ] + ["end_header"]
    assert ply_property_names(3) == names
    # raw values, read back independently with numpy
    data = path.read_bytes()[sum(len(line) + 1 for line in header) :]
    rows = np.frombuffer(data, dtype=np.dtype([(n, "<f4") for n in names]))
    assert len(data) == 4 * len(names) * 4
    g = gaussians
    np.testing.assert_array_equal(rows["nx"], 0)
    np.testing.assert_allclose(rows["opacity"], torch.log(g.opacities / (1 - g.opacities)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(rows["scale_1"], np.log(g.scales[:, 1].numpy()), rtol=1e-6)
    np.testing.assert_array_equal(rows["rot_0"], g.quats[:, 0].numpy())
    np.testing.assert_array_equal(rows["f_dc_2"], g.sh[:, 0, 2].numpy())
    # f_rest is channel-major: green coefficient of basis j (j >= 1) sits at 15 + (j - 1)
    np.testing.assert_array_equal(rows["f_rest_15"], g.sh[:, 1, 1].numpy())
    np.testing.assert_array_equal(rows["f_rest_44"], g.sh[:, 15, 2].numpy())


def test_load_accepts_double_big_endian_and_rejects_unknown(tmp_path):
    gaussians = make(3, 1)
    names = ply_property_names(1, normals=False)
    values = np.stack(
        [*gaussians.means.T, *gaussians.sh[:, 0].T, *gaussians.sh[:, 1:].transpose(1, 2).reshape(3, -1).T]
        + [torch.logit(gaussians.opacities), *torch.log(gaussians.scales).T, *gaussians.quats.T],
        axis=1,
    ).astype(">f8")
    header = ["ply", "format binary_big_endian 1.0", "comment made by hand", "element vertex 3"]
    header += [f"property double {n}" for n in names] + ["end_header"]
    path = tmp_path / "big.ply"
    path.write_bytes(("\n".join(header) + "\n").encode() + values.tobytes())
    loaded = load_ply(path, dtype=torch.float64)
    torch.testing.assert_close(loaded.means, gaussians.means.double())
    torch.testing.assert_close(loaded.sh, gaussians.sh.double())
    torch.testing.assert_close(loaded.opacities, gaussians.opacities.double(), rtol=1e-6, atol=1e-7)

    extra = ["ply", "format binary_little_endian 1.0", "element vertex 3"]
    extra += [f"property float {n}" for n in names + ["filter_3D"]] + ["end_header"]
    extra_path = tmp_path / "extra.ply"
    extra_values = np.concatenate([values.astype("<f4"), np.ones((3, 1), "<f4")], axis=1)
    extra_path.write_bytes(("\n".join(extra) + "\n").encode() + extra_values.tobytes())
    with pytest.raises(ValueError, match=r"non-3DGS properties \['filter_3D'\]"):
        load_ply(extra_path)
    torch.testing.assert_close(load_ply(extra_path, strict=False).means, gaussians.means)
    missing = tmp_path / "missing.ply"
    missing.write_bytes(
        b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\nend_header\n"
    )
    with pytest.raises(ValueError, match="lacks 3DGS properties"):
        load_ply(missing)
    ascii_file = tmp_path / "ascii.ply"
    ascii_file.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nend_header\n")
    with pytest.raises(ValueError, match="only binary PLY"):
        load_ply(ascii_file)
    with pytest.raises(ValueError, match="batch_size=2"):
        save_ply(tmp_path / "two.ply", Gaussians.concat([gaussians, gaussians]))


def test_turntable_frames_match_renders_and_files(tmp_path):
    from PIL import Image

    gaussians = make(30, 1)
    frames = turntable_frames(
        gaussians, num_views=3, image_size=(20, 16), background=(1, 1, 1), views_per_call=2
    )
    assert frames.shape == (3, 16, 20, 3) and frames.dtype == np.uint8
    yaw, pitch = orbit_angles(3, np.radians(20.0))
    viewmats, Ks = sphere_cameras(yaw, pitch, radius=2.0, fov=np.radians(40.0), image_size=(20, 16))
    expected = render(gaussians, viewmats, Ks, 20, 16, torch.ones(3), backend="torch").colors
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(frames, expected)
    assert frames.min() < 255  # something is visible

    save_gif(frames, tmp_path / "turn.gif", fps=10)
    with Image.open(tmp_path / "turn.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (20, 16)
    grid = save_grid(frames, tmp_path / "grid.png", columns=2)
    assert grid.shape == (32, 40, 3)
    np.testing.assert_array_equal(grid[16:, :20], frames[2])
    np.testing.assert_array_equal(grid[16:, 20:], 255)
    with Image.open(tmp_path / "grid.png") as png:
        np.testing.assert_array_equal(np.asarray(png), grid)
    written = save_turntable(gaussians, tmp_path / "t.png", num_views=2, image_size=12)
    assert written.shape == (2, 12, 12, 3)
    with pytest.raises(ValueError, match="must end in"):
        save_turntable(gaussians, tmp_path / "t.webm", num_views=2)


_VERTEX = "element vertex 1\n" + "".join(f"property float {name}\n" for name in ply_property_names(0))
_ROW = bytes(4 * len(ply_property_names(0)))


_BROKEN_FILES = [
    ("obj\n", b"", "not a PLY file"),
    ("ply\nformat binary_little_endian 1.0\n", b"", "no 'end_header' line"),
    ("ply\nformat binary_little_endian 1.0\nproperty float x\nend_header\n", b"", "before any element"),
    ("ply\nformat binary_little_endian 1.0\nelement vertex\nend_header\n", b"", "unexpected header line"),
    (
        "ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty half x\nend_header\n",
        b"",
        "type",
    ),
    (
        "ply\nformat binary_little_endian 1.0\nelement face 1\nproperty list uchar int v\nend_header\n",
        b"",
        "list property",
    ),
    ("ply\nformat ascii 1.0\n" + _VERTEX + "end_header\n", b"", "only binary PLY"),
    ("ply\nformat binary_little_endian 1.0\nelement face 0\nend_header\n", b"", "must be 'vertex'"),
    (
        "ply\nformat binary_little_endian 1.0\n" + _VERTEX + "element face 0\nend_header\n",
        _ROW,
        "besides 'vertex'",
    ),
    ("ply\nformat binary_little_endian 1.0\n" + _VERTEX + "end_header\n", _ROW[:-1], "bytes, expected"),
    (
        "ply\nformat binary_little_endian 1.0\n" + _VERTEX + "property float f_rest_0\nend_header\n",
        _ROW + bytes(4),
        "f_rest fields",
    ),
    (
        "ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\nend_header\n",
        b"",
        "lacks",
    ),
    (
        "ply\nformat binary_little_endian 1.0\n" + _VERTEX + "property float extra\nend_header\n",
        _ROW + bytes(4),
        "non-3DGS properties",
    ),
]


@pytest.mark.parametrize(
    ("header", "data", "problem"), [pytest.param(*case, id=case[2]) for case in _BROKEN_FILES]
)
def test_load_ply_errors_name_the_file(tmp_path, header, data, problem):
    path = tmp_path / "broken_asset.ply"
    path.write_bytes(header.encode("ascii") + data)
    with pytest.raises(
        ValueError, match=rf"path: expected a binary 3DGS PLY file, got '.*broken_asset.ply': .*{problem}"
    ):
        load_ply(path)
