"""diffdistill.students: student construction (EMA targets now; LoRA, block removal and KD hooks follow)."""

from __future__ import annotations

from .ema import EMA

__all__ = ["EMA"]
