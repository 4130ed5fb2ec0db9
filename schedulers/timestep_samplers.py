"""Training-timestep samplers of the distillation methods.

All samplers use diffusers timestep indices ``t`` in ``0 .. T-1`` plus ``-1`` for the clean end of the
trajectory (see :class:`~diffdistill.schedulers.NoiseSchedule`). Internally they reason on the
continuous clock ``u = t + 1`` (``u = 0`` is clean data, ``u = T`` pure noise), on which the
published grids are exact multiples: a DDIM grid of N steps is ``u = T/N, 2T/N, ..., T`` (diffusers'
``19, 39, ..., 999`` for N = 50), and segment edges are ``u = j T / k``.

Every sampler takes ``generator`` (draws happen on the generator's device, then move to ``device``)
and returns what it sampled, so a caller can log it or replay it. Every sampler returns a
:class:`TimestepSample` with one shared vocabulary:

* ``t``: where the student (and the teacher's first step) is evaluated;
* ``t_prev``: where the teacher's ODE solve from ``t`` ends;
* ``t_end``: where both the student side and the target side are DDIM-moved before comparison
  (the segment boundary of TSCD / MLCM, ``t_prev`` for progressive distillation, and ``-1`` for
  LCM, whose consistency function maps to the clean end).

The single-timestep samplers (:func:`uniform_timesteps`, :func:`categorical_timesteps`,
:func:`flow_density_timesteps`: score distillation, discriminator re-noising, flow-matching training) draw only
``t``; their ``t_prev`` and ``t_end`` are ``-1``, the clean end that those methods' x0 predictions refer to.

Rectified-flow schedules (SD3, FLUX) use the same indices (``t = T-1`` is :math:`\\sigma = 1`, ``t = -1`` is
:math:`\\sigma = 0`; see :mod:`~diffdistill.schedulers.flow_schedule`), so every sampler here works on them
unchanged: a grid point ``u = jT/N`` is the same index whatever the table holds, the shift only moves the
:math:`\\sigma` it stands for. :func:`flow_density_timesteps` adds the densities flow-matching training draws
from (Esser et al. 2024, Sec. 3.1), mapped to indices as diffusers' training scripts do.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

from .._checks import (
    DTypeError,
    OptionError,
    check_generator,
    check_int,
    check_option,
    check_real,
)

__all__ = [
    "DENSITY_SCHEMES",
    "LIGHTNING_DISCRIMINATOR_TIMESTEPS",
    "LIGHTNING_EXTRA_STUDENT_TIMESTEPS",
    "TimestepSample",
    "categorical_timesteps",
    "flow_density_timesteps",
    "lcm_skip_pairs",
    "milestone_pairs",
    "progressive_pairs",
    "tscd_segments",
    "uniform_timesteps",
]

#: SDXL-Lightning Sec. 3.7: D re-noise timesteps {10, 250, 500, 750}; weights 1:1:1:1 first, then 5:1:1:1.
#: Kept as the paper's numbers (used directly as diffusers indices): unlike the student grid below, whose
#: 1000 must become 999, these need no shift to be valid, and a shift by one changes nothing measurable.
LIGHTNING_DISCRIMINATOR_TIMESTEPS: tuple[int, ...] = (10, 250, 500, 750)
#: SDXL-Lightning Sec. 3.7: 1- and 2-step students train at u in {250, 500, 750, 1000} (diffusers t = u - 1).
LIGHTNING_EXTRA_STUDENT_TIMESTEPS: tuple[int, ...] = (249, 499, 749, 999)
#: The densities of :func:`flow_density_timesteps` (diffusers' ``weighting_scheme`` names; "uniform" is its
#: fallback for "none" / "sigma_sqrt" / "cosmap", which only reweight the loss).
DENSITY_SCHEMES: tuple[str, ...] = ("logit_normal", "mode", "uniform")


class TimestepSample(NamedTuple):
    """Sampled training timesteps, each an int64 tensor of shape ``(B,)`` (see the module docstring).

    Attributes:
        t: where the student (and the teacher's first step) is evaluated.
        t_prev: where the teacher's ODE solve from ``t`` ends (``-1`` for single-timestep samplers).
        t_end: where both sides are DDIM-moved before comparison (``-1``: the clean end).
    """

    t: torch.Tensor
    t_prev: torch.Tensor
    t_end: torch.Tensor


def _gen_device(generator: torch.Generator | None) -> torch.device:
    check_generator(generator)
    return torch.device("cpu") if generator is None else generator.device


def _is_integral(value: Any) -> bool:
    """An int (not a bool), a numpy integer or an integral finite float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def _int_list(values: Any, name: str) -> torch.Tensor:
    """A sequence or tensor of numbers as a CPU tensor (any numeric dtype); bools and non-numbers raise."""
    if isinstance(values, torch.Tensor):
        vals = values.detach().cpu()
    else:
        if (
            type(values).__module__ == "numpy" and getattr(values, "ndim", 0) >= 1
        ):  # arrays, as custom_timesteps
            values = values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise DTypeError(
                f"Expected `{name}` to be a sequence of numbers or a 1-D tensor, but got {type(values).__name__}."
            )
        try:
            vals = torch.as_tensor(list(values))
            if vals.is_floating_point():  # keep Python floats exact in messages and checks
                vals = torch.as_tensor(list(values), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DTypeError(
                f"Expected `{name}` to be a sequence of numbers or a 1-D tensor, but got {values!r}."
            ) from err
    if vals.dtype == torch.bool or vals.is_complex():
        raise DTypeError(f"Expected `{name}` to hold real numbers, but got dtype {vals.dtype}.")
    return vals


def _single(t: torch.Tensor, device: torch.device | str | None) -> TimestepSample:
    """A single-timestep draw as a :class:`TimestepSample` whose ``t_prev`` and ``t_end`` are the clean end."""
    clean = torch.full_like(t, -1)
    return _to_device(TimestepSample(t, clean, clean.clone()), device)


def _to_device(sample: TimestepSample, device: torch.device | str | None) -> TimestepSample:
    return sample if device is None else TimestepSample(*(x.to(device) for x in sample))


def _randint_between(
    low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-element uniform integer in ``[low, high]`` (inclusive), drawn on the generator's device."""
    span = (high - low + 1).to(torch.float64)
    u = torch.rand(low.shape, generator=generator, device=low.device, dtype=torch.float64)
    offset = torch.minimum((u * span).floor().long(), (high - low).long())
    return low + offset


def uniform_timesteps(
    batch_size: int,
    low: int = 0,
    high: int = 999,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """``t ~ U{low, ..., high}`` (inclusive), shape ``(B,)`` int64, as a :class:`TimestepSample`.

    Presets from the papers (T = 1000): DMD / DMD2 distribution matching ``U[0.02T, 0.98T]`` →
    ``low=20, high=980``; SiD-LSG for Stable Diffusion
    ``torch.randint(20, 980)`` → ``low=20, high=979``; DMD2's
    diffusion-GAN discriminator ``U[0, 1000)`` → ``low=0, high=999``.

    Args:
        batch_size: ``B``, an int >= 1.
        low: smallest timestep, an int >= -1 (default 0).
        high: largest timestep, an int >= ``low`` (default 999, i.e. ``T - 1`` for ``T = 1000``).
        generator: source of the draw (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` with ``t`` drawn and ``t_prev = t_end = -1``, each int64 ``(B,)``.

    Raises:
        OptionError: if ``batch_size`` is < 1, or ``low`` / ``high`` are not ints with
            ``-1 <= low <= high``.
        DTypeError: if ``batch_size`` is not an int, or ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> t = uniform_timesteps(4, 20, 980, generator=g).t
        >>> bool(((t >= 20) & (t <= 980)).all()), t.dtype
        (True, torch.int64)
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    if not (_is_integral(low) and _is_integral(high)) or low > high or low < -1:
        raise OptionError(f"Expected integers -1 <= `low` <= `high`, but got low={low!r}, high={high!r}.")
    t = torch.randint(
        int(low), int(high) + 1, (batch_size,), generator=generator, device=_gen_device(generator)
    )
    return _single(t, device)


def categorical_timesteps(
    batch_size: int,
    values: Sequence[int] = LIGHTNING_DISCRIMINATOR_TIMESTEPS,
    weights: Sequence[float] | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """``t`` drawn from ``values`` with probabilities proportional to ``weights`` (uniform if None).

    SDXL-Lightning (Lin et al. 2024, Sec. 3.7) re-noises the discriminator inputs of its 1- and 2-step
    students to ``t* ∈ {10, 250, 500, 750}`` with weights 1:1:1:1, then 5:1:1:1 once training is stable.

    Args:
        batch_size: ``B``, an int >= 1.
        values: the timesteps to draw from, a non-empty sequence (or 1-D tensor) of ints >= -1 (default
            :data:`LIGHTNING_DISCRIMINATOR_TIMESTEPS`). The schedule's upper bound ``T - 1`` is checked where
            the timesteps are used.
        weights: relative probabilities, one finite value >= 0 per value with a positive sum; ``None`` (the
            default) is uniform.
        generator: source of the draw (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` with ``t`` drawn and ``t_prev = t_end = -1``, each int64 ``(B,)``.

    Raises:
        OptionError: if ``batch_size`` is < 1, ``values`` is empty, not 1-D, fractional or below
            -1, or ``weights`` has another length, a negative or non-finite entry or a zero sum.
        DTypeError: if ``batch_size`` is not an int, ``values`` / ``weights`` is not a sequence of numbers (or ``values`` holds bools), or
            ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> t = categorical_timesteps(1000, weights=(5, 1, 1, 1), generator=g).t
        >>> round((t == 10).float().mean().item(), 1)
        0.6
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    given = _int_list(values, "values")
    if given.ndim != 1 or given.numel() == 0:
        raise OptionError(
            f"Expected `values` to be a non-empty sequence of ints, but got {given.tolist()!r}."
        )
    if given.is_floating_point() and not bool((given == given.round()).all()):
        raise OptionError(
            f"Expected `values` to hold integral timesteps, but got {given.tolist()}: fractional values would be "
            "truncated. Round them first."
        )
    vals = given.to(torch.long)
    if bool((vals < -1).any()):
        raise OptionError(
            f"Expected every value of `values` to be >= -1 (diffusers indices; -1 is the clean end), but got "
            f"{vals.tolist()}."
        )
    if weights is None:
        probs = torch.ones(vals.numel(), dtype=torch.float64)
    else:
        raw = _int_list(weights, "weights")
        probs = raw.to(torch.float64)
        if probs.shape != vals.shape:
            raise OptionError(
                f"Expected `weights` to have one entry per value ({vals.numel()}), but got {probs.numel()}."
            )
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or float(probs.sum()) <= 0:
            raise OptionError(
                f"Expected `weights` to be >= 0 with a positive sum (and finite), but got {probs.tolist()}."
            )
    dev = _gen_device(generator)
    idx = torch.multinomial(probs.to(dev), batch_size, replacement=True, generator=generator)
    return _single(vals.to(dev)[idx], device)


def lcm_skip_pairs(
    batch_size: int,
    num_ddim_timesteps: int = 50,
    num_train_timesteps: int = 1000,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """LCM skip-step pairs on an N-step DDIM grid (Luo et al. 2023, "Latent Consistency Models").

    With skip :math:`k = T // N`: ``t`` is uniform on the grid ``k-1, 2k-1, ..., Nk-1``, the teacher
    steps to ``t_prev = max(t - k, 0)`` (diffusers' LCM distillation scripts), and ``t_end = -1``.

    Args:
        batch_size: ``B``, an int >= 1.
        num_ddim_timesteps: ``N``, the DDIM grid size, an int in ``[1, T // 2]`` (default 50).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        generator: source of the draws (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` of int64 ``(B,)`` tensors.

    Raises:
        OptionError: if a count is below its minimum or ``N > T // 2`` (the skip must be >= 2).
        DTypeError: if a count is not an int, or ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = lcm_skip_pairs(8, generator=g)
        >>> bool(((s.t + 1) % 20 == 0).all()), bool((s.t_prev == (s.t - 20).clamp(min=0)).all())
        (True, True)
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    n = check_int(num_ddim_timesteps, "num_ddim_timesteps", minimum=1, integral_float=True)
    total = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
    if n > total // 2:
        raise OptionError(
            f"Expected `num_ddim_timesteps` <= num_train_timesteps // 2 ({total // 2}): the skip "
            f"num_train_timesteps // num_ddim_timesteps must be >= 2 for t_prev < t at the grid's first point, "
            f"but got {n}."
        )
    skip = total // n
    dev = _gen_device(generator)
    index = torch.randint(0, n, (batch_size,), generator=generator, device=dev)
    t = (index + 1) * skip - 1
    t_prev = (t - skip).clamp(min=0)
    t_end = torch.full_like(t, -1)
    sample = TimestepSample(t, t_prev, t_end)
    return _to_device(sample, device)


def tscd_segments(
    batch_size: int,
    num_segments: int,
    num_inference_steps: int = 50,
    num_train_timesteps: int = 1000,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """Trajectory-segmented consistency timesteps (Hyper-SD, Ren et al. 2024, Eq. 11-12 and Alg. 1).

    On the continuous clock ``u = t + 1`` with grid step :math:`s = T/N`:

    * :math:`u_n \\sim U\\{s, 2s, \\dots, T\\}` and the teacher step ends at :math:`u_{n-1} = u_n - s`;
    * the segment boundary is :math:`u_b = \\lfloor u_{n-1} / (T/k) \\rfloor \\cdot T/k` (integer edges
      :math:`\\lfloor jT/k \\rfloor`);
    * :math:`u_{end} \\sim U\\{u_b, \\dots, u_{n-1}\\}`.

    Returned in diffusers indices (``t = u - 1``), so ``t_end = -1`` is the clean end. The boundary is
    taken from the segment that holds :math:`u_{n-1}`, the end of the teacher step; it equals the paper's
    :math:`\\lfloor t_n / (T/k) \\rfloor T/k` whenever the paper's interval :math:`[t_b, t_{n-1}]` is
    non-empty. That interval is empty when the teacher step starts on or crosses a segment edge (with
    ``N`` divisible by ``k``: exactly when :math:`t_n` is an edge), a case Alg. 1 leaves undefined. ``num_segments = 1`` is plain CTM-style
    consistency towards the clean end.

    Args:
        batch_size: ``B``, an int >= 1.
        num_segments: ``k``, the number of trajectory segments, an int in ``[1, N]`` (Hyper-SD: 8, 4, 2, 1).
        num_inference_steps: ``N``, the DDIM grid size, an int >= 1 dividing ``T`` (default 50).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        generator: source of the draws (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` of int64 ``(B,)`` tensors with ``t_end <= t_prev < t``.

    Raises:
        OptionError: if a count is below its minimum, ``N`` does not divide ``T`` or ``k > N``.
        DTypeError: if a count is not an int, or ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = tscd_segments(16, num_segments=4, generator=g)
        >>> t_b = ((s.t_prev + 1) // 250) * 250 - 1
        >>> bool(((t_b <= s.t_end) & (s.t_end <= s.t_prev) & (s.t_prev == s.t - 20)).all())
        True
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    k = check_int(num_segments, "num_segments", minimum=1, integral_float=True)
    n = check_int(num_inference_steps, "num_inference_steps", minimum=1, integral_float=True)
    total = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
    if total % n != 0:
        raise OptionError(
            f"Expected `num_inference_steps` to divide `num_train_timesteps` ({total}) so the grid step is an "
            f"integer, but got {n}. Use e.g. 50, 40, 25, 20 or 10 for T = 1000."
        )
    if k > n:
        raise OptionError(f"Expected `num_segments` <= `num_inference_steps` ({n}), but got {k}.")
    step = total // n
    dev = _gen_device(generator)
    u_n = (torch.randint(0, n, (batch_size,), generator=generator, device=dev) + 1) * step
    u_prev = u_n - step
    seg = torch.div(u_prev * k, total, rounding_mode="floor")
    u_b = torch.div(seg * total, k, rounding_mode="floor")
    u_end = _randint_between(u_b, u_prev, generator)
    sample = TimestepSample(u_n - 1, u_prev - 1, u_end - 1)
    return _to_device(sample, device)


def milestone_pairs(
    batch_size: int,
    num_segments: int = 8,
    skip: int = 20,
    num_train_timesteps: int = 1000,
    *,
    on_grid: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """Multistep-consistency milestone pairs (MLCM/TLCM, Xie et al. 2024; PCM phases; Heek et al. 2024).

    Milestones :math:`m_s = \\lfloor sT/M \\rfloor` on the clock ``u = t + 1``. A segment ``s`` is drawn
    uniformly, then :math:`u_m \\sim U\\{m_s + 1, \\dots, m_{s+1}\\}` (with ``on_grid``: only
    :math:`u_m = m_{s+1} - j\\,\\text{skip}`, the DDIM grid of step ``skip`` that starts at the segment's
    upper milestone, where a multistep sampler evaluates the student), the teacher steps to
    :math:`u_n = \\max(u_m - \\text{skip}, m_s)` and both sides move to the lower milestone
    :math:`t_{end} = m_s - 1`.

    Every timestep the target side is evaluated at is trained: :math:`u_n` is either the milestone itself
    (the target move is then the identity, an anchor with no network error) or a value :math:`u_m` takes. (The
    earlier draw :math:`u_m \\ge m_s + \\text{skip}` left the ``skip - 1`` timesteps above each milestone as
    targets that were never trained: issue 20 measured MLCM's 1/2/4-step SW 0.144/0.146/0.151 with it, against
    0.098/0.085/0.070 on the grid.) MLCM stage 1 (MLCD): ``num_segments=8, skip=20`` (any ``skip`` up to the
    segment width works, on the grid or off it). MLCM stage 2 (inter-segment LCD): consistency only at the
    milestones, ``skip = T/M, on_grid=True``, so ``t`` is a milestone and ``t_prev = t_end`` the one below.

    Args:
        batch_size: ``B``, an int >= 1.
        num_segments: ``M``, the number of milestones segments, an int >= 1 (default 8).
        skip: the teacher step, an int in ``[1, T // M]`` (default 20).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        on_grid: draw ``u_m`` on the grid ``m_{s+1} - j * skip`` only (default True).
        generator: source of the draws (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` of int64 ``(B,)`` tensors.

    Raises:
        OptionError: if a count is below its minimum or ``skip`` exceeds a segment width.
        DTypeError: if a count is not an int, or ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = milestone_pairs(8, num_segments=8, skip=125, on_grid=True, generator=g)
        >>> bool(((s.t + 1) % 125 == 0).all() and (s.t_prev == s.t_end).all())
        True
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    m = check_int(num_segments, "num_segments", minimum=1, integral_float=True)
    sk = check_int(skip, "skip", minimum=1, integral_float=True)
    total = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
    edges = torch.div(torch.arange(m + 1) * total, m, rounding_mode="floor")
    widths = edges[1:] - edges[:-1]
    if bool((widths < sk).any()):
        raise OptionError(
            f"Expected `skip` ({sk}) to be at most the segment width ({int(widths.min())} = T/num_segments), "
            "so that the teacher step stays inside its segment."
        )
    dev = _gen_device(generator)
    edges = edges.to(dev)
    seg = torch.randint(0, m, (batch_size,), generator=generator, device=dev)
    lo, hi = edges[seg], edges[seg + 1]
    if on_grid:  # u_m = hi - j * skip for j = 0 .. floor((hi - lo - 1) / skip)
        u_m = hi - _randint_between(torch.zeros_like(hi), (hi - lo - 1) // sk, generator) * sk
    else:
        u_m = _randint_between(lo + 1, hi, generator)
    u_n = torch.maximum(u_m - sk, lo)
    sample = TimestepSample(u_m - 1, u_n - 1, lo - 1)
    return _to_device(sample, device)


def progressive_pairs(
    batch_size: int,
    num_student_steps: int,
    num_train_timesteps: int = 1000,
    *,
    extra_timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """Progressive-distillation stride pairs ``(t, t - T/N)`` on an N-step student's "trailing" grid.

    The student of a stage has N inference steps on ``u = round(T - kT/N)``, ``k = 0..N-1``
    (diffusers' ``timestep_spacing="trailing"``: 999, 749, 499, 249 for N = 4; N need not divide T, e.g.
    the 32- and 128-step stages of SDXL-Lightning). It learns to jump from a grid point to the next one
    below (``u = 0``, the clean end, after the last), ``T/N`` further, in one step, while the teacher, an
    ``N n``-step model, covers the same interval with n steps of its own stride ``s = T/(N n)``
    (SDXL-Lightning, Lin et al. 2024, Sec. 2.3, 3.7: use
    :meth:`~diffdistill.schedulers.TeacherSolver.solve` with ``num_steps=n, stride=s``, which lands the
    teacher on its own grid). ``t_end = t_prev``.

    ``extra_timesteps`` replaces the grid by explicit diffusers indices; SDXL-Lightning trains its 1- and
    2-step students at :data:`LIGHTNING_EXTRA_STUDENT_TIMESTEPS` (u ∈ {250, 500, 750, 1000}) instead
    of {1000} / {500, 1000}. The jump from there is ``u - T/N`` clamped at the clean end, so with the
    stride the teacher's steps below the clean end have zero length and are skipped (a 2-step teacher,
    ``s = 500``, runs 749 → 249 → clean and 249 → clean for the 1-step student).

    Args:
        batch_size: ``B``, an int >= 1.
        num_student_steps: ``N``, the student's inference steps, an int in ``[1, T]``.
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        extra_timesteps: explicit student timesteps (a non-empty sequence of ints in ``[0, T-1]``) that
            replace the grid; ``None`` (the default) uses the "trailing" grid.
        generator: source of the draws (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` of int64 ``(B,)`` tensors with ``t_end == t_prev``.

    Raises:
        OptionError: if a count is below its minimum, ``N > T``, or ``extra_timesteps`` is empty,
            fractional or outside ``[0, T-1]``.
        DTypeError: if a count is not an int, ``extra_timesteps`` is not a sequence of numbers, or ``generator`` is not a
            ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = progressive_pairs(6, 1, extra_timesteps=LIGHTNING_EXTRA_STUDENT_TIMESTEPS, generator=g)
        >>> set(s.t.tolist()) <= {249, 499, 749, 999}, bool((s.t_prev == -1).all())
        (True, True)
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    n = check_int(num_student_steps, "num_student_steps", minimum=1, integral_float=True)
    total = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
    if n > total:
        raise OptionError(f"Expected `num_student_steps` <= `num_train_timesteps` ({total}), but got {n}.")
    dev = _gen_device(generator)
    if extra_timesteps is None:
        # diffusers' "trailing" grid: round(T - k T/N) for k = 0..N-1, with the clean end u = 0 below it.
        ratio = total / n
        grid_u = torch.round(total - torch.arange(n, dtype=torch.float64) * ratio).long().flip(0)
        grid_u = torch.cat([torch.zeros(1, dtype=torch.long), grid_u]).to(dev)
        index = torch.randint(1, n + 1, (batch_size,), generator=generator, device=dev)
        t, t_prev = grid_u[index] - 1, grid_u[index - 1] - 1
    else:
        given = _int_list(extra_timesteps, "extra_timesteps")
        grid = given.to(device=dev, dtype=torch.long)
        if (
            given.ndim != 1
            or given.numel() == 0
            or (given.is_floating_point() and not torch.equal(given, given.round()))
            or bool(((grid < 0) | (grid > total - 1)).any())
        ):
            raise OptionError(
                f"Expected `extra_timesteps` to be a non-empty list of ints in [0, {total - 1}], but got "
                f"{given.tolist()}."
            )
        t = grid[torch.randint(0, grid.numel(), (batch_size,), generator=generator, device=dev)]
        u_prev = torch.floor((t + 1).double() - total / n + 0.5).clamp(min=0).long()
        t_prev = u_prev - 1
    sample = TimestepSample(t, t_prev, t_prev.clone())
    return _to_device(sample, device)


def flow_density_timesteps(
    batch_size: int,
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepSample:
    """Flow-matching training timesteps from SD3's densities, indexed as diffusers' training scripts do.

    A draw :math:`u \\in [0, 1)` (diffusers' ``compute_density_for_timestep_sampling``, same calls, so the same
    generator state gives the same ``u``):

    * ``"logit_normal"``: :math:`u = \\mathrm{sigmoid}(n)`, :math:`n \\sim \\mathcal N(\\text{logit\\_mean},
      \\text{logit\\_std}^2)` (Esser et al. 2024, Sec. 3.1, Eq. 19; rf/lognorm(0, 1) ranked first, Table 1);
    * ``"mode"``: :math:`u = 1 - v - s(\\cos^2(\\pi v/2) - 1 + v)`, :math:`v \\sim U[0, 1)`, ``s = mode_scale``
      (Sec. 3.1, Eq. 20; a density for :math:`-1 \\le s \\le 2/(\\pi - 2)`);
    * ``"uniform"``: :math:`u \\sim U[0, 1)`: on a shifted table, the *shifted uniform* density of SD3's
      training (:math:`\\sigma \\approx` shift(:math:`1-u`)).

    is mapped to diffusers' table index :math:`\\lfloor uT \\rfloor` of its *descending* (shifted) sigma table
    (``noise_scheduler.timesteps[indices]`` in ``train_dreambooth_lora_sd3.py`` / ``_flux.py``), i.e. our
    ascending index :math:`t = T - 1 - \\lfloor uT \\rfloor`: :math:`\\sigma_t \\approx \\text{shift}(1 - u)`, the
    shift composing on top of the density (reference/flow.md §2). Hence diffusers' ``logit_mean > 0`` favours
    *low* noise, the paper's sign reversed: the paper's :math:`\\pi_\\text{ln}(t; m, s)` on the noise level is
    ``logit_mean = -m`` here (sigmoid(-n) = 1 - sigmoid(n)). A float32 :math:`u` that rounds to 1 would give
    diffusers' out-of-range index ``T``; it is clamped to ``t = 0``.

    Args:
        batch_size: ``B``, an int >= 1.
        weighting_scheme: one of :data:`DENSITY_SCHEMES` (default ``"logit_normal"``, the SD3 script's).
        logit_mean: mean of the logit-normal's normal (diffusers' sign), a finite number (default 0).
        logit_std: its standard deviation, a finite number > 0 (default 1).
        mode_scale: ``s`` of the mode density, in ``[-1, 2/(pi-2)]`` (default 1.29, the paper's best mode).
        num_train_timesteps: ``T``, an int >= 2 (default 1000).
        generator: source of the draw (drawn on its device, then moved to ``device``); ``None`` uses the
            global RNG.
        device: where the result lives (default: the generator's device, the CPU without one).

    Returns:
        :class:`TimestepSample` with ``t`` drawn in ``[0, T-1]`` and ``t_prev = t_end = -1``, each int64 ``(B,)``.

    Raises:
        OptionError: if ``batch_size`` < 1, ``weighting_scheme`` is unknown, ``logit_std`` <= 0, ``mode_scale``
            leaves ``[-1, 2/(pi-2)]`` or a number is not finite.
        DTypeError: if a count is not an int, a parameter is not a real number, or ``generator`` is not a
            ``torch.Generator``.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> sd3 = NoiseSchedule.flow_matching(shift=3.0)
        >>> t = flow_density_timesteps(4096, generator=torch.Generator().manual_seed(0)).t
        >>> round(float(sd3.sigma(t).median()), 2)  # logit-normal(0, 1) has median u = 1/2: shift(1/2) = 0.75
        0.75
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1, integral_float=True)
    check_option(weighting_scheme, "weighting_scheme", DENSITY_SCHEMES)
    total = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
    mean = check_real(logit_mean, "logit_mean")
    std = check_real(logit_std, "logit_std", low=0, strict=True)
    scale = check_real(mode_scale, "mode_scale")
    if not -1.0 <= scale <= 2 / (math.pi - 2):
        raise OptionError(
            f"Expected `mode_scale` in [-1, 2/(pi-2) = {2 / (math.pi - 2):.4f}], where the mode map is monotone (a "
            f"density; SD3 Sec. 3.1), but got {mode_scale!r}."
        )
    dev = _gen_device(generator)
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=mean, std=std, size=(batch_size,), device=dev, generator=generator)
        u = torch.nn.functional.sigmoid(u)
    elif weighting_scheme == "mode":
        u = torch.rand(size=(batch_size,), device=dev, generator=generator)
        u = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch_size,), device=dev, generator=generator)
    index = (u * total).long().clamp(0, total - 1)  # diffusers: indices = (u * T).long()
    return _single(total - 1 - index, device)
