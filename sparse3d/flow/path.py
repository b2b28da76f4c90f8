"""The linear (rectified-flow) probability path between data and noise, for dense and sparse tensors.

Time convention: ``t = 0`` is data, ``t = 1`` is noise, ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from sparse3d.tensor import SparseTensor

__all__ = ["FlowTensor", "LinearPath", "PathSample", "batch_size_of", "expand_time", "noise_like"]

FlowTensor = Union[torch.Tensor, SparseTensor]  # noqa: UP007 (a runtime alias; mkdocstrings renders it)
"""A dense batch ``[B, ...]`` or a packed [`SparseTensor`][sparse3d.tensor.SparseTensor] ``[N, ...]``."""


def _values(x: FlowTensor) -> torch.Tensor:
    """The underlying values: the dense tensor itself, or a SparseTensor's feats ``[N, ...]``."""
    return x.feats if isinstance(x, SparseTensor) else x


def _like(template: FlowTensor, values: torch.Tensor) -> FlowTensor:
    """Wraps ``values`` in the type (and, for sparse, the layout) of ``template``."""
    return template.replace(values) if isinstance(template, SparseTensor) else values


def _check_flow_tensor(x: object, name: str) -> None:
    if not isinstance(x, (torch.Tensor, SparseTensor)):
        raise TypeError(f"{name}: expected a torch.Tensor [B, ...] or a SparseTensor, got {type(x).__name__}")
    if isinstance(x, torch.Tensor) and x.dim() < 1:
        raise ValueError(f"{name}: expected a batch [B, ...] with at least one dimension, got a 0-d tensor")
    if not _values(x).dtype.is_floating_point:
        raise TypeError(f"{name}: expected floating-point values, got {_values(x).dtype}")


def _check_same_structure(reference: FlowTensor, other: object, reference_name: str, name: str) -> None:
    """Raises unless ``other`` has the type, layout and value shape of ``reference``."""
    if isinstance(reference, SparseTensor):
        if not isinstance(other, SparseTensor):
            raise TypeError(
                f"{name}: expected a SparseTensor like {reference_name}, got {type(other).__name__}"
            )
        reference._check_layout(other, name, reference_name)
    elif not isinstance(other, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor like {reference_name}, got {type(other).__name__}")
    if _values(other).shape != _values(reference).shape:
        raise ValueError(
            f"{name}: expected values of shape {list(_values(reference).shape)} (as {reference_name}), got "
            f"{list(_values(other).shape)}"
        )
    if _values(other).device != _values(reference).device:
        raise ValueError(f"{name}: expected device {_values(reference).device}, got {_values(other).device}")


def batch_size_of(x: FlowTensor) -> int:
    """Number of samples ``B``: ``x.shape[0]`` for a dense batch, ``x.batch_size`` for a SparseTensor.

    Args:
        x: A dense tensor ``[B, ...]`` or a SparseTensor.

    Returns:
        ``B``.
    """
    return x.batch_size if isinstance(x, SparseTensor) else int(x.shape[0])


def _check_time(t: object, batch_size: int, name: str = "t", check_range: bool = True) -> torch.Tensor:
    """Validates a per-sample time vector ``[B]`` in ``[0, 1]`` (the range check is one host sync)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name}: expected a float tensor of shape [B]=[{batch_size}], got {type(t).__name__}"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch_size:
        raise ValueError(
            f"{name}: expected one time per sample, shape [B]=[{batch_size}], got {list(t.shape)}"
        )
    if check_range and t.numel() and bool(((t < 0) | (t > 1) | t.isnan()).any()):
        bad = t[(t < 0) | (t > 1) | t.isnan()]
        raise ValueError(f"{name}: expected values in [0, 1] (0 = data, 1 = noise), got {bad.tolist()}")
    return t


def expand_time(t: torch.Tensor, x: FlowTensor) -> torch.Tensor:
    """Broadcasts one time per sample to the rows of ``x``'s values.

    Dense ``x [B, ...]`` gets ``t`` viewed as ``[B, 1, ..., 1]``; a SparseTensor with feats ``[N, ...]``
    gets ``t[x.batch_index]`` viewed as ``[N, 1, ..., 1]``, so every voxel sees its own sample's time.

    Args:
        t: Tensor ``[B]``.
        x: A dense tensor ``[B, ...]`` or a SparseTensor with ``B`` samples.

    Returns:
        Tensor broadcastable against ``x``'s values (``[B, 1, ...]`` or ``[N, 1, ...]``), on ``x``'s device.
    """
    _check_time(t, batch_size_of(x), check_range=False)
    values = _values(x)
    t = t.to(values.device)
    per_row = t[x.batch_index] if isinstance(x, SparseTensor) else t  # [N] or [B]
    return per_row.reshape(-1, *([1] * (values.dim() - 1)))  # [N or B, 1, ..., 1]


def noise_like(x: FlowTensor, *, generator: torch.Generator | None = None) -> FlowTensor:
    """Standard normal noise with the shape, dtype, device (and sparse layout) of ``x``.

    The noise is drawn on the generator's device and then moved, so a CPU generator gives the same
    numbers on every device.

    Args:
        x: A dense tensor ``[B, ...]`` or a SparseTensor (only its layout and value shape are used).
        generator: Optional ``torch.Generator`` for reproducible draws.

    Returns:
        Same type as ``x``: dense ``[B, ...]`` or a SparseTensor with feats ``[N, ...]`` on ``x``'s layout.
    """
    _check_flow_tensor(x, "x")
    values = _values(x)
    device = generator.device if generator is not None else values.device
    noise = torch.randn(values.shape, generator=generator, device=device, dtype=values.dtype)
    return _like(x, noise.to(values.device))


@dataclass(frozen=True)
class PathSample:
    """A point on the path and its regression target.

    Returned by [`LinearPath.sample`][sparse3d.flow.LinearPath.sample].

    Attributes:
        x_t: Noisy input ``x_t`` (dense ``[B, ...]`` or SparseTensor), to feed the model.
        target: Velocity target ``d x_t / d t`` (same type and layout as ``x_t``).
        t: Times ``[B]``, one per sample.
        noise: The noise ``eps`` used (same type and layout as ``x_t``).
    """

    x_t: FlowTensor
    target: FlowTensor
    t: torch.Tensor
    noise: FlowTensor


@dataclass(frozen=True)
class LinearPath:
    r"""The linear interpolation path of rectified flow, with TRELLIS's optional ``sigma_min``.

    With ``s = sigma_min``:

        x_t    = alpha(t) x0 + sigma(t) eps,   alpha(t) = 1 - t,   sigma(t) = s + (1 - s) t
        target = d x_t / d t = (1 - s) eps - x0

    ``sigma_min = 0`` (the default) is the plain rectified flow used by diffusers/FLUX: ``x_t =
    (1 - t) x0 + t eps`` and ``v = eps - x0``. TRELLIS trains with ``sigma_min = 1e-5``. ``t = 0`` is
    data and ``t = 1`` is noise. The path is stateless; every method accepts dense tensors ``[B, ...]``
    and SparseTensors, with one time per sample broadcast through the batch index.

    Attributes:
        sigma_min: Noise scale left at ``t = 0``, in ``[0, 1)``.

    Examples:
        >>> path = LinearPath()
        >>> x0 = torch.zeros(2, 3)
        >>> s = path.sample(x0, torch.tensor([0.25, 1.0]), noise=torch.ones(2, 3))
        >>> s.x_t[:, 0].tolist(), s.target[0, 0].item()
        ([0.25, 1.0], 1.0)
    """

    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min: expected a value in [0, 1), got {self.sigma_min}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Data coefficient ``alpha(t) = 1 - t`` (any shape)."""
        return 1.0 - t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise coefficient ``sigma(t) = sigma_min + (1 - sigma_min) t`` (any shape)."""
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def _coefficients(self, t: torch.Tensor, x: FlowTensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """``alpha, sigma`` broadcast to ``x``'s rows, in ``float32`` or wider, and the output dtype."""
        dtype = _values(x).dtype
        compute = torch.promote_types(dtype, torch.float32)
        per_row = expand_time(t, x).to(device=_values(x).device, dtype=compute)  # [B or N, 1, ...]
        return self.alpha(per_row), self.sigma(per_row), dtype

    def interpolate(self, x0: FlowTensor, noise: FlowTensor, t: torch.Tensor) -> FlowTensor:
        """``x_t = alpha(t) x0 + sigma(t) noise`` with one time per sample.

        Args:
            x0: Data, dense ``[B, ...]`` or SparseTensor.
            noise: Noise of the same type, shape and layout.
            t: Times ``[B]`` in ``[0, 1]``.

        Returns:
            ``x_t``, same type and layout as ``x0``.
        """
        self._check_pair(x0, noise, t)
        alpha, sigma, dtype = self._coefficients(t, x0)
        values = alpha * _values(x0) + sigma * _values(noise)
        return _like(x0, values.to(dtype))

    def target(self, x0: FlowTensor, noise: FlowTensor) -> FlowTensor:
        """The velocity target ``(1 - sigma_min) noise - x0`` (independent of ``t``).

        Args:
            x0: Data, dense ``[B, ...]`` or SparseTensor.
            noise: Noise of the same type, shape and layout.

        Returns:
            Same type and layout as ``x0``.
        """
        _check_flow_tensor(x0, "x0")
        _check_same_structure(x0, noise, "x0", "noise")
        return _like(x0, (1.0 - self.sigma_min) * _values(noise) - _values(x0))

    def sample(
        self,
        x0: FlowTensor,
        t: torch.Tensor,
        noise: FlowTensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """Draws ``x_t`` and the velocity target for a training step.

        Args:
            x0: Clean data, dense ``[B, ...]`` or SparseTensor with ``B`` samples.
            t: Times ``[B]`` in ``[0, 1]``, one per sample (see [`TimeSampler`][sparse3d.flow.TimeSampler]).
            noise: Optional noise of the same type, shape and layout as ``x0``; drawn from ``N(0, 1)``
                with ``generator`` when omitted.
            generator: Generator for the noise when ``noise`` is None.

        Returns:
            A [`PathSample`][sparse3d.flow.PathSample] with ``x_t``, ``target``, ``t`` and ``noise``.

        Raises:
            ValueError: ``t`` is not ``[B]`` or leaves ``[0, 1]``; ``noise`` does not match ``x0``.
        """
        _check_flow_tensor(x0, "x0")
        if noise is None:
            noise = noise_like(x0, generator=generator)
        x_t = self.interpolate(x0, noise, t)
        return PathSample(x_t=x_t, target=self.target(x0, noise), t=t, noise=noise)

    def x0_from_velocity(self, x_t: FlowTensor, velocity: FlowTensor, t: torch.Tensor) -> FlowTensor:
        """Recovers the data estimate ``x0 = (1 - s) x_t - sigma(t) v`` from a velocity.

        The path's Jacobian determinant ``alpha sigma' - sigma alpha'`` equals 1, which makes this and
        [`noise_from_velocity`][sparse3d.flow.LinearPath.noise_from_velocity] exact inverses of
        ``(x0, eps) -> (x_t, v)``.

        Args:
            x_t: Noisy input, dense ``[B, ...]`` or SparseTensor.
            velocity: Velocity of the same type and layout.
            t: Times ``[B]`` in ``[0, 1]``.

        Returns:
            Same type and layout as ``x_t``.
        """
        self._check_pair(x_t, velocity, t, names=("x_t", "velocity"))
        _, sigma, dtype = self._coefficients(t, x_t)
        values = (1.0 - self.sigma_min) * _values(x_t) - sigma * _values(velocity)
        return _like(x_t, values.to(dtype))

    def noise_from_velocity(self, x_t: FlowTensor, velocity: FlowTensor, t: torch.Tensor) -> FlowTensor:
        """Recovers the noise estimate ``eps = x_t + (1 - t) v`` from a velocity.

        Args:
            x_t: Noisy input, dense ``[B, ...]`` or SparseTensor.
            velocity: Velocity of the same type and layout.
            t: Times ``[B]`` in ``[0, 1]``.

        Returns:
            Same type and layout as ``x_t``.
        """
        self._check_pair(x_t, velocity, t, names=("x_t", "velocity"))
        alpha, _, dtype = self._coefficients(t, x_t)
        values = _values(x_t) + alpha * _values(velocity)
        return _like(x_t, values.to(dtype))

    @staticmethod
    def _check_pair(
        first: FlowTensor, second: FlowTensor, t: torch.Tensor, names: tuple[str, str] = ("x0", "noise")
    ) -> None:
        _check_flow_tensor(first, names[0])
        _check_same_structure(first, second, names[0], names[1])
        _check_time(t, batch_size_of(first))
