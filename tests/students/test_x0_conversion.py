"""X0Conversion: Eq. 29 by hand, frozen copy, input sampling, and convergence to the x0 parameterisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.schedulers import NoiseSchedule
from diffdistill.students import X0Conversion


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Lin(nn.Module):
    """``f(x, t) = conv(x)``: a 1x1 conv, the same for every t (enough to express x0 at one t)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_loss_is_eq29_against_the_frozen_copy() -> None:
    torch.manual_seed(0)
    sched = NoiseSchedule.from_betas()
    conv = X0Conversion(Lin(), sched)
    x_t, t = torch.randn(3, 2, 4, 4), torch.tensor([999, 500, 10])
    loss, logs = conv(x_t, t)
    with torch.no_grad():
        abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = conv.frozen(x_t, t)
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        expected = (conv.online(x_t, t) - x0).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert conv.online.conv.weight.grad is not None and conv.frozen.conv.weight.grad is None
    assert conv.frozen is not conv.online and not conv.frozen.training
    conv.train()
    assert conv.online.training and not conv.frozen.training
    assert set(logs) == {"loss", "target_norm"}


def test_noisy_inputs_sample_the_grid_reproducibly() -> None:
    sched = NoiseSchedule.from_betas()
    conv = X0Conversion(Lin(), sched, timesteps=[249, 499, 749, 999])
    x0 = torch.randn(64, 2, 4, 4)
    x_a, t_a = conv.noisy_inputs(x0, generator=torch.Generator().manual_seed(1))
    x_b, t_b = conv.noisy_inputs(x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t_a, t_b) and torch.equal(x_a, x_b)
    assert set(t_a.tolist()) <= {249, 499, 749, 999} and len(set(t_a.tolist())) > 1
    noise = torch.randn_like(x0)
    x_t, t = conv.noisy_inputs(x0, torch.full((64,), 999), noise=noise)
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t))


def test_training_converts_to_x0_prediction() -> None:
    """At one timestep the x0 map of a linear eps model is linear, so the online copy can reach it."""
    torch.manual_seed(0)
    sched = NoiseSchedule.from_betas()
    model = Lin()
    conv = X0Conversion(model, sched, timesteps=[500])
    opt = torch.optim.Adam(conv.online.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(150):
        x_t, t = conv.noisy_inputs(torch.randn(16, 2, 4, 4, generator=gen), generator=gen)
        loss, _ = conv(x_t, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 1e-3 * first
    assert model is conv.online  # trained in place


def test_timesteps_are_checked() -> None:
    sched = NoiseSchedule.from_betas()
    net = nn.Linear(4, 4)
    for bad in ([], [[1, 2], [3, 4]], [10.5]):
        with pytest.raises(OptionError, match=r"Expected `timesteps` to be a non-empty 1-D list of integer"):
            X0Conversion(net, sched, timesteps=bad)
    with pytest.raises(OptionError, match=r"t = -1 is the clean end"):
        X0Conversion(net, sched, timesteps=[-1, 999])
    with pytest.raises(OptionError, match=r"Expected `timesteps` in \[0, 999\] .* but got \[1000\]"):
        X0Conversion(net, sched, timesteps=[1000])  # the range said [-1, 999], whose -1 is refused
    assert X0Conversion(net, sched, timesteps=[999.0, 500]).timestep_grid.tolist() == [999, 500]


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---


def test_constructor_refuses_bad_arguments() -> None:
    sched = NoiseSchedule.from_betas()
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got NoneType"):
        X0Conversion(None, sched)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `schedule` to be a NoiseSchedule, but got str"):
        X0Conversion(Lin(), "ddpm")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"Expected `distance` to be one of \['mse'"):
        X0Conversion(Lin(), sched, distance="l7")  # accepted, then failed at the first step, before
    with pytest.raises(
        DTypeError, match=r"Expected `timesteps` to be a list or tensor of integer .* got str"
    ):
        X0Conversion(Lin(), sched, timesteps="999")  # type: ignore[arg-type]
    with pytest.raises(
        DTypeError, match=r"Expected `timesteps` to hold integer training timesteps.*torch.bool"
    ):
        X0Conversion(Lin(), sched, timesteps=torch.tensor([True]))


@pytest.mark.parametrize(
    ("x0", "noise", "error", "match"),
    [
        (
            torch.zeros(2, 2, 4, 4, dtype=torch.long),
            None,
            DTypeError,
            r"Expected `x0` to be a floating-point",
        ),
        (
            torch.zeros(0, 2, 4, 4),
            None,
            ShapeError,
            r"Expected `x0` to hold at least one sample",
        ),  # silent before
        (torch.full((2, 2, 4, 4), float("nan")), None, NonFiniteError, r"Expected `x0` to be finite"),
        (
            torch.tensor(1.0),
            None,
            ShapeError,
            r"Expected `x0` to have a batch dimension",
        ),  # IndexError before
        (
            torch.zeros(2, 2, 4, 4),
            torch.ones(2, 2, 4, 4, dtype=torch.long),
            DTypeError,
            r"Expected `noise` to be a floating",
        ),
        (
            torch.zeros(2, 2, 4, 4),
            torch.full((2, 2, 4, 4), float("inf")),
            NonFiniteError,
            r"Expected `noise` to be finite",
        ),
        (
            torch.zeros(2, 2, 4, 4),
            torch.zeros(2, 2, 4, 1),
            ShapeError,
            r"`x0` and `noise` to have the same shape",
        ),
    ],
)
def test_noisy_inputs_refuses_bad_inputs(x0, noise, error, match) -> None:
    conv = X0Conversion(Lin(), NoiseSchedule.from_betas(), timesteps=[999])
    with pytest.raises(error, match=match):
        conv.noisy_inputs(x0, noise=noise)


def test_forward_refuses_bad_inputs_and_value_checks_switch_off() -> None:
    conv = X0Conversion(Lin(), NoiseSchedule.from_betas(), timesteps=[999])
    t = torch.tensor([500, 500])
    with pytest.raises(DTypeError, match=r"`x_t`"):
        conv(torch.zeros(2, 2, 4, 4, dtype=torch.long), t)
    with pytest.raises(NonFiniteError, match=r"Expected `x_t` to be finite"):
        conv(torch.full((2, 2, 4, 4), float("nan")), t)
    with pytest.raises(DTypeError, match=r"dtype"):  # a bf16 x_t into a float32 model: named, with a fix
        conv(torch.zeros(2, 2, 4, 4, dtype=torch.bfloat16), t)
    with pytest.raises(OptionError, match=r"`t` >= 0"):
        conv(torch.zeros(2, 2, 4, 4), torch.tensor([-1, 500]))
    with value_checks(False):
        loss, _ = conv(torch.full((2, 2, 4, 4), float("nan")), t)
        assert loss.isnan()
        x_t, _ = conv.noisy_inputs(torch.full((2, 2, 4, 4), float("nan")))
        assert x_t.isnan().all()
