"""Importing sparse3d is cheap and side-effect free: no CUDA initialisation, no optional heavy packages."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["diffusers", "transformers", "gsplat", "spconv", "torchsparse"]

_PROBE = """
import json, sys
import torch
import sparse3d
import sparse3d.functional
import sparse3d.kernels
import sparse3d.nn
cuda_after_import = torch.cuda.is_initialized()
# Building and using a CPU tensor must not touch CUDA either.
x = sparse3d.SparseTensor(torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]]), torch.ones(2, 3))
x.canonical().to_dense()
sparse3d.functional.unique_coords(x.coords, x.feats, "mean")
print(json.dumps({
    "cuda_initialized": cuda_after_import or torch.cuda.is_initialized(),
    "loaded": sorted(name for name in sys.modules if name.split(".")[0] in HEAVY),
    "exports": sorted(sparse3d.__all__),
}))
"""


def _probe() -> dict:
    code = f"HEAVY = {HEAVY!r}\n{_PROBE}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_does_not_initialise_cuda_or_load_heavy_packages():
    report = _probe()
    assert report["cuda_initialized"] is False
    assert report["loaded"] == [], f"importing sparse3d loaded {report['loaded']}"
    assert {"SparseTensor", "functional"} <= set(report["exports"])


def test_public_names_resolve():
    import sparse3d
    import sparse3d.functional as functional
    import sparse3d.functional.coords as coords

    for module in (sparse3d, functional, coords):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ lists {name!r}, which is missing"
    assert set(coords.__all__) <= set(functional.__all__)
