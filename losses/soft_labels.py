r"""Soft segmentation labels for the Dice semimetric losses (:mod:`diffdistill.losses.dice`).

Four ways users build soft labels by hand, each returning probabilities of shape (B, C, \*spatial)
that sum to 1 over C at every labelled pixel (all zeros at ignored pixels, so pass
``mask = target != ignore_index`` to the loss):

* :func:`uniform_label_smoothing`: :math:`(1 - \varepsilon)\,\mathrm{onehot}(y) + \varepsilon / C` everywhere;
* :func:`boundary_label_smoothing`: the same, but only at pixels within a k×k neighbourhood of another
  class (the "LS" labels of Wang et al., MICCAI 2023, with ε = 0.5, k = 3);
* :func:`multi_rater_soft_labels`: the (weighted) average of several annotators' one-hot maps (the
  "MR" labels);
* :func:`teacher_soft_labels`: a teacher's softmax/sigmoid at a temperature (knowledge distillation).

Reference:
    Z. Wang, T. Popordanoska, J. Bertels, R. Lemmens, M. B. Blaschko, "Dice Semimetric Losses:
    Optimizing the Dice Score with Soft Labels", MICCAI 2023, arXiv:2303.16296.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_dtype_floating,
    check_option,
    check_positive,
    check_probability,
    check_tensor,
    value_checks_enabled,
)

__all__ = [
    "boundary_label_smoothing",
    "multi_rater_soft_labels",
    "teacher_soft_labels",
    "uniform_label_smoothing",
]


def _check_labels(target: torch.Tensor, num_classes: int, ignore_index: int | None, name: str) -> None:
    check_tensor(target, name)
    if target.is_floating_point() or target.dtype.is_complex:
        raise DTypeError(
            f"Expected `{name}` to hold integer class indices, but got dtype {target.dtype}. "
            f"Cast it with {name}.long() if the values are whole numbers."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise OptionError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    if value_checks_enabled():
        bad = (target < 0) | (target >= num_classes)
        if ignore_index is not None:
            bad &= target != ignore_index
        if bool(bad.any()):
            values = torch.unique(target[bad])[:5].tolist()
            raise ValueError(
                f"Expected `{name}` class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
                f"but {int(bad.sum())} value(s) are outside, e.g. {values}."
            )


def _one_hot(
    target: torch.Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """(B, *spatial) integer labels -> (B, C, *spatial) one-hot in ``dtype``; ignored pixels all zero."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DTypeError(
            f"Expected `dtype` (of the soft labels) to be a floating torch.dtype, but got {dtype!r}."
        )
    labels = target.long()
    keep = None
    if ignore_index is not None:
        keep = labels != ignore_index
        labels = labels.masked_fill(~keep, 0)
    out = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), dtype=dtype, device=labels.device)
    out.scatter_(1, labels.unsqueeze(1), 1.0)
    if keep is not None:
        out.mul_(keep.unsqueeze(1))
    return out


def uniform_label_smoothing(
    target: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.1,
    *,
    ignore_index: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Uniformly smoothed one-hot labels, :math:`(1 - \varepsilon)\,\mathrm{onehot}(y) + \varepsilon / C`.

    Args:
        target: integer class indices, shape (B, \*spatial).
        num_classes: number of classes C.
        epsilon: smoothing mass in [0, 1] spread evenly over the C classes.
        ignore_index: label value whose pixels get an all-zero soft label (mask them in the loss).
        dtype: floating dtype of the result.

    Returns:
        Soft labels of shape (B, C, \*spatial).

    Example:
        >>> from diffdistill.losses import uniform_label_smoothing
        >>> labels = torch.tensor([[0, 2, 255]])
        >>> uniform_label_smoothing(labels, num_classes=3, epsilon=0.3, ignore_index=255)[0]
        tensor([[0.8000, 0.1000, 0.0000],
                [0.1000, 0.1000, 0.0000],
                [0.1000, 0.8000, 0.0000]])
    """
    _check_labels(target, num_classes, ignore_index, "target")
    check_probability(epsilon, "epsilon")
    onehot = _one_hot(target, num_classes, ignore_index, dtype)
    kept = onehot.sum(1, keepdim=True)  # 1 at labelled pixels, 0 at ignored ones
    return onehot * (1 - epsilon) + kept * (epsilon / num_classes)


def boundary_label_smoothing(
    target: torch.Tensor,
    num_classes: int,
    epsilon: float = 0.5,
    kernel_size: int = 3,
    *,
    ignore_index: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Label smoothing applied only near class boundaries (the "LS" labels of Wang et al., 2023).

    A labelled pixel is a boundary pixel when its ``kernel_size`` neighbourhood (a square in 2D, a
    cube in 3D; out-of-image and ignored pixels do not count) holds a labelled pixel of another class.
    Boundary pixels get :math:`(1 - \varepsilon)\,\mathrm{onehot}(y) + \varepsilon / C`, the others stay
    one-hot, ignored pixels are all zero. The defaults ε = 0.5, k = 3 are those of the paper's
    ``configs/labels/ls.yaml``; the result matches the official construction on the reference case.

    Args:
        target: integer class indices, shape (B, \*spatial) with 1 to 3 spatial dimensions.
        num_classes: number of classes C.
        epsilon: smoothing mass in [0, 1] at boundary pixels.
        kernel_size: odd neighbourhood size k.
        ignore_index: label value to ignore (all-zero soft label, never a neighbour).
        dtype: floating dtype of the result.

    Returns:
        Soft labels of shape (B, C, \*spatial).

    Example:
        >>> from diffdistill.losses import boundary_label_smoothing
        >>> labels = torch.tensor([[[0, 0, 0, 1, 1, 1]]])          # (B=1, H=1, W=6)
        >>> boundary_label_smoothing(labels, num_classes=2, epsilon=0.5)[0, 1]
        tensor([[0.0000, 0.0000, 0.2500, 0.7500, 1.0000, 1.0000]])
    """
    _check_labels(target, num_classes, ignore_index, "target")
    check_probability(epsilon, "epsilon")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise OptionError(f"Expected `kernel_size` to be an odd positive int, but got {kernel_size!r}.")
    spatial = target.ndim - 1
    if spatial not in (1, 2, 3):
        raise ShapeError(
            f"Expected `target` laid out as (B, *spatial) with 1 to 3 spatial dimensions, but got shape "
            f"{tuple(target.shape)}.",
            name="target",
            expected="(B, D1[, D2[, D3]])",
            actual=tuple(target.shape),
        )
    onehot = _one_hot(target, num_classes, ignore_index, dtype)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
    # max_pool pads with -inf, so pixels outside the image never count as another class.
    nearby = pool(onehot.float(), kernel_size, stride=1, padding=kernel_size // 2).sum(1, keepdim=True)
    kept = onehot.sum(1, keepdim=True)
    boundary = (nearby > 1).to(dtype) * kept
    return onehot - boundary * epsilon * onehot + boundary * (epsilon / num_classes)


def multi_rater_soft_labels(
    annotations: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    ignore_index: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Average several annotators' label maps into soft labels (the "MR" labels of Wang et al., 2023).

    .. math::

        y_{c} = \frac{\sum_r w_r\,[a_r = c]}{\sum_r w_r\,[a_r \ne \text{ignore}]}

    For binary masks (``num_classes=2``) this is ``cat(1 - fg, fg)`` with ``fg`` the rater average, the
    official construction. A pixel no rater labelled gets an all-zero soft label.

    Args:
        annotations: integer label maps of shape (R, B, \*spatial), or a sequence of R tensors of
            shape (B, \*spatial).
        num_classes: number of classes C.
        weights: optional non-negative weight per rater (length R); default equal weights.
        ignore_index: label value meaning "this rater did not label this pixel".
        dtype: floating dtype of the result.

    Returns:
        Soft labels of shape (B, C, \*spatial).

    Example:
        >>> from diffdistill.losses import multi_rater_soft_labels
        >>> raters = torch.tensor([[[0, 1]], [[1, 1]], [[0, 1]], [[1, 0]]])   # R=4, B=1, W=2
        >>> multi_rater_soft_labels(raters, num_classes=2)[0]
        tensor([[0.5000, 0.2500],
                [0.5000, 0.7500]])
    """
    if not isinstance(annotations, torch.Tensor):
        annotations = torch.stack(list(annotations))
    _check_labels(annotations, num_classes, ignore_index, "annotations")
    if annotations.ndim < 2:
        raise ShapeError(
            f"Expected `annotations` laid out as (R, B, *spatial), but got shape {tuple(annotations.shape)}.",
            name="annotations",
            expected="(R, B, *spatial)",
            actual=tuple(annotations.shape),
        )
    num_raters = annotations.shape[0]
    if weights is None:
        w = torch.ones(num_raters, dtype=dtype, device=annotations.device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=annotations.device)
        if w.shape != (num_raters,):
            raise ShapeError(
                f"Expected `weights` of length R = {num_raters} (from `annotations` {tuple(annotations.shape)}), "
                f"but got shape {tuple(w.shape)}.",
                name="weights",
                expected=(num_raters,),
                actual=tuple(w.shape),
            )
        if value_checks_enabled() and bool((w < 0).any() | ~torch.isfinite(w).all() | (w.sum() <= 0)):
            raise ValueError(f"Expected `weights` finite, >= 0 and not all 0, but got {w.tolist()}.")
    flat = annotations.reshape(num_raters * annotations.shape[1], *annotations.shape[2:])
    onehot = _one_hot(flat, num_classes, ignore_index, dtype)
    onehot = onehot.reshape(num_raters, annotations.shape[1], num_classes, *annotations.shape[2:])
    w = w.reshape(num_raters, *([1] * (onehot.ndim - 1)))
    votes = (onehot * w).sum(0)
    total = votes.sum(1, keepdim=True)
    return votes / torch.where(total > 0, total, torch.ones_like(total))


def teacher_soft_labels(
    logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mode: Literal["multiclass", "multilabel", "binary"] = "multiclass",
) -> torch.Tensor:
    r"""A teacher's probabilities at a temperature, detached, as soft labels for distillation.

    ``softmax(logits / T)`` over dim 1 for ``mode="multiclass"``, ``sigmoid(logits / T)`` otherwise,
    computed in at least float32. Use the same ``temperature`` for the student in
    :func:`~diffdistill.losses.dice.dice_semimetric_loss`.

    Args:
        logits: teacher logits, shape (B, C, \*spatial).
        temperature: T > 0; T > 1 softens the distribution.
        mode: ``"multiclass"``, ``"multilabel"`` or ``"binary"``, as in the loss.

    Returns:
        Probabilities of the same shape as ``logits`` (no gradient).

    Example:
        >>> from diffdistill.losses import teacher_soft_labels
        >>> teacher = torch.randn(2, 4, 8, 8)
        >>> soft = teacher_soft_labels(teacher, temperature=2.0)
        >>> soft.shape, bool(torch.allclose(soft.sum(1), torch.ones(2, 8, 8)))
        (torch.Size([2, 4, 8, 8]), True)
    """
    check_tensor(logits, "logits")
    check_dtype_floating(logits, "logits")
    check_positive(temperature, "temperature")
    check_option(mode, "mode", ("multiclass", "multilabel", "binary"))
    if logits.ndim < 2:
        raise ShapeError(
            f"Expected `logits` laid out as (B, C, *spatial), but got shape {tuple(logits.shape)}.",
            name="logits",
            expected="(B, C, *spatial)",
            actual=tuple(logits.shape),
        )
    with torch.no_grad():
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        return torch.softmax(x, dim=1) if mode == "multiclass" else torch.sigmoid(x)
