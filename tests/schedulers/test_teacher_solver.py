"""TeacherSolver: n steps == n manual DDIM steps, CFG conventions, batching, errors."""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError, ShapeError
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, apply_guidance, concat_conditions


class CountingModel:
    """A conditional epsilon-model: eps = tanh(x) * scale + shift, counting its calls and batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, scale, extra):
        self.batches.append(x.shape[0])
        tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return torch.tanh(x) * scale + extra["shift"] * tt


def _conds(batch, dtype=torch.float64):
    cond = {
        "scale": torch.full((batch, 1, 1, 1), 0.7, dtype=dtype),
        "extra": {"shift": torch.full((batch, 1, 1, 1), 0.3, dtype=dtype)},
    }
    uncond = {
        "scale": torch.full((1, 1, 1, 1), 0.2, dtype=dtype),
        "extra": {"shift": torch.zeros(batch, 1, 1, 1, dtype=dtype)},
    }
    return cond, uncond


@pytest.mark.parametrize("guidance", ["imagen", "lcm"])
@pytest.mark.parametrize("num_steps", [1, 3, 4])
def test_n_steps_equal_manual_ddim(guidance, num_steps):
    sched = NoiseSchedule.from_betas()
    model = CountingModel()
    w = torch.tensor([1.5, 7.0])
    solver = TeacherSolver(model, sched, guidance_scale=w, guidance=guidance)
    x = torch.linspace(-1, 1, 2 * 4 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4, 4)
    cond, uncond = _conds(2)
    t, t_to = torch.tensor([999, 640]), torch.tensor([800, 300])
    got = solver.solve(x, t, t_to, cond, uncond, num_steps=num_steps)
    assert model.batches == [4] * num_steps  # cond + uncond in one call per step

    # Independent manual loop: separate cond/uncond calls, explicit guidance formula, explicit steps.
    y = x
    for i in range(num_steps):
        ti = t - (i * (t - t_to)) // num_steps
        tn = t - ((i + 1) * (t - t_to)) // num_steps
        c = torch.tanh(y) * 0.7 + 0.3 * (ti.double().view(-1, 1, 1, 1) / 1000)
        u = torch.tanh(y) * 0.2
        ww = w.double().view(-1, 1, 1, 1)
        eps = u + ww * (c - u) if guidance == "imagen" else c + ww * (c - u)
        y = sched.ddim_step(eps, ti, y, tn)
    torch.testing.assert_close(got, y, atol=1e-12, rtol=0)


def test_conventions_are_shifted_by_one_and_noop_skips_uncond():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(apply_guidance(c, u, 5.0, "imagen"), apply_guidance(c, u, 4.0, "lcm"))
    torch.testing.assert_close(apply_guidance(c, u, 1.0, "imagen"), c)
    model = CountingModel()
    sched = NoiseSchedule.from_betas()
    cond, uncond = _conds(2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    TeacherSolver(model, sched, guidance_scale=1.0).predict(x, 500, cond, uncond)
    TeacherSolver(model, sched, guidance_scale=0.0, guidance="lcm").predict(x, 500, cond, uncond)
    TeacherSolver(model, sched, guidance_scale=1.0).predict(x, 500, cond, None)  # no-op: uncond optional
    assert model.batches == [2, 2, 2]
    # A real scale without uncond used to return the conditional output silently (0.2 instead of 1.2).
    for w, conv, noop in ((3.0, "imagen", 1.0), (torch.tensor([2.0, 4.0]), "lcm", 0.0)):
        with pytest.raises(
            OptionError,
            match=rf"Expected `uncond` for classifier-free guidance with guidance_scale=.* \({conv} convention\), "
            rf"but got None\. .* no-op guidance_scale \({noop}\)",
        ):
            TeacherSolver(model, sched, guidance_scale=w, guidance=conv).predict(x, 500, cond)
        with pytest.raises(OptionError, match=r"Expected `uncond`"):
            TeacherSolver(model, sched, guidance_scale=w, guidance=conv).solve(x, 999, 500, cond, num_steps=2)
    # a tensor scale equal to the no-op still runs both passes (its values are never read): say so
    with pytest.raises(
        OptionError,
        match=r"guidance_scale=a tensor \(\(\)\).*no-op guidance_scale \(1\.0\) as a Python number",
    ):
        TeacherSolver(model, sched).predict(x, 500, cond, guidance_scale=torch.tensor(1.0))
    assert model.batches == [2, 2, 2]


def test_trajectory_and_no_grad():
    sched = NoiseSchedule.from_betas()
    lin = torch.nn.Conv2d(4, 4, 1).double()
    solver = TeacherSolver(lambda x, t: lin(x), sched)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    traj = solver.solve(x, 999, -1, num_steps=4, return_trajectory=True)
    assert len(traj) == 5 and traj[0] is x
    assert not traj[-1].requires_grad  # frozen teacher: no graph by default
    assert solver.solve(x, 999, 500, grad=True).requires_grad


def test_step_timesteps_bounds():
    solver = TeacherSolver(lambda x, t: x, NoiseSchedule.from_betas())
    steps = solver.step_timesteps(torch.tensor([999, 130, 7]), torch.tensor([0, 5, -1]), 7, torch.zeros(3))
    assert steps.shape == (8, 3)
    assert torch.equal(steps[0], torch.tensor([999, 130, 7])) and torch.equal(
        steps[-1], torch.tensor([0, 5, -1])
    )
    assert bool((steps[1:] < steps[:-1]).all())


def test_concat_conditions_and_errors():
    with pytest.raises(OptionError, match=r"same keys, but got cond \['a'\] and uncond \['b'\]"):
        concat_conditions({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 2)
    with pytest.raises(
        ShapeError, match=r"`uncond\['a'\]` to have batch size 2 or 1 in dim 0, but got shape \(3, 5\)"
    ):
        concat_conditions({"a": torch.zeros(2, 5)}, {"a": torch.zeros(3, 5)}, 2)
    with pytest.raises(OptionError, match=r"non-tensor values must be equal"):
        concat_conditions({"a": 1}, {"a": 2}, 2)
    assert concat_conditions({"a": "same"}, {"a": "same"}, 2) == {"a": "same"}
    sched = NoiseSchedule.from_betas()
    solver = TeacherSolver(lambda x, t: x, sched)
    with pytest.raises(OptionError, match=r"Expected `t - t_to >= num_steps` \(4\).*t=\[10\] and t_to=\[8\]"):
        solver.solve(torch.zeros(1, 2), 10, 8, num_steps=4)
    with pytest.raises(OptionError, match=r"Expected `num_steps` to be an int >= 1, but got 0"):
        solver.solve(torch.zeros(1, 2), 10, 8, num_steps=0)
    with pytest.raises(
        OptionError, match=r"Expected `guidance` to be one of \['imagen', 'lcm'\], but got 'cfg'"
    ):
        TeacherSolver(lambda x, t: x, sched, guidance="cfg")
    with pytest.raises(OptionError, match=r"Expected `schedule` to be a NoiseSchedule"):
        TeacherSolver(lambda x, t: x, object())
    with pytest.raises(
        ShapeError,
        match=r"`guidance_scale` to be a number or one value per sample \(2,\), but got shape \(3,\)",
    ):
        apply_guidance(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_guidance_defaults_agree_with_the_samplers():
    """Issue 18, part 4: one default guidance convention and one meaning of an omitted scale.

    TeacherSolver's default scale used to be 1.0 whatever the convention, so ``TeacherSolver(m, s, guidance="lcm")``
    guided with w = 1 (2c - u, and demanded ``uncond``) while ``lcm_sample(..., guidance="lcm")`` did not guide.
    Both now default to the Imagen convention, and an omitted scale means no guidance in the chosen convention.
    """
    import inspect

    from diffdistill.schedulers import lcm_sample

    assert (
        inspect.signature(TeacherSolver).parameters["guidance"].default
        == inspect.signature(lcm_sample).parameters["guidance"].default
        == "imagen"
    )
    assert inspect.signature(TeacherSolver).parameters["guidance_scale"].default is None
    assert inspect.signature(lcm_sample).parameters["guidance_scale"].default is None
    sched = NoiseSchedule.from_betas()
    cond, uncond = _conds(2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for convention, noop in (("imagen", 1.0), ("lcm", 0.0)):
        model = CountingModel()
        solver = TeacherSolver(model, sched, guidance=convention)
        assert solver.guidance_scale == noop
        got = solver.predict(x, 500, cond)  # no uncond needed: no guidance
        assert model.batches == [2]
        torch.testing.assert_close(
            got,
            TeacherSolver(model, sched, guidance_scale=noop, guidance=convention).predict(
                x, 500, cond, uncond
            ),
        )
        # lcm_sample's omitted scale means the same no-op as the solver's.
        ours = lcm_sample(model, sched, x, [999], cond=cond, uncond=uncond, guidance=convention)
        explicit = lcm_sample(
            model, sched, x, [999], cond=cond, uncond=uncond, guidance=convention, guidance_scale=noop
        )
        torch.testing.assert_close(ours.sample, explicit.sample)
