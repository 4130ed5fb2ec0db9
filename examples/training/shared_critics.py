"""``--shared_base``: one frozen UNet whose LoRA adapters are the generator, the fake score and the discriminator."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import runtime, sdxl_models

#: The adapters' names on the shared base (and the checkpoint files: ``checkpoint-N/{prepared name}_lora``).
GENERATOR, FAKE, DISCRIMINATOR = "generator", "fake", "discriminator"

SHARED_BASE_HELP = (
    "with --use_lora: keep ONE frozen copy of the UNet (in the mixed-precision dtype) holding every trained "
    "network as its own LoRA adapter (the generator's; the fake score's or the discriminator's), the teacher / "
    "real score being that UNet with the adapters off (diffdistill.students.SharedBase): one copy of the base "
    "weights instead of two or three. Gradient checkpointing recomputes each block under the adapter it ran "
    "with. sdxl_sim.py: DDP, FSDP2 (the base sharded once) or one process; sdxl_diffusion2gan.py: DDP or one "
    "process; DeepSpeed is refused"
)


def add_shared_base_arg(group: Any) -> None:
    """The ``--shared_base`` flag."""
    group.add_argument("--shared_base", action="store_true", help=SHARED_BASE_HELP)


def check_shared_base_args(args: argparse.Namespace) -> None:
    """Refuse ``--shared_base`` without ``--use_lora`` (``ValueError`` with the fix)."""
    if args.shared_base and not args.use_lora:
        raise ValueError(
            "--shared_base shares one frozen UNet between LoRA adapters, but the networks are full UNets "
            "without --use_lora (each needs its own trainable weights): add --use_lora, or drop --shared_base."
        )


def check_engine(accelerator: Any, *, fsdp: bool = False) -> None:
    """Refuse DeepSpeed (and FSDP unless ``fsdp``) with ``--shared_base`` (``ValueError`` naming the reason).

    DeepSpeed wraps each prepared model in its own engine, and the shared base is no prepared model: the
    engines would run adapter layers outside their own forward. Under FSDP2 the base is sharded once by
    :meth:`~diffdistill.students.SharedBase.fully_shard` (:func:`shard`) and each view shards its adapter;
    ``fsdp=False`` for a script whose FSDP2 run is not tested.
    """
    kind = runtime.distributed_kind(accelerator)
    if kind == "DEEPSPEED" or (kind == "FSDP" and not fsdp):
        engines = "DDP, FSDP2 or one process" if fsdp else "DDP or one process"
        why = (
            "DeepSpeed wraps each prepared model in its own engine, while the shared base is no prepared model "
            "and its adapters run inside each other's networks"
            if kind == "DEEPSPEED"
            else "this script's shared base (a network running another one's adapter layers) is not tested "
            "under FSDP2"
        )
        raise ValueError(
            f"--shared_base runs under {engines}: {why}. Launch with {engines.replace(' or one process', '')} "
            "or on one process, or drop --shared_base."
        )


def shard(accelerator: Any, base: Any) -> None:
    """Under FSDP2, shard the frozen base once (:meth:`~diffdistill.students.SharedBase.fully_shard`), before the
    views are prepared (each then shards its own adapter); a no-op under DDP or on one process."""
    if runtime.distributed_kind(accelerator) == "FSDP":
        base.fully_shard()


def build(
    args: argparse.Namespace,
    unet: nn.Module,
    device: Any,
    dtype: torch.dtype,
    adapters: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
) -> Any:
    """The :class:`diffdistill.students.SharedBase` of ``unet`` with a LoRA adapter per name of ``adapters``.

    The base is frozen in ``dtype`` on ``device`` (as a LoRA student's base, ``sdxl_models.make_trainable``);
    each adapter has ``--lora_rank`` / ``--lora_alpha`` on ``targets`` (default: the UNet's default targets; a
    flow transformer: ``training.flow_families.FLOW_LORA_TARGETS``) and is kept in float32. The
    adapters are added in the order given, so with ``(GENERATOR, FAKE)`` they start from the same random
    draws as the generator's and the fake score's LoRAs of two separate copies. ``--gradient_checkpointing``
    goes through :meth:`SharedBase.enable_gradient_checkpointing` (the recomputation runs under the adapter
    of the forward pass).
    """
    from diffdistill.students import SharedBase, add_lora

    unet.requires_grad_(False)
    sdxl_models.to_frozen_dtype(unet, device, dtype)
    where = {} if targets is None else {"targets": list(targets)}
    with warnings.catch_warnings():  # peft warns at every adapter after the first: several are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in adapters:
            add_lora(unet, rank=args.lora_rank, alpha=args.lora_alpha, adapter_name=name, **where)
    sdxl_models.upcast_trainable(unet)
    base = SharedBase(unet)
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    return base


class ActiveAdapter(nn.Module):
    """``module`` (which runs the shared base's sub-modules, e.g. a discriminator with ``backbone="shared"``)
    called with ``adapter`` of ``base`` active.

    With ``owns_adapter`` the adapter's view is a registered sub-module, so this module's parameters are
    ``module``'s and the adapter's: one optimiser, one DDP wrapper and one checkpoint entry train and hold
    both (Diffusion2GAN's discriminator adapter). Without it the adapter belongs to another prepared view
    (DMD2's classifier head on the fake score's adapter, which the fake score's optimiser steps).
    """

    def __init__(self, module: nn.Module, base: Any, adapter: str, *, owns_adapter: bool) -> None:
        super().__init__()
        self.module = module
        self.adapter = base.view(adapter) if owns_adapter else None
        self._base, self._name = base, adapter  # the base is not a sub-module: it is no one's parameters

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._base.active(self._name):
            return self.module(*args, **kwargs)
