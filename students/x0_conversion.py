"""Convert an epsilon- (or v-) prediction student into an x0-prediction one (SDXL-Lightning, Sec. 3.7).

SDXL-Lightning (Lin et al. 2024, arXiv:2402.13929, Eq. 29) copies the network and regresses the copy
onto the clean sample that the frozen original implies,

.. math:: \\mathcal L = \\lVert f_\\text{online}(x_t, t, c) - \\hat x_0(x_t, f_\\text{frozen}(x_t, t, c), t) \\rVert^2,

before the one-step adversarial stage, which then trains in x0 form (epsilon prediction leaves noise
artifacts at one step). The released one-step UNet is used with
``EulerDiscreteScheduler(timestep_spacing="trailing", prediction_type="sample")``. The loss itself is
:func:`diffdistill.losses.x0_conversion_loss`; :class:`X0Conversion` owns the frozen copy and draws
the training inputs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_all_finite,
    check_float_input,
    check_module,
    check_option,
    check_same_shape,
)
from .._modules import unwrap_model
from ..losses.consistency import x0_conversion_loss
from ..losses.distances import DISTANCES, DistanceLike
from ..schedulers.noise_schedule import NoiseSchedule

__all__ = ["X0Conversion"]

logger = logging.getLogger(__name__)


class X0Conversion(nn.Module):
    """An online copy being converted to x0 prediction, and the frozen original that defines its target.

    Args:
        model: The epsilon/v-prediction network ``model(x_t, t, **cond)``; it becomes :attr:`online` (trained
            in place; a DDP / compile wrapper is kept for the online copy and unwrapped for the frozen one).
        schedule: The noise schedule of ``model``.
        prediction_type: Parameterisation of ``model`` (``"epsilon"``, ``"v_prediction"``, ...). Defaults to
            ``None``: ``schedule.prediction_type``.
        distance: Distance of the regression: a :data:`~diffdistill.losses.DISTANCES` name or a callable
            (default MSE, Eq. 29).
        timesteps: The training timesteps drawn by :meth:`noisy_inputs`, integers in ``[0, T-1]``. Defaults
            to ``None``: all ``0 .. T-1`` (Lightning's one-step student uses ``(249, 499, 749, 999)``).

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``schedule`` is not a
            :class:`~diffdistill.schedulers.NoiseSchedule`; ``timesteps`` is not a list / tensor of integers;
            ``distance`` is neither a name nor a callable.
        OptionError: an unknown ``prediction_type`` or ``distance`` name; ``timesteps`` empty, not 1-D,
            fractional or outside ``[0, T-1]`` (``-1``, the clean end, has nothing to convert).

    :attr:`frozen` is a deep copy in eval mode with ``requires_grad=False`` (it stays in eval mode
    under ``.train()``); optimise ``conv.online.parameters()``. ``conv(x_t, t, cond)`` returns
    ``(loss, logs)``. After training, use :attr:`online` with ``prediction_type="sample"``.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> class Eps(torch.nn.Module):  # any (x_t, t, **cond) -> prediction network
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = torch.nn.Conv2d(4, 4, 1)
        ...     def forward(self, x, t):
        ...         return self.conv(x)
        >>> conv = X0Conversion(Eps(), NoiseSchedule.from_betas(), timesteps=[999])
        >>> x_t, t = conv.noisy_inputs(torch.randn(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        >>> loss, logs = conv(x_t, t)
        >>> t.tolist(), loss.requires_grad, conv.frozen.conv.weight.requires_grad
        ([999, 999], True, False)
    """

    timestep_grid: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        *,
        prediction_type: str | None = None,
        distance: DistanceLike = "mse",
        timesteps: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_module(model, "model")
        if not isinstance(schedule, NoiseSchedule):
            raise DTypeError(
                f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. Build it from the "
                "model's scheduler: NoiseSchedule.from_scheduler(pipe.scheduler)."
            )
        prediction_type = schedule._prediction_type(prediction_type)
        if isinstance(distance, str):
            check_option(distance, "distance", DISTANCES)
        elif not callable(distance):
            raise DTypeError(
                f"Expected `distance` to be one of {list(DISTANCES)} or a callable fn(input, target), but got "
                f"{type(distance).__name__}."
            )
        last = schedule.num_train_timesteps - 1
        if timesteps is None:
            grid = torch.arange(schedule.num_train_timesteps)
        else:
            try:
                grid = torch.as_tensor(timesteps)
            except (TypeError, ValueError, RuntimeError):
                raise DTypeError(
                    f"Expected `timesteps` to be a list or tensor of integer training timesteps in [0, {last}], but "
                    f"got {type(timesteps).__name__} {timesteps!r}; e.g. timesteps=[249, 499, 749, 999]."
                ) from None
            if grid.dtype == torch.bool or grid.is_complex():
                raise DTypeError(
                    f"Expected `timesteps` to hold integer training timesteps in [0, {last}], but got dtype "
                    f"{grid.dtype}; e.g. timesteps=[249, 499, 749, 999]."
                )
        self.online = model
        self.frozen = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.distance = distance
        if (
            grid.ndim != 1
            or grid.numel() == 0
            or (grid.is_floating_point() and not torch.equal(grid, grid.round()))
        ):
            raise OptionError(
                f"Expected `timesteps` to be a non-empty 1-D list of integer training timesteps in [0, {last}], "
                f"but got {grid.tolist()!r} (shape {tuple(grid.shape)}); e.g. timesteps=[249, 499, 749, 999], "
                "or None for all of them."
            )
        # Checked before the schedule's own check, whose range includes the clean end -1.
        if bool((grid < 0).any()) or bool((grid > last).any()):
            raise OptionError(
                f"Expected `timesteps` in [0, {last}] (t = -1 is the clean end, where x_t is x0 and there is "
                f"nothing to convert), but got {grid.tolist()!r}."
            )
        grid = schedule.timesteps(grid.long(), torch.device("cpu"), "timesteps")
        self.register_buffer("timestep_grid", grid)
        logger.info("x0 conversion of a %s-prediction model", self.prediction_type)

    def train(self, mode: bool = True) -> X0Conversion:
        """Set the online copy's mode; the frozen copy stays in eval mode.

        Args:
            mode: Training mode of :attr:`online` (default True).

        Returns:
            ``self``.
        """
        super().train(mode)
        self.frozen.eval()
        return self

    def noisy_inputs(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` with ``x_t = alpha_t x0 + sigma_t eps``; ``t`` drawn uniformly from the grid if omitted.

        Args:
            x0: Clean latents ``(B, ...)``, floating point.
            t: Timesteps, one per sample ``(B,)`` or one for all, integers in ``[0, T-1]``. Defaults to
                ``None``: drawn uniformly from ``timesteps`` (with ``generator``).
            noise: The noise ``eps``, of ``x0``'s shape. Defaults to ``None``: standard normal, drawn with
                ``generator`` in ``x0``'s dtype.
            generator: Random source of ``t`` and ``noise`` (its device draws them). Defaults to ``None``:
                torch's global generator.

        Returns:
            ``(x_t, t)``: the noisy latents (``x0``'s shape and dtype) and the timesteps used, so the caller can
            log or replay them: the drawn ``(B,)`` int64 tensor, or ``t`` itself when it was given.

        Raises:
            DTypeError: ``x0`` or ``noise`` is not a floating-point tensor; ``t`` is not integral.
            ShapeError: ``x0`` is empty or 0-d; ``noise`` differs in shape from ``x0``; ``t`` is not of batch
                ``B`` (or 1).
            OptionError: ``t`` is outside the schedule's range.
            NonFiniteError: ``x0`` or ``noise`` holds NaN or Inf (a value check).
        """
        check_float_input(x0, "x0", finite=False)
        if x0.ndim == 0:
            raise ShapeError(
                "Expected `x0` to have a batch dimension, laid out as (B, ...), but got a 0-d tensor. Pass a batch, "
                "e.g. x0[None] for one sample.",
                name="x0",
                expected="(B, ...)",
                actual=(),
            )
        if noise is not None:
            check_float_input(noise, "noise", finite=False)
            check_same_shape(x0, noise, "x0", "noise")
        check_all_finite([("x0", x0)] + ([("noise", noise)] if noise is not None else []))
        batch = x0.shape[0]
        if t is None:
            grid = self.timestep_grid
            draw_on = generator.device if generator is not None else grid.device
            pick = torch.randint(0, grid.numel(), (batch,), generator=generator, device=draw_on)
            t = grid[pick.to(grid.device)].to(x0.device)
        if noise is None:
            noise = torch.randn(
                x0.shape, generator=generator, device=x0.device if generator is None else generator.device
            )
            noise = noise.to(device=x0.device, dtype=x0.dtype)
        return self.schedule.add_noise(x0, noise, t), t

    def forward(
        self, x_t: torch.Tensor, t: Any, cond: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 29 at ``(x_t, t, cond)``: the frozen model's x0 (no grad) regressed by the online model.

        Args:
            x_t: Noisy latents ``(B, ...)`` at ``t`` (e.g. from :meth:`noisy_inputs`), floating point in the
                model's dtype (or under autocast).
            t: Their timesteps, integers in ``[0, T-1]``: ``(B,)`` or one for all.
            cond: Keyword arguments of both copies (``{"encoder_hidden_states": ...}``). Defaults to ``None``:
                none.

        Returns:
            ``(loss, logs)`` of :func:`diffdistill.losses.x0_conversion_loss`: the 0-d batch-mean loss with the
            online copy's graph, and detached ``loss`` / ``target_norm`` logs.

        Raises:
            DTypeError: ``x_t`` is not a floating-point tensor or its dtype does not fit the model; ``cond`` is
                not a mapping; ``t`` is not integral.
            ShapeError: ``x_t`` is empty; ``t`` or a conditioning tensor does not fit the batch; the model's
                output differs in shape from ``x_t``.
            OptionError: ``t`` outside ``[0, T-1]`` (``-1``, the clean end, has nothing to convert).
            NonFiniteError: ``x_t`` holds NaN or Inf (a value check).
        """
        return x0_conversion_loss(
            self.online,
            self.frozen,
            x_t,
            t,
            cond,
            schedule=self.schedule,
            frozen_prediction_type=self.prediction_type,
            distance=self.distance,
        )
