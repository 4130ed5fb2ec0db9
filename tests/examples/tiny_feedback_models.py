"""Tiny feedback models for the Hyper-SD feedback smoke tests, importable as ``module:callable``.

``sdxl_hyper_sd.py --reward_model tests.examples.tiny_feedback_models:tiny_aesthetic`` (and
``...:tiny_image_reward``, ``--perceptual_model ...:tiny_perceptual``) load these by name, as a user's
aesthetic predictor, ImageReward model and instance-segmentation loss would be loaded. Each records its
calls in :data:`CALLS` so a test can check what the script fed it.
"""

from __future__ import annotations

import torch
from torch import nn

#: One entry per call: ``{"model": name, "shape": ..., "grad": ..., "range": ..., "prompts": ...}``.
CALLS: list[dict[str, object]] = []


def _record(model: str, images: torch.Tensor, prompts: list[str], **extra: object) -> None:
    CALLS.append(
        {
            "model": model,
            "shape": tuple(images.shape),
            "grad": images.requires_grad,
            "range": (float(images.detach().min()), float(images.detach().max())),
            "prompts": list(prompts),
            **extra,
        }
    )


class TinyAesthetic(nn.Module):
    """An aesthetic-predictor stand-in (the LAION predictor scores the image alone): a conv, a global
    average pool and a linear head, ``(B, 3, H, W)`` in [-1, 1] -> ``(B,)`` scores; the prompts are ignored.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _record("aesthetic", images, prompts, frozen=not any(p.requires_grad for p in self.parameters()))
        features = torch.relu(self.conv(images)).mean(dim=(2, 3))
        return 10.0 * self.head(features).squeeze(1)


tiny_aesthetic = TinyAesthetic()
"""The instance ``--reward_model ...:tiny_aesthetic`` names (an ``nn.Module``: the script freezes it)."""


def tiny_image_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """An ImageReward stand-in (a prompt-conditioned score): brighter images score higher, and more so for
    longer prompts; ``(B,)``."""
    _record("image_reward", images, prompts)
    length = torch.tensor([len(p) + 1.0 for p in prompts], dtype=images.dtype, device=images.device)
    return images.mean(dim=(1, 2, 3)) * length


def tiny_perceptual(images: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """An instance-segmentation feedback stand-in (Hyper-SD Eq. 14): the per-sample squared distance between
    8x8 average-pooled ``images`` and ``reference`` (the dataset images), ``(B,)``; lower is better."""
    _record(
        "perceptual",
        images,
        prompts,
        reference_shape=tuple(reference.shape),
        reference_grad=reference.requires_grad,
    )
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, 8)
    target = torch.nn.functional.adaptive_avg_pool2d(reference, 8)
    return (pooled - target).square().mean(dim=(1, 2, 3))
