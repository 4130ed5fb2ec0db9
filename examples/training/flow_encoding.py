"""SD3 / FLUX / Wan prompt conditions through the pipeline's own ``encode_prompt``, with an on-disk cache."""

# SD3 / SD3.5 (Esser et al. 2024, App. B.2): ``encoder_hidden_states`` = [CLIP-L | CLIP-G penultimate states
# zero-padded to T5's width ; T5 states] ``(B, 77 + max_sequence_length, 4096)`` and ``pooled_projections`` =
# [CLIP-L | CLIP-G pooled] ``(B, 2048)``. FLUX.1: T5 states ``(B, max_sequence_length, 4096)`` and CLIP-L's pooled
# output ``(B, 768)``. Wan 2.1: umT5's states ``(B, max_sequence_length, 4096)``, cut after the prompt's tokens and
# zero-padded (no pooled embedding). All come from the pipeline class's ``encode_prompt`` run on the loaded
# encoders, so they are exactly what the pipeline feeds its transformer (FLUX's ``txt_ids`` are zeros, built by
# :class:`training.flow_models.FlowDenoiser`). ``--max_sequence_length`` is the T5 length (default: the pipeline's,
# SD3 256, FLUX and Wan 512).

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from . import flow_models, sdxl_encoding

DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "wan": 512}  # the pipelines' __call__ defaults


def max_sequence_length(args: argparse.Namespace, parts: flow_models.FlowComponents) -> int:
    """``--max_sequence_length``, or the family's pipeline default."""
    given = getattr(args, "max_sequence_length", None)
    return int(given) if given is not None else DEFAULT_MAX_SEQUENCE_LENGTH[parts.family]


@torch.no_grad()
def encode_prompts(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    device: torch.device | str,
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states (B, L, D), pooled_projections (B, P))`` of ``prompts`` from the pipeline class's
    ``encode_prompt`` (no classifier-free guidance branch); Wan's pooled entry is None."""
    pipe = parts.text_pipeline()
    prompts = list(prompts)
    if parts.family == "sd3":
        ehs, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=torch.device(device),
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
    elif parts.family == "wan":
        ehs, _ = pipe.encode_prompt(
            prompts,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=torch.device(device),
        )
        pooled = None
    else:
        ehs, pooled, _ = pipe.encode_prompt(
            prompts, None, device=torch.device(device), max_sequence_length=max_length
        )
    return ehs, pooled


def encode_prompts_cached(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    device: torch.device | str,
    max_length: int,
    cache_dir: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`encode_prompts` with one safetensors file per prompt under ``cache_dir/text`` (if given), keyed by
    the model (folder / hub id, revision, variant), the family, the T5 length and the prompt."""
    if cache_dir is None:
        return encode_prompts(parts, prompts, device, max_length)
    from safetensors.torch import load_file

    def file(prompt: str) -> Any:
        key = f"{parts.cache_tag}|{parts.family}|max_sequence_length={max_length}|{prompt}"
        return sdxl_encoding.cache_file(cache_dir, "text", key)

    files = [file(p) for p in prompts]
    missing = sorted({p for p, f in zip(prompts, files) if not f.exists()})
    if missing:
        ehs, pooled = encode_prompts(parts, missing, device, max_length)
        for i, p in enumerate(missing):
            entry = {"ehs": ehs[i]} | ({} if pooled is None else {"pooled": pooled[i]})
            sdxl_encoding.save_atomic(entry, file(p))
    loaded = [load_file(str(f)) for f in files]
    ehs = torch.stack([d["ehs"] for d in loaded]).to(device)
    if parts.family == "wan":
        return ehs, None
    return ehs, torch.stack([d["pooled"] for d in loaded]).to(device)


def conditions(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    args: argparse.Namespace,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """:class:`training.flow_models.FlowDenoiser` keyword arguments ``{"encoder_hidden_states",
    "pooled_projections"}`` of ``prompts`` (Wan: ``encoder_hidden_states`` only; ``--max_sequence_length``,
    ``--cache_dir``)."""
    ehs, pooled = encode_prompts_cached(
        parts, prompts, device, max_sequence_length(args, parts), getattr(args, "cache_dir", None)
    )
    cond = {"encoder_hidden_states": ehs.to(dtype)}
    return cond if pooled is None else cond | {"pooled_projections": pooled.to(dtype)}


def uncond_conditions(
    parts: flow_models.FlowComponents,
    args: argparse.Namespace,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The unconditional (negative) branch of classifier-free guidance, batch 1, per ``--uncond``:
    ``empty_prompt`` (the flow scripts' default) is the encoded ``""``, what ``StableDiffusion3Pipeline`` uses for
    an empty negative prompt (and ``FluxPipeline`` with ``true_cfg_scale > 1``, ``WanPipeline`` without a
    ``negative_prompt``); ``zeros`` zero embeddings."""
    cond = conditions(parts, [""], args, device, dtype)
    if getattr(args, "uncond", "empty_prompt") == "zeros":
        return {k: torch.zeros_like(v) for k, v in cond.items()}
    return cond
