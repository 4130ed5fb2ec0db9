"""Forward hooks that record the outputs of named sub-modules: the feature side of layer-level KD.

SSD-1B / Segmind-Vega (Gupta et al. 2024, arXiv:2401.02677) and BK-SDM (Kim et al. 2023,
arXiv:2305.15798) distil a pruned UNet by matching the outputs of its blocks to the teacher's. The
original scripts (``distill_sdxl.py::getActivation``) register ``register_forward_hook`` closures that
store ``output[0]`` of tuple-returning blocks; :class:`FeatureTap` is that helper made safe to use:

* module names may be explicit (``"mid_block"``) or glob patterns matched one dotted component per
  ``*`` (``"down_blocks.*.attentions.*"``; ``"**"`` spans any number of components);
* DDP / FSDP / ``torch.compile`` / ``DataParallel`` wrappers are unwrapped before the names are
  resolved (the "unet has no attribute down_blocks" bug of distill-sd);
* the first tensor of tuple / ``ModelOutput`` outputs is kept (:func:`diffdistill._outputs.first_tensor`),
  except for the joint-attention blocks of diffusers' rectified-flow transformers, which return
  ``(encoder_hidden_states, hidden_states)``: their image stream (element 1) is kept, see
  :data:`IMAGE_STREAM_OUTPUT` (SD3's last, context-pre-only block returns ``(None, hidden_states)``; FLUX's
  single-stream blocks split the joint sequence and return the image tokens as element 1, checked in diffusers
  0.42; older releases returned the concatenated ``[text; image]`` sequence from single blocks);
* transformer blocks may also be named by their index in execution order (``3`` for
  ``transformer_blocks.3``; FLUX: ``19 + i`` for ``single_transformer_blocks.i``), see
  :func:`transformer_block_names`;
* a gradient-checkpointing recomputation (hooks fire again inside ``backward()``) is not recorded, so
  each key holds the output of the last *real* forward and :attr:`FeatureTap.calls` counts those;
* hooks are removed on :meth:`FeatureTap.close` and on context-manager exit.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._checks import DTypeError, OptionError, check_bool, check_module
from .._modules import unwrap_model
from .._outputs import first_tensor
from .._transformer_blocks import (
    IMAGE_STREAM_OUTPUT,
    block_lists_of,
    image_stream_index,
    transformer_block_names,
)

__all__ = [
    "IMAGE_STREAM_OUTPUT",
    "FeatureTap",
    "image_stream",
    "in_backward_pass",
    "resolve_module_names",
    "transformer_block_names",
]

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


#: Names of the block lists of diffusers transformers, in execution order (FLUX / Qwen-Image run
#: ``transformer_blocks`` first, then FLUX's ``single_transformer_blocks``).


def image_stream(module: nn.Module, output: Any, what: str = "module") -> torch.Tensor:
    """The image-token tensor of a block's output: element :data:`IMAGE_STREAM_OUTPUT` of a joint block's tuple,
    else the first tensor (:func:`~diffdistill._outputs.first_tensor`).

    Args:
        module: The module that returned ``output`` (its class name, or a base class's, selects the element).
        output: What it returned.
        what: How to name the module in an error message.

    Returns:
        The tensor (the same object, not a copy): ``(B, tokens, width)`` for transformer blocks.

    Raises:
        DTypeError: no tensor at the expected place.

    Example:
        >>> class JointTransformerBlock(torch.nn.Module):  # returns (text, image) like diffusers' SD3 block
        ...     def forward(self, img, txt):
        ...         return txt + 1, img + 1
        >>> img, txt = torch.zeros(1, 4, 2), torch.zeros(1, 3, 2)
        >>> block = JointTransformerBlock()
        >>> tuple(image_stream(block, block(img, txt)).shape)
        (1, 4, 2)
    """
    return _image_stream_at(image_stream_index(module), module, output, what)


def _image_stream_at(index: int | None, module: nn.Module, output: Any, what: str) -> torch.Tensor:
    """:func:`image_stream` with the block's :func:`image_stream_index` given (a hook looks it up once, outside the
    compiled graph of a ``torch.compile`` d block, where dynamo cannot iterate over a class's MRO)."""
    if index is None or not isinstance(output, (tuple, list)):
        return first_tensor(output, what=what)
    if len(output) <= index or not isinstance(output[index], torch.Tensor):
        raise DTypeError(
            f"Expected the {what} ({type(module).__name__}) to return its image stream as element {index} of a "
            f"tuple, but got a {type(output).__name__} of {len(output)} without a tensor there. A diffusers "
            "version with another block output order: tap a sub-module whose output is the image stream."
        )
    return output[index]


def in_backward_pass() -> bool:
    """Whether the caller runs inside an autograd ``backward()`` (e.g. a gradient-checkpointing recompute).

    Returns:
        True inside a backward pass (a hook that fires there sees a recomputation, not a new forward).

    Raises:
        Nothing: a torch without the graph-task query reports False.

    Example:
        >>> in_backward_pass()
        False
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _match_parts(pattern: Sequence[str], name: Sequence[str]) -> bool:
    """Component-wise glob match; ``**`` matches zero or more components."""
    from fnmatch import fnmatchcase

    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_parts(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatchcase(name[0], head) and _match_parts(rest, name[1:])


def _resolve(model: nn.Module, patterns: Any, arg: str, owner: str = "") -> list[str]:
    """:func:`resolve_module_names` with the messages naming the caller's argument ``arg``."""
    model = unwrap_model(model)
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple)):
        raise DTypeError(
            f"Expected `{arg}` to be a module name or a list of names / glob patterns, but got "
            f"{type(patterns).__name__}; e.g. {arg}=['mid_block', 'down_blocks.*.attentions.*']."
        )
    if not patterns:
        raise OptionError(
            f"Expected `{arg}` to name at least one module, but it is empty. List the modules to tap, e.g. "
            f"{arg}=['mid_block'] (names: [n for n, _ in model.named_modules()])."
        )
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    wanted: set[str] = set()
    blocks = [
        f"{n}.{i}"
        for n, b in block_lists_of(unwrap_model(model), None, required=False)
        for i in range(len(b))
    ]
    for pattern in patterns:
        if blocks and isinstance(pattern, int) and not isinstance(pattern, bool):
            if not -len(blocks) <= pattern < len(blocks):
                raise OptionError(
                    f"Expected the block index {pattern} in `{arg}` to lie in [0, {len(blocks)}) (the "
                    f"{owner}{type(model).__name__} has {len(blocks)} transformer blocks: {blocks[0]} ... "
                    f"{blocks[-1]}), but it does not. Use transformer_block_names(model) to list them."
                )
            wanted.add(blocks[pattern])
            continue
        if not isinstance(pattern, str):
            raise DTypeError(
                f"Expected every entry of `{arg}` to be a module name (str), but got {type(pattern).__name__} "
                f"{pattern!r}. Use dotted names as in model.named_modules(), e.g. 'down_blocks.0'."
            )
        if _GLOB_CHARS & set(pattern):
            parts = pattern.split(".")
            hits = [n for n in names if _match_parts(parts, n.split("."))]
            if not hits:
                raise OptionError(
                    f"Expected the pattern {pattern!r} in `{arg}` to match at least one module of "
                    f"{owner}{type(model).__name__}, but it matched none. Each '*' matches one dotted component; "
                    "use '**' to span several."
                )
            wanted.update(hits)
        elif pattern in known:
            wanted.add(pattern)
        else:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" Close names: {close}." if close else ""
            raise OptionError(
                f"Expected {pattern!r} in `{arg}` to name a sub-module of {owner}{type(model).__name__}, but it has none "
                f"of that name.{hint} List them with [n for n, _ in model.named_modules()]."
            )
    return [n for n in names if n in wanted]


def resolve_module_names(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Resolve explicit names and glob patterns to module names of ``model`` (wrappers unwrapped).

    A ``*`` matches within one dotted component (``down_blocks.*.resnets.*`` does not reach into the
    resnets' sub-modules); ``**`` matches any number of components. Names come back in the model's
    ``named_modules()`` order, without duplicates.

    Args:
        model: The network (DDP / FSDP / compiled / DataParallel wrappers are unwrapped first).
        patterns: One module name or pattern, or a list / tuple of them (at least one); for a diffusers
            transformer, list entries may also be block indices in execution order
            (:func:`transformer_block_names`).

    Returns:
        The matching module names (the root module, named ``""``, is never returned).

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``patterns`` is not a string or a list / tuple of
            strings.
        OptionError: ``patterns`` is empty, an explicit name is not a module of the model, a pattern
            matches nothing, or a block index is out of range.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
        >>> resolve_module_names(net, ["*", "1.0"])
        ['0', '1', '1.0']
    """
    check_module(model, "model")
    return _resolve(model, patterns, "patterns")


class FeatureTap:
    """Record the outputs of named sub-modules of ``model`` at every forward.

    Args:
        model: The network (a DDP / FSDP / compiled / DataParallel wrapper is unwrapped first).
        modules: Module names or glob patterns (the key of each feature is the module name; see
            :func:`resolve_module_names`), or a mapping ``{key: name}`` when the features should be stored
            under other keys (each name must then resolve to exactly one module). At least one module.
        detach: Store ``output.detach()`` (for a frozen teacher run with grad enabled). Default ``False``:
            the features keep their autograd graph (a student's KD term trains through them).

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``modules`` is not a string, a list / tuple of strings
            or a mapping of strings; ``detach`` is not a bool. At a forward: a tapped module returns no tensor
            (neither a tensor, a ``.sample``, a dict nor a tuple starting with one).
        OptionError: ``modules`` is empty, names no module of ``model``, holds a block index out of range, or a
            mapping entry matches no or several modules.

    After a forward, :attr:`features` maps each key to a tensor of the module's output shape, e.g.
    ``(B, C, H, W)`` for UNet blocks, resnets and ``Transformer2DModel`` s and ``(B, H*W, C)`` for
    ``transformer_blocks`` (UNet attentions' and SD3 / FLUX blocks' image tokens alike). Use :meth:`pop` at each step so no feature outlives it.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> with FeatureTap(net, ["0", "2"]) as tap:
        ...     _ = net(torch.randn(5, 3))
        ...     feats = tap.pop()
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'0': (5, 4), '2': (5, 2)}
        >>> len(net[0]._forward_hooks)
        0
    """

    def __init__(
        self,
        model: nn.Module,
        modules: str | Sequence[str] | Mapping[str, str],
        *,
        detach: bool = False,
    ) -> None:
        check_module(model, "model")
        check_bool(detach, "detach")
        inner = unwrap_model(model)
        if isinstance(modules, Mapping):
            if not modules:
                raise OptionError(
                    "Expected `modules` to name at least one module, but the mapping is empty. Pass e.g. "
                    "modules={'mid': 'mid_block'}."
                )
            names: dict[str, str] = {}
            for key, pattern in modules.items():
                if not isinstance(pattern, str):
                    raise DTypeError(
                        f"Expected `modules` to map keys to module names (str), but key {key!r} maps to "
                        f"{type(pattern).__name__} {pattern!r}."
                    )
                found = _resolve(inner, pattern, "modules")
                if len(found) != 1:
                    raise OptionError(
                        f"Expected {pattern!r} (key {key!r}) to name exactly one module, but it matched "
                        f"{len(found)}: {found[:5]}. Give one explicit name per key."
                    )
                names[str(key)] = found[0]
        else:
            names = {n: n for n in _resolve(inner, modules, "modules")}
        self.names: dict[str, str] = names
        self.detach = bool(detach)
        self._features: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(names, 0)
        self.handles: list[RemovableHandle] = []
        lookup = dict(inner.named_modules())
        for key, name in names.items():
            module = lookup[name]
            self.handles.append(module.register_forward_hook(self._make_hook(key, name, module)))
        logger.debug("FeatureTap on %d module(s) of %s", len(names), type(inner).__name__)

    def _make_hook(self, key: str, name: str, tapped: nn.Module) -> Any:
        index = image_stream_index(tapped)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # copy.deepcopy of the model (an EMA or frozen copy made after the tap) copies this hook onto
            # the copy's module: only the tapped module itself records.
            if module is not tapped or in_backward_pass():  # in backward: checkpoint recomputation
                return
            feature = _image_stream_at(index, module, output, f"module '{name}'")
            self._features[key] = feature.detach() if self.detach else feature
            self.calls[key] += 1

        return hook

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """The features of the last forward (a new dict; the tap keeps its references until :meth:`pop`).

        Returns:
            ``{key: tensor}`` for every tapped module that ran since the last :meth:`pop` / :meth:`clear`.
        """
        return dict(self._features)

    @property
    def closed(self) -> bool:
        """Whether the hooks have been removed.

        Returns:
            True after :meth:`close` (or the ``with`` block's end): the tap records nothing any more.
        """
        return not self.handles

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the recorded features and forget them (call once per training step).

        Returns:
            ``{key: tensor}`` of the last forward of every tapped module that ran (a module that did not run
            has no key); the tap then holds no reference to them.
        """
        out, self._features = self._features, {}
        return out

    def clear(self) -> None:
        """Forget the recorded features and reset :attr:`calls`."""
        self._features = {}
        self.calls = dict.fromkeys(self.names, 0)

    def close(self) -> None:
        """Remove every hook and forget the features; safe to call twice."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._features = {}

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"FeatureTap({len(self.names)} module(s), {state}, recorded={sorted(self._features)})"
