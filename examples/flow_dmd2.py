"""DMD2 / SiD / SIM few-step generators for SD3, FLUX.1, Qwen-Image and Wan 2.1 / 2.2 on one shared frozen transformer.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, arXiv:2405.14867;
``--loss dmd``, the default); ``--loss sid``: Score identity Distillation (Zhou et al. 2024, arXiv:2404.04057),
which Gu et al. 2025 ("Score Distillation of Flow Matching Models", arXiv:2509.25127) run on SD3, SD3.5 and
FLUX.1-dev; ``--loss sim``: Score Implicit Matching (Luo et al. 2024, arXiv:2410.16794). Prompt-only
(``--prompts_file``; with ``--gan_weight`` an image-caption folder). The losses are the library's
(:func:`diffdistill.losses.dmd_loss`, ``sid_loss``, ``sim_loss``, ``fake_score_loss``); this script wires them
to the flow transformers.

Three networks, ONE transformer (``training.flow_critics``, :class:`diffdistill.students.SharedBase`; issue 22):
the frozen base in the mixed-precision dtype carries two LoRA adapters, the generator's and the fake score's,
and the real score is the base with both adapters off. Each view runs with only its adapter active, gradients
reach only the adapter being trained, and gradient checkpointing recomputes each block under the adapter it ran
with. FLUX.1 (11.9 B parameters) holds one 24 GB bf16 copy instead of three. LoRA only (``--use_lora`` is
always on): full fine-tuning would keep the generator and the fake score as two trainable float32 copies of the
transformer with their AdamW states (16 bytes a parameter) beside the frozen teacher: 377 GiB of weights and
states for FLUX.1, 255 GiB for SD3.5-Large, 71 GiB for SD3.5-Medium before any activation (meta-device count,
``tests/transformer_configs.py``), and the shared base cannot hold full copies; with rank-64 adapters the three
networks take 27.5 / 21.3 / 6.7 GiB (bf16 base, float32 adapters with gradients and AdamW states).
Engines: one process, DDP, or FSDP2, where the frozen base is sharded once
(:meth:`~diffdistill.students.SharedBase.fully_shard`) and each view shards its adapter with its optimiser
(checkpoints then hold accelerate's sharded states; with ``--gan_weight`` and gradient checkpointing tested equal
to DDP on 2 CPU processes, resumed exactly). Refused (``training.flow_critics.check_engine``): DeepSpeed (it wraps
each prepared model in its own engine, and the shared base is no prepared model: each view runs the other's
adapter layers and the base outside its engine).

One optimisation step (``training.flow_critics.FlowScoreDistillation``):

1. the generator's input: DMD2's backward simulation on the K-step grid (``--num_student_steps``; the model's
   own shifted ``linspace(1, 1/K, K)``, SD3 at K = 4: 1, 0.9, 0.75, 0.5; or ``--student_sigmas``, whose first
   sigma may be below 1: the generator then starts from ``sigmas[0] z``, the zero image noised there -- SiD's /
   SIM's ``sigma_init z`` at their EDM sigma 2.5, the flow sigma 2.5 / 3.5 = 0.714: ``--preset sim``'s one-step
   grid; the other presets start at 1.0; evaluate.py scales the pipeline's initial noise to match): a step ``k``
   uniform in ``{0..K-1}``, the same on every process, and the state at ``sigma_k`` reached by running the
   current generator ``k`` steps from pure noise under ``no_grad`` (predict ``x0 = x - sigma v``, re-noise to the
   next sigma with fresh noise); the generator's sample is its clean prediction there, ``x = x_k - sigma_k v``;
2. ``--fake_steps`` fake-score updates on the detached sample: conditional flow matching in velocity units
   (``fake_score_loss(weighting="flow")``, the loss the teacher was trained with) at ``sigma ~ U[--fake_sigma_range]``;
3. every ``--generator_every``-th step the generator update through the real and fake scores at
   ``sigma ~ U[--loss_sigma_range]``, with the fake score (and the GAN heads) frozen.

Guidance. The real score is the teacher with its recipe's guidance: SD3 / SD3.5, Qwen-Image and Wan
classifier-free guidance ``--guidance_scale`` (default: the pipeline's, ``StableDiffusion3Pipeline`` 7.0,
``QwenImagePipeline``'s ``true_cfg_scale`` 4.0, ``WanPipeline`` 5.0) against the encoded empty prompt (Qwen-Image:
``" "``, and its pipeline's renormalisation of each guided token to the conditional norm,
``TeacherSolver(guidance_rescale=...)``);
FLUX.1-dev its embedded ``--guidance`` (3.5, FastGen's FLUX DMD2 and ``FluxPipeline``'s default; one pass, no
unconditional branch); FLUX.1-schnell unguided. The fake score models the generator's samples: on SD3,
Qwen-Image and Wan it is unguided (DMD2; ``--fake_guidance_scale`` for SiD-LSG's guided fake score). On a
guidance-distilled FLUX it must still take a guidance input, and which one is a design choice: we follow FastGen (``config_dmd2.py`` for Flux
sets the network's ``guidance_scale = 3.5`` and ``dmd2.py`` builds the fake score from the teacher's config and
weights), so ``--fake_guidance`` defaults to ``--guidance``: the fake score starts as the real score, the
closest model of the generator (itself the teacher at guidance 3.5 at step 0). Its adapter starts at zero, so
at step 0 the two scores are equal and the DMD gradient is exactly zero; FastGen takes that first generator
update anyway, we run each step's fake-score update before its generator update (our choice), so the first
generator update already sees a fake score fitted once to the generator's samples. The generator takes
``--guidance`` as its input too (FastGen's student does; the pipeline then samples with ``guidance_scale=3.5``).

Multi-aspect training (our choice; DMD2 trains SDXL at 1024 x 1024 only): ``--aspect_buckets HxW ...``
(``training.aspect_buckets``) gives each micro-batch one of the sizes, drawn uniformly per micro-batch prompt-only,
or the bucket of its images with ``--gan_weight`` (each image cropped to the size nearest its aspect ratio); the
generator's noise, its backward simulation and its grid are that size's (FLUX / Qwen-Image: the grid shifted with
the ``mu`` of its token count; the score losses' ``sigma ~ U[...]`` needs no shift). Processes draw their sizes
independently (the gradients are reduced whatever the shapes); the step index ``k`` stays shared. Validation samples
at ``--resolution`` x ``--width``; ``student_sigmas_by_size.json`` holds each bucket's grid.

``--gan_weight`` (with ``--train_data_dir``): DMD2's GAN classifier, here LADD heads
(:class:`diffdistill.discriminators.LADDDiscriminator`) on the fake score's transformer blocks (the base under the
fake adapter; ``training.flow_critics.FakeFeatureGAN``), trained in the fake-score update on noised real latents
vs the generator's samples; the flag alone sets FastGen's FLUX weight 0.03.

Output (``OUTPUT_DIR``): the generator's adapter as ``pytorch_lora_weights.safetensors`` (``--use_ema``: its
average), written by the pipeline class's ``save_lora_weights``, and the fake score's adapter as
``fake_lora_weights.safetensors``; ``scheduler/`` is ``FlowMatchEulerDiscreteScheduler`` with shift 1, no
dynamic shifting and ``stochastic_sampling=True``, i.e. DMD2's sampler on the sigmas as given::

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")      # or StableDiffusion3Pipeline
    pipe.load_lora_weights(OUTPUT_DIR)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    image = pipe(prompt, sigmas=SIGMAS, guidance_scale=3.5).images[0]     # SD3: guidance_scale=1.0

with ``SIGMAS`` the run's grid (logged, and in ``OUTPUT_DIR/student_sigmas.json``; with ``--aspect_buckets`` each
trained size's in ``student_sigmas_by_size.json``).

Qwen-Image (``QwenImagePipeline`` folders, e.g. ``Qwen/Qwen-Image``): the same method on its packed transformer
(``FlowDenoiser`` packs 2x2 patches and passes ``img_shapes`` and the text mask), prompts through Qwen2.5-VL in the
pipeline's template, padded to ``--max_sequence_length`` (default 512, up to 1024) with their mask (our choice: one
length for every batch and the unconditional branch; the padding is masked out), LoRA on
:data:`diffdistill.students.QWEN_IMAGE_LORA_TARGETS`; the generator's grid is the shifted linspace without the
scheduler's ``shift_terminal`` stretch (our choice: it would pin the last of K sigmas at 0.02), and the saved
scheduler drops ``shift_terminal`` so the pipeline keeps ``sigmas`` as given (``pipe(prompt, sigmas=SIGMAS,
true_cfg_scale=1.0)``). ``--gan_weight`` works on its images (the VAE encodes them as one-frame videos).

Wan 2.1 text-to-video (``WanPipeline`` folders, e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): the same method on
video latents ``(B, 16, f, h, w)`` (``--num_frames``, default 81 -> 21 latent frames; ``--resolution`` 480 by
``--width``, default square; Wan's native aspect: ``--width 832``),
prompt-only: DMD on a video teacher as FastGen's Wan DMD2 (NVlabs/FastGen, ``configs/experiments/WanT2V``) and the
DMD stages of CausVid and Self-Forcing (Yin et al. 2025, arXiv:2412.07772; Huang et al. 2025, arXiv:2506.08009),
which distil Wan2.1-T2V-1.3B (their causal students are not built here: this generator is bidirectional). The teacher's
CFG 5.0 against the encoded empty prompt (``WanPipeline``'s default negative; Wan's long recommended negative
prompt is not used: our choice), LoRA on :data:`diffdistill.students.WAN_LORA_TARGETS`. ``--gan_weight`` with
``--train_data_dir`` video clips: LADD heads on the fake score's video features vs real video latents (A14B: one set
of heads per expert, :class:`training.wan_experts.ExpertDiscriminators`). ``WanPipeline`` takes no ``sigmas``: sample
the LoRA with DMD2's sampler on the run's grid by setting the scheduler's timesteps yourself::

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    pipe.load_lora_weights(OUTPUT_DIR)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=SIGMAS, device=device)
    video = pipe(prompt, num_inference_steps=len(SIGMAS), guidance_scale=1.0, num_frames=81,
                 height=RESOLUTION, width=WIDTH).frames[0]    # the trained --resolution / --width

Wan 2.2: TI2V-5B (``expand_timesteps``; its text-to-video mode, 16x VAE, defaults 704 px and 121 frames) the same
way. A14B (two experts): :class:`training.wan_experts.WanExperts` runs each sample on the expert ``WanPipeline``
would (timestep >= 875), every adapter sits on both experts, the real score's CFG is 4.0 where the high-noise
expert runs and ``--guidance_scale_2`` 3.0 below (a ``TeacherSolver`` guidance schedule; the T2V A14B config's
scales), and each expert's LoRA is its own file: load ``pytorch_lora_weights_transformer_2.safetensors`` with
``pipe.load_lora_weights(OUTPUT_DIR, weight_name=..., load_into_transformer_2=True)`` (``fake_lora_weights`` the
same way).

Checkpoints hold each adapter
in its own file (``unet_lora.safetensors``: the generator, ``fake_lora.safetensors``: the fake score), the GAN
heads and every optimiser; a resumed run is exact.

Fidelity:

=========================================  ===========================================================
as the paper / recipe                      DMD loss ``0.5 ||x - sg(x - g)||^2`` with ``g = (x0_fake -
                                           x0_real) / mean|x - x0_real|`` (DMD2 code; FastGen's VSD
                                           loss); fake score = the teacher plus an online-trained part,
                                           one real score with the teacher's guidance (SD3 CFG, FLUX.1-dev
                                           embedded 3.5, FastGen); the fake score's guidance input on
                                           FLUX = the real score's (FastGen); backward simulation on the
                                           K-step grid with the step synchronised across processes (DMD2
                                           ``sample_backward``); two-time-scale update
                                           ``--generator_every 5`` (DMD2); FastGen FLUX DMD2: lr 1e-5,
                                           4 steps, ``sigma ~ U[0.001, 0.999]`` for both losses, GAN
                                           weight 0.03; SiD's loss and Adam (0, 0.999), alpha 1 (SiD-LSG)
our choice (why)                           shared-base LoRA critics (memory: one base copy); fake score in
                                           velocity units (SD3's CFM; FastGen trains it in x0 units); the
                                           fake update before the generator update (no zero-gradient step);
                                           the generator's grid = the model's shifted linspace (FastGen's
                                           FLUX ``t_list`` not read); FastGen's full-model lr 1e-5 also
                                           for LoRA; GAN heads on the fake score's blocks (DMD2; FastGen
                                           reads the teacher's); SiD / SIM learning rates and the 4-step
                                           SiD grid not checked against arXiv:2509.25127's text; SIM's
                                           sigma_init 2.5 carried to flow as sigma 2.5 / 3.5
not implemented                            DMD2's ODE-pair regression warm-up; DeepSpeed; full
                                           fine-tuning (see above); approximate R1 of the GAN heads
=========================================  ===========================================================

Example::

    accelerate launch examples/flow_dmd2.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --prompts_file prompts.txt --output_dir out/dmd2-flux --lora_rank 64 --resolution 1024 \\
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 2 --use_ema --max_train_steps 5000
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.losses import dmd_loss, fake_score_loss, sid_loss, sim_loss
from diffdistill.schedulers import TeacherSolver

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the examples' shared package (examples/training/), next to this script
from training import (
    aspect_buckets,
    checkpoints,
    compilation,
    data_sources,
    flow_critics,
    flow_encoding,
    flow_families,
    flow_models,
    flow_options,
    flow_validation,
    loop,
    options,
    runtime,
    shared_critics,
    student_sampler,
)

logger = logging.getLogger("flow_dmd2")

#: FastGen's FLUX DMD2 GAN weight (``gan_loss_weight_gen``): ``--gan_weight`` given without a value.
FASTGEN_FLUX_GAN_WEIGHT = 0.03

#: SIM's / SiD's generator input sigma_init = 2.5 (EDM: noise over signal) as a rectified-flow sigma, s / (1 + s).
SIM_INIT_SIGMA = 2.5 / 3.5

# The published recipes. A preset sets each option it names unless that option's flag is given.
PRESETS: dict[str, dict[str, Any]] = {
    # DMD2 (tianweiy/DMD2: dfake_gen_update_ratio 5, AdamW (0.9, 0.999) wd 0.01, grad norm 10) with FastGen's
    # FLUX values (fastgen/configs/experiments/Flux/config_dmd2.py: lr 1e-5 for generator, fake score and
    # discriminator; student_sample_steps 4; t ~ U[0.001, 0.999]).
    "dmd2": {
        "loss": "dmd",
        "num_student_steps": 4,
        "generator_every": 5,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.01,
        "learning_rate": 1e-5,
        "max_grad_norm": 10.0,
    },
    # SiD (mingyuanzhou/SiD: Adam (0, 0.999), one fake update per generator update) with SiD-LSG's lr 1e-6 and
    # alpha 1; a four-step generator as SiD-DiT's (arXiv:2509.25127, Fig. 1).
    "sid": {
        "loss": "sid",
        "num_student_steps": 4,
        "sid_alpha": 1.0,
        "generator_every": 1,
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "learning_rate": 1e-6,
    },
    # SIM's training values are unpublished (its code is inference only): SiD's, one step (SIM's generator) fed
    # SIM's sigma_init z at EDM sigma 2.5 (SIM inference.py), the flow sigma 2.5 / 3.5 (a one-entry grid; an explicit
    # --num_student_steps replaces it with the model's K-step grid from pure noise).
    "sim": {
        "loss": "sim",
        "student_sigmas": [SIM_INIT_SIGMA],
        "generator_every": 1,
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "learning_rate": 1e-6,
    },
}
LOSS_PRESET = {"dmd": "dmd2", "sid": "sid", "sim": "sim"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_common_args(p, default_lr=1e-5)
    flow_options.add_flow_args(p)
    g = p.add_argument_group("DMD2 / SiD / SIM")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: --loss's (dmd -> dmd2)")
    g.add_argument(
        "--loss", choices=["dmd", "sid", "sim"], default=None, help="default: the --preset's (dmd)"
    )
    g.add_argument("--num_student_steps", type=int, default=None, help="K of the generator's grid (preset)")
    g.add_argument(
        "--student_sigmas",
        type=float,
        nargs="+",
        default=None,
        help="the generator's noise levels, strictly decreasing in (0, 1] (default: the model's shifted "
        "linspace(1, 1/K, K) at --resolution). The generator starts from sigmas[0] z: pure noise at 1.0, below it "
        "SiD's / SIM's input sigma_init z (EDM sigma 2.5: 0.7143)",
    )
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="SD3 / Qwen-Image / Wan: CFG of the real score (default: the pipeline's, SD3 7.0, Qwen-Image 4.0, "
        "Wan 5.0)",
    )
    g.add_argument(
        "--guidance_scale_2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: CFG of the real score where the low-noise expert runs (WanPipeline's guidance_scale_2; "
        "default: --guidance_scale when given, as the pipeline, else 3.0 beside its 4.0); refused for "
        "one-transformer models",
    )
    g.add_argument(
        "--fake_guidance",
        type=float,
        default=None,
        help="FLUX.1-dev: the fake score's embedded guidance (default --guidance, FastGen's)",
    )
    g.add_argument(
        "--fake_guidance_scale",
        type=float,
        default=1.0,
        help="SD3 / Qwen-Image / Wan: CFG of the fake score (1: unguided, DMD2)",
    )
    for name, what in (
        ("loss", "the generator loss noises its samples to"),
        ("fake", "of the fake-score loss"),
    ):
        g.add_argument(
            f"--{name}_sigma_range",
            type=float,
            nargs=2,
            default=(0.001, 0.999),
            metavar=("LOW", "HIGH"),
            help=f"uniform noise levels {what} (default FastGen's FLUX 0.001 0.999)",
        )
    g.add_argument("--fake_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument(
        "--generator_every", type=int, default=None, help="fake updates per generator update (preset)"
    )
    g.add_argument("--fake_steps", type=int, default=1, help="fake-score updates per step")
    g.add_argument(
        "--fake_weighting",
        choices=["flow", "x0", "epsilon", "v"],
        default="flow",
        help="space of the fake score's loss (default: velocity, the teacher's CFM loss)",
    )
    g.add_argument("--sid_alpha", type=float, default=None, help="SiD's alpha (preset sid: 1)")
    g.add_argument(
        "--sim_distance",
        choices=["pseudo_huber", "l2"],
        default=None,
        help="--loss sim (default pseudo_huber)",
    )
    g.add_argument("--sim_c", type=float, default=None, help="pseudo-Huber c (default: sim_loss's)")
    g.add_argument(
        "--gan_weight",
        type=float,
        nargs="?",
        const=FASTGEN_FLUX_GAN_WEIGHT,
        default=0.0,
        help=f"DMD2's GAN term in the generator loss (the flag alone: FastGen FLUX's {FASTGEN_FLUX_GAN_WEIGHT}); "
        "needs --train_data_dir",
    )
    g.add_argument(
        "--gan_classifier_weight",
        type=float,
        default=None,
        help="the classifier's loss in the fake update (default 1; needs --gan_weight)",
    )
    g.add_argument("--discriminator_blocks", type=int, nargs="+", default=None, help="needs --gan_weight")
    g.add_argument(
        "--discriminator_norm_groups", type=int, default=None, help="default 32; needs --gan_weight"
    )
    aspect_buckets.add_args(g)
    fallback = {key: p.get_default(key) for preset in PRESETS.values() for key in preset}
    fallback.update(sid_alpha=1.2, num_student_steps=1, generator_every=1)
    p.set_defaults(use_lora=True, **{key: None for key in fallback})
    args = p.parse_args(argv)
    given = {key for key in fallback if getattr(args, key) is not None}
    resolve_preset(args, fallback)
    check_unused_args(args, given)
    return check_dmd2_args(args)


#: Defaults of the options only the GAN classifier (``--gan_weight``) reads.
GAN_DEFAULTS = {"gan_classifier_weight": 1.0, "discriminator_blocks": None, "discriminator_norm_groups": 32}


def check_unused_args(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse the options this run would ignore (another ``--loss``'s, the GAN's without ``--gan_weight``,
    ``--num_student_steps`` beside a ``--student_sigmas`` of another length) and fill their defaults;
    ``given``: the preset options given on the command line. Raises ``ValueError``."""
    unused = {
        "sid_alpha": (args.loss != "sid" and "sid_alpha" in given, "--loss sid"),
        "sim_c": (args.loss != "sim" and args.sim_c is not None, "--loss sim"),
        "sim_distance": (args.loss != "sim" and args.sim_distance is not None, "--loss sim"),
        **{
            name: (not args.gan_weight and getattr(args, name) is not None, "--gan_weight")
            for name in GAN_DEFAULTS
        },
    }
    for name, (ignored, needs) in unused.items():
        if ignored:
            raise ValueError(f"--{name} applies only with {needs}, which this run does not use: drop it.")
    for name, default in {"sim_distance": "pseudo_huber", **GAN_DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.student_sigmas is not None:
        if "num_student_steps" in given and args.num_student_steps != len(args.student_sigmas):
            raise ValueError(
                f"--student_sigmas gives the generator's {len(args.student_sigmas)}-step grid, but "
                f"--num_student_steps is {args.num_student_steps}: drop --num_student_steps (the sigmas set K)."
            )
        args.num_student_steps = len(args.student_sigmas)  # K is the grid's length (the preset's K is unused)
    if args.discriminator_norm_groups < 1:
        raise ValueError(
            f"Expected --discriminator_norm_groups >= 1, but got {args.discriminator_norm_groups}."
        )


def resolve_preset(args: argparse.Namespace, fallback: dict[str, Any]) -> None:
    """Fill unset options from ``--preset`` (default: the ``--loss``'s), then from ``fallback``. A preset's
    ``student_sigmas`` (sim) yields to an explicit ``--num_student_steps`` too."""
    args.preset = args.preset or LOSS_PRESET[args.loss or "dmd"]
    for key, value in PRESETS[args.preset].items():
        if key == "student_sigmas" and args.num_student_steps is not None:
            continue  # an explicit K: the model's K-step grid, not the preset's
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    for key, value in fallback.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_dmd2_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the options (``ValueError`` with the fix)."""
    options.check_common_args(args, image_method=args.gan_weight > 0)
    flow_options.check_flow_values(args)
    if args.num_student_steps < 1:
        raise ValueError(f"Expected --num_student_steps >= 1, but got {args.num_student_steps}.")
    sig = args.student_sigmas
    if sig is not None and (
        any(not 0 < s <= 1 for s in sig) or any(a <= b for a, b in itertools.pairwise(sig))
    ):
        raise ValueError(
            "Expected --student_sigmas to be strictly decreasing noise levels in (0, 1], e.g. 1.0 0.75 0.5 0.25 "
            f"(the generator starts from pure noise at 1.0; from SiD's sigma_init z below), but got {sig}."
        )
    for name in ("loss_sigma_range", "fake_sigma_range"):
        low, high = getattr(args, name)
        if not 0 < low <= high < 1:
            raise ValueError(f"Expected --{name} LOW HIGH with 0 < LOW <= HIGH < 1, but got {low} {high}.")
        setattr(args, name, (low, high))
    if args.generator_every < 1:
        raise ValueError(f"Expected --generator_every >= 1, but got {args.generator_every}.")
    for name in ("guidance_scale", "fake_guidance_scale"):  # CFG scales (a typo'd sign would anti-guide)
        value = getattr(args, name)
        if value is not None and not value >= 1:
            raise ValueError(f"Expected --{name} >= 1 (1: no classifier-free guidance), but got {value}.")
    if args.fake_guidance is not None and not args.fake_guidance > 0:
        raise ValueError(
            f"Expected --fake_guidance > 0 (FLUX.1-dev's embedded guidance of the fake score), but got "
            f"{args.fake_guidance}."
        )
    for name in ("gan_weight", "gan_classifier_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"Expected --{name} >= 0, but got {getattr(args, name)} (0 turns the GAN off).")
    if args.gan_weight > 0 and not args.train_data_dir:
        raise ValueError(
            "--gan_weight: DMD2's classifier compares the generator's samples with real images: pass "
            "--train_data_dir (images, or Wan clips, with .txt captions)."
        )
    if not args.prompts_file and not args.train_data_dir:
        raise ValueError("Pass --prompts_file (one prompt a line) or, with --gan_weight, --train_data_dir.")
    return args


def check_family_args(args: argparse.Namespace, parts: flow_models.FlowComponents) -> None:
    """Refuse the other family's guidance options and fill the family's defaults."""
    flow_options.check_flow_args(args, parts)
    args.guidance_scale_2 = flow_families.check_expert_scale(  # before the default: it follows a given scale
        parts, "--guidance_scale_2", args.guidance_scale_2, args.guidance_scale
    )
    if parts.family == "flux":
        if args.guidance_scale is not None or args.fake_guidance_scale != 1.0:
            raise ValueError(
                "--guidance_scale / --fake_guidance_scale are the classifier-free guidance of SD3 and Wan; FLUX.1 "
                "has no unconditional pass (FLUX.1-dev takes --guidance and --fake_guidance as inputs): drop them."
            )
        if args.fake_guidance is not None and args.guidance is None:
            raise ValueError("--fake_guidance is the embedded guidance of FLUX.1-dev; this FLUX has none.")
        if args.guidance is not None and args.fake_guidance is None:
            args.fake_guidance = args.guidance  # FastGen: the fake score is built from the teacher's config
    else:
        if args.fake_guidance is not None:
            raise ValueError(
                f"--fake_guidance is FLUX.1-dev's embedded guidance; {parts.name} takes --fake_guidance_scale."
            )
        if args.guidance_scale is None:  # the pipeline's (StableDiffusion3Pipeline 7.0, WanPipeline 5.0)
            args.guidance_scale = flow_families.default_guidance_scale(parts.variant)


def main(args: argparse.Namespace) -> None:
    accelerator = runtime.make_accelerator(args, "flow_dmd2")
    flow_critics.check_engine(accelerator)
    parts = flow_models.load_flow(args)
    check_family_args(args, parts)
    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    flow_models.place_frozen(parts, device, dtype)
    schedule = flow_critics.loss_schedule()  # unshifted: t ~ U{...} is sigma ~ U[...]

    def grid_at(height: int, width: int | None) -> list[float]:
        """The generator's grid at a size: --student_sigmas, else the model's shifted linspace there (FLUX /
        Qwen-Image: the mu of the size's token count)."""
        return args.student_sigmas or flow_critics.student_grid(
            flow_models.flow_schedule(parts, height, width=width, terminal_stretch=False),
            args.num_student_steps,
        )

    sigmas = grid_at(args.resolution, args.width)  # validation's and the saved grid: --resolution x --width
    # --aspect_buckets: each micro-batch at one size, with that size's grid and latents
    buckets = aspect_buckets.BucketSizes(parts, args)
    sizes = buckets.sizes
    grids = {
        size: (
            grid_at(*size),
            flow_models.latent_shape(parts, args.train_batch_size, size[0], args.num_frames, size[1]),
        )
        for size in sizes
    }
    logger.info(
        "preset %s: loss %s, %d-step grid %s, real guidance %s, fake guidance %s",
        args.preset,
        args.loss,
        len(sigmas),
        [round(s, 4) for s in sigmas],
        args.guidance if parts.family == "flux" else args.guidance_scale,
        args.fake_guidance if parts.family == "flux" else args.fake_guidance_scale,
    )

    # One frozen transformer: the generator's adapter, the fake score's adapter, and the teacher (none).
    base = flow_critics.build_shared_base(args, parts.transformer, device, dtype, parts.family)
    shared_critics.shard(
        accelerator, base
    )  # FSDP2: the frozen base sharded once, each view shards its adapter
    gen_view, fake_view = base.view(flow_critics.GENERATOR), base.view(flow_critics.FAKE)
    # --compile: the base's blocks, run by every view
    compilation.compile_networks(args, base.model, accelerator=accelerator)
    opt_g = runtime.adamw(gen_view.parameters(), args)
    opt_f = runtime.adamw(fake_view.parameters(), args, lr=args.fake_learning_rate)
    gen_view, opt_g, fake_view, opt_f = runtime.prepare(accelerator, (gen_view, opt_g), (fake_view, opt_f))
    gan = (
        flow_critics.FakeFeatureGAN.build(accelerator, args, base, parts.family)
        if args.gan_weight > 0
        else None
    )
    ema = checkpoints.setup_checkpoints(accelerator, args, gen_view, extra_lora={"fake": fake_view})

    def denoiser(model: Any, guidance: float | None = args.guidance) -> flow_models.FlowDenoiser:
        return flow_models.FlowDenoiser(model, parts.family, guidance)

    embedded = parts.family == "flux" and args.guidance is not None
    uncond = flow_encoding.uncond_conditions(parts, args, device, dtype) if parts.uses_cfg else None

    def score(model: Any, scale: Any) -> TeacherSolver:
        """A score with its guidance: FLUX.1-dev's embedded input, SD3's / Wan's CFG (a no-op at 1), schnell's
        none."""
        if embedded:
            return TeacherSolver(denoiser(model), schedule, guidance_scale=scale, guidance_input="guidance")
        if not parts.uses_cfg:
            return TeacherSolver(denoiser(model), schedule)
        rescale = flow_families.guidance_rescale(parts.family)  # Qwen-Image's true-CFG renormalisation
        return TeacherSolver(denoiser(model), schedule, guidance_scale=scale, guidance_rescale=rescale)

    real_scale = (  # Wan 2.2 A14B: each expert's scale (a guidance schedule of the timestep)
        args.guidance
        if parts.family == "flux"
        else flow_families.expert_guidance(parts, args.guidance_scale, args.guidance_scale_2)
    )
    fake_scale = args.fake_guidance if parts.family == "flux" else args.fake_guidance_scale
    real = score(base.view(None), real_scale)
    fake_frozen = score(accelerator.unwrap_model(fake_view), fake_scale)  # in the generator update
    fake_trained = score(fake_view, fake_scale)  # the prepared (DDP) view in its own update
    real_uncond = uncond if not embedded and parts.uses_cfg else None
    fake_uncond = uncond if parts.uses_cfg and args.fake_guidance_scale != 1.0 else None
    loss_range = flow_critics.sigma_range_to_t(args.loss_sigma_range, schedule)
    fake_range = flow_critics.sigma_range_to_t(args.fake_sigma_range, schedule)

    def generator_loss(
        x: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kwargs: dict[str, Any] = {
            "schedule": schedule,
            "cond": cond,
            "uncond": real_uncond,
            "fake_uncond": fake_uncond,
            "t_range": loss_range,
            "generator": gen,
        }
        if args.loss == "sim":
            return sim_loss(x, real, fake_frozen, distance=args.sim_distance, c=args.sim_c, **kwargs)
        if args.loss == "sid":
            return sid_loss(x, real, fake_frozen, alpha=args.sid_alpha, **kwargs)
        return dmd_loss(x, real, fake_frozen, **kwargs)

    def fake_loss(
        x: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fake_score_loss(
            fake_trained,
            x,
            schedule=schedule,
            weighting=args.fake_weighting,
            cond=cond,
            uncond=fake_uncond,
            t_range=fake_range,
            generator=gen,
        )

    data = data_sources.StepData(args, need_images=gan is not None)
    score_distillation = flow_critics.FlowScoreDistillation(
        accelerator,
        args,
        generator=(gen_view, opt_g),
        fake=(fake_view, opt_f),
        denoiser=denoiser,
        sigmas=sigmas,
        latent_shape=grids[sizes[0]][1],
        generator_loss=generator_loss,
        fake_loss=fake_loss,
        gan=gan,
    )
    global_step = checkpoints.resume(accelerator, args)

    def train_step(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        real_latents = None
        if gan is None:
            _, prompts = data.batch(gen)
            size = buckets.draw(gen)  # a size per micro-batch, uniform over the buckets
        else:  # the batch's images as VAE latents (the family's normalisation), their captions the prompts
            real_latents, prompts = data.latents_batch(gen, parts.vae, device)
            size = buckets.of(real_latents)  # the images' bucket: the samples' size
        cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
        return score_distillation.step(step, gen, cond, real=real_latents, grid=grids[size])

    def validate(step: int) -> None:
        student = denoiser(accelerator.unwrap_model(gen_view))
        flow_validation.log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: flow_critics.renoise_steps(  # re-noising apart from the initial noise (seed --seed)
                student, z, sigmas, c, torch.Generator().manual_seed(student_sampler.renoise_seed(args.seed))
            ),
            step,
        )

    loop.train_loop(
        accelerator,
        args,
        global_step,
        train_step,
        validate,
        data=data,
        ema=ema,
        ema_due=score_distillation.generator_steps_at,  # the average moves once per generator update
    )
    flow_critics.save_adapter(accelerator, fake_view, args, parts, flow_critics.FAKE_LORA_NAME)
    flow_critics.save_adapter(accelerator, gen_view, args, parts, checkpoints.LORA_WEIGHT_NAME, ema=ema)
    if accelerator.is_main_process:  # DMD2's sampler on the sigmas as given (no shift, fresh noise per step)
        from diffusers import FlowMatchEulerDiscreteScheduler

        FlowMatchEulerDiscreteScheduler.from_config(
            parts.noise_scheduler.config,
            shift=1.0,
            use_dynamic_shifting=False,
            shift_terminal=None,  # Qwen-Image's 0.02 would stretch the given sigmas (reference/flow.md pitfall 5)
            stochastic_sampling=True,
        ).save_pretrained(Path(args.output_dir) / "scheduler")
        (Path(args.output_dir) / "student_sigmas.json").write_text(json.dumps(sigmas) + "\n")
        if args.aspect_buckets:  # each trained size's grid (FLUX / Qwen-Image: shifted for its token count)
            aspect_buckets.write_grids(args.output_dir, {size: grid for size, (grid, _) in grids.items()})
        student_sampler.write_record(
            args,
            parts,
            flow_encoding.max_sequence_length(args, parts),
            shifted_grid=args.student_sigmas is None,
            initial_noise_scale=sigmas[0],  # the generator starts from sigmas[0] z
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
