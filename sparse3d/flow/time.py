"""Training time samplers (uniform, logit-normal, mode), time shifts (static, dynamic) and sampling grids.

All times follow the flow convention: ``t = 0`` is data, ``t = 1`` is noise.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "ShiftKind",
    "TimeDistribution",
    "TimeSampler",
    "dynamic_shift_time",
    "linear_mu",
    "logit_normal_time",
    "mode_time",
    "shift_time",
    "time_grid",
    "uniform_time",
]

ShiftKind = Literal["exponential", "linear"]
TimeDistribution = Literal["uniform", "logit_normal", "mode"]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    r"""Static time shift ``t' = s t / (1 + (s - 1) t)``.

    Monotone increasing on ``[0, 1]`` with fixed points 0 and 1; ``s > 1`` moves times toward noise
    (``t = 1``), ``s < 1`` toward data, ``s = 1`` is the identity. It equals
    [`dynamic_shift_time`][sparse3d.flow.dynamic_shift_time] with ``mu = log(s)`` (exponential kind).
    TRELLIS calls ``s`` ``rescale_t``; diffusers calls it ``shift``.

    Args:
        t: Times in ``[0, 1]``, any shape.
        shift: ``s > 0``.

    Returns:
        Shifted times, same shape and dtype as ``t``.
    """
    if not shift > 0:
        raise ValueError(f"shift: expected a positive number, got {shift}")
    scaled = shift * t
    return scaled / (scaled + (1.0 - t))  # = s t / (1 + (s - 1) t), exact at t = 0 and t = 1


def dynamic_shift_time(
    t: torch.Tensor,
    mu: float | torch.Tensor,
    *,
    kind: ShiftKind = "exponential",
    power: float = 1.0,
) -> torch.Tensor:
    r"""Resolution-dependent shift as in FLUX/diffusers.

    ``exponential``: ``t' = e^mu / (e^mu + (1/t - 1)^power)``;
    ``linear``: ``t' = mu / (mu + (1/t - 1)^power)``.
    With ``power = 1`` the exponential kind is the static shift with ``s = e^mu``. Fixed points 0 and 1.

    Args:
        t: Times in ``[0, 1]``, any shape.
        mu: Shift parameter, a float or a tensor broadcastable to ``t`` (e.g. ``[B]`` from per-sample
            token counts via [`linear_mu`][sparse3d.flow.linear_mu]). Must be positive for ``linear``.
        kind: ``"exponential"`` (FLUX) or ``"linear"``.
        power: Exponent on ``(1/t - 1)``, positive (diffusers' ``sigma``, 1 in FLUX).

    Returns:
        Shifted times, same shape as ``t`` (broadcast with ``mu``).
    """
    if kind not in ("exponential", "linear"):
        raise ValueError(f"kind: expected 'exponential' or 'linear', got {kind!r}")
    if not power > 0:
        raise ValueError(f"power: expected a positive number, got {power}")
    mu_t = torch.as_tensor(mu, dtype=t.dtype, device=t.device)
    scale = mu_t.exp() if kind == "exponential" else mu_t
    if kind == "linear" and bool((mu_t <= 0).any()):
        raise ValueError(f"mu: expected positive values for kind='linear', got {mu}")
    odds = (1.0 / t - 1.0) ** power  # inf at t = 0, 0 at t = 1
    return scale / (scale + odds)


def linear_mu(
    num_tokens: int | float | torch.Tensor,
    *,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float | torch.Tensor:
    r"""FLUX's ``mu``, linear in the token count.

    ``base_shift`` at ``base_tokens`` and ``max_shift`` at ``max_tokens``,
    ``mu = base_shift + (num_tokens - base_tokens) (max_shift - base_shift) / (max_tokens - base_tokens)``,
    not clamped outside the range (as in FLUX). For a SparseTensor pass ``x.counts`` to get one ``mu``
    per sample.

    Args:
        num_tokens: Token count, an int or a tensor (e.g. ``[B]``).
        base_tokens: Token count mapped to ``base_shift``.
        max_tokens: Token count mapped to ``max_shift``; must differ from ``base_tokens``.
        base_shift: ``mu`` at ``base_tokens``.
        max_shift: ``mu`` at ``max_tokens``.

    Returns:
        A float, or a float32 tensor of ``num_tokens``'s shape.
    """
    if max_tokens == base_tokens:
        raise ValueError(
            f"max_tokens: expected a value different from base_tokens={base_tokens}, got {max_tokens}"
        )
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    intercept = base_shift - slope * base_tokens
    if isinstance(num_tokens, torch.Tensor):
        return num_tokens.to(torch.float32) * slope + intercept
    return float(num_tokens) * slope + intercept


def _apply_shift(
    t: torch.Tensor, shift: float, mu: float | torch.Tensor | None, kind: ShiftKind
) -> torch.Tensor:
    if mu is not None and shift != 1.0:
        raise ValueError(
            f"shift and mu: pass either a static shift or a dynamic mu, not both (got shift={shift}, "
            f"mu={mu}); shifting twice is a known porting trap"
        )
    if mu is not None:
        return dynamic_shift_time(t, mu, kind=kind)
    return shift_time(t, shift) if shift != 1.0 else t


def _check_mu(mu: object) -> float | torch.Tensor | None:
    """``mu`` as a float, a float64 tensor ``[B]`` (one per sample), or None; anything else raises."""
    if mu is None:
        return None
    if isinstance(mu, torch.Tensor):
        if mu.dim() > 1 or mu.dtype == torch.bool or mu.dtype.is_complex:
            raise TypeError(
                f"mu: expected a float or a real tensor [B] (one per sample), got a {mu.dtype} tensor of "
                f"shape {list(mu.shape)}"
            )
        if mu.dim() == 0:
            mu = float(mu)
        else:
            mu = mu.to(torch.float64)
            if mu.numel() == 0 or not bool(mu.isfinite().all()):
                raise ValueError(f"mu: expected finite values, one per sample (B >= 1), got {mu.tolist()}")
            return mu
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real):
        raise TypeError(f"mu: expected a float or a tensor [B] (one per sample), got {type(mu).__name__}")
    if not math.isfinite(mu):
        raise ValueError(f"mu: expected a finite number, got {mu}")
    return float(mu)


def time_grid(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | torch.Tensor | None = None,
    kind: ShiftKind = "exponential",
    start: float = 1.0,
    end: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A sampling time grid: ``linspace(start, end, num_steps + 1)``, then an optional shift.

    With the defaults it runs from noise (1) to data (0). ``shift`` gives TRELLIS's ``rescale_t`` grid;
    ``mu`` gives the FLUX grid (dynamic shift). Both equal diffusers'
    ``FlowMatchEulerDiscreteScheduler`` sigmas for ``sigmas=linspace(1, 1/N, N)`` plus the appended 0.
    A tensor ``mu [B]`` (e.g. ``linear_mu(x.counts)`` for a ragged SparseTensor batch) gives one grid per
    sample, ``[B, S + 1]``, which [`solve`][sparse3d.flow.solve] integrates in one batched call.
    Computed in float64, then cast to ``dtype``.

    Args:
        num_steps: Number of solver steps ``S >= 1``.
        shift: Static shift ``s > 0`` (1 = none).
        mu: Dynamic-shift parameter (see [`dynamic_shift_time`][sparse3d.flow.dynamic_shift_time]): a
            float (or 0-d tensor) for one grid, or a tensor ``[B]`` for one grid per sample; not together
            with ``shift != 1``.
        kind: Dynamic shift kind, ``"exponential"`` or ``"linear"``.
        start: First time, in ``[0, 1]``.
        end: Last time, in ``[0, 1]``, different from ``start``.
        device: Device of the result (default: that of a tensor ``mu``, else the CPU).
        dtype: Floating dtype of the result.

    Returns:
        Tensor ``[S + 1]``, or ``[B, S + 1]`` for a tensor ``mu [B]``, each row monotone from
        ``shifted(start)`` to ``shifted(end)``.

    Raises:
        TypeError: ``mu`` is neither a number nor a real tensor of at most one dimension.
        ValueError: ``num_steps``, ``start``/``end``, ``shift`` or ``mu`` out of range, or both ``shift``
            and ``mu`` given.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0) or start == end:
        raise ValueError(f"start and end: expected two different values in [0, 1], got {start} and {end}")
    mu = _check_mu(mu)
    per_sample = isinstance(mu, torch.Tensor)
    if device is None and per_sample:
        device = mu.device
    grid = torch.linspace(
        start, end, num_steps + 1, dtype=torch.float64, device=mu.device if per_sample else None
    )
    if per_sample:
        grid, mu = grid[None, :], mu[:, None]  # [1, S + 1] and [B, 1]: one grid per sample
    grid = _apply_shift(grid, shift, mu, kind)  # [S + 1] or [B, S + 1]
    return grid.to(device=device, dtype=dtype)


def _uniform(batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size: expected a non-negative integer, got {batch_size!r}")
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)


def uniform_time(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Times ``t ~ U[0, 1)``.

    Args:
        batch_size: Number of samples ``B``.
        generator: Optional generator (drawn on its device, then moved to ``device``).
        device: Device of the result (default: the generator's device, else CPU).

    Returns:
        float32 tensor ``[B]``.
    """
    t = _uniform(batch_size, generator)
    return t if device is None else t.to(device)


def logit_normal_time(
    batch_size: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Times ``t = sigmoid(mean + std n)``, ``n ~ N(0, 1)``: ``logit(t)`` is normal (SD3, TRELLIS).

    With ``t = 1`` as noise, ``mean > 0`` favours noisy times; TRELLIS uses ``mean = 1, std = 1``
    (median ``t = sigmoid(1) = 0.73``).

    Args:
        batch_size: Number of samples ``B``.
        mean: Mean of ``logit(t)``.
        std: Standard deviation of ``logit(t)``, positive.
        generator: Optional generator.
        device: Device of the result.

    Returns:
        float32 tensor ``[B]`` in ``(0, 1)``.
    """
    if not std > 0:
        raise ValueError(f"std: expected a positive number, got {std}")
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size: expected a non-negative integer, got {batch_size!r}")
    gen_device = generator.device if generator is not None else "cpu"
    normal = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float32)
    t = torch.sigmoid(mean + std * normal)
    return t if device is None else t.to(device)


def mode_time(
    batch_size: int,
    *,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""SD3's "mode" sampling ``t = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U[0, 1)``.

    ``s = 0`` is uniform; ``s > 0`` concentrates times around ``t = 1/2``. ``t`` is used directly as our
    time (diffusers' DreamBooth scripts flip it through a timestep table; for this symmetric density the
    flip does not change the distribution).

    Args:
        batch_size: Number of samples ``B``.
        mode_scale: ``s`` in ``[-1, 2 / (pi - 2)]`` so the map stays monotone and inside ``[0, 1]``.
        generator: Optional generator.
        device: Device of the result.

    Returns:
        float32 tensor ``[B]`` in ``[0, 1]``.
    """
    if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(f"mode_scale: expected a value in [-1, {2 / (math.pi - 2):.4f}], got {mode_scale}")
    u = _uniform(batch_size, generator)
    t = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    t = t.clamp(0.0, 1.0)  # float rounding only: the exact map stays in [0, 1]
    return t if device is None else t.to(device)


@dataclass(frozen=True, kw_only=True)
class TimeSampler:
    """Training-time sampler: a base distribution, then an optional static or dynamic shift.

    Attributes:
        distribution: ``"uniform"``, ``"logit_normal"`` or ``"mode"``.
        mean: Mean of ``logit(t)`` for ``logit_normal``.
        std: Standard deviation of ``logit(t)`` for ``logit_normal``.
        mode_scale: ``s`` for ``mode``.
        shift: Static shift ``s > 0`` applied after sampling (1 = none).
        shift_kind: Kind of the dynamic shift used when ``mu`` is passed to ``__call__``.

    Examples:
        >>> sampler = TimeSampler(distribution="logit_normal", mean=1.0, std=1.0)  # TRELLIS
        >>> t = sampler(4, generator=torch.Generator().manual_seed(0))
        >>> t.shape
        torch.Size([4])
    """

    distribution: TimeDistribution = "uniform"
    mean: float = 0.0
    std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    shift_kind: ShiftKind = "exponential"

    def __post_init__(self) -> None:
        if self.distribution not in ("uniform", "logit_normal", "mode"):
            raise ValueError(
                f"distribution: expected 'uniform', 'logit_normal' or 'mode', got {self.distribution!r}"
            )
        if not self.shift > 0:
            raise ValueError(f"shift: expected a positive number, got {self.shift}")
        if self.shift_kind not in ("exponential", "linear"):
            raise ValueError(f"shift_kind: expected 'exponential' or 'linear', got {self.shift_kind!r}")

    def __call__(
        self,
        batch_size: int,
        *,
        mu: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draws one time per sample.

        Args:
            batch_size: Number of samples ``B``.
            mu: Optional dynamic-shift parameter, a float or a tensor ``[B]`` (e.g.
                ``linear_mu(x.counts)`` for a SparseTensor); not together with ``shift != 1``.
            generator: Optional generator.
            device: Device of the result.

        Returns:
            float32 tensor ``[B]`` in ``[0, 1]``.
        """
        if self.distribution == "uniform":
            t = uniform_time(batch_size, generator=generator)
        elif self.distribution == "logit_normal":
            t = logit_normal_time(batch_size, mean=self.mean, std=self.std, generator=generator)
        else:
            t = mode_time(batch_size, mode_scale=self.mode_scale, generator=generator)
        if isinstance(mu, torch.Tensor):
            if mu.dim() > 1 or (mu.dim() == 1 and mu.shape[0] != batch_size):
                raise ValueError(f"mu: expected a float or shape [B]=[{batch_size}], got {list(mu.shape)}")
            mu = mu.to(device=t.device, dtype=t.dtype)
        t = _apply_shift(t, self.shift, mu, self.shift_kind)
        return t if device is None else t.to(device)
