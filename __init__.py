"""diffdistill: framework-agnostic, tested PyTorch components for diffusion distillation.

Subpackages:

* :mod:`diffdistill.schedulers` -- noise-schedule math, DDIM moves, teacher solvers with CFG,
  timestep samplers, progressive stage plans and few-step samplers.
* :mod:`diffdistill.losses` -- perceptual, consistency, score-based, adversarial, Dice and KD losses.
* :mod:`diffdistill.discriminators` -- diffusion-UNet discriminators.
* :mod:`diffdistill.students` -- student construction and layer-level KD hooks.
* :mod:`diffdistill.metrics` -- FID, CLIP and preference scores as accumulators, and the evaluation protocol
  record (their backbones come with the ``eval`` extra).
* :mod:`diffdistill.errors` -- the exception types every input check raises and the value-check switch
  (also exported here).

``import diffdistill`` imports only torch and numpy; optional dependencies (diffusers, lpips,
peft, ...) are imported inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from . import discriminators, errors, losses, metrics, schedulers, students
from .errors import (
    DTypeError,
    NonFiniteError,
    OptionError,
    ShapeError,
    set_value_checks,
    value_checks,
    value_checks_enabled,
)

__all__ = [
    "DTypeError",
    "NonFiniteError",
    "OptionError",
    "ShapeError",
    "__version__",
    "discriminators",
    "errors",
    "losses",
    "metrics",
    "schedulers",
    "set_value_checks",
    "students",
    "value_checks",
    "value_checks_enabled",
]
