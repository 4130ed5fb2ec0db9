"""diffdistill.discriminators (populated by later issues)."""

from __future__ import annotations

__all__: list[str] = []
