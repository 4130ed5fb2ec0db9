"""Overhead of layer-level KD hooks (FeatureTap + LayerKD) on a training step, CPU or CUDA.

A tiny SDXL-structured UNet is the teacher and its "ssd-1b" block-removed copy the student
(:func:`diffdistill.students.build_student`); the KD pairs are the report's ``"sub_block"`` pairs (every
kept resnet and attention plus the mid block, SSD-1B's default level). Four steps are timed, all
forward + backward of the student (no optimiser step, the same in every case):

* ``plain student``: ``mse(student(x), target)``;
* ``student + taps``: the same with the student's :class:`~diffdistill.students.FeatureTap` registered
  (features popped after the step);
* ``plain KD step``: the teacher forward under ``no_grad`` plus ``task + 0.5 * output-KD``, no hooks;
* ``LayerKD step``: :class:`~diffdistill.students.LayerKD` (teacher and student taps, feature MSE over
  every pair, per-layer logs).

The overheads compared with the goal (<= 3 %) are ``student + taps`` vs ``plain student`` (the cost of
the hooks alone) and ``LayerKD step`` vs ``plain KD step`` (hooks + feature loss at equal model work).
Each round runs the steps one after the other in a shuffled order (interleaved, so background load
hits all alike, and no step always follows the same one); the table gives the minimum and median per
step and the overheads from both. On CPU the clock is the
process's CPU time (``time.process_time``), which other processes on a shared machine do not inflate
as they inflate wall time; on CUDA it is wall time around synchronised steps. After every LayerKD
step the script checks that neither tap still holds a feature.

Usage::

    python benchmarks/kd_hooks.py                      # CPU, 1 thread, batch 2, 32x32 latents
    python benchmarks/kd_hooks.py --repeat 30 --batch 4 --device cuda
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from diffdistill.students import FeatureTap, LayerKD, build_student


def tiny_sdxl(width: int, size: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size,
        block_out_channels=(width, 2 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2],
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
        use_linear_projection=True,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--width", type=int, default=32, help="block_out_channels[0]")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    teacher = tiny_sdxl(args.width, args.size).to(device).requires_grad_(False).eval()
    student, report = build_student(teacher, "ssd-1b")
    student.train()
    pairs = report.kd_pairs("sub_block")
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.size
    x = torch.randn(b, 4, s, s, generator=g).to(device)
    target = torch.randn(b, 4, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    cond = {
        "encoder_hidden_states": torch.randn(b, 8, 32, generator=g).to(device),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(b, 32, generator=g).to(device),
            "time_ids": torch.rand(b, 6, generator=g).to(device),
        },
    }

    holder: dict[str, object] = {}

    def plain_student() -> None:
        F.mse_loss(student(x, t, **cond).sample, target).backward()

    def student_with_taps() -> None:
        tap = holder["tap"]
        F.mse_loss(student(x, t, **cond).sample, target).backward()
        tap.pop()  # type: ignore[attr-defined]

    def plain_kd() -> None:
        with torch.no_grad():
            teacher_out = teacher(x, t, **cond).sample
        out = student(x, t, **cond).sample
        (F.mse_loss(out, target) + 0.5 * F.mse_loss(out, teacher_out)).backward()

    def layer_kd() -> None:
        kd = holder["kd"]
        loss, _ = kd(x, t, target, **cond)  # type: ignore[operator]
        loss.backward()
        if kd.student_tap.features or kd.teacher_tap.features:  # type: ignore[attr-defined]
            raise RuntimeError("a feature outlived the step")

    # Hooks are registered (untimed) before their own step and removed after it, so that the plain steps
    # run without them; in training the taps live for the whole run.
    def open_tap() -> None:
        holder["tap"] = FeatureTap(student, list(pairs.values()))

    def open_kd() -> None:
        holder["kd"] = LayerKD(student, teacher, pairs)

    def close_all() -> None:
        for obj in holder.values():
            obj.close()  # type: ignore[attr-defined]
        holder.clear()

    steps: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "plain student": (plain_student, lambda: None),
        "student + taps": (student_with_taps, open_tap),
        "plain KD step": (plain_kd, lambda: None),
        "LayerKD step": (layer_kd, open_kd),
    }
    # On CPU the process's CPU time: unlike wall time it does not count the time other processes of a
    # shared machine hold the cores. On CUDA, wall time around synchronised steps.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    clock_name = "wall" if device.type == "cuda" else "process CPU"
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = random.Random(0)
    for round_idx in range(args.warmup + args.repeat):
        names = list(steps)
        order.shuffle(names)  # a fixed order would favour some steps (cache state, frequency ramps)
        for name in names:
            fn, setup = steps[name]
            setup()
            student.zero_grad(set_to_none=True)
            sync(device)
            start = clock()
            fn()
            sync(device)
            elapsed = clock() - start
            close_all()
            if round_idx >= args.warmup:
                times[name].append(elapsed)
    leftover_hooks = sum(len(m._forward_hooks) for net in (student, teacher) for m in net.modules())

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device={device}, threads={args.threads}, torch {torch.__version__}, batch {b}, latents {s}x{s}, "
        f"widths ({args.width}, {2 * args.width}), {len(pairs)} KD pairs, {args.repeat} rounds, {clock_name} time"
    )
    print(
        f"teacher {report.teacher_parameters / 1e6:.2f}M params, student {report.student_parameters / 1e6:.2f}M; "
        f"hooks left after the run: {leftover_hooks}; features kept after each LayerKD step: 0"
    )
    print(
        "| step (forward + backward) | min ms | median ms | overhead vs | overhead (min) | overhead (median) |"
    )
    print("|---|---:|---:|---|---:|---:|")
    base = {"student + taps": "plain student", "LayerKD step": "plain KD step"}
    for name, values in times.items():
        ref = base.get(name)
        over_min = f"{100 * (min(values) / min(times[ref]) - 1):+.1f}%" if ref else ""
        over_med = f"{100 * (med[name] / med[ref] - 1):+.1f}%" if ref else ""
        print(
            f"| {name} | {1e3 * min(values):.1f} | {1e3 * med[name]:.1f} | {ref or ''} | {over_min} | {over_med} |"
        )


if __name__ == "__main__":
    main()
