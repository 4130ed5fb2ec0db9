"""Memory and time of R1 on a UNet discriminator: exact (double backward) vs APT's approximation.

One update of Diffusion2GAN's :class:`~diffdistill.discriminators.MultiScaleConditionalDiscriminator` (a
trainable copy of the whole UNet): the non-saturating loss on ``--batch`` real and fake latents, backward,
Adam step -- alone (``no R1``, the reference), with the single-sample lazy R1 penalty of its lazy step
(``exact``: :func:`~diffdistill.losses.lazy_r1_penalty` differentiates the input gradient, on PyTorch's
math attention, then backward), and with the finite-difference R1 of Lin et al. 2025 (``approximate``:
``approximate_sigma``, two plain forwards of the sample, one backward of the sum). Time: fastest of
``--reps`` updates after one warm-up; memory: peak extra memory of the first timed update above what is
allocated before it (weights and Adam states; gradients are freed after each step, ``set_to_none``, as in
the training scripts, so each update allocates them again), from :mod:`peak_memory` (CUDA allocator, or the
CPU's sampled resident set). Ratios are to ``no R1`` in the
same run.

CPU (the tiny 3-level SDXL-structured UNet, float32)::

    python benchmarks/r1.py --latent_size 64 --batch 2 --reps 3

GPU (the real SDXL UNet with random weights, 128x128 latents, bf16 autocast, gradient checkpointing)::

    python benchmarks/r1.py --sdxl --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peak_memory import measure, track_cpu_memory_exactly
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdistill.discriminators import (
    MultiScaleConditionalDiscriminator,
    sdxl_conditions,
    sdxl_unet_config,
    tiny_sdxl_unet_config,
)
from diffdistill.losses import gan_discriminator_loss, lazy_r1_penalty

MODES = ("no R1", "exact", "approximate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sdxl", action="store_true", help="real SDXL UNet config, 128x128 latents, bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--latent_size", type=int, default=None, help="default 128 with --sdxl, else 32")
    p.add_argument("--batch", type=int, default=2, help="real and fake latents per D update (default 2)")
    p.add_argument("--sigma", type=float, default=0.1, help="perturbation of the approximate R1")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.latent_size = args.latent_size or (128 if args.sdxl else 32)
    args.dtype = torch.bfloat16 if args.sdxl else torch.float32
    if args.batch < 1 or args.reps < 1 or not args.sigma > 0:
        p.error(
            f"--batch and --reps must be >= 1 and --sigma > 0, got {args.batch}, {args.reps}, {args.sigma}"
        )
    return args


def _autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(args.device.type, dtype=args.dtype, enabled=args.dtype != torch.float32)


@dataclass
class Setup:
    """Diffusion2GAN's discriminator on ``args.device`` and one batch for it (what both R1 benchmarks use)."""

    disc: MultiScaleConditionalDiscriminator
    real: torch.Tensor
    fake: torch.Tensor
    cond: dict[str, Any]  # the keyword arguments of :meth:`call` besides the latents
    generator: torch.Generator  # CPU, seeded; for draws that follow the batch

    def call(
        self, x: torch.Tensor, ehs: torch.Tensor, added: dict, noise: torch.Tensor
    ) -> list[torch.Tensor]:
        """The discriminator's logits (one tensor per head) at t = 0, as the script's lazy R1 calls it."""
        return self.disc(x, 0, ehs, added, noise=noise)


def discriminator_setup(args: argparse.Namespace) -> Setup:
    """The multi-scale D on a seeded UNet (SDXL or tiny config) and seeded real, fake, noise and conditions."""
    from diffusers import UNet2DConditionModel

    cfg = sdxl_unet_config() if args.sdxl else tiny_sdxl_unet_config()
    with torch.random.fork_rng(devices=[]), args.device:  # UNet and heads from seed 0: reproducible figures
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg)
        widths = unet.config.block_out_channels
        groups = 32 if all(c % 32 == 0 for c in widths) else 8
        disc = MultiScaleConditionalDiscriminator(
            unet, gradient_checkpointing=not args.no_gradient_checkpointing, norm_groups=groups
        )
    del unet
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, args.latent_size, args.latent_size)
    real, fake, noise = (torch.randn(shape, generator=gen).to(args.device) for _ in range(3))
    ehs, added = sdxl_conditions(
        disc.extractor.trunk, args.batch, seq_len=77 if args.sdxl else 8, generator=gen, device=args.device
    )
    return Setup(disc, real, fake, {"ehs": ehs, "added": added, "noise": noise}, gen)


def discriminator_update(args: argparse.Namespace) -> Callable[[str], None]:
    """Build the discriminator on ``args.device``; return ``update(mode)``, one D step with that R1."""
    setup = discriminator_setup(args)
    opt = torch.optim.Adam([p for p in setup.disc.parameters() if p.requires_grad], lr=1e-6)
    call, real, fake, cond, gen = setup.call, setup.real, setup.fake, setup.cond, setup.generator

    def update(mode: str) -> None:
        with _autocast(args):
            d_loss, _ = gan_discriminator_loss(call(real, **cond), call(fake, **cond))
            if mode == "approximate":
                r1, _ = lazy_r1_penalty(
                    call, real, step=0, cond=cond, generator=gen, approximate_sigma=args.sigma
                )
                d_loss = d_loss + r1
        d_loss.backward()
        if mode == "exact":
            with sdpa_kernel(SDPBackend.MATH), _autocast(args):  # as examples/sdxl_diffusion2gan.py
                r1, _ = lazy_r1_penalty(call, real, step=0, cond=cond, generator=gen)
                r1.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def rows(args: argparse.Namespace) -> Iterator[tuple[str, float, float, float]]:
    """``(mode, fastest wall s, fastest CPU s, peak extra MiB)`` per mode, printed as they come."""
    update = discriminator_update(args)
    for mode in args.modes:
        wall, cpu, peak = measure(lambda mode=mode: update(mode), args.device, args.reps, warmup=1)
        print(f"# {mode}: {wall:.3f} s wall, {cpu:.3f} s CPU, {peak:.0f} MiB", file=sys.stderr, flush=True)
        yield mode, wall, cpu, peak


def main(args: argparse.Namespace) -> str:
    if args.device.type == "cpu":
        track_cpu_memory_exactly()
    measured = list(rows(args))
    base = next((r for r in measured if r[0] == "no R1"), None)
    on_cpu = args.device.type == "cpu"
    where = "CPU" if on_cpu else torch.cuda.get_device_name(args.device)
    lines = [
        f"{'SDXL UNet (random weights)' if args.sdxl else 'tiny SDXL-structured UNet'}, latents "
        f"{args.batch}x4x{args.latent_size}x{args.latent_size}, {str(args.dtype).removeprefix('torch.')}, "
        f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, {where}, torch "
        f"{torch.__version__}; R1 on 1 sample, approximate sigma {args.sigma}; time ratio of "
        f"{'CPU' if on_cpu else 'wall'} time",
        "",
        "| D update | wall (s) | CPU (s) | peak extra memory (MiB) | time / no R1 | memory / no R1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, wall, cpu, peak in measured:
        t = (cpu / base[2] if on_cpu else wall / base[1]) if base else float("nan")
        m = peak / base[3] if base and base[3] > 0 else float("nan")
        lines.append(f"| {mode} | {wall:.3f} | {cpu:.3f} | {peak:.0f} | {t:.2f} | {m:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(parse_args()))
