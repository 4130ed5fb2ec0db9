"""Diffusion2GAN for SDXL: teacher ODE pairs, then a one-step conditional GAN with E-LatentLPIPS.

Kang et al., "Distilling Diffusion Models into Conditional GANs", ECCV 2024 (arXiv:2405.05967).

1. **Pairs.** The teacher maps noise to latents with guided DDIM (``--teacher_steps``, CFG
   ``--guidance_scale``) for prompts of ``--prompts_file``; shards of ``--pairs_shard_size`` pairs are
   written as ``pairs-XXXXX.safetensors`` (``noise``, ``latent``, the prompts in the metadata) under
   ``--pairs_dir``. A shard is written to a temporary name and renamed, so an interrupted run resumes by
   skipping the shards that exist; processes split the shards. Each shard also records the settings its
   pairs depend on (``settings`` in the metadata: teacher model / revision / variant, ``--guidance_scale``,
   ``--teacher_steps``, ``--resolution``, ``--pairs_seed`` (default ``--seed``), ``--pairs_shard_size``,
   ``--uncond`` and a hash of the prompt list), and a run refuses, before loading any model, to reuse a
   shard made with other settings (or holding another number of pairs) -- it would train on stale pairs;
   the error names both values and the fix (a new ``--pairs_dir``, or the flags the shards were made with).
   The pairs come from prompts only: ``--train_data_dir`` is rejected.
2. **GAN.** The generator is the UNet called once at ``--generator_timestep`` on the pair's noise
   (output converted to a clean latent), trained with E-LatentLPIPS to the teacher's latent
   (:class:`diffdistill.losses.ELatentLPIPS`; ``--lpips_weights`` is required: a calibrated checkpoint from
   ``examples/train_latent_lpips.py``, or ``random`` to train on a random, uncalibrated trunk on purpose,
   with a warning) plus the non-saturating GAN loss of
   the :class:`~diffdistill.discriminators.MultiScaleConditionalDiscriminator` ``D(c, z, x)``; the
   discriminator also sees mix-and-match negatives (:func:`diffdistill.losses.mix_and_match`) and a lazy,
   single-sample R1 penalty (:func:`diffdistill.losses.lazy_r1_penalty`). ``--r1_approximate_sigma`` swaps
   exact R1 (a double backward through the discriminator, on math attention: 109 GiB at 1024 px with the
   full-UNet discriminator on an H200) for APT's finite-difference approximation
   (:func:`diffdistill.losses.approximate_r1_penalty`, Lin et al. 2025): two more plain forwards of the
   penalised sample, no double backward, and allowed under FSDP / DeepSpeed (tested under ZeRO-2).
3. **Regression only** (``--gan_weight 0``): no discriminator is built, trained or checkpointed, and its flags
   are refused (the paper's "regression only" ablation row). This is also DMD2's ODE-pair pretraining of its
   1-step SDXL generator (Yin et al. 2024, arXiv:2405.14867; tianweiy/DMD2 ``main/train_sd_ode.py``): pure noise
   at ``--generator_timestep 399``, 10k pairs of 50-step trailing Euler (here trailing DDIM on the same timesteps)
   with CFG 8, AdamW lr 1e-5, weight decay 0.01, grad norm 10, 2000 steps of batch 256. Our choice: the
   distance is E-LatentLPIPS on latents where DMD2 takes LPIPS on images decoded by a tiny VAE (Diffusion2GAN's
   ablation found E-LatentLPIPS as good as pixel LPIPS at a tenth of the cost). Its output starts
   ``sdxl_sim.py --preset dmd2-1step`` (``--init_unet`` / ``--init_lora``); the commands are in
   examples/README.md.

``--shared_base`` (with ``--use_lora``; our choice, for memory: issue 22): ONE frozen copy of the UNet in the
mixed-precision dtype instead of the LoRA generator's base plus the discriminator's trainable float32 copy.
It holds two LoRA adapters (:class:`diffdistill.students.SharedBase`, ``training.shared_critics``): the
generator's, and a "discriminator" adapter that stands in for fine-tuning the discriminator's UNet backbone
(the paper trains the whole copy; a LoRA of it keeps the backbone trainable, only at rank ``--lora_rank``,
where frozen adapters-off features would not let it adapt at all). The discriminator's own layers (z-conv,
multi-scale input convs, readout heads) are unchanged and run on the base's features under that adapter;
the teacher of the pairs is the base with the adapters off. Gradient checkpointing recomputes each block
under the adapter it ran with (also in R1's double backward). Checkpoints: the generator's adapter in
``unet_lora.safetensors``, the discriminator (adapter + its layers) in accelerate's model file. DDP or one
process (FSDP / DeepSpeed are refused).

Example::

    accelerate launch examples/sdxl_diffusion2gan.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --prompts_file prompts.txt --num_pairs 100000 --output_dir out/d2g \\
        --lpips_weights latent_lpips.safetensors --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 20000
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdistill.discriminators import MultiScaleConditionalDiscriminator
from diffdistill.losses import (
    ELatentLPIPS,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    load_latent_lpips_state_dict,
    mix_and_match,
)
from diffdistill.schedulers import NoiseSchedule, TeacherSolver
from diffdistill.students import frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    checkpoints,
    compilation,
    loop,
    options,
    runtime,
    sdxl_encoding,
    sdxl_models,
    shared_critics,
    student_sampler,
    teacher_pairs,
    validation,
)

logger = logging.getLogger("sdxl_diffusion2gan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-5)
    g = p.add_argument_group("teacher pairs")
    g.add_argument("--pairs_dir", default=None, help="default: OUTPUT_DIR/pairs")
    g.add_argument("--num_pairs", type=int, default=1000)
    g.add_argument("--pairs_shard_size", type=int, default=64)
    g.add_argument("--teacher_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=7.0)
    g.add_argument(
        "--pairs_seed",
        type=int,
        default=None,
        help="seed of the pairs' noise and prompt draws (default: --seed); lets a run with another --seed "
        "reuse the shards",
    )
    g = p.add_argument_group("GAN")
    g.add_argument("--generator_timestep", type=int, default=999)
    g.add_argument(
        "--lpips_weights",
        default=None,
        help="calibrated LatentLPIPS checkpoint (examples/train_latent_lpips.py); required: pass 'random' to "
        "train with a random, uncalibrated trunk on purpose (smoke tests)",
    )
    g.add_argument("--lpips_augment", default="bg", help='ELatentLPIPS augmentation letters, or "none"')
    g.add_argument(
        "--gan_weight",
        type=float,
        default=0.5,
        help="weight of the generator's GAN term; 0: regression alone, no discriminator built or trained (the "
        "paper's 'regression only' row; DMD2's ODE-pair pretraining of its 1-step SDXL generator with "
        "--generator_timestep 399, examples/README.md)",
    )
    g.add_argument("--discriminator_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument(
        "--r1_gamma",
        type=float,
        default=None,
        help="R1 weight (default 1; 0: no R1); not with --gan_weight 0",
    )
    g.add_argument("--r1_every", type=int, default=None, help="R1 every N discriminator steps (default 16)")
    g.add_argument(
        "--r1_approximate_sigma",
        type=float,
        default=None,
        help="approximate R1 by finite differences with this perturbation sigma (APT): no double backward, far "
        "less memory than exact R1, allowed under FSDP / DeepSpeed (tested: ZeRO-2); default: exact R1",
    )
    g.add_argument("--no_mix_and_match", action="store_true")
    shared_critics.add_shared_base_arg(g)
    args = options.check_common_args(p.parse_args(argv))
    shared_critics.check_shared_base_args(args)
    options.check_range(args, "gan_weight", low=0, why="0: regression only, no discriminator")
    if args.gan_weight == 0:
        discriminator_flags = ("discriminator_learning_rate", "r1_gamma", "r1_every", "r1_approximate_sigma")
        given = [f"--{n}" for n in discriminator_flags if getattr(args, n) is not None]
        given += ["--no_mix_and_match"] * args.no_mix_and_match
        if given:
            raise ValueError(
                f"--gan_weight 0 trains the generator by regression alone and builds no discriminator, so "
                f"{', '.join(given)} would be ignored: drop them (or give --gan_weight > 0)."
            )
    if args.r1_gamma is None:  # no R1 without a discriminator
        args.r1_gamma = 1.0 if args.gan_weight > 0 else 0.0
    if args.r1_gamma < 0:
        raise ValueError(f"Expected --r1_gamma >= 0, but got {args.r1_gamma}; 0 turns R1 off.")
    if args.r1_gamma == 0:
        given = [f"--{n}" for n in ("r1_every", "r1_approximate_sigma") if getattr(args, n) is not None]
        if given:
            raise ValueError(f"--r1_gamma 0 turns R1 off, so {', '.join(given)} would be ignored: drop them.")
    args.r1_every = 16 if args.r1_every is None else args.r1_every
    for name in ("num_pairs", "pairs_shard_size", "teacher_steps", "r1_every"):
        options.check_range(args, name, low=1)
    why = "the generator's input timestep; 999: pure noise"
    options.check_range(args, "generator_timestep", low=0, high=999, why=why)
    if args.r1_approximate_sigma is not None and not args.r1_approximate_sigma > 0:
        raise ValueError(
            f"Expected --r1_approximate_sigma > 0, but got {args.r1_approximate_sigma}; leave it out for exact R1."
        )
    if args.prompts_file is None:
        raise ValueError("Diffusion2GAN generates its own pairs: pass --prompts_file.")
    if args.train_data_dir is not None:
        raise ValueError(
            "Diffusion2GAN trains on teacher pairs (noise, teacher latent) generated from --prompts_file and "
            "reads no images, so --train_data_dir would be ignored: drop it (to use its captions as prompts, "
            "write them one a line to a --prompts_file)."
        )
    if args.lpips_weights is None:
        raise ValueError(
            "Expected --lpips_weights: a calibrated LatentLPIPS checkpoint for the SDXL VAE "
            "(examples/train_latent_lpips.py). Without one the regression loss is a randomly initialised "
            "VGG trunk, which is not the paper's E-LatentLPIPS; pass --lpips_weights random to train with "
            "it anyway."
        )
    if args.lpips_weights != "random":
        # read it now (a missing or wrong-format file fails here, not after the model load and the pairs)
        try:
            load_latent_lpips_state_dict(args.lpips_weights)
        except (
            Exception
        ) as err:  # missing, unreadable or not a LatentLPIPS checkpoint (safetensors raises its own)
            raise ValueError(f"--lpips_weights {args.lpips_weights}: {err}") from err
    if args.pairs_seed is None:
        args.pairs_seed = args.seed
    resumed = checkpoints.resolve_checkpoint(args)
    recorded = checkpoints.recorded_options(resumed) if resumed is not None else {}
    if args.gan_weight > 0 and recorded.get("gan_weight") == 0:
        raise ValueError(
            f"{resumed} was saved by a regression-only run (--gan_weight 0): it holds no discriminator to "
            "resume. Resume it with --gan_weight 0, or start the GAN run in a new --output_dir."
        )
    return args


RANDOM_LPIPS_WARNING = (
    "--lpips_weights random: E-LatentLPIPS runs on a RANDOMLY INITIALISED latent VGG trunk with unit heads "
    "(uncalibrated), not the paper's trained LatentLPIPS, so the regression loss is not perceptual. Train one "
    "with examples/train_latent_lpips.py and pass it as --lpips_weights."
)


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_diffusion2gan")
    if args.r1_gamma > 0 and args.r1_approximate_sigma is None and runtime.is_sharded(accelerator):
        raise ValueError(
            "R1 differentiates the discriminator's input gradient (a double backward), which FSDP / DeepSpeed "
            "sharding does not support: run Diffusion2GAN with DDP, pass --r1_approximate_sigma (e.g. 0.1) for "
            "the finite-difference R1, or --r1_gamma 0 to train without R1."
        )
    if args.shared_base:
        shared_critics.check_engine(accelerator)
    if args.lpips_weights == "random" and accelerator.is_main_process:
        logger.warning(RANDOM_LPIPS_WARNING)
    teacher_pairs.check_pairs(
        args
    )  # before the models load: shards made with other settings stop the run here
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype, vae=False)
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    adversarial = args.gan_weight > 0  # 0: regression only, no discriminator
    disc: Any = None
    if args.shared_base:  # one frozen UNet: generator and discriminator adapters, teacher = adapters off
        adapters = (shared_critics.GENERATOR, shared_critics.DISCRIMINATOR)[: 1 + adversarial]
        base = shared_critics.build(args, parts.unet, device, dtype, adapters)
        if adversarial:
            disc = shared_critics.ActiveAdapter(
                MultiScaleConditionalDiscriminator(base.model, backbone="shared"),  # checkpointed by the base
                base,
                shared_critics.DISCRIMINATOR,
                owns_adapter=True,
            )
        unet, teacher_model = base.view(shared_critics.GENERATOR), base.view(None)
    else:
        if adversarial:
            disc = MultiScaleConditionalDiscriminator(
                parts.unet, gradient_checkpointing=args.gradient_checkpointing
            )
        unet, teacher_model = sdxl_models.student_and_teacher(args, parts.unet, device, dtype)
    teacher = TeacherSolver(teacher_model, schedule, guidance_scale=args.guidance_scale)
    teacher_pairs.generate_pairs(accelerator, args, parts, teacher)
    pairs = teacher_pairs.PairShards(
        teacher_pairs.shard_paths(args), args.train_batch_size, args.dataloader_num_workers
    )
    augment = None if args.lpips_augment == "none" else args.lpips_augment
    weights = None if args.lpips_weights == "random" else args.lpips_weights
    lpips = ELatentLPIPS("sdxl", augment=augment, weights=weights).to(device)
    exact_r1 = args.r1_gamma > 0 and args.r1_approximate_sigma is None  # --compile: D eager (a 2nd backward)
    compilation.compile_networks(
        args,
        unet,
        teacher_model,
        disc,
        whole=(lpips,),
        double_backward=(disc,) * exact_r1,
        accelerator=accelerator,
    )
    opt = runtime.adamw(unet.parameters(), args)
    if adversarial:
        opt_d = runtime.adamw(disc.parameters(), args, lr=args.discriminator_learning_rate)
        unet, opt, disc, opt_d = runtime.prepare(accelerator, (unet, opt), (disc, opt_d))
    else:
        unet, opt = runtime.prepare(accelerator, (unet, opt))
    trained = (unet, disc) if adversarial else (unet,)
    ema = checkpoints.setup_checkpoints(accelerator, args, unet)
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        noise, real, prompts = pairs.batch(gen)
        noise, real = noise.to(device), real.to(device)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
        logs: dict[str, torch.Tensor] = {}
        with accelerator.accumulate(*trained), runtime.autocast(accelerator):
            fake = validation.one_step_x0(unet, schedule, noise, args.generator_timestep, cond)
            rec = lpips(fake, real, generator=gen)
            if not adversarial:  # --gan_weight 0: the regression alone
                runtime.backward(accelerator, rec, unet)
                runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
                return {"loss": rec.detach(), "lpips": rec.detach()}
            with frozen(disc):  # until the backward (checkpointed D blocks recompute there)
                judge = runtime.forward_model(accelerator, disc)
                g_adv, _ = gan_generator_loss(judge(fake, 0, ehs, added, noise=noise))
                loss = rec + args.gan_weight * g_adv
                runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)

            fake_logits = disc(fake.detach(), 0, ehs, added, noise=noise)
            if not args.no_mix_and_match and noise.shape[0] >= 2:
                mm = mix_and_match(real, {"ehs": ehs, "added": added}, noise, generator=gen)
                extra = disc(mm.latents, 0, mm.cond["ehs"], mm.cond["added"], noise=mm.noise)
                fake_logits = [torch.cat([f, e]) for f, e in zip(fake_logits, extra)]
            d_loss, _ = gan_discriminator_loss(disc(real, 0, ehs, added, noise=noise), fake_logits)
            r1_logs = {"r1": torch.zeros((), device=device)}

            def lazy_r1() -> torch.Tensor:
                penalty, _ = lazy_r1_penalty(
                    lambda x, ehs, added, noise: disc(x, 0, ehs, added, noise=noise),
                    real,
                    step=step,
                    every=args.r1_every,
                    gamma=args.r1_gamma,
                    cond={"ehs": ehs, "added": added, "noise": noise},
                    generator=gen,
                    approximate_sigma=args.r1_approximate_sigma,
                )
                r1_logs["r1"] = penalty.detach().float()
                return penalty

            approximate_r1 = args.r1_gamma > 0 and args.r1_approximate_sigma is not None
            # APT's finite-difference R1 runs plain forwards: one backward of the sum (one DeepSpeed engine
            # step per D update, like DDP's single optimiser step).
            runtime.backward(accelerator, d_loss + lazy_r1() if approximate_r1 else d_loss, disc)
            if args.r1_gamma > 0 and not approximate_r1:
                # Exact R1 differentiates the gradient: fused attention kernels have no double backward, so
                # the penalty pass -- and its backward, where a checkpointed D recomputes its blocks with the
                # kernel of the forward pass -- uses PyTorch's math attention (sharding is refused above).
                with sdpa_kernel(SDPBackend.MATH):
                    r1 = lazy_r1()
                    if r1.requires_grad:  # a lazy step
                        # A synchronised DDP backward needs a gradient for every trainable parameter, and R1
                        # gives none to the heads' last biases (D's input gradient does not depend on them):
                        # a zero-weighted sum of the parameters completes the set (adds exactly 0).
                        every = sum(p.sum() for p in disc.parameters() if p.requires_grad)
                        runtime.backward(accelerator, r1 + 0.0 * every, disc)
            runtime.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
        logs.update(loss=loss.detach(), lpips=rec.detach(), generator_adv=g_adv.detach())
        logs.update(discriminator=d_loss.detach(), r1=r1_logs["r1"])
        return logs

    validate = validation.one_step_validation(accelerator, args, parts, unet, schedule)
    loop.train_loop(accelerator, args, global_step, train_step, validate, data=pairs, ema=ema)
    checkpoints.save_unet(accelerator, unet, args, ema=ema)
    if accelerator.is_main_process:  # how evaluate.py samples the generator: as the validation does
        student_sampler.write_one_step_sampler(args, args.output_dir, parts.noise_scheduler)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
