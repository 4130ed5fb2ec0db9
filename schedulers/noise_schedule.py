"""Discrete noise schedules (variance-preserving and rectified flow) and the DDIM move shared by every method.

One vocabulary for both families: integer indices ``t`` in ``0 .. T-1`` into a table of
:math:`(\\alpha_t, \\sigma_t)` with :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon`, ``t = -1`` the clean end.

Variance preserving (``kind == "vp"``: DDPM, SD, SDXL; diffusers timestep indices):

.. math::

    \\bar\\alpha_t = \\prod_{s \\le t} (1 - \\beta_s), \\qquad
    \\alpha_t = \\sqrt{\\bar\\alpha_t}, \\qquad \\sigma_t = \\sqrt{1 - \\bar\\alpha_t}, \\qquad
    x_t = \\alpha_t x_0 + \\sigma_t \\epsilon .

The index ``t = -1`` denotes the clean end of the trajectory, with :math:`\\bar\\alpha_{-1}` equal to
``final_alpha_cumprod`` (1.0 by default, as diffusers' ``set_alpha_to_one=True``), so a DDIM move to
``t_to = -1`` lands on the model's clean-sample estimate.

Rectified flow (``kind == "flow"``: SD3, FLUX, Qwen-Image, Wan; Esser et al. 2024, Sec. 2-3):
:math:`\\alpha_t = 1 - \\sigma_t` with a shifted :math:`\\sigma_t` table reaching 1 at ``t = T-1`` and
:math:`\\sigma_{-1} = 0` (see :mod:`diffdistill.schedulers.flow_schedule` for the table, diffusers' index
mapping and sampling grids). The DDIM move is then the exact Euler step of the flow ODE
:math:`dx/d\\sigma = \\epsilon - x_0`, since the path is linear in :math:`\\sigma`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_finite,
    check_float_input,
    check_int,
    check_option,
    check_real,
    check_tensor,
    value_checks_enabled,
)
from .flow_schedule import _MULTISTEP_CLASSES, FlowMatchingConfig, _as_sigmas

__all__ = [
    "FLOW_PREDICTION_TYPES",
    "PREDICTION_TYPES",
    "SCHEDULE_KINDS",
    "NoiseSchedule",
    "PredictionType",
    "TimestepLike",
]

PredictionType = Literal["epsilon", "sample", "v_prediction", "score", "flow"]
# The prediction types of every schedule; a flow schedule also takes "flow" (FLOW_PREDICTION_TYPES). A VP
# model never outputs eps - x0, so "flow" is refused on VP schedules (ask for "v_prediction" there).
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction", "score")
FLOW_PREDICTION_TYPES: tuple[str, ...] = (*PREDICTION_TYPES, "flow")
SCHEDULE_KINDS: tuple[str, ...] = ("vp", "flow")
BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear", "squaredcos_cap_v2")

TimestepLike = int | float | Sequence[int] | torch.Tensor


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021): beta_i = 1 - abar((i+1)/T) / abar(i/T), clipped."""
    i = torch.arange(num_steps, dtype=torch.float64)

    def abar(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + 0.008) / 1.008 * torch.pi / 2) ** 2

    return torch.clamp(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max=max_beta)


def _multistep_class(scheduler: Any, config: Any) -> str:
    """The diffusers multistep class a ``use_flow_sigmas`` scheduler is (or derives from), else its config's
    ``_class_name`` (a duck-typed stand-in), else its own class name."""
    names = [klass.__name__ for klass in type(scheduler).__mro__]
    found = next((name for name in names if name in _MULTISTEP_CLASSES), None)
    if found is None and isinstance(config, dict):
        found = config.get("_class_name")
    return str(found or type(scheduler).__name__)


class NoiseSchedule:
    """A discrete noise schedule, VP (DDPM / SD / SDXL) or rectified flow (SD3 / FLUX), with conversions and the
    DDIM move.

    Coefficients are looked up in float64 tables; the elementwise arithmetic runs in ``compute_dtype``
    (float64 by default, so two implementations of the same step agree to ~1e-12) and every result is
    returned in the dtype of its main tensor input, so bf16 latents stay bf16.

    Build a VP schedule from ``alphas_cumprod`` (or :meth:`from_betas`), a rectified-flow one from
    ``flow_sigmas`` (or :meth:`flow_matching`, :meth:`from_flow_sigmas`); :meth:`from_scheduler` reads either
    kind from a diffusers scheduler. For a flow schedule :math:`\\alpha_t = 1 - \\sigma_t`, and
    ``alphas_cumprod`` is the :math:`\\bar\\alpha` of the VP schedule with the same signal-to-noise ratio,
    :math:`\\alpha_t^2 / (\\alpha_t^2 + \\sigma_t^2)` (a flow state rescaled by
    :math:`1/\\sqrt{\\alpha_t^2+\\sigma_t^2}` is that VP state), which is 0 at :math:`\\sigma = 1`: read it for
    SNR-based weightings only; the coefficients are :meth:`alpha` / :meth:`sigma`.

    Prediction types (``model_output`` of a network at ``(x_t, t)``): ``"epsilon"`` (:math:`\\epsilon`),
    ``"sample"`` (:math:`x_0`), ``"v_prediction"`` (:math:`(\\alpha_t\\epsilon - \\sigma_t x_0) /
    \\sqrt{\\alpha_t^2 + \\sigma_t^2}`: Salimans & Ho's v for VP, where the root is 1; for flow our choice,
    the v of the equivalent VP state, which is TrigFlow's F-target with :math:`\\sigma_d = 1`, Lu & Song 2024,
    arXiv:2410.11081, as SANA-Sprint maps flow to F), ``"score"`` (:math:`\\nabla_x \\log p_t =
    -\\epsilon/\\sigma_t`) and ``"flow"`` (:math:`\\epsilon - x_0`, the velocity of diffusers' SD3 / FLUX
    models; Esser et al. 2024, Sec. 2; flow schedules only, since a VP model never outputs it). Every
    conversion works both ways. At a flow table's :math:`\\sigma = 1` (``t = T-1``), :math:`\\alpha = 0`: an
    ``"epsilon"`` or ``"score"`` output carries no :math:`x_0` there (its conversions divide by zero);
    ``"flow"`` and ``"sample"`` do.

    Every method that takes tensors checks them at the boundary: a non-tensor or an integer / bool tensor
    raises :class:`~diffdistill.errors.DTypeError`, an empty batch or a shape that would broadcast silently
    raises :class:`~diffdistill.errors.ShapeError`, and (as a value check, see
    :func:`diffdistill.errors.value_checks`) NaN / Inf entries raise
    :class:`~diffdistill.errors.NonFiniteError` naming the argument.

    Args:
        alphas_cumprod: VP: :math:`\\bar\\alpha_t` for ``t = 0 .. T-1``, a 1-D tensor or sequence of at least two
            values, non-increasing, in (0, 1]. Give this or ``flow_sigmas``.
        flow_sigmas: rectified flow: :math:`\\sigma_t` for ``t = 0 .. T-1``, at least two values,
            non-decreasing, in (0, 1] (:math:`\\alpha_t = 1 - \\sigma_t`; ``t = -1`` has :math:`\\sigma = 0`).
        prediction_type: default parameterisation of model outputs, one of :data:`PREDICTION_TYPES`
            (a flow schedule: :data:`FLOW_PREDICTION_TYPES`, with ``"flow"``; default: ``"epsilon"`` for VP, ``"flow"`` for flow). Methods that take a ``prediction_type``
            use this one when given ``None``.
        terminal_pure_noise: SDXL-Lightning's schedule fix (Lin et al. 2024, Eq. 24): :meth:`add_noise`
            at ``t = T-1`` returns the noise itself, as if the schedule reached zero SNR. Conversions still
            use the schedule's own :math:`\\bar\\alpha_{T-1}` (as the paper does at inference). Default off
            (a flow table ending at :math:`\\sigma = 1` is pure noise there anyway).
        final_alpha_cumprod: VP: :math:`\\bar\\alpha` of the clean end ``t = -1`` (diffusers:
            ``set_alpha_to_one=True`` gives 1.0, the default; ``False`` gives ``alphas_cumprod[0]``). Flow
            schedules end at :math:`\\sigma = 0` and accept only 1.0.
        compute_dtype: dtype of the elementwise arithmetic: float64 by default; ``None`` uses float32 for
            half inputs and the input dtype otherwise (use it on devices without float64 such as MPS).
        timestep_scale: flow only: :meth:`model_timestep` returns :math:`\\sigma_t` times this (default 1000,
            or the config's ``T``: SD3 / Wan take :math:`1000\\sigma`; FLUX's pipeline passes :math:`\\sigma` and
            its transformer multiplies by 1000, so use 1.0 there). Must be None for VP.
        flow_config: flow only: the :class:`~diffdistill.schedulers.FlowMatchingConfig` the table was built
            from (set by :meth:`flow_matching` / :meth:`from_scheduler`; sampling grids read it), or None.

    Raises:
        DTypeError: if no table is given or a table is not numeric, ``compute_dtype`` is not a floating dtype or None,
            ``final_alpha_cumprod`` / ``timestep_scale`` is not a real number, or ``flow_config`` is not a
            :class:`~diffdistill.schedulers.FlowMatchingConfig`.
        ShapeError: if a table has more than one dimension.
        NonFiniteError: if a table holds NaN / Inf (a value check).
        OptionError: if both tables are given, a table has fewer than 2 values, leaves its range
            or is not monotone, if ``prediction_type`` is unknown, ``final_alpha_cumprod`` is outside (0, 1]
            (flow: not 1), ``timestep_scale`` is not > 0 or is given for VP, or ``flow_config`` for VP.

    Example:
        >>> sched = NoiseSchedule.from_betas()  # SD / SDXL: scaled_linear 0.00085 -> 0.012, T = 1000
        >>> sched.num_train_timesteps, sched.kind
        (1000, 'vp')
        >>> x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> t = torch.tensor([999, 500])
        >>> x_t = sched.add_noise(x0, eps, t)
        >>> torch.allclose(sched.to_x0(eps, x_t, t), x0, atol=1e-5)
        True
        >>> sd3 = NoiseSchedule.flow_matching(shift=3.0)  # rectified flow, prediction_type "flow"
        >>> v = eps - x0
        >>> torch.allclose(sd3.to_x0(v, sd3.add_noise(x0, eps, t), t), x0, atol=1e-5)
        True
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor | Sequence[float] | None = None,
        *,
        flow_sigmas: torch.Tensor | Sequence[float] | None = None,
        prediction_type: str | None = None,
        terminal_pure_noise: bool = False,
        final_alpha_cumprod: float = 1.0,
        compute_dtype: torch.dtype | None = torch.float64,
        timestep_scale: float | None = None,
        flow_config: FlowMatchingConfig | None = None,
    ) -> None:
        if alphas_cumprod is None and flow_sigmas is None:
            raise DTypeError(
                "Expected `alphas_cumprod` (a VP schedule) to be a 1-D tensor or sequence of floats, or "
                "`flow_sigmas=` (a rectified-flow schedule), but got NoneType for both. Or use "
                "NoiseSchedule.from_betas(...) / NoiseSchedule.flow_matching(...)."
            )
        if alphas_cumprod is not None and flow_sigmas is not None:
            raise OptionError(
                "Expected exactly one of `alphas_cumprod` (a VP schedule) or `flow_sigmas` (a rectified-flow "
                "schedule), but got both."
            )
        flow = flow_sigmas is not None
        name = "flow_sigmas" if flow else "alphas_cumprod"
        raw = flow_sigmas if flow else alphas_cumprod
        try:
            table = torch.as_tensor(raw, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            what = "flow sigmas" if flow else "a diffusers scheduler's alphas_cumprod"
            raise DTypeError(
                f"Expected `{name}` to be a 1-D tensor or sequence of floats (e.g. {what}), but got "
                f"{type(raw).__name__}."
            ) from err
        if table.ndim > 1:
            raise ShapeError(
                f"Expected `{name}` to be 1-D (one value per timestep), but got shape {tuple(table.shape)}.",
                name=name,
                expected="(T,)",
                actual=tuple(table.shape),
            )
        table = table.flatten()
        if table.numel() < 2:
            raise OptionError(f"Expected `{name}` to hold at least 2 values, but got {table.numel()}.")
        check_finite(table, name)
        if not bool(((table > 0) & (table <= 1)).all()):
            hint = (
                " A flow table starts after the clean end: sigma_{-1} = 0 is implied."
                if flow
                else " A zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr) has abar_T = 0 exactly: "
                "NoiseSchedule.from_scheduler(scheduler) reads it, or pass this table with its last entry clamped "
                "(alphas_cumprod.clamp_min(2**-24), as diffusers' EulerDiscreteScheduler does) and "
                "terminal_pure_noise=True -- not the schedule before rescaling, whose every noise level differs."
            )
            raise OptionError(
                f"Expected every value of `{name}` to lie in (0, 1], but got range "
                f"[{table.min().item():.3g}, {table.max().item():.3g}].{hint}"
            )
        if flow and bool((table[1:] < table[:-1]).any()):
            raise OptionError(
                "Expected `flow_sigmas` to be non-decreasing in t (index 0 the least noisy; diffusers lists them "
                "descending: pass scheduler_sigmas.flip(0)), but it decreases somewhere."
            )
        if not flow and bool((table[1:] > table[:-1]).any()):
            raise OptionError(
                "Expected `alphas_cumprod` to be non-increasing in t, but it increases somewhere."
            )
        if prediction_type is None:
            prediction_type = "flow" if flow else "epsilon"
        check_option(prediction_type, "prediction_type", FLOW_PREDICTION_TYPES if flow else PREDICTION_TYPES)
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise DTypeError(
                f"Expected `compute_dtype` to be a floating torch.dtype (float64, float32) or None, but got "
                f"{compute_dtype!r}."
            )
        final = check_real(final_alpha_cumprod, "final_alpha_cumprod", allow_tensor=True)
        if not 0 < final <= 1:
            raise OptionError(
                f"Expected `final_alpha_cumprod` to lie in (0, 1], but got {final_alpha_cumprod!r}."
            )
        if flow and final != 1.0:
            raise OptionError(
                f"A flow schedule ends at sigma = 0 (alpha = 1), so `final_alpha_cumprod` must be 1.0, but got "
                f"{final_alpha_cumprod!r}. Drop it."
            )
        if flow_config is not None and not isinstance(flow_config, FlowMatchingConfig):
            raise DTypeError(
                f"Expected `flow_config` to be a FlowMatchingConfig or None, but got {type(flow_config).__name__}."
            )
        if not flow and (timestep_scale is not None or flow_config is not None):
            bad = "timestep_scale" if timestep_scale is not None else "flow_config"
            raise OptionError(
                f"`{bad}` applies only to a flow schedule (`flow_sigmas=`), but this is a VP schedule, whose "
                "network takes the integer index. Drop it."
            )
        if flow:
            default_scale = float(flow_config.num_train_timesteps) if flow_config is not None else 1000.0
            scale = default_scale if timestep_scale is None else check_real(timestep_scale, "timestep_scale")
            if scale <= 0:
                raise OptionError(f"Expected `timestep_scale` > 0, but got {timestep_scale!r}.")
            self.timestep_scale: float | None = scale
            # Table indexed by t + 1 so that t = -1 (clean end, sigma = 0) needs no branch.
            sig_ext = torch.cat([torch.zeros(1, dtype=torch.float64), table])
            self._alpha_table = 1 - sig_ext
            self._sigma_table = sig_ext
            a, sg = 1 - table, table
            self.alphas_cumprod = a**2 / (a**2 + sg**2)
        else:
            self.timestep_scale = None
            self.alphas_cumprod = table
            ext = torch.cat([torch.tensor([final], dtype=torch.float64), table])
            self._alpha_table = ext.sqrt()
            self._sigma_table = (1 - ext).clamp_min(0).sqrt()
        self._kind = "flow" if flow else "vp"
        self.flow_config = flow_config
        self.prediction_type = prediction_type
        self.source_clips_x0 = False  # set by from_scheduler for a clipping / thresholding VP scheduler
        self.terminal_pure_noise = bool(terminal_pure_noise)
        self.final_alpha_cumprod = final
        self.compute_dtype = compute_dtype
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_betas(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        **kwargs: Any,
    ) -> NoiseSchedule:
        """Build from a beta schedule, with the SD 1.x / SD 2.x / SDXL defaults.

        Args:
            num_train_timesteps: ``T``, an int >= 2 (1000 for SD / SDXL).
            beta_start: first :math:`\\beta`, in ``[0, 1)`` (0.00085 for SD / SDXL).
            beta_end: last :math:`\\beta`, in ``[0, 1)`` (0.012 for SD / SDXL).
            beta_schedule: ``"scaled_linear"`` (linear in :math:`\\sqrt\\beta`, the default), ``"linear"`` or
                ``"squaredcos_cap_v2"`` (cosine, Nichol & Dhariwal 2021, which ignores ``beta_start`` and
                ``beta_end``), with diffusers' meanings.
            **kwargs: keyword arguments of :class:`NoiseSchedule` (``prediction_type``,
                ``terminal_pure_noise``, ``final_alpha_cumprod``, ``compute_dtype``).

        Returns:
            The schedule, whose ``alphas_cumprod`` match diffusers' to the last float32 bit.

        Raises:
            OptionError: if ``beta_schedule`` is unknown, ``num_train_timesteps`` is < 2, a beta is
                outside ``[0, 1)`` or not finite, or the betas drive ``alphas_cumprod`` to 0; and as
                :class:`NoiseSchedule` for ``kwargs``.
            DTypeError: if a beta is not a real number or ``num_train_timesteps`` not an int; and as :class:`NoiseSchedule` for ``kwargs``.

        Example:
            >>> s = NoiseSchedule.from_betas(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
            >>> round(float(s.alphas_cumprod[-1]), 6)
            4e-05
        """
        check_option(beta_schedule, "beta_schedule", BETA_SCHEDULES)
        n = check_int(num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
        for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
            value = check_real(beta, name, allow_tensor=True)
            if not 0 <= value < 1:
                raise OptionError(f"Expected `{name}` to lie in [0, 1), but got {beta!r}.")
        if beta_schedule == "scaled_linear":
            # diffusers computes this in float32; do the same so alphas_cumprod match to the last bit.
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        else:
            betas = _betas_for_alpha_bar(n).to(torch.float32)
        abar = torch.cumprod(1.0 - betas, dim=0)
        if not bool((abar > 0).all()):
            raise OptionError(
                f"Expected betas that keep alphas_cumprod > 0, but beta_start={beta_start!r}, beta_end={beta_end!r} "
                f"over {n} steps drive it to 0 (float32 underflow) at t = {int((abar <= 0).nonzero()[0])}. Use "
                "smaller betas or fewer `num_train_timesteps`."
            )
        return cls(abar, **kwargs)

    @classmethod
    def flow_matching(
        cls,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        mu: float | None = None,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        **kwargs: Any,
    ) -> NoiseSchedule:
        """Build a rectified-flow schedule from plain arguments, as diffusers' ``FlowMatchEulerDiscreteScheduler``.

        :math:`\\sigma_t` = :func:`~diffdistill.schedulers.shift_sigmas` of ``(t + 1) / T`` (the index mapping of
        :mod:`~diffdistill.schedulers.flow_schedule`): a static ``shift`` (SD3: 3.0; Esser et al. 2024,
        Sec. 5.3.2) or the resolution's ``mu`` (FLUX: :func:`~diffdistill.schedulers.resolution_mu`).

        Args:
            num_train_timesteps: ``T``, an int >= 2 (1000 for every released flow model).
            shift: the static shift, > 0 (1.0: no shift; must stay 1.0 with ``mu``).
            mu: the dynamic (resolution-dependent) shift, or None.
            time_shift_type: ``"exponential"`` (FLUX) or ``"linear"`` (CogView4), used with ``mu``.
            shift_terminal: diffusers' ``shift_terminal`` for sampling grids (see
                :class:`~diffdistill.schedulers.FlowMatchingConfig`), or None.
            **kwargs: keyword arguments of :class:`NoiseSchedule` (``prediction_type`` default ``"flow"``,
                ``terminal_pure_noise``, ``compute_dtype``, ``timestep_scale``).

        Returns:
            The flow schedule; ``sigma(t)`` equals diffusers' ``scheduler.sigmas[T - 1 - t]`` bit for bit for a
            static shift, and ``set_timesteps(T, mu=mu)``'s to float32 rounding for a dynamic one.

        Raises:
            DTypeError: if an argument has the wrong type; and as :class:`NoiseSchedule` for ``kwargs``.
            OptionError: if an argument is out of range, or both ``shift`` (not 1) and ``mu`` are given; and as
                :class:`NoiseSchedule` for ``kwargs``.

        Example:
            >>> sd3 = NoiseSchedule.flow_matching(shift=3.0)
            >>> sd3.kind, sd3.prediction_type, float(sd3.sigma(999)), round(float(sd3.sigma(499)), 4)
            ('flow', 'flow', 1.0, 0.75)
            >>> float(sd3.model_timestep(499))  # what SD3's transformer takes: sigma * 1000
            750.0
        """
        config = FlowMatchingConfig(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            mu=mu,
            time_shift_type=time_shift_type,
            shift_terminal=shift_terminal,
        )
        return cls.flow_matching_from_config(config, **kwargs)

    @classmethod
    def from_flow_sigmas(cls, sigmas: torch.Tensor | Sequence[float], **kwargs: Any) -> NoiseSchedule:
        """Build a rectified-flow schedule over any table of sigmas (ascending in ``t``).

        No shift is applied; sampling grids treat the table as static shift 1
        (:func:`~diffdistill.schedulers.flow_sigma_grid`).

        Args:
            sigmas: :math:`\\sigma_t` for ``t = 0 .. T-1``, non-decreasing, in (0, 1].
            **kwargs: keyword arguments of :class:`NoiseSchedule` (not ``alphas_cumprod`` / ``flow_sigmas``).

        Returns:
            The flow schedule (``T = len(sigmas)``).

        Raises:
            DTypeError: as :class:`NoiseSchedule`.
            ShapeError: as :class:`NoiseSchedule`.
            NonFiniteError: as :class:`NoiseSchedule`.
            OptionError: as :class:`NoiseSchedule`.

        Example:
            >>> s = NoiseSchedule.from_flow_sigmas([0.25, 0.5, 0.75, 1.0])
            >>> s.alpha(torch.tensor([-1, 0, 3])).tolist()
            [1.0, 0.75, 0.0]
        """
        return cls(flow_sigmas=sigmas, **kwargs)

    @classmethod
    def from_scheduler(
        cls,
        scheduler: Any,
        *,
        mu: float | None = None,
        image_seq_len: int | float | None = None,
        **kwargs: Any,
    ) -> NoiseSchedule:
        """Build from a diffusers scheduler (or anything shaped like one), duck-typed, VP or flow.

        VP: anything with ``alphas_cumprod`` (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
        ``LCMScheduler``, ...). Flow: a scheduler without ``alphas_cumprod`` whose ``config`` has ``shift`` or
        ``use_dynamic_shifting`` (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchLCMScheduler``,
        ``FlowMatchHeunDiscreteScheduler``), parsed by
        :meth:`~diffdistill.schedulers.FlowMatchingConfig.from_diffusers_config` (static ``shift``; dynamic
        shifting with this resolution's ``mu`` or ``image_seq_len``; ``time_shift_type``, ``shift_terminal``;
        ``invert_sigmas`` and Karras / exponential / beta sigmas refused). Wan: a ``UniPCMultistepScheduler`` /
        ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas=True`` and ``prediction_type="flow_prediction"``
        (mapped to ``"flow"``) gives the static-shift table of its ``flow_shift`` (the same table as
        ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``; its ``alphas_cumprod`` is diffusers' unused VP
        betas table) and remembers the solver's default sampling grid (``flow_config.multistep_grid``, for
        :func:`~diffdistill.schedulers.flow_sigma_grid`). Wan 2.2 A14B's switch between its high-noise and
        low-noise experts at ``boundary_ratio`` (0.875 T2V / 0.9 I2V of ``num_train_timesteps``) is a pipeline
        matter, not part of the schedule: call the expert whose range holds the model timestep yourself. The table
        is recomputed from the config (never read from ``scheduler.sigmas``, which ``set_timesteps`` overwrites
        with a sampling grid). A VP scheduler configured to clip or threshold its x0 estimate (``clip_sample`` /
        ``thresholding``; ``DDIMScheduler()`` and ``DDPMScheduler()`` default to ``clip_sample=True``) sets
        ``source_clips_x0``: the samplers here never clip, and :func:`~diffdistill.schedulers.ddim_sample` /
        :func:`~diffdistill.schedulers.lcm_sample` warn that they differ from that scheduler.

        Args:
            scheduler: a VP scheduler with ``alphas_cumprod``, or a flow-matching scheduler with a ``config``.
            mu: flow with ``use_dynamic_shifting``: the resolution's :math:`\\mu`.
            image_seq_len: flow with ``use_dynamic_shifting``: the image token count to compute ``mu`` from with
                the config's base / max values, as FLUX's pipeline does (e.g.
                :func:`~diffdistill.schedulers.packed_image_seq_len` ``(1024, 1024)``), or CogView4's with
                ``time_shift_type="linear"`` (:meth:`~diffdistill.schedulers.FlowMatchingConfig.mu_for`).
            **kwargs: keyword arguments of :class:`NoiseSchedule`. VP: ``prediction_type`` and
                ``final_alpha_cumprod`` default to the scheduler's (``config`` or attributes) when not given; a
                zero-terminal-SNR table (``rescale_betas_zero_snr``: ``alphas_cumprod[-1] = 0``) is kept with its
                last entry clamped to ``2**-24`` (as diffusers' ``EulerDiscreteScheduler``) and
                ``terminal_pure_noise=True``. Flow: ``prediction_type`` defaults to ``"flow"`` (diffusers'
                ``"flow_prediction"``).

        Returns:
            The schedule.

        Raises:
            DTypeError: if ``scheduler`` has neither ``alphas_cumprod`` nor a flow-matching config; and as
                :class:`NoiseSchedule` for the values read or passed.
            OptionError: if ``mu`` / ``image_seq_len`` are passed for a VP or static-shift scheduler, missing for a
                dynamic one, or the config asks for an unsupported option (``invert_sigmas``, Karras /
                exponential / beta sigmas; with ``use_flow_sigmas``: a prediction type other than
                ``"flow_prediction"``, ``final_sigmas_type="sigma_min"``, a solver other than UniPC / DPM-Solver
                multistep); and as :class:`NoiseSchedule`.

        Example:
            >>> class Fake:  # anything with alphas_cumprod works; diffusers is not required
            ...     alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
            >>> NoiseSchedule.from_scheduler(Fake()).num_train_timesteps
            1000
            >>> class FakeFlux:  # a FlowMatchEulerDiscreteScheduler's config, as FLUX.1-dev ships it
            ...     config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
            >>> flux = NoiseSchedule.from_scheduler(FakeFlux(), image_seq_len=4096)
            >>> flux.kind, round(flux.flow_config.mu, 4)
            ('flow', 1.15)
            >>> class FakeWan:  # UniPCMultistepScheduler's config as Wan 2.1 ships it
            ...     config = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
            ...               "flow_shift": 3.0, "prediction_type": "flow_prediction"}
            >>> wan = NoiseSchedule.from_scheduler(FakeWan())
            >>> wan.prediction_type, wan.flow_config.shift, wan.flow_config.multistep_grid
            ('flow', 3.0, 'unipc')
        """
        abar = getattr(scheduler, "alphas_cumprod", None)
        config = getattr(scheduler, "config", None)

        def _get(name: str) -> Any:
            if config is not None:
                value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
                if value is not None:
                    return value
            return getattr(scheduler, name, None)

        if _get("use_flow_sigmas"):
            # Wan: UniPC / DPM-Solver multistep on a flow model. Their alphas_cumprod is an unused VP betas table.
            prediction = _get("prediction_type")
            if prediction not in (None, "flow_prediction"):
                raise OptionError(
                    f"{type(scheduler).__name__} sets `use_flow_sigmas=True` with prediction_type={prediction!r}; "
                    "only 'flow_prediction' (the velocity of a flow model, as Wan ships it) is a flow schedule here."
                )
            if kwargs.get("prediction_type", "flow_prediction") == "flow_prediction":
                kwargs["prediction_type"] = "flow"
            flow_config = FlowMatchingConfig.from_diffusers_config(
                config if config is not None else {"use_flow_sigmas": True},
                mu=mu,
                image_seq_len=image_seq_len,
                scheduler_class=_multistep_class(scheduler, config),
            )
            return cls.flow_matching_from_config(flow_config, **kwargs)
        if abar is None:
            is_flow = config is not None and (
                _get("shift") is not None or _get("use_dynamic_shifting") is not None
            )
            if not is_flow:
                raise DTypeError(
                    f"Expected `scheduler` to have an `alphas_cumprod` attribute (e.g. a diffusers DDPMScheduler), "
                    f"but {type(scheduler).__name__} has none, nor a flow-matching config (`shift` / "
                    "`use_dynamic_shifting`, e.g. FlowMatchEulerDiscreteScheduler). Use NoiseSchedule.from_betas(...) "
                    "or NoiseSchedule.flow_matching(...) instead."
                )
            flow_config = FlowMatchingConfig.from_diffusers_config(config, mu=mu, image_seq_len=image_seq_len)
            return cls.flow_matching_from_config(flow_config, **kwargs)
        if mu is not None or image_seq_len is not None:
            raise OptionError(
                f"`mu` / `image_seq_len` apply only to flow-matching schedulers, but {type(scheduler).__name__} is a "
                "VP scheduler (it has alphas_cumprod). Drop them."
            )
        if "prediction_type" not in kwargs and _get("prediction_type") is not None:
            kwargs["prediction_type"] = _get("prediction_type")
        if "final_alpha_cumprod" not in kwargs:
            final = getattr(scheduler, "final_alpha_cumprod", None)
            if final is not None:
                kwargs["final_alpha_cumprod"] = float(final)
        table = torch.as_tensor(abar)
        rescaled = bool(_get("rescale_betas_zero_snr"))  # Euler keeps abar_T clamped to 2**-24 itself
        if table.ndim == 1 and table.numel() > 1 and (float(table[-1]) == 0.0 or rescaled):
            # Zero terminal SNR (``rescale_betas_zero_snr``, Lin et al. 2024, Sec. 3.1): the rescaled table with
            # its last entry clamped to 2**-24 (diffusers' EulerDiscreteScheduler does the same), and add_noise's
            # last step pure noise (Eq. 24) -- not the table before rescaling, whose every level differs.
            if kwargs.get("terminal_pure_noise") is False:
                raise OptionError(
                    f"{type(scheduler).__name__} has a zero-terminal-SNR table (rescale_betas_zero_snr), whose last "
                    "step is pure noise; terminal_pure_noise=False contradicts it. Drop the argument."
                )
            table = table.double().clone()
            table[-1] = max(float(table[-1]), 2.0**-24)
            abar, kwargs["terminal_pure_noise"] = table, True
        schedule = cls(abar, **kwargs)
        # DDIM / DDPM / LCM clip (or threshold) their x0 estimate when configured to (DDIMScheduler() and
        # DDPMScheduler() default to clip_sample=True; SDXL's config sets False); diffdistill's samplers never do,
        # so ddim_sample / lcm_sample warn on such a schedule (TCDScheduler.step reads neither key: no warning).
        clips = bool(_get("clip_sample")) or bool(_get("thresholding"))
        schedule.source_clips_x0 = clips and type(scheduler).__name__ != "TCDScheduler"
        return schedule

    @classmethod
    def flow_matching_from_config(cls, config: FlowMatchingConfig, **kwargs: Any) -> NoiseSchedule:
        """Build a rectified-flow schedule from a :class:`~diffdistill.schedulers.FlowMatchingConfig`.

        Args:
            config: the config (its training table: :meth:`FlowMatchingConfig.training_sigmas`).
            **kwargs: keyword arguments of :class:`NoiseSchedule` (not the table nor ``flow_config``).

        Returns:
            The flow schedule.

        Raises:
            DTypeError: if ``config`` is not a :class:`~diffdistill.schedulers.FlowMatchingConfig`; and as
                :class:`NoiseSchedule` for ``kwargs``.
            OptionError: as :class:`NoiseSchedule` for ``kwargs``.

        Example:
            >>> from diffdistill.schedulers import FlowMatchingConfig
            >>> NoiseSchedule.flow_matching_from_config(FlowMatchingConfig(shift=3.0)).flow_config.shift
            3.0
        """
        if not isinstance(config, FlowMatchingConfig):
            raise DTypeError(
                f"Expected `config` to be a FlowMatchingConfig, but got {type(config).__name__}."
            )
        return cls(flow_sigmas=config.training_sigmas(), flow_config=config, **kwargs)

    # ------------------------------------------------------------------ basics
    @property
    def kind(self) -> str:
        """``"vp"`` (:math:`\\alpha^2 + \\sigma^2 = 1`) or ``"flow"`` (rectified flow, :math:`\\alpha = 1 - \\sigma`)."""
        return self._kind

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of discrete training timesteps."""
        return int(self.alphas_cumprod.numel())

    def __repr__(self) -> str:
        if self._kind == "flow":
            return (
                f"NoiseSchedule(kind='flow', T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"flow_config={self.flow_config!r}, timestep_scale={self.timestep_scale})"
            )
        return (
            f"NoiseSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
            f"terminal_pure_noise={self.terminal_pure_noise}, final_alpha_cumprod={self.final_alpha_cumprod})"
        )

    def _same_noise_levels(self, other: NoiseSchedule) -> bool:
        """Whether ``other`` is this schedule or gives every index the same noise level and model timestep.

        Same kind, the same :math:`(\\alpha_t, \\sigma_t)` table (``t = -1 .. T-1``, so also the same ``T``)
        and the same ``timestep_scale``: a network called through one schedule sees what it would through the
        other. ``prediction_type`` and ``terminal_pure_noise`` are not compared (a TeacherSolver has its own
        prediction type; the forward process is the loss's). CPU tables: no device sync.
        """
        if other is self:
            return True
        return (
            self._kind == other._kind
            and self.timestep_scale == other.timestep_scale
            and self._sigma_table.shape == other._sigma_table.shape
            and torch.equal(self._sigma_table, other._sigma_table)
            and torch.equal(self._alpha_table, other._alpha_table)
        )

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._device_tables.get(device)
        if tables is None:
            tables = (self._alpha_table.to(device), self._sigma_table.to(device))
            self._device_tables[device] = tables
        return tables

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the elementwise arithmetic for inputs of ``dtype``.

        Args:
            dtype: the dtype of the tensor input.

        Returns:
            ``compute_dtype`` when set, else ``dtype`` promoted to at least float32.

        Raises:
            DTypeError: if ``dtype`` is not a ``torch.dtype``.
        """
        if not isinstance(dtype, torch.dtype):
            raise DTypeError(f"Expected `dtype` to be a torch.dtype, but got {type(dtype).__name__}.")
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.promote_types(dtype, torch.float32)

    def timesteps(
        self, t: TimestepLike, device: torch.device | str | None = None, name: str = "t"
    ) -> torch.Tensor:
        r"""Validate ``t`` and return it as an int64 tensor of diffusers indices in ``[-1, T-1]``.

        VP: floating tensors are accepted when they hold integral values (diffusers' Euler schedulers keep
        float timesteps); a fractional value raises, since the schedule is discrete. Flow: floating values are
        refused, since diffusers' flow ``timesteps`` are :math:`1000\sigma` (the network input), not indices;
        map them with :meth:`sigma_to_timestep` ``(timesteps / 1000)``.

        Args:
            t: an int, a sequence of ints or a tensor of any shape holding timestep indices.
            device: where to put the result (default: ``t``'s device, or the CPU for Python values).
            name: the argument's name in error messages (pass the public name, e.g. ``"sample.t"``).

        Returns:
            int64 tensor of the shape of ``t``.

        Raises:
            DTypeError: if ``t`` is not numeric, or is a bool or complex tensor, or floating for a flow schedule.
            NonFiniteError: if a float ``t`` holds NaN / Inf (a value check).
            OptionError: if a value is fractional or outside ``[-1, T-1]`` (value checks).

        Example:
            >>> NoiseSchedule.from_betas().timesteps([999.0, -1]).tolist()
            [999, -1]
        """
        if isinstance(t, torch.Tensor):
            tt = t if device is None else t.to(device)
        else:
            try:
                tt = torch.as_tensor(t, device=device)
            except (TypeError, ValueError, RuntimeError) as err:
                raise DTypeError(
                    f"Expected `{name}` to be an int, a sequence of ints or an integer tensor of timestep "
                    f"indices, but got {type(t).__name__} ({t!r})."
                ) from err
        if tt.dtype == torch.bool or tt.is_complex():
            raise DTypeError(f"Expected `{name}` to hold integer timesteps, but got dtype {tt.dtype}.")
        if tt.is_floating_point() and self._kind == "flow":
            raise DTypeError(
                f"Expected `{name}` to hold integer indices into the flow table (0 .. {self.num_train_timesteps - 1}, "
                f"-1 the clean end), but got floating values (dtype {tt.dtype}). diffusers' flow `timesteps` are "
                "sigma * 1000, not indices: map them with schedule.sigma_to_timestep(timesteps / 1000), or pass "
                "integer indices (e.g. t.long() if they are indices)."
            )
        if tt.is_floating_point():
            check_finite(tt, name)
            if value_checks_enabled() and not bool((tt == tt.round()).all()):
                raise OptionError(
                    f"Expected `{name}` to hold integral timestep indices, but got fractional values "
                    f"(e.g. {tt[tt != tt.round()].flatten()[0].item()!r}). The schedule is discrete; round "
                    "them or use `edm_sigma_to_timestep(..., mode='nearest')`."
                )
            tt = tt.round().long()
        else:
            tt = tt.long()
        if value_checks_enabled() and tt.numel() > 0:
            lo, hi = int(tt.min()), int(tt.max())
            if lo < -1 or hi > self.num_train_timesteps - 1:
                raise OptionError(
                    f"Expected `{name}` to lie in [-1, {self.num_train_timesteps - 1}] (diffusers indices; "
                    f"-1 is the clean end), but got values in [{lo}, {hi}]."
                )
        return tt

    def batch_timesteps(self, t: TimestepLike, like: torch.Tensor, name: str = "t") -> torch.Tensor:
        """Validate ``t`` for the batch ``like``: values in ``[-1, T-1]``, a scalar or one per sample.

        Args:
            t: a scalar timestep or one per sample (shape ``(B,)`` or ``(1,)``).
            like: the batch ``(B, ...)`` the timesteps belong to (only its device and batch size are read).
            name: the argument's name in error messages (pass the public name, e.g. ``"sample.t"``).

        Returns:
            int64 indices on ``like``'s device, shape ``()`` or ``(B,)``.

        Raises:
            DTypeError: as :meth:`timesteps`, or if ``like`` is not a tensor.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`.
            ShapeError: if ``t`` has more than one dimension or a length other than 1 or ``B``.

        Example:
            >>> NoiseSchedule.from_betas().batch_timesteps([999, 5], torch.zeros(2, 4)).tolist()
            [999, 5]
        """
        check_tensor(like, "like")
        tt = self.timesteps(t, like.device, name)
        if tt.ndim > 1:
            raise ShapeError(
                f"Expected `{name}` to be a scalar or a 1-D tensor of per-sample timesteps, but got shape "
                f"{tuple(tt.shape)}.",
                name=name,
                expected="() or (B,)",
                actual=tuple(tt.shape),
            )
        batch = like.shape[0] if like.ndim else 1
        if tt.ndim == 1 and tt.shape[0] not in (1, batch):
            raise ShapeError(
                f"Expected `{name}` to hold one timestep per sample ({batch}), but got {tt.shape[0]} timesteps.",
                name=name,
                expected=(batch,),
                actual=tuple(tt.shape),
            )
        return tt

    def _index(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """An already validated Python timestep as a 0-d int64 tensor on ``like``'s device (no checks)."""
        return torch.tensor(t, dtype=torch.long, device=like.device)

    def _lookup(self, table_index: int, tt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient (alpha: 0, sigma: 1) at validated ``tt``, broadcastable against ``like``."""
        coef = self._tables(like.device)[table_index][tt + 1].to(self.work_dtype(like.dtype))
        return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim)) if coef.ndim else coef

    def _coef(self, table_index: int, t: TimestepLike, like: torch.Tensor, name: str = "t") -> torch.Tensor:
        return self._lookup(table_index, self.batch_timesteps(t, like, name), like)

    def _alpha_sigma64(self, t: TimestepLike) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (alpha_t, sigma_t) with the shape of ``t`` (any shape)."""
        device = t.device if isinstance(t, torch.Tensor) else None
        tt = self.timesteps(t, device)
        alpha, sigma = self._tables(tt.device)
        return alpha[tt + 1], sigma[tt + 1]

    def alpha(self, t: TimestepLike, like: torch.Tensor | None = None) -> torch.Tensor:
        """The signal coefficient :math:`\\alpha_t`: VP :math:`\\sqrt{\\bar\\alpha_t}`, flow :math:`1 - \\sigma_t`.

        Args:
            t: timestep indices in ``[-1, T-1]``, any shape (with ``like``: a scalar or one per sample).
            like: optional batch ``(B, ...)``: the result is then shaped to broadcast against it, on its
                device and in the work dtype (:meth:`work_dtype`).

        Returns:
            float64 tensor of the shape of ``t``, or, with ``like``, shape ``(B, 1, ..., 1)`` (or ``()``).

        Raises:
            DTypeError: as :meth:`timesteps`, or if ``like`` is not a tensor.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`.
            ShapeError: as :meth:`batch_timesteps` (with ``like``).

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> bool(torch.allclose(s.alpha(torch.tensor([0, 999])) ** 2 + s.sigma(torch.tensor([0, 999])) ** 2,
            ...                     torch.ones(2, dtype=torch.float64)))
            True
        """
        return self._alpha_sigma64(t)[0] if like is None else self._coef(0, t, like)

    def sigma(self, t: TimestepLike, like: torch.Tensor | None = None) -> torch.Tensor:
        """The noise coefficient :math:`\\sigma_t`: VP :math:`\\sqrt{1 - \\bar\\alpha_t}`, flow the (shifted) table value.

        Args:
            t: timestep indices in ``[-1, T-1]``, any shape (with ``like``: a scalar or one per sample).
            like: optional batch ``(B, ...)``, as in :meth:`alpha`.

        Returns:
            float64 tensor of the shape of ``t``, or, with ``like``, shape ``(B, 1, ..., 1)`` (or ``()``).

        Raises:
            DTypeError: as :meth:`timesteps`, or if ``like`` is not a tensor.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`.
            ShapeError: as :meth:`batch_timesteps` (with ``like``).
        """
        return self._alpha_sigma64(t)[1] if like is None else self._coef(1, t, like)

    def snr(self, t: TimestepLike) -> torch.Tensor:
        """Signal-to-noise ratio :math:`\\alpha_t^2 / \\sigma_t^2`.

        Args:
            t: timestep indices in ``[-1, T-1]``, any shape (``t = -1`` gives ``inf`` when
                ``final_alpha_cumprod = 1``).

        Returns:
            float64 tensor of the shape of ``t``.

        Raises:
            DTypeError: as :meth:`timesteps`.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`.

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> bool(s.snr(torch.tensor([0])) > s.snr(torch.tensor([999])))
            True
        """
        a, s = self._alpha_sigma64(t)
        return a**2 / s**2

    def edm_sigma(self, t: TimestepLike) -> torch.Tensor:
        """EDM / Karras noise level :math:`\\sigma_t/\\alpha_t` (VP: :math:`\\sqrt{(1-\\bar\\alpha_t)/\\bar\\alpha_t}`;
        flow: :math:`\\sigma_t / (1 - \\sigma_t)`, ``inf`` at :math:`\\sigma = 1`).

        Args:
            t: timestep indices in ``[-1, T-1]``, any shape.

        Returns:
            float64 tensor of the shape of ``t``.

        Raises:
            DTypeError: as :meth:`timesteps`.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`.

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> round(float(s.edm_sigma(999)), 3)  # SDXL's largest sigma
            14.615
        """
        a, s = self._alpha_sigma64(t)
        return s / a

    def edm_sigma_to_timestep(
        self, sigma: torch.Tensor | float, mode: Literal["nearest", "interpolate"] = "nearest"
    ) -> torch.Tensor:
        """Inverse of :meth:`edm_sigma` over ``t = 0 .. T-1``.

        ``mode="nearest"`` returns the int64 index whose log-sigma is closest (SIM's and EDM's
        ``round_sigma`` take the nearest sigma itself: for a sigma between two steps, near the mean of
        the two, the index can differ by one);
        ``"interpolate"`` returns a float64 ``t`` by piecewise-linear interpolation in log sigma (as
        diffusers' Euler schedulers do), clamped to ``[0, T-1]``. On a flow table ending at :math:`\\sigma = 1`
        (an infinite EDM sigma) every finite sigma maps to ``t <= T-2``; use :meth:`sigma_to_timestep` there.

        Args:
            sigma: EDM noise levels ``> 0``, a number or a tensor of any shape.
            mode: ``"nearest"`` (the default) or ``"interpolate"``.

        Returns:
            Tensor of the shape of ``sigma``: int64 indices (``"nearest"``) or float64 ``t``
            (``"interpolate"``).

        Raises:
            DTypeError: if ``sigma`` is not numeric.
            NonFiniteError: if ``sigma`` holds NaN / Inf (a value check).
            OptionError: if ``mode`` is unknown or a ``sigma`` is ``<= 0`` (a value check).

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> int(s.edm_sigma_to_timestep(s.edm_sigma(421)))
            421
            >>> round(float(s.edm_sigma_to_timestep(s.edm_sigma(421.0), mode="interpolate")), 9)
            421.0
        """
        check_option(mode, "mode", ("nearest", "interpolate"))
        if isinstance(sigma, torch.Tensor) and (sigma.dtype == torch.bool or sigma.is_complex()):
            raise DTypeError(f"Expected `sigma` to be a real tensor, but got dtype {sigma.dtype}.")
        try:
            sig = torch.as_tensor(sigma, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DTypeError(
                f"Expected `sigma` to be a number or a tensor of EDM noise levels, but got {type(sigma).__name__}."
            ) from err
        check_finite(sig, "sigma")
        if value_checks_enabled() and not bool((sig > 0).all()):
            raise OptionError(
                f"Expected `sigma` to be > 0, but got a non-positive value ({float(sig.min())!r})."
            )
        device = sig.device
        if (
            self._kind == "flow"
        ):  # log(sigma / alpha); +inf at sigma = 1, which only an infinite sigma reaches
            table = (self._sigma_table[1:] / self._alpha_table[1:]).log().to(device)
        else:
            table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().log().to(device)
        log_sigma = sig.log()
        if mode == "nearest":
            return (log_sigma.unsqueeze(-1) - table).abs().argmin(dim=-1)
        idx = torch.searchsorted(table, log_sigma.reshape(-1).contiguous()).clamp(1, table.numel() - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return ((idx - 1).double() + w).reshape(log_sigma.shape)

    def sigma_to_timestep(
        self, sigma: torch.Tensor | float, mode: Literal["nearest", "interpolate"] = "nearest"
    ) -> torch.Tensor:
        """Inverse of :meth:`sigma` over ``t = -1 .. T-1`` (the flow noise level for a flow schedule).

        ``mode="nearest"`` returns the int64 index whose :math:`\\sigma_t` is closest (ties: the smaller
        ``t``); ``"interpolate"`` returns a float64 ``t`` linear in :math:`\\sigma` between neighbours (for
        flow, linear in the network's timestep :math:`1000\\sigma`), clamped to ``[-1, T-1]``. For diffusers'
        flow ``timesteps`` pass ``timesteps / 1000`` (``/ num_train_timesteps``).

        Args:
            sigma: noise levels in ``[0, 1]``, a number or a tensor of any shape.
            mode: ``"nearest"`` (the default) or ``"interpolate"``.

        Returns:
            Tensor of the shape of ``sigma`` on its device: int64 indices (``"nearest"``) or float64 ``t``
            (``"interpolate"``).

        Raises:
            DTypeError: if ``sigma`` is not numeric.
            NonFiniteError: if ``sigma`` holds NaN / Inf (a value check).
            OptionError: if ``mode`` is unknown or a ``sigma`` is outside ``[0, 1]`` (a value check).

        Example:
            >>> s = NoiseSchedule.flow_matching(shift=3.0)
            >>> int(s.sigma_to_timestep(s.sigma(421)))
            421
            >>> s.sigma_to_timestep(torch.tensor([0.0, 1.0])).tolist()
            [-1, 999]
        """
        check_option(mode, "mode", ("nearest", "interpolate"))
        sig = _as_sigmas(sigma, "sigma")
        table = self._sigma_table.to(sig.device)  # index t + 1, non-decreasing
        flat = sig.reshape(-1).contiguous()
        hi = torch.searchsorted(table, flat).clamp(1, table.numel() - 1)
        lo_val, hi_val = table[hi - 1], table[hi]
        if mode == "nearest":
            pick = torch.where((flat - lo_val) <= (hi_val - flat), hi - 1, hi)
            return (pick - 1).reshape(sig.shape)
        gap = hi_val - lo_val
        w = torch.where(gap > 0, (flat - lo_val) / torch.where(gap > 0, gap, 1.0), 0.0).clamp(0, 1)
        return ((hi - 2).double() + w).reshape(sig.shape)

    def model_timestep(
        self, t: TimestepLike, *, scale: float | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """What the network takes as its timestep input at index ``t``.

        VP (SD / SDXL UNets): the integer index itself (int64). Flow: :math:`\\sigma_t` times ``scale``
        (default: the schedule's ``timestep_scale``, 1000), as float32: SD3 / SD3.5 pipelines pass
        :math:`1000\\sigma` (diffusers' ``scheduler.timesteps``, bit for bit); Wan's pipeline passes its UniPC
        ``scheduler.timesteps``, i.e. ``int64(1000 sigma)`` truncated (at most 1 below this value); FLUX's
        pipeline passes :math:`\\sigma` (``timestep / 1000``, cast to the latents' dtype) and its transformer
        multiplies by 1000 inside, so use ``scale=1.0`` (or build the schedule with ``timestep_scale=1.0``) and
        ``dtype=latents.dtype`` there. Cast teacher and student inputs identically: bf16 holds
        :math:`1000\\sigma` only to a spacing of 4 above 512.

        Args:
            t: indices in ``[-1, T-1]``, any shape (a tensor keeps its device).
            scale: flow only: the multiplier of :math:`\\sigma_t` (None: ``timestep_scale``).
            dtype: the result's dtype (default int64 for VP, float32 for flow).

        Returns:
            Tensor of the shape of ``t``.

        Raises:
            DTypeError: as :meth:`timesteps`, or if ``dtype`` is not a torch dtype or ``scale`` not a number.
            NonFiniteError: as :meth:`timesteps`.
            OptionError: as :meth:`timesteps`, or if ``scale`` is given for a VP schedule or is not > 0.

        Example:
            >>> NoiseSchedule.from_betas().model_timestep([999, 0]).tolist()
            [999, 0]
            >>> flux = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
            >>> round(float(flux.model_timestep(499)), 4)  # FLUX's transformer takes sigma
            0.7595
        """
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise DTypeError(f"Expected `dtype` to be a torch.dtype or None, but got {type(dtype).__name__}.")
        device = t.device if isinstance(t, torch.Tensor) else None
        tt = self.timesteps(t, device)
        if self._kind == "vp":
            if scale is not None:
                raise OptionError(
                    "`scale` applies only to a flow schedule; a VP network takes the integer index. Drop it."
                )
            return tt if dtype is None else tt.to(dtype)
        factor = (
            float(self.timestep_scale or 1000.0)
            if scale is None
            else check_real(scale, "scale", low=0, strict=True)
        )
        return self._model_timestep(tt, factor, dtype)

    def _model_timestep(
        self, tt: torch.Tensor, factor: float | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """:meth:`model_timestep` of already validated int64 indices ``tt``: no checks, so no device sync (the
        sampling loops call it every step). ``factor`` None: the schedule's ``timestep_scale``."""
        if self._kind == "vp":
            return tt if dtype is None else tt.to(dtype)
        scale = float(self.timestep_scale or 1000.0) if factor is None else factor
        sig = self._tables(tt.device)[1][tt + 1]
        return (sig * scale).to(torch.float32 if dtype is None else dtype)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Forward process :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon`.

        With ``terminal_pure_noise=True`` the result at ``t = T-1`` is ``noise`` exactly
        (SDXL-Lightning Eq. 24).

        Args:
            x0: clean samples ``(B, ...)``, floating.
            noise: :math:`\\epsilon`, floating, the shape of ``x0`` (any floating dtype: it is cast to the
                work dtype).
            t: a scalar timestep or one per sample (``(B,)``), in ``[-1, T-1]``.

        Returns:
            :math:`x_t`, shape and dtype of ``x0``.

        Raises:
            DTypeError: if ``x0`` or ``noise`` is not a floating tensor, or ``t`` is not integer-valued.
            ShapeError: if ``x0`` is empty, ``noise`` has another shape, or ``t`` is neither a scalar nor one
                per sample.
            NonFiniteError: if ``x0``, ``noise`` or a float ``t`` holds NaN / Inf (a value check).
            OptionError: if a ``t`` is fractional or outside ``[-1, T-1]`` (value checks).

        Example:
            >>> s = NoiseSchedule.from_betas(terminal_pure_noise=True)
            >>> x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
            >>> torch.equal(s.add_noise(x0, eps, torch.tensor([999, 10]))[0], eps[0])
            True
        """
        check_float_input(x0, "x0")
        check_float_input(noise, "noise", finite=False)
        if x0.shape != noise.shape:
            raise ShapeError(
                f"Expected `x0` and `noise` to have the same shape, but got x0 {tuple(x0.shape)} and noise "
                f"{tuple(noise.shape)}.",
                name="x0/noise",
                expected=tuple(x0.shape),
                actual=tuple(noise.shape),
            )
        check_finite(noise, "noise")
        return self._add_noise(x0, noise, self.batch_timesteps(t, x0))

    def _add_noise(self, x0: torch.Tensor, noise: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        """:meth:`add_noise` on validated inputs (``tt`` from :meth:`batch_timesteps` or :meth:`_index`)."""
        a = self._lookup(0, tt, x0)
        s = self._lookup(1, tt, x0)
        work = a.dtype
        x_t = a * x0.to(work) + s * noise.to(work)
        if self.terminal_pure_noise:
            terminal = (tt == self.num_train_timesteps - 1).reshape(tt.shape + (1,) * (x0.ndim - tt.ndim))
            x_t = torch.where(terminal, noise.to(work), x_t)
        return x_t.to(x0.dtype)

    # ------------------------------------------------------------------ parameterisations
    def _prediction_type(self, prediction_type: str | None, name: str = "prediction_type") -> str:
        pt = self.prediction_type if prediction_type is None else prediction_type
        check_option(pt, name, FLOW_PREDICTION_TYPES if self._kind == "flow" else PREDICTION_TYPES)
        return pt

    def _check_output_and_state(self, model_output: torch.Tensor, x_t: torch.Tensor) -> None:
        """The boundary checks on a (model output, state) pair: floating, non-empty, same shape, finite."""
        check_float_input(model_output, "model_output", finite=False)
        check_float_input(x_t, "x_t", finite=False)
        if model_output.shape != x_t.shape:
            raise ShapeError(
                f"Expected `model_output` and `x_t` to have the same shape, but got model_output "
                f"{tuple(model_output.shape)} and x_t {tuple(x_t.shape)}.",
                name="model_output/x_t",
                expected=tuple(x_t.shape),
                actual=tuple(model_output.shape),
            )
        check_finite(model_output, "model_output")
        check_finite(x_t, "x_t")

    def _x0_eps(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        tt: torch.Tensor,
        pt: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean-sample and noise estimates (in the work dtype) implied by one model output.

        No checks: ``model_output`` / ``x_t`` passed :meth:`_check_output_and_state` (or come from a loop
        that did), ``tt`` is validated and ``pt`` a known prediction type.
        """
        a = self._lookup(0, tt, x_t)
        s = self._lookup(1, tt, x_t)
        out = model_output.to(a.dtype)
        x = x_t.to(a.dtype)
        if pt == "epsilon":
            eps = out
            x0 = (x - s * eps) / a
        elif pt == "sample":
            x0 = out
            eps = (x - a * x0) / s
        elif pt == "v_prediction":
            if self._kind == "vp":
                x0 = a * x - s * out
                eps = a * out + s * x
            else:  # v = (a eps - s x0) / n with n^2 = a^2 + s^2 (the equivalent VP state's v)
                n2 = a * a + s * s
                n = n2.sqrt()
                x0 = (a * x - n * s * out) / n2
                eps = (s * x + n * a * out) / n2
        elif pt == "flow":  # v = eps - x0 and x = (1 - s) x0 + s eps
            x0 = x - s * out  # a + s = 1 (flow schedules only): diffusers' x0 = x - sigma v
            eps = x + a * out
        else:  # score = -eps / sigma
            eps = -s * out
            x0 = (x - s * eps) / a
        return x0, eps

    def _checked_x0_eps(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: TimestepLike,
        prediction_type: str | None,
        type_name: str = "prediction_type",
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        pt = self._prediction_type(prediction_type, type_name)
        self._check_output_and_state(model_output, x_t)
        tt = self.batch_timesteps(t, x_t)
        return self._x0_eps(model_output, x_t, tt, pt), tt

    def to_x0(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: TimestepLike,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """Clean-sample estimate :math:`\\hat x_0` from a model output of any prediction type.

        epsilon: :math:`(x_t - \\sigma_t\\hat\\epsilon)/\\alpha_t`; v: :math:`\\alpha_t x_t - \\sigma_t \\hat
            v`;
        score: :math:`(x_t + \\sigma_t^2 \\hat s)/\\alpha_t`; flow (flow schedules): :math:`x_t - \\sigma_t \\hat v`
        (diffusers' SD3 / FLUX); sample: unchanged (v for a flow schedule: see the class docstring).

        Args:
            model_output: the network's output at ``(x_t, t)``, floating, the shape of ``x_t``.
            x_t: noisy states ``(B, ...)``, floating.
            t: a scalar timestep or one per sample (``(B,)``), in ``[-1, T-1]``.
            prediction_type: parameterisation of ``model_output`` (default: the schedule's).

        Returns:
            :math:`\\hat x_0`, shape and dtype of ``x_t``.

        Raises:
            DTypeError: if ``model_output`` or ``x_t`` is not a floating tensor, or ``t`` is not integer-valued.
            ShapeError: if ``x_t`` is empty, ``model_output`` has another shape, or ``t`` is neither a scalar
                nor one per sample.
            NonFiniteError: if ``model_output``, ``x_t`` or a float ``t`` holds NaN / Inf (a value check).
            OptionError: if ``prediction_type`` is unknown or a ``t`` is fractional or outside ``[-1, T-1]``.

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> x_t, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
            >>> x0 = s.to_x0(v, x_t, 300, "v_prediction")
            >>> torch.allclose(s.convert(x0, x_t, 300, "sample", "v_prediction"), v, atol=1e-5)
            True
        """
        return self._checked_x0_eps(model_output, x_t, t, prediction_type)[0][0].to(x_t.dtype)

    def to_epsilon(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: TimestepLike,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """Noise estimate :math:`\\hat\\epsilon` from a model output of any prediction type.

        Args:
            model_output: the network's output at ``(x_t, t)``, floating, the shape of ``x_t``.
            x_t: noisy states ``(B, ...)``, floating.
            t: a scalar timestep or one per sample (``(B,)``), in ``[-1, T-1]``.
            prediction_type: parameterisation of ``model_output`` (default: the schedule's).

        Returns:
            :math:`\\hat\\epsilon`, shape and dtype of ``x_t``.

        Raises:
            DTypeError: if ``model_output`` or ``x_t`` is not a floating tensor, or ``t`` is not integer-valued.
            ShapeError: if ``x_t`` is empty, ``model_output`` has another shape, or ``t`` is neither a scalar
                nor one per sample.
            NonFiniteError: if ``model_output``, ``x_t`` or a float ``t`` holds NaN / Inf (a value check).
            OptionError: if ``prediction_type`` is unknown or a ``t`` is fractional or outside ``[-1, T-1]``.

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> x_t, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
            >>> torch.allclose(s.to_epsilon(eps, x_t, 300), eps)
            True
        """
        return self._checked_x0_eps(model_output, x_t, t, prediction_type)[0][1].to(x_t.dtype)

    def convert(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: TimestepLike,
        from_type: str | None,
        to_type: str,
    ) -> torch.Tensor:
        """Re-express a model output in another parameterisation (diffusers ``prediction_type`` names).

        ``v = (\\alpha_t \\epsilon - \\sigma_t x_0) / \\sqrt{\\alpha_t^2 + \\sigma_t^2}`` (the root is 1 for VP),
        ``score = -\\epsilon / \\sigma_t``, ``flow = \\epsilon - x_0``.

        Args:
            model_output: the network's output at ``(x_t, t)``, floating, the shape of ``x_t``.
            x_t: noisy states ``(B, ...)``, floating.
            t: a scalar timestep or one per sample (``(B,)``), in ``[-1, T-1]``.
            from_type: parameterisation of ``model_output`` (``None``: the schedule's).
            to_type: parameterisation of the result, one of :data:`PREDICTION_TYPES`.

        Returns:
            The output in ``to_type``, shape and dtype of ``x_t``.

        Raises:
            DTypeError: if ``model_output`` or ``x_t`` is not a floating tensor, or ``t`` is not integer-valued.
            ShapeError: if ``x_t`` is empty, ``model_output`` has another shape, or ``t`` is neither a scalar
                nor one per sample.
            NonFiniteError: if ``model_output``, ``x_t`` or a float ``t`` holds NaN / Inf (a value check).
            OptionError: if ``from_type`` / ``to_type`` is unknown or a ``t`` is fractional or outside
                ``[-1, T-1]``.

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> x_t, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
            >>> score = s.convert(eps, x_t, 500, "epsilon", "score")
            >>> torch.allclose(score, -eps / s.sigma(500).float())
            True
        """
        to_type = self._prediction_type(to_type, "to_type")
        (x0, eps), tt = self._checked_x0_eps(model_output, x_t, t, from_type, "from_type")
        if to_type == "sample":
            out = x0
        elif to_type == "epsilon":
            out = eps
        elif to_type == "v_prediction":
            a, s = self._lookup(0, tt, x_t), self._lookup(1, tt, x_t)
            out = a * eps - s * x0
            if self._kind == "flow":
                out = out / (a * a + s * s).sqrt()
        elif to_type == "flow":
            out = eps - x0
        else:
            out = -eps / self._lookup(1, tt, x_t)
        return out.to(x_t.dtype)

    # ------------------------------------------------------------------ DDIM move
    def ddim_step(
        self,
        model_output: torch.Tensor,
        t: TimestepLike,
        x_t: torch.Tensor,
        t_to: TimestepLike,
        prediction_type: str | None = None,
        *,
        allow_same: bool = False,
    ) -> torch.Tensor:
        """Deterministic DDIM move from ``t`` to any earlier ``t_to`` (per-sample timesteps allowed).

        .. math:: x_{t'} = \\alpha_{t'} \\hat x_0 + \\sigma_{t'} \\hat\\epsilon,

        with both estimates taken from the same model output at ``t``. This is SDXL-Lightning's "move"
        (Lin et al. 2024, Eq. 5), Hyper-SD's :math:`\\Psi` (Ren et al. 2024, Eq. 1), LCM's DDIM solver and
        diffusers' ``DDIMScheduler.step`` with ``eta=0``. ``t_to = -1`` returns :math:`\\hat x_0` when
        ``final_alpha_cumprod = 1``. On a flow schedule it is the exact Euler step of the flow ODE,
        :math:`x_{t'} = x_t + (\\sigma_{t'} - \\sigma_t)\\hat v` (diffusers'
        ``FlowMatchEulerDiscreteScheduler.step``; computed in that form for ``"flow"`` outputs).

        Args:
            model_output: the network's output at ``(x_t, t)``, floating, the shape of ``x_t``.
            t: the current timestep, a scalar or one per sample (``(B,)``), in ``[-1, T-1]``.
            x_t: noisy states ``(B, ...)``, floating.
            t_to: the target timestep(s), a scalar or one per sample, earlier than ``t``.
            prediction_type: parameterisation of ``model_output`` (default: the schedule's).
            allow_same: accept ``t_to == t`` (the move is then the identity, up to rounding): Hyper-SD's
                TSCD draws its target time ``t_end`` from an interval that includes ``t_{n-1}``. Default off.

        Returns:
            :math:`x_{t_{to}}`, shape and dtype of ``x_t``.

        Raises:
            DTypeError: if ``model_output`` or ``x_t`` is not a floating tensor, or ``t`` / ``t_to`` is not
                integer-valued.
            ShapeError: if ``x_t`` is empty, ``model_output`` has another shape, or ``t`` / ``t_to`` is neither
                a scalar nor one per sample.
            NonFiniteError: if ``model_output`` or ``x_t`` holds NaN / Inf (a value check).
            OptionError: if ``prediction_type`` is unknown, some ``t_to >= t`` (``t_to > t`` with
                ``allow_same``) or a timestep is outside ``[-1, T-1]`` (value checks).

        Example:
            >>> s = NoiseSchedule.from_betas()
            >>> x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
            >>> t, t_to = torch.tensor([999, 600]), torch.tensor([500, 250])
            >>> x_t = s.add_noise(x0, eps, t)
            >>> torch.allclose(s.ddim_step(eps, t, x_t, t_to), s.add_noise(x0, eps, t_to), atol=1e-5)
            True
        """
        pt = self._prediction_type(prediction_type)
        self._check_output_and_state(model_output, x_t)
        tt = self.batch_timesteps(t, x_t, "t")
        tto = self.batch_timesteps(t_to, x_t, "t_to")
        if value_checks_enabled() and bool((tto > tt).any() if allow_same else (tto >= tt).any()):
            rel = "t_to <= t" if allow_same else "t_to < t"
            raise OptionError(
                f"Expected every `t_to` to be earlier than `t` ({rel}; the DDIM move goes towards the data), "
                f"but got t={tt.tolist()} and t_to={tto.tolist()}."
            )
        return self._ddim(model_output, x_t, tt, tto, pt)

    def _ddim(
        self, model_output: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor, tto: torch.Tensor, pt: str
    ) -> torch.Tensor:
        """:meth:`ddim_step` on validated inputs (no checks)."""
        if (
            self._kind == "flow" and pt == "flow"
        ):  # diffusers' Euler step x + (sigma_to - sigma) v, same floats
            s_to, s = self._lookup(1, tto, x_t), self._lookup(1, tt, x_t)
            return (x_t.to(s.dtype) + (s_to - s) * model_output.to(s.dtype)).to(x_t.dtype)
        x0, eps = self._x0_eps(model_output, x_t, tt, pt)
        out = self._lookup(0, tto, x_t) * x0 + self._lookup(1, tto, x_t) * eps
        return out.to(x_t.dtype)
