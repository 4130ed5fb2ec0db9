"""Tiny random-weight CLIP backbones for the metric tests (no downloads): a transformers ``CLIPModel`` with a
character-level ``CLIPTokenizer`` and a 32 px ``CLIPImageProcessor``, and an open_clip model registered from a
config written here."""

from __future__ import annotations

import json
import math
import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

OPEN_CLIP_NAME = "diffdistill-tiny-test-clip"


def tokenizer() -> Any:
    """A CLIP BPE tokenizer over single characters (no merges): every prompt is tokenised letter by letter."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def transformers_clip(seed: int = 0, logit_scale: float = math.log(100.0)) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)``: vision 32 px / patch 8, text width 32, projection 16."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tok)


def register_open_clip() -> str:
    """Register a tiny open_clip config (ViT: 32 px, patch 8, width 32; text: 1 layer) and return its name."""
    import open_clip

    if OPEN_CLIP_NAME not in open_clip.list_models():
        cfg = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
        path = Path(tempfile.mkdtemp()) / f"{OPEN_CLIP_NAME}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return OPEN_CLIP_NAME


def pil_images(images: torch.Tensor) -> list[Any]:
    """Float (N, 3, H, W) in [0, 1] -> PIL, rounded as a PNG stores it (written independently of the library)."""
    from PIL import Image

    arr = np.rint(images.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def embedding(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output
