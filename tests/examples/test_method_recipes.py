"""The method recipes of the Hyper-SD, SIM / SiD / DMD2 and Diffusion2GAN example scripts.

Hyper-SD: the teacher's per-sample CFG range (Alg. 1 line 6), offset noise and the discriminator's Adam
betas; SIM: ``--preset`` and its precedence under explicit flags, the SIM loss options; Diffusion2GAN: pair
shards that record their settings and are refused when the run's settings differ, the rejected
``--train_data_dir`` and the required ``--lpips_weights``. The in-process runs use the tiny SDXL pipeline of
``test_sdxl_scripts.py`` (its fixture and helpers, imported).
"""

# ruff: noqa: F811
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# The fixture is imported (not copied): its name is then a test parameter, which ruff reads as a redefinition.
from tests.examples.test_sdxl_scripts import (  # noqa: F401
    _assert_lora_roundtrip,
    _common_argv,
    _load,
    _run_and_resume,
    record_optimisers,
    runtime,
    sdxl_models,
    teacher_pairs,
    tiny_sdxl,
)


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


# ------------------------------------------------------------------------------------------------ Hyper-SD
def test_hyper_sd_guidance_range_noise_offset_and_discriminator_betas_parse(tmp_path: Path) -> None:
    script = _load("sdxl_hyper_sd")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)]
    args = script.parse_args(argv)
    # Defaults: a fixed scale 7 (both ends of the range), no offset noise, SDXL-Lightning's D Adam (0, 0.99).
    assert (args.guidance_scale_min, args.guidance_scale_max) == (7.0, 7.0)
    assert args.noise_offset == 0.0
    assert (args.discriminator_adam_beta1, args.discriminator_adam_beta2) == (0.0, 0.99)
    args = script.parse_args([*argv, "--guidance_scale", "5", "--guidance_scale_max", "8"])
    assert (args.guidance_scale_min, args.guidance_scale_max) == (5.0, 8.0)
    with pytest.raises(ValueError, match=r"--guidance_scale_min <= --guidance_scale_max, but got 9.0 > 7.0"):
        script.parse_args([*argv, "--guidance_scale_min", "9"])
    with pytest.raises(ValueError, match=r"--noise_offset >= 0"):
        script.parse_args([*argv, "--noise_offset", "-0.1"])
    with pytest.raises(ValueError, match=r"--discriminator_adam_beta2 in \[0, 1\)"):
        script.parse_args([*argv, "--discriminator_adam_beta2", "1"])


def test_hyper_sd_guidance_scales_and_training_noise() -> None:
    import argparse

    script = _load("sdxl_hyper_sd")
    fixed = argparse.Namespace(guidance_scale_min=7.0, guidance_scale_max=7.0)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert script.guidance_scales(fixed, 4, gen) == 7.0
    assert torch.equal(gen.get_state(), state)  # a fixed scale draws nothing: later draws are unchanged
    ranged = argparse.Namespace(guidance_scale_min=2.0, guidance_scale_max=9.0)
    omega = script.guidance_scales(ranged, 1000, gen)
    assert isinstance(omega, torch.Tensor) and omega.shape == (1000,)
    assert 2.0 <= float(omega.min()) < 2.1 and 8.9 < float(omega.max()) <= 9.0  # U[2, 9] per sample

    shape = (3, 4, 8, 8)
    plain = script.training_noise(shape, torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(script.training_noise(shape, torch.Generator().manual_seed(1), 0.0), plain)
    gen = torch.Generator().manual_seed(1)
    noisy = script.training_noise(shape, gen, 0.1)
    ref = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=ref)
    offset = torch.randn((3, 4, 1, 1), generator=ref)
    torch.testing.assert_close(noisy, base + 0.1 * offset)  # one shift per sample and channel


def test_hyper_sd_run_draws_teacher_guidance_per_sample_and_trains_d_with_lightning_betas(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffdistill.schedulers import TeacherSolver

    script = _load("sdxl_hyper_sd")
    scales: list[Any] = []
    predict = TeacherSolver._predict  # predict() and solve()'s steps, after the inputs were checked once

    def recording_predict(self, x_t, tt, cond, uncond, w, grad):  # type: ignore[no-untyped-def]
        if uncond is not None:  # a guided call (the validation sampler's are conditional only)
            scales.append(w)
        return predict(self, x_t, tt, cond, uncond, w, grad)

    optimizers = record_optimisers(monkeypatch)
    monkeypatch.setattr(TeacherSolver, "_predict", recording_predict)
    argv = _set(_common_argv(tiny_sdxl, tmp_path / "out", lora=True), "--max_train_steps", "1")
    # 2,1: a plan with adversarial weight (a one-stage plan is MSE only and builds no discriminator); the one
    # step runs the first stage, k = 2
    argv += ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "2,1", "--num_inference_steps", "4"]
    argv += ["--guidance_scale_min", "2", "--guidance_scale_max", "9", "--noise_offset", "0.1"]
    script.main(script.parse_args(argv))
    # The k = 2 stage's teacher step got one scale per sample of the batch of 2, drawn in [2, 9].
    assert len(scales) == 1
    omega = scales[0]
    assert isinstance(omega, torch.Tensor) and omega.shape == (2,)
    assert bool(((omega >= 2.0) & (omega <= 9.0)).all()) and float(omega[0]) != float(omega[1])
    student, disc = optimizers  # the student's optimiser, then the discriminator's
    assert student.param_groups[0]["betas"] == (0.9, 0.999)  # the shared --adam_beta1/2
    assert disc.param_groups[0]["betas"] == (0.0, 0.99)  # SDXL-Lightning's adversarial Adam
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------------------------------- SIM / SiD / DMD
PRESET_VALUES = {  # the documented recipes (sdxl_sim.PRESETS, --help), LoRA learning rates
    "sim": dict(loss="sim", guidance_scale=4.5, generator_every=1, adam_beta1=0.0, adam_beta2=0.999),
    "sid": dict(loss="sid", guidance_scale=2.0, generator_every=1, adam_beta1=0.0, adam_beta2=0.999),
    "dmd2": dict(loss="dmd", guidance_scale=8.0, generator_every=5, adam_beta1=0.9, adam_beta2=0.999),
}
# The generator's input: SiD-LSG's add_noise(0, z, 625) = SIM's sigma_init z at EDM sigma 2.5; DMD2: z at 999.
PRESET_VALUES["sim"].update(generator_timestep=625, generator_input="noised")
PRESET_VALUES["sid"].update(generator_timestep=625, generator_input="noised")
PRESET_VALUES["dmd2"].update(generator_timestep=999, generator_input="noise")


def test_sim_and_sid_generator_timestep_is_edm_sigma_2_5_on_sdxls_schedule() -> None:
    """SIM feeds sigma_init z at EDM sigma 2.5 (methods.md 4.1); SiD-LSG add_noise(0, z, 625): the same timestep
    of SD / SDXL's scaled-linear betas (0.00085 .. 0.012, 1000 steps)."""
    from diffdistill.schedulers import NoiseSchedule

    schedule = NoiseSchedule.from_betas(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert int(schedule.edm_sigma_to_timestep(2.5)) == 625
    assert abs(float(schedule.edm_sigma(625)) - 2.5) < 0.01


def test_sim_preset_resolves_as_documented_and_explicit_flags_win(tmp_path: Path) -> None:
    script = _load("sdxl_sim")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)]
    for name, want in PRESET_VALUES.items():
        args = script.parse_args([*argv, "--preset", name])
        assert {k: getattr(args, k) for k in want} == want, name
        assert args.preset == name and set(args.preset_set.split(",")) == set(script.PRESETS[name])
    dmd2 = script.parse_args([*argv, "--preset", "dmd2"])
    assert (dmd2.adam_weight_decay, dmd2.learning_rate, dmd2.max_grad_norm) == (0.01, 5e-7, 10.0)  # full
    assert script.parse_args([*argv, "--preset", "dmd2", "--use_lora"]).learning_rate == 5e-5
    sid = script.parse_args([*argv, "--preset", "sid"])
    assert (sid.adam_weight_decay, sid.learning_rate, sid.max_grad_norm) == (0.0, 1e-6, 1.0)  # shared clip
    # the papers' full-UNet rate; a LoRA takes DMD2's SDXL LoRA rate (our choice, audit 11)
    for name in ("sim", "sid"):
        assert script.parse_args([*argv, "--preset", name]).learning_rate == 1e-6
        assert script.parse_args([*argv, "--preset", name, "--use_lora"]).learning_rate == 5e-5
    with pytest.raises(ValueError, match=r"--fake_timestep_range LOW HIGH with 0 <= LOW <= HIGH <= 999"):
        script.parse_args([*argv, "--preset", "sid", "--fake_timestep_range", "20", "1500"])
    # No preset: the --loss's recipe; neither: SIM's.
    assert script.parse_args([*argv, "--loss", "dmd"]).preset == "dmd2"
    assert script.parse_args([*argv, "--loss", "sid"]).guidance_scale == 2.0
    plain = script.parse_args(argv)
    assert (plain.preset, plain.loss, plain.adam_beta1) == ("sim", "sim", 0.0)
    # Explicit flags win over the preset, equal to a fallback default or not.
    flags = ["--guidance_scale", "3", "--generator_every", "2", "--adam_beta1", "0.5", "--adam_beta2", "0.9"]
    flags += ["--generator_timestep", "999", "--generator_input", "noised"]
    flags += [
        "--adam_weight_decay",
        "0",
        "--learning_rate",
        "1e-4",
        "--max_grad_norm",
        "1.0",
        "--loss",
        "sim",
    ]
    args = script.parse_args([*argv, "--preset", "dmd2", *flags])
    assert (args.guidance_scale, args.generator_every, args.adam_beta1, args.adam_beta2) == (3.0, 2, 0.5, 0.9)
    assert (args.generator_timestep, args.generator_input) == (999, "noised")
    assert (args.adam_weight_decay, args.learning_rate, args.max_grad_norm, args.loss) == (
        0.0,
        1e-4,
        1.0,
        "sim",
    )
    assert args.preset_set == ""
    args = script.parse_args([*argv, "--preset", "sid", "--adam_beta1", "0.9"])
    assert (args.adam_beta1, args.adam_beta2, args.loss) == (0.9, 0.999, "sid")
    # The SIM loss options.
    assert (plain.sim_c, plain.sim_detach_dprime) == (None, False)
    args = script.parse_args([*argv, "--sim_c", "0.03", "--sim_detach_dprime"])
    assert (args.sim_c, args.sim_detach_dprime) == (0.03, True)
    with pytest.raises(ValueError, match=r"--sim_c > 0"):
        script.parse_args([*argv, "--sim_c", "0"])
    with pytest.raises(ValueError, match=r"needs --sim_distance pseudo_huber"):
        script.parse_args([*argv, "--sim_c", "0.1", "--sim_distance", "l2"])


def test_sim_run_passes_the_preset_and_sim_options(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load("sdxl_sim")
    calls: list[dict[str, Any]] = []
    sim_loss = script.sim_loss

    def recording_sim_loss(x, real, fake, **kw):  # type: ignore[no-untyped-def]
        calls.append({"guidance_scale": real.guidance_scale, "c": kw["c"], "detach": kw["detach_dprime"]})
        return sim_loss(x, real, fake, **kw)

    optimizers = record_optimisers(monkeypatch)
    monkeypatch.setattr(script, "sim_loss", recording_sim_loss)
    inputs: list[tuple[int, str]] = []
    one_step_input = script.validation.one_step_input

    def recording_one_step_input(schedule, z, timestep, generator_input="noise"):  # type: ignore[no-untyped-def]
        inputs.append((timestep, generator_input))
        return one_step_input(schedule, z, timestep, generator_input)

    monkeypatch.setattr(script.validation, "one_step_input", recording_one_step_input)
    out = tmp_path / "out"
    argv = _set(_common_argv(tiny_sdxl, out, lora=True), "--max_train_steps", "1")
    argv += ["--prompts_file", str(tiny_sdxl["prompts"]), "--preset", "sim", "--guidance_scale", "3"]
    argv += ["--sim_c", "0.05", "--sim_detach_dprime"]
    script.main(script.parse_args(argv))
    assert calls == [{"guidance_scale": 3.0, "c": 0.05, "detach": True}]
    # the preset's generator input in training and in the validation grid, and saved for evaluate.py
    assert inputs and set(inputs) == {(625, "noised")}
    assert json.loads((out / "student_timesteps.json").read_text()) == [625]
    assert (
        json.loads((out / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"]
        == "trailing"
    )
    assert json.loads((out / "student_sampler.json").read_text())["guidance_scale"] == 1.0
    # Generator and fake score: the sim preset's Adam (SiD's beta1 = 0), the explicit learning rate.
    assert [o.param_groups[0]["betas"] for o in optimizers] == [(0.0, 0.999), (0.0, 0.999)]
    assert [o.param_groups[0]["lr"] for o in optimizers] == [1e-3, 1e-3]


def test_sid_preset_is_sid_lsg_stable_diffusion_run(tmp_path: Path) -> None:
    # SiD-LSG (arXiv:2406.01561, run_sid.sh): alpha 1, guided fake score (kappa1 = kappa2 = kappa3 = 2), the
    # fake score's timesteps from torch.randint(20, 980). The other recipes keep an unguided fake score on
    # every timestep and SiD's EDM alpha 1.2.
    script = _load("sdxl_sim")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)]
    sid = script.parse_args([*argv, "--preset", "sid"])
    assert (sid.sid_alpha, sid.fake_guidance_scale, sid.fake_timestep_range) == (1.0, 2.0, (20, 979))
    assert sid.loss_timestep_range == (20, 979)  # the generator loss's t ~ torch.randint(20, 980) too
    for name in ("sim", "dmd2"):
        args = script.parse_args([*argv, "--preset", name])
        assert (args.sid_alpha, args.fake_guidance_scale, args.fake_timestep_range) == (1.2, 1.0, None), name
        assert args.loss_timestep_range is None, name  # the losses' own [0.02T, 0.98T] (DMD2's)
    flags = ["--sid_alpha", "1.2", "--fake_guidance_scale", "1", "--fake_timestep_range", "0", "999"]
    args = script.parse_args([*argv, "--preset", "sid", *flags])
    assert (args.sid_alpha, args.fake_guidance_scale, args.fake_timestep_range) == (1.2, 1.0, (0, 999))
    assert {"sid_alpha", "fake_guidance_scale", "fake_timestep_range"}.isdisjoint(args.preset_set.split(","))
    with pytest.raises(ValueError, match=r"--fake_timestep_range LOW HIGH with 0 <= LOW <= HIGH"):
        script.parse_args([*argv, "--fake_timestep_range", "980", "20"])
    with pytest.raises(ValueError, match=r"--loss_timestep_range LOW HIGH with 0 <= LOW <= HIGH"):
        script.parse_args([*argv, "--loss_timestep_range", "-1", "20"])


def test_sid_run_guides_the_fake_score_and_draws_its_timesteps_from_20_to_979(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffdistill.schedulers import TeacherSolver

    script = _load("sdxl_sim")
    gen_calls: list[dict[str, Any]] = []
    fake_calls: list[dict[str, Any]] = []
    fake_t: list[torch.Tensor] = []
    sid_loss, fake_score_loss = script.sid_loss, script.fake_score_loss

    def recording_sid_loss(x, real, fake, **kw):  # type: ignore[no-untyped-def]
        gen_calls.append(
            {
                "alpha": kw["alpha"],
                "real": real.guidance_scale,
                "fake": fake.guidance_scale,
                "fake_uncond": kw["fake_uncond"] is not None,
                "t_range": kw["t_range"],
            }
        )
        return sid_loss(x, real, fake, **kw)

    def recording_fake_score_loss(fake, x, **kw):  # type: ignore[no-untyped-def]
        fake_calls.append(
            {"fake": fake.guidance_scale, "uncond": kw["uncond"] is not None, "t": kw["t_range"]}
        )

        def model(x_t, t, **cond):  # type: ignore[no-untyped-def]
            fake_t.append(t.detach().cpu())
            return fake.model(x_t, t, **cond)

        solver = TeacherSolver(model, fake.schedule, guidance_scale=fake.guidance_scale)
        return fake_score_loss(solver, x, **kw)

    monkeypatch.setattr(script, "sid_loss", recording_sid_loss)
    monkeypatch.setattr(script, "fake_score_loss", recording_fake_score_loss)
    argv = _common_argv(tiny_sdxl, tmp_path / "out", lora=True)
    script.main(script.parse_args([*argv, "--prompts_file", str(tiny_sdxl["prompts"]), "--preset", "sid"]))
    assert (
        gen_calls == [{"alpha": 1.0, "real": 2.0, "fake": 2.0, "fake_uncond": True, "t_range": (20, 979)}] * 2
    )
    assert fake_calls == [{"fake": 2.0, "uncond": True, "t": (20, 979)}] * 2
    # Guided: one call on the conditional and unconditional halves (batch 2 each) per fake update.
    assert [t.shape for t in fake_t] == [(4,), (4,)]
    ts = torch.cat(fake_t)
    assert bool(((ts >= 20) & (ts <= 979)).all())


def test_sid_preset_smoke_resumes(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--preset", "sid", "--learning_rate", "1e-3"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_sim",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra],
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra],
        out_a,
    )
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)


# ----------------------------------------------------------------------------------------------- Diffusion2GAN
def _d2g_argv(tiny: dict[str, Path], tmp_path: Path, pairs: Path) -> list[str]:
    argv = [*_common_argv(tiny, tmp_path / "out", lora=True), "--prompts_file", str(tiny["prompts"])]
    argv += ["--pairs_dir", str(pairs), "--num_pairs", "3", "--pairs_shard_size", "2", "--teacher_steps", "1"]
    return [*argv, "--lpips_weights", "random"]


def test_diffusion2gan_rejects_train_data_dir_and_requires_lpips_weights(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    script = _load("sdxl_diffusion2gan")
    argv = _d2g_argv(tiny_sdxl, tmp_path, tmp_path / "pairs")
    with pytest.raises(ValueError, match=r"reads no images, so --train_data_dir would be ignored: drop it"):
        script.parse_args([*argv, "--train_data_dir", str(tiny_sdxl["images"])])
    no_weights = argv[: argv.index("--lpips_weights")]
    with pytest.raises(ValueError, match=r"Expected --lpips_weights.*--lpips_weights random"):
        script.parse_args(no_weights)
    with pytest.raises(
        ValueError, match=r"--lpips_weights w.safetensors: .*names no file"
    ):  # read in parse_args
        script.parse_args([*no_weights, "--lpips_weights", "w.safetensors"])
    args = script.parse_args(argv)
    assert args.lpips_weights == "random" and args.pairs_seed == args.seed == 3


def test_diffusion2gan_pair_shards_record_settings_and_stale_ones_are_refused(
    tiny_sdxl: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffdistill.schedulers import NoiseSchedule, TeacherSolver

    script = _load("sdxl_diffusion2gan")
    pairs = tmp_path / "pairs"
    argv = _d2g_argv(tiny_sdxl, tmp_path, pairs)
    args = script.parse_args(argv)
    accelerator = runtime.make_accelerator(args, "test")
    parts = sdxl_models.load_sdxl(args)
    teacher = TeacherSolver(
        parts.unet, NoiseSchedule.from_scheduler(parts.noise_scheduler), guidance_scale=args.guidance_scale
    )
    teacher_pairs.generate_pairs(accelerator, args, parts, teacher)
    shards = sorted(pairs.iterdir())
    assert [p.name for p in shards] == ["pairs-00000.safetensors", "pairs-00001.safetensors"]
    with safe_open(str(shards[0]), framework="pt") as f:
        stored = json.loads(f.metadata()["settings"])
    assert stored == teacher_pairs.pair_settings(args)
    assert stored["teacher"] == str(tiny_sdxl["model"].resolve())
    assert (stored["guidance_scale"], stored["teacher_steps"], stored["resolution"]) == (7.0, 1, 128)
    assert (stored["pairs_seed"], stored["pairs_shard_size"], stored["uncond"]) == (3, 2, "zeros")
    # The same settings reuse the shards as they are (nothing rewritten).
    mtimes = [p.stat().st_mtime_ns for p in shards]
    teacher_pairs.generate_pairs(accelerator, args, parts, teacher)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    # Another training seed with the shards' --pairs_seed reuses them too.
    teacher_pairs.check_pairs(script.parse_args([*_set(argv, "--seed", "5"), "--pairs_seed", "3"]))

    def refused(argv_b: list[str], pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern):
            script.main(script.parse_args(argv_b))  # refused before any model loads

    fix = r"Pass a new --pairs_dir .* or run with the settings the shards were made with"
    caplog.set_level(logging.WARNING, logger="sdxl_diffusion2gan")
    refused(
        [*argv, "--guidance_scale", "5"],
        rf"pairs-00000.safetensors was made with guidance_scale=7.0 and this run asks for guidance_scale=5.0: "
        rf"reusing it would train on stale pairs. {fix} \(--guidance_scale 7.0\)",
    )
    assert "RANDOMLY INITIALISED" in caplog.text  # --lpips_weights random warns loudly
    refused(_set(argv, "--teacher_steps", "2"), r"teacher_steps=1 .* teacher_steps=2.*\(--teacher_steps 1\)")
    refused(_set(argv, "--resolution", "64"), r"resolution=128 .* resolution=64.*\(--resolution 128\)")
    refused(_set(argv, "--seed", "4"), r"pairs_seed=3 .* pairs_seed=4.*\(--pairs_seed 3\)")
    refused([*argv, "--uncond", "empty_prompt"], r"uncond='zeros' .* uncond='empty_prompt'")
    other_prompts = tmp_path / "other_prompts.txt"
    other_prompts.write_text("a different prompt\n")
    refused(
        _set(argv, "--prompts_file", str(other_prompts)),
        r"made with prompts_sha256=.*\(the prompts of --prompts_file "
        + re.escape(f"{tiny_sdxl['prompts'].resolve()} as they were then)"),
    )
    refused(
        _set(argv, "--pairs_shard_size", "3"),
        r"pairs_shard_size=2 .* pairs_shard_size=3",
    )
    other_model = tmp_path / "model_copy"
    other_model.symlink_to(tiny_sdxl["model"], target_is_directory=True)  # resolves to the same teacher
    teacher_pairs.check_pairs(
        script.parse_args(_set(argv, "--pretrained_model_name_or_path", str(other_model)))
    )
    refused(
        [*argv, "--variant", "fp16"], r"variant=None and this run asks for variant='fp16'.*\(no --variant\)"
    )
    # More pairs: the short last shard is refused (the first still matches).
    refused(_set(argv, "--num_pairs", "4"), r"pairs-00001.safetensors to hold 2 pairs .* but it holds 1")
    # A shard whose prompts were drawn with replacement (before data_sources.covering_prompts): refused.
    tensors = load_file(str(shards[0]))
    with safe_open(str(shards[0]), framework="pt") as f:
        prompts = f.metadata()["prompts"]
    older = {k: v for k, v in stored.items() if k != "prompt_draw"}
    save_file(tensors, str(shards[0]), metadata={"prompts": prompts, "settings": json.dumps(older)})
    refused(
        argv, r"use every prompt once per N pairs .* drew the prompts with replacement \(prompt_draw=None\)"
    )
    # A shard without recorded settings (an older version of the script) cannot be checked: refused.
    save_file(tensors, str(shards[0]), metadata={"prompts": prompts})
    refused(argv, r"record the settings it was made with, but it has none .*older version")
