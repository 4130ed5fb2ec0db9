"""The teacher's own samples of a prompt list, in shards that record their settings (LADD's data, prompt-only KD)."""

# ``examples/flow_ladd.py`` trains on them (LADD, Sauer et al. 2024: the teacher's synthetic data), and
# ``examples/flow_kd.py`` with ``--prompts_file`` distils a block-removed student on them. Each shard of
# ``--teacher_samples_shard_size`` samples holds the noise, the clean latents and the prompts, with the settings it
# was made with in its metadata: a later run reuses matching shards, refuses stale ones and makes the missing ones
# (each process its share). Every prompt of the list is used once per N samples (N prompts; a fresh order each
# epoch: ``data_sources.covering_prompts``). With ``--aspect_buckets`` shard ``i`` is made at the ``(i mod K)``-th size
# (``training.aspect_buckets``). SD3 / FLUX sample with :func:`diffdistill.schedulers.ddim_sample` on the pipeline's
# grid; Wan and Qwen-Image through their pipelines (:func:`pipeline_samples`).

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from diffdistill.schedulers import ddim_sample, flow_pipeline_grid

from . import aspect_buckets, data_sources, flow_encoding, flow_families, flow_models, runtime, teacher_pairs

logger = logging.getLogger(__name__)


def add_args(group: Any) -> None:
    """The options of the teacher samples: ``--num_teacher_samples``, ``--teacher_samples_dir``,
    ``--teacher_samples_shard_size``, ``--teacher_samples_seed``, ``--teacher_steps`` and ``--aspect_buckets`` (their
    CFG is the script's own option)."""
    group.add_argument("--num_teacher_samples", type=int, default=1000)
    group.add_argument("--teacher_samples_dir", default=None, help="default OUTPUT_DIR/teacher_samples")
    group.add_argument("--teacher_samples_shard_size", type=int, default=64)
    group.add_argument("--teacher_samples_seed", type=int, default=0)
    group.add_argument(
        "--teacher_steps", type=int, default=28, help="sampling steps of the teacher (pipelines: 28)"
    )
    aspect_buckets.add_args(group)


def check_args(args: argparse.Namespace) -> None:
    """``--num_teacher_samples``, ``--teacher_samples_shard_size`` and ``--teacher_steps`` >= 1, and (prompt-only
    runs, which make teacher samples) at least one shard per ``--aspect_buckets`` size (``ValueError``)."""
    for name in ("num_teacher_samples", "teacher_samples_shard_size", "teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"Expected --{name} >= 1, but got {getattr(args, name)}.")
    shards = len(sample_shards(args))
    buckets = len(getattr(args, "aspect_buckets", None) or [])
    if buckets > shards and getattr(args, "prompts_file", None):  # image runs make no teacher samples
        raise ValueError(
            f"Expected at least one shard of teacher samples per --aspect_buckets size, but {buckets} sizes are listed "
            f"and --num_teacher_samples {args.num_teacher_samples} in shards of --teacher_samples_shard_size "
            f"{args.teacher_samples_shard_size} make {shards}: raise --num_teacher_samples to at least "
            f"{buckets * args.teacher_samples_shard_size} or lower --teacher_samples_shard_size."
        )


def sample_settings(
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    guidance_scale: float | None,
    guidance_scale_2: float | None = None,
) -> dict[str, Any]:
    """What the teacher samples depend on (stored in each shard, compared before it is reused); ``guidance_scale``
    is the samples' CFG (recorded as ``teacher_guidance_scale``; Wan 2.2 A14B's low-noise ``guidance_scale_2`` as
    ``teacher_guidance_scale_2``). With ``--aspect_buckets`` each shard records its own size instead of
    ``--resolution`` / ``--width`` (:func:`shard_settings`)."""
    model = args.pretrained_model_name_or_path
    prompts = data_sources.read_prompts(args.prompts_file)
    return {
        "teacher": str(Path(model).resolve()) if Path(model).exists() else model,
        "revision": args.revision,
        "variant": args.variant,
        "teacher_steps": args.teacher_steps,
        "teacher_guidance_scale": guidance_scale,
        "teacher_guidance_scale_2": guidance_scale_2,
        "guidance": args.guidance,
        "uncond": args.uncond,
        "resolution": args.resolution,
        "width": args.width,
        "num_frames": args.num_frames,
        "max_sequence_length": flow_encoding.max_sequence_length(args, parts),
        "teacher_samples_seed": args.teacher_samples_seed,
        "teacher_samples_shard_size": args.teacher_samples_shard_size,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "prompt_draw": data_sources.PROMPT_DRAW,
    }


def shard_settings(settings: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """``settings`` of a shard made at ``size`` ``(height, width)`` with ``--aspect_buckets``: ``resolution`` the
    height, ``width`` the width or None when square (a square bucket's shard is the shard a run at that
    ``--resolution`` makes)."""
    height, width = size
    return {**settings, "resolution": height, "width": None if width == height else width}


def sample_shards(args: argparse.Namespace) -> list[Path]:
    """The shard files of ``--num_teacher_samples`` in ``--teacher_samples_dir`` (default
    ``OUTPUT_DIR/teacher_samples``)."""
    root = Path(args.teacher_samples_dir or Path(args.output_dir) / "teacher_samples")
    count = -(-args.num_teacher_samples // args.teacher_samples_shard_size)
    return [root / f"samples-{i:05d}.safetensors" for i in range(count)]


def check_sample_shard(path: Path, settings: dict[str, Any], rows: int) -> None:
    """Refuse a shard made with other settings, or of another size (it would be trained on as stale data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("settings", "{}"))
        stored_rows = f.get_slice("latent").get_shape()[0]
    differ = sorted(k for k in settings if stored.get(k) != settings[k])
    if differ or stored_rows != rows:
        made = ", ".join(f"{k}={stored.get(k)!r}" for k in differ) or f"{stored_rows} samples"
        want = ", ".join(f"{k}={settings[k]!r}" for k in differ) or f"{rows} samples"
        raise ValueError(
            f"Expected the teacher samples in {path.parent} to match this run, but {path.name} was made with {made} "
            f"and this run asks for {want}. Pass a new --teacher_samples_dir (or delete the shards) to make "
            "samples for this run, or run with the settings the shards were made with."
        )


@torch.no_grad()
def generate_teacher_samples(
    accelerator: Any,
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    teacher: Any,
    guidance_scale: float | None,
    guidance_scale_2: float | None = None,
) -> list[Path]:
    """Write the missing shards of teacher samples (this process's share), then wait for every process; returns
    every shard's path. ``teacher`` is the frozen teacher as a :class:`training.flow_models.FlowDenoiser`,
    ``guidance_scale`` the samples' CFG (SD3 / Qwen-Image / Wan; None for FLUX, whose FLUX.1-dev guidance is
    ``--guidance``; ``guidance_scale_2`` Wan 2.2 A14B's below the experts' switch). Each shard is sampled at its size (:func:`training.aspect_buckets.shard_size`) on the pipeline's
    grid of the model's schedule at that size (FLUX: ``mu`` of its token count)."""
    buckets = bool(getattr(args, "aspect_buckets", None))
    prompts = data_sources.read_prompts(args.prompts_file)
    settings = sample_settings(
        args, parts, guidance_scale, guidance_scale_2
    )  # one read and hash of the prompts
    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    cfg = parts.uses_cfg and guidance_scale != 1.0
    uncond = flow_encoding.uncond_conditions(parts, args, device, dtype) if cfg else None
    paths = sample_shards(args)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        rows = min(
            args.teacher_samples_shard_size, args.num_teacher_samples - i * args.teacher_samples_shard_size
        )
        size = aspect_buckets.shard_size(args, i)
        made_as = shard_settings(settings, size) if buckets else settings
        if path.exists():
            check_sample_shard(path, made_as, rows)
            continue
        if i % accelerator.num_processes != accelerator.process_index:
            continue
        gen = data_sources.step_generator(args.teacher_samples_seed, i, micro=99)  # apart from training draws
        picked = data_sources.covering_prompts(
            prompts, i * args.teacher_samples_shard_size, rows, args.teacher_samples_seed
        )
        cond = flow_encoding.conditions(parts, picked, args, device, dtype)
        shape = flow_models.latent_shape(parts, rows, size[0], args.num_frames, size[1])
        noise = torch.randn(shape, generator=gen).to(device)
        with runtime.autocast(accelerator):
            if parts.family in ("wan", "qwen"):  # the pipeline's own solve (see pipeline_samples)
                latent = pipeline_samples(
                    args,
                    parts,
                    teacher.transformer,
                    noise,
                    cond,
                    uncond,
                    guidance_scale,
                    size,
                    guidance_scale_2,
                )
            else:
                schedule = flow_models.flow_schedule(parts, size[0], width=size[1])
                grid = flow_pipeline_grid(
                    schedule, args.teacher_steps, pipeline=flow_families.pipeline_grid(parts.family)
                )
                latent = ddim_sample(
                    teacher,
                    schedule,
                    noise,
                    grid,
                    cond=cond,
                    uncond=uncond,
                    guidance_scale=guidance_scale if cfg else None,
                ).sample
        teacher_pairs.write_shard(path, noise, latent, picked, made_as)
        logger.info("wrote %s (%d teacher samples)", path, rows)
    accelerator.wait_for_everyone()
    return paths


def pipeline_samples(
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    transformer: Any,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    guidance_scale: float | None,
    size: tuple[int, int],
    guidance_scale_2: float | None = None,
) -> torch.Tensor:
    """Wan's and Qwen-Image's teacher samples as their pipelines make them, from ``noise`` with CFG at
    ``guidance_scale`` against ``uncond`` for ``--teacher_steps`` on the pipeline's grid at ``size`` (height, width
    px): ``WanPipeline`` with its ``UniPCMultistepScheduler`` (a multistep solver, which our first-order samplers do
    not reproduce; Wan 2.2 A14B: both experts and ``guidance_scale_2`` below the switch), ``QwenImagePipeline`` with its true CFG (``true_cfg_scale``, each token's guided velocity renormalised to the
    conditional norm). Returns the latents (``(B, C, f, h, w)`` / unpacked ``(B, C, h, w)``) in float32."""
    import copy

    experts: dict[str, Any] = {"transformer": transformer}
    if parts.has_experts:  # Wan 2.2 A14B: both experts, switched at the boundary as WanPipeline does
        boundary = transformer.boundary_timestep / parts.noise_scheduler.config.num_train_timesteps
        experts = {"transformer": transformer.transformer, "transformer_2": transformer.transformer_2}
        experts["boundary_ratio"] = boundary
    pipe = parts.pipeline_class(
        tokenizer=parts.tokenizers[0],
        text_encoder=parts.text_encoders[0],
        vae=parts.vae,
        scheduler=copy.deepcopy(parts.noise_scheduler),  # the pipeline sets its timesteps
        **experts,
    )
    pipe.set_progress_bar_config(disable=True)
    b = noise.shape[0]
    negative = {} if uncond is None else {k: v.expand(b, *v.shape[1:]) for k, v in uncond.items()}
    common = {
        "num_inference_steps": args.teacher_steps,
        "height": size[0],
        "width": size[1],
        "output_type": "latent",
    }
    if parts.family == "wan":
        scale_2 = {"guidance_scale_2": guidance_scale_2} if parts.has_experts else {}
        return pipe(
            prompt_embeds=cond["encoder_hidden_states"],
            negative_prompt_embeds=negative.get("encoder_hidden_states"),
            guidance_scale=guidance_scale,
            **scale_2,
            num_frames=args.num_frames,
            latents=noise.float(),
            **common,
        ).frames.float()
    packed = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        prompt_embeds_mask=cond["encoder_hidden_states_mask"],
        negative_prompt_embeds=negative.get("encoder_hidden_states"),
        negative_prompt_embeds_mask=negative.get("encoder_hidden_states_mask"),
        true_cfg_scale=guidance_scale,
        max_sequence_length=cond["encoder_hidden_states"].shape[1],
        latents=flow_models.pack_latents(noise.float()),
        **common,
    ).images
    return flow_models.unpack_latents(packed.float(), *noise.shape[-2:])
