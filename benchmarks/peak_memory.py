"""Peak memory and time of one call, on CUDA (allocator statistics) or the CPU (sampled resident set).

Shared by the benchmarks that report memory: :func:`measure` times a callable (fastest wall and process-CPU
seconds of ``reps`` calls after ``warmup``) and takes the peak extra memory of its first timed call --
CUDA: ``max_memory_allocated`` above the memory allocated before the call; CPU: the resident set size
sampled every 2 ms above its value before the call, exact once :func:`track_cpu_memory_exactly` has told
glibc to unmap freed blocks (else an upper bound).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["measure", "peak_memory", "rss_bytes", "track_cpu_memory_exactly"]


def track_cpu_memory_exactly() -> None:
    """Make glibc return every large freed block to the OS, so the resident set follows live memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: allocations >= 64 KiB get their own mapping
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: peak memory becomes an upper-bound estimate
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss_bytes())
        out["peak_mb"] = (peak[0] - base) / 2**20


def measure(
    fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 1
) -> tuple[float, float, float]:
    """(fastest wall seconds, fastest process CPU seconds, peak extra MB) of ``fn`` over ``reps`` calls.

    CPU time (all threads of this process) is the robust figure on a shared, loaded machine: waiting
    for a core does not count. The minimum is the least disturbed sample.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    walls, cpus = [], []
    mem: dict[str, float] = {}
    for i in range(max(1, reps)):
        with peak_memory(device) if i == 0 else contextlib.nullcontext(mem) as m:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        mem = m
    return min(walls), min(cpus), mem["peak_mb"]
