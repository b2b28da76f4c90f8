"""Stateless ODE solvers (Euler, Heun, midpoint) that integrate a velocity field over a time grid.

Sampling runs from noise (``t = 1``) to data (``t = 0``); the update is ``x_next = x + (t_next - t) v``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from sparse3d.flow.path import (
    FlowTensor,
    _check_flow_tensor,
    _check_same_structure,
    _like,
    _values,
    batch_size_of,
    expand_time,
    noise_like,
)

__all__ = [
    "SolverMethod",
    "SolverOutput",
    "StepInfo",
    "VelocityField",
    "euler_step",
    "generate",
    "heun_step",
    "midpoint_step",
    "solve",
]

SolverMethod = Literal["euler", "heun", "midpoint"]


class VelocityField(Protocol):
    """The model protocol: ``velocity(x_t, t, **condition) -> v`` with ``v`` of ``x_t``'s type and layout.

    ``x_t`` is a dense tensor ``[B, ...]`` or a SparseTensor; ``t`` is a float tensor ``[B]`` in ``[0, 1]``
    (not multiplied by 1000: a model that wants ``1000 t`` scales it itself).
    """

    def __call__(self, x_t: FlowTensor, t: torch.Tensor, **condition: Any) -> FlowTensor: ...


@dataclass(frozen=True)
class StepInfo:
    """What a solver step passes to the callback.

    Attributes:
        step: Index of the step, ``0 .. num_steps - 1``.
        num_steps: Number of steps ``S``.
        t: Time at the start of the step: a 0-d tensor, or ``[B]`` for per-sample grids.
        t_next: Time at the end of the step (0-d or ``[B]``).
        x: State at ``t``.
        x_next: State at ``t_next``.
        velocity: Velocity evaluated at ``(x, t)`` (the first evaluation of the step).
    """

    step: int
    num_steps: int
    t: torch.Tensor
    t_next: torch.Tensor
    x: FlowTensor
    x_next: FlowTensor
    velocity: FlowTensor


@dataclass(frozen=True)
class SolverOutput:
    """Result of [`solve`][sparse3d.flow.solve].

    Attributes:
        sample: State at the last grid time (data, for a grid ending at 0).
        times: The grid that was used, ``[S + 1]`` or ``[B, S + 1]`` (one row per sample).
        num_evaluations: Number of velocity calls (S for Euler, 2S for Heun and midpoint).
        trajectory: States at every grid time (``S + 1`` entries, the first is ``x_init``) when
            requested, else None.
    """

    sample: FlowTensor
    times: torch.Tensor
    num_evaluations: int
    trajectory: tuple[FlowTensor, ...] | None = None


def _evaluate(
    velocity: VelocityField, x: FlowTensor, t: torch.Tensor, condition: Mapping[str, Any]
) -> FlowTensor:
    batch = batch_size_of(x)
    v = velocity(x, t.expand(batch), **condition)  # t [] -> [B]
    _check_same_structure(x, v, "x_t", "velocity(x_t, t)")
    return v


def _advance(x: FlowTensor, direction: FlowTensor, step: torch.Tensor) -> FlowTensor:
    """``x + step * direction`` in float32 or wider, cast back to ``x``'s dtype.

    ``step`` is 0-d (one grid) or ``[B]`` (per-sample grids, broadcast to each sample's rows).
    """
    values = _values(x)
    compute = torch.promote_types(values.dtype, torch.float32)
    if step.dim() == 1:
        step = expand_time(step, x)  # [B] -> [B or N, 1, ..., 1]
    out = values.to(compute) + step.to(compute) * _values(direction).to(compute)
    return _like(x, out.to(values.dtype))


def euler_step(
    velocity: VelocityField,
    x: FlowTensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    condition: Mapping[str, Any] | None = None,
) -> tuple[FlowTensor, FlowTensor]:
    """One explicit Euler step ``x_next = x + (t_next - t) v(x, t)`` (first order).

    Args:
        velocity: The model (see [`VelocityField`][sparse3d.flow.VelocityField]).
        x: State at ``t``, dense ``[B, ...]`` or SparseTensor.
        t: Current time, a 0-d tensor on ``x``'s device, or ``[B]`` (one per sample).
        t_next: Next time, of ``t``'s shape.
        condition: Keyword arguments for the model.

    Returns:
        ``(x_next, v(x, t))``.
    """
    v = _evaluate(velocity, x, t, condition or {})
    return _advance(x, v, t_next - t), v


def heun_step(
    velocity: VelocityField,
    x: FlowTensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    condition: Mapping[str, Any] | None = None,
) -> tuple[FlowTensor, FlowTensor]:
    """One Heun (explicit trapezoid) step, second order, two velocity calls.

    ``x_pred = x + h v(x, t)``, ``x_next = x + h (v(x, t) + v(x_pred, t_next)) / 2`` with ``h = t_next - t``.
    The corrector also runs on the last step (a velocity model is defined at ``t = 0``).

    Args:
        velocity: The model.
        x: State at ``t``.
        t: Current time (0-d tensor, or ``[B]`` for per-sample grids).
        t_next: Next time, of ``t``'s shape.
        condition: Keyword arguments for the model.

    Returns:
        ``(x_next, v(x, t))``.
    """
    condition = condition or {}
    h = t_next - t
    v = _evaluate(velocity, x, t, condition)
    predicted = _advance(x, v, h)
    v_next = _evaluate(velocity, predicted, t_next, condition)
    average = _like(x, 0.5 * (_values(v) + _values(v_next)))
    return _advance(x, average, h), v


def midpoint_step(
    velocity: VelocityField,
    x: FlowTensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    condition: Mapping[str, Any] | None = None,
) -> tuple[FlowTensor, FlowTensor]:
    """One explicit midpoint step, second order, two velocity calls.

    ``x_mid = x + (h / 2) v(x, t)``, ``x_next = x + h v(x_mid, t + h / 2)`` with ``h = t_next - t``.

    Args:
        velocity: The model.
        x: State at ``t``.
        t: Current time (0-d tensor, or ``[B]`` for per-sample grids).
        t_next: Next time, of ``t``'s shape.
        condition: Keyword arguments for the model.

    Returns:
        ``(x_next, v(x, t))``.
    """
    condition = condition or {}
    h = t_next - t
    v = _evaluate(velocity, x, t, condition)
    middle = _advance(x, v, 0.5 * h)
    v_middle = _evaluate(velocity, middle, t + 0.5 * h, condition)
    return _advance(x, v_middle, h), v


_STEPS: dict[str, tuple[Callable[..., tuple[FlowTensor, FlowTensor]], int]] = {
    "euler": (euler_step, 1),
    "heun": (heun_step, 2),
    "midpoint": (midpoint_step, 2),
}


def _check_grid(times: object, batch_size: int) -> torch.Tensor:
    """Validates a grid ``[S + 1]`` or per-sample grids ``[B, S + 1]`` (one host sync)."""
    if not isinstance(times, torch.Tensor) or not times.dtype.is_floating_point:
        kind = f"a {times.dtype} tensor" if isinstance(times, torch.Tensor) else type(times).__name__
        raise TypeError(f"times: expected a floating-point tensor [S + 1] or [B, S + 1], got {kind}")
    if times.dim() not in (1, 2) or times.shape[-1] < 2:
        raise ValueError(
            f"times: expected shape [S + 1] or [B, S + 1] with S >= 1 steps, got {list(times.shape)}"
        )
    if times.dim() == 2 and times.shape[0] != batch_size:
        raise ValueError(
            f"times: expected one grid per sample, shape [B, S + 1] with B={batch_size}, got "
            f"{list(times.shape)}"
        )
    diffs = times.diff(dim=-1)
    monotone = (diffs < 0).all(dim=-1) | (diffs > 0).all(dim=-1)  # [] or [B]
    checks = torch.stack([((times < 0) | (times > 1) | times.isnan()).any(), ~monotone.all()]).tolist()
    if checks[0]:
        raise ValueError(f"times: expected values in [0, 1] (0 = data, 1 = noise), got {times.tolist()}")
    if checks[1]:
        raise ValueError(f"times: expected a strictly monotone grid (each row), got {times.tolist()}")
    return times


def solve(
    velocity: VelocityField,
    x_init: FlowTensor,
    times: torch.Tensor,
    *,
    method: SolverMethod = "euler",
    condition: Mapping[str, Any] | None = None,
    callback: Callable[[StepInfo], FlowTensor | None] | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SolverOutput:
    """Integrates ``dx/dt = velocity(x, t)`` from ``times[0]`` to ``times[-1]``.

    With a grid from 1 to 0 (see [`time_grid`][sparse3d.flow.time_grid]) this turns noise into data.
    Stateless and deterministic: no scheduler object, no step index; the same inputs give the same
    output. Every velocity call receives ``t`` as a ``[B]`` tensor. For classifier-free guidance pass a
    [`ClassifierFreeGuidance`][sparse3d.flow.ClassifierFreeGuidance] as ``velocity``.

    Args:
        velocity: The model (see [`VelocityField`][sparse3d.flow.VelocityField]).
        x_init: Initial state at ``times[0]``, dense ``[B, ...]`` or SparseTensor (e.g. from
            [`noise_like`][sparse3d.flow.noise_like]).
        times: Strictly monotone grid ``[S + 1]`` in ``[0, 1]``, or one grid per sample ``[B, S + 1]``
            (e.g. ``time_grid(S, mu=linear_mu(x.counts))`` for a ragged batch: sample ``b`` steps along
            row ``b``, exactly as a solve of that sample alone); steps are computed in its dtype and
            it is moved to ``x_init``'s device.
        method: ``"euler"`` (1 call/step), ``"heun"`` or ``"midpoint"`` (2 calls/step, second order).
        condition: Keyword arguments passed to every velocity call.
        callback: Called after each step with a [`StepInfo`][sparse3d.flow.StepInfo]; if it returns a
            tensor of the state's type and layout, that replaces ``x_next`` (e.g. for inpainting);
            None keeps it.
        progress: Show a tqdm progress bar.
        return_trajectory: Keep the state at every grid time.

    Returns:
        A [`SolverOutput`][sparse3d.flow.SolverOutput].
    """
    if method not in _STEPS:
        raise ValueError(f"method: expected one of {sorted(_STEPS)}, got {method!r}")
    _check_flow_tensor(x_init, "x_init")
    times = _check_grid(times, batch_size_of(x_init)).to(_values(x_init).device)
    step_fn, calls_per_step = _STEPS[method]
    num_steps = times.shape[-1] - 1
    steps: Any = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"flow {method}", total=num_steps)
    x = x_init
    trajectory = [x] if return_trajectory else None
    for i in steps:
        t, t_next = times[..., i], times[..., i + 1]  # [] or [B]
        x_next, v = step_fn(velocity, x, t, t_next, condition)
        if callback is not None:
            replacement = callback(StepInfo(i, num_steps, t, t_next, x, x_next, v))
            if replacement is not None:
                _check_same_structure(x_next, replacement, "x_next", "callback(...) result")
                x_next = replacement
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return SolverOutput(
        sample=x,
        times=times,
        num_evaluations=num_steps * calls_per_step,
        trajectory=None if trajectory is None else tuple(trajectory),
    )


def generate(
    velocity: VelocityField,
    template: FlowTensor,
    times: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **solve_options: Any,
) -> SolverOutput:
    """Draws ``x_init ~ N(0, I)`` shaped like ``template`` and [`solve`][sparse3d.flow.solve]s.

    Deterministic given ``generator``: the noise is drawn on the generator's device, so a CPU generator
    gives the same starting point on every device.

    Args:
        velocity: The model.
        template: Dense ``[B, ...]`` or SparseTensor giving shape, dtype, device and layout (values unused).
        times: Grid ``[S + 1]`` (usually from 1 to 0), or per-sample grids ``[B, S + 1]``.
        generator: Generator for the initial noise.
        **solve_options: Keyword arguments of [`solve`][sparse3d.flow.solve] (``method``, ``condition``,
            ``callback``, ``progress``, ``return_trajectory``).

    Returns:
        A [`SolverOutput`][sparse3d.flow.SolverOutput].
    """
    return solve(velocity, noise_like(template, generator=generator), times, **solve_options)
