"""Procedural coloured-shapes dataset: 16×16 RGB images of one of four shapes, class = shape.

Everything is generated from a ``torch.Generator`` seed, so the dataset needs no download and every
run sees the same images. Images are in ``[-1, 1]``, shape ``(B, 3, 16, 16)``.
"""

from __future__ import annotations

import torch

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SIZE", "sample_shapes"]

#: Class names, in label order.
CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
NUM_CLASSES = len(CLASS_NAMES)
#: Image side in pixels.
SIZE = 16


def sample_shapes(
    n: int, generator: torch.Generator, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, 16, 16)`` in ``[-1, 1]`` and their labels ``(n,)``.

    A bright saturated shape (random colour, centre and size) on a dark, slightly tinted background.

    Example:
        >>> x, y = sample_shapes(8, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), int(y.max()) < NUM_CLASSES, float(x.min()) >= -1.0
        ((8, 3, 16, 16), True, True)
    """
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    c = (torch.arange(SIZE, dtype=torch.float32) + 0.5).view(1, 1, SIZE)
    cx = torch.empty(n, 1, 1).uniform_(6.0, 10.0, generator=generator)
    cy = torch.empty(n, 1, 1).uniform_(6.0, 10.0, generator=generator)
    r = torch.empty(n, 1, 1).uniform_(3.5, 5.5, generator=generator)
    dx, dy = c - cx, c.transpose(1, 2) - cy
    disc = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    triangle = (dy <= 0.8 * r) & (dy >= -r + 2.0 * dx.abs())
    cross = ((dx.abs() <= 0.3 * r) | (dy.abs() <= 0.3 * r)) & (dx.abs() <= r) & (dy.abs() <= r)
    masks = torch.stack([disc, square, triangle, cross], dim=1)  # (n, K, H, W)
    mask = masks[torch.arange(n), labels].unsqueeze(1).float()
    hue = torch.rand(n, 1, generator=generator)
    phase = torch.tensor([0.0, 1.0 / 3.0, 2.0 / 3.0])
    colour = (0.5 + 0.5 * torch.cos(2 * torch.pi * (hue + phase))).clamp(0.0, 1.0) * 0.8 + 0.2
    background = torch.rand(n, 3, generator=generator) * 0.25
    img = mask * colour.view(n, 3, 1, 1) + (1 - mask) * background.view(n, 3, 1, 1)
    return (img * 2 - 1).clamp(-1.0, 1.0), labels
