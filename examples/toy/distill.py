"""The ``make demo`` run: distill the shipped toy teacher into 1-, 2- and 4-step students on a laptop CPU.

Four students by default (a fifth, ``dmd``, with ``--methods``), each a trainable copy of the teacher (as real
distillations start; epsilon prediction on the default VP teacher), each trained with public ``diffdistill`` APIs
only:

* ``lcm`` - latent consistency distillation (:func:`~diffdistill.losses.lcm_consistency_loss`): teacher
  DDIM jumps of 250 steps on the 4-step grid, the online model under no_grad as its own target (as
  LCM-LoRA trains), sampled with :func:`~diffdistill.schedulers.lcm_sample`.
* ``sim`` - score implicit matching (:func:`~diffdistill.losses.sim_loss` against the teacher, a fake
  score trained with :func:`~diffdistill.losses.fake_score_loss`), DMD2-style backward simulation on
  the 4-step grid, sampled with :func:`~diffdistill.schedulers.x0_renoise_sample`. Its first call takes SiD's
  input, the zero image noised to EDM sigma 2.5 (t = 625 here, sqrt(1 - alphabar) z = 0.93 z; the SDXL
  ``sim`` / ``sid`` presets' input), where DMD2's z at t = 999 left every 1-step sample noisy (below).
* ``dmd`` (``--methods ... dmd``; not in ``make demo``'s default four) - distribution matching (:func:`~diffdistill.losses.dmd_loss`, DMD2's regression-free generator
  loss) in ``sim``'s loop: the same fake score, grid, input, budget, EMA and random streams, so the two rows
  differ by the generator loss alone (DMD2's GAN term and two-time-scale ratio are not used here).
* ``dmd2-1step`` (``--methods ... dmd2-1step``, VP only; opt-in) - DMD2's 1-step recipe, the toy twin of
  ``sdxl_sim.py --preset dmd2-1step``: a one-step regression of the teacher's ODE pairs from pure noise at
  t = 399, then ``dmd`` from there with that input, training that one call only (:func:`train_dmd2_one_step`).
  ``--sim-one-step`` trains ``sim`` and ``dmd`` as one-step generators too (SiD / SIM's; evaluated at 1 step).
* ``adversarial`` - MSE to the teacher's ODE solution plus a non-saturating GAN term from a
  :class:`~diffdistill.discriminators.UNetEncoderDiscriminator` (SDXL-Lightning's discriminator: a
  trainable copy of the teacher's encoder + mid block) that judges samples re-noised by
  :func:`~diffdistill.losses.renoise_for_discriminator`.
* ``regression`` - Diffusion2GAN-style regression of teacher ODE (noise, image) pairs with a
  :class:`~diffdistill.losses.LatentLPIPS` distance plus MSE. The toy has no VAE, so the "latent" is
  the 16×16 RGB image space-to-depth folded to 48 × 4 × 4, and the VGG trunk is **randomly
  initialised** (no download): a random-feature perceptual distance, not the trained E-LatentLPIPS.
  ``--pair-one-step`` trains ``adversarial`` and ``regression`` as one-step generators instead: each pair's pure
  noise z fed at DMD2's t = 399 (on VP; ``--pair-timestep``), its final image the target (Diffusion2GAN's one-step
  pairs), evaluated by one call. ``make demo-one-step`` trains every one-step generator (sim, dmd, dmd2-1step,
  adversarial, regression) and compares them with the teacher.

The students keep the teacher's epsilon prediction; at t = 999 its x0 amplifies output errors by
sigma/alpha = 14.6, so they train with small learning rates (``DemoConfig``). The adversarial and
regression students sample with deterministic DDIM over trailing timesteps (999 | 999, 499 | 999,
749, 499, 249), the states their teacher ODE pairs come from.

Quality is measured without downloads by a small classifier trained on the same synthetic shapes
(``toy_metric.py``): the Fréchet distance of its features to real images (FD, lower is better; computed
through :mod:`diffdistill.metrics` with the classifier as the feature extractor, as FID is) and the
class accuracy of the samples (FD compares marginal distributions, so it does not see a well-formed
sample of the wrong class; accuracy does), and their coverage of the real images in pixel space
(:func:`toy_metric.pixel_coverage`: Naeem et al.'s, which sees the colours and variety that the classifier's shape
features miss, and noisy samples too). Each number is a mean ± sd over ``eval_draws`` draws of
``eval_samples`` samples; a draw fixes the initial noises and the re-noising generator of the stochastic
samplers, the same for every row. The baseline of each student is the teacher run through *that
student's* sampler (DDIM, the LCM sampler or the x0 re-noise sampler) at the same step count; the
``results.md`` comparison table gives the per-draw paired differences. Writes ``grid.png`` and
``results.md`` (tables and per-stage wall times) to ``--out`` and prints them; ``results.json`` holds the
table with an :class:`~diffdistill.metrics.EvaluationProtocol` record (the class labels are the prompts),
and ``runs/*/results.json`` the table's lines in ``examples/evaluate.py``'s format (issue 25), so
``examples/evaluate.py --compare build/toy_demo/runs/*`` reads them as it reads an SDXL evaluation::

    make demo        # = .venv/bin/python examples/toy/distill.py
    make demo-one-step   # --methods sim dmd dmd2-1step adversarial regression --sim-one-step --pair-one-step
    .venv/bin/python examples/toy/distill.py --teacher flow --out build/toy_demo_flow

``--teacher flow`` distills the shipped rectified-flow teacher instead (``teacher_flow.safetensors``: the
same network and data, trained with SD3's velocity objective on a shift-3 table; ``train_teacher.py``).
Every piece above runs unchanged on it, because the library's schedule carries the difference (issue 21):
the networks take ``schedule.model_timestep(t)`` (``1000 sigma``) and predict the velocity ``v = eps - x0``,
so ``x0 = x - sigma v``; the DDIM move is the exact Euler step of the flow ODE (the table calls it Euler;
the trailing grid of the shifted table is FLUX's ``linspace(1, 1/N, N)`` shifted by 3), the LCM sampler is
flow-LCM (diffusers' ``FlowMatchLCMScheduler``: the consistency boundary in sigma makes it the x0 re-noise
loop), the students keep the velocity prediction (a velocity network's ``x0`` at ``sigma = 1`` is
``x - v``: no amplification, so they take larger learning rates, :func:`flow_config`), and the fake score of
``sim`` regresses the velocity (``fake_score_loss(weighting="flow")``, the teacher's own CFM objective). On
the flow teacher ``sim`` follows the one-step recipe of :mod:`diffdistill.losses.score` (the toy proof's):
its first call takes pure noise scaled as SiD scales it (the noised state of a zero image, 0.71 z; ``--sim-input
unit`` feeds z itself, DMD2's convention) at SiD/SIM's intermediate input timestep (EDM sigma 2.5: index 454 of the shift-3 table) instead of t = 999, where the velocity teacher's estimate does not depend on the noise, and
it samples with an EMA of its weights. The flow run adds the teacher's 50-step Euler row, the reference of
issue 21's goal for the best 1-step student.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import CLASS_NAMES, NUM_CLASSES, sample_shapes  # noqa: E402
from toy_metric import (  # noqa: E402
    COVERAGE_K,
    ShapeClassifier,
    classifier_protocol,
    coverage_protocol,
    evaluate_samples,
    pixel_coverage,
    reference_statistics,
    train_classifier,
)
from train_teacher import TEACHER_WEIGHTS, WEIGHTS, class_condition, load_teacher  # noqa: E402

from diffdistill.discriminators import UNetEncoderDiscriminator  # noqa: E402
from diffdistill.losses import (  # noqa: E402
    LatentLPIPS,
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    lcm_consistency_loss,
    renoise_for_discriminator,
    sim_loss,
)
from diffdistill.metrics import FID, EvaluationProtocol, package_versions  # noqa: E402
from diffdistill.schedulers import (  # noqa: E402
    NoiseSchedule,
    TeacherSolver,
    ddim_sample,
    dmd2_timesteps,
    lcm_sample,
    lcm_timesteps,
    one_step_sample,
    spaced_timesteps,
    x0_renoise_sample,
)
from diffdistill.students import EMA  # noqa: E402

METHODS = ("lcm", "sim", "dmd", "dmd2-1step", "adversarial", "regression")
#: The ``make demo`` students (``--methods`` adds ``dmd``: examples/toy/README.md, "DMD student (opt-in)").
DEFAULT_METHODS = ("lcm", "sim", "adversarial", "regression")
#: The score-distillation students: one loop (:func:`train_score`), SIM's settings, the x0 re-noise sampler.
SCORE_METHODS = ("sim", "dmd", "dmd2-1step")
#: DMD2's 1-step SDXL recipe (``sdxl_sim.py --preset dmd2-1step``): the generator is fed pure noise z at this
#: timestep of the VP table, after an ODE-pair regression there (:func:`train_dmd2_one_step`).
DMD2_ONE_STEP_TIMESTEP = 399
#: Students always trained as one-step generators (the generator loss at the first call only): evaluated at 1 step.
ONE_STEP_METHODS = ("dmd2-1step",)
#: The students that regress the teacher's ODE pairs (:class:`Pairs`), sampled with DDIM; ``--pair-one-step`` makes
#: them one-step generators (:attr:`DemoConfig.pair_one_step`).
PAIR_METHODS = ("adversarial", "regression")
STEP_COUNTS = (1, 2, 4)


@dataclass
class DemoConfig:
    """Sizes and learning rates of one run; :func:`quick_config` is the test's reduced run.

    The students are epsilon-prediction copies of the teacher, whose x0 at t = 999 amplifies every output
    error by sigma/alpha = 14.6: they want small learning rates (Adam with the default betas).
    """

    batch: int = 32
    lcm_steps: int = 240
    lcm_lr: float = 1e-4
    lcm_ddim_timesteps: int = 4  # skip 250: teacher DDIM jumps on the 4-step grid
    # sim_* configure the score-distillation students (SCORE_METHODS): sim and dmd differ in the loss only;
    # dmd2-1step takes their budget and lr with its own input (z at 399) and start (a regression run)
    sim_steps: int = 120
    sim_lr: float = 2e-5
    # The input timestep of SIM's first generator call on pure noise (None: T - 1, DMD2's grid as is): SiD/SIM's
    # intermediate one, EDM sigma 2.5 (losses/score.py's recipe): 625 on the VP table, 454 on the flow run's.
    # On VP, with the "noised" input below, it took SIM's 1-step FD from 70.2 to 35.0 and coverage from 0.00 to
    # 0.42 (seed 0; DMD 77.6 -> 37.7, 0.00 -> 0.43; held-out seed 1: examples/toy/README.md); DMD2's t = 399 with
    # z and no regression start gave 86.2 / 0.01.
    sim_generator_timestep: int | None = 625
    # SIM's input on that first call: "unit" -- the noise itself (DMD2's convention, and SIM's on its own grid);
    # "noised" -- the noised state of a zero image at that timestep, schedule.add_noise(0, z, t) (SiD's
    # sigma_init * z on EDM; 0.93 z at VP's 625, 0.71 z at the flow run's 454). The same for training and sampling.
    sim_input: str = "noised"
    # Train sim / dmd's first generator call only (SiD's and SIM's one-step generators; DMD2's 1-step SDXL run) and
    # evaluate them at 1 step; False: DMD2's 4-step backward simulation (1/2/4-step students). dmd2-1step: always.
    sim_one_step: bool = False
    # EMA decay of each student's weights, used for sampling (0: the raw weights; DMD2 / SiD sample an EMA).
    sim_ema: float = 0.0
    adversarial_ema: float = 0.0
    regression_ema: float = 0.0
    fake_score_lr: float = 1e-4
    # fake_score_loss's weighting: "epsilon" (VP), "flow" on the flow teacher (its own CFM loss)
    fake_score_weighting: str = "epsilon"
    adversarial_steps: int = 160
    adversarial_lr: float = 3e-5
    discriminator_lr: float = 1e-4
    adversarial_weight: float = 0.05
    regression_steps: int = 120
    regression_lr: float = 3e-5
    # Train adversarial / regression as one-step generators (--pair-one-step; evaluated at 1 step): each pair's pure
    # noise z itself fed at pair_generator_timestep, the teacher's final image the target (DMD2's ODE pairs at
    # t = 399, Diffusion2GAN's one-step pairs); False: the trajectory states on the 4-step grid at their own
    # timesteps (1/2/4-step students, SDXL-Lightning's). On VP, z at t = 999 stays noisy (an epsilon model's x0
    # there multiplies errors by 14.6) and SDXL-Lightning's x0 conversion did not rescue it here; at t = 399 the
    # adversarial student's 1-step FD went from 76.6 to ~10 (examples/toy/README.md, "One-step pair students").
    pair_one_step: bool = False
    pair_generator_timestep: int = 399
    # their learning rates as one-step generators, from a scratch sweep (seed 0, 2 draws; its regression drew its
    # batches from the adversarial student's stream): adversarial 3e-5 / 5e-5 / 1e-4 gave FD 12.1 / 10.5 / 23.2,
    # regression 3e-5 / 1e-4 / 3e-4 gave 59.1 / 34.8 / 21.4 (this code at 3e-4, its own stream, the same draws: 28.9)
    pair_one_step_adversarial_lr: float = 5e-5
    pair_one_step_regression_lr: float = 3e-4
    num_pairs: int = 512
    pair_teacher_steps: int = 20  # a multiple of 4 dividing 1000, so the trailing grid contains 749, 499, 249
    eval_draws: int = 4  # noise draws; FD and accuracy are reported as mean ± sd over them
    eval_samples: int = 512  # samples per draw (balanced labels)
    reference_samples: int = 4096  # real images the FD compares against (balanced labels)
    classifier_steps: int = 300
    teacher_extra_ddim_steps: tuple[int, ...] = ()  # teacher DDIM step counts besides 1/2/4 (e.g. 20, 50)
    methods: tuple[str, ...] = DEFAULT_METHODS
    seed: int = 0
    teacher: str = "vp"  # "vp" (epsilon, SD's schedule) or "flow" (velocity, shift-3 rectified flow)
    weights: Path = WEIGHTS


def flow_config() -> DemoConfig:
    """The run on the flow teacher (``--teacher flow``): the same students, samplers and evaluation, with
    the teacher's 50-step Euler row (issue 21's reference for the best 1-step student) and re-tuned budgets.

    Our choices, measured on ``--seed 0`` (2 draws of 512; examples/toy/README.md lists the runs, and the
    held-out ``--seed 1``): a velocity network's :math:`\\hat x_0 = x - \\sigma v` does not amplify output
    errors, so the students that regress teacher pairs take larger steps (regression 1e-3, adversarial 1e-4,
    lcm 3e-4); SIM keeps a small one (3e-5: at 1e-4 its 1- and 4-step samples degraded) and its fake score
    regresses the velocity (``"flow"`` weighting, the teacher's CFM loss; ``"epsilon"`` gave worse 2- and
    4-step samples). SIM's first call takes pure noise at index 454 (EDM sigma 2.5, SiD/SIM's ``init_sigma``,
    as the toy proof, losses/score.py), scaled as SiD scales it: the noised state of a zero image there, 0.71 z
    (``sim_input="noised"``; unit-scale z, DMD2's convention, gave 1-step FD 34.5 / coverage 0.31 on seed 0 and
    25.6 / 0.35 on seed 1, against 22.7 / 0.77 and 14.7 / 0.85), and it samples an EMA (decay 0.95 over its 80
    steps): with both its 1-step FD went from 137 (t = 999, no EMA) to 23. The adversarial student, the best at 1 step, gets 2048 teacher pairs and 240 steps: it is
    data-limited (1-step FD 6.4 on 512 pairs / 160 steps, 5.4 on 1024 / 240, 3.4 on 2048 / 240; 6.9 on
    2048 / 360, also worse on ``--seed 1``); an EMA of its
    weights did not help it (its learning rate decays to zero, which already averages). The 50-step teacher
    row costs 50 network calls per sample, more than the rest of the evaluation together (42), so to fit the
    10-minute budget the flow run evaluates 2 draws of 512 (not 4) and trains lcm for 160 steps (not 240) and
    sim for 80 (not 120).
    """
    return DemoConfig(
        teacher="flow",
        weights=TEACHER_WEIGHTS["flow"],
        teacher_extra_ddim_steps=(50,),
        lcm_lr=3e-4,
        sim_lr=3e-5,
        sim_generator_timestep=454,  # schedule.edm_sigma_to_timestep(2.5) on the shift-3 table (tested)
        sim_input="noised",  # SiD's sigma_init z (0.71 z): 1-step FD 34.5 -> 22.7 (seed 0), 25.6 -> 14.7 (seed 1)
        sim_ema=0.95,
        fake_score_weighting="flow",
        adversarial_steps=240,
        adversarial_lr=1e-4,
        regression_lr=1e-3,
        num_pairs=2048,
        # one-step pair students (--pair-one-step): z at sigma = 1 (x0 = z - v: no amplification), the flow run's
        # learning rates (not tuned for one step)
        pair_generator_timestep=999,
        pair_one_step_adversarial_lr=1e-4,
        pair_one_step_regression_lr=1e-3,
        lcm_steps=160,
        sim_steps=80,
        eval_draws=2,
    )


def demo_config(teacher: str = "vp") -> DemoConfig:
    """The ``make demo`` run on the ``"vp"`` teacher (:class:`DemoConfig`'s defaults) or on ``"flow"``
    (:func:`flow_config`)."""
    if teacher not in TEACHER_WEIGHTS:
        raise ValueError(f"Expected `teacher` to be one of {sorted(TEACHER_WEIGHTS)}, but got {teacher!r}.")
    return flow_config() if teacher == "flow" else DemoConfig()


def quick_config(teacher: str = "vp") -> DemoConfig:
    """A reduced run for tests: the regression student only. On the VP teacher (about 1.5 min on one thread)
    80 steps on 128 teacher pairs (8-step DDIM), evaluated on 2 draws of 256 samples; on the flow teacher
    (whose students take larger steps, :func:`flow_config`) 16 steps on 64 pairs (4-step Euler), one draw
    of 128 samples and a 150-step classifier, about 20 s."""
    cfg = demo_config(teacher)
    cfg.regression_steps = 80
    cfg.num_pairs = 128
    cfg.pair_teacher_steps = 8
    cfg.eval_draws = 2
    cfg.eval_samples = 256
    cfg.reference_samples = 1024
    cfg.methods = ("regression",)
    cfg.teacher_extra_ddim_steps = ()
    if teacher == "flow":
        cfg.regression_steps = 16
        cfg.num_pairs = 64
        cfg.pair_teacher_steps = 4
        cfg.eval_draws = 1
        cfg.eval_samples = 128
        cfg.reference_samples = 512
        cfg.classifier_steps = 150
    return cfg


class Toy:
    """The frozen teacher with its class table and schedule, and helpers shared by the students."""

    def __init__(self, weights: Path = WEIGHTS) -> None:
        self.unet, self.table, self.schedule = load_teacher(weights)
        self.solver = TeacherSolver(self.unet, self.schedule)

    @property
    def kind(self) -> str:
        """``"vp"`` or ``"flow"``: the teacher's schedule."""
        return self.schedule.kind

    def cond(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return class_condition(self.table, labels)

    def trainable_copy(self) -> nn.Module:
        net = copy.deepcopy(self.unet)
        net.train().requires_grad_(True)
        return net


def _bar(n: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(range(n), desc=desc, unit="step", leave=False)


def _labels(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (n,), generator=g)


class _Optimizer:
    """Adam on ``module`` with gradient clipping and (``decay=True``) a linear decay of the learning rate
    to zero over ``steps``, which settles the students at the end of a short run."""

    def __init__(self, module: nn.Module, lr: float, steps: int, decay: bool = True) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: max(0.0, 1 - i / steps) if decay else 1.0
        )

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()


def _x0(
    net: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, cond: dict
) -> torch.Tensor:
    """The clean sample implied by a network of the teacher's kind (teacher and students alike): epsilon
    prediction fed the index on VP, velocity fed :math:`1000\\sigma` on flow (:math:`\\hat x_0 = x - \\sigma v`)."""
    return schedule.to_x0(net(x, schedule.model_timestep(t), **cond).sample, x, t)


class Pairs:
    """Teacher ODE trajectories from noise: states at the trailing 4-step grid and the final images."""

    def __init__(self, toy: Toy, cfg: DemoConfig) -> None:
        g = torch.Generator().manual_seed(cfg.seed + 2)
        self.grid = spaced_timesteps(4, "trailing")
        ts = spaced_timesteps(cfg.pair_teacher_steps, "trailing")
        keep = [int((ts == t).nonzero()) for t in self.grid]
        self.labels = _labels(cfg.num_pairs, g)
        noise = torch.randn(cfg.num_pairs, 3, 16, 16, generator=g)
        states, finals = [], []
        for i in _bar((cfg.num_pairs + 63) // 64, "teacher ODE pairs"):
            sl = slice(64 * i, 64 * (i + 1))
            out = ddim_sample(
                toy.unet, toy.schedule, noise[sl], ts, cond=toy.cond(self.labels[sl]), return_trajectory=True
            )
            traj = out.trajectory
            states.append(torch.stack([traj[k] for k in keep], dim=1))
            finals.append(out.sample)
        self.noise = noise  # (N, 3, 16, 16): each trajectory's start
        self.states = torch.cat(states)  # (N, 4, 3, 16, 16)
        self.finals = torch.cat(finals)

    def batch(
        self, n: int, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, label, teacher x0)`` with ``t`` uniform over the grid (half the batch at t = 999)."""
        idx = torch.randint(0, self.labels.numel(), (n,), generator=g)
        k = torch.randint(0, 4, (n,), generator=g)
        k[: n // 2] = 0
        return self.states[idx, k], self.grid[k], self.labels[idx], self.finals[idx]

    def one_step_batch(
        self, n: int, g: torch.Generator, timestep: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noise, t, label, teacher x0)`` with ``t = timestep`` for all: the pairs of a one-step generator fed
        each trajectory's pure noise z itself at ``timestep`` (DMD2's ODE pairs at t = 399)."""
        idx = torch.randint(0, self.labels.numel(), (n,), generator=g)
        t = torch.full((n,), int(timestep), dtype=torch.long)
        return self.noise[idx], t, self.labels[idx], self.finals[idx]

    def draw(
        self, n: int, g: torch.Generator, timestep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch` (``timestep`` None) or :meth:`one_step_batch` at ``timestep``."""
        return self.batch(n, g) if timestep is None else self.one_step_batch(n, g, timestep)


def train_lcm(toy: Toy, cfg: DemoConfig) -> nn.Module:
    """LCM consistency distillation with the online model as its own target (as LCM-LoRA trains)."""
    g = torch.Generator().manual_seed(cfg.seed + 10)
    net = toy.trainable_copy()
    opt = _Optimizer(net, cfg.lcm_lr, cfg.lcm_steps)
    for _ in _bar(cfg.lcm_steps, "lcm"):
        x0, y = sample_shapes(cfg.batch, g)
        loss, _ = lcm_consistency_loss(
            net,
            toy.solver,
            x0,
            toy.cond(y),
            target="online",
            num_ddim_timesteps=cfg.lcm_ddim_timesteps,
            distance="mse",
            generator=g,
        )
        opt.step(loss)
    return net


def generator_input(toy: Toy, noise: torch.Tensor, timestep: int, kind: str) -> torch.Tensor:
    """The one-step generator's input on pure ``noise`` at ``timestep``: ``"unit"`` the noise itself (DMD2), or
    ``"noised"`` the noised state of a zero image there, ``schedule.add_noise(0, noise, t)`` (SiD: sigma_init z)."""
    if kind == "unit":
        return noise
    if kind == "noised":
        t = torch.full((noise.shape[0],), int(timestep), dtype=torch.long)
        return toy.schedule.add_noise(torch.zeros_like(noise), noise, t)
    raise ValueError(f"Expected sim_input 'unit' or 'noised', but got {kind!r}.")


def _backward_simulate(
    net: nn.Module,
    toy: Toy,
    grid: torch.Tensor,
    cond: dict,
    n: int,
    g: torch.Generator,
    first_input: str = "unit",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD2 backward simulation: run the generator's first k grid steps (no grad), train at t_k. ``grid[0]``
    is the input timestep of the first call on pure noise (:func:`sim_grid`; its input: :func:`generator_input`),
    the others re-noising targets."""
    k = int(torch.randint(0, grid.numel(), (1,), generator=g))
    x = generator_input(toy, torch.randn(n, 3, 16, 16, generator=g), int(grid[0]), first_input)
    with torch.no_grad():
        for i in range(k):
            x0 = _x0(net, toy.schedule, x, grid[i].expand(n), cond)
            x = toy.schedule.add_noise(x0, torch.randn(x.shape, generator=g), grid[i + 1].expand(n))
    return x, grid[k].expand(n)


def sim_grid(generator_timestep: int | None = None) -> torch.Tensor:
    """SIM's 4-step grid: DMD2's ``[999, 749, 499, 249]`` with the first entry, the input timestep of the
    generator's call on pure noise, replaced by ``generator_timestep`` (as the paper recipe of
    losses/score.py: SiD/SIM feed pure noise at :math:`\\sigma_\text{init} = 2.5`; on the shift-3 flow table
    index 454). The later entries stay the re-noising targets of the multi-step generator (DMD2, Sec. 4.5),
    so the grid is not decreasing when ``generator_timestep`` is below 749: its first call is a generator
    call on pure noise, not a denoising step."""
    grid = dmd2_timesteps(4)
    if generator_timestep is not None:
        grid = grid.clone()
        grid[0] = generator_timestep
    return grid


def _ema(net: nn.Module, decay: float) -> EMA | None:
    """An EMA of ``net``'s weights (``decay`` 0: none)."""
    return EMA(net, decay=decay) if decay > 0 else None


def _finish(net: nn.Module, ema: EMA | None) -> nn.Module:
    """The weights a student samples with: the EMA's when there is one (as DMD2 and SiD sample)."""
    if ema is not None:
        ema.copy_to(net)
    return net


def score_input(cfg: DemoConfig, method: str) -> tuple[int | None, str]:
    """A score student's first generator call on pure noise: ``(timestep, input kind)`` (:func:`sim_grid`,
    :func:`generator_input`): DMD2's 1-step recipe feeds z at :data:`DMD2_ONE_STEP_TIMESTEP`, the others
    ``cfg.sim_generator_timestep`` / ``cfg.sim_input`` -- with no timestep (DMD2's grid as is) z itself at t = 999,
    as :func:`sampler` then samples (audit 22)."""
    if method == "dmd2-1step":
        return DMD2_ONE_STEP_TIMESTEP, "unit"
    if cfg.sim_generator_timestep is None:
        return None, "unit"
    return cfg.sim_generator_timestep, cfg.sim_input


def one_step_only(cfg: DemoConfig, method: str) -> bool:
    """Whether ``method`` trains (and is evaluated as) a one-step generator: :data:`ONE_STEP_METHODS`, the score
    students with :attr:`DemoConfig.sim_one_step` and the pair students with :attr:`DemoConfig.pair_one_step`."""
    return (
        method in ONE_STEP_METHODS
        or (cfg.sim_one_step and method in SCORE_METHODS)
        or (cfg.pair_one_step and method in PAIR_METHODS)
    )


def pair_settings(cfg: DemoConfig, method: str) -> tuple[int | None, float]:
    """A pair student's ``(input timestep, learning rate)``: with :attr:`DemoConfig.pair_one_step` the one-step
    generator's (z itself at :attr:`DemoConfig.pair_generator_timestep`), otherwise ``None`` (the trajectory states
    at their own timesteps) and the multi-step learning rate."""
    if method not in PAIR_METHODS:
        raise ValueError(f"Expected a method from {PAIR_METHODS}, but got {method!r}.")
    if not cfg.pair_one_step:
        return None, cfg.adversarial_lr if method == "adversarial" else cfg.regression_lr
    lr = cfg.pair_one_step_adversarial_lr if method == "adversarial" else cfg.pair_one_step_regression_lr
    return cfg.pair_generator_timestep, lr


def student_input(cfg: DemoConfig, method: str) -> tuple[int | None, str]:
    """The first call's ``(timestep, input kind)`` of a student the sampler runs as a generator on pure noise
    (:func:`sampler`'s ``generator_timestep``): :func:`score_input` for the score students, z itself at the pair
    timestep for one-step pair students; ``(None, "unit")`` for the others (their sampler's grid from t = 999)."""
    if method in SCORE_METHODS:
        return score_input(cfg, method)
    if method in PAIR_METHODS and cfg.pair_one_step:
        return cfg.pair_generator_timestep, "unit"
    return None, "unit"


def train_score(toy: Toy, cfg: DemoConfig, method: str = "sim", start: nn.Module | None = None) -> nn.Module:
    """A score-distillation generator with an online fake score, trained on the DMD2 4-step grid by backward
    simulation: ``"sim"`` (:func:`~diffdistill.losses.sim_loss`) or ``"dmd"`` / ``"dmd2-1step"``
    (:func:`~diffdistill.losses.dmd_loss`; the latter with its own input, :func:`score_input`). They take SIM's
    settings and the same random streams (seed + 20), so sim and dmd differ by the generator loss alone. The
    generator starts from a copy of ``start`` (default: the teacher); the fake score from the teacher."""
    if method not in SCORE_METHODS:
        raise ValueError(f"Expected a method from {SCORE_METHODS}, but got {method!r}.")
    generator_loss = sim_loss if method == "sim" else dmd_loss
    g = torch.Generator().manual_seed(cfg.seed + 20)
    net = toy.trainable_copy() if start is None else copy.deepcopy(start).train().requires_grad_(True)
    fake = toy.trainable_copy()
    opt_g = _Optimizer(net, cfg.sim_lr, cfg.sim_steps)
    opt_f = _Optimizer(fake, cfg.fake_score_lr, cfg.sim_steps, decay=False)
    ema = _ema(net, cfg.sim_ema)
    t_gen, first_input = score_input(cfg, method)
    # a one-step generator trains its one call only (DMD2's 1-step SDXL run, SiD); the others DMD2's 4-step grid
    grid = sim_grid(t_gen)[:1] if one_step_only(cfg, method) else sim_grid(t_gen)
    for _ in _bar(cfg.sim_steps, method):
        y = _labels(cfg.batch, g)
        cond = toy.cond(y)
        x_in, t_in = _backward_simulate(net, toy, grid, cond, cfg.batch, g, first_input)
        x_g = _x0(net, toy.schedule, x_in, t_in, cond)
        f_loss, _ = fake_score_loss(
            fake,
            x_g.detach(),
            schedule=toy.schedule,
            weighting=cfg.fake_score_weighting,
            cond=cond,
            generator=g,
        )
        opt_f.step(f_loss)
        fake.requires_grad_(False)
        loss, _ = generator_loss(
            x_g, toy.solver, fake, schedule=toy.schedule, cond=cond, fake_cond=cond, generator=g
        )
        fake.requires_grad_(True)
        opt_g.step(loss)
        if ema is not None:
            ema.update(net)
    return _finish(net, ema)


def train_dmd2_one_step(toy: Toy, pairs: Pairs, cfg: DemoConfig) -> nn.Module:
    """DMD2's 1-step recipe (Yin et al. 2024, arXiv:2405.14867; tianweiy/DMD2 ``experiments/sdxl``, the toy twin of
    ``sdxl_sim.py --preset dmd2-1step``): a one-step regression of the teacher's ODE pairs from pure noise at
    t = 399 (:func:`train_regression` with ``input_timestep``; DMD2's ``train_sd_ode.py``), then DMD from it with
    the same input, training that one call only (:func:`train_score` on the one-entry grid ``[399]``, no backward
    simulation; the fake score from the teacher), evaluated at 1 step. VP teacher only: 399 is a timestep of
    SDXL's (VP) table."""
    if toy.kind != "vp":
        raise ValueError(
            "Expected the VP teacher for dmd2-1step (DMD2's SDXL recipe conditions on t = 399 of a VP table), but "
            f"got the {toy.kind!r} teacher: use --teacher vp, or --methods dmd on the flow teacher."
        )
    # the one-step regression of --pair-one-step at 399, its learning rate too (3e-5, the multi-step one, gave 7.5 / 0.84)
    start = train_regression(toy, pairs, cfg, DMD2_ONE_STEP_TIMESTEP, cfg.pair_one_step_regression_lr)
    return train_score(toy, cfg, "dmd2-1step", start=start)


def train_adversarial(
    toy: Toy, pairs: Pairs, cfg: DemoConfig, input_timestep: int | None = None, lr: float | None = None
) -> nn.Module:
    """MSE to teacher ODE solutions plus a GAN term from a UNet-encoder discriminator on re-noised samples.

    ``input_timestep``: a one-step generator instead, fed each pair's pure noise z at that timestep
    (:meth:`Pairs.one_step_batch`); default: the trajectory states on the 4-step grid at their own timesteps
    (SDXL-Lightning's students). ``lr``: default ``cfg.adversarial_lr``."""
    g = torch.Generator().manual_seed(cfg.seed + 30)
    net = toy.trainable_copy()
    disc = UNetEncoderDiscriminator(toy.unet, conditional=False, norm_groups=16)
    opt_g = _Optimizer(net, cfg.adversarial_lr if lr is None else lr, cfg.adversarial_steps)
    opt_d = _Optimizer(disc, cfg.discriminator_lr, cfg.adversarial_steps, decay=False)
    ema = _ema(net, cfg.adversarial_ema)
    for _ in _bar(cfg.adversarial_steps, "adversarial"):
        x_t, t, y, target = pairs.draw(cfg.batch, g, input_timestep)
        cond = toy.cond(y)
        x_g = _x0(net, toy.schedule, x_t, t, cond)
        renoised = renoise_for_discriminator(target, x_g.detach(), schedule=toy.schedule, generator=g)
        (real_t, fake_t), t_star = renoised.samples, renoised.t
        t_d = toy.schedule.model_timestep(
            t_star
        )  # the teacher encoder's own input: 1000 sigma on flow (audit 15)
        d_loss, _ = gan_discriminator_loss(disc(real_t, t_d, **cond), disc(fake_t, t_d, **cond))
        opt_d.step(d_loss)
        disc.requires_grad_(False)
        fake_noised = toy.schedule.add_noise(x_g, renoised.noise[1], t_star)
        g_adv, _ = gan_generator_loss(disc(fake_noised, t_d, **cond))
        disc.requires_grad_(True)
        loss = F.mse_loss(x_g, target) + cfg.adversarial_weight * g_adv
        opt_g.step(loss)
        if ema is not None:
            ema.update(net)
    return _finish(net, ema)


def train_regression(
    toy: Toy, pairs: Pairs, cfg: DemoConfig, input_timestep: int | None = None, lr: float | None = None
) -> nn.Module:
    """Diffusion2GAN-style regression of teacher ODE pairs with a LatentLPIPS distance plus MSE.

    ``input_timestep``: a one-step regression instead, the network fed each pair's pure noise at that timestep
    (Diffusion2GAN's one-step generator; DMD2's ODE pretraining at t = 399, ``main/train_sd_ode.py``:
    :func:`train_dmd2_one_step`); default: the trajectory states on the 4-step grid at their own timesteps.
    ``lr``: default ``cfg.regression_lr``."""
    g = torch.Generator().manual_seed(cfg.seed + 40)
    net = toy.trainable_copy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        lpips = LatentLPIPS(latent=48, weights=None)  # random-init trunk on 48 x 4 x 4 space-to-depth pixels
    opt = _Optimizer(net, cfg.regression_lr if lr is None else lr, cfg.regression_steps)
    ema = _ema(net, cfg.regression_ema)
    for _ in _bar(cfg.regression_steps, "regression"):
        x_t, t, y, target = pairs.draw(cfg.batch, g, input_timestep)
        x_g = _x0(net, toy.schedule, x_t, t, toy.cond(y))
        perceptual = lpips(F.pixel_unshuffle(x_g, 4), F.pixel_unshuffle(target, 4))
        loss = perceptual + F.mse_loss(x_g, target)
        opt.step(loss)
        if ema is not None:
            ema.update(net)
    return _finish(net, ema)


#: The sampler each student is evaluated with; the teacher is run through every one of them too.
SAMPLER_OF = {
    "lcm": "lcm",
    "sim": "x0_renoise",
    "dmd": "x0_renoise",
    "dmd2-1step": "x0_renoise",
    "adversarial": "ddim",
    "regression": "ddim",
}
SAMPLER_NAMES = {"ddim": "DDIM", "lcm": "LCM sampler", "x0_renoise": "x0 re-noise sampler"}
#: Their names on a flow teacher: the DDIM move is the exact Euler step of the flow ODE, and the LCM sampler
#: is flow-LCM (diffusers' ``FlowMatchLCMScheduler``: predict x0, re-noise), the x0 re-noise loop.
FLOW_SAMPLER_NAMES = {"ddim": "Euler", "lcm": "flow-LCM sampler", "x0_renoise": "x0 re-noise sampler"}


def sampler_names(teacher: str) -> dict[str, str]:
    """The table's sampler names for a ``"vp"`` or ``"flow"`` teacher."""
    return FLOW_SAMPLER_NAMES if teacher == "flow" else SAMPLER_NAMES


SampleFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]


def sampler(
    kind: str,
    net: nn.Module,
    toy: Toy,
    lcm_grid: int = DemoConfig.lcm_ddim_timesteps,
    generator_timestep: int | None = None,
    generator_input_kind: str = "unit",
) -> SampleFn:
    """``sample(noise, labels, steps, generator)`` running ``net`` (a student or the teacher) with one of
    the students' samplers: ``"ddim"`` (deterministic, trailing timesteps; on a flow teacher the Euler loop of
    diffusers' flow pipelines on FLUX's grid ``linspace(1, 1/N, N)`` shifted by the schedule's shift: the
    trailing indices of the shifted table), ``"lcm"`` (:func:`lcm_sample`
    on ``lcm_timesteps(steps, original_inference_steps=lcm_grid)``) or ``"x0_renoise"``
    (:func:`x0_renoise_sample` on ``dmd2_timesteps(4)[:: 4 // steps]``). The stochastic samplers draw their
    re-noising from ``generator``, which the caller creates once per evaluation and passes through every
    chunk (so each sample gets its own draws). ``generator_timestep`` (:func:`student_input`; not with ``"lcm"``) is
    the input timestep of a student's first call on pure noise (its input: :func:`generator_input` of
    ``generator_input_kind``), as the student was trained: with ``"x0_renoise"`` the score students' first call
    (:func:`sim_grid`; the later calls stay on the DMD2 grid), with ``"ddim"`` a one-step pair student's only call
    (``--pair-one-step``; 1 step only)."""
    if kind not in SAMPLER_NAMES:
        raise ValueError(f"Expected a sampler from {list(SAMPLER_NAMES)}, but got {kind!r}.")
    if kind == "lcm" and generator_timestep is not None:
        raise ValueError(
            f"Expected no generator_timestep with the LCM sampler (it starts from z at t = 999), but got "
            f"{generator_timestep}."
        )

    @torch.no_grad()
    def run(
        noise: torch.Tensor, labels: torch.Tensor, steps: int, generator: torch.Generator
    ) -> torch.Tensor:
        cond = toy.cond(labels)
        if kind == "lcm":
            ts = lcm_timesteps(steps, original_inference_steps=lcm_grid)
            return lcm_sample(net, toy.schedule, noise, ts, cond=cond, generator=generator).sample
        if generator_timestep is None:  # the sampler's own grid from z at t = 999
            if kind == "x0_renoise":
                ts = sim_grid()[:: 4 // steps]
                return x0_renoise_sample(net, toy.schedule, noise, ts, cond=cond, generator=generator).sample
            return ddim_sample(
                net, toy.schedule, noise, spaced_timesteps(steps, "trailing"), cond=cond
            ).sample
        # a generator's first call on pure noise: a score student's (x0_renoise), a one-step pair student's only (ddim)
        if kind == "ddim" and steps != 1:
            raise ValueError(f"Expected 1 step of a one-step generator's DDIM sampler, but got {steps}.")
        x_in = generator_input(toy, noise, generator_timestep, generator_input_kind)
        x0 = one_step_sample(net, toy.schedule, x_in, generator_timestep, cond=cond).sample
        if steps == 1:
            return x0
        ts = sim_grid(generator_timestep)[:: 4 // steps]
        x = toy.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), ts[1])
        return x0_renoise_sample(net, toy.schedule, x, ts[1:], cond=cond, generator=generator).sample

    return run


def _batched(
    fn: SampleFn, noise: torch.Tensor, labels: torch.Tensor, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """``fn`` over 64-sample chunks, all drawing from the one ``generator`` in turn."""
    return torch.cat(
        [fn(noise[i : i + 64], labels[i : i + 64], steps, generator) for i in range(0, noise.shape[0], 64)]
    )


def renoise_generator(seed: int, draw: int) -> torch.Generator:
    """The re-noising generator of evaluation draw ``draw`` under ``--seed``: every row of that draw gets a
    fresh one with the same seed, so a student and the teacher under the same sampler see the same
    initial noises *and* the same re-noising draws."""
    return torch.Generator().manual_seed(1000 * seed + 123 + draw)


@dataclass(frozen=True)
class EvalRow:
    """One model/sampler pair of the results table."""

    key: str  # "teacher:<sampler>" or the student's method
    kind: str  # a key of SAMPLER_NAMES
    steps: tuple[int, ...]
    teacher: str = "vp"  # the teacher's schedule kind (names the samplers)

    @property
    def short_label(self) -> str:
        """The grid's row label (fits 150 px)."""
        short = {"ddim": "DDIM", "lcm": "LCM", "x0_renoise": "x0-renoise"}[self.kind]
        if self.teacher == "flow":
            short = {"ddim": "Euler", "lcm": "flow-LCM"}.get(self.kind, short)
        return f"teacher {short}" if self.key.startswith("teacher:") else self.key


def evaluation_rows(
    methods: tuple[str, ...],
    teacher_ddim_steps: tuple[int, ...] = (),
    teacher: str = "vp",
    one_step: tuple[str, ...] = ONE_STEP_METHODS,
) -> list[EvalRow]:
    """The table's rows, grouped by sampler: the teacher under each sampler a student uses (the
    "teacher, same sampler" baseline, at every student step count; under DDIM / Euler also at
    ``teacher_ddim_steps``), then the students sampled that way; those in ``one_step`` (one-step generators,
    :func:`one_step_only`) at 1 step only."""
    rows: list[EvalRow] = []
    for kind in SAMPLER_NAMES:
        users = [m for m in methods if SAMPLER_OF[m] == kind]
        if kind == "ddim":
            steps = tuple(sorted(set(teacher_ddim_steps) | set(STEP_COUNTS)))
            rows.append(EvalRow("teacher:ddim", "ddim", steps, teacher))
        elif users:
            rows.append(EvalRow(f"teacher:{kind}", kind, STEP_COUNTS, teacher))
        rows.extend(EvalRow(m, kind, (1,) if m in one_step else STEP_COUNTS, teacher) for m in users)
    return rows


def same_teacher_row(row: EvalRow, teacher: str, lcm_grid: int = DemoConfig.lcm_ddim_timesteps) -> str | None:
    """The earlier teacher row that computes exactly ``row`` (then the demo reuses its samples), or None.

    On a flow teacher the x0 re-noise row repeats the flow-LCM one: with the consistency boundary in sigma
    the LCM step's consistency function is :math:`\\hat x_0 = x - \\sigma v` itself (diffusers'
    ``FlowMatchLCMScheduler`` step), so both samplers predict x0 and re-noise it with the same draws, on
    equal grids when the LCM grid has 4 original steps (``lcm_timesteps(n, 4) == dmd2_timesteps(4)[::4 // n]``).
    On VP the LCM boundary scalings keep a (tiny) skip term: no reuse.
    """
    if teacher != "flow" or row.key != "teacher:x0_renoise":
        return None
    same_grid = all(
        torch.equal(lcm_timesteps(s, original_inference_steps=lcm_grid), dmd2_timesteps(4)[:: 4 // s])
        for s in row.steps
    )
    return "teacher:lcm" if same_grid else None


def _scores(
    classifier: ShapeClassifier,
    x: torch.Tensor,
    labels: torch.Tensor,
    reference_stats: Any,
    coverage_reference: torch.Tensor,
) -> dict[str, float]:
    """FD, class accuracy and pixel coverage of one draw of samples."""
    m = evaluate_samples(classifier, x, labels, reference_stats)
    return {**m, "cov": pixel_coverage(x, coverage_reference)}


def _summary(draws: list[dict[str, float]]) -> dict[str, Any]:
    """Means and sds over the draws, and each draw's numbers (``<metric>_draws``)."""
    out: dict[str, Any] = {}
    for key in ("fd", "acc", "cov"):
        values = [d[key] for d in draws]
        out[key], out[f"{key}_sd"] = _mean_sd(values)
        out[f"{key}_draws"] = values
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over the draws (0 with one draw, which the tables print as no spread)."""
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 3) -> None:
    """A PNG with one labelled row of images per ``(name, images (n, 3, 16, 16))``."""
    from PIL import Image, ImageDraw

    n = rows[0][1].shape[0]
    cell, label_w = 16 * scale + 2, 150
    img = Image.new("RGB", (label_w + n * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, x) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), name, fill="black")
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for c in range(n):
            tile = Image.fromarray(arr[c]).resize((16 * scale, 16 * scale), Image.NEAREST)
            img.paste(tile, (label_w + c * cell + 1, r * cell + 1))
    img.save(path)


Results = dict[str, dict[int, dict[str, Any]]]


def run_demo(cfg: DemoConfig, out: Path | None) -> Results:
    """Train the students, evaluate everything, write ``grid.png``/``results.md`` under ``out``.

    Every row is evaluated on ``cfg.eval_draws`` draws of ``cfg.eval_samples`` samples (balanced labels);
    a draw has its own initial noises and re-noising generator, shared by every row. Returns
    ``{row key: {steps: {"fd", "fd_sd", "acc", "acc_sd", "cov", "cov_sd", "fd_draws", "acc_draws",
    "cov_draws"}}}`` (means and sample standard deviations over the draws; ``cov`` the pixel coverage of
    :func:`toy_metric.pixel_coverage` over the first ``eval_samples`` reference images, as many as a draw has);
    row keys are the student methods and ``"teacher:<sampler>"``, and ``"real"`` (steps 0) is a draw of real images
    (:func:`real_images_row`).
    """
    start = time.time()
    torch.manual_seed(cfg.seed)
    toy = Toy(cfg.weights)
    classifier = train_classifier(cfg.seed, steps=cfg.classifier_steps)
    g = torch.Generator().manual_seed(cfg.seed + 99)
    labels = torch.arange(cfg.eval_samples) % NUM_CLASSES
    ref_labels = torch.arange(cfg.reference_samples) % NUM_CLASSES
    reference, _ = sample_shapes(cfg.reference_samples, g, labels=ref_labels)
    noises = torch.randn(cfg.eval_draws, cfg.eval_samples, 3, 16, 16, generator=g)
    reference_stats = reference_statistics(classifier, reference)  # the FD's reference, as FID's .npz
    coverage_reference = reference[
        : cfg.eval_samples
    ]  # balanced labels; as many as a draw: real draws ~1 - 2^-k

    seconds: dict[str, float] = {}
    students: dict[str, nn.Module] = {}
    pairs = None
    if {"adversarial", "regression", "dmd2-1step"} & set(cfg.methods):
        t0 = time.time()
        pairs = Pairs(toy, cfg)
        seconds["teacher ODE pairs (adversarial, regression)"] = time.time() - t0
    for method in cfg.methods:
        t0 = time.time()
        if method == "lcm":
            students[method] = train_lcm(toy, cfg)
        elif method == "dmd2-1step":
            students[method] = train_dmd2_one_step(toy, pairs, cfg)  # type: ignore[arg-type]
        elif method in SCORE_METHODS:
            students[method] = train_score(toy, cfg, method)
        elif method == "adversarial":
            students[method] = train_adversarial(toy, pairs, cfg, *pair_settings(cfg, method))  # type: ignore[arg-type]
        elif method == "regression":
            students[method] = train_regression(toy, pairs, cfg, *pair_settings(cfg, method))  # type: ignore[arg-type]
        else:
            raise ValueError(f"Expected methods from {list(METHODS)}, but got {method!r}.")
        students[method].eval()
        seconds[f"train {method}"] = time.time() - t0
        print(f"{method}: trained in {seconds[f'train {method}']:.0f} s", flush=True)

    t0 = time.time()
    one_step = tuple(m for m in cfg.methods if one_step_only(cfg, m))
    rows = evaluation_rows(cfg.methods, cfg.teacher_extra_ddim_steps, toy.kind, one_step)
    results: Results = {}
    grid_rows: list[tuple[str, torch.Tensor]] = []
    show = torch.cat([torch.arange(i, cfg.eval_samples, NUM_CLASSES)[:3] for i in range(NUM_CLASSES)])
    first_draw: dict[tuple[str, int], torch.Tensor] = {}
    for row in _bar_list(rows, "evaluate"):
        twin = same_teacher_row(row, toy.kind, cfg.lcm_ddim_timesteps)
        if twin in results:  # the same computation, same draws: reuse it
            results[row.key] = results[twin]  # type: ignore[index]
            grid_rows.extend((f"{row.short_label} {s}", first_draw[(twin, s)]) for s in row.steps)  # type: ignore[index]
            continue
        net = toy.unet if row.key.startswith("teacher:") else students[row.key]
        t_gen, first_input = (None, "unit") if row.key.startswith("teacher:") else student_input(cfg, row.key)
        fn = sampler(row.kind, net, toy, cfg.lcm_ddim_timesteps, t_gen, first_input)
        results[row.key] = {}
        for steps in row.steps:
            draws = []
            for draw in range(cfg.eval_draws):
                x = _batched(fn, noises[draw], labels, steps, renoise_generator(cfg.seed, draw))
                draws.append(_scores(classifier, x, labels, reference_stats, coverage_reference))
                if draw == 0:
                    first_draw[(row.key, steps)] = x[show]
                    grid_rows.append((f"{row.short_label} {steps}", x[show]))
            results[row.key][steps] = _summary(draws)
    real, _ = sample_shapes(cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 98), labels=labels)
    results["real"] = {0: _summary([_scores(classifier, real, labels, reference_stats, coverage_reference)])}
    seconds["evaluation (all rows)"] = time.time() - t0
    seconds["total"] = time.time() - start
    table = markdown_table(rows, results, cfg) + "\n\n" + comparison_table(rows, results, cfg)
    timing = timing_table(seconds, cfg)
    print(table + "\n\n" + timing)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_grid(grid_rows, out / "grid.png")
        header = "columns: " + ", ".join(f"{c} ({n})" for c, n in zip(range(NUM_CLASSES), CLASS_NAMES))
        (out / "results.md").write_text(f"{table}\n\n{timing}\n\nGrid (draw 0) {header}, 3 samples each.\n")
        protocol = evaluation_protocol(cfg, classifier, labels, reference_stats)
        write_records(out, rows, results, cfg, protocol, seconds)
        print(f"wrote {out / 'grid.png'}, {out / 'results.md'} and {out / 'results.json'}")
    return results


def evaluation_protocol(
    cfg: DemoConfig, classifier: ShapeClassifier, labels: torch.Tensor, reference: Any
) -> EvaluationProtocol:
    """The demo's :class:`~diffdistill.metrics.EvaluationProtocol`, as ``examples/evaluate.py`` records an SDXL
    evaluation (issue 25): the class labels of one draw, in order, are the "prompts" (their names, hashed),
    ``--seed`` the seed, and the classifier (architecture, training, weights hash) is the FD's feature extractor
    and the accuracy's backbone. ``generator`` (what made the images; compared by no check) names the teacher."""
    fid = FID(feature_extractor=classifier.features, reference=reference)
    extractor = classifier_protocol(classifier)
    return EvaluationProtocol.for_prompts(
        "toy shapes, balanced class labels",
        [CLASS_NAMES[int(i)] for i in labels],
        seeds=cfg.seed,
        resolution=16,
        preprocessing={
            "fd": "samples clamped to [-1, 1], no resize",
            "class_accuracy": "clamped to [-1, 1]",
            "coverage": "clamped to [-1, 1], pixels as features",
        },
        backbones={
            "fd": {**fid.protocol(), **extractor},
            "class_accuracy": extractor,
            "coverage": coverage_protocol(min(cfg.eval_samples, cfg.reference_samples)),
        },
        versions=package_versions(["torch", "diffusers", "diffdistill"]),
        generator={"teacher": cfg.teacher, "weights": cfg.weights.name},
        extra={
            "draws": cfg.eval_draws,
            "draw": "initial noises torch.randn from Generator(seed + 99) after the reference images; "
            "re-noising from Generator(1000 seed + 123 + draw)",
            "reference_images": cfg.reference_samples,
        },
    )


def write_records(
    out: Path,
    rows: list[EvalRow],
    results: Results,
    cfg: DemoConfig,
    protocol: EvaluationProtocol,
    seconds: dict[str, float],
) -> None:
    """``results.json`` (the table, the protocol, the config and the stage times) and, per table line,
    ``runs/<model>_<sampler>_<steps>/results.json`` in ``examples/evaluate.py``'s record format (``metrics``,
    ``protocol`` with the line's sampler under ``generator``), so ``examples/evaluate.py --compare
    build/toy_demo/runs/*`` prints the demo's lines as it prints an SDXL teacher beside its students."""
    import dataclasses
    import json

    names = sampler_names(cfg.teacher)
    lines = []
    for row in rows:
        role = "teacher" if row.key.startswith("teacher:") else "student"
        for steps, m in results[row.key].items():
            lines.append(
                {
                    "model": "teacher" if role == "teacher" else f"student: {row.key}",
                    "sampler": names[row.kind],
                    "steps": steps,
                    "metrics": {"fd": m["fd"], "class_accuracy": m["acc"], "coverage": m["cov"]},
                    "sd": {"fd": m["fd_sd"], "class_accuracy": m["acc_sd"], "coverage": m["cov_sd"]},
                    "draws": {
                        "fd": m["fd_draws"],
                        "class_accuracy": m["acc_draws"],
                        "coverage": m["cov_draws"],
                    },
                }
            )
            generator = {
                **protocol.generator,
                "role": role,
                "method": None if role == "teacher" else row.key,
                "scheduler": names[row.kind],
                "num_inference_steps": steps,
            }
            label = f"{'teacher' if role == 'teacher' else row.key}_{row.kind}_{steps}"
            record = {
                "metrics": lines[-1]["metrics"],
                "protocol": dataclasses.replace(protocol, generator=generator).to_dict(),
                "num_images": cfg.eval_draws * cfg.eval_samples,
                "label": label,
            }
            (out / "runs" / label).mkdir(parents=True, exist_ok=True)
            (out / "runs" / label / "results.json").write_text(
                json.dumps(record, indent=1, sort_keys=True) + "\n"
            )
    config = {k: (v.name if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    real = results["real"][0]
    summary = {
        "real_images": {"fd": real["fd"], "class_accuracy": real["acc"], "coverage": real["cov"]},
        "table": lines,
        "protocol": protocol.to_dict(),
        "config": config,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")


def _bar_list(items: list[EvalRow], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def _spread(sd: float, cfg: DemoConfig, fmt: str) -> str:
    """`` ± sd`` in ``fmt``, or nothing with one draw (no spread is measured: "± 0.0" would read as none)."""
    return f" ± {sd:{fmt}}" if cfg.eval_draws > 1 else ""


def markdown_table(rows: list[EvalRow], results: Results, cfg: DemoConfig) -> str:
    """One line per row and step count: FD, class accuracy and pixel coverage, mean ± sd over the draws; first
    a draw of real images (what real data scores)."""
    real = results["real"][0]
    lines = [
        f"FD, class accuracy and coverage: mean ± sd over {cfg.eval_draws} draws of {cfg.eval_samples} samples "
        f"(--teacher {cfg.teacher} --seed {cfg.seed}; FD reference: {cfg.reference_samples} real images; coverage: "
        f"pixels, k = {COVERAGE_K}, over {min(cfg.eval_samples, cfg.reference_samples)} of them).",
        "",
        "| model | sampler | steps | FD (lower is better) | class accuracy | coverage (higher is better) |",
        "|---|---|---:|---:|---:|---:|",
        f"| real images (another draw) | - | - | {real['fd']:.1f} | {real['acc']:.1%} | {real['cov']:.2f} |",
    ]
    names = sampler_names(cfg.teacher)
    for row in rows:
        name = "teacher" if row.key.startswith("teacher:") else f"student: {row.key}"
        for steps, m in results[row.key].items():
            lines.append(
                f"| {name} | {names[row.kind]} | {steps} | {m['fd']:.1f}{_spread(m['fd_sd'], cfg, '.1f')} "
                f"| {m['acc']:.1%}{_spread(m['acc_sd'], cfg, '.1%')} | {m['cov']:.2f}{_spread(m['cov_sd'], cfg, '.2f')} |"
            )
    return "\n".join(lines)


def comparison_table(rows: list[EvalRow], results: Results, cfg: DemoConfig) -> str:
    """Each student minus the teacher under the same sampler and step count, paired by draw (same noises
    and re-noising draws): mean ± sd of the per-draw differences and how many draws the student won."""
    lines = [
        f"Student minus teacher under the same sampler, paired over the {cfg.eval_draws} draws "
        "(ΔFD < 0, Δaccuracy > 0 and Δcoverage > 0 favour the student; wins = draws where the student is better).",
        "",
        "| student | sampler | steps | ΔFD | FD wins | Δaccuracy (points) | accuracy wins | Δcoverage |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = sampler_names(cfg.teacher)
    for row in rows:
        if row.key.startswith("teacher:"):
            continue
        teacher = results[f"teacher:{row.kind}"]
        for steps, m in results[row.key].items():
            t = teacher[steps]
            d_fd = [a - b for a, b in zip(m["fd_draws"], t["fd_draws"])]
            d_acc = [100 * (a - b) for a, b in zip(m["acc_draws"], t["acc_draws"])]
            d_cov = [a - b for a, b in zip(m["cov_draws"], t["cov_draws"])]
            (fd, fd_sd), (acc, acc_sd), (cov, cov_sd) = _mean_sd(d_fd), _mean_sd(d_acc), _mean_sd(d_cov)
            lines.append(
                f"| {row.key} | {names[row.kind]} | {steps} | {fd:+.1f}{_spread(fd_sd, cfg, '.1f')} "
                f"| {sum(d < 0 for d in d_fd)}/{len(d_fd)} | {acc:+.1f}{_spread(acc_sd, cfg, '.1f')} "
                f"| {sum(d > 0 for d in d_acc)}/{len(d_acc)} | {cov:+.2f}{_spread(cov_sd, cfg, '.2f')} |"
            )
    return "\n".join(lines)


def timing_table(seconds: dict[str, float], cfg: DemoConfig) -> str:
    """The stages' budgets (steps, data, learning rate: those each student trained with) and wall times."""

    def score(method: str) -> str:
        how = "one-step" if one_step_only(cfg, method) else "backward simulation from noise"
        return f"{cfg.sim_steps} steps, no images ({how}), lr {cfg.sim_lr:g}"

    def pair(method: str, steps: int) -> str:
        t_in, lr = pair_settings(cfg, method)
        how = "" if t_in is None else f", one-step from z at t = {t_in}"
        return f"{steps} steps on {cfg.num_pairs} teacher ODE pairs{how}, lr {lr:g}"

    budgets = {
        "teacher ODE pairs (adversarial, regression)": f"{cfg.num_pairs} × {cfg.pair_teacher_steps}-step teacher "
        + sampler_names(cfg.teacher)["ddim"],
        "lcm": f"{cfg.lcm_steps} steps on real images (batch {cfg.batch}), lr {cfg.lcm_lr:g}",
        "sim": score("sim"),
        "dmd": score("dmd"),
        "dmd2-1step": f"{cfg.regression_steps} regression steps on {cfg.num_pairs} teacher ODE pairs (lr "
        f"{cfg.pair_one_step_regression_lr:g}), then {cfg.sim_steps} DMD steps (lr {cfg.sim_lr:g})",
        "adversarial": pair("adversarial", cfg.adversarial_steps),
        "regression": pair("regression", cfg.regression_steps),
    }
    lines = ["| stage | budget | wall time |", "|---|---|---:|"]
    for name, sec in seconds.items():
        budget = budgets.get(name.removeprefix("train "), "")
        lines.append(f"| {name} | {budget} | {sec:.0f} s |")
    lines.append("")
    lines.append(f"{torch.get_num_threads()} torch thread(s).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/toy_demo"))
    p.add_argument("--quick", action="store_true", help="the reduced test run")
    p.add_argument(
        "--teacher",
        choices=sorted(TEACHER_WEIGHTS),
        default="vp",
        help="the shipped teacher to distill: vp (epsilon, SD's schedule) or flow (velocity, shift-3 rectified flow)",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument(
        "--seed", type=int, default=0, help="seeds training, the metric classifier and the evaluation noises"
    )
    p.add_argument(
        "--teacher-ddim-steps",
        type=int,
        nargs="+",
        default=None,
        help="also evaluate the teacher with DDIM / Euler at these step counts (e.g. 20 50; costs draws x samples x steps "
        "network calls; default: none on vp, 50 on flow)",
    )
    p.add_argument(
        "--sim-input",
        choices=("unit", "noised"),
        default=None,
        help="the sim and dmd students' input on their first call on pure noise: the noise (unit, DMD2's) or a zero "
        "image noised to that timestep (noised, SiD's sigma_init z); default: the teacher's config (dmd2-1step always "
        "feeds z at t = 399)",
    )
    p.add_argument(
        "--eval-draws",
        type=int,
        default=None,
        help="noise draws of 512 samples each row is evaluated on (default: the teacher's config, vp 4, flow 2)",
    )
    p.add_argument(
        "--sim-timestep",
        type=int,
        default=None,
        help="the sim and dmd students' input timestep on pure noise (default: the teacher's config, EDM sigma 2.5: "
        "625 on vp, 454 on flow); 999: DMD2's convention, z itself on DMD2's 4-step grid as is (not with --sim-input "
        "noised); dmd2-1step always feeds z at t = 399",
    )
    p.add_argument(
        "--sim-one-step",
        action="store_true",
        help="train the sim and dmd students' first call only (SiD / SIM's one-step generators, DMD2's 1-step run) "
        "and evaluate them at 1 step; default: DMD2's 4-step backward simulation (dmd2-1step: always one-step)",
    )
    p.add_argument(
        "--pair-one-step",
        action="store_true",
        help="train the adversarial and regression students as one-step generators on the teacher's ODE pairs (each "
        "pair's noise z fed at --pair-timestep, its final image the target) and evaluate them at 1 step; default: the "
        "trajectory states on the 4-step grid (1/2/4-step students)",
    )
    p.add_argument(
        "--pair-timestep",
        type=int,
        default=None,
        help="the one-step pair students' input timestep (with --pair-one-step; default: the teacher's config, "
        "DMD2's 399 on vp, 999 (sigma 1) on flow); dmd2-1step always feeds z at t = 399",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="torch threads (default: min(4, cores))",
    )
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"expected --threads >= 1, but got {args.threads}")
    if args.teacher_ddim_steps and not all(1 <= s <= 1000 for s in args.teacher_ddim_steps):
        p.error(
            f"expected --teacher-ddim-steps in [1, 1000] (the teacher's table), but got {args.teacher_ddim_steps}"
        )
    if args.methods and len(set(args.methods)) != len(args.methods):
        p.error(f"expected each of --methods once (a repeat would train it again), but got {args.methods}")
    if args.methods and "dmd2-1step" in args.methods and args.teacher != "vp":
        p.error(
            "expected --teacher vp for dmd2-1step (DMD2's SDXL recipe conditions on t = 399 of a VP table)"
        )
    torch.set_num_threads(args.threads)
    cfg = quick_config(args.teacher) if args.quick else demo_config(args.teacher)
    if args.methods:
        cfg.methods = tuple(args.methods)
    cfg.seed = args.seed
    if args.teacher_ddim_steps is not None:
        cfg.teacher_extra_ddim_steps = tuple(args.teacher_ddim_steps)
    if args.sim_input is not None:
        cfg.sim_input = args.sim_input
    cfg.sim_one_step = cfg.sim_one_step or args.sim_one_step
    if args.methods and args.pair_one_step and not set(args.methods) & set(PAIR_METHODS):
        p.error(
            "--pair-one-step trains the adversarial and regression students: add one of them to --methods"
        )
    if args.methods and args.sim_one_step and not set(args.methods) & {"sim", "dmd"}:
        p.error("--sim-one-step trains the sim and dmd students: add one of them to --methods")
    cfg.pair_one_step = cfg.pair_one_step or args.pair_one_step
    if args.pair_timestep is not None:
        if not args.pair_one_step:
            p.error("--pair-timestep sets the one-step pair students' input: add --pair-one-step")
        if not 0 <= args.pair_timestep <= 999:
            p.error(
                f"expected --pair-timestep in [0, 999] (the teacher's table), but got {args.pair_timestep}"
            )
        cfg.pair_generator_timestep = args.pair_timestep
    if args.eval_draws is not None:
        if args.eval_draws < 1:
            p.error(f"expected --eval-draws >= 1, but got {args.eval_draws}")
        cfg.eval_draws = args.eval_draws
    if args.sim_timestep is not None:
        if not 0 <= args.sim_timestep <= 999:
            p.error(f"expected --sim-timestep in [0, 999] (the teacher's table), but got {args.sim_timestep}")
        if args.sim_timestep == 999 and args.sim_input == "noised":
            p.error("--sim-timestep 999 is DMD2's grid as is, with z itself: drop --sim-input noised")
        cfg.sim_generator_timestep = None if args.sim_timestep == 999 else args.sim_timestep
    run_demo(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
