"""Run a script with accelerate's FSDP on CPU processes (gloo) -- for the tests only.

accelerate selects FSDP only for GPU-like devices: with ``ACCELERATE_USE_CPU=true`` under ``torchrun`` it
sets up a multi-CPU (gloo) run and ignores ``ACCELERATE_USE_FSDP``. This launcher switches the shared
``AcceleratorState`` to FSDP with the plugin accelerate built from the ``FSDP_*`` environment (given the
mixed-precision policy, as accelerate does for GPUs), then runs
the script as ``__main__``; prepare, ``fully_shard``, sharded checkpoints and ``get_state_dict`` are
accelerate's and torch's own code paths.

Usage: ``ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 torchrun --nproc_per_node 2
fsdp_cpu_launch.py SCRIPT.py [ARGS...]``
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import accelerate.state
from accelerate.utils import DistributedType

_plugin: dict[str, Any] = {}
_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:
        _plugin["fsdp"] = kwargs["fsdp_plugin"]
    # The state is shared (re-initialised by later AcceleratorState() calls): switch it every time.
    if self.distributed_type == DistributedType.MULTI_CPU and "fsdp" in _plugin:
        if self.distributed_type != DistributedType.FSDP and self._mixed_precision != "no":
            _plugin["fsdp"].set_mixed_precision(self._mixed_precision)  # as accelerate does on GPUs
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin["fsdp"]


if __name__ == "__main__":
    accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu  # type: ignore[method-assign]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
