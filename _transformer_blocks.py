"""Transformer blocks of diffusers models (SD3, FLUX, Qwen-Image, Wan, ...): their module lists and names in
execution order, shared by the discriminators' feature extractor and the students' feature taps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import nn

from ._checks import DTypeError, OptionError, check_module
from ._modules import unwrap_model

__all__ = [
    "DEFAULT_BLOCK_LISTS",
    "IMAGE_STREAM_OUTPUT",
    "block_lists_of",
    "check_block_lists",
    "image_stream_index",
    "transformer_block_names",
]

#: Attribute names of the block lists a diffusers transformer runs, in execution order (FLUX: double-stream
#: ``transformer_blocks`` then single-stream ``single_transformer_blocks``; Wan: ``blocks``).
DEFAULT_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def check_block_lists(block_lists: Any) -> tuple[str, ...] | None:
    if block_lists is None:
        return None
    if isinstance(block_lists, str):
        block_lists = (block_lists,)
    if not isinstance(block_lists, Sequence) or not all(isinstance(b, str) for b in block_lists):
        raise DTypeError(
            "Expected `block_lists` to be None or attribute names (str) of the model's block lists in execution "
            f"order, e.g. ('transformer_blocks', 'single_transformer_blocks'), but got {block_lists!r}."
        )
    if not block_lists:
        raise OptionError("Expected `block_lists` to name at least one block list, but got ().")
    return tuple(block_lists)


def block_lists_of(
    model: Any, block_lists: tuple[str, ...] | None, *, required: bool = True
) -> list[tuple[str, nn.ModuleList]]:
    """The ``(name, ModuleList)`` pairs to index, in execution order.

    Args:
        model: the unwrapped model.
        block_lists: checked attribute names (:func:`check_block_lists`), or None for
            :data:`DEFAULT_BLOCK_LISTS` (those the model has).
        required: raise when the model has no blocks; False gives ``[]`` (e.g. for a UNet).

    Returns:
        The ``(attribute name, nn.ModuleList)`` pairs.

    Raises:
        OptionError: a named block list is not an ``nn.ModuleList``; no blocks and ``required``.
    """
    names = block_lists or DEFAULT_BLOCK_LISTS
    found = []
    for name in names:
        value = getattr(model, name, None)
        if isinstance(value, nn.ModuleList):
            found.append((name, value))
        elif block_lists is not None:
            raise OptionError(
                f"Expected every entry of `block_lists` to name an nn.ModuleList attribute of the model, but "
                f"{type(model).__name__}.{name} is {type(value).__name__}."
            )
    if not any(len(blocks) for _, blocks in found):
        if not required:
            return []
        raise OptionError(
            f"Found no transformer blocks on {type(model).__name__}: none of {list(names)} is a non-empty "
            "nn.ModuleList. Pass `block_lists` with the attribute names of its block lists in execution order."
        )
    return found


def transformer_block_names(model: nn.Module, block_lists: Sequence[str] | None = None) -> tuple[str, ...]:
    """Module names of a transformer's blocks in execution order; a block's index is its position here.

    Args:
        model: a diffusers transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...), possibly
            wrapped in DDP / ``torch.compile``.
        block_lists: attribute names of the ``nn.ModuleList`` s of blocks, in the order the forward runs
            them (default None: those of ``transformer_blocks``, ``single_transformer_blocks`` and
            ``blocks`` that the model has).

    Returns:
        ``("transformer_blocks.0", ..., "single_transformer_blocks.0", ...)``.

    Raises:
        DTypeError: ``model`` is not a module; ``block_lists`` is not a sequence of str.
        OptionError: a named block list is not an ``nn.ModuleList``, or the model has no blocks.

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> flux = FluxTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        ...     axes_dims_rope=(2, 2, 4))
        >>> transformer_block_names(flux)
        ('transformer_blocks.0', 'transformer_blocks.1', 'single_transformer_blocks.0')
    """
    check_module(model, "model")
    lists = block_lists_of(unwrap_model(model), check_block_lists(block_lists))
    return tuple(f"{name}.{i}" for name, blocks in lists for i in range(len(blocks)))


#: Blocks whose output is a tuple holding the text and the image stream, by class name: the position of the image
#: stream (``hidden_states``) in the tuple. Checked against diffusers 0.42: SD3 / SD3.5 ``JointTransformerBlock``,
#: FLUX ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` and Qwen-Image ``QwenImageTransformerBlock``
#: return ``(encoder_hidden_states, hidden_states)``. Wan's ``WanTransformerBlock`` is not listed: it returns one
#: ``(B, F'H'W', D)`` tensor of video tokens (text enters by cross-attention), taken as it is.
IMAGE_STREAM_OUTPUT: Mapping[str, int] = MappingProxyType(
    {
        "JointTransformerBlock": 1,
        "FluxTransformerBlock": 1,
        "FluxSingleTransformerBlock": 1,
        "QwenImageTransformerBlock": 1,
    }
)


def image_stream_index(module: nn.Module) -> int | None:
    """Where the image stream sits in the output tuple of ``module`` (:data:`IMAGE_STREAM_OUTPUT`).

    FSDP2's ``fully_shard`` swaps the class for a subclass (``FSDPFluxTransformerBlock``), so the lookup goes
    along the class's MRO.

    Args:
        module: a block of a diffusers transformer (or any module).

    Returns:
        The tuple index of the image stream, or None for a module not listed.
    """
    return next(
        (IMAGE_STREAM_OUTPUT[c.__name__] for c in type(module).__mro__ if c.__name__ in IMAGE_STREAM_OUTPUT),
        None,
    )
