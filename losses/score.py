"""Score-based distillation of one-step generators: SIM, SiD and DMD generator losses, the fake-score
denoising-score-matching loss, and the alternating generator / fake-score update.

Setting: a generator produces :math:`x = g_\\theta(z)`; a frozen *real* denoiser :math:`D_\\phi` (the
teacher, usually with CFG) and an online *fake* denoiser :math:`D_\\psi` (initialised from the teacher,
trained on detached generator samples with :func:`fake_score_loss`) are evaluated at
:math:`x_t = \\alpha_t x + \\sigma_t \\epsilon`. In the denoiser form every score difference becomes a
difference of clean-sample estimates: :math:`s_\\psi - s_\\phi = (\\alpha_t/\\sigma_t^2)(D_\\psi - D_\\phi)`.

``real`` and ``fake`` are either a :class:`~diffdistill.schedulers.TeacherSolver` (its guidance applies)
or a plain callable ``model(x_t, t, **cond)``; outputs of any prediction type are converted to
:math:`\\hat x_0` by the schedule. For SIM and SiD the generator gradient flows through :math:`x_t` into
both networks' *inputs* (as in the papers' code): freeze their parameters during the generator step
(:class:`AlternatingUpdate` does it for the fake network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._checks import (
    OptionError,
    ShapeError,
    check_option,
    check_positive,
    check_tensor,
    value_checks_enabled,
)
from .._modules import frozen
from .._outputs import first_tensor
from ..schedulers.noise_schedule import NoiseSchedule, TimestepLike
from ..schedulers.teacher_solver import TeacherSolver
from ..schedulers.timestep_samplers import uniform_timesteps
from .distances import reduce_loss

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


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


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

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 3)
        >>> torch.equal(denoise(lambda x, t: 0.5 * x, x, torch.tensor([10, 20]), s), 0.5 * x)
        True
    """
    return _estimate(model, x_t, _f32(x_t), t, schedule, cond, uncond, prediction_type, grad)


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
) -> torch.Tensor:
    """``model`` on ``x_in`` (the network's dtype); the x0 conversion with ``x_t`` (the same state, >= float32).

    Score losses take the small difference of two estimates (and of an estimate and ``x``): rounding each
    to bf16 first, or letting their ``x_t`` terms meet in a bf16 gradient, would swamp it.
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if isinstance(model, TeacherSolver):
            out = model.predict(x_in, t, cond, uncond, grad=grad)
            prediction_type = model.prediction_type
        else:
            out = first_tensor(model(x_in, t, **dict(cond or {})))
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
        last = schedule.num_train_timesteps - 1
        if not (int(low) == low and int(high) == high and 0 <= low <= high <= last):
            raise OptionError(
                f"Expected `t_range` = (low, high), integers with 0 <= low <= high <= {last} (the noisy "
                f"timesteps to draw), but got {tuple(t_range)!r}."
            )
        t = uniform_timesteps(x.shape[0], low, high, generator=generator, device=x.device).t
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
    return round(lo * total), round(hi * total)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``t`` (default U[0.02T, 0.98T]), noise ``x`` and evaluate both denoisers (in >= float32)."""
    check_tensor(x, "x")
    tt = _sample_t(t, x, schedule, t_range or _default_range(schedule, 0.02, 0.98), generator)
    # The noisy state in >= float32 for the losses' arithmetic (its x terms cancel there), in x's dtype for
    # the networks (the same values the networks saw before any upcasting).
    x_t = schedule.add_noise(_f32(x), _f32(_noise(noise, x, generator)), tt)
    x_in = x_t.to(x.dtype)
    d_real = _estimate(real, x_in, x_t, tt, schedule, cond, uncond, prediction_type, True)
    f_cond = cond if fake_cond is None else fake_cond
    d_fake = _estimate(fake, x_in, x_t, tt, schedule, f_cond, None, prediction_type, True)
    return tt, d_real, d_fake


def dmd_loss(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    *,
    schedule: NoiseSchedule,
    cond: Cond = None,
    uncond: Cond = None,
    fake_cond: Cond = None,
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

    Returns:
        ``(loss, logs)`` with ``grad_norm`` (RMS of ``g``) and ``t_mean``.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> loss, logs = dmd_loss(x, lambda x, t: torch.zeros_like(x), lambda x, t: 0.5 * x, schedule=s,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); x.grad.shape
        torch.Size([2, 4])
    """
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
        )
        xf = _f32(x.detach())
        p_real, p_fake = xf - x0_real, xf - x0_fake
        norm = _per_sample(p_real).abs().mean(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
        g = torch.nan_to_num((p_real - p_fake) / norm)
    xw = _f32(x)
    per = 0.5 * _per_sample(xw - (xw - g).detach()).pow(2).mean(dim=1)
    loss = reduce_loss(per, reduction)
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
    with gradients through their inputs. ``alpha = 1.2`` in the paper; ``t`` defaults to
    :math:`U\\{20, ..., 980\\}` (SiD-LSG). The loss can be negative: log samples, not this value.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas(prediction_type="sample")
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> loss, _ = sid_loss(x, lambda x, t: 0.9 * x, lambda x, t: 0.5 * x, schedule=s,
        ...                    generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); bool(x.grad.abs().sum() > 0)
        True
    """
    tt, d_real, d_fake = _real_and_fake(
        x, real, fake, schedule, cond, uncond, fake_cond, t, noise, t_range, prediction_type, generator
    )
    xf = _f32(x)
    weight = _per_sample(xf - d_real).abs().mean(dim=1).clamp_min(1e-5).detach()
    diff = d_real - d_fake
    per = _per_sample(diff * ((d_real - xf) - alpha * diff)).sum(dim=1) / weight
    loss = reduce_loss(per, reduction)
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
    :math:`d'(y)` is held constant: ``detach_dprime=True`` stops its gradient. ``c`` is in denoiser units;
    default :math:`0.00054\\sqrt{D}` (the iCT heuristic; a choice of this library). ``weight`` is
    :math:`w(t)`: a ``(B,)`` tensor or a callable of ``t``. ``t`` defaults to :math:`U[0.02T, 0.98T]`.

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
    tt, real_x0, fake_x0 = _real_and_fake(
        x, real, fake, schedule, cond, uncond, fake_cond, t, noise, t_range, prediction_type, generator
    )
    d_real, d_fake = _per_sample(real_x0), _per_sample(fake_x0)
    y = d_fake - d_real
    if distance == "pseudo_huber":
        cc = 0.00054 * y.shape[1] ** 0.5 if c is None else c
        check_positive(cc, "c")
        dprime = y / torch.sqrt(y.pow(2).sum(dim=1, keepdim=True) + cc**2)
    else:
        dprime = y
    if detach_dprime:
        dprime = dprime.detach()
    per = -(dprime * (d_fake - _per_sample(_f32(x)))).sum(dim=1)
    if weight is not None:
        w = torch.as_tensor(weight(tt) if callable(weight) else weight, dtype=per.dtype, device=per.device)
        if w.ndim > 1 or w.numel() not in (1, per.shape[0]):
            raise ShapeError(
                f"Expected `weight` (w(t)) to be a scalar or one value per sample, shape ({per.shape[0]},), "
                f"but got shape {tuple(w.shape)}.",
                name="weight",
                expected=(per.shape[0],),
                actual=tuple(w.shape),
            )
        per = per * w.reshape(-1)
    loss = reduce_loss(per, reduction)
    return loss, {
        "loss": per.detach().mean(),
        "score_gap": y.detach().pow(2).mean().sqrt(),
        "t_mean": tt.float().mean().detach(),
    }


def fake_score_loss(
    fake: Callable[..., Any],
    x0: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    weighting: Literal["epsilon", "v", "x0", "edm"] = "epsilon",
    cond: Cond = None,
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
    :math:`\\sigma = \\sigma_t/\\alpha_t`; SiD). The network's own ``prediction_type`` is converted as needed.
    ``t`` defaults to :math:`U\\{0..T-1\\}`.

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> s = NoiseSchedule.from_betas()
        >>> net = torch.nn.Linear(4, 4)
        >>> loss, _ = fake_score_loss(lambda x, t: net(x), torch.randn(8, 4), schedule=s,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> loss.backward(); net.weight.grad is not None
        True
    """
    check_tensor(x0, "x0")
    check_option(weighting, "weighting", ("epsilon", "v", "x0", "edm"))
    x0 = x0.detach()
    tt = _sample_t(t, x0, schedule, t_range or (0, schedule.num_train_timesteps - 1), generator)
    eps = _noise(noise, x0, generator)
    # As in the score losses: the state in >= float32 for the conversion, in x0's dtype for the network.
    x_t = schedule.add_noise(_f32(x0), _f32(eps), tt)
    out = first_tensor(fake(x_t.to(x0.dtype), tt, **dict(cond or {})))
    to_type = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample", "edm": "sample"}[weighting]
    pred = schedule.convert(out, x_t, tt, prediction_type, to_type)
    if weighting == "epsilon":
        target = eps
    elif weighting == "v":  # from x0 and eps, not x_t: x_t holds no x0 at t = T-1 with terminal_pure_noise
        target = (schedule.alpha(tt, like=pred) * eps - schedule.sigma(tt, like=pred) * x0).to(pred.dtype)
    else:
        target = x0
    per = _per_sample(pred - _f32(target)).pow(2).mean(dim=1)
    if weighting == "v":  # SiD-LSG's fake-score loss: v-MSE x SNR / (SNR + 1)
        a2, s2 = schedule.alpha(tt) ** 2, schedule.sigma(tt) ** 2
        per = per * (a2 / (a2 + s2)).to(per.dtype)
    elif weighting == "edm":
        sigma = schedule.edm_sigma(tt).to(per.dtype)
        per = per * (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    loss = reduce_loss(per, reduction)
    return loss, {"loss": per.detach().mean(), "t_mean": tt.float().mean().detach()}


class AlternatingUpdate:
    """Alternate generator and fake-score (or discriminator) updates with an update ratio.

    Each :meth:`step` runs ``fake_step()`` ``fake_steps`` times, and ``generator_step()`` when the step
    counter is a multiple of ``generator_every`` (DMD2's ``dfake_gen_update_ratio``: 5 on SDXL; SiD: 1),
    with the parameters of ``freeze_during_generator`` (the fake network, a discriminator) temporarily
    frozen so the generator loss leaves no gradients in them. The callables do their own forward,
    backward and optimiser step and return a dict of logging scalars; :meth:`step` merges them.
    ``state_dict`` / ``load_state_dict`` keep the counter so a resumed run keeps the same phase.

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
        freeze_during_generator: Sequence[nn.Module] = (),
    ) -> None:
        for name, value in (("generator_every", generator_every), ("fake_steps", fake_steps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise OptionError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
        self.generator_step = generator_step
        self.fake_step = fake_step
        self.generator_every = int(generator_every)
        self.fake_steps = int(fake_steps)
        self.generator_first = generator_first
        self.freeze_during_generator = tuple(freeze_during_generator)
        self.step_count = 0

    def _run_generator(self, logs: dict[str, torch.Tensor]) -> None:
        if self.step_count % self.generator_every == 0:
            with frozen(*self.freeze_during_generator):
                logs.update({f"generator/{k}": v for k, v in (self.generator_step() or {}).items()})

    def step(self) -> dict[str, torch.Tensor]:
        """One training step; returns merged logs prefixed ``generator/`` and ``fake/``."""
        logs: dict[str, torch.Tensor] = {}
        if self.generator_first:
            self._run_generator(logs)
        for _ in range(self.fake_steps):
            logs.update({f"fake/{k}": v for k, v in (self.fake_step() or {}).items()})
        if not self.generator_first:
            self._run_generator(logs)
        self.step_count += 1
        return logs

    def state_dict(self) -> dict[str, int]:
        """The step counter."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the step counter."""
        self.step_count = int(state["step_count"])
