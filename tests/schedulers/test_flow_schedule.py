"""Rectified-flow schedules (issue 21, part 1) against diffusers' flow schedulers and independent derivations.

Parity with diffusers 0.42.1 in float64: ``FlowMatchEulerDiscreteScheduler`` (training table, ``timesteps``,
``scale_noise``, ``set_timesteps`` with static and dynamic shifting, ``step``) and ``FlowMatchLCMScheduler``
(``step``: predict x0, re-noise). Where diffusers itself rounds to float32 (its sigma tables, the step size
``sigma_next - sigma``, ``1 - sigma_next``), the tolerance is that rounding, derived from the compared
quantity; everything else is compared bit for bit. Golden numbers from reference/flow.md are pinned inline
so the file checks something without diffusers too.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError
from diffdistill.schedulers import (
    FLOW_PREDICTION_TYPES,
    FlowMatchingConfig,
    NoiseSchedule,
    flow_sigma_grid,
    packed_image_seq_len,
    resolution_mu,
    shift_sigmas,
)

F32_EPS = 2.0**-24  # float32 unit roundoff


def _rand(*shape, seed=0, dtype=torch.float64):
    """Random values that float32 holds exactly (diffusers' step casts the sample to float32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def fake_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A network-free velocity model with a nonlinearity, so errors cannot cancel."""
    return 0.3 * x * (1 + sigma) + 0.1 * torch.sin(3 * x)


# ----------------------------------------------------------------------------------------- golden numbers
def test_golden_grids_from_reference():
    """reference/flow.md [calc]: SD3 (shift 3) 4 steps; FLUX.1 (mu from the token count) 4 steps, pipeline sigmas."""
    sd3 = NoiseSchedule.flow_matching(shift=3.0)
    grid = flow_sigma_grid(sd3, 4)
    torch.testing.assert_close(
        grid.sigmas, torch.tensor([1, 0.858, 0.602, 0.0089, 0], dtype=torch.float64), atol=6e-4, rtol=0
    )
    assert grid.sigmas[-2] > sd3.sigma(0)  # the double shift at the low end: 0.0089 > 0.002994
    assert float(sd3.sigma(0)) == pytest.approx(0.002994, abs=1e-6)
    for h, mu_ref, sig_ref in [
        (512, 0.630, [1, 0.849, 0.653, 0.385]),
        (1024, 1.150, [1, 0.905, 0.760, 0.513]),
        (2048, 3.230, [1, 0.987, 0.962, 0.894]),
    ]:
        length = packed_image_seq_len(h, h)
        mu = resolution_mu(length)
        assert mu == pytest.approx(mu_ref, abs=5e-4)
        flux = NoiseSchedule.flow_matching(mu=mu)
        pipeline_sigmas = torch.linspace(1.0, 1 / 4, 4, dtype=torch.float64)  # FluxPipeline's default
        out = flow_sigma_grid(flux, sigmas=pipeline_sigmas).sigmas[:-1]
        torch.testing.assert_close(out, torch.tensor(sig_ref, dtype=torch.float64), atol=6e-4, rtol=0)


def test_index_convention_and_coefficients():
    s = NoiseSchedule.flow_matching(shift=3.0)
    t = torch.arange(-1, 1000)
    sig, a = s.sigma(t), s.alpha(t)
    assert s.kind == "flow" and s.prediction_type == "flow" and s.num_train_timesteps == 1000
    assert sig[0] == 0 and a[0] == 1 and sig[-1] == 1 and a[-1] == 0  # t = -1 clean, t = T-1 pure noise
    torch.testing.assert_close(a, 1 - sig, atol=0, rtol=0)
    # t holds the shift of the unshifted timestep value t + 1 (as float32 arithmetic gives it)
    u = (torch.arange(1, 1001, dtype=torch.float32) / 1000).double()
    torch.testing.assert_close(sig[1:], 3 * u / (1 + 2 * u), atol=1e-7, rtol=0)
    assert bool((sig[1:] >= sig[:-1]).all())
    # derived quantities, independent formulas
    tt = torch.arange(0, 999)
    sg = s.sigma(tt)
    torch.testing.assert_close(s.snr(tt), (1 - sg) ** 2 / sg**2)
    torch.testing.assert_close(s.edm_sigma(tt), sg / (1 - sg))
    torch.testing.assert_close(s.alphas_cumprod[:999], (1 - sg) ** 2 / ((1 - sg) ** 2 + sg**2))
    assert s.alphas_cumprod[-1] == 0 and math.isinf(float(s.edm_sigma(999)))
    # the equivalent VP state: x_flow / sqrt(a^2 + s^2) = sqrt(abar) x0 + sqrt(1 - abar) eps
    x0, eps = _rand(2, 3, seed=1), _rand(2, 3, seed=2)
    t2 = torch.tensor([100, 700])
    n = ((1 - s.sigma(t2)) ** 2 + s.sigma(t2) ** 2).sqrt().view(-1, 1)
    abar = s.alphas_cumprod[t2].view(-1, 1)
    torch.testing.assert_close(s.add_noise(x0, eps, t2) / n, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_vp_schedule_is_unchanged_and_reports_its_kind():
    vp = NoiseSchedule.from_betas()
    assert vp.kind == "vp" and vp.flow_config is None and vp.timestep_scale is None
    assert vp.model_timestep(torch.tensor([999, 0])).tolist() == [999, 0]
    assert vp.model_timestep(torch.tensor([999, 0])).dtype == torch.int64
    assert repr(vp).startswith("NoiseSchedule(T=1000")


# ----------------------------------------------------------------------------------------- resolution shift
def test_resolution_mu_matches_flux_pipeline():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for length in [256, 1024, 1536, 4096, 16384, 77]:
        assert resolution_mu(length) == calculate_shift(length)
        assert resolution_mu(length, 256, 8192, 0.5, 0.9) == calculate_shift(length, 256, 8192, 0.5, 0.9)
    assert packed_image_seq_len(1024, 1024) == 4096 and packed_image_seq_len(1024, 512, 8, 2) == 2048


def test_linear_time_shift_takes_cogview4_pipelines_mu():
    """image_seq_len= on a CogView4 config (time_shift_type="linear") gives CogView4Pipeline's mu, not FLUX's
    (audit 10, defect 5); an exponential config keeps FLUX's."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift as cogview4_shift

    # CogView4's scheduler as diffusers' scripts/convert_cogview4_to_diffusers.py builds it
    sched = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    for length in [256, 1024, 4096, 77]:
        want = cogview4_shift(length, 256, 0.25, 0.75)
        ours = NoiseSchedule.from_scheduler(sched, image_seq_len=length)
        assert ours.flow_config.mu == want == ours.flow_config.mu_for(length)
        assert torch.equal(
            ours.sigma(torch.arange(1000)),
            NoiseSchedule.from_scheduler(sched, mu=want).sigma(torch.arange(1000)),
        )
    assert FlowMatchingConfig.from_diffusers_config(sched.config, image_seq_len=4096).mu == 3.25
    flux = {**sched.config, "time_shift_type": "exponential"}
    assert FlowMatchingConfig.from_diffusers_config(flux, image_seq_len=4096).mu == resolution_mu(
        4096, 256, 4096, 0.25, 0.75
    )
    with pytest.raises(OptionError, match="`image_seq_len` to be > 0"):
        FlowMatchingConfig.from_diffusers_config(sched.config, image_seq_len=0)


def test_shift_sigmas_maps():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0, 25.0):
        out = shift_sigmas(u, shift=shift)
        assert out[0] == 0 and out[-1] == 1 and bool((out[1:] >= out[:-1]).all())
        torch.testing.assert_close(out, shift_sigmas(u, mu=math.log(shift)), atol=1e-15, rtol=0)
    torch.testing.assert_close(shift_sigmas(u, shift=1.0), u, atol=0, rtol=0)
    lin = shift_sigmas(u[1:], mu=2.0, time_shift_type="linear")
    torch.testing.assert_close(lin, 2.0 / (2.0 + 1 / u[1:] - 1))
    # SD3 Sec. 5.3.2: the shift multiplies the noise-to-signal odds sigma / (1 - sigma) by s
    mid = u[1:-1]
    odds = shift_sigmas(mid, shift=3.0) / (1 - shift_sigmas(mid, shift=3.0))
    torch.testing.assert_close(odds, 3 * mid / (1 - mid))


# ----------------------------------------------------------------------------------------- diffusers parity
def _diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.7])
@pytest.mark.parametrize("num_train_timesteps", [1000, 50])
def test_static_table_and_timesteps_match_diffusers_bit_for_bit(shift, num_train_timesteps):
    d = _diffusers().FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    for s in (NoiseSchedule.flow_matching(num_train_timesteps, shift=shift), NoiseSchedule.from_scheduler(d)):
        t = torch.arange(num_train_timesteps)
        assert torch.equal(s.sigma(t), d.sigmas.flip(0).double())
        assert torch.equal(s.model_timestep(t), d.timesteps.flip(0))  # sigma * T, float32, as diffusers
        assert torch.equal(s.sigma_to_timestep(d.timesteps.double() / num_train_timesteps), t.flip(0))


@pytest.mark.parametrize(
    "time_shift_type,mus", [("exponential", [0.0, 0.63, 1.15, 3.23, -0.4]), ("linear", [0.5, 1.0, 3.0])]
)
def test_dynamic_table_is_diffusers_full_grid(time_shift_type, mus):
    d = _diffusers().FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type=time_shift_type
    )
    for mu in mus:
        s = NoiseSchedule.from_scheduler(d, mu=mu)
        assert s.flow_config.dynamic and s.flow_config.mu == mu
        d.set_timesteps(1000, mu=mu)
        assert torch.equal(s.sigma(torch.arange(1000)), d.sigmas[:-1].flip(0).double())
    # mu = 0 (exponential) / 1 (linear) is diffusers' own unshifted training table up to its float32 grid
    ident = 0.0 if time_shift_type == "exponential" else 1.0
    plain = NoiseSchedule.from_scheduler(
        _diffusers().FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, time_shift_type=time_shift_type
        ),
        mu=ident,
    )
    torch.testing.assert_close(
        plain.sigma(torch.arange(1000)),
        torch.arange(1, 1001, dtype=torch.float64) / 1000,
        atol=1e-7,
        rtol=0,
    )


def test_from_scheduler_reads_flux_and_sd3_configs():
    dm = _diffusers()
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux_cfg = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}
    d = dm.FlowMatchEulerDiscreteScheduler(**flux_cfg)
    for length in (1024, 4096):
        s = NoiseSchedule.from_scheduler(d, image_seq_len=length)
        assert s.flow_config.mu == calculate_shift(length, 256, 4096, 0.5, 1.15)
        assert s.prediction_type == "flow" and s.timestep_scale == 1000.0
    qwen = dm.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02
    )
    s = NoiseSchedule.from_scheduler(qwen, image_seq_len=4096)
    assert s.flow_config.mu == calculate_shift(4096, 256, 8192, 0.5, 0.9)
    assert s.flow_config.shift_terminal == 0.02
    # LCM and Heun schedulers share the config
    lcm = NoiseSchedule.from_scheduler(dm.FlowMatchLCMScheduler(shift=3.0))
    assert torch.equal(
        lcm.sigma(torch.arange(1000)), NoiseSchedule.flow_matching(shift=3.0).sigma(torch.arange(1000))
    )
    heun = NoiseSchedule.from_scheduler(dm.FlowMatchHeunDiscreteScheduler(shift=3.0))
    assert heun.flow_config.shift == 3.0
    # set_timesteps overwrites scheduler.sigmas; the table is rebuilt from the config
    sd3 = dm.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(4)
    assert NoiseSchedule.from_scheduler(sd3).num_train_timesteps == 1000


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scale_noise_matches_diffusers_bit_for_bit(shift):
    d = _diffusers().FlowMatchEulerDiscreteScheduler(shift=shift)
    s = NoiseSchedule.from_scheduler(d)
    x0, noise = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    pos = torch.tensor([0, 17, 500, 999])  # positions in diffusers' descending table
    ref = d.scale_noise(x0, d.timesteps[pos], noise)
    assert torch.equal(s.add_noise(x0, noise, 999 - pos), ref)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
def test_static_set_timesteps_matches_diffusers(shift, steps):
    d = _diffusers().FlowMatchEulerDiscreteScheduler(shift=shift)
    d.set_timesteps(steps)
    grid = flow_sigma_grid(NoiseSchedule.from_scheduler(d), steps)
    assert torch.equal(grid.sigmas.float(), d.sigmas)  # float64 grid, rounded as diffusers rounds it
    torch.testing.assert_close(grid.timesteps, d.timesteps.double(), atol=1000 * F32_EPS, rtol=0)
    assert grid.indices[-1] == -1 and grid.exact[-1] and grid.indices[0] == 999 and grid.exact[0]


@pytest.mark.parametrize("mu", [0.63, 1.15, 3.23])
@pytest.mark.parametrize("steps", [1, 4, 10, 28, 50])
def test_dynamic_set_timesteps_matches_diffusers(mu, steps):
    d = _diffusers().FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    s = NoiseSchedule.from_scheduler(d, mu=mu)
    d.set_timesteps(steps, mu=mu)
    grid = flow_sigma_grid(s, steps)
    assert torch.equal(grid.sigmas.float(), d.sigmas)
    # on the table exactly when (T - 1) / (N - 1) is an integer (FLUX at 28 steps: 37)
    assert grid.on_table == (steps == 1 or 999 % (steps - 1) == 0)
    if grid.on_table:
        assert torch.equal(s.sigma(grid.indices).float(), d.sigmas)
        assert torch.equal(s.model_timestep(grid.indices[:-1]), d.timesteps)
    # another resolution's mu for the same table
    d.set_timesteps(steps, mu=mu + 0.5)
    assert torch.equal(flow_sigma_grid(s, steps, mu=mu + 0.5).sigmas.float(), d.sigmas)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_custom_sigmas_and_shift_terminal_match_diffusers(steps):
    dm = _diffusers()
    pipeline_sigmas = [1.0 - i * (1 - 1 / steps) / max(steps - 1, 1) for i in range(steps)]  # FLUX pipeline's
    for cfg, mu in [
        ({"use_dynamic_shifting": True}, 1.15),
        ({"shift": 3.0}, None),
        ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02}, 0.8),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 2.0),
    ]:
        d = dm.FlowMatchEulerDiscreteScheduler(**cfg)
        s = NoiseSchedule.from_scheduler(d, mu=mu)
        if steps == 1 and "shift_terminal" in cfg:  # diffusers divides 0 by 0 here and returns NaN
            with pytest.raises(OptionError, match=r"cannot stretch a grid whose last sigma is 1"):
                flow_sigma_grid(s, sigmas=pipeline_sigmas)
            continue
        d.set_timesteps(sigmas=pipeline_sigmas, mu=mu)
        grid = flow_sigma_grid(s, sigmas=pipeline_sigmas)
        # diffusers shifts custom sigmas in float32 arithmetic: agree to a few float32 roundings
        torch.testing.assert_close(grid.sigmas, d.sigmas.double(), atol=8 * F32_EPS, rtol=0)
        if "shift_terminal" in cfg:
            d.set_timesteps(steps, mu=mu)
            assert torch.equal(flow_sigma_grid(s, steps).sigmas.float(), d.sigmas)
            assert float(flow_sigma_grid(s, steps).sigmas[-2]) == pytest.approx(0.02, abs=1e-12)


def _euler_tolerance(v: torch.Tensor, sigma: float, sigma_next: float) -> float:
    """diffusers rounds dt = sigma_next - sigma to float32: |error| <= |v| * eps32 * |dt| (+ float64 noise)."""
    return float(v.abs().max()) * F32_EPS * abs(sigma_next - sigma) + 1e-13


@pytest.mark.parametrize("case", ["flux28", "flux4", "shift1_28"])
def test_ddim_step_is_diffusers_euler_step_on_table(case):
    dm = _diffusers()
    if case.startswith("flux"):
        d = dm.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        s = NoiseSchedule.from_scheduler(d, mu=1.15)
        steps = 28 if case == "flux28" else 4
        d.set_timesteps(steps, mu=1.15)
    else:
        d = dm.FlowMatchEulerDiscreteScheduler(shift=1.0)
        s = NoiseSchedule.from_scheduler(d)
        steps = 28
        d.set_timesteps(steps)
    grid = flow_sigma_grid(s, steps, mu=1.15 if case.startswith("flux") else None)
    assert grid.on_table
    x = _rand(2, 4, 8, 8, seed=3)
    for i, t in enumerate(d.timesteps):
        sig, sig_next = float(d.sigmas[i]), float(d.sigmas[i + 1])
        v = fake_velocity(x, sig)
        x_next = d.step(v, t, x).prev_sample
        ours_next = s.ddim_step(v, grid.indices[i], x, grid.indices[i + 1])
        torch.testing.assert_close(ours_next, x_next, atol=_euler_tolerance(v, sig, sig_next), rtol=0)
        # every other parameterisation of the same output gives the same move (DDIM = Euler, float64 noise)
        for pt in ("sample", "v_prediction", "epsilon", "score"):
            if pt in ("epsilon", "score") and int(grid.indices[i]) == 999:
                continue  # alpha = 0: an epsilon / score output carries no x0 there
            out = s.convert(v, x, grid.indices[i], "flow", pt)
            torch.testing.assert_close(
                s.ddim_step(out, grid.indices[i], x, grid.indices[i + 1], pt), ours_next, atol=1e-9, rtol=0
            )
        x = _rand(2, 4, 8, 8, seed=10 + i)  # a fresh float32-exact state each step
        assert ours_next.dtype == torch.float64


def test_off_table_grid_steps_through_grid_schedule():
    """SD3's shifted default grid lies off the table: step on the grid's own schedule, as diffusers."""
    dm = _diffusers()
    d = dm.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = NoiseSchedule.from_scheduler(d)
    d.set_timesteps(4)
    grid = flow_sigma_grid(s, 4)
    assert not grid.on_table
    gs = grid.grid_schedule()
    assert gs.kind == "flow" and gs.num_train_timesteps == 4 and gs.timestep_scale == 1000.0
    torch.testing.assert_close(
        gs.model_timestep(torch.arange(3, -1, -1)), grid.timesteps.float(), atol=0, rtol=0
    )
    x = _rand(1, 4, 8, 8, seed=5)
    for i, t in enumerate(d.timesteps):
        sig, sig_next = float(d.sigmas[i]), float(d.sigmas[i + 1])
        v = fake_velocity(x, sig)
        ref = d.step(v, t, x).prev_sample
        out = gs.ddim_step(v, 3 - i, x, 2 - i)
        # our grid keeps float64 sigmas: diffusers' float32 grid differs by one rounding of each sigma
        tol = float(v.abs().max()) * 2 * F32_EPS * (sig + sig_next) + _euler_tolerance(v, sig, sig_next)
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)
        x = _rand(1, 4, 8, 8, seed=20 + i)


def test_flow_lcm_step_is_predict_x0_then_renoise():
    dm = _diffusers()
    d = dm.FlowMatchLCMScheduler(use_dynamic_shifting=True)
    s = NoiseSchedule.from_scheduler(d, mu=1.15)
    d.set_timesteps(4, mu=1.15)
    grid = flow_sigma_grid(s, 4, mu=1.15)
    assert grid.on_table
    x = _rand(2, 4, 8, 8, seed=7)
    for i, t in enumerate(d.timesteps):
        sig_next = float(d.sigmas[i + 1])
        v = fake_velocity(x, float(d.sigmas[i]))
        ref = d.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        x0 = s.to_x0(v, x, grid.indices[i])
        ours = s.add_noise(x0, z, grid.indices[i + 1]) if i + 1 < 4 else x0
        # diffusers rounds 1 - sigma_next to float32: an error <= eps32 (1 - sigma_next) on the x0 term
        tol = F32_EPS * (1 - sig_next) * float(x0.abs().max()) + 1e-12
        torch.testing.assert_close(ours, ref, atol=tol, rtol=0)
        x = _rand(2, 4, 8, 8, seed=30 + i)


# ----------------------------------------------------------------------------------------- conversions
def _definitions(
    s: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each parameterisation from its definition (x0, eps) with sigma read from the table only."""
    sig = s.sigma(t).view(-1, *([1] * (x0.ndim - 1)))
    a = 1 - sig
    return {
        "sample": x0,
        "epsilon": eps,
        "flow": eps - x0,
        "score": -eps / sig,
        # TrigFlow's F with sigma_d = 1 (SANA-Sprint's flow -> F map): ((1-2s) x + (1-2s+2s^2) v) / sqrt(s^2+(1-s)^2)
        "v_prediction": ((1 - 2 * sig) * (a * x0 + sig * eps) + (1 - 2 * sig + 2 * sig**2) * (eps - x0))
        / (sig**2 + a**2).sqrt(),
    }


@pytest.mark.parametrize("from_type", FLOW_PREDICTION_TYPES)
@pytest.mark.parametrize("to_type", FLOW_PREDICTION_TYPES)
def test_flow_conversions_against_definitions(from_type, to_type):
    s = NoiseSchedule.flow_matching(shift=3.0)
    x0, eps = _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    t = torch.tensor([0, 400, 998])
    x_t = s.add_noise(x0, eps, t)
    ref = _definitions(s, x0, eps, t)
    out = s.convert(ref[from_type], x_t, t, from_type, to_type)
    torch.testing.assert_close(out, ref[to_type], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s.to_x0(ref[from_type], x_t, t, from_type), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s.to_epsilon(ref[from_type], x_t, t, from_type), eps, atol=1e-9, rtol=1e-9)


def test_flow_conversions_at_pure_noise_and_clean_end():
    s = NoiseSchedule.flow_matching(shift=3.0)
    x0, eps = _rand(1, 4, seed=1), _rand(1, 4, seed=2)
    x_t = s.add_noise(x0, eps, 999)
    assert torch.equal(x_t, eps)  # sigma = 1: pure noise without terminal_pure_noise
    torch.testing.assert_close(s.to_x0(eps - x0, x_t, 999), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(s.to_x0(x0, x_t, 999, "sample"), x0)
    torch.testing.assert_close(s.convert(eps - x0, x_t, 999, "flow", "v_prediction"), -x0, atol=1e-12, rtol=0)
    assert torch.equal(s.add_noise(x0, eps, -1), x0)
    torch.testing.assert_close(s.ddim_step(eps - x0, 999, x_t, -1), x0, atol=1e-12, rtol=0)  # one Euler step


@pytest.mark.parametrize("from_type", FLOW_PREDICTION_TYPES)
@pytest.mark.parametrize("to_type", ["sample", "epsilon", "flow", "v_prediction", "score"])
def test_flow_conversion_gradcheck(from_type, to_type):
    s = NoiseSchedule.flow_matching(mu=1.15)
    out = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([5, 700])
    assert torch.autograd.gradcheck(lambda o, xx: s.convert(o, xx, t, from_type, to_type), (out, x))
    assert torch.autograd.gradcheck(lambda o, xx: s.ddim_step(o, t, xx, t - 3, from_type), (out, x))


def test_work_dtypes_on_flow():
    s = NoiseSchedule.flow_matching(shift=3.0)
    x = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    assert s.to_x0(x, x, torch.tensor([5, 900])).dtype == torch.bfloat16
    assert s.ddim_step(x, 900, x, 500).dtype == torch.bfloat16
    s32 = NoiseSchedule.flow_matching(shift=3.0, compute_dtype=None)
    assert s32.alpha(3, like=x).dtype == torch.float32 and s.alpha(3, like=x).dtype == torch.float64
    xf = x.float()
    torch.testing.assert_close(
        s32.ddim_step(xf, 900, xf, 500), s.ddim_step(xf, 900, xf, 500), atol=1e-6, rtol=1e-6
    )


# ----------------------------------------------------------------------------------------- timesteps
def test_model_timestep_conventions():
    sd3 = NoiseSchedule.flow_matching(shift=3.0)
    t = torch.tensor([999, 499, 0, -1])
    ts = sd3.model_timestep(t)
    assert ts.dtype == torch.float32 and ts.tolist()[:2] == [1000.0, 750.0] and ts[-1] == 0
    flux = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
    torch.testing.assert_close(flux.model_timestep(t).double(), flux.sigma(t), atol=1e-7, rtol=0)
    # per-call scale and the latents' dtype (FLUX casts sigma to bf16 before its x1000)
    bf = sd3.model_timestep(t, scale=1.0, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and float(bf[0]) == 1.0


def test_sigma_to_timestep_round_trips():
    for s in (
        NoiseSchedule.flow_matching(shift=3.0),
        NoiseSchedule.flow_matching(mu=3.23),
        NoiseSchedule.from_betas(),
    ):
        t = torch.arange(-1 if s.kind == "flow" else 0, 1000)
        assert torch.equal(s.sigma_to_timestep(s.sigma(t)), t)
        torch.testing.assert_close(
            s.sigma_to_timestep(s.sigma(t), mode="interpolate"), t.double(), atol=1e-9, rtol=0
        )
        mid = (s.sigma(t[1:]) + s.sigma(t[:-1])) / 2
        torch.testing.assert_close(
            s.sigma_to_timestep(mid, mode="interpolate"), t[:-1].double() + 0.5, atol=1e-9, rtol=0
        )
        assert bool((s.sigma_to_timestep(mid) - t[:-1]).abs().le(1).all())
    s = NoiseSchedule.flow_matching(shift=3.0)
    tt = torch.arange(0, 999)
    assert torch.equal(s.edm_sigma_to_timestep(s.edm_sigma(tt)), tt)  # finite EDM sigmas (t <= T-2)


# ----------------------------------------------------------------------------------------- bad inputs
BAD = [
    (
        lambda: NoiseSchedule(flow_sigmas=[0.5, 0.2]),
        OptionError,
        r"`flow_sigmas` to be non-decreasing.*flip\(0\)",
    ),
    (
        lambda: NoiseSchedule(flow_sigmas=[0.0, 0.5]),
        OptionError,
        r"`flow_sigmas` to lie in \(0, 1\].*sigma_\{-1\} = 0",
    ),
    (lambda: NoiseSchedule(flow_sigmas=[0.5, 1.5]), OptionError, r"`flow_sigmas` to lie in \(0, 1\]"),
    (lambda: NoiseSchedule(flow_sigmas=[0.5]), OptionError, r"`flow_sigmas` to hold at least 2 values"),
    (lambda: NoiseSchedule(flow_sigmas=[[0.5, 1.0]]), ShapeError, r"`flow_sigmas` to be 1-D"),
    (lambda: NoiseSchedule(flow_sigmas="abc"), DTypeError, r"`flow_sigmas` to be a 1-D tensor.*str"),
    (lambda: NoiseSchedule(flow_sigmas=[0.5, float("nan")]), NonFiniteError, r"`flow_sigmas` to be finite"),
    (
        lambda: NoiseSchedule([0.9, 0.5], flow_sigmas=[0.5, 1.0]),
        OptionError,
        r"exactly one of `alphas_cumprod`.*both",
    ),
    (
        lambda: NoiseSchedule(flow_sigmas=[0.5, 1.0], final_alpha_cumprod=0.9),
        OptionError,
        r"ends at sigma = 0.*`final_alpha_cumprod` must be 1.0",
    ),
    (lambda: NoiseSchedule(flow_sigmas=[0.5, 1.0], timestep_scale=0.0), OptionError, r"`timestep_scale` > 0"),
    (
        lambda: NoiseSchedule(flow_sigmas=[0.5, 1.0], timestep_scale="1000"),
        DTypeError,
        r"`timestep_scale` to be a real number",
    ),
    (
        lambda: NoiseSchedule(flow_sigmas=[0.5, 1.0], flow_config={"shift": 3}),
        DTypeError,
        r"`flow_config` to be a FlowMatchingConfig",
    ),
    (
        lambda: NoiseSchedule([0.9, 0.5], timestep_scale=1.0),
        OptionError,
        r"`timestep_scale` applies only to a flow schedule",
    ),
    (
        lambda: NoiseSchedule(flow_sigmas=[0.5, 1.0], prediction_type="flow_prediction"),
        OptionError,
        r"`prediction_type` to be one of \[.*'flow'\]",
    ),
    (
        lambda: NoiseSchedule([0.9, 0.5], prediction_type="flow"),
        OptionError,
        r"`prediction_type` to be one of \['epsilon', 'sample', 'v_prediction', 'score'\]",
    ),
    (
        lambda: NoiseSchedule.flow_matching(shift=3.0, mu=1.0),
        OptionError,
        r"either a static `shift` or a dynamic `mu`",
    ),
    (lambda: NoiseSchedule.flow_matching(shift=0.0), OptionError, r"`shift` to be > 0"),
    (lambda: NoiseSchedule.flow_matching(shift="3"), DTypeError, r"`shift` to be a real number"),
    (lambda: NoiseSchedule.flow_matching(mu=float("inf")), OptionError, r"`mu` to be a finite number"),
    (
        lambda: NoiseSchedule.flow_matching(mu=-1.0, time_shift_type="linear"),
        OptionError,
        r"`mu` > 0 for time_shift_type='linear'",
    ),
    (
        lambda: NoiseSchedule.flow_matching(mu=1.0, time_shift_type="log"),
        OptionError,
        r"`time_shift_type` to be one of",
    ),
    (
        lambda: NoiseSchedule.flow_matching(num_train_timesteps=1),
        OptionError,
        r"`num_train_timesteps` to be an int >= 2",
    ),
    (lambda: NoiseSchedule.flow_matching(shift_terminal=1.0), OptionError, r"`shift_terminal` to be < 1"),
    (
        lambda: NoiseSchedule.flow_matching_from_config({"shift": 3.0}),
        DTypeError,
        r"`config` to be a FlowMatchingConfig",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(type("S", (), {"config": {"use_dynamic_shifting": True}})()),
        OptionError,
        r"use_dynamic_shifting=True: pass exactly one of `mu=`.*mu=0.0",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"use_dynamic_shifting": True}})(), mu=1.0, image_seq_len=4096
        ),
        OptionError,
        r"exactly one of `mu=`",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(type("S", (), {"config": {"shift": 3.0}})(), mu=1.0),
        OptionError,
        r"apply only to a scheduler with use_dynamic_shifting=True.*static shift \(3.0\)",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"shift": 3.0, "invert_sigmas": True}})()
        ),
        OptionError,
        r"`invert_sigmas=True` \(Mochi",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"shift": 3.0, "use_karras_sigmas": True}})()
        ),
        OptionError,
        r"`use_karras_sigmas=True` \(Karras sigmas\).*pass the grid's sigmas",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"shift": 3.0, "use_beta_sigmas": True}})()
        ),
        OptionError,
        r"`use_beta_sigmas=True`",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"use_flow_sigmas": True}, "alphas_cumprod": [0.9, 0.5]})()
        ),
        OptionError,
        r"`use_flow_sigmas=True`.*NoiseSchedule.flow_matching\(shift=",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(type("S", (), {"alphas_cumprod": [0.9, 0.5]})(), mu=1.0),
        OptionError,
        r"apply only to flow-matching schedulers.*VP scheduler",
    ),
    (
        lambda: NoiseSchedule.from_scheduler(
            type("S", (), {"config": {"shift": 3.0, "use_dynamic_shifting": True}})(), image_seq_len=0
        ),
        OptionError,
        r"`image_seq_len` to be > 0",
    ),
    (
        lambda: resolution_mu(4096, 256, 256),
        OptionError,
        r"`base_image_seq_len` and `max_image_seq_len` to differ",
    ),
    (lambda: resolution_mu("4096"), DTypeError, r"`image_seq_len` to be a real number"),
    (
        lambda: packed_image_seq_len(1000, 1024),
        OptionError,
        r"`height` to be a multiple of vae_scale_factor \* patch_size = 16",
    ),
    (lambda: packed_image_seq_len(1024.0, 1024), DTypeError, r"`height` to be an int"),
    (
        lambda: shift_sigmas([0.5, 1000.0], shift=3.0),
        OptionError,
        r"`sigmas` to lie in \[0, 1\].*sigma \* 1000: divide",
    ),
    (lambda: shift_sigmas(torch.tensor([True]), shift=3.0), DTypeError, r"`sigmas` to be real"),
    (lambda: shift_sigmas(None), DTypeError, r"`sigmas` to be a number, a sequence"),
    (
        lambda: flow_sigma_grid(NoiseSchedule.from_betas(), 4),
        DTypeError,
        r"`schedule` to be a flow NoiseSchedule.*'vp'",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(), None),
        OptionError,
        r"`num_inference_steps` or `sigmas`, but got neither",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(), 0),
        OptionError,
        r"`num_inference_steps` to be an int >= 1",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(), 3, sigmas=[1.0, 0.5]),
        ShapeError,
        r"`sigmas` to hold num_inference_steps = 3 values, but got 2",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(), sigmas=[1.0, 0.0]),
        OptionError,
        r"every grid sigma to be > 0 \(the final 0 is appended",
    ),
    (  # audit 10: an ascending grid was accepted and failed later, in a sampler, naming other arguments
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(shift=3.0), sigmas=[0.25, 0.5, 1.0]),
        OptionError,
        r"`sigmas` to be strictly decreasing .*\[0.25, 0.5, 1.0\].*sigmas.flip\(0\)",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(mu=1.15), sigmas=[1.0, 0.5, 0.5]),
        OptionError,
        r"`sigmas` to be strictly decreasing",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(), sigmas=[[1.0]]),
        ShapeError,
        r"`sigmas` to be a non-empty 1-D grid",
    ),
    (
        lambda: flow_sigma_grid(NoiseSchedule.flow_matching(shift=3.0), 4, mu=1.0),
        OptionError,
        r"`mu` applies only to a dynamic-shift schedule.*3.0",
    ),
    (
        lambda: NoiseSchedule.flow_matching().add_noise(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([500.0, 3.0])
        ),
        DTypeError,
        r"integer indices into the flow table.*sigma_to_timestep\(timesteps / 1000\)",
    ),
    (
        lambda: NoiseSchedule.flow_matching().timesteps(999.0),
        DTypeError,
        r"`t` to hold integer indices into the flow table \(0 .. 999",
    ),
    (
        lambda: NoiseSchedule.flow_matching().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), 1000),
        OptionError,
        r"`t` to lie in \[-1, 999\]",
    ),
    (
        lambda: NoiseSchedule.flow_matching().model_timestep(3, dtype="float32"),
        DTypeError,
        r"`dtype` to be a torch.dtype or None",
    ),
    (lambda: NoiseSchedule.flow_matching().model_timestep(3, scale=-1.0), OptionError, r"`scale` to be > 0"),
    (
        lambda: NoiseSchedule.from_betas().model_timestep(3, scale=1.0),
        OptionError,
        r"`scale` applies only to a flow schedule",
    ),
    (
        lambda: NoiseSchedule.flow_matching().sigma_to_timestep(1.5),
        OptionError,
        r"`sigma` to lie in \[0, 1\]",
    ),
    (
        lambda: NoiseSchedule.flow_matching().sigma_to_timestep(0.5, mode="round"),
        OptionError,
        r"`mode` to be one of",
    ),
    (
        lambda: NoiseSchedule.flow_matching().convert(
            torch.zeros(2, 3), torch.zeros(2, 3), 5, "flow", "velocity"
        ),
        OptionError,
        r"`to_type` to be one of \[.*'flow'\]",
    ),
    (lambda: FlowMatchingConfig(shift_terminal="0.02"), DTypeError, r"`shift_terminal` to be a real number"),
    (lambda: FlowMatchingConfig(base_shift=None), DTypeError, r"`base_shift` to be a real number"),
]


@pytest.mark.parametrize("call,error,pattern", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_euler_with_the_exact_velocity_of_a_point_mass_lands_on_it():
    """Data = one point x0: the exact velocity is v(x, sigma) = (x - x0) / sigma; any grid's Euler walk is exact."""
    s = NoiseSchedule.flow_matching(mu=1.15)
    x0 = _rand(1, 3, 4, 4, seed=11)
    x = _rand(1, 3, 4, 4, seed=12)  # sigma = 1: pure noise
    for grid in (flow_sigma_grid(s, 28), flow_sigma_grid(s, sigmas=[1.0, 0.6, 0.2])):
        gs = grid.grid_schedule()
        state = x.clone()
        for i in range(grid.num_inference_steps - 1, -1, -1):
            v = (state - x0) / gs.sigma(i)
            state = gs.ddim_step(v, i, state, i - 1)
        torch.testing.assert_close(state, x0, atol=1e-12, rtol=0)


def test_plain_sigma_table_counts_as_static_shift_one():
    s = NoiseSchedule.from_flow_sigmas(torch.arange(1, 11, dtype=torch.float64) / 10)
    assert s.flow_config is None and s.timestep_scale == 1000.0
    grid = flow_sigma_grid(s, 4)
    assert grid.on_table and grid.indices.tolist() == [9, 6, 3, 0, -1]
    torch.testing.assert_close(grid.sigmas, torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0], dtype=torch.float64))
