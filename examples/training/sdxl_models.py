"""Loading the SDXL components, building the student and the frozen teacher, placing frozen parts."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


def to_frozen_dtype(module: nn.Module, device: Any, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)`` for a frozen base, but the parameters diffusers keeps in float32
    (``_keep_in_fp32_modules``: Wan's rope, time embedder, modulation tables and norms) stay float32, as
    ``from_pretrained(torch_dtype=dtype)`` and the pipelines load them; a no-op difference for models without
    such a list (UNets, SD3, FLUX, Qwen-Image). The lists of submodules count too (Wan 2.2 A14B's two experts in
    one module). Returns ``module``."""
    module.to(device, dtype=dtype)
    for _, sub in module.named_modules():
        keep = getattr(type(sub), "_keep_in_fp32_modules", None) or ()
        for name, p in sub.named_parameters() if keep else ():
            if p.dtype != torch.float32 and any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    return module


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


def place_frozen(parts: SDXLComponents, device: Any, dtype: torch.dtype, *, vae: bool = True) -> None:
    """Freeze the VAE and text encoders and move them to ``device`` (the VAE stays float32 under fp16)."""
    freeze(*parts.frozen_modules())
    for m in (parts.text_encoder, parts.text_encoder_2):
        m.to(device, dtype=dtype)
    if vae:
        parts.vae.to(device, dtype=torch.float32 if dtype == torch.float16 else dtype)


def load_unet(path: str, args: argparse.Namespace | None = None) -> Any:
    """A ``UNet2DConditionModel`` from a UNet folder (``config.json`` at its root, as ``save_unet`` writes it), a
    run's ``--output_dir`` or a pipeline folder (its ``unet/``), or a hub id (its ``unet/``, at ``--revision`` /
    ``--variant`` when ``args`` is given)."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    local = Path(path)
    rev, var = (args.revision, args.variant) if args is not None else (None, None)
    with zero3_init_disabled():
        if not local.is_dir():
            return UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var)
        if (local / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(path)
        if (local / "unet" / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    raise ValueError(
        f"Expected {path} to be a UNet folder (config.json at its root), a run's output folder or a pipeline "
        "folder (with unet/config.json), but it holds neither config.json nor unet/config.json."
    )
