"""benchmarks/gpu_flow.py: the per-method flow-transformer training-step benchmark, run tiny on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_flow.py"


def _load() -> ModuleType:
    if "gpu_flow" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_flow", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_flow"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_flow"]


@pytest.mark.parametrize("model", ["flux", "sd35-large"])
def test_every_method_steps_on_the_tiny_transformer(model: str) -> None:
    bench = _load()
    args = bench.parse_args(
        ["--tiny", "--model", model, "--device", "cpu", "--max_batch", "1", "--warmup", "0"]
    )
    assert args.latent_size == 8 and args.dtype == torch.float32 and args.text_tokens == 8
    out = bench.main(args)
    lines = out.splitlines()
    assert lines[0].startswith(f"device: cpu, torch {torch.__version__}, tiny {model} transformer")
    assert lines[0].endswith(", eager; MFU blank: no bf16 peak known for cpu (pass --peak_tflops)")
    for name in (bench.REFERENCE, *bench.METHODS):
        rows = [ln.split("|") for ln in lines if ln.startswith(f"| {name} |")]
        assert [r[3].strip() for r in rows] == ["1"], out
        assert float(rows[0][4]) > 0, out
        # gpu_sdxl's FLOP columns: the step's model FLOPs and rate; no MFU without a peak
        assert float(rows[0][9]) > 0 and float(rows[0][10]) > 0 and rows[0][11].strip() == "-", out
    preset = "flux-mini" if model == "flux" else "sd3-half"
    assert f"| kd | student {preset} (full) |" in out


@pytest.mark.parametrize("method", ["reference", "ladd", "dmd2", "tscd"])
def test_each_lora_step_trains_its_adapters_and_never_the_base(method: str) -> None:
    """Two steps on the tiny FLUX: the trained adapters move, the shared base never does. (DMD2's generator gets a
    zero gradient at its first step: the fake score starts equal to the real one, both with FLUX's embedded
    guidance, so its adapter first moves at the second step.)"""
    bench = _load()
    args = bench.parse_args(["--tiny", "--model", "flux", "--device", "cpu", "--max_batch", "1"])
    b = bench.Bench(bench.build_transformer(args), args, bench.NoiseSchedule.flow_matching(shift=3.0))
    step = bench.BUILDERS[method](b)
    before = {n: p.detach().clone() for n, p in b.transformer.named_parameters()}
    for i in range(2):
        step(1, torch.Generator().manual_seed(i))
    after = dict(b.transformer.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved, "the step trained nothing"
    assert all("lora_" in n for n in moved), sorted(n for n in moved if "lora_" not in n)[:3]
    adapters = {n.split(".lora_")[1].split(".")[1] for n in moved}
    want = {
        "reference": {"default"},
        "ladd": {"generator"},
        "dmd2": {"generator", "fake"},
        "tscd": {"generator"},
    }
    assert adapters == want[method]
    # the B matrices start at zero: a step that trains an adapter moves its B
    assert any(".lora_B." in n for n in moved)
