"""A 2-D Gaussian-mixture toy for proving that the distillation losses distill (tests and benchmarks).

The teacher is exact: for data :math:`x_0 \\sim \\sum_k \\pi_k \\mathcal N(\\mu_k, s^2 I)` and the VP forward
process :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon`, the marginal is
:math:`\\sum_k \\pi_k \\mathcal N(\\alpha_t\\mu_k, v_t I)` with :math:`v_t = \\alpha_t^2 s^2 + \\sigma_t^2`, and the
optimal denoiser is

.. math:: E[x_0 \\mid x_t] = \\sum_k r_k(x_t)\\Big(\\mu_k + \\frac{\\alpha_t s^2}{v_t}(x_t - \\alpha_t \\mu_k)\\Big),
          \\qquad r_k \\propto \\pi_k \\exp\\!\\big(-\\lVert x_t - \\alpha_t\\mu_k \\rVert^2 / 2 v_t\\big).

(Per mode, :math:`(x_0, x_t)` is jointly Gaussian with :math:`\\mathrm{Cov}(x_0, x_t) = \\alpha_t s^2 I`; the
posterior mean is the regression of :math:`x_0` on :math:`x_t`, and :math:`r_k` is the posterior of the mode.)
The derivation uses only :math:`x_t = \\alpha_t x_0 + \\sigma_t\\epsilon`, so it holds for any
:math:`(\\alpha_t, \\sigma_t)`: on a rectified-flow schedule (``NoiseSchedule.flow_matching``, Esser et al. 2024,
Sec. 2) :math:`\\alpha = 1 - \\sigma`. The flow teacher (:meth:`GaussianMixture.teacher_model`) takes the model
timestep :math:`1000\\sigma` (SD3's input) and predicts the velocity
:math:`v = \\epsilon - x_0 = (x_t - \\hat x_0) / \\sigma` (diffusers' ``"flow"`` convention); the VP teacher takes
the index and predicts :math:`\\epsilon`. At matched signal-to-noise ratio the two are the same denoiser up to the
input scale: :math:`E_\\text{flow}[x_0 \\mid x] = E_\\text{VP}[x_0 \\mid x\\,\\alpha^\\text{VP} / (1 - \\sigma)]` when
:math:`(1 - \\sigma)/\\sigma = \\alpha^\\text{VP}/\\sigma^\\text{VP}` (tested, with a Monte-Carlo check).

Two mixtures (:data:`MIXTURES`): ``"easy"`` (8 modes of std 0.1 on a circle of radius 1.5) and ``"hard"``
(std 0.05 on radius 2, issue 20's check: narrow, well-separated modes are where one-step score distillation
used to collapse onto the ring). Students are small MLPs; :func:`run_method` trains one with a named method
through the public loss APIs and :func:`evaluate` reports the sliced Wasserstein distance of its 1-, 2- and
4-step samples to the true mixture. ``benchmarks/toy_losses.py`` prints the full table;
``tests/losses/test_toy_distillation.py`` runs a reduced version.

Every network is called the way the library calls it: with ``schedule.model_timestep(t)`` (the index on VP,
:math:`1000\\sigma` as a float on flow), and predicts the schedule's prediction type (``"epsilon"`` on VP,
``"flow"`` on flow) unless it is an x0 generator.

One-step generators (``sim``, ``dmd``) follow the recipe of :mod:`diffdistill.losses.score`: pure noise (unit
scale, DMD2's convention) fed at an intermediate input timestep (:func:`generator_timestep`: the index of EDM sigma 2.5, SiD/SIM's
``init_sigma``: 625 on SD's VP schedule, 454 on the shift-3 flow schedule), the generator initialised from
the teacher's x0 estimate at that timestep, the fake score from the teacher. The adversarial family
(``regression``, ``adversarial``, ``gan``) maps pure noise at ``t = 999`` (exactly pure noise on flow,
:math:`\\alpha_{999} = 0.07` on VP) to the teacher's ODE solution from the same noise (Diffusion2GAN's
noise-image pairs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from torch import nn

from diffdistill.losses.adversarial import (
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
    renoise_for_discriminator,
)
from diffdistill.losses.consistency import (
    lcm_consistency_loss,
    multistep_consistency_loss,
    teacher_trajectory_states,
    tscd_loss,
    x0_conversion_loss,
)
from diffdistill.losses.distances import compute_distance
from diffdistill.losses.score import dmd_loss, fake_score_loss, sim_loss
from diffdistill.schedulers.few_step_samplers import ddim_sample, lcm_sample
from diffdistill.schedulers.noise_schedule import NoiseSchedule
from diffdistill.schedulers.teacher_solver import TeacherSolver
from diffdistill.students.ema import EMA

__all__ = [
    "METHODS",
    "MIXTURES",
    "ONE_STEP",
    "SCHEDULES",
    "GaussianMixture",
    "TimeMLP",
    "ToyConfig",
    "ToyInit",
    "evaluate",
    "fit_to_teacher",
    "generator_timestep",
    "initial_network",
    "make_schedule",
    "run_method",
    "sliced_wasserstein",
]

#: Methods :func:`run_method` knows: consistency families (multi-step students), one-step score
#: distillation, and one-step adversarial distillation (ODE-pair regression alone, regression + GAN, GAN alone).
METHODS: tuple[str, ...] = ("lcm", "tscd", "mlcm", "sim", "dmd", "regression", "adversarial", "gan")
#: Methods whose student is a one-step generator (evaluated at 1 step only).
ONE_STEP: tuple[str, ...] = ("sim", "dmd", "regression", "adversarial", "gan")
#: The toy mixtures: keyword arguments of :class:`GaussianMixture`.
MIXTURES: dict[str, dict[str, float]] = {
    "easy": {"radius": 1.5, "std": 0.1},
    "hard": {"radius": 2.0, "std": 0.05},
}
#: Schedules of the toy teacher: SD's variance-preserving one, or rectified flow (:func:`make_schedule`).
SCHEDULES: tuple[str, ...] = ("vp", "flow")


def make_schedule(kind: str = "vp", shift: float = 3.0) -> NoiseSchedule:
    """The toy's schedule: ``"vp"`` (SD / SDXL betas, epsilon prediction) or ``"flow"`` (rectified flow with a
    static ``shift``, 3.0 as SD3 (Esser et al. 2024, Sec. 5.3.2), velocity prediction, model timestep
    :math:`1000\\sigma`)."""
    if kind not in SCHEDULES:
        raise ValueError(f"Expected `kind` to be one of {list(SCHEDULES)}, but got {kind!r}.")
    return NoiseSchedule.from_betas() if kind == "vp" else NoiseSchedule.flow_matching(shift=shift)


class GaussianMixture:
    """Mixture of isotropic 2-D Gaussians on a circle, with its exact denoiser (VP or rectified flow).

    Example:
        >>> gm = GaussianMixture()
        >>> x = gm.sample(1000, torch.Generator().manual_seed(0))
        >>> x.shape, round(float(x.norm(dim=1).mean()), 1)
        (torch.Size([1000, 2]), 1.5)
    """

    def __init__(self, num_modes: int = 8, radius: float = 1.5, std: float = 0.1) -> None:
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.std = std
        self.log_weights = torch.full((num_modes,), -math.log(num_modes), dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples (float32)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """Exact :math:`E[x_0 | x_t]` at indices ``t`` of ``schedule`` (float64 inside, ``x_t``'s dtype out)."""
        return self.posterior_mean(x_t, schedule.alpha(t), schedule.sigma(t))

    def posterior_mean(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact :math:`E[x_0 | x_t]` for :math:`x_t = \\alpha x_0 + \\sigma\\epsilon` (module docstring), with
        ``alpha`` and ``sigma`` one per sample ``(B,)`` or one for all; float64 inside, ``x_t``'s dtype out."""
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        x = x_t.to(torch.float64).unsqueeze(1)  # (B, 1, 2)
        mu = self.means.unsqueeze(0)  # (1, K, 2)
        v = a**2 * self.std**2 + s2
        logits = self.log_weights - ((x - a * mu) ** 2).sum(-1) / (2 * v[..., 0])
        r = logits.softmax(dim=1).unsqueeze(-1)
        post = mu + (a * self.std**2 / v) * (x - a * mu)
        return (r * post).sum(1).to(x_t.dtype)

    def epsilon_model(self, schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The teacher as an epsilon-prediction model ``model(x_t, t)``."""

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = schedule.batch_timesteps(t, x_t)
            tt = tt.expand(x_t.shape[0]) if tt.ndim == 0 else tt
            return schedule.convert(self.denoise(x_t, tt, schedule), x_t, tt, "sample", "epsilon")

        return model

    def flow_model(self, schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The teacher as a rectified-flow velocity model ``model(x_t, 1000 sigma)`` (SD3's convention):
        :math:`v = \\epsilon - x_0 = (x_t - \\hat x_0)/\\sigma` with :math:`\\alpha = 1 - \\sigma`, sigma read from
        the model timestep (divided by the schedule's ``timestep_scale``)."""
        scale = float(schedule.timestep_scale or 1000.0)

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sig = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_t.shape[0]) / scale
            x0 = self.posterior_mean(x_t, 1.0 - sig, sig).to(torch.float64)
            return ((x_t.to(torch.float64) - x0) / sig.reshape(-1, 1)).to(x_t.dtype)

        return model

    def teacher_model(self, schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The teacher as the schedule's native network, called with ``schedule.model_timestep(t)``: an
        epsilon model on VP (:meth:`epsilon_model`), a velocity model on flow (:meth:`flow_model`)."""
        return self.flow_model(schedule) if schedule.kind == "flow" else self.epsilon_model(schedule)

    @classmethod
    def named(cls, name: str) -> GaussianMixture:
        """The mixture ``name`` of :data:`MIXTURES` (``"easy"`` or ``"hard"``)."""
        if name not in MIXTURES:
            raise ValueError(f"Expected `name` to be one of {list(MIXTURES)}, but got {name!r}.")
        return cls(**MIXTURES[name])


class TimeMLP(nn.Module):
    """``f(x, t)``: an MLP on ``[x, sin/cos features of t/1000]``; ``prediction_type`` says what it outputs.

    ``t`` is the network timestep the library passes (``schedule.model_timestep``): the integer index on VP,
    :math:`1000\\sigma` as a float on flow; both land in ``[0, 1]`` after the division by 1000.
    """

    freqs: torch.Tensor

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        num_freqs: int = 8,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32) * math.pi)
        layers: list[nn.Module] = []
        width = dim + 2 * num_freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000.0
        ang = tt * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, ang.sin(), ang.cos()], dim=1))


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (mean over random directions)."""
    theta = torch.randn(num_projections, a.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    pa = (a.double() @ theta.T).sort(dim=0).values
    pb = (b.double() @ theta.T).sort(dim=0).values
    return float((pa - pb).abs().mean())


@dataclass
class ToyConfig:
    """Sizes of one toy run (the defaults are the benchmark's; tests use fewer steps)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    fit_steps: int = 1500
    eval_samples: int = 4000
    seed: int = 0
    #: MLP width (3 hidden layers); the hard mixture's check used 256.
    hidden: int = 128
    #: input timestep (index) of the one-step score generators (pure noise fed there); None: the index of EDM
    #: sigma 2.5 (SiD/SIM's init_sigma) on the schedule: 625 on VP, 454 on the shift-3 flow schedule.
    generator_timestep: int | None = None
    #: sim_loss's pseudo-Huber c (None: the library default).
    sim_c: float | None = None
    #: weight of the GAN term in "adversarial" (regression + GAN).
    gan_weight: float = 0.1
    #: teacher DDIM steps of the regression targets (the ODE solution from the generator's noise).
    teacher_steps: int = 32
    #: what the discriminator of "adversarial" sees as real: the regression targets ("teacher",
    #: Diffusion2GAN's pairs) or data samples ("data"); "gan" always sees data.
    gan_real: str = "teacher"
    #: MLCM's training states: "teacher" (the paper's data-free teacher-trajectory states) or "data" (noised
    #: data samples).
    mlcm_states: str = "teacher"
    #: R1 penalty weight (gamma) on the discriminator's real inputs (0: none).
    r1_gamma: float = 0.0
    #: EMA decay of the one-step generators' weights (the returned generator is the EMA; 0: none).
    generator_ema: float = 0.995


class ToyInit(NamedTuple):
    """The pretrained networks students start from: the schedule's prediction type (``epsilon``: epsilon on
    VP, velocity on flow), and its x0-prediction conversion (``sample``)."""

    epsilon: TimeMLP
    sample: TimeMLP


def fit_to_teacher(gm: GaussianMixture, schedule: NoiseSchedule, cfg: ToyConfig) -> ToyInit:
    """An MLP regressed on the exact teacher epsilon at random ``(x_t, t)`` (the "pretrained" network that
    students and fake scores start from, as real distillations start from the teacher), and a copy converted
    to x0-prediction with :func:`~diffdistill.losses.x0_conversion_loss` (SDXL-Lightning Eq. 29): one-step
    generators use it, since an epsilon network's :math:`\\hat x_0` at ``t = T-1`` amplifies errors by
    :math:`1/\alpha_{T-1} \approx 15`."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = TimeMLP(hidden=cfg.hidden, prediction_type=schedule.prediction_type)
    teacher = gm.teacher_model(schedule)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x0 = gm.sample(cfg.batch, g)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch,), generator=g)
        return schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t), t

    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(cfg.fit_steps):
        x_t, t = batch()
        t_in = schedule.model_timestep(t)
        loss = (net(x_t, t_in) - teacher(x_t, t_in)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0_net = copy.deepcopy(net)
    x0_net.prediction_type = "sample"
    opt = torch.optim.Adam(x0_net.parameters(), lr=1e-3)
    for _ in range(cfg.fit_steps // 2):
        x_t, t = batch()
        loss, _ = x0_conversion_loss(x0_net, net, x_t, t, schedule=schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ToyInit(net, x0_net)


def _teacher_samples(
    gm: GaussianMixture, schedule: NoiseSchedule, noise: torch.Tensor, steps: int
) -> torch.Tensor:
    """Teacher DDIM ("trailing") samples from ``noise`` (on flow: Euler on the trailing grid)."""
    from diffdistill.schedulers.few_step_samplers import spaced_timesteps

    ts = spaced_timesteps(steps, "trailing", num_train_timesteps=schedule.num_train_timesteps)
    return ddim_sample(gm.teacher_model(schedule), schedule, noise, ts).sample


def _consistency_loop(
    method: str, net: TimeMLP, teacher: TeacherSolver, gm: GaussianMixture, cfg: ToyConfig
) -> None:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    ema = EMA(net, decay=0.95)
    for _ in range(cfg.steps):
        x0 = gm.sample(cfg.batch, g)
        if method == "lcm":
            loss, _ = lcm_consistency_loss(
                net, teacher, x0, target=ema, num_ddim_timesteps=20, distance="mse", generator=g
            )
        elif method == "tscd":
            loss, _ = tscd_loss(
                net, teacher, x0, num_segments=2, num_inference_steps=20, target=ema, generator=g
            )
        else:  # mlcm (MLCD): online target; data-free teacher-trajectory states, or noised data
            from diffdistill.schedulers.timestep_samplers import milestone_pairs

            sample = milestone_pairs(cfg.batch, num_segments=4, skip=25, on_grid=True, generator=g)
            if cfg.mlcm_states == "teacher":
                states = teacher_trajectory_states(
                    teacher, torch.randn(cfg.batch, 2, generator=g), sample.t, num_segments=4
                )
                loss, _ = multistep_consistency_loss(net, teacher, x_t=states, sample=sample, target="online")
            else:
                loss, _ = multistep_consistency_loss(
                    net, teacher, x0, sample=sample, target="online", generator=g
                )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)


def _generator_loop(
    method: str, net: TimeMLP, fake: TimeMLP, gm: GaussianMixture, schedule: NoiseSchedule, cfg: ToyConfig
) -> None:
    """One-step generator training: pure noise at the method's input timestep to a clean sample in one call."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    real = gm.teacher_model(schedule)
    # Adam(0, 0.99) for all three networks (SiD's fake beta1 0; SDXL-Lightning's adversarial optimiser).
    opt_g = torch.optim.Adam(net.parameters(), lr=cfg.lr * 0.3, betas=(0.0, 0.99))
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.lr, betas=(0.0, 0.99))
    disc = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 1))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99))
    t_gen = generator_timestep(method, cfg, schedule)

    def d_logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_d = schedule.model_timestep(t).float().reshape(-1, 1) / 1000  # VP: t / 1000; flow: sigma
        return disc(torch.cat([x, t_d], dim=1))

    solver = TeacherSolver(real, schedule)
    ema = EMA(net, decay=cfg.generator_ema) if cfg.generator_ema > 0 else None
    for _ in range(cfg.steps):
        z = torch.randn(cfg.batch, 2, generator=g)
        t_in = torch.full((cfg.batch,), t_gen)
        x_g = schedule.to_x0(net(z, schedule.model_timestep(t_in)), z, t_in, net.prediction_type)
        if method in ("regression", "adversarial", "gan"):
            # Diffusion2GAN-style: the teacher's ODE solution from the same noise (x_999 is pure noise to
            # within alpha_999 = 0.07 on VP, exactly on flow), and/or a GAN term with the discriminator
            # shown re-noised samples (SDXL-Lightning's multi-timestep D).
            with torch.no_grad():
                teacher_x0 = cast(torch.Tensor, solver.solve(z, t_in, -1, num_steps=cfg.teacher_steps))
            loss = compute_distance(x_g, teacher_x0, "mse") if method != "gan" else x_g.sum() * 0
            if method != "regression":
                use_data = method == "gan" or cfg.gan_real == "data"
                real_x0 = gm.sample(cfg.batch, g) if use_data else teacher_x0
                renoised = renoise_for_discriminator(real_x0, x_g.detach(), schedule=schedule, generator=g)
                (real_t, fake_t), t_star = renoised.samples, renoised.t
                real_t = real_t.detach().requires_grad_(cfg.r1_gamma > 0)
                real_logits = d_logits(real_t, t_star)
                d_loss, _ = gan_discriminator_loss(real_logits, d_logits(fake_t, t_star))
                if cfg.r1_gamma > 0:
                    d_loss = d_loss + r1_penalty(real_logits, real_t, gamma=cfg.r1_gamma)[0]
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                noise = torch.randn(x_g.shape, generator=g)
                fake_noised = schedule.add_noise(x_g, noise, t_star)
                disc.requires_grad_(False)
                g_adv, _ = gan_generator_loss(d_logits(fake_noised, t_star))
                disc.requires_grad_(True)
                loss = loss + (cfg.gan_weight if method == "adversarial" else 1.0) * g_adv
        else:
            f_loss, _ = fake_score_loss(fake, x_g.detach(), schedule=schedule, generator=g)
            opt_f.zero_grad()
            f_loss.backward()
            opt_f.step()
            fake.requires_grad_(False)
            if method == "sim":
                loss, _ = sim_loss(x_g, real, fake, schedule=schedule, c=cfg.sim_c, generator=g)
            else:
                loss, _ = dmd_loss(x_g, real, fake, schedule=schedule, generator=g)
            fake.requires_grad_(True)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if ema is not None:
            ema.update(net)
    if ema is not None:
        ema.copy_to(net)


def generator_timestep(method: str, cfg: ToyConfig, schedule: NoiseSchedule) -> int:
    """The input timestep (index) of a one-step ``method``'s generator: for score distillation
    ``cfg.generator_timestep``, or if None the index of EDM sigma :math:`\\sigma/\\alpha = 2.5` on ``schedule``
    (SiD/SIM's ``init_sigma``; 625 on VP, 454 on shift-3 flow); 999 for the adversarial family (its regression
    pairs start from pure noise at ``T-1``)."""
    if method not in ("sim", "dmd"):
        return schedule.num_train_timesteps - 1
    if cfg.generator_timestep is not None:
        return cfg.generator_timestep
    return int(schedule.edm_sigma_to_timestep(2.5))


def initial_network(method: str, init: ToyInit) -> TimeMLP:
    """The pretrained network ``method`` starts from: x0-prediction for one-step generators."""
    if method not in METHODS:
        raise ValueError(f"Expected `method` to be one of {list(METHODS)}, but got {method!r}.")
    return init.epsilon if method in ("lcm", "tscd", "mlcm") else init.sample


def run_method(
    method: str, gm: GaussianMixture, schedule: NoiseSchedule, init: ToyInit, cfg: ToyConfig
) -> TimeMLP:
    """Distill the toy teacher with ``method`` (one of :data:`METHODS`), starting from a copy of
    :func:`initial_network`."""
    net = copy.deepcopy(initial_network(method, init))
    torch.manual_seed(cfg.seed)
    if method in ("lcm", "tscd", "mlcm"):
        _consistency_loop(method, net, TeacherSolver(gm.teacher_model(schedule), schedule), gm, cfg)
    else:
        _generator_loop(method, net, copy.deepcopy(init.epsilon), gm, schedule, cfg)
    return net


def _sample(
    method: str, net: nn.Module, schedule: NoiseSchedule, noise: torch.Tensor, steps: int, cfg: ToyConfig
) -> torch.Tensor:
    from diffdistill.schedulers.few_step_samplers import lcm_timesteps, one_step_sample, spaced_timesteps

    g = torch.Generator().manual_seed(123)
    if method == "lcm":
        ts = lcm_timesteps(steps, original_inference_steps=20)
        return lcm_sample(net, schedule, noise, ts, generator=g).sample
    if method in ("tscd", "mlcm"):
        ts = spaced_timesteps(steps, "trailing")
        return ddim_sample(net, schedule, noise, ts).sample
    prediction_type = str(getattr(net, "prediction_type", "epsilon"))
    t_gen = generator_timestep(method, cfg, schedule)
    return one_step_sample(net, schedule, noise, t_gen, prediction_type=prediction_type).sample


def evaluate(
    method: str, net: nn.Module, gm: GaussianMixture, schedule: NoiseSchedule, cfg: ToyConfig
) -> dict[int, float]:
    """Sliced Wasserstein distance to the true mixture of 1-, 2- and 4-step samples (one-step generators:
    1 step only; their 2- and 4-step entries are NaN)."""
    g = torch.Generator().manual_seed(cfg.seed + 99)
    truth = gm.sample(cfg.eval_samples, g)
    noise = torch.randn(cfg.eval_samples, 2, generator=g)
    out = {}
    with torch.no_grad():
        for steps in (1, 2, 4):
            if method in ONE_STEP and steps > 1:
                out[steps] = math.nan
                continue
            x = (
                _teacher_samples(gm, schedule, noise, steps)
                if method == "teacher"
                else _sample(method, net, schedule, noise, steps, cfg)
            )
            out[steps] = sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(5))
    return out
