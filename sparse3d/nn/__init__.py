"""Sparse-3D layers: modules hold parameters and call `sparse3d.functional`."""

from sparse3d.nn.attention import SparseCrossAttention, SparseSelfAttention
from sparse3d.nn.conv import SparseConv3d
from sparse3d.nn.embeddings import MARoPE, RotaryEmbedding, TimestepEmbedding, timestep_features
from sparse3d.nn.mmdit import (
    AdaLNModulation,
    DoubleStreamBlock,
    FinalLayer,
    MMDiTBlockConfig,
    SingleStreamBlock,
)
from sparse3d.nn.norm import SparseGroupNorm, SparseInstanceNorm, SparseLayerNorm
from sparse3d.nn.pooling import (
    SparseDownsample,
    SparsePatchify,
    SparseSubdivide,
    SparseUnpatchify,
    SparseUpsample,
)
from sparse3d.nn.tokens import TokenStream

__all__ = [
    "AdaLNModulation",
    "DoubleStreamBlock",
    "FinalLayer",
    "MARoPE",
    "MMDiTBlockConfig",
    "RotaryEmbedding",
    "SingleStreamBlock",
    "TimestepEmbedding",
    "timestep_features",
    "SparseCrossAttention",
    "SparseSelfAttention",
    "SparseConv3d",
    "SparseDownsample",
    "SparseGroupNorm",
    "SparseInstanceNorm",
    "SparseLayerNorm",
    "SparsePatchify",
    "SparseSubdivide",
    "SparseUnpatchify",
    "SparseUpsample",
    "TokenStream",
]
