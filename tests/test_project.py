"""Tests of sparse3d.geometry.project: projection, sampling conventions, view averaging, depth test."""

from __future__ import annotations

import math
import resource

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.geometry import (
    intrinsics_from_fov,
    look_at,
    project_features,
    project_points,
    reparameterize,
    sample_latent,
    scale_intrinsics,
    sphere_cameras,
    sphere_hammersley,
    split_mean_std,
    voxel_centers,
)


def _cameras(num_views: int, seed: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    offset = torch.rand(2, generator=generator).tolist()
    yaw, pitch = sphere_hammersley(num_views, offset=offset)
    # Close enough that parts of the cube fall outside the frame.
    return sphere_cameras(yaw, pitch, radius=1.3, fov=math.radians(40), image_size=image_size)


def _random_coords(seed: int, resolution: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(resolution**3, generator=generator)[:count].sort().values
    return torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], 1).int()


def _project_numpy(points: np.ndarray, viewmat: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, ...]:
    camera = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    u = K[0, 0] * camera[:, 0] / camera[:, 2] + K[0, 1] * camera[:, 1] / camera[:, 2] + K[0, 2]
    v = K[1, 1] * camera[:, 1] / camera[:, 2] + K[1, 2]
    return u, v, camera[:, 2]


def _bilinear_border(feature: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples ``feature [C, h, w]`` at continuous cell coordinates (cell centres at integers), clamped."""
    _, h, w = feature.shape
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx, wy = x - x0, y - y0
    return (
        feature[:, y0, x0] * (1 - wx) * (1 - wy)
        + feature[:, y0, x1] * wx * (1 - wy)
        + feature[:, y1, x0] * (1 - wx) * wy
        + feature[:, y1, x1] * wx * wy
    ).T  # [N, C]


def _reference(coords, resolution, viewmats, Ks, size, mean_maps, std_maps, std_reduce):
    """Per-view loop in float64 numpy: the definition of project_features without depth maps."""
    width, height = size
    points = voxel_centers(coords, resolution, torch.float64).numpy()
    total = np.zeros((points.shape[0], mean_maps.shape[1]))
    total_std = np.zeros_like(total)
    count = np.zeros(points.shape[0], dtype=np.int64)
    for view in range(viewmats.shape[0]):
        u, v, depth = _project_numpy(points, viewmats[view].double().numpy(), Ks[view].double().numpy())
        inside = (depth > 1e-6) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
        h, w = mean_maps.shape[2:]
        x, y = u * w / width - 0.5, v * h / height - 0.5
        total[inside] += _bilinear_border(mean_maps[view].double().numpy(), x, y)[inside]
        sampled_std = _bilinear_border(std_maps[view].double().numpy(), x, y)[inside]
        total_std[inside] += sampled_std**2 if std_reduce == "rms" else sampled_std
        count += inside
    denominator = np.maximum(count, 1)[:, None]
    std = total_std / denominator
    return total / denominator, np.sqrt(std) if std_reduce == "rms" else std, count


def test_project_points_matches_the_pinhole_formula() -> None:
    viewmats, Ks = _cameras(7, 0, (64, 48))
    points = torch.rand(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    pixels, depth = project_points(points, viewmats.double(), Ks.double())
    for view in range(7):
        u, v, z = _project_numpy(points.numpy(), viewmats[view].double().numpy(), Ks[view].double().numpy())
        np.testing.assert_allclose(pixels[view, :, 0].numpy(), u, rtol=1e-6)
        np.testing.assert_allclose(pixels[view, :, 1].numpy(), v, rtol=1e-6)
        np.testing.assert_allclose(depth[view].numpy(), z, rtol=1e-6)


@given(seed=st.integers(0, 2**31 - 1))
def test_sampling_an_analytic_map_gives_the_function_at_the_projection(seed: int) -> None:
    """A map holding f(X, Y) = a + bX + cY + dXY at its cell centres (image pixel coordinates, stride 8)
    returns f at the analytically projected (u, v), clamped to the outermost cell centres."""
    width, height, stride = 64, 48, 8
    h, w = height // stride, width // stride
    rng = np.random.default_rng(seed)
    a, b, c, d = rng.normal(size=4)
    centre_x = (np.arange(w) + 0.5) * stride  # image coordinate of each cell centre
    centre_y = (np.arange(h) + 0.5) * stride
    grid_x, grid_y = np.meshgrid(centre_x, centre_y)  # [h, w]
    feature = a + b * grid_x + c * grid_y + d * grid_x * grid_y
    mean_maps = torch.from_numpy(np.stack([feature, -2 * feature])[None]).float()  # [1, 2, h, w]
    coords = _random_coords(seed, 16, 300)
    viewmats, Ks = _cameras(5, seed, (width, height))
    points = voxel_centers(coords, 16, torch.float64).numpy()
    for view in range(5):
        out = project_features(
            coords, 16, viewmats[view : view + 1], Ks[view : view + 1], (width, height), mean_maps
        )
        u, v, depth = _project_numpy(points, viewmats[view].double().numpy(), Ks[view].double().numpy())
        inside = (depth > 0) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
        assert inside.any() and (~inside).any()
        np.testing.assert_array_equal(out.num_views.numpy(), inside.astype(np.int64))
        uc = np.clip(u, centre_x[0], centre_x[-1])
        vc = np.clip(v, centre_y[0], centre_y[-1])
        expected = a + b * uc + c * vc + d * uc * vc
        scale = np.abs(feature).max()
        np.testing.assert_allclose(out.mean[inside, 0].numpy(), expected[inside], atol=2e-4 * scale)
        np.testing.assert_allclose(out.mean[inside, 1].numpy(), -2 * expected[inside], atol=4e-4 * scale)
        assert not out.mean[~inside].any()


@pytest.mark.parametrize("std_reduce", ["mean", "rms"])
def test_average_over_views_matches_per_view_loop(std_reduce: str) -> None:
    width, height = 40, 32
    generator = torch.Generator().manual_seed(3)
    mean_maps = torch.randn(9, 3, 4, 5, generator=generator)
    std_maps = torch.rand(9, 3, 4, 5, generator=generator)
    coords = _random_coords(4, 12, 400)
    viewmats, Ks = _cameras(9, 5, (width, height))
    out = project_features(
        coords,
        12,
        viewmats,
        Ks,
        (width, height),
        mean_maps,
        std_maps,
        std_reduce=std_reduce,
        views_per_chunk=4,
    )
    mean, std, count = _reference(coords, 12, viewmats, Ks, (width, height), mean_maps, std_maps, std_reduce)
    assert 0 < count.min() < count.max() == 9  # some voxels leave the frame in some views
    np.testing.assert_array_equal(out.num_views.numpy(), count)
    np.testing.assert_allclose(out.mean.numpy(), mean, atol=1e-4)
    np.testing.assert_allclose(out.std.numpy(), std, atol=1e-4)

    # Normalised TRELLIS intrinsics with image_size 1 are the same cameras.
    normalised = scale_intrinsics(Ks, 1 / width, 1 / height)
    again = project_features(coords, 12, viewmats, normalised, 1, mean_maps, std_maps, std_reduce=std_reduce)
    torch.testing.assert_close(again.mean, out.mean, atol=1e-5, rtol=0)
    assert torch.equal(again.num_views, out.num_views)


def _two_planes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two equal squares of voxels at z = +-0.203 and two cameras on the z axis, with rendered depth."""
    size = 64
    ij = torch.stack(torch.meshgrid(torch.arange(8, 24), torch.arange(8, 24), indexing="ij"), -1).reshape(
        -1, 2
    )
    front = torch.cat([ij, torch.full((ij.shape[0], 1), 22)], 1)  # centre z = 0.203125
    back = torch.cat([ij, torch.full((ij.shape[0], 1), 9)], 1)  # centre z = -0.203125
    coords = torch.cat([back, front]).int()
    viewmats = look_at(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -2.0]]))
    K = intrinsics_from_fov(math.radians(40), size, size)
    Ks = K.expand(2, 3, 3).clone()
    # Ray-cast both squares (|x|, |y| <= 0.25, the voxels' extent) through every pixel centre.
    pixel = torch.arange(size, dtype=torch.float64) + 0.5
    ray_x = ((pixel - K[0, 2]) / K[0, 0])[None, :].expand(size, size)
    ray_y = ((pixel - K[1, 2]) / K[1, 1])[:, None].expand(size, size)
    depth = torch.full((size, size), math.inf, dtype=torch.float64)
    for plane_depth in (2.0 + 0.203125, 2.0 - 0.203125):  # back first, front overwrites
        hit = ((ray_x * plane_depth).abs() <= 0.25) & ((ray_y * plane_depth).abs() <= 0.25)
        depth = torch.where(hit, torch.full_like(depth, plane_depth), depth)
    depth_maps = torch.stack([depth, depth]).float()  # the scene is symmetric under z -> -z
    mean_maps = torch.stack([torch.full((2, 8, 8), 1.0), torch.full((2, 8, 8), 3.0)])  # view 0: 1, view 1: 3
    return coords, viewmats, Ks, depth_maps, mean_maps


def test_depth_test_masks_the_hidden_plane() -> None:
    coords, viewmats, Ks, depth_maps, mean_maps = _two_planes()
    back = coords[:, 2] == 9
    seen = project_features(
        coords, 32, viewmats, Ks, 64, mean_maps, depth_maps=depth_maps, depth_tolerance=0.05
    )
    assert torch.equal(seen.num_views, torch.ones(coords.shape[0], dtype=torch.int64))
    torch.testing.assert_close(seen.mean[~back], torch.full((int((~back).sum()), 2), 1.0))  # only view 0
    torch.testing.assert_close(seen.mean[back], torch.full((int(back.sum()), 2), 3.0))  # only view 1
    blind = project_features(coords, 32, viewmats, Ks, 64, mean_maps)
    assert torch.equal(blind.num_views, torch.full((coords.shape[0],), 2))
    torch.testing.assert_close(blind.mean, torch.full((coords.shape[0], 2), 2.0))


@pytest.mark.parametrize("views_per_chunk", [1, 2, 3, 7])
def test_chunked_equals_unchunked_bitwise(views_per_chunk: int) -> None:
    generator = torch.Generator().manual_seed(7)
    mean_maps = torch.randn(7, 4, 6, 6, generator=generator)
    std_maps = torch.rand(7, 4, 6, 6, generator=generator)
    coords = _random_coords(8, 16, 500)
    viewmats, Ks = _cameras(7, 9, (48, 48))
    depth_maps = 1.0 + torch.rand(7, 48, 48, generator=generator)
    kwargs = {"std_maps": std_maps, "depth_maps": depth_maps, "depth_tolerance": 0.1}
    whole = project_features(coords, 16, viewmats, Ks, 48, mean_maps, views_per_chunk=7, **kwargs)
    chunked = project_features(
        coords, 16, viewmats, Ks, 48, mean_maps, views_per_chunk=views_per_chunk, **kwargs
    )
    blind = project_features(coords, 16, viewmats, Ks, 48, mean_maps)
    assert bool((whole.num_views < blind.num_views).any()) and bool((whole.num_views > 0).any())
    assert torch.equal(whole.mean, chunked.mean)
    assert torch.equal(whole.std, chunked.std)
    assert torch.equal(whole.num_views, chunked.num_views)


def test_volume_and_sampling_mu_plus_sigma_eps() -> None:
    generator = torch.Generator().manual_seed(11)
    coords = _random_coords(12, 8, 40)
    viewmats, Ks = _cameras(3, 13, (32, 32))
    mean_maps = torch.randn(3, 5, 4, 4, generator=generator)
    std_maps = torch.rand(3, 5, 4, 4, generator=generator)
    features = project_features(coords, 8, viewmats, Ks, 32, mean_maps, std_maps)
    volume = features.to_sparse_tensor()
    assert volume.batch_size == 1 and volume.spatial_shape == (8, 8, 8)
    assert torch.equal(volume.coords[:, 1:], coords) and volume.feats.shape == (40, 10)
    mean, std = split_mean_std(volume)
    assert torch.equal(mean, features.mean) and torch.equal(std, features.std)

    drawn = sample_latent(volume, torch.Generator().manual_seed(5))
    eps = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn.feats, features.mean + features.std * eps)
    assert drawn.same_layout(volume)
    again = sample_latent(volume, torch.Generator().manual_seed(5))
    assert torch.equal(drawn.feats, again.feats)
    other = sample_latent(volume, torch.Generator().manual_seed(6))
    assert not torch.equal(drawn.feats, other.feats)
    torch.testing.assert_close(reparameterize(mean, torch.zeros_like(std)), mean)
    with pytest.raises(ValueError, match="std"):
        reparameterize(mean, std[:, :2])


def test_bad_inputs_raise() -> None:
    coords = _random_coords(0, 8, 10)
    viewmats, Ks = _cameras(2, 0, (16, 16))
    with pytest.raises(ValueError, match="mean_maps"):
        project_features(coords, 8, viewmats, Ks, 16, torch.zeros(3, 2, 4, 4))
    with pytest.raises(ValueError, match="std_maps"):
        project_features(coords, 8, viewmats, Ks, 16, torch.zeros(2, 2, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="depth_maps"):
        project_features(coords, 8, viewmats, Ks, 16, torch.zeros(2, 2, 4, 4), depth_maps=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="coords"):
        project_features(coords.float(), 8, viewmats, Ks, 16, torch.zeros(2, 2, 4, 4))


@pytest.mark.slow
def test_150_views_of_a_full_64_grid_fit_in_memory() -> None:
    """150 views x 64^3 voxels x 16 channels (mean and std) on CPU, default chunking: < 2 GB extra RSS."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3).int()
    viewmats, Ks = _cameras(150, 0, (512, 512))
    maps = torch.rand(150, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = project_features(coords, 64, viewmats, Ks, 512, maps, maps)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 2.0
    assert out.mean.shape == (64**3, 16) and int(out.num_views.max()) <= 150


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(21)
    coords = _random_coords(22, 32, 5000)
    viewmats, Ks = _cameras(24, 23, (128, 128))
    mean_maps = torch.randn(24, 16, 16, 16, generator=generator)
    std_maps = torch.rand(24, 16, 16, 16, generator=generator)
    depth_maps = 1.0 + torch.rand(24, 128, 128, generator=generator)
    cpu = project_features(coords, 32, viewmats, Ks, 128, mean_maps, std_maps, depth_maps=depth_maps)
    gpu = project_features(
        coords.cuda(),
        32,
        viewmats.cuda(),
        Ks.cuda(),
        128,
        mean_maps.cuda(),
        std_maps.cuda(),
        depth_maps=depth_maps.cuda(),
    )
    assert gpu.mean.is_cuda
    # Projection rounding can flip a point sitting on a depth or frame boundary; allow a handful.
    agree = gpu.num_views.cpu() == cpu.num_views
    assert float(agree.float().mean()) > 0.999
    torch.testing.assert_close(gpu.mean.cpu()[agree], cpu.mean[agree], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.std.cpu()[agree], cpu.std[agree], atol=1e-4, rtol=1e-4)
