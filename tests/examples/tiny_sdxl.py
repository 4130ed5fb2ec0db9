"""Fixtures of the example tests: a tiny SDXL-structured pipeline (random weights, offline tokenizers) written to
disk, captioned images, and deterministic GPU kernels for the runs they compare."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    scheduler = EulerDiscreteScheduler(  # SDXL-base's scheduler_config.json values
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",  # EulerDiscreteScheduler's default is "linspace"; SDXL-base's is "leading"
        interpolation_type="linear",
        use_karras_sigmas=False,
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
    # SDXL-base's scheduler_config.json also carries DDIM / DDPM keys: no x0 clipping (DDIMScheduler() and
    # DDPMScheduler() default to clip_sample=True, which the scripts' DDPM / DDIM schedulers built from this
    # config would inherit; audit 11 / 13)
    config_file = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(clip_sample=False, thresholding=False)
    config_file.write_text(json.dumps(config, indent=2))
    return root


def write_captioned_images(
    folder: Path,
    captions: Sequence[str],
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write one random RGB image per caption into ``folder`` (``{i}.png``: 136 x 144, or ``sizes[i]`` as (height,
    width)), each with its caption in ``{i}.txt`` (none for an empty caption); returns ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(captions):
        h, w = sizes[i] if sizes is not None else (136, 144)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if caption:
            (folder / f"{i}.txt").write_text(caption)
    return folder


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic kernels while a script runs on a GPU; nothing changes on the CPU.

    The resume tests compare two runs' weights. On CUDA, cuDNN's default convolution weight-gradient
    algorithms sum with atomics in no fixed order, and Adam's first steps turn such last-bit gradient
    differences into differences of the learning rate's size. Measured on an H200 (2026-11-27): without this,
    10 resume tests failed at rtol 1e-5; with it only Diffusion2GAN's (grid_sample's backward has no
    deterministic CUDA kernel: compared on CPU only).
    """
    if not torch.cuda.is_available():
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
