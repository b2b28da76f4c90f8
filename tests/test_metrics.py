"""Evaluation metrics against torchmetrics, closed forms, direct float64 formulas and transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given
from hypothesis import strategies as st
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import (
    FrechetInceptionDistance,
    _compute_fid,
)  # not exported without torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance

from sparse3d.gaussians.losses import LPIPS
from sparse3d.metrics import (
    CLIPImageEmbedding,
    DINOv2Embedding,
    FeatureDistances,
    ImageEmbedding,
    LPIPSMetric,
    clip_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    kernel_distance,
    psnr,
    ssim,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


class Identity(torch.nn.Module):
    """Feature 'network' for torchmetrics FID/KID: features pass through unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _noisy_pair(seed: int, batch: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, channels, size, size, generator=generator)
    sigmas = torch.linspace(0.01, 0.2, batch)[:, None, None, None]
    pred = (target + sigmas * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    return pred, target


# ------------------------------------------------------------------------------------------ image metrics
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    channels=st.sampled_from([1, 3]),
    size=st.integers(12, 24),
)
def test_psnr_and_ssim_match_torchmetrics_per_image(seed: int, batch: int, channels: int, size: int) -> None:
    pred, target = _noisy_pair(seed, batch, channels, size)
    reference_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    torch.testing.assert_close(psnr(pred, target), reference_psnr(pred, target), atol=1e-4, rtol=1e-5)
    per_image = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="none")(pred, target).reshape(
        -1
    )
    torch.testing.assert_close(psnr(pred, target, reduction="none"), per_image, atol=1e-4, rtol=1e-5)

    reference_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    torch.testing.assert_close(ssim(pred, target), reference_ssim(pred, target), atol=1e-5, rtol=1e-5)
    per_image = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(pred, target).reshape(-1)
    torch.testing.assert_close(ssim(pred, target, reduction="none"), per_image, atol=1e-5, rtol=1e-5)


def test_psnr_is_per_image_not_pooled_and_data_range_scales() -> None:
    pred, target = _noisy_pair(0, 4, 3, 16)
    pooled = PeakSignalNoiseRatio(data_range=1.0)(pred, target)
    assert psnr(pred, target) > pooled + 1.0  # the per-image mean is larger for mixed noise levels
    torch.testing.assert_close(psnr(255 * pred, 255 * target, data_range=255.0), psnr(pred, target))
    assert torch.isinf(psnr(target, target)).item()
    torch.testing.assert_close(ssim(target, target), torch.tensor(1.0))


def test_ssim_valid_padding_matches_a_direct_valid_window_formula() -> None:
    pred, target = _noisy_pair(7, 3, 3, 20)
    offsets = torch.arange(11, dtype=torch.float64) - 5
    line = torch.exp(-(offsets**2) / (2 * 1.5**2))
    window = torch.outer(line, line) / line.sum() ** 2  # [11, 11], sums to 1
    kernel = window.expand(3, 1, 11, 11)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image.double(), kernel, groups=3)  # valid: [B, 3, 10, 10]

    mu_x, mu_y = blur(pred), blur(target)
    var_x, var_y = blur(pred * pred) - mu_x**2, blur(target * target) - mu_y**2
    cov = blur(pred * target) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    got = ssim(pred, target, padding="valid", reduction="none")
    torch.testing.assert_close(got.double(), expected.mean(dim=(1, 2, 3)), atol=2e-6, rtol=1e-6)
    assert not torch.allclose(got, ssim(pred, target, reduction="none"), atol=1e-4)


def test_image_metric_errors() -> None:
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"target: expected the shape of pred \[2, 3, 16, 16\]"):
        psnr(images, images[:1])
    with pytest.raises(ValueError, match=r"pred: expected shape \[B, C, H, W\]"):
        ssim(images[0], images[0])
    with pytest.raises(ValueError, match="reduction"):
        psnr(images, images, reduction="sum")
    with pytest.raises(ValueError, match="data_range"):
        psnr(images, images, data_range=0.0)
    with pytest.raises(ValueError, match="H and W >= 11 for window_size 11 and padding 'valid', got 8 x 8"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), padding="valid")
    with pytest.raises(ValueError, match="padding"):
        ssim(images, images, padding="zeros")
    with pytest.raises(TypeError, match="floating"):
        psnr(images.to(torch.uint8), images.to(torch.uint8))


def test_lpips_metric_loads_local_weights_and_matches_per_image_lpips(tmp_path) -> None:
    torch.manual_seed(0)
    network = LPIPS("alex")
    for index in range(5):  # LPIPS heads are non-negative
        head = getattr(network, f"lin{index}").model[1]
        head.weight.data = head.weight.data.abs()
    torch.save(network.state_dict(), tmp_path / "lpips_alex.pth")
    metric = LPIPSMetric.from_pretrained(tmp_path / "lpips_alex.pth", net="alex")
    pred, target = _noisy_pair(1, 3, 3, 64)
    distances = metric(pred, target, reduction="none")
    expected = torch.cat(
        [
            network(2 * p[None] - 1, 2 * t[None] - 1, normalize=False)
            for p, t in zip(pred, target, strict=True)
        ]
    )
    torch.testing.assert_close(distances, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metric(pred, target), expected.mean(), atol=1e-6, rtol=1e-5)
    assert (distances[1:] > distances[:1]).all()  # noisier images are further away
    torch.testing.assert_close(metric(target, target), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"pred: expected values in \[0, 1\]"):
        metric(2 * pred - 1, target)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        LPIPSMetric.from_pretrained(tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------ FD
def _gaussian_samples(mean: torch.Tensor, variances: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Samples whose sample mean and unbiased covariance are exactly ``mean`` and ``diag(variances)``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, mean.shape[0], generator=generator, dtype=torch.float64)
    noise = noise - noise.mean(dim=0)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(count, 1, dtype=torch.float64), noise], dim=1))
    white = basis[:, 1:] * (count - 1) ** 0.5  # orthogonal to the ones vector: zero mean, cov = I
    return mean + white * variances.sqrt()


def test_frechet_distance_closed_form_for_diagonal_gaussians() -> None:
    generator = torch.Generator().manual_seed(3)
    dims = 6
    mean_a, mean_b = torch.randn(2, dims, generator=generator, dtype=torch.float64)
    var_a, var_b = torch.rand(2, dims, generator=generator, dtype=torch.float64) * 2 + 0.1
    expected = (mean_a - mean_b).square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum()
    features_a = _gaussian_samples(mean_a, var_a, 40, seed=1)
    features_b = _gaussian_samples(mean_b, var_b, 50, seed=2)
    torch.testing.assert_close(frechet_distance(features_a, features_b), expected, atol=1e-9, rtol=1e-9)
    got = frechet_distance_from_statistics(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("count", "dims"), [(64, 8), (10, 16)])  # full rank, and rank-deficient
def test_frechet_distance_matches_torchmetrics_fid(count: int, dims: int) -> None:
    generator = torch.Generator().manual_seed(count)
    mixing = torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    features_a = torch.randn(count, dims, generator=generator, dtype=torch.float64) @ mixing
    features_b = torch.randn(count + 3, dims, generator=generator, dtype=torch.float64) @ mixing.T + 0.5
    reference = FrechetInceptionDistance(feature=Identity(dims))
    for start in range(0, count, 7):  # several updates, as when streaming
        reference.update(features_a[start : start + 7], real=True)
    reference.update(features_b, real=False)
    expected = reference.compute().double()
    got = frechet_distance(features_a.float(), features_b.float())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # statistics path against torchmetrics' eigvals(S_a S_b) formula, in float64
    mean_a, cov_a = gaussian_statistics(features_a)
    mean_b, cov_b = gaussian_statistics(features_b)
    torch.testing.assert_close(
        frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b),
        _compute_fid(mean_a, cov_a, mean_b, cov_b),
        atol=1e-8,
        rtol=1e-8,
    )
    torch.testing.assert_close(cov_a, torch.cov(features_a.T))


def test_frechet_distance_identical_sets_is_zero_and_errors() -> None:
    features = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(features, features).item()) < 1e-9
    with pytest.raises(ValueError, match="features_a: expected at least 2 samples, got 1"):
        frechet_distance(features[:1], features)
    with pytest.raises(ValueError, match="features_b: expected at least 2 samples, got 1"):
        frechet_distance(features, features[:1])
    with pytest.raises(ValueError, match=r"features_b: expected feature dimension D = 5 .* got 4"):
        frechet_distance(features, features[:, :4])
    with pytest.raises(ValueError, match=r"features_a: expected shape \[N, D\]"):
        frechet_distance(features[None], features)
    with pytest.raises(ValueError, match=r"covariance_b: expected shape \[5, 5\]"):
        frechet_distance_from_statistics(torch.zeros(5), torch.eye(5), torch.zeros(5), torch.eye(4))


# ------------------------------------------------------------------------------------------ KD
def _direct_kd(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    rows: list[tuple[torch.Tensor, torch.Tensor]],
    degree: int,
    gamma: float,
    coef: float,
) -> tuple[float, float]:
    """Unbiased MMD^2 written out pair by pair (i != j), over the given subsets, in float64."""

    def kernel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((gamma * torch.dot(x, y) + coef) ** degree)

    values = []
    for rows_a, rows_b in rows:
        x, y = features_a[rows_a].double(), features_b[rows_b].double()
        size = x.shape[0]
        same = sum(
            kernel(x[i], x[j]) + kernel(y[i], y[j]) for i in range(size) for j in range(size) if i != j
        )
        cross = sum(kernel(x[i], y[j]) for i in range(size) for j in range(size))
        values.append(same / (size * (size - 1)) - 2 * cross / size**2)
    stacked = torch.tensor(values, dtype=torch.float64)
    return stacked.mean().item(), stacked.std(correction=0).item()


def test_kernel_distance_matches_direct_formula_with_the_same_subsets() -> None:
    generator = torch.Generator().manual_seed(5)
    features_a = torch.randn(12, 4, generator=generator)
    features_b = torch.randn(15, 4, generator=generator) * 1.5 + 0.3
    subsets, subset_size = 4, 6
    replay = torch.Generator().manual_seed(11)
    rows = [
        (
            torch.randperm(12, generator=replay)[:subset_size],
            torch.randperm(15, generator=replay)[:subset_size],
        )
        for _ in range(subsets)
    ]
    for degree, gamma, coef in [(3, None, 1.0), (2, 0.5, 0.25)]:
        mean, std = kernel_distance(
            features_a,
            features_b,
            subsets=subsets,
            subset_size=subset_size,
            degree=degree,
            gamma=gamma,
            coef=coef,
            generator=torch.Generator().manual_seed(11),
        )
        expected = _direct_kd(features_a, features_b, rows, degree, 1 / 4 if gamma is None else gamma, coef)
        assert mean.dtype == torch.float64
        assert mean.item() == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
        assert std.item() == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
        assert std.item() > 0


@pytest.mark.parametrize("subset_size", [20, 9])
def test_kernel_distance_matches_torchmetrics_kid(subset_size: int) -> None:
    generator = torch.Generator().manual_seed(subset_size)
    features_a = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    features_b = torch.randn(20, 6, generator=generator, dtype=torch.float64) * 1.3 + 0.2
    reference = KernelInceptionDistance(feature=Identity(6), subsets=7, subset_size=subset_size)
    reference.update(features_a, real=True)
    reference.update(features_b, real=False)
    # torchmetrics draws subsets from the global generator: real first, then generated, per subset
    torch.manual_seed(123)
    expected_mean, expected_std = reference.compute()
    torch.manual_seed(123)
    mean, std = kernel_distance(features_a, features_b, subsets=7, subset_size=subset_size)
    torch.testing.assert_close(mean, expected_mean, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(std, expected_std, atol=1e-10, rtol=1e-6)
    if subset_size == 20:  # every subset is the whole set: no sampling noise
        assert std.item() < 1e-10


def test_kernel_distance_same_distribution_is_near_zero_and_errors() -> None:
    generator = torch.Generator().manual_seed(2)
    features_a = torch.randn(300, 8, generator=generator)
    features_b = torch.randn(300, 8, generator=generator)
    same, _ = kernel_distance(features_a, features_b, subsets=10, subset_size=200, generator=generator)
    shifted, _ = kernel_distance(
        features_a, features_b + 0.5, subsets=10, subset_size=200, generator=generator
    )
    assert shifted.item() > 0.05
    assert abs(same.item()) < 0.02 * shifted.item()
    with pytest.raises(ValueError, match=r"subset_size: expected 2 <= subset_size <= min\(N, M\) = 300"):
        kernel_distance(features_a, features_b)  # default subset_size 1000
    with pytest.raises(ValueError, match="subsets: expected >= 1, got 0"):
        kernel_distance(features_a, features_b, subsets=0, subset_size=10)
    with pytest.raises(ValueError, match="features_b: expected feature dimension"):
        kernel_distance(features_a, features_b[:, :3], subset_size=10)


# ------------------------------------------------------------------------------------------ accumulator
class MeanColour(torch.nn.Module):
    """A toy embedding: per-channel mean and std of each image, ``[B, 6]``."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1).double()


def test_feature_distances_streams_like_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(9)
    real = torch.rand(24, 3, 8, 8, generator=generator)
    fake = torch.rand(20, 3, 8, 8, generator=generator) ** 2
    metric = FeatureDistances(MeanColour())
    fid = FrechetInceptionDistance(feature=MeanColour())
    kid = KernelInceptionDistance(feature=MeanColour(), subsets=5, subset_size=10)
    for start in range(0, 24, 5):
        for peer in (metric, fid, kid):
            peer.update(real[start : start + 5], real=True)
    for start in range(0, 20, 6):
        for peer in (metric, fid, kid):
            peer.update(fake[start : start + 6], real=False)
    assert metric.num_real == 24 and metric.num_generated == 20
    torch.manual_seed(0)
    scores = metric.compute(subsets=5, subset_size=10)
    torch.manual_seed(0)
    kid_mean, kid_std = kid.compute()
    torch.testing.assert_close(scores.fd, fid.compute().double(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(scores.kd_mean, kid_mean, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(scores.kd_std, kid_std, atol=1e-10, rtol=1e-6)
    torch.testing.assert_close(metric.compute_fd(), scores.fd)
    assert (scores.num_real, scores.num_generated) == (24, 20)
    metric.reset()
    assert metric.num_real == 0
    with pytest.raises(ValueError, match="features_a: expected at least 2 samples, got 0"):
        metric.compute_fd()


def test_feature_distances_errors() -> None:
    metric = FeatureDistances()
    metric.update(torch.randn(4, 5), real=True)
    with pytest.raises(ValueError, match="features: expected dimension D = 5 as in earlier updates, got 3"):
        metric.update(torch.randn(4, 3), real=False)
    with pytest.raises(ValueError, match=r"images: expected shape \[B, D\]"):
        metric.update(torch.randn(4, 5, 1), real=False)
    bad = FeatureDistances(lambda images: images.flatten(1)[:1])
    with pytest.raises(ValueError, match=r"embedding output: expected shape \[B, D\] with B = 2"):
        bad.update(torch.rand(2, 3, 4, 4), real=True)
    with pytest.raises(TypeError, match="embedding: expected a callable"):
        FeatureDistances(embedding=3)


# ------------------------------------------------------------------------------------------ embeddings
def _tiny_dinov2(path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(path)
    return model


def _tiny_clip(path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(path)
    return model


def test_dinov2_embedding_is_final_norm_cls_token(tmp_path) -> None:
    model = _tiny_dinov2(tmp_path)
    embedding = DINOv2Embedding.from_pretrained(tmp_path, image_size=56)
    assert isinstance(embedding, ImageEmbedding) and embedding.dim == 32
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(pixel_values=(images - IMAGENET_MEAN) / IMAGENET_STD)
    torch.testing.assert_close(embedding(images), output.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    # other sizes are resized (bicubic, antialiased) to the model input first
    small = torch.rand(2, 3, 40, 30, generator=torch.Generator().manual_seed(2))
    pixels = F.interpolate(small, size=(56, 56), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        expected = model(pixel_values=(pixels - IMAGENET_MEAN) / IMAGENET_STD).pooler_output
    torch.testing.assert_close(DINOv2Embedding(model, image_size=56, batch_size=1)(small), expected)


def test_clip_embedding_and_clip_score(tmp_path) -> None:
    model = _tiny_clip(tmp_path)
    embedding = CLIPImageEmbedding.from_pretrained(tmp_path)
    assert embedding.image_size == 32 and embedding.dim == 8
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    others = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        vision = model.vision_model(pixel_values=(images - CLIP_MEAN) / CLIP_STD).pooler_output
        projected = model.visual_projection(vision)
    torch.testing.assert_close(embedding(images), projected, atol=1e-5, rtol=1e-5)

    assert clip_score(images, images, embedding).item() == pytest.approx(100.0, abs=1e-3)
    per_pair = clip_score(images, others, embedding, reduction="none")
    expected = 100 * F.cosine_similarity(embedding(images), embedding(others), dim=-1)
    torch.testing.assert_close(per_pair, expected)
    torch.testing.assert_close(clip_score(images, others, embedding), expected.mean().clamp(min=0))
    # the mean is clamped at 0 (as torchmetrics): opposite embeddings score 0, per pair -100
    flip = {"sign": 1.0}

    def alternating(batch: torch.Tensor) -> torch.Tensor:
        flip["sign"] = -flip["sign"]
        return flip["sign"] * batch.flatten(1)

    assert clip_score(images, images, alternating).item() == 0.0
    torch.testing.assert_close(
        clip_score(images, images, alternating, reduction="none"), torch.full((4,), -100.0)
    )
    # non-square inputs: shortest side resized, then centre-cropped
    wide = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(embedding(wide), embedding(wide[:, :, :, 8:40]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="references: expected the same"):
        clip_score(images, images[:2], embedding)


def test_missing_or_wrong_weights_say_which_folder_to_provide(tmp_path) -> None:
    for loader, layout in ((DINOv2Embedding, "Dinov2Model"), (CLIPImageEmbedding, "CLIPModel")):
        with pytest.raises(FileNotFoundError, match=f"no such folder.*Supply a local folder.*{layout}"):
            loader.from_pretrained(tmp_path / "absent")
        with pytest.raises(FileNotFoundError, match="it has no config.json"):
            loader.from_pretrained(tmp_path)
    _tiny_dinov2(tmp_path / "dino")
    with pytest.raises(FileNotFoundError, match="not a CLIP model"):
        CLIPImageEmbedding.from_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match=r"images: expected shape \[B, 3, H, W\]"):
        DINOv2Embedding.from_pretrained(tmp_path / "dino", image_size=56)(torch.rand(1, 4, 56, 56))
    with pytest.raises(TypeError, match="Dinov2Model"):
        DINOv2Embedding(torch.nn.Linear(2, 2))


def test_importing_metrics_loads_neither_transformers_nor_torchmetrics() -> None:
    code = (
        "import json, sys, sparse3d.metrics\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'torchmetrics'})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.gpu
def test_distribution_metrics_on_gpu_match_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    features_a = torch.randn(64, 16, generator=generator)
    features_b = torch.randn(64, 16, generator=generator) + 0.1
    expected_fd = frechet_distance(features_a, features_b)
    expected_kd = kernel_distance(
        features_a, features_b, subset_size=32, subsets=5, generator=torch.Generator().manual_seed(1)
    )
    got_fd = frechet_distance(features_a.cuda(), features_b.cuda())
    got_kd = kernel_distance(
        features_a.cuda(),
        features_b.cuda(),
        subset_size=32,
        subsets=5,
        generator=torch.Generator().manual_seed(1),
    )
    assert got_fd.device.type == "cuda"
    torch.testing.assert_close(got_fd.cpu(), expected_fd, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(got_kd[0].cpu(), expected_kd[0], atol=1e-10, rtol=1e-8)
    pred, target = _noisy_pair(0, 2, 3, 32)
    torch.testing.assert_close(
        psnr(pred.cuda(), target.cuda()).cpu(), psnr(pred, target), atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(
        ssim(pred.cuda(), target.cuda()).cpu(), ssim(pred, target), atol=1e-5, rtol=1e-5
    )
