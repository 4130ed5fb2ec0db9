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


def test_readme_links_work_on_the_package_index_page() -> None:
    """README.md is the package's long description: on the index page a relative link or image has no
    repository to resolve against, so every link must be absolute (files are named as code paths instead)."""
    targets = re.findall(r"\]\(([^)]*)\)", README.read_text())
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert relative == [], f"relative links in README.md break on the index page: {relative}"


def test_readme_imports_no_private_module() -> None:
    text = README.read_text()
    assert "diffdistill._" not in text, "README.md tells users to import from a private module"


def test_make_targets_named_in_the_readmes_exist() -> None:
    """Every ``make <target>`` a README names (in backticks, or on a command line of a fenced block) is a target of
    the Makefile: a renamed or removed target must take its documentation with it."""
    root = README.parent
    targets = set(re.findall(r"^([a-z][a-z0-9_.-]*):", (root / "Makefile").read_text(), flags=re.M))
    assert {"test", "demo", "demo-flow", "demo-one-step"} <= targets
    named: dict[str, set[str]] = {}
    for doc in (README, root / "examples" / "README.md", root / "examples" / "toy" / "README.md"):
        text = doc.read_text()
        # in backticks, or a command line of a fenced block (a prose line may start "make the ...")
        found = re.findall(r"`make ([a-z][a-z0-9_.-]*)", text)
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            found += re.findall(r"^\s*make ([a-z][a-z0-9_.-]*)", block, flags=re.M)
        for target in found:
            named.setdefault(target, set()).add(doc.name if doc == README else str(doc.relative_to(root)))
    assert named, "no `make <target>` found: the pattern is stale"
    missing = {t: sorted(docs) for t, docs in named.items() if t not in targets}
    assert not missing, f"README targets missing from the Makefile: {missing}"
