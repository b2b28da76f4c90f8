"""The recipe's training engine (`recipes/flux3d/engine.py`): schedule, loader, EMA, checkpoints and exact
resume (a killed subprocess), non-finite stops, the run folder, command-line helpers."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import doctest
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from recipes.flux3d import engine
from recipes.flux3d.engine import (
    EMA,
    NonFiniteLossError,
    OptimConfig,
    ResumableLoader,
    RunFolderError,
    RunInterrupted,
    add_optim_args,
    atomic_file,
    derive_seed,
    enable_activation_checkpointing,
    fit,
    lr_factor,
    move_to_device,
    optim_from_args,
    write_json,
)
from sparse3d import SparseTensor
from tests.engine_stage import DEFAULTS, TinyStage
from tests.engine_stage import main as stage_main

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "lr", "grad_norm", "mse", "scale")
"""log.csv columns that must match between runs (the others are timings)."""


def strict_json(path: Path):
    """Parses JSON, failing on NaN / Infinity (which Python's json would otherwise accept)."""

    def refuse(token: str):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as handle:
        return [{name: row[name] for name in COMPARED} for row in csv.DictReader(handle)]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """One complete in-process run of the tiny stage with the default config: (folder, result, stage)."""
    folder = tmp_path_factory.mktemp("engine") / "reference"
    stage = TinyStage()
    result = fit(stage, DEFAULTS, folder, device="cpu", progress=False)
    return folder, result, stage


# ----------------------------------------------------------------------------------------- config, schedule


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", -5),
        ("steps", 2.5),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", math.nan),
        ("batch_size", 0),
        ("weight_decay", -0.1),
        ("betas", (0.9, 1.0)),
        ("betas", (0.9,)),
        ("warmup_steps", 31),
        ("min_lr_ratio", 1.5),
        ("grad_clip", 0.0),
        ("ema_decay", 1.0),
        ("checkpoint_every", 0),
        ("keep_checkpoint_every", 15),
        ("log_every", 0),
        ("eval_every", 0),
        ("seed", -1),
    ],
)
def test_optim_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected .*got {re.escape(repr(value))}"):
        dataclasses.replace(DEFAULTS, **{field: value})


def test_lr_factor_is_linear_warmup_then_cosine():
    optim = OptimConfig(steps=110, lr=1.0, batch_size=1, warmup_steps=10, min_lr_ratio=0.2)
    assert [lr_factor(step, optim) for step in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, optim) == 1.0
    assert lr_factor(60, optim) == pytest.approx(0.2 + 0.8 * 0.5)  # half way through the cosine
    assert lr_factor(110, optim) == pytest.approx(0.2)
    decay = [lr_factor(step, optim) for step in range(10, 111)]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:], strict=False))


def test_logged_learning_rates_follow_the_schedule(reference):
    folder, _, _ = reference
    rows = log_rows(folder)
    assert [int(row["step"]) for row in rows] == list(range(1, DEFAULTS.steps + 1))
    for row in rows:  # the rate of update s (1-based) is lr * lr_factor(s - 1)
        assert float(row["lr"]) == pytest.approx(
            DEFAULTS.lr * lr_factor(int(row["step"]) - 1, DEFAULTS), rel=1e-12
        )


def test_one_step_matches_a_plain_adamw_step_with_clipping(tmp_path):
    """The engine's step against the same step written out with plain torch (seeding, clipping, AdamW)."""
    optim = OptimConfig(
        steps=1, lr=0.05, batch_size=4, weight_decay=0.01, grad_clip=0.01, ema_decay=None, seed=3
    )
    stage = TinyStage()
    fit(stage, optim, tmp_path / "run", device="cpu", progress=False)

    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    torch.manual_seed(3)
    model = stage.build_model()
    generator = torch.Generator().manual_seed(derive_seed(3, "loss"))
    batch = next(iter(stage.loader(seed=3, batch_size=4)))
    loss, _ = stage.loss(model, batch, generator)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert norm > 0.01  # the clip was active
    torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01).step()

    assert_same_weights(checkpoint(tmp_path / "run")["model"], model.state_dict())
    (row,) = log_rows(tmp_path / "run")
    assert float(row["grad_norm"]) == pytest.approx(float(norm), rel=1e-6)  # logged before clipping
    assert float(row["loss"]) == loss.item()


# ------------------------------------------------------------------------------------------------- loader


class Keys(torch.utils.data.Dataset):
    """Returns its key, so batches show what the loader asked for."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        return key


def take(loader: ResumableLoader, count: int) -> list[list[tuple[int, int]]]:
    stream = iter(loader)
    batches = [next(stream) for _ in range(count)]
    stream.close()
    return batches


def test_loader_epochs_are_seeded_permutations_with_unique_item_seeds():
    indices = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]
    loader = ResumableLoader(Keys(40), indices, 3, seed=4, collate_fn=list)
    batches = take(loader, 6)  # two epochs of 3 batches (one index dropped per epoch)
    for epoch in (batches[:3], batches[3:]):
        visited = [index for batch in epoch for index, _ in batch]
        assert len(visited) == 9 and len(set(visited)) == 9 and set(visited) <= set(indices)
    assert [i for b in batches[:3] for i, _ in b] != [i for b in batches[3:] for i, _ in b]
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    assert batches[1][2][1] == derive_seed(4, "item", 0, 5)  # (seed, epoch, position in the epoch)
    assert take(ResumableLoader(Keys(40), indices, 3, seed=4, collate_fn=list), 6) == batches
    assert take(ResumableLoader(Keys(40), indices, 3, seed=5, collate_fn=list), 6) != batches
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch"] == 0


def test_loader_keeps_the_last_batch_without_drop_last():
    loader = ResumableLoader(Keys(10), range(10), 4, seed=0, collate_fn=list, drop_last=False)
    assert [len(batch) for batch in take(loader, 6)] == [4, 4, 2, 4, 4, 2]


def test_loader_resumes_with_the_same_batches():
    loader = ResumableLoader(Keys(10), range(10), 3, seed=1, collate_fn=list)
    take(loader, 5)
    state = loader.state_dict()
    expected = take(loader, 4)
    resumed = ResumableLoader(Keys(10), range(10), 3, seed=1, collate_fn=list)
    resumed.load_state_dict(state)
    assert take(resumed, 4) == expected
    other = ResumableLoader(Keys(10), range(10), 3, seed=2, collate_fn=list)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_loader_batches_do_not_depend_on_workers():
    single = take(ResumableLoader(Keys(10), range(10), 4, seed=0, collate_fn=list), 5)
    workers = take(ResumableLoader(Keys(10), range(10), 4, seed=0, collate_fn=list, num_workers=2), 5)
    assert workers == single


def test_loader_workers_do_not_change_a_run(tmp_path, reference):
    fit(TinyStage(num_workers=2), DEFAULTS, tmp_path / "run", device="cpu", progress=False)
    assert log_rows(tmp_path / "run") == log_rows(reference[0])
    assert_same_weights(checkpoint(tmp_path / "run")["model"], checkpoint(reference[0])["model"])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"indices": []}, "indices"),
        ({"indices": [0, 10]}, "indices"),
        ({"batch_size": 11}, "batch_size"),
        ({"prefetch_factor": 2}, "prefetch_factor"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, argument):
    arguments = {"dataset": Keys(10), "indices": range(10), "batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        ResumableLoader(**arguments)


def test_move_to_device_walks_nested_batches():
    class Recorder:
        def to(self, device, non_blocking=False):
            self.calls = (device, non_blocking)
            return self

    Pair = namedtuple("Pair", "left right")

    @dataclasses.dataclass(frozen=True)
    class Item:
        feats: torch.Tensor
        name: str

    sparse = SparseTensor(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), torch.ones(1, 2))
    recorder = Recorder()
    batch = {
        "x": torch.zeros(2),
        "list": [sparse, (1, "a")],
        "pair": Pair(recorder, None),
        "item": Item(torch.ones(1), "b"),
    }
    moved = move_to_device(batch, "cpu")
    assert recorder.calls == ("cpu", True)
    assert isinstance(moved["list"][0], SparseTensor) and moved["list"][1] == (1, "a")
    assert isinstance(moved["pair"], Pair) and isinstance(moved["item"], Item) and moved["item"].name == "b"
    assert moved is not batch and moved["list"] is not batch["list"]


# ---------------------------------------------------------------------------------------------------- EMA


def test_ema_matches_the_written_out_average():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.8)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for updates in range(6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        model.train()(
            torch.randn(5, 3, generator=generator)
        )  # moves the BatchNorm statistics and its counter
        decay = min(0.8, (1 + updates) / (10 + updates))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value
            else:
                expected[name] = value.clone()
        ema.update(model)
    for name, value in ema.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    assert ema.updates == 6 and not ema.model.training
    assert not any(parameter.requires_grad for parameter in ema.model.parameters())


def test_evaluation_and_export_get_the_ema_model(reference):
    folder, result, stage = reference
    state = checkpoint(folder)
    ((step, evaluated),) = stage.evaluated
    assert step == DEFAULTS.steps
    assert_same_weights(evaluated.state_dict(), state["ema"]["model"])
    assert_same_weights(load_file(result.model_dir / "w.st"), state["ema"]["model"])
    assert not torch.equal(state["ema"]["model"]["0.weight"], state["model"]["0.weight"])


def test_evaluation_does_not_change_the_training(tmp_path, reference):
    folder, _, _ = reference
    stage = TinyStage()
    fit(stage, dataclasses.replace(DEFAULTS, eval_every=4), tmp_path / "run", device="cpu", progress=False)
    assert [step for step, _ in stage.evaluated] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert log_rows(tmp_path / "run") == log_rows(folder)
    assert_same_weights(checkpoint(tmp_path / "run")["model"], checkpoint(folder)["model"])
    assert (tmp_path / "run" / "eval" / "00000008" / "note.txt").read_text() == "step 8\n"


# ------------------------------------------------------------------------------------------- run folder


def test_complete_run_folder(reference):
    folder, result, stage = reference
    manifest = strict_json(folder / "manifest.json")
    assert (
        manifest["status"] == "complete" and manifest["step"] == DEFAULTS.steps and manifest["reason"] is None
    )
    assert (
        manifest["config"]["optim"]["lr"] == DEFAULTS.lr and manifest["config"]["stage_config"]["width"] == 16
    )
    for name in manifest["files"]:
        assert (folder / name).is_file(), name
    assert {"checkpoints/last.pt", "log.csv", "metrics.json", "model/w.st"} <= set(manifest["files"])
    assert not [path for path in folder.rglob(".*")]  # no temporary file left
    metrics = strict_json(folder / "metrics.json")
    assert metrics["status"] == "complete" and metrics["final_eval"] == result.metrics["final_eval"]
    assert set(metrics["final_eval"]) == {"eval_mse", "random"}
    assert 0.0 <= metrics["throughput"]["data_wait_share"] <= 1.0 and metrics["throughput"]["steps_per_s"] > 0
    with open(folder / "log.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["step", "loss", "lr", "grad_norm", "steps_per_s", "data_wait", "mse", "scale"]
    assert result.status == "complete" and result.step == DEFAULTS.steps
    assert stage.prediction_dtypes == {torch.float32}  # bf16=True autocasts on CUDA only
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "loss.png" not in manifest["files"]
    else:
        for name in ("loss.png", "curves.png"):
            assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_skips_the_plots_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    fit(TinyStage(), dataclasses.replace(DEFAULTS, steps=3), tmp_path / "run", device="cpu", progress=False)
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "run" / "loss.png").exists()


def test_resuming_a_complete_run_does_nothing(reference, capsys):
    folder, result, _ = reference
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    stage = TinyStage()
    again = fit(
        stage, dataclasses.replace(DEFAULTS, log_every=5), folder, device="cpu", resume=True, progress=False
    )
    assert "already complete" in capsys.readouterr().out
    assert again.status == "complete" and again.step == result.step and again.metrics == result.metrics
    assert stage.calls == 0 and {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before


def test_resuming_with_a_different_config_names_the_fields(reference):
    folder, _, _ = reference
    with pytest.raises(
        RunFolderError, match=r"optim\.lr: 0\.003 in the run folder, 0\.01 now.*stage_config\.width"
    ):
        fit(TinyStage(width=8), dataclasses.replace(DEFAULTS, lr=0.01), folder, device="cpu", resume=True)


def test_existing_run_needs_resume_or_overwrite(tmp_path, reference):
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        fit(TinyStage(), DEFAULTS, folder, device="cpu", progress=False)
    result = fit(
        TinyStage(),
        dataclasses.replace(DEFAULTS, steps=5),
        folder,
        device="cpu",
        overwrite=True,
        progress=False,
    )
    assert result.step == 5 and strict_json(folder / "manifest.json")["steps"] == 5
    assert not (folder / "eval" / "00000030").exists()  # the old run is gone, not mixed in


def test_a_folder_that_holds_no_run_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for kwargs in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="no manifest.json"):
            fit(TinyStage(), DEFAULTS, tmp_path, device="cpu", progress=False, **kwargs)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_device_is_validated(tmp_path):
    with pytest.raises(ValueError, match="^device: "):
        fit(TinyStage(), DEFAULTS, tmp_path / "run", device="cuda:99")
    with pytest.raises(ValueError, match="^device: "):
        fit(TinyStage(), DEFAULTS, tmp_path / "run", device="toaster")


def test_kept_checkpoints(tmp_path):
    optim = dataclasses.replace(DEFAULTS, steps=12, checkpoint_every=2, keep_checkpoint_every=4)
    fit(TinyStage(), optim, tmp_path / "run", device="cpu", progress=False)
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["last.pt", "step_00000004.pt", "step_00000008.pt", "step_00000012.pt"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert state["step"] == 8


# ----------------------------------------------------------------------------------- resume, interruption


def stage_command(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.engine_stage", str(folder), *args]


def test_resume_after_sigkill_is_exact(tmp_path, reference):
    """A run killed between its step-20 checkpoint and the end (steps 21-24 already logged), then resumed,
    against the uninterrupted reference run: same log rows, bitwise the same weights, EMA and export."""
    marker, folder = tmp_path / "hanging", tmp_path / "killed"
    killed = subprocess.Popen(
        stage_command(folder, "--hang-at", "25", "--marker", str(marker)), cwd=ROOT, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached step 25"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    assert strict_json(folder / "manifest.json")["status"] == "running"
    assert checkpoint(folder)["step"] == 20 and len(log_rows(folder)) == 24
    done = subprocess.run(
        stage_command(folder, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "resuming at step 20 of 30" in done.stdout

    uninterrupted = reference[0]
    assert log_rows(folder) == log_rows(uninterrupted)
    assert_same_weights(checkpoint(folder)["model"], checkpoint(uninterrupted)["model"])
    assert_same_weights(checkpoint(folder)["ema"]["model"], checkpoint(uninterrupted)["ema"]["model"])
    assert_same_weights(load_file(folder / "model" / "w.st"), load_file(uninterrupted / "model" / "w.st"))
    assert strict_json(folder / "manifest.json")["status"] == "complete"


def test_sigterm_checkpoints_then_resumes_exactly(tmp_path, reference):
    assert threading.current_thread() is threading.main_thread()  # else the handler could not be installed
    folder = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="SIGTERM at step 13"):
        fit(TinyStage(sigterm_at=13), DEFAULTS, folder, device="cpu", progress=False)
    manifest = strict_json(folder / "manifest.json")
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["reason"]
    assert checkpoint(folder)["step"] == 13  # written on the way out, not only at 10
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back
    fit(TinyStage(), DEFAULTS, folder, device="cpu", resume=True, progress=False)
    assert log_rows(folder) == log_rows(reference[0])
    assert_same_weights(checkpoint(folder)["model"], checkpoint(reference[0])["model"])


def test_keyboard_interrupt_is_recorded_and_resumable(tmp_path, reference):
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(TinyStage(interrupt_at=17), DEFAULTS, folder, device="cpu", progress=False)
    manifest = strict_json(folder / "manifest.json")
    assert manifest["status"] == "interrupted" and manifest["step"] == 16 and checkpoint(folder)["step"] == 10
    fit(TinyStage(), DEFAULTS, folder, device="cpu", resume=True, progress=False)
    assert log_rows(folder) == log_rows(reference[0])
    assert_same_weights(checkpoint(folder)["ema"]["model"], checkpoint(reference[0])["ema"]["model"])


# ------------------------------------------------------------------------------------------- non-finite


def test_huge_learning_rate_stops_the_script_with_an_error(tmp_path, capsys):
    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:  # the stage's command line, run in this process
        stage_main([str(folder), "--lr", "1e6", "--checkpoint-every", "1"])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: non-finite loss at step ")
    failed_step = int(error.split("at step ")[1].split(":")[0])
    assert failed_step > 1
    manifest = strict_json(folder / "manifest.json")
    assert manifest["status"] == "failed" and f"step {failed_step}" in manifest["reason"]
    state = checkpoint(folder)
    assert state["step"] == failed_step - 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not (folder / "model").exists()
    assert strict_json(folder / "metrics.json")["status"] == "failed"


def test_poisoned_batch_stops_at_its_step(tmp_path):
    poisoned = 7
    optim = dataclasses.replace(DEFAULTS, checkpoint_every=2)
    probe = TinyStage().loader(seed=optim.seed, batch_size=optim.batch_size)
    batches = (
        probe.batch_keys(epoch, batch) for epoch in range(9) for batch in range(probe.batches_per_epoch)
    )
    expected = next(number for number, keys in enumerate(batches, 1) if poisoned in [i for i, _ in keys])
    assert 2 < expected <= optim.steps

    folder = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=rf"step {expected}: loss (inf|nan)") as caught:
        fit(TinyStage(poison=(poisoned,)), optim, folder, device="cpu", progress=False)
    assert caught.value.step == expected and not math.isfinite(caught.value.loss)
    assert "the last good checkpoint is" in str(caught.value)
    assert checkpoint(folder)["step"] == (expected - 1) // 2 * 2
    assert all(torch.isfinite(value).all() for value in checkpoint(folder)["model"].values())
    assert strict_json(folder / "manifest.json")["status"] == "failed"
    assert not (folder / "model").exists()


# ----------------------------------------------------------------------------------------------- helpers


def test_write_json_writes_valid_json_atomically(tmp_path):
    path = tmp_path / "m.json"
    value = {
        "nan": math.nan,
        "list": [math.inf, 1.5, -math.inf],
        "numpy": np.float32(2.5),
        "tensor": torch.tensor(3),
        "path": Path("a/b"),
        "tuple": (1, None, True),
        4: "int key",
    }
    write_json(path, value)
    assert strict_json(path) == {
        "nan": None,
        "list": [None, 1.5, None],
        "numpy": 2.5,
        "tensor": 3,
        "path": "a/b",
        "tuple": [1, None, True],
        "4": "int key",
    }
    for bad, named in (({"s": {1, 2}}, "set"), ({"t": torch.zeros(2)}, "shape")):
        with pytest.raises(TypeError, match=named):
            write_json(path, bad)
    assert strict_json(path)["numpy"] == 2.5  # untouched by the failed writes
    with pytest.raises(RuntimeError), atomic_file(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert strict_json(path)["numpy"] == 2.5 and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_command_line_flags_round_trip(capsys):
    parser = argparse.ArgumentParser()
    add_optim_args(parser, DEFAULTS)
    assert optim_from_args(parser.parse_args([])) == DEFAULTS
    args = parser.parse_args(
        ["--lr", "0.5", "--grad-clip", "none", "--no-bf16", "--betas", "0.8", "0.9", "--eval-every", "5"]
    )
    assert optim_from_args(args) == dataclasses.replace(
        DEFAULTS, lr=0.5, grad_clip=None, bf16=False, betas=(0.8, 0.9), eval_every=5
    )
    with pytest.raises(ValueError, match=r"^--batch-size: expected an integer >= 1, got 0"):
        optim_from_args(parser.parse_args(["--batch-size", "0"]))
    with pytest.raises(SystemExit) as exited:
        optim_from_args(parser.parse_args(["--warmup-steps", "99"]), parser)
    assert exited.value.code == 2 and "--warmup-steps: expected at most steps (30)" in capsys.readouterr().err
    help_text = parser.format_help()
    assert "Default: 0.003." in help_text and "--no-bf16" in help_text and "Default: 0.9 0.999." in help_text


def test_activation_checkpointing_keeps_results_and_saves_activations():
    def blocks() -> nn.ModuleList:
        torch.manual_seed(0)
        return nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.3)) for _ in range(3))

    def run(layers: nn.ModuleList) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved = 0

        def pack(tensor):
            nonlocal saved
            saved += 1
            return tensor

        torch.manual_seed(1)
        x = torch.randn(5, 8)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            for layer in layers:
                x = layer(x)
        x.square().sum().backward()
        return x, [parameter.grad for parameter in layers.parameters()], saved

    plain, checkpointed = blocks(), blocks()
    enable_activation_checkpointing(checkpointed)
    enable_activation_checkpointing(checkpointed)  # twice is harmless
    out_plain, grads_plain, saved_plain = run(plain)
    out_checkpointed, grads_checkpointed, saved_checkpointed = run(checkpointed)
    assert torch.equal(out_plain, out_checkpointed)  # dropout draws the same masks when recomputed
    for first, second in zip(grads_plain, grads_checkpointed, strict=True):
        assert torch.equal(first, second)
    assert saved_checkpointed < saved_plain
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    copied = copy.deepcopy(checkpointed).eval()
    with torch.no_grad():
        checkpointed[0][0].weight.zero_()
        probe = torch.randn(2, 8)
        assert not torch.equal(
            copied[0](probe), checkpointed.eval()[0](probe)
        )  # the copy runs its own weights


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_fit_on_cuda_uses_bf16_fused_adamw_and_pinned_workers(tmp_path):
    stage = TinyStage(num_workers=2, pin_memory=True, sigterm_at=13)
    folder = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        fit(stage, DEFAULTS, folder, device="cuda", progress=False)
    assert checkpoint(folder)["rng"]["cuda"] is not None  # the CUDA RNG states are saved
    stage = TinyStage(num_workers=2, pin_memory=True)
    result = fit(stage, DEFAULTS, folder, device="cuda", resume=True, progress=False)
    assert result.status == "complete" and result.step == DEFAULTS.steps
    assert stage.prediction_dtypes == {torch.bfloat16}
    assert checkpoint(folder)["optimizer"]["param_groups"][0]["fused"] is True
    assert 0.0 <= result.metrics["throughput"]["data_wait_share"] <= 1.0
    assert math.isfinite(result.metrics["last_log"]["loss"])
    assert math.isfinite(result.metrics["final_eval"]["eval_mse"])


def test_docstring_examples():
    result = doctest.testmod(engine, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
