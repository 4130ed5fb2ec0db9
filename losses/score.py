"""Score-based distillation of one-step generators: SIM, SiD and DMD generator losses, the fake-score
denoising-score-matching loss, and the alternating generator / fake-score update.

Setting: a generator produces :math:`x = g_\\theta(z)`; a frozen *real* denoiser :math:`D_\\phi` (the
teacher, usually with CFG) and an online *fake* denoiser :math:`D_\\psi` (initialised from the teacher,
trained on detached generator samples with :func:`fake_score_loss`) are evaluated at
:math:`x_t = \\alpha_t x + \\sigma_t \\epsilon`. In the denoiser form every score difference becomes a
difference of clean-sample estimates: :math:`s_\\psi - s_\\phi = (\\alpha_t/\\sigma_t^2)(D_\\psi - D_\\phi)`.

``real`` and ``fake`` are either a :class:`~diffdistill.schedulers.TeacherSolver` (its guidance applies)
or a plain callable ``model(x_t, t, **cond)`` on ``(B, ...)`` states (image latents, or video latents
``(B, C, F, H, W)`` for Wan's ``WanTransformer3DModel``: per-sample normalisers and reductions run over every
non-batch dim); outputs of any prediction type are converted to
:math:`\\hat x_0` by the schedule. A plain callable gets the timestep a TeacherSolver would give it: the
int64 index on a VP schedule, :meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep` (float32
:math:`1000\\sigma_t` for SD3) on a rectified-flow one, where the same losses run unchanged with ``"flow"``
outputs (:math:`\\hat x_0 = x_t - \\sigma_t \\hat v`; FastGen's DMD2 on FLUX / SD3 and SiD on flow models,
arXiv:2509.25127, work in this same :math:`\\hat x_0` space) and the fake score can regress the velocity
(:func:`fake_score_loss` with ``weighting="flow"``).

For SIM and SiD the generator gradient flows through :math:`x_t` into both networks' *inputs* (as in the
papers' code): freeze their parameters during the generator step (:class:`AlternatingUpdate` does it for
the fake network).

Recipe for a one-step generator, measured on the issue-20 toy (``benchmarks/toy_losses.py --mixture hard``:
8 modes of std 0.05 on a circle of radius 2, an exact teacher, a 3x256 MLP, batch 512, 3,000 generator steps,
2 seeds), where one-step SIM and DMD generators had settled on the ring through the modes (1-step sliced
Wasserstein ~0.15 and worse; data vs data 0.016):

* **An EMA of the generator** for sampling (as SiD and DMD2 do). The per-sample score gradients are noisy:
  DMD's normaliser :math:`\\operatorname{mean}|x - D_\\phi|` vanishes for a sample on a narrow mode at small
  ``t``, so a sample that reached a mode gets heavy-tailed kicks (toy, generator on the ring: per-sample
  tangential gradient sd 9.4 on a mode, against a mean pull of 0.42 towards it 0.1 away), and the
  pseudo-Huber :math:`d'(y)` of SIM with a too small
  ``c`` is a unit vector that never shrinks. The raw weights random-walk around the ring; their average
  does not.
* **Input timestep.** Feed pure noise at an intermediate timestep :math:`t_g`, not at ``T-1``, and initialise
  the generator from the teacher's :math:`\\hat x_0` there (an x0-converted copy,
  :func:`~diffdistill.losses.x0_conversion_loss`, for an epsilon teacher). SiD and SIM feed
  :math:`\\sigma_\\text{init} = 2.5` (``schedule.edm_sigma_to_timestep(2.5)``: 625 on the SD/SDXL schedule);
  DMD2's one-step SDXL generator 399; Hyper-SD's one-step UNet 800. Scale the noise as SiD does: its input is
  the EDM state :math:`\\sigma_\\text{init} z`, i.e. the noised state of a zero image at :math:`t_g`,
  ``schedule.add_noise(0, z, t_g)`` (0.93 z on the SD schedule, 0.71 z on a shift-3 flow schedule). In the toy demo's
  flow run this SiD input beat unit-scale noise (DMD2's convention at ``T-1``, where the two nearly agree):
  one-step FD 22.7 against 34.5 (coverage 0.77 against 0.31) on seed 0, 14.7 against 25.6 on the held-out seed
  (``examples/toy/distill.py --sim-input``; the teacher alone: FD 81 against 102, audit 15). The SDXL example
  scripts take ``--generator_input noised`` (``sdxl_sim.py``'s ``sim`` / ``sid`` presets: SiD's input at 625);
  with :func:`~diffdistill.schedulers.one_step_sample` pass ``x_t = schedule.add_noise(0, z, t_g)``. At ``t = T-1``
  (:math:`\\alpha_{999} = 0.068` on SD's schedule) the teacher's estimate hardly depends on the noise, so the
  generator starts as a near-constant map that the losses must first spread out; at :math:`t_g = 625` it already sends each
  direction of the noise towards a mode. Sample with ``one_step_sample(..., timestep=t_g)``.
* **Fake score** initialised from the teacher and updated once per generator update
  (:class:`AlternatingUpdate`). In the toy, five fake updates per generator update (DMD2's SDXL ratio) and
  an exact fake score (a kernel density of the generator's samples) left the ring as it was: the fake score
  was not the bottleneck.
* **sim_loss's c** in the data's units: its default scales with the samples (see :func:`sim_loss`).

Toy 1-step SW after 3,000 steps, mean ± sd over 2 seeds, SIM / DMD (the target was <= 0.12):

==============  =============================  =============================
input timestep  raw generator weights          EMA 0.995 of the weights
==============  =============================  =============================
``t_g = 999``   0.144 ± 0.005 / 0.171 ± 0.017  0.124 ± 0.004 / 0.118 ± 0.018
``t_g = 625``   0.166 ± 0.012 / 0.158 ± 0.006  0.109 ± 0.001 / 0.111 ± 0.005
==============  =============================  =============================

The EMA does most of the work; the intermediate input timestep makes both methods pass on both seeds.

Every loss checks its inputs first (see :mod:`diffdistill.errors`): ``x`` / ``x0`` and ``noise`` must be
non-empty floating tensors of the same shape, finite while value checks are on; ``cond`` / ``uncond`` /
``fake_cond`` mappings of keyword arguments; ``uncond`` needs a ``TeacherSolver`` (a plain callable has no
guidance that would use it); a ``TeacherSolver`` must be built on the loss's ``schedule`` (the same noise
levels and model timesteps: it calls its network through its own schedule); ``t`` and ``t_range`` are
alternatives.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_finite,
    check_float_input,
    check_int,
    check_mapping,
    check_option,
    check_real,
    check_same_shape,
    check_tensor,
    value_checks_enabled,
)
from .._modules import frozen
from .._outputs import check_prediction, first_tensor
from ..schedulers.noise_schedule import NoiseSchedule, TimestepLike
from ..schedulers.teacher_solver import TeacherSolver
from ..schedulers.timestep_samplers import uniform_timesteps
from .consistency import _network_timestep
from .distances import _reduce

__all__ = [
    "AlternatingUpdate",
    "denoise",
    "dmd_loss",
    "fake_score_loss",
    "sid_loss",
    "sim_loss",
]

Denoiser = TeacherSolver | Callable[..., Any]
Cond = Mapping[str, Any] | None

_REDUCTIONS = ("mean", "sum", "none")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------------------------- checks
def _check_schedule(schedule: Any) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise DTypeError(
            f"Expected `schedule` to be a diffdistill NoiseSchedule, but got {type(schedule).__name__}. Build one "
            "with NoiseSchedule.from_scheduler(diffusers_scheduler) or NoiseSchedule.from_betas()."
        )


def _check_model(model: Any, name: str, *, solver: bool = True) -> None:
    if isinstance(model, TeacherSolver) and solver:
        return
    if isinstance(model, TeacherSolver) or not callable(model):
        want = (
            "a TeacherSolver or a callable model(x_t, t, **cond)"
            if solver
            else "a callable model(x_t, t, **cond)"
        )
        raise DTypeError(f"Expected `{name}` to be {want}, but got {type(model).__name__}.")


def _check_solver_schedule(model: Any, schedule: Any, name: str) -> None:
    """A TeacherSolver ``model`` must run on the loss's ``schedule`` (the same noise levels and model timesteps).

    The loss noises the batch to ``x_t`` with ``schedule`` and converts the output with it, while the solver
    calls its network with *its own* schedule's timestep at the same index: on another schedule (FLUX's
    ``mu`` of another resolution, shift 3 against 1, VP against flow) the network would denoise at another
    noise level than the state's, silently.
    """
    if not isinstance(model, TeacherSolver) or not isinstance(schedule, NoiseSchedule):
        return
    if not model.schedule._same_noise_levels(schedule):
        raise OptionError(
            f"`{name}` is a TeacherSolver on another schedule than `schedule` (solver: {model.schedule!r}; "
            f"loss: {schedule!r}): its network would be called at its own schedule's noise level for each t, not "
            f"at the one the batch is noised to. Build it on the schedule the batch is noised with, "
            f"TeacherSolver(model, schedule, ...) (one solver per schedule, e.g. per FLUX resolution's mu)."
        )


def _check_uncond(uncond: Any, model: Any, model_name: str, name: str = "uncond") -> None:
    check_mapping(uncond, name)
    if uncond is not None and not isinstance(model, TeacherSolver):
        raise OptionError(
            f"`{name}` is the unconditional branch of a TeacherSolver's classifier-free guidance, but `{model_name}` "
            f"is a plain {type(model).__name__}, which would ignore it. Wrap the model in a TeacherSolver with a "
            f"guidance_scale, or leave `{name}` None."
        )


def _check_sample(x: Any, name: str) -> torch.Tensor:
    """A floating, non-empty ``(B, ...)`` tensor, finite while value checks are on."""
    check_tensor(x, name)
    if x.ndim == 0:
        raise ShapeError(
            f"Expected `{name}` to have a batch dimension, shape (B, ...), but got a 0-d tensor. Use "
            f"{name}.reshape(1, -1) for a single sample.",
            name=name,
            expected="(B, ...)",
            actual=(),
        )
    return check_float_input(x, name)


def _check_noise(noise: Any, x: torch.Tensor, x_name: str) -> None:
    if noise is not None:
        check_float_input(noise, "noise")
        check_same_shape(x, noise, x_name, "noise")


def _check_t_range(t_range: Any, t: Any, schedule: NoiseSchedule) -> None:
    if t_range is None:
        return
    if t is not None:
        raise OptionError(
            "`t_range` is the range `t` is drawn from when `t` is None, but an explicit `t` was given too: pass "
            "one of them."
        )
    last = schedule.num_train_timesteps - 1
    ok = (
        isinstance(t_range, (Sequence, torch.Tensor))
        and not isinstance(t_range, (str, bytes))
        and len(t_range) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in t_range)
    )
    if ok:
        low, high = t_range
        ok = int(low) == low and int(high) == high and 0 <= low <= high <= last
    if not ok:
        shown = tuple(t_range) if isinstance(t_range, (Sequence, torch.Tensor)) else t_range
        raise OptionError(
            f"Expected `t_range` = (low, high), integers with 0 <= low <= high <= {last} (the noisy "
            f"timesteps to draw), but got {shown!r}."
        )


def _check_common(
    x: Any,
    x_name: str,
    schedule: Any,
    noise: Any,
    t: Any,
    t_range: Any,
    reduction: str,
    conds: Mapping[str, Any],
) -> torch.Tensor:
    """The checks every score loss makes before running a network; returns ``x``."""
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_schedule(schedule)
    _check_sample(x, x_name)
    _check_noise(noise, x, x_name)
    for name, value in conds.items():
        check_mapping(value, name)
    _check_t_range(t_range, t, schedule)
    return x


# --------------------------------------------------------------------------------------------- denoisers
def denoise(
    model: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    prediction_type: str | None = None,
    grad: bool = True,
) -> torch.Tensor:
    """Clean-sample estimate :math:`D(x_t, t)` from a TeacherSolver (with its CFG) or a plain model.

    The model runs on ``x_t`` as given (its own dtype); the estimate is returned in float32 for
    bf16/fp16/float32 inputs (float64 for float64), so that the difference of two
    denoisers' estimates -- what DMD, SiD and SIM differentiate -- is not lost to half-precision rounding.

    Args:
        model: a :class:`~diffdistill.schedulers.TeacherSolver` (its guidance scale and prediction type
            apply) or a callable ``model(x_t, t, **cond)`` returning a tensor of ``x_t``'s shape (or an
            output whose ``.sample`` / first element is one); on a flow schedule it gets the ``(B,)`` model
            timestep (:meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep`), on VP ``t`` as given.
        x_t: the noisy states, ``(B, ...)`` floating.
        t: their timesteps: a scalar or one per sample ``(B,)``, integer indices in ``[-1, T-1]``.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that converts the output to
            :math:`\\hat x_0`.
        cond: keyword arguments of the model (the conditional branch); None (the default) passes none.
        uncond: the unconditional keyword arguments of a TeacherSolver's guidance; None (the default) for a
            no-op guidance scale or a plain model.
        prediction_type: what a plain model predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``,
            ...); None (the default) uses the schedule's. Ignored for a TeacherSolver (it has its own).
        grad: build the autograd graph (default True); False runs the model under ``no_grad``.

    Returns:
        :math:`\\hat x_0`, the shape of ``x_t``, float32 (float64 for float64 ``x_t``).

    Raises:
        DTypeError: ``model`` is neither a TeacherSolver nor callable, ``schedule`` is no NoiseSchedule,
            ``x_t`` is not a floating-point tensor, ``cond`` / ``uncond`` is not a mapping, ``grad`` is not a
            bool, or ``t`` holds bools.
        ShapeError: ``x_t`` is empty, ``t`` is neither a scalar nor ``(B,)``, or the model returns another
            shape than ``x_t``'s.
        OptionError: ``t`` is missing, fractional or outside ``[-1, T-1]``, ``prediction_type`` is unknown,
            ``uncond`` is given with a plain model (which would ignore it), or a TeacherSolver ``model`` runs on
            another schedule than ``schedule`` (other noise levels or model timesteps).
        NonFiniteError: ``x_t`` holds NaN or Inf (a value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 3)
        >>> torch.equal(denoise(lambda x, t: 0.5 * x, x, torch.tensor([10, 20]), s), 0.5 * x)
        True
    """
    _check_model(model, "model")
    _check_schedule(schedule)
    check_float_input(x_t, "x_t")
    if t is None:
        raise OptionError("Expected `t`, the timesteps of `x_t` (a scalar or one per sample), but got None.")
    check_mapping(cond, "cond")
    _check_uncond(uncond, model, "model")
    _check_solver_schedule(model, schedule, "model")
    check_bool(grad, "grad")
    if schedule.kind == "flow" and not isinstance(model, TeacherSolver):
        # the network takes the schedule's model timestep of every sample: validate and expand the indices
        t = schedule.batch_timesteps(t, x_t)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 or t.shape[0] == 1 else t
    return _estimate(model, x_t, _f32(x_t), t, schedule, cond, uncond, prediction_type, grad, "model")


def _estimate(
    model: Denoiser,
    x_in: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | TimestepLike,
    schedule: NoiseSchedule,
    cond: Cond,
    uncond: Cond,
    prediction_type: str | None,
    grad: bool,
    name: str,
) -> torch.Tensor:
    """``model`` on ``x_in`` (the network's dtype); the x0 conversion with ``x_t`` (the same state, >= float32).

    Score losses take the small difference of two estimates (and of an estimate and ``x``): rounding each
    to bf16 first, or letting their ``x_t`` terms meet in a bf16 gradient, would swamp it. ``name`` is the
    model's argument name in messages.
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if isinstance(model, TeacherSolver):
            out = model.predict(x_in, t, cond, uncond, grad=grad)
            prediction_type = model.prediction_type
        else:
            out = first_tensor(
                model(x_in, _network_timestep(schedule, t), **dict(cond or {})), f"`{name}` model"
            )
        check_prediction(out, x_in, name)
        return schedule.to_x0(out, x_t, t, prediction_type)


def _sample_t(
    t: TimestepLike | None,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    t_range: tuple[int, int],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if t is None:
        low, high = t_range
        t = uniform_timesteps(x.shape[0], int(low), int(high), generator=generator, device=x.device).t
    tt = schedule.batch_timesteps(t, x)
    tt = tt.expand(x.shape[0]) if tt.ndim == 0 else tt
    if value_checks_enabled() and bool((tt < 0).any()):  # t = -1 is the clean end: x_t = x0, sigma 0
        raise OptionError(
            f"Expected `t` >= 0 (score losses noise x0 to x_t at t; t = -1 is the clean end, where sigma is "
            f"0), but got {tt.tolist()}."
        )
    return tt


def _noise(noise: torch.Tensor | None, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if noise is not None:
        return noise
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)


def _default_range(schedule: NoiseSchedule, lo: float, hi: float) -> tuple[int, int]:
    total = schedule.num_train_timesteps
    return round(lo * total), min(round(hi * total), total - 1)  # a small T (10) would round 0.98T up to T


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


#: sim_loss's default pseudo-Huber c as a fraction of the samples' RMS norm.
SIM_C_FRACTION = 0.05


def _default_c(x: torch.Tensor) -> torch.Tensor:
    """sim_loss's default ``c``: ``SIM_C_FRACTION`` times the batch's RMS per-sample norm (detached, >= 1e-8)."""
    xf = _per_sample(_f32(x.detach()))
    return (SIM_C_FRACTION * xf.pow(2).sum(dim=1).mean().sqrt()).clamp_min(1e-8)


def _real_and_fake(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    schedule: NoiseSchedule,
    cond: Cond,
    uncond: Cond,
    fake_cond: Cond,
    t: TimestepLike | None,
    noise: torch.Tensor | None,
    t_range: tuple[int, int] | None,
    prediction_type: str | None,
    generator: torch.Generator | None,
    fake_uncond: Cond = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``t`` (default U[0.02T, 0.98T]), noise ``x`` and evaluate both denoisers (in >= float32).

    ``fake_uncond`` is the unconditional branch of a guided fake score (a TeacherSolver ``fake``).
    """
    tt = _sample_t(t, x, schedule, t_range or _default_range(schedule, 0.02, 0.98), generator)
    # The noisy state in >= float32 for the losses' arithmetic (its x terms cancel there), in x's dtype for
    # the networks (the same values the networks saw before any upcasting).
    # x, noise and tt were checked at the loss's boundary: the unchecked forward process (no second sync).
    x_t = schedule._add_noise(_f32(x), _f32(_noise(noise, x, generator)), tt)
    x_in = x_t.to(x.dtype)
    d_real = _estimate(real, x_in, x_t, tt, schedule, cond, uncond, prediction_type, True, "real")
    f_cond = cond if fake_cond is None else fake_cond
    d_fake = _estimate(fake, x_in, x_t, tt, schedule, f_cond, fake_uncond, prediction_type, True, "fake")
    return tt, d_real, d_fake


def _check_score_loss(
    x: Any,
    real: Any,
    fake: Any,
    schedule: Any,
    cond: Any,
    uncond: Any,
    fake_cond: Any,
    t: Any,
    noise: Any,
    t_range: Any,
    reduction: str,
    fake_uncond: Any = None,
) -> None:
    """The boundary checks of :func:`dmd_loss`, :func:`sid_loss` and :func:`sim_loss`."""
    _check_model(real, "real")
    _check_model(fake, "fake")
    _check_common(x, "x", schedule, noise, t, t_range, reduction, {"cond": cond, "fake_cond": fake_cond})
    _check_uncond(uncond, real, "real")
    _check_uncond(fake_uncond, fake, "fake", "fake_uncond")
    _check_solver_schedule(real, schedule, "real")
    _check_solver_schedule(fake, schedule, "fake")


def dmd_loss(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    *,
    schedule: NoiseSchedule,
    cond: Cond = None,
    uncond: Cond = None,
    fake_cond: Cond = None,
    fake_uncond: Cond = None,
    t: TimestepLike | None = None,
    noise: torch.Tensor | None = None,
    t_range: tuple[int, int] | None = None,
    prediction_type: str | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distribution-matching (DMD / DMD2 / VSD) generator loss (Yin et al. 2024, arXiv:2311.18828, 2405.14867).

    .. math::

        g = \\frac{D_\\psi(x_t) - D_\\phi(x_t)}{\\operatorname{mean}_{CHW}|x - D_\\phi(x_t)|}, \\qquad
        \\mathcal L = \\tfrac12 \\operatorname{mean}\\big(x - \\mathrm{sg}(x - g)\\big)^2,

    so :math:`\\partial\\mathcal L / \\partial x = g / \\text{numel}` (the real/fake predictions are taken
    under ``no_grad``; as in DMD2, ``torch.nan_to_num`` zeroes NaNs in ``g`` and clips the infinities of a
    zero normaliser to the dtype's largest value). ``t`` defaults to :math:`U[0.02T, 0.98T]`.
    ``reduction="none"`` gives each sample's term (the mean over its elements), ``"sum"`` their sum.

    Args:
        x: the generator's samples, ``(B, ...)`` floating (the gradient reaches the generator through it).
        real: the real (teacher) denoiser :math:`D_\\phi`: a :class:`~diffdistill.schedulers.TeacherSolver`
            (its guidance applies) or a callable ``model(x_t, t, **cond)``.
        fake: the online fake denoiser :math:`D_\\psi`, the same kinds.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that noises ``x`` and converts the
            outputs to :math:`\\hat x_0`.
        cond: keyword arguments of both denoisers (the prompt); None (the default) passes none.
        uncond: the unconditional keyword arguments of ``real``'s guidance (a TeacherSolver only); None
            (the default) for a no-op guidance scale.
        fake_cond: keyword arguments of ``fake``; None (the default) uses ``cond``.
        fake_uncond: the unconditional keyword arguments of ``fake``'s guidance when ``fake`` is a
            :class:`~diffdistill.schedulers.TeacherSolver` with a guidance scale (SiD-LSG's guided fake
            score, :math:`\\kappa_2 = \\kappa_3`); None (the default) for a no-op guidance scale or a plain model.
        t: the timesteps, a scalar or ``(B,)`` ints in ``[0, T-1]``; None (the default) draws
            :math:`U\\{t_{lo}, ..., t_{hi}\\}` from ``t_range``.
        noise: the noise of :math:`x_t`, the shape of ``x``; None (the default) draws it from ``generator``.
        t_range: ``(low, high)`` for the draw of ``t``; None (the default) is :math:`[0.02T, 0.98T]`.
        prediction_type: what plain-callable denoisers predict; None (the default) uses the schedule's.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample terms, shape ``(B,)``).
        generator: draws ``t`` and the noise; None uses the global RNG.

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``; float32, float64 for float64
        ``x``) and detached 0-d logs ``loss`` (the mean term), ``grad_norm`` (RMS of ``g``) and ``t_mean``.

    Raises:
        DTypeError: ``x`` or ``noise`` is not a floating-point tensor, ``real`` / ``fake`` is neither a
            TeacherSolver nor callable, ``schedule`` is no NoiseSchedule, a ``cond`` argument is not a
            mapping, or a denoiser returns no floating tensor.
        ShapeError: ``x`` is 0-d or empty, ``noise`` has another shape, ``t`` is neither a scalar nor
            ``(B,)``, or a denoiser returns another shape than ``x``'s.
        OptionError: ``reduction`` or ``prediction_type`` is unknown, ``t`` is outside ``[0, T-1]``,
            ``t_range`` is invalid or given with ``t``, ``uncond`` is given with a plain-callable ``real``,
            ``fake_uncond`` with a plain-callable ``fake``, or a TeacherSolver ``real`` / ``fake`` runs on another
            schedule than ``schedule``.
        NonFiniteError: ``x`` or ``noise`` holds NaN or Inf (a value check, see :mod:`diffdistill.errors`).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> loss, logs = dmd_loss(x, lambda x, t: torch.zeros_like(x), lambda x, t: 0.5 * x, schedule=s,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); x.grad.shape
        torch.Size([2, 4])
    """
    _check_score_loss(
        x, real, fake, schedule, cond, uncond, fake_cond, t, noise, t_range, reduction, fake_uncond
    )
    with torch.no_grad():
        tt, x0_real, x0_fake = _real_and_fake(
            x.detach(),
            real,
            fake,
            schedule,
            cond,
            uncond,
            fake_cond,
            t,
            noise,
            t_range,
            prediction_type,
            generator,
            fake_uncond,
        )
        xf = _f32(x.detach())
        p_real, p_fake = xf - x0_real, xf - x0_fake
        norm = _per_sample(p_real).abs().mean(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
        g = torch.nan_to_num((p_real - p_fake) / norm)
    xw = _f32(x)
    per = 0.5 * _per_sample(xw - (xw - g).detach()).pow(2).mean(dim=1)
    loss = _reduce(per, reduction)
    return loss, {
        "loss": per.detach().mean(),
        "grad_norm": g.pow(2).mean().sqrt().detach(),
        "t_mean": tt.float().mean().detach(),
    }


def sid_loss(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    *,
    schedule: NoiseSchedule,
    alpha: float = 1.2,
    cond: Cond = None,
    uncond: Cond = None,
    fake_cond: Cond = None,
    fake_uncond: Cond = None,
    t: TimestepLike | None = None,
    noise: torch.Tensor | None = None,
    t_range: tuple[int, int] | None = None,
    prediction_type: str | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score identity distillation generator loss (Zhou et al., ICML 2024, arXiv:2404.04057; SiD-LSG).

    .. math::

        \\mathcal L = \\frac{1}{w}\\sum_{CHW} (D_\\phi - D_\\psi)\\odot\\big((D_\\phi - x) - \\alpha (D_\\phi - D_\\psi)\\big),
        \\qquad w = \\mathrm{sg}\\,\\max(\\operatorname{mean}_{CHW}|x - D_\\phi|, 10^{-5}),

    per sample, with :math:`D_\\phi, D_\\psi` evaluated at :math:`x_t = \\alpha_t x + \\sigma_t\\epsilon`
    with gradients through their inputs. ``alpha = 1.2`` in SiD's EDM runs; SiD-LSG's Stable Diffusion runs
    use ``alpha = 1`` (Zhou et al. 2024, arXiv:2406.01561; ``run_sid.sh --alpha 1``). ``t`` defaults to
    :math:`U\\{20, ..., 980\\}` (SiD-LSG). The loss can be negative: log samples, not this value.

    Args:
        x: the generator's samples, ``(B, ...)`` floating (the gradient reaches the generator through it).
        real: the real (teacher) denoiser :math:`D_\\phi`: a :class:`~diffdistill.schedulers.TeacherSolver`
            (its guidance applies) or a callable ``model(x_t, t, **cond)``.
        fake: the online fake denoiser :math:`D_\\psi`, the same kinds.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that noises ``x`` and converts the
            outputs to :math:`\\hat x_0`.
        alpha: SiD's :math:`\\alpha`, a finite number (default 1.2, the paper's).
        cond: keyword arguments of both denoisers (the prompt); None (the default) passes none.
        uncond: the unconditional keyword arguments of ``real``'s guidance (a TeacherSolver only); None
            (the default) for a no-op guidance scale.
        fake_cond: keyword arguments of ``fake``; None (the default) uses ``cond``.
        fake_uncond: the unconditional keyword arguments of ``fake``'s guidance when ``fake`` is a
            :class:`~diffdistill.schedulers.TeacherSolver` with a guidance scale (SiD-LSG's guided fake
            score, :math:`\\kappa_2 = \\kappa_3`); None (the default) for a no-op guidance scale or a plain model.
        t: the timesteps, a scalar or ``(B,)`` ints in ``[0, T-1]``; None (the default) draws them from
            ``t_range``.
        noise: the noise of :math:`x_t`, the shape of ``x``; None (the default) draws it from ``generator``.
        t_range: ``(low, high)`` for the draw of ``t``; None (the default) is :math:`[0.02T, 0.98T]`.
        prediction_type: what plain-callable denoisers predict; None (the default) uses the schedule's.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample losses, shape ``(B,)``).
        generator: draws ``t`` and the noise; None uses the global RNG.

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``) and detached 0-d logs ``loss``,
        ``score_gap`` (RMS of :math:`D_\\phi - D_\\psi`) and ``t_mean``.

    Raises:
        DTypeError: ``x`` or ``noise`` is not a floating-point tensor, ``real`` / ``fake`` is neither a
            TeacherSolver nor callable, ``schedule`` is no NoiseSchedule, a ``cond`` argument is not a
            mapping, ``alpha`` is not a real number, or a denoiser returns no floating tensor.
        ShapeError: ``x`` is 0-d or empty, ``noise`` has another shape, ``t`` is neither a scalar nor
            ``(B,)``, or a denoiser returns another shape than ``x``'s.
        OptionError: ``alpha`` is not finite, ``reduction`` or ``prediction_type`` is unknown, ``t``
            is outside ``[0, T-1]``, ``t_range`` is invalid or given with ``t``, ``uncond`` is given with a
            plain-callable ``real``, ``fake_uncond`` with a plain-callable ``fake``, or a TeacherSolver ``real`` /
            ``fake`` runs on another schedule than ``schedule``.
        NonFiniteError: ``x`` or ``noise`` holds NaN or Inf (a value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> loss, _ = sid_loss(x, lambda x, t: 0.9 * x, lambda x, t: 0.5 * x, schedule=s,
        ...                    generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); bool(x.grad.abs().sum() > 0)
        True
    """
    alpha = check_real(alpha, "alpha")
    _check_score_loss(
        x, real, fake, schedule, cond, uncond, fake_cond, t, noise, t_range, reduction, fake_uncond
    )
    tt, d_real, d_fake = _real_and_fake(
        x,
        real,
        fake,
        schedule,
        cond,
        uncond,
        fake_cond,
        t,
        noise,
        t_range,
        prediction_type,
        generator,
        fake_uncond,
    )
    xf = _f32(x)
    weight = _per_sample(xf - d_real).abs().mean(dim=1).clamp_min(1e-5).detach()
    diff = d_real - d_fake
    per = _per_sample(diff * ((d_real - xf) - alpha * diff)).sum(dim=1) / weight
    loss = _reduce(per, reduction)
    return loss, {
        "loss": per.detach().mean(),
        "score_gap": diff.detach().pow(2).mean().sqrt(),
        "t_mean": tt.float().mean().detach(),
    }


def sim_loss(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    *,
    schedule: NoiseSchedule,
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber",
    c: float | None = None,
    detach_dprime: bool = False,
    weight: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    fake_cond: Cond = None,
    fake_uncond: Cond = None,
    t: TimestepLike | None = None,
    noise: torch.Tensor | None = None,
    t_range: tuple[int, int] | None = None,
    prediction_type: str | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score implicit matching generator loss (Luo et al., NeurIPS 2024, arXiv:2410.16794), denoiser form.

    With :math:`y = D_\\psi(x_t) - D_\\phi(x_t)` and a distance :math:`d` with gradient :math:`d'`,

    .. math:: \\mathcal L = -\\,w(t)\\; d'(y)^\\top \\big(D_\\psi(x_t) - x\\big),

    :math:`d(y) = \\sqrt{\\lVert y\\rVert^2 + c^2} - c` (``"pseudo_huber"``, :math:`d'(y) = y/\\sqrt{\\lVert y\\rVert^2 + c^2}`,
    per sample over all dims) or :math:`d(y) = \\tfrac12\\lVert y \\rVert^2` (``"l2"``, :math:`d' = y`; then
    this equals :func:`sid_loss` with ``alpha = 1`` times SiD's normaliser). The gradient flows through
    :math:`x` and through both networks' inputs at :math:`x_t`. The paper leaves open whether
    :math:`d'(y)` is held constant: ``detach_dprime=True`` stops its gradient. ``weight`` is
    :math:`w(t)`: a ``(B,)`` tensor or a callable of ``t``. ``t`` defaults to :math:`U[0.02T, 0.98T]`.

    ``c`` is in denoiser (x0) units, so it must scale with the data. The default (our choice; the paper's
    value is not verified) is 5% of the samples' RMS norm, :math:`c = 0.05\\sqrt{\\operatorname{mean}_b
    \\lVert x_b\\rVert^2}` over the batch (detached): 0.1 for a mixture on a circle of radius 2, about 13
    for SDXL latents of unit scale (``D = 4 \\cdot 128 \\cdot 128``). A fixed constant does not carry across
    data: the iCT heuristic :math:`0.00054\\sqrt{D}` (this loss's former default) is 0.0008 in 2-D, where
    :math:`d'(y)` becomes a unit vector that never shrinks as the generator approaches the data, so samples
    that reached a mode keep being kicked off it (issue 20: free particles got *worse*, SW 0.163 → 0.240;
    with ``c = 0.1`` they reach 0.049). Pass ``c`` explicitly to pin it.

    Args:
        x: the generator's samples, ``(B, ...)`` floating (the gradient reaches the generator through it).
        real: the real (teacher) denoiser :math:`D_\\phi`: a :class:`~diffdistill.schedulers.TeacherSolver`
            (its guidance applies) or a callable ``model(x_t, t, **cond)``.
        fake: the online fake denoiser :math:`D_\\psi`, the same kinds.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that noises ``x`` and converts the
            outputs to :math:`\\hat x_0`.
        distance: ``"pseudo_huber"`` (the default) or ``"l2"``.
        c: the pseudo-Huber constant, a finite number ``> 0`` in denoiser units (``"pseudo_huber"`` only);
            None (the default) is 5% of the batch's RMS sample norm (see above; at least ``1e-8``).
        detach_dprime: stop the gradient of :math:`d'(y)` (default False: it flows).
        weight: :math:`w(t)`: a scalar or ``(B,)`` tensor, or a callable of the ``(B,)`` timesteps returning
            one; None (the default) is 1.
        cond: keyword arguments of both denoisers (the prompt); None (the default) passes none.
        uncond: the unconditional keyword arguments of ``real``'s guidance (a TeacherSolver only); None
            (the default) for a no-op guidance scale.
        fake_cond: keyword arguments of ``fake``; None (the default) uses ``cond``.
        fake_uncond: the unconditional keyword arguments of ``fake``'s guidance when ``fake`` is a
            :class:`~diffdistill.schedulers.TeacherSolver` with a guidance scale (SiD-LSG's guided fake
            score, :math:`\\kappa_2 = \\kappa_3`); None (the default) for a no-op guidance scale or a plain model.
        t: the timesteps, a scalar or ``(B,)`` ints in ``[0, T-1]``; None (the default) draws them from
            ``t_range``.
        noise: the noise of :math:`x_t`, the shape of ``x``; None (the default) draws it from ``generator``.
        t_range: ``(low, high)`` for the draw of ``t``; None (the default) is :math:`[0.02T, 0.98T]`.
        prediction_type: what plain-callable denoisers predict; None (the default) uses the schedule's.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample losses, shape ``(B,)``).
        generator: draws ``t`` and the noise; None uses the global RNG.

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``) and detached 0-d logs ``loss``,
        ``score_gap`` (RMS of :math:`y`) and ``t_mean``.

    Raises:
        DTypeError: ``x`` or ``noise`` is not a floating-point tensor, ``real`` / ``fake`` is neither a
            TeacherSolver nor callable, ``schedule`` is no NoiseSchedule, a ``cond`` argument is not a
            mapping, ``detach_dprime`` is not a bool, ``c`` is not a real number, ``weight`` is a bool tensor,
            or a denoiser returns no floating tensor.
        ShapeError: ``x`` is 0-d or empty, ``noise`` has another shape, ``t`` is neither a scalar nor
            ``(B,)``, a denoiser returns another shape than ``x``'s, or ``weight`` is neither a scalar nor
            ``(B,)``.
        OptionError: ``distance``, ``reduction`` or ``prediction_type`` is unknown, ``c`` is not finite and
            ``> 0`` or is given with ``distance="l2"``, ``t`` is outside ``[0, T-1]``, ``t_range`` is
            invalid or given with ``t``, ``uncond`` is given with a plain-callable ``real``, ``fake_uncond``
            with a plain-callable ``fake``, or a TeacherSolver ``real`` / ``fake`` runs on another schedule than
            ``schedule``.
        NonFiniteError: ``x``, ``noise`` or ``weight`` holds NaN or Inf (a value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> loss, _ = sim_loss(x, lambda x, t: 0.9 * x, lambda x, t: 0.5 * x, schedule=s, c=0.1,
        ...                    generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); bool(x.grad.abs().sum() > 0)
        True
    """
    check_option(distance, "distance", ("pseudo_huber", "l2"))
    if distance == "l2" and c is not None:
        raise OptionError(
            f"`c` is the pseudo-Huber constant and unused with distance='l2', but got c={c!r}: leave it None "
            "or use distance='pseudo_huber'."
        )
    if c is not None:
        check_real(c, "c", low=0, strict=True)
    check_bool(detach_dprime, "detach_dprime")
    if weight is not None and not callable(weight) and not isinstance(weight, (torch.Tensor, numbers.Real)):
        raise DTypeError(
            f"Expected `weight` (w(t)) to be a tensor, a number, a callable of t or None, but got "
            f"{type(weight).__name__}."
        )
    _check_score_loss(
        x, real, fake, schedule, cond, uncond, fake_cond, t, noise, t_range, reduction, fake_uncond
    )
    tt, real_x0, fake_x0 = _real_and_fake(
        x,
        real,
        fake,
        schedule,
        cond,
        uncond,
        fake_cond,
        t,
        noise,
        t_range,
        prediction_type,
        generator,
        fake_uncond,
    )
    d_real, d_fake = _per_sample(real_x0), _per_sample(fake_x0)
    y = d_fake - d_real
    if distance == "pseudo_huber":
        cc = _default_c(x) if c is None else c
        dprime = y / torch.sqrt(y.pow(2).sum(dim=1, keepdim=True) + cc**2)
    else:
        dprime = y
    if detach_dprime:
        dprime = dprime.detach()
    per = -(dprime * (d_fake - _per_sample(_f32(x)))).sum(dim=1)
    if weight is not None:
        w_in = weight(tt) if callable(weight) else weight
        if isinstance(w_in, torch.Tensor) and w_in.dtype == torch.bool:
            raise DTypeError(
                "Expected `weight` (w(t)) to hold numbers, but got a bool tensor. Cast it first."
            )
        w = torch.as_tensor(w_in, dtype=per.dtype, device=per.device)
        if w.ndim > 1 or w.numel() not in (1, per.shape[0]):
            raise ShapeError(
                f"Expected `weight` (w(t)) to be a scalar or one value per sample, shape ({per.shape[0]},), "
                f"but got shape {tuple(w.shape)}.",
                name="weight",
                expected=(per.shape[0],),
                actual=tuple(w.shape),
            )
        check_finite(w, "weight")
        per = per * w.reshape(-1)
    loss = _reduce(per, reduction)
    return loss, {
        "loss": per.detach().mean(),
        "score_gap": y.detach().pow(2).mean().sqrt(),
        "t_mean": tt.float().mean().detach(),
    }


def fake_score_loss(
    fake: Denoiser,
    x0: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    weighting: Literal["epsilon", "v", "x0", "edm", "flow"] = "epsilon",
    cond: Cond = None,
    uncond: Cond = None,
    t: TimestepLike | None = None,
    noise: torch.Tensor | None = None,
    t_range: tuple[int, int] | None = None,
    prediction_type: str | None = None,
    sigma_data: float = 0.5,
    reduction: Literal["mean", "sum", "none"] = "mean",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Denoising score matching of the fake score on *detached* generator samples (DMD2, SiD, SIM).

    .. math:: \\mathcal L = \\lambda(t)\\,\\lVert \\hat u(x_t, t) - u \\rVert^2 / D, \\qquad x_t = \\alpha_t\\,\\mathrm{sg}(x_0) + \\sigma_t\\epsilon

    where ``weighting`` picks the space of :math:`u` and :math:`\\lambda`: ``"epsilon"`` (the noise,
    :math:`\\lambda = 1`; DMD2's ``compute_loss_fake``), ``"v"`` (:math:`\\alpha_t\\epsilon - \\sigma_t x_0`
    with SiD's :math:`\\lambda = \\mathrm{SNR}/(\\mathrm{SNR}+1) = \\alpha_t^2/(\\alpha_t^2+\\sigma_t^2)`, which
    makes it equal to the epsilon loss in value and gradient for a variance-preserving schedule, computed
    in v space; zero at a zero-terminal-SNR last step), ``"x0"`` (the clean sample, :math:`\\lambda = 1`),
    or ``"edm"`` (clean sample with Karras et al.'s :math:`\\lambda = (\\sigma^2 + \\sigma_d^2)/(\\sigma\\sigma_d)^2`,
    :math:`\\sigma = \\sigma_t/\\alpha_t`, computed as :math:`1/\\sigma_d^2 + \\alpha_t^2/\\sigma_t^2`: :math:`1/\\sigma_d^2` at a flow
    schedule's pure-noise step; SiD), or ``"flow"`` (rectified-flow schedules only: the velocity
    :math:`u = \\epsilon - x_0` with :math:`\\lambda = 1`, the conditional flow-matching loss of SD3,
    Esser et al. 2024, Sec. 2-3, which is the epsilon loss weighted by :math:`1/\\alpha_t^2`; FastGen's and
    SiD-on-flow's fake scores regress the same velocity as the teacher was trained on). On a flow schedule
    ``"v"`` regresses the schedule's ``"v_prediction"`` (:math:`(\\alpha_t\\epsilon - \\sigma_t x_0) /
    \\sqrt{\\alpha_t^2+\\sigma_t^2}`, TrigFlow's F), with the same :math:`\\lambda` it again equals the epsilon
    loss. The network's own ``prediction_type`` is converted as needed.
    ``t`` defaults to :math:`U\\{0..T-1\\}`; SiD-LSG draws it from :math:`U\\{20..979\\}` (``t_range=(20, 979)``).
    A :class:`~diffdistill.schedulers.TeacherSolver` ``fake`` with a guidance scale trains the *guided*
    prediction :math:`\\hat u = \\hat u_\\varnothing + \\kappa_1(\\hat u_c - \\hat u_\\varnothing)` (both branches
    receive gradients), as SiD-LSG's fake-score update does with :math:`\\kappa_1` = ``cfg_train_fake``
    (Zhou et al. 2024, arXiv:2406.01561).

    Args:
        fake: the fake denoiser being trained: a callable ``fake(x_t, t, **cond)`` returning a prediction of
            ``x_t``'s shape (of type ``prediction_type``), or a
            :class:`~diffdistill.schedulers.TeacherSolver` around it (its guidance scale and prediction type
            apply; the graph is recorded).
        x0: the generator's samples, ``(B, ...)`` floating; detached here.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that noises ``x0``.
        weighting: ``"epsilon"`` (the default), ``"v"``, ``"x0"``, ``"edm"`` or ``"flow"`` (flow schedules;
            see above).
        cond: keyword arguments of ``fake``; None (the default) passes none.
        uncond: the unconditional keyword arguments of a TeacherSolver ``fake``'s guidance; None (the
            default) for a no-op guidance scale or a plain model.
        t: the timesteps, a scalar or ``(B,)`` ints in ``[0, T-1]``; None (the default) draws them from
            ``t_range``.
        noise: the noise of :math:`x_t`, the shape of ``x0``; None (the default) draws it from ``generator``.
        t_range: ``(low, high)`` for the draw of ``t``, inclusive; None (the default) is ``(0, T-1)``.
        prediction_type: what a plain ``fake`` predicts; None (the default) uses the schedule's. Ignored for
            a TeacherSolver (it has its own).
        sigma_data: :math:`\\sigma_d` of the ``"edm"`` weighting, a finite number ``> 0`` (default 0.5).
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample losses, shape ``(B,)``).
        generator: draws ``t`` and the noise; None uses the global RNG.

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``) and detached 0-d logs ``loss``
        and ``t_mean``.

    Raises:
        DTypeError: ``x0`` or ``noise`` is not a floating-point tensor, ``fake`` is neither a TeacherSolver nor
            callable, ``schedule`` is no NoiseSchedule, ``cond`` / ``uncond`` is not a mapping, ``sigma_data`` is
            not a real number, or ``fake`` returns no floating tensor.
        ShapeError: ``x0`` is 0-d or empty, ``noise`` has another shape, ``t`` is neither a scalar nor
            ``(B,)``, or ``fake`` returns another shape than ``x0``'s.
        OptionError: ``weighting``, ``reduction`` or ``prediction_type`` is unknown, ``weighting="flow"`` on a
            VP schedule, ``sigma_data`` is not
            finite and ``> 0``, ``t`` is outside ``[0, T-1]``, ``t_range`` is invalid or given with ``t``,
            ``uncond`` is given with a plain-callable ``fake``, a TeacherSolver ``fake`` has a real guidance
            scale and ``uncond`` is None, or runs on another schedule than ``schedule``.
        NonFiniteError: ``x0`` or ``noise`` holds NaN or Inf (a value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas()
        >>> net = torch.nn.Linear(4, 4)
        >>> loss, _ = fake_score_loss(lambda x, t: net(x), torch.randn(8, 4), schedule=s,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); net.weight.grad is not None
        True
    """
    _check_model(fake, "fake")
    flow = isinstance(schedule, NoiseSchedule) and schedule.kind == "flow"
    if weighting == "flow" and isinstance(schedule, NoiseSchedule) and not flow:
        raise OptionError(
            "weighting='flow' regresses the rectified-flow velocity eps - x0, which a VP schedule's models do not "
            "predict, but got a VP schedule. Use weighting='epsilon' or 'v' (SiD), or a flow schedule "
            "(NoiseSchedule.flow_matching / from_scheduler of a FlowMatchEulerDiscreteScheduler)."
        )
    check_option(
        weighting,
        "weighting",
        ("epsilon", "v", "x0", "edm", "flow") if flow else ("epsilon", "v", "x0", "edm"),
    )
    sigma_data = check_real(sigma_data, "sigma_data", low=0, strict=True)
    _check_common(x0, "x0", schedule, noise, t, t_range, reduction, {"cond": cond})
    _check_uncond(uncond, fake, "fake")
    _check_solver_schedule(fake, schedule, "fake")
    x0 = x0.detach()
    tt = _sample_t(t, x0, schedule, t_range or (0, schedule.num_train_timesteps - 1), generator)
    eps = _noise(noise, x0, generator)
    # As in the score losses: the state in >= float32 for the conversion, in x0's dtype for the network.
    x_t = schedule._add_noise(_f32(x0), _f32(eps), tt)  # inputs checked above: no second sync
    x_in = x_t.to(x0.dtype)
    if isinstance(fake, TeacherSolver):  # guided: cond and uncond branches both in the graph
        out = fake.predict(x_in, tt, cond, uncond, grad=True)
        prediction_type = fake.prediction_type
    else:
        out = first_tensor(fake(x_in, _network_timestep(schedule, tt), **dict(cond or {})), "`fake` model")
    check_prediction(out, x_in, "fake")
    to_type = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample", "edm": "sample", "flow": "flow"}[
        weighting
    ]
    pred = schedule.convert(out, x_t, tt, prediction_type, to_type)
    if weighting == "epsilon":
        target = eps
    elif weighting == "v":  # from x0 and eps, not x_t: x_t holds no x0 at t = T-1 with terminal_pure_noise
        a_t, s_t = schedule.alpha(tt, like=pred), schedule.sigma(tt, like=pred)
        target = a_t * eps - s_t * x0
        if schedule.kind == "flow":  # the schedule's v_prediction on flow: the equivalent VP state's v
            target = target / (a_t * a_t + s_t * s_t).sqrt()
        target = target.to(pred.dtype)
    elif weighting == "flow":  # the velocity d x_t / d sigma of the straight path (SD3 Sec. 2)
        target = eps - x0
    else:
        target = x0
    per = _per_sample(pred - _f32(target)).pow(2).mean(dim=1)
    if weighting == "v":  # SiD-LSG's fake-score loss: v-MSE x SNR / (SNR + 1)
        a2, s2 = schedule.alpha(tt) ** 2, schedule.sigma(tt) ** 2
        per = per * (a2 / (a2 + s2)).to(per.dtype)
    elif weighting == "edm":
        # (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1/sigma_d^2 + alpha_t^2/sigma_t^2 with sigma = sigma_t/alpha_t:
        # finite at a flow schedule's last step (alpha = 0, sigma = inf), where the first form is inf/inf.
        a, s = schedule.alpha(tt), schedule.sigma(tt)
        per = per * (1.0 / sigma_data**2 + (a / s) ** 2).to(per.dtype)
    loss = _reduce(per, reduction)
    return loss, {"loss": per.detach().mean(), "t_mean": tt.float().mean().detach()}


class AlternatingUpdate:
    """Alternate generator and fake-score (or discriminator) updates with an update ratio.

    Each :meth:`step` runs ``fake_step()`` ``fake_steps`` times, and ``generator_step()`` when the step
    counter is a multiple of ``generator_every`` (DMD2's ``dfake_gen_update_ratio``: 5 on SDXL; SiD: 1),
    with the parameters of ``freeze_during_generator`` (the fake network, a discriminator) temporarily
    frozen so the generator loss leaves no gradients in them. The callables do their own forward,
    backward and optimiser step and return a dict of logging scalars; :meth:`step` merges them.
    ``state_dict`` / ``load_state_dict`` keep the counter so a resumed run keeps the same phase.

    Args:
        generator_step: called with no arguments for a generator update; returns a mapping of logging
            values or None.
        fake_step: called with no arguments for a fake-score (or discriminator) update; returns a mapping of
            logging values or None.
        generator_every: run ``generator_step`` on every ``generator_every``-th step, an int ``>= 1``
            (default 1: every step).
        fake_steps: ``fake_step`` calls per step, an int ``>= 1`` (default 1).
        generator_first: run the generator update before the fake updates of a step (default True).
        freeze_during_generator: the modules (or one module) frozen while ``generator_step`` runs; default
            none.

    Raises:
        OptionError: ``generator_every`` or ``fake_steps`` is ``< 1``.
        DTypeError: ``generator_every`` or ``fake_steps`` is not an int (``2.0`` is accepted),
            ``generator_step`` / ``fake_step`` is not callable, ``generator_first`` is not a bool, or
            ``freeze_during_generator`` holds something other than ``nn.Module`` s. :meth:`step` raises
            :class:`DTypeError` when a step callable returns neither a mapping nor None.

    Example:
        >>> calls = []
        >>> loop = AlternatingUpdate(lambda: calls.append("G") or {}, lambda: calls.append("F") or {},
        ...                          generator_every=2)
        >>> for _ in range(4):
        ...     _ = loop.step()
        >>> "".join(calls)
        'GFFGFF'
    """

    def __init__(
        self,
        generator_step: Callable[[], Mapping[str, Any] | None],
        fake_step: Callable[[], Mapping[str, Any] | None],
        *,
        generator_every: int = 1,
        fake_steps: int = 1,
        generator_first: bool = True,
        freeze_during_generator: Sequence[nn.Module] | nn.Module = (),
    ) -> None:
        for name, fn in (("generator_step", generator_step), ("fake_step", fake_step)):
            if not callable(fn):
                raise DTypeError(
                    f"Expected `{name}` to be a callable taking no arguments (it runs one update and returns a "
                    f"dict of logging values or None), but got {type(fn).__name__}."
                )
        self.generator_every = check_int(generator_every, "generator_every", minimum=1, integral_float=True)
        self.fake_steps = check_int(fake_steps, "fake_steps", minimum=1, integral_float=True)
        check_bool(generator_first, "generator_first")
        try:
            if isinstance(freeze_during_generator, (str, bytes)):
                raise TypeError
            modules = (
                (freeze_during_generator,)
                if isinstance(freeze_during_generator, nn.Module)
                else tuple(freeze_during_generator)
            )
        except TypeError:
            raise DTypeError(
                "Expected `freeze_during_generator` to be an nn.Module or a sequence of them, but got "
                f"{type(freeze_during_generator).__name__}."
            ) from None
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise DTypeError(
                    f"Expected `freeze_during_generator[{i}]` to be an nn.Module (its parameters are frozen during "
                    f"the generator step), but got {type(module).__name__}."
                )
        self.generator_step = generator_step
        self.fake_step = fake_step
        self.generator_first = generator_first
        self.freeze_during_generator = modules
        self.step_count = 0

    @staticmethod
    def _logs(value: Any, name: str, prefix: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise DTypeError(
                f"Expected `{name}` to return a mapping of logging values or None, but it returned "
                f"{type(value).__name__}."
            )
        return {f"{prefix}/{k}": v for k, v in value.items()}

    def _run_generator(self, logs: dict[str, torch.Tensor]) -> None:
        if self.step_count % self.generator_every == 0:
            with frozen(*self.freeze_during_generator):
                logs.update(self._logs(self.generator_step(), "generator_step", "generator"))

    def step(self) -> dict[str, torch.Tensor]:
        """One training step: the due generator update and ``fake_steps`` fake updates.

        Returns:
            The merged logs of the callables, keys prefixed ``generator/`` and ``fake/``.

        Raises:
            DTypeError: a step callable returns neither a mapping nor None.
        """
        logs: dict[str, torch.Tensor] = {}
        if self.generator_first:
            self._run_generator(logs)
        for _ in range(self.fake_steps):
            logs.update(self._logs(self.fake_step(), "fake_step", "fake"))
        if not self.generator_first:
            self._run_generator(logs)
        self.step_count += 1
        return logs

    def state_dict(self) -> dict[str, int]:
        """The step counter, for checkpoints.

        Returns:
            ``{"step_count": n}``.
        """
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the step counter.

        Args:
            state: a mapping from :meth:`state_dict`, ``{"step_count": n}`` with an int ``n >= 0``.

        Raises:
            DTypeError: ``state`` is not a mapping.
            OptionError: ``state`` has no ``"step_count"``, or it is not an int ``>= 0``.
        """
        if not isinstance(state, Mapping):
            raise DTypeError(
                f"Expected `state` to be a mapping from AlternatingUpdate.state_dict(), but got {type(state).__name__}."
            )
        if "step_count" not in state:
            raise OptionError(
                f"Expected `state` to hold 'step_count' (from AlternatingUpdate.state_dict()), but got keys "
                f"{sorted(state)}."
            )
        count = state["step_count"]
        if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise OptionError(f"Expected `state['step_count']` to be an int >= 0, but got {count!r}.")
        self.step_count = int(count)
