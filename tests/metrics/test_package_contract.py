"""diffdistill.metrics follows the package contracts: light import, documented Args / Raises, doctests."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

from diffdistill import metrics

NO_RAISES = {"MissingDependencyError", "ProtocolMismatchError"}  # exception types


def test_import_is_light() -> None:
    code = (
        "import sys, diffdistill.metrics; "
        "heavy = [m for m in ('cleanfid', 'open_clip', 'transformers', 'scipy', 'PIL', 'torchvision', "
        "'ImageReward', 'hpsv2', 'diffusers') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import diffdistill.metrics pulled in: {out.stdout.strip()}"


def _public() -> list[tuple[str, object]]:
    items = []
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        items.append((name, obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (
                    inspect.isfunction(member) or isinstance(member, classmethod)
                ):
                    items.append((f"{name}.{attr}", getattr(obj, attr)))
    return items


@pytest.mark.parametrize(("qualname", "obj"), _public(), ids=[q for q, _ in _public()])
def test_public_callables_document_args(qualname: str, obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__init__" in vars(obj) and vars(obj)["__init__"].__doc__:
        doc += "\n" + (inspect.getdoc(vars(obj)["__init__"]) or "")
    assert doc.strip(), f"{qualname} has no docstring"
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    params = [
        p.name
        for p in sig.parameters.values()
        if p.name not in {"self", "cls"} and p.kind not in {p.VAR_POSITIONAL, p.VAR_KEYWORD}
    ]
    if params:
        assert "Args:" in doc, f"{qualname} takes {params} but documents no Args"
        block = doc.split("Args:", 1)[1]
        for p in params:
            assert re.search(rf"^\s+\*?\*?{re.escape(p)}\b.*:", block, re.MULTILINE), (
                f"{qualname}: `{p}` undocumented"
            )
    if (
        "." not in qualname
        and qualname not in NO_RAISES
        and (inspect.isfunction(obj) or inspect.isclass(obj))
    ):
        assert "Raises:" in doc, f"{qualname} has no Raises: section"
