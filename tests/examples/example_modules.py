"""Import the example scripts and their ``training`` package the way the scripts import it themselves: with
``examples/`` on ``sys.path`` (it is no package), e.g. ``load_example("sdxl_sim")`` or
``load_example("training.runtime")``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """The module ``name`` of ``examples/`` (a script or ``training.<module>``), imported once per process."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def load_script(name: str) -> ModuleType:
    """``examples/{name}.py`` as the module ``examples_{name}``, loaded from its file (for scripts whose name is also
    an installed package's, e.g. ``evaluate``), with ``examples/`` on ``sys.path`` as when the script runs."""
    import importlib.util

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_ema_updates(monkeypatch: Any) -> list[Any]:
    """Record every ``training.ema_release.ReleaseEMA.update`` call of the test (the release average's moves):
    the returned list gets the average once per update, which still runs."""
    ema_release = load_example("training.ema_release")
    updates: list[Any] = []
    update = ema_release.ReleaseEMA.update

    def counting(self: Any) -> None:
        updates.append(self)
        update(self)

    monkeypatch.setattr(ema_release.ReleaseEMA, "update", counting)
    return updates
