"""Import the example scripts and their ``training`` package the way the scripts import it themselves: with
``examples/`` on ``sys.path`` (it is no package), e.g. ``load_example("sdxl_sim")`` or
``load_example("training.runtime")``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """The module ``name`` of ``examples/`` (a script or ``training.<module>``), imported once per process."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)
