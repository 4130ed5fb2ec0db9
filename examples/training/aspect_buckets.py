"""Multi-aspect-ratio buckets (``--aspect_buckets``): their sizes, batches drawn within one bucket, each one's schedule."""

# LADD (Sauer et al. 2024, arXiv:2403.12015, SD3-Turbo) trains at several aspect ratios; SDXL itself was trained on
# aspect buckets (Podell et al. 2023, arXiv:2307.01952, Sec. 2.3), which SSD-1B's fine-tuning lacks (reference/methods.md).
# ``--aspect_buckets`` lists sizes ``HxW`` (px): the teacher samples are made at them (``training.flow_teacher_samples``:
# shard ``i`` at bucket ``i mod K``), or each image of ``--train_data_dir`` is cropped to the bucket nearest its aspect
# ratio (:func:`nearest_bucket`; ``training.caption_folders.ImageCaptionFolder``). A batch holds samples of one bucket
# (:func:`draw_grouped`: a bucket drawn with probability proportional to its samples, then samples uniformly within
# it, so each sample is drawn as often as without buckets), and FLUX's / Qwen-Image's dynamic shift follows each
# bucket's token count (:class:`BucketSchedules`); :class:`BucketSizes` finds a batch's bucket from its latents.

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_SIZE = re.compile(r"(\d+)x(\d+)")


def parse_size(text: str) -> tuple[int, int]:
    """``"832x1216"`` -> ``(832, 1216)`` (height, width in px): the ``argparse`` type of ``--aspect_buckets``."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a size HEIGHTxWIDTH in px with positive sides, e.g. 832x1216, but got {text!r}"
        )
    return int(match[1]), int(match[2])


def add_args(group: Any) -> None:
    """``--aspect_buckets HxW [HxW ...]`` (default: one size, ``--resolution`` x ``--width``)."""
    group.add_argument(
        "--aspect_buckets",
        type=parse_size,
        nargs="+",
        default=None,
        metavar="HxW",
        help="multi-aspect training: sizes (height x width, px), each batch within one of them; teacher samples "
        "(LADD, prompt-only KD) are made at them, shard i at the (i mod K)-th, and prompt-only DMD2 / TSCD draw one per "
        "micro-batch; --train_data_dir images are each cropped to the size nearest their aspect ratio (e.g. "
        "1024x1024 1152x896 896x1152 1216x832 832x1216 1344x768 768x1344); default one size, --resolution (x "
        "--width where the script has it; images: square). Validation samples at --resolution",
    )


def sizes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The buckets' ``(height, width)`` in px: ``--aspect_buckets``, else ``[(--resolution, --width or
    --resolution)]``."""
    if getattr(args, "aspect_buckets", None):
        return [tuple(s) for s in args.aspect_buckets]  # type: ignore[misc]
    return [(args.resolution, getattr(args, "width", None) or args.resolution)]


def check_sizes(
    args: argparse.Namespace, step: int, why: str = "the VAE's factor times the transformer's 2x2 patches"
) -> None:
    """Each ``--aspect_buckets`` side a multiple of ``step`` (``why``: the VAE factor times the patch size; SDXL's
    VAE factor alone) and no size listed twice; ``ValueError`` with the fix."""
    buckets = getattr(args, "aspect_buckets", None) or []
    for h, w in buckets:
        if h % step or w % step:
            raise ValueError(
                f"Expected each --aspect_buckets size to have sides that are multiples of {step} ({why}), but got "
                f"{h}x{w}: round it, e.g. to "
                f"{max(step, h // step * step)}x{max(step, w // step * step)}."
            )
    repeated = sorted({f"{h}x{w}" for h, w in buckets if buckets.count((h, w)) > 1})
    if repeated:
        raise ValueError(
            f"Expected distinct --aspect_buckets sizes, but {', '.join(repeated)} is listed more than once (a "
            "bucket's share of the samples is its share of the shards: list each size once)."
        )


def shard_size(args: argparse.Namespace, index: int) -> tuple[int, int]:
    """The ``(height, width)`` px of teacher-sample shard ``index``: bucket ``index mod K``."""
    buckets = sizes(args)
    return buckets[index % len(buckets)]


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest ``width / height`` in log scale (a 2:1 image is as far
    from 1:1 as from 4:1); ties go to the first listed."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - aspect))


def draw_grouped(groups: Sequence[Sequence[int]], batch_size: int, generator: torch.Generator) -> list[int]:
    """``batch_size`` items of one group: with one group, ``batch_size`` uniform draws (with replacement) of its
    items; with several, a group drawn with probability proportional to its size, then ``batch_size`` uniform
    draws within it. Every item is drawn with probability ``1 / total`` per draw either way."""
    if len(groups) == 1:
        items = groups[0]
    else:
        counts = torch.tensor([len(g) for g in groups], dtype=torch.float64)
        items = groups[int(torch.multinomial(counts, 1, generator=generator))]
    return [items[k] for k in torch.randint(len(items), (batch_size,), generator=generator).tolist()]


class BucketSizes:
    """The run's sizes (:func:`sizes`: ``--aspect_buckets``, else ``--resolution`` x ``--width``) and the latent
    shape of each: a batch's bucket from its latents, or a bucket drawn for a prompt-only micro-batch."""

    def __init__(self, parts: Any, args: argparse.Namespace) -> None:
        from . import flow_models

        self.sizes = sizes(args)
        self.by_shape: dict[tuple[int, ...], tuple[int, int]] = {}
        for h, w in self.sizes:
            shape = flow_models.latent_shape(parts, 1, h, getattr(args, "num_frames", None), w)[2:]
            self.by_shape[tuple(shape)] = (h, w)

    def of(self, latents: torch.Tensor) -> tuple[int, int]:
        """The size ``(height, width)`` in px of ``latents`` ``(B, C, [f,] h, w)`` (``ValueError`` for another shape)."""
        shape = tuple(latents.shape[2:])
        if shape not in self.by_shape:
            raise ValueError(
                f"Expected latents of one of the buckets' shapes {sorted(self.by_shape)}, but got {shape}: the "
                "teacher samples or images were made at other sizes than --aspect_buckets (or --resolution) lists."
            )
        return self.by_shape[shape]

    def draw(self, generator: torch.Generator) -> tuple[int, int]:
        """A size drawn uniformly over the buckets (no draw with one size): a prompt-only micro-batch's. Each process
        draws its own (the gradients are reduced), from its own generator."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]


class BucketSchedules:
    """The training schedule of each bucket (:func:`training.flow_models.flow_schedule` at its size: FLUX's and
    Qwen-Image's ``mu`` of its token count), looked up by a batch's latent shape (:class:`BucketSizes`);
    ``kwargs`` go to ``flow_schedule``."""

    def __init__(self, parts: Any, args: argparse.Namespace, **kwargs: Any) -> None:
        from . import flow_models

        self.buckets = BucketSizes(parts, args)
        self.by_size = {
            (h, w): flow_models.flow_schedule(parts, h, width=w, **kwargs) for h, w in self.buckets.sizes
        }

    def __call__(self, latents: torch.Tensor) -> Any:
        """The schedule of the bucket of ``latents`` ``(B, C, [f,] h, w)`` (``ValueError`` for another shape)."""
        return self.by_size[self.buckets.of(latents)]


GRIDS_FILE = "student_sigmas_by_size.json"
"""With ``--aspect_buckets``, flow_dmd2's and flow_tscd's student grid at each trained size, ``{"HxW": [sigmas]}``
(FLUX / Qwen-Image: each shifted with the ``mu`` of its token count): ``evaluate.py --sigmas`` for a size other
than ``--resolution`` x ``--width``, whose grid the run's own grid file holds."""


def write_grids(folder: str | Path, grids: dict[tuple[int, int], Sequence[float]]) -> Path:
    """Write ``folder/``:data:`GRIDS_FILE` from ``{(height, width): sigmas}``; returns the file."""
    path = Path(folder) / GRIDS_FILE
    by_size = {f"{h}x{w}": [float(s) for s in sigmas] for (h, w), sigmas in grids.items()}
    path.write_text(json.dumps(by_size, indent=1) + "\n", encoding="utf-8")
    return path
