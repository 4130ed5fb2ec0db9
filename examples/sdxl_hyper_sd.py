"""Hyper-SD for SDXL: trajectory-segmented consistency distillation (TSCD) on a LoRA student.

Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", 2024
(arXiv:2404.13686), Sec. 3.1 and 4.1. The stages of ``StagePlan.hyper_sd`` (k = 8 → 4 → 2 → 1 segments)
run one after the other, each for an equal share of ``--max_train_steps`` (less ``--one_step_steps``);
the distance between the student side and the (EMA) target side of
:func:`diffdistill.losses.consistency_pair` is the stage's ``mse`` weight times MSE plus its
``adversarial`` weight times the non-saturating GAN loss of an unconditional ``UNetEncoderDiscriminator``
(a trainable copy of the teacher's encoder), which judges both sides at ``t_end``. The teacher is the
same UNet with its adapters disabled (LoRA) or a frozen copy (full UNet), run with classifier-free
guidance: a scale ``omega ~ U[--guidance_scale_min, --guidance_scale_max]`` drawn per sample (Alg. 1 line 6;
the paper gives no range, both ends default to ``--guidance_scale`` 7, a fixed scale). The discriminator
is trained with Adam ``(--discriminator_adam_beta1, --discriminator_adam_beta2) = (0, 0.99)``, the
optimiser of SDXL-Lightning's adversarial stages, whose loss Hyper-SD uses; ``--noise_offset`` (default 0:
off) adds offset noise to the training noise, the paper's "noise perturbation mechanism" (value not given).

Reward feedback (Sec. 3.2, Eq. 13; optional): ``--reward_model module:callable`` names a user reward,
called as ``fn(images, prompts) -> (B,)`` with the decoded images in [-1, 1]; in the last TSCD stage the
student's one-step x0 prediction (in the one-step stage: the generator's sample) is decoded by the
(frozen) VAE with gradients and ``--reward_weight * relu(--reward_margin - score)``
(:func:`diffdistill.losses.reward_hinge_loss`) is added to the loss. A reward that is an ``nn.Module`` is
frozen and moved to the device.

One-step stage (Sec. 3.3; optional): ``--one_step_steps N`` trains the last ``N`` of ``--max_train_steps``
as a one-step generator -- pure noise fed at ``--generator_timestep`` (the paper: 999 for the unified LoRA,
800 for a dedicated one-step UNet) to a clean latent in one call -- by score distillation: the
distribution-matching gradient of :func:`diffdistill.losses.dmd_loss` (Eq. 8) between the real score (the
teacher with CFG) and an online fake score (a trainable copy of the teacher fitted by
:func:`diffdistill.losses.fake_score_loss`; both alternate as in ``sdxl_sim.py``, through
``training.score_distillation.ScoreDistillation``), plus ``--one_step_mse_weight`` times an MSE "for stability" to the
teacher's ``--one_step_teacher_steps``-step DDIM sample from the same noise (the paper does not state the
target: this one is our choice), plus the reward hinge when a reward model is given. The TSCD stages share
the other steps; the output is the one-step model, written like the TSCD one, and the multi-step TSCD
student reached just before the stage is written to ``OUTPUT_DIR/tscd/`` (LoRA file or ``unet/``).

Example::

    accelerate launch examples/sdxl_hyper_sd.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --train_data_dir data/images --output_dir out/hyper-sd --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 8000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffdistill.discriminators import UNetEncoderDiscriminator
from diffdistill.losses import (
    consistency_pair,
    dmd_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    reward_hinge_loss,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    ddim_sample,
    spaced_timesteps,
    tscd_segments,
)
from diffdistill.students import EMA, frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    checkpoints,
    data_sources,
    ema_release,
    loop,
    options,
    runtime,
    score_distillation,
    sdxl_encoding,
    sdxl_models,
    validation,
)

logger = logging.getLogger("sdxl_hyper_sd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-6)
    g = p.add_argument_group("Hyper-SD")
    g.add_argument("--segments", default="8,4,2,1", help="TSCD segment counts k, one stage each")
    g.add_argument("--num_inference_steps", type=int, default=50, help="teacher DDIM grid N")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=7.0,
        help="teacher CFG scale: the one-step stage's, and the TSCD default of both ends of the range below",
    )
    g.add_argument(
        "--guidance_scale_min",
        type=float,
        default=None,
        help="TSCD teacher CFG: omega ~ U[min, max] per sample (Hyper-SD Alg. 1 line 6; the paper gives no "
        "range). Default: --guidance_scale (a fixed scale)",
    )
    g.add_argument("--guidance_scale_max", type=float, default=None, help="default: --guidance_scale")
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="offset noise on the TSCD training noise (Hyper-SD's 'noise perturbation mechanism', citing "
        "Guttenberg's offset noise; the paper gives no value): eps + offset * N(0, 1) per sample and channel",
    )
    g.add_argument("--target", choices=["ema", "online"], default="ema")
    g.add_argument(
        "--target_ema_decay",
        type=float,
        default=None,
        help="EMA target decay (default: the stage plan's 0.95)",
    )
    g.add_argument("--discriminator_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument(
        "--discriminator_adam_beta1",
        type=float,
        default=0.0,
        help="discriminator Adam beta1: Hyper-SD's adversarial loss is SDXL-Lightning's, trained with Adam "
        "(0, 0.99) (Lightning Sec. 3.6)",
    )
    g.add_argument("--discriminator_adam_beta2", type=float, default=0.99, help="discriminator Adam beta2")
    g = p.add_argument_group("one-step score distillation (optional last stage)")
    g.add_argument("--one_step_steps", type=int, default=0, help="steps of the one-step stage (0: none)")
    g.add_argument("--one_step_mse_weight", type=float, default=1.0, help="MSE to the teacher's sample")
    g.add_argument(
        "--one_step_teacher_steps", type=int, default=4, help="teacher DDIM steps of the MSE target"
    )
    score_distillation.add_fake_score_args(g)
    g = p.add_argument_group("reward feedback (last TSCD stage and the one-step stage)")
    g.add_argument(
        "--reward_model",
        default=None,
        help='"module:callable", called as fn(images in [-1, 1] (B, 3, H, W), prompts) -> (B,) scores',
    )
    g.add_argument("--reward_weight", type=float, default=1.0)
    g.add_argument(
        "--reward_margin", type=float, default=None, help="hinge relu(margin - score), reward scale"
    )
    args = options.check_common_args(p.parse_args(argv), image_method=True)
    for end in ("guidance_scale_min", "guidance_scale_max"):
        if getattr(args, end) is None:
            setattr(args, end, args.guidance_scale)
    if args.guidance_scale_min > args.guidance_scale_max:
        raise ValueError(
            f"Expected --guidance_scale_min <= --guidance_scale_max, but got {args.guidance_scale_min} > "
            f"{args.guidance_scale_max} (an unset end defaults to --guidance_scale, {args.guidance_scale})."
        )
    if args.noise_offset < 0:
        raise ValueError(f"Expected --noise_offset >= 0, but got {args.noise_offset}; 0 turns it off.")
    for name in ("discriminator_adam_beta1", "discriminator_adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"Expected --{name} in [0, 1), but got {getattr(args, name)}.")
    if not 0 <= args.one_step_steps < args.max_train_steps:
        raise ValueError(
            f"Expected 0 <= --one_step_steps < --max_train_steps ({args.max_train_steps}) so the TSCD stages "
            f"keep some steps, but got {args.one_step_steps}."
        )
    if args.reward_model is not None:
        if args.reward_margin is None:
            raise ValueError("--reward_model needs --reward_margin (on the reward model's scale).")
        load_reward_model(args.reward_model)  # fail at start-up, not at the last stage
    return args


def load_reward_model(spec: str) -> Any:
    """The callable named by ``"package.module:name"`` (``name`` may be dotted: ``module:Class.method``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"Expected --reward_model as 'module:callable', e.g. 'my_rewards:aesthetic', got {spec!r}."
        )
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"Expected --reward_model {spec!r} to name a callable, but it is {type(obj).__name__}."
        )
    return obj


class _RecordOutput:
    """Calls ``model`` and keeps its last output computed with autograd (the student side's prediction)."""

    def __init__(self, model: Any) -> None:
        self.model, self.output = model, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if torch.is_grad_enabled():
            self.output = out
        return out


def training_noise(
    shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian training noise of ``shape`` ``(B, C, ...)`` drawn from ``generator`` (on its device), plus
    ``noise_offset`` times one more Gaussian per sample and channel (offset noise, Guttenberg 2023, as in
    diffusers' ``--noise_offset``). With ``noise_offset == 0`` nothing more is drawn: the noise, and every
    later draw of the step, is what it was without the option."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        offset = torch.randn((shape[0], shape[1]) + (1,) * (len(shape) - 2), generator=generator)
        noise = noise + noise_offset * offset
    return noise


def guidance_scales(args: argparse.Namespace, batch: int, generator: torch.Generator) -> float | torch.Tensor:
    """The TSCD teacher's CFG scale: ``omega ~ U[--guidance_scale_min, --guidance_scale_max]``, one per sample
    (a ``(batch,)`` tensor; Hyper-SD Alg. 1 line 6), or the number itself when the range is one point (then
    nothing is drawn from ``generator``)."""
    low, high = args.guidance_scale_min, args.guidance_scale_max
    if low == high:
        return float(low)
    return low + (high - low) * torch.rand(batch, generator=generator)


def stage_index(step: int, num_stages: int, max_steps: int) -> int:
    """Stage of optimisation step ``step`` (0-based): equal shares of ``max_steps``."""
    return min(num_stages - 1, step * num_stages // max_steps)


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_hyper_sd")
    if args.target == "ema" and runtime.zero_stage(accelerator) == 3:
        raise ValueError(
            "--target ema averages the student's parameters into a whole copy, and DeepSpeed ZeRO-3 leaves "
            "each process only a flat slice of them: use ZeRO stage 1 or 2, or FSDP, in the accelerate "
            "config, or pass --target online."
        )
    plan = StagePlan.hyper_sd(
        [int(k) for k in args.segments.split(",")], num_inference_steps=args.num_inference_steps
    )
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype)
    unet = parts.unet
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)

    # The discriminator copies the teacher's encoder before any adapter is added.
    # Its head is sized for the bottleneck of --resolution latents (not the UNet config's sample_size).
    disc = UNetEncoderDiscriminator(
        unet,
        conditional=False,
        feature_resolution=sdxl_models.discriminator_feature_resolution(unet, args.resolution),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    fake = copy.deepcopy(unet) if args.one_step_steps else None  # the one-step stage's fake score
    unet, teacher_model = sdxl_models.student_and_teacher(args, unet, device, dtype)
    decay = args.target_ema_decay if args.target_ema_decay is not None else plan[0].options["ema_decay"]
    # The average of a LoRA student's adapters; its frozen base is shared with the student, not copied.
    ema = EMA(unet, decay=decay, trainable_only=True).to(device) if args.target == "ema" else None

    opt = runtime.adamw(unet.parameters(), args)
    d_betas = (args.discriminator_adam_beta1, args.discriminator_adam_beta2)
    opt_d = runtime.adamw(disc.parameters(), args, lr=args.discriminator_learning_rate, betas=d_betas)
    unet, opt, disc, opt_d = runtime.prepare(accelerator, (unet, opt), (disc, opt_d))
    if fake is not None:
        sdxl_models.make_trainable(args, fake, device, dtype)
        opt_f = runtime.adamw(fake.parameters(), args, lr=args.fake_learning_rate)
        fake, opt_f = runtime.prepare(accelerator, (fake, opt_f))
    if ema is not None:  # the consistency target (a LoRA student's is checkpointed as its LoRA only)
        ema_release.register_ema(accelerator, ema, unet)
    release_ema = checkpoints.setup_checkpoints(
        accelerator, args, unet, extra_lora={"fake": fake} if fake is not None else None
    )
    data = data_sources.StepData(args, need_images=True)
    # The one-step stage uses the captions only: its steps load (decode) no images, in workers either.
    data.load_until_step = args.max_train_steps - args.one_step_steps if args.one_step_steps else None
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    teacher = TeacherSolver(teacher_model, schedule, guidance_scale=args.guidance_scale)
    with sdxl_models.zero3_init_disabled():  # a transformers reward model loads whole, as the frozen encoders
        reward_fn = load_reward_model(args.reward_model) if args.reward_model else None
    if isinstance(reward_fn, torch.nn.Module):
        sdxl_models.freeze(reward_fn)
        reward_fn.to(device)
    tscd_steps = args.max_train_steps - args.one_step_steps
    state: dict[str, Any] = {}

    def reward_term(x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward hinge of clean latents ``x0``, decoded with gradients."""
        images = sdxl_encoding.decode_pixels(parts.vae, x0)
        r_loss, r_logs = reward_hinge_loss(
            images, args.reward_margin, reward_fn=lambda x: reward_fn(x, state["prompts"])
        )
        return args.reward_weight * r_loss, r_logs

    def one_step_loss(
        x: torch.Tensor, z: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, dmd_logs = dmd_loss(
            x,
            teacher,
            runtime.forward_model(accelerator, fake),
            schedule=schedule,
            cond=cond,
            uncond=uncond,
            generator=gen,
        )
        logs = {f"dmd_{k}": v for k, v in dmd_logs.items()}
        if args.one_step_mse_weight > 0:
            timesteps = spaced_timesteps(
                args.one_step_teacher_steps, "trailing", num_train_timesteps=schedule.num_train_timesteps
            )
            target = ddim_sample(
                teacher_model,
                schedule,
                z,
                timesteps,
                cond=cond,
                uncond=uncond,
                guidance_scale=args.guidance_scale,
            ).sample
            mse = F.mse_loss(x, target.float())
            loss = loss + args.one_step_mse_weight * mse
            logs["mse"] = mse.detach()
        if reward_fn is not None:
            r_loss, r_logs = reward_term(x)
            loss = loss + r_loss
            logs.update(r_logs)
        logs["loss"] = loss.detach()
        return loss, logs

    score = None
    if fake is not None:
        score = score_distillation.ScoreDistillation(
            accelerator, args, schedule, generator=(unet, opt), fake=(fake, opt_f), loss=one_step_loss
        )
    global_step = checkpoints.resume(accelerator, args)

    def one_step_train_step(
        score: score_distillation.ScoreDistillation, gen: torch.Generator, step: int
    ) -> dict[str, torch.Tensor]:
        prompts = data.prompts_batch(gen)
        state["prompts"] = prompts
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        logs = score.step(step - tscd_steps, gen, cond)
        if ema is not None and accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(unet))
        logs["k"] = torch.tensor(0.0)  # the one-step stage
        return logs

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        if score is not None and step >= tscd_steps:
            return one_step_train_step(score, gen, step)
        index = stage_index(step, len(plan), tscd_steps)
        stage = plan[index]
        use_reward = reward_fn is not None and index == len(plan) - 1
        student_fn = _RecordOutput(unet)
        w_mse, w_adv = stage.loss_weights.get("mse", 1.0), stage.loss_weights.get("adversarial", 0.0)
        x0, prompts = data.latents_batch(gen, parts.vae, device)
        state["prompts"] = prompts
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        sample = tscd_segments(
            x0.shape[0],
            stage.num_segments or 1,
            args.num_inference_steps,
            schedule.num_train_timesteps,
            generator=gen,
            device=device,
        )
        noise = training_noise(tuple(x0.shape), gen, args.noise_offset).to(device)
        omega = guidance_scales(args, x0.shape[0], gen)
        if isinstance(omega, torch.Tensor):
            omega = omega.to(device)
        x_t = schedule.add_noise(x0, noise, sample.t)
        logs: dict[str, torch.Tensor] = {}
        with accelerator.accumulate(unet, disc), runtime.autocast(accelerator):
            pair = consistency_pair(
                student_fn,
                teacher,
                x_t,
                sample,
                cond,
                uncond,
                target=ema if ema is not None else "online",
                parameterization="move",
                guidance_scale=omega,
            )
            student, target = pair.student.float(), pair.target.float()
            loss = w_mse * F.mse_loss(student, target)
            t_judge = pair.sample.t_end.clamp(min=0)
            ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
            with frozen(disc):  # until the backward below (checkpointed D recomputes there)
                if w_adv > 0:
                    judge = runtime.forward_model(accelerator, disc)
                    g_loss, _ = gan_generator_loss(judge(student, t_judge, ehs, added))
                    loss = loss + w_adv * g_loss
                    logs["generator_adv"] = g_loss.detach()
                if use_reward:  # the one-step x0 of the student's prediction at t, decoded with gradients
                    r_loss, r_logs = reward_term(
                        schedule.to_x0(student_fn.output.sample.float(), x_t, pair.sample.t)
                    )
                    loss = loss + r_loss
                    logs.update(r_logs)
                runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
            if w_adv > 0:
                d_loss, _ = gan_discriminator_loss(
                    disc(target, t_judge, ehs, added), disc(student.detach(), t_judge, ehs, added)
                )
                runtime.backward(accelerator, d_loss, disc)
                runtime.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
                logs["discriminator"] = d_loss.detach()
        if ema is not None and accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(unet))
        logs["loss"] = loss.detach()
        logs["k"] = torch.tensor(float(stage.num_segments or 1))
        return logs

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        one_step = step - 1 >= tscd_steps  # the last step was one of the one-step stage
        k = 1 if one_step else plan[stage_index(step - 1, len(plan), tscd_steps)].num_segments or 1
        timesteps = spaced_timesteps(k, "trailing", num_train_timesteps=schedule.num_train_timesteps)

        def sample_fn(z: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            if one_step:
                return validation.one_step_x0(model, schedule, z, args.generator_timestep, c)
            return ddim_sample(model, schedule, z, timesteps, cond=c).sample

        validation.log_validation(accelerator, args, parts, sample_fn, step)

    def after_step(step: int) -> None:
        if (
            args.one_step_steps and step == tscd_steps
        ):  # the multi-step TSCD student, before the one-step stage
            with release_ema.swapped_in() if release_ema is not None else contextlib.nullcontext():
                checkpoints.save_unet(accelerator, unet, args, folder="tscd")

    loop.train_loop(
        accelerator,
        args,
        global_step,
        train_step,
        validate,
        data=data,
        ema=release_ema,
        after_step=after_step,
    )
    checkpoints.save_unet(accelerator, unet, args, ema=release_ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
