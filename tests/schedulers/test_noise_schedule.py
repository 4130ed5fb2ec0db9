"""NoiseSchedule and the DDIM move against diffusers (oracle) and independent derivations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.schedulers import PREDICTION_TYPES, NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def fake_model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """diffusers' network-free test model, plus a nonlinearity so errors cannot cancel."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * t / (t + 1) + 0.1 * torch.sin(3 * x)


def _double(scheduler):  # diffusers keeps its tables in float32; compare at float64 precision
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if isinstance(getattr(scheduler, "final_alpha_cumprod", None), torch.Tensor):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


@pytest.mark.parametrize(
    "kwargs",
    [
        SD_BETAS,
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_alphas_cumprod_match_diffusers(kwargs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **kwargs).alphas_cumprod.double()
    ours = NoiseSchedule.from_betas(**kwargs).alphas_cumprod
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def test_from_scheduler_reads_config():
    d = diffusers.DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", set_alpha_to_one=False)
    s = NoiseSchedule.from_scheduler(d)
    assert s.prediction_type == "v_prediction"
    assert s.final_alpha_cumprod == pytest.approx(float(d.alphas_cumprod[0]))
    assert (
        NoiseSchedule.from_scheduler(diffusers.EulerDiscreteScheduler(**SD_BETAS)).final_alpha_cumprod == 1.0
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 10])
@pytest.mark.parametrize(
    "spacing,set_alpha_to_one", [("leading", False), ("trailing", True), ("linspace", True)]
)
def test_ddim_step_matches_ddim_scheduler(prediction_type, num_steps, spacing, set_alpha_to_one):
    d = diffusers.DDIMScheduler(
        **SD_BETAS,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1 if spacing == "leading" else 0,
        timestep_spacing=spacing,
    )
    _double(d)
    s = NoiseSchedule.from_scheduler(d)
    d.set_timesteps(num_steps)
    x = torch.linspace(-2, 2, 2 * 4 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4, 4)
    for t in d.timesteps:
        out = fake_model(x, t)
        ref = d.step(out, t, x, eta=0.0).prev_sample
        t_prev = int(t) - d.config.num_train_timesteps // d.num_inference_steps
        ours = s.ddim_step(out, int(t), x, max(t_prev, -1))
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
        x = ref


def test_ddim_step_per_sample_timesteps_and_exactness():
    s = NoiseSchedule.from_betas()
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    t, t_to = torch.tensor([999, 500, 20]), torch.tensor([0, 250, -1])
    x_t = s.add_noise(x0, eps, t)
    # Exact model output => the move lands exactly on the forward process at t_to (x0 itself at -1).
    expected = torch.where((t_to == -1).view(-1, 1, 1, 1), x0, s.add_noise(x0, eps, t_to.clamp(min=0)))
    for pt in ("epsilon", "sample", "v_prediction", "score"):
        out = s.convert(eps, x_t, t, "epsilon", pt)
        torch.testing.assert_close(s.ddim_step(out, t, x_t, t_to, pt), expected, atol=1e-10, rtol=0)


def test_ddim_step_allow_same_is_identity():
    s = NoiseSchedule.from_betas()
    x, out = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([700, 3])
    for pt in ("epsilon", "sample", "v_prediction"):
        torch.testing.assert_close(s.ddim_step(out, t, x, t, pt, allow_same=True), x, atol=1e-9, rtol=0)
    with pytest.raises(OptionError, match=r"\(t_to <= t; the DDIM move goes towards the data\)"):
        s.ddim_step(out, t, x, t + 1, allow_same=True)


def test_add_noise_matches_diffusers():
    d = _double(diffusers.DDPMScheduler(**SD_BETAS))
    s = NoiseSchedule.from_scheduler(d)
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(s.add_noise(x0, eps, t), d.add_noise(x0, eps, t), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        s.convert(eps, s.add_noise(x0, eps, t), t, "epsilon", "v_prediction"),
        d.get_velocity(x0, eps, t),
        atol=1e-12,
        rtol=0,
    )


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(0, 999),
    from_type=st.sampled_from(PREDICTION_TYPES),
    to_type=st.sampled_from(PREDICTION_TYPES),
    seed=st.integers(0, 2**16),
)
def test_conversions_round_trip(t, from_type, to_type, seed):
    s = NoiseSchedule.from_betas()
    g = torch.Generator().manual_seed(seed)
    x_t, out = (
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    there = s.convert(out, x_t, t, from_type, to_type)
    back = s.convert(there, x_t, t, to_type, from_type)
    torch.testing.assert_close(back, out, atol=1e-9, rtol=1e-9)
    # Every parameterisation implies the same clean sample.
    torch.testing.assert_close(
        s.to_x0(there, x_t, t, to_type), s.to_x0(out, x_t, t, from_type), atol=1e-8, rtol=1e-8
    )


def test_score_definition():
    s = NoiseSchedule.from_betas()
    x0, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([100, 900])
    x_t = s.add_noise(x0, eps, t)
    a, sig = s.alpha(t).view(-1, 1, 1, 1), s.sigma(t).view(-1, 1, 1, 1)
    # score of q(x_t | x0) = (alpha x0 - x_t) / sigma^2 = -eps / sigma
    torch.testing.assert_close(
        s.convert(x0, x_t, t, "sample", "score"), (a * x0 - x_t) / sig**2, atol=1e-10, rtol=1e-10
    )


def test_terminal_pure_noise():
    s = NoiseSchedule.from_betas(terminal_pure_noise=True)
    plain = NoiseSchedule.from_betas()
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([999, 998, 0])
    out = s.add_noise(x0, eps, t)
    assert torch.equal(out[0], eps[0])
    torch.testing.assert_close(out[1:], plain.add_noise(x0, eps, t)[1:])
    # Conversions keep the original abar at T-1 (Lightning Eq. 24 applies to the input only).
    torch.testing.assert_close(s.to_x0(eps, out, t), plain.to_x0(eps, out, t))


@pytest.mark.parametrize("scheduler_class", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_zero_terminal_snr_scheduler_keeps_its_rescaled_table(scheduler_class):
    """diffusers' ``rescale_betas_zero_snr=True`` (Lin et al. 2024) rescales every beta so that abar_T = 0: the
    schedule must be that table (last entry clamped to 2**-24 as diffusers' Euler does, last step pure noise), not
    the one before rescaling, whose noise levels differ at every t (alpha_900: 0.054 vs 0.119)."""
    kw = dict(SD_BETAS, prediction_type="v_prediction")
    cls = getattr(diffusers, scheduler_class)
    zsnr = cls(rescale_betas_zero_snr=True, **kw)
    s = NoiseSchedule.from_scheduler(zsnr)
    ref = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, **kw).alphas_cumprod.double()
    assert float(ref[-1]) == 0.0 and s.terminal_pure_noise and s.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod[:-1], ref[:-1], atol=1e-7, rtol=0)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(2.0**-24, rel=1e-6)
    before = NoiseSchedule.from_scheduler(cls(**kw))
    assert float(s.alpha(900)) < 0.06 < float(before.alpha(900))  # the rescaled levels, not the original ones
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.equal(s.add_noise(x0, eps, torch.tensor([999, 999])), eps)
    with pytest.raises(
        OptionError, match=r"zero-terminal-SNR table .* terminal_pure_noise=False contradicts it"
    ):
        NoiseSchedule.from_scheduler(zsnr, terminal_pure_noise=False)
    with pytest.raises(OptionError, match=r"clamp_min\(2\*\*-24\).* not the schedule before rescaling"):
        NoiseSchedule(ref)


def test_edm_sigma_matches_euler_and_inverts():
    e = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    s = NoiseSchedule.from_scheduler(e)
    ts = torch.arange(1000)
    torch.testing.assert_close(s.edm_sigma(ts).float(), e.sigmas[:-1].flip(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(s.edm_sigma_to_timestep(s.edm_sigma(ts)), ts)
    torch.testing.assert_close(
        s.edm_sigma_to_timestep(s.edm_sigma(ts), mode="interpolate"), ts.double(), atol=1e-6, rtol=0
    )
    mid = (s.edm_sigma(400).log() + s.edm_sigma(401).log()) / 2
    assert float(s.edm_sigma_to_timestep(mid.exp(), mode="interpolate")) == pytest.approx(400.5, abs=1e-9)


def test_snr_and_alpha_sigma():
    s = NoiseSchedule.from_betas()
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(s.snr(t), s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t]))
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(3, dtype=torch.float64))
    assert float(s.alpha(-1)) == 1.0 and float(s.sigma(-1)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_follows_input(dtype):
    s = NoiseSchedule.from_betas()
    x0, eps = torch.randn(2, 4, 4, 4).to(dtype), torch.randn(2, 4, 4, 4).to(dtype)
    x_t = s.add_noise(x0, eps, 500)
    assert x_t.dtype == dtype
    assert s.ddim_step(eps, 500, x_t, 250).dtype == dtype
    assert NoiseSchedule.from_betas(compute_dtype=None).add_noise(x0, eps, 500).dtype == dtype
    for bad in (torch.int64, "float32"):
        with pytest.raises(DTypeError, match=r"Expected `compute_dtype` to be a floating torch.dtype"):
            NoiseSchedule.from_betas(compute_dtype=bad)


def test_ddim_step_gradcheck():
    s = NoiseSchedule.from_betas()
    out = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    for pt in ("epsilon", "sample", "v_prediction"):
        assert torch.autograd.gradcheck(
            lambda o, x, pt=pt: s.ddim_step(o, torch.tensor([700, 300]), x, torch.tensor([100, -1]), pt),
            (out, x),
        )


def test_ddim_step_compiles_fullgraph():
    s = NoiseSchedule.from_betas()
    fn = torch.compile(lambda o, x, t, t_to: s.ddim_step(o, t, x, t_to), fullgraph=True, backend="eager")
    o, x = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t, t_to = torch.tensor([999, 500]), torch.tensor([500, 100])
    torch.testing.assert_close(fn(o, x, t, t_to), s.ddim_step(o, t, x, t_to))


def test_errors():
    s = NoiseSchedule.from_betas()
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(
        OptionError, match=r"Expected `t` to lie in \[-1, 999\].*but got values in \[0, 1000\]"
    ):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(
        OptionError,
        match=r"Expected every `t_to` to be earlier than `t`.*t=\[500, 500\] and t_to=\[100, 500\]",
    ):
        s.ddim_step(x, torch.tensor([500, 500]), x, torch.tensor([100, 500]))
    with pytest.raises(OptionError, match=r"integral timestep indices.*fractional values \(e.g. 10.5\)"):
        s.add_noise(x, x, torch.tensor([10.5, 3.0]))
    with pytest.raises(
        ShapeError,
        match=r"`model_output` and `x_t` to have the same shape, but got model_output \(2, 4, 4\) and x_t \(2, 4, 4, 4\)",
    ):
        s.ddim_step(x[:, 0], 500, x, 100)
    with pytest.raises(ShapeError, match=r"one timestep per sample \(2\), but got 3 timesteps"):
        s.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match=r"Expected `x0` and `noise` to have the same shape"):
        s.add_noise(x, x[:1], 3)
    with pytest.raises(
        OptionError,
        match=r"Expected `prediction_type` to be one of \['epsilon', 'sample', 'v_prediction', 'score'\], but got 'eps'",
    ):
        s.to_x0(x, x, 3, "eps")
    with pytest.raises(OptionError, match=r"Expected `beta_schedule` to be one of"):
        NoiseSchedule.from_betas(beta_schedule="cosine")
    with pytest.raises(OptionError, match=r"Expected every value of `alphas_cumprod` to lie in \(0, 1\]"):
        NoiseSchedule(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(OptionError, match=r"non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(DTypeError, match=r"`alphas_cumprod` attribute.*but object has none"):
        NoiseSchedule.from_scheduler(object())
    with pytest.raises(DTypeError, match=r"Expected `x0` to be a floating-point tensor"):
        s.add_noise(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(DTypeError, match=r"Expected `t` to hold integer timesteps, but got dtype torch.bool"):
        s.add_noise(x, x, torch.tensor([True, False]))
