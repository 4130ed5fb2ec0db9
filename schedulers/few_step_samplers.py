"""Few-step samplers for evaluating distilled students, and the timestep lists they run on.

Every sampler runs a denoiser ``model(x_t, t, **cond)`` (optionally with classifier-free guidance
through :class:`~diffdistill.schedulers.teacher_solver.TeacherSolver`) over a strictly decreasing list
of diffusers timestep indices ``t_0 > t_1 > ... > t_{n-1}``, starting from ``x_t`` at ``t_0`` (pure
noise for text-to-image), and returns a :class:`SamplerOutput` holding the final sample, the timesteps
used, every noise it drew (so a run can be logged and replayed with ``noises=``) and, on request, the
trajectory. All the schedule arithmetic goes through :class:`~diffdistill.schedulers.NoiseSchedule`
(float64 coefficients, results in the input dtype). States are ``(B, ...)``: image latents, or Wan's video
latents ``(B, C, F, H, W)`` (on :func:`flow_pipeline_grid` ``(schedule, N, pipeline="wan")``, its UniPC grid).

==============================  =====================================================================
sampler                         step from ``t_i`` (model output :math:`\\to \\hat x_0, \\hat\\epsilon`)
==============================  =====================================================================
:func:`lcm_sample`              :math:`f = c_\\text{skip} x + c_\\text{out}\\hat x_0`, then
                                :math:`x_{t_{i+1}} = \\alpha_{t_{i+1}} f + \\sigma_{t_{i+1}} z`
                                (LCM, Luo et al. arXiv:2310.04378; diffusers ``LCMScheduler``)
:func:`tcd_sample`              DDIM to :math:`s = \\lfloor (1-\\eta) t_{i+1} \\rfloor`, re-noise to
                                :math:`t_{i+1}` (TCD, Zheng et al. arXiv:2402.19159; Hyper-SD)
:func:`ddim_sample`             :math:`x_{t_{i+1}} = \\alpha_{t_{i+1}}\\hat x_0 + \\sigma_{t_{i+1}}\\hat\\epsilon`
                                (DDIM, Song et al. ICLR 2021; Hyper-SD N-step LoRAs)
:func:`euler_sample`            Euler on the PF-ODE in :math:`\\sigma = \\sigma_t/\\alpha_t`
                                (diffusers ``EulerDiscreteScheduler``; SDXL-Lightning)
:func:`x0_renoise_sample`       :math:`x_{t_{i+1}} = \\alpha_{t_{i+1}}\\hat x_0 + \\sigma_{t_{i+1}} z`
                                (DMD2 arXiv:2405.14867, TLCM arXiv:2406.05768)
:func:`one_step_sample`         :math:`\\hat x_0(x_t, t)` (SDXL-Lightning 1-step x0 UNet, DMD2 1-step)
==============================  =====================================================================

Timestep lists (int64, strictly decreasing, in ``[0, T-1]``): :func:`lcm_timesteps` (LCM / TCD grid),
:func:`spaced_timesteps` (diffusers ``timestep_spacing``), :func:`custom_timesteps` (any list, e.g.
``[999, 759, 499, 259]`` or Hyper-SD's one-step ``[800]``), :func:`tlcm_timesteps`,
:func:`dmd2_timesteps`.

**Rectified-flow models** (SD3, FLUX, Qwen-Image, Wan; Esser et al. 2024): the same samplers run on a flow
:class:`~diffdistill.schedulers.NoiseSchedule`, where the model is called with
:meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep` (:math:`\\sigma \\cdot 1000`, float32) and outputs
the velocity (``prediction_type="flow"``). Because :math:`x_\\sigma` is linear in :math:`\\sigma`, the DDIM
move is the exact Euler step, so :func:`ddim_sample` / :func:`euler_sample` are diffusers'
``FlowMatchEulerDiscreteScheduler`` loop, :func:`x0_renoise_sample` is ``FlowMatchLCMScheduler``'s loop
(flow-LCM: :math:`\\hat x_0 = x - \\sigma v`, then :math:`(1-\\sigma') \\hat x_0 + \\sigma' z`) and
:func:`one_step_sample` at ``t = T-1`` is :math:`x - v`. ``timesteps`` may then be a
:class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid` for the grids diffusers' SD3 / FLUX
pipelines use, :func:`~diffdistill.schedulers.flow_sigma_grid` for any other, e.g. a student's shifted grid):
a grid on the training table steps on its indices, an off-table one (SD3's shifted default grids, custom
sigmas) on its own :meth:`~diffdistill.schedulers.FlowSigmaGrid.grid_schedule`. A guidance-distilled model
(FLUX.1-dev) takes its scale as a condition: pass ``cond={"guidance": torch.full((B,), 3.5)}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_dtype_floating,
    check_finite,
    check_generator,
    check_int,
    check_mapping,
    check_option,
    check_real,
    check_tensor,
)
from .consistency import _check_constants, _consistency
from .flow_schedule import FlowSigmaGrid, _pipeline_flow_grid
from .noise_schedule import NoiseSchedule
from .teacher_solver import (
    GUIDANCE_CONVENTIONS,
    TeacherSolver,
    _check_scale,
    _check_scale_batch,
    _check_state,
    _noop_scale,
)

__all__ = [
    "FLOW_PIPELINES",
    "TIMESTEP_SPACINGS",
    "TLCM_GRID_INDICES",
    "SamplerOutput",
    "custom_timesteps",
    "ddim_sample",
    "dmd2_timesteps",
    "euler_sample",
    "flow_pipeline_grid",
    "lcm_sample",
    "lcm_timesteps",
    "one_step_sample",
    "spaced_timesteps",
    "tcd_sample",
    "tlcm_timesteps",
    "x0_renoise_sample",
]

TIMESTEP_SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
"""The ``timestep_spacing`` values of diffusers' DDIM / Euler schedulers supported by :func:`spaced_timesteps`."""

TLCM_GRID_INDICES: dict[int, tuple[int, ...]] = {
    1: (0,),
    2: (0, 4),
    3: (0, 4, 7),
    4: (0, 2, 4, 7),
    5: (0, 2, 4, 6, 7),
    6: (0, 2, 4, 5, 6, 7),
    7: (0, 2, 3, 4, 5, 6, 7),
    8: (0, 1, 2, 3, 4, 5, 6, 7),
}
"""Indices into TLCM's 9-point grid used for 1-8 steps (TLCM ``inference.py``; index 8, t = 0, is the
clean end where the last x0 prediction is returned, so it is not a model timestep)."""

Model = Callable[..., Any]
IndexList = Sequence[int] | torch.Tensor
TimestepList = IndexList | FlowSigmaGrid
FLOW_PIPELINES: tuple[str, ...] = ("sd3", "flux", "wan")
"""The sampling-grid recipes of diffusers' flow pipelines known to :func:`flow_pipeline_grid`."""


# ---------------------------------------------------------------------------------------------------
# timestep lists
# ---------------------------------------------------------------------------------------------------
def _check_strength(strength: float) -> float:
    value = check_real(strength, "strength", allow_tensor=True)
    if not 0.0 < value <= 1.0:
        raise OptionError(
            f"Expected `strength` to lie in (0, 1] (1.0 = start from pure noise), but got {strength!r}."
        )
    return value


def _as_timestep_list(
    timesteps: IndexList, num_train_timesteps: int, name: str = "timesteps"
) -> torch.Tensor:
    """Validate a list of diffusers timestep indices; return it as a 1-D int64 CPU tensor."""
    if isinstance(timesteps, torch.Tensor):
        ts = timesteps.detach().cpu()
    else:
        try:
            ts = torch.as_tensor(list(timesteps))
        except (TypeError, ValueError, RuntimeError) as err:
            raise DTypeError(
                f"Expected `{name}` to be a sequence of ints or a 1-D tensor, but got {type(timesteps).__name__}"
                f" ({repr(timesteps)[:80]}). Wrap a single timestep in a list, e.g. [999]."
            ) from err
    if ts.ndim != 1 or ts.numel() == 0:
        raise ShapeError(
            f"Expected `{name}` to be a non-empty 1-D list of timesteps, but got shape {tuple(ts.shape)}. "
            "Pass e.g. [999, 759, 499, 259].",
            name=name,
            expected="(n,) with n >= 1",
            actual=tuple(ts.shape),
        )
    if ts.dtype == torch.bool or ts.is_complex():
        raise DTypeError(f"Expected `{name}` to hold integer timesteps, but got dtype {ts.dtype}.")
    if ts.is_floating_point():
        check_finite(ts, name)
        if not bool((ts == ts.round()).all()):
            raise OptionError(
                f"Expected `{name}` to hold integral timestep indices, but got {ts.tolist()}. Round them first."
            )
        ts = ts.round()
    ts = ts.to(torch.int64)
    lo, hi = int(ts.min()), int(ts.max())
    if lo < 0 or hi > num_train_timesteps - 1:
        raise OptionError(
            f"Expected every value of `{name}` to lie in [0, {num_train_timesteps - 1}] (diffusers indices), "
            f"but got {ts.tolist()}."
        )
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise OptionError(
            f"Expected `{name}` to be strictly decreasing (noisiest first, e.g. [999, 759, 499, 259]), but got "
            f"{ts.tolist()}."
        )
    return ts


def custom_timesteps(
    timesteps: IndexList, *, num_train_timesteps: int = 1000, strength: float = 1.0
) -> torch.Tensor:
    """Validate a user-chosen timestep list (as diffusers' ``set_timesteps(timesteps=[...])``).

    Examples from the papers: LCM / Hyper-SD 4 steps ``[999, 759, 499, 259]``; Hyper-SD's dedicated
    one-step UNet ``[800]`` (Ren et al. 2024, arXiv:2404.13686, used with ``LCMScheduler``); DMD2's
    ``[999, 749, 499, 249]`` (Yin et al. 2024, arXiv:2405.14867).

    With ``strength < 1`` (img2img) only the last ``floor(n * strength)`` entries are kept, as
    ``LCMScheduler`` / ``TCDScheduler`` do with custom timesteps.

    Args:
        timesteps: strictly decreasing integers in ``[0, T-1]`` (a sequence or a 1-D tensor; integral floats
            are accepted).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        strength: fraction of the list to keep (from the end), in ``(0, 1]``; 1 (the default) keeps all.

    Returns:
        int64 tensor of shape ``(m,)``.

    Raises:
        DTypeError: if ``timesteps`` is not a sequence of numbers / a tensor, holds bools, or ``strength`` is
            not a real number.
        ShapeError: if ``timesteps`` is empty or not 1-D.
        NonFiniteError: if ``timesteps`` holds NaN / Inf (a value check).
        OptionError: if the list is fractional, not strictly decreasing, leaves ``[0, T-1]``, or ``strength``
            is outside ``(0, 1]`` or would keep no step.

    Example:
        >>> from diffdistill.schedulers.few_step_samplers import custom_timesteps
        >>> custom_timesteps([999, 759, 499, 259]).tolist()
        [999, 759, 499, 259]
        >>> custom_timesteps([999, 759, 499, 259], strength=0.5).tolist()
        [499, 259]
    """
    t_count = check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
    ts = _as_timestep_list(timesteps, t_count)
    keep = min(int(ts.numel() * _check_strength(strength)), ts.numel())
    if keep < 1:
        raise OptionError(
            f"`strength`={strength} keeps no step of the {ts.numel()} custom timesteps "
            f"(floor({ts.numel()} * {strength}) = 0). Increase `strength` or pass more timesteps."
        )
    return ts[ts.numel() - keep :].clone()


def lcm_timesteps(
    num_inference_steps: int,
    *,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """The LCM / TCD inference timesteps: ``n`` evenly spaced picks from the distillation grid.

    With :math:`k = \\lfloor T / N \\rfloor` (``N = original_inference_steps``, the DDIM grid the student
    was distilled on) the candidates are :math:`c_j = (j+1)k - 1` for :math:`j < \\lfloor N s \\rfloor`
    (``s = strength``), taken in decreasing order, and step ``i`` uses the candidate at index
    :math:`\\lfloor i L / n \\rfloor` (``L`` candidates, numpy ``linspace(0, L, n, endpoint=False)``).
    For ``T = 1000, N = 50``: ``n = 4`` gives ``[999, 759, 499, 259]``.

    This equals ``LCMScheduler.set_timesteps(n, strength=s)`` and ``TCDScheduler.set_timesteps(n,
    strength=s)`` with ``original_inference_steps`` in the scheduler config (Luo et al. 2023,
    arXiv:2310.04378; Zheng et al. 2024, arXiv:2402.19159). Note: ``TCDScheduler.set_timesteps`` called
    *with* an explicit ``original_inference_steps`` ignores its value and picks from every training
    timestep; that is ``lcm_timesteps(n, original_inference_steps=T)``.

    Args:
        num_inference_steps: ``n``, an int >= 1, at most ``floor(N * strength)``.
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        original_inference_steps: ``N`` (default 50, as LCM, LCM-LoRA, TCD, Hyper-SD).
        strength: img2img strength in ``(0, 1]``; 1 (the default) starts at ``T-1``.

    Returns:
        int64 tensor of shape ``(n,)``, strictly decreasing, values on the grid ``(t + 1) % k == 0``.

    Raises:
        OptionError: if a count is below its minimum, ``strength`` is outside ``(0, 1]``, ``N > T``,
            ``n > N`` or ``n > floor(N * strength)``.
        DTypeError: if a count is not an int, or ``strength`` is not a real number.

    Example:
        >>> from diffdistill.schedulers.few_step_samplers import lcm_timesteps
        >>> lcm_timesteps(4).tolist()
        [999, 759, 499, 259]
        >>> lcm_timesteps(2, strength=0.5).tolist()
        [499, 259]
    """
    n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    t_count = check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
    n_orig = check_int(original_inference_steps, "original_inference_steps", minimum=1)
    strength = _check_strength(strength)
    if n_orig > t_count:
        raise OptionError(
            f"Expected `original_inference_steps` <= num_train_timesteps ({t_count}), but got {n_orig}."
        )
    if n > n_orig:
        raise OptionError(
            f"Expected `num_inference_steps` <= original_inference_steps ({n_orig}): the schedule is a subset of "
            f"the {n_orig}-step distillation grid, but got {n}. Raise `original_inference_steps` or use fewer steps."
        )
    k = t_count // n_orig
    candidates = np.arange(1, int(n_orig * strength) + 1, dtype=np.int64) * k - 1
    if candidates.size < n:
        raise OptionError(
            f"Expected `num_inference_steps` <= floor(original_inference_steps * strength) = {candidates.size}, "
            f"but got {n} (strength={strength}). Use fewer steps or a larger `strength`."
        )
    candidates = candidates[::-1]
    picks = np.floor(np.linspace(0, candidates.size, num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(candidates[picks].copy())


def spaced_timesteps(
    num_inference_steps: int,
    spacing: Literal["trailing", "leading", "linspace"] = "trailing",
    *,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
) -> torch.Tensor:
    """Evenly spaced timesteps as diffusers' ``timestep_spacing`` (Lin et al. 2024, arXiv:2305.08891).

    * ``"trailing"``: :math:`t_i = \\operatorname{round}(T - i T/n) - 1`, so ``t_0 = T-1`` always; the
      spacing SDXL-Lightning (arXiv:2402.13929) and Hyper-SD (arXiv:2404.13686) students need.
    * ``"leading"``: :math:`t_i = (n-1-i)\\lfloor T/n \\rfloor + \\text{steps\\_offset}` (SD 1.x default).
    * ``"linspace"``: :math:`\\operatorname{round}` of ``linspace(0, T-1, n)``, reversed (``[0]`` for
      ``n = 1``, as in diffusers).

    All three equal ``DDIMScheduler.set_timesteps(n)`` with that ``timestep_spacing`` (round half to
    even, as numpy), and ``EulerDiscreteScheduler``'s for ``"trailing"`` and ``"leading"`` (its
    ``"linspace"`` keeps fractional timesteps, which a discrete schedule does not support). A
    ``"leading"`` list that would exceed ``T-1`` (``steps_offset`` too large) raises. Where
    diffusers' float ``arange`` yields an extra ``-1`` entry for ``"trailing"`` (e.g. ``T = 1000, n =
    61``), only the first ``n`` entries are returned.

    Args:
        num_inference_steps: ``n`` in ``[1, T]``.
        spacing: one of :data:`TIMESTEP_SPACINGS` (default ``"trailing"``).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        steps_offset: an int >= 0 added to ``"leading"`` timesteps (diffusers config ``steps_offset``; SD 1.x
            uses 1; default 0).

    Returns:
        int64 tensor of shape ``(n,)``, strictly decreasing, in ``[0, T-1]``.

    Raises:
        OptionError: if ``spacing`` is unknown, a count is below its minimum, ``n > T``, or a
            ``"leading"`` list with ``steps_offset`` would exceed ``T-1``.
        DTypeError: if a count is not an int.

    Example:
        >>> from diffdistill.schedulers.few_step_samplers import spaced_timesteps
        >>> spaced_timesteps(4).tolist()
        [999, 749, 499, 249]
        >>> spaced_timesteps(4, "leading", steps_offset=1).tolist(), spaced_timesteps(4, "linspace").tolist()
        ([751, 501, 251, 1], [999, 666, 333, 0])
    """
    check_option(spacing, "spacing", TIMESTEP_SPACINGS)
    n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    t_count = check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
    offset = check_int(steps_offset, "steps_offset", minimum=0)
    if n > t_count:
        raise OptionError(f"Expected `num_inference_steps` <= num_train_timesteps ({t_count}), but got {n}.")
    if spacing == "trailing":
        values = (np.round(np.arange(t_count, 0, -t_count / n)) - 1)[:n]
    elif spacing == "leading":
        values = (np.arange(0, n) * (t_count // n))[::-1] + offset
        if int(values[0]) > t_count - 1:
            raise OptionError(
                f"Expected `steps_offset` <= {t_count - 1 - int(values[0]) + offset} for {n} 'leading' steps "
                f"with num_train_timesteps={t_count}, but got {offset}: the first timestep would be "
                f"{int(values[0])} > {t_count - 1}. Lower `steps_offset` or use spacing='trailing'."
            )
    else:
        values = np.linspace(0, t_count - 1, n).round()[::-1]
    return _as_timestep_list(torch.from_numpy(values.astype(np.int64)), t_count)


def tlcm_timesteps(num_inference_steps: int, *, num_train_timesteps: int = 1000) -> torch.Tensor:
    """TLCM / MLCM inference timesteps: a subset of the 9-point grid ``linspace(T-1, 0, 9)``.

    The grid :math:`g_j = \\lfloor (T-1)(8-j)/8 \\rfloor` (``[999, 874, 749, 624, 499, 374, 249, 124, 0]``
    for ``T = 1000``) matches the M = 8 milestones of training; ``n`` steps use the indices
    :data:`TLCM_GRID_INDICES` ``[n]`` (e.g. 4 steps: ``[0, 2, 4, 7]``), as TLCM's ``inference.py``
    (Xie et al. 2024, arXiv:2406.05768). Sample with :func:`x0_renoise_sample`.

    Args:
        num_inference_steps: ``n`` in ``1..8``.
        num_train_timesteps: ``T``, an int >= 9 (default 1000).

    Returns:
        int64 tensor of shape ``(n,)``.

    Raises:
        OptionError: if ``n`` is not an int in ``1..8`` or ``T < 9``.
        DTypeError: if ``T`` is not an int.

    Example:
        >>> from diffdistill.schedulers.few_step_samplers import tlcm_timesteps
        >>> tlcm_timesteps(4).tolist()
        [999, 749, 499, 124]
    """
    t_count = check_int(num_train_timesteps, "num_train_timesteps", minimum=9)
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, (int, np.integer))
        or int(num_inference_steps) not in TLCM_GRID_INDICES
    ):
        raise OptionError(
            f"Expected `num_inference_steps` to be one of {sorted(TLCM_GRID_INDICES)} (TLCM's 9-point grid), "
            f"but got {num_inference_steps!r}."
        )
    grid = [((t_count - 1) * (8 - j)) // 8 for j in range(9)]
    return torch.tensor([grid[j] for j in TLCM_GRID_INDICES[int(num_inference_steps)]], dtype=torch.int64)


def dmd2_timesteps(num_inference_steps: int = 4, *, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DMD2's multi-step student timesteps :math:`t_i = T - 1 - i\\lfloor T/n \\rfloor`.

    ``n = 4`` gives DMD2's SDXL ``denoising_step_list = [999, 749, 499, 249]`` (Yin et al. 2024,
    arXiv:2405.14867); equal to :func:`spaced_timesteps` ``"trailing"`` when ``n`` divides ``T``. Sample
    with :func:`x0_renoise_sample`. (DMD2's *one-step* SDXL generator instead conditions on ``t = 399``:
    ``custom_timesteps([399])``.)

    Args:
        num_inference_steps: ``n`` in ``[1, T]`` (default 4).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).

    Returns:
        int64 tensor of shape ``(n,)``, strictly decreasing.

    Raises:
        OptionError: if a count is below its minimum or ``n > T``.
        DTypeError: if a count is not an int.

    Example:
        >>> from diffdistill.schedulers.few_step_samplers import dmd2_timesteps
        >>> dmd2_timesteps().tolist()
        [999, 749, 499, 249]
    """
    n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    t_count = check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
    if n > t_count:
        raise OptionError(f"Expected `num_inference_steps` <= num_train_timesteps ({t_count}), but got {n}.")
    return t_count - 1 - torch.arange(n, dtype=torch.int64) * (t_count // n)


def flow_pipeline_grid(
    schedule: NoiseSchedule,
    num_inference_steps: int,
    *,
    pipeline: Literal["sd3", "flux", "wan"] | None = None,
    mu: float | None = None,
    image_seq_len: int | float | None = None,
) -> FlowSigmaGrid:
    """The sigma grid a diffusers flow pipeline samples on, for a flow schedule (float64).

    * ``"sd3"`` (``StableDiffusion3Pipeline``, SD3 / SD3.5): ``scheduler.set_timesteps(N)`` without sigmas, i.e.
      :func:`~diffdistill.schedulers.flow_sigma_grid` ``(schedule, N)``: ``linspace`` between the shifted
      table's ends, shifted again (SD3 at 28 steps, shift 3, ends at :math:`\\sigma = 0.00893`; reference/flow.md
      §1 "double shift").
    * ``"flux"`` (``FluxPipeline``, ``QwenImagePipeline``): ``sigmas = numpy.linspace(1, 1/N, N)``, shifted by the
      resolution's :math:`\\mu` (``calculate_shift`` of the image token count) on a dynamic schedule, or by the
      static shift otherwise (FLUX.1-schnell: 1).
    * ``"wan"`` (``WanPipeline``, Wan 2.1 / 2.2): its ``UniPCMultistepScheduler(use_flow_sigmas=True,
      flow_shift=...)``'s ``set_timesteps(N)``: ``numpy.linspace(1, 1/T, N + 1)[:-1]`` shifted, the first sigma
      lowered by 1e-6 (:func:`~diffdistill.schedulers.flow_sigma_grid` on a schedule from that scheduler; here
      for any static-shift schedule). The samplers walk it with their own steps, not UniPC's; Wan 2.2 A14B's
      expert switch is the caller's (call the high-noise expert while ``sigma * T >= boundary_ratio * T``).

    ``"sd3"`` and ``"flux"`` build ``FlowMatchEulerDiscreteScheduler``'s grids from the schedule's shift whatever
    solver the schedule was read from: on a Wan schedule ``"flux"`` starts at exactly 1 (UniPC's 1e-6 is UniPC's).

    Sample on the result with any sampler of this module (``timesteps=grid``), e.g. :func:`ddim_sample` for
    diffusers' Euler loop.

    Args:
        schedule: a flow :class:`~diffdistill.schedulers.NoiseSchedule` (from ``from_scheduler`` /
            ``flow_matching``).
        num_inference_steps: ``N``, an int >= 1 (SD3: 28, FLUX.1-dev: 28, FLUX.1-schnell: 4).
        pipeline: ``"sd3"``, ``"flux"`` or ``"wan"``; default: ``"wan"`` for a schedule read from a UniPC
            ``use_flow_sigmas`` scheduler, ``"flux"`` for a dynamic-shift schedule, ``"sd3"`` otherwise.
        mu: a dynamic schedule's shift for this grid (default: the schedule's ``mu``); not with
            ``image_seq_len``.
        image_seq_len: the image token count to compute ``mu`` from with the schedule config's base / max values
            (:func:`~diffdistill.schedulers.packed_image_seq_len`, as the FLUX pipeline does).

    Returns:
        The :class:`~diffdistill.schedulers.FlowSigmaGrid` (``N + 1`` sigmas ending at 0).

    Raises:
        DTypeError: if ``schedule`` is not a flow schedule, ``num_inference_steps`` not an int, ``mu`` /
            ``image_seq_len`` not a number.
        OptionError: if ``pipeline`` is unknown, ``num_inference_steps`` < 1, both ``mu`` and ``image_seq_len``
            are given, or either is given for a static-shift schedule (``"wan"``: as
            :func:`~diffdistill.schedulers.flow_sigma_grid`).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> sd3 = NoiseSchedule.flow_matching(shift=3.0)
        >>> grid = flow_pipeline_grid(sd3, 28)
        >>> grid.num_inference_steps, round(float(grid.sigmas[-2]), 5), grid.on_table
        (28, 0.00893, False)
        >>> flux = NoiseSchedule.flow_matching(mu=0.5)
        >>> [round(s, 3) for s in flow_pipeline_grid(flux, 4, image_seq_len=4096).sigmas.tolist()]
        [1.0, 0.905, 0.76, 0.513, 0.0]
    """
    if getattr(schedule, "kind", None) != "flow":
        raise DTypeError(
            f"Expected `schedule` to be a flow NoiseSchedule (kind='flow'), but got {type(schedule).__name__} of "
            f"kind {getattr(schedule, 'kind', None)!r}. VP pipelines use spaced_timesteps / lcm_timesteps."
        )
    n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    config = schedule.flow_config
    dynamic = config is not None and config.dynamic
    if pipeline is None:
        unipc = config is not None and config.multistep_grid == "unipc"
        pipeline = "wan" if unipc else "flux" if dynamic else "sd3"
    check_option(pipeline, "pipeline", FLOW_PIPELINES)
    if mu is not None and image_seq_len is not None:
        raise OptionError(
            f"Expected at most one of `mu` or `image_seq_len`, but got mu={mu!r} and image_seq_len={image_seq_len!r}."
        )
    if (mu is not None or image_seq_len is not None) and not dynamic:
        raise OptionError(
            "`mu` / `image_seq_len` apply only to a dynamic-shift schedule (use_dynamic_shifting), but this schedule "
            "uses a static shift, which diffusers applies whatever the resolution. Drop them."
        )
    if image_seq_len is not None and config is not None:
        mu = config.mu_for(image_seq_len)
    if pipeline == "wan":
        return _pipeline_flow_grid(schedule, n, None, mu, "unipc")
    if (
        pipeline == "sd3"
    ):  # FlowMatchEulerDiscreteScheduler's recipe, whatever solver the schedule was read from
        return _pipeline_flow_grid(schedule, n, None, mu, None)
    sigmas = torch.from_numpy(np.linspace(1.0, 1 / n, n))
    return _pipeline_flow_grid(schedule, None, sigmas, mu, None)


# ---------------------------------------------------------------------------------------------------
# sampler plumbing
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerOutput:
    """What a few-step sampler returns (built by the samplers, not by the caller).

    Args:
        sample: the final sample (shape and dtype of the input ``x_t``).
        timesteps: int64 ``(n,)`` CPU tensor of the timesteps the model was evaluated at.
        noises: every noise tensor drawn (in order); pass them back as ``noises=`` to replay the run.
        trajectory: with ``return_trajectory=True``, the ``n`` states fed to the model followed by the
            final sample (``n + 1`` tensors); empty otherwise.
        denoised: with ``return_trajectory=True``, the per-step clean-sample estimates (the consistency
            function output for :func:`lcm_sample`, :math:`\\hat x_0` otherwise); empty otherwise.
        sigmas: on a flow schedule, float64 ``(n,)``: the :math:`\\sigma` of each model evaluation (with a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` off the table, ``timesteps`` index the grid's own
            schedule, so read these); None on a VP schedule.
    """

    sample: torch.Tensor
    timesteps: torch.Tensor
    noises: tuple[torch.Tensor, ...] = ()
    trajectory: tuple[torch.Tensor, ...] = ()
    denoised: tuple[torch.Tensor, ...] = ()
    sigmas: torch.Tensor | None = None


class _NoiseSource:
    """Fresh N(0, I) draws shaped like ``like`` (drawn on the generator's device, as diffusers'
    ``randn_tensor``), or the caller's replayed ``noises``; records what it hands out.

    Args:
        like: the state the draws are shaped like (``x_t``).
        generator: the caller's generator (checked by :func:`_prepare`).
        noises: the caller's replayed noises, or None.
        needed: how many draws the sampler makes.

    Raises:
        DTypeError: if ``noises`` is a bare tensor or not a sequence, or a noise is not a floating tensor.
        OptionError: if ``noises`` holds another number of tensors than ``needed``.
        ShapeError: if a noise is not the shape of ``like``.
        NonFiniteError: if a noise holds NaN / Inf (a value check).
    """

    def __init__(
        self,
        like: torch.Tensor,
        generator: torch.Generator | None,
        noises: Sequence[torch.Tensor] | None,
        needed: int,
    ) -> None:
        self.like = like
        self.generator = generator
        self.drawn: list[torch.Tensor] = []
        self.replay: list[torch.Tensor] | None = None
        if noises is not None:
            if isinstance(noises, torch.Tensor) or not isinstance(noises, Sequence):
                raise DTypeError(
                    f"Expected `noises` to be a list of tensors (one per re-noising step), but got "
                    f"{type(noises).__name__}. Wrap a single tensor: noises=[z]."
                )
            replay = list(noises)
            if len(replay) != needed:
                raise OptionError(
                    f"Expected `noises` to hold {needed} tensor(s) (one per re-noising step), but got "
                    f"{len(replay)}. Pass the `noises` of an earlier SamplerOutput with the same timesteps."
                )
            for i, z in enumerate(replay):
                check_tensor(z, f"noises[{i}]")
                check_dtype_floating(z, f"noises[{i}]")
                if z.shape != like.shape:
                    raise ShapeError(
                        f"Expected `noises[{i}]` to have the shape of `x_t` {tuple(like.shape)}, but got "
                        f"{tuple(z.shape)}.",
                        name=f"noises[{i}]",
                        expected=tuple(like.shape),
                        actual=tuple(z.shape),
                    )
                check_finite(z, f"noises[{i}]")
            self.replay = replay

    def __call__(self) -> torch.Tensor:
        if self.replay is not None:
            z = self.replay[len(self.drawn)].to(device=self.like.device, dtype=self.like.dtype)
        else:
            device = self.generator.device if self.generator is not None else self.like.device
            z = torch.randn(
                self.like.shape, generator=self.generator, device=device, dtype=self.like.dtype
            ).to(self.like.device)
        self.drawn.append(z)
        return z


# step(i, t, x, model_output, draw) -> (x_next, denoised)
_Step = Callable[[int, int, torch.Tensor, torch.Tensor, _NoiseSource], tuple[torch.Tensor, torch.Tensor]]


class _Setup(NamedTuple):
    """Validated sampler inputs (:func:`_prepare`)."""

    timesteps: torch.Tensor
    prediction_type: str
    solver: TeacherSolver
    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    guidance_scale: float | torch.Tensor


def _prepare(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    prediction_type: str | None,
    guidance: Literal["imagen", "lcm"],
    guidance_scale: float | torch.Tensor | None,
    cond: Mapping[str, Any] | None,
    uncond: Mapping[str, Any] | None,
    generator: torch.Generator | None = None,
    *,
    timesteps_name: str = "timesteps",
    sampler: str | None = None,
) -> _Setup:
    """Every boundary check of a sampler, once, before the first model call.

    ``sampler`` names a sampler whose step reads the training index itself (LCM's boundary scalings, TCD's
    ``s``): it refuses an off-table :class:`FlowSigmaGrid`, whose indices are the grid's own.
    """
    if not callable(model):
        raise OptionError(
            f"Expected `model` to be callable as model(x_t, t, **cond), but got {type(model).__name__}."
        )
    if not isinstance(schedule, NoiseSchedule):
        raise OptionError(
            f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. Build one with "
            "NoiseSchedule.from_scheduler(diffusers_scheduler) or NoiseSchedule.from_betas()."
        )
    _check_state(x_t)
    check_option(guidance, "guidance", GUIDANCE_CONVENTIONS)
    if isinstance(timesteps, FlowSigmaGrid):
        schedule, timesteps = _resolve_grid(schedule, timesteps, timesteps_name, sampler)
    ts = _as_timestep_list(timesteps, schedule.num_train_timesteps, timesteps_name)
    pt = schedule._prediction_type(prediction_type)
    cond_kw = check_mapping(cond, "cond")
    uncond_kw = None if uncond is None else check_mapping(uncond, "uncond")
    solver = TeacherSolver(model, schedule, guidance=guidance, prediction_type=pt)
    w = _noop_scale(guidance) if guidance_scale is None else _check_scale(guidance_scale)
    _check_scale_batch(w, x_t.shape[0])
    check_generator(generator)
    return _Setup(ts, pt, solver, cond_kw, uncond_kw, w)


def _resolve_grid(
    schedule: NoiseSchedule, grid: FlowSigmaGrid, name: str, sampler: str | None
) -> tuple[NoiseSchedule, torch.Tensor]:
    """The schedule and indices a sampler walks for a flow grid: the training table's indices when every grid
    sigma lies on it, else the grid's own schedule (indices ``N-1 .. 0``), with ``schedule``'s settings."""
    if schedule.kind != "flow":
        raise OptionError(
            f"`{name}` is a FlowSigmaGrid, which needs a flow schedule, but `schedule` is a VP schedule. Pass "
            "integer timesteps (spaced_timesteps / lcm_timesteps) instead."
        )
    base = grid.schedule
    total = schedule.num_train_timesteps
    same = base is schedule or (
        base.kind == "flow"
        and base.num_train_timesteps == total
        and torch.equal(base.sigma(torch.arange(total)), schedule.sigma(torch.arange(total)))
    )
    if not same:
        raise OptionError(
            f"`{name}` is a FlowSigmaGrid built for another schedule ({base!r}) than `schedule` ({schedule!r}). "
            "Build it with flow_sigma_grid(schedule, ...) or flow_pipeline_grid(schedule, ...)."
        )
    if grid.on_table:
        return schedule, grid.indices[:-1]
    if sampler is not None:
        raise OptionError(
            f"{sampler} reads the training index at each step, but `{name}` is a FlowSigmaGrid off the training "
            "table (its sigmas are not table values), which would be walked on its own schedule. Use an on-table "
            "grid (grid.on_table), pass integer timesteps, or sample a flow student with x0_renoise_sample "
            "(flow-LCM) / ddim_sample (Euler)."
        )
    own = grid.grid_schedule(
        prediction_type=schedule.prediction_type,
        compute_dtype=schedule.compute_dtype,
        timestep_scale=schedule.timestep_scale,
    )
    n = grid.num_inference_steps
    return own, torch.arange(n - 1, -1, -1, dtype=torch.int64)


def _run(
    setup: _Setup,
    x_t: torch.Tensor,
    step: _Step,
    *,
    generator: torch.Generator | None,
    noises: Sequence[torch.Tensor] | None,
    noises_needed: int,
    return_trajectory: bool,
    grad: bool,
) -> SamplerOutput:
    """Shared loop: guided model call at each ``t_i`` (TeacherSolver's, without re-checking), then ``step``."""
    source = _NoiseSource(x_t, generator, noises, noises_needed)
    schedule = setup.solver.schedule
    trajectory: list[torch.Tensor] = []
    denoised: list[torch.Tensor] = []
    x = x_t
    for i, t in enumerate(setup.timesteps.tolist()):
        if return_trajectory:
            trajectory.append(x)
        out = setup.solver._predict(
            x, schedule._index(t, x), setup.cond, setup.uncond, setup.guidance_scale, grad
        )
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x, x0 = step(i, t, x, out, source)
        if return_trajectory:
            denoised.append(x0)
    if return_trajectory:
        trajectory.append(x)
    return SamplerOutput(
        sample=x,
        timesteps=setup.timesteps,
        noises=tuple(source.drawn),
        trajectory=tuple(trajectory),
        denoised=tuple(denoised),
        sigmas=schedule.sigma(setup.timesteps) if schedule.kind == "flow" else None,
    )


def _work(schedule: NoiseSchedule, like: torch.Tensor) -> torch.dtype:
    return schedule.work_dtype(like.dtype)


def _to_x0(schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, t: int, pt: str) -> torch.Tensor:
    """:meth:`NoiseSchedule.to_x0` inside a sampling loop (inputs checked once by :func:`_prepare`)."""
    return schedule._x0_eps(out, x, schedule._index(t, x), pt)[0].to(x.dtype)


def _ddim(
    schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, t: int, t_to: int, pt: str
) -> torch.Tensor:
    """:meth:`NoiseSchedule.ddim_step` inside a sampling loop (``t_to < t`` by construction)."""
    return schedule._ddim(out, x, schedule._index(t, x), schedule._index(t_to, x), pt)


def _flow_move(
    schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, t: int, sigma_to: float, pt: str
) -> torch.Tensor:
    """The DDIM (flow: Euler) move of a flow state at index ``t`` to the noise level ``sigma_to``, which need not
    lie on ``schedule``'s table: :math:`x + (\\sigma_{to} - \\sigma_t) v` for a velocity, else
    :math:`(1 - \\sigma_{to}) \\hat x_0 + \\sigma_{to} \\hat\\epsilon` (the same move)."""
    tt = schedule._index(t, x)
    if pt == "flow":
        s = schedule._lookup(1, tt, x)
        return (x.to(s.dtype) + (sigma_to - s) * out.to(s.dtype)).to(x.dtype)
    x0, eps = schedule._x0_eps(out, x, tt, pt)
    return ((1 - sigma_to) * x0 + sigma_to * eps).to(x.dtype)


def _renoise(schedule: NoiseSchedule, x0: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
    """:meth:`NoiseSchedule.add_noise` inside a sampling loop."""
    return schedule._add_noise(x0, z, schedule._index(t, x0))


def _warn_if_source_clips(schedule: Any, sampler: str) -> None:
    """Warn when ``schedule`` was built from a scheduler that clips / thresholds its x0 estimate (audit 13)."""
    if getattr(schedule, "source_clips_x0", False):
        import warnings

        warnings.warn(
            f"{sampler}: the schedule was built from a scheduler with clip_sample=True or thresholding=True "
            "(DDIMScheduler() / DDPMScheduler() default to clip_sample=True; SDXL's config sets False). diffdistill's "
            "samplers never clip the x0 estimate, so the samples differ from that scheduler's. Build it with "
            "clip_sample=False (and thresholding=False), or clip inside your model wrapper.",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------------
def lcm_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    return_trajectory: bool = False,
    grad: bool = False,
) -> SamplerOutput:
    """Multistep consistency (LCM) sampling (Luo et al. 2023, arXiv:2310.04378, Alg. 1).

    At each :math:`t_i` the consistency function
    :math:`f_i = c_\\text{skip}(t_i)\\,x + c_\\text{out}(t_i)\\,\\hat x_0(x, t_i)` (boundary scalings of
    :func:`~diffdistill.schedulers.consistency.boundary_scalings`) is the clean estimate; except after the
    last step it is re-noised with fresh noise, :math:`x \\leftarrow \\alpha_{t_{i+1}} f_i +
    \\sigma_{t_{i+1}} z_i`. The result is :math:`f_{n-1}`. Same outputs as diffusers' ``LCMScheduler``
    (``set_timesteps`` with the same timesteps, ``step(..., generator=g)``) for the same generator state, unless
    that scheduler clips / thresholds its x0 estimate (``clip_sample`` / ``thresholding``: warned).

    Guidance: the defaults are :class:`~diffdistill.schedulers.TeacherSolver`'s (``guidance="imagen"``, no
    guidance unless ``guidance_scale`` is given). An LCM student distilled with a guidance embedding
    (``w_embedding``) takes its scale as a condition instead; pass it in ``cond``.

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timesteps: strictly decreasing ints in ``[0, T-1]``, e.g. from :func:`lcm_timesteps`,
            :func:`spaced_timesteps` or :func:`custom_timesteps`. On a flow schedule also a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid`, ``flow_sigma_grid``).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        sigma_data: :math:`\\sigma_d` of the boundary scalings, a finite number > 0 (0.5, as LCM / diffusers).
        timestep_scaling: :math:`s` of the boundary scalings, a finite number > 0 (10, as LCM / diffusers).
        generator: source of the re-noising draws (``torch.randn`` on the generator's device); ``None`` uses
            the global RNG.
        noises: a list of tensors of the shape of ``x_t`` to replay instead of drawing (the ``noises`` of an
            earlier :class:`SamplerOutput` with the same timesteps).
        return_trajectory: also return the states and the per-step clean estimates (default off).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput`; ``noises`` holds ``n - 1`` draws.

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timesteps`` is not
            strictly decreasing in ``[0, T-1]`` (or is a FlowSigmaGrid of another schedule, or of a VP one),
            ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is
            missing for a real ``guidance_scale``, ``noises`` has the wrong count, or ``sigma_data`` /
            ``timestep_scaling`` is not a finite number > 0.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, ``generator`` is not a torch.Generator, a noise is not a floating
            tensor, the model returns no floating tensor or fails on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``, or a noise is not the shape of
            ``x_t``.
        NonFiniteError: if ``x_t`` or a replayed noise holds NaN / Inf (a value check, once before the first
            step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import lcm_sample, lcm_timesteps
        >>> sched = NoiseSchedule.from_betas()
        >>> eps_model = lambda x, t: 0.5 * x  # toy epsilon-predictor
        >>> g = torch.Generator().manual_seed(0)
        >>> out = lcm_sample(eps_model, sched, torch.randn(2, 4, 8, 8), lcm_timesteps(4), generator=g)
        >>> out.sample.shape, out.timesteps.tolist(), len(out.noises)
        (torch.Size([2, 4, 8, 8]), [999, 759, 499, 259], 3)
    """
    sd, scaling = _check_constants(sigma_data, timestep_scaling)
    setup = _prepare(
        model,
        schedule,
        x_t,
        timesteps,
        prediction_type,
        guidance,
        guidance_scale,
        cond,
        uncond,
        generator,
        sampler="lcm_sample",
    )
    _warn_if_source_clips(schedule, "lcm_sample")
    ts, pt = setup.timesteps, setup.prediction_type
    schedule = setup.solver.schedule  # a FlowSigmaGrid off the table runs on its own schedule
    n = ts.numel()

    def step(
        i: int, t: int, x: torch.Tensor, out: torch.Tensor, draw: _NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = _consistency(out, x, schedule._index(t, x), schedule, pt, sd, scaling)
        if i == n - 1:
            return f, f
        return _renoise(schedule, f, draw(), int(ts[i + 1])), f

    return _run(
        setup,
        x_t,
        step,
        generator=generator,
        noises=noises,
        noises_needed=n - 1,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def _tcd_s(t_prev: int, eta: float) -> int:
    """:math:`\\lfloor (1-\\eta) t_{prev} \\rfloor` in float32, as diffusers computes it (float64 would give
    e.g. 349 instead of 350 for eta = 0.3, t_prev = 500)."""
    prod = torch.tensor(t_prev, dtype=torch.float32) * torch.tensor(1.0 - eta, dtype=torch.float32)
    return int(torch.floor(prod))


def tcd_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    *,
    eta: float = 0.3,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    return_trajectory: bool = False,
    grad: bool = False,
) -> SamplerOutput:
    """Trajectory Consistency Distillation sampling with stochasticity ``eta`` (:math:`\\gamma`).

    Zheng et al. 2024 (arXiv:2402.19159), the sampler Hyper-SD's unified LoRA is used with (Ren et al.
    2024, arXiv:2404.13686; ``eta = 1`` on its model card, lower eta for more detail). With
    :math:`t' = t_{i+1}` (``0`` after the last step) and :math:`s = \\lfloor (1-\\eta) t' \\rfloor`:

    .. math::

        x_s = \\alpha_s \\hat x_0 + \\sigma_s \\hat\\epsilon, \\qquad
        x_{t'} = \\sqrt{\\bar\\alpha_{t'}/\\bar\\alpha_s}\\, x_s + \\sqrt{1 -
        \\bar\\alpha_{t'}/\\bar\\alpha_s}\\, z

    where the re-noising only happens for ``eta > 0`` and not after the last step. ``eta = 0`` is
    deterministic DDIM onto ``t'``; ``eta = 1`` predicts :math:`x_s` at ``s = 0`` and fully re-noises
    (LCM-like). As in diffusers' ``TCDScheduler.step``, the last step lands on ``t = 0`` (the final sample
    is :math:`\\alpha_0 \\hat x_0 + \\sigma_0 \\hat\\epsilon`, not :math:`\\hat x_0`; the latter is
    ``denoised[-1]`` with ``return_trajectory=True``), and ``s`` is computed in float32 like diffusers.

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timesteps: strictly decreasing ints in ``[0, T-1]``, e.g. from :func:`lcm_timesteps`,
            :func:`spaced_timesteps` or :func:`custom_timesteps`. On a flow schedule also a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid`, ``flow_sigma_grid``).
        eta: :math:`\\gamma \\in [0, 1]` (diffusers default 0.3).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        generator: source of the re-noising draws (``torch.randn`` on the generator's device); ``None`` uses
            the global RNG.
        noises: a list of tensors of the shape of ``x_t`` to replay instead of drawing (the ``noises`` of an
            earlier :class:`SamplerOutput` with the same timesteps).
        return_trajectory: also return the states and the per-step clean estimates (default off).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput`; ``noises`` holds ``n - 1`` draws if ``eta > 0``, none otherwise.

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timesteps`` is not
            strictly decreasing in ``[0, T-1]`` (or is a FlowSigmaGrid of another schedule, or of a VP one),
            ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is
            missing for a real ``guidance_scale``, ``noises`` has the wrong count, or ``eta`` is outside
            ``[0, 1]``.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, ``eta`` is not a real number, ``generator`` is not a
            torch.Generator, a noise is not a floating tensor, the model returns no floating tensor or fails
            on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``, or a noise is not the shape of
            ``x_t``.
        NonFiniteError: if ``x_t`` or a replayed noise holds NaN / Inf (a value check, once before the first
            step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import lcm_timesteps, tcd_sample
        >>> sched = NoiseSchedule.from_betas()
        >>> x = torch.randn(1, 4, 8, 8)
        >>> out = tcd_sample(lambda x, t: 0.5 * x, sched, x, lcm_timesteps(4), eta=1.0,
        ...                  generator=torch.Generator().manual_seed(0))
        >>> len(out.noises), tcd_sample(lambda x, t: 0.5 * x, sched, x, [999, 499], eta=0.0).noises
        (3, ())
    """
    eta = check_real(eta, "eta", allow_tensor=True)
    if not 0.0 <= eta <= 1.0:
        raise OptionError(f"Expected `eta` to lie in [0, 1], but got {eta!r}.")
    setup = _prepare(
        model,
        schedule,
        x_t,
        timesteps,
        prediction_type,
        guidance,
        guidance_scale,
        cond,
        uncond,
        generator,
        sampler="tcd_sample",
    )
    ts, pt = setup.timesteps, setup.prediction_type
    schedule = setup.solver.schedule  # a FlowSigmaGrid off the table runs on its own schedule
    n = ts.numel()
    stochastic = eta > 0

    def step(
        i: int, t: int, x: torch.Tensor, out: torch.Tensor, draw: _NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = _to_x0(schedule, out, x, t, pt)
        t_prev = int(ts[i + 1]) if i < n - 1 else 0
        s = _tcd_s(t_prev, eta)
        # s <= t_prev < t, except for a list ending at t = 0, where x_s = x_t exactly.
        x_s = _ddim(schedule, out, x, t, s, pt) if s < t else x
        if not stochastic or i == n - 1:
            return x_s, x0
        work = _work(schedule, x)
        if (
            schedule.kind == "flow"
        ):  # q(x_t' | x_s) of the straight path: keep = a'/a_s, add^2 = s'^2 - keep^2 s_s^2
            a_ratio = schedule.alpha(t_prev) / schedule.alpha(s)
            var = schedule.sigma(t_prev) ** 2 - (a_ratio * schedule.sigma(s)) ** 2
            keep, add = a_ratio.to(work), var.clamp_min(0).sqrt().to(work)
        else:
            ratio = (schedule.alpha(t_prev) / schedule.alpha(s)) ** 2  # abar_prev / abar_s, float64
            keep, add = ratio.sqrt().to(work), (1 - ratio).clamp_min(0).sqrt().to(work)
        z = draw()
        return (keep * x_s.to(work) + add * z.to(work)).to(x.dtype), x0

    return _run(
        setup,
        x_t,
        step,
        generator=generator,
        noises=noises,
        noises_needed=n - 1 if stochastic else 0,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def ddim_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    return_trajectory: bool = False,
    grad: bool = False,
) -> SamplerOutput:
    """Deterministic DDIM over a timestep list (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021).

    .. math:: x_{t_{i+1}} = \\alpha_{t_{i+1}} \\hat x_0 + \\sigma_{t_{i+1}} \\hat\\epsilon,
              \\qquad t_n = -1 \\;(\\bar\\alpha_{-1} = \\text{final\\_alpha\\_cumprod}),

    each step being :meth:`NoiseSchedule.ddim_step`. Hyper-SD's N-step LoRAs use it with
    :func:`spaced_timesteps` ``(n, "trailing")`` (Ren et al. 2024, arXiv:2404.13686). Equals diffusers'
    ``DDIMScheduler`` (``eta=0``, ``clip_sample=False``: a clipping one is warned about) whenever its ``prev_timestep = t - T // n`` is the next listed
    timestep, i.e. ``"trailing"`` / ``"leading"`` spacing with ``n`` dividing ``T``; for other lists this
    sampler always moves to the next listed timestep. The last step lands on ``final_alpha_cumprod``: build
    the schedule from the pipeline's scheduler (``NoiseSchedule.from_scheduler``) to match it -- SDXL's
    DDIM config has ``set_alpha_to_one=False`` while ``NoiseSchedule.from_betas()`` uses 1, which moves a
    4-step trailing result by about 0.015 RMS.

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timesteps: strictly decreasing ints in ``[0, T-1]``, e.g. from :func:`lcm_timesteps`,
            :func:`spaced_timesteps` or :func:`custom_timesteps`. On a flow schedule also a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid`, ``flow_sigma_grid``).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        return_trajectory: also return the states and the per-step clean estimates (default off).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput` (``noises`` empty).

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timesteps`` is not
            strictly decreasing in ``[0, T-1]`` (or is a FlowSigmaGrid of another schedule, or of a VP one),
            ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is
            missing for a real ``guidance_scale``.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, the model returns no floating tensor or fails on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``.
        NonFiniteError: if ``x_t`` holds NaN / Inf (a value check, once before the first step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import ddim_sample, spaced_timesteps
        >>> sched = NoiseSchedule.from_betas()
        >>> x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        >>> oracle = lambda x, t: eps  # the exact noise: DDIM recovers x0
        >>> out = ddim_sample(oracle, sched, sched.add_noise(x0, eps, 999), spaced_timesteps(4))
        >>> torch.allclose(out.sample, x0, atol=1e-4)
        True
    """
    _warn_if_source_clips(schedule, "ddim_sample")
    setup = _prepare(model, schedule, x_t, timesteps, prediction_type, guidance, guidance_scale, cond, uncond)
    ts, pt = setup.timesteps, setup.prediction_type
    schedule = setup.solver.schedule  # a FlowSigmaGrid off the table runs on its own schedule
    n = ts.numel()

    def step(
        i: int, t: int, x: torch.Tensor, out: torch.Tensor, draw: _NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_next = int(ts[i + 1]) if i < n - 1 else -1
        x_next = _ddim(schedule, out, x, t, t_next, pt)
        return x_next, (_to_x0(schedule, out, x, t, pt) if return_trajectory else x_next)

    return _run(
        setup,
        x_t,
        step,
        generator=None,
        noises=None,
        noises_needed=0,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def euler_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    *,
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    return_trajectory: bool = False,
    grad: bool = False,
) -> SamplerOutput:
    """Euler sampling of the probability-flow ODE, as diffusers' ``EulerDiscreteScheduler`` (no churn).

    In the variance-exploding variables :math:`z = x/\\alpha_t`, :math:`\\sigma_i = \\sigma_{t_i}/\\alpha_{t_i}`
    (Karras et al. 2022), the Euler step is

    .. math:: z_{i+1} = z_i + (\\sigma_{i+1} - \\sigma_i)\\,\\frac{z_i - \\hat x_0}{\\sigma_i}
              = \\hat x_0 + \\sigma_{i+1}\\hat\\epsilon,

    which in the model's (VP) variables is the DDIM move to :math:`t_{i+1}`; the last step goes to
    :math:`\\sigma = 0`, i.e. returns :math:`\\hat x_0` (``final_sigmas_type="zero"``, diffusers' default)
    or to the training table's least noise level, ``t = 0`` (``"sigma_min"``). SDXL-Lightning's students are sampled this way with
    :func:`spaced_timesteps` ``(n, "trailing")``, and its 1-step UNet with ``prediction_type="sample"``
    (Lin et al. 2024, arXiv:2402.13929).

    States here are what the model sees (diffusers' ``scale_model_input`` output); diffusers' Euler
    latents are ``x / alpha_t`` (``x * sqrt(sigma**2 + 1)``). A diffusers pipeline starting from
    ``noise * init_noise_sigma`` corresponds to ``x_t = sigma_{t_0} * noise`` here for ``"trailing"``
    (``init_noise_sigma`` :math:`= \\sigma_\\text{max}`) and to ``x_t = noise`` for ``"leading"``
    (:math:`\\sqrt{\\sigma_\\text{max}^2 + 1}`).

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timesteps: strictly decreasing ints in ``[0, T-1]``, e.g. from :func:`lcm_timesteps`,
            :func:`spaced_timesteps` or :func:`custom_timesteps`. On a flow schedule also a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid`, ``flow_sigma_grid``).
        final_sigmas_type: ``"zero"`` (the default) or ``"sigma_min"`` (diffusers config of the same name): the
            last step goes to the *training* table's :math:`\\sigma_{t=0}` (VP: diffusers'
            :math:`\\sqrt{(1 - \\bar\\alpha_0) / \\bar\\alpha_0}`), whatever the grid. On a flow
            :class:`~diffdistill.schedulers.FlowSigmaGrid` that holds for on- and off-table grids alike (our
            choice: one meaning per option; diffusers' ``FlowMatchEulerDiscreteScheduler`` has no such option):
            an off-table grid (e.g. ``flow_pipeline_grid(schedule, 28, "flux")``, ending at sigma 0.105) takes a
            last Euler step from its last sigma to ``schedule.sigma(0)``. A grid that already ends at (or below)
            that level stays where it is (diffusers' ``dt = 0``).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        return_trajectory: also return the states and the per-step clean estimates (default off).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput` (``noises`` empty).

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timesteps`` is not
            strictly decreasing in ``[0, T-1]`` (or is a FlowSigmaGrid of another schedule, or of a VP one),
            ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is
            missing for a real ``guidance_scale``, or ``final_sigmas_type`` is unknown.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, the model returns no floating tensor or fails on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``.
        NonFiniteError: if ``x_t`` holds NaN / Inf (a value check, once before the first step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import euler_sample, spaced_timesteps
        >>> sched = NoiseSchedule.from_betas()
        >>> x0_unet = lambda x, t: torch.tanh(x)  # an x0-predicting 1-step student
        >>> x = torch.randn(1, 4, 8, 8)
        >>> out = euler_sample(x0_unet, sched, x, spaced_timesteps(1), prediction_type="sample")
        >>> torch.equal(out.sample, torch.tanh(x))
        True
    """
    check_option(final_sigmas_type, "final_sigmas_type", ("zero", "sigma_min"))
    setup = _prepare(model, schedule, x_t, timesteps, prediction_type, guidance, guidance_scale, cond, uncond)
    ts, pt = setup.timesteps, setup.prediction_type
    # "sigma_min" is the training table's t = 0 (checked by _prepare: a flow grid is the schedule's own grid)
    sigma_min, train = float(schedule.sigma(0)), schedule
    schedule = setup.solver.schedule  # a FlowSigmaGrid off the table runs on its own schedule
    n = ts.numel()
    last_sigma = float(schedule.sigma(int(ts[-1])))

    def step(
        i: int, t: int, x: torch.Tensor, out: torch.Tensor, draw: _NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = _to_x0(schedule, out, x, t, pt)
        if i < n - 1:
            return _ddim(schedule, out, x, t, int(ts[i + 1]), pt), x0
        if final_sigmas_type == "zero":
            return x0, x0
        # "sigma_min": end on the training table's t = 0; a list that already ends there (or below, an off-table
        # grid) stays put (diffusers' dt = 0). An off-table grid runs on its own schedule: move to the level itself.
        if last_sigma <= sigma_min:
            return x, x0
        if setup.solver.schedule is not train:
            return _flow_move(schedule, out, x, t, sigma_min, pt), x0
        return _ddim(schedule, out, x, t, 0, pt), x0

    return _run(
        setup,
        x_t,
        step,
        generator=None,
        noises=None,
        noises_needed=0,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def x0_renoise_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timesteps: TimestepList,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    return_trajectory: bool = False,
    grad: bool = False,
) -> SamplerOutput:
    """Predict :math:`\\hat x_0`, then re-noise it to the next timestep with fresh noise.

    .. math:: \\hat x_0^{(i)} = \\hat x_0(x, t_i), \\qquad
              x \\leftarrow \\alpha_{t_{i+1}} \\hat x_0^{(i)} + \\sigma_{t_{i+1}} z_i
              \\;(= \\text{schedule.add\\_noise}),

    returning :math:`\\hat x_0^{(n-1)}`. This is DMD2's multi-step generator and its backward
    simulation (Yin et al. 2024, arXiv:2405.14867; :func:`dmd2_timesteps`) and TLCM's inference
    (:func:`tlcm_timesteps`), i.e. multistep consistency sampling without the boundary scalings.
    With ``schedule.terminal_pure_noise`` nothing changes (re-noising never targets ``t = T-1``).

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timesteps: strictly decreasing ints in ``[0, T-1]``, e.g. from :func:`lcm_timesteps`,
            :func:`spaced_timesteps` or :func:`custom_timesteps`. On a flow schedule also a
            :class:`~diffdistill.schedulers.FlowSigmaGrid` (:func:`flow_pipeline_grid`, ``flow_sigma_grid``).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        generator: source of the re-noising draws (``torch.randn`` on the generator's device); ``None`` uses
            the global RNG.
        noises: a list of tensors of the shape of ``x_t`` to replay instead of drawing (the ``noises`` of an
            earlier :class:`SamplerOutput` with the same timesteps).
        return_trajectory: also return the states and the per-step clean estimates (default off).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput`; ``noises`` holds ``n - 1`` draws.

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timesteps`` is not
            strictly decreasing in ``[0, T-1]`` (or is a FlowSigmaGrid of another schedule, or of a VP one),
            ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is
            missing for a real ``guidance_scale``, or ``noises`` has the wrong count.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, ``generator`` is not a torch.Generator, a noise is not a floating
            tensor, the model returns no floating tensor or fails on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``, or a noise is not the shape of
            ``x_t``.
        NonFiniteError: if ``x_t`` or a replayed noise holds NaN / Inf (a value check, once before the first
            step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import dmd2_timesteps, x0_renoise_sample
        >>> sched = NoiseSchedule.from_betas()
        >>> out = x0_renoise_sample(lambda x, t: 0.5 * x, sched, torch.randn(2, 4, 8, 8), dmd2_timesteps(),
        ...                         generator=torch.Generator().manual_seed(0), return_trajectory=True)
        >>> len(out.trajectory), len(out.denoised), len(out.noises)
        (5, 4, 3)
    """
    setup = _prepare(
        model, schedule, x_t, timesteps, prediction_type, guidance, guidance_scale, cond, uncond, generator
    )
    return _x0_renoise(
        setup,
        schedule,
        x_t,
        generator=generator,
        noises=noises,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def _x0_renoise(
    setup: _Setup,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    *,
    generator: torch.Generator | None,
    noises: Sequence[torch.Tensor] | None,
    return_trajectory: bool,
    grad: bool,
) -> SamplerOutput:
    ts, pt = setup.timesteps, setup.prediction_type
    schedule = setup.solver.schedule  # a FlowSigmaGrid off the table runs on its own schedule
    n = ts.numel()

    def step(
        i: int, t: int, x: torch.Tensor, out: torch.Tensor, draw: _NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = _to_x0(schedule, out, x, t, pt)
        if i == n - 1:
            return x0, x0
        return _renoise(schedule, x0, draw(), int(ts[i + 1])), x0

    return _run(
        setup,
        x_t,
        step,
        generator=generator,
        noises=noises,
        noises_needed=n - 1,
        return_trajectory=return_trajectory,
        grad=grad,
    )


def one_step_sample(
    model: Model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    timestep: int = 999,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | torch.Tensor | None = None,
    guidance: Literal["imagen", "lcm"] = "imagen",
    prediction_type: str | None = None,
    grad: bool = False,
) -> SamplerOutput:
    """One model call, returning the clean estimate :math:`\\hat x_0(x_t, t)`.

    With ``prediction_type="sample"`` this is the model output itself: SDXL-Lightning's 1-step x0 UNet
    at ``t = 999`` (Lin et al. 2024, arXiv:2402.13929; same as diffusers' Euler "trailing" with one step).
    With an epsilon model it is :math:`(x_t - \\sigma_t\\hat\\epsilon)/\\alpha_t`, e.g. DMD2's one-step
    SDXL generator at ``t = 399`` (arXiv:2405.14867). Hyper-SD's one-step UNet at ``t = 800`` was
    released for ``LCMScheduler(timesteps=[800])``: use :func:`lcm_sample` with ``[800]`` for that.
    A one-step :func:`x0_renoise_sample`.

    Args:
        model: the denoiser, ``model(x_t, t, **cond)`` with ``t`` a ``(B,)`` tensor (``schedule.model_timestep``:
            the int64 index, or float32 :math:`\\sigma \\cdot` ``timestep_scale`` on a flow schedule), returning
            a floating prediction of the shape of ``x_t`` (a tensor, a diffusers output or a tuple).
        schedule: the model's :class:`~diffdistill.schedulers.NoiseSchedule`.
        x_t: the starting state at ``timesteps[0]`` (pure noise for text-to-image), floating, ``(B, ...)``.
        timestep: the model timestep, a Python int in ``[0, T-1]`` (default 999).
        cond: the model's keyword arguments (e.g. ``encoder_hidden_states``); default: none.
        uncond: the unconditional keyword arguments (same keys as ``cond``); needed with a real
            ``guidance_scale``, when classifier-free guidance runs through
            :class:`~diffdistill.schedulers.TeacherSolver` (both passes batched).
        guidance_scale: CFG scale, a finite number or one per sample ``(B,)``; ``None`` (the default) means no
            guidance in the chosen convention (1 for Imagen, 0 for LCM), as in ``TeacherSolver``.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default, as ``TeacherSolver``) or ``"lcm"``
            (:math:`c + w(c-u)`).
        prediction_type: the model's output type (default: the schedule's).
        grad: record the autograd graph (default off: sampling runs without autograd).

    Returns:
        :class:`SamplerOutput` with ``timesteps = [timestep]`` (``noises`` empty).

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a NoiseSchedule, ``timestep`` is not an
            int in ``[0, T-1]``, ``guidance`` / ``prediction_type`` is unknown, ``uncond`` is missing for a
            real ``guidance_scale``.
        DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a dict,
            ``guidance_scale`` is not real, the model returns no floating tensor or fails on ``x_t``'s dtype.
        ShapeError: if ``x_t`` has no batch dimension or is empty, ``guidance_scale`` is neither a number nor
            one per sample, or the model's output is not the shape of ``x_t``.
        NonFiniteError: if ``x_t`` holds NaN / Inf (a value check, once before the first step).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> from diffdistill.schedulers.few_step_samplers import one_step_sample
        >>> sched = NoiseSchedule.from_betas()
        >>> x = torch.randn(1, 4, 8, 8)
        >>> torch.equal(one_step_sample(lambda x, t: x.tanh(), sched, x, prediction_type="sample").sample, x.tanh())
        True
    """
    if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
        raise OptionError(
            f"Expected `timestep` to be an int in [0, T-1], but got {timestep!r}. Pass a Python int, e.g. "
            "int(t)."
        )
    setup = _prepare(
        model,
        schedule,
        x_t,
        [int(timestep)],
        prediction_type,
        guidance,
        guidance_scale,
        cond,
        uncond,
        timesteps_name="timestep",
    )
    return _x0_renoise(setup, schedule, x_t, generator=None, noises=None, return_trajectory=False, grad=grad)
