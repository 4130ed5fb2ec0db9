"""DDP on CPU (2 processes, gloo, spawn): same logits and updated weights as one process on the same data."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import torch

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
    for a, b in zip(ddp_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "state.pt")
    ref_state = single.state_dict()
    init_state = w.build_discriminator().state_dict()
    assert state.keys() == ref_state.keys()
    for k in state:
        # the two runs made the same update up to float32 summation order
        update = (ref_state[k] - init_state[k]).norm()
        assert (state[k] - ref_state[k]).norm() <= 1e-3 * update + 1e-6, k
    assert not torch.equal(ref_logits[0], ref_logits[1])  # the step changed the discriminator
