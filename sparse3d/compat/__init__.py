"""Weight converters from other libraries' checkpoints into sparse3d modules (no third-party imports)."""

from sparse3d.compat.flux import (
    load_flux_double_block,
    load_flux_final_layer,
    load_flux_single_block,
    load_flux_timestep_embedding,
)

__all__ = [
    "load_flux_double_block",
    "load_flux_final_layer",
    "load_flux_single_block",
    "load_flux_timestep_embedding",
]
