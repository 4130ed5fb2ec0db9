"""Consistency-family distillation losses: LCM, Hyper-SD TSCD, MLCM multistep consistency, progressive
distillation and SDXL-Lightning's x0 conversion, over any denoiser callable and any ``(B, ...)`` latents
(image ``(B, C, H, W)``; video ``(B, C, F, H, W)`` for Wan, reduced per sample over every non-batch dim).

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
``t`` is a tensor of shape ``(B,)``, what the network takes as its timestep, as
:class:`~diffdistill.schedulers.TeacherSolver` calls the teacher: the int64 diffusers index on a VP schedule,
the schedule's :meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep` on a rectified-flow one (float32
:math:`\\sigma_t` times ``timestep_scale``, 1000 for SD3). Its prediction must have the shape of ``x_t``.

Rectified flow (SD3, FLUX; issue 21): every loss here runs unchanged on a flow schedule
(``NoiseSchedule.flow_matching``) with ``"flow"`` predictions (:math:`v = \\epsilon - x_0`); the teacher's
step is the Euler step of the flow ODE, the DDIM move of TSCD / MLCM / progressive distillation is that Euler
step too, and the boundary map of LCM is :math:`f = x_t - \\sigma_t \\hat v` (see
:func:`~diffdistill.schedulers.consistency_function`).

Inputs are checked at the boundary (see :mod:`diffdistill.errors`): latents and noise must be non-empty
floating tensors with a batch dimension, finite while value checks are on; conditioning dicts must hold
tensors whose batch is ``B`` or 1, except FLUX's shared position ids (2-D ``img_ids`` / ``txt_ids``, passed
through as they are; the rule of :func:`~diffdistill.schedulers.concat_conditions`); ``sample`` must be a :class:`~diffdistill.schedulers.TimestepSample`
for the same batch. A model that fails on the latents' dtype (e.g. float64 latents into a float32 network)
raises :class:`~diffdistill.errors.DTypeError` naming the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch

from .._checks import (
    SHARED_CONDITION_HINT,
    DTypeError,
    NonFiniteError,
    OptionError,
    ShapeError,
    check_finite,
    check_float_input,
    check_generator,
    check_int,
    check_mapping,
    check_option,
    check_real,
    check_same_shape,
    is_shared_condition,
    value_checks_enabled,
)
from .._outputs import check_prediction, explain_dtype_errors, first_tensor
from ..schedulers.consistency import consistency_function
from ..schedulers.noise_schedule import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, NoiseSchedule, TimestepLike
from ..schedulers.teacher_solver import TeacherSolver, _stride_timesteps
from ..schedulers.timestep_samplers import (
    TimestepSample,
    lcm_skip_pairs,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
)
from .distances import DISTANCES, DistanceLike, _compute_distance

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


# --- input checks (public argument names in every message) ---------------------------------------------


def _check_model(model: Any, name: str) -> None:
    if not callable(model):
        raise OptionError(
            f"Expected `{name}` to be a callable model {name}(x_t, t, **cond), but got {type(model).__name__}."
        )


def _check_teacher(teacher: Any) -> TeacherSolver:
    if not isinstance(teacher, TeacherSolver):
        raise OptionError(
            f"Expected `teacher` to be a TeacherSolver, but got {type(teacher).__name__}. Wrap the frozen model: "
            "TeacherSolver(model, schedule, guidance_scale=...)."
        )
    return teacher


def _check_latents(x: Any, name: str) -> torch.Tensor:
    """A non-empty floating ``(B, ...)`` tensor, finite while value checks are on."""
    check_float_input(x, name)
    if x.ndim == 0:
        raise ShapeError(
            f"Expected `{name}` laid out as (B, ...) with a batch dimension, but got a 0-d tensor. Add one with "
            f"{name}.reshape(1, -1) or {name}[None].",
            name=name,
            expected="(B, ...)",
            actual=(),
        )
    return cast(torch.Tensor, x)


def _check_cond(cond: Any, name: str, batch: int) -> None:
    """``cond`` is None or a mapping whose (nested) tensors have batch ``batch`` or 1 in dim 0, or are shared
    position ids (:func:`~diffdistill._checks.is_shared_condition`)."""
    if cond is None:
        return
    check_mapping(cond, name, example="{'encoder_hidden_states': prompt_embeds}")
    stack: list[tuple[str, Mapping[str, Any]]] = [(name, cond)]
    while stack:
        prefix, mapping = stack.pop()
        for key, value in mapping.items():
            label = f"{prefix}[{key!r}]"
            if isinstance(value, Mapping):
                stack.append((label, value))
            elif (
                isinstance(value, torch.Tensor)
                and value.ndim > 0
                and value.shape[0] not in (1, batch)
                and not is_shared_condition(key, value)
            ):
                raise ShapeError(
                    f"Expected `{label}` to have batch size {batch} (from the latents) or 1 in dim 0, but got "
                    f"shape {tuple(value.shape)}. Pass the conditioning of the same samples as the latents. "
                    f"{SHARED_CONDITION_HINT}",
                    name=label,
                    expected=(batch,),
                    actual=tuple(value.shape),
                )


def _check_sample(sample: Any, batch: int, source: str) -> TimestepSample:
    """A :class:`TimestepSample` whose tensors hold one timestep per sample (or one for all)."""
    if not isinstance(sample, TimestepSample):
        raise DTypeError(
            f"Expected `sample` to be a TimestepSample(t, t_prev, t_end) from a sampler of diffdistill.schedulers "
            f"(e.g. lcm_skip_pairs), but got {type(sample).__name__}. Build one with "
            "TimestepSample(t, t_prev, t_end) from int64 (B,) tensors."
        )
    for field in TimestepSample._fields:
        value = getattr(sample, field)
        if isinstance(value, torch.Tensor) and (
            value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch))
        ):
            raise ShapeError(
                f"Expected `sample.{field}` to hold one timestep per sample ({batch}, the batch of `{source}`), "
                f"but got shape {tuple(value.shape)}. Draw `sample` with batch_size={batch}.",
                name=f"sample.{field}",
                expected=(batch,),
                actual=tuple(value.shape),
            )
    return sample


def _check_guidance(guidance_scale: Any, batch: int) -> None:
    """None, a finite number, or a real tensor of shape ``()``, ``(1,)`` or ``(B,)`` (finite: a value check)."""
    if guidance_scale is None:
        return
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.dtype == torch.bool or guidance_scale.is_complex():
            raise DTypeError(
                f"Expected `guidance_scale` to be a real tensor, but got dtype {guidance_scale.dtype}."
            )
        if guidance_scale.ndim > 1 or (
            guidance_scale.ndim == 1 and guidance_scale.shape[0] not in (1, batch)
        ):
            raise ShapeError(
                f"Expected `guidance_scale` to be a number or one value per sample ({batch},), but got shape "
                f"{tuple(guidance_scale.shape)}.",
                name="guidance_scale",
                expected=(batch,),
                actual=tuple(guidance_scale.shape),
            )
        if guidance_scale.is_floating_point():
            check_finite(guidance_scale, "guidance_scale")
        return
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise DTypeError(
            f"Expected `guidance_scale` to be a number, a (B,) tensor or None, but got "
            f"{type(guidance_scale).__name__} {guidance_scale!r}."
        )
    if not math.isfinite(float(guidance_scale)):
        raise NonFiniteError(f"Expected `guidance_scale` to be finite, but got {guidance_scale!r}.")


def _check_prediction_type(prediction_type: Any, name: str, schedule: NoiseSchedule) -> None:
    """A known prediction type of ``schedule`` (a flow schedule also takes ``"flow"``), or None."""
    if prediction_type is not None:
        check_option(
            prediction_type, name, FLOW_PREDICTION_TYPES if schedule.kind == "flow" else PREDICTION_TYPES
        )


def _check_distance(distance: Any, huber_c: Any = None) -> None:
    if not callable(distance):
        check_option(distance, "distance", DISTANCES)
    if huber_c is not None:
        if callable(distance) or distance not in ("pseudo_huber", "pseudo_huber_norm"):
            raise OptionError(
                f"`huber_c` sets the constant of distance='pseudo_huber' or 'pseudo_huber_norm', but got "
                f"distance={distance!r}, which does not use it. Drop `huber_c`, or pick a pseudo-Huber distance."
            )
        check_real(huber_c, "huber_c", low=0)


def _check_pair_options(
    student: Any,
    teacher: Any,
    cond: Any,
    uncond: Any,
    student_cond: Any,
    target: Any,
    teacher_steps: Any,
    guidance_scale: Any,
    prediction_type: Any,
    batch: int,
    teacher_stride: Any = None,
) -> TeacherSolver:
    """The checks shared by :func:`consistency_pair` and the losses built on it (no tensor values read)."""
    _check_model(student, "student")
    teacher = _check_teacher(teacher)
    if teacher_stride is not None:
        check_real(
            teacher_stride, "teacher_stride", low=0, strict=True, high=teacher.schedule.num_train_timesteps
        )
    if not (target is None or callable(target) or target in ("online", "teacher")):
        raise OptionError(
            f"Expected `target` to be 'online', 'teacher', None or a callable model, but got {target!r}."
        )
    check_int(teacher_steps, "teacher_steps", minimum=1)
    _check_cond(cond, "cond", batch)
    _check_cond(uncond, "uncond", batch)
    _check_cond(student_cond, "student_cond", batch)
    _check_guidance(guidance_scale, batch)
    _check_prediction_type(prediction_type, "prediction_type", teacher.schedule)
    return teacher


def _network_timestep(schedule: NoiseSchedule, tt: Any) -> Any:
    """The timestep input of a network that a loss calls directly (student, target, fake score, online copy).

    The one place where the losses turn a timestep index into what the network takes, the same as
    :meth:`~diffdistill.schedulers.TeacherSolver.model_timestep` for the teacher: a VP schedule passes ``tt``
    through unchanged (the diffusers index); a flow schedule gives
    :meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep`, float32 :math:`\\sigma_t` times the
    schedule's ``timestep_scale`` (SD3 / Wan: :math:`1000\\sigma`), so that student and teacher see the same
    input at the same index. ``tt`` must be validated int64 indices (from ``batch_timesteps``) on a flow
    schedule: no checks here, so no device sync.
    """
    if schedule.kind != "flow":
        return tt
    return schedule._model_timestep(tt)


def _call(
    model: Callable[..., Any],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    name: str,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """``model(x, _network_timestep(t), **cond)``'s prediction, a floating tensor of ``x``'s shape (``t``:
    validated indices)."""
    with explain_dtype_errors(name, x, "x_t"):
        out = model(x, _network_timestep(schedule, t), **dict(cond or {}))
    pred = first_tensor(out, f"`{name}`")
    check_prediction(pred, x, name)
    return pred


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
    teacher_stride: float | None = None,
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
    needs ``parameterization="move"`` and ``t_end == t_prev``, else OptionError). Where ``t_end == t_prev``
    in move mode the target side is exactly :math:`\\hat x_{t_{prev}}` (no target evaluation can change it).

    Both sides are computed in at least float32 (bf16 / fp16 ``x_t`` is still what the networks see);
    float64 stays float64. Feed them to any distance, e.g.
    ``compute_distance(pair.student, pair.target, "mse", reduction="none")`` for per-sample values.

    Args:
        student: the trainable model, called as ``student(x_t, t, **student_cond)`` with ``t`` a ``(B,)``
            tensor (the int64 index on a VP schedule, float32 :math:`1000\\sigma_t` on a flow one); it returns a
            prediction (tensor, diffusers output or tuple) of ``x_t``'s shape, in ``prediction_type``.
        teacher: the frozen teacher with its CFG settings and its :class:`~diffdistill.schedulers.NoiseSchedule`
            (the schedule of every timestep here).
        x_t: noisy states at ``sample.t``, shape ``(B, ...)`` (image latents ``(B, C, H, W)``, video latents
            ``(B, C, F, H, W)``), floating.
        sample: timesteps ``(t, t_prev, t_end)`` from a sampler of :mod:`diffdistill.schedulers`, each an int64
            tensor of shape ``(B,)`` (or ``()`` / ``(1,)`` for the whole batch) with
            ``t_end <= t_prev < t``.
        cond: conditioning kwargs of the teacher's conditional pass (e.g. ``{"encoder_hidden_states": ...,
            "added_cond_kwargs": {...}}``), tensors of batch ``B`` or 1. Defaults to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass, same keys as ``cond``. Defaults to ``None``:
            allowed only with a no-op guidance scale (the teacher raises otherwise).
        target: the network of the target side, evaluated under ``no_grad`` at ``(x_prev, t_prev)``:
            ``"online"`` (the student itself; LCM-LoRA, MLCM; the default), ``"teacher"`` (the guided teacher,
            read in the teacher's prediction type), a callable called like the student (e.g. an
            :class:`~diffdistill.students.EMA` copy; LCM full, Hyper-SD), or ``None`` (the teacher's solution
            itself; progressive distillation).
        parameterization: ``"boundary"`` (the default: LCM's :math:`c_\\text{skip} x + c_\\text{out}\\hat x_0`
            at each side's own time) or ``"move"`` (a DDIM move of both sides to ``sample.t_end``).
        teacher_steps: teacher DDIM steps from ``t`` to ``t_prev`` (``t - t_prev`` must be at least this,
            without ``teacher_stride``). Defaults to 1 (LCM / TSCD); MLCM's inter-segment stage uses 3.
        teacher_stride: the teacher's own step length ``s = T/N`` of a distilled N-step teacher, a real number
            in ``(0, T]``: its steps are ``t - k s`` clamped at ``t_prev``, zero-length steps skipped per
            sample (SDXL-Lightning Sec. 2.3; see :meth:`~diffdistill.schedulers.TeacherSolver.step_timesteps`).
            Defaults to ``None``: ``[t, t_prev]`` split evenly (LCM's DDIM jumps, MLCM).
        guidance_scale: CFG scale of the teacher, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own ``guidance_scale``.
        student_cond: kwargs of the student and of a callable target. Defaults to ``None``: ``cond`` (pass
            e.g. ``{**cond, "timestep_cond": w_embedding}`` for a guidance-embedded student).
        prediction_type: what the student (and a callable target) predicts: ``"epsilon"``, ``"sample"``,
            ``"v_prediction"``, ``"score"`` or (flow schedules) ``"flow"``. Defaults to ``None``: the schedule's
            prediction type.
        sigma_data: :math:`\\sigma_d` of the boundary scalings (``"boundary"`` only). Defaults to 0.5 (LCM).
        timestep_scaling: :math:`s` in :math:`\\tau = s t` of the boundary scalings (``"boundary"`` only).
            Defaults to 10 (LCM, diffusers' ``timestep_scaling``).

    Returns:
        A :class:`ConsistencyPair` ``(student, target, x_prev, sample)``: ``student`` of ``x_t``'s shape with
        the student's graph, ``target`` and ``x_prev`` (the teacher's solution at ``t_prev``) of the same
        shape, detached, all in at least float32; ``sample`` as passed.

    Raises:
        DTypeError: ``x_t`` not a floating tensor; ``sample`` not a TimestepSample; a conditioning argument not
            a mapping; a model returning no tensor, or failing on ``x_t``'s dtype (named in the message).
        ShapeError: ``x_t`` empty or 0-d; ``sample``, ``guidance_scale`` or a conditioning tensor not of batch
            ``B`` (or 1); a model's prediction not of ``x_t``'s shape.
        OptionError: ``teacher`` not a TeacherSolver, ``student`` / ``target`` not callable, an option outside
            its values (``parameterization``, ``prediction_type``, ``teacher_steps``, ``teacher_stride``,
            ``sigma_data``, ``timestep_scaling``), timesteps out of order or out of range, ``t_prev`` out of
            the reach of ``teacher_steps`` steps of ``teacher_stride``, or ``target=None`` without
            ``parameterization="move"`` and ``t_end == t_prev``.
        NonFiniteError: ``x_t`` or ``guidance_scale`` holds NaN/Inf (value check).

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
    x_t = _check_latents(x_t, "x_t")
    batch = x_t.shape[0]
    teacher = _check_pair_options(
        student,
        teacher,
        cond,
        uncond,
        student_cond,
        target,
        teacher_steps,
        guidance_scale,
        prediction_type,
        batch,
        teacher_stride,
    )
    check_option(parameterization, "parameterization", ("boundary", "move"))
    check_real(sigma_data, "sigma_data", low=0, strict=True)
    check_real(timestep_scaling, "timestep_scaling", low=0, strict=True)
    sample = _check_sample(sample, batch, "x_t")
    return _pair(
        student,
        teacher,
        x_t,
        sample,
        cond,
        uncond,
        target=target,
        parameterization=parameterization,
        teacher_steps=teacher_steps,
        teacher_stride=teacher_stride,
        guidance_scale=guidance_scale,
        student_cond=student_cond,
        prediction_type=prediction_type,
        sigma_data=sigma_data,
        timestep_scaling=timestep_scaling,
    )


def _pair(
    student: Callable[..., Any],
    teacher: TeacherSolver,
    x_t: torch.Tensor,
    sample: TimestepSample,
    cond: Cond,
    uncond: Cond,
    *,
    target: Target,
    parameterization: str,
    teacher_steps: int,
    guidance_scale: float | torch.Tensor | None,
    student_cond: Cond,
    prediction_type: str | None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    teacher_stride: float | None = None,
) -> ConsistencyPair:
    """:func:`consistency_pair` on checked arguments."""
    schedule = teacher.schedule
    s_cond = cond if student_cond is None else student_cond
    batch = x_t.shape[0]
    t, t_prev, t_end = (
        schedule.batch_timesteps(value, x_t, f"sample.{field}").expand(batch)
        for field, value in zip(TimestepSample._fields, sample)
    )
    if target is None and parameterization != "move":
        # The teacher's solution x_prev is a state at t_prev: only the student's move to t_end == t_prev
        # lands in the same space (progressive distillation, SDXL-Lightning's adversarial pairs).
        raise OptionError(
            "Expected parameterization='move' with target=None (the target is then the teacher's state "
            f"at t_prev, which only the student's DDIM move to t_end == t_prev matches), but got "
            f"parameterization={parameterization!r}. Pass parameterization='move', or a target model."
        )
    if value_checks_enabled():
        order, span, moved = torch.stack(
            [
                ((t_end > t_prev) | (t_prev >= t)).any(),
                # a stride's zero-length steps are skipped: only the even split needs room for every step
                (t - t_prev < teacher_steps).any()
                if teacher_stride is None
                else torch.zeros((), dtype=torch.bool, device=t.device),
                (t_end != t_prev).any()
                if target is None
                else torch.zeros((), dtype=torch.bool, device=t.device),
            ]
        ).tolist()
        if order:
            raise OptionError(
                f"Expected t_end <= t_prev < t for every sample, but got t={t.tolist()}, "
                f"t_prev={t_prev.tolist()}, t_end={t_end.tolist()}. Draw `sample` with a sampler of "
                "diffdistill.schedulers."
            )
        if span:
            raise OptionError(
                f"Expected sample.t - sample.t_prev >= teacher_steps ({teacher_steps}) so that every teacher step "
                f"moves at least one timestep, but got t={t.tolist()} and t_prev={t_prev.tolist()}. Lower "
                "`teacher_steps` or draw wider steps."
            )
        if moved:
            raise OptionError(
                "Expected sample.t_end == sample.t_prev for every sample with target=None (the student must "
                f"move to where the teacher's solution lies), but got t_prev={t_prev.tolist()}, "
                f"t_end={t_end.tolist()}. Use a sampler whose t_end equals t_prev (e.g. progressive_pairs)."
            )
        if teacher_stride is not None:  # t_prev within the stride's reach, checked with the public names
            _stride_timesteps(
                t,
                t_prev,
                teacher_steps,
                teacher_stride,
                schedule.num_train_timesteps,
                ("sample.t", "sample.t_prev", "teacher_steps", "teacher_stride"),
            )
    map_args = (parameterization, prediction_type, sigma_data, timestep_scaling)

    pred = _call(student, x_t, t, s_cond, "student", schedule)
    student_side = _map_side(schedule, pred, x_t, t, t_end, *map_args)

    with torch.no_grad():
        # The teacher's solution in >= float32 (the networks still see x_t's dtype): a bf16 x_prev would put
        # its rounding into the target.
        with explain_dtype_errors("teacher", x_t, "x_t"):
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
                    stride=teacher_stride,
                ),
            )
        x_in = x_prev.to(x_t.dtype)  # the target network's input, in the student's input dtype
        if target is None:
            target_side = x_prev
        else:
            # t_prev = -1 only with t_end = -1, where the result is x_prev anyway
            t_eval = t_prev.clamp(min=0)
            if target == "online":
                tpred = _call(student, x_in, t_eval, s_cond, "student", schedule)
            elif target == "teacher":
                with explain_dtype_errors("teacher", x_in, "x_t"):
                    tpred = teacher.predict(x_in, t_eval, cond, uncond, guidance_scale)
            else:
                tpred = _call(cast(Callable[..., Any], target), x_in, t_eval, s_cond, "target", schedule)
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
    """Noise ``x0`` (or take ``x_t``), build the pair with :func:`_pair`, apply the distance (checked arguments)."""
    if x0 is None:
        states = cast(torch.Tensor, x_t)
    else:
        if noise is None:
            noise = torch.randn(
                x0.shape, generator=generator, device=x0.device if generator is None else generator.device
            )
            noise = noise.to(device=x0.device, dtype=x0.dtype)
        t = teacher.schedule.batch_timesteps(sample.t, x0, "sample.t")  # named as the caller passed it
        states = teacher.schedule._add_noise(x0, noise, t)  # x0, noise and t checked above: no second sync
    pair = _pair(student, teacher, states, sample, cond, uncond, **pair_options)
    # The pair is computed here from checked inputs: no second finiteness sync on it (a NaN from a diverged
    # student propagates to the loss, as any loss of a network's output).
    loss = _compute_distance(
        pair.student,
        pair.target,
        distance,
        c=c,
        input_name="student",
        target_name="target",
        c_name="huber_c",
        finite=False,
    )
    logs = {
        "loss": loss.detach(),
        "t_mean": pair.sample.t.float().mean().detach(),
        "target_norm": pair.target.float().pow(2).mean().sqrt().detach(),
    }
    return loss, logs


def _loss_inputs(
    x0: Any,
    x_t: Any,
    sample: Any,
    noise: Any,
    generator: Any,
    *,
    ready_states: bool = True,
) -> tuple[torch.Tensor, TimestepSample | None]:
    """Check the data arguments of a loss; return the latents given (``x0`` or ``x_t``) and the checked sample.

    ``ready_states=False`` for the losses that take clean samples ``x0`` only.
    """
    if ready_states and (x0 is None) == (x_t is None):
        raise OptionError(
            "Pass exactly one of `x0` (clean samples, noised here) and `x_t` (ready noisy states, e.g. from "
            "teacher_trajectory_states), but got "
            f"{'both' if x0 is not None else 'neither'}."
        )
    check_generator(generator)
    if x0 is None and ready_states:
        ref = _check_latents(x_t, "x_t")
        if sample is None:
            raise OptionError(
                "`x_t` are noisy states at given timesteps: pass the `sample` they belong to (e.g. draw `sample` "
                "first, then `x_t = teacher_trajectory_states(teacher, noise, sample.t, ...)`), but got `x_t` "
                "without `sample`; a sample drawn here would not match their noise level."
            )
        if noise is not None:
            raise OptionError(
                "`noise` noises `x0` and is unused with ready states `x_t`: pass `x0` with `noise`, or `x_t` "
                "without it."
            )
    else:
        ref = _check_latents(x0, "x0")
        if noise is not None:
            check_float_input(noise, "noise")
            check_same_shape(noise, ref, "noise", "x0")
    checked = (
        None if sample is None else _check_sample(sample, ref.shape[0], "x0" if x0 is not None else "x_t")
    )
    return ref, checked


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

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)`` (``t`` ``(B,)``: the network
            timestep, see the module docstring), returning a
            prediction of ``x_t``'s shape in ``prediction_type``.
        teacher: the frozen guided teacher; its schedule is the schedule of the loss.
        x0: clean latents ``(B, ...)``, noised here to ``sample.t`` with ``noise``. Defaults to ``None``:
            pass ready noisy states as ``x_t`` instead (exactly one of the two).
        cond: conditioning kwargs of the teacher's conditional pass (tensors of batch ``B`` or 1). Defaults
            to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        x_t: ready noisy states ``(B, ...)`` at ``sample.t`` (e.g. from :func:`teacher_trajectory_states`);
            needs ``sample`` and no ``noise``. Defaults to ``None``: ``x0`` is noised here.
        sample: the timesteps ``(t, t_prev, t_end)``. Defaults to ``None``: drawn with
            :func:`~diffdistill.schedulers.lcm_skip_pairs` (``t_prev = t - k``) using ``generator``.
        target: the target network: ``"online"`` (the default; the student under ``no_grad``),
            ``"teacher"``, or a callable such as an EMA copy (see :func:`consistency_pair`).
        num_ddim_timesteps: size of the teacher's DDIM grid, which sets the skip ``k`` of the drawn sample.
            Defaults to 50 (LCM). Unused when ``sample`` is given.
        distance: ``"pseudo_huber"`` (the default), ``"pseudo_huber_norm"``, ``"mse"``, ``"l1"`` or a
            callable ``fn(student_side, target_side)`` returning ``(B,)`` or a scalar.
        huber_c: the pseudo-Huber constant ``c`` (>= 0). Defaults to ``None``: 0.001 for ``"pseudo_huber"``,
            :math:`0.00054\\sqrt{D}` for ``"pseudo_huber_norm"``; an error with any other distance.
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own ``guidance_scale``.
        student_cond: kwargs of the student and of a callable target. Defaults to ``None``: ``cond``.
        prediction_type: what the student predicts. Defaults to ``None``: the schedule's prediction type.
        noise: the noise for ``x0``, of ``x0``'s shape. Defaults to ``None``: drawn with ``generator``.
        generator: the random source of the drawn ``sample`` and ``noise``. Defaults to ``None``: torch's
            global generator.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with the student's graph; ``logs`` maps ``"loss"``, ``"t_mean"`` (mean
        ``sample.t``) and ``"target_norm"`` (RMS of the target side) to detached 0-d tensors. There is no
        ``reduction``: for per-sample values build the pair with :func:`consistency_pair` and call
        ``compute_distance(..., reduction="none")``.

    Raises:
        DTypeError: ``x0`` / ``x_t`` / ``noise`` not a floating tensor, ``sample`` not a TimestepSample, a
            conditioning argument not a mapping, ``generator`` not a torch.Generator, ``huber_c`` not a
            number, or a model failing on the latents' dtype.
        ShapeError: empty or 0-d latents, ``noise`` not of ``x0``'s shape, ``sample`` / ``guidance_scale`` /
            conditioning tensors not of batch ``B`` (or 1), a prediction not of ``x_t``'s shape.
        OptionError: both or neither of ``x0`` / ``x_t``, ``x_t`` without ``sample`` or with ``noise``, a
            negative or unused ``huber_c``, an unknown ``distance`` / ``target`` / ``prediction_type``,
            ``num_ddim_timesteps`` < 1, ``teacher`` not a TeacherSolver, timesteps out of order or range.
        NonFiniteError: NaN/Inf in ``x0``, ``x_t``, ``noise`` or ``guidance_scale`` (value check).

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
    ref, sample = _loss_inputs(x0, x_t, sample, noise, generator)
    teacher = _check_pair_options(
        student, teacher, cond, uncond, student_cond, target, 1, guidance_scale, prediction_type, ref.shape[0]
    )
    _check_distance(distance, huber_c)
    if sample is None:
        sample = lcm_skip_pairs(
            ref.shape[0],
            num_ddim_timesteps,
            teacher.schedule.num_train_timesteps,
            generator=generator,
            device=ref.device,
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
        teacher_steps=1,
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

    What the student is for: trained with ``k`` segments, it samples with DDIM in ``k`` steps (or a multiple
    of ``k``) on the trailing grid whose points are the segment boundaries
    (:func:`~diffdistill.schedulers.few_step_samplers.ddim_sample` with
    ``spaced_timesteps(k, "trailing")``): its targets train exactly the moves from a state to the boundary
    below. With ``k = 1`` the target end ``t_end`` is random in ``[0, t_{n-1}]`` (CTM-style), so the 1-step
    sample of a ``k = 1`` student is no trained end-point prediction; Hyper-SD's one-step model comes from its
    separate one-step stage (Sec. 3.3: :func:`~diffdistill.losses.dmd_loss` with an online fake score plus an
    MSE, on pure noise at ``t = 999`` or ``800``). See :meth:`~diffdistill.schedulers.StagePlan.hyper_sd`.

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)`` (``t`` ``(B,)``: the network
            timestep, see the module docstring), returning a
            prediction of ``x_t``'s shape in ``prediction_type``.
        teacher: the frozen guided teacher; its schedule is the schedule of the loss.
        x0: clean latents ``(B, ...)``, noised here to ``sample.t``. Defaults to ``None``: pass ``x_t``
            instead (exactly one of the two).
        cond: conditioning kwargs of the teacher's conditional pass. Defaults to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        num_segments: the number ``k`` of trajectory segments of this stage (Hyper-SD: 8, 4, 2, 1); required.
            Unused when ``sample`` is given.
        num_inference_steps: size of the teacher's DDIM grid the segments are cut from. Defaults to 50.
            Unused when ``sample`` is given.
        x_t: ready noisy states ``(B, ...)`` at ``sample.t``; needs ``sample`` and no ``noise``. Defaults to
            ``None``: ``x0`` is noised here.
        sample: the timesteps ``(t_n, t_{n-1}, t_end)``. Defaults to ``None``: drawn with
            :func:`~diffdistill.schedulers.tscd_segments` using ``generator``.
        target: ``"online"`` (the default), ``"teacher"``, or a callable such as an EMA copy.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` or a
            callable returning ``(B,)`` or a scalar.
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own.
        student_cond: kwargs of the student and of a callable target. Defaults to ``None``: ``cond``.
        prediction_type: what the student predicts. Defaults to ``None``: the schedule's.
        noise: the noise for ``x0``, of ``x0``'s shape. Defaults to ``None``: drawn with ``generator``.
        generator: the random source of the drawn ``sample`` and ``noise``. Defaults to ``None``: torch's
            global generator.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with the student's graph; ``logs`` maps ``"loss"``, ``"t_mean"`` and
        ``"target_norm"`` to detached 0-d tensors. For per-sample values use :func:`consistency_pair` with
        ``parameterization="move"`` and ``compute_distance(..., reduction="none")``.

    Raises:
        DTypeError: ``x0`` / ``x_t`` / ``noise`` not a floating tensor, ``sample`` not a TimestepSample, a
            conditioning argument not a mapping, ``generator`` not a torch.Generator, or a model failing on
            the latents' dtype.
        ShapeError: empty or 0-d latents, ``noise`` not of ``x0``'s shape, ``sample`` / ``guidance_scale`` /
            conditioning tensors not of batch ``B`` (or 1), a prediction not of ``x_t``'s shape.
        OptionError: both or neither of ``x0`` / ``x_t``, ``x_t`` without ``sample`` or with ``noise``, an
            invalid ``num_segments`` / ``num_inference_steps`` / ``distance`` / ``target`` /
            ``prediction_type``, ``teacher`` not a TeacherSolver, timesteps out of order or range.
        NonFiniteError: NaN/Inf in ``x0``, ``x_t``, ``noise`` or ``guidance_scale`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, logs = tscd_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8), num_segments=4,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> loss.ndim, sorted(logs)
        (0, ['loss', 't_mean', 'target_norm'])
    """
    ref, sample = _loss_inputs(x0, x_t, sample, noise, generator)
    teacher = _check_pair_options(
        student, teacher, cond, uncond, student_cond, target, 1, guidance_scale, prediction_type, ref.shape[0]
    )
    _check_distance(distance)
    if sample is None:
        sample = tscd_segments(
            ref.shape[0],
            num_segments,
            num_inference_steps,
            teacher.schedule.num_train_timesteps,
            generator=generator,
            device=ref.device,
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
        teacher_steps=1,
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
    on_grid: bool = True,
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

    with :math:`t_m` in segment ``s``, :math:`t_n = \\max(t_m - \\text{skip}, t^s)`, the lower milestone
    :math:`t^s` (:func:`~diffdistill.schedulers.milestone_pairs`; :math:`t_n` is clamped at the milestone, so
    the target side runs at a timestep the student also trains at, or at the milestone, where the move is the
    identity), a CFG teacher step (``w = 8`` in the paper) and the online target (no EMA). For the paper's
    data-free states, draw ``sample`` first and pass
    ``x_t = teacher_trajectory_states(teacher, noise, sample.t, ...)``.

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)`` (``t`` ``(B,)``: the network
            timestep, see the module docstring), returning a
            prediction of ``x_t``'s shape in ``prediction_type``.
        teacher: the frozen guided teacher; its schedule is the schedule of the loss.
        x0: clean latents ``(B, ...)``, noised here to ``sample.t``. Defaults to ``None``: pass ``x_t``
            instead (exactly one of the two).
        cond: conditioning kwargs of the teacher's conditional pass. Defaults to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        num_segments: number ``M`` of trajectory segments (milestones). Defaults to 8 (MLCM). Unused when
            ``sample`` is given.
        skip: the teacher's step ``t_m - t_n`` in training timesteps, at most ``T / num_segments``. Defaults
            to 20 (a 50-step DDIM grid over T = 1000). Unused when ``sample`` is given.
        on_grid: draw ``t_m`` on the DDIM grid of step ``skip`` that starts at each segment's upper milestone
            (where a multistep sampler evaluates the student) instead of any timestep. Defaults to ``True``
            (issue 20 measured MLCM on the grid at 1/2/4-step SW 0.098/0.085/0.070 against 0.144/0.146/0.151
            for the former off-grid default). Either way every timestep the target is evaluated at is also
            trained (:func:`~diffdistill.schedulers.milestone_pairs`). Unused when ``sample`` is given.
        x_t: ready noisy states ``(B, ...)`` at ``sample.t`` (e.g. :func:`teacher_trajectory_states`); needs
            ``sample`` and no ``noise``. Defaults to ``None``: ``x0`` is noised here.
        sample: the timesteps ``(t_m, t_n, t^s)``. Defaults to ``None``: drawn with
            :func:`~diffdistill.schedulers.milestone_pairs` using ``generator``.
        target: ``"online"`` (the default, as in MLCM), ``"teacher"``, or a callable such as an EMA copy.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` or a
            callable returning ``(B,)`` or a scalar.
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own.
        student_cond: kwargs of the student and of a callable target. Defaults to ``None``: ``cond``.
        prediction_type: what the student predicts. Defaults to ``None``: the schedule's.
        noise: the noise for ``x0``, of ``x0``'s shape. Defaults to ``None``: drawn with ``generator``.
        generator: the random source of the drawn ``sample`` and ``noise``. Defaults to ``None``: torch's
            global generator.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with the student's graph; ``logs`` maps ``"loss"``, ``"t_mean"`` and
        ``"target_norm"`` to detached 0-d tensors. For per-sample values use :func:`consistency_pair` with
        ``parameterization="move"`` and ``compute_distance(..., reduction="none")``.

    Raises:
        DTypeError: ``x0`` / ``x_t`` / ``noise`` not a floating tensor, ``sample`` not a TimestepSample, a
            conditioning argument not a mapping, ``generator`` not a torch.Generator, or a model failing on
            the latents' dtype.
        ShapeError: empty or 0-d latents, ``noise`` not of ``x0``'s shape, ``sample`` / ``guidance_scale`` /
            conditioning tensors not of batch ``B`` (or 1), a prediction not of ``x_t``'s shape.
        OptionError: both or neither of ``x0`` / ``x_t``, ``x_t`` without ``sample`` or with ``noise``, an
            invalid ``num_segments`` / ``skip`` / ``distance`` / ``target`` / ``prediction_type``, ``teacher``
            not a TeacherSolver, timesteps out of order or range.
        NonFiniteError: NaN/Inf in ``x0``, ``x_t``, ``noise`` or ``guidance_scale`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = multistep_consistency_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                      generator=torch.Generator().manual_seed(0))
        >>> bool(loss >= 0)
        True
    """
    ref, sample = _loss_inputs(x0, x_t, sample, noise, generator)
    teacher = _check_pair_options(
        student, teacher, cond, uncond, student_cond, target, 1, guidance_scale, prediction_type, ref.shape[0]
    )
    _check_distance(distance)
    if sample is None:
        sample = milestone_pairs(
            ref.shape[0],
            num_segments,
            skip,
            teacher.schedule.num_train_timesteps,
            on_grid=on_grid,
            generator=generator,
            device=ref.device,
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
        teacher_steps=1,
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

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)`` (``t`` ``(B,)``: the network
            timestep, see the module docstring), returning a
            prediction of ``x_t``'s shape in ``prediction_type``.
        teacher: the frozen guided teacher; its schedule is the schedule of the loss.
        x0: the student's own clean samples ``(B, ...)`` (detach them), re-noised here to ``sample.t``.
        cond: conditioning kwargs of the teacher's conditional pass. Defaults to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        num_segments: number ``M`` of segments; it must divide the schedule's T (the milestones are
            multiples of ``T / M``). Defaults to 8. Unused when ``sample`` is given.
        teacher_steps: guided teacher DDIM steps ``p`` over one segment. Defaults to 3 (MLCM).
        sample: the timesteps ``(t_m, t_n, t_n)``. Defaults to ``None``: milestones drawn with
            :func:`~diffdistill.schedulers.milestone_pairs` (``skip = T / M``, ``on_grid=True``).
        target: ``"online"`` (the default, as in MLCM), ``"teacher"``, or a callable such as an EMA copy.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` or a
            callable returning ``(B,)`` or a scalar.
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own.
        student_cond: kwargs of the student and of a callable target. Defaults to ``None``: ``cond``.
        prediction_type: what the student predicts. Defaults to ``None``: the schedule's.
        noise: the noise for ``x0``, of ``x0``'s shape. Defaults to ``None``: drawn with ``generator``.
        generator: the random source of the drawn ``sample`` and ``noise``. Defaults to ``None``: torch's
            global generator.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with the student's graph; ``logs`` maps ``"loss"``, ``"t_mean"`` and
        ``"target_norm"`` to detached 0-d tensors. For per-sample values use :func:`consistency_pair` and
        ``compute_distance(..., reduction="none")``.

    Raises:
        DTypeError: ``x0`` / ``noise`` not a floating tensor, ``sample`` not a TimestepSample, a conditioning
            argument not a mapping, ``generator`` not a torch.Generator, or a model failing on ``x0``'s dtype.
        ShapeError: empty or 0-d ``x0``, ``noise`` not of ``x0``'s shape, ``sample`` / ``guidance_scale`` /
            conditioning tensors not of batch ``B`` (or 1), a prediction not of ``x0``'s shape.
        OptionError: ``num_segments`` not dividing T, ``teacher_steps`` < 1 or longer than a segment, an
            unknown ``distance`` / ``target`` / ``prediction_type``, ``teacher`` not a TeacherSolver,
            timesteps out of order or range.
        NonFiniteError: NaN/Inf in ``x0``, ``noise`` or ``guidance_scale`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = inter_segment_consistency_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                          generator=torch.Generator().manual_seed(0))
        >>> loss.requires_grad
        True
    """
    ref, sample = _loss_inputs(x0, None, sample, noise, generator, ready_states=False)
    teacher = _check_pair_options(
        student,
        teacher,
        cond,
        uncond,
        student_cond,
        target,
        teacher_steps,
        guidance_scale,
        prediction_type,
        ref.shape[0],
    )
    _check_distance(distance)
    total = teacher.schedule.num_train_timesteps
    if sample is None:
        if (
            isinstance(num_segments, bool)
            or not isinstance(num_segments, int)
            or num_segments < 1
            or total % num_segments
        ):
            raise OptionError(
                f"Expected `num_segments` to divide the {total} training timesteps (the stage's grid has step "
                f"T / num_segments), but got {num_segments!r}; pass a `sample` for other grids."
            )
        sample = milestone_pairs(
            ref.shape[0],
            num_segments,
            total // num_segments,
            total,
            on_grid=True,
            generator=generator,
            device=ref.device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        ref,
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
    teacher_stride: float | None = None,
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

    Args:
        student: the trainable model ``student(x_t, t, **student_cond)`` (``t`` ``(B,)``: the network
            timestep, see the module docstring), returning a
            prediction of ``x_t``'s shape in ``prediction_type``.
        teacher: the frozen guided teacher; its schedule is the schedule of the loss.
        x0: clean latents ``(B, ...)``, noised here to ``sample.t``.
        cond: conditioning kwargs of the teacher's conditional pass. Defaults to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        num_student_steps: the student's number of sampling steps ``N`` of this stage (its trailing grid);
            required. Unused when ``sample`` is given.
        teacher_steps: teacher DDIM steps ``n`` per student jump (e.g. 4 for 128 → 32); required.
        teacher_stride: the teacher's own stride ``s = T/(N n)`` (SDXL-Lightning Sec. 2.3: the teacher runs
            ``t - k s``, clamped at ``t_prev``, zero-length steps skipped; see :func:`consistency_pair`).
            Defaults to ``None``: the student's jump split evenly into ``n`` steps.
        extra_timesteps: additional training timesteps (ints in ``[0, T-1]``) drawn besides the grid, e.g.
            SDXL-Lightning's 999 for the terminal step. Defaults to ``None``: the grid only.
        sample: the timesteps ``(t, t_prev, t_prev)``. Defaults to ``None``: drawn with
            :func:`~diffdistill.schedulers.progressive_pairs` using ``generator``.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` or a
            callable returning ``(B,)`` or a scalar.
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own.
        student_cond: kwargs of the student. Defaults to ``None``: ``cond``.
        prediction_type: what the student predicts. Defaults to ``None``: the schedule's.
        noise: the noise for ``x0``, of ``x0``'s shape. Defaults to ``None``: drawn with ``generator``.
        generator: the random source of the drawn ``sample`` and ``noise``. Defaults to ``None``: torch's
            global generator.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with the student's graph; ``logs`` maps ``"loss"``, ``"t_mean"`` and
        ``"target_norm"`` to detached 0-d tensors. For per-sample values use :func:`consistency_pair` with
        ``target=None, parameterization="move"`` and ``compute_distance(..., reduction="none")``.

    Raises:
        DTypeError: ``x0`` / ``noise`` not a floating tensor, ``sample`` not a TimestepSample, a conditioning
            argument not a mapping, ``generator`` not a torch.Generator, or a model failing on ``x0``'s dtype.
        ShapeError: empty or 0-d ``x0``, ``noise`` not of ``x0``'s shape, ``sample`` / ``guidance_scale`` /
            conditioning tensors not of batch ``B`` (or 1), a prediction not of ``x0``'s shape.
        OptionError: ``num_student_steps`` / ``teacher_steps`` < 1, ``teacher_steps`` longer than a student
            jump (without ``teacher_stride``), ``teacher_stride`` outside ``(0, T]`` or too short to reach
            ``t_prev`` in ``teacher_steps`` steps, invalid ``extra_timesteps``, an unknown ``distance`` / ``prediction_type``, ``teacher`` not a
            TeacherSolver, a ``sample`` with ``t_end != t_prev`` or out of order.
        NonFiniteError: NaN/Inf in ``x0``, ``noise`` or ``guidance_scale`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = progressive_distillation_loss(lambda x, t: conv(x), teacher, torch.randn(2, 4, 8, 8),
        ...                                         num_student_steps=4, teacher_steps=2)
        >>> loss.requires_grad
        True
    """
    ref, sample = _loss_inputs(x0, None, sample, noise, generator, ready_states=False)
    teacher = _check_pair_options(
        student,
        teacher,
        cond,
        uncond,
        student_cond,
        None,
        teacher_steps,
        guidance_scale,
        prediction_type,
        ref.shape[0],
        teacher_stride,
    )
    _check_distance(distance)
    if sample is None:
        sample = progressive_pairs(
            ref.shape[0],
            num_student_steps,
            teacher.schedule.num_train_timesteps,
            extra_timesteps=extra_timesteps,
            generator=generator,
            device=ref.device,
        )
    return _noised_pair_loss(
        student,
        teacher,
        ref,
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
        teacher_stride=teacher_stride,
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
    synchronize: bool | None = None,
) -> torch.Tensor:
    """Data-free training states: run the teacher from pure noise at ``T-1`` down to ``t`` (MLCM Alg. 1).

    MLCM's multistep denoising strategy: a state at :math:`t_m` in segment ``s`` (of ``M = num_segments``;
    segments as in :func:`~diffdistill.schedulers.milestone_pairs`, ``t_m + 1`` in
    :math:`(m_s, m_{s+1}]`) is reached with :math:`L = M - s` guided DDIM steps of size :math:`(T - t_m)/L`,
    so states nearer the data get more (cleaner) steps. Samples with ``t = T-1`` are the noise itself.
    Runs without gradient; samples needing the same number of steps are solved as one batch, so the number of
    teacher calls depends on ``t``. With ``synchronize`` every ``torch.distributed`` process makes the same calls, as
    a teacher sharded over the processes needs (FSDP2 / DeepSpeed ZeRO-3 gather its weights in every call: a
    process calling it a different number of times desynchronises the collectives): one ``all_reduce`` agrees on
    the groups and their step counts, and a process with no sample in a group runs that group's steps on its first
    sample and discards the result; each process's states are those it computes alone. (A group's step count is
    capped by its samples' distance to ``T-1``, the smallest over every process's samples when synchronised; the
    cap binds only when ``num_segments == T``, where every process's minimum is the same.)

    Args:
        teacher: the frozen guided teacher; its schedule gives T.
        noise: pure noise at ``T-1``, shape ``(B, ...)``, floating (its dtype is the states' dtype).
        t: the target timesteps, ints in ``[0, T-1]``: one per sample (``(B,)``) or one for all (a number,
            ``()`` or ``(1,)``); e.g. ``sample.t`` of :func:`~diffdistill.schedulers.milestone_pairs`.
        cond: conditioning kwargs of the teacher's conditional pass (tensors of batch ``B`` or 1). Defaults
            to ``None``: no kwargs.
        uncond: kwargs of the teacher's unconditional pass. Defaults to ``None``: allowed only with a no-op
            guidance scale.
        num_segments: number ``M`` of segments, as in the ``sample`` the states are for, in ``[1, T]``.
            Defaults to 8 (MLCM).
        guidance_scale: the teacher's CFG scale, a number or a ``(B,)`` tensor. Defaults to ``None``: the
            teacher's own.
        synchronize: make the same teacher calls on every process (one ``all_reduce`` on ``noise``'s device; a
            no-op without an initialised process group). Defaults to ``None``: the teacher's own
            (``TeacherSolver(synchronize=...)``).

    Returns:
        The states at ``t``: a tensor of ``noise``'s shape and dtype, without gradient.

    Raises:
        DTypeError: ``noise`` not a floating tensor, ``t`` not integral, a conditioning argument not a
            mapping, or the teacher failing on ``noise``'s dtype.
        ShapeError: ``noise`` empty or 0-d; ``t``, ``guidance_scale`` or a conditioning tensor not of batch
            ``B`` (or 1).
        OptionError: ``teacher`` not a TeacherSolver, ``t`` outside ``[0, T-1]``, ``num_segments`` not an
            int in ``[1, T]``.
        NonFiniteError: NaN/Inf in ``noise`` or ``guidance_scale`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule, TeacherSolver
        >>> teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
        >>> z = torch.randn(3, 4, 8, 8)
        >>> states = teacher_trajectory_states(teacher, z, torch.tensor([999, 500, 40]))
        >>> torch.equal(states[0], z[0]), states.shape
        (True, torch.Size([3, 4, 8, 8]))
    """
    teacher = _check_teacher(teacher)
    noise = _check_latents(noise, "noise")
    batch = noise.shape[0]
    schedule = teacher.schedule
    total = schedule.num_train_timesteps
    num_segments = check_int(num_segments, "num_segments", minimum=1, maximum=total)
    _check_cond(cond, "cond", batch)
    _check_cond(uncond, "uncond", batch)
    _check_guidance(guidance_scale, batch)
    tt = schedule.batch_timesteps(t, noise, "t").expand(batch)
    if bool((tt < 0).any()):
        raise OptionError(f"Expected `t` >= 0 for trajectory states, but got {tt.tolist()}.")
    # Segment s holds u = t + 1 in (m_s, m_{s+1}], m_s = floor(sT/M): milestone_pairs' convention.
    segment = torch.div((tt + 1) * num_segments - 1, total, rounding_mode="floor").clamp(max=num_segments - 1)
    steps = num_segments - segment
    live = tt < total - 1
    # spans[n - 1]: the smallest distance to T-1 among the samples solved in n steps; `total` marks "no sample"
    spans = torch.full((num_segments,), total, dtype=torch.long, device=noise.device)
    for n_steps in steps[live].unique().tolist():
        spans[int(n_steps) - 1] = int((total - 1 - tt[live & (steps == n_steps)]).min())
    sync = teacher.synchronize if synchronize is None else synchronize
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(spans, op=torch.distributed.ReduceOp.MIN)
    out = noise.clone()
    with torch.no_grad():
        for n_steps in range(1, num_segments + 1):
            span = int(spans[n_steps - 1])
            if span == total:  # no sample needs this many steps (on any process, when synchronised)
                continue
            idx = (live & (steps == n_steps)).nonzero().flatten()
            dummy = idx.numel() == 0  # only when synchronised: the calls on the first sample, discarded
            rows = idx if not dummy else torch.zeros(1, dtype=torch.long, device=tt.device)
            target = tt[rows] if not dummy else torch.full_like(tt[:1], total - 1 - span)
            sub_cond = _select(cond, rows, batch)
            sub_uncond = _select(uncond, rows, batch)
            w = guidance_scale
            if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == batch:
                w = w[rows.to(w.device)]
            with explain_dtype_errors("teacher", noise, "noise"):
                result = cast(
                    torch.Tensor,
                    teacher.solve(
                        noise[rows],
                        torch.full_like(target, total - 1),
                        target,
                        sub_cond,
                        sub_uncond,
                        num_steps=min(n_steps, span),
                        guidance_scale=w,
                    ),
                )
            if not dummy:
                out[idx] = result
    return out


def _select(cond: Cond, idx: torch.Tensor, batch: int) -> dict[str, Any] | None:
    """Rows ``idx`` of every batched tensor in a (nested) conditioning dict (shared position ids kept whole)."""
    if cond is None:
        return None
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Mapping):
            out[key] = _select(value, idx, batch)
        elif (
            isinstance(value, torch.Tensor)
            and value.ndim > 0
            and value.shape[0] == batch
            and batch > 1
            and not is_shared_condition(key, value)
        ):
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

    Args:
        online: the trainable copy ``online(x_t, t, **cond)`` (``t`` ``(B,)``: the network timestep, see the
            module docstring), whose output is read
            as the clean sample; it returns a tensor of ``x_t``'s shape.
        frozen: the frozen original model, called the same way under ``no_grad``, predicting in
            ``frozen_prediction_type``.
        x_t: noisy latents ``(B, ...)`` at ``t``, floating.
        t: their timesteps, ints in ``[0, T-1]``: one per sample (``(B,)``) or one for all.
        cond: kwargs of both models (tensors of batch ``B`` or 1). Defaults to ``None``: no kwargs.
        schedule: the noise schedule of ``frozen``; required.
        frozen_prediction_type: what ``frozen`` predicts (``"epsilon"``, ``"v_prediction"``, ...; on a flow
            schedule also ``"flow"``, whose target is :math:`x_t - \\sigma_t v`). Defaults to ``None``: the
            schedule's prediction type.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` or a
            callable returning ``(B,)`` or a scalar.

    Returns:
        ``(loss, logs)``: ``loss`` is a 0-d tensor, the batch mean of the per-sample distance (float32;
        float64 for float64 inputs) with ``online``'s graph; ``logs`` maps ``"loss"`` and ``"target_norm"``
        (RMS of the frozen model's clean-sample estimate) to detached 0-d tensors.

    Raises:
        DTypeError: ``x_t`` not a floating tensor, ``t`` not integral, ``cond`` not a mapping, a model
            returning no floating tensor, or failing on ``x_t``'s dtype.
        ShapeError: ``x_t`` empty or 0-d, ``t`` or a conditioning tensor not of batch ``B`` (or 1), a model's
            output not of ``x_t``'s shape.
        OptionError: ``online`` / ``frozen`` not callable, ``schedule`` not a NoiseSchedule, ``t`` outside
            ``[0, T-1]``, an unknown ``frozen_prediction_type`` or ``distance``.
        NonFiniteError: NaN/Inf in ``x_t`` (value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> sched = NoiseSchedule.from_betas()
        >>> conv = torch.nn.Conv2d(4, 4, 1)
        >>> loss, _ = x0_conversion_loss(lambda x, t: conv(x), lambda x, t: 0.1 * x, torch.randn(2, 4, 8, 8),
        ...                              torch.tensor([999, 500]), schedule=sched)
        >>> loss.requires_grad
        True
    """
    _check_model(online, "online")
    _check_model(frozen, "frozen")
    if not isinstance(schedule, NoiseSchedule):
        raise OptionError(
            f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. Build one with "
            "NoiseSchedule.from_scheduler(diffusers_scheduler)."
        )
    x_t = _check_latents(x_t, "x_t")
    _check_cond(cond, "cond", x_t.shape[0])
    _check_prediction_type(frozen_prediction_type, "frozen_prediction_type", schedule)
    _check_distance(distance)
    tt = schedule.batch_timesteps(t, x_t, "t").expand(x_t.shape[0])
    if value_checks_enabled() and bool((tt < 0).any()):
        raise OptionError(
            f"Expected `t` >= 0 (the networks are evaluated at t; -1 is the clean end of the schedule), but got "
            f"{tt.tolist()}."
        )
    with torch.no_grad():
        target = schedule.to_x0(
            _call(frozen, x_t, tt, cond, "frozen", schedule), x_t, tt, frozen_prediction_type
        )
    pred = _call(online, x_t, tt, cond, "online", schedule)
    loss = _compute_distance(pred, target, distance, input_name="online", target_name="target", finite=False)
    return loss, {"loss": loss.detach(), "target_norm": target.float().pow(2).mean().sqrt().detach()}
