r"""Dice semimetric losses: Dice, Jaccard and Tversky losses that stay exact with soft labels.

The classic soft Dice loss :math:`1 - 2\langle x, y\rangle / (\|x\|_1 + \|y\|_1)` is not minimised at
:math:`x = y` when the label :math:`y` is soft (label smoothing, several annotators, a teacher's
probabilities). The Dice semimetric loss (DML) of Wang et al. replaces the intersection by a
cardinality computed from norms,

.. math::

    TP = \tfrac12\left(\|x\|_1 + \|y\|_1 - \|x - y\|_1\right),\quad FP = \|x\|_1 - TP,\quad
    FN = \|y\|_1 - TP,

which equals :math:`\langle x, y\rangle` for hard labels and :math:`\sum_i \min(x_i, y_i)` for non-negative
soft labels, so the loss is zero if and only if the prediction equals the label.

Reference:
    Z. Wang, T. Popordanoska, J. Bertels, R. Lemmens, M. B. Blaschko, "Dice Semimetric Losses:
    Optimizing the Dice Score with Soft Labels", MICCAI 2023, arXiv:2303.16296.

The numbers match the authors' ``JDTLoss`` (JDTLosses @ 68ce8ac) to float64 round-off; see
``tests/losses/test_dice.py`` for the reference vectors and the option mapping.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_dtype_floating,
    check_finite,
    check_nonempty,
    check_option,
    check_optional_int,
    check_probability,
    check_real,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["DiceSemimetricLoss", "dice_semimetric_loss"]

Mode = Literal["multiclass", "multilabel", "binary"]
Aggregate = Literal["batch", "image", "class"]

_MODES = ("multiclass", "multilabel", "binary")
_AGGREGATES = ("batch", "image", "class")
_ACTIVE = ("present", "all", None)
_REDUCTIONS = ("mean", "none")


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _check_classes(classes: Any) -> tuple[int, ...] | None:
    """``classes`` as a tuple of ints (None stays None); the range is checked once C is known."""
    if classes is None:
        return None
    if isinstance(classes, torch.Tensor):
        if (
            classes.is_floating_point()
            or classes.is_complex()
            or classes.dtype == torch.bool
            or classes.ndim != 1
        ):
            raise OptionError(
                f"Expected `classes` to be a non-empty list of channel indices (ints), but got a tensor of shape "
                f"{_fmt(classes.shape)} and dtype {classes.dtype}."
            )
        items: list[Any] = classes.tolist()
    else:
        try:
            if isinstance(classes, (str, bytes)):
                raise TypeError(type(classes).__name__)
            items = list(classes)
        except TypeError as err:
            raise OptionError(
                f"Expected `classes` to be a non-empty list of channel indices (ints), but got "
                f"{type(classes).__name__} {classes!r}."
            ) from err
    if not items or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in items):
        raise OptionError(
            f"Expected `classes` to be a non-empty list of channel indices (ints), but got {items!r}."
        )
    return tuple(int(c) for c in items)


def _class_weights_tensor(class_weights: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``class_weights`` as a real tensor; :class:`DTypeError` for what is not a sequence of numbers."""
    try:
        weights = torch.as_tensor(class_weights, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DTypeError(
            f"Expected `class_weights` to be a sequence or tensor of C numbers, but got "
            f"{type(class_weights).__name__} {class_weights!r} ({err})."
        ) from err
    if weights.dtype == torch.bool or weights.is_complex():
        raise DTypeError(f"Expected `class_weights` to hold real numbers, but got dtype {weights.dtype}.")
    return weights


def _aggregate_weights(aggregate: str | Mapping[str, float]) -> tuple[float, float, float]:
    """Turn ``aggregate`` into the weights of the (batch, image, class) terms."""
    if isinstance(aggregate, str):
        check_option(aggregate, "aggregate", _AGGREGATES)
        return tuple(float(name == aggregate) for name in _AGGREGATES)  # type: ignore[return-value]
    if not isinstance(aggregate, Mapping):
        raise OptionError(
            f"Expected `aggregate` to be one of {list(_AGGREGATES)} or a mapping of weights such as "
            f"{{'image': 0.5, 'class': 0.5}}, but got {aggregate!r}."
        )
    unknown = [k for k in aggregate if k not in _AGGREGATES]
    if unknown:
        raise OptionError(
            f"Expected the keys of `aggregate` to be among {list(_AGGREGATES)}, but got {unknown}."
        )
    weights = tuple(float(aggregate.get(name, 0.0)) for name in _AGGREGATES)
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError(
            "Expected the weights in `aggregate` to be finite, >= 0 and not all 0, "
            f"but got {dict(aggregate)!r}."
        )
    return weights  # type: ignore[return-value]


def _validate_options(
    *,
    mode: str,
    from_logits: bool,
    temperature: float,
    alpha: float,
    beta: float,
    gamma: float,
    smooth: float,
    norm: int,
    log_loss: bool,
    aggregate: str | Mapping[str, float],
    active_classes: str | None,
    threshold: float,
    ignore_index: int | None,
    reduction: str,
) -> tuple[float, float, float]:
    """Check every option that does not depend on the tensors; return the aggregate weights."""
    check_option(mode, "mode", _MODES)
    check_bool(from_logits, "from_logits")
    check_bool(log_loss, "log_loss")
    check_real(temperature, "temperature", low=0, strict=True, allow_tensor=True)
    if not from_logits and temperature != 1.0:
        raise OptionError(
            f"`temperature` only divides logits, but got temperature={temperature!r} with from_logits=False. "
            "Pass logits with from_logits=True, or leave temperature at 1.0."
        )
    check_real(alpha, "alpha", low=0, allow_tensor=True)
    check_real(beta, "beta", low=0, allow_tensor=True)
    check_real(gamma, "gamma", low=0, strict=True, allow_tensor=True)
    check_real(smooth, "smooth", low=0, allow_tensor=True)
    check_option(norm, "norm", (1, 2))
    weights = _aggregate_weights(aggregate)
    check_option(active_classes, "active_classes", _ACTIVE)
    check_probability(check_real(threshold, "threshold", allow_tensor=True), "threshold")
    check_optional_int(ignore_index, "ignore_index")
    check_option(reduction, "reduction", _REDUCTIONS)
    if reduction == "none" and sum(w > 0 for w in weights) > 1:
        raise OptionError(
            f"reduction='none' returns the per-class losses of one aggregate, but `aggregate` mixes "
            f"several: {aggregate!r}. Pick one of {list(_AGGREGATES)}, or use reduction='mean'."
        )
    return weights


class _SoftmaxHardLabelStats(torch.autograd.Function):
    """Fused softmax + hard-label statistics (L1 norm): ``(sum_n w p_cn, sum_{n: y_n = c} w p_cn)``.

    For probabilities in [0, 1] and one-hot labels, ``||p - y||_1 = ||p||_1 + ||y||_1 - 2 <p, y>``, so the
    soft TP is the gathered probability of the labelled class. This avoids materialising a one-hot
    tensor and three norms; the backward pass writes one (B, C, N) tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prob = torch.softmax(logits, dim=1)
        picked = prob.gather(1, index.unsqueeze(1)).squeeze(1)  # (B, N)
        if weight is None:
            card = prob.sum(dim=2)
            picked_w = picked
        else:
            card = torch.bmm(prob, weight.unsqueeze(2)).squeeze(2)
            picked_w = picked * weight
        inter = torch.zeros_like(card).scatter_add_(1, index, picked_w)
        ctx.save_for_backward(prob, index, picked, weight)
        return card, inter

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_card: torch.Tensor, grad_inter: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        prob, index, picked, weight = ctx.saved_tensors
        # dL/dp_cn = w_n (gP_c + [y_n = c] gG_c); softmax backward: dz = p (dL/dp - sum_c p dL/dp).
        picked_grad = picked * grad_inter.gather(1, index)  # p_{y_n} gG_{y_n}, (B, N)
        dot = torch.bmm(grad_card.unsqueeze(1), prob).squeeze(1) + picked_grad  # (B, N)
        grad = grad_card.unsqueeze(2) - dot.unsqueeze(1)
        grad.mul_(prob)
        grad.scatter_add_(1, index.unsqueeze(1), picked_grad.unsqueeze(1))
        if weight is not None:
            grad.mul_(weight.unsqueeze(1))
        return grad, None, None


def _skipped_labels(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int | None
) -> torch.Tensor | None:
    """Hard-label entries that take no part: equal to ``ignore_index`` or where ``mask`` is False.

    ``mask`` is (B, *spatial); ``labels`` are class indices of that shape or (B, C, *spatial) 0/1 labels.
    """
    skip = None if ignore_index is None else labels == ignore_index
    if mask is not None:
        off = ~mask if labels.ndim == mask.ndim else ~mask.unsqueeze(1)
        skip = off if skip is None else skip | off
    return skip


def _check_label_values(
    labels: torch.Tensor,
    low: int,
    high: int,
    skip: torch.Tensor | None,
    ignore_index: int | None,
    what: str,
) -> None:
    """Raise ``ValueError`` if integer ``labels`` fall outside ``[low, high)`` where they are not ``skip``-ped."""
    bad = (labels < low) | (labels >= high)
    if skip is not None:
        bad &= ~skip
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:5].tolist()
        hint = (
            f" Pixels equal to ignore_index={ignore_index} are skipped."
            if ignore_index is not None
            else " If they mark pixels to skip (e.g. 255), pass ignore_index=<that value> or a `mask`."
        )
        raise ValueError(
            f"Expected `target` {what} in [{low}, {high}), but {int(bad.sum())} value(s) are outside, "
            f"e.g. {values}.{hint}"
        )


def _soft_tolerance(dtype: torch.dtype) -> float:
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def _check_soft_target(target: torch.Tensor, mask: torch.Tensor | None, multiclass: bool) -> None:
    """Detailed value checks for float targets (B, C, *spatial): in [0, 1], summing to 1 over C."""
    keep = None if mask is None else mask.unsqueeze(1)
    bad = ~((target >= 0) & (target <= 1))  # also catches NaN
    if keep is not None:
        bad &= keep
    if bool(bad.any()):
        n_nan = int((torch.isnan(target) & bad).sum())
        raise ValueError(
            f"Expected soft `target` values in [0, 1], but {int(bad.sum())} value(s) are outside "
            f"({n_nan} NaN; min {float(target.nan_to_num().min()):.4g}, max "
            f"{float(target.nan_to_num().max()):.4g}). Soft labels are probabilities; integer class "
            "maps must have an integer dtype."
        )
    if multiclass:
        tol = _soft_tolerance(target.dtype)
        err = (target.sum(dim=1, dtype=torch.promote_types(target.dtype, torch.float32)) - 1).abs()
        if mask is not None:
            err = err * mask
        worst = float(err.max()) if err.numel() else 0.0
        if worst > tol:
            raise ValueError(
                "Expected soft `target` to sum to 1 over the class dimension (dim 1) in mode='multiclass', "
                f"but the sum is off by up to {worst:.4g} (tolerance {tol:.1g}). Normalise it "
                "(target / target.sum(1, keepdim=True)), mask pixels without a label with `mask`, or use "
                "mode='multilabel' for independent channels."
            )


def _value_checks(
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    mode: str,
    hard: bool,
    from_logits: bool,
    ignore_index: int | None,
) -> None:
    """Read-the-values checks with one device sync on the common path; details only on failure."""
    num_classes = input.shape[1]
    high = num_classes if mode == "multiclass" else 2
    # summing in >= float32 keeps a float16 sum from overflowing (an overflow only costs the exact check)
    flags = [torch.isfinite(input.sum(dtype=torch.promote_types(input.dtype, torch.float32)))]
    if not from_logits:
        low_in, high_in = torch.aminmax(input)
        flags.append((low_in >= 0) & (high_in <= 1))
    skip = _skipped_labels(target, mask, ignore_index) if hard else None
    if hard:
        labels = target if skip is None else target.masked_fill(skip, 0)
        low, top = torch.aminmax(labels)
        flags.append((low >= 0) & (top < high))
    else:
        low, top = torch.aminmax(target)
        flags.append((low >= 0) & (top <= 1))  # False for NaN too
        if mode == "multiclass":
            acc = torch.promote_types(target.dtype, torch.float32)
            err = (target.sum(dim=1, dtype=acc) - 1).abs()
            if mask is not None:
                err = err * mask
            flags.append(err.max() <= _soft_tolerance(target.dtype))
    if all(torch.stack(flags).tolist()):
        return
    check_finite(input, "input")
    if not from_logits and bool(((input < 0) | (input > 1)).any()):
        raise ValueError(
            "Expected `input` probabilities in [0, 1] with from_logits=False, but got values in "
            f"[{float(input.min()):.4g}, {float(input.max()):.4g}]. Pass logits with from_logits=True."
        )
    if hard:
        what = "class indices" if mode == "multiclass" else "binary labels (0 or 1)"
        _check_label_values(target, 0, high, skip, ignore_index, what)
    else:
        _check_soft_target(target, mask, mode == "multiclass")


def _tversky_loss(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    smooth: float,
    log_loss: bool,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Per-class loss ``1 - T`` (or ``-log T``) with ``T = (TP + s) / (TP + a FP + b FN + s)``."""
    num = tp + smooth
    den = tp + alpha * fp + beta * fn + smooth
    ok = den != 0
    # 0 / 0 (only possible with smooth=0 on an empty class) counts as perfect agreement, T = 1.
    index = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))
    tiny = torch.finfo(index.dtype).tiny
    loss = -torch.log(index.clamp_min(tiny)) if log_loss else 1 - index
    if gamma != 1.0:
        loss = loss.clamp_min(0.0 if gamma > 1.0 else tiny) ** gamma
    if weights is not None:
        loss = loss * weights
    return loss


def _masked_mean(values: torch.Tensor, active: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over ``active`` entries; 0 (graph kept, zero gradient) when none is active."""
    kept = torch.where(active, values, torch.zeros_like(values))
    if dim is None:
        return kept.sum() / active.sum().clamp_min(1)
    return kept.sum(dim) / active.sum(dim).clamp_min(1)


def dice_semimetric_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    mode: Mode = "multiclass",
    from_logits: bool = True,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    gamma: float = 1.0,
    smooth: float = 1e-3,
    norm: int = 1,
    log_loss: bool = False,
    aggregate: Aggregate | Mapping[str, float] = "batch",
    active_classes: Literal["present", "all"] | None = None,
    threshold: float = 0.01,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    classes: Sequence[int] | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    r"""Dice semimetric loss (Tversky family) for hard or soft segmentation labels.

    For each image :math:`b` and class :math:`c`, with prediction :math:`x` and label :math:`y` over the
    kept pixels and :math:`\|v\|_q^q = \sum_i |v_i|^q` (``q = norm``),

    .. math::

        TP = \tfrac12\left(\|x\|_q^q + \|y\|_q^q - \|x - y\|_q^q\right),\;
        FP = \|x\|_q^q - TP,\; FN = \|y\|_q^q - TP,\quad
        \ell = 1 - \frac{TP + s}{TP + \alpha FP + \beta FN + s}

    (``-log`` of the ratio with ``log_loss``, raised to ``gamma``, times the class weight). ``alpha =
    beta = 0.5`` is the Dice semimetric loss (DML), ``1, 1`` the Jaccard metric loss, anything else a
    Tversky loss; ``norm=2`` gives the squared-L2 (V-Net) form :math:`TP = \langle x, y\rangle`. With
    hard labels DML equals the classic soft Dice loss; with soft labels it is 0 iff :math:`x = y`.

    ``aggregate`` chooses where the ratio is taken (the official ``mIoUD / mIoUI / mIoUC``):
    ``"batch"`` sums TP/FP/FN over the batch and averages the ratio over active classes; ``"image"``
    averages over the active classes of each image, then over images with at least one; ``"class"``
    averages each class over the images where it is active, then over classes. A mapping such as
    ``{"image": 0.5, "class": 0.5}`` adds the weighted terms. When no class is active the loss is 0 with
    a zero gradient (no data-dependent branch, so it compiles with ``fullgraph=True``).

    Computation runs in at least float32 (half/bfloat16 inputs are upcast, float64 stays float64,
    autocast is disabled inside); the result has that dtype. Value checks (label range, NaN/Inf, soft
    targets in [0, 1] summing to 1) run unless disabled with
    :func:`diffdistill.errors.set_value_checks` and are skipped under ``torch.compile``. With hard
    labels and the L1 norm the gradient comes from a fused softmax/gather pass, not a one-hot tensor
    (first-order gradients only: a double backward through that path raises).

    Reference:
        Z. Wang, T. Popordanoska, J. Bertels, R. Lemmens, M. B. Blaschko, "Dice Semimetric Losses:
        Optimizing the Dice Score with Soft Labels", MICCAI 2023, arXiv:2303.16296.

    Args:
        input: logits (``from_logits=True``) or probabilities in [0, 1], shape (B, C, \*spatial), floating,
            non-empty (B, C and every spatial size >= 1).
        target: hard labels of any integer (or bool) dtype, or float soft labels in [0, 1].
            ``"multiclass"``: class indices (B, \*spatial) or probabilities (B, C, \*spatial) summing to 1
            over C. ``"multilabel"``: (B, C, \*spatial), 0/1 integers or floats. ``"binary"``:
            (B, \*spatial) or (B, 1, \*spatial), 0/1 integers or floats.
        mask: bool (B, \*spatial); False pixels are ignored (prediction and label zeroed). Works with soft
            labels; combined (logical and) with ``ignore_index``. Defaults to ``None``: every pixel counts.
        mode: ``"multiclass"`` (softmax over dim 1; the default), ``"multilabel"`` (sigmoid per channel) or
            ``"binary"`` (one channel, sigmoid).
        from_logits: apply the softmax/sigmoid (the default, ``True``); ``False`` takes ``input`` as
            probabilities.
        temperature: logits are divided by it first (knowledge distillation); needs ``from_logits``.
            Defaults to 1 (no scaling).
        alpha: weight of FP. Defaults to 0.5 (Dice; 1 gives Jaccard).
        beta: weight of FN. Defaults to 0.5 (Dice; 1 gives Jaccard).
        gamma: each per-class loss is raised to ``gamma`` (focal-like for ``gamma > 1``). Defaults to 1.
        smooth: added to numerator and denominator of the ratio. Defaults to 1e-3 (the official default).
        norm: 1 (semimetric L1 form; the default) or 2 (squared-L2 / V-Net form).
        log_loss: use ``-log(T)`` instead of ``1 - T``. Defaults to ``False``.
        aggregate: ``"batch"`` (the default), ``"image"``, ``"class"`` or a mapping of those names to
            weights.
        active_classes: ``"present"`` (classes whose label exceeds ``threshold`` somewhere in the kept
            pixels of the batch, or of the image for the image/class terms) or ``"all"``. Defaults to
            ``None``: ``"present"`` for hard and ``"all"`` for soft labels, as the official code does.
        threshold: presence threshold on the label value, in [0, 1]. Defaults to 0.01.
        ignore_index: hard-label value to ignore (multiclass/binary: the pixel; multilabel: the
            element). Not used with soft labels; pass ``mask`` instead. Defaults to ``None``: none ignored.
        class_weights: length-C non-negative weights multiplying each per-class loss before the plain mean
            over active classes (the official semantics: not normalised by their sum). Defaults to ``None``:
            all 1.
        classes: channel indices (ints in ``[0, C)``) to average over (others are never active), e.g.
            ``range(1, C)`` to leave out the background. Defaults to ``None``: every channel.
        reduction: ``"mean"`` (the default; a 0-dim tensor) or ``"none"``: per-class losses, NaN where a class
            is not active, of shape (C,) for ``aggregate="batch"`` and (B, C) for ``"image"``/``"class"``
            (then ``"mean"`` equals ``nanmean`` of the result for ``"batch"``, and the row/column
            ``nanmean`` averaged for ``"image"``/``"class"``).

    Returns:
        The loss in at least float32 (float64 for float64 ``input``): 0-dim for ``reduction="mean"``;
        for ``reduction="none"`` the per-class losses, shape (C,) with ``aggregate="batch"`` and (B, C) with
        ``"image"`` / ``"class"``, NaN where a class is not active.

    Raises:
        ShapeError: ``input`` not (B, C, \*spatial) or empty (an empty batch, class or spatial dimension),
            or shapes of ``input``, ``target``, ``mask`` or ``class_weights`` that do not fit (both shapes
            are named).
        DTypeError: ``input`` / ``target`` / ``mask`` not tensors, ``input`` not floating point, ``mask``
            not bool, ``target`` complex, ``class_weights`` not numbers, a numeric option that is not a
            number, a non-bool ``from_logits`` / ``log_loss`` or a non-int ``ignore_index``.
        OptionError: an option outside its allowed values (including NaN / Inf), or ``classes`` that are
            not ints in ``[0, C)``.
        NonFiniteError: NaN/Inf in ``input`` (value check).
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index``, probabilities outside [0, 1]
            with ``from_logits=False``, soft targets outside [0, 1] / not summing to 1, or negative /
            non-finite ``class_weights`` (value checks).

    Example:
        >>> from diffdistill.losses import dice_semimetric_loss
        >>> logits = torch.randn(2, 3, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> loss = dice_semimetric_loss(logits, labels)
        >>> loss.backward()
        >>> soft = torch.softmax(torch.randn(2, 3, 8, 8), dim=1)      # e.g. a teacher's probabilities
        >>> float(dice_semimetric_loss(soft.log(), soft)) < 1e-6      # 0 iff prediction == label
        True
        >>> dice_semimetric_loss(logits, labels, aggregate="image", reduction="none").shape
        torch.Size([2, 3])
    """
    agg = _validate_options(
        mode=mode,
        from_logits=from_logits,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        smooth=smooth,
        norm=norm,
        log_loss=log_loss,
        aggregate=aggregate,
        active_classes=active_classes,
        threshold=threshold,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    check_tensor(input, "input")
    check_tensor(target, "target")
    check_dtype_floating(input, "input")
    if input.ndim < 2:
        raise ShapeError(
            f"Expected `input` laid out as (B, C, *spatial), but got shape {_fmt(input.shape)}.",
            name="input",
            expected="(B, C, *spatial)",
            actual=tuple(input.shape),
        )
    # An empty batch, class or spatial dimension has no Dice score: the mean would be NaN or a silent 0.
    check_nonempty(input, "input")
    check_nonempty(target, "target")
    if target.dtype.is_complex:
        raise DTypeError(
            f"Expected `target` to be an integer or real floating tensor, but got {target.dtype}."
        )
    batch, num_classes = input.shape[0], input.shape[1]
    spatial = tuple(input.shape[2:])
    hard = not target.is_floating_point()
    if mode == "binary" and num_classes != 1:
        raise ShapeError(
            f"mode='binary' expects one channel, `input` (B, 1, *spatial), but got shape "
            f"{_fmt(input.shape)}. Use mode='multiclass' for C-class softmax or 'multilabel' for "
            "independent channels.",
            name="input",
            expected=(batch, 1, *spatial),
            actual=tuple(input.shape),
        )

    # --- target layout -------------------------------------------------------------------------------
    pixel_shape = (batch, *spatial)
    if mode == "multiclass":
        expected = pixel_shape if hard else tuple(input.shape)
        if tuple(target.shape) != expected:
            raise ShapeError(
                f"mode='multiclass' expects `target` of shape (B, *spatial) = {_fmt(pixel_shape)} for "
                f"integer class indices or (B, C, *spatial) = {_fmt(input.shape)} for float soft labels; "
                f"got `input` {_fmt(input.shape)} and `target` {_fmt(target.shape)} (dtype {target.dtype}).",
                name="target",
                expected=expected,
                actual=tuple(target.shape),
            )
    elif mode == "binary":
        if tuple(target.shape) == pixel_shape:
            target = target.unsqueeze(1)
        if tuple(target.shape) != tuple(input.shape):
            raise ShapeError(
                f"mode='binary' expects `target` of shape (B, *spatial) = {_fmt(pixel_shape)} or "
                f"(B, 1, *spatial) = {_fmt(input.shape)}; got `input` {_fmt(input.shape)} and "
                f"`target` {_fmt(target.shape)}.",
                name="target",
                expected=tuple(input.shape),
                actual=tuple(target.shape),
            )
    elif tuple(target.shape) != tuple(input.shape):
        raise ShapeError(
            f"mode='multilabel' expects `target` of the same shape as `input` (B, C, *spatial); got "
            f"`input` {_fmt(input.shape)} and `target` {_fmt(target.shape)}.",
            name="target",
            expected=tuple(input.shape),
            actual=tuple(target.shape),
        )
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise DTypeError(
                f"Expected `mask` to be a bool tensor (False = ignored), but got dtype {mask.dtype}. "
                "Convert it with mask.bool() or (mask != 0)."
            )
        if tuple(mask.shape) != pixel_shape:
            raise ShapeError(
                f"Expected `mask` of shape (B, *spatial) = {_fmt(pixel_shape)} to match `input` "
                f"{_fmt(input.shape)}, but got `mask` {_fmt(mask.shape)}.",
                name="mask",
                expected=pixel_shape,
                actual=tuple(mask.shape),
            )

    # --- class-level options that need C ---------------------------------------------------------------
    weights_t: torch.Tensor | None = None
    if class_weights is not None:
        weights_t = _class_weights_tensor(class_weights)
        if weights_t.ndim != 1 or weights_t.shape[0] != num_classes:
            raise ShapeError(
                f"Expected `class_weights` of length C = {num_classes} (from `input` {_fmt(input.shape)}), "
                f"but got shape {_fmt(weights_t.shape)}.",
                name="class_weights",
                expected=(num_classes,),
                actual=tuple(weights_t.shape),
            )
        if value_checks_enabled() and not bool((torch.isfinite(weights_t) & (weights_t >= 0)).all()):
            raise ValueError(
                f"Expected `class_weights` to be finite and >= 0, but got {weights_t.tolist()}: give each class "
                "a non-negative weight (a weight of 0 zeroes that class's term)."
            )
    selected: torch.Tensor | None = None
    class_list = _check_classes(classes)
    if class_list is not None:
        if any(c < 0 or c >= num_classes for c in class_list):
            raise OptionError(
                f"Expected `classes` to be a non-empty list of channel indices in [0, {num_classes}), "
                f"but got {list(class_list)!r}."
            )
        selected = torch.zeros(num_classes, dtype=torch.bool, device=input.device)
        selected[list(class_list)] = True
    use_present = (active_classes or ("present" if hard else "all")) == "present"

    if value_checks_enabled():
        _value_checks(
            input,
            target,
            mask,
            mode=mode,
            hard=hard,
            from_logits=from_logits,
            ignore_index=ignore_index,
        )

    compute_dtype = torch.promote_types(input.dtype, torch.float32)
    with torch.autocast(device_type=input.device.type, enabled=False):
        x = input.to(compute_dtype).reshape(batch, num_classes, -1)
        if from_logits and temperature != 1.0:
            x = x / temperature
        keep = None if mask is None else mask.reshape(batch, 1, -1)
        label_peak: torch.Tensor | None = None  # max label value per (image, class), for "present"

        if hard and mode == "multiclass":
            labels = target.reshape(batch, -1)
            skip = _skipped_labels(target, mask, ignore_index)
            if skip is not None:  # skipped pixels may hold any value (e.g. 255): index class 0, weight 0
                keep = ~skip.reshape(batch, 1, -1)
                labels = labels.masked_fill(skip.reshape(batch, -1), 0)
            index = labels.long()
            weight = None if keep is None else keep.squeeze(1).to(compute_dtype)
            if from_logits and norm == 1:
                card_p, tp = _SoftmaxHardLabelStats.apply(x, index, weight)
            else:
                prob = torch.softmax(x, dim=1) if from_logits else x
                powered = prob if norm == 1 else prob * prob
                card_p = (
                    powered.sum(2) if weight is None else torch.bmm(powered, weight.unsqueeze(2)).squeeze(2)
                )
                picked = prob.gather(1, index.unsqueeze(1)).squeeze(1)
                if weight is not None:
                    picked = picked * weight
                tp = torch.zeros_like(card_p).scatter_add(1, index, picked)
            ones = torch.ones_like(index, dtype=compute_dtype) if weight is None else weight
            card_y = torch.zeros(batch, num_classes, dtype=compute_dtype, device=x.device)
            card_y = card_y.scatter_add_(1, index, ones)
            fp = card_p - tp
            fn = card_y - tp
            if use_present:  # the max of a one-hot label over the kept pixels
                label_peak = (card_y > 0).to(compute_dtype)
        else:
            if hard:
                labels = target.reshape(batch, num_classes, -1)
                skip = _skipped_labels(target, mask, ignore_index)
                if skip is not None:  # skipped entries may hold any value: zero, and zero-weighted below
                    keep = ~skip.reshape(batch, skip.shape[1], -1)
                    labels = labels.masked_fill(~keep, 0)
                y = labels.to(compute_dtype)
            else:
                y = target.to(compute_dtype).reshape(batch, num_classes, -1)
            if from_logits:
                prob = torch.softmax(x, dim=1) if mode == "multiclass" else torch.sigmoid(x)
            else:
                prob = x
            if keep is not None:
                keep_f = keep.to(compute_dtype)
                prob = prob * keep_f
                y = y * keep_f
            if norm == 1:
                card_p = prob.sum(2)
                card_y = y.sum(2)
                card_d = torch.linalg.vector_norm(prob - y, ord=1, dim=2)
            else:
                card_p = torch.linalg.vector_norm(prob, ord=2, dim=2).square()
                card_y = (y * y).sum(2)
                card_d = torch.linalg.vector_norm(prob - y, ord=2, dim=2).square()
            tp = (card_p + card_y - card_d) / 2
            fp = card_p - tp
            fn = card_y - tp
            label_peak = y.amax(2) if use_present else None

        if label_peak is not None:
            active_bc = label_peak > threshold
        else:
            active_bc = torch.ones(batch, num_classes, dtype=torch.bool, device=x.device)
        if selected is not None:
            active_bc = active_bc & selected
        w = None if weights_t is None else weights_t.to(device=x.device, dtype=compute_dtype)

        def per_class_loss(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
            return _tversky_loss(
                tp, fp, fn, alpha=alpha, beta=beta, gamma=gamma, smooth=smooth, log_loss=log_loss, weights=w
            )

        w_batch, w_image, w_class = agg
        nan = torch.full((), float("nan"), dtype=compute_dtype, device=x.device)
        total = torch.zeros((), dtype=compute_dtype, device=x.device)
        if w_batch > 0:
            loss_c = per_class_loss(tp.sum(0), fp.sum(0), fn.sum(0))
            active_c = active_bc.any(0)
            if reduction == "none":
                return torch.where(active_c, loss_c, nan)
            total = total + w_batch * _masked_mean(loss_c, active_c)
        if w_image > 0 or w_class > 0:
            loss_bc = per_class_loss(tp, fp, fn)
            if reduction == "none":
                return torch.where(active_bc, loss_bc, nan)
            if w_image > 0:
                per_image = _masked_mean(loss_bc, active_bc, dim=1)
                total = total + w_image * per_image.sum() / active_bc.any(1).sum().clamp_min(1)
            if w_class > 0:
                per_class = _masked_mean(loss_bc, active_bc, dim=0)
                total = total + w_class * per_class.sum() / active_bc.any(0).sum().clamp_min(1)
        return total


class DiceSemimetricLoss(nn.Module):
    r"""Module form of :func:`dice_semimetric_loss`: stores the options and delegates to it.

    ``class_weights`` is registered as a buffer, so it follows ``.to(device)`` and is saved in the
    ``state_dict``; a narrowing cast (``.half()`` / ``.to(torch.bfloat16)``) leaves it as it is (no rounding of the weights). Options are validated at construction. See :func:`dice_semimetric_loss` for the
    formula and every option:

    .. math::

        \ell_c = 1 - \frac{TP_c + s}{TP_c + \alpha FP_c + \beta FN_c + s},\quad
        TP_c = \tfrac12\left(\|x_c\|_1 + \|y_c\|_1 - \|x_c - y_c\|_1\right)

    Reference:
        Z. Wang et al., "Dice Semimetric Losses: Optimizing the Dice Score with Soft Labels",
        MICCAI 2023, arXiv:2303.16296.

    Shape:
        - input: (B, C, \*spatial) logits or probabilities.
        - target: (B, \*spatial) integer labels or (B, C, \*spatial) soft labels (see the function).
        - mask: optional bool (B, \*spatial).
        - output: 0-dim, or (C,) / (B, C) with ``reduction="none"``.

    Args:
        mode: ``"multiclass"`` (softmax over dim 1; the default), ``"multilabel"`` or ``"binary"`` (sigmoid).
        from_logits: apply the softmax/sigmoid (the default, ``True``); ``False`` takes probabilities.
        temperature: logits are divided by it first; needs ``from_logits``. Defaults to 1.
        alpha: weight of FP. Defaults to 0.5 (Dice; 1 gives Jaccard).
        beta: weight of FN. Defaults to 0.5 (Dice; 1 gives Jaccard).
        gamma: exponent of each per-class loss. Defaults to 1.
        smooth: added to numerator and denominator of the ratio. Defaults to 1e-3.
        norm: 1 (L1 semimetric form; the default) or 2 (squared-L2 / V-Net form).
        log_loss: use ``-log(T)`` instead of ``1 - T``. Defaults to ``False``.
        aggregate: ``"batch"`` (the default), ``"image"``, ``"class"`` or a mapping of those names to
            weights.
        active_classes: ``"present"`` or ``"all"``. Defaults to ``None``: ``"present"`` for hard and
            ``"all"`` for soft labels.
        threshold: presence threshold on the label value, in [0, 1]. Defaults to 0.01.
        ignore_index: hard-label value to ignore. Defaults to ``None``: none ignored.
        class_weights: length-C non-negative weights of the per-class losses, stored as a buffer. Defaults
            to ``None``: all 1.
        classes: channel indices to average over. Defaults to ``None``: every channel.
        reduction: ``"mean"`` (the default) or ``"none"`` (per-class losses).

    Raises:
        OptionError: an option outside its allowed values (checked here, at construction), or ``classes``
            that are not ints.
        DTypeError: a numeric option that is not a number, ``class_weights`` not numbers, a non-bool
            ``from_logits`` / ``log_loss`` or a non-int ``ignore_index``.
        ShapeError: ``class_weights`` not one-dimensional. The tensors are checked by :meth:`forward` (see
            :func:`dice_semimetric_loss`).

    Example:
        >>> from diffdistill.losses import DiceSemimetricLoss
        >>> criterion = DiceSemimetricLoss(aggregate={"batch": 0.5, "image": 0.5}, class_weights=[0.5, 1.0, 1.0])
        >>> logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)   # 3D volumes
        >>> labels = torch.randint(0, 3, (2, 4, 4, 4), dtype=torch.uint8)
        >>> loss = criterion(logits, labels)
        >>> loss.backward()
        >>> dice, jaccard = DiceSemimetricLoss(), DiceSemimetricLoss(alpha=1.0, beta=1.0)
        >>> bool(jaccard(logits, labels) >= dice(logits, labels))   # 1 - J >= 1 - D
        True
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        *,
        mode: Mode = "multiclass",
        from_logits: bool = True,
        temperature: float = 1.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 1.0,
        smooth: float = 1e-3,
        norm: int = 1,
        log_loss: bool = False,
        aggregate: Aggregate | Mapping[str, float] = "batch",
        active_classes: Literal["present", "all"] | None = None,
        threshold: float = 0.01,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        classes: Sequence[int] | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> None:
        super().__init__()
        _validate_options(
            mode=mode,
            from_logits=from_logits,
            temperature=temperature,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            smooth=smooth,
            norm=norm,
            log_loss=log_loss,
            aggregate=aggregate,
            active_classes=active_classes,
            threshold=threshold,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.mode = mode
        self.from_logits = from_logits
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.smooth = smooth
        self.norm = norm
        self.log_loss = log_loss
        self.aggregate = aggregate if isinstance(aggregate, str) else dict(aggregate)
        self.active_classes = active_classes
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.classes = _check_classes(classes)
        self.reduction = reduction
        weights = None
        if class_weights is not None:
            weights = _class_weights_tensor(class_weights, torch.get_default_dtype()).detach().clone()
            if weights.ndim != 1:
                raise ShapeError(
                    f"Expected `class_weights` to be one-dimensional (length C), but got shape "
                    f"{_fmt(weights.shape)}.",
                    name="class_weights",
                    expected="(C,)",
                    actual=tuple(weights.shape),
                )
        self.register_buffer("class_weights", weights)

    def _apply(self, fn: Any, recurse: bool = True) -> DiceSemimetricLoss:
        """``nn.Module._apply`` with ``class_weights`` following device moves and widening casts, never a narrowing
        one: ``.half()`` / ``.to(torch.bfloat16)`` of a model holding the loss would round the weights (by up to
        ~5e-4 relative); the loss casts them to its computation's dtype itself."""
        weights = self.class_weights
        super()._apply(fn, recurse)
        moved = self.class_weights
        if weights is None or moved is None:
            return self
        if torch.finfo(moved.dtype).eps > torch.finfo(weights.dtype).eps:  # narrowed: keep the exact weights
            self.class_weights = weights.to(moved.device)
        return self

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""Compute the loss with the stored options; see :func:`dice_semimetric_loss`.

        Args:
            input: logits or probabilities, shape (B, C, \*spatial), floating, non-empty.
            target: integer labels (B, \*spatial) (or (B, C, \*spatial) / (B, 1, \*spatial) in the sigmoid
                modes) or float soft labels (B, C, \*spatial).
            mask: bool (B, \*spatial); False pixels are ignored. Defaults to ``None``: every pixel counts.

        Returns:
            The loss: 0-dim, or (C,) / (B, C) per-class losses with ``reduction="none"``.

        Raises:
            ShapeError: empty or mismatched shapes of ``input``, ``target``, ``mask`` or the class weights.
            DTypeError: ``input`` not floating, ``mask`` not bool, ``target`` complex.
            OptionError: ``classes`` outside ``[0, C)``.
            NonFiniteError: NaN/Inf in ``input`` (value check).
            ValueError: labels or soft targets outside their range (value checks).
        """
        return dice_semimetric_loss(
            input,
            target,
            mask,
            mode=self.mode,  # type: ignore[arg-type]
            from_logits=self.from_logits,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            smooth=self.smooth,
            norm=self.norm,
            log_loss=self.log_loss,
            aggregate=self.aggregate,  # type: ignore[arg-type]
            active_classes=self.active_classes,  # type: ignore[arg-type]
            threshold=self.threshold,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
            classes=self.classes,
            reduction=self.reduction,  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        parts = [
            f"mode={self.mode!r}",
            f"alpha={self.alpha}",
            f"beta={self.beta}",
            f"aggregate={self.aggregate!r}",
        ]
        if self.gamma != 1.0:
            parts.append(f"gamma={self.gamma}")
        if self.norm != 1:
            parts.append(f"norm={self.norm}")
        if self.log_loss:
            parts.append("log_loss=True")
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        return ", ".join(parts)
