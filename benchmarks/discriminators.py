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

``--transformer sd3|flux|wan`` benchmarks LADD's discriminator (:class:`~diffdistill.discriminators.LADDDiscriminator`)
on a frozen shared transformer teacher instead: the bare teacher's forward+backward, the D's generator step
(heads on every k-th block, gradient to the input through the teacher) and its own backbone (the same early-exit
feature extractor, no heads); ``vs own backbone`` is the heads' overhead (goal: at most 1.05). With
``--published`` the published configs (SD3.5-Large, FLUX.1-dev) at 1024 px (4096 image tokens; 333 / 512 text
tokens) are used, normally with ``--flops`` (meta device); for Wan, Wan2.1-T2V-1.3B at 81 frames of 480x832
(latents 16x21x60x104: 32,760 video tokens; 512 text tokens) with ``--blocks 15 22 29``, FastGen's readouts.

Usage::

    python benchmarks/discriminators.py                  # tiny SDXL-structured UNet on CPU
    python benchmarks/discriminators.py --sdxl           # real SDXL config, random weights, 128x128, bf16, GPU
    python benchmarks/discriminators.py --sdxl --flops   # SDXL-scale FLOP counts on the meta device (any machine)
    python benchmarks/discriminators.py --transformer flux                       # tiny FLUX-structured, CPU
    python benchmarks/discriminators.py --transformer flux --published --flops   # FLUX.1-dev scale, meta device
    python benchmarks/discriminators.py --transformer wan --published --flops --blocks 15 22 29  # Wan 1.3B video

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
    p.add_argument(
        "--transformer",
        choices=["sd3", "flux", "wan"],
        default=None,
        help="benchmark LADD's discriminator on a transformer teacher instead of the UNet discriminators",
    )
    p.add_argument(
        "--published",
        action="store_true",
        help="with --transformer: the published config (SD3.5-Large / FLUX.1-dev at 1024 px; Wan2.1-T2V-1.3B at "
        "81x480x832)",
    )
    p.add_argument("--every", type=int, default=None, help="with --transformer: read every k-th block")
    p.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="with --transformer: read these blocks (not --every)",
    )
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


def transformer_main(args: argparse.Namespace) -> str:
    """LADD's discriminator vs its frozen transformer teacher (see the module docstring)."""
    import diffusers

    from diffdistill.discriminators import LADDDiscriminator
    from diffdistill.tests import transformer_configs as tc

    torch.set_num_threads(args.threads)
    device = torch.device(
        "meta" if args.flops else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    run = measure_flops if args.flops else measure
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.published else "float32"))
    batch = args.batch or (1 if args.published else 2)
    sd3, wan = args.transformer == "sd3", args.transformer == "wan"
    if sd3:
        cfg = tc.SD35_LARGE_CONFIG if args.published else tc.tiny_sd3_transformer_config()
        cls = diffusers.SD3Transformer2DModel
    elif wan:
        cfg = tc.WAN21_T2V_1_3B_CONFIG if args.published else tc.tiny_wan_transformer_config()
        cls = diffusers.WanTransformer3DModel
    else:
        cfg = tc.FLUX1_DEV_CONFIG if args.published else tc.tiny_flux_transformer_config()
        cls = diffusers.FluxTransformer2DModel
    torch.manual_seed(0)
    with device:
        teacher = cls(**cfg)
    teacher = (teacher if dtype == torch.float32 else teacher.to(dtype)).requires_grad_(False).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    text_len = (333 if sd3 else 512) if args.published else 5
    grid = 64 if args.published else (4 if sd3 else 3)  # patch grid per side (1024 px: 128 latent / 2)
    text_dim = cfg["text_dim"] if wan else cfg["joint_attention_dim"]
    ehs = torch.randn(batch, text_len, text_dim, generator=gen).to(device, dtype)
    pooled = (
        None if wan else torch.randn(batch, cfg["pooled_projection_dim"], generator=gen).to(device, dtype)
    )
    kw: dict[str, Any] = {"encoder_hidden_states": ehs}
    if wan:  # video latents (B, C, F, H, W); Wan takes sigma * 1000 and no pooled text embedding
        frames, height, width = (21, 60, 104) if args.published else (3, 8, 8)
        x = torch.randn(batch, cfg["in_channels"], frames, height, width, generator=gen).to(device, dtype)
        t = torch.full((batch,), 750.0, device=device)
        grid_text = f"{frames}x{height // 2}x{width // 2} video tokens"
    elif sd3:
        x = torch.randn(batch, cfg["in_channels"], 2 * grid, 2 * grid, generator=gen).to(device, dtype)
        t = torch.full((batch,), 750.0, device=device)
    else:
        x = torch.randn(batch, grid * grid, cfg["in_channels"], generator=gen).to(device, dtype)
        t = torch.full((batch,), 0.75, device=device)
        ids = torch.zeros(grid, grid, 3)
        ids[..., 1] = torch.arange(grid)[:, None]
        ids[..., 2] = torch.arange(grid)[None, :]
        kw.update(
            img_ids=ids.reshape(-1, 3).to(device),
            txt_ids=torch.zeros(text_len, 3, device=device),
            guidance=torch.full((batch,), 3.5, device=device),
            grid_size=(grid, grid),
        )
    if pooled is not None:
        kw["pooled_projections"] = pooled
    model_kw = {k: v for k, v in kw.items() if k != "grid_size"}
    groups = 32 if args.published else 4
    disc = LADDDiscriminator(
        teacher,
        blocks=args.blocks,
        every=args.every,
        norm_groups=groups,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    disc.to(device)
    x_in = x.detach().clone().requires_grad_(True)

    def bare() -> None:
        x_in.grad = None
        out = teacher(x_in, timestep=t, **model_kw).sample
        out.float().mean().backward()

    def d_step() -> (
        None
    ):  # the generator step: gradient to the input through the frozen teacher and the heads
        x_in.grad = None
        _zero(disc)
        logits = disc(x_in, t, **kw)
        sum(v.mean() for v in logits).backward()

    def backbone() -> None:
        x_in.grad = None
        feats = disc.extractor(x_in, timestep=t, **kw)
        sum(v.float().mean() for v in feats.values()).backward()

    (bare_c, d_c, bb_c), (_, d_r, bb_r), (bare_m, d_m, bb_m) = run(
        [bare, d_step, backbone], device, args.repeats, args.warmup
    )
    n_params = sum(p.numel() for p in teacher.parameters()) / 1e9
    head_params = sum(p.numel() for p in disc.head_parameters()) / 1e6
    cost_label = "fwd+bwd GFLOP" if args.flops else "fwd+bwd ms"
    published = "Wan2.1-T2V-1.3B" if wan else "SD3.5-Large" if sd3 else "FLUX.1-dev"
    name = published if args.published else f"tiny {args.transformer}"
    if not wan:
        grid_text = f"{grid}x{grid} image tokens"
    lines = [
        f"Teacher: {name} ({n_params:.2f} B params, random weights), batch {batch}, {grid_text}, "
        f"{text_len} text tokens, {dtype}, device {device}, gradient checkpointing {args.gradient_checkpointing}; "
        f"LADD D reads {len(disc.blocks)} blocks {list(disc.blocks)} ({head_params:.2f} M head parameters)",
        "",
        f"| case | {cost_label} | vs teacher | vs own backbone |",
        "|---|---:|---:|---:|",
        f"| bare teacher fwd+bwd (to the input) | {bare_c:.1f} | 1.00 | |",
        f"| LADD D backbone only (early exit) | {bb_c:.1f} | {bb_r:.3f} | 1.000 |",
        f"| LADD D (backbone + heads) | {d_c:.1f} | {d_r:.3f} | {d_r / bb_r:.3f} |",
    ]
    if not args.flops:
        lines.append("")
        lines.append(f"memory MiB (bare / backbone / D): {bare_m:.1f} / {bb_m:.1f} / {d_m:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    _args = parse_args()
    print(transformer_main(_args) if _args.transformer else main(_args))
