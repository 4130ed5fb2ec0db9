"""Worker of ``test_feature_taps.py``'s 2-process DDP test (a module of its own so spawned children import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from diffdistill.students import FeatureTap


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class _Toy(nn.Module):
    """A small conv net with nested blocks and tuple outputs (DDP workers avoid importing diffusers)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU()) for _ in range(1)]
        )
        self.blocks.append(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU()))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        return self.head(x), x


def run_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = _Toy()
        ddp = nn.parallel.DistributedDataParallel(net)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10 + rank))
        names = ["blocks.*", "head"]
        with FeatureTap(ddp, names) as tap:
            ddp(x)[0].mean().backward()
            feats = {k: v.detach() for k, v in tap.pop().items()}
            calls = dict(tap.calls)
        torch.manual_seed(0)
        plain = _Toy()
        with torch.no_grad(), FeatureTap(plain, names) as tap_plain:
            plain(x)
            ref = tap_plain.pop()
        torch.save(
            {"feats": feats, "ref": ref, "calls": calls, "hooks": hook_count(net)}, f"{out_dir}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()
