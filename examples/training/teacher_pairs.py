"""Diffusion2GAN's teacher ODE pairs: shards the teacher writes, the settings they record, per-step reading."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffdistill.schedulers import TeacherSolver, ddim_sample, spaced_timesteps

from . import aspect_buckets, data_sources, runtime, sdxl_encoding

logger = logging.getLogger(__name__)


# What a shard's pairs depend on besides its index: stored in its metadata, checked before it is reused.
PAIR_SETTINGS_FLAGS = {
    "teacher": "--pretrained_model_name_or_path",
    "revision": "--revision",
    "variant": "--variant",
    "guidance_scale": "--guidance_scale",
    "teacher_steps": "--teacher_steps",
    "resolution": "--resolution",
    "pairs_seed": "--pairs_seed",
    "pairs_shard_size": "--pairs_shard_size",
    "uncond": "--uncond",
    "prompts_sha256": "--prompts_file",
}


def pair_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the teacher pairs of this run are made with (JSON values; ``prompts_sha256`` is the
    hash of the prompt list read from ``--prompts_file``, compared instead of the file's path, which is kept
    for the error message; a local teacher folder is stored resolved)."""
    model = args.pretrained_model_name_or_path
    prompts = data_sources.read_prompts(args.prompts_file)
    return {
        "teacher": str(Path(model).resolve()) if Path(model).exists() else model,
        "revision": args.revision,
        "variant": args.variant,
        "guidance_scale": float(args.guidance_scale),
        "teacher_steps": int(args.teacher_steps),
        "resolution": int(args.resolution),
        "pairs_seed": int(args.pairs_seed),
        "pairs_shard_size": int(args.pairs_shard_size),
        "uncond": args.uncond,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "prompt_draw": data_sources.PROMPT_DRAW,
        "prompts_file": str(Path(args.prompts_file).resolve()),  # for the message only: not compared
    }


def shard_size(args: argparse.Namespace, index: int) -> int:
    """Number of pairs of shard ``index``."""
    return min(args.pairs_shard_size, args.num_pairs - index * args.pairs_shard_size)


def _as_flag(key: str, stored: dict[str, Any]) -> str:
    flag, value = PAIR_SETTINGS_FLAGS[key], stored.get(key)
    if key == "prompts_sha256":
        return f"the prompts of {flag} {stored.get('prompts_file')} as they were then"
    return f"no {flag}" if value is None else f"{flag} {value}"


def check_shard(path: Path, settings: dict[str, Any], rows: int, num_pairs: int) -> None:
    """Raise ``ValueError`` unless the existing shard ``path`` was made with ``settings`` and holds ``rows``
    pairs (of ``num_pairs`` in all): a shard is reused as it is, so one made with other settings would be
    trained on as stale pairs."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored_json = (f.metadata() or {}).get("settings")
        stored_rows = f.get_slice("noise").get_shape()[0]
    fix = f"Pass a new --pairs_dir (or delete the shards in {path.parent}) to make pairs for this run"
    if stored_json is None:
        raise ValueError(
            f"Expected the teacher-pair shard {path} to record the settings it was made with, but it has none "
            f"(written by an older version of this script), so it cannot be checked against this run. {fix}."
        )
    stored = json.loads(stored_json)
    if stored.get("prompt_draw") != settings["prompt_draw"]:
        raise ValueError(
            f"Expected the teacher pairs in {path.parent} to use every prompt once per N pairs (prompt_draw="
            f"{settings['prompt_draw']!r}, data_sources.covering_prompts), but {path.name} was made by an older "
            f"version that drew the prompts with replacement (prompt_draw={stored.get('prompt_draw')!r}). {fix}."
        )
    differ = [k for k in PAIR_SETTINGS_FLAGS if stored.get(k) != settings[k]]
    if differ:
        made = ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
        asked = ", ".join(f"{k}={settings[k]!r}" for k in differ)
        flags = "; ".join(_as_flag(k, stored) for k in differ)
        raise ValueError(
            f"Expected the teacher pairs in {path.parent} to match this run, but {path.name} was made with "
            f"{made} and this run asks for {asked}: reusing it would train on stale pairs. {fix}, or run "
            f"with the settings the shards were made with ({flags})."
        )
    if stored_rows != rows:
        raise ValueError(
            f"Expected {path} to hold {rows} pairs (its share of --num_pairs {num_pairs} in shards of "
            f"{settings['pairs_shard_size']}), but it holds {stored_rows}: --num_pairs changed since it was "
            f"written. Delete that shard to regenerate it, or pass a new --pairs_dir."
        )


def shard_paths(args: argparse.Namespace) -> list[Path]:
    root = Path(args.pairs_dir or Path(args.output_dir) / "pairs")
    count = -(-args.num_pairs // args.pairs_shard_size)
    return [root / f"pairs-{i:05d}.safetensors" for i in range(count)]


def check_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """Check every shard of this run already on disk (:func:`check_shard`); returns :func:`pair_settings`."""
    settings = pair_settings(args)
    for i, path in enumerate(shard_paths(args)):
        if path.exists():
            check_shard(path, settings, shard_size(args, i), args.num_pairs)
    return settings


@torch.no_grad()
def generate_pairs(accelerator: Any, args: argparse.Namespace, parts: Any, teacher: TeacherSolver) -> None:
    """Write the missing teacher-pair shards (this process's share), then wait for every process."""

    prompts = data_sources.read_prompts(args.prompts_file)
    device, dtype = accelerator.device, runtime.weight_dtype_of(accelerator)
    uncond = sdxl_encoding.uncond_conditions(args, parts, device, dtype)
    timesteps = spaced_timesteps(args.teacher_steps, num_train_timesteps=teacher.schedule.num_train_timesteps)
    paths = shard_paths(args)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    settings = check_pairs(args)
    for i, path in enumerate(paths):
        if i % accelerator.num_processes != accelerator.process_index or path.exists():
            continue
        size = shard_size(args, i)
        gen = data_sources.step_generator(args.pairs_seed, i, micro=99)  # independent of the training draws
        picked = data_sources.covering_prompts(prompts, i * args.pairs_shard_size, size, args.pairs_seed)
        cond = sdxl_encoding.unet_conditions(parts, picked, args.resolution, device, dtype, args.cache_dir)
        noise = torch.randn((size, 4, args.resolution // 8, args.resolution // 8), generator=gen).to(device)
        with runtime.autocast(accelerator):
            latent = ddim_sample(
                teacher.model,
                teacher.schedule,
                noise,
                timesteps,
                cond=cond,
                uncond=uncond,
                guidance_scale=teacher.guidance_scale,
            ).sample
        write_shard(path, noise, latent, picked, settings)
        logger.info("wrote %s (%d pairs)", path, size)
    accelerator.wait_for_everyone()


def write_shard(
    path: Path, noise: torch.Tensor, latent: torch.Tensor, prompts: list[str], settings: dict[str, Any]
) -> None:
    """Write one shard atomically (a temporary file of this process, then a rename): float32 ``noise`` and
    ``latent`` rows, and the ``prompts`` and ``settings`` (JSON) in its metadata, as :class:`PairShards` reads it."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file(
        {"noise": noise.float().cpu().contiguous(), "latent": latent.float().cpu().contiguous()},
        str(tmp),
        metadata={"prompts": json.dumps(prompts), "settings": json.dumps(settings)},
    )
    os.replace(tmp, path)


class PairShards(data_sources.StepSource):
    """The teacher pairs of the shards as a per-step source: ``batch(generator)`` -> ``(noise, latent,
    prompts)`` for ``batch_size`` pairs drawn with the step's generator; with ``num_workers > 0`` worker
    processes read them ahead of time (:class:`training.data_sources.StepSource`). Shards of several latent shapes
    (``--aspect_buckets``) give batches of one shape (:func:`training.aspect_buckets.draw_grouped`)."""

    def __init__(self, paths: list[Path], batch_size: int, num_workers: int = 0) -> None:
        from safetensors import safe_open

        self.batch_size, self.num_workers = batch_size, num_workers
        self.index: list[tuple[Path, int]] = []
        self.prompts: dict[Path, list[str]] = {}
        shapes: dict[tuple[int, ...], list[int]] = {}  # the rows of each latent shape, in shard order
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                self.prompts[path] = json.loads((f.metadata() or {})["prompts"])
                rows, *shape = f.get_slice("latent").get_shape()
            shapes.setdefault(tuple(shape), []).extend(range(len(self.index), len(self.index) + rows))
            self.index += [(path, r) for r in range(rows)]
        self.groups = list(shapes.values())

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
        idx = aspect_buckets.draw_grouped(self.groups, self.batch_size, generator)
        return idx, [self.prompts[self.index[k][0]][self.index[k][1]] for k in idx]

    def load(self, idx: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors import safe_open

        rows = []
        for k in idx:
            path, row = self.index[k]
            with safe_open(str(path), framework="pt") as f:
                rows.append((f.get_slice("noise")[row : row + 1], f.get_slice("latent")[row : row + 1]))
        return rows

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        _, prompts, rows = self.fetch(generator)
        return torch.cat([n for n, _ in rows]), torch.cat([z for _, z in rows]), prompts
