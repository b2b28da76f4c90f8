"""Sparse 3D convolution (submanifold, strided, transposed) as gather -> GEMM with a scatter-free backward.

The plain-PyTorch implementation here runs on CPU and CUDA and is bitwise deterministic run to run;
``backend="spconv"`` dispatches submanifold convolutions to spconv(-triton) when installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from sparse3d.functional.coords import (
    _triple,
    coarse_coords,
    invert_kernel_map,
    kernel_map,
    kernel_offsets,
    pack_keys,
    subdivide_coords,
    unpack_keys,
)
from sparse3d.kernels import resolve_backend

if TYPE_CHECKING:
    from sparse3d.tensor import SparseTensor

__all__ = [
    "LayoutRule",
    "sparse_conv3d",
    "conv_output_layout",
    "weight_from_dense",
    "weight_to_dense",
    "weight_from_spconv",
    "weight_to_spconv",
    "weight_from_minkowski",
    "weight_to_minkowski",
    "GATHER_CHUNK_ELEMENTS",
]

LayoutRule = Literal["parents", "reached"]
"""Which output voxels a convolution without ``out_layout`` produces.

* ``"parents"`` (the default): the layout of the matching pooling op. Submanifold (stride 1): the input
  voxels. Strided: the parents ``floor(coords / s)``, what a factor-``s`` downsample gives (MinkowskiEngine's
  strided output is also the strided input coordinates). Transposed: all ``s^3`` children of every input
  voxel, what a subdivide gives. ``kernel_size`` and ``dilation`` do not change the layout.
* ``"reached"``: every voxel of the dense output grid whose kernel window holds at least one active input
  (spconv's ``SparseConv3d`` and ``SparseConvTranspose3d``; the non-zero pattern of the dense convolution
  of the occupancy). The grid is that of ``F.conv3d`` / ``F.conv_transpose3d`` with
  ``padding = dilation * ((size - 1) // 2)``; voxels the kernel reaches outside it are not outputs of the
  dense convolution either. At stride 1 this is the "full" (non-submanifold) sparse convolution, which
  dilates the layout by the kernel.

For kernel 3, stride 2 (no dilation) the ``"reached"`` layout holds the parents plus the coarse voxels whose
window only grazes the input; both rules compute the same features where they share a voxel.
"""

_LAYOUT_RULES = ("parents", "reached")

GATHER_CHUNK_ELEMENTS = 1 << 28
"""Largest gathered block ``rows * K * C_in`` materialised at once; bigger problems are processed in row
chunks (same results up to the order of float additions in the weight gradient, which stays fixed)."""

IntOr3 = int | Sequence[int]


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class _ConvPlan:
    """Everything a convolution needs besides the features: output layout and both index maps.

    ``gather_index`` is the kernel map ``[M, K]`` with missing entries (``-1``) replaced by ``N`` (the row
    of an appended zero vector); ``inverse_index`` (built on first backward) is the inverted map
    ``[N, K]`` with missing entries replaced by ``M``.
    """

    out_layout: SparseTensor
    kmap: torch.Tensor
    num_inputs: int
    gather_index: torch.Tensor = field(init=False)
    _inverse_index: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.gather_index = torch.where(self.kmap >= 0, self.kmap, self.num_inputs)  # [M, K]

    @property
    def inverse_index(self) -> torch.Tensor:
        if self._inverse_index is None:
            inverse = invert_kernel_map(self.kmap, self.num_inputs)  # [N, K]
            self._inverse_index = torch.where(inverse >= 0, inverse, self.kmap.shape[0])
        return self._inverse_index


def _layout_from_coords(
    like: SparseTensor,
    coords: torch.Tensor,
    spatial_shape: tuple[int, int, int],
    stride: tuple[int, int, int],
) -> SparseTensor:
    """A SparseTensor with zero-width feats over ``coords`` (valid by construction: no checks)."""
    bounds = torch.arange(like.batch_size + 1, device=coords.device, dtype=torch.int32)
    offsets = torch.searchsorted(coords[:, 0].contiguous(), bounds).to(torch.int32)
    placeholder = torch.empty(coords.shape[0], 0, device=coords.device)
    return type(like)._from_parts(coords, placeholder, offsets, like.batch_size, spatial_shape, stride)


def _dense_output_shape(
    spatial_shape: tuple[int, int, int],
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    dilation: tuple[int, int, int],
    transposed: bool,
) -> tuple[int, int, int]:
    """Output extent of ``F.conv3d`` (or ``F.conv_transpose3d``) with ``padding = d * ((k - 1) // 2)``."""
    shape = []
    for extent, k, s, d in zip(spatial_shape, kernel_size, stride, dilation, strict=True):
        padding = d * ((k - 1) // 2)
        if transposed:
            shape.append((extent - 1) * s - 2 * padding + d * (k - 1) + 1)
        else:
            shape.append((extent + 2 * padding - d * (k - 1) - 1) // s + 1)
    if min(shape) < 1:
        raise ValueError(
            f"kernel_size: the dense output grid of a {'transposed ' if transposed else ''}convolution with "
            f"kernel_size={kernel_size}, stride={stride}, dilation={dilation} on "
            f"spatial_shape={spatial_shape} is empty ({tuple(shape)})"
        )
    return tuple(shape)  # type: ignore[return-value]


def _reached_coords(
    coords: torch.Tensor,
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    dilation: tuple[int, int, int],
    transposed: bool,
    out_shape: tuple[int, int, int],
) -> torch.Tensor:
    """Unique output voxels ``[M, 4]`` (canonical order) that some kernel offset links to an input voxel.

    Regular: ``o = (c - off_k) / s`` where divisible; transposed: ``q = c * s + off_k``; both kept inside
    ``[0, out_shape)``. One host sync (the number of unique voxels).
    """
    offsets = kernel_offsets(kernel_size, dilation, device=coords.device).long()  # [K, 3]
    s = torch.tensor(stride, device=coords.device, dtype=torch.long)
    spatial = coords[:, None, 1:].long()  # [N, 1, 3]
    if transposed:
        candidates = spatial * s + offsets[None]  # [N, K, 3]
        valid = torch.ones(candidates.shape[:2], dtype=torch.bool, device=coords.device)
    else:
        shifted = spatial - offsets[None]  # [N, K, 3]
        valid = (shifted % s == 0).all(dim=-1)  # [N, K]
        candidates = torch.div(shifted, s, rounding_mode="floor")
    bound = torch.tensor(out_shape, device=coords.device, dtype=torch.long)
    valid &= ((candidates >= 0) & (candidates < bound)).all(dim=-1)
    batch = coords[:, None, :1].long().expand(-1, offsets.shape[0], 1)  # [N, K, 1]
    keys = pack_keys(torch.cat([batch, candidates], dim=-1)[valid])  # [V]
    return unpack_keys(torch.unique(keys, sorted=True))  # [M, 4] int32, (batch, x, y, z) order


def conv_output_layout(
    input: SparseTensor,
    *,
    stride: IntOr3 = 1,
    transposed: bool = False,
    layout_rule: LayoutRule = "parents",
    kernel_size: IntOr3 = 3,
    dilation: IntOr3 = 1,
) -> SparseTensor:
    """The output layout of [`sparse_conv3d`][sparse3d.functional.conv.sparse_conv3d] without ``out_layout``.

    With ``layout_rule="parents"`` (see [`LayoutRule`][sparse3d.functional.conv.LayoutRule]):

    * ``stride == 1``: the input layout itself (submanifold);
    * regular, stride ``s``: the parents ``floor(coords / s)`` (the layout a 2x downsample gives),
      ``stride = input.stride * s``, ``spatial_shape = ceil(input.spatial_shape / s)``;
    * transposed, stride ``s``: all ``s^3`` children of every input voxel
      ([`subdivide_coords`][sparse3d.functional.coords.subdivide_coords] order),
      ``stride = input.stride / s``, ``spatial_shape = input.spatial_shape * s``.

    With ``layout_rule="reached"``: every voxel of the dense output grid (``spatial_shape`` of
    ``F.conv3d`` / ``F.conv_transpose3d`` with ``padding = dilation * ((size - 1) // 2)``) that a kernel
    offset links to an active input voxel, in canonical (batch, x, y, z) order; ``stride`` as above.
    This is spconv's layout and depends on ``kernel_size`` and ``dilation``.

    The layout is cached on the input layout, so repeated calls return the same object (and share its
    kernel-map cache).

    Args:
        input: The convolution's input.
        stride: Convolution stride, an int or 3 ints.
        transposed: Layout of the transposed convolution.
        layout_rule: ``"parents"`` or ``"reached"``.
        kernel_size: Kernel size (used by ``"reached"`` only), an int or 3 ints.
        dilation: Dilation (used by ``"reached"`` only), an int or 3 ints.

    Returns:
        A SparseTensor with zero-width feats ``[M, 0]`` describing the output layout.

    Raises:
        ValueError: An unknown ``layout_rule``; ``transposed`` with an input stride not divisible by
            ``stride``; an empty dense output grid (``"reached"``).
    """
    if layout_rule not in _LAYOUT_RULES:
        raise ValueError(f"layout_rule: expected one of {_LAYOUT_RULES}, got {layout_rule!r}")
    s = _triple(stride, "stride")
    if transposed and any(a % b for a, b in zip(input.stride, s, strict=True)):
        raise ValueError(
            f"stride: a transposed convolution refines the grid, so input.stride={input.stride} must be "
            f"divisible by stride={s}; pass out_layout to choose the output voxels explicitly"
        )
    if transposed:
        new_stride = tuple(a // b for a, b in zip(input.stride, s, strict=True))
    else:
        new_stride = tuple(a * b for a, b in zip(input.stride, s, strict=True))
    if layout_rule == "reached":
        size, dil = _triple(kernel_size, "kernel_size"), _triple(dilation, "dilation")
        shape = _dense_output_shape(input.spatial_shape, size, s, dil, transposed)

        def build_reached() -> SparseTensor:
            coords = _reached_coords(input.coords, size, s, dil, transposed, shape)
            return _layout_from_coords(input, coords, shape, new_stride)  # type: ignore[arg-type]

        return input.cached(("conv_out_layout", s, transposed, "reached", size, dil), build_reached)
    if s == (1, 1, 1):
        return input
    if transposed:

        def build() -> SparseTensor:
            coords = subdivide_coords(input.coords, s)  # [N * s^3, 4]
            shape = tuple(a * b for a, b in zip(input.spatial_shape, s, strict=True))
            return _layout_from_coords(input, coords, shape, new_stride)  # type: ignore[arg-type]

        return input.cached(("conv_out_layout", s, True), build)

    def build_coarse() -> SparseTensor:
        coords, _ = coarse_coords(input.coords, s)  # [M, 4]
        shape = tuple(-(-a // b) for a, b in zip(input.spatial_shape, s, strict=True))
        return _layout_from_coords(input, coords, shape, new_stride)  # type: ignore[arg-type]

    return input.cached(("conv_out_layout", s, False), build_coarse)


def _plan(
    input: SparseTensor,
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    dilation: tuple[int, int, int],
    transposed: bool,
    out_layout: SparseTensor | None,
    layout_rule: LayoutRule = "parents",
) -> _ConvPlan:
    """The (cached) output layout and kernel maps of one convolution configuration on ``input``."""
    key = ("conv", kernel_size, stride, dilation, transposed, layout_rule)

    def build(layout: SparseTensor) -> _ConvPlan:
        kmap = kernel_map(
            input.coords,
            layout.coords,
            kernel_size,
            stride,
            dilation,
            transposed,
            in_sorted=input.sorted_keys(),
        )  # [M, K]
        return _ConvPlan(layout, kmap, input.num_voxels)

    if out_layout is None:
        layout = conv_output_layout(
            input,
            stride=stride,
            transposed=transposed,
            layout_rule=layout_rule,
            kernel_size=kernel_size,
            dilation=dilation,
        )
        return input.cached(key, lambda: build(layout))
    # Keyed on the output coords' identity; the entry holds a reference to them so the id is never reused.
    entry = input.cache.get((*key, "out_layout"))
    if entry is None or entry[0] is not out_layout.coords:
        entry = (out_layout.coords, build(out_layout))
        input.cache[(*key, "out_layout")] = entry
    return entry[1]


# ---------------------------------------------------------------------------------------------- kernels


def _gather_gemm(
    feats: torch.Tensor, index: torch.Tensor, weight_flat: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out[j] = bias + concat_k(padded[index[j, k]]) @ weight_flat`` with ``padded = [feats; 0]``.

    Args:
        feats: ``[N, C_in]``.
        index: int64 ``[M, K]`` into ``[0, N]`` (``N`` selects the zero row).
        weight_flat: ``[K * C_in, C_out]``.
        bias: ``[C_out]`` or None.

    Returns:
        ``[M, C_out]``.
    """
    num_out, num_k = index.shape
    channels = feats.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, channels)])  # [N + 1, C_in]
    rows_per_chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, num_k * channels))
    pieces = []
    for start in range(0, max(num_out, 1), rows_per_chunk):
        chunk = index[start : start + rows_per_chunk]
        cols = padded.index_select(0, chunk.reshape(-1)).view(chunk.shape[0], num_k * channels)  # [m, K*C_in]
        pieces.append(cols @ weight_flat if bias is None else torch.addmm(bias, cols, weight_flat))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _weight_grad(feats: torch.Tensor, index: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``cols^T @ grad_out`` with ``cols`` gathered as in `_gather_gemm`, chunked: ``[K * C_in, C_out]``."""
    num_out, num_k = index.shape
    channels = feats.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, channels)])  # [N + 1, C_in]
    rows_per_chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, num_k * channels))
    if num_out <= rows_per_chunk:
        cols = padded.index_select(0, index.reshape(-1)).view(num_out, num_k * channels)  # [M, K*C_in]
        return cols.t() @ grad_out
    # Half-precision chunk products are summed in float32 (fixed order: deterministic).
    accumulate = torch.float32 if grad_out.dtype in (torch.float16, torch.bfloat16) else grad_out.dtype
    total = torch.zeros(num_k * channels, grad_out.shape[1], dtype=accumulate, device=feats.device)
    for start in range(0, num_out, rows_per_chunk):
        chunk = index[start : start + rows_per_chunk]
        cols = padded.index_select(0, chunk.reshape(-1)).view(chunk.shape[0], num_k * channels)  # [m, K*C_in]
        total += (cols.t() @ grad_out[start : start + rows_per_chunk]).to(accumulate)
    return total.to(grad_out.dtype)


class _SparseConvFunction(torch.autograd.Function):
    """Gather -> GEMM with a hand-written, scatter-free backward (never differentiates the gather)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _ConvPlan
    ) -> torch.Tensor:
        num_k, c_in, c_out = weight.shape
        with torch.autocast(feats.device.type, enabled=False):
            out = _gather_gemm(feats, plan.gather_index, weight.reshape(num_k * c_in, c_out), bias)
        ctx.save_for_backward(feats, weight)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        feats, weight = ctx.saved_tensors
        plan: _ConvPlan = ctx.plan
        num_k, c_in, c_out = weight.shape
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = grad_bias = None
        with torch.autocast(feats.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                # dX[i] = sum_k W[k] dY[inverse[i, k]]: the same gather-GEMM on the inverted map.
                weight_t = weight.transpose(1, 2).reshape(num_k * c_out, c_in)  # [K * C_out, C_in]
                grad_feats = _gather_gemm(grad_out, plan.inverse_index, weight_t, None)  # [N, C_in]
            if ctx.needs_input_grad[1]:
                grad_weight = _weight_grad(feats, plan.gather_index, grad_out).view(num_k, c_in, c_out)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_out.sum(0)
        return grad_feats, grad_weight, grad_bias, None


# ---------------------------------------------------------------------------------------------- public op


def sparse_conv3d(
    input: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: IntOr3 = 3,
    stride: IntOr3 = 1,
    dilation: IntOr3 = 1,
    transposed: bool = False,
    out_layout: SparseTensor | None = None,
    layout_rule: LayoutRule = "parents",
    backend: str | None = None,
) -> SparseTensor:
    r"""Sparse 3D convolution: submanifold, strided or transposed (correlation, like ``F.conv3d``).

    Kernel offsets ``off_k`` come from [`kernel_offsets`][sparse3d.functional.coords.kernel_offsets]
    (x slowest, z fastest; ``(k - (size - 1) // 2) * dilation`` per axis), and ``weight[k]`` is the
    ``[C_in, C_out]`` matrix of offset ``k``. Missing neighbours contribute zero.

    The output voxels are ``out_layout`` when given, else chosen by ``layout_rule`` (see
    [`LayoutRule`][sparse3d.functional.conv.LayoutRule] and
    [`conv_output_layout`][sparse3d.functional.conv.conv_output_layout]); the layouts below are those of
    the default ``"parents"`` rule. The formulas hold for every output voxel, whichever rule chose it.

    * **Submanifold** (``stride=1``): output layout = input layout,
      ``out[p] = bias + sum_k W[k]^T in[p + off_k]``.
      Dense equivalent: ``F.conv3d`` with ``padding = dilation * ((size - 1) // 2)`` (odd sizes) at the
      active sites.
    * **Strided** (``stride=s > 1``): output layout = ``floor(coords / s)`` (what a factor-``s`` downsample
      gives, [`coarse_coords`][sparse3d.functional.coords.coarse_coords]),
      ``out[o] = bias + sum_k W[k]^T in[o * s + off_k]``; output ``stride = input.stride * s`` and
      ``spatial_shape = ceil(input.spatial_shape / s)``. Dense equivalent:
      ``F.conv3d(dense, W_dense, stride=s, padding=dilation * ((size - 1) // 2))`` at the output coords.
    * **Transposed** (``transposed=True``, stride ``s``): output layout = ``out_layout`` if given (typically
      the layout before a downsample), else all ``s^3`` children of each input voxel;
      ``out[q] = bias + sum_{k : s | (q - off_k)} W[k]^T in[(q - off_k) / s]``; output
      ``stride = input.stride / s``. Dense equivalent: ``F.conv_transpose3d(dense, W_t, stride=s,
      padding=dilation * ((size - 1) // 2), dilation=dilation)`` with ``W_t[C_in, C_out, kx, ky, kz]``
      (no kernel flip; see [`weight_to_dense`][sparse3d.functional.conv.weight_to_dense]) at the output
      coords.

    Implementation: one gather of the neighbours into ``cols [M, K * C_in]`` (a zero row stands in for
    missing ones) and one GEMM with ``weight.reshape(K * C_in, C_out)``. The backward is hand-written:
    ``d input`` is the same gather-GEMM of ``d out`` through the inverted kernel map with
    ``weight.transpose(1, 2)``, ``d weight = cols^T @ d out``, ``d bias = d out.sum(0)``; no scatter or
    atomics, so results are bitwise reproducible on GPU. Kernel maps are cached on the input layout.
    Under autocast the features, weight and bias are cast to the autocast dtype (float64 is left alone),
    as ``nn.Conv3d`` does.

    Args:
        input: SparseTensor with feats ``[N, C_in]`` (floating point).
        weight: ``[K, C_in, C_out]`` with ``K = kx * ky * kz``; same dtype and device as ``input.feats``.
        bias: Optional ``[C_out]``.
        kernel_size: Kernel size, an int or 3 ints.
        stride: Stride, an int or 3 ints.
        dilation: Dilation, an int or 3 ints.
        transposed: Transposed (upsampling) convolution.
        out_layout: Optional output layout (its feats are ignored). Its ``stride`` must be
            ``input.stride / stride`` (transposed) or ``input.stride * stride`` (regular), and its batch size
            and device must match the input's.
        layout_rule: How the output voxels are chosen without ``out_layout``: ``"parents"`` (default;
            submanifold, parents of a downsample, children of a subdivide) or ``"reached"`` (every voxel
            the kernel reaches, as spconv). Only the default together with ``out_layout``.
        backend: ``"torch"`` (default) or ``"spconv"`` (CUDA, submanifold only); ``None`` uses
            [`current_backend`][sparse3d.kernels.current_backend].

    Returns:
        SparseTensor with feats ``[M, C_out]`` on the output layout described above.

    Raises:
        TypeError: Non-floating features or a dtype mismatch between ``input`` and ``weight``/``bias``.
        ValueError: Shape, device, kernel size or ``out_layout`` stride mismatches, or an unavailable backend.
        NotImplementedError: The chosen backend does not support this configuration.
    """
    from sparse3d.tensor import SparseTensor

    if not isinstance(input, SparseTensor):
        raise TypeError(f"input: expected a SparseTensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor [K, C_in, C_out], got {type(weight).__name__}")
    size = _triple(kernel_size, "kernel_size")
    s = _triple(stride, "stride")
    dil = _triple(dilation, "dilation")
    num_k = math.prod(size)
    feats = input.feats
    if feats.dim() != 2:
        raise ValueError(f"input: expected feats [N, C_in], got shape {list(feats.shape)}")
    if not feats.dtype.is_floating_point:
        raise TypeError(f"input: expected floating-point feats, got {feats.dtype}")
    if weight.dim() != 3 or weight.shape[0] != num_k or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"weight: expected shape [K={num_k}, C_in={feats.shape[1]}, C_out] for kernel_size={size} and "
            f"input feats {list(feats.shape)}, got {list(weight.shape)}"
        )
    if weight.device != feats.device:
        raise ValueError(f"weight: expected device {feats.device} (that of input.feats), got {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[2],):
            raise ValueError(f"bias: expected shape [{weight.shape[2]}] (C_out), got {list(bias.shape)}")
        if bias.device != feats.device:
            raise ValueError(f"bias: expected device {feats.device} (that of input.feats), got {bias.device}")

    device_type = feats.device.type
    if torch.is_autocast_enabled(device_type) and feats.dtype != torch.float64:
        compute_dtype = torch.get_autocast_dtype(device_type)
        feats = feats.to(compute_dtype)
        weight = weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    if weight.dtype != feats.dtype:
        raise TypeError(f"weight: expected dtype {feats.dtype} (that of input.feats), got {weight.dtype}")
    if bias is not None and bias.dtype != feats.dtype:
        raise TypeError(f"bias: expected dtype {feats.dtype} (that of input.feats), got {bias.dtype}")

    if layout_rule not in _LAYOUT_RULES:
        raise ValueError(f"layout_rule: expected one of {_LAYOUT_RULES}, got {layout_rule!r}")
    if out_layout is not None:
        if layout_rule != "parents":
            raise ValueError(
                f"layout_rule: out_layout already fixes the output voxels, so pass layout_rule only without "
                f"it; got layout_rule={layout_rule!r} and an out_layout"
            )
        _check_out_layout(input, out_layout, s, transposed)

    name = resolve_backend(backend)
    if name == "spconv":
        submanifold = s == (1, 1, 1) and not transposed and layout_rule == "parents"
        if not submanifold or out_layout is not None or any(k % 2 == 0 for k in size):
            raise NotImplementedError(
                "backend: 'spconv' supports only submanifold convolutions (stride=1, transposed=False, "
                "layout_rule='parents', odd kernel_size, no out_layout); got "
                f"kernel_size={size}, stride={s}, transposed={transposed}, layout_rule={layout_rule!r}, "
                f"out_layout={'given' if out_layout is not None else None}. Use backend='torch'."
            )
        from sparse3d.kernels.spconv import submanifold_conv3d

        return input.replace(submanifold_conv3d(input, feats, weight, bias, kernel_size=size, dilation=dil))

    plan = _plan(input, size, s, dil, transposed, out_layout, layout_rule)
    out_feats = _SparseConvFunction.apply(feats.contiguous(), weight.contiguous(), bias, plan)  # [M, C_out]
    return plan.out_layout.replace(out_feats)


def _check_out_layout(
    input: SparseTensor, out_layout: SparseTensor, stride: tuple[int, int, int], transposed: bool
) -> None:
    """Raises if ``out_layout`` cannot be the output of this convolution."""
    from sparse3d.tensor import SparseTensor

    if not isinstance(out_layout, SparseTensor):
        raise TypeError(f"out_layout: expected a SparseTensor or None, got {type(out_layout).__name__}")
    if transposed:
        expected = tuple(a * b for a, b in zip(out_layout.stride, stride, strict=True)) == input.stride
        want = f"input.stride / stride = {tuple(a / b for a, b in zip(input.stride, stride, strict=True))}"
    else:
        expected = out_layout.stride == tuple(a * b for a, b in zip(input.stride, stride, strict=True))
        want = f"input.stride * stride = {tuple(a * b for a, b in zip(input.stride, stride, strict=True))}"
    if not expected:
        raise ValueError(
            f"out_layout: expected stride {want} (input.stride={input.stride}, stride={stride}, "
            f"transposed={transposed}), got {out_layout.stride}"
        )
    if out_layout.batch_size != input.batch_size:
        raise ValueError(f"out_layout: expected batch_size {input.batch_size}, got {out_layout.batch_size}")
    if out_layout.coords.device != input.coords.device:
        raise ValueError(f"out_layout: expected device {input.coords.device}, got {out_layout.coords.device}")


# ---------------------------------------------------------------------------------------------- weights


def weight_from_dense(dense_weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Converts a dense ``nn.Conv3d`` (or ``nn.ConvTranspose3d``) weight to the sparse layout.

    Args:
        dense_weight: ``[C_out, C_in, kx, ky, kz]`` (``nn.Conv3d.weight``), or ``[C_in, C_out, kx, ky, kz]``
            (``nn.ConvTranspose3d.weight``) when ``transposed``.
        transposed: The dense weight belongs to a transposed convolution.

    Returns:
        ``[K, C_in, C_out]`` with ``K = kx * ky * kz`` in
        [`kernel_offsets`][sparse3d.functional.coords.kernel_offsets] order (x slowest, z fastest).
    """
    if dense_weight.dim() != 5:
        raise ValueError(f"dense_weight: expected shape [C, C, kx, ky, kz], got {list(dense_weight.shape)}")
    order = (2, 3, 4, 0, 1) if transposed else (2, 3, 4, 1, 0)
    moved = dense_weight.permute(*order)  # [kx, ky, kz, C_in, C_out]
    return moved.reshape(-1, moved.shape[3], moved.shape[4])  # [K, C_in, C_out]


def weight_to_dense(weight: torch.Tensor, kernel_size: IntOr3, transposed: bool = False) -> torch.Tensor:
    """Converts a sparse weight to the dense ``F.conv3d`` (or ``F.conv_transpose3d``) layout.

    Inverse of [`weight_from_dense`][sparse3d.functional.conv.weight_from_dense].

    Args:
        weight: ``[K, C_in, C_out]``.
        kernel_size: ``(kx, ky, kz)`` with ``kx * ky * kz == K`` (or one int).
        transposed: Return the ``F.conv_transpose3d`` layout ``[C_in, C_out, kx, ky, kz]`` instead of
            ``[C_out, C_in, kx, ky, kz]``.

    Returns:
        The dense weight.
    """
    size = _triple(kernel_size, "kernel_size")
    if weight.dim() != 3 or weight.shape[0] != math.prod(size):
        raise ValueError(
            f"weight: expected shape [K={math.prod(size)}, C_in, C_out] for kernel_size={size}, "
            f"got {list(weight.shape)}"
        )
    grid = weight.reshape(*size, weight.shape[1], weight.shape[2])  # [kx, ky, kz, C_in, C_out]
    return grid.permute(3, 4, 0, 1, 2) if transposed else grid.permute(4, 3, 0, 1, 2)


def _check_sparse_weight(weight: object, kernel_size: IntOr3) -> tuple[int, int, int]:
    size = _triple(kernel_size, "kernel_size")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != math.prod(size):
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight: expected shape [K={math.prod(size)}, C_in, C_out] for kernel_size={size}, got {shape}"
        )
    return size


def weight_to_spconv(weight: torch.Tensor, kernel_size: IntOr3) -> torch.Tensor:
    """Converts a sparse weight to spconv's (2.2+) KRSC layout ``[C_out, kx, ky, kz, C_in]``.

    spconv computes the same correlation (``out[p] = sum_k W[k] in[p + off_k]``, axes in coordinate-column
    order), so a ``spconv.SubMConv3d`` / ``SparseConv3d`` with this weight matches
    [`sparse_conv3d`][sparse3d.functional.conv.sparse_conv3d] (``layout_rule="reached"`` for the strided
    ``SparseConv3d``, with ``padding = dilation * ((size - 1) // 2)``).

    Args:
        weight: ``[K, C_in, C_out]``, offsets x slowest, z fastest.
        kernel_size: ``(kx, ky, kz)`` with ``kx * ky * kz == K`` (or one int).

    Returns:
        ``[C_out, kx, ky, kz, C_in]`` (a view).
    """
    size = _check_sparse_weight(weight, kernel_size)
    grid = weight.reshape(*size, weight.shape[1], weight.shape[2])  # [kx, ky, kz, C_in, C_out]
    return grid.permute(4, 0, 1, 2, 3)


def weight_from_spconv(weight: torch.Tensor) -> torch.Tensor:
    """Converts a spconv KRSC weight ``[C_out, kx, ky, kz, C_in]`` to the sparse layout.

    Inverse of [`weight_to_spconv`][sparse3d.functional.conv.weight_to_spconv].

    Args:
        weight: ``[C_out, kx, ky, kz, C_in]`` (``spconv.SubMConv3d.weight``, spconv >= 2.2).

    Returns:
        ``[K, C_in, C_out]`` with ``K = kx * ky * kz``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected spconv's shape [C_out, kx, ky, kz, C_in], got {shape}")
    c_out, c_in = weight.shape[0], weight.shape[-1]
    return weight.permute(1, 2, 3, 4, 0).reshape(-1, c_in, c_out)  # [K, C_in, C_out]


def weight_to_minkowski(weight: torch.Tensor, kernel_size: IntOr3) -> torch.Tensor:
    """Converts a sparse weight to MinkowskiEngine's ``kernel`` layout ``[K, C_in, C_out]``.

    Both store one ``[C_in, C_out]`` matrix per kernel offset; MinkowskiEngine enumerates the offsets of a
    hypercube kernel with x fastest and z slowest (for coordinates ``(batch, x, y, z)``), sparse3d with x
    slowest and z fastest. The offsets themselves agree for odd sizes (centred) and size 2 (``0, 1``);
    for even sizes from 4 MinkowskiEngine starts at 0 while sparse3d starts at ``-(size - 1) // 2``, so
    the converted weight acts on a window shifted by that amount.

    Args:
        weight: ``[K, C_in, C_out]``, offsets x slowest, z fastest.
        kernel_size: ``(kx, ky, kz)`` with ``kx * ky * kz == K`` (or one int).

    Returns:
        ``[K, C_in, C_out]`` with offsets x fastest, z slowest.
    """
    size = _check_sparse_weight(weight, kernel_size)
    grid = weight.reshape(*size, weight.shape[1], weight.shape[2])  # [kx, ky, kz, C_in, C_out]
    return grid.permute(2, 1, 0, 3, 4).reshape(weight.shape)  # [kz, ky, kx, ...] flattened: x fastest


def weight_from_minkowski(weight: torch.Tensor, kernel_size: IntOr3) -> torch.Tensor:
    """Converts a MinkowskiEngine ``kernel`` ``[K, C_in, C_out]`` (x fastest) to the sparse layout.

    Inverse of [`weight_to_minkowski`][sparse3d.functional.conv.weight_to_minkowski].

    Args:
        weight: ``[K, C_in, C_out]`` (``MinkowskiConvolution.kernel``), offsets x fastest, z slowest.
        kernel_size: ``(kx, ky, kz)`` with ``kx * ky * kz == K`` (or one int).

    Returns:
        ``[K, C_in, C_out]`` with offsets x slowest, z fastest.
    """
    size = _check_sparse_weight(weight, kernel_size)
    grid = weight.reshape(size[2], size[1], size[0], weight.shape[1], weight.shape[2])  # [kz, ky, kx, ...]
    return grid.permute(2, 1, 0, 3, 4).reshape(weight.shape)
