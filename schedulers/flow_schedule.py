"""Rectified-flow (flow-matching) schedules: shifted sigma tables, diffusers' config, sampling grids.

A rectified-flow model (SD3 / SD3.5, FLUX, Qwen-Image, Wan) noises along the straight path

.. math:: x_\\sigma = (1 - \\sigma) x_0 + \\sigma \\epsilon, \\qquad \\sigma \\in [0, 1],

and predicts the velocity :math:`v = \\epsilon - x_0` (Esser et al. 2024, "Scaling Rectified Flow
Transformers", Sec. 2-3). The noise levels are *shifted* towards noise: SD3 uses a fixed shift
:math:`s` (Sec. 5.3.2: :math:`\\sigma \\mapsto s\\sigma / (1 + (s-1)\\sigma)`), FLUX a shift that depends on the
image's token count through :math:`\\mu` (:math:`\\sigma \\mapsto e^\\mu / (e^\\mu + 1/\\sigma - 1)`).

This module holds what is specific to the flow family; :class:`~diffdistill.schedulers.NoiseSchedule`
(``kind == "flow"``) holds the table and every conversion.

**Index convention** (checked against diffusers' ``FlowMatchEulerDiscreteScheduler``, 0.42.1): diffusers'
training table lists ``timesteps = [T, T-1, ..., 1]`` (descending) and ``sigmas = shift(timesteps / T)``.
Our integer index ``t`` (``0 .. T-1``, ascending in noise) holds the sigma diffusers assigns to the unshifted
timestep value ``t + 1``, i.e. ``schedule.sigma(t) == scheduler.sigmas[T - 1 - t]``; ``t = T-1`` is
:math:`\\sigma = 1` (pure noise) and ``t = -1`` the clean end :math:`\\sigma = 0` (diffusers' appended
final sigma). The network is fed ``sigma * 1000`` (diffusers' ``timesteps``), not ``t``:
:meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_finite,
    check_int,
    check_option,
    check_real,
)

if TYPE_CHECKING:
    from .noise_schedule import NoiseSchedule

__all__ = [
    "MULTISTEP_GRIDS",
    "TIME_SHIFT_TYPES",
    "FlowMatchingConfig",
    "FlowSigmaGrid",
    "flow_sigma_grid",
    "packed_image_seq_len",
    "resolution_mu",
    "shift_sigmas",
]

TIME_SHIFT_TYPES: tuple[str, ...] = ("exponential", "linear")

MULTISTEP_GRIDS: tuple[str, ...] = ("unipc", "dpmsolver")
"""The default-grid recipes of diffusers' multistep solvers with ``use_flow_sigmas=True`` (Wan's scheduler)
that :func:`flow_sigma_grid` reproduces: ``UniPCMultistepScheduler`` and ``DPMSolverMultistepScheduler``."""

# diffusers' multistep schedulers whose `use_flow_sigmas` grids are reproduced, by class name.
_MULTISTEP_CLASSES = {
    "UniPCMultistepScheduler": "unipc",
    "DPMSolverMultistepScheduler": "dpmsolver",
}

# diffusers' config keys that change the sampling grid in ways this module does not reproduce.
_REFUSED_GRID_OPTIONS = {
    "use_karras_sigmas": "Karras sigmas",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
}


def resolution_mu(
    image_seq_len: int | float,
    base_image_seq_len: int | float = 256,
    max_image_seq_len: int | float = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift :math:`\\mu`, linear in the image token count (unclamped).

    .. math:: \\mu = b_0 + (L - L_0)\\,(b_1 - b_0) / (L_1 - L_0),

    as diffusers' ``calculate_shift`` in ``pipelines/flux/pipeline_flux.py`` (same operations, so the same
    float), with FLUX.1's defaults (``base_shift`` 0.5, ``max_shift`` 1.15 over 256 .. 4096 tokens; the
    SD3 pipeline falls back to ``max_shift`` 1.16, Qwen-Image uses 0.5 / 0.9 over 256 .. 8192: pass the
    scheduler config's values, as :meth:`NoiseSchedule.from_scheduler` does).

    Args:
        image_seq_len: ``L``, the number of image tokens the transformer sees (see
            :func:`packed_image_seq_len`), > 0.
        base_image_seq_len: ``L_0`` (config ``base_image_seq_len``).
        max_image_seq_len: ``L_1`` (config ``max_image_seq_len``), different from ``L_0``.
        base_shift: :math:`b_0`, the :math:`\\mu` at ``L_0`` (config ``base_shift``).
        max_shift: :math:`b_1`, the :math:`\\mu` at ``L_1`` (config ``max_shift``).

    Returns:
        :math:`\\mu` as a float.

    Raises:
        DTypeError: if an argument is not a real number.
        OptionError: if an argument is not finite, ``image_seq_len <= 0`` or ``L_0 == L_1``.

    Example:
        >>> round(resolution_mu(packed_image_seq_len(1024, 1024)), 6)  # FLUX.1 at 1024^2: 4096 tokens
        1.15
    """
    length = check_real(image_seq_len, "image_seq_len", low=0, strict=True)
    base_len = check_real(base_image_seq_len, "base_image_seq_len")
    max_len = check_real(max_image_seq_len, "max_image_seq_len")
    b0 = check_real(base_shift, "base_shift")
    b1 = check_real(max_shift, "max_shift")
    if base_len == max_len:
        raise OptionError(
            f"Expected `base_image_seq_len` and `max_image_seq_len` to differ (mu is interpolated between them), "
            f"but both are {base_image_seq_len!r}."
        )
    slope = (b1 - b0) / (max_len - base_len)
    intercept = b0 - slope * base_len
    return length * slope + intercept


def packed_image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """The image token count of a FLUX-style transformer at a pixel resolution.

    ``(height // (vae_scale_factor * patch_size)) * (width // (vae_scale_factor * patch_size))``: the VAE
    downsamples by ``vae_scale_factor`` and the transformer packs ``patch_size x patch_size`` latent pixels
    into one token (FLUX.1: 8 and 2, so 1024x1024 gives 4096 tokens, as ``FluxPipeline`` reads from
    ``latents.shape[1]``).

    Args:
        height: image height in pixels, a multiple of ``vae_scale_factor * patch_size``.
        width: image width in pixels, a multiple of ``vae_scale_factor * patch_size``.
        vae_scale_factor: the VAE's spatial downsampling factor (8 for FLUX.1 / SD3).
        patch_size: the transformer's patch size in latent pixels (2 for FLUX.1 / SD3).

    Returns:
        The number of image tokens.

    Raises:
        DTypeError: if an argument is not an int.
        OptionError: if an argument is < 1, or a side is not a multiple of ``vae_scale_factor * patch_size``.

    Example:
        >>> packed_image_seq_len(512, 768)
        1536
    """
    h = check_int(height, "height", minimum=1)
    w = check_int(width, "width", minimum=1)
    f = check_int(vae_scale_factor, "vae_scale_factor", minimum=1)
    p = check_int(patch_size, "patch_size", minimum=1)
    for name, side in (("height", h), ("width", w)):
        if side % (f * p):
            raise OptionError(
                f"Expected `{name}` to be a multiple of vae_scale_factor * patch_size = {f * p}, but got {side}. "
                "Round the resolution as the pipeline does (FLUX: to a multiple of 16 pixels)."
            )
    return (h // (f * p)) * (w // (f * p))


def _as_sigmas(sigmas: Any, name: str) -> torch.Tensor:
    """A real 1-D-or-any-shape float64 CPU-or-same-device tensor of values in [0, 1] (checked)."""
    if isinstance(sigmas, torch.Tensor) and (sigmas.dtype == torch.bool or sigmas.is_complex()):
        raise DTypeError(f"Expected `{name}` to be real, but got dtype {sigmas.dtype}.")
    try:
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DTypeError(
            f"Expected `{name}` to be a number, a sequence of numbers or a tensor of flow sigmas in [0, 1], "
            f"but got {type(sigmas).__name__}."
        ) from err
    check_finite(sig, name)
    if sig.numel() and not bool(((sig >= 0) & (sig <= 1)).all()):
        raise OptionError(
            f"Expected `{name}` to lie in [0, 1] (flow noise levels; 1 is pure noise), but got range "
            f"[{float(sig.min())!r}, {float(sig.max())!r}]. Diffusers' `timesteps` are sigma * 1000: divide them."
        )
    return sig


def shift_sigmas(
    sigmas: torch.Tensor | Sequence[float] | float,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
) -> torch.Tensor:
    """Shift flow noise levels towards noise, as diffusers' flow schedulers do (float64).

    Static (``mu=None``, SD3; Esser et al. 2024, Sec. 5.3.2):
    :math:`\\sigma' = s\\sigma / (1 + (s-1)\\sigma)`. Dynamic (``mu`` given, FLUX), ``"exponential"``:
    :math:`\\sigma' = e^\\mu / (e^\\mu + 1/\\sigma - 1)` (equal to the static shift with :math:`s = e^\\mu`);
    ``"linear"`` (CogView4): :math:`\\sigma' = \\mu / (\\mu + 1/\\sigma - 1)`. Every map fixes 0 and 1 and
    is increasing. The operations are diffusers' own, so float64 inputs give diffusers' float64 results.

    Args:
        sigmas: noise levels in ``[0, 1]``: a number, a sequence or a tensor of any shape.
        shift: the static shift ``s > 0`` (ignored when ``mu`` is given; must then be 1).
        mu: the dynamic shift :math:`\\mu` (``"exponential"``: any real; ``"linear"``: > 0), or None.
        time_shift_type: ``"exponential"`` (the default, FLUX) or ``"linear"``; used only with ``mu``.

    Returns:
        float64 tensor of the shape of ``sigmas`` (on its device).

    Raises:
        DTypeError: if ``sigmas`` is not numeric or ``shift`` / ``mu`` not a real number.
        NonFiniteError: if ``sigmas`` holds NaN / Inf (a value check).
        OptionError: if a sigma is outside ``[0, 1]``, ``shift <= 0``, ``time_shift_type`` is unknown, a
            linear ``mu`` is ``<= 0``, or both a ``shift`` other than 1 and ``mu`` are given.

    Example:
        >>> shift_sigmas([0.0, 0.5, 1.0], shift=3.0).tolist()
        [0.0, 0.75, 1.0]
        >>> torch.allclose(shift_sigmas(0.3, mu=math.log(3.0)), shift_sigmas(0.3, shift=3.0))
        True
    """
    sig = _as_sigmas(sigmas, "sigmas")
    s, m, kind = _check_shift(shift, mu, time_shift_type)
    return _shift(sig, s, m, kind)


def _check_shift(shift: Any, mu: Any, time_shift_type: Any) -> tuple[float, float | None, str]:
    s = check_real(shift, "shift", low=0, strict=True)
    check_option(time_shift_type, "time_shift_type", TIME_SHIFT_TYPES)
    if mu is None:
        return s, None, time_shift_type
    m = check_real(mu, "mu")
    if s != 1.0:
        raise OptionError(
            f"Expected either a static `shift` or a dynamic `mu`, but got shift={shift!r} and mu={mu!r}. diffusers "
            "ignores `shift` under use_dynamic_shifting; pass only mu (exponential mu = log(shift) is the same map)."
        )
    if time_shift_type == "linear" and m <= 0:
        raise OptionError(f"Expected `mu` > 0 for time_shift_type='linear', but got {mu!r}.")
    return s, m, time_shift_type


def _shift(sig: torch.Tensor, shift: float, mu: float | None, time_shift_type: str) -> torch.Tensor:
    """The shift on checked float64 sigmas, with diffusers' operation order (bit-equal in float64)."""
    if mu is None:
        return shift * sig / (1 + (shift - 1) * sig)
    c = math.exp(mu) if time_shift_type == "exponential" else mu
    return c / (c + (1 / sig - 1))


@dataclass(frozen=True)
class FlowMatchingConfig:
    """How a rectified-flow table is built and shifted: the schedule-defining part of diffusers' config.

    Mirrors ``FlowMatchEulerDiscreteScheduler``'s config: a static ``shift`` (SD3: 3.0, FLUX.1-schnell: 1.0)
    or, with ``use_dynamic_shifting``, the resolution's ``mu`` (from :func:`resolution_mu`, or CogView4's formula
    for a linear time shift, and the base/max values kept here, so another resolution's ``mu`` can be
    recomputed with :meth:`mu_for`).
    ``shift_terminal`` only changes sampling grids (as in diffusers), never the training table.

    Args:
        num_train_timesteps: ``T`` (1000 for every released flow model), >= 2.
        shift: the static shift, > 0 (must be 1.0 when ``mu`` is given).
        mu: the dynamic shift of the training table and of default sampling grids, or None (static).
        time_shift_type: ``"exponential"`` (FLUX, Qwen-Image) or ``"linear"`` (CogView4).
        shift_terminal: diffusers' ``shift_terminal`` (Qwen-Image: 0.02): sampling grids are stretched so that
            their last non-zero sigma equals it; None (the default) leaves them. In (0, 1).
        base_shift: ``mu`` at ``base_image_seq_len`` tokens (for :meth:`mu_for`).
        max_shift: ``mu`` at ``max_image_seq_len`` tokens (for :meth:`mu_for`).
        base_image_seq_len: token count of ``base_shift``.
        max_image_seq_len: token count of ``max_shift``.
        multistep_grid: None (the default) for ``FlowMatchEulerDiscreteScheduler``'s default sampling grids, or
            ``"unipc"`` / ``"dpmsolver"`` (:data:`MULTISTEP_GRIDS`) for those of diffusers' multistep solvers
            with ``use_flow_sigmas=True`` (Wan 2.1 / 2.2 ship ``UniPCMultistepScheduler`` with
            ``flow_shift``): only :func:`flow_sigma_grid` reads it, never the training table.

    Raises:
        DTypeError: if a field has the wrong type.
        OptionError: if a field is out of range, or both a ``shift`` other than 1 and ``mu`` are set, or
            ``multistep_grid`` is not one of :data:`MULTISTEP_GRIDS` (or None).

    Example:
        >>> cfg = FlowMatchingConfig(mu=resolution_mu(4096))
        >>> cfg.dynamic, round(cfg.mu_for(1024), 4)
        (True, 0.63)
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    mu: float | None = None
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    multistep_grid: str | None = None

    def __post_init__(self) -> None:
        # Normalise config numbers (JSON configs hold 1000.0 or ints where floats are meant).
        n = check_int(self.num_train_timesteps, "num_train_timesteps", minimum=2, integral_float=True)
        shift, mu, _ = _check_shift(self.shift, self.mu, self.time_shift_type)
        object.__setattr__(self, "num_train_timesteps", n)
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "mu", mu)
        if self.shift_terminal is not None:
            terminal = check_real(
                self.shift_terminal, "shift_terminal", low=0, high=1, strict=True, high_strict=True
            )
            object.__setattr__(self, "shift_terminal", terminal)
        for name in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
            check_real(getattr(self, name), name)
        if self.multistep_grid is not None:
            check_option(self.multistep_grid, "multistep_grid", MULTISTEP_GRIDS)

    @property
    def dynamic(self) -> bool:
        """Whether the shift is diffusers' resolution-dependent one (``mu`` set)."""
        return self.mu is not None

    def mu_for(self, image_seq_len: int | float) -> float:
        """The resolution's :math:`\\mu` with this config's base / max values, by the formula of the pipeline that
        goes with its ``time_shift_type``.

        * ``"exponential"`` (FLUX, Qwen-Image, SD3 with dynamic shifting): :func:`resolution_mu`, the linear
          interpolation of ``FluxPipeline``'s ``calculate_shift``.
        * ``"linear"`` (CogView4, the only diffusers pipeline with a linear time shift):
          ``CogView4Pipeline``'s ``calculate_shift`` (diffusers 0.42.1),
          :math:`\\mu = \\sqrt{L / L_0}\\, b_1 + b_0` with ``L_0 = base_image_seq_len``, ``b_1 = max_shift``,
          ``b_0 = base_shift`` (the same float operations; ``max_image_seq_len`` unused).

        Args:
            image_seq_len: the image token count (:func:`packed_image_seq_len`), > 0.

        Returns:
            :math:`\\mu` for that token count.

        Raises:
            DTypeError: as :func:`resolution_mu`.
            OptionError: as :func:`resolution_mu`; linear: ``image_seq_len`` or ``base_image_seq_len`` <= 0.

        Example:
            >>> cogview4 = FlowMatchingConfig(mu=1.0, time_shift_type="linear", base_shift=0.25, max_shift=0.75)
            >>> cogview4.mu_for(4096)  # 1024^2 px: sqrt(4096 / 256) * 0.75 + 0.25
            3.25
        """
        if self.time_shift_type == "linear":
            length = check_real(image_seq_len, "image_seq_len", low=0, strict=True)
            base_len = check_real(self.base_image_seq_len, "base_image_seq_len", low=0, strict=True)
            return (length / base_len) ** 0.5 * float(self.max_shift) + float(self.base_shift)
        return resolution_mu(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )

    def training_sigmas(self) -> torch.Tensor:
        """The training table :math:`\\sigma_t`, ``t = 0 .. T-1`` (ascending), float64 holding float32 values.

        Static shift: exactly diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s).sigmas`` reversed (the same
        float32 operations). Dynamic: exactly the grid of diffusers' ``set_timesteps(T, mu=mu)`` reversed
        (:func:`shift_sigmas` of ``numpy.linspace(T, T * float32(1/T), T) / T``, i.e. of ``(t + 1) / T`` up to
        4.7e-8, in float64, rounded to float32), so that diffusers' default grids with ``(T-1)/(N-1)``
        integral land on the table exactly. diffusers' own table is then unshifted (its grids shift on the
        fly); ``mu=0.0``, exponential, gives that unshifted grid.

        Returns:
            float64 tensor ``(T,)``, non-decreasing, last value 1.0.
        """
        n = int(self.num_train_timesteps)
        base = torch.arange(1, n + 1, dtype=torch.float32) / n
        if self.mu is None:
            return (self.shift * base / (1 + (self.shift - 1) * base)).double()
        grid = (
            _np_linspace(1.0 * n, float(base[0]) * n, n) / n
        )  # diffusers' set_timesteps(T) before the shift
        return _shift(grid, 1.0, float(self.mu), self.time_shift_type).float().double().flip(0)

    def diffusers_table_sigmas(self) -> torch.Tensor:
        """diffusers' own training table (float32 values, ascending): shifted if static, unshifted if dynamic.

        Its first and last values are diffusers' ``sigma_min`` / ``sigma_max``, the ends of default grids.

        Returns:
            float64 tensor ``(T,)``.
        """
        n = int(self.num_train_timesteps)
        base = torch.arange(1, n + 1, dtype=torch.float32) / n
        if self.mu is None:
            base = self.shift * base / (1 + (self.shift - 1) * base)
        return base.double()

    @classmethod
    def from_diffusers_config(
        cls,
        config: Any,
        *,
        mu: float | None = None,
        image_seq_len: int | float | None = None,
        scheduler_class: str | None = None,
    ) -> FlowMatchingConfig:
        """Parse a diffusers flow-matching scheduler config (``FlowMatchEulerDiscreteScheduler``,
        ``FlowMatchLCMScheduler``, ``FlowMatchHeunDiscreteScheduler``, or a ``UniPCMultistepScheduler`` /
        ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas=True`` as Wan ships it), duck-typed.

        ``use_flow_sigmas=True`` (diffusers 0.42.1's multistep solvers on a flow model): the solver's
        ``flow_shift`` is the static shift (Wan 2.1 T2V: 3.0; its ``shift`` key does not exist), the training
        table is the same shifted table as ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (our choice:
        diffusers' multistep schedulers keep no flow training table, their ``sigmas`` before ``set_timesteps``
        are the unused VP betas table, and their default grids shift the same map
        :math:`s \\mapsto \\text{shift}\\, s / (1 + (\\text{shift} - 1) s)` of points in ``(0, 1]``), and
        :attr:`multistep_grid` records which solver's default grids :func:`flow_sigma_grid` reproduces.
        Refused there: ``final_sigmas_type="sigma_min"`` (the grid would not end at the clean end), a solver
        other than UniPC / DPM-Solver multistep, and ``prediction_type`` other than ``"flow_prediction"`` is
        refused by :meth:`~diffdistill.schedulers.NoiseSchedule.from_scheduler`.

        Supported: ``num_train_timesteps``, ``shift``, ``use_dynamic_shifting`` (with the resolution's ``mu``,
        or ``image_seq_len`` to compute it with the config's ``base_shift`` / ``max_shift`` /
        ``base_image_seq_len`` / ``max_image_seq_len`` as FLUX's pipeline does, or with
        ``time_shift_type="linear"`` as CogView4's does: :meth:`mu_for`), ``time_shift_type`` and
        ``shift_terminal``. Refused with an error: ``invert_sigmas`` (Mochi) and Karras / exponential / beta
        sigmas (they change only diffusers' grids: pass the grid's sigmas yourself). Ignored (sampler settings,
        not the schedule): ``stochastic_sampling`` (use an x0 re-noise sampler), ``scale_factors`` /
        ``upscale_mode`` (FlowMatchLCM's scale-wise generation).

        Args:
            config: a mapping or an object with the config's attributes (a scheduler's ``config``).
            mu: the resolution's :math:`\\mu` (dynamic shifting only).
            image_seq_len: the image token count to compute ``mu`` from (dynamic shifting only; not with ``mu``):
                :meth:`mu_for`, FLUX's formula, or CogView4's with ``time_shift_type="linear"``.
            scheduler_class: the scheduler's class name, read for ``use_flow_sigmas`` configs (default: the
                config's ``_class_name``, as diffusers stores it).

        Returns:
            The config.

        Raises:
            DTypeError: if a value has the wrong type.
            OptionError: if dynamic shifting lacks ``mu`` / ``image_seq_len`` (or has both), a static config is
                given one, or the config asks for an unsupported option.
        """

        def get(name: str, default: Any) -> Any:
            value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
            return default if value is None else value

        for key, what in _REFUSED_GRID_OPTIONS.items():
            if get(key, False):
                raise OptionError(
                    f"The scheduler config sets `{key}=True` ({what}), which only changes diffusers' sampling "
                    "grids and is not reproduced here. Build the schedule from a config without it and pass the "
                    "grid's sigmas explicitly: flow_sigma_grid(schedule, sigmas=scheduler.sigmas[:-1])."
                )
        if get("invert_sigmas", False):
            raise OptionError(
                "The scheduler config sets `invert_sigmas=True` (Mochi: sigma runs from 0 to 1 while sampling), "
                "which is not supported. Use a config with invert_sigmas=False."
            )
        multistep = _multistep_grid(config, get, scheduler_class)
        dynamic = bool(get("use_dynamic_shifting", False))
        if (mu is not None or image_seq_len is not None) and not dynamic:
            raise OptionError(
                "`mu` / `image_seq_len` apply only to a scheduler with use_dynamic_shifting=True, but this config "
                f"uses a static shift ({get('shift', 1.0)!r}). Drop them."
            )
        if dynamic and (mu is None) == (image_seq_len is None):
            raise OptionError(
                "This scheduler uses use_dynamic_shifting=True: pass exactly one of `mu=` (the resolution's "
                "shift) or `image_seq_len=` (the image token count, e.g. packed_image_seq_len(1024, 1024)), "
                f"but got mu={mu!r} and image_seq_len={image_seq_len!r}. mu=0.0 gives diffusers' unshifted "
                "training table."
            )
        kwargs = {
            "num_train_timesteps": get("num_train_timesteps", 1000),
            "time_shift_type": get("time_shift_type", "exponential"),
            "shift_terminal": get("shift_terminal", None) or None,
            "base_shift": get("base_shift", 0.5),
            "max_shift": get("max_shift", 1.15),
            "base_image_seq_len": get("base_image_seq_len", 256),
            "max_image_seq_len": get("max_image_seq_len", 4096),
            "multistep_grid": multistep,
        }
        if not dynamic:
            shift = get("flow_shift", 1.0) if multistep is not None else get("shift", 1.0)
            return cls(shift=shift, **kwargs)
        if mu is None:
            mu = cls(**kwargs).mu_for(image_seq_len)  # type: ignore[arg-type]
        return cls(mu=mu, **kwargs)


def _multistep_grid(config: Any, get: Any, scheduler_class: str | None) -> str | None:
    """The :data:`MULTISTEP_GRIDS` entry of a ``use_flow_sigmas`` config (None without it), with its refusals."""
    if not get("use_flow_sigmas", False):
        return None
    name = scheduler_class or get("_class_name", None)
    grid = _MULTISTEP_CLASSES.get(str(name))
    if grid is None:
        what = (
            repr(name)
            if name is not None
            else "a scheduler of unknown class (no `_class_name` in its config)"
        )
        raise OptionError(
            f"The scheduler config sets `use_flow_sigmas=True` on {what}, whose sampling grids are not reproduced "
            f"here (supported: {sorted(_MULTISTEP_CLASSES)}). Build the schedule with "
            "NoiseSchedule.flow_matching(shift=<its flow_shift>) and pass the grid's own sigmas: "
            "NoiseSchedule.from_flow_sigmas(scheduler.sigmas[:-1].flip(0))."
        )
    final = get("final_sigmas_type", "zero")
    if final != "zero":
        raise OptionError(
            f"The scheduler config sets `final_sigmas_type={final!r}`: its grids end at the last sigma instead of "
            "the clean end 0, which the samplers here do not reproduce. Use final_sigmas_type='zero' (Wan's)."
        )
    if (
        grid == "dpmsolver"
        and get("use_dynamic_shifting", False)
        and get("time_shift_type", "exponential") != ("exponential")
    ):
        raise OptionError(
            "DPMSolverMultistepScheduler's dynamic shifting supports only time_shift_type='exponential' "
            "(flow_shift = exp(mu)); got a linear one."
        )
    return grid


@dataclass(frozen=True)
class FlowSigmaGrid:
    """A sampling grid of a flow schedule and where it falls on the schedule's integer table (built by
    :func:`flow_sigma_grid`, not by the caller).

    Args:
        sigmas: float64 ``(N + 1,)``, descending, the last value 0 (diffusers' ``scheduler.sigmas``).
        timesteps: float64 ``(N,)``, ``sigmas[:-1] * T`` (diffusers' ``scheduler.timesteps``).
        indices: int64 ``(N + 1,)``, the nearest table index of each sigma (``-1`` for the final 0).
        exact: bool ``(N + 1,)``, whether that table sigma equals the grid's after rounding both to float32.
        schedule: the training schedule the grid was built for.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    indices: torch.Tensor
    exact: torch.Tensor
    schedule: NoiseSchedule

    @property
    def num_inference_steps(self) -> int:
        """``N``, the number of model evaluations."""
        return int(self.timesteps.numel())

    @property
    def on_table(self) -> bool:
        """Whether every grid sigma lies on the integer table (then ``indices`` is the exact grid)."""
        return bool(self.exact.all())

    def grid_schedule(self, **kwargs: Any) -> NoiseSchedule:
        """A flow :class:`NoiseSchedule` whose table *is* this grid, for off-table grids.

        Index ``i`` (``0 .. N-1``) holds ``sigmas[N - 1 - i]``, so stepping ``N-1 -> N-2 -> ... -> 0 -> -1`` with
        :meth:`NoiseSchedule.ddim_step` walks the grid (diffusers' Euler ``step``), and
        :meth:`NoiseSchedule.model_timestep` gives the network its ``sigma * timestep_scale`` unchanged.

        Args:
            **kwargs: keyword arguments of :class:`NoiseSchedule` (default: the training schedule's
                ``prediction_type``, ``compute_dtype`` and ``timestep_scale``).

        A one-step grid gets an unused second entry, sigma 1 (a table holds at least two values; the walk is
        ``0 -> -1``), so a single off-table sigma (Wan's 1-step UniPC grid, a custom ``sigmas=[s]``) samples too.

        Returns:
            The grid schedule (``T = N``; ``T = 2`` for one step).

        Raises:
            OptionError: as :class:`NoiseSchedule` (e.g. a grid with a zero sigma before its end).
        """
        base = self.schedule
        kwargs.setdefault("prediction_type", base.prediction_type)
        kwargs.setdefault("compute_dtype", base.compute_dtype)
        kwargs.setdefault("timestep_scale", base.timestep_scale)
        table = self.sigmas[:-1].flip(0)
        if table.numel() == 1:  # never read: the one step runs at index 0
            table = torch.cat([table, table.new_ones(1)])
        return type(base).from_flow_sigmas(table, **kwargs)


def _np_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` with numpy's own float64 operations (bit-equal)."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def flow_sigma_grid(
    schedule: NoiseSchedule,
    num_inference_steps: int | None = None,
    *,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    mu: float | None = None,
) -> FlowSigmaGrid:
    """The sigma grid diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds, in float64.

    Steps, as diffusers (0.42.1): (1) ``sigmas`` if given, else ``numpy.linspace(sigma_max * T, sigma_min * T,
    N) / T`` over diffusers' own table (static shift: its shifted ends, so SD3's default grid is shifted twice
    at the low end; dynamic: the unshifted ``1 .. 1/T``); (2) the shift (static ``shift`` or ``mu``),
    applied to custom ``sigmas`` too (FLUX's pipeline passes ``linspace(1, 1/N, N)``); (3) the
    ``shift_terminal`` stretch :math:`\\sigma \\leftarrow 1 - (1 - \\sigma)(1 - s_T)/(1 - \\sigma_{N-1})`;
    (4) a final 0. diffusers rounds the result to float32; this keeps float64 (default grids:
    ``grid.sigmas.float()`` equals diffusers' bit for bit; custom ``sigmas``, which diffusers shifts in float32
    arithmetic, agree to float32 rounding).

    A schedule read from a multistep solver with ``use_flow_sigmas=True`` (``flow_config.multistep_grid``, Wan's
    ``UniPCMultistepScheduler``) gets that solver's grid instead, as diffusers 0.42.1 builds it in float64
    before its float32 cast: UniPC: ``s = numpy.linspace(1, 1/T, N + 1)[:-1]`` (or the custom ``sigmas``), the
    static shift (or ``mu``), the ``shift_terminal`` stretch, then a first sigma within 1e-6 of 1 is lowered
    by 1e-6 (diffusers avoids :math:`\\log 0` in its first UniPC update); DPM-Solver multistep: ``s = (1 -
    1/T) k / N``, ``k = N .. 1``, shifted (custom ``sigmas`` refused: its flow branch ignores them). Both solvers
    hand the network ``int64(sigma * T)`` (truncated; ``grid.timesteps`` keeps the float64 product) and take
    their own multistep updates: the samplers here walk the same sigmas with Euler / DDIM / LCM steps, so they
    reproduce diffusers' grid and model inputs, not the UniPC update.

    Each sigma is placed on the integer table: ``indices`` is the nearest ``t`` (``-1`` for the final 0) and
    ``exact`` says whether it lies on it. Default grids (``set_timesteps(N)`` without ``sigmas``) of a
    dynamic-shift schedule are exact whenever ``(T - 1) / (N - 1)`` is an integer (28 steps: 999 / 27 = 37);
    shifted static grids (SD3) and custom grids mostly are not: the samplers walk those on
    :meth:`FlowSigmaGrid.grid_schedule`. Note that ``FluxPipeline`` does not sample on the default grid: it
    passes ``sigmas = linspace(1, 1/N, N)``, i.e. :func:`~diffdistill.schedulers.flow_pipeline_grid`
    ``(schedule, N, "flux")``, which is off the table at 28 steps and ends at sigma 0.105 (1024 px) instead of
    the default grid's 0.003.

    Args:
        schedule: a flow :class:`~diffdistill.schedulers.NoiseSchedule` (from :meth:`NoiseSchedule.flow_matching`
            or :meth:`NoiseSchedule.from_scheduler`; a plain sigma table counts as static shift 1).
        num_inference_steps: ``N`` >= 1; optional when ``sigmas`` is given (then it must equal its length).
        sigmas: custom grid of ``N`` sigmas in ``(0, 1]``, strictly decreasing, *before* the shift, or None.
        mu: the dynamic shift for this grid (default: the schedule's ``mu``); only for dynamic schedules.

    Returns:
        The :class:`FlowSigmaGrid`.

    Raises:
        DTypeError: if ``schedule`` is not a flow schedule, ``num_inference_steps`` not an int, ``sigmas`` not
            numeric or ``mu`` not a number.
        ShapeError: if ``sigmas`` is not 1-D or its length differs from ``num_inference_steps``.
        NonFiniteError: if ``sigmas`` holds NaN / Inf (a value check).
        OptionError: if neither ``num_inference_steps`` nor ``sigmas`` is given, a sigma is outside (0, 1] or
            ``sigmas`` is not strictly decreasing,
            ``mu`` is given for a static schedule, ``shift_terminal`` meets a grid whose last sigma is 1, or
            custom ``sigmas`` meet a DPM-Solver multistep schedule.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> flux = NoiseSchedule.flow_matching(mu=resolution_mu(4096))  # FLUX.1 at 1024^2
        >>> grid = flow_sigma_grid(flux, 28)  # set_timesteps(28)'s default grid (not FluxPipeline's)
        >>> grid.on_table, grid.indices[:3].tolist()
        (True, [999, 962, 925])
        >>> [round(s, 3) for s in flow_sigma_grid(flux, sigmas=[1.0, 0.75, 0.5, 0.25]).sigmas.tolist()]
        [1.0, 0.905, 0.76, 0.513, 0.0]
    """
    if getattr(schedule, "kind", None) != "flow":
        raise DTypeError(
            f"Expected `schedule` to be a flow NoiseSchedule (kind='flow'), but got {type(schedule).__name__} "
            f"of kind {getattr(schedule, 'kind', None)!r}. Build one with NoiseSchedule.flow_matching(...) or "
            "NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(...))."
        )
    cfg = schedule.flow_config or FlowMatchingConfig(num_train_timesteps=schedule.num_train_timesteps)
    return _flow_sigma_grid(schedule, cfg, num_inference_steps, sigmas, mu, cfg.multistep_grid)


def _flow_sigma_grid(
    schedule: NoiseSchedule,
    cfg: FlowMatchingConfig,
    num_inference_steps: int | None,
    sigmas: Any,
    mu: float | None,
    multistep: str | None,
) -> FlowSigmaGrid:
    """:func:`flow_sigma_grid` with the grid recipe chosen by the caller (None: FlowMatchEuler's)."""
    if mu is not None and not cfg.dynamic:
        raise OptionError(
            f"`mu` applies only to a dynamic-shift schedule, but this schedule uses the static shift {cfg.shift!r}. "
            "Drop `mu`."
        )
    grid_mu = (cfg.mu if mu is None else check_real(mu, "mu")) if cfg.dynamic else None
    n_train = int(cfg.num_train_timesteps)
    if sigmas is not None and multistep == "dpmsolver":
        raise OptionError(
            "DPMSolverMultistepScheduler's flow grids take no custom sigmas (diffusers ignores them there); pass "
            "num_inference_steps only, or build the schedule from a UniPC / FlowMatchEuler config."
        )
    if sigmas is None:
        if num_inference_steps is None:
            raise OptionError("Expected `num_inference_steps` or `sigmas`, but got neither.")
        n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
        if multistep is not None:
            return _multistep_flow_grid(schedule, cfg, n, None, grid_mu, multistep)
        if schedule.flow_config is None:
            table = schedule.sigma(torch.arange(schedule.num_train_timesteps))
        else:
            table = cfg.diffusers_table_sigmas()
        sig = _np_linspace(float(table[-1]) * n_train, float(table[0]) * n_train, n) / n_train
    else:
        sig = _as_sigmas(sigmas, "sigmas")
        if sig.ndim != 1 or sig.numel() == 0:
            raise ShapeError(
                f"Expected `sigmas` to be a non-empty 1-D grid, but got shape {tuple(sig.shape)}.",
                name="sigmas",
                expected="(N,)",
                actual=tuple(sig.shape),
            )
        if num_inference_steps is not None:
            n = check_int(num_inference_steps, "num_inference_steps", minimum=1)
            if n != sig.numel():
                raise ShapeError(
                    f"Expected `sigmas` to hold num_inference_steps = {n} values, but got {sig.numel()}.",
                    name="sigmas",
                    expected=(n,),
                    actual=tuple(sig.shape),
                )
        if not bool((sig > 0).all()):
            raise OptionError(
                "Expected every grid sigma to be > 0 (the final 0 is appended for you), but got "
                f"{sig.tolist()!r}."
            )
        if sig.numel() > 1 and not bool((sig[1:] < sig[:-1]).all()):
            raise OptionError(
                "Expected `sigmas` to be strictly decreasing (the noisiest first, as diffusers' scheduler.sigmas "
                f"without the final 0, e.g. FluxPipeline's linspace(1, 1/N, N)), but got {sig.tolist()!r}. Pass "
                "them in descending order (sigmas.flip(0) for an ascending list), without repeats."
            )
        if multistep is not None:
            return _multistep_flow_grid(schedule, cfg, sig.numel(), sig, grid_mu, multistep)
    sig = _shift(sig.cpu(), cfg.shift, grid_mu, cfg.time_shift_type)
    sig = _stretch_to_terminal(sig, cfg)
    return _finish_grid(schedule, sig, n_train)


def _stretch_to_terminal(sig: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """diffusers' ``stretch_shift_to_terminal`` (no-op without ``shift_terminal``)."""
    if cfg.shift_terminal is None:
        return sig
    if float(sig[-1]) == 1.0:
        raise OptionError(
            f"shift_terminal={cfg.shift_terminal!r} cannot stretch a grid whose last sigma is 1 (diffusers "
            "returns NaN here): use at least 2 steps, or a schedule without shift_terminal."
        )
    one_minus = 1 - sig
    return 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))


def _finish_grid(schedule: NoiseSchedule, sig: torch.Tensor, n_train: int) -> FlowSigmaGrid:
    """Append the clean end and place every sigma on the integer table."""
    full = torch.cat([sig, sig.new_zeros(1)])
    indices = schedule.sigma_to_timestep(full)
    table = schedule.sigma(indices)
    exact = table.float() == full.float()
    return FlowSigmaGrid(full, sig * n_train, indices, exact, schedule)


def _multistep_flow_grid(
    schedule: NoiseSchedule,
    cfg: FlowMatchingConfig,
    n: int,
    sigmas: torch.Tensor | None,
    mu: float | None,
    multistep: str,
) -> FlowSigmaGrid:
    """The ``use_flow_sigmas`` grid of diffusers' UniPC / DPM-Solver multistep ``set_timesteps`` (0.42.1)."""
    n_train = int(cfg.num_train_timesteps)
    if multistep == "dpmsolver":
        # alphas = linspace(1, 1/T, N+1); sigmas = flip(shift(1 - alphas))[:-1]; mu: flow_shift = exp(mu).
        shift = cfg.shift if mu is None else math.exp(mu)
        base = 1.0 - _np_linspace(1.0, 1.0 / n_train, n + 1)
        sig = _shift(base, shift, None, "exponential").flip(0)[:-1]
        return _finish_grid(schedule, sig, n_train)
    base = _np_linspace(1.0, 1.0 / n_train, n + 1)[:-1] if sigmas is None else sigmas.cpu()
    sig = _shift(base, cfg.shift, mu, cfg.time_shift_type)
    sig = _stretch_to_terminal(sig, cfg)
    if abs(float(sig[0]) - 1.0) < 1e-6:
        sig = sig.clone()
        sig[0] -= 1e-6
    return _finish_grid(schedule, sig, n_train)


def _pipeline_flow_grid(
    schedule: NoiseSchedule, n: int | None, sigmas: Any, mu: float | None, multistep: str | None
) -> FlowSigmaGrid:
    """A named solver's grid for any flow schedule, whatever its config's own grid recipe: ``multistep`` "unipc"
    (Wan's UniPC ``use_flow_sigmas``) or None (``FlowMatchEulerDiscreteScheduler``'s: SD3's and FLUX's
    pipelines, also on a schedule read from a multistep solver)."""
    if getattr(schedule, "kind", None) != "flow":
        raise DTypeError(
            f"Expected `schedule` to be a flow NoiseSchedule (kind='flow'), but got {type(schedule).__name__}."
        )
    cfg = schedule.flow_config or FlowMatchingConfig(num_train_timesteps=schedule.num_train_timesteps)
    return _flow_sigma_grid(schedule, cfg, n, sigmas, mu, multistep)
