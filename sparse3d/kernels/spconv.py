"""Optional adapter: submanifold convolution through ``spconv_triton`` (or ``spconv``) on CUDA.

Imported lazily by [`sparse_conv3d`][sparse3d.functional.conv.sparse_conv3d] when ``backend="spconv"``;
importing this module does not import spconv. spconv's pair tables are cached on the input layout.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from sparse3d.functional.conv import weight_from_spconv, weight_to_spconv  # re-exported here

if TYPE_CHECKING:
    from sparse3d.tensor import SparseTensor

__all__ = ["submanifold_conv3d", "weight_to_spconv", "weight_from_spconv", "import_spconv"]


def import_spconv() -> ModuleType:
    """Imports ``spconv_triton.pytorch``, else ``spconv.pytorch``.

    Returns:
        The imported ``pytorch`` submodule.

    Raises:
        ImportError: Neither package is installed.
    """
    errors = []
    for name in ("spconv_triton.pytorch", "spconv.pytorch"):
        try:
            return importlib.import_module(name)
        except ImportError as error:  # try the next one
            errors.append(f"{name}: {error}")
    raise ImportError("backend 'spconv' needs spconv_triton or spconv installed; " + "; ".join(errors))


def submanifold_conv3d(
    input: SparseTensor,
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kernel_size: tuple[int, int, int],
    dilation: tuple[int, int, int],
) -> torch.Tensor:
    """Submanifold convolution with spconv's ``SubMConv3d`` (differentiable w.r.t. feats, weight, bias).

    Args:
        input: Input layout (CUDA).
        feats: ``[N, C_in]`` features (already cast for autocast).
        weight: ``[K, C_in, C_out]``.
        bias: ``[C_out]`` or None.
        kernel_size: Odd kernel size per axis.
        dilation: Dilation per axis.

    Returns:
        ``[N, C_out]`` output features on the input layout.

    Raises:
        ValueError: The input is not on CUDA.
    """
    if feats.device.type != "cuda":
        raise ValueError(
            f"input: backend 'spconv' needs CUDA tensors, got device {feats.device}; use backend='torch'"
        )
    spconv = import_spconv()
    c_in, c_out = weight.shape[1], weight.shape[2]
    key = f"sparse3d_subm_{'x'.join(map(str, kernel_size))}_d{'x'.join(map(str, dilation))}"
    pairs: dict = input.cached(("spconv_indice_dict", kernel_size, dilation), dict)
    with torch.device("meta"):
        module = spconv.SubMConv3d(
            c_in, c_out, list(kernel_size), dilation=list(dilation), bias=bias is not None, indice_key=key
        )
    params = {"weight": weight_to_spconv(weight, kernel_size)}
    if bias is not None:
        params["bias"] = bias
    sp_input = spconv.SparseConvTensor(
        feats.contiguous(),
        input.coords,
        list(input.spatial_shape),
        input.batch_size,
        indice_dict=dict(pairs),
    )
    out = torch.func.functional_call(module, params, (sp_input,))
    if key in out.indice_dict:
        pairs[key] = out.indice_dict[key]
    return out.features  # [N, C_out]: submanifold outputs keep the input rows' order
