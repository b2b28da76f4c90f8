"""Load diffusers FLUX weights (``FluxTransformerBlock``, ``FluxSingleTransformerBlock``, the final norm and
the time embedder) into sparse3d's MMDiT modules. Needs only state dicts; diffusers is not imported.

Stream mapping: diffusers' ``encoder_hidden_states`` (FLUX's text / context stream, first in the joint
sequence) is our ``image`` stream of condition-image tokens, and its ``hidden_states`` (FLUX's image latents)
our ``voxels`` stream. So ``theirs(hidden_states=h, encoder_hidden_states=e, temb=temb, ...)`` returns
``(e', h')`` where ``ours(image=<e>, voxels=<h>, vec=temb)`` returns ``(image', voxels')``: the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparse3d.nn.embeddings import TimestepEmbedding
from sparse3d.nn.mmdit import DoubleStreamBlock, FinalLayer, SingleStreamBlock

__all__ = [
    "flux_double_block_state_dict",
    "flux_final_layer_state_dict",
    "flux_single_block_state_dict",
    "flux_timestep_embedding_state_dict",
    "load_flux_double_block",
    "load_flux_final_layer",
    "load_flux_single_block",
    "load_flux_timestep_embedding",
]

StateDict = Mapping[str, torch.Tensor]


def _take(state_dict: StateDict, prefix: str, expected: list[str], what: str) -> dict[str, torch.Tensor]:
    """Selects ``prefix + key`` for every expected key; missing or leftover keys under ``prefix`` raise."""
    selected = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    missing = sorted(set(expected) - set(selected))
    unexpected = sorted(set(selected) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"state_dict: expected the keys of a diffusers {what} under prefix {prefix!r}; "
            f"missing {missing}, unexpected {unexpected}"
        )
    return selected


def _double_keys() -> list[str]:
    keys = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    keys += ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
    keys += ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    norms = [
        "attn.norm_q.weight",
        "attn.norm_k.weight",
        "attn.norm_added_q.weight",
        "attn.norm_added_k.weight",
    ]
    return [f"{key}.{param}" for key in keys for param in ("weight", "bias")] + norms


def flux_double_block_state_dict(state_dict: StateDict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Converts a diffusers ``FluxTransformerBlock`` state dict to a
    [`DoubleStreamBlock`][sparse3d.nn.mmdit.DoubleStreamBlock] state dict.

    diffusers' ``hidden_states`` stream (FLUX's image latents) becomes our ``voxels`` stream (``voxel_*``
    weights) and its ``encoder_hidden_states`` stream (FLUX's text / context) our ``image`` stream of
    condition-image tokens (``image_*`` weights); separate q, k, v projections are concatenated into one
    ``[3 D, D]`` projection (q, k, v order). The modulation chunk order
    ``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` is the same in both.

    Args:
        state_dict: diffusers block parameters (keys like ``attn.to_q.weight``).
        prefix: Prefix of the block's keys in ``state_dict`` (e.g. ``"transformer_blocks.0."``).

    Returns:
        Parameters keyed as in ``DoubleStreamBlock.state_dict()``.

    Raises:
        KeyError: A key is missing, or an unknown key sits under ``prefix``.
    """
    source = _take(state_dict, prefix, _double_keys(), "FluxTransformerBlock")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (("image", "norm1_context"), ("voxel", "norm1")):
        for param in ("weight", "bias"):
            out[f"{ours}_modulation.linear.{param}"] = source[f"{theirs}.linear.{param}"]
    streams = {
        "voxel": ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
        "image": (
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "norm_added_q",
            "norm_added_k",
            "ff_context",
        ),
    }
    for ours, (to_q, to_k, to_v, to_out, norm_q, norm_k, ff) in streams.items():
        for param in ("weight", "bias"):
            out[f"{ours}_qkv.{param}"] = torch.cat(
                [
                    source[f"attn.{to_q}.{param}"],
                    source[f"attn.{to_k}.{param}"],
                    source[f"attn.{to_v}.{param}"],
                ]
            )
            out[f"{ours}_attn_out.{param}"] = source[f"attn.{to_out}.{param}"]
            out[f"{ours}_mlp.0.{param}"] = source[f"{ff}.net.0.proj.{param}"]
            out[f"{ours}_mlp.2.{param}"] = source[f"{ff}.net.2.{param}"]
        out[f"{ours}_query_norm.weight"] = source[f"attn.{norm_q}.weight"]
        out[f"{ours}_key_norm.weight"] = source[f"attn.{norm_k}.weight"]
    return out


def flux_single_block_state_dict(state_dict: StateDict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Converts a diffusers ``FluxSingleTransformerBlock`` state dict to a
    [`SingleStreamBlock`][sparse3d.nn.mmdit.SingleStreamBlock] state dict.

    ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` are fused into ``linear_in`` (in that order, as BFL's
    ``linear1``); ``proj_out`` becomes ``linear_out``; ``norm.linear`` chunks ``(shift, scale, gate)``
    keep their order.

    Args:
        state_dict: diffusers block parameters.
        prefix: Prefix of the block's keys (e.g. ``"single_transformer_blocks.0."``).

    Returns:
        Parameters keyed as in ``SingleStreamBlock.state_dict()``.

    Raises:
        KeyError: A key is missing, or an unknown key sits under ``prefix``.
    """
    linears = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
    expected = [f"{key}.{param}" for key in linears for param in ("weight", "bias")]
    source = _take(
        state_dict, prefix, expected + ["attn.norm_q.weight", "attn.norm_k.weight"], "single block"
    )
    out: dict[str, torch.Tensor] = {}
    for param in ("weight", "bias"):
        out[f"modulation.linear.{param}"] = source[f"norm.linear.{param}"]
        out[f"linear_in.{param}"] = torch.cat(
            [source[f"attn.to_{part}.{param}"] for part in ("q", "k", "v")] + [source[f"proj_mlp.{param}"]]
        )
        out[f"linear_out.{param}"] = source[f"proj_out.{param}"]
    out["query_norm.weight"] = source["attn.norm_q.weight"]
    out["key_norm.weight"] = source["attn.norm_k.weight"]
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Swaps the two halves of dim 0: diffusers' ``(scale, shift)`` to our ``(shift, scale)``."""
    scale, shift = tensor.chunk(2, dim=0)
    return torch.cat([shift, scale])


def flux_final_layer_state_dict(state_dict: StateDict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Converts diffusers' ``norm_out`` (``AdaLayerNormContinuous``) + ``proj_out`` to a
    [`FinalLayer`][sparse3d.nn.mmdit.FinalLayer] state dict.

    diffusers' chunk order ``(scale, shift)`` is swapped to our ``(shift, scale)``.

    Args:
        state_dict: Parameters with keys ``norm_out.linear.*`` and ``proj_out.*`` (e.g. a
            ``FluxTransformer2DModel`` state dict filtered to those; other keys are ignored).
        prefix: Prefix before ``norm_out`` / ``proj_out``.

    Returns:
        Parameters keyed as in ``FinalLayer.state_dict()``.
    """
    keys = [f"{key}.{param}" for key in ("norm_out.linear", "proj_out") for param in ("weight", "bias")]
    missing = [key for key in keys if prefix + key not in state_dict]
    if missing:
        raise KeyError(f"state_dict: expected keys {keys} under prefix {prefix!r}; missing {missing}")
    return {
        "modulation.linear.weight": _swap_halves(state_dict[prefix + "norm_out.linear.weight"]),
        "modulation.linear.bias": _swap_halves(state_dict[prefix + "norm_out.linear.bias"]),
        "linear.weight": state_dict[prefix + "proj_out.weight"],
        "linear.bias": state_dict[prefix + "proj_out.bias"],
    }


def flux_timestep_embedding_state_dict(state_dict: StateDict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Converts a diffusers ``TimestepEmbedding`` (``linear_1``, ``linear_2``) to a
    [`TimestepEmbedding`][sparse3d.nn.embeddings.TimestepEmbedding] state dict.

    Args:
        state_dict: Parameters with keys ``linear_1.*``, ``linear_2.*``.
        prefix: Prefix, e.g. ``"time_text_embed.timestep_embedder."`` in a full FLUX state dict.

    Returns:
        Parameters keyed as in ``TimestepEmbedding.state_dict()``.
    """
    expected = [f"linear_{i}.{param}" for i in (1, 2) for param in ("weight", "bias")]
    source = _take(state_dict, prefix, expected, "TimestepEmbedding")
    return {
        f"{ours}.{param}": source[f"{theirs}.{param}"]
        for ours, theirs in (("linear_in", "linear_1"), ("linear_out", "linear_2"))
        for param in ("weight", "bias")
    }


def _load(module: nn.Module, converted: dict[str, torch.Tensor]) -> None:
    """Copies converted parameters into ``module`` strictly (shapes and key sets must match)."""
    own = module.state_dict()
    for key, value in converted.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"state_dict: parameter {key!r} expected shape {list(own[key].shape)} for this "
                f"{type(module).__name__}, got {list(value.shape)} (check dim / num_heads / mlp_ratio)"
            )
    module.load_state_dict(converted, strict=True)


def load_flux_double_block(block: DoubleStreamBlock, state_dict: StateDict, *, prefix: str = "") -> None:
    """Loads a diffusers ``FluxTransformerBlock`` state dict into ``block`` in place.

    Call the block as ``block(image, voxels, temb)`` with ``image`` a
    [`TokenStream`][sparse3d.nn.tokens.TokenStream] of diffusers' ``encoder_hidden_states`` and ``voxels``
    one of its ``hidden_states``, each with its rows of the RoPE tables of the concatenated ids
    (``encoder_hidden_states`` first), to reproduce diffusers' outputs ``(encoder_hidden_states,
    hidden_states)`` as ``(image.feats, voxels.feats)``.

    Args:
        block: Target block (same ``dim``, ``num_heads``, ``mlp_ratio=4``).
        state_dict: diffusers parameters; see
            [`flux_double_block_state_dict`][sparse3d.compat.flux.flux_double_block_state_dict].
        prefix: Prefix of the block's keys.

    Raises:
        KeyError: Keys are missing or unexpected.
        ValueError: A parameter's shape does not match ``block``.
    """
    _load(block, flux_double_block_state_dict(state_dict, prefix=prefix))


def load_flux_single_block(block: SingleStreamBlock, state_dict: StateDict, *, prefix: str = "") -> None:
    """Loads a diffusers ``FluxSingleTransformerBlock`` state dict into ``block`` in place.

    As for [`load_flux_double_block`][sparse3d.compat.flux.load_flux_double_block], diffusers'
    ``encoder_hidden_states`` is our ``image`` stream and its ``hidden_states`` our ``voxels`` stream.

    Args:
        block: Target block (same ``dim``, ``num_heads``, ``mlp_ratio``).
        state_dict: diffusers parameters.
        prefix: Prefix of the block's keys.

    Raises:
        KeyError: Keys are missing or unexpected.
        ValueError: A parameter's shape does not match ``block``.
    """
    _load(block, flux_single_block_state_dict(state_dict, prefix=prefix))


def load_flux_final_layer(layer: FinalLayer, state_dict: StateDict, *, prefix: str = "") -> None:
    """Loads diffusers' ``norm_out`` + ``proj_out`` into ``layer`` in place (chunk order swapped).

    Args:
        layer: Target layer.
        state_dict: Parameters with ``norm_out.linear.*`` and ``proj_out.*`` keys.
        prefix: Prefix before those keys.
    """
    _load(layer, flux_final_layer_state_dict(state_dict, prefix=prefix))


def load_flux_timestep_embedding(
    module: TimestepEmbedding, state_dict: StateDict, *, prefix: str = "time_text_embed.timestep_embedder."
) -> None:
    """Loads diffusers' FLUX timestep embedder (``linear_1``, ``linear_2``) into ``module`` in place.

    Args:
        module: Target embedding (``num_features=256``, ``time_scale=1000`` to match FLUX).
        state_dict: Parameters (a full ``FluxTransformer2DModel`` state dict with the default prefix,
            or the embedder's own with ``prefix=""``).
        prefix: Prefix of the embedder's keys.
    """
    _load(module, flux_timestep_embedding_state_dict(state_dict, prefix=prefix))
