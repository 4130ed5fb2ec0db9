"""Precision, recall, density and coverage (``diffdistill.metrics.precision_recall``) against Naeem et al.'s
``prdc`` package (the reference implementation of all four), a hand-worked example for the ball boundary, the
accumulator's batches, processes and errors."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.metrics import PrecisionRecall, precision_recall
from tests import preloaded_launch

ROOT = Path(__file__).resolve().parents[2]


def _prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    prdc = pytest.importorskip("prdc")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    return {key: float(v) for key, v in out.items()}


@pytest.mark.parametrize(
    ("n_real", "n_fake", "dim", "k", "shift"),
    [(300, 300, 8, 3, 0.0), (257, 180, 16, 5, 0.5), (120, 400, 4, 1, 1.5), (64, 64, 64, 3, 0.2)],
)
def test_the_four_numbers_are_prdcs(n_real: int, n_fake: int, dim: int, k: int, shift: float) -> None:
    """Continuous random features (no distance equals a radius, so ``<=`` and prdc's ``<`` agree): the same
    counts, so the same numbers to float64 rounding of a count over a size. The generated set is shifted and
    narrowed, so all four are away from 0 and 1 (a wrong ball, a swapped set or a missing 1/k shows)."""
    g = torch.Generator().manual_seed(n_real + dim)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(n_fake, dim, generator=g, dtype=torch.float64) + shift
    got = precision_recall(real, fake, k)
    want = _prdc(real, fake, k)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (key, got, want)
    assert got != precision_recall(fake, real, k)  # not symmetric: the sets' roles matter
    # rows in chunks: the same counts
    assert precision_recall(real, fake, k, chunk_size=7) == got
    assert precision_recall(real.float(), fake.float(), k) == pytest.approx(
        got, abs=1.5 / min(n_real, n_fake)
    )


def test_hand_worked_example_on_a_line() -> None:
    """1-D, k = 1. Real 0, 1, 2, 3, 10: radii (distance to the nearest other) 1, 1, 1, 1, 7. Generated 0.5, 2,
    2.5, 20: radii 1.5, 0.5, 0.5, 17.5.

    * precision: 0.5 (in the balls of 0 and 1), 2 (of 1, 2, 3 -- at distance exactly 1 from 1 and 3: ``<=``),
      2.5 (of 2, 3); 20 (|20 - 10| = 10 > 7) in none: 3 / 4;
    * density: balls per generated sample 2, 3, 2, 0: 7 / (1 * 4);
    * coverage: real samples with a generated one in their ball: 0 (0.5), 1 (0.5), 2, 3 (2 at distance 1), not
      10 (2.5 at 7.5 and 20 at 10, both beyond 7): 4 / 5;
    * recall: real samples in a generated ball: 0 (|0 - 0.5| <= 1.5), 1, 2 (0 from 2), 3 (|3 - 2.5| = 0.5),
      10 (|10 - 20| = 10 <= 17.5): 5 / 5."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [2.0], [2.5], [20.0]], dtype=torch.float64)
    assert precision_recall(real, fake, nearest_k=1) == {
        "precision": 0.75,
        "recall": 1.0,
        "density": 1.75,
        "coverage": 0.8,
    }
    # prdc's strict "<" leaves out the boundary: 2 is then in the ball of 2 only, density 5 / 4
    assert _prdc(real, fake, 1)["density"] == pytest.approx(5 / 4)


def test_a_memorised_set_lies_exactly_on_the_boundaries_whatever_the_chunks() -> None:
    """Generated samples that are the real ones (permuted): each lies in its own ball and, at distance exactly its
    radius, in the balls of the real samples whose k-th neighbour it duplicates -- density (k + 1) / k with ``<=``
    (prdc's ``<`` gives 1). The distances are computed pair by pair, so the duplicate's distance has the radius's
    bits in any block: through the matrix-product shortcut of ``torch.cdist`` this case gave 1.3317 (audit 19)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 256, generator=g) + 5  # an offset makes the shortcut's cancellation visible
    fake = real[torch.randperm(400, generator=g)]
    for chunk in (1024, 7):
        got = precision_recall(real, fake, 3, chunk_size=chunk)
        assert got == {"precision": 1.0, "recall": 1.0, "density": 4 / 3, "coverage": 1.0}, (chunk, got)
    assert _prdc(real, fake, 3)["density"] == 1.0


def test_a_collapsed_generator_is_precise_but_neither_recalls_nor_covers() -> None:
    """Two modes of real data, generated samples from one: precision and density stay high, recall and coverage
    halve. Samples like the real ones score near 1 on all four."""
    g = torch.Generator().manual_seed(0)

    def modes(n: int, both: bool) -> torch.Tensor:
        centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
        which = torch.randint(2 if both else 1, (n,), generator=g)
        return centres[which] + torch.randn(n, 2, generator=g)

    real = modes(500, both=True)
    same, collapsed = (
        precision_recall(real, modes(500, True), 5),
        precision_recall(real, modes(500, False), 5),
    )
    assert min(same.values()) > 0.85, same
    assert collapsed["precision"] > 0.85 and collapsed["density"] > 0.85, collapsed
    assert collapsed["recall"] < 0.6 and collapsed["coverage"] < 0.6, collapsed


def test_the_accumulator_is_the_function_on_all_batches() -> None:
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    extractor.train()
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(70, 3, 4, 4, generator=g), torch.rand(50, 3, 4, 4, generator=g) * 0.7
    metric = PrecisionRecall(extractor, nearest_k=4)
    for chunk in real.split(16):
        metric.update(chunk, real=True)
    for chunk in fake.split(9):
        metric.update(chunk)
    assert (metric.count(real=True), metric.count()) == (70, 50)
    assert extractor.training  # its mode restored after each call
    with torch.no_grad():
        want = precision_recall(extractor(real), extractor(fake), 4)
    assert metric.compute() == want
    record = metric.protocol()
    assert (
        record["metric"] == "precision_recall" and record["nearest_k"] == 4 and record["inside_ball"] == "<="
    )
    assert record["feature_extractor"] == "Sequential" and len(record["feature_extractor_sha256"]) == 64
    metric.reset()
    assert metric.count() == metric.count(real=True) == 0


def test_bad_input_is_refused_with_the_fix() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ShapeError, match=r"same dimension, but got 3 and 4: extract both with the same"):
        precision_recall(x, torch.randn(10, 4))
    with pytest.raises(
        ShapeError, match=r"more than nearest_k=3 `fake` samples .* but got 3\. Pass more samples"
    ):
        precision_recall(x, torch.randn(3, 3))
    with pytest.raises(OptionError, match=r"nearest_k"):
        precision_recall(x, x, 0)
    with pytest.raises(DTypeError, match=r"nearest_k"):
        precision_recall(x, x, 2.5)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"real"):
        precision_recall(x.long(), x)
    with pytest.raises(ShapeError, match=r"\(N, D\)"):
        precision_recall(x[None], x)
    with pytest.raises(DTypeError, match=r"Expected `feature_extractor` to be callable"):
        PrecisionRecall("inception")  # type: ignore[arg-type]
    metric = PrecisionRecall(torch.nn.Flatten())
    with pytest.raises(
        OptionError, match=r"No real samples: call update\(images, real=True\) before compute"
    ):
        metric.compute()
    metric.update(torch.rand(5, 2, 2), real=True)
    with pytest.raises(OptionError, match=r"No generated samples: call update\(images\) before compute"):
        metric.compute()
    with pytest.raises(ShapeError, match=r"dimension 4 as before, but the extractor returned 9"):
        metric.update(torch.rand(5, 3, 3))
    with pytest.raises(DTypeError, match=r"real"):
        metric.update(torch.rand(5, 2, 2), real="yes")  # type: ignore[arg-type]


def _worker(rank: int, init_file: str, out: str) -> None:
    """Uneven shards; rank 1 holds no real samples."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    real, fake = _data()
    metric = PrecisionRecall(torch.nn.Flatten(), nearest_k=3)
    if rank == 0:
        metric.update(real, real=True)
        metric.update(fake[:5])
    else:
        metric.update(fake[5:])
    metric.all_reduce()
    try:
        metric.all_reduce()
        twice = "accepted"
    except OptionError as err:
        twice = str(err)
    torch.save(
        {"scores": metric.compute(), "counts": (metric.count(True), metric.count()), "twice": twice},
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(40, 2, 3, generator=g), torch.rand(23, 2, 3, generator=g) * 0.8


def test_two_processes_gather_to_the_one_process_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balls are sets of samples: gathered from 2 processes (rank 1 without real samples), every process
    computes exactly one process's numbers."""
    monkeypatch.syspath_prepend(str(ROOT))  # the forked processes import this module by name
    preloaded_launch.start_workers(_worker, (str(tmp_path / "init"), str(tmp_path)), 2)
    real, fake = _data()
    want = precision_recall(real.flatten(1), fake.flatten(1), 3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["counts"] == (40, 23)
        assert got["scores"] == want
        assert "all_reduce() was called twice" in got["twice"]
    assert np.isfinite(list(want.values())).all()
