"""Toy proof that each loss family distills: sliced Wasserstein distance (lower is better) between
1-, 2- and 4-step samples and the true 2-D Gaussian mixture, for the exact teacher (DDIM), an untrained
student, and a student trained with each method, as mean ± sd over seeds.

    python benchmarks/toy_losses.py --mixture hard --seeds 0 1      # issue 20's check: 3x256 MLP, batch 512,
                                                                    # 3000 steps
    python benchmarks/toy_losses.py --mixture easy --seeds 0 1      # std 0.1 on radius 1.5: 3x128, batch 256,
                                                                    # 1500 steps
    python benchmarks/toy_losses.py --schedule flow --mixture hard --seeds 0 1   # the same mixtures under a
    python benchmarks/toy_losses.py --schedule flow --mixture easy --seeds 0 1   # rectified-flow teacher
                                                                    # (shift 3 as SD3; --shift to change it)

Ablations behind the library's recipes (losses/score.py, losses/adversarial.py docstrings):

    python benchmarks/toy_losses.py --methods sim dmd --generator-timestep 999 --generator-ema 0  # the ring
    python benchmarks/toy_losses.py --methods sim dmd --generator-timestep 999   # EMA only
    python benchmarks/toy_losses.py --methods sim dmd --generator-ema 0          # input timestep only
    python benchmarks/toy_losses.py --methods regression adversarial --teacher-steps 4 --gan-real data
    python benchmarks/toy_losses.py --methods gan --r1-gamma 1

Prints a Markdown table (README: "Toy proof"). One-step generators (sim, dmd, regression, adversarial, gan)
are sampled in one step only ("-" for 2 and 4). The test suite runs a reduced version
(tests/losses/test_toy_distillation.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from toy_gmm import (
    METHODS,
    GaussianMixture,
    TimeMLP,
    ToyConfig,
    _teacher_samples,
    evaluate,
    fit_to_teacher,
    generator_timestep,
    make_schedule,
    run_method,
    sliced_wasserstein,
)

#: Sizes per mixture: the hard one is issue 20's independent check (3x256 MLP, batch 512, 3000 steps).
PRESETS = {
    "easy": {"steps": 1500, "batch": 256, "hidden": 128},
    "hard": {"steps": 3000, "batch": 512, "hidden": 256},
}


def _cell(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", choices=["easy", "hard"], default="hard")
    parser.add_argument(
        "--schedule",
        choices=["vp", "flow"],
        default="vp",
        help="teacher schedule: SD's VP, or rectified flow",
    )
    parser.add_argument("--shift", type=float, default=3.0, help="flow schedule's shift (SD3: 3.0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the mixture's)")
    parser.add_argument(
        "--generator-timestep",
        type=int,
        default=None,
        help="input timestep of the one-step score generators (default: EDM sigma 2.5: 625 on VP, 454 on flow)",
    )
    parser.add_argument("--generator-ema", type=float, default=0.995, help="EMA decay of one-step generators")
    parser.add_argument("--gan-weight", type=float, default=0.1, help="GAN weight of 'adversarial'")
    parser.add_argument(
        "--gan-real", choices=["teacher", "data"], default="teacher", help="D's real samples in 'adversarial'"
    )
    parser.add_argument(
        "--mlcm-states", choices=["teacher", "data"], default="teacher", help="MLCM's training states"
    )
    parser.add_argument("--r1-gamma", type=float, default=0.0, help="R1 weight of the discriminator (0: off)")
    parser.add_argument(
        "--teacher-steps", type=int, default=32, help="teacher DDIM steps of regression targets"
    )
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (tiny MLPs: 1 is fastest)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.mixture])
    if args.steps is not None:
        preset["steps"] = args.steps
    sched, gm = make_schedule(args.schedule, args.shift), GaussianMixture.named(args.mixture)
    teacher = "DDIM" if args.schedule == "vp" else "Euler"  # the same move: DDIM is flow's exact Euler step
    start = time.perf_counter()
    rows: dict[str, list[dict[int, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in args.seeds:
        cfg = ToyConfig(
            fit_steps=args.fit_steps,
            eval_samples=args.samples,
            seed=seed,
            generator_timestep=args.generator_timestep,
            generator_ema=args.generator_ema,
            gan_weight=args.gan_weight,
            r1_gamma=args.r1_gamma,
            gan_real=args.gan_real,
            mlcm_states=args.mlcm_states,
            teacher_steps=args.teacher_steps,
            **preset,
        )
        rows.setdefault(f"teacher (exact), {teacher}", []).append(evaluate("teacher", None, gm, sched, cfg))
        torch.manual_seed(seed)
        untrained = TimeMLP(hidden=cfg.hidden, prediction_type=sched.prediction_type)
        rows.setdefault("untrained student (random init)", []).append(
            evaluate("lcm", untrained, gm, sched, cfg)
        )
        init = fit_to_teacher(gm, sched, cfg)
        for method in args.methods:
            t0 = time.perf_counter()  # training only: the shared teacher fit and the evaluations are excluded
            net = run_method(method, gm, sched, init, cfg)
            seconds.setdefault(method, []).append(time.perf_counter() - t0)
            rows.setdefault(method, []).append(evaluate(method, net, gm, sched, cfg))
            print(f"seed {seed} {method}: {rows[method][-1]}", flush=True)
    g = torch.Generator().manual_seed(99)
    truth, other = gm.sample(args.samples, g), gm.sample(args.samples, g)
    floor = sliced_wasserstein(truth, other, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(args.samples, 2, generator=g)
    sw50 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 50), truth, generator=torch.Generator().manual_seed(5)
    )
    print(
        f"\nSchedule {sched!r}; score generators' input timestep "
        f"{generator_timestep('sim', cfg, sched)}\n"
        f"Mixture {args.mixture!r} {gm.means.norm(dim=1)[0]:.1f}-radius circle, mode std {gm.std}; "
        f"data vs data SW = {floor:.3f}; teacher {teacher} 50 steps SW = {sw50:.3f}\n"
    )
    print(f"| model ({len(args.seeds)} seeds, mean ± sd) | 1 step | 2 steps | 4 steps | train s |")
    print("|---|---|---|---|---|")
    for name, evals in rows.items():
        secs = f"{statistics.mean(seconds[name]):.0f}" if name in seconds else "-"
        cells = [_cell([e[k] for e in evals]) for k in (1, 2, 4)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {secs} |")
    print(
        f"\n{preset}, fit_steps {args.fit_steps}, generator_timestep {args.generator_timestep}, generator_ema "
        f"{args.generator_ema}, gan_weight {args.gan_weight}, gan_real {args.gan_real}, mlcm_states "
        f"{args.mlcm_states}, r1_gamma {args.r1_gamma}, teacher_steps "
        f"{args.teacher_steps}, seeds {args.seeds}; total {time.perf_counter() - start:.0f} s, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
