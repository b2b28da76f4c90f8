"""Train FLUX3D end to end, or one stage: procedural data -> DA-SLAT features -> Gaussian decoder -> SMDiT ->
pipeline -> evaluation on held-out assets (from seeds never used in training).

    python recipes/flux3d/train.py                                   # the toy preset, all stages, on the CPU
    python recipes/flux3d/train.py --preset small --device cuda      # one H200, ~20 minutes
    python recipes/flux3d/train.py --stage decoder --out out/toy --resume
    python recipes/flux3d/train.py --set decoder.optim.lr=1e-3 --set smdit.model.dim=128

Every stage reads the folders the earlier ones wrote in ``--out`` (layout: ``recipes/flux3d/recipe.py``);
the engine's runs checkpoint and ``--resume`` continues them exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.cli import add_common_args, config_from_args, resolve_device, run_main  # noqa: E402
from recipes.flux3d.recipe import STAGES, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Command line of the recipe; returns the run record (``recipe.json``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--stage", nargs="+", default=["all"], choices=["all", *STAGES],
        help="stages to run, in pipeline order; 'all' runs every one",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: out/<preset>)")
    parser.add_argument(
        "--data", type=Path, default=None, help="use this prepared dataset instead of OUT/data"
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted stage runs exactly")
    parser.add_argument("--overwrite", action="store_true", help="start the stage runs again over old ones")
    add_common_args(parser)
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    device = resolve_device(parser, args.device)
    stages = list(STAGES) if "all" in args.stage else [s for s in STAGES if s in args.stage]
    out = args.out or Path("out") / config.name
    return run_main(
        lambda: run(
            config, out, stages, device=device, data_root=args.data, resume=args.resume,
            overwrite=args.overwrite, progress=not args.quiet,
        ),
        out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
