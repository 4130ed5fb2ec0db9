"""What a run records about sampling its student (guidance, size, text length, a one-step sampler); DMD2's re-noising seed."""

# ``evaluate.py`` samples a student with its pipeline. The run folder's ``scheduler/`` and grid file
# (``student_sigmas.json`` / ``student_grid.json``) say on which steps; ``student_sampler.json`` (this module) says the
# rest the scripts' validation used and the pipeline's defaults would get wrong:
#
# - ``guidance_scale``: evaluate.py's ``--guidance_scale`` of the student: 1.0 (no classifier-free guidance) for the
#   families sampled with CFG (SD3, Qwen-Image, Wan; every flow student here is trained to sample unguided),
#   FLUX.1-dev's embedded ``--guidance``, None for a model without a guidance input (FLUX.1-schnell);
#   ``guidance_scale_2`` the same for Wan 2.2 A14B's low-noise expert;
# - ``height`` / ``width`` / ``num_frames``: the trained size (the validation size, ``--resolution`` x ``--width``);
# - ``grid_size``: the size whose schedule shifted the grid (FLUX / Qwen-Image's dynamic shift, flow_dmd2 and
#   flow_tscd), None when the grid does not depend on the size (SD3, Wan; flow_ladd's explicit sigmas);
# - ``max_sequence_length``: the text length the prompts were encoded at;
# - ``initial_noise_scale`` (flow_dmd2 with a grid starting below 1): the generator starts from ``sigmas[0] z``
#   (SiD's input), so evaluate.py scales the pipeline's initial latents by it when it samples the saved grid;
# - ``aspect_buckets`` (multi-aspect runs only): every trained ``[height, width]``; flow_dmd2 / flow_tscd save each
#   one's grid in ``student_sigmas_by_size.json`` (``training.aspect_buckets.write_grids``), which evaluate.py uses
#   at that size.
#
# The SDXL scripts and flow_kd record the size alone (:func:`write_size_record`, from ``checkpoints.save_unet``; the
# guidance of an SDXL student is its method's, see examples/README.md), so evaluate.py generates at it by default and
# warns at another size (audit 17). The SDXL one-step generators (sdxl_sim, sdxl_diffusion2gan) also save their
# sampler: ``scheduler/``, ``student_timesteps.json`` and ``guidance_scale`` 1 (:func:`write_one_step_sampler`).
#
# DMD2's sampler re-noises with fresh noise at every step. Drawn from a generator seeded with the image's seed, the
# first draw would be the initial noise itself and the first step a deterministic Euler step (audit 9): the
# re-noising draws use :func:`renoise_seed` of the image's seed, in flow_dmd2's validation and in evaluate.py
# (``FlowMatchEulerDiscreteScheduler`` re-noises from torch's global generator, seeded there). SDXL's MLCM validation
# continues the initial noise's generator instead, as ``LCMScheduler`` does with the pipeline's generator
# (``training.validation.validation_noise``).

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RECORD_FILE = "student_sampler.json"
"""The record's file name in the run folder (``OUTPUT_DIR``)."""


def renoise_seed(seed: int) -> int:
    """The seed of the re-noising draws of DMD2's sampler for the image whose initial noise has seed ``seed``: the
    first 8 bytes of SHA-256 of ``"dmd2-renoise:<seed>"``, a stream apart from it. Not ``seed + c`` for a large
    ``c``: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so ``seed + 2**32`` is ``seed``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"dmd2-renoise:{int(seed)}".encode()).digest()[:8], "little")


def sampling_guidance(args: argparse.Namespace, parts: Any) -> float | None:
    """evaluate.py's ``--guidance_scale`` of a flow student: FLUX.1-dev's embedded ``--guidance``, None for
    FLUX.1-schnell (no guidance input), else 1.0 (sampled without classifier-free guidance)."""
    if parts.family == "flux":
        return None if args.guidance is None else float(args.guidance)
    return 1.0


def write_record(
    args: argparse.Namespace,
    parts: Any,
    max_sequence_length: int,
    *,
    shifted_grid: bool,
    initial_noise_scale: float = 1.0,
) -> Path:
    """Write ``OUTPUT_DIR/student_sampler.json`` (see the module comment); call on the main process.

    Args:
        args: the run's options (``output_dir``, ``resolution``, ``width``, ``num_frames``, ``guidance``).
        parts: the run's ``training.flow_models.FlowComponents``.
        max_sequence_length: the text length the prompts were encoded at.
        shifted_grid: the student's grid is the model's schedule at the trained size (flow_dmd2, flow_tscd), so a
            dynamic-shift model (FLUX, Qwen-Image: ``use_dynamic_shifting``) records that size as ``grid_size``.
        initial_noise_scale: the factor of the initial noise at the grid's first sigma (flow_dmd2: ``sigmas[0]``,
            the zero image noised there; 1: pure noise), recorded when not 1 (evaluate.py scales the pipeline's
            initial latents by it).

    Returns:
        The file written.
    """
    guidance = sampling_guidance(args, parts)
    height, width = int(args.resolution), int(getattr(args, "width", None) or args.resolution)
    dynamic = bool(getattr(parts.noise_scheduler.config, "use_dynamic_shifting", False))
    record: dict[str, Any] = {
        "guidance_scale": guidance,
        "height": height,
        "width": width,
        "num_frames": getattr(args, "num_frames", None) if parts.family == "wan" else None,
        "grid_size": [height, width] if shifted_grid and dynamic else None,
        "max_sequence_length": int(max_sequence_length),
    }
    if initial_noise_scale != 1.0:
        record["initial_noise_scale"] = float(initial_noise_scale)
    if parts.has_experts:
        record["guidance_scale_2"] = guidance
    record.update(bucket_sizes(args))
    path = Path(args.output_dir) / RECORD_FILE
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def bucket_sizes(args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """``{"aspect_buckets": [[height, width], ...]}`` of a multi-aspect run (``--aspect_buckets``), else ``{}``."""
    buckets = getattr(args, "aspect_buckets", None)
    return {"aspect_buckets": [[int(h), int(w)] for h, w in buckets]} if buckets else {}


def write_size_record(args: argparse.Namespace, folder: str | Path) -> Path:
    """Write ``folder/student_sampler.json`` with the trained size alone (``height`` / ``width`` from ``--resolution``
    / ``--width``, a video's ``num_frames``); a flow script replaces it with its whole record (:func:`write_record`)."""
    height = int(args.resolution)
    width = int(getattr(args, "width", None) or height)
    record = {"height": height, "width": width, "num_frames": getattr(args, "num_frames", None)}
    record.update(bucket_sizes(args))
    path = Path(folder) / RECORD_FILE
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


TIMESTEPS_FILE = "student_timesteps.json"
"""A UNet run's sampling timesteps (a JSON list of ints), which ``evaluate.py`` passes as ``timesteps=`` with the
run's ``scheduler/``: the SDXL one-step generators' ``[--generator_timestep]`` (:func:`write_one_step_sampler`)."""
#: The ``timestep_spacing`` of the saved Euler scheduler that feeds the UNet each ``--generator_input``.
INPUT_SPACING = {"noise": "leading", "noised": "trailing"}


def write_one_step_sampler(args: argparse.Namespace, folder: str | Path, noise_scheduler: Any) -> Path:
    """Save how ``evaluate.py`` samples an SDXL one-step generator as its validation does (one call at
    ``--generator_timestep`` on ``--generator_input``, no classifier-free guidance); call on the main process.

    Writes ``folder/scheduler/``: diffusers' ``EulerDiscreteScheduler`` on the teacher's training schedule
    (``noise_scheduler``'s config), ``folder/student_timesteps.json``: ``[--generator_timestep]``, and adds
    ``guidance_scale`` 1.0 (no CFG) to ``folder/student_sampler.json`` (written first by
    :func:`write_size_record`). One Euler step from ``t`` to sigma 0 is the generator's x0 prediction. The pipeline
    draws its latents as ``z * init_noise_sigma`` and feeds the UNet ``latents / sqrt(sigma_t^2 + 1)``, where
    ``init_noise_sigma`` is ``sqrt(sigma_t^2 + 1)`` with ``timestep_spacing="leading"`` (the UNet sees ``z``:
    ``--generator_input noise``) and ``sigma_t`` with ``"trailing"`` (it sees ``sigma_t z / sqrt(sigma_t^2 + 1) =
    sqrt(1 - alphabar_t) z``: ``noised``), so the spacing is the input. Karras / exponential / beta sigmas are off
    (they would move the timestep). Tested against the validation sample (``test_evaluate_student_folders.py``).

    Returns:
        The ``scheduler/`` folder written.
    """
    from diffusers import EulerDiscreteScheduler

    folder = Path(folder)
    from .validation import generator_input_of

    spacing = INPUT_SPACING[generator_input_of(args)]
    scheduler = EulerDiscreteScheduler.from_config(
        noise_scheduler.config,
        timestep_spacing=spacing,
        final_sigmas_type="zero",
        interpolation_type="linear",
        timestep_type="discrete",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )
    scheduler.save_pretrained(folder / "scheduler")
    (folder / TIMESTEPS_FILE).write_text(json.dumps([int(args.generator_timestep)]) + "\n", encoding="utf-8")
    record_path = folder / RECORD_FILE
    record = read_record(folder) or {}
    record["guidance_scale"] = 1.0
    record_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return folder / "scheduler"


def check_one_step_start(args: argparse.Namespace, start: str | Path) -> None:
    """Refuse to start a one-step generator (``sdxl_sim.py --init_unet`` / ``--init_lora``) from a run that was
    trained for another input: its folder (the parent of a ``unet/`` folder, or the folder of a LoRA file) records
    the timestep in ``student_timesteps.json`` and the input in ``scheduler/``'s ``timestep_spacing``, both written
    by :func:`write_one_step_sampler`. A start without ``student_timesteps.json`` (weights from elsewhere, e.g. the
    ``unet/`` of a diffusers pipeline, whose ``scheduler/`` is the pipeline's own) is not checked.

    Raises:
        ValueError: the recorded timestep is not ``[--generator_timestep]``, or the recorded input is not
            ``--generator_input``.
    """
    from .validation import generator_input_of

    path = Path(start)
    folder = path.parent
    steps_file, scheduler_file = folder / TIMESTEPS_FILE, folder / "scheduler" / "scheduler_config.json"
    if not steps_file.is_file():
        return
    steps = json.loads(steps_file.read_text(encoding="utf-8"))
    if steps != [int(args.generator_timestep)]:
        raise ValueError(
            f"{path} was trained as a one-step generator at t = {steps} ({steps_file}), but this run calls it "
            f"at --generator_timestep {args.generator_timestep}: pass --generator_timestep {steps[0]}, or "
            "start from a run trained at this timestep."
        )
    if scheduler_file.is_file():  # written with student_timesteps.json: its spacing is the input
        spacing = json.loads(scheduler_file.read_text(encoding="utf-8")).get("timestep_spacing")
        recorded = {v: k for k, v in INPUT_SPACING.items()}.get(spacing)
        if recorded is not None and recorded != generator_input_of(args):
            raise ValueError(
                f"{path} was trained on the '{recorded}' input ({scheduler_file}: timestep_spacing {spacing!r}), "
                f"but this run feeds --generator_input {generator_input_of(args)}: pass --generator_input "
                f"{recorded}, or start from a run trained on this input."
            )


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record of the run folder ``folder``, or None when it has none (a run before this file, or an SDXL run)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(
            f"Expected {path} to hold a JSON object (the student's sampler record), but got {record!r}."
        )
    return record
