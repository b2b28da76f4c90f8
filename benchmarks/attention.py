"""Joint attention benchmark: every backend of sparse3d.functional.attention against the equal-length SDPA
ceiling, 16 heads x 72, forward and forward+backward. Prints one JSON document.

Usage::

    python benchmarks/attention.py                      # CUDA, bf16, full sizes
    python benchmarks/attention.py --device cpu --small  # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparse3d.functional.attention import (
    available_backends,
    interleave_index,
    joint_attention,
    select_backend,
    varlen_attention,
)

__all__ = ["main"]


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out.to(device)


def _cases(small: bool) -> dict[str, dict[str, list[int]]]:
    """Per-sample (condition, voxel) token counts of each case."""
    if small:
        totals = [16, 128, 48, 80, 32, 112, 64, 96]
        return {
            "a_equal_2x(64+16)": {"image": [16, 16], "voxel": [64, 64]},
            "b_mixed_8x(16..128)": {"image": [t // 5 for t in totals], "voxel": [t - t // 5 for t in totals]},
        }
    totals = [1024, 8192, 3072, 5120, 2048, 7168, 4096, 6144]
    return {
        "a_equal_2x(4096+1024)": {"image": [1024, 1024], "voxel": [4096, 4096]},
        # Mixed 1k..8k joint lengths; a fifth of each sample is condition tokens (as in case a).
        "b_mixed_8x(1k..8k)": {"image": [t // 5 for t in totals], "voxel": [t - t // 5 for t in totals]},
    }


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    def measure(fn: Callable[[], object], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / iters
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - begin) * 1e3 / iters

    return measure


def _pad_head_dim(tokens: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tokens, (0, width - tokens.shape[-1]))


def _run_case(
    case_name: str,
    case: dict[str, list[int]],
    *,
    randn: Callable[..., torch.Tensor],
    device: torch.device,
    heads: int,
    head_dim: int,
    backends: list[str],
    measure: Callable[[Callable[[], object], int, int], float],
    warmup: int,
    iters: int,
) -> dict[str, object]:
    """Times every backend on one case; returns the case's JSON entry."""
    scale = 1.0 / math.sqrt(head_dim)
    lengths_a, lengths_b = case["image"], case["voxel"]
    totals = [a + b for a, b in zip(lengths_a, lengths_b, strict=True)]
    num_a, num_b, batch = sum(lengths_a), sum(lengths_b), len(totals)
    max_len = max(totals)
    flops_fwd = 4 * sum(t * t for t in totals) * heads * head_dim
    offsets_a, offsets_b = _offsets(lengths_a, device), _offsets(lengths_b, device)
    tensors_a = [randn(num_a).requires_grad_(True) for _ in range(3)]
    tensors_b = [randn(num_b).requires_grad_(True) for _ in range(3)]
    equal = len(set(totals)) == 1
    auto = select_backend(tensors_a[0], tensors_a[2], equal_lengths=equal, num_segments=batch)
    case_info = {
        "case": case_name,
        "condition_tokens": lengths_a,
        "voxel_tokens": lengths_b,
        "joint_lengths": totals,
        "flops_forward": flops_fwd,
        "auto_backend": auto,
        "padding_waste_tokens": (batch * max_len - sum(totals)) / sum(totals),
        "padding_waste_flops": batch * max_len**2 / sum(t * t for t in totals) - 1.0,
        "runs": [],
    }

    def record(name: str, forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], note: str = ""):
        entry: dict[str, object] = {"name": name, "note": note}
        try:
            with torch.no_grad():
                ms = measure(forward, warmup, iters)
            entry["forward_ms"] = ms
            entry["forward_tflops"] = flops_fwd / ms / 1e9
            grad = None

            def step():
                nonlocal grad
                out = forward()
                if grad is None:
                    grad = torch.randn_like(out)
                torch.autograd.grad(out, inputs, grad)

            ms = measure(step, warmup, iters)
            entry["forward_backward_ms"] = ms
            # FLOPs of forward + backward = 3.5x forward (backward: 2.5x, the FlashAttention convention).
            entry["forward_backward_tflops"] = 3.5 * flops_fwd / ms / 1e9
        except Exception as error:  # a backend that cannot run here is reported, not fatal
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        case_info["runs"].append(entry)
        print(
            f"{case_name} {name}: {entry.get('forward_ms', entry.get('error'))}", file=sys.stderr, flush=True
        )

    # The ceiling: plain SDPA on an equal-length batch of the same token count per sample (case a's
    # shape) and on the longest sample, no varlen, no gather.
    ceiling_len = sum(totals) // batch
    for label, b, length in (("ceiling_sdpa_equal_mean_length", batch, ceiling_len),):
        q, k, v = (randn(b * length).view(b, length, heads, head_dim).requires_grad_(True) for _ in range(3))
        ceiling_flops = 4 * b * length * length * heads * head_dim

        def ceiling(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
            ).transpose(1, 2)

        start = len(case_info["runs"])
        record(label, ceiling, [q, k, v], note=f"[{b}, {length}, {heads}, {head_dim}] equal lengths")
        entry = case_info["runs"][start]
        for key in ("forward", "forward_backward"):
            if f"{key}_ms" in entry:
                factor = 1.0 if key == "forward" else 3.5
                entry[f"{key}_tflops"] = factor * ceiling_flops / entry[f"{key}_ms"] / 1e9

    # Joint attention end to end (permutation in, varlen call, permutation out), every backend.
    joint_max = max_len
    per_modality = (max(lengths_a), max(lengths_b))  # lets equal-length batches skip the permutation
    for backend in ["auto", *backends]:
        if backend == "sdpa" and not equal:
            continue
        if backend == "masked" and sum(totals) > 20000:
            continue  # the mask path materialises B * L^2 scores on the math kernel: small totals only
        record(
            f"joint/{backend}",
            lambda backend=backend: torch.cat(
                joint_attention(
                    *tensors_a, offsets_a, *tensors_b, offsets_b, backend=backend, max_seqlen=per_modality
                )
            ),
            [*tensors_a, *tensors_b],
            note="per-modality max_seqlen passed (no host sync)",
        )
    # Kernel only: tokens already in joint order (what a single-stream block sees).
    index_a, index_b, offsets_joint = interleave_index(offsets_a, offsets_b, num_a, num_b)
    joint_qkv = [randn(num_a + num_b).requires_grad_(True) for _ in range(3)]
    for backend in backends:
        if backend == "sdpa" and not equal:
            continue
        if backend == "masked" and sum(totals) > 20000:
            continue
        record(
            f"varlen/{backend}",
            lambda backend=backend: varlen_attention(
                *joint_qkv,
                offsets_joint,
                offsets_joint,
                backend=backend,
                max_seqlen_q=joint_max,
                max_seqlen_kv=joint_max,
            ),
            joint_qkv,
            note="packed joint tokens, no permutation",
        )
    # Head-dim padding for the varlen kernels: zeros appended to q, k, v (scale kept at 1/sqrt(72)).
    for backend in [b for b in ("varlen", "flash_attn", "padded") if b in backends]:
        for width in (80, 128):
            if width <= head_dim:
                continue

            def padded_dim(backend=backend, width=width):
                q, k, v = (_pad_head_dim(t, width) for t in joint_qkv)
                out = varlen_attention(
                    q,
                    k,
                    v,
                    offsets_joint,
                    offsets_joint,
                    backend=backend,
                    scale=scale,
                    max_seqlen_q=joint_max,
                    max_seqlen_kv=joint_max,
                )
                return out[..., :head_dim]

            record(
                f"varlen/{backend}/head_dim_{width}",
                padded_dim,
                joint_qkv,
                note="includes the pad copies",
            )
    return case_info


def main() -> None:
    """Runs every case and backend and prints the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the JSON document here")
    parser.add_argument(
        "--backends", nargs="*", default=None, help="subset of backends to time (default: all)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    heads, head_dim = args.heads, args.head_dim
    iters = args.iters or (20 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1
    measure = _timer(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(rows: int, width: int = head_dim) -> torch.Tensor:
        return torch.randn(rows, heads, width, device=device, dtype=dtype, generator=generator)

    backends = available_backends(device, dtype)
    if args.backends is not None:
        backends = [b for b in backends if b in args.backends]
    results = [
        _run_case(
            case_name,
            case,
            randn=randn,
            device=device,
            heads=heads,
            head_dim=head_dim,
            backends=backends,
            measure=measure,
            warmup=warmup,
            iters=iters,
        )
        for case_name, case in _cases(args.small).items()
    ]

    document = {
        "benchmark": "attention",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "heads": heads,
        "head_dim": head_dim,
        "iters": iters,
        "flops": "forward 4 * sum(L_b^2) * H * D; forward+backward 3.5x forward",
        "cases": results,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
