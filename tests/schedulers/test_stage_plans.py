"""Stage plans: presets follow the papers, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from diffdistill.errors import OptionError
from diffdistill.schedulers import Stage, StagePlan


def test_lightning_preset():
    plan = StagePlan.sdxl_lightning()
    assert [s.name for s in plan] == [
        "128->32",
        *(
            f"{lv}/{kind}"
            for lv in ("32->8", "8->4", "4->2")
            for kind in ("conditional", "unconditional", "full")
        ),
        "2->1/x0-conversion",
        "2->1/conditional",
        "2->1/full",
    ]
    steps = [s.student_steps for s in plan if s.name.endswith("/full") or s.name == "128->32"]
    assert steps == [32, 8, 4, 2, 1]
    assert plan["128->32"].loss == "mse" and plan["128->32"].options["guidance_scale"] == 6.0
    for s in plan:
        if s.loss == "adversarial":
            assert s.options["guidance_scale"] == 1.0 and s.options["adam_betas"] == [0.0, 0.99]
            # every adversarial stage says whether it starts a fresh D
            assert isinstance(s.options["reset_discriminator"], bool)
            assert s.options["lr"] == (1e-6 if s.trainable == "lora" else 5e-7)
    # conditional before unconditional at every level (Sec. 3.4); D fresh at each level's start and at the
    # switch to the unconditional D; each N->M/full continues its level's unconditional D
    names = [s.name for s in plan]
    for stage in ("32->8", "8->4", "4->2"):
        assert (
            names.index(f"{stage}/conditional")
            < names.index(f"{stage}/unconditional")
            < names.index(f"{stage}/full")
        )
        assert plan[f"{stage}/conditional"].options["reset_discriminator"] is True
        assert plan[f"{stage}/unconditional"].options["reset_discriminator"] is True
        assert plan[f"{stage}/full"].options["reset_discriminator"] is False
        assert plan[f"{stage}/full"].discriminator == "unconditional"
    # 1 step: no LoRA (Sec. 3.7), but still conditional then unconditional on the x0-converted full UNet
    one = [plan[n] for n in ("2->1/x0-conversion", "2->1/conditional", "2->1/full")]
    assert all(s.trainable == "full" and s.student_steps == 1 for s in one)
    assert not any(s.name.startswith("2->1/") and s.trainable == "lora" for s in plan)
    cond = plan["2->1/conditional"]
    assert cond.discriminator == "conditional" and cond.teacher_steps == 2 and cond.loss == "adversarial"
    assert cond.options["prediction_type"] == "sample" and cond.options["reset_discriminator"] is True
    assert plan["2->1/full"].options["prediction_type"] == "sample"
    assert plan["2->1/full"].options["reset_discriminator"] is True  # its predecessor's D is conditional
    assert plan["4->2/full"].options["extra_student_timesteps"] == [249, 499, 749, 999]
    assert plan["2->1/x0-conversion"].options["timesteps"] == [249, 499, 749, 999]
    # D timestep weights: 1:1:1:1 at first, 5:1:1:1 (the 5 on t* = 10) once stable, on the 2- and 1-step stages
    for s in plan:
        if s.student_steps in (1, 2) and s.loss == "adversarial":
            assert s.options["discriminator_timesteps"] == [10, 250, 500, 750]
            assert s.options["discriminator_timestep_weights"] == [1, 1, 1, 1]
            assert s.options["discriminator_timestep_weights_stable"] == [5, 1, 1, 1]
        else:
            assert "discriminator_timestep_weights" not in s.options


def test_hyper_and_mlcm_presets():
    hyper = StagePlan.hyper_sd()
    assert [s.num_segments for s in hyper] == [8, 4, 2, 1]
    w_adv = [s.loss_weights["adversarial"] for s in hyper]
    assert w_adv == sorted(w_adv) and w_adv[0] == 0.0 and w_adv[-1] == 1.0
    mlcm = StagePlan.mlcm()
    assert [s.name for s in mlcm] == ["mlcd", "lcd-inter-segment"]
    assert mlcm["mlcd"].options["skip"] == 20 and mlcm["lcd-inter-segment"].options["skip"] == 125
    assert mlcm["lcd-inter-segment"].teacher_steps == 3


@pytest.mark.parametrize("factory", [StagePlan.sdxl_lightning, StagePlan.hyper_sd, StagePlan.mlcm])
def test_json_round_trip(factory):
    plan = factory()
    again = StagePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and list(again) == list(plan) and len(again) == len(plan)


def test_validation():
    with pytest.raises(OptionError, match=r"Expected `loss` to be one of .* but got 'l2'"):
        Stage("a", loss="l2")
    with pytest.raises(OptionError, match=r"Stage 'a': loss 'adversarial' needs `discriminator`"):
        Stage("a", loss="adversarial")
    with pytest.raises(
        OptionError, match=r"Stage 'a': expected `student_steps` to be None or an int >= 1, but got 0"
    ):
        Stage("a", loss="mse", student_steps=0)
    with pytest.raises(OptionError, match=r"Expected unique stage names, but got duplicates \['a'\]"):
        StagePlan([Stage("a", loss="mse"), Stage("a", loss="mse")])
    with pytest.raises(OptionError, match=r"Unknown Stage field\(s\) \['steps'\]"):
        StagePlan.from_dict({"stages": [{"name": "a", "loss": "mse", "steps": 3}]})
    with pytest.raises(KeyError, match=r"No stage named 'zzz'"):
        StagePlan.mlcm()["zzz"]
    with pytest.raises(OptionError, match=r"at least one Stage"):
        StagePlan([])


def test_counts_are_stored_as_python_ints():
    """``teacher_steps=2.0`` / ``numpy.int64(4)`` pass the integer check and are stored as ``int`` (they were kept
    as given: ``range(stage.teacher_steps)`` failed, and ``json.dumps(plan.to_dict())`` raised on numpy ints)."""
    np = pytest.importorskip("numpy")
    stage = Stage("a", loss="mse", student_steps=np.int64(4), teacher_steps=2.0)
    assert type(stage.student_steps) is int and type(stage.teacher_steps) is int
    assert (stage.student_steps, stage.teacher_steps) == (4, 2)
    assert json.loads(json.dumps(StagePlan([stage]).to_dict()))["stages"][0]["student_steps"] == 4
