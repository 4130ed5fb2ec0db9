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


# The methods in 3 groups, one test each (pytest-xdist runs them side by side: one test of all methods took 100 s,
# most of it FlopCounterMode's Python dispatch); the reference step runs with the first group only.
GROUPS = (("reference", "lightning", "hyper_sd"), ("diffusion2gan",), ("mlcm", "sim", "ssd1b"))


def test_the_groups_cover_every_method() -> None:
    bench = _load()
    assert sorted(m for g in GROUPS for m in g) == sorted((bench.REFERENCE, *bench.METHODS))


@pytest.mark.parametrize("group", GROUPS, ids="+".join)
def test_every_method_steps_on_the_tiny_unet(group: tuple[str, ...]) -> None:
    bench = _load()
    methods = [m for m in group if m != bench.REFERENCE]
    # Batch 1 only (the doubling is checked below); diffusion2gan also at 2 for its mix-and-match negatives.
    argv = ["--tiny", "--device", "cpu", "--max_batch", "1", "--warmup", "0", "--peak_tflops", "0.5"]
    argv += ["--methods", *methods, *([] if bench.REFERENCE in group else ["--no_reference"])]
    args = bench.parse_args(argv)
    assert args.latent_size == 32 and args.dtype == torch.float32
    out = bench.main(args)
    assert lines_mfu_consistent(out, peak=0.5) == len(group)
    lines = out.splitlines()
    assert lines[0].startswith(f"device: cpu, torch {torch.__version__}, tiny 3-level UNet")
    for name in group:  # one row per method, with a time
        rows = [ln.split("|") for ln in lines if ln.startswith(f"| {name} |")]
        assert [r[3].strip() for r in rows] == ["1"], out
        assert float(rows[0][4]) > 0, out
        assert rows[0][8].strip() == "-", out  # no peak memory on the CPU
        if bench.REFERENCE in group:
            # step / reference: the reference step itself is 1.00; a method's is its time over the reference's
            ref = next(ln.split("|") for ln in lines if ln.startswith(f"| {bench.REFERENCE} |"))
            # (from the printed 3-decimal seconds of ~0.01-0.1 s steps: a few % rounding)
            assert float(rows[0][7]) == pytest.approx(float(rows[0][4]) / float(ref[4]), rel=0.1, abs=0.01), (
                out
            )
        else:
            assert rows[0][7].strip() == "-", out  # no reference row to divide by
    if bench.REFERENCE in group:
        assert (
            lines.index(next(ln for ln in lines if ln.startswith("| reference |"))) == 4
        )  # run (and listed) first
    else:
        assert not any(ln.startswith("| reference |") for ln in lines), out
    if "diffusion2gan" in group:
        argv = ["--tiny", "--device", "cpu", "--methods", "diffusion2gan", "--warmup", "0", "--batches", "2"]
        assert "| diffusion2gan | LoRA | 2 |" in bench.main(bench.parse_args([*argv, "--no_reference"]))
    if "ssd1b" in group:
        assert "| ssd1b | student (full) |" in out
    if "sim" in group:
        assert "| sim | LoRA |" in out


def lines_mfu_consistent(out: str, *, peak: float | None) -> int:
    """Check every measured row's FLOP columns against its step time (as printed); return how many rows."""
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| ") and "method" not in ln]
    measured = [r for r in rows if r[3].strip() != "-"]
    for r in measured:
        seconds, tflop, rate, mfu, recomputed = (r[i].strip() for i in (3, 8, 9, 10, 11))
        assert float(tflop) > 0, r  # every step runs matmuls / convolutions
        # printed to 3 decimals (s) and 4 significant digits: ~1e-3 / 0.01 s relative rounding on the tiny steps
        assert float(rate) == pytest.approx(float(tflop) / float(seconds), rel=0.1), r
        if peak is None:
            assert mfu == "-", r
        else:
            assert float(mfu) == pytest.approx(100 * float(rate) / peak, rel=1e-2, abs=0.05), r
        assert 0 <= float(recomputed) < 100, r  # checkpointing recomputes at most the forward passes
    return len(measured)


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
        == "| ssd1b | student (full) | - | - | - | OOM at 16 | - | - | - | - | - | - |"
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
        ", approximate R1 (sigma 0.1), eager;" in out.splitlines()[0]
        and "| diffusion2gan | LoRA | 1 |" in out
    )
    assert sigmas == [0.1, 0.1]  # the FLOP count's step, then the timed step


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


def _two_linear_step(checkpointed: bool) -> tuple[object, int, int, int, int]:
    """A step (forward, backward, Adam) of ``Linear(I, H) -> Linear(H, O)`` at batch ``B``, the second layer
    gradient-checkpointed when asked, and its sizes."""
    B, I, H, O = 3, 5, 7, 11  # noqa: E741 - the shapes' usual letters
    torch.manual_seed(0)
    first, second = torch.nn.Linear(I, H), torch.nn.Linear(H, O)
    opt = torch.optim.Adam([*first.parameters(), *second.parameters()], lr=1e-3)

    def step(batch: int, gen: torch.Generator) -> None:
        hidden = first(torch.randn(batch, I, generator=gen))
        if checkpointed:  # without early stop: the whole layer runs again (with it, torch stops the
            # recomputation once the saved tensors are back -- here before the matmul itself)
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                out = torch.utils.checkpoint.checkpoint(second, hidden, use_reentrant=False)
        else:
            out = second(hidden)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, B, I, H, O


@pytest.mark.parametrize("checkpointed", [False, True])
def test_flops_of_a_linear_step_match_the_hand_count(checkpointed: bool) -> None:
    """Counted by the benchmark's own function against the count by hand: a (B, n) x (n, m) matmul is 2 B n m
    FLOPs. Forward: 2BIH + 2BHO. Backward: the second layer's weight and input gradients (2BHO each), the first
    layer's weight gradient only (2BIH; its input needs none). Checkpointing runs the second layer's forward again
    in the backward pass: 2BHO more executed, counted apart, the model count unchanged."""
    bench = _load()
    args = bench.parse_args(["--tiny", "--device", "cpu"])
    step, B, I, H, O = _two_linear_step(checkpointed)  # noqa: E741
    flops, recomputed = bench.count_flops(step, B, args)
    assert flops == 2 * B * I * H + 2 * B * H * O + 2 * B * H * O * 2 + 2 * B * I * H
    assert recomputed == (2 * B * H * O if checkpointed else 0)


def test_recomputation_is_found_without_torch_2_14s_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch before 2.14 (the GPU image's 2.11) does not mark checkpoint's hooks ``_checkpoint_internal``: the
    recomputation is still counted apart, by the hooks' names (audit 16: it was counted as model FLOPs, MFU x1.3),
    and a torch whose hooks neither mark nor name finds it refuses to measure."""
    import torch.utils.checkpoint as checkpoint

    bench = _load()
    args = bench.parse_args(["--tiny", "--device", "cpu"])
    step, B, I, H, O = _two_linear_step(True)  # noqa: E741
    marked = [0]
    init = checkpoint._recomputation_hook.__init__

    def unmarked_init(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        init(self, *a, **k)
        if hasattr(self.pack_hook, "_checkpoint_internal"):
            marked[0] += 1
            del self.pack_hook._checkpoint_internal  # what torch < 2.14 builds

    monkeypatch.setattr(checkpoint._recomputation_hook, "__init__", unmarked_init)
    flops, recomputed = bench.count_flops(step, B, args)
    assert marked[0] > 0, "this torch does not mark the hook: the test would not test the fallback"
    assert recomputed == 2 * B * H * O and flops == 2 * B * I * H + 2 * B * H * O * 3 + 2 * B * I * H
    bench.check_recompute_detection()
    monkeypatch.setattr(bench, "CHECKPOINT_HOOK_QUALNAMES", ("no_such_hook.",))
    with pytest.raises(RuntimeError, match=r"the FLOP counter sees 0 recomputed FLOPs .* MFU overstated"):
        bench.check_recompute_detection()


def test_mfu_columns_and_the_device_peak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load()
    rows = [
        {"method": "sim", "trains": "LoRA", "batch": 4, "seconds": 0.5, "peak_gib": 30.0, "status": "ok"}
        | {"flops": 2e14, "recomputed_flops": 5e13},
    ]
    # 200 TFLOP in 0.5 s = 400 TFLOP/s = 40.4 % of 989.4; recomputation 25 % of the model FLOPs
    assert bench.table(rows, 989.4).endswith("| 200 | 400 | 40.4 | 25 |")
    assert bench.table(rows).endswith("| 200 | 400 | - | 25 |")  # no peak: MFU blank
    args = bench.parse_args(["--tiny", "--device", "cpu"])
    assert bench.peak_tflops(args) == (None, "MFU blank: no bf16 peak known for cpu (pass --peak_tflops)")
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.4),  # the SXM card's name
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200 NVL", None),
    ]:
        monkeypatch.setattr(bench, "device_name", lambda device, name=name: name)
        assert bench.peak_tflops(args)[0] == peak, name
    assert bench.peak_tflops(bench.parse_args(["--tiny", "--peak_tflops", "100"]))[0] == 100.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--peak_tflops", "0"])
    assert "--peak_tflops must be positive (TFLOP/s), got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--compile", "--compile_backend", "nope"])
    assert "Expected --compile_backend to be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--compile", "--shared_base", "--methods", "diffusion2gan"])
    assert "pass --r1_approximate_sigma" in capsys.readouterr().err
