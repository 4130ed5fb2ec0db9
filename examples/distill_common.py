"""Shared pieces of the ``examples/sdxl_*.py`` distillation scripts.

Everything a script needs besides its loss: the common command-line options, loading the SDXL components
from a diffusers folder (or hub id), SDXL prompt encoding (two CLIP encoders, pooled text embeddings,
``time_ids``), the data sources (a prompt list or an image-caption folder), ``Accelerator`` set-up,
numbered ``checkpoint-{step}`` folders with pruning and exact resume, the progress bar, and the final
diffusers-loadable weights. :func:`save_tiny_sdxl_pipeline` writes a tiny SDXL-structured pipeline
(random weights, offline tokenizers) for the smoke tests.

Determinism and resume: every optimisation step draws its data indices, noise and timesteps from a
``torch.Generator`` seeded by ``(seed, step, process, micro-batch)`` (:func:`step_generator`), so a run
resumed from ``checkpoint-N`` computes exactly the step ``N + 1`` that an uninterrupted run computes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffdistill.students import reshard, save_lora

logger = logging.getLogger("distill_common")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------- options
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
    return parser


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


# ----------------------------------------------------------------------------------------------- models
@dataclass
class SDXLComponents:
    """The parts of an SDXL pipeline a distillation script uses."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any
    cache_tag: str = ""  # what the cached prompt embeddings depend on: model, revision, variant

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2]


def load_sdxl(args: argparse.Namespace) -> SDXLComponents:
    """Load UNet, VAE, both CLIP text encoders and tokenizers and a DDPM scheduler from the SDXL folder/hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path, rev, var = args.pretrained_model_name_or_path, args.revision, args.variant
    vae_path = args.pretrained_vae_model_name_or_path
    with zero3_init_disabled():
        return SDXLComponents(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var),
            vae=AutoencoderKL.from_pretrained(
                vae_path or path, subfolder=None if vae_path else "vae", revision=rev
            ),
            text_encoder=CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", revision=rev, variant=var
            ),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", revision=rev, variant=var
            ),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
            cache_tag=model_cache_tag(args),
        )


def model_cache_tag(args: argparse.Namespace, *, vae: bool = False) -> str:
    """The model a cached tensor came from (folder or hub id, revision, variant; the VAE's for latents).

    Part of every ``--cache_dir`` key, so a cache shared by runs of different models never hands one
    model's embeddings or latents to another.
    """
    path = args.pretrained_model_name_or_path
    if vae and args.pretrained_vae_model_name_or_path:
        return f"vae={args.pretrained_vae_model_name_or_path}|revision={args.revision}"
    return f"model={path}|revision={args.revision}|variant={args.variant}" + ("|vae" if vae else "")


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load models whole under DeepSpeed ZeRO-3 (a no-op otherwise).

    With a ZeRO-3 config registered, transformers' ``from_pretrained`` partitions a model across the
    processes as it loads it (``deepspeed.zero.Init``); the frozen text encoders are never prepared by
    accelerate, so their partitioned weights would never be gathered (CLIP then fails with
    ``max_position_embeddings: 0``). accelerate's ``zero3_init_context_manager(enable=False)`` does not
    prevent it (it registers the config again), so the registration is lifted while loading. The trained
    models are partitioned by ``accelerator.prepare``.
    """
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def freeze(*modules: nn.Module) -> None:
    """``requires_grad_(False)`` and eval mode."""
    for m in modules:
        m.requires_grad_(False).eval()


def weight_dtype_of(accelerator: Any) -> torch.dtype:
    """The dtype of frozen weights under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


VAE_SCALE_FACTOR = 8  # SDXL's VAE: latents are 1/8 of the image side


def discriminator_feature_resolution(unet: nn.Module, resolution: int, level: str = "mid") -> int:
    """Spatial size of ``unet``'s ``level`` features for ``resolution`` px images: the ``feature_resolution``
    to build a UNet-encoder discriminator head with.

    The latents are ``resolution / 8``; each downsampler (3x3 conv, stride 2, padding 1) maps ``n`` to
    ``ceil(n / 2)``, so the level has ``ceil(latent / stride)``. A head sized from the UNet config's
    ``sample_size`` instead fits only ``resolution = 8 x sample_size`` (1024 px for SDXL).
    """
    from diffdistill.discriminators import UNetFeatureExtractor

    stride = UNetFeatureExtractor(unet, (level,), backbone="shared").strides[level]
    latent = int(resolution) // VAE_SCALE_FACTOR
    return -(-latent // stride)


def upcast_trainable(module: nn.Module) -> None:
    """Keep trainable parameters (e.g. LoRA) in float32 when the base weights are half precision."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def student_and_teacher(
    args: argparse.Namespace, unet: nn.Module, device: Any, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    """Make ``unet`` the trainable student and return ``(student, teacher callable)``.

    ``--use_lora``: base weights frozen in ``dtype``, a LoRA (float32) added, and the teacher is the same
    UNet with the adapters disabled under ``no_grad`` (:class:`diffdistill.students.TeacherView`).
    Otherwise the teacher is a frozen copy in ``dtype`` and the whole UNet trains (float32).
    """
    import copy

    from diffdistill.students import TeacherView

    teacher: Any = None
    if not args.use_lora:
        teacher = copy.deepcopy(unet)
        freeze(teacher)
        teacher.to(device, dtype=dtype)
    make_trainable(args, unet, device, dtype)
    return unet, TeacherView(unet) if args.use_lora else teacher


def make_trainable(args: argparse.Namespace, unet: nn.Module, device: Any, dtype: torch.dtype) -> nn.Module:
    """Make ``unet`` trainable in place: a float32 LoRA on a frozen ``dtype`` base (``--use_lora``) or the
    whole UNet (float32); with ``--gradient_checkpointing`` on. Returns ``unet``."""
    from diffdistill.students import add_lora

    if args.use_lora:
        unet.requires_grad_(False)
        unet.to(device, dtype=dtype)
        add_lora(unet, rank=args.lora_rank, alpha=args.lora_alpha)
        upcast_trainable(unet)
    else:
        unet.train().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


@torch.no_grad()
def encode_prompts(
    components: SDXLComponents, prompts: Sequence[str], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: ``(prompt_embeds (B, L, D1 + D2), pooled (B, P))``.

    Both encoders' penultimate hidden states are concatenated on the feature axis; the pooled embedding is
    the projected text embedding of the second encoder.
    """
    hidden = []
    pooled = None
    for tok, enc in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    assert pooled is not None
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(
    batch: int, resolution: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per sample."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return row.repeat(batch, 1)


def _cache_file(cache_dir: str | os.PathLike[str], kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{hashlib.sha1(key.encode('utf-8')).hexdigest()}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent processes never read a partial file


def encode_prompts_cached(
    components: SDXLComponents, prompts: Sequence[str], device: torch.device | str, cache_dir: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_prompts` with one safetensors file per prompt under ``cache_dir/text`` (if given)."""
    if cache_dir is None:
        return encode_prompts(components, prompts, device)
    from safetensors.torch import load_file

    def file(prompt: str) -> Path:
        return _cache_file(cache_dir, "text", f"{components.cache_tag}|{prompt}")

    files = [file(p) for p in prompts]
    missing = sorted({p for p, f in zip(prompts, files) if not f.exists()})
    if missing:
        ehs, pooled = encode_prompts(components, missing, device)
        for i, p in enumerate(missing):
            _save_atomic({"ehs": ehs[i], "pooled": pooled[i]}, file(p))
    loaded = [load_file(str(f)) for f in files]
    return (
        torch.stack([d["ehs"] for d in loaded]).to(device),
        torch.stack([d["pooled"] for d in loaded]).to(device),
    )


def unet_conditions(
    components: SDXLComponents,
    prompts: Sequence[str],
    resolution: int,
    device: torch.device | str,
    dtype: torch.dtype,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """UNet keyword arguments ``{"encoder_hidden_states", "added_cond_kwargs"}`` for ``prompts``."""
    ehs, pooled = encode_prompts_cached(components, prompts, device, cache_dir)
    added = {
        "text_embeds": pooled.to(dtype),
        "time_ids": sdxl_time_ids(len(prompts), resolution, device, dtype),
    }
    return {"encoder_hidden_states": ehs.to(dtype), "added_cond_kwargs": added}


def uncond_conditions(
    args: argparse.Namespace, components: SDXLComponents, device: torch.device | str, dtype: torch.dtype
) -> dict[str, Any]:
    """UNet keyword arguments of the unconditional (negative) branch of CFG, batch 1, per ``--uncond``.

    ``zeros`` (default): zero ``encoder_hidden_states`` and zero pooled ``text_embeds`` -- what diffusers'
    ``StableDiffusionXLPipeline`` uses for an empty negative prompt when ``force_zeros_for_empty_prompt``
    is set (SDXL-base's setting) and what diffusers' LCM-SDXL distillation script uses. ``empty_prompt``:
    the encoded ``""`` prompt. ``time_ids`` are those of the conditional branch in both cases.
    """
    cond = unet_conditions(components, [""], args.resolution, device, dtype, args.cache_dir)
    if args.uncond == "empty_prompt":
        return cond
    added = cond["added_cond_kwargs"]
    return {
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
        "added_cond_kwargs": {
            "text_embeds": torch.zeros_like(added["text_embeds"]),
            "time_ids": added["time_ids"],
        },
    }


def latent_scale(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of the VAE."""
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def posterior(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior of pixel images in [-1, 1] (float32)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_posterior(
    vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latents ``(mean + std * eps - shift) * scale`` with ``eps`` drawn from ``generator``."""
    scale, shift = latent_scale(vae)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
    return (mean + std * noise.to(mean) - shift) * scale


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of pixel images in [-1, 1] (a sample of the posterior drawn with ``generator``)."""
    return sample_posterior(vae, *posterior(vae, pixels), generator)


# ------------------------------------------------------------------------------------------------- data
def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Non-empty lines of a text file."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"Expected at least one prompt in {path}, but it has none.")
    return prompts


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images of a folder (recursive) with their captions: ``a.png`` + ``a.txt`` (missing caption: ``""``).

    Items are ``(pixels (3, R, R) in [-1, 1], caption)``: shorter side resized to ``R``, centre-cropped.
    """

    def __init__(self, root: str | os.PathLike[str], resolution: int) -> None:
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"Expected images ({', '.join(IMAGE_SUFFIXES)}) under {root}, but found none.")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        txt = self.files[index].with_suffix(".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else ""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        import numpy as np
        from PIL import Image

        img = Image.open(self.files[index]).convert("RGB")
        r = self.resolution
        scale = r / min(img.size)
        img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - r) // 2, (img.height - r) // 2
        img = img.crop((left, top, left + r, top + r))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return pixels, self.caption(index)


class StepSource:
    """Base of the per-step data sources: ``draw(generator) -> (indices, texts)`` picks a batch with the
    step's generator, ``load(indices) -> items`` reads it; :meth:`fetch` does both.

    With ``num_workers > 0``, :meth:`start` (called by :func:`train_loop`) opens a ``DataLoader`` whose item
    ``k`` is micro-step ``k`` (from the resume step on): a worker draws the same indices from a copy of that
    micro-step's :func:`step_generator` and loads them ahead of time. The main process still draws the
    indices from its generator (so every later draw of the step is unchanged) and checks that the
    prefetched item matches: runs with and without workers compute the same steps.
    """

    num_workers: int = 0
    #: optimisation steps >= this one use only the texts: nothing is loaded for them (in workers either).
    load_until_step: int | None = None
    _prefetched: Any = None

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
        raise NotImplementedError

    def load(self, idx: Sequence[int]) -> list[Any]:
        raise NotImplementedError

    def start(
        self, first_step: int, max_steps: int, *, seed: int, process_index: int, accumulation: int
    ) -> None:
        """Open the prefetching loader at micro-step ``first_step * accumulation`` (no-op without workers)."""
        self.close()
        if self.num_workers == 0:
            return
        items = _PrefetchedSteps(self, seed, process_index, accumulation)
        loader = torch.utils.data.DataLoader(
            items,
            batch_size=None,
            sampler=range(first_step * accumulation, max_steps * accumulation),
            num_workers=self.num_workers,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(
                step_generator(seed, first_step, process_index).initial_seed()
            ),
        )
        self._prefetched = iter(loader)

    def close(self) -> None:
        """Shut the prefetching workers down."""
        self._prefetched = None

    def fetch(
        self, generator: torch.Generator, *, load: bool = True
    ) -> tuple[list[int], list[str], list[Any]]:
        """``(indices, texts, loaded items)`` of the batch ``generator`` draws (prefetched with workers).

        ``load=False``: the items are ``None`` and nothing is loaded (a prefetched item is still consumed,
        so the loader stays in step)."""
        idx, texts = self.draw(generator)
        if self._prefetched is None:
            return idx, texts, self.load(idx) if load else [None] * len(idx)
        item = next(self._prefetched)
        if item["idx"] != idx:
            raise RuntimeError(
                f"The data loader is out of step: it prefetched indices {item['idx']} but the step drew {idx}. "
                f"Call {type(self).__name__}.start with the step training resumes at, and draw one batch per "
                "micro-step."
            )
        if not load:
            return idx, texts, [None] * len(idx)
        return idx, texts, self.load(idx) if item["items"] is None else item["items"]


class StepData(StepSource):
    """Per-step batches drawn by index from a prompt list or an image-caption folder.

    ``batch(generator)`` returns ``(pixels or None, prompts)`` and ``latents_batch(generator, vae,
    device)`` returns ``(x0 latents, prompts)``, for ``batch_size`` indices drawn with the step's
    generator, so the data order is a function of the step (exact resume, no sampler state).

    With ``--dataloader_num_workers N > 0`` the images are loaded (decoded, resized, cropped) ahead of time
    in N worker processes (:class:`StepSource`).
    """

    def __init__(self, args: argparse.Namespace, *, need_images: bool) -> None:
        self.batch_size = args.train_batch_size
        self.cache_dir: str | None = getattr(args, "cache_dir", None)
        self._vae_tag = model_cache_tag(args, vae=True) if self.cache_dir is not None else ""
        self.num_workers: int = getattr(args, "dataloader_num_workers", 0)
        self.need_images = need_images
        self.images: ImageCaptionFolder | None = None
        self.prompts: list[str] | None = None
        check_data_sources(args, image_method=need_images)
        if args.train_data_dir:
            self.images = ImageCaptionFolder(args.train_data_dir, args.resolution)
        elif need_images:
            raise ValueError(
                "This method trains on images: pass --train_data_dir (images with .txt captions)."
            )
        if args.prompts_file:
            self.prompts = read_prompts(args.prompts_file)
        if self.images is None and self.prompts is None:
            raise ValueError(
                "Pass --prompts_file (one prompt a line) or --train_data_dir (image-caption folder)."
            )

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
        """``(indices, prompts)`` of one batch: image indices (or prompt indices without images)."""
        if self.images is not None:
            idx = torch.randint(len(self.images), (self.batch_size,), generator=generator).tolist()
            captions = [self.images.caption(i) for i in idx]
            if self.prompts is not None:  # prompt-only methods: a prompt list overrides the captions
                pidx = torch.randint(len(self.prompts), (self.batch_size,), generator=generator).tolist()
                captions = [self.prompts[i] for i in pidx]
            return idx, captions
        assert self.prompts is not None
        idx = torch.randint(len(self.prompts), (self.batch_size,), generator=generator).tolist()
        return idx, [self.prompts[i] for i in idx]

    def _latent_cache(self, index: int) -> Path:
        assert self.cache_dir is not None and self.images is not None
        path = self.images.files[index].resolve()
        stat = path.stat()  # an edited image (new size or modification time) is encoded again
        key = f"{self._vae_tag}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{self.images.resolution}"
        return _cache_file(self.cache_dir, "latents", key)

    def load(self, idx: Sequence[int]) -> list[torch.Tensor | None]:
        """The pixels the consumer needs: one ``(3, R, R)`` tensor per index, ``None`` where the VAE
        posterior is already cached (or where no pixels are used: prompt-only methods)."""
        if self.images is None or not self.need_images:
            return [None] * len(idx)
        return [
            None if self.cache_dir is not None and self._latent_cache(i).exists() else self.images[i][0]
            for i in idx
        ]

    def latents_batch(
        self, generator: torch.Generator, vae: Any, device: Any
    ) -> tuple[torch.Tensor, list[str]]:
        """``(x0 latents (B, 4, R/8, R/8) float32 on device, prompts)`` of an image batch.

        With ``--cache_dir`` the VAE posterior of each image is computed once and stored
        (``cache_dir/latents``), and every run (the first included) reads the stored values, so runs that
        share a cache see bitwise-equal latents; the posterior sample is drawn from ``generator`` either
        way. (Cached and uncached runs differ by float rounding: batched vs single-image VAE calls.)
        """
        from safetensors.torch import load_file

        if self.images is None:
            raise ValueError(
                "This method trains on images: pass --train_data_dir (images with .txt captions)."
            )
        idx, captions, pixels = self.fetch(generator)
        if self.cache_dir is None:
            mean, std = posterior(vae, torch.stack([p for p in pixels if p is not None]))
            return sample_posterior(vae, mean, std, generator).to(device, torch.float32), captions
        stats = []
        for i, px in zip(idx, pixels):
            path = self._latent_cache(i)
            if not path.exists():
                m, s = posterior(vae, (px if px is not None else self.images[i][0])[None])
                _save_atomic({"mean": m[0], "std": s[0]}, path)
            stats.append(load_file(str(path)))
        mean = torch.stack([d["mean"] for d in stats]).to(vae.device)
        std = torch.stack([d["std"] for d in stats]).to(vae.device)
        return sample_posterior(vae, mean, std, generator).to(device, torch.float32), captions

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor | None, list[str]]:
        """``(pixels (B, 3, R, R) or None, prompts)``; pixels only for image methods (``need_images``)."""
        _, captions, pixels = self.fetch(generator)
        if any(p is None for p in pixels):
            return None, captions
        return torch.stack([p for p in pixels if p is not None]), captions

    def prompts_batch(self, generator: torch.Generator) -> list[str]:
        """The prompts of the batch ``generator`` draws, without loading (decoding) its images."""
        return self.fetch(generator, load=False)[1]


class _PrefetchedSteps(torch.utils.data.Dataset):
    """Item ``k``: the indices and loaded items of micro-step ``k`` (step ``k // accumulation``) of one
    process."""

    def __init__(self, data: StepSource, seed: int, process_index: int, accumulation: int) -> None:
        self.data, self.seed, self.process_index, self.accumulation = data, seed, process_index, accumulation

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = divmod(k, self.accumulation)
        idx, _ = self.data.draw(step_generator(self.seed, step, self.process_index, micro))
        until = self.data.load_until_step
        return {"idx": idx, "items": self.data.load(idx) if until is None or step < until else None}


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's generators in a loader worker from its torch seed (set by the DataLoader)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the global state that third-party code in the worker uses


def step_generator(seed: int, step: int, process_index: int = 0, micro: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, step, process, micro-batch)``: the randomness of one micro-step.

    The seed is a 63-bit BLAKE2b hash of the four integers written out in full, so distinct tuples give
    distinct streams (a linear mix such as ``((seed * a + step) * b + process) * c + micro`` maps
    ``process + 1`` and ``micro + c`` to one seed); the hash has no per-interpreter salt, so every process
    and every run derives the same seed from the same tuple.
    """
    text = f"diffdistill.step_generator:{int(seed)}:{int(step)}:{int(process_index)}:{int(micro)}"
    digest = hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ------------------------------------------------------------------------------------------- accelerate
def make_accelerator(args: argparse.Namespace, project_name: str) -> Any:
    """``Accelerator`` with mixed precision, gradient accumulation and trackers from ``args``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    check_fsdp_version(accelerator)
    check_accumulation(accelerator, args)
    if distributed_kind(accelerator) == "DEEPSPEED":
        configure_deepspeed(accelerator, args)
    if report_to is not None:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or project_name, config=config)
    return accelerator


def check_accumulation(accelerator: Any, args: argparse.Namespace) -> None:
    """Refuse a gradient accumulation that differs from ``--gradient_accumulation_steps``.

    The scripts run ``--gradient_accumulation_steps`` micro-batches per optimisation step, and accelerate
    decides when gradients are synchronised (and, under DeepSpeed, when the engines step) from its own
    count, which an accelerate DeepSpeed config sets (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``, 1 unless
    changed) and a DeepSpeed config file may set too: a mismatch would step the optimisers at every
    micro-batch.
    """
    wanted = int(args.gradient_accumulation_steps)
    found = {
        "the accelerate config (ACCELERATE_GRADIENT_ACCUMULATION_STEPS)": accelerator.gradient_accumulation_steps
    }
    if distributed_kind(accelerator) == "DEEPSPEED":
        found["the DeepSpeed config"] = accelerator.state.deepspeed_plugin.get_value(
            "gradient_accumulation_steps"
        )
    for where, value in found.items():
        if value not in (None, "auto") and int(value) != wanted:
            raise ValueError(
                f"Expected the gradient accumulation of {where} to be --gradient_accumulation_steps = {wanted}, "
                f'but it is {value}: set gradient_accumulation_steps to {wanted} there (or to "auto" in a '
                f"DeepSpeed config file), or pass --gradient_accumulation_steps {value}."
            )


def check_fsdp_version(accelerator: Any) -> None:
    """Refuse FSDP1: the scripts' FSDP handling (:func:`diffdistill.students.frozen`, ``reshard``, EMAs of
    ``DTensor`` shards, one ``prepare`` per model) is written for and tested with FSDP2 (``fully_shard``)."""
    if distributed_kind(accelerator) == "FSDP" and not accelerator.is_fsdp2:
        raise ValueError(
            "These scripts support FSDP2 only, but the accelerate config selects FSDP1: set "
            "fsdp_version: 2 in the accelerate config, or launch with `accelerate launch --use_fsdp "
            "--fsdp_version 2 ...` (or use DDP or DeepSpeed)."
        )


def configure_deepspeed(accelerator: Any, args: argparse.Namespace) -> None:
    """Fit accelerate's DeepSpeed config to the scripts (called by :func:`make_accelerator`).

    - The ``"auto"`` (or absent) micro batch and clipping come from ``--train_batch_size`` and ``--max_grad_norm``
      (accelerate would read the batch from a prepared ``DataLoader``, which the scripts do not use -- they
      draw their batches themselves, :class:`StepSource` -- and clip at 1.0). Values the user's DeepSpeed
      config sets explicitly win (DeepSpeed applies them); a differing one is logged.
    - ZeRO-3 gathers the partitioned weights when the final model is written
      (``stage3_gather_16bit_weights_on_model_save``; without it ``get_state_dict`` refuses). The weights
      are written in the engine's parameter dtype: bf16 under ``--mixed_precision bf16``.
    - ``--use_ema`` is refused under ZeRO-3: the average is kept of the student's parameters in place, and
      ZeRO-3 leaves each process only a flat slice of them (use ZeRO-1/2 or FSDP for an EMA).
    """
    plugin = accelerator.state.deepspeed_plugin
    if zero_stage(accelerator) == 3:
        if args.use_ema:
            raise ValueError(
                "--use_ema is not supported under DeepSpeed ZeRO-3 (each process holds only a flat slice of "
                "the student's parameters): use ZeRO stage 1 or 2, or FSDP, in the accelerate config, or "
                "drop --use_ema."
            )
        plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    # accelerate derives train_batch_size (micro x accumulation x processes) from the micro batch.
    wanted = {
        "train_micro_batch_size_per_gpu": int(args.train_batch_size),
        "gradient_clipping": float(args.max_grad_norm or 0.0),
    }
    for key, value in wanted.items():
        if plugin.get_value(key) in (None, "auto"):  # absent: DeepSpeed's defaults are 1 and no clipping
            plugin.deepspeed_config[key] = value
        elif plugin.get_value(key) != value:
            logger.warning(
                "The DeepSpeed config sets %s = %s (used); the script's options give %s.",
                key,
                plugin.get_value(key),
                value,
            )


def adamw(
    params: Sequence[nn.Parameter] | Any,
    args: argparse.Namespace,
    lr: float | None = None,
    *,
    betas: tuple[float, float] | None = None,
    weight_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the shared options (``lr`` / ``betas`` / ``weight_decay``
    given here override ``--learning_rate``, ``--adam_beta1/2`` and ``--adam_weight_decay``)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("Expected trainable parameters, but every parameter has requires_grad=False.")
    return torch.optim.AdamW(
        trainable,
        lr=args.learning_rate if lr is None else lr,
        betas=(args.adam_beta1, args.adam_beta2) if betas is None else betas,
        weight_decay=args.adam_weight_decay if weight_decay is None else weight_decay,
    )


def prepare(accelerator: Any, *pairs: tuple[nn.Module, torch.optim.Optimizer]) -> list[Any]:
    """``accelerator.prepare`` each ``(model, optimiser)`` pair in its own call; returns them in order.

    accelerate's FSDP2 shards one model per ``prepare`` call (its optimiser must come with it); under DDP
    or a single process this is the same as one call with every object (same order of models and
    optimisers in the checkpoints).
    """
    if (
        len(pairs) > 1
        and accelerator.mixed_precision == "fp16"
        and accelerator.gradient_accumulation_steps > 1
        and distributed_kind(accelerator) != "DEEPSPEED"  # each DeepSpeed engine has its own loss scale
    ):
        raise ValueError(
            "fp16 with --gradient_accumulation_steps > 1 trains two networks on one loss scale: accelerate "
            "updates it at each optimiser step, so the second network's earlier micro-batches would be "
            "unscaled with a scale they were not scaled with. Use --mixed_precision bf16 (no loss scaling), "
            "or --gradient_accumulation_steps 1."
        )
    prepared: list[Any] = []
    for model, optimizer in pairs:
        prepared.extend(accelerator.prepare(model, optimizer))
    return prepared


def backward(accelerator: Any, loss: torch.Tensor, model: nn.Module) -> None:
    """``accelerator.backward(loss)`` for a loss that trains ``model`` (a prepared model).

    Under DeepSpeed each prepared model is its own engine, whose ``backward`` also steps its optimiser at
    the end of an accumulation cycle; ``accelerator.backward`` always uses the *first* prepared engine, so a
    second trained model (discriminator, fake score) would never step. Here the loss goes to ``model``'s own
    engine through accelerate's ``DeepSpeedEngineWrapper`` (the code path ``accelerator.backward`` runs for
    the first). Elsewhere this is ``accelerator.backward(loss)``.
    """
    if distributed_kind(accelerator) == "DEEPSPEED":
        from accelerate.utils import DeepSpeedEngineWrapper

        DeepSpeedEngineWrapper(model).backward(loss, sync_gradients=accelerator.sync_gradients)
    else:
        accelerator.backward(loss)


def forward_model(accelerator: Any, model: nn.Module) -> nn.Module:
    """What to call for a prepared ``model`` in a pass that must not train it: a frozen discriminator or fake
    score in the generator's update (inside :func:`diffdistill.students.frozen`).

    Under DeepSpeed the engine's own module: a call of the engine arms its end-of-backward gradient
    reduction, which the generator's backward then runs with none of the engine's gradients (ZeRO-2 fails
    in ``reduce_ipg_grads``). Elsewhere ``model`` itself.
    """
    return accelerator.unwrap_model(model) if distributed_kind(accelerator) == "DEEPSPEED" else model


def autocast(accelerator: Any) -> contextlib.AbstractContextManager[Any]:
    """``accelerator.autocast()``, also under DeepSpeed.

    accelerate leaves mixed precision to DeepSpeed there (its ``autocast`` does nothing), and DeepSpeed holds
    the engines' weights in bf16 / fp16 without casting their inputs: the scripts' float32 latents and
    embeddings would meet bf16 weights (a dtype error). The block then runs under ``torch.autocast`` in the
    mixed-precision dtype, as under DDP / FSDP.
    """
    if distributed_kind(accelerator) == "DEEPSPEED" and accelerator.mixed_precision in ("bf16", "fp16"):
        return torch.autocast(accelerator.device.type, dtype=weight_dtype_of(accelerator))
    return accelerator.autocast()


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the run (``None`` when it does not run DeepSpeed)."""
    if distributed_kind(accelerator) != "DEEPSPEED":
        return None
    return int(accelerator.state.deepspeed_plugin.get_value("zero_optimization.stage", 0))


def distributed_kind(accelerator: Any) -> str:
    """accelerate's distributed type by name: ``"NO"``, ``"MULTI_GPU"``, ``"FSDP"``, ``"DEEPSPEED"``, ..."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def is_sharded(accelerator: Any) -> bool:
    """Whether accelerate shards the prepared models' parameters (FSDP or DeepSpeed)."""
    return distributed_kind(accelerator) in ("FSDP", "DEEPSPEED")


def progress_bar(accelerator: Any, args: argparse.Namespace, initial: int) -> Any:
    """tqdm over optimisation steps, shown on the local main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=args.max_train_steps,
        initial=initial,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


CHECKPOINT_MARKER = "step.json"  # written last: a checkpoint-N folder without it is incomplete


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the ``checkpoint-N`` folder ``path`` holds its completion marker (``step.json``), written by
    :func:`save_checkpoint` only after every process finished ``save_state``."""
    return (Path(path) / CHECKPOINT_MARKER).is_file()


def save_checkpoint(accelerator: Any, args: argparse.Namespace, step: int) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-{step}``, keeping at most the total limit.

    The folder is marked complete (``step.json``, written atomically) once every process has saved, and only
    then are older checkpoints pruned: a save that fails (disk full, a killed job) leaves the previous
    checkpoints in place, and :func:`resume` skips the unmarked folder. Pruning keeps the newest
    ``--checkpoints_total_limit`` complete checkpoints (this one included) and removes incomplete folders
    older than this one (abandoned saves).
    """
    path = Path(args.output_dir) / f"checkpoint-{step}"
    marker = path / CHECKPOINT_MARKER
    if accelerator.is_main_process and marker.exists():
        marker.unlink()  # re-saving a step: the folder is incomplete until this save finishes
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's files are written before the folder is marked
    if accelerator.is_main_process:
        tmp = path / f"{CHECKPOINT_MARKER}.tmp"
        tmp.write_text(json.dumps({"global_step": step}))
        os.replace(tmp, marker)
        if args.checkpoints_total_limit is not None:
            _prune_checkpoints(args.output_dir, path, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return path


def _prune_checkpoints(output_dir: str | os.PathLike[str], newest: Path, limit: int) -> None:
    """Remove complete checkpoints beyond the newest ``limit`` (``newest`` included, never removed) and
    incomplete folders older than ``newest``."""
    found = checkpoint_dirs(output_dir)  # oldest first
    older = found[: found.index(newest)] if newest in found else found
    others = [p for p in found if p != newest]
    complete = [p for p in others if is_complete_checkpoint(p)]
    stale = complete[: max(0, len(complete) - limit + 1)]
    stale += [p for p in older if not is_complete_checkpoint(p)]
    for folder in stale:
        shutil.rmtree(folder)


def resume(accelerator: Any, args: argparse.Namespace) -> int:
    """Load ``--resume_from_checkpoint`` (``latest`` or a path) and return its step (0 without one).

    ``latest`` is the newest *complete* checkpoint (with ``step.json``); newer folders without the marker
    (a save that did not finish) are skipped with a warning.
    """
    if not args.resume_from_checkpoint:
        return 0
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(args.output_dir)
        complete = [p for p in found if is_complete_checkpoint(p)]
        newer = found[found.index(complete[-1]) + 1 :] if complete else found
        for skipped in newer:  # all incomplete: newer than the newest complete one
            logger.warning(
                "Skipping %s for --resume_from_checkpoint latest: it has no %s, so its save did not finish "
                "(delete the folder, or pass it as --resume_from_checkpoint to try it anyway).",
                skipped,
                CHECKPOINT_MARKER,
            )
        if not complete:
            return 0  # first launch of a job that always passes "latest" (or only unfinished saves)
        path = complete[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            path = Path(args.output_dir) / args.resume_from_checkpoint
    match = CHECKPOINT_RE.match(path.name)
    if not path.is_dir() or match is None:
        raise ValueError(
            f"Expected --resume_from_checkpoint to be 'latest' or a checkpoint-N folder, got {path}."
        )
    if not is_complete_checkpoint(path):
        logger.warning(
            "%s has no %s: its save may not have finished; loading it as asked.", path, CHECKPOINT_MARKER
        )
    accelerator.load_state(str(path))
    return int(match.group(1))


class TrainableParams(nn.Module):
    """The trainable parameters of ``model`` gathered in one module, without copies (shared tensors).

    Keys are the parameter names with ``/`` for ``.`` (``params.down_blocks/1/...``). An :class:`EMA` of
    this module averages exactly what the optimiser updates: the LoRA of a LoRA student, not its frozen base.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        named = [(n.replace(".", "/"), p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = nn.ParameterDict(dict(named))


class ReleaseEMA:
    """``--use_ema``: an EMA of the student's trainable parameters that becomes the released weights.

    The average is kept in float32 (it is written back in the student's dtype). ``warmup="linear"``
    (``--ema_warmup``, the default) caps the decay of update ``n`` at
    ``(1 + k) / (10 + k)``, ``k = n - 1``, as diffusers' ``EMAModel`` does (update 1 copies the weights), so the average of a
    short run is not mostly its start weights; the update count is checkpointed with the average.
    """

    def __init__(self, student: nn.Module, decay: float, warmup: str = "linear") -> None:
        from diffdistill.students import EMA

        self.student = student
        self.params = TrainableParams(student)
        # The average stays float32 also where the trained weights are bf16 / fp16 (DeepSpeed's mixed
        # precision): a bf16 average moved by (1 - 0.9999) x a 1 % gap rounds to no change.
        self.ema = EMA(self.params, decay=decay, warmup=warmup).float()

    def update(self) -> None:
        self.ema.update(self.params)

    def copy_to_model(self) -> None:
        """Write the averaged weights into the student's parameters (in place).

        An FSDP2 student is resharded first, so its next forward gathers the written shards."""
        reshard(self.student)
        self.ema.copy_to(self.params)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the student's parameters for the ``with`` body (e.g. validation samples),
        then the online weights back, bit for bit (the optimiser and the average see no change)."""
        online = [p.detach().clone() for p in self.params.parameters()]
        self.copy_to_model()
        try:
            yield
        finally:
            reshard(self.student)  # an FSDP2 root stays unsharded (averaged weights) after a no-grad forward
            with torch.no_grad():
                for p, saved in zip(self.params.parameters(), online):
                    p.copy_(saved)


class _StateSubset:
    """``state_dict`` / ``load_state_dict`` of a module without some entries (for accelerate checkpoints).

    Entries that are shards (``DTensor``, e.g. the EMA of an FSDP2 student) are saved as full tensors
    (gathered on every process: accelerate calls ``state_dict`` on all of them and writes on the main one)
    and loaded back into each process's shard, so the file is the same as without sharding.
    """

    def __init__(self, module: nn.Module, skip: set[str]) -> None:
        self.module, self.skip = module, skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in self.module.state_dict().items() if k not in self.skip}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        current = self.module.state_dict()
        state = {
            k: distribute_tensor(v.to(current[k].device), current[k].device_mesh, current[k].placements)
            if isinstance(current.get(k), DTensor)
            else v
            for k, v in state.items()
        }
        result = self.module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in self.skip]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Expected the checkpoint to hold the EMA entries {sorted(set(self.module.state_dict()) - self.skip)[:3]}..., "
                f"but {len(missing)} are missing (e.g. {missing[:2]}) and {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:2]}): resume with the options the checkpoint was written with."
            )


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard on the CPU (a collective: every process calls it; one
    gathered tensor on the device at a time), else ``value``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return value
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def register_ema(accelerator: Any, ema: nn.Module, online: nn.Module) -> None:
    """Checkpoint an :class:`EMA` of ``online`` without the copies of ``online``'s frozen parameters.

    The frozen base of a LoRA student never changes, so its average is the base itself: the checkpoint
    keeps the averaged trainable parameters, the buffers and the update count (register before
    :func:`resume`).
    """
    frozen = {
        f"module.{n}" for n, p in accelerator.unwrap_model(online).named_parameters() if not p.requires_grad
    }
    accelerator.register_for_checkpointing(_StateSubset(ema, frozen))


def register_lora_checkpointing(accelerator: Any, models: dict[str, nn.Module]) -> None:
    """Checkpoint LoRA models as their adapters only: ``checkpoint-N/{name}_lora.safetensors``.

    accelerate save/load pre-hooks (as in diffusers' LoRA training scripts): the save hook writes each
    model's adapter (:func:`diffdistill.students.save_lora`) and drops the model from the weights accelerate
    writes; the load hook reads the adapter back into the live model (same parameter objects, so the
    optimiser and an EMA keep tracking them) and drops the model from the ones accelerate loads. Other
    prepared models (discriminators) are saved by accelerate as usual. Not used with FSDP / DeepSpeed
    (:func:`setup_checkpoints`): there accelerate writes every model's shards itself.
    """
    from diffdistill.students import load_lora

    targets = {name: accelerator.unwrap_model(m) for name, m in models.items()}

    def ours(prepared: list[Any]) -> dict[int, str]:
        unwrapped = [accelerator.unwrap_model(m) for m in prepared]
        return {i: name for name, t in targets.items() for i, m in enumerate(unwrapped) if m is t}

    def save_hook(prepared: list[Any], weights: list[Any], output_dir: str) -> None:
        found = ours(prepared)
        if accelerator.is_main_process:
            for name in found.values():
                save_lora(targets[name], Path(output_dir) / f"{name}_lora.safetensors", prefix="")
        if len(weights) == len(prepared):
            for i in sorted(found, reverse=True):
                weights.pop(i)

    def load_hook(prepared: list[Any], input_dir: str) -> None:
        found = ours(prepared)
        for i in sorted(found, reverse=True):
            load_lora(targets[found[i]], Path(input_dir) / f"{found[i]}_lora.safetensors", prefix="")
            prepared.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def setup_checkpoints(
    accelerator: Any,
    args: argparse.Namespace,
    student: nn.Module,
    extra_lora: dict[str, nn.Module] | None = None,
) -> ReleaseEMA | None:
    """What the checkpoints hold beyond accelerate's defaults; call after ``prepare``, before :func:`resume`.

    With ``--use_lora`` the student (named ``unet``) and the ``extra_lora`` models are checkpointed as
    adapters (:func:`register_lora_checkpointing`), except under FSDP / DeepSpeed. With ``--use_ema`` returns the :class:`ReleaseEMA` of the
    student's trainable parameters, registered for checkpointing; pass it to :func:`train_loop` and
    :func:`save_unet`.
    """
    if args.use_lora and not is_sharded(accelerator):  # sharded: accelerate's own (whole-model) shards
        register_lora_checkpointing(accelerator, {"unet": student, **(extra_lora or {})})
    if not args.use_ema:
        return None
    ema = ReleaseEMA(accelerator.unwrap_model(student), args.ema_decay, args.ema_warmup)
    register_ema(accelerator, ema.ema, ema.params)
    return ema


def should_checkpoint(args: argparse.Namespace, step: int) -> bool:
    return step % args.checkpointing_steps == 0 and step < args.max_train_steps


def save_unet(
    accelerator: Any,
    unet: nn.Module,
    args: argparse.Namespace,
    subfolder: str = "unet",
    *,
    ema: ReleaseEMA | None = None,
    folder: str = "",
) -> Path:
    """Final weights: LoRA file (``pytorch_lora_weights.safetensors``) or a full ``save_pretrained`` UNet,
    under ``--output_dir`` (or its sub-folder ``folder``, e.g. for a stage's intermediate weights).

    With ``ema`` (``--use_ema``) the averaged weights are copied into ``unet`` first, so they are what is
    written (and what the model holds afterwards); mid-run, save inside ``ReleaseEMA.swapped_in()``
    instead, which puts the online weights back.

    Call on every process: the weights are ``accelerator.get_state_dict(unet)``, which gathers the shards
    of an FSDP model; the main process writes them (a full UNet as ``save_pretrained`` lays it out: config
    and ``diffusion_pytorch_model*.safetensors`` shards of at most 10 GB).
    """
    from huggingface_hub import save_torch_state_dict

    accelerator.wait_for_everyone()
    out = Path(args.output_dir) / folder
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to_model()
    state = accelerator.get_state_dict(unet)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.use_lora:
            save_lora(model, out / LORA_WEIGHT_NAME, state_dict=state)
            path = out / LORA_WEIGHT_NAME
        else:
            path = out / subfolder
            model.save_config(path)
            _fix_class_name(path / "config.json", model)
            save_torch_state_dict(
                state,
                path,
                filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                max_shard_size="10GB",
                metadata={"format": "pt"},
            )
    else:
        path = out / (LORA_WEIGHT_NAME if args.use_lora else subfolder)
    accelerator.wait_for_everyone()
    return path


def _fix_class_name(config_file: Path, model: nn.Module) -> None:
    """Write the model's own class in ``_class_name``: FSDP2 (``fully_shard``) swaps the instance's class for
    a generated ``FSDP<Name>`` subclass, which diffusers' ``save_config`` would record."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    if not isinstance(model, FSDPModule):
        return
    own = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = json.loads(config_file.read_text())
    config["_class_name"] = own.__name__
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def place_frozen(parts: SDXLComponents, device: Any, dtype: torch.dtype, *, vae: bool = True) -> None:
    """Freeze the VAE and text encoders and move them to ``device`` (the VAE stays float32 under fp16)."""
    freeze(*parts.frozen_modules())
    for m in (parts.text_encoder, parts.text_encoder_2):
        m.to(device, dtype=dtype)
    if vae:
        parts.vae.to(device, dtype=torch.float32 if dtype == torch.float16 else dtype)


def decode_pixels(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], ``(B, 3, H, W)`` float32, from scaled latents; differentiable in ``latents``."""
    scale, shift = latent_scale(vae)
    return vae.decode((latents / scale + shift).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], ``(B, 3, H, W)`` float32 on the CPU, from scaled latents."""
    return ((decode_pixels(vae, latents) + 1) / 2).cpu()


@torch.no_grad()
def log_validation(
    accelerator: Any, args: argparse.Namespace, parts: SDXLComponents, sample_fn: Any, step: int
) -> Path | None:
    """Sample ``--validation_prompts`` with ``sample_fn(noise, cond) -> latents``; save and log the grid.

    The main process samples -- every process when the model is sharded (FSDP: a forward pass needs all of
    them) -- with a fixed generator (the same noise at every validation), leaving the training randomness
    untouched; the main process writes the grid (one row) to ``OUTPUT_DIR/samples/step-{step}.png`` and to TensorBoard when it
    is a tracker.
    """
    if not args.validation_prompts or not (accelerator.is_main_process or is_sharded(accelerator)):
        return None
    from PIL import Image

    device = accelerator.device
    dtype = weight_dtype_of(accelerator)
    prompts = list(args.validation_prompts)
    cond = unet_conditions(parts, prompts, args.resolution, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(prompts), 4, args.resolution // 8, args.resolution // 8), generator=gen).to(
        device
    )
    with autocast(accelerator):
        latents = sample_fn(noise, cond).float()
    if not accelerator.is_main_process:
        return None
    if parts.vae.device != device:
        parts.vae.to(device)
    images = decode_latents(parts.vae, latents)
    grid = torch.cat(list(images), dim=2)  # one row
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step)
    return path


def train_loop(
    accelerator: Any,
    args: argparse.Namespace,
    global_step: int,
    train_step: Any,
    validate: Any = None,
    *,
    data: StepSource | None = None,
    ema: ReleaseEMA | None = None,
    after_step: Any = None,
) -> int:
    """Run ``train_step(generator, step) -> logs`` until ``--max_train_steps``; log, checkpoint, show progress.

    ``train_step`` is called ``gradient_accumulation_steps`` times per optimisation step (one micro-batch
    each; wrap its update in ``accelerator.accumulate``) with the generator of :func:`step_generator` and
    the 0-based index of the optimisation step it contributes to. ``validate(step)`` runs every
    ``--validation_steps`` and after the last step. ``data`` (a :class:`StepSource`) starts its prefetching
    workers at the resume step; ``ema`` (:func:`setup_checkpoints`) is updated after every optimisation
    step, and with it ``validate`` samples the averaged weights (swapped in, then back). ``after_step(step)``
    runs on every process after each optimisation step, before its checkpoint (e.g. to write a stage's
    weights: a run resumed from that checkpoint has them, and one resumed from an earlier checkpoint redoes
    the step and writes them again).
    Returns the final step count.
    """
    bar = progress_bar(accelerator, args, global_step)
    if data is not None:
        data.start(
            global_step,
            args.max_train_steps,
            seed=args.seed,
            process_index=accelerator.process_index,
            accumulation=args.gradient_accumulation_steps,
        )
    while global_step < args.max_train_steps:
        logs: dict[str, torch.Tensor] = {}
        for micro in range(args.gradient_accumulation_steps):
            gen = step_generator(args.seed, global_step, accelerator.process_index, micro)
            logs = train_step(gen, global_step) or {}
        if ema is not None:
            ema.update()
        global_step += 1
        bar.update(1)
        values = scalar_logs(logs)
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]})
        accelerator.log(values, step=global_step)
        if after_step is not None:  # before the checkpoint: a resume from it never skips what this writes
            after_step(global_step)
        if should_checkpoint(args, global_step):
            save_checkpoint(accelerator, args, global_step)
        if validate is not None and (
            global_step % args.validation_steps == 0 or global_step == args.max_train_steps
        ):
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                validate(global_step)  # with --use_ema: samples of the average, as released
    bar.close()
    if data is not None:
        data.close()
    return global_step


def scalar_logs(logs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Detached 0-d tensors to floats for the trackers (one sync per logged step)."""
    return {prefix + k: float(v) for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1}


def clip_and_step(accelerator: Any, optimizer: torch.optim.Optimizer, params: Any, max_norm: float) -> None:
    """Clip (when gradients are synchronised), step and zero an optimiser.

    Only ``optimizer``'s gradients are unscaled (fp16): ``accelerator.clip_grad_norm_`` unscales those of
    *every* prepared optimiser, so with two optimisers (generator and discriminator / fake score) and
    gradient accumulation the other one's accumulated gradients would be unscaled now and again at its own
    step. The clipping is torch's ``clip_grad_norm_`` -- under FSDP over the (``DTensor``) shards, the norm
    of the whole model's gradient (accelerate's own FSDP path identifies the model by comparing parameter
    lists, which fails when two prepared models have equally many parameters). Under DeepSpeed the
    engine has already clipped (at ``--max_grad_norm``, :func:`configure_deepspeed`) and stepped in
    :func:`backward`; its optimiser wrapper's ``step`` and ``zero_grad`` do nothing.
    """
    clip = accelerator.sync_gradients and max_norm and max_norm > 0 and math.isfinite(max_norm)
    if clip and distributed_kind(accelerator) != "DEEPSPEED":
        accelerator.unscale_gradients(optimizer=optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ score distillation
def add_fake_score_args(group: Any) -> None:
    """Options of the one-step generator, the online fake score and the generator / fake-score alternation."""
    group.add_argument(
        "--generator_timestep", type=int, default=999, help="timestep the one-step generator is called at"
    )
    group.add_argument("--fake_learning_rate", type=float, default=None, help="default: --learning_rate")
    group.add_argument(
        "--generator_every",
        type=int,
        default=1,
        help="fake updates per generator update (DMD2: 5; sdxl_sim.py takes its default from --preset)",
    )
    group.add_argument("--fake_steps", type=int, default=1, help="fake-score updates per step")
    group.add_argument(
        "--fake_weighting",
        choices=["epsilon", "v", "x0", "edm"],
        default="epsilon",
        help="space of the fake score's denoising loss",
    )


def one_step_x0(
    model: Any, schedule: Any, z: torch.Tensor, timestep: int, cond: dict[str, Any]
) -> torch.Tensor:
    """A one-step generator's sample: the clean latents ``model`` predicts from pure noise ``z`` fed at
    ``timestep`` (float32)."""
    t = torch.full((z.shape[0],), timestep, device=z.device, dtype=torch.long)
    return schedule.to_x0(model(z, t, **cond).sample.float(), z, t)


def one_step_validation(
    accelerator: Any, args: argparse.Namespace, parts: SDXLComponents, unet: nn.Module, schedule: Any
) -> Any:
    """``validate(step)`` for :func:`train_loop`: the grid of the one-step generator ``unet`` (prepared)
    called at ``--generator_timestep``."""

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        sample = lambda z, c: one_step_x0(model, schedule, z, args.generator_timestep, c)  # noqa: E731
        log_validation(accelerator, args, parts, sample, step)

    return validate


class ScoreDistillation:
    """Alternating updates of a one-step generator and its online fake score (SIM, SiD, DMD).

    ``loss(x, z, generator, cond) -> (loss, logs)`` is the generator's objective on its samples
    ``x = one_step_x0(generator_model, z)`` at ``--generator_timestep`` (``generator`` and ``fake`` are
    ``(prepared model, optimiser)``; e.g. :func:`diffdistill.losses.dmd_loss` against the real and
    fake scores); the fake score is fitted to the detached samples by
    :func:`diffdistill.losses.fake_score_loss`, or by ``fake_loss(x, generator, cond) -> (loss, logs)`` when
    given (e.g. SiD-LSG's guided fake score on its own timestep range, ``sdxl_sim.py``).
    :class:`diffdistill.losses.AlternatingUpdate` alternates the two (``--generator_every``, ``--fake_steps``)
    with the fake network frozen in the generator step. The phase is a function of the step index, so a
    resumed run needs no extra state.
    """

    def __init__(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        schedule: Any,
        *,
        generator: tuple[nn.Module, torch.optim.Optimizer],
        fake: tuple[nn.Module, torch.optim.Optimizer],
        loss: Any,
        fake_loss: Any = None,
    ) -> None:
        from diffdistill.losses import AlternatingUpdate

        self.accelerator, self.args, self.schedule = accelerator, args, schedule
        (self.generator, self.opt_g), (self.fake, self.opt_f) = generator, fake
        self.generator_loss, self.fake_loss = loss, fake_loss
        self.latent_shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
        self.loop = AlternatingUpdate(
            self._generator_step,
            self._fake_step,
            generator_every=args.generator_every,
            fake_steps=args.fake_steps,
            freeze_during_generator=[self.fake],
        )
        self._state: dict[str, Any] = {}

    def generate(
        self, model: Any, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, z)``: one-step samples of ``model`` and the noise ``z`` drawn from ``gen``."""
        z = torch.randn(self.latent_shape, generator=gen).to(self.accelerator.device)
        return one_step_x0(model, self.schedule, z, self.args.generator_timestep, cond), z

    def step(self, step: int, gen: torch.Generator, cond: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The updates of optimisation step ``step`` (0-based, counted from the first score-distillation step)
        for one micro-batch."""
        self._state = {"gen": gen, "cond": cond, "x": None}
        # The update phase follows the optimisation step, so every micro-batch of a step runs the same
        # updates (with gradient accumulation) and a resumed run keeps the phase without extra state.
        self.loop.step_count = step
        with self.accelerator.accumulate(self.generator, self.fake), autocast(self.accelerator):
            return self.loop.step()

    def _generator_step(self) -> dict[str, torch.Tensor]:
        gen, cond = self._state["gen"], self._state["cond"]
        x, z = self.generate(self.generator, gen, cond)
        loss, logs = self.generator_loss(x, z, gen, cond)
        backward(self.accelerator, loss, self.generator)
        clip_and_step(self.accelerator, self.opt_g, self.generator.parameters(), self.args.max_grad_norm)
        self._state["x"] = x.detach()
        return logs

    def _fake_step(self) -> dict[str, torch.Tensor]:
        from diffdistill.losses import fake_score_loss

        gen, cond = self._state["gen"], self._state["cond"]
        x = self._state["x"]
        if x is None:  # the generator step was skipped this time (generator_every > 1)
            with torch.no_grad():
                x, _ = self.generate(self.generator, gen, cond)
        if self.fake_loss is not None:
            loss, logs = self.fake_loss(x, gen, cond)
        else:
            loss, logs = fake_score_loss(
                self.fake,
                x,
                schedule=self.schedule,
                weighting=self.args.fake_weighting,
                cond=cond,
                generator=gen,
            )
        backward(self.accelerator, loss, self.fake)
        clip_and_step(self.accelerator, self.opt_f, self.fake.parameters(), self.args.max_grad_norm)
        return logs


# ------------------------------------------------------------------------------------------- tiny model
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_clip_tokenizer(folder: str | os.PathLike[str], max_length: int = 16) -> Any:
    """A character-level ``CLIPTokenizer`` built offline: byte alphabet (+ ``</w>`` forms), no merges."""
    from transformers import CLIPTokenizer

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {
        c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(
        str(root / "vocab.json"),
        str(root / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


TINY_SDXL_3LEVEL_UNET: dict[str, Any] = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 2,
    "attention_head_dim": (2, 2, 2),
    "transformer_layers_per_block": (1, 2, 4),
    "norm_num_groups": 8,
}
"""Overrides of :func:`~diffdistill.discriminators.tiny_sdxl_unet_config` that keep SDXL's full layout --
3 levels, 2 layers per block (3 per up block), deeper transformers at the lower levels (1, 2, 4 for SDXL's
1, 2, 10) -- at 1.1 M parameters: what the ``ssd-1b`` block-removal preset needs (its per-layer up-block
depths list 3 layers per level), unlike the default 2-level, 1-layer tiny UNet."""


def save_tiny_sdxl_pipeline(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_length: int = 16,
    unet_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny SDXL-structured pipeline (random weights, no download) to ``folder`` and return it.

    UNet: :func:`diffdistill.discriminators.tiny_sdxl_unet_config` with ``unet_overrides`` (e.g.
    :data:`TINY_SDXL_3LEVEL_UNET`; cross-attention 32 = 16 + 16, pooled text 32); VAE: 4 levels of 8 channels (factor 8, 4 latent channels); text encoders: 2-layer CLIP with
    hidden size 16 (the second with a 32-dim projection); tokenizers: :func:`tiny_clip_tokenizer`. Saved
    with ``StableDiffusionXLPipeline.save_pretrained``, so it loads like the real SDXL folder.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffdistill.discriminators import tiny_sdxl_unet

    root = Path(folder)
    tokenizer = tiny_clip_tokenizer(root / "_tokenizer_src", max_length)
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_cfg = {
            "vocab_size": vocab,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": max_length,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        }
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg, projection_dim=32))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=128,
            scaling_factor=0.13025,
        )
    unet = tiny_sdxl_unet(seed=seed + 1, **(unet_overrides or {}))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "_tokenizer_src")
    return root
