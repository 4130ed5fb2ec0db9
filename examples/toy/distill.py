"""The ``make demo`` run: distill the shipped toy teacher into 1-, 2- and 4-step students on a laptop CPU.

Four students, each a trainable copy of the epsilon-prediction teacher (as real distillations start),
each trained with public ``diffdistill`` APIs only:

* ``lcm`` - latent consistency distillation (:func:`~diffdistill.losses.lcm_consistency_loss`): teacher
  DDIM jumps of 250 steps on the 4-step grid, the online model under no_grad as its own target (as
  LCM-LoRA trains), sampled with :func:`~diffdistill.schedulers.lcm_sample`.
* ``sim`` - score implicit matching (:func:`~diffdistill.losses.sim_loss` against the teacher, a fake
  score trained with :func:`~diffdistill.losses.fake_score_loss`), DMD2-style backward simulation on
  the 4-step grid, sampled with :func:`~diffdistill.schedulers.x0_renoise_sample`.
* ``adversarial`` - MSE to the teacher's ODE solution plus a non-saturating GAN term from a
  :class:`~diffdistill.discriminators.UNetEncoderDiscriminator` (SDXL-Lightning's discriminator: a
  trainable copy of the teacher's encoder + mid block) that judges samples re-noised by
  :func:`~diffdistill.losses.renoise_for_discriminator`.
* ``regression`` - Diffusion2GAN-style regression of teacher ODE (noise, image) pairs with a
  :class:`~diffdistill.losses.LatentLPIPS` distance plus MSE. The toy has no VAE, so the "latent" is
  the 16×16 RGB image space-to-depth folded to 48 × 4 × 4, and the VGG trunk is **randomly
  initialised** (no download): a random-feature perceptual distance, not the trained E-LatentLPIPS.

The students keep the teacher's epsilon prediction; at t = 999 its x0 amplifies output errors by
sigma/alpha = 14.6, so they train with small learning rates (``DemoConfig``). The adversarial and
regression students sample with deterministic DDIM over trailing timesteps (999 | 999, 499 | 999,
749, 499, 249), the states their teacher ODE pairs come from.

Quality is measured without downloads by a small classifier trained on the same synthetic shapes
(``metrics.py``): the Fréchet distance of its features to real images (FD, lower is better) and the
class accuracy of the samples (FD compares marginal distributions, so it does not see a well-formed
sample of the wrong class; accuracy does). Each number is a mean ± sd over ``eval_draws`` draws of
``eval_samples`` samples; a draw fixes the initial noises and the re-noising generator of the stochastic
samplers, the same for every row. The baseline of each student is the teacher run through *that
student's* sampler (DDIM, the LCM sampler or the x0 re-noise sampler) at the same step count; the
``results.md`` comparison table gives the per-draw paired differences. Writes ``grid.png`` and
``results.md`` (tables and per-stage wall times) to ``--out`` and prints them::

    make demo        # = .venv/bin/python examples/toy/distill.py
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

from metrics import evaluate_samples, train_classifier  # noqa: E402
from shapes import CLASS_NAMES, NUM_CLASSES, sample_shapes  # noqa: E402
from train_teacher import CONFIG, WEIGHTS, class_condition, load_teacher  # noqa: E402

from diffdistill.discriminators import UNetEncoderDiscriminator  # noqa: E402
from diffdistill.losses import (  # noqa: E402
    LatentLPIPS,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    lcm_consistency_loss,
    renoise_for_discriminator,
    sim_loss,
)
from diffdistill.schedulers import (  # noqa: E402
    NoiseSchedule,
    TeacherSolver,
    ddim_sample,
    dmd2_timesteps,
    lcm_sample,
    lcm_timesteps,
    spaced_timesteps,
    x0_renoise_sample,
)

METHODS = ("lcm", "sim", "adversarial", "regression")
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
    sim_steps: int = 120
    sim_lr: float = 2e-5
    fake_score_lr: float = 1e-4
    adversarial_steps: int = 160
    adversarial_lr: float = 3e-5
    discriminator_lr: float = 1e-4
    adversarial_weight: float = 0.05
    regression_steps: int = 120
    regression_lr: float = 3e-5
    num_pairs: int = 512
    pair_teacher_steps: int = 20  # a multiple of 4 dividing 1000, so the trailing grid contains 749, 499, 249
    eval_draws: int = 4  # noise draws; FD and accuracy are reported as mean ± sd over them
    eval_samples: int = 512  # samples per draw (balanced labels)
    reference_samples: int = 4096  # real images the FD compares against (balanced labels)
    classifier_steps: int = 300
    teacher_extra_ddim_steps: tuple[int, ...] = ()  # teacher DDIM step counts besides 1/2/4 (e.g. 20, 50)
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    weights: Path = WEIGHTS


def quick_config() -> DemoConfig:
    """A reduced run for tests (about 1.5 min on one thread): the regression student only, 80 steps on 128
    teacher pairs, evaluated on 2 draws of 256 samples."""
    return DemoConfig(
        regression_steps=80,
        num_pairs=128,
        pair_teacher_steps=8,
        eval_draws=2,
        eval_samples=256,
        reference_samples=1024,
        methods=("regression",),
    )


class Toy:
    """The frozen teacher with its class table and schedule, and helpers shared by the students."""

    def __init__(self, weights: Path = WEIGHTS) -> None:
        self.unet, self.table, self.schedule = load_teacher(weights, weights.with_name(CONFIG.name))
        self.solver = TeacherSolver(self.unet, self.schedule)

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
    """The clean sample implied by an epsilon-prediction network (teacher and students alike)."""
    return schedule.to_x0(net(x, t, **cond).sample, x, t, "epsilon")


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


def _backward_simulate(
    net: nn.Module, toy: Toy, grid: torch.Tensor, cond: dict, n: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD2 backward simulation: run the generator's first k grid steps (no grad), train at t_k."""
    k = int(torch.randint(0, grid.numel(), (1,), generator=g))
    x = torch.randn(n, 3, 16, 16, generator=g)
    with torch.no_grad():
        for i in range(k):
            x0 = _x0(net, toy.schedule, x, grid[i].expand(n), cond)
            x = toy.schedule.add_noise(x0, torch.randn(x.shape, generator=g), grid[i + 1].expand(n))
    return x, grid[k].expand(n)


def train_sim(toy: Toy, cfg: DemoConfig) -> nn.Module:
    """One-step SIM with an online fake score, trained on the DMD2 4-step grid by backward simulation."""
    g = torch.Generator().manual_seed(cfg.seed + 20)
    net = toy.trainable_copy()
    fake = toy.trainable_copy()
    opt_g = _Optimizer(net, cfg.sim_lr, cfg.sim_steps)
    opt_f = _Optimizer(fake, cfg.fake_score_lr, cfg.sim_steps, decay=False)
    grid = dmd2_timesteps(4)
    for _ in _bar(cfg.sim_steps, "sim"):
        y = _labels(cfg.batch, g)
        cond = toy.cond(y)
        x_in, t_in = _backward_simulate(net, toy, grid, cond, cfg.batch, g)
        x_g = _x0(net, toy.schedule, x_in, t_in, cond)
        f_loss, _ = fake_score_loss(fake, x_g.detach(), schedule=toy.schedule, cond=cond, generator=g)
        opt_f.step(f_loss)
        fake.requires_grad_(False)
        loss, _ = sim_loss(
            x_g, toy.solver, fake, schedule=toy.schedule, cond=cond, fake_cond=cond, generator=g
        )
        fake.requires_grad_(True)
        opt_g.step(loss)
    return net


def train_adversarial(toy: Toy, pairs: Pairs, cfg: DemoConfig) -> nn.Module:
    """MSE to teacher ODE solutions plus a GAN term from a UNet-encoder discriminator on re-noised samples."""
    g = torch.Generator().manual_seed(cfg.seed + 30)
    net = toy.trainable_copy()
    disc = UNetEncoderDiscriminator(toy.unet, conditional=False, norm_groups=16)
    opt_g = _Optimizer(net, cfg.adversarial_lr, cfg.adversarial_steps)
    opt_d = _Optimizer(disc, cfg.discriminator_lr, cfg.adversarial_steps, decay=False)
    for _ in _bar(cfg.adversarial_steps, "adversarial"):
        x_t, t, y, target = pairs.batch(cfg.batch, g)
        cond = toy.cond(y)
        x_g = _x0(net, toy.schedule, x_t, t, cond)
        renoised = renoise_for_discriminator(target, x_g.detach(), schedule=toy.schedule, generator=g)
        (real_t, fake_t), t_star = renoised.samples, renoised.t
        d_loss, _ = gan_discriminator_loss(disc(real_t, t_star, **cond), disc(fake_t, t_star, **cond))
        opt_d.step(d_loss)
        disc.requires_grad_(False)
        fake_noised = toy.schedule.add_noise(x_g, renoised.noise[1], t_star)
        g_adv, _ = gan_generator_loss(disc(fake_noised, t_star, **cond))
        disc.requires_grad_(True)
        loss = F.mse_loss(x_g, target) + cfg.adversarial_weight * g_adv
        opt_g.step(loss)
    return net


def train_regression(toy: Toy, pairs: Pairs, cfg: DemoConfig) -> nn.Module:
    """Diffusion2GAN-style regression of teacher ODE pairs with a LatentLPIPS distance plus MSE."""
    g = torch.Generator().manual_seed(cfg.seed + 40)
    net = toy.trainable_copy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        lpips = LatentLPIPS(latent=48, weights=None)  # random-init trunk on 48 x 4 x 4 space-to-depth pixels
    opt = _Optimizer(net, cfg.regression_lr, cfg.regression_steps)
    for _ in _bar(cfg.regression_steps, "regression"):
        x_t, t, y, target = pairs.batch(cfg.batch, g)
        x_g = _x0(net, toy.schedule, x_t, t, toy.cond(y))
        perceptual = lpips(F.pixel_unshuffle(x_g, 4), F.pixel_unshuffle(target, 4))
        loss = perceptual + F.mse_loss(x_g, target)
        opt.step(loss)
    return net


#: The sampler each student is evaluated with; the teacher is run through every one of them too.
SAMPLER_OF = {"lcm": "lcm", "sim": "x0_renoise", "adversarial": "ddim", "regression": "ddim"}
SAMPLER_NAMES = {"ddim": "DDIM", "lcm": "LCM sampler", "x0_renoise": "x0 re-noise sampler"}

SampleFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]


def sampler(kind: str, net: nn.Module, toy: Toy, lcm_grid: int = DemoConfig.lcm_ddim_timesteps) -> SampleFn:
    """``sample(noise, labels, steps, generator)`` running ``net`` (a student or the teacher) with one of
    the students' samplers: ``"ddim"`` (deterministic, trailing timesteps), ``"lcm"`` (:func:`lcm_sample`
    on ``lcm_timesteps(steps, original_inference_steps=lcm_grid)``) or ``"x0_renoise"``
    (:func:`x0_renoise_sample` on ``dmd2_timesteps(4)[:: 4 // steps]``). The stochastic samplers draw their
    re-noising from ``generator``, which the caller creates once per evaluation and passes through every
    chunk (so each sample gets its own draws)."""
    if kind not in SAMPLER_NAMES:
        raise ValueError(f"Expected a sampler from {list(SAMPLER_NAMES)}, but got {kind!r}.")

    @torch.no_grad()
    def run(
        noise: torch.Tensor, labels: torch.Tensor, steps: int, generator: torch.Generator
    ) -> torch.Tensor:
        cond = toy.cond(labels)
        if kind == "lcm":
            ts = lcm_timesteps(steps, original_inference_steps=lcm_grid)
            return lcm_sample(net, toy.schedule, noise, ts, cond=cond, generator=generator).sample
        if kind == "x0_renoise":
            ts = dmd2_timesteps(4)[:: 4 // steps]
            return x0_renoise_sample(net, toy.schedule, noise, ts, cond=cond, generator=generator).sample
        return ddim_sample(net, toy.schedule, noise, spaced_timesteps(steps, "trailing"), cond=cond).sample

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

    @property
    def short_label(self) -> str:
        """The grid's row label (fits 150 px)."""
        short = {"ddim": "DDIM", "lcm": "LCM", "x0_renoise": "x0-renoise"}[self.kind]
        return f"teacher {short}" if self.key.startswith("teacher:") else self.key


def evaluation_rows(methods: tuple[str, ...], teacher_ddim_steps: tuple[int, ...] = ()) -> list[EvalRow]:
    """The table's rows, grouped by sampler: the teacher under each sampler a student uses (the
    "teacher, same sampler" baseline, at every student step count; under DDIM also at
    ``teacher_ddim_steps``), then the students sampled that way."""
    rows: list[EvalRow] = []
    for kind in SAMPLER_NAMES:
        users = [m for m in methods if SAMPLER_OF[m] == kind]
        if kind == "ddim":
            rows.append(
                EvalRow("teacher:ddim", "ddim", tuple(sorted(set(teacher_ddim_steps) | set(STEP_COUNTS))))
            )
        elif users:
            rows.append(EvalRow(f"teacher:{kind}", kind, STEP_COUNTS))
        rows.extend(EvalRow(m, kind, STEP_COUNTS) for m in users)
    return rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
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
    ``{row key: {steps: {"fd", "fd_sd", "acc", "acc_sd", "fd_draws", "acc_draws"}}}`` (means and sample
    standard deviations over the draws); row keys are the student methods and ``"teacher:<sampler>"``.
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

    seconds: dict[str, float] = {}
    students: dict[str, nn.Module] = {}
    pairs = None
    if {"adversarial", "regression"} & set(cfg.methods):
        t0 = time.time()
        pairs = Pairs(toy, cfg)
        seconds["teacher ODE pairs (adversarial, regression)"] = time.time() - t0
    for method in cfg.methods:
        t0 = time.time()
        if method == "lcm":
            students[method] = train_lcm(toy, cfg)
        elif method == "sim":
            students[method] = train_sim(toy, cfg)
        elif method == "adversarial":
            students[method] = train_adversarial(toy, pairs, cfg)  # type: ignore[arg-type]
        elif method == "regression":
            students[method] = train_regression(toy, pairs, cfg)  # type: ignore[arg-type]
        else:
            raise ValueError(f"Expected methods from {list(METHODS)}, but got {method!r}.")
        students[method].eval()
        seconds[f"train {method}"] = time.time() - t0
        print(f"{method}: trained in {seconds[f'train {method}']:.0f} s", flush=True)

    t0 = time.time()
    rows = evaluation_rows(cfg.methods, cfg.teacher_extra_ddim_steps)
    results: Results = {}
    grid_rows: list[tuple[str, torch.Tensor]] = []
    show = torch.cat([torch.arange(i, cfg.eval_samples, NUM_CLASSES)[:3] for i in range(NUM_CLASSES)])
    for row in _bar_list(rows, "evaluate"):
        net = toy.unet if row.key.startswith("teacher:") else students[row.key]
        fn = sampler(row.kind, net, toy, cfg.lcm_ddim_timesteps)
        results[row.key] = {}
        for steps in row.steps:
            fds, accs = [], []
            for draw in range(cfg.eval_draws):
                x = _batched(fn, noises[draw], labels, steps, renoise_generator(cfg.seed, draw))
                m = evaluate_samples(classifier, x, labels, reference)
                fds.append(m["fd"])
                accs.append(m["acc"])
                if draw == 0:
                    grid_rows.append((f"{row.short_label} {steps}", x[show]))
            fd, fd_sd = _mean_sd(fds)
            acc, acc_sd = _mean_sd(accs)
            results[row.key][steps] = {
                "fd": fd,
                "fd_sd": fd_sd,
                "acc": acc,
                "acc_sd": acc_sd,
                "fd_draws": fds,
                "acc_draws": accs,
            }
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
        print(f"wrote {out / 'grid.png'} and {out / 'results.md'}")
    return results


def _bar_list(items: list[EvalRow], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def markdown_table(rows: list[EvalRow], results: Results, cfg: DemoConfig) -> str:
    """One line per row and step count: FD and class accuracy, mean ± sd over the draws."""
    lines = [
        f"FD and class accuracy: mean ± sd over {cfg.eval_draws} draws of {cfg.eval_samples} samples "
        f"(--seed {cfg.seed}; reference: {cfg.reference_samples} real images).",
        "",
        "| model | sampler | steps | FD (lower is better) | class accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        name = "teacher" if row.key.startswith("teacher:") else f"student: {row.key}"
        for steps, m in results[row.key].items():
            lines.append(
                f"| {name} | {SAMPLER_NAMES[row.kind]} | {steps} | {m['fd']:.1f} ± {m['fd_sd']:.1f} "
                f"| {m['acc']:.1%} ± {m['acc_sd']:.1%} |"
            )
    return "\n".join(lines)


def comparison_table(rows: list[EvalRow], results: Results, cfg: DemoConfig) -> str:
    """Each student minus the teacher under the same sampler and step count, paired by draw (same noises
    and re-noising draws): mean ± sd of the per-draw differences and how many draws the student won."""
    lines = [
        f"Student minus teacher under the same sampler, paired over the {cfg.eval_draws} draws "
        "(ΔFD < 0 and Δaccuracy > 0 favour the student; wins = draws where the student is better).",
        "",
        "| student | sampler | steps | ΔFD | FD wins | Δaccuracy (points) | accuracy wins |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.key.startswith("teacher:"):
            continue
        teacher = results[f"teacher:{row.kind}"]
        for steps, m in results[row.key].items():
            t = teacher[steps]
            d_fd = [a - b for a, b in zip(m["fd_draws"], t["fd_draws"])]
            d_acc = [100 * (a - b) for a, b in zip(m["acc_draws"], t["acc_draws"])]
            (fd, fd_sd), (acc, acc_sd) = _mean_sd(d_fd), _mean_sd(d_acc)
            lines.append(
                f"| {row.key} | {SAMPLER_NAMES[row.kind]} | {steps} | {fd:+.1f} ± {fd_sd:.1f} "
                f"| {sum(d < 0 for d in d_fd)}/{len(d_fd)} | {acc:+.1f} ± {acc_sd:.1f} "
                f"| {sum(d > 0 for d in d_acc)}/{len(d_acc)} |"
            )
    return "\n".join(lines)


def timing_table(seconds: dict[str, float], cfg: DemoConfig) -> str:
    budgets = {
        "teacher ODE pairs (adversarial, regression)": f"{cfg.num_pairs} × {cfg.pair_teacher_steps}-step teacher DDIM",
        "lcm": f"{cfg.lcm_steps} steps on real images (batch {cfg.batch}), lr {cfg.lcm_lr:g}",
        "sim": f"{cfg.sim_steps} steps, no images (backward simulation from noise), lr {cfg.sim_lr:g}",
        "adversarial": f"{cfg.adversarial_steps} steps on {cfg.num_pairs} teacher ODE pairs, lr {cfg.adversarial_lr:g}",
        "regression": f"{cfg.regression_steps} steps on {cfg.num_pairs} teacher ODE pairs, lr {cfg.regression_lr:g}",
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
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument(
        "--seed", type=int, default=0, help="seeds training, the metric classifier and the evaluation noises"
    )
    p.add_argument(
        "--teacher-ddim-steps",
        type=int,
        nargs="+",
        default=(),
        help="also evaluate the teacher with DDIM at these step counts (e.g. 20 50; costs 2048 x steps evaluations)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="torch threads (default: min(4, cores))",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else DemoConfig()
    if args.methods:
        cfg.methods = tuple(args.methods)
    cfg.seed = args.seed
    cfg.teacher_extra_ddim_steps = tuple(args.teacher_ddim_steps)
    run_demo(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
