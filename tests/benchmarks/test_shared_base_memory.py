"""benchmarks/shared_base_memory.py: parameter counts against an independent count, bytes per setup, the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "shared_base_memory.py"


def _load() -> ModuleType:
    if "shared_base_memory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shared_base_memory", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["shared_base_memory"] = module
        spec.loader.exec_module(module)
    return sys.modules["shared_base_memory"]


def lora_params_by_hand(model: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """LoRA's ``A`` (r x in, a conv with the layer's kernel) and ``B`` (out x r, a 1x1 conv) of every module whose
    name equals a target or ends in ``.target``, from the layer sizes (Hu et al. 2021, Eq. 3)."""
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += rank * module.in_channels * kh * kw // module.groups + module.out_channels * rank
    return total


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_counts_match_an_independent_count_of_the_tiny_models(name: str) -> None:
    import diffusers

    from diffdistill.discriminators import tiny_sdxl_unet_config
    from diffdistill.students import FLOW_LORA_TARGETS, LCM_LORA_TARGETS
    from diffdistill.tests import transformer_configs as tc

    bench = _load()
    counts = bench.count(name, rank=4, tiny=True)
    if name == "sdxl":
        model, targets = diffusers.UNet2DConditionModel(**tiny_sdxl_unet_config()), LCM_LORA_TARGETS
    else:
        model = diffusers.FluxTransformer2DModel(**tc.tiny_flux_transformer_config())
        targets = FLOW_LORA_TARGETS
    assert counts.base == sum(p.numel() for p in model.parameters())
    assert counts.lora == lora_params_by_hand(model, targets, 4) > 0


def test_bytes_per_setup_and_the_table() -> None:
    bench = _load()
    c = bench.Counts("net", base=1000, lora=10, rank=2)
    mems = {m.setup: m for m in bench.setups(c, base_bytes=2)}
    # frozen bf16 base(s) + two trained parts at 4 (weight) + 4 (grad) + 8 (Adam) bytes per parameter
    assert mems["3 copies, full"].total == 1000 * 2 + 2 * 1000 * 16
    assert mems["3 copies, LoRA"].total == 3 * 1000 * 2 + 2 * 10 * 16
    assert mems["shared base, 2 LoRA"].total == 1000 * 2 + 2 * 10 * 16
    out = bench.main(bench.parse_args(["--tiny", "--rank", "4"]))
    lines = out.splitlines()
    assert lines[0].startswith("base weights in bfloat16") and "activations not estimated" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| sdxl") or ln.startswith("| flux")]
    assert len(rows) == 6 and all(ln.count("|") == 8 for ln in rows)
    shared = [ln for ln in rows if "shared base" in ln]
    assert all(float(ln.split("|")[7].strip().rstrip("x")) < 1 for ln in shared)
    assert torch.empty((), dtype=torch.bfloat16).element_size() == 2
