"""benchmarks/gpu_sdxl.py: the per-method SDXL training-step benchmark, run tiny on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_sdxl.py"


def _load() -> ModuleType:
    if "gpu_sdxl" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_sdxl", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_sdxl"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_sdxl"]


def test_every_method_steps_on_the_tiny_unet() -> None:
    bench = _load()
    # Batch 1 only (the doubling is checked below); diffusion2gan also at 2 for its mix-and-match negatives.
    args = bench.parse_args(["--tiny", "--device", "cpu", "--max_batch", "1", "--warmup", "0"])
    assert args.latent_size == 32 and args.dtype == torch.float32
    out = bench.main(args)
    lines = out.splitlines()
    assert lines[0].startswith("device: cpu, tiny 3-level UNet")
    for name in (bench.REFERENCE, *bench.METHODS):  # one row per method, with a time
        rows = [ln.split("|") for ln in lines if ln.startswith(f"| {name} |")]
        assert [r[3].strip() for r in rows] == ["1"], out
        assert float(rows[0][4]) > 0, out
        # step / reference: the reference step itself is 1.00; a method's is its time over the reference's
        ref = next(ln.split("|") for ln in lines if ln.startswith(f"| {bench.REFERENCE} |"))
        # (from the printed 3-decimal seconds of ~0.01-0.1 s steps: a few % rounding)
        assert float(rows[0][7]) == pytest.approx(float(rows[0][4]) / float(ref[4]), rel=0.1, abs=0.01), out
        assert rows[0][8].strip() == "-", out  # no peak memory on the CPU
    assert (
        lines.index(next(ln for ln in lines if ln.startswith("| reference |"))) == 4
    )  # run (and listed) first
    args = bench.parse_args(["--tiny", "--device", "cpu", "--methods", "diffusion2gan", "--warmup", "0"])
    assert "| diffusion2gan | LoRA | 2 |" in bench.main(args)
    assert "| ssd1b | student (full) |" in out and "| sim | LoRA |" in out


def _out_of_memory_from_batch_8(monkeypatch: pytest.MonkeyPatch, bench: ModuleType) -> list[int]:
    """Stub ``measure`` (0.5 s and 10 GiB per sample; OOM from batch 8) and mlcm's builder; list the batches tried."""
    tried: list[int] = []

    def fake_measure(step: object, batch: int, args: object) -> tuple[float, float]:
        tried.append(batch)
        if batch >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.5 * batch, 10.0 * batch

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setitem(bench.BUILDERS, "mlcm", lambda b: lambda batch, gen: None)
    return tried


def test_batch_doubles_until_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load()
    tried = _out_of_memory_from_batch_8(monkeypatch, bench)
    args = bench.parse_args(["--tiny", "--device", "cpu", "--methods", "mlcm", "--max_batch", "64"])
    rows = bench.run_method("mlcm", args)
    assert tried == [1, 2, 4, 8]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "OOM"]
    md = bench.table(rows)
    assert "| mlcm | LoRA | 1 | 0.500 | 10.0 | OOM at 8 | - | - |" in md  # no reference rows: no ratios
    assert "| mlcm | LoRA | 4 | 2.000 | 40.0 | OOM at 8 | - | - |" in md
    ref = [{**r, "method": bench.REFERENCE, "seconds": r["seconds"] / 4} for r in rows if r["status"] == "ok"]
    assert "| mlcm | LoRA | 4 | 2.000 | 40.0 | OOM at 8 | 4.00 | 1.00 |" in bench.table(ref + rows)
    # Errors that are not out-of-memory propagate.
    monkeypatch.setattr(bench, "measure", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.run_method("mlcm", args)


def test_explicit_batches_stop_at_the_first_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load()
    tried = _out_of_memory_from_batch_8(monkeypatch, bench)
    args = bench.parse_args(
        ["--tiny", "--device", "cpu", "--methods", "mlcm", "--batches", "1", "6", "8", "16"]
    )
    rows = bench.run_method("mlcm", args)
    assert tried == [1, 6, 8]
    assert "| mlcm | LoRA | 6 | 3.000 | 60.0 | OOM at 8 | - | - |" in bench.table(rows)
    # Out of memory at the first batch tried: that batch, and the method's own "trains".
    oom_first = [
        {
            "method": bench.REFERENCE,
            "trains": "LoRA",
            "batch": 16,
            "seconds": 1.0,
            "peak_gib": 20.0,
            "status": "ok",
        },
        {"method": "ssd1b", "trains": "student (full)", "batch": 16, "status": "OOM"},
    ]
    assert (
        bench.table(oom_first).splitlines()[-1]
        == "| ssd1b | student (full) | - | - | - | OOM at 16 | - | - |"
    )
    assert bench.parse_args(["--tiny", "--max_batch", "5"]).batches == [1, 2, 4]
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--batches", "1", "0"])


def test_diffusion2gan_with_the_approximate_r1(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load()
    sigmas: list[object] = []
    lazy = bench.lazy_r1_penalty

    def recording(*args: object, **kwargs: object) -> object:
        sigmas.append(kwargs["approximate_sigma"])
        return lazy(*args, **kwargs)

    monkeypatch.setattr(bench, "lazy_r1_penalty", recording)
    argv = ["--tiny", "--device", "cpu", "--methods", "diffusion2gan", "--batches", "1", "--warmup", "0"]
    out = bench.main(bench.parse_args([*argv, "--no_reference", "--r1_approximate_sigma", "0.1"]))
    assert (
        out.splitlines()[0].endswith(", approximate R1 (sigma 0.1)") and "| diffusion2gan | LoRA | 1 |" in out
    )
    assert sigmas == [0.1]


def test_memory_cap(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--device", "cpu", "--memory_cap_gib", "78"])
    assert "--memory_cap_gib caps the CUDA caching allocator: it needs a CUDA device, got --device cpu" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--memory_cap_gib", "0"])
    assert "--memory_cap_gib must be positive, got 0.0" in capsys.readouterr().err
    # The fraction handed to the allocator: the cap over the card's memory (a 139.8 GiB H200 stand-in).
    total = int(139.8 * 2**30)
    set_fraction: list[tuple[float, object]] = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": total})()
    )
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: set_fraction.append((f, d))
    )
    # "cuda" (no index, as parse_args makes it) is the current device; an explicit index is kept.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bench.cap_memory(torch.device("cuda"), 78) == pytest.approx(78 / 139.8)
    bench.cap_memory(torch.device("cuda", 1), 78)
    assert set_fraction == [(pytest.approx(78 / 139.8), 0), (pytest.approx(78 / 139.8), 1)]
    device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"--memory_cap_gib 150 exceeds the device's 139.8 GiB"):
        bench.cap_memory(device, 150)
    assert len(set_fraction) == 2
