"""Train the toy demo's teacher: a ~1M-parameter class-conditioned ``UNet2DConditionModel`` on 16×16 shapes.

The UNet has the SDXL block structure (a plain down block then a cross-attention block, linear
projections), built from a config like :func:`diffdistill.discriminators.tiny_sdxl_unet_config`,
without the ``"text_time"`` added conditions. The class is the "prompt": a fixed, seeded
:data:`NUM_CLASSES` × 32 table of embeddings, fed as a one-token ``encoder_hidden_states``.

It is an epsilon-prediction model on the SD/SDXL ``scaled_linear`` schedule
(``NoiseSchedule.from_betas()``), trained with the plain denoising loss and an EMA of the weights,
which is what ships as ``teacher.safetensors`` (with ``teacher_config.json``)::

    .venv/bin/python examples/toy/train_teacher.py            # ~12 min on one CPU thread, reproducible

The run is deterministic for a given seed, thread count and torch build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import NUM_CLASSES, SIZE, sample_shapes  # noqa: E402

from diffdistill.schedulers import NoiseSchedule  # noqa: E402
from diffdistill.students import EMA  # noqa: E402

__all__ = ["class_condition", "load_teacher", "teacher_unet_config"]

WEIGHTS = HERE / "teacher.safetensors"
CONFIG = HERE / "teacher_config.json"
EMBED_DIM = 32


def teacher_unet_config() -> dict[str, Any]:
    """The teacher's ``UNet2DConditionModel`` config (985k parameters)."""
    return {
        "sample_size": SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": 1,
        "cross_attention_dim": EMBED_DIM,
        "use_linear_projection": True,
        "norm_num_groups": 16,
    }


def class_embeddings(seed: int = 1234) -> torch.Tensor:
    """The fixed ``(NUM_CLASSES, 32)`` class "prompt" table."""
    return torch.randn(NUM_CLASSES, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def class_condition(table: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"encoder_hidden_states": (B, 1, 32)}`` for ``labels`` (the ``cond`` the library's APIs take)."""
    return {"encoder_hidden_states": table[labels].unsqueeze(1)}


def build_unet(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet: torch.nn.Module = UNet2DConditionModel(**config)  # type: ignore[assignment]
    return unet


def load_teacher(
    weights: Path = WEIGHTS, config: Path = CONFIG
) -> tuple[torch.nn.Module, torch.Tensor, NoiseSchedule]:
    """The frozen teacher UNet, its class-embedding table and its :class:`NoiseSchedule`."""
    from safetensors.torch import load_file

    meta = json.loads(config.read_text())
    unet = build_unet(meta["unet"])
    state = load_file(str(weights))
    table = state.pop("class_embeddings")
    unet.load_state_dict(state)
    unet.eval().requires_grad_(False)
    return unet, table, NoiseSchedule.from_betas(**meta["schedule"])


def train(steps: int, batch: int, lr: float, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from tqdm import tqdm

    schedule = NoiseSchedule.from_betas()
    unet = build_unet(teacher_unet_config(), seed)
    table = class_embeddings()
    ema = EMA(unet, decay=0.995)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="teacher", unit="step")
    for _ in bar:
        x0, y = sample_shapes(batch, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        pred = unet(x_t, t, **class_condition(table, y)).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet)
    return unet, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    start = time.time()
    unet, table = train(args.steps, args.batch, args.lr, args.seed)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    state["class_embeddings"] = table
    save_file(state, str(args.out))
    meta = {
        "unet": teacher_unet_config(),
        "schedule": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        "training": {k: v for k, v in vars(args).items() if k != "out"},
        "train_seconds": round(time.time() - start, 1),
    }
    args.out.with_name(CONFIG.name).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {args.out} in {meta['train_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
