"""A tiny stage for the training engine's tests (a dropout MLP regressing noisy random data), also runnable
as a command line so that a test can kill and resume it in a subprocess:

    python -m tests.engine_stage OUT --steps 30 --checkpoint-every 10 [--resume] [--hang-at 25 --marker F]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from recipes.flux3d.engine import (
    OptimConfig,
    ResumableLoader,
    add_optim_args,
    fit,
    optim_from_args,
    run_or_exit,
)

IN, OUT = 4, 2
DEFAULTS = OptimConfig(
    steps=30, lr=3e-3, batch_size=4, warmup_steps=3, checkpoint_every=10, log_every=1, ema_decay=0.9
)


class NoisyPairs(torch.utils.data.Dataset):
    """``(x, y)`` pairs drawn from the item seed (so any worker builds the same item); ``poison`` indices
    return features of 1e30."""

    def __init__(self, size: int, poison: tuple[int, ...] = ()) -> None:
        self.size, self.poison = size, set(poison)
        self.weight = torch.linspace(-1.0, 1.0, IN * OUT).reshape(IN, OUT)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, item_seed = key
        generator = torch.Generator().manual_seed(item_seed)
        x = torch.randn(IN, generator=generator) + 0.01 * index
        y = x @ self.weight + 0.1 * torch.randn(OUT, generator=generator)
        if index in self.poison:
            x = torch.full_like(x, 1e30)
        return x, y


class TinyStage:
    """The stage: dropout MLP, MSE loss with generator noise and a python-RNG scale (so every RNG the engine
    restores matters); evaluation draws from the global RNG on purpose (it must not disturb training)."""

    name = "tiny"

    def __init__(
        self,
        *,
        width: int = 16,
        size: int = 24,
        poison: tuple[int, ...] = (),
        num_workers: int = 0,
        pin_memory: bool = False,
        hang_at: int | None = None,
        marker: Path | None = None,
        interrupt_at: int | None = None,
        sigterm_at: int | None = None,
    ) -> None:
        self.width, self.size, self.poison = width, size, tuple(poison)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.hang_at, self.marker = hang_at, marker
        self.interrupt_at, self.sigterm_at = interrupt_at, sigterm_at
        self.calls = 0
        self.evaluated: list[tuple[int, nn.Module]] = []
        self.exported: list[nn.Module] = []
        self.prediction_dtypes: set[torch.dtype] = set()

    def config(self) -> dict:
        return {"width": self.width, "size": self.size, "poison": list(self.poison)}

    def build_model(self) -> nn.Module:
        width = self.width
        return nn.Sequential(
            nn.Linear(IN, width),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, OUT),
        )

    def loader(self, *, seed: int, batch_size: int) -> ResumableLoader:
        dataset = NoisyPairs(self.size, self.poison)
        return ResumableLoader(
            dataset,
            range(self.size),
            batch_size,
            seed=seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def loss(self, model: nn.Module, batch, generator: torch.Generator):
        self.calls += 1
        if self.calls == self.hang_at:  # the test kills the process while it waits here
            self.marker.write_text("hanging")
            time.sleep(120)
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.calls == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())  # noqa: NPY002
        noisy = x + 0.05 * torch.randn(x.shape, generator=generator, device=x.device)
        prediction = model(noisy)
        self.prediction_dtypes.add(prediction.dtype)
        mse = (prediction.float() * scale - y).square().mean()
        return mse, {"mse": mse.detach(), "scale": scale}

    def evaluate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        self.evaluated.append((step, model))
        x = torch.randn(64, IN)  # the global RNG: restored by the engine afterwards
        y = x @ NoisyPairs(1).weight
        x, y = x.to(next(model.parameters()).device), y.to(next(model.parameters()).device)
        (out_dir / "note.txt").write_text(f"step {step}\n")
        return {"eval_mse": float((model(x) - y).square().mean()), "random": random.random()}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        self.exported.append(model)
        save_file(
            {name: value.cpu().contiguous() for name, value in model.state_dict().items()}, out_dir / "w.st"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The engine tests' tiny stage.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--marker", type=Path, default=None)
    add_optim_args(parser, DEFAULTS)
    args = parser.parse_args(argv)
    optim = optim_from_args(args, parser)
    stage = TinyStage(hang_at=args.hang_at, marker=args.marker)
    run_or_exit(lambda: fit(stage, optim, args.out, device="cpu", resume=args.resume, progress=False))


if __name__ == "__main__":
    main()
