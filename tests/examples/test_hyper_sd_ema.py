"""The released average (``--use_ema``) of ``examples/sdxl_hyper_sd.py`` restarts when the one-step stage starts.

Our choice (Hyper-SD, Ren et al. 2024, keeps only the consistency target's EMA, Alg. 1 line 16): the one-step
output averages the one-step stage's own steps, not the multi-step TSCD weights before it
(``ReleaseEMA.restart``: the current weights copied into the average, the warm-up count back to 0), while
``tscd/`` keeps the average of the TSCD steps. Checked on the EMA alone (against the update rule
``e <- d e + (1 - d) p`` written out) and in a 2-step tiny run (one TSCD step, one one-step step) whose
average updates are recorded.
"""

# ruff: noqa: F811
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# The fixture is imported (not copied): its name is then a test parameter, which ruff reads as a redefinition.
from tests.examples.test_sdxl_scripts import _common_argv, _load, _lora_state, tiny_sdxl  # noqa: F401

ema_release = _load("training.ema_release")

EPS = torch.finfo(torch.float32).eps


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the rounding of one float32 lerp: a few ulps of the larger magnitude."""
    scale = float(max(actual.abs().max(), expected.abs().max(), 1e-30))
    torch.testing.assert_close(actual, expected, rtol=0, atol=4 * EPS * scale)


@pytest.mark.parametrize("warmup", ["linear", "none"])
def test_restart_copies_the_weights_and_restarts_the_count(warmup: str) -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    student[1].requires_grad_(False)  # frozen: not averaged
    ema = ema_release.ReleaseEMA(student, decay=0.5, warmup=warmup)
    for _ in range(3):
        with torch.no_grad():
            student[0].weight.add_(torch.randn(4, 3))
        ema.update()
    assert int(ema.ema.num_updates) == 3
    averaged = ema.ema.module.params["0/weight"]
    assert averaged.shape == (4, 3) and not torch.equal(averaged, student[0].weight)  # it lags the weights
    ema.restart()
    assert int(ema.ema.num_updates) == 0
    assert sorted(ema.ema.module.params) == ["0/bias", "0/weight"]
    for name, p in ema.params.params.items():
        assert ema.ema.module.params[name].dtype == torch.float32 and torch.equal(
            ema.ema.module.params[name], p
        )
    # The next update is update 1 again: a copy under the linear warm-up, decay 0.5 without one.
    restarted = student[0].weight.detach().clone()
    with torch.no_grad():
        student[0].weight.add_(torch.randn(4, 3))
    assert ema.ema.update(ema.params) == (0.0 if warmup == "linear" else 0.5)
    expected = student[0].weight if warmup == "linear" else 0.5 * restarted + 0.5 * student[0].weight
    _close(ema.ema.module.params["0/weight"], expected.detach())
    # The restarted count is what a checkpoint holds: a resume continues it.
    assert int(ema.ema.state_dict()["num_updates"]) == 1


def test_hyper_sd_one_step_stage_restarts_the_released_average(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1 (TSCD) updates the average from its start weights; at the first one-step update the average is the
    weights the TSCD step ended with and the count is 0 (before the restart: 0.5 start + 0.5 TSCD weights,
    count 1); the output is that step's update of it, and ``tscd/`` is the TSCD average."""
    updates: list[dict[str, Any]] = []
    update = ema_release.ReleaseEMA.update

    def recorded(self: Any) -> None:
        before = [e.detach().clone() for e in self.ema.module.parameters()]
        count = int(self.ema.num_updates)
        update(self)
        updates.append(
            {
                "count": count,
                "before": before,
                "live": [p.detach().float().clone() for p in self.params.parameters()],
                "after": [e.detach().clone() for e in self.ema.module.parameters()],
                "names": list(self.params.params.keys()),
            }
        )

    monkeypatch.setattr(ema_release.ReleaseEMA, "update", recorded)
    out = tmp_path / "run"
    argv = _common_argv(tiny_sdxl, out, lora=True)
    argv = [*argv[: argv.index("--validation_prompts")], *argv[argv.index("--use_lora") :]]  # no grids
    argv[argv.index("--checkpointing_steps") + 1] = "0"
    argv += ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "1", "--num_inference_steps", "4"]
    argv += ["--one_step_steps", "1", "--one_step_teacher_steps", "2", "--generator_timestep", "800"]
    argv += ["--use_ema", "--ema_warmup", "none", "--ema_decay", "0.5"]
    script = _load("sdxl_hyper_sd")
    script.main(script.parse_args(argv))
    assert [u["count"] for u in updates] == [0, 0]  # before each update; old code: [0, 1]
    tscd, one_step = updates
    assert any(not torch.equal(b, a) for b, a in zip(tscd["before"], tscd["live"])), "step 1 trained nothing"
    for before, live, after in zip(tscd["before"], tscd["live"], tscd["after"]):
        _close(after, 0.5 * before + 0.5 * live)
    for before, w1 in zip(one_step["before"], tscd["live"]):
        assert torch.equal(before, w1)  # the restart: the weights at the stage's start
    for after, w1, w2 in zip(one_step["after"], tscd["live"], one_step["live"]):
        _close(after, 0.5 * w1 + 0.5 * w2)
    # The files: tscd/ = the TSCD average (written before the restart), the output = the one-step average.
    for folder, average in ((out / "tscd", tscd["after"]), (out, one_step["after"])):
        saved = _lora_state(folder / "pytorch_lora_weights.safetensors")
        names = ["unet." + n.replace("/", ".").replace(".default.", ".") for n in tscd["names"]]
        assert sorted(names) == sorted(saved)
        for name, value in zip(names, average):
            assert torch.equal(saved[name].float(), value), name
