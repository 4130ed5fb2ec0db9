"""Tests of diffdistill.losses.adversarial: GAN objectives, R1, lazy R1, mix-and-match, re-noising."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdistill._checks import DTypeError, OptionError, ShapeError
from diffdistill.losses.adversarial import (
    GANLoss,
    approximate_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    mix_and_match,
    r1_penalty,
    random_derangement,
    renoise_for_discriminator,
)
from diffdistill.schedulers import NoiseSchedule

KINDS = ("non_saturating", "hinge", "least_squares")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ analytic values
def test_non_saturating_matches_log_sigmoid_form() -> None:
    g = _gen()
    r, f = (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 3, generator=g, dtype=torch.float64),
    )
    d, logs = gan_discriminator_loss(r, f)
    expected = (-torch.log(torch.sigmoid(r))).mean() - torch.log(1 - torch.sigmoid(f)).mean()
    torch.testing.assert_close(d, expected)
    gl, glogs = gan_generator_loss(f)
    torch.testing.assert_close(gl, (-torch.log(torch.sigmoid(f))).mean())
    assert d.dtype == torch.float64
    torch.testing.assert_close(logs["d_real"], r.mean().float())
    torch.testing.assert_close(logs["d_fake"], f.mean().float())
    torch.testing.assert_close(logs["d_loss"], d.float())
    torch.testing.assert_close(glogs["g_loss"], gl.float())


def test_known_values_at_zero_logits() -> None:
    zero = torch.zeros(4)
    assert math.isclose(gan_discriminator_loss(zero, zero)[0].item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(gan_generator_loss(zero)[0].item(), math.log(2), rel_tol=1e-6)
    assert gan_discriminator_loss(zero, zero, loss="hinge")[0].item() == 2.0
    assert gan_discriminator_loss(zero, zero, loss="least_squares")[0].item() == 0.5
    assert gan_generator_loss(zero, loss="least_squares")[0].item() == 0.5


def test_hinge_values() -> None:
    r = torch.tensor([2.0, 0.5, -1.0])
    f = torch.tensor([-2.0, 0.0, 1.5])
    d, _ = gan_discriminator_loss(r, f, loss="hinge")
    # relu(1 - r) = [0, 0.5, 2] -> 2.5/3 ; relu(1 + f) = [0, 1, 2.5] -> 3.5/3
    assert math.isclose(d.item(), 6.0 / 3, rel_tol=1e-6)
    g_lin, _ = gan_generator_loss(f, loss="hinge")
    g_relu, _ = gan_generator_loss(f, loss="hinge", hinge_generator="relu")
    assert math.isclose(g_lin.item(), -f.mean().item(), rel_tol=1e-6)
    assert math.isclose(g_relu.item(), (3.0 + 1.0 + 0.0) / 3, rel_tol=1e-6)


def test_least_squares_values() -> None:
    r, f = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    d, _ = gan_discriminator_loss(r, f, loss="least_squares")
    assert math.isclose(d.item(), 0.5 * (0 + 4) / 2 + 0.5 * (0 + 4) / 2, rel_tol=1e-6)
    g, _ = gan_generator_loss(f, loss="least_squares")
    assert math.isclose(g.item(), 0.5 * (1 + 9) / 2, rel_tol=1e-6)


def test_hinge_generator_option_ignored_for_other_losses() -> None:
    f = torch.randn(5)
    a = gan_generator_loss(f, hinge_generator="relu")[0]
    b = gan_generator_loss(f, hinge_generator="linear")[0]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ reductions, heads
@pytest.mark.parametrize("kind", KINDS)
def test_reductions(kind: str) -> None:
    g = _gen(1)
    r, f = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    none, _ = gan_discriminator_loss(r, f, loss=kind, reduction="none")
    mean, _ = gan_discriminator_loss(r, f, loss=kind)
    total, _ = gan_discriminator_loss(r, f, loss=kind, reduction="sum")
    assert none.shape == (4,)
    torch.testing.assert_close(none.mean(), mean)
    torch.testing.assert_close(none.sum(), total)
    g_none, _ = gan_generator_loss(f, loss=kind, reduction="none")
    assert g_none.shape == (4,)
    torch.testing.assert_close(g_none.sum(), gan_generator_loss(f, loss=kind, reduction="sum")[0])


def test_different_real_and_fake_batch_sizes() -> None:
    r, f = torch.randn(2), torch.randn(6)
    d, _ = gan_discriminator_loss(r, f)
    torch.testing.assert_close(d, F.softplus(-r).mean() + F.softplus(f).mean())
    s, _ = gan_discriminator_loss(r, f, reduction="sum")
    torch.testing.assert_close(s, F.softplus(-r).sum() + F.softplus(f).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_multi_head_weighting(kind: str) -> None:
    g = _gen(2)
    real = [torch.randn(3, 1, generator=g), torch.randn(3, 4, 4, generator=g), torch.randn(3, generator=g)]
    fake = [torch.randn(3, 1, generator=g), torch.randn(3, 4, 4, generator=g), torch.randn(3, generator=g)]
    weights = (1.0, 2.0, 5.0)
    d, logs = gan_discriminator_loss(real, fake, loss=kind, head_weights=weights)
    per_head = [gan_discriminator_loss(r, f, loss=kind)[0] for r, f in zip(real, fake)]
    expected = sum(w * v for w, v in zip(weights, per_head)) / sum(weights)
    torch.testing.assert_close(d, expected)
    # Only relative weights matter; None means uniform.
    torch.testing.assert_close(gan_discriminator_loss(real, fake, loss=kind, head_weights=(2, 4, 10))[0], d)
    uniform = gan_discriminator_loss(real, fake, loss=kind)[0]
    torch.testing.assert_close(uniform, sum(per_head) / 3)
    expected_real_logit = sum(w * r.mean() for w, r in zip(weights, real)) / sum(weights)
    torch.testing.assert_close(logs["d_real"], expected_real_logit)
    gl, _ = gan_generator_loss(tuple(fake), loss=kind, head_weights=weights)
    g_heads = [gan_generator_loss(f, loss=kind)[0] for f in fake]
    torch.testing.assert_close(gl, sum(w * v for w, v in zip(weights, g_heads)) / sum(weights))


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", KINDS)
def test_discriminator_gradient_pushes_real_up_and_fake_down(kind: str) -> None:
    r = torch.full((5,), 0.3, requires_grad=True)
    f = torch.full((5,), 0.2, requires_grad=True)  # least squares pulls fakes to 0, so start above it
    d, _ = gan_discriminator_loss(r, f, loss=kind)
    d.backward()
    assert bool((r.grad < 0).all())  # gradient descent raises real logits
    assert bool((f.grad > 0).all())  # and lowers fake logits


@pytest.mark.parametrize(("kind", "variant"), [(k, "linear") for k in KINDS] + [("hinge", "relu")])
def test_generator_gradient_pushes_fake_up(kind: str, variant: str) -> None:
    f = torch.full((5,), -0.2, requires_grad=True)
    gan_generator_loss(f, loss=kind, hinge_generator=variant)[0].backward()
    assert bool((f.grad < 0).all())


def test_generator_loss_trains_generator_not_frozen_discriminator() -> None:
    disc = torch.nn.Linear(3, 1)
    gen_param = torch.randn(4, 3, requires_grad=True)
    disc.requires_grad_(False)
    loss, _ = gan_generator_loss(disc(gen_param))
    loss.backward()
    assert gen_param.grad is not None and bool(gen_param.grad.abs().sum() > 0)
    assert disc.weight.grad is None


def test_discriminator_loss_on_detached_fakes_gives_no_generator_gradient() -> None:
    disc = torch.nn.Linear(3, 1)
    fake = torch.randn(4, 3, requires_grad=True)
    real = torch.randn(4, 3)
    loss, _ = gan_discriminator_loss(disc(real), disc(fake.detach()))
    loss.backward()
    assert fake.grad is None
    assert disc.weight.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind: str) -> None:
    g = _gen(3)
    # Keep hinge logits away from the kinks at +-1.
    r = (torch.rand(3, 2, generator=g, dtype=torch.float64) * 0.8 - 0.4).requires_grad_(True)
    f = (torch.rand(3, 2, generator=g, dtype=torch.float64) * 0.8 - 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: gan_discriminator_loss(a, b, loss=kind)[0], (r, f))
    assert torch.autograd.gradcheck(
        lambda a: gan_generator_loss(a, loss=kind, hinge_generator="relu", reduction="none")[0], (f,)
    )


# ------------------------------------------------------------------------------------ dtypes, compile
@pytest.mark.parametrize("kind", KINDS)
def test_half_logits_compute_in_float32(kind: str) -> None:
    r, f = torch.randn(4, 2).bfloat16(), torch.randn(4, 2).half()
    d, logs = gan_discriminator_loss(r, f, loss=kind)
    assert d.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    torch.testing.assert_close(d, gan_discriminator_loss(r.float(), f.float(), loss=kind)[0])


def test_bf16_autocast_gives_finite_float32() -> None:
    disc = torch.nn.Linear(8, 1)
    x_real, x_fake = torch.randn(4, 8) * 50, torch.randn(4, 8) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lr, lf = disc(x_real), disc(x_fake)
        assert lr.dtype == torch.bfloat16
        d, _ = gan_discriminator_loss(lr, lf)
        gl, _ = gan_generator_loss(lf)
    for value in (d, gl):
        assert value.dtype == torch.float32 and bool(torch.isfinite(value))


@pytest.mark.compile
def test_compile_fullgraph() -> None:
    crit = GANLoss("hinge", hinge_generator="relu", head_weights=(1.0, 3.0))

    def step(r0: torch.Tensor, r1: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        d, d_logs = crit.discriminator_loss([r0, r1], [f0, f1])
        g, _ = gan_generator_loss([f0, f1], loss="non_saturating", head_weights=(1.0, 3.0))
        lsq, _ = gan_discriminator_loss(r0, f0, loss="least_squares", reduction="none")
        return d + g + lsq.sum() + d_logs["d_real"]

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    g = _gen(4)
    args = (torch.randn(2, 1, generator=g), torch.randn(2, 3, 3, generator=g)) * 2
    torch.testing.assert_close(compiled(*args), step(*args))


def test_module_matches_functional() -> None:
    g = _gen(5)
    r, f = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    crit = GANLoss("least_squares", reduction="sum")
    assert torch.equal(crit(f, r)[0], gan_discriminator_loss(r, f, loss="least_squares", reduction="sum")[0])
    assert torch.equal(crit(f)[0], gan_generator_loss(f, loss="least_squares", reduction="sum")[0])
    assert "least_squares" in repr(crit)


# ------------------------------------------------------------------------------------ R1
def test_r1_linear_discriminator_closed_form() -> None:
    w = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    penalty, logs = r1_penalty(x @ w, x, gamma=0.5, reduction="none")
    torch.testing.assert_close(penalty, torch.full((6,), 0.25 * 9.0, dtype=torch.float64))
    torch.testing.assert_close(logs["r1_grad_sq"], torch.tensor(9.0))
    penalty.mean().backward()
    torch.testing.assert_close(w.grad, 0.5 * w.detach())  # R1 trains the discriminator


def test_r1_matches_finite_differences_for_nonlinear_discriminator() -> None:
    g = _gen(6)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)

    def disc(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight).sum(dim=1)

    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    penalty, _ = r1_penalty(disc(x), x, reduction="none")
    h = 1e-6
    fd_sq = torch.zeros(3, dtype=torch.float64)
    base = x.detach()
    for j in range(4):
        step = torch.zeros_like(base)
        step[:, j] = h
        grad_j = (disc(base + step) - disc(base - step)) / (2 * h)
        fd_sq += grad_j**2
    torch.testing.assert_close(penalty, 0.5 * fd_sq, rtol=1e-6, atol=1e-8)


def test_r1_penalty_requires_the_graph_from_inputs() -> None:
    g = _gen(6)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    other = x.detach().clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"do not depend on `inputs` \(entry 0\)"):
        r1_penalty(torch.tanh(x @ weight), other)


def test_r1_multi_head_and_multiple_inputs() -> None:
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    x = torch.randn(4, 2, requires_grad=True)
    y = torch.randn(4, 2, requires_grad=True)
    heads = [(x @ w1).unsqueeze(1), (x @ w2 + y @ w1).unsqueeze(1).expand(4, 2)]
    # grad_x of (1/4 * h0 + 3/4 * sum h1) = w1/4 + 3/4 * 2 * w2 ; grad_y = 3/4 * 2 * w1
    penalty, _ = r1_penalty(heads, [x, y], gamma=2.0, head_weights=(1, 3), reduction="none")
    gx = w1 / 4 + 1.5 * w2
    gy = 1.5 * w1
    expected = gx.square().sum() + gy.square().sum()
    torch.testing.assert_close(penalty, expected.expand(4))


def test_r1_gradcheck_through_discriminator_weights() -> None:
    g = _gen(7)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def penalty_of(w: torch.Tensor) -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        return r1_penalty(torch.tanh(xr @ w), xr, gamma=0.7)[0]

    assert torch.autograd.gradcheck(penalty_of, (weight,))


def test_r1_bf16_discriminator_gives_float32() -> None:
    disc = torch.nn.Linear(6, 1)
    x = torch.randn(3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = disc(x)
    penalty, _ = r1_penalty(logits, x)
    assert penalty.dtype == torch.float32 and bool(torch.isfinite(penalty))


# ------------------------------------------------------------------------------------ lazy R1
class _CountingLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1, bias=False)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.lin(x)


def test_lazy_r1_off_schedule_is_zero_and_skips_discriminator() -> None:
    disc = _CountingLinear()
    loss, logs = lazy_r1_penalty(disc, torch.randn(4, 3), step=5, every=4)
    assert loss.item() == 0.0 and logs["r1_active"].item() == 0.0 and logs["r1"].item() == 0.0
    assert disc.calls == []


def test_lazy_r1_on_schedule_is_k_times_single_sample_r1() -> None:
    disc = _CountingLinear()
    real = torch.randn(8, 3)
    for k in (1, 4, 16):
        loss, logs = lazy_r1_penalty(disc, real, step=2 * k, every=k, gamma=0.3)
        closed_form = 0.5 * 0.3 * disc.lin.weight.detach().square().sum()
        torch.testing.assert_close(loss.detach(), k * closed_form)
        assert logs["r1_active"].item() == 1.0
    assert disc.calls == [1, 1, 1]  # one sample each time
    loss.backward()
    torch.testing.assert_close(disc.lin.weight.grad, 16 * 0.3 * disc.lin.weight.detach())
    assert real.grad is None


def test_lazy_r1_subset_cond_indexing_and_replay() -> None:
    seen: list[torch.Tensor] = []

    def disc(
        x: torch.Tensor, *, label: torch.Tensor, extra: dict, shared: torch.Tensor
    ) -> list[torch.Tensor]:
        assert torch.equal(x.detach(), label)  # cond is indexed with the same subset
        assert shared.shape == (1, 2) and extra["n"] == 7
        seen.append(label)
        return [x.sum(dim=1), (2 * x).sum(dim=1, keepdim=True)]

    real = torch.arange(12.0).reshape(6, 2)
    cond = {"label": real.clone(), "extra": {"n": 7}, "shared": torch.zeros(1, 2)}
    loss, logs = lazy_r1_penalty(disc, real, step=0, num_samples=3, cond=cond, generator=_gen(8), every=2)
    # heads weighted 1/2 each: grad = (1 + 2) / 2 per coordinate -> ||g||^2 = 2 * 1.5^2 = 4.5
    torch.testing.assert_close(logs["r1_grad_sq"], torch.tensor(4.5))
    torch.testing.assert_close(loss, torch.tensor(2 * 0.5 * 4.5))
    lazy_r1_penalty(disc, real, step=0, num_samples=3, cond=cond, generator=_gen(8))
    assert torch.equal(seen[0], seen[1]) and seen[0].shape == (3, 2)
    expected_rows = torch.randperm(6, generator=_gen(8))[:3]
    assert torch.equal(seen[0], real[expected_rows])
    lazy_r1_penalty(disc, real, step=0, num_samples=None, cond=cond)
    assert seen[-1].shape == (6, 2)
    lazy_r1_penalty(disc, real, step=0, num_samples=50, cond=cond)
    assert seen[-1].shape == (6, 2)  # clipped to the batch


def test_lazy_r1_tensor_cond_and_model_output() -> None:
    class Out:
        def __init__(self, sample: torch.Tensor) -> None:
            self.sample = sample

    def disc(x: torch.Tensor, c: torch.Tensor) -> Out:
        return Out((x * c).sum(dim=1))

    real, c = torch.randn(4, 2), torch.full((4, 2), 2.0)
    loss, _ = lazy_r1_penalty(disc, real, step=3, every=3, cond=c, generator=_gen(0))
    torch.testing.assert_close(loss, torch.tensor(3 * 0.5 * 8.0))


# ------------------------------------------------------------------------------------ approximated R1
def test_approximate_r1_of_a_linear_discriminator_is_r1_in_expectation() -> None:
    # Linear heads: D(x + s e) - D(x) = s grad.e exactly, so the penalty is gamma/2 (grad.e)^2 per draw, and
    # its mean over e ~ N(0, I) is exact R1 (computed independently, by autograd in r1_penalty).
    g = _gen(11)
    w1, w2 = (
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(3, 2, generator=g, dtype=torch.float64),
    )

    def heads(x: torch.Tensor) -> list[torch.Tensor]:
        return [x @ w1, x @ w2]

    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    sigma, n = 0.3, 100_000
    eps = torch.randn(n, 4, 3, generator=g, dtype=torch.float64)
    xs, es = x.expand(n, 4, 3).reshape(-1, 3), eps.reshape(-1, 3)
    approx, logs = approximate_r1_penalty(
        heads(xs), heads(xs + sigma * es), sigma=sigma, gamma=0.8, head_weights=(1, 3), reduction="none"
    )
    grad = w1 / 4 + 0.75 * w2.sum(dim=1)  # gradient of the head-weighted sum of each sample's logits
    torch.testing.assert_close(approx, 0.4 * (es @ grad) ** 2)  # per draw, for any sigma
    xg = x.clone().requires_grad_(True)
    exact, _ = r1_penalty(heads(xg), xg, gamma=0.8, head_weights=(1, 3))
    # Monte Carlo: relative standard error sqrt(2 / 400000) = 0.22%
    torch.testing.assert_close(approx.mean(), exact.detach(), rtol=0.01, atol=0.0)
    torch.testing.assert_close(logs["r1_grad_sq"], approx.mean().float() / 0.4)


def test_approximate_r1_tends_to_the_directional_derivative_as_sigma_shrinks() -> None:
    g = _gen(12)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)

    def disc(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight).sum(dim=1)

    x, eps = (
        torch.randn(8, 5, generator=g, dtype=torch.float64),
        torch.randn(8, 5, generator=g, dtype=torch.float64),
    )
    _, jvp = torch.func.jvp(disc, (x,), (eps,))  # grad D(x) . eps, per sample
    errors = []
    for sigma in (1e-2, 1e-3, 1e-4):
        approx, _ = approximate_r1_penalty(
            disc(x), disc(x + sigma * eps), sigma=sigma, gamma=2.0, reduction="none"
        )
        errors.append(float((approx - jvp**2).abs().max() / (jvp**2).abs().max()))
    assert errors[-1] < 1e-3
    assert 5 < errors[0] / errors[1] < 20 and 5 < errors[1] / errors[2] < 20  # first order in sigma, per draw


def test_approximate_r1_gradcheck_through_discriminator_weights() -> None:
    g = _gen(13)
    x, eps = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    weight = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def penalty_of(w: torch.Tensor) -> torch.Tensor:
        real, perturbed = torch.tanh(x @ w), torch.tanh((x + 0.05 * eps) @ w)
        return approximate_r1_penalty(real, perturbed, sigma=0.05, gamma=0.7)[0]

    assert torch.autograd.gradcheck(penalty_of, (weight,))


class _NoDoubleBackward(torch.autograd.Function):
    """x -> x^2 whose backward is not differentiable again (like the fused attention kernels)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 2 * x * grad


def test_lazy_approximate_r1_runs_the_subset_twice_without_double_backward() -> None:
    lin = torch.nn.Linear(3, 1)
    calls: list[torch.Tensor] = []

    def disc(x: torch.Tensor, *, c: torch.Tensor) -> torch.Tensor:
        calls.append(x.detach().clone())
        return lin(_NoDoubleBackward.apply(x) + c).squeeze(1)

    real, c = torch.randn(6, 3, generator=_gen(14)), torch.randn(6, 3, generator=_gen(15))
    loss, logs = lazy_r1_penalty(
        disc, real, step=8, every=4, gamma=0.5, num_samples=2, cond={"c": c}, generator=_gen(16),
        approximate_sigma=0.1,
    )  # fmt: skip
    gen = _gen(16)
    index = torch.randperm(6, generator=gen)[:2]
    eps = torch.randn(2, 3, generator=gen)
    assert len(calls) == 2 and torch.equal(calls[0], real[index])
    torch.testing.assert_close(calls[1], real[index] + 0.1 * eps)
    with torch.no_grad():
        d = lin((real[index] + 0.1 * eps) ** 2 + c[index]) - lin(real[index] ** 2 + c[index])
    torch.testing.assert_close(loss.detach(), 4 * (0.5 * 0.5 / 0.01 * d.square()).mean())
    assert float(logs["r1_active"]) == 1.0
    loss.backward()  # first-order only: trains D through both calls
    assert lin.weight.grad is not None and bool(lin.weight.grad.abs().sum() > 0)
    with pytest.raises(RuntimeError, match=r"once_differentiable|double backward|not supported"):
        lazy_r1_penalty(disc, real, step=0, cond={"c": c})[0].backward()  # exact R1 needs a double backward


def test_lazy_approximate_r1_replays_the_discriminators_randomness() -> None:
    # Dropout in D: both calls must draw the same mask, else (D(x') - D(x))^2 / sigma^2 measures the masks'
    # difference, ~1e7 here, instead of the gradient: E (2 (w * mask) . eps)^2 = 4 |w * mask|^2 <= 100.
    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        disc[1].weight.copy_(torch.tensor([[1.0, 2.0, -2.0, 4.0]]))
    real = torch.randn(8, 4, generator=_gen(17))
    for step in range(5):
        _, logs = lazy_r1_penalty(
            disc,
            real,
            step=0,
            every=1,
            gamma=2.0,
            num_samples=None,
            generator=_gen(step),
            approximate_sigma=1e-3,
        )
        assert float(logs["r1_grad_sq"]) < 1e3, float(logs["r1_grad_sq"])


def test_approximate_r1_bf16_logits_and_errors() -> None:
    disc = torch.nn.Linear(6, 2)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real, perturbed = disc(x), disc(x + 0.1)
    penalty, _ = approximate_r1_penalty(real, perturbed, sigma=0.1)
    assert penalty.dtype == torch.float32 and bool(torch.isfinite(penalty))
    with pytest.raises(OptionError, match=r"`sigma` to be > 0, but got 0.0"):
        approximate_r1_penalty(real, perturbed, sigma=0.0)
    with pytest.raises(OptionError, match=r"`gamma` to be >= 0"):
        approximate_r1_penalty(real, perturbed, sigma=0.1, gamma=-1.0)
    with pytest.raises(ShapeError, match=r"one head per head of `real_logits` \(2\), but got 1"):
        approximate_r1_penalty([real, real], [perturbed], sigma=0.1)
    with pytest.raises(
        ShapeError, match=r"head 0 of `perturbed_logits` to have the shape of `real_logits`' \(3, 2\)"
    ):
        approximate_r1_penalty(real, perturbed[:2], sigma=0.1)
    with pytest.raises(OptionError, match=r"`approximate_sigma` to be > 0, but got -1.0"):
        lazy_r1_penalty(disc, x, step=0, approximate_sigma=-1.0)


# ------------------------------------------------------------------------------------ derangement / mix
@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=2, max_value=64), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_random_derangement_has_no_fixed_points(n: int, seed: int) -> None:
    perm = random_derangement(n, generator=_gen(seed))
    assert perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(n))
    assert bool((perm != torch.arange(n)).all())


def test_random_derangement_partner_distribution_is_uniform() -> None:
    g = _gen(9)
    counts = torch.zeros(4, 4)
    for _ in range(600):
        perm = random_derangement(4, generator=g)
        counts[torch.arange(4), perm] += 1
    assert bool((counts.diagonal() == 0).all())
    off = counts[~torch.eye(4, dtype=torch.bool)]
    assert bool((off > 150).all()) and bool((off < 250).all())  # ~200 each


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(min_value=2, max_value=12), seed=st.integers(min_value=0, max_value=10_000))
def test_mix_and_match_pairs_every_sample_with_another(batch: int, seed: int) -> None:
    ids = torch.arange(batch, dtype=torch.float32)
    latents, noise = ids.reshape(batch, 1, 1).expand(batch, 2, 2), ids.reshape(batch, 1) + 100
    cond = {"emb": ids.reshape(batch, 1), "added": {"time_ids": ids.reshape(batch, 1) * 10}}
    out = mix_and_match(latents, cond, noise, generator=_gen(seed))
    src = out.latents[:, 0, 0]
    assert bool((src != ids).all())
    assert torch.equal(src, ids[out.permutation])
    assert out.cond is cond and out.noise is noise
    c_out = mix_and_match(latents, cond, noise, mismatch="cond", generator=_gen(seed))
    assert c_out.latents is latents and c_out.noise is noise
    assert bool((c_out.cond["emb"][:, 0] != ids).all())
    assert torch.equal(c_out.cond["added"]["time_ids"][:, 0], ids[c_out.permutation] * 10)
    n_out = mix_and_match(latents, cond, noise, mismatch="noise", generator=_gen(seed))
    assert bool((n_out.noise[:, 0] - 100 != ids).all()) and n_out.cond is cond
    assert torch.equal(out.permutation, c_out.permutation)  # same generator seed -> same draw


def test_mix_and_match_keeps_shared_conditions() -> None:
    shared, text = torch.ones(1, 5), torch.arange(3.0).reshape(3, 1)
    cond = {"null": shared, "scale": 7.5, "text": text}
    out = mix_and_match(torch.randn(3, 2), cond, mismatch="cond", generator=_gen(0))
    assert out.cond["null"] is shared and out.cond["scale"] == 7.5
    assert torch.equal(out.cond["text"], text[out.permutation])


def test_mix_and_match_errors() -> None:
    with pytest.raises(ShapeError, match=r"at least 2 samples.*got shape \(1, 4\)"):
        mix_and_match(torch.randn(1, 4))
    with pytest.raises(ShapeError, match=r"`noise` to have batch size 3"):
        mix_and_match(torch.randn(3, 4), noise=torch.randn(2, 4))
    with pytest.raises(ShapeError, match=r"`cond\['emb'\]` to have batch size 3 \(or 1"):
        mix_and_match(torch.randn(3, 4), {"emb": torch.randn(6, 4)})
    with pytest.raises(OptionError, match="mismatch='cond' permutes the conditions, but `cond` is None"):
        mix_and_match(torch.randn(3, 4), mismatch="cond")
    with pytest.raises(OptionError, match="mismatch='noise' permutes the noise, but `noise` is None"):
        mix_and_match(torch.randn(3, 4), mismatch="noise")
    with pytest.raises(OptionError, match=r"`mismatch` to be one of \['all', 'cond', 'noise'\]"):
        mix_and_match(torch.randn(3, 4), mismatch="text")
    with pytest.raises(DTypeError, match=r"`latents` to be a torch\.Tensor"):
        mix_and_match([1, 2])  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`n` to be an int >= 2 .*got 1"):
        random_derangement(1)


# ------------------------------------------------------------------------------------ re-noising
def test_renoise_same_t_independent_noise() -> None:
    sched = NoiseSchedule.from_betas()
    x0, x0_hat = torch.randn(64, 4, 2, 2), torch.randn(64, 4, 2, 2)
    out = renoise_for_discriminator(x0, x0_hat, schedule=sched, generator=_gen(10))
    assert out.t.shape == (64,) and out.t.dtype == torch.int64
    assert set(out.t.tolist()) == {10, 250, 500, 750}
    for x, eps, noisy in zip((x0, x0_hat), out.noise, out.samples):
        torch.testing.assert_close(noisy, sched.add_noise(x, eps, out.t))  # same t for both inputs
    assert not torch.equal(out.noise[0], out.noise[1])
    corr = torch.corrcoef(torch.stack([out.noise[0].flatten(), out.noise[1].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.1  # independent draws
    again = renoise_for_discriminator(x0, x0_hat, schedule=sched, generator=_gen(10))
    assert torch.equal(again.t, out.t) and torch.equal(again.samples[1], out.samples[1])


def test_renoise_weights_explicit_t_and_dtype() -> None:
    sched = NoiseSchedule.from_betas(terminal_pure_noise=True)
    x = torch.randn(2000, 1).bfloat16()
    out = renoise_for_discriminator(x, schedule=sched, weights=(5, 1, 1, 1), generator=_gen(11))
    assert 0.58 < (out.t == 10).float().mean().item() < 0.67
    assert out.samples[0].dtype == torch.bfloat16 and len(out.samples) == 1
    t = torch.full((4,), 999)
    fixed = renoise_for_discriminator(torch.randn(4, 3), schedule=sched, t=t, generator=_gen(0))
    torch.testing.assert_close(fixed.samples[0], fixed.noise[0])  # terminal pure-noise swap applies
    custom = renoise_for_discriminator(torch.randn(8, 3), schedule=sched, values=(3, 7), generator=_gen(0))
    assert set(custom.t.tolist()) <= {3, 7}


def test_renoise_errors() -> None:
    sched = NoiseSchedule.from_betas()
    with pytest.raises(OptionError, match="at least one clean tensor"):
        renoise_for_discriminator(schedule=sched)
    with pytest.raises(DTypeError, match="`schedule` to be a NoiseSchedule"):
        renoise_for_discriminator(torch.randn(2, 3), schedule=None)
    with pytest.raises(ShapeError, match=r"batch size of clean\[0\] \(2\).*clean\[1\] has shape \(3, 3\)"):
        renoise_for_discriminator(torch.randn(2, 3), torch.randn(3, 3), schedule=sched)
    with pytest.raises(ShapeError, match=r"`t` to hold one timestep per sample, shape \(2,\)"):
        renoise_for_discriminator(torch.randn(2, 3), schedule=sched, t=torch.tensor([1, 2, 3]))
    with pytest.raises(DTypeError, match=r"`clean\[0\]` to be a floating-point tensor"):
        renoise_for_discriminator(torch.ones(2, 3, dtype=torch.long), schedule=sched)


# ------------------------------------------------------------------------------------ errors
def test_gan_loss_errors() -> None:
    r, f = torch.randn(3), torch.randn(3)
    with pytest.raises(
        OptionError, match=r"`loss` to be one of \['non_saturating', 'hinge', 'least_squares'\]"
    ):
        gan_discriminator_loss(r, f, loss="wgan")
    with pytest.raises(OptionError, match=r"`reduction` to be one of \['mean', 'sum', 'none'\]"):
        gan_generator_loss(f, reduction="max")
    with pytest.raises(OptionError, match=r"`hinge_generator` to be one of \['linear', 'relu'\]"):
        gan_generator_loss(f, loss="hinge", hinge_generator="pcm")
    with pytest.raises(OptionError, match=r"one entry per discriminator head \(2\), but got 3"):
        gan_generator_loss([f, f], head_weights=(1, 2, 3))
    with pytest.raises(OptionError, match=r"`head_weights` to be finite and >= 0 with a positive sum"):
        gan_generator_loss([f, f], head_weights=(1, -2))
    with pytest.raises(OptionError, match=r"`head_weights` to be finite and >= 0 with a positive sum"):
        GANLoss(head_weights=(0, 0))
    for bad in ((float("inf"), 1), (float("nan"), 1)):  # inf would normalise to [nan, 0]
        with pytest.raises(OptionError, match=r"`head_weights` to be finite and >= 0"):
            gan_generator_loss([f, f], head_weights=bad)
    with pytest.raises(ShapeError, match=r"same heads, but got 2 real and 1 fake"):
        gan_discriminator_loss([r, r], [f])
    with pytest.raises(ShapeError, match=r"`real_logits` to have a batch dimension.*0-d"):
        gan_discriminator_loss(r.sum(), f)
    with pytest.raises(ShapeError, match=r"every head of `fake_logits` to have the same batch size"):
        gan_generator_loss([f, torch.randn(4)])
    with pytest.raises(ShapeError, match=r"reduction='none'.*same batch size, but got 3 and 5"):
        gan_discriminator_loss(r, torch.randn(5), reduction="none")
    with pytest.raises(DTypeError, match=r"`fake_logits` to be a tensor of logits or a non-empty list"):
        gan_generator_loss([])
    with pytest.raises(DTypeError, match=r"`fake_logits\[1\]` to be a torch.Tensor"):
        gan_generator_loss([f, 1.0])  # type: ignore[list-item]
    with pytest.raises(DTypeError, match=r"`real_logits` to be a floating-point tensor"):
        gan_discriminator_loss(torch.ones(3, dtype=torch.long), f)


def test_r1_errors() -> None:
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"`inputs` to require grad.*requires_grad_\(True\)"):
        r1_penalty(x.sum(dim=1), x)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"`real_logits` to depend on `inputs` through autograd"):
        r1_penalty(torch.randn(3), xg)
    with pytest.raises(DTypeError, match="`inputs` to be the tensor"):
        r1_penalty(xg.sum(dim=1), [])
    with pytest.raises(OptionError, match=r"`gamma` to be >= 0"):
        r1_penalty(xg.sum(dim=1), xg, gamma=-1.0)
    y = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(ShapeError, match=r"entry 1 has shape \(4, 2\)"):
        r1_penalty(xg.sum() + y.sum().reshape(1), [xg, y])
    disc = torch.nn.Linear(2, 1)
    with pytest.raises(OptionError, match=r"`every` to be an int >= 1, but got 0"):
        lazy_r1_penalty(disc, x, step=0, every=0)
    with pytest.raises(OptionError, match=r"`step` to be a Python int"):
        lazy_r1_penalty(disc, x, step=torch.tensor(3))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`num_samples` to be an int >= 1, but got 0"):
        lazy_r1_penalty(disc, x, step=0, num_samples=0)
    with pytest.raises(DTypeError, match="`discriminator` to be callable"):
        lazy_r1_penalty("disc", x, step=0)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"`real` to have a batch dimension"):
        lazy_r1_penalty(disc, torch.tensor(1.0), step=0)
    with pytest.raises(DTypeError, match="Expected the discriminator to return a tensor"):
        lazy_r1_penalty(lambda x: "logits", x, step=0)
    with pytest.raises(DTypeError, match=r"`real` to be a torch\.Tensor"):
        lazy_r1_penalty(disc, [1.0], step=0)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`real` to be a floating-point tensor"):
        lazy_r1_penalty(disc, torch.ones(3, 2, dtype=torch.long), step=0)
    with pytest.raises(DTypeError, match=r"`inputs\[1\]` to be a torch\.Tensor"):
        r1_penalty(xg.sum(dim=1), [xg, 2.0])  # type: ignore[list-item]
    with pytest.raises(DTypeError, match=r"`noise` to be a torch\.Tensor"):
        mix_and_match(torch.randn(3, 4), noise=[0.0])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`t` to be a torch\.Tensor"):
        renoise_for_discriminator(torch.randn(2, 3), schedule=NoiseSchedule.from_betas(), t=[1, 2])  # type: ignore[arg-type]


def test_lazy_r1_through_attention_uses_the_math_kernel() -> None:
    # Fused SDPA kernels have no double backward; lazy R1 must still work on attention discriminators.
    proj = torch.nn.Linear(4, 4)

    def disc(x: torch.Tensor) -> torch.Tensor:
        q = proj(x).unsqueeze(1)  # (B, 1 head, L, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(dim=(1, 2, 3))

    real = torch.randn(3, 6, 4)
    loss, logs = lazy_r1_penalty(disc, real, step=0, every=4, num_samples=2, generator=_gen(0))
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert float(logs["r1_active"]) == 1.0
