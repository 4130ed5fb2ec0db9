"""diffdistill.losses: loss families, one module each, as functional + ``nn.Module`` pairs."""

from __future__ import annotations

__all__: list[str] = []
