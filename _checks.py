"""Input validation shared by every diffdistill component (private: the public face is
:mod:`diffdistill.errors`, which holds the exception types and the value-check switch).

Every error raised on user input comes from a helper here, and every message names the argument as the caller
passed it, what was expected, what was received and how to fix it. Static checks (types, shapes, dtypes,
options) always run; value checks (finiteness, ranges of tensor contents) run only while
:func:`diffdistill.errors.value_checks_enabled` says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .errors import (
    DTypeError,
    NonFiniteError,
    OptionError,
    ShapeError,
    set_value_checks,
    value_checks,
    value_checks_enabled,
)

__all__ = [
    "DTypeError",
    "NonFiniteError",
    "OptionError",
    "ShapeError",
    "check_dtype_floating",
    "check_finite",
    "check_float_input",
    "check_ndim",
    "check_nonempty",
    "check_option",
    "check_positive",
    "check_probability",
    "check_same_shape",
    "check_tensor",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]


def _fmt_shape(shape: Iterable[int]) -> str:
    """Python tuple notation: ``(2, 3)``, ``(3,)``, ``()``."""
    return str(tuple(int(s) for s in shape))


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """Raise :class:`DTypeError` unless ``x`` is a ``torch.Tensor``.

    Args:
        x: The value the caller passed.
        name: The argument's public name, used in the message.

    Returns:
        ``x``, typed as a tensor.

    Raises:
        DTypeError: ``x`` is not a tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise DTypeError(
            f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}. "
            f"Convert it first, e.g. torch.as_tensor({name})."
        )
    return x


def check_ndim(x: torch.Tensor, name: str, ndim: int | Sequence[int], layout: str = "") -> None:
    """Raise :class:`ShapeError` unless ``x.ndim`` is ``ndim`` (or one of them).

    Args:
        x: The tensor.
        name: The argument's public name.
        ndim: The allowed number(s) of dimensions.
        layout: The expected layout for the message, e.g. ``"(B, C, H, W)"``.

    Raises:
        ShapeError: ``x.ndim`` is not allowed.
    """
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(str(a) for a in allowed)
        hint = f" laid out as {layout}" if layout else ""
        raise ShapeError(
            f"Expected `{name}` to have {want} dimensions{hint}, but got shape {_fmt_shape(x.shape)} "
            f"({x.ndim} dimensions).",
            name=name,
            expected=allowed,
            actual=tuple(x.shape),
        )


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise :class:`ShapeError` unless ``a`` and ``b`` have the same shape (no silent broadcasting).

    Args:
        a: The first tensor.
        b: The second tensor.
        name_a: ``a``'s public name.
        name_b: ``b``'s public name.

    Raises:
        ShapeError: The shapes differ; the message names both arguments.
    """
    if a.shape != b.shape:
        raise ShapeError(
            f"Expected `{name_a}` and `{name_b}` to have the same shape, but got {name_a} "
            f"{_fmt_shape(a.shape)} and {name_b} {_fmt_shape(b.shape)}.",
            name=f"{name_a}/{name_b}",
            expected=tuple(a.shape),
            actual=tuple(b.shape),
        )


def check_dtype_floating(x: torch.Tensor, name: str) -> None:
    """Raise :class:`DTypeError` unless ``x`` has a floating-point dtype.

    Args:
        x: The tensor.
        name: The argument's public name.

    Raises:
        DTypeError: ``x`` is an integer, bool or complex tensor.
    """
    if not x.is_floating_point():
        raise DTypeError(
            f"Expected `{name}` to be a floating-point tensor, but got dtype {x.dtype}. "
            f"Cast it with {name}.float()."
        )


def check_option(value: Any, name: str, allowed: Iterable[Any]) -> None:
    """Raise :class:`OptionError` unless ``value`` is one of ``allowed``.

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        allowed: The accepted values.

    Raises:
        OptionError: ``value`` is not in ``allowed``.
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise OptionError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


def check_positive(value: float, name: str, *, strict: bool = True) -> None:
    """Raise :class:`OptionError` unless the Python number ``value`` is > 0 (or >= 0); NaN is refused.

    Args:
        value: The number the caller passed.
        name: The argument's public name.
        strict: ``True`` for > 0, ``False`` for >= 0.

    Raises:
        OptionError: ``value`` is out of range or NaN.
    """
    ok = value > 0 if strict else value >= 0
    if not ok:
        rel = "> 0" if strict else ">= 0"
        raise OptionError(f"Expected `{name}` to be {rel}, but got {value!r}.")


def check_probability(value: float, name: str) -> None:
    """Raise :class:`OptionError` unless ``0 <= value <= 1`` (NaN is refused).

    Args:
        value: The number the caller passed.
        name: The argument's public name.

    Raises:
        OptionError: ``value`` lies outside [0, 1].
    """
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"Expected `{name}` to lie in [0, 1], but got {value!r}.")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf (a value check: may be switched off).

    Args:
        x: The tensor.
        name: The argument's public name.

    Raises:
        NonFiniteError: ``x`` holds NaN or Inf while value checks are on.
    """
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"Expected `{name}` to be finite, but it holds {n_bad} NaN/Inf value(s) out of {x.numel()}. "
            "Check the upstream computation (learning rate, mixed-precision overflow, division by zero)."
        )


def check_nonempty(x: torch.Tensor, name: str) -> None:
    """Raise :class:`ShapeError` if ``x`` has no elements or an empty batch (leading) dimension.

    A loss's mean over an empty batch is NaN and a sum is a silent 0; neither is what a caller meant.

    Args:
        x: The tensor.
        name: The argument's public name.

    Raises:
        ShapeError: ``x`` is empty.
    """
    if x.numel() == 0 or (x.ndim > 0 and x.shape[0] == 0):
        raise ShapeError(
            f"Expected `{name}` to hold at least one sample, but got shape {_fmt_shape(x.shape)} (empty). "
            "Check the batch that was passed (an empty data-loader batch or a mask that selected nothing).",
            name=name,
            expected="non-empty",
            actual=tuple(x.shape),
        )


def check_float_input(
    x: Any,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    layout: str = "",
    finite: bool = True,
) -> torch.Tensor:
    """The standard checks on a floating-point tensor the caller passes (``x``, ``x0``, logits, features).

    In order: a ``torch.Tensor`` (:class:`DTypeError`), a floating dtype (:class:`DTypeError`, an integer or
    bool tensor is never silently promoted), the number of dimensions when ``ndim`` is given
    (:class:`ShapeError`), a non-empty batch (:class:`ShapeError`) and, as a value check, finite entries
    (:class:`NonFiniteError`) unless ``finite=False``.

    Args:
        x: The value the caller passed.
        name: The argument's public name.
        ndim: The allowed number(s) of dimensions; ``None`` accepts any.
        layout: The expected layout for the message, e.g. ``"(B, C, H, W)"``.
        finite: Whether to run the finiteness value check.

    Returns:
        ``x``, typed as a tensor.

    Raises:
        DTypeError: ``x`` is not a floating-point tensor.
        ShapeError: ``x`` has the wrong number of dimensions or is empty.
        NonFiniteError: ``x`` holds NaN or Inf (value checks on, ``finite=True``).
    """
    check_tensor(x, name)
    check_dtype_floating(x, name)
    if ndim is not None:
        check_ndim(x, name, ndim, layout)
    check_nonempty(x, name)
    if finite:
        check_finite(x, name)
    return x
