"""FrameConsistency against embeddings computed by hand (a stand-in linear backbone, and the tiny transformers CLIP's
raw calls), its input checks, and its sum over 2 processes (gloo)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.metrics import CLIPScore, FrameConsistency
from tests import preloaded_launch
from tests.metrics import tiny_clip

ROOT = Path(__file__).resolve().parents[2]
PROJECTION = np.random.default_rng(0).standard_normal((12, 5))  # 3 channels x 2 x 2 pooled cells -> 5


def _encoder(pixels: torch.Tensor) -> torch.Tensor:
    """The stand-in backbone: 2 x 2 average pooling of each channel minus 0.5, then a fixed linear map to 5 numbers."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.double() - 0.5, 2).flatten(1)
    return pooled @ torch.from_numpy(PROJECTION)


def _by_hand(videos: torch.Tensor, pairs: str) -> list[float]:
    """Per-video consistency written out with numpy loops: each frame's pooled cells, its embedding, the cosines."""
    out = []
    for video in videos.double().numpy():
        frames = video.shape[0]
        emb = []
        for frame in video:  # (3, H, W)
            h, w = frame.shape[1:]
            cells = [
                frame[c, i * h // 2 : (i + 1) * h // 2, j * w // 2 : (j + 1) * w // 2].mean() - 0.5
                for c in range(3)
                for i in range(2)
                for j in range(2)
            ]
            e = np.array(cells) @ PROJECTION
            emb.append(e / math.sqrt(float(e @ e)))
        if pairs == "consecutive":
            pair_list = [(f, f + 1) for f in range(frames - 1)]
        else:
            pair_list = [(f, g) for f in range(frames) for g in range(f + 1, frames)]
        out.append(sum(float(emb[a] @ emb[b]) for a, b in pair_list) / len(pair_list))
    return out


def _videos(n: int = 3, frames: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 3, 8, 6, generator=g)  # frames drift from a common start: cosines differ from 1
    return (base + 0.4 * torch.rand(n, frames, 3, 8, 6, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("pairs", ["consecutive", "all"])
def test_values_equal_embeddings_computed_by_hand(pairs: str) -> None:
    videos = _videos()
    want = _by_hand(videos, pairs)
    assert max(want) < 0.9999 and max(want) - min(want) > 1e-3  # a test that can tell the videos apart
    metric = FrameConsistency(_encoder, lambda x: x, pairs=pairs)
    torch.testing.assert_close(
        metric.video_scores(videos), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    metric.update(videos[:2])
    metric.update(videos[2:])
    assert metric.count == 3
    assert metric.compute() == pytest.approx(sum(want) / 3, rel=1e-12)
    scaled = FrameConsistency(_encoder, lambda x: x, pairs=pairs, scale=100.0)
    scaled.update(videos)
    assert scaled.compute() == pytest.approx(100 * sum(want) / 3, rel=1e-12)
    record = metric.protocol()
    assert record["metric"] == "frame_consistency" and record["pairs"] == pairs and record["scale"] == 1.0
    metric.reset()
    with pytest.raises(OptionError, match=r"compute\(\) before any update"):
        metric.compute()


def test_consecutive_and_all_pairs_differ_when_frames_drift() -> None:
    """Frames that move steadily away from the first: consecutive pairs are closer than the average pair."""
    g = torch.Generator().manual_seed(1)
    start, end = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    ramp = torch.stack([start + (end - start) * t for t in torch.linspace(0, 1, 6)])[None]
    consecutive = FrameConsistency(_encoder, lambda x: x).video_scores(ramp)
    every = FrameConsistency(_encoder, lambda x: x, pairs="all").video_scores(ramp)
    assert float(consecutive) > float(every)


def test_from_clip_score_uses_the_clip_models_image_side() -> None:
    """Each frame's embedding from the raw ``get_image_features`` call on transformers 4's PIL preprocessing."""
    model, processor = tiny_clip.transformers_clip()
    clip = CLIPScore.from_transformers(model, processor)
    metric = FrameConsistency.from_clip_score(clip)
    videos = _videos(2, 3, seed=2)
    pixels = tiny_clip.shorter_side_crop_pixels(videos.flatten(0, 1), 32, offsets="floor")
    with torch.no_grad():
        emb = tiny_clip.embedding(model.get_image_features(pixel_values=pixels)).double().reshape(2, 3, -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    want = (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(-1)
    torch.testing.assert_close(metric.video_scores(videos), want, rtol=1e-5, atol=1e-6)
    assert metric.protocol()["backbone"] == clip.description


def test_bad_inputs_are_refused_with_clear_messages() -> None:
    metric = FrameConsistency(_encoder, lambda x: x)
    with pytest.raises(ShapeError, match=r"\(N, F, 3, H, W\)"):
        metric.update(torch.rand(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"3 \(RGB\) channels.*permute"):
        metric.update(torch.rand(1, 3, 4, 8, 8))
    with pytest.raises(ShapeError, match=r"at least 2 frames"):
        metric.update(torch.rand(2, 1, 3, 8, 8))
    with pytest.raises(OptionError, match=r"in \[0, 1\]"):
        metric.update(torch.rand(1, 2, 3, 8, 8) * 2 - 1)
    with pytest.raises(DTypeError, match="floating"):
        metric.update(torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DTypeError, match="`image_encoder` to be callable"):
        FrameConsistency("clip", lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="pairs"):
        FrameConsistency(_encoder, lambda x: x, pairs="adjacent")
    with pytest.raises(OptionError, match="scale"):
        FrameConsistency(_encoder, lambda x: x, scale=0.0)
    with pytest.raises(DTypeError, match="CLIPScore"):
        FrameConsistency.from_clip_score(object())
    with pytest.raises(ShapeError, match=r"returned embeddings \(4,\) for 4 frames"):
        FrameConsistency(lambda px: px.flatten(1).sum(1), lambda x: x).update(torch.rand(2, 2, 3, 4, 4))


def _worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    videos = _videos(5, 3, seed=4)
    metric = FrameConsistency(_encoder, lambda x: x)
    metric.update(videos[:3] if rank == 0 else videos[3:])  # uneven shards
    metric.all_reduce()
    torch.save({"value": metric.compute(), "count": metric.count}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_reduce_to_the_one_process_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reduced mean differs from one process's only by the float64 order of a 5-term sum of values <= 1."""
    # the forked processes import this module by name (they get this sys.path): the root holds `tests`
    monkeypatch.syspath_prepend(str(ROOT))

    preloaded_launch.start_workers(_worker, (str(tmp_path / "init"), str(tmp_path)), 2)
    one = FrameConsistency(_encoder, lambda x: x)
    one.update(_videos(5, 3, seed=4))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == 5
        assert got["value"] == pytest.approx(one.compute(), rel=1e-14)
