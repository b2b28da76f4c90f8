"""benchmarks/data.py runs end to end on a CPU-sized dataset (so the GPU run the lead starts cannot fail on
an API change), and its numbers are what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_data", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, *extra: str) -> list[str]:
    sizes = ["--assets", "2", "--image-size", "16", "--resolution", "8", "--views", "2", "--cond-views", "1"]
    batches = [
        "--batches",
        "2",
        "--batch",
        "2",
        "--decoder-batch",
        "1",
        "--views-per-item",
        "1",
        "--pool",
        "1",
    ]
    return ["--root", str(tmp_path / "data"), *sizes, *batches, "--device", "cpu", *extra]


def test_keys_cover_every_item_once_per_epoch() -> None:
    keys = _benchmark().keys(5, 3)
    epochs = [[next(keys) for _ in range(5)] for _ in range(2)]
    for epoch in epochs:
        assert sorted(index for index, _ in epoch) == list(range(5))
    seeds = [seed for epoch in epochs for _, seed in epoch]
    assert len(set(seeds)) == 10  # a fresh item seed for every draw


def test_loader_benchmark_reports_every_configuration(tmp_path) -> None:
    out = tmp_path / "report.json"
    report = _benchmark().main(_args(tmp_path, "--workers", "0", "1", "--no-steps", "--out", str(out)))
    assert json.loads(out.read_text()) == report
    assert report["dataset"]["assets"] == 2 and report["open"]["cached"]["assets"] == 2
    rows = report["loader"]
    assert {(r["dataset"], r["images"], r["workers"]) for r in rows} == {
        (d, i, w) for d in ("decoder", "smdit") for i in ("cached", "lazy") for w in (0, 1)
    }
    assert all("error" not in r and r["batches_per_s"] > 0 for r in rows), rows
    assert report["steps"] == []


@pytest.mark.slow
def test_step_benchmark_measures_the_data_wait(tmp_path) -> None:
    report = _benchmark().main(_args(tmp_path, "--workers", "0", "--steps", "1", "--warmup", "0"))
    assert {r["stage"] for r in report["steps"]} == {"smdit", "decoder"}
    for row in report["steps"]:
        assert "error" not in row, row
        assert 0 <= row["data_wait_share"] <= 1 and row["steps_per_s"] > 0
