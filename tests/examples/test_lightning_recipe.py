"""SDXL-Lightning recipe details of examples/sdxl_lightning.py (paper Sec. 3.4-3.7), on the tiny pipeline.

* D's re-noising timestep weights: 1:1:1:1 at first, 5:1:1:1 from ``--stable_after_steps`` on (a function
  of the optimisation step, so a resumed run switches where an uninterrupted one does);
* ``reset_discriminator``: every adversarial stage writes ``OUTPUT_DIR/discriminator/``; the ``/full``
  stages of the >= 2-step levels continue their level's unconditional D (``--init_discriminator``);
* the 1-step level's conditional phase, ``2->1/conditional``: the full x0-predicting UNet against the
  conditional D;
* the teacher runs on its own stride (Sec. 2.3), per sample, in the MSE and the adversarial stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

UNIFORM, STABLE = (1.0, 1.0, 1.0, 1.0), (5.0, 1.0, 1.0, 1.0)

# The tiny pipeline fixture and the loader are imported from test_sdxl_scripts (not copied); an imported
# fixture's name is then a test parameter, which ruff reads as a redefinition (hence F811 off below).
from tests.examples.test_sdxl_scripts import _load, runtime, tiny_sdxl  # noqa: E402, F401
from tests.state_compare import assert_same_update  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_sdxl: dict[str, Path]) -> dict[str, Path]:  # noqa: F811
    """The tiny SDXL pipeline folder and its 3 captioned 128 px images."""
    return tiny_sdxl


def _argv(tiny: dict[str, Path], out: Path, stage: str, *, steps: int = 2, lora: bool = False) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny["model"]),
        "--train_data_dir",
        str(tiny["images"]),
        "--output_dir",
        str(out),
        "--stage",
        stage,
        "--resolution",
        "128",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "3",
    ]
    return argv + (["--use_lora", "--lora_rank", "4"] if lora else []) + _unchained(stage)


def _unchained(stage: str) -> list[str]:
    """The tiny runs start every stage from the base UNet: the chain links' explicit opt-outs."""
    if stage == "128->32":
        return []
    return ["--from_base", *(["--fresh_lora"] if stage.endswith("/unconditional") else [])]


def _parse_only(tmp_path: Path, stage: str, *flags: str) -> Any:
    script = _load("sdxl_lightning")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path), "--stage", stage]
    lora = script.StagePlan.sdxl_lightning()[stage].trainable == "lora"
    return script.parse_args([*argv, *(["--use_lora"] if lora else []), *_unchained(stage), *flags])


def _file_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "discriminator.safetensors"))


# ------------------------------------------------------------------------------ D timestep weights (item 1)
def test_discriminator_timestep_weights_switch_at_stable_after_steps(tmp_path: Path) -> None:
    script = _load("sdxl_lightning")
    plan = script.StagePlan.sdxl_lightning()
    stage = plan["4->2/conditional"]
    # Default switch: half of --max_train_steps (steps 0..4 uniform, 5.. stable).
    args = _parse_only(tmp_path, stage.name, "--max_train_steps", "10")
    assert script.stable_after_steps(args) == 5
    got = [script.discriminator_timestep_weights(args, stage, step) for step in range(10)]
    assert got == [UNIFORM] * 5 + [STABLE] * 5
    # 0: stable from the first step.
    args = _parse_only(tmp_path, stage.name, "--stable_after_steps", "0")
    assert script.discriminator_timestep_weights(args, stage, 0) == STABLE
    # Overrides of both weight sets, on the 1-step stages too.
    flags = ["--stable_after_steps", "3", "--discriminator_timestep_weights", "2", "1", "1", "0"]
    flags += ["--discriminator_timestep_weights_stable", "8", "1", "1", "1"]
    for name in ("2->1/conditional", "2->1/full"):
        args = _parse_only(tmp_path, name, *flags)
        assert script.discriminator_timestep_weights(args, plan[name], 2) == (2.0, 1.0, 1.0, 0.0)
        assert script.discriminator_timestep_weights(args, plan[name], 3) == (8.0, 1.0, 1.0, 1.0)
    # Stages without re-noising (>= 4 steps) have no weights and refuse the flags.
    args = _parse_only(tmp_path, "8->4/conditional")
    assert script.discriminator_timestep_weights(args, plan["8->4/conditional"], 0) is None
    with pytest.raises(ValueError, match=r"'8->4/conditional' does not re-noise.*drop --stable_after_steps"):
        _parse_only(tmp_path, "8->4/conditional", "--stable_after_steps", "1")
    with pytest.raises(ValueError, match=r"does not re-noise.*drop --discriminator_timestep_weights\."):
        _parse_only(tmp_path, "8->4/conditional", "--discriminator_timestep_weights", "1", "1", "1", "1")
    with pytest.raises(
        ValueError, match=r"--discriminator_timestep_weights_stable to be 4 non-negative weights"
    ):
        _parse_only(tmp_path, "4->2/conditional", "--discriminator_timestep_weights_stable", "5", "1")
    with pytest.raises(ValueError, match=r"Expected --stable_after_steps >= 0, but got -1"):
        _parse_only(tmp_path, "4->2/conditional", "--stable_after_steps", "-1")
    with pytest.raises(
        ValueError, match=r"'2->1/x0-conversion' trains no discriminator: drop --stable_after_steps"
    ):
        _parse_only(tmp_path, "2->1/x0-conversion", "--stable_after_steps", "1")


# ------------------------------------------------------------------------------ reset_discriminator (item 2)
def test_discriminator_flags_follow_the_plan(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"'4->2/full' continues the discriminator of 4->2/unconditional.*pass --init_discriminator",
    ):
        _parse_only(tmp_path, "4->2/full")
    d = str(tmp_path / "d")
    (tmp_path / "d").mkdir()  # parse_args checks that a local --init_discriminator exists
    with pytest.raises(ValueError, match=r"one of --init_discriminator and --fresh_discriminator"):
        _parse_only(tmp_path, "32->8/full", "--init_discriminator", d, "--fresh_discriminator")
    for stage in ("4->2/conditional", "4->2/unconditional", "2->1/conditional", "2->1/full"):
        with pytest.raises(
            ValueError, match=rf"'{stage}' starts a fresh discriminator.*drop --init_discriminator"
        ):
            _parse_only(tmp_path, stage, "--init_discriminator", d)
    with pytest.raises(ValueError, match=r"'128->32' trains no discriminator: drop --init_discriminator"):
        _parse_only(tmp_path, "128->32", "--init_discriminator", d)
    assert _parse_only(tmp_path, "8->4/full", "--init_discriminator", d).init_discriminator == d
    assert _parse_only(tmp_path, "8->4/full", "--fresh_discriminator").fresh_discriminator


def test_full_stage_continues_the_unconditional_stage_discriminator(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4->2/unconditional writes its D; 4->2/full starts from exactly those weights, trains them, writes its
    own, and a resumed 4->2/full run ends with the same student and D as an uninterrupted one."""
    from diffusers import UNet2DConditionModel

    script = _load("sdxl_lightning")
    uncond = tmp_path / "uncond"
    script.main(script.parse_args(_argv(tiny, uncond, "4->2/unconditional", steps=1, lora=True)))
    d_folder = uncond / "discriminator"
    assert json.loads((d_folder / "discriminator.json").read_text()) == {
        "class": "UNetEncoderDiscriminator",
        "conditional": False,
        "stage": "4->2/unconditional",
    }
    saved = _file_state(d_folder)
    base_d = script.UNetEncoderDiscriminator(
        UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet"), conditional=False
    ).state_dict()
    assert saved.keys() == base_d.keys()
    assert any(not torch.equal(saved[k], base_d[k]) for k in saved), (
        "the unconditional stage's D did not train"
    )

    starts: list[dict[str, torch.Tensor]] = []
    prepare = runtime.prepare

    def recording_prepare(accelerator, *pairs):  # type: ignore[no-untyped-def]
        if len(pairs) == 2:  # (student, opt), (discriminator, opt_d)
            starts.append({k: v.detach().clone() for k, v in pairs[1][0].state_dict().items()})
        return prepare(accelerator, *pairs)

    monkeypatch.setattr(runtime, "prepare", recording_prepare)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    full = ["--init_discriminator", str(d_folder)]
    script.main(script.parse_args([*_argv(tiny, out_a, "4->2/full"), *full]))
    resume = ["--resume_from_checkpoint", str(out_a / "checkpoint-1")]
    script.main(script.parse_args([*_argv(tiny, out_b, "4->2/full"), *full, *resume]))
    assert len(starts) == 2
    for start in starts:  # the D the full stage starts from is the unconditional stage's
        assert start.keys() == saved.keys()
        assert all(torch.equal(start[k], saved[k]) for k in saved)
    got_a, got_b = _file_state(out_a / "discriminator"), _file_state(out_b / "discriminator")
    assert any(not torch.equal(got_a[k], saved[k]) for k in saved), "the full stage's D did not train"
    # Both runs' steps against their size (tests/state_compare.py): D from the stage's start, the UNet
    # from the pretrained weights.
    assert_same_update(got_b, got_a, saved, what="resumed vs uninterrupted D")
    a = UNet2DConditionModel.from_pretrained(str(out_a / "unet")).state_dict()
    b = UNet2DConditionModel.from_pretrained(str(out_b / "unet")).state_dict()
    start = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet").state_dict()
    assert_same_update(b, a, start, what="resumed vs uninterrupted UNet")


def test_init_discriminator_of_the_wrong_kind_says_why(tiny: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    script = _load("sdxl_lightning")
    stage = script.StagePlan.sdxl_lightning()["8->4/full"]
    unet = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet")
    cond = script.UNetEncoderDiscriminator(unet, conditional=True)
    folder = script.write_discriminator(
        tmp_path / "cond", cond.state_dict(), conditional=True, stage="8->4/conditional"
    )
    fresh = script.UNetEncoderDiscriminator(unet, conditional=False)
    with pytest.raises(
        ValueError,
        match=r"holds a conditional discriminator \(stage '8->4/conditional'\), but stage '8->4/full' trains an "
        r"unconditional one: pass the discriminator/ of 8->4/unconditional",
    ):
        script.load_discriminator(fresh, folder, stage)
    (folder / "discriminator.json").unlink()  # no description: the shapes still do not fit
    with pytest.raises(ValueError, match=r"does not fit this stage's discriminator"):
        script.load_discriminator(fresh, folder / "discriminator.safetensors", stage)
    with pytest.raises(
        ValueError, match=r"expected a discriminator/ folder holding discriminator.safetensors"
    ):
        script.load_discriminator(fresh, tmp_path, stage)
    # A folder from write_discriminator loads back exactly (folder or file path).
    uncond = script.write_discriminator(tmp_path / "u", fresh.state_dict(), conditional=False, stage="x")
    other = script.UNetEncoderDiscriminator(unet, conditional=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    script.load_discriminator(other, uncond / "discriminator.safetensors", stage)
    want = fresh.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in other.state_dict().items())


# ------------------------------------------------------------------------ 2->1/conditional stage (item 3)
def test_one_step_conditional_stage_runs_resumes_and_switches_weights(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2->1/conditional: the full UNet predicting x0 ("sample") jumps from t in {249, 499, 749, 999} to the
    clean end; the conditional D sees the re-noised x0s with the student's input x_t; D's timestep weights
    switch from 1:1:1:1 to 5:1:1:1 at --stable_after_steps 1, also in the run resumed at step 1."""
    from diffusers import UNet2DConditionModel

    script = _load("sdxl_lightning")
    calls: list[dict[str, Any]] = []
    pair_fn, renoise = script.consistency_pair, script.renoise_for_discriminator

    def recording_pair(student, teacher, x_t, sample, cond, uncond, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(
            {"pred": kwargs["prediction_type"], "t": sample.t.clone(), "t_prev": sample.t_prev.clone()}
        )
        return pair_fn(student, teacher, x_t, sample, cond, uncond, **kwargs)

    def recording_renoise(real, fake, **kwargs):  # type: ignore[no-untyped-def]
        calls[-1]["weights"] = tuple(kwargs["weights"])
        return renoise(real, fake, **kwargs)

    disc_cls = script.UNetEncoderDiscriminator

    class RecordingDiscriminator(disc_cls):  # type: ignore[misc, valid-type]
        def forward(self, sample, timestep, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[-1].setdefault("conditioned", []).append(kwargs.get("cond_sample") is not None)
            return super().forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(script, "consistency_pair", recording_pair)
    monkeypatch.setattr(script, "renoise_for_discriminator", recording_renoise)
    monkeypatch.setattr(script, "UNetEncoderDiscriminator", RecordingDiscriminator)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    flags = ["--stable_after_steps", "1", "--validation_prompts", "a cat", "--validation_steps", "1"]
    script.main(script.parse_args([*_argv(tiny, out_a, "2->1/conditional"), *flags]))
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-1.png", "step-2.png"]
    resume = ["--resume_from_checkpoint", str(out_a / "checkpoint-1")]
    script.main(script.parse_args([*_argv(tiny, out_b, "2->1/conditional"), *flags, *resume]))

    assert [c["weights"] for c in calls] == [UNIFORM, STABLE, STABLE]  # run a: steps 0, 1; run b: step 1
    for c in calls:
        assert c["pred"] == "sample"
        assert set(c["t"].tolist()) <= {249, 499, 749, 999} and bool((c["t_prev"] == -1).all())
        assert c["conditioned"] and all(c["conditioned"])  # generator pass + D's real and fake passes
    assert json.loads((out_a / "discriminator" / "discriminator.json").read_text())["conditional"] is True
    # The x0 model's sampler is saved beside it: trailing Euler reading the output as the clean sample.
    from diffusers import EulerDiscreteScheduler

    sampler = EulerDiscreteScheduler.from_pretrained(str(out_a), subfolder="scheduler")
    assert sampler.config.prediction_type == "sample" and sampler.config.timestep_spacing == "trailing"
    start = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet").state_dict()
    a = UNet2DConditionModel.from_pretrained(str(out_a / "unet")).state_dict()
    b = UNet2DConditionModel.from_pretrained(str(out_b / "unet")).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in a.items()), "the UNet did not train"
    assert_same_update(b, a, start, what="resumed vs uninterrupted UNet")  # tests/state_compare.py


def test_teacher_steps_override_for_a_skip_level_teacher(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load("sdxl_lightning")
    with pytest.raises(
        ValueError, match=r"Expected --teacher_steps >= 1, but got 0; leave it out for the plan's 2"
    ):
        _parse_only(tmp_path, "4->2/conditional", "--teacher_steps", "0")
    with pytest.raises(ValueError, match=r"'2->1/x0-conversion' has no teacher .*: drop --teacher_steps 2"):
        _parse_only(tmp_path, "2->1/x0-conversion", "--teacher_steps", "2")
    seen: list[int] = []

    class Stop(Exception):
        pass

    def recording_pair(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["teacher_steps"])
        raise Stop

    monkeypatch.setattr(script, "consistency_pair", recording_pair)
    for flags, want in (([], 2), (["--teacher_steps", "3"], 3)):  # the plan's N/M = 4/2, then the override
        with pytest.raises(Stop):
            argv = _argv(tiny, tmp_path / f"o{want}", "4->2/conditional", lora=True)
            script.main(script.parse_args([*argv, *flags]))
        assert seen[-1] == want


# ------------------------------------------------------------------ the teacher's own stride (Sec. 2.3)
@pytest.mark.parametrize(
    ("stage", "flags", "lora", "want"),
    [
        # the plan's 2-step teacher (stride 500) from the extra timesteps
        (
            "2->1/conditional",
            [],
            False,
            {999: [999, 499, -1], 749: [749, 249, -1], 499: [499, -1, -1], 249: [249, -1, -1]},
        ),
        # a skip-level 4-step teacher (stride 250)
        (
            "2->1/conditional",
            ["--teacher_steps", "4"],
            False,
            {
                999: [999, 749, 499, 249, -1],
                749: [749, 499, 249, -1, -1],
                499: [499, 249, -1, -1, -1],
                249: [249, -1, -1, -1, -1],
            },
        ),
        # the MSE stage: the 128-step teacher on its own trailing grid (stride 1000/128)
        ("128->32", [], True, None),
    ],
    ids=["2->1-plan", "2->1-skip-level", "128->32"],
)
def test_teacher_runs_on_its_own_stride(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage, flags, lora, want
) -> None:
    """The script's teacher solve: per sample, the timesteps of the teacher's own stride, not an even split
    of the student's jump (749 -> 249 -> clean, not 749 -> 374 -> clean)."""
    from diffdistill.schedulers import spaced_timesteps

    script = _load("sdxl_lightning")
    seen: list[torch.Tensor] = []

    class Stop(Exception):
        pass

    class RecordingSolver(script.TeacherSolver):  # type: ignore[misc, name-defined]
        def solve(self, x_t, t, t_to, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(
                self.step_timesteps(t, t_to, kwargs.get("num_steps", 1), x_t, stride=kwargs.get("stride"))
            )
            super().solve(x_t, t, t_to, *args, **kwargs)
            raise Stop

    monkeypatch.setattr(script, "TeacherSolver", RecordingSolver)
    with pytest.raises(Stop):
        argv = _argv(tiny, tmp_path / "o", stage, lora=lora)
        script.main(script.parse_args([*argv, *flags]))
    (steps,) = seen
    for column in steps.T.tolist():
        if want is not None:
            assert column == want[column[0]]
        else:
            own = [*spaced_timesteps(128, "trailing", num_train_timesteps=1000).tolist(), -1]
            j = own.index(column[0])
            assert column == own[j : j + 5]
