"""MLCM for SDXL: multistep latent consistency distillation, then the inter-segment stage.

Xie et al., "MLCM: Multistep Consistency Distillation of Latent Diffusion Model" / TLCM, 2024
(arXiv:2406.05768), Sec. 3.2-3.3 and 5.1, following ``StagePlan.mlcm``:

1. ``mlcd`` -- data-free multistep consistency: ``M`` milestones, teacher-trajectory training states
   (:func:`diffdistill.losses.teacher_trajectory_states`: guided teacher DDIM from pure noise), one
   guided teacher step of ``skip`` timesteps, online target, both sides moved to the lower milestone
   (:func:`diffdistill.losses.multistep_consistency_loss`).
2. ``lcd-inter-segment`` -- consistency across segments at the milestones only: the student's own
   4-step sample (TLCM grid, :func:`diffdistill.schedulers.x0_renoise_sample`) re-noised to a milestone,
   a 3-step teacher solve over one segment (:func:`diffdistill.losses.inter_segment_consistency_loss`).

Stage 1 takes the first ``--stage1_steps`` optimisation steps (default: the plan's 12k : 2k share of
``--max_train_steps``). Prompt-only (``--prompts_file``); ``--train_data_dir`` captions work as prompts.

Example::

    accelerate launch examples/sdxl_mlcm.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --prompts_file prompts.txt --output_dir out/mlcm --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 14000 \\
        --learning_rate 1e-4 --stage2_learning_rate 1e-5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from diffdistill.losses import (
    inter_segment_consistency_loss,
    multistep_consistency_loss,
    teacher_trajectory_states,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    milestone_pairs,
    tlcm_timesteps,
    x0_renoise_sample,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import checkpoints, data_sources, loop, options, runtime, sdxl_encoding, sdxl_models, validation

logger = logging.getLogger("sdxl_mlcm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-4)
    g = p.add_argument_group("MLCM")
    g.add_argument("--num_segments", type=int, default=8, help="milestones M")
    g.add_argument("--guidance_scale", type=float, default=8.0, help="teacher CFG scale")
    g.add_argument("--skip", type=int, default=None, help="stage-1 teacher step (default: the plan's 20)")
    g.add_argument("--stage1_steps", type=int, default=None, help="default: 12/14 of --max_train_steps")
    g.add_argument("--stage2_learning_rate", type=float, default=1e-5)
    g.add_argument("--student_sample_steps", type=int, default=None, help="default: the plan's 4")
    return options.check_common_args(p.parse_args(argv))


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_mlcm")
    plan = StagePlan.mlcm(num_segments=args.num_segments, guidance_scale=args.guidance_scale)
    mlcd, inter = plan["mlcd"], plan["lcd-inter-segment"]
    skip = args.skip if args.skip is not None else mlcd.options["skip"]
    q = args.student_sample_steps or inter.options["student_sample_steps"]
    if args.stage1_steps is None:
        share = mlcd.num_iterations / (mlcd.num_iterations + inter.num_iterations)
        stage1_steps = round(args.max_train_steps * share)
    else:
        stage1_steps = args.stage1_steps
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype, vae=False)
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    unet, teacher_model = sdxl_models.student_and_teacher(args, parts.unet, device, dtype)
    opt = runtime.adamw(unet.parameters(), args)
    unet, opt = runtime.prepare(accelerator, (unet, opt))
    ema = checkpoints.setup_checkpoints(accelerator, args, unet)
    teacher = TeacherSolver(teacher_model, schedule, guidance_scale=args.guidance_scale)
    data = data_sources.StepData(args, need_images=False)
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        first = step < stage1_steps
        lr = args.learning_rate if first else args.stage2_learning_rate
        for group in opt.param_groups:
            group["lr"] = lr
        _, prompts = data.batch(gen)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        noise = torch.randn(shape, generator=gen).to(device)
        with accelerator.accumulate(unet), runtime.autocast(accelerator):
            if first:
                sample = milestone_pairs(
                    shape[0],
                    args.num_segments,
                    skip,
                    schedule.num_train_timesteps,
                    generator=gen,
                    device=device,
                )
                x_t = teacher_trajectory_states(
                    teacher, noise, sample.t, cond, uncond, num_segments=args.num_segments
                )
                loss, logs = multistep_consistency_loss(
                    unet, teacher, None, cond, uncond, x_t=x_t, sample=sample, target="online", generator=gen
                )
            else:
                timesteps = tlcm_timesteps(q, num_train_timesteps=schedule.num_train_timesteps)
                x0 = x0_renoise_sample(unet, schedule, noise, timesteps, cond=cond, generator=gen).sample
                loss, logs = inter_segment_consistency_loss(
                    unet,
                    teacher,
                    x0.detach(),
                    cond,
                    uncond,
                    num_segments=args.num_segments,
                    teacher_steps=inter.teacher_steps or 3,
                    target="online",
                    generator=gen,
                )
            runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
        logs["stage"] = torch.tensor(1.0 if first else 2.0)
        return logs

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        timesteps = tlcm_timesteps(q, num_train_timesteps=schedule.num_train_timesteps)
        gen = torch.Generator().manual_seed(args.seed)
        validation.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: x0_renoise_sample(model, schedule, z, timesteps, cond=c, generator=gen).sample,
            step,
        )

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    checkpoints.save_unet(accelerator, unet, args, ema=ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
