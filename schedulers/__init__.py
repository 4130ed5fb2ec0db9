"""diffdistill.schedulers: noise-schedule math, DDIM moves, teacher solvers, timestep samplers,
progressive stage plans and few-step samplers. Duck-typed over diffusers (anything with
``alphas_cumprod`` builds a :class:`NoiseSchedule`); diffusers is never imported here."""

from __future__ import annotations

from .consistency import boundary_scalings, consistency_function
from .noise_schedule import PREDICTION_TYPES, NoiseSchedule

__all__ = [
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "boundary_scalings",
    "consistency_function",
]
