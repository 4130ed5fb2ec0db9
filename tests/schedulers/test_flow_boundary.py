"""Consistency boundary conditions in sigma on rectified-flow schedules (issue 21 part 3).

On a flow schedule the consistency function is :math:`f(x_\\sigma, \\sigma) = x_\\sigma - \\sigma \\hat v`
(c_skip 1, c_out -sigma on the velocity; PCM on SD3), so :math:`f(x, 0) = x` at the clean end ``t = -1``.
Expected values use sigmas from the shift formula (Esser et al. 2024, Sec. 5.3.2), not the library's table.
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.schedulers import NoiseSchedule, boundary_scalings, consistency_function

SD3 = NoiseSchedule.flow_matching(shift=3.0)
SMALL = NoiseSchedule.flow_matching(num_train_timesteps=10, shift=3.0)


def _sigma(t: torch.Tensor, total: int, shift: float = 3.0) -> torch.Tensor:
    u = (t + 1).to(torch.float32) / total
    return torch.where(t < 0, 0.0, shift * u / (1 + (shift - 1) * u)).double()


@pytest.mark.parametrize("prediction_type", ["flow", "sample", "epsilon", "v_prediction", "score"])
@pytest.mark.parametrize("schedule", [SD3, SMALL], ids=["T1000", "T10"])
def test_flow_consistency_function_is_identity_at_sigma_zero(schedule, prediction_type):
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    out = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    f = consistency_function(out, x, torch.tensor([-1, -1, -1]), schedule, prediction_type)
    assert torch.equal(f, x)


@pytest.mark.parametrize("schedule", [SD3, SMALL], ids=["T1000", "T10"])
def test_flow_consistency_function_is_x_minus_sigma_v(schedule):
    total = schedule.num_train_timesteps
    t = torch.tensor([total - 1, total // 2, 0, -1])
    x = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    v = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    sigma = _sigma(t, total).view(-1, 1, 1, 1)
    expected = x - sigma * v
    torch.testing.assert_close(consistency_function(v, x, t, schedule), expected, rtol=1e-6, atol=1e-12)
    # the LCM constants are not used on flow schedules
    f = consistency_function(v, x, t, schedule, sigma_data=2.0, timestep_scaling=0.1)
    torch.testing.assert_close(f, expected, rtol=1e-6, atol=1e-12)
    # a sample-predicting student: f is its x0 off the clean end
    x0 = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    f = consistency_function(x0, x, t, schedule, "sample")
    assert torch.equal(f[:3], x0[:3]) and torch.equal(f[3], x[3])


def test_flow_consistency_function_gradcheck():
    t = torch.tensor([999, 300, -1])
    v = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: consistency_function(a, b, t, SD3), (v, x))
    t_eps = torch.tensor([998, 300, -1])  # epsilon carries no x0 at sigma = 1 (alpha = 0)
    assert torch.autograd.gradcheck(lambda a, b: consistency_function(a, b, t_eps, SD3, "epsilon"), (v, x))


def test_boundary_scalings_in_sigma_and_vp_unchanged():
    c_skip, c_out = boundary_scalings(torch.tensor([-1, 0, 500, 999]), schedule=SD3)
    assert c_skip.dtype == torch.float64 and c_skip.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert c_out.tolist() == [0.0, 1.0, 1.0, 1.0]
    t = torch.tensor([0, 19, 500, 999])
    vp = NoiseSchedule.from_betas()
    for got, want in zip(boundary_scalings(t, schedule=vp), boundary_scalings(t)):
        assert torch.equal(got, want)
    tau = 10.0 * t.double()
    assert torch.equal(boundary_scalings(t)[0], 0.25 / (tau**2 + 0.25))
    with pytest.raises(OptionError, match="schedule"):
        boundary_scalings(t, schedule="sd3")
    with pytest.raises(OptionError, match=r"\[-1, 999\]"):
        boundary_scalings(torch.tensor([1000]), schedule=SD3)
    # VP keeps refusing the clean end (its LCM scalings are defined for t >= 0)
    x = torch.randn(1, 4)
    with pytest.raises(OptionError, match="t >= 0"):
        consistency_function(x, x, torch.tensor([-1]), vp)
