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


NON_SQUARE = ((48, 80), (80, 48), (48, 83), (83, 48), (37, 52))
"""(H, W) test sizes: wide and tall, odd sides, and 48 x 83 / 83 x 48, whose centre crop after a 32 px shorter-side
resize has an odd margin of 23 (transformers' floor offset 11, torchvision's rounded offset 12)."""


def uint8_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Float images on the uint8 grid (``k / 255``, as read from a PNG): rounding to uint8 is then exact in any
    precision, so a derivation cannot differ from the library by a float32-vs-float64 tie at ``k + 0.5``."""
    levels = torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def shorter_side_crop_pixels(images: torch.Tensor, size: int, *, offsets: str) -> torch.Tensor:
    """CLIP's "resize the shorter side, centre crop" written out from the original packages' rules.

    The uint8 image (PNG rounding) is resized by PIL (bicubic) so that its shorter side is ``size`` and its longer
    side ``int(size * long / short)`` (truncated; torchvision's ``Resize(int)`` and transformers'
    ``get_resize_output_image_size`` both), then cropped to ``size x size`` at offsets ``(d) // 2``
    (``offsets="floor"``: transformers' ``center_crop``) or ``int(round(d / 2))`` (``"round"``: torchvision's
    ``CenterCrop``, OpenAI CLIP / open_clip), scaled by 1/255 and normalised with OpenAI CLIP's mean / std.
    """
    from PIL import Image

    out = []
    for pil in pil_images(images):
        w, h = pil.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        arr = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC)).astype(np.float64)
        dy, dx = new_h - size, new_w - size
        top, left = (dy // 2, dx // 2) if offsets == "floor" else (round(dy / 2), round(dx / 2))
        arr = arr[top : top + size, left : left + size] / 255.0
        arr = (arr - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float())
    return torch.stack(out)


def hps_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's pad-to-square transform written out (``hpsv2/src/open_clip/transform.py``, ``ResizeMaxSize``):
    uint8 / 255, the longer side to ``size`` (``round`` of each side times ``size / long``; bicubic, antialiased,
    on the float tensor, unclamped), black padding centred with the odd pixel after, then normalisation."""
    out = []
    for x in images:
        x = torch.from_numpy(np.rint(x.numpy().astype(np.float64) * 255)).float() / 255
        h, w = x.shape[-2:]
        new_h, new_w = round(h * size / max(h, w)), round(w * size / max(h, w))
        x = torch.nn.functional.interpolate(
            x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )[0]
        canvas = torch.zeros(3, size, size)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas[:, top : top + new_h, left : left + new_w] = x
        mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
        out.append((canvas - mean) / std)
    return torch.stack(out)
