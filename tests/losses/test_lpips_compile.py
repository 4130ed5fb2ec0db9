"""E-LatentLPIPS under ``torch.compile(fullgraph=True)`` and without host synchronisation (issue 24).

Both properties are what CUDA-graph capture (``mode="reduce-overhead"``) needs, and both are checked on
the CPU:

* ``fullgraph=True`` makes dynamo raise on any graph break (a ``.item()``, a data-dependent shape, Python
  branching on a tensor value, an untraceable call), and the ``aot_eager`` backend additionally traces
  the joint forward+backward graph with AOT autograd (the custom backward included) -- the same tracing
  inductor starts from, without paying for code generation. It runs the traced aten graph eagerly, so
  its values must equal eager mode's.
* The profiler lists every aten op of one forward+backward; their number (the top-level ones, as
  ``benchmarks/lpips.py`` counts them) is pinned, so a change that adds kernels is noticed; a device -> host
  read shows up as
  ``aten::item`` / ``aten::_local_scalar_dense`` (``bool(t)``, ``float(t)``, ``t.tolist()``) or as a
  data-dependent-shape op (``aten::nonzero``, ``aten::masked_select``, ``aten::unique``): there must be none.
  The library's value checks (finiteness) do synchronise by design and are skipped under compile;
  eager mode is checked with them switched off.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffdistill.errors import value_checks
from diffdistill.losses import ELatentLPIPS, LatentLPIPS

_SYNC_OPS = (
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
)


def _inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 4, size, size, generator=g)


def _loss(augment: str | None, num_draws: int = 2) -> LatentLPIPS:
    torch.manual_seed(1)
    m = ELatentLPIPS("sdxl", weights=None, augment=augment, num_draws=num_draws, reduction="none")
    for lin in m.heads:  # non-uniform heads, so every layer's gradient path is exercised differently
        lin.model[1].weight.uniform_(0.1, 1.0)  # type: ignore[index, union-attr]
    return m


def _value_and_grad(fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the draws come from the default generator (dynamo does not trace Generators)
    value = fn(x, y)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


@pytest.mark.compile
def test_forward_and_backward_compile_fullgraph_and_match_eager() -> None:
    # Every op group, K = 2 draws batched; the LatentLPIPS path (augment=None) is the same distance code.
    m = _loss("bgco")
    x, y = _inputs()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = _value_and_grad(compiled, x, y)
    want = _value_and_grad(m, x, y)
    # Same aten ops on the same values in the same order: equal up to the reassociation AOT autograd may
    # apply when it regroups the backward (float32: a few ulps of the largest gradient entry).
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(
            g, w, atol=16 * torch.finfo(torch.float32).eps * float(w.abs().max()), rtol=0
        )
    assert not torch.equal(got[1], torch.zeros_like(got[1]))


def _sync_ops(fn) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name in _SYNC_OPS:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


@pytest.mark.parametrize("augment", [None, "bgco"])
def test_no_host_sync_in_forward_and_backward(augment: str | None) -> None:
    m = _loss(augment)
    x, y = _inputs()

    def step() -> None:
        xg = x.clone().requires_grad_(True)
        m(xg, y).sum().backward()

    with value_checks(False):
        step()  # warm-up (lazy initialisation)
        assert _sync_ops(step) == {}
    # The detector does see a read-back: the value checks' finiteness test is one.
    assert _sync_ops(step).get("aten::item", 0) + _sync_ops(step).get("aten::is_nonzero", 0) > 0


def _top_level_aten_ops(fn) -> int:  # type: ignore[no-untyped-def]
    """Aten ops of one call of ``fn`` not called by another aten op (the count of ``benchmarks/lpips.py``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


# Issue 24: 682 (augment "bg") and 352 (no augmentation) before its kernel cuts; the goal was at most half.
# Measured with torch 2.14 on the CPU; batch- and size-independent. A bound, so a torch release that records an
# op fewer passes, and a code change that adds one fails here.
_OP_BOUNDS = {"bg": 299, None: 219}


@pytest.mark.parametrize("augment", ["bg", None])
def test_aten_op_count_of_forward_and_backward_is_pinned(augment: str | None) -> None:
    m = ELatentLPIPS("sdxl", weights=None, augment=augment)  # the defaults: one draw, mean reduction
    x, y = _inputs()

    def step(xg: torch.Tensor) -> None:
        m(xg, y).backward()

    with value_checks(False):
        step(x.clone().requires_grad_(True))  # warm-up (lazy initialisation, caches)
        xg = x.clone().requires_grad_(True)  # made outside the profiled call
        count = _top_level_aten_ops(lambda: step(xg))
    assert 0.5 * _OP_BOUNDS[augment] < count <= _OP_BOUNDS[augment], count
