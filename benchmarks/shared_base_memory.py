"""Parameter, gradient and optimiser-state memory of a one-step method's networks: three copies vs one shared base.

A one-step distillation (SIM, SiD, DMD / DMD2) keeps a frozen teacher (the real score), a trained fake score and a
trained generator. Today the scripts hold three copies of the base network; with
:class:`diffdistill.students.SharedBase` one frozen base carries the generator's and the fake score's LoRA
adapters. This script counts, from parameter shapes on the meta device (no weights are allocated), the bytes of

* weights: frozen base weights in ``--base_dtype`` (bf16: 2 bytes); trained weights in float32 (4 bytes: LoRA
  weights and full fine-tuned copies are float32 master weights under mixed precision, as the scripts keep them);
* gradients: float32, one per trained weight (4 bytes);
* Adam(W) state: two float32 moments per trained weight (8 bytes);

for three setups: ``3 copies, full`` (frozen teacher + full generator + full fake score), ``3 copies, LoRA``
(frozen teacher + generator LoRA on its own base + fake LoRA on its own base, today's ``--use_lora``) and
``shared base, 2 LoRA`` (one frozen base, two adapters). LoRA rank ``--rank`` (default 64) on the usual targets:
SDXL: the 14 LCM-LoRA suffixes (:data:`diffdistill.students.LCM_LORA_TARGETS`, DMD2 / LCM-LoRA); FLUX.1: the
attention and feed-forward projections of the double- and single-stream blocks
(:data:`diffdistill.students.FLOW_LORA_TARGETS`, the default targets of diffusers'
``train_dreambooth_lora_flux.py``). Activations are not estimated (they depend on batch,
resolution and gradient checkpointing; measure them with ``benchmarks/gpu_sdxl.py`` on a GPU).

Usage::

    python benchmarks/shared_base_memory.py              # SDXL UNet (2.6 B) and FLUX.1-dev (11.9 B), rank 64
    python benchmarks/shared_base_memory.py --rank 16    # another LoRA rank
    python benchmarks/shared_base_memory.py --tiny       # tiny configs (the test)

Prints a Markdown table (GiB = 2**30 bytes).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GIB = 2**30
TRAINED_BYTES = {"weights": 4, "grads": 4, "adam": 8}  # float32 master weight, gradient, two Adam moments


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one network: the base, and one LoRA adapter of rank ``rank`` on it."""

    name: str
    base: int
    lora: int
    rank: int


@dataclass(frozen=True)
class Memory:
    """Bytes of one setup by kind."""

    setup: str
    weights: int
    grads: int
    adam: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam


def count(name: str, rank: int, tiny: bool = False) -> Counts:
    """Count the base and the LoRA parameters of ``name`` (``"sdxl"`` or ``"flux"``) on the meta device."""
    import diffusers

    from diffdistill.discriminators import sdxl_unet_config, tiny_sdxl_unet_config
    from diffdistill.students import FLOW_LORA_TARGETS, LCM_LORA_TARGETS, add_lora
    from diffdistill.tests import transformer_configs as tc

    if name == "sdxl":
        cls, cfg, targets = diffusers.UNet2DConditionModel, sdxl_unet_config(), LCM_LORA_TARGETS
        if tiny:
            cfg = tiny_sdxl_unet_config()
    else:
        cls, targets = diffusers.FluxTransformer2DModel, FLOW_LORA_TARGETS
        cfg = tc.tiny_flux_transformer_config() if tiny else tc.FLUX1_DEV_CONFIG
    with torch.device("meta"):
        model = cls(**cfg)
        base = sum(p.numel() for p in model.parameters())
        add_lora(model, rank=rank, targets=targets, adapter_name="adapter")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return Counts(name, base, lora, rank)


def setups(c: Counts, base_bytes: int) -> list[Memory]:
    """The three setups' memory (see the module docstring)."""
    w, g, a = TRAINED_BYTES["weights"], TRAINED_BYTES["grads"], TRAINED_BYTES["adam"]
    return [
        Memory("3 copies, full", c.base * base_bytes + 2 * c.base * w, 2 * c.base * g, 2 * c.base * a),
        Memory("3 copies, LoRA", 3 * c.base * base_bytes + 2 * c.lora * w, 2 * c.lora * g, 2 * c.lora * a),
        Memory("shared base, 2 LoRA", c.base * base_bytes + 2 * c.lora * w, 2 * c.lora * g, 2 * c.lora * a),
    ]


def table(rows: Sequence[tuple[Counts, list[Memory]]], base_dtype: torch.dtype) -> str:
    """A Markdown table of the setups of each network (GiB)."""
    lines = [
        f"base weights in {str(base_dtype).replace('torch.', '')}; trained weights, gradients and Adam moments in "
        "float32; activations not estimated",
        "",
        "| network | setup | weights GiB | grads GiB | Adam GiB | total GiB | vs 3 copies, LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, mems in rows:
        ref = next(m for m in mems if m.setup == "3 copies, LoRA").total
        label = f"{c.name} ({c.base / 1e9:.2f} B; LoRA r={c.rank}: {c.lora / 1e6:.1f} M per adapter)"
        for m in mems:
            lines.append(
                f"| {label} | {m.setup} | {m.weights / GIB:.2f} | {m.grads / GIB:.2f} | {m.adam / GIB:.2f} | "
                f"{m.total / GIB:.2f} | {m.total / ref:.2f}x |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of both adapters (default 64)")
    parser.add_argument(
        "--base_dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="frozen base dtype",
    )
    parser.add_argument("--networks", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (for the test)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    """Count, compute and return the table."""
    base_dtype = getattr(torch, args.base_dtype)
    base_bytes = torch.empty((), dtype=base_dtype).element_size()
    rows = []
    for name in args.networks:
        c = count(name, args.rank, tiny=args.tiny)
        rows.append((c, setups(c, base_bytes)))
    return table(rows, base_dtype)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(main(parse_args()))
