"""A tiny accelerate training run that records what its process sees: run by ``tests/test_preloaded_launch.py``
under ``accelerate launch``, ``torchrun`` and :func:`tests.preloaded_launch.launch_script`.

Usage: ``launch_probe.py OUT_DIR [--fail_on_rank R] [--hang_on_rank R] [--atexit_file DIR]``. Each rank writes
``rank<R>.json`` (the launcher's environment variables, accelerate's view of the run, the global generators' first
draws, threads, argv, ``sys.path[0]``, ``__file__``, folder, whether diffusers' UNet module was already imported);
rank 0 writes ``state.pt``, the model after 2 AdamW steps on per-rank data (gathered under FSDP2). With
``--atexit_file DIR`` each rank registers an atexit handler that writes ``DIR/atexit<R>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PRELOADED = "diffusers.models.unets.unet_2d_condition" in sys.modules  # before this script imports anything

import atexit  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

# The global generators as the process starts (before any seeding): a fresh process seeds torch's, NumPy's and
# Python's from fresh entropy, so they differ between processes.
START_RNG = {
    "torch": torch.rand(2).tolist(),
    "numpy": np.random.random_sample(2).tolist(),  # noqa: NPY002 - the legacy global state is the one checked
    "python": [random.random() for _ in range(2)],
}

ENV_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "FSDP_", "TORCH_NCCL_", "GROUP_", "ROLE_", "LOCAL_")
ENV_NAMES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DS_ACCELERATOR")


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    data = torch.Generator().manual_seed(1 + accelerator.process_index)
    for _ in range(2):
        loss = model(torch.randn(3, 4, generator=data)).square().mean()
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    if "--fail_on_rank" in sys.argv and accelerator.process_index == int(
        sys.argv[sys.argv.index("--fail_on_rank") + 1]
    ):
        raise RuntimeError(f"probe failure on rank {accelerator.process_index}")
    if "--hang_on_rank" in sys.argv and accelerator.process_index == int(
        sys.argv[sys.argv.index("--hang_on_rank") + 1]
    ):
        import time

        time.sleep(3600)  # never reaches the barrier below
    state = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}
    if "--atexit_file" in sys.argv:  # a handler that writes a file at exit: it must run
        path = Path(sys.argv[sys.argv.index("--atexit_file") + 1]) / f"atexit{accelerator.process_index}"
        atexit.register(path.write_text, "ran")
    record = {
        "env": env,
        "start_rng": START_RNG,
        "sys_path0": sys.path[0],
        "file": os.path.realpath(__file__),
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "mixed_precision": accelerator.mixed_precision,
        "backend": torch.distributed.get_backend(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "name": __name__,
        "preloaded": PRELOADED,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, out / "state.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main()
