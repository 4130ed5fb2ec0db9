"""Speed and peak-memory benchmark of the Dice semimetric loss (forward + backward), CPU or CUDA.

Compares, at Dice settings (alpha = beta = 0.5, smooth = 1e-3, batch-level aggregation, official
default active classes: present for hard labels, all for soft labels):

* ``ours``: :func:`diffdistill.losses.dice_semimetric_loss` with its default value checks on;
* ``ours (no checks)``: the same with value checks off (what runs under ``torch.compile``);
* ``official formula``: a local re-implementation of the JDTLosses ``JDTLoss`` forward as described
  in ``shared/reference/dice.md`` §1.2 (log-softmax/exp, one-hot label, three norms, boolean-indexed
  mean over active classes);
* ``MONAI``: ``monai.losses.DiceLoss(softmax=True, batch=True, soft_label=True)`` (skipped if MONAI is
  missing), with ``to_onehot_y=True`` for hard labels.

Time: for each (shape, labels) one subprocess runs every implementation once to warm up, then
``--repeat`` rounds in which the implementations run one after the other (interleaved, so that load
from other processes on a shared machine hits all of them alike); the table gives the minimum and
the median per implementation, and the speed-up uses the minima. Peak memory on CPU is measured in
a fresh subprocess per implementation: the growth of the peak resident set size during one
forward+backward call after a warm-up call (Linux ``/proc/self/clear_refs`` resets VmHWM, then
VmHWM - VmRSS before the call), i.e. every allocation the call makes, torch's included
(``tracemalloc`` does not see torch's allocator). On CUDA it is the growth of
``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/dice.py                    # B=8, C=21, 256x256 and 32x64x64, CPU, float32
    python benchmarks/dice.py --repeat 3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IMPLS = ("ours", "ours (no checks)", "official formula", "MONAI")


def official_formula(logits: torch.Tensor, label: torch.Tensor, smooth: float = 1e-3) -> torch.Tensor:
    """The JDTLoss computation as documented (Dice: alpha = beta = 0.5, mIoUD only, no mask)."""
    batch, num_classes = logits.shape[:2]
    prob = logits.reshape(batch, num_classes, -1).log_softmax(dim=1).exp()
    hard = label.dtype == torch.long
    if hard:
        flat = label.clamp(0, num_classes - 1).reshape(batch, -1)
        label = F.one_hot(flat, num_classes).permute(0, 2, 1).to(prob.dtype)
    else:
        label = label.reshape(batch, num_classes, -1)
    prob_card = torch.norm(prob, p=1, dim=2)
    label_card = torch.norm(label, p=1, dim=2)
    diff_card = torch.norm(prob - label, p=1, dim=2)
    tp = (prob_card + label_card - diff_card) / 2
    fp = prob_card - tp
    fn = label_card - tp
    tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    tversky = (tp + smooth) / (tp + 0.5 * fp + 0.5 * fn + smooth)
    loss_c = 1 - tversky
    if hard:  # PRESENT for hard labels, ALL for soft ones (the official defaults)
        active = label.amax(dim=(0, 2)) > 0.01
    else:
        active = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
    if not bool(active.any()):
        return 0.0 * tp.sum()
    return loss_c[active].mean()


def _make_fn(impl: str, hard: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if impl.startswith("ours"):
        from diffdistill._checks import set_value_checks
        from diffdistill.losses import dice_semimetric_loss

        checks = impl == "ours"

        def ours(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            set_value_checks(checks)
            return dice_semimetric_loss(x, y)

        return ours
    if impl == "official formula":
        return official_formula
    from monai.losses import DiceLoss

    monai_loss = DiceLoss(
        softmax=True, to_onehot_y=hard, batch=True, soft_label=True, smooth_nr=1e-3, smooth_dr=1e-3
    )
    if hard:
        return lambda x, y: monai_loss(x, y.unsqueeze(1))
    return monai_loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(hard: bool, shape: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    batch, num_classes, *spatial = shape
    logits = torch.randn(*shape, device=device, requires_grad=True)
    if hard:
        target = torch.randint(0, num_classes, (batch, *spatial), device=device)
    else:
        target = torch.softmax(3 * torch.randn(*shape, device=device), dim=1)
    return logits, target


def _step(fn: Callable, logits: torch.Tensor, target: torch.Tensor, device: str) -> None:
    logits.grad = None
    fn(logits, target).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(impl: str, hard: bool, shape: tuple[int, ...], device: str) -> float:
    """Peak memory growth (MiB) of one forward+backward call, in a fresh process."""
    logits, target = _inputs(hard, shape, device)
    fn = _make_fn(impl, hard)
    _step(fn, logits, target, device)  # warm-up, so one-off allocations (thread pools) are not counted
    logits.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, logits, target, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _status_kib("VmRSS")
    _step(fn, logits, target, device)
    return (_status_kib("VmHWM") - base) / 1024


def measure_time(hard: bool, shape: tuple[int, ...], repeat: int, device: str) -> dict[str, list[float]]:
    """Forward+backward seconds of every implementation, interleaved round by round.

    Interleaving spreads any load from other processes on a shared machine over all implementations.
    """
    logits, target = _inputs(hard, shape, device)
    fns = {}
    for impl in IMPLS:
        try:
            fns[impl] = _make_fn(impl, hard)
        except ImportError:
            continue
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for fn in fns.values():
        _step(fn, logits, target, device)  # warm-up
    for _ in range(repeat):
        for impl, fn in fns.items():
            start = time.perf_counter()
            _step(fn, logits, target, device)
            times[impl].append(time.perf_counter() - start)
    return times


def _child(spec: dict, args: argparse.Namespace) -> Any:
    shape = tuple(spec["shape"])
    if spec["what"] == "memory":
        return measure_memory(spec["impl"], spec["hard"], shape, args.device)
    return measure_time(spec["hard"], shape, args.repeat, args.device)


def _run_child(spec: dict, args: argparse.Namespace) -> Any:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--repeat", str(args.repeat)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(f"{spec} failed: {proc.stderr.strip().splitlines()[-1:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(json.loads(args.child), args)))
        return

    shapes = {"2D 8x21x256x256": [8, 21, 256, 256], "3D 8x21x32x64x64": [8, 21, 32, 64, 64]}
    threads = args.threads or torch.get_num_threads()
    print(f"device={args.device}, threads={threads}, torch {torch.__version__}, float32, forward+backward")
    print(
        f"time: min and median of {args.repeat} interleaved rounds; peak: growth of peak RSS during one "
        "call in a fresh process (CPU) / CUDA allocator peak; ratios = official / impl (higher is better)\n"
    )
    print(
        "| shape | labels | impl | min (ms) | median (ms) | peak (MiB) | speed-up vs official | memory vs official |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape_name, shape in shapes.items():
        for hard in (True, False):
            times = _run_child({"what": "time", "hard": hard, "shape": shape}, args) or {}
            memory = {
                impl: _run_child({"what": "memory", "impl": impl, "hard": hard, "shape": shape}, args)
                for impl in IMPLS
            }
            official_t = min(times["official formula"]) if "official formula" in times else None
            official_m = memory.get("official formula")
            for impl in IMPLS:
                if impl not in times:
                    print(f"| {shape_name} | {'hard' if hard else 'soft'} | {impl} | n/a | n/a | n/a | | |")
                    continue
                t_min, t_med = min(times[impl]), statistics.median(times[impl])
                mem = memory.get(impl)
                ratio_t = ratio_m = ""
                if impl != "official formula" and official_t is not None:
                    ratio_t = f"{official_t / t_min:.2f}x"
                    if mem and official_m:
                        ratio_m = f"{official_m / mem:.2f}x"
                mem_s = "n/a" if mem is None else f"{mem:.0f}"
                print(
                    f"| {shape_name} | {'hard' if hard else 'soft'} | {impl} | {1e3 * t_min:.1f} | "
                    f"{1e3 * t_med:.1f} | {mem_s} | {ratio_t} | {ratio_m} |"
                )


if __name__ == "__main__":
    main()
