"""Prompt lists and caption folders read per optimisation step from a seeded generator (``StepData``, ``StepSource``)."""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import aspect_buckets, options, sdxl_encoding, sdxl_models
from .caption_folders import ImageCaptionFolder, VideoCaptionFolder


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Non-empty lines of a text file."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"Expected at least one prompt in {path}, but it has none.")
    return prompts


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
            buckets = getattr(args, "aspect_buckets", None)
            self.images = ImageCaptionFolder(args.train_data_dir, args.resolution, buckets)
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
            idx = aspect_buckets.draw_grouped(self.images.groups, self.batch_size, generator)  # a bucket's
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
        """The pixels the consumer needs: one ``(3, R, R)`` tensor (with ``--aspect_buckets`` ``(3, H, W)`` of the image's
        size; videos ``(3, F, R, W)``) per index, ``None`` where the VAE
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


PROMPT_DRAW = "permutations"
"""How :func:`covering_prompts` assigns prompts to synthetic samples (recorded in the shards' settings, so shards drawn
by the former rule -- independent uniform draws, which leave about 1/e of a list unused -- are refused)."""


def covering_prompts(prompts: Sequence[str], first: int, count: int, seed: int) -> list[str]:
    """The prompts of the synthetic samples ``first .. first + count - 1`` of a run (teacher samples, teacher pairs):
    sample ``g`` takes the prompt at position ``g mod N`` of epoch ``g // N``'s permutation of the ``N`` prompts
    (drawn from ``step_generator(seed, epoch, micro=98)``). Our choice: every prompt is used once per ``N`` samples,
    in a fresh order each epoch; independent draws with replacement leave about 37 % of a list unused at ``N``
    samples. A shard's prompts depend only on its sample indices and ``seed``, so shards can be made in any order,
    by any process."""
    n = len(prompts)
    orders: dict[int, list[int]] = {}
    picked = []
    for g in range(first, first + count):
        epoch = g // n
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=step_generator(seed, epoch, micro=98)).tolist()
        picked.append(prompts[orders[epoch][g % n]])
    return picked


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
