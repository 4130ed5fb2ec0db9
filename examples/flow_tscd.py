"""Hyper-SD's trajectory-segmented consistency distillation (TSCD) of SD3, FLUX.1, Qwen-Image and Wan teachers.

Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", 2024
(arXiv:2404.13686), Sec. 3.1 and Alg. 1, on a rectified-flow teacher (the method behind the Hyper-SD3 and
Hyper-FLUX.1-dev LoRAs; their flow training recipe is not public, so every flow-specific value below is ours and
says so). ``examples/sdxl_hyper_sd.py`` is the SDXL script (with the human-feedback and one-step stages, which
this script does not have).

One optimisation step (``train_step``):

1. The stage: ``--segments 8,4,2,1`` (``StagePlan.hyper_sd``, as the paper: k = 8 -> 4 -> 2 -> 1 segments, one
   stage after the other, equal shares of ``--max_train_steps``, weights carried over), or ``--num_segments k``
   for one stage.
2. Timesteps (Eq. 11, Alg. 1; :func:`diffdistill.schedulers.tscd_segments`): ``t_n`` on the
   ``--num_inference_steps`` grid (50, PCM-SD3's Euler sub-steps) of the model's *shifted* training table (SD3:
   shift 3; FLUX: ``mu`` of the resolution's token count, as the pipelines), ``t_{n-1}`` one grid step below,
   ``t_end ~ U[t_b, t_{n-1}]`` with ``t_b`` the lower edge of ``t_n``'s segment.
3. The state ``x_{t_n}``: image-caption data (``--train_data_dir``, as the paper: LAION / COYO images) noised
   on the flow path ``(1 - sigma) x0 + sigma eps`` (``--noise_offset``: the paper's "noise perturbation",
   offset noise; value not given, default off); or, with ``--prompts_file`` only, teacher-noised states: the
   guided teacher's Euler solve from pure noise down to ``t_n`` (:func:`diffdistill.losses.teacher_trajectory_states`,
   ``--trajectory_segments`` Euler steps at most; our choice, data-free as MLCM).
4. Eq. 12 through :func:`tscd_sides` (:func:`diffdistill.losses.consistency_pair`, ``parameterization="move"``):
   the student's velocity at ``(x_{t_n}, t_n)`` moves ``x_{t_n}`` to ``t_end`` (the flow move is the Euler step
   ``x + (sigma_end - sigma) v``, which is DDIM on the flow path: the consistency boundary in sigma); the
   teacher's guided Euler step gives ``x_{t_{n-1}}`` and the target network's velocity there moves it to
   ``t_end``. The target is the EMA of the student (Alg. 1 line 16, ``--target ema``, decay 0.95 by default:
   LCM's, the paper gives none) or the student itself under ``no_grad`` (``--target online``).
5. The distance (Sec. 3.1): MSE + adversarial, the stage plan's weights (the adversarial weight grows, the MSE
   weight shrinks across stages; the paper gives no numbers: ``StagePlan.hyper_sd``'s 1 - i/(n-1) and
   i/(n-1)); ``--distance mse`` keeps MSE alone in every stage. A one-stage plan (``--num_segments k``) has
   adversarial weight 0 (the plan's choice), so it defaults to ``--distance mse`` and refuses ``--distance
   hybrid`` and the discriminator flags (:func:`check_distance_args`). The adversarial term is LADD-style (our
   choice for flow transformers; the SDXL script copies the UNet encoder): heads on the *frozen teacher's*
   transformer blocks (:class:`diffdistill.discriminators.LADDDiscriminator`, conditioned on the noise level
   and the pooled text) judge both sides at ``t_end``, the target side as real and the student side as fake,
   with the non-saturating loss of SDXL-Lightning (whose adversarial loss the paper names; ``--gan_loss
   hinge`` for LADD's), discriminator Adam ``(0, 0.99)`` as Lightning.

Guidance (Alg. 1 line 6: ``omega ~ U[omega_min, omega_max]``, range not given). SD3 / SD3.5: classifier-free
guidance of the teacher at ``--teacher_guidance_scale`` (default 7.0, StableDiffusion3Pipeline's) against the
encoded empty prompt; the student learns the guided trajectory and samples without CFG (as Hyper-SDXL's N-step
LoRAs, ``guidance_scale`` 0; Hyper-SD3's "CFG-preserved" LoRAs are another variant, not implemented here).
FLUX.1-dev (guidance-distilled, reference/flow.md Sec. 3 and pitfall 1): the teacher takes its guidance as an
input embedding (``TeacherSolver(guidance_input="guidance")``: one pass, no unconditional branch) at ``--guidance``
(3.5, FluxPipeline's), and the student LoRA keeps that input: it is fed the same guidance (so it samples with
``FluxPipeline(guidance_scale=3.5)``, as the Hyper-FLUX LoRAs). ``--guidance_range MIN MAX`` draws ``omega`` per
sample (SD3: the CFG scale; FLUX.1-dev: the embedded guidance given to both teacher and student, so the
student stays guidance-conditioned, and to the teacher the hybrid distance's heads read, so each pair is judged at
the guidance it was made at). FLUX.1-schnell (no guidance embedding): an unguided teacher.

Qwen-Image (``QwenImagePipeline``): CFG at ``--teacher_guidance_scale`` (default 4.0, its ``true_cfg_scale``)
against ``" "`` with the pipeline's renormalisation of each guided token (``TeacherSolver(guidance_rescale=...)``),
images or prompts as for SD3.

Wan 2.1 text-to-video (``WanPipeline``): prompt-only (teacher-noised video states) or, with ``--train_data_dir``
video clips, noised real video latents (as the paper does with images), ``--num_frames``, CFG at
``--teacher_guidance_scale`` (default 5.0, ``WanPipeline``'s) against the encoded empty prompt, heads conditioned
on the mean prompt token (``text_pooling="mean"``; Wan has no pooled embedding). Wan 2.2 TI2V-5B the same way. Wan
2.2 A14B (two experts, :class:`training.wan_experts.WanExperts`): LoRA on both experts (``--use_lora``), the
teacher's CFG ``--teacher_guidance_scale`` 4.0 where its high-noise expert runs and ``--teacher_guidance_scale_2``
3.0 below (a ``--guidance_range`` omega applies to both), the hybrid distance's heads on each expert of the teacher
copy, a sample judged by those of the expert ``WanPipeline`` runs at its level
(:class:`training.wan_experts.ExpertDiscriminators`; our choice); the low-noise expert's LoRA is
``pytorch_lora_weights_transformer_2.safetensors`` (``load_into_transformer_2=True``).

The student is a LoRA (``--use_lora``, as the paper: "LoRA only") on ``training.flow_families.lora_targets``
or the whole transformer. Teacher and target cost no second base: with a LoRA the teacher is the same
transformer with its adapters off (:class:`diffdistill.students.TeacherView`) and the EMA target averages the
adapters only (:class:`diffdistill.students.EMA` with ``trainable_only``: the frozen base is shared). Our choice
over :class:`diffdistill.students.SharedBase`'s second "target" adapter: the same memory (the adapters), one code
path for a LoRA and a full student, and the EMA the SDXL script and its checkpoints use. The adversarial term
needs a frozen teacher *copy* (one more base in memory: FLUX.1 ~24 GB in bf16): the discriminator runs the
teacher inside the student's backward, where a LoRA model recomputing its checkpointed blocks could not keep its
adapters off (as ``flow_ladd.py``); the copy then also serves as the teacher.

Engines: one process, DDP and FSDP2 (both distances tested equal to DDP on 2 CPU processes). Under FSDP2 the
student's transformer is sharded by its ``prepare`` (with ``--distance mse`` the adapters-off teacher runs that
sharded model), the EMA target averages the adapters' shards, and the LADD heads are a second sharded model; the
hybrid distance's teacher copy is no prepared model and stays whole on every process (FLUX.1: ~24 GB in bf16 a
GPU). Prompt-only, the teacher-noised states make the same teacher calls on every process when the teacher is the
sharded LoRA student (``TeacherSolver(synchronize=True)`` for ``teacher_trajectory_states``: their number depends on
each process's timesteps, and with the transformer's blocks as FSDP2 units mismatched calls desynchronised the
all-gathers; tested against DDP). DeepSpeed: not tested (ZeRO-3 refused with the EMA target).

Multi-aspect training (our choice; the paper gives no sizes): ``--aspect_buckets HxW ...``
(``training.aspect_buckets``) gives each micro-batch one size, its images' bucket with ``--train_data_dir`` (each
image cropped to the size nearest its aspect ratio), else drawn uniformly per micro-batch; its noise, its timesteps'
noise levels, the teacher's solver and the heads' noise levels are that size's schedule (FLUX / Qwen-Image: the
``mu`` of its token count). Processes draw their sizes independently (the gradients are reduced whatever the
shapes). Validation and ``student_grid.json`` stay at ``--resolution`` x ``--width``; ``student_sigmas_by_size.json``
holds the last stage's grid at each bucket.

Validation samples the student on its stage's grid: ``k`` Euler steps through the segment edges of the shifted
table (``spaced_timesteps(k, "trailing")``, the moves TSCD trains), unguided (FLUX.1-dev: with ``--guidance``).
The output is a LoRA file (or a ``transformer/`` folder), ``student_grid.json`` with the last stage's grid
(``sigmas``: the trained grid, shifted at ``--resolution``; ``pipeline_sigmas``: ``1 - j/k``, what a pipeline's own
scheduler shifts into it) and ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` with shift 1, no dynamic shift
and no ``shift_terminal``, which keeps the given ``sigmas`` as they are (``examples/evaluate.py`` samples on it)::

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")   # or StableDiffusion3Pipeline
    pipe.load_lora_weights(OUTPUT_DIR)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    image = pipe(prompt, sigmas=GRID["sigmas"], guidance_scale=3.5).images[0]  # SD3 / Qwen-Image: 1.0

(SD3 / FLUX: with the pipeline's own scheduler pass ``GRID["pipeline_sigmas"]`` instead, which FLUX then shifts
with the sampling resolution's ``mu``; Qwen-Image's own scheduler would stretch them to its ``shift_terminal``:
use the saved one. ``WanPipeline`` takes no ``sigmas``: set the saved scheduler's timesteps as the
``flow_dmd2.py`` docstring shows.)

Fidelity:

===========================================  ===========================================================
as the paper (arXiv:2404.13686)              segments k = 8 -> 4 -> 2 -> 1, one stage each, weights
                                             carried over; t_n on the N-grid, t_end ~ U[t_b, t_{n-1}]
                                             (Eq. 11-12, Alg. 1); one teacher solver step; EMA target;
                                             MSE + adversarial distance, adversarial weight growing with
                                             the stages; Lightning's non-saturating GAN loss; LoRA;
                                             lr 1e-6; image-caption data; offset noise (optional)
as PCM-SD3 (reference/flow.md Sec. 4)        Euler teacher on 50 sub-steps of the shifted table;
                                             consistency boundary in sigma (f = x + (sigma_end - sigma) v)
our choice (the flow recipe is not public)   the stage weights 1 - i/(n-1) / i/(n-1); EMA decay 0.95;
                                             teacher CFG 7.0 (SD3) / embedded guidance 3.5 (FLUX.1-dev,
                                             fed to the student too); omega fixed unless --guidance_range;
                                             LADD-style discriminator heads on the frozen teacher's
                                             blocks (every len(blocks)//4-th), judged at t_end; disc lr =
                                             the student's; teacher-noised states for prompt-only data;
                                             LoRA targets (attention + feed-forward of both streams);
                                             multi-aspect buckets (``--aspect_buckets``)
not implemented                              Hyper-SD's human-feedback LoRA and one-step DMD stage
                                             (see sdxl_hyper_sd.py); Hyper-SD3's CFG-preserved LoRAs;
                                             DeepSpeed (untested; ZeRO-3 refused
                                             with the EMA target); a sharded teacher copy under FSDP2
===========================================  ===========================================================

Example::

    accelerate launch examples/flow_tscd.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --train_data_dir data/images --output_dir out/hyper-flux --use_lora --lora_rank 64 \\
        --resolution 1024 --mixed_precision bf16 --gradient_checkpointing --train_batch_size 2 \\
        --max_train_steps 8000 --validation_prompts "a photo of a cat" --validation_steps 500
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffdistill.losses import (
    ConsistencyPair,
    consistency_pair,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_trajectory_states,
)
from diffdistill.schedulers import StagePlan, TeacherSolver, TimestepSample, spaced_timesteps, tscd_segments
from diffdistill.students import EMA, TeacherView, frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    aspect_buckets,
    checkpoints,
    compilation,
    data_sources,
    ema_release,
    flow_critics,
    flow_encoding,
    flow_families,
    flow_models,
    flow_options,
    flow_validation,
    loop,
    options,
    runtime,
    student_sampler,
)

logger = logging.getLogger("flow_tscd")

GRID_FILE = "student_grid.json"  # the last stage's sampling grid, beside the LoRA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-6)
    flow_options.add_flow_args(p)
    g = p.add_argument_group("Hyper-SD (TSCD)")
    aspect_buckets.add_args(g)
    g.add_argument(
        "--segments", default=None, help="segment counts k, one stage each (default 8,4,2,1, Hyper-SD's)"
    )
    g.add_argument(
        "--num_segments", type=int, default=None, help="one stage of k segments instead of --segments"
    )
    g.add_argument(
        "--num_inference_steps",
        type=int,
        default=50,
        help="N: the teacher's Euler grid on the shifted table, the segments are cut from it (PCM-SD3: 50)",
    )
    g.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=None,
        help="SD3 / Qwen-Image / Wan: the teacher's classifier-free guidance (default: the pipeline's, 7.0 / 4.0 / "
        "5.0); refused for "
        "FLUX (its guidance is --guidance)",
    )
    g.add_argument(
        "--teacher_guidance_scale_2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the teacher's CFG where its low-noise expert runs (WanPipeline's guidance_scale_2; "
        "default: --teacher_guidance_scale when given, as the pipeline, else 3.0 beside its 4.0); refused for "
        "one-transformer models",
    )
    g.add_argument(
        "--guidance_range",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="omega ~ U[MIN, MAX] per sample (Hyper-SD Alg. 1 line 6; range not given): SD3's CFG scale, or "
        "FLUX.1-dev's embedded guidance fed to teacher and student. Default: the fixed scale",
    )
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="offset noise on the training noise (Hyper-SD's 'noise perturbation mechanism'; value not given)",
    )
    g.add_argument(
        "--trajectory_segments",
        type=int,
        default=8,
        help="prompt-only data: teacher-noised states reached in at most this many Euler steps (MLCM's rule)",
    )
    g.add_argument("--target", choices=["ema", "online"], default="ema")
    g.add_argument(
        "--target_ema_decay", type=float, default=None, help="EMA target decay (default 0.95, the plan's)"
    )
    g = p.add_argument_group("adversarial distance")
    g.add_argument(
        "--distance",
        choices=["hybrid", "mse"],
        default=None,
        help="hybrid: MSE + adversarial with the stage plan's weights (the paper); mse: MSE in every stage. "
        "Default: hybrid, or mse for a plan without adversarial weight (one stage: StagePlan.hyper_sd's "
        "single-stage plan is MSE only), where hybrid and the discriminator options are refused",
    )
    g.add_argument("--gan_loss", choices=["non_saturating", "hinge"], default="non_saturating")
    flow_options.add_ladd_head_args(g, lr_help="default: --learning_rate")
    g.add_argument("--discriminator_adam_beta1", type=float, default=0.0, help="Lightning's Adam (0, 0.99)")
    g.add_argument("--discriminator_adam_beta2", type=float, default=0.99)
    # None: not given (the discriminator options are refused when no stage trains a discriminator)
    p.set_defaults(**{name: None for name in DISCRIMINATOR_DEFAULTS})
    args = options.check_common_args(p.parse_args(argv), image_method=True)
    args = check_tscd_args(flow_options.check_flow_values(args))
    check_expert_options(args, flow_options.local_variant(args))
    return args


#: The discriminator options' defaults (filled by :func:`check_tscd_args` when a stage trains a discriminator).
DISCRIMINATOR_DEFAULTS = {
    "gan_loss": "non_saturating",
    "discriminator_blocks": None,
    "discriminator_head_channels": None,
    "discriminator_norm_groups": 32,
    "discriminator_learning_rate": None,
    "discriminator_adam_beta1": 0.0,
    "discriminator_adam_beta2": 0.99,
}


def check_tscd_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the TSCD options (``ValueError`` with the fix) and fill ``args.segments_list``."""
    if args.num_segments is not None and args.segments is not None:
        raise ValueError(
            f"Pass --segments (a list of stages) or --num_segments (one stage), not both: got --segments "
            f"{args.segments} and --num_segments {args.num_segments}."
        )
    if args.num_segments is not None:
        args.segments_list = [args.num_segments]
    else:
        try:
            args.segments_list = [int(k) for k in (args.segments or "8,4,2,1").split(",")]
        except ValueError:
            raise ValueError(
                f"Expected --segments to be comma-separated segment counts, e.g. 8,4,2,1, but got {args.segments!r}."
            ) from None
    n = args.num_inference_steps
    if n < 1 or 1000 % n:
        raise ValueError(f"Expected --num_inference_steps to divide 1000 (e.g. 50, 40, 25), but got {n}.")
    segs = args.segments_list
    if len(set(segs)) != len(segs) or not all(1 <= k <= n for k in segs):
        raise ValueError(
            f"Expected distinct segment counts in [1, --num_inference_steps ({n})], but got {segs}."
        )
    if args.guidance_range is not None and not 0 <= args.guidance_range[0] <= args.guidance_range[1]:
        raise ValueError(
            f"Expected --guidance_range MIN MAX with 0 <= MIN <= MAX, but got {args.guidance_range}."
        )
    if args.noise_offset < 0:
        raise ValueError(f"Expected --noise_offset >= 0, but got {args.noise_offset}; 0 turns it off.")
    if args.trajectory_segments < 1:
        raise ValueError(f"Expected --trajectory_segments >= 1, but got {args.trajectory_segments}.")
    if args.target_ema_decay is not None and not 0 <= args.target_ema_decay <= 1:
        raise ValueError(f"Expected --target_ema_decay in [0, 1], but got {args.target_ema_decay}.")
    if args.target_ema_decay is not None and args.target != "ema":
        raise ValueError("--target_ema_decay is the decay of --target ema: drop it with --target online.")
    if args.teacher_guidance_scale is not None and not args.teacher_guidance_scale >= 1:
        raise ValueError(
            f"Expected --teacher_guidance_scale >= 1 (1: no guidance), but got {args.teacher_guidance_scale}."
        )
    check_distance_args(args)
    return args


def check_distance_args(args: argparse.Namespace) -> None:
    """Resolve ``--distance`` and refuse the discriminator options where no stage trains a discriminator.

    ``StagePlan.hyper_sd`` gives stage ``i`` of ``n`` the adversarial weight ``i/(n-1)``; a one-stage plan
    (``--num_segments k``) is MSE only (the paper gives no weights; the library's documented choice). Our
    choice: rather than invent a weight for a lone stage, such a run defaults to ``--distance mse`` and refuses
    ``--distance hybrid`` and the discriminator flags, which it would ignore. Raises ``ValueError``."""
    plan = StagePlan.hyper_sd(args.segments_list, num_inference_steps=args.num_inference_steps)
    planned = any(stage.loss_weights.get("adversarial", 0) > 0 for stage in plan)
    given = [f"--{name}" for name in DISCRIMINATOR_DEFAULTS if getattr(args, name) is not None]
    if not planned and args.distance == "hybrid":
        raise ValueError(
            f"The plan {args.segments_list} has no adversarial weight (a one-stage TSCD plan is MSE only: "
            "StagePlan.hyper_sd), so --distance hybrid would train MSE alone: pass --distance mse (or several "
            "stages, e.g. --segments 8,4,2,1)."
        )
    if args.distance is None:
        args.distance = "hybrid" if planned else "mse"
    if args.distance == "mse" and given:
        why = "--distance mse" if planned else f"the plan {args.segments_list} (MSE only)"
        raise ValueError(
            f"{', '.join(given)} configure the discriminator, which {why} does not train: drop them."
        )
    for name, default in DISCRIMINATOR_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("discriminator_adam_beta1", "discriminator_adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"Expected --{name} in [0, 1), but got {getattr(args, name)}.")
    if args.discriminator_norm_groups < 1:
        raise ValueError(
            f"Expected --discriminator_norm_groups >= 1, but got {args.discriminator_norm_groups}."
        )


def check_guidance_args(args: argparse.Namespace, parts: flow_models.FlowComponents) -> None:
    """The teacher's guidance for this model (after ``flow_options.check_flow_args`` filled ``--guidance``):
    SD3 and Wan take CFG (``--teacher_guidance_scale``, default the pipeline's: 7.0, 5.0), FLUX none (FLUX.1-dev:
    the embedded input)."""
    if parts.family == "flux":
        if args.teacher_guidance_scale is not None:
            raise ValueError(
                "--teacher_guidance_scale is the classifier-free guidance of SD3 and Wan; FLUX.1 takes its guidance "
                "as an input (--guidance, FLUX.1-dev) and has no unconditional pass: drop it."
            )
        if args.guidance_range is not None and args.guidance is None:
            raise ValueError(
                "--guidance_range draws FLUX.1-dev's embedded guidance, but this FLUX transformer has no guidance "
                "embedding (FLUX.1-schnell): drop --guidance_range."
            )
    args.teacher_guidance_scale_2 = (
        flow_families.check_expert_scale(  # before the default: it follows a given one
            parts, "--teacher_guidance_scale_2", args.teacher_guidance_scale_2, args.teacher_guidance_scale
        )
    )
    if parts.family != "flux" and args.teacher_guidance_scale is None:  # the pipeline's (SD3 7.0, Wan 5.0)
        args.teacher_guidance_scale = flow_families.default_guidance_scale(parts.variant)
    check_expert_options(args, parts.variant)


def check_expert_options(args: argparse.Namespace, variant: str | None) -> None:
    """What Wan 2.2 A14B (``variant`` ``"wan-a14b"``) needs here: ``--use_lora`` (``ValueError`` with the reason);
    checked at parse time for a local folder, after the load for a hub id."""
    if variant != "wan-a14b":
        return
    if not args.use_lora:
        raise ValueError(
            "Wan 2.2 A14B trains as LoRA adapters on both experts: pass --use_lora (a full fine-tune of two 14 B "
            "transformers is not built here)."
        )


# ------------------------------------------------------------------------------------------ the method
def tscd_sides(
    student: Any,
    target: Any,
    teacher: TeacherSolver,
    x_t: torch.Tensor,
    sample: TimestepSample,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    omega: float | torch.Tensor | None,
    guidance_input: bool,
) -> ConsistencyPair:
    """Both sides of Hyper-SD's Eq. 12 on a flow model: the student's and the target's states at ``t_end``.

    Student side ``x_{t_n} + (sigma_end - sigma_n) v_theta(x_{t_n}, t_n)``; target side
    ``x_hat + (sigma_end - sigma_{n-1}) v^-(x_hat, t_{n-1})`` with ``x_hat`` the teacher's guided Euler step from
    ``t_n`` to ``t_{n-1}`` (``x_hat`` itself where ``t_end = t_{n-1}``). ``omega`` is the teacher's guidance (SD3:
    CFG against ``uncond``; with ``guidance_input``, FLUX.1-dev: the embedded guidance, also given to the student
    and the target as their ``guidance`` input). ``student`` / ``target`` / the teacher's model are denoisers
    ``(x (B, C, h, w), 1000 sigma, **cond) -> v`` (:class:`training.flow_models.FlowDenoiser`); ``target`` is
    ``"online"`` or a callable (the EMA). Returns the :class:`diffdistill.losses.ConsistencyPair`.
    """
    student_cond = cond
    if guidance_input:  # the student keeps FLUX.1-dev's guidance input: the teacher's omega
        g = torch.as_tensor(omega, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        student_cond = {**cond, "guidance": g}
    return consistency_pair(
        student,
        teacher,
        x_t,
        sample,
        cond,
        uncond,
        target=target,
        parameterization="move",
        guidance_scale=omega,
        student_cond=student_cond,
        prediction_type="flow",
    )


def tscd_mse(pair: ConsistencyPair) -> torch.Tensor:
    """The MSE part of the distance: mean over the batch and the latents of ``(student - target)^2`` (float32)."""
    return F.mse_loss(pair.student.float(), pair.target.float())


def stage_index(step: int, num_stages: int, max_steps: int) -> int:
    """Stage of optimisation step ``step`` (0-based): equal shares of ``max_steps``."""
    return min(num_stages - 1, step * num_stages // max_steps)


def student_grid(schedule: Any, k: int) -> dict[str, list[float]]:
    """A ``k``-segment student's sampling grid: the trailing ``k`` timesteps (the segment edges), as
    ``sigmas`` (the shifted table's, what validation uses) and ``pipeline_sigmas`` (``1 - j/k``: what a diffusers
    pipeline is given, its scheduler shifting them the same way)."""
    total = schedule.num_train_timesteps
    t = spaced_timesteps(k, "trailing", num_train_timesteps=total)
    return {
        "sigmas": [float(s) for s in schedule.sigma(t)],
        "pipeline_sigmas": [float(u) / total for u in (t + 1).tolist()],
    }


def draw_guidance(args: argparse.Namespace, batch: int, gen: torch.Generator) -> float | torch.Tensor | None:
    """The teacher's omega: ``U[--guidance_range]`` per sample (a ``(B,)`` tensor, for both of Wan 2.2 A14B's
    experts), else the fixed scale (SD3 ``--teacher_guidance_scale``, FLUX.1-dev ``--guidance``, FLUX.1-schnell
    ``None``, Wan 2.2 A14B ``None``: the teacher's own per-expert schedule); nothing is drawn then."""
    fixed = args.teacher_guidance_scale if args.teacher_guidance_scale is not None else args.guidance
    if getattr(args, "teacher_guidance_scale_2", None) is not None and args.guidance_range is None:
        return None
    if args.guidance_range is None or fixed is None:
        return fixed
    low, high = args.guidance_range
    return low + (high - low) * torch.rand(batch, generator=gen)


def training_noise(shape: tuple[int, ...], gen: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise plus ``noise_offset`` x one Gaussian per sample and channel (offset noise; for a video one
    per channel of the whole clip); with 0 nothing more is drawn."""
    noise = torch.randn(shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*shape[:2], *(1,) * (len(shape) - 2)), generator=gen)
    return noise


# ------------------------------------------------------------------------------------------ training
def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "flow_tscd")
    if args.target == "ema" and runtime.zero_stage(accelerator) == 3:
        raise ValueError(
            "--target ema averages the student's parameters into a whole copy, which DeepSpeed ZeRO-3 does not "
            "keep on a process: use DDP or ZeRO stage 1 / 2, or pass --target online."
        )
    parts = flow_models.load_flow(args)
    flow_options.check_flow_args(args, parts)
    check_guidance_args(args, parts)
    plan = StagePlan.hyper_sd(args.segments_list, num_inference_steps=args.num_inference_steps)
    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    flow_models.place_frozen(parts, device, dtype)
    schedule = flow_models.flow_schedule(parts, args.resolution, width=args.width)
    adversarial = args.distance == "hybrid" and any(s.loss_weights.get("adversarial", 0) > 0 for s in plan)

    # Teacher: the LoRA student with its adapters off, or a frozen copy (full student, or the discriminator's).
    teacher_copy = None
    if adversarial or not args.use_lora:
        teacher_copy = flow_models.load_teacher(args, parts, device, dtype)
    transformer = flow_models.make_trainable(args, parts.transformer, device, dtype, family=parts.family)
    if teacher_copy is not None:
        teacher_net: Any = flow_models.FlowDenoiser(teacher_copy, parts.family, args.guidance)
    else:
        teacher_net = TeacherView(flow_models.FlowDenoiser(transformer, parts.family, args.guidance))
    guidance_input = parts.family == "flux" and args.guidance is not None

    def solver(schedule: Any) -> TeacherSolver:
        """The teacher's guided Euler solver on a size's schedule."""
        return TeacherSolver(
            teacher_net,
            schedule,
            guidance_scale=flow_families.expert_guidance(
                parts, args.teacher_guidance_scale, args.teacher_guidance_scale_2
            )
            if parts.has_experts
            else None,
            prediction_type="flow",
            guidance_input="guidance" if guidance_input else None,
            guidance_rescale=None if guidance_input else flow_families.guidance_rescale(parts.family),
            # the LoRA student with its adapters off is sharded under FSDP2 / ZeRO-3: the teacher-noised states
            # must make the same teacher calls on every process (teacher_trajectory_states)
            synchronize=teacher_copy is None and runtime.gathers_parameters(accelerator),
        )

    teacher = solver(schedule)
    # --aspect_buckets: each micro-batch at one size, on that size's schedule (FLUX / Qwen-Image: its mu) and teacher
    buckets = aspect_buckets.BucketSizes(parts, args)
    sizes = buckets.sizes
    at_size = (
        {(h, w): (s, solver(s)) for h, w in sizes for s in [flow_models.flow_schedule(parts, h, width=w)]}
        if args.aspect_buckets
        else {sizes[0]: (schedule, teacher)}
    )
    # --compile: student, teacher (= D's trunk)
    compilation.compile_networks(args, transformer, teacher_copy, accelerator=accelerator)
    uncond = flow_encoding.uncond_conditions(parts, args, device, dtype) if parts.uses_cfg else None

    decay = args.target_ema_decay if args.target_ema_decay is not None else plan[0].options["ema_decay"]
    # The average of a LoRA student's adapters; its frozen base is shared with the student, not copied.
    ema = EMA(transformer, decay=decay, trainable_only=True).to(device) if args.target == "ema" else None
    opt = runtime.adamw(transformer.parameters(), args)
    disc = opt_d = None
    if adversarial:
        # Wan 2.2 A14B: heads on each expert of the teacher copy, a sample judged on its noise level's expert
        disc = flow_critics.ladd_heads(
            args, parts.family, teacher_copy, gradient_checkpointing=args.gradient_checkpointing
        ).to(device)
        d_betas = (args.discriminator_adam_beta1, args.discriminator_adam_beta2)
        opt_d = runtime.adamw(disc.parameters(), args, lr=args.discriminator_learning_rate, betas=d_betas)
        transformer, opt, disc, opt_d = runtime.prepare(accelerator, (transformer, opt), (disc, opt_d))
    else:
        transformer, opt = runtime.prepare(accelerator, (transformer, opt))
    if ema is not None:  # the consistency target (a LoRA student's is checkpointed as its LoRA only)
        ema_release.register_ema(accelerator, ema, transformer)
    release_ema = checkpoints.setup_checkpoints(accelerator, args, transformer)
    student = flow_models.FlowDenoiser(transformer, parts.family, args.guidance)
    target = (
        flow_models.FlowDenoiser(ema.module, parts.family, args.guidance) if ema is not None else "online"
    )
    data = data_sources.StepData(args, need_images=bool(args.train_data_dir))
    global_step = checkpoints.resume(accelerator, args)

    def judge(
        model: Any, x: torch.Tensor, t_end: torch.Tensor, cond: dict[str, Any], schedule: Any
    ) -> list[torch.Tensor]:
        """Discriminator logits of states ``x`` at ``t_end`` (sigma 0 at the clean end) on their size's
        ``schedule``: the teacher's own call."""
        sigma = torch.where(t_end < 0, 0.0, schedule.sigma(t_end.clamp(min=0)).float().to(x.device))
        hidden, kwargs, grid = teacher_net.model_inputs(x, 1000 * sigma, **cond)
        timestep, pooled = kwargs.pop("timestep"), kwargs.pop("pooled_projections", None)
        return model(hidden, timestep, pooled_projections=pooled, grid_size=grid, **kwargs)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        stage = plan[stage_index(step, len(plan), args.max_train_steps)]
        k = stage.num_segments or 1
        w_mse, w_adv = stage.loss_weights.get("mse", 1.0), stage.loss_weights.get("adversarial", 0.0)
        if args.distance == "mse":
            w_mse, w_adv = 1.0, 0.0
        if args.train_data_dir:
            x0, prompts = data.latents_batch(gen, parts.vae, device)
            size = buckets.of(x0)  # the images' bucket
        else:
            prompts = data.prompts_batch(gen)
            size = buckets.draw(gen)  # a size per micro-batch, uniform over the buckets
        schedule, teacher = at_size[size]
        cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
        b = len(prompts)
        sample = tscd_segments(
            b, k, args.num_inference_steps, schedule.num_train_timesteps, generator=gen, device=device
        )
        shape = flow_models.latent_shape(parts, b, size[0], args.num_frames, size[1])
        noise = training_noise(shape, gen, args.noise_offset).to(device)
        omega = draw_guidance(args, b, gen)
        if isinstance(omega, torch.Tensor):
            omega = omega.to(device)
        judge_cond = (
            cond  # FLUX.1-dev: the heads read the teacher at each state's own guidance (--guidance_range)
        )
        if guidance_input:
            judge_cond = {
                **cond,
                "guidance": torch.as_tensor(omega, device=device, dtype=torch.float32).expand(b),
            }
        logs: dict[str, torch.Tensor] = {}
        trained = [m for m in (transformer, disc) if m is not None]
        with accelerator.accumulate(*trained), runtime.autocast(accelerator):
            if args.train_data_dir:
                x_t = schedule.add_noise(x0, noise, sample.t)  # (1 - sigma) x0 + sigma eps
            else:  # teacher-noised states: the guided teacher's Euler solve from pure noise to t_n
                x_t = teacher_trajectory_states(
                    teacher,
                    noise,
                    sample.t,
                    cond,
                    uncond,
                    num_segments=args.trajectory_segments,
                    guidance_scale=omega,
                ).float()
            pair = tscd_sides(student, target, teacher, x_t, sample, cond, uncond, omega, guidance_input)
            mse = tscd_mse(pair)
            loss = w_mse * mse
            logs["mse"] = mse.detach()
            if disc is not None:
                with frozen(disc):  # until the backward below (checkpointed blocks recompute there)
                    if w_adv > 0:
                        fake = judge(
                            runtime.forward_model(accelerator, disc),
                            pair.student,
                            sample.t_end,
                            judge_cond,
                            schedule,
                        )
                        g_loss, _ = gan_generator_loss(fake, loss=args.gan_loss)
                        loss = loss + w_adv * g_loss
                        logs["generator_adv"] = g_loss.detach()
                    runtime.backward(accelerator, loss, transformer)
            else:
                runtime.backward(accelerator, loss, transformer)
            runtime.clip_and_step(accelerator, opt, transformer.parameters(), args.max_grad_norm)
            if disc is not None and w_adv > 0:
                d_loss, _ = gan_discriminator_loss(
                    judge(disc, pair.target, sample.t_end, judge_cond, schedule),
                    judge(disc, pair.student.detach(), sample.t_end, judge_cond, schedule),
                    loss=args.gan_loss,
                )
                runtime.backward(accelerator, d_loss, disc)
                runtime.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
                logs["discriminator"] = d_loss.detach()
        if ema is not None and accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(transformer))
        logs["loss"] = loss.detach()
        logs["k"] = torch.tensor(float(k))
        return logs

    def validate(step: int) -> None:
        k = plan[stage_index(step - 1, len(plan), args.max_train_steps)].num_segments or 1
        sigmas = student_grid(schedule, k)["sigmas"]
        flow_validation.few_step_validation(accelerator, args, parts, transformer, sigmas)(step)

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=release_ema)
    flow_models.save_transformer(accelerator, transformer, args, parts, ema=release_ema)
    if accelerator.is_main_process:  # how to sample the student of the last stage trained
        k = plan[stage_index(args.max_train_steps - 1, len(plan), args.max_train_steps)].num_segments or 1
        guidance = student_sampler.sampling_guidance(args, parts)  # unguided (FLUX.1-dev: --guidance)
        grid = {"num_inference_steps": k, **student_grid(schedule, k), "guidance": guidance}
        (Path(args.output_dir) / GRID_FILE).write_text(json.dumps(grid, indent=1) + "\n")
        if args.aspect_buckets:  # each trained size's grid (FLUX / Qwen-Image: shifted for its token count)
            grids = {size: student_grid(s, k)["sigmas"] for size, (s, _) in at_size.items()}
            aspect_buckets.write_grids(args.output_dir, grids)
        student_sampler.write_record(
            args, parts, flow_encoding.max_sequence_length(args, parts), shifted_grid=True
        )
        from diffusers import FlowMatchEulerDiscreteScheduler  # the grid's sigmas kept as given

        FlowMatchEulerDiscreteScheduler.from_config(
            parts.noise_scheduler.config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None
        ).save_pretrained(Path(args.output_dir) / "scheduler")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
