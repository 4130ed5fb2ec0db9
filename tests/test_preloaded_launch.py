"""The preloaded launcher (``tests/preloaded_launch.py``), which the multi-process tests of the example scripts run
on, against the real launchers: the same environment, the same view of the run in accelerate, the same trained
weights bit for bit; a failing process reported with its traceback, without hanging the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import preloaded_launch
from tests.examples.test_sdxl_scripts import launch_env

pytest.importorskip("diffusers")

PROBE = Path(__file__).with_name("launch_probe.py")
SHARDED_LAUNCHER = Path(__file__).parent / "examples" / "sharded_cpu_launch.py"
PER_LAUNCH = {"MASTER_PORT", "TORCHELASTIC_ERROR_FILE"}  # a new port and error file per launch
PER_LAUNCH_SHARDED = {*PER_LAUNCH, "TORCHELASTIC_RUN_ID"}  # torchrun --standalone: a new run id too


def _real_launch(mode: str, out: Path, *extra: str) -> None:
    """``accelerate launch --multi_gpu`` (DDP) or ``torchrun sharded_cpu_launch.py`` (FSDP2), as the tests ran
    them before the preloaded launcher."""
    env = {**os.environ, **launch_env(mode)}
    if mode == "ddp":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", "0"]  # accelerate picks a free port
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [str(SHARDED_LAUNCHER)]
    result = subprocess.run(
        [*cmd, str(PROBE), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _records(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_forked_run_is_the_real_launchers_run(mode: str, tmp_path: Path) -> None:
    """Same seeds, same code, one thread per process: the weights after 2 AdamW steps are equal bit for bit; every
    launcher variable but the per-launch port and error file is the same; the global generators start as in a
    fresh process (from fresh entropy: torch's, NumPy's and Python's differ between the processes); ``sys.path[0]`` is
    the script's folder; atexit handlers run."""
    real, forked = tmp_path / "real", tmp_path / "forked"
    real.mkdir()
    forked.mkdir()
    _real_launch(mode, real, "--atexit_file", str(real))
    env = {**os.environ, **launch_env(mode)}
    argv = [str(forked), "--atexit_file", str(forked)]
    code, output = preloaded_launch.launch_script(PROBE, argv, env, sharded=mode != "ddp")
    assert code == 0, output[-4000:]
    per_launch = PER_LAUNCH if mode == "ddp" else PER_LAUNCH_SHARDED
    for a, b in zip(_records(real), _records(forked), strict=True):
        assert {k: v for k, v in a["env"].items() if k not in per_launch} == {
            k: v for k, v in b["env"].items() if k not in per_launch
        }
        assert a["distributed_type"] == b["distributed_type"] == ("MULTI_CPU" if mode == "ddp" else "FSDP")
        for key in ("num_processes", "process_index", "mixed_precision", "backend", "threads", "cwd", "name"):
            assert a[key] == b[key], key
        assert a["argv"][1:2] == [str(real)] and b["argv"][1:2] == [str(forked)]
        first = (
            PROBE.parent if mode == "ddp" else SHARDED_LAUNCHER.parent
        )  # the folder of the script Python ran
        assert a["sys_path0"] == b["sys_path0"] == str(first) and a["file"] == b["file"]
        assert a["threads"] == 1 and a["name"] == "__main__"
        assert not a["preloaded"] and b["preloaded"], (
            "the server did not preload diffusers (tests/launch_preload.py)"
        )
    for run in (real, forked):
        rng = [r["start_rng"] for r in _records(run)]
        assert all(rng[0][kind] != rng[1][kind] for kind in ("torch", "numpy", "python")), (run.name, rng)
        assert [(run / f"atexit{r}").read_text() for r in range(2)] == ["ran", "ran"], run.name
    state_real, state_forked = torch.load(real / "state.pt"), torch.load(forked / "state.pt")
    assert state_real.keys() == state_forked.keys() and state_real
    for key, value in state_real.items():
        assert torch.equal(value, state_forked[key]), key
    assert not torch.equal(state_real["0.weight"], _initial_weight()), "the probe did not train"


def _initial_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 16).weight.detach()


def test_a_failing_process_is_reported_and_the_run_ends(tmp_path: Path) -> None:
    """Rank 1 raises after training; rank 0 then waits for it at a barrier forever: the launch ends anyway (rank 0
    killed shortly after rank 1 failed), with rank 1's exit code and traceback in the output."""
    env = {**os.environ, **launch_env("ddp")}
    code, output = preloaded_launch.launch_script(
        PROBE, [str(tmp_path), "--fail_on_rank", "1"], env, timeout=120
    )
    assert code != 0
    assert "RuntimeError: probe failure on rank 1" in output and "--- rank 1 (exit 1) ---" in output
    assert not (tmp_path / "rank0.json").exists()


def test_a_failure_ends_the_run_while_another_process_hangs(tmp_path: Path) -> None:
    """Rank 0 hangs (it never reaches the barrier), rank 1 fails: the failure is noticed while rank 0 still runs, and
    the launch returns rank 1's exit code, rank 0 killed after the grace period (-9) -- not the timeout's kill."""
    env = {**os.environ, **launch_env("ddp")}
    argv = [str(tmp_path), "--hang_on_rank", "0", "--fail_on_rank", "1"]
    code, output = preloaded_launch.launch_script(PROBE, argv, env, timeout=240)
    assert code == 1, output[-3000:]
    assert "--- rank 0 (exit -9) ---" in output and "--- rank 1 (exit 1) ---" in output


def test_a_script_exit_code_is_returned(tmp_path: Path) -> None:
    script = tmp_path / "exits.py"
    script.write_text(
        "import os, sys\nprint('rank', os.environ['RANK'])\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n"
    )
    code, output = preloaded_launch.launch_script(script, [], dict(os.environ), timeout=60)
    assert code == 3
    assert "--- rank 0 (exit 0) ---\nrank 0\n" in output and "--- rank 1 (exit 3) ---\nrank 1\n" in output
