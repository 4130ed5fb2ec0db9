"""torch.distributed plumbing shared by the metric accumulators (private).

Each metric keeps its state on one device; :func:`all_reduce_sum` sums a float64 tensor over the processes of a
group when one is initialised (and returns it unchanged otherwise), moving it to the device the backend needs
(CUDA for NCCL, CPU for gloo) and back.
"""

from __future__ import annotations

from typing import Any

import torch


def is_distributed(group: Any = None) -> bool:
    """Whether a ``torch.distributed`` process group is initialised (so that collectives are needed).

    Args:
        group: The process group (unused: the default group decides).

    Returns:
        Whether collectives are needed.
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _backend_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``tensor`` over the processes of ``group`` (a new tensor on ``tensor``'s device).

    Without an initialised process group this returns ``tensor`` itself.

    Args:
        tensor: This process's summand.
        group: The process group (``None``: the default group).

    Returns:
        The sum over processes.
    """
    if not is_distributed(group):
        return tensor
    import torch.distributed as dist

    work = tensor.detach().to(_backend_device(group), copy=True).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(tensor.device)
