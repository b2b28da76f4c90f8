"""`Gaussians`: a batch of 3D Gaussian splat sets in packed form (like `SparseTensor`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sparse3d.gaussians.sh import sh_degree_from_bases

__all__ = ["Gaussians"]

_FIELDS = ("means", "quats", "scales", "opacities", "sh")


class Gaussians:
    r"""A batch of ``B`` sets of 3D Gaussians, packed into one list of ``N`` Gaussians.

    The Gaussians of one sample are contiguous and samples appear in batch order; ``offsets``
    (where each sample starts, plus the total) plays the role it has in
    [`SparseTensor`][sparse3d.tensor.SparseTensor]:

        sample 0: 3 Gaussians     sample 1: none     sample 2: 2 Gaussians

        row   means [N, 3]  quats [N, 4]  scales [N, 3]  opacities [N]  sh [N, K, 3]
         0    m0            q0            s0             o0             c0  ┐
         1    m1            q1            s1             o1             c1  │ sample 0
         2    m2            q2            s2             o2             c2  ┘
         3    m3            q3            s3             o3             c3  ┐ sample 2
         4    m4            q4            s4             o4             c4  ┘
        offsets = [0, 3, 3, 5]  [B + 1]

    Fields (the conventions of gsplat's ``rasterization``):

    * ``means``: float ``[N, 3]`` world positions;
    * ``quats``: float ``[N, 4]`` rotations as quaternions ``(w, x, y, z)``; they need not be
      normalised (renderers normalise), but must be non-zero;
    * ``scales``: float ``[N, 3]`` *activated* standard deviations along the rotated axes, ``> 0``;
    * ``opacities``: float ``[N]`` *activated* opacities in ``(0, 1)``;
    * ``sh``: float ``[N, K, 3]`` SH colour coefficients, ``K`` in ``{1, 4, 9, 16}`` (degree 0..3);
      the colour seen from direction ``d`` is ``max(eval_sh(sh, d) + 0.5, 0)``.

    All fields share one dtype and device. The object is immutable: methods return new objects.

    Examples:
        >>> g = Gaussians(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.1),
        ...               torch.full((2,), 0.5), torch.zeros(2, 1, 3), offsets=torch.tensor([0, 1, 2]))
        >>> g.batch_size, g.num_gaussians, g.sh_degree
        (2, 2, 0)
    """

    __slots__ = ("means", "quats", "scales", "opacities", "sh", "offsets")

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor
    offsets: torch.Tensor

    def __init__(
        self,
        means: torch.Tensor,
        quats: torch.Tensor,
        scales: torch.Tensor,
        opacities: torch.Tensor,
        sh: torch.Tensor,
        *,
        offsets: torch.Tensor | Sequence[int] | None = None,
        check: bool = True,
    ) -> None:
        """Builds a packed batch of Gaussians.

        Args:
            means: ``[N, 3]`` world positions.
            quats: ``[N, 4]`` quaternions ``(w, x, y, z)``.
            scales: ``[N, 3]`` activated scales (> 0).
            opacities: ``[N]`` activated opacities in (0, 1).
            sh: ``[N, K, 3]`` SH coefficients, ``K`` in {1, 4, 9, 16}.
            offsets: Integer ``[B + 1]`` sample boundaries (non-decreasing, from 0 to N); ``None``
                means one sample holding all ``N`` Gaussians.
            check: Also check values (offsets non-decreasing from 0 to N; finite, scales > 0, opacities in
                (0, 1), quats non-zero).
                Shapes, dtypes and devices are always checked. Value checks synchronise with the device.
        """
        for name, value in zip(_FIELDS, (means, quats, scales, opacities, sh), strict=True):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        count = means.shape[0] if means.dim() >= 1 else -1
        expected = {
            "means": (count, 3),
            "quats": (count, 4),
            "scales": (count, 3),
            "opacities": (count,),
        }
        for name, value in zip(_FIELDS[:4], (means, quats, scales, opacities), strict=True):
            if tuple(value.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {list(expected[name])}, got {list(value.shape)}")
        if sh.dim() != 3 or sh.shape[0] != count or sh.shape[2] != 3:
            raise ValueError(f"sh must have shape [{count}, K, 3], got {list(sh.shape)}")
        sh_degree_from_bases(sh.shape[1])
        for name, value in zip(_FIELDS[1:], (quats, scales, opacities, sh), strict=True):
            if value.dtype != means.dtype:
                raise TypeError(
                    f"{name} has dtype {value.dtype}, expected {means.dtype} (the dtype of means)"
                )
            if value.device != means.device:
                raise ValueError(
                    f"{name} is on {value.device}, expected {means.device} (the device of means)"
                )
        if offsets is None:
            offsets = torch.tensor([0, count], dtype=torch.int64, device=means.device)
        else:
            offsets = torch.as_tensor(offsets, device=means.device)
            if offsets.dtype not in (torch.int32, torch.int64) or offsets.dim() != 1 or offsets.numel() < 2:
                raise ValueError(
                    f"offsets must be an integer tensor [B + 1] with B >= 1, got dtype {offsets.dtype} "
                    f"and shape {list(offsets.shape)}"
                )
            offsets = offsets.to(torch.int64)
        if check:  # reading the offsets' values synchronises with the device
            bounds = offsets.tolist()
            if (
                bounds[0] != 0
                or bounds[-1] != count
                or any(a > b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            ):
                raise ValueError(f"offsets must be non-decreasing from 0 to N={count}, got {bounds}")
        self.means, self.quats, self.scales, self.opacities, self.sh = means, quats, scales, opacities, sh
        self.offsets = offsets
        if check:
            self.validate()

    def validate(self) -> Gaussians:
        """Checks value ranges; raises ``ValueError`` naming the first offending field.

        Returns:
            ``self``, for chaining.
        """
        with torch.no_grad():
            for name in _FIELDS:
                value = getattr(self, name)
                bad = ~torch.isfinite(value)
                if bool(bad.any()):
                    raise ValueError(f"{name} must be finite, got {int(bad.sum())} non-finite values")
            if self.scales.numel() and float(self.scales.min()) <= 0:
                raise ValueError(f"scales must be > 0 (activated), got minimum {float(self.scales.min())}")
            if self.opacities.numel():
                low, high = float(self.opacities.min()), float(self.opacities.max())
                if low <= 0 or high >= 1:
                    raise ValueError(f"opacities must lie in (0, 1) (activated), got range [{low}, {high}]")
            if self.quats.numel() and float(self.quats.norm(dim=-1).min()) == 0:
                raise ValueError("quats must be non-zero, got a zero quaternion")
        return self

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return self.offsets.numel() - 1

    @property
    def num_gaussians(self) -> int:
        """Total number of Gaussians ``N`` over the batch."""
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        """SH degree implied by ``K``."""
        return sh_degree_from_bases(self.sh.shape[1])

    @property
    def device(self) -> torch.device:
        """Device of all fields."""
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of all fields."""
        return self.means.dtype

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` number of Gaussians per sample (int64)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def batch_index(self) -> torch.Tensor:
        """``[N]`` sample index of every Gaussian (int64)."""
        return torch.repeat_interleave(
            torch.arange(self.batch_size, device=self.device), self.counts, output_size=self.num_gaussians
        )

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"Gaussians(batch_size={self.batch_size}, num_gaussians={self.num_gaussians}, "
            f"sh_degree={self.sh_degree}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ conversions
    def replace(self, **fields: torch.Tensor) -> Gaussians:
        """Returns a copy with some fields replaced (same offsets); shapes are re-checked, values not.

        Args:
            **fields: Any of ``means``, ``quats``, ``scales``, ``opacities``, ``sh``.

        Returns:
            The new Gaussians.
        """
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise TypeError(
                f"replace() got unknown fields {sorted(unknown)}; expected some of {list(_FIELDS)}"
            )
        values = {name: fields.get(name, getattr(self, name)) for name in _FIELDS}
        return Gaussians(**values, offsets=self.offsets, check=False)

    def to(self, *args: Any, **kwargs: Any) -> Gaussians:
        """Moves/casts the float fields like ``torch.Tensor.to`` (offsets follow the device only).

        Args:
            *args: Forwarded to ``torch.Tensor.to`` (a device, a dtype, or both).
            **kwargs: Forwarded to ``torch.Tensor.to``.

        Returns:
            The converted Gaussians.
        """
        values = {name: getattr(self, name).to(*args, **kwargs) for name in _FIELDS}
        offsets = self.offsets.to(values["means"].device)
        return Gaussians(**values, offsets=offsets, check=False)

    def detach(self) -> Gaussians:
        """Returns the same Gaussians with every field detached from autograd."""
        return Gaussians(**{n: getattr(self, n).detach() for n in _FIELDS}, offsets=self.offsets, check=False)

    def sample(self, index: int) -> Gaussians:
        """Returns one sample as a single-sample batch (views, no copy).

        Args:
            index: Sample index in ``[-B, B)``.

        Returns:
            Gaussians with ``batch_size == 1``.
        """
        size = self.batch_size
        if not -size <= index < size:
            raise IndexError(f"sample index must be in [{-size}, {size}), got {index}")
        index %= size
        start, end = (int(v) for v in self.offsets[index : index + 2].tolist())
        values = {name: getattr(self, name)[start:end] for name in _FIELDS}
        return Gaussians(**values, offsets=[0, end - start], check=False)

    def unbind(self) -> list[Gaussians]:
        """Splits the batch into ``B`` single-sample Gaussians (views)."""
        return [self.sample(i) for i in range(self.batch_size)]

    def select(self, samples: Sequence[int] | torch.Tensor) -> Gaussians:
        """Returns the samples at the given indices, in that order (repeats allowed).

        Args:
            samples: ``[S]`` sample indices, each in ``[-B, B)``; at least one.

        Returns:
            Gaussians with ``batch_size == S``.
        """
        indices = torch.as_tensor(samples).flatten().tolist()
        if not indices:
            raise ValueError("samples must name at least one sample, got an empty selection")
        return Gaussians.concat([self.sample(int(i)) for i in indices])

    @staticmethod
    def concat(batches: Sequence[Gaussians]) -> Gaussians:
        """Concatenates batches along the batch dimension (samples stay separate).

        Args:
            batches: Non-empty sequence of Gaussians with equal ``K``, dtype and device.

        Returns:
            Gaussians with ``sum(b.batch_size)`` samples.
        """
        if len(batches) == 0:
            raise ValueError("concat needs at least one Gaussians batch, got none")
        first = batches[0]
        for i, other in enumerate(batches):
            if not isinstance(other, Gaussians):
                raise TypeError(f"batches[{i}] must be Gaussians, got {type(other).__name__}")
            if other.sh.shape[1] != first.sh.shape[1]:
                raise ValueError(
                    f"batches[{i}] has K={other.sh.shape[1]} SH coefficients, "
                    f"batches[0] has {first.sh.shape[1]}"
                )
            if other.dtype != first.dtype or other.device != first.device:
                raise ValueError(
                    f"batches[{i}] is {other.dtype} on {other.device}, "
                    f"batches[0] is {first.dtype} on {first.device}"
                )
        values = {name: torch.cat([getattr(b, name) for b in batches]) for name in _FIELDS}
        pieces, total = [torch.zeros(1, dtype=torch.int64, device=first.device)], 0
        for other in batches:
            pieces.append(other.offsets[1:].to(first.device) + total)
            total += other.num_gaussians
        return Gaussians(**values, offsets=torch.cat(pieces), check=False)
