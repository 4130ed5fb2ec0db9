"""Fixtures of the flow-model example tests: tiny SD3- and FLUX-structured diffusers pipelines written to disk offline
(random weights, tokenizers built in memory), so the ``examples/flow_*.py`` scripts load them like the real folders.

Both pipelines share one layout: a 16-channel ``AutoencoderKL`` (4 levels of 8 channels, factor 8) with the
family's latent normalisation in its config (SD3: shift 0.0609, scale 1.5305; FLUX: shift 0.1159, scale 0.3611),
2-layer CLIP text encoders of width 16 (:func:`tests.examples.tiny_sdxl.tiny_clip_tokenizer`), a 2-layer
``T5EncoderModel`` with a character-level T5 tokenizer (:func:`tiny_t5_tokenizer`), the tiny transformers of
:mod:`tests.transformer_configs` sized for those encoders, and ``FlowMatchEulerDiscreteScheduler`` with the
family's config (SD3: static shift 3; FLUX: ``use_dynamic_shifting`` with FLUX.1's base / max shift).
Images of 64 px give 8x8 latents: a 4x4 patch grid (16 image tokens).
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path
from typing import Any

import torch

from tests.examples.tiny_sdxl import tiny_clip_tokenizer
from tests.transformer_configs import (
    tiny_flux_transformer_config,
    tiny_sd3_transformer_config,
    tiny_wan_transformer_config,
)

CLIP_WIDTH = 16  # hidden size of each tiny CLIP encoder
CLIP_LENGTH = 16  # CLIP tokenizer length
T5_LENGTH = 8  # default --max_sequence_length of the tests
IMAGE_SIZE = 64  # pixels: 8x8 latents
NUM_FRAMES = 5  # video frames of the Wan tests: (5 - 1) / 4 + 1 = 2 latent frames


def tiny_t5_tokenizer(max_length: int = T5_LENGTH) -> Any:
    """A character-level T5 tokenizer built in memory (a ``tokenizers`` Unigram model, no sentencepiece download):
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the word-start piece and the printable ASCII characters, no extra ids."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _tiny_t5(vocab: int, d_model: int, *, umt5: bool = False) -> Any:
    """A 2-layer T5 encoder (``umt5``: Wan's ``UMT5EncoderModel``) of width ``d_model``, random weights."""
    import transformers

    kind = "UMT5" if umt5 else "T5"
    config, model = getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}EncoderModel")
    return model(
        config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _clip_config(vocab: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=CLIP_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        **extra,
    )


def _tiny_vae(shift: float, scale: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scale,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def save_tiny_sd3_pipeline(folder: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusion3Pipeline`` folder (random weights, no download) to ``folder`` and return it.

    Text: two CLIP encoders with projection (hidden 16, projection 16; pooled 16 + 16 = 32) and T5 of width 32
    (CLIP's 16 + 16 hidden states are zero-padded to it, as the pipeline does); transformer: the tiny SD3 config
    with 16 latent channels, ``joint_attention_dim`` 32, ``pooled_projection_dim`` 32; scheduler: shift 3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    root = Path(folder)
    clip_tok = tiny_clip_tokenizer(root / "_tokenizer_src", CLIP_LENGTH)
    t5_tok = tiny_t5_tokenizer()
    vocab = len(clip_tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc1 = CLIPTextModelWithProjection(_clip_config(vocab, projection_dim=16))
        enc2 = CLIPTextModelWithProjection(_clip_config(vocab, projection_dim=16))
        t5 = _tiny_t5(len(t5_tok), 2 * CLIP_WIDTH)
        vae = _tiny_vae(0.0609, 1.5305)
        transformer = SD3Transformer2DModel(
            **tiny_sd3_transformer_config(
                in_channels=16, out_channels=16, joint_attention_dim=32, pooled_projection_dim=32
            )
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=enc1,
        tokenizer=clip_tok,
        text_encoder_2=enc2,
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "_tokenizer_src")
    return root


def save_tiny_flux_pipeline(
    folder: str | os.PathLike[str], *, seed: int = 0, guidance_embeds: bool = True
) -> Path:
    """Write a tiny ``FluxPipeline`` folder (random weights, no download) to ``folder`` and return it.

    Text: CLIP (pooled output, hidden 16) and T5 of width 16; transformer: the tiny FLUX config with 64 packed
    input channels (16 latent channels x 2x2), guidance embedding as FLUX.1-dev (``guidance_embeds=False``:
    FLUX.1-schnell's layout); scheduler: ``use_dynamic_shifting`` with base / max shift 0.5 / 1.15 over
    256 / 4096 tokens (FLUX.1-dev's ``scheduler_config.json``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    root = Path(folder)
    clip_tok = tiny_clip_tokenizer(root / "_tokenizer_src", CLIP_LENGTH)
    t5_tok = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(_clip_config(len(clip_tok)))
        t5 = _tiny_t5(len(t5_tok), CLIP_WIDTH)
        vae = _tiny_vae(0.1159, 0.3611)
        transformer = FluxTransformer2DModel(
            **tiny_flux_transformer_config(in_channels=64, guidance_embeds=guidance_embeds)
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "_tokenizer_src")
    return root


def save_tiny_wan_pipeline(folder: str | os.PathLike[str], *, seed: int = 0, variant: str = "wan") -> Path:
    """Write a tiny Wan text-to-video ``WanPipeline`` folder (random weights, no download) to ``folder``.

    ``variant`` ``"wan"`` (Wan 2.1): text: a 2-layer ``UMT5EncoderModel`` of width 16 with the character-level T5
    tokenizer; VAE: ``AutoencoderKLWan`` (base width 8, one residual block a level, 16 latent channels, spatial factor
    8, temporal factor 4 as Wan's: 5 frames of 64 px -> latents (16, 2, 8, 8)) with Wan's per-channel
    ``latents_mean`` / ``latents_std`` (the constructor's defaults); transformer: the tiny Wan config with 16 latent
    channels and text width 16; scheduler: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=3.0)`` as Wan2.1-T2V ships it.

    ``"ti2v"`` (Wan 2.2 TI2V-5B's layout): Wan 2.2's VAE structure (``is_residual``, 2x2 patchified 12-channel
    input, spatial factor 16: 5 frames of 64 px -> latents (8, 2, 4, 4)) with 8 latent channels and random
    per-channel statistics, ``expand_timesteps=True`` and ``flow_shift`` 5.0 (TI2V-5B's). ``"a14b"`` (Wan 2.2
    A14B's): a second transformer ``transformer_2`` (the low-noise expert, other weights) and ``boundary_ratio``
    0.875 (the T2V A14B's).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    if variant not in ("wan", "ti2v", "a14b"):
        raise ValueError(f"Expected variant 'wan', 'ti2v' or 'a14b', but got {variant!r}.")
    root = Path(folder)
    tok = tiny_t5_tokenizer()
    channels = 8 if variant == "ti2v" else 16
    extra: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        umt5 = _tiny_t5(len(tok), CLIP_WIDTH, umt5=True)
        if variant == "ti2v":
            stats = torch.rand(2, channels, generator=torch.Generator().manual_seed(seed + 1))
            vae = AutoencoderKLWan(
                base_dim=8,
                z_dim=channels,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
                latents_mean=(stats[0] - 0.5).tolist(),
                latents_std=(stats[1] + 0.5).tolist(),
            )
        else:
            vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        config = tiny_wan_transformer_config(in_channels=channels, out_channels=channels, text_dim=CLIP_WIDTH)
        transformer = WanTransformer3DModel(**config)
        if variant == "a14b":
            extra = {"transformer_2": WanTransformer3DModel(**config), "boundary_ratio": 0.875}
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0 if variant == "ti2v" else 3.0
    )
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=umt5,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        expand_timesteps=variant == "ti2v",
        **extra,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def quiet_pipeline(cls: Any, folder: str | os.PathLike[str]) -> Any:
    """``cls.from_pretrained(folder)`` (a saved tiny pipeline) with its progress bar off."""
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline(folder: str | os.PathLike[str]) -> Any:
    """The tiny ``WanPipeline`` saved in ``folder`` (:func:`save_tiny_wan_pipeline`), progress bar off."""
    from diffusers import WanPipeline

    return quiet_pipeline(WanPipeline, folder)


def wan_frames(pipe: Any, latents: torch.Tensor, steps: int, output: str = "latent", **kwargs: Any) -> Any:
    """``pipe``'s (a ``WanPipeline``) frames of a :data:`NUM_FRAMES` x :data:`IMAGE_SIZE` ^2 video from ``latents``
    in ``steps`` steps, unguided unless ``kwargs`` give ``guidance_scale``; ``kwargs`` also hold the prompt
    (``prompt=`` or ``prompt_embeds=``) and may override the size (``width=``)."""
    defaults = {"guidance_scale": 1.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_frames": NUM_FRAMES}
    with torch.no_grad():
        return pipe(
            **{**defaults, **kwargs},
            num_inference_steps=steps,
            latents=latents.clone(),
            max_sequence_length=T5_LENGTH,
            output_type=output,
        ).frames


def read_lora(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA ``.safetensors`` file a script wrote."""
    from safetensors.torch import load_file

    return load_file(str(path))


def use_sigmas(pipe: Any, folder: str | os.PathLike[str], sigmas: list[float]) -> None:
    """Give ``pipe`` (a pipeline that takes no ``sigmas``, e.g. ``WanPipeline``) the scheduler a script saved in
    ``folder/scheduler`` with the scripts' documented ``set_timesteps`` override to ``sigmas``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas, device=device)


def write_tiny_flow_models(
    root: str | os.PathLike[str],
    *,
    prompts: str | None = "a photo of a cat\n\nan astronaut riding a horse\n",
    captions: list[str] | None = None,
    schnell: bool = False,
) -> dict[str, Path]:
    """What the flow script tests train on, written under ``root``: ``{"sd3": ..., "flux": ...}`` pipeline folders
    (:func:`save_tiny_sd3_pipeline`, :func:`save_tiny_flux_pipeline`: FLUX.1-dev's layout), ``"schnell"`` (a FLUX
    without the guidance embedding) with ``schnell``, ``"prompts"`` (a prompts file, a blank line included) unless
    ``prompts`` is None, and ``"images"`` (captioned images, ``""`` = no caption) when ``captions`` is given."""
    from tests.examples.tiny_sdxl import write_captioned_images

    base = Path(root)
    out = {"sd3": save_tiny_sd3_pipeline(base / "sd3"), "flux": save_tiny_flux_pipeline(base / "flux")}
    if schnell:
        out["schnell"] = save_tiny_flux_pipeline(base / "schnell", guidance_embeds=False)
    if prompts is not None:
        out["prompts"] = base / "prompts.txt"
        out["prompts"].write_text(prompts)
    if captions is not None:
        out["images"] = write_captioned_images(base / "images", captions)
    return out


def smoke_argv(
    tiny: dict[str, Path],
    family: str,
    out: Path,
    *extra: str,
    data: str | None = "prompts",
    learning_rate: str = "1e-3",
) -> list[str]:
    """The options every ``examples/flow_*.py`` smoke run shares: the tiny ``family`` pipeline of
    :func:`write_tiny_flow_models`, its prompts (``data="prompts"``), image-caption folder (``"images"``) or neither (``None``),
    2 steps of batch 2 at :data:`IMAGE_SIZE` with a checkpoint after each, seed 3, no tracker; then ``extra``."""
    flag = {"prompts": "--prompts_file", "images": "--train_data_dir", None: None}[data]
    source = [] if flag is None else [flag, str(tiny[data])]
    return [
        *("--pretrained_model_name_or_path", str(tiny[family]), *source),
        *("--output_dir", str(out), "--resolution", str(IMAGE_SIZE), "--max_sequence_length", str(T5_LENGTH)),
        *("--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1"),
        *("--learning_rate", learning_rate, "--report_to", "none", "--seed", "3"),
        *extra,
    ]


def write_captioned_videos(
    folder: str | os.PathLike[str],
    captions: list[str],
    frames: int = NUM_FRAMES,
    size: tuple[int, int] = (72, 80),
    *,
    seed: int = 0,
) -> Path:
    """Write a video-caption folder (``training.caption_folders.VideoCaptionFolder``'s format): per caption ``i`` a clip
    folder ``clip{i}/`` of ``frames`` random RGB frames ``000.png, 001.png, ...`` of ``size`` (height, width), with
    its caption in ``clip{i}.txt`` beside it (none for an empty caption); returns ``folder``."""
    import numpy as np
    from PIL import Image

    root = Path(folder)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(captions):
        clip = root / f"clip{i}"
        clip.mkdir(parents=True, exist_ok=True)
        for j in range(frames):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(clip / f"{j:03d}.png")
        if caption:
            (root / f"clip{i}.txt").write_text(caption)
    return root
