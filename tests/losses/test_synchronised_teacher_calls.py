"""``TeacherSolver(synchronize=True)`` / ``teacher_trajectory_states(..., synchronize=True)``: every process makes the
same teacher calls where their number depends on the samples (a teacher sharded over the processes gathers its weights
in each call: FSDP2 / ZeRO-3), with each process's results as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffdistill.losses import teacher_trajectory_states
from diffdistill.schedulers import NoiseSchedule, TeacherSolver
from tests import preloaded_launch

# rank 0: states solved in 1, 2 and 8 steps (and one at T-1, the noise itself); rank 1: in 4 steps only
TIMESTEPS = {0: [999, 950, 800, 30], 1: [510, 500]}
M = 8


def _teacher(calls: list[tuple[int, tuple[int, ...]]], synchronize: bool = False) -> TeacherSolver:
    def model(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((x.shape[0], tuple(t.tolist())))
        return 0.1 * x * (1.0 if scale is None else scale.view(-1, 1))

    return TeacherSolver(model, NoiseSchedule.from_betas(), synchronize=synchronize)


# SDXL-Lightning's 4->2 stage: the teacher (a 4-step model) on its stride T / 4 from t to t - 500 in 2 steps; a sample
# at t = 249 is clamped at the jump target after one step (its second step has zero length and is skipped)
STRIDE_T = {0: 249, 1: 999}


def _strided(rank: int, synchronize: bool) -> tuple[torch.Tensor, list[tuple[int, tuple[int, ...]]]]:
    calls: list[tuple[int, tuple[int, ...]]] = []
    x = torch.randn(1, 2, generator=torch.Generator().manual_seed(rank))
    t = torch.tensor([STRIDE_T[rank]])
    out = _teacher(calls, synchronize).solve(x, t, (t - 500).clamp(min=-1), num_steps=2, stride=250.0)
    return out, calls


def _states(rank: int, synchronize: bool) -> tuple[torch.Tensor, list[tuple[int, tuple[int, ...]]]]:
    t = torch.tensor(TIMESTEPS[rank])
    noise = torch.randn(len(t), 2, generator=torch.Generator().manual_seed(rank))
    cond = {"scale": torch.arange(1.0, len(t) + 1).view(-1, 1)}
    calls: list[tuple[int, tuple[int, ...]]] = []
    states = teacher_trajectory_states(
        _teacher(calls), noise, t, cond, num_segments=M, synchronize=synchronize
    )
    return states, calls


def _worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    states, calls = _states(rank, synchronize=True)
    strided, strided_calls = _strided(rank, synchronize=True)
    torch.save(
        {"states": states, "calls": calls, "strided": strided, "strided_calls": strided_calls},
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_synchronised_processes_make_the_same_number_of_teacher_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsynchronised, rank 0 calls the teacher 1 + 2 + 8 = 11 times and rank 1 4 times (FSDP2 would then mismatch
    its all-gathers: a gloo size error or an NCCL hang, seen with flow_tscd prompt-only under FSDP2 with block
    wrapping). Synchronised, both make 15 calls, group by group in the same order (rank 1 runs rank 0's 1-, 2- and
    8-step groups on its first sample, rank 0 rank 1's 4-step group), and each process's states are exactly its
    unsynchronised ones (the same calls on its own samples; no group's step count is capped here)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # the workers import this module
    preloaded_launch.start_workers(_worker, (str(tmp_path / "init"), str(tmp_path)), 2)
    alone = {rank: _states(rank, synchronize=False) for rank in TIMESTEPS}
    assert [len(alone[r][1]) for r in (0, 1)] == [11, 4]
    got = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in TIMESTEPS}
    assert len(got[0]["calls"]) == len(got[1]["calls"]) == 15
    # the same sequence of groups: a dummy solve targets its group's nearest state to T-1 (here each group's first
    # sample, the one nearest T-1), so the k-th calls of the two ranks run at the same first timestep
    assert [c[1][0] for c in got[0]["calls"]] == [c[1][0] for c in got[1]["calls"]]
    for rank in TIMESTEPS:
        torch.testing.assert_close(got[rank]["states"], alone[rank][0], rtol=0, atol=0)
    # rank 1's own samples' calls are its unsynchronised calls, in order, among the dummy ones (batch 1)
    own = [c for c in got[1]["calls"] if c[0] == 2]
    assert own == alone[1][1]


def test_synchronised_stride_steps_are_skipped_only_when_no_process_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDXL-Lightning's strided teacher (audit 21): alone, the sample at t = 249 makes 1 teacher call and the one at
    999 makes 2 (a per-block FSDP2 teacher then timed out in gloo); synchronised, both make 2 and the state at
    t = 249 is unchanged (its zero-length step keeps it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    preloaded_launch.start_workers(_worker, (str(tmp_path / "init"), str(tmp_path)), 2)
    alone = {rank: _strided(rank, synchronize=False) for rank in STRIDE_T}
    assert [len(alone[r][1]) for r in (0, 1)] == [1, 2]
    for rank in STRIDE_T:
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["strided_calls"]) == 2
        torch.testing.assert_close(got["strided"], alone[rank][0], rtol=0, atol=0)


def test_synchronize_must_be_a_bool() -> None:
    from diffdistill.errors import DTypeError

    with pytest.raises(DTypeError, match=r"Expected `synchronize` to be a bool, but got str"):
        TeacherSolver(lambda x, t: x, NoiseSchedule.from_betas(), synchronize="yes")  # type: ignore[arg-type]


def test_without_a_process_group_synchronize_is_a_no_op() -> None:
    for rank in TIMESTEPS:
        for run in (_states, _strided):
            a, calls_a = run(rank, synchronize=False)
            b, calls_b = run(rank, synchronize=True)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert calls_a == calls_b
