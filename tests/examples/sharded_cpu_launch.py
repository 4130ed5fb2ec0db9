"""Run a script with accelerate's FSDP or DeepSpeed on CPU processes (gloo) -- for the tests only.

accelerate selects FSDP and DeepSpeed only for GPU-like devices: with ``ACCELERATE_USE_CPU=true`` under
``torchrun`` it sets up a multi-CPU (gloo) run and ignores ``ACCELERATE_USE_FSDP`` /
``ACCELERATE_USE_DEEPSPEED``. This launcher switches the shared ``AcceleratorState`` to FSDP or DeepSpeed
with the plugin accelerate built from the environment (``FSDP_*`` / ``ACCELERATE_DEEPSPEED_*``), given the
mixed-precision setting as accelerate does for GPUs, then runs the script as ``__main__``. Everything
after that is accelerate's, torch's and DeepSpeed's own code: ``prepare`` (``fully_shard`` or
``deepspeed.initialize``; DeepSpeed runs on its CPU accelerator, ``DS_ACCELERATOR=cpu``, over gloo),
sharded checkpoints and ``get_state_dict``.

Usage: ``ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 torchrun --nproc_per_node 2
sharded_cpu_launch.py SCRIPT.py [ARGS...]``, or with ``ACCELERATE_USE_DEEPSPEED=true
ACCELERATE_DEEPSPEED_ZERO_STAGE=3 DS_ACCELERATOR=cpu`` instead of the FSDP variables.

With ``DYNAMO_STATS_DIR`` set (``--compile`` runs), dynamo fails on reaching a recompile limit instead of falling
back to eager (``fail_on_recompile_limit_hit``), and each process writes dynamo's counters (graphs, graph breaks,
recompiles) to ``rank<R>.json`` in that folder once the script is done.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any

import accelerate.state
from accelerate.utils import DistributedType

DYNAMO_STATS_DIR = "DYNAMO_STATS_DIR"  # environment variable: where each process writes dynamo's counters
_plugins: dict[str, Any] = {}
_init = accelerate.state.AcceleratorState.__init__


def _sharded_on_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    for kind in ("fsdp_plugin", "deepspeed_plugin"):
        if kwargs.get(kind) is not None:
            _plugins[kind] = kwargs[kind]
    # The state is shared (re-initialised by later AcceleratorState() calls): switch it every time.
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if "fsdp_plugin" in _plugins:
        if self._mixed_precision != "no":
            _plugins["fsdp_plugin"].set_mixed_precision(self._mixed_precision)  # as accelerate does on GPUs
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugins["fsdp_plugin"]
    elif "deepspeed_plugin" in _plugins:
        plugin = _plugins["deepspeed_plugin"]
        plugin.set_mixed_precision(self._mixed_precision)  # as accelerate does on GPUs
        plugin.select(_from_accelerator_state=True)
        self.distributed_type = DistributedType.DEEPSPEED
        self.deepspeed_plugins = plugin


def switch_to_sharded_state() -> None:
    """From now on, every ``AcceleratorState`` built on a multi-CPU run is switched to FSDP or DeepSpeed."""
    accelerate.state.AcceleratorState.__init__ = _sharded_on_cpu  # type: ignore[method-assign]


def run_script(path: str) -> None:
    """Run ``path`` as ``__main__`` (``sys.argv`` already set), with the dynamo counters of ``DYNAMO_STATS_DIR``."""
    stats = os.environ.get(DYNAMO_STATS_DIR)
    if stats:
        import torch._dynamo

        torch._dynamo.config.fail_on_recompile_limit_hit = True  # a block falling back to eager fails the run
    runpy.run_path(path, run_name="__main__")
    if stats:
        from torch._dynamo.utils import counters

        with open(os.path.join(stats, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump({k: dict(v) for k, v in counters.items()}, f, default=str)


def leave(code: int = 0) -> None:
    """Exit without the interpreter's teardown: the process group destroyed first, then the atexit handlers run
    (as at a normal exit: a handler that fails or hangs shows here too).

    C++ threads of the process group (gloo, DeepSpeed's CPU engine) destroyed while still joinable at static
    destruction abort the process now and then ("terminate called without an active exception", SIGABRT after
    a finished run: seen once in a full suite, 2026-12-06), which fails a run that did everything right."""
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    switch_to_sharded_state()
    sys.argv = sys.argv[1:]
    run_script(sys.argv[0])
    leave(0)
