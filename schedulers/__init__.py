"""diffdistill.schedulers: noise-schedule math, DDIM moves, teacher solvers, timestep samplers,
progressive stage plans and few-step samplers. Duck-typed over diffusers (anything with
``alphas_cumprod`` builds a :class:`NoiseSchedule`); diffusers is never imported here."""

from __future__ import annotations

from .consistency import boundary_scalings, consistency_function
from .noise_schedule import PREDICTION_TYPES, NoiseSchedule
from .stage_plans import Stage, StagePlan
from .teacher_solver import TeacherSolver, apply_guidance, concat_conditions
from .timestep_samplers import (
    LIGHTNING_DISCRIMINATOR_TIMESTEPS,
    LIGHTNING_EXTRA_STUDENT_TIMESTEPS,
    TimestepSample,
    categorical_timesteps,
    lcm_skip_pairs,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
    uniform_timesteps,
)

__all__ = [
    "LIGHTNING_DISCRIMINATOR_TIMESTEPS",
    "LIGHTNING_EXTRA_STUDENT_TIMESTEPS",
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "Stage",
    "StagePlan",
    "TeacherSolver",
    "TimestepSample",
    "apply_guidance",
    "boundary_scalings",
    "categorical_timesteps",
    "concat_conditions",
    "consistency_function",
    "lcm_skip_pairs",
    "milestone_pairs",
    "progressive_pairs",
    "tscd_segments",
    "uniform_timesteps",
]
