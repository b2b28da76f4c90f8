"""sparse3d: composable sparse-3D building blocks for PyTorch.

Importing sparse3d never initialises CUDA and never imports optional backends.
"""

from sparse3d import functional
from sparse3d.tensor import SparseTensor

__version__ = "0.1.0"

__all__ = ["SparseTensor", "functional", "__version__"]
