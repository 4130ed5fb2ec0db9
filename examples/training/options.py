"""Command-line options every SDXL distillation script shares, and their validation."""

from __future__ import annotations

import argparse
from typing import Any

import torch


def add_common_args(
    parser: argparse.ArgumentParser, *, default_lr: float | None = 1e-6
) -> argparse.ArgumentParser:
    """Add the options every script shares (model, data, optimisation, checkpoints, logging)."""
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
    g.add_argument("--lora_rank", type=int, default=64)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    g = parser.add_argument_group("data")
    g.add_argument("--prompts_file", default=None, help="text file, one prompt a line (prompt-only methods)")
    g.add_argument(
        "--train_data_dir",
        default=None,
        help="folder of images, each with an optional same-name .txt caption",
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
    g.add_argument("--ema_decay", type=float, default=0.9999, help="decay of the --use_ema average")
    g.add_argument(
        "--ema_warmup",
        choices=["linear", "none"],
        default="linear",
        help="--use_ema decay schedule: 'linear' caps update n's decay at (1 + k) / (10 + k), k = n - 1 (diffusers' "
        "EMAModel), so a short run's average is not mostly its start weights; 'none': constant --ema_decay",
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
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
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


def check_common_args(args: argparse.Namespace, *, image_method: bool = False) -> argparse.Namespace:
    """Validate the shared options; raises ``ValueError`` with the fix.

    ``image_method``: the script trains on images and their captions (``--train_data_dir``), so a
    ``--prompts_file`` beside them is refused (:func:`check_data_sources`)."""
    for name in (
        "train_batch_size",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"Expected --{name} >= 1, but got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"Expected --checkpoints_total_limit >= 1, but got {args.checkpoints_total_limit}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"Expected --dataloader_num_workers >= 0, but got {args.dataloader_num_workers}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"Expected --ema_decay in [0, 1], but got {args.ema_decay}.")
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(
            "Expected --resolution to be a positive multiple of 8 (the VAE's downsampling factor; the image "
            f"side in pixels, e.g. 1024 for SDXL), but got {args.resolution}."
        )
    if args.lora_rank < 1:
        raise ValueError(f"Expected --lora_rank >= 1, but got {args.lora_rank}: pass e.g. --lora_rank 64.")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(
            "Expected --lora_alpha > 0 (the LoRA update is scaled by alpha / rank), but got "
            f"{args.lora_alpha}: leave it out to use the rank."
        )
    if getattr(args, "fake_steps", 1) > 1 and args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"--fake_steps {args.fake_steps} with --gradient_accumulation_steps {args.gradient_accumulation_steps}: "
            "each micro-batch runs every fake-score update, so the first update of a step would apply the "
            "gradients of all of them; use --fake_steps 1 with accumulation (or no accumulation)."
        )
    if getattr(args, "fake_steps", 1) < 1:
        raise ValueError(f"Expected --fake_steps >= 1, but got {args.fake_steps}.")
    if args.max_grad_norm is not None and not args.max_grad_norm >= 0:
        raise ValueError(
            f"Expected --max_grad_norm >= 0 (0: no clipping), but got {args.max_grad_norm}: pass a positive "
            "norm to clip at, or 0 to train without clipping."
        )
    check_data_sources(args, image_method=image_method)
    check_compile_args(args)
    return args


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
