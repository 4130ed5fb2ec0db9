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
broadcast to the others (:func:`shared_weights_sha256`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

SEED_STRIDE = 1
"""Prompt ``i`` is sampled from seed ``seed + SEED_STRIDE * i`` (SiD-LSG's ``--seeds=0-29999``: seed ``i``)."""

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
    student's weights unless ``--teacher``, its sampler, on ``device`` in ``dtype``, progress bar off."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if args.revision:
        kwargs["revision"] = args.revision
    if args.variant:
        kwargs["variant"] = args.variant
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    if not args.teacher:
        apply_student(pipe, args, dtype)
    set_sampler(pipe, args)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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
    """What ``--student_weights`` names: ``("lora", file)`` -- a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors`` (as the training scripts write it) -- or ``("denoiser", folder)`` -- a
    ``unet/`` / ``transformer/`` folder (``name``), or a run's output folder holding one.

    Raises:
        ValueError: if ``weights`` is neither.
    """
    path = Path(weights)
    lora_file = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    if lora_file.is_file():
        return "lora", lora_file
    for folder in (path, path / name):
        if (folder / "config.json").is_file():
            return "denoiser", folder
    raise ValueError(
        f"Expected --student_weights {path} to be a LoRA (a .safetensors file or a folder with "
        f"pytorch_lora_weights.safetensors) or a {name} folder (config.json at its root or in {name}/), "
        "but it is neither."
    )


def weights_sha256(kind: str, path: Path) -> str:
    """SHA-256 identifying the student's weights: of the LoRA file's bytes, or of a denoiser folder's files (its
    top-level files, sorted by name, each name and its bytes) -- what :func:`apply_student` loads, so retraining
    into the same path changes it."""
    import hashlib

    digest = hashlib.sha256()
    files = [path] if kind == "lora" else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        digest.update(file.name.encode("utf-8") + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


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
    ``--lora_scale`` (so sampling costs what the base model costs), a full denoiser replaces the pipeline's.
    None: the pipeline as loaded."""
    if not args.student_weights:
        return
    name = denoiser_name(pipe)
    kind, path = resolve_student(args.student_weights, name)
    if kind == "lora":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        pipe.fuse_lora(lora_scale=args.lora_scale)
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


def set_sampler(pipe: Any, args: argparse.Namespace) -> None:
    """``--scheduler`` (a diffusers scheduler class name; default: the pipeline's own) built from the pipeline's
    scheduler config with the ``--scheduler_config`` overrides (e.g. ``timestep_spacing=trailing``,
    ``prediction_type=sample`` for an x0 student)."""
    overrides = parse_overrides(args.scheduler_config)
    if not args.scheduler and not overrides:
        return
    import diffusers

    cls = getattr(diffusers, args.scheduler) if args.scheduler else type(pipe.scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def sampler_record(pipe: Any, args: argparse.Namespace, accelerator: Any = None) -> dict[str, Any]:
    """What the images were sampled with (the protocol record's ``generator`` entry): the model, the student's
    weights (path, kind, SHA-256 of the files loaded -- hashed by the main process of ``accelerator`` and
    broadcast, :func:`shared_weights_sha256` --, LoRA scale), the sampler, steps, guidance, dtype and the
    generated resolution."""
    student: dict[str, Any] | None = None
    if args.student_weights and not args.teacher:
        kind, path = resolve_student(args.student_weights, denoiser_name(pipe))
        digest = shared_weights_sha256(kind, path, accelerator)
        student = {"path": str(args.student_weights), "kind": kind, "sha256": digest}
        if kind == "lora":
            student["lora_scale"] = args.lora_scale
    return {
        "model": str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "role": "teacher" if args.teacher else "student",
        "student_weights": student,
        "resolution": args.resolution,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": parse_overrides(args.scheduler_config),
        "num_inference_steps": None if (args.timesteps or args.sigmas) else args.num_inference_steps,
        "timesteps": args.timesteps,
        "sigmas": args.sigmas,
        "guidance_scale": args.guidance_scale,
        "dtype": args.dtype,
    }


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

    Raises:
        ValueError: naming the first difference and how to proceed.
    """
    import json

    folder = Path(folder)
    record_path = folder / MANIFEST_NAME
    existing = sorted(p for p in folder.glob("[0-9]*.png")) if folder.is_dir() else []
    recorded: list[str] = []
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
        write_results(record_path, record)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The generation record of an image folder (``{"generator", "seed", "quantization", "prompts"}``), or None."""
    import json

    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call's sampler arguments from the options (only those given, so each pipeline keeps its
    defaults for the rest)."""
    kw: dict[str, Any] = {"height": args.resolution, "width": args.resolution}
    if args.timesteps:
        kw["timesteps"] = list(args.timesteps)
    elif args.sigmas:
        kw["sigmas"] = list(args.sigmas)
    else:
        kw["num_inference_steps"] = args.num_inference_steps
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    return kw


def to_uint8(images: torch.Tensor, quantization: str = "round") -> torch.Tensor:
    """Float images in ``[0, 1]`` (N, 3, H, W) -> uint8 (N, H, W, 3): ``y = 255 x`` in float32, then

    * ``"round"``: ``round(y)`` (halves to even), as diffusers' ``numpy_to_pil`` (``(x * 255).round()``) -- ours;
    * ``"truncate"``: ``floor(y)``, as DMD2's evaluation (``main/sdxl/test_folder_sdxl.py``: ``(torch.tensor(images,
      dtype=torch.float32) * 255.0).to(torch.uint8)`` on the pipelines' ``output_type="np"`` images): one
      level below rounding wherever the fraction of ``y`` exceeds one half, or equals it above an odd level
      (``round`` takes halves to the even neighbour), so the images are half a level darker on average.

    Raises:
        ValueError: for another ``quantization``.
    """
    y = images.float().clamp(0, 1) * 255
    if quantization == "round":
        y = y.round()
    elif quantization != "truncate":
        raise ValueError(f"Expected quantization in {QUANTIZATIONS}, but got {quantization!r}.")
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu()  # the cast truncates (y >= 0)


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (H, W, 3) image atomically: a temporary name in the same folder, then a rename."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


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

    Returns:
        The indices generated now (the others existed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing(folder, indices)
    if progress is not None:
        progress.update(len(indices) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        gens = [torch.Generator().manual_seed(int(seed) + SEED_STRIDE * i) for i in batch]
        images = to_uint8(sample([prompts[i] for i in batch], gens), quantization)
        for i, image in zip(batch, images):
            save_png(image, image_path(folder, i))
        if progress is not None:
            progress.update(len(batch))
    return todo


def pipeline_sampler(
    pipe: Any, kwargs: dict[str, Any]
) -> Callable[[list[str], list[torch.Generator]], torch.Tensor]:
    """``sample(prompts, generators)`` calling ``pipe`` with the sampler arguments ``kwargs`` (``output_type="pt"``:
    float images in ``[0, 1]``)."""

    def sample(prompts: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        return pipe(prompt=prompts, generator=generators, output_type="pt", **kwargs).images

    return sample
