"""EMA target of a LoRA student: a whole copy vs ``EMA(trainable_only=True)`` (adapters only), CPU or CUDA.

The student is the real SDXL UNet architecture (random weights, ``sdxl_unet_config``) with its base in
bf16 and a float32 LoRA (``add_lora``, rank ``--rank``) as the SDXL scripts build it (``--tiny``: the
tiny SDXL-structured UNet). Four EMAs of it are compared, each for ``--repeat`` updates after the LoRA
weights change:

* ``diffusers EMAModel (every weight)``: ``diffusers.training_utils.EMAModel(unet.parameters())`` -- the
  reference: what an EMA of ``unet.parameters()`` costs (and what ``EMA(unet)`` cost Hyper-SD's target);
* ``EMA (whole copy)``: ``diffdistill.students.EMA(unet)``, which copies every weight;
* ``diffusers EMAModel (LoRA weights)``: ``EMAModel`` of the trainable parameters only -- the adapters'
  average alone, which would still have to be put into a copy of the UNet to run as a target;
* ``EMA (trainable_only)``: the LoRA weights averaged, the frozen base shared with the student; it runs
  as the averaged student.

Reported per EMA: the memory it holds beyond the student (bytes of its tensors whose storage the student
does not own -- exact, no allocator involved), and the median update time (CPU: process time; CUDA:
synchronised wall time), each also as a multiple of the reference's. That ``EMA(trainable_only=True)``
averages exactly as a whole copy does is tested in ``tests/students/test_ema.py``.

Usage::

    python benchmarks/ema.py                 # SDXL UNet (2.6e9 weights, ~5 GB bf16 + 2 copies), CPU
    python benchmarks/ema.py --tiny          # seconds
    python benchmarks/ema.py --device cuda --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from diffdistill.discriminators import sdxl_unet_config, tiny_sdxl_unet_config
from diffdistill.students import EMA, add_lora


def held_bytes(tensors: list[torch.Tensor], owner: torch.nn.Module) -> int:
    """Bytes of ``tensors`` whose storage is not one of ``owner``'s parameters or buffers."""
    owned = {t.untyped_storage().data_ptr() for t in [*owner.parameters(), *owner.buffers()]}
    seen: set[int] = set()
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        else:
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL-structured UNet instead of SDXL's")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (Hyper-SD / LCM-LoRA SDXL: 64)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = tiny_sdxl_unet_config() if args.tiny else sdxl_unet_config()
    unet = UNet2DConditionModel(**config).to(device, dtype=torch.bfloat16).requires_grad_(False)
    add_lora(unet, rank=args.rank)
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p_ in lora:
        p_.data = p_.data.float()  # the scripts' float32 adapters on a bf16 base
    n_base = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in lora)

    def move_lora() -> None:
        with torch.no_grad():
            for p_ in lora:
                p_.add_(1e-3)

    reference = EMAModel(unet.parameters(), decay=0.95)
    whole = EMA(unet, decay=0.95)
    lora_only = EMAModel(lora, decay=0.95)
    lean = EMA(unet, decay=0.95, trainable_only=True)
    ours = lambda ema: [*ema.module.parameters(), *ema.module.buffers()]  # noqa: E731
    cases: list[tuple[str, Callable[[], Any], list[torch.Tensor]]] = [
        (
            "diffusers EMAModel (every weight)",
            lambda: reference.step(unet.parameters()),
            reference.shadow_params,
        ),
        ("EMA (whole copy)", lambda: whole.update(unet), ours(whole)),
        ("diffusers EMAModel (LoRA weights)", lambda: lora_only.step(lora), lora_only.shadow_params),
        ("EMA (trainable_only)", lambda: lean.update(unet), ours(lean)),
    ]
    rows = []
    for name, update, tensors in cases:
        seconds = timed(lambda u=update: (move_lora(), u()), device, args.repeat)
        rows.append({"ema": name, "held_bytes": held_bytes(tensors, unet), "update_s": seconds})
    base, ref = rows[0]["held_bytes"], rows[0]["update_s"]
    kind = "CUDA" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{'tiny' if args.tiny else 'SDXL'} UNet: {n_base / 1e9:.3f}e9 frozen base weights (bf16), "
        f"{n_lora / 1e6:.1f}e6 LoRA weights (rank {args.rank}, float32); {kind}; median of {args.repeat}"
    )
    print("| EMA | memory held | × reference | update | × reference |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ema']} | {r['held_bytes'] / 2**20:,.1f} MiB | {r['held_bytes'] / base:.4f} | "
            f"{r['update_s'] * 1e3:,.1f} ms | {r['update_s'] / ref:.4f} |"
        )
    return rows


if __name__ == "__main__":
    main()
