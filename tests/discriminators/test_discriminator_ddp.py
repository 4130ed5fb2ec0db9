"""DDP on CPU (2 processes, gloo, spawn): same logits and updated weights as one process on the same data."""

from __future__ import annotations

import os
import socket

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


def _data() -> dict[str, object]:
    gen = torch.Generator().manual_seed(11)
    real = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen)
    fake = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen) * 0.5
    x_t = torch.randn(STEPS, GLOBAL_BATCH, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (STEPS, GLOBAL_BATCH), generator=gen)
    return {"real": real, "fake": fake, "x_t": x_t, "t": t}


def _build() -> UNetEncoderDiscriminator:
    unet = tiny_sdxl_unet(seed=0)
    torch.manual_seed(5)
    return UNetEncoderDiscriminator(unet, conditional=True)


def _train(disc: torch.nn.Module, rows: slice) -> list[torch.Tensor]:
    """STEPS discriminator steps on rows ``rows`` of the global batch; returns each step's real logits."""
    data = _data()
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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per_rank = GLOBAL_BATCH // world
        ddp = DistributedDataParallel(_build())
        logits = _train(ddp, slice(rank * per_rank, (rank + 1) * per_rank))
        torch.save(logits, os.path.join(out_dir, f"logits{rank}.pt"))
        if rank == 0:
            torch.save(ddp.module.state_dict(), os.path.join(out_dir, "state.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_matches_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _build()
    ref_logits = _train(single, slice(0, GLOBAL_BATCH))
    ddp_logits = [torch.cat(z) for z in zip(*(torch.load(tmp_path / f"logits{r}.pt") for r in range(2)))]
    for a, b in zip(ddp_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "state.pt")
    ref_state = single.state_dict()
    init_state = _build().state_dict()
    assert state.keys() == ref_state.keys()
    for k in state:
        # the two runs made the same update up to float32 summation order
        update = (ref_state[k] - init_state[k]).norm()
        assert (state[k] - ref_state[k]).norm() <= 1e-3 * update + 1e-6, k
    assert not torch.equal(ref_logits[0], ref_logits[1])  # the step changed the discriminator
