"""Prompt files of the two COCO protocols distilled text-to-image models are measured on, built from the caption
annotations a user has downloaded (``annotations/captions_val2014.json`` of COCO 2014).

Usage::

    python examples/evaluation/coco_prompts.py --protocol coco2014-30k \\
        --annotations coco/annotations/captions_val2014.json --output_dir prompts/coco2014-30k \\
        [--published_prompts GigaGAN_t2i_coco256/captions.txt]
    python examples/evaluation/coco_prompts.py --protocol dmd2-coco10k \\
        --annotations coco/annotations/captions_val2014.json --output_dir prompts/dmd2-coco10k \\
        [--published_prompts coco10k/all_prompts.pkl]

writes ``prompts.txt`` (one prompt a line; prompt ``i`` is sampled with seed ``seed + i`` by
``examples/evaluate.py``) and ``selection.json`` (the protocol, the rule that was applied, the COCO image id,
file name and caption id of every prompt where the rule picked them, and the SHA-256 of the annotation file).

What each protocol's source publishes (read from the code and READMEs, 2026-12):

``coco2014-30k`` -- GigaGAN (Kang et al., CVPR 2023) and SiD-LSG (Zhou et al., ICLR 2025). Diffusion2GAN (Kang et
al., ECCV 2024) reports COCO-2014 FID-30k in one table with GigaGAN's number; we found no published
evaluation code for it, so that it used these captions is an assumption, not something we could read.
    * Prompts: the 30,000 captions of GigaGAN's ``captions.txt``, shipped inside the generated-image archive
      linked from ``mingukkang/GigaGAN/evaluation/README.md`` (``GigaGAN_t2i_coco256``); SiD-LSG's README asks
      for that file "to make an apple-to-apple comparison" (its ``generate_onestep.py``: "the default
      [prompts/captions.txt] consists of 30k COCO2014 prompts"). The rule that drew those captions from
      COCO-2014 val is NOT published in either repository (GigaGAN's ``data_util.EvalDataset`` takes
      ``captions[random.randint(0, 4)]`` of an image, unseeded, when it reads COCO itself). So: with
      ``--published_prompts captions.txt`` the file is used as published (non-empty stripped lines, as
      SiD-LSG's ``read_file_to_sentences``); without it, our choice (below).
    * Seeds: image ``i`` from seed ``i`` (SiD-LSG ``--seeds=0-29999``, one generator per image): ``--seed 0``.
      SiD-LSG's generators are CUDA ones and ours CPU ones (the same noise on every device), so the images are
      not bit-identical to SiD-LSG's; the seed convention is.
    * FID reference: ALL COCO-2014 val images (GigaGAN's ``compute_fid`` on the ``val2014`` folder, 40,504
      images), each centre-cropped to a square on its long edge and resized to 256 px with PIL's LANCZOS, the
      generated images likewise, then clean-fid: ``--eval_resolution 256``.
    * CLIP score: OpenAI CLIP ViT-B/32 (GigaGAN's default; open_clip ``ViT-B-32`` ``openai`` holds those weights)
      or open_clip ViT-g-14 ``laion2b_s12b_b42k`` (SiD-LSG's ``evaluate_SiD_t2i_coco256.sh``), the caption
      prefixed with ``"A photo depicts "``, on the 256 px images the FID sees. Not reproduced, each a small
      difference: GigaGAN's ``compute_clip_score`` runs ViT-B/32 through OpenAI's ``clip.load``, which keeps
      float16 weights on a GPU (ours: float32); and it takes its images through ``ToTensor`` / ``Normalize`` and
      back with a truncating ``.to(torch.uint8)`` (``tensor2pil``), which lowers 63 of the 256 intensity levels
      by one (float32 round-off), where we read the PNG's own values.

``dmd2-coco10k`` -- DMD2 (Yin et al., NeurIPS 2024), its SDXL results (``experiments/sdxl/README.md``).
    * Prompts: ``coco10k/all_prompts.pkl`` (a pickled list of 10,000 caption strings) with its reference images
      ``coco10k/subset``, both from the ``coco10k.zip`` that DMD2's ``scripts/download_sdxl.sh`` downloads from
      its Hugging Face repository. The rule that chose the 10k captions and images is NOT published in the
      repository. ``--published_prompts all_prompts.pkl`` reads that file (a restricted unpickler: lists and
      strings only, nothing is executed); without it, our choice (below). DMD2's ``SDTextDataset`` samples a
      ``None`` entry as the empty prompt ``""``; ``prompts.txt`` holds one non-empty prompt a line and cannot
      keep such an entry in place, so a file holding one is refused rather than shifted.
    * Seeds: DMD2's ``test_folder_sdxl.py`` draws the noise of batch ``b`` (``--eval_batch_size`` 4) from
      ``torch.Generator().manual_seed(b)`` -- per batch, not per image (its ``--seed 10`` only seeds the global
      generators); we draw per image (``seed + i``), so the images are not DMD2's own (the same distribution:
      FID agrees up to its sampling noise).
    * Quantisation: DMD2 turns its images into uint8 by truncation (``(x * 255).to(torch.uint8)`` after the
      pipelines' ``output_type="np"``, ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`` after its own
      sampler); we round by default, as diffusers' ``numpy_to_pil`` and SiD-LSG's ``x * 127.5 + 128`` then
      truncation do. Truncation darkens every image by half a level on average; ``examples/evaluate.py
      --quantization truncate`` reproduces it (recorded as ``preprocessing.quantization``, so such runs are
      compared only with each other).
    * FID: ``--eval_res 512`` against ``coco10k/subset`` (centre crop on the long edge, LANCZOS, clean-fid;
      their ``coco_evaluator.compute_fid``): ``--eval_resolution 512``, ``--reference_dir coco10k/subset``.
    * CLIP score: open_clip ViT-g-14 ``laion2b_s12b_b42k`` with the ``"A photo depicts "`` prefix, on the images
      centre-cropped and LANCZOS-resized to 256 first (``compute_clip_score(clip_model="ViT-G/14")``'s
      ``resize_and_center_crop(..., resize_size=256)``): ``--clip_eval_resolution 256``.

Our choice where the selection rule is not published: one caption per image for ``count`` DISTINCT images of
the annotation file (30,000 or 10,000), the images drawn without replacement and each image's caption drawn
uniformly among all its captions, both with ``numpy.random.default_rng(--selection_seed)`` (default 0, our
choice) over the images sorted by id and each image's captions sorted by caption id; the prompts are written in
drawing order. ``selection.json`` lists the drawn image files, and ``--link_reference_images COCO/val2014``
links them into ``OUTPUT_DIR/reference/`` (``dmd2-coco10k``'s reference subset; ``coco2014-30k`` takes all of
val2014). Numbers from such a file are comparable with each other, not with the papers' tables.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffdistill.metrics.protocol import file_sha256


@dataclass(frozen=True)
class CocoProtocol:
    """What a COCO protocol fixes, as its source publishes it (see the module docstring for the sources).

    Attributes:
        name: the protocol's name on the command line.
        count: number of prompts.
        split: the COCO annotation split the captions come from.
        seed: the base seed (prompt ``i`` uses ``seed + i``).
        eval_resolution: the side images are centre-cropped and LANCZOS-resized to before the FID.
        clip_eval_resolution: the same for the CLIP score.
        reference: what the FID is measured against.
        clip: the CLIP backbones the source reports, in ``examples/evaluate.py --clip`` syntax.
        clip_prefix: the text put before every caption for the CLIP score.
        published_prompts: the prompt file the source distributes.
        rule_published: whether the source publishes how its prompts were drawn from COCO.
    """

    name: str
    count: int
    split: str
    seed: int
    eval_resolution: int
    clip_eval_resolution: int
    reference: str
    clip: tuple[str, ...]
    clip_prefix: str
    published_prompts: str
    rule_published: bool


PROTOCOLS: dict[str, CocoProtocol] = {
    "coco2014-30k": CocoProtocol(
        name="coco2014-30k",
        count=30_000,
        split="val2014",
        seed=0,
        eval_resolution=256,
        clip_eval_resolution=256,
        reference="all COCO-2014 val images (val2014/, 40,504), centre-cropped and LANCZOS-resized to 256",
        clip=("open_clip:ViT-B-32:openai", "open_clip:ViT-g-14:laion2b_s12b_b42k"),
        clip_prefix="A photo depicts ",
        published_prompts="captions.txt of GigaGAN's GigaGAN_t2i_coco256 archive (used by SiD-LSG)",
        rule_published=False,
    ),
    "dmd2-coco10k": CocoProtocol(
        name="dmd2-coco10k",
        count=10_000,
        split="val2014",
        seed=0,
        eval_resolution=512,
        clip_eval_resolution=256,
        reference="DMD2's coco10k/subset images, centre-cropped and LANCZOS-resized to 512",
        clip=("open_clip:ViT-g-14:laion2b_s12b_b42k",),
        clip_prefix="A photo depicts ",
        published_prompts="coco10k/all_prompts.pkl of DMD2's coco10k.zip",
        rule_published=False,
    ),
}
"""The two protocols; :func:`build_prompt_file` writes their prompt files."""


@dataclass(frozen=True)
class Selection:
    """One drawn prompt: the COCO image it describes and the caption's annotation id."""

    image_id: int
    file_name: str
    caption_id: int
    caption: str


def clean_caption(text: str) -> str:
    """A caption on one line: every run of whitespace (newlines included) becomes one space, ends stripped."""
    return re.sub(r"\s+", " ", str(text)).strip()


def load_coco_captions(path: str | Path) -> dict[int, tuple[str, list[tuple[int, str]]]]:
    """``{image_id: (file_name, [(caption_id, caption), ...])}`` of a COCO captions file, captions sorted by id.

    Args:
        path: a COCO caption annotation file (``captions_val2014.json``: ``images`` with ``id`` / ``file_name``,
            ``annotations`` with ``image_id`` / ``id`` / ``caption``).

    Returns:
        Each image that has at least one non-empty caption, with its file name and its cleaned captions.

    Raises:
        ValueError: if the file lacks the ``images`` / ``annotations`` lists or a caption names an unknown image.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"Expected {path} to be a COCO caption annotation file (a JSON object with 'images' and "
            "'annotations' lists, e.g. annotations/captions_val2014.json), but it has no 'annotations' list."
        )
    files = {int(img["id"]): str(img.get("file_name", "")) for img in data.get("images", [])}
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        image_id = int(ann["image_id"])
        if files and image_id not in files:
            raise ValueError(
                f"Expected every caption of {path} to name an image of its 'images' list, but caption "
                f"{ann.get('id')} names image {image_id}. Use the annotation file as COCO distributes it."
            )
        caption = clean_caption(ann["caption"])
        if caption:
            by_image.setdefault(image_id, []).append((int(ann["id"]), caption))
    return {i: (files.get(i, ""), sorted(caps)) for i, caps in by_image.items()}


def select_one_caption_per_image(
    captions: dict[int, tuple[str, list[tuple[int, str]]]], count: int, seed: int = 0
) -> list[Selection]:
    """Our selection rule (where a protocol publishes none): ``count`` distinct images, one caption each.

    The images (sorted by id) are drawn without replacement, then each drawn image's caption uniformly among its
    captions (sorted by caption id), all from ``numpy.random.default_rng(seed)``; returned in drawing order.

    Args:
        captions: :func:`load_coco_captions`'s mapping.
        count: how many prompts (distinct images).
        seed: the selection seed.

    Returns:
        ``count`` selections.

    Raises:
        ValueError: if ``count`` is not positive or the file has fewer than ``count`` captioned images.

    Example:
        >>> caps = {7: ("a.jpg", [(1, "a cat"), (2, "a kitten")]), 9: ("b.jpg", [(3, "a dog")])}
        >>> sorted(s.image_id for s in select_one_caption_per_image(caps, 2))
        [7, 9]
    """
    if int(count) < 1:
        raise ValueError(f"Expected count to be a positive number of prompts, but got {count}.")
    if len(captions) < count:
        raise ValueError(
            f"Expected at least {count} captioned images to draw {count} distinct ones, but the annotation file "
            f"has {len(captions)}. Pass the full captions_val2014.json, or a smaller --count."
        )
    rng = np.random.default_rng(int(seed))
    ids = sorted(captions)
    drawn = rng.choice(len(ids), size=int(count), replace=False)
    out = []
    for k in drawn:
        image_id = ids[int(k)]
        file_name, caps = captions[image_id]
        caption_id, caption = caps[int(rng.integers(len(caps)))]
        out.append(Selection(image_id, file_name, caption_id, caption))
    return out


class _ListsAndStrings(pickle.Unpickler):
    """An unpickler that builds lists, tuples, strings and None only: a published prompt list, no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"Expected a pickled list of caption strings, but the file references {module}.{name}; refusing "
            "to load it (no code from a prompt file is run)."
        )


def read_published_prompts(path: str | Path) -> list[str]:
    """The prompts of a protocol's published file: a text file (one a line; empty lines dropped, lines stripped,
    as SiD-LSG's ``read_file_to_sentences`` reads GigaGAN's ``captions.txt``) or DMD2's pickled list of strings.
    A pickle entry that is ``None`` or blank is refused: DMD2's ``SDTextDataset`` samples it as the prompt ``""``
    at its index, which ``prompts.txt`` (non-empty lines) cannot hold, and dropping it would shift every later
    prompt onto another seed and reference.

    Args:
        path: ``.txt`` or ``.pkl`` file.

    Returns:
        The prompts, each on one line.

    Raises:
        ValueError: if a pickle holds something other than a list of strings, a ``None`` or blank entry, or the
            file has no prompt.
    """
    p = Path(path)
    if p.suffix == ".pkl":
        with p.open("rb") as fh:
            loaded = _ListsAndStrings(fh).load()
        if not isinstance(loaded, (list, tuple)) or not all(x is None or isinstance(x, str) for x in loaded):
            raise ValueError(
                f"Expected {path} to hold a list of caption strings, but got {type(loaded).__name__}."
            )
        prompts = [clean_caption(x or "") for x in loaded]
        blank = [k for k, c in enumerate(prompts) if not c]
        if blank:
            raise ValueError(
                f"Expected every entry of {path} to be a caption, but {len(blank)} are None or blank (first: index "
                f"{blank[0]}). DMD2 samples them as the empty prompt at their index; prompts.txt cannot hold an "
                "empty line, and dropping them would move every later prompt to another seed."
            )
    else:
        prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in prompts if ln]
    if not prompts:
        raise ValueError(f"Expected {path} to hold at least one prompt, but it has none.")
    return prompts


def link_images(selection: Sequence[dict[str, Any]], image_dir: str | Path, folder: Path) -> Path:
    """Symbolic links ``folder/<file_name>`` to ``image_dir/<file_name>`` for each selected image; returns ``folder``.

    Raises:
        ValueError: if an image file is missing from ``image_dir``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for item in selection:
        source = Path(image_dir).resolve() / item["file_name"]
        if not source.is_file():
            raise ValueError(
                f"Expected {item['file_name']} (image {item['image_id']}) in {image_dir}, but it is not there. Pass "
                "the COCO image folder of the annotation file's split (val2014/)."
            )
        link = folder / item["file_name"]
        if not link.is_symlink():
            link.symlink_to(source)
    return folder


def build_prompt_file(
    protocol: str,
    output_dir: str | Path,
    *,
    annotations: str | Path | None = None,
    published_prompts: str | Path | None = None,
    count: int | None = None,
    selection_seed: int = 0,
    link_reference_images: str | Path | None = None,
) -> Path:
    """Write ``prompts.txt`` and ``selection.json`` of ``protocol`` into ``output_dir``; return ``prompts.txt``.

    Args:
        protocol: a key of :data:`PROTOCOLS`.
        output_dir: the folder to write (created).
        annotations: ``captions_val2014.json`` (needed without ``published_prompts``).
        published_prompts: the protocol's own prompt file (used as published when given).
        count: number of prompts (default: the protocol's; a smaller count is for tests and quick looks, and is
            recorded).
        selection_seed: the seed of our selection rule.
        link_reference_images: COCO's ``val2014/`` image folder: link the drawn images into
            ``output_dir/reference/`` (the FID reference of a subset protocol).

    Returns:
        The path of ``prompts.txt``.

    Raises:
        ValueError: for an unknown protocol, no source given, or a published file whose length differs from
            ``count``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Expected protocol to be one of {sorted(PROTOCOLS)}, but got {protocol!r}.")
    spec = PROTOCOLS[protocol]
    n = spec.count if count is None else int(count)
    record: dict[str, Any] = {"protocol": asdict(spec), "count": n}
    if published_prompts is not None:
        prompts = read_published_prompts(published_prompts)
        if len(prompts) != n:
            raise ValueError(
                f"Expected {published_prompts} ({spec.published_prompts}) to hold {n} prompts for {protocol}, but "
                f"it holds {len(prompts)}. Pass the file as published, or --count {len(prompts)}."
            )
        record["rule"] = f"published prompt file used as is: {spec.published_prompts}"
        record["source"] = {"file": Path(published_prompts).name, "sha256": file_sha256(published_prompts)}
    elif annotations is not None:
        picked = select_one_caption_per_image(load_coco_captions(annotations), n, selection_seed)
        prompts = [s.caption for s in picked]
        record["rule"] = (
            "our choice (the protocol's own rule is not published): one caption per image for distinct images "
            f"drawn without replacement, numpy default_rng({int(selection_seed)})"
        )
        record["selection_seed"] = int(selection_seed)
        record["source"] = {"file": Path(annotations).name, "sha256": file_sha256(annotations)}
        record["selection"] = [asdict(s) for s in picked]
    else:
        raise ValueError(
            "Expected --annotations (COCO's captions_val2014.json) or --published_prompts (the protocol's own "
            "prompt file), but got neither."
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if link_reference_images is not None:
        if "selection" not in record:
            raise ValueError(
                "Expected --annotations with --link_reference_images (the images of a published prompt file are "
                "not known), but got --published_prompts."
            )
        record["reference_dir"] = str(
            link_images(record["selection"], link_reference_images, out / "reference")
        )
    path = out / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    record["prompts_sha256"] = file_sha256(path)
    (out / "selection.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of this builder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    parser.add_argument("--annotations", default=None, help="COCO's annotations/captions_val2014.json")
    parser.add_argument(
        "--published_prompts",
        default=None,
        help="the protocol's own prompt file (GigaGAN's captions.txt; DMD2's coco10k/all_prompts.pkl)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--count", type=int, default=None, help="default: the protocol's (30000 / 10000)")
    parser.add_argument("--selection_seed", type=int, default=0, help="seed of our selection rule")
    parser.add_argument(
        "--link_reference_images",
        default=None,
        help="COCO's val2014/ folder: link the drawn images into OUTPUT_DIR/reference/ (the FID reference)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    """Build the prompt file the options name."""
    path = build_prompt_file(
        args.protocol,
        args.output_dir,
        annotations=args.annotations,
        published_prompts=args.published_prompts,
        count=args.count,
        selection_seed=args.selection_seed,
        link_reference_images=args.link_reference_images,
    )
    spec = PROTOCOLS[args.protocol]
    print(
        f"wrote {path}; evaluate with --prompts_file {path} --seed {spec.seed} --eval_resolution "
        f"{spec.eval_resolution} --clip_eval_resolution {spec.clip_eval_resolution} --clip_prefix "
        f"{spec.clip_prefix!r} --clip {spec.clip[-1]} (FID reference: {spec.reference})",
        file=sys.stderr,
    )
    return path


if __name__ == "__main__":
    main(parse_args())
