"""Validation grids of SD3 / FLUX / Wan students: few-step samples decoded, written to disk and TensorBoard."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from . import flow_encoding, flow_models, runtime


@torch.no_grad()
def log_validation(
    accelerator: Any,
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    sample_fn: Any,
    step: int,
) -> Path | None:
    """Sample ``--validation_prompts`` with ``sample_fn(noise, cond) -> latents``; save and log the grid.

    As :func:`training.validation.log_validation` for the flow latents: the noise has the VAE's 16 channels at
    ``--resolution / 8`` by ``--width / 8`` (Wan: and ``--num_frames``' latent frames), drawn from a generator seeded with ``--seed``
    (the same at every validation); the main process samples (every process when the model is sharded), decodes
    with the family's latent normalisation and writes ``OUTPUT_DIR/samples/step-{step}.png`` (images: one row;
    videos: a row of up to 8 evenly spaced frames per prompt, and each video as ``step-{step}-{i}.gif`` at Wan
    2.1's 16 fps as closely as a GIF's whole-centisecond frame times allow: 60 ms, 16.7 fps) and the TensorBoard images (videos: their middle frames).
    """
    if not args.validation_prompts or not (accelerator.is_main_process or runtime.is_sharded(accelerator)):
        return None
    from PIL import Image

    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    prompts = list(args.validation_prompts)
    cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    frames, width = getattr(args, "num_frames", None), getattr(args, "width", None)
    shape = flow_models.latent_shape(parts, len(prompts), args.resolution, frames, width)
    noise = torch.randn(shape, generator=gen)
    with runtime.autocast(accelerator):
        latents = sample_fn(noise.to(device), cond).float()
    if not accelerator.is_main_process:
        return None
    images = flow_models.decode_latents(parts.vae, latents)
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:  # videos (B, 3, F, H, W)
        for i, video in enumerate(images):
            write_gif(video, path.with_name(f"step-{step}-{i}.gif"))
        picked = torch.linspace(0, images.shape[2] - 1, min(8, images.shape[2])).round().long()
        grid = torch.cat([torch.cat(list(v[:, picked].unbind(1)), dim=2) for v in images], dim=1)
        images = images[:, :, images.shape[2] // 2]
    else:
        grid = torch.cat(list(images), dim=2)
    Image.fromarray(to_uint8(grid)).save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step)
    return path


def to_uint8(image: torch.Tensor) -> Any:
    """An ``(3, H, W)`` image in [0, 1] as an ``(H, W, 3)`` uint8 array (rounded)."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")


def write_gif(video: torch.Tensor, path: Path, fps: int = 16) -> None:
    """Write a ``(3, F, H, W)`` video in [0, 1] as a looping animated GIF (Pillow; ``fps`` frames a second, to the
    centisecond a GIF frame time holds)."""
    from PIL import Image

    frames = [Image.fromarray(to_uint8(frame)) for frame in video.unbind(1)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


def few_step_validation(
    accelerator: Any,
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    transformer: Any,
    sigmas: list[float],
) -> Any:
    """``validate(step)`` for :func:`training.loop.train_loop`: the grid of the student ``transformer``
    (prepared) sampled with :func:`training.flow_models.euler_sample` on ``sigmas``."""

    def validate(step: int) -> None:
        denoiser = flow_models.FlowDenoiser(
            accelerator.unwrap_model(transformer), parts.family, args.guidance
        )
        log_validation(
            accelerator,
            args,
            parts,
            lambda z, c: flow_models.euler_sample(denoiser, z, sigmas, c),
            step,
        )

    return validate
