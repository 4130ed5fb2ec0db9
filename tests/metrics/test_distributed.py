"""all_reduce on 2 processes (gloo, uneven shards, a rank without reference images) == one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffdistill.metrics import FID, FeatureStatistics
from tests import preloaded_launch
from tests.metrics import dist_worker

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_reduce_to_the_one_process_statistics(tmp_path: Path) -> None:
    """The reduced mean / covariance differ from one pass only by float64 rounding of sums of 120 terms of
    size ~1e4 (mean) and of centred products of size ~10 (covariance): 1e-9 absolute is ~1e3 ulps of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun runs it (tests/preloaded_launch.py)
    code, output = preloaded_launch.launch_script(dist_worker.__file__, [str(tmp_path)], env, cwd=ROOT)
    assert code == 0, output[-6000:]
    feats, fake, real, prompts = dist_worker.data()
    one = FeatureStatistics(5).update(feats)
    fid = FID(dist_worker.extractor())
    fid.update(fake)
    fid.update(real, real=True)
    clip = dist_worker.clip_metric()
    clip.update(fake, prompts)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == 120 and got["clip_count"] == 20
        torch.testing.assert_close(got["mean"], one.mean, rtol=0, atol=1e-9)
        torch.testing.assert_close(got["cov"], one.covariance, rtol=0, atol=1e-9)
        # FID from float32 features: the extractor runs on 13 + 7 images instead of 20 (same per-image
        # results), so only the float64 accumulation order differs
        assert got["fid"] == pytest.approx(fid.compute(), rel=1e-9, abs=1e-12)
        assert got["clip"] == pytest.approx(clip.compute(), rel=1e-12)
