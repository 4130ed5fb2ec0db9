"""Command-line options every SDXL distillation script shares, and their validation."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch


def add_common_args(
    parser: argparse.ArgumentParser, *, default_lr: float | None = 1e-6
) -> argparse.ArgumentParser:
    """Add the options every script shares (model, data, optimisation, checkpoints, logging).

    Also turns off argparse's prefix matching (``allow_abbrev``) for the whole parser: with it, a flag of
    another script (``--guidance``, FLUX's embedded guidance) would silently set this script's
    ``--guidance_scale`` (CFG)."""
    parser.allow_abbrev = False
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL diffusers folder or hub id (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/)",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path", default=None, help="e.g. madebyollin/sdxl-vae-fp16-fix"
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="e.g. fp16")
    g.add_argument(
        "--use_lora", action="store_true", help="train a LoRA on the UNet instead of the full UNet"
    )
    g.add_argument("--lora_rank", type=int, default=None, help="default 64; needs --use_lora")
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank; needs --use_lora")
    g = parser.add_argument_group("data")
    g.add_argument("--prompts_file", default=None, help="text file, one prompt a line (prompt-only methods)")
    g.add_argument(
        "--train_data_dir",
        default=None,
        help="folder of images, each with an optional same-name .txt caption (Wan: clips, i.e. folders of frames "
        "with clip.txt beside them, or .mp4 files)",
    )
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument(
        "--cache_dir",
        default=None,
        help="cache VAE posteriors and prompt embeddings here (reused across runs)",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="worker processes that load (and decode) the next batches ahead; 0: load in the main process",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="per device")
    g.add_argument("--max_train_steps", type=int, default=1000)
    g.add_argument("--learning_rate", type=float, default=default_lr)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="keep an EMA of the trainable weights (checkpointed; written as the output instead of the raw weights)",
    )
    g.add_argument(
        "--ema_decay", type=float, default=None, help="decay of the --use_ema average (default 0.9999)"
    )
    g.add_argument(
        "--ema_warmup",
        choices=["linear", "none"],
        default=None,
        help="--use_ema decay schedule: 'linear' (the default) caps update n's decay at (1 + k) / (10 + k), "
        "k = n - 1 (diffusers' EMAModel), so a short run's average is not mostly its start weights; 'none': "
        "constant --ema_decay",
    )
    g.add_argument(
        "--uncond",
        choices=["zeros", "empty_prompt"],
        default="zeros",
        help="unconditional (negative) branch of classifier-free guidance: 'zeros' (zero prompt and pooled "
        "embeddings, SDXL-base's force_zeros_for_empty_prompt as in diffusers' SDXL pipeline) or "
        "'empty_prompt' (the encoded empty prompt)",
    )
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", required=True)
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="save a checkpoint every N steps and at the last step; 0: no checkpoints",
    )
    g.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=3,
        help="keep the newest N complete checkpoints (default 3: a full SDXL checkpoint with its optimiser "
        "states is tens of GB); 0: keep every one",
    )
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder')
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--tracker_project_name", default=None)
    g.add_argument("--validation_prompts", nargs="*", default=None, help="prompts of the validation grid")
    g.add_argument("--validation_steps", type=int, default=500, help="grid every N steps and at the end")
    add_compile_args(parser.add_argument_group("speed"))
    return parser


def add_compile_args(parser: argparse.ArgumentParser | Any) -> None:
    """Add ``--compile``, ``--compile_mode`` and ``--compile_backend`` (a parser or an argument group)."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the trained network(s), the frozen teacher and the critics, block by block (regional "
        "compilation: examples/training/compilation.py); works with LoRA, --shared_base, gradient checkpointing, "
        "DDP, FSDP2 and DeepSpeed ZeRO-1/2 (ZeRO-3 refused)",
    )
    parser.add_argument(
        "--compile_mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        default="default",
        help="torch.compile mode (inductor only): reduce-overhead adds CUDA graphs, max-autotune also tunes kernels",
    )
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend (default inductor; aot_eager / eager compile no kernels: for tests)",
    )


def check_compile_args(args: argparse.Namespace) -> None:
    """Refuse an unknown ``--compile_backend``, a ``--compile_mode`` the backend ignores, or either without
    ``--compile`` (``ValueError``)."""
    compile_, mode = getattr(args, "compile", False), getattr(args, "compile_mode", "default")
    backend = getattr(args, "compile_backend", "inductor")
    if not compile_:
        if mode != "default" or backend != "inductor":
            raise ValueError(
                f"--compile_mode {mode} / --compile_backend {backend} choose how --compile compiles, but "
                "--compile is not given: add --compile, or leave them out."
            )
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(
            f"Expected --compile_backend to be one of torch.compile's backends {backends}, but got "
            f"{backend!r}: leave it out for inductor."
        )
    if mode != "default" and backend != "inductor":
        raise ValueError(
            f"--compile_mode {mode} is an inductor mode, but --compile_backend is {backend!r} (which ignores it): "
            "use --compile_backend inductor, or leave out --compile_mode."
        )


#: The shared options that only a flag turns on: ``{option: (flag, default)}``. Parsed with ``None`` (not given),
#: refused without their flag and filled with their default under it by :func:`check_parent_options`
#: (``--lora_alpha``'s default is the rank).
LORA_OPTIONS = ("lora_rank", "lora_alpha")
"""The options of ``--use_lora``."""

PARENT_OPTIONS: dict[str, tuple[str, Any]] = {
    "lora_rank": ("use_lora", 64),
    "lora_alpha": ("use_lora", None),
    "ema_decay": ("use_ema", 0.9999),
    "ema_warmup": ("use_ema", "linear"),
}


def check_parent_options(args: argparse.Namespace) -> None:
    """Refuse a :data:`PARENT_OPTIONS` option given without its flag (``ValueError``), and fill the defaults of
    those whose flag is on.

    Without the flag nothing reads them (a run without ``--use_lora`` trains the full network whatever
    ``--lora_rank`` says), so a forgotten ``--use_lora`` would otherwise pass without a word. Options of an
    unused flag stay ``None`` (also in the checkpoints' recorded options), so a second call changes nothing.
    """
    for name, (flag, default) in PARENT_OPTIONS.items():
        if not hasattr(args, name):
            continue
        if not getattr(args, flag, False):
            if getattr(args, name) is not None:
                raise ValueError(
                    f"--{name} applies only with --{flag}, which this run does not use: add --{flag} or drop "
                    f"--{name}."
                )
        elif getattr(args, name) is None:
            setattr(args, name, default)
    if getattr(args, "use_lora", False) and getattr(args, "lora_alpha", 0) is None:
        args.lora_alpha = float(args.lora_rank)  # a scale alpha / rank of 1


def refuse_lora(args: argparse.Namespace, why: str) -> None:
    """Refuse ``--use_lora`` and its options in a script that trains a whole network (``why`` says which and
    why); call it before :func:`check_common_args`, whose advice for a lone ``--lora_rank`` is to add
    ``--use_lora``. Raises ``ValueError``."""
    given = [f"--{name}" for name in ("use_lora", *LORA_OPTIONS) if getattr(args, name, None)]
    if given:
        raise ValueError(f"{why}: drop {' / '.join(given)}.")


def check_common_args(args: argparse.Namespace, *, image_method: bool = False) -> argparse.Namespace:
    """Validate the shared options and fill the defaults of the flag-dependent ones
    (:func:`check_parent_options`); raises ``ValueError`` with the fix.

    ``image_method``: the script trains on images and their captions (``--train_data_dir``), so a
    ``--prompts_file`` beside them is refused (:func:`check_data_sources`)."""
    check_parent_options(args)
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "validation_steps"):
        check_range(args, name, low=1)
    for name in ("checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers"):
        check_range(args, name, low=0)
    check_optimizer_ranges(args)
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):  # None: filled by family
        raise ValueError(
            "Expected --resolution to be a positive multiple of 8 (the VAE's downsampling factor; the image "
            f"side in pixels, e.g. 1024 for SDXL), but got {args.resolution}."
        )
    check_range(args, "lora_rank", low=1)
    check_range(
        args,
        "lora_alpha",
        low=0,
        low_open=True,
        why="the update is scaled by alpha / rank; default: the rank",
    )
    check_range(args, "fake_steps", low=1)
    if getattr(args, "fake_steps", 1) > 1 and args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"--fake_steps {args.fake_steps} with --gradient_accumulation_steps {args.gradient_accumulation_steps}: "
            "each micro-batch runs every fake-score update, so the first update of a step would apply the "
            "gradients of all of them; use --fake_steps 1 with accumulation (or no accumulation)."
        )
    check_data_sources(args, image_method=image_method)
    check_paths(args)
    check_compile_args(args)
    return args


def check_range(
    args: argparse.Namespace,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Refuse ``--name`` outside ``[low, high]`` (``low_open`` / ``high_open``: the bound itself excluded);
    ``None`` (an option left out) passes, NaN never does. Raises ``ValueError`` naming the option, the range,
    the value and ``why``.

    The one range check of the scripts' numeric options: learning rates ``> 0``, Adam betas in ``[0, 1)``,
    weight decays ``>= 0``, decays of averages in ``[0, 1)`` (:func:`check_optimizer_ranges`), counts ``>= 1``.
    """
    value = getattr(args, name, None)
    if value is None:
        return
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if above and below and not (isinstance(value, float) and math.isnan(value)):
        return
    if high is None:
        wanted = f"{'>' if low_open else '>='} {low:g}"
    elif low is None:
        wanted = f"{'<' if high_open else '<='} {high:g}"
    else:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"Expected --{name} {wanted}{f' ({why})' if why else ''}, but got {value}.")


def check_optimizer_ranges(args: argparse.Namespace) -> None:
    """The bounds of the optimiser and average options, by name, for every option of the script that has one
    (the shared ones and the scripts' own ``--fake_learning_rate``, ``--discriminator_adam_beta2``, ...):

    - ``*learning_rate`` ``> 0`` (0 trains nothing; a negative lr ascends the loss);
    - ``*adam_beta1`` / ``*adam_beta2`` in ``[0, 1)`` (Adam's moment decays; 1 never updates them);
    - ``*weight_decay`` ``>= 0`` (a negative one grows the weights);
    - ``--ema_decay`` in ``[0, 1)`` (1 would release the initial weights) and ``--target_ema_decay`` in
      ``[0, 1]`` (1: a target frozen at the initial student);
    - ``--max_grad_norm`` ``>= 0`` (0: no clipping).
    """
    for name in sorted(vars(args)):
        if name.endswith("learning_rate"):
            check_range(
                args, name, low=0, low_open=True, why="0 trains nothing, a negative rate ascends the loss"
            )
        elif name.endswith(("adam_beta1", "adam_beta2")):
            check_range(args, name, low=0, high=1, high_open=True, why="an Adam moment decay")
        elif name.endswith("weight_decay"):
            check_range(args, name, low=0, why="0: no weight decay")
    check_range(args, "ema_decay", low=0, high=1, high_open=True, why="1 would release the initial weights")
    check_range(args, "target_ema_decay", low=0, high=1)
    check_range(args, "max_grad_norm", low=0, why="0: no clipping")


def check_paths(args: argparse.Namespace) -> None:
    """Refuse a ``--prompts_file`` that is not a file, a ``--train_data_dir`` without an image or video, and a
    ``--resume_from_checkpoint`` that is neither ``latest`` nor a ``checkpoint-N`` folder -- in ``parse_args``,
    before the models load (``ValueError``)."""
    from . import caption_folders, checkpoints  # checkpoints imports this module

    prompts = getattr(args, "prompts_file", None)
    if prompts and not Path(prompts).is_file():
        raise ValueError(
            f"Expected --prompts_file to be a text file (one prompt a line), but {prompts} is not a file."
        )
    images = getattr(args, "train_data_dir", None)
    if images:
        if not Path(images).is_dir():
            raise ValueError(
                f"Expected --train_data_dir to be a folder of images, but {images} is not a folder."
            )
        # a clip's frames are images
        suffixes = caption_folders.IMAGE_SUFFIXES + caption_folders.VIDEO_SUFFIXES
        if next((p for p in Path(images).rglob("*") if p.suffix.lower() in suffixes), None) is None:
            raise ValueError(
                f"Expected --train_data_dir {images} to hold images or video clips ({', '.join(suffixes)}, "
                "in it or its sub-folders), but found none."
            )
    checkpoints.resolve_checkpoint(args)


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse a run without ``--resume_from_checkpoint`` into an ``--output_dir`` that holds checkpoints
    (``ValueError``). Called by :func:`training.runtime.make_accelerator`, the first call of every script's
    ``main`` (before any model loads): ``parse_args`` alone may read a finished run's options again.

    Such a run would start from the pretrained weights and interleave its checkpoints with the earlier run's:
    pruning keeps the earlier run's higher-numbered ones, and a relaunch with ``latest`` resumes them.
    """
    from . import checkpoints  # it imports this module's users

    if getattr(args, "resume_from_checkpoint", None):
        return
    found = checkpoints.checkpoint_dirs(args.output_dir)
    if found:
        raise ValueError(
            f"--output_dir {args.output_dir} already holds checkpoints ({', '.join(p.name for p in found[-3:])}) "
            "but --resume_from_checkpoint is not given: pass --resume_from_checkpoint latest to continue that "
            "run, choose a new --output_dir, or delete its checkpoint-* folders to start over there."
        )


def check_data_sources(args: argparse.Namespace, *, image_method: bool) -> None:
    """Refuse ``--prompts_file`` beside ``--train_data_dir`` for a method that trains on images.

    Such a method pairs each image with its own caption; a prompt list would replace the captions with
    prompts drawn independently of the images, i.e. train on images under unrelated text."""
    if image_method and getattr(args, "train_data_dir", None) and getattr(args, "prompts_file", None):
        raise ValueError(
            "This method trains on images and their captions (--train_data_dir), so --prompts_file "
            f"{args.prompts_file} would pair each image with an unrelated random prompt: drop --prompts_file "
            "(write the captions as same-name .txt files next to the images instead)."
        )
