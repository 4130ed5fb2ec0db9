"""Consistency-family distillation losses: LCM, Hyper-SD TSCD, MLCM multistep consistency, progressive
distillation and SDXL-Lightning's x0 conversion, over any denoiser callable.

All of them compare a *student side* and a *target side* built from the same noisy state ``x_t``:

* the student predicts at ``(x_t, t)``;
* a frozen teacher (:class:`~diffdistill.schedulers.TeacherSolver`, with CFG) solves the ODE from ``t``
  to ``t_prev``;
* a target network (``"online"`` = the student under ``no_grad``, ``"teacher"``, or any callable such as
  an :class:`~diffdistill.students.EMA` copy) predicts at ``(x_prev, t_prev)`` under ``no_grad``;
* both predictions are mapped to a common point, either by the LCM boundary-condition parameterisation
  (``"boundary"``: :math:`f = c_\\text{skip} x + c_\\text{out}\\hat x_0`) or by a DDIM move to ``t_end``
  (``"move"``: TSCD, MLCM).

:func:`consistency_pair` returns both sides (the student side keeps its graph), so a caller can feed
them to any distance, including an adversarial one; the ``*_loss`` functions add sampling, noising and
the distance, and return ``(loss, logs)`` with logs a dict of detached 0-d tensors (no device sync).

A model is any callable ``model(x_t, t, **cond)`` returning a tensor, a diffusers output or a tuple;
``t`` is an int64 tensor of shape ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch

from .._checks import OptionError, check_option, check_tensor, value_checks_enabled
from .._outputs import first_tensor
from ..schedulers.consistency import consistency_function
from ..schedulers.noise_schedule import NoiseSchedule, TimestepLike
from ..schedulers.teacher_solver import TeacherSolver
from ..schedulers.timestep_samplers import (
    TimestepSample,
    lcm_skip_pairs,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
)
from .distances import DistanceLike, compute_distance

__all__ = [
    "ConsistencyPair",
    "consistency_pair",
    "inter_segment_consistency_loss",
    "lcm_consistency_loss",
    "multistep_consistency_loss",
    "progressive_distillation_loss",
    "teacher_trajectory_states",
    "tscd_loss",
    "x0_conversion_loss",
]

Target = Literal["online", "teacher"] | Callable[..., Any] | None
Cond = Mapping[str, Any] | None


class ConsistencyPair(NamedTuple):
    """The two sides of a consistency comparison.

    Attributes:
        student: student side (keeps the autograd graph), shape of ``x_t``.
        target: target side (detached).
        x_prev: the teacher's ODE solution at ``sample.t_prev`` (detached; float32 for bf16/fp16 ``x_t``).
        sample: the timesteps used.
    """

    student: torch.Tensor
    target: torch.Tensor
    x_prev: torch.Tensor
    sample: TimestepSample


def _call(model: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return first_tensor(model(x, t, **dict(cond or {})))


def _map_side(
    schedule: NoiseSchedule,
    pred: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    t_end: torch.Tensor,
    parameterization: str,
    prediction_type: str | None,
    sigma_data: float,
    timestep_scaling: float,
) -> torch.Tensor:
    # Mapped to >= float32: the loss compares two mapped sides whose difference is small, which rounding
    # each side to the latents' bf16 first would blur.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if parameterization == "boundary":
        return consistency_function(pred, x, t, schedule, prediction_type, sigma_data, timestep_scaling)
    return schedule.ddim_step(pred, t, x, t_end, prediction_type, allow_same=True)


def consistency_pair(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x_t: torch.Tensor,
    sample: TimestepSample,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    target: Target = "online",
    parameterization: Literal["boundary", "move"] = "boundary",
    teacher_steps: int = 1,
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> ConsistencyPair:
    """Build the student and target sides of a consistency loss from a noisy state ``x_t``.

    Student side: :math:`g(f_\\theta(x_t, t), x_t, t)`; target side:
    :math:`\\mathrm{sg}\\,g(f^-(\\hat x_{t_{prev}}, t_{prev}), \\hat x_{t_{prev}}, t_{prev})` with
    :math:`\\hat x_{t_{prev}} = \\Psi_\\text{teacher}(x_t, t \\to t_{prev})` (``teacher_steps`` guided DDIM
    steps) and :math:`g` the boundary-condition map (LCM) or the DDIM move to ``t_end`` (TSCD / MLCM).
    With ``target=None`` the target side is the teacher's solution itself (progressive distillation;
    needs ``parameterization="move"`` and ``t_end == t_prev``, else OptionError). Where ``t_end == t_prev`` in move mode the target side is exactly
    :math:`\\hat x_{t_{prev}}` (no target evaluation can change it).

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)``.
        teacher: frozen teacher with its CFG settings (``cond`` / ``uncond`` / ``guidance_scale``).
        x_t: noisy states at ``sample.t``, shape ``(B, ...)``.
        sample: timesteps from a sampler of :mod:`diffdistill.schedulers` (``t``, ``t_prev``, ``t_end``).
        target: ``"online"`` (the student under no_grad; LCM-LoRA, MLCM), ``"teacher"``, a callable (e.g. an
            EMA copy; LCM full, Hyper-SD), or ``None``.
        parameterization: ``"boundary"`` or ``"move"``.
        teacher_steps: teacher DDIM steps from ``t`` to ``t_prev`` (MLCM inter-segment: 3).
        student_cond: kwargs of the student and of a callable target (default: ``cond``), e.g. with a
            guidance embedding ``timestep_cond``.
        prediction_type: the student's output type (default: the schedule's).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver, lcm_skip_pairs
        >>> sched = NoiseSchedule.from_betas()
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, sched)
        >>> student = torch.nn.Conv2d(4, 4, 1)
        >>> net = lambda x, t: student(x)
        >>> sample = lcm_skip_pairs(2, generator=torch.Generator().manual_seed(0))
        >>> pair = consistency_pair(net, teacher, torch.randn(2, 4, 8, 8), sample)
        >>> pair.student.requires_grad, pair.target.requires_grad
        (True, False)
    """
    check_tensor(x_t, "x_t")
    check_option(parameterization, "parameterization", ("boundary", "move"))
    if not isinstance(teacher, TeacherSolver):
        raise OptionError(
            f"Expected `teacher` to be a TeacherSolver, but got {type(teacher).__name__}. Wrap the frozen model: "
            "TeacherSolver(model, schedule, guidance_scale=...)."
        )
    if not (target is None or callable(target) or target in ("online", "teacher")):
        raise OptionError(
            f"Expected `target` to be 'online', 'teacher', None or a callable model, but got {target!r}."
        )
    schedule = teacher.schedule
    s_cond = cond if student_cond is None else student_cond
    t, t_prev, t_end = (
        schedule.batch_timesteps(sample.t, x_t, "sample.t"),
        schedule.batch_timesteps(sample.t_prev, x_t, "sample.t_prev"),
        schedule.batch_timesteps(sample.t_end, x_t, "sample.t_end"),
    )
    if value_checks_enabled() and bool(((t_end > t_prev) | (t_prev >= t)).any()):
        raise OptionError(
            f"Expected t_end <= t_prev < t for every sample, but got t={t.tolist()}, t_prev={t_prev.tolist()}, "
            f"t_end={t_end.tolist()}. Draw `sample` with a sampler of diffdistill.schedulers."
        )
    if target is None:
        # The teacher's solution x_prev is a state at t_prev: only the student's move to t_end == t_prev
        # lands in the same space (progressive distillation, SDXL-Lightning's adversarial pairs).
        if parameterization != "move":
            raise OptionError(
                "Expected parameterization='move' with target=None (the target is then the teacher's state "
                f"at t_prev, which only the student's DDIM move to t_end == t_prev matches), but got "
                f"parameterization={parameterization!r}. Pass parameterization='move', or a target model."
            )
        if value_checks_enabled() and bool((t_end != t_prev).any()):
            raise OptionError(
                "Expected sample.t_end == sample.t_prev for every sample with target=None (the student must "
                f"move to where the teacher's solution lies), but got t_prev={t_prev.tolist()}, "
                f"t_end={t_end.tolist()}. Use a sampler whose t_end equals t_prev (e.g. progressive_pairs)."
            )
    map_args = (parameterization, prediction_type, sigma_data, timestep_scaling)

    pred = _call(student, x_t, t, s_cond)
    student_side = _map_side(schedule, pred, x_t, t, t_end, *map_args)

    with torch.no_grad():
        # The teacher's solution in >= float32 (the networks still see x_t's dtype): a bf16 x_prev would put
        # its rounding into the target.
        x_prev = cast(
            torch.Tensor,
            teacher.solve(
                x_t,
                t,
                t_prev,
                cond,
                uncond,
                num_steps=teacher_steps,
                guidance_scale=guidance_scale,
                state_dtype=torch.promote_types(x_t.dtype, torch.float32),
            ),
        )
        x_in = x_prev.to(x_t.dtype)  # the target network's input, in the student's input dtype
        if target is None:
            target_side = x_prev
        else:
            t_eval = t_prev.clamp(
                min=0
            )  # t_prev = -1 only with t_end = -1, where the result is x_prev anyway
            if target == "online":
                tpred = _call(student, x_in, t_eval, s_cond)
            elif target == "teacher":
                tpred = teacher.predict(x_in, t_eval, cond, uncond, guidance_scale)
            else:
                tpred = _call(target, x_in, t_eval, s_cond)
            t_end_eval = torch.minimum(t_end, t_eval)
            target_pt = teacher.prediction_type if target == "teacher" else prediction_type
            target_side = _map_side(
                schedule,
                tpred,
                x_prev,
                t_eval,
                t_end_eval,
                parameterization,
                target_pt,
                sigma_data,
                timestep_scaling,
            )
            if parameterization == "move":
                same = (t_end == t_prev).reshape(-1, *([1] * (x_t.ndim - 1)))
                target_side = torch.where(same, x_prev, target_side)
    return ConsistencyPair(student_side, target_side.detach(), x_prev.detach(), sample)


def _noisy_states(
    schedule: NoiseSchedule,
    x0: torch.Tensor | None,
    x_t: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if (x0 is None) == (x_t is None):
        raise OptionError(
            "Pass exactly one of `x0` (clean samples, noised here) and `x_t` (ready noisy states, e.g. from "
            "teacher_trajectory_states), but got "
            f"{'both' if x0 is not None else 'neither'}."
        )
    if x0 is None:
        return cast(torch.Tensor, x_t)
    if noise is None:
        noise = torch.randn(
            x0.shape, generator=generator, device=x0.device if generator is None else generator.device
        )
        noise = noise.to(device=x0.device, dtype=x0.dtype)
    return schedule.add_noise(x0, noise, t)


def _noised_pair_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor | None,
    x_t: torch.Tensor | None,
    sample: TimestepSample,
    cond: Cond,
    uncond: Cond,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    distance: DistanceLike,
    c: float | None,
    **pair_options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Noise ``x0`` (or take ``x_t``), build the pair with :func:`consistency_pair`, apply the distance."""
    states = _noisy_states(teacher.schedule, x0, x_t, sample.t, noise, generator)
    pair = consistency_pair(student, teacher, states, sample, cond, uncond, **pair_options)
    loss = compute_distance(pair.student, pair.target, distance, c=c)
    logs = {
        "loss": loss.detach(),
        "t_mean": pair.sample.t.float().mean().detach(),
        "target_norm": pair.target.float().pow(2).mean().sqrt().detach(),
    }
    return loss, logs


def _batch(
    x0: torch.Tensor | None,
    x_t: torch.Tensor | None,
    sample: TimestepSample | None,
    noise: torch.Tensor | None,
) -> tuple[int, torch.device]:
    """Batch size and device of the input; ready states ``x_t`` need the ``sample`` they were drawn at."""
    ref = x0 if x0 is not None else x_t
    if ref is None:
        raise OptionError("Pass exactly one of `x0` and `x_t`, but got neither.")
    check_tensor(ref, "x0" if x0 is not None else "x_t")
    if x0 is None and sample is None:
        raise OptionError(
            "`x_t` are noisy states at given timesteps: pass the `sample` they belong to (e.g. draw `sample` "
            "first, then `x_t = teacher_trajectory_states(teacher, noise, sample.t, ...)`), but got `x_t` "
            "without `sample`; a sample drawn here would not match their noise level."
        )
    if x0 is None and noise is not None:
        raise OptionError(
            "`noise` noises `x0` and is unused with ready states `x_t`: pass `x0` with `noise`, or `x_t` "
            "without it."
        )
    return ref.shape[0], ref.device


def lcm_consistency_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    x_t: torch.Tensor | None = None,
    sample: TimestepSample | None = None,
    target: Target = "online",
    num_ddim_timesteps: int = 50,
    distance: DistanceLike = "pseudo_huber",
    huber_c: float | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latent consistency distillation (Luo et al. 2023, arXiv:2310.04378; diffusers' LCM scripts).

    .. math:: \\mathcal L = d\\big(f_\\theta(x_t, t),\\ \\mathrm{sg} f^-(\\Psi_\\omega(x_t, t \\to t-k), t-k)\\big)

    with skip ``k = T / num_ddim_timesteps`` (:func:`~diffdistill.schedulers.lcm_skip_pairs`), the
    boundary-condition consistency function :math:`f`, a CFG teacher step :math:`\\Psi_\\omega` and the
    pseudo-Huber distance (``c = 0.001``). ``target``: ``"online"`` (LCM-LoRA), an EMA callable (full
    LCM, decay 0.95) or ``"teacher"``.

    Returns:
        ``(loss, logs)``: scalar loss (float32; float64 for float64 inputs) and detached 0-d tensors ``loss``, ``t_mean``, ``target_norm``.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> sched = NoiseSchedule.from_betas()
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, sched)
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, logs = lcm_consistency_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); conv.weight.grad is not None
        True
    """
    batch, device = _batch(x0, x_t, sample, noise)
    if sample is None:
        sample = lcm_skip_pairs(
            batch,
            num_ddim_timesteps,
            teacher.schedule.num_train_timesteps,
            generator=generator,
            device=device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        x0,
        x_t,
        sample,
        cond,
        uncond,
        noise,
        generator,
        distance,
        huber_c,
        target=target,
        parameterization="boundary",
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
    )


def tscd_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    num_segments: int,
    num_inference_steps: int = 50,
    x_t: torch.Tensor | None = None,
    sample: TimestepSample | None = None,
    target: Target = "online",
    distance: DistanceLike = "mse",
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Trajectory-segmented consistency distillation (Hyper-SD, Ren et al. 2024, arXiv:2404.13686, Eq. 12).

    .. math::

        \\mathcal L = d\\big(\\Psi(x_{t_n}, f_\\theta(x_{t_n}, t_n), t_{end}),\\
        \\mathrm{sg}\\,\\Psi(\\hat x_{t_{n-1}}, f^-(\\hat x_{t_{n-1}}, t_{n-1}), t_{end})\\big)

    with :math:`(t_n, t_{n-1}, t_{end})` from :func:`~diffdistill.schedulers.tscd_segments` (``k`` =
    ``num_segments``), :math:`\\hat x_{t_{n-1}}` one guided teacher DDIM step and :math:`\\Psi` the DDIM
    move. Hyper-SD uses an EMA target (pass the EMA copy as ``target``) and a hybrid MSE + adversarial
    distance whose adversarial weight grows as k shrinks (build it with :func:`consistency_pair`).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, logs = tscd_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8), num_segments=4,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> loss.ndim, sorted(logs)
        (0, ['loss', 't_mean', 'target_norm'])
    """
    batch, device = _batch(x0, x_t, sample, noise)
    if sample is None:
        sample = tscd_segments(
            batch,
            num_segments,
            num_inference_steps,
            teacher.schedule.num_train_timesteps,
            generator=generator,
            device=device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        x0,
        x_t,
        sample,
        cond,
        uncond,
        noise,
        generator,
        distance,
        None,
        target=target,
        parameterization="move",
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
    )


def multistep_consistency_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    num_segments: int = 8,
    skip: int = 20,
    on_grid: bool = False,
    x_t: torch.Tensor | None = None,
    sample: TimestepSample | None = None,
    target: Target = "online",
    distance: DistanceLike = "mse",
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multistep latent consistency distillation (MLCM/TLCM stage 1, Xie et al. 2024, arXiv:2406.05768, Eq. 7).

    .. math::

        \\mathcal L = \\lVert \\mathrm{DDIM}(z_{t_m}, f_\\theta(z_{t_m}), t_m \\to t^s) -
        \\mathrm{sg}\\,\\mathrm{DDIM}(\\hat z_{t_n}, f_\\theta(\\hat z_{t_n}), t_n \\to t^s) \\rVert^2

    with :math:`t_m` in segment ``s``, :math:`t_n = t_m - \\text{skip}`, the lower milestone :math:`t^s`
    (:func:`~diffdistill.schedulers.milestone_pairs`), a CFG teacher step (``w = 8`` in the paper) and the
    online target (no EMA). For the paper's data-free states, draw ``sample`` first and pass
    ``x_t = teacher_trajectory_states(teacher, noise, sample.t, ...)``.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = multistep_consistency_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                      generator=torch.Generator().manual_seed(0))
        >>> bool(loss >= 0)
        True
    """
    batch, device = _batch(x0, x_t, sample, noise)
    if sample is None:
        sample = milestone_pairs(
            batch,
            num_segments,
            skip,
            teacher.schedule.num_train_timesteps,
            on_grid=on_grid,
            generator=generator,
            device=device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        x0,
        x_t,
        sample,
        cond,
        uncond,
        noise,
        generator,
        distance,
        None,
        target=target,
        parameterization="move",
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
    )


def inter_segment_consistency_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    num_segments: int = 8,
    teacher_steps: int = 3,
    sample: TimestepSample | None = None,
    target: Target = "online",
    distance: DistanceLike = "mse",
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MLCM/TLCM stage 2: consistency across segments, at the milestones only (Eq. 9-10).

    ``x0`` is the student's own q-step sample (``q = 4`` in the paper, e.g. from
    :mod:`diffdistill.schedulers.few_step_samplers`), re-noised to a milestone :math:`t_m`; the teacher
    solves with ``teacher_steps = p = 3`` guided DDIM steps over one segment ``T/M`` to
    :math:`t_n = t_m - T/M`, and the boundary-condition consistency functions are compared:

    .. math:: \\mathcal L = \\lVert f_\\theta(\\hat z_{t_m}, t_m) - \\mathrm{sg}\\,f_\\theta(\\hat z_{t_n}, t_n) \\rVert^2 .

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = inter_segment_consistency_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                          generator=torch.Generator().manual_seed(0))
        >>> loss.requires_grad
        True
    """
    check_tensor(x0, "x0")
    total = teacher.schedule.num_train_timesteps
    if sample is None:
        if not isinstance(num_segments, int) or num_segments < 1 or total % num_segments:
            raise OptionError(
                f"Expected `num_segments` to divide the {total} training timesteps (the stage's grid has step "
                f"T / num_segments), but got {num_segments!r}; pass a `sample` for other grids."
            )
        sample = milestone_pairs(
            x0.shape[0],
            num_segments,
            total // num_segments,
            total,
            on_grid=True,
            generator=generator,
            device=x0.device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        x0,
        None,
        sample,
        cond,
        uncond,
        noise,
        generator,
        distance,
        None,
        target=target,
        parameterization="boundary",
        teacher_steps=teacher_steps,
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
    )


def progressive_distillation_loss(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x0: torch.Tensor,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    num_student_steps: int,
    teacher_steps: int,
    extra_timesteps: Sequence[int] | None = None,
    sample: TimestepSample | None = None,
    distance: DistanceLike = "mse",
    guidance_scale: float | torch.Tensor | None = None,
    student_cond: Cond = None,
    prediction_type: str | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Progressive distillation: one student jump vs n teacher steps (SDXL-Lightning Eq. 16; Salimans & Ho 2022).

    .. math::

        \\mathcal L = \\lVert \\mathrm{move}(x_t, f_\\theta(x_t, t), t \\to t - ns) -
        \\mathrm{sg}\\,\\Psi^{(n)}_\\text{teacher}(x_t, t \\to t - ns) \\rVert^2

    with ``t`` on the N-step student's trailing grid (:func:`~diffdistill.schedulers.progressive_pairs`),
    ``n = teacher_steps`` guided teacher DDIM steps. SDXL-Lightning's first stage (128 → 32) uses this
    with CFG 6; later stages replace the MSE by the adversarial loss (build the pair with
    :func:`consistency_pair` and ``target=None``).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = progressive_distillation_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                         num_student_steps=4, teacher_steps=2)
        >>> loss.requires_grad
        True
    """
    check_tensor(x0, "x0")
    if sample is None:
        sample = progressive_pairs(
            x0.shape[0],
            num_student_steps,
            teacher.schedule.num_train_timesteps,
            extra_timesteps=extra_timesteps,
            generator=generator,
            device=x0.device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        x0,
        None,
        sample,
        cond,
        uncond,
        noise,
        generator,
        distance,
        None,
        target=None,
        parameterization="move",
        teacher_steps=teacher_steps,
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
    )


def teacher_trajectory_states(
    teacher: TeacherSolver,
    noise: torch.Tensor,
    t: TimestepLike,
    cond: Cond = None,
    uncond: Cond = None,
    *,
    num_segments: int = 8,
    guidance_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Data-free training states: run the teacher from pure noise at ``T-1`` down to ``t`` (MLCM Alg. 1).

    MLCM's multistep denoising strategy: a state at :math:`t_m` in segment ``s`` (of ``M = num_segments``;
    segments as in :func:`~diffdistill.schedulers.milestone_pairs`, ``t_m + 1`` in
    :math:`(m_s, m_{s+1}]`) is reached with :math:`L = M - s` guided DDIM steps of size :math:`(T - t_m)/L`, so states nearer the
    data get more (cleaner) steps. Samples with ``t = T-1`` are the noise itself.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> z = torch.randn(3, 4, 8, 8)
        >>> states = teacher_trajectory_states(teacher, z, torch.tensor([999, 500, 40]))
        >>> torch.equal(states[0], z[0]), states.shape
        (True, torch.Size([3, 4, 8, 8]))
    """
    check_tensor(noise, "noise")
    schedule = teacher.schedule
    total = schedule.num_train_timesteps
    tt = schedule.batch_timesteps(t, noise, "t")
    tt = tt.expand(noise.shape[0]) if tt.ndim == 0 else tt
    if bool((tt < 0).any()):
        raise OptionError(f"Expected `t` >= 0 for trajectory states, but got {tt.tolist()}.")
    # Segment s holds u = t + 1 in (m_s, m_{s+1}], m_s = floor(sT/M): milestone_pairs' convention.
    segment = torch.div((tt + 1) * num_segments - 1, total, rounding_mode="floor").clamp(max=num_segments - 1)
    steps = num_segments - segment
    out = noise.clone()
    with torch.no_grad():
        for n_steps in steps.unique().tolist():
            idx = ((steps == n_steps) & (tt < total - 1)).nonzero().flatten()
            if idx.numel() == 0:
                continue
            sub_cond = _select(cond, idx, noise.shape[0])
            sub_uncond = _select(uncond, idx, noise.shape[0])
            w = guidance_scale
            if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == noise.shape[0]:
                w = w[idx]
            span = int((total - 1 - tt[idx]).min())
            result = cast(
                torch.Tensor,
                teacher.solve(
                    noise[idx],
                    torch.full_like(tt[idx], total - 1),
                    tt[idx],
                    sub_cond,
                    sub_uncond,
                    num_steps=min(int(n_steps), span),
                    guidance_scale=w,
                ),
            )
            out[idx] = result
    return out


def _select(cond: Cond, idx: torch.Tensor, batch: int) -> dict[str, Any] | None:
    """Rows ``idx`` of every batched tensor in a (nested) conditioning dict."""
    if cond is None:
        return None
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Mapping):
            out[key] = _select(value, idx, batch)
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch and batch > 1:
            out[key] = value[idx.to(value.device)]
        else:
            out[key] = value
    return out


def x0_conversion_loss(
    online: Callable[..., Any],
    frozen: Callable[..., Any],
    x_t: torch.Tensor,
    t: TimestepLike,
    cond: Cond = None,
    *,
    schedule: NoiseSchedule,
    frozen_prediction_type: str | None = None,
    distance: DistanceLike = "mse",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL-Lightning's conversion of a model to x0-prediction (Lin et al. 2024, Eq. 29).

    .. math:: \\mathcal L = \\lVert f_\\text{online}(x_t, t, c) - \\mathrm{sg}\\,\\hat x_0(x_t, f_\\text{frozen}(x_t, t, c), t) \\rVert^2

    The online copy learns to output the clean sample that the frozen (epsilon- or v-) model implies.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> sched = NoiseSchedule.from_betas()
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = x0_conversion_loss(lambda x, t: conv(x), lambda x, t: 0.1 * x, torch.randn(2, 4, 8, 8),
        ...                              torch.tensor([999, 500]), schedule=sched)
        >>> loss.requires_grad
        True
    """
    check_tensor(x_t, "x_t")
    tt = schedule.batch_timesteps(t, x_t)
    tt = tt.expand(x_t.shape[0]) if tt.ndim == 0 else tt
    with torch.no_grad():
        target = schedule.to_x0(_call(frozen, x_t, tt, cond), x_t, tt, frozen_prediction_type)
    pred = _call(online, x_t, tt, cond)
    loss = compute_distance(pred, target, distance)
    return loss, {"loss": loss.detach(), "target_norm": target.float().pow(2).mean().sqrt().detach()}
