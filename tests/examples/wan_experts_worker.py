"""DDP / FSDP2 worker for test_flow_wan22.py's two-expert test, importable by top-level name in spawned processes.

Each of 2 processes holds one sample of a global batch of 2 whose timesteps fall on either side of the experts'
boundary, so each process needs only one of :class:`training.wan_experts.WanExperts`' experts: the run must still
keep the processes in step (DDP's gradient reduction, FSDP2's gathers) and make the update of one process on the
whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Spawned children import this module by its top-level name (its folder on sys.path, as the test puts it) and may
# not have the repository root on sys.path (pytest-xdist workers): put it there for the tests package.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.examples.example_modules import load_example  # noqa: E402
from tests.transformer_configs import tiny_wan_transformer_config  # noqa: E402

wan_experts = load_example("training.wan_experts")

BOUNDARY = 875.0
TIMESTEPS = (950.0, 300.0)  # rank 0: the high-noise expert only; rank 1: the low-noise expert only


def build() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = tiny_wan_transformer_config()
    return wan_experts.WanExperts(WanTransformer3DModel(**config), WanTransformer3DModel(**config), BOUNDARY)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 8, 8, generator=gen)
    text = torch.randn(2, 5, 16, generator=gen)
    return x, torch.tensor(TIMESTEPS), text


def train_step(model: torch.nn.Module, rows: slice) -> None:
    """One SGD step on the mean squared output of rows ``rows`` of the global batch."""
    x, t, text = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(hidden_states=x[rows], timestep=t[rows], encoder_hidden_states=text[rows])[0]
    out.square().mean().backward()
    opt.step()


def run_worker(rank: int, world: int, port: int, out_dir: str, engine: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build()
        if engine == "ddp":
            wrapped: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for _, expert in model.experts():
                for block in expert.blocks:
                    fully_shard(block)
                fully_shard(expert)
            fully_shard(model)
            wrapped = model
        train_step(wrapped, slice(rank, rank + 1))
        if engine == "ddp":
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{engine}_state.pt"))
    finally:
        torch.distributed.destroy_process_group()
