"""Multi-process test runs forked from a server that has already imported torch, diffusers and the rest.

The example scripts are tested on 2 CPU processes (gloo) under DDP, FSDP2 and DeepSpeed. Started by
``accelerate launch`` or ``torchrun``, every process of every launch imports torch, diffusers, transformers, peft,
accelerate and DeepSpeed first: about 8 s of CPU per process, plus the launcher's own, so most of a small run.
Here the processes are forked from Python's ``forkserver``, which imported them once (:mod:`tests.launch_preload`),
and are given the environment that ``accelerate launch --multi_gpu`` / ``torchrun`` give theirs: ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT`` of a ``TCPStore`` that this process hosts (as torchrun's agent
does, ``TORCHELASTIC_USE_AGENT_STORE``), and accelerate's ``ACCELERATE_*`` settings. The script then runs as
``__main__``, as under those launchers; with ``sharded=True`` accelerate's state is first switched to FSDP or
DeepSpeed by :mod:`tests.examples.sharded_cpu_launch`, as the torchrun runs do.

``tests/test_preloaded_launch.py`` checks that a run launched here writes bit for bit what the same run writes
under ``accelerate launch`` and under ``torchrun``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What ``accelerate launch --multi_gpu --mixed_precision no --dynamo_backend no`` adds (accelerate 1.x,
# ``prepare_multi_gpu_env``) and torchrun's per-process variables besides the ranks and the store.
ACCELERATE_LAUNCH_ENV = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
}
TORCHRUN_ENV = {
    "GROUP_RANK": "0",
    "GROUP_WORLD_SIZE": "1",
    "ROLE_NAME": "default",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
# Set while the server starts, so that the libraries it imports see them: one OpenMP thread (as the launched
# processes get), DeepSpeed on its CPU accelerator (what the ZeRO runs select).
SERVER_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def context() -> Any:
    """The ``forkserver`` multiprocessing context, its server started with :mod:`tests.launch_preload` loaded.

    ``torch.multiprocessing.start_processes(..., start_method="forkserver")`` forks from the same server once this
    has run. A forked process gets the server's environment: pass what it needs as arguments."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.launch_preload"])
    from multiprocessing import forkserver

    saved = {k: os.environ.get(k) for k in (*SERVER_ENV, "PYTHONPATH")}
    # The server imports the preload with the interpreter's default sys.path (Python 3.11 passes it but does not
    # apply it): put the repository's parent folder ("tests." is a namespace package there) on PYTHONPATH.
    paths = [str(ROOT), *filter(None, (saved["PYTHONPATH"] or "").split(os.pathsep))]
    os.environ.update(SERVER_ENV, PYTHONPATH=os.pathsep.join(paths))
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return ctx


def launch_script(
    script: str | os.PathLike[str],
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    nprocs: int = 2,
    sharded: bool = False,
    timeout: float = 300.0,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[int, str]:
    """Run ``script`` with ``argv`` on ``nprocs`` forked processes, each with ``env`` plus its launcher variables,
    in the folder ``cwd`` (default: this process's current folder, as a subprocess would be).

    The launcher variables are torchrun's, and with ``sharded=False`` also those ``accelerate launch --multi_gpu``
    adds (:data:`ACCELERATE_LAUNCH_ENV`); ``sharded=True`` is ``torchrun sharded_cpu_launch.py``. Not given:
    ``TORCHELASTIC_ERROR_FILE`` (where torchrun's ``@record`` writes a failed process's error) -- the output
    holds the traceback instead. ``sys.path`` is this process's with the script's folder first (as ``python
    script.py`` puts it; with ``sharded=True`` the launcher's, ``tests/examples``, as under torchrun). As in a fresh
    process, torch's, NumPy's and Python's global generators start from fresh entropy (not the server's states,
    which every fork would share); atexit handlers run at the end (after the process group is destroyed), the interpreter's teardown
    does not (``sharded_cpu_launch.leave``).

    Returns the exit code of the first process that failed (0 when all succeeded; -9 when the only failure is a
    process killed here) and the processes' output (stdout and stderr, rank by rank). Once a process has failed,
    the others get 5 s to finish before they are killed (they may wait for it forever); a run still going after
    ``timeout`` seconds is killed."""
    import torch.distributed as dist

    ctx = context()
    store = dist.TCPStore("127.0.0.1", 0, nprocs, True, timedelta(seconds=timeout), wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="preloaded_launch_") as logs:
        procs = []
        for rank in range(nprocs):
            rank_env = {
                **env,
                **({} if sharded else ACCELERATE_LAUNCH_ENV),
                **TORCHRUN_ENV,
                # accelerate launch gives the address it was given; torchrun --standalone its own host name
                "MASTER_ADDR": "localhost" if sharded else "127.0.0.1",
                "TORCHELASTIC_RUN_ID": str(uuid.uuid4()) if sharded else "none",
                "MASTER_PORT": str(store.port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "ROLE_RANK": str(rank),
                "WORLD_SIZE": str(nprocs),
                "LOCAL_WORLD_SIZE": str(nprocs),
                "ROLE_WORLD_SIZE": str(nprocs),
            }
            rank_env.setdefault("OMP_NUM_THREADS", "1")
            log = os.path.join(logs, f"rank{rank}.log")
            Path(log).touch()  # read back even when the process dies before it opens it
            run = (str(script), list(argv), rank_env, str(cwd or os.getcwd()), log, sharded)
            procs.append(ctx.Process(target=_run_rank, args=run))
        for p in procs:
            p.start()
        codes, first_failure = _join(procs, timeout)
        output = "".join(
            f"--- rank {rank} (exit {code}) ---\n" + Path(logs, f"rank{rank}.log").read_text(errors="replace")
            for rank, code in enumerate(codes)
        )
    del store
    return first_failure, output


def _join(procs: Sequence[Any], timeout: float, grace: float = 5.0) -> tuple[list[int], int]:
    """Wait for every process; once one has failed, give the rest ``grace`` seconds, then kill them. Returns the
    exit codes and the first failure's code (0: none; -9: only processes killed here)."""
    import time

    deadline = time.monotonic() + timeout
    first_failure = 0
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.05)
    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
    first_failure = first_failure or (failed[0] if failed else 0)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
            first_failure = first_failure or int(p.exitcode)
    return [int(p.exitcode) for p in procs], int(first_failure)


def _run_rank(script: str, argv: list[str], env: dict[str, str], cwd: str, log: str, sharded: bool) -> None:
    """One process: output to ``log``, the launcher's environment and folder, the script as ``__main__``; exit
    without the interpreter's teardown (``sharded_cpu_launch.leave``)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # the folder of the file Python runs comes first: the script's, or under torchrun sharded_cpu_launch.py's
    launcher_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
    sys.path.insert(0, launcher_folder if sharded else os.path.dirname(os.path.abspath(script)))
    from tests.examples import sharded_cpu_launch  # preloaded by the server

    code = 1
    try:
        import random

        import numpy as np
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        # a fresh process's global generators: seeded from fresh entropy (torch's default one too, in this torch),
        # where a fork would share the server's states
        torch.seed()
        np.random.seed()  # noqa: NPY002 - the legacy global state is what a script's np.random.* calls use
        random.seed()
        if sharded:
            sharded_cpu_launch.switch_to_sharded_state()
        sys.argv = [script, *argv]
        sharded_cpu_launch.run_script(script)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sharded_cpu_launch.leave(code)


def start_workers(fn: Callable[..., Any], args: tuple[Any, ...], nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with the processes forked from the preloaded server."""
    import torch.multiprocessing as mp

    context()
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
