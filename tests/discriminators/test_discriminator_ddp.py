"""DDP on CPU (2 processes, gloo, forked from the preloaded server of tests/preloaded_launch.py): same logits and updated weights as one process on the same data."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import torch

from tests import preloaded_launch
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
    w = _worker_module()
    preloaded_launch.start_workers(w.run_worker, (2, _free_port(), str(tmp_path)), 2)
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


def _ladd_worker_module():  # type: ignore[no-untyped-def]
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module("ddp_ladd_worker")


def test_ladd_on_a_transformer_ddp_matches_single_process(tmp_path) -> None:
    """LADD's discriminator on a frozen FLUX transformer and a student trained through it, each in its own DDP
    module on 2 processes: the same logits and updates as one process on the whole batch."""
    w = _ladd_worker_module()
    preloaded_launch.start_workers(w.run_worker, (2, _free_port(), str(tmp_path)), 2)
    student, disc = w.build()
    start = {"student": dict(student.state_dict()), "disc": dict(disc.state_dict())}
    start = {k: {n: v.clone() for n, v in s.items()} for k, s in start.items()}
    ref_logits = w.train_steps(student, disc, slice(0, w.GLOBAL_BATCH))
    ddp_logits = [torch.cat(z) for z in zip(*(torch.load(tmp_path / f"ladd_logits{r}.pt") for r in range(2)))]
    # As the UNet test above: step 1 differs by the batch split's float32 rounding only, step 2 by one SGD step's
    # rounding; a gradient left unaveraged on a rank would move the step-2 logits by the whole update's effect.
    for step, (a, b) in enumerate(zip(ddp_logits, ref_logits)):
        ratio = float((a - b).norm() / b.norm())
        assert ratio <= 1e-4, f"step {step}: DDP's logits differ by {ratio:.3g} of their size"
    states = [torch.load(tmp_path / f"ladd_state{r}.pt") for r in range(2)]
    for name, model in (("student", student), ("disc", disc)):
        for key, value in states[1][name].items():
            torch.testing.assert_close(value, states[0][name][key], rtol=0, atol=0)  # ranks stay in sync
        assert_same_update(
            states[0][name], model.state_dict(), start[name], what=f"DDP vs 1 process ({name})"
        )
    # the shared teacher is not part of the discriminator's state, and the heads trained
    assert not any(k.startswith("extractor.") for k in disc.state_dict())
    assert not torch.equal(ref_logits[0], ref_logits[1])
