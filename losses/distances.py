"""Distances between a prediction and a target, per sample: the ``d`` of every regression-style loss.

Every distance maps ``(input, target)`` of shape ``(B, ...)`` to per-sample values ``(B,)`` before
``reduction``, and computes in at least float32 (half and bf16 are upcast; float64 stays float64). "Per
sample" is over every non-batch dim: image latents ``(B, C, H, W)`` and video latents ``(B, C, F, H, W)``
(Wan) alike, so a video's distance equals that of its frames folded into the channels.

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
import numbers
from collections.abc import Callable
from typing import Literal

import torch

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_float_input,
    check_option,
    check_same_shape,
)

__all__ = ["DISTANCES", "DistanceLike", "compute_distance", "pseudo_huber_distance", "reduce_loss"]

DISTANCES: tuple[str, ...] = ("mse", "l1", "pseudo_huber", "pseudo_huber_norm")
DistanceLike = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reduction = Literal["mean", "sum", "none"]


_REDUCTIONS = ("mean", "sum", "none")


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """``reduction`` of already validated per-sample values (no checks: for the losses' own results)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_c(c: float | None, name: str, *, strict: bool = False) -> None:
    """``c`` is None or a finite Python number ``>= 0`` (``> 0`` with ``strict``); messages say ``name``."""
    if c is None:
        return
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise OptionError(
            f"Expected `{name}` (the pseudo-Huber constant) to be a Python number or None, but got "
            f"{type(c).__name__} {c!r}."
        )
    rel = "> 0" if strict else ">= 0"
    if not math.isfinite(c) or c < 0 or (strict and c == 0):
        raise OptionError(
            f"Expected `{name}` (the pseudo-Huber constant) to be finite and {rel}, but got {c!r}. Leave it "
            "None for the default."
        )


def _check_pair(
    input: torch.Tensor, target: torch.Tensor, input_name: str, target_name: str, finite: bool
) -> None:
    """Both floating, non-empty and (a value check, with ``finite``) finite."""
    check_float_input(input, input_name, finite=finite)
    check_float_input(target, target_name, finite=finite)


def reduce_loss(per_sample: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to per-sample loss values.

    Args:
        per_sample: floating per-sample values, usually shape ``(B,)`` ("mean" and "sum" reduce every
            element of any shape).
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (``per_sample`` returned unchanged).

    Returns:
        A 0-d tensor for ``"mean"`` / ``"sum"``; ``per_sample`` itself for ``"none"``.

    Raises:
        OptionError: ``reduction`` is not one of ``"mean"``, ``"sum"``, ``"none"``.
        DTypeError: ``per_sample`` is not a floating-point tensor.
        ShapeError: ``per_sample`` is empty (its mean would be NaN, its sum a silent 0).
        NonFiniteError: ``per_sample`` holds NaN or Inf (a value check, see :mod:`diffdistill.errors`).

    Example:
        >>> reduce_loss(torch.tensor([1.0, 3.0])).item(), reduce_loss(torch.tensor([1.0, 3.0]), "sum").item()
        (2.0, 4.0)
    """
    check_option(reduction, "reduction", _REDUCTIONS)
    check_float_input(per_sample, "per_sample")
    return _reduce(per_sample, reduction)


def _pseudo_huber(
    input: torch.Tensor, target: torch.Tensor, c: float | None, per_sample_norm: bool, reduction: str
) -> torch.Tensor:
    """The pseudo-Huber distance of validated inputs (see :func:`pseudo_huber_distance`)."""
    diff = _work(input) - _work(target)
    flat = diff.reshape(diff.shape[0], -1) if diff.ndim else diff.reshape(1, 1)
    if per_sample_norm:
        cc = 0.00054 * math.sqrt(flat.shape[1]) if c is None else c
        per = torch.sqrt(flat.square().sum(dim=1) + cc**2) - cc
    else:
        cc = 0.001 if c is None else c
        per = (torch.sqrt(flat.square() + cc**2) - cc).mean(dim=1)
    return _reduce(per, reduction)


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

    Computes in float32 for half / bf16 / float32 inputs and in float64 for float64 inputs.

    Args:
        input: the prediction, ``(B, ...)`` floating (a 0-d tensor is one sample).
        target: the target, the same shape as ``input``.
        c: the Huber constant, a finite number ``>= 0``. None (the default) means 0.001 for the elementwise
            form (diffusers' ``huber_c``) and :math:`0.00054\\sqrt{D}` for the norm form (Song & Dhariwal
            2023; ``D`` = elements per sample).
        per_sample_norm: use the norm form instead of the elementwise one (default False).
        reduction: ``"mean"`` (the default) or ``"sum"`` over the batch, or ``"none"``.

    Returns:
        A 0-d tensor, or per-sample distances of shape ``(B,)`` for ``reduction="none"``.

    Raises:
        OptionError: ``reduction`` is unknown, or ``c`` is not a finite number ``>= 0``.
        DTypeError: ``input`` or ``target`` is not a floating-point tensor, or ``per_sample_norm`` is no bool.
        ShapeError: ``input`` or ``target`` is empty, or their shapes differ (no broadcasting).
        NonFiniteError: ``input`` or ``target`` holds NaN or Inf (a value check).

    Example:
        >>> x, y = torch.zeros(2, 3), torch.full((2, 3), 4.0)
        >>> round(pseudo_huber_distance(x, y, c=3.0).item(), 6)  # sqrt(16 + 9) - 3
        2.0
        >>> pseudo_huber_distance(x, y, c=0.0, per_sample_norm=True, reduction="none")  # ||x - y||
        tensor([6.9282, 6.9282])
    """
    check_option(reduction, "reduction", _REDUCTIONS)
    check_bool(per_sample_norm, "per_sample_norm")
    _check_pair(input, target, "input", "target", True)
    check_same_shape(input, target, "input", "target")
    _check_c(c, "c")
    return _pseudo_huber(input, target, c, per_sample_norm, reduction)


def _compute_distance(
    input: torch.Tensor,
    target: torch.Tensor,
    distance: DistanceLike = "mse",
    *,
    c: float | None = None,
    reduction: str = "mean",
    input_name: str = "input",
    target_name: str = "target",
    c_name: str = "c",
    distance_name: str = "distance",
    finite: bool = True,
) -> torch.Tensor:
    """:func:`compute_distance` for wrappers: messages name the wrapper's own arguments.

    A loss that exposes the Huber constant as ``huber_c`` passes ``c_name="huber_c"``; one whose inputs are
    computed (a student's output, a teacher's target) rather than passed by its caller can pass
    ``finite=False`` to skip the finiteness check (a device sync) on its hot path.
    """
    check_option(reduction, "reduction", _REDUCTIONS)
    _check_pair(input, target, input_name, target_name, finite)
    batch = input.shape[0] if input.ndim else 1
    if callable(distance):
        if c is not None:
            raise OptionError(
                f"`{c_name}` is the pseudo-Huber constant and unused with a callable `{distance_name}`, but got "
                f"{c_name}={c!r}: leave it None, or use {distance_name}='pseudo_huber'."
            )
        target_batch = target.shape[0] if target.ndim else 1
        if target_batch != batch:
            raise ShapeError(
                f"Expected `{input_name}` and `{target_name}` to have the same batch size, but got "
                f"{input_name} {tuple(input.shape)} and {target_name} {tuple(target.shape)}.",
                name=f"{input_name}/{target_name}",
                expected=(batch,),
                actual=(target_batch,),
            )
        out = distance(input, target)
        if not isinstance(out, torch.Tensor):
            raise DTypeError(
                f"Expected the `{distance_name}` callable to return a tensor, but got {type(out).__name__}."
            )
        out = _work(out)
        if out.ndim == 0:
            if reduction == "none":
                raise ShapeError(
                    f"reduction='none' needs per-sample values, but the `{distance_name}` callable returned a "
                    "scalar; make it return shape (B,).",
                    name=distance_name,
                    expected=(batch,),
                    actual=(),
                )
            return out
        if out.shape != (batch,):
            raise ShapeError(
                f"Expected the `{distance_name}` callable to return shape ({batch},) or a scalar, but got "
                f"{tuple(out.shape)}. Average its output over non-batch dims.",
                name=distance_name,
                expected=(batch,),
                actual=tuple(out.shape),
            )
        return _reduce(out, reduction)
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise OptionError(
            f"Expected `{distance_name}` to be one of {list(DISTANCES)} or a callable d(input, target) -> (B,), "
            f"but got {distance!r}."
        )
    check_same_shape(input, target, input_name, target_name)
    if distance in ("pseudo_huber", "pseudo_huber_norm"):
        _check_c(c, c_name)
        return _pseudo_huber(input, target, c, distance == "pseudo_huber_norm", reduction)
    if c is not None:
        raise OptionError(
            f"`{c_name}` is the pseudo-Huber constant and unused with {distance_name}={distance!r}, but got "
            f"{c_name}={c!r}: leave it None, or use {distance_name}='pseudo_huber' or 'pseudo_huber_norm'."
        )
    diff = _work(input) - _work(target)
    flat = diff.reshape(1, 1) if diff.ndim == 0 else diff.reshape(diff.shape[0], -1)  # 0-d: one sample
    per = flat.square().mean(dim=1) if distance == "mse" else flat.abs().mean(dim=1)
    return _reduce(per, reduction)


def compute_distance(
    input: torch.Tensor,
    target: torch.Tensor,
    distance: DistanceLike = "mse",
    *,
    c: float | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Distance ``d(input, target)`` by name (:data:`DISTANCES`) or callable, reduced over the batch.

    Named distances compute in float32 for half / bf16 / float32 inputs and in float64 for float64 inputs.

    Args:
        input: the prediction, ``(B, ...)`` floating (a 0-d tensor is one sample).
        target: the target: the same shape as ``input`` for a named distance, the same batch size for a
            callable.
        distance: ``"mse"`` (the default), ``"l1"``, ``"pseudo_huber"``, ``"pseudo_huber_norm"`` (see the
            module docstring), or a callable ``fn(input, target)`` returning per-sample values ``(B,)``
            (reduced here) or an already reduced scalar (returned as is unless ``reduction="none"``).
        c: the pseudo-Huber constant, only for the two pseudo-Huber distances; None (the default) is their
            default constant (see :func:`pseudo_huber_distance`).
        reduction: ``"mean"`` (the default) or ``"sum"`` over the batch, or ``"none"``.

    Returns:
        A 0-d tensor, or per-sample distances of shape ``(B,)`` for ``reduction="none"``.

    Raises:
        OptionError: ``distance`` or ``reduction`` is unknown, ``c`` is not a finite number ``>= 0``, or
            ``c`` is given with a distance that has no such constant (``"mse"``, ``"l1"``, a callable).
        DTypeError: ``input`` or ``target`` is not a floating-point tensor, or a callable ``distance``
            returns no tensor.
        ShapeError: ``input`` or ``target`` is empty, their shapes differ (named distances; no broadcasting)
            or their batch sizes differ (callables), or a callable returns neither ``(B,)`` nor a scalar (a
            scalar with ``reduction="none"``).
        NonFiniteError: ``input`` or ``target`` holds NaN or Inf (a value check).

    Example:
        >>> x, y = torch.zeros(2, 4), torch.ones(2, 4)
        >>> compute_distance(x, y, "mse").item(), compute_distance(x, y, "l1", reduction="none").tolist()
        (1.0, [1.0, 1.0])
        >>> compute_distance(x, y, lambda a, b: (a - b).abs().amax(dim=1)).item()
        1.0
    """
    return _compute_distance(input, target, distance, c=c, reduction=reduction)
