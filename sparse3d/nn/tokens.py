"""`TokenStream`: one modality's packed batch of tokens with its RoPE tables, as the MMDiT blocks take it."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch

from sparse3d.functional.attention import _check_offsets

__all__ = ["RopeTables", "TokenStream"]

RopeTables = tuple[torch.Tensor, torch.Tensor]
"""``(cos, sin)`` tables ``[T, head_dim]``, one row per token, as from
[`rope_frequencies`][sparse3d.functional.rope.rope_frequencies]."""


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStream:
    """A packed, variable-length batch of the tokens of one modality, with their rotary tables.

    ```
    B = 3 samples with 2, 0 and 3 tokens (T = 5):

    feats   [T, D]     | s0 | s0 | s2 | s2 | s2 |     samples contiguous and in batch order
    offsets [B + 1]    [0,       2,   2,           5]   sample b owns rows offsets[b]:offsets[b + 1]
    rope    (cos, sin) each [T, head_dim]: row t rotates token t's queries and keys
    max_length         3 = max_b (offsets[b + 1] - offsets[b]), or None when not known yet
    ```

    ``offsets`` is usable directly as ``cu_seqlens``. The stream is immutable: a block returns new
    streams, built with [`replace`][sparse3d.nn.tokens.TokenStream.replace], that share the offsets,
    the tables and ``max_length`` (the layout) and carry new ``feats``.

    Construction checks shapes, dtypes and devices only (no host sync). The offsets' values are checked by
    the first block that sees the stream with ``max_length=None``, with one host sync that also finds
    ``max_length``; the streams it returns carry it, so the following blocks trust the offsets and skip
    the sync. Passing ``max_length`` yourself skips that check (the offsets are then trusted).

    Attributes:
        feats: Tokens ``[T, D]``.
        offsets: int32 (or int64) offsets ``[B + 1]``, ``B >= 1``: ``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == T``, on the device of ``feats``.
        rope: ``(cos, sin)`` RoPE tables, each ``[T, head_dim]``, in token order.
        max_length: Tokens of the longest sample, or an upper bound of it (an upper bound above the true
            maximum forgoes the equal-length fast path of
            [`joint_attention`][sparse3d.functional.attention.joint_attention]); ``None``: not known.

    Examples:
        >>> from sparse3d.functional.rope import rope_frequencies
        >>> feats = torch.randn(5, 8)
        >>> rope = rope_frequencies(torch.zeros(5, 1), (4,))
        >>> stream = TokenStream.from_lengths(feats, [2, 0, 3], rope)
        >>> stream.offsets.tolist(), stream.max_length, stream.batch_size
        ([0, 2, 2, 5], 3, 3)
        >>> stream.replace(2 * feats).offsets is stream.offsets
        True
    """

    feats: torch.Tensor
    offsets: torch.Tensor
    rope: RopeTables
    max_length: int | None = None

    def __post_init__(self) -> None:
        feats, offsets, rope = self.feats, self.offsets, self.rope
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
            shape = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"feats: expected a tensor of tokens [T, D], got {shape}")
        _check_offsets("offsets", offsets, feats.device)
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            raise ValueError(
                f"rope: expected a pair (cos, sin) of tensors [T, head_dim], got {type(rope).__name__}"
            )
        for part, table in zip(("cos", "sin"), rope, strict=True):
            if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != feats.shape[0]:
                shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                raise ValueError(
                    f"rope: expected {part} of shape [{feats.shape[0]}, head_dim] (one row per token of "
                    f"feats), got {shape}"
                )
            if table.device != feats.device:
                raise ValueError(
                    f"rope: expected {part} on {feats.device} (that of feats), got {table.device}"
                )
        if rope[0].shape != rope[1].shape:
            raise ValueError(
                f"rope: expected cos and sin of the same shape, got {list(rope[0].shape)} and "
                f"{list(rope[1].shape)}"
            )
        if not isinstance(rope, tuple):
            object.__setattr__(self, "rope", (rope[0], rope[1]))
        if self.max_length is not None:
            if isinstance(self.max_length, bool):
                raise TypeError(f"max_length: expected None or an int >= 0, got {self.max_length!r}")
            try:
                max_length = operator.index(self.max_length)
            except TypeError:
                raise TypeError(
                    f"max_length: expected None or an int >= 0, got {self.max_length!r}"
                ) from None
            if max_length < 0:
                raise ValueError(f"max_length: expected None or an int >= 0, got {max_length}")
            object.__setattr__(self, "max_length", max_length)

    @classmethod
    def from_lengths(
        cls, feats: torch.Tensor, lengths: Sequence[int] | torch.Tensor, rope: RopeTables
    ) -> TokenStream:
        """Builds a stream from per-sample token counts.

        Args:
            feats: Tokens ``[T, D]``, samples contiguous and in order.
            lengths: Tokens per sample, ``B >= 1`` non-negative ints summing to ``T`` (a sequence, or an
                integer tensor ``[B]``, read on the host: one sync if it lives on a GPU).
            rope: ``(cos, sin)`` tables ``[T, head_dim]``.

        Returns:
            The stream, with int32 offsets ``[B + 1]`` and ``max_length = max(lengths)``.

        Raises:
            ValueError: ``lengths`` is empty, negative, or does not sum to ``T``.
        """
        values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(values) == 0 or any(isinstance(n, bool) or int(n) != n or n < 0 for n in values):
            raise ValueError(f"lengths: expected one or more non-negative ints, got {values}")
        if sum(values) != feats.shape[0]:
            raise ValueError(
                f"lengths: expected counts summing to the {feats.shape[0]} rows of feats, got {values} "
                f"(sum {sum(values)})"
            )
        offsets = [0]
        for n in values:
            offsets.append(offsets[-1] + int(n))
        offsets_tensor = torch.tensor(offsets, dtype=torch.int32, device=feats.device)  # [B + 1]
        return cls(feats, offsets_tensor, rope, max(int(n) for n in values))

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return self.offsets.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        """Number of tokens ``T`` of the whole batch."""
        return self.feats.shape[0]

    def replace(self, feats: torch.Tensor) -> TokenStream:
        """The same stream (offsets, RoPE tables, ``max_length``) with new tokens.

        Args:
            feats: New tokens ``[T, D']`` (same ``T``; the width may change).

        Returns:
            A new `TokenStream`.

        Raises:
            ValueError: ``feats`` is not ``[T, D']`` with this stream's ``T``.
        """
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != self.num_tokens:
            shape = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"feats: expected [{self.num_tokens}, D] (one row per token), got {shape}")
        return dataclasses.replace(self, feats=feats)

    def __repr__(self) -> str:
        return (
            f"TokenStream(feats={list(self.feats.shape)} {self.feats.dtype}, batch_size={self.batch_size}, "
            f"head_dim={self.rope[0].shape[1]}, max_length={self.max_length}, device={self.feats.device})"
        )
