"""One training engine for every stage of the recipe: [`fit`][recipes.flux3d.engine.fit] runs a
[`Stage`][recipes.flux3d.engine.Stage] under an [`OptimConfig`][recipes.flux3d.engine.OptimConfig].

A stage says *what* is trained (a model, a data stream, a batch -> loss function, an evaluation and an
export); the engine owns *how*: AdamW (fused on CUDA), linear warmup then cosine decay, gradient clipping,
bf16 autocast on CUDA, an EMA of the weights (used for evaluation and export), periodic atomic checkpoints
with every RNG state and the data stream's position, exact resume, a stop on a non-finite loss, and a run
folder written as a set:

```
out_dir/
  manifest.json          status (running / complete / interrupted / failed + reason), config, step, files, git
  log.csv                step, loss, lr, grad_norm, steps_per_s, data_wait, then the stage's logged values
  metrics.json           last logged values, evaluations by step, throughput (non-finite values as null)
  loss.png  curves.png   loss and every logged column against the step (needs matplotlib)
  checkpoints/last.pt    the last checkpoint (and step_XXXXXXXX.pt every keep_checkpoint_every steps)
  eval/XXXXXXXX/         whatever the stage's evaluate() writes at that step (pictures, ...)
  model/                 the stage's export of the EMA model, written only by a complete run
```

**Exact resume.** `fit(..., resume=True)` on a killed run folder restores the model, the EMA, the optimiser,
the scheduler, the step, the Python / NumPy / torch (CPU and CUDA) RNG states, the loss generator and the
loader's position from `checkpoints/last.pt`, drops the log rows written after it, and continues: on CPU the
resumed run logs the same losses and ends with bitwise the same weights as an uninterrupted run.

**The data protocol.** A stage's data stream is a [`ResumableLoader`][recipes.flux3d.engine.ResumableLoader]
over a map-style dataset whose `__getitem__` receives a key `(index, item_seed)`, not a bare index: `index`
is the dataset index, `item_seed` a 63-bit integer derived from (loader seed, epoch, position in the epoch).
Every random choice an item makes (views, crops, noise) must come from a generator seeded by `item_seed`,
e.g. `torch.Generator().manual_seed(item_seed)` or `numpy.random.default_rng(item_seed)`, never from a
global RNG: then an item is the same whichever worker builds it, and a resumed run sees the same batches.
The stage's `loss` gets a `torch.Generator` (on the training device) for the randomness of the step itself
(time steps, noise); the global RNGs (dropout) are checkpointed too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

__all__ = [
    "OptimConfig",
    "ConfigError",
    "Stage",
    "RunResult",
    "ResumableLoader",
    "EMA",
    "NonFiniteLossError",
    "RunFolderError",
    "RunInterrupted",
    "fit",
    "lr_factor",
    "derive_seed",
    "move_to_device",
    "write_json",
    "to_jsonable",
    "atomic_file",
    "add_optim_args",
    "optim_from_args",
    "run_or_exit",
    "enable_activation_checkpointing",
    "LOG_COLUMNS",
]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "data_wait")
"""The engine's columns of ``log.csv``; the stage's logged values follow them."""

RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoint_every", "log_every", "eval_every"})
"""`OptimConfig` fields a resumed run may change (they do not change the computation)."""

_MANIFEST_FORMAT = 1
_CHECKPOINT_FORMAT = 1

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A configuration value out of range; ``field`` names it (``lr``, ``batch_size``, ...)."""

    def __init__(self, field: str, expected: str, actual: object) -> None:
        super().__init__(f"{field}: expected {expected}, got {actual!r}")
        self.field = field
        self.detail = f"expected {expected}, got {actual!r}"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is not finite; the step was not applied.

    Attributes:
        step: The step that failed (1-based: the first step is 1).
        loss: Its loss.
        grad_norm: Its gradient norm before clipping.
    """

    def __init__(self, message: str, *, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.grad_norm = grad_norm


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it holds another run, a different config, ...)."""


class RunInterrupted(RuntimeError):
    """The run stopped on SIGTERM after writing a checkpoint; resume it with ``resume=True``."""


# ---------------------------------------------------------------------------------------------- helpers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (ints, strings): the same parts give the same seed everywhere.

    Args:
        *parts: e.g. ``(seed, "item", epoch, position)``; their ``repr`` is hashed (BLAKE2b).

    Returns:
        An integer in ``[0, 2**63)``, valid for ``torch.Generator.manual_seed`` and NumPy.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def move_to_device(batch: T, device: torch.device | str, *, non_blocking: bool = True) -> T:
    """Moves a batch to ``device``: tensors, objects with a ``.to(device, non_blocking=...)`` method (e.g.
    `SparseTensor`), and dicts, lists, tuples, named tuples and dataclasses of them; other leaves (numbers,
    strings, ``None``) are returned as they are.

    Args:
        batch: Any nested structure.
        device: Target device.
        non_blocking: Passed to every ``.to`` (asynchronous copies from pinned memory).

    Returns:
        The same structure on ``device`` (new containers; the input is not modified).
    """
    if isinstance(batch, torch.Tensor) or (
        not isinstance(batch, type) and callable(getattr(batch, "to", None))
    ):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)(
            (key, move_to_device(value, device, non_blocking=non_blocking)) for key, value in batch.items()
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(move_to_device(value, device, non_blocking=non_blocking) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, non_blocking=non_blocking) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            field.name: move_to_device(getattr(batch, field.name), device, non_blocking=non_blocking)
            for field in dataclasses.fields(batch)
            if field.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


def to_jsonable(value: Any) -> Any:
    """Converts ``value`` to plain JSON types: non-finite floats become ``None`` (JSON ``null``), tuples
    lists, paths strings, dataclasses dicts, NumPy scalars and one-element tensors numbers.

    Raises:
        TypeError: A value (or dict key) JSON cannot hold, naming its type.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"write_json: cannot store a tensor of shape {tuple(value.shape)}; convert it first"
            )
        return to_jsonable(value.item())
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)):
                raise TypeError(
                    f"write_json: dict keys must be str, int, float or bool, got {type(key).__name__}"
                )
            result[str(key)] = to_jsonable(item)
        return result
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    raise TypeError(f"write_json: cannot store a {type(value).__name__} as JSON: {value!r}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success the file written there is synced and renamed
    over ``path`` (``os.replace``), so readers see the old file or the whole new one, never a part. On an
    exception the temporary file is removed and ``path`` is untouched.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_file(folder / "a.txt") as temporary:
        ...     _ = temporary.write_text("done")
        >>> (folder / "a.txt").read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically ([`atomic_file`][recipes.flux3d.engine.atomic_file]);
    non-finite floats are written as ``null`` ([`to_jsonable`][recipes.flux3d.engine.to_jsonable]), so the
    file is always valid JSON. Every JSON file of the recipe is written with it."""
    text = json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """How a stage is trained; every field can be set from the command line
    ([`add_optim_args`][recipes.flux3d.engine.add_optim_args]).

    Attributes:
        steps: Optimiser steps of the run (>= 1).
        lr: Peak AdamW learning rate, reached after the warmup (> 0).
        batch_size: Samples per step, passed to the stage's ``loader`` (>= 1).
        weight_decay: AdamW (decoupled) weight decay, applied to every trainable parameter.
        betas: AdamW betas, each in [0, 1).
        warmup_steps: Steps of linear warmup: step ``s < warmup_steps`` uses ``lr * (s + 1) / warmup_steps``.
        min_lr_ratio: After the warmup the rate follows a cosine from ``lr`` down to ``lr * min_lr_ratio``
            at step ``steps`` ([`lr_factor`][recipes.flux3d.engine.lr_factor]).
        grad_clip: Maximum global gradient norm (``None``: no clipping; the norm is logged either way).
        ema_decay: Decay of the EMA of the weights used for evaluation and export, in [0, 1) (``None``: the
            raw weights); see [`EMA`][recipes.flux3d.engine.EMA] for its warmup.
        bf16: bf16 autocast of the stage's ``loss`` on CUDA (ignored on CPU, which trains in float32).
        checkpoint_every: Steps between checkpoints (``checkpoints/last.pt``); the last step always
            writes one.
        keep_checkpoint_every: Also keep ``checkpoints/step_XXXXXXXX.pt`` every this many steps (a multiple of
            ``checkpoint_every``; ``None``: only the last).
        log_every: Steps between rows of ``log.csv`` (each row holds the means over its steps).
        eval_every: Steps between evaluations (``None``: only at the end; the end is always evaluated).
        seed: Seed of the initialisation, the data order, the items and the loss generator.
    """

    steps: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    bf16: bool = True
    checkpoint_every: int = 500
    keep_checkpoint_every: int | None = None
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(name, f"an integer >= {minimum}" + (" or None" if optional else ""), value)

        def real(
            name: str, low: float, high: float, *, open_low: bool, open_high: bool, optional=False
        ) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            expected = f"a number in {bounds}" + (" or None" if optional else "")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(name, expected, value)
            if (value <= low if open_low else value < low) or (value >= high if open_high else value > high):
                raise ConfigError(name, expected, value)

        integer("steps", 1)
        integer("batch_size", 1)
        real("lr", 0.0, math.inf, open_low=True, open_high=True)
        real("weight_decay", 0.0, math.inf, open_low=False, open_high=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ConfigError("betas", "two numbers in [0, 1)", self.betas)
        for beta in self.betas:
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
                raise ConfigError("betas", "two numbers in [0, 1)", self.betas)
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        integer("warmup_steps", 0)
        if self.warmup_steps > self.steps:
            raise ConfigError("warmup_steps", f"at most steps ({self.steps})", self.warmup_steps)
        real("min_lr_ratio", 0.0, 1.0, open_low=False, open_high=False)
        real("grad_clip", 0.0, math.inf, open_low=True, open_high=True, optional=True)
        real("ema_decay", 0.0, 1.0, open_low=False, open_high=True, optional=True)
        if not isinstance(self.bf16, bool):
            raise ConfigError("bf16", "True or False", self.bf16)
        integer("checkpoint_every", 1)
        integer("keep_checkpoint_every", 1, optional=True)
        if self.keep_checkpoint_every is not None and self.keep_checkpoint_every % self.checkpoint_every:
            raise ConfigError(
                "keep_checkpoint_every",
                f"a multiple of checkpoint_every ({self.checkpoint_every})",
                self.keep_checkpoint_every,
            )
        integer("log_every", 1)
        integer("eval_every", 1, optional=True)
        integer("seed", 0)


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Learning-rate multiplier of the update after ``step`` updates (0-based).

    ``(step + 1) / warmup_steps`` during the warmup, then
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (steps - warmup_steps)``: 1 right after the warmup, ``min_lr_ratio``
    at ``step = steps``.

    Args:
        step: Updates done before this one.
        optim: The schedule's configuration.

    Returns:
        The factor multiplying ``optim.lr``.
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min((step - optim.warmup_steps) / max(optim.steps - optim.warmup_steps, 1), 1.0)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_OPTIM_HELP = {
    "steps": "Optimiser steps of the run.",
    "lr": "Peak AdamW learning rate, reached after the warmup.",
    "batch_size": "Samples per step.",
    "weight_decay": "AdamW weight decay.",
    "betas": "AdamW betas (two numbers).",
    "warmup_steps": "Steps of linear learning-rate warmup.",
    "min_lr_ratio": "The cosine decay after the warmup ends at the learning rate times this ratio.",
    "grad_clip": "Clip the global gradient norm to this value ('none': no clipping).",
    "ema_decay": "Decay of the weights' EMA used for evaluation and export ('none': the raw weights).",
    "bf16": "bf16 autocast on CUDA (CPU always trains in float32).",
    "checkpoint_every": "Steps between checkpoints (the last step always writes one).",
    "keep_checkpoint_every": "Also keep the checkpoint of every N-th step ('none': only the last one).",
    "log_every": "Steps between rows of log.csv (each row averages its steps).",
    "eval_every": "Steps between evaluations ('none': only at the end).",
    "seed": "Seed of the initialisation, the data order and all training randomness.",
}


def _optional(kind: Callable[[str], T]) -> Callable[[str], T | None]:
    def parse(text: str) -> T | None:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_optim_args(parser: argparse.ArgumentParser, defaults: OptimConfig) -> argparse._ArgumentGroup:
    """Adds one flag per [`OptimConfig`][recipes.flux3d.engine.OptimConfig] field (``--steps``, ``--lr``,
    ``--batch-size``, ..., ``--bf16/--no-bf16``) with ``defaults`` (a stage's preset) shown in ``--help``.

    Args:
        parser: The stage script's parser.
        defaults: The values used when a flag is not given.

    Returns:
        The argument group ("training") holding the flags.
    """
    group = parser.add_argument_group("training", "How the stage is trained (the engine's OptimConfig).")
    for field in dataclasses.fields(OptimConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        shown = (
            "none" if default is None else " ".join(map(str, default)) if field.name == "betas" else default
        )
        help_text = f"{_OPTIM_HELP[field.name]} Default: {shown}."
        if field.name == "bf16":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif field.name == "betas":
            group.add_argument(
                flag, type=float, nargs=2, metavar=("BETA1", "BETA2"), default=default, help=help_text
            )
        else:
            kind = float if field.type.startswith("float") else int  # the annotations are strings here
            parse = _optional(kind) if field.type.endswith("| None") else kind
            group.add_argument(flag, type=parse, default=default, help=help_text)
    return group


def optim_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> OptimConfig:
    """The [`OptimConfig`][recipes.flux3d.engine.OptimConfig] of parsed flags added by
    [`add_optim_args`][recipes.flux3d.engine.add_optim_args].

    Args:
        args: The parsed namespace.
        parser: When given, a bad value exits through ``parser.error`` (usage and exit code 2).

    Raises:
        ValueError: A bad value, named by its flag as typed (``--lr: expected ...``), when no parser is given.
    """
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(OptimConfig)}
    values["betas"] = tuple(values["betas"])
    try:
        return OptimConfig(**values)
    except ConfigError as error:
        message = f"--{error.field.replace('_', '-')}: {error.detail}"
        if parser is not None:
            parser.error(message)
        raise ValueError(message) from None


# ----------------------------------------------------------------------------------------------- loader


class _BatchKeys:
    """Infinite batch sampler of a `ResumableLoader`: lists of ``(index, item_seed)`` from a position on."""

    def __init__(self, loader: ResumableLoader, epoch: int, batch: int) -> None:
        self.loader, self.epoch, self.batch = loader, epoch, batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.epoch, self.batch
        while True:
            yield self.loader.batch_keys(epoch, batch)
            batch += 1
            if batch == self.loader.batches_per_epoch:
                epoch, batch = epoch + 1, 0


class ResumableLoader:
    """An endless, seeded, resumable stream of batches over a map-style dataset (a
    ``torch.utils.data.DataLoader`` underneath, with workers, pinned memory and prefetching).

    Epoch ``e`` visits ``indices`` in a permutation seeded by ``(seed, e)``, ``batch_size`` at a time; the
    item at position ``p`` of the epoch is fetched as ``dataset[(index, item_seed)]`` with
    ``item_seed = derive_seed(seed, "item", e, p)`` (see the module docstring for the protocol). The
    position (epoch, batch within the epoch) advances by one for each batch handed out, is saved by
    ``state_dict`` and restored by ``load_state_dict``, so a resumed stream continues with exactly the
    batches an uninterrupted one would have given. Batches prefetched by workers but not handed out are
    not counted.

    Args:
        dataset: Map-style dataset indexed by ``(index, item_seed)`` keys.
        indices: Dataset indices to draw from (e.g. the training split), at least ``batch_size`` with
            ``drop_last``.
        batch_size: Items per batch (>= 1).
        seed: Seed of the epoch permutations and item seeds.
        collate_fn: Turns a list of items into a batch (default: ``torch``'s ``default_collate``).
        num_workers: Worker processes (0: load in the main process).
        pin_memory: Pin batches in page-locked memory (for asynchronous copies to CUDA).
        prefetch_factor: Batches loaded in advance per worker (``None``: ``torch``'s default; only with
            workers).
        drop_last: Drop each epoch's last incomplete batch (``False``: hand it out smaller).

    Example:
        >>> class Squares(torch.utils.data.Dataset):
        ...     def __len__(self):
        ...         return 4
        ...
        ...     def __getitem__(self, key):
        ...         index, item_seed = key  # draw any randomness from item_seed
        ...         return index * index
        >>> data = ResumableLoader(Squares(), range(4), 2, seed=0, collate_fn=list)
        >>> stream = iter(data)
        >>> sorted(next(stream) + next(stream))  # one epoch: every index once
        [0, 1, 4, 9]
        >>> data.state_dict()["epoch"], data.state_dict()["batch"]
        (1, 0)
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        indices: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
        if prefetch_factor is not None and (num_workers == 0 or prefetch_factor < 1):
            raise ValueError(
                f"prefetch_factor: expected None without workers or an integer >= 1 with them, got "
                f"{prefetch_factor!r} with num_workers={num_workers}"
            )
        indices = [int(index) for index in indices]
        if not indices:
            raise ValueError("indices: expected at least one dataset index, got none")
        size = len(dataset) if hasattr(dataset, "__len__") else None
        bad = [index for index in indices if index < 0 or (size is not None and index >= size)]
        if bad:
            raise ValueError(f"indices: expected dataset indices in [0, {size}), got {bad[:5]}")
        if drop_last and len(indices) < batch_size:
            raise ValueError(
                f"batch_size: expected at most the number of indices ({len(indices)}) with drop_last, got "
                f"{batch_size}"
            )
        self.dataset = dataset
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.epoch = 0
        self.batch = 0
        self._digest = hashlib.blake2b(repr(indices).encode(), digest_size=8).hexdigest()
        self._permutation: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch."""
        if self.drop_last:
            return len(self.indices) // self.batch_size
        return -(-len(self.indices) // self.batch_size)

    def permutation(self, epoch: int) -> list[int]:
        """The dataset indices in the order epoch ``epoch`` visits them."""
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            order = torch.randperm(len(self.indices), generator=generator).tolist()
            self._permutation = (epoch, [self.indices[position] for position in order])
        return self._permutation[1]

    def batch_keys(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        """The ``(index, item_seed)`` keys of batch ``batch`` of epoch ``epoch``."""
        order = self.permutation(epoch)
        start = batch * self.batch_size
        return [
            (order[position], derive_seed(self.seed, "item", epoch, position))
            for position in range(start, min(start + self.batch_size, len(order)))
        ]

    def __iter__(self) -> Iterator[Any]:
        """Batches from the current position on, forever; each one handed out advances the position."""
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_BatchKeys(self, self.epoch, self.batch),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            # a private generator: creating the iterator must not draw from the global torch RNG
            generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "workers", self.epoch, self.batch)
            ),
        )
        iterator = iter(loader)
        try:
            while True:
                batch = next(iterator)
                self.batch += 1
                if self.batch == self.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                yield batch
        finally:
            del iterator  # shuts the workers down

    def state_dict(self) -> dict[str, Any]:
        """The position (``epoch``, ``batch``) and what it refers to (seed, batch size, indices)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_indices": len(self.indices),
            "indices_digest": self._digest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by ``state_dict``; takes effect on the next ``iter()``.

        Raises:
            ValueError: The state belongs to a stream with another seed, batch size or index list.
        """
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_indices", "indices_digest"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state: saved with {key}={state[key]!r}, this loader has {key}={mine[key]!r} "
                    f"(the data or its split changed since the checkpoint)"
                )
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(
                f"loader state: position out of range: epoch {state['epoch']}, batch {state['batch']}"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# -------------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights (parameters and floating-point buffers).

    After ``n`` updates, ``update`` uses the decay ``d = min(decay, (1 + n) / (10 + n))`` (the warmup
    diffusers' ``EMAModel`` uses, so short runs are not dominated by the initial weights) and sets
    ``ema = d * ema + (1 - d) * weights``; integer buffers are copied.

    Args:
        model: The trained model; the EMA holds a deep copy in eval mode without gradients.
        decay: The decay after the warmup, in [0, 1).

    Attributes:
        model: The averaged copy (evaluate and export it).
        updates: Updates applied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay used by the update after ``updates`` updates."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards ``model``'s current weights."""
        weight = 1.0 - self.decay_at(self.updates)
        current = model.state_dict()
        averaged, targets = [], []
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                averaged.append(value)
                targets.append(current[name].detach())
            else:
                value.copy_(current[name])
        if averaged:
            torch._foreach_lerp_(averaged, targets, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict``'s output."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------------- activation checkpointing


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(block).forward
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


def enable_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Makes each block recompute its activations in the backward pass instead of storing them
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved): less memory, one more forward.

    Only in training mode with gradients enabled; evaluation runs the plain forward. Parameter names,
    ``state_dict`` and results are unchanged (gradients equal the plain ones), and ``copy.deepcopy`` of the
    model (e.g. by [`EMA`][recipes.flux3d.engine.EMA]) keeps working. Calling it twice is harmless.

    Args:
        blocks: The modules to wrap, e.g. a transformer's ``blocks`` (a ``ModuleList``); their ``forward``
            may take any arguments (``SparseTensor`` included).
    """
    for block in blocks:
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks: expected nn.Module items, got {type(block).__name__}")
        # the partial holds the block itself, so a deep copy of the model wraps the copied block
        block.forward = functools.partial(_checkpointed_forward, block)


# ------------------------------------------------------------------------------------------ stage, result


class Stage(Protocol):
    """What a stage of the recipe provides to [`fit`][recipes.flux3d.engine.fit] (one small class per
    stage: decoder, SMDiT, VAE, ...).

    Attributes:
        name: Short name (the progress bar's label, the manifest's ``stage``).
    """

    name: str

    def config(self) -> dict[str, Any]:
        """The stage's own settings as a JSON-able dict (model size, data options, loss weights): stored in
        the manifest, and a resumed run must have the same."""
        ...

    def build_model(self) -> nn.Module:
        """A freshly initialised model (on CPU; the engine moves it to the device). Called after the
        global RNGs are seeded, so its initialisation is reproducible."""
        ...

    def loader(self, *, seed: int, batch_size: int) -> ResumableLoader:
        """The training data stream: a [`ResumableLoader`][recipes.flux3d.engine.ResumableLoader] with this
        seed and batch size over ``(index, item_seed)``-keyed items."""
        ...

    def loss(
        self, model: nn.Module, batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """One step's loss (a scalar tensor to minimise) and values to log (the same keys every step;
        one-element tensors are fine: the engine reads them with the loss, in one device sync). The batch
        is already on the device; ``generator`` (on the device) is for the step's randomness."""
        ...

    def evaluate(self, model: nn.Module, step: int, out_dir: Path) -> Mapping[str, float]:
        """Metrics of ``model`` (the EMA model when there is one, in eval mode, under ``torch.no_grad``)
        at ``step``; may write files into ``out_dir`` (``eval/XXXXXXXX``). The RNG states are restored
        afterwards, so evaluating never changes the training."""
        ...

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Writes the final artefact of ``model`` (the EMA model when there is one) into ``out_dir``, e.g.
        weights and a ``config.json``; the engine moves the folder to ``model/`` when it is complete."""
        ...


@dataclass(frozen=True)
class RunResult:
    """What [`fit`][recipes.flux3d.engine.fit] returns.

    Attributes:
        out_dir: The run folder.
        status: ``complete`` (also for a run found complete on resume).
        step: Steps trained.
        metrics: The content of ``metrics.json``.
        model_dir: The exported model folder (``out_dir/model``).
        checkpoint: The last checkpoint.
    """

    out_dir: Path
    status: str
    step: int
    metrics: dict[str, Any]
    model_dir: Path | None
    checkpoint: Path | None


# -------------------------------------------------------------------------------------------- run folder


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_state() -> dict[str, Any]:
    """Commit and dirtiness of the repository holding this file (``None`` when git is not available)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunFolderError(
            f"{path}: unreadable manifest ({error}); move the folder away or delete it"
        ) from None
    if not isinstance(manifest, dict) or "status" not in manifest or "config" not in manifest:
        raise RunFolderError(f"{path}: not a manifest written by the engine")
    return manifest


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name: saved -> now"`` for every setting that differs, except the resumable ones."""
    old, new = _flatten(saved), _flatten(current)
    free = {f"optim.{name}" for name in RESUMABLE_CHANGES}
    return [
        f"{key}: {old.get(key, '(absent)')!r} in the run folder, {new.get(key, '(absent)')!r} now"
        for key in sorted(old.keys() | new.keys())
        if key not in free and old.get(key, "(absent)") != new.get(key, "(absent)")
    ]


def _open_run_folder(
    out_dir: Path, config: dict[str, Any], resume: bool, overwrite: bool
) -> tuple[str, dict | None]:
    """Decides what to do with ``out_dir``: ``fresh``, ``resume`` or ``complete`` (and the old manifest)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"out_dir: expected a folder, got the file {out_dir}")
    manifest = _read_manifest(out_dir) if out_dir.is_dir() else None
    if manifest is not None and manifest["status"] == "running":
        pid, host = manifest.get("pid"), manifest.get("host")
        if (
            host == socket.gethostname()
            and isinstance(pid, int)
            and pid != os.getpid()
            and _process_alive(pid)
        ):
            raise RunFolderError(f"{out_dir} is being written by the running process {pid}; stop it first")
    has_files = out_dir.is_dir() and any(out_dir.iterdir())
    if manifest is None:
        if has_files:
            raise RunFolderError(
                f"{out_dir} is not empty and holds no run (no manifest.json); choose another folder"
            )
        return "fresh", None
    where = (
        f"{out_dir} holds a {manifest['status']} run (step {manifest.get('step')} of {manifest.get('steps')})"
    )
    if not resume:
        if not overwrite:
            raise RunFolderError(f"{where}: pass --resume to continue it or --overwrite to start it again")
        shutil.rmtree(out_dir)
        return "fresh", None
    differences = _config_differences(manifest["config"], config)
    if differences:
        raise RunFolderError(
            f"{where} with a different config; cannot resume it with: " + "; ".join(differences)
        )
    if manifest["status"] == "complete":
        return "complete", manifest
    if not (out_dir / "checkpoints" / "last.pt").is_file():
        print(f"{out_dir}: no checkpoint yet, starting from step 0", flush=True)
        shutil.rmtree(out_dir)
        return "fresh", None
    return "resume", manifest


def _read_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        # a line cut by a kill has missing (None) values: dropped
        rows = [row for row in reader if None not in row.values() and None not in row]
        return list(reader.fieldnames or []), rows


def _plot_log(columns: list[str], rows: list[dict[str, str]], out_dir: Path) -> list[str]:
    """Writes ``loss.png`` and ``curves.png`` when matplotlib is installed; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed, so loss.png and curves.png were not drawn "
            "(pip install 'sparse3d[recipe]'); log.csv has the numbers",
            flush=True,
        )
        return []
    if not rows:
        return []
    steps = [int(row["step"]) for row in rows]

    def series(name: str) -> list[float]:
        return [float(row[name]) if row[name] not in ("", "nan") else math.nan for row in rows]

    written = []

    def save(figure: Any, name: str, dpi: int) -> None:
        figure.tight_layout()
        with atomic_file(out_dir / name) as temporary:
            figure.savefig(temporary, dpi=dpi, format="png")
        plt.close(figure)
        written.append(name)

    figure, axes = plt.subplots(figsize=(6, 3.5))
    loss = series("loss")
    axes.plot(steps, loss, linewidth=0.9)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean over the logged steps)")
    if all(value > 0 for value in loss if math.isfinite(value)):
        axes.set_yscale("log")
    save(figure, "loss.png", 120)

    names = [name for name in columns if name != "step"]
    width = min(3, len(names))
    height = -(-len(names) // width)
    figure, grid = plt.subplots(height, width, figsize=(4 * width, 2.6 * height), squeeze=False)
    for axes, name in zip(grid.flat, names, strict=False):
        axes.plot(steps, series(name), linewidth=0.9)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
    for axes in list(grid.flat)[len(names) :]:
        axes.axis("off")
    save(figure, "curves.png", 100)
    return written


# ---------------------------------------------------------------------------------------------- RNG state


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global RNG is what we save)
    state = {
        "python": random.getstate(),
        "numpy": {
            **numpy_state,
            "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()},
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "loss_generator": generator.get_state(),
    }
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in state["python"]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        **numpy_state["state"],
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
    }
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    generator.set_state(state["loss_generator"])


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Restores the global Python, NumPy and torch RNGs on exit (evaluation must not move them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = (
        [torch.cuda.current_device() if device.index is None else device.index]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (for stages that use the global RNG)
    torch.manual_seed(seed)  # CUDA too


# --------------------------------------------------------------------------------------------------- fit


class _Interval:
    """Sums of the steps since the last log row (checkpointed, so resumed rows are the same)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}  # loss, grad_norm and the stage's values
        self.lr = math.nan
        self.step_seconds = 0.0
        self.wait_seconds = 0.0

    def add(self, values: Mapping[str, float], lr: float, step_seconds: float, wait_seconds: float) -> None:
        self.count += 1
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.lr = lr
        self.step_seconds += step_seconds
        self.wait_seconds += wait_seconds

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vars(self).update(state)


class _Run:
    """One call of `fit` that trains (fresh or resumed)."""

    def __init__(
        self,
        stage: Stage,
        optim: OptimConfig,
        out_dir: Path,
        device: torch.device,
        config: dict,
        progress: bool,
    ) -> None:
        self.stage, self.optim, self.out_dir, self.device = stage, optim, out_dir, device
        self.config, self.progress = config, progress
        self.checkpoint_dir = out_dir / "checkpoints"
        self.step = 0
        self.checkpoint_step: int | None = None
        self.columns: list[str] = []
        self.last_row: dict[str, float] = {}
        self.eval_history: dict[str, dict[str, float]] = {}
        self.totals = {"steps": 0, "step_seconds": 0.0, "wait_seconds": 0.0}
        self.interval = _Interval()
        self.started_at = _now()
        self.git = _git_state()
        self.sigterm = False

    # -- setup

    def build(self) -> None:
        optim, device = self.optim, self.device
        _seed_everything(optim.seed)
        model = self.stage.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self.stage.name}.build_model: expected an nn.Module, got {type(model).__name__}"
            )
        self.model = model.to(device).train()
        self.parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        if not self.parameters:
            raise ValueError(f"{self.stage.name}.build_model: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=optim.lr,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, optim=optim)
        )
        self.ema = EMA(self.model, optim.ema_decay) if optim.ema_decay is not None else None
        self.generator = torch.Generator(device).manual_seed(derive_seed(optim.seed, "loss"))
        self.loader = self.stage.loader(seed=optim.seed, batch_size=optim.batch_size)
        if getattr(self.loader, "batch_size", optim.batch_size) != optim.batch_size:
            raise ValueError(
                f"{self.stage.name}.loader: expected batch_size {optim.batch_size}, got "
                f"{self.loader.batch_size}"
            )

    def restore(self) -> None:
        path = self.checkpoint_dir / "last.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise RunFolderError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = self.checkpoint_step = int(state["step"])
        self.interval.load_state_dict(state["interval"])
        self.eval_history = dict(state["eval_history"])
        self.totals = dict(state["totals"])
        self.columns = list(state["columns"])
        self.last_row = dict(state["last_row"])
        # the log rows after the checkpoint are written again by this run
        columns, rows = _read_log(self.out_dir / "log.csv")
        self._write_log([row for row in rows if int(row["step"]) <= self.step], columns or self.columns)
        _set_rng_state(state["rng"], self.generator)  # last: nothing after it may draw
        print(f"{self.out_dir}: resuming at step {self.step} of {self.optim.steps}", flush=True)

    # -- files

    def _write_log(self, rows: list[dict[str, str]], columns: list[str]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_file(self.out_dir / "log.csv") as temporary:
            temporary.write_text(buffer.getvalue(), encoding="utf-8")

    def _append_log(self, row: Mapping[str, float]) -> None:
        path = self.out_dir / "log.csv"
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(
                {name: repr(float(value)) if name != "step" else value for name, value in row.items()}
            )

    def metrics(self, status: str, reason: str | None) -> dict[str, Any]:
        seconds = self.totals["step_seconds"]
        return {
            "stage": self.stage.name,
            "status": status,
            "reason": reason,
            "step": self.step,
            "steps": self.optim.steps,
            "last_log": self.last_row,
            "eval": self.eval_history,
            "final_eval": self.eval_history.get(str(self.step)) if status == "complete" else None,
            "throughput": {
                "steps_per_s": self.totals["steps"] / seconds if seconds > 0 else None,
                "data_wait_share": self.totals["wait_seconds"] / seconds if seconds > 0 else None,
                "train_seconds": seconds,
            },
        }

    def write_manifest(self, status: str, reason: str | None = None) -> None:
        files = sorted(
            str(path.relative_to(self.out_dir))
            for path in self.out_dir.rglob("*")
            if path.is_file() and not path.name.startswith(".") and path.name != "manifest.json"
        )
        write_json(
            self.out_dir / "manifest.json",
            {
                "format": _MANIFEST_FORMAT,
                "status": status,
                "reason": reason,
                "stage": self.stage.name,
                "step": self.step,
                "steps": self.optim.steps,
                "checkpoint_step": self.checkpoint_step,
                "config": self.config,
                "files": files,
                "git": self.git,
                "device": str(self.device),
                "torch": torch.__version__,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": self.started_at,
                "updated_at": _now(),
            },
        )

    def save_checkpoint(self) -> None:
        state = {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": _rng_state(self.generator, self.device),
            "interval": self.interval.state_dict(),
            "eval_history": self.eval_history,
            "totals": self.totals,
            "columns": self.columns,
            "last_row": self.last_row,
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        keep = self.optim.keep_checkpoint_every
        with atomic_file(self.checkpoint_dir / "last.pt") as temporary:
            torch.save(state, temporary)
            if keep is not None and self.step % keep == 0:
                with atomic_file(self.checkpoint_dir / f"step_{self.step:08d}.pt") as kept:
                    try:
                        os.link(temporary, kept)
                    except OSError:
                        shutil.copyfile(temporary, kept)
        self.checkpoint_step = self.step
        write_json(self.out_dir / "metrics.json", self.metrics("running", None))
        self.write_manifest("running")

    # -- training

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def evaluate(self) -> None:
        folder = self.out_dir / "eval" / f"{self.step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        model = self.eval_model
        model.eval()
        try:
            with _preserved_rng(self.device), torch.no_grad():
                metrics = self.stage.evaluate(model, self.step, folder)
        finally:
            self.model.train()
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"{self.stage.name}.evaluate: expected a dict of metrics, got {type(metrics).__name__}"
            )
        self.eval_history[str(self.step)] = {str(name): float(value) for name, value in metrics.items()}
        if not any(folder.iterdir()):
            folder.rmdir()

    def train_step(self, batch: Any) -> tuple[float, float, float, dict[str, float]]:
        """One update; returns (loss, grad norm, lr, stage values) or raises NonFiniteLossError unapplied."""
        lr = self.scheduler.get_last_lr()[0]
        autocast = self.optim.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, logged = self.stage.loss(self.model, batch, self.generator)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{self.stage.name}.loss: expected a one-element loss tensor, got {loss!r}")
        if not isinstance(logged, Mapping):
            raise TypeError(
                f"{self.stage.name}.loss: expected (loss, dict of logged values), got {type(logged)}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.optim.grad_clip if self.optim.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        names = list(logged)
        tensors = [loss.detach().float().reshape(()), grad_norm.detach().float().reshape(()).to(loss.device)]
        tensors += [
            value.detach().float().reshape(()).to(loss.device)
            for value in logged.values()
            if isinstance(value, torch.Tensor)
        ]
        read = iter(torch.stack(tensors).tolist())  # one device sync per step
        loss_value, norm_value = next(read), next(read)
        values = {
            name: next(read) if isinstance(logged[name], torch.Tensor) else float(logged[name])
            for name in names
        }
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            if self.checkpoint_step is None:
                where = "no checkpoint had been written yet"
            else:
                last = self.checkpoint_dir / "last.pt"
                where = f"the last good checkpoint is {last} (step {self.checkpoint_step})"
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}: loss {loss_value}, gradient norm {norm_value}; "
                f"the step was not applied and nothing was exported; {where}",
                step=self.step + 1,
                loss=loss_value,
                grad_norm=norm_value,
            )
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss_value, norm_value, lr, values

    def log_row(self) -> None:
        interval = self.interval
        row = {"step": self.step}
        for name, total in interval.sums.items():
            row[name] = total / interval.count
        row["lr"] = interval.lr
        row["steps_per_s"] = interval.count / interval.step_seconds if interval.step_seconds > 0 else math.nan
        row["data_wait"] = (
            interval.wait_seconds / interval.step_seconds if interval.step_seconds > 0 else math.nan
        )
        row = {name: row[name] for name in self.columns}
        self._append_log(row)
        self.last_row = {name: value if name == "step" else float(value) for name, value in row.items()}
        self.interval = _Interval()

    def loop(self, bar: tqdm) -> None:
        optim = self.optim
        stream = iter(self.loader)
        try:
            while self.step < optim.steps:
                started = time.perf_counter()
                batch = move_to_device(next(stream), self.device)
                waited = time.perf_counter() - started
                loss, grad_norm, lr, values = self.train_step(batch)
                self.step += 1
                reserved = set(LOG_COLUMNS) & set(values)
                if reserved:
                    raise ValueError(
                        f"{self.stage.name}.loss: logged names {sorted(reserved)} are the engine's"
                    )
                if not self.columns:
                    self.columns = [*LOG_COLUMNS, *values]
                elif list(values) != self.columns[len(LOG_COLUMNS) :]:
                    raise ValueError(
                        f"{self.stage.name}.loss: logged {list(values)} at step {self.step}, expected the "
                        f"same names every step: {self.columns[len(LOG_COLUMNS) :]}"
                    )
                seconds = time.perf_counter() - started
                self.interval.add({"loss": loss, "grad_norm": grad_norm, **values}, lr, seconds, waited)
                self.totals["steps"] += 1
                self.totals["step_seconds"] += seconds
                self.totals["wait_seconds"] += waited
                bar.update(1)
                if self.step % optim.log_every == 0 or self.step == optim.steps:
                    self.log_row()
                    bar.set_postfix(
                        loss=f"{self.last_row['loss']:.4g}",
                        data_wait=f"{self.last_row['data_wait']:.0%}",
                        refresh=False,
                    )
                if self.step == optim.steps or (optim.eval_every and self.step % optim.eval_every == 0):
                    self.evaluate()
                if self.step % optim.checkpoint_every == 0 or self.step == optim.steps:
                    self.save_checkpoint()
                if self.sigterm and self.step < optim.steps:
                    if self.checkpoint_step != self.step:
                        self.save_checkpoint()
                    raise RunInterrupted(
                        f"stopped by SIGTERM at step {self.step} of {optim.steps}; the checkpoint is saved: "
                        f"resume with --resume"
                    )
        finally:
            stream.close()

    def export(self) -> Path:
        model = self.eval_model
        bad = [
            name
            for name, value in model.state_dict().items()
            if value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if bad:  # finite losses and gradients can still overflow the weights
            raise NonFiniteLossError(
                f"non-finite weights after step {self.step} ({', '.join(bad[:3])}): not exported",
                step=self.step,
                loss=self.last_row.get("loss", math.nan),
                grad_norm=self.last_row.get("grad_norm", math.nan),
            )
        target, temporary, old = (
            self.out_dir / "model",
            self.out_dir / ".model.tmp",
            self.out_dir / ".model.old",
        )
        for folder in (temporary, old):
            shutil.rmtree(folder, ignore_errors=True)
        temporary.mkdir()
        model.eval()
        with torch.no_grad():
            self.stage.export(model, temporary)
        if target.exists():
            os.replace(target, old)
        os.replace(temporary, target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    def finish(self, status: str, reason: str | None) -> dict[str, Any]:
        columns, rows = _read_log(self.out_dir / "log.csv")
        _plot_log(columns, rows, self.out_dir)
        metrics = self.metrics(status, reason)
        write_json(self.out_dir / "metrics.json", metrics)
        self.write_manifest(status, reason)
        return metrics

    def run(self, resume: bool) -> RunResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.build()
        if resume:
            self.restore()
        self.write_manifest("running")
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(
            total=self.optim.steps,
            initial=self.step,
            desc=self.stage.name,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            self.loop(bar)
            model_dir = self.export()
        except NonFiniteLossError as error:
            self._finish_quietly("failed", str(error))
            raise
        except (KeyboardInterrupt, RunInterrupted) as error:
            self._finish_quietly(
                "interrupted", f"{type(error).__name__} at step {self.step}: {error}".rstrip(": ")
            )
            raise
        except BaseException as error:
            self._finish_quietly("failed", f"{type(error).__name__} at step {self.step}: {error}")
            raise
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        metrics = self.finish("complete", None)
        return RunResult(
            self.out_dir, "complete", self.step, metrics, model_dir, self.checkpoint_dir / "last.pt"
        )

    def _finish_quietly(self, status: str, reason: str) -> None:
        try:
            self.finish(status, reason)
        except Exception as error:  # the original error matters more
            print(f"warning: could not record the {status} run in {self.out_dir}: {error}", file=sys.stderr)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.sigterm = True


def _check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: expected an available device, got {str(device)!r} but CUDA is not available"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {str(device)!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return device


def fit(
    stage: Stage,
    optim: OptimConfig,
    out_dir: str | os.PathLike[str],
    *,
    device: torch.device | str,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Trains ``stage`` into the run folder ``out_dir`` (layout in the module docstring).

    Each step: fetch a batch (timed as the data wait) and move it to ``device``, ``stage.loss`` under bf16
    autocast on CUDA, backward, clip the gradient norm, stop if the loss or the norm is not finite, AdamW
    step, schedule step, EMA update. Every ``log_every`` steps a row of ``log.csv``; every ``eval_every``
    steps and at the end ``stage.evaluate`` on the EMA model; every ``checkpoint_every`` steps and at the
    end ``checkpoints/last.pt``; at the end ``stage.export`` of the EMA model into ``model/``, the plots,
    ``metrics.json`` and the manifest with status ``complete``.

    Args:
        stage: What to train ([`Stage`][recipes.flux3d.engine.Stage]).
        optim: How ([`OptimConfig`][recipes.flux3d.engine.OptimConfig]).
        out_dir: The run folder (created).
        device: Training device (``cuda`` without CUDA is an error).
        resume: Continue the run in ``out_dir`` from its last checkpoint, exactly (same config required;
            only ``checkpoint_every``, ``keep_checkpoint_every``, ``log_every`` and ``eval_every`` may
            change); a complete run is left as it is; a folder without a checkpoint starts from step 0.
        overwrite: Without ``resume``, delete an existing run in ``out_dir`` and start again (a non-empty
            folder that holds no run is never deleted).
        progress: Show a progress bar (steps/s, ETA, loss, data-wait share).

    Returns:
        The [`RunResult`][recipes.flux3d.engine.RunResult] of the complete run.

    Raises:
        NonFiniteLossError: A step's loss or gradient norm is not finite. The step is not applied, the
            last checkpoint is kept, nothing is exported; the manifest says ``failed`` with the reason.
        RunInterrupted: SIGTERM arrived; a checkpoint of the last finished step was written and the
            manifest says ``interrupted`` (KeyboardInterrupt is recorded the same way, then re-raised).
        RunFolderError: ``out_dir`` holds another run (without ``resume``/``overwrite``), a run with a
            different config (with ``resume``, naming the differing fields), or is not a run folder.
        ValueError: A bad ``device``.
    """
    if not isinstance(optim, OptimConfig):
        raise TypeError(f"optim: expected an OptimConfig, got {type(optim).__name__}")
    device = _check_device(device)
    out_dir = Path(out_dir)
    config = json.loads(
        json.dumps(to_jsonable({"stage": stage.name, "stage_config": stage.config(), "optim": optim}))
    )
    mode, manifest = _open_run_folder(out_dir, config, resume, overwrite)
    if mode == "complete":
        print(f"{out_dir}: the run is already complete (step {manifest['step']}); nothing to do", flush=True)
        metrics_path = out_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        model_dir = out_dir / "model"
        last = out_dir / "checkpoints" / "last.pt"
        return RunResult(
            out_dir,
            "complete",
            int(manifest["step"]),
            metrics,
            model_dir if model_dir.is_dir() else None,
            last if last.is_file() else None,
        )
    return _Run(stage, optim, out_dir, device, config, progress).run(resume=mode == "resume")


def run_or_exit(train: Callable[[], T]) -> T:
    """Runs ``train`` (e.g. ``lambda: fit(...)``) for a command line: an engine error is printed as one
    message on stderr and exits with a non-zero code instead of a traceback.

    Exit codes: 1 non-finite loss, 2 unusable run folder, 130 KeyboardInterrupt, 143 SIGTERM.
    """
    try:
        return train()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except RunFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        raise SystemExit(143) from None
    except KeyboardInterrupt:
        print(
            "interrupted: KeyboardInterrupt; resume with --resume from the last checkpoint", file=sys.stderr
        )
        raise SystemExit(130) from None
