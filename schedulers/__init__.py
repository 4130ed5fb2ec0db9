"""diffdistill.schedulers: noise-schedule math, DDIM moves, teacher solvers, timestep samplers,
progressive stage plans and few-step samplers, for variance-preserving and rectified-flow schedules.
Duck-typed over diffusers (anything with ``alphas_cumprod``, or a flow-matching scheduler's config, builds a
:class:`NoiseSchedule`); diffusers is never imported here."""

from __future__ import annotations

from .consistency import boundary_scalings, consistency_function
from .few_step_samplers import (
    FLOW_PIPELINES,
    TIMESTEP_SPACINGS,
    TLCM_GRID_INDICES,
    SamplerOutput,
    custom_timesteps,
    ddim_sample,
    dmd2_timesteps,
    euler_sample,
    flow_pipeline_grid,
    lcm_sample,
    lcm_timesteps,
    one_step_sample,
    spaced_timesteps,
    tcd_sample,
    tlcm_timesteps,
    x0_renoise_sample,
)
from .flow_schedule import (
    TIME_SHIFT_TYPES,
    FlowMatchingConfig,
    FlowSigmaGrid,
    flow_sigma_grid,
    packed_image_seq_len,
    resolution_mu,
    shift_sigmas,
)
from .noise_schedule import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, SCHEDULE_KINDS, NoiseSchedule
from .stage_plans import Stage, StagePlan
from .teacher_solver import TeacherSolver, apply_guidance, concat_conditions
from .timestep_samplers import (
    DENSITY_SCHEMES,
    LIGHTNING_DISCRIMINATOR_TIMESTEPS,
    LIGHTNING_EXTRA_STUDENT_TIMESTEPS,
    TimestepSample,
    categorical_timesteps,
    flow_density_timesteps,
    lcm_skip_pairs,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
    uniform_timesteps,
)

__all__ = [
    "DENSITY_SCHEMES",
    "FLOW_PIPELINES",
    "FLOW_PREDICTION_TYPES",
    "LIGHTNING_DISCRIMINATOR_TIMESTEPS",
    "LIGHTNING_EXTRA_STUDENT_TIMESTEPS",
    "PREDICTION_TYPES",
    "SCHEDULE_KINDS",
    "TIMESTEP_SPACINGS",
    "TIME_SHIFT_TYPES",
    "TLCM_GRID_INDICES",
    "FlowMatchingConfig",
    "FlowSigmaGrid",
    "NoiseSchedule",
    "SamplerOutput",
    "Stage",
    "StagePlan",
    "TeacherSolver",
    "TimestepSample",
    "apply_guidance",
    "boundary_scalings",
    "categorical_timesteps",
    "concat_conditions",
    "consistency_function",
    "custom_timesteps",
    "ddim_sample",
    "dmd2_timesteps",
    "euler_sample",
    "flow_density_timesteps",
    "flow_pipeline_grid",
    "flow_sigma_grid",
    "lcm_sample",
    "lcm_skip_pairs",
    "lcm_timesteps",
    "milestone_pairs",
    "one_step_sample",
    "packed_image_seq_len",
    "progressive_pairs",
    "resolution_mu",
    "shift_sigmas",
    "spaced_timesteps",
    "tcd_sample",
    "tlcm_timesteps",
    "tscd_segments",
    "uniform_timesteps",
    "x0_renoise_sample",
]
