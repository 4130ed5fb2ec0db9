"""Image- and (Wan) video-caption folders: files, captions, crops to the training size (aspect buckets), cache keys."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from . import aspect_buckets

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: video files read with imageio's ffmpeg plugin (optional; a clip can always be a folder of frames).
VIDEO_SUFFIXES = (".mp4",)


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images of a folder (recursive) with their captions: ``a.png`` + ``a.txt`` (missing caption: ``""``).

    Items are ``(pixels (3, R, R) in [-1, 1], caption)``: shorter side resized to ``R``, centre-cropped. With
    ``buckets`` (``--aspect_buckets``: ``(height, width)`` sizes) each image is cropped to the bucket nearest its
    aspect ratio instead (:func:`training.aspect_buckets.nearest_bucket`, read from the file's header once), and
    :attr:`groups` lists the images of each bucket (a batch is drawn within one).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int,
        buckets: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"Expected images ({', '.join(IMAGE_SUFFIXES)}) under {root}, but found none.")
        self.resolution = resolution
        self.buckets = list(buckets) if buckets else None
        self.bucket_of = [0] * len(self.files)
        if self.buckets:
            aspects = [Fraction(w, h) for h, w in self.buckets]
            same = [f"{h}x{w}" for (h, w), a in zip(self.buckets, aspects) if aspects.count(a) > 1]
            if same:
                raise ValueError(
                    f"Expected --aspect_buckets of distinct aspect ratios for --train_data_dir images (each image goes "
                    f"to the size nearest its aspect ratio), but {', '.join(same)} share one: every image would go to "
                    "the first of them. Keep one size per aspect ratio."
                )
            from PIL import Image

            for i, path in enumerate(self.files):
                with Image.open(path) as img:  # the header only: no pixels decoded
                    self.bucket_of[i] = aspect_buckets.nearest_bucket(img.height, img.width, self.buckets)
        members: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            members.setdefault(b, []).append(i)
        #: the image indices of each bucket that holds any, in bucket order (one group without buckets)
        self.groups = [members[b] for b in sorted(members)]

    def size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` px that image ``index`` is cropped to: its bucket, else ``(R, R)``."""
        return self.buckets[self.bucket_of[index]] if self.buckets else (self.resolution, self.resolution)

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        txt = self.files[index].with_suffix(".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else ""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return crop_pixels(img, *self.size(index)), self.caption(index)

    def cache_key(self, index: int) -> str:
        """What the cached VAE posterior of item ``index`` depends on: the file (path, size, modification time: an
        edited image is encoded again) and the crop size (``R``, or ``HxW`` with buckets)."""
        path = self.files[index].resolve()
        stat = path.stat()
        h, w = self.size(index)
        crop = f"{h}x{w}" if self.buckets else str(self.resolution)  # square keys as before buckets existed
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{crop}"


def crop_pixels(img: Any, height: int, width: int) -> torch.Tensor:
    """A PIL image as ``(3, height, width)`` float32 pixels in [-1, 1]: resized (bicubic) by the smallest factor that
    covers ``height x width``, then centre-cropped (the square image crops: ``height == width``)."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)  # = R / min(size) for a square crop
    img = img.resize(
        (max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.BICUBIC
    )
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def frame_order(path: Path) -> list[Any]:
    """Sort key of frame files: names with their digit runs compared as numbers (``2.png`` before ``10.png``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _import_imageio() -> Any:
    """``imageio.v2`` with its ffmpeg plugin, or an ``ImportError`` that says what to install."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 - the plugin imageio's "FFMPEG" format needs
    except ImportError as err:
        raise ImportError(
            f"Reading video files ({', '.join(VIDEO_SUFFIXES)}) in --train_data_dir needs imageio with its ffmpeg "
            "plugin, which is not installed: pip install imageio imageio-ffmpeg, or write each clip as a folder of "
            "frames (clip/000.png, clip/001.png, ... with its caption in clip.txt)."
        ) from err
    return imageio


def find_clips(root: str | os.PathLike[str]) -> list[Path]:
    """The clips of a video-caption folder (recursive), in path order: every folder that holds frames
    (:data:`IMAGE_SUFFIXES`) and every video file (:data:`VIDEO_SUFFIXES`, which need imageio).

    Raises ``ValueError`` for images directly in ``root`` (an image folder, not clips) or no clip at all, and
    ``ImportError`` for video files without imageio's ffmpeg plugin."""
    root = Path(root)
    found = list(root.rglob("*"))
    loose = sorted(p.name for p in found if p.parent == root and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise ValueError(
            f"Expected --train_data_dir {root} to hold video clips for a video model (Wan), but it holds images "
            f"directly ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}): put each clip's frames in a "
            "folder of their own (clip/000.png, clip/001.png, ... in name order) with the caption in clip.txt beside "
            "the folder, or .mp4 files with same-name .txt captions."
        )
    folders = {p.parent for p in found if p.suffix.lower() in IMAGE_SUFFIXES}
    videos = {p for p in found if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()}
    if not folders and not videos:
        raise ValueError(
            f"Expected --train_data_dir {root} to hold video clips (folders of frames, or "
            f"{', '.join(VIDEO_SUFFIXES)} files), but found none."
        )
    if videos:
        _import_imageio()
    return sorted(folders | videos)


class VideoCaptionFolder(torch.utils.data.Dataset):
    """Video clips of a folder (recursive) with their captions, for a video model (Wan).

    A clip is a folder of frames (``clip/000.png``, ``clip/001.png``, ... any of :data:`IMAGE_SUFFIXES`, in name
    order with digit runs compared as numbers) with its caption in ``clip.txt`` beside the folder (as an image's
    ``a.txt`` beside ``a.png``), or a video file ``clip.mp4`` with ``clip.txt`` (read with imageio's ffmpeg plugin,
    imported only then). A missing caption is ``""``, as for images.

    Items are ``(pixels (3, num_frames, height, width) in [-1, 1], caption)``: the clip's first ``num_frames``
    frames (our choice: a clip is one fixed sample, so its VAE posterior can be cached per clip (``--cache_dir``)
    and prefetching workers need only the drawn indices; cut a long video into several clips to train on all of
    it), each resized and centre-cropped as the image reader does (:func:`crop_pixels`). A clip with fewer
    frames is refused with its name (``ValueError``; our choice: a silently skipped clip would change what the data
    is): frame folders when the dataset is built, video files when read. ``height`` / ``width`` (default ``height``):
    ``--resolution`` / ``--width``.
    """

    def __init__(
        self, root: str | os.PathLike[str], num_frames: int, height: int, width: int | None = None
    ) -> None:
        self.files = find_clips(root)
        self.num_frames, self.height, self.width = num_frames, height, width or height
        self._frames: dict[Path, list[Path]] = {}
        for clip in self.files:
            if clip.is_dir():
                frames = sorted(
                    (p for p in clip.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=frame_order
                )
                self._check_length(clip, len(frames))
                self._frames[clip] = frames[:num_frames]
        self.groups = [list(range(len(self.files)))]  # one crop size: one group (no aspect buckets for clips)

    def _check_length(self, clip: Path, count: int) -> None:
        if count < self.num_frames:
            raise ValueError(
                f"Expected every clip of --train_data_dir to have at least --num_frames {self.num_frames} frames, "
                f"but {clip} has {count}: remove it or lower --num_frames (4k + 1)."
            )

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        clip = self.files[index]
        txt = clip.with_suffix(".txt") if clip.is_file() else clip.parent / f"{clip.name}.txt"
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else ""

    def frames(self, index: int) -> list[Any]:
        """The first ``num_frames`` frames of clip ``index`` as PIL images."""
        from PIL import Image

        clip = self.files[index]
        if clip in self._frames:  # convert() loads the pixels, which closes the file
            return [Image.open(path).convert("RGB") for path in self._frames[clip]]
        reader = _import_imageio().get_reader(str(clip), format="FFMPEG")
        try:
            out = [Image.fromarray(frame) for frame in itertools.islice(reader, self.num_frames)]
        finally:
            reader.close()
        self._check_length(clip, len(out))
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        pixels = [crop_pixels(img, self.height, self.width) for img in self.frames(index)]
        return torch.stack(pixels, dim=1), self.caption(index)

    def cache_key(self, index: int) -> str:
        """What the cached VAE posterior of clip ``index`` depends on: its frame files or video file (path, size,
        modification time each), the frame count and the crop size."""
        files = self._frames.get(self.files[index], [self.files[index]])
        stats = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return f"video|{'|'.join(stats)}|{self.num_frames}|{self.height}x{self.width}"
