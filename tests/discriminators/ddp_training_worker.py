"""DDP worker for test_discriminator_ddp.py, importable by top-level name in spawned processes.

It is a plain module (not collected by pytest) so that ``torch.multiprocessing.spawn`` can unpickle
``run_worker`` whatever import mode pytest uses for the test files.
"""

from __future__ import annotations

import os

import torch

from diffdistill.discriminators import (
    UNetEncoderDiscriminator,
    sdxl_conditions,
    tiny_sdxl_unet,
    tiny_sdxl_unet_config,
)
from diffdistill.losses import gan_discriminator_loss

STEPS = 2
GLOBAL_BATCH = 4


def make_data() -> dict[str, object]:
    gen = torch.Generator().manual_seed(11)
    real = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen)
    fake = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen) * 0.5
    x_t = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (STEPS, GLOBAL_BATCH), generator=gen)
    return {"real": real, "fake": fake, "x_t": x_t, "t": t}


def build_discriminator() -> UNetEncoderDiscriminator:
    unet = tiny_sdxl_unet(seed=0)
    torch.manual_seed(5)
    return UNetEncoderDiscriminator(unet, conditional=True)


def train_steps(disc: torch.nn.Module, rows: slice) -> list[torch.Tensor]:
    """STEPS discriminator steps on rows ``rows`` of the global batch; returns each step's real logits."""
    data = make_data()
    ehs, added = sdxl_conditions(
        tiny_sdxl_unet_config(), GLOBAL_BATCH, generator=torch.Generator().manual_seed(3)
    )
    ehs, added = ehs[rows], {k: v[rows] for k, v in added.items()}
    opt = torch.optim.SGD(disc.parameters(), lr=0.05)
    seen = []
    for step in range(STEPS):
        real, fake, x_t, t = (data[k][step][rows] for k in ("real", "fake", "x_t", "t"))
        both = torch.cat([real, fake])
        logits = disc(
            both,
            torch.cat([t, t]),
            torch.cat([ehs, ehs]),
            {k: torch.cat([v, v]) for k, v in added.items()},
            cond_sample=torch.cat([x_t, x_t]),
            cond_timestep=torch.cat([t + 1, t + 1]).clamp(max=999),
        )[0]
        real_logits, fake_logits = logits.chunk(2)
        loss, _ = gan_discriminator_loss(real_logits, fake_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(real_logits.detach())
    return seen


def run_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per_rank = GLOBAL_BATCH // world
        ddp = DistributedDataParallel(build_discriminator())
        logits = train_steps(ddp, slice(rank * per_rank, (rank + 1) * per_rank))
        torch.save(logits, os.path.join(out_dir, f"logits{rank}.pt"))
        if rank == 0:
            torch.save(ddp.module.state_dict(), os.path.join(out_dir, "state.pt"))
    finally:
        dist.destroy_process_group()
