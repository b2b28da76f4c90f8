"""Train SMDiT with rectified flow, then sample with classifier-free guidance.

    python recipes/flux3d/train.py                      # toy preset: procedural latents, ~1 min on CPU
    python recipes/flux3d/train.py --preset toy --steps 500 --out out/toy
    python recipes/flux3d/train.py --data data/proc     # a prepared dataset (DA-SLAT features on disk)

Without ``--data`` every preset trains on procedural voxel latents generated in memory
(`recipes/flux3d/toy.py`), so the run needs no weights and no data set. Writes ``metrics.json`` (loss curve
and sampling error), ``loss.png`` when matplotlib is installed, ``model.safetensors`` and ``config.json`` (the
config and the data's encoding options, read by ``sample.py``).

Training on a prepared dataset (``procedural.py`` then ``prepare.py``, or a TRELLIS-layout folder):

- ``--data DIR``: the dataset folder. Each step draws ``batch_size`` assets from a seeded shuffle (epochs
  over the training assets; missing or corrupt assets are skipped, counted, and warned about once per
  epoch); the voxel latent is ``mu + sigma * eps`` with fresh seeded ``eps`` (``mu`` when the features
  have no std, as for ``rgb``); the condition image is one random ``renders_cond`` view, encoded by the
  extractor the features were built with and zero-padded to a multiple of the image patch size. The last
  asset is held out for the guided-sampling check (conditioned on its first condition view).
- ``--feature NAME``: the ``features/NAME`` folder (default: the only one present).
- ``--extractor NAME``: the extractor that built it (default: told by the folder name, as ``prepare.py``
  names it: ``rgb``, ``flux_vae``, ``sdxl_vae``, ``dinov2``).
- ``--weights PATH``: local weights of the ``flux-vae``, ``sdxl-vae`` or ``dinov2`` extractor.
- ``--pool N``: average pooling of the ``rgb`` extractor; ``--image-size S``: resize condition images.

The model's ``latent_channels`` (channels of ``mu``), ``image_channels`` (the extractor's) and the
voxel ``resolution`` come from the data and replace the preset's values (listed under ``data.overrides``
in the printed summary and ``metrics.json``). ``--sample-steps`` overrides the preset's Euler steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sparse3d.flow as flow  # noqa: E402
from recipes.flux3d.conditioning import (  # noqa: E402
    ConditionEncoder,
    extractor_for_feature,
    find_feature_folder,
)
from recipes.flux3d.configs import PRESETS, TrainConfig  # noqa: E402
from recipes.flux3d.data import AssetBatch, AssetDataset, AssetItem, collate_assets  # noqa: E402
from recipes.flux3d.model import SMDiT  # noqa: E402
from recipes.flux3d.prepare import EXTRACTORS, build_extractor  # noqa: E402
from recipes.flux3d.toy import toy_batch  # noqa: E402
from sparse3d import SparseTensor  # noqa: E402
from sparse3d.geometry import reparameterize  # noqa: E402

__all__ = ["PreparedData", "AssetStream", "open_prepared", "adapt_config", "draw_latent", "train", "main"]


@dataclass
class PreparedData:
    """A prepared dataset opened for training.

    Built by [`open_prepared`][recipes.flux3d.train.open_prepared].

    Attributes:
        dataset: The reader (one random condition view per item).
        feature_name: The ``features/<name>`` folder read.
        extractor_name: The extractor that built the features (and encodes the condition images).
        encoder: Condition-image encoder.
        train_indices: Dataset indices of the training assets.
        heldout_index: Dataset index of the asset held out for the sampling check.
        resolution: Voxel grid resolution ``R`` of the features.
        latent_channels: Channels ``C`` of ``mu``.
        has_std: Whether the features store ``sigma`` (the latent is then ``mu + sigma * eps``).
        overrides: Preset values replaced by the data's, name -> ``[preset, data]`` (set by
            [`adapt_config`][recipes.flux3d.train.adapt_config]).
    """

    dataset: AssetDataset
    feature_name: str
    extractor_name: str
    encoder: ConditionEncoder
    train_indices: list[int]
    heldout_index: int
    resolution: int
    latent_channels: int
    has_std: bool
    overrides: dict[str, list] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready description of the data (for the printed summary and ``metrics.json``)."""
        return {
            "root": str(self.dataset.root),
            "feature": self.feature_name,
            "extractor": self.extractor_name,
            "latent": "mu + sigma * eps" if self.has_std else "mu (the features store no sigma)",
            "train_assets": len(self.train_indices),
            "heldout_asset": self.dataset.assets[self.heldout_index],
            "resolution": self.resolution,
            "latent_channels": self.latent_channels,
            "image_channels": self.encoder.channels,
            "skipped_assets": self.dataset.num_skipped,
            "skipped": dict(list(self.dataset.skipped.items())[:10]),  # the first ten
            "overrides": self.overrides,
        }


def open_prepared(
    root: str | Path,
    feature_name: str | None = None,
    *,
    extractor: str | None = None,
    weights: str | None = None,
    pool: int = 1,
    image_size: int | None = None,
    image_patch: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PreparedData:
    """Opens a prepared dataset folder: picks the features, builds their extractor, holds out the last asset.

    Args:
        root: Dataset folder with ``features/<name>/*.npz`` (from ``prepare.py``).
        feature_name: Feature folder (default: the only one present).
        extractor: Extractor name (default: told by ``feature_name``).
        weights: Local weights of a ``flux-vae``, ``sdxl-vae`` or ``dinov2`` extractor.
        pool: Average pooling of the ``rgb`` extractor.
        image_size: Resize condition images to this side (default: as stored).
        image_patch: SMDiT's image patch size (the encoded images are padded to a multiple of it).
        seed: Seed of the condition-view draws.
        device: Device of the extractor.

    Returns:
        A [`PreparedData`][recipes.flux3d.train.PreparedData].

    Raises:
        FileNotFoundError: No such folder or no feature folders (the message lists what exists).
        ValueError: Fewer than two readable assets, or features whose channels disagree with the extractor.
    """
    feature_name = find_feature_folder(root, feature_name)
    extractor_name = extractor_for_feature(feature_name, extractor)
    if pool != 1 and extractor_name != "rgb":
        raise ValueError(f"pool: only the rgb extractor pools, got pool={pool} with {extractor_name!r}")
    dataset = AssetDataset(
        root, feature_name, cond_views=1, image_size=image_size, random_views=True, seed=seed
    )
    if len(dataset) < 2:
        raise ValueError(
            f"data: expected at least 2 assets with features/{feature_name} in {root} (one is held out for "
            f"the sampling check), got {len(dataset)}"
        )
    # Hold out the last readable asset; a probe that fails is counted by the reader as skipped.
    heldout_index, item = len(dataset) - 1, None
    while heldout_index >= 0 and (item := dataset[heldout_index]) is None:
        heldout_index -= 1
    if item is None or heldout_index == 0:
        raise ValueError(
            f"data: expected at least 2 readable assets in {root} (features/{feature_name}), got "
            f"{len(dataset) - dataset.num_skipped}; skipped: {dataset.skipped}"
        )
    encoder = ConditionEncoder(
        build_extractor(extractor_name, weights, pool=pool, device=device), image_patch
    )
    channels = int(item.mean.shape[1])
    if channels != encoder.channels:  # DA-SLAT features are projected extractor maps
        raise ValueError(
            f"extractor: {extractor_name!r} gives {encoder.channels} channels but features/{feature_name} "
            f"has {channels}; pass the --extractor that built it"
        )
    return PreparedData(
        dataset=dataset,
        feature_name=feature_name,
        extractor_name=extractor_name,
        encoder=encoder,
        train_indices=list(range(heldout_index)) + list(range(heldout_index + 1, len(dataset))),
        heldout_index=heldout_index,
        resolution=int(item.resolution),
        latent_channels=channels,
        has_std=item.std is not None,
    )


def adapt_config(config: TrainConfig, data: PreparedData) -> TrainConfig:
    """Replaces the preset's channel counts and resolution by the data's.

    The changed values are recorded in ``data.overrides`` (name -> ``[preset, data]``).

    Args:
        config: The preset (with command-line overrides).
        data: The opened dataset.

    Returns:
        The config with ``model.latent_channels``, ``model.image_channels`` and ``resolution`` from the data.

    Raises:
        ValueError: The resolution is not divisible by the structured patchification factor.
    """
    patch = config.model.voxel_patch
    if data.resolution % patch:
        raise ValueError(
            f"data: expected a voxel resolution divisible by voxel_patch = {patch} (structured "
            f"patchification), got {data.resolution}; prepare the features with an even --resolution"
        )
    model = dataclasses.replace(
        config.model, latent_channels=data.latent_channels, image_channels=data.encoder.channels
    )
    new = dataclasses.replace(config, model=model, resolution=data.resolution)
    data.overrides = {
        name: [before, after]
        for name, before, after in (
            ("model.latent_channels", config.model.latent_channels, model.latent_channels),
            ("model.image_channels", config.model.image_channels, model.image_channels),
            ("resolution", config.resolution, new.resolution),
        )
        if before != after
    }
    return new


class AssetStream:
    """Endless batches of training assets: a seeded permutation per epoch, skipped assets counted.

    A batch is the next ``batch_size`` readable assets of the stream of epochs (it may straddle two epochs).
    At each epoch's end the reader's ``end_epoch`` warns once about that epoch's skipped assets.

    Args:
        dataset: The reader.
        indices: Dataset indices to draw from.
        batch_size: Assets per batch.
        generator: CPU generator of the permutations.
    """

    def __init__(
        self, dataset: AssetDataset, indices: Sequence[int], batch_size: int, generator: torch.Generator
    ) -> None:
        if not indices:
            raise ValueError("indices: expected at least one asset index, got none")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.dataset = dataset
        self.indices = list(indices)
        self.batch_size = batch_size
        self.generator = generator
        self.epochs = 0
        self._order: list[int] = []
        self._position = 0
        self._good_in_epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        permutation = torch.randperm(len(self.indices), generator=self.generator).tolist()
        self._order = [self.indices[i] for i in permutation]
        self._position = 0
        self._good_in_epoch = 0

    def end_epoch(self) -> int:
        """Closes the current epoch in the reader (one skip warning) and starts a new permutation."""
        if self._good_in_epoch == 0 and self._position == len(self._order):
            raise RuntimeError(
                f"data: every one of the {len(self._order)} training assets was skipped in an epoch; "
                f"first reasons: {dict(list(self.dataset.skipped.items())[:3])}"
            )
        count = self.dataset.end_epoch()
        self.epochs += 1
        self._new_epoch()
        return count

    def next_items(self) -> list[AssetItem]:
        """The next ``batch_size`` readable items."""
        items = []
        while len(items) < self.batch_size:
            if self._position == len(self._order):
                self.end_epoch()
            item = self.dataset[self._order[self._position]]
            self._position += 1
            if item is not None:
                self._good_in_epoch += 1
                items.append(item)
        return items

    def __next__(self) -> AssetBatch:
        """The next collated batch (``B = batch_size``)."""
        return collate_assets(self.next_items())

    def __iter__(self) -> AssetStream:
        return self


def draw_latent(volume: SparseTensor, has_std: bool, generator: torch.Generator) -> SparseTensor:
    """The training latent of a collated batch: ``mu + sigma * eps`` (fresh ``eps``) or ``mu``.

    Args:
        volume: SparseTensor with feats ``[N, 2C] = cat(mu, sigma)`` if ``has_std``, else ``[N, C] = mu``.
        has_std: Whether the feats hold ``sigma``.
        generator: Generator of ``eps`` (on the volume's device).

    Returns:
        SparseTensor on the same layout with feats ``[N, C]``.
    """
    if not has_std:
        return volume
    feats = volume.feats
    if feats.dim() != 2 or feats.shape[1] % 2:
        raise ValueError(f"volume: expected feats [N, 2C] = cat(mu, sigma), got {list(feats.shape)}")
    mean, std = feats.chunk(2, dim=1)  # [N, C] each
    return volume.replace(reparameterize(mean, std, generator))


def _heldout(data: PreparedData, device: torch.device) -> tuple[SparseTensor, torch.Tensor]:
    """The held-out asset's ``mu`` volume (feats ``[N, C]``) and its first condition view, encoded
    ``[1, C, h, w]`` (a fixed view, so the check is comparable across runs)."""
    reader = data.dataset
    item = AssetDataset(
        reader.root,
        reader.feature_name,
        cond_views=1,
        image_size=reader.image_size,
        assets=[reader.assets[data.heldout_index]],
    )[0]
    if item is None:
        raise RuntimeError(f"data: the held-out asset became unreadable: {reader.assets[data.heldout_index]}")
    batch = collate_assets([item])
    mean = batch.latents.replace(batch.latents.feats[:, : data.latent_channels])  # feats [N, C] = mu
    return mean.to(device), data.encoder(batch.cond_images[:, 0].to(device))


def train(config: TrainConfig, out_dir: Path, device: torch.device, data: PreparedData | None = None) -> dict:
    """Runs the training loop and a guided sampling check; returns the metrics written to ``out_dir``.

    Args:
        config: Hyperparameters (with ``data``: adapted by
            [`adapt_config`][recipes.flux3d.train.adapt_config]).
        out_dir: Output folder (``metrics.json``, ``model.safetensors``, ``loss.png``).
        device: Device of the model.
        data: A prepared dataset to train on; ``None`` trains on in-memory procedural latents.

    Returns:
        The metrics (also written to ``out_dir / "metrics.json"``).
    """
    torch.manual_seed(config.seed)
    data_generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator().manual_seed(config.seed + 1)
    model = SMDiT(config.model).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    path = flow.LinearPath()
    sampler = flow.TimeSampler(distribution="logit_normal", mean=config.time_mean, std=config.time_std)
    channels = config.model.latent_channels
    stream = None
    if data is not None:
        expected = (data.latent_channels, data.encoder.channels)
        if (config.model.latent_channels, config.model.image_channels) != expected:
            raise ValueError(
                f"config: expected model latent/image channels {expected} (the data's; use adapt_config), "
                f"got {(config.model.latent_channels, config.model.image_channels)}"
            )
        stream = AssetStream(
            data.dataset,
            data.train_indices,
            config.batch_size,
            torch.Generator().manual_seed(config.seed + 2),
        )
        latent_generator = torch.Generator().manual_seed(config.seed + 3)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train", unit="step")
    for step in bar:
        if stream is None:
            batch = toy_batch(config.batch_size, config.resolution, channels, generator=data_generator)
            x0 = batch.latents.to(device)
            images = batch.images
        else:
            assets = next(stream)
            x0 = draw_latent(assets.latents, data.has_std, latent_generator).to(device)  # feats [N, C]
            images = data.encoder(assets.cond_images[:, 0].to(device))  # [B, C_img, h, w]
        image = flow.drop_condition(images, config.condition_dropout, generator=data_generator).condition.to(
            device
        )
        t = sampler(config.batch_size, generator=noise_generator).to(device)
        sample = path.sample(x0, t, noise=flow.noise_like(x0, generator=noise_generator).to(device))
        prediction = model(sample.x_t, sample.t, image)
        loss = flow.flow_matching_loss(prediction, sample.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-config.log_every :]) / len(losses[-config.log_every :]):.4f}")
    train_seconds = time.perf_counter() - start
    if data is not None:
        data.dataset.end_epoch()  # report the skips of the last (partial) epoch

    # Guided sampling on unseen assets: how far are generated latents from the truth, vs the unguided
    # prior's error (the data's mean square; ~0.5 for the toy latents)? With --data: the held-out asset's mu.
    model.eval()
    if data is None:
        check = toy_batch(
            2, config.resolution, channels, generator=torch.Generator().manual_seed(config.seed + 99)
        )
        x0 = check.latents.to(device)
        image = check.images.to(device)
    else:
        x0, image = _heldout(data, device)
    velocity = flow.ClassifierFreeGuidance(
        model, config.guidance, condition={"image": image}, null_condition={"image": torch.zeros_like(image)}
    )
    with torch.no_grad():
        result = flow.generate(
            velocity,
            x0,
            flow.time_grid(config.sample_steps, device=device),
            generator=torch.Generator().manual_seed(config.seed + 7),
            progress=True,
        )
    sample_mse = float((result.sample - x0).feats.square().mean())
    data_variance = float(x0.feats.square().mean())

    window = max(1, min(20, len(losses) // 5))
    metrics = {
        "preset_config": dataclasses.asdict(config),
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": config.steps,
        "train_seconds": round(train_seconds, 2),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "sample_mse": sample_mse,
        "data_mean_square": data_variance,
        "losses": losses,
    }
    if data is not None:
        metrics["data"] = {**data.summary(), "epochs": stream.epochs + 1}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
        out_dir / "model.safetensors",
    )
    # What sample.py needs to rebuild the model and encode condition images the same way.
    saved_config = {"train_config": dataclasses.asdict(config), "data": None}
    if data is not None:
        saved_config["data"] = {
            "feature": data.feature_name,
            "extractor": data.extractor_name,
            "pool": int(getattr(data.encoder.extractor, "pool", 1)),
            "image_size": data.dataset.image_size,
            "resolution": data.resolution,
            "has_std": data.has_std,
        }
    (out_dir / "config.json").write_text(json.dumps(saved_config, indent=1))
    _plot(losses, out_dir / "loss.png")
    return metrics


def _plot(losses: list[float], path: Path) -> None:
    """Writes the loss curve as a PNG when matplotlib is available (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring); returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=None, help="override the preset's Euler steps")
    parser.add_argument("--out", type=Path, default=Path("out/flux3d"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group = parser.add_argument_group("prepared dataset")
    group.add_argument("--data", type=Path, default=None, help="train on this prepared dataset folder")
    group.add_argument("--feature", default=None, help="features/<NAME> folder (default: the only one)")
    group.add_argument(
        "--extractor", choices=EXTRACTORS, default=None, help="extractor of the features (default: by name)"
    )
    group.add_argument("--weights", default=None, help="local weights of flux-vae, sdxl-vae or dinov2")
    group.add_argument("--pool", type=int, default=None, help="average pooling of the rgb extractor (1)")
    group.add_argument("--image-size", type=int, default=None, help="resize condition images to this side")
    args = parser.parse_args(argv)
    data_flags = {
        "--feature": args.feature,
        "--extractor": args.extractor,
        "--weights": args.weights,
        "--pool": args.pool,
        "--image-size": args.image_size,
    }
    if args.data is None and any(value is not None for value in data_flags.values()):
        given = [name for name, value in data_flags.items() if value is not None]
        parser.error(f"{', '.join(given)}: only meaningful with --data DIR")
    config = PRESETS[args.preset]()
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sample_steps": args.sample_steps,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    device = torch.device(args.device)
    data = None
    if args.data is not None:
        data = open_prepared(
            args.data,
            args.feature,
            extractor=args.extractor,
            weights=args.weights,
            pool=1 if args.pool is None else args.pool,
            image_size=args.image_size,
            image_patch=config.model.image_patch,
            seed=config.seed,
            device=device,
        )
        config = adapt_config(config, data)
        changes = ", ".join(f"{name} {a} -> {b}" for name, (a, b) in data.overrides.items()) or "none"
        print(
            f"data: {args.data} features/{data.feature_name} ({data.extractor_name}), "
            f"{len(data.train_indices)} training assets + 1 held out; preset {args.preset!r} overridden "
            f"from the data: {changes}",
            file=sys.stderr,
        )
    metrics = train(config, args.out, device, data=data)
    summary = {k: v for k, v in metrics.items() if k not in ("losses", "preset_config")}
    print(json.dumps(summary, indent=1))
    return metrics


if __name__ == "__main__":
    main()
