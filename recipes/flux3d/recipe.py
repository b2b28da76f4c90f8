"""The whole recipe as functions, one per stage, each reading the previous stage's folder:

    data (procedural assets) -> features (DA-SLAT + statistics) -> decoder -> smdit -> pipeline -> eval

A run folder (``train.py --out DIR``) holds::

    DIR/data/          the dataset (``dataset.json``, ``metadata.csv`` with the split, renders, voxels,
                       ``features/<name>/`` with ``features.json`` and ``stats.json``)
    DIR/decoder/       the decoder's engine run (manifest, checkpoints, log.csv, plots, model/)
    DIR/smdit/         SMDiT's engine run
    DIR/pipeline/      the assembled FLUX3DPipeline (``FLUX3DPipeline.from_pretrained``)
    DIR/eval/          metrics.json, grid.png, grids/, sample.ply, turntable.gif
    DIR/recipe.json    the full config, the stages run, and where every output is
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.flux3d.conditioning import ConditionEncoder
from recipes.flux3d.configs import RecipeConfig, config_to_dict
from recipes.flux3d.data import load_feature_stats, read_record
from recipes.flux3d.engine import RunResult, fit, write_json
from recipes.flux3d.evaluation import EvalResult, evaluate_pipeline
from recipes.flux3d.features import build_extractor, prepare_dataset
from recipes.flux3d.model import SMDiT
from recipes.flux3d.pipeline import (
    FLUX3DPipeline,
    SamplingOptions,
    build_condition_extractor,
    decoder_config_from_dict,
    load_module_state,
    smdit_config_from_dict,
)
from recipes.flux3d.shapes import generate_dataset
from recipes.flux3d.stages import DecoderStage, SMDiTStage, encoder_config_for
from sparse3d.gaussians import GaussianDecoder

__all__ = [
    "STAGES",
    "feature_name",
    "make_data",
    "make_features",
    "train_decoder",
    "train_smdit",
    "assemble_pipeline",
    "run",
]

STAGES = ("data", "features", "decoder", "smdit", "pipeline", "eval")
"""The stages in order; ``train.py --stage all`` runs every one."""


def feature_name(config: RecipeConfig) -> str:
    """The ``features/<name>`` folder of a config (the extractor's name, as ``prepare.py`` names it)."""
    return config.features.extractor.replace("-", "_")


def make_data(config: RecipeConfig, root: Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Generates (or resumes) the procedural dataset of ``config.data`` into ``root``."""
    data = config.data
    generate_dataset(
        root, data.num_assets, heldout=data.heldout, seed=data.seed, image_size=data.image_size,
        num_views=data.views, num_cond_views=data.cond_views, cond_image_size=data.cond_image_size,
        voxel_resolution=data.voxel_resolution, workers=data.workers, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return root


def make_features(
    config: RecipeConfig, root: Path, *, device: torch.device | str = "cpu", overwrite: bool = False,
    progress: bool = True,
) -> str:  # fmt: skip
    """Builds (or resumes) DA-SLAT features and their statistics; returns the feature folder's name."""
    features = config.features
    extractor = build_extractor(features.extractor, features.weights, pool=features.pool, device=device)
    name = feature_name(config)
    record = read_record(root / "dataset.json") or {}
    resolution = int(record.get("settings", {}).get("voxel_resolution", config.data.voxel_resolution))
    prepare_dataset(
        root, extractor, name, resolution=resolution, num_views=features.views, device=device,
        settings={"extractor": features.extractor, "weights": features.weights, "pool": features.pool},
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return name


def _encoder_config(config: RecipeConfig) -> dict:
    features = config.features
    return encoder_config_for(features.extractor, features.pool, features.weights)


def train_decoder(
    config: RecipeConfig, root: Path, out: Path, *, device: torch.device | str, resume: bool = False,
    overwrite: bool = False, progress: bool = True,
) -> RunResult:  # fmt: skip
    """Trains the decoder stage on ``root`` into the engine run folder ``out``."""
    stage = DecoderStage(config.decoder, root, feature_name(config), progress=progress)
    return fit(
        stage, config.decoder.optim, out, device=device, resume=resume, overwrite=overwrite, progress=progress
    )


def train_smdit(
    config: RecipeConfig, root: Path, out: Path, *, device: torch.device | str, resume: bool = False,
    overwrite: bool = False, progress: bool = True,
) -> RunResult:  # fmt: skip
    """Trains the SMDiT stage on ``root`` into the engine run folder ``out``."""
    stage = SMDiTStage(
        config.smdit, root, _encoder_config(config), config.sampling, feature_name(config), progress=progress
    )
    return fit(
        stage, config.smdit.optim, out, device=device, resume=resume, overwrite=overwrite, progress=progress
    )


def assemble_pipeline(
    config: RecipeConfig, root: Path, decoder_model: Path, smdit_model: Path, out: Path
) -> FLUX3DPipeline:
    """Builds the pipeline from the two stages' exported models and writes it to ``out``."""
    decoder_values, decoder_state = load_module_state(decoder_model)
    decoder = GaussianDecoder(decoder_config_from_dict(decoder_values))
    decoder.load_state_dict(decoder_state, strict=True)
    smdit_values, smdit_state = load_module_state(smdit_model)
    smdit = SMDiT(smdit_config_from_dict(smdit_values))
    smdit.load_state_dict(smdit_state, strict=True)
    encoder_config = _encoder_config(config)
    encoder = ConditionEncoder(build_condition_extractor(encoder_config), smdit.config.image_patch)
    record = read_record(root / "dataset.json") or {}
    settings = record.get("settings", {})
    image_size = config.smdit.cond_image_size or settings.get("cond_image_size") or settings.get("image_size")
    sampling = config.sampling
    pipe = FLUX3DPipeline(
        smdit,
        decoder,
        encoder,
        encoder_config=encoder_config,
        stats=load_feature_stats(root, feature_name(config)),
        resolution=decoder.config.head.resolution,
        image_size=int(image_size or config.data.image_size),
        sampling=SamplingOptions(
            steps=sampling.steps, guidance=sampling.guidance,
            guidance_interval=tuple(sampling.guidance_interval),
            shift=sampling.shift,
        ),
    )  # fmt: skip
    pipe.save_pretrained(out)
    return pipe


def _model_dir(run_dir: Path, name: str) -> Path:
    model = run_dir / "model"
    if not (model / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{name}: expected a finished {name} run in {run_dir} (its model/ folder), got none; run "
            f"`train.py --stage {name}` first"
        )
    return model


def run(
    config: RecipeConfig,
    out: Path,
    stages: Sequence[str] = STAGES,
    *,
    device: torch.device | str = "cpu",
    data_root: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``stages`` (in the order of ``STAGES``) of the recipe into ``out``; returns the content of
    ``recipe.json``.

    Args:
        config: The recipe config (a preset with overrides).
        out: Run folder (layout in the module docstring).
        stages: Which stages to run; each reads the folders earlier stages wrote.
        device: Training / inference device.
        data_root: Use this dataset folder instead of ``out/data`` (it must hold the features for
            ``features`` to be skipped).
        resume: Resume interrupted engine runs (decoder, smdit) exactly; finished stages are kept.
        overwrite: Start the engine runs again over existing run folders.
        progress: Progress bars.

    Returns:
        The record written to ``out/recipe.json`` (config, stage timings, outputs, metrics).
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"stages: expected names from {STAGES}, got {unknown}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root is not None else out / "data"
    record: dict[str, Any] = {
        "config": config_to_dict(config),
        "device": str(device),
        "stages": {},
        "outputs": {},
    }
    previous = read_record(out / "recipe.json")
    if previous:
        record["stages"] = dict(previous.get("stages", {}))
        record["outputs"] = dict(previous.get("outputs", {}))

    def done(stage: str, seconds: float, **outputs: Any) -> None:
        record["stages"][stage] = {
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        record["outputs"].update(outputs)
        write_json(out / "recipe.json", record)

    for stage in STAGES:
        if stage not in stages:
            continue
        start = time.perf_counter()
        if stage == "data":
            make_data(config, root, progress=progress)
            done(stage, time.perf_counter() - start, data=str(root))
        elif stage == "features":
            name = make_features(config, root, device=device, progress=progress)
            done(stage, time.perf_counter() - start, features=str(root / "features" / name))
        elif stage == "decoder":
            result = train_decoder(
                config,
                root,
                out / "decoder",
                device=device,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
            )
            record.setdefault("metrics", {})["decoder"] = result.metrics.get("eval", result.metrics)
            done(stage, time.perf_counter() - start, decoder=str(result.out_dir))
        elif stage == "smdit":
            result = train_smdit(
                config,
                root,
                out / "smdit",
                device=device,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
            )
            record.setdefault("metrics", {})["smdit"] = result.metrics.get("eval", result.metrics)
            done(stage, time.perf_counter() - start, smdit=str(result.out_dir))
        elif stage == "pipeline":
            assemble_pipeline(
                config, root, _model_dir(out / "decoder", "decoder"), _model_dir(out / "smdit", "smdit"),
                out / "pipeline",
            )  # fmt: skip
            done(stage, time.perf_counter() - start, pipeline=str(out / "pipeline"))
        elif stage == "eval":
            pipe = FLUX3DPipeline.from_pretrained(out / "pipeline", device=device)
            result: EvalResult = evaluate_pipeline(
                pipe, root, out / "eval", feature=feature_name(config), assets=config.eval.assets,
                render_size=config.eval.render_size, turntable_frames=config.eval.turntable_frames,
                progress=progress,
            )  # fmt: skip
            record.setdefault("metrics", {})["eval"] = result.metrics
            done(stage, time.perf_counter() - start, **result.files)
    return record
