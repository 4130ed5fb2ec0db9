"""Every ```python block of README.md runs (in order, sharing one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_snippets() -> None:
    assert len(_python_blocks(README.read_text())) >= 1


def test_readme_snippets_run() -> None:
    namespace: dict[str, object] = {}
    for i, block in enumerate(_python_blocks(README.read_text())):
        torch.manual_seed(0)
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the assertion message is the point
            raise AssertionError(f"README python block {i} failed: {exc!r}\n{block}") from exc
