"""Decoders from sparse voxel latents to 3D Gaussians: TRELLIS's Gaussian head, a sparse transformer
(windowed or full attention, RoPE or absolute positions), the decoder-only model and the sparse VAE."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.functional.rope import apply_rope, rope_frequencies, sincos_embedding
from sparse3d.gaussians.container import Gaussians
from sparse3d.gaussians.sh import num_sh_bases
from sparse3d.nn.attention import RopeHook, SparseSelfAttention
from sparse3d.tensor import SparseTensor

__all__ = [
    "GaussianDecoder",
    "GaussianDecoderConfig",
    "GaussianHead",
    "GaussianHeadConfig",
    "SparseTransformer",
    "SparseTransformerBlock",
    "SparseTransformerConfig",
    "SparseVAE",
    "SparseVAEConfig",
    "SparseVAEOutput",
    "axial_split",
    "decoder_paper",
    "decoder_tiny",
    "hammersley_points",
    "kl_divergence",
    "vae_paper",
    "vae_tiny",
]

PositionKind = Literal["rope", "ape", "none"]
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


# ------------------------------------------------------------------------------------------ helpers
def hammersley_points(num_points: int, num_dims: int = 3) -> torch.Tensor:
    """The Hammersley point set in ``[0, 1)^d``: ``(i / n, radical_inverse_2(i), radical_inverse_3(i), ...)``.

    TRELLIS spreads the ``K`` Gaussians of a voxel over it at initialisation (its ``hammersley_sequence``
    with the same definition).

    Args:
        num_points: Number of points ``n >= 1``.
        num_dims: Dimension ``d`` in ``[1, 13]``.

    Returns:
        float64 ``[n, d]`` on the CPU, also inside a ``torch.device("meta")`` context (the points are
        data, not parameters, so a model built on ``meta`` still knows them).
    """
    if num_points < 1:
        raise ValueError(f"num_points: expected >= 1, got {num_points}")
    if not 1 <= num_dims <= len(_PRIMES) + 1:
        raise ValueError(f"num_dims: expected 1..{len(_PRIMES) + 1}, got {num_dims}")
    index = torch.arange(num_points, dtype=torch.int64, device="cpu")
    columns = [index.double() / num_points]
    for base in _PRIMES[: num_dims - 1]:
        value = torch.zeros(num_points, dtype=torch.float64, device="cpu")
        remaining, weight, digits = index.clone(), 1.0 / base, 1
        while base**digits <= num_points - 1:  # digits of the largest index, counted on the host
            digits += 1
        for _ in range(digits):
            value += (remaining % base).double() * weight
            remaining = remaining // base
            weight /= base
        columns.append(value)
    return torch.stack(columns, dim=1)  # [n, d]


def axial_split(width: int, num_axes: int = 3) -> tuple[int, ...]:
    """Splits an even ``width`` into ``num_axes`` even widths as equal as possible (larger ones first).

    Used for the per-axis channels of 3D RoPE (``width`` = head dim) and of the absolute sin-cos
    embedding (``width`` = model width): ``axial_split(64) == (22, 22, 20)``.

    Args:
        width: Even total width ``>= 2 * num_axes``.
        num_axes: Number of axes.

    Returns:
        ``num_axes`` positive even widths summing to ``width``.
    """
    if width % 2 or width < 2 * num_axes:
        raise ValueError(f"width: expected an even number >= {2 * num_axes}, got {width}")
    pairs, extra = divmod(width // 2, num_axes)
    return tuple(2 * (pairs + (axis < extra)) for axis in range(num_axes))


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 to float32; other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _layer_norm(feats: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm over the last dim, in float32 (or wider), returned in the input dtype."""
    return F.layer_norm(_upcast(feats), feats.shape[-1:], eps=eps).to(feats.dtype)


def _check_feats(x: SparseTensor, channels: int, name: str = "x") -> None:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name}: expected a SparseTensor, got {type(x).__name__}")
    if x.feats.dim() != 2 or x.feats.shape[1] != channels:
        raise ValueError(f"{name}: expected feats [N, {channels}], got {list(x.feats.shape)}")


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def _logit(value: float) -> float:
    return math.log(value / (1.0 - value))


# ------------------------------------------------------------------------------------------ head
@dataclass(frozen=True, kw_only=True)
class GaussianHeadConfig:
    """Constants of [`GaussianHead`][sparse3d.gaussians.decoder.GaussianHead]; defaults are TRELLIS's
    (``decoder_gs.py`` and ``representation_config`` of its 64^3 Gaussian decoder).

    Attributes:
        num_gaussians: ``K`` Gaussians per voxel (TRELLIS: 32 at 64^3, enough for sharp texture inside a
            1/64 voxel while keeping ``N * K`` near 600k for a typical asset).
        resolution: Grid resolution ``R`` of stride-1 voxels: voxel ``(i, j, k)`` has centre
            ``((i, j, k) + 0.5) / R - 0.5`` and size ``1 / R`` (world = ``[-0.5, 0.5]^3``).
        sh_degree: SH degree of the colours (TRELLIS: 0, view-independent colour; higher degrees add
            zero-initialised coefficients).
        offset_range: Offsets from the voxel centre are ``tanh(.) * offset_range / 2`` voxels per axis
            (TRELLIS's ``voxel_size`` 1.5: +-0.75 voxel). Bounded so a voxel's Gaussians stay near it;
            above 1 so they can overlap the neighbours and close seams between voxels.
        perturb_offsets: Add the fixed perturbation ``atanh((2 h_k - 1) / offset_range)`` (``h_k`` the
            3D Hammersley points) before the tanh: at zero init the ``K`` Gaussians sit on a
            low-discrepancy pattern filling the voxel instead of all at its centre, where they would be
            identical and receive identical gradients.
        scale_bias: Initial scale in world units: ``softplus(raw + inv_softplus(scale_bias))`` (TRELLIS
            4e-3, about a quarter voxel at 64^3, so the ``K`` Gaussians tile the voxel).
        min_scale: 3D filter: ``scale = sqrt(s^2 + min_scale^2)`` (TRELLIS 9e-4), so no Gaussian becomes
            thinner than a fraction of a pixel at 512 px (no degenerate needles, less aliasing).
        opacity_bias: Initial opacity: ``sigmoid(raw + logit(opacity_bias))`` (TRELLIS 0.1): low, so
            ``K`` overlapping Gaussians do not saturate the voxel at init and all receive gradients.
        offset_multiplier: Factor on the raw offsets (TRELLIS's per-field ``lr`` multipliers scale the
            raw outputs of the zero-initialised layer, i.e. the field's effective learning rate).
        color_multiplier: Factor on the raw SH coefficients.
        scale_multiplier: Factor on the raw scales.
        rotation_multiplier: Factor on the raw rotations (TRELLIS 0.1: rotations learn slowly, which
            keeps early training stable).
        opacity_multiplier: Factor on the raw opacities.
    """

    num_gaussians: int = 32
    resolution: int = 64
    sh_degree: int = 0
    offset_range: float = 1.5
    perturb_offsets: bool = True
    scale_bias: float = 4e-3
    min_scale: float = 9e-4
    opacity_bias: float = 0.1
    offset_multiplier: float = 1.0
    color_multiplier: float = 1.0
    scale_multiplier: float = 1.0
    rotation_multiplier: float = 0.1
    opacity_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.num_gaussians < 1:
            raise ValueError(f"num_gaussians: expected >= 1, got {self.num_gaussians}")
        if self.resolution < 1:
            raise ValueError(f"resolution: expected >= 1, got {self.resolution}")
        num_sh_bases(self.sh_degree)
        if not self.offset_range > 1.0:
            raise ValueError(
                f"offset_range: expected > 1 (the perturbation needs atanh of values in (-1, 1)), "
                f"got {self.offset_range}"
            )
        if not self.scale_bias > 0 or not self.min_scale >= 0:
            raise ValueError(
                f"scale_bias, min_scale: expected > 0 and >= 0, got {self.scale_bias} and {self.min_scale}"
            )
        if not 0.0 < self.opacity_bias < 1.0:
            raise ValueError(f"opacity_bias: expected in (0, 1), got {self.opacity_bias}")

    @property
    def num_sh(self) -> int:
        """SH coefficients per colour channel, ``(sh_degree + 1)^2``."""
        return num_sh_bases(self.sh_degree)

    @property
    def channels_per_gaussian(self) -> int:
        """Raw outputs per Gaussian: offset 3, SH ``3 (sh_degree + 1)^2``, scale 3, rotation 4, opacity 1."""
        return 3 + 3 * self.num_sh + 3 + 4 + 1

    @property
    def out_channels(self) -> int:
        """Raw outputs per voxel, ``K * channels_per_gaussian`` (448 for TRELLIS)."""
        return self.num_gaussians * self.channels_per_gaussian


class GaussianHead(nn.Module):
    r"""Voxel features to ``K`` Gaussians per voxel, with TRELLIS's parameterisation.

    A zero-initialised ``Linear(in_dim, K * c)`` gives raw values per voxel, laid out field-major as in
    TRELLIS: ``[offsets K*3 | SH DC K*3 | scales K*3 | rotations K*4 | opacities K | SH rest]``, then
    for Gaussian ``k`` of voxel ``v`` (``s = stride / R`` the voxel size, ``m_*`` the multipliers):

    * ``mean = (coords_v + 0.5) s - 0.5 + tanh(m_o raw_offset + p_k) * offset_range / 2 * s``,
      ``p_k = atanh((2 h_k - 1) / offset_range)`` (``h_k`` Hammersley, 0 without ``perturb_offsets``);
    * ``scale = sqrt(softplus(m_s raw_scale + inv_softplus(scale_bias))^2 + min_scale^2)``;
    * ``opacity = sigmoid(m_a raw_opacity + logit(opacity_bias))``;
    * ``quat = normalize(m_r raw_rotation + (1, 0, 0, 0))``, ``(w, x, y, z)``;
    * ``sh = m_c raw_sh`` (colour ``sh_to_rgb``: 0.5 grey at init).

    At zero init the Gaussians therefore sit on the Hammersley pattern filling each voxel, with scale
    ``sqrt(scale_bias^2 + min_scale^2)``, opacity ``opacity_bias``, identity rotation and grey colour.
    The activations are computed in float32 under autocast (half-precision raw values are upcast), else in
    the parameters' dtype. Opacities are mathematically in
    ``(0, 1)``; float32 rounds ``sigmoid`` to 0 or 1 for raw values beyond about ``-88`` or ``17``.

    Gaussian ``v * K + k`` comes from voxel ``v`` (voxel-major), so the packed ``Gaussians`` has
    ``offsets = K * x.offsets``.

    Args:
        in_dim: Voxel feature width ``D``.
        config: The constants; defaults are TRELLIS's.
    """

    def __init__(self, in_dim: int, config: GaussianHeadConfig | None = None) -> None:
        super().__init__()
        config = GaussianHeadConfig() if config is None else config
        self.in_dim = in_dim
        self.config = config
        self.linear = nn.Linear(in_dim, config.out_channels)
        # Zero-initialised output layer (TRELLIS): every voxel starts at the init parameterisation above.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # The fixed offset perturbation is a function of the config, kept on the CPU in float64 and
        # copied once per (device, dtype); not a buffer, so a model built on the meta device and
        # materialised with `to_empty` + `load_state_dict` (or `assign=True`) still has the right values.
        perturbation = torch.zeros(config.num_gaussians, 3, dtype=torch.float64, device="cpu")
        if config.perturb_offsets:
            points = hammersley_points(config.num_gaussians, 3)  # [K, 3]
            perturbation = torch.atanh((2.0 * points - 1.0) / config.offset_range)
        self._perturbation = perturbation  # [K, 3] float64, CPU
        self._perturbation_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def offset_perturbation(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed perturbation ``p_k`` ``[K, 3]`` added to the raw offsets (zeros without
        ``perturb_offsets``), on ``device`` in ``dtype`` (cached per device and dtype).

        Args:
            device: Device of the result.
            dtype: Floating dtype of the result.

        Returns:
            Tensor ``[K, 3]``.
        """
        key = (torch.device(device), dtype)
        if key not in self._perturbation_on:
            self._perturbation_on[key] = self._perturbation.to(device=device, dtype=dtype)
        return self._perturbation_on[key]

    def forward(self, x: SparseTensor) -> Gaussians:
        """Decodes every voxel into ``K`` Gaussians.

        Args:
            x: SparseTensor with feats ``[N, in_dim]``, ``B`` samples; its ``stride`` times its
                ``spatial_shape`` must fit in ``config.resolution``.

        Returns:
            [`Gaussians`][sparse3d.gaussians.container.Gaussians] with ``N * K`` Gaussians (float32, or
            float64 for a float64 head), ``offsets = K * x.offsets`` ``[B + 1]``.
        """
        _check_feats(x, self.in_dim)
        return self.parameterise(self.linear(x.feats), x)

    def parameterise(self, raw: torch.Tensor, x: SparseTensor) -> Gaussians:
        """Applies the activations to raw outputs (the part of ``forward`` after the linear layer).

        Args:
            raw: ``[N, out_channels]`` raw values in the layout of the class docstring.
            x: SparseTensor giving the voxels' coordinates, stride and offsets (its feats are unused).

        Returns:
            [`Gaussians`][sparse3d.gaussians.container.Gaussians] with ``N * K`` Gaussians.
        """
        config = self.config
        count, gaussians = x.num_voxels, config.num_gaussians
        if raw.dim() != 2 or tuple(raw.shape) != (count, config.out_channels):
            raise ValueError(f"raw: expected shape [{count}, {config.out_channels}], got {list(raw.shape)}")
        for axis in range(3):
            if x.spatial_shape[axis] * x.stride[axis] > config.resolution:
                raise ValueError(
                    f"x: expected spatial_shape * stride <= resolution={config.resolution} on every axis, "
                    f"got spatial_shape={x.spatial_shape} and stride={x.stride}"
                )
        raw = _upcast(raw)
        widths = (3 * gaussians, 3 * gaussians, 3 * gaussians, 4 * gaussians, gaussians)
        widths = (*widths, 3 * gaussians * (config.num_sh - 1))
        raw_offset, raw_dc, raw_scale, raw_rotation, raw_opacity, raw_rest = raw.split(widths, dim=1)
        voxel = torch.tensor(x.stride, dtype=raw.dtype, device=raw.device) / config.resolution  # [3]
        centres = (x.coords[:, 1:].to(raw.dtype) + 0.5) * voxel - 0.5  # [N, 3]
        offsets = raw_offset.view(count, gaussians, 3) * config.offset_multiplier  # [N, K, 3]
        offsets = offsets + self.offset_perturbation(raw.device, raw.dtype)
        offsets = torch.tanh(offsets) * (0.5 * config.offset_range) * voxel  # [N, K, 3]
        means = (centres[:, None, :] + offsets).reshape(count * gaussians, 3)  # [N*K, 3]
        scales = raw_scale.reshape(count * gaussians, 3) * config.scale_multiplier  # [N*K, 3]
        scales = F.softplus(scales + _inverse_softplus(config.scale_bias))
        scales = torch.sqrt(scales.square() + config.min_scale**2)
        opacities = raw_opacity.reshape(count * gaussians) * config.opacity_multiplier  # [N*K]
        opacities = torch.sigmoid(opacities + _logit(config.opacity_bias))
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=raw.dtype, device=raw.device)
        quats = raw_rotation.reshape(count * gaussians, 4) * config.rotation_multiplier + identity  # [N*K, 4]
        quats = F.normalize(quats, dim=-1)
        dc = raw_dc.reshape(count * gaussians, 1, 3)  # [N*K, 1, 3]
        rest = raw_rest.reshape(count * gaussians, config.num_sh - 1, 3)  # [N*K, num_sh - 1, 3]
        sh = torch.cat([dc, rest], dim=1) * config.color_multiplier  # [N*K, num_sh, 3]
        return Gaussians(
            means, quats, scales, opacities, sh, offsets=x.offsets.long() * gaussians, check=False
        )

    def extra_repr(self) -> str:
        config = self.config
        return f"in_dim={self.in_dim}, num_gaussians={config.num_gaussians}, sh_degree={config.sh_degree}"


# ------------------------------------------------------------------------------------------ transformer
@dataclass(frozen=True, kw_only=True)
class SparseTransformerConfig:
    """A stack of [`SparseTransformerBlock`][sparse3d.gaussians.decoder.SparseTransformerBlock]s.

    Attributes:
        in_channels: Input feature width (16 for DA-SLAT's FLUX latent mean, 8 for a VAE latent).
        dim: Model width ``C``.
        num_layers: Number of blocks.
        num_heads: Attention heads ``H`` (head dim ``C / H``).
        mlp_ratio: MLP hidden width as a multiple of ``C``.
        window: Swin window size (TRELLIS: 8); odd blocks shift by half a window. ``None``: full
            attention within each sample.
        position: ``"ape"``: absolute sin-cos features of the voxel coordinates added after the input
            projection (TRELLIS); ``"rope"``: 3D RoPE on queries and keys in every block; ``"none"``.
        rope_theta: Base of the frequency ladder (RoPE and APE).
        qk_norm: RMS-normalise queries and keys per head.
        qkv_bias: Bias in the qkv projections.
        norm_eps: Epsilon of the affine-free LayerNorms (TRELLIS: 1e-6).
        attention_backend: Passed to the attention ops (``None``: automatic).
    """

    in_channels: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    window: int | None = 8
    position: PositionKind = "ape"
    rope_theta: float = 10000.0
    qk_norm: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    attention_backend: str | None = None

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_layers < 0:
            raise ValueError(
                f"in_channels, num_layers: expected >= 1 and >= 0, got {self.in_channels} and "
                f"{self.num_layers}"
            )
        if self.dim < 1 or self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(
                f"dim, num_heads: expected positive with dim divisible by num_heads, got dim={self.dim}, "
                f"num_heads={self.num_heads}"
            )
        if self.position not in ("rope", "ape", "none"):
            raise ValueError(f"position: expected 'rope', 'ape' or 'none', got {self.position!r}")
        if self.position == "rope":
            axial_split(self.head_dim)  # raises unless the head dim is even and >= 6
        if self.position == "ape":
            axial_split(self.dim)
        if self.window is not None and self.window < 1:
            raise ValueError(f"window: expected None or >= 1, got {self.window}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        """Per-head width ``C / H``."""
        return self.dim // self.num_heads


class SparseTransformerBlock(nn.Module):
    """Pre-norm transformer block on a SparseTensor: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``.

    The LayerNorms are affine-free (TRELLIS), computed in float32; attention is
    [`SparseSelfAttention`][sparse3d.nn.attention.SparseSelfAttention] (full or swin windows, optional
    RoPE hook); the MLP is ``Linear - GELU(tanh) - Linear``.

    Args:
        dim: Feature width ``C``.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``C``.
        window: Swin window size, ``None`` for full attention.
        shift: Shift the windows by half a window.
        qk_norm: RMS-normalise queries and keys per head.
        qkv_bias: Bias in the qkv projection.
        norm_eps: LayerNorm epsilon.
        backend: Attention backend (``None``: automatic).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        window: int | Sequence[int] | None = None,
        shift: bool = False,
        qk_norm: bool = True,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm_eps = norm_eps
        self.attention = SparseSelfAttention(
            dim, num_heads, qk_norm=qk_norm, window=window, shift=shift, qkv_bias=qkv_bias, backend=backend
        )
        hidden = int(dim * mlp_ratio)
        self.mlp_in = nn.Linear(dim, hidden)
        self.activation = nn.GELU(approximate="tanh")
        self.mlp_out = nn.Linear(hidden, dim)

    def forward(self, x: SparseTensor, rope: RopeHook | None = None) -> SparseTensor:
        """Applies the block.

        Args:
            x: SparseTensor with feats ``[N, dim]``.
            rope: Optional hook ``rope(query, key) -> (query, key)`` on ``[N, H, D]``.

        Returns:
            SparseTensor with the same layout and feats ``[N, dim]``.
        """
        _check_feats(x, self.dim)
        attended = self.attention(x.replace(_layer_norm(x.feats, self.norm_eps)), rope).feats  # [N, C]
        feats = x.feats + attended
        hidden = self.activation(self.mlp_in(_layer_norm(feats, self.norm_eps)))  # [N, hidden]
        feats = feats + self.mlp_out(hidden)  # [N, C]
        return x.replace(feats)


class SparseTransformer(nn.Module):
    """Input projection, positions, ``num_layers`` blocks (alternately shifted windows), final LayerNorm.

    Args:
        config: The stack's configuration.
    """

    def __init__(self, config: SparseTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.input_projection = nn.Linear(config.in_channels, config.dim)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                config.dim,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                window=config.window,
                shift=config.window is not None and index % 2 == 1,
                qk_norm=config.qk_norm,
                qkv_bias=config.qkv_bias,
                norm_eps=config.norm_eps,
                backend=config.attention_backend,
            )
            for index in range(config.num_layers)
        )

    def _rope_hook(self, x: SparseTensor) -> RopeHook:
        config = self.config
        axes = axial_split(config.head_dim)
        cos, sin = x.cached(
            ("decoder_rope", axes, config.rope_theta),
            lambda: rope_frequencies(x.coords[:, 1:], axes, theta=config.rope_theta),
        )  # each [N, head_dim]

        def rope(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_rope(query, cos, sin), apply_rope(key, cos, sin)

        return rope

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Runs the stack.

        Args:
            x: SparseTensor with feats ``[N, in_channels]``.

        Returns:
            SparseTensor with the same layout and normalised feats ``[N, dim]``.
        """
        config = self.config
        _check_feats(x, config.in_channels)
        feats = self.input_projection(x.feats)  # [N, C]
        if config.position == "ape":
            axes = axial_split(config.dim)
            embedding = x.cached(
                ("decoder_ape", axes, config.rope_theta),
                lambda: sincos_embedding(x.coords[:, 1:], axes, theta=config.rope_theta),
            )  # [N, C] float32
            feats = feats + embedding.to(feats.dtype)
        rope = self._rope_hook(x) if config.position == "rope" else None
        h = x.replace(feats)
        for block in self.blocks:
            h = block(h, rope)
        return h.replace(_layer_norm(h.feats, config.norm_eps))


def _init_linear_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases on every Linear (TRELLIS's initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# ------------------------------------------------------------------------------------------ decoder
@dataclass(frozen=True, kw_only=True)
class GaussianDecoderConfig:
    """Configuration of [`GaussianDecoder`][sparse3d.gaussians.decoder.GaussianDecoder].

    Attributes:
        transformer: The sparse transformer torso.
        head: The Gaussian head's constants.
    """

    transformer: SparseTransformerConfig
    head: GaussianHeadConfig = field(default_factory=GaussianHeadConfig)


class GaussianDecoder(nn.Module):
    """The decoder-only model: voxel latents -> sparse transformer -> ``K`` Gaussians per voxel.

    ``x [N, in_channels] -> Linear -> (+APE) -> blocks (RoPE, swin) -> LayerNorm -> GaussianHead``.
    Linear layers are Xavier-initialised with zero biases, the head's layer is zero-initialised.

    Args:
        config: Torso and head configuration, e.g.
            [`decoder_paper`][sparse3d.gaussians.decoder.decoder_paper].

    Examples:
        >>> decoder = GaussianDecoder(decoder_tiny())
        >>> x = SparseTensor(torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]]), torch.randn(2, 16), spatial_shape=64)
        >>> decoder(x).num_gaussians
        16
    """

    def __init__(self, config: GaussianDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = SparseTransformer(config.transformer)
        self.head = GaussianHead(config.transformer.dim, config.head)
        _init_linear_xavier(self.transformer)

    def forward(self, x: SparseTensor) -> Gaussians:
        """Decodes voxel latents into Gaussians.

        Args:
            x: SparseTensor with feats ``[N, in_channels]``, ``B`` samples, stride 1 coordinates on the
                head's ``resolution`` grid.

        Returns:
            [`Gaussians`][sparse3d.gaussians.container.Gaussians]: ``N * K`` Gaussians (float32 under
            autocast), packed with ``offsets = K * x.offsets``.
        """
        return self.head(self.transformer(x))


# ------------------------------------------------------------------------------------------ VAE
def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(mean, exp(logvar))`` from ``N(0, 1)``, averaged over every element (TRELLIS).

    ``0.5 * mean(mean^2 + exp(logvar) - logvar - 1)``, computed in float32 (or float64 for float64 inputs).

    Args:
        mean: Posterior means ``[N, C]``.
        logvar: Posterior log-variances ``[N, C]``.

    Returns:
        Scalar tensor (0 for ``N == 0``).
    """
    if mean.shape != logvar.shape:
        raise ValueError(
            f"mean, logvar: expected equal shapes, got {list(mean.shape)} and {list(logvar.shape)}"
        )
    if mean.numel() == 0:
        return _upcast(mean).new_zeros(())
    mean, logvar = _upcast(mean), _upcast(logvar)
    return 0.5 * (mean.square() + logvar.exp() - logvar - 1.0).mean()


@dataclass(frozen=True, kw_only=True)
class SparseVAEConfig:
    """Configuration of [`SparseVAE`][sparse3d.gaussians.decoder.SparseVAE].

    Attributes:
        encoder: The encoder torso (its ``in_channels`` is the input feature width).
        latent_channels: Width of the compact latent (TRELLIS: 8).
        decoder: The decoder; its ``transformer.in_channels`` must equal ``latent_channels``.
    """

    encoder: SparseTransformerConfig
    latent_channels: int = 8
    decoder: GaussianDecoderConfig

    def __post_init__(self) -> None:
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels: expected >= 1, got {self.latent_channels}")
        if self.decoder.transformer.in_channels != self.latent_channels:
            raise ValueError(
                f"decoder.transformer.in_channels: expected latent_channels={self.latent_channels}, got "
                f"{self.decoder.transformer.in_channels}"
            )


@dataclass(frozen=True)
class SparseVAEOutput:
    """Outputs of [`SparseVAE`][sparse3d.gaussians.decoder.SparseVAE].

    Attributes:
        gaussians: Decoded Gaussians, ``N * K`` rows.
        latent: SparseTensor with the decoded latent feats ``[N, latent_channels]`` (a sample or the mean).
        mean: Posterior means ``[N, latent_channels]``.
        logvar: Posterior log-variances ``[N, latent_channels]``.
        kl: Scalar KL term ([`kl_divergence`][sparse3d.gaussians.decoder.kl_divergence]).
    """

    gaussians: Gaussians
    latent: SparseTensor
    mean: torch.Tensor
    logvar: torch.Tensor
    kl: torch.Tensor


class SparseVAE(nn.Module):
    """Sparse VAE (the paper's Enc-Dec ablation, TRELLIS's SLAT VAE): encoder -> compact latent -> decoder.

    Encoder: ``x [N, in_channels] -> SparseTransformer -> Linear -> (mean, logvar) [N, 2 * latent]``;
    the latent ``z = mean + exp(logvar / 2) * eps`` (or ``mean``) is decoded by a
    [`GaussianDecoder`][sparse3d.gaussians.decoder.GaussianDecoder].

    Args:
        config: Encoder, latent width and decoder.
    """

    def __init__(self, config: SparseVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SparseTransformer(config.encoder)
        self.to_moments = nn.Linear(config.encoder.dim, 2 * config.latent_channels)
        _init_linear_xavier(self.encoder)
        _init_linear_xavier(self.to_moments)
        self.decoder = GaussianDecoder(config.decoder)

    def encode(self, x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior moments of every voxel.

        Args:
            x: SparseTensor with feats ``[N, encoder.in_channels]``.

        Returns:
            ``(mean, logvar)``, each ``[N, latent_channels]`` (float32 under autocast).
        """
        moments = _upcast(self.to_moments(self.encoder(x).feats))  # [N, 2 * latent]
        mean, logvar = moments.chunk(2, dim=1)  # each [N, latent]
        return mean, logvar

    def forward(
        self, x: SparseTensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> SparseVAEOutput:
        """Encodes, samples (or takes the mean) and decodes.

        Args:
            x: SparseTensor with feats ``[N, encoder.in_channels]``.
            sample_posterior: Decode ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` drawn from
                ``generator`` (shape ``[N, latent_channels]``, on ``x``'s device); else decode ``mean``.
            generator: Random generator on ``x``'s device (``None``: the global one).

        Returns:
            [`SparseVAEOutput`][sparse3d.gaussians.decoder.SparseVAEOutput].
        """
        mean, logvar = self.encode(x)
        latent = mean
        if sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latent = mean + torch.exp(0.5 * logvar) * noise  # [N, latent]
        latent_tensor = x.replace(latent)
        gaussians = self.decoder(latent_tensor)
        return SparseVAEOutput(gaussians, latent_tensor, mean, logvar, kl_divergence(mean, logvar))


# ------------------------------------------------------------------------------------------ presets
def _head_for(resolution: int, num_gaussians: int) -> GaussianHeadConfig:
    """TRELLIS's head constants, with the initial scale kept at the same fraction of a voxel."""
    return GaussianHeadConfig(
        num_gaussians=num_gaussians, resolution=resolution, scale_bias=4e-3 * 64 / resolution
    )


def decoder_paper(resolution: int = 64) -> GaussianDecoderConfig:
    """The paper's decoder: 12 layers, 12 heads, width 768 (~85M parameters), DA-SLAT input (16 ch), K = 32.

    Torso as TRELLIS's Gaussian decoder (swin window 8, absolute positions); the paper gives only
    layers, heads, width and size. ``scale_bias`` is TRELLIS's 4e-3 at 64^3, scaled by ``64 / resolution``.

    Args:
        resolution: Grid resolution ``R``.

    Returns:
        The configuration.
    """
    transformer = SparseTransformerConfig(in_channels=16, dim=768, num_layers=12, num_heads=12, window=8)
    return GaussianDecoderConfig(transformer=transformer, head=_head_for(resolution, 32))


def decoder_tiny(resolution: int = 64) -> GaussianDecoderConfig:
    """A CPU-sized decoder: 2 layers, 4 heads, width 64, 16 input channels, K = 8, swin window 8, APE.

    Args:
        resolution: Grid resolution ``R`` (``scale_bias`` follows as in
            [`decoder_paper`][sparse3d.gaussians.decoder.decoder_paper]).

    Returns:
        The configuration.
    """
    transformer = SparseTransformerConfig(in_channels=16, dim=64, num_layers=2, num_heads=4, window=8)
    return GaussianDecoderConfig(transformer=transformer, head=_head_for(resolution, 8))


def vae_paper(resolution: int = 64) -> SparseVAEConfig:
    """The Enc-Dec ablation at paper size: a 12-layer, 768-wide encoder from 16 channels to an 8-channel
    latent (TRELLIS's SLAT VAE) and [`decoder_paper`][sparse3d.gaussians.decoder.decoder_paper] on it.

    Args:
        resolution: Grid resolution ``R``.

    Returns:
        The configuration.
    """
    encoder = SparseTransformerConfig(in_channels=16, dim=768, num_layers=12, num_heads=12, window=8)
    decoder = decoder_paper(resolution)
    decoder = GaussianDecoderConfig(
        transformer=replace(decoder.transformer, in_channels=8),
        head=decoder.head,
    )
    return SparseVAEConfig(encoder=encoder, latent_channels=8, decoder=decoder)


def vae_tiny(resolution: int = 64) -> SparseVAEConfig:
    """A CPU-sized VAE: the tiny torso as encoder (16 -> 8 channels) and as decoder.

    Args:
        resolution: Grid resolution ``R``.

    Returns:
        The configuration.
    """
    encoder = SparseTransformerConfig(in_channels=16, dim=64, num_layers=2, num_heads=4, window=8)
    decoder = decoder_tiny(resolution)
    decoder = GaussianDecoderConfig(
        transformer=replace(decoder.transformer, in_channels=8),
        head=decoder.head,
    )
    return SparseVAEConfig(encoder=encoder, latent_channels=8, decoder=decoder)
