"""What the recipe's command lines share: presets and ``--set`` overrides, device checks, and one way to
finish (print where every output went, or a clear error and a non-zero exit code)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.flux3d.configs import PRESETS, RecipeConfig, apply_overrides

__all__ = ["add_common_args", "config_from_args", "resolve_device", "run_main", "print_outputs"]

TRAINED = ("decoder", "smdit")


def _preset_help() -> str:
    summaries = {
        "toy": "the whole pipeline on 2 CPU cores in minutes (the default).",
        "small": "one H200; each stage a few minutes.",
        "paper": "the paper's sizes and schedule (needs local FLUX VAE weights).",
    }
    return "preset: " + " ".join(f"{name}: {summaries.get(name, '')}" for name in PRESETS)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--preset``, ``--set``, the ``--steps/--lr/--batch-size`` shortcuts, ``--device`` and
    ``--quiet``."""
    parser.add_argument("--preset", default="toy", choices=sorted(PRESETS), help=_preset_help())
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override any preset value, e.g. --set decoder.optim.lr=3e-4 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of the trained stages")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the trained stages")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size of the trained stages")
    parser.add_argument(
        "--device", default="auto", help="'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when available)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, stages: Sequence[str] = TRAINED
) -> RecipeConfig:
    """The preset with ``--set`` overrides and the shortcuts applied to ``stages``' optimisers; a bad value
    is a parser error naming the flag."""
    config = PRESETS[args.preset]()
    try:
        config = apply_overrides(config, args.overrides)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    shortcuts = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
    for name, value in shortcuts.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        for stage in TRAINED:
            if stage not in stages:
                continue
            section = getattr(config, stage)
            changes = {name: value}
            if name == "steps" and isinstance(value, int) and section.optim.warmup_steps > value:
                changes["warmup_steps"] = value // 10  # the warmup shrinks with a shorter run
            try:
                optim = dataclasses.replace(section.optim, **changes)
            except ValueError as error:
                parser.error(f"{flag}: {error}")
            config = dataclasses.replace(config, **{stage: dataclasses.replace(section, optim=optim)})
    return config


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a parser error naming
    ``--device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                f"--device: {name!r} asked for, but this torch has no CUDA device (use --device cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device: expected an index below {torch.cuda.device_count()}, got {name!r}")
    elif device.type != "cpu":
        parser.error(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def print_outputs(record: dict[str, Any], out: Path) -> None:
    """Prints the run's outputs and headline metrics."""
    print(f"\nrun folder: {out.resolve()}", file=sys.stderr)
    for name, path in record.get("outputs", {}).items():
        print(f"  {name:16s} {path}", file=sys.stderr)
    metrics = record.get("metrics", {}).get("eval")
    if metrics:
        keys = ("generated_psnr", "reconstructed_psnr", "zero_input_psnr", "generated_psnr_input_view")
        shown = ", ".join(f"{key} {metrics[key]:.2f} dB" for key in keys if metrics.get(key) is not None)
        print(f"held-out ({metrics.get('assets')} assets): {shown}", file=sys.stderr)


def run_main(job: Callable[[], dict[str, Any]], out: Path) -> dict[str, Any]:
    """Runs ``job``; prints where everything went, or an error message and exits non-zero."""
    from recipes.flux3d.data import DatasetError
    from recipes.flux3d.engine import NonFiniteLossError, RunFolderError, RunInterrupted

    try:
        record = job()
    except NonFiniteLossError as error:
        print(f"error: training stopped: {error} (the last good checkpoint is kept)", file=sys.stderr)
        raise SystemExit(3) from None
    except RunInterrupted as error:
        print(f"interrupted: {error}; continue with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    except (RunFolderError, DatasetError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_outputs(record, out)
    return record
