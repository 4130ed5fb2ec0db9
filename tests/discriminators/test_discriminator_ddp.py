"""DDP on CPU (2 processes, gloo, spawn): same logits and updated weights as one process on the same data."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import torch

from tests.state_compare import assert_same_update

HERE = str(Path(__file__).resolve().parent)


def _worker_module():  # type: ignore[no-untyped-def]
    """Import the worker by its top-level name, so spawned children (which inherit sys.path) find it."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module("ddp_training_worker")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_matches_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    w = _worker_module()
    mp.spawn(w.run_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = w.build_discriminator()
    ref_logits = w.train_steps(single, slice(0, w.GLOBAL_BATCH))
    ddp_logits = [torch.cat(z) for z in zip(*(torch.load(tmp_path / f"logits{r}.pt") for r in range(2)))]
    # Logits of the same samples, relative to their size: at step 1 the weights are equal and only the batch
    # split changes the kernels' blocking (float32 rounding through ~30 ops: ~1e-6 relative); at step 2 the
    # weights differ by rounding of one SGD step (<= 1e-2 of the step, below). A rank whose gradient was not
    # averaged would move its step-2 logits by the whole step's effect on them.
    for step, (a, b) in enumerate(zip(ddp_logits, ref_logits)):
        ratio = float((a - b).norm() / b.norm())
        assert ratio <= 1e-4, f"step {step}: DDP's logits differ by {ratio:.3g} of their size"
    state = torch.load(tmp_path / "state.pt")
    # the two runs made the same update up to float32 summation order (tests/state_compare.py)
    assert_same_update(
        state, single.state_dict(), w.build_discriminator().state_dict(), what="DDP vs 1 process"
    )
    assert not torch.equal(ref_logits[0], ref_logits[1])  # the step changed the discriminator
