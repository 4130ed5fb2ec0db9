"""Bad inputs to the consistency-family losses: each raises a clear error naming the public argument.

Issue 18, part 2: no silent wrong result (NaN / Inf / empty / integer / silently broadcast inputs) and no
unclear internal error (a torch message from deep inside a model or a scheduler helper).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
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
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, TimestepSample

SCHED = NoiseSchedule.from_betas()
TEACHER = TeacherSolver(lambda x, t, **_: 0.1 * x, SCHED)
CONV = torch.nn.Conv2d(4, 4, 1)


def student(x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
    return CONV(x)


def x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def with_value(value: float) -> torch.Tensor:
    out = x()
    out[1, 2, 3, 4] = value
    return out


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def sample(batch: int = 2) -> TimestepSample:
    return TimestepSample(torch.full((batch,), 500), torch.full((batch,), 480), torch.full((batch,), 480))


def t2() -> torch.Tensor:
    return torch.tensor([999, 500])


NAN, INF = float("nan"), float("inf")

CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # --- non-finite latents, noise and guidance: a NaN loss before ----------------------------------------
    (
        "lcm_nan_x0",
        lambda: lcm_consistency_loss(student, TEACHER, with_value(NAN), generator=gen()),
        NonFiniteError,
        r"`x0` to be finite, but it holds 1 NaN/Inf",
    ),
    (
        "lcm_inf_x0",
        lambda: lcm_consistency_loss(student, TEACHER, with_value(INF), generator=gen()),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "lcm_nan_x_t",
        lambda: lcm_consistency_loss(student, TEACHER, x_t=with_value(NAN), sample=sample()),
        NonFiniteError,
        r"`x_t` to be finite",
    ),
    (
        "lcm_nan_noise",
        lambda: lcm_consistency_loss(student, TEACHER, x(), noise=with_value(NAN)),
        NonFiniteError,
        r"`noise` to be finite",
    ),
    (
        "lcm_nan_guidance",
        lambda: lcm_consistency_loss(student, TEACHER, x(), {}, {}, guidance_scale=NAN, generator=gen()),
        NonFiniteError,
        r"`guidance_scale` to be finite, but got nan",
    ),
    (
        "lcm_nan_guidance_tensor",
        lambda: lcm_consistency_loss(
            student, TEACHER, x(), {}, {}, guidance_scale=torch.tensor([1.0, NAN]), generator=gen()
        ),
        NonFiniteError,
        r"`guidance_scale` to be finite",
    ),
    (
        "pair_nan_x_t",
        lambda: consistency_pair(student, TEACHER, with_value(NAN), sample()),
        NonFiniteError,
        r"`x_t` to be finite",
    ),
    (
        "tscd_inf_x0",
        lambda: tscd_loss(student, TEACHER, with_value(INF), num_segments=4, generator=gen()),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "multistep_nan_x0",
        lambda: multistep_consistency_loss(student, TEACHER, with_value(NAN), generator=gen()),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "inter_nan_x0",
        lambda: inter_segment_consistency_loss(student, TEACHER, with_value(NAN), generator=gen()),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "progressive_nan_x0",
        lambda: progressive_distillation_loss(
            student, TEACHER, with_value(NAN), num_student_steps=4, teacher_steps=2
        ),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "trajectory_nan_noise",
        lambda: teacher_trajectory_states(TEACHER, with_value(NAN), t2()),
        NonFiniteError,
        r"`noise` to be finite",
    ),
    (
        "x0_conversion_nan_x_t",
        lambda: x0_conversion_loss(student, student, with_value(NAN), t2(), schedule=SCHED),
        NonFiniteError,
        r"`x_t` to be finite",
    ),
    # --- empty batches and missing batch dimensions: NaN / an internal error before ------------------------
    (
        "lcm_empty_x0",
        lambda: lcm_consistency_loss(student, TEACHER, x()[:0], generator=gen()),
        ShapeError,
        r"`x0` to hold at least one sample, but got shape \(0, 4, 8, 8\)",
    ),
    (
        "lcm_0d_x0",
        lambda: lcm_consistency_loss(student, TEACHER, torch.tensor(1.0), generator=gen()),
        ShapeError,
        r"`x0` laid out as \(B, \.\.\.\) with a batch dimension",
    ),
    (
        "pair_empty_x_t",
        lambda: consistency_pair(student, TEACHER, x()[:0], sample(0)),
        ShapeError,
        r"`x_t` to hold at least one sample",
    ),
    (
        "multistep_empty_x0",
        lambda: multistep_consistency_loss(student, TEACHER, x()[:0], generator=gen()),
        ShapeError,
        r"`x0` to hold at least one sample",
    ),
    (
        "progressive_empty_x0",
        lambda: progressive_distillation_loss(
            student, TEACHER, x()[:0], num_student_steps=4, teacher_steps=2
        ),
        ShapeError,
        r"`x0` to hold at least one sample",
    ),
    (
        "trajectory_empty_noise",
        lambda: teacher_trajectory_states(TEACHER, x()[:0], torch.zeros(0, dtype=torch.long)),
        ShapeError,
        r"`noise` to hold at least one sample",
    ),
    (
        "x0_conversion_empty_x_t",
        lambda: x0_conversion_loss(
            student, student, x()[:0], torch.zeros(0, dtype=torch.long), schedule=SCHED
        ),
        ShapeError,
        r"`x_t` to hold at least one sample",
    ),
    # --- integer tensors where floats are required ---------------------------------------------------------
    (
        "lcm_int_noise",
        lambda: lcm_consistency_loss(student, TEACHER, x(), noise=torch.ones(2, 4, 8, 8, dtype=torch.long)),
        DTypeError,
        r"`noise` to be a floating-point tensor, but got dtype torch\.int64",
    ),
    (
        "pair_int_x_t",
        lambda: consistency_pair(student, TEACHER, x().long(), sample()),
        DTypeError,
        r"`x_t` to be a floating-point tensor",
    ),
    (
        "lcm_bool_x_t",
        lambda: lcm_consistency_loss(student, TEACHER, x_t=x() > 0, sample=sample()),
        DTypeError,
        r"`x_t` to be a floating-point tensor, but got dtype torch\.bool",
    ),
    (
        "lcm_bool_guidance",
        lambda: lcm_consistency_loss(
            student, TEACHER, x(), {}, {}, guidance_scale=torch.ones(2, dtype=torch.bool), generator=gen()
        ),
        DTypeError,
        r"`guidance_scale` to be a real tensor",
    ),
    # --- shapes that would broadcast or mismatch ------------------------------------------------------------
    (
        "lcm_cond_batch",
        lambda: lcm_consistency_loss(
            student, TEACHER, x(), {"scale": torch.ones(3, 1, 1, 1)}, generator=gen()
        ),
        ShapeError,
        r"`cond\['scale'\]` to have batch size 2 \(from the latents\) or 1 in dim 0, but got shape \(3, 1, 1, 1\)",
    ),
    (
        "pair_nested_student_cond_batch",
        lambda: consistency_pair(
            student, TEACHER, x(), sample(), student_cond={"added": {"time_ids": torch.ones(3, 6)}}
        ),
        ShapeError,
        r"`student_cond\['added'\]\['time_ids'\]` to have batch size 2",
    ),
    (
        "lcm_sample_batch",
        lambda: lcm_consistency_loss(student, TEACHER, x(), sample=sample(3)),
        ShapeError,
        r"`sample\.t` to hold one timestep per sample \(2, the batch of `x0`\), but got shape \(3,\)",
    ),
    (
        "multistep_sample_t_end_2d",
        lambda: multistep_consistency_loss(
            student,
            TEACHER,
            x(),
            sample=TimestepSample(torch.full((2,), 500), torch.full((2,), 480), torch.full((2, 1), 480)),
        ),
        ShapeError,
        r"`sample\.t_end` to hold one timestep per sample",
    ),
    (
        "lcm_student_output_shape",
        lambda: lcm_consistency_loss(lambda x_, t: x_[:, :1], TEACHER, x(), generator=gen()),
        ShapeError,
        r"`student` to return a prediction of the shape of its input \(2, 4, 8, 8\), but got \(2, 1, 8, 8\)",
    ),
    (
        "pair_target_output_shape",
        lambda: consistency_pair(
            student, TEACHER, x(), sample(), target=lambda x_, t: x_.mean(1, keepdim=True)
        ),
        ShapeError,
        r"`target` to return a prediction of the shape of its input",
    ),
    (
        "x0_conversion_online_shape",
        lambda: x0_conversion_loss(lambda x_, t: x_[:, :1], student, x(), t2(), schedule=SCHED),
        ShapeError,
        r"`online` to return a prediction",
    ),
    (
        "x0_conversion_frozen_shape",
        lambda: x0_conversion_loss(student, lambda x_, t: x_[:, :1], x(), t2(), schedule=SCHED),
        ShapeError,
        r"`frozen` to return a prediction",
    ),
    (
        "trajectory_guidance_shape",
        lambda: teacher_trajectory_states(TEACHER, x(), t2(), {}, {}, guidance_scale=torch.ones(2, 1)),
        ShapeError,
        r"`guidance_scale` to be a number or one value per sample \(2,\), but got shape \(2, 1\)",
    ),
    # --- public names in messages (were `c`, `num_steps`, `t`, `t_to`, `prediction_type`, `batch_size`) -------
    (
        "lcm_huber_c_negative",
        lambda: lcm_consistency_loss(student, TEACHER, x(), huber_c=-1.0, generator=gen()),
        OptionError,
        r"`huber_c` to be >= 0, but got -1\.0",
    ),
    (
        "pair_teacher_steps_zero",
        lambda: consistency_pair(student, TEACHER, x(), sample(), teacher_steps=0),
        OptionError,
        r"`teacher_steps` to be an int >= 1, but got 0",
    ),
    (
        "pair_teacher_steps_too_many",
        lambda: consistency_pair(student, TEACHER, x(), sample(), teacher_steps=50),
        OptionError,
        r"sample\.t - sample\.t_prev >= teacher_steps \(50\) .* t=\[500, 500\] and t_prev=\[480, 480\]",
    ),
    (
        "inter_teacher_steps_zero",
        lambda: inter_segment_consistency_loss(student, TEACHER, x(), teacher_steps=0),
        OptionError,
        r"`teacher_steps` to be an int >= 1",
    ),
    (
        "progressive_teacher_steps_too_many",
        lambda: progressive_distillation_loss(student, TEACHER, x(), num_student_steps=4, teacher_steps=1000),
        OptionError,
        r"teacher_steps \(1000\)",
    ),
    (
        "x0_conversion_frozen_prediction_type",
        lambda: x0_conversion_loss(student, student, x(), t2(), schedule=SCHED, frozen_prediction_type="eps"),
        OptionError,
        r"`frozen_prediction_type` to be one of",
    ),
    (
        "lcm_sample_t_out_of_range",
        lambda: lcm_consistency_loss(
            student,
            TEACHER,
            x(),
            sample=TimestepSample(torch.tensor([1000, 500]), torch.full((2,), 480), torch.full((2,), 480)),
        ),
        OptionError,
        r"`sample\.t` to lie in \[-1, 999\]",
    ),
    (
        "tscd_sample_t_fractional",
        lambda: tscd_loss(
            student,
            TEACHER,
            x(),
            num_segments=4,
            sample=TimestepSample(torch.tensor([500.5, 500.0]), torch.full((2,), 480), torch.full((2,), 480)),
        ),
        OptionError,
        r"`sample\.t` to hold integral timestep indices",
    ),
    # --- options that were silently accepted ----------------------------------------------------------------
    (
        "lcm_huber_c_unused",
        lambda: lcm_consistency_loss(student, TEACHER, x(), distance="mse", huber_c=0.01, generator=gen()),
        OptionError,
        r"`huber_c` sets the constant of distance='pseudo_huber' .* got distance='mse'",
    ),
    (
        "trajectory_num_segments_zero",
        lambda: teacher_trajectory_states(TEACHER, x(), t2(), num_segments=0),
        OptionError,
        r"`num_segments` to be an int in \[1, 1000\], but got 0",
    ),
    (
        "trajectory_num_segments_negative",
        lambda: teacher_trajectory_states(TEACHER, x(), t2(), num_segments=-1),
        OptionError,
        r"`num_segments` to be an int in \[1, 1000\], but got -1",
    ),
    (
        "x0_conversion_clean_end",
        lambda: x0_conversion_loss(student, student, x(), torch.tensor([-1, 500]), schedule=SCHED),
        OptionError,
        r"`t` >= 0 .* but got \[-1, 500\]",
    ),
    (
        "pair_sigma_data_inf",
        lambda: consistency_pair(student, TEACHER, x(), sample(), sigma_data=INF),
        OptionError,
        r"`sigma_data` to be a finite number",
    ),
    # --- wrong Python types: torch / Python internals before ------------------------------------------------
    (
        "lcm_huber_c_str",
        lambda: lcm_consistency_loss(student, TEACHER, x(), huber_c="a", generator=gen()),
        DTypeError,
        r"`huber_c` to be a real number, but got str 'a'",
    ),
    (
        "lcm_cond_tensor",
        lambda: lcm_consistency_loss(student, TEACHER, x(), torch.ones(2, 77), generator=gen()),
        DTypeError,
        r"`cond` to be a mapping of the model's keyword arguments .* but got Tensor",
    ),
    (
        "pair_student_cond_tensor",
        lambda: consistency_pair(student, TEACHER, x(), sample(), student_cond=torch.ones(2)),
        DTypeError,
        r"`student_cond` to be a mapping",
    ),
    (
        "x0_conversion_cond_list",
        lambda: x0_conversion_loss(student, student, x(), t2(), [1], schedule=SCHED),
        DTypeError,
        r"`cond` to be a mapping",
    ),
    (
        "lcm_student_none",
        lambda: lcm_consistency_loss(None, TEACHER, x(), generator=gen()),
        OptionError,
        r"`student` to be a callable model",
    ),
    (
        "x0_conversion_frozen_not_callable",
        lambda: x0_conversion_loss(student, 3, x(), t2(), schedule=SCHED),
        OptionError,
        r"`frozen` to be a callable model",
    ),
    (
        "x0_conversion_schedule_none",
        lambda: x0_conversion_loss(student, student, x(), t2(), schedule=None),
        OptionError,
        r"`schedule` to be a NoiseSchedule, but got NoneType",
    ),
    (
        "trajectory_teacher_function",
        lambda: teacher_trajectory_states(lambda x_, t: x_, x(), t2()),
        OptionError,
        r"`teacher` to be a TeacherSolver, but got function",
    ),
    (
        "lcm_sample_tuple",
        lambda: lcm_consistency_loss(student, TEACHER, x(), sample=tuple(sample())),
        DTypeError,
        r"`sample` to be a TimestepSample\(t, t_prev, t_end\) .* but got tuple",
    ),
    (
        "pair_sample_tensor",
        lambda: consistency_pair(student, TEACHER, x(), torch.tensor([500, 480])),
        DTypeError,
        r"`sample` to be a TimestepSample",
    ),
    (
        "lcm_generator_int",
        lambda: lcm_consistency_loss(student, TEACHER, x(), generator=0),
        DTypeError,
        r"`generator` to be a torch\.Generator or None, but got int",
    ),
    (
        "lcm_guidance_str",
        lambda: lcm_consistency_loss(student, TEACHER, x(), {}, {}, guidance_scale="7", generator=gen()),
        DTypeError,
        r"`guidance_scale` to be a number, a \(B,\) tensor or None, but got str",
    ),
    (
        "pair_timestep_scaling_str",
        lambda: consistency_pair(student, TEACHER, x(), sample(), timestep_scaling="10"),
        DTypeError,
        r"`timestep_scaling` to be a real number",
    ),
    (
        "inter_x0_none",
        lambda: inter_segment_consistency_loss(student, TEACHER, None, generator=gen()),
        DTypeError,
        r"`x0` to be a torch\.Tensor, but got NoneType",
    ),
    # --- a float64 / bf16 input to a float32 network: torch's "Input type (double) and bias type (float)" ----
    (
        "lcm_float64_into_float32_student",
        lambda: lcm_consistency_loss(student, TEACHER, x().double(), generator=gen()),
        DTypeError,
        r"`student` failed on `x_t` of dtype torch\.float64 .*cast `x_t` and the conditions",
    ),
    (
        "pair_bf16_into_float32_student",
        lambda: consistency_pair(student, TEACHER, x().bfloat16(), sample()),
        DTypeError,
        r"`student` failed on `x_t` of dtype torch\.bfloat16",
    ),
    (
        "pair_float64_into_float32_teacher",
        lambda: consistency_pair(
            lambda x_, t: x_, TeacherSolver(lambda x_, t: CONV(x_), SCHED), x().double(), sample()
        ),
        DTypeError,
        r"`(teacher|model)` .* dtype torch\.float64",  # TeacherSolver's own message names its `model`
    ),
    (
        "x0_conversion_float64_into_float32",
        lambda: x0_conversion_loss(student, lambda x_, t: x_, x().double(), t2(), schedule=SCHED),
        DTypeError,
        r"`online` failed on `x_t` of dtype torch\.float64",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(
    case: str, call: Callable[[], Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call()


def test_dtype_mismatch_keeps_the_torch_error_as_cause() -> None:
    with pytest.raises(DTypeError) as info:
        lcm_consistency_loss(student, TEACHER, x().double(), generator=gen())
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "message",
    [
        "out of memory",
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
        # conv's message for CPU latents into a CUDA network: a device clash, not a dtype one
        "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be the same",
    ],
)
def test_other_model_errors_propagate_unchanged(message: str) -> None:
    def broken(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError) as info:
        consistency_pair(broken, TEACHER, x(), sample())
    assert type(info.value) is RuntimeError and str(info.value) == message


def test_nan_inputs_pass_with_value_checks_off() -> None:
    # Switched off, the finiteness checks read no tensor values (no device sync): the NaN propagates.
    with value_checks(False):
        loss, _ = lcm_consistency_loss(student, TEACHER, with_value(NAN), noise=x(), sample=sample())
        assert bool(loss.isnan())
        pair = consistency_pair(
            student, TEACHER, with_value(NAN), sample(), {}, {}, guidance_scale=torch.tensor([NAN, 1.0])
        )
        assert bool(pair.student.isnan().any())
        states = teacher_trajectory_states(TEACHER, with_value(NAN), t2())
        assert bool(states.isnan().any())
        loss, _ = x0_conversion_loss(student, student, with_value(INF), t2(), schedule=SCHED)
        assert not bool(loss.isfinite())


def test_one_timestep_for_the_batch_reaches_the_model_per_sample() -> None:
    # A 0-d or (1,) sample field is the same timestep for every sample; the models receive it as (B,).
    seen: list[tuple[int, ...]] = []

    def recording(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return 0.1 * x_

    one = TimestepSample(torch.tensor(500), torch.tensor([480]), torch.tensor(480))
    per_sample = consistency_pair(recording, TEACHER, x(3), TimestepSample(*(v.expand(3) for v in sample(1))))
    shared = consistency_pair(recording, TEACHER, x(3), one)
    assert set(seen) == {(3,)}
    torch.testing.assert_close(shared.target, per_sample.target)
    torch.testing.assert_close(shared.student, per_sample.student)


def test_numpy_numbers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    want = consistency_pair(student, TEACHER, x(), sample(), {}, {}, teacher_steps=2, guidance_scale=2.0)
    got = consistency_pair(
        student, TEACHER, x(), sample(), {}, {}, teacher_steps=np.int64(2), guidance_scale=np.float32(2.0)
    )
    torch.testing.assert_close(got.target, want.target)
    states = teacher_trajectory_states(TEACHER, x(), t2(), num_segments=np.int64(8))
    torch.testing.assert_close(states, teacher_trajectory_states(TEACHER, x(), t2(), num_segments=8))
