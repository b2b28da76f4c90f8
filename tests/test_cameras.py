"""Tests of sparse3d.geometry.cameras: sampling, look-at, intrinsics, Blender/TRELLIS conversion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.geometry import (
    focal_from_fov,
    fov_from_focal,
    fov_from_intrinsics,
    from_blender_c2w,
    hammersley_sequence,
    intrinsics_from_fov,
    look_at,
    orbit_angles,
    read_transforms,
    scale_intrinsics,
    sphere_cameras,
    sphere_hammersley,
    spherical_to_cartesian,
    to_blender_c2w,
    write_transforms,
)


def _blender_track_to(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Reference camera-to-world of Blender's TRACK_TO (track -Z, up Y) with world Z up, in numpy."""
    back = eye - target
    back /= np.linalg.norm(back)  # camera +z points away from the target
    right = np.cross(np.array([0.0, 0.0, 1.0]), back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, eye
    return c2w


def _project(viewmat: np.ndarray, K: np.ndarray, point: np.ndarray) -> tuple[float, float, float]:
    camera = viewmat[:3, :3] @ point + viewmat[:3, 3]
    return K[0, 0] * camera[0] / camera[2] + K[0, 2], K[1, 1] * camera[1] / camera[2] + K[1, 2], camera[2]


def test_hammersley_sequence_known_values() -> None:
    uv = hammersley_sequence(4)
    assert uv[:, 0].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert uv[:, 1].tolist() == [0.0, 0.5, 0.25, 0.75]  # base-2 radical inverse of 0, 1, 2, 3


@pytest.mark.parametrize("num_points", [24, 150])
def test_sphere_hammersley_unit_and_well_spread(num_points: int) -> None:
    yaw, pitch = sphere_hammersley(num_points, offset=(0.37, 0.81), dtype=torch.float64)
    points = spherical_to_cartesian(yaw, pitch)
    torch.testing.assert_close(points.norm(dim=1), torch.ones(num_points, dtype=torch.float64))
    # Equal-area in height: z values are exactly (2 (i + o) / n - 1).
    expected_z = 2 * (torch.arange(num_points, dtype=torch.float64) + 0.37) / num_points - 1
    torch.testing.assert_close(points[:, 2], expected_z)
    assert points.mean(dim=0).norm() < 0.1
    min_pair, covering, discrepancy = _spread(points)
    assert min_pair > 0.15 and covering < 1.0 and discrepancy < 0.6 / math.sqrt(num_points)


def _spread(points: torch.Tensor) -> tuple[float, float, float]:
    """(closest pair, covering radius) in units of the mean spacing ``sqrt(4 pi / n)``, and the worst
    difference between the fraction of points in a random spherical cap and the cap's area fraction."""
    spacing = math.sqrt(4 * math.pi / points.shape[0])
    cos = (points @ points.T).fill_diagonal_(-1)
    min_pair = float(torch.acos(cos.max().clamp(max=1))) / spacing
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(4000, 3, dtype=torch.float64, generator=generator)
    probes = probes / probes.norm(dim=1, keepdim=True)
    covering = float(torch.acos((probes @ points.T).amax(dim=1).clamp(max=1)).max()) / spacing
    heights = torch.rand(4000, 1, dtype=torch.float64, generator=generator) * 2 - 1
    inside = ((probes @ points.T) >= heights).double().mean(dim=1)
    discrepancy = float((inside - (1 - heights[:, 0]) / 2).abs().max())
    return min_pair, covering, discrepancy


@pytest.mark.parametrize("num_points", [24, 150])
def test_random_points_fail_the_spread_check(num_points: int) -> None:
    """The covering and cap-discrepancy thresholds above reject independent uniform points."""
    for seed in range(3):
        points = torch.randn(
            num_points, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        min_pair, covering, discrepancy = _spread(points / points.norm(dim=1, keepdim=True))
        assert covering >= 1.0 and discrepancy >= 0.6 / math.sqrt(num_points)


def test_orbit_angles() -> None:
    yaw, pitch = orbit_angles(4, pitch=0.5, start_yaw=0.1, dtype=torch.float64)
    torch.testing.assert_close(yaw, 0.1 + torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64) * math.pi)
    assert pitch.tolist() == [0.5] * 4


@given(seed=st.integers(0, 2**31 - 1))
def test_look_at_is_a_rigid_opencv_camera(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    eye = torch.randn(5, 3, dtype=torch.float64, generator=generator) * 2
    target = torch.randn(3, dtype=torch.float64, generator=generator) * 0.2
    viewmats = look_at(eye, target)
    rotation = viewmats[:, :3, :3]
    torch.testing.assert_close(
        rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    )
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(5, dtype=torch.float64))
    homogeneous = torch.cat([eye, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(
        (viewmats @ homogeneous[:, :, None])[:, :3, 0], torch.zeros(5, 3, dtype=torch.float64)
    )
    in_camera = rotation @ target + viewmats[:, :3, 3]  # [5, 3]: the target lies on the optical axis ahead
    torch.testing.assert_close(in_camera[:, :2], torch.zeros(5, 2, dtype=torch.float64))
    torch.testing.assert_close(in_camera[:, 2], (target - eye).norm(dim=1))
    # World up projects upwards in the image (negative camera y).
    assert bool((rotation[:, 1, 2] < 0).all() | (rotation[:, 1, 2].abs() < 1e-12).all())
    # Matches Blender's TRACK_TO camera converted to OpenCV.
    for i in range(5):
        reference = _blender_track_to(eye[i].numpy(), target.numpy())
        torch.testing.assert_close(to_blender_c2w(viewmats[i]), torch.from_numpy(reference))


def test_look_at_straight_down_is_finite() -> None:
    viewmats = look_at(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -2.0]]))
    assert torch.isfinite(viewmats).all()
    rotation = viewmats[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(rotation[:, 2], torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]))


def test_fov_intrinsics_round_trip() -> None:
    fov = torch.tensor([0.2, math.radians(40), 1.3], dtype=torch.float64)
    Ks = intrinsics_from_fov(fov, 640, 480, fov_y=fov * 0.8, dtype=torch.float64)
    fov_x, fov_y = fov_from_intrinsics(Ks, 640, 480)
    torch.testing.assert_close(fov_x, fov)
    torch.testing.assert_close(fov_y, fov * 0.8)
    torch.testing.assert_close(Ks[:, 0, 0], 320 / torch.tan(fov / 2))
    assert Ks[0, 0, 2] == 320 and Ks[0, 1, 2] == 240
    assert fov_from_focal(focal_from_fov(0.7, 512), 512) == pytest.approx(0.7)
    # TRELLIS's normalised intrinsics are those of a 1 x 1 image; scaling gives pixels.
    normalised = intrinsics_from_fov(math.radians(40), 1, 1, dtype=torch.float64)
    assert normalised[0, 0] == pytest.approx(0.5 / math.tan(math.radians(20)))
    assert normalised[0, 2] == 0.5
    torch.testing.assert_close(
        scale_intrinsics(normalised, 512),
        intrinsics_from_fov(math.radians(40), 512, 512, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="fov_x"):
        intrinsics_from_fov(4.0, 10, 10)


@given(seed=st.integers(0, 2**31 - 1))
def test_blender_round_trip(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    yaw = torch.rand(6, dtype=torch.float64, generator=generator) * 2 * math.pi
    pitch = (torch.rand(6, dtype=torch.float64, generator=generator) - 0.5) * 3
    eye = spherical_to_cartesian(yaw, pitch, 2.0)
    c2w = torch.from_numpy(np.stack([_blender_track_to(e, np.zeros(3)) for e in eye.numpy()]))
    viewmats = from_blender_c2w(c2w)
    torch.testing.assert_close(to_blender_c2w(viewmats), c2w)
    torch.testing.assert_close(from_blender_c2w(to_blender_c2w(viewmats)), viewmats)
    torch.testing.assert_close(viewmats, look_at(eye))


def test_known_camera_on_plus_z() -> None:
    """A Blender camera at (0, 0, 2) with identity rotation looks down -Z at the origin (x right, y up)."""
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[2, 3] = 2.0
    viewmat = from_blender_c2w(c2w).numpy()
    K = intrinsics_from_fov(math.radians(40), 512, 512, dtype=torch.float64).numpy()
    u, v, depth = _project(viewmat, K, np.zeros(3))
    assert (u, v, depth) == pytest.approx((256, 256, 2))
    u_right, v_right, _ = _project(viewmat, K, np.array([0.1, 0.0, 0.0]))
    assert u_right > 256 and v_right == pytest.approx(256)
    assert u_right == pytest.approx(256 + K[0, 0] * 0.1 / 2)
    u_up, v_up, _ = _project(viewmat, K, np.array([0.0, 0.1, 0.0]))
    assert v_up < 256 and u_up == pytest.approx(256)  # Blender +Y is up in this image, image v grows down
    _, _, depth_near = _project(viewmat, K, np.array([0.0, 0.0, 0.5]))
    assert depth_near == pytest.approx(1.5)


def test_read_write_transforms(tmp_path) -> None:
    yaw, pitch = sphere_hammersley(5, offset=(0.2, 0.4), dtype=torch.float64)
    eye = spherical_to_cartesian(yaw, pitch, 2.0)
    frames = [
        {
            "file_path": f"{i:03d}.png",
            "camera_angle_x": 0.6981317,
            "transform_matrix": _blender_track_to(e, np.zeros(3)).tolist(),
        }
        for i, e in enumerate(eye.numpy())
    ]
    path = tmp_path / "transforms.json"
    path.write_text(
        json.dumps(
            {"aabb": [[-0.5] * 3, [0.5] * 3], "scale": 0.7, "offset": [0.1, 0.2, 0.3], "frames": frames}
        )
    )
    cameras = read_transforms(path, image_size=512)
    assert len(cameras) == 5 and cameras.image_size == (512, 512)
    assert cameras.image_paths[3] == tmp_path / "003.png"
    assert cameras.scale == 0.7 and cameras.offset == (0.1, 0.2, 0.3)
    torch.testing.assert_close(cameras.viewmats, look_at(eye).float())
    torch.testing.assert_close(cameras.Ks[0], intrinsics_from_fov(0.6981317, 512, 512))
    normalised = read_transforms(path)
    torch.testing.assert_close(scale_intrinsics(normalised.Ks, 512), cameras.Ks)

    out = tmp_path / "again.json"
    write_transforms(out, cameras.viewmats, cameras.Ks, [p.name for p in cameras.image_paths], 512, scale=0.7)
    again = read_transforms(out, image_size=512)
    torch.testing.assert_close(again.viewmats, cameras.viewmats)
    torch.testing.assert_close(again.Ks, cameras.Ks)
    written = json.loads(out.read_text())
    assert written["frames"][2]["camera_angle_x"] == pytest.approx(0.6981317)
    np.testing.assert_allclose(
        written["frames"][2]["transform_matrix"], frames[2]["transform_matrix"], atol=1e-6
    )
    assert not list(tmp_path.glob(".*.tmp"))


def test_sphere_cameras_see_the_origin_at_the_centre() -> None:
    yaw, pitch = sphere_hammersley(10, dtype=torch.float64)
    viewmats, Ks = sphere_cameras(yaw, pitch, radius=2.0, fov=math.radians(40), image_size=(64, 32))
    for viewmat, K in zip(viewmats.numpy(), Ks.numpy(), strict=True):
        assert _project(viewmat, K, np.zeros(3)) == pytest.approx((32, 16, 2))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="offset"):
        hammersley_sequence(4, offset=(1.0, 0.0))
    with pytest.raises(ValueError, match="c2w"):
        from_blender_c2w(torch.eye(3))
    with pytest.raises(ValueError, match="eye and target"):
        look_at(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="Ks"):
        write_transforms("unused.json", torch.eye(4)[None], torch.eye(3)[None], ["a.png"], 8)
