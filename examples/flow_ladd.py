"""LADD: latent adversarial diffusion distillation of SD3, FLUX.1, Qwen-Image or Wan (2.1, 2.2) into a 1-4 step student.

Sauer, Boesel, Dockhorn, Blattmann, Esser, Rombach, "Fast High-Resolution Image Synthesis with Latent
Adversarial Diffusion Distillation", 2024 (arXiv:2403.12015; SD3-Turbo). The discriminator is built on the
*generative* features of the frozen teacher: the teacher transformer runs on re-noised latents and small heads
on every k-th block's image tokens, conditioned on the noise level and the pooled text embedding, give patch
logits (:class:`diffdistill.discriminators.LADDDiscriminator`). There is no distillation (regression) loss: the
student learns from the adversarial term alone, on synthetic data made by the teacher.

One optimisation step (``train_step``):

1. a batch of the teacher's own samples ``x0`` (latents) and their prompts (synthetic data, as the paper);
2. the student's noise level ``sigma`` from ``--student_sigmas`` (default 1, 0.75, 0.5, 0.25) drawn with
   ``--student_sigma_weights`` (default 0.7, 0.1, 0.1, 0.1: biased toward pure noise, as the paper's
   re-implementations describe it); input ``x_sigma = (1 - sigma) x0 + sigma eps`` (pure noise at sigma 1) and
   its clean prediction ``x0_hat = x_sigma - sigma v`` (one transformer call);
3. both ``x0`` and ``x0_hat`` re-noised with one ``sigma_hat`` per sample from the logit-normal shifted toward
   high noise (:func:`diffdistill.discriminators.ladd_renoise_sigma`, ``--renoise_mean 1 --renoise_std 1``) and
   one shared ``eps'``;
4. generator update: ``--gan_loss`` (hinge by default, as the paper; or non-saturating) of the discriminator's
   logits on the student's re-noised sample, gradients reaching the student through the frozen teacher's
   blocks; then the discriminator update on real vs detached fake, plus an optional R1 penalty
   (``--r1_gamma`` with ``--r1_approximate_sigma``: the finite-difference R1 of Lin et al. 2025, as NVlabs'
   FastGen LADD uses it with sigma 0.1; the exact R1 would differentiate the teacher's attention twice, which
   PyTorch's fused attention kernels do not support, so it is refused).

Synthetic data (our choice: generated once and cached): before training every process writes its share of
``--num_teacher_samples`` teacher samples to ``--teacher_samples_dir`` (default ``OUTPUT_DIR/teacher_samples``)
in shards that record their settings (model, steps, guidance, resolution, T5 length, prompts, seed); a later run
reuses matching shards and refuses stale ones. The teacher samples the way its diffusers pipeline does
(``flow_pipeline_grid``: SD3's default grid, FLUX's ``linspace(1, 1/N, N)`` shifted by the resolution's
``mu``; ``--teacher_steps`` Euler steps; SD3 with classifier-free guidance ``--teacher_guidance_scale`` against
the encoded empty prompt, FLUX.1-dev with its embedded ``--guidance``; Wan 2.1: ``WanPipeline`` itself, its
UniPC multistep solver, which our first-order samplers do not reproduce, with CFG 5.0; Qwen-Image:
``QwenImagePipeline`` itself, true CFG 4.0 against ``" "`` with its renormalisation). A teacher trajectory per
training step would cost ``--teacher_steps`` (x2 with CFG) teacher calls per sample and step, several times the step itself;
cached samples are drawn again across epochs.

Multi-aspect training (the paper trains SD3-Turbo at several aspect ratios): ``--aspect_buckets HxW ...`` makes
shard ``i`` of the teacher samples at the ``(i mod K)``-th size (FLUX's ``mu`` of that size's token count), and
each batch holds samples of one size: a size drawn with probability proportional to its samples, then samples
within it, so every sample is drawn as often as without buckets (``training.aspect_buckets``). The student,
the teacher's features and the heads (convolutions over the token grid) take any size; the student's sigmas
and the re-noising need no shift. Processes draw their sizes independently (DDP / FSDP2 synchronise gradients,
not shapes); ``--compile`` compiles each block again for a new size. Validation samples at ``--resolution`` x
``--width``.

The student samples on the explicit grid ``--student_sigmas`` (Euler, ``sigma -> next sigma -> 0``), unguided
(FLUX.1-dev keeps its embedded ``--guidance`` input). To sample with the diffusers pipeline::

    pipe = StableDiffusion3Pipeline.from_pretrained(BASE)   # or FluxPipeline
    pipe.load_lora_weights(OUTPUT_DIR)                       # or the full OUTPUT_DIR/transformer
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    image = pipe(prompt, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0).images[0]  # FLUX.1-dev: 3.5

(the saved scheduler has shift 1 and no dynamic shifting, so the pipeline keeps the sigmas as given;
reference/flow.md pitfall 5; the grid is also written to ``OUTPUT_DIR/student_sigmas.json``, which
``examples/evaluate.py`` samples on by default). ``--use_lora`` trains a LoRA on the attention and feed-forward linears
(``training.flow_families.lora_targets``), otherwise the whole transformer.

Wan 2.1 text-to-video (``WanPipeline``): the same method on video latents (``--num_frames``); the heads take the
mean prompt token as their text condition (``text_pooling="mean"``: Wan has no pooled embedding; our choice, FastGen's
Wan LADD heads are unconditioned 3-D heads on blocks 15, 22, 29 of the 1.3B model, ``--discriminator_blocks 15 22
29``). ``WanPipeline`` takes no ``sigmas``: sample the student as the ``flow_dmd2.py`` docstring shows. Wan 2.2 A14B
(two experts, ``--use_lora``: adapters on both, one LoRA file each as ``flow_dmd2.py`` writes them): the teacher
samples are ``WanPipeline``'s with both experts (CFG ``--teacher_guidance_scale`` 4.0 / ``--teacher_guidance_scale_2``
3.0), and the discriminator is one set of heads per expert, each sample judged by the heads on the expert the
pipeline runs at its re-noised level (:class:`training.wan_experts.ExpertDiscriminators`; our choice: the experts'
features differ).

One copy of the transformer with ``--use_lora`` (our choice, for memory: FLUX.1 would hold a second 24 GB bf16
copy): the student is the LoRA adapter of ONE frozen base in the mixed-precision dtype and the teacher (the
synthetic samples, the discriminator's features) is that base with the adapter off
(:class:`diffdistill.students.SharedBase`, ``shared_critics.build``). Gradient checkpointing recomputes the
student's blocks under its adapter (``SharedBase.enable_gradient_checkpointing``) and the discriminator's teacher
blocks, in the generator's backward, with the adapter off, as they ran forward. Full fine-tuning keeps a separate
frozen teacher copy in the mixed-precision dtype. Engines: one process, DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3
through the accelerate config; the student (with ``--use_lora`` its adapter's view) and the discriminator heads
are prepared. With ``--use_lora`` FSDP2 shards the base once (``SharedBase.fully_shard``) and the view shards its
adapter; under DeepSpeed the base stays whole on every process and the student's engine holds the adapter, whose
layers run only inside that engine's forward (the teacher runs them switched off), so no second engine touches
them. A separate teacher copy stays whole on every process. On 2 CPU processes FSDP2 and ZeRO-3 (tested) and
DDP made the same 2 LoRA steps as one process accumulating the same two micro-batches
(``tests/state_compare.py``'s bound); by hand, ZeRO-2 matched DDP to 1.4e-5 of the update and ZeRO-3 exactly.

Fidelity:

========================================  ==============================================================
as the paper (arXiv:2403.12015)           teacher-feature discriminator on the frozen teacher's blocks,
                                          heads conditioned on noise level and pooled text; synthetic
                                          teacher data; no distillation loss; re-noising of real and
                                          fake at a noise level biased toward high noise; hinge loss;
                                          1-4 step student; student noise levels favouring pure noise;
                                          multi-aspect training (``--aspect_buckets``)
our choice (paper details not checked     student sigmas 1 / 0.75 / 0.5 / 0.25 with weights 0.7 / 0.1 /
against its text; the values of the       0.1 / 0.1; logit-normal(1, 1) re-noising; heads on every
re-implementations, reference/flow.md)    ``len(blocks) // 4``-th block; disc lr 10x the student's; the
                                          same ``eps'`` for real and fake; cached teacher samples; R1
                                          off by default (optional, approximate only); the buckets (no
                                          default list: one size unless given) and their share of the
                                          shards (round robin), one size per batch
not implemented                           DPO-LoRA finetuning; image editing / inpainting variants
========================================  ==============================================================

Example::

    accelerate launch examples/flow_ladd.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --prompts_file prompts.txt --output_dir out/ladd-sd35m --use_lora --lora_rank 64 \\
        --resolution 1024 --mixed_precision bf16 --gradient_checkpointing --train_batch_size 2 \\
        --num_teacher_samples 20000 --teacher_steps 28 --max_train_steps 5000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.discriminators import ladd_renoise_sigma
from diffdistill.losses import (
    approximate_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
)
from diffdistill.students import frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    checkpoints,
    compilation,
    flow_critics,
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
    shared_critics,
    student_sampler,
    teacher_pairs,
)

logger = logging.getLogger("flow_ladd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-6)
    flow_options.add_flow_args(p)
    g = p.add_argument_group("LADD")
    g.add_argument("--student_sigmas", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    g.add_argument(
        "--student_sigma_weights",
        type=float,
        nargs="+",
        default=None,
        help="probabilities of --student_sigmas in training (default: 0.7 for the first, the rest shared evenly)",
    )
    g.add_argument(
        "--renoise_mean", type=float, default=1.0, help="logit-normal mean of the re-noising sigma"
    )
    g.add_argument("--renoise_std", type=float, default=1.0, help="logit-normal std of the re-noising sigma")
    g.add_argument("--gan_loss", choices=["hinge", "non_saturating"], default="hinge")
    flow_options.add_ladd_head_args(g, lr_help="default 10x --learning_rate")
    g.add_argument("--r1_gamma", type=float, default=0.0, help="R1 weight on the real inputs (0: off)")
    g.add_argument(
        "--r1_approximate_sigma",
        type=float,
        default=None,
        help="finite-difference R1 with this perturbation (FastGen LADD: 0.1); needed by --r1_gamma > 0",
    )
    g = p.add_argument_group("teacher samples")
    flow_teacher_samples.add_args(g)
    g.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=None,
        help="SD3 / Qwen-Image / Wan: classifier-free guidance of the teacher samples (default: the pipeline's, "
        "7.0 / 4.0 / 5.0; Wan 2.2 A14B 4.0 where its high-noise expert runs); refused for FLUX (its guidance is "
        "--guidance)",
    )
    g.add_argument(
        "--teacher_guidance_scale_2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the teacher samples' CFG where its low-noise expert runs (WanPipeline's "
        "guidance_scale_2; default: --teacher_guidance_scale when given, as the pipeline, else 3.0); refused for "
        "one-transformer models",
    )
    args = flow_options.check_flow_values(options.check_common_args(p.parse_args(argv)))
    check_experts(args, flow_options.local_variant(args))
    return check_ladd_args(args)


def check_experts(args: argparse.Namespace, variant: str | None) -> None:
    """Wan 2.2 A14B trains as LoRA adapters on both experts: ``--use_lora`` (``ValueError`` with the reason; checked
    at parse time for a local folder, after the load for a hub id)."""
    if variant == "wan-a14b" and not args.use_lora:
        raise ValueError(
            "Wan 2.2 A14B trains as LoRA adapters on both experts: pass --use_lora (a full fine-tune of two 14 B "
            "transformers is not built here)."
        )


def check_ladd_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the LADD options (``ValueError`` with the fix) and fill the student sigma weights."""
    if not args.prompts_file or args.train_data_dir:
        raise ValueError(
            "LADD trains on the teacher's own samples of a prompt list: pass --prompts_file (one prompt a line) "
            "and no --train_data_dir."
        )
    sig = args.student_sigmas
    if any(not 0 < s <= 1 for s in sig) or any(a <= b for a, b in itertools.pairwise(sig)):
        raise ValueError(
            f"Expected --student_sigmas to be strictly decreasing noise levels in (0, 1], e.g. 1.0 0.75 0.5 0.25, "
            f"but got {sig}."
        )
    if args.student_sigma_weights is None:
        rest = len(sig) - 1
        args.student_sigma_weights = [1.0] if not rest else [0.7] + [0.3 / rest] * rest
    w = args.student_sigma_weights
    if len(w) != len(sig) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(
            f"Expected --student_sigma_weights to be {len(sig)} non-negative weights (one per --student_sigmas) "
            f"with a positive sum, but got {w}."
        )
    flow_teacher_samples.check_args(args)
    if args.renoise_std <= 0:
        raise ValueError(f"Expected --renoise_std > 0, but got {args.renoise_std}.")
    if args.r1_gamma < 0:
        raise ValueError(f"Expected --r1_gamma >= 0, but got {args.r1_gamma}; 0 turns R1 off.")
    if args.r1_approximate_sigma is not None and not args.r1_approximate_sigma > 0:
        raise ValueError(f"Expected --r1_approximate_sigma > 0, but got {args.r1_approximate_sigma}.")
    if args.r1_gamma > 0 and args.r1_approximate_sigma is None:
        raise ValueError(
            f"--r1_gamma {args.r1_gamma} needs --r1_approximate_sigma (e.g. 0.1): the exact R1 penalty differentiates "
            "the teacher's attention twice, which PyTorch's fused attention kernels do not support. Pass "
            "--r1_approximate_sigma for the finite-difference R1, or --r1_gamma 0."
        )
    if args.teacher_guidance_scale is not None and not args.teacher_guidance_scale >= 1:
        raise ValueError(
            f"Expected --teacher_guidance_scale >= 1 (1: no guidance), but got {args.teacher_guidance_scale}."
        )
    if args.discriminator_norm_groups < 1:
        raise ValueError(
            f"Expected --discriminator_norm_groups >= 1, but got {args.discriminator_norm_groups}."
        )
    return args


# ------------------------------------------------------------------------------------------ networks
def teacher_transformer(
    args: argparse.Namespace, parts: flow_models.FlowComponents, device: Any, dtype: torch.dtype
) -> torch.nn.Module:
    """The frozen teacher in ``dtype`` on ``device``: with ``--use_lora`` the loaded transformer itself (the
    base the student's adapter is added to by :func:`make_student`), otherwise a second copy
    (``flow_models.load_teacher``) beside the fully trained student."""
    if not args.use_lora:
        return flow_models.load_teacher(args, parts, device, dtype)
    parts.transformer.requires_grad_(False).eval()
    return sdxl_models.to_frozen_dtype(parts.transformer, device, dtype)


def make_student(
    accelerator: Any,
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    device: Any,
    dtype: torch.dtype,
) -> tuple[torch.nn.Module, Any]:
    """``(student, base)``: with ``--use_lora`` the generator's :class:`~diffdistill.students.AdapterView` of ONE
    :class:`~diffdistill.students.SharedBase` (the teacher being ``base.view(None)``; FSDP2 shards the base
    once, ``shared_critics.shard``); otherwise the whole transformer, trainable, and ``base`` None.

    Our choice (memory: FLUX.1 holds one 24 GB bf16 base instead of two): gradient checkpointing goes through
    :meth:`SharedBase.enable_gradient_checkpointing`, so the student's blocks are recomputed under its adapter;
    the discriminator's own checkpointing of the teacher's blocks recomputes them in the generator's backward,
    which runs outside any view call, i.e. with the adapter off (the teacher), as in their forward pass.
    """
    if not args.use_lora:
        return flow_models.make_trainable(args, parts.transformer, device, dtype, family=parts.family), None
    base = shared_critics.build(
        args,
        parts.transformer,
        device,
        dtype,
        (shared_critics.GENERATOR,),
        targets=flow_families.lora_targets(parts.family),
    )
    shared_critics.shard(accelerator, base)
    return base.view(shared_critics.GENERATOR), base


# ------------------------------------------------------------------------------------------ training
def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "flow_ladd")
    parts = flow_models.load_flow(args)
    flow_options.check_flow_args(args, parts)
    check_experts(args, parts.variant)  # a hub id's variant is known once it is loaded
    if parts.family == "flux" and args.teacher_guidance_scale is not None:
        raise ValueError(
            "--teacher_guidance_scale is the classifier-free guidance of SD3's and Wan's teacher samples; FLUX.1 "
            "takes its guidance as an input (--guidance, FLUX.1-dev) and has no unconditional pass: drop it."
        )
    args.teacher_guidance_scale_2 = (
        flow_families.check_expert_scale(  # before the default: it follows a given one
            parts, "--teacher_guidance_scale_2", args.teacher_guidance_scale_2, args.teacher_guidance_scale
        )
    )
    if parts.uses_cfg and args.teacher_guidance_scale is None:  # the pipeline's (SD3 7.0, Qwen 4.0, Wan 5.0)
        args.teacher_guidance_scale = flow_families.default_guidance_scale(parts.variant)
    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    flow_models.place_frozen(parts, device, dtype)

    # The frozen teacher makes the synthetic data and carries the discriminator's features. With --use_lora it
    # is the student's own base with the adapter off (one copy of the transformer); otherwise a separate copy.
    teacher_model = teacher_transformer(args, parts, device, dtype)
    teacher = flow_models.FlowDenoiser(teacher_model, parts.family, args.guidance)
    shards = flow_teacher_samples.generate_teacher_samples(
        accelerator, args, parts, teacher, args.teacher_guidance_scale, args.teacher_guidance_scale_2
    )
    # Wan 2.2 A14B: one set of heads per expert, a sample judged on the expert of its re-noised level
    disc = flow_critics.ladd_heads(
        args, parts.family, teacher_model, gradient_checkpointing=args.gradient_checkpointing
    ).to(device)

    transformer, base = make_student(accelerator, args, parts, device, dtype)
    # --compile; the teacher is D's trunk
    compilation.compile_networks(args, transformer, teacher_model, accelerator=accelerator)
    opt = runtime.adamw(transformer.parameters(), args)
    d_lr = args.discriminator_learning_rate or 10 * args.learning_rate
    opt_d = runtime.adamw(disc.parameters(), args, lr=d_lr)
    transformer, opt, disc, opt_d = runtime.prepare(accelerator, (transformer, opt), (disc, opt_d))
    ema = checkpoints.setup_checkpoints(accelerator, args, transformer)
    student = flow_models.FlowDenoiser(transformer, parts.family, args.guidance)
    data = teacher_pairs.PairShards(shards, args.train_batch_size, args.dataloader_num_workers)
    sigmas = torch.tensor(args.student_sigmas, dtype=torch.float32)
    weights = torch.tensor(args.student_sigma_weights, dtype=torch.float64)
    global_step = checkpoints.resume(accelerator, args)
    teacher_features = (lambda: base.active(None)) if base is not None else contextlib.nullcontext

    def judge(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> list[torch.Tensor]:
        """Discriminator logits of latents ``x`` at noise level ``sigma``: the teacher's own call (FLUX packed)."""
        hidden, kwargs, grid = teacher.model_inputs(x, 1000 * sigma, **cond)
        timestep, pooled = kwargs.pop("timestep"), kwargs.pop("pooled_projections", None)
        with teacher_features():  # the shared base: adapter off
            return model(hidden, timestep, pooled_projections=pooled, grid_size=grid, **kwargs)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        _, x0, prompts = data.batch(gen)
        x0 = x0.to(device)
        b = x0.shape[0]
        cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
        sigma = sigmas[torch.multinomial(weights, b, replacement=True, generator=gen)].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        renoise_sigma = ladd_renoise_sigma(
            b, mean=args.renoise_mean, std=args.renoise_std, generator=gen, device=device
        )
        renoise = torch.randn(x0.shape, generator=gen).to(device)
        r1_noise = torch.randn(x0.shape, generator=gen).to(device)

        per_sample = (-1, *(1,) * (x0.ndim - 1))  # a sigma per sample, over images or videos

        def renoised(clean: torch.Tensor) -> torch.Tensor:
            s = renoise_sigma.view(per_sample)
            return (1 - s) * clean + s * renoise

        with accelerator.accumulate(transformer), runtime.autocast(accelerator):
            s = sigma.view(per_sample)
            x_sigma = (1 - s) * x0 + s * noise
            fake = x_sigma - s * student(x_sigma, 1000 * sigma, **cond).float()  # x0_hat = x - sigma v
            # D stays frozen until the generator's backward is done (gradient checkpointing recomputes its
            # blocks there with the same requires_grad as in the forward pass).
            with frozen(disc):
                g_loss, _ = gan_generator_loss(
                    judge(runtime.forward_model(accelerator, disc), renoised(fake), renoise_sigma, cond),
                    loss=args.gan_loss,
                )
                runtime.backward(accelerator, g_loss, transformer)
            runtime.clip_and_step(accelerator, opt, transformer.parameters(), args.max_grad_norm)

            real_in = renoised(x0)
            real_logits = judge(disc, real_in, renoise_sigma, cond)
            d_loss, _ = gan_discriminator_loss(
                real_logits, judge(disc, renoised(fake.detach()), renoise_sigma, cond), loss=args.gan_loss
            )
            r1 = torch.zeros((), device=device)
            if args.r1_gamma > 0:  # APT's finite difference (Lin et al. 2025): no double backward
                perturbed = judge(disc, real_in + args.r1_approximate_sigma * r1_noise, renoise_sigma, cond)
                r1, _ = approximate_r1_penalty(
                    real_logits, perturbed, sigma=args.r1_approximate_sigma, gamma=args.r1_gamma
                )
            runtime.backward(accelerator, d_loss + r1, disc)
            runtime.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
        return {
            "generator": g_loss.detach(),
            "discriminator": d_loss.detach(),
            "r1": r1.detach(),
            "student_sigma": sigma.mean(),
        }

    validate = flow_validation.few_step_validation(accelerator, args, parts, transformer, args.student_sigmas)
    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    if base is not None:  # the generator's adapter, as the pipeline's save_lora_weights writes it
        flow_critics.save_adapter(
            accelerator, transformer, args, parts, checkpoints.LORA_WEIGHT_NAME, ema=ema
        )
    else:
        flow_models.save_transformer(accelerator, transformer, args, parts, ema=ema)
    if accelerator.is_main_process:  # the scheduler that keeps --student_sigmas as given (no shift)
        from diffusers import FlowMatchEulerDiscreteScheduler

        FlowMatchEulerDiscreteScheduler.from_config(
            parts.noise_scheduler.config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None
        ).save_pretrained(Path(args.output_dir) / "scheduler")
        # The grid, as flow_dmd2 writes it: examples/evaluate.py samples the student on it by default.
        (Path(args.output_dir) / "student_sigmas.json").write_text(
            json.dumps(list(args.student_sigmas)) + "\n"
        )
        student_sampler.write_record(  # guidance, size, text length (explicit sigmas: no size-dependent grid)
            args, parts, flow_encoding.max_sequence_length(args, parts), shifted_grid=False
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
