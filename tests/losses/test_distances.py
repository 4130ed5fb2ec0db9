"""Distances: closed forms, reductions, callables, dtype policy and errors."""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill._checks import OptionError, ShapeError
from diffdistill.losses import DISTANCES, compute_distance, pseudo_huber_distance


def test_closed_forms():
    x = torch.zeros(2, 3, 2)
    y = torch.tensor([1.0, -2.0, 2.0, 0.0, 0.0, 0.0]).repeat(2, 1).reshape(2, 3, 2)
    assert compute_distance(x, y, "mse", reduction="none").tolist() == pytest.approx([9 / 6] * 2)
    assert compute_distance(x, y, "l1").item() == pytest.approx(5 / 6)
    c = 0.5
    elem = sum(math.sqrt(v * v + c * c) - c for v in (1.0, -2.0, 2.0, 0, 0, 0)) / 6
    assert pseudo_huber_distance(x, y, c).item() == pytest.approx(elem)
    assert pseudo_huber_distance(x, y, c, per_sample_norm=True).item() == pytest.approx(
        math.sqrt(9 + c * c) - c
    )
    # default constant of the norm form: 0.00054 * sqrt(D)
    d = compute_distance(x, y, "pseudo_huber_norm", reduction="none")
    cc = 0.00054 * math.sqrt(6)
    assert d.tolist() == pytest.approx([math.sqrt(9 + cc * cc) - cc] * 2)
    # small c: pseudo-Huber ~ L1 (elementwise) and ~ L2 norm (per sample)
    assert pseudo_huber_distance(x, y, 1e-8).item() == pytest.approx(5 / 6, rel=1e-6)
    # 0-d inputs are one sample for every named distance, as for pseudo_huber_distance
    a, b = torch.tensor(1.0), torch.tensor(3.0)
    for name, want in (("mse", 4.0), ("l1", 2.0), ("pseudo_huber", math.sqrt(4 + c * c) - c)):
        cc = c if name == "pseudo_huber" else None  # the constant is refused by the distances without one
        assert compute_distance(a, b, name, c=cc, reduction="none").tolist() == pytest.approx([want])
        assert compute_distance(a, b, name, c=cc).item() == pytest.approx(want)


@pytest.mark.parametrize("name", DISTANCES)
def test_gradcheck_and_dtypes(name):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64)
    c = 0.3 if name.startswith("pseudo_huber") else None
    assert torch.autograd.gradcheck(lambda a: compute_distance(a, y, name, c=c), (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_distance(x.detach().bfloat16(), y.bfloat16(), name)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert compute_distance(x, y, name).dtype == torch.float64


def test_callable_and_errors():
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    assert compute_distance(x, y, lambda a, b: (a - b).abs().sum(1), reduction="sum").item() == 6.0
    assert compute_distance(x, y, lambda a, b: (a - b).abs().mean()).item() == 1.0
    with pytest.raises(
        ShapeError, match=r"needs per-sample values, but the `distance` callable returned a scalar"
    ):
        compute_distance(x, y, lambda a, b: (a - b).mean(), reduction="none")
    with pytest.raises(ShapeError, match=r"return shape \(2,\) or a scalar, but got \(2, 3\)"):
        compute_distance(x, y, lambda a, b: a - b)
    with pytest.raises(
        OptionError,
        match=r"Expected `distance` to be one of \['mse', 'l1', 'pseudo_huber', 'pseudo_huber_norm'\] or a callable d\(input, target\) -> \(B,\), but got 'huber'",
    ):
        compute_distance(x, y, "huber")
    with pytest.raises(
        ShapeError,
        match=r"`input` and `target` to have the same shape, but got input \(2, 3\) and target \(3,\)",
    ):
        compute_distance(x, y[0], "mse")
    with pytest.raises(OptionError, match=r"Expected `reduction` to be one of \['mean', 'sum', 'none'\]"):
        compute_distance(x, y, "mse", reduction="avg")
    with pytest.raises(
        OptionError, match=r"Expected `c` \(the pseudo-Huber constant\) to be finite and >= 0, but got -1"
    ):
        pseudo_huber_distance(x, y, -1)


@pytest.mark.parametrize("name", DISTANCES)
def test_compiles_fullgraph(name):
    c = 0.1 if name.startswith("pseudo_huber") else None
    fn = torch.compile(lambda a, b: compute_distance(a, b, name, c=c), fullgraph=True, backend="eager")
    a, b = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    torch.testing.assert_close(fn(a, b), compute_distance(a, b, name, c=c))
