"""Renderer tests: the torch reference against a brute-force per-pixel loop, gradients, gsplat on GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.gaussians import Gaussians, render, render_batch
from sparse3d.gaussians.rendering import rasterize_reference
from sparse3d.gaussians.sh import num_sh_bases, sh_basis

WIDTH, HEIGHT = 16, 12


# ------------------------------------------------------------------------------------ scenes
def random_rotation(generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q = torch.randn(4, generator=generator, dtype=dtype)
    w, x, y, z = q / q.norm()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=dtype,
    )


def random_cameras(generator: torch.Generator, count: int, width: int, height: int, dtype=torch.float64):
    """Cameras with random orientation whose axis passes near the world origin, at distance 0.8..3."""
    viewmats, Ks = [], []
    for _ in range(count):
        viewmat = torch.eye(4, dtype=dtype)
        viewmat[:3, :3] = random_rotation(generator, dtype)
        viewmat[:3, 3] = torch.tensor([0.0, 0.0, 0.8]) + torch.rand(3, generator=generator) * torch.tensor(
            [0.2, 0.2, 2.2]
        )
        focal = width * (0.9 + 0.6 * float(torch.rand((), generator=generator)))
        K = torch.tensor(
            [[focal, 0, width / 2 + 0.7], [0, focal * 1.1, height / 2 - 0.4], [0, 0, 1]], dtype=dtype
        )
        viewmats.append(viewmat)
        Ks.append(K)
    return torch.stack(viewmats), torch.stack(Ks)


def random_gaussians(generator: torch.Generator, count: int, degree: int, dtype=torch.float64) -> Gaussians:
    means = (torch.rand(count, 3, generator=generator, dtype=dtype) - 0.5) * 2.4
    quats = torch.randn(count, 4, generator=generator, dtype=dtype)
    scales = torch.exp(torch.rand(count, 3, generator=generator, dtype=dtype) * 3.0 - 4.5)
    opacities = 0.02 + 0.979 * torch.rand(count, generator=generator, dtype=dtype)
    sh = torch.randn(count, num_sh_bases(degree), 3, generator=generator, dtype=dtype) * 0.6
    return Gaussians(means, quats, scales, opacities, sh)


def stacked_opaque(dtype=torch.float64) -> Gaussians:
    """Three nearly opaque, wide Gaussians on the optical axis plus one faint one: exercises early stop."""
    means = torch.tensor(
        [[0.0, 0.0, 0.0], [0.02, 0.0, 0.3], [-0.03, 0.01, 0.6], [0.1, 0.1, -0.2]], dtype=dtype
    )
    quats = torch.tensor([[1.0, 0, 0, 0]] * 4, dtype=dtype)
    scales = torch.tensor([[1.0, 1.0, 1.0]] * 3 + [[0.05, 0.05, 0.05]], dtype=dtype)
    opacities = torch.tensor([0.998, 0.997, 0.99, 0.003], dtype=dtype)
    sh = torch.tensor([[[1.0, -1.0, -1.0]], [[-1.0, 1.0, -1.0]], [[-1.0, -1.0, 1.0]], [[1.0, 1.0, 1.0]]])
    return Gaussians(means, quats, scales, opacities, sh.to(dtype))


def axis_camera(dtype=torch.float64, distance: float = 2.0):
    viewmat = torch.eye(4, dtype=dtype)
    viewmat[2, 3] = distance
    K = torch.tensor([[20.0, 0, WIDTH / 2], [0, 20.0, HEIGHT / 2], [0, 0, 1]], dtype=dtype)
    return viewmat[None], K[None]


# ----------------------------------------------------------------------- brute-force reference
def brute_force(
    gaussians: Gaussians,
    viewmat: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    background,
    *,
    antialiased: bool = False,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
):
    """Per-pixel Python loop over depth-sorted Gaussians, float64 numpy, written from the formulas."""
    V = viewmat.double().numpy()
    R, t = V[:3, :3], V[:3, 3]
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    campos = -R.T @ t
    degree = gaussians.sh_degree
    items = []
    for n in range(gaussians.num_gaussians):
        mean = gaussians.means[n].double().numpy()
        x, y, z = R @ mean + t
        if not near <= z <= far:
            continue
        qw, qx, qy, qz = gaussians.quats[n].double().numpy() / np.linalg.norm(
            gaussians.quats[n].double().numpy()
        )
        rot = np.array(
            [
                [1 - 2 * (qy**2 + qz**2), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)],
                [2 * (qx * qy + qw * qz), 1 - 2 * (qx**2 + qz**2), 2 * (qy * qz - qw * qx)],
                [2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx**2 + qy**2)],
            ]
        )
        scale = np.diag(gaussians.scales[n].double().numpy())
        cov_world = rot @ scale @ scale @ rot.T
        cov_cam = R @ cov_world @ R.T
        tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
        u = min(max(x / z, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
        v = min(max(y / z, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
        J = np.array([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]])
        cov2d = J @ cov_cam @ J.T
        det_original = np.linalg.det(cov2d)
        cov2d = cov2d + eps2d * np.eye(2)
        det = np.linalg.det(cov2d)
        if det <= 0:
            continue
        opacity = float(gaussians.opacities[n])
        if antialiased:
            opacity *= math.sqrt(max(det_original / det, 0.0))
        if opacity < 1 / 255:
            continue
        conic = np.linalg.inv(cov2d)
        centre = np.array([fx * x / z + cx, fy * y / z + cy])
        direction = torch.from_numpy(mean - campos)
        basis = sh_basis(direction, degree).numpy()  # [K]
        color = np.maximum(basis @ gaussians.sh[n].double().numpy() + 0.5, 0.0)
        items.append((z, centre, conic, opacity, color))
    items.sort(key=lambda item: item[0])
    colors = np.zeros((height, width, 3))
    alphas = np.zeros((height, width, 1))
    depths = np.zeros((height, width, 1))
    bg = np.zeros(3) if background is None else np.asarray(background, dtype=np.float64)
    for i in range(height):
        for j in range(width):
            transmittance, color, depth = 1.0, np.zeros(3), 0.0
            for z, centre, conic, opacity, c in items:
                d = centre - np.array([j + 0.5, i + 0.5])
                sigma = 0.5 * d @ conic @ d
                alpha = min(0.999, opacity * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                after = transmittance * (1 - alpha)
                if after <= 1e-4:
                    break
                color += c * alpha * transmittance
                depth += z * alpha * transmittance
                transmittance = after
            colors[i, j] = color + transmittance * bg
            alphas[i, j] = 1 - transmittance
            depths[i, j] = depth / max(1 - transmittance, 1e-10)
    return colors, alphas, depths


def assert_matches_brute_force(gaussians, viewmats, Ks, background, antialiased, width=WIDTH, height=HEIGHT):
    mode = "antialiased" if antialiased else "classic"
    output = render(gaussians, viewmats, Ks, width, height, background, backend="torch", rasterize_mode=mode)
    for camera in range(viewmats.shape[0]):
        bg = None if background is None else torch.as_tensor(background).expand(viewmats.shape[0], 3)[camera]
        colors, alphas, depths = brute_force(
            gaussians, viewmats[camera], Ks[camera], width, height, bg, antialiased=antialiased
        )
        np.testing.assert_allclose(output.colors[camera].numpy(), colors, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(output.alphas[camera].numpy(), alphas, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(output.depths[camera].numpy(), depths, atol=1e-8, rtol=1e-9)


# ----------------------------------------------------------------------------------- CPU tests
@given(
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(1, 7),
    degree=st.integers(0, 3),
    antialiased=st.booleans(),
    white=st.booleans(),
)
def test_reference_matches_brute_force(seed, count, degree, antialiased, white):
    generator = torch.Generator().manual_seed(seed)
    gaussians = random_gaussians(generator, count, degree)
    viewmats, Ks = random_cameras(generator, 2, WIDTH, HEIGHT)
    background = torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64) if white else None
    assert_matches_brute_force(gaussians, viewmats, Ks, background, antialiased)


@pytest.mark.parametrize("antialiased", [False, True])
def test_reference_matches_brute_force_with_early_stop(antialiased):
    gaussians = stacked_opaque()
    viewmats, Ks = axis_camera()
    background = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    assert_matches_brute_force(gaussians, viewmats, Ks, background, antialiased)


def test_early_stop_excludes_the_gaussian_that_crosses_the_cutoff():
    gaussians = stacked_opaque()
    viewmats, Ks = axis_camera()
    background = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    output = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, background, backend="torch")
    i, j = 5, 7  # a pixel next to the optical axis

    def alpha_at(index: int) -> float:
        """Alpha of isotropic Gaussian ``index`` at pixel (i, j): cov2d = (f s / z)^2 + eps2d."""
        mean_cam = viewmats[0, :3, :3] @ gaussians.means[index] + viewmats[0, :3, 3]
        u = Ks[0, 0, 0] * mean_cam[0] / mean_cam[2] + Ks[0, 0, 2]
        v = Ks[0, 1, 1] * mean_cam[1] / mean_cam[2] + Ks[0, 1, 2]
        variance = (Ks[0, 0, 0] * gaussians.scales[index, 0] / mean_cam[2]) ** 2 + 0.3
        sigma = 0.5 * ((u - (j + 0.5)) ** 2 + (v - (i + 0.5)) ** 2) / variance
        return min(0.999, float(gaussians.opacities[index] * torch.exp(-sigma)))

    first, second = alpha_at(0), alpha_at(1)
    assert (1 - first) * (1 - second) <= 1e-4  # so compositing must stop before the second
    color = torch.clamp_min(gaussians.sh[0, 0] * 0.28209479177387814 + 0.5, 0)
    expected = color * first + (1 - first) * background
    torch.testing.assert_close(output.colors[0, i, j], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(output.alphas[0, i, j, 0], torch.tensor(first, dtype=torch.float64))


def test_alpha_threshold_skips_faint_gaussians():
    faint = Gaussians(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
        torch.full((1, 3), 0.3, dtype=torch.float64),
        torch.tensor([0.0039], dtype=torch.float64),  # just below 1/255 everywhere
        torch.ones(1, 1, 3, dtype=torch.float64),
    )
    viewmats, Ks = axis_camera()
    background = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    output = render(faint, viewmats, Ks, WIDTH, HEIGHT, background, backend="torch")
    assert torch.equal(output.alphas, torch.zeros_like(output.alphas))
    assert torch.equal(output.colors, background.expand_as(output.colors))
    brighter = faint.replace(
        opacities=torch.tensor([0.0041], dtype=torch.float64)
    )  # 0.0040 at the centre pixels
    output = render(brighter, viewmats, Ks, WIDTH, HEIGHT, background, backend="torch")
    assert 1 / 255 <= float(output.alphas.max()) < 0.0041
    hit = output.alphas[output.alphas > 0]
    assert 0 < hit.numel() < output.alphas.numel() and float(hit.min()) >= 1 / 255  # no alpha below 1/255


def test_background_is_composited_with_final_transmittance():
    generator = torch.Generator().manual_seed(3)
    gaussians = random_gaussians(generator, 6, 1)
    viewmats, Ks = random_cameras(generator, 2, WIDTH, HEIGHT)
    background = torch.tensor([[0.3, 0.5, 0.7], [1.0, 0.0, 0.2]], dtype=torch.float64)
    black = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, backend="torch")
    lit = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, background, backend="torch")
    expected = black.colors + (1 - black.alphas) * background[:, None, None, :]
    torch.testing.assert_close(lit.colors, expected)
    torch.testing.assert_close(lit.alphas, black.alphas)


def test_near_far_planes_cull():
    gaussians = stacked_opaque()
    viewmats, Ks = axis_camera()
    near = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, backend="torch", near_plane=2.5)
    far = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, backend="torch", far_plane=1.0)
    assert torch.equal(far.alphas, torch.zeros_like(far.alphas))
    # With near 2.5 only the Gaussians with camera z >= 2.5 remain (means z = 0.6 -> 2.6 is one).
    kept = Gaussians(*(getattr(gaussians, n)[2:3] for n in ("means", "quats", "scales", "opacities", "sh")))
    reference = render(kept, viewmats, Ks, WIDTH, HEIGHT, backend="torch")
    torch.testing.assert_close(near.colors, reference.colors)


def test_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(7)
    gaussians = random_gaussians(generator, 7, 2)
    viewmats, Ks = random_cameras(generator, 1, WIDTH, HEIGHT)
    whole = rasterize_reference(gaussians, viewmats, Ks, WIDTH, HEIGHT)
    chunked = rasterize_reference(gaussians, viewmats, Ks, WIDTH, HEIGHT, pixel_chunk=5)
    torch.testing.assert_close(chunked.colors, whole.colors, atol=0, rtol=0)


def test_gradcheck_tiny_scene():
    generator = torch.Generator().manual_seed(11)
    base = random_gaussians(generator, 3, 1)
    base = base.replace(means=base.means * 0.3, scales=base.scales.clamp(min=0.08))
    viewmats, Ks = axis_camera()
    Ks = Ks.clone()
    Ks[0, :2] *= 0.4
    background = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    leaves = [v.detach().clone().requires_grad_(True) for v in (base.means, base.quats, base.scales)]
    leaves += [v.detach().clone().requires_grad_(True) for v in (base.opacities, base.sh)]

    def function(means, quats, scales, opacities, sh):
        output = render(
            Gaussians(means, quats, scales, opacities, sh, check=False),
            viewmats,
            Ks,
            6,
            5,
            background,
            backend="torch",
            rasterize_mode="antialiased",
        )
        return output.colors, output.alphas, output.depths

    output = function(*leaves)
    assert float(output[1].detach().max()) > 0.1  # the scene is visible
    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_render_batch_matches_per_sample_loop():
    generator = torch.Generator().manual_seed(5)
    samples = [random_gaussians(generator, n, 1) for n in (4, 0, 3)]
    batch = Gaussians.concat(samples)
    viewmats = torch.stack([random_cameras(generator, 2, WIDTH, HEIGHT)[0] for _ in samples])
    Ks = torch.stack([random_cameras(generator, 2, WIDTH, HEIGHT)[1] for _ in samples])
    background = torch.rand(3, 2, 3, generator=generator, dtype=torch.float64)
    output = render_batch(batch, viewmats, Ks, WIDTH, HEIGHT, background, backend="torch")
    assert output.colors.shape == (3, 2, HEIGHT, WIDTH, 3)
    for index, sample in enumerate(samples):
        expected = render(
            sample, viewmats[index], Ks[index], WIDTH, HEIGHT, background[index], backend="torch"
        )
        torch.testing.assert_close(output.colors[index], expected.colors)
        torch.testing.assert_close(output.depths[index], expected.depths)
    # the empty sample shows only its background
    torch.testing.assert_close(output.colors[1], background[1][:, None, None, :].expand(2, HEIGHT, WIDTH, 3))


def test_render_errors():
    gaussians = stacked_opaque()
    viewmats, Ks = axis_camera()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        render(gaussians.to(torch.float32), viewmats.float(), Ks.float(), WIDTH, HEIGHT, backend="gsplat")
    with pytest.raises(ValueError, match="batch_size=2"):
        render(Gaussians.concat([gaussians, gaussians]), viewmats, Ks, WIDTH, HEIGHT)
    with pytest.raises(ValueError, match=r"viewmats must be a tensor \[C, 4, 4\]"):
        render(gaussians, viewmats[0], Ks, WIDTH, HEIGHT)
    with pytest.raises(ValueError, match=r"Ks must be a tensor \[1, 3, 3\]"):
        render(gaussians, viewmats, Ks[0], WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="width must be a positive int"):
        render(gaussians, viewmats, Ks, 0, HEIGHT)
    with pytest.raises(ValueError, match="backend must be"):
        render(gaussians, viewmats, Ks, WIDTH, HEIGHT, backend="cuda")
    with pytest.raises(ValueError, match="background must have shape"):
        render(gaussians, viewmats, Ks, WIDTH, HEIGHT, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sh_degree=2 needs 9"):
        render(gaussians, viewmats, Ks, WIDTH, HEIGHT, sh_degree=2)


def test_auto_backend_uses_torch_on_cpu():
    gaussians = stacked_opaque()
    viewmats, Ks = axis_camera()
    auto = render(gaussians, viewmats, Ks, WIDTH, HEIGHT)
    reference = render(gaussians, viewmats, Ks, WIDTH, HEIGHT, backend="torch")
    torch.testing.assert_close(auto.colors, reference.colors, atol=0, rtol=0)


# ----------------------------------------------------------------------------------- GPU tests
# Tolerances (gsplat float32 CUDA vs the reference in float64 on the same float32 inputs):
#   colours / alphas: max abs error <= 1e-2 and at most 0.5 % of values off by more than 1e-4
#     (single Gaussians flip across the alpha threshold 1/255 or the T cut-off 1e-4 in float32,
#     which moves a pixel by up to ~4e-3 times its colour);
#   depths: where alpha > 0.2, max abs error <= 2e-2 (depths are ~1-3);
#   gradients: elementwise |g - g_ref| <= 1e-1 |g_ref| + 2e-2 max|g_ref| per parameter.
def gpu_scene(seed: int, degree: int, count: int = 300):
    generator = torch.Generator().manual_seed(seed)
    gaussians = random_gaussians(generator, count, degree, dtype=torch.float32)
    gaussians = gaussians.replace(means=gaussians.means * 0.5)
    viewmats, Ks = random_cameras(generator, 3, 64, 48, dtype=torch.float32)
    background = torch.tensor([0.2, 0.5, 0.9])
    return gaussians, viewmats, Ks, background


def _assert_images_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual.double() - expected.double()).abs()
    fraction = float((error > 1e-4).double().mean())
    assert float(error.max()) <= 1e-2, f"{what}: max abs error {float(error.max()):.3e}"
    assert fraction <= 5e-3, f"{what}: {fraction:.2%} of values off by more than 1e-4"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("degree", [0, 3])
def test_gsplat_matches_reference(mode, degree):
    pytest.importorskip("gsplat")
    gaussians, viewmats, Ks, background = gpu_scene(seed=degree + 10, degree=degree)
    cuda = torch.device("cuda")
    fast = render(
        gaussians.to(cuda), viewmats.to(cuda), Ks.to(cuda), 64, 48, background.to(cuda),
        backend="gsplat", rasterize_mode=mode,
    )  # fmt: skip
    slow = render(
        gaussians.to(cuda, torch.float64), viewmats.to(cuda), Ks.to(cuda), 64, 48, background.to(cuda),
        backend="torch", rasterize_mode=mode,
    )  # fmt: skip
    assert float(slow.alphas.max()) > 0.5
    _assert_images_close(fast.colors, slow.colors, "colors")
    _assert_images_close(fast.alphas, slow.alphas, "alphas")
    mask = slow.alphas > 0.2
    depth_error = (fast.depths.double() - slow.depths)[mask].abs()
    assert float(depth_error.max()) <= 2e-2, f"depths: max abs error {float(depth_error.max()):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_gsplat_gradients_match_reference(mode):
    pytest.importorskip("gsplat")
    gaussians, viewmats, Ks, background = gpu_scene(seed=21, degree=1, count=120)
    cuda = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 48, 64, 5, generator=generator).to(cuda)
    gradients = {}
    for backend, dtype in (("gsplat", torch.float32), ("torch", torch.float64)):
        leaves = {n: getattr(gaussians, n).to(cuda, dtype).requires_grad_(True) for n in ("means", "quats")}
        leaves.update(
            {n: getattr(gaussians, n).to(cuda, dtype).requires_grad_(True) for n in ("scales", "sh")}
        )
        leaves["opacities"] = gaussians.opacities.to(cuda, dtype).requires_grad_(True)
        output = render(
            Gaussians(**leaves), viewmats.to(cuda), Ks.to(cuda), 64, 48, background.to(cuda),
            backend=backend, rasterize_mode=mode,
        )  # fmt: skip
        images = torch.cat(
            [output.colors, output.alphas, output.depths * output.alphas], dim=-1
        )  # [C, H, W, 5]
        (images.double() * weights.double()).sum().backward()
        gradients[backend] = {n: v.grad.double() for n, v in leaves.items()}
    for name, reference in gradients["torch"].items():
        actual = gradients["gsplat"][name]
        bound = 1e-1 * reference.abs() + 2e-2 * reference.abs().max()
        worst = float(((actual - reference).abs() - bound).max())
        assert worst <= 0, f"d/d{name}: exceeds tolerance by {worst:.3e}"
