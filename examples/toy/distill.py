"""The ``make demo`` run: distill the shipped toy teacher into 1-, 2- and 4-step students on a laptop CPU.

Four students, each starting from the teacher (as real distillations do), each trained with public
``diffdistill`` APIs only:

* ``lcm`` - latent consistency distillation (:func:`~diffdistill.losses.lcm_consistency_loss`, EMA
  target, teacher DDIM skips of 20 steps, x0-parameterised student), sampled with
  :func:`~diffdistill.schedulers.lcm_sample`.
* ``sim`` - score implicit matching (:func:`~diffdistill.losses.sim_loss` against the teacher, a fake
  score trained with :func:`~diffdistill.losses.fake_score_loss`), DMD2-style backward simulation on
  the 4-step grid, sampled with :func:`~diffdistill.schedulers.x0_renoise_sample`.
* ``adversarial`` - SDXL-Lightning-style: MSE to the teacher's ODE solution plus a non-saturating GAN
  term from a :class:`~diffdistill.discriminators.UNetEncoderDiscriminator` (a trainable copy of the
  teacher's encoder + mid block) that judges samples re-noised by
  :func:`~diffdistill.losses.renoise_for_discriminator`.
* ``regression`` - Diffusion2GAN-style regression of teacher ODE (noise, image) pairs with a
  :class:`~diffdistill.losses.LatentLPIPS` distance. The toy has no VAE, so the "latent" is the
  16×16 RGB image space-to-depth folded to 48 × 4 × 4, and the VGG trunk is **randomly initialised**
  (no download): a random-feature perceptual distance, not the trained E-LatentLPIPS.

All four students start from an x0-prediction conversion of the teacher
(:func:`~diffdistill.losses.x0_conversion_loss`, SDXL-Lightning Eq. 29), which one-step generation
needs. The adversarial and regression students use deterministic DDIM over trailing timesteps
(999 | 999, 499 | 999, 749, 499, 249), the states their teacher ODE pairs come from.

Quality is measured without downloads by a small classifier trained on the same synthetic shapes
(``metrics.py``): the Fréchet distance of its features to real images (FD, lower is better) and the
class accuracy of the samples. Writes ``grid.png`` and ``results.md`` to ``--out`` and prints the table::

    make demo        # = .venv/bin/python examples/toy/distill.py
"""

from __future__ import annotations

import argparse
import copy
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
    x0_conversion_loss,
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
from diffdistill.students import EMA  # noqa: E402

METHODS = ("lcm", "sim", "adversarial", "regression")
STEP_COUNTS = (1, 2, 4)


@dataclass
class DemoConfig:
    """Sizes of one run; :func:`quick_config` is the test's reduced run."""

    batch: int = 32
    lr: float = 1e-4
    convert_steps: int = 100
    lcm_steps: int = 120
    sim_steps: int = 80
    adversarial_steps: int = 120
    regression_steps: int = 120
    num_pairs: int = 512
    pair_teacher_steps: int = 20  # a multiple of 4 dividing 1000, so the trailing grid contains 749, 499, 249
    eval_samples: int = 256
    classifier_steps: int = 300
    teacher_eval_steps: tuple[int, ...] = (50, 4, 2, 1)
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    weights: Path = WEIGHTS


def quick_config() -> DemoConfig:
    """A reduced run for tests (< 1 min): fewer steps, the regression student only."""
    return DemoConfig(
        convert_steps=30,
        regression_steps=40,
        num_pairs=64,
        pair_teacher_steps=8,
        eval_samples=128,
        classifier_steps=150,
        teacher_eval_steps=(1,),
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


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99))


def _x0(
    net: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, cond: dict
) -> torch.Tensor:
    return schedule.to_x0(net(x, t, **cond).sample, x, t, "sample")


def convert_to_x0(toy: Toy, cfg: DemoConfig) -> nn.Module:
    """An x0-prediction copy of the teacher (SDXL-Lightning Eq. 29): the generators' starting point."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    net = toy.trainable_copy()
    opt = _adam(net.parameters(), 3 * cfg.lr)
    for _ in _bar(cfg.convert_steps, "x0 conversion"):
        x0, y = sample_shapes(cfg.batch, g)
        # Emphasise large t, where one-step generation lives.
        t = (torch.rand(cfg.batch, generator=g).sqrt() * 999).long()
        x_t = toy.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        loss, _ = x0_conversion_loss(net, toy.unet, x_t, t, toy.cond(y), schedule=toy.schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


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


def train_lcm(toy: Toy, init: nn.Module, cfg: DemoConfig) -> nn.Module:
    g = torch.Generator().manual_seed(cfg.seed + 10)
    net = copy.deepcopy(init)
    target = EMA(net, decay=0.95)
    opt = _adam(net.parameters(), cfg.lr)
    for _ in _bar(cfg.lcm_steps, "lcm"):
        x0, y = sample_shapes(cfg.batch, g)
        loss, _ = lcm_consistency_loss(
            net,
            toy.solver,
            x0,
            toy.cond(y),
            target=target,
            num_ddim_timesteps=50,
            distance="mse",
            prediction_type="sample",
            generator=g,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(net)
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


def train_sim(toy: Toy, init: nn.Module, cfg: DemoConfig) -> nn.Module:
    g = torch.Generator().manual_seed(cfg.seed + 20)
    net = copy.deepcopy(init)
    fake = toy.trainable_copy()
    opt_g, opt_f = _adam(net.parameters(), 0.3 * cfg.lr), _adam(fake.parameters(), 3 * cfg.lr)
    grid = dmd2_timesteps(4)
    for _ in _bar(cfg.sim_steps, "sim"):
        y = _labels(cfg.batch, g)
        cond = toy.cond(y)
        x_in, t_in = _backward_simulate(net, toy, grid, cond, cfg.batch, g)
        x_g = _x0(net, toy.schedule, x_in, t_in, cond)
        f_loss, _ = fake_score_loss(fake, x_g.detach(), schedule=toy.schedule, cond=cond, generator=g)
        opt_f.zero_grad()
        f_loss.backward()
        opt_f.step()
        fake.requires_grad_(False)
        loss, _ = sim_loss(
            x_g, toy.solver, fake, schedule=toy.schedule, cond=cond, fake_cond=cond, generator=g
        )
        fake.requires_grad_(True)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    return net


def train_adversarial(toy: Toy, init: nn.Module, pairs: Pairs, cfg: DemoConfig) -> nn.Module:
    g = torch.Generator().manual_seed(cfg.seed + 30)
    net = copy.deepcopy(init)
    disc = UNetEncoderDiscriminator(toy.unet, conditional=False, norm_groups=16)
    opt_g, opt_d = _adam(net.parameters(), cfg.lr), _adam(disc.parameters(), cfg.lr)
    for _ in _bar(cfg.adversarial_steps, "adversarial"):
        x_t, t, y, target = pairs.batch(cfg.batch, g)
        cond = toy.cond(y)
        x_g = _x0(net, toy.schedule, x_t, t, cond)
        renoised = renoise_for_discriminator(target, x_g.detach(), schedule=toy.schedule, generator=g)
        (real_t, fake_t), t_star = renoised.samples, renoised.t
        d_loss, _ = gan_discriminator_loss(disc(real_t, t_star, **cond), disc(fake_t, t_star, **cond))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        disc.requires_grad_(False)
        fake_noised = toy.schedule.add_noise(x_g, renoised.noise[1], t_star)
        g_adv, _ = gan_generator_loss(disc(fake_noised, t_star, **cond))
        disc.requires_grad_(True)
        loss = F.mse_loss(x_g, target) + 0.01 * g_adv
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    return net


def train_regression(toy: Toy, init: nn.Module, pairs: Pairs, cfg: DemoConfig) -> nn.Module:
    g = torch.Generator().manual_seed(cfg.seed + 40)
    net = copy.deepcopy(init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        lpips = LatentLPIPS(latent=48)  # random-init trunk on 48 x 4 x 4 space-to-depth pixels
    opt = _adam(net.parameters(), 3 * cfg.lr)
    for _ in _bar(cfg.regression_steps, "regression"):
        x_t, t, y, target = pairs.batch(cfg.batch, g)
        x_g = _x0(net, toy.schedule, x_t, t, toy.cond(y))
        perceptual = lpips(F.pixel_unshuffle(x_g, 4), F.pixel_unshuffle(target, 4))
        loss = perceptual + F.mse_loss(x_g, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def sampler(
    method: str, net: nn.Module, toy: Toy
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``sample(noise, labels, steps)`` for a student (or ``method == "teacher"``: DDIM trailing)."""

    @torch.no_grad()
    def run(noise: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
        cond = toy.cond(labels)
        g = torch.Generator().manual_seed(123)
        if method == "teacher":
            return ddim_sample(
                toy.unet, toy.schedule, noise, spaced_timesteps(steps, "trailing"), cond=cond
            ).sample
        if method == "lcm":
            ts = lcm_timesteps(steps, original_inference_steps=50)
            return lcm_sample(
                net, toy.schedule, noise, ts, cond=cond, prediction_type="sample", generator=g
            ).sample
        if method == "sim":
            ts = dmd2_timesteps(4)[:: 4 // steps]
            return x0_renoise_sample(
                net, toy.schedule, noise, ts, cond=cond, prediction_type="sample", generator=g
            ).sample
        ts = spaced_timesteps(steps, "trailing")
        return ddim_sample(net, toy.schedule, noise, ts, cond=cond, prediction_type="sample").sample

    return run


def _batched(
    fn: Callable[..., torch.Tensor], noise: torch.Tensor, labels: torch.Tensor, steps: int
) -> torch.Tensor:
    return torch.cat([fn(noise[i : i + 64], labels[i : i + 64], steps) for i in range(0, noise.shape[0], 64)])


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


def run_demo(cfg: DemoConfig, out: Path | None) -> dict[str, dict[int, dict[str, float]]]:
    """Train the students, evaluate everything, write ``grid.png``/``results.md`` under ``out``; returns
    ``{model: {steps: {"fd", "acc"}}}``."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    toy = Toy(cfg.weights)
    classifier = train_classifier(cfg.seed, steps=cfg.classifier_steps)
    g = torch.Generator().manual_seed(cfg.seed + 99)
    labels = torch.arange(cfg.eval_samples) % NUM_CLASSES
    noise = torch.randn(cfg.eval_samples, 3, 16, 16, generator=g)
    reference, _ = sample_shapes(1024, g)

    students: dict[str, nn.Module] = {}
    init = convert_to_x0(toy, cfg) if cfg.methods else None
    pairs = Pairs(toy, cfg) if {"adversarial", "regression"} & set(cfg.methods) else None
    for method in cfg.methods:
        t0 = time.time()
        if method == "lcm":
            students[method] = train_lcm(toy, init, cfg)  # type: ignore[arg-type]
        elif method == "sim":
            students[method] = train_sim(toy, init, cfg)  # type: ignore[arg-type]
        elif method == "adversarial":
            students[method] = train_adversarial(toy, init, pairs, cfg)  # type: ignore[arg-type]
        elif method == "regression":
            students[method] = train_regression(toy, init, pairs, cfg)  # type: ignore[arg-type]
        else:
            raise ValueError(f"Expected methods from {list(METHODS)}, but got {method!r}.")
        students[method].eval()
        print(f"{method}: trained in {time.time() - t0:.0f} s", flush=True)

    results: dict[str, dict[int, dict[str, float]]] = {"teacher": {}}
    grid_rows: list[tuple[str, torch.Tensor]] = []
    show = torch.cat([torch.arange(i, cfg.eval_samples, NUM_CLASSES)[:3] for i in range(NUM_CLASSES)])
    teacher = sampler("teacher", toy.unet, toy)
    for steps in _bar_list(cfg.teacher_eval_steps, "evaluate teacher"):
        x = _batched(teacher, noise, labels, steps)
        results["teacher"][steps] = evaluate_samples(classifier, x, labels, reference)
        if steps == max(cfg.teacher_eval_steps):
            grid_rows.append((f"teacher DDIM {steps}", x[show]))
    for method, net in students.items():
        results[method] = {}
        fn = sampler(method, net, toy)
        for steps in STEP_COUNTS:
            x = _batched(fn, noise, labels, steps)
            results[method][steps] = evaluate_samples(classifier, x, labels, reference)
            grid_rows.append((f"{method} {steps}-step", x[show]))
    seconds = time.time() - start
    table = markdown_table(results, seconds)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_grid(grid_rows, out / "grid.png")
        header = "columns: " + ", ".join(f"{c} ({n})" for c, n in zip(range(NUM_CLASSES), CLASS_NAMES))
        (out / "results.md").write_text(table + "\n\nGrid " + header + ", 3 samples each.\n")
        print(f"wrote {out / 'grid.png'} and {out / 'results.md'}")
    return results


def _bar_list(items: tuple[int, ...], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def markdown_table(results: dict[str, dict[int, dict[str, float]]], seconds: float) -> str:
    lines = [
        "| model | steps | FD (lower is better) | class accuracy |",
        "|---|---:|---:|---:|",
    ]
    for model, by_steps in results.items():
        name = "teacher (DDIM)" if model == "teacher" else f"student: {model}"
        for steps, m in by_steps.items():
            lines.append(f"| {name} | {steps} | {m['fd']:.2f} | {m['acc']:.1%} |")
    lines.append("")
    lines.append(f"Total run time: {seconds / 60:.1f} min ({torch.get_num_threads()} thread(s)).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/toy_demo"))
    p.add_argument("--quick", action="store_true", help="the reduced test run")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else DemoConfig()
    if args.methods:
        cfg.methods = tuple(args.methods)
    run_demo(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
