"""One-step SDXL generator by score implicit matching (SIM), or SiD / DMD, with an online fake score.

Luo et al., "One-Step Diffusion Distillation through Score Implicit Matching", NeurIPS 2024
(arXiv:2410.16794); ``--loss sid``: Zhou et al., ICML 2024 (arXiv:2404.04057); ``--loss dmd``: Yin et
al. 2024 (arXiv:2311.18828). Prompt-only (``--prompts_file``; with ``--gan_weight`` an image-caption
folder, below): the generator maps noise, fed at ``--generator_timestep`` as ``--generator_input`` says, to a
clean latent in one UNet call; the real score is the frozen teacher with classifier-free guidance, the fake score a trainable copy
of the teacher fitted to the generator's detached samples by denoising score matching
(:func:`diffdistill.losses.fake_score_loss`). :class:`diffdistill.losses.AlternatingUpdate` alternates the
two updates (``--generator_every``, ``--fake_steps``) and freezes the fake network during the generator
step (``training.score_distillation.ScoreDistillation``, shared with Hyper-SD's one-step stage and MLCM's
DMD phase).

``--preset sim|sid|dmd2|dmd2-1step`` (default: the recipe of ``--loss``; ``sim`` without either) sets the loss, the real
score's CFG scale, the generator's input (``--generator_timestep``, ``--generator_input``), ``--generator_every``,
the Adam betas / weight decay and the learning rate (DMD2 also ``--max_grad_norm``) from the published recipes; an
option's own flag always wins. The generator's input: ``sid`` and ``sim`` feed SiD-LSG's ``add_noise(0, z, 625)``
at t = 625, which is SIM's / SiD's ``sigma_init z`` at EDM sigma 2.5 (timestep 625 of SDXL's schedule);
``dmd2`` pure noise z at t = 999. ``dmd2``: DMD2's SDXL
scripts (CFG 8, generator every 5th step, AdamW (0.9, 0.999) wd 0.01, lr 5e-5 LoRA / 5e-7 full, grad norm
10), its generator starting from the teacher. ``dmd2-1step``: DMD2's 1-step SDXL model, ``dmd2`` with pure noise at
t = 399 and the generator started from an ODE-pair regression run (DMD2's ``train_sd_ode.py``; here
``sdxl_diffusion2gan.py --gan_weight 0 --generator_timestep 399``): ``--init_unet`` (its ``unet/``) or, with
``--use_lora``, ``--init_lora`` (its LoRA file), required by the preset and allowed with any other; the real and
fake scores start from the teacher, and a start recorded for another timestep or input is refused. ``sid``: SiD's code (Adam (0, 0.999), one fake update per generator update) and SiD-LSG's Stable
Diffusion run (Zhou et al. 2024, arXiv:2406.01561; ``run_sid.sh``): lr 1e-6, alpha 1, real-score CFG 2, and
a *guided* fake score (``--fake_guidance_scale`` 2: its CFG in the fake-score update, kappa1, and in the
generator loss, kappa2 = kappa3) trained on timesteps drawn from [20, 980) (``--fake_timestep_range 20
979``), the generator loss's timesteps drawn from the same range (``--loss_timestep_range 20 979``). ``sim``: SIM's training values are not public (its code is
inference only), so it takes SiD's (SIM with an L2 distance is SiD with alpha = 1) and PixArt-alpha's
default sampling CFG 4.5 (SIM's teacher). See ``PRESETS`` and ``--help``. ``--sim_c`` and
``--sim_detach_dprime`` are :func:`diffdistill.losses.sim_loss`'s ``c`` and ``detach_dprime``.

DMD2's GAN classifier (Yin et al. 2024, arXiv:2405.14867, Sec. 4.3; ``--gan_weight``, e.g. ``--preset dmd2
--gan_weight``): a head on the fake score UNet's bottleneck (:class:`diffdistill.discriminators.BottleneckHead`,
``training.score_distillation.BottleneckGAN``) tells noised real latents from noised generator samples. It
trains with the fake score, in the fake-score update (``--gan_classifier_weight``, DMD2-SDXL 1e-2), and the
generator adds ``--gan_weight`` times its non-saturating term (the flag alone: DMD2-SDXL's 5e-3). The real
latents are the VAE latents of an image-caption folder (``--train_data_dir``, whose captions are then the
prompts); without ``--gan_weight`` the script stays prompt-only. DMD2's regression-free two-time-scale
update is the preset's ``--generator_every 5`` (or ``--fake_steps``).

With ``--use_lora`` both the generator and the fake score are LoRAs (the fake one on its own copy of the
UNet). The real score is a frozen copy of the teacher in the mixed-precision dtype, run *with* autograd so
the SIM / SiD gradient flows through its input as in the papers. (It is not the generator's UNet with the
adapters disabled: with gradient checkpointing that UNet would recompute its blocks in the backward pass
with the adapters enabled again, which torch's checkpoint rejects.)

``--shared_base`` (with ``--use_lora``; our choice, for memory: issue 22): ONE frozen copy of the UNet in the
mixed-precision dtype holds two LoRA adapters, the generator's and the fake score's, and the real score is
that UNet with both adapters off (:class:`diffdistill.students.SharedBase`, ``training.shared_critics``):
one copy of the base weights instead of three, the same networks and losses. Each view runs with only its
adapter active, gradients reach only the adapter being trained, and gradient checkpointing recomputes each
block under the adapter it ran with (so the separate real copy above is not needed). The checkpoints hold
each adapter in its own file (``unet_lora.safetensors``: the generator, ``fake_lora.safetensors``: the fake
score), the released ``pytorch_lora_weights.safetensors`` is the generator's adapter as without the flag, and
DMD2's classifier head runs the base's encoder under the fake score's adapter. DDP, FSDP2 (the frozen base
sharded once by ``SharedBase.fully_shard``, each view sharding its adapter; tested against DDP) or one
process; DeepSpeed is refused (the classifier stays refused under FSDP, as without the flag).

Example::

    accelerate launch examples/sdxl_sim.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --prompts_file prompts.txt --output_dir out/sim --use_lora --lora_rank 64 --loss sim \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 2 --max_train_steps 10000
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.losses import dmd_loss, fake_score_loss, sid_loss, sim_loss
from diffdistill.schedulers import NoiseSchedule, TeacherSolver
from diffdistill.students import load_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    checkpoints,
    compilation,
    data_sources,
    loop,
    options,
    runtime,
    score_distillation,
    sdxl_encoding,
    sdxl_models,
    shared_critics,
    student_sampler,
    validation,
)

logger = logging.getLogger("sdxl_sim")


# The published recipes (reference notes: methods.md §4.3, §4.4, §7.1). A preset sets each option it names
# unless that option's flag is given; ``learning_rate`` may be ``{"lora": ..., "full": ...}``. SiD, SiD-LSG and SIM
# trained full UNets (1e-6); with --use_lora the sim / sid presets take DMD2's SDXL LoRA rate 5e-5 (our choice: the
# closest published LoRA recipe of a score-distillation loss; at 1e-6 a rank-64 LoRA made ~35x less first-order
# progress than the full weight on an SDXL-sized layer, audit 11).
PRESETS: dict[str, dict[str, Any]] = {
    # SIM's own training values are not verified (§4.4): SiD's (SIM's L2 special case, §4.3) where SiD has
    # one, and PixArt-alpha's default sampling CFG (SIM's teacher; diffusers' PixArtAlphaPipeline, 4.5).
    "sim": {
        "loss": "sim",
        "guidance_scale": 4.5,
        # SIM's generator input: sigma_init z at EDM sigma 2.5 (SIM inference.py, SiD --init_sigma 2.5), i.e.
        # the zero image noised to SDXL's timestep 625 (EDM sigma 2.5017; tested).
        "generator_timestep": 625,
        "generator_input": "noised",
        "generator_every": 1,
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "learning_rate": {"lora": 5e-5, "full": 1e-6},
    },
    # SiD (mingyuanzhou/SiD sid_train.py: Adam (0, 0.999), g_beta1 0, one fake update per G update) and
    # SiD-LSG for Stable Diffusion (Zhou et al. 2024, arXiv:2406.01561; mingyuanzhou/SiD-LSG run_sid.sh on
    # SD1.5 / SD2.1-base: lr = glr = 1e-6, --alpha 1, kappa4 = cfg_eval_real = 2, kappa1 = cfg_train_fake = 2
    # and kappa2 = kappa3 = cfg_eval_fake = 2 for the fake score; training/sid_training_loop.py draws the
    # fake score's timesteps with torch.randint(tmin=20, tmax=980), i.e. 20..979 inclusive).
    "sid": {
        "loss": "sid",
        "guidance_scale": 2.0,
        # SiD-LSG's init_timestep 625: the generator is fed add_noise(0, z, 625) at t = 625.
        "generator_timestep": 625,
        "generator_input": "noised",
        "sid_alpha": 1.0,
        "fake_guidance_scale": 2.0,
        "fake_timestep_range": (20, 979),
        "loss_timestep_range": (20, 979),
        "generator_every": 1,
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "learning_rate": {"lora": 5e-5, "full": 1e-6},
    },
    # DMD2 on SDXL (tianweiy/DMD2 experiments/sdxl/*.sh, main/train_sd.py, sd_guidance.py): real-score CFG
    # 8, dfake_gen_update_ratio 5, AdamW (0.9, 0.999, weight decay 0.01), lr 5e-5 LoRA / 5e-7 full, max grad
    # norm 10.
    "dmd2": {
        "loss": "dmd",
        "guidance_scale": 8.0,
        # pure noise at t = 999, the first step of DMD2's 4-step SDXL models, from the teacher's weights (our
        # choice for one step; DMD2's own 1-step recipe is dmd2-1step below)
        "generator_timestep": 999,
        "generator_input": "noise",
        "generator_every": 5,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.01,
        "learning_rate": {"lora": 5e-5, "full": 5e-7},
        "max_grad_norm": 10.0,
    },
}
# DMD2's 1-step SDXL model (tianweiy/DMD2 experiments/sdxl/sdxl_cond399_8node_lr5e-7_1step_*.sh): the dmd2 recipe
# with the generator conditioned on t = 399 (pure noise input), started from the ODE-pair regression run
# (--generator_ckpt_path; here --init_unet / --init_lora, required: check_init).
PRESETS["dmd2-1step"] = {**PRESETS["dmd2"], "generator_timestep": 399}
#: The presets whose generator starts from a regression run (--init_unet / --init_lora), not the teacher.
PRESETS_WITH_INIT = ("dmd2-1step",)
LOSS_PRESET = {"sim": "sim", "sid": "sid", "dmd": "dmd2"}  # the preset of a --loss given alone
PRESET_HELP = (
    "hyperparameter recipe; each option it sets yields to its flag when given. Default: the --loss's "
    "recipe (sim -> sim, sid -> sid, dmd -> dmd2; sim without either). "
    "dmd2 = DMD2 on SDXL (Yin et al. 2024; tianweiy/DMD2 experiments/sdxl): --loss dmd, real-score CFG 8, "
    "the generator fed pure noise at t = 999, --generator_every 5 (dfake_gen_update_ratio), AdamW (0.9, 0.999) weight decay 0.01, lr 5e-5 with "
    "--use_lora / 5e-7 full, --max_grad_norm 10; DMD2's GAN classifier is --gan_weight (with --train_data_dir). "
    "dmd2-1step = DMD2's 1-step SDXL model: dmd2 with pure noise at t = 399, the generator started from an ODE-pair "
    "regression run (required: --init_unet, or --init_lora with --use_lora; sdxl_diffusion2gan.py --gan_weight 0 "
    "--generator_timestep 399, examples/README.md). "
    "sid = SiD / SiD-LSG (Zhou et al. 2024; mingyuanzhou/SiD sid_train.py, SiD-LSG run_sid.sh): --loss sid, "
    "Adam (0, 0.999), lr 1e-6 (full UNet; 5e-5 with --use_lora, our choice: DMD2's LoRA rate), one fake update "
    "per generator update, and SiD-LSG's Stable Diffusion run: the generator fed add_noise(0, z, 625) at t = 625 "
    "(--generator_timestep 625 --generator_input noised), "
    "--sid_alpha 1, real-score CFG 2 (cfg_eval_real), --fake_guidance_scale 2 (cfg_train_fake = "
    "cfg_eval_fake) and --fake_timestep_range 20 979 (torch.randint(20, 980)). "
    "sim = SIM (Luo et al. 2024): --loss sim, the generator fed SIM's sigma_init z at EDM sigma 2.5 (the zero image "
    "noised to t = 625, as sid); SIM's training values are unpublished in the code (inference "
    "only), so Adam, lr and update ratio are SiD's (SIM's L2 special case) and CFG 4.5 is PixArt-alpha's "
    "default sampling scale (SIM's teacher)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-6)
    g = p.add_argument_group("SIM / SiD / DMD")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help=PRESET_HELP)
    g.add_argument("--loss", choices=["sim", "sid", "dmd"], default=None, help="default: the --preset's")
    g.add_argument(
        "--guidance_scale", type=float, default=None, help="CFG scale of the real score (default: --preset)"
    )
    score_distillation.add_fake_score_args(g)
    score_distillation.add_gan_args(g)
    shared_critics.add_shared_base_arg(g)
    g.add_argument(
        "--init_unet",
        default=None,
        help="start the generator from this UNet folder (a full fine-tune: the unet/ of a regression run, e.g. "
        "sdxl_diffusion2gan.py --gan_weight 0) instead of the teacher; the real and fake scores stay the "
        "teacher's. Full UNet only (a LoRA generator: --init_lora)",
    )
    g.add_argument(
        "--init_lora",
        default=None,
        help="--use_lora: start the generator's LoRA from this file (pytorch_lora_weights.safetensors of a LoRA "
        "regression run; same rank and alpha); the fake score's LoRA starts fresh",
    )
    g.add_argument(
        "--fake_guidance_scale",
        type=float,
        default=1.0,
        help="CFG scale of the fake score, both in its own update and in the generator loss (SiD-LSG's "
        "kappa1 = kappa2 = kappa3; --preset sid: 2). Default: --preset, else 1 (unguided)",
    )
    g.add_argument(
        "--fake_timestep_range",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="inclusive range of the fake score's training timesteps (--preset sid: 20 979, SiD-LSG's "
        "[20, 980)). Default: --preset, else every timestep 0..T-1",
    )
    g.add_argument(
        "--loss_timestep_range",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="inclusive range of the timesteps the generator loss noises its samples to (--preset sid: 20 979, "
        "SiD-LSG's torch.randint(20, 980)). Default: --preset, else the loss's own [0.02T, 0.98T] (DMD2's)",
    )
    g.add_argument(
        "--sid_alpha",
        type=float,
        default=1.2,
        help="SiD's alpha. Default: --preset (sid: 1, SiD-LSG's Stable Diffusion run), else 1.2 (SiD's EDM runs)",
    )
    g.add_argument(
        "--sim_distance",
        choices=["pseudo_huber", "l2"],
        default=None,
        help="--loss sim (default pseudo_huber)",
    )
    g.add_argument(
        "--sim_c",
        type=float,
        default=None,
        help="pseudo-Huber c of --loss sim, in denoiser (x0) units (default: sim_loss's, 5%% of the batch's RMS "
        "sample norm, which scales with the data; SIM's value is not verified)",
    )
    g.add_argument(
        "--sim_detach_dprime",
        action="store_true",
        help="--loss sim: hold d'(y) constant (stop its gradient); the paper leaves this open",
    )
    # The options a preset sets: no parser default, so an explicit flag is told from an unset one.
    fallback = {key: p.get_default(key) for preset in PRESETS.values() for key in preset}
    p.set_defaults(**{key: None for key in fallback})
    p.set_defaults(gan_classifier_weight=None)  # None: not given (refused without --gan_weight)
    args = p.parse_args(argv)
    given = {key for key in fallback if getattr(args, key) is not None}
    resolve_preset(args, fallback)
    check_loss_options(args, given)
    for flag in ("fake_timestep_range", "loss_timestep_range"):
        if getattr(args, flag) is None:
            continue
        low, high = getattr(args, flag)
        if not 0 <= low <= high <= 999:  # SDXL's 1000 training timesteps (checked before the UNets load)
            raise ValueError(
                f"Expected --{flag} LOW HIGH with 0 <= LOW <= HIGH <= 999 (inclusive; SDXL's 1000 training "
                f"timesteps), but got {low} {high}."
            )
        setattr(args, flag, (low, high))
    if args.sim_c is not None:
        if args.sim_c <= 0:
            raise ValueError(f"Expected --sim_c > 0, but got {args.sim_c}.")
        if args.sim_distance != "pseudo_huber":
            raise ValueError("--sim_c is the pseudo-Huber constant: it needs --sim_distance pseudo_huber.")
    score_distillation.check_gan_args(args)
    shared_critics.check_shared_base_args(args)
    check_init(args)
    if args.gan_weight > 0 and not args.train_data_dir:
        raise ValueError(
            "--gan_weight: DMD2's classifier compares the generator's samples with real images: pass "
            "--train_data_dir (images with .txt captions)."
        )
    return options.check_common_args(args, image_method=args.gan_weight > 0)


def check_loss_options(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse the options the chosen ``--loss`` (or the off GAN term) would ignore, and fill their defaults;
    ``given``: the preset options given on the command line. Bounds ``--generator_timestep`` to [0, 999]
    (-1 would be the clean end, where the generator's output does not matter). Raises ``ValueError``."""
    unused = {
        "sid_alpha": (args.loss != "sid" and "sid_alpha" in given, "--loss sid"),
        "sim_c": (args.loss != "sim" and args.sim_c is not None, "--loss sim"),
        "sim_distance": (args.loss != "sim" and args.sim_distance is not None, "--loss sim"),
        "sim_detach_dprime": (args.loss != "sim" and args.sim_detach_dprime, "--loss sim"),
        "gan_classifier_weight": (
            not args.gan_weight and args.gan_classifier_weight is not None,
            "--gan_weight",
        ),
    }
    for name, (ignored, needs) in unused.items():
        if ignored:
            raise ValueError(f"--{name} applies only with {needs}, which this run does not use: drop it.")
    if args.sim_distance is None:
        args.sim_distance = "pseudo_huber"
    if args.gan_classifier_weight is None:
        args.gan_classifier_weight = score_distillation.DMD2_SDXL_CLASSIFIER_WEIGHT
    why = "the generator's input timestep; 999: pure noise"
    options.check_range(args, "generator_timestep", low=0, high=999, why=why)


def check_init(args: argparse.Namespace) -> None:
    """Check where the generator starts (``--init_unet`` / ``--init_lora``): the right kind for ``--use_lora``,
    existing paths, present for a preset that needs one (:data:`PRESETS_WITH_INIT`), and trained for this run's
    input (:func:`training.student_sampler.check_one_step_start`). Raises ``ValueError``."""
    if args.init_unet and args.init_lora:
        raise ValueError("Expected one of --init_unet (full UNet) and --init_lora (LoRA), but got both.")
    if args.init_unet and args.use_lora:
        raise ValueError(
            "--init_unet starts a full-UNet generator, but --use_lora trains a LoRA on the teacher: pass the "
            "regression run's LoRA file as --init_lora instead (or drop --use_lora)."
        )
    if args.init_lora and not args.use_lora:
        raise ValueError(
            "--init_lora starts the generator's LoRA: it needs --use_lora (a full UNet: --init_unet)."
        )
    if args.init_unet and not (Path(args.init_unet) / "config.json").is_file():
        raise ValueError(
            f"--init_unet {args.init_unet}: not a UNet folder (no config.json), e.g. out/ode/unet."
        )
    if args.init_lora and not Path(args.init_lora).is_file():
        raise ValueError(
            f"--init_lora {args.init_lora}: no such file (e.g. out/ode/pytorch_lora_weights.safetensors)."
        )
    start = args.init_unet or args.init_lora
    if args.preset in PRESETS_WITH_INIT and not start:
        raise ValueError(
            f"--preset {args.preset} starts the generator from an ODE-pair regression run (DMD2's 1-step SDXL "
            "recipe), not from the teacher: run sdxl_diffusion2gan.py --gan_weight 0 --generator_timestep "
            f"{args.generator_timestep} first (examples/README.md), then pass its unet/ as --init_unet (or, with "
            "--use_lora, its pytorch_lora_weights.safetensors as --init_lora). To start from the teacher, use "
            "--preset dmd2."
        )
    if start:
        student_sampler.check_one_step_start(args, start)


def resolve_preset(args: argparse.Namespace, fallback: dict[str, Any]) -> None:
    """Fill the options left unset (``None``) from ``--preset`` (default: the ``--loss``'s recipe), then from
    ``fallback`` (the parser's own defaults). ``args.preset_set`` names the options the preset set."""
    if args.preset is None:
        args.preset = LOSS_PRESET[args.loss or "sim"]
    chosen = []
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            if isinstance(value, dict):
                value = value["lora" if args.use_lora else "full"]
            setattr(args, key, value)
            chosen.append(key)
    for key, value in fallback.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset_set = ",".join(chosen)


def sim_networks(
    args: argparse.Namespace, unet: torch.nn.Module, device: Any, dtype: torch.dtype
) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """``(generator, fake score, real score)`` built from the teacher ``unet``, which becomes the generator (with
    ``--init_unet`` the fake score, the generator being that folder's UNet; ``--init_lora`` loads the generator's
    LoRA from the file).

    The real score is a frozen copy in ``dtype``; the generator and the fake score are LoRAs on ``dtype``
    bases (``--use_lora``) or full float32 copies. ``--gradient_checkpointing`` applies to all three (the
    generator's gradient flows through the real and fake scores' inputs). ``--shared_base``: no copy, the
    three are views of ``unet`` (frozen in ``dtype``) with the generator's adapter, the fake score's, none.
    """
    if args.shared_base:
        base = shared_critics.build(
            args, unet, device, dtype, (shared_critics.GENERATOR, shared_critics.FAKE)
        )
        if args.init_lora:
            load_lora(base.model, args.init_lora, adapter_name=shared_critics.GENERATOR)
            sdxl_models.upcast_trainable(base.model)
        return base.view(shared_critics.GENERATOR), base.view(shared_critics.FAKE), base.view(None)
    real = copy.deepcopy(unet).to(device, dtype=dtype)
    sdxl_models.freeze(real)
    if args.init_unet:  # the generator from the regression run, the fake score from the teacher
        from diffusers import UNet2DConditionModel

        generator, fake = UNet2DConditionModel.from_pretrained(args.init_unet), unet
    else:
        generator, fake = unet, copy.deepcopy(unet)
    for net in (generator, fake):
        sdxl_models.make_trainable(args, net, device, dtype)
    if args.init_lora:
        load_lora(generator, args.init_lora)
        sdxl_models.upcast_trainable(generator)
    if args.gradient_checkpointing:
        real.enable_gradient_checkpointing()
    return generator, fake, real


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "sdxl_sim")
    score_distillation.check_engine(
        accelerator, args
    )  # --gan_weight under FSDP / DeepSpeed: before the UNets load
    logger.info(
        "preset %s (set: %s): loss %s, generator input %s at t = %d, guidance_scale %s, fake_guidance_scale %s, "
        "fake_timestep_range %s, sid_alpha %s, generator_every %d, Adam (%s, %s) weight decay %s, lr %s, "
        "max_grad_norm %s",
        args.preset,
        args.preset_set or "nothing, every option was given",
        args.loss,
        args.generator_input,
        args.generator_timestep,
        args.guidance_scale,
        args.fake_guidance_scale,
        args.fake_timestep_range,
        args.sid_alpha,
        args.generator_every,
        args.adam_beta1,
        args.adam_beta2,
        args.adam_weight_decay,
        args.learning_rate,
        args.max_grad_norm,
    )
    if args.shared_base:
        shared_critics.check_engine(accelerator, fsdp=True)
    parts = sdxl_models.load_sdxl(args)
    dtype = runtime.weight_dtype_of(accelerator)
    device = accelerator.device
    with_gan = args.gan_weight > 0
    sdxl_models.place_frozen(parts, device, dtype, vae=with_gan)  # the GAN's real latents
    schedule = NoiseSchedule.from_scheduler(parts.noise_scheduler)
    unet, fake, real_model = sim_networks(args, parts.unet, device, dtype)
    # --compile: their blocks (one set if shared)
    compilation.compile_networks(args, unet, fake, real_model, accelerator=accelerator)
    if args.shared_base:
        shared_critics.shard(accelerator, unet.shared_base)
    opt_g = runtime.adamw(unet.parameters(), args)
    opt_f = runtime.adamw(fake.parameters(), args, lr=args.fake_learning_rate)
    unet, opt_g, fake, opt_f = runtime.prepare(accelerator, (unet, opt_g), (fake, opt_f))
    gan = score_distillation.BottleneckGAN.build(accelerator, args, fake, schedule) if with_gan else None
    ema = checkpoints.setup_checkpoints(accelerator, args, unet, extra_lora={"fake": fake})
    real = TeacherSolver(real_model, schedule, guidance_scale=args.guidance_scale)
    data = data_sources.StepData(args, need_images=with_gan)
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    # The fake score with its own CFG (SiD-LSG's kappa1 in its update, kappa2 = kappa3 in the generator loss;
    # a no-op at --fake_guidance_scale 1): in the generator's update it is frozen.
    fake_score = TeacherSolver(
        runtime.forward_model(accelerator, fake), schedule, guidance_scale=args.fake_guidance_scale
    )
    fake_trained = TeacherSolver(fake, schedule, guidance_scale=args.fake_guidance_scale)

    def generator_loss(
        x: torch.Tensor, z: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kwargs: dict[str, Any] = {
            "schedule": schedule,
            "cond": cond,
            "uncond": uncond,
            "fake_uncond": uncond,
            "generator": gen,
            "t_range": args.loss_timestep_range,
        }
        if args.loss == "sim":
            return sim_loss(
                x,
                real,
                fake_score,
                distance=args.sim_distance,
                c=args.sim_c,
                detach_dprime=args.sim_detach_dprime,
                **kwargs,
            )
        if args.loss == "sid":
            return sid_loss(x, real, fake_score, alpha=args.sid_alpha, **kwargs)
        return dmd_loss(x, real, fake_score, **kwargs)

    def fake_loss(
        x: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fake_score_loss(
            fake_trained,
            x,
            schedule=schedule,
            weighting=args.fake_weighting,
            cond=cond,
            uncond=uncond,
            t_range=args.fake_timestep_range,
            generator=gen,
        )

    score = score_distillation.ScoreDistillation(
        accelerator,
        args,
        schedule,
        generator=(unet, opt_g),
        fake=(fake, opt_f),
        loss=generator_loss,
        fake_loss=fake_loss,
        gan=gan,
    )
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        real_latents = None
        if gan is None:
            _, prompts = data.batch(gen)
        else:  # the batch's images as VAE latents, and their captions as the prompts
            real_latents, prompts = data.latents_batch(gen, parts.vae, device)
        cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype, args.cache_dir)
        return score.step(step, gen, cond, real=real_latents)

    validate = validation.one_step_validation(accelerator, args, parts, unet, schedule)
    loop.train_loop(
        accelerator,
        args,
        global_step,
        train_step,
        validate,
        data=data,
        ema=ema,
        ema_due=score.generator_steps_at,  # the average moves once per generator update
    )
    checkpoints.save_unet(accelerator, unet, args, ema=ema)
    if accelerator.is_main_process:  # how evaluate.py samples the generator: as the validation does
        student_sampler.write_one_step_sampler(args, args.output_dir, parts.noise_scheduler)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
