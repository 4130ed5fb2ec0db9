"""Generating the evaluation images: a diffusers pipeline with a student's weights and sampler, one seeded PNG per prompt.

The pipeline is the model's own (``DiffusionPipeline.from_pretrained``: SDXL, SD3, FLUX ...), so its prompt
encoding, classifier-free guidance and decoding are diffusers' and a student is sampled the way its users sample
it. A student replaces the teacher's weights (:func:`apply_student`: a LoRA file or folder, a full ``unet/`` or
``transformer/``) and brings its few-step sampler (:func:`set_sampler`: a scheduler class, its config overrides,
the step count or explicit timesteps / sigmas, guidance); the teacher baseline is the same pipeline with neither.

Images are written as they are generated, ``{index:06d}.png`` for prompt ``index`` (SiD-LSG's naming), quantised
to uint8 by rounding (diffusers' ``numpy_to_pil``) or, with ``--quantization truncate``, by truncation as DMD2's
evaluation does (:func:`to_uint8`), from the
noise of a CPU generator seeded ``seed + index`` (one generator per image, as SiD-LSG's ``StackedRandomGenerator``:
an image does not depend on the batch it was generated in, the batch size or the number of processes). A run
that stops leaves finished files only (written to a temporary name, then renamed), and a rerun generates only
the missing ones -- after :func:`check_resume` has compared the folder's ``generation.json`` (the sampler record
with the student weights' SHA-256, the seed, the quantisation, the prompt of every index) with the rerun's, so that
images made otherwise are never mixed in. The weights are hashed once, by the main process, and the hash is
broadcast to the others (:func:`shared_weights_sha256`). ``generation.json`` also records the package versions the
images were generated with (:func:`resume_versions`: a resume under others warns and is recorded). A batch with NaN /
infinite pixels is refused before any of it is written (:func:`check_finite`: our choice over scoring it).

A training run's output folder says how its student is sampled, and it is read rather than retyped (our choices):

* the model a LoRA was trained on: a folder with ``unet_merged/`` (SDXL-Lightning's LoRA stages merge their adapter
  into the stage's own starting UNet) is evaluated as that full UNet; a LoRA trained on another UNet than the
  pipeline's (recorded in its ``base_unet`` metadata, or a Lightning stage after ``128->32`` without
  ``unet_merged/``) is refused unless ``--lora_base`` names that UNet folder (:func:`check_lora_base`);
* the sampler: the run's ``scheduler/`` (flow_dmd2, flow_ladd, flow_tscd, Lightning's x0 stages, the SDXL one-step
  generators of sdxl_sim / sdxl_diffusion2gan) and its grid (``student_sigmas.json`` of flow_dmd2 / flow_ladd,
  ``student_grid.json``'s ``sigmas`` -- ``pipeline_sigmas`` in an older flow_tscd folder without ``scheduler/`` --,
  ``student_timesteps.json`` of the SDXL one-step generators, used with the run's ``scheduler/`` only; a flow_dmd2
  grid starting below 1 also scales the initial noise, :func:`scale_initial_noise`), unless ``--scheduler`` / ``--scheduler_config`` (resp.
  ``--sigmas`` / ``--timesteps`` / ``--num_inference_steps``) are given (:func:`read_saved_sampler`); the record
  names the source of each;
* the guidance and the prompt length: the flow scripts' ``student_sampler.json`` (``training.student_sampler``)
  holds the ``guidance_scale`` the student was trained to be sampled at (1 for SD3 / Qwen-Image / Wan: no CFG;
  FLUX.1-dev's embedded ``--guidance``; None for FLUX.1-schnell, which has no guidance input; A14B's
  ``guidance_scale_2``) and the ``max_sequence_length`` its prompts were encoded at, used unless
  ``--guidance_scale`` / ``--guidance_scale_2`` / ``--max_sequence_length`` are given (an older flow_tscd
  ``student_grid.json``'s ``guidance`` otherwise). Without either, the record holds the pipeline's default guidance
  (:func:`default_guidance`) and a student is warned about it (a distilled student usually wants 0 or 1: its CFG
  is baked in); a ``FluxPipeline`` without guidance embedding (schnell) records None (it ignores
  ``guidance_scale``; its CFG is ``true_cfg_scale``);
* the size: the trained ``height`` x ``width`` of ``student_sampler.json`` when neither ``--resolution`` nor
  ``--width`` is given (:func:`fill_trained_size`); a ``--resolution`` / ``--width`` the pipeline would change (not a
  multiple of the VAE's factor x the patch size, :func:`size_multiple`: SD3 / FLUX / Qwen-Image 16) is refused
  (:func:`check_pipeline_options`); another size than the trained one warns (:func:`check_trained_size`); a FLUX / Qwen-Image
  grid of flow_dmd2 / flow_tscd is the schedule shifted for the trained size (``grid_size``), so generating at
  another size warns, and the record holds both (:func:`check_grid_size`);
* the re-noising of DMD2's stochastic sampler: from ``training.student_sampler.renoise_seed`` of each image's seed,
  as flow_dmd2's validation, apart from the initial noise (:func:`pipeline_sampler`).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

SEED_STRIDE = 1
"""Prompt ``i`` is sampled from seed ``seed + SEED_STRIDE * i`` (SiD-LSG's ``--seeds=0-29999``: seed ``i``)."""

DEFAULT_STEPS = 4
"""A student's ``--num_inference_steps`` when neither it, explicit timesteps / sigmas nor a saved grid are given
(``--teacher``: the pipeline's own default, :func:`fill_teacher_steps`)."""

SCHEDULER_FOLDER = "scheduler"
"""A run folder's saved sampler (``save_pretrained`` of a diffusers scheduler)."""

SIGMA_FILES = {"student_sigmas.json": (None, None), "student_grid.json": ("sigmas", "pipeline_sigmas")}
"""A run folder's saved sampling grid: flow_dmd2's / flow_ladd's sigma list, flow_tscd's grid: the entry for the run's
saved ``scheduler/`` (unshifted: the trained ``sigmas``) or, without one, for the pipeline's own scheduler
(``pipeline_sigmas``, which it shifts)."""

LORA_BASE_KEY = "base_unet"
"""The LoRA file's metadata entry naming the denoiser folder it was trained on, when not the pipeline's own."""

QUANTIZATIONS = ("round", "truncate")
"""How float images in ``[0, 1]`` become uint8 (:func:`to_uint8`): ``round`` (ours, diffusers' ``numpy_to_pil``) or
``truncate`` (DMD2's ``(x * 255).to(torch.uint8)``)."""


def image_path(folder: str | Path, index: int) -> Path:
    """Where the image of prompt ``index`` lives: ``folder/{index:06d}.png``."""
    return Path(folder) / f"{int(index):06d}.png"


def shard(indices: Sequence[int], process_index: int, num_processes: int) -> list[int]:
    """The prompts one process handles: every ``num_processes``-th index from ``process_index`` (balanced to
    one prompt, and a process's share does not change when some images already exist)."""
    return list(indices[process_index::num_processes])


def missing(folder: str | Path, indices: Iterable[int]) -> list[int]:
    """The indices whose image is not written yet (resume: the others are skipped)."""
    return [i for i in indices if not image_path(folder, i).is_file()]


def load_pipeline(args: argparse.Namespace, device: Any, dtype: torch.dtype) -> Any:
    """The pipeline of ``--pretrained_model_name_or_path`` (any diffusers text-to-image pipeline), with the
    student's weights unless ``--teacher``, its sampler, on ``device`` in ``dtype``, progress bar off; options it
    would change or not take are refused first (:func:`check_pipeline_options`)."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if args.revision:
        kwargs["revision"] = args.revision
    if args.variant:
        kwargs["variant"] = args.variant
    check_image_pipeline(
        DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    )
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    check_pipeline_options(pipe, resolve_sampler(args))
    fill_teacher_steps(pipe, args)
    if not args.teacher:
        apply_student(pipe, args, dtype)
    set_sampler(pipe, args, resolve_sampler(args).saved_sampler)
    scale_initial_noise(pipe, args)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def scale_initial_noise(pipe: Any, args: argparse.Namespace) -> None:
    """Scale the pipeline's initial latents by the run's ``initial_noise_scale`` when its saved grid is sampled
    (:func:`read_saved_sampler`; flow_dmd2 with a grid starting at ``sigma_0 < 1``: the generator starts from the
    zero image noised there, ``sigma_0 z``, SiD's input, while a flow pipeline starts from ``z``). Wraps
    ``pipe.prepare_latents`` (its latents, or the first item of the tuple FLUX's returns); a no-op otherwise."""
    scale = (getattr(args, "saved_sampler", None) or {}).get("initial_noise_scale")
    if scale is None or scale == 1.0:
        return
    prepare = pipe.prepare_latents

    def scaled(*a: Any, **kw: Any) -> Any:
        out = prepare(*a, **kw)
        if isinstance(out, tuple):
            return (out[0] * scale, *out[1:])
        return out * scale

    pipe.prepare_latents = scaled


VIDEO_PIPELINE_MARKERS = ("Wan", "Video", "CogVideoX", "LTX", "Mochi")
"""Name parts of diffusers' video pipelines (``WanPipeline``, ``HunyuanVideoPipeline``, ``CogVideoXPipeline`` ...)."""


def check_image_pipeline(index: dict[str, Any]) -> None:
    """Refuse a video pipeline (its ``model_index.json`` as ``index``) on the image path, before its weights load.
    ``examples/evaluate.py`` sends ``WanPipeline`` folders to :mod:`evaluation.video_generation` first and refuses
    other video pipelines there; this guards callers of :func:`load_pipeline`.

    Args:
        index: the pipeline's ``model_index.json``.

    Raises:
        ValueError: if ``_class_name`` names a video pipeline (:data:`VIDEO_PIPELINE_MARKERS`).
    """
    name = str(index.get("_class_name", ""))
    if any(marker in name for marker in VIDEO_PIPELINE_MARKERS):
        raise ValueError(
            f"Expected a text-to-image pipeline, but --pretrained_model_name_or_path is a {name} (video): the image "
            "path has no video metric. examples/evaluate.py evaluates WanPipeline folders through "
            "evaluation.video_generation (frame FID, CLIPSIM, frame consistency; not FVD / VBench)."
        )


def denoiser_name(pipe: Any) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline component a student replaces."""
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    if getattr(pipe, "transformer", None) is not None:
        return "transformer"
    raise ValueError(
        f"Expected a pipeline with a unet or a transformer, but {type(pipe).__name__} has neither. "
        "examples/evaluate.py samples text-to-image diffusion pipelines (SDXL, SD3, FLUX ...)."
    )


def resolve_student(weights: str | Path, name: str) -> tuple[str, Path]:
    """What ``--student_weights`` names: ``("denoiser", folder)`` -- a run folder with ``{name}_merged/`` (a LoRA
    merged into the UNet it was trained on, SDXL-Lightning's LoRA stages: preferred to the LoRA beside it), a
    ``unet/`` / ``transformer/`` folder (``name``), or a run's output folder holding one -- or ``("lora", file)`` --
    a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (as the training scripts
    write it).

    Args:
        weights: the ``--student_weights`` path.
        name: the pipeline's denoiser component, ``"unet"`` or ``"transformer"``.

    Returns:
        The kind and the file or folder to load.

    Raises:
        ValueError: if ``weights`` is neither.
    """
    path = Path(weights)
    merged = path / f"{name}_merged"
    if (merged / "config.json").is_file():
        return "denoiser", merged
    lora_file = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    if lora_file.is_file():
        return "lora", lora_file
    for folder in (path, path / name):
        if (folder / "config.json").is_file():
            return "denoiser", folder
    raise ValueError(
        f"Expected --student_weights {path} to be a LoRA (a .safetensors file or a folder with "
        f"pytorch_lora_weights.safetensors) or a {name} folder (config.json at its root, in {name}/ or in "
        f"{name}_merged/), but it is neither."
    )


def run_folder(weights: str | Path, name: str | None = None) -> Path:
    """The training run's output folder of ``--student_weights``: the folder itself, or the one holding the given
    LoRA file or ``unet/`` / ``transformer/`` / ``*_merged/`` folder (``name``: that component; None: either)."""
    path = Path(weights)
    names = {name, f"{name}_merged"} if name else {"unet", "transformer", "unet_merged", "transformer_merged"}
    return path.parent if path.is_file() or path.name in names else path


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_lora_base(lora_file: Path, args: argparse.Namespace) -> None:
    """Refuse to fuse a LoRA into another denoiser than the one it was trained on.

    The pipeline's own denoiser is the base unless ``--lora_base`` names another folder. A LoRA knows its base when
    its file's metadata holds ``base_unet`` (:data:`LORA_BASE_KEY`), and an SDXL-Lightning stage after ``128->32``
    (its ``discriminator/discriminator.json`` names the stage) was trained on its ``--init_unet``, the previous
    stage's merged UNet, not on base SDXL.

    Args:
        lora_file: the LoRA file :func:`resolve_student` found.
        args: the options (``--lora_base``, ``--student_weights``).

    Raises:
        ValueError: naming the base the LoRA needs and the option that gives it.
    """
    from safetensors import safe_open

    given = getattr(args, "lora_base", None)
    with safe_open(str(lora_file), framework="pt") as f:
        recorded = (f.metadata() or {}).get(LORA_BASE_KEY)
    if recorded:
        target = given or "the pipeline's own"
        if given is None or not _same_path(given, recorded):
            raise ValueError(
                f"Expected --student_weights {lora_file} to be fused into the denoiser it was trained on, but its "
                f"metadata records {LORA_BASE_KEY}={recorded!r} and this run would fuse it into "
                f"{target}. Pass --lora_base {recorded}."
            )
        return
    stage_file = run_folder(lora_file) / "discriminator" / "discriminator.json"
    if given is None and stage_file.is_file():
        stage = str(json.loads(stage_file.read_text(encoding="utf-8")).get("stage", ""))
        if stage and not stage.startswith("128->"):
            raise ValueError(
                f"Expected a LoRA trained on the pipeline's UNet, but --student_weights {lora_file} comes from the "
                f"SDXL-Lightning stage {stage!r}, trained on that stage's --init_unet (the previous stage's "
                "unet_merged/). Pass --lora_base <that --init_unet folder>, or evaluate the stage that merges it "
                "(its run folder's unet_merged/)."
            )


def weights_sha256(kind: str, path: Path) -> str:
    """SHA-256 identifying the student's weights: of the LoRA file's bytes, or of a denoiser folder's files (its
    top-level files, sorted by name, each name and its bytes) -- what :func:`apply_student` loads, so retraining
    into the same path changes it (:func:`diffdistill.metrics.protocol.files_sha256`, as the backbones' local
    checkpoints: a file is hashed as itself, a folder by its top-level files; ``kind``, ``"lora"`` or
    ``"denoiser"``, says which of the two :func:`resolve_student` found)."""
    from diffdistill.metrics.protocol import files_sha256

    return files_sha256(path)


def shared_weights_sha256(kind: str, path: Path, accelerator: Any = None) -> str:
    """:func:`weights_sha256` computed once, on the main process, and broadcast to the others (hashing a full UNet
    takes seconds; every process must call this, in the same order). Without ``accelerator`` (or with one
    process): computed here."""
    if accelerator is None or accelerator.num_processes == 1:
        return weights_sha256(kind, path)
    from accelerate.utils import broadcast_object_list

    digest = [weights_sha256(kind, path) if accelerator.is_main_process else None]
    broadcast_object_list(digest, from_process=0)
    return str(digest[0])


def apply_student(pipe: Any, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Put the student into ``pipe`` (:func:`resolve_student`): a LoRA is fused into the weights at
    ``--lora_scale`` (so sampling costs what the base model costs) -- of the ``--lora_base`` denoiser when given,
    after :func:`check_lora_base` --, a full denoiser replaces the pipeline's. None: the pipeline as loaded.

    Args:
        pipe: the diffusers pipeline.
        args: the options (``--student_weights``, ``--lora_scale``, ``--lora_base``).
        dtype: the pipeline's weight dtype.

    Raises:
        ValueError: for ``--lora_base`` with a full denoiser, or a LoRA trained on another base.
    """
    if not args.student_weights:
        return
    name = denoiser_name(pipe)
    kind, path = resolve_student(args.student_weights, name)
    base = getattr(args, "lora_base", None)
    if kind != "lora" and base is not None:
        raise ValueError(
            f"--lora_base is the denoiser a LoRA is fused into, but --student_weights {args.student_weights} "
            f"is a full {name} ({path}): drop --lora_base."
        )
    if kind == "lora":
        check_lora_base(path, args)
        if (
            base is not None
        ):  # the denoiser the LoRA was trained on replaces the pipeline's, then the LoRA is fused
            cls = type(getattr(pipe, name))
            pipe.register_modules(**{name: cls.from_pretrained(str(base), torch_dtype=dtype)})
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        pipe.fuse_lora(lora_scale=lora_scale(args))
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
        return
    cls = type(getattr(pipe, name))
    setattr(pipe, name, cls.from_pretrained(str(path), torch_dtype=dtype))
    pipe.register_modules(**{name: getattr(pipe, name)})


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["timestep_spacing=trailing", "shift=3.0"]`` -> ``{"timestep_spacing": "trailing", "shift": 3.0}``
    (values read as JSON where they parse: numbers, ``true``, ``null``; strings otherwise).

    Example:
        >>> parse_overrides(["timestep_spacing=trailing", "shift=3", "use_karras_sigmas=true"])
        {'timestep_spacing': 'trailing', 'shift': 3, 'use_karras_sigmas': True}
    """
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Expected --scheduler_config entries as key=value, but got {item!r}.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def lora_scale(args: argparse.Namespace) -> float:
    """``--lora_scale`` (1 when not given)."""
    value = getattr(args, "lora_scale", None)
    return 1.0 if value is None else float(value)


def read_saved_sampler(args: argparse.Namespace) -> dict[str, Any]:
    """What the student's run folder saved about its sampler, for the options that do not say it themselves.

    Returns ``{"scheduler": folder or None, "sigmas": list or None, "timesteps": list or None,
    "initial_noise_scale": float (only when the run's grid is used and its record holds one),
    "guidance_scale": float or None,
    "guidance_scale_2": float or None, "max_sequence_length": int or None, "grid_size": [H, W] or None,
    "trained_size": [H, W] (when recorded), "sources": {...}}``: the run's ``scheduler/`` unless ``--scheduler`` / ``--scheduler_config`` are given; its grid
    (:data:`SIGMA_FILES`, else the SDXL one-step generators' ``student_timesteps.json``,
    ``training.student_sampler.write_one_step_sampler``) unless ``--sigmas`` / ``--timesteps`` /
    ``--num_inference_steps`` are given, with the size
    whose schedule shifted it (``grid_size`` of ``student_sampler.json``); the guidance unless ``--guidance_scale``
    is given: ``student_sampler.json``'s (``training.student_sampler``: the value the run trained the student to be
    sampled at, None for a model without a guidance input), else the ``guidance`` of an older flow_tscd
    ``student_grid.json``; A14B's ``guidance_scale_2`` and the text length (``max_sequence_length``) the same way;
    the trained size (``height`` / ``width``, :func:`check_trained_size`). ``sources`` names where each value of the sampler comes from (an option, a file of the run, or the pipeline's
    default); a ``guidance_scale`` source with the value None means the run recorded "no guidance".

    Args:
        args: the options.

    Returns:
        The saved sampler, as above.

    Raises:
        ValueError: if a saved grid file is not a list of numbers (or a grid dict with ``sigmas`` /
            ``pipeline_sigmas``), or a saved timesteps file not a list of integers.
    """
    from training import aspect_buckets, student_sampler

    out: dict[str, Any] = {
        "scheduler": None,
        "sigmas": None,
        "timesteps": None,
        "sources": {},
        "grid_size": None,
    }
    out.update(guidance_scale=None, guidance_scale_2=None, max_sequence_length=None)
    sources = out["sources"]
    run = (
        run_folder(args.student_weights)
        if getattr(args, "student_weights", None) and not args.teacher
        else None
    )
    record = student_sampler.read_record(run) if run is not None else None
    record_file = str(run / student_sampler.RECORD_FILE) if record is not None and run is not None else ""
    if args.scheduler or args.scheduler_config:
        sources["scheduler"] = "--scheduler / --scheduler_config"
    elif run is not None and (run / SCHEDULER_FOLDER / "scheduler_config.json").is_file():
        out["scheduler"] = str(run / SCHEDULER_FOLDER)
        sources["scheduler"] = str(run / SCHEDULER_FOLDER)
    else:
        sources["scheduler"] = "pipeline"
    if args.timesteps or args.sigmas or args.num_inference_steps is not None:
        sources["steps"] = (
            "--timesteps" if args.timesteps else "--sigmas" if args.sigmas else "--num_inference_steps"
        )
    elif getattr(args, "teacher", False):
        sources["steps"] = "pipeline default"  # the number: fill_teacher_steps, once the pipeline is loaded
    else:
        sources["steps"] = f"default {DEFAULT_STEPS}"
        for file, (saved_key, own_key) in SIGMA_FILES.items():
            if run is None or not (run / file).is_file():
                continue
            key = saved_key if out["scheduler"] is not None else own_key
            saved = json.loads((run / file).read_text(encoding="utf-8"))
            sigmas = saved.get(key) if key and isinstance(saved, dict) else saved
            if (
                not isinstance(sigmas, list)
                or not sigmas
                or not all(isinstance(v, (int, float)) for v in sigmas)
            ):
                raise ValueError(
                    f"Expected {run / file} to hold the student's sigmas (a list of numbers"
                    f"{f' under {key!r}' if key else ''}), but it holds {saved!r}. Pass --sigmas instead."
                )
            out["sigmas"] = [float(v) for v in sigmas]
            sources["steps"] = str(run / file)
            # flow_dmd2 with a grid starting below 1: the generator's start, sigma_0 z
            if record is not None and record.get("initial_noise_scale") is not None:
                out["initial_noise_scale"] = float(record["initial_noise_scale"])
                sources["initial_noise_scale"] = record_file
            if record is not None and record.get("grid_size") is not None:
                out["grid_size"] = [int(v) for v in record["grid_size"]]
            if isinstance(saved, dict) and saved.get("guidance") is not None and args.guidance_scale is None:
                out["guidance_scale"] = float(saved["guidance"])
                sources["guidance_scale"] = str(run / file)
            break
        timesteps_file = run / student_sampler.TIMESTEPS_FILE if run is not None else None
        one_step = out["sigmas"] is None and timesteps_file is not None and timesteps_file.is_file()
        # the timesteps belong to the run's scheduler, whose spacing sets the input
        if one_step and out["scheduler"] is None:
            warnings.warn(
                f"The run's one-step sampler ({timesteps_file} with its scheduler/) is not used: --scheduler / "
                f"--scheduler_config replace its scheduler, whose timestep_spacing sets what the generator is fed. "
                f"Pass --timesteps too, or neither option to sample it as the run's validation does.",
                UserWarning,
                stacklevel=2,
            )
        elif one_step:
            timesteps = json.loads(timesteps_file.read_text(encoding="utf-8"))
            if not isinstance(timesteps, list) or not timesteps or not all(type(v) is int for v in timesteps):
                raise ValueError(
                    f"Expected {timesteps_file} to hold the student's timesteps (a list of integers), but it holds "
                    f"{timesteps!r}. Pass --timesteps instead."
                )
            out["timesteps"] = timesteps
            sources["steps"] = str(timesteps_file)
    if args.guidance_scale is not None:
        sources["guidance_scale"] = "--guidance_scale"
    elif record is not None and "guidance_scale" in record:  # the record wins over an older grid's guidance
        value = record["guidance_scale"]
        out["guidance_scale"] = None if value is None else float(value)
        sources["guidance_scale"] = record_file
    if (
        record is not None
        and record.get("guidance_scale_2") is not None
        and getattr(args, "guidance_scale_2", None) is None
    ):
        out["guidance_scale_2"] = float(record["guidance_scale_2"])
    if getattr(args, "max_sequence_length", None) is not None:
        sources["max_sequence_length"] = "--max_sequence_length"
    elif record is not None and record.get("max_sequence_length") is not None:
        out["max_sequence_length"] = int(record["max_sequence_length"])
        sources["max_sequence_length"] = record_file
    if record is not None and record.get("height") is not None:
        out["trained_size"] = [int(record["height"]), int(record.get("width") or record["height"])]
        out["trained_size_source"] = record_file
        # a multi-aspect run trained at every bucket (the record's size is its validation size)
        out["trained_sizes"] = [[int(v) for v in size] for size in record.get("aspect_buckets") or []]
        if record.get("num_frames") is not None:
            out["trained_num_frames"] = int(record["num_frames"])
    grids = run / aspect_buckets.GRIDS_FILE if run is not None else None
    if grids is not None and grids.is_file() and out["sigmas"] is not None and out["scheduler"] is not None:
        # each bucket's own grid (flow_dmd2 / flow_tscd --aspect_buckets), on the run's saved scheduler
        out["grids_by_size"] = json.loads(grids.read_text(encoding="utf-8"))
        out["grids_by_size_source"] = str(grids)
    return out


def fill_trained_size(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """A student's trained size where the options leave the size open: ``--resolution`` x ``--width`` from its
    run's ``student_sampler.json`` (``height`` / ``width``) when neither is given, its ``height`` when only
    ``--width`` is, and a video's ``--num_frames`` when not given; ``saved["sources"]`` names the file
    (``size``, ``num_frames``). ``--resolution`` alone stays square. Then a multi-aspect run's grid for the
    generated size, when the run saved one for it (``student_sigmas_by_size.json``; ``saved["sources"]["steps"]``
    names it and ``saved["grid_size"]`` is that size). :func:`check_trained_size` warns at an untrained size."""
    trained = saved.get("trained_size")
    if trained is None:
        return
    if args.resolution is None:
        given_width = getattr(args, "width", None)
        args.resolution, args.width = int(trained[0]), int(trained[1]) if given_width is None else given_width
        saved["sources"]["size"] = saved["trained_size_source"]
    frames = saved.get("trained_num_frames")
    if frames is not None and getattr(args, "num_frames", "absent") is None:
        args.num_frames = frames
        saved["sources"]["num_frames"] = saved["trained_size_source"]
    size = generated_size(args)
    grid = (saved.get("grids_by_size") or {}).get(f"{size[0]}x{size[1]}")
    if grid is not None:
        saved["sigmas"] = [float(v) for v in grid]
        if saved.get("grid_size") is not None:  # a size-dependent grid (FLUX / Qwen-Image): this size's
            saved["grid_size"] = size
        saved["sources"]["steps"] = saved["grids_by_size_source"]


def set_sampler(pipe: Any, args: argparse.Namespace, saved: dict[str, Any] | None = None) -> None:
    """``--scheduler`` (a diffusers scheduler class name; default: the pipeline's own) built from the pipeline's
    scheduler config with the ``--scheduler_config`` overrides (e.g. ``timestep_spacing=trailing``,
    ``prediction_type=sample`` for an x0 student); without either, the run folder's saved ``scheduler/``
    (``saved``, :func:`read_saved_sampler`) when there is one.

    Args:
        pipe: the diffusers pipeline.
        args: the options.
        saved: :func:`read_saved_sampler` of ``args`` (None: read here).
    """
    import diffusers

    overrides = parse_overrides(args.scheduler_config)
    if not args.scheduler and not overrides:
        folder = (saved if saved is not None else read_saved_sampler(args))["scheduler"]
        if folder is not None:
            config = json.loads((Path(folder) / "scheduler_config.json").read_text(encoding="utf-8"))
            pipe.scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(str(folder))
        return
    cls = getattr(diffusers, args.scheduler) if args.scheduler else type(pipe.scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def default_steps(pipe: Any) -> int | None:
    """The ``num_inference_steps`` a pipeline's call defaults to (SDXL 50, SD3 / FLUX 28, Wan 50), or None if it
    has no integer default."""
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = None if parameter is None else parameter.default
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def fill_teacher_steps(pipe: Any, args: argparse.Namespace) -> None:
    """A ``--teacher`` without ``--num_inference_steps`` / ``--timesteps`` / ``--sigmas`` samples at the
    pipeline's own default (:func:`default_steps`; our choice: the teacher row of a table is the teacher as its
    users sample it, not the students' 4 steps), written into ``args`` so that the call and the record hold it.

    Args:
        pipe: the loaded pipeline.
        args: the options (changed in place).

    Raises:
        ValueError: if the pipeline's call has no default step count (pass ``--num_inference_steps``).
    """
    if (
        not getattr(args, "teacher", False)
        or args.num_inference_steps is not None
        or args.timesteps
        or args.sigmas
    ):
        return
    steps = default_steps(pipe)
    if steps is None:
        raise ValueError(
            f"Expected --num_inference_steps with --teacher: {type(pipe).__name__}'s call has no default step count. "
            "Pass the steps the teacher is sampled with (e.g. --num_inference_steps 50)."
        )
    args.num_inference_steps = steps
    sources = (getattr(args, "saved_sampler", None) or {}).get("sources")
    if sources is not None:
        sources["steps"] = f"pipeline default {steps}"


def default_guidance(pipe: Any) -> float | None:
    """The ``guidance_scale`` a pipeline's call defaults to (SDXL 5, SD3 7, FLUX 3.5), or None if it takes none or
    defaults to None (``QwenImagePipeline``: a guidance-distilled model's input; its CFG is ``true_cfg_scale``)."""
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    if parameter is None or parameter.default in (inspect.Parameter.empty, None):
        return None
    return float(parameter.default)


def guidance_embedding(pipe: Any) -> bool | None:
    """Whether the pipeline's transformer takes the guidance as an input (``guidance_embeds``: FLUX.1-dev True,
    FLUX.1-schnell False), or None when it has no such setting (``guidance_scale`` is then classifier-free
    guidance, or absent)."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    value = getattr(config, "guidance_embeds", None)
    return None if value is None else bool(value)


def ignores_guidance_scale(pipe: Any) -> bool:
    """Whether the pipeline takes ``guidance_scale`` but runs without it: a ``FluxPipeline`` whose transformer has
    no guidance embedding (FLUX.1-schnell) passes no guidance to it and makes one denoiser call a step; its
    classifier-free guidance is ``true_cfg_scale`` (with a negative prompt). Not :data:`TRUE_CFG_NEGATIVE` pipelines
    (Qwen-Image), whose ``--guidance_scale`` becomes their ``true_cfg_scale``."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return (
        guidance_embedding(pipe) is False
        and {"guidance_scale", "true_cfg_scale"} <= set(params)
        and type(pipe).__name__ not in TRUE_CFG_NEGATIVE
    )


def text_length(pipe: Any, args: argparse.Namespace) -> int | None:
    """The prompt length (tokens of the T5 / umT5 / Qwen text encoder) the pipeline runs at: ``--max_sequence_length``
    (or the run folder's record, :func:`read_saved_sampler`), else its call's default (SD3 256, FLUX and Wan 512);
    None for a pipeline that takes no ``max_sequence_length`` (SDXL)."""
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if parameter is None:
        return None
    given = getattr(args, "max_sequence_length", None)
    if given is not None:
        return int(given)
    return None if parameter.default in (inspect.Parameter.empty, None) else int(parameter.default)


def size_multiple(pipe: Any) -> int:
    """The multiple of which a generated side must be for the pipeline to keep it: the VAE's scale factor times the
    latent patch size (SDXL 8; SD3 8 x 2 = 16; FLUX / Qwen-Image 8 x their 2x2 packing = 16, the factor of their
    image processor). SD3 refuses other sizes when called; FLUX and Qwen-Image round them down with a logged
    warning, so the images would not have the recorded resolution."""
    processor = getattr(getattr(pipe, "image_processor", None), "config", None)
    multiple = int(getattr(processor, "vae_scale_factor", None) or 8)
    factor, patch = getattr(pipe, "vae_scale_factor", None), getattr(pipe, "patch_size", None)
    # SD3: the VAE's factor x the transformer's patches (FLUX / Qwen-Image: in their image processor's factor)
    if isinstance(factor, int) and isinstance(patch, int):
        multiple = max(multiple, factor * patch)
    return multiple


def check_pipeline_options(pipe: Any, args: argparse.Namespace) -> None:
    """Refuse image options the loaded pipeline would change or not take: a ``--resolution`` or ``--width`` that is
    not a multiple of :func:`size_multiple` (naming the nearest sizes it keeps), a ``--max_sequence_length`` (given, or from the
    run folder's ``student_sampler.json``) for a pipeline without a text length (SDXL: CLIP's 77 tokens).

    Args:
        pipe: the diffusers pipeline.
        args: the options (``--resolution``, ``--width``, ``--max_sequence_length``).

    Raises:
        ValueError: naming the option, what the pipeline needs and the sizes to pass.
    """
    name = type(pipe).__name__
    multiple = size_multiple(pipe)
    height = args.resolution
    width = getattr(args, "width", None) or height
    for option, size in (("--resolution", height), ("--width", width)):
        if size is not None and size % multiple:
            lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"Expected {option} a multiple of {multiple} for {name} (the VAE's scale factor x the latent patch "
                f"size), but got {size}: the pipeline would not generate {height} x {width} images. Pass {option} "
                f"{nearest}."
            )
    length = getattr(args, "max_sequence_length", None)
    if length is not None and text_length(pipe, args) is None:
        source = (getattr(args, "saved_sampler", None) or {}).get("sources", {}).get("max_sequence_length")
        option = source in (None, "--max_sequence_length")
        raise ValueError(
            f"Expected a pipeline with a T5-like text encoder for "
            f"{'--max_sequence_length' if option else f'the max_sequence_length of {source}'} ({length}), but "
            f"{name} takes none (its prompts are encoded at its tokenizers' length): "
            f"{'drop --max_sequence_length' if option else 'evaluate the run with the pipeline it was trained on'}."
        )


def resolve_sampler(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the sampler a student's run folder saved filled in where the options leave it open
    (:func:`read_saved_sampler`): ``sigmas`` or ``timesteps``, ``guidance_scale``, ``max_sequence_length``, ``num_inference_steps``
    (else :data:`DEFAULT_STEPS`; a ``--teacher``'s stays None until :func:`fill_teacher_steps`), and ``saved_sampler`` (the saved values and the source of each; Wan 2.2 A14B's
    ``guidance_scale_2`` is filled in by :func:`evaluation.video_generation.load_pipeline`, which knows whether the
    pipeline has that expert). Idempotent.

    Args:
        args: the parsed options.

    Returns:
        The same namespace, filled in.
    """
    if getattr(args, "saved_sampler", None) is not None:
        return args
    saved = read_saved_sampler(args)
    fill_trained_size(args, saved)  # the size, then a multi-aspect run's grid for it
    if saved["sigmas"] is not None:
        args.sigmas = saved["sigmas"]
    if saved["timesteps"] is not None:
        args.timesteps = saved["timesteps"]
    if saved["guidance_scale"] is not None:
        args.guidance_scale = saved["guidance_scale"]
    if saved["max_sequence_length"] is not None:
        args.max_sequence_length = saved["max_sequence_length"]
    teacher = getattr(
        args, "teacher", False
    )  # the pipeline's own steps: fill_teacher_steps, with the pipeline
    if args.num_inference_steps is None and not (args.timesteps or args.sigmas) and not teacher:
        args.num_inference_steps = DEFAULT_STEPS
        if saved["scheduler"] is not None:  # e.g. flow_ladd: its grid is the run's --student_sigmas
            warnings.warn(
                f"The student's saved {saved['scheduler']} is used with the default {DEFAULT_STEPS} steps: the run "
                "folder saves no grid. Pass the steps (or --sigmas / --timesteps) it was trained for.",
                UserWarning,
                stacklevel=2,
            )
    args.saved_sampler = saved
    return args


def sampler_record(
    pipe: Any, args: argparse.Namespace, accelerator: Any = None, resolved: tuple[str, Path] | None = None
) -> dict[str, Any]:
    """What the images were sampled with (the protocol record's ``generator`` entry): the model, the student's
    weights (path, kind, SHA-256 of the files loaded -- hashed by the main process of ``accelerator`` and
    broadcast, :func:`shared_weights_sha256` --, LoRA scale and base, the folder loaded when not the path given),
    the sampler, steps, the guidance the pipeline runs with, dtype, the generated resolution, the prompt length
    (``max_sequence_length``, pipelines with a T5-like encoder), the size the saved grid was shifted for
    (``grid_size``, when the run recorded one) and where each sampler setting came from (``sampler_sources``: an
    option, a file of the run folder, or the pipeline). ``resolved``: the student's ``(kind, path)`` when the caller
    resolved it (default :func:`resolve_student` of the pipeline's denoiser).

    The guidance: ``--guidance_scale``, else the run's ``student_sampler.json`` / ``student_grid.json``, else the
    pipeline's default (:func:`default_guidance`; a student then gets a warning when that default is CFG: a distilled
    student mostly takes 0 or 1). A run that recorded None (FLUX.1-schnell), and a pipeline that ignores
    ``guidance_scale`` (:func:`ignores_guidance_scale`), record None. A saved grid shifted for another size than the
    one generated gets a warning (:func:`check_grid_size`)."""
    student: dict[str, Any] | None = None
    saved = getattr(args, "saved_sampler", None) or {}
    sources = dict(saved.get("sources", {}))
    guidance = args.guidance_scale
    if ignores_guidance_scale(pipe):  # FLUX.1-schnell: no guidance input, one denoiser call a step
        guidance = None
        sources["guidance_scale"] = (
            f"none: {type(pipe).__name__}'s transformer has no guidance embedding (FLUX.1-schnell), so it ignores "
            "guidance_scale; its classifier-free guidance is true_cfg_scale"
        )
    elif guidance is None and "guidance_scale" not in sources:
        guidance = default_guidance(pipe)
        sources["guidance_scale"] = "pipeline default"
        # FLUX.1-dev's guidance_scale is an input of the distilled transformer (guidance_embeds), not CFG
        if not args.teacher and guidance is not None and guidance > 1 and not guidance_embedding(pipe):
            warnings.warn(
                f"The student is sampled with {type(pipe).__name__}'s default guidance_scale {guidance} (classifier-"
                "free guidance, 2 denoiser calls a step), as --guidance_scale was not given. Distilled students "
                "mostly take 0 or 1 (the guidance is baked in): pass the value the student was trained for.",
                UserWarning,
                stacklevel=2,
            )
    if args.student_weights and not args.teacher:
        kind, path = resolved or resolve_student(args.student_weights, denoiser_name(pipe))
        digest = shared_weights_sha256(kind, path, accelerator)
        student = {"path": str(args.student_weights), "kind": kind, "sha256": digest}
        if kind == "lora":
            student["lora_scale"] = lora_scale(args)
            if getattr(args, "lora_base", None) is not None:
                student["lora_base"] = str(args.lora_base)
        elif path != Path(args.student_weights):
            student["loaded"] = str(path)
    record = {
        "model": str(args.pretrained_model_name_or_path),
        **model_commit(args),
        "revision": args.revision,
        "variant": args.variant,
        "role": "teacher" if args.teacher else "student",
        "student_weights": student,
        "resolution": args.resolution,
        **({"width": width} if (width := generated_size(args)[1]) != args.resolution else {}),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": parse_overrides(args.scheduler_config),
        "num_inference_steps": None if (args.timesteps or args.sigmas) else args.num_inference_steps,
        "timesteps": args.timesteps,
        "sigmas": args.sigmas,
        **({"initial_noise_scale": scale} if (scale := saved.get("initial_noise_scale")) is not None else {}),
        # the SDXL one-step generators' saved Euler scheduler: its spacing sets the input (z or sigma_t z)
        **({"timestep_spacing": pipe.scheduler.config.timestep_spacing} if saved.get("timesteps") else {}),
        "guidance_scale": guidance,
        "dtype": args.dtype,
        "sampler_sources": sources,
    }
    length = text_length(pipe, args)
    if length is not None:  # the T5 / umT5 / Qwen prompt length (not in records of pipelines without one)
        record["max_sequence_length"] = length
        sources.setdefault("max_sequence_length", "pipeline default")
    grid_size = check_grid_size(args, saved.get("grid_size"), saved.get("grids_by_size_source"))
    if grid_size is not None:
        record["grid_size"] = grid_size
    trained = check_trained_size(
        args, saved.get("trained_size"), warn=grid_size is None, buckets=saved.get("trained_sizes")
    )
    if trained is not None:
        record["trained_size"] = trained
    negative = call_kwargs(args, pipe).get("negative_prompt")
    if negative is not None:  # true CFG (Qwen-Image): the negative prompt is part of the guidance
        record["negative_prompt"] = negative
    return record


def model_commit(args: argparse.Namespace) -> dict[str, str]:
    """``{"model_commit": ...}``: the commit a Hub id's ``--revision`` (default ``main``, which moves) resolved to
    in the local cache when the pipeline was loaded (:func:`diffdistill.metrics.protocol.hub_commit` of its
    ``model_index.json``); ``{}`` for a local folder (its student weights are hashed; the base folder is named)."""
    from diffdistill.metrics.protocol import hub_commit

    model = str(args.pretrained_model_name_or_path)
    if Path(model).exists():
        return {}
    commit = hub_commit(model, args.revision, filename="model_index.json")
    return {} if commit is None else {"model_commit": commit}


def generated_size(args: argparse.Namespace) -> list[int]:
    """``[height, width]`` of the images / videos generated: ``--resolution`` x (``--width`` or square)."""
    return [int(args.resolution), int(getattr(args, "width", None) or args.resolution)]


def check_grid_size(
    args: argparse.Namespace, grid_size: Sequence[int] | None, bucket_grids: str | None = None
) -> list[int] | None:
    """Warn when the run folder's grid was shifted for another size than the one generated: flow_dmd2 / flow_tscd
    save the schedule of the trained ``--resolution`` x ``--width`` (``grid_size`` of ``student_sampler.json``) for a
    model with a size-dependent shift (FLUX, Qwen-Image: ``use_dynamic_shifting``), and the saved grid is used as it
    is; ``bucket_grids``: a multi-aspect run's ``student_sigmas_by_size.json``, which the warning names. Returns
    ``grid_size`` as a list (None when the run recorded none or its grid is not used)."""
    if grid_size is None or not args.sigmas:
        return None
    grid, size = [int(v) for v in grid_size], generated_size(args)
    if grid != size:
        warnings.warn(
            f"The student's saved grid {[round(s, 4) for s in args.sigmas]} is the schedule shifted for "
            f"{grid[0]} x {grid[1]} (the trained size), but the images are generated at {size[0]} x {size[1]}: "
            f"their model's own schedule would shift by another amount. Pass --resolution {grid[0]}"
            f"{f' --width {grid[1]}' if grid[1] != grid[0] else ''} to evaluate at the trained size, or --sigmas / "
            "--num_inference_steps for another grid (the record holds both sizes)."
            + (f" {bucket_grids} holds the grid of each trained size." if bucket_grids else ""),
            UserWarning,
            stacklevel=3,
        )
    return grid


def check_trained_size(
    args: argparse.Namespace,
    trained: Sequence[int] | None,
    *,
    warn: bool = True,
    buckets: Sequence[Sequence[int]] | None = None,
) -> list[int] | None:
    """Warn (when ``warn``: :func:`check_grid_size` has not already) when the images are generated at another size
    than the student was trained at (``height`` / ``width`` of its ``student_sampler.json``, or any of a multi-aspect
    run's ``buckets``): a few-step student is evaluated off its training distribution there. Returns the trained
    size (None when the run recorded none)."""
    if trained is None:
        return None
    trained, size = [int(v) for v in trained], generated_size(args)
    sizes = [[int(v) for v in b] for b in buckets or []] or [trained]
    if warn and size not in sizes:
        named = " / ".join(f"{h} x {w}" for h, w in sizes)
        warnings.warn(
            f"The student was trained at {named} (its run's student_sampler.json), but the images are generated at "
            f"{size[0]} x {size[1]}. Pass --resolution {trained[0]}"
            f"{f' --width {trained[1]}' if trained[1] != trained[0] else ''} to evaluate it at its trained size (the "
            "record holds both sizes).",
            UserWarning,
            stacklevel=3,
        )
    return trained


MANIFEST_NAME = "generation.json"
"""The record a generating run writes into its image folder before the first image: the sampler record, the seed,
the quantisation and the prompt of every index. A rerun resumes only when they agree with the folder's images."""


def manifest_quantization(manifest: dict[str, Any]) -> str:
    """The quantisation a folder's record names (``"round"`` for records written before the option existed, when
    every image was rounded)."""
    return str(manifest.get("quantization", "round"))


def check_resume(
    folder: str | Path,
    prompts: Sequence[str],
    seed: int,
    generator: dict[str, Any],
    *,
    write: bool,
    quantization: str = "round",
    entries: str = "[0-9]*.png",
) -> None:
    """Refuse to resume into an image folder whose images were made otherwise; record (``write``) how they are made.

    Images are reused by index, so a rerun may only add images: with the same sampler record (model, student weights
    and their hash, sampler, steps, guidance, dtype, resolution), seed and quantisation, and -- for every image
    already there -- the same prompt at its index (a longer or shorter prompt list is fine). Images without a
    record (written by something else) are refused too: score such a folder with ``--images``.

    Args:
        folder: the image folder.
        prompts: all prompts of this run.
        seed: the base seed.
        generator: :func:`sampler_record` of this run.
        write: whether this process writes the updated record (the main process; the others only check).
        quantization: how this run turns images into uint8 (:data:`QUANTIZATIONS`).
        entries: the glob of the folder's items named by index (``"[0-9]*.png"``; a video folder's
            ``"[0-9]*"``: one folder of frames per video).

    Raises:
        ValueError: naming the first difference and how to proceed.
    """
    import json

    folder = Path(folder)
    record_path = folder / MANIFEST_NAME
    existing = sorted(p for p in folder.glob(entries)) if folder.is_dir() else []
    recorded: list[str] = []
    old: dict[str, Any] = {}
    if record_path.is_file():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        old["quantization"] = manifest_quantization(old)
        for key, now in (("generator", generator), ("seed", int(seed)), ("quantization", quantization)):
            if old.get(key) != json.loads(json.dumps(now)):
                raise ValueError(
                    f"Expected the images in {folder} to have been generated with this run's {key}, but they were "
                    f"made with {key} = {old.get(key)!r} and this run has {now!r}. Choose another --output_dir, or "
                    "delete the folder to regenerate."
                )
        recorded = list(old.get("prompts", []))
    elif existing:
        raise ValueError(
            f"Expected {folder} to hold images this script generated (with {MANIFEST_NAME}), but it holds "
            f"{len(existing)} images without a record. Score them with --images {folder}, or choose another "
            "--output_dir."
        )
    for file in existing:
        index = int(file.stem) if file.stem.isdigit() else -1
        if 0 <= index < len(prompts) and (index >= len(recorded) or recorded[index] != prompts[index]):
            raise ValueError(
                f"Expected image {file.name} in {folder} to show prompt {index} of this run ({prompts[index]!r}), "
                f"but it was generated for "
                f"{recorded[index] if index < len(recorded) else 'a prompt the record does not hold'!r}. "
                "Choose another --output_dir for another prompt file, or delete the folder."
            )
    if write:
        from .records import write_results

        merged = list(prompts) + recorded[len(prompts) :]  # keep prompts of images beyond this run's list
        record = {"generator": generator, "seed": int(seed), "quantization": quantization, "prompts": merged}
        present = {int(f.stem) for f in existing if f.stem.isdigit()}
        adds = any(i not in present for i in range(len(prompts)))  # a resume that generates images
        record.update(resume_versions(old, bool(existing) and adds, folder))
        write_results(record_path, record)


def resume_versions(old: dict[str, Any], mixes: bool, folder: Path) -> dict[str, Any]:
    """The package versions of an image folder's record: ``versions``, those of the run that generated its first
    images (kept on resume; None for a folder recorded before versions were), and ``resumed_versions``, every other
    set a resumed run added images with -- with a warning, as kernels and schedulers may differ between releases
    and the folder then mixes images of both.

    Args:
        old: the folder's record so far (``{}``: none).
        mixes: whether this run adds images to a folder that holds some.
        folder: the image folder (named in the warning).

    Returns:
        ``{"versions": ..., "resumed_versions": [...]}``.
    """
    from diffdistill.metrics.protocol import package_versions

    from .metric_specs import PACKAGES

    now = package_versions(PACKAGES)
    if not old:
        return {"versions": now, "resumed_versions": []}
    first, resumed = old.get("versions"), list(old.get("resumed_versions", []))
    if mixes and first != now and now not in resumed:
        resumed.append(now)
        changed = sorted(k for k in now if (first or {}).get(k) != now[k])
        before = {k: (first or {}).get(k) for k in changed} if first else "not recorded"
        warnings.warn(
            f"The images in {folder} were generated with other package versions ({', '.join(changed)}: {before}) "
            f"than this run's ({ {k: now[k] for k in changed} }): "
            "the folder will mix images of both (recorded as resumed_versions). Choose another --output_dir to "
            "generate every image with these versions.",
            UserWarning,
            stacklevel=3,
        )
    return {"versions": first, "resumed_versions": resumed}


def declared_record(args: argparse.Namespace, quantization: str) -> dict[str, Any]:
    """The ``generator`` entry of an ``--images`` folder without ``generation.json`` (made elsewhere): the seed and
    the quantisation are what the options declare (``--seed``, ``--quantization``, default round), not facts the
    script read, and are recorded under ``declared``; a warning when the quantisation was not given (DMD2's
    evaluation truncates: ``--quantization truncate``)."""
    if getattr(args, "quantization", None) is None:
        warnings.warn(
            f"--images {args.images} has no {MANIFEST_NAME}: its quantisation is declared 'round' by default "
            f"(diffusers' numpy_to_pil) and its seed --seed {args.seed}, as nothing records them. Pass --quantization "
            "truncate for folders made as DMD2's evaluation makes them.",
            UserWarning,
            stacklevel=2,
        )
    return {
        "images": f"made elsewhere (no {MANIFEST_NAME})",
        "declared": {
            "seed": int(args.seed),
            "quantization": quantization,
            "quantization_source": "--quantization" if getattr(args, "quantization", None) else "default",
        },
    }


def with_generation_versions(record: dict[str, Any] | None, folder: str | Path) -> dict[str, Any] | None:
    """``record`` (a ``generator`` entry) with the package versions of the folder's ``generation.json``
    (``generation_versions``, and ``resumed_versions`` when a resumed run added images with others,
    :func:`resume_versions`); as it is without a record (or one from before versions were recorded)."""
    manifest = read_manifest(folder)
    if record is None or manifest is None or "versions" not in manifest:
        return record
    out = dict(record) | {"generation_versions": manifest["versions"]}
    if manifest.get("resumed_versions"):
        out["resumed_versions"] = manifest["resumed_versions"]
    return out


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The generation record of an image folder (``{"generator", "seed", "quantization", "prompts", "versions",
    "resumed_versions"}``), or None."""
    import json

    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


TRUE_CFG_NEGATIVE = {"QwenImagePipeline": " "}
"""Pipelines whose classifier-free guidance is ``true_cfg_scale`` with a negative prompt (``guidance_scale`` is
their guidance-distilled models' input, ignored otherwise), and the negative prompt used: diffusers' Qwen-Image docs
pass ``" "``."""


def call_kwargs(args: argparse.Namespace, pipe: Any = None) -> dict[str, Any]:
    """The pipeline call's sampler arguments from the options (only those given, so each pipeline keeps its
    defaults for the rest). ``--guidance_scale`` of a :data:`TRUE_CFG_NEGATIVE` pipeline (Qwen-Image) is its
    ``true_cfg_scale`` with that negative prompt, so the guidance the record names is the guidance that ran.
    ``--max_sequence_length`` (or the run's record of it) goes to the pipelines that take it (SD3, FLUX,
    Qwen-Image: :func:`check_pipeline_options` refuses it for the others)."""
    kw: dict[str, Any] = {"height": args.resolution, "width": generated_size(args)[1]}
    if getattr(args, "max_sequence_length", None) is not None:
        kw["max_sequence_length"] = int(args.max_sequence_length)
    if args.timesteps:
        kw["timesteps"] = list(args.timesteps)
    elif args.sigmas:
        kw["sigmas"] = list(args.sigmas)
    elif args.num_inference_steps is not None or not getattr(args, "teacher", False):
        kw["num_inference_steps"] = args.num_inference_steps or DEFAULT_STEPS
    # else: a teacher before fill_teacher_steps -- the pipeline's own default
    if args.guidance_scale is None:
        return kw
    negative = TRUE_CFG_NEGATIVE.get(type(pipe).__name__) if pipe is not None else None
    if negative is None:
        kw["guidance_scale"] = args.guidance_scale
    else:
        kw["true_cfg_scale"] = args.guidance_scale
        if args.guidance_scale > 1:
            kw["negative_prompt"] = negative
    return kw


def to_uint8(images: torch.Tensor, quantization: str = "round") -> torch.Tensor:
    """Float images in ``[0, 1]`` (N, 3, H, W) -> uint8 (N, H, W, 3): ``y = 255 x`` in float32, then

    * ``"round"``: ``round(y)`` (halves to even), as diffusers' ``numpy_to_pil`` (``(x * 255).round()``) -- ours;
    * ``"truncate"``: ``floor(y)``, as DMD2's evaluation (``main/sdxl/test_folder_sdxl.py``: ``(torch.tensor(images,
      dtype=torch.float32) * 255.0).to(torch.uint8)`` on the pipelines' ``output_type="np"`` images): one
      level below rounding wherever the fraction of ``y`` exceeds one half, or equals it above an odd level
      (``round`` takes halves to the even neighbour), so the images are half a level darker on average.

    Non-finite pixels are refused (:func:`check_finite`): ``clamp`` keeps NaN, and its cast to uint8 is undefined
    (0 on CPUs: a black image that FID and the CLIP score would take for a generated one).

    Raises:
        ValueError: for another ``quantization``, or images with NaN / infinite pixels.
    """
    check_finite(images)
    y = images.float().clamp(0, 1) * 255
    if quantization == "round":
        y = y.round()
    elif quantization != "truncate":
        raise ValueError(f"Expected quantization in {QUANTIZATIONS}, but got {quantization!r}.")
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu()  # the cast truncates (y >= 0)


def check_finite(images: torch.Tensor, indices: Sequence[int] | None = None) -> None:
    """Refuse generated images (or videos) with NaN / infinite pixels, before any is written.

    Our choice: refuse rather than count and score them. Written as uint8 they become black / white images that
    look plausible to every metric (FID rises by an amount nobody can tell from a real regression), and a resumed
    run would reuse them; a stopped run with the indices named costs less than a wrong number.

    Args:
        images: ``(N, ...)`` float images (or ``(N, F, 3, H, W)`` videos).
        indices: the images' indices in the prompt set (default ``0 .. N-1``).

    Raises:
        ValueError: naming the images with non-finite pixels and the usual causes.
    """
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return
    names = list(range(images.shape[0])) if indices is None else list(indices)
    bad = [int(names[k]) for k in torch.nonzero(~finite).flatten().tolist()]
    raise ValueError(
        f"Expected finite pixels, but the sampler returned NaN / infinite values for {len(bad)} of {len(names)} "
        f"images (indices {bad[:20]}{' ...' if len(bad) > 20 else ''}); nothing of this batch was written. Usual "
        "causes: a float16 VAE overflowing (SDXL's VAE: pass --dtype float32 or bfloat16, or a VAE with "
        "force_upcast), a diverged student (check its training losses / validation images), or a sampler "
        "setting outside what the model supports."
    )


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (H, W, 3) image atomically: a temporary name in the same folder, then a rename."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_image(image: torch.Tensor, folder: Path, index: int, quantization: str) -> None:
    """Write one generated image (float ``[0, 1]`` (3, H, W)) as ``folder/{index:06d}.png`` (:func:`to_uint8`)."""
    save_png(to_uint8(image[None], quantization)[0], image_path(folder, index))


@torch.no_grad()
def generate_images(
    sample: Callable[[list[str], list[torch.Generator]], torch.Tensor],
    prompts: Sequence[str],
    indices: Sequence[int],
    folder: str | Path,
    *,
    seed: int,
    batch_size: int,
    progress: Any = None,
    quantization: str = "round",
    save: Callable[[torch.Tensor, Path, int, str], None] = save_image,
    absent: Callable[[Path, Sequence[int]], list[int]] = missing,
) -> list[int]:
    """Generate and write the images of ``indices`` that are missing from ``folder``; return those generated.

    Args:
        sample: ``sample(prompts, generators) -> images`` float in ``[0, 1]`` (N, 3, H, W), e.g. a pipeline call
            (:func:`pipeline_sampler`); ``generators[k]`` is image ``k``'s own CPU generator.
        prompts: all prompts (indexed by ``indices``).
        indices: the prompts this process handles.
        folder: the image folder.
        seed: the base seed; prompt ``i`` uses ``seed + i``.
        batch_size: prompts per call.
        progress: a tqdm bar to advance by one per image (or None).
        quantization: how the images become uint8 (:func:`to_uint8`).
        save: ``save(output k, folder, index, quantization)`` writes one sample (:func:`save_image`; a video's:
            :func:`evaluation.video_generation.save_video`).
        absent: ``absent(folder, indices)``: those not written yet (:func:`missing`).

    Returns:
        The indices generated now (the others existed).

    Raises:
        ValueError: if a batch holds NaN / infinite pixels (:func:`check_finite`; nothing of it is written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = absent(folder, indices)
    if progress is not None:
        progress.update(len(indices) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        gens = [torch.Generator().manual_seed(int(seed) + SEED_STRIDE * i) for i in batch]
        outputs = sample([prompts[i] for i in batch], gens)
        check_finite(outputs, batch)  # before any of the batch is written, with the prompts' indices
        for i, output in zip(batch, outputs):
            save(output, folder, i, quantization)
        if progress is not None:
            progress.update(len(batch))
    return todo


def pipeline_sampler(
    pipe: Any, kwargs: dict[str, Any], field: str = "images"
) -> Callable[[list[str], list[torch.Generator]], torch.Tensor]:
    """``sample(prompts, generators)`` calling ``pipe`` with the sampler arguments ``kwargs`` (``output_type="pt"``:
    float images in ``[0, 1]``; ``field="frames"``: a video pipeline's ``(N, F, 3, H, W)`` videos).

    A stochastic scheduler (``stochastic_sampling``: flow_dmd2's saved DMD2 sampler) draws its re-noising noise from
    torch's global generator, not from the per-image generators, so a batch's images would depend on the batch and
    on what ran before. Then each image is sampled alone after seeding the global generator from its own seed: the
    same image whatever the batch size, the process split or a resume. The seed is
    ``training.student_sampler.renoise_seed`` of the image's seed, the stream flow_dmd2's validation re-noises from,
    not the image's seed itself: the first draw would then be the initial noise again (FLUX: its numbers in the
    packed order), and the first step the deterministic Euler step instead of DMD2's fresh re-noising (audit 9)."""

    def call(prompts: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        extra = dict(kwargs)
        if isinstance(extra.get("negative_prompt"), str):  # one per prompt, as the pipelines batch them
            extra["negative_prompt"] = [extra["negative_prompt"]] * len(prompts)
        return getattr(pipe(prompt=prompts, generator=generators, output_type="pt", **extra), field)

    def sample(prompts: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        if not getattr(pipe.scheduler.config, "stochastic_sampling", False):
            return call(prompts, generators)
        from training import student_sampler

        images = []
        for prompt, generator in zip(prompts, generators):
            torch.manual_seed(student_sampler.renoise_seed(generator.initial_seed()))
            images.append(call([prompt], [generator]))
        return torch.cat(images)

    return sample
