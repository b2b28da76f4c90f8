"""Tests of the Gaussians container, spherical harmonics and the training losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse3d.gaussians import (
    LPIPS,
    GaussianLoss,
    Gaussians,
    eval_sh,
    l1_loss,
    opacity_loss,
    rgb_to_sh,
    sh_basis,
    sh_to_rgb,
    ssim,
    volume_loss,
)
from sparse3d.gaussians.losses import gaussian_window
from sparse3d.gaussians.sh import SH_C0, num_sh_bases, sh_degree_from_bases

FIELDS = ("means", "quats", "scales", "opacities", "sh")


def make(count: int, degree: int = 1, *, seed: int = 0, offsets=None, dtype=torch.float32) -> Gaussians:
    generator = torch.Generator().manual_seed(seed)
    return Gaussians(
        torch.randn(count, 3, generator=generator).to(dtype),
        torch.randn(count, 4, generator=generator).to(dtype),
        torch.rand(count, 3, generator=generator).to(dtype) * 0.1 + 0.01,
        torch.rand(count, generator=generator).to(dtype) * 0.9 + 0.05,
        torch.randn(count, num_sh_bases(degree), 3, generator=generator).to(dtype),
        offsets=offsets,
    )


# ----------------------------------------------------------------------------------- container
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=4), degree=st.integers(0, 3))
def test_concat_unbind_select_round_trip(counts, degree):
    samples = [make(n, degree, seed=i) for i, n in enumerate(counts)]
    batch = Gaussians.concat(samples)
    assert batch.batch_size == len(counts)
    assert batch.offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert batch.counts.tolist() == counts
    assert batch.batch_index.tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    for sample, original in zip(batch.unbind(), samples, strict=True):
        for name in FIELDS:
            assert torch.equal(getattr(sample, name), getattr(original, name))
    order = list(reversed(range(len(counts)))) + [0]
    selected = batch.select(order)
    assert selected.counts.tolist() == [counts[i] for i in order]
    for position, index in enumerate(order):
        assert torch.equal(selected.sample(position).means, samples[index].means)
    assert torch.equal(batch.sample(-1).sh, samples[-1].sh)


def test_to_and_detach():
    gaussians = make(4, 2, offsets=[0, 1, 4])
    doubled = gaussians.to(torch.float64)
    assert doubled.dtype == torch.float64 and doubled.offsets.tolist() == [0, 1, 4]
    torch.testing.assert_close(doubled.scales.float(), gaussians.scales)
    leaf = gaussians.means.clone().requires_grad_(True)
    assert not gaussians.replace(means=leaf).detach().means.requires_grad
    assert gaussians.sh_degree == 2 and gaussians.num_gaussians == 4 and len(gaussians) == 2


def test_container_errors():
    good = {name: getattr(make(3), name) for name in FIELDS}
    with pytest.raises(ValueError, match=r"quats must have shape \[3, 4\], got \[3, 3\]"):
        Gaussians(**{**good, "quats": good["quats"][:, :3]})
    with pytest.raises(ValueError, match=r"sh must have shape \[3, K, 3\]"):
        Gaussians(**{**good, "sh": good["sh"][..., :2]})
    with pytest.raises(ValueError, match="one of 1, 4, 9, 16, got 5"):
        Gaussians(**{**good, "sh": torch.zeros(3, 5, 3)})
    with pytest.raises(TypeError, match="scales has dtype torch.float64"):
        Gaussians(**{**good, "scales": good["scales"].double()})
    with pytest.raises(TypeError, match="floating-point"):
        Gaussians(**{**good, "opacities": torch.ones(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="scales must be > 0"):
        Gaussians(**{**good, "scales": -good["scales"]})
    with pytest.raises(ValueError, match=r"opacities must lie in \(0, 1\)"):
        Gaussians(**{**good, "opacities": torch.tensor([0.5, 1.0, 0.2])})
    with pytest.raises(ValueError, match="means must be finite"):
        Gaussians(**{**good, "means": good["means"].clone().fill_(float("nan"))})
    with pytest.raises(ValueError, match="quats must be non-zero"):
        Gaussians(**{**good, "quats": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="non-decreasing from 0 to N=3"):
        Gaussians(**good, offsets=[0, 2, 1, 3])
    with pytest.raises(ValueError, match="non-decreasing from 0 to N=3"):
        Gaussians(**good, offsets=[0, 2])
    Gaussians(**{**good, "scales": -good["scales"]}, check=False)  # values unchecked on request
    with pytest.raises(ValueError, match=r"batches\[1\] has K=1 SH coefficients, batches\[0\] has 4"):
        Gaussians.concat([make(2, 1), make(2, 0)])
    with pytest.raises(IndexError, match=r"in \[-1, 1\), got 1"):
        make(2).sample(1)
    with pytest.raises(TypeError, match="unknown fields"):
        make(2).replace(colors=torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------- SH
def fibonacci_sphere(count: int) -> torch.Tensor:
    index = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1 - 2 * index / count
    phi = math.pi * (3 - math.sqrt(5)) * index
    radius = torch.sqrt(1 - z * z)
    return torch.stack([radius * torch.cos(phi), radius * torch.sin(phi), z], dim=-1)


def test_sh_basis_is_orthonormal_on_the_sphere():
    directions = fibonacci_sphere(20000)
    basis = sh_basis(directions * 3.0, 3)  # [M, 16]; un-normalised input on purpose
    gram = basis.T @ basis * (4 * math.pi / directions.shape[0])
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)


def test_sh_degree_one_signs_and_evaluation():
    direction = torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64)
    unit = direction / direction.norm()
    c1 = math.sqrt(3 / (4 * math.pi))
    expected = torch.tensor(
        [[SH_C0, -c1 * unit[0, 1], c1 * unit[0, 2], -c1 * unit[0, 0]]], dtype=torch.float64
    )
    torch.testing.assert_close(sh_basis(direction, 1), expected)
    coefficients = torch.randn(1, 9, 3, dtype=torch.float64)
    manual = (sh_basis(direction, 2)[..., None] * coefficients).sum(1)
    torch.testing.assert_close(eval_sh(coefficients, direction), manual)
    torch.testing.assert_close(
        eval_sh(coefficients, direction, 1), (expected[..., None] * coefficients[:, :4]).sum(1)
    )
    with pytest.raises(ValueError, match="degree 3 needs 16"):
        eval_sh(coefficients, direction, 3)


def test_rgb_sh_round_trip():
    rgb = torch.rand(10, 3, dtype=torch.float64)
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)
    direction = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(rgb_to_sh(rgb)[:, None], direction) + 0.5, rgb)
    assert [sh_degree_from_bases(num_sh_bases(d)) for d in range(4)] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------- losses
def ssim_dense(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel weighted window statistics with explicit zero padding (loops, float64)."""
    offsets = np.arange(size) - size // 2
    line = np.exp(-(offsets**2) / (2 * sigma**2))
    window = np.outer(line, line) / line.sum() ** 2
    batch, channels, height, width = x.shape
    pad = size // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    yp = np.pad(y, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros_like(x)
    c1, c2 = 0.01**2, 0.03**2
    for b in range(batch):
        for c in range(channels):
            for i in range(height):
                for j in range(width):
                    a = xp[b, c, i : i + size, j : j + size]
                    d = yp[b, c, i : i + size, j : j + size]
                    mx, my = (window * a).sum(), (window * d).sum()
                    vx = (window * a * a).sum() - mx * mx
                    vy = (window * d * d).sum() - my * my
                    cov = (window * a * d).sum() - mx * my
                    out[b, c, i, j] = ((2 * mx * my + c1) * (2 * cov + c2)) / (
                        (mx * mx + my * my + c1) * (vx + vy + c2)
                    )
    return out


def test_ssim_matches_dense_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 15, generator=generator, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 3, 13, 15, generator=generator, dtype=torch.float64)).clamp(0, 1)
    expected = ssim_dense(x.numpy(), y.numpy())
    np.testing.assert_allclose(ssim(x, y, reduction="none").numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(ssim(x, y)), expected.mean(), rtol=1e-10)


def test_ssim_properties():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 20, 20, generator=generator)
    y = torch.rand(1, 3, 20, 20, generator=generator)
    torch.testing.assert_close(ssim(x, x), torch.tensor(1.0))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert float(ssim(x, y)) < 0.5
    window = gaussian_window(11, 1.5, dtype=torch.float64)
    torch.testing.assert_close(window.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="target must have the shape"):
        ssim(x, y[..., :5])


def test_regularisers_and_l1():
    scales = torch.rand(7, 3, dtype=torch.float64)
    opacities = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(volume_loss(scales), torch.tensor(np.prod(scales.numpy(), axis=1).mean()))
    torch.testing.assert_close(opacity_loss(opacities), torch.tensor(((1 - opacities.numpy()) ** 2).mean()))
    a, b = torch.rand(2, 5, 5), torch.rand(2, 5, 5)
    torch.testing.assert_close(l1_loss(a, b), torch.tensor(np.abs(a.numpy() - b.numpy()).mean()))
    assert float(volume_loss(torch.zeros(0, 3))) == 0.0
    with pytest.raises(ValueError, match=r"scales must be \[N, 3\]"):
        volume_loss(torch.zeros(3))


def lpips_by_hand(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out with functional ops from the model's state dict (VGG16 layout)."""
    state = model.state_dict()
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    pools_after = {2, 7, 14, 21}  # conv index after which a 2x2 max-pool follows
    taps = {2, 7, 14, 21, 28}
    total = torch.zeros(x.shape[0])
    hx, hy = ((2 * x - 1) - shift) / scale, ((2 * y - 1) - shift) / scale
    head = 0
    for index in convs:
        weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
        hx, hy = F.relu(F.conv2d(hx, weight, bias, padding=1)), F.relu(F.conv2d(hy, weight, bias, padding=1))
        if index in taps:
            nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
            ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
            lin = state[f"lin{head}.model.1.weight"]
            total = total + F.conv2d((nx - ny) ** 2, lin).mean(dim=(1, 2, 3))
            head += 1
        if index in pools_after:
            hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
    return total


def test_lpips_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    model = LPIPS("vgg")
    for index in range(5):  # LPIPS heads are non-negative
        getattr(model, f"lin{index}").model[1].weight.data.uniform_(0, 1)
    path = tmp_path / "lpips_vgg.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = LPIPS.from_pretrained(path)
    x = torch.rand(2, 3, 32, 32)
    y = torch.rand(2, 3, 32, 32)
    distance = loaded(x, y)
    torch.testing.assert_close(distance, model(x, y), atol=0, rtol=0)
    torch.testing.assert_close(distance, lpips_by_hand(model, x, y), atol=1e-6, rtol=1e-4)
    assert bool((distance > 0).all())
    torch.testing.assert_close(loaded(x, x), torch.zeros(2))


def test_lpips_split_files_and_errors(tmp_path):
    model = LPIPS("alex")
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    heads = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
    torch.save({**trunk, "classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "alexnet.pth")  # skipped
    torch.save(heads, tmp_path / "alex.pth")
    loaded = LPIPS.from_pretrained([tmp_path / "alexnet.pth", tmp_path / "alex.pth"], net="alex")
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x, y), model(x, y), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        LPIPS.from_pretrained(tmp_path / "alex.pth", net="alex")
    with pytest.raises(FileNotFoundError, match="not found"):
        LPIPS.from_pretrained(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="net must be"):
        LPIPS("resnet")


def test_gaussian_loss_combines_terms():
    generator = torch.Generator().manual_seed(2)
    pred = torch.rand(2, 64, 64, 3, generator=generator)
    target = torch.rand(2, 64, 64, 3, generator=generator)
    gaussians = make(5)
    lpips = LPIPS("alex")
    config = GaussianLoss()
    assert (config.ssim_weight, config.lpips_weight, config.volume_weight, config.opacity_weight) == (
        0.2,
        0.2,
        1e4,
        1e-3,
    )
    terms = config(pred, target, gaussians, lpips=lpips)
    images, references = pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)
    expected = (
        l1_loss(pred, target)
        + 0.2 * (1 - ssim(images, references))
        + 0.2 * lpips(images, references).mean()
        + 1e4 * volume_loss(gaussians.scales)
        + 1e-3 * opacity_loss(gaussians.opacities)
    )
    torch.testing.assert_close(terms.total, expected)
    custom = GaussianLoss(ssim_weight=0.0, lpips_weight=0.0, volume_weight=0.0, opacity_weight=0.0)
    torch.testing.assert_close(custom(pred, target).total, l1_loss(pred, target))
    with pytest.raises(ValueError, match="needs an LPIPS model"):
        GaussianLoss()(pred, target, gaussians)
    with pytest.raises(ValueError, match="gaussians=None"):
        GaussianLoss(lpips_weight=0.0)(pred, target)
