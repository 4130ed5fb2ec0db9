"""Run every docstring example of the package (see DESIGN.md: not `pytest --doctest-modules .`)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import diffdistill


def _module_names() -> list[str]:
    names = ["diffdistill"]
    for info in pkgutil.walk_packages(diffdistill.__path__, "diffdistill."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _module_names())
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module_name, extraglobs={"torch": torch})
    for test in tests:
        torch.manual_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {module_name}"
