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

The record identifies each backbone by its weights, not only by its name: local checkpoints by SHA-256, Hub ids by
the commit the cache resolved (the metrics' ``protocol()``, ``weights``), factories by their spec and, for modules,
their ``state_dict`` (:func:`metric_protocols`). Reference statistics are checked against the run before anything is
generated (:func:`check_reference_stats`), and a COCO prompt file's protocol is named only when the run follows it
(:func:`prompt_set`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

PREFERENCE = {
    "imagereward": "ImageRewardScore",
    "hpsv21": "HPSv21Score",
    "pickscore": "PickScore",
    "aesthetic": "AestheticScore",
}
"""``--preference`` names -> classes of :mod:`diffdistill.metrics.preference`."""

PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "diffusers",
    "transformers",
    "clean-fid",
    "open_clip_torch",
    "accelerate",
    "pillow",
)
"""Packages whose versions the protocol records (and an image folder's ``generation.json``, for the images): scipy
for FID's ``sqrtm``, torchvision for the tensor resizes of HPSv2 / open_clip / transformers' image processors."""

FACTORY_ATTRIBUTE = "_diffdistill_factory"
"""Where :func:`load_factory` notes the ``module:factory`` spec on the object it returns, for the record."""


def load_factory(spec: str, option: str) -> Any:
    """The object ``factory()`` returns for ``spec = "package.module:factory"`` (``factory`` may be dotted), the
    factory found as the training scripts find ``--reward_model`` (:func:`training.rewards.load_reward_model`).

    Raises:
        ValueError: if ``spec`` is not of that form or names nothing callable.
    """
    from training import rewards

    obj = rewards.load_reward_model(spec, option)()
    # the record names the factory (metric_protocols); an object that takes no attributes: its class only
    with contextlib.suppress(AttributeError, TypeError):
        setattr(obj, FACTORY_ATTRIBUTE, spec)
    return obj


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
    reference is (``--reference_dir`` / ``--reference_stats``; with ``--precision_recall`` also
    ``"precision_recall"``, a ``PrecisionRecall`` on the FID's feature extractor), CLIP with ``--clip``, one per
    ``--preference``.
    Objects with a ``to`` method are moved to ``device``. Weights are fetched here (the default Inception too), so
    that ``examples/evaluate.py`` lets its main process download them before the others read them."""
    out: dict[str, Any] = {}
    if args.reference_dir or args.reference_stats:
        from diffdistill.metrics.fid import FID

        features: Any = load_factory(args.fid_features, "--fid_features") if args.fid_features else None
        if hasattr(features, "to"):
            features = features.to(device)
        elif features is None:
            from diffdistill.metrics.fid import InceptionFeatures

            features = InceptionFeatures().to(device)
            features.load()  # now (downloading once), inside evaluate.py's main_process_first()
        out["fid"] = FID(features, reference=args.reference_stats)
        if getattr(args, "precision_recall", False):
            from diffdistill.metrics import PrecisionRecall

            k = args.nearest_k if args.nearest_k is not None else 3
            out["precision_recall"] = PrecisionRecall(out["fid"].feature_extractor, nearest_k=k)
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
    """``{name: metric.protocol()}`` (``{}`` for an object without one), without :data:`FID_REFERENCE_KEYS`; an
    object a ``module:factory`` spec made (:func:`load_factory`) adds ``factory`` (the spec) and, when it is (or its
    ``model`` is) an ``nn.Module`` and its record holds no ``weights`` of its own, ``state_dict_sha256``
    (:func:`diffdistill.metrics.protocol.module_sha256`, hashed once per object); the FID's extractor the same, as
    ``feature_extractor_factory`` (its weights: ``FID.protocol()``'s ``feature_extractor_sha256``)."""
    import torch

    from diffdistill.metrics.protocol import module_sha256

    out = {k: (dict(m.protocol()) if hasattr(m, "protocol") else {}) for k, m in sorted(metrics.items())}
    for key in FID_REFERENCE_KEYS:
        out.get("fid", {}).pop(key, None)
    for name, metric in metrics.items():
        spec = getattr(metric, FACTORY_ATTRIBUTE, None)
        if spec is not None:
            out[name]["factory"] = spec
            module = metric if isinstance(metric, torch.nn.Module) else getattr(metric, "model", None)
            if isinstance(module, torch.nn.Module) and "weights" not in out[name]:
                out[name]["state_dict_sha256"] = module_sha256(module)
        extractor_spec = getattr(getattr(metric, "feature_extractor", None), FACTORY_ATTRIBUTE, None)
        if extractor_spec is not None:
            out[name]["feature_extractor_factory"] = extractor_spec
    return out


def extractor_identity(fid: Any) -> dict[str, Any]:
    """The FID feature extractor's entries of the record (``feature_extractor``: its description, with Inception's
    rounding; ``feature_extractor_sha256`` / ``feature_extractor_factory`` where :func:`metric_protocols` gives
    them): what a reference's statistics are only valid with."""
    entry = metric_protocols({"fid": fid})["fid"]
    return {k: v for k, v in sorted(entry.items()) if k.startswith("feature_extractor")}


SIDECAR_IDENTITY = ("images", "files_sha256", "eval_resolution")
"""The entries of ``<stats>.json`` (written by ``--save_reference_stats``) that identify the reference folder: what
a run against those statistics records as ``extra.fid_reference``, the same as a run against the folder records."""


def reference_sidecar(reference: Mapping[str, Any], fid: Any) -> dict[str, Any]:
    """``<stats>.json`` beside saved reference statistics: the folder's identity (:func:`reference_identity`), the
    statistics' :meth:`~diffdistill.metrics.FeatureStatistics.sha256` (``stats_sha256``) and the extractor they
    were computed with (:func:`extractor_identity`), for :func:`check_reference_stats` to check later runs with."""
    return dict(reference) | {"stats_sha256": fid.real.sha256(), "feature_extractor": extractor_identity(fid)}


def check_reference_stats(path: str, fid: Any, eval_resolution: int | None) -> dict[str, Any]:
    """Check ``--reference_stats`` against this run before anything is generated, and return what to record.

    The statistics (loaded by ``FID``) must have the extractor's dimension (its ``num_features`` where it has
    one). With ``<path>.json`` (:func:`reference_sidecar`), they must be the statistics it describes (their hash:
    a ``.npz`` replaced after the sidecar was written is refused), at this run's ``--eval_resolution``, from this
    run's feature extractor; the record then holds the folder's identity (:data:`SIDECAR_IDENTITY`). Without one
    (a clean-fid / pytorch-fid file), a warning: its preprocessing (crop, resize, resolution) is unknown, and the
    record says so next to the statistics' hash.

    Args:
        path: ``--reference_stats``.
        fid: the FID metric built with it.
        eval_resolution: ``--eval_resolution``.

    Returns:
        ``extra.fid_reference`` of the record.

    Raises:
        ValueError: naming what differs and how to fix it.
    """
    import json
    import warnings
    from pathlib import Path

    stats = fid.reference
    expected = getattr(fid.feature_extractor, "num_features", None)
    if isinstance(expected, int) and stats.num_features != expected:
        raise ValueError(
            f"Expected --reference_stats {path} to hold {expected}-dimensional statistics (the FID feature "
            f"extractor's), but they have {stats.num_features} features: they were computed with another extractor."
            " Pass the statistics of this extractor, or --reference_dir to compute them."
        )
    digest = stats.sha256()
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        warnings.warn(
            f"--reference_stats {path} has no {sidecar.name} (written by --save_reference_stats): the crop, resize "
            "and resolution its images got are unknown, so nothing checks that they match this run's "
            f"--eval_resolution {eval_resolution}. Recorded as preprocessing 'unknown'.",
            UserWarning,
            stacklevel=2,
        )
        return {"stats_sha256": digest, "preprocessing": "unknown"}
    saved = json.loads(sidecar.read_text(encoding="utf-8"))
    fix = f"Re-save them with --reference_dir <the folder> --save_reference_stats {path}"
    if saved.get("stats_sha256") != digest:
        raise ValueError(
            f"Expected {sidecar} to describe the statistics in {path}, but it records stats_sha256 "
            f"{saved.get('stats_sha256')!r} and the file holds {digest!r}: the .npz was replaced after its sidecar "
            f"was written (or the sidecar predates the hash). {fix}."
        )
    if saved.get("eval_resolution") != eval_resolution:
        raise ValueError(
            f"Expected --reference_stats {path} to come from images resized like this run's (--eval_resolution "
            f"{eval_resolution}), but {sidecar.name} records eval_resolution {saved.get('eval_resolution')}. Pass "
            f"--eval_resolution {saved.get('eval_resolution')}, or statistics saved at {eval_resolution}. {fix}."
        )
    extractor = extractor_identity(fid)
    if saved.get("feature_extractor") != extractor:
        raise ValueError(
            f"Expected --reference_stats {path} to come from this run's FID feature extractor {extractor}, but "
            f"{sidecar.name} records {saved.get('feature_extractor')}. Pass statistics of this extractor (or its "
            f"--fid_features). {fix}."
        )
    return {k: saved[k] for k in SIDECAR_IDENTITY if k in saved}


def reference_identity(
    reference_dir: str | None, files: Sequence[Any], eval_resolution: int | None
) -> dict[str, Any] | None:
    """What the FID was measured against when it is a folder: its files (count and the SHA-256 of their relative
    paths and sizes) at an evaluation resolution (statistics files: :func:`check_reference_stats`).

    Args:
        reference_dir: ``--reference_dir``.
        files: its image files (:func:`evaluation.scoring.image_files`).
        eval_resolution: the resize the reference images got.

    Returns:
        The identity (None without a folder).
    """
    import hashlib
    from pathlib import Path

    if not reference_dir:
        return None
    root = Path(reference_dir)
    listing = "\n".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
    return {
        "images": len(files),
        "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        "eval_resolution": eval_resolution,
    }


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
    name, deviations = prompt_set(args, prompts, metrics)
    protocol = EvaluationProtocol.for_prompts(
        name,
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
        | ({"protocol_deviations": deviations} if deviations else {})
        | (
            {"video": video, "seed_rule": "video i from seed + i, one CPU generator per video"}
            if video is not None
            else {}
        ),
    )
    return protocol.to_dict()


def prompt_set(
    args: argparse.Namespace, prompts: Sequence[str], metrics: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """The protocol's prompt-set name and how the run departs from the protocol it names.

    ``--prompt_set`` is taken as given. Else the protocol of the ``selection.json`` that
    ``examples/evaluation/coco_prompts.py`` writes beside its prompt file names the set -- as it is only when the
    run follows it: the prompt file is the one it wrote (``prompts_sha256``), all of its prompts are used, and the
    seed, ``--eval_resolution`` and (with a CLIP score) the CLIP resolution and ``--clip_prefix`` are the protocol's
    (:data:`evaluation.coco_prompts.PROTOCOLS`). Otherwise the name is ``"<protocol> (modified)"``, with a warning
    and the list of deviations (recorded as ``extra.protocol_deviations``). Without either: ``"custom"`` (the hash,
    not the name, identifies the prompts).

    Args:
        args: the run's options (``--prompts_file``, ``--prompt_set``, ``--seed``, the resolutions, the prefix).
        prompts: the prompts evaluated.
        metrics: the metric objects (the CLIP settings count only with a ``clip_score``).

    Returns:
        ``(name, deviations)``.
    """
    import json
    import warnings
    from pathlib import Path

    from evaluation.coco_prompts import file_sha256

    if args.prompt_set:
        return str(args.prompt_set), []
    selection = Path(args.prompts_file).with_name("selection.json")
    if not selection.is_file():
        return "custom", []
    record = json.loads(selection.read_text(encoding="utf-8"))
    spec = record["protocol"]
    deviations = []
    if file_sha256(args.prompts_file) != record.get("prompts_sha256"):
        deviations.append(
            f"prompts file {Path(args.prompts_file).name} is not the one selection.json describes (its sha256 "
            "differs)"
        )
    if len(prompts) != int(record.get("count", len(prompts))):
        deviations.append(f"{len(prompts)} prompts of the protocol's {record.get('count')}")
    options = [
        ("seed", args.seed, spec.get("seed")),
        ("eval_resolution", args.eval_resolution, spec.get("eval_resolution")),
    ]
    if "clip_score" in metrics:
        clip_resolution = args.clip_eval_resolution or args.eval_resolution
        options += [
            ("clip_eval_resolution", clip_resolution, spec.get("clip_eval_resolution")),
            ("clip_prefix", args.clip_prefix, spec.get("clip_prefix")),
        ]
    deviations += [f"{key} {now!r} (protocol: {want!r})" for key, now, want in options if now != want]
    name = str(spec["name"])
    if not deviations:
        return name, []
    warnings.warn(
        f"The prompt file is {name}'s (its selection.json), but this run does not follow that protocol: "
        f"{'; '.join(deviations)}. Recorded as prompt set '{name} (modified)' with these deviations; pass the "
        "protocol's options (examples/evaluation/coco_prompts.py) to report its numbers, or --prompt_set to name "
        "the set yourself.",
        UserWarning,
        stacklevel=2,
    )
    return f"{name} (modified)", deviations
