"""Every loss family, the teacher solver and the few-step samplers on Wan's video latents ``(B, C, F, H, W)``.

The networks are the tiny ``WanTransformer3DModel`` (tests/transformer_configs.py) in float64, on the schedule
read from Wan's ``UniPCMultistepScheduler`` (flow, shift 3, model timestep ``1000 sigma``). Independent checks:

* **folded frames**: the same call on the frames folded into the channel dim, ``(B, C*F, H, W)``, with
  networks that unfold, run the same Wan model and fold back, gives the same per-sample values. The noise and
  timesteps drawn from one generator are the same numbers in both layouts (same count, same memory order), so
  any difference comes from a reduction, broadcast or draw that treats dim 2 as spatial or leaves a dim out. The
  two paths differ only in the order of float64 sums over ``C*F*H*W <= 768`` terms: ``rtol=1e-12``
  (``768 * 2**-53 = 8.5e-14``).
* **written out**: the fake-score (CFM) loss, pseudo-Huber, R1, approximate R1, re-noising and CFG per sample
  from the flow path :math:`x_\\sigma = (1-\\sigma)x_0 + \\sigma\\epsilon`, :math:`v = \\epsilon - x_0` (Esser
  et al. 2024, Sec. 2), with the Wan model called directly.
* gradients reach the student; float64 ``gradcheck`` of the LCM loss (teacher target) and the fake-score loss in
  a bias of the network; image-only components refuse video latents with a message that says why.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffdistill.errors import OptionError, ShapeError
from diffdistill.losses import (
    DISTANCES,
    ELatentLPIPS,
    LatentAugment,
    LatentLPIPS,
    PixelLPIPS,
    approximate_r1_penalty,
    compute_distance,
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    inter_segment_consistency_loss,
    lazy_r1_penalty,
    lcm_consistency_loss,
    mix_and_match,
    multistep_consistency_loss,
    progressive_distillation_loss,
    pseudo_huber_distance,
    r1_penalty,
    renoise_for_discriminator,
    sid_loss,
    sim_loss,
    teacher_trajectory_states,
    tscd_loss,
    x0_conversion_loss,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    TeacherSolver,
    ddim_sample,
    euler_sample,
    flow_pipeline_grid,
    lcm_sample,
    one_step_sample,
    tcd_sample,
    x0_renoise_sample,
)
from tests.transformer_configs import tiny_wan_transformer

B, C, F, H, W = 2, 4, 3, 8, 8
RTOL = 1e-12  # float64 sums over <= 768 terms in another order (see the module docstring)
WAN = NoiseSchedule.from_scheduler(
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
)


def _wan(seed: int, trainable: bool = False) -> torch.nn.Module:
    return tiny_wan_transformer(seed).double().requires_grad_(trainable)


def _sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


class Folded(torch.nn.Module):
    """The Wan model on frames folded into channels: ``(B, C*F, H, W)`` in and out."""

    def __init__(self, net: torch.nn.Module, frames: int = F) -> None:
        super().__init__()
        self.net, self.frames = net, frames

    def forward(self, x, t, **cond):
        b, cf, h, w = x.shape
        out = _sample(self.net(x.reshape(b, cf // self.frames, self.frames, h, w), t, **cond))
        return out.reshape(b, cf, h, w)


def fold(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@pytest.fixture(scope="module")
def nets():
    return {"teacher": _wan(0), "student": _wan(1, trainable=True), "fake": _wan(2, trainable=True)}


def _data(seed: int = 0, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, C, F, H, W, generator=g, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.zeros(1, 5, 16, dtype=torch.float64)}
    return x0, cond, uncond


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both(nets, names=("teacher", "student", "fake")):
    """(video nets, folded nets) by name."""
    return {n: nets[n] for n in names}, {n: Folded(nets[n]) for n in names}


# ----------------------------------------------------------------------------------------- consistency
CONSISTENCY = {
    "lcm": lambda s, te, x0, c, u: lcm_consistency_loss(
        s, te, x0, c, u, num_ddim_timesteps=50, generator=_gen()
    ),
    "lcm_teacher_target": lambda s, te, x0, c, u: lcm_consistency_loss(
        s, te, x0, c, u, target="teacher", distance="mse", num_ddim_timesteps=50, generator=_gen()
    ),
    "lcm_per_video_guidance": lambda s, te, x0, c, u: lcm_consistency_loss(
        s, te, x0, c, u, guidance_scale=torch.tensor([2.0, 6.0]), num_ddim_timesteps=50, generator=_gen()
    ),
    "tscd": lambda s, te, x0, c, u: tscd_loss(s, te, x0, c, u, num_segments=2, generator=_gen()),
    "multistep": lambda s, te, x0, c, u: multistep_consistency_loss(
        s, te, x0, c, u, num_segments=4, skip=50, generator=_gen()
    ),
    "inter_segment": lambda s, te, x0, c, u: inter_segment_consistency_loss(
        s, te, x0, c, u, num_segments=4, teacher_steps=2, generator=_gen()
    ),
    "progressive": lambda s, te, x0, c, u: progressive_distillation_loss(
        s, te, x0, c, u, num_student_steps=2, teacher_steps=2, generator=_gen()
    ),
}


@pytest.mark.parametrize("name", sorted(CONSISTENCY))
def test_consistency_losses_video_equal_folded(nets, name):
    x0, cond, uncond = _data()
    video, flat = _both(nets, ("teacher", "student"))
    loss5, info5 = CONSISTENCY[name](
        video["student"], TeacherSolver(video["teacher"], WAN, guidance_scale=3.0), x0, cond, uncond
    )
    loss4, info4 = CONSISTENCY[name](
        flat["student"], TeacherSolver(flat["teacher"], WAN, guidance_scale=3.0), fold(x0), cond, uncond
    )
    assert loss5.ndim == 0 and torch.isfinite(loss5) and float(loss5.detach()) > 0
    torch.testing.assert_close(loss5, loss4, rtol=RTOL, atol=0)
    for key, value in info5.items():  # per-sample entries and timesteps agree too
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            torch.testing.assert_close(value, info4[key], rtol=RTOL, atol=0)


def test_teacher_trajectory_states_video_equal_folded(nets):
    _, cond, uncond = _data()
    noise = torch.randn(B, C, F, H, W, generator=_gen(2), dtype=torch.float64)
    t = torch.tensor([999, 400])
    video, flat = _both(nets, ("teacher",))
    s5 = teacher_trajectory_states(
        TeacherSolver(video["teacher"], WAN, guidance_scale=3.0), noise, t, cond, uncond, num_segments=4
    )
    s4 = teacher_trajectory_states(
        TeacherSolver(flat["teacher"], WAN, guidance_scale=3.0), fold(noise), t, cond, uncond, num_segments=4
    )
    assert s5.shape == noise.shape
    torch.testing.assert_close(fold(s5), s4, rtol=RTOL, atol=1e-13)


def test_x0_conversion_video_equal_folded(nets):
    x0, cond, _ = _data()
    t = torch.tensor([700, 150])
    x_t = WAN.add_noise(x0, torch.randn_like(x0), t)
    video, flat = _both(nets, ("teacher", "student"))
    loss5, _ = x0_conversion_loss(video["student"], video["teacher"], x_t, t, cond, schedule=WAN)
    loss4, _ = x0_conversion_loss(flat["student"], flat["teacher"], fold(x_t), t, cond, schedule=WAN)
    torch.testing.assert_close(loss5, loss4, rtol=RTOL, atol=0)


def test_consistency_loss_gradients_reach_the_student(nets):
    x0, cond, uncond = _data()
    student = nets["student"]
    student.zero_grad(set_to_none=True)
    loss, _ = lcm_consistency_loss(
        student, TeacherSolver(nets["teacher"], WAN, guidance_scale=3.0), x0, cond, uncond, generator=_gen()
    )
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert nets["teacher"].proj_out.weight.grad is None
    student.zero_grad(set_to_none=True)


def test_lcm_teacher_target_gradcheck_in_student_bias(nets):
    """float64 gradcheck of a consistency loss on video latents, in the student's output bias (the teacher
    target makes the loss a plain function of the student; the online target stops gradients on purpose)."""
    x0, cond, uncond = _data(batch=1)
    x0 = x0[:, :, :2, :4, :4].contiguous()  # (1, 4, 2, 4, 4)
    student = _wan(1)
    teacher = TeacherSolver(nets["teacher"], WAN, guidance_scale=3.0)
    names = dict(student.named_parameters())

    def loss_of(bias):
        def call(x, t, **c):
            params = {**names, "proj_out.bias": bias}
            return torch.func.functional_call(student, params, (x, t), c)

        loss, _ = lcm_consistency_loss(
            call, teacher, x0, cond, uncond, target="teacher", distance="mse", generator=_gen()
        )
        return loss

    bias = student.proj_out.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (bias,), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------- score family
def _score_call(name, x, real, fake, cond, uncond):
    common = {"schedule": WAN, "cond": cond, "reduction": "none", "generator": _gen()}
    if name == "fake_score":
        return fake_score_loss(fake, x, weighting="flow", **common)
    if name == "sim_weighted":  # a per-sample weight of t, broadcast over (C, F, H, W)
        real = TeacherSolver(real, WAN, guidance_scale=3.0)
        return sim_loss(
            x, real, fake, uncond=uncond, fake_cond=cond, weight=lambda t: 1 + t / 1000.0, **common
        )
    real = TeacherSolver(real, WAN, guidance_scale=3.0)
    fn = {"dmd": dmd_loss, "sid": sid_loss, "sim": sim_loss}[name]
    return fn(x, real, fake, uncond=uncond, fake_cond=cond, **common)


@pytest.mark.parametrize("name", ["dmd", "sid", "sim", "sim_weighted", "fake_score"])
def test_score_losses_video_equal_folded(nets, name):
    x0, cond, uncond = _data()
    video, flat = _both(nets, ("teacher", "fake"))
    x5 = x0.clone().requires_grad_(True)
    x4 = fold(x0).clone().requires_grad_(True)
    per5, _ = _score_call(name, x5, video["teacher"], video["fake"], cond, uncond)
    per4, _ = _score_call(name, x4, flat["teacher"], flat["fake"], cond, uncond)
    assert per5.shape == (B,) and torch.isfinite(per5).all()
    torch.testing.assert_close(per5, per4, rtol=RTOL, atol=0)
    if name != "fake_score":  # the generator gradient, per element, agrees as well
        (g5,) = torch.autograd.grad(per5.sum(), x5)
        (g4,) = torch.autograd.grad(per4.sum(), x4)
        assert g5.abs().sum() > 0
        torch.testing.assert_close(fold(g5), g4, rtol=1e-10, atol=1e-14)


def test_fake_score_loss_written_out(nets):
    """CFM (weight 1): per sample mean over C, F, H, W of (v_fake(x_t, 1000 sigma) - (eps - x0))^2."""
    x0, cond, _ = _data()
    t = torch.tensor([900, 40])
    noise = torch.randn(x0.shape, generator=_gen(5), dtype=torch.float64)
    per, _ = fake_score_loss(
        nets["fake"], x0, schedule=WAN, weighting="flow", cond=cond, t=t, noise=noise, reduction="none"
    )
    sigma = WAN.sigma(t).view(-1, 1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    v = _sample(nets["fake"](x_t, (WAN.sigma(t) * 1000).float(), **cond))
    expected = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(per, expected.detach(), rtol=RTOL, atol=0)


def test_fake_score_loss_gradcheck_in_fake_bias(nets):
    x0, cond, _ = _data(batch=1)
    x0 = x0[:, :, :2, :4, :4].contiguous()
    fake = _wan(2)
    names = dict(fake.named_parameters())

    def loss_of(bias):
        def call(x, t, **c):
            return torch.func.functional_call(fake, {**names, "proj_out.bias": bias}, (x, t), c)

        loss, _ = fake_score_loss(call, x0, schedule=WAN, weighting="flow", cond=cond, generator=_gen())
        return loss

    bias = fake.proj_out.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (bias,), eps=1e-6, atol=1e-8)


def test_dmd_generator_gradient_reaches_the_student_through_one_step_sampling(nets):
    _, cond, uncond = _data()
    student, fake = nets["student"], nets["fake"]
    student.zero_grad(set_to_none=True)
    fake.zero_grad(set_to_none=True)
    z = torch.randn(B, C, F, H, W, generator=_gen(9), dtype=torch.float64)
    x = one_step_sample(student, WAN, z, 624, cond=cond, grad=True).sample  # SiD's start sigma (toy recipe)
    loss, _ = dmd_loss(
        x,
        TeacherSolver(nets["teacher"], WAN, guidance_scale=3.0),
        fake,
        schedule=WAN,
        cond=cond,
        uncond=uncond,
        generator=_gen(),
    )
    loss.backward()
    assert float(student.proj_out.weight.grad.abs().sum()) > 0
    assert fake.proj_out.weight.grad is None  # the fake score is read, not trained, by the generator loss
    student.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- distances
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_distances_video_equal_folded(distance):
    x, _, _ = _data(1)
    y, _, _ = _data(2)
    d5 = compute_distance(x, y, distance, reduction="none")
    d4 = compute_distance(fold(x), fold(y), distance, reduction="none")
    assert d5.shape == (B,)
    torch.testing.assert_close(d5, d4, rtol=RTOL, atol=0)


def test_pseudo_huber_per_sample_norm_written_out():
    x, _, _ = _data(1)
    y, _, _ = _data(2)
    c = 0.3
    d = pseudo_huber_distance(x, y, c, per_sample_norm=True, reduction="none")
    expected = torch.sqrt(((x - y) ** 2).sum(dim=(1, 2, 3, 4)) + c**2) - c
    torch.testing.assert_close(d, expected, rtol=RTOL, atol=0)


# ----------------------------------------------------------------------------------------- adversarial
def test_gan_losses_on_video_patch_logits_equal_folded():
    g = _gen(4)
    real = torch.randn(B, 1, F, 4, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(B, 1, F, 4, 4, generator=g, dtype=torch.float64)
    pooled = torch.randn(B, generator=g, dtype=torch.float64)
    for kind in ("non_saturating", "hinge", "least_squares"):
        d5, _ = gan_discriminator_loss([real, pooled], [fake, -pooled], loss=kind, reduction="none")
        d4, _ = gan_discriminator_loss(
            [fold(real), pooled], [fold(fake), -pooled], loss=kind, reduction="none"
        )
        torch.testing.assert_close(d5, d4, rtol=RTOL, atol=0)
        g5, _ = gan_generator_loss(fake, loss=kind, reduction="none")
        g4, _ = gan_generator_loss(fold(fake), loss=kind, reduction="none")
        torch.testing.assert_close(g5, g4, rtol=RTOL, atol=0)
        assert d5.shape == g5.shape == (B,)
    nsat, _ = gan_generator_loss(fake, reduction="none")
    torch.testing.assert_close(
        nsat, torch.nn.functional.softplus(-fake).mean(dim=(1, 2, 3, 4)), rtol=RTOL, atol=0
    )


def _wan_discriminator(net):
    """A Wan-backbone critic: one logit per latent element (the model output), on video latents."""

    def disc(x, **cond):
        t = torch.full((x.shape[0],), 500.0, dtype=torch.float32)
        return _sample(net(x, t, **cond))

    return disc


def test_r1_penalties_written_out_on_video(nets):
    x0, cond, _ = _data()
    disc = _wan_discriminator(nets["fake"])
    x = x0.clone().requires_grad_(True)
    logits = disc(x, **cond)
    r1, _ = r1_penalty(logits, x, gamma=2.0, reduction="none")
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    torch.testing.assert_close(r1, (grad**2).sum(dim=(1, 2, 3, 4)), rtol=RTOL, atol=0)  # gamma/2 * |grad D|^2

    sigma = 0.01
    eps = torch.randn(x0.shape, generator=_gen(6), dtype=torch.float64)
    base, pert = disc(x0, **cond), disc(x0 + sigma * eps, **cond)
    approx, _ = approximate_r1_penalty(base, pert, sigma=sigma, gamma=2.0, reduction="none")
    expected = (pert.flatten(1).sum(1) - base.flatten(1).sum(1)) ** 2 / sigma**2
    torch.testing.assert_close(approx, expected, rtol=1e-9, atol=0)

    lazy, info = lazy_r1_penalty(disc, x0, step=0, every=4, gamma=2.0, num_samples=None, cond=cond)
    # lazy regularisation scales the penalty by `every` (StyleGAN2): mean over the batch of R1 * every
    torch.testing.assert_close(lazy.detach(), 4 * r1.detach().mean(), rtol=1e-10, atol=0)
    assert float(info["r1_active"]) == 1.0


def test_renoise_and_mix_and_match_on_video():
    x0, cond, _ = _data()
    student_x0 = torch.randn(x0.shape, generator=_gen(7), dtype=torch.float64)
    out = renoise_for_discriminator(x0, student_x0, schedule=WAN, generator=_gen())
    flat = renoise_for_discriminator(fold(x0), fold(student_x0), schedule=WAN, generator=_gen())
    assert torch.equal(out.t, flat.t)
    for clean, noised, noise, noised4 in zip((x0, student_x0), out.samples, out.noise, flat.samples):
        sigma = WAN.sigma(out.t).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(noised, (1 - sigma) * clean + sigma * noise, rtol=RTOL, atol=0)
        assert torch.equal(fold(noised), noised4)
    mixed = mix_and_match(x0, cond, torch.randn_like(x0), generator=_gen())
    assert torch.equal(mixed.latents, x0[mixed.permutation])
    assert torch.equal(mixed.cond["encoder_hidden_states"], cond["encoder_hidden_states"])


# ----------------------------------------------------------------------------------------- solver, samplers
def test_teacher_cfg_on_video_written_out(nets):
    x0, cond, uncond = _data()
    t = torch.tensor([999, 300])
    x_t = WAN.add_noise(x0, torch.randn_like(x0), t)
    solver = TeacherSolver(nets["teacher"], WAN, guidance_scale=5.0)  # Wan's CFG 5.0
    guided = solver.predict(x_t, t, cond, uncond)
    model_t = (WAN.sigma(t) * 1000).float()
    c = _sample(nets["teacher"](x_t, model_t, **cond))
    u = _sample(
        nets["teacher"](x_t, model_t, encoder_hidden_states=uncond["encoder_hidden_states"].expand(B, -1, -1))
    )
    torch.testing.assert_close(guided, u + 5.0 * (c - u), rtol=1e-10, atol=1e-12)
    to = torch.tensor([500, -1])
    solved = solver.solve(x_t, t, to, cond, uncond, num_steps=2)
    flat = TeacherSolver(Folded(nets["teacher"]), WAN, guidance_scale=5.0).solve(
        fold(x_t), t, to, cond, uncond, 2
    )
    torch.testing.assert_close(fold(solved), flat, rtol=RTOL, atol=1e-13)
    per_sample_w = torch.tensor([1.0, 4.0], dtype=torch.float64)  # one scale per video
    mixed = solver.predict(x_t, t, cond, uncond, guidance_scale=per_sample_w)
    torch.testing.assert_close(mixed[1], (u + 4.0 * (c - u))[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mixed[0], c[0], rtol=1e-10, atol=1e-12)


SAMPLERS = {
    "ddim": lambda m, x, grid, c, u: ddim_sample(m, WAN, x, grid, cond=c, uncond=u, guidance_scale=2.0),
    "euler": lambda m, x, grid, c, u: euler_sample(m, WAN, x, grid, cond=c, uncond=u, guidance_scale=2.0),
    "x0_renoise": lambda m, x, grid, c, u: x0_renoise_sample(m, WAN, x, grid, cond=c, generator=_gen()),
    "lcm": lambda m, x, grid, c, u: lcm_sample(m, WAN, x, [999, 749, 499, 249], cond=c, generator=_gen()),
    "tcd": lambda m, x, grid, c, u: tcd_sample(m, WAN, x, [999, 499], cond=c, generator=_gen()),
    "one_step": lambda m, x, grid, c, u: one_step_sample(m, WAN, x, 999, cond=c),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_video_equal_folded(nets, name):
    _, cond, uncond = _data()
    z = torch.randn(B, C, F, H, W, generator=_gen(8), dtype=torch.float64)
    grid = flow_pipeline_grid(WAN, 3)  # Wan's UniPC grid, walked with this sampler's steps
    out5 = SAMPLERS[name](nets["student"], z, grid, cond, uncond)
    out4 = SAMPLERS[name](Folded(nets["student"]), fold(z), grid, cond, uncond)
    assert out5.sample.shape == z.shape and torch.isfinite(out5.sample).all()
    assert not out5.sample.requires_grad
    torch.testing.assert_close(fold(out5.sample), out4.sample, rtol=RTOL, atol=1e-13)


# ----------------------------------------------------------------------------------------- bad inputs
def test_image_only_components_refuse_video_latents():
    video = torch.zeros(1, 4, 2, 8, 8)
    with pytest.warns(UserWarning):
        lpips = LatentLPIPS()
    with pytest.raises(
        ShapeError, match=r"5-D video latents of shape \(1, 4, 2, 8, 8\).*LatentLPIPS.*image-only"
    ):
        lpips(video, video)
    with pytest.warns(UserWarning):
        elpips = ELatentLPIPS()
    with pytest.raises(ShapeError, match=r"`input` to be image latents \(B, C, H, W\).*image VAE's latents"):
        elpips(video, video)
    with pytest.raises(ShapeError, match=r"`tensors\[0\]` to be image latents \(N, C, H, W\).*LatentAugment"):
        LatentAugment("bg")(video)
    pixel = PixelLPIPS.__new__(PixelLPIPS)  # the 5-D check runs before the decoder or LPIPS are touched
    torch.nn.Module.__init__(pixel)
    with pytest.raises(ShapeError, match=r"video latents.*PixelLPIPS"):
        PixelLPIPS.forward(pixel, video, video)


def test_video_shape_messages(nets):
    x0, cond, uncond = _data()
    with pytest.raises(ShapeError, match=r"\(2, 4, 3, 8, 8\)"):
        fake_score_loss(
            nets["fake"], x0, schedule=WAN, cond=cond, noise=torch.zeros(2, 4, 8, 8, dtype=x0.dtype)
        )
    with pytest.raises(ShapeError, match=r"video latents \(B, C, F, H, W\)"):
        TeacherSolver(nets["teacher"], WAN).predict(torch.tensor(1.0, dtype=torch.float64), 5)
    with pytest.raises(ShapeError, match=r"guidance_scale"):
        lcm_consistency_loss(
            nets["student"],
            TeacherSolver(nets["teacher"], WAN),
            x0,
            cond,
            uncond,
            guidance_scale=torch.ones(3, dtype=torch.float64),
            generator=_gen(),
        )
    with pytest.raises(OptionError, match=r"flow"):
        fake_score_loss(nets["fake"], x0, schedule=WAN, cond=cond, prediction_type="epsilon_typo")
