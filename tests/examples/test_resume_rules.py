"""What a run may do with an ``--output_dir`` and a checkpoint (audit 3, items 4, 8, 9, 15): no fresh start over
another run's checkpoints, the options recorded and compared on resume, the optimisers' hyper-parameters from the
options, the last step checkpointed, and fp16 + accumulation refused for the optimisers of the whole run."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.example_modules import load_example

pytest.importorskip("accelerate")

options = load_example("training.options")
checkpoints = load_example("training.checkpoints")
loop = load_example("training.loop")
runtime = load_example("training.runtime")


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = options.add_common_args(argparse.ArgumentParser())
    parser.add_argument("--loss", default="sim")  # stands for a script's own option
    argv = ["--pretrained_model_name_or_path", "unused", "--output_dir", str(tmp_path), *extra]
    return options.check_common_args(parser.parse_args(argv))


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    """Refused by ``make_accelerator``, the first call of every script's ``main`` (before any model loads);
    ``parse_args`` alone still reads such a folder's options."""
    runtime.make_accelerator(_args(tmp_path, "--report_to", "none"), "test")  # an empty (or new) folder
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "step.json").write_text("{}")
    args = _args(tmp_path, "--report_to", "none")
    with pytest.raises(
        ValueError, match=r"already holds checkpoints \(checkpoint-3\).*--resume_from_checkpoint latest"
    ):
        runtime.make_accelerator(args, "test")
    runtime.make_accelerator(
        _args(tmp_path, "--report_to", "none", "--resume_from_checkpoint", "latest"), "t"
    )


def _accelerator(lr: float = 1e-3, **optim: Any) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, **optim)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def test_resume_keeps_the_options_hyper_parameters_and_says_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``load_state`` restores each optimiser's param groups: the resumed run's lr / betas / weight decay are
    put back (its moments are the checkpoint's), and each option that differs from the recorded ones is logged."""
    args_a = _args(tmp_path, "--learning_rate", "1e-3", "--adam_weight_decay", "0.1")
    acc, model, opt = _accelerator(1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    model(torch.ones(4, 3)).square().sum().backward()
    opt.step()
    saved = checkpoints.save_checkpoint(acc, args_a, 1)
    recorded = json.loads((saved / "step.json").read_text())
    assert recorded["global_step"] == 1 and recorded["options"]["learning_rate"] == 1e-3
    moment = opt.state_dict()["state"][0]["exp_avg"].clone()

    args_b = _args(
        tmp_path,
        *("--resume_from_checkpoint", "latest", "--learning_rate", "1e-5", "--adam_beta1", "0.5"),
        *("--loss", "sid", "--max_train_steps", "5000"),
    )
    acc, model, opt = _accelerator(1e-5, betas=(0.5, 0.999), weight_decay=0.0)
    with caplog.at_level("WARNING", logger="training"):
        assert checkpoints.resume(acc, args_b) == 1
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-5, (0.5, 0.999), 0.0)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moment)  # the moments: the checkpoint's
    text = caplog.text
    assert "lr 0.001 in the checkpoint, 1e-05 from this run's options (used)" in text
    assert "weight_decay 0.1 in the checkpoint, 0.0 from this run's options" in text
    for name in ("--learning_rate 1e-05", "--adam_beta1 0.5", "--adam_weight_decay 0.0", "--loss sid"):
        assert f"with {name}, but it was saved by a run with" in text
    assert "--max_train_steps" not in text and "--resume_from_checkpoint" not in text  # free to change


def test_the_last_step_is_checkpointed_unless_checkpointing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[int] = []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda acc, args, step: saved.append(step))
    accelerator = types.SimpleNamespace(
        is_local_main_process=False, process_index=0, log=lambda *a, **k: None
    )
    for every, expected in ((2, [2, 4, 5]), (5, [5]), (10, [5]), (0, [])):
        saved.clear()
        args = argparse.Namespace(
            max_train_steps=5,
            checkpointing_steps=every,
            gradient_accumulation_steps=1,
            seed=0,
            validation_steps=10,
        )
        loop.train_loop(accelerator, args, 0, lambda gen, step: {})
        assert saved == expected, every
    # A finished run relaunched with "latest" resumes at the end and does no step.
    saved.clear()
    args.checkpointing_steps = 2
    assert loop.train_loop(accelerator, args, 5, lambda gen, step: pytest.fail("a step was redone")) == 5


def test_fp16_accumulation_counts_the_optimisers_of_the_whole_run() -> None:
    """Networks prepared one ``prepare`` call at a time (MLCM: generator, then fake score) share fp16's loss
    scale all the same: the second call is refused. The stub records optimisers as accelerate does."""

    class Accelerator:
        mixed_precision, gradient_accumulation_steps, distributed_type = "fp16", 2, "DistributedType.NO"

        def __init__(self) -> None:
            self._optimizers: list[Any] = []

        def prepare(self, model: Any, optimizer: Any) -> list[Any]:
            self._optimizers.append(optimizer)
            return [model, optimizer]

    def pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Linear(2, 2)
        return model, torch.optim.AdamW(model.parameters())

    acc = Accelerator()
    runtime.prepare(acc, pair())  # one network: one loss scale, fine
    with pytest.raises(ValueError, match=r"trains two networks or more \(here 2 optimisers in the run\)"):
        runtime.prepare(acc, pair())
    bf16 = Accelerator()
    bf16.mixed_precision = "bf16"
    runtime.prepare(bf16, pair())
    assert len(runtime.prepare(bf16, pair())) == 2 and len(bf16._optimizers) == 2
