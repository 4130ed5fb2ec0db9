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
    check_float_input,
    check_int,
    check_nonempty,
    check_option,
    check_optional_int,
    check_probability,
    check_real,
    check_tensor,
    value_checks_enabled,
)

__all__ = [
    "boundary_label_smoothing",
    "multi_rater_soft_labels",
    "teacher_soft_labels",
    "uniform_label_smoothing",
]


def _check_labels(
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    name: str,
    *,
    layout: str = "(B, *spatial)",
    min_ndim: int = 1,
) -> None:
    """Integer (or bool) class indices laid out as ``layout``, non-empty, in ``[0, C)`` or ``ignore_index``."""
    check_tensor(target, name)
    if target.is_floating_point() or target.dtype.is_complex:
        raise DTypeError(
            f"Expected `{name}` to hold integer class indices, but got dtype {target.dtype}. "
            f"Cast it with {name}.long() if the values are whole numbers."
        )
    if target.ndim < min_ndim:
        raise ShapeError(
            f"Expected `{name}` laid out as {layout}, but got shape {tuple(target.shape)}.",
            name=name,
            expected=layout,
            actual=tuple(target.shape),
        )
    check_nonempty(target, name)
    check_int(num_classes, "num_classes", minimum=1)
    check_optional_int(ignore_index, "ignore_index")
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
        target: integer (or bool) class indices in ``[0, C)``, shape (B, \*spatial), non-empty.
        num_classes: number of classes C (a positive int).
        epsilon: smoothing mass in [0, 1] spread evenly over the C classes. Defaults to 0.1; 0 gives the
            one-hot labels.
        ignore_index: label value whose pixels get an all-zero soft label (mask them in the loss with
            ``mask = target != ignore_index``). Defaults to ``None``: every pixel is labelled.
        dtype: floating dtype of the result. Defaults to float32.

    Returns:
        Soft labels of shape (B, C, \*spatial) that sum to 1 over C at labelled pixels.

    Raises:
        DTypeError: ``target`` not an integer tensor, ``epsilon`` not a number, ``num_classes`` or ``ignore_index`` not an int,
            or ``dtype`` not a floating dtype.
        ShapeError: ``target`` empty or 0-d.
        OptionError: ``num_classes`` < 1, or ``epsilon`` outside [0, 1].
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index`` (value check).

    Example:
        >>> from diffdistill.losses import uniform_label_smoothing
        >>> labels = torch.tensor([[0, 2, 255]])
        >>> uniform_label_smoothing(labels, num_classes=3, epsilon=0.3, ignore_index=255)[0]
        tensor([[0.8000, 0.1000, 0.0000],
                [0.1000, 0.1000, 0.0000],
                [0.1000, 0.8000, 0.0000]])
    """
    _check_labels(target, num_classes, ignore_index, "target")
    check_probability(check_real(epsilon, "epsilon", allow_tensor=True), "epsilon")
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
        target: integer (or bool) class indices in ``[0, C)``, shape (B, \*spatial) with 1 to 3 spatial
            dimensions, non-empty.
        num_classes: number of classes C (a positive int).
        epsilon: smoothing mass in [0, 1] at boundary pixels. Defaults to 0.5 (the paper's).
        kernel_size: odd neighbourhood size k. Defaults to 3 (the paper's).
        ignore_index: label value to ignore (all-zero soft label, never a neighbour). Defaults to ``None``:
            every pixel is labelled.
        dtype: floating dtype of the result. Defaults to float32.

    Returns:
        Soft labels of shape (B, C, \*spatial) that sum to 1 over C at labelled pixels.

    Raises:
        DTypeError: ``target`` not an integer tensor, ``epsilon`` not a number, ``num_classes`` or ``ignore_index`` not an int,
            or ``dtype`` not a floating dtype.
        ShapeError: ``target`` empty, or without 1 to 3 spatial dimensions.
        OptionError: ``num_classes`` < 1, ``epsilon`` outside [0, 1], or ``kernel_size`` not
            an odd positive int.
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index`` (value check).

    Example:
        >>> from diffdistill.losses import boundary_label_smoothing
        >>> labels = torch.tensor([[[0, 0, 0, 1, 1, 1]]])          # (B=1, H=1, W=6)
        >>> boundary_label_smoothing(labels, num_classes=2, epsilon=0.5)[0, 1]
        tensor([[0.0000, 0.0000, 0.2500, 0.7500, 1.0000, 1.0000]])
    """
    _check_labels(target, num_classes, ignore_index, "target")
    check_probability(check_real(epsilon, "epsilon", allow_tensor=True), "epsilon")
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
        annotations: integer label maps of shape (R, B, \*spatial) with R >= 1 raters, or a non-empty
            sequence of R tensors of the same shape (B, \*spatial).
        num_classes: number of classes C (a positive int).
        weights: non-negative weight per rater (a sequence or tensor of length R, not all 0). Defaults to
            ``None``: equal weights.
        ignore_index: label value meaning "this rater did not label this pixel". Defaults to ``None``:
            every rater labelled every pixel.
        dtype: floating dtype of the result. Defaults to float32.

    Returns:
        Soft labels of shape (B, C, \*spatial): 1 over C where some rater labelled the pixel, 0 elsewhere.

    Raises:
        DTypeError: ``annotations`` not integer tensors, ``weights`` not numbers, ``ignore_index`` not an
            int, or ``dtype`` not a floating dtype.
        ShapeError: no rater, an empty batch, raters of different shapes, or ``weights`` not of length R.
        OptionError: ``num_classes`` < 1.
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index``, or ``weights`` negative,
            non-finite or all 0 (value checks).

    Example:
        >>> from diffdistill.losses import multi_rater_soft_labels
        >>> raters = torch.tensor([[[0, 1]], [[1, 1]], [[0, 1]], [[1, 0]]])   # R=4, B=1, W=2
        >>> multi_rater_soft_labels(raters, num_classes=2)[0]
        tensor([[0.5000, 0.2500],
                [0.5000, 0.7500]])
    """
    if not isinstance(annotations, torch.Tensor):
        if isinstance(annotations, (str, bytes)) or not isinstance(annotations, Sequence):
            raise DTypeError(
                "Expected `annotations` to be a tensor (R, B, *spatial) or a sequence of R tensors (B, *spatial), "
                f"but got {type(annotations).__name__}."
            )
        raters = list(annotations)
        if not raters:
            raise ShapeError(
                "Expected `annotations` to hold at least one rater's label map, but got an empty sequence.",
                name="annotations",
                expected="R >= 1",
                actual=(0,),
            )
        for i, rater in enumerate(raters):
            check_tensor(rater, f"annotations[{i}]")
            if rater.shape != raters[0].shape:
                raise ShapeError(
                    f"Expected every rater's label map to have the shape of `annotations[0]` "
                    f"{tuple(raters[0].shape)}, but got `annotations[{i}]` {tuple(rater.shape)}.",
                    name=f"annotations[{i}]",
                    expected=tuple(raters[0].shape),
                    actual=tuple(rater.shape),
                )
        annotations = torch.stack(raters)
    if annotations.ndim >= 1 and annotations.shape[0] == 0:
        raise ShapeError(
            "Expected `annotations` to hold at least one rater's label map (R >= 1 in dim 0), but got shape "
            f"{tuple(annotations.shape)}.",
            name="annotations",
            expected="R >= 1",
            actual=tuple(annotations.shape),
        )
    _check_labels(
        annotations, num_classes, ignore_index, "annotations", layout="(R, B, *spatial)", min_ndim=2
    )
    num_raters = annotations.shape[0]
    if weights is None:
        w = torch.ones(num_raters, dtype=dtype, device=annotations.device)
    else:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise DTypeError(
                f"Expected `dtype` (of the soft labels) to be a floating torch.dtype, but got {dtype!r}."
            )
        try:
            w = torch.as_tensor(weights, dtype=dtype, device=annotations.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DTypeError(
                f"Expected `weights` to be a sequence or tensor of R = {num_raters} numbers, but got "
                f"{type(weights).__name__} {weights!r} ({err})."
            ) from err
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
        logits: teacher logits, shape (B, C, \*spatial) (C = 1 for ``"binary"``), floating, non-empty.
        temperature: T > 0; T > 1 softens the distribution. Defaults to 1 (the teacher's probabilities).
        mode: ``"multiclass"`` (softmax over C; the default), ``"multilabel"`` or ``"binary"`` (sigmoid), as
            in the loss.

    Returns:
        Probabilities of the same shape as ``logits`` (no gradient), in at least float32.

    Raises:
        DTypeError: ``logits`` not a floating tensor, or ``temperature`` not a number.
        ShapeError: ``logits`` empty, not laid out as (B, C, \*spatial), or with C != 1 for ``"binary"``.
        OptionError: ``temperature`` not > 0 or not finite, or an unknown ``mode``.
        NonFiniteError: ``logits`` holds NaN/Inf (value check).

    Example:
        >>> from diffdistill.losses import teacher_soft_labels
        >>> teacher = torch.randn(2, 4, 8, 8)
        >>> soft = teacher_soft_labels(teacher, temperature=2.0)
        >>> soft.shape, bool(torch.allclose(soft.sum(1), torch.ones(2, 8, 8)))
        (torch.Size([2, 4, 8, 8]), True)
    """
    check_tensor(logits, "logits")
    check_option(mode, "mode", ("multiclass", "multilabel", "binary"))
    check_real(temperature, "temperature", low=0, strict=True, allow_tensor=True)
    if isinstance(logits, torch.Tensor) and logits.ndim < 2:
        raise ShapeError(
            f"Expected `logits` laid out as (B, C, *spatial), but got shape {tuple(logits.shape)}.",
            name="logits",
            expected="(B, C, *spatial)",
            actual=tuple(logits.shape),
        )
    check_float_input(logits, "logits")
    if mode == "binary" and logits.shape[1] != 1:
        raise ShapeError(
            f"mode='binary' expects one channel, `logits` (B, 1, *spatial), but got shape {tuple(logits.shape)}. "
            "Use mode='multiclass' for a C-class softmax or 'multilabel' for independent channels.",
            name="logits",
            expected=(logits.shape[0], 1, *logits.shape[2:]),
            actual=tuple(logits.shape),
        )
    with torch.no_grad():
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        return torch.softmax(x, dim=1) if mode == "multiclass" else torch.sigmoid(x)
