"""Preference scores: the formulas (PickScore, HPSv2.1, LAION aesthetic MLP) against raw model calls on tiny
stand-in models whose weights the tests write; ImageReward through a stand-in of its package's public API."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, MissingDependencyError
from diffdistill.metrics import AestheticMLP, AestheticScore, HPSv21Score, ImageRewardScore, PickScore
from diffdistill.metrics.preference import HPSPreprocess
from tests.metrics import tiny_clip

PROMPTS = ["a red cat", "two dogs!", "a cup of tea"]


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 36, 40, generator=torch.Generator().manual_seed(seed))


def test_pickscore_is_logit_scale_times_cosine() -> None:
    """The model card's calc_probs before the softmax: logit_scale.exp() * (text_embs @ image_embs.T)."""
    model, processor = tiny_clip.transformers_clip(logit_scale=math.log(100.0))
    images = tiny_clip.uint8_images(3, 48, 83, seed=0)  # non-square, odd crop margin
    # the model card's processor (transformers 4's PIL CLIPImageProcessor), its rule written out
    pixels = tiny_clip.shorter_side_crop_pixels(images, 32, offsets="floor")
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
    source, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    metric = HPSv21Score.from_pretrained(tmp_path / "HPS_v2.1_compressed.pt", model_name=name)
    assert isinstance(metric.preprocess, HPSPreprocess) and metric.preprocess.image_size == 32
    tokenizer = open_clip.get_tokenizer(name)
    images = tiny_clip.uint8_images(3, 48, 80, seed=1)
    with torch.no_grad():
        # HPSv2's own transform (longer side, zero padding), not open_clip's centre crop
        out = source.eval()(tiny_clip.hps_pixels(images, 32), tokenizer(PROMPTS))
        # hpsv2's img_score: image_features @ text_features.T of the (normalised) output dict, diagonal
        feats_i, feats_t = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        want = (feats_i @ feats_t.T).diagonal().double()
    torch.testing.assert_close(metric.scores(images, PROMPTS), want, rtol=1e-5, atol=1e-6)
    assert (
        metric.protocol()["metric"] == "hpsv21" and "HPS_v2.1_compressed.pt" in metric.protocol()["backbone"]
    )
    with pytest.raises(FileNotFoundError, match=r"No HPSv2.1 checkpoint at"):
        HPSv21Score.from_pretrained(tmp_path / "missing.pt", model_name=name)


@pytest.mark.parametrize("size", [*tiny_clip.NON_SQUARE, (40, 40), (32, 20)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_hps_preprocess_is_hpsv2s_resize_max_size(size: tuple[int, int]) -> None:
    """``hpsv2/src/open_clip/transform.py``: ToTensor, ``ResizeMaxSize`` (longer side to 32, bicubic antialiased on
    the float tensor, sides rounded), black padding centred with the odd row / column after, then Normalize --
    written out independently in ``tiny_clip.hps_pixels``; square images are a plain resize (no padding)."""
    images = tiny_clip.uint8_images(2, *size, seed=size[0] * size[1])
    pre = HPSPreprocess(32)
    got = pre(images)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, tiny_clip.hps_pixels(images, 32), rtol=0, atol=2e-6)
    height, width = size
    new_h, new_w = pre.resized_size(height, width)
    assert max(new_h, new_w) == 32 and (new_h, new_w) == (
        round(height * 32 / max(size)),
        round(width * 32 / max(size)),
    )
    # the border is black after normalisation: -mean / std, on exactly floor(pad / 2) rows before and the rest after
    black = (-torch.tensor(tiny_clip.OPENAI_MEAN) / torch.tensor(tiny_clip.OPENAI_STD)).view(1, 3, 1, 1)
    is_border = (got - black).abs().amax(dim=(0, 1)) < 1e-6  # (32, 32)
    rows, cols = is_border.all(dim=1), is_border.all(dim=0)
    top, left = (32 - new_h) // 2, (32 - new_w) // 2
    assert rows[:top].all() and rows[top + new_h :].all() and not rows[top : top + new_h].any()
    assert cols[:left].all() and cols[left + new_w :].all() and not cols[left : left + new_w].any()
    if size == (48, 80):  # 19 rows of image, 13 of padding: 6 above, 7 below
        assert (new_h, top, 32 - top - new_h) == (19, 6, 7)


def test_hps_preprocess_errors() -> None:
    from diffdistill.errors import OptionError, ShapeError

    with pytest.raises(OptionError, match=r"image_size"):
        HPSPreprocess(0)
    with pytest.raises(DTypeError, match=r"Expected `mean` to be three numbers"):
        HPSPreprocess(32, mean=(0.5, 0.5))
    with pytest.raises(ShapeError, match=r"3 \(RGB\) channels"):
        HPSPreprocess(32)(torch.rand(1, 1, 8, 8))


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
    images = tiny_clip.uint8_images(3, 83, 48, seed=2)  # tall, odd crop margin
    with torch.no_grad():
        # clip.load("ViT-L/14")'s preprocess (improved-aesthetic-predictor's simple_inference.py): torchvision
        # Resize(shorter side) + CenterCrop (rounded offsets) on the PIL image, written out
        emb = metric.model.encode_image(tiny_clip.shorter_side_crop_pixels(images, 32, offsets="round"))
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
    assert metric.protocol()["metric"] == "imagereward"
    # non-square images reach the package whole (it resizes and crops them itself, with its BLIP transform)
    for size in ((48, 80), (80, 48), (37, 52)):
        handed: list[Any] = []
        wide = tiny_clip.uint8_images(2, *size, seed=7)
        ImageRewardScore(lambda prompt, image, seen=handed: seen.append(image) or 0.0).update(
            wide, PROMPTS[:2]
        )
        for image, x in zip(handed, wide):
            want_arr = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            assert image.size == (size[1], size[0]) and (np.asarray(image) == want_arr).all()
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
