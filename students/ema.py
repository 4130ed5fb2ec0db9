"""Exponential moving average of a model's weights, as a module that can serve as a consistency target.

.. math:: \\theta^- \\leftarrow d_k\\,\\theta^- + (1 - d_k)\\,\\theta

with the decay :math:`d_k` of update ``k`` optionally warmed up. Used as the EMA target of LCM (decay
0.95), Hyper-SD's TSCD (Alg. 1, line 16) and for evaluation weights.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from .._checks import OptionError, check_option
from .._modules import unwrap_model

__all__ = ["EMA"]


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
        model: the online model (DDP / compile wrappers are unwrapped).
        decay: the target decay ``d``.
        warmup: ``"none"`` (constant ``d`` after ``update_after_step`` copying updates), ``"linear"`` (``min(d, (1 + k) / (10 + k))``, diffusers' default
            ``EMAModel``) or ``"power"`` (``min(d, 1 - (1 + k / inv_gamma) ** -power)``, diffusers'
            ``use_ema_warmup=True``), where ``k = updates - update_after_step - 1``; the decay is 0 (a copy)
            while ``k <= 0`` in the warm-up modes.
        update_after_step, inv_gamma, power, min_decay: as in diffusers' ``EMAModel``.
        include_buffers: also average floating buffers (e.g. BatchNorm statistics); other buffers are copied.
        trainable_only: average only the parameters that require gradients in ``model`` when the EMA is
            built; the others are *shared* with ``model`` (the same ``Parameter`` objects: no copy, never
            updated, and :meth:`update` does not read them). For a LoRA student the EMA then costs the
            adapters only: on SDXL a whole copy is ~2.6e9 more weights to hold and to read every update
            (under FSDP2, to all-gather). The shared weights are not the EMA's state: ``state_dict()``
            leaves them out and ``load_state_dict`` never writes them. They must stay frozen and stay where
            the model has them: writing into them in place (merging adapters, ``ema.to(...)``) changes the
            model too. A model sharded *after* the EMA is built (FSDP2 replaces its parameters) keeps
            its whole frozen weights alive in the EMA, as a whole copy would.

    The update count lives in a buffer, so ``load_state_dict`` restores the decay schedule too. The
    averaged copy is in eval mode with ``requires_grad=False``.

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
        if not isinstance(model, nn.Module):
            raise OptionError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
        if not 0.0 <= min_decay <= decay <= 1.0:
            raise OptionError(
                f"Expected 0 <= `min_decay` <= `decay` <= 1, but got min_decay={min_decay!r}, decay={decay!r}."
            )
        check_option(warmup, "warmup", ("none", "linear", "power"))
        self.decay = float(decay)
        self.warmup = warmup
        self.update_after_step = int(update_after_step)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = float(min_decay)
        self.include_buffers = include_buffers
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
        # The copy's averaged parameters and its buffers, listed once (walking a UNet's module tree takes
        # tens of milliseconds); dropped by _apply, which may replace buffers (.to(), .float(), ...).
        self._own: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
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

    def _apply(self, fn: Any, recurse: bool = True) -> EMA:
        self._own = None
        return super()._apply(fn, recurse)

    def _own_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        own = self._own
        if own is None:
            params: list[torch.Tensor] = [
                e for e, averaged in zip(self.module.parameters(), self._averaged) if averaged
            ]
            own = self._own = (params, list(self.module.buffers()))
        return own

    def train(self, mode: bool = True) -> EMA:
        """The averaged copy always stays in eval mode."""
        super().train(mode)
        self.module.eval()
        return self

    def decay_at(self, num_updates: int) -> float:
        """Decay used by update number ``num_updates`` (1-based).

        Example:
            >>> ema = EMA(torch.nn.Linear(1, 1), decay=0.999, warmup="linear")
            >>> [round(ema.decay_at(k), 4) for k in (1, 2, 11, 10_000)]
            [0.0, 0.1818, 0.55, 0.999]
        """
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

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average towards ``model``'s current weights; returns the decay used."""
        source = unwrap_model(model)
        if self._count is None:
            self._count = int(self.num_updates)
        self._count += 1
        self.num_updates += 1
        d = self.decay_at(self._count)
        params = list(source.parameters())
        if len(self._averaged) != len(params):
            raise OptionError(
                f"`model` has {len(params)} parameters but the EMA copy has {len(self._averaged)}; update with "
                "the same architecture the EMA was built from."
            )
        ema_params, ema_buffers = self._own_tensors()
        params = [p for p, averaged in zip(params, self._averaged) if averaged]
        shards = [_is_shard(p, e) for e, p in zip(ema_params, params)]
        if any(shards):
            for e, p, shard in zip(ema_params, params, shards):  # one gathered tensor at a time
                value: Any = p.detach()  # a DTensor where it is a shard
                e.lerp_((value.full_tensor() if shard else value).to(e.dtype), 1.0 - d)
        elif ema_params:
            torch._foreach_lerp_(
                ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, params)], 1.0 - d
            )
        for e_buf, buf in zip(ema_buffers, source.buffers() if ema_buffers else ()):
            if self.include_buffers and e_buf.is_floating_point():
                e_buf.lerp_(buf.to(e_buf.dtype), 1.0 - d)
            else:
                e_buf.copy_(buf)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (e.g. before evaluation or saving)."""
        unwrap_model(model).load_state_dict(self.module.state_dict())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged copy."""
        return self.module(*args, **kwargs)
