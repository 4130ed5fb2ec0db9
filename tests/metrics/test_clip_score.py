"""CLIPScore against independent computations with the raw model calls (tiny transformers / open_clip models)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.metrics import CLIPScore
from tests.metrics import tiny_clip

PROMPTS = ["a red cat", "two dogs!", "a cup of tea", "x"]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 36, generator=torch.Generator().manual_seed(seed))


def _reference_transformers(model, processor, images, prompts) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The cosines from the raw transformers calls (as the PickScore / CLIP model cards write them), the pixels by
    transformers 4's PIL ``CLIPImageProcessor`` rule written out (shorter side, floor-offset centre crop)."""
    pixels = tiny_clip.shorter_side_crop_pixels(images, 32, offsets="floor")
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        img = tiny_clip.embedding(model.get_image_features(pixel_values=pixels))
        txt = tiny_clip.embedding(model.get_text_features(**tokens))
    return tiny_clip.cosine(img, txt)


def test_transformers_backbone_equals_raw_model_calls(tmp_path: Path) -> None:
    model, processor = tiny_clip.transformers_clip()
    images = _images()
    want = _reference_transformers(model, processor, images, PROMPTS)
    metric = CLIPScore.from_transformers(model, processor)
    metric.update(images[:3], PROMPTS[:3])
    metric.update(images[3:], PROMPTS[3:])
    assert metric.count == 4
    assert metric.compute() == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(metric.cosines(images, PROMPTS), want, rtol=1e-5, atol=1e-6)
    # Hessel et al.'s per-pair clamp, mean(100 max(cos, 0)), and torchmetrics' clamp of the mean, max(mean(100 cos), 0)
    hessel = CLIPScore.from_transformers(model, processor, scale=100.0, clamp_negative=True)
    hessel.update(images, PROMPTS)
    assert hessel.compute() == pytest.approx(float((100 * want.clamp_min(0)).mean()), rel=1e-5, abs=1e-4)
    tm = CLIPScore.from_transformers(model, processor, scale=100.0, clamp_mean=True)
    tm.update(images, PROMPTS)
    assert tm.compute() == pytest.approx(max(float((100 * want).mean()), 0.0), rel=1e-5, abs=1e-4)
    assert tm.protocol()["clamp_mean"] is True and tm.protocol()["clamp_negative"] is False
    # loading from folders gives the same numbers
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    loaded = CLIPScore.from_transformers(str(tmp_path / "model"))
    torch.testing.assert_close(loaded.cosines(images, PROMPTS), want, rtol=1e-5, atol=1e-6)
    record = loaded.protocol()
    assert record["metric"] == "clip_score" and "transformers CLIPModel" in record["backbone"]
    assert "CLIPImageProcessorPil" in record["preprocess"] and record["scale"] == 1.0
    assert (
        type(processor.image_processor).__name__ == "CLIPImageProcessor"
    )  # the caller's object is left alone


def test_open_clip_backbone_equals_raw_model_calls() -> None:
    import open_clip

    name = tiny_clip.register_open_clip()
    torch.manual_seed(0)
    metric = CLIPScore.from_open_clip(name, None)
    model = metric.model
    tokenizer = open_clip.get_tokenizer(name)
    images = _images(seed=1)
    with torch.no_grad():
        # OpenAI CLIP's / open_clip's Resize(shorter side) + CenterCrop (rounded offsets), written out
        img = model.encode_image(tiny_clip.shorter_side_crop_pixels(images, 32, offsets="round"))
        txt = model.encode_text(tokenizer(PROMPTS))
    want = tiny_clip.cosine(img, txt)
    metric.update(images, PROMPTS)
    assert metric.compute() == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    assert "open_clip" in metric.protocol()["backbone"] and "Resize" in metric.protocol()["preprocess"]
    metric.all_reduce()  # no process group: a no-op
    assert metric.count == 4
    metric.reset()
    with pytest.raises(OptionError, match=r"CLIPScore.compute\(\) before any update"):
        metric.compute()


@pytest.mark.parametrize("size", [*tiny_clip.NON_SQUARE, (40, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_non_square_images_are_resized_and_cropped_as_each_backbone_does(size: tuple[int, int]) -> None:
    """Both named backbones take the whole pipeline of their library on non-square images: transformers 4's PIL
    ``CLIPImageProcessor`` (floor offsets), open_clip's / OpenAI CLIP's torchvision ``Resize`` + ``CenterCrop``
    (rounded offsets). The 48 x 83 / 83 x 48 sizes tell the two crops apart; the torchvision re-implementation of
    transformers >= 5 differs from the PIL one by up to 2 uint8 levels, which the 1e-5 bound also refuses."""
    model, processor = tiny_clip.transformers_clip()
    images = tiny_clip.uint8_images(2, *size, seed=sum(size))
    hf = CLIPScore.from_transformers(model, processor)
    want = tiny_clip.shorter_side_crop_pixels(images, 32, offsets="floor")
    torch.testing.assert_close(hf.preprocess(images), want, rtol=0, atol=1e-5)
    name = tiny_clip.register_open_clip()
    oc = CLIPScore.from_open_clip(name, None)
    want = tiny_clip.shorter_side_crop_pixels(images, 32, offsets="round")
    torch.testing.assert_close(oc.preprocess(images), want, rtol=0, atol=1e-5)


def _angle_metric(**options: Any) -> CLIPScore:
    """A CLIP score whose cosine is set by the image: pixel [0, 0, 0] = theta / pi gives the image embedding
    (cos theta, sin theta) against the text embedding (1, 0), so the pair's cosine is cos(theta)."""

    def image_encoder(px: torch.Tensor) -> torch.Tensor:
        theta = px[:, 0, 0, 0].double() * math.pi
        return torch.stack([theta.cos(), theta.sin()], dim=1)

    return CLIPScore(image_encoder, lambda p: torch.tensor([[1.0, 0.0]] * len(p)), lambda x: x, **options)


def _angle_images(cosines: list[float]) -> torch.Tensor:
    x = torch.zeros(len(cosines), 3, 2, 2, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.tensor([math.acos(c) / math.pi for c in cosines], dtype=torch.float64)
    return x


@pytest.mark.parametrize(
    "batches",
    [[[1.0, 0.6, -0.8]], [[-0.8], [1.0, 0.6]], [[-0.5, -0.2]], [[0.3, -0.9], [0.1]]],
)
def test_clamp_mean_is_torchmetrics_clamp_negative_is_per_pair(batches: list[list[float]]) -> None:
    """torchmetrics' CLIPScore returns max(sum(100 cos) / n, 0) (``compute`` clamps ``score / n_samples``, over
    every batch: no clamp per batch); Hessel et al. clamp each pair, mean(100 max(cos, 0)). Both against those
    formulas in numpy, on cosines the images set."""
    cosines = np.array([c for batch in batches for c in batch])
    want = {
        "clamp_mean": max(float(np.mean(100.0 * cosines)), 0.0),
        "clamp_negative": float(np.mean(100.0 * np.maximum(cosines, 0.0))),
        "none": float(np.mean(100.0 * cosines)),
    }
    for option, value in want.items():
        metric = _angle_metric(scale=100.0, **({} if option == "none" else {option: True}))
        for batch in batches:
            metric.update(_angle_images(batch), ["p"] * len(batch))
        assert metric.compute() == pytest.approx(value, abs=1e-9), option
    # per-pair scores are not clamped by clamp_mean (only the mean is)
    metric = _angle_metric(scale=100.0, clamp_mean=True)
    np.testing.assert_allclose(metric.scores(_angle_images([0.5, -0.5]), ["p", "q"]).numpy(), [50.0, -50.0])
    with pytest.raises(DTypeError, match=r"`clamp_mean`"):
        _angle_metric(clamp_mean=1)


def test_clip_score_errors() -> None:
    metric = CLIPScore(lambda px: px.flatten(1)[:, :4], lambda p: torch.ones(len(p), 4), lambda x: x)
    images = _images(2)
    with pytest.raises(ShapeError, match=r"`images` holds 2 images but `prompts` holds 1 strings"):
        metric.update(images, ["a"])
    with pytest.raises(
        DTypeError, match=r"Expected `prompts` to be a list of strings .* pass \[prompt\] \* len"
    ):
        metric.update(images, "a cat")
    with pytest.raises(DTypeError, match=r"Expected every entry of `prompts` to be a str, but got int"):
        metric.update(images, ["a", 3])
    with pytest.raises(OptionError, match=r"Expected float `images` in \[0, 1\], but they range over \[-1"):
        metric.update(images * 2 - 1.5, ["a", "b"])
    with pytest.raises(ShapeError, match=r"with 3 \(RGB\) channels, but got shape \(2, 1, 40, 36\)"):
        metric.update(images[:, :1], ["a", "b"])
    with pytest.raises(DTypeError, match=r"Expected `image_encoder` to be callable"):
        CLIPScore(None, lambda p: p, lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"Expected `scale` to be > 0"):
        CLIPScore(lambda x: x, lambda p: p, lambda x: x, scale=0.0)
    mismatched = CLIPScore(lambda px: px.flatten(1)[:, :4], lambda p: torch.ones(len(p), 5), lambda x: x)
    with pytest.raises(ShapeError, match=r"image embeddings \(2, 4\) and text embeddings \(2, 5\)"):
        mismatched.update(images, ["a", "b"])
    model, _ = tiny_clip.transformers_clip()
    with pytest.raises(OptionError, match=r"a model object needs its processor"):
        CLIPScore.from_transformers(model)
    with pytest.raises(DTypeError, match=r"Expected `model_or_path` to be a transformers CLIPModel"):
        CLIPScore.from_transformers(3)


def test_openai_weights_get_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's CLIP uses QuickGELU; open_clip's plain names would build GELU with a warning only."""
    import open_clip

    name = tiny_clip.register_open_clip()
    seen: list[dict[str, object]] = []
    original = open_clip.create_model_and_transforms

    def recording(model_name: str, pretrained: str | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append({"pretrained": pretrained, **kwargs})
        return original(model_name, pretrained=None, **kwargs)  # no download: random weights

    monkeypatch.setattr(open_clip, "create_model_and_transforms", recording)
    metric = CLIPScore.from_open_clip(name, "openai")
    assert seen[-1]["force_quick_gelu"] is True
    assert type(metric.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    CLIPScore.from_open_clip(name, "laion2b_s32b_b79k")
    assert seen[-1]["force_quick_gelu"] is False


def test_text_prefix_equals_gigagans_token_level_prefix() -> None:
    """GigaGAN's ``compute_clip_score`` (also DMD2's ``coco_evaluator``) inserts the tokens of "A photo depicts "
    (``tokenize(prefix)[:, 1:4]``) after the start token of the caption's tokens, cuts to 77 and writes the end token
    into the last column when it holds a token; ``--clip_prefix`` instead tokenizes ``prefix + caption``. The BPE
    splits words independently, so both are the same token ids -- for short captions, for captions that reach the
    context exactly, and for truncated ones. (GigaGAN calls OpenAI's ``clip.tokenize(..., truncate=True)``;
    open_clip's ``SimpleTokenizer`` has the same vocabulary, cleaning and truncation.)"""
    open_clip = pytest.importorskip("open_clip")
    tokenize = open_clip.get_tokenizer("ViT-g-14")
    prefix = "A photo depicts "
    end = 49407  # the end-of-text token id (the highest id, which encode_text's argmax pools at)

    def gigagan_tokens(captions: list[str]) -> torch.Tensor:
        tokens = tokenize(captions)
        inserted = tokenize([prefix])[:, 1:4].expand(len(captions), -1)
        joined = torch.cat([tokens[:, :1], inserted, tokens[:, 1:]], dim=1)[:, :77]
        last = joined[:, 76:77].clone()
        last[last > 0] = end
        return torch.cat([joined[:, :76], last], dim=1)

    captions = [
        "A man riding a wave on top of a surfboard.",
        "  two   dogs\nplaying  ",
        " ".join(["cat"] * 72),  # 72 tokens + start + 3 + end = 77: fills the context exactly
        " ".join(["cat"] * 73),  # one too many: truncated, end token in the last column
        " ".join(f"word{k}" for k in range(120)),  # far too long
    ]
    got = tokenize([prefix + c for c in captions])
    want = gigagan_tokens(captions)
    assert torch.equal(got, want)
    assert int((want[2] == end).nonzero()) == 76 and int((want[3] == end).nonzero()) == 76
    assert int((want[0] == end).nonzero()) < 76  # short: not truncated
