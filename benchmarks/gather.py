"""Row-gather variants for the convolution's ``cols`` buffer: which PyTorch op moves rows fastest?

    python benchmarks/gather.py --device cuda --rows 948657 --channels 64 --dtype float16

Gathers ``K = 27`` rows per output row from a ``[N + 1, C]`` table (the last row zero), the access pattern
of the gather-GEMM convolution, with ``index_select``, advanced indexing and ``F.embedding``. Prints JSON:
milliseconds (median) and effective GB/s (bytes written + read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-rows", type=int, default=150000)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows, channels, taps = args.rows, args.channels, 27
    generator = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(rows + 1, channels, device=device, dtype=dtype, generator=generator)
    chunk = min(rows, args.chunk_rows)
    index = torch.randint(0, rows + 1, (chunk, taps), device=device, generator=generator)
    flat = index.reshape(-1)
    moved = 2 * chunk * taps * channels * table.element_size()
    variants = {
        "index_select": lambda: table.index_select(0, flat),
        "advanced_indexing": lambda: table[index],
        "embedding": lambda: F.embedding(index, table),
    }
    results = []
    reference = table.index_select(0, flat).view(chunk, taps, channels)
    for name, fn in variants.items():
        same = bool(torch.equal(fn().reshape(chunk, taps, channels), reference))
        ms = _time(fn, device)
        results.append(
            {"variant": name, "ms": round(ms, 4), "GBps": round(moved / ms / 1e6, 1), "equal": same}
        )
    print(
        json.dumps(
            {
                "benchmark": "gather",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "dtype": args.dtype,
                "rows_out": chunk,
                "taps": taps,
                "channels": channels,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
