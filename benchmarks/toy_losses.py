"""Toy proof that each loss family distills: sliced Wasserstein distance (lower is better) between
1-, 2- and 4-step samples and the true 2-D Gaussian mixture, for the exact teacher (DDIM), an untrained
student, the teacher-initialised network before distillation, and a student trained with each method.

    python benchmarks/toy_losses.py [--steps 1500] [--fit-steps 1500] [--samples 4000] [--threads 1]

Prints a Markdown table (README: "Toy proof"). The test suite runs a reduced version
(tests/losses/test_toy_distillation.py).
"""

from __future__ import annotations

import argparse
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
    initial_network,
    run_method,
    sliced_wasserstein,
)

from diffdistill.schedulers import NoiseSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (tiny MLPs: 1 is fastest)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(steps=args.steps, fit_steps=args.fit_steps, eval_samples=args.samples, seed=args.seed)
    sched, gm = NoiseSchedule.from_betas(), GaussianMixture()
    start = time.perf_counter()
    init = fit_to_teacher(gm, sched, cfg)
    fit_seconds = time.perf_counter() - start
    rows = []
    g = torch.Generator().manual_seed(cfg.seed + 99)
    truth, noise = gm.sample(cfg.eval_samples, g), torch.randn(cfg.eval_samples, 2, generator=g)
    sw50 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 50), truth, generator=torch.Generator().manual_seed(5)
    )
    rows.append(("teacher (exact), DDIM", evaluate("teacher", None, gm, sched, cfg), "-"))
    rows.append(("untrained student (random init)", evaluate("lcm", TimeMLP(), gm, sched, cfg), "-"))
    for method in METHODS:
        before = evaluate(method, initial_network(method, init), gm, sched, cfg)
        rows.append((f"{method}: teacher-initialised, before", before, "-"))
        t0 = time.perf_counter()  # training only: the shared teacher fit and the evaluations are excluded
        net = run_method(method, gm, sched, init, cfg)
        train_seconds = time.perf_counter() - t0
        rows.append((f"{method}: distilled", evaluate(method, net, gm, sched, cfg), f"{train_seconds:.0f}"))
    print(f"Teacher, DDIM 50 steps: SW = {sw50:.3f}\n")
    print("| model | 1 step | 2 steps | 4 steps | train s |")
    print("|---|---|---|---|---|")
    for name, sw, secs in rows:
        print(f"| {name} | {sw[1]:.3f} | {sw[2]:.3f} | {sw[4]:.3f} | {secs} |")
    print(
        f"\n{cfg}; shared fit to the teacher {fit_seconds:.0f} s (not in 'train s'); "
        f"total {time.perf_counter() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
