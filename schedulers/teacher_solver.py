"""A teacher ODE solver with classifier-free guidance: n DDIM steps from ``t`` to ``t_to``.

Used as the multi-step teacher of progressive distillation (SDXL-Lightning Eq. 16), the one-step
teacher of LCM / TSCD, MLCM's p-step inter-segment solver and its data-free trajectory states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from .._checks import OptionError, ShapeError, check_option, check_tensor, value_checks_enabled
from .._outputs import first_tensor
from .noise_schedule import NoiseSchedule, TimestepLike

__all__ = ["GUIDANCE_CONVENTIONS", "TeacherSolver", "apply_guidance", "concat_conditions"]

GUIDANCE_CONVENTIONS: tuple[str, ...] = ("imagen", "lcm")
GuidanceConvention = Literal["imagen", "lcm"]


def apply_guidance(
    cond_out: torch.Tensor,
    uncond_out: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    convention: str = "imagen",
) -> torch.Tensor:
    """Classifier-free guidance, with the convention named explicitly.

    * ``"imagen"`` (Ho & Salimans 2022; diffusers pipelines): :math:`u + w (c - u)`; ``w = 1`` is no guidance.
    * ``"lcm"`` (the LCM distillation scripts): :math:`c + w (c - u)`, i.e. Imagen with ``w + 1``;
      ``w = 0`` is no guidance.

    ``guidance_scale`` is a number or one value per sample (shape ``(B,)``).

    Example:
        >>> c, u = torch.ones(2, 3), torch.zeros(2, 3)
        >>> apply_guidance(c, u, 7.5)[0, 0].item(), apply_guidance(c, u, 6.5, "lcm")[0, 0].item()
        (7.5, 7.5)
    """
    check_option(convention, "convention", GUIDANCE_CONVENTIONS)
    w = guidance_scale
    if isinstance(w, torch.Tensor):
        if w.ndim > 1 or (w.ndim == 1 and w.shape[0] not in (1, cond_out.shape[0])):
            raise ShapeError(
                f"Expected `guidance_scale` to be a number or one value per sample ({cond_out.shape[0]},), but "
                f"got shape {tuple(w.shape)}.",
                name="guidance_scale",
                expected=(cond_out.shape[0],),
                actual=tuple(w.shape),
            )
        w = w.to(device=cond_out.device, dtype=torch.promote_types(cond_out.dtype, torch.float32))
        w = w.reshape(w.shape + (1,) * (cond_out.ndim - w.ndim))
    diff = cond_out - uncond_out
    base = uncond_out if convention == "imagen" else cond_out
    return (base + w * diff).to(cond_out.dtype)


def concat_conditions(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """Stack conditional and unconditional model kwargs into one batch of ``2 * batch`` (cond first).

    Tensors are concatenated along dim 0; a tensor with batch 1 (e.g. one shared null-text embedding) is
    expanded to ``batch``; nested dicts (SDXL's ``added_cond_kwargs``) are handled recursively; any other
    value must be equal in both.

    Example:
        >>> c = {"encoder_hidden_states": torch.ones(2, 77, 8), "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}}
        >>> u = {"encoder_hidden_states": torch.zeros(1, 77, 8), "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}}
        >>> both = concat_conditions(c, u, batch=2)
        >>> tuple(both["encoder_hidden_states"].shape), tuple(both["added_cond_kwargs"]["time_ids"].shape)
        ((4, 77, 8), (4, 6))
    """
    if set(cond) != set(uncond):
        raise OptionError(
            "Expected `cond` and `uncond` to have the same keys, but got "
            f"cond {sorted(cond)} and uncond {sorted(uncond)}."
        )
    out: dict[str, Any] = {}
    for key in cond:
        a, b = cond[key], uncond[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out[key] = concat_conditions(a, b, batch)
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            parts = []
            for name, v in (("cond", a), ("uncond", b)):
                if v.ndim == 0 or v.shape[0] not in (1, batch):
                    raise ShapeError(
                        f"Expected `{name}[{key!r}]` to have batch size {batch} or 1 in dim 0, but got shape "
                        f"{tuple(v.shape)}.",
                        name=f"{name}[{key!r}]",
                        expected=(batch,),
                        actual=tuple(v.shape),
                    )
                parts.append(v.expand(batch, *v.shape[1:]))
            out[key] = torch.cat(parts, dim=0)
        elif a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b):
            out[key] = a
        else:
            raise OptionError(
                f"Cannot batch `cond[{key!r}]` ({type(a).__name__}) with `uncond[{key!r}]` ({type(b).__name__}): "
                "non-tensor values must be equal in both."
            )
    return out


class TeacherSolver:
    """Run a frozen denoiser with classifier-free guidance and DDIM steps.

    Args:
        model: any callable ``model(x_t, t, **cond)`` returning a tensor (or a diffusers output /
            tuple whose first element is the prediction), e.g. a ``UNet2DConditionModel``.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` the model was trained with.
        guidance_scale: default CFG scale (a number or a ``(B,)`` tensor).
        guidance: ``"imagen"`` (:math:`u + w(c-u)`) or ``"lcm"`` (:math:`c + w(c-u)`); see
            :func:`apply_guidance`.
        prediction_type: the model's output type (default: the schedule's).

    The conditional and unconditional passes are batched into one call. No gradient is recorded
    (``torch.no_grad``) unless ``grad=True`` is passed to :meth:`predict` / :meth:`solve`.

    Example:
        >>> sched = NoiseSchedule.from_betas()
        >>> model = lambda x, t, scale: x * scale  # a toy epsilon-predictor with a "condition"
        >>> solver = TeacherSolver(model, sched, guidance_scale=2.0)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> cond, uncond = {"scale": torch.full((2, 1, 1, 1), 0.2)}, {"scale": torch.zeros(1, 1, 1, 1)}
        >>> x_prev = solver.solve(x, torch.tensor([999, 500]), torch.tensor([759, 250]), cond, uncond, num_steps=3)
        >>> x_prev.shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        *,
        guidance_scale: float | torch.Tensor = 1.0,
        guidance: GuidanceConvention = "imagen",
        prediction_type: str | None = None,
    ) -> None:
        if not callable(model):
            raise OptionError(
                f"Expected `model` to be callable model(x_t, t, **cond), but got {type(model).__name__}."
            )
        if not isinstance(schedule, NoiseSchedule):
            raise OptionError(
                f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. "
                "Build one with NoiseSchedule.from_scheduler(diffusers_scheduler)."
            )
        check_option(guidance, "guidance", GUIDANCE_CONVENTIONS)
        self.model = model
        self.schedule = schedule
        self.guidance_scale = guidance_scale
        self.guidance = guidance
        self.prediction_type = schedule._prediction_type(prediction_type)

    def _is_noop_guidance(self, w: float | torch.Tensor) -> bool:
        if isinstance(w, torch.Tensor):
            return False
        return float(w) == (1.0 if self.guidance == "imagen" else 0.0)

    def predict(
        self,
        x_t: torch.Tensor,
        t: TimestepLike,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float | torch.Tensor | None = None,
        *,
        grad: bool = False,
    ) -> torch.Tensor:
        """The guided model output at ``(x_t, t)`` in the model's prediction type.

        With a no-op scale (1 for Imagen, 0 for LCM) only the conditional pass runs and ``uncond`` may be
        omitted; any other scale needs ``uncond`` (OptionError otherwise: guidance is never skipped
        silently).
        """
        check_tensor(x_t, "x_t")
        cond = dict(cond or {})
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        tt = self.schedule.batch_timesteps(t, x_t)
        tt = tt.expand(x_t.shape[0]) if tt.ndim == 0 or tt.shape[0] == 1 else tt
        noop = self._is_noop_guidance(w)
        if uncond is None and not noop:
            scale = w.tolist() if isinstance(w, torch.Tensor) else w
            raise OptionError(
                f"Expected `uncond` for classifier-free guidance with guidance_scale={scale} "
                f"({self.guidance} convention), but got None. Pass the unconditional inputs, or a no-op "
                f"guidance_scale ({1.0 if self.guidance == 'imagen' else 0.0}) for the conditional output alone."
            )
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if noop or uncond is None:  # (uncond is None only with a no-op scale, checked above)
                return first_tensor(self.model(x_t, tt, **cond))
            both = concat_conditions(cond, uncond, x_t.shape[0])
            out = first_tensor(self.model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), **both))
            c_out, u_out = out.chunk(2, dim=0)
            return apply_guidance(c_out, u_out, w, self.guidance)

    def step_timesteps(
        self, t: TimestepLike, t_to: TimestepLike, num_steps: int, like: torch.Tensor
    ) -> torch.Tensor:
        """The ``num_steps + 1`` timesteps ``t = t_0 > t_1 > ... > t_n = t_to`` (shape ``(n+1, B)``).

        :math:`t_i = t - \\lfloor i (t - t_{to}) / n \\rfloor`: evenly split, integer, exact at both ends.

        Example:
            >>> s = TeacherSolver(lambda x, t: x, NoiseSchedule.from_betas())
            >>> s.step_timesteps(999, 874, 3, torch.zeros(1)).flatten().tolist()
            [999, 958, 916, 874]
        """
        if int(num_steps) != num_steps or num_steps < 1:
            raise OptionError(f"Expected `num_steps` to be an int >= 1, but got {num_steps!r}.")
        tt = self.schedule.batch_timesteps(t, like, "t")
        tto = self.schedule.batch_timesteps(t_to, like, "t_to")
        batch = like.shape[0] if like.ndim else 1
        tt, tto = tt.expand(batch) if tt.ndim == 0 else tt, tto.expand(batch) if tto.ndim == 0 else tto
        span = tt - tto
        if value_checks_enabled() and bool((span < num_steps).any()):
            raise OptionError(
                f"Expected `t - t_to >= num_steps` ({num_steps}) so that every teacher step moves at least one "
                f"timestep, but got t={tt.tolist()} and t_to={tto.tolist()}."
            )
        i = torch.arange(num_steps + 1, device=tt.device).unsqueeze(1)
        return tt.unsqueeze(0) - torch.div(i * span.unsqueeze(0), num_steps, rounding_mode="floor")

    def solve(
        self,
        x_t: torch.Tensor,
        t: TimestepLike,
        t_to: TimestepLike,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        num_steps: int = 1,
        guidance_scale: float | torch.Tensor | None = None,
        *,
        return_trajectory: bool = False,
        grad: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Integrate the probability-flow ODE from ``t`` to ``t_to`` with ``num_steps`` guided DDIM steps.

        Returns :math:`x_{t_{to}}` (or, with ``return_trajectory=True``, the list of the ``n + 1`` states
        including ``x_t``). ``t`` and ``t_to`` may differ per sample. ``state_dtype`` (e.g. float32 for bf16
        ``x_t``) keeps the states, and the result, in that dtype while the model is still called on
        ``x_t``'s dtype: the solution is then not rounded to bf16 at each step. Default: ``x_t``'s dtype.
        """
        steps = self.step_timesteps(t, t_to, num_steps, x_t)
        x = x_t if state_dtype is None else x_t.to(state_dtype)
        trajectory = [x]
        for i in range(num_steps):
            out = self.predict(x.to(x_t.dtype), steps[i], cond, uncond, guidance_scale, grad=grad)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                x = self.schedule.ddim_step(out, steps[i], x, steps[i + 1], self.prediction_type)
            trajectory.append(x)
        return trajectory if return_trajectory else x
