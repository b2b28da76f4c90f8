"""Attention over packed variable-length batches: block-diagonal self-attention, joint attention over two
modalities, windowed (swin) attention over the voxel grid and cross-attention to dense tokens.

Every op has a plain-PyTorch reference (a per-sample SDPA loop) that runs on CPU and CUDA; fast CUDA
paths (batched SDPA, padded SDPA, ``varlen_attn``, FlexAttention, flash-attn) are tested against it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparse3d.functional.coords import _triple, pack_keys

__all__ = [
    "BACKENDS",
    "WindowPartition",
    "available_backends",
    "cross_attention",
    "interleave_index",
    "joint_attention",
    "select_backend",
    "varlen_attention",
    "window_partition",
    "windowed_attention",
]

BACKENDS = ("reference", "sdpa", "padded", "masked", "varlen", "flex", "flash_attn")
"""Backend names accepted by every op here (plus ``"auto"`` / ``None``).

* ``"reference"``: one SDPA call per sample (one host sync to read the offsets). CPU and CUDA.
* ``"sdpa"``: all samples have equal query and equal key lengths: one batched SDPA call on
  ``[B, L, H, D]`` views, no mask (the flash kernel on CUDA). Errors on unequal lengths.
* ``"padded"``: every sample padded to the longest; padded keys are excluded exactly through one
  extra head-dim channel (query 1, key ``-inf`` on padding, 0 on real keys), so no mask is needed and
  the flash kernel stays usable. Costs ``B * max_len`` rows. CPU and CUDA.
* ``"masked"``: every sample padded to the longest, padded keys excluded by a boolean key mask
  ``[B, 1, 1, L]`` (SDPA's memory-efficient kernel on CUDA). Costs ``B * max_len`` rows. CPU and CUDA.

Every backend isolates samples: sample ``b``'s output depends only on sample ``b``'s queries, keys and
values (a NaN or Inf elsewhere in the batch leaves it bitwise unchanged), and keys of other samples or
padding never receive weight, however low the real scores are.
* ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn``. CUDA, fp16/bf16, ``D == Dv``.
* ``"flex"``: compiled FlexAttention with a document mask. CUDA.
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` when the package is installed. CUDA, fp16/bf16.
"""

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- checks


def _check_packed(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [T, H, D], got {type(tensor).__name__}")
    if tensor.dim() != 3:
        raise ValueError(f"{name}: expected a packed tensor of shape [T, H, D], got {list(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {tensor.dtype}")


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, names: Sequence[str]) -> None:
    """Shapes, dtypes and devices of one (query, key, value) triple (heads and head dims must match)."""
    q_name, k_name, v_name = names
    for name, tensor in zip(names, (query, key, value), strict=True):
        _check_packed(name, tensor)
    heads, dim = query.shape[1], query.shape[2]
    if key.shape[1] != heads or value.shape[1] != heads:
        raise ValueError(
            f"{k_name} and {v_name}: expected H={heads} heads (that of {q_name}), got {key.shape[1]} and "
            f"{value.shape[1]}"
        )
    if key.shape[2] != dim:
        raise ValueError(f"{k_name}: expected head dim D={dim} (that of {q_name}), got {key.shape[2]}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"{v_name}: expected {key.shape[0]} rows (those of {k_name}), got {value.shape[0]}")
    for name, tensor in ((k_name, key), (v_name, value)):
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (that of {q_name}), got {tensor.dtype}")
        if tensor.device != query.device:
            raise ValueError(
                f"{name}: expected device {query.device} (that of {q_name}), got {tensor.device}"
            )


def _check_offsets(name: str, offsets: torch.Tensor, device: torch.device) -> None:
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor [B + 1], got {type(offsets).__name__}")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"{name}: expected shape [B + 1] with B >= 1, got {list(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 (or int64), got {offsets.dtype}")
    if offsets.device != device:
        raise ValueError(f"{name}: expected device {device} (that of the tokens), got {offsets.device}")


def _offset_stats(offsets: torch.Tensor) -> torch.Tensor:
    """int64 ``[4]``: first value, last value, smallest and largest segment length (on device)."""
    lengths = offsets.diff().long()
    return torch.stack([offsets[0].long(), offsets[-1].long(), lengths.min(), lengths.max()])


def _validated_max(
    pairs: Sequence[tuple[str, torch.Tensor, int, str]],
) -> list[int]:
    """Checks offsets against row counts with one host sync; returns each offsets' longest segment.

    Args:
        pairs: ``(offsets_name, offsets, rows, rows_name)`` for each offsets tensor to check.
    """
    stats = torch.stack([_offset_stats(offsets) for _, offsets, _, _ in pairs]).tolist()  # the one sync
    out = []
    for (name, _, rows, rows_name), (first, last, shortest, longest) in zip(pairs, stats, strict=True):
        if first != 0 or last != rows:
            raise ValueError(
                f"{name}: expected offsets[0] == 0 and offsets[-1] == {rows} (the rows of {rows_name}), "
                f"got {first} and {last}"
            )
        if shortest < 0:
            raise ValueError(f"{name}: expected non-decreasing offsets, got a segment of length {shortest}")
        out.append(int(longest))
    return out


def _segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]``: the segment of each row (empty segments are skipped), no host sync."""
    rows = torch.arange(total, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)


def _default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


class _Zeros(torch.autograd.Function):
    """Zero outputs ``[rows, H, Dv]`` of queries without keys, kept in the graph (zero gradients)."""

    @staticmethod
    def forward(ctx, query, value, rows):
        return value.new_zeros(rows, query.shape[1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


def _zeros(query: torch.Tensor, value: torch.Tensor, rows: int) -> torch.Tensor:
    return _Zeros.apply(query, value, rows)


# ---------------------------------------------------------------------------------------------- backends


@functools.cache
def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Backends usable for tensors of this device and dtype.

    Listed in [`BACKENDS`][sparse3d.functional.attention.BACKENDS] order; ``"sdpa"`` is listed
    although it needs equal lengths.

    Args:
        device: Device of the tokens.
        dtype: Dtype of the tokens.

    Returns:
        Backend names.
    """
    device = torch.device(device)
    names = ["reference", "sdpa", "padded", "masked"]
    if device.type == "cuda":
        if dtype in _HALF and _has_varlen():
            names.append("varlen")
        if _has_flex():
            names.append("flex")
        if dtype in _HALF and _has_flash_attn():
            names.append("flash_attn")
    return names


def select_backend(
    query: torch.Tensor, value: torch.Tensor, *, equal_lengths: bool, num_segments: int
) -> str:
    """The backend ``"auto"`` picks, from input properties only (no host sync, no environment variables).

    Rules (set from H100 measurements, ``benchmarks/RESULTS.md``; see ``benchmarks/attention.py``):

    1. equal lengths in every segment: ``"sdpa"`` (one batched call, flash kernel on CUDA);
    2. at most 16 segments: ``"reference"``, the per-sample SDPA loop (flash kernel per sample on CUDA;
       one host sync to read the offsets). On an H100, 8 samples of 1k-8k tokens, 16 heads x 72, bf16:
       281 TFLOP/s forward against 207 for ``varlen_attn`` (2026-11-25);
    3. CUDA, fp16/bf16, ``D == Dv``, ``D % 8 == 0``, ``D <= 256``: ``"varlen"`` when torch has it,
       else ``"flash_attn"`` when installed (many segments, e.g. windows: no per-segment launches);
    4. otherwise: ``"padded"``.

    Args:
        query: Packed queries ``[T, H, D]``.
        value: Packed values ``[S, H, Dv]``.
        equal_lengths: Whether all segments have equal query and equal key lengths.
        num_segments: Number of segments ``B``.

    Returns:
        A name from [`BACKENDS`][sparse3d.functional.attention.BACKENDS].
    """
    if equal_lengths:
        return "sdpa"
    if num_segments <= 16:
        return "reference"
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    if (
        query.is_cuda
        and query.dtype in _HALF
        and head_dim == value_dim
        and head_dim % 8 == 0
        and head_dim <= 256
    ):
        if _has_varlen():
            return "varlen"
        if _has_flash_attn():
            return "flash_attn"
    return "padded"


def _reference(query, key, value, offsets_q, offsets_kv, scale):
    """Per-sample SDPA loop; a sample with queries but no keys gets zeros."""
    bounds_q = offsets_q.tolist()  # the reference's one host sync
    bounds_kv = offsets_kv.tolist()
    outputs = []
    for b in range(len(bounds_q) - 1):
        q_start, q_end = bounds_q[b], bounds_q[b + 1]
        kv_start, kv_end = bounds_kv[b], bounds_kv[b + 1]
        if q_end == q_start:
            continue
        if kv_end == kv_start:
            outputs.append(_zeros(query, value, q_end - q_start))
            continue
        # 4-D inputs: CUDA's flash/cuDNN kernels only take [B, H, L, D] (3-D falls back to the math kernel).
        out = F.scaled_dot_product_attention(
            query[None, q_start:q_end].transpose(1, 2),  # [1, H, Lq, D]
            key[None, kv_start:kv_end].transpose(1, 2),  # [1, H, Lk, D]
            value[None, kv_start:kv_end].transpose(1, 2),  # [1, H, Lk, Dv]
            scale=scale,
        )  # [1, H, Lq, Dv]
        outputs.append(out[0].transpose(0, 1))  # [Lq, H, Dv]
    if not outputs:
        return _zeros(query, value, 0)
    return torch.cat(outputs)


def _sdpa_equal(query, key, value, num_segments, max_q, max_kv, scale):
    """All segments equal: one batched SDPA call on views, no mask."""
    heads, value_dim = query.shape[1], value.shape[-1]
    if max_kv == 0:
        return _zeros(query, value, query.shape[0])
    out = F.scaled_dot_product_attention(
        query.view(num_segments, max_q, heads, -1).transpose(1, 2),  # [B, H, Lq, D]
        key.view(num_segments, max_kv, heads, -1).transpose(1, 2),  # [B, H, Lk, D]
        value.view(num_segments, max_kv, heads, value_dim).transpose(1, 2),  # [B, H, Lk, Dv]
        scale=scale,
    )  # [B, H, Lq, Dv]
    return out.transpose(1, 2).reshape(query.shape[0], heads, value_dim)  # [T, H, Dv]


def _padded_rows(tokens, segment, offsets, length, num_segments, width, channel=None, real=0.0, padding=0.0):
    """Scatters packed rows ``[T, H, D]`` into ``[B, length, H, width]`` (zero padded, differentiable).

    With ``channel`` (a padded channel index ``>= D``), that channel holds ``real`` on the rows of
    ``tokens`` and ``padding`` on the padding rows. Returns the padded tensor and each row's flat slot.
    """
    total, heads, dim = tokens.shape
    position = torch.arange(total, device=tokens.device) - offsets.long()[segment]
    flat = segment * length + position  # [T]
    if width > dim:
        pad = tokens.new_zeros(total, heads, width - dim)
        if channel is not None:
            pad[..., channel - dim] = real
        tokens = torch.cat([tokens, pad], dim=-1)  # [T, H, width]
    base = tokens.new_zeros(num_segments * length, heads, width)
    if channel is not None:
        base[..., channel] = padding
    padded = base.index_copy(0, flat, tokens)  # [B * length, H, width]
    return padded.view(num_segments, length, heads, width), flat


def _batched_sdpa(query_p, key_p, value_p, scale, mask=None):
    """SDPA over padded batches ``[B, L, H, C]``; on CPU in chunks of samples (the math kernel
    materialises ``[b, H, Lq, Lk]`` scores). Batches are independent, so chunking changes nothing."""
    num_segments, max_q, heads, _ = query_p.shape
    max_kv = key_p.shape[1]
    chunk = num_segments
    if not query_p.is_cuda:
        chunk = max(1, (1 << 26) // max(1, heads * max_q * max_kv))
    outputs = []
    for start in range(0, num_segments, chunk):
        outputs.append(
            F.scaled_dot_product_attention(
                query_p[start : start + chunk].transpose(1, 2),  # [b, H, Lq, C]
                key_p[start : start + chunk].transpose(1, 2),  # [b, H, Lk, C]
                value_p[start : start + chunk].transpose(1, 2),  # [b, H, Lk, Cv]
                attn_mask=None if mask is None else mask[start : start + chunk],  # [b, 1, 1, Lk]
                scale=scale,
            ).transpose(1, 2)  # [b, Lq, H, Cv]
        )
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # [B, Lq, H, Cv]


def _padded(query, key, value, offsets_q, offsets_kv, num_segments, max_q, max_kv, scale):
    """Pads every segment to the longest and excludes padded keys with one extra head-dim channel.

    Channel ``D`` is 1 on every query row (real or padding) and, on the keys, 0 for real keys and
    ``-inf`` for padding, so padded keys score exactly ``-inf`` (weight 0 after softmax, whatever the
    real scores are) and real scores are unchanged. No mask is passed, so SDPA keeps its flash kernel.
    A segment without keys sees one padding key with channel ``D`` 0 and a zero value: its output is 0.
    Each segment is its own batch entry, so one segment's values never reach another's output.
    """
    total, heads, head_dim = query.shape
    value_dim = value.shape[-1]
    if max_q == 0:
        return _zeros(query, value, 0)
    width = -(-(max(head_dim, value_dim) + 1) // 8) * 8
    segment_q = _segment_ids(offsets_q, total)
    segment_kv = _segment_ids(offsets_kv, key.shape[0])
    max_kv = max(max_kv, 1)
    query_p, flat_q = _padded_rows(
        query, segment_q, offsets_q, max_q, num_segments, width, channel=head_dim, real=1.0, padding=1.0
    )  # [B, Lq, H, width]
    key_p, _ = _padded_rows(
        key, segment_kv, offsets_kv, max_kv, num_segments, width, channel=head_dim, padding=-math.inf
    )  # [B, Lk, H, width]
    keyless = (offsets_kv.diff() == 0)[:, None, None, None]  # [B, 1, 1, 1]
    first = torch.arange(max_kv, device=key.device)[None, :, None, None] == 0  # [1, Lk, 1, 1]
    channel = torch.arange(width, device=key.device) == head_dim  # [width]
    key_p = key_p.masked_fill(keyless & first & channel, 0.0)  # one finite padding key for keyless segments
    value_p, _ = _padded_rows(value, segment_kv, offsets_kv, max_kv, num_segments, width)
    out = _batched_sdpa(query_p, key_p, value_p, scale)  # [B, Lq, H, width]
    out = out.reshape(num_segments * max_q, heads, width).index_select(0, flat_q)  # [T, H, width]
    return out[..., :value_dim]


def _masked(query, key, value, offsets_q, offsets_kv, num_segments, max_q, max_kv, scale):
    """Pads every segment to the longest and excludes padded keys with a boolean key mask ``[B, 1, 1, Lk]``.

    SDPA turns the mask into ``-inf`` scores, so padded keys never win; with a mask SDPA uses its
    memory-efficient kernel on CUDA. A segment without keys attends to its zero-valued padding: 0.
    """
    total, heads, _ = query.shape
    if max_q == 0:
        return _zeros(query, value, 0)
    segment_q = _segment_ids(offsets_q, total)
    segment_kv = _segment_ids(offsets_kv, key.shape[0])
    max_kv = max(max_kv, 1)
    query_p, flat_q = _padded_rows(query, segment_q, offsets_q, max_q, num_segments, query.shape[-1])
    key_p, _ = _padded_rows(key, segment_kv, offsets_kv, max_kv, num_segments, key.shape[-1])
    value_p, _ = _padded_rows(value, segment_kv, offsets_kv, max_kv, num_segments, value.shape[-1])
    counts = offsets_kv.diff()  # [B]
    real = torch.arange(max_kv, device=key.device)[None, :] < counts[:, None]  # [B, Lk]
    allowed = real | (counts == 0)[:, None]  # a keyless segment attends to its zero padding
    out = _batched_sdpa(query_p, key_p, value_p, scale, mask=allowed[:, None, None, :])  # [B, Lq, H, Dv]
    return out.reshape(num_segments * max_q, heads, value.shape[-1]).index_select(0, flat_q)  # [T, H, Dv]


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _varlen(query, key, value, offsets_q, offsets_kv, max_q, max_kv, scale):
    from torch.nn.attention.varlen import varlen_attn

    head_dim = query.shape[-1]
    if not math.isclose(scale, 1.0 / math.sqrt(head_dim)):
        # The scale keyword only exists from torch 2.11: fold it into the query instead.
        query = query * (scale * math.sqrt(head_dim))
    return varlen_attn(
        _last_dim_contiguous(query),
        _last_dim_contiguous(key),
        _last_dim_contiguous(value),
        offsets_q.to(torch.int32),
        offsets_kv.to(torch.int32),
        max_q,
        max_kv,
    )


def _flash_attn(query, key, value, offsets_q, offsets_kv, max_q, max_kv, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        _last_dim_contiguous(query),
        _last_dim_contiguous(key),
        _last_dim_contiguous(value),
        offsets_q.to(torch.int32),
        offsets_kv.to(torch.int32),
        max_q,
        max_kv,
        softmax_scale=scale,
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(query, key, value, offsets_q, offsets_kv, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    segment_q = _segment_ids(offsets_q, query.shape[0])
    segment_kv = _segment_ids(offsets_kv, key.shape[0])

    def same_sample(batch, head, q_index, kv_index):
        return segment_q[q_index] == segment_kv[kv_index]

    # _compile=True builds the mask with a compiled kernel (milliseconds faster than eager).
    block_mask = create_block_mask(
        same_sample, None, None, query.shape[0], key.shape[0], device=query.device, _compile=True
    )
    out = _compiled_flex()(
        query.transpose(0, 1)[None],  # [1, H, T, D]
        key.transpose(0, 1)[None],  # [1, H, S, D]
        value.transpose(0, 1)[None],  # [1, H, S, Dv]
        block_mask=block_mask,
        scale=scale,
    )  # [1, H, T, Dv]
    return out[0].transpose(0, 1)  # [T, H, Dv]


# ---------------------------------------------------------------------------------------------- public ops


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets_q: torch.Tensor,
    offsets_kv: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_kv: int | None = None,
) -> torch.Tensor:
    r"""Block-diagonal attention over a packed batch: sample ``b``'s queries attend to sample ``b``'s keys.

    ``out[i] = softmax(scale * query[i] @ key[s_b].T) @ value[s_b]`` where ``s_b`` are the key rows
    ``offsets_kv[b]:offsets_kv[b+1]`` of the sample ``b`` that owns query row ``i``. Samples without
    queries are fine. A sample with queries but **no keys** gives **zero** outputs (and zero
    gradients): the attention of an empty set is defined as 0, on every backend.

    Args:
        query: Packed queries ``[T, H, D]``.
        key: Packed keys ``[S, H, D]``.
        value: Packed values ``[S, H, Dv]``.
        offsets_q: int32 ``[B + 1]``, query rows of each sample (``cu_seqlens``), ``offsets_q[-1] == T``.
        offsets_kv: int32 ``[B + 1]``, key/value rows of each sample, ``offsets_kv[-1] == S``.
        scale: Score scale; default ``1 / sqrt(D)``.
        backend: One of [`BACKENDS`][sparse3d.functional.attention.BACKENDS], or ``None``/``"auto"``
            to choose with [`select_backend`][sparse3d.functional.attention.select_backend].
        max_seqlen_q: Longest query segment (an upper bound is fine). Pass it together with
            ``max_seqlen_kv`` to skip the one host sync that otherwise validates the offsets and finds
            the maxima; the offsets are then trusted, not checked.
        max_seqlen_kv: Longest key segment (an upper bound is fine).

    Returns:
        Packed outputs ``[T, H, Dv]`` in the dtype of ``query``.

    Raises:
        ValueError: Mismatched heads, head dims, rows, devices, offsets that do not match ``T``/``S``,
            offsets of different batch sizes, an unknown backend, or a backend that cannot run here.
        TypeError: Non-floating or mismatched dtypes, or non-integer offsets.
    """
    _check_qkv(query, key, value, ("query", "key", "value"))
    _check_offsets("offsets_q", offsets_q, query.device)
    _check_offsets("offsets_kv", offsets_kv, query.device)
    if offsets_q.shape[0] != offsets_kv.shape[0]:
        raise ValueError(
            f"offsets_q and offsets_kv: expected the same number of samples, got B={offsets_q.shape[0] - 1} "
            f"and B={offsets_kv.shape[0] - 1}"
        )
    num_segments = offsets_q.shape[0] - 1
    if max_seqlen_q is None or max_seqlen_kv is None:
        max_seqlen_q, max_seqlen_kv = _validated_max(
            [
                ("offsets_q", offsets_q, query.shape[0], "query"),
                ("offsets_kv", offsets_kv, key.shape[0], "key"),
            ]
        )
    scale = _default_scale(scale, query.shape[-1])
    if query.shape[0] == 0:
        return _zeros(query, value, 0)
    equal = query.shape[0] == num_segments * max_seqlen_q and key.shape[0] == num_segments * max_seqlen_kv
    name = "auto" if backend is None else backend
    if name == "auto":
        name = select_backend(query, value, equal_lengths=equal, num_segments=num_segments)
    if name == "reference":
        return _reference(query, key, value, offsets_q, offsets_kv, scale)
    if name == "sdpa":
        if not equal:
            raise ValueError(
                "backend: 'sdpa' needs equal query lengths and equal key lengths in every sample, got "
                f"T={query.shape[0]}, S={key.shape[0]} for B={num_segments} with longest "
                f"{max_seqlen_q} and {max_seqlen_kv}; use 'auto'"
            )
        return _sdpa_equal(query, key, value, num_segments, max_seqlen_q, max_seqlen_kv, scale)
    if name == "padded":
        return _padded(
            query, key, value, offsets_q, offsets_kv, num_segments, max_seqlen_q, max_seqlen_kv, scale
        )
    if name == "masked":
        return _masked(
            query, key, value, offsets_q, offsets_kv, num_segments, max_seqlen_q, max_seqlen_kv, scale
        )
    if name in ("varlen", "flash_attn", "flex"):
        if not query.is_cuda:
            raise ValueError(f"backend: {name!r} needs CUDA tensors, got device {query.device}; use 'auto'")
        if name != "flex" and query.dtype not in _HALF:
            raise ValueError(f"backend: {name!r} needs float16 or bfloat16, got {query.dtype}; use 'auto'")
        if name == "varlen":
            return _varlen(query, key, value, offsets_q, offsets_kv, max_seqlen_q, max_seqlen_kv, scale)
        if name == "flash_attn":
            return _flash_attn(query, key, value, offsets_q, offsets_kv, max_seqlen_q, max_seqlen_kv, scale)
        return _flex(query, key, value, offsets_q, offsets_kv, scale)
    raise ValueError(f"backend: expected None, 'auto' or one of {BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------------------------- joint


class _Interleave(torch.autograd.Function):
    """Writes rows of ``a`` to ``index_a`` and rows of ``b`` to ``index_b`` of a new tensor."""

    @staticmethod
    def forward(ctx, rows_a, rows_b, index_a, index_b):
        ctx.save_for_backward(index_a, index_b)
        out = rows_a.new_empty((rows_a.shape[0] + rows_b.shape[0], *rows_a.shape[1:]))
        out.index_copy_(0, index_a, rows_a)
        out.index_copy_(0, index_b, rows_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        index_a, index_b = ctx.saved_tensors
        grad_a, grad_b = _Split.apply(grad, index_a, index_b)
        return grad_a, grad_b, None, None


class _Split(torch.autograd.Function):
    """Inverse of `_Interleave`: gathers rows ``index_a`` and ``index_b``."""

    @staticmethod
    def forward(ctx, rows, index_a, index_b):
        ctx.save_for_backward(index_a, index_b)
        return rows.index_select(0, index_a), rows.index_select(0, index_b)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        index_a, index_b = ctx.saved_tensors
        # An unused output has no gradient: zeros of its shape.
        if grad_a is None:
            grad_a = grad_b.new_zeros((index_a.shape[0], *grad_b.shape[1:]))
        if grad_b is None:
            grad_b = grad_a.new_zeros((index_b.shape[0], *grad_a.shape[1:]))
        return _Interleave.apply(grad_a, grad_b, index_a, index_b), None, None


def interleave_index(
    offsets_a: torch.Tensor, offsets_b: torch.Tensor, num_a: int, num_b: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Where each token of two packed batches lands in their per-sample concatenation.

    The joint sequence holds, for every sample ``b`` in order, that sample's ``a`` rows then its ``b``
    rows:

        a: [a0 a0 | a1]          offsets_a = [0, 2, 3]
        b: [b0 | b1 b1 b1]       offsets_b = [0, 1, 4]
        joint: [a0 a0 b0 | a1 b1 b1 b1]    offsets_joint = offsets_a + offsets_b = [0, 3, 7]

    Computed on device without a host sync: ``index_a[i] = i + offsets_b[sample(i)]`` and
    ``index_b[j] = j + offsets_a[sample(j) + 1]``.

    Args:
        offsets_a: int32 ``[B + 1]`` offsets of modality ``a`` (``offsets_a[-1] == num_a``).
        offsets_b: int32 ``[B + 1]`` offsets of modality ``b`` (``offsets_b[-1] == num_b``).
        num_a: Rows ``Ta`` of modality ``a``.
        num_b: Rows ``Tb`` of modality ``b``.

    Returns:
        ``(index_a [Ta] int64, index_b [Tb] int64, offsets_joint [B + 1] int32)``.
    """
    if offsets_a.shape != offsets_b.shape:
        raise ValueError(
            f"offsets_a and offsets_b: expected the same number of samples, got B={offsets_a.shape[0] - 1} "
            f"and B={offsets_b.shape[0] - 1}"
        )
    offsets_a_long, offsets_b_long = offsets_a.long(), offsets_b.long()
    rows_a = torch.arange(num_a, device=offsets_a.device)
    rows_b = torch.arange(num_b, device=offsets_b.device)
    index_a = rows_a + offsets_b_long[_segment_ids(offsets_a, num_a)]
    index_b = rows_b + offsets_a_long[_segment_ids(offsets_b, num_b) + 1]
    return index_a, index_b, (offsets_a_long + offsets_b_long).to(torch.int32)


def joint_attention(
    query_a: torch.Tensor,
    key_a: torch.Tensor,
    value_a: torch.Tensor,
    offsets_a: torch.Tensor,
    query_b: torch.Tensor,
    key_b: torch.Tensor,
    value_b: torch.Tensor,
    offsets_b: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
    max_seqlen: int | tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Full attention over each sample's concatenation of two modalities, without padding either.

    For sample ``b`` the joint sequence is ``[a tokens of b; b tokens of b]`` (FLUX order: ``a`` =
    condition/context tokens first, ``b`` = voxel tokens). Built by one permutation into the joint
    packed order ([`interleave_index`][sparse3d.functional.attention.interleave_index]), one
    [`varlen_attention`][sparse3d.functional.attention.varlen_attention] call and one permutation back.

    Args:
        query_a: Modality ``a`` queries ``[Ta, H, D]``.
        key_a: Modality ``a`` keys ``[Ta, H, D]``.
        value_a: Modality ``a`` values ``[Ta, H, Dv]``.
        offsets_a: int32 ``[B + 1]`` offsets of modality ``a``.
        query_b: Modality ``b`` queries ``[Tb, H, D]``.
        key_b: Modality ``b`` keys ``[Tb, H, D]``.
        value_b: Modality ``b`` values ``[Tb, H, Dv]``.
        offsets_b: int32 ``[B + 1]`` offsets of modality ``b``.
        scale: Score scale; default ``1 / sqrt(D)``.
        backend: See [`varlen_attention`][sparse3d.functional.attention.varlen_attention].
        max_seqlen: Longest joint sequence ``max_b (La_b + Lb_b)`` (an upper bound is fine), or the
            longest sample of each modality ``(max_b La_b, max_b Lb_b)``; passing it skips the host sync
            that validates the offsets (they are then trusted). When every sample has the same length in
            each modality (known from the per-modality maxima, e.g. ``(h * w, max voxels)``), the joint
            sequences are built by one ``cat`` per tensor into ``[B, La + Lb, H, D]`` and attended with one
            batched SDPA call, with no permutation (see ``benchmarks/RESULTS.md`` for what that saves).

    Returns:
        ``(out_a [Ta, H, Dv], out_b [Tb, H, Dv])``.

    Raises:
        ValueError: Mismatched shapes between the modalities, ``len(offsets_a) != len(offsets_b)``, or
            offsets that do not match the rows.
    """
    _check_qkv(query_a, key_a, value_a, ("query_a", "key_a", "value_a"))
    _check_qkv(query_b, key_b, value_b, ("query_b", "key_b", "value_b"))
    for name, tensor, reference_tensor, reference_name in (
        ("key_a", key_a, query_a, "query_a"),
        ("key_b", key_b, query_b, "query_b"),
    ):
        if tensor.shape[0] != reference_tensor.shape[0]:
            raise ValueError(
                f"{name}: expected {reference_tensor.shape[0]} rows (those of {reference_name}), got "
                f"{tensor.shape[0]}"
            )
    for name, tensor, expected in (
        ("query_b", query_b, query_a),
        ("value_b", value_b, value_a),
    ):
        if tensor.shape[1:] != expected.shape[1:]:
            raise ValueError(
                f"{name}: expected [*, H, D] = [*, {', '.join(map(str, expected.shape[1:]))}] to match "
                f"modality a, got {list(tensor.shape)}"
            )
        if tensor.dtype != expected.dtype or tensor.device != expected.device:
            raise TypeError(
                f"{name}: expected {expected.dtype} on {expected.device} like modality a, got "
                f"{tensor.dtype} on {tensor.device}"
            )
    _check_offsets("offsets_a", offsets_a, query_a.device)
    _check_offsets("offsets_b", offsets_b, query_a.device)
    if offsets_a.shape[0] != offsets_b.shape[0]:
        raise ValueError(
            f"offsets_a and offsets_b: expected the same number of samples (len(offsets_a) == "
            f"len(offsets_b)), got B={offsets_a.shape[0] - 1} and B={offsets_b.shape[0] - 1}"
        )
    num_a, num_b = query_a.shape[0], query_b.shape[0]
    max_a = max_b = None
    if max_seqlen is None:  # one host sync: validate both offsets and find the longest samples
        max_a, max_b, max_seqlen = _validated_max(
            [
                ("offsets_a", offsets_a, num_a, "query_a"),
                ("offsets_b", offsets_b, num_b, "query_b"),
                ("offsets_a + offsets_b", offsets_a.long() + offsets_b.long(), num_a + num_b, "both"),
            ]
        )
    elif isinstance(max_seqlen, tuple):
        max_a, max_b = max_seqlen
        max_seqlen = max_a + max_b
    num_samples = offsets_a.shape[0] - 1
    # Each modality's longest sample times B equals its total only if all its samples are that long.
    equal = max_a is not None and num_a == num_samples * max_a and num_b == num_samples * max_b
    if equal and num_samples > 0 and max_seqlen > 0 and backend in (None, "auto", "sdpa"):
        return _joint_equal(query_a, key_a, value_a, query_b, key_b, value_b, num_samples, scale)
    index_a, index_b, offsets_joint = interleave_index(offsets_a, offsets_b, num_a, num_b)
    query = _Interleave.apply(query_a, query_b, index_a, index_b)  # [Ta + Tb, H, D]
    key = _Interleave.apply(key_a, key_b, index_a, index_b)  # [Ta + Tb, H, D]
    value = _Interleave.apply(value_a, value_b, index_a, index_b)  # [Ta + Tb, H, Dv]
    out = varlen_attention(
        query,
        key,
        value,
        offsets_joint,
        offsets_joint,
        scale=scale,
        backend=backend,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )  # [Ta + Tb, H, Dv]
    return _Split.apply(out, index_a, index_b)


def _joint_equal(query_a, key_a, value_a, query_b, key_b, value_b, num_samples, scale):
    """Joint attention when every sample has ``La`` a-tokens and ``Lb`` b-tokens: cat, one SDPA, views."""
    heads, value_dim = query_a.shape[1], value_a.shape[-1]
    length_a, length_b = query_a.shape[0] // num_samples, query_b.shape[0] // num_samples

    def joint(rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
        batched_a = rows_a.view(num_samples, length_a, heads, rows_a.shape[-1])  # [B, La, H, D]
        batched_b = rows_b.view(num_samples, length_b, heads, rows_b.shape[-1])  # [B, Lb, H, D]
        return torch.cat([batched_a, batched_b], dim=1).transpose(1, 2)  # [B, H, La + Lb, D]

    out = F.scaled_dot_product_attention(
        joint(query_a, query_b),
        joint(key_a, key_b),
        joint(value_a, value_b),
        scale=_default_scale(scale, query_a.shape[-1]),
    ).transpose(1, 2)  # [B, La + Lb, H, Dv]
    out_a = out[:, :length_a].reshape(num_samples * length_a, heads, value_dim)  # [Ta, H, Dv]
    out_b = out[:, length_a:].reshape(num_samples * length_b, heads, value_dim)  # [Tb, H, Dv]
    return out_a, out_b


# ---------------------------------------------------------------------------------------------- windowed


class WindowPartition(NamedTuple):
    """Tokens grouped by (sample, window cell).

    Built by [`window_partition`][sparse3d.functional.attention.window_partition].

    Attributes:
        order: int64 ``[N]``: row of the input at each grouped position (``grouped = rows[order]``).
        inverse: int64 ``[N]``: grouped position of each input row (``rows = grouped[inverse]``).
        offsets: int32 ``[G + 1]``: group boundaries in grouped order (no empty groups).
        max_size: Largest group (a host int).
    """

    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    max_size: int


class _Permute(torch.autograd.Function):
    """``rows[order]`` whose backward is the gather ``grad[inverse]`` (no scatter)."""

    @staticmethod
    def forward(ctx, rows, order, inverse):
        ctx.save_for_backward(order, inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        order, inverse = ctx.saved_tensors
        return _Permute.apply(grad, inverse, order), None, None


def window_partition(
    coords: torch.Tensor, window: int | Sequence[int], *, shift: bool = False
) -> WindowPartition:
    r"""Groups voxels by sample and window cell ``floor((xyz + shift * (w // 2)) / w)``.

    Groups are sorted by (sample, cell) and rows keep their input order inside a group (stable sort).
    One host sync (the number and the largest size of the groups). Cache the result on a layout with
    [`SparseTensor.cached`][sparse3d.tensor.SparseTensor.cached].

    Args:
        coords: Integer ``[N, 4]`` of (batch, x, y, z), non-negative.
        window: Window size ``w``, an int or one per axis.
        shift: Shift the windows by ``w // 2`` (the swin "shifted window" of odd blocks).

    Returns:
        A [`WindowPartition`][sparse3d.functional.attention.WindowPartition].
    """
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4:
        shape = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords: expected an integer tensor [N, 4] of (batch, x, y, z), got {shape}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise TypeError(f"coords: expected an integer dtype, got {coords.dtype}")
    size = torch.tensor(_triple(window, "window"), device=coords.device, dtype=torch.long)
    offset = size // 2 if shift else torch.zeros_like(size)
    cells = torch.div(coords[:, 1:].long() + offset, size, rounding_mode="floor")  # [N, 3]
    keys = pack_keys(torch.cat([coords[:, :1].long(), cells], dim=1))  # [N]
    sorted_keys, order = torch.sort(keys, stable=True)
    _, sizes = torch.unique_consecutive(sorted_keys, return_counts=True)  # [G], host sync
    offsets = torch.zeros(sizes.shape[0] + 1, dtype=torch.int32, device=coords.device)
    offsets[1:] = sizes.cumsum(0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    max_size = int(sizes.max()) if sizes.numel() else 0
    return WindowPartition(order, inverse, offsets, max_size)


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    coords: torch.Tensor,
    window: int | Sequence[int],
    *,
    shift: bool = False,
    offsets: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    partition: WindowPartition | None = None,
) -> torch.Tensor:
    r"""Attention within (sample, window cell) groups of the voxel grid (TRELLIS-style swin).

    Token ``i`` attends to the tokens of its own sample whose cell
    ``floor((xyz + shift * (w // 2)) / w)`` equals its own. Tokens are grouped by one stable sort
    ([`window_partition`][sparse3d.functional.attention.window_partition]), attended with
    [`varlen_attention`][sparse3d.functional.attention.varlen_attention] over the groups and put back
    in input order.

    Args:
        query: Queries ``[N, H, D]``, one row per voxel of ``coords``.
        key: Keys ``[N, H, D]``.
        value: Values ``[N, H, Dv]``.
        coords: Integer ``[N, 4]`` of (batch, x, y, z).
        window: Window size ``w`` (int or one per axis).
        shift: Shift the windows by ``w // 2``.
        offsets: Optional sample offsets ``[B + 1]`` of the packed batch. The sample of each row is read
            from ``coords[:, 0]``; when given, ``offsets[-1]`` is checked against ``N``.
        scale: Score scale; default ``1 / sqrt(D)``.
        backend: See [`varlen_attention`][sparse3d.functional.attention.varlen_attention].
        partition: Precomputed ``window_partition(coords, window, shift=shift)`` (skips its host sync).

    Returns:
        ``[N, H, Dv]`` in input row order.
    """
    _check_qkv(query, key, value, ("query", "key", "value"))
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"key: expected {query.shape[0]} rows (those of query), got {key.shape[0]}")
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4:
        shape = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords: expected an integer tensor [N, 4] of (batch, x, y, z), got {shape}")
    if coords.shape[0] != query.shape[0]:
        raise ValueError(f"coords: expected {query.shape[0]} rows (those of query), got {coords.shape[0]}")
    if offsets is not None:
        _check_offsets("offsets", offsets, query.device)
        _validated_max([("offsets", offsets, query.shape[0], "query")])
    if partition is None:
        partition = window_partition(coords, window, shift=shift)
    elif partition.order.shape[0] != query.shape[0]:
        raise ValueError(
            f"partition: expected a partition of {query.shape[0]} rows, got {partition.order.shape[0]}"
        )
    if query.shape[0] == 0:
        return _zeros(query, value, 0)
    order, inverse = partition.order, partition.inverse
    out = varlen_attention(
        _Permute.apply(query, order, inverse),
        _Permute.apply(key, order, inverse),
        _Permute.apply(value, order, inverse),
        partition.offsets,
        partition.offsets,
        scale=scale,
        backend=backend,
        max_seqlen_q=partition.max_size,
        max_seqlen_kv=partition.max_size,
    )  # [N, H, Dv] in grouped order
    return _Permute.apply(out, inverse, order)


# ---------------------------------------------------------------------------------------------- cross


def cross_attention(
    query: torch.Tensor,
    offsets_q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    r"""Sparse queries attend to their sample's dense condition tokens.

    Args:
        query: Packed queries ``[T, H, D]``.
        offsets_q: int32 ``[B + 1]`` query offsets.
        key: Dense keys ``[B, L, H, D]``.
        value: Dense values ``[B, L, H, Dv]``.
        key_padding_mask: Optional bool ``[B, L]``; **True marks a real key that is attended**, False a
            padding key that is ignored (SDPA's boolean-mask convention, the opposite of
            ``torch.nn.MultiheadAttention``). A sample whose keys are all padding gets zeros. Applying a
            mask costs one host sync (the number of real keys).
        scale: Score scale; default ``1 / sqrt(D)``.
        backend: See [`varlen_attention`][sparse3d.functional.attention.varlen_attention].
        max_seqlen_q: Longest query segment (an upper bound is fine); without a mask, passing it
            avoids every host sync (the offsets are then trusted).

    Returns:
        ``[T, H, Dv]``.
    """
    _check_packed("query", query)
    for name, tensor in (("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected a dense tensor [B, L, H, D], got {shape}")
    _check_offsets("offsets_q", offsets_q, query.device)
    num_samples, length = key.shape[0], key.shape[1]
    if offsets_q.shape[0] - 1 != num_samples or value.shape[0] != num_samples:
        raise ValueError(
            f"key and value: expected B={offsets_q.shape[0] - 1} samples (len(offsets_q) - 1), got "
            f"{key.shape[0]} and {value.shape[0]}"
        )
    if value.shape[1] != length:
        raise ValueError(f"value: expected L={length} tokens (those of key), got {value.shape[1]}")
    packed_key = key.reshape(num_samples * length, *key.shape[2:])  # [B * L, H, D]
    packed_value = value.reshape(num_samples * length, *value.shape[2:])  # [B * L, H, Dv]
    if key_padding_mask is None:
        offsets_kv = torch.arange(num_samples + 1, device=key.device, dtype=torch.int32) * length
    else:
        if key_padding_mask.shape != (num_samples, length) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask: expected bool [B, L] = [{num_samples}, {length}], got "
                f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}"
            )
        keep = key_padding_mask.reshape(-1)  # [B * L]
        packed_key = packed_key[keep]  # [S, H, D], host sync
        packed_value = packed_value[keep]  # [S, H, Dv]
        offsets_kv = torch.zeros(num_samples + 1, device=key.device, dtype=torch.int32)
        offsets_kv[1:] = key_padding_mask.sum(dim=1).cumsum(0)
    if max_seqlen_q is None:
        (max_seqlen_q,) = _validated_max([("offsets_q", offsets_q, query.shape[0], "query")])
    return varlen_attention(
        query,
        packed_key,
        packed_value,
        offsets_q,
        offsets_kv,
        scale=scale,
        backend=backend,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_kv=length,
    )
