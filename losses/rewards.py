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

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import DTypeError, OptionError, ShapeError, check_dtype_floating, check_option, check_tensor
from .._outputs import first_tensor

__all__ = ["MPSHingeLoss", "RewardHingeLoss", "mps_hinge_loss", "reward_hinge_loss"]

Reduction = Literal["mean", "sum", "none"]
RewardFn = Callable[..., Any]

_REDUCTIONS = ("mean", "sum", "none")


def _check_number(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    return float(value)


def _check_reward_fn(reward_fn: Any) -> None:
    if reward_fn is not None and not callable(reward_fn):
        raise DTypeError(
            f"Expected `reward_fn` to be callable as reward_fn(images, **cond) -> (B,), but got "
            f"{type(reward_fn).__name__}."
        )


def _check_cond(cond: Any, name: str) -> dict[str, Any]:
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise DTypeError(
            f"Expected `{name}` to be a mapping of keyword arguments for reward_fn, e.g. "
            f"{{'prompt_embeds': emb}}, but got {type(cond).__name__}."
        )
    return dict(cond)


def _per_sample_rewards(value: Any, name: str) -> torch.Tensor:
    """Rewards as a float32 (or float64) ``(B,)`` tensor."""
    rewards = first_tensor(value, "reward_fn") if not isinstance(value, torch.Tensor) else value
    check_dtype_floating(rewards, name)
    if rewards.ndim == 0:
        raise ShapeError(
            f"Expected `{name}` to hold one reward per sample, shape (B,) or (B, ...), but got a 0-d tensor. "
            "Return per-sample rewards, not their mean.",
            name=name,
            expected="(B,)",
            actual=(),
        )
    if rewards.dtype in (torch.float16, torch.bfloat16):
        rewards = rewards.float()
    return rewards if rewards.ndim == 1 else rewards.flatten(1).mean(dim=1)


def _score(input: torch.Tensor, reward_fn: RewardFn | None, cond: dict[str, Any], name: str) -> torch.Tensor:
    check_tensor(input, "input")
    if reward_fn is None:
        return _per_sample_rewards(input, name)
    rewards = _per_sample_rewards(reward_fn(input, **cond), name)
    batch = input.shape[0] if input.ndim else 1
    if rewards.shape[0] != batch:
        raise ShapeError(
            f"Expected `reward_fn` to return one reward per image ({batch}), but it returned {rewards.shape[0]}.",
            name=name,
            expected=(batch,),
            actual=tuple(rewards.shape),
        )
    return rewards


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


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
            (or latents) ``reward_fn`` scores.
        alpha: the threshold :math:`\alpha`, on the reward model's scale (Hyper-SD does not publish its
            values).
        reward_fn: optional reward model, called as ``reward_fn(input, **cond)`` and returning ``(B,)``.
        cond: keyword arguments for ``reward_fn`` (e.g. the prompt).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample loss, shape ``(B,)``).

    Returns:
        ``(loss, logs)`` with logs ``reward_hinge`` (mean loss), ``reward`` (mean reward) and
        ``reward_active`` (fraction of samples below ``alpha``, the ones that get a gradient).

    Example:
        >>> loss, logs = reward_hinge_loss(torch.tensor([4.0, 6.5]), alpha=6.0)
        >>> loss, logs["reward_active"]  # mean(relu(6 - r)) = (2 + 0) / 2
        (tensor(1.), tensor(0.5000))
    """
    alpha = _check_number(alpha, "alpha")
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_reward_fn(reward_fn)
    rewards = _score(input, reward_fn, _check_cond(cond, "cond"), "rewards")
    per_sample = F.relu(alpha - rewards)
    detached = rewards.detach()
    logs = {
        "reward_hinge": per_sample.detach().mean().float(),
        "reward": detached.mean().float(),
        "reward_active": (detached < alpha).float().mean(),
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
        input: the positive-prompt scores :math:`s(\hat x_0, c_\text{pos})` ``(B,)``, or the images when
            ``reward_fn`` is given.
        negative: the negative-prompt scores :math:`s(\hat x_0, c_\text{neg})` ``(B,)`` (score mode only).
        s0: the target score :math:`s_0` (16 on the MPS scale, as in the paper).
        reward_fn: optional reward model ``reward_fn(images, **cond) -> (B,)``.
        cond: ``reward_fn`` keyword arguments for the positive prompt.
        negative_cond: ``reward_fn`` keyword arguments for the negative prompt.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample loss, shape ``(B,)``).

    Returns:
        ``(loss, logs)`` with logs ``mps_hinge`` (mean loss), ``mps_pos`` and ``mps_neg`` (mean scores).

    Example:
        >>> s_pos, s_neg = torch.tensor([15.0, 17.0]), torch.tensor([-1.0, 2.0])
        >>> mps_hinge_loss(s_pos, s_neg)[0]  # ((1 + 0) + (0 + 2)) / 2
        tensor(1.5000)
    """
    s0 = _check_number(s0, "s0")
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_reward_fn(reward_fn)
    if reward_fn is None:
        if negative is None:
            raise OptionError(
                "Expected `negative` (the scores under the negative prompt) in score mode, but got None. "
                "Call mps_hinge_loss(s_pos, s_neg), or pass `reward_fn` with `cond` and `negative_cond`."
            )
        if negative_cond is not None or cond is not None:
            raise OptionError(
                "`cond` / `negative_cond` are keyword arguments for `reward_fn`, but `reward_fn` is None. "
                "Pass `reward_fn`, or pass the scores as mps_hinge_loss(s_pos, s_neg)."
            )
        check_tensor(negative, "negative")
        pos = _score(input, None, {}, "input")
        neg = _score(negative, None, {}, "negative")
        if pos.shape != neg.shape:
            raise ShapeError(
                f"Expected the positive and negative scores to have the same batch size, but got "
                f"{pos.shape[0]} and {neg.shape[0]}.",
                name="input/negative",
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
        pos = _score(input, reward_fn, _check_cond(cond, "cond"), "positive scores")
        neg = _score(input, reward_fn, _check_cond(negative_cond, "negative_cond"), "negative scores")
    per_sample = F.relu(s0 - pos) + F.relu(neg)
    logs = {
        "mps_hinge": per_sample.detach().mean().float(),
        "mps_pos": pos.detach().mean().float(),
        "mps_neg": neg.detach().mean().float(),
    }
    return _reduce(per_sample, reduction), logs


class _RewardModule(nn.Module):
    """Owns the reward model; with ``freeze``, keeps an ``nn.Module`` one frozen and in eval mode, also
    through a parent's ``.train()`` (DESIGN: frozen networks stay in eval mode)."""

    def __init__(self, reward_fn: RewardFn | None, freeze: bool) -> None:
        super().__init__()
        _check_reward_fn(reward_fn)
        self.freeze = bool(freeze)
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
        alpha: the threshold :math:`\alpha`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        freeze: freeze an ``nn.Module`` reward model (kept in eval mode by ``.train()`` too).

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
        self.alpha = _check_number(alpha, "alpha")
        check_option(reduction, "reduction", _REDUCTIONS)
        self.reduction = reduction

    def forward(
        self, input: torch.Tensor, cond: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (or rewards if ``reward_fn`` is None) and ``reward_fn`` keyword arguments -> ``(loss, logs)``."""
        return reward_hinge_loss(
            input, self.alpha, reward_fn=self.reward_fn, cond=cond, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


class MPSHingeLoss(_RewardModule):
    r"""Module form of :func:`mps_hinge_loss` that owns a (frozen) MPS-style reward model.

    Args:
        reward_fn: reward model ``reward_fn(images, **cond) -> (B,)``, frozen like in
            :class:`RewardHingeLoss`; None: ``forward`` takes the two score tensors.
        s0: the target score :math:`s_0` (16).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        freeze: freeze an ``nn.Module`` reward model.

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
        self.s0 = _check_number(s0, "s0")
        check_option(reduction, "reduction", _REDUCTIONS)
        self.reduction = reduction

    def forward(
        self,
        input: torch.Tensor,
        cond: Mapping[str, Any] | torch.Tensor | None = None,
        negative_cond: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(images, cond, negative_cond)`` with a reward model, or ``(s_pos, s_neg)`` without one."""
        if self.reward_fn is None:
            if not isinstance(cond, torch.Tensor):
                raise DTypeError(
                    "Without a reward model, call the loss on scores: crit(s_pos, s_neg), but the second "
                    f"argument is {type(cond).__name__}."
                )
            return mps_hinge_loss(input, cond, s0=self.s0, reduction=self.reduction)
        if isinstance(cond, torch.Tensor):
            raise DTypeError(
                "With a reward model, call crit(images, cond, negative_cond) with mappings of reward_fn keyword "
                "arguments, but `cond` is a tensor."
            )
        return mps_hinge_loss(
            input,
            s0=self.s0,
            reward_fn=self.reward_fn,
            cond=cond,
            negative_cond=negative_cond,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"s0={self.s0}, reduction={self.reduction!r}"
