"""Layer-level KD for a block-removed SD3 / FLUX / Qwen-Image / Wan transformer: SSD-1B's recipe on flow transformers.

Gupta et al., "Progressive Knowledge Distillation of Stable Diffusion XL using Layer Level Loss", 2024
(arXiv:2401.02677; SSD-1B / Segmind-Vega) is the recipe; :mod:`examples.sdxl_ssd1b_kd` is its SDXL script, this
is the same method on the transformers of SD3 / SD3.5 (``SD3Transformer2DModel``: joint blocks), FLUX.1
(``FluxTransformer2DModel``: double-stream then single-stream blocks) and Qwen-Image
(``QwenImageTransformer2DModel``: double-stream blocks; its teacher CFG with the pipeline's renormalisation):

1. The student (:func:`diffdistill.students.build_transformer_student`): the teacher's transformer with whole
   blocks removed, ``--preset`` (:data:`~diffdistill.students.TRANSFORMER_PRESETS`: ``flux-mini``,
   ``flux-lite-8b``, ``sd3-half``, ``sd3-early``, ``qwen-half``) or explicit ``--keep_blocks`` / ``--keep_single_blocks``
   indices; every kept block (and every other module) starts from the teacher's weights. The removal report
   (blocks kept and removed, the student -> teacher block map, parameters and FLOPs of both at the training
   resolution and text length) is written as ``transformer_block_removal.json`` into ``--output_dir`` before
   training and beside the final ``transformer/config.json``.
2. The loss (:class:`diffdistill.students.LayerKD`) on the same noisy latents for teacher and student:
   task loss + ``--output_weight`` x output KD + ``--feature_weight`` x feature KD, all mean squared errors.
   Task: the conditional flow-matching loss ``|v_S - (eps - x0)|^2`` (Esser et al. 2024, SD3, Sec. 3) on
   image-caption data (``--train_data_dir``) or, prompt-only (``--prompts_file``), on the teacher's own samples of
   the prompts (made once with the teacher's pipeline sampler and CFG, ``--sample_guidance_scale`` default the
   pipeline's, and cached in shards that record their settings: ``training.flow_teacher_samples``, LADD's data; our
   choice where no data set is at hand: SSD-1B trains on real images),
   ``x_sigma = (1 - sigma) x0 + sigma eps``, sigma drawn from SD3's
   densities on the model's shifted table (:func:`diffdistill.schedulers.flow_density_timesteps`: the
   logit-normal by default, SD3 Sec. 3.1 / Table 1; SD3 its static shift 3, FLUX the resolution's ``mu``).
   Multi-aspect (``--aspect_buckets HxW ...``, ``training.aspect_buckets``): each image cropped to the size nearest
   its aspect ratio, or prompt-only the teacher samples made at the sizes (as LADD's); each batch of one size and
   noised on that size's schedule (FLUX's / Qwen-Image's ``mu``); our choice, SSD-1B has no buckets (the removal
   report counts FLOPs at ``--resolution``; Wan clips take one size).
   Output KD: student velocity vs the teacher's velocity (with the teacher's CFG at
   ``--teacher_guidance_scale`` > 1, or FLUX.1-dev's embedded ``--guidance`` given to both). Feature KD: each
   student block's image stream vs that of the teacher block it maps to
   (:meth:`~diffdistill.students.TransformerBlockRemovalReport.kd_pairs`; joint blocks return ``(text, image)``
   and only the image tokens are compared, :data:`~diffdistill.students.IMAGE_STREAM_OUTPUT`).
3. The whole student trains (a new architecture: no LoRA); the result is a ``transformer/`` folder that
   ``SD3Transformer2DModel.from_pretrained`` / ``FluxTransformer2DModel.from_pretrained`` loads and the diffusers
   pipeline runs with (``StableDiffusion3Pipeline.from_pretrained(MODEL, transformer=student)``).

Recipe. What is the paper's (SSD-1B) and what is ours:

- Loss: task + output KD + feature KD, raw MSE terms, weights 0.5 / 0.5: as SSD-1B (Segmind's
  ``distill_sdxl.py``, the weights of the SDXL script). ``--normalize_features`` divides each feature term by the
  teacher feature's mean square (our choice, off by default: transformer hidden states carry a few very large
  activations, TinyFusion's "massive activations", so raw terms can be dominated by a few channels).
- Which teacher block a student block matches: the one it was initialised from (``--kd_target source``), as
  Flux-Mini's feature alignment (student block x to teacher block 4x, TencentARC/flux-mini README);
  ``--kd_target span_end``: the last teacher block of the span it replaces (our choice).
- Architectures: ``flux-mini`` is Flux-Mini's (5 + 10 blocks, 3.2 B); ``flux-lite-8b`` the depths of Freepik's
  Flux.1-Lite-8B as inferred from its size (which 8 double blocks: our choice); ``sd3-half`` / ``sd3-early`` are
  our choices (TinyFusion's depth ratio; HierarchicalPrune's keep-early rule): see
  :mod:`diffdistill.students.transformer_block_removal`.
- Teacher and student on the same noisy latents, teacher one conditional pass without gradients: as SSD-1B.
  Teacher CFG in the output-KD target (``--teacher_guidance_scale`` > 1): our choice, off by default (SSD-1B's
  teacher is conditional only, so the student stays a model sampled with CFG); the feature targets are always
  the conditional pass's. FLUX.1-dev (guidance-distilled): teacher and student both take the embedded
  ``--guidance`` (3.5, as diffusers' FLUX DreamBooth script trains), so the student keeps FLUX.1-dev's
  guidance input.
- Timesteps: SD3's logit-normal(0, 1) on the shifted table (``--weighting_scheme``, as diffusers' SD3 script);
  for FLUX our choice (diffusers' FLUX script samples uniformly: ``--weighting_scheme uniform``).
- Removal in rounds (SSD-1B's "progressive" removal), a curated data set, the published models' own training
  details (Flux-Mini's and Flux.1-Lite-8B's steps, data, learning rates): not implemented / not published.
- Optimisation: AdamW, learning rate 1e-5 (SSD-1B's card), constant; EMA optional (our choice).

Wan (2.1, 2.2 TI2V-5B; ``WanTransformer3DModel``): on video clips (``--train_data_dir``,
:class:`training.caption_folders.VideoCaptionFolder`: each clip's first ``--num_frames`` frames at ``--resolution`` x
``--width``) or prompt-only on the teacher's videos, the ``wan-half`` preset or ``--keep_blocks``; the report counts FLOPs on the videos' latents (frames, height, width).
Wan 2.2 A14B (two experts): one expert per run (``--expert transformer`` or ``transformer_2``), our choice, as each
expert was trained on its own noise range: the teacher is that expert, the student its block-removed copy, the
timesteps those ``WanPipeline`` runs it at (``t >= boundary_ratio x 1000`` for the high-noise ``transformer``, below
for ``transformer_2``; the density restricted to that range by rejection), the clean latents the whole A14B
teacher's (both experts, ``--sample_guidance_scale`` 4.0 / ``--sample_guidance_scale_2`` 3.0 prompt-only); validation
samples with the student in place of its expert; saved as ``OUTPUT_DIR/transformer`` or ``OUTPUT_DIR/transformer_2``
(``WanPipeline.from_pretrained(BASE, transformer_2=WanTransformer3DModel.from_pretrained(OUT / "transformer_2"))``).

Engines: as the SDXL scripts (one process, DDP, FSDP2, DeepSpeed ZeRO-2; bf16 with the frozen teacher in bf16 and
the student's float32 weights under autocast; ``--gradient_checkpointing`` on the student, whose taps record
only the real forward, not the recomputation). Under FSDP2 the frozen teacher is sharded as well
(``runtime.shard_frozen_teacher``: 1/N of it on each process, FLUX.1 22 GiB whole; A14B each expert), once the teacher
samples are made (each process makes its share with the whole teacher): every process then makes the same teacher
calls (the KD forward of each micro-batch; A14B's validation through both experts), as the all-gathers need. On 2 CPU processes DDP and FSDP2 made the same two steps as one
process accumulating the same two micro-batches (the suite checks both; bit-identical on the tiny FLUX).

Example (FLUX.1-dev -> Flux-Mini's architecture)::

    accelerate launch examples/flow_kd.py --preset flux-mini \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --train_data_dir data/images \\
        --output_dir out/flux-mini --resolution 1024 --mixed_precision bf16 --gradient_checkpointing \\
        --train_batch_size 4 --learning_rate 1e-5 --max_train_steps 50000 --use_ema \\
        --validation_prompts "a photo of a cat" --validation_steps 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.schedulers import DENSITY_SCHEMES, flow_density_timesteps, flow_pipeline_grid
from diffdistill.students import (
    TRANSFORMER_PRESETS,
    LayerKD,
    TransformerBlockRemovalReport,
    TransformerBlockRemovalSpec,
    build_transformer_student,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    aspect_buckets,
    checkpoints,
    compilation,
    data_sources,
    flow_encoding,
    flow_families,
    flow_models,
    flow_options,
    flow_teacher_samples,
    flow_validation,
    loop,
    options,
    runtime,
    sdxl_models,
    teacher_pairs,
    wan_experts,
)

logger = logging.getLogger("flow_kd")

REPORT = "transformer_block_removal.json"  # the removal report, beside the student's config.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-5)
    flow_options.add_flow_args(p)
    g = p.add_argument_group("block removal")
    g.add_argument(
        "--preset",
        choices=sorted(TRANSFORMER_PRESETS),
        default=None,
        help="the student architecture (flux-* for FLUX, sd3-* for SD3 / SD3.5); or --keep_blocks",
    )
    g.add_argument(
        "--keep_blocks",
        type=int,
        nargs="+",
        default=None,
        help="teacher indices of the joint (SD3) / double-stream (FLUX) blocks the student keeps",
    )
    g.add_argument(
        "--keep_single_blocks",
        type=int,
        nargs="+",
        default=None,
        help="FLUX: teacher indices of the single-stream blocks kept (default with --keep_blocks: all)",
    )
    g.add_argument(
        "--expert",
        choices=list(wan_experts.EXPERTS),
        default=None,
        help="Wan 2.2 A14B (needed): the expert this run distils into a block-removed student, on the timesteps it "
        "runs (transformer: high noise, t >= the boundary; transformer_2: below); one run per expert",
    )
    g = p.add_argument_group("layer KD")
    g.add_argument("--output_weight", type=float, default=0.5, help="output KD weight (SSD-1B: 0.5)")
    g.add_argument("--feature_weight", type=float, default=0.5, help="feature KD weight (SSD-1B: 0.5)")
    g.add_argument(
        "--normalize_features",
        action="store_true",
        help="divide each feature term by the teacher feature's mean square (default: raw MSE, as SSD-1B)",
    )
    g.add_argument(
        "--kd_target",
        choices=["source", "span_end"],
        default="source",
        help="the teacher block a student block matches: the one it was initialised from (Flux-Mini), or "
        "the last of the span it replaces",
    )
    g.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=1.0,
        help="CFG scale of the teacher's output-KD target (1: conditional only, as SSD-1B); not for a "
        "guidance-distilled FLUX (it takes --guidance)",
    )
    g = p.add_argument_group("teacher samples (prompt-only: --prompts_file instead of --train_data_dir)")
    flow_teacher_samples.add_args(g)
    g.add_argument(
        "--sample_guidance_scale",
        type=float,
        default=None,
        help="SD3 / Qwen-Image / Wan: CFG of the teacher samples (default: the pipeline's, 7.0 / 4.0 / 5.0; Wan 2.2 "
        "A14B 4.0 where its high-noise expert runs); refused for FLUX (FLUX.1-dev samples with --guidance)",
    )
    g.add_argument(
        "--sample_guidance_scale_2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the teacher samples' CFG where the low-noise expert runs (default: "
        "--sample_guidance_scale when given, as WanPipeline, else 3.0)",
    )
    g = p.add_argument_group("timesteps and validation")
    g.add_argument(
        "--weighting_scheme",
        choices=list(DENSITY_SCHEMES),
        default="logit_normal",
        help="density of the training sigmas on the model's shifted table (SD3 Sec. 3.1; diffusers' SD3 script: "
        "logit_normal, its FLUX script: uniform)",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit-normal mean (diffusers' sign)")
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the 'mode' density (SD3: 1.29)")
    g.add_argument("--validation_inference_steps", type=int, default=28, help="the pipelines' default: 28")
    g.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=None,
        help="CFG scale of the validation grid; default: the pipeline's (SD3 7.0; FLUX 1, i.e. FluxPipeline's "
        "true_cfg_scale); a guidance-distilled FLUX samples with its embedded --guidance and refuses this",
    )
    args = p.parse_args(argv)
    options.refuse_lora(args, "flow_kd trains the whole block-removed student (a new architecture)")
    args = flow_options.check_flow_values(options.check_common_args(args, image_method=True))
    if args.preset is not None and (args.keep_blocks is not None or args.keep_single_blocks is not None):
        raise ValueError("Pass --preset or --keep_blocks / --keep_single_blocks, not both.")
    if args.preset is None and args.keep_blocks is None and args.keep_single_blocks is None:
        raise ValueError(
            f"Choose the student: --preset ({', '.join(sorted(TRANSFORMER_PRESETS))}) or --keep_blocks I J ... "
            "(and for FLUX --keep_single_blocks)."
        )
    if bool(args.train_data_dir) == bool(args.prompts_file):
        raise ValueError(
            "Pass --train_data_dir (images, or Wan clips, with .txt captions) or --prompts_file (prompt-only: the teacher's own "
            "samples of the prompts, made once and cached), one of them."
        )
    flow_teacher_samples.check_args(args)
    for name in ("sample_guidance_scale", "sample_guidance_scale_2"):
        value = getattr(args, name)
        if value is not None and not (args.prompts_file and value >= 1):
            raise ValueError(
                f"--{name} is a CFG (>= 1) of the teacher samples of a prompt-only run (--prompts_file), but got "
                f"{value}{'' if args.prompts_file else ' without --prompts_file'}."
            )
    variant = flow_options.local_variant(args)
    if variant is not None:  # a local pipeline folder: its family's student plan is checked before any load
        check_experts(args, variant)
        removal_spec(args, flow_families.family_of(variant))
    for name in ("output_weight", "feature_weight"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"Expected --{name} >= 0, but got {getattr(args, name)}.")
    if not args.teacher_guidance_scale >= 1.0:
        raise ValueError(
            f"Expected --teacher_guidance_scale >= 1 (1: the conditional teacher), but got "
            f"{args.teacher_guidance_scale}."
        )
    if args.validation_guidance_scale is not None and not args.validation_guidance_scale >= 1.0:
        raise ValueError(
            f"Expected --validation_guidance_scale >= 1 (1: no classifier-free guidance), but got "
            f"{args.validation_guidance_scale}."
        )
    options.check_range(args, "validation_inference_steps", low=1)
    return args


def check_experts(args: argparse.Namespace, variant: str | None) -> None:
    """Wan 2.2 A14B needs ``--expert`` (one block-removed expert per run); other models refuse it (``ValueError``)."""
    if variant == "wan-a14b" and args.expert is None:
        raise ValueError(
            "Wan 2.2 A14B is two experts: pass --expert transformer (high noise) or --expert transformer_2 (low "
            "noise); each run distils one expert into a block-removed student on the timesteps it runs."
        )
    if variant != "wan-a14b" and args.expert is not None:
        raise ValueError(
            f"--expert {args.expert} picks a Wan 2.2 A14B expert, but this model has one: drop it."
        )


def latent_size(args: argparse.Namespace, parts: flow_models.FlowComponents) -> Any:
    """The latent size the removal report counts FLOPs at: Wan's ``(frames, height, width)``, an image model's
    latent height (the count is for square latents: a ``--width`` run is counted at ``--resolution`` squared)."""
    shape = flow_models.latent_shape(parts, 1, args.resolution, args.num_frames, args.width)
    return tuple(shape[2:]) if parts.is_video else shape[2]


def sample_guidance(args: argparse.Namespace, parts: flow_models.FlowComponents) -> float | None:
    """The teacher samples' CFG (prompt-only runs): ``--sample_guidance_scale``, else the pipeline's; None for
    FLUX (FLUX.1-dev samples with its embedded ``--guidance``), which refuses the option (``ValueError``)."""
    if not parts.uses_cfg:
        if args.sample_guidance_scale is not None:
            raise ValueError(
                f"--sample_guidance_scale is the CFG of the teacher samples; {parts.name} has no unconditional pass "
                "(FLUX.1-dev samples with its embedded --guidance): drop it."
            )
        return None
    if args.sample_guidance_scale is not None:
        return float(args.sample_guidance_scale)
    return flow_families.default_guidance_scale(parts.variant)


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "flow_kd")
    parts = flow_models.load_flow(args)
    flow_options.check_flow_args(args, parts)
    check_experts(args, parts.variant)  # a hub id's variant is known once it is loaded
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    flow_models.place_frozen(parts, device, dtype)
    schedule = flow_models.flow_schedule(
        parts, args.resolution, width=args.width
    )  # the model's shift at this size (validation); training: each batch's bucket
    schedules = aspect_buckets.BucketSchedules(parts, args)

    # The student: the teacher's transformer less the removed blocks, kept blocks copied from the teacher.
    # Wan 2.2 A14B: the teacher is the expert --expert; the pipeline (samples, validation) keeps both experts.
    experts = parts.transformer if parts.has_experts else None
    teacher = parts.transformer if experts is None else getattr(experts, args.expert)
    check_guidance(args, teacher)
    uncond = flow_encoding.uncond_conditions(parts, args, device, dtype)
    student, report = build_transformer_student(
        teacher,
        removal_spec(args, parts.family),
        latent_size=latent_size(args, parts),
        text_tokens=int(uncond["encoder_hidden_states"].shape[1]),
    )
    record = report_record(report, args, parts.family)
    if experts is not None:
        record["expert"] = args.expert
    val_scale = validation_guidance(args, parts)  # before the pipeline's transformer is let go
    for note in report.notes:
        logger.info(note)
    if accelerator.is_main_process:
        write_report(record, Path(args.output_dir))
    parts.transformer = None

    frozen_teacher = teacher if experts is None else experts  # A14B: both experts (samples, validation)
    sdxl_models.freeze(frozen_teacher)
    sdxl_models.to_frozen_dtype(frozen_teacher, device, dtype)
    student.to(device).train().requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    # --compile: the blocks of both
    compilation.compile_networks(args, student, teacher, accelerator=accelerator)
    opt = runtime.adamw(student.parameters(), args)
    student, opt = runtime.prepare(accelerator, (student, opt))
    ema = checkpoints.setup_checkpoints(accelerator, args, student)

    # Both transformers as denoisers of (B, C, h, w) latents (FLUX packing inside), tapped at the mapped blocks.
    student_net = flow_models.FlowDenoiser(student, parts.family, guidance=args.guidance)
    teacher_net = flow_models.FlowDenoiser(teacher, parts.family, guidance=args.guidance)
    if (
        args.prompts_file
    ):  # prompt-only: the teacher's own samples (made once, cached in shards; before the taps)
        scale = sample_guidance(args, parts)
        scale_2 = flow_families.check_expert_scale(
            parts, "--sample_guidance_scale_2", args.sample_guidance_scale_2, args.sample_guidance_scale
        )
        sampler = teacher_net if experts is None else flow_models.FlowDenoiser(experts, parts.family)
        shards = flow_teacher_samples.generate_teacher_samples(
            accelerator, args, parts, sampler, scale, scale_2
        )
        data: Any = teacher_pairs.PairShards(shards, args.train_batch_size, args.dataloader_num_workers)
    else:
        data = data_sources.StepData(args, need_images=True)
    # FSDP2: the frozen teacher sharded over the processes, after the samples each process made its share of (the
    # all-gathers need every process's calls); A14B: each expert its own root (training calls one expert directly)
    for module in [teacher] if experts is None else [experts.transformer, experts.transformer_2]:
        runtime.shard_frozen_teacher(accelerator, module)
    pairs, prefix = denoiser_pairs(
        report.kd_pairs(args.kd_target),
        (student_net, accelerator.unwrap_model(student)),
        (teacher_net, teacher),
    )
    kd = LayerKD(
        student_net,
        teacher_net,
        pairs,
        output_weight=args.output_weight,
        feature_weight=args.feature_weight,
        normalize=args.normalize_features,
    )
    rescale = flow_families.guidance_rescale(parts.family)
    teacher_fn = guided_teacher(teacher_net, uncond, args.teacher_guidance_scale, rescale)
    global_step = checkpoints.resume(accelerator, args)

    def clean_batch(gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """The step's clean latents and prompts: encoded images, or teacher samples (prompt-only)."""
        if args.prompts_file:
            _, x0, prompts = data.batch(gen)
            return x0.to(device), prompts
        return data.latents_batch(gen, parts.vae, device)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x0, prompts = clean_batch(gen)
        schedule = schedules(x0)  # at the batch's size (--aspect_buckets; else --resolution x --width)
        cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
        noise = torch.randn(x0.shape, generator=gen).to(device)

        def draw(n: int) -> torch.Tensor:
            return flow_density_timesteps(
                n,
                args.weighting_scheme,
                logit_mean=args.logit_mean,
                logit_std=args.logit_std,
                mode_scale=args.mode_scale,
                num_train_timesteps=schedule.num_train_timesteps,
                generator=gen,
            ).t

        if experts is None:
            t = draw(x0.shape[0]).to(device)
        else:  # the expert's range only: the timesteps WanPipeline runs it at
            boundary = experts.boundary_timestep
            t = wan_experts.expert_timesteps(
                draw, schedule.model_timestep, args.expert, boundary, x0.shape[0]
            )
            t = t.to(device)
        x_t = schedule.add_noise(x0, noise, t)  # (1 - sigma) x0 + sigma eps
        target = noise - x0  # the flow-matching velocity (SD3 Sec. 3)
        with accelerator.accumulate(student), runtime.autocast(accelerator):
            loss, logs = kd(x_t, schedule.model_timestep(t), target, teacher_fn=teacher_fn, **cond)
            runtime.backward(accelerator, loss, student)
            runtime.clip_and_step(accelerator, opt, student.parameters(), args.max_grad_norm)
        return {k.replace(prefix, ""): v for k, v in logs.items()}  # feature/<student block>

    def validate(step: int) -> None:
        trained = accelerator.unwrap_model(student)
        if experts is not None:  # the student in place of its expert, the other expert the teacher's
            trained = wan_experts.with_expert(experts, args.expert, trained)
        model = flow_models.FlowDenoiser(trained, parts.family, guidance=args.guidance)
        grid = flow_pipeline_grid(
            schedule, args.validation_inference_steps, pipeline=flow_families.pipeline_grid(parts.family)
        )
        sigmas = [float(s) for s in grid.sigmas[:-1]]

        def sample(z: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            return flow_models.euler_sample(guided(model, uncond, val_scale, rescale), z, sigmas, c)

        flow_validation.log_validation(accelerator, args, parts, sample, step)

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    kd.close()
    if experts is None:
        folder = flow_models.save_transformer(accelerator, student, args, parts, ema=ema)
    else:  # OUTPUT_DIR/transformer or OUTPUT_DIR/transformer_2: the WanPipeline component it replaces
        folder = checkpoints.save_unet(accelerator, student, args, args.expert, ema=ema)
    if accelerator.is_main_process:
        write_report(record, folder)
    accelerator.end_training()


# --- The student's plan, its record and the teacher's target ---------------------------------------------------


def removal_spec(args: argparse.Namespace, family: str) -> str | TransformerBlockRemovalSpec:
    """``--preset`` (checked against the model family), or the explicit ``--keep_blocks`` /
    ``--keep_single_blocks`` as a spec (``None``: every block of that kind kept)."""
    if args.preset is not None:
        wanted = args.preset.split("-")[0]  # the family a preset is named after
        if wanted != family:
            fits = sorted(n for n in TRANSFORMER_PRESETS if n.startswith(family))
            raise ValueError(
                f"--preset {args.preset} is for {wanted.upper()} transformers, but "
                f"{args.pretrained_model_name_or_path} is a {family.upper()} pipeline: use one of {fits}."
            )
        return args.preset
    if family != "flux" and args.keep_single_blocks is not None:
        raise ValueError(
            f"--keep_single_blocks applies to FLUX only: {family.upper()} has one block list (--keep_blocks)."
        )
    return TransformerBlockRemovalSpec(
        name="custom",
        blocks=None if args.keep_blocks is None else tuple(args.keep_blocks),
        single_blocks=None if args.keep_single_blocks is None else tuple(args.keep_single_blocks),
    )


def report_record(
    report: TransformerBlockRemovalReport, args: argparse.Namespace, family: str
) -> dict[str, Any]:
    """The removal report (:meth:`TransformerBlockRemovalReport.to_dict`: spec, student config, block map, removed
    blocks, parameters and FLOPs) plus the run's teacher, family and the KD pairs it trained on."""
    teacher = args.pretrained_model_name_or_path
    return {
        **report.to_dict(),
        "family": family,
        "teacher": str(Path(teacher).resolve()) if Path(teacher).exists() else teacher,
        "kd_target": args.kd_target,
        "kd_pairs": report.kd_pairs(args.kd_target),
    }


def write_report(record: dict[str, Any], folder: Path) -> None:
    """The record of :func:`report_record` as JSON (``transformer_block_removal.json``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT).write_text(json.dumps(record, indent=1) + "\n")


def denoiser_pairs(
    pairs: dict[str, str], student: tuple[Any, Any], teacher: tuple[Any, Any]
) -> tuple[dict[str, str], str]:
    """The report's ``{teacher block: student block}`` as module names inside the two denoisers, each given as
    ``(denoiser, its transformer unwrapped)``: the transformer sits in the denoiser as ``transformer``, under an
    accelerate wrapper as ``transformer.module``. Returns the pairs and the student's prefix."""
    s_prefix, t_prefix = (module_prefix(net, inner) for net, inner in (student, teacher))
    return {t_prefix + t: s_prefix + s for t, s in pairs.items()}, s_prefix


def module_prefix(net: Any, inner: Any) -> str:
    """The name of ``inner`` inside ``net`` plus a dot, e.g. ``"transformer."``."""
    return next(name for name, module in net.named_modules() if module is inner) + "."


def guided(net: Any, uncond: dict[str, torch.Tensor], scale: Any, rescale: Any = None) -> Any:
    """``net`` with classifier-free guidance ``u + scale (c - u)`` (``scale`` 1: ``net`` itself; a callable of the
    timestep: a guidance schedule, e.g. Wan 2.2 A14B's per expert), then the family's ``rescale(guided, c)`` if given
    (:func:`training.flow_families.guidance_rescale`); the unconditional pass runs first, so features a tap records
    are the conditional pass's."""
    if not callable(scale) and scale == 1.0:
        return net

    def call(sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
        b = sample.shape[0]
        u = net(sample, timestep, **{k: v.expand(b, *v.shape[1:]) for k, v in uncond.items()})
        c = net(sample, timestep, **cond)
        w = scale(torch.as_tensor(timestep, device=sample.device).expand(b)) if callable(scale) else scale
        if isinstance(w, torch.Tensor):
            w = w.to(c.dtype).view(-1, *(1,) * (c.ndim - 1))
        out = u + w * (c - u)
        return out if rescale is None else rescale(out, c)

    return call


def guided_teacher(net: Any, uncond: dict[str, torch.Tensor], scale: float, rescale: Any = None) -> Any:
    """The teacher call of :class:`LayerKD`: conditional only (``scale`` 1, SSD-1B), or with CFG."""
    return None if scale == 1.0 else guided(net, uncond, scale, rescale)


def check_guidance(args: argparse.Namespace, transformer: Any) -> None:
    """Refuse CFG on a guidance-distilled FLUX (FLUX.1-dev takes its guidance as an input, reference/flow.md §6)."""
    if not getattr(transformer.config, "guidance_embeds", False):
        return
    for name in ("teacher_guidance_scale", "validation_guidance_scale"):
        value = getattr(args, name)
        if value is not None and value != 1.0:
            raise ValueError(
                "This FLUX transformer is guidance-distilled (guidance_embeds, FLUX.1-dev): its guidance is an "
                f"input, not CFG. Drop --{name} {value} and set --guidance instead."
            )


def validation_guidance(args: argparse.Namespace, parts: flow_models.FlowComponents) -> Any:
    """The validation grid's CFG scale: ``--validation_guidance_scale``, else the pipeline's default
    (``StableDiffusion3Pipeline`` 7.0, ``QwenImagePipeline``'s ``true_cfg_scale`` 4.0; ``FluxPipeline``'s
    ``true_cfg_scale`` 1, i.e. none: FLUX.1-dev samples with its embedded ``--guidance``, FLUX.1-schnell
    unguided). Wan 2.2 A14B: ``WanPipeline``'s per-expert schedule, that scale (default 4.0) where the high-noise
    expert runs and 3.0 below (the given scale when one is given, as the pipeline)."""
    if parts.has_experts:
        high = args.validation_guidance_scale or flow_families.default_guidance_scale(parts.variant)
        low = args.validation_guidance_scale or flow_families.DEFAULT_GUIDANCE_SCALE_2[parts.variant]
        return flow_families.expert_guidance(parts, high, low)
    if args.validation_guidance_scale is not None:
        return float(args.validation_guidance_scale)
    return flow_families.DEFAULT_GUIDANCE_SCALE.get(parts.family, 1.0)


if __name__ == "__main__":
    main(parse_args())
