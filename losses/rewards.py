r"""Reward hinge losses for human-feedback fine-tuning of distilled students.

Both losses take either reward tensors or images plus any reward callable
``reward_fn(images, **cond) -> (B,)`` (an aesthetic predictor, ImageReward, MPS, PickScore, ...), and
return ``(loss, logs)``: the loss (0-d for ``reduction="mean"`` / ``"sum"``, ``(B,)`` for ``"none"``)
and a dict of detached float32 0-d tensors for logging. Rewards compute in float32 (float64 stays
float64). A reward of shape ``(B, ...)`` is averaged over its non-batch dimensions first.

* :func:`reward_hinge_loss`: Hyper-SD's aesthetic feedback loss
  :math:`\mathbb{E}[\max(0, \alpha - r(x_0, c))]` (Eq. 13): rewards above the threshold give no gradient,
  which limits reward hacking.
* :func:`mps_hinge_loss`: MLCM/TLCM's two-sided MPS hinge
  :math:`\max(0, s_0 - s(x_0, c_\text{pos})) + \max(0, s(x_0, c_\text{neg}))` with :math:`s_0 = 16`
  (Eq. 11): raise the score under the prompt up to :math:`s_0`, push the score under a negative prompt
  down to 0.

The reward model itself should be frozen (eval mode, ``requires_grad_(False)``): the gradient reaches
the images, not the reward model. :class:`RewardHingeLoss` and :class:`MPSHingeLoss` hold the reward
model and freeze it.

References:
    * Y. Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis",
      arXiv:2404.13686, Sec. 3.2, Eq. 13.
    * Q. Xie et al., "MLCM: Multistep Consistency Distillation of Latent Diffusion Model" (renamed TLCM),
      arXiv:2406.05768, Sec. 3.4, Eq. 11.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_dtype_floating,
    check_float_input,
    check_mapping,
    check_option,
    check_real,
    check_tensor,
)
from .._outputs import first_tensor
from .distances import _reduce

__all__ = ["MPSHingeLoss", "RewardHingeLoss", "mps_hinge_loss", "reward_hinge_loss"]

Reduction = Literal["mean", "sum", "none"]
RewardFn = Callable[..., Any]

_REDUCTIONS = ("mean", "sum", "none")


def _reward_kwargs(cond: Any, name: str) -> dict[str, Any]:
    return check_mapping(cond, name, what="keyword arguments for reward_fn", example="{'prompt_embeds': emb}")


def _check_reward_fn(reward_fn: Any) -> None:
    if reward_fn is not None and not callable(reward_fn):
        raise DTypeError(
            f"Expected `reward_fn` to be callable as reward_fn(images, **cond) -> (B,), but got "
            f"{type(reward_fn).__name__}."
        )


def _per_sample_rewards(value: Any, name: str, *, from_fn: bool) -> torch.Tensor:
    """Rewards as a float32 (or float64) ``(B,)`` tensor; ``name`` is what messages call them.

    ``from_fn``: ``value`` is what ``reward_fn`` returned (a tensor or a model output), not a caller's tensor.
    """
    rewards = first_tensor(value, "reward_fn") if not isinstance(value, torch.Tensor) else value
    if from_fn and not rewards.is_floating_point():
        raise DTypeError(
            f"Expected `reward_fn` to return floating-point rewards, but `{name}` has dtype {rewards.dtype}. Make it "
            "return the differentiable scores (a float tensor), not labels or ranks."
        )
    check_dtype_floating(rewards, name)
    if rewards.ndim == 0:
        raise ShapeError(
            f"Expected `{name}` to hold one reward per sample, shape (B,) or (B, ...), but got a 0-d tensor. "
            "Return per-sample rewards, not their mean.",
            name=name,
            expected="(B,)",
            actual=(),
        )
    check_float_input(rewards, name)  # non-empty, finite (a value check)
    if rewards.dtype in (torch.float16, torch.bfloat16):
        rewards = rewards.float()
    return rewards if rewards.ndim == 1 else rewards.flatten(1).mean(dim=1)


def _score(
    input: torch.Tensor,
    reward_fn: RewardFn | None,
    cond: dict[str, Any],
    name: str,
    input_name: str = "input",
) -> torch.Tensor:
    """Per-sample rewards: ``input`` itself (score mode, ``name`` = ``input_name``) or ``reward_fn``'s."""
    check_tensor(input, input_name)
    if reward_fn is None:
        return _per_sample_rewards(input, name, from_fn=False)
    check_dtype_floating(input, input_name)
    if input.ndim == 0:
        raise ShapeError(
            f"Expected `{input_name}` to be a batch of images (or latents), shape (B, ...), but got a 0-d tensor.",
            name=input_name,
            expected="(B, ...)",
            actual=(),
        )
    check_float_input(input, input_name)  # non-empty, finite (a value check)
    rewards = _per_sample_rewards(reward_fn(input, **cond), name, from_fn=True)
    batch = input.shape[0]
    if rewards.shape[0] != batch:
        raise ShapeError(
            f"Expected `reward_fn` to return one reward per image ({batch}), but it returned {rewards.shape[0]}.",
            name=name,
            expected=(batch,),
            actual=tuple(rewards.shape),
        )
    return rewards


def reward_hinge_loss(
    input: torch.Tensor,
    alpha: float,
    *,
    reward_fn: RewardFn | None = None,
    cond: Mapping[str, Any] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Hyper-SD's reward hinge :math:`\max(0, \alpha - r)` (Ren et al. 2024, Eq. 13).

    .. math::

        L = \mathbb{E}_{x_0, c}\big[\max(0, \alpha - r(x_0, c))\big]

    Args:
        input: the rewards ``(B,)`` / ``(B, ...)`` when ``reward_fn`` is None, otherwise the images
            (or latents) ``reward_fn`` scores, ``(B, ...)``; floating either way.
        alpha: the threshold :math:`\alpha`, a finite number on the reward model's scale (Hyper-SD does not
            publish its values).
        reward_fn: optional reward model, called as ``reward_fn(input, **cond)`` and returning ``(B,)``
            floating rewards; None (the default): ``input`` holds the rewards.
        cond: keyword arguments for ``reward_fn`` (e.g. the prompt); None (the default) passes none. Only
            with ``reward_fn``.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample loss, shape ``(B,)``).

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``; float32, float64 for float64
        rewards) and detached float32 0-d logs ``reward_hinge`` (mean loss), ``reward`` (mean reward) and
        ``reward_active`` (fraction of samples below ``alpha``, the ones that get a gradient).

    Raises:
        OptionError: ``alpha`` is not finite, ``reduction`` is unknown, or ``cond`` is given without
            ``reward_fn``.
        DTypeError: ``alpha`` is not a real number, ``input`` is not a floating-point tensor, ``reward_fn`` is not callable, ``cond`` is not a
            mapping, or ``reward_fn`` returns no floating tensor.
        ShapeError: ``input`` (or the rewards) is 0-d or empty, or ``reward_fn`` returns another batch size.
        NonFiniteError: ``input`` or the rewards ``reward_fn`` returns hold NaN or Inf (a value check, see
            :mod:`diffdistill.errors`).

    Example:
        >>> loss, logs = reward_hinge_loss(torch.tensor([4.0, 6.5]), alpha=6.0)
        >>> loss, logs["reward_active"]  # mean(relu(6 - r)) = (2 + 0) / 2
        (tensor(1.), tensor(0.5000))
    """
    alpha = check_real(alpha, "alpha")
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_reward_fn(reward_fn)
    if reward_fn is None and cond is not None:
        raise OptionError(
            "`cond` holds keyword arguments for `reward_fn`, but `reward_fn` is None (then `input` holds the "
            "rewards). Pass `reward_fn`, or leave `cond` None."
        )
    name = "input" if reward_fn is None else "reward_fn(input, **cond)"
    rewards = _score(input, reward_fn, _reward_kwargs(cond, "cond"), name)
    per_sample = F.relu(alpha - rewards)
    detached = rewards.detach()
    logs = {
        "reward_hinge": per_sample.detach().mean().float(),
        "reward": detached.mean().float(),
        "reward_active": (detached < alpha).float().mean(),
    }
    return _reduce(per_sample, reduction), logs


def _mps_hinge(
    input: torch.Tensor,
    negative: torch.Tensor | None,
    s0: float,
    reward_fn: RewardFn | None,
    cond: Mapping[str, Any] | None,
    negative_cond: Mapping[str, Any] | None,
    reduction: str,
    negative_name: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`mps_hinge_loss`; ``negative_name`` is what messages call the negative scores."""
    s0 = check_real(s0, "s0")
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_reward_fn(reward_fn)
    if reward_fn is None:
        if negative is None:
            raise OptionError(
                f"Expected `{negative_name}` (the scores under the negative prompt) in score mode, but got None. "
                "Call mps_hinge_loss(s_pos, s_neg), or pass `reward_fn` with `cond` and `negative_cond`."
            )
        if negative_cond is not None or cond is not None:
            raise OptionError(
                "`cond` / `negative_cond` are keyword arguments for `reward_fn`, but `reward_fn` is None. "
                "Pass `reward_fn`, or pass the scores as mps_hinge_loss(s_pos, s_neg)."
            )
        check_tensor(negative, negative_name)
        pos = _score(input, None, {}, "input")
        neg = _score(negative, None, {}, negative_name, negative_name)
        if pos.shape != neg.shape:
            raise ShapeError(
                f"Expected the positive and negative scores (`input` and `{negative_name}`) to have the same "
                f"batch size, but got {pos.shape[0]} and {neg.shape[0]}.",
                name=f"input/{negative_name}",
                expected=tuple(pos.shape),
                actual=tuple(neg.shape),
            )
    else:
        if negative is not None:
            raise OptionError(
                "Got both `reward_fn` and `negative` scores. With `reward_fn`, pass the images as `input` and "
                "the negative prompt as `negative_cond`; without it, pass the two score tensors."
            )
        if negative_cond is None:
            raise OptionError(
                "Expected `negative_cond` (reward_fn keyword arguments for the negative prompt) when "
                "`reward_fn` is given, but got None."
            )
        pos = _score(input, reward_fn, _reward_kwargs(cond, "cond"), "reward_fn(input, **cond)")
        neg = _score(
            input,
            reward_fn,
            _reward_kwargs(negative_cond, "negative_cond"),
            "reward_fn(input, **negative_cond)",
        )
    per_sample = F.relu(s0 - pos) + F.relu(neg)
    logs = {
        "mps_hinge": per_sample.detach().mean().float(),
        "mps_pos": pos.detach().mean().float(),
        "mps_neg": neg.detach().mean().float(),
    }
    return _reduce(per_sample, reduction), logs


def mps_hinge_loss(
    input: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    s0: float = 16.0,
    reward_fn: RewardFn | None = None,
    cond: Mapping[str, Any] | None = None,
    negative_cond: Mapping[str, Any] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""MLCM/TLCM's two-sided MPS reward hinge (Xie et al. 2024, Eq. 11).

    .. math::

        L = \mathbb{E}\big[\max(0, s_0 - s(\hat x_0, c_\text{pos})) + \max(0, s(\hat x_0, c_\text{neg}))\big],
        \qquad s_0 = 16

    Two ways to call it: with scores, ``mps_hinge_loss(s_pos, s_neg)``; or with images and a reward model,
    ``mps_hinge_loss(images, reward_fn=mps, cond=pos_kwargs, negative_cond=neg_kwargs)``, which scores the
    same images once under the prompt and once under the negative prompt.

    Args:
        input: the positive-prompt scores :math:`s(\hat x_0, c_\text{pos})` ``(B,)``, or the images
            ``(B, ...)`` when ``reward_fn`` is given; floating either way.
        negative: the negative-prompt scores :math:`s(\hat x_0, c_\text{neg})` ``(B,)`` (score mode, where it
            is required); None (the default) with ``reward_fn``.
        s0: the target score :math:`s_0`, a finite number (default 16, on the MPS scale, as in the paper).
        reward_fn: optional reward model ``reward_fn(images, **cond) -> (B,)``; None (the default): score
            mode.
        cond: ``reward_fn`` keyword arguments for the positive prompt; None (the default) passes none.
        negative_cond: ``reward_fn`` keyword arguments for the negative prompt (required with ``reward_fn``).
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample loss, shape ``(B,)``).

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``) and detached float32 0-d logs
        ``mps_hinge`` (mean loss), ``mps_pos`` and ``mps_neg`` (mean scores).

    Raises:
        OptionError: ``s0`` is not finite, ``reduction`` is unknown, ``negative`` is missing in score
            mode, ``cond`` / ``negative_cond`` are given without ``reward_fn``, ``negative`` is given with
            ``reward_fn``, or ``negative_cond`` is missing with it.
        DTypeError: ``s0`` is not a real number, ``input`` or ``negative`` is not a floating-point tensor,
            ``reward_fn`` is not callable, ``cond`` / ``negative_cond`` is not a mapping, or ``reward_fn`` returns no floating tensor.
        ShapeError: a score tensor or the images are 0-d or empty, the two score tensors have different batch
            sizes, or ``reward_fn`` returns another batch size.
        NonFiniteError: ``input``, ``negative`` or the scores ``reward_fn`` returns hold NaN or Inf (a value
            check).

    Example:
        >>> s_pos, s_neg = torch.tensor([15.0, 17.0]), torch.tensor([-1.0, 2.0])
        >>> mps_hinge_loss(s_pos, s_neg)[0]  # ((1 + 0) + (0 + 2)) / 2
        tensor(1.5000)
    """
    return _mps_hinge(input, negative, s0, reward_fn, cond, negative_cond, reduction, "negative")


class _RewardModule(nn.Module):
    """Owns the reward model; with ``freeze``, keeps an ``nn.Module`` one frozen and in eval mode, also
    through a parent's ``.train()`` (DESIGN: frozen networks stay in eval mode).

    Args:
        reward_fn: the reward model (a callable) or None.
        freeze: freeze an ``nn.Module`` reward model.
    """

    def __init__(self, reward_fn: RewardFn | None, freeze: bool) -> None:
        super().__init__()
        _check_reward_fn(reward_fn)
        check_bool(freeze, "freeze")
        self.freeze = freeze
        if self.freeze and isinstance(reward_fn, nn.Module):
            reward_fn.eval().requires_grad_(False)
        self.reward_fn = reward_fn

    def train(self, mode: bool = True) -> _RewardModule:
        super().train(mode)
        if self.freeze and isinstance(self.reward_fn, nn.Module):
            self.reward_fn.eval()
        return self


class RewardHingeLoss(_RewardModule):
    r"""Module form of :func:`reward_hinge_loss` that owns a (frozen) reward model.

    Args:
        reward_fn: reward model ``reward_fn(images, **cond) -> (B,)``; an ``nn.Module`` is registered as a
            submodule (it follows ``.to()``) and, with ``freeze=True``, put in eval mode with
            ``requires_grad_(False)``. None: ``forward`` takes reward tensors.
        alpha: the threshold :math:`\alpha`, a finite number.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample, ``(B,)``).
        freeze: freeze an ``nn.Module`` reward model (kept in eval mode by ``.train()`` too); default True.

    Raises:
        DTypeError: ``reward_fn`` is neither callable nor None, ``freeze`` is not a bool, or ``alpha`` is not
            a real number.
        OptionError: ``alpha`` is not finite, or ``reduction`` is unknown. ``forward`` raises what
            :func:`reward_hinge_loss` raises.

    Example:
        >>> crit = RewardHingeLoss(lambda x: x.mean(dim=(1, 2, 3)), alpha=0.5)
        >>> images = torch.zeros(2, 3, 4, 4, requires_grad=True)
        >>> loss, logs = crit(images)
        >>> loss.item(), logs["reward"].item()
        (0.5, 0.0)
    """

    def __init__(
        self,
        reward_fn: RewardFn | None,
        alpha: float,
        *,
        reduction: Reduction = "mean",
        freeze: bool = True,
    ) -> None:
        super().__init__(reward_fn, freeze)
        self.alpha = check_real(alpha, "alpha")
        check_option(reduction, "reduction", _REDUCTIONS)
        self.reduction = reduction

    def forward(
        self, input: torch.Tensor, cond: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The hinge loss of images scored by the owned reward model (or of rewards, without one).

        Args:
            input: the images ``(B, ...)`` the reward model scores, or the rewards ``(B,)`` if ``reward_fn``
                is None; floating.
            cond: keyword arguments for the reward model (e.g. the prompt); None (the default) passes none.

        Returns:
            ``(loss, logs)`` as :func:`reward_hinge_loss`.

        Raises:
            DTypeError: ``input`` is not a floating-point tensor, ``cond`` is not a mapping, or the reward
                model returns no floating tensor.
            ShapeError: ``input`` or the rewards are 0-d or empty, or the model returns another batch size.
            OptionError: ``cond`` is given without a reward model.
            NonFiniteError: ``input`` or the rewards hold NaN or Inf (a value check).
        """
        return reward_hinge_loss(
            input, self.alpha, reward_fn=self.reward_fn, cond=cond, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


class MPSHingeLoss(_RewardModule):
    r"""Module form of :func:`mps_hinge_loss` that owns a (frozen) MPS-style reward model.

    Args:
        reward_fn: reward model ``reward_fn(images, **cond) -> (B,)``, frozen like in
            :class:`RewardHingeLoss`; None (the default): ``forward`` takes the two score tensors.
        s0: the target score :math:`s_0`, a finite number (default 16).
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample, ``(B,)``).
        freeze: freeze an ``nn.Module`` reward model; default True.

    Raises:
        DTypeError: ``reward_fn`` is neither callable nor None, ``freeze`` is not a bool, or ``s0`` is not a
            real number.
        OptionError: ``s0`` is not finite, or ``reduction`` is unknown. ``forward`` raises what
            :func:`mps_hinge_loss` raises.

    Example:
        >>> score = lambda x, prompt: (x.flatten(1) * prompt).sum(dim=1)
        >>> crit = MPSHingeLoss(score, s0=16.0)
        >>> x = torch.ones(2, 4)
        >>> loss, logs = crit(x, {"prompt": torch.full((2, 4), 3.0)}, {"prompt": torch.full((2, 4), 0.5)})
        >>> loss.item()  # relu(16 - 12) + relu(2)
        6.0
    """

    def __init__(
        self,
        reward_fn: RewardFn | None = None,
        s0: float = 16.0,
        *,
        reduction: Reduction = "mean",
        freeze: bool = True,
    ) -> None:
        super().__init__(reward_fn, freeze)
        self.s0 = check_real(s0, "s0")
        check_option(reduction, "reduction", _REDUCTIONS)
        self.reduction = reduction

    def forward(
        self,
        input: torch.Tensor,
        cond: Mapping[str, Any] | torch.Tensor | None = None,
        negative_cond: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``crit(images, cond, negative_cond)`` with a reward model, or ``crit(s_pos, s_neg)`` without one.

        Args:
            input: the images ``(B, ...)`` (with a reward model) or the positive-prompt scores ``(B,)``;
                floating.
            cond: with a reward model, its keyword arguments for the positive prompt (None: none); without
                one, the negative-prompt scores ``(B,)`` (required).
            negative_cond: the reward model's keyword arguments for the negative prompt (required with a
                reward model, unused without one).

        Returns:
            ``(loss, logs)`` as :func:`mps_hinge_loss`.

        Raises:
            DTypeError: without a reward model, ``cond`` is not a tensor; with one, ``cond`` is a tensor; a
                score tensor or the images are not floating; the reward model returns no floating tensor.
            ShapeError: a score tensor or the images are 0-d or empty, or the batch sizes differ.
            OptionError: ``negative_cond`` is missing with a reward model, or given without one.
            NonFiniteError: the scores or images hold NaN or Inf (a value check).
        """
        if self.reward_fn is None:
            if not isinstance(cond, torch.Tensor):
                raise DTypeError(
                    "Without a reward model, call the loss on scores: crit(s_pos, s_neg), but the second "
                    f"argument is {type(cond).__name__}."
                )
            return _mps_hinge(input, cond, self.s0, None, None, negative_cond, self.reduction, "cond")
        if isinstance(cond, torch.Tensor):
            raise DTypeError(
                "With a reward model, call crit(images, cond, negative_cond) with mappings of reward_fn keyword "
                "arguments, but `cond` is a tensor."
            )
        return _mps_hinge(
            input, None, self.s0, self.reward_fn, cond, negative_cond, self.reduction, "negative"
        )

    def extra_repr(self) -> str:
        return f"s0={self.s0}, reduction={self.reduction!r}"
