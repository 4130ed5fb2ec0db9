"""Cost of each UNet discriminator's forward+backward relative to the bare UNet it is built from.

For every discriminator the script times one forward+backward (the D step: gradients to every trainable
D parameter; for a frozen-teacher D, to the heads and the input, as in the generator step) and reports:

* ``ms``: median wall time over ``--repeats`` runs after ``--warmup``;
* ``vs UNet``: that time over one forward+backward of the full UNet at batch ``B``;
* ``vs own backbone``: that time over the same D's backbone (its extractor, same batch, no heads), i.e.
  what the heads and input layers add (goal: at most 1.05);
* ``mem``: peak extra memory: on CUDA ``torch.cuda.max_memory_allocated`` above the state before the run;
  on CPU the bytes of the tensors autograd saves for backward (activation memory), which dominates.

``--flops`` replaces the timings by the FLOPs of forward+backward counted on the meta device
(``torch.utils.flop_counter``): no memory and no GPU needed, so the SDXL-scale head overhead can be
checked anywhere.

The conditional SDXL-Lightning D runs its backbone once at batch ``2B``, so its ``vs own backbone`` row
also compares against a bare ``2B`` backbone call (goal: no more than that).

Usage::

    python benchmarks/discriminators.py                  # tiny SDXL-structured UNet on CPU
    python benchmarks/discriminators.py --sdxl           # real SDXL config, random weights, 128x128, bf16, GPU
    python benchmarks/discriminators.py --sdxl --flops   # SDXL-scale FLOP counts on the meta device (any machine)

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffdistill.discriminators import (
    BottleneckHead,
    MultiLevelDiscriminator,
    MultiScaleConditionalDiscriminator,
    UNetEncoderDiscriminator,
    sdxl_conditions,
    sdxl_unet_config,
    tiny_sdxl_unet_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sdxl", action="store_true", help="real SDXL UNet config (random weights), 128x128, bf16"
    )
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 2; 1 with --sdxl)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 with --sdxl"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--flops",
        action="store_true",
        help="count FLOPs of forward+backward on the meta device instead of timing (no memory, any config)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the backbone blocks")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SavedBytes:
    """Sum of the bytes of distinct tensors autograd saves for backward (a CPU proxy for activation memory)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[tuple[int, int]] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.total += key[1]
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _time_ms(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _memory_mib(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    saved = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        step()
    return saved.total / 2**20


def measure(
    steps: list[Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """Interleaved timing of several steps (each a forward + backward), robust to a machine's load drifting.

    Returns the median milliseconds of every step, the median per-repeat ratio ``steps[i] / steps[0]``
    and the peak extra MiB of every step.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            times[i].append(_time_ms(step, device))
    medians = [statistics.median(t) for t in times]
    ratios = [statistics.median([a / b for a, b in zip(t, times[0])]) for t in times]
    return medians, ratios, [_memory_mib(step, device) for step in steps]


def measure_flops(
    steps: list[Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """GFLOPs of each step (``torch.utils.flop_counter``), their ratios to ``steps[0]``, and NaN memory."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for step in steps:
        with FlopCounterMode(display=False) as counter:
            step()
        flops.append(counter.get_total_flops() / 1e9)
    return flops, [f / flops[0] for f in flops], [float("nan")] * len(steps)


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _build_unet(cls: Any, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    with device:  # initialise the weights on the device (seconds instead of minutes for SDXL)
        unet = cls(**cfg)
    return unet if dtype == torch.float32 else unet.to(dtype)


def main(args: argparse.Namespace) -> str:
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    device = torch.device(
        "meta" if args.flops else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    run = measure_flops if args.flops else measure
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.sdxl else "float32"))
    batch = args.batch or (1 if args.sdxl else 2)
    cfg = sdxl_unet_config() if args.sdxl else tiny_sdxl_unet_config()
    torch.manual_seed(0)
    unet = _build_unet(UNet2DConditionModel, cfg, device, dtype)
    size = int(cfg["sample_size"])
    seq = 77 if args.sdxl else 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=gen).to(device, dtype)
    ehs, added = sdxl_conditions(unet, batch, seq_len=seq, generator=gen, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    use_autocast = dtype == torch.bfloat16 and torch.amp.is_autocast_available(device.type)
    autocast = torch.autocast(
        "cpu" if device.type == "meta" else device.type, dtype=torch.bfloat16, enabled=use_autocast
    )
    ckpt = bool(args.gradient_checkpointing)

    def cat2(v: Any) -> Any:
        return {k: cat2(w) for k, w in v.items()} if isinstance(v, dict) else torch.cat([v, v])

    def bare_unet(b2: bool) -> Callable[[], None]:
        xs, ts, e, a = (
            (torch.cat([x, x]), torch.cat([t, t]), cat2(ehs), cat2(added)) if b2 else (x, t, ehs, added)
        )

        def step() -> None:
            _zero(unet)
            with autocast:
                out = unet(xs, ts, e, added_cond_kwargs=a).sample
            out.float().mean().backward()

        return step

    def d_step(disc: nn.Module, call: Callable[[], list[torch.Tensor]]) -> Callable[[], None]:
        def step() -> None:
            _zero(disc)
            with autocast:
                logits = call()
            sum(v.mean() for v in logits).backward()

        return step

    def backbone_step(disc: Any, b2: bool = False) -> Callable[[], None]:
        xs, ts, e, a = (
            (torch.cat([x, x]), torch.cat([t, t]), cat2(ehs), cat2(added)) if b2 else (x, t, ehs, added)
        )

        def step() -> None:
            _zero(disc)
            with autocast:
                feats = disc.extractor(xs, ts, e, a)
            sum(v.float().mean() for v in feats.values()).backward()

        return step

    # (name, ms, ratio to the bare UNet at B, MiB, ratio to the D's own backbone)
    rows: list[tuple[str, float, float, float, float | None]] = []
    bare, bare2 = bare_unet(False), bare_unet(True)
    (ref_ms, ms2), (_, r2), (ref_mem, mem2) = run([bare, bare2], device, args.repeats, args.warmup)
    rows.append(("bare UNet fwd+bwd, batch B", ref_ms, 1.0, ref_mem, None))
    rows.append(("bare UNet fwd+bwd, batch 2B", ms2, r2, mem2, None))

    def add(
        name: str, disc: nn.Module, call: Callable[[], list[torch.Tensor]], backbone: Callable[[], None]
    ) -> None:
        (ms, _, _), (_, vs_bb, vs_unet), (mem, _, _) = run(
            [d_step(disc, call), backbone, bare], device, args.repeats, args.warmup
        )
        rows.append((name, ms, 1.0 / vs_unet, mem, 1.0 / vs_bb))

    frozen = _build_unet(UNet2DConditionModel, cfg, device, dtype).requires_grad_(False)
    cases: list[tuple[str, Callable[[], nn.Module]]] = [
        (
            "Lightning D, unconditional (encoder+mid copy)",
            lambda: UNetEncoderDiscriminator(unet, conditional=False),
        ),
        ("Lightning D, conditional (one 2B call)", lambda: UNetEncoderDiscriminator(unet, conditional=True)),
        ("DMD2 BottleneckHead (shared trainable UNet)", lambda: BottleneckHead(unet)),
        (
            "PCM MultiLevel (frozen shared teacher, every down level + mid)",
            lambda: MultiLevelDiscriminator(frozen),
        ),
        ("Diffusion2GAN MultiScale (full UNet copy)", lambda: MultiScaleConditionalDiscriminator(unet)),
    ]
    x_in = x.detach().clone().requires_grad_(True)
    for name, build in cases:
        disc = build().to(device)
        if ckpt:
            disc.extractor.gradient_checkpointing = True
        if isinstance(disc, UNetEncoderDiscriminator) and disc.conditional:
            call = lambda d=disc: d(x, t, ehs, added, cond_sample=x, cond_timestep=t)  # noqa: E731
            backbone = backbone_step(disc, b2=True)
        elif isinstance(disc, MultiScaleConditionalDiscriminator):
            call = lambda d=disc: d(x, t, ehs, added, noise=x)  # noqa: E731
            backbone = backbone_step(disc)
        elif isinstance(disc, MultiLevelDiscriminator):
            call = lambda d=disc: d(x_in, t, ehs, added)  # noqa: E731
            frozen_x = x_in

            def backbone(d: Any = disc, xi: torch.Tensor = frozen_x) -> None:
                xi.grad = None
                with autocast:
                    feats = d.extractor(xi, t, ehs, added)
                sum(v.float().mean() for v in feats.values()).backward()
        else:
            call = lambda d=disc: d(x, t, ehs, added)  # noqa: E731
            backbone = backbone_step(disc)
        add(name, disc, call, backbone)
        del disc
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mem_label = {"cuda": "peak extra MiB (CUDA)", "meta": "MiB"}.get(device.type, "saved activations MiB")
    cost_label = "fwd+bwd GFLOP" if args.flops else "fwd+bwd ms"
    lines = [
        f"UNet: {'SDXL config, random weights' if args.sdxl else 'tiny SDXL-structured'} "
        f"({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params), latents {batch}x4x{size}x{size}, "
        f"{dtype}, device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"threads {args.threads}, gradient checkpointing {ckpt}",
        "",
        f"| case | {cost_label} | vs UNet (B) | vs own backbone | {mem_label} | mem vs UNet (B) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, ms, vs_unet, mem, vs_bb in rows:
        cost = f"{ms:.1f}"
        vs_own = "" if vs_bb is None else f"{vs_bb:.3f}"
        mems = "n/a | n/a" if args.flops else f"{mem:.1f} | {mem / ref_mem:.2f}"
        lines.append(f"| {name} | {cost} | {vs_unet:.2f} | {vs_own} | {mems} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(parse_args()))
