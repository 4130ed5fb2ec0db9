"""DDP worker of test_discriminator_ddp.py's LADD test, importable by top-level name in spawned processes.

A LADD discriminator (:class:`~diffdistill.discriminators.LADDDiscriminator`: conditioned heads on a frozen tiny
FLUX transformer, shared by reference) and a tiny "student" (one conv layer mapping noise to latents) train in
alternation, as the LADD step does: the discriminator on re-noised real and student latents (hinge), then the
student through the frozen discriminator (its gradient crosses the transformer's blocks). Each is its own DDP
module, as ``accelerator.prepare`` makes them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from diffdistill.discriminators import LADDDiscriminator, ladd_renoise_sigma
from diffdistill.losses import gan_discriminator_loss, gan_generator_loss
from diffdistill.students import frozen

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.transformer_configs
from tests.transformer_configs import tiny_flux_transformer

STEPS = 2
GLOBAL_BATCH = 4
SIZE = 8  # 8x8 latents of 4 channels: 16 packed tokens of 16 channels for the tiny FLUX


def make_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    n = STEPS * GLOBAL_BATCH
    return {
        "real": torch.randn(STEPS, GLOBAL_BATCH, 4, SIZE, SIZE, generator=gen),
        "noise": torch.randn(STEPS, GLOBAL_BATCH, 4, SIZE, SIZE, generator=gen),
        "renoise": torch.randn(STEPS, GLOBAL_BATCH, 4, SIZE, SIZE, generator=gen),
        "sigma": ladd_renoise_sigma(n, generator=gen).reshape(STEPS, GLOBAL_BATCH),
        "text": torch.randn(STEPS, GLOBAL_BATCH, 3, 16, generator=gen),
        "pooled": torch.randn(STEPS, GLOBAL_BATCH, 16, generator=gen),
    }


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing: ``(B, C, H, W)`` -> ``(B, HW/4, 4C)``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(student, discriminator)``, the same on every process (seeded)."""
    teacher = tiny_flux_transformer(seed=0)
    torch.manual_seed(3)
    disc = LADDDiscriminator(teacher, every=2, norm_groups=4)
    student = torch.nn.Conv2d(4, 4, 3, padding=1)
    return student, disc


def train_steps(student: torch.nn.Module, disc: torch.nn.Module, rows: slice) -> list[torch.Tensor]:
    """STEPS alternating discriminator / student steps on rows ``rows``; returns each step's real logits."""
    data = {k: v[:, rows] for k, v in make_data().items()}
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(student.parameters(), lr=0.1)
    ids = image_ids(SIZE // 2, SIZE // 2)
    seen = []

    def judge(x0: torch.Tensor, step: int) -> list[torch.Tensor]:
        sigma = data["sigma"][step].view(-1, 1, 1, 1)
        x = (1 - sigma) * x0 + sigma * data["renoise"][step]
        cond = {
            "encoder_hidden_states": data["text"][step],
            "pooled_projections": data["pooled"][step],
            "txt_ids": torch.zeros(3, 3),
            "img_ids": ids,
            "guidance": torch.full((x.shape[0],), 3.5),
        }
        # FLUX takes sigma as its timestep input (the discriminator's timestep_scale is 1000 for FLUX)
        return disc(pack(x), data["sigma"][step], grid_size=(SIZE // 2, SIZE // 2), **cond)

    for step in range(STEPS):
        fake = student(data["noise"][step])
        real_logits = judge(data["real"][step], step)
        loss_d, _ = gan_discriminator_loss(real_logits, judge(fake.detach(), step), loss="hinge")
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        with frozen(disc):
            loss_g, _ = gan_generator_loss(judge(fake, step), loss="hinge")
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        seen.append(torch.cat([r.detach().flatten(1) for r in real_logits], 1))
    return seen


def run_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per_rank = GLOBAL_BATCH // world
        student, disc = build()
        ddp_s, ddp_d = DistributedDataParallel(student), DistributedDataParallel(disc)
        logits = train_steps(ddp_s, ddp_d, slice(rank * per_rank, (rank + 1) * per_rank))
        torch.save(logits, os.path.join(out_dir, f"ladd_logits{rank}.pt"))
        states = {"student": student.state_dict(), "disc": disc.state_dict()}
        torch.save(states, os.path.join(out_dir, f"ladd_state{rank}.pt"))
    finally:
        dist.destroy_process_group()
