"""Flow matching for dense and sparse tensors: paths, time samplers, loss, ODE solvers and guidance.

Convention: ``t = 0`` is data, ``t = 1`` is noise, ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``.
"""

from sparse3d.flow.guidance import (
    ClassifierFreeGuidance,
    GuidanceForm,
    combine_guidance,
    concat_batch,
    rescale_guidance,
    standard_scale,
)
from sparse3d.flow.loss import DroppedCondition, drop_condition, flow_matching_loss, per_sample_mse
from sparse3d.flow.path import FlowTensor, LinearPath, PathSample, batch_size_of, expand_time, noise_like
from sparse3d.flow.solvers import (
    SolverMethod,
    SolverOutput,
    StepInfo,
    VelocityField,
    euler_step,
    generate,
    heun_step,
    midpoint_step,
    solve,
)
from sparse3d.flow.time import (
    ShiftKind,
    TimeDistribution,
    TimeSampler,
    dynamic_shift_time,
    linear_mu,
    logit_normal_time,
    mode_time,
    shift_time,
    time_grid,
    uniform_time,
)

__all__ = [
    "ClassifierFreeGuidance",
    "DroppedCondition",
    "FlowTensor",
    "GuidanceForm",
    "LinearPath",
    "PathSample",
    "ShiftKind",
    "SolverMethod",
    "SolverOutput",
    "StepInfo",
    "TimeDistribution",
    "TimeSampler",
    "VelocityField",
    "batch_size_of",
    "combine_guidance",
    "concat_batch",
    "drop_condition",
    "dynamic_shift_time",
    "euler_step",
    "expand_time",
    "flow_matching_loss",
    "generate",
    "heun_step",
    "linear_mu",
    "logit_normal_time",
    "midpoint_step",
    "mode_time",
    "noise_like",
    "per_sample_mse",
    "rescale_guidance",
    "shift_time",
    "solve",
    "standard_scale",
    "time_grid",
    "uniform_time",
]
