"""SDXL-Lightning: progressive adversarial distillation, one stage of ``StagePlan.sdxl_lightning`` per launch.

Lin, Wang, Yang, "SDXL-Lightning: Progressive Adversarial Diffusion Distillation", 2024
(arXiv:2402.13929), Sec. 3.4-3.7. Run the stages in order (``--stage``), each starting from the previous
stage's UNet (``--init_unet``; refused without it after ``128->32`` unless ``--from_base``, and an
``/unconditional`` stage without ``--init_lora`` unless ``--fresh_lora``: :func:`check_chain_args`). The teacher of a LoRA stage is the model it starts from (the previous
level's student, progressive distillation); a full-UNet adversarial stage starts from this level's student
(the merged LoRA, or the x0-converted model for the 1-step level), so its teacher is given by
``--teacher_unet`` (the previous level's model, or a skip-level one for the 1- and 2-step students'
unconditional stages, Sec. 3.4); the x0 conversion regresses the model onto its own frozen copy. Teachers
predict the base model's type (epsilon). Training noises with the schedule fix of Sec. 3.5: the model
input at ``t = 999`` is pure noise (``NoiseSchedule(terminal_pure_noise=True)``), as at inference.

* ``128->32`` -- MSE between the student's jump and 4 guided teacher DDIM steps (CFG 6), LoRA
  (:func:`diffdistill.losses.progressive_distillation_loss`);
* in every stage with a teacher (all but ``2->1/x0-conversion``) the teacher, an N-step model, runs on its own stride ``s = T/N`` from ``t`` (Sec. 2.3:
  ``t - k s``, clamped at the student's jump target, zero-length steps skipped; :func:`teacher_stride`),
  not an even split of the student's jump: the 2-step teacher of ``2->1`` runs 749 -> 249 -> clean from
  the extra timestep 749;
* ``N->M/conditional`` then ``N->M/unconditional`` -- non-saturating adversarial loss on a LoRA with the
  conditional, then the unconditional :class:`~diffdistill.discriminators.UNetEncoderDiscriminator`
  judging the student's jump against the teacher's ``N/M``-step solution; for the 2- and 1-step students
  both are re-noised to ``t* ~ Cat({10, 250, 500, 750}, w)``
  (:func:`diffdistill.losses.renoise_for_discriminator`) and the students train at the extra timesteps
  {249, 499, 749, 999}. What is re-noised is the clean sample of each side's jump (Eq. 25-26): for a jump
  ``x_t -> x_{t'}`` with ``t' >= 0`` (the 2-step student at ``t = 999 -> 499``, ``749 -> 249``), the
  ``x0`` that the DDIM move from ``x_t`` to ``x_{t'}`` implies (:func:`jump_x0`), not the noisy ``x_{t'}``.
  The unconditional stage continues the conditional stage's LoRA (``--init_lora``) and also writes the
  merged UNet (``unet_merged/``) for the next stages;
* ``N->M/full`` -- the same objective (unconditional D) on the full UNet, continuing the unconditional
  stage's discriminator (``--init_discriminator OUT/discriminator``, plan ``reset_discriminator=False``);
* ``2->1/x0-conversion`` -- converts the 1-step student to x0 prediction
  (:func:`diffdistill.losses.x0_conversion_loss`); then ``2->1/conditional`` (conditional D) and
  ``2->1/full`` (unconditional D), both on the full x0-predicting UNet (``prediction_type`` "sample"; no
  1-step LoRA, Sec. 3.7).

Discriminators: a stage whose plan says ``reset_discriminator=True`` (the start of a level, and the switch
from the conditional to the unconditional D) builds a fresh one from the base SDXL UNet's encoder; a
``/full`` stage of 32->8, 8->4 or 4->2 loads the one its level's unconditional stage wrote
(``--init_discriminator``; ``--fresh_discriminator`` opts out). Every adversarial stage writes its
discriminator to ``OUTPUT_DIR/discriminator/`` (weights only; its optimiser state starts afresh).

D timestep weights (2- and 1-step students): 1:1:1:1 at first, then 5:1:1:1 "once training is stable"
(Sec. 3.7). The switch is at optimisation step ``--stable_after_steps`` (default: half of
``--max_train_steps``; the paper gives no point, and each stage is its own launch), so it depends on the
step only and a resumed run switches where an uninterrupted one does (resume with the same
``--max_train_steps``, or give ``--stable_after_steps`` explicitly). ``--discriminator_timestep_weights``
and ``--discriminator_timestep_weights_stable`` override the two weight sets.

Each stage's optimiser is AdamW (decoupled weight decay; Adam when it is 0) with the plan's betas --
(0.9, 0.999) for the MSE stage, (0, 0.99) for the adversarial ones -- and learning rate, and no weight
decay; ``--adam_beta1``, ``--adam_beta2``, ``--adam_weight_decay`` and ``--learning_rate`` override them
where given (:func:`optimizer_options`). The x0 conversion, for which the paper gives none, takes lr 1e-6
and betas (0.9, 0.999) (our choice).

Example (first two stages; the whole chain is in examples/README.md)::

    accelerate launch examples/sdxl_lightning.py --stage "128->32" \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_dir data/images --output_dir out/lightning-32 --use_lora --lora_rank 64 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 4 --max_train_steps 4000
    accelerate launch examples/sdxl_lightning.py --stage "32->8/conditional" \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --init_unet out/lightning-32/unet_merged --train_data_dir data/images --output_dir out/lightning-8c ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.discriminators import UNetEncoderDiscriminator
from diffdistill.losses import (
    consistency_pair,
    gan_discriminator_loss,
    gan_generator_loss,
    progressive_distillation_loss,
    renoise_for_discriminator,
    x0_conversion_loss,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    ddim_sample,
    progressive_pairs,
    spaced_timesteps,
)
from diffdistill.students import frozen, load_lora, merge_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
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

logger = logging.getLogger("sdxl_lightning")
STAGES = [s.name for s in StagePlan.sdxl_lightning()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=None)  # None: the stage plan's learning rate
    g = p.add_argument_group("SDXL-Lightning")
    g.add_argument("--stage", choices=STAGES, default=STAGES[0])
    g.add_argument(
        "--init_unet", default=None, help="UNet folder of the previous stage (default: the base UNet)"
    )
    g.add_argument(
        "--from_base",
        action="store_true",
        help="start a stage after 128->32 from the base UNet instead of the previous stage's --init_unet "
        "(leaves the chain: for tests and experiments)",
    )
    g.add_argument(
        "--init_lora",
        default=None,
        help="/unconditional stages: the conditional stage's LoRA file (pytorch_lora_weights.safetensors) to continue",
    )
    g.add_argument(
        "--fresh_lora",
        action="store_true",
        help="/unconditional stages: start a new LoRA instead of continuing the conditional stage's (no --init_lora)",
    )
    g.add_argument(
        "--teacher_unet",
        default=None,
        help="UNet folder of the teacher (predicting the base's type, epsilon): needed by /full and 2->1/full "
        "stages that start from --init_unet (the previous level's model, e.g. out/l-32/unet_merged for "
        "32->8/full; a skip-level one for 2->1); LoRA stages default to the model they start from",
    )
    g.add_argument(
        "--teacher_steps",
        type=int,
        default=None,
        help="teacher DDIM steps per student jump (default: the plan's, N/M at N->M): a skip-level teacher "
        "with K steps at a level of M student steps takes K/M, e.g. 4 for a 4-step teacher at 2->1/full",
    )
    g.add_argument(
        "--init_discriminator",
        default=None,
        help="discriminator/ folder (or its discriminator.safetensors) written by the level's unconditional "
        "stage: needed by the /full stages whose plan continues D (reset_discriminator=False), e.g. "
        "out/l-8u/discriminator for 32->8/full",
    )
    g.add_argument(
        "--fresh_discriminator",
        action="store_true",
        help="start a fresh discriminator where the plan continues the previous stage's (no --init_discriminator)",
    )
    g.add_argument(
        "--stable_after_steps",
        type=int,
        default=None,
        help="2- and 1-step stages: the optimisation step from which D's timesteps take the 'stable' weights "
        "(5:1:1:1) instead of the initial ones (1:1:1:1), Sec. 3.7; 0 starts stable. Default: "
        "--max_train_steps // 2",
    )
    g.add_argument(
        "--discriminator_timestep_weights",
        type=float,
        nargs="+",
        default=None,
        help="weights of D's re-noising timesteps (10, 250, 500, 750) before --stable_after_steps "
        "(default: the plan's, 1 1 1 1)",
    )
    g.add_argument(
        "--discriminator_timestep_weights_stable",
        type=float,
        nargs="+",
        default=None,
        help="the weights from --stable_after_steps on (default: the plan's, 5 1 1 1)",
    )
    g.add_argument(
        "--mse_guidance_scale", type=float, default=None, help="128->32 only: the teacher's CFG (default 6)"
    )
    g.add_argument(
        "--discriminator_learning_rate",
        type=float,
        default=None,
        help="adversarial stages only (default: the student's)",
    )
    # None: the stage plan's value (resolved per stage by optimizer_options).
    p.set_defaults(adam_beta1=None, adam_beta2=None, adam_weight_decay=None)
    args = options.check_common_args(p.parse_args(argv), image_method=True)
    stage = StagePlan.sdxl_lightning()[args.stage]
    if args.mse_guidance_scale is not None:
        if stage.loss != "mse":
            raise ValueError(
                f"--mse_guidance_scale is the teacher's CFG of the MSE stage 128->32, but stage {stage.name!r} is "
                "adversarial: drop it."
            )
        if not args.mse_guidance_scale >= 1:
            raise ValueError(
                f"Expected --mse_guidance_scale >= 1 (1: no guidance), but got {args.mse_guidance_scale}."
            )
    args.mse_guidance_scale = 6.0 if args.mse_guidance_scale is None else args.mse_guidance_scale
    stage = StagePlan.sdxl_lightning(args.mse_guidance_scale)[args.stage]
    check_chain_args(args, stage)
    if (stage.trainable == "lora") != bool(args.use_lora):
        raise ValueError(
            f"Stage {stage.name!r} trains {'a LoRA: add --use_lora' if stage.trainable == 'lora' else 'the full UNet: drop --use_lora'}."
        )
    if stage.loss == "x0_conversion" and args.teacher_unet:
        raise ValueError(
            f"Stage {stage.name!r} regresses the model onto its own frozen copy (Eq. 29): drop --teacher_unet."
        )
    if (
        stage.trainable == "full"
        and stage.loss != "x0_conversion"
        and args.init_unet
        and not args.teacher_unet
    ):
        raise ValueError(
            f"Stage {stage.name!r} starts from --init_unet {args.init_unet}, this level's student, which must "
            "not be its own teacher: pass --teacher_unet with the previous level's model (e.g. "
            "out/l-32/unet_merged for 32->8/full; for 2->1/conditional and 2->1/full the 2-step model, or "
            "for 2->1/full a skip-level one)."
        )
    if args.teacher_steps is not None and stage.loss == "x0_conversion":
        raise ValueError(
            f"Stage {stage.name!r} has no teacher (it regresses the model onto its own frozen copy): drop "
            f"--teacher_steps {args.teacher_steps}."
        )
    if args.teacher_steps is not None and args.teacher_steps < 1:
        raise ValueError(
            f"Expected --teacher_steps >= 1, but got {args.teacher_steps}; leave it out for the plan's "
            f"{stage.teacher_steps} at {stage.name!r}."
        )
    check_discriminator_args(args, stage)
    check_init_paths(args)
    return args


def check_chain_args(args: argparse.Namespace, stage: Any) -> None:
    """Raise ``ValueError`` (with the fix) where ``stage`` is launched without its link to the previous stage.

    Every stage after ``128->32`` starts from the previous stage's UNet (``--init_unet``, Sec. 3.6's chain;
    ``--from_base`` opts out), and an ``/unconditional`` stage continues its level's conditional LoRA
    (``--init_lora``; ``--fresh_lora`` opts out), as ``/full`` stages need ``--init_discriminator`` or
    ``--fresh_discriminator`` (:func:`check_discriminator_args`)."""
    first = stage.name == STAGES[0]
    if args.init_unet and args.from_base:
        raise ValueError("Expected one of --init_unet and --from_base, but got both.")
    if first and (args.init_unet or args.from_base):
        raise ValueError(
            f"Stage {stage.name!r} is the first of the chain and starts from the base UNet: drop "
            f"{'--init_unet' if args.init_unet else '--from_base'}."
        )
    if not first and not args.init_unet and not args.from_base:
        raise ValueError(
            f"Stage {stage.name!r} starts from the previous stage's UNet (e.g. --init_unet out/l-32/unet_merged "
            "for 32->8/conditional, the commands in examples/README.md): pass --init_unet (or --from_base to "
            "start from the base UNet, outside the paper's chain)."
        )
    unconditional = stage.name.endswith("/unconditional")
    for name in ("init_lora", "fresh_lora"):
        if getattr(args, name) and not unconditional:
            raise ValueError(
                f"--{name} is for the /unconditional stages (which continue their level's conditional LoRA); "
                f"stage {stage.name!r} {'trains the full UNet' if stage.trainable == 'full' else 'starts a new LoRA'}: "
                f"drop --{name}."
            )
    if unconditional:
        level = stage.name.split("/")[0]
        if args.init_lora and args.fresh_lora:
            raise ValueError("Expected one of --init_lora and --fresh_lora, but got both.")
        if not args.init_lora and not args.fresh_lora:
            raise ValueError(
                f"Stage {stage.name!r} continues the LoRA of {level}/conditional: pass --init_lora with that "
                "stage's OUTPUT_DIR/pytorch_lora_weights.safetensors (or --fresh_lora to start a new one)."
            )
    if args.discriminator_learning_rate is not None and stage.discriminator is None:
        raise ValueError(f"Stage {stage.name!r} trains no discriminator: drop --discriminator_learning_rate.")


def check_init_paths(args: argparse.Namespace) -> None:
    """Refuse a local ``--init_lora`` / ``--init_unet`` / ``--teacher_unet`` / ``--init_discriminator`` that does
    not exist, in ``parse_args`` rather than after the base model loads (``ValueError``); an ``owner/name``
    UNet is taken for a hub id."""
    if args.init_lora and not Path(args.init_lora).is_file():
        raise ValueError(f"--init_lora {args.init_lora}: no such file (the conditional stage's LoRA file).")
    for name in ("init_unet", "teacher_unet"):
        path = getattr(args, name)
        if path and not Path(path).is_dir() and _looks_local(path):
            raise ValueError(f"--{name} {path}: no such folder (a UNet folder with config.json).")
    if args.init_discriminator and not Path(args.init_discriminator).exists():
        raise ValueError(
            f"--init_discriminator {args.init_discriminator}: no such folder or file (the unconditional "
            "stage's OUTPUT_DIR/discriminator)."
        )


def _looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a hub id (``owner/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


def check_discriminator_args(args: argparse.Namespace, stage: Any) -> None:
    """Raise ``ValueError`` (with the fix) where the discriminator flags do not fit ``stage``."""
    if stage.discriminator is None:
        given = [
            f"--{name}"
            for name in (
                "init_discriminator",
                "fresh_discriminator",
                "stable_after_steps",
                "discriminator_timestep_weights",
                "discriminator_timestep_weights_stable",
            )
            if getattr(args, name) not in (None, False)
        ]
        if given:
            raise ValueError(f"Stage {stage.name!r} trains no discriminator: drop {', '.join(given)}.")
        return
    if stage.options.get("reset_discriminator", True):
        if args.init_discriminator or args.fresh_discriminator:
            raise ValueError(
                f"Stage {stage.name!r} starts a fresh discriminator (plan: reset_discriminator=True, "
                f"{'a new level' if stage.discriminator == 'conditional' else 'the switch to the unconditional D'}): "
                "drop --init_discriminator / --fresh_discriminator."
            )
    elif args.init_discriminator and args.fresh_discriminator:
        raise ValueError("Expected one of --init_discriminator and --fresh_discriminator, but got both.")
    elif not args.init_discriminator and not args.fresh_discriminator:
        level = stage.name.split("/")[0]
        raise ValueError(
            f"Stage {stage.name!r} continues the discriminator of {level}/unconditional (plan: "
            f"reset_discriminator=False): pass --init_discriminator with that stage's OUTPUT_DIR/discriminator "
            "(or --fresh_discriminator to start a new one)."
        )
    timesteps = stage.options.get("discriminator_timesteps")
    for name in ("discriminator_timestep_weights", "discriminator_timestep_weights_stable"):
        weights = getattr(args, name)
        if weights is None:
            continue
        if timesteps is None:
            raise ValueError(
                f"Stage {stage.name!r} does not re-noise the discriminator's inputs (only the 2- and 1-step "
                f"stages do): drop --{name}."
            )
        if len(weights) != len(timesteps) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"Expected --{name} to be {len(timesteps)} non-negative weights (of t* = "
                f"{', '.join(str(t) for t in timesteps)}) with a positive sum, but got {weights}."
            )
    if args.stable_after_steps is not None:
        if timesteps is None:
            raise ValueError(
                f"Stage {stage.name!r} does not re-noise the discriminator's inputs (only the 2- and 1-step "
                "stages do): drop --stable_after_steps."
            )
        if args.stable_after_steps < 0:
            raise ValueError(f"Expected --stable_after_steps >= 0, but got {args.stable_after_steps}.")


def stable_after_steps(args: argparse.Namespace) -> int:
    """The first optimisation step (0-based) whose D timesteps take the stable weights:
    ``--stable_after_steps``, by default half of ``--max_train_steps``."""
    return args.max_train_steps // 2 if args.stable_after_steps is None else args.stable_after_steps


def discriminator_timestep_weights(
    args: argparse.Namespace, stage: Any, step: int
) -> tuple[float, ...] | None:
    """The weights of D's re-noising timesteps at optimisation step ``step`` (0-based; ``None`` where the
    stage does not re-noise): the initial ones (plan: 1:1:1:1) before :func:`stable_after_steps`, the
    stable ones (plan: 5:1:1:1) from it on (Sec. 3.7). A function of the step alone, so resume is exact."""
    opts = stage.options
    if "discriminator_timesteps" not in opts:
        return None
    first = args.discriminator_timestep_weights or opts.get("discriminator_timestep_weights")
    stable = args.discriminator_timestep_weights_stable or opts.get("discriminator_timestep_weights_stable")
    chosen = (stable or first) if step >= stable_after_steps(args) else first
    return None if chosen is None else tuple(float(w) for w in chosen)


DISCRIMINATOR_FILE = "discriminator.safetensors"
DISCRIMINATOR_CONFIG = "discriminator.json"


def write_discriminator(
    folder: str | Path, state: dict[str, torch.Tensor], *, conditional: bool, stage: str
) -> Path:
    """Write a discriminator's weights (``discriminator.safetensors``, float32) and what it is
    (``discriminator.json``: conditional or not, the stage that trained it) into ``folder``."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / DISCRIMINATOR_FILE), metadata={"format": "pt"})
    config = {"class": "UNetEncoderDiscriminator", "conditional": conditional, "stage": stage}
    (folder / DISCRIMINATOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_discriminator(disc: torch.nn.Module, path: str | Path, stage: Any) -> None:
    """Load ``--init_discriminator`` (a folder from :func:`write_discriminator`, or its safetensors file)
    into ``disc`` (built like the saved one: same base UNet, same conditional mode)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / DISCRIMINATOR_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(
            f"--init_discriminator {path}: expected a discriminator/ folder holding {DISCRIMINATOR_FILE} (written "
            "by the previous stage), but found none."
        )
    config_file = folder / DISCRIMINATOR_CONFIG
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        want = stage.discriminator == "conditional"
        if bool(config.get("conditional")) != want:
            raise ValueError(
                f"--init_discriminator {path} holds a {'conditional' if config.get('conditional') else 'unconditional'} "
                f"discriminator (stage {config.get('stage')!r}), but stage {stage.name!r} trains "
                f"{'a conditional' if want else 'an unconditional'} one: pass the discriminator/ of "
                f"{stage.name.split('/')[0]}/unconditional."
            )
    fit = (
        f"--init_discriminator {path} does not fit this stage's discriminator (built from the base UNet of "
        "--pretrained_model_name_or_path)"
    )
    try:
        missing, unexpected = disc.load_state_dict(load_file(str(weights)), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{fit}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{fit}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")


def optimizer_options(args: argparse.Namespace, stage: Any) -> dict[str, Any]:
    """``{"lr", "betas", "weight_decay"}`` of a stage's optimiser: the plan's values (lr per stage, Adam
    betas (0.9, 0.999) for MSE / (0, 0.99) adversarial, no weight decay) where the flags were not given."""
    opts = stage.options
    plan_betas = tuple(opts.get("adam_betas", (0.9, 0.999)))
    return {
        "lr": args.learning_rate if args.learning_rate is not None else float(opts.get("lr", 1e-6)),
        "betas": (
            float(plan_betas[0]) if args.adam_beta1 is None else args.adam_beta1,
            float(plan_betas[1]) if args.adam_beta2 is None else args.adam_beta2,
        ),
        "weight_decay": 0.0 if args.adam_weight_decay is None else args.adam_weight_decay,
    }


def teacher_stride(num_train_timesteps: int, student_steps: int, teacher_steps: int) -> float:
    """The teacher's own stride ``s = T/N`` (Sec. 2.3): the teacher of a stage ``N->M`` is an N-step model,
    ``N = M n`` with ``n = teacher_steps`` per student jump (a skip-level ``--teacher_steps K/M`` teacher: a
    K-step model). It runs ``t - k s``, clamped at the student's jump target ``t - n s`` (the clean end at
    most), skipping zero-length steps: at ``2->1`` the 2-step teacher runs 749 -> 249 -> clean and
    249 -> clean from the extra timesteps, a 4-step one 749 -> 499 -> 249 -> clean."""
    return num_train_timesteps / (student_steps * teacher_steps)


def jump_x0(
    schedule: NoiseSchedule, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor
) -> torch.Tensor:
    """The clean sample of a jump ``x_t -> x_prev``: the ``x0`` for which the DDIM move from ``x_t`` at ``t``
    to ``t_prev`` lands on ``x_prev`` (float32).

    From :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon` and
    :math:`x_{prev} = \\alpha_{prev} x_0 + \\sigma_{prev} \\epsilon`:

    .. math:: x_0 = \\frac{\\sigma_t x_{prev} - \\sigma_{prev} x_t}{\\sigma_t \\alpha_{prev} - \\sigma_{prev} \\alpha_t}

    For the student's move this is its own :math:`\\hat x_0`; for the teacher's ``n``-step solution it is
    the ``x0`` of the single DDIM jump to the same point; at ``t_prev = -1`` (``alpha = 1``, ``sigma = 0``
    with ``final_alpha_cumprod = 1``) it is ``x_prev``. The schedule's own :math:`\\alpha_{T-1} > 0` is used
    (``terminal_pure_noise`` only swaps the forward process's input at ``T-1``, as the DDIM move does), so
    the denominator is positive (SNR decreases in ``t``).
    """
    work = torch.promote_types(x_prev.dtype, torch.float32)
    like = x_prev.to(work)
    a_t, s_t = schedule.alpha(t, like=like), schedule.sigma(t, like=like)
    a_p, s_p = schedule.alpha(t_prev, like=like), schedule.sigma(t_prev, like=like)
    x0 = (s_t * like - s_p * x_t.to(a_t.dtype)) / (s_t * a_p - s_p * a_t)
    return x0.to(work)


def main(args: argparse.Namespace) -> None:
    from diffusers import UNet2DConditionModel

    accelerator = runtime.make_accelerator(args, "sdxl_lightning")
    stage = StagePlan.sdxl_lightning(args.mse_guidance_scale)[args.stage]
    opts = stage.options
    optim = optimizer_options(args, stage)
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    sdxl_models.place_frozen(parts, device, dtype)
    unet = UNet2DConditionModel.from_pretrained(args.init_unet) if args.init_unet else parts.unet
    # Teachers (and the model a stage starts from) predict epsilon (the base's type); the student predicts
    # x0 ("sample") from the x0 conversion on. Sec. 3.5: the input at t = 999 is pure noise in training too.
    base_pred = parts.noise_scheduler.config.prediction_type
    teacher_steps = args.teacher_steps or stage.teacher_steps or 1
    schedule = NoiseSchedule.from_scheduler(
        parts.noise_scheduler, prediction_type=base_pred, terminal_pure_noise=True
    )
    stride = teacher_stride(schedule.num_train_timesteps, stage.student_steps or 1, teacher_steps)
    pred_type = "sample" if stage.loss == "x0_conversion" else opts.get("prediction_type", base_pred)

    disc: Any = None
    if stage.discriminator is not None:  # fresh from the base UNet's encoder, or the previous stage's
        disc = UNetEncoderDiscriminator(
            parts.unet,
            conditional=stage.discriminator == "conditional",
            # The head fits the bottleneck of --resolution latents (not the UNet config's sample_size).
            feature_resolution=sdxl_models.discriminator_feature_resolution(parts.unet, args.resolution),
            gradient_checkpointing=args.gradient_checkpointing,
        )
        if args.init_discriminator:
            load_discriminator(disc, args.init_discriminator, stage)
    if args.teacher_unet:  # a separate frozen teacher (the previous level's model)
        teacher_model: Any = UNet2DConditionModel.from_pretrained(args.teacher_unet)
        sdxl_models.freeze(teacher_model)
        teacher_model.to(device, dtype=dtype)
        unet = sdxl_models.make_trainable(args, unet, device, dtype)
    else:  # the model the stage starts from (LoRA: adapters off; full: a frozen copy)
        unet, teacher_model = sdxl_models.student_and_teacher(args, unet, device, dtype)
    if args.init_lora:  # continue the previous LoRA stage's adapter (conditional -> unconditional)
        load_lora(unet, args.init_lora)
        sdxl_models.upcast_trainable(unet)
    # --compile: their blocks
    compilation.compile_networks(args, unet, teacher_model, disc, accelerator=accelerator)
    opt = runtime.adamw(unet.parameters(), args, **optim)
    if disc is not None:
        d_lr = args.discriminator_learning_rate or optim["lr"]
        opt_d = runtime.adamw(disc.parameters(), args, **{**optim, "lr": d_lr})
        unet, opt, disc, opt_d = runtime.prepare(accelerator, (unet, opt), (disc, opt_d))
    else:
        unet, opt = runtime.prepare(accelerator, (unet, opt))
    ema = checkpoints.setup_checkpoints(accelerator, args, unet)
    teacher = TeacherSolver(
        teacher_model,
        schedule,
        guidance_scale=float(opts.get("guidance_scale", 1.0)),
        prediction_type=base_pred,
        # the LoRA student with its adapters off is sharded under FSDP2 / ZeRO-3: the stride's skipped steps must
        # match on every process (a sample at t = 249 needs 1 teacher call of a 4->2 stage, others 2)
        synchronize=bool(args.use_lora and not args.teacher_unet and runtime.gathers_parameters(accelerator)),
    )
    data = data_sources.StepData(args, need_images=True)
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    extra_t = opts.get("extra_student_timesteps")
    global_step = checkpoints.resume(accelerator, args)

    def adversarial(
        x0: torch.Tensor, cond: dict[str, Any], gen: torch.Generator, step: int
    ) -> tuple[torch.Tensor, dict]:
        sample = progressive_pairs(
            x0.shape[0],
            stage.student_steps or 1,
            schedule.num_train_timesteps,
            extra_timesteps=extra_t,
            generator=gen,
            device=device,
        )
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(device), sample.t)
        pair = consistency_pair(
            unet,
            teacher,
            x_t,
            sample,
            cond,
            uncond,
            target=None,
            parameterization="move",
            teacher_steps=teacher_steps,
            teacher_stride=stride,
            prediction_type=pred_type,
        )
        real, fake = pair.target.float(), pair.student.float()
        t_judge = pair.sample.t_prev.clamp(min=0)
        logs: dict[str, torch.Tensor] = {}
        if "discriminator_timesteps" in opts:
            d_weights = discriminator_timestep_weights(args, stage, step)
            logs["discriminator_weights_stable"] = torch.tensor(float(step >= stable_after_steps(args)))
            # Eq. 25-26 re-noise the clean samples: the teacher's x0 and the student's x0_hat of the jump
            # (the move outputs themselves are noisy states where t_prev >= 0).
            t, t_prev = pair.sample.t.to(device), pair.sample.t_prev.to(device)
            renoised = renoise_for_discriminator(
                jump_x0(schedule, real, x_t, t, t_prev),
                jump_x0(schedule, fake, x_t, t, t_prev),
                schedule=schedule,
                values=opts["discriminator_timesteps"],
                weights=d_weights,
                generator=gen,
            )
            (real, fake), t_judge = renoised.samples, renoised.t.to(device)
        ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
        extra: dict[str, Any] = {}
        if stage.discriminator == "conditional":
            extra = {"cond_sample": x_t, "cond_timestep": pair.sample.t}
        # D stays frozen until the generator's backward is done: with gradient checkpointing its blocks are
        # recomputed there and must see the same requires_grad as in the forward pass.
        with frozen(disc):
            judge = runtime.forward_model(accelerator, disc)
            g_loss, _ = gan_generator_loss(judge(fake, t_judge, ehs, added, **extra))
            runtime.backward(accelerator, g_loss, unet)
        runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
        d_loss, _ = gan_discriminator_loss(
            disc(real, t_judge, ehs, added, **extra), disc(fake.detach(), t_judge, ehs, added, **extra)
        )
        runtime.backward(accelerator, d_loss, disc)
        runtime.clip_and_step(accelerator, opt_d, disc.parameters(), args.max_grad_norm)
        return g_loss, {"generator": g_loss.detach(), "discriminator": d_loss.detach(), **logs}

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x0, prompts = data.latents_batch(gen, parts.vae, device)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        with accelerator.accumulate(unet), runtime.autocast(accelerator):
            if stage.loss == "mse":
                loss, logs = progressive_distillation_loss(
                    unet,
                    teacher,
                    x0,
                    cond,
                    uncond,
                    num_student_steps=stage.student_steps or 1,
                    teacher_steps=teacher_steps,
                    teacher_stride=stride,
                    generator=gen,
                )
            elif stage.loss == "x0_conversion":
                grid = torch.tensor(opts.get("timesteps", (249, 499, 749, 999)))
                t = grid[torch.randint(len(grid), (x0.shape[0],), generator=gen)].to(device)
                x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(device), t)
                loss, logs = x0_conversion_loss(
                    unet, teacher_model, x_t, t, cond, schedule=schedule, frozen_prediction_type=base_pred
                )
            else:
                return adversarial(x0, cond, gen, step)[1]
            runtime.backward(accelerator, loss, unet)
            runtime.clip_and_step(accelerator, opt, unet.parameters(), args.max_grad_norm)
        return logs

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        n = stage.student_steps or 1
        timesteps = spaced_timesteps(n, "trailing", num_train_timesteps=schedule.num_train_timesteps)
        validation.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: ddim_sample(model, schedule, z, timesteps, cond=c, prediction_type=pred_type).sample,
            step,
        )

    loop.train_loop(accelerator, args, global_step, train_step, validate, data=data, ema=ema)
    lora_file = checkpoints.save_unet(accelerator, unet, args, ema=ema)
    if pred_type == "sample" and accelerator.is_main_process:
        # The x0-predicting UNet needs its sampler told so (a default SDXL pipeline reads the output as
        # epsilon): SDXL-Lightning's 1-step scheduler, next to unet/ as in a pipeline folder.
        from diffusers import EulerDiscreteScheduler

        EulerDiscreteScheduler.from_config(
            parts.noise_scheduler.config, timestep_spacing="trailing", prediction_type="sample"
        ).save_pretrained(Path(args.output_dir) / "scheduler")
    if disc is not None:  # for the next stage that continues it (plan: reset_discriminator=False)
        d_state = accelerator.get_state_dict(disc)  # on every process: gathers FSDP shards
        if accelerator.is_main_process:
            write_discriminator(
                Path(args.output_dir) / "discriminator",
                d_state,
                conditional=stage.discriminator == "conditional",
                stage=stage.name,
            )
        accelerator.wait_for_everyone()
    if args.use_lora and (opts.get("merge_lora_after") or stage.loss == "mse"):
        if accelerator.is_main_process:  # the saved adapter merged into a fresh float32 copy of the base
            base = (
                UNet2DConditionModel.from_pretrained(args.init_unet)
                if args.init_unet
                else UNet2DConditionModel.from_pretrained(
                    args.pretrained_model_name_or_path,
                    subfolder="unet",
                    revision=args.revision,
                    variant=args.variant,
                )
            )
            merged = merge_lora(load_lora(base.to(torch.float32), lora_file))
            merged.save_pretrained(Path(args.output_dir) / "unet_merged", safe_serialization=True)
        accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
