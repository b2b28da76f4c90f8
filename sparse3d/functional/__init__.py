"""Stateless sparse-3D ops. Each has a plain-PyTorch implementation that runs on CPU and CUDA."""

from sparse3d.functional.coords import (
    MAX_BATCH,
    MAX_COORD,
    child_slots,
    coarse_coords,
    invert_kernel_map,
    kernel_map,
    kernel_offsets,
    lookup,
    offset_keys,
    pack_keys,
    segment_reduce,
    subdivide_coords,
    unique_coords,
    unpack_keys,
)

__all__ = [
    "MAX_BATCH",
    "MAX_COORD",
    "child_slots",
    "coarse_coords",
    "invert_kernel_map",
    "kernel_map",
    "kernel_offsets",
    "lookup",
    "offset_keys",
    "pack_keys",
    "segment_reduce",
    "subdivide_coords",
    "unique_coords",
    "unpack_keys",
]
