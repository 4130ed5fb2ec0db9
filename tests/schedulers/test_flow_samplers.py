"""Few-step and training-timestep samplers on rectified-flow schedules (issue 21 part 2).

Full sampling loops against diffusers' ``FlowMatchEulerDiscreteScheduler`` (Euler) and ``FlowMatchLCMScheduler``
(flow-LCM: predict x0, re-noise) in float64, on the grids diffusers' SD3 and FLUX pipelines use, with a
closed-form denoiser (the exact velocity of Gaussian data). diffusers' ``step`` casts the state to float32; the
``_KeepFloat64`` shim of ``test_few_step_samplers.py`` keeps it in float64, so the only differences left are
diffusers' float32 grid (it shifts custom sigmas in float32) and the float32 timestep fed to the model. The
tolerance of each comparison is derived from exactly those two measured differences, propagated through the
loop with the denoiser's Lipschitz constant; on-table grids where both agree bit for bit are compared at 1e-12.

Then the training-timestep densities of SD3 (logit-normal, mode, uniform) against diffusers'
``compute_density_for_timestep_sampling`` and its training scripts' index, and the existing LCM / TSCD / MLCM /
progressive samplers on flow schedules (valid indices, boundary conditions in sigma).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, OptionError
from diffdistill.schedulers import (
    NoiseSchedule,
    TeacherSolver,
    categorical_timesteps,
    ddim_sample,
    euler_sample,
    flow_density_timesteps,
    flow_pipeline_grid,
    flow_sigma_grid,
    lcm_sample,
    lcm_skip_pairs,
    milestone_pairs,
    one_step_sample,
    progressive_pairs,
    spaced_timesteps,
    tcd_sample,
    tscd_segments,
    uniform_timesteps,
    x0_renoise_sample,
)

SIGMA_DATA = 0.5


def _mean() -> torch.Tensor:
    return torch.linspace(-0.8, 0.6, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)


def _gain(sigma: float) -> float:
    """k(sigma) of E[x0 | x_sigma] = mu + k (x - (1 - sigma) mu) for x0 ~ N(mu, sigma_d^2) per element."""
    a = 1.0 - sigma
    return a * SIGMA_DATA**2 / (a * a * SIGMA_DATA**2 + sigma * sigma)


def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact flow velocity E[eps - x0 | x_sigma] = (x - E[x0 | x_sigma]) / sigma of Gaussian data."""
    mu = _mean()
    x0 = mu + _gain(sigma) * (x - (1 - sigma) * mu)
    return (x - x0) / sigma


def lipschitz(sigma: float) -> float:
    """d velocity / dx (elementwise, >= 0): (1 - k (1 - sigma)) / sigma."""
    return (1 - _gain(sigma) * (1 - sigma)) / sigma


class Toy:
    """The closed-form velocity model with the network's timestep input (sigma * scale), recording it."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        sigma = float(t.reshape(-1)[0]) / self.scale
        self.sigmas.append(sigma)
        return velocity(x, sigma)


class _KeepFloat64(torch.Tensor):
    """diffusers' flow ``step`` starts with ``sample.to(torch.float32)``; this subclass makes that one cast a
    no-op, so the reference loop runs in float64 (test-only shim, as in test_few_step_samplers.py)."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if len(args) == 1 and args[0] is torch.float32 and not kwargs:
            return self
        return super().to(*args, **kwargs)


@pytest.fixture(scope="module")
def dm() -> Any:
    return pytest.importorskip("diffusers")


def _diffusers_loop(
    sched: Any, model: Toy, x: torch.Tensor, pipeline_scale: float, **kw: Any
) -> torch.Tensor:
    """diffusers' denoising loop in float64: model(x, t / pipeline_scale), then ``step`` (FLUX passes t / 1000)."""
    sched.sigmas = sched.sigmas.to(torch.float64)  # the float32 grid values, float64 arithmetic
    for t in sched.timesteps:
        v = model(x, t / pipeline_scale)
        x = sched.step(v, t, x.as_subclass(_KeepFloat64), **kw).prev_sample.as_subclass(torch.Tensor)
    return x


def _euler_bound(states, ours: Toy, ref: Toy, sig_ours: torch.Tensor, sig_ref: torch.Tensor) -> float:
    """Bound on |ours - diffusers| after an Euler loop from the same start, from the two measured differences:
    the grid (sig_ours vs sig_ref) and the sigma each model call saw. Local error of step i:
    |v| (|d sigma_i| + |d sigma_{i+1}|) + |dt| |v(x, s) - v(x, s')|; propagated by (1 + |dt| L)."""
    err = 0.0
    for i, x in enumerate(states[:-1]):
        s, s_ref = ours.sigmas[i], ref.sigmas[i]
        v = velocity(x, s)
        dt = abs(float(sig_ref[i + 1] - sig_ref[i]))
        local = float(v.abs().max()) * float(
            (sig_ours[i] - sig_ref[i]).abs() + (sig_ours[i + 1] - sig_ref[i + 1]).abs()
        )
        local += dt * float((v - velocity(x, s_ref)).abs().max())
        err = err * (1 + dt * lipschitz(float(sig_ref[i]))) + local
    return 1.01 * err + 1e-12


# ------------------------------------------------------------------------------------------ Euler parity
def _x_start(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sd3_pipeline_28_steps_matches_diffusers_euler(dm):
    """SD3 / SD3.5: shift 3, 28 steps, the default (double-shifted, off-table) grid, timesteps 1000 sigma."""
    d = dm.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = NoiseSchedule.from_scheduler(d)
    d.set_timesteps(28)
    grid = flow_pipeline_grid(sched, 28)
    assert not grid.on_table and torch.equal(grid.sigmas.float(), d.sigmas)
    x = _x_start()
    ours_model, ref_model = Toy(1000.0), Toy(1000.0)
    out = ddim_sample(ours_model, sched, x, grid, return_trajectory=True)
    ref = _diffusers_loop(d, ref_model, x, 1.0)
    tol = _euler_bound(out.trajectory, ours_model, ref_model, grid.sigmas, d.sigmas.double())
    assert tol < 1e-5  # the comparison can fail: one table index off moves sigma by ~1e-3
    torch.testing.assert_close(out.sample, ref, atol=tol, rtol=0)
    torch.testing.assert_close(out.sigmas, grid.sigmas[:-1], atol=0, rtol=0)
    assert out.timesteps.tolist() == list(range(27, -1, -1))  # the grid's own schedule
    # euler_sample is the same loop on a flow schedule (Euler = DDIM)
    torch.testing.assert_close(
        euler_sample(Toy(1000.0), sched, x, grid).sample, out.sample, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("steps", [4, 28])
def test_flux_pipeline_grid_matches_diffusers_euler(dm, steps):
    """FLUX.1-dev: dynamic shift with the resolution's mu, FluxPipeline's sigmas linspace(1, 1/N, N), timestep
    sigma (the transformer multiplies by 1000: timestep_scale 1)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    d = dm.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    seq_len = 1024  # 512 x 512
    sched = NoiseSchedule.from_scheduler(d, image_seq_len=4096, timestep_scale=1.0)
    d.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    )
    grid = flow_pipeline_grid(sched, steps, image_seq_len=seq_len)
    x = _x_start(1)
    ours_model, ref_model = Toy(1.0), Toy(1.0)
    out = ddim_sample(ours_model, sched, x, grid, return_trajectory=True)
    ref = _diffusers_loop(d, ref_model, x, 1000.0)
    tol = _euler_bound(out.trajectory, ours_model, ref_model, grid.sigmas, d.sigmas.double())
    assert tol < 1e-5
    torch.testing.assert_close(out.sample, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("steps", [28, 4])
def test_flux_default_grid_on_table_is_bit_exact(dm, steps):
    """diffusers' default FLUX grid with (T-1)/(N-1) integral lies on our table: same sigmas, same timesteps,
    float64 arithmetic on both sides, so the loops agree to float64 rounding."""
    d = dm.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched = NoiseSchedule.from_scheduler(d, mu=1.15)
    d.set_timesteps(steps, mu=1.15)
    grid = flow_sigma_grid(sched, steps)
    assert grid.on_table
    x = _x_start(2)
    ours_model, ref_model = Toy(1000.0), Toy(1000.0)
    out = ddim_sample(ours_model, sched, x, grid)
    ref = _diffusers_loop(d, ref_model, x, 1.0)
    assert ours_model.sigmas == ref_model.sigmas
    assert torch.equal(out.timesteps, grid.indices[:-1])
    assert torch.equal(out.sigmas.float(), grid.sigmas[:-1].float())  # on the table: equal as float32
    torch.testing.assert_close(out.sample, ref, atol=1e-12, rtol=0)


def test_trailing_indices_on_the_sd3_table_match_diffusers_custom_sigmas(dm):
    """A student sampled on 'trailing' table indices [999, 749, 499, 249] = diffusers' custom sigmas
    [1, .75, .5, .25] (which it shifts itself)."""
    d = dm.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = NoiseSchedule.from_scheduler(d)
    d.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    ts = spaced_timesteps(4)
    ours_sig = torch.cat([sched.sigma(ts), torch.zeros(1, dtype=torch.float64)])
    x = _x_start(3)
    ours_model, ref_model = Toy(1000.0), Toy(1000.0)
    out = ddim_sample(ours_model, sched, x, ts, return_trajectory=True)
    ref = _diffusers_loop(d, ref_model, x, 1.0)
    tol = _euler_bound(out.trajectory, ours_model, ref_model, ours_sig, d.sigmas.double())
    assert tol < 1e-5
    torch.testing.assert_close(out.sample, ref, atol=tol, rtol=0)
    # the same student grid as a FlowSigmaGrid of custom (pre-shift) sigmas lands on the same result
    grid = flow_sigma_grid(sched, sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(ddim_sample(Toy(1000.0), sched, x, grid).sample, out.sample, atol=1e-6, rtol=0)


def test_euler_with_many_steps_reaches_the_data_distribution():
    """Independent of diffusers: the exact velocity integrated finely maps N(0, I) to N(mu, sigma_d^2)."""
    sched = NoiseSchedule.flow_matching(shift=3.0)
    noise = torch.randn(4000, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = _mean()[0]

    def model(x, t):
        sigma = float(t[0]) / 1000
        a = 1 - sigma
        k = a * SIGMA_DATA**2 / (a * a * SIGMA_DATA**2 + sigma * sigma)
        return (x - (mu + k * (x - a * mu))) / sigma

    out = ddim_sample(model, sched, noise, flow_sigma_grid(sched, 200)).sample
    torch.testing.assert_close(out.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full_like(mu, SIGMA_DATA), atol=0.03, rtol=0)


# ------------------------------------------------------------------------------------------ flow-LCM parity
@pytest.mark.parametrize("pipeline", ["default", "flux"])
def test_flow_lcm_loop_matches_diffusers_flowmatch_lcm(dm, pipeline):
    """x0_renoise_sample on a flow schedule is FlowMatchLCMScheduler's loop (same generator, same draws):
    x0 = x - sigma v, then (1 - sigma') x0 + sigma' z, x0 after the last step."""
    d = dm.FlowMatchLCMScheduler(use_dynamic_shifting=True)
    sched = NoiseSchedule.from_scheduler(d, mu=1.15)
    if pipeline == "default":
        d.set_timesteps(4, mu=1.15)
        grid = flow_sigma_grid(sched, 4)
        assert grid.on_table
    else:
        d.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.15)
        grid = flow_pipeline_grid(sched, 4)
    x = _x_start(4)
    ours_model, ref_model = Toy(1000.0), Toy(1000.0)
    out = x0_renoise_sample(
        ours_model, sched, x, grid, generator=torch.Generator().manual_seed(7), return_trajectory=True
    )
    ref = _diffusers_loop(d, ref_model, x, 1.0, generator=torch.Generator().manual_seed(7))
    assert len(out.noises) == 3
    # tolerance from the grid difference: the re-noise moves by |z - x0| d sigma', x0 by |v| d sigma + sigma |d v|;
    # the map x -> (1 - sigma') k (1 - sigma) x is a contraction, so local errors add up.
    sig_ref = d.sigmas.double()
    tol = 1e-12
    for i, state in enumerate(out.trajectory[:-1]):
        s, s_ref = ours_model.sigmas[i], ref_model.sigmas[i]
        v = velocity(state, s)
        x0 = state - s * v
        d_sig = float((grid.sigmas[i] - sig_ref[i]).abs())
        d_next = float((grid.sigmas[i + 1] - sig_ref[i + 1]).abs())
        z = out.noises[i] if i < len(out.noises) else torch.zeros_like(x0)
        tol += (
            float((v.abs() * d_sig + s_ref * (v - velocity(state, s_ref)).abs()).max())
            + float((z - x0).abs().max()) * d_next
        )
    assert tol < 1e-5
    torch.testing.assert_close(out.sample, ref, atol=1.01 * tol, rtol=0)
    if pipeline == "default":
        assert ours_model.sigmas == ref_model.sigmas
        torch.testing.assert_close(out.sample, ref, atol=1e-12, rtol=0)


def test_one_step_flow_student_is_x_minus_v(dm):
    sched = NoiseSchedule.flow_matching(shift=3.0)
    x = _x_start(5)
    out = one_step_sample(Toy(1000.0), sched, x, 999)
    torch.testing.assert_close(out.sample, x - velocity(x, 1.0), atol=1e-12, rtol=0)
    d = dm.FlowMatchEulerDiscreteScheduler(shift=1.0)
    d.set_timesteps(sigmas=[1.0])
    torch.testing.assert_close(out.sample, _diffusers_loop(d, Toy(1000.0), x, 1.0), atol=1e-12, rtol=0)
    # an x0-predicting flow student ("sample") returns its output
    torch.testing.assert_close(
        one_step_sample(lambda x, t: x.tanh(), sched, x, 999, prediction_type="sample").sample,
        x.tanh(),
        atol=0,
        rtol=0,
    )


def test_flow_student_with_embedded_guidance_takes_it_as_a_condition():
    sched = NoiseSchedule.flow_matching(shift=3.0)
    seen = []

    def student(x, t, guidance):
        seen.append(guidance)
        return 0.1 * x * guidance.view(-1, 1, 1, 1)

    x = _x_start(6)
    out = x0_renoise_sample(
        student,
        sched,
        x,
        [999, 499],
        cond={"guidance": torch.full((2,), 3.5)},
        generator=torch.Generator().manual_seed(0),
    )
    assert len(seen) == 2 and all(torch.equal(g, torch.full((2,), 3.5)) for g in seen)
    assert out.sample.shape == x.shape


def test_tcd_on_flow_renoises_with_the_straight_path_marginal():
    """TCD's re-noise from s to t' on a flow path: keep = a'/a_s, add^2 = s'^2 - keep^2 s_s^2, so that a state on
    the path of (x0, eps) lands on the path of x0 at t' with noise variance sigma_t'^2."""
    sched = NoiseSchedule.flow_matching(shift=3.0)
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ts = [999, 499]
    oracle = lambda x, t: eps - x0  # noqa: E731 - the exact velocity of this (x0, eps) pair
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = tcd_sample(
        oracle, sched, sched.add_noise(x0, eps, 999), ts, eta=0.3, noises=[z], return_trajectory=True
    )
    s = math.floor(499 * 0.7)
    a_s, s_s = 1 - float(sched.sigma(s)), float(sched.sigma(s))
    a_p, s_p = 1 - float(sched.sigma(499)), float(sched.sigma(499))
    keep = a_p / a_s
    add = math.sqrt(s_p**2 - keep**2 * s_s**2)
    expected = keep * (a_s * x0 + s_s * eps) + add * z
    torch.testing.assert_close(out.trajectory[1], expected, atol=1e-12, rtol=0)
    assert keep**2 * s_s**2 + add**2 == pytest.approx(s_p**2, abs=1e-15)


def test_vp_samplers_unchanged_and_sigmas_none():
    out = ddim_sample(lambda x, t: 0.5 * x, NoiseSchedule.from_betas(), torch.ones(1, 2), [999, 499])
    assert out.sigmas is None
    manual = NoiseSchedule.from_betas()
    y = manual.ddim_step(0.5 * torch.ones(1, 2), 999, torch.ones(1, 2), 499)
    y = manual.ddim_step(0.5 * y, 499, y, -1)
    torch.testing.assert_close(out.sample, y, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ pipeline grids
def test_flow_pipeline_grid_recipes(dm):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sd3 = NoiseSchedule.flow_matching(shift=3.0)
    grid = flow_pipeline_grid(sd3, 28)
    assert float(grid.sigmas[-2]) == pytest.approx(0.00893, abs=5e-6)  # reference/flow.md: the double shift
    flux_d = dm.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux = NoiseSchedule.from_scheduler(flux_d, mu=0.63)
    for seq_len in (1024, 4096, 16384):
        flux_d.set_timesteps(
            sigmas=np.linspace(1.0, 1 / 28, 28), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        )
        ours = flow_pipeline_grid(flux, 28, image_seq_len=seq_len)
        # diffusers shifts its float32 sigmas in float32: one rounding of each value
        torch.testing.assert_close(ours.sigmas, flux_d.sigmas.double(), atol=2 * 2**-24, rtol=0)
    # default mu is the schedule's; an explicit mu wins; the "sd3" recipe on a dynamic schedule is set_timesteps(N)
    torch.testing.assert_close(
        flow_pipeline_grid(flux, 4).sigmas, flow_pipeline_grid(flux, 4, mu=0.63).sigmas
    )
    flux_d.set_timesteps(4, mu=0.63)
    assert torch.equal(flow_pipeline_grid(flux, 4, pipeline="sd3").sigmas.float(), flux_d.sigmas)
    # FLUX.1-schnell: static shift 1, the FLUX recipe: linspace(1, 1/N, N) unshifted
    schnell = NoiseSchedule.flow_matching(shift=1.0)
    assert flow_pipeline_grid(schnell, 4, pipeline="flux").sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


# ------------------------------------------------------------------------------------------ bad inputs
def test_flow_sampler_bad_inputs():
    vp, flow = NoiseSchedule.from_betas(), NoiseSchedule.flow_matching(shift=3.0)
    grid = flow_pipeline_grid(flow, 4)
    x = torch.zeros(1, 2)
    with pytest.raises(OptionError, match=r"`timesteps` is a FlowSigmaGrid, which needs a flow schedule"):
        ddim_sample(lambda x, t: x, vp, x, grid)
    with pytest.raises(OptionError, match=r"FlowSigmaGrid built for another schedule"):
        ddim_sample(lambda x, t: x, NoiseSchedule.flow_matching(shift=2.0), x, grid)
    for sampler, name in ((lcm_sample, "lcm_sample"), (tcd_sample, "tcd_sample")):
        with pytest.raises(
            OptionError,
            match=rf"{name} reads the training index at each step, but `timesteps` is a "
            r"FlowSigmaGrid off the training table",
        ):
            sampler(lambda x, t: x, flow, x, grid)
    # an on-table grid is fine for them
    flux = NoiseSchedule.flow_matching(mu=1.15)
    on = flow_sigma_grid(flux, 4)
    assert on.on_table and lcm_sample(
        lambda x, t: x, flux, x, on, generator=torch.Generator()
    ).sample.shape == (1, 2)
    with pytest.raises(
        DTypeError, match=r"Expected `schedule` to be a flow NoiseSchedule .* VP pipelines use"
    ):
        flow_pipeline_grid(vp, 4)
    with pytest.raises(
        OptionError, match=r"Expected `pipeline` to be one of \['sd3', 'flux', 'wan'\], but got 'ltx'"
    ):
        flow_pipeline_grid(flow, 4, pipeline="ltx")
    with pytest.raises(OptionError, match=r"at most one of `mu` or `image_seq_len`"):
        flow_pipeline_grid(flux, 4, mu=1.0, image_seq_len=4096)
    with pytest.raises(OptionError, match=r"`mu` / `image_seq_len` apply only to a dynamic-shift schedule"):
        flow_pipeline_grid(flow, 4, image_seq_len=4096)
    with pytest.raises(OptionError, match=r"Expected `num_inference_steps` to be an int >= 1, but got 0"):
        flow_pipeline_grid(flow, 0)


# ------------------------------------------------------------------------------------------ training densities
@pytest.mark.parametrize(
    "scheme, kwargs",
    [
        ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
        ("logit_normal", {"logit_mean": 0.3, "logit_std": 1.6}),
        ("mode", {"mode_scale": 1.29}),
        ("uniform", {}),
    ],
)
def test_density_timesteps_match_diffusers_training_scripts(scheme, kwargs):
    """Same draws as compute_density_for_timestep_sampling, and sigma = scheduler.sigmas[floor(u T)] as
    train_dreambooth_lora_sd3.py indexes its (descending, shift 3) table."""
    dm = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    full = {"logit_mean": None, "logit_std": None, "mode_scale": None, **kwargs}
    u = compute_density_for_timestep_sampling(
        scheme if scheme != "uniform" else "none", 512, generator=torch.Generator().manual_seed(3), **full
    )
    d = dm.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigma_ref = d.sigmas[(u * 1000).long()]
    sched = NoiseSchedule.from_scheduler(d)
    sample = flow_density_timesteps(512, scheme, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(sched.sigma(sample.t).float(), sigma_ref)
    assert torch.equal(sample.t_prev, torch.full((512,), -1)) and torch.equal(sample.t_end, sample.t_prev)


def test_logit_normal_is_the_papers_density_with_the_sign_flipped():
    """u ~ logit-normal(m, s) in diffusers' sign is sigma ~ logit-normal(-m, s) on the unshifted table: the logit of
    the index's noise level (t + 1/2) / T is normal(-m, s) (SD3 Sec. 3.1, Eq. 19)."""
    t = flow_density_timesteps(
        200_000, logit_mean=0.5, logit_std=0.8, generator=torch.Generator().manual_seed(0)
    ).t
    noise_level = (t.double() + 0.5) / 1000
    logit = torch.log(noise_level / (1 - noise_level))
    assert float(logit.mean()) == pytest.approx(-0.5, abs=0.01)
    assert float(logit.std()) == pytest.approx(0.8, abs=0.01)

    # mode density (Eq. 20) with s = 0 is uniform; with s > 0 it puts more mass in the middle
    def mid(scale: float) -> float:
        t = flow_density_timesteps(
            100_000, "mode", mode_scale=scale, generator=torch.Generator().manual_seed(1)
        ).t
        return float(((t > 250) & (t < 750)).double().mean())

    assert mid(0.0) == pytest.approx(0.5, abs=0.01) and mid(1.29) > mid(0.0) + 0.1


def test_density_timesteps_bad_inputs():
    with pytest.raises(
        OptionError, match=r"Expected `weighting_scheme` to be one of \['logit_normal', 'mode', 'uniform'\]"
    ):
        flow_density_timesteps(4, "cosmap")
    with pytest.raises(
        OptionError, match=r"Expected `mode_scale` in \[-1, 2/\(pi-2\) = 1\.7519\].* but got 2\.0"
    ):
        flow_density_timesteps(4, "mode", mode_scale=2.0)
    with pytest.raises(OptionError, match=r"logit_std"):
        flow_density_timesteps(4, logit_std=0.0)
    with pytest.raises(DTypeError, match=r"logit_mean"):
        flow_density_timesteps(4, logit_mean="0")
    with pytest.raises(OptionError, match=r"batch_size"):
        flow_density_timesteps(0)


# ------------------------------------------------------------------------------------------ method samplers on flow
FLOW_SCHEDULES = {
    "sd3": lambda: NoiseSchedule.flow_matching(shift=3.0),
    "flux": lambda: NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0),
    "t100": lambda: NoiseSchedule.flow_matching(num_train_timesteps=100, shift=3.0),
}


def _draws(total: int, g: torch.Generator):
    return {
        "lcm": lcm_skip_pairs(64, num_ddim_timesteps=total // 20, num_train_timesteps=total, generator=g),
        "tscd": tscd_segments(
            64, num_segments=4, num_inference_steps=total // 20, num_train_timesteps=total, generator=g
        ),
        "mlcm": milestone_pairs(64, num_segments=4, skip=total // 50, num_train_timesteps=total, generator=g),
        "mlcm_grid": milestone_pairs(
            64, num_segments=4, skip=total // 4, num_train_timesteps=total, on_grid=True, generator=g
        ),
        "progressive": progressive_pairs(64, 4, num_train_timesteps=total, generator=g),
        "uniform": uniform_timesteps(64, 0, total - 1, generator=g),
        "categorical": categorical_timesteps(64, [0, total // 4, total - 1], generator=g),
        "density": flow_density_timesteps(64, num_train_timesteps=total, generator=g),
    }


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULES))
def test_method_samplers_give_valid_indices_and_boundaries_on_flow(name):
    sched = FLOW_SCHEDULES[name]()
    total = sched.num_train_timesteps
    x0 = torch.randn(64, 2, dtype=torch.float64)
    eps = torch.randn(64, 2, dtype=torch.float64)
    v = eps - x0  # the exact velocity of each (x0, eps) pair
    for method, s in _draws(total, torch.Generator().manual_seed(0)).items():
        for part in s:
            assert part.dtype == torch.int64 and bool(((part >= -1) & (part <= total - 1)).all()), method
        sig_t, sig_prev, sig_end = sched.sigma(s.t), sched.sigma(s.t_prev), sched.sigma(s.t_end)
        assert bool((sig_t > 0).all()), method  # the student is evaluated at a noisy state
        assert bool((sig_end <= sig_prev).all() and (sig_prev < sig_t).all()), (
            method
        )  # sigma decreases to t_end
        x_t = sched.add_noise(x0, eps, s.t)
        # the teacher / target move onto t_end lands on the same straight path (Euler = DDIM is exact here)
        to_end = sched.ddim_step(v, s.t, x_t, s.t_end)
        torch.testing.assert_close(to_end, sched.add_noise(x0, eps, s.t_end), atol=1e-12, rtol=0)
        # boundary condition at t_end: the move to itself is the identity (f(x, t_end) = x)
        end_state = sched.add_noise(x0, eps, s.t_end)
        same = sched.ddim_step(v, s.t_end, end_state, s.t_end, allow_same=True)
        torch.testing.assert_close(same, end_state, atol=1e-12, rtol=0)
        clean = s.t_end == -1
        if bool(clean.any()):  # the clean end is sigma = 0: the state is x0 itself
            assert bool((sig_end[clean] == 0).all())
            torch.testing.assert_close(to_end[clean], x0[clean], atol=1e-12, rtol=0)
    # segment edges: MLCM's t_end is a milestone j T / M - 1, whose sigma is the table's at that edge
    mlcm = milestone_pairs(
        256,
        num_segments=4,
        skip=total // 50,
        num_train_timesteps=total,
        generator=torch.Generator().manual_seed(1),
    )
    edges = {-1} | {j * total // 4 - 1 for j in range(1, 4)}
    assert set(mlcm.t_end.tolist()) <= edges and len(set(mlcm.t_end.tolist())) == 4


def test_teacher_solver_strides_on_a_flow_table():
    """Progressive distillation's strided teacher works on flow indices: a 2-step teacher (stride T/2) from 749
    reaches 249, then the clean end, with Euler steps."""
    sched = NoiseSchedule.flow_matching(shift=3.0)
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    teacher = TeacherSolver(lambda x, t: eps - x0, sched)
    pairs = progressive_pairs(2, 1, extra_timesteps=[749], generator=torch.Generator().manual_seed(0))
    traj = teacher.solve(
        sched.add_noise(x0, eps, pairs.t),
        pairs.t,
        pairs.t_prev,
        num_steps=2,
        stride=500,
        return_trajectory=True,
    )
    torch.testing.assert_close(traj[1], sched.add_noise(x0, eps, 249), atol=1e-12, rtol=0)
    torch.testing.assert_close(traj[2], x0, atol=1e-12, rtol=0)


def test_one_step_off_table_grid_samples() -> None:
    """A single off-table sigma (Wan's 1-step UniPC grid lowers it by 1e-6; a custom ``sigmas=[s]``) is one Euler
    step: x0 = x - sigma v, with the network fed sigma * 1000 (the grid schedule's one-entry table used to be
    refused: "Expected `flow_sigmas` to hold at least 2 values")."""
    schedule = NoiseSchedule.flow_matching(shift=5.0)
    x = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)
    for grid in (flow_pipeline_grid(schedule, 1, pipeline="wan"), flow_sigma_grid(schedule, sigmas=[0.9505])):
        assert not grid.on_table and grid.num_inference_steps == 1
        sigma = float(grid.sigmas[0])
        seen: list[torch.Tensor] = []

        def velocity(z: torch.Tensor, t: torch.Tensor, seen: list[torch.Tensor] = seen) -> torch.Tensor:
            seen.append(t)
            return 0.5 * z

        out = ddim_sample(velocity, schedule, x, grid)
        torch.testing.assert_close(out.sample, x * (1 - 0.5 * sigma), atol=1e-12, rtol=0)
        assert len(seen) == 1 and float(seen[0].flatten()[0]) == pytest.approx(1000 * sigma, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["flow", "sample"])
def test_euler_sigma_min_means_the_training_sigma_min_on_any_grid(prediction_type) -> None:
    """final_sigmas_type="sigma_min" ends at the training table's sigma(0), on- and off-table grids alike (audit
    10, defect 3). The exact denoiser of a point mass at x0 makes every Euler state (1 - sigma) x0 + sigma eps
    for the same eps, so the end state reads off the sigma it ends at."""
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    eps = torch.tensor([[0.4, 2.0]], dtype=torch.float64)
    sd3 = NoiseSchedule.flow_matching(shift=3.0)
    flux = NoiseSchedule.flow_matching(mu=1.15)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t / 1000.0).to(x.dtype).reshape(-1, 1)
        return (x - x0) / sigma if prediction_type == "flow" else x0.expand_as(x)

    on = flow_sigma_grid(sd3, sigmas=NoiseSchedule.flow_matching().sigma(torch.tensor([999, 749, 499, 249])))
    for schedule, grid, on_table in [
        (sd3, on, True),
        (sd3, flow_pipeline_grid(sd3, 4), False),
        (flux, flow_pipeline_grid(flux, 4), True),
        (flux, flow_pipeline_grid(flux, 28), False),  # FluxPipeline's grid ends at sigma 0.105
    ]:
        assert grid.on_table is on_table
        s0 = float(grid.sigmas[0])
        x_start = (1 - s0) * x0 + s0 * eps
        out = euler_sample(
            model, schedule, x_start, grid, final_sigmas_type="sigma_min", prediction_type=prediction_type
        )
        s_min = float(schedule.sigma(0))
        # 1e-6: the velocity model reads sigma back from the float32 timestep input (relative error ~6e-8)
        torch.testing.assert_close(out.sample, (1 - s_min) * x0 + s_min * eps, rtol=0, atol=1e-6)
    # a grid that already ends below sigma_min stays at its last sigma (diffusers' dt = 0)
    low = flow_sigma_grid(NoiseSchedule.flow_matching(), sigmas=[1.0, 0.5, 0.001])
    x_start = eps.clone()
    out = euler_sample(
        model,
        NoiseSchedule.flow_matching(),
        x_start,
        low,
        final_sigmas_type="sigma_min",
        prediction_type=prediction_type,
    )
    torch.testing.assert_close(out.sample, 0.999 * x0 + 0.001 * eps, rtol=0, atol=1e-6)
