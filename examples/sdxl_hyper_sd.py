"""Hyper-SD for SDXL: trajectory-segmented consistency distillation (TSCD) on a LoRA student.

Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", 2024
(arXiv:2404.13686). The run is, in order: the TSCD stages, the optional human-feedback phase
(``--feedback_steps``), the optional one-step stage (``--one_step_steps``); the TSCD stages share the steps
the other two leave.

TSCD (Sec. 3.1 and 4.1): the stages of ``StagePlan.hyper_sd`` (k = 8 → 4 → 2 → 1 segments) run one after
the other, each for an equal share of the TSCD steps; the distance between the student side and the (EMA)
target side of :func:`diffdistill.losses.consistency_pair` is the stage's ``mse`` weight times MSE plus its
``adversarial`` weight times the non-saturating GAN loss of an unconditional ``UNetEncoderDiscriminator``
(a trainable copy of the base UNet's encoder and mid block with a strided-conv head; one D for the whole
run, not reset between stages), which judges both sides at ``t_end``. A plan whose stages all have
adversarial weight 0 (one stage, e.g. ``--segments 1``: ``StagePlan.hyper_sd``'s single-stage plan is MSE
only) builds no D, and its discriminator flags are refused (our choice: the paper gives no weights). The teacher is the
same UNet with its adapters disabled (LoRA) or a frozen copy (full UNet), run with classifier-free
guidance: a scale ``omega ~ U[--guidance_scale_min, --guidance_scale_max]`` drawn per sample (Alg. 1 line 6;
the paper gives no range, both ends default to ``--guidance_scale`` 7, a fixed scale). The discriminator
is trained with Adam ``(--discriminator_adam_beta1, --discriminator_adam_beta2) = (0, 0.99)``, the
optimiser of SDXL-Lightning's adversarial stages, whose loss Hyper-SD uses; ``--noise_offset`` (default 0:
off) adds offset noise to the training noise, the paper's "noise perturbation mechanism" (value not given).
No reward scores the TSCD stages (the paper's feedback scores x0' reached from pure noise, below).

Human feedback (Sec. 3.2, Eq. 10 and 13-15; optional, needs ``--use_lora``): ``--feedback_steps N`` trains a
second LoRA (peft adapter ``"feedback"``) on top of the TSCD LoRA, which stays active and frozen; as the
paper, a separate LoRA merged with the TSCD one at the end. Each step:

- Rewards (Eq. 10 and 13), as ReFL: the student (both LoRAs) denoises pure noise ``x_T`` without gradient
  by DDIM moves along the trailing ``--feedback_rollout_steps`` grid down to ``t ~ U{t_l..t_r}``
  (``--feedback_timestep_range``, one ``t`` per batch), then one call with gradient predicts x0' there
  (:func:`refl_x0`). The frozen VAE decodes x0' with gradients; the loss is the sum over the
  ``--reward_model`` options (repeat it: the paper uses an aesthetic predictor and ImageReward) of
  ``--reward_weight * relu(--reward_margin - r(x0', prompts))`` (:func:`diffdistill.losses.reward_hinge_loss`).
- Perceptual feedback (Eq. 14; with ``--perceptual_model``): x0' reached the same way from dataset latents
  noised to ``t_a = --perceptual_start_timestep`` (down to ``min(t, t_a)``) is scored by a user hook,
  ``fn(images, reference_images, prompts) -> (B,)`` per-sample losses (or their 0-d mean), weighted by
  ``--perceptual_weight`` and added (Eq. 15). The paper's loss is an instance-segmentation loss (SOLO
  against COCO annotations) whose weights cannot ship; the hook gets the decoded x0' (with gradients) and
  the dataset images as the VAE reconstructs them (no gradient), both in [-1, 1] -- our choice: the data
  pipeline carries images and captions, not annotations, so a hook derives its targets from the reference.
- Not given by the paper, our choices: the feedback LoRA has the TSCD LoRA's rank and alpha; ``t_l, t_r =
  0, 250`` (about ReFL's stop range: it stops at one of the last 10 of 40 steps); a 4-step rollout grid
  (Hyper-SD's N-step LoRAs sample on trailing DDIM grids); ``t_a = 500`` (mid-trajectory, so the real
  image's layout, which its annotations describe, survives); the margins ``alpha_d`` (required options).
- Output: the two LoRAs merged exactly into the one unified LoRA file the script writes
  (:func:`training.lora_adapters.merged_lora_state`: rank r1 + r2, loadable by diffusers), and the feedback LoRA alone in
  ``OUTPUT_DIR/feedback/``. A reward (or hook) that is an ``nn.Module`` is frozen and moved to the device.
- One process or DDP: the phase freezes one LoRA at a time by switching ``requires_grad``, so a run with
  ``--feedback_steps`` wraps the UNet with DDP's ``find_unused_parameters`` (a graph walk per step); FSDP2 and
  DeepSpeed, which shard the adapters at prepare, are refused. A full-UNet student (no ``--use_lora``) is
  refused too: there is no TSCD LoRA to train a separate one on.

One-step stage (Sec. 3.3; optional): ``--one_step_steps N`` trains the last ``N`` of ``--max_train_steps``
as a one-step generator -- pure noise fed at ``--generator_timestep`` (the paper: 999 for the unified LoRA,
800 for a dedicated one-step UNet; ``--generator_input noised``: SiD's input, the zero image noised there) to a
clean latent in one call -- by score distillation: the
distribution-matching gradient of :func:`diffdistill.losses.dmd_loss` (Eq. 8) between the real score (the
teacher with CFG) and an online fake score (a trainable copy of the teacher fitted by
:func:`diffdistill.losses.fake_score_loss`; both alternate as in ``sdxl_sim.py``, through
``training.score_distillation.ScoreDistillation``), plus ``--one_step_mse_weight`` times an MSE "for stability" to the
teacher's ``--one_step_teacher_steps``-step DDIM sample from the same noise (the paper does not state the
target: this one is our choice), plus the reward hinges of the feedback phase (Eq. 13) on the generator's
samples when a reward model is given (the paper adds "the human-feedback losses"; the perceptual hook is not
used here: this stage loads no dataset images). It runs after the feedback phase and trains the TSCD LoRA
with the feedback LoRA active and frozen. The output is the one-step model, written like the TSCD one (with a
feedback phase: the unified LoRA), and the multi-step student reached just before the stage (likewise) is
written to ``OUTPUT_DIR/tscd/`` (LoRA file or ``unet/``). With ``--use_ema`` (the released average; the paper
keeps only the consistency target's EMA and says nothing of one, so all of this is our choice) ``tscd/`` holds
the average of the steps before the stage, and the average restarts when the stage starts
(``ReleaseEMA.restart``: the current weights copied in, the ``--ema_warmup`` count back to 0), so the one-step
output averages the one-step stage's own steps only -- an average of the multi-step stages' weights is not a
one-step model (without the restart, ``--ema_warmup none --ema_decay 0.9999`` and 2000 one-step steps would
leave 0.9999^2000 = 82 % of its weight on pre-stage weights). The TSCD stages and the feedback phase share one
average: they refine one multi-step model, each resuming the weights of the one before (Sec. 3.1).

Example::

    accelerate launch examples/sdxl_hyper_sd.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --train_data_dir data/images --output_dir out/hyper-sd --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 8000

    # the same run (same options for "...") with 1000 feedback steps after its 8000 TSCD steps, with two
    # rewards of a user module my_rewards.py (one process or DDP)
    accelerate launch examples/sdxl_hyper_sd.py ... --max_train_steps 9000 \\
        --feedback_steps 1000 --reward_model my_rewards:aesthetic --reward_margin 6.5 \\
        --reward_model my_rewards:image_reward --reward_margin 1.0 --reward_weight 1 --reward_weight 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import sys
import warnings
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
from diffdistill.students import EMA, add_lora, frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    checkpoints,
    compilation,
    data_sources,
    ema_release,
    loop,
    lora_adapters,
    options,
    rewards,
    runtime,
    score_distillation,
    sdxl_encoding,
    sdxl_models,
    validation,
)

logger = logging.getLogger("sdxl_hyper_sd")

TSCD_ADAPTER, FEEDBACK_ADAPTER = "default", "feedback"  # the peft adapter names of the two LoRAs
ADAPTERS = (TSCD_ADAPTER, FEEDBACK_ADAPTER)  # merged in this order into the unified LoRA


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
    g = p.add_argument_group("human feedback (Sec. 3.2; optional phase after the TSCD stages)")
    g.add_argument(
        "--feedback_steps",
        type=int,
        default=0,
        help="steps of the feedback phase: a separate LoRA trained on top of the frozen TSCD LoRA after the "
        "TSCD stages, then merged with it (0: none; needs --use_lora)",
    )
    g.add_argument("--feedback_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument(
        "--feedback_timestep_range",
        type=int,
        nargs=2,
        default=(0, 250),
        metavar=("T_L", "T_R"),
        help="x0' is predicted at t ~ U{T_L..T_R}, one per batch (the paper's [t_left, t_right], not given; "
        "default: about ReFL's stop range)",
    )
    g.add_argument(
        "--feedback_rollout_steps",
        type=int,
        default=4,
        help="the no-grad rollout to t takes DDIM moves along this many trailing timesteps (our choice)",
    )
    g.add_argument(
        "--reward_model",
        action="append",
        default=None,
        help=rewards.REWARD_CALL + "; once per reward (the paper: an aesthetic predictor and ImageReward). "
        "Scores x0' in the feedback phase and the one-step stage's samples",
    )
    g.add_argument(
        "--reward_weight",
        type=float,
        action="append",
        default=None,
        help="weight of each reward's hinge, once per --reward_model in order (default: 1 each)",
    )
    g.add_argument(
        "--reward_margin",
        type=float,
        action="append",
        default=None,
        help="hinge relu(margin - score) of each reward, once per --reward_model in order, on its scale (the "
        "paper's alpha_d, not given)",
    )
    g.add_argument(
        "--perceptual_model",
        default=None,
        help='"module:callable", called as fn(images, reference_images, prompts) -> (B,) losses: the paper\'s '
        "instance-segmentation feedback (Eq. 14) as a user hook (feedback phase only)",
    )
    g.add_argument("--perceptual_weight", type=float, default=1.0, help="weight of the perceptual loss")
    g.add_argument(
        "--perceptual_start_timestep",
        type=int,
        default=500,
        help="t_a: the perceptual branch starts from dataset latents noised to t_a (not given; our choice)",
    )
    # None: not given (refused where the stage or phase that reads them does not run; filled below)
    p.set_defaults(
        **{name: None for name in (*ONE_STEP_DEFAULTS, *FEEDBACK_DEFAULTS, *DISCRIMINATOR_DEFAULTS)}
    )
    args = options.check_common_args(p.parse_args(argv), image_method=True)
    check_stage_options(args)
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
    check_feedback_args(args)
    return args


#: Defaults of the options that only the one-step stage, the feedback phase or the discriminator read.
ONE_STEP_DEFAULTS = {
    "generator_timestep": 999,
    "generator_input": "noise",
    "one_step_mse_weight": 1.0,
    "one_step_teacher_steps": 4,
    "generator_every": 1,
    "fake_learning_rate": None,
}
FEEDBACK_DEFAULTS = {"feedback_learning_rate": None, "feedback_timestep_range": (0, 250)}
DISCRIMINATOR_DEFAULTS = {
    "discriminator_learning_rate": None,
    "discriminator_adam_beta1": 0.0,
    "discriminator_adam_beta2": 0.99,
}


def check_stage_options(args: argparse.Namespace) -> None:
    """Refuse the options of a stage or phase the run does not have, fill their defaults, and bound the
    TSCD and one-step values (``ValueError`` with the fix).

    ``--one_step_*`` / ``--generator_*`` / ``--fake_learning_rate`` need ``--one_step_steps``; ``--feedback_*``
    need ``--feedback_steps``; the discriminator options need a stage with adversarial weight
    (``StagePlan.hyper_sd``: a one-stage plan is MSE only, and then no discriminator is built);
    ``--target_ema_decay`` needs ``--target ema``."""
    try:
        segments = [int(k) for k in args.segments.split(",")]
    except ValueError:
        raise ValueError(
            f"Expected --segments to be comma-separated segment counts, e.g. 8,4,2,1, but got {args.segments!r}."
        ) from None
    if args.num_inference_steps < 1 or 1000 % args.num_inference_steps:
        raise ValueError(
            f"Expected --num_inference_steps to divide 1000 (e.g. 50, 40, 25), but got {args.num_inference_steps}."
        )
    if len(set(segments)) != len(segments) or not all(1 <= k <= args.num_inference_steps for k in segments):
        raise ValueError(
            f"Expected distinct segment counts in [1, --num_inference_steps ({args.num_inference_steps})], but "
            f"got {segments}."
        )
    args.adversarial = has_adversarial_stage(args)
    groups = (
        (ONE_STEP_DEFAULTS, args.one_step_steps > 0, "the one-step stage (--one_step_steps N)"),
        (FEEDBACK_DEFAULTS, args.feedback_steps > 0, "the feedback phase (--feedback_steps N)"),
        (
            DISCRIMINATOR_DEFAULTS,
            args.adversarial,
            f"the discriminator (a stage with adversarial weight; --segments {args.segments} has none: a "
            "one-stage plan is MSE only)",
        ),
    )
    for defaults, used, what in groups:
        given = [f"--{name}" for name in defaults if getattr(args, name) is not None]
        if given and not used:
            raise ValueError(f"{', '.join(given)} configure {what}, which this run does not have: drop them.")
        for name, default in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.target_ema_decay is not None:
        if args.target != "ema":
            raise ValueError("--target_ema_decay is the decay of --target ema: drop it with --target online.")
        if not 0 <= args.target_ema_decay <= 1:
            raise ValueError(f"Expected --target_ema_decay in [0, 1], but got {args.target_ema_decay}.")
    why = "the one-step generator's input timestep; the paper: 999, or 800 for a dedicated one-step UNet"
    options.check_range(args, "generator_timestep", low=0, high=999, why=why)
    options.check_range(args, "one_step_mse_weight", low=0, why="0: no MSE")
    for name in ("one_step_teacher_steps", "generator_every"):
        options.check_range(args, name, low=1)


def has_adversarial_stage(args: argparse.Namespace) -> bool:
    """Whether a stage of the run's plan (``--segments``) has adversarial weight, i.e. trains the discriminator."""
    plan = StagePlan.hyper_sd(
        [int(k) for k in args.segments.split(",")], num_inference_steps=args.num_inference_steps
    )
    return any(stage.loss_weights.get("adversarial", 0) > 0 for stage in plan)


def check_feedback_args(args: argparse.Namespace) -> None:
    """Validate the human-feedback options in place (one weight and margin per reward, the phase's needs)."""
    models = args.reward_model or []
    for spec in models:
        rewards.load_reward_model(spec)  # fail at start-up, not at the feedback phase
    if args.perceptual_model is not None:
        load_perceptual_model(args.perceptual_model)
    margins = args.reward_margin or []
    if models and not margins:
        raise ValueError(
            "--reward_model needs --reward_margin (on the reward model's scale), once per reward."
        )
    if len(margins) != len(models):
        raise ValueError(
            f"Expected one --reward_margin per --reward_model, in order, but got {len(models)} models and "
            f"{len(margins)} margin(s)."
        )
    weights = args.reward_weight if args.reward_weight is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(
            f"Expected --reward_weight once per --reward_model (or never: weight 1 each), but got "
            f"{len(models)} models and {len(weights)} weight(s)."
        )
    args.reward_model, args.reward_weight, args.reward_margin = models, weights, margins
    if args.feedback_steps < 0:
        raise ValueError(
            f"Expected --feedback_steps >= 0 (0: no feedback phase), but got {args.feedback_steps}."
        )
    if args.max_train_steps - args.feedback_steps - args.one_step_steps < 1:
        raise ValueError(
            f"Expected --feedback_steps + --one_step_steps < --max_train_steps ({args.max_train_steps}) to keep "
            f"at least one TSCD step, but got {args.feedback_steps} + {args.one_step_steps}."
        )
    if args.feedback_steps:
        if not args.use_lora:
            raise ValueError(
                "The feedback phase trains a separate LoRA on top of the TSCD LoRA (Hyper-SD Sec. 3.2), which a "
                "full-UNet student does not have: pass --use_lora, or drop --feedback_steps."
            )
        if not models and args.perceptual_model is None:
            raise ValueError(
                "--feedback_steps needs --reward_model or --perceptual_model (the phase's losses)."
            )
    else:
        if models and not args.one_step_steps:
            raise ValueError(
                "Hyper-SD's reward hinge scores only the feedback phase (--feedback_steps, x0' reached from pure "
                "noise) and the one-step stage (--one_step_steps), not the TSCD stages: pass one of them with "
                "--reward_model."
            )
        if args.perceptual_model is not None:
            raise ValueError("--perceptual_model is used by the feedback phase only: pass --feedback_steps.")
    t_l, t_r = args.feedback_timestep_range
    if not 0 <= t_l <= t_r:
        raise ValueError(
            f"Expected --feedback_timestep_range T_L T_R with 0 <= t_l <= t_r, but got {t_l} {t_r}."
        )
    if args.feedback_rollout_steps < 1:
        raise ValueError(f"Expected --feedback_rollout_steps >= 1, but got {args.feedback_rollout_steps}.")
    if args.perceptual_start_timestep < 0:
        raise ValueError(
            f"Expected --perceptual_start_timestep >= 0, but got {args.perceptual_start_timestep}."
        )


def load_perceptual_model(spec: str) -> Any:
    """The callable ``--perceptual_model`` names (``"module:callable"``, loaded as a reward model is)."""
    return rewards.load_reward_model(spec, option="--perceptual_model")


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


def refl_x0(
    model: Any,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t_start: int,
    t_stop: int,
    cond: dict[str, Any],
    grid: Any,
) -> torch.Tensor:
    """The student's clean prediction x0' at ``t_stop``, reached by denoising ``x`` from ``t_start`` (ReFL as
    Hyper-SD Sec. 3.2 / Eq. 10 uses it).

    Without gradient, ``model`` takes DDIM moves (``NoiseSchedule.ddim_step``) from ``t_start`` through the
    timesteps of ``grid`` strictly between ``t_stop`` and ``t_start``, down to ``t_stop``; then one call with
    gradient predicts x0' there (``NoiseSchedule.to_x0``). ``x`` is pure noise at ``t_start = T - 1`` for the
    rewards (Eq. 10, 13) and dataset latents noised to ``t_start`` for the perceptual loss (Eq. 14). One
    timestep for the whole batch; ``t_stop == t_start`` makes only the call with gradient.
    """

    def at(t: int) -> torch.Tensor:
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    points = [int(t_start)] + [int(t) for t in grid if t_stop < int(t) < t_start] + [int(t_stop)]
    with torch.no_grad():
        for t_from, t_to in itertools.pairwise(points):
            if t_to < t_from:
                out = model(x, at(t_from), **cond).sample
                x = schedule.ddim_step(out.to(x.dtype), at(t_from), x, at(t_to))
    out = model(x, at(t_stop), **cond).sample
    return schedule.to_x0(out.to(x.dtype), x, at(t_stop))


def perceptual_loss(
    hook: Any, images: torch.Tensor, reference: torch.Tensor, prompts: list[str]
) -> torch.Tensor:
    """The mean of ``hook(images, reference, prompts)``: per-sample losses ``(B,)`` (or their 0-d mean) of a
    user's perceptual model (Hyper-SD Eq. 14); a float32 0-d tensor."""
    out = hook(images, reference, prompts)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(
            f"Expected --perceptual_model to return a floating tensor of per-sample losses (B,), but got "
            f"{type(out).__name__ if not isinstance(out, torch.Tensor) else out.dtype}."
        )
    if not (out.ndim == 0 or (out.ndim == 1 and out.shape[0] == images.shape[0])):
        raise ValueError(
            f"Expected --perceptual_model to return ({images.shape[0]},) per-sample losses or a 0-d loss, but got "
            f"shape {tuple(out.shape)}."
        )
    return out.float().mean()


def main(args: argparse.Namespace) -> None:
    # The feedback phase freezes the TSCD LoRA mid-run: DDP must accept weights without a gradient.
    accelerator = runtime.make_accelerator(
        args, "sdxl_hyper_sd", find_unused_parameters=args.feedback_steps > 0
    )
    if args.target == "ema" and runtime.zero_stage(accelerator) == 3:
        raise ValueError(
            "--target ema averages the student's parameters into a whole copy, and DeepSpeed ZeRO-3 leaves "
            "each process only a flat slice of them: use ZeRO stage 1 or 2, or FSDP, in the accelerate "
            "config, or pass --target online."
        )
    if args.feedback_steps and runtime.is_sharded(accelerator):
        raise ValueError(
            "The feedback phase (--feedback_steps) freezes the TSCD LoRA by turning its gradients off mid-run, "
            "which is supported with DDP (find_unused_parameters) but not under FSDP2 or DeepSpeed, whose "
            "prepared models shard the adapters' weights: run the feedback phase with DDP or on one process."
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
    # None where no stage has adversarial weight (a one-stage plan): nothing would step it.
    disc = (
        UNetEncoderDiscriminator(
            unet,
            conditional=False,
            feature_resolution=sdxl_models.discriminator_feature_resolution(unet, args.resolution),
            gradient_checkpointing=args.gradient_checkpointing,
        )
        if args.adversarial
        else None
    )
    fake = copy.deepcopy(unet) if args.one_step_steps else None  # the one-step stage's fake score
    unet, teacher_model = sdxl_models.student_and_teacher(args, unet, device, dtype)
    if args.feedback_steps:  # the feedback LoRA (Sec. 3.2), beside the TSCD LoRA; B = 0 until its phase
        with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            add_lora(unet, rank=args.lora_rank, alpha=args.lora_alpha, adapter_name=FEEDBACK_ADAPTER)
        unet.set_adapters([TSCD_ADAPTER, FEEDBACK_ADAPTER])  # both active, both trainable until train_only
        sdxl_models.upcast_trainable(unet)
    decay = args.target_ema_decay if args.target_ema_decay is not None else plan[0].options["ema_decay"]
    # The average of a LoRA student's adapters; its frozen base is shared with the student, not copied.
    ema = EMA(unet, decay=decay, trainable_only=True).to(device) if args.target == "ema" else None

    if args.feedback_steps:  # one optimiser, the feedback LoRA in its own group (its learning rate)
        opt = runtime.adamw(lora_adapters.adapter_params(unet, TSCD_ADAPTER), args)
        opt.add_param_group(
            {
                "params": lora_adapters.adapter_params(unet, FEEDBACK_ADAPTER),
                "lr": args.learning_rate
                if args.feedback_learning_rate is None
                else args.feedback_learning_rate,
            }
        )
    else:
        opt = runtime.adamw(unet.parameters(), args)
    # --compile (before any forward)
    compilation.compile_networks(args, unet, teacher_model, disc, fake, accelerator=accelerator)
    opt_d = None
    if disc is not None:
        d_betas = (args.discriminator_adam_beta1, args.discriminator_adam_beta2)
        opt_d = runtime.adamw(disc.parameters(), args, lr=args.discriminator_learning_rate, betas=d_betas)
        unet, opt, disc, opt_d = runtime.prepare(accelerator, (unet, opt), (disc, opt_d))
    else:
        unet, opt = runtime.prepare(accelerator, (unet, opt))
    if fake is not None:
        sdxl_models.make_trainable(args, fake, device, dtype)
        opt_f = runtime.adamw(fake.parameters(), args, lr=args.fake_learning_rate)
        fake, opt_f = runtime.prepare(accelerator, (fake, opt_f))
    if ema is not None:  # the consistency target (a LoRA student's is checkpointed as its LoRA only)
        ema_release.register_ema(accelerator, ema, unet)
    release_ema = checkpoints.setup_checkpoints(
        accelerator, args, unet, extra_lora={"fake": fake} if fake is not None else None
    )
    tscd_steps = args.max_train_steps - args.feedback_steps - args.one_step_steps
    one_step_start = tscd_steps + args.feedback_steps  # the feedback phase runs in between
    data = data_sources.StepData(args, need_images=True)
    # Later phases that use the captions only load (decode) no images, in workers either: the one-step stage,
    # and the feedback phase without a perceptual model.
    image_steps = tscd_steps + (args.feedback_steps if args.perceptual_model else 0)
    data.load_until_step = image_steps if image_steps < args.max_train_steps else None
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    teacher = TeacherSolver(teacher_model, schedule, guidance_scale=args.guidance_scale)
    # Frozen, on the device (an nn.Module); loaded whole under ZeRO-3, as the frozen encoders.
    reward_models = [rewards.frozen_reward_model(spec, device) for spec in args.reward_model]
    perceptual = None
    if args.perceptual_model is not None:  # frozen and placed as a reward model is
        perceptual = rewards.frozen_reward_model(args.perceptual_model, device, option="--perceptual_model")
    T = schedule.num_train_timesteps
    if args.feedback_steps and max(args.feedback_timestep_range[1], args.perceptual_start_timestep) >= T:
        raise ValueError(
            f"Expected --feedback_timestep_range and --perceptual_start_timestep below the schedule's {T} "
            f"timesteps, but got {args.feedback_timestep_range[1]} and {args.perceptual_start_timestep}."
        )
    rollout_grid = spaced_timesteps(args.feedback_rollout_steps, "trailing", num_train_timesteps=T).tolist()
    latent_shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
    state: dict[str, Any] = {}

    def reward_term(x0: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 13 for every reward: the sum of ``weight * mean(relu(margin - r(images, prompts)))`` of clean
        latents ``x0``, decoded once with gradients."""
        images = sdxl_encoding.decode_pixels(parts.vae, x0)
        total, logs = torch.zeros((), device=images.device), {}
        for i, (fn, weight, margin) in enumerate(zip(reward_models, args.reward_weight, args.reward_margin)):
            r_loss, r_logs = reward_hinge_loss(images, margin, reward_fn=lambda x, fn=fn: fn(x, prompts))
            total = total + weight * r_loss
            logs.update({(f"{k}_{i}" if len(reward_models) > 1 else k): v for k, v in r_logs.items()})
        return total, logs

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
        if reward_models:
            r_loss, r_logs = reward_term(x, state["prompts"])
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
        if args.feedback_steps:  # the feedback LoRA stays active, frozen
            lora_adapters.train_only(unet, TSCD_ADAPTER)
        if release_ema is not None and step == one_step_start:  # our choice: the stage's own average
            release_ema.restart()  # (each micro-batch of the step: the weights move only at its end)
        prompts = data.prompts_batch(gen)
        state["prompts"] = prompts
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        logs = score.step(step - one_step_start, gen, cond)
        if ema is not None and accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(unet))
        logs["k"] = torch.tensor(0.0)  # the one-step stage
        return logs

    def feedback_train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """Human feedback (Sec. 3.2): the feedback LoRA trained on Eq. 13 (+ Eq. 14) at x0' of a rollout."""
        lora_adapters.train_only(unet, FEEDBACK_ADAPTER)  # the TSCD LoRA stays active, frozen
        if perceptual is not None:
            x_real, prompts = data.latents_batch(gen, parts.vae, device)
        else:
            prompts = data.prompts_batch(gen)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        t_l, t_r = args.feedback_timestep_range
        t_stop = int(torch.randint(t_l, t_r + 1, (1,), generator=gen))
        logs: dict[str, torch.Tensor] = {"feedback_t": torch.tensor(float(t_stop))}
        with accelerator.accumulate(unet), runtime.autocast(accelerator):
            loss = torch.zeros((), device=device)
            if reward_models:  # Eq. 10 and 13: x0' reached from pure noise x_T
                z = torch.randn(latent_shape, generator=gen).to(device)
                r_loss, r_logs = reward_term(
                    refl_x0(unet, schedule, z, T - 1, t_stop, cond, rollout_grid), prompts
                )
                loss = loss + r_loss
                logs.update(r_logs)
            if perceptual is not None:  # Eq. 14: x0' reached from dataset latents noised to t_a
                t_a = args.perceptual_start_timestep
                x_ta = schedule.add_noise(x_real, torch.randn(x_real.shape, generator=gen).to(device), t_a)
                x0 = refl_x0(unet, schedule, x_ta, t_a, min(t_stop, t_a), cond, rollout_grid)
                with torch.no_grad():
                    reference = sdxl_encoding.decode_pixels(parts.vae, x_real)
                p_loss = perceptual_loss(
                    perceptual, sdxl_encoding.decode_pixels(parts.vae, x0), reference, prompts
                )
                loss = loss + args.perceptual_weight * p_loss
                logs["perceptual"] = p_loss.detach()
            runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
        logs["loss"] = loss.detach()
        return logs

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        if score is not None and step >= one_step_start:
            return one_step_train_step(score, gen, step)
        if step >= tscd_steps:
            return feedback_train_step(gen, step)
        if args.feedback_steps:  # the feedback LoRA stays active, frozen (its B = 0: no effect yet)
            lora_adapters.train_only(unet, TSCD_ADAPTER)
        index = stage_index(step, len(plan), tscd_steps)
        stage = plan[index]
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
        with (
            accelerator.accumulate(*(m for m in (unet, disc) if m is not None)),
            runtime.autocast(accelerator),
        ):
            pair = consistency_pair(
                unet,
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
            with frozen(disc) if disc is not None else contextlib.nullcontext():  # until the backward below
                if w_adv > 0:
                    judge = runtime.forward_model(accelerator, disc)
                    g_loss, _ = gan_generator_loss(judge(student, t_judge, ehs, added))
                    loss = loss + w_adv * g_loss
                    logs["generator_adv"] = g_loss.detach()
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
        one_step = step - 1 >= one_step_start  # the last step was one of the one-step stage
        k = 1 if one_step else plan[stage_index(step - 1, len(plan), tscd_steps)].num_segments or 1
        timesteps = spaced_timesteps(k, "trailing", num_train_timesteps=schedule.num_train_timesteps)

        def sample_fn(z: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            if one_step:
                return validation.one_step_x0(
                    model, schedule, z, args.generator_timestep, c, args.generator_input
                )
            return ddim_sample(model, schedule, z, timesteps, cond=c).sample

        validation.log_validation(accelerator, args, parts, sample_fn, step)

    def after_step(step: int) -> None:
        if (
            args.one_step_steps and step == one_step_start
        ):  # the multi-step student, before the one-step stage
            with release_ema.swapped_in() if release_ema is not None else contextlib.nullcontext():
                if args.feedback_steps:
                    lora_adapters.save_merged_lora(accelerator, unet, args, ADAPTERS, folder="tscd")
                else:
                    checkpoints.save_unet(accelerator, unet, args, folder="tscd")

    def ema_due(step: int) -> bool:  # the one-step stage's average moves once per generator update
        return score is None or step < one_step_start or score.generator_steps_at(step - one_step_start)

    loop.train_loop(
        accelerator,
        args,
        global_step,
        train_step,
        validate,
        data=data,
        ema=release_ema,
        ema_due=ema_due,
        after_step=after_step,
    )
    if args.feedback_steps:  # the unified LoRA (TSCD + feedback, merged) and the feedback LoRA alone
        if release_ema is not None:
            release_ema.copy_to_model()
        lora_adapters.save_merged_lora(accelerator, unet, args, ADAPTERS, alone=FEEDBACK_ADAPTER)
    else:
        checkpoints.save_unet(accelerator, unet, args, ema=release_ema)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
