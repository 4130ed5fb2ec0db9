"""Input validation shared by every diffdistill component (private: the public face is
:mod:`diffdistill.errors`, which holds the exception types and the value-check switch).

Every error raised on user input comes from a helper here, and every message names the argument as the caller
passed it, what was expected, what was received and how to fix it. Static checks (types, shapes, dtypes,
options) always run; value checks (finiteness, ranges of tensor contents) run only while
:func:`diffdistill.errors.value_checks_enabled` says so.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

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
    "check_all_finite",
    "check_bool",
    "check_dtype_floating",
    "check_finite",
    "check_float_input",
    "check_generator",
    "check_int",
    "check_mapping",
    "check_module",
    "check_ndim",
    "check_nonempty",
    "check_not_video",
    "check_option",
    "check_optional_int",
    "check_positive",
    "check_probability",
    "check_real",
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


def _check_number(value: Any, name: str) -> None:
    """:class:`DTypeError` unless ``value`` is a real Python / NumPy number (not a bool), before comparing it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DTypeError(f"Expected `{name}` to be a real number, but got {type(value).__name__} {value!r}.")


def check_positive(value: float, name: str, *, strict: bool = True) -> None:
    """Raise :class:`OptionError` unless the Python number ``value`` is > 0 (or >= 0); NaN is refused.

    ``inf`` passes (callers that need a finite number use :func:`check_real`).

    Args:
        value: The number the caller passed.
        name: The argument's public name.
        strict: ``True`` for > 0, ``False`` for >= 0.

    Raises:
        DTypeError: ``value`` is not a real number (a string, None, a bool, a tensor).
        OptionError: ``value`` is out of range or NaN.
    """
    _check_number(value, name)
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
        DTypeError: ``value`` is not a real number (a string, None, a bool, a tensor).
        OptionError: ``value`` lies outside [0, 1].
    """
    _check_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"Expected `{name}` to lie in [0, 1], but got {value!r}.")


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
    high_strict: bool = False,
    allow_tensor: bool = False,
) -> float:
    """A finite real number (Python or NumPy; never a bool) within the given bounds, as a ``float``.

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        low: The lower bound (None: none).
        high: The upper bound (None: none).
        strict: The lower bound is exclusive (``> low``) instead of inclusive (``>= low``).
        high_strict: The upper bound is exclusive (``< high``) instead of inclusive (``<= high``).
        allow_tensor: Accept a 0-d real tensor too (it is read to check it: one device synchronisation).

    Returns:
        ``value`` as a ``float``.

    Raises:
        DTypeError: ``value`` is not a real number (a string, None, a bool, a list, a tensor unless
            ``allow_tensor``).
        OptionError: ``value`` is NaN, infinite or out of bounds.
    """
    number = value
    if isinstance(value, torch.Tensor):
        real = value.dtype != torch.bool and not value.is_complex()
        if not (allow_tensor and real and value.ndim == 0):
            fix = (
                "a 0-d real tensor or a Python number"
                if allow_tensor
                else f"a Python number, e.g. float({name})"
            )
            raise DTypeError(
                f"Expected `{name}` to be a real number, but got a tensor of shape {_fmt_shape(value.shape)} and "
                f"dtype {value.dtype}. Pass {fix}."
            )
        number = value.item()
    _check_number(number, name)
    out = float(number)
    if not math.isfinite(out):
        raise OptionError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    if low is not None and (out <= low if strict else out < low):
        raise OptionError(f"Expected `{name}` to be {'>' if strict else '>='} {low}, but got {value!r}.")
    if high is not None and (out >= high if high_strict else out > high):
        raise OptionError(
            f"Expected `{name}` to be {'<' if high_strict else '<='} {high}, but got {value!r}."
        )
    return out


def _int_bound(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def _int(
    value: Any,
    name: str,
    minimum: int | None,
    maximum: int | None,
    hint: str,
    integral_float: bool,
    none: bool,
) -> int:
    bound = _int_bound(minimum, maximum)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if integral_float and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok = True
    if not ok:
        raise DTypeError(
            f"Expected `{name}` to be an int{bound}{' or None' if none else ''}, but got {type(value).__name__} "
            f"{value!r}.{hint}"
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise OptionError(f"Expected `{name}` to be an int{bound}, but got {value!r}.{hint}")
    return int(value)


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str = "",
    integral_float: bool = False,
) -> int:
    """An integer (Python or NumPy; never a bool or a float) in ``[minimum, maximum]``, as an ``int``.

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        minimum: The smallest allowed value (None: no bound).
        maximum: The largest allowed value (None: no bound).
        hint: Text appended to the message (how to fix it), e.g. ``" Draw at least one sample."``.
        integral_float: Accept an integral finite float such as ``1000.0`` too (configuration numbers).

    Returns:
        ``value`` as an ``int``.

    Raises:
        DTypeError: ``value`` is not an integer.
        OptionError: ``value`` is out of bounds.
    """
    return _int(value, name, minimum, maximum, hint, integral_float, False)


def check_optional_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = ""
) -> int | None:
    """``None``, or :func:`check_int`'s integer (None is never silently confused with 0).

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        minimum: The smallest allowed value (None: no bound).
        maximum: The largest allowed value (None: no bound).
        hint: Text appended to the message (how to fix it).

    Returns:
        None, or ``value`` as an ``int``.

    Raises:
        DTypeError: ``value`` is neither None nor an integer.
        OptionError: ``value`` is out of bounds.
    """
    return None if value is None else _int(value, name, minimum, maximum, hint, False, True)


@overload
def check_bool(value: Any, name: str, *, allow_none: Literal[False] = False) -> bool: ...


@overload
def check_bool(value: Any, name: str, *, allow_none: bool) -> bool | None: ...


def check_bool(value: Any, name: str, *, allow_none: bool = False) -> bool | None:
    """Refuse anything but ``True`` / ``False`` (a string such as ``"False"`` would be truthy; ``1`` is refused).

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        allow_none: Accept None too.

    Returns:
        ``value`` (None only when ``allow_none``).

    Raises:
        DTypeError: ``value`` is not a bool (nor None when allowed).
    """
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise DTypeError(
            f"Expected `{name}` to be True or False{' or None' if allow_none else ''}, but got "
            f"{type(value).__name__} {value!r}."
        )
    return value


def check_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    """Refuse anything but a ``torch.Generator`` or None (an int seed is a common mistake).

    Args:
        value: The value the caller passed.
        name: The argument's public name.

    Returns:
        ``value``.

    Raises:
        DTypeError: ``value`` is neither None nor a ``torch.Generator``.
    """
    if value is not None and not isinstance(value, torch.Generator):
        raise DTypeError(
            f"Expected `{name}` to be a torch.Generator or None, but got {type(value).__name__}. Seed one with "
            "torch.Generator(device).manual_seed(seed)."
        )
    return value


def check_mapping(
    value: Any,
    name: str,
    *,
    what: str = "the model's keyword arguments",
    example: str = "{'encoder_hidden_states': emb}",
) -> dict[str, Any]:
    """``None`` or a mapping of keyword arguments (``cond``-style), as a new dict (``{}`` for None).

    Args:
        value: The value the caller passed.
        name: The argument's public name.
        what: What the mapping holds, for the message.
        example: An example mapping for the message.

    Returns:
        ``dict(value)``, or ``{}`` for None.

    Raises:
        DTypeError: ``value`` is neither None nor a mapping.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DTypeError(
            f"Expected `{name}` to be a mapping of {what} (or None), but got {type(value).__name__}. Pass e.g. "
            f"{name}={example}."
        )
    return dict(value)


def check_module(value: Any, name: str) -> nn.Module:
    """Refuse anything but an ``nn.Module`` (a network passed where a module is needed).

    Args:
        value: The network the caller passed.
        name: The argument's public name (``model``, ``teacher``, ...).

    Returns:
        ``value``, typed as a module.

    Raises:
        DTypeError: ``value`` is not an ``nn.Module``.
    """
    if not isinstance(value, nn.Module):
        raise DTypeError(
            f"Expected `{name}` to be a torch.nn.Module, but got {type(value).__name__}. Pass the network "
            "itself (DDP / FSDP / compiled wrappers are fine)."
        )
    return value


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf (a value check: may be switched off).

    Args:
        x: The tensor.
        name: The argument's public name.

    Raises:
        NonFiniteError: ``x`` holds NaN or Inf while value checks are on.
    """
    # Meta tensors (FLOP counting, deferred init) have no values to read.
    if value_checks_enabled() and x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"Expected `{name}` to be finite, but it holds {n_bad} NaN/Inf value(s) out of {x.numel()}. "
            "Check the upstream computation (learning rate, mixed-precision overflow, division by zero)."
        )


def check_all_finite(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """:func:`check_finite` of several tensors with one device synchronisation (per device), not one per tensor.

    A value check: skipped while value checks are off (and under ``torch.compile``). Non-floating and empty
    tensors (nothing to check) and tensors on the meta device (FLOP counting) are skipped.

    Args:
        named: ``(public name, tensor)`` pairs, in the order the errors should be reported.

    Raises:
        NonFiniteError: A tensor holds NaN or Inf; the message names the first such tensor.
    """
    if not value_checks_enabled():
        return
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            by_device.setdefault(tensor.device, []).append((name, tensor))
    for items in by_device.values():
        flags = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        for (name, tensor), ok in zip(items, flags):
            if not ok:
                check_finite(tensor, name)


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


def check_not_video(x: Any, name: str, what: str, layout: str = "(B, C, H, W)") -> None:
    """Raise :class:`ShapeError` for a 5-D tensor (video latents ``(B, C, F, H, W)``, e.g. Wan's) passed to an
    image-only component, with the reason and how to proceed; other inputs pass unchanged (checked later).

    Args:
        x: The value the caller passed.
        name: The argument's public name.
        what: The component and why it is image-only, e.g. ``"LatentLPIPS (a latent VGG trained on one image
            VAE's latents)"``.
        layout: The image layout the component takes.

    Raises:
        ShapeError: ``x`` is a 5-D tensor.
    """
    if isinstance(x, torch.Tensor) and x.ndim == 5:
        raise ShapeError(
            f"Expected `{name}` to be image latents {layout}, but got 5-D video latents of shape "
            f"{_fmt_shape(x.shape)} (B, C, F, H, W). {what} is image-only by design and is not defined on video "
            "latents (e.g. Wan's video VAE, whose latent frames are compressed in time). Folding the frames into the "
            "batch (x.transpose(1, 2).flatten(0, 1)) runs it frame by frame, which is meaningful only with a "
            "component trained on that VAE's frame latents.",
            name=name,
            expected=layout,
            actual=tuple(x.shape),
        )


#: Conditioning keywords whose 2-D tensors are shared by the whole batch (no batch dimension): the position ids
#: of diffusers' FLUX-family transformers (FLUX.1, FLUX.2, Chroma), ``img_ids (L, 3)`` and ``txt_ids (T, 3)``.
#: See :func:`is_shared_condition`.
SHARED_CONDITION_KEYS: frozenset[str] = frozenset({"img_ids", "txt_ids"})

#: The sentence that names the rule in the messages of the places that batch conditioning values.
SHARED_CONDITION_HINT = (
    "Values without a batch dimension are passed through as they are only as 2-D `img_ids` / `txt_ids` (the "
    "position ids of FLUX-family transformers, as FluxPipeline passes them); build other unbatched inputs "
    "inside a wrapper of the model."
)


def is_shared_condition(key: Any, value: Any) -> bool:
    """Whether the conditioning value ``value`` under the keyword ``key`` is shared by the batch, not batched.

    One rule for every place that indexes, slices or concatenates conditioning along the batch (the
    consistency losses' batch checks and per-sample subsets, the adversarial losses' lazy-R1 subset and
    ``mix_and_match`` permutation, classifier-free guidance's cond / uncond concatenation): a tensor is
    *shared* when its keyword is one of :data:`SHARED_CONDITION_KEYS` and it is 2-D. That is how diffusers'
    ``FluxPipeline`` calls ``FluxTransformer2DModel`` (0.42.1): ``txt_ids = zeros(T, 3)`` from ``encode_prompt``
    and ``img_ids = _prepare_latent_image_ids(...)``, ``(L, 3)``, one set for the whole batch (the transformer
    warns on the deprecated 3-D ``(B, L, 3)`` form and reads ``ids[0]``). A shared value is passed through
    unindexed and unconcatenated; the 3-D form keeps its batch dimension and is batched like any other
    tensor. The rule goes by name and rank, not by comparing dim 0 with the batch size, so that ``L == B``
    cannot make a shared value look batched.

    Args:
        key: the keyword the value is passed under (the innermost key of a nested mapping).
        value: the value.

    Returns:
        True for a 2-D tensor under a shared keyword.

    Example:
        >>> is_shared_condition("img_ids", torch.zeros(16, 3)), is_shared_condition("img_ids", torch.zeros(2, 16, 3))
        (True, False)
    """
    return (
        isinstance(key, str)
        and key in SHARED_CONDITION_KEYS
        and isinstance(value, torch.Tensor)
        and value.ndim == 2
    )
