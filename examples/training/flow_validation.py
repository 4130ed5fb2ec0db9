"""Validation grids of SD3 / FLUX students: few-step samples decoded, written to disk and TensorBoard."""

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
    """Sample ``--validation_prompts`` with ``sample_fn(noise, cond) -> latents (B, C, h, w)``; save and log the grid.

    As :func:`training.validation.log_validation` for the flow latents: the noise has the VAE's 16 channels at
    ``--resolution / 8``, drawn from a generator seeded with ``--seed`` (the same at every validation); the
    main process samples (every process when the model is sharded), decodes with the family's latent
    normalisation and writes ``OUTPUT_DIR/samples/step-{step}.png`` (one row) and the TensorBoard images.
    """
    if not args.validation_prompts or not (accelerator.is_main_process or runtime.is_sharded(accelerator)):
        return None
    from PIL import Image

    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    prompts = list(args.validation_prompts)
    cond = flow_encoding.conditions(parts, prompts, args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(flow_models.latent_shape(parts, len(prompts), args.resolution), generator=gen)
    with runtime.autocast(accelerator):
        latents = sample_fn(noise.to(device), cond).float()
    if not accelerator.is_main_process:
        return None
    images = flow_models.decode_latents(parts.vae, latents)
    grid = torch.cat(list(images), dim=2)
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step)
    return path


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
