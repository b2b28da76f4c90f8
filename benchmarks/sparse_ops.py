"""Benchmark of the core sparse ops on surface-like layouts; prints one JSON document to stdout.

Times kernel-map build, downsample/upsample, patchify and submanifold 3^3 convolution (forward and
forward+backward), with GB/s for the memory-bound ops and, on CUDA, the card's copy bandwidth and
spconv-triton's ``SubMConv3d`` on the same layout when installed.

    python benchmarks/sparse_ops.py                                   # CPU, small, < 2 minutes
    python benchmarks/sparse_ops.py --device cuda --sizes 64 256 --channels 16 64 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import sparse3d.functional.conv as conv_module
from sparse3d import SparseTensor
from sparse3d.functional.conv import sparse_conv3d
from sparse3d.functional.coords import invert_kernel_map, kernel_map

__all__ = ["surface_layout", "main"]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------------------------- layouts


def surface_layout(resolution: int, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """Surface-like voxels: per sample a sphere shell and a torus with random placement, one voxel thick.

    Args:
        resolution: Grid size ``R`` (the layout lives in ``R^3``).
        batch_size: Number of samples ``B``.
        seed: Random seed of the shapes.
        device: Device of the result.

    Returns:
        int32 ``[N, 4]`` (batch, x, y, z) in canonical order; about ``4.3 R^2`` voxels per sample.
    """
    generator = torch.Generator().manual_seed(seed)
    band = math.sqrt(3) / 2  # cells whose centre is within half a diagonal of the surface
    axis = torch.arange(resolution, device=device, dtype=torch.float32) + 0.5
    samples = []
    for b in range(batch_size):
        params = torch.rand(8, generator=generator).tolist()
        sphere_centre = torch.tensor(params[:3], device=device) * 0.2 * resolution + 0.4 * resolution
        sphere_radius = (0.25 + 0.1 * params[3]) * resolution
        torus_centre = torch.tensor(params[4:7], device=device) * 0.2 * resolution + 0.4 * resolution
        major, minor = (0.25 + 0.05 * params[7]) * resolution, 0.08 * resolution
        cells = []
        for x0 in range(0, resolution, 32):  # x slabs bound the memory of the distance fields
            xs = axis[x0 : x0 + 32]
            grid = torch.stack(torch.meshgrid(xs, axis, axis, indexing="ij"), dim=-1)  # [s, R, R, 3]
            sphere = ((grid - sphere_centre).norm(dim=-1) - sphere_radius).abs() <= band
            rel = grid - torus_centre
            ring = (rel[..., :2].norm(dim=-1) - major).hypot(rel[..., 2])
            torus = (ring - minor).abs() <= band
            found = (sphere | torus).nonzero().int()  # [n, 3]
            found[:, 0] += x0
            cells.append(found)
        coords = torch.cat(cells)
        samples.append(torch.cat([torch.full_like(coords[:, :1], b), coords], dim=1))
    return torch.cat(samples)


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of a callable: CUDA events on CUDA, ``time.perf_counter`` on CPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds (median over ``repeats`` after ``warmup`` calls)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a large device-to-device ``copy_`` (bytes read + written)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    ms = timer(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def _fresh(x: SparseTensor) -> SparseTensor:
    """Same layout without its cache (so layout work is timed, not memoised)."""
    return SparseTensor._from_parts(x.coords, x.feats, x.offsets, x.batch_size, x.spatial_shape, x.stride)


# ---------------------------------------------------------------------------------------------- cases


def _pooling_ops() -> tuple[Any, Any, Any] | str:
    try:
        from sparse3d.functional.pooling import downsample, patchify, upsample
    except ImportError as error:
        return f"sparse3d.functional.pooling not importable: {error}"
    return downsample, upsample, patchify


def _spconv_module() -> Any | None:
    try:
        import spconv_triton.pytorch as spconv  # type: ignore[import-not-found]
    except ImportError:
        return None
    return spconv


def bench_layout(
    x: SparseTensor, channels: int, dtype: torch.dtype, timer: Timer, args: argparse.Namespace
) -> list[dict]:
    """All timings for one layout and channel count."""
    rows: list[dict] = []
    device = x.device
    n = x.num_voxels
    elt = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator(device=device).manual_seed(0)
    feats = torch.randn(n, channels, device=device, dtype=dtype, generator=generator)
    x = x.replace(feats)

    def add(op: str, ms: float, bytes_moved: float | None = None, flops: float | None = None, **extra: Any):
        row = {"op": op, "num_voxels": n, "channels": channels, "median_ms": round(ms, 4)}
        if bytes_moved is not None:
            row["GBps"] = round(bytes_moved / ms / 1e6, 1)
        if flops is not None:
            row["TFLOPs"] = round(flops / ms / 1e9, 2)
        row.update(extra)
        rows.append(row)

    # Kernel map (3^3 submanifold), from scratch: key sort + 27 searchsorted lookups; and its inverse.
    kmap = kernel_map(x.coords, x.coords, 3)
    add("kernel_map_3x3x3_build", timer(lambda: kernel_map(x.coords, x.coords, 3)), n * 27 * 8 + n * 16)
    add("invert_kernel_map", timer(lambda: invert_kernel_map(kmap, n)), 2 * n * 27 * 8)
    neighbours = float((kmap >= 0).sum()) / max(n, 1)

    pooling = _pooling_ops()
    if isinstance(pooling, str):
        rows.append({"op": "pooling", "skipped": pooling})
    else:
        downsample, upsample, patchify = pooling
        coarse, child_to_parent = downsample(x, 2, reduce="mean")
        m = coarse.num_voxels
        # Bytes model: features read + written, plus the int64 child->parent map read.
        pool_bytes = (n + m) * channels * elt + n * 8
        add("downsample_mean_cold", timer(lambda: downsample(_fresh(x), 2, reduce="mean")), pool_bytes)
        add("downsample_mean_warm", timer(lambda: downsample(x, 2, reduce="mean")), pool_bytes)
        add("upsample_nearest", timer(lambda: upsample(coarse, x, child_to_parent)), pool_bytes)
        # patchify writes [M, 8 * C] (zeros for empty children).
        add("patchify_2", timer(lambda: patchify(x, 2)), n * channels * elt + m * 8 * channels * elt + n * 8)

    # Submanifold conv 3^3, C -> C, maps cached on the layout (the build is timed above).
    weight = torch.randn(27, channels, channels, device=device, dtype=dtype, generator=generator) / math.sqrt(
        27 * channels
    )
    gemm_flops = 2 * n * 27 * channels * channels
    with torch.no_grad():
        add(
            "subm_conv3_fwd", timer(lambda: sparse_conv3d(x, weight)), flops=gemm_flops, neighbours=neighbours
        )
    leaf = feats.clone().requires_grad_(True)
    weight_leaf = weight.clone().requires_grad_(True)
    upstream = torch.randn_like(feats)

    def fwd_bwd() -> None:
        y = sparse_conv3d(x.replace(leaf), weight_leaf)
        torch.autograd.backward(y.feats, upstream)

    add("subm_conv3_fwd_bwd", timer(fwd_bwd), flops=3 * gemm_flops)

    if args.compile and device.type == "cuda":
        try:
            rows.extend(_bench_compiled(x, weight, leaf, weight_leaf, upstream, timer, gemm_flops))
        except Exception as error:  # torch.compile is an experiment here: report, do not abort the run
            rows.append({"op": "subm_conv3_compiled", "error": f"{type(error).__name__}: {str(error)[:200]}"})

    spconv = _spconv_module() if device.type == "cuda" else None
    if device.type == "cuda" and spconv is None:
        rows.append({"op": "spconv_triton", "skipped": "spconv_triton not importable"})
    if spconv is not None:
        rows.extend(_bench_spconv(spconv, x, weight, leaf, upstream, timer, gemm_flops))
    return rows


def _bench_compiled(x, weight, leaf, weight_leaf, upstream, timer, gemm_flops) -> list[dict]:
    """Same conv with the gather-GEMM helpers under ``torch.compile`` (an experiment, not a library path)."""
    eager_gather, eager_grad = conv_module._gather_gemm, conv_module._weight_grad
    with torch.no_grad():
        reference = sparse_conv3d(x, weight).feats
    try:
        conv_module._gather_gemm = torch.compile(eager_gather, dynamic=False)
        conv_module._weight_grad = torch.compile(eager_grad, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            compiled = sparse_conv3d(x, weight).feats
        first_call_s = time.perf_counter() - start
        with torch.no_grad():
            fwd = timer(lambda: sparse_conv3d(x, weight))

        def fwd_bwd() -> None:
            y = sparse_conv3d(x.replace(leaf), weight_leaf)
            torch.autograd.backward(y.feats, upstream)

        both = timer(fwd_bwd)
    finally:
        conv_module._gather_gemm, conv_module._weight_grad = eager_gather, eager_grad
    base = {"num_voxels": x.num_voxels, "channels": x.feats.shape[1]}
    equal = bool(torch.equal(compiled, reference))
    return [
        {**base, "op": "subm_conv3_fwd_compiled", "median_ms": round(fwd, 4),
         "first_call_s": round(first_call_s, 2), "bitwise_equal_to_eager": equal,
         "TFLOPs": round(gemm_flops / fwd / 1e9, 2)},
        {**base, "op": "subm_conv3_fwd_bwd_compiled", "median_ms": round(both, 4),
         "TFLOPs": round(3 * gemm_flops / both / 1e9, 2)},
    ]  # fmt: skip


def _bench_spconv(spconv, x, weight, leaf, upstream, timer, gemm_flops) -> list[dict]:
    """spconv-triton ``SubMConv3d`` on the same layout and weights (pairs cached by ``indice_key``)."""
    channels = x.feats.shape[1]
    module = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="subm0").to(x.device, x.dtype)
    with torch.no_grad():
        module.weight.copy_(weight.reshape(3, 3, 3, channels, channels).permute(4, 0, 1, 2, 3))
    tensor = spconv.SparseConvTensor(x.feats, x.coords, list(x.spatial_shape), x.batch_size)
    with torch.no_grad():
        warm = module(tensor)  # builds the pairs once
    pairs = warm.indice_dict

    def make(feats: torch.Tensor):
        return spconv.SparseConvTensor(
            feats, x.coords, list(x.spatial_shape), x.batch_size, indice_dict=pairs
        )

    with torch.no_grad():
        ours = sparse_conv3d(x, weight).feats
        error = float((warm.features.float() - ours.float()).abs().max())
        fwd = timer(lambda: module(make(x.feats)))

    def fwd_bwd() -> None:
        y = module(make(leaf))
        torch.autograd.backward(y.features, upstream)

    both = timer(fwd_bwd)
    base = {"num_voxels": x.num_voxels, "channels": channels}
    return [
        {**base, "op": "spconv_triton_subm_fwd", "median_ms": round(fwd, 4), "max_abs_diff_vs_ours": error,
         "TFLOPs": round(gemm_flops / fwd / 1e9, 2)},
        {**base, "op": "spconv_triton_subm_fwd_bwd", "median_ms": round(both, 4),
         "TFLOPs": round(3 * gemm_flops / both / 1e9, 2)},
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, runs every case and prints (and returns) the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="grid resolutions (cpu: 48; cuda: 64 256)"
    )
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch-size", type=int, default=None, help="samples per layout (cpu: 2; cuda: 4)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cpu: float32; cuda: float16")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd gather-GEMM (CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([64, 256] if cuda else [48])
    batch_size = args.batch_size or (4 if cuda else 2)
    dtype = _DTYPES[args.dtype or ("float16" if cuda else "float32")]
    timer = Timer(device, args.warmup if args.warmup is not None else (5 if cuda else 1),
                  args.repeats if args.repeats is not None else (20 if cuda else 3))  # fmt: skip

    report: dict[str, Any] = {
        "benchmark": "sparse_ops",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "timer": {"warmup": timer.warmup, "repeats": timer.repeats, "statistic": "median"},
        "bytes_model": "features read + written (+ int64 index maps); kernel map: queries + results",
        "flops_model": "dense-equivalent 2*N*27*C_in*C_out per GEMM (fwd 1 GEMM, fwd+bwd 3)",
        "results": [],
    }
    if cuda:
        report["copy_bandwidth_GBps"] = round(copy_bandwidth(device, timer), 1)
    for resolution in sizes:
        coords = surface_layout(resolution, batch_size, seed=resolution, device=device)
        layout = SparseTensor(
            coords,
            torch.empty(coords.shape[0], 0, device=device),
            batch_size=batch_size,
            spatial_shape=resolution,
        )
        for channels in args.channels:
            for row in bench_layout(layout, channels, dtype, timer, args):
                report["results"].append({"resolution": resolution, **row})
            if cuda:
                torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
