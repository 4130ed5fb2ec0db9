"""MLCM for SDXL: multistep latent consistency distillation, the inter-segment stage, then optionally the
paper's preference and distribution-matching phases.

Xie et al., "MLCM: Multistep Consistency Distillation of Latent Diffusion Model" / TLCM, 2024
(arXiv:2406.05768), Sec. 3.2-3.4 and 5.1. The phases run in the order of Sec. 5.1's table, each on its own
share of ``--max_train_steps``:

1. ``mlcd`` -- data-free multistep consistency (``StagePlan.mlcm``): ``M`` milestones, teacher-trajectory
   training states (:func:`diffdistill.losses.teacher_trajectory_states`: guided teacher DDIM from pure
   noise), one guided teacher step of ``skip`` timesteps, online target, both sides moved to the lower
   milestone (:func:`diffdistill.losses.multistep_consistency_loss`).
2. ``lcd-inter-segment`` -- consistency across segments at the milestones only: the student's own 4-step
   sample (TLCM grid, :func:`diffdistill.schedulers.x0_renoise_sample`) re-noised to a milestone (Eq. 9), a
   3-step teacher solve over one segment (:func:`diffdistill.losses.inter_segment_consistency_loss`).
3. ``mps`` (``--mps_steps``, with ``--reward_model``; the paper: 500 iterations) -- the preference hinge of
   Eq. 11 (:func:`diffdistill.losses.mps_hinge_loss`), as the paper:
   ``max(s0 - s(x0, c), 0) + max(s(x0, c_neg), 0)`` with ``s0 = --reward_s0`` (16, on MPS's scale), ``s``
   the reward model's score of the image the VAE decodes from the student's ``x0`` (with gradients), ``c``
   the prompt. Our choices (the paper gives none): the negative prompt ``c_neg``
   (``--reward_negative_prompt``, default empty) and the weight ``--reward_weight`` (1).
4. ``dm-gan`` (``--dmd_steps``; the paper: 1000 iterations) -- data-free distribution matching (Eq. 12): the
   DMD gradient (:func:`diffdistill.losses.dmd_loss`) of the student's ``x0`` between the real score (the
   teacher with CFG ``--guidance_scale``) and an online fake score, both initialised from SDXL as the paper
   says; the fake score is fitted by denoising score matching to the synthetic ``ẑ0`` (the paper's wording;
   :func:`diffdistill.losses.fake_score_loss`). With ``--gan_weight``, the GAN term (Eq. 13): real samples
   are ``ẑ0``, fake samples the student's ``x0``, both forward-diffused to a random ``t'`` as the paper says.
   The paper's D is initialised from SDXL; which network and head is not given, nor the loss's exact form:
   we use DMD2's classifier on the fake score's bottleneck (so its trunk is the SDXL-initialised fake score)
   with the non-saturating loss (``training.score_distillation.BottleneckGAN``), and DMD2's weights
   (``--gan_weight`` alone: 5e-3, ``--gan_classifier_weight`` 1e-2). The fake score and the classifier
   learn at ``--fake_learning_rate`` (default ``--learning_rate``, 1e-4: the paper's lr of D; the fake
   score's lr is not given, so ours is the same). The noise
   levels are DMD2's, which the paper does not give (our choice): the DMD term's ``t`` in ``[0.02T, 0.98T]``,
   the fake score's and the classifier's in ``[0, T)``; one fake-score update per student update
   (``--fake_steps``, ``--generator_every``).

The training states of phases 3 and 4 are those of stage 2 (Eq. 9): ``ẑ0`` is the student's own
``--student_sample_steps``-step sample from pure noise (no gradient), re-noised to a milestone ``t_m``;
the student predicts ``x0`` from there in one call, with gradient (where the paper predicts ``x0`` from in
these phases it does not say: our choice). Stage 1 takes the first ``--stage1_steps`` optimisation steps
(default: the plan's 12k : 2k share of the consistency steps); stage 2 the rest of the consistency steps;
phases 2-4 learn at ``--stage2_learning_rate`` (1e-5 for LCD, MPS and DM + GAN in the paper). The paper's
per-phase batch sizes (MPS 8, DM + GAN 4) are not modelled: every phase uses ``--train_batch_size``.
Prompt-only (``--prompts_file``); ``--train_data_dir`` captions work as prompts.

Example::

    accelerate launch examples/sdxl_mlcm.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --prompts_file prompts.txt --output_dir out/mlcm --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 15500 \\
        --learning_rate 1e-4 --stage2_learning_rate 1e-5 \\
        --mps_steps 500 --reward_model my_rewards:mps --dmd_steps 1000 --gan_weight
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.losses import (
    dmd_loss,
    fake_score_loss,
    inter_segment_consistency_loss,
    mps_hinge_loss,
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
from training import (
    checkpoints,
    compilation,
    data_sources,
    loop,
    options,
    rewards,
    runtime,
    score_distillation,
    sdxl_encoding,
    sdxl_models,
    validation,
)

logger = logging.getLogger("sdxl_mlcm")

#: The paper's s0 of Eq. 11 (on MPS's score scale).
MPS_S0 = 16.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-4)
    g = p.add_argument_group("MLCM")
    g.add_argument("--num_segments", type=int, default=8, help="milestones M")
    g.add_argument("--guidance_scale", type=float, default=8.0, help="teacher CFG scale")
    g.add_argument("--skip", type=int, default=None, help="stage-1 teacher step (default: the plan's 20)")
    g.add_argument(
        "--stage1_steps", type=int, default=None, help="default: 12/14 of the consistency steps (stages 1-2)"
    )
    g.add_argument(
        "--stage2_learning_rate",
        type=float,
        default=None,
        help="lr of every phase after stage 1 (default 1e-5)",
    )
    g.add_argument("--student_sample_steps", type=int, default=None, help="default: the plan's 4")
    g = p.add_argument_group("MPS preference phase (Eq. 11)")
    g.add_argument("--mps_steps", type=int, default=0, help="steps of the phase (the paper: 500; 0: none)")
    g.add_argument("--reward_model", default=None, help=rewards.REWARD_CALL + " (the paper: MPS)")
    g.add_argument("--reward_s0", type=float, default=MPS_S0, help="s0 of the hinge (the paper: 16)")
    g.add_argument("--reward_negative_prompt", default="", help="c_neg of the hinge (our choice: empty)")
    g.add_argument("--reward_weight", type=float, default=1.0, help="weight of the hinge (our choice: 1)")
    g = p.add_argument_group("data-free DMD + GAN phase (Eq. 12-13)")
    g.add_argument("--dmd_steps", type=int, default=0, help="steps of the phase (the paper: 1000; 0: none)")
    score_distillation.add_fake_score_args(g, one_step=False)
    score_distillation.add_gan_args(g)
    # None: not given (the DMD phase's options are refused without --dmd_steps)
    p.set_defaults(**{name: None for name in DMD_DEFAULTS})
    args = options.check_common_args(p.parse_args(argv))
    check_phase_args(args)
    return args


#: Defaults of the options only the DMD + GAN phase reads (filled by :func:`check_phase_args`).
DMD_DEFAULTS = {
    "fake_learning_rate": None,
    "generator_every": 1,
    "fake_weighting": "epsilon",
    "gan_classifier_weight": score_distillation.DMD2_SDXL_CLASSIFIER_WEIGHT,
}


def check_phase_args(args: argparse.Namespace) -> None:
    """The phases' step counts fit ``--max_train_steps`` and each phase has what it needs (``ValueError``)."""
    for name in ("mps_steps", "dmd_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"Expected --{name} >= 0 (0: no such phase), but got {getattr(args, name)}.")
    consistency = args.max_train_steps - args.mps_steps - args.dmd_steps
    if consistency < 0:
        raise ValueError(
            f"Expected --mps_steps + --dmd_steps <= --max_train_steps ({args.max_train_steps}), but got "
            f"{args.mps_steps} + {args.dmd_steps}."
        )
    if args.stage1_steps is not None and not 0 <= args.stage1_steps <= consistency:
        raise ValueError(
            f"Expected 0 <= --stage1_steps <= {consistency} (the steps before the MPS and DMD phases), but got "
            f"{args.stage1_steps}."
        )
    if (args.reward_model is None) != (args.mps_steps == 0):
        raise ValueError(
            "The MPS phase (--mps_steps N) scores the student's images with --reward_model: pass both or neither."
        )
    if args.reward_model is not None:
        rewards.load_reward_model(args.reward_model)  # fail at start-up, not at the MPS phase
    given = [f"--{name}" for name in DMD_DEFAULTS if getattr(args, name) is not None]
    if given and not args.dmd_steps:
        raise ValueError(
            f"{', '.join(given)} configure the DMD + GAN phase: pass --dmd_steps N, or drop them."
        )
    if args.gan_classifier_weight is not None and not args.gan_weight:
        raise ValueError(
            "--gan_classifier_weight weighs the classifier of --gan_weight: pass both, or neither."
        )
    for name, default in DMD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    options.check_range(args, "generator_every", low=1)
    plan = StagePlan.mlcm(num_segments=args.num_segments, guidance_scale=args.guidance_scale)  # checks M
    width = 1000 // args.num_segments
    skip = args.skip if args.skip is not None else plan["mlcd"].options["skip"]
    if not 1 <= skip <= width:
        raise ValueError(
            f"Expected --skip in [1, {width}] (the stage-1 teacher step stays inside its segment of 1000 / "
            f"--num_segments = {width} timesteps), but got {skip}"
            + ("" if args.skip is not None else " (the plan's default): pass a smaller --skip")
            + "."
        )
    if args.student_sample_steps is not None and args.student_sample_steps < 1:
        raise ValueError(
            f"Expected --student_sample_steps >= 1, but got {args.student_sample_steps}; leave it out for the "
            "plan's 4."
        )
    if args.stage2_learning_rate is not None:
        # only an explicit --stage1_steps covering the run: the default 12/14 split of a tiny test run may
        # round to every step, which a user did not ask for
        if args.stage1_steps is not None and Phases(args, plan).stage1_steps >= args.max_train_steps:
            raise ValueError(
                f"--stage2_learning_rate is the lr of the phases after stage 1, but --stage1_steps "
                f"{args.stage1_steps} puts every step of this run in stage 1: drop it."
            )
    else:
        args.stage2_learning_rate = 1e-5
    score_distillation.check_gan_args(args)
    if args.gan_weight > 0 and args.dmd_steps == 0:
        raise ValueError("--gan_weight trains the GAN term of the DMD phase: pass --dmd_steps N as well.")


class Phases:
    """Which phase an optimisation step belongs to: ``mlcd``, ``lcd-inter-segment``, ``mps`` or ``dm-gan``."""

    def __init__(self, args: argparse.Namespace, plan: StagePlan) -> None:
        self.mps_start = args.max_train_steps - args.mps_steps - args.dmd_steps
        self.dmd_start = self.mps_start + args.mps_steps
        if args.stage1_steps is None:
            mlcd, inter = plan["mlcd"], plan["lcd-inter-segment"]
            share = mlcd.num_iterations / (mlcd.num_iterations + inter.num_iterations)
            self.stage1_steps = round(self.mps_start * share)
        else:
            self.stage1_steps = args.stage1_steps

    def __call__(self, step: int) -> str:
        if step < self.stage1_steps:
            return "mlcd"
        if step < self.mps_start:
            return "lcd-inter-segment"
        return "mps" if step < self.dmd_start else "dm-gan"


PHASE_NUMBER = {"mlcd": 1.0, "lcd-inter-segment": 2.0, "mps": 3.0, "dm-gan": 4.0}


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_mlcm")
    score_distillation.check_engine(
        accelerator, args
    )  # --gan_weight under FSDP / DeepSpeed: before the UNets load
    plan = StagePlan.mlcm(num_segments=args.num_segments, guidance_scale=args.guidance_scale)
    mlcd, inter = plan["mlcd"], plan["lcd-inter-segment"]
    skip = args.skip if args.skip is not None else mlcd.options["skip"]
    q = args.student_sample_steps or inter.options["student_sample_steps"]
    phase_of = Phases(args, plan)
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype, vae=args.mps_steps > 0)  # MPS scores decoded images
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    # Eq. 12: the fake score starts from SDXL too (a copy taken before the student's LoRA is added).
    fake = copy.deepcopy(parts.unet) if args.dmd_steps else None
    unet, teacher_model = sdxl_models.student_and_teacher(args, parts.unet, device, dtype)
    # --compile (fake: its LoRA comes later)
    compilation.compile_networks(args, unet, teacher_model, fake, accelerator=accelerator)
    opt = runtime.adamw(unet.parameters(), args)
    unet, opt = runtime.prepare(accelerator, (unet, opt))
    if fake is not None:
        sdxl_models.make_trainable(args, fake, device, dtype)
        opt_f = runtime.adamw(fake.parameters(), args, lr=args.fake_learning_rate)
        fake, opt_f = runtime.prepare(accelerator, (fake, opt_f))
    gan = (
        score_distillation.BottleneckGAN.build(accelerator, args, fake, schedule) if args.gan_weight else None
    )
    ema = checkpoints.setup_checkpoints(accelerator, args, unet, extra_lora={"fake": fake} if fake else None)
    # the LoRA student with its adapters off is sharded under FSDP2 / ZeRO-3: the MLCD phase's teacher-noised states
    # must make the same teacher calls on every process (teacher_trajectory_states)
    sharded_teacher = bool(args.use_lora and runtime.gathers_parameters(accelerator))
    teacher = TeacherSolver(
        teacher_model, schedule, guidance_scale=args.guidance_scale, synchronize=sharded_teacher
    )
    data = data_sources.StepData(args, need_images=False)
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    reward_fn = rewards.frozen_reward_model(args.reward_model, device) if args.reward_model else None
    shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
    sample_timesteps = tlcm_timesteps(q, num_train_timesteps=schedule.num_train_timesteps)
    global_step = checkpoints.resume(accelerator, args)

    def self_sampled_states(
        noise: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 9: ``(ẑ0, ẑ_t, t_m)``, the student's own q-step sample re-noised to a milestone."""
        with torch.no_grad():
            z0 = x0_renoise_sample(unet, schedule, noise, sample_timesteps, cond=cond, generator=gen).sample
        total = schedule.num_train_timesteps
        t = milestone_pairs(
            shape[0], args.num_segments, total // args.num_segments, total, on_grid=True, generator=gen
        ).t.to(device)
        eps = torch.randn(shape, generator=gen).to(device)
        z0 = z0.float()
        return z0, schedule.add_noise(z0, eps, t), t

    def student_x0(z_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The student's ``x0`` from ``z_t`` in one call (float32, with gradient)."""
        return schedule.to_x0(unet(z_t, t, **cond).sample.float(), z_t, t)

    def preference_loss(x0: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 11 on the images decoded from ``x0`` (with gradients), weighted by ``--reward_weight``."""
        assert reward_fn is not None  # the MPS phase needs --reward_model (check_phase_args)
        score_fn = reward_fn  # called as fn(images, prompts), whatever its parameters are named
        images = sdxl_encoding.decode_pixels(parts.vae, x0)
        loss, logs = mps_hinge_loss(
            images,
            s0=args.reward_s0,
            reward_fn=lambda x, prompts: score_fn(x, prompts),
            cond={"prompts": prompts},
            negative_cond={"prompts": [args.reward_negative_prompt] * len(prompts)},
        )
        return args.reward_weight * loss, logs

    score = None
    if fake is not None:
        synthetic: dict[str, torch.Tensor] = {}  # the step's ẑ0, which the fake score is fitted to
        fake_model = runtime.forward_model(accelerator, fake)  # frozen in the generator's update

        def dmd_term(
            x: torch.Tensor, z: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return dmd_loss(
                x, teacher, fake_model, schedule=schedule, cond=cond, uncond=uncond, generator=gen
            )

        def fake_term(
            x: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return fake_score_loss(
                fake,
                synthetic["z0"],
                schedule=schedule,
                weighting=args.fake_weighting,
                cond=cond,
                generator=gen,
            )

        score = score_distillation.ScoreDistillation(
            accelerator,
            args,
            schedule,
            generator=(unet, opt),
            fake=(fake, opt_f),
            loss=dmd_term,
            fake_loss=fake_term,
            gan=gan,
        )

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        phase = phase_of(step)
        lr = args.learning_rate if phase == "mlcd" else args.stage2_learning_rate
        for group in opt.param_groups:
            group["lr"] = lr
        _, prompts = data.batch(gen)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        noise = torch.randn(shape, generator=gen).to(device)
        if phase == "dm-gan":
            assert score is not None
            with runtime.autocast(accelerator):
                z0, z_t, t = self_sampled_states(noise, gen, cond)
            synthetic["z0"] = z0
            logs = score.step(step - phase_of.dmd_start, gen, cond, real=z0, start=(z_t, t))
            logs["stage"] = torch.tensor(PHASE_NUMBER[phase])
            return logs
        with accelerator.accumulate(unet), runtime.autocast(accelerator):
            if phase == "mlcd":
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
            elif phase == "lcd-inter-segment":
                x0 = x0_renoise_sample(
                    unet, schedule, noise, sample_timesteps, cond=cond, generator=gen
                ).sample
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
            else:  # mps
                _, z_t, t = self_sampled_states(noise, gen, cond)
                loss, logs = preference_loss(student_x0(z_t, t, cond), prompts)
            runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
        logs["stage"] = torch.tensor(PHASE_NUMBER[phase])
        return logs

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        _, gen = validation.validation_noise(
            args
        )  # re-noising continues the initial noise's stream (a pipeline's)
        validation.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: (
                x0_renoise_sample(model, schedule, z, sample_timesteps, cond=c, generator=gen).sample
            ),
            step,
        )

    def ema_due(step: int) -> bool:  # the DMD phase's average moves once per generator update
        return (
            score is None or phase_of(step) != "dm-gan" or score.generator_steps_at(step - phase_of.dmd_start)
        )

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema, ema_due=ema_due)
    checkpoints.save_unet(accelerator, unet, args, ema=ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
