"""Classifier-free guidance for velocity models: the combination formula, guidance rescale, an interval in t,
and a velocity wrapper that batches the unconditional and conditional passes into one model call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparse3d.flow.path import (
    FlowTensor,
    _check_flow_tensor,
    _check_same_structure,
    _like,
    _values,
    batch_size_of,
)
from sparse3d.flow.solvers import VelocityField
from sparse3d.functional.coords import segment_reduce
from sparse3d.tensor import SparseTensor

__all__ = [
    "ClassifierFreeGuidance",
    "GuidanceForm",
    "combine_guidance",
    "concat_batch",
    "rescale_guidance",
    "standard_scale",
]

GuidanceForm = Literal["standard", "trellis"]


def standard_scale(scale: float, form: GuidanceForm = "standard") -> float:
    """Converts a guidance scale of either form to the standard form's ``w``.

    TRELLIS's ``(1 + w') v_c - w' v_u`` equals ``v_u + (1 + w') (v_c - v_u)``: the same family with
    ``w = w' + 1``. So TRELLIS's ``cfg_strength = 3`` is ``w = 4`` here; ``w' = 0`` (no guidance) is
    ``w = 1``.

    Args:
        scale: The scale as written in ``form``.
        form: ``"standard"`` or ``"trellis"``.

    Returns:
        The equivalent standard ``w``.
    """
    if form == "standard":
        return float(scale)
    if form == "trellis":
        return float(scale) + 1.0
    raise ValueError(f"form: expected 'standard' or 'trellis', got {form!r}")


def _per_sample_std(x: FlowTensor, values: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of each sample's elements, broadcast back to the rows of ``values``."""
    if isinstance(x, SparseTensor):
        flat = values.flatten(1) if values.dim() > 1 else values[:, None]  # [N, F]
        width = flat.shape[1]
        counts = x.counts.long() * width  # elements per sample [B]
        sums = segment_reduce(flat.sum(dim=1), x.counts.long(), "sum")  # [B]
        mean = sums / counts.clamp(min=1)
        centred = flat - mean[x.batch_index, None]  # [N, F]
        squares = segment_reduce(centred.square().sum(dim=1), x.counts.long(), "sum")  # [B]
        std = (squares / (counts - 1).clamp(min=1)).sqrt()  # [B]
        return std[x.batch_index].reshape(-1, *([1] * (values.dim() - 1)))  # [N, 1, ...]
    dims = list(range(1, values.dim()))
    return values.std(dim=dims, keepdim=True)  # [B, 1, ...]


def rescale_guidance(guided: FlowTensor, conditional: FlowTensor, rescale: float) -> FlowTensor:
    r"""Guidance rescale (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4).

    ``v_r = v * std(v_c) / std(v)`` per sample, then ``phi v_r + (1 - phi) v``, where ``std`` is the unbiased
    standard deviation over the sample's elements (all voxels and channels for a SparseTensor), as in
    diffusers' ``rescale_noise_cfg``. Applied here to the velocity. A sample whose guided velocity has zero
    spread keeps its guided value.

    Args:
        guided: Guided velocity ``v``, dense ``[B, ...]`` or SparseTensor.
        conditional: Conditional velocity ``v_c``, same type and layout.
        rescale: ``phi`` in ``[0, 1]``; 0 returns ``guided`` unchanged.

    Returns:
        Same type and layout as ``guided``.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale: expected a value in [0, 1], got {rescale}")
    _check_flow_tensor(guided, "guided")
    _check_same_structure(guided, conditional, "guided", "conditional")
    if rescale == 0.0:
        return guided
    values = _values(guided)
    compute = torch.promote_types(values.dtype, torch.float32)
    guided_values = values.to(compute)
    std_guided = _per_sample_std(guided, guided_values)
    std_conditional = _per_sample_std(guided, _values(conditional).to(compute))
    ratio = torch.where(std_guided > 0, std_conditional / std_guided, torch.ones_like(std_guided))
    mixed = rescale * guided_values * ratio + (1.0 - rescale) * guided_values
    return _like(guided, mixed.to(values.dtype))


def combine_guidance(
    unconditional: FlowTensor,
    conditional: FlowTensor,
    scale: float,
    *,
    form: GuidanceForm = "standard",
    rescale: float = 0.0,
) -> FlowTensor:
    r"""Combines unconditional and conditional velocities.

    Standard form (diffusers, TRELLIS.2, FLUX3D): ``v = v_u + w (v_c - v_u)``; ``w = 1`` is the conditional
    model, ``w = 0`` the unconditional one. TRELLIS form: ``v = (1 + w') v_c - w' v_u``, which is the
    standard form with ``w = w' + 1`` (see [`standard_scale`][sparse3d.flow.standard_scale]). With
    ``rescale > 0`` the result goes through [`rescale_guidance`][sparse3d.flow.rescale_guidance].

    Args:
        unconditional: ``v_u``, dense ``[B, ...]`` or SparseTensor.
        conditional: ``v_c``, same type and layout.
        scale: ``w`` (standard) or ``w'`` (trellis).
        form: ``"standard"`` or ``"trellis"``.
        rescale: Guidance rescale ``phi`` in ``[0, 1]``.

    Returns:
        The guided velocity, same type and layout as ``conditional``.
    """
    w = standard_scale(scale, form)
    _check_flow_tensor(conditional, "conditional")
    _check_same_structure(conditional, unconditional, "conditional", "unconditional")
    v_u, v_c = _values(unconditional), _values(conditional)
    guided = _like(conditional, v_u + w * (v_c - v_u))
    return rescale_guidance(guided, conditional, rescale)


def concat_batch(first: Any, second: Any, name: str = "value") -> Any:
    """Concatenates two batches: dense along dim 0, SparseTensors as samples ``[first; second]``.

    Args:
        first: Dense ``[B1, ...]`` or SparseTensor with ``B1`` samples.
        second: Same type; dense ``[B2, ...]`` with equal trailing shape, or a SparseTensor with the same
            stride and feature shape.
        name: Argument name for error messages.

    Returns:
        Dense ``[B1 + B2, ...]``, or a SparseTensor with ``B1 + B2`` samples (spatial shape: the larger extent
        per axis).
    """
    if isinstance(first, SparseTensor) and isinstance(second, SparseTensor):
        if first.stride != second.stride or first.feats.shape[1:] != second.feats.shape[1:]:
            raise ValueError(
                f"{name}: expected SparseTensors with equal stride and feature shape, got {first!r} and "
                f"{second!r}"
            )
        shifted = second.coords.clone()
        shifted[:, 0] += first.batch_size
        coords = torch.cat([first.coords, shifted])  # [N1 + N2, 4]
        offsets = torch.cat([first.offsets, second.offsets[1:] + first.num_voxels])  # [B1 + B2 + 1]
        spatial = tuple(max(a, b) for a, b in zip(first.spatial_shape, second.spatial_shape, strict=True))
        return SparseTensor._from_parts(
            coords,
            torch.cat([first.feats, second.feats]),
            offsets,
            first.batch_size + second.batch_size,
            spatial,
            first.stride,
        )
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.dim() < 1 or first.shape[1:] != second.shape[1:]:
            raise ValueError(
                f"{name}: expected batches with equal trailing shapes, got {list(first.shape)} and "
                f"{list(second.shape)}"
            )
        return torch.cat([first, second])
    raise TypeError(
        f"{name}: expected two tensors or two SparseTensors, got {type(first).__name__} and "
        f"{type(second).__name__}"
    )


def _doubled(x: FlowTensor) -> FlowTensor:
    """``[x; x]`` as one batch; for a SparseTensor the doubled layout is cached on ``x``'s layout."""
    if isinstance(x, SparseTensor):

        def build() -> SparseTensor:
            empty = x.replace(x.feats.new_empty(x.num_voxels, 0))  # layout only, no feature memory kept
            return concat_batch(empty, empty, "x_t")

        layout = x.cached(("sparse3d.flow", "doubled"), build)
        return layout.replace(torch.cat([x.feats, x.feats]))
    return torch.cat([x, x])


def _split(x: FlowTensor, both: FlowTensor) -> tuple[FlowTensor, FlowTensor]:
    """Splits a doubled-batch model output into ``(first half, second half)`` with ``x``'s layout."""
    values = _values(both)
    rows = _values(x).shape[0]
    expected = (2 * rows, *_values(x).shape[1:])
    if not isinstance(both, type(x)) or tuple(values.shape) != expected:
        raise ValueError(
            f"velocity: expected the batched output to have values of shape {list(expected)} "
            f"({type(x).__name__}), got {type(both).__name__} {list(values.shape)}"
        )
    return _like(x, values[:rows]), _like(x, values[rows:])


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    r"""A guided velocity field wrapping a conditional model (itself a ``VelocityField``).

    For ``t`` inside ``interval`` (inclusive) it returns:

        v = v_u + w (v_c - v_u)                 form="standard" (scale = w)
        v = (1 + w') v_c - w' v_u               form="trellis"  (scale = w'), i.e. w = w' + 1

    then optional guidance rescale; outside the interval it returns ``v_c`` (one conditional pass).
    ``v_u = velocity(x_t, t, **null_condition)`` and ``v_c = velocity(x_t, t, **condition)`` run as one
    model call on the doubled batch ``[x_t; x_t]`` (unconditional first), with tensor condition entries
    concatenated the same way; SparseTensors are concatenated as samples. Entries that are not tensors
    (flags, ints) must be equal in both mappings and are passed once.

    A grid time inside or outside the interval is checked with one host sync per call (none when the
    interval is the full ``[0, 1]``). Samples whose ``t`` falls on different sides get their own rule.

    Attributes:
        velocity: The conditional model ``velocity(x_t, t, **condition)``.
        scale: ``w`` (standard) or ``w'`` (trellis).
        condition: Keyword arguments of the conditional pass (tensors with batch ``B`` first).
        null_condition: Keyword arguments of the unconditional pass (same keys, same shapes).
        form: ``"standard"`` or ``"trellis"``.
        interval: ``(a, b)`` with ``0 <= a <= b <= 1``: guidance applies for ``a <= t <= b``.
            TRELLIS uses ``(0.5, 1.0)``.
        rescale: Guidance rescale ``phi`` in ``[0, 1]``.

    Examples:
        >>> model = lambda x, t, image: x * 0 + image  # a toy conditional velocity
        >>> cfg = ClassifierFreeGuidance(
        ...     model, 3.0, condition={"image": torch.ones(2, 4)}, null_condition={"image": torch.zeros(2, 4)}
        ... )
        >>> cfg(torch.zeros(2, 4), torch.full((2,), 0.5))[0, 0].item()  # 0 + 3 * (1 - 0)
        3.0
    """

    velocity: VelocityField
    scale: float
    condition: Mapping[str, Any]
    null_condition: Mapping[str, Any]
    form: GuidanceForm = "standard"
    interval: tuple[float, float] = (0.0, 1.0)
    rescale: float = 0.0
    _batched: dict[str, Any] = field(init=False, repr=False, compare=False)
    _w: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_w", standard_scale(self.scale, self.form))
        if (
            not isinstance(self.interval, (tuple, list))
            or len(self.interval) != 2
            or not 0.0 <= self.interval[0] <= self.interval[1] <= 1.0
        ):
            raise ValueError(f"interval: expected (a, b) with 0 <= a <= b <= 1, got {self.interval}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"rescale: expected a value in [0, 1], got {self.rescale}")
        if set(self.condition) != set(self.null_condition):
            raise ValueError(
                f"null_condition: expected the keys of condition {sorted(self.condition)}, got "
                f"{sorted(self.null_condition)}"
            )
        batched: dict[str, Any] = {}
        for key, value in self.condition.items():
            null = self.null_condition[key]
            if isinstance(value, (torch.Tensor, SparseTensor)):
                batched[key] = concat_batch(null, value, f"condition[{key!r}]")
            elif value is null or value == null:
                batched[key] = value
            else:
                raise ValueError(
                    f"condition[{key!r}]: non-tensor entries must be equal in condition and null_condition, "
                    f"got {value!r} and {null!r}"
                )
        object.__setattr__(self, "_batched", batched)

    def _full_interval(self) -> bool:
        return self.interval[0] <= 0.0 and self.interval[1] >= 1.0

    def __call__(self, x_t: FlowTensor, t: torch.Tensor) -> FlowTensor:
        """Guided velocity at ``(x_t, t)``.

        Args:
            x_t: Dense ``[B, ...]`` or SparseTensor.
            t: Times ``[B]``.

        Returns:
            Same type and layout as ``x_t``.
        """
        _check_flow_tensor(x_t, "x_t")
        batch = batch_size_of(x_t)
        if not isinstance(t, torch.Tensor) or t.shape != (batch,):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: expected shape [B]=[{batch}], got {shape}")
        if self._w == 1.0 and self.rescale == 0.0:
            return self.velocity(x_t, t, **self.condition)  # guidance is the identity
        if self._full_interval():
            inside = None
        else:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])  # [B]
            if not bool(inside.any()):  # one host sync
                return self.velocity(x_t, t, **self.condition)
            if bool(inside.all()):
                inside = None
        both = self.velocity(_doubled(x_t), torch.cat([t, t]), **self._batched)
        unconditional, conditional = _split(x_t, both)
        guided = combine_guidance(unconditional, conditional, self._w, rescale=self.rescale)
        if inside is None:
            return guided
        per_row = inside[x_t.batch_index] if isinstance(x_t, SparseTensor) else inside  # [N] or [B]
        mask = per_row.reshape(-1, *([1] * (_values(x_t).dim() - 1)))  # [N or B, 1, ...]
        return _like(x_t, torch.where(mask, _values(guided), _values(conditional)))
