"""Preference scores: the formulas (PickScore, HPSv2.1, LAION aesthetic MLP) against raw model calls on tiny
stand-in models whose weights the tests write; ImageReward through a stand-in of its package's public API."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from diffdistill.errors import DTypeError, MissingDependencyError
from diffdistill.metrics import AestheticMLP, AestheticScore, HPSv21Score, ImageRewardScore, PickScore
from tests.metrics import tiny_clip

PROMPTS = ["a red cat", "two dogs!", "a cup of tea"]


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 36, 40, generator=torch.Generator().manual_seed(seed))


def test_pickscore_is_logit_scale_times_cosine() -> None:
    """The model card's calc_probs before the softmax: logit_scale.exp() * (text_embs @ image_embs.T)."""
    model, processor = tiny_clip.transformers_clip(logit_scale=math.log(100.0))
    images = _images()
    pixels = processor(images=tiny_clip.pil_images(images), return_tensors="pt")["pixel_values"]
    tokens = processor(text=PROMPTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        img = tiny_clip.embedding(model.get_image_features(pixel_values=pixels))
        txt = tiny_clip.embedding(model.get_text_features(**tokens))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        want = (model.logit_scale.exp() * (txt @ img.T)).diagonal().double()
    metric = PickScore.from_pretrained(model, processor)
    assert metric.scale == pytest.approx(100.0, rel=1e-6)
    torch.testing.assert_close(metric.scores(images, PROMPTS), want, rtol=1e-5, atol=1e-4)
    metric.update(images, PROMPTS)
    assert metric.compute() == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-4)
    assert metric.protocol()["metric"] == "pickscore"


def test_hpsv21_loads_the_checkpoint_state_dict_and_scores_the_cosine(tmp_path: Path) -> None:
    import open_clip

    name = tiny_clip.register_open_clip()
    torch.manual_seed(3)
    source, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    metric = HPSv21Score.from_pretrained(tmp_path / "HPS_v2.1_compressed.pt", model_name=name)
    tokenizer = open_clip.get_tokenizer(name)
    images = _images(1)
    with torch.no_grad():
        out = source.eval()(
            torch.stack([transform(p) for p in tiny_clip.pil_images(images)]), tokenizer(PROMPTS)
        )
        # hpsv2's img_score: image_features @ text_features.T of the (normalised) output dict, diagonal
        feats_i, feats_t = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        want = (feats_i @ feats_t.T).diagonal().double()
    torch.testing.assert_close(metric.scores(images, PROMPTS), want, rtol=1e-5, atol=1e-6)
    assert (
        metric.protocol()["metric"] == "hpsv2.1" and "HPS_v2.1_compressed.pt" in metric.protocol()["backbone"]
    )
    with pytest.raises(FileNotFoundError, match=r"No HPSv2.1 checkpoint at"):
        HPSv21Score.from_pretrained(tmp_path / "missing.pt", model_name=name)


def test_aesthetic_mlp_matches_the_laion_layout_and_formula(tmp_path: Path) -> None:
    """LAION's predictor: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
    Linear(64, 16), Linear(16, 1) on the L2-normalised CLIP image embedding (no activations)."""
    keys = set(AestheticMLP().state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    shapes = [tuple(m.weight.shape) for m in AestheticMLP().layers if isinstance(m, torch.nn.Linear)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    name = tiny_clip.register_open_clip()
    torch.manual_seed(4)
    head = AestheticMLP(16)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")
    metric = AestheticScore.from_pretrained(tmp_path / "aesthetic.pth", clip_name=name, clip_pretrained=None)
    images = _images(2)
    with torch.no_grad():
        emb = metric.model.encode_image(metric.preprocess(images))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        # the head written out as matrix products (dropout is the identity in eval)
        x = emb
        for layer in (0, 2, 4, 6, 7):
            x = x @ head.layers[layer].weight.T + head.layers[layer].bias
    want = x.reshape(-1).double()
    torch.testing.assert_close(metric.scores(images, PROMPTS), want, rtol=1e-5, atol=1e-5)
    metric.update(images, PROMPTS)
    assert metric.compute() == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-5)
    with pytest.raises(FileNotFoundError, match=r"No aesthetic-predictor weights at"):
        AestheticScore.from_pretrained(tmp_path / "missing.pth", clip_name=name, clip_pretrained=None)
    with pytest.raises(DTypeError, match=r"Expected `mlp` to be an nn.Module"):
        AestheticScore(lambda x: x, lambda x: x, "mlp")  # type: ignore[arg-type]


def test_image_reward_goes_through_the_packages_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeModel:
        def score(self, prompt: str, image: Any) -> float:
            calls.append((prompt, image.size, image.mode))
            return float(len(prompt)) + image.getpixel((0, 0))[0] / 255

    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, **kwargs: calls.append((name, kwargs)) or FakeModel()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    metric = ImageRewardScore.from_pretrained(device="cpu")
    assert calls[0] == ("ImageReward-v1.0", {"device": "cpu"})
    images = _images(3)
    metric.update(images, PROMPTS)
    assert [c[0] for c in calls[1:]] == PROMPTS and calls[1][1:] == ((40, 36), "RGB")
    first_pixel = torch.round(images[:, 0, 0, 0] * 255).double() / 255
    want = torch.tensor([len(p) for p in PROMPTS], dtype=torch.float64) + first_pixel.double()
    assert metric.compute() == pytest.approx(float(want.mean()), rel=1e-9)
    assert metric.protocol()["metric"] == "image_reward"
    bad = ImageRewardScore(lambda prompt, image: "high")
    with pytest.raises(DTypeError, match=r"The ImageReward scorer returned str"):
        bad.update(images, PROMPTS)


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(MissingDependencyError, match=r"`pip install image-reward`"):
        ImageRewardScore.from_pretrained()
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match=r"`pip install open-clip-torch`"):
        HPSv21Score.from_pretrained(__file__)
    assert issubclass(MissingDependencyError, ImportError)
