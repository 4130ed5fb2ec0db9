"""One-step SDXL generator by score implicit matching (SIM), or SiD / DMD, with an online fake score.

Luo et al., "One-Step Diffusion Distillation through Score Implicit Matching", NeurIPS 2024
(arXiv:2410.16794); ``--loss sid``: Zhou et al., ICML 2024 (arXiv:2404.04057); ``--loss dmd``: Yin et
al. 2024 (arXiv:2311.18828). Prompt-only (``--prompts_file``): the generator maps pure noise at
``--generator_timestep`` to a clean latent in one UNet call; the real score is the frozen teacher with
classifier-free guidance, the fake score a trainable copy of the teacher fitted to the generator's
detached samples by denoising score matching (:func:`diffdistill.losses.fake_score_loss`).
:class:`diffdistill.losses.AlternatingUpdate` alternates the two updates (``--generator_every``,
``--fake_steps``) and freezes the fake network during the generator step (``distill_common.ScoreDistillation``,
shared with Hyper-SD's one-step stage).

With ``--use_lora`` both the generator and the fake score are LoRAs (the fake one on its own copy of the
UNet). The real score is a frozen copy of the teacher in the mixed-precision dtype, run *with* autograd so
the SIM / SiD gradient flows through its input as in the papers. (It is not the generator's UNet with the
adapters disabled: with gradient checkpointing that UNet would recompute its blocks in the backward pass
with the adapters enabled again, which torch's checkpoint rejects.)

Example::

    accelerate launch examples/sdxl_sim.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --prompts_file prompts.txt --output_dir out/sim --use_lora --lora_rank 64 --loss sim \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 2 --max_train_steps 10000
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.losses import dmd_loss, sid_loss, sim_loss
from diffdistill.schedulers import NoiseSchedule, TeacherSolver

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_common as common  # the shared module next to this script

logger = logging.getLogger("sdxl_sim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, default_lr=1e-6)
    g = p.add_argument_group("SIM / SiD / DMD")
    g.add_argument("--loss", choices=["sim", "sid", "dmd"], default="sim")
    g.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale of the real score")
    common.add_fake_score_args(g)
    g.add_argument("--sid_alpha", type=float, default=1.2)
    g.add_argument("--sim_distance", choices=["pseudo_huber", "l2"], default="pseudo_huber")
    return common.check_common_args(p.parse_args(argv))


def sim_networks(
    args: argparse.Namespace, unet: torch.nn.Module, device: Any, dtype: torch.dtype
) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """``(generator, fake score, real score)`` built from the teacher ``unet`` (which becomes the generator).

    The real score is a frozen copy in ``dtype``; the generator and the fake score are LoRAs on ``dtype``
    bases (``--use_lora``) or full float32 copies. ``--gradient_checkpointing`` applies to all three (the
    generator's gradient flows through the real and fake scores' inputs).
    """
    real = copy.deepcopy(unet).to(device, dtype=dtype)
    common.freeze(real)
    fake = copy.deepcopy(unet)
    for net in (unet, fake):
        common.make_trainable(args, net, device, dtype)
    if args.gradient_checkpointing:
        real.enable_gradient_checkpointing()
    return unet, fake, real


def main(args: argparse.Namespace) -> None:
    accelerator = common.make_accelerator(args, "sdxl_sim")
    parts = common.load_sdxl(args)
    dtype = common.weight_dtype_of(accelerator)
    device = accelerator.device
    common.place_frozen(parts, device, dtype, vae=False)
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    unet, fake, real_model = sim_networks(args, parts.unet, device, dtype)
    opt_g = common.adamw(unet.parameters(), args)
    opt_f = common.adamw(fake.parameters(), args, lr=args.fake_learning_rate)
    unet, opt_g, fake, opt_f = common.prepare(accelerator, (unet, opt_g), (fake, opt_f))
    ema = common.setup_checkpoints(accelerator, args, unet, extra_lora={"fake": fake})
    real = TeacherSolver(real_model, schedule, guidance_scale=args.guidance_scale)
    data = common.StepData(args, need_images=False)
    uncond = common.uncond_conditions(args, parts, device, dtype)

    def generator_loss(
        x: torch.Tensor, z: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kwargs: dict[str, Any] = {"schedule": schedule, "cond": cond, "uncond": uncond, "generator": gen}
        if args.loss == "sim":
            return sim_loss(x, real, fake, distance=args.sim_distance, **kwargs)
        if args.loss == "sid":
            return sid_loss(x, real, fake, alpha=args.sid_alpha, **kwargs)
        return dmd_loss(x, real, fake, **kwargs)

    score = common.ScoreDistillation(
        accelerator, args, schedule, generator=(unet, opt_g), fake=(fake, opt_f), loss=generator_loss
    )
    global_step = common.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        _, prompts = data.batch(gen)
        cond = common.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        return score.step(step, gen, cond)

    validate = common.one_step_validation(accelerator, args, parts, unet, schedule)
    common.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    common.save_unet(accelerator, unet, args, ema=ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
