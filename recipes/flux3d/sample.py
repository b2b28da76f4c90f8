"""Image + voxel layout -> 3D Gaussians with a trained pipeline: writes ``gaussians.ply``, ``turntable.gif``
and ``grid.png`` (the input image next to generated views).

    python recipes/flux3d/sample.py --pipeline out/toy/pipeline --data out/toy/data --asset 0
    python recipes/flux3d/sample.py --pipeline out/toy/pipeline --image cond.png --layout voxels.ply

``--data DIR --asset N`` takes held-out asset ``N``'s condition view and voxel layout; ``--image`` (an RGBA
PNG, or RGB already on black) and ``--layout`` (a TRELLIS voxel PLY or a features npz) take your own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.cli import resolve_device  # noqa: E402
from recipes.flux3d.inputs import load_condition_image, load_layout, sample_to_folder  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Command line; returns what was written."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pipeline", type=Path, required=True, help="pipeline folder (OUT/pipeline of train.py)"
    )
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset, with --asset")
    parser.add_argument("--asset", type=int, default=None, help="held-out asset index, with --data")
    parser.add_argument("--view", type=int, default=0, help="condition view of --asset")
    parser.add_argument(
        "--image", type=Path, default=None, help="condition image (RGBA PNG, or RGB on black)"
    )
    parser.add_argument("--layout", type=Path, default=None, help="voxel layout (.ply or .npz), with --image")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", type=Path, default=Path("out/sample"), help="output folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.image is None):
        parser.error("expected either --data with --asset, or --image with --layout")
    if args.image is not None and args.layout is None:
        parser.error("--layout: expected a voxel layout file with --image")
    if args.data is not None and args.asset is None:
        parser.error("--asset: expected a held-out asset index with --data")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")
    device = resolve_device(parser, args.device)
    from recipes.flux3d.pipeline import FLUX3DPipeline

    try:
        pipe = FLUX3DPipeline.from_pretrained(args.pipeline, device=device)
        if args.data is not None:
            from recipes.flux3d.inputs import heldout_input

            image, layout = heldout_input(args.data, args.asset, args.view, pipe)
        else:
            image = load_condition_image(args.image, pipe.image_size)
            layout = load_layout(args.layout, pipe.resolution)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    files = sample_to_folder(
        pipe, image, layout, args.out, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    for name, path in files.items():
        print(f"  {name:10s} {path}", file=sys.stderr)
    return files


if __name__ == "__main__":
    main()
