"""benchmarks/gpu_checks.sh, checked before a device lease is spent on it.

A device lease is short (15 minutes of device time, at most 10 per command): a typo in one of the script's
command lines, an option renamed in a benchmark, or a section added past the time the lease allows would cost
the one run a session gets. These tests read the script the way bash does (its ``section NAME SECONDS COMMAND``
lines, continuation lines joined), and hand every benchmark command line to that benchmark's own argument
parser (as on a CUDA machine), check that the files a command names exist, and that the default sections'
time limits fit the command limit the script's header tells the caller to use.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
# What a stopped section may take beyond its limit (`timeout --kill-after=10`), and the wheel install's allowance.
KILL_AFTER_S = 10
INSTALL_S = 10


def _sections() -> list[tuple[str, int, list[str], bool]]:
    """``(name, limit in s, command argv, default)`` per ``section`` line; ``default`` is False for the ones
    under ``if [ "${GPU_CHECKS_FULL:-0}" = 1 ]``."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    full = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("if ") and "GPU_CHECKS_FULL" in stripped:
            full = True
        elif stripped == "fi":
            full = False
        elif stripped.startswith("section ") and not stripped.startswith("section()"):
            _, name, limit, *command = shlex.split(stripped, comments=True)
            out.append((name, int(limit), command, not full))
    return out


def _load(path: Path, name: str) -> ModuleType:
    """The benchmark at ``path`` as module ``name`` (once per session; its folder on the path while it loads)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        saved = list(sys.path)
        sys.path.insert(0, str(path.parent))
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = saved  # benchmarks/lpips.py must not shadow the lpips package
    return sys.modules[name]


SECTIONS = _sections()
BENCHMARKS = {
    "lpips.py": "lpips_benchmark",
    "gpu_sdxl.py": "gpu_sdxl",
    "gpu_flow.py": "gpu_flow",
    "discriminators.py": "discriminators_benchmark",
}


def test_the_script_has_the_sections_issue_24_needs() -> None:
    names = [name for name, _, _, default in SECTIONS if default]
    assert names == ["01-lpips", "02-mfu-sdxl", "03-flux", "04-mfu-sdxl-compiled"]
    assert len({name for name, *_ in SECTIONS}) == len(SECTIONS), "section names must be unique"
    assert all(re.fullmatch(r"\d\d-[a-z0-9-]+", name) for name, *_ in SECTIONS)  # GPU_CHECKS_SECTIONS="03 02"


def test_default_sections_fit_the_command_limit_the_header_gives() -> None:
    header = SCRIPT.read_text().split("\nset -u", 1)[0]
    timeout_s = int(re.search(r"timeout_s=(\d+)", header).group(1))  # type: ignore[union-attr]
    default = [limit for _, limit, _, is_default in SECTIONS if is_default]
    worst = sum(default) + KILL_AFTER_S * len(default) + INSTALL_S
    assert timeout_s <= 600, "the device tool runs one command for at most 600 s"
    # Every section killed at its limit (+ the kill grace) and the wheel install still end before the command
    # limit cuts the run (which would lose the running section's log).
    assert worst <= timeout_s, f"default sections can take {worst} s > timeout_s={timeout_s}"
    stated = re.search(r"they add up to (\d+) s", header)
    assert stated is not None and int(stated.group(1)) == sum(default), "header's total is out of date"
    full = re.search(r"([\d,]+) s with GPU_CHECKS_FULL=1", header)
    every = sum(limit for _, limit, _, _ in SECTIONS)
    assert full is not None and int(full.group(1).replace(",", "")) == every, (
        "header's full total is out of date"
    )


@pytest.mark.parametrize(
    "name,command",
    [(name, command) for name, _, command, _ in SECTIONS if any(c.endswith(".py") for c in command)],
    ids=[name for name, _, command, _ in SECTIONS if any(c.endswith(".py") for c in command)],
)
def test_every_command_line_parses_on_a_cuda_machine(
    name: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the defaults the GPU machine takes
    if command[0] == "env":  # env VAR=value ... COMMAND
        command = command[1:]
        while "=" in command[0]:
            command = command[1:]
    if command[:2] == ["python3", "-m"] and command[2] == "pytest":
        paths = [c.split("::")[0] for c in command[3:] if c.startswith("tests/")]
        assert paths and all((ROOT / p).exists() for p in paths), paths
        return
    assert command[0] == "python3", command
    script = ROOT / command[1]
    assert script.exists(), script
    module = _load(script, BENCHMARKS[script.name])
    args = module.parse_args(command[2:])
    device = getattr(args, "device", None)
    assert device is None or torch.device(device).type == "cuda", f"{name} would not run on the GPU: {device}"


def test_a_bad_option_is_caught() -> None:
    """The check above can fail: a renamed option makes the benchmark's parser exit."""
    module = _load(ROOT / "benchmarks" / "gpu_sdxl.py", "gpu_sdxl")
    with pytest.raises(SystemExit):
        module.parse_args(["--batches", "8", "--r1_aproximate_sigma", "0.1"])
