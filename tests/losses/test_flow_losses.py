"""Every loss family on rectified-flow teachers and students (issue 21 part 3).

The teacher is a *straight-path* flow model: :math:`\\hat x_0(x, \\sigma) = Kx + b` with ``K`` a projection
(a channel mask) and ``b`` in its null space, i.e. the velocity :math:`v = (x - Kx - b)/\\sigma`. Its Euler
(= DDIM) trajectory from ``x`` is the straight line :math:`m + (\\sigma'/\\sigma)(x - m)` with
:math:`m = Kx + b`, along which :math:`\\hat x_0 = m` and :math:`\\hat\\epsilon` stay constant, so a student
equal to the teacher (its guided velocity included) is exactly consistent: every consistency loss is zero.
The model reads :math:`\\sigma` from its timestep input (``t / timestep_scale``): a loss that called it with
the integer index instead of the schedule's model timestep would give a large loss. Expected values of the
score, fake-score, re-noising and x0-conversion losses are written out from the flow path
:math:`x_\\sigma = (1-\\sigma)x_0 + \\sigma\\epsilon`, :math:`v = \\epsilon - x_0` (Esser et al. 2024, Sec. 2),
without the library's conversions.
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import OptionError
from diffdistill.losses import (
    consistency_pair,
    dmd_loss,
    fake_score_loss,
    inter_segment_consistency_loss,
    lcm_consistency_loss,
    multistep_consistency_loss,
    progressive_distillation_loss,
    renoise_for_discriminator,
    sid_loss,
    sim_loss,
    tscd_loss,
    x0_conversion_loss,
)
from diffdistill.losses.score import denoise
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, lcm_skip_pairs

SD3 = NoiseSchedule.flow_matching(shift=3.0)  # T = 1000, model timestep 1000 sigma
SMALL = NoiseSchedule.flow_matching(num_train_timesteps=10, shift=3.0)  # T = 10, model timestep 10 sigma
SCHEDULES = {"sd3_T1000": SD3, "small_T10": SMALL}


def _sd3_sigma(t: torch.Tensor, total: int, shift: float = 3.0) -> torch.Tensor:
    """sigma_t = shift u / (1 + (shift - 1) u), u = (t + 1) / T, in float32 as diffusers' table (independent)."""
    u = (t + 1).to(torch.float32) / total
    return torch.where(t < 0, 0.0, shift * u / (1 + (shift - 1) * u)).double()


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


class StraightFlow:
    """A flow model with straight Euler paths: x0_hat = K x + b (K: keep channels 0-1), v = (x - x0_hat) / sigma.

    ``b`` lives on channels 2-3 (the null space of K); a ``b`` keyword (the conditioning) is added to the
    model's own. ``sigma`` is read from the timestep input as ``t / scale``. Every call's timestep is recorded.
    """

    def __init__(self, scale: float, b: torch.Tensor | None = None, leak: float = 0.0) -> None:
        self.scale = scale
        self.leak = leak  # != 0: x0_hat also reads the null space of K, which bends the straight paths
        self.b = torch.zeros(1, 4, 1, 1, dtype=torch.float64) if b is None else b
        self.calls: list[torch.Tensor] = []

    def x0(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=x.dtype).view(1, 4, 1, 1)
        extra = self.b.to(x.dtype) + (0 if b is None else b.to(x.dtype))
        return mask * x + (1 - mask) * (extra + self.leak * x)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(t)
        sigma = _col(t.to(torch.float64) / self.scale, x.ndim).to(x.dtype)
        return (x - self.x0(x, b)) / sigma


def _null_b(value: float, batch: int = 1) -> torch.Tensor:
    b = torch.zeros(batch, 4, 1, 1, dtype=torch.float64)
    b[:, 2:] = value
    return b


def _guided_setup(schedule: NoiseSchedule, w: float = 3.0):
    """Teacher with CFG (imagen: u + w (c - u)) on b, and the student equal to the guided teacher."""
    scale = float(schedule.timestep_scale)
    net = StraightFlow(scale)
    cond, uncond = {"b": _null_b(0.5, 3)}, {"b": _null_b(-0.25)}
    teacher = TeacherSolver(net, schedule, guidance_scale=w)
    b_w = -0.25 + w * (0.5 + 0.25)
    student = StraightFlow(scale, _null_b(b_w))
    return teacher, student, cond, uncond


def _x0(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _consistency_losses(schedule: NoiseSchedule):
    """(name, call) for every consistency-family loss, with a grid that fits T (1000 or 10)."""
    total = schedule.num_train_timesteps
    small = total == 10
    return {
        "lcm": lambda s, te, x0, c, u: lcm_consistency_loss(
            s, te, x0, c, u, num_ddim_timesteps=5 if small else 50, student_cond={}, generator=_gen()
        ),
        "lcm_teacher_target": lambda s, te, x0, c, u: lcm_consistency_loss(
            s,
            te,
            x0,
            c,
            u,
            target="teacher",
            num_ddim_timesteps=5 if small else 50,
            student_cond={},
            distance="mse",
            generator=_gen(),
        ),
        "tscd": lambda s, te, x0, c, u: tscd_loss(
            s,
            te,
            x0,
            c,
            u,
            num_segments=2,
            num_inference_steps=5 if small else 50,
            student_cond={},
            generator=_gen(),
        ),
        "mlcm": lambda s, te, x0, c, u: multistep_consistency_loss(
            s,
            te,
            x0,
            c,
            u,
            num_segments=2 if small else 8,
            skip=1 if small else 20,
            student_cond={},
            generator=_gen(),
        ),
        "mlcm_inter_segment": lambda s, te, x0, c, u: inter_segment_consistency_loss(
            s, te, x0, c, u, num_segments=2 if small else 8, student_cond={}, generator=_gen()
        ),
        "progressive": lambda s, te, x0, c, u: progressive_distillation_loss(
            s,
            te,
            x0,
            c,
            u,
            num_student_steps=2 if small else 8,
            teacher_steps=2,
            student_cond={},
            generator=_gen(),
        ),
    }


LOSS_NAMES = ["lcm", "lcm_teacher_target", "tscd", "mlcm", "mlcm_inter_segment", "progressive"]


# ------------------------------------------------------------------------------ consistency: zero move error
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_student_equal_to_guided_flow_teacher_has_zero_consistency_loss(sched_name, loss_name):
    schedule = SCHEDULES[sched_name]
    teacher, student, cond, uncond = _guided_setup(schedule)
    call = _consistency_losses(schedule)[loss_name]
    loss, logs = call(student, teacher, _x0(), cond, uncond)
    assert logs["target_norm"] > 0.1  # the comparison is not between zeros
    assert float(loss) < 1e-10, float(loss)
    # Not vacuous: a student off the teacher's velocity, or fed the index instead of sigma * scale, is not 0.
    off = StraightFlow(student.scale, student.b, leak=0.3)
    assert float(call(off, teacher, _x0(), cond, uncond)[0]) > 1e-6
    # ... and so is the same student fed the index instead: it reads sigma = (t + 1) / T, the unshifted level.
    total = schedule.num_train_timesteps

    def index_fed(x, t, b=None):
        index = schedule.sigma_to_timestep(t.double() / student.scale)
        return student(x, (index + 1).double() * student.scale / total, b)

    assert float(call(index_fed, teacher, _x0(), cond, uncond)[0]) > 1e-6


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_sample_predicting_student_equal_to_teacher_is_consistent(sched_name):
    """A student predicting x0 ("sample") on a flow schedule: the same zero, through the conversions."""
    schedule = SCHEDULES[sched_name]
    teacher, student, cond, uncond = _guided_setup(schedule)
    x0_student = lambda x, t, b=None: student.x0(x, b)  # noqa: E731
    for pt, net in (("flow", student), ("sample", x0_student)):
        total = schedule.num_train_timesteps
        loss, _ = tscd_loss(
            net,
            teacher,
            _x0(),
            cond,
            uncond,
            num_segments=2,
            num_inference_steps=5 if total == 10 else 50,
            student_cond={},
            prediction_type=pt,
            generator=_gen(),
        )
        assert float(loss) < 1e-10


def test_students_and_targets_get_the_schedules_model_timestep_and_vp_the_index():
    schedule = SD3
    teacher, student, cond, uncond = _guided_setup(schedule)
    sample = lcm_skip_pairs(3, generator=_gen())
    x_t = schedule.add_noise(_x0(), torch.randn(3, 4, 2, 2, dtype=torch.float64), sample.t)
    consistency_pair(student, teacher, x_t, sample, cond, uncond, student_cond={})
    t_student, t_target = student.calls
    assert t_student.dtype == torch.float32
    torch.testing.assert_close(t_student, schedule.model_timestep(sample.t), rtol=0, atol=0)
    torch.testing.assert_close(t_target, schedule.model_timestep(sample.t_prev.clamp(min=0)), rtol=0, atol=0)
    torch.testing.assert_close(t_student.double(), 1000 * _sd3_sigma(sample.t, 1000), rtol=1e-6, atol=0)
    # VP: the int64 index, the very values of the sample
    vp_calls = []
    vp_student = lambda x, t: vp_calls.append(t) or 0.1 * x  # noqa: E731
    vp_teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
    consistency_pair(vp_student, vp_teacher, x_t, sample)
    assert vp_calls[0].dtype == torch.int64 and torch.equal(vp_calls[0], sample.t)


def test_flow_prediction_type_is_accepted_on_flow_and_refused_on_vp():
    teacher, student, cond, uncond = _guided_setup(SD3)
    loss, _ = lcm_consistency_loss(
        student, teacher, _x0(), cond, uncond, student_cond={}, prediction_type="flow", generator=_gen()
    )
    assert float(loss) < 1e-10
    vp_teacher = TeacherSolver(lambda x, t: 0.1 * x, NoiseSchedule.from_betas())
    with pytest.raises(OptionError, match="prediction_type"):
        lcm_consistency_loss(lambda x, t: x, vp_teacher, _x0(), prediction_type="flow", generator=_gen())
    with pytest.raises(OptionError, match="frozen_prediction_type"):
        x0_conversion_loss(
            lambda x, t: x,
            lambda x, t: x,
            _x0(),
            5,
            schedule=NoiseSchedule.from_betas(),
            frozen_prediction_type="flow",
        )


# ------------------------------------------------------------------------------------------ x0 conversion
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_x0_conversion_loss_on_flow(sched_name):
    schedule = SCHEDULES[sched_name]
    total = schedule.num_train_timesteps
    frozen = lambda x, t: torch.tanh(x) + _col(t.double(), x.ndim) / 1000  # noqa: E731  a flow model
    t = torch.tensor([total - 1, total // 2, 0])
    x_t = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=_gen())
    sigma = _col(_sd3_sigma(t, total), 4)
    model_t = (float(schedule.timestep_scale) * _sd3_sigma(t, total)).float()
    x0_hat = x_t - sigma * frozen(x_t, model_t)  # diffusers' x0 = x - sigma v
    seen = []

    def exact(x, tt):
        return seen.append(tt) or x - _col(tt.double() / schedule.timestep_scale, 4) * frozen(x, tt)

    loss, _ = x0_conversion_loss(exact, frozen, x_t, t, schedule=schedule)
    assert float(loss) < 1e-12
    torch.testing.assert_close(seen[0], schedule.model_timestep(t), rtol=0, atol=0)
    other = lambda x, tt: 0.5 * x  # noqa: E731
    loss, _ = x0_conversion_loss(other, frozen, x_t, t, schedule=schedule)
    expected = (0.5 * x_t - x0_hat).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ score losses
def _velocity_net(scale: float):
    """A smooth flow model of x and sigma (read from t / scale), so that input gradients are non-trivial."""
    w = torch.tensor([[0.7, -0.2, 0.1], [0.3, 0.5, -0.4], [-0.1, 0.2, 0.9]], dtype=torch.float64)
    return lambda x, t, **kw: torch.tanh(x @ w) + _col(t.double() / scale, x.ndim) * x


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("loss_fn", [dmd_loss, sid_loss, sim_loss], ids=["dmd", "sid", "sim"])
def test_fake_equal_to_real_gives_zero_generator_gradient_on_flow(sched_name, loss_fn):
    schedule = SCHEDULES[sched_name]
    net = _velocity_net(float(schedule.timestep_scale))
    real = TeacherSolver(net, schedule)  # called with the model timestep by the solver
    x = torch.randn(6, 3, dtype=torch.float64, generator=_gen(), requires_grad=True)
    kwargs = {"c": 0.1} if loss_fn is sim_loss else {}
    loss, _ = loss_fn(x, real, net, schedule=schedule, generator=_gen(), **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    assert float(grad.abs().max()) < 1e-12
    # Not vacuous: another fake gives a gradient.
    other = lambda x, t, **kw: net(x, t) + 0.3  # noqa: E731
    (grad,) = torch.autograd.grad(
        loss_fn(x, real, other, schedule=schedule, generator=_gen(), **kwargs)[0], x
    )
    assert float(grad.abs().max()) > 1e-4


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_dmd_gradient_on_flow_matches_the_written_out_update(sched_name):
    schedule = SCHEDULES[sched_name]
    scale = float(schedule.timestep_scale)
    real = _velocity_net(scale)
    fake = lambda x, t: real(x, t) + 0.2 * x  # noqa: E731
    total = schedule.num_train_timesteps
    x = torch.randn(4, 3, dtype=torch.float64, generator=_gen(), requires_grad=True)
    t = torch.tensor([total - 1, total // 2, 1, 0])
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, _ = dmd_loss(x, real, fake, schedule=schedule, t=t, noise=noise)
    loss.backward()
    sigma = _col(_sd3_sigma(t, total), 2)
    x_t = (1 - sigma) * x.detach() + sigma * noise
    model_t = (scale * _sd3_sigma(t, total)).float()
    x0_real = x_t - sigma * real(x_t, model_t)
    x0_fake = x_t - sigma * fake(x_t, model_t)
    norm = (x.detach() - x0_real).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(x.grad, (x0_fake - x0_real) / norm / x.numel(), rtol=1e-5, atol=1e-12)


def test_denoise_on_flow_calls_a_plain_model_with_the_model_timestep():
    seen = []
    model = lambda x, t: seen.append(t) or torch.zeros_like(x)  # noqa: E731  v = 0: x0_hat = x_t
    x_t = torch.randn(2, 3)
    assert torch.equal(denoise(model, x_t, 499, SD3), x_t)
    torch.testing.assert_close(seen[0], SD3.model_timestep(torch.tensor([499, 499])), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- fake-score regression
def _fake_score_case(schedule: NoiseSchedule, weighting: str):
    total = schedule.num_train_timesteps
    scale = float(schedule.timestep_scale)
    net = _velocity_net(scale)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=_gen())
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([total - 2, total // 2, 1, 0])
    loss, _ = fake_score_loss(
        net, x0, schedule=schedule, weighting=weighting, t=t, noise=noise, reduction="none"
    )
    sig = _col(_sd3_sigma(t, total), 2)
    alpha = 1 - sig
    x_t = alpha * x0 + sig * noise
    v_hat = net(x_t, (scale * _sd3_sigma(t, total)).float())
    return loss, (x0, noise, x_t, v_hat, sig, alpha)


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_fake_score_loss_flow_targets_match_an_independent_computation(sched_name):
    schedule = SCHEDULES[sched_name]
    loss, (x0, noise, x_t, v_hat, sig, alpha) = _fake_score_case(schedule, "flow")
    torch.testing.assert_close(loss, (v_hat - (noise - x0)).pow(2).mean(dim=1), rtol=1e-6, atol=1e-12)
    # every weighting, written out on the flow path (x0_hat = x - sigma v, eps_hat = x + (1 - sigma) v)
    x0_hat, eps_hat = x_t - sig * v_hat, x_t + alpha * v_hat
    eps_loss = (eps_hat - noise).pow(2).mean(dim=1)
    torch.testing.assert_close(_fake_score_case(schedule, "epsilon")[0], eps_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(
        _fake_score_case(schedule, "x0")[0], (x0_hat - x0).pow(2).mean(dim=1), rtol=1e-6, atol=1e-12
    )
    # "v": SiD's SNR / (SNR + 1) weighting makes it the epsilon loss on flow too
    torch.testing.assert_close(_fake_score_case(schedule, "v")[0], eps_loss, rtol=1e-6, atol=1e-12)
    # the CFM loss is the epsilon loss over alpha^2 (Esser et al. 2024, Sec. 3)
    torch.testing.assert_close(loss, eps_loss / alpha.flatten() ** 2, rtol=1e-6, atol=1e-12)
    edm_sigma = (sig / alpha).flatten()
    edm = (x0_hat - x0).pow(2).mean(dim=1) * (edm_sigma**2 + 0.25) / (edm_sigma * 0.5) ** 2
    torch.testing.assert_close(_fake_score_case(schedule, "edm")[0], edm, rtol=1e-6, atol=1e-12)


def test_fake_score_flow_weighting_trains_and_is_refused_on_vp():
    net = torch.nn.Linear(3, 3).double()
    x0 = torch.randn(8, 3, dtype=torch.float64, generator=_gen())
    loss, _ = fake_score_loss(lambda x, t: net(x), x0, schedule=SD3, weighting="flow", generator=_gen())
    loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    with pytest.raises(OptionError, match="weighting='flow'"):
        fake_score_loss(lambda x, t: net(x), x0, schedule=NoiseSchedule.from_betas(), weighting="flow")


# ---------------------------------------------------------------------------------------------- re-noising
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_renoise_for_discriminator_on_flow_is_the_straight_path(sched_name):
    schedule = SCHEDULES[sched_name]
    total = schedule.num_train_timesteps
    x0 = torch.randn(4, 4, 2, 2, dtype=torch.float64, generator=_gen())
    x0_hat = torch.randn(4, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    drawn = renoise_for_discriminator(
        x0, x0_hat, schedule=schedule, values=(0, total // 4, total // 2, total - 1), generator=_gen()
    )
    given = renoise_for_discriminator(
        x0, x0_hat, schedule=schedule, t=torch.tensor([-1, 0, total // 2, total - 1])
    )
    for out in (drawn, given):
        sigma = _col(_sd3_sigma(out.t, total), 4)
        for clean, noisy, eps in zip((x0, x0_hat), out.samples, out.noise):
            torch.testing.assert_close(noisy, (1 - sigma) * clean + sigma * eps, rtol=1e-12, atol=1e-12)
    assert torch.equal(given.samples[0][0], x0[0]) and torch.equal(given.samples[0][3], given.noise[0][3])
