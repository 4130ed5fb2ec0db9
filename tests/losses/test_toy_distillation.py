"""Toy proof that the losses distill: a 2-D Gaussian-mixture teacher with an exact denoiser (see
``benchmarks/toy_gmm.py``; the longer run with the full table is ``benchmarks/toy_losses.py``).

Every student starts from the same MLP regressed on the teacher (as real students start from teacher
weights; one-step generators from its x0-prediction conversion, SDXL-Lightning Eq. 29) and is trained for a few hundred steps with one method through the public loss APIs. Margins
(documented in the README next to the benchmark table):

* each trained student's few-step samples are at least 10x closer (sliced Wasserstein) to the true
  mixture than an untrained (random-init) student's;
* and at least 15% closer than the teacher-initialised network sampled the same way before
  distillation, i.e. the loss, not the initialisation, makes the few-step sampler good.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from diffdistill.schedulers import NoiseSchedule

# The toy lives beside its benchmark (benchmarks/toy_gmm.py), outside the installed package.
# Only for this import: left on sys.path, benchmarks/lpips.py would shadow the lpips package in later tests.
_BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
sys.path.insert(0, _BENCHMARKS)
try:
    from toy_gmm import (
        METHODS,
        GaussianMixture,
        TimeMLP,
        ToyConfig,
        evaluate,
        fit_to_teacher,
        initial_network,
        run_method,
    )
finally:
    sys.path.remove(_BENCHMARKS)


CFG = ToyConfig(steps=200, fit_steps=400, eval_samples=2000, seed=0)
#: sampling steps checked per method: TSCD with k = 2 segments targets 2-step sampling, MLCM with M = 4
#: milestones 4-step sampling (fewer steps need its inter-segment stage).
CHECKED_STEPS = {"lcm": 1, "tscd": 2, "mlcm": 4, "sim": 1, "dmd": 1, "adversarial": 1}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    sched = NoiseSchedule.from_betas()
    gm = GaussianMixture()
    init = fit_to_teacher(gm, sched, CFG)
    untrained = evaluate("lcm", TimeMLP(), gm, sched, CFG)
    return sched, gm, init, untrained


def test_teacher_is_exact(toy):
    sched, gm, _, _ = toy
    # The exact denoiser recovers the mixture: 50-step DDIM is close to the data; 1 step is blurry.
    from toy_gmm import _teacher_samples, sliced_wasserstein

    g = torch.Generator().manual_seed(0)
    noise, truth = torch.randn(2000, 2, generator=g), gm.sample(2000, g)
    sw50 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 50), truth, generator=torch.Generator().manual_seed(1)
    )
    sw1 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 1), truth, generator=torch.Generator().manual_seed(1)
    )
    assert sw50 < 0.05 < 0.5 < sw1


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_distills(toy, method):
    sched, gm, init, untrained = toy
    steps = CHECKED_STEPS[method]
    before = evaluate(method, initial_network(method, init), gm, sched, CFG)[steps]
    net = run_method(method, gm, sched, init, CFG)
    after = evaluate(method, net, gm, sched, CFG)[steps]
    assert after < 0.1 * untrained[steps], (method, after, untrained)
    assert after < 0.85 * before, (method, after, before)


def test_unknown_method(toy):
    sched, gm, init, _ = toy
    with pytest.raises(
        ValueError,
        match=r"Expected `method` to be one of \['lcm', 'tscd', 'mlcm', 'sim', 'dmd', 'adversarial'\]",
    ):
        run_method("gan", gm, sched, init, CFG)
