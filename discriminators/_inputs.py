"""Input validation shared by the discriminators, their heads and the feature extractor (private).

Every helper takes the argument's public name (``sample``, ``cond_sample``, ``level``, ``readout_levels``...)
so that a message names what the caller passed. Static checks (types, dtypes, shapes) always run; the
finiteness checks are *value* checks (:func:`diffdistill.errors.value_checks_enabled`) and
:func:`diffdistill._checks.check_all_finite` reads all the tensors of one call with a single device
synchronisation. Generic checks (ints, flags, finiteness) live in :mod:`diffdistill._checks`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .._checks import (
    DTypeError,
    NonFiniteError,
    OptionError,
    ShapeError,
    check_float_input,
    value_checks_enabled,
)
from .._checks import _fmt_shape as shape_str


def check_latent(x: Any, name: str, channels: int | None = None, what: str = "{n} channels") -> torch.Tensor:
    """Static checks of a ``(B, C, H, W)`` floating tensor (no finiteness: see :func:`~diffdistill._checks.check_all_finite`).

    Args:
        x: the argument.
        name: its public name.
        channels: the channels ``C`` it must have (None: any).
        what: description of the expected channels for the message, ``{n}`` standing for their number.

    Returns:
        ``x``.
    """
    check_float_input(x, name, ndim=4, layout="(B, C, H, W)", finite=False)
    if channels is not None and x.shape[1] != channels:
        raise ShapeError(
            f"Expected `{name}` to have {what.format(n=channels)}, shape (B, {channels}, H, W), but got "
            f"{shape_str(x.shape)}.",
            name=name,
            expected=channels,
            actual=tuple(x.shape),
        )
    return x


def check_level(level: Any, available: Sequence[str], name: str) -> str:
    """``level`` as one of ``available`` (:class:`DTypeError` for a non-string, :class:`OptionError` else).

    Args:
        level: the argument.
        available: the UNet's levels.
        name: its public name (``level``).

    Returns:
        ``level``.
    """
    if not isinstance(level, str):
        raise DTypeError(
            f"Expected `{name}` to be one level name (a str) of {list(available)}, but got {level!r} "
            f"({type(level).__name__})."
        )
    if level not in available:
        raise OptionError(f"Expected `{name}` to be one of {list(available)}, but got {level!r}.")
    return level


def check_levels(levels: Any, available: Sequence[str], name: str) -> tuple[str, ...]:
    """``levels`` (one name or a sequence of names) as a tuple of distinct entries of ``available``.

    Args:
        levels: the argument.
        available: the UNet's levels.
        name: its public name (``levels``, ``readout_levels``).

    Returns:
        The levels as a tuple.
    """
    if isinstance(levels, str):
        levels = (levels,)
    if not isinstance(levels, Iterable) or isinstance(levels, (Mapping, torch.Tensor)):
        raise DTypeError(
            f"Expected `{name}` to be a level name or a sequence of level names of {list(available)}, but "
            f"got {type(levels).__name__}."
        )
    levels = tuple(levels)
    if not levels:
        raise OptionError(f"Expected `{name}` to name at least one level of {list(available)}, but got ().")
    for level in levels:
        if not isinstance(level, str) or level not in available:
            raise OptionError(
                f"Expected every entry of `{name}` to be one of {list(available)}, but got {level!r}."
            )
    if len(set(levels)) != len(levels):
        raise OptionError(f"Expected `{name}` without repeats, but got {list(levels)}.")
    return levels


def timestep_batch(timestep: Any, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A number, ``()``, ``(1,)`` or ``(B,)`` timestep as a ``(B,)`` tensor on ``device``.

    Integers become int64, other real numbers float64 (float32 on MPS, as diffusers). A non-finite Python
    number raises while value checks are on; a tensor's values are left to :func:`~diffdistill._checks.check_all_finite`.

    Args:
        timestep: the argument.
        batch: the batch size ``B`` of the sample.
        device: the sample's device.
        name: its public name (``timestep``, ``cond_timestep``).

    Returns:
        A ``(B,)`` tensor (an expanded view for a one-element tensor).
    """
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise DTypeError(
                f"Expected `{name}` to hold integer or floating timesteps, but got dtype {timestep.dtype}. "
                f"Pass the scheduler's timesteps, e.g. torch.tensor([500, 250])."
            )
        t = timestep.reshape(1) if timestep.ndim == 0 else timestep
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ShapeError(
                f"Expected `{name}` to be a number, a 0-d tensor or shape (1,) or ({batch},) for a batch of "
                f"{batch}, but got shape {shape_str(timestep.shape)}. Pass one timestep per sample.",
                name=name,
                expected=(batch,),
                actual=tuple(timestep.shape),
            )
        return t.to(device).expand(batch)
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise DTypeError(
            f"Expected `{name}` to be a number or a tensor of shape (), (1,) or ({batch},), but got "
            f"{type(timestep).__name__}. Pass e.g. 500 or torch.tensor([500, 250])."
        )
    if isinstance(timestep, numbers.Integral):
        return torch.full((batch,), int(timestep), dtype=torch.int64, device=device)
    if value_checks_enabled() and not math.isfinite(float(timestep)):
        raise NonFiniteError(f"Expected `{name}` to be finite, but got {timestep!r}.")
    dtype = torch.float32 if device.type == "mps" else torch.float64  # no float64 on MPS (as diffusers)
    return torch.full((batch,), float(timestep), dtype=dtype, device=device)
