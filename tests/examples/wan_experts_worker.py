"""DDP / FSDP2 worker for test_flow_wan22.py's two-expert test, importable by top-level name in spawned processes.

Each of 2 processes holds one sample of a global batch of 2. In step 1 their timesteps fall on either side of the
experts' boundary, so each process needs only one of :class:`training.wan_experts.WanExperts`' experts: the run must
still keep the processes in step (DDP's gradient reduction, FSDP2's gathers). In step 2 both need the high-noise
expert only: the low-noise expert, unused everywhere, must not move (AdamW would take a momentum step on the zero
gradient of its weight-0 pass; :func:`training.wan_experts.drop_unused_grads` skips it). Both steps together must be
one process's two updates on the whole batch.

The adapter variant (``engine="ddp_adapters"``): two LoRA adapters on both experts, as a shared base's generator and
fake score. In step 2 the generator runs on the high-noise expert only, but the fake score, differentiated to its
input as SiD's generator loss does, runs on the low-noise one: the generator's adapter on the low-noise expert,
unused by it everywhere, must not move although its expert ran (usage is per adapter).
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
# step 1: rank 0 the high-noise expert only, rank 1 the low-noise one; step 2: both the high-noise one
TIMESTEPS = ((950.0, 300.0), (990.0, 900.0))


def build() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = tiny_wan_transformer_config()
    return wan_experts.WanExperts(WanTransformer3DModel(**config), WanTransformer3DModel(**config), BOUNDARY)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1 + step)
    x = torch.randn(2, 4, 2, 8, 8, generator=gen)
    text = torch.randn(2, 5, 16, generator=gen)
    return x, torch.tensor(TIMESTEPS[step]), text


def train_steps(model: torch.nn.Module, rows: slice, processes: int) -> None:
    """Two AdamW steps on the mean squared output of rows ``rows`` of each step's global batch, the unused experts'
    gradients dropped before each step as the scripts' ``runtime.clip_and_step`` does."""
    from types import SimpleNamespace

    accelerator = SimpleNamespace(num_processes=processes, device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(2):
        x, t, text = data(step)
        out = model(hidden_states=x[rows], timestep=t[rows], encoder_hidden_states=text[rows])[0]
        out.square().mean().backward()
        wan_experts.drop_unused_grads(accelerator, list(model.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)


def build_adapters() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The experts with a generator and a (frozen) fake-score LoRA adapter: ``(model, generator view, fake view)``."""
    from diffdistill.students import SharedBase

    model = build()
    torch.manual_seed(1)
    lora = {"rank": 2, "targets": ["to_q", "to_v"], "init_lora_weights": False}
    base = SharedBase(model, adapters={"gen": lora, "fake": lora})
    fake = base.view("fake").requires_grad_(False)
    return model, base.view("gen"), fake


def train_adapter_steps(gen: torch.nn.Module, fake: torch.nn.Module, rows: slice, processes: int) -> None:
    """Two AdamW steps of the generator adapter: step 1 on its own output on both sides of the boundary, step 2 on
    the fake score of its high-noise-only output at low-noise timesteps (gradients through the frozen fake score)."""
    from types import SimpleNamespace

    accelerator = SimpleNamespace(num_processes=processes, device=torch.device("cpu"))
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(2):
        x, t, text = data(step)
        out = gen(hidden_states=x[rows], timestep=t[rows], encoder_hidden_states=text[rows])[0]
        if step == 1:
            low = torch.tensor([300.0, 200.0])[rows]
            out = fake(hidden_states=out, timestep=low, encoder_hidden_states=text[rows])[0]
        out.square().mean().backward()
        wan_experts.drop_unused_grads(accelerator, list(gen.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_worker(rank: int, world: int, port: int, out_dir: str, engine: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if engine == "ddp_adapters":
            model, gen, fake = build_adapters()
            train_adapter_steps(
                torch.nn.parallel.DistributedDataParallel(gen), fake, slice(rank, rank + 1), world
            )
            if rank == 0:
                torch.save(
                    {k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out_dir}/{engine}.pt"
                )
            return
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
        train_steps(wrapped, slice(rank, rank + 1), world)
        if engine == "ddp":
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{engine}_state.pt"))
    finally:
        torch.distributed.destroy_process_group()
