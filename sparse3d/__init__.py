"""sparse3d: composable sparse-3D building blocks for PyTorch.

Importing sparse3d never initialises CUDA and never imports optional backends.
"""

from sparse3d import functional
from sparse3d.tensor import SparseTensor

# isort: split
from sparse3d import flow, gaussians, geometry, nn  # after functional and tensor, which they build on

__version__ = "0.1.0"

__all__ = ["SparseTensor", "flow", "functional", "gaussians", "geometry", "nn", "__version__"]
