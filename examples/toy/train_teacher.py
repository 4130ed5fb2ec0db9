"""Train the toy demo's teacher: a ~1M-parameter class-conditioned ``UNet2DConditionModel`` on 16×16 shapes.

The UNet has the SDXL block structure (a plain down block then a cross-attention block, linear
projections), built from a config like :func:`diffdistill.discriminators.tiny_sdxl_unet_config`,
without the ``"text_time"`` added conditions. The class is the "prompt": a fixed, seeded
:data:`NUM_CLASSES` × 32 table of embeddings, fed as a one-token ``encoder_hidden_states``.

Two teachers ship, trained the same way (same data, network, seed, steps, batch, optimiser and EMA; only
the schedule, the network's timestep input and the regression target differ):

* ``--schedule vp`` (``teacher.safetensors`` + ``teacher_config.json``): an epsilon-prediction model on the
  SD/SDXL ``scaled_linear`` schedule (``NoiseSchedule.from_betas()``), fed the integer index, trained with
  the plain denoising loss ``|eps_hat - eps|^2`` (DDPM, Ho et al. 2020, Eq. 14).
* ``--schedule flow`` (``teacher_flow.safetensors`` + ``teacher_flow_config.json``): a rectified-flow
  velocity model as SD3 (Esser et al. 2024, Sec. 2-3): ``x_sigma = (1 - sigma) x0 + sigma eps``
  on the shift-3 table (``NoiseSchedule.flow_matching(shift=3.0)``, SD3's shift, Sec. 5.3.2), fed
  ``1000 sigma`` (``schedule.model_timestep``, SD3's input), trained with the conditional flow-matching
  loss ``|v_hat - (eps - x0)|^2`` (Sec. 2, Eq. 1 with ``u_t = eps - x0``).
  Training indices are uniform over the shifted table as for the VP teacher, i.e. SD3's shifted-uniform
  density (our choice: the same sampler as the VP teacher; SD3 itself prefers logit-normal, Table 1).

Both keep an EMA (decay 0.995) of the weights, which is what ships::

    .venv/bin/python examples/toy/train_teacher.py                    # VP, ~12 min on one CPU thread
    .venv/bin/python examples/toy/train_teacher.py --schedule flow    # flow, about as long

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

__all__ = ["class_condition", "config_path", "load_teacher", "make_schedule", "teacher_unet_config"]

WEIGHTS = HERE / "teacher.safetensors"
CONFIG = HERE / "teacher_config.json"
#: The shipped teachers' weights by schedule kind (``--schedule`` here, ``--teacher`` in ``distill.py``).
TEACHER_WEIGHTS = {"vp": WEIGHTS, "flow": HERE / "teacher_flow.safetensors"}
#: The flow teacher's shift (SD3's, Esser et al. 2024, Sec. 5.3.2).
FLOW_SHIFT = 3.0
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


def config_path(weights: Path) -> Path:
    """The config file beside ``weights``: ``teacher.safetensors`` -> ``teacher_config.json``."""
    return weights.with_name(f"{weights.stem}_config.json")


def schedule_config(kind: str) -> dict[str, Any]:
    """The ``"schedule"`` entry of a teacher config: SD's betas (VP) or ``{"kind": "flow", "shift": 3.0}``."""
    if kind == "flow":
        return {"kind": "flow", "shift": FLOW_SHIFT}
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def make_schedule(meta: dict[str, Any]) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a config's ``"schedule"`` entry (no ``"kind"``: VP, the first teacher's
    config)."""
    args = dict(meta)
    if args.pop("kind", "vp") == "flow":
        return NoiseSchedule.flow_matching(**args)
    return NoiseSchedule.from_betas(**args)


def load_teacher(
    weights: Path = WEIGHTS, config: Path | None = None
) -> tuple[torch.nn.Module, torch.Tensor, NoiseSchedule]:
    """The frozen teacher UNet, its class-embedding table and its :class:`NoiseSchedule` (``config``
    default: :func:`config_path` of ``weights``)."""
    from safetensors.torch import load_file

    meta = json.loads((config or config_path(weights)).read_text())
    unet = build_unet(meta["unet"])
    state = load_file(str(weights))
    table = state.pop("class_embeddings")
    unet.load_state_dict(state)
    unet.eval().requires_grad_(False)
    return unet, table, make_schedule(meta["schedule"])


def train(
    steps: int, batch: int, lr: float, seed: int, kind: str = "vp"
) -> tuple[torch.nn.Module, torch.Tensor]:
    from tqdm import tqdm

    schedule = make_schedule(schedule_config(kind))
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
        pred = unet(x_t, schedule.model_timestep(t), **class_condition(table, y)).sample
        target = noise - x0 if kind == "flow" else noise  # velocity (SD3 Eq. 1) or epsilon (DDPM Eq. 14)
        loss = (pred - target).pow(2).mean()
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
    p.add_argument(
        "--schedule",
        choices=sorted(TEACHER_WEIGHTS),
        default="vp",
        help="VP epsilon or rectified-flow teacher",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="weights file (default: the shipped one of --schedule)"
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = TEACHER_WEIGHTS[args.schedule]
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    start = time.time()
    unet, table = train(args.steps, args.batch, args.lr, args.seed, args.schedule)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    state["class_embeddings"] = table
    save_file(state, str(args.out))
    # The VP config keeps the keys (and so the bytes) of the first shipped teacher: no "schedule" in "training".
    skip = ("out", "schedule") if args.schedule == "vp" else ("out",)
    training = {k: v for k, v in vars(args).items() if k not in skip}
    meta = {
        "unet": teacher_unet_config(),
        "schedule": schedule_config(args.schedule),
        "training": training,
        "train_seconds": round(time.time() - start, 1),
    }
    config_path(args.out).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {args.out} in {meta['train_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
