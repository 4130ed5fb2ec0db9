"""Exception types and the value-check switch: the public face of diffdistill's input validation.

Every error diffdistill raises on user input is one of these classes. They subclass the builtin
``ValueError`` / ``TypeError`` (unlike kornia's ``BaseError``), so ``except ValueError`` keeps working, and
each message names the argument as the caller passed it, what was expected, what was received and how to
fix it.

Two kinds of check exist:

* *static* checks (types, shapes, dtypes, option strings) cost nothing on the device and always run;
* *value* checks (finiteness, range checks on tensor contents) read tensor values, which forces a device
  synchronisation and breaks ``torch.compile`` graphs. They are skipped while ``torch.compile`` traces and
  can be switched off for production runs, globally with the environment variable
  ``DIFFDISTILL_VALUE_CHECKS=0`` or :func:`set_value_checks`, or for a block with :func:`value_checks`.

Example:
    >>> import torch
    >>> from diffdistill.errors import NonFiniteError, value_checks
    >>> from diffdistill.losses import dice_semimetric_loss
    >>> logits, target = torch.tensor([[[float("nan"), 0.0]]]), torch.tensor([[[1.0, 0.0]]])
    >>> try:
    ...     dice_semimetric_loss(logits, target, mode="binary")
    ... except NonFiniteError as err:
    ...     print(type(err).__name__, isinstance(err, ValueError))
    NonFiniteError True
    >>> with value_checks(False):  # no device sync: the NaN propagates
    ...     bool(dice_semimetric_loss(logits, target, mode="binary").isnan())
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "DTypeError",
    "MissingDependencyError",
    "NonFiniteError",
    "OptionError",
    "ProtocolMismatchError",
    "ShapeError",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]


class ShapeError(ValueError):
    """A tensor has the wrong shape (or an empty batch).

    Args:
        message: The full message.
        name: The argument's public name (``"x/target"`` for a pair).
        expected: The shape (or the allowed dimension counts) expected.
        actual: The shape received.
    """

    def __init__(self, message: str, *, name: str = "", expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.name = name
        self.expected = expected
        self.actual = actual


class DTypeError(TypeError):
    """An argument has the wrong Python type or tensor dtype."""


class OptionError(ValueError):
    """A configuration value is outside its allowed set or range."""


class NonFiniteError(ValueError):
    """A tensor the caller passed holds NaN or Inf (raised only while value checks are on)."""


def _env_enabled() -> bool:
    return os.environ.get("DIFFDISTILL_VALUE_CHECKS", "1").strip().lower() not in {"0", "false", "no", "off"}


_VALUE_CHECKS = _env_enabled()


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (those that read tensor contents) on or off globally.

    Args:
        enabled: ``True`` to run the checks (the default, unless ``DIFFDISTILL_VALUE_CHECKS=0``), ``False``
            to skip them (no device synchronisation; a NaN then propagates instead of raising).

    Example:
        >>> from diffdistill.errors import set_value_checks, value_checks_enabled
        >>> set_value_checks(False); value_checks_enabled()
        False
        >>> set_value_checks(True); value_checks_enabled()
        True
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether value checks run now.

    Returns:
        ``False`` when switched off or while ``torch.compile`` traces, else ``True``.
    """
    if not _VALUE_CHECKS:
        return False
    return not torch.compiler.is_compiling()


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Switch the value checks on or off inside a ``with`` block, restoring the previous setting after.

    Args:
        enabled: Whether the checks run inside the block.

    Yields:
        Nothing; the setting applies to the block.

    Example:
        >>> from diffdistill.errors import value_checks, value_checks_enabled
        >>> with value_checks(False):
        ...     value_checks_enabled()
        False
        >>> value_checks_enabled()
        True
    """
    global _VALUE_CHECKS
    previous = _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


# Raised by diffdistill.metrics (issue 25); exported here and from :mod:`diffdistill.metrics`.
class ProtocolMismatchError(ValueError):
    """Two evaluation runs were measured under different protocols, so their numbers are not comparable.

    Raised by :func:`diffdistill.metrics.check_comparable`; the message lists every differing field with both
    values.

    Args:
        message: The full message.
        differences: ``{field: (value in a, value in b)}`` for every differing (dotted) field.
    """

    def __init__(self, message: str, *, differences: dict[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differences = dict(differences or {})


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message says what to ``pip install``."""
