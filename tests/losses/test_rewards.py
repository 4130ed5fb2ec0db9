"""Tests of diffdistill.losses.rewards: Hyper-SD reward hinge and MLCM's two-sided MPS hinge."""

from __future__ import annotations

import pytest
import torch

from diffdistill._checks import DTypeError, OptionError, ShapeError
from diffdistill.losses.rewards import MPSHingeLoss, RewardHingeLoss, mps_hinge_loss, reward_hinge_loss


class _Scorer(torch.nn.Module):
    """A toy reward model: r(x, prompt) = <w, mean_hw(x)> * prompt_scale."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, images: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return (images.mean(dim=(2, 3)) @ self.w) * scale


def test_reward_hinge_values_and_logs() -> None:
    r = torch.tensor([1.0, 5.0, 7.0, 2.0])
    loss, logs = reward_hinge_loss(r, alpha=5.0)
    torch.testing.assert_close(loss, torch.tensor((4.0 + 0 + 0 + 3.0) / 4))
    torch.testing.assert_close(logs["reward"], torch.tensor(3.75))
    torch.testing.assert_close(logs["reward_active"], torch.tensor(0.5))
    torch.testing.assert_close(logs["reward_hinge"], loss)
    none, _ = reward_hinge_loss(r, alpha=5.0, reduction="none")
    torch.testing.assert_close(none, torch.tensor([4.0, 0.0, 0.0, 3.0]))
    total, _ = reward_hinge_loss(r, alpha=5.0, reduction="sum")
    torch.testing.assert_close(total, torch.tensor(7.0))


def test_reward_hinge_gradient_only_below_threshold() -> None:
    r = torch.tensor([1.0, 6.0, 2.0], requires_grad=True)
    reward_hinge_loss(r, alpha=5.0)[0].backward()
    torch.testing.assert_close(r.grad, torch.tensor([-1 / 3, 0.0, -1 / 3]))


def test_reward_hinge_with_reward_fn_reaches_images_not_frozen_model() -> None:
    scorer = _Scorer()
    crit = RewardHingeLoss(scorer, alpha=100.0)
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    assert "(reward_fn): _Scorer()" in repr(crit) and "alpha=100.0" in repr(crit)  # a registered submodule
    images = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, logs = crit(images, {"scale": 2.0})
    torch.testing.assert_close(logs["reward_active"], torch.tensor(1.0))
    expected = torch.relu(100.0 - scorer(images.detach(), 2.0)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert images.grad is not None and scorer.w.grad is None
    functional, _ = reward_hinge_loss(images, 100.0, reward_fn=scorer, cond={"scale": 2.0})
    torch.testing.assert_close(functional, loss)


def test_reward_fn_output_shapes_and_model_outputs() -> None:
    # (B, 1) rewards and dict outputs are accepted.
    loss, _ = reward_hinge_loss(torch.zeros(3, 2), 1.0, reward_fn=lambda x: {"score": x[:, :1] + 0.5})
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_module_without_reward_fn_takes_rewards() -> None:
    crit = RewardHingeLoss(None, alpha=1.0, reduction="none", freeze=False)
    torch.testing.assert_close(crit(torch.tensor([0.0, 2.0]))[0], torch.tensor([1.0, 0.0]))


def test_unfrozen_reward_model_trains_when_asked() -> None:
    scorer = _Scorer()
    crit = RewardHingeLoss(scorer, alpha=100.0, freeze=False)
    crit(torch.randn(2, 3, 4, 4))[0].backward()
    assert scorer.w.grad is not None
    assert crit.train().training and scorer.training  # not frozen: follows the parent's mode


def test_frozen_reward_model_stays_in_eval_mode_through_train() -> None:
    # A parent's .train() (e.g. the training loop's model.train()) must not switch dropout back on.
    for crit in (RewardHingeLoss(_Scorer(), alpha=1.0), MPSHingeLoss(_Scorer())):
        parent = torch.nn.ModuleDict({"loss": crit}).train()
        assert crit.training and not crit.reward_fn.training
        parent.eval().train()
        assert not crit.reward_fn.training


def test_mps_hinge_values_and_gradients() -> None:
    s_pos = torch.tensor([10.0, 20.0, 16.0], requires_grad=True)
    s_neg = torch.tensor([-3.0, 4.0, 0.5], requires_grad=True)
    loss, logs = mps_hinge_loss(s_pos, s_neg)
    torch.testing.assert_close(loss, torch.tensor(((6 + 0) + (0 + 4) + (0 + 0.5)) / 3))
    torch.testing.assert_close(logs["mps_pos"], torch.tensor(46 / 3))
    torch.testing.assert_close(logs["mps_neg"], torch.tensor(1.5 / 3))
    loss.backward()
    torch.testing.assert_close(s_pos.grad, torch.tensor([-1 / 3, 0.0, 0.0]))  # raise only below s0 = 16
    torch.testing.assert_close(s_neg.grad, torch.tensor([0.0, 1 / 3, 1 / 3]))  # push negatives to 0
    none, _ = mps_hinge_loss(s_pos, s_neg, s0=12.0, reduction="none")
    torch.testing.assert_close(none.detach(), torch.tensor([2.0, 4.0, 0.5]))


def test_mps_hinge_with_reward_fn_scores_same_images_twice() -> None:
    scorer = _Scorer()
    images = torch.ones(2, 3, 4, 4, requires_grad=True)  # scorer(images) = 6 * scale
    crit = MPSHingeLoss(scorer)
    loss, logs = crit(images, {"scale": 2.0}, {"scale": 0.5})
    torch.testing.assert_close(loss, torch.tensor((16 - 12) + 3.0))
    torch.testing.assert_close(logs["mps_neg"], torch.tensor(3.0))
    loss.backward()
    assert images.grad is not None and scorer.w.grad is None
    functional, _ = mps_hinge_loss(
        images, reward_fn=scorer, cond={"scale": 2.0}, negative_cond={"scale": 0.5}
    )
    torch.testing.assert_close(functional, loss)
    scores = MPSHingeLoss(s0=16.0)
    torch.testing.assert_close(scores(torch.tensor([12.0]), torch.tensor([3.0]))[0], torch.tensor(7.0))
    assert "s0=16.0" in repr(scores)


def test_gradcheck_float64() -> None:
    # Values away from the kinks at s0 = alpha = 2.5 and 0.
    r = torch.tensor([0.3, 1.1, 3.7, 4.4, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reward_hinge_loss(x, 2.5, reduction="none")[0], (r,))
    neg = torch.tensor([-0.5, 0.7, 1.3, -2.0, 0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mps_hinge_loss(a, b, s0=2.5)[0], (r, neg))
    assert reward_hinge_loss(r, 2.5)[0].dtype == torch.float64


def test_half_rewards_compute_in_float32_and_autocast() -> None:
    loss, logs = reward_hinge_loss(torch.tensor([1.0, 3.0]).bfloat16(), alpha=2.0)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    lin = torch.nn.Linear(4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mps, _ = mps_hinge_loss(torch.randn(3, 4), reward_fn=lambda x: lin(x), negative_cond={})
    assert mps.dtype == torch.float32 and bool(torch.isfinite(mps))


@pytest.mark.compile
def test_compile_fullgraph_on_scores() -> None:
    def both(r: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return reward_hinge_loss(r, 1.0)[0] + mps_hinge_loss(r, n)[0]

    r, n = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(torch.compile(both, fullgraph=True, backend="eager")(r, n), both(r, n))


def test_errors() -> None:
    r = torch.randn(3)
    with pytest.raises(OptionError, match=r"`alpha` to be a finite number, but got nan"):
        reward_hinge_loss(r, float("nan"))
    with pytest.raises(DTypeError, match=r"`s0` to be a real number, but got str 'x'"):
        mps_hinge_loss(r, r, s0="x")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`reduction` to be one of \['mean', 'sum', 'none'\]"):
        reward_hinge_loss(r, 1.0, reduction="avg")
    with pytest.raises(DTypeError, match=r"`reward_fn` to be callable as reward_fn\(images, \*\*cond\)"):
        reward_hinge_loss(r, 1.0, reward_fn=3)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`cond` to be a mapping of keyword arguments"):
        reward_hinge_loss(r, 1.0, reward_fn=lambda x: x, cond=[1])  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"one reward per sample, shape \(B,\).*0-d"):
        reward_hinge_loss(r.sum(), 1.0)
    with pytest.raises(ShapeError, match=r"one reward per image \(3\), but it returned 1"):
        reward_hinge_loss(torch.randn(3, 2), 1.0, reward_fn=lambda x: x.mean().reshape(1))
    with pytest.raises(DTypeError, match=r"`input` to be a floating-point tensor"):
        reward_hinge_loss(torch.ones(3, dtype=torch.long), 1.0)
    with pytest.raises(DTypeError, match=r"`input` to be a torch\.Tensor"):
        reward_hinge_loss([1.0, 2.0], 1.0)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"Expected `negative` .* in score mode, but got None"):
        mps_hinge_loss(r)
    with pytest.raises(OptionError, match=r"keyword arguments for `reward_fn`, but `reward_fn` is None"):
        mps_hinge_loss(r, r, negative_cond={})
    with pytest.raises(OptionError, match=r"Got both `reward_fn` and `negative` scores"):
        mps_hinge_loss(r, r, reward_fn=lambda x: x)
    with pytest.raises(OptionError, match=r"Expected `negative_cond` .* when `reward_fn` is given"):
        mps_hinge_loss(r, reward_fn=lambda x: x)
    with pytest.raises(ShapeError, match=r"same batch size, but got 3 and 2"):
        mps_hinge_loss(r, torch.randn(2))
    with pytest.raises(DTypeError, match=r"`negative` to be a torch\.Tensor"):
        mps_hinge_loss(r, [1.0])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"call the loss on scores: crit\(s_pos, s_neg\)"):
        MPSHingeLoss()(r, {"a": 1})
    with pytest.raises(
        DTypeError, match=r"with mappings of reward_fn keyword arguments, but `cond` is a tensor"
    ):
        MPSHingeLoss(lambda x: x)(r, r)
    with pytest.raises(DTypeError, match=r"`reward_fn` to be callable"):
        RewardHingeLoss("model", alpha=1.0)  # type: ignore[arg-type]
