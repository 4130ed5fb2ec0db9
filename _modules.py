"""Modules under training wrappers (DDP, FSDP, ``torch.compile``, accelerate): the user's module inside
them, temporarily frozen parameters that FSDP2 honours, and FSDP2 sharding of a frozen network."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._checks import DTypeError, OptionError

__all__ = ["frozen", "reshard", "shard_frozen", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` / DeepSpeed engine (``.module``), FSDP1 and
    ``torch.compile`` (``._orig_mod``) wrappers, repeatedly, so names and parameters are those of the user's model.

    Args:
        model: The network, wrapped or not (FSDP2's ``fully_shard`` keeps the module itself: nothing to strip).

    Returns:
        The innermost user module (``model`` itself when it is not wrapped; anything that is not a wrapper
        comes back unchanged).

    Example:
        >>> from diffdistill._modules import unwrap_model
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 16:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        deepspeed = sys.modules.get("deepspeed")  # a DeepSpeedEngine holds the model as .module
        if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
            model = model.module
            continue
        fsdp_inner = getattr(model, "_fsdp_wrapped_module", None)
        if isinstance(fsdp_inner, nn.Module):
            model = fsdp_inner
            continue
        break
    return model


def _check_modules(modules: tuple[object, ...], what: str) -> None:
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise DTypeError(
                f"Expected every argument of `{what}` to be a torch.nn.Module, but argument {i} is "
                f"{type(module).__name__}. Pass the networks themselves, e.g. {what}(fake_score, discriminator)."
            )


def reshard(*modules: nn.Module) -> None:
    """Put the FSDP2 modules (``fully_shard``) in ``modules`` back on their sharded parameters (a no-op for
    modules without FSDP2).

    Call it before writing into a sharded model's parameters outside the optimiser (loading averaged
    weights, restoring them): a root module stays unsharded after a forward pass without backward (e.g.
    a validation sample), and its next forward would reuse those unsharded values instead of the written
    shards.

    Args:
        *modules: The networks; every FSDP2 sub-module inside them is resharded. Modules without FSDP2 (or a
            torch without it) are left alone; no module at all is a no-op.

    Raises:
        DTypeError: an argument is not an ``nn.Module`` (e.g. ``model.parameters()``).

    Example:
        >>> from diffdistill.students import reshard
        >>> reshard(nn.Linear(2, 2))  # no FSDP2 inside: nothing to do
    """
    _check_modules(modules, "reshard")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``modules`` inside the block, the previous flags after.

    For a generator update through a network that must not collect gradients (a fake score, a
    discriminator): autograd computes no parameter gradients for it, and under DDP its reducer expects
    none. FSDP2 (``fully_shard``) copies the flag of a sharded parameter into the unsharded one at every
    all-gather, so a module left unsharded after a forward would see a flag set on its unsharded
    parameters undone at the next all-gather: the modules are resharded before the flags change, on entry
    and on exit.

    Args:
        *modules: The networks to freeze for the block. Each parameter gets its own flag back on exit (also
            when the block raises), so parameters that were already frozen stay frozen. Gradients are not
            blocked for the *inputs*: a generator's loss still back-propagates through the frozen network.

    Yields:
        Nothing; the parameters are frozen inside the ``with`` block.

    Raises:
        DTypeError: an argument is not an ``nn.Module`` (e.g. ``model.parameters()``).

    Example:
        >>> from diffdistill.students import frozen
        >>> net = nn.Linear(2, 2)
        >>> with frozen(net):
        ...     net.weight.requires_grad
        False
        >>> net.weight.requires_grad
        True
    """
    _check_modules(modules, "frozen")
    reshard(*modules)
    params = [p for m in modules for p in m.parameters()]
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        reshard(*modules)
        for p, state in zip(params, states):
            p.requires_grad_(state)


def shard_frozen(model: nn.Module, *, ignored_params: Iterable[nn.Parameter] = (), **kwargs: Any) -> int:
    """Shard a network's weights over the processes with FSDP2 (``fully_shard``): each block named in its
    ``_no_split_modules`` (diffusers: the resnet / transformer blocks; collected from every sub-module that
    declares them) innermost first, then the network itself as the root.

    For a frozen network no optimiser owns -- a teacher copy, the base of :class:`~diffdistill.students.SharedBase`
    -- so nothing else shards it: each process then holds ``1 / world_size`` of its weights, gathered one block at
    a time for a forward (and again for a backward through it). Every process must then run the same sequence of
    calls into it (all-gathers are collectives): call it after any per-process work with the network (e.g. teacher
    samples each process makes a share of). Call it after moving the network to its device and, with
    ``torch.compile`` of its blocks, after compiling them.

    Args:
        model: The network (its parameters may be frozen or not; FSDP2 holds both).
        ignored_params: Parameters left out of the sharding (e.g. LoRA weights a view shards itself).
        **kwargs: ``fully_shard`` options (``mesh``, ``reshard_after_forward``, ``mp_policy``, ``offload_policy``).

    Returns:
        The number of blocks sharded (the root not counted).

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``.
        OptionError: torch has no FSDP2; the process group is not initialised.

    Example:
        >>> from diffdistill.students import shard_frozen
        >>> shard_frozen(torch.nn.Linear(2, 2))  # doctest: +SKIP
    """
    _check_modules((model,), "shard_frozen")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch without FSDP2
        raise OptionError("Expected a torch with FSDP2 (torch.distributed.fsdp.fully_shard).") from err
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise OptionError(
            "Expected an initialised process group for FSDP2 sharding, but there is none: call it inside a "
            "distributed run (after Accelerator() or torch.distributed.init_process_group)."
        )
    ignored = set(ignored_params)
    classes = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    blocks = [m for n, m in model.named_modules() if n and type(m).__name__ in classes]
    for block in reversed(blocks):  # innermost first
        fully_shard(block, ignored_params=ignored, **kwargs)
    fully_shard(model, ignored_params=ignored, **kwargs)
    logger.info("sharded %s: %d block(s) and the root", type(model).__name__, len(blocks))
    return len(blocks)
