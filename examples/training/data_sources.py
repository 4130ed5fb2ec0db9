"""Prompt lists, image- and (Wan) video-caption folders, read per optimisation step from a seeded generator."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import options, sdxl_encoding, sdxl_models

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: video files read with imageio's ffmpeg plugin (optional; a clip can always be a folder of frames).
VIDEO_SUFFIXES = (".mp4",)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Non-empty lines of a text file."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"Expected at least one prompt in {path}, but it has none.")
    return prompts


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images of a folder (recursive) with their captions: ``a.png`` + ``a.txt`` (missing caption: ``""``).

    Items are ``(pixels (3, R, R) in [-1, 1], caption)``: shorter side resized to ``R``, centre-cropped.
    """

    def __init__(self, root: str | os.PathLike[str], resolution: int) -> None:
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"Expected images ({', '.join(IMAGE_SUFFIXES)}) under {root}, but found none.")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        txt = self.files[index].with_suffix(".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else ""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return crop_pixels(img, self.resolution, self.resolution), self.caption(index)

    def cache_key(self, index: int) -> str:
        """What the cached VAE posterior of item ``index`` depends on: the file (path, size, modification time: an
        edited image is encoded again) and the crop size."""
        path = self.files[index].resolve()
        stat = path.stat()
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{self.resolution}"


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


def _name_order(path: Path) -> list[Any]:
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
                    (p for p in clip.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_name_order
                )
                self._check_length(clip, len(frames))
                self._frames[clip] = frames[:num_frames]

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


class StepSource:
    """Base of the per-step data sources: ``draw(generator) -> (indices, texts)`` picks a batch with the
    step's generator, ``load(indices) -> items`` reads it; :meth:`fetch` does both.

    With ``num_workers > 0``, :meth:`start` (called by :func:`train_loop`) opens a ``DataLoader`` whose item
    ``k`` is micro-step ``k`` (from the resume step on): a worker draws the same indices from a copy of that
    micro-step's :func:`step_generator` and loads them ahead of time. The main process still draws the
    indices from its generator (so every later draw of the step is unchanged) and checks that the
    prefetched item matches: runs with and without workers compute the same steps.
    """

    num_workers: int = 0
    #: optimisation steps >= this one use only the texts: nothing is loaded for them (in workers either).
    load_until_step: int | None = None
    _prefetched: Any = None

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
        raise NotImplementedError

    def load(self, idx: Sequence[int]) -> list[Any]:
        raise NotImplementedError

    def start(
        self, first_step: int, max_steps: int, *, seed: int, process_index: int, accumulation: int
    ) -> None:
        """Open the prefetching loader at micro-step ``first_step * accumulation`` (no-op without workers)."""
        self.close()
        if self.num_workers == 0:
            return
        items = _PrefetchedSteps(self, seed, process_index, accumulation)
        loader = torch.utils.data.DataLoader(
            items,
            batch_size=None,
            sampler=range(first_step * accumulation, max_steps * accumulation),
            num_workers=self.num_workers,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(
                step_generator(seed, first_step, process_index).initial_seed()
            ),
        )
        self._prefetched = iter(loader)

    def close(self) -> None:
        """Shut the prefetching workers down."""
        self._prefetched = None

    def fetch(
        self, generator: torch.Generator, *, load: bool = True
    ) -> tuple[list[int], list[str], list[Any]]:
        """``(indices, texts, loaded items)`` of the batch ``generator`` draws (prefetched with workers).

        ``load=False``: the items are ``None`` and nothing is loaded (a prefetched item is still consumed,
        so the loader stays in step)."""
        idx, texts = self.draw(generator)
        if self._prefetched is None:
            return idx, texts, self.load(idx) if load else [None] * len(idx)
        item = next(self._prefetched)
        if item["idx"] != idx:
            raise RuntimeError(
                f"The data loader is out of step: it prefetched indices {item['idx']} but the step drew {idx}. "
                f"Call {type(self).__name__}.start with the step training resumes at, and draw one batch per "
                "micro-step."
            )
        if not load:
            return idx, texts, [None] * len(idx)
        return idx, texts, self.load(idx) if item["items"] is None else item["items"]


class StepData(StepSource):
    """Per-step batches drawn by index from a prompt list or an image-caption folder (for a video model, i.e.
    ``args.num_frames`` set, which only Wan's scripts fill: a :class:`VideoCaptionFolder`).

    ``batch(generator)`` returns ``(pixels or None, prompts)`` and ``latents_batch(generator, vae,
    device)`` returns ``(x0 latents, prompts)``, for ``batch_size`` indices drawn with the step's
    generator, so the data order is a function of the step (exact resume, no sampler state).

    With ``--dataloader_num_workers N > 0`` the images (clips) are loaded (decoded, resized, cropped) ahead of
    time in N worker processes (:class:`StepSource`). Clips follow every rule of images (draws, seeding, workers,
    ``--cache_dir``); they are cropped to ``--resolution`` x ``--width`` (default square).
    """

    def __init__(self, args: argparse.Namespace, *, need_images: bool) -> None:
        self.batch_size = args.train_batch_size
        self.cache_dir: str | None = getattr(args, "cache_dir", None)
        self._vae_tag = sdxl_models.model_cache_tag(args, vae=True) if self.cache_dir is not None else ""
        self.num_workers: int = getattr(args, "dataloader_num_workers", 0)
        self.need_images = need_images
        self.images: ImageCaptionFolder | VideoCaptionFolder | None = None
        self.prompts: list[str] | None = None
        options.check_data_sources(args, image_method=need_images)
        frames = getattr(
            args, "num_frames", None
        )  # filled for video models only (flow_options.check_num_frames)
        if args.train_data_dir and frames is not None:
            width = getattr(args, "width", None)
            self.images = VideoCaptionFolder(args.train_data_dir, frames, args.resolution, width)
        elif args.train_data_dir:
            self.images = ImageCaptionFolder(args.train_data_dir, args.resolution)
        elif need_images:
            raise ValueError(
                "This method trains on images: pass --train_data_dir (images with .txt captions)."
            )
        if args.prompts_file:
            self.prompts = read_prompts(args.prompts_file)
        if self.images is None and self.prompts is None:
            raise ValueError(
                "Pass --prompts_file (one prompt a line) or --train_data_dir (image-caption folder)."
            )

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
        """``(indices, prompts)`` of one batch: image indices (or prompt indices without images)."""
        if self.images is not None:
            idx = torch.randint(len(self.images), (self.batch_size,), generator=generator).tolist()
            captions = [self.images.caption(i) for i in idx]
            if self.prompts is not None:  # prompt-only methods: a prompt list overrides the captions
                pidx = torch.randint(len(self.prompts), (self.batch_size,), generator=generator).tolist()
                captions = [self.prompts[i] for i in pidx]
            return idx, captions
        assert self.prompts is not None
        idx = torch.randint(len(self.prompts), (self.batch_size,), generator=generator).tolist()
        return idx, [self.prompts[i] for i in idx]

    def _latent_cache(self, index: int) -> Path:
        assert self.cache_dir is not None and self.images is not None
        key = f"{self._vae_tag}|{self.images.cache_key(index)}"  # an edited image or clip is encoded again
        return sdxl_encoding.cache_file(self.cache_dir, "latents", key)

    def load(self, idx: Sequence[int]) -> list[torch.Tensor | None]:
        """The pixels the consumer needs: one ``(3, R, R)`` tensor (videos ``(3, F, R, W)``) per index, ``None`` where the VAE
        posterior is already cached (or where no pixels are used: prompt-only methods)."""
        if self.images is None or not self.need_images:
            return [None] * len(idx)
        return [
            None if self.cache_dir is not None and self._latent_cache(i).exists() else self.images[i][0]
            for i in idx
        ]

    def latents_batch(
        self, generator: torch.Generator, vae: Any, device: Any
    ) -> tuple[torch.Tensor, list[str]]:
        """``(x0 latents (B, C, h, w) float32 on device, prompts)`` of an image batch (videos: ``(B, C, f, h, w)``,
        :func:`training.sdxl_encoding.encode_videos`).

        With ``--cache_dir`` the VAE posterior of each image is computed once and stored
        (``cache_dir/latents``), and every run (the first included) reads the stored values, so runs that
        share a cache see bitwise-equal latents; the posterior sample is drawn from ``generator`` either
        way. (Cached and uncached runs differ by float rounding: batched vs single-image VAE calls.)
        """
        from safetensors.torch import load_file

        if self.images is None:
            raise ValueError(
                "This method trains on images: pass --train_data_dir (images with .txt captions)."
            )
        idx, captions, pixels = self.fetch(generator)
        if self.cache_dir is None:
            batch = torch.stack([p for p in pixels if p is not None])
            encode = sdxl_encoding.encode_videos if batch.ndim == 5 else sdxl_encoding.encode_images
            return encode(vae, batch, generator).to(device, torch.float32), captions
        stats = []
        for i, px in zip(idx, pixels):
            path = self._latent_cache(i)
            if not path.exists():
                m, s = sdxl_encoding.posterior(vae, (px if px is not None else self.images[i][0])[None])
                sdxl_encoding.save_atomic({"mean": m[0], "std": s[0]}, path)
            stats.append(load_file(str(path)))
        mean = torch.stack([d["mean"] for d in stats]).to(vae.device)
        std = torch.stack([d["std"] for d in stats]).to(vae.device)
        return sdxl_encoding.sample_posterior(vae, mean, std, generator).to(device, torch.float32), captions

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor | None, list[str]]:
        """``(pixels or None, prompts)``: pixels ``(B, 3, R, R)`` (videos ``(B, 3, F, R, W)``) only for image
        methods (``need_images``)."""
        _, captions, pixels = self.fetch(generator)
        if any(p is None for p in pixels):
            return None, captions
        return torch.stack([p for p in pixels if p is not None]), captions

    def prompts_batch(self, generator: torch.Generator) -> list[str]:
        """The prompts of the batch ``generator`` draws, without loading (decoding) its images."""
        return self.fetch(generator, load=False)[1]


class _PrefetchedSteps(torch.utils.data.Dataset):
    """Item ``k``: the indices and loaded items of micro-step ``k`` (step ``k // accumulation``) of one
    process."""

    def __init__(self, data: StepSource, seed: int, process_index: int, accumulation: int) -> None:
        self.data, self.seed, self.process_index, self.accumulation = data, seed, process_index, accumulation

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = divmod(k, self.accumulation)
        idx, _ = self.data.draw(step_generator(self.seed, step, self.process_index, micro))
        until = self.data.load_until_step
        return {"idx": idx, "items": self.data.load(idx) if until is None or step < until else None}


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's generators in a loader worker from its torch seed (set by the DataLoader)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the global state that third-party code in the worker uses


def step_generator(seed: int, step: int, process_index: int = 0, micro: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, step, process, micro-batch)``: the randomness of one micro-step.

    The seed is a 63-bit BLAKE2b hash of the four integers written out in full, so distinct tuples give
    distinct streams (a linear mix such as ``((seed * a + step) * b + process) * c + micro`` maps
    ``process + 1`` and ``micro + c`` to one seed); the hash has no per-interpreter salt, so every process
    and every run derives the same seed from the same tuple.
    """
    text = f"diffdistill.step_generator:{int(seed)}:{int(step)}:{int(process_index)}:{int(micro)}"
    digest = hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
