"""TeacherSolver on rectified-flow teachers (issue 21 part 2): the network's timestep input, Euler = DDIM solves
with classifier-free guidance in both conventions, and guidance-distilled teachers (FLUX.1-dev's embedded scale)
with a tiny ``FluxTransformer2DModel``.

Every expected value is derived independently of the solver: sigmas from the shift formula of Esser et al. 2024
(Sec. 5.3.2), Euler steps written out, guidance written out, the FLUX call made by hand on packed latents.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diffdistill.errors import DTypeError, OptionError
from diffdistill.schedulers import NoiseSchedule, TeacherSolver
from tests.transformer_configs import tiny_flux_transformer_config


def _sd3_sigma(t: torch.Tensor, shift: float = 3.0, total: int = 1000) -> torch.Tensor:
    """sigma_t = shift(u) with u = (t + 1) / T (float32 as diffusers' table), independent of the library."""
    u = (t + 1).to(torch.float32) / total
    return (shift * u / (1 + (shift - 1) * u)).double()


class RecordingVelocity:
    """A conditional velocity model v = tanh(x) * scale + 1e-3 * t, recording the timesteps it is called with."""

    def __init__(self) -> None:
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(t)
        return torch.tanh(x) * scale + 1e-3 * t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _conds(batch: int) -> tuple[dict, dict]:
    return (
        {"scale": torch.full((batch, 1, 1, 1), 0.8, dtype=torch.float64)},
        {"scale": torch.full((1, 1, 1, 1), 0.1, dtype=torch.float64)},
    )


# ------------------------------------------------------------------------------------------ timestep input
def test_vp_model_still_gets_the_integer_index():
    model = RecordingVelocity()
    TeacherSolver(model, NoiseSchedule.from_betas()).predict(
        torch.zeros(2, 1, 1, 1), torch.tensor([999, 3]), *_conds(2)[:1]
    )
    (t,) = model.timesteps
    assert t.dtype == torch.int64 and t.tolist() == [999, 3]


def test_flow_model_gets_sigma_times_1000_and_flux_sigma():
    t = torch.tensor([999, 499, 0])
    model = RecordingVelocity()
    TeacherSolver(model, NoiseSchedule.flow_matching(shift=3.0)).predict(
        torch.zeros(3, 1, 1, 1), t, {"scale": torch.ones(1, 1, 1, 1)}
    )
    got = model.timesteps[-1]
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, (_sd3_sigma(t) * 1000).float(), atol=0, rtol=0
    )  # SD3: 1000 sigma, float32
    assert got.tolist()[:2] == [1000.0, 750.0]
    for sched in (
        NoiseSchedule.flow_matching(shift=3.0),
        NoiseSchedule.flow_matching(mu=0.7, timestep_scale=1.0),
    ):
        every = torch.arange(-1, 1000)
        assert torch.equal(TeacherSolver(model, sched).model_timestep(every), sched.model_timestep(every))
    flux = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
    TeacherSolver(model, flux).predict(torch.zeros(3, 1, 1, 1), t, {"scale": torch.ones(1, 1, 1, 1)})
    torch.testing.assert_close(model.timesteps[-1].double(), flux.sigma(t), atol=1e-7, rtol=0)  # FLUX: sigma
    # the cond + uncond batch repeats the same timesteps
    solver = TeacherSolver(model, NoiseSchedule.flow_matching(shift=3.0), guidance_scale=4.0)
    solver.predict(torch.zeros(3, 1, 1, 1), t, *_conds(3))
    torch.testing.assert_close(model.timesteps[-1], (_sd3_sigma(t.repeat(2)) * 1000).float(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ CFG Euler solves
@pytest.mark.parametrize("guidance", ["imagen", "lcm"])
@pytest.mark.parametrize("num_steps", [1, 4])
def test_flow_solve_is_guided_euler(guidance, num_steps):
    sched = NoiseSchedule.flow_matching(shift=3.0)
    model = RecordingVelocity()
    w = torch.tensor([3.0, 7.0])
    solver = TeacherSolver(model, sched, guidance_scale=w, guidance=guidance)
    x = torch.linspace(-1.5, 1.5, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    t, t_to = torch.tensor([999, 700]), torch.tensor([600, -1])
    got = solver.solve(x, t, t_to, *_conds(2), num_steps=num_steps)

    y = x
    for i in range(num_steps):
        ti = t - (i * (t - t_to)) // num_steps
        tn = t - ((i + 1) * (t - t_to)) // num_steps
        tin = (_sd3_sigma(ti) * 1000).float().double().view(-1, 1, 1, 1)
        c = torch.tanh(y) * 0.8 + 1e-3 * tin
        u = torch.tanh(y) * 0.1 + 1e-3 * tin
        ww = w.double().view(-1, 1, 1, 1)
        v = u + ww * (c - u) if guidance == "imagen" else c + ww * (c - u)
        s_next = torch.where(tn >= 0, _sd3_sigma(tn.clamp(min=0)), torch.zeros(2, dtype=torch.float64))
        y = y + (s_next - _sd3_sigma(ti)).view(-1, 1, 1, 1) * v  # Euler on dx/dsigma = v
    torch.testing.assert_close(got, y, atol=1e-12, rtol=0)


def test_one_euler_step_of_the_exact_velocity_lands_on_a_point_mass():
    """For data = one point x0, v(x, sigma) = (x - x0) / sigma exactly and the path is straight: any solve lands."""
    sched = NoiseSchedule.flow_matching(shift=3.0)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    oracle = TeacherSolver(lambda x, t: (x - x0) / (t.double() / 1000).view(-1, 1, 1, 1), sched)
    x = sched.add_noise(x0, torch.randn_like(x0), torch.tensor([999, 400]))
    for steps in (1, 3):
        torch.testing.assert_close(
            oracle.solve(x, torch.tensor([999, 400]), -1, num_steps=steps), x0, atol=1e-5, rtol=0
        )
    mid = oracle.solve(x, torch.tensor([999, 400]), torch.tensor([500, 100]), num_steps=2)
    # the state at t_to is on the same straight line: (1 - s) x0 + s eps with the same eps
    eps = (x - (1 - sched.sigma(torch.tensor([999, 400]), x)) * x0) / sched.sigma(torch.tensor([999, 400]), x)
    torch.testing.assert_close(mid, sched.add_noise(x0, eps, torch.tensor([500, 100])), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ FLUX.1-dev (tiny)
diffusers = pytest.importorskip("diffusers")


class PackedFlux(torch.nn.Module):
    """(B, C, H, W) latents in and out of a FluxTransformer2DModel: FLUX's 2x2 packing, img_ids (0, row, col) and
    zero txt_ids (reference/flow.md §3, ``FluxPipeline._pack_latents`` / ``_prepare_latent_image_ids``)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.calls = 0

    def forward(self, x, t, encoder_hidden_states, pooled_projections, guidance=None):
        self.calls += 1
        b, c, h, w = x.shape
        packed = (
            x.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // 2) * (w // 2), c * 4)
        )
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        out = self.transformer(
            hidden_states=packed,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=t,
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.fixture(scope="module")
def flux_dev():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_transformer_config())
    return PackedFlux(model.requires_grad_(False).eval())


def _flux_cond(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }


def test_packing_wrapper_round_trips():
    x = torch.randn(2, 4, 6, 8)
    identity = PackedFlux(lambda hidden_states, **_: (hidden_states,))
    torch.testing.assert_close(identity(x, None, torch.zeros(2, 5, 16), None), x, atol=0, rtol=0)


def test_guidance_distilled_teacher_is_one_pass_with_the_scale_as_input(flux_dev):
    sched = NoiseSchedule.flow_matching(
        mu=1.15, timestep_scale=1.0
    )  # FLUX: the transformer multiplies by 1000
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    cond = _flux_cond(2)
    t = torch.tensor([999, 600])
    solver = TeacherSolver(flux_dev, sched, guidance_scale=3.5, guidance_input="guidance")
    flux_dev.calls = 0
    got = solver.predict(x, t, cond)
    assert flux_dev.calls == 1  # no unconditional pass
    # by hand, as FluxPipeline: timestep = sigma (float32), guidance = full([B], 3.5, float32)
    ref = flux_dev(x, sched.sigma(t).float(), **cond, guidance=torch.full((2,), 3.5))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # the scale reaches the model (guidance embedding), and the LCM convention's w is Imagen's w - 1
    other = solver.predict(x, t, cond, guidance_scale=1.0)
    assert (other - got).abs().max() > 1e-4
    lcm = TeacherSolver(flux_dev, sched, guidance_scale=2.5, guidance="lcm", guidance_input="guidance")
    torch.testing.assert_close(lcm.predict(x, t, cond), got, atol=0, rtol=0)
    # one scale per sample equals per-sample calls
    per = solver.predict(x, t, cond, guidance_scale=torch.tensor([2.0, 5.0]))
    for i, w in enumerate((2.0, 5.0)):
        one = flux_dev(
            x[i : i + 1],
            sched.sigma(t[i : i + 1]).float(),
            **{k: v[i : i + 1] for k, v in cond.items()},
            guidance=torch.full((1,), w),
        )
        torch.testing.assert_close(per[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_guidance_distilled_solve_is_euler_with_one_call_per_step(flux_dev):
    sched = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = _flux_cond(1, seed=3)
    solver = TeacherSolver(flux_dev, sched, guidance_scale=3.5, guidance_input="guidance")
    flux_dev.calls = 0
    got = solver.solve(x, 999, -1, cond, num_steps=4)
    assert flux_dev.calls == 4
    y = x.double()
    steps = [999, 749, 499, 249, -1]
    for a, b in itertools.pairwise(steps):
        v = flux_dev(
            y.float(), sched.sigma(torch.tensor([a])).float(), **cond, guidance=torch.full((1,), 3.5)
        )
        s_b = 0.0 if b < 0 else float(sched.sigma(b))
        y = (y + (s_b - float(sched.sigma(a))) * v.double()).float().double()
    torch.testing.assert_close(got.double(), y, atol=1e-5, rtol=1e-5)
    assert got.dtype == torch.float32


def test_guidance_distilled_bad_inputs(flux_dev):
    sched = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
    x, cond = torch.zeros(2, 4, 4, 4), _flux_cond(2)
    solver = TeacherSolver(flux_dev, sched, guidance_input="guidance")
    with pytest.raises(
        OptionError, match=r"Expected a `guidance_scale` for the guidance-distilled model .*FLUX\.1-dev: 3\.5"
    ):
        solver.predict(x, 999, cond)
    with pytest.raises(OptionError, match=r"has no unconditional pass, but got `uncond`\. Drop `uncond`"):
        solver.predict(x, 999, cond, cond, guidance_scale=3.5)
    with pytest.raises(OptionError, match=r"`cond` already holds 'guidance', which the solver passes itself"):
        solver.predict(x, 999, {**cond, "guidance": torch.ones(2)}, guidance_scale=3.5)
    with pytest.raises(
        DTypeError, match=r"Expected `guidance_input` to be a model keyword \(str.*but got int"
    ):
        TeacherSolver(flux_dev, sched, guidance_input=3)
    with pytest.raises(
        OptionError, match=r"Expected `guidance_input` to be a model keyword name .* but got 'guid ance'"
    ):
        TeacherSolver(flux_dev, sched, guidance_input="guid ance")
    with pytest.raises(OptionError, match=r"Expected `guidance` to be one of \['imagen', 'lcm'\]"):
        TeacherSolver(flux_dev, sched, guidance="embedded", guidance_input="guidance")


def test_bare_flux_or_qwen_transformer_needs_timestep_scale_one():
    """FLUX / Qwen-Image transformers take sigma and multiply by 1000 inside: a TeacherSolver around the bare
    module on a 1000-sigma schedule is refused (audit 10, note); the class is read over the unwrapped module's
    MRO (FSDP2's FSDP<Name> subclass); wrappers and other classes are left alone."""

    class FluxTransformer2DModel(torch.nn.Module):
        def forward(self, x, t):
            return x

    class FSDPQwenImageTransformer2DModel(type("QwenImageTransformer2DModel", (torch.nn.Module,), {})):
        def forward(self, x, t):
            return x

    sd3_scale = NoiseSchedule.flow_matching(mu=1.15)  # timestep_scale 1000
    flux_scale = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)
    for model, name in (
        (FluxTransformer2DModel(), "FluxTransformer2DModel"),
        (FSDPQwenImageTransformer2DModel(), "QwenImageTransformer2DModel"),
    ):
        with pytest.raises(
            OptionError,
            match=rf"`model` is a {name}, which takes sigma.*timestep_scale=1000\.0.*timestep_scale=1\.0",
        ):
            TeacherSolver(model, sd3_scale)
        with pytest.raises(OptionError, match="takes sigma"):
            TeacherSolver(torch.nn.DataParallel(model), sd3_scale)
        TeacherSolver(model, flux_scale)  # the right scale
        TeacherSolver(lambda x, t, m=model: m(x, t / 1000), sd3_scale)  # a wrapper may rescale itself
    TeacherSolver(torch.nn.Identity(), sd3_scale)
