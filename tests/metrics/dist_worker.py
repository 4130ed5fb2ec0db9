"""Worker of ``test_distributed.py``: 2 processes (gloo) accumulate metric states on uneven shards and all-reduce.

Run by ``torch.distributed.run --nproc_per_node 2`` with the output folder as its argument; each rank writes
``rank{r}.pt`` with its reduced states. The data are built from fixed seeds, so the test rebuilds them and
computes the one-process reference itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from diffdistill.metrics import FID, CLIPScore, FeatureStatistics

SPLIT = 70  # rank 0 takes the first 70 rows, rank 1 the other 50


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(120, 5, generator=g, dtype=torch.float64) * 3 + 1e4
    fake = torch.rand(20, 3, 12, 12, generator=g)
    real = torch.rand(16, 3, 12, 12, generator=g) ** 2
    prompts = [f"prompt {i}" for i in range(20)]
    return feats, fake, real, prompts


def extractor() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


def clip_metric() -> CLIPScore:
    table = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    return CLIPScore(
        image_encoder=lambda px: px.mean(dim=(2, 3)).repeat(1, 2),
        text_encoder=lambda prompts: table[torch.tensor([int(p.split()[1]) for p in prompts])],
        preprocess=lambda images: images,
    )


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    feats, fake, real, prompts = data()
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    stats = FeatureStatistics(5)
    for chunk in feats[rows].split(16):
        stats.update(chunk)
    stats.all_reduce()
    images = slice(0, 13) if rank == 0 else slice(13, None)
    fid = FID(extractor())
    fid.update(fake[images])
    if rank == 0:  # rank 1 holds no reference images: it joins the all-reduce with empty statistics
        fid.update(real, real=True)
    fid.all_reduce()
    clip = clip_metric()
    clip.update(fake[images], prompts[images])
    clip.all_reduce()
    torch.save(
        {
            "count": stats.count,
            "mean": stats.mean,
            "cov": stats.covariance,
            "fid": fid.compute(),
            "clip": clip.compute(),
            "clip_count": clip.count,
        },
        out / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
