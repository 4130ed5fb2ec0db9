"""Forward+backward time and peak memory of E-LatentLPIPS: ours vs the official package vs pixel LPIPS.

Compares, at one latent size and several batch sizes, with identical (random) weights:

* ``ours``: ``diffdistill.losses.ELatentLPIPS`` (augment "bg") and ``LatentLPIPS`` (no augmentation);
* ``ours compiled``: the same E-LatentLPIPS through ``torch.compile(fullgraph=True, dynamic=False)``
  (inductor; ``--compile-mode reduce-overhead`` adds CUDA graphs), skipped with a note when compiling
  fails on the machine (``--compile off`` skips it);
* ``bare latent VGG``: the latent VGG16-BN trunk alone, forward of both latents and backward through the
  input's features -- the floor E-LatentLPIPS is compared against;
* ``official``: ``elatentlpips.ELatentLPIPS`` (augment "bg", ``ensembling=True``/``False``), skipped
  when the package is absent;
* ``pixel``: ``PixelLPIPS`` with a randomly initialised SD-architecture ``AutoencoderKL`` decoder
  (8× upsampling) and the ``lpips`` VGG trunk;
* ``num_draws``: one call with ``num_draws=K`` vs ``K`` separate calls;
* ``baseline``: with ``--baseline REF``, the same losses (and ``LatentAugment("bg")`` alone) from the
  package as it was at git revision ``REF`` (extracted with ``git archive`` into a temporary folder and
  imported as ``diffdistill_baseline``), measured in the same run, so old and new share the machine's
  state; compare their ratios, not absolute times.

Each eager row also gets the aten ops of one forward+backward (the profiler's CPU-side events, value checks
off; issue 24 counts them): the top-level ones (not called by another aten op; 682 for E-LatentLPIPS "bg" before
issue 24's kernel cuts), and among them those that compute (no view, metadata, allocation or no-op cast) --
about the kernels a GPU launches. Both are independent of the batch size and the latent size.

Time is the fastest of ``--reps`` timed calls after one warm-up; peak memory is the extra memory of
the first timed call (CUDA: ``max_memory_allocated``; CPU: peak resident set size sampled every 2 ms, with
glibc told to unmap freed blocks). The result
is printed as a Markdown table with ratios to ``ours (bg)``. Nothing is downloaded.

CPU (slow; a batch-8 pixel call takes minutes, skip it)::

    python benchmarks/lpips.py --size 64 --batch 2 8 --reps 2 --draws-batches 2 --pixel-batches 2

Old vs new augmentation/loss code on CPU (e.g. before and after a change; ``REF`` is any git revision)::

    python benchmarks/lpips.py --size 64 --batch 2 8 --reps 3 --draws 0 --pixel-batches --no-official \
        --baseline REF

GPU (the issue's speed goal: batch 8, 128×128 latents, bf16 autocast, channels_last)::

    python benchmarks/lpips.py --device cuda --size 128 --batch 8 --reps 10 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from peak_memory import measure, track_cpu_memory_exactly  # this folder's helper, imported first

# This file is named like the `lpips` package it measures: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from diffdistill.errors import value_checks  # noqa: E402
from diffdistill.losses import ELatentLPIPS, LatentAugment, LatentLPIPS, PixelLPIPS  # noqa: E402
from diffdistill.losses.latent_augment import sym6_filter  # noqa: E402

COMPILED = "ours E-LatentLPIPS (bg) compiled"


# Aten ops that compute nothing by themselves: views, metadata, allocations, casts to the same dtype.
_NO_COMPUTE_NAMES = (
    "view", "alias", "as_strided", "expand", "unsqueeze", "squeeze", "reshape", "_reshape_alias",
    "_unsafe_view", "permute", "transpose", "t", "select", "slice", "narrow", "split", "split_with_sizes",
    "chunk", "unbind", "unflatten", "flatten", "detach", "detach_", "lift_fresh", "empty", "empty_like",
    "empty_strided", "resize_", "to", "contiguous", "promote_types", "result_type",
)  # fmt: skip
_NO_COMPUTE = frozenset(f"aten::{name}" for name in _NO_COMPUTE_NAMES)


def _copies(event: Any) -> bool:
    """Whether an aten op copies data below it (a real cast, a reshape or ``contiguous`` that must copy)."""
    return any(c.name in ("aten::copy_", "aten::clone") or _copies(c) for c in event.cpu_children)


def aten_op_counts(fn: Callable[[], Any]) -> tuple[int, int]:
    """``(all, compute)`` top-level aten ops of one call of ``fn`` in the CPU profiler (see the module docstring).

    Top-level: not called by another aten op (autograd's backward ops included). Compute: those that are not a
    view, metadata, an allocation or a no-op cast -- about the kernels a GPU launches for them (a convolution
    may launch a few).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [
        e
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    return len(top), sum(1 for e in top if e.name not in _NO_COMPUTE or _copies(e))


def official_model(latent: str, augment: str | None, state_dict: dict[str, torch.Tensor]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from elatentlpips import ELatentLPIPS as Reference
        from elatentlpips.vgg16 import LatentVGG16BN as ReferenceTrunk

        channels = state_dict["net.slice1.0.weight"].shape[1]
        ref = Reference(pretrained=False, pnet_rand=True, encoder=latent, augment=augment, verbose=False)
        features = ReferenceTrunk(channels).model.features  # its random-trunk option is RGB: swap in
    for k in range(1, 6):
        part = getattr(ref.net, f"slice{k}")
        for name in list(part._modules):
            part._modules[name] = features[int(name)]
    sd = dict(state_dict)
    for k in range(5):
        sd[f"lins.{k}.model.1.weight"] = sd[f"lin{k}.model.1.weight"]
    if augment is not None:
        sd["augment.p"] = torch.tensor(1.0)
        sd["augment.Hz_geom"] = sym6_filter()
    ref.load_state_dict(sd, strict=True)
    return ref.eval().requires_grad_(False)


def baseline_package(ref: str) -> ModuleType:
    """The package at git revision ``ref``, imported as ``diffdistill_baseline`` (relative imports only).

    Returns its ``losses`` module; ``diffdistill_baseline.errors`` is imported too (its own value-check switch).
    """
    root = Path(__file__).resolve().parents[1]
    tar = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", ref], capture_output=True, check=True
    )
    folder = Path(tempfile.mkdtemp(prefix="diffdistill-baseline-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(folder / "diffdistill_baseline", filter="data")
    sys.path.insert(0, str(folder))
    return importlib.import_module("diffdistill_baseline.losses")


def sd_vae_decoder() -> torch.nn.Module:
    """AutoencoderKL with the SD/SDXL architecture (random init, nothing downloaded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``); ``benchmarks/gpu_checks.sh``'s lines are parsed
    by ``tests/benchmarks/test_gpu_checks.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", default="sdxl")
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--draws", type=int, default=4, help="K for the num_draws comparison (0: skip)")
    p.add_argument("--draws-batches", type=int, nargs="*", default=None, help="batches for it (default: all)")
    p.add_argument(
        "--pixel-batches", type=int, nargs="*", default=None, help="batches for PixelLPIPS (default: all)"
    )
    p.add_argument("--no-official", action="store_true")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="also measure the package at this git revision (e.g. HEAD or a commit), in the same run",
    )
    p.add_argument(
        "--official-ref-ops",
        action="store_true",
        help="run the official augmentation's upfirdn2d in its PyTorch reference path (impl='ref') instead "
        "of its just-in-time compiled CUDA plugin (which failed to build on the CUDA 13 / torch 2.11 GPU image)",
    )
    p.add_argument(
        "--compile",
        choices=("on", "off"),
        default="on",
        help="also time ours (bg) through torch.compile (inductor); skipped with a note if it fails",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs) on a GPU; default: the default mode',
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the loss calls")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def cudagraph_note(batch: int) -> str:
    """Whether inductor captured the compiled case's CUDA graphs (``--compile-mode reduce-overhead``) or skipped
    them (a CPU tensor or a mutated input in the graph falls back to plain kernels, silently): its skip counter."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    return (
        f"batch {batch}: CUDA graphs captured for the compiled case (inductor cudagraph skips: 0)"
        if skips == 0
        else f"batch {batch}: inductor SKIPPED CUDA graphs {skips} time(s): the compiled row ran without them"
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        track_cpu_memory_exactly()
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )  # reused: autocast contexts are re-enterable

    torch.manual_seed(0)
    ours = ELatentLPIPS(args.latent, augment="bg", weights=None).to(device, memory_format=mf)
    sd = ours.state_dict()
    bare = LatentLPIPS(args.latent, weights=None).to(device, memory_format=mf)
    bare.load_state_dict(sd)
    aug = LatentAugment("bg")
    old_losses = None
    checks_off: list[Callable[[bool], Any]] = [value_checks]
    if args.baseline is not None:
        old = baseline_package(args.baseline)
        old_checks = getattr(importlib.import_module("diffdistill_baseline.errors"), "value_checks", None)
        if old_checks is not None:
            checks_off.append(old_checks)
        base_aug = old.ELatentLPIPS(args.latent, augment="bg", weights=None).to(device, memory_format=mf)
        base_aug.load_state_dict(sd)
        base_bare = old.LatentLPIPS(args.latent, weights=None).to(device, memory_format=mf)
        base_bare.load_state_dict(sd)
        old_losses = (base_aug, base_bare, old.LatentAugment("bg"))
    have_official = not args.no_official and importlib.util.find_spec("elatentlpips") is not None
    if have_official and args.official_ref_ops:
        from elatentlpips.style_ops import upfirdn2d

        # Its dispatch reads `impl == "cuda" and x.is_cuda and _init()`, else the reference path.
        upfirdn2d._init = lambda: False
    if have_official:
        off_aug = official_model(args.latent, "bg", {k: v.cpu() for k, v in sd.items()}).to(
            device, memory_format=mf
        )
    pixel_batches = args.batch if args.pixel_batches is None else args.pixel_batches
    pixel = None
    if pixel_batches:
        pixel = PixelLPIPS(sd_vae_decoder(), net="vgg", latent=args.latent, pretrained_heads=True).to(device)

    compiled: Any = None
    if args.compile == "on":
        # Static shapes (one graph per batch size); generator=None: dynamo does not trace Generators.
        compiled = torch.compile(ours, fullgraph=True, dynamic=False, mode=args.compile_mode)
    notes: list[str] = []
    trunk = bare.net

    def bare_vgg(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The trunk alone: both latents forward (the target without a graph), backward through ``a``."""
        with torch.no_grad():
            trunk(t)
        return sum(f.float().mean() for f in trunk(a))  # type: ignore[return-value]

    draws = args.draws
    ours_k = None
    if draws > 1:
        ours_k = ELatentLPIPS(args.latent, augment="bg", weights=None, num_draws=draws).to(
            device, memory_format=mf
        )
        ours_k.load_state_dict(sd)

    rows: list[tuple[str, int, float, float, float]] = []
    op_counts: dict[tuple[str, int], tuple[int, int]] = {}
    c = ours.in_channels
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        x0 = torch.randn(b, c, args.size, args.size, generator=g).to(device, memory_format=mf)
        y = torch.randn(b, c, args.size, args.size, generator=g).to(device, memory_format=mf)

        def step(
            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            x0: torch.Tensor = x0,
            y: torch.Tensor = y,
        ) -> None:
            x = x0.detach().requires_grad_(True)
            with amp:
                value = loss(x, y)
            value.float().sum().backward()

        def augmented(module: Any, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xa, ya = module(a, t, generator=torch.Generator(a.device).manual_seed(0))
            return (xa - ya).square().mean()

        cases: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = [
            ("ours E-LatentLPIPS (bg)", lambda a, t: ours(a, t)),
            ("ours LatentLPIPS (no aug)", lambda a, t: bare(a, t)),
            ("bare latent VGG16-BN trunk", bare_vgg),
        ]
        if old_losses is not None:
            cases += [
                (f"baseline@{args.baseline} E-LatentLPIPS (bg)", lambda a, t: old_losses[0](a, t)),
                (f"baseline@{args.baseline} LatentLPIPS (no aug)", lambda a, t: old_losses[1](a, t)),
                ("ours LatentAugment (bg) alone", lambda a, t: augmented(aug, a, t)),
                (
                    f"baseline@{args.baseline} LatentAugment (bg) alone",
                    lambda a, t: augmented(old_losses[2], a, t),
                ),
            ]
        if have_official:
            cases += [
                ("official (bg)", lambda a, t: off_aug(a, t, ensembling=True).mean()),
                ("official (no aug)", lambda a, t: off_aug(a, t, ensembling=False).mean()),
            ]
        if ours_k is not None and (args.draws_batches is None or b in args.draws_batches):
            cases += [
                (f"ours num_draws={draws} (one call)", lambda a, t: ours_k(a, t)),
                (f"ours {draws} separate calls", lambda a, t: sum(ours(a, t) for _ in range(draws)) / draws),
            ]
        if pixel is not None and b in pixel_batches:
            cases.append(("PixelLPIPS (SD VAE decode + VGG LPIPS)", lambda a, t: pixel(a, t)))
        if (
            compiled is not None
        ):  # last: a slow compile cut by a time limit leaves the rows the ratios divide by
            cases.append((COMPILED, compiled))
        for name, fn in cases:
            reps = 1 if name.startswith("PixelLPIPS") and device.type == "cpu" else args.reps
            warm = 0 if name.startswith("PixelLPIPS") and device.type == "cpu" else 1
            if name == COMPILED:
                try:
                    step(fn)  # compiles (not timed)
                except Exception as exc:  # a machine without a working compiler
                    notes.append(
                        f"torch.compile failed on this machine ({type(exc).__name__}: {exc}".split("\n")[0]
                        + ")"
                    )
                    compiled = None
                    continue
            t, cpu, m = measure(lambda fn=fn: step(fn), device, reps, warmup=warm)
            if name == COMPILED and args.compile_mode == "reduce-overhead" and device.type == "cuda":
                m = math.nan  # CUDA-graph replays allocate in the graphs' pool, made before the measurement
                notes.append(cudagraph_note(b))
            rows.append((name, b, t, cpu, m))
            if name != COMPILED and not name.startswith("PixelLPIPS"):
                x_grad = x0.detach().requires_grad_(True)  # made outside the profiled call

                def once(
                    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = fn,
                    x: torch.Tensor = x_grad,
                    y: torch.Tensor = y,
                ) -> None:
                    with amp:
                        value = fn(x, y)
                    value.backward()

                with contextlib.ExitStack() as stack:
                    for switch in checks_off:
                        stack.enter_context(switch(False))
                    op_counts[(name, b)] = aten_op_counts(once)
            print(
                f"  {name:42s} B={b}: {t:8.3f} s wall {cpu:8.3f} s cpu {m:9.1f} MB",
                file=sys.stderr,
                flush=True,
            )

    base = {
        b: next(r for r in rows if r[1] == b and r[0].startswith("ours E-LatentLPIPS")) for b in args.batch
    }
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    lines = [
        f"Device: {dev}; latent {args.latent} {args.size}×{args.size}; "
        f"{'bf16 autocast' if args.bf16 else 'float32'}{', channels_last' if args.channels_last else ''}; "
        f"torch {torch.__version__}; "
        f"{'official upfirdn2d in its reference path; ' if args.official_ref_ops else ''}fastest of {args.reps} after 1 warm-up (pixel on CPU: 1 cold run); "
        f"{'time ratios use CPU time' if device.type == 'cpu' else 'time ratios use wall time'}.",
        "",
        "| loss | batch | fwd+bwd wall (s) | CPU time (s) | peak extra mem (MB) | time / ours (bg) | mem / ours (bg) "
        "| aten ops: top-level / compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    on_cpu = device.type == "cpu"
    for name, b, t, cpu, m in rows:
        _, _, bt, bc, bm = base[b]
        ratio = cpu / bc if on_cpu else t / bt  # CPU: ratio of CPU time (robust to other load)
        mr = f"{m / bm:.2f}" if bm > 0 and not math.isnan(m) else "n/a"
        ops = op_counts.get((name, b))
        ops_text = f"{ops[0]} / {ops[1]}" if ops is not None else "–"
        mem = "n/a (CUDA-graph pool)" if math.isnan(m) and name == COMPILED else f"{m:.0f}"
        lines.append(f"| {name} | {b} | {t:.3f} | {cpu:.3f} | {mem} | {ratio:.2f} | {mr} | {ops_text} |")
    pairs = [
        (name[len(prefix) :], b, cpu if on_cpu else t)
        for name, b, t, cpu, _ in rows
        if name.startswith(prefix := f"baseline@{args.baseline} ")
    ]
    if pairs:
        lines += [
            "",
            f"New code vs the package at {args.baseline} ({'CPU' if on_cpu else 'wall'} time; < 1: new is faster):",
            "",
            "| case | batch | new / old |",
            "|---|---:|---:|",
        ]
        for case, b, old_time in pairs:
            new = next(r for r in rows if r[0] == f"ours {case}" and r[1] == b)
            lines.append(f"| {case} | {b} | {(new[3] if on_cpu else new[2]) / old_time:.3f} |")
    goals = []
    for b in args.batch:
        got = {name: (cpu if on_cpu else t) for name, bb, t, cpu, _ in rows if bb == b}
        if COMPILED in got and "official (bg)" in got:
            goals.append(
                f"batch {b}: official (bg) / ours compiled = {got['official (bg)'] / got[COMPILED]:.2f}×"
            )
        if COMPILED in got:
            goals.append(
                f"batch {b}: ours compiled / bare trunk = {got[COMPILED] / got['bare latent VGG16-BN trunk']:.2f}×"
            )
    if goals:
        lines += [
            "",
            "Issue 24 goals (≥ 3× the official package, ≤ 1.5× the bare trunk): " + "; ".join(goals),
        ]
    lines += [f"Note: {n}" for n in notes]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
