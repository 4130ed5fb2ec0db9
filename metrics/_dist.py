"""torch.distributed plumbing shared by the metric accumulators, and their running mean (private).

Each metric keeps its state on one device; :func:`all_reduce_sum` sums a float64 tensor over the processes of a
group when one is initialised (and returns it unchanged otherwise), moving it to the device the backend needs
(CUDA for NCCL, CPU for gloo) and back. :class:`RunningMean` is the float64 sum and count of per-item scores that
the prompt-image metrics and the frame consistency accumulate.
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


class RunningMean:
    """A float64 sum of per-item scores and their count: ``compute`` / ``reset`` / ``all_reduce`` / ``count`` for
    the metrics that average a score over items (subclasses add scores with :meth:`_add` in their ``update``;
    ``_update_args`` names that ``update``'s arguments for the error message)."""

    _update_args = "..."

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def _add(self, scores: torch.Tensor) -> None:
        self._sum += float(scores.double().sum())
        self._count += int(scores.numel())

    @property
    def count(self) -> int:
        """The number of items accumulated."""
        return self._count

    def compute(self) -> float:
        """The mean score over every item accumulated (on this process, or on all after :meth:`all_reduce`).

        Returns:
            The mean, as a Python float.

        Raises:
            OptionError: Nothing was accumulated.
        """
        if self._count == 0:
            from ..errors import OptionError

            raise OptionError(f"{type(self).__name__}.compute() before any update({self._update_args}).")
        return self._sum / self._count

    def reset(self) -> None:
        """Forget the accumulated scores."""
        self._sum, self._count = 0.0, 0

    def all_reduce(self, group: Any = None) -> None:
        """Sum the accumulated scores and counts over processes (in place; a no-op without a process group).

        Call it on every process, once, after the last ``update``.

        Args:
            group: The process group (``None``: the default group).
        """
        total = all_reduce_sum(torch.tensor([self._sum, float(self._count)], dtype=torch.float64), group)
        self._sum, self._count = float(total[0]), round(float(total[1]))
