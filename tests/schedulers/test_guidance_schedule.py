"""TeacherSolver's guidance schedules: ``guidance_scale`` as a callable of the model timestep.

Checked against an independent derivation: the same solve with the scale each step's timesteps call for given as
an explicit ``(B,)`` tensor step by step (Wan 2.2 A14B's two-expert switch at 1000 sigma = 875, and a guidance
interval); the callable sees what the model sees (:meth:`TeacherSolver.model_timestep`); its results are checked.
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.schedulers import NoiseSchedule, TeacherSolver


def velocity(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A conditional flow "model": v = tanh(x) * scale + t / 1000."""
    return torch.tanh(x) * scale + (t.to(x.dtype) / 1000).view(-1, *(1,) * (x.ndim - 1))


def _conds(batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (
        {"scale": torch.full((batch, 1, 1), 0.8, dtype=torch.float64)},
        {"scale": torch.full((batch, 1, 1), 0.1, dtype=torch.float64)},
    )


def switch(t: torch.Tensor) -> torch.Tensor:
    """Wan 2.2 A14B's scales: 4.0 where the high-noise expert runs (t >= 875), 3.0 below."""
    return torch.where(t >= 875, 4.0, 3.0).to(torch.float64)


def test_a_schedule_is_the_per_step_scale_of_each_sample() -> None:
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    seen: list[torch.Tensor] = []

    def recording(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return switch(t)

    x = torch.linspace(-1, 1, 2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    cond, uncond = _conds(2)
    t, t_to = torch.tensor([999, 700]), torch.tensor([300, 100])
    got = TeacherSolver(velocity, schedule, guidance_scale=recording).solve(
        x, t, t_to, cond, uncond, num_steps=4
    )
    # the schedule sees the model's timestep input (1000 sigma), one per sample (not the 2B of the batched call)
    solver = TeacherSolver(velocity, schedule)
    assert len(seen) == 4 and all(s.shape == (2,) for s in seen)
    steps = solver.step_timesteps(t, t_to, 4, x)
    for i, s in enumerate(seen):
        torch.testing.assert_close(s, solver.model_timestep(steps[i]))
    assert {bool(v) for s in seen for v in s >= 875} == {True, False}  # both scales were used

    y = x  # the same solve with each step's scales given explicitly, one step at a time
    for i in range(4):
        w = switch(solver.model_timestep(steps[i]))
        y = solver.solve(y, steps[i], steps[i + 1], cond, uncond, num_steps=1, guidance_scale=w)
    torch.testing.assert_close(got, y, rtol=0, atol=1e-12)
    fixed = TeacherSolver(velocity, schedule, guidance_scale=4.0).solve(x, t, t_to, cond, uncond, num_steps=4)
    assert not torch.allclose(got, fixed)  # the switch matters


def test_a_constant_schedule_is_the_number_and_a_per_call_schedule_overrides() -> None:
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond, uncond = _conds(3)
    number = TeacherSolver(velocity, schedule, guidance_scale=2.5).predict(x, 600, cond, uncond)
    solver = TeacherSolver(velocity, schedule, guidance_scale=lambda t: 2.5)
    torch.testing.assert_close(solver.predict(x, 600, cond, uncond), number, rtol=0, atol=0)
    # a guidance interval (Kynkaenniemi et al. 2024): guided on a middle band only; outside it the no-op scale
    band = TeacherSolver(
        velocity, schedule, guidance_scale=lambda t: torch.where((t > 300) & (t < 900), 2.5, 1.0)
    )
    t = torch.tensor([100, 600, 999])
    got = band.predict(x, t, cond, uncond)
    torch.testing.assert_close(got[1:2], number[1:2], rtol=0, atol=0)
    plain = TeacherSolver(velocity, schedule).predict(x, t, cond)  # the conditional output alone
    torch.testing.assert_close(got[[0, 2]], plain[[0, 2]], rtol=0, atol=1e-15)
    # a per-call number replaces the solver's schedule, and a per-call schedule replaces its number
    torch.testing.assert_close(solver.predict(x, 600, cond, uncond, guidance_scale=2.5), number)
    fixed = TeacherSolver(velocity, schedule, guidance_scale=7.0)
    torch.testing.assert_close(fixed.predict(x, 600, cond, uncond, guidance_scale=lambda t: 2.5), number)


def test_a_schedule_drives_an_embedded_guidance_input() -> None:
    """FLUX.1-dev-style teachers take the scale as an input: the schedule's value per sample is what they get."""
    got: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        got.append(guidance)
        return x

    solver = TeacherSolver(
        model, NoiseSchedule.flow_matching(shift=1.0), guidance_scale=switch, guidance_input="guidance"
    )
    solver.predict(torch.zeros(2, 3), torch.tensor([999, 100]))
    assert got[0].tolist() == [4.0, 3.0]


def test_a_schedule_result_is_checked() -> None:
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    cond, uncond = _conds(2)
    cond, uncond = {"scale": cond["scale"][:, 0]}, {"scale": uncond["scale"][:, 0]}
    cases = [
        (
            lambda t: t > 500,
            DTypeError,
            r"guidance_scale schedule to return a real number or a real \(B,\) tensor",
        ),
        (lambda t: torch.ones(2, 2), DTypeError, r"returned a torch.float32 tensor of shape \(2, 2\)"),
        (
            lambda t: torch.ones(3),
            ShapeError,
            r"`guidance_scale\(t\)` to be a number or one value per sample \(2,\)",
        ),
        (lambda t: "4", DTypeError, r"guidance_scale\(t\)"),
        (lambda t: float("inf"), Exception, r"guidance_scale\(t\)"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            TeacherSolver(velocity, schedule, guidance_scale=fn).predict(x, 500, cond, uncond)
    with pytest.raises(OptionError, match=r"Expected `uncond` for classifier-free guidance"):
        TeacherSolver(velocity, schedule, guidance_scale=switch).predict(x, 500, cond)
