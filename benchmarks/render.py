"""Rasterization benchmark: gsplat (CUDA) on 640k Gaussians at 512^2, the torch reference on a small
scene, and the gsplat-vs-reference agreement (forward and gradients). Prints one JSON object.

    python benchmarks/render.py                      # everything the machine supports
    python benchmarks/render.py --num-gaussians 100000 --size 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time

import torch

from sparse3d.gaussians import Gaussians, render
from sparse3d.geometry.cameras import orbit_angles, sphere_cameras


def make_scene(count: int, size: int, views: int, *, seed: int, device: torch.device, sh_degree: int = 0):
    """TRELLIS-like Gaussians (voxel-sized, inside [-0.5, 0.5]^3) and orbit cameras (radius 2, FoV 40)."""
    generator = torch.Generator().manual_seed(seed)
    gaussians = Gaussians(
        torch.rand(count, 3, generator=generator) - 0.5,
        torch.randn(count, 4, generator=generator),
        torch.exp(torch.randn(count, 3, generator=generator) * 0.3) * (0.5 / 64),
        torch.rand(count, generator=generator) * 0.8 + 0.1,
        torch.randn(count, (sh_degree + 1) ** 2, 3, generator=generator) * 0.5,
        check=False,
    ).to(device)
    yaw, pitch = orbit_angles(views, math.radians(20.0), device=device)
    viewmats, Ks = sphere_cameras(yaw, pitch, radius=2.0, fov=math.radians(40.0), image_size=size)
    return gaussians, viewmats, Ks


def leaves_of(gaussians: Gaussians, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = ("means", "quats", "scales", "opacities", "sh")
    return {name: getattr(gaussians, name).detach().to(dtype).requires_grad_(True) for name in names}


def time_cuda(function, repeats: int) -> float:
    """Median milliseconds per call, CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_host(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_gsplat(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    gaussians, viewmats, Ks = make_scene(args.num_gaussians, args.size, 1, seed=0, device=device)
    start = time.perf_counter()
    render(gaussians, viewmats, Ks, args.size, args.size, backend="gsplat")
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start

    def forward():
        with torch.no_grad():
            render(gaussians, viewmats, Ks, args.size, args.size, backend="gsplat")

    leaves = leaves_of(gaussians, torch.float32)

    def forward_backward():
        output = render(
            Gaussians(**leaves, check=False), viewmats, Ks, args.size, args.size, backend="gsplat"
        )
        (output.colors.sum() + output.alphas.sum()).backward()

    coverage = render(gaussians, viewmats, Ks, args.size, args.size, backend="gsplat").alphas.mean()
    return {
        "num_gaussians": args.num_gaussians,
        "image": [args.size, args.size],
        "first_call_s": round(first_call, 2),
        "forward_ms": round(time_cuda(forward, args.repeats), 3),
        "forward_backward_ms": round(time_cuda(forward_backward, args.repeats), 3),
        "mean_alpha": round(float(coverage), 4),
    }


def bench_reference(args: argparse.Namespace, device: torch.device) -> dict:
    gaussians, viewmats, Ks = make_scene(args.small_gaussians, args.small_size, 1, seed=1, device=device)
    gaussians = gaussians.replace(scales=gaussians.scales * 4)
    leaves = leaves_of(gaussians, torch.float32)

    def forward():
        with torch.no_grad():
            render(gaussians, viewmats, Ks, args.small_size, args.small_size, backend="torch")

    def forward_backward():
        output = render(
            Gaussians(**leaves, check=False), viewmats, Ks, args.small_size, args.small_size, backend="torch"
        )
        (output.colors.sum() + output.alphas.sum()).backward()

    repeats = max(1, args.repeats // 4)
    return {
        "device": str(device),
        "num_gaussians": args.small_gaussians,
        "image": [args.small_size, args.small_size],
        "forward_ms": round(time_host(forward, repeats), 2),
        "forward_backward_ms": round(time_host(forward_backward, repeats), 2),
    }


def agreement(args: argparse.Namespace) -> dict:
    """gsplat (float32) vs the reference (float64, same inputs) on a small multi-view scene."""
    device = torch.device("cuda")
    results = {}
    for mode in ("classic", "antialiased"):
        gaussians, viewmats, Ks = make_scene(2000, 96, 4, seed=2, device=device, sh_degree=3)
        gaussians = gaussians.replace(scales=gaussians.scales * 3)
        background = torch.tensor([0.2, 0.5, 0.9], device=device)
        weights = torch.randn(4, 96, 96, 5, generator=torch.Generator().manual_seed(0)).to(device)
        outputs, grads = {}, {}
        for backend, dtype in (("gsplat", torch.float32), ("torch", torch.float64)):
            leaves = leaves_of(gaussians, dtype)
            output = render(
                Gaussians(**leaves, check=False), viewmats, Ks, 96, 96, background,
                backend=backend, rasterize_mode=mode,
            )  # fmt: skip
            images = torch.cat([output.colors, output.alphas, output.depths * output.alphas], -1).double()
            (images * weights.double()).sum().backward()
            outputs[backend] = output
            grads[backend] = {name: leaf.grad.double() for name, leaf in leaves.items()}
        fast, slow = outputs["gsplat"], outputs["torch"]
        color_error = (fast.colors.double() - slow.colors).abs()
        mask = slow.alphas > 0.2
        results[mode] = {
            "colors_max_abs": float(color_error.max()),
            "colors_frac_gt_1e-4": float((color_error > 1e-4).double().mean()),
            "alphas_max_abs": float((fast.alphas.double() - slow.alphas).abs().max()),
            "depths_max_abs_where_alpha_gt_0.2": float(
                (fast.depths.double() - slow.depths)[mask].abs().max()
            ),
            "grad_rel_l2": {
                name: float((grads["gsplat"][name] - ref).norm() / ref.norm().clamp(min=1e-30))
                for name, ref in grads["torch"].items()
            },
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-gaussians", type=int, default=640_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small-gaussians", type=int, default=2_000)
    parser.add_argument("--small-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    have_gsplat = importlib.util.find_spec("gsplat") is not None
    if have_gsplat:
        import gsplat

        report["gsplat"] = getattr(gsplat, "__version__", "unknown")
    if torch.cuda.is_available() and have_gsplat:
        report["gsplat_rasterization"] = bench_gsplat(args)
        if not args.skip_agreement:
            report["agreement_gsplat_vs_reference"] = agreement(args)
    else:
        report["gsplat_rasterization"] = "skipped: needs CUDA and the gsplat package"
    report["reference_cpu"] = bench_reference(args, torch.device("cpu"))
    if torch.cuda.is_available():
        report["reference_cuda"] = bench_reference(args, torch.device("cuda"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
