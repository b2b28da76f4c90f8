"""Build DA-SLAT features and their statistics for a dataset folder (see recipes/flux3d/features.py).

The command line lives with the library code in ``recipes.flux3d.features``; this file is its script.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.flux3d.features import main  # noqa: E402

if __name__ == "__main__":
    main()
