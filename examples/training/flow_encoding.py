"""SD3 / FLUX / Qwen-Image / Wan prompt conditions through the pipeline's own ``encode_prompt``, with a cache."""

# SD3 / SD3.5 (Esser et al. 2024, App. B.2): ``encoder_hidden_states`` = [CLIP-L | CLIP-G penultimate states
# zero-padded to T5's width ; T5 states] ``(B, 77 + max_sequence_length, 4096)`` and ``pooled_projections`` =
# [CLIP-L | CLIP-G pooled] ``(B, 2048)``. FLUX.1: T5 states ``(B, max_sequence_length, 4096)`` and CLIP-L's pooled
# output ``(B, 768)``. Wan 2.1: umT5's states ``(B, max_sequence_length, 4096)``, cut after the prompt's tokens and
# zero-padded (no pooled embedding). Qwen-Image: Qwen2.5-VL's last hidden states of the prompt in the pipeline's
# chat template, its first 34 tokens dropped, and their mask (no pooled embedding). All come from the pipeline class's ``encode_prompt`` run on the loaded
# encoders, so they are exactly what the pipeline feeds its transformer (FLUX's ``txt_ids`` are zeros, built by
# :class:`training.flow_models.FlowDenoiser`). ``--max_sequence_length`` is the T5 length (default: the pipeline's,
# SD3 256, FLUX, Qwen-Image and Wan 512).

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from . import flow_families, flow_models, sdxl_encoding

DEFAULT_MAX_SEQUENCE_LENGTH = {
    "sd3": 256,
    "flux": 512,
    "qwen": 512,
    "wan": 512,
}  # the pipelines' __call__ defaults


def max_sequence_length(args: argparse.Namespace, parts: flow_models.FlowComponents) -> int:
    """``--max_sequence_length``, or the family's pipeline default."""
    given = getattr(args, "max_sequence_length", None)
    return int(given) if given is not None else DEFAULT_MAX_SEQUENCE_LENGTH[parts.family]


#: The names of the conditions in the on-disk cache (the first two kept from before Qwen-Image's mask).
CACHE_NAMES = {
    "encoder_hidden_states": "ehs",
    "pooled_projections": "pooled",
    "encoder_hidden_states_mask": "mask",
}


@torch.no_grad()
def encode_prompts(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    device: torch.device | str,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """The :class:`training.flow_models.FlowDenoiser` conditions of ``prompts`` from the pipeline class's
    ``encode_prompt`` (no classifier-free guidance branch): ``encoder_hidden_states`` ``(B, L, D)`` and, per family,
    ``pooled_projections`` ``(B, P)`` (SD3, FLUX) or ``encoder_hidden_states_mask`` ``(B, L)`` (Qwen-Image).

    Qwen-Image's states come cut after each prompt's tokens and padded to the batch's longest with a mask; here
    they are padded to ``max_length`` (zeros, mask 0: our choice, so that every batch and the unconditional branch
    have one length and stack for CFG; the transformer masks the padding out of attention, and the text
    positions of the real tokens do not move)."""
    pipe = parts.text_pipeline()
    prompts, dev = list(prompts), torch.device(device)
    if parts.family == "sd3":
        ehs, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=dev, do_classifier_free_guidance=False, max_sequence_length=max_length
        )
        return {"encoder_hidden_states": ehs, "pooled_projections": pooled}
    if parts.family == "flux":
        ehs, pooled, _ = pipe.encode_prompt(prompts, None, device=dev, max_sequence_length=max_length)
        return {"encoder_hidden_states": ehs, "pooled_projections": pooled}
    if parts.family == "wan":
        ehs, _ = pipe.encode_prompt(
            prompts, None, do_classifier_free_guidance=False, max_sequence_length=max_length, device=dev
        )
        return {"encoder_hidden_states": ehs}
    ehs, mask = pipe.encode_prompt(prompts, device=dev, max_sequence_length=max_length)
    if mask is None:  # every prompt as long as the longest: the pipeline drops the all-ones mask
        mask = torch.ones(ehs.shape[:2], dtype=torch.long, device=ehs.device)
    pad = max_length - ehs.shape[1]
    return {
        "encoder_hidden_states": torch.nn.functional.pad(ehs, (0, 0, 0, pad)),
        "encoder_hidden_states_mask": torch.nn.functional.pad(mask.long(), (0, pad)),
    }


def encode_prompts_cached(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    device: torch.device | str,
    max_length: int,
    cache_dir: str | None,
) -> dict[str, torch.Tensor]:
    """:func:`encode_prompts` with one safetensors file per prompt under ``cache_dir/text`` (if given), keyed by
    the model (folder / hub id, revision, variant), the family, the text encoders' dtype (a bf16 run's states
    differ from a float32 run's), the text length and the prompt."""
    if cache_dir is None:
        return encode_prompts(parts, prompts, device, max_length)
    from safetensors.torch import load_file

    dtypes = ",".join(str(next(m.parameters()).dtype) for m in parts.text_encoders)

    def file(prompt: str) -> Any:
        key = f"{parts.cache_tag}|{parts.family}|{dtypes}|max_sequence_length={max_length}|{prompt}"
        return sdxl_encoding.cache_file(cache_dir, "text", key)

    files = [file(p) for p in prompts]
    missing = sorted({p for p, f in zip(prompts, files) if not f.exists()})
    if missing:
        encoded = encode_prompts(parts, missing, device, max_length)
        for i, p in enumerate(missing):
            sdxl_encoding.save_atomic({CACHE_NAMES[k]: v[i] for k, v in encoded.items()}, file(p))
    loaded = [load_file(str(f)) for f in files]
    names = {k: v for k, v in CACHE_NAMES.items() if v in loaded[0]}
    return {k: torch.stack([d[stored] for d in loaded]).to(device) for k, stored in names.items()}


def conditions(
    parts: flow_models.FlowComponents,
    prompts: Sequence[str],
    args: argparse.Namespace,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """:class:`training.flow_models.FlowDenoiser` keyword arguments of ``prompts`` (:func:`encode_prompts`; the
    states in ``dtype``, a mask as it is; ``--max_sequence_length``, ``--cache_dir``)."""
    encoded = encode_prompts_cached(
        parts, prompts, device, max_sequence_length(args, parts), getattr(args, "cache_dir", None)
    )
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in encoded.items()}


def uncond_conditions(
    parts: flow_models.FlowComponents,
    args: argparse.Namespace,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The unconditional (negative) branch of classifier-free guidance, batch 1, per ``--uncond``:
    ``empty_prompt`` (the flow scripts' default) is the encoded ``""``, what ``StableDiffusion3Pipeline`` uses for
    an empty negative prompt (and ``FluxPipeline`` with ``true_cfg_scale > 1``, ``WanPipeline`` without a
    ``negative_prompt``), or a family's :data:`training.flow_families.UNCOND_PROMPT` (Qwen-Image: ``" "``);
    ``zeros`` zero embeddings (a text mask kept)."""
    cond = conditions(parts, [flow_families.UNCOND_PROMPT.get(parts.family, "")], args, device, dtype)
    if getattr(args, "uncond", "empty_prompt") == "zeros":
        return {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in cond.items()}
    return cond
