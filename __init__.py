"""diffdistill: framework-agnostic, tested PyTorch components for diffusion distillation.

Subpackages:

* :mod:`diffdistill.schedulers` -- noise-schedule math, DDIM moves, teacher solvers with CFG,
  timestep samplers, progressive stage plans and few-step samplers.
* :mod:`diffdistill.losses` -- perceptual, consistency, score-based, adversarial, Dice and KD losses.
* :mod:`diffdistill.discriminators` -- diffusion-UNet discriminators.
* :mod:`diffdistill.students` -- student construction and layer-level KD hooks.

``import diffdistill`` imports only torch and numpy; optional dependencies (diffusers, kornia, lpips,
peft, ...) are imported inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from . import discriminators, losses, schedulers, students

__all__ = ["__version__", "discriminators", "losses", "schedulers", "students"]
