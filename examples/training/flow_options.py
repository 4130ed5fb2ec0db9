"""Command-line options of the SD3 / FLUX / Wan scripts (beside the shared ones), and their validation."""

from __future__ import annotations

import argparse
from typing import Any

from . import aspect_buckets, flow_families


def add_flow_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every flow script takes on top of :func:`training.options.add_common_args`.

    ``--guidance``: FLUX.1-dev's embedded guidance (an input of the guidance-distilled transformer, not CFG;
    reference/flow.md pitfall 1); ``--max_sequence_length``: the T5 token length; ``--num_frames``: Wan's video
    length; ``--uncond`` defaults to the encoded empty prompt (the SD3 and Wan pipelines' negative) instead of
    SDXL's zeros; ``--resolution`` defaults to the variant's (1024; Wan 480, Wan 2.2 TI2V-5B 704: :func:`fill_resolution`).
    """
    g = parser.add_argument_group("SD3 / FLUX / Qwen-Image / Wan")
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="embedded guidance of a guidance-distilled FLUX (FLUX.1-dev: default 3.5, FluxPipeline's); refused "
        "for models without a guidance embedding (SD3, FLUX.1-schnell)",
    )
    g.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="prompt length in tokens (default: the pipeline's, SD3 256, FLUX / Qwen-Image / Wan 512; at most 512, "
        "Qwen-Image 1024)",
    )
    g.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Wan: frames of the training and validation videos, 4k + 1 (default 81, WanPipeline's); refused "
        "for image models",
    )
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="width in px of the training and validation samples (default --resolution: square; e.g. Wan "
        "--resolution 480 --width 832); Wan's video clips (--train_data_dir) are cropped to it; refused with image "
        "data (square crops)",
    )
    parser.set_defaults(uncond="empty_prompt", resolution=None)
    return parser


def fill_resolution(args: argparse.Namespace, variant: str | None) -> None:
    """Fill an unset ``--resolution`` with the variant's default (:data:`training.flow_families.DEFAULT_RESOLUTION`,
    else 1024); ``variant`` None (a hub id before the load) leaves it unset."""
    if getattr(args, "resolution", 0) is None and variant is not None:
        args.resolution = flow_families.DEFAULT_RESOLUTION.get(variant, 1024)


def add_ladd_head_args(group: Any, *, lr_help: str) -> None:
    """The options of LADD-style discriminator heads on the frozen teacher's blocks
    (:class:`diffdistill.discriminators.LADDDiscriminator`), shared by the flow scripts that judge with them:
    ``--discriminator_blocks``, ``--discriminator_head_channels``, ``--discriminator_norm_groups`` and
    ``--discriminator_learning_rate`` (``lr_help``: the script's default learning rate of the heads)."""
    group.add_argument(
        "--discriminator_blocks",
        type=int,
        nargs="+",
        default=None,
        help="teacher blocks (execution order) read by the heads (default: every len(blocks)//4-th)",
    )
    group.add_argument(
        "--discriminator_head_channels", type=int, default=None, help="default min(width, 256)"
    )
    group.add_argument("--discriminator_norm_groups", type=int, default=32)
    group.add_argument("--discriminator_learning_rate", type=float, default=None, help=lr_help)


MAX_TEXT_TOKENS = {"sd3": 512, "flux": 512, "wan": 512, "qwen": 1024}
"""The longest ``--max_sequence_length`` a family's pipeline takes (its T5 / umT5 512; ``QwenImagePipeline`` 1024)."""


def check_flow_values(
    args: argparse.Namespace, variant: str | None = None, *, vae_factor: int | None = None
) -> argparse.Namespace:
    """Validate the flow options that need no model (``--resolution`` and ``--aspect_buckets`` sides multiples of 16,
    ``--max_sequence_length`` in [1, 1024], ``--guidance`` > 0, ``--num_frames`` >= 1) and those that need only the family
    (:func:`check_family_options`): ``variant`` (a family or Wan variant), or for a local pipeline folder the one its
    ``model_index.json`` names (:func:`local_variant`). The scripts' ``parse_args`` call it, so a typo fails before
    the (minutes long) model load; ``vae_factor`` is the VAE's spatial factor (default: a local folder's
    ``vae/config.json`` ``scale_factor_spatial``, else 8; Wan 2.2 TI2V-5B: 16, so multiples of 32), and
    :func:`check_flow_args` calls it again with the loaded VAE's. Raises ``ValueError`` with the fix."""
    variant = variant or local_variant(args)
    vae_factor = vae_factor or local_vae_factor(args)
    fill_resolution(args, variant)
    step = vae_factor * 2  # VAE factor x patch size: the latents must split into 2x2 patches
    for name in ("resolution", "width"):
        value = getattr(args, name, None)
        if value is not None and (value < step or value % step):
            raise ValueError(
                f"Expected --{name} to be a positive multiple of {step} (the VAE's factor {vae_factor} times the "
                f"transformer's 2x2 patches), but got {value}: round it, e.g. to {max(step, value // step * step)}."
            )
    aspect_buckets.check_sizes(args, step)
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_TEXT_TOKENS["qwen"]:
        raise ValueError(
            f"Expected --max_sequence_length in [1, 1024] (SD3 / FLUX / Wan: T5 tokens, at most 512; Qwen-Image up to "
            f"1024), but got {args.max_sequence_length}."
        )
    if args.guidance is not None and not args.guidance > 0:
        raise ValueError(
            f"Expected --guidance > 0 (FLUX.1-dev's embedded guidance, default 3.5), but got {args.guidance}."
        )
    if getattr(args, "num_frames", None) is not None and args.num_frames < 1:
        raise ValueError(f"Expected --num_frames >= 1 (Wan: 4k + 1, e.g. 81), but got {args.num_frames}.")
    if variant is not None:
        check_family_options(args, flow_families.family_of(variant))
    return args


def local_variant(args: argparse.Namespace) -> str | None:
    """The variant of a local ``--pretrained_model_name_or_path`` folder, read from its ``model_index.json``
    (:func:`training.flow_families.model_variant`, which refuses other pipelines), or None for a hub id (it is
    known once the model loads)."""
    from pathlib import Path

    path = args.pretrained_model_name_or_path
    if path is None or not (Path(path) / "model_index.json").is_file():
        return None
    return flow_families.model_variant(str(path), getattr(args, "revision", None))


def local_vae_factor(args: argparse.Namespace) -> int:
    """The spatial factor a local pipeline folder's ``vae/config.json`` declares (``scale_factor_spatial``: the Wan
    VAEs, 8 or 16), else 8 (SD3 / FLUX / Qwen-Image VAEs, and hub ids before the load)."""
    import json
    from pathlib import Path

    path = args.pretrained_model_name_or_path
    config = Path(path or "") / "vae" / "config.json"
    if path is None or not config.is_file():
        return 8
    return int(json.loads(config.read_text()).get("scale_factor_spatial") or 8)


def local_family(args: argparse.Namespace) -> str | None:
    """The family of a local ``--pretrained_model_name_or_path`` folder (:func:`local_variant`), or None."""
    variant = local_variant(args)
    return None if variant is None else flow_families.family_of(variant)


def check_family_options(args: argparse.Namespace, family: str) -> None:
    """The checks that need only the model family: ``--max_sequence_length`` within the family's limit,
    ``--num_frames`` only for Wan, ``--width`` with ``--train_data_dir`` only for Wan (image data is square crops;
    Wan's clips are cropped to ``--resolution`` x ``--width``), and for Wan a ``--train_data_dir`` of video clips
    (:func:`training.caption_folders.find_clips`: no loose images; ``ImportError`` for video files without imageio).
    Raises ``ValueError``."""
    name = flow_families.FAMILY_NAMES[family]
    limit = MAX_TEXT_TOKENS[family]
    if args.max_sequence_length is not None and args.max_sequence_length > limit:
        raise ValueError(
            f"Expected --max_sequence_length <= {limit} for {name} (its pipeline refuses more), but got "
            f"{args.max_sequence_length}."
        )
    if family != "wan" and getattr(args, "num_frames", None) is not None:
        raise ValueError(
            f"--num_frames is the video length of Wan, but this is a {name} image model: drop it."
        )
    data = getattr(args, "train_data_dir", None)
    if family != "wan" and getattr(args, "width", None) is not None and data:
        raise ValueError(
            "--width trains non-square samples from prompts, but --train_data_dir images are square crops at "
            "--resolution: drop --width (or run prompt-only; non-square images: --aspect_buckets)."
        )
    if family == "wan" and data and getattr(args, "aspect_buckets", None):
        raise ValueError(
            "--aspect_buckets crops images to several sizes, but Wan's --train_data_dir clips are cropped to one, "
            "--resolution x --width: drop --aspect_buckets (or run prompt-only, whose teacher videos take them)."
        )
    if family == "wan" and data:
        from . import caption_folders  # no import of the flow scripts

        caption_folders.find_clips(data)  # a folder of clips, not of images: refused before the model loads


def check_flow_args(args: argparse.Namespace, parts: Any) -> argparse.Namespace:
    """Validate the flow options against the loaded model (``parts``: :class:`training.flow_models.FlowComponents`)
    after :func:`check_flow_values`; fills ``--guidance`` with 3.5 for a guidance-distilled FLUX and
    ``--num_frames`` with the Wan variant's default. Raises ``ValueError`` with the fix."""
    from .flow_models import vae_scale_factor

    check_flow_values(args, parts.variant or parts.family, vae_factor=vae_scale_factor(parts.vae))
    embeds = bool(getattr(parts.transformer.config, "guidance_embeds", False))
    if args.guidance is not None and not embeds:
        raise ValueError(
            f"--guidance {args.guidance} is the embedded guidance of a guidance-distilled FLUX (FLUX.1-dev), but this "
            f"{parts.name} transformer has no guidance embedding: drop --guidance (use the script's "
            "classifier-free guidance scale where it has one)."
        )
    if embeds and args.guidance is None:
        args.guidance = 3.5  # FluxPipeline's default guidance_scale
    check_num_frames(args, parts)
    return args


def check_num_frames(args: argparse.Namespace, parts: Any) -> None:
    """Wan's ``--num_frames`` (image models refuse it: :func:`check_family_options`): filled with the variant's
    default (:func:`training.flow_families.default_num_frames`: ``WanPipeline``'s 81, Wan 2.2 TI2V-5B 121) and checked to be ``k * scale_factor_temporal + 1`` (the VAE keeps the first frame
    and compresses each later group of 4; ``WanPipeline`` rounds other lengths down with a warning, we refuse
    them). Raises ``ValueError``."""
    frames = getattr(args, "num_frames", None)
    if not parts.is_video:
        return
    if frames is None:
        args.num_frames = frames = flow_families.default_num_frames(parts.variant)
    step = int(parts.vae.config.scale_factor_temporal)
    if (frames - 1) % step:
        fit = (frames - 1) // step * step + 1
        raise ValueError(
            f"Expected --num_frames to be {step}k + 1 (Wan's VAE keeps the first frame and compresses each later "
            f"group of {step}), but got {frames}: use {fit} or {fit + step}."
        )
