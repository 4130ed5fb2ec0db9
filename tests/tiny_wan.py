"""The tiny Wan 2.1 transformer's test inputs and a hand-run of its blocks (tests of the Wan backbone tools).

``tests.transformer_configs.tiny_wan_transformer`` is the model; these are its video latents, timesteps and text,
and the reference every block-output test compares with.
"""

from __future__ import annotations

import torch
from torch import nn

from diffdistill.discriminators import ladd_renoise_sigma

# Latents (B, 4, 3, 8, 8), patch (1, 2, 2): grid (3, 4, 4), 48 tokens of width 24.
FRAMES, HEIGHT, WIDTH = 3, 8, 8
GRID = (FRAMES, HEIGHT // 2, WIDTH // 2)


def wan_batch(batch: int = 2, seed: int = 0, frames: int = FRAMES) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Seeded ``(latents, timestep = 1000 sigma (Wan's), {"encoder_hidden_states": (B, 5, 16)})``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, HEIGHT, WIDTH, generator=g)
    sigma = ladd_renoise_sigma(batch, generator=g)
    return (
        x,
        1000 * sigma,
        {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=g)},
    )  # Wan: sigma * 1000


def hand_run(
    model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
) -> list[torch.Tensor]:
    """Every block's output tokens, running Wan's forward by hand (patchify, rope, conditions, the block loop)."""
    with torch.no_grad():
        rotary = model.rope(x)
        tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)
        _, proj, text_emb, _ = model.condition_embedder(timestep, text, None)
        proj = proj.unflatten(1, (6, -1))
        out = []
        for block in model.blocks:
            tokens = block(tokens, text_emb, proj, rotary)
            out.append(tokens)
    return out
