"""Package-level contracts: light import, typed errors, layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffdistill
from diffdistill import _checks

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light() -> None:
    code = (
        "import sys, diffdistill; "
        "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'kornia', 'lpips', "
        "'torchvision', 'einops', 'safetensors') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import diffdistill pulled in heavy modules: {out.stdout.strip()}"


def test_version_is_single_sourced() -> None:
    assert diffdistill.__version__
    assert 'version = { attr = "diffdistill.__version__" }' in (ROOT / "pyproject.toml").read_text()


def test_root_has_only_package_python_files() -> None:
    allowed = {"__init__.py", "errors.py"}  # errors: the public exception types and value-check switch
    bad = [p.name for p in ROOT.glob("*.py") if p.name not in allowed and not p.name.startswith("_")]
    assert bad == [], f"root .py files are packaged; move these: {bad}"
    assert (ROOT / "py.typed").exists()


def test_error_types_subclass_builtins() -> None:
    assert issubclass(_checks.ShapeError, ValueError)
    assert issubclass(_checks.OptionError, ValueError)
    assert issubclass(_checks.DTypeError, TypeError)


def test_check_messages() -> None:
    with pytest.raises(_checks.DTypeError, match=r"Expected `x` to be a torch.Tensor, but got list"):
        _checks.check_tensor([1.0], "x")
    with pytest.raises(
        _checks.ShapeError, match=r"Expected `a` and `b` to have the same shape, but got a \(2, 3\)"
    ):
        _checks.check_same_shape(torch.zeros(2, 3), torch.zeros(3), "a", "b")
    with pytest.raises(_checks.ShapeError, match=r"but got a \(3,\) and b \(\)"):
        _checks.check_same_shape(torch.zeros(3), torch.zeros(()), "a", "b")
    with pytest.raises(_checks.ShapeError, match=r"to have 4 dimensions laid out as \(B, C, H, W\)"):
        _checks.check_ndim(torch.zeros(2, 3), "x", 4, "(B, C, H, W)")
    with pytest.raises(_checks.OptionError, match=r"Expected `mode` to be one of \['a', 'b'\], but got 'c'"):
        _checks.check_option("c", "mode", ["a", "b"])
    with pytest.raises(_checks.OptionError, match=r"Expected `lr` to be > 0, but got 0"):
        _checks.check_positive(0, "lr")
    with pytest.raises(_checks.OptionError, match=r"Expected `p` to lie in \[0, 1\], but got 1.5"):
        _checks.check_probability(1.5, "p")
    with pytest.raises(_checks.DTypeError, match=r"floating-point tensor, but got dtype torch.int64"):
        _checks.check_dtype_floating(torch.zeros(2, dtype=torch.long), "x")


def test_finite_check_and_switch() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(ValueError, match=r"holds 2 NaN/Inf value\(s\) out of 3"):
        _checks.check_finite(x, "x")
    _checks.set_value_checks(False)
    try:
        _checks.check_finite(x, "x")  # switched off: no error
    finally:
        _checks.set_value_checks(True)


def test_wheel_and_sdist_ship_the_license_and_not_the_test_toy(tmp_path: Path) -> None:
    """The Apache-2.0 text travels in both distributions; test/benchmark helpers stay out of the wheel."""
    import shutil
    import tarfile
    import zipfile

    pytest.importorskip("setuptools", minversion="77")
    from setuptools import build_meta

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in files.stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    assert "Apache License" in (src / "LICENSE").read_text() and "Version 2.0" in (src / "LICENSE").read_text()
    cwd = os.getcwd()
    os.chdir(src)
    try:
        wheel_name = build_meta.build_wheel(str(tmp_path))
        sdist_name = build_meta.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
        names = wheel.namelist()
    with tarfile.open(tmp_path / sdist_name) as sdist:
        sdist_names = sdist.getnames()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "diffdistill/errors.py" in names and "diffdistill/py.typed" in names
    assert not [n for n in names if "toy" in n or n.startswith("diffdistill/tests")], names
    assert any(n.endswith("/LICENSE") for n in sdist_names)
