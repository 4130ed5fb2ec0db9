"""Metric objects named on the command line (``--clip``, ``--preference``, ``--fid_features``), and the protocol
record built from them and the run's options.

Syntax (``examples/evaluate.py``):

* ``--clip open_clip:MODEL:PRETRAINED`` -- ``CLIPScore.from_open_clip(MODEL, PRETRAINED)``, e.g.
  ``open_clip:ViT-g-14:laion2b_s12b_b42k`` (SiD-LSG's and DMD2's backbone) or ``open_clip:ViT-B-32:openai``
  (OpenAI's ViT-B/32, GigaGAN's default);
* ``--clip hf:MODEL_OR_PATH`` -- ``CLIPScore.from_transformers(MODEL_OR_PATH)``, e.g.
  ``hf:openai/clip-vit-large-patch14`` or a local folder;
* ``--preference imagereward hpsv21 pickscore aesthetic`` -- ``ImageRewardScore``, ``HPSv21Score``, ``PickScore``,
  ``AestheticScore`` ``.from_pretrained()`` (their packages imported when asked for);
* anywhere a metric is named, ``package.module:factory`` calls ``factory()`` for the object (a custom
  backbone, or a test's stand-in); ``--fid_features module:factory`` gives the FID's feature extractor.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

PREFERENCE = {
    "imagereward": "ImageRewardScore",
    "hpsv21": "HPSv21Score",
    "pickscore": "PickScore",
    "aesthetic": "AestheticScore",
}
"""``--preference`` names -> classes of :mod:`diffdistill.metrics.preference`."""

PACKAGES = ("torch", "diffusers", "transformers", "clean-fid", "open_clip_torch", "accelerate", "pillow")
"""Packages whose versions the protocol records."""


def load_factory(spec: str, option: str) -> Any:
    """The object ``factory()`` returns for ``spec = "package.module:factory"`` (``factory`` may be dotted), the
    factory found as the training scripts find ``--reward_model`` (:func:`training.rewards.load_reward_model`).

    Raises:
        ValueError: if ``spec`` is not of that form or names nothing callable.
    """
    from training import rewards

    return rewards.load_reward_model(spec, option)()


def clip_metric(spec: str, device: Any = None) -> Any:
    """The CLIP-score object ``--clip spec`` names (see the module docstring), its backbone on ``device``."""
    from diffdistill.metrics.clip_score import CLIPScore

    kind, _, rest = spec.partition(":")
    if kind == "open_clip":
        model, sep, pretrained = rest.partition(":")
        if not sep or not model or not pretrained:
            raise ValueError(
                f"Expected --clip open_clip:MODEL:PRETRAINED (e.g. open_clip:ViT-g-14:laion2b_s12b_b42k), but got "
                f"{spec!r}."
            )
        return CLIPScore.from_open_clip(model, pretrained, device=device)
    if kind == "hf":
        if not rest:
            raise ValueError(
                f"Expected --clip hf:MODEL_OR_PATH (e.g. hf:openai/clip-vit-large-patch14), but got {spec!r}."
            )
        return CLIPScore.from_transformers(rest, device=device)
    return load_factory(spec, "--clip")


def preference_metric(name: str, device: Any = None) -> Any:
    """The preference-score object ``--preference name`` names, on ``device``."""
    if name in PREFERENCE:
        from diffdistill.metrics import preference

        return getattr(preference, PREFERENCE[name]).from_pretrained(
            device=None if device is None else str(device)
        )
    if ":" in name:
        return load_factory(name, "--preference")
    raise ValueError(
        f"Expected --preference names among {sorted(PREFERENCE)} or module:factory, but got {name!r}."
    )


def metric_name(spec: str) -> str:
    """The results key of a ``--preference`` entry: the name itself, or a factory's name."""
    return spec if spec in PREFERENCE else spec.rpartition(":")[2].rpartition(".")[2]


def build_metrics(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """``{"fid": FID, "clip_score": CLIPScore, name: preference score}`` for the options given: FID when a
    reference is (``--reference_dir`` / ``--reference_stats``), CLIP with ``--clip``, one per ``--preference``.
    Objects with a ``to`` method are moved to ``device``. Weights are fetched here (the default Inception too), so
    that ``examples/evaluate.py`` lets its main process download them before the others read them."""
    out: dict[str, Any] = {}
    if args.reference_dir or args.reference_stats:
        from diffdistill.metrics.fid import FID

        features = load_factory(args.fid_features, "--fid_features") if args.fid_features else None
        if hasattr(features, "to"):
            features = features.to(device)
        elif features is None:
            from diffdistill.metrics.fid import InceptionFeatures

            features = InceptionFeatures().to(device)
            features.load()  # now (downloading once), inside evaluate.py's main_process_first()
        out["fid"] = FID(features, reference=args.reference_stats)
    if args.clip:
        out["clip_score"] = clip_metric(args.clip, device)
    for name in args.preference or []:
        out[metric_name(name)] = preference_metric(name, device)
    if not out:
        raise ValueError(
            "Expected at least one metric: --reference_dir / --reference_stats (FID), --clip, or --preference."
        )
    return out


FID_REFERENCE_KEYS = ("reference", "reference_count", "reference_sha256", "reference_file")
"""Entries of ``FID.protocol()`` about the reference: how it was given (statistics or images) and, for statistics,
their hash, count and file name. The record holds the reference's identity instead (:func:`reference_identity`, under
``extra.fid_reference``), so a run against a folder and a run against the statistics saved from it compare (the
metric's own ``reference_sha256`` exists only for given statistics, and the statistics of the same folder differ in
the last bits with the number of processes)."""


def metric_protocols(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: metric.protocol()}`` (``{}`` for an object without one), without :data:`FID_REFERENCE_KEYS`."""
    out = {k: (dict(m.protocol()) if hasattr(m, "protocol") else {}) for k, m in sorted(metrics.items())}
    for key in FID_REFERENCE_KEYS:
        out.get("fid", {}).pop(key, None)
    return out


def reference_identity(
    reference_dir: str | None, files: Sequence[Any], reference_stats: str | None, eval_resolution: int | None
) -> dict[str, Any] | None:
    """What the FID was measured against: a folder's files (count and the SHA-256 of their relative paths and
    sizes) at an evaluation resolution, or a statistics file -- the identity of the folder it was saved from when
    ``--save_reference_stats`` wrote one beside it (``<stats>.json``), else the file's own SHA-256.

    Args:
        reference_dir: ``--reference_dir``.
        files: its image files (:func:`evaluation.scoring.image_files`).
        reference_stats: ``--reference_stats``.
        eval_resolution: the resize the reference images got.

    Returns:
        The identity (None without a reference).
    """
    import hashlib
    import json
    from pathlib import Path

    if reference_dir:
        root = Path(reference_dir)
        listing = "\n".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
        return {
            "images": len(files),
            "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
            "eval_resolution": eval_resolution,
        }
    if reference_stats:
        sidecar = Path(f"{reference_stats}.json")
        if sidecar.is_file():
            return dict(json.loads(sidecar.read_text(encoding="utf-8")))
        from evaluation.coco_prompts import file_sha256

        return {"stats_sha256": file_sha256(reference_stats)}
    return None


def evaluation_protocol(
    args: argparse.Namespace,
    prompts: Sequence[str],
    metrics: Mapping[str, Any],
    *,
    generator: dict[str, Any] | None,
    image_size: tuple[int, int],
    reference: dict[str, Any] | None = None,
    quantization: str = "round",
    video: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The protocol record of a run, as the JSON object of :class:`diffdistill.metrics.protocol.EvaluationProtocol`.

    Everything but ``generator`` must agree for two runs to be compared.

    Args:
        args: the run's options (seed, resolutions, prefixes).
        prompts: the prompt set.
        metrics: the metric objects (their ``protocol()`` entries: backbones and conventions).
        generator: the sampler record (:func:`evaluation.generation.sampler_record`), None for ``--images``.
        image_size: ``(width, height)`` of the images scored (read from the first file); recorded as
            ``resolution = [height, width]``.
        reference: the FID reference's identity (:func:`reference_identity`).
        quantization: how the images were turned into uint8 (``"round"`` / ``"truncate"``,
            :func:`evaluation.generation.to_uint8`): a half-level shift of every pixel, so part of what is compared
            (``preprocessing.quantization``).
        video: a video run's entry (:func:`evaluation.video_generation.protocol_entry`: frames per video, which are
            scored, what each metric does with them), recorded as ``extra.video``; None for images (no entry, so
            image and video runs differ).

    Returns:
        The protocol as a JSON-ready dict (``EvaluationProtocol.to_dict()``).
    """
    from diffdistill.metrics.protocol import EvaluationProtocol, package_versions

    resized = args.eval_resolution or args.clip_eval_resolution
    resize = "centre crop on the long edge + PIL LANCZOS" if resized else "none"
    protocol = EvaluationProtocol.for_prompts(
        prompt_set_name(args.prompts_file, args.prompt_set),
        list(prompts),
        seeds=int(args.seed),
        resolution=[int(image_size[1]), int(image_size[0])],
        preprocessing={
            "eval_resolution": args.eval_resolution,
            "clip_eval_resolution": args.clip_eval_resolution or args.eval_resolution,
            "resize": resize,
            "clip_prefix": args.clip_prefix,
            "quantization": quantization,
        },
        backbones=metric_protocols(metrics),
        versions=package_versions(PACKAGES),
        generator=generator or {},
        extra={
            "fid_reference": reference,
            "seed_rule": "prompt i from seed + i, one CPU generator per image",
        }
        | (
            {"video": video, "seed_rule": "video i from seed + i, one CPU generator per video"}
            if video is not None
            else {}
        ),
    )
    return protocol.to_dict()


def prompt_set_name(prompts_file: str, given: str | None) -> str:
    """The protocol's prompt-set name: ``--prompt_set``, else the protocol named in the ``selection.json`` that
    ``examples/evaluation/coco_prompts.py`` writes beside its prompt file, else ``"custom"`` (the hash, not the
    name, identifies the prompts)."""
    import json
    from pathlib import Path

    if given:
        return given
    selection = Path(prompts_file).with_name("selection.json")
    if selection.is_file():
        return str(json.loads(selection.read_text(encoding="utf-8"))["protocol"]["name"])
    return "custom"
