"""Consistency-model parameterisation: boundary scalings and the consistency function.

Song et al., "Consistency Models" (ICML 2023), and Luo et al., "Latent Consistency Models"
(arXiv:2310.04378), whose discrete-time form diffusers' ``LCMScheduler`` and the LCM distillation
scripts use:

.. math::

    \\tau = s\\,t, \\qquad c_\\text{skip}(t) = \\frac{\\sigma_d^2}{\\tau^2 + \\sigma_d^2}, \\qquad
    c_\\text{out}(t) = \\frac{\\tau}{\\sqrt{\\tau^2 + \\sigma_d^2}}, \\qquad
    f(x_t, t) = c_\\text{skip}(t)\\,x_t + c_\\text{out}(t)\\,\\hat x_0(x_t, t),

with :math:`\\sigma_d` = ``sigma_data`` (0.5) and :math:`s` = ``timestep_scaling`` (10), so that
:math:`f(x_0, 0) = x_0` exactly and :math:`f \\approx \\hat x_0` for ``t >= 20``.
"""

from __future__ import annotations

import torch

from .._checks import OptionError, check_positive, check_tensor, value_checks_enabled
from .noise_schedule import NoiseSchedule, TimestepLike

__all__ = ["boundary_scalings", "consistency_function"]


def boundary_scalings(
    t: TimestepLike, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings ``(c_skip, c_out)`` at timestep(s) ``t`` (float64, shape of ``t``).

    Args:
        t: timestep index or tensor of indices (diffusers convention, ``t >= 0``; OptionError for ``t < 0``).
        sigma_data: data standard deviation :math:`\\sigma_d` (0.5 in LCM).
        timestep_scaling: :math:`s` in :math:`\\tau = s t` (10 in LCM / diffusers' ``timestep_scaling``).

    Example:
        >>> c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
        >>> c_skip.tolist()[0], c_out.tolist()[0]
        (1.0, 0.0)
        >>> bool(c_out[2] > 0.9999)
        True
    """
    check_positive(sigma_data, "sigma_data")
    check_positive(timestep_scaling, "timestep_scaling")
    tt = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t.to(torch.float64)
    if value_checks_enabled() and bool((tt < 0).any()):
        raise OptionError(
            f"Expected timesteps t >= 0 for the boundary scalings, but got {tt.tolist()}. t = -1 (the clean "
            "end of a sampler's grid) has no consistency scaling: there the consistency function is the "
            "clean sample itself; clamp t to >= 0 or map such samples separately."
        )
    tau = tt * timestep_scaling
    c_skip = sigma_data**2 / (tau**2 + sigma_data**2)
    c_out = tau / (tau**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_function(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: TimestepLike,
    schedule: NoiseSchedule,
    prediction_type: str | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """The consistency function :math:`f(x_t, t) = c_\\text{skip} x_t + c_\\text{out} \\hat x_0`.

    ``model_output`` is the raw network output in ``prediction_type`` (default: the schedule's);
    :math:`\\hat x_0` comes from :meth:`NoiseSchedule.to_x0`. Returned in ``x_t``'s dtype.

    Example:
        >>> s = NoiseSchedule.from_betas()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(consistency_function(torch.randn_like(x), x, torch.tensor([0, 0]), s), x)
        True
    """
    check_tensor(x_t, "x_t")
    x0 = schedule.to_x0(model_output, x_t, t, prediction_type)
    c_skip, c_out = boundary_scalings(schedule.timesteps(t, x_t.device), sigma_data, timestep_scaling)
    work = schedule.work_dtype(x_t.dtype)
    shape = c_skip.shape + (1,) * (x_t.ndim - c_skip.ndim)
    out = c_skip.to(work).reshape(shape) * x_t.to(work) + c_out.to(work).reshape(shape) * x0.to(work)
    return out.to(x_t.dtype)
