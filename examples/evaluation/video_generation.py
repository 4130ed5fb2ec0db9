"""Generating and scoring the evaluation videos of a Wan text-to-video student (or its teacher): ``WanPipeline``
folders of Wan 2.1, Wan 2.2 TI2V-5B and Wan 2.2 A14B, as the flow scripts distil them.

What is the image path's (:mod:`evaluation.generation`), and what changes for videos:

* the pipeline is ``WanPipeline`` itself, so prompt encoding, CFG (A14B: ``guidance_scale`` where the high-noise
  expert runs, ``guidance_scale_2`` below ``boundary_ratio``), the expert switch and decoding are diffusers';
* the student: the LoRA the flow scripts write (``pytorch_lora_weights.safetensors`` into ``transformer``; for A14B
  also ``pytorch_lora_weights_transformer_2.safetensors``, loaded with ``load_into_transformer_2=True``), fused
  into the experts at ``--lora_scale`` (:func:`apply_student`); an A14B folder without its second file is refused
  (the low-noise steps would run the teacher's expert); a full student: ``transformer/`` in place of the pipeline's,
  for A14B ``transformer/`` and / or ``transformer_2/`` (``flow_kd.py --expert``) each in place of its expert;
* the sampler: the run's ``scheduler/`` and grid (``student_sigmas.json`` / ``student_grid.json``'s ``sigmas``) as
  for images (:func:`evaluation.generation.resolve_sampler`); ``WanPipeline`` takes no ``sigmas=``, so the grid is
  given through the scripts' documented override ``pipe.scheduler.set_timesteps = lambda n, device=None:
  set_timesteps(sigmas=SIGMAS, device=device)`` (:func:`set_sampler`). ``--teacher`` keeps the pipeline's UniPC
  sampler at ``--num_inference_steps``;
* the files: video ``i`` (prompt ``i``, noise of seed ``--seed + i``: one CPU generator per video) is written as
  ``videos/{i:06d}/{f:03d}.png``, frame ``f`` quantised to uint8 as the images are
  (:func:`evaluation.generation.to_uint8`). The frames go to a hidden temporary folder that is renamed when the
  video is complete, so a stopped run leaves whole videos only and a rerun generates the missing ones, after
  :func:`evaluation.generation.check_resume` has compared ``videos/generation.json`` (the sampler record with the
  frame count, size and the weights' SHA-256, seed, quantisation, prompts) with the rerun's;
* the metrics, each on the frames read back from the PNG files (:func:`frame_files`): FID on every frame of every
  video as an image ("frame FID"), FVD with ``--fvd_detector`` (StyleGAN-V's TorchScript I3D, a local file: the
  first ``--fvd_frames`` 16 frames of every video against those of each clip folder of ``--reference_dir``,
  :func:`score_fvd`, :class:`diffdistill.metrics.FVD`), CLIP score of every frame
  with its video's prompt averaged over frames and videos ("CLIPSIM", Wu et al. 2021 "GODIVA", as
  VideoCrafter and EvalCrafter report text-video alignment), preference scores the same way, and the frame
  consistency of :class:`diffdistill.metrics.FrameConsistency` (Gen-1's mean cosine of consecutive frames' CLIP image
  embeddings) on the CLIP score's backbone (:func:`score_frame_consistency`). :func:`protocol_entry` says all of
  this in the protocol, so video runs are never compared with image runs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import generation

VIDEO_PIPELINES = ("WanPipeline",)
"""The video pipelines ``examples/evaluate.py`` generates with (text-to-video Wan 2.1 / 2.2)."""

VIDEO_OPTIONS = (
    "num_frames",
    "guidance_scale_2",
    "fvd_detector",
    "fvd_frames",
)
"""Options that only a video pipeline takes (refused for image pipelines; ``--max_sequence_length`` and ``--width``
are not: SD3, FLUX and Qwen-Image take them too)."""


TEMPORAL_FACTOR = 4
"""Wan's VAEs compress time by 4: a video has ``4k + 1`` frames (``WanPipeline`` rounds other counts, which would
make the files disagree with the record)."""

VIDEO_DIR = "videos"

FVD_FRAMES = 16
"""FVD's default clip length: StyleGAN-V's FVD_16 (the first 16 frames of each video here)."""


def model_index(
    path: str | None, revision: str | None = None, *, download: bool = False
) -> dict[str, Any] | None:
    """The ``model_index.json`` of a pipeline folder (read locally; a hub id only with ``download``, else None)."""
    if not path:
        return None
    local = Path(path) / "model_index.json"
    if local.is_file():
        return dict(json.loads(local.read_text(encoding="utf-8")))
    if not download:
        return None
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path, revision=revision))


def is_video_index(index: dict[str, Any]) -> bool:
    """Whether a pipeline's ``model_index.json`` is a video pipeline evaluated here (:data:`VIDEO_PIPELINES`).

    Raises:
        ValueError: for another video pipeline (``evaluation.generation.check_image_pipeline``'s markers).
    """
    name = str(index.get("_class_name", ""))
    if name in VIDEO_PIPELINES:
        return True
    if any(marker in name for marker in generation.VIDEO_PIPELINE_MARKERS):
        raise ValueError(
            f"Expected a text-to-image pipeline or a {' / '.join(VIDEO_PIPELINES)} (text-to-video), but "
            f"--pretrained_model_name_or_path is a {name}: examples/evaluate.py generates videos with "
            f"{' / '.join(VIDEO_PIPELINES)} only."
        )
    return False


def two_experts(index: dict[str, Any]) -> bool:
    """Whether a ``WanPipeline``'s ``model_index.json`` holds Wan 2.2 A14B's second expert (``transformer_2``)."""
    entry = index.get("transformer_2")
    return isinstance(entry, (list, tuple)) and any(entry)


def video_folder(folder: str | Path) -> bool:
    """Whether an ``--images`` folder holds videos (``000000/`` frame folders) rather than ``{i:06d}.png`` images."""
    return (Path(folder) / f"{0:06d}").is_dir()


def check_options(args: argparse.Namespace, index: dict[str, Any] | None, video: bool) -> None:
    """Refuse options that do not fit the pipeline (or the ``--images`` folder), and fill the video defaults that
    need no load: ``--width`` = ``--resolution`` (square, the flow scripts' default), ``--fvd_frames`` 16 with
    ``--fvd_detector``.

    Args:
        args: the options.
        index: the pipeline's ``model_index.json`` (None: ``--images``, or a hub id not read yet).
        video: whether this run generates or scores videos.

    Raises:
        ValueError: naming the option and why.
    """
    if not video:
        given = [f"--{name}" for name in VIDEO_OPTIONS if getattr(args, name, None) is not None]
        if given:
            verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise ValueError(
                f"{' / '.join(given)} {verb} to a video pipeline ({' / '.join(VIDEO_PIPELINES)}), but this run "
                f"evaluates images: drop {them}."
            )
        return
    if args.timesteps:
        raise ValueError("--timesteps: WanPipeline samples on sigmas (flow matching): give --sigmas instead.")
    if getattr(args, "precision_recall", False):
        raise ValueError(
            "--precision_recall on videos would pool every frame: a real frame's nearest neighbours are frames of its "
            "own clip, so the balls shrink to the clips and even real videos score near 0. Drop it for video runs "
            "(FVD and the frame FID compare the distributions)."
        )
    if getattr(args, "lora_base", None):
        raise ValueError("--lora_base is for SDXL LoRAs trained on another UNet: drop it for a Wan student.")
    if getattr(args, "images", None) is not None and args.num_frames is not None:
        raise ValueError(
            f"--num_frames {args.num_frames} is the length of the videos a run generates, but --images scores the "
            "folder's videos as they are (each its {f:03d}.png frames): drop --num_frames."
        )
    if args.num_frames is not None and args.num_frames % TEMPORAL_FACTOR != 1:
        raise ValueError(
            f"Expected --num_frames of the form {TEMPORAL_FACTOR}k + 1 (Wan's VAE compresses time by "
            f"{TEMPORAL_FACTOR}; e.g. 81), but got {args.num_frames}."
        )
    if index is not None and args.guidance_scale_2 is not None and not two_experts(index):
        raise ValueError(
            f"--guidance_scale_2 is the CFG of Wan 2.2 A14B's low-noise expert, but {args.pretrained_model_name_or_path} "
            "has one transformer: drop it."
        )
    if args.width is None and args.resolution is not None:
        args.width = args.resolution
    if getattr(args, "fvd_detector", None) and args.fvd_frames is None:
        args.fvd_frames = FVD_FRAMES
    if args.num_frames is not None:
        check_fvd_frames(args, args.num_frames)


def fill_defaults(args: argparse.Namespace, pipe: Any) -> None:
    """``--resolution`` / ``--width`` / ``--num_frames`` left open: the pipeline's defaults (``WanPipeline``: 480,
    then square, 81 frames)."""
    params = inspect.signature(type(pipe).__call__).parameters
    if args.resolution is None:
        args.resolution = int(params["height"].default)
    if args.width is None:
        args.width = args.resolution
    if args.num_frames is None:
        args.num_frames = int(params["num_frames"].default)
    check_fvd_frames(args, args.num_frames)


def check_fvd_frames(args: argparse.Namespace, num_frames: int) -> None:
    """Refuse an FVD clip (``--fvd_frames``) longer than the videos (``num_frames``), before anything is scored."""
    if getattr(args, "fvd_detector", None) and args.fvd_frames > num_frames:
        raise ValueError(
            f"--fvd_frames {args.fvd_frames} is longer than the videos ({num_frames} frames): FVD scores clips of each "
            "video's first frames; lower --fvd_frames or generate longer videos."
        )


def expert_students(args: argparse.Namespace, pipe: Any) -> dict[str, Path]:
    """Wan 2.2 A14B's full expert students in ``--student_weights``: its ``transformer/`` and ``transformer_2/``
    folders (``flow_kd.py --expert`` writes one a run: put both runs' folders in one folder to evaluate both); ``{}``
    for a LoRA run, a one-transformer pipeline or no student."""
    root = Path(args.student_weights or "")
    if getattr(pipe, "transformer_2", None) is None or not args.student_weights or root.is_file():
        return {}
    if (root / "pytorch_lora_weights.safetensors").is_file():
        return {}
    from training import wan_experts

    return {name: root / name for name in wan_experts.EXPERTS if (root / name / "config.json").is_file()}


def student_files(args: argparse.Namespace, pipe: Any) -> list[Path]:
    """The LoRA files of ``--student_weights``: the high-noise (or only) expert's, and for a two-expert pipeline the
    low-noise expert's beside it (named as the flow scripts write it: ``training.wan_experts.lora_files``); or the
    full transformer folder (Wan 2.2 A14B: the expert folders of :func:`expert_students`).

    Raises:
        ValueError: for A14B, a full transformer folder that is neither ``transformer/`` nor ``transformer_2/`` of the
            run folder, or a LoRA without its second file.
    """
    experts = expert_students(args, pipe)
    if experts:
        return list(experts.values())
    kind, path = generation.resolve_student(args.student_weights, "transformer")
    if kind != "lora":
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError(
                f"Expected a LoRA student for Wan 2.2 A14B (one file per expert) or a folder holding transformer/ "
                f"and / or transformer_2/ (flow_kd.py --expert), but --student_weights {args.student_weights} is a "
                f"full transformer ({path})."
            )
        return [path]
    files = [path]
    if getattr(pipe, "transformer_2", None) is not None:
        from training import wan_experts

        second = wan_experts.lora_files(path.parent, path.name)["transformer_2"]
        if not second.is_file():
            raise ValueError(
                f"Expected the low-noise expert's LoRA {second.name} beside {path} (Wan 2.2 A14B: one LoRA per "
                "expert, as flow_dmd2.py / flow_tscd.py write them), but it is missing: without it the low-noise "
                "steps would run the teacher's expert."
            )
        files.append(second)
    return files


def apply_student(pipe: Any, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Put the student into a ``WanPipeline``: its LoRA(s) fused into ``transformer`` (and ``transformer_2``) at
    ``--lora_scale``, or a full ``transformer/`` folder in place of the pipeline's (A14B: each of ``transformer/``,
    ``transformer_2/`` in place of its expert).

    Args:
        pipe: the ``WanPipeline``.
        args: the options (``--student_weights``, ``--lora_scale``).
        dtype: the pipeline's weight dtype.

    Raises:
        ValueError: see :func:`student_files`.
    """
    if not args.student_weights:
        return
    experts = expert_students(args, pipe)
    for name, folder in experts.items():  # A14B: each expert student in place of its expert
        cls = type(getattr(pipe, name))
        pipe.register_modules(**{name: cls.from_pretrained(str(folder), torch_dtype=dtype)})
    if experts:
        return
    files = student_files(args, pipe)
    kind, _ = generation.resolve_student(args.student_weights, "transformer")
    if kind != "lora":
        cls = type(pipe.transformer)
        pipe.register_modules(transformer=cls.from_pretrained(str(files[0]), torch_dtype=dtype))
        return
    pipe.load_lora_weights(str(files[0].parent), weight_name=files[0].name)
    components = ["transformer"]
    if len(files) > 1:
        pipe.load_lora_weights(str(files[1].parent), weight_name=files[1].name, load_into_transformer_2=True)
        components.append("transformer_2")
    pipe.fuse_lora(components=components, lora_scale=generation.lora_scale(args))
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go


def set_sampler(pipe: Any, args: argparse.Namespace, saved: dict[str, Any] | None) -> None:
    """The sampler of :func:`evaluation.generation.set_sampler` (the run's ``scheduler/`` or ``--scheduler``), and
    the sigmas (``--sigmas`` or the run's grid) through the ``set_timesteps`` override, as ``WanPipeline`` takes no
    ``sigmas=``.

    Raises:
        ValueError: if the scheduler takes no sigmas (``UniPCMultistepScheduler``): name one that does.
    """
    generation.set_sampler(pipe, args, saved)
    if not args.sigmas:
        return
    scheduler = pipe.scheduler
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"Expected a scheduler that takes sigmas for --sigmas / the run's grid, but {type(scheduler).__name__} "
            "takes none: give the run folder (its scheduler/) or --scheduler FlowMatchEulerDiscreteScheduler."
        )
    sigmas = [float(s) for s in args.sigmas]
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas, device=device)


def load_pipeline(args: argparse.Namespace, device: Any, dtype: torch.dtype) -> Any:
    """The ``WanPipeline`` of ``--pretrained_model_name_or_path`` with the student (unless ``--teacher``) and its
    sampler, the video defaults filled in (:func:`fill_defaults`; A14B's ``--guidance_scale_2`` from the run's
    ``student_sampler.json`` when it records one), on ``device``, progress bar off."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if args.revision:
        kwargs["revision"] = args.revision
    if args.variant:
        kwargs["variant"] = args.variant
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    fill_defaults(args, pipe)
    saved = generation.resolve_sampler(args).saved_sampler
    generation.fill_teacher_steps(pipe, args)  # a teacher without --num_inference_steps: WanPipeline's own 50
    if getattr(pipe, "transformer_2", None) is not None and args.guidance_scale_2 is None:
        # the run's record (A14B); None: the pipeline's rule (guidance_scale)
        args.guidance_scale_2 = saved.get("guidance_scale_2")
    if not args.teacher:
        apply_student(pipe, args, dtype)
    set_sampler(pipe, args, saved)
    generation.scale_initial_noise(pipe, args)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The ``WanPipeline`` call's arguments: size, frames, steps (``len(sigmas)`` with a grid: the override ignores
    the count), guidance (A14B: ``guidance_scale_2`` when given) and ``max_sequence_length`` when given."""
    kw: dict[str, Any] = {"height": args.resolution, "width": args.width, "num_frames": args.num_frames}
    kw["num_inference_steps"] = len(args.sigmas) if args.sigmas else args.num_inference_steps
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.guidance_scale_2 is not None:
        kw["guidance_scale_2"] = args.guidance_scale_2
    if args.max_sequence_length is not None:
        kw["max_sequence_length"] = args.max_sequence_length
    return kw


def sampler_record(pipe: Any, args: argparse.Namespace, accelerator: Any = None) -> dict[str, Any]:
    """:func:`evaluation.generation.sampler_record` (which holds ``max_sequence_length``: the option, the run's
    record, else ``WanPipeline``'s 512) with what a video adds: ``width``, ``num_frames``, the low-noise expert's
    guidance (A14B: ``guidance_scale_2``: the option, the run's ``student_sampler.json``, else the pipeline's rule
    -- ``guidance_scale``), the second LoRA's SHA-256 (``sha256_transformer_2``), and the run's trained frame count
    (``trained_num_frames``, with a warning when the videos have another)."""
    experts = {} if args.teacher else expert_students(args, pipe)
    resolved = ("denoiser", next(iter(experts.values()))) if experts else None
    record = generation.sampler_record(pipe, args, accelerator, resolved)
    record["width"] = args.width
    record["num_frames"] = args.num_frames
    trained_frames = (getattr(args, "saved_sampler", None) or {}).get("trained_num_frames")
    if trained_frames is not None:
        record["trained_num_frames"] = trained_frames
        if args.num_frames != trained_frames:
            warnings.warn(
                f"The student was trained on {trained_frames}-frame videos (its run's student_sampler.json), but "
                f"the videos are generated with {args.num_frames} frames. Pass --num_frames {trained_frames} to "
                "evaluate it as trained (the record holds both).",
                UserWarning,
                stacklevel=2,
            )
    if getattr(pipe, "transformer_2", None) is not None:
        record["guidance_scale_2"] = (
            args.guidance_scale_2 if args.guidance_scale_2 is not None else record["guidance_scale"]
        )
        saved = getattr(args, "saved_sampler", None) or {}
        if args.guidance_scale_2 is None:
            source = "guidance_scale (WanPipeline's rule)"
        elif saved.get("guidance_scale_2") is not None:  # read only when --guidance_scale_2 is not given
            from training import student_sampler

            source = str(generation.run_folder(args.student_weights) / student_sampler.RECORD_FILE)
        else:
            source = "--guidance_scale_2"
        record["sampler_sources"]["guidance_scale_2"] = source
    if record["student_weights"] is not None and not args.teacher:
        files = student_files(args, pipe)
        if experts:
            record["student_weights"]["experts"] = list(experts)
        if len(files) > 1:
            record["student_weights"]["sha256_transformer_2"] = generation.shared_weights_sha256(
                "denoiser" if experts else "lora", files[1], accelerator
            )
    return record


def video_path(folder: str | Path, index: int) -> Path:
    """Where video ``index`` lives: ``folder/{index:06d}/`` (its frames ``{f:03d}.png``)."""
    return Path(folder) / f"{int(index):06d}"


def frame_path(folder: str | Path, index: int, frame: int) -> Path:
    """Frame ``frame`` of video ``index``: ``folder/{index:06d}/{frame:03d}.png``."""
    return video_path(folder, index) / f"{int(frame):03d}.png"


def missing(folder: str | Path, indices: Sequence[int]) -> list[int]:
    """The indices whose video folder is not written yet (a folder appears only when every frame is written)."""
    return [i for i in indices if not video_path(folder, i).is_dir()]


def frame_count(folder: str | Path) -> int:
    """The frames per video of a video folder: its record's ``num_frames``, else the PNG files of ``000000/``.

    Raises:
        ValueError: if neither says.
    """
    manifest = generation.read_manifest(folder)
    if manifest is not None and (manifest.get("generator") or {}).get("num_frames"):
        return int(manifest["generator"]["num_frames"])
    count = len(list(video_path(folder, 0).glob("[0-9]*.png")))
    if count < 1:
        raise ValueError(f"Expected frames {{f:03d}}.png in {video_path(folder, 0)}, but found none.")
    return count


def check_complete(folder: str | Path, indices: Sequence[int], num_frames: int) -> None:
    """Refuse a video folder with a missing video or frame among ``indices``.

    Raises:
        ValueError: naming the first missing file.
    """
    for i in indices:
        for f in range(num_frames):
            if not frame_path(folder, i, f).is_file():
                raise ValueError(
                    f"Expected {num_frames} frames per video in {folder}, but {frame_path(folder, i, f)} is missing. "
                    "Video folders hold video i's frame f as {i:06d}/{f:03d}.png."
                )


def save_video(video: torch.Tensor, folder: Path, index: int, quantization: str) -> None:
    """Write one generated video (float ``[0, 1]`` (F, 3, H, W)) as ``folder/{index:06d}/{f:03d}.png``
    (:func:`evaluation.generation.to_uint8`): into a hidden temporary folder, renamed when every frame is written,
    so that the video appears whole."""
    tmp = folder / f".{int(index):06d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f, frame in enumerate(generation.to_uint8(video, quantization)):
        generation.save_png(frame, tmp / f"{f:03d}.png")
    os.replace(tmp, video_path(folder, index))


def generate_videos(
    sample: Callable[[list[str], list[torch.Generator]], torch.Tensor],
    prompts: Sequence[str],
    indices: Sequence[int],
    folder: str | Path,
    **kwargs: Any,
) -> list[int]:
    """:func:`evaluation.generation.generate_images` for videos: ``sample`` returns float ``[0, 1]``
    ``(N, F, 3, H, W)`` videos (:func:`evaluation.generation.pipeline_sampler` with ``field="frames"``), each written
    by :func:`save_video`, those with a folder already skipped (:func:`missing`); ``kwargs``: ``seed``,
    ``batch_size``, ``progress``, ``quantization``. Returns the indices generated now."""
    return generation.generate_images(
        sample, prompts, indices, folder, save=save_video, absent=missing, **kwargs
    )


def frame_files(
    folder: str | Path, indices: Sequence[int], prompts: Sequence[str], num_frames: int
) -> tuple[list[Path], list[str]]:
    """Every frame of the videos ``indices`` in order (video by video) and the prompt of each frame (its video's)."""
    files = [frame_path(folder, i, f) for i in indices for f in range(num_frames)]
    return files, [prompts[i] for i in indices for _ in range(num_frames)]


def score_frame_consistency(
    metric: Any,
    folder: str | Path,
    indices: Sequence[int],
    num_frames: int,
    *,
    eval_resolution: int | None,
    device: Any = "cpu",
) -> None:
    """Feed each video's frames (read back from the PNG files, resized as the CLIP score's frames are) to
    ``metric.update(videos (1, F, 3, H, W))`` (:class:`diffdistill.metrics.FrameConsistency`)."""
    from .scoring import load_image

    for i in indices:
        frames = [load_image(frame_path(folder, i, f), eval_resolution) for f in range(num_frames)]
        metric.update(torch.stack(frames)[None].to(device))


def add_fvd(metrics: dict[str, Any], args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """``metrics`` with ``fvd`` (:class:`diffdistill.metrics.FVD` on :class:`~diffdistill.metrics.I3DFeatures` of
    ``--fvd_detector``, clips of ``--fvd_frames``) when ``--fvd_detector`` is given."""
    if not getattr(args, "fvd_detector", None):
        return metrics
    from diffdistill.metrics import FVD, I3DFeatures

    return {**metrics, "fvd": FVD(I3DFeatures(args.fvd_detector).to(device), num_frames=args.fvd_frames)}


def reference_clips(folder: str | Path, num_frames: int) -> list[list[Path]]:
    """The clips of an FVD reference folder: each sub-folder holding frames (a run's ``videos/``, or real videos
    extracted to frames) is a video, its frames in name order (digit runs as numbers), cut to the first
    ``num_frames``; sorted by folder path.

    Raises:
        ValueError: frames lie directly in ``folder``, or a video has fewer than ``num_frames`` frames (named).
    """
    from training.caption_folders import frame_order

    from .scoring import image_files

    root = Path(folder)
    videos: dict[Path, list[Path]] = {}
    for path in image_files(root):
        if path.parent == root:
            raise ValueError(
                f"Expected --reference_dir {folder} to hold one folder of frames per video (FVD scores clips), but "
                f"{path.name} lies in it directly."
            )
        videos.setdefault(path.parent, []).append(path)
    clips = []
    for video, frames in sorted(videos.items()):
        if len(frames) < num_frames:
            raise ValueError(
                f"Expected every reference video to have at least --fvd_frames {num_frames} frames, but {video} has "
                f"{len(frames)}: leave it out or lower --fvd_frames (recorded in the protocol)."
            )
        clips.append(sorted(frames, key=frame_order)[:num_frames])
    return clips


def score_fvd(
    metric: Any,
    folder: str | Path,
    indices: Sequence[int],
    reference: Sequence[Sequence[Path]],
    *,
    batch_size: int,
    device: Any = "cpu",
) -> None:
    """Feed the first ``metric.num_frames`` frames of the generated videos ``indices`` (read back from the PNG files
    at their size: the I3D resizes) and the ``reference`` clips (this process's share) to ``metric.update``, in
    batches of at most ``batch_size`` videos of one frame size (a new batch where the size changes: real clips come
    at their own sizes)."""
    from .scoring import load_image

    def feed(clips: Sequence[Sequence[Path]], real: bool) -> None:
        batch: list[torch.Tensor] = []
        for clip in clips:
            video = torch.stack([load_image(f) for f in clip])
            if batch and (len(batch) == batch_size or video.shape != batch[0].shape):
                metric.update(torch.stack(batch).to(device), real=real)
                batch = []
            batch.append(video)
        if batch:
            metric.update(torch.stack(batch).to(device), real=real)

    frames = range(metric.num_frames)
    feed([[frame_path(folder, i, f) for f in frames] for i in indices], real=False)
    feed(reference, real=True)


def add_frame_consistency(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ``frame_consistency`` on the CLIP score's backbone (when there is a CLIP score and no
    frame consistency given)."""
    if "clip_score" in metrics and "frame_consistency" not in metrics:
        from diffdistill.metrics import FrameConsistency

        metrics = {**metrics, "frame_consistency": FrameConsistency.from_clip_score(metrics["clip_score"])}
    return metrics


def protocol_entry(num_frames: int) -> dict[str, Any]:
    """What the protocol records about a video run (its ``extra.video``): frames per video, which are scored and how
    each metric treats them -- so video runs compare only with video runs of the same length."""
    return {
        "num_frames": int(num_frames),
        "frames_scored": "all",
        "layout": "videos/{i:06d}/{f:03d}.png",
        "fid": "frame FID: every frame of every video scored as an image",
        "fvd": "FVD (with --fvd_detector): the first fvd_frames frames of every video against the first frames of "
        "each reference clip folder, at their size (the I3D resizes)",
        "clip_score": "CLIPSIM: the CLIP score of every frame with its video's prompt, averaged over frames and videos",
        "preference": "per frame with its video's prompt, averaged over frames and videos",
        "frame_consistency": "mean over videos of the mean cosine of consecutive frames' CLIP image embeddings (Gen-1)",
    }
