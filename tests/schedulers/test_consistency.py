"""Consistency parameterisation against diffusers' LCMScheduler and the boundary conditions."""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.schedulers import NoiseSchedule, boundary_scalings, consistency_function

diffusers = pytest.importorskip("diffusers")


def test_boundary_conditions():
    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out = boundary_scalings(torch.arange(20, 1000))
    assert bool((c_skip < 1e-5).all()) and bool((c_out > 0.9999).all())
    # c_skip^2-free identity of the parameterisation: c_skip * (tau^2 + sd^2) = sd^2, c_out^2 = tau^2/(tau^2+sd^2)
    t = torch.arange(0, 1000, dtype=torch.float64)
    c_skip, c_out = boundary_scalings(t, sigma_data=0.5, timestep_scaling=10.0)
    torch.testing.assert_close(c_skip + c_out**2, torch.ones_like(t))


@pytest.mark.parametrize("timestep_scaling", [1.0, 10.0])
def test_matches_lcm_scheduler(timestep_scaling):
    lcm = diffusers.LCMScheduler(timestep_scaling=timestep_scaling)
    for t in [0, 1, 19, 259, 999]:
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
        assert float(c_skip) == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-12)
        assert float(c_out) == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_consistency_function_matches_lcm_denoised(prediction_type):
    lcm = diffusers.LCMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    lcm.alphas_cumprod = lcm.alphas_cumprod.double()
    lcm.final_alpha_cumprod = lcm.final_alpha_cumprod.double()
    s = NoiseSchedule.from_scheduler(lcm)
    lcm.set_timesteps(4)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 4, 4, 4)
    for t in lcm.timesteps:
        out = torch.tanh(x) * 0.5
        ref = lcm.step(out, t, x, generator=torch.Generator().manual_seed(0)).denoised
        lcm._step_index = None  # each call stands alone here
        ours = consistency_function(out, x, int(t), s)
        # LCMScheduler evaluates c_skip/c_out in float32 (from the timestep tensor): ~1e-8 differences.
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def test_consistency_function_identity_at_zero_and_errors():
    s = NoiseSchedule.from_betas()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    assert torch.equal(consistency_function(torch.randn_like(x), x, 0, s), x)
    with pytest.raises(OptionError, match=r"Expected `sigma_data` to be > 0, but got 0"):
        boundary_scalings(3, sigma_data=0)
    # t = -1 (samplers' clean end) used to give c_out < 0, i.e. f ~ -x
    with pytest.raises(
        OptionError, match=r"Expected timesteps t >= 0 for the boundary scalings, but got \[5.0, -1.0\]"
    ):
        boundary_scalings(torch.tensor([5, -1]))
    with pytest.raises(OptionError, match=r"Expected timesteps t >= 0"):
        consistency_function(torch.randn_like(x), x, torch.tensor([3, -1]), s)
