"""A TeacherSolver inside a score loss must run on the loss's schedule (audit 10, defect 1).

The loss noises the batch with ``schedule`` and converts the network's output with it, while a TeacherSolver
calls its network with its *own* schedule's timestep at the same index: on another schedule the real / fake
score is evaluated at another noise level than the state's. The losses refuse that; a solver on an equal
schedule (another object with the same table and timestep scale) is accepted and gives the same values.
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.losses import denoise, dmd_loss, fake_score_loss, sid_loss, sim_loss
from diffdistill.schedulers import NoiseSchedule, TeacherSolver


def _point_mass_velocity(x0: torch.Tensor, schedule: NoiseSchedule):
    """The exact flow velocity of a point mass at ``x0`` under ``schedule`` (model timestep 1000 sigma)."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t / 1000.0).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x_t - x0) / sigma  # v = eps - x0 with x_t = (1 - sigma) x0 + sigma eps

    return model


SHIFT1 = NoiseSchedule.flow_matching(shift=1.0)
SHIFT3 = NoiseSchedule.flow_matching(shift=3.0)
VP = NoiseSchedule.from_betas(prediction_type="v_prediction")


def _calls(real, fake, schedule):
    x = torch.randn(2, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([300, 700])
    return {
        "dmd_loss": lambda: dmd_loss(x, real, fake, schedule=schedule, t=t, generator=gen),
        "sid_loss": lambda: sid_loss(x, real, fake, schedule=schedule, t=t, generator=gen),
        "sim_loss": lambda: sim_loss(x, real, fake, schedule=schedule, t=t, generator=gen),
        "fake_score_loss": lambda: fake_score_loss(fake, x, schedule=schedule, t=t, generator=gen),
        "denoise": lambda: denoise(real, x, t, schedule),
    }


@pytest.mark.parametrize("solver_schedule", [SHIFT3, VP], ids=["flow-shift3", "vp"])
@pytest.mark.parametrize("loss", ["dmd_loss", "sid_loss", "sim_loss", "fake_score_loss", "denoise"])
def test_score_losses_refuse_a_solver_on_another_schedule(loss, solver_schedule):
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    solver = TeacherSolver(net, solver_schedule)
    on_loss = TeacherSolver(net, SHIFT1)
    # the wrong solver in each slot the loss has: real (and fake for the two-model losses)
    slots = ("real", "fake") if loss in ("dmd_loss", "sid_loss", "sim_loss") else ("fake",)
    if loss == "denoise":
        slots = ("model",)
    for slot in slots:
        real, fake = (solver, on_loss) if slot in ("real", "model") else (on_loss, solver)
        with pytest.raises(
            OptionError, match=rf"`{slot}` is a TeacherSolver on another schedule than `schedule`"
        ):
            _calls(real, fake, SHIFT1)[loss]()
    with pytest.raises(OptionError, match=r"TeacherSolver\(model, schedule, \.\.\.\)"):
        _calls(solver, solver, SHIFT1)[loss]()


def test_solver_on_an_equal_schedule_is_accepted_and_exact():
    """Another object with the same table and timestep scale is the same schedule: the point-mass model's x0
    estimate is exact through it, as through the loss's own object."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    twin = NoiseSchedule.flow_matching(shift=1.0)
    assert twin is not SHIFT1
    t = torch.tensor([300, 700])
    x_t = SHIFT1.add_noise(x0, torch.randn_like(x0), t)
    for schedule in (SHIFT1, twin):
        est = denoise(TeacherSolver(_point_mass_velocity(x0, schedule), schedule), x_t, t, SHIFT1)
        torch.testing.assert_close(est, x0, rtol=0, atol=1e-12)
    # another timestep_scale is another schedule for the network (FLUX's sigma vs SD3's 1000 sigma)
    scaled = NoiseSchedule.flow_matching(shift=1.0, timestep_scale=1.0)
    with pytest.raises(OptionError, match="`model` is a TeacherSolver on another schedule"):
        denoise(TeacherSolver(_point_mass_velocity(x0, scaled), scaled), x_t, t, SHIFT1)
