"""Normalising what a network returns: a tensor, a diffusers ``ModelOutput`` / ``BaseOutput``, a tuple
or a dict. Used wherever a component accepts "any denoiser" or taps a module's output."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch

from ._checks import DTypeError, ShapeError, _fmt_shape

__all__ = ["check_prediction", "explain_dtype_errors", "first_tensor"]

# torch's dtype-clash messages ("mat1 and mat2 must have the same dtype", "Input type (double) and bias type
# (float) should be the same", "expected scalar type Float but found Double", ...).
_DTYPE_CLASH = re.compile(
    r"dtype|scalar type|input type \(.*\) and (bias|weight) type|should be the same|expected both",
    re.IGNORECASE,
)
# conv's "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)" is a device clash.
_TYPE_PAIR = re.compile(r"input type \((.*?)\) and (?:bias|weight) type \((.*?)\)", re.IGNORECASE)


def first_tensor(output: Any, what: str = "model") -> torch.Tensor:
    """Return the main tensor of a network output.

    A tensor is returned as is; an object with ``.sample`` (diffusers' UNet/VAE outputs) gives that
    attribute; a dict gives ``output["sample"]`` or its first value; a tuple/list gives element 0.

    Args:
        output: What the network returned.
        what: How to call the network in the error message (``"model"``, ``"teacher"``, ``"module 'mid_block'"``).

    Returns:
        The main tensor (the same object, not a copy).

    Raises:
        DTypeError: no tensor can be found in ``output`` in any of those places.

    Example:
        >>> from diffdistill._outputs import first_tensor
        >>> x = torch.zeros(2)
        >>> first_tensor((x, None)) is x, first_tensor({"sample": x}) is x
        (True, True)
    """
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, dict) and output:
        value = output["sample"] if "sample" in output else next(iter(output.values()))
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DTypeError(
        f"Expected the {what} to return a tensor, an object with a `.sample` tensor, a dict or a tuple whose "
        f"first element is a tensor, but got {type(output).__name__}. Wrap the {what} so it returns a tensor."
    )


def check_prediction(
    pred: torch.Tensor, like: torch.Tensor, name: str, *, input_name: str = "", note: str = ""
) -> None:
    """Raise unless a network's prediction is a floating tensor of the shape of its input (static checks).

    Args:
        pred: What the network returned (after :func:`first_tensor`).
        like: The input it was called on.
        name: The network's public name (``"model"``, ``"student"``, ``"fake"``, ...).
        input_name: The input's public name, quoted in the message when given (``"x_t"``).
        note: Added after the expected shape (e.g. why the batch is 2B).

    Raises:
        DTypeError: ``pred`` is not floating.
        ShapeError: ``pred``'s shape differs from ``like``'s.
    """
    if not pred.is_floating_point():
        raise DTypeError(
            f"Expected `{name}` to return a floating-point prediction, but got dtype {pred.dtype}."
        )
    if pred.shape != like.shape:
        what = f" `{input_name}`" if input_name else ""
        raise ShapeError(
            f"Expected `{name}` to return a prediction of the shape of its input{what} {_fmt_shape(like.shape)}"
            f"{note}, but got {_fmt_shape(pred.shape)}. Check the model's input / output channels and that it "
            "returns the prediction alone (not a learned variance beside it, a loss or a pooled value).",
            name=name,
            expected=tuple(like.shape),
            actual=tuple(pred.shape),
        )


@contextlib.contextmanager
def explain_dtype_errors(name: str, x: torch.Tensor, x_name: str) -> Iterator[None]:
    """Turn a dtype clash inside the caller's network ``name`` into a :class:`DTypeError` that says how to fix it.

    torch's own message ("mat1 and mat2 must have the same dtype") names neither the argument nor a fix. Only the
    failure path does any work, so the hot path pays nothing, and a network that casts its inputs itself is never
    refused. Device clashes and every other error pass through unchanged.

    Args:
        name: The network's public name.
        x: The input the caller passed.
        x_name: That input's public name.

    Yields:
        Nothing; the network runs inside the block.

    Raises:
        DTypeError: the block raised torch's dtype-clash ``RuntimeError`` (chained as the cause).
    """
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        pair = _TYPE_PAIR.search(message)
        if (
            "device" in message.lower()
            or not _DTYPE_CLASH.search(message)
            or (pair is not None and ("cuda" in pair[1].lower()) != ("cuda" in pair[2].lower()))
        ):
            raise
        first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
        raise DTypeError(
            f"`{name}` failed on `{x_name}` of dtype {x.dtype} ({first}). Its parameters (or a condition tensor) "
            f"probably have another dtype: cast `{x_name}` and the conditions to the network's dtype (e.g. "
            f"{x_name}.to(next({name}.parameters()).dtype)), or run the call under torch.autocast."
        ) from err
