"""SDXL prompt encoding (two CLIP encoders, pooled embeddings, time ids, on-disk cache) and VAE latents."""

# The VAE helpers also serve the flow scripts: an ``AutoencoderKL`` normalises with its scalar
# ``(z - shift_factor) * scaling_factor`` (SDXL, SD3, FLUX); the Wan-family VAEs (``AutoencoderKLWan``,
# ``AutoencoderKLQwenImage``: 5-D ``(B, C, F, H, W)``) with their per-channel ``(z - latents_mean) / latents_std``,
# and an image is their one-frame video (as ``QwenImagePipeline`` encodes and decodes).

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import sdxl_models


@torch.no_grad()
def encode_prompts(
    components: sdxl_models.SDXLComponents, prompts: Sequence[str], device: torch.device | str
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
    batch: int, resolution: int | tuple[int, int], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per sample, for square
    ``resolution`` px images or ``(height, width)``: original = target size, no crop (the pipeline's defaults; the
    target size of an aspect bucket is SDXL's bucket conditioning, Podell et al. 2023 Sec. 2.3)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    row = torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=device)
    return row.repeat(batch, 1)


def cache_file(cache_dir: str | os.PathLike[str], kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{hashlib.sha1(key.encode('utf-8')).hexdigest()}.safetensors"


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent processes never read a partial file


def encode_prompts_cached(
    components: sdxl_models.SDXLComponents,
    prompts: Sequence[str],
    device: torch.device | str,
    cache_dir: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_prompts` with one safetensors file per prompt under ``cache_dir/text`` (if given)."""
    if cache_dir is None:
        return encode_prompts(components, prompts, device)
    from safetensors.torch import load_file

    def file(prompt: str) -> Path:
        return cache_file(cache_dir, "text", f"{components.cache_tag}|{prompt}")

    files = [file(p) for p in prompts]
    missing = sorted({p for p, f in zip(prompts, files) if not f.exists()})
    if missing:
        ehs, pooled = encode_prompts(components, missing, device)
        for i, p in enumerate(missing):
            save_atomic({"ehs": ehs[i], "pooled": pooled[i]}, file(p))
    loaded = [load_file(str(f)) for f in files]
    return (
        torch.stack([d["ehs"] for d in loaded]).to(device),
        torch.stack([d["pooled"] for d in loaded]).to(device),
    )


def unet_conditions(
    components: sdxl_models.SDXLComponents,
    prompts: Sequence[str],
    resolution: int | tuple[int, int],
    device: torch.device | str,
    dtype: torch.dtype,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """UNet keyword arguments ``{"encoder_hidden_states", "added_cond_kwargs"}`` for ``prompts`` of ``resolution``
    (square px, or ``(height, width)``: :func:`sdxl_time_ids`)."""
    ehs, pooled = encode_prompts_cached(components, prompts, device, cache_dir)
    added = {
        "text_embeds": pooled.to(dtype),
        "time_ids": sdxl_time_ids(len(prompts), resolution, device, dtype),
    }
    return {"encoder_hidden_states": ehs.to(dtype), "added_cond_kwargs": added}


def uncond_conditions(
    args: argparse.Namespace,
    components: sdxl_models.SDXLComponents,
    device: torch.device | str,
    dtype: torch.dtype,
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
    """``(scaling_factor, shift_factor)`` of an ``AutoencoderKL``."""
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


def per_channel(vae: Any) -> bool:
    """Whether ``vae`` is a Wan-family VAE (5-D latents, per-channel ``latents_mean`` / ``latents_std``)."""
    return getattr(vae.config, "latents_mean", None) is not None and hasattr(vae.config, "z_dim")


def normalisation(vae: Any, like: torch.Tensor) -> tuple[Any, Any]:
    """``(scale, shift)`` with normalised latents ``(z - shift) * scale``, broadcastable to latents like ``like``:
    :func:`latent_scale`'s numbers, or a Wan-family VAE's ``(1 / latents_std, latents_mean)`` per channel (dim 1)."""
    if not per_channel(vae):
        return latent_scale(vae)
    view = (1, -1, *(1,) * (like.ndim - 2))
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(view)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(view)
    return 1.0 / std, mean


@torch.no_grad()
def posterior(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior of pixel images in [-1, 1] (float32); a Wan-family VAE encodes each
    image as a one-frame video and the frame axis is dropped."""
    x = pixels.to(vae.device, vae.dtype)
    image = per_channel(vae) and x.ndim == 4
    dist = vae.encode(x.unsqueeze(2) if image else x).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    return (mean.squeeze(2), std.squeeze(2)) if image else (mean, std)


def sample_posterior(
    vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latents ``(mean + std * eps - shift) * scale`` (:func:`normalisation`) with ``eps`` drawn from
    ``generator``."""
    scale, shift = normalisation(vae, mean)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
    return (mean + std * noise.to(mean) - shift) * scale


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of pixel images in [-1, 1] (a sample of the posterior drawn with ``generator``)."""
    return sample_posterior(vae, *posterior(vae, pixels), generator)


@torch.no_grad()
def encode_videos(vae: Any, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised latents ``(B, C, f, h, w)`` of videos ``(B, 3, F, H, W)`` in [-1, 1] through a Wan-family VAE
    (``AutoencoderKLWan``): a posterior sample ``z`` drawn with ``generator`` (as :func:`encode_images`), per channel
    ``(z - latents_mean) / latents_std``, ``WanPipeline``'s convention (the inverse of its decode and of
    :func:`decode_latents`). ``F = 4k + 1`` frames give ``f = k + 1`` latent frames (Wan 2.1 / 2.2 VAEs).

    Raises:
        ValueError: ``videos`` not ``(B, 3, F, H, W)``, or ``vae`` without per-channel ``latents_mean`` /
            ``latents_std`` (an image VAE).
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(
            f"Expected videos of shape (B, 3, F, H, W) in [-1, 1], but got {tuple(videos.shape)}: stack clips "
            "(3, F, H, W) on a new batch axis."
        )
    if not per_channel(vae):
        raise ValueError(
            f"Expected a Wan-family video VAE (per-channel latents_mean / latents_std), but got {type(vae).__name__}: "
            "encode images with encode_images."
        )
    return sample_posterior(vae, *posterior(vae, videos), generator)


def decode_pixels(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], ``(B, 3, H, W)`` float32, from scaled latents (:func:`normalisation`); videos
    ``(B, 3, F, H, W)`` from a Wan VAE's 5-D latents; differentiable in ``latents``."""
    scale, shift = normalisation(vae, latents)
    z = (latents / scale + shift).to(vae.device, vae.dtype)
    image = per_channel(vae) and z.ndim == 4  # a one-frame video for a Wan-family VAE
    pixels = vae.decode(z.unsqueeze(2) if image else z).sample
    return (pixels[:, :, 0] if image else pixels).float().clamp(-1, 1)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], ``(B, 3, H, W)`` (videos ``(B, 3, F, H, W)``) float32 on the CPU, from scaled latents."""
    return ((decode_pixels(vae, latents) + 1) / 2).cpu()
