"""Video-caption data for Wan (``--train_data_dir``): :class:`training.caption_folders.VideoCaptionFolder`,
:func:`training.sdxl_encoding.encode_videos` and :class:`training.data_sources.StepData`'s video batches, checked
against the PNG frames and ``WanPipeline``'s latent convention, then ``flow_kd.py`` (task loss on real video
latents), ``flow_dmd2.py --gan_weight`` (LADD heads on the fake score vs real video latents) and ``flow_tscd.py``
(noised real video latents) on a tiny ``WanPipeline``; what is refused, with the reason.
"""

from __future__ import annotations

import argparse
import builtins
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.examples.flow_scripts import (  # noqa: F401 (autouse fixture)
    caption_folders,
    data_sources,
    deterministic_runs,
    flow_critics,
    flow_dmd2,
    flow_kd,
    flow_options,
    flow_tscd,
    sdxl_encoding,
)
from tests.examples.tiny_flow import (
    IMAGE_SIZE,
    NUM_FRAMES,
    read_lora,
    save_tiny_wan_pipeline,
    smoke_argv,
    write_captioned_videos,
)
from tests.examples.tiny_sdxl import write_captioned_images

CAPTIONS = ["a cat walking", "", "a dog running on grass"]  # "" : a clip without a caption


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_wan_videos")
    return {
        "wan": save_tiny_wan_pipeline(root / "wan"),
        "videos": write_captioned_videos(root / "videos", CAPTIONS, NUM_FRAMES + 2),
    }


def _vae(tiny: dict[str, Path]) -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(tiny["wan"]), subfolder="vae").eval()


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """:func:`smoke_argv` with ``--train_data_dir`` the clips ``tiny["videos"]`` and ``--num_frames 5``."""
    data = {**tiny, "images": tiny["videos"]}  # smoke_argv's --train_data_dir entry
    return smoke_argv(data, "wan", out, "--num_frames", str(NUM_FRAMES), *extra, data="images")


def _by_hand(path: Path, height: int, width: int) -> torch.Tensor:
    """A frame resized (bicubic) to cover ``height x width`` and centre-cropped, in [-1, 1], from PIL directly."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        s = max(height / h, width / w)
        big = img.convert("RGB").resize((round(w * s), round(h * s)), Image.BICUBIC)
    left, top = (big.width - width) // 2, (big.height - height) // 2
    crop = np.asarray(big, dtype=np.float32)[top : top + height, left : left + width]
    return torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1


def test_mp4_clips_are_read_with_imageio(tmp_path: Path) -> None:
    """An ``.mp4`` clip (imageio's ffmpeg plugin, the ``video`` extra) gives its first ``num_frames`` frames,
    cropped as the PNG frames are, in order: each decoded frame lies within the codec's loss of the frame written
    at its position and far from its neighbours; its caption is the ``.txt`` beside it; a short one is refused."""
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    from PIL import Image

    # smooth frames (a ramp moving 24 px a frame): H.264 at the highest quality keeps them to a few levels, and
    # neighbouring frames differ by far more than that
    yy, xx = np.mgrid[0:64, 0:80]
    frames = [
        np.stack([(xx * 3 + 24 * f) % 256, (yy * 4) % 256, np.full_like(xx, 40 * f)], -1).astype(np.uint8)
        for f in range(7)
    ]
    (tmp_path / "data").mkdir()
    writer = imageio.get_writer(str(tmp_path / "data" / "walk.mp4"), format="FFMPEG", fps=8, quality=10)
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    (tmp_path / "data" / "walk.txt").write_text("a walk\n")
    for f, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{f}.png")
    data = caption_folders.VideoCaptionFolder(tmp_path / "data", 5, 32, 48)
    pixels, caption = data[0]
    assert caption == "a walk" and pixels.shape == (3, 5, 32, 48)
    want = [_by_hand(tmp_path / f"{f}.png", 32, 48) for f in range(7)]
    for f in range(5):
        own = (pixels[:, f] - want[f]).abs().mean()
        others = [(pixels[:, f] - want[g]).abs().mean() for g in range(7) if g != f]
        # codec loss: a few levels of 255 on average (2 / 127.5 in [-1, 1] would be two levels everywhere)
        assert own < 4 / 127.5 and own < min(others) / 4, (f, float(own), [float(o) for o in others])
    assert "walk.mp4" in data.cache_key(0)
    with pytest.raises(ValueError, match=r"at least --num_frames 9 frames, but .*walk\.mp4 has 7"):
        caption_folders.VideoCaptionFolder(tmp_path / "data", 9, 32)[0]


def test_reader_frames_are_the_pngs_cropped_in_name_order(tmp_path: Path) -> None:
    """A clip is its folder's first ``num_frames`` frames in name order (digit runs as numbers: ``2`` before
    ``10``), each the PNG resized and centre-cropped to ``height x width``; captions from ``clip.txt`` beside the
    folder (``""`` without one); nested folders are clips too; the image reader's square crops are unchanged."""
    from PIL import Image

    rng = np.random.default_rng(0)
    clip = tmp_path / "data" / "walk"
    clip.mkdir(parents=True)
    for i in range(11):  # 0.png ... 10.png: a string sort would read 0, 1, 10, 2, ...
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(clip / f"{i}.png")
    (tmp_path / "data" / "walk.txt").write_text("a walk\n")
    write_captioned_videos(tmp_path / "data" / "more", ["", "x"], 9, (40, 40))
    data = caption_folders.VideoCaptionFolder(tmp_path / "data", 9, 32, 48)
    assert [p.relative_to(tmp_path / "data").as_posix() for p in data.files] == [
        "more/clip0",
        "more/clip1",
        "walk",
    ]
    assert [data.caption(i) for i in range(3)] == ["", "x", "a walk"]
    pixels, caption = data[2]
    assert caption == "a walk" and pixels.shape == (3, 9, 32, 48)
    want = torch.stack([_by_hand(clip / f"{i}.png", 32, 48) for i in range(9)], dim=1)
    torch.testing.assert_close(pixels, want, rtol=0, atol=0)
    assert pixels.min() >= -1 and pixels.max() <= 1
    square = caption_folders.VideoCaptionFolder(tmp_path / "data", 5, 32)[2][0]
    torch.testing.assert_close(
        square, torch.stack([_by_hand(clip / f"{i}.png", 32, 32) for i in range(5)], 1)
    )
    images = caption_folders.ImageCaptionFolder(write_captioned_images(tmp_path / "images", ["a"]), 64)
    torch.testing.assert_close(images[0][0], _by_hand(images.files[0], 64, 64), rtol=0, atol=0)


def test_encode_videos_is_wan_pipelines_normalisation(tiny: dict[str, Path]) -> None:
    """``encode_videos`` = ``(z - latents_mean) / latents_std`` per channel for a posterior sample ``z`` (built by hand
    from the VAE config), and ``decode_latents`` inverts it as ``WanPipeline`` decodes (``z = x * std + mean``)."""
    vae = _vae(tiny)
    videos = torch.rand(2, 3, NUM_FRAMES, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = sdxl_encoding.encode_videos(vae, videos, torch.Generator().manual_seed(5))
    assert latents.shape == (2, 16, 2, 4, 6)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        dist = vae.encode(videos).latent_dist
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, (dist.mean + dist.std * eps - mean) / std)
    with torch.no_grad():
        want = (vae.decode(latents * std + mean).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(sdxl_encoding.decode_latents(vae, latents), want)
    with pytest.raises(ValueError, match=r"videos of shape \(B, 3, F, H, W\).*got \(3, 5, 32, 48\)"):
        sdxl_encoding.encode_videos(vae, videos[0])
    with pytest.raises(ValueError, match=r"Wan-family video VAE .* encode_images"):
        sdxl_encoding.encode_videos(argparse.Namespace(config=argparse.Namespace()), videos)


def _data_args(tiny: dict[str, Path], **extra: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "train_batch_size": 2,
            "cache_dir": None,
            "dataloader_num_workers": 0,
            "train_data_dir": str(tiny["videos"]),
            "prompts_file": None,
            "resolution": 32,
            "width": 48,
            "num_frames": NUM_FRAMES,
            "pretrained_model_name_or_path": str(tiny["wan"]),
            "pretrained_vae_model_name_or_path": None,
            "revision": None,
            "variant": None,
            **extra,
        }
    )


def _copy(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out


def test_step_data_video_batches_are_the_clips_latents(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``StepData.latents_batch`` for a video model: the clips the step's generator draws, encoded by ``encode_videos``
    with the rest of that generator; ``--cache_dir`` stores each clip's posterior once (the same values on a rerun,
    and a clip's single-clip posterior sampled as uncached); prefetching workers hand over the same batches."""
    vae = _vae(tiny)
    data = data_sources.StepData(_data_args(tiny), need_images=True)
    assert isinstance(data.images, caption_folders.VideoCaptionFolder)
    gen = data_sources.step_generator(3, 1)
    ref = _copy(gen)
    latents, prompts = data.latents_batch(gen, vae, "cpu")
    idx = torch.randint(len(CAPTIONS), (2,), generator=ref).tolist()
    assert prompts == [CAPTIONS[i] for i in idx]
    clips = torch.stack([data.images[i][0] for i in idx])
    torch.testing.assert_close(latents, sdxl_encoding.encode_videos(vae, clips, ref), rtol=0, atol=0)
    assert latents.shape == (2, 16, 2, 4, 6)

    cached = data_sources.StepData(_data_args(tiny, cache_dir=str(tmp_path / "cache")), need_images=True)
    first = cached.latents_batch(data_sources.step_generator(3, 1), vae, "cpu")[0]
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == len(set(idx))
    again = cached.latents_batch(data_sources.step_generator(3, 1), vae, "cpu")[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    single = [sdxl_encoding.posterior(vae, clips[k : k + 1]) for k in range(2)]
    mean, std = (torch.cat([s[i] for s in single]) for i in (0, 1))
    torch.testing.assert_close(first, sdxl_encoding.sample_posterior(vae, mean, std, ref_after_draw(idx)))
    key = cached._latent_cache(idx[0])
    frame = cached.images._frames[cached.images.files[idx[0]]][
        -1
    ]  # an edited frame: the clip is encoded again
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    assert cached._latent_cache(idx[0]) != key

    workers = data_sources.StepData(_data_args(tiny, dataloader_num_workers=1), need_images=True)
    workers.start(0, 2, seed=3, process_index=0, accumulation=1)
    try:
        for step in range(2):
            got = workers.latents_batch(data_sources.step_generator(3, step), vae, "cpu")
            want = data.latents_batch(data_sources.step_generator(3, step), vae, "cpu")
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            assert got[1] == want[1]
    finally:
        workers.close()


def ref_after_draw(idx: list[int]) -> torch.Generator:
    """Step 1's generator (seed 3) after its draw of ``idx``."""
    gen = data_sources.step_generator(3, 1)
    assert torch.randint(len(CAPTIONS), (2,), generator=gen).tolist() == idx
    return gen


def _record_latents(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    batch = data_sources.StepData.latents_batch

    def recording(self: Any, gen: torch.Generator, vae: Any, device: Any) -> Any:
        out = batch(self, gen, vae, device)
        seen.append(out[0])
        return out

    monkeypatch.setattr(data_sources.StepData, "latents_batch", recording)
    return seen


def test_kd_on_wan_videos(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flow_kd.py --train_data_dir`` on Wan: the layer KD's clean latents are the clips' video latents and the
    block-removed student trains."""
    from diffusers import WanTransformer3DModel

    seen = _record_latents(monkeypatch)
    out = tmp_path / "kd"
    flow_kd.main(flow_kd.parse_args(_argv(tiny, out, "--keep_blocks", "0", "2")))
    assert [x.shape for x in seen] == [(2, 16, 2, IMAGE_SIZE // 8, IMAGE_SIZE // 8)] * 2
    student = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    start = WanTransformer3DModel.from_pretrained(str(tiny["wan"]), subfolder="transformer")
    assert student.config.num_layers == 2
    assert not torch.equal(student.blocks[1].ffn.net[2].weight, start.blocks[2].ffn.net[2].weight)


def test_dmd2_gan_heads_train_on_wan_videos(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flow_dmd2.py --gan_weight`` on Wan: LADD heads on the fake score's features judge real video latents
    ``(B, 16, f, h, w)`` at ``--resolution`` x ``--width`` against the generator's samples; the heads update."""
    seen = _record_latents(monkeypatch)
    heads: dict[str, Any] = {}
    build = flow_critics.FakeFeatureGAN.build

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        gan = build(*args, **kwargs)
        heads["gan"] = gan
        heads["start"] = {n: p.detach().clone() for n, p in gan.head.named_parameters()}
        return gan

    monkeypatch.setattr(flow_critics.FakeFeatureGAN, "build", recording_build)
    out = tmp_path / "dmd2"
    extra = ["--gan_weight", "--discriminator_norm_groups", "4", "--generator_every", "1", "--lora_rank", "4"]
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, out, *extra, "--width", "96")))
    assert [x.shape for x in seen] == [(2, 16, 2, IMAGE_SIZE // 8, 96 // 8)] * 2
    trained = dict(heads["gan"].head.named_parameters())
    moved = [n for n, p in heads["start"].items() if not torch.equal(p, trained[n].detach())]
    assert moved, "the GAN heads did not update"
    for name in ("pytorch_lora_weights.safetensors", flow_critics.FAKE_LORA_NAME):
        lora = read_lora(out / name)
        assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), f"{name} did not train"


def test_tscd_on_wan_videos(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flow_tscd.py --train_data_dir`` on Wan: the states are noised real video latents; the LoRA trains."""
    seen = _record_latents(monkeypatch)
    out = tmp_path / "tscd"
    flow_tscd.main(
        flow_tscd.parse_args(_argv(tiny, out, "--use_lora", "--lora_rank", "4", "--segments", "2"))
    )
    assert [x.shape for x in seen] == [(2, 16, 2, IMAGE_SIZE // 8, IMAGE_SIZE // 8)] * 2
    lora = read_lora(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "the student did not train"


def test_video_data_refusals(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused with the reason: a clip shorter than ``--num_frames`` (named), an image folder for Wan (before any
    load), video files without imageio's ffmpeg plugin, ``--width`` with image data for an image model."""
    short = write_captioned_videos(tmp_path / "short", ["a", "b"], NUM_FRAMES)
    (short / "clip1" / "004.png").unlink()
    with pytest.raises(ValueError, match=r"at least --num_frames 5 frames, but .*clip1 has 4: remove it"):
        caption_folders.VideoCaptionFolder(short, NUM_FRAMES, 32)
    images = write_captioned_images(tmp_path / "images", ["a cat", "a dog"])
    with pytest.raises(
        ValueError, match=r"video clips for a video model \(Wan\), but it holds images directly"
    ):
        flow_kd.parse_args(smoke_argv({**tiny, "images": images}, "wan", tmp_path / "o", "--preset", "wan-half",
                                      data="images"))  # fmt: skip
    with pytest.raises(ValueError, match=r"to hold video clips .* but found none"):
        caption_folders.find_clips(tmp_path / "short" / "clip0" / "missing")

    mp4 = write_captioned_videos(tmp_path / "mp4", ["a"])
    (mp4 / "walk.mp4").write_bytes(b"")
    real_import = builtins.__import__

    def no_imageio(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("imageio", "imageio_ffmpeg"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imageio)
    with pytest.raises(
        ImportError, match=r"\(\.mp4\) .* needs imageio with its ffmpeg plugin.*pip install imageio"
    ):
        flow_dmd2.parse_args(_argv({**tiny, "videos": mp4}, tmp_path / "p"))
    monkeypatch.setattr(builtins, "__import__", real_import)

    a14b = {
        "pretrained_model_name_or_path": None,
        "resolution": 64,
        "max_sequence_length": None,
        "guidance": None,
    }
    a14b |= {"width": None, "num_frames": None, "gan_weight": 0.1, "train_data_dir": str(tiny["videos"])}
    flow_options.check_flow_values(argparse.Namespace(**a14b), "wan-a14b")  # A14B's heads: one set per expert
    args = argparse.Namespace(max_sequence_length=None, width=128, train_data_dir=str(images))
    with pytest.raises(ValueError, match=r"--width trains non-square samples from prompts"):
        flow_options.check_family_options(args, "sd3")
    flow_options.check_family_options(
        argparse.Namespace(**{**vars(args), "train_data_dir": str(short)}), "wan"
    )
