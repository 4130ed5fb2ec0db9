"""``benchmarks/ema.py --tiny`` runs, and its memory column is what the EMA variants hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_ema_benchmark_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ema.py"
    spec = importlib.util.spec_from_file_location("ema_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--rank", "4", "--repeat", "1", "--threads", "1"])
    held = {r["ema"]: r["held_bytes"] for r in rows}
    reference, whole, lora_only, lean = held.values()
    # diffusers' shadow and our whole copy hold every weight once; trainable_only holds the adapters (float32,
    # as an EMAModel of the LoRA weights does) and the UNet's buffers, far less than the bf16 base.
    assert whole == reference > 0
    assert 0 < lora_only <= lean < whole / 4
    assert all(r["update_s"] > 0 for r in rows)
    assert "| EMA (trainable_only) |" in capsys.readouterr().out
