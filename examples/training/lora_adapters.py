"""Several LoRA adapters on one UNet: train one at a time, and merge them exactly into one diffusers LoRA file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffdistill.students import lora_state_dict, save_lora

from . import checkpoints


def adapter_params(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The weights of the peft LoRA ``adapter`` of ``model`` (``<module>.lora_A.<adapter>.weight``, ...)."""
    return [p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter}." in n]


def train_only(model: torch.nn.Module, adapter: str) -> None:
    """Make the LoRA ``adapter`` of ``model`` trainable and its other LoRAs frozen (``requires_grad``): a frozen
    one gets no gradient, so clipping ignores it and AdamW skips it (its weights and moments stay as they are)."""
    trained = {id(p) for p in adapter_params(model, adapter)}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(id(param) in trained)


def merged_lora_state(
    model: torch.nn.Module, adapters: Sequence[str], state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA ``adapters`` of ``model`` merged exactly into one LoRA, and its config.

    Adapters active together on a layer add ``sum_i s_i B_i A_i x`` (``s_i = lora_alpha_i / r_i``), which is one
    LoRA of rank ``sum_i r_i`` and scale 1: ``A = [A_1; A_2; ...]`` (rows stacked), ``B = [s_1 B_1 | s_2 B_2 |
    ...]`` (columns side by side). No SVD truncation. ``state_dict``: values to read instead of the model's own
    (``accelerator.get_state_dict``). Returns ``(tensors in peft file keys, config for the file metadata)``;
    raises ``ValueError`` when the adapters target different layers or hold other trained weights.
    """
    configs = getattr(model, "peft_config", {})
    states = [lora_state_dict(model, name, state_dict=state_dict) for name in adapters]
    scales = [configs[name].lora_alpha / configs[name].r for name in adapters]
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise ValueError(
            f"Expected the LoRA adapters {list(adapters)} to target the same layers to merge them."
        )
    merged: dict[str, torch.Tensor] = {}
    for key in states[0]:
        if ".lora_A." in f".{key}":
            merged[key] = torch.cat([s[key] for s in states], dim=0)
        elif ".lora_B." in f".{key}":
            merged[key] = torch.cat([s[key] * c if c != 1 else s[key] for s, c in zip(states, scales)], dim=1)
        else:  # a weight trained with the adapters (a guidance embedding): it has no per-adapter form to merge
            raise ValueError(f"Expected LoRA weights only in the adapters to merge, but got {key!r}.")
    rank = sum(int(configs[name].r) for name in adapters)
    first = configs[adapters[0]]
    config = {
        "r": rank,
        "lora_alpha": float(rank),
        "target_modules": sorted(set().union(*(set(configs[name].target_modules) for name in adapters))),
        "lora_dropout": 0.0,
        "bias": str(first.bias),
        "use_dora": False,
    }
    return merged, config


def write_lora_file(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path, prefix: str = "unet"
) -> None:
    """Write LoRA ``tensors`` and their ``config`` as a diffusers LoRA file (keys ``f"{prefix}.{key}"``, the
    config in the ``lora_adapter_metadata`` entry, as ``diffdistill.students.save_lora`` writes them)."""
    from safetensors.torch import save_file

    pre = f"{prefix}." if prefix else ""
    meta = json.dumps({pre + k: v for k, v in config.items()}, sort_keys=True)
    save_file(
        {pre + k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(path),
        metadata={"format": "pt", "lora_adapter_metadata": meta},
    )


def save_merged_lora(
    accelerator: Any,
    unet: torch.nn.Module,
    args: argparse.Namespace,
    adapters: Sequence[str],
    folder: str = "",
    *,
    alone: str | None = None,
) -> Path:
    """Write the ``adapters`` merged into one LoRA (:func:`merged_lora_state`) to ``OUTPUT_DIR/folder/`` and, with
    ``alone``, that adapter by itself to ``OUTPUT_DIR/<alone>/``; call on every process. Returns the file."""
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(unet)
    state = accelerator.get_state_dict(unet)
    out = Path(args.output_dir) / folder
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_lora_file(*merged_lora_state(model, adapters, state), out / checkpoints.LORA_WEIGHT_NAME)
        if alone is not None:
            single = Path(args.output_dir) / alone
            single.mkdir(parents=True, exist_ok=True)
            save_lora(model, single / checkpoints.LORA_WEIGHT_NAME, adapter_name=alone, state_dict=state)
    accelerator.wait_for_everyone()
    return out / checkpoints.LORA_WEIGHT_NAME
