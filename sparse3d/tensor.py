"""`SparseTensor`: a batch of sparse voxel grids in packed form."""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sparse3d.functional.coords import MAX_BATCH, MAX_COORD, _triple, pack_keys

__all__ = ["SparseTensor"]

Number = int | float | bool

_INTEGER_DTYPES: tuple[torch.dtype, ...] = (
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
)
# Integer dtypes accepted for coordinates: range-checked in int64, then stored as int32.

_INTEGER_NAMES = ", ".join(str(dtype).removeprefix("torch.") for dtype in _INTEGER_DTYPES)


class SparseTensor:
    r"""A batch of ``B`` sparse voxel grids, packed into one list of active voxels.

    Each active voxel is a row: its coordinates ``(batch, x, y, z)`` and its features. The rows of
    one sample are contiguous and samples appear in batch order, so ``offsets`` (the row where
    each sample starts, plus the total) doubles as ``cu_seqlens`` for variable-length attention:

        sample 0: 3 voxels      sample 1: empty      sample 2: 2 voxels

        row   coords (b, x, y, z)   feats [N, C]
         0    (0, 1, 4, 2)          f0  ┐
         1    (0, 1, 4, 3)          f1  │ sample 0    offsets = [0, 3, 3, 5]   [B + 1]
         2    (0, 5, 0, 7)          f2  ┘             counts  = [3, 0, 2]      [B]
         3    (2, 0, 0, 0)          f3  ┐ sample 2    batch_index = [0, 0, 0, 2, 2]
         4    (2, 6, 6, 6)          f4  ┘

    Invariants (checked by the constructor unless ``check=False``):

    * ``coords`` is int32 ``[N, 4]``; ``0 <= batch < batch_size``; ``0 <= x, y, z < spatial_shape``;
    * the batch column is non-decreasing (rows of a sample are contiguous, samples in order);
    * coordinates are unique within a sample (duplicates are an error, never merged silently:
      use [`unique_coords`][sparse3d.functional.coords.unique_coords] to merge explicitly);
    * ``feats`` has ``N`` rows; any trailing shape (``[N, C]``, ``[N, H, D]``) is allowed.

    Coordinates are in units of this tensor's voxels. ``stride`` says how many finest-level voxels
    one voxel spans per axis (1 at full resolution, 2 after one 2x downsample), so the world
    position of a voxel is ``(coords + 0.5) * stride`` in finest-voxel units.

    The tensor is immutable: every method returns a new object. ``replace`` keeps the layout and
    shares its cache (sorted keys, kernel maps), which never changes results, only saves work.
    Arithmetic (``+ - * /``, also reflected, and unary ``-``) acts on the features and accepts a
    SparseTensor of the same layout and dtype, a number, or a tensor that broadcasts to ``feats``
    without adding leading dimensions (e.g. ``[C]`` or ``[N, 1]``).

    Examples:
        >>> coords = torch.tensor([[0, 1, 4, 2], [0, 1, 4, 3], [1, 0, 0, 0]])
        >>> x = SparseTensor(coords, torch.randn(3, 8), spatial_shape=(8, 8, 8))
        >>> x.batch_size, x.offsets.tolist(), x.feats.shape
        (2, [0, 2, 3], torch.Size([3, 8]))
    """

    __slots__ = ("coords", "feats", "offsets", "batch_size", "spatial_shape", "stride", "_cache")

    coords: torch.Tensor
    feats: torch.Tensor
    offsets: torch.Tensor
    batch_size: int
    spatial_shape: tuple[int, int, int]
    stride: tuple[int, int, int]

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        *,
        batch_size: int | None = None,
        spatial_shape: int | Sequence[int] | None = None,
        stride: int | Sequence[int] = 1,
        check: bool = True,
    ) -> None:
        """Builds a SparseTensor from packed coordinates and features.

        Args:
            coords: Integer tensor ``[N, 4]`` of (batch, x, y, z), rows of each sample contiguous
                and in batch order. Any signed or unsigned integer dtype (int8 ... int64, uint8 ...
                uint64): values are range-checked in int64, then stored as int32.
            feats: Tensor ``[N, ...]`` of features on the same device.
            batch_size: Number of samples ``B``; defaults to ``max(batch) + 1`` (1 if ``N == 0``).
                Pass it when trailing samples are empty.
            spatial_shape: Grid extent ``(X, Y, Z)`` (or one int); defaults to ``max(coords) + 1``.
            stride: Finest-level voxels per voxel along each axis.
            check: Validate the invariants (a few device-wide reductions and one host sync).
                Library ops that produce valid layouts by construction pass ``False``.

        Raises:
            TypeError: ``coords`` is not an integer tensor, ``feats``/``coords`` are not tensors, or
                ``spatial_shape``/``stride`` are not ints.
            ValueError: A shape, device, range, ordering or uniqueness invariant does not hold.
        """
        if not isinstance(coords, torch.Tensor) or not isinstance(feats, torch.Tensor):
            raise TypeError(
                f"coords and feats: expected torch.Tensor, got {type(coords).__name__} and "
                f"{type(feats).__name__}"
            )
        if coords.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"coords: expected an integer dtype ({_INTEGER_NAMES}), got {coords.dtype}")
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords: expected shape [N, 4] of (batch, x, y, z), got {list(coords.shape)}")
        if feats.dim() < 1 or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"feats: expected {coords.shape[0]} rows to match coords [N, 4], got shape "
                f"{list(feats.shape)}"
            )
        if feats.device != coords.device:
            raise ValueError(f"feats: expected device {coords.device} (that of coords), got {feats.device}")
        num = coords.shape[0]
        if coords.dtype != torch.int32 and num and (check or batch_size is None or spatial_shape is None):
            # Checked in int64: the bounds do not fit in int8/uint8/int16 (comparisons there overflow), and
            # values beyond int32 would wrap silently in the cast below. uint64 values >= 2^63 become
            # negative in int64 and are reported too.
            promoted = coords.to(torch.int64)
            wide = (promoted < 0) | (promoted >= max(MAX_BATCH, MAX_COORD))
            if bool(wide.any()):
                row = int(wide.any(dim=1).nonzero()[0])
                raise ValueError(
                    f"coords: expected 0 <= batch < {MAX_BATCH} and 0 <= x, y, z < {MAX_COORD}, got "
                    f"{coords[row].tolist()} at row {row} ({coords.dtype})"
                )
        coords = coords.to(torch.int32).contiguous()
        if batch_size is None or spatial_shape is None:
            maxima = coords.amax(dim=0).tolist() if num else [0, 0, 0, 0]
            # Clamped to 1 so that negative coordinates are reported by `validate`, naming coords.
            if batch_size is None:
                batch_size = max(int(maxima[0]) + 1, 1)
            if spatial_shape is None:
                spatial_shape = tuple(max(int(m) + 1, 1) for m in maxima[1:])
        self.coords = coords
        self.feats = feats
        try:
            self.batch_size = operator.index(batch_size)
        except TypeError:
            raise TypeError(f"batch_size: expected an int, got {batch_size!r}") from None
        self.spatial_shape = _triple(spatial_shape, "spatial_shape")
        self.stride = _triple(stride, "stride")
        self._cache: dict[Any, Any] = {}
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if self.batch_size > MAX_BATCH or max(self.spatial_shape) > MAX_COORD:
            raise ValueError(
                f"batch_size and spatial_shape: expected at most {MAX_BATCH} and {MAX_COORD} per axis, "
                f"got {self.batch_size} and {self.spatial_shape}"
            )
        self.offsets = self._offsets_from_batch()
        if check:
            self.validate()

    @classmethod
    def _from_parts(
        cls,
        coords: torch.Tensor,
        feats: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        spatial_shape: tuple[int, int, int],
        stride: tuple[int, int, int],
        cache: dict | None = None,
    ) -> SparseTensor:
        """Assembles a tensor from parts already known to be valid (no checks, no syncs)."""
        out = object.__new__(cls)
        out.coords = coords
        out.feats = feats
        out.offsets = offsets
        out.batch_size = batch_size
        out.spatial_shape = spatial_shape
        out.stride = stride
        out._cache = {} if cache is None else cache
        return out

    def _offsets_from_batch(self) -> torch.Tensor:
        batch = self.coords[:, 0].contiguous()
        bounds = torch.arange(self.batch_size + 1, device=batch.device, dtype=torch.int32)
        return torch.searchsorted(batch, bounds, right=False).to(torch.int32)

    def validate(self) -> SparseTensor:
        """Checks every invariant listed in the class docstring.

        Returns:
            ``self``, so calls can be chained.

        Raises:
            ValueError: Naming the violated invariant, the expected and the actual values.
        """
        coords = self.coords
        if coords.shape[0] == 0:
            return self
        batch = coords[:, 0]
        shape = torch.tensor(self.spatial_shape, device=coords.device, dtype=torch.int32)
        keys = pack_keys(coords.clamp(min=0))
        stats = torch.stack(
            [
                (coords < 0).any(),
                (batch >= self.batch_size).any(),
                (coords[:, 1:] >= shape).any(),
                (batch[1:] < batch[:-1]).any(),
                (keys.sort().values.diff() == 0).any()
                if keys.numel() > 1
                else torch.zeros((), dtype=torch.bool, device=coords.device),
            ]
        ).tolist()
        negative, batch_high, outside, unordered, duplicate = stats
        if negative:
            row = int((coords < 0).any(dim=1).nonzero()[0])
            raise ValueError(
                f"coords: expected non-negative (batch, x, y, z), got {coords[row].tolist()} at row {row}"
            )
        if batch_high:
            raise ValueError(
                f"coords: batch index must be < batch_size={self.batch_size}, got max {int(batch.max())}"
            )
        if outside:
            row = int((coords[:, 1:] >= shape).any(dim=1).nonzero()[0])
            raise ValueError(
                f"coords: expected x, y, z inside spatial_shape={self.spatial_shape}, got "
                f"{coords[row, 1:].tolist()} at row {row}"
            )
        if unordered:
            row = int((batch[1:] < batch[:-1]).nonzero()[0]) + 1
            raise ValueError(
                "coords: rows of each sample must be contiguous and in batch order (non-decreasing batch "
                f"column), got batch {int(batch[row - 1])} at row {row - 1} then {int(batch[row])} at row "
                f"{row}"
            )
        if duplicate:
            sorted_keys, perm = keys.sort()
            i = int((sorted_keys.diff() == 0).nonzero()[0])
            rows = sorted(perm[i : i + 2].tolist())
            raise ValueError(
                f"coords: expected unique coordinates within a sample, got {coords[rows[0]].tolist()} at "
                f"rows {rows}; merge them explicitly with sparse3d.functional.unique_coords"
            )
        return self

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_list(
        cls,
        coords: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor],
        *,
        spatial_shape: int | Sequence[int] | None = None,
        stride: int | Sequence[int] = 1,
        check: bool = True,
    ) -> SparseTensor:
        """Packs per-sample coordinates and features.

        Args:
            coords: ``B >= 1`` integer tensors ``[N_b, 3]`` of (x, y, z); ``N_b = 0`` is allowed.
            feats: ``B`` tensors ``[N_b, ...]`` with equal trailing shapes and dtypes.
            spatial_shape: Grid extent; defaults to the maximum coordinate + 1.
            stride: Finest-level voxels per voxel.
            check: Validate the result.

        Returns:
            A SparseTensor with ``batch_size = len(coords)`` (trailing empty samples included).

        Raises:
            TypeError: A ``coords[b]`` is not an integer tensor.
            ValueError: The lists differ in length or are empty, a shape, dtype or device differs,
                or the packed result violates an invariant.
        """
        if len(coords) != len(feats) or len(coords) == 0:
            raise ValueError(
                f"coords and feats: expected two non-empty lists of equal length, got {len(coords)} and "
                f"{len(feats)}"
            )
        for b, (c, f) in enumerate(zip(coords, feats, strict=True)):
            if c.dtype not in _INTEGER_DTYPES:
                raise TypeError(f"coords[{b}]: expected an integer dtype ({_INTEGER_NAMES}), got {c.dtype}")
            if c.dim() != 2 or c.shape[1] != 3:
                raise ValueError(f"coords[{b}]: expected shape [N, 3] of (x, y, z), got {list(c.shape)}")
            if f.dim() < 1 or f.shape[0] != c.shape[0]:
                raise ValueError(
                    f"feats[{b}]: expected {c.shape[0]} rows to match coords[{b}], got shape {list(f.shape)}"
                )
            if f.shape[1:] != feats[0].shape[1:] or f.dtype != feats[0].dtype:
                raise ValueError(
                    f"feats[{b}]: expected trailing shape {list(feats[0].shape[1:])} and dtype "
                    f"{feats[0].dtype} (those of feats[0]), got {list(f.shape[1:])} and {f.dtype}"
                )
            if c.device != coords[0].device or f.device != coords[0].device:
                raise ValueError(
                    f"coords[{b}] and feats[{b}]: expected device {coords[0].device} (that of coords[0]), "
                    f"got {c.device} and {f.device}"
                )
        batch = torch.cat(
            [torch.full((c.shape[0], 1), b, dtype=torch.int64, device=c.device) for b, c in enumerate(coords)]
        )
        # int64 here so that the constructor range-checks values before its int32 cast.
        packed = torch.cat([batch, torch.cat([c.long() for c in coords])], dim=1)
        return cls(
            packed,
            torch.cat(list(feats)),
            batch_size=len(coords),
            spatial_shape=spatial_shape,
            stride=stride,
            check=check,
        )

    @classmethod
    def from_dense(
        cls, dense: torch.Tensor, mask: torch.Tensor | None = None, *, stride: int | Sequence[int] = 1
    ) -> SparseTensor:
        """Keeps the occupied cells of a dense grid.

        Args:
            dense: Tensor ``[B, C, X, Y, Z]`` (channels first, as ``torch.nn.functional.conv3d``).
            mask: Boolean occupancy ``[B, X, Y, Z]``; defaults to cells where any channel is non-zero.
            stride: Finest-level voxels per voxel.

        Returns:
            A SparseTensor with feats ``[N, C]``, rows in (batch, x, y, z) order,
            ``batch_size = B`` and ``spatial_shape = (X, Y, Z)``.

        Raises:
            ValueError: ``dense`` is not 5-D, or ``mask`` has the wrong shape, dtype or device.
        """
        if dense.dim() != 5:
            raise ValueError(f"dense: expected shape [B, C, X, Y, Z], got {list(dense.shape)}")
        if mask is None:
            mask = (dense != 0).any(dim=1)
        expected = (dense.shape[0], *dense.shape[2:])
        if tuple(mask.shape) != expected or mask.dtype != torch.bool or mask.device != dense.device:
            raise ValueError(
                f"mask: expected bool of shape {list(expected)} on {dense.device}, got {mask.dtype} "
                f"{list(mask.shape)} on {mask.device}"
            )
        coords = mask.nonzero().to(torch.int32)  # [N, 4], lexicographic = canonical order
        feats = dense.permute(0, 2, 3, 4, 1)[mask]  # [N, C]
        return cls(
            coords,
            feats,
            batch_size=dense.shape[0],
            spatial_shape=tuple(dense.shape[2:]),
            stride=stride,
            check=False,
        )

    # ------------------------------------------------------------------ properties

    @property
    def num_voxels(self) -> int:
        """Total number of active voxels ``N`` over the batch."""
        return self.coords.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """int32 ``[B]``: voxels per sample."""
        return self.offsets.diff()

    @property
    def batch_index(self) -> torch.Tensor:
        """int64 ``[N]``: the sample each row belongs to (``coords[:, 0]``)."""
        return self.coords[:, 0].long()

    @property
    def device(self) -> torch.device:
        """Device of coords and feats."""
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the features."""
        return self.feats.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, *feats.shape[1:])``."""
        return tuple(self.feats.shape)

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"SparseTensor(batch_size={self.batch_size}, num_voxels={self.num_voxels}, "
            f"feats={list(self.feats.shape)} {self.feats.dtype}, spatial_shape={self.spatial_shape}, "
            f"stride={self.stride}, device={self.device})"
        )

    # ------------------------------------------------------------------ same-layout ops

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same layout, new features (sharing the layout's cache).

        Args:
            feats: Tensor ``[N, ...]`` on the same device; any dtype and trailing shape.

        Returns:
            A SparseTensor with this layout and ``feats``.

        Raises:
            ValueError: ``feats`` has the wrong number of rows or is on another device.
        """
        if feats.shape[0] != self.num_voxels:
            raise ValueError(f"feats: expected {self.num_voxels} rows, got shape {list(feats.shape)}")
        if feats.device != self.coords.device:
            raise ValueError(f"feats: expected device {self.coords.device}, got {feats.device}")
        return SparseTensor._from_parts(
            self.coords, feats, self.offsets, self.batch_size, self.spatial_shape, self.stride, self._cache
        )

    def same_layout(self, other: SparseTensor) -> bool:
        """True if ``other`` has the same coordinates (in the same row order), batch size, stride and grid."""
        return self._layout_difference(other) is None

    def _layout_difference(self, other: SparseTensor) -> str | None:
        """None for the same layout, else the first field that differs, as ``"field: other vs self"``.

        Compares batch size, stride, spatial shape, voxel count, device, then the coordinates (the
        first differing row; one host sync, only when they differ).
        """
        for field in ("batch_size", "stride", "spatial_shape", "num_voxels"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} {theirs} vs {mine}"
        if self.coords is other.coords:
            return None
        if self.coords.device != other.coords.device:
            return f"device {other.coords.device} vs {self.coords.device}"
        if torch.equal(self.coords, other.coords):
            return None
        row = int((self.coords != other.coords).any(dim=1).nonzero()[0])
        return f"coords at row {row}: {other.coords[row].tolist()} vs {self.coords[row].tolist()}"

    def _check_layout(self, other: SparseTensor, name: str, reference: str = "self") -> None:
        difference = self._layout_difference(other)
        if difference is not None:
            raise ValueError(
                f"{name}: expected a SparseTensor with the same layout as {reference} (coords, batch_size, "
                f"stride, spatial_shape), got {difference} ({name} vs {reference})"
            )

    def _operand(self, other: Any) -> Any:
        """Checks the other operand of an arithmetic op and returns what to combine with ``feats``."""
        if isinstance(other, SparseTensor):
            if other.device != self.device:
                raise ValueError(f"other: expected device {self.device}, got {other.device}")
            self._check_layout(other, "other")
            if other.dtype != self.dtype:
                raise TypeError(f"other: expected feats dtype {self.dtype}, got {other.dtype}")
            return other.feats
        if isinstance(other, torch.Tensor):
            if other.device != self.device and other.dim() > 0:
                raise ValueError(f"other: expected device {self.device}, got {other.device}")
            if other.dim() > self.feats.dim():
                raise ValueError(
                    f"other: expected a tensor broadcastable to feats {list(self.feats.shape)} without new "
                    f"leading dimensions, got shape {list(other.shape)}"
                )
        return other

    def _binary(
        self, other: Any, op: Callable[[Any, Any], torch.Tensor], reflected: bool = False
    ) -> SparseTensor:
        other = self._operand(other)
        result = op(other, self.feats) if reflected else op(self.feats, other)
        return self.replace(result)

    def __add__(self, other: SparseTensor | torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.add)

    def __sub__(self, other: SparseTensor | torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.sub)

    def __mul__(self, other: SparseTensor | torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.mul)

    def __truediv__(self, other: SparseTensor | torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.truediv)

    def __radd__(self, other: torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.add, reflected=True)

    def __rmul__(self, other: torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.mul, reflected=True)

    def __rsub__(self, other: torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.sub, reflected=True)

    def __rtruediv__(self, other: torch.Tensor | Number) -> SparseTensor:
        return self._binary(other, operator.truediv, reflected=True)

    def __neg__(self) -> SparseTensor:
        return self.replace(-self.feats)

    def cat_channels(self, *others: SparseTensor) -> SparseTensor:
        """Concatenates features along the last dimension; all tensors must share the layout.

        Args:
            *others: SparseTensors with this layout and feats ``[N, ..., C_i]``.

        Returns:
            A SparseTensor with feats ``[N, ..., C + sum(C_i)]``.
        """
        for i, other in enumerate(others):
            self._check_layout(other, f"others[{i}]")
        return self.replace(torch.cat([self.feats, *[o.feats for o in others]], dim=-1))

    # ------------------------------------------------------------------ conversions

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """Moves to a device and/or casts the features, like ``torch.Tensor.to``.

        Coordinates and offsets follow the device but stay int32. Returns a new tensor.
        """
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseTensor._from_parts(
            self.coords.to(feats.device),
            feats,
            self.offsets.to(feats.device),
            self.batch_size,
            self.spatial_shape,
            self.stride,
        )

    def detach(self) -> SparseTensor:
        """Same layout, features detached from the autograd graph."""
        return self.replace(self.feats.detach())

    def to_dense(self, fill_value: float = 0.0) -> torch.Tensor:
        """Scatters the features into a dense grid.

        Args:
            fill_value: Value of the empty cells.

        Returns:
            Tensor ``[B, C, X, Y, Z]`` for ``[N, C]`` feats (``[B, *F, X, Y, Z]`` for ``[N, *F]``).
        """
        trailing = self.feats.shape[1:]
        dense = self.feats.new_full((self.batch_size, *self.spatial_shape, *trailing), fill_value)
        c = self.coords.long()
        dense = dense.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), self.feats)
        return dense.permute(0, *range(4, 4 + len(trailing)), 1, 2, 3)

    def to_list(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Splits into per-sample ``([N_b, 3] int32 coords, [N_b, ...] feats)`` lists (one host sync)."""
        counts = self.counts.tolist()
        return list(self.coords[:, 1:].split(counts)), list(self.feats.split(counts))

    def to_padded(self, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Pads every sample to the longest one.

        Args:
            pad_value: Value of padded feature rows.

        Returns:
            ``(padded [B, L, ...], mask [B, L] bool)`` with ``L = max(counts)`` (one host sync).
        """
        counts = self.counts
        length = int(counts.max())  # batch_size >= 1, so counts is never empty
        position = torch.arange(self.num_voxels, device=self.device) - self.offsets[self.batch_index].long()
        padded = self.feats.new_full((self.batch_size, length, *self.feats.shape[1:]), pad_value)
        padded = padded.index_put((self.batch_index, position), self.feats)
        mask = torch.arange(length, device=self.device)[None, :] < counts[:, None]
        return padded, mask

    def select(self, samples: Sequence[int] | torch.Tensor) -> SparseTensor:
        """Picks samples (in the given order; repeats allowed) and renumbers them ``0..len-1``.

        Args:
            samples: Sample indices, a list or an integer tensor ``[B']``, each in ``[0, B)``.

        Returns:
            A SparseTensor with ``batch_size = B'``; sample ``i`` is input sample ``samples[i]`` with
            its rows in their original order. Same ``spatial_shape`` and ``stride``.

        Raises:
            ValueError: ``samples`` is empty or holds an index outside ``[0, B)``.
        """
        index = torch.as_tensor(samples, dtype=torch.long, device=self.device).reshape(-1)
        if index.numel() == 0:
            raise ValueError("samples: expected at least one sample index, got none")
        if bool((index < 0).any() | (index >= self.batch_size).any()):
            raise ValueError(f"samples: expected indices in [0, {self.batch_size}), got {index.tolist()}")
        starts = self.offsets[index].long()
        counts = self.counts[index].long()
        new_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        total = int(new_offsets[-1])
        new_batch = torch.repeat_interleave(
            torch.arange(index.numel(), device=self.device), counts, output_size=total
        )
        rows = starts[new_batch] + torch.arange(total, device=self.device) - new_offsets[new_batch]
        coords = self.coords[rows].clone()
        coords[:, 0] = new_batch.to(torch.int32)
        return SparseTensor._from_parts(
            coords,
            self.feats[rows],
            new_offsets.to(torch.int32),
            index.numel(),
            self.spatial_shape,
            self.stride,
        )

    def canonical(self) -> SparseTensor:
        """Rows sorted by (batch, x, y, z): the canonical order, independent of input row order."""
        order = self.canonical_order()
        return SparseTensor._from_parts(
            self.coords[order],
            self.feats[order],
            self.offsets,
            self.batch_size,
            self.spatial_shape,
            self.stride,
        )

    def canonical_order(self) -> torch.Tensor:
        """int64 ``[N]``: the row permutation that sorts by (batch, x, y, z)."""
        return self.sorted_keys()[1]

    def sorted_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted packed keys of the coordinates and the sorting permutation (cached on the layout).

        Returns:
            ``(keys [N] int64 ascending, perm [N] int64)`` with ``keys == pack_keys(coords)[perm]``.
        """
        if "sorted_keys" not in self._cache:
            self._cache["sorted_keys"] = torch.sort(pack_keys(self.coords), stable=True)
        return self._cache["sorted_keys"]

    @property
    def cache(self) -> dict[Any, Any]:
        """The layout's memo: data derived from the coordinates (sorted keys, kernel maps, parent maps).

        Shared by every tensor made with [`replace`][sparse3d.tensor.SparseTensor.replace]. Ops may read it
        (``cache.get(key)``) and add entries, but only values that are pure functions of the layout, so
        that a cache never changes a result. Prefer [`cached`][sparse3d.tensor.SparseTensor.cached].
        """
        return self._cache

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Returns ``build()``, memoised on this layout under ``key`` (shared by `replace`)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes coords, feats and layout metadata to a ``.safetensors`` file.

        Args:
            path: Destination file. Features are detached and copied to the CPU; bf16 and empty
                samples round-trip bitwise.
        """
        meta = {
            "format": "sparse3d.SparseTensor",
            "batch_size": str(self.batch_size),
            "spatial_shape": json.dumps(list(self.spatial_shape)),
            "stride": json.dumps(list(self.stride)),
        }
        tensors = {"coords": self.coords.contiguous().cpu(), "feats": self.feats.detach().contiguous().cpu()}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SparseTensor:
        """Reads a file written by `save` and validates it.

        Args:
            path: A ``.safetensors`` file written by `save`.
            device: Device to load coords and feats onto.

        Returns:
            The saved SparseTensor (same coords, feats, batch size, spatial shape and stride).

        Raises:
            ValueError: ``path`` is not a safetensors file or was not written by `save`.
        """
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise ValueError(
                f"path: expected a sparse3d.SparseTensor .safetensors file, got {path} ({error})"
            ) from error
        if meta.get("format") != "sparse3d.SparseTensor":
            raise ValueError(
                f"path: expected a sparse3d.SparseTensor file (metadata format='sparse3d.SparseTensor'), got "
                f"{path} with metadata {meta}"
            )
        tensors = load_file(os.fspath(path), device=str(device))
        return cls(
            tensors["coords"],
            tensors["feats"],
            batch_size=int(meta["batch_size"]),
            spatial_shape=json.loads(meta["spatial_shape"]),
            stride=json.loads(meta["stride"]),
        )
