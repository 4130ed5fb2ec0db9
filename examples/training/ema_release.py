"""The exponential moving average a run releases, registered for checkpointing under every engine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from diffdistill.students import reshard


class TrainableParams(nn.Module):
    """The trainable parameters of ``model`` gathered in one module, without copies (shared tensors).

    Keys are the parameter names with ``/`` for ``.`` (``params.down_blocks/1/...``). An :class:`EMA` of
    this module averages exactly what the optimiser updates: the LoRA of a LoRA student, not its frozen base.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        named = [(n.replace(".", "/"), p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = nn.ParameterDict(dict(named))


class ReleaseEMA:
    """``--use_ema``: an EMA of the student's trainable parameters that becomes the released weights.

    The average is kept in float32 (it is written back in the student's dtype). ``warmup="linear"``
    (``--ema_warmup``, the default) caps the decay of update ``n`` at
    ``(1 + k) / (10 + k)``, ``k = n - 1``, as diffusers' ``EMAModel`` does (update 1 copies the weights), so the average of a
    short run is not mostly its start weights; the update count is checkpointed with the average.
    """

    def __init__(self, student: nn.Module, decay: float, warmup: str = "linear") -> None:
        from diffdistill.students import EMA

        self.student = student
        self.params = TrainableParams(student)
        # The average stays float32 also where the trained weights are bf16 / fp16 (DeepSpeed's mixed
        # precision): a bf16 average moved by (1 - 0.9999) x a 1 % gap rounds to no change.
        self.ema = EMA(self.params, decay=decay, warmup=warmup).float()

    def update(self) -> None:
        self.ema.update(self.params)

    def restart(self) -> None:
        """Start the average over from the student's current weights: copy them into the average and set its
        update count to 0, so the decay schedule (``--ema_warmup``) starts again too.

        For a run whose next phase trains another model from these weights (Hyper-SD's one-step stage after
        its multi-step TSCD stages): an average that carries the earlier phase's weights is neither model.
        Goes through ``load_state_dict``: cast to the float32 average, the count re-read from it, and an FSDP2
        student's shards copied into the average's shards (the average is a copy of the sharded parameters)."""
        state = {f"module.{name}": value for name, value in self.params.state_dict().items()}
        state["num_updates"] = torch.zeros_like(self.ema.num_updates)
        self.ema.load_state_dict(state)

    def copy_to_model(self) -> None:
        """Write the averaged weights into the student's parameters (in place).

        An FSDP2 student is resharded first, so its next forward gathers the written shards."""
        reshard(self.student)
        self.ema.copy_to(self.params)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the student's parameters for the ``with`` body (e.g. validation samples),
        then the online weights back, bit for bit (the optimiser and the average see no change)."""
        online = [p.detach().clone() for p in self.params.parameters()]
        self.copy_to_model()
        try:
            yield
        finally:
            reshard(self.student)  # an FSDP2 root stays unsharded (averaged weights) after a no-grad forward
            with torch.no_grad():
                for p, saved in zip(self.params.parameters(), online):
                    p.copy_(saved)


class _StateSubset:
    """``state_dict`` / ``load_state_dict`` of a module without some entries (for accelerate checkpoints).

    Entries that are shards (``DTensor``, e.g. the EMA of an FSDP2 student) are saved as full tensors
    (gathered on every process: accelerate calls ``state_dict`` on all of them and writes on the main one)
    and loaded back into each process's shard, so the file is the same as without sharding.
    """

    def __init__(self, module: nn.Module, skip: set[str]) -> None:
        self.module, self.skip = module, skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in self.module.state_dict().items() if k not in self.skip}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        current = self.module.state_dict()
        state = {
            k: distribute_tensor(v.to(current[k].device), current[k].device_mesh, current[k].placements)
            if isinstance(current.get(k), DTensor)
            else v
            for k, v in state.items()
        }
        result = self.module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in self.skip]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Expected the checkpoint to hold the EMA entries {sorted(set(self.module.state_dict()) - self.skip)[:3]}..., "
                f"but {len(missing)} are missing (e.g. {missing[:2]}) and {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:2]}): resume with the options the checkpoint was written with."
            )


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard on the CPU (a collective: every process calls it; one
    gathered tensor on the device at a time), else ``value``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return value
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def register_ema(accelerator: Any, ema: nn.Module, online: nn.Module) -> None:
    """Checkpoint an :class:`EMA` of ``online`` without the copies of ``online``'s frozen parameters.

    The frozen base of a LoRA student never changes, so its average is the base itself: the checkpoint
    keeps the averaged trainable parameters, the buffers and the update count (register before
    :func:`resume`).
    """
    frozen = {
        f"module.{n}" for n, p in accelerator.unwrap_model(online).named_parameters() if not p.requires_grad
    }
    accelerator.register_for_checkpointing(_StateSubset(ema, frozen))
