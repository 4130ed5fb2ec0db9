"""Validation images written to tensorboard / disk during training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runtime, sdxl_encoding, sdxl_models


@torch.no_grad()
def log_validation(
    accelerator: Any, args: argparse.Namespace, parts: sdxl_models.SDXLComponents, sample_fn: Any, step: int
) -> Path | None:
    """Sample ``--validation_prompts`` with ``sample_fn(noise, cond) -> latents``; save and log the grid.

    The main process samples -- every process when the model is sharded (FSDP: a forward pass needs all of
    them) -- with a fixed generator (the same noise at every validation), leaving the training randomness
    untouched; the main process writes the grid (one row) to ``OUTPUT_DIR/samples/step-{step}.png`` and to TensorBoard when it
    is a tracker.
    """
    if not args.validation_prompts or not (accelerator.is_main_process or runtime.is_sharded(accelerator)):
        return None
    from PIL import Image

    device = accelerator.device
    dtype = runtime.weight_dtype_of(accelerator)
    prompts = list(args.validation_prompts)
    cond = sdxl_encoding.unet_conditions(parts, prompts, args.resolution, device, dtype)
    noise, _ = validation_noise(args)
    noise = noise.to(device)
    with runtime.autocast(accelerator):
        latents = sample_fn(noise, cond).float()
    if not accelerator.is_main_process:
        return None
    if parts.vae.device != device:
        parts.vae.to(device)
    images = sdxl_encoding.decode_latents(parts.vae, latents)
    grid = torch.cat(list(images), dim=2)  # one row
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step)
    return path


def validation_noise(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise of :func:`log_validation` (``(len(--validation_prompts), 4, R/8, R/8)`` from a generator
    seeded with ``--seed``) and that generator after it: a sampler that re-noises (TLCM's x0-then-re-noise) draws
    from it, as a pipeline called with one generator continues its stream (``LCMScheduler.step(generator=...)``), so
    the re-noising is neither the initial noise again nor another stream than ``evaluate.py``'s."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (len(args.validation_prompts or ()), 4, args.resolution // 8, args.resolution // 8)
    return torch.randn(shape, generator=gen), gen


GENERATOR_INPUTS = ("noise", "noised")
"""What a one-step generator is fed at its timestep (``--generator_input``, :func:`one_step_input`)."""


def one_step_input(
    schedule: Any, z: torch.Tensor, timestep: int, generator_input: str = "noise"
) -> torch.Tensor:
    """The state a one-step generator is fed at ``timestep`` for the noise ``z``.

    ``"noise"``: ``z`` itself (DMD / DMD2, Hyper-SD, Diffusion2GAN: pure noise, whatever the timestep).
    ``"noised"``: a zero image noised to ``timestep``, ``sigma_t z`` (``schedule.add_noise(0, z, t)``; VP:
    ``sqrt(1 - alphabar_t) z``) -- SiD-LSG's ``init_timestep`` 625 input on Stable Diffusion
    (``add_noise(0, z, 625)``) and SIM's / SiD's ``sigma_init z`` at EDM sigma 2.5, the same state (EDM sigma 2.5
    is timestep 625 of SD / SDXL's schedule). Zhou et al., ICML 2024 (arXiv:2404.04057); Luo et al., NeurIPS 2024
    (arXiv:2410.16794).

    Raises:
        ValueError: if ``generator_input`` is neither.
    """
    if generator_input == "noise":
        return z
    if generator_input != "noised":
        raise ValueError(
            f"Expected generator_input in {GENERATOR_INPUTS}, but got {generator_input!r}: 'noise' feeds z, "
            "'noised' the zero image noised to the generator's timestep (SiD / SIM)."
        )
    return schedule.add_noise(torch.zeros_like(z), z, timestep)


def generator_input_of(args: argparse.Namespace) -> str:
    """A run's ``--generator_input``; ``"noise"`` for a script without the option (``sdxl_diffusion2gan.py``: its
    generator is fed the teacher pair's noise)."""
    return str(getattr(args, "generator_input", "noise"))


def one_step_x0(
    model: Any,
    schedule: Any,
    z: torch.Tensor,
    timestep: int,
    cond: dict[str, Any],
    generator_input: str = "noise",
) -> torch.Tensor:
    """A one-step generator's sample: the clean latents ``model`` predicts in one call at ``timestep`` from the
    noise ``z``, fed as ``generator_input`` says (:func:`one_step_input`; float32)."""
    x = one_step_input(schedule, z, timestep, generator_input)
    t = torch.full((z.shape[0],), timestep, device=z.device, dtype=torch.long)
    return schedule.to_x0(model(x, t, **cond).sample.float(), x, t)


def one_step_validation(
    accelerator: Any,
    args: argparse.Namespace,
    parts: sdxl_models.SDXLComponents,
    unet: nn.Module,
    schedule: Any,
) -> Any:
    """``validate(step)`` for :func:`train_loop`: the grid of the one-step generator ``unet`` (prepared)
    called at ``--generator_timestep`` on ``--generator_input``."""

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        sample = lambda z, c: one_step_x0(  # noqa: E731
            model, schedule, z, args.generator_timestep, c, generator_input_of(args)
        )
        log_validation(accelerator, args, parts, sample, step)

    return validate
