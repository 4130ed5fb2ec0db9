"""Input validation shared by every diffdistill component.

Every error raised on user input comes from here. The exception types subclass the builtin
``ValueError`` / ``TypeError`` (unlike kornia's ``BaseError``), so ``except ValueError`` keeps working,
and every message names the argument, what was expected, what was received and how to fix it.

Two kinds of check exist:

* *static* checks (types, shapes, dtypes, option strings) cost nothing on the device and always run;
* *value* checks (``check_finite``, range checks on tensors) read tensor values, which forces a
  device synchronisation and breaks ``torch.compile`` graphs. They are skipped while tracing and can
  be switched off globally with the environment variable ``DIFFDISTILL_VALUE_CHECKS=0`` or
  :func:`set_value_checks` for production runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "DTypeError",
    "OptionError",
    "ShapeError",
    "check_dtype_floating",
    "check_finite",
    "check_ndim",
    "check_option",
    "check_positive",
    "check_probability",
    "check_same_shape",
    "check_tensor",
    "set_value_checks",
    "value_checks_enabled",
]


class ShapeError(ValueError):
    """A tensor has the wrong shape. Carries ``name``, ``expected`` and ``actual``."""

    def __init__(self, message: str, *, name: str = "", expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.name = name
        self.expected = expected
        self.actual = actual


class DTypeError(TypeError):
    """An argument has the wrong type or dtype."""


class OptionError(ValueError):
    """A configuration value is outside its allowed set or range."""


_VALUE_CHECKS = os.environ.get("DIFFDISTILL_VALUE_CHECKS", "1").strip().lower() not in {
    "0",
    "false",
    "no",
    "off",
}


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (those that read tensor contents) on or off globally.

    Example:
        >>> from diffdistill._checks import set_value_checks, value_checks_enabled
        >>> set_value_checks(False); value_checks_enabled()
        False
        >>> set_value_checks(True); value_checks_enabled()
        True
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether value checks run now (never while ``torch.compile`` traces)."""
    if not _VALUE_CHECKS:
        return False
    return not torch.compiler.is_compiling()


def _fmt_shape(shape: Iterable[int]) -> str:
    """Python tuple notation: ``(2, 3)``, ``(3,)``, ``()``."""
    return str(tuple(int(s) for s in shape))


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """Raise :class:`DTypeError` unless ``x`` is a ``torch.Tensor``; return it."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(
            f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}. "
            f"Convert it first, e.g. torch.as_tensor({name})."
        )
    return x


def check_ndim(x: torch.Tensor, name: str, ndim: int | Sequence[int], layout: str = "") -> None:
    """Raise :class:`ShapeError` unless ``x.ndim`` is ``ndim`` (or one of them)."""
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
    """Raise :class:`ShapeError` unless ``a`` and ``b`` have the same shape; the message names both."""
    if a.shape != b.shape:
        raise ShapeError(
            f"Expected `{name_a}` and `{name_b}` to have the same shape, but got {name_a} "
            f"{_fmt_shape(a.shape)} and {name_b} {_fmt_shape(b.shape)}.",
            name=f"{name_a}/{name_b}",
            expected=tuple(a.shape),
            actual=tuple(b.shape),
        )


def check_dtype_floating(x: torch.Tensor, name: str) -> None:
    """Raise :class:`DTypeError` unless ``x`` has a floating-point dtype."""
    if not x.is_floating_point():
        raise DTypeError(
            f"Expected `{name}` to be a floating-point tensor, but got dtype {x.dtype}. "
            f"Cast it with {name}.float()."
        )


def check_option(value: Any, name: str, allowed: Iterable[Any]) -> None:
    """Raise :class:`OptionError` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise OptionError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


def check_positive(value: float, name: str, *, strict: bool = True) -> None:
    """Raise :class:`OptionError` unless the Python number ``value`` is > 0 (or >= 0)."""
    ok = value > 0 if strict else value >= 0
    if not ok:
        rel = "> 0" if strict else ">= 0"
        raise OptionError(f"Expected `{name}` to be {rel}, but got {value!r}.")


def check_probability(value: float, name: str) -> None:
    """Raise :class:`OptionError` unless ``0 <= value <= 1``."""
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"Expected `{name}` to lie in [0, 1], but got {value!r}.")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (a value check: may be switched off)."""
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"Expected `{name}` to be finite, but it holds {n_bad} NaN/Inf value(s) out of {x.numel()}. "
            "Check the upstream computation (learning rate, mixed-precision overflow, division by zero)."
        )
