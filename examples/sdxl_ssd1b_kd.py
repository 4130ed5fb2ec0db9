"""SSD-1B / Segmind-Vega for SDXL: a block-removed student trained with layer-level knowledge distillation, in rounds.

Gupta et al., "Progressive Knowledge Distillation of Stable Diffusion XL using Layer Level Loss", 2024
(arXiv:2401.02677); BK-SDM, Kim et al. 2023 (arXiv:2305.15798). One run of this script is one round:

1. The student: a fresh run removes blocks from the ``--pretrained_model_name_or_path`` UNet (the source);
   ``--student_model`` continues an already-pruned student instead (a previous run's ``--output_dir``, whose
   ``unet/block_removal.json`` records its rounds, or any block-removed SDXL UNet such as ``segmind/SSD-1B``,
   whose history is then inferred from its config with :func:`diffdistill.students.block_removal.infer_chain`).
   The blocks this round removes: ``--preset P --round K`` (round K of the preset, split by
   :data:`~diffdistill.students.block_removal.ROUND_GROUPS`; ``--round`` without ``--preset`` is refused), ``--preset P`` alone (whatever of the preset the
   student still has: the whole preset in a fresh run), or ``--remove`` with source module names; none with
   ``--student_model`` and neither option. Kept blocks start from the previous student's weights
   (:func:`~diffdistill.students.block_removal.remove_blocks`), as the paper's rounds do.
2. The teacher: the source UNet, or ``--teacher_model`` (a fine-tuned SDXL, or an earlier round's student);
   text encoders, tokenizers, VAE and scheduler always come from ``--pretrained_model_name_or_path``.
3. The loss (:class:`diffdistill.students.LayerKD`): task loss + ``--output_weight`` x output KD +
   ``--feature_weight`` x feature KD over the round's pairs of teacher and student modules
   (:meth:`~diffdistill.students.block_removal.BlockRemovalChain.kd_pairs`, which follows every round's removals
   back to the teacher's names), teacher and student on the same noisy latents. The whole student trains (no
   LoRA); the result is a ``UNet2DConditionModel`` folder ``--output_dir/unet`` with ``block_removal.json``
   beside its config (every round so far: units removed, parameters and FLOPs per round and in total, teacher).

Recipe (SSD-1B; Vega: the same with ``--preset vega``). What is the paper's and what is ours:

- Student architectures: as the released models (SSD-1B 1.3B, Vega 0.74B parameters; the paper's Fig. 2 shows
  SSD-1B's UNet); see :mod:`diffdistill.students.block_removal` for the configs.
- Loss: as the paper (task + output-level KD + feature-level KD); weights 0.5 / 0.5 as Segmind's SDXL
  training script.
  ``--kd_level sub_block`` (every resnet and attention) is what that script uses; ``layer`` adds every kept
  transformer layer (the paper's "layer level").
- Removal in rounds, each from the previous round's student: as the paper ("progressive removal using
  layer-level losses", abstract). Which blocks each round removes: our choice, not the paper's sequence (round 1
  the mid block's attention and second resnet, round 2 the down path's transformer layers, round 3 the up
  path's); the paper chose its removals from per-layer losses and quality checks, which this script does not
  run.
- Teachers in succession SDXL -> ZavyChromaXL -> JuggernautXL: as the SSD-1B model card. Which rounds use which
  teacher: our choice (SDXL base for the removal rounds, then one round per fine-tuned teacher, no removal).
- 251k steps in all, learning rate 1e-5, batch 32 x gradient accumulation 4, 1024 px, fp16: as the SSD-1B
  model card (set by the example's flags below; the script's defaults are batch 1, no accumulation, 1000
  steps); how the steps split over rounds is not published: our choice (about 50k per round, below).

Example (five rounds; each ``--output_dir`` is the next round's ``--student_model``)::

    SDXL=stabilityai/stable-diffusion-xl-base-1.0
    COMMON="--pretrained_model_name_or_path $SDXL --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --train_data_dir data/images --mixed_precision fp16 --gradient_checkpointing --train_batch_size 32 \\
        --gradient_accumulation_steps 4 --learning_rate 1e-5 --max_train_steps 50000"
    accelerate launch examples/sdxl_ssd1b_kd.py $COMMON --preset ssd-1b --round 1 --output_dir out/r1
    accelerate launch examples/sdxl_ssd1b_kd.py $COMMON --student_model out/r1 --preset ssd-1b --round 2 \\
        --output_dir out/r2
    accelerate launch examples/sdxl_ssd1b_kd.py $COMMON --student_model out/r2 --preset ssd-1b --round 3 \\
        --output_dir out/r3
    accelerate launch examples/sdxl_ssd1b_kd.py $COMMON --student_model out/r3 --teacher_model path/to/zavychromaxl \\
        --output_dir out/r4
    accelerate launch examples/sdxl_ssd1b_kd.py $COMMON --student_model out/r4 --teacher_model path/to/juggernautxl \\
        --output_dir out/r5

``--preset ssd-1b`` without ``--round`` (and without ``--student_model``) removes the whole preset in one round.

Multi-aspect data (our choice; SSD-1B's training has no aspect buckets): ``--aspect_buckets HxW ...`` crops each
image to the size nearest its aspect ratio, draws each batch within one size and conditions the UNet on it (SDXL's
bucket conditioning, the target size of ``time_ids``, Podell et al. 2023 Sec. 2.3; original size = target, no
crop, as the pipeline's defaults), e.g. the ~1 MP sizes common with SDXL ``1024x1024 1152x896 896x1152 1216x832 832x1216
1344x768 768x1344 1536x640 640x1536``; validation stays at ``--resolution``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.schedulers import NoiseSchedule, ddim_sample, spaced_timesteps, uniform_timesteps
from diffdistill.students import (
    PRESETS,
    ROUND_GROUPS,
    BlockRemovalChain,
    LayerKD,
    infer_chain,
    remove_blocks,
    removed_units,
    split_rounds,
    start_chain,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    aspect_buckets,
    checkpoints,
    compilation,
    data_sources,
    loop,
    options,
    runtime,
    sdxl_encoding,
    sdxl_models,
    validation,
)

logger = logging.getLogger("sdxl_ssd1b_kd")

RECORD = "block_removal.json"  # the chain of rounds, saved beside the student's config.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-5)
    g = p.add_argument_group("rounds")
    g.add_argument(
        "--student_model",
        default=None,
        help="continue this block-removed student (a previous run's --output_dir, a UNet folder or a hub id); "
        "default: a new student from --pretrained_model_name_or_path's UNet",
    )
    g.add_argument(
        "--teacher_model",
        default=None,
        help="the teacher UNet (a fine-tuned SDXL or an earlier round's student: folder or hub id); default: "
        "--pretrained_model_name_or_path's UNet",
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the block removal to apply (default ssd-1b in a fresh run; none with --student_model)",
    )
    g.add_argument(
        "--round",
        type=int,
        default=None,
        help=f"apply only round K (1..{len(ROUND_GROUPS)}) of --preset: 1 the mid block, 2 the down path, 3 the up path "
        "(BK-SDM: round 2 also takes the up path; round 3 is then empty)",
    )
    g.add_argument(
        "--remove",
        nargs="+",
        default=None,
        help="source module names to remove this round (e.g. mid_block.attentions.0 mid_block.resnets.1)",
    )
    g = p.add_argument_group("layer KD")
    g.add_argument("--kd_level", choices=["block", "sub_block", "layer"], default="sub_block")
    g.add_argument("--output_weight", type=float, default=0.5)
    g.add_argument("--feature_weight", type=float, default=0.5)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    aspect_buckets.add_args(g)
    args = p.parse_args(argv)
    options.refuse_lora(args, "sdxl_ssd1b_kd trains the whole block-removed student")
    args = options.check_common_args(args, image_method=True)
    if args.round is not None and args.remove is not None:
        raise ValueError("Pass --round (a round of --preset) or --remove (module names), not both.")
    if args.round is not None and not 1 <= args.round <= len(ROUND_GROUPS):
        raise ValueError(
            f"Expected --round in 1..{len(ROUND_GROUPS)} (mid block, down path, up path), got {args.round}."
        )
    if args.round is not None and args.preset is None:
        # our choice: refuse rather than guess the preset from the student's record (a pruned hub UNet has
        # none, and ssd-1b / vega rounds differ), so a round never silently trains with nothing removed
        raise ValueError(
            f"--round {args.round} is round {args.round} of a preset, but no --preset is given (with "
            "--student_model nothing would be removed): add --preset "
            f"{'|'.join(sorted(PRESETS))}, e.g. --preset ssd-1b --round {args.round}."
        )
    for name in ("output_weight", "feature_weight"):  # a negative weight maximises the KD distance
        options.check_range(args, name, low=0, why="0 leaves that KD term out")
    options.check_range(args, "validation_inference_steps", low=1)
    aspect_buckets.check_sizes(args, 8, why="SDXL's VAE factor, as --resolution")
    if args.student_model is None and args.preset is None and args.remove is None:
        args.preset = "ssd-1b"  # a fresh run removes the whole SSD-1B preset, as before rounds existed
    return args


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_ssd1b_kd")
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype)
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)

    # The round: the previous student (or the source), the blocks removed now, the teacher.
    source = parts.unet
    if args.student_model is None:
        previous, chain = source, start_chain(source)
    else:
        previous = sdxl_models.load_unet(args.student_model)
        chain = read_chain(args.student_model, source.config, previous.config)
    student, chain = remove_blocks(
        previous, chain, units_to_remove(args, chain), name=round_name(args, chain), info=round_info(args)
    )
    teacher = source if args.teacher_model is None else sdxl_models.load_unet(args.teacher_model)
    kd_pairs = chain.kd_pairs(args.kd_level, teacher_round=chain.round_of(teacher.config))
    del source, previous  # only the student and the teacher stay (the source may be the teacher)
    parts.unet = None
    for line in chain.summary():
        logger.info(line)
    if accelerator.is_main_process:
        write_chain(chain, Path(args.output_dir))

    sdxl_models.freeze(teacher)
    teacher.to(device, dtype=dtype)
    student.train().requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    # --compile: the blocks of both
    compilation.compile_networks(args, student, teacher, accelerator=accelerator)
    opt = runtime.adamw(student.parameters(), args)
    student, opt = runtime.prepare(accelerator, (student, opt))
    ema = checkpoints.setup_checkpoints(accelerator, args, student)
    kd = LayerKD(
        student,
        teacher,
        kd_pairs,
        output_weight=args.output_weight,
        feature_weight=args.feature_weight,
    )
    data = data_sources.StepData(args, need_images=True)
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x0, prompts = data.latents_batch(gen, parts.vae, device)
        # px (SDXL's VAE: factor 8): --resolution, or the batch's bucket
        size = (8 * x0.shape[-2], 8 * x0.shape[-1])
        cond = sdxl_encoding.unet_conditions(parts, prompts, size, device, dtype, args.cache_dir)
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
    unet_dir = checkpoints.save_unet(accelerator, student, args, ema=ema)
    if accelerator.is_main_process:
        write_chain(chain, unet_dir)
    accelerator.end_training()


# --- The round's plan and its record -----------------------------------------------------------------------


def units_to_remove(args: argparse.Namespace, chain: BlockRemovalChain) -> list[str]:
    """The source units this round removes: ``--remove``; or round ``--round`` of ``--preset`` (the whole preset
    without ``--round``), less what earlier rounds removed; none when neither is given."""
    if args.remove is not None:
        return list(args.remove)  # checked by remove_blocks (unknown names, units already gone)
    if args.preset is None:
        return []
    try:
        if args.round is not None:
            units = split_rounds(chain.source_config, args.preset)[args.round - 1]
        else:
            units = removed_units(chain.source_config, args.preset)
    except ValueError as err:  # the library's OptionError: a preset written for another UNet layout
        cfg = chain.source_config
        raise ValueError(
            f"--preset {args.preset} does not fit this UNet ({len(cfg['down_block_types'])} levels, "
            f"layers_per_block={cfg['layers_per_block']}): {err} The ssd-1b preset lists per-layer depths for "
            "SDXL's layout (3 levels, 2 layers per block); --preset vega and bk-sdm-* use fractions and fit "
            "other layouts."
        ) from err
    gone = chain.removed
    left = [u for u in units if not any(u == g or u.startswith(g + ".") for g in gone)]
    if len(left) < len(units):
        logger.warning("%d of the preset's units are already gone (earlier rounds)", len(units) - len(left))
    return left


def round_name(args: argparse.Namespace, chain: BlockRemovalChain) -> str:
    k = len(chain.rounds) + 1
    if args.remove is not None:
        return f"round {k}: --remove"
    if args.preset is None:
        return f"round {k}: no removal"
    return f"round {k}: {args.preset}" + ("" if args.round is None else f" round {args.round}")


def round_info(args: argparse.Namespace) -> dict[str, Any]:
    """What the record keeps about the round's training: the teacher and the schedule."""
    teacher = args.teacher_model or args.pretrained_model_name_or_path
    return {
        "teacher": str(Path(teacher).resolve()) if Path(teacher).exists() else teacher,
        "max_train_steps": args.max_train_steps,
        "learning_rate": args.learning_rate,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "kd_level": args.kd_level,
    }


def read_chain(student_model: str, source_config: Any, student_config: Any) -> BlockRemovalChain:
    """The student's record (``block_removal.json`` in its UNet folder), or its history inferred from the configs."""
    root = Path(student_model)
    for path in (root / RECORD, root / "unet" / RECORD):
        if path.is_file():
            return BlockRemovalChain.from_dict(json.loads(path.read_text()))
    logger.warning(
        "%s has no %s: its rounds are inferred from its config (which transformer layers it kept is assumed)",
        student_model,
        RECORD,
    )
    return infer_chain(dict(source_config), dict(student_config))


def write_chain(chain: BlockRemovalChain, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).write_text(json.dumps(chain.to_dict(), indent=1) + "\n")


if __name__ == "__main__":
    main(parse_args())
