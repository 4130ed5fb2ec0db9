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

from .._checks import OptionError, check_tensor
from .._modules import unwrap_model
from ..losses.consistency import x0_conversion_loss
from ..losses.distances import DistanceLike
from ..schedulers.noise_schedule import NoiseSchedule

__all__ = ["X0Conversion"]

logger = logging.getLogger(__name__)


class X0Conversion(nn.Module):
    """An online copy being converted to x0 prediction, and the frozen original that defines its target.

    Args:
        model: the epsilon/v-prediction network; it becomes :attr:`online` (trained in place).
        schedule: the noise schedule of ``model``.
        prediction_type: parameterisation of ``model`` (default: ``schedule.prediction_type``).
        distance: distance of the regression (default MSE, Eq. 29).
        timesteps: the training timesteps drawn by :meth:`noisy_inputs` (default: all ``0 .. T-1``;
            Lightning's one-step student uses ``(249, 499, 749, 999)``).

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
        self.online = model
        self.frozen = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.schedule = schedule
        self.prediction_type = schedule._prediction_type(prediction_type)
        self.distance = distance
        grid = torch.arange(schedule.num_train_timesteps) if timesteps is None else torch.as_tensor(timesteps)
        last = schedule.num_train_timesteps - 1
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
        grid = schedule.timesteps(grid.long(), torch.device("cpu"), "timesteps")
        if bool((grid < 0).any()):
            raise OptionError(
                f"Expected `timesteps` in [0, {last}]: t = -1 is the clean end, where x_t is x0 and there is "
                f"nothing to convert; got {grid.tolist()!r}."
            )
        self.register_buffer("timestep_grid", grid)
        logger.info("x0 conversion of a %s-prediction model", self.prediction_type)

    def train(self, mode: bool = True) -> X0Conversion:
        """Set the online copy's mode; the frozen copy stays in eval mode."""
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

        Returns the sampled ``t`` ``(B,)`` so the caller can log or replay it.
        """
        check_tensor(x0, "x0")
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
        """Eq. 29 at ``(x_t, t, cond)``: the frozen model's x0 (no grad) regressed by the online model."""
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
