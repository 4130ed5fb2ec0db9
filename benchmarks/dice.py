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

Each configuration runs in a fresh subprocess. Time is the median wall time of ``--repeat``
forward+backward calls after one warm-up call. Peak memory on CPU is the growth of the process's
peak resident set size during one forward+backward call (Linux ``/proc/self/clear_refs`` reset of
VmHWM, then VmHWM - VmRSS before the call), i.e. every allocation the call makes, torch's included
(``tracemalloc`` does not see torch's allocator). On CUDA it is ``torch.cuda.max_memory_allocated``
growth.

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

        set_value_checks(impl == "ours")
        return dice_semimetric_loss
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


def run_one(impl: str, hard: bool, shape: tuple[int, ...], repeat: int, device: str) -> dict[str, float]:
    """Benchmark one configuration in this process; returns seconds and MiB."""
    torch.manual_seed(0)
    batch, num_classes, *spatial = shape
    logits = torch.randn(*shape, device=device, requires_grad=True)
    if hard:
        target = torch.randint(0, num_classes, (batch, *spatial), device=device)
    else:
        target = torch.softmax(3 * torch.randn(*shape, device=device), dim=1)
    fn = _make_fn(impl, hard)

    def step() -> None:
        logits.grad = None
        fn(logits, target).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # Peak memory of the first call (no warm caches on CPU).
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        step()  # warm-up first so one-off allocations (thread pools) are not counted
        logits.grad = None
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS")
        step()
        peak_mib = (_status_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        result = run_one(spec["impl"], spec["hard"], tuple(spec["shape"]), args.repeat, args.device)
        print(json.dumps(result))
        return

    shapes = {"2D 8x21x256x256": (8, 21, 256, 256), "3D 8x21x32x64x64": (8, 21, 32, 64, 64)}
    rows = []
    for shape_name, shape in shapes.items():
        for hard in (True, False):
            results: dict[str, dict[str, float] | None] = {}
            for impl in IMPLS:
                spec = json.dumps({"impl": impl, "hard": hard, "shape": shape})
                cmd = [sys.executable, __file__, "--child", spec, "--repeat", str(args.repeat)]
                cmd += ["--device", args.device, "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    results[impl] = None
                    sys.stderr.write(
                        f"{impl} failed on {shape_name}: {proc.stderr.strip().splitlines()[-1:]}\n"
                    )
                    continue
                results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((shape_name, "hard" if hard else "soft", results))

    threads = args.threads or torch.get_num_threads()
    print(f"device={args.device}, threads={threads}, torch {torch.__version__}, float32, forward+backward")
    print(f"median of {args.repeat} runs; peak = growth of peak RSS during one call (CPU) / CUDA allocator\n")
    print(
        "| shape | labels | impl | time (ms) | peak (MiB) | speed-up vs official | memory saving vs official |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for shape_name, kind, results in rows:
        official = results.get("official formula")
        for impl in IMPLS:
            r = results.get(impl)
            if r is None:
                print(f"| {shape_name} | {kind} | {impl} | n/a | n/a | | |")
                continue
            ratio_t = ratio_m = ""
            if official is not None and impl != "official formula":
                ratio_t = f"{official['time_s'] / r['time_s']:.2f}x"
                ratio_m = f"{official['peak_mib'] / max(r['peak_mib'], 1e-3):.2f}x"
            print(
                f"| {shape_name} | {kind} | {impl} | {1e3 * r['time_s']:.1f} | {r['peak_mib']:.0f} "
                f"| {ratio_t} | {ratio_m} |"
            )


if __name__ == "__main__":
    main()
