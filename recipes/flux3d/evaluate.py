"""Score a trained pipeline on the held-out assets of a prepared dataset (assets from seeds never used in
training): generated vs reconstructed vs zero-input renders, PSNR / SSIM at the dataset's cameras and from the
input image's camera; pictures per asset, a PLY and a turntable.

    python recipes/flux3d/evaluate.py --pipeline out/toy/pipeline --data out/toy/data --out out/toy/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.cli import resolve_device  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Command line; returns the metrics."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pipeline", type=Path, required=True, help="pipeline folder (OUT/pipeline of train.py)"
    )
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset with a held-out split")
    parser.add_argument(
        "--assets", type=int, default=None, help="evaluate the first N held-out assets (default all)"
    )
    parser.add_argument("--views", type=int, default=4, help="scored views per asset")
    parser.add_argument("--render-size", type=int, default=256, help="side of the scored renders")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="base noise seed (asset i uses seed + i)")
    parser.add_argument("--out", type=Path, default=Path("out/eval"), help="output folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    for flag, value in (
        ("--assets", args.assets),
        ("--views", args.views),
        ("--render-size", args.render_size),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag}: expected >= 1, got {value}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")
    device = resolve_device(parser, args.device)
    from recipes.flux3d.evaluation import evaluate_pipeline
    from recipes.flux3d.pipeline import FLUX3DPipeline

    try:
        pipe = FLUX3DPipeline.from_pretrained(args.pipeline, device=device)
        result = evaluate_pipeline(
            pipe, args.data, args.out, assets=args.assets, views=args.views, render_size=args.render_size,
            steps=args.steps, guidance=args.guidance, seed=args.seed,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps(result.metrics, indent=1), file=sys.stderr)
    for name, path in result.files.items():
        print(f"  {name:16s} {path}", file=sys.stderr)
    return result.metrics


if __name__ == "__main__":
    main()
