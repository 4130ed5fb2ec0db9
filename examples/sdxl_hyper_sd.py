"""Hyper-SD for SDXL: trajectory-segmented consistency distillation (TSCD) on a LoRA student.

Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", 2024
(arXiv:2404.13686), Sec. 3.1 and 4.1. The stages of ``StagePlan.hyper_sd`` (k = 8 → 4 → 2 → 1 segments)
run one after the other, each for an equal share of ``--max_train_steps``; the distance between the
student side and the (EMA) target side of :func:`diffdistill.losses.consistency_pair` is the stage's
``mse`` weight times MSE plus its ``adversarial`` weight times the non-saturating GAN loss of an
unconditional ``UNetEncoderDiscriminator`` (a trainable copy of the teacher's encoder), which judges
both sides at ``t_end``. The teacher is the same UNet with its adapters disabled (LoRA) or a frozen copy
(full UNet), run with classifier-free guidance.

Not implemented: the optional reward hinge (``diffdistill.losses.reward_hinge_loss`` with a user reward
model) and the score-distillation one-step stage of the paper.

Example::

    accelerate launch examples/sdxl_hyper_sd.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --train_data_dir data/images --output_dir out/hyper-sd --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 8000
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from diffdistill.discriminators import UNetEncoderDiscriminator
from diffdistill.losses import consistency_pair, gan_discriminator_loss, gan_generator_loss
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    ddim_sample,
    spaced_timesteps,
    tscd_segments,
)
from diffdistill.students import EMA

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_common as common  # the shared module next to this script

logger = logging.getLogger("sdxl_hyper_sd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, default_lr=1e-6)
    g = p.add_argument_group("Hyper-SD")
    g.add_argument("--segments", default="8,4,2,1", help="TSCD segment counts k, one stage each")
    g.add_argument("--num_inference_steps", type=int, default=50, help="teacher DDIM grid N")
    g.add_argument("--guidance_scale", type=float, default=7.0, help="teacher CFG scale")
    g.add_argument("--target", choices=["ema", "online"], default="ema")
    g.add_argument(
        "--target_ema_decay",
        type=float,
        default=None,
        help="EMA target decay (default: the stage plan's 0.95)",
    )
    g.add_argument("--discriminator_learning_rate", type=float, default=None, help="default: --learning_rate")
    return common.check_common_args(p.parse_args(argv))


def stage_index(step: int, num_stages: int, max_steps: int) -> int:
    """Stage of optimisation step ``step`` (0-based): equal shares of ``max_steps``."""
    return min(num_stages - 1, step * num_stages // max_steps)


def main(args: argparse.Namespace) -> None:
    accelerator = common.make_accelerator(args, "sdxl_hyper_sd")
    plan = StagePlan.hyper_sd(
        [int(k) for k in args.segments.split(",")], num_inference_steps=args.num_inference_steps
    )
    parts = common.load_sdxl(args)
    dtype = common.weight_dtype_of(accelerator)
    device = accelerator.device
    common.place_frozen(parts, device, dtype)
    unet = parts.unet
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)

    # The discriminator copies the teacher's encoder before any adapter is added.
    disc = UNetEncoderDiscriminator(
        unet, conditional=False, gradient_checkpointing=args.gradient_checkpointing
    )
    unet, teacher_model = common.student_and_teacher(args, unet, device, dtype)
    decay = args.target_ema_decay if args.target_ema_decay is not None else plan[0].options["ema_decay"]
    ema = EMA(unet, decay=decay).to(device) if args.target == "ema" else None

    opt = common.adamw(unet.parameters(), args)
    opt_d = common.adamw(disc.parameters(), args, lr=args.discriminator_learning_rate)
    unet, disc, opt, opt_d = accelerator.prepare(unet, disc, opt, opt_d)
    if ema is not None:  # the consistency target (a LoRA student's is checkpointed as its LoRA only)
        common.register_ema(accelerator, ema, unet)
    release_ema = common.setup_checkpoints(accelerator, args, unet)
    data = common.StepData(args, need_images=True)
    uncond = common.unet_conditions(parts, [""], args.resolution, device, dtype, args.cache_dir)
    teacher = TeacherSolver(teacher_model, schedule, guidance_scale=args.guidance_scale)
    global_step = common.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        stage = plan[stage_index(step, len(plan), args.max_train_steps)]
        w_mse, w_adv = stage.loss_weights.get("mse", 1.0), stage.loss_weights.get("adversarial", 0.0)
        x0, prompts = data.latents_batch(gen, parts.vae, device)
        cond = common.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        sample = tscd_segments(
            x0.shape[0],
            stage.num_segments or 1,
            args.num_inference_steps,
            schedule.num_train_timesteps,
            generator=gen,
            device=device,
        )
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = schedule.add_noise(x0, noise, sample.t)
        logs: dict[str, torch.Tensor] = {}
        with accelerator.accumulate(unet, disc), accelerator.autocast():
            pair = consistency_pair(
                unet,
                teacher,
                x_t,
                sample,
                cond,
                uncond,
                target=ema if ema is not None else "online",
                parameterization="move",
            )
            student, target = pair.student.float(), pair.target.float()
            loss = w_mse * F.mse_loss(student, target)
            t_judge = pair.sample.t_end.clamp(min=0)
            ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
            if w_adv > 0:
                disc.requires_grad_(False)
                g_loss, _ = gan_generator_loss(disc(student, t_judge, ehs, added))
                disc.requires_grad_(True)
                loss = loss + w_adv * g_loss
                logs["generator_adv"] = g_loss.detach()
            accelerator.backward(loss)
            common.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
            if w_adv > 0:
                d_loss, _ = gan_discriminator_loss(
                    disc(target, t_judge, ehs, added), disc(student.detach(), t_judge, ehs, added)
                )
                accelerator.backward(d_loss)
                common.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
                logs["discriminator"] = d_loss.detach()
        if ema is not None and accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(unet))
        logs["loss"] = loss.detach()
        logs["k"] = torch.tensor(float(stage.num_segments or 1))
        return logs

    def validate(step: int) -> None:
        k = plan[stage_index(step - 1, len(plan), args.max_train_steps)].num_segments or 1
        model = accelerator.unwrap_model(unet)
        timesteps = spaced_timesteps(k, "trailing", num_train_timesteps=schedule.num_train_timesteps)
        common.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: ddim_sample(model, schedule, z, timesteps, cond=c).sample,
            step,
        )

    common.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=release_ema)
    common.save_unet(accelerator, unet, args, ema=release_ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
