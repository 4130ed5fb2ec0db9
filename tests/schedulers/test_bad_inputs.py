"""Bad inputs to every public callable of ``diffdistill.schedulers``: a clear error naming the public argument.

Issue 18, part 2: no silent wrong result (NaN / Inf / empty / integer / silently broadcast inputs) and no unclear
internal error (a torch message from deep inside a model, ``torch.multinomial`` or ``int(None)``). Each case
below failed before the fix, either silently (returned a value) or with an error that did not name the argument.
No diffusers needed: these run everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.schedulers import (
    NoiseSchedule,
    Stage,
    StagePlan,
    TeacherSolver,
    apply_guidance,
    boundary_scalings,
    categorical_timesteps,
    concat_conditions,
    consistency_function,
    custom_timesteps,
    ddim_sample,
    euler_sample,
    lcm_sample,
    milestone_pairs,
    one_step_sample,
    progressive_pairs,
    spaced_timesteps,
    tcd_sample,
    tlcm_timesteps,
    tscd_segments,
    uniform_timesteps,
    x0_renoise_sample,
)

SCHED = NoiseSchedule.from_betas()
NAN, INF = float("nan"), float("inf")


def eps_model(x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
    return 0.5 * x


def x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def with_value(value: float) -> torch.Tensor:
    out = x()
    out[1, 2, 3, 0] = value
    return out


def xi() -> torch.Tensor:
    return torch.zeros(2, 4, 4, 4, dtype=torch.long)


def empty() -> torch.Tensor:
    return torch.zeros(0, 4, 4, 4)


def solver(**kwargs: Any) -> TeacherSolver:
    return TeacherSolver(eps_model, SCHED, **kwargs)


# (id, call, error type, regex the message must match: it names the argument as the caller passed it)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # ------------------------------------------------------------------ NoiseSchedule construction
    ("schedule_nan", lambda: NoiseSchedule(torch.tensor([0.9, NAN])), NonFiniteError, r"`alphas_cumprod`"),
    (
        "schedule_2d",
        lambda: NoiseSchedule(torch.rand(2, 2)),
        ShapeError,
        r"`alphas_cumprod` to be 1-D.*\(2, 2\)",
    ),
    ("schedule_str", lambda: NoiseSchedule("abc"), DTypeError, r"`alphas_cumprod` to be a 1-D tensor"),
    ("schedule_none", lambda: NoiseSchedule(None), DTypeError, r"`alphas_cumprod`.*NoneType"),
    (
        "final_nan",
        lambda: NoiseSchedule.from_betas(final_alpha_cumprod=NAN),
        OptionError,
        r"`final_alpha_cumprod` to be a finite number",
    ),
    (
        "final_str",
        lambda: NoiseSchedule.from_betas(final_alpha_cumprod="1"),
        DTypeError,
        r"`final_alpha_cumprod` to be a real number",
    ),
    (
        "beta_negative",
        lambda: NoiseSchedule.from_betas(beta_start=-1.0),
        OptionError,
        r"`beta_start` to lie in \[0, 1\)",
    ),
    (
        "beta_nan",
        lambda: NoiseSchedule.from_betas(beta_end=NAN),
        OptionError,
        r"`beta_end` to be a finite number",
    ),
    (
        "beta_underflow",
        lambda: NoiseSchedule.from_betas(beta_start=0.5, beta_end=0.1),
        OptionError,
        r"beta_start=0\.5, beta_end=0\.1 .* drive it to 0",
    ),
    (
        "T_none",
        lambda: NoiseSchedule.from_betas(None),
        DTypeError,
        r"`num_train_timesteps` to be an int >= 2",
    ),
    # ------------------------------------------------------------------ NoiseSchedule methods
    (
        "add_noise_nan_x0",
        lambda: SCHED.add_noise(with_value(NAN), x(), 5),
        NonFiniteError,
        r"`x0` to be finite",
    ),
    (
        "add_noise_inf_noise",
        lambda: SCHED.add_noise(x(), with_value(INF), 5),
        NonFiniteError,
        r"`noise` to be finite",
    ),
    (
        "add_noise_int_noise",
        lambda: SCHED.add_noise(x(), xi(), 5),
        DTypeError,
        r"`noise` to be a floating-point",
    ),
    (
        "add_noise_empty",
        lambda: SCHED.add_noise(empty(), empty(), 5),
        ShapeError,
        r"`x0` to hold at least one sample",
    ),
    (
        "add_noise_t_none",
        lambda: SCHED.add_noise(x(), x(), None),
        DTypeError,
        r"`t` to be an int, a sequence of ints",
    ),
    (
        "add_noise_t_nan",
        lambda: SCHED.add_noise(x(), x(), torch.tensor([NAN, 3.0])),
        NonFiniteError,
        r"`t` to be finite",
    ),
    (
        "to_x0_nan_output",
        lambda: SCHED.to_x0(with_value(NAN), x(), 5),
        NonFiniteError,
        r"`model_output` to be finite",
    ),
    ("to_x0_nan_x_t", lambda: SCHED.to_x0(x(), with_value(INF), 5), NonFiniteError, r"`x_t` to be finite"),
    (
        "to_x0_int_output",
        lambda: SCHED.to_x0(xi(), x(), 5),
        DTypeError,
        r"`model_output` to be a floating-point",
    ),
    (
        "to_x0_empty",
        lambda: SCHED.to_x0(empty(), empty(), 5),
        ShapeError,
        r"`model_output` to hold at least one",
    ),
    ("to_epsilon_nan", lambda: SCHED.to_epsilon(with_value(NAN), x(), 5), NonFiniteError, r"`model_output`"),
    (
        "convert_from_type",
        lambda: SCHED.convert(x(), x(), 5, "eps", "sample"),
        OptionError,
        r"`from_type` to be one of",
    ),
    (
        "convert_to_type",
        lambda: SCHED.convert(x(), x(), 5, "epsilon", "x0"),
        OptionError,
        r"`to_type` to be one of",
    ),
    (
        "ddim_nan",
        lambda: SCHED.ddim_step(with_value(NAN), 500, x(), 100),
        NonFiniteError,
        r"`model_output` to be finite",
    ),
    ("alpha_like_list", lambda: SCHED.alpha(5, like=[1.0]), DTypeError, r"`like` to be a torch.Tensor"),
    ("sigma_t_none", lambda: SCHED.sigma(None), DTypeError, r"`t` to be an int"),
    ("snr_t_str", lambda: SCHED.snr("5"), DTypeError, r"`t` to be an int"),
    (
        "edm_sigma_nan",
        lambda: SCHED.edm_sigma_to_timestep(torch.tensor([NAN])),
        NonFiniteError,
        r"`sigma` to be finite",
    ),
    ("edm_sigma_str", lambda: SCHED.edm_sigma_to_timestep("a"), DTypeError, r"`sigma` to be a number"),
    ("edm_sigma_zero", lambda: SCHED.edm_sigma_to_timestep(0.0), OptionError, r"`sigma` to be > 0.*0\.0"),
    # ------------------------------------------------------------------ consistency
    ("scalings_nan", lambda: boundary_scalings(torch.tensor([NAN])), NonFiniteError, r"`t` to be finite"),
    ("scalings_none", lambda: boundary_scalings(None), DTypeError, r"`t` to be a number"),
    (
        "scalings_bool",
        lambda: boundary_scalings(torch.tensor([True])),
        DTypeError,
        r"`t` to hold real timesteps",
    ),
    (
        "scalings_inf_scaling",
        lambda: boundary_scalings(3, timestep_scaling=INF),
        OptionError,
        r"`timestep_scaling` to be a finite number",
    ),
    (
        "consistency_nan_output",
        lambda: consistency_function(with_value(NAN), x(), 5, SCHED),
        NonFiniteError,
        r"`model_output` to be finite",
    ),
    (
        "consistency_schedule",
        lambda: consistency_function(x(), x(), 5, object()),
        OptionError,
        r"`schedule` to be a NoiseSchedule",
    ),
    # ------------------------------------------------------------------ guidance
    (
        "guidance_broadcast",
        lambda: apply_guidance(torch.zeros(2, 3), torch.zeros(2, 1), 2.0),
        ShapeError,
        r"`cond_out` and `uncond_out` to have the same shape, but got cond_out \(2, 3\) and uncond_out \(2, 1\)",
    ),
    (
        "guidance_int",
        lambda: apply_guidance(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2.0),
        DTypeError,
        r"`cond_out` to be a floating-point",
    ),
    (
        "guidance_nan_uncond",
        lambda: apply_guidance(torch.zeros(2, 3), torch.full((2, 3), NAN), 2.0),
        NonFiniteError,
        r"`uncond_out` to be finite",
    ),
    (
        "guidance_empty",
        lambda: apply_guidance(torch.zeros(0, 3), torch.zeros(0, 3), 2.0),
        ShapeError,
        r"`cond_out` to hold at least one sample",
    ),
    (
        "guidance_nan_scale",
        lambda: apply_guidance(torch.zeros(2, 3), torch.zeros(2, 3), NAN),
        OptionError,
        r"`guidance_scale` to be a finite number",
    ),
    (
        "guidance_inf_scale_tensor",
        lambda: apply_guidance(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, INF])),
        NonFiniteError,
        r"`guidance_scale` to be finite",
    ),
    (
        "guidance_str_scale",
        lambda: apply_guidance(torch.zeros(2, 3), torch.zeros(2, 3), "7"),
        DTypeError,
        r"`guidance_scale` to be a real number",
    ),
    ("concat_list", lambda: concat_conditions([1], {}, 2), DTypeError, r"`cond` to be a dict"),
    ("concat_batch", lambda: concat_conditions({}, {}, 0), OptionError, r"`batch` to be an int >= 1"),
    (
        "concat_nested_keys",
        lambda: concat_conditions({"a": {"b": torch.ones(2)}}, {"a": {"c": torch.ones(2)}}, 2),
        OptionError,
        r"same keys in \['a'\]",
    ),
    # ------------------------------------------------------------------ TeacherSolver
    (
        "solver_scale_nan",
        lambda: solver(guidance_scale=NAN),
        OptionError,
        r"`guidance_scale` to be a finite number",
    ),
    (
        "solver_scale_str",
        lambda: solver(guidance_scale="7"),
        DTypeError,
        r"`guidance_scale` to be a real number",
    ),
    ("solve_nan", lambda: solver().solve(with_value(NAN), 999, 500), NonFiniteError, r"`x_t` to be finite"),
    (
        "solve_empty",
        lambda: solver().solve(empty(), 999, 500),
        ShapeError,
        r"`x_t` to hold at least one sample",
    ),
    ("solve_list", lambda: solver().solve([1.0], 999, 500), DTypeError, r"`x_t` to be a torch.Tensor"),
    ("predict_int", lambda: solver().predict(xi(), 999), DTypeError, r"`x_t` to be a floating-point"),
    (
        "predict_0d",
        lambda: solver().predict(torch.tensor(1.0), 999),
        ShapeError,
        r"`x_t` to have a batch dimension",
    ),
    (
        "predict_cond_list",
        lambda: solver().predict(x(), 999, [1]),
        DTypeError,
        r"`cond` to be a mapping of the model's keyword arguments",
    ),
    (
        "solve_state_dtype",
        lambda: solver().solve(x(), 999, 500, state_dtype=torch.long),
        DTypeError,
        r"`state_dtype` to be a floating torch.dtype",
    ),
    (
        "solve_model_shape",
        lambda: TeacherSolver(lambda x, t: x[:, :2], SCHED).solve(x(), 999, 500),
        ShapeError,
        r"Expected `model` to return a prediction of the shape of its input `x_t` \(2, 4, 4, 4\), but got "
        r"\(2, 2, 4, 4\)",
    ),
    (
        "solve_model_int_output",
        lambda: TeacherSolver(lambda x, t: x.long(), SCHED).solve(x(), 999, 500),
        DTypeError,
        r"`model` to return a floating-point prediction",
    ),
    (
        "solve_bf16_into_float32_model",
        lambda: TeacherSolver(lambda x, t: torch.nn.Conv2d(4, 4, 1)(x), SCHED).solve(
            x().bfloat16(), 999, 500
        ),
        DTypeError,
        r"`model` failed on `x_t` of dtype torch.bfloat16 .*autocast",
    ),
    (
        "step_timesteps_like",
        lambda: solver().step_timesteps(999, 500, 2, [1]),
        DTypeError,
        r"`like` to be a torch.Tensor",
    ),
    # ------------------------------------------------------------------ few-step samplers
    ("lcm_nan", lambda: lcm_sample(eps_model, SCHED, with_value(NAN), [999, 499]), NonFiniteError, r"`x_t`"),
    (
        "lcm_empty",
        lambda: lcm_sample(eps_model, SCHED, empty(), [999, 499]),
        ShapeError,
        r"`x_t` to hold at least",
    ),
    (
        "tcd_inf",
        lambda: tcd_sample(eps_model, SCHED, with_value(INF), [999]),
        NonFiniteError,
        r"`x_t` to be finite",
    ),
    (
        "ddim_empty",
        lambda: ddim_sample(eps_model, SCHED, empty(), [999]),
        ShapeError,
        r"`x_t` to hold at least",
    ),
    ("euler_nan", lambda: euler_sample(eps_model, SCHED, with_value(NAN), [999]), NonFiniteError, r"`x_t`"),
    (
        "x0_renoise_nan_noise",
        lambda: x0_renoise_sample(eps_model, SCHED, x(), [999, 499], noises=[with_value(NAN)]),
        NonFiniteError,
        r"`noises\[0\]` to be finite",
    ),
    (
        "lcm_int_noise",
        lambda: lcm_sample(eps_model, SCHED, x(), [999, 499], noises=[xi()]),
        DTypeError,
        r"`noises\[0\]` to be a floating-point",
    ),
    (
        "lcm_bare_tensor_noises",
        lambda: lcm_sample(eps_model, SCHED, x(), [999, 499], noises=x()),
        DTypeError,
        r"`noises` to be a list of tensors.*noises=\[z\]",
    ),
    (
        "lcm_generator_str",
        lambda: lcm_sample(eps_model, SCHED, x(), [999, 499], generator="0"),
        DTypeError,
        r"`generator` to be a torch.Generator",
    ),
    (
        "lcm_sigma_data_nan",
        lambda: lcm_sample(eps_model, SCHED, x(), [999], sigma_data=NAN),
        OptionError,
        r"`sigma_data` to be a finite number",
    ),
    (
        "lcm_guidance_nan",
        lambda: lcm_sample(eps_model, SCHED, x(), [999], guidance_scale=NAN, uncond={}),
        OptionError,
        r"`guidance_scale` to be a finite number",
    ),
    (
        "lcm_cond_list",
        lambda: lcm_sample(eps_model, SCHED, x(), [999], cond=[1]),
        DTypeError,
        r"`cond` to be a mapping of the model's keyword arguments",
    ),
    (
        "lcm_timesteps_int",
        lambda: lcm_sample(eps_model, SCHED, x(), 999),
        DTypeError,
        r"`timesteps`.*e\.g\. \[999\]",
    ),
    (
        "tcd_eta_str",
        lambda: tcd_sample(eps_model, SCHED, x(), [999], eta="a"),
        DTypeError,
        r"`eta` to be a real number",
    ),
    (
        "tcd_eta_nan",
        lambda: tcd_sample(eps_model, SCHED, x(), [999], eta=NAN),
        OptionError,
        r"`eta` to be a finite",
    ),
    (
        "one_step_timestep_range",
        lambda: one_step_sample(eps_model, SCHED, x(), 1000),
        OptionError,
        r"every value of `timestep` to lie in \[0, 999\]",
    ),
    (
        "sampler_model_shape",
        lambda: lcm_sample(lambda x, t: x[:, :2], SCHED, x(), [999]),
        ShapeError,
        r"`model` to return a prediction of the shape",
    ),
    # ------------------------------------------------------------------ timestep lists
    (
        "custom_nan",
        lambda: custom_timesteps(torch.tensor([NAN])),
        NonFiniteError,
        r"`timesteps` to be finite",
    ),
    (
        "custom_strength_str",
        lambda: custom_timesteps([999], strength="a"),
        DTypeError,
        r"`strength` to be a real",
    ),
    (
        "custom_strength_nan",
        lambda: custom_timesteps([999], strength=NAN),
        OptionError,
        r"`strength` to be a finite",
    ),
    ("tlcm_list", lambda: tlcm_timesteps([4]), OptionError, r"`num_inference_steps` to be one of"),
    (
        "spaced_offset",
        lambda: spaced_timesteps(4, "leading", steps_offset=300),
        OptionError,
        r"Expected `steps_offset` <= 249 for 4 'leading' steps",
    ),
    # ------------------------------------------------------------------ training-timestep samplers
    (
        "uniform_bs_none",
        lambda: uniform_timesteps(None),
        DTypeError,
        r"`batch_size` to be an int >= 1, but got NoneType None",
    ),
    (
        "uniform_low_nan",
        lambda: uniform_timesteps(2, NAN),
        OptionError,
        r"-1 <= `low` <= `high`, but got low=nan",
    ),
    (
        "uniform_low_str",
        lambda: uniform_timesteps(2, "a"),
        OptionError,
        r"-1 <= `low` <= `high`, but got low='a'",
    ),
    (
        "uniform_generator",
        lambda: uniform_timesteps(2, generator=1),
        DTypeError,
        r"`generator` to be a torch.Generator",
    ),
    (
        "categorical_fractional",
        lambda: categorical_timesteps(2, [1.5, 3]),
        OptionError,
        r"`values` to hold integral timesteps, but got \[1\.5, 3\.0\]",
    ),
    (
        "categorical_negative",
        lambda: categorical_timesteps(2, [-5, 3]),
        OptionError,
        r"every value of `values` to be >= -1",
    ),
    (
        "categorical_bool",
        lambda: categorical_timesteps(2, [True, False]),
        DTypeError,
        r"`values` to hold real numbers",
    ),
    (
        "categorical_str",
        lambda: categorical_timesteps(2, "ab"),
        DTypeError,
        r"`values` to be a sequence of numbers",
    ),
    (
        "categorical_nan_weight",
        lambda: categorical_timesteps(2, [1, 3], [NAN, 1.0]),
        OptionError,
        r"`weights` to be >= 0 with a positive sum \(and finite\), but got \[nan, 1\.0\]",
    ),
    (
        "tscd_bs_nan",
        lambda: tscd_segments(NAN, 4),
        DTypeError,
        r"`batch_size` to be an int >= 1, but got float nan",
    ),
    ("milestone_skip_nan", lambda: milestone_pairs(2, skip=NAN), DTypeError, r"`skip` to be an int >= 1"),
    (
        "progressive_extra_str",
        lambda: progressive_pairs(2, 4, extra_timesteps="ab"),
        DTypeError,
        r"`extra_timesteps` to be a sequence of numbers",
    ),
    # ------------------------------------------------------------------ stage plans
    (
        "stage_steps_nan",
        lambda: Stage("a", "mse", student_steps=NAN),
        OptionError,
        r"`student_steps` to be None or",
    ),
    (
        "stage_weights_list",
        lambda: Stage("a", "mse", loss_weights=[1]),
        DTypeError,
        r"`loss_weights` to be a dict",
    ),
    (
        "stage_weight_nan",
        lambda: Stage("a", "mse", loss_weights={"mse": NAN}),
        OptionError,
        r"`loss_weights\['mse'\]` to be a finite number",
    ),
    ("stage_options_none", lambda: Stage("a", "mse", options=None), DTypeError, r"`options` to be a dict"),
    ("plan_int", lambda: StagePlan(5), DTypeError, r"`stages` to be a sequence of Stage objects"),
    ("plan_entry", lambda: StagePlan([Stage("a", "mse"), "b"]), DTypeError, r"`stages\[1\]` is str"),
    ("plan_name", lambda: StagePlan([Stage("a", "mse")], name=5), DTypeError, r"`name` to be a string"),
    ("plan_from_list", lambda: StagePlan.from_dict([1]), DTypeError, r"`data` to be a dict"),
    (
        "plan_from_bad_stage",
        lambda: StagePlan.from_dict({"stages": [1]}),
        DTypeError,
        r"`data\['stages'\]\[0\]`",
    ),
    ("plan_index", lambda: StagePlan.mlcm()[7], IndexError, r"Stage index 7 is out of range for a plan of 2"),
    ("hyper_sd_str", lambda: StagePlan.hyper_sd("ab"), DTypeError, r"`segments` to be a sequence of ints"),
    (
        "hyper_sd_steps",
        lambda: StagePlan.hyper_sd(num_inference_steps=0),
        OptionError,
        r"`num_inference_steps`",
    ),
    (
        "hyper_sd_30",
        lambda: StagePlan.hyper_sd(num_inference_steps=30),
        OptionError,
        r"`num_inference_steps` to divide",
    ),
    (
        "hyper_sd_k",
        lambda: StagePlan.hyper_sd((8,), num_inference_steps=4),
        OptionError,
        r"segment count <= ",
    ),
    ("mlcm_segments", lambda: StagePlan.mlcm(3), OptionError, r"`num_segments` to divide 1000"),
    (
        "mlcm_guidance",
        lambda: StagePlan.mlcm(guidance_scale=NAN),
        OptionError,
        r"`guidance_scale` to be a finite",
    ),
    (
        "lightning_guidance",
        lambda: StagePlan.sdxl_lightning("6"),
        DTypeError,
        r"`mse_guidance_scale` to be a real",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(
    call: Callable[[], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_value_checks_off_let_nan_through_without_raising() -> None:
    """With value checks off (no device sync), NaN inputs propagate instead of raising."""
    bad = with_value(NAN)
    with value_checks(False):
        assert SCHED.add_noise(bad, x(), 500).isnan().any()
        assert SCHED.to_x0(bad, x(), 500).isnan().any()
        assert SCHED.ddim_step(x(), 500, bad, 100).isnan().any()
        assert consistency_function(bad, x(), 5, SCHED).isnan().any()
        assert apply_guidance(bad, x(), 3.0).isnan().any()
        assert solver().solve(bad, 999, 500).isnan().any()
        assert (
            lcm_sample(eps_model, SCHED, bad, [999, 499], generator=torch.Generator().manual_seed(0))
            .sample.isnan()
            .any()
        )
        assert x0_renoise_sample(eps_model, SCHED, x(), [999, 499], noises=[bad]).sample.isnan().any()
        assert boundary_scalings(torch.tensor([NAN]))[0].isnan().all()


def test_static_checks_stay_on_with_value_checks_off() -> None:
    """Shape and dtype checks read no tensor values: they run whatever the switch says."""
    with value_checks(False):
        with pytest.raises(ShapeError, match=r"`cond_out` and `uncond_out` to have the same shape"):
            apply_guidance(torch.zeros(2, 3), torch.zeros(2, 1), 2.0)
        with pytest.raises(DTypeError, match=r"`noise` to be a floating-point"):
            SCHED.add_noise(x(), xi(), 5)
        with pytest.raises(ShapeError, match=r"`x_t` to hold at least one sample"):
            solver().solve(empty(), 999, 500)


def test_sampling_loops_check_once_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The value checks (device syncs) run at the boundary only, not inside the sampling / solver loops."""
    from diffdistill.schedulers import few_step_samplers, teacher_solver

    calls: list[str] = []
    real = teacher_solver.check_finite

    def counting(t: torch.Tensor, name: str) -> None:
        calls.append(name)
        real(t, name)

    monkeypatch.setattr(teacher_solver, "check_finite", counting)
    monkeypatch.setattr(few_step_samplers, "check_finite", counting)
    lcm_sample(eps_model, SCHED, x(), [999, 759, 499, 259], generator=torch.Generator().manual_seed(0))
    assert calls == ["x_t"]
    calls.clear()
    solver().solve(x(), 999, 0, num_steps=8)
    assert calls == ["x_t"]
