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

Rectified flow (SD3 / FLUX schedules, ``schedule.kind == "flow"``): the boundary condition is imposed in
:math:`\\sigma`, where the clean end :math:`\\sigma = 0` is on the path itself (index ``t = -1``):

.. math::

    f(x_\\sigma, \\sigma) = x_\\sigma - \\sigma\\,\\hat v(x_\\sigma, \\sigma) = \\hat x_0(x_\\sigma, \\sigma),
    \\qquad f(x, 0) = x,

i.e. :math:`c_\\text{skip} = 1`, :math:`c_\\text{out} = -\\sigma` on the velocity :math:`\\hat v = \\epsilon - x_0`
(the consistency parameterisation of phased consistency models on SD3, Wang et al. 2024, arXiv:2405.18407,
``train_pcm_lora_sd3_adv.py``; FastGen's flow students). Written on :math:`\\hat x_0` as everywhere here,
:math:`c_\\text{skip} = 1, c_\\text{out} = 0` at :math:`\\sigma = 0` and :math:`c_\\text{skip} = 0,
c_\\text{out} = 1` for :math:`\\sigma > 0`: a flow (or epsilon, v) output gives :math:`\\hat x_0 \\to x` as
:math:`\\sigma \\to 0`, so :math:`f` is continuous there; only a ``"sample"`` output needs the explicit
:math:`f(x, 0) = x`. LCM's :math:`(\\sigma_d, s)` scalings are not used on flow schedules (our choice: they are
functions of the integer index, whose :math:`\\sigma` depends on the shift, and would make a student that
equals a straight-path teacher inconsistent, since :math:`c_\\text{skip}(t) x_t \\ne c_\\text{skip}(t') x_{t'}`).
"""

from __future__ import annotations

import torch

from .._checks import (
    DTypeError,
    OptionError,
    check_finite,
    check_real,
    value_checks_enabled,
)
from .noise_schedule import NoiseSchedule, TimestepLike

__all__ = ["boundary_scalings", "consistency_function"]


def _check_constants(sigma_data: float, timestep_scaling: float) -> tuple[float, float]:
    """``sigma_data`` and ``timestep_scaling`` as finite floats > 0."""
    return (
        check_real(sigma_data, "sigma_data", low=0, strict=True, allow_tensor=True),
        check_real(timestep_scaling, "timestep_scaling", low=0, strict=True, allow_tensor=True),
    )


def _scalings(
    tt: torch.Tensor, sigma_data: float, timestep_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` in float64 for validated timesteps ``tt >= 0`` and validated constants."""
    tau = tt.to(torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (tau**2 + sigma_data**2)
    c_out = tau / (tau**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _flow_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` in float64 of :math:`f = x - \\sigma \\hat v` on :math:`\\hat x_0`, at ``sigma``."""
    clean = (sigma.to(torch.float64) == 0).to(torch.float64)
    return clean, 1 - clean


def _check_nonnegative(tt: torch.Tensor) -> None:
    if value_checks_enabled() and bool((tt < 0).any()):
        raise OptionError(
            f"Expected timesteps t >= 0 for the boundary scalings, but got {tt.tolist()}. t = -1 (the clean "
            "end of a sampler's grid) has no consistency scaling: there the consistency function is the "
            "clean sample itself; clamp t to >= 0 or map such samples separately."
        )


def boundary_scalings(
    t: TimestepLike,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    *,
    schedule: NoiseSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary-condition scalings ``(c_skip, c_out)`` of :math:`f = c_\\text{skip} x_t + c_\\text{out} \\hat x_0`.

    VP (``schedule`` None or a VP schedule): LCM's scalings at timestep(s) ``t`` (see the module docstring).
    Rectified flow (a flow ``schedule``): the scalings in :math:`\\sigma` of :math:`f = x - \\sigma \\hat v`,
    written on :math:`\\hat x_0`: ``(1, 0)`` at :math:`\\sigma_t = 0` (``t = -1``), ``(0, 1)`` elsewhere
    (the module docstring gives the reason); ``sigma_data`` and ``timestep_scaling`` are then unused.

    Args:
        t: timestep index or tensor / sequence of indices of any shape (diffusers convention, ``t >= 0``;
            fractional values are allowed: the scalings are continuous in ``t``). With a flow ``schedule``:
            integer indices in ``[-1, T-1]``.
        sigma_data: data standard deviation :math:`\\sigma_d`, a finite number > 0 (0.5 in LCM, the default).
        timestep_scaling: :math:`s` in :math:`\\tau = s t`, a finite number > 0 (10 in LCM / diffusers'
            ``timestep_scaling``, the default).
        schedule: the :class:`NoiseSchedule` of ``t``; None (the default) gives LCM's scalings.

    Returns:
        ``(c_skip, c_out)``: two float64 tensors of the shape of ``t``.

    Raises:
        DTypeError: if ``t`` is not numeric (or a bool / complex tensor), or a constant is not a real number;
            with a flow ``schedule``, if ``t`` is not integer-valued.
        NonFiniteError: if ``t`` holds NaN / Inf (a value check).
        OptionError: if some ``t < 0`` (a value check; flow: outside ``[-1, T-1]``), ``sigma_data`` /
            ``timestep_scaling`` is not a finite number > 0, or ``schedule`` is not a :class:`NoiseSchedule`.

    Example:
        >>> c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
        >>> c_skip.tolist()[0], c_out.tolist()[0]
        (1.0, 0.0)
        >>> bool(c_out[2] > 0.9999)
        True
        >>> sd3 = NoiseSchedule.flow_matching(shift=3.0)
        >>> [c.tolist() for c in boundary_scalings(torch.tensor([-1, 0, 999]), schedule=sd3)]
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    sd, scaling = _check_constants(sigma_data, timestep_scaling)
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise OptionError(
            f"Expected `schedule` to be a NoiseSchedule or None, but got {type(schedule).__name__}. Build one "
            "with NoiseSchedule.from_scheduler(diffusers_scheduler) or NoiseSchedule.flow_matching()."
        )
    if schedule is not None and schedule.kind == "flow":
        sigma = schedule.sigma(t)  # validates t: integer indices in [-1, T-1]
        return _flow_scalings(sigma)
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bool or t.is_complex():
            raise DTypeError(f"Expected `t` to hold real timesteps, but got dtype {t.dtype}.")
        tt = t.to(torch.float64)
    else:
        try:
            tt = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DTypeError(
                f"Expected `t` to be a number, a sequence of numbers or a tensor of timesteps, but got "
                f"{type(t).__name__} ({t!r})."
            ) from err
    check_finite(tt, "t")
    _check_nonnegative(tt)
    return _scalings(tt, sd, scaling)


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

    :math:`\\hat x_0` comes from :meth:`NoiseSchedule.to_x0`; the scalings from :func:`boundary_scalings`.
    On a flow schedule :math:`f = x_t - \\sigma_t \\hat v = \\hat x_0` and ``t = -1`` (:math:`\\sigma = 0`)
    is allowed, where :math:`f(x, 0) = x` (see the module docstring); ``sigma_data`` and
    ``timestep_scaling`` are then unused.

    Args:
        model_output: the raw network output at ``(x_t, t)`` in ``prediction_type``, floating, the shape of
            ``x_t``.
        x_t: noisy states ``(B, ...)``, floating.
        t: a scalar timestep or one per sample (``(B,)``), in ``[0, T-1]`` (flow schedules: ``[-1, T-1]``).
        schedule: the :class:`NoiseSchedule` the model was trained with.
        prediction_type: parameterisation of ``model_output`` (default: the schedule's).
        sigma_data: :math:`\\sigma_d` of :func:`boundary_scalings` (default 0.5).
        timestep_scaling: :math:`s` of :func:`boundary_scalings` (default 10).

    Returns:
        :math:`f(x_t, t)`, shape and dtype of ``x_t``.

    Raises:
        DTypeError: if ``model_output`` or ``x_t`` is not a floating tensor, ``t`` is not integer-valued, or a
            constant is not a real number.
        ShapeError: if ``x_t`` is empty, ``model_output`` has another shape, or ``t`` is neither a scalar nor
            one per sample.
        NonFiniteError: if ``model_output`` or ``x_t`` holds NaN / Inf (a value check).
        OptionError: if ``schedule`` is not a :class:`NoiseSchedule`, ``prediction_type`` is unknown, a ``t``
            is outside ``[0, T-1]`` (value checks), or a constant is not a finite number > 0.

    Example:
        >>> s = NoiseSchedule.from_betas()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(consistency_function(torch.randn_like(x), x, torch.tensor([0, 0]), s), x)
        True
    """
    if not isinstance(schedule, NoiseSchedule):
        raise OptionError(
            f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. Build one with "
            "NoiseSchedule.from_scheduler(diffusers_scheduler) or NoiseSchedule.from_betas()."
        )
    sd, scaling = _check_constants(sigma_data, timestep_scaling)
    pt = schedule._prediction_type(prediction_type)
    schedule._check_output_and_state(model_output, x_t)
    tt = schedule.batch_timesteps(t, x_t)
    if schedule.kind != "flow":  # flow: t = -1 is sigma = 0 on the path, where f(x, 0) = x
        _check_nonnegative(tt)
    return _consistency(model_output, x_t, tt, schedule, pt, sd, scaling)


def _consistency(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    tt: torch.Tensor,
    schedule: NoiseSchedule,
    pt: str,
    sigma_data: float,
    timestep_scaling: float,
) -> torch.Tensor:
    """:func:`consistency_function` on validated inputs (no checks; ``tt`` from ``batch_timesteps``)."""
    if schedule.kind == "flow":  # f = x - sigma v = x0_hat, and x itself at sigma = 0
        x0 = schedule._x0_eps(model_output, x_t, tt, pt)[0]
        clean = schedule._lookup(1, tt, x_t) == 0
        return torch.where(clean, x_t.to(x0.dtype), x0).to(x_t.dtype)
    x0 = schedule._x0_eps(model_output, x_t, tt, pt)[0].to(x_t.dtype)
    c_skip, c_out = _scalings(tt, sigma_data, timestep_scaling)
    work = schedule.work_dtype(x_t.dtype)
    shape = c_skip.shape + (1,) * (x_t.ndim - c_skip.ndim)
    out = c_skip.to(work).reshape(shape) * x_t.to(work) + c_out.to(work).reshape(shape) * x0.to(work)
    return out.to(x_t.dtype)
