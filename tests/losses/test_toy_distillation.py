"""Toy proof that the losses distill: a 2-D Gaussian-mixture teacher with an exact denoiser (see
``benchmarks/toy_gmm.py``; the full runs with the README table are ``benchmarks/toy_losses.py``).

The reduced run uses the hard mixture of issue 20 (8 modes of std 0.05 on a circle of radius 2) with a small
MLP (3x128), batch 256 and STEPS = 300 training steps per method (about 20 s for all methods on one core),
through the public loss APIs. Every student starts from the same MLP regressed on the teacher (as real
students start from teacher weights; one-step generators from its x0-prediction conversion, SDXL-Lightning
Eq. 29). A method distills when its samples, drawn the way the method is meant to be sampled
(CHECKED_STEPS), end much closer (sliced Wasserstein) to the mixture than the same network's before
training: ``after < RATIO * before``. A loss that stops distilling leaves ``after`` at ``before`` (ratio 1:
the one-step generators return an EMA of weights that did not move) or makes it worse.

Threshold from measured margins: MEASURED holds ``after / before`` of this exact configuration for seeds
0, 1 and 2 (the test runs seed 0). The largest is 0.578; RATIO = 0.8 sits 0.22 above it and 0.2 below the
ratio 1 of a method that stopped distilling. This short run cannot show issue 20's plateau (one-step
generators settling on the ring at SW ~0.15 after thousands of steps); the full benchmark measures that.

Flow matching (issue 21): the same mixture under a shifted rectified-flow teacher (shift 3, as SD3;
``x_t = (1 - sigma) x0 + sigma eps``, velocity prediction, network timestep ``1000 sigma``). Its exact denoiser is
checked against a Monte-Carlo posterior mean and against the VP code path at matched signal-to-noise ratio; a
reduced run distills FLOW_METHODS (consistency, multi-segment consistency, score distillation) with the same CFG
and the same ``after < RATIO * before`` rule (FLOW_MEASURED: seeds 0, 1, 2; the largest is 0.394, 0.41 below
RATIO; the other five methods measure 0.35-0.43 there too but are left to the benchmark to keep this case near
12 s).
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
        ToyConfig,
        _teacher_samples,
        evaluate,
        fit_to_teacher,
        initial_network,
        make_schedule,
        run_method,
        sliced_wasserstein,
    )
finally:
    sys.path.remove(_BENCHMARKS)


STEPS = 300
CFG = ToyConfig(steps=STEPS, batch=256, hidden=128, fit_steps=400, eval_samples=2000, seed=0)
#: sampling steps checked per method: TSCD with k = 2 segments targets 2-step sampling; MLCM with M = 4
#: milestones samples on a subset of its milestones (TLCM's inference), here the 2 at u = 1000, 500 (at 4
#: steps it does not beat the teacher-initialised network's 4-step DDIM on this mixture, see the README); the
#: others are one-step models.
CHECKED_STEPS = {
    "lcm": 1,
    "tscd": 2,
    "mlcm": 2,
    "sim": 1,
    "dmd": 1,
    "regression": 1,
    "adversarial": 1,
    "gan": 1,
}
#: after / before measured with CFG for seeds 0, 1, 2.
MEASURED = {
    "lcm": (0.191, 0.506, 0.548),
    "tscd": (0.279, 0.490, 0.327),
    "mlcm": (0.414, 0.519, 0.542),
    "sim": (0.426, 0.433, 0.390),
    "dmd": (0.452, 0.453, 0.407),
    "regression": (0.356, 0.500, 0.578),
    "adversarial": (0.353, 0.497, 0.573),
    "gan": (0.380, 0.467, 0.399),
}
RATIO = 0.8


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    sched = NoiseSchedule.from_betas()
    gm = GaussianMixture.named("hard")
    init = fit_to_teacher(gm, sched, CFG)
    return sched, gm, init


def test_teacher_is_exact(toy):
    sched, gm, _ = toy
    # The exact denoiser recovers the mixture: 50-step DDIM is about as close to the data as another data
    # sample (measured: 0.063 against 0.050 for data vs data at 2000 points); 4 steps 0.19; 1 step 1.17.
    g = torch.Generator().manual_seed(0)
    noise, truth = torch.randn(2000, 2, generator=g), gm.sample(2000, g)
    sw50 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 50), truth, generator=torch.Generator().manual_seed(1)
    )
    sw1 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 1), truth, generator=torch.Generator().manual_seed(1)
    )
    assert sw50 < 0.1 < 0.5 < sw1


def test_mixtures():
    hard, easy = GaussianMixture.named("hard"), GaussianMixture.named("easy")
    torch.testing.assert_close(hard.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(easy.means.norm(dim=1), torch.full((8,), 1.5, dtype=torch.float64))
    assert (hard.std, easy.std) == (0.05, 0.1)
    with pytest.raises(ValueError, match=r"Expected `name` to be one of \['easy', 'hard'\]"):
        GaussianMixture.named("medium")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_distills(toy, method):
    sched, gm, init = toy
    steps = CHECKED_STEPS[method]
    before = evaluate(method, initial_network(method, init), gm, sched, CFG)[steps]
    net = run_method(method, gm, sched, init, CFG)
    after = evaluate(method, net, gm, sched, CFG)[steps]
    assert after < RATIO * before, (method, after, before, MEASURED[method])


#: methods of the reduced flow run (about 12 s together with the teacher fit on one core; regression, the
#: slowest at 5 s, measured 0.403 / 0.405 / 0.396 and is left to the benchmark), and their after / before with CFG.
FLOW_METHODS = ("lcm", "tscd", "dmd")
FLOW_MEASURED = {
    "lcm": (0.234, 0.249, 0.231),
    "tscd": (0.285, 0.292, 0.275),
    "dmd": (0.372, 0.394, 0.371),
}


@pytest.fixture(scope="module")
def toy_flow():
    torch.manual_seed(0)
    sched = make_schedule("flow", shift=3.0)
    gm = GaussianMixture.named("hard")
    init = fit_to_teacher(gm, sched, CFG)
    return sched, gm, init


def test_flow_schedule():
    sched = make_schedule("flow")
    assert (sched.kind, sched.prediction_type) == ("flow", "flow")
    # SD3's shift 3: sigma = 3u / (1 + 2u) with u = (t + 1) / 1000; the network takes 1000 sigma (a float).
    u = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    t = (u * 1000).long() - 1
    torch.testing.assert_close(sched.sigma(t).double(), 3 * u / (1 + 2 * u))
    torch.testing.assert_close(sched.model_timestep(t), (3000 * u / (1 + 2 * u)).float())
    with pytest.raises(ValueError, match=r"Expected `kind` to be one of \['vp', 'flow'\]"):
        make_schedule("ve")


@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.8, 0.95])
def test_flow_denoiser_monte_carlo(sigma):
    # Independent of the closed form: self-normalised importance sampling of E[x0 | x_t] under
    # x_t = (1 - sigma) x0 + sigma eps, prior samples weighted by the Gaussian likelihood of x_t.
    gm = GaussianMixture.named("easy")
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(400_000, g).double()
    # typical states (drawn from the forward process), where the weights are not degenerate
    x_t = (1 - sigma) * gm.sample(6, g).double() + sigma * torch.randn(6, 2, generator=g, dtype=torch.float64)
    logw = -((x_t[:, None] - (1 - sigma) * x0[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = logw.softmax(dim=1)
    mc = w @ x0
    assert (1 / (w**2).sum(dim=1)).min() > 1000  # effective sample size of the estimate
    exact = gm.posterior_mean(x_t, torch.tensor(1 - sigma), torch.tensor(sigma))
    # measured |exact - mc| <= 0.0026; dropping alpha = 1 - sigma from the closed form gives >= 0.06
    torch.testing.assert_close(exact, mc, atol=0.005, rtol=0)


def test_flow_teacher_matches_vp_at_matched_snr():
    # The flow teacher (velocity at model timestep 1000 sigma) against the VP code path: x_vp = x_flow / n with
    # n = sqrt((1 - sigma)^2 + sigma^2) has alpha_vp = (1 - sigma) / n, sigma_vp = sigma / n (same SNR and the same
    # eps), so v = eps - x0 from the VP denoiser's x0 and eps.
    sched, gm = make_schedule("flow"), GaussianMixture.named("hard")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 100, 300, 454, 700, 900, 998])
    x0, eps = gm.sample(len(t), g).double(), torch.randn(len(t), 2, generator=g, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    v = gm.teacher_model(sched)(x_t, sched.model_timestep(t))
    s = sched.sigma(t).double()
    n = ((1 - s) ** 2 + s**2).sqrt()
    a_vp, s_vp = (1 - s) / n, s / n
    x_vp = x_t / n[:, None]
    x0_vp = gm.posterior_mean(x_vp, a_vp, s_vp)
    eps_vp = (x_vp - a_vp[:, None] * x0_vp) / s_vp[:, None]
    torch.testing.assert_close(v, eps_vp - x0_vp, atol=1e-5, rtol=1e-5)
    # and the VP teacher itself, on the VP table: x0 = x_t - sigma v on flow equals the VP denoiser at matched SNR.
    vp = make_schedule("vp")
    tv = torch.tensor([200, 500, 800])
    av, sv = vp.alpha(tv).double(), vp.sigma(tv).double()
    sf = sv / (av + sv)  # (1 - sf) / sf = av / sv
    xv = vp.add_noise(x0[:3], eps[:3], tv)
    xf = xv / (av + sv)[:, None]
    vf = gm.flow_model(sched)(xf, (1000 * sf).float())
    torch.testing.assert_close(xf - sf[:, None] * vf, gm.denoise(xv, tv, vp), atol=1e-4, rtol=1e-4)


def test_flow_teacher_is_exact(toy_flow):
    sched, gm, _ = toy_flow
    # Euler (the flow's DDIM move) on the exact velocity, trailing grid on the shift-3 table: measured 50 steps
    # SW 0.056 against 0.050 for data vs data at 2000 points; 4 steps 0.31; 1 step 1.27.
    g = torch.Generator().manual_seed(0)
    noise, truth = torch.randn(2000, 2, generator=g), gm.sample(2000, g)
    sw50 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 50), truth, generator=torch.Generator().manual_seed(1)
    )
    sw1 = sliced_wasserstein(
        _teacher_samples(gm, sched, noise, 1), truth, generator=torch.Generator().manual_seed(1)
    )
    assert sw50 < 0.1 < 0.5 < sw1, (sw50, sw1)


@pytest.mark.slow
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_method_distills_flow(toy_flow, method):
    sched, gm, init = toy_flow
    steps = CHECKED_STEPS[method]
    before = evaluate(method, initial_network(method, init), gm, sched, CFG)[steps]
    net = run_method(method, gm, sched, init, CFG)
    after = evaluate(method, net, gm, sched, CFG)[steps]
    assert after < RATIO * before, (method, after, before, FLOW_MEASURED[method])


def test_unknown_method(toy):
    sched, gm, init = toy
    with pytest.raises(
        ValueError,
        match=r"Expected `method` to be one of \['lcm', 'tscd', 'mlcm', 'sim', 'dmd', 'regression', "
        r"'adversarial', 'gan'\]",
    ):
        run_method("ddpm", gm, sched, init, CFG)
