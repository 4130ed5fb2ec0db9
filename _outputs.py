"""Normalising what a network returns: a tensor, a diffusers ``ModelOutput`` / ``BaseOutput``, a tuple
or a dict. Used wherever a component accepts "any denoiser" or taps a module's output."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import DTypeError

__all__ = ["first_tensor"]


def first_tensor(output: Any, what: str = "model") -> torch.Tensor:
    """Return the main tensor of a network output.

    A tensor is returned as is; an object with ``.sample`` (diffusers' UNet/VAE outputs) gives that
    attribute; a dict gives ``output["sample"]`` or its first value; a tuple/list gives element 0.

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
