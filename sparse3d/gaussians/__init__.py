"""3D Gaussians: the packed container, renderers (gsplat on CUDA, exact PyTorch reference), losses,
3DGS PLY files and turntables."""

from sparse3d.gaussians.container import Gaussians
from sparse3d.gaussians.io import load_ply, ply_property_names, save_ply
from sparse3d.gaussians.losses import (
    LPIPS,
    GaussianLoss,
    GaussianLossTerms,
    l1_loss,
    opacity_loss,
    ssim,
    volume_loss,
)
from sparse3d.gaussians.rendering import (
    Projection,
    RenderOutput,
    project_gaussians,
    rasterize_reference,
    render,
    render_batch,
)
from sparse3d.gaussians.sh import eval_sh, num_sh_bases, rgb_to_sh, sh_basis, sh_to_rgb
from sparse3d.gaussians.viz import save_gif, save_grid, save_mp4, save_turntable, turntable_frames

__all__ = [
    "LPIPS",
    "GaussianLoss",
    "GaussianLossTerms",
    "Gaussians",
    "Projection",
    "RenderOutput",
    "eval_sh",
    "l1_loss",
    "load_ply",
    "num_sh_bases",
    "opacity_loss",
    "ply_property_names",
    "project_gaussians",
    "rasterize_reference",
    "render",
    "render_batch",
    "rgb_to_sh",
    "save_gif",
    "save_grid",
    "save_mp4",
    "save_ply",
    "save_turntable",
    "sh_basis",
    "sh_to_rgb",
    "ssim",
    "turntable_frames",
    "volume_loss",
]
