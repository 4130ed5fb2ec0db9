"""Exponential moving average of a model's weights, as a module that can serve as a consistency target.

.. math:: \\theta^- \\leftarrow d_k\\,\\theta^- + (1 - d_k)\\,\\theta

with the decay :math:`d_k` of update ``k`` optionally warmed up. Used as the EMA target of LCM (decay
0.95), Hyper-SD's TSCD (Alg. 1, line 16) and for evaluation weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import OptionError, ShapeError, check_bool, check_int, check_module, check_option, check_real
from .._modules import unwrap_model

__all__ = ["EMA"]


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class _Slots:
    """Where a module holds tensors: per tensor, its owning module's ``_parameters`` / ``_buffers`` dict and key."""

    module: nn.Module
    params: list[tuple[dict[str, Any], str]]
    buffers: list[tuple[dict[str, Any], str]]


def _slots_of(module: nn.Module, averaged: Sequence[bool]) -> _Slots:
    """The slots of ``module``'s parameters (those flagged in ``averaged``, in ``parameters()`` order) and of its
    buffers (``buffers()`` order; tied tensors once, as those iterators list them)."""

    def slot(name: str, kind: str) -> tuple[dict[str, Any], str]:
        owner, _, key = name.rpartition(".")
        return getattr(module.get_submodule(owner), kind), key

    params = [slot(n, "_parameters") for (n, _), keep in zip(module.named_parameters(), averaged) if keep]
    return _Slots(module, params, [slot(n, "_buffers") for n, _ in module.named_buffers()])


def _is_shard(param: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``param`` is a shard (``DTensor``) while ``like`` (the average) is a whole tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    return isinstance(param, DTensor) and not isinstance(like, DTensor)


class EMA(nn.Module):
    """EMA copy of ``model``; ``ema(x, ...)`` runs the averaged copy, ``state_dict()`` resumes it exactly.

    Args:
        model: The online model (DDP / DataParallel / DeepSpeed / FSDP1 / compile wrappers are unwrapped).
        decay: The target decay ``d`` in [0, 1] (1 freezes the average at the first copy).
        warmup: ``"none"`` (a copy for the first ``update_after_step`` updates, then the constant ``d``),
            ``"linear"`` (``min(d, (1 + k) / (10 + k))``, diffusers' default ``EMAModel``) or ``"power"``
            (``min(d, 1 - (1 + k / inv_gamma) ** -power)``, diffusers' ``use_ema_warmup=True``), where
            ``k = updates - update_after_step - 1``; in the warm-up modes the decay is 0 (a copy) while
            ``k <= 0`` and never below ``min_decay`` after.
        update_after_step: How many first updates copy the weights instead of averaging them (default 0: the
            first update is a copy only in the warm-up modes). As in diffusers' ``EMAModel``.
        inv_gamma: ``"power"`` warm-up: the inverse multiplicative factor of the step count (> 0, default 1).
        power: ``"power"`` warm-up: the exponent (> 0; diffusers' default 2/3, 3/4 for long runs).
        min_decay: The smallest decay the warm-up modes use once ``k > 0`` (in [0, ``decay``], default 0).
        include_buffers: Also average floating buffers (e.g. BatchNorm statistics); other buffers are copied.
            ``False`` copies every buffer.
        trainable_only: Average only the parameters that require gradients in ``model`` when the EMA is
            built; the others are *shared* with ``model`` (the same ``Parameter`` objects: no copy, never
            updated, and :meth:`update` does not read them). For a LoRA student the EMA then costs the
            adapters only: on SDXL a whole copy is ~2.6e9 more weights to hold and to read every update
            (under FSDP2, to all-gather). The shared weights are not the EMA's state: ``state_dict()``
            leaves them out and ``load_state_dict`` never writes them. They must stay frozen and stay where
            the model has them: writing into them in place (merging adapters, ``ema.to(...)``) changes the
            model too. A model sharded *after* the EMA is built (FSDP2 replaces its parameters) keeps
            its whole frozen weights alive in the EMA, as a whole copy would. Default ``False``: a whole copy.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; a number or flag has the wrong type (e.g. a string).
        OptionError: ``decay`` / ``min_decay`` outside ``0 <= min_decay <= decay <= 1``, an unknown
            ``warmup``, a negative ``update_after_step``, or ``inv_gamma`` / ``power`` not > 0.

    The update count lives in a buffer, so ``load_state_dict`` restores the decay schedule too. The
    averaged copy is in eval mode with ``requires_grad=False``; it keeps the dtype and device it is given
    (``ema.to(...)``, e.g. a float32 average of bf16 weights, or an average kept on the CPU): :meth:`update`
    converts the online weights to them. The copy may also be moved or cast by itself (``ema.module.to(...)``,
    or a pipeline holding it: ``pipe.unet = ema.module; pipe.to(...)``): later updates reach its new tensors.

    Sharded models: an EMA built before FSDP2 (``fully_shard``) shards the online model is a whole copy,
    and :meth:`update` gathers the online shards one tensor at a time (``DTensor.full_tensor``: a
    collective, so call it on every process; it moves the whole model each update, or with
    ``trainable_only`` the averaged parameters only); an EMA built from the sharded model averages shard
    by shard.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> ema.update(net)
        0.5
        >>> torch.allclose(ema.module.weight, net.weight - 0.5)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: str = "none",
        update_after_step: int = 0,
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
        include_buffers: bool = True,
        trainable_only: bool = False,
    ) -> None:
        super().__init__()
        check_module(model, "model")
        decay, min_decay = check_real(decay, "decay"), check_real(min_decay, "min_decay")
        if not 0.0 <= min_decay <= decay <= 1.0:
            raise OptionError(
                f"Expected 0 <= `min_decay` <= `decay` <= 1, but got min_decay={min_decay!r}, decay={decay!r}."
            )
        check_option(warmup, "warmup", ("none", "linear", "power"))
        self.decay = decay
        self.warmup = warmup
        self.update_after_step = check_int(update_after_step, "update_after_step", minimum=0)
        self.inv_gamma = check_real(inv_gamma, "inv_gamma", low=0.0, strict=True)
        self.power = check_real(power, "power", low=0.0, strict=True)
        self.min_decay = min_decay
        self.include_buffers = check_bool(include_buffers, "include_buffers")
        check_bool(trainable_only, "trainable_only")
        source = unwrap_model(model)
        params = list(source.parameters())
        # Which of the model's parameters are averaged (all, or those that require gradients).
        self._averaged = [bool(p.requires_grad) or not trainable_only for p in params]
        shared = {id(p): p for p, averaged in zip(params, self._averaged) if not averaged}
        self.module = copy.deepcopy(source, memo=shared).eval().requires_grad_(False)
        # State-dict names (relative to this EMA) of the shared weights, tied duplicates included.
        self._shared_names = {
            f"module.{n}" for n, q in self.module.named_parameters(remove_duplicate=False) if id(q) in shared
        }
        # Names and shapes of the model's parameters, shapes of its buffers (an update from another architecture
        # is refused by them; a DTensor reports its global shape, so sharding the model later keeps them).
        self._param_names = [n for n, _ in source.named_parameters()]
        self._param_shapes = [p.shape for p in params]
        self._buffer_shapes = [b.shape for b in source.buffers()]
        # Where the copy holds its averaged parameters and its buffers, found once (walking a UNet's module
        # tree takes tens of milliseconds): see _own_tensors.
        self._slots: _Slots | None = None
        if self._shared_names:
            self.register_state_dict_post_hook(EMA._drop_shared)
            self.register_load_state_dict_pre_hook(EMA._keep_shared)
        # The counter lives with the averaged weights (a whole state_dict on the model's device).
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        self.num_updates: torch.Tensor
        self.register_buffer(
            "num_updates",
            torch.zeros((), dtype=torch.long, device=first.device if first is not None else None),
        )
        # The count on the host: reading a CUDA counter at every update would wait for the whole step.
        # Re-read from the buffer after a load (None: not known on the host).
        self._count: int | None = 0
        self.register_load_state_dict_post_hook(EMA._forget_count)

    @staticmethod
    def _forget_count(module: EMA, incompatible_keys: Any) -> None:
        module._count = None

    @staticmethod
    def _drop_shared(module: EMA, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name in module._shared_names:
            state_dict.pop(prefix + name, None)

    @staticmethod
    def _keep_shared(module: EMA, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The shared weights load onto themselves (a no-op): whatever the checkpoint holds for them (or
        # its lack of them) leaves the model's weights as they are.
        current = dict(module.module.named_parameters(remove_duplicate=False))
        for name in module._shared_names:
            state_dict[prefix + name] = current[name.removeprefix("module.")].detach()

    def _own_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The copy's averaged parameters and its buffers, as the copy holds them now.

        They are read through the slots that hold them (each owning module's ``_parameters`` / ``_buffers``
        dict and the key), found once per copy: moving or casting the copy in place (``ema.module.to(...)``,
        ``pipe.unet = ema.module; pipe.to(...)``, ``.double()``) puts new buffers in those dicts (and new
        parameters under ``torch.__future__.set_overwrite_module_params_on_conversion(True)``, or after
        ``load_state_dict(..., assign=True)``), and the next update writes into them, not into the old
        tensors. A cached list of tensors would go stale there; reading the slots costs one dict look-up per
        tensor (0.17 ms for the 3,256 parameters of SDXL's UNet with a LoRA, one CPU thread), not a walk of
        its 9,810 modules.
        """
        slots = self._slots
        if slots is None or slots.module is not self.module:  # first update, or a new copy was assigned
            slots = self._slots = _slots_of(self.module, self._averaged)
        return [d[key] for d, key in slots.params], [d[key] for d, key in slots.buffers]

    def train(self, mode: bool = True) -> EMA:
        """Set the training flag of this wrapper; the averaged copy always stays in eval mode.

        Args:
            mode: The flag ``nn.Module.train`` sets (default True); it never reaches :attr:`module`.

        Returns:
            ``self``.
        """
        super().train(mode)
        self.module.eval()
        return self

    def decay_at(self, num_updates: int) -> float:
        """Decay used by update number ``num_updates`` (1-based).

        Args:
            num_updates: The update's number (``1`` for the first update; ``0`` gives the decay before any
                update, a copy).

        Returns:
            The decay ``d_k`` in [0, ``decay``] (see the class docstring for the warm-up formulas).

        Raises:
            DTypeError: ``num_updates`` is not an int (nor a 0-d integer tensor).
            OptionError: ``num_updates`` is negative.

        Example:
            >>> ema = EMA(torch.nn.Linear(1, 1), decay=0.999, warmup="linear")
            >>> [round(ema.decay_at(k), 4) for k in (1, 2, 11, 10_000)]
            [0.0, 0.1818, 0.55, 0.999]
        """
        if (
            isinstance(num_updates, torch.Tensor)
            and num_updates.ndim == 0
            and num_updates.dtype in _INT_DTYPES
        ):
            num_updates = int(num_updates)  # e.g. ``ema.num_updates`` itself (one read of a 0-d counter)
        num_updates = check_int(num_updates, "num_updates", minimum=0)
        if self.warmup == "none":  # a copy until update_after_step updates have passed, then constant
            return 0.0 if num_updates <= self.update_after_step else self.decay
        step = max(0, num_updates - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.warmup == "power":
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _check_same_architecture(self, source: nn.Module, params: Sequence[torch.Tensor], what: str) -> None:
        """Refuse a model whose parameters or buffers differ in number or shape from those the EMA was built
        from (a shape that broadcasts would otherwise be averaged silently, one that does not fails inside torch)."""
        hint = (
            f"`model` must have the architecture the EMA was built from ({type(self.module).__name__}); "
            f"pass the same (online) network to {what} that was passed to EMA(...)."
        )
        if len(params) != len(self._param_shapes):
            raise OptionError(
                f"`model` has {len(params)} parameters but the EMA copy has {len(self._param_shapes)}. {hint}"
            )
        shapes = [p.shape for p in params]
        if shapes != self._param_shapes:
            names = [n for n, _ in source.named_parameters()]
            i = next(j for j, (a, b) in enumerate(zip(shapes, self._param_shapes)) if a != b)
            if hasattr(params[i], "ds_shape"):
                hint += (
                    " DeepSpeed ZeRO-3 partitions the parameters (each process holds a flat slice): keep an EMA "
                    "under ZeRO-1/2 or FSDP."
                )
            raise ShapeError(
                f"Expected `model`'s parameter `{names[i]}` to have shape {tuple(self._param_shapes[i])} (the EMA's "
                f"`{self._param_names[i]}`), but got {tuple(shapes[i])}. {hint}",
                name="model",
                expected=tuple(self._param_shapes[i]),
                actual=tuple(shapes[i]),
            )

    def _check_same_buffers(self, buffers: Sequence[torch.Tensor], what: str) -> None:
        shapes = [b.shape for b in buffers]
        if shapes != self._buffer_shapes:
            raise ShapeError(
                f"Expected `model` to have {len(self._buffer_shapes)} buffers of the shapes of the EMA copy's, but "
                f"got {len(shapes)} with other shapes (e.g. EMA {[tuple(s) for s in self._buffer_shapes[:3]]}, "
                f"model {[tuple(s) for s in shapes[:3]]}). Pass the same (online) network to {what} that was "
                "passed to EMA(...).",
                name="model",
                expected=[tuple(s) for s in self._buffer_shapes],
                actual=[tuple(s) for s in shapes],
            )

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average towards ``model``'s current weights: ``e <- d e + (1 - d) p`` for each parameter.

        The online weights are converted to the average's dtype and device (a float32 average of bf16 weights,
        an average kept on the CPU). Only shapes are checked here (no value is read, so no device
        synchronisation): a NaN in the model reaches the average.

        Args:
            model: The online model the EMA was built from, wrapped or not (DDP, FSDP2 shards, compile): the
                same architecture, parameter for parameter.

        Returns:
            The decay ``d`` this update used (:meth:`decay_at` of the new update count).

        Raises:
            DTypeError: ``model`` is not an ``nn.Module``.
            OptionError: ``model`` has another number of parameters than the EMA copy.
            ShapeError: a parameter or buffer of ``model`` has another shape than the EMA's (another
                architecture). The count is not advanced when the update is refused.
        """
        check_module(model, "model")
        source = unwrap_model(model)
        params = list(source.parameters())
        self._check_same_architecture(source, params, "update")
        # A second walk of the module tree only where the EMA holds buffers (a UNet has none).
        buffers = list(source.buffers()) if self._buffer_shapes else []
        self._check_same_buffers(buffers, "update")
        if self._count is None:
            self._count = int(self.num_updates)
        self._count += 1
        self.num_updates += 1
        d = self.decay_at(self._count)
        ema_params, ema_buffers = self._own_tensors()
        params = [p for p, averaged in zip(params, self._averaged) if averaged]
        shards = [_is_shard(p, e) for e, p in zip(ema_params, params)]
        if any(shards):
            for e, p, shard in zip(ema_params, params, shards):  # one gathered tensor at a time
                value: Any = p.detach()  # a DTensor where it is a shard
                e.lerp_((value.full_tensor() if shard else value).to(device=e.device, dtype=e.dtype), 1.0 - d)
        elif ema_params:
            torch._foreach_lerp_(
                ema_params,
                [p.detach().to(device=e.device, dtype=e.dtype) for e, p in zip(ema_params, params)],
                1.0 - d,
            )
        for e_buf, buf in zip(ema_buffers, buffers):
            if self.include_buffers and e_buf.is_floating_point():
                e_buf.lerp_(buf.to(device=e_buf.device, dtype=e_buf.dtype), 1.0 - d)
            else:
                e_buf.copy_(buf)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (e.g. before evaluation or saving), in place.

        Parameters and buffers are copied into ``model``'s tensors (their dtype and device are kept). With
        ``trainable_only`` the shared (frozen) weights are ``model``'s own and stay as they are.

        Args:
            model: The model to overwrite, of the architecture the EMA was built from (wrappers unwrapped).

        Raises:
            DTypeError: ``model`` is not an ``nn.Module``.
            OptionError: ``model`` has another number of parameters than the EMA copy.
            ShapeError: a parameter or buffer of ``model`` has another shape (another architecture).
        """
        check_module(model, "model")
        source = unwrap_model(model)
        self._check_same_architecture(source, list(source.parameters()), "copy_to")
        self._check_same_buffers(list(source.buffers()), "copy_to")
        source.load_state_dict(self.module.state_dict())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged copy: ``ema(x, t, ...)`` is ``ema.module(x, t, ...)``.

        Args:
            *args: Positional inputs of the model.
            **kwargs: Keyword inputs of the model.

        Returns:
            What the averaged copy returns (the inputs must suit it, as they would the online model: same
            dtype as its parameters unless under autocast).
        """
        return self.module(*args, **kwargs)
