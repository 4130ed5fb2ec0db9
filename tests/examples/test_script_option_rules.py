"""The example scripts' own option rules, checked in ``parse_args`` (before any model loads).

Each case is a command line that the scripts used to accept although it trains the wrong thing, ignores a
flag, or fails only after the (minutes-long) model load: a round without its preset (SSD-1B), a Lightning
stage without its chain link, Diffusion2GAN's late checks, the flow scripts' model-independent checks,
MLCM's skip, a one-stage TSCD plan with discriminator options, flags whose enabling option is off, and the
script-specific bounds. Parse-level only: no model is built (the paths are tiny files of the test's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.examples.example_modules import load_example

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")


@pytest.fixture()
def paths(tmp_path: Path) -> dict[str, str]:
    """A model path (never loaded), an output folder, a prompt file and an image folder with one image."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not decoded by parse_args")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    return {
        "model": str(tmp_path / "model"),
        "out": str(tmp_path / "out"),
        "prompts": str(prompts),
        "images": str(images),
        "tmp": str(tmp_path),
    }


def _parse(script: str, paths: dict[str, str], *flags: str, data: str = "images") -> Any:
    argv = ["--pretrained_model_name_or_path", paths["model"], "--output_dir", paths["out"]]
    argv += ["--train_data_dir" if data == "images" else "--prompts_file", paths[data]]
    return load_example(script).parse_args([*argv, *flags])


# ------------------------------------------------------------------------------------------------ SSD-1B rounds
def test_ssd1b_round_needs_its_preset(paths: dict[str, str]) -> None:
    """``--round K`` is round K of a preset: without ``--preset`` (and with ``--student_model``) it removed
    nothing and trained a plain KD fine-tune (audit item 2)."""
    with pytest.raises(
        ValueError, match=r"--round 2 is round 2 of a preset, but no --preset.*--preset ssd-1b"
    ):
        _parse("sdxl_ssd1b_kd", paths, "--student_model", paths["tmp"], "--round", "2")
    args = _parse(
        "sdxl_ssd1b_kd", paths, "--student_model", paths["tmp"], "--preset", "ssd-1b", "--round", "2"
    )
    assert (args.preset, args.round) == ("ssd-1b", 2)
    assert _parse("sdxl_ssd1b_kd", paths).preset == "ssd-1b"  # a fresh run: the whole preset, as before


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--output_weight", "-0.5"], r"--output_weight >= 0"),
        (["--feature_weight", "-1"], r"--feature_weight >= 0"),
        (["--validation_inference_steps", "0"], r"--validation_inference_steps >= 1"),
    ],
)
def test_ssd1b_bounds(paths: dict[str, str], flags: list[str], match: str) -> None:
    """Negative KD weights maximise the distance (flow_kd.py refuses them too)."""
    with pytest.raises(ValueError, match=match):
        _parse("sdxl_ssd1b_kd", paths, *flags)


# ------------------------------------------------------------------------------------------- Lightning chain
def test_lightning_stages_need_their_chain_links(paths: dict[str, str]) -> None:
    """After 128->32 a stage starts from ``--init_unet`` (or ``--from_base``); an /unconditional stage
    continues ``--init_lora`` (or ``--fresh_lora``), as /full continues ``--init_discriminator`` (item 3)."""
    unet = Path(paths["tmp"]) / "l-32" / "unet_merged"
    unet.mkdir(parents=True)
    lora = Path(paths["tmp"]) / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"")
    init = ["--init_unet", str(unet)]
    with pytest.raises(
        ValueError, match=r"'2->1/conditional' starts from the previous stage's UNet.*--from_base"
    ):
        _parse("sdxl_lightning", paths, "--stage", "2->1/conditional")
    with pytest.raises(ValueError, match=r"'8->4/conditional' starts from the previous stage's UNet"):
        _parse("sdxl_lightning", paths, "--stage", "8->4/conditional", "--use_lora")
    with pytest.raises(ValueError, match=r"continues the LoRA of 32->8/conditional: pass --init_lora"):
        _parse("sdxl_lightning", paths, "--stage", "32->8/unconditional", "--use_lora", *init)
    with pytest.raises(ValueError, match=r"one of --init_lora and --fresh_lora"):
        _parse(
            "sdxl_lightning", paths, "--stage", "32->8/unconditional", "--use_lora", *init,
            "--init_lora", str(lora), "--fresh_lora",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"--init_lora is for the /unconditional stages"):
        _parse(
            "sdxl_lightning",
            paths,
            "--stage",
            "32->8/conditional",
            "--use_lora",
            *init,
            "--init_lora",
            str(lora),
        )
    with pytest.raises(ValueError, match=r"first of the chain.*drop --init_unet"):
        _parse("sdxl_lightning", paths, "--use_lora", *init)
    with pytest.raises(ValueError, match=r"one of --init_unet and --from_base"):
        _parse("sdxl_lightning", paths, "--stage", "8->4/conditional", "--use_lora", *init, "--from_base")
    # the links given (or opted out of) explicitly
    args = _parse(
        "sdxl_lightning",
        paths,
        "--stage",
        "32->8/unconditional",
        "--use_lora",
        *init,
        "--init_lora",
        str(lora),
    )
    assert args.init_lora == str(lora)
    assert _parse(
        "sdxl_lightning", paths, "--stage", "32->8/unconditional", "--use_lora", "--from_base", "--fresh_lora"
    )
    assert _parse(
        "sdxl_lightning", paths, "--stage", "8->4/conditional", "--use_lora", *init
    ).init_unet == str(unet)


def test_lightning_paths_are_checked_before_the_load(paths: dict[str, str]) -> None:
    """A typo in ``--init_lora`` / ``--init_unet`` / ``--init_discriminator`` fails in ``parse_args`` (item 10);
    an ``owner/name`` hub id passes."""
    stage = ["--stage", "32->8/unconditional", "--use_lora"]
    with pytest.raises(ValueError, match=r"--init_lora .*typo.safetensors: no such file"):
        _parse(
            "sdxl_lightning", paths, *stage, "--from_base", "--init_lora", paths["tmp"] + "/typo.safetensors"
        )
    with pytest.raises(ValueError, match=r"--init_unet out/l-32/typo: no such folder"):
        _parse("sdxl_lightning", paths, *stage, "--init_unet", "out/l-32/typo", "--fresh_lora")
    assert _parse("sdxl_lightning", paths, *stage, "--init_unet", "someone/sdxl-unet", "--fresh_lora")
    full = ["--stage", "32->8/full", "--from_base", "--teacher_unet", paths["tmp"]]
    with pytest.raises(ValueError, match=r"--init_discriminator .*: no such folder or file"):
        _parse("sdxl_lightning", paths, *full, "--init_discriminator", paths["tmp"] + "/nope")


def test_lightning_stage_only_flags(paths: dict[str, str]) -> None:
    """``--discriminator_learning_rate`` at 128->32 (no D) and ``--mse_guidance_scale`` at an adversarial
    stage did nothing (item 12)."""
    with pytest.raises(
        ValueError, match=r"'128->32' trains no discriminator: drop --discriminator_learning_rate"
    ):
        _parse("sdxl_lightning", paths, "--use_lora", "--discriminator_learning_rate", "1e-5")
    with pytest.raises(ValueError, match=r"--mse_guidance_scale is the teacher's CFG of the MSE stage"):
        _parse(
            "sdxl_lightning", paths, "--stage", "32->8/conditional", "--use_lora", "--from_base",
            "--mse_guidance_scale", "3",
        )  # fmt: skip
    assert _parse("sdxl_lightning", paths, "--use_lora").mse_guidance_scale == 6.0
    assert (
        _parse("sdxl_lightning", paths, "--use_lora", "--mse_guidance_scale", "3").mse_guidance_scale == 3.0
    )


# ------------------------------------------------------------------------------------------ Diffusion2GAN
def _d2g(paths: dict[str, str], *flags: str) -> Any:
    return _parse("sdxl_diffusion2gan", paths, "--lpips_weights", "random", *flags, data="prompts")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--num_pairs", "0"], r"--num_pairs >= 1"),
        (["--pairs_shard_size", "0"], r"--pairs_shard_size >= 1"),
        (["--teacher_steps", "0"], r"--teacher_steps >= 1"),
        (["--r1_every", "0"], r"--r1_every >= 1"),
        (["--generator_timestep", "-1"], r"--generator_timestep in \[0, 999\]"),
        (["--generator_timestep", "1000"], r"--generator_timestep in \[0, 999\]"),
        (["--r1_gamma", "0", "--r1_every", "4"], r"--r1_gamma 0 turns R1 off, so --r1_every"),
        (["--r1_gamma", "0", "--r1_approximate_sigma", "0.1"], r"so --r1_approximate_sigma would be ignored"),
        (["--gan_weight", "-1"], r"--gan_weight >= 0"),
    ],
)
def test_diffusion2gan_values_fail_in_parse_args(paths: dict[str, str], flags: list[str], match: str) -> None:
    """Values that failed after the SDXL load and all pair generation, or with a ZeroDivisionError (item 5)."""
    with pytest.raises(ValueError, match=match):
        _d2g(paths, *flags)


def test_diffusion2gan_lpips_weights_read_in_parse_args(paths: dict[str, str]) -> None:
    """A missing or unreadable ``--lpips_weights`` fails in ``parse_args``; a real checkpoint loads there."""
    from diffdistill.losses import LatentLPIPS

    argv = ["--pretrained_model_name_or_path", paths["model"], "--output_dir", paths["out"]]
    argv += ["--prompts_file", paths["prompts"]]
    script = load_example("sdxl_diffusion2gan")
    with pytest.raises(ValueError, match=r"--lpips_weights .*typo.safetensors: .*names no file"):
        script.parse_args([*argv, "--lpips_weights", paths["tmp"] + "/typo.safetensors"])
    bad = Path(paths["tmp"]) / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"--lpips_weights .*bad.safetensors"):
        script.parse_args([*argv, "--lpips_weights", str(bad)])
    good = Path(paths["tmp"]) / "w.safetensors"
    LatentLPIPS("sdxl", weights=None).save_pretrained(str(good))
    assert script.parse_args([*argv, "--lpips_weights", str(good)]).r1_every == 16


# ------------------------------------------------------------------------------------------ flow scripts
@pytest.mark.parametrize("script", ["flow_kd", "flow_ladd", "flow_tscd", "flow_dmd2"])
def test_flow_model_free_checks_run_in_parse_args(paths: dict[str, str], script: str) -> None:
    """``--resolution`` a multiple of 16 and ``--max_sequence_length`` in [1, 1024] need no model: checked
    before ``load_flow`` (minutes for FLUX), item 10."""
    data = "prompts" if script in ("flow_ladd", "flow_dmd2") else "images"
    extra = ["--preset", "flux-mini"] if script == "flow_kd" else []
    with pytest.raises(ValueError, match=r"--resolution to be a positive multiple of 16"):
        _parse(script, paths, *extra, "--resolution", "1000", data=data)
    with pytest.raises(ValueError, match=r"--max_sequence_length in \[1, 1024\]"):
        _parse(script, paths, *extra, "--max_sequence_length", "1100", data=data)


# ------------------------------------------------------------------------------------------------- MLCM
@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--skip", "0"], r"--skip in \[1, 125\]"),
        (["--skip", "5000"], r"--skip in \[1, 125\]"),
        (["--num_segments", "1000"], r"--skip in \[1, 1\].*the plan's default"),
        (["--num_segments", "0"], r"num_segments"),
        (["--num_segments", "3"], r"divide 1000"),
        (["--student_sample_steps", "0"], r"--student_sample_steps >= 1"),
        (["--fake_learning_rate", "1e-5", "--generator_every", "5"], r"configure the DMD \+ GAN phase"),
        (
            ["--stage1_steps", "1000", "--stage2_learning_rate", "1e-6"],
            r"--stage1_steps 1000 puts every step of this run in stage 1",
        ),
    ],
)
def test_mlcm_rules(paths: dict[str, str], flags: list[str], match: str) -> None:
    """MLCM's skip / milestones (failed at the first step, item 10) and its phase-only flags (item 12)."""
    with pytest.raises(ValueError, match=match):
        _parse("sdxl_mlcm", paths, *flags, data="prompts")


def test_mlcm_defaults_are_filled(paths: dict[str, str]) -> None:
    args = _parse("sdxl_mlcm", paths, data="prompts")
    assert (args.stage2_learning_rate, args.generator_every, args.fake_weighting) == (1e-5, 1, "epsilon")
    args = _parse("sdxl_mlcm", paths, "--dmd_steps", "10", "--generator_every", "5", data="prompts")
    assert args.generator_every == 5


# ------------------------------------------------------------------------------------- one-stage TSCD plans
def test_flow_tscd_single_stage_plan_is_mse_only(paths: dict[str, str]) -> None:
    """``StagePlan.hyper_sd`` gives a one-stage plan adversarial weight 0: the run defaults to ``--distance
    mse`` and refuses ``hybrid`` and the discriminator flags it would ignore (item 7)."""
    assert _parse("flow_tscd", paths, "--num_segments", "1").distance == "mse"
    assert _parse("flow_tscd", paths).distance == "hybrid"
    with pytest.raises(ValueError, match=r"no adversarial weight .*pass --distance mse"):
        _parse("flow_tscd", paths, "--num_segments", "1", "--distance", "hybrid")
    with pytest.raises(ValueError, match=r"--gan_loss configure the discriminator.*MSE only"):
        _parse("flow_tscd", paths, "--num_segments", "1", "--gan_loss", "hinge")
    with pytest.raises(
        ValueError, match=r"--discriminator_learning_rate configure the discriminator.*--distance mse"
    ):
        _parse("flow_tscd", paths, "--distance", "mse", "--discriminator_learning_rate", "1e-5")
    with pytest.raises(ValueError, match=r"--segments .* or --num_segments .* not both"):
        _parse("flow_tscd", paths, "--segments", "8,4", "--num_segments", "2")
    with pytest.raises(ValueError, match=r"--target_ema_decay is the decay of --target ema"):
        _parse("flow_tscd", paths, "--target", "online", "--target_ema_decay", "0.9")
    with pytest.raises(ValueError, match=r"--teacher_guidance_scale >= 1"):
        _parse("flow_tscd", paths, "--teacher_guidance_scale", "-2")
    with pytest.raises(ValueError, match=r"--discriminator_norm_groups >= 1"):
        _parse("flow_tscd", paths, "--discriminator_norm_groups", "0")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--segments", "1", "--discriminator_learning_rate", "1e-5"], r"configure the discriminator"),
        (["--segments", "8", "--discriminator_adam_beta2", "0.9"], r"configure the discriminator"),
        (["--fake_learning_rate", "1e-5", "--generator_timestep", "800"], r"configure the one-step stage"),
        (["--one_step_mse_weight", "2"], r"configure the one-step stage"),
        (["--generator_input", "noised"], r"--generator_input configure the one-step stage"),
        (["--generator_every", "5"], r"configure the one-step stage"),
        (["--feedback_learning_rate", "1e-5"], r"configure the feedback phase"),
        (["--feedback_timestep_range", "0", "500"], r"configure the feedback phase"),
        (
            ["--target", "online", "--target_ema_decay", "0.99"],
            r"--target_ema_decay is the decay of --target ema",
        ),
        (["--target_ema_decay", "1.5"], r"--target_ema_decay in \[0, 1\]"),
        (["--one_step_steps", "2", "--generator_timestep", "-1"], r"--generator_timestep in \[0, 999\]"),
        (["--one_step_steps", "2", "--one_step_teacher_steps", "0"], r"--one_step_teacher_steps >= 1"),
        (["--num_inference_steps", "0"], r"--num_inference_steps to divide 1000"),
    ],
)
def test_hyper_sd_rules(paths: dict[str, str], flags: list[str], match: str) -> None:
    """Hyper-SD's stage- and phase-only flags (items 7, 12) and its bounds (item 13)."""
    with pytest.raises(ValueError, match=match):
        _parse("sdxl_hyper_sd", paths, *flags)


def test_hyper_sd_builds_a_discriminator_only_for_an_adversarial_plan(paths: dict[str, str]) -> None:
    args = _parse("sdxl_hyper_sd", paths, "--segments", "1")
    assert not args.adversarial and args.discriminator_adam_beta2 == 0.99
    args = _parse("sdxl_hyper_sd", paths, "--one_step_steps", "2")
    assert args.adversarial and (args.generator_timestep, args.one_step_mse_weight) == (999, 1.0)
    assert tuple(args.feedback_timestep_range) == (0, 250)


# ------------------------------------------------------------------------------------------ SIM / flow DMD2
@pytest.mark.parametrize(
    ("script", "flags", "match"),
    [
        ("sdxl_sim", ["--loss", "dmd", "--sid_alpha", "1.0"], r"--sid_alpha applies only with --loss sid"),
        ("sdxl_sim", ["--loss", "dmd", "--sim_c", "0.1"], r"--sim_c applies only with --loss sim"),
        (
            "sdxl_sim",
            ["--loss", "sid", "--sim_detach_dprime"],
            r"--sim_detach_dprime applies only with --loss sim",
        ),
        (
            "sdxl_sim",
            ["--gan_classifier_weight", "0.5"],
            r"--gan_classifier_weight applies only with --gan_weight",
        ),
        ("sdxl_sim", ["--generator_timestep", "-1"], r"--generator_timestep in \[0, 999\]"),
        ("flow_dmd2", ["--gan_classifier_weight", "0.5"], r"applies only with --gan_weight"),
        (
            "flow_dmd2",
            ["--discriminator_blocks", "1"],
            r"--discriminator_blocks applies only with --gan_weight",
        ),
        (
            "flow_dmd2",
            ["--loss", "dmd", "--sim_distance", "l2"],
            r"--sim_distance applies only with --loss sim",
        ),
        (
            "flow_dmd2",
            ["--student_sigmas", "1.0", "0.75", "0.5", "0.25", "--num_student_steps", "2"],
            r"4-step grid, but --num_student_steps is 2",
        ),
    ],
)
def test_score_distillation_unused_flags(
    paths: dict[str, str], script: str, flags: list[str], match: str
) -> None:
    """Flags another option makes unused (item 12) and the generator timestep's range (item 13: -1 trained
    nothing, ``x0 == z`` whatever the UNet predicts)."""
    with pytest.raises(ValueError, match=match):
        _parse(script, paths, *flags, data="prompts")


def test_score_distillation_defaults_are_filled(paths: dict[str, str]) -> None:
    args = _parse("sdxl_sim", paths, "--preset", "sid", data="prompts")
    assert (args.sid_alpha, args.sim_distance, args.gan_classifier_weight) == (1.0, "pseudo_huber", 1e-2)
    args = _parse("flow_dmd2", paths, "--student_sigmas", "1.0", "0.5", data="prompts")
    assert (args.num_student_steps, args.gan_classifier_weight, args.discriminator_norm_groups) == (
        2,
        1.0,
        32,
    )


# ---------------------------------------------------------------------------------- LoRA / EMA options
#: Each script's extra flags (and data) for a command line that parses.
BASES = {
    "sdxl_sim": ([], "prompts"),
    "sdxl_mlcm": ([], "prompts"),
    "sdxl_hyper_sd": ([], "images"),
    "sdxl_lightning": ([], "images"),
    "sdxl_diffusion2gan": (["--lpips_weights", "random"], "prompts"),
    "sdxl_ssd1b_kd": ([], "images"),
    "flow_kd": (["--preset", "flux-mini"], "images"),
    "flow_ladd": ([], "prompts"),
    "flow_tscd": ([], "images"),
    "flow_dmd2": ([], "prompts"),
}


@pytest.mark.parametrize("script", sorted(BASES))
def test_lora_and_ema_options_need_their_flag_in_every_script(paths: dict[str, str], script: str) -> None:
    """Every script refuses ``--lora_rank`` / ``--lora_alpha`` without ``--use_lora`` (a forgotten flag trained
    the full network without a word) and ``--ema_decay`` / ``--ema_warmup`` without ``--use_ema``, before any
    model loads; with ``--use_ema`` the EMA defaults are filled. flow_dmd2 always trains a LoRA."""
    extra, data = BASES[script]
    pairs = [("--ema_decay", "0.99", "--use_ema"), ("--ema_warmup", "none", "--use_ema")]
    if script not in ("flow_dmd2", *WHOLE_STUDENT):
        pairs += [("--lora_rank", "8", "--use_lora"), ("--lora_alpha", "8", "--use_lora")]
    for flag, value, parent in pairs:
        with pytest.raises(
            ValueError, match=rf"^{flag} applies only with {parent}, which this run does not use: "
        ):
            _parse(script, paths, *extra, flag, value, data=data)
    lora = ["--use_lora"] if script == "sdxl_lightning" else []  # its first stage trains a LoRA
    args = _parse(script, paths, *extra, *lora, "--use_ema", data=data)
    assert (args.ema_decay, args.ema_warmup) == (0.9999, "linear")


#: The scripts that train a whole (block-removed) student and refuse a LoRA.
WHOLE_STUDENT = ("sdxl_ssd1b_kd", "flow_kd")


@pytest.mark.parametrize("script", WHOLE_STUDENT)
def test_whole_student_scripts_refuse_lora_options_without_advising_use_lora(
    paths: dict[str, str], script: str
) -> None:
    """A LoRA option there is refused with the script's reason and the flags to drop, not with the common advice
    to add ``--use_lora`` (which the script refuses next)."""
    extra, data = BASES[script]
    with pytest.raises(ValueError, match=r"trains the whole block-removed student.*: drop --lora_rank\.$"):
        _parse(script, paths, *extra, "--lora_rank", "8", data=data)
    with pytest.raises(ValueError, match=r": drop --use_lora / --lora_rank / --lora_alpha\.$"):
        _parse(script, paths, *extra, "--use_lora", "--lora_rank", "8", "--lora_alpha", "4", data=data)


def test_flow_dmd2_takes_lora_options_without_use_lora(paths: dict[str, str]) -> None:
    """flow_dmd2 trains a LoRA always (``--use_lora`` is on by default): its LoRA options are taken as given."""
    args = _parse("flow_dmd2", paths, "--lora_rank", "8", data="prompts")
    assert (args.use_lora, args.lora_rank, args.lora_alpha) == (True, 8, 8.0)
    args = _parse("flow_dmd2", paths, "--lora_alpha", "4", data="prompts")
    assert (args.lora_rank, args.lora_alpha) == (64, 4.0)
