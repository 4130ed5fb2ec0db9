"""Consistency-family losses: equations checked against independent manual computations."""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.losses import (
    consistency_pair,
    inter_segment_consistency_loss,
    lcm_consistency_loss,
    multistep_consistency_loss,
    progressive_distillation_loss,
    teacher_trajectory_states,
    tscd_loss,
    x0_conversion_loss,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    TeacherSolver,
    TimestepSample,
    boundary_scalings,
    lcm_skip_pairs,
    milestone_pairs,
)
from diffdistill.students import EMA

SCHED = NoiseSchedule.from_betas()


class Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1).double()

    def forward(self, x, t, scale=None):
        out = self.conv(x) * (1 + t.double().view(-1, 1, 1, 1) / 1000)
        return out if scale is None else out * scale


def teacher_model(x, t, scale):
    return torch.tanh(x) * scale + 0.01 * t.double().view(-1, 1, 1, 1) / 1000


def _setup(batch=3):
    student = Student()
    teacher = TeacherSolver(teacher_model, SCHED, guidance_scale=3.0, guidance="lcm")
    cond = {"scale": torch.full((batch, 1, 1, 1), 0.8, dtype=torch.float64)}
    uncond = {"scale": torch.full((batch, 1, 1, 1), 0.1, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64)
    return student, teacher, cond, uncond, x0, noise


def _guided(x, t, cond, uncond, w=3.0):
    c, u = teacher_model(x, t, **cond), teacher_model(x, t, **uncond)
    return c + w * (c - u)  # LCM convention


def _f(pred, x, t):  # independent boundary-condition consistency function for epsilon models
    a, s = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    c_skip, c_out = boundary_scalings(t)
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * (x - s * pred) / a


def _move(pred, x, t, t_to):
    a, s = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    a2, s2 = SCHED.alpha(t_to).view(-1, 1, 1, 1), SCHED.sigma(t_to).view(-1, 1, 1, 1)
    x0 = (x - s * pred) / a
    return a2 * x0 + s2 * pred


def test_lcm_loss_matches_manual():
    student, teacher, cond, uncond, x0, noise = _setup()
    sample = lcm_skip_pairs(3, generator=torch.Generator().manual_seed(0))
    loss, logs = lcm_consistency_loss(
        student, teacher, x0, cond, uncond, sample=sample, noise=noise, distance="mse"
    )
    t, tp = sample.t, sample.t_prev
    x_t = SCHED.alpha(t).view(-1, 1, 1, 1) * x0 + SCHED.sigma(t).view(-1, 1, 1, 1) * noise
    x_prev = _move(_guided(x_t, t, cond, uncond), x_t, t, tp)
    with torch.no_grad():
        target = _f(student(x_prev, tp, **cond), x_prev, tp)
    expected = (_f(student(x_t, t, **cond), x_t, t) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    assert logs["loss"] == pytest.approx(float(expected.detach()))
    loss.backward()
    assert student.conv.weight.grad is not None and student.conv.weight.grad.abs().sum() > 0


def test_target_options_and_gradient_isolation():
    student, teacher, cond, uncond, x0, noise = _setup()
    sample = lcm_skip_pairs(3, generator=torch.Generator().manual_seed(0))
    ema = EMA(student, decay=0.9)
    with torch.no_grad():
        ema.module.conv.weight.mul_(2.0)
    x_t = SCHED.add_noise(x0, noise, sample.t)
    online = consistency_pair(student, teacher, x_t, sample, cond, uncond, target="online")
    with_ema = consistency_pair(student, teacher, x_t, sample, cond, uncond, target=ema)
    with_teacher = consistency_pair(student, teacher, x_t, sample, cond, uncond, target="teacher")
    assert not torch.allclose(online.target, with_ema.target)
    # target="teacher": the guided teacher prediction at (x_prev, t_prev)
    tp = sample.t_prev
    expected = _f(_guided(online.x_prev, tp, cond, uncond), online.x_prev, tp)
    torch.testing.assert_close(with_teacher.target, expected, atol=1e-12, rtol=1e-10)
    assert not online.target.requires_grad and online.student.requires_grad
    # The target model runs without autograd (not merely detached afterwards).
    grad_modes: list[bool] = []

    def recording_target(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return ema(*args, **kwargs)

    recorded = consistency_pair(student, teacher, x_t, sample, cond, uncond, target=recording_target)
    assert grad_modes == [False]
    torch.testing.assert_close(recorded.target, with_ema.target)


def test_teacher_prediction_type_differs_from_the_students():
    # A v-prediction teacher with an epsilon student: the teacher's step and target="teacher" read the
    # teacher's outputs as v. Reference: the same teacher rewritten to predict epsilon.
    student, _, cond, uncond, x0, noise = _setup()
    sample = lcm_skip_pairs(3, generator=torch.Generator().manual_seed(0))
    x_t = SCHED.add_noise(x0, noise, sample.t)

    def as_epsilon(x, t, scale):
        return SCHED.convert(teacher_model(x, t, scale), x, t, "v_prediction", "epsilon")

    v_teacher = TeacherSolver(
        teacher_model, SCHED, guidance_scale=3.0, guidance="lcm", prediction_type="v_prediction"
    )
    eps_teacher = TeacherSolver(as_epsilon, SCHED, guidance_scale=3.0, guidance="lcm")
    got = {}
    for target in ("teacher", "online"):
        got[target] = consistency_pair(student, v_teacher, x_t, sample, cond, uncond, target=target)
        want = consistency_pair(student, eps_teacher, x_t, sample, cond, uncond, target=target)
        torch.testing.assert_close(got[target].x_prev, want.x_prev, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got[target].target, want.target, atol=1e-12, rtol=1e-10)
    plain = consistency_pair(
        student,
        TeacherSolver(teacher_model, SCHED, guidance_scale=3.0, guidance="lcm"),
        x_t,
        sample,
        cond,
        uncond,
        target="teacher",
    )
    assert not torch.allclose(plain.target, got["teacher"].target)  # reading v as epsilon differs


def test_tscd_loss_matches_manual_and_edges():
    student, teacher, cond, uncond, x0, noise = _setup(batch=4)
    sample = TimestepSample(
        torch.tensor([999, 519, 139, 19]),
        torch.tensor([979, 499, 119, -1]),
        torch.tensor([900, 499, 100, -1]),
    )
    loss, _ = tscd_loss(student, teacher, x0, cond, uncond, num_segments=8, sample=sample, noise=noise)
    t, tp, te = sample
    x_t = SCHED.add_noise(x0, noise, t)
    x_prev = _move(_guided(x_t, t, cond, uncond), x_t, t, tp)
    with torch.no_grad():
        target = torch.stack(
            [
                x_prev[i]
                if te[i] == tp[i]
                else _move(
                    student(x_prev[i : i + 1], tp[i : i + 1], scale=cond["scale"][i : i + 1]),
                    x_prev[i : i + 1],
                    tp[i : i + 1],
                    te[i : i + 1],
                )[0]
                for i in range(4)
            ]
        )
    expected = (_move(student(x_t, t, **cond), x_t, t, te) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    # sampled path runs and draws valid timesteps
    loss2, logs = tscd_loss(
        student, teacher, x0, cond, uncond, num_segments=2, generator=torch.Generator().manual_seed(3)
    )
    assert torch.isfinite(loss2) and 0 <= logs["t_mean"] <= 999


def test_multistep_and_inter_segment_use_milestones():
    student, teacher, cond, uncond, x0, noise = _setup()
    sample = milestone_pairs(3, 8, 20, generator=torch.Generator().manual_seed(0))
    loss, _ = multistep_consistency_loss(student, teacher, x0, cond, uncond, sample=sample, noise=noise)
    t, tp, te = sample
    x_t = SCHED.add_noise(x0, noise, t)
    x_prev = _move(_guided(x_t, t, cond, uncond), x_t, t, tp)
    with torch.no_grad():
        target = _move(student(x_prev, tp, **cond), x_prev, tp, te)
    expected = (_move(student(x_t, t, **cond), x_t, t, te) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    # inter-segment: 3 teacher steps over one segment, boundary parameterisation
    sample = milestone_pairs(3, 8, 125, on_grid=True, generator=torch.Generator().manual_seed(1))
    loss, _ = inter_segment_consistency_loss(student, teacher, x0, cond, uncond, sample=sample, noise=noise)
    t, tp, _ = sample
    x = SCHED.add_noise(x0, noise, t)
    for i in range(3):
        ti, tn = t - (i * 125) // 3, t - ((i + 1) * 125) // 3
        x = _move(_guided(x, ti, cond, uncond), x, ti, tn)
    with torch.no_grad():
        target = _f(student(x, tp, **cond), x, tp)
    x_t = SCHED.add_noise(x0, noise, t)
    torch.testing.assert_close(
        loss, (_f(student(x_t, t, **cond), x_t, t) - target).pow(2).mean(), atol=1e-12, rtol=1e-10
    )


def test_progressive_distillation_loss():
    student, teacher, cond, uncond, x0, noise = _setup()
    sample = TimestepSample(
        torch.tensor([999, 749, 249]), torch.tensor([749, 499, -1]), torch.tensor([749, 499, -1])
    )
    loss, _ = progressive_distillation_loss(
        student, teacher, x0, cond, uncond, num_student_steps=4, teacher_steps=2, sample=sample, noise=noise
    )
    t, tp, _ = sample
    x = SCHED.add_noise(x0, noise, t)
    x_t = x
    for i in range(2):
        ti, tn = t - (i * (t - tp)) // 2, t - ((i + 1) * (t - tp)) // 2
        x = _move(_guided(x, ti, cond, uncond), x, ti, tn)
    expected = (_move(student(x_t, t, **cond), x_t, t, tp) - x).pow(2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)


def test_teacher_trajectory_states():
    _, teacher, cond, uncond, _, noise = _setup(batch=3)
    t = torch.tensor([999, 600, 40])  # segments 7, 4, 0 of 8 -> 0 (noise itself), 4 and 8 teacher steps
    states = teacher_trajectory_states(teacher, noise, t, cond, uncond, num_segments=8)
    assert torch.equal(states[0], noise[0])
    for i, steps in ((1, 4), (2, 8)):
        ref = teacher.solve(
            noise[i : i + 1],
            999,
            int(t[i]),
            {"scale": cond["scale"][i : i + 1]},
            {"scale": uncond["scale"][i : i + 1]},
            num_steps=steps,
        )
        torch.testing.assert_close(states[i : i + 1], ref, atol=1e-12, rtol=0)


def test_x0_conversion_loss():
    online = Student()
    frozen = lambda x, t: torch.tanh(x)  # noqa: E731
    x_t, t = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.tensor([999, 300])
    loss, _ = x0_conversion_loss(online, frozen, x_t, t, schedule=SCHED)
    a, s = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    expected = (online(x_t, t) - (x_t - s * torch.tanh(x_t)) / a).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_float32_and_errors():
    student, teacher, cond, uncond, x0, noise = _setup()
    loss, _ = lcm_consistency_loss(
        student.float(),
        TeacherSolver(lambda x, t, scale: torch.tanh(x) * scale, SCHED),
        x0.float(),
        {"scale": cond["scale"].float()},
        generator=torch.Generator().manual_seed(0),
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(OptionError, match=r"Pass exactly one of `x0` .* and `x_t`.*but got both"):
        lcm_consistency_loss(student, teacher, x0, cond, x_t=x0, sample=lcm_skip_pairs(3))
    with pytest.raises(OptionError, match=r"Expected `num_segments` to divide the 1000 training timesteps"):
        inter_segment_consistency_loss(student, teacher, x0, cond, num_segments=3)
    # Ready states need the timesteps they were drawn at, and take no noise (it would be unused).
    for loss_fn, kwargs in (
        (lcm_consistency_loss, {}),
        (tscd_loss, {"num_segments": 2}),
        (multistep_consistency_loss, {}),
    ):
        with pytest.raises(
            OptionError, match=r"pass the `sample` they belong to .* got `x_t` without `sample`"
        ):
            loss_fn(student, teacher, None, cond, x_t=x0, **kwargs)
        with pytest.raises(OptionError, match=r"`noise` noises `x0` and is unused with ready states `x_t`"):
            loss_fn(student, teacher, None, cond, x_t=x0, sample=lcm_skip_pairs(3), noise=noise, **kwargs)
    with pytest.raises(OptionError, match=r"Expected `teacher` to be a TeacherSolver, but got function"):
        consistency_pair(student, teacher_model, x0, lcm_skip_pairs(3))
    with pytest.raises(
        OptionError,
        match=r"Expected `target` to be 'online', 'teacher', None or a callable model, but got 'ema'",
    ):
        consistency_pair(student, teacher, x0, lcm_skip_pairs(3), cond, target="ema")
    with pytest.raises(OptionError, match=r"Expected `parameterization` to be one of \['boundary', 'move'\]"):
        consistency_pair(student, teacher, x0, lcm_skip_pairs(3), cond, parameterization="x0")
    with pytest.raises(OptionError, match=r"Expected `t` >= 0 for trajectory states"):
        teacher_trajectory_states(teacher, noise, torch.tensor([-1, 3, 4]), cond, uncond)
    bad = TimestepSample(
        torch.tensor([500, 500, 500]), torch.tensor([480, 480, 480]), torch.tensor([490, 0, 0])
    )
    with pytest.raises(
        OptionError,
        match=r"Expected t_end <= t_prev < t for every sample, but got t=\[500, 500, 500\], t_prev=\[480, 480, 480\], t_end=\[490, 0, 0\]",
    ):
        consistency_pair(student, teacher, x0, bad, cond)
    with pytest.raises(OptionError, match=r"Expected `sample.t` to lie in \[-1, 999\]"):
        consistency_pair(
            student,
            teacher,
            x0,
            TimestepSample(
                torch.tensor([1000] * 3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
            ),
            cond,
        )


def test_target_none_needs_move_to_t_prev():
    # target=None compares with the teacher's state at t_prev: a boundary-mapped (x0-like) student side or a
    # move to another t_end gave a silently wrong loss (MSE 6.8 / 1.1 for a student equal to the teacher).
    student, teacher, cond, uncond, x0, _ = _setup()
    x_t = SCHED.add_noise(x0, torch.randn_like(x0), 999)
    same = TimestepSample(torch.full((3,), 999), torch.full((3,), 499), torch.full((3,), 499))
    with pytest.raises(OptionError, match=r"Expected parameterization='move' with target=None .* but got "):
        consistency_pair(student, teacher, x_t, same, cond, uncond, target=None)
    lower = TimestepSample(torch.full((3,), 999), torch.full((3,), 499), torch.tensor([499, 249, 499]))
    with pytest.raises(
        OptionError,
        match=r"Expected sample.t_end == sample.t_prev .* t_prev=\[499, 499, 499\], t_end=\[499, 249, 499\]",
    ):
        consistency_pair(student, teacher, x_t, lower, cond, uncond, target=None, parameterization="move")
    pair = consistency_pair(student, teacher, x_t, same, cond, uncond, target=None, parameterization="move")
    torch.testing.assert_close(pair.target, pair.x_prev)


def test_trajectory_segments_match_milestone_pairs():
    # A state at t gets M - s teacher steps, s its milestone_pairs segment: u = t + 1 in (m_s, m_{s+1}].
    calls = []

    def counting(x, t, scale):
        calls.append(int(t.reshape(-1)[0]))
        return torch.tanh(x) * scale

    teacher = TeacherSolver(counting, SCHED)
    sample = milestone_pairs(64, num_segments=8, skip=1, generator=torch.Generator().manual_seed(0))
    drawn = [(int(a), int(b)) for a, b in zip(sample.t, (sample.t_end + 1) * 8 // 1000)]
    edges = [(124, 0), (125, 1), (249, 1), (250, 2), (0, 0), (998, 7)]  # u = m_1, m_1 + 1, ..., 1, T - 1
    for t, seg in drawn + edges:
        calls.clear()
        teacher_trajectory_states(teacher, torch.randn(1, 2), torch.tensor([t]), {"scale": torch.ones(1, 1)})
        assert len(calls) == 8 - seg, (t, seg, len(calls))


def test_bf16_states_are_mapped_in_float32():
    # The two sides of a consistency loss differ little; mapping them (boundary condition / DDIM move) in
    # the latents' bf16 rounded each side by ~2^-9 of its size before the difference was taken.
    g = torch.Generator().manual_seed(4)
    x_t = (3 * torch.randn(3, 4, 4, 4, generator=g)).to(torch.bfloat16)
    t = torch.tensor([900, 500, 100])
    pred = torch.randn(3, 4, 4, 4, generator=g).to(torch.bfloat16)

    def student(x, t_):
        return pred

    teacher = TeacherSolver(lambda x, t_: pred, SCHED)
    for parameterization, ref in (
        ("boundary", _f(pred.double(), x_t.double(), t)),
        ("move", _move(pred.double(), x_t.double(), t, t - 50)),
    ):
        sample = TimestepSample(t, t - 50, t - 50)
        pair = consistency_pair(student, teacher, x_t, sample, parameterization=parameterization)
        assert pair.student.dtype == torch.float32
        torch.testing.assert_close(pair.student.double(), ref, atol=2e-6, rtol=2e-6)


def test_bf16_states_keep_the_teacher_solution_in_float32():
    # Student = teacher, one teacher step, target=None: both sides are the same DDIM move of the same bf16
    # network output, so they agree exactly once the teacher's solution is not rounded to bf16 (it was:
    # an MSE floor of ~1e-5). The networks still receive bf16 inputs.
    seen: list[torch.dtype] = []

    def eps_net(x, t):
        seen.append(x.dtype)
        return (0.5 * torch.tanh(x.float())).to(x.dtype)

    teacher = TeacherSolver(eps_net, SCHED)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 4, 8, 8, generator=g).to(torch.bfloat16)
    sample = TimestepSample(
        torch.tensor([999, 700, 400, 100]),
        torch.tensor([900, 600, 300, 50]),
        torch.tensor([900, 600, 300, 50]),
    )
    pair = consistency_pair(eps_net, teacher, x_t, sample, target=None, parameterization="move")
    assert pair.x_prev.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(pair.student, pair.target, atol=0, rtol=0)
    assert teacher.solve(x_t, 999, 900).dtype == torch.bfloat16  # solve's default keeps x_t's dtype
