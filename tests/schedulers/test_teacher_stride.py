"""The teacher on its own stride (SDXL-Lightning Sec. 2.3): ``TeacherSolver(..., stride=T/N)``.

The frozen N-step teacher runs ``t - k s`` (``s = T/N`` on the clock ``u = t + 1``), clamped at where the
student's one jump ends (the clean end at most), skipping zero-length steps per sample; the even split of
``[t, t_prev]`` stays the default (LCM's DDIM jumps, MLCM).
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.losses import consistency_pair, progressive_distillation_loss
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    TimestepSample,
    progressive_pairs,
    spaced_timesteps,
)

T = 1000


class RecordingModel:
    """A deterministic epsilon-model (eps = tanh(x) * (0.3 + t / T)) recording each call's timesteps."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.tolist())
        return torch.tanh(x) * (0.3 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / T)


def _solver(model=None) -> TeacherSolver:
    return TeacherSolver(model or RecordingModel(), NoiseSchedule.from_betas())


def _teacher_lists(stage, teacher_steps: int | None = None) -> dict[int, list[int]]:
    """Per student timestep of ``stage``, the timesteps the stage's teacher runs (on its own stride)."""
    m = stage.student_steps
    n = teacher_steps or stage.teacher_steps
    # Every (t, t_prev) the progressive sampler can draw for this stage.
    sample = progressive_pairs(
        4096,
        m,
        T,
        extra_timesteps=stage.options.get("extra_student_timesteps"),
        generator=torch.Generator().manual_seed(0),
    )
    pairs = sorted(set(zip(sample.t.tolist(), sample.t_prev.tolist())), reverse=True)
    t = torch.tensor([p[0] for p in pairs])
    t_prev = torch.tensor([p[1] for p in pairs])
    steps = _solver().step_timesteps(t, t_prev, n, torch.zeros(len(pairs)), stride=T / (m * n))
    return {p[0]: steps[:, i].tolist() for i, p in enumerate(pairs)}


LIGHTNING_STAGES = [s for s in StagePlan.sdxl_lightning() if s.teacher_steps is not None]


def test_every_lightning_stage_has_a_teacher_except_the_x0_conversion():
    names = {s.name for s in StagePlan.sdxl_lightning()} - {s.name for s in LIGHTNING_STAGES}
    assert names == {"2->1/x0-conversion"}


@pytest.mark.parametrize("stage", LIGHTNING_STAGES, ids=lambda s: s.name)
def test_lightning_teacher_runs_on_its_own_grid_in_every_stage(stage):
    """From each student timestep, the N-step teacher (N = M n) runs n steps of its own trailing grid, ending
    where the student's jump ends. On the student's grid (N need not divide T: 128, 32) every teacher
    timestep is a point of the teacher's own grid; from the extra timesteps the steps below the clean end
    are clamped there (zero length)."""
    m, n = stage.student_steps, stage.teacher_steps
    big_n = m * n
    own = [*spaced_timesteps(big_n, "trailing", num_train_timesteps=T).tolist(), -1]
    lists = _teacher_lists(stage)
    extra = stage.options.get("extra_student_timesteps")
    if extra is None:
        assert sorted(lists) == sorted(spaced_timesteps(m, "trailing", num_train_timesteps=T).tolist())
        for t, steps in lists.items():
            j = own.index(t)
            assert steps == own[j : j + n + 1], (stage.name, t)
    else:
        assert sorted(lists) == sorted(extra)
        s = T // big_n  # 250 (4->2), 500 (2->1): integer strides
        for t, steps in lists.items():
            assert steps == [max(t + 1 - k * s, 0) - 1 for k in range(n + 1)], (stage.name, t)


# The paper's lists (issue 19): the 1- and 2-step students' extra timesteps {250, 500, 750, 1000} (u).
EXPECTED = {
    ("4->2", None): {999: [999, 749, 499], 749: [749, 499, 249], 499: [499, 249, -1], 249: [249, -1, -1]},
    ("2->1", None): {999: [999, 499, -1], 749: [749, 249, -1], 499: [499, -1, -1], 249: [249, -1, -1]},
    # a skip-level 4-step teacher at 2->1 (--teacher_steps 4): stride 250
    ("2->1", 4): {
        999: [999, 749, 499, 249, -1],
        749: [749, 499, 249, -1, -1],
        499: [499, 249, -1, -1, -1],
        249: [249, -1, -1, -1, -1],
    },
    ("32->8", None): {999: [999, 968, 937, 905, 874], 124: [124, 93, 61, 30, -1]},
    ("128->32", None): {999: [999, 991, 983, 976, 968], 968: [968, 960, 952, 944, 937]},
}


@pytest.mark.parametrize(("level", "teacher_steps"), list(EXPECTED), ids=lambda v: str(v))
def test_lightning_teacher_lists_of_the_paper(level, teacher_steps):
    plan = StagePlan.sdxl_lightning()
    for stage in LIGHTNING_STAGES:
        if stage.name.split("/")[0] != level:
            continue
        lists = _teacher_lists(plan[stage.name], teacher_steps)
        for t, want in EXPECTED[(level, teacher_steps)].items():
            assert lists[t] == want, (stage.name, t)


def test_even_split_stays_the_default():
    solver = _solver()
    assert solver.step_timesteps(749, -1, 2, torch.zeros(1)).flatten().tolist() == [749, 374, -1]
    assert solver.step_timesteps(749, -1, 2, torch.zeros(1), stride=500).flatten().tolist() == [749, 249, -1]


def test_stride_clamps_at_the_clean_end_and_at_t_to():
    solver = _solver()
    z = torch.zeros(1)
    assert solver.step_timesteps(249, -1, 4, z, stride=250).flatten().tolist() == [249, -1, -1, -1, -1]
    # clamped at t_to: t_to above the stride's reach makes the remaining steps zero-length
    assert solver.step_timesteps(999, 600, 3, z, stride=250).flatten().tolist() == [999, 749, 600, 600]
    # the last step ends at t_to where rounding puts the reach one index away
    assert solver.step_timesteps(500, 0, 2, z, stride=250).flatten().tolist() == [500, 250, 0]


def test_stride_solve_skips_zero_length_steps_per_sample():
    """A batch with different numbers of real steps: the stopped sample keeps its state (exactly), a step
    that moves no sample calls no model, and each sample's result is its own solve's."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([749, 249, 999])
    model = RecordingModel()
    out = _solver(model).solve(x, t, -1, num_steps=2, stride=500)
    assert model.calls == [[749, 249, 999], [249, -1, 499]]
    for i in range(3):
        alone = RecordingModel()
        want = _solver(alone).solve(x[i : i + 1], t[i : i + 1], -1, num_steps=2, stride=500)
        torch.testing.assert_close(out[i : i + 1], want, rtol=0, atol=0)
    assert alone.calls == [[999], [499]]
    single = RecordingModel()
    _solver(single).solve(x[1:2], 249, -1, num_steps=2, stride=500)
    assert single.calls == [[249]]  # the zero-length step 249 -> clean -> clean calls no model
    # the stopped sample's trajectory repeats its state
    traj = _solver().solve(x, t, -1, num_steps=2, stride=500, return_trajectory=True)
    assert len(traj) == 3 and torch.equal(traj[2][1], traj[1][1])
    # 249 -> clean in one DDIM step is what the stride gives the sample at 249
    one = _solver().solve(x[1:2], 249, -1, num_steps=1)
    torch.testing.assert_close(out[1:2], one, rtol=0, atol=0)


def test_stride_differs_from_the_even_split():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    solver = _solver()
    even = solver.solve(x, 749, -1, num_steps=2)
    strided = solver.solve(x, 749, -1, num_steps=2, stride=500)
    assert not torch.allclose(even, strided)
    manual = solver.solve(solver.solve(x, 749, 249, num_steps=1), 249, -1, num_steps=1)
    torch.testing.assert_close(strided, manual, rtol=0, atol=0)


def test_stride_errors_name_the_argument():
    solver = _solver()
    z = torch.zeros(1)
    with pytest.raises(OptionError, match=r"`stride`"):
        solver.step_timesteps(999, -1, 2, z, stride=0)
    with pytest.raises(OptionError, match=r"`stride`"):
        solver.step_timesteps(999, -1, 2, z, stride=T + 1)
    with pytest.raises(
        OptionError, match=r"Expected `t_to` to be reached by `num_steps` \(1\) steps of `stride`"
    ):
        solver.step_timesteps(999, -1, 1, z, stride=250)
    with pytest.raises(OptionError, match=r"Expected `t_to` <= `t`"):
        solver.step_timesteps(499, 749, 2, z, stride=250)
    x = torch.randn(1, 2, 4, 4)
    sample = TimestepSample(torch.tensor([999]), torch.tensor([-1]), torch.tensor([-1]))
    student = lambda x, t: x  # noqa: E731
    with pytest.raises(
        OptionError,
        match=r"Expected `sample.t_prev` to be reached by `teacher_steps` \(1\) steps of `teacher_stride`",
    ):
        consistency_pair(student, solver, x, sample, target=None, parameterization="move", teacher_stride=250)
    with pytest.raises(OptionError, match=r"`teacher_stride`"):
        consistency_pair(
            student, solver, x, sample, target=None, parameterization="move", teacher_stride=-1.0
        )
    with pytest.raises(OptionError, match=r"`teacher_stride`"):
        progressive_distillation_loss(
            student, solver, x, num_student_steps=1, teacher_steps=2, teacher_stride=float("inf")
        )


def test_pair_and_progressive_loss_use_the_stride():
    """consistency_pair / progressive_distillation_loss with teacher_stride: the teacher's solution is the
    strided solve, and zero-length spans (t - t_prev < teacher_steps) are allowed."""
    torch.manual_seed(2)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    solver = _solver()
    sample = TimestepSample(torch.tensor([749, 249]), torch.tensor([-1, -1]), torch.tensor([-1, -1]))
    student = lambda x, t: 0.5 * x  # noqa: E731
    pair = consistency_pair(
        student, solver, x, sample, target=None, parameterization="move", teacher_steps=2, teacher_stride=500
    )
    want = solver.solve(x, sample.t, sample.t_prev, num_steps=2, stride=500)
    torch.testing.assert_close(pair.x_prev, want)
    tight = TimestepSample(torch.tensor([1]), torch.tensor([-1]), torch.tensor([-1]))
    with pytest.raises(OptionError, match=r"teacher_steps"):  # the even split needs 4 timesteps
        consistency_pair(student, solver, x[:1], tight, target=None, parameterization="move", teacher_steps=4)
    consistency_pair(
        student,
        solver,
        x[:1],
        tight,
        target=None,
        parameterization="move",
        teacher_steps=4,
        teacher_stride=250,
    )
    x0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    loss, _ = progressive_distillation_loss(
        student,
        solver,
        x0,
        num_student_steps=1,
        teacher_steps=2,
        teacher_stride=500,
        sample=sample,
        noise=noise,
    )
    x_t = solver.schedule.add_noise(x0, noise, sample.t)
    pair = consistency_pair(
        student,
        solver,
        x_t,
        sample,
        target=None,
        parameterization="move",
        teacher_steps=2,
        teacher_stride=500,
    )
    torch.testing.assert_close(loss, (pair.student - pair.target).pow(2).mean())
