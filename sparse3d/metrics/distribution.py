"""Distribution metrics over feature sets: Frechet distance (FD) and kernel distance (KD, unbiased MMD).

Both run in float64. [`FeatureDistances`][sparse3d.metrics.distribution.FeatureDistances] streams
real and generated batches through an embedding network and computes FD/KD at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "DistributionScores",
    "FeatureDistances",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "kernel_distance",
]


def _check_features(features: torch.Tensor, name: str, minimum: int = 2) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, D], got {list(features.shape)}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {features.dtype}")
    if features.shape[0] < minimum:
        raise ValueError(f"{name}: expected at least {minimum} samples, got {features.shape[0]}")


def _check_same_width(features_a: torch.Tensor, features_b: torch.Tensor) -> None:
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"features_b: expected feature dimension D = {features_a.shape[1]} (that of features_a), "
            f"got {features_b.shape[1]}"
        )


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of a feature set, in float64.

    Args:
        features: ``[N, D]`` features, ``N >= 2``.

    Returns:
        ``(mean [D], covariance [D, D])`` in float64; the covariance divides by ``N - 1``.
    """
    _check_features(features, "features")
    features = features.double()
    mean = features.mean(dim=0)  # [D]
    centred = features - mean  # [N, D]
    covariance = centred.T @ centred / (features.shape[0] - 1)  # [D, D]
    return mean, covariance


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues become 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    roots = eigenvalues.clamp(min=0).sqrt()  # [D]
    return (eigenvectors * roots) @ eigenvectors.T


def frechet_distance_from_statistics(
    mean_a: torch.Tensor,
    covariance_a: torch.Tensor,
    mean_b: torch.Tensor,
    covariance_b: torch.Tensor,
) -> torch.Tensor:
    r"""Frechet distance between the Gaussians ``N(mean_a, covariance_a)`` and ``N(mean_b, covariance_b)``.

    ``FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})``.

    The trace of the matrix square root is computed without a general (non-symmetric) ``sqrtm``:
    ``S_a S_b`` is similar to the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``, so
    ``tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i)`` over that matrix's eigenvalues. Both steps use
    ``eigh`` (symmetric eigendecomposition, real and stable) in float64, and round-off negatives are
    clamped to 0 before the square roots, so rank-deficient covariances (fewer samples than feature
    dimensions) give a finite, real result. scipy's ``sqrtm`` (dgm-eval, pytorch-fid) and torchmetrics'
    ``eigvals(S_a S_b)`` compute the same quantity for well-conditioned inputs.

    Args:
        mean_a: ``[D]`` mean.
        covariance_a: ``[D, D]`` symmetric PSD covariance.
        mean_b: ``[D]`` mean.
        covariance_b: ``[D, D]`` symmetric PSD covariance.

    Returns:
        Scalar float64 distance (``>= 0`` up to round-off).
    """
    width = mean_a.shape[-1] if mean_a.dim() == 1 else None
    if width is None:
        raise ValueError(f"mean_a: expected shape [D], got {list(mean_a.shape)}")
    for name, tensor, shape in (
        ("mean_b", mean_b, (width,)),
        ("covariance_a", covariance_a, (width, width)),
        ("covariance_b", covariance_b, (width, width)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    root_a = _psd_sqrt(covariance_a)  # [D, D]
    product = root_a @ covariance_b @ root_a  # [D, D], symmetric PSD, similar to S_a S_b
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)  # [D]
    trace_root = eigenvalues.clamp(min=0).sqrt().sum()
    mean_term = (mean_a - mean_b).square().sum()
    return mean_term + covariance_a.trace() + covariance_b.trace() - 2.0 * trace_root


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Frechet distance (FID / FD-DINOv2) between two feature sets, each fitted with a Gaussian.

    Computed in float64; see
    [`frechet_distance_from_statistics`][sparse3d.metrics.distribution.frechet_distance_from_statistics]
    for the matrix square root. With fewer samples than feature dimensions the covariances are
    rank-deficient: the value is finite but biased, so report FD with many more samples than ``D``.

    Args:
        features_a: ``[N, D]`` features, ``N >= 2``.
        features_b: ``[M, D]`` features, ``M >= 2``.

    Returns:
        Scalar float64 distance (0 for identical sets).
    """
    _check_features(features_a, "features_a")
    _check_features(features_b, "features_b")
    _check_same_width(features_a, features_b)
    return frechet_distance_from_statistics(
        *gaussian_statistics(features_a), *gaussian_statistics(features_b)
    )


def _unbiased_mmd(
    features_a: torch.Tensor, features_b: torch.Tensor, degree: int, gamma: float, coef: float
) -> torch.Tensor:
    """Unbiased MMD^2 with the polynomial kernel ``(gamma x.y + coef)^degree`` between equal-size sets."""
    size = features_a.shape[0]
    kernel_aa = (gamma * features_a @ features_a.T + coef) ** degree  # [m, m]
    kernel_bb = (gamma * features_b @ features_b.T + coef) ** degree  # [m, m]
    kernel_ab = (gamma * features_a @ features_b.T + coef) ** degree  # [m, m]
    within = (kernel_aa.sum() - kernel_aa.diagonal().sum()) + (kernel_bb.sum() - kernel_bb.diagonal().sum())
    return within / (size * (size - 1)) - 2.0 * kernel_ab.sum() / size**2


def kernel_distance(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel distance (KID / KD-DINOv2): unbiased polynomial-kernel MMD^2 averaged over random subsets.

    For each of ``subsets`` draws, ``subset_size`` rows of each set are sampled without replacement and
    the unbiased MMD^2 with ``k(x, y) = (gamma x.y + coef)^degree`` (``gamma = 1 / D`` by default) is
    computed in float64; the result is the mean and the population standard deviation over draws, as
    torchmetrics' ``KernelInceptionDistance`` and dgm-eval. Each draw samples ``torch.randperm`` of the
    first set, then of the second, from ``generator`` (the global CPU generator when ``None``, which
    reproduces torchmetrics' draws under the same seed). ``subset_size`` larger than a set is an error,
    not silently reduced. Papers often report KD x 1e3.

    Args:
        features_a: ``[N, D]`` features.
        features_b: ``[M, D]`` features.
        subsets: Number of random subsets (>= 1).
        subset_size: Rows per subset, ``2 <= subset_size <= min(N, M)``.
        degree: Polynomial degree.
        gamma: Kernel scale; ``None`` for ``1 / D``.
        coef: Kernel offset.
        generator: CPU random generator for the subset draws.

    Returns:
        ``(mean, std)``: scalar float64 tensors (the mean is ~0 for identical distributions and may be
        slightly negative, being unbiased).
    """
    _check_features(features_a, "features_a")
    _check_features(features_b, "features_b")
    _check_same_width(features_a, features_b)
    if subsets < 1:
        raise ValueError(f"subsets: expected >= 1, got {subsets}")
    smallest = min(features_a.shape[0], features_b.shape[0])
    if subset_size < 2 or subset_size > smallest:
        raise ValueError(
            f"subset_size: expected 2 <= subset_size <= min(N, M) = {smallest} samples, got {subset_size}"
        )
    if degree < 1:
        raise ValueError(f"degree: expected >= 1, got {degree}")
    gamma = 1.0 / features_a.shape[1] if gamma is None else float(gamma)
    features_a, features_b = features_a.double(), features_b.double()
    values = []
    for _ in range(subsets):
        rows_a = torch.randperm(features_a.shape[0], generator=generator)[:subset_size]
        rows_b = torch.randperm(features_b.shape[0], generator=generator)[:subset_size]
        subset_a = features_a[rows_a.to(features_a.device)]  # [m, D]
        subset_b = features_b[rows_b.to(features_b.device)]  # [m, D]
        values.append(_unbiased_mmd(subset_a, subset_b, degree, gamma, coef))
    stacked = torch.stack(values)  # [subsets]
    return stacked.mean(), stacked.std(correction=0)


@dataclass(frozen=True)
class DistributionScores:
    """FD and KD between the real and generated feature sets.

    Attributes:
        fd: Scalar float64 Frechet distance.
        kd_mean: Scalar float64 mean kernel distance over subsets.
        kd_std: Scalar float64 standard deviation over subsets.
        num_real: Number of real samples.
        num_generated: Number of generated samples.
    """

    fd: torch.Tensor
    kd_mean: torch.Tensor
    kd_std: torch.Tensor
    num_real: int
    num_generated: int


class FeatureDistances:
    """Streaming FD/KD: feed real and generated batches, compute once at the end.

    Each update runs ``embedding`` (any callable mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to
    ``[B, D]``, e.g. [`DINOv2Embedding`][sparse3d.metrics.embeddings.DINOv2Embedding]) under
    ``torch.no_grad`` and keeps the features on their device; ``embedding=None`` takes features directly.
    Updates do not synchronise with the host (only shapes are checked); values are only read in
    ``compute``. Features are kept (KD needs them): ``N x D`` floats per side.

    Args:
        embedding: Feature network, or ``None`` to pass ``[B, D]`` features to ``update``.
        features_dtype: Dtype the features are stored in (float64 is the most exact; float32 halves memory).

    Example:
        >>> metric = FeatureDistances()
        >>> generator = torch.Generator().manual_seed(0)
        >>> metric.update(torch.randn(8, 4, generator=generator), real=True)
        >>> metric.update(torch.randn(8, 4, generator=generator) + 1.0, real=False)
        >>> scores = metric.compute(subsets=5, subset_size=8, generator=generator)
        >>> bool(scores.fd > 0), scores.num_real, scores.num_generated
        (True, 8, 8)
    """

    def __init__(
        self,
        embedding: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        features_dtype: torch.dtype = torch.float64,
    ) -> None:
        if embedding is not None and not callable(embedding):
            raise TypeError(f"embedding: expected a callable or None, got {type(embedding).__name__}")
        if not features_dtype.is_floating_point:
            raise TypeError(f"features_dtype: expected a floating dtype, got {features_dtype}")
        self.embedding = embedding
        self.features_dtype = features_dtype
        self._real: list[torch.Tensor] = []
        self._generated: list[torch.Tensor] = []
        self._width: int | None = None

    def reset(self) -> None:
        """Forgets all features."""
        self._real, self._generated, self._width = [], [], None

    @property
    def num_real(self) -> int:
        """Number of real samples seen."""
        return sum(batch.shape[0] for batch in self._real)

    @property
    def num_generated(self) -> int:
        """Number of generated samples seen."""
        return sum(batch.shape[0] for batch in self._generated)

    def update(self, images: torch.Tensor, *, real: bool) -> None:
        """Embeds one batch and stores its features.

        Args:
            images: ``[B, 3, H, W]`` images in ``[0, 1]`` (or ``[B, D]`` features without an embedding).
            real: ``True`` for reference (real) samples, ``False`` for generated ones.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if self.embedding is None:
            features = images
        else:
            if images.dim() != 4:
                raise ValueError(f"images: expected shape [B, 3, H, W], got {list(images.shape)}")
            with torch.no_grad():
                features = self.embedding(images)
            if not isinstance(features, torch.Tensor):
                raise TypeError(
                    f"embedding: expected it to return a torch.Tensor, got {type(features).__name__}"
                )
        if features.dim() != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"{'images' if self.embedding is None else 'embedding output'}: expected shape "
                f"[B, D] with B = {images.shape[0]}, got {list(features.shape)}"
            )
        if self._width is not None and features.shape[1] != self._width:
            raise ValueError(
                f"features: expected dimension D = {self._width} as in earlier updates, "
                f"got {features.shape[1]}"
            )
        self._width = int(features.shape[1])
        (self._real if real else self._generated).append(features.detach().to(self.features_dtype))

    def features(self, *, real: bool) -> torch.Tensor:
        """All stored features of one side.

        Args:
            real: Which side.

        Returns:
            ``[N, D]`` features (``[0, 0]`` before any update).
        """
        batches = self._real if real else self._generated
        if not batches:
            return torch.zeros(0, self._width or 0, dtype=self.features_dtype)
        return torch.cat(batches)

    def compute_fd(self) -> torch.Tensor:
        """Frechet distance between the real and generated features (see [`frechet_distance`][sparse3d.metrics.distribution.frechet_distance]).

        Returns:
            Scalar float64 tensor.
        """  # noqa: E501
        return frechet_distance(self.features(real=True), self.features(real=False))

    def compute_kd(self, **kernel_options: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel distance between the real and generated features.

        Args:
            **kernel_options: Keyword arguments of
                [`kernel_distance`][sparse3d.metrics.distribution.kernel_distance] (``subsets``,
                ``subset_size``, ``degree``, ``gamma``, ``coef``, ``generator``).

        Returns:
            ``(mean, std)`` scalar float64 tensors.
        """
        return kernel_distance(self.features(real=True), self.features(real=False), **kernel_options)

    def compute(self, **kernel_options: object) -> DistributionScores:
        """FD and KD together.

        Args:
            **kernel_options: Passed to [`compute_kd`][sparse3d.metrics.distribution.FeatureDistances.compute_kd].

        Returns:
            [`DistributionScores`][sparse3d.metrics.distribution.DistributionScores].
        """  # noqa: E501
        real, generated = self.features(real=True), self.features(real=False)
        kd_mean, kd_std = kernel_distance(real, generated, **kernel_options)
        return DistributionScores(
            fd=frechet_distance(real, generated),
            kd_mean=kd_mean,
            kd_std=kd_std,
            num_real=real.shape[0],
            num_generated=generated.shape[0],
        )
