"""Few-step samplers and timestep lists: parity with diffusers' schedulers, properties, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.schedulers.few_step_samplers import (
    TIMESTEP_SPACINGS,
    TLCM_GRID_INDICES,
    SamplerOutput,
    custom_timesteps,
    ddim_sample,
    dmd2_timesteps,
    euler_sample,
    lcm_sample,
    lcm_timesteps,
    one_step_sample,
    spaced_timesteps,
    tcd_sample,
    tlcm_timesteps,
    x0_renoise_sample,
)
from diffdistill.schedulers.noise_schedule import NoiseSchedule

ATOL = 1e-6
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = [1, 2, 4, 8]
PRED_TYPES = ["epsilon", "sample", "v_prediction"]
ETAS = [0.0, 0.3, 1.0]


# ----------------------------------------------------------------------------------------- fakes
def _t_like(t: Any, x: torch.Tensor) -> torch.Tensor:
    """Timestep(s) as a float tensor broadcastable against x (diffusers passes a 0-d t, we pass (B,))."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def linear_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    tt = _t_like(t, x)
    return x * tt / (tt + 1)


def nonlinear_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    tt = _t_like(t, x)
    return 0.8 * torch.tanh(x) * torch.cos(tt / 300.0) + 0.1 * torch.sin(3.0 * x)


MODELS = {"linear": linear_model, "nonlinear": nonlinear_model}


def _x_start(seed: int = 0, shape: tuple[int, ...] = (2, 3, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- diffusers helpers
@pytest.fixture(scope="module")
def diffusers() -> Any:
    return pytest.importorskip("diffusers")


def _float64_scheduler(cls: Any, **config: Any) -> Any:
    """A diffusers scheduler with SD betas whose tables are float64.

    diffusers keeps `alphas_cumprod` / `final_alpha_cumprod` in float32; we cast them to float64 before
    stepping (and build our NoiseSchedule from the same values) so both sides compute in float64 and can
    be compared at 1e-6.
    """
    sched = cls(**SD_BETAS, **config)
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
    scalings = getattr(sched, "get_scalings_for_boundary_condition_discrete", None)
    if scalings is not None:
        # LCMScheduler evaluates c_skip / c_out from the int64 timestep, i.e. in float32; hand its own
        # formula a float64 timestep instead.
        sched.get_scalings_for_boundary_condition_discrete = lambda t: scalings(
            torch.as_tensor(t, dtype=torch.float64)
        )
    return sched


class _KeepFloat64(torch.Tensor):
    """`EulerDiscreteScheduler.step` hard-codes `sample.to(torch.float32)`. Passing the sample as this
    subclass makes that one cast a no-op, so the reference step runs in float64 too (test-only shim)."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if len(args) == 1 and args[0] is torch.float32 and not kwargs:
            return self
        return super().to(*args, **kwargs)


def _diffusers_loop(
    sched: Any, model: Callable[..., torch.Tensor], x: torch.Tensor, **step_kwargs: Any
) -> torch.Tensor:
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


def _euler_reference(sched: Any, model: Callable[..., torch.Tensor], x_vp: torch.Tensor) -> torch.Tensor:
    """Run diffusers' Euler in float64 from our VP state; diffusers' latents are x / alpha_t."""
    ts = sched.timesteps.round().long()
    abar = sched.alphas_cumprod
    sigmas = ((1 - abar[ts]) / abar[ts]).sqrt()
    last = ((1 - abar[0]) / abar[0]).sqrt() if sched.config.final_sigmas_type == "sigma_min" else 0.0
    # diffusers rounds its sigmas to float32; recompute them in float64 from the same alphas_cumprod.
    sched.sigmas = torch.cat([sigmas, torch.full((1,), float(last), dtype=torch.float64)])
    z = x_vp / abar[ts[0]].sqrt()
    for t in sched.timesteps:
        out = model(sched.scale_model_input(z, t), t)
        z = sched.step(out, t, z.as_subclass(_KeepFloat64)).prev_sample.as_subclass(torch.Tensor)
    return z


MAX_ERR: dict[str, float] = {}


def _check_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    assert ours.dtype == torch.float64
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


# -------------------------------------------------------------- sampler parity with diffusers
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_lcm_matches_diffusers(diffusers: Any, steps: int, prediction_type: str, model_name: str) -> None:
    ref = _float64_scheduler(diffusers.LCMScheduler, prediction_type=prediction_type)
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    model, x = MODELS[model_name], _x_start()
    expected = _diffusers_loop(ref, model, x, generator=_gen())
    out = lcm_sample(model, sched, x, lcm_timesteps(steps), generator=_gen())
    assert out.timesteps.tolist() == ref.timesteps.tolist()
    assert len(out.noises) == steps - 1
    _check_close("LCMScheduler", out.sample, expected)


@pytest.mark.parametrize(
    ("timesteps", "set_alpha_to_one"), [([999, 759, 499, 259], True), ([800], True), ([999, 499], False)]
)
def test_lcm_custom_timesteps_match_diffusers(
    diffusers: Any, timesteps: list[int], set_alpha_to_one: bool
) -> None:
    """Custom lists (LCM 4-step, Hyper-SD's one-step UNet at t = 800), abar_{-1} = abar_0."""
    ref = _float64_scheduler(diffusers.LCMScheduler, set_alpha_to_one=set_alpha_to_one)
    sched = NoiseSchedule.from_scheduler(ref)
    x = _x_start(3)
    for model_name, model in MODELS.items():
        ref.set_timesteps(timesteps=timesteps)
        expected = _diffusers_loop(ref, model, x, generator=_gen())
        out = lcm_sample(model, sched, x, custom_timesteps(timesteps), generator=_gen())
        _check_close(f"LCMScheduler custom ({model_name})", out.sample, expected)


def test_custom_timesteps_strength_matches_diffusers(diffusers: Any) -> None:
    """img2img strength keeps the tail of a custom list, as LCM/TCD's set_timesteps(timesteps=...)."""
    lcm, tcd = diffusers.LCMScheduler(**SD_BETAS), diffusers.TCDScheduler(**SD_BETAS)
    for strength in (1.0, 0.75, 0.5, 0.3):
        for timesteps in ([999, 759, 499, 259], [999, 874, 749, 624, 499, 374, 249, 124]):
            lcm.set_timesteps(timesteps=timesteps, strength=strength)
            tcd.set_timesteps(timesteps=timesteps, strength=strength)
            ours = custom_timesteps(timesteps, strength=strength).tolist()
            assert ours == lcm.timesteps.tolist() == tcd.timesteps.tolist()
    # (Not compared: sampling after such a cut. diffusers keeps num_inference_steps = the uncut length,
    # so its LCMScheduler re-noises after the last step; lcm_sample returns the clean estimate.)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_tcd_matches_diffusers(
    diffusers: Any, steps: int, prediction_type: str, eta: float, model_name: str
) -> None:
    ref = _float64_scheduler(diffusers.TCDScheduler, prediction_type=prediction_type)
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    model, x = MODELS[model_name], _x_start(1)
    expected = _diffusers_loop(ref, model, x, eta=eta, generator=_gen())
    out = tcd_sample(model, sched, x, lcm_timesteps(steps), eta=eta, generator=_gen())
    assert out.timesteps.tolist() == ref.timesteps.tolist()
    assert len(out.noises) == (steps - 1 if eta > 0 else 0)
    _check_close("TCDScheduler", out.sample, expected)


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_tcd_custom_timesteps_match_diffusers(diffusers: Any, eta: float) -> None:
    """Hyper-SD style custom list, including one ending at t = 0 (x_s = x_t there)."""
    for timesteps in ([999, 759, 500, 259], [999, 500, 0]):
        ref = _float64_scheduler(diffusers.TCDScheduler)
        ref.set_timesteps(timesteps=timesteps)
        sched = NoiseSchedule.from_scheduler(ref)
        x = _x_start(4)
        expected = _diffusers_loop(ref, nonlinear_model, x, eta=eta, generator=_gen())
        out = tcd_sample(nonlinear_model, sched, x, timesteps, eta=eta, generator=_gen())
        _check_close("TCDScheduler custom", out.sample, expected)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers(
    diffusers: Any, steps: int, prediction_type: str, spacing: str, model_name: str
) -> None:
    ref = _float64_scheduler(
        diffusers.DDIMScheduler, prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=False
    )
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    model, x = MODELS[model_name], _x_start(2)
    expected = _diffusers_loop(ref, model, x)
    out = ddim_sample(model, sched, x, spaced_timesteps(steps, spacing))
    assert out.timesteps.tolist() == ref.timesteps.tolist()
    _check_close("DDIMScheduler", out.sample, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_ddim_leading_offset_no_final_alpha_one_matches_diffusers(diffusers: Any, steps: int) -> None:
    """SD 1.x config: steps_offset=1 and set_alpha_to_one=False (abar_{-1} = abar_0)."""
    ref = _float64_scheduler(
        diffusers.DDIMScheduler, steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    x = _x_start(5)
    expected = _diffusers_loop(ref, nonlinear_model, x)
    out = ddim_sample(nonlinear_model, sched, x, spaced_timesteps(steps, "leading", steps_offset=1))
    _check_close("DDIMScheduler", out.sample, expected)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_matches_diffusers(
    diffusers: Any, steps: int, prediction_type: str, spacing: str, model_name: str
) -> None:
    ref = _float64_scheduler(
        diffusers.EulerDiscreteScheduler, prediction_type=prediction_type, timestep_spacing=spacing
    )
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    model, x = MODELS[model_name], _x_start(6)
    expected = _euler_reference(ref, model, x)
    out = euler_sample(model, sched, x, spaced_timesteps(steps, spacing))
    assert out.timesteps.tolist() == ref.timesteps.round().long().tolist()
    _check_close("EulerDiscreteScheduler", out.sample, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_euler_sigma_min_matches_diffusers(diffusers: Any, steps: int) -> None:
    ref = _float64_scheduler(
        diffusers.EulerDiscreteScheduler, timestep_spacing="trailing", final_sigmas_type="sigma_min"
    )
    ref.set_timesteps(steps)
    sched = NoiseSchedule.from_scheduler(ref)
    x = _x_start(7)
    expected = _euler_reference(ref, nonlinear_model, x) * sched.alpha(0)  # sigma_min state -> VP at t = 0
    out = euler_sample(nonlinear_model, sched, x, spaced_timesteps(steps), final_sigmas_type="sigma_min")
    _check_close("EulerDiscreteScheduler", out.sample, expected)


def test_lightning_one_step_x0_unet_matches_diffusers_euler(diffusers: Any) -> None:
    """SDXL-Lightning's 1-step UNet: Euler trailing, prediction_type="sample" -> the model output."""
    ref = _float64_scheduler(
        diffusers.EulerDiscreteScheduler, prediction_type="sample", timestep_spacing="trailing"
    )
    ref.set_timesteps(1)
    sched = NoiseSchedule.from_scheduler(ref)
    x = _x_start(8)
    expected = _euler_reference(ref, nonlinear_model, x)
    for out in (
        euler_sample(nonlinear_model, sched, x, spaced_timesteps(1)),
        one_step_sample(nonlinear_model, sched, x, 999),
    ):
        _check_close("EulerDiscreteScheduler", out.sample, expected)
        torch.testing.assert_close(out.sample, nonlinear_model(x, torch.tensor([999, 999])), rtol=0, atol=0)


# ------------------------------------------------------------- timestep lists vs diffusers
def test_timestep_lists_match_diffusers(diffusers: Any) -> None:
    lcm, tcd = diffusers.LCMScheduler(**SD_BETAS), diffusers.TCDScheduler(**SD_BETAS)
    for strength in (1.0, 0.5, 0.3):
        for n in range(1, int(50 * strength) + 1):
            ours = lcm_timesteps(n, strength=strength).tolist()
            lcm.set_timesteps(n, strength=strength)
            tcd.set_timesteps(n, strength=strength)
            assert ours == lcm.timesteps.tolist() == tcd.timesteps.tolist()
    for orig in (4, 8, 1000):
        lcm_o = diffusers.LCMScheduler(**SD_BETAS, original_inference_steps=orig)
        for n in (1, 2, 3, 4):
            lcm_o.set_timesteps(n)
            assert lcm_timesteps(n, original_inference_steps=orig).tolist() == lcm_o.timesteps.tolist()
    for spacing in TIMESTEP_SPACINGS:
        ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
        for n in [*range(1, 65), 100, 250, 999, 1000]:
            ddim.set_timesteps(n)
            ref = ddim.timesteps.tolist()
            if spacing == "leading" and n == 1000:  # diffusers returns t = 1000, outside [0, 999]
                with pytest.raises(OptionError, match=r"Expected `steps_offset` <= 0 .* would be 1000 > 999"):
                    spaced_timesteps(n, spacing, steps_offset=1)
                continue
            ours = spaced_timesteps(n, spacing, steps_offset=1).tolist()
            if len(ref) == n:
                assert ours == ref, (spacing, n)
            else:  # diffusers' float arange gives one extra trailing -1 (e.g. n = 61)
                assert spacing == "trailing" and ref[:n] == ours and ref[n] == -1
            if spacing != "linspace":
                euler.set_timesteps(n)
                assert ours == euler.timesteps.round().long().tolist()[:n]


# ------------------------------------------------------------------- generic samplers (no oracle)
def _manual_x0_renoise(
    sched: NoiseSchedule, model: Callable[..., torch.Tensor], x: torch.Tensor, ts: list[int]
) -> torch.Tensor:
    """Reference loop: x0 = to_x0(model(x, t)), then alpha * x0 + sigma * z with generator draws."""
    gen = _gen()
    for i, t in enumerate(ts):
        x0 = sched.to_x0(model(x, torch.full((x.shape[0],), t)), x, t)
        if i == len(ts) - 1:
            return x0
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = sched.alpha(ts[i + 1]) * x0 + sched.sigma(ts[i + 1]) * z
    raise AssertionError


@pytest.mark.parametrize(
    "ts", [dmd2_timesteps(4).tolist(), tlcm_timesteps(4).tolist(), tlcm_timesteps(2).tolist(), [399]]
)
def test_x0_renoise_matches_manual_loop(ts: list[int]) -> None:
    """DMD2 [999, 749, 499, 249] / TLCM grid subsets / DMD2 one-step t = 399."""
    sched = NoiseSchedule.from_betas()
    x = _x_start(9)
    expected = _manual_x0_renoise(sched, nonlinear_model, x, ts)
    out = x0_renoise_sample(nonlinear_model, sched, x, ts, generator=_gen(), return_trajectory=True)
    torch.testing.assert_close(out.sample, expected, rtol=0, atol=1e-12)
    assert len(out.trajectory) == len(ts) + 1 and len(out.denoised) == len(ts) == len(out.noises) + 1
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.sample)


def test_one_step_epsilon_is_to_x0() -> None:
    sched = NoiseSchedule.from_betas()
    x = _x_start(10)
    out = one_step_sample(linear_model, sched, x, 399)
    expected = sched.to_x0(linear_model(x, torch.tensor([399, 399])), x, 399, "epsilon")
    torch.testing.assert_close(out.sample, expected, rtol=0, atol=0)
    assert out.timesteps.tolist() == [399] and out.noises == ()


def test_tcd_eta_zero_equals_ddim_to_each_next_then_t0() -> None:
    sched = NoiseSchedule.from_betas()
    x, ts = _x_start(11), [999, 759, 499, 259]
    tcd = tcd_sample(nonlinear_model, sched, x, ts, eta=0.0).sample
    ddim = ddim_sample(nonlinear_model, sched, x, ts, return_trajectory=True).trajectory[-2]
    # after the 3rd DDIM step we are at 259; TCD's final step then lands on t = 0.
    out = sched.ddim_step(nonlinear_model(ddim, torch.tensor([259, 259])), 259, ddim, 0)
    torch.testing.assert_close(tcd, out, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "sampler", [lcm_sample, tcd_sample, x0_renoise_sample], ids=["lcm", "tcd", "x0_renoise"]
)
def test_replay_and_generator_determinism(sampler: Callable[..., SamplerOutput]) -> None:
    sched = NoiseSchedule.from_betas()
    x, ts = _x_start(12), lcm_timesteps(4)
    first = sampler(nonlinear_model, sched, x, ts, generator=_gen(5))
    again = sampler(nonlinear_model, sched, x, ts, generator=_gen(5))
    replay = sampler(nonlinear_model, sched, x, ts, noises=first.noises)
    other = sampler(nonlinear_model, sched, x, ts, generator=_gen(6))
    assert torch.equal(first.sample, again.sample) and torch.equal(first.sample, replay.sample)
    assert not torch.equal(first.sample, other.sample)
    assert all(torch.equal(a, b) for a, b in zip(first.noises, replay.noises))
    assert sampler(nonlinear_model, sched, x, ts).sample.shape == x.shape  # generator=None


@pytest.mark.parametrize("convention", ["imagen", "lcm"])
def test_classifier_free_guidance_via_teacher_solver(convention: str) -> None:
    """cond/uncond + guidance_scale equal a model that applies the guidance formula itself."""
    sched = NoiseSchedule.from_betas()
    x, w = _x_start(13), 3.0

    def model(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return nonlinear_model(x, t) * scale

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = nonlinear_model(x, t) * 1.0, nonlinear_model(x, t) * 0.2
        return u + w * (c - u) if convention == "imagen" else c + w * (c - u)

    cond, uncond = (
        {"scale": torch.ones(1, 1, 1, 1, dtype=x.dtype)},
        {"scale": torch.full((1, 1, 1, 1), 0.2, dtype=x.dtype)},
    )
    for sampler in (lcm_sample, x0_renoise_sample):
        kwargs = {"cond": cond, "uncond": uncond, "guidance_scale": w, "guidance": convention}
        ours = sampler(model, sched, x, [999, 499], generator=_gen(), **kwargs).sample
        ref = sampler(guided, sched, x, [999, 499], generator=_gen()).sample
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # no guidance by default (no-op scale of each convention): only the conditional pass runs.
    plain = ddim_sample(model, sched, x, [999, 499], cond=cond, uncond=uncond, guidance=convention).sample
    torch.testing.assert_close(plain, ddim_sample(nonlinear_model, sched, x, [999, 499]).sample)


def test_dtype_grad_and_trajectory() -> None:
    sched = NoiseSchedule.from_betas()
    x = _x_start(14).float()
    for sampler in (lcm_sample, tcd_sample, ddim_sample, euler_sample, x0_renoise_sample):
        out = sampler(linear_model, sched, x, [999, 499, 99], return_trajectory=True)
        assert out.sample.dtype == torch.float32 and out.sample.shape == x.shape
        assert len(out.trajectory) == 4 and len(out.denoised) == 3
        assert all(s.dtype == torch.float32 for s in out.trajectory + out.denoised)
        assert sampler(linear_model, sched, x, [999, 499]).trajectory == ()
    weight = torch.tensor(0.5, requires_grad=True)

    def learnable(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return weight * x

    assert not x0_renoise_sample(learnable, sched, x, [999, 499]).sample.requires_grad
    x0_renoise_sample(learnable, sched, x, [999, 499], grad=True).sample.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)


def test_pinned_golden_values() -> None:
    """Checked without diffusers: fixed inputs (no RNG) and replayed noises."""
    sched = NoiseSchedule.from_betas()
    x = torch.linspace(-2.0, 2.0, 32, dtype=torch.float64).reshape(2, 1, 4, 4)
    zs = [torch.linspace(1.5, -1.5, 32, dtype=torch.float64).reshape(2, 1, 4, 4).roll(i) for i in range(3)]
    ts = lcm_timesteps(4)
    values = {
        "ddim": ddim_sample(nonlinear_model, sched, x, spaced_timesteps(4)).sample,
        "euler": euler_sample(nonlinear_model, sched, x, spaced_timesteps(4)).sample,
        "lcm": lcm_sample(nonlinear_model, sched, x, ts, noises=zs).sample,
        "tcd": tcd_sample(nonlinear_model, sched, x, ts, eta=0.3, noises=zs).sample,
        "x0": x0_renoise_sample(nonlinear_model, sched, x, dmd2_timesteps(), noises=zs).sample,
    }
    weights = torch.arange(32, dtype=torch.float64).reshape(x.shape)
    got = {k: round(float((v * weights).sum()), 8) for k, v in values.items()}
    assert got == pytest.approx(GOLDEN, rel=1e-9), got


# sum(sample * arange) of the runs above; DDIM and Euler agree, as they must (same ODE step).
GOLDEN = {
    "ddim": 7309.22885522,
    "euler": 7309.22885522,
    "lcm": 6761.1386777,
    "tcd": 6485.84990779,
    "x0": 6773.20073309,
}


# ------------------------------------------------------------------------- properties (hypothesis)
def _assert_valid(ts: torch.Tensor, n: int, t_count: int) -> None:
    assert ts.dtype == torch.int64 and ts.shape == (n,)
    assert int(ts.min()) >= 0 and int(ts.max()) <= t_count - 1
    assert bool((ts[1:] < ts[:-1]).all())


@settings(max_examples=40, deadline=None)
@given(
    t_count=st.integers(10, 2000),
    data=st.data(),
)
def test_lcm_timesteps_properties(t_count: int, data: st.DataObject) -> None:
    n_orig = data.draw(st.integers(1, min(t_count, 200)))
    strength = data.draw(st.floats(0.05, 1.0))
    available = int(n_orig * strength)
    if available < 1:
        with pytest.raises(OptionError, match="strength"):
            lcm_timesteps(1, num_train_timesteps=t_count, original_inference_steps=n_orig, strength=strength)
        return
    n = data.draw(st.integers(1, available))
    ts = lcm_timesteps(n, num_train_timesteps=t_count, original_inference_steps=n_orig, strength=strength)
    k = t_count // n_orig
    _assert_valid(ts, n, t_count)
    assert bool(((ts + 1) % k == 0).all())  # on the distillation grid
    assert int(ts[0]) == available * k - 1  # starts at the noisiest candidate


@settings(max_examples=40, deadline=None)
@given(
    t_count=st.integers(2, 2000),
    spacing=st.sampled_from(TIMESTEP_SPACINGS),
    offset=st.integers(0, 1),
    data=st.data(),
)
def test_spaced_timesteps_properties(t_count: int, spacing: str, offset: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, t_count))
    if spacing == "leading" and (n - 1) * (t_count // n) + offset > t_count - 1:
        with pytest.raises(OptionError, match=r"Expected `steps_offset` <= "):
            spaced_timesteps(n, spacing, num_train_timesteps=t_count, steps_offset=offset)
        return
    ts = spaced_timesteps(n, spacing, num_train_timesteps=t_count, steps_offset=offset)
    _assert_valid(ts, n, t_count)
    if spacing == "trailing" or (spacing == "linspace" and n > 1):  # linspace with n = 1 is [0]
        assert int(ts[0]) == t_count - 1


@settings(max_examples=30, deadline=None)
@given(t_count=st.integers(9, 5000), n=st.integers(1, 8))
def test_tlcm_and_dmd2_timesteps_properties(t_count: int, n: int) -> None:
    ts = tlcm_timesteps(n, num_train_timesteps=t_count)
    _assert_valid(ts, n, t_count)
    grid = {((t_count - 1) * (8 - j)) // 8 for j in range(8)}
    assert int(ts[0]) == t_count - 1 and set(ts.tolist()) <= grid
    d = dmd2_timesteps(n, num_train_timesteps=t_count)
    _assert_valid(d, n, t_count)
    assert int(d[0]) == t_count - 1


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(0, 999), min_size=1, max_size=20, unique=True),
    strength=st.floats(0.05, 1.0),
)
def test_custom_timesteps_properties(values: list[int], strength: float) -> None:
    desc = sorted(values, reverse=True)
    keep = int(len(desc) * strength)
    if keep < 1:
        with pytest.raises(OptionError, match="keeps no step"):
            custom_timesteps(desc, strength=strength)
        return
    ts = custom_timesteps(torch.tensor(desc), strength=strength)
    _assert_valid(ts, keep, 1000)
    assert ts.tolist() == desc[len(desc) - keep :]
    if len(desc) > 1:
        with pytest.raises(OptionError, match="strictly decreasing"):
            custom_timesteps(desc[::-1])


def test_known_lists() -> None:
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1).tolist() == [999]
    assert dmd2_timesteps(4).tolist() == spaced_timesteps(4).tolist() == [999, 749, 499, 249]
    assert tlcm_timesteps(8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    assert tlcm_timesteps(3).tolist() == [999, 499, 124]
    assert set(TLCM_GRID_INDICES) == set(range(1, 9))
    assert custom_timesteps([800]).tolist() == [800]


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: spaced_timesteps(4, "cosine"), OptionError, r"`spacing` to be one of"),
        (lambda: spaced_timesteps(1001), OptionError, r"num_inference_steps.*<= num_train_timesteps"),
        (lambda: spaced_timesteps(0), OptionError, r"`num_inference_steps` to be an int >= 1"),
        (lambda: lcm_timesteps(51), OptionError, r"<= original_inference_steps \(50\)"),
        (
            lambda: lcm_timesteps(4, original_inference_steps=2000),
            OptionError,
            r"original_inference_steps.*<= num_train",
        ),
        (
            lambda: lcm_timesteps(30, strength=0.5),
            OptionError,
            r"floor\(original_inference_steps \* strength\) = 25",
        ),
        (lambda: lcm_timesteps(4, strength=0.0), OptionError, r"`strength` to lie in \(0, 1\]"),
        (
            lambda: lcm_timesteps(2.5),
            DTypeError,
            r"`num_inference_steps` to be an int >= 1, but got float 2.5",
        ),
        (lambda: custom_timesteps([999, 999, 500]), OptionError, r"strictly decreasing.*\[999, 999, 500\]"),
        (lambda: custom_timesteps([259, 499]), OptionError, r"strictly decreasing"),
        (lambda: custom_timesteps([1000, 10]), OptionError, r"lie in \[0, 999\]"),
        (lambda: custom_timesteps([5, -1]), OptionError, r"lie in \[0, 999\]"),
        (lambda: custom_timesteps([]), ShapeError, r"non-empty 1-D"),
        (lambda: custom_timesteps(torch.tensor([[999, 500]])), ShapeError, r"got shape \(1, 2\)"),
        (lambda: custom_timesteps([999.5, 10.0]), OptionError, r"integral"),
        (lambda: custom_timesteps(torch.tensor([True])), DTypeError, r"integer timesteps"),
        (lambda: custom_timesteps(5), DTypeError, r"sequence of ints"),
        (lambda: custom_timesteps([999, 500], strength=0.2), OptionError, r"keeps no step"),
        (lambda: tlcm_timesteps(9), OptionError, r"one of \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        (lambda: dmd2_timesteps(0), OptionError, r"int >= 1"),
    ],
)
def test_timestep_list_errors(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_sampler_errors() -> None:
    sched = NoiseSchedule.from_betas()
    x = _x_start(15)
    with pytest.raises(
        ShapeError,
        match=r"Expected `model` to return a prediction of the shape of its input `x_t` \(2, 3, 4, 4\), but got "
        r"\(1, 3, 4, 4\)",
    ):
        ddim_sample(lambda x, t: x[:1], sched, x, [999])
    with pytest.raises(DTypeError, match=r"`x_t` to be a floating-point tensor"):
        ddim_sample(linear_model, sched, x.long(), [999])
    with pytest.raises(DTypeError, match=r"`x_t` to be a torch.Tensor"):
        ddim_sample(linear_model, sched, x.tolist(), [999])
    with pytest.raises(ShapeError, match=r"`x_t` to have a batch dimension"):
        ddim_sample(linear_model, sched, torch.tensor(1.0), [999])
    with pytest.raises(OptionError, match=r"`model` to be callable"):
        ddim_sample("unet", sched, x, [999])
    with pytest.raises(OptionError, match=r"`schedule` to be a NoiseSchedule"):
        ddim_sample(linear_model, object(), x, [999])
    with pytest.raises(OptionError, match=r"strictly decreasing"):
        lcm_sample(linear_model, sched, x, [499, 999])
    with pytest.raises(OptionError, match=r"`eta` to lie in \[0, 1\]"):
        tcd_sample(linear_model, sched, x, [999], eta=1.5)
    with pytest.raises(OptionError, match=r"`noises` to hold 2 tensor\(s\)"):
        lcm_sample(linear_model, sched, x, [999, 499, 99], noises=[torch.zeros_like(x)])
    with pytest.raises(ShapeError, match=r"`noises\[1\]` to have the shape of `x_t`"):
        x0_renoise_sample(linear_model, sched, x, [999, 499, 99], noises=[torch.zeros_like(x), x[:1]])
    with pytest.raises(OptionError, match=r"`final_sigmas_type` to be one of"):
        euler_sample(linear_model, sched, x, [999], final_sigmas_type="karras")
    with pytest.raises(OptionError, match=r"`guidance` to be one of"):
        lcm_sample(linear_model, sched, x, [999], guidance="cfg++")
    with pytest.raises(OptionError, match=r"`prediction_type` to be one of"):
        ddim_sample(linear_model, sched, x, [999], prediction_type="flow")
    with pytest.raises(OptionError, match=r"`timestep` to be an int"):
        one_step_sample(linear_model, sched, x, 999.0)


def test_a_schedule_of_a_clipping_scheduler_is_warned_about() -> None:
    """DDIMScheduler() / DDPMScheduler() default to clip_sample=True (SDXL's config sets False); the samplers here
    never clip the x0 estimate, so on such a schedule they differ from that scheduler (audit 13: 22 latent units
    apart for DDIM, silently): ddim_sample and lcm_sample warn; clip_sample=False and TCDScheduler do not."""
    import warnings

    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    from diffdistill.schedulers import NoiseSchedule, ddim_sample, lcm_sample, spaced_timesteps

    sdxl = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x_t

    clipping = NoiseSchedule.from_scheduler(DDIMScheduler(**sdxl))
    assert clipping.source_clips_x0
    with pytest.warns(
        UserWarning, match=r"ddim_sample: the schedule was built from a scheduler with clip_sample"
    ):
        ddim_sample(model, clipping, x, spaced_timesteps(2))
    thresholding = NoiseSchedule.from_scheduler(LCMScheduler(**sdxl, thresholding=True))
    with pytest.warns(UserWarning, match=r"lcm_sample: .*never clip the x0 estimate"):
        lcm_sample(model, thresholding, x, spaced_timesteps(2), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for scheduler in (DDIMScheduler(**sdxl, clip_sample=False), TCDScheduler(**sdxl, clip_sample=True)):
            schedule = NoiseSchedule.from_scheduler(scheduler)
            assert not schedule.source_clips_x0
            ddim_sample(model, schedule, x, spaced_timesteps(2))
