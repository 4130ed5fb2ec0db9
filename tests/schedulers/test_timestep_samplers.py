"""Timestep samplers: documented bounds (hypothesis), reproducibility, distributions, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdistill.errors import DTypeError, OptionError
from diffdistill.schedulers import (
    LIGHTNING_EXTRA_STUDENT_TIMESTEPS,
    TimestepSample,
    categorical_timesteps,
    lcm_skip_pairs,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
    uniform_timesteps,
)

FAST = settings(max_examples=30, deadline=None)


@FAST
@given(n=st.sampled_from([1, 2, 4, 8, 10, 20, 25, 50, 100]), seed=st.integers(0, 10_000))
def test_lcm_skip_pairs_bounds(n, seed):
    s = lcm_skip_pairs(64, num_ddim_timesteps=n, generator=torch.Generator().manual_seed(seed))
    k = 1000 // n
    assert bool(((s.t + 1) % k == 0).all()) and bool(((s.t >= k - 1) & (s.t <= 999)).all())
    assert torch.equal(s.t_prev, (s.t - k).clamp(min=0))
    assert bool((s.t_end == -1).all())


def test_lcm_skip_pairs_need_a_skip_of_two():
    # Skip 1 (N > T / 2) would put t = t_prev = 0 at the grid's first point.
    assert int(lcm_skip_pairs(2000, 500, generator=torch.Generator().manual_seed(0)).t.min()) == 1
    with pytest.raises(OptionError, match=r"`num_ddim_timesteps` <= num_train_timesteps // 2 \(500\)"):
        lcm_skip_pairs(4, 501)


def test_lcm_skip_pairs_match_diffusers_recipe():
    # diffusers train_lcm_distill_*: index ~ randint(0, N); start = ddim_timesteps[index]; target = max(start - k, 0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s = lcm_skip_pairs(32, 50, generator=g1)
    index = torch.randint(0, 50, (32,), generator=g2)
    ddim_timesteps = torch.arange(1, 51) * 20 - 1
    assert torch.equal(s.t, ddim_timesteps[index])


@FAST
@given(
    k=st.sampled_from([1, 2, 4, 8]),
    n=st.sampled_from([8, 10, 20, 40, 50]),
    seed=st.integers(0, 10_000),
)
def test_tscd_bounds(k, n, seed):
    s = tscd_segments(
        128, num_segments=k, num_inference_steps=n, generator=torch.Generator().manual_seed(seed)
    )
    step = 1000 // n
    u_n, u_prev, u_end = s.t + 1, s.t_prev + 1, s.t_end + 1
    assert bool((u_n % step == 0).all()) and bool(((u_n >= step) & (u_n <= 1000)).all())
    assert torch.equal(u_prev, u_n - step)
    u_b = (u_prev * k // 1000) * 1000 // k  # segment containing the teacher step
    assert bool(((u_b <= u_end) & (u_end <= u_prev)).all())
    # The boundary equals the paper's floor(t_n / (T/k)) * (T/k) whenever the paper's interval is non-empty.
    paper_b = (u_n * k // 1000) * 1000 // k
    valid = paper_b <= u_prev
    assert torch.equal(u_b[valid], paper_b[valid])
    if n % k == 0:  # grid-aligned edges: the paper's interval is empty only when t_n is itself an edge
        assert torch.equal(~valid, (u_n * k) % 1000 == 0)


def test_tscd_covers_its_interval():
    g = torch.Generator().manual_seed(0)
    s = tscd_segments(300_000, num_segments=8, num_inference_steps=50, generator=g)
    sel = s.t == 999  # u_prev = 980, segment [875, 1000): u_end uniform on 875..980
    counts = torch.bincount(s.t_end[sel] + 1, minlength=1001)
    assert int(counts.nonzero().min()) == 875 and int(counts.nonzero().max()) == 980
    inside = counts[875:981].double()
    assert bool((inside > 0).all()) and float(inside.std() / inside.mean()) < 0.2  # ~56 per value: uniform


@FAST
@given(
    m=st.sampled_from([1, 2, 4, 8]),
    skip=st.sampled_from([1, 20, 50]),
    on_grid=st.booleans(),
    seed=st.integers(0, 9999),
)
def test_milestone_bounds(m, skip, on_grid, seed):
    s = milestone_pairs(
        128, num_segments=m, skip=skip, on_grid=on_grid, generator=torch.Generator().manual_seed(seed)
    )
    u_m, u_n, u_e = s.t + 1, s.t_prev + 1, s.t_end + 1
    width = 1000 // m
    assert bool((u_e % width == 0).all())
    assert torch.equal(u_n, torch.maximum(u_m - skip, u_e))  # the teacher step, clamped at the milestone
    assert bool(((u_e < u_m) & (u_m <= u_e + width)).all())
    if on_grid:  # the grid of step skip from the upper milestone down
        assert bool(((u_e + width - u_m) % skip == 0).all())


@pytest.mark.parametrize("on_grid", [True, False])
@pytest.mark.parametrize(("m", "skip"), [(8, 20), (4, 25), (4, 20), (8, 7)])
def test_milestone_targets_are_trained(m, skip, on_grid):
    # Issue 20: every timestep the target side runs at is one the student trains at (or the milestone, where
    # the target move is the identity); the former draw left skip - 1 timesteps above each milestone untrained.
    s = milestone_pairs(
        50000, num_segments=m, skip=skip, on_grid=on_grid, generator=torch.Generator().manual_seed(0)
    )
    trained, targets, ends = set(s.t.tolist()), set(s.t_prev.tolist()), set(s.t_end.tolist())
    assert targets <= trained | ends
    assert s.t_end.min() == -1 and (s.t - s.t_prev).max() == skip


def test_milestone_inter_segment_stage():
    s = milestone_pairs(
        256, num_segments=8, skip=125, on_grid=True, generator=torch.Generator().manual_seed(1)
    )
    assert set((s.t + 1).tolist()) == {125 * j for j in range(1, 9)}
    assert torch.equal(s.t_prev, s.t_end)


@FAST
@given(n=st.sampled_from([1, 2, 3, 4, 8, 32, 128]), seed=st.integers(0, 9999))
def test_progressive_pairs_grid(n, seed):
    s = progressive_pairs(64, n, generator=torch.Generator().manual_seed(seed))
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(n)
    grid = sorted(sched.timesteps.tolist())  # the student's inference grid
    assert set(s.t.tolist()) <= set(grid)
    prev = {g: (grid[i - 1] if i else -1) for i, g in enumerate(grid)}
    assert s.t_prev.tolist() == [prev[t] for t in s.t.tolist()] and torch.equal(s.t_end, s.t_prev)


def test_progressive_pairs_lightning_extra():
    s = progressive_pairs(
        400, 2, extra_timesteps=LIGHTNING_EXTRA_STUDENT_TIMESTEPS, generator=torch.Generator().manual_seed(0)
    )
    assert set(s.t.tolist()) == {249, 499, 749, 999}
    assert torch.equal(s.t_prev, (s.t + 1 - 500).clamp(min=0) - 1)


def test_categorical_distribution_and_uniform():
    g = torch.Generator().manual_seed(0)
    t = categorical_timesteps(40_000, weights=(5, 1, 1, 1), generator=g).t
    freq = torch.stack([(t == v).float().mean() for v in (10, 250, 500, 750)])
    torch.testing.assert_close(freq, torch.tensor([5 / 8, 1 / 8, 1 / 8, 1 / 8]), atol=0.01, rtol=0)
    u = uniform_timesteps(40_000, 20, 980, generator=g).t
    assert u.min().item() == 20 and u.max().item() == 980


def test_reproducible_with_generator():
    for fn in (
        lambda g: lcm_skip_pairs(8, generator=g),
        lambda g: tscd_segments(8, 4, generator=g),
        lambda g: milestone_pairs(8, generator=g),
        lambda g: progressive_pairs(8, 4, generator=g),
    ):
        a, b = fn(torch.Generator().manual_seed(7)), fn(torch.Generator().manual_seed(7))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert lcm_skip_pairs(4, device="cpu").t.device.type == "cpu"


def test_errors():
    with pytest.raises(
        OptionError, match=r"Expected `num_inference_steps` to divide `num_train_timesteps` \(1000\).*got 30"
    ):
        tscd_segments(4, 2, num_inference_steps=30)
    with pytest.raises(
        OptionError, match=r"Expected `num_segments` <= `num_inference_steps` \(4\), but got 8"
    ):
        tscd_segments(4, 8, num_inference_steps=4)
    with pytest.raises(OptionError, match=r"Expected `skip` \(200\) to be at most the segment width \(125"):
        milestone_pairs(4, 8, skip=200)
    with pytest.raises(OptionError, match=r"Expected `weights` to have one entry per value \(4\), but got 2"):
        categorical_timesteps(4, weights=(1, 2))
    with pytest.raises(OptionError, match=r"Expected `weights` to be >= 0 with a positive sum"):
        categorical_timesteps(4, weights=(0, 0, 0, 0))
    with pytest.raises(OptionError, match=r"Expected `batch_size` to be an int >= 1, but got 0"):
        lcm_skip_pairs(0)
    with pytest.raises(OptionError, match=r"Expected integers -1 <= `low` <= `high`, but got low=5, high=2"):
        uniform_timesteps(3, 5, 2)
    with pytest.raises(
        OptionError, match=r"`extra_timesteps` to be a non-empty list of ints in \[0, 999\], but got \[1000\]"
    ):
        progressive_pairs(3, 1, extra_timesteps=[1000])
    with pytest.raises(
        OptionError, match=r"`extra_timesteps` to be a non-empty list of ints .* \[249.7, 999.2\]"
    ):
        progressive_pairs(3, 1, extra_timesteps=[249.7, 999.2])  # not truncated to 249, 999
    assert set(progressive_pairs(8, 1, extra_timesteps=[249.0, 999.0]).t.tolist()) <= {249, 999}


def test_single_timestep_samplers_return_a_timestep_sample():
    # Issue 18: a bare tensor's `.t` is its transpose method, so `uniform_timesteps(...).t` used to return a
    # bound method silently; every sampler now returns a TimestepSample whose clean-end fields are -1.
    g = torch.Generator().manual_seed(0)
    for s in (uniform_timesteps(5, 20, 980, generator=g), categorical_timesteps(5, generator=g)):
        assert isinstance(s, TimestepSample)
        assert s.t.shape == s.t_prev.shape == s.t_end.shape == (5,)
        assert s.t.dtype == s.t_prev.dtype == torch.int64
        assert bool((s.t_prev == -1).all()) and bool((s.t_end == -1).all())
        assert bool((s.t >= 10).all())


def test_numpy_arrays_are_accepted_as_sequences():
    """``categorical_timesteps`` / ``progressive_pairs`` take numpy arrays as ``custom_timesteps`` does (they were
    refused: "got ndarray"); a numpy scalar is still not a sequence."""
    np = pytest.importorskip("numpy")

    def draw(values, weights):
        return categorical_timesteps(64, values, weights, generator=torch.Generator().manual_seed(0)).t

    assert torch.equal(
        draw(np.array([10, 500, 999]), np.array([1.0, 2.0, 1.0])), draw([10, 500, 999], [1.0, 2.0, 1.0])
    )
    pairs = [
        progressive_pairs(8, 4, extra_timesteps=extra, generator=torch.Generator().manual_seed(1))
        for extra in (np.array([999, 900]), [999, 900])
    ]
    assert all(torch.equal(a, b) for a, b in zip(pairs[0], pairs[1], strict=True))
    with pytest.raises(DTypeError, match=r"Expected `values` to be a sequence of numbers or a 1-D tensor"):
        categorical_timesteps(4, np.int64(500))
