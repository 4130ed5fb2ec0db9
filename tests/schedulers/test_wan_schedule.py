"""Wan's scheduler (``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=3)``, Wan 2.1 T2V) read by :meth:`NoiseSchedule.from_scheduler`, against diffusers 0.42.1.

Parity in float64 where diffusers computes in float64 (its ``set_timesteps`` builds the flow grid with numpy
float64 and casts to float32 at the end, its ``timesteps`` are that float64 ``sigma * T`` truncated to int64):
compared bit for bit after the same cast. ``add_noise`` is compared to diffusers' float32 sigma, so the tolerance
is that rounding (``2**-24`` relative on sigma) times ``|noise - x0|``. The training table is checked against the
shift written out independently, ``shift * u / (1 + (shift - 1) * u)``, ``u = (t + 1) / T``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffdistill.errors import OptionError
from diffdistill.schedulers import (
    FlowMatchingConfig,
    NoiseSchedule,
    ddim_sample,
    euler_sample,
    flow_pipeline_grid,
    flow_sigma_grid,
)

F32_EPS = 2.0**-24


def _wan_unipc(**overrides) -> UniPCMultistepScheduler:
    """The scheduler as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` ships it (reference/flow.md section 3)."""
    config = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
    config.update(overrides)
    return UniPCMultistepScheduler(**config)


def _independent_table(shift: float, total: int = 1000) -> torch.Tensor:
    u = torch.arange(1, total + 1, dtype=torch.float64) / total
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_wan_unipc_schedule_table_and_prediction(shift):
    schedule = NoiseSchedule.from_scheduler(_wan_unipc(flow_shift=shift))
    assert schedule.kind == "flow" and schedule.prediction_type == "flow"
    cfg = schedule.flow_config
    assert cfg.shift == shift and cfg.multistep_grid == "unipc" and not cfg.dynamic
    table = schedule.sigma(torch.arange(1000))
    # diffusers' table is float32 arithmetic: u = (t + 1) / T and three shift operations, 4 roundings
    torch.testing.assert_close(table, _independent_table(shift), atol=0, rtol=4 * F32_EPS)
    # the same table as FlowMatchEulerDiscreteScheduler(shift=flow_shift) (ascending = its sigmas reversed)
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    assert torch.equal(table.float(), euler.sigmas.flip(0))
    assert float(schedule.sigma(-1)) == 0.0 and float(schedule.alpha(999)) == 0.0


def test_diffusers_unipc_holds_no_flow_table_before_set_timesteps():
    """Why the table is rebuilt from the config: UniPC's sigmas before set_timesteps are the VP betas table
    (sqrt((1 - abar) / abar), far above 1), which a flow add_noise would turn into alpha = 1 - sigma < 0."""
    scheduler = _wan_unipc()
    assert float(scheduler.sigmas.max()) > 100.0
    assert hasattr(scheduler, "alphas_cumprod")  # ...and it still reads as a flow schedule:
    assert NoiseSchedule.from_scheduler(scheduler).kind == "flow"


@pytest.mark.parametrize("n", [1, 2, 4, 8, 30, 50, 1000])
def test_wan_unipc_grid_matches_set_timesteps(n):
    scheduler = _wan_unipc()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    scheduler.set_timesteps(n)
    grid = flow_sigma_grid(schedule, n)
    assert grid.sigmas.dtype == torch.float64 and grid.num_inference_steps == n
    assert torch.equal(grid.sigmas.float(), scheduler.sigmas)
    assert torch.equal(grid.timesteps.to(torch.int64), scheduler.timesteps)
    # independent: s = linspace(1, 1/T, N + 1)[:-1], shifted, the first lowered by 1e-6 (numpy float64)
    s = np.linspace(1.0, 1 / 1000, n + 1)[:-1]
    sig = 3.0 * s / (1 + 2.0 * s)
    sig[0] -= 1e-6
    torch.testing.assert_close(grid.sigmas[:-1], torch.from_numpy(sig), atol=1e-15, rtol=0)
    assert float(grid.sigmas[-1]) == 0.0
    assert torch.equal(flow_pipeline_grid(schedule, n).sigmas, grid.sigmas)  # default pipeline: "wan"


def test_wan_pipeline_grid_on_any_static_schedule():
    """flow_pipeline_grid(pipeline="wan") gives UniPC's grid for a schedule built without the scheduler."""
    scheduler = _wan_unipc()
    scheduler.set_timesteps(50)
    grid = flow_pipeline_grid(NoiseSchedule.flow_matching(shift=3.0), 50, pipeline="wan")
    assert torch.equal(grid.sigmas.float(), scheduler.sigmas)
    assert not grid.on_table  # UniPC's s grid is not (t + 1) / T: samplers walk the grid's own schedule


@pytest.mark.parametrize("n", [1, 4, 28])
def test_euler_pipeline_grids_of_a_wan_schedule_are_flow_match_eulers(n):
    """Naming "sd3" / "flux" on a schedule read from Wan's UniPC gives FlowMatchEulerDiscreteScheduler's grids of
    the same shift (no UniPC 1e-6 at the top): the grid a diffusers FlowMatchEuler scheduler with Wan's shift
    builds, e.g. a few-step student's saved sampler."""
    wan = NoiseSchedule.from_scheduler(_wan_unipc())
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(n)
    assert torch.equal(flow_pipeline_grid(wan, n, pipeline="sd3").sigmas.float(), euler.sigmas)
    flux = flow_pipeline_grid(wan, n, pipeline="flux")
    euler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    # diffusers shifts custom sigmas in float32: s' = 3s / (1 + 2s) is three float32 operations, one rounding each
    torch.testing.assert_close(flux.sigmas.float(), euler.sigmas, atol=0, rtol=3 * 2.0**-23)
    assert float(flux.sigmas[0]) == 1.0


def test_wan_unipc_custom_sigmas_dynamic_shift_and_terminal():
    custom = [1.0, 0.75, 0.5, 0.25]
    scheduler = _wan_unipc()
    scheduler.set_timesteps(sigmas=np.array(custom))
    grid = flow_sigma_grid(NoiseSchedule.from_scheduler(scheduler), sigmas=custom)
    assert torch.equal(grid.sigmas.float(), scheduler.sigmas)
    assert torch.equal(grid.timesteps.to(torch.int64), scheduler.timesteps)

    dynamic = _wan_unipc(use_dynamic_shifting=True, shift_terminal=0.05)
    dynamic.set_timesteps(6, mu=0.8)
    schedule = NoiseSchedule.from_scheduler(dynamic, mu=0.8)
    assert schedule.flow_config.dynamic and schedule.flow_config.shift_terminal == 0.05
    grid = flow_sigma_grid(schedule, 6)
    assert torch.equal(grid.sigmas.float(), dynamic.sigmas)
    assert float(grid.sigmas[-2]) == pytest.approx(0.05, abs=1e-12)


@pytest.mark.parametrize(("shift", "n"), [(3.0, 1), (3.0, 4), (5.0, 30), (5.0, 50)])
def test_dpmsolver_flow_grid_matches_set_timesteps(shift, n):
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.flow_config.multistep_grid == "dpmsolver"
    scheduler.set_timesteps(n)
    grid = flow_sigma_grid(schedule, n)
    assert torch.equal(grid.sigmas.float(), scheduler.sigmas)
    assert torch.equal(grid.timesteps.to(torch.int64), scheduler.timesteps)
    s = (1 - 1 / 1000) * torch.arange(n, 0, -1, dtype=torch.float64) / n  # independent: (1 - 1/T) k / N
    torch.testing.assert_close(grid.sigmas[:-1], shift * s / (1 + (shift - 1) * s), atol=1e-15, rtol=0)


def test_dpmsolver_flow_grid_dynamic_mu():
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True
    )
    schedule = NoiseSchedule.from_scheduler(scheduler, mu=1.1)
    scheduler.set_timesteps(8, mu=1.1)  # diffusers sets flow_shift = exp(mu)
    assert torch.equal(flow_sigma_grid(schedule, 8).sigmas.float(), scheduler.sigmas)


@pytest.mark.parametrize("k", [0, 3, 9])
def test_wan_add_noise_matches_unipc(k):
    scheduler = _wan_unipc()
    scheduler.set_timesteps(10)
    grid = flow_sigma_grid(NoiseSchedule.from_scheduler(scheduler), 10)
    g = torch.Generator().manual_seed(k)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)  # video latents (B, C, F, H, W)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = scheduler.add_noise(x0, noise, scheduler.timesteps[k : k + 1].repeat(2))
    ours = grid.grid_schedule().add_noise(x0, noise, torch.full((2,), 9 - k))
    sigma = float(grid.sigmas[k])
    independent = (1 - sigma) * x0 + sigma * noise
    assert torch.equal(ours, independent)
    atol = 2 * F32_EPS * float((noise - x0).abs().max())  # diffusers' float32 sigma
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def test_euler_on_wan_grid_written_out():
    """ddim_sample / euler_sample on Wan's grid are the Euler steps x += (sigma' - sigma) v(x, 1000 sigma) on
    video latents, the model fed float32 1000 sigma (diffusers' int timesteps are its truncation)."""
    scheduler = _wan_unipc()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    grid = flow_pipeline_grid(schedule, 4)
    scheduler.set_timesteps(4)
    seen: list[torch.Tensor] = []

    def velocity(x, t):
        seen.append(t)
        return 0.3 * x * (1 + t.double().view(-1, 1, 1, 1, 1) / 1000) + 0.1 * torch.sin(3 * x)

    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x.clone()
    sig = grid.sigmas
    for i in range(4):
        t = (sig[i] * 1000).float().double().expand(2)
        expected = expected + (sig[i + 1] - sig[i]) * (
            0.3 * expected * (1 + t.view(-1, 1, 1, 1, 1) / 1000) + 0.1 * torch.sin(3 * expected)
        )
    for sampler in (ddim_sample, euler_sample):
        seen.clear()
        out = sampler(velocity, schedule, x, grid)
        torch.testing.assert_close(out.sample, expected, atol=1e-12, rtol=0)
        assert [float(t[0]) for t in seen] == [float((s * 1000).float()) for s in sig[:-1]]
        assert [int(t[0]) for t in seen] == scheduler.timesteps.tolist()


def test_wan_schedule_bad_inputs():
    with pytest.raises(
        OptionError, match=r"use_flow_sigmas=True` with prediction_type='epsilon'.*flow_prediction"
    ):
        NoiseSchedule.from_scheduler(_wan_unipc(prediction_type="epsilon"))
    with pytest.raises(OptionError, match=r"final_sigmas_type='sigma_min'.*clean end"):
        NoiseSchedule.from_scheduler(_wan_unipc(final_sigmas_type="sigma_min"))
    deis = DEISMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    with pytest.raises(OptionError, match=r"use_flow_sigmas=True` on 'DEISMultistepScheduler'.*supported"):
        NoiseSchedule.from_scheduler(deis)
    with pytest.raises(OptionError, match=r"use_karras_sigmas=True"):
        NoiseSchedule.from_scheduler(_wan_unipc(use_karras_sigmas=True))
    with pytest.raises(OptionError, match=r"use_dynamic_shifting=True: pass exactly one of `mu=`"):
        NoiseSchedule.from_scheduler(_wan_unipc(use_dynamic_shifting=True))
    with pytest.raises(OptionError, match=r"`mu` / `image_seq_len` apply only"):
        NoiseSchedule.from_scheduler(_wan_unipc(), mu=1.0)
    dpm = NoiseSchedule.from_scheduler(
        DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    )
    with pytest.raises(OptionError, match=r"DPMSolverMultistepScheduler's flow grids take no custom sigmas"):
        flow_sigma_grid(dpm, sigmas=[1.0, 0.5])
    with pytest.raises(OptionError, match=r"Expected `multistep_grid` to be one of \['unipc', 'dpmsolver'\]"):
        FlowMatchingConfig(shift=3.0, multistep_grid="euler")
    with pytest.raises(OptionError, match=r"Expected `pipeline` to be one of \['sd3', 'flux', 'wan'\]"):
        flow_pipeline_grid(dpm, 4, pipeline="ltx")
