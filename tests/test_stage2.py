"""The decoder stage (train_decoder.py) and sampling to files (sample.py) end to end on a tiny procedural
dataset, checked against independent recomputations (renders, Euler CFG loop, decoder forward)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from recipes.flux3d import sample, train, train_decoder
from recipes.flux3d.data import list_assets, load_features
from sparse3d import SparseTensor
from sparse3d.gaussians import load_ply, render
from sparse3d.geometry import read_transforms
from tests.tiny_dataset import SIZE, R


@pytest.fixture(scope="module")
def decoder_run(prepared, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("decoder")
    metrics = train_decoder.main(
        ["--data", str(prepared), "--steps", "3", "--eval-views", "2", "--out", str(out), "--device", "cpu"]
        + ["--backend", "torch", "--seed", "1"]
    )
    return out, metrics


@pytest.fixture(scope="module")
def smdit_run(prepared, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("smdit")
    metrics = train.main(
        ["--data", str(prepared), "--steps", "2", "--batch-size", "2", "--sample-steps", "2"]
        + ["--out", str(out), "--device", "cpu"]
    )
    # Two steps barely move the zero-initialised output layers: perturb every weight so that the image, the
    # guidance and every block change the velocity (the saved checkpoint is what sample.py loads).
    generator = torch.Generator().manual_seed(3)
    state = load_file(out / "model.safetensors")
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }
    save_file(state, out / "model.safetensors")
    return out, metrics


def _composited(path, background: float = 1.0) -> torch.Tensor:
    """A PNG composited on a grey-level background, computed here from the file ([H, W, 3])."""
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:]) * background
    return torch.from_numpy(rgb).float()


def _sample_args(prepared, smdit_run, decoder_run, out, seed: int = 0) -> list[str]:
    return [
        "--smdit", str(smdit_run[0] / "model.safetensors"),
        "--decoder", str(decoder_run[0] / "decoder.safetensors"),
        "--data", str(prepared), "--asset", "1", "--steps", "3", "--guidance", "3", "--seed", str(seed),
        "--turntable-views", "3", "--render-size", "24", "--grid-views", "2", "--backend", "torch",
        "--out", str(out),
    ]  # fmt: skip


def test_train_decoder_outputs_match_recomputation(prepared, decoder_run):
    out, metrics = decoder_run
    for name in ("decoder.safetensors", "decoder.json", "metrics.json", "heldout.png", "heldout.ply"):
        assert (out / name).is_file(), name
    assert len(metrics["losses"]) == 3 and all(math.isfinite(v) for v in metrics["losses"])
    assert json.loads((out / "metrics.json").read_text())["losses"] == metrics["losses"]
    assert metrics["lpips"].startswith("off") and metrics["config"]["lpips_weight"] == 0.0
    assert all(v == 0.0 for v in metrics["loss_terms"]["lpips"])
    assets = list_assets(prepared)
    heldout = assets[-1]
    assert metrics["data"]["heldout_asset"] == heldout and metrics["data"]["train_assets"] == 2
    coords, mean, std, resolution = load_features(prepared / "features" / "rgb" / f"{heldout}.npz")
    assert std is None and resolution == R

    # The saved decoder applied to the held-out mu reproduces the PLY and the held-out PSNR.
    decoder, data = train_decoder.load_decoder(out / "decoder.safetensors")
    assert data["feature"] == "rgb" and data["latent_channels"] == 3
    k = decoder.config.head.num_gaussians
    batch = torch.zeros(coords.shape[0], 1, dtype=torch.int32)
    with torch.no_grad():
        gaussians = decoder(SparseTensor(torch.cat([batch, coords], 1), mean, spatial_shape=R))
    ply = load_ply(out / "heldout.ply")
    assert ply.num_gaussians == coords.shape[0] * k == metrics["num_gaussians_heldout"]
    torch.testing.assert_close(ply.means, gaussians.means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ply.opacities, gaussians.opacities, atol=1e-5, rtol=1e-4)
    frames = read_transforms(prepared / "renders" / heldout / "transforms.json", SIZE)
    targets = torch.stack([_composited(frames.image_paths[i]) for i in range(2)])  # white background
    with torch.no_grad():
        colors = render(
            gaussians, frames.viewmats[:2], frames.Ks[:2], SIZE, SIZE, torch.ones(3), backend="torch"
        ).colors
    expected = -10 * math.log10(float((colors.clamp(0, 1) - targets).square().mean()))
    assert metrics["psnr_heldout_end"] == pytest.approx(expected, abs=1e-3)
    assert math.isfinite(metrics["psnr_heldout_start"])


def test_train_decoder_is_seeded(prepared, decoder_run, tmp_path):
    again = train_decoder.main(
        [
            "--data",
            str(prepared),
            "--steps",
            "3",
            "--eval-views",
            "2",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
        + ["--backend", "torch", "--seed", "1"]
    )
    assert again["losses"] == decoder_run[1]["losses"]
    first, second = (
        load_file(decoder_run[0] / "decoder.safetensors"),
        load_file(tmp_path / "decoder.safetensors"),
    )
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_train_writes_config_that_sample_loads(smdit_run):
    out, metrics = smdit_run
    model, config, data = sample.load_smdit(out / "model.safetensors")
    assert data["feature"] == "rgb" and data["extractor"] == "rgb" and data["pool"] == 1
    assert config.model.latent_channels == 3 and config.resolution == R
    assert (
        json.loads(json.dumps(metrics["preset_config"]))
        == json.loads((out / "config.json").read_text())["train_config"]
    )
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def _reference_sample(prepared, smdit_run, decoder_run, seed: int, steps: int, guidance: float):
    """Asset 1 generated by a hand-written Euler CFG loop (no sparse3d.flow) and decoded."""
    model, _, _ = sample.load_smdit(smdit_run[0] / "model.safetensors")
    decoder, _ = train_decoder.load_decoder(decoder_run[0] / "decoder.safetensors")
    sha = list_assets(prepared)[1]
    coords, mean, _, _ = load_features(prepared / "features" / "rgb" / f"{sha}.npz")
    image = _composited(
        read_transforms(prepared / "renders_cond" / sha / "transforms.json").image_paths[0], background=0.0
    )
    image = image.permute(2, 0, 1)[None]  # [1, 3, H, W] premultiplied (black background), rgb extractor
    batch = torch.zeros(coords.shape[0], 1, dtype=torch.int32)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    x = SparseTensor(torch.cat([batch, coords], 1), noise, spatial_shape=R)
    times = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = times[i].expand(1)
            conditional = model(x, t, image).feats
            unconditional = model(x, t, torch.zeros_like(image)).feats
            velocity = unconditional + guidance * (conditional - unconditional)
            x = x.replace(x.feats + (times[i + 1] - times[i]) * velocity)
        return x, decoder(x), decoder.config.head.num_gaussians


def test_sample_end_to_end_deterministic(prepared, smdit_run, decoder_run, tmp_path):
    summary = sample.main(_sample_args(prepared, smdit_run, decoder_run, tmp_path / "a"))
    for name in ("gaussians.ply", "latent.npz", "turntable.gif", "grid.png", "sample.json"):
        assert (tmp_path / "a" / name).is_file(), name
    with Image.open(tmp_path / "a" / "turntable.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (24, 24)
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.size == (2 * SIZE, 3 * SIZE)  # rows: renders, decoded mu, decoded sample
    latent, expected, k = _reference_sample(prepared, smdit_run, decoder_run, seed=0, steps=3, guidance=3.0)
    with np.load(tmp_path / "a" / "latent.npz") as saved:
        assert (
            np.array_equal(saved["indices"], latent.coords[:, 1:].numpy()) and int(saved["resolution"]) == R
        )
        torch.testing.assert_close(torch.from_numpy(saved["mean"]), latent.feats, atol=1e-4, rtol=1e-4)
    ply = load_ply(tmp_path / "a" / "gaussians.ply")
    assert ply.num_gaussians == latent.coords.shape[0] * k == summary["num_gaussians"]
    torch.testing.assert_close(ply.means, expected.means, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ply.sh, expected.sh, atol=1e-4, rtol=1e-4)
    assert math.isfinite(summary["psnr_generated"]) and math.isfinite(summary["latent_mse"])

    sample.main(_sample_args(prepared, smdit_run, decoder_run, tmp_path / "b"))
    first, second = (
        (tmp_path / "a" / "gaussians.ply").read_bytes(),
        (tmp_path / "b" / "gaussians.ply").read_bytes(),
    )
    assert first == second
    sample.main(_sample_args(prepared, smdit_run, decoder_run, tmp_path / "c", seed=1))
    assert (tmp_path / "c" / "gaussians.ply").read_bytes() != first


def test_missing_checkpoints_raise_clear_errors(prepared, smdit_run, decoder_run, tmp_path):
    args = _sample_args(prepared, smdit_run, decoder_run, tmp_path / "out")
    missing = list(args)
    missing[1] = str(tmp_path / "nope" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"smdit: expected an SMDiT checkpoint .*nope.*no such file"):
        sample.main(missing)
    missing = list(args)
    missing[3] = str(tmp_path / "nope" / "decoder.safetensors")
    with pytest.raises(FileNotFoundError, match=r"decoder: expected a decoder checkpoint .*no such file"):
        sample.main(missing)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(smdit_run[0] / "model.safetensors", lonely / "model.safetensors")
    missing = list(args)
    missing[1] = str(lonely / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"smdit: expected its config .*config.json"):
        sample.main(missing)
    bad_asset = list(args)
    bad_asset[bad_asset.index("--asset") + 1] = "7"
    with pytest.raises(ValueError, match=r"asset: expected an index in \[0, 3\).*got 7"):
        sample.main(bad_asset)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_cuda_decoder_and_sample(prepared, smdit_run, decoder_run, tmp_path):
    metrics = train_decoder.main(
        ["--data", str(prepared), "--steps", "3", "--eval-views", "2", "--out", str(tmp_path / "dec")]
        + ["--device", "cuda"]
    )
    assert all(math.isfinite(v) for v in metrics["losses"]) and math.isfinite(metrics["psnr_heldout_end"])
    args = _sample_args(prepared, smdit_run, decoder_run, tmp_path / "gpu")
    args[args.index("--backend") + 1] = "auto"
    summary = sample.main([*args, "--device", "cuda"])
    latent, expected, k = _reference_sample(prepared, smdit_run, decoder_run, seed=0, steps=3, guidance=3.0)
    with np.load(tmp_path / "gpu" / "latent.npz") as saved:
        torch.testing.assert_close(torch.from_numpy(saved["mean"]), latent.feats, atol=1e-3, rtol=1e-3)
    ply = load_ply(tmp_path / "gpu" / "gaussians.ply")
    assert ply.num_gaussians == latent.coords.shape[0] * k == summary["num_gaussians"]
    # The CPU generator gives the same noise on CUDA; the decoder runs under bf16 autocast there.
    torch.testing.assert_close(ply.means, expected.means, atol=2e-2, rtol=0)
