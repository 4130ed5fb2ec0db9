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


def test_number_and_argument_check_messages() -> None:
    import numpy as np

    for bad in ("1", None, True, [1.0]):
        with pytest.raises(_checks.DTypeError, match=r"Expected `lr` to be a real number, but got"):
            _checks.check_positive(bad, "lr")
        with pytest.raises(_checks.DTypeError, match=r"Expected `p` to be a real number, but got"):
            _checks.check_probability(bad, "p")
    _checks.check_positive(float("inf"), "lr")  # callers needing a finite number use check_real
    assert _checks.check_real(np.float32(0.5), "w", low=0, high=1) == 0.5
    assert _checks.check_real(torch.tensor(2.0), "t", allow_tensor=True) == 2.0
    with pytest.raises(_checks.DTypeError, match=r"Expected `w` to be a real number, but got str '1'"):
        _checks.check_real("1", "w")
    with pytest.raises(_checks.DTypeError, match=r"Expected `w` to be a real number, but got bool True"):
        _checks.check_real(True, "w")
    with pytest.raises(_checks.DTypeError, match=r"`w` to be a real number, but got a tensor of shape \(\)"):
        _checks.check_real(torch.tensor(1.0), "w")
    with pytest.raises(
        _checks.DTypeError, match=r"`w` to be a real number, but got a tensor of shape \(1,\)"
    ):
        _checks.check_real(torch.ones(1), "w", allow_tensor=True)
    with pytest.raises(_checks.OptionError, match=r"Expected `w` to be a finite number, but got nan"):
        _checks.check_real(float("nan"), "w")
    with pytest.raises(_checks.OptionError, match=r"Expected `w` to be > 0, but got 0"):
        _checks.check_real(0, "w", low=0, strict=True)
    with pytest.raises(_checks.OptionError, match=r"Expected `w` to be < 1, but got 1"):
        _checks.check_real(1, "w", high=1, high_strict=True)

    assert _checks.check_int(np.int64(3), "n", minimum=1) == 3
    assert _checks.check_int(1000.0, "n", integral_float=True) == 1000
    with pytest.raises(_checks.DTypeError, match=r"Expected `n` to be an int >= 1, but got float 2.0"):
        _checks.check_int(2.0, "n", minimum=1)
    with pytest.raises(_checks.DTypeError, match=r"Expected `n` to be an int, but got bool True"):
        _checks.check_int(True, "n")
    with pytest.raises(
        _checks.OptionError, match=r"Expected `n` to be an int in \[1, 4\], but got 5\. Fix it\."
    ):
        _checks.check_int(5, "n", minimum=1, maximum=4, hint=" Fix it.")
    assert _checks.check_optional_int(None, "k", minimum=1) is None
    with pytest.raises(_checks.DTypeError, match=r"Expected `k` to be an int >= 1 or None, but got str 'a'"):
        _checks.check_optional_int("a", "k", minimum=1)

    with pytest.raises(_checks.DTypeError, match=r"Expected `flag` to be True or False, but got str 'False'"):
        _checks.check_bool("False", "flag")
    with pytest.raises(
        _checks.DTypeError, match=r"Expected `flag` to be True or False or None, but got int 1"
    ):
        _checks.check_bool(1, "flag", allow_none=True)
    assert _checks.check_bool(None, "flag", allow_none=True) is None
    with pytest.raises(
        _checks.DTypeError, match=r"Expected `generator` to be a torch.Generator or None, but got int"
    ):
        _checks.check_generator(0)
    with pytest.raises(
        _checks.DTypeError, match=r"Expected `cond` to be a mapping of .* \(or None\), but got list"
    ):
        _checks.check_mapping([], "cond")
    assert _checks.check_mapping(None, "cond") == {}
    with pytest.raises(_checks.DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got str"):
        _checks.check_module("unet", "model")


def test_check_all_finite_names_the_first_offender() -> None:
    good, bad = torch.ones(2), torch.tensor([1.0, float("inf")])
    _checks.check_all_finite([("a", good), ("i", torch.arange(3)), ("m", torch.empty(2, device="meta"))])
    with pytest.raises(_checks.NonFiniteError, match=r"Expected `b` to be finite, but it holds 1 NaN/Inf"):
        _checks.check_all_finite([("a", good), ("b", bad), ("c", bad)])
    with _checks.value_checks(False):
        _checks.check_all_finite([("b", bad)])  # switched off: no error, no sync


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

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in files.stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    assert (
        "Apache License" in (src / "LICENSE").read_text() and "Version 2.0" in (src / "LICENSE").read_text()
    )
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
