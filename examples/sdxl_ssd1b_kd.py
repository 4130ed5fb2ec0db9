"""SSD-1B / Segmind-Vega for SDXL: a block-removed student trained with layer-level knowledge distillation.

Gupta et al., "Progressive Knowledge Distillation of Stable Diffusion XL using Layer Level Loss", 2024
(arXiv:2401.02677); BK-SDM, Kim et al. 2023 (arXiv:2305.15798). The student is built from the teacher
UNet with :func:`diffdistill.students.build_student` (``--preset ssd-1b``, ``vega`` or ``bk-sdm-*``;
kept blocks start from the teacher's weights) and trained on an image-caption folder with
:class:`diffdistill.students.LayerKD`: the denoising task loss + ``--output_weight`` x output KD +
``--feature_weight`` x the feature KD over the report's ``kd_pairs`` (teacher and student run on the same
noisy latents). The whole student trains (no LoRA); the result is a ``UNet2DConditionModel`` folder.

Example::

    accelerate launch examples/sdxl_ssd1b_kd.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --train_data_dir data/images --output_dir out/ssd-1b --preset ssd-1b \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 8 --learning_rate 1e-5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from diffdistill.schedulers import NoiseSchedule, ddim_sample, spaced_timesteps, uniform_timesteps
from diffdistill.students import PRESETS, LayerKD, build_student

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import checkpoints, data_sources, loop, options, runtime, sdxl_encoding, sdxl_models, validation

logger = logging.getLogger("sdxl_ssd1b_kd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-5)
    g = p.add_argument_group("layer KD")
    g.add_argument("--preset", choices=sorted(PRESETS), default="ssd-1b")
    g.add_argument("--kd_level", choices=["block", "sub_block", "layer"], default="sub_block")
    g.add_argument("--output_weight", type=float, default=0.5)
    g.add_argument("--feature_weight", type=float, default=0.5)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    args = options.check_common_args(p.parse_args(argv), image_method=True)
    if args.use_lora:
        raise ValueError("sdxl_ssd1b_kd trains the whole block-removed student: drop --use_lora.")
    return args


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_ssd1b_kd")
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype)
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    teacher = parts.unet
    try:
        student, report = build_student(teacher, args.preset)
    except ValueError as err:  # the library's OptionError: a preset written for another UNet layout
        cfg = teacher.config
        raise ValueError(
            f"--preset {args.preset} does not fit this UNet ({len(cfg.down_block_types)} levels, "
            f"layers_per_block={cfg.layers_per_block}): {err} The ssd-1b preset lists per-layer depths for "
            "SDXL's layout (3 levels, 2 layers per block); --preset vega and bk-sdm-* use fractions and fit "
            "other layouts."
        ) from err
    sdxl_models.freeze(teacher)
    teacher.to(device, dtype=dtype)
    student.train().requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    opt = runtime.adamw(student.parameters(), args)
    student, opt = runtime.prepare(accelerator, (student, opt))
    ema = checkpoints.setup_checkpoints(accelerator, args, student)
    kd = LayerKD(
        student,
        teacher,
        report.kd_pairs(args.kd_level),
        output_weight=args.output_weight,
        feature_weight=args.feature_weight,
    )
    data = data_sources.StepData(args, need_images=True)
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x0, prompts = data.latents_batch(gen, parts.vae, device)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = uniform_timesteps(x0.shape[0], 0, schedule.num_train_timesteps - 1, generator=gen).t.to(device)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.convert(noise, x_t, t, "epsilon", schedule.prediction_type)
        with accelerator.accumulate(student), runtime.autocast(accelerator):
            loss, logs = kd(x_t, t, target, **cond)
            runtime.backward(accelerator, loss, student)
            runtime.clip_and_step(accelerator, opt, student.parameters(), args.max_grad_norm)
        return logs

    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(student)
        timesteps = spaced_timesteps(args.validation_inference_steps, "trailing")
        validation.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: (
                ddim_sample(
                    model,
                    schedule,
                    z,
                    timesteps,
                    cond=c,
                    uncond=uncond,
                    guidance_scale=args.validation_guidance_scale,
                ).sample
            ),
            step,
        )

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    kd.close()
    checkpoints.save_unet(accelerator, student, args, ema=ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
