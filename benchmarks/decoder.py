"""Gaussian decoder benchmark: forward and forward+backward of the paper-size decoder (12 x 768, K = 32) on
~20k surface voxels at 64^3, bf16 autocast on CUDA. Prints one JSON object.

    python benchmarks/decoder.py                  # CUDA, paper size, swin-8 + APE and full + RoPE
    python benchmarks/decoder.py --small          # CPU-sized: decoder_tiny on ~2k voxels at 32^3
    python benchmarks/decoder.py --voxels 40000 --batch 4

Every timed call builds a fresh SparseTensor (no cached window partition or RoPE tables), as a training
step on a new batch would.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace

import torch

from sparse3d import SparseTensor
from sparse3d.gaussians import GaussianDecoder, decoder_paper, decoder_tiny


def shell_layout(num_voxels: int, resolution: int, batch: int) -> torch.Tensor:
    """``batch`` sphere shells (one per sample, radii chosen so the total is ~``num_voxels``), ``[N, 4]``."""
    axis = torch.arange(resolution, dtype=torch.float64) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    distance = (grid - resolution / 2).norm(dim=-1)  # [R^3]
    per_sample = num_voxels // batch
    low, high = 1.0, resolution / 2 - 1.0
    for _ in range(40):  # bisection on the radius: the shell's count grows with it
        radius = (low + high) / 2
        count = int(((distance - radius).abs() <= math.sqrt(3) / 2).sum())
        low, high = (radius, high) if count < per_sample else (low, radius)
    cells = ((distance - radius).abs() <= math.sqrt(3) / 2).nonzero().squeeze(1)  # lexicographic order
    index = torch.stack(torch.unravel_index(cells, (resolution,) * 3), dim=1).int()  # [n, 3]
    parts = [
        torch.cat([torch.full((index.shape[0], 1), b, dtype=torch.int32), index], 1) for b in range(batch)
    ]
    return torch.cat(parts)  # [N, 4]


def timed(function, repeats: int, device: torch.device) -> float:
    """Median milliseconds per call after 3 warm-ups (CUDA events on CUDA, wall clock on CPU)."""
    for _ in range(3):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_variant(name, config, coords, args, device) -> dict:
    torch.manual_seed(0)
    decoder = GaussianDecoder(config).to(device)
    with torch.no_grad():
        decoder.head.linear.weight.normal_(0.0, 0.02)  # non-zero head: the backward reaches the torso
    count, batch = coords.shape[0], int(coords[-1, 0]) + 1
    feats = torch.randn(count, config.transformer.in_channels, device=device)
    resolution = config.head.resolution

    def autocast() -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fresh() -> SparseTensor:
        return SparseTensor(coords, feats, batch_size=batch, spatial_shape=resolution, check=False)

    def forward():
        with torch.no_grad(), autocast():
            return decoder(fresh())

    def forward_backward():
        with autocast():
            gaussians = decoder(fresh())
        loss = gaussians.means.sum() + gaussians.scales.sum() + gaussians.opacities.sum() + gaussians.sh.sum()
        loss = loss + gaussians.quats.sum()
        loss.backward()
        decoder.zero_grad(set_to_none=True)

    result = {
        "variant": name,
        "window": config.transformer.window,
        "position": config.transformer.position,
        "parameters_M": round(sum(p.numel() for p in decoder.parameters()) / 1e6, 2),
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    forward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["first_call_s"] = round(time.perf_counter() - start, 3)
    forward_ms = timed(forward, args.repeats, device)
    if device.type == "cuda":
        result["forward_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    backward_ms = timed(forward_backward, args.repeats, device)
    if device.type == "cuda":
        result["forward_backward_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    gaussians = count * config.head.num_gaussians
    result.update(
        forward_ms=round(forward_ms, 3),
        forward_backward_ms=round(backward_ms, 3),
        gaussians=gaussians,
        forward_gaussians_per_s=round(gaussians / (forward_ms / 1e3)),
        training_voxels_per_s=round(count / (backward_ms / 1e3)),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="decoder_tiny on CPU, ~2k voxels at 32^3")
    parser.add_argument("--voxels", type=int, default=None, help="total voxels (default 20000, 2000 small)")
    parser.add_argument("--batch", type=int, default=1, help="samples (the voxels are split among them)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20, 3 small)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --small)")
    args = parser.parse_args()
    small = args.small
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not small else "cpu"))
    args.repeats = args.repeats or (3 if small else 20)
    resolution = 32 if small else 64
    coords = shell_layout(args.voxels or (2000 if small else 20000), resolution, args.batch).to(device)
    base = decoder_tiny(resolution) if small else decoder_paper(resolution)
    full_rope = replace(base, transformer=replace(base.transformer, window=None, position="rope"))
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "resolution": resolution,
        "voxels": coords.shape[0],
        "batch": args.batch,
        "num_gaussians_per_voxel": base.head.num_gaussians,
        "results": [
            bench_variant(f"swin{base.transformer.window}-ape", base, coords, args, device),
            bench_variant("full-rope", full_rope, coords, args, device),
        ],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
