"""Stand-ins for the evaluation metrics' networks in the tests of ``examples/evaluate.py`` (no downloads):
factories ``examples/evaluate.py`` calls through ``--fid_features tests.examples.tiny_metrics:tiny_features`` and
``--clip tests.examples.tiny_metrics:tiny_clip_score``.

Each factory builds its random-weight network from a fixed seed, so every process of a multi-process run (and
every run) gets the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FEATURES = 8  # FID feature dimension of the stand-in


class TinyFeatures(nn.Module):
    """A random 2-layer conv net with global average pooling: float images ``[0, 1]`` (N, 3, H, W) of any size ->
    (N, 8) features (the shape contract of clean-fid's Inception, 2048 -> 8)."""

    num_features = FEATURES

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.Tanh(),
                nn.Conv2d(8, FEATURES, 3, stride=2, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() * 2 - 1)


def tiny_features() -> TinyFeatures:
    """The FID feature extractor of the tests (``--fid_features tests.examples.tiny_metrics:tiny_features``)."""
    return TinyFeatures()


def tiny_clip_model(seed: int = 0) -> Any:
    """A random ``transformers.CLIPModel`` (vision: 32 px, patch 8; text: 2 layers of width 16; projection 8)
    with the character-level tokenizer of :func:`tests.examples.tiny_sdxl.tiny_clip_tokenizer`'s vocabulary size."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config={
                "vocab_size": 514,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 32,
                "bos_token_id": 512,
                "eos_token_id": 513,
                "pad_token_id": 513,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=8,
        )
        return CLIPModel(config).eval()


def tiny_clip_score() -> Any:
    """``CLIPScore.from_transformers`` on :func:`tiny_clip_model` with a ``CLIPProcessor`` built offline (the
    character-level tokenizer, a 32 px image processor): ``--clip tests.examples.tiny_metrics:tiny_clip_score``."""
    import tempfile

    from transformers import CLIPImageProcessor, CLIPProcessor

    from diffdistill.metrics.clip_score import CLIPScore
    from tests.examples.tiny_sdxl import tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_clip_tokenizer(folder, max_length=32)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return CLIPScore.from_transformers(tiny_clip_model(), processor)
