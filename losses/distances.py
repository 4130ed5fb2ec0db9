"""Distances between a prediction and a target, per sample: the ``d`` of every regression-style loss.

Every distance maps ``(input, target)`` of shape ``(B, ...)`` to per-sample values ``(B,)`` before
``reduction``, and computes in at least float32 (half and bf16 are upcast; float64 stays float64).

* ``"mse"``: mean over non-batch dims of :math:`(x - y)^2`.
* ``"l1"``: mean of :math:`|x - y|`.
* ``"pseudo_huber"`` (LCM, Luo et al. 2023; diffusers' ``--loss_type huber``): elementwise
  :math:`\\operatorname{mean}(\\sqrt{(x-y)^2 + c^2} - c)` with ``c = 0.001``.
* ``"pseudo_huber_norm"`` (consistency models, Song & Dhariwal 2023 "Improved Techniques for Training
  Consistency Models"; SIM): per-sample :math:`\\sqrt{\\lVert x-y \\rVert_2^2 + c^2} - c` with
  ``c = 0.00054 \\sqrt{D}`` by default (D = elements per sample).
* any callable ``fn(input, target)`` returning ``(B,)`` or a scalar (e.g. an LPIPS module).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from .._checks import DTypeError, ShapeError, check_option, check_positive, check_same_shape, check_tensor

__all__ = ["DISTANCES", "DistanceLike", "compute_distance", "pseudo_huber_distance", "reduce_loss"]

DISTANCES: tuple[str, ...] = ("mse", "l1", "pseudo_huber", "pseudo_huber_norm")
DistanceLike = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reduction = Literal["mean", "sum", "none"]


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def reduce_loss(per_sample: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to per-sample values.

    Example:
        >>> reduce_loss(torch.tensor([1.0, 3.0])).item(), reduce_loss(torch.tensor([1.0, 3.0]), "sum").item()
        (2.0, 4.0)
    """
    check_option(reduction, "reduction", ("mean", "sum", "none"))
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def pseudo_huber_distance(
    input: torch.Tensor,
    target: torch.Tensor,
    c: float | None = None,
    *,
    per_sample_norm: bool = False,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Pseudo-Huber distance, elementwise (LCM) or on the per-sample L2 norm (consistency models / SIM).

    .. math::

        \\text{elementwise: } \\frac{1}{D}\\sum_i \\big(\\sqrt{(x_i - y_i)^2 + c^2} - c\\big), \\qquad
        \\text{norm: } \\sqrt{\\lVert x - y \\rVert_2^2 + c^2} - c .

    Args:
        input, target: ``(B, ...)`` tensors of the same shape.
        c: the Huber constant; default 0.001 (elementwise, diffusers' ``huber_c``) or
            :math:`0.00054\\sqrt{D}` (norm form, Song & Dhariwal 2023).
        per_sample_norm: use the norm form.
        reduction: "mean" | "sum" | "none" (``(B,)``).

    Example:
        >>> x, y = torch.zeros(2, 3), torch.full((2, 3), 4.0)
        >>> round(pseudo_huber_distance(x, y, c=3.0).item(), 6)  # sqrt(16 + 9) - 3
        2.0
        >>> pseudo_huber_distance(x, y, c=0.0, per_sample_norm=True, reduction="none")  # ||x - y||
        tensor([6.9282, 6.9282])
    """
    check_tensor(input, "input")
    check_tensor(target, "target")
    check_same_shape(input, target, "input", "target")
    diff = _work(input) - _work(target)
    flat = diff.reshape(diff.shape[0], -1) if diff.ndim else diff.reshape(1, 1)
    if per_sample_norm:
        cc = 0.00054 * math.sqrt(flat.shape[1]) if c is None else c
        check_positive(cc, "c", strict=False)
        per = torch.sqrt(flat.square().sum(dim=1) + cc**2) - cc
    else:
        cc = 0.001 if c is None else c
        check_positive(cc, "c", strict=False)
        per = (torch.sqrt(flat.square() + cc**2) - cc).mean(dim=1)
    return reduce_loss(per, reduction)


def compute_distance(
    input: torch.Tensor,
    target: torch.Tensor,
    distance: DistanceLike = "mse",
    *,
    c: float | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Distance ``d(input, target)`` by name (:data:`DISTANCES`) or callable, reduced over the batch.

    A callable must return per-sample values ``(B,)`` (reduced here) or an already reduced scalar
    (returned as is when ``reduction != "none"``).

    Example:
        >>> x, y = torch.zeros(2, 4), torch.ones(2, 4)
        >>> compute_distance(x, y, "mse").item(), compute_distance(x, y, "l1", reduction="none").tolist()
        (1.0, [1.0, 1.0])
        >>> compute_distance(x, y, lambda a, b: (a - b).abs().amax(dim=1)).item()
        1.0
    """
    check_tensor(input, "input")
    check_tensor(target, "target")
    if callable(distance):
        out = distance(input, target)
        if not isinstance(out, torch.Tensor):
            raise DTypeError(
                f"Expected the distance callable to return a tensor, but got {type(out).__name__}."
            )
        out = _work(out)
        if out.ndim == 0:
            if reduction == "none":
                raise ShapeError(
                    "reduction='none' needs per-sample values, but the distance callable returned a scalar; make "
                    "it return shape (B,).",
                    name="distance",
                    expected=(input.shape[0],),
                    actual=(),
                )
            return out
        if out.shape != (input.shape[0],):
            raise ShapeError(
                f"Expected the distance callable to return shape ({input.shape[0]},) or a scalar, but got "
                f"{tuple(out.shape)}. Average its output over non-batch dims.",
                name="distance",
                expected=(input.shape[0],),
                actual=tuple(out.shape),
            )
        return reduce_loss(out, reduction)
    check_option(distance, "distance", DISTANCES)
    if distance == "pseudo_huber":
        return pseudo_huber_distance(input, target, c, reduction=reduction)
    if distance == "pseudo_huber_norm":
        return pseudo_huber_distance(input, target, c, per_sample_norm=True, reduction=reduction)
    check_same_shape(input, target, "input", "target")
    diff = _work(input) - _work(target)
    flat = diff.reshape(1, 1) if diff.ndim == 0 else diff.reshape(diff.shape[0], -1)  # 0-d: one sample
    per = flat.square().mean(dim=1) if distance == "mse" else flat.abs().mean(dim=1)
    return reduce_loss(per, reduction)
