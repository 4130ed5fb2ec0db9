"""Layout of the examples' shared package ``examples/training/`` (issue 19 part 6).

The plumbing the SDXL scripts share is split by concern: one module per concern, each opening with a
one-line docstring that says what it owns, none over ~400 lines, and no grab-bag module beside the scripts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PACKAGE = EXAMPLES / "training"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
MAX_LINES = 420  # "no module over ~400 lines"


def test_no_grab_bag_module_beside_the_scripts() -> None:
    assert not (EXAMPLES / "distill_common.py").exists()
    assert len(MODULES) >= 8, [p.name for p in MODULES]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_each_module_is_one_concern(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_LINES, f"{path.name}: {len(source.splitlines())} lines"
    doc = ast.get_docstring(ast.parse(source))
    assert doc is not None and "\n" not in doc.strip(), (
        f"{path.name}: needs a one-line docstring of what it owns"
    )
    # the package's docstring names every module, so a reader finds where each concern lives
    assert f":mod:`training.{path.stem}`" in (PACKAGE / "__init__.py").read_text()


@pytest.mark.parametrize(
    "script", sorted([*EXAMPLES.glob("sdxl_*.py"), *EXAMPLES.glob("flow_*.py")]), ids=lambda p: p.name
)
def test_scripts_call_the_package_by_module(script: Path) -> None:
    """Scripts import modules (``from training import runtime``) and call ``runtime.adamw``: no star or name imports."""
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training"):
            assert node.module == "training", f"{script.name}: imports names from {node.module}"
            modules = {p.stem for p in MODULES}
            assert {a.name for a in node.names} <= modules, f"{script.name}: {[a.name for a in node.names]}"
