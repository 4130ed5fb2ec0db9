"""FLUX / Qwen-Image latent packing: 2x2 patches as tokens, and FLUX's image position ids."""

from __future__ import annotations

from typing import Any

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing ``(B, C, h, w) -> (B, h/2 * w/2, 4C)`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for ``height x width`` latents."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's ``img_ids`` ``(h/2 * w/2, 3)``: ``(0, row, col)`` of each packed patch, row-major."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)
