"""Tests of ``examples/evaluate.py`` on the output folders of the training scripts (tiny random-weight pipelines).

Checked: a folder holding ``unet_merged/`` is evaluated as that UNet, not as the LoRA beside it fused into the
pipeline's UNet; a LoRA trained on another UNet is refused unless ``--lora_base`` names it, and with it samples as
diffusers samples that UNet with the LoRA; a run's saved ``scheduler/``, ``student_sigmas.json`` and
``student_grid.json`` are used unless options say otherwise, and the record names each source; the guidance the
pipeline ran with is recorded (a student with the pipeline's CFG default is warned about); out-of-range values and
path typos are refused by ``parse_args``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples import tiny_metrics
from tests.examples.example_modules import load_example, load_script
from tests.examples.tiny_flow import save_tiny_flux_pipeline
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

PROMPTS = ["a cat", "a red car"]
# The script writes round(255 x) of the same float32 computation diffusers does here: half a uint8 level apart.
PNG_TOLERANCE = 0.5 / 255 + 1e-6


evaluate = load_script("evaluate")
generation = load_example("evaluation.generation")
scoring = load_example("evaluation.scoring")
student_sampler = load_example("training.student_sampler")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("student_folders")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"sdxl": save_tiny_sdxl_pipeline(root / "sdxl"), "prompts": root / "prompts.txt", "root": root}


def _argv(tiny: dict[str, Path], out: Path, *extra: str, model: str = "sdxl") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny[model]), "--prompts_file", str(tiny["prompts"]),
        "--resolution", "64", "--num_prompts", "1", "--output_dir", str(out), "--seed", "3", *extra,
    ]  # fmt: skip


def _run(argv: list[str]) -> dict[str, Any]:
    return evaluate.main(evaluate.parse_args(argv), metrics={"clip_score": tiny_metrics.tiny_clip_score()})


def _diffusers_image(pipe: Any, **kwargs: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gen = [torch.Generator().manual_seed(3)]
    return pipe(PROMPTS[:1], generator=gen, height=64, width=64, output_type="pt", **kwargs).images.float()


def _unet(tiny: dict[str, Path], flip: float | None = None) -> Any:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet")
    if flip is not None:
        with torch.no_grad():
            unet.conv_out.weight.mul_(flip)
    return unet


def test_merged_unet_is_evaluated_not_the_lora_beside_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    """SDXL-Lightning's LoRA stage folder: the LoRA (trained on the stage's --init_unet) and unet_merged/."""
    from diffusers import StableDiffusionXLPipeline

    run = tmp_path / "l-8u"
    _unet(tiny, -1.5).save_pretrained(run / "unet_merged")
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"fusing this would fail")
    assert generation.resolve_student(run, "unet") == ("denoiser", run / "unet_merged")
    record = _run(_argv(tiny, tmp_path / "eval", "--student_weights", str(run), "--guidance_scale", "0",
                        "--num_inference_steps", "2"))  # fmt: skip
    student = record["protocol"]["generator"]["student_weights"]
    assert student["kind"] == "denoiser" and student["loaded"] == str(run / "unet_merged")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    pipe.unet = _unet(tiny, -1.5)
    want = _diffusers_image(pipe, num_inference_steps=2, guidance_scale=0.0)
    got = scoring.load_image(tmp_path / "eval" / "images" / "000000.png").unsqueeze(0)
    assert (got - want).abs().max() <= PNG_TOLERANCE


def _lora_file(tiny: dict[str, Path], folder: Path, base_unet: str | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffdistill.students import add_lora, save_lora

    unet = add_lora(_unet(tiny), rank=2)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    folder.mkdir(parents=True)
    path = folder / "pytorch_lora_weights.safetensors"
    save_lora(unet, path)
    if base_unet is not None:  # what a training script started from --init_unet records
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        save_file(load_file(str(path)), str(path), metadata={**meta, generation.LORA_BASE_KEY: base_unet})
    return path


def test_lora_trained_on_another_unet_needs_lora_base(tiny: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    base = tmp_path / "l-32" / "unet_merged"
    _unet(tiny, -1.5).save_pretrained(base)
    lora = _lora_file(tiny, tmp_path / "recorded", base_unet=str(base))
    argv = _argv(tiny, tmp_path / "eval", "--student_weights", str(lora.parent), "--guidance_scale", "0")
    with pytest.raises(ValueError, match=r"records base_unet=.*l-32/unet_merged.*Pass --lora_base"):
        _run(argv)
    with pytest.raises(ValueError, match="records base_unet"):
        _run([*argv, "--lora_base", str(tiny["sdxl"] / "unet")])
    record = _run([*argv, "--lora_base", str(base), "--output_dir", str(tmp_path / "based")])
    assert record["protocol"]["generator"]["student_weights"]["lora_base"] == str(base)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    pipe.unet = _unet(tiny, -1.5)
    pipe.load_lora_weights(str(lora.parent))
    pipe.fuse_lora(lora_scale=1.0)
    want = _diffusers_image(pipe, num_inference_steps=4, guidance_scale=0.0)
    got = scoring.load_image(tmp_path / "based" / "images" / "000000.png").unsqueeze(0)
    assert (got - want).abs().max() <= PNG_TOLERANCE

    # a Lightning conditional stage (not merged): its discriminator record names the stage
    for stage, refused in (("32->8/conditional", True), ("128->32/mse", False)):
        run = tmp_path / stage.replace("/", "_").replace("->", "-")
        _lora_file(tiny, run)
        (run / "discriminator").mkdir()
        (run / "discriminator" / "discriminator.json").write_text(json.dumps({"stage": stage}))
        args = evaluate.parse_args(_argv(tiny, tmp_path / "x", "--student_weights", str(run)))
        path = run / "pytorch_lora_weights.safetensors"
        if refused:
            with pytest.raises(ValueError, match=r"SDXL-Lightning stage '32->8/conditional'.*--lora_base"):
                generation.check_lora_base(path, args)
        else:
            generation.check_lora_base(path, args)


def test_saved_scheduler_is_used_and_the_guidance_recorded(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A Lightning x0 stage folder: unet/ and scheduler/ (prediction_type=sample); no --guidance_scale."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    run = tmp_path / "l-1"
    _unet(tiny, 0.5).save_pretrained(run / "unet")
    config = EulerDiscreteScheduler.load_config(tiny["sdxl"], subfolder="scheduler")
    EulerDiscreteScheduler.from_config(
        config, timestep_spacing="trailing", prediction_type="sample"
    ).save_pretrained(run / "scheduler")
    argv = _argv(tiny, tmp_path / "eval", "--student_weights", str(run), "--num_inference_steps", "1")
    with pytest.warns(UserWarning, match="default guidance_scale 5.0"):
        record = _run(argv)
    generator = record["protocol"]["generator"]
    assert generator["guidance_scale"] == 5.0 and generator["scheduler"] == "EulerDiscreteScheduler"
    assert generator["sampler_sources"] == {
        "scheduler": str(run / "scheduler"),
        "steps": "--num_inference_steps",
        "guidance_scale": "pipeline default",
    }
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    pipe.unet = _unet(tiny, 0.5)
    pipe.scheduler = EulerDiscreteScheduler.from_pretrained(run, subfolder="scheduler")
    want = _diffusers_image(pipe, num_inference_steps=1)
    got = scoring.load_image(tmp_path / "eval" / "images" / "000000.png").unsqueeze(0)
    assert (got - want).abs().max() <= PNG_TOLERANCE
    # options win over the folder; the teacher gets no warning
    with pytest.warns(UserWarning, match="saves no grid"):
        evaluate.parse_args(argv[:-2])  # no steps: the folder's scheduler/ at the default 4 steps
    args = evaluate.parse_args([*argv, "--scheduler_config", "timestep_spacing=leading"])
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    assert (
        pipe.scheduler.config.prediction_type == "epsilon"
        and pipe.scheduler.config.timestep_spacing == "leading"
    )
    args = evaluate.parse_args(_argv(tiny, tmp_path / "teacher", "--teacher"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generation.sampler_record(pipe, args)["sampler_sources"]["scheduler"] == "pipeline"


def test_sdxl_run_folder_gives_its_trained_size(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An SDXL script's folder records its trained size (``checkpoints.save_unet``: ``student_sampler.json`` with
    the size alone, audit 17): generated at it by default, a warning and both sizes recorded at another."""
    import types

    run = tmp_path / "l-1"
    _unet(tiny, 0.5).save_pretrained(run / "unet")
    record_file = student_sampler.write_size_record(types.SimpleNamespace(resolution=64), run)
    assert json.loads(record_file.read_text()) == {"height": 64, "width": 64, "num_frames": None}
    argv = _argv(tiny, tmp_path / "e", "--student_weights", str(run), "--num_inference_steps", "1",
                 "--guidance_scale", "0")  # fmt: skip
    at = argv.index("--resolution")
    args = evaluate.parse_args(argv[:at] + argv[at + 2 :])
    assert (args.resolution, args.width) == (64, 64)
    assert args.saved_sampler["sources"]["size"] == str(record_file)
    assert "guidance_scale" not in args.saved_sampler["sources"] or args.guidance_scale == 0  # the option's
    args = evaluate.parse_args([*argv[:at], "--resolution", "72", *argv[at + 2 :]])
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    with pytest.warns(
        UserWarning, match=r"trained at 64 x 64 .* generated at 72 x 72\. Pass --resolution 64"
    ):
        generator = generation.sampler_record(pipe, args)
    assert generator["trained_size"] == [64, 64] and generator["resolution"] == 72


@pytest.mark.parametrize("generator_input", ["noise", "noised"])
def test_sdxl_one_step_run_folder_samples_as_its_validation(
    tiny: dict[str, Path], tmp_path: Path, generator_input: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """sdxl_sim / sdxl_diffusion2gan save their one-step sampler (``write_one_step_sampler``: ``scheduler/``,
    ``student_timesteps.json``, guidance 1): evaluate.py's pipeline then feeds the UNet the state the script's
    validation feeds (``z`` or ``sigma_t z``, SiD's input) at ``--generator_timestep`` and returns its x0
    prediction (``validation.one_step_x0``), unguided, every setting named by its file."""
    import types

    from diffusers import DDPMScheduler

    from diffdistill.schedulers import NoiseSchedule

    validation = load_example("training.validation")
    run = tmp_path / "sim"
    _unet(tiny, 0.5).save_pretrained(run / "unet")
    student_sampler.write_size_record(types.SimpleNamespace(resolution=64), run)
    noise_scheduler = DDPMScheduler.from_pretrained(tiny["sdxl"], subfolder="scheduler")
    run_args = types.SimpleNamespace(generator_input=generator_input, generator_timestep=625)
    student_sampler.write_one_step_sampler(run_args, run, noise_scheduler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = evaluate.parse_args(_argv(tiny, tmp_path / "e", "--student_weights", str(run)))
        pipe = generation.load_pipeline(args, "cpu", torch.float32)
        generator = generation.sampler_record(pipe, args)
    assert not [w for w in caught if "guidance" in str(w.message)], [str(w.message) for w in caught]
    assert generator["timesteps"] == [625] and generator["guidance_scale"] == 1.0
    assert generator["timestep_spacing"] == ("trailing" if generator_input == "noised" else "leading")
    assert generator["sampler_sources"] == {
        "scheduler": str(run / "scheduler"),
        "steps": str(run / "student_timesteps.json"),
        "guidance_scale": str(run / "student_sampler.json"),
    }
    seen: dict[str, Any] = {}

    def record_inputs(module: Any, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update(sample=inputs[0].clone(), t=inputs[1], kwargs=kwargs)

    pipe.unet.register_forward_pre_hook(record_inputs, with_kwargs=True)
    gen = [torch.Generator().manual_seed(3)]
    with torch.no_grad():
        got = pipe(
            PROMPTS[:1], generator=gen, output_type="latent", **generation.call_kwargs(args, pipe)
        ).images
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    schedule = NoiseSchedule.from_scheduler(noise_scheduler)
    fed = validation.one_step_input(schedule, z, 625, generator_input)
    scale = (
        float(schedule.sigma(625)) if generator_input == "noised" else 1.0
    )  # sqrt(1 - alphabar_625) = 0.93
    torch.testing.assert_close(fed, scale * z)
    # float32 arithmetic on values of size ~3 (the pipeline scales z by sigma_t or sqrt(sigma_t^2 + 1) and back)
    torch.testing.assert_close(seen["sample"], fed, rtol=1e-5, atol=1e-5)
    assert float(seen["t"]) == 625.0
    cond = {k: seen["kwargs"][k] for k in ("encoder_hidden_states", "added_cond_kwargs")}
    with torch.no_grad():
        want = validation.one_step_x0(pipe.unet, schedule, z, 625, cond, generator_input)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    other = "noise" if generator_input == "noised" else "noised"
    with torch.no_grad():
        wrong = validation.one_step_x0(pipe.unet, schedule, z, 625, cond, other)
    assert (wrong - want).abs().max() > 100 * 1e-5  # the two inputs give visibly different samples
    # another scheduler from the options: the run's timesteps are not used with it, and a warning says why
    with pytest.warns(
        UserWarning, match=r"one-step sampler .* is not used: --scheduler / --scheduler_config"
    ):
        args = evaluate.parse_args(
            _argv(tiny, tmp_path / "e3", "--student_weights", str(run), "--scheduler", "DDIMScheduler")
        )
    assert args.timesteps is None and "timestep_spacing" not in generation.sampler_record(
        generation.load_pipeline(args, "cpu", torch.float32), args
    )
    with pytest.raises(ValueError, match=r"generator_input in \('noise', 'noised'\), but got 'pure'"):
        validation.one_step_input(schedule, z, 625, "pure")
    (run / "student_timesteps.json").write_text(json.dumps([625.5]))
    with pytest.raises(SystemExit):
        evaluate.parse_args(_argv(tiny, tmp_path / "e2", "--student_weights", str(run)))
    err = capsys.readouterr().err
    assert "student_timesteps.json to hold the student's timesteps (a list of integers)" in err
    assert "but it holds [625.5]. Pass --timesteps instead." in err


def test_flow_run_folders_give_their_sigmas(tiny: dict[str, Path], tmp_path: Path) -> None:
    """flow_dmd2's scheduler/ + student_sigmas.json; flow_tscd's student_grid.json (sigmas and guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = save_tiny_flux_pipeline(tmp_path / "flux")
    models = {**tiny, "flux": flux}
    dmd2 = tmp_path / "dmd2"
    config = FlowMatchEulerDiscreteScheduler.load_config(flux, subfolder="scheduler")
    FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True
    ).save_pretrained(dmd2 / "scheduler")
    (dmd2 / "student_sigmas.json").write_text(json.dumps([1.0, 0.6]) + "\n")
    shutil.copytree(flux / "transformer", dmd2 / "transformer")
    args = evaluate.parse_args(_argv(models, tmp_path / "e", "--student_weights", str(dmd2), model="flux"))
    assert args.sigmas == [1.0, 0.6] and args.num_inference_steps is None
    record = _run(_argv(models, tmp_path / "e", "--student_weights", str(dmd2), model="flux"))
    generator = record["protocol"]["generator"]
    assert (
        generator["sigmas"] == [1.0, 0.6] and generator["guidance_scale"] == 3.5
    )  # FLUX's default, no warning
    assert generator["sampler_sources"]["steps"] == str(dmd2 / "student_sigmas.json")
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    assert pipe.scheduler.config.stochastic_sampling and pipe.scheduler.config.shift == 1.0
    # --num_inference_steps: the saved grid is not used
    args = evaluate.parse_args(
        _argv(
            models,
            tmp_path / "e2",
            "--student_weights",
            str(dmd2),
            "--num_inference_steps",
            "3",
            model="flux",
        )
    )
    assert args.sigmas is None and args.saved_sampler["sources"]["steps"] == "--num_inference_steps"

    tscd = tmp_path / "tscd"
    shutil.copytree(flux / "transformer", tscd / "transformer")
    grid = {"num_inference_steps": 2, "sigmas": [1.0, 0.8], "pipeline_sigmas": [1.0, 0.5], "guidance": 2.5}
    (tscd / "student_grid.json").write_text(json.dumps(grid))
    args = evaluate.parse_args(_argv(models, tmp_path / "e3", "--student_weights", str(tscd), model="flux"))
    assert args.sigmas == [1.0, 0.5] and args.guidance_scale == 2.5
    assert args.saved_sampler["sources"] == {
        "scheduler": "pipeline",
        "steps": str(tscd / "student_grid.json"),
        "guidance_scale": str(tscd / "student_grid.json"),
    }
    # flow_tscd's saved scheduler/ (no shift): the trained sigmas, not the ones a pipeline's scheduler shifts
    FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False
    ).save_pretrained(tscd / "scheduler")
    args = evaluate.parse_args(_argv(models, tmp_path / "e4", "--student_weights", str(tscd), model="flux"))
    assert args.sigmas == [1.0, 0.8] and args.saved_sampler["sources"]["scheduler"] == str(tscd / "scheduler")
    shutil.rmtree(tscd / "scheduler")
    (tscd / "student_grid.json").write_text(json.dumps({"sigmas": [1.0]}))
    with pytest.raises(SystemExit):
        evaluate.parse_args(_argv(models, tmp_path / "e3", "--student_weights", str(tscd), model="flux"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_prompts", "-3"], "--num_prompts >= 1"),
        (["--num_prompts", "0"], "--num_prompts >= 1"),
        (["--batch_size", "0"], "--batch_size >= 1"),
        (["--eval_batch_size", "0"], "--eval_batch_size >= 1"),
        (["--num_inference_steps", "0"], "--num_inference_steps >= 1"),
        (["--eval_resolution", "0"], "--eval_resolution >= 1"),
        (["--resolution", "1001"], "positive multiple of 8"),
        (["--teacher", "--lora_scale", "0.5"], "--lora_scale / --lora_base apply to a LoRA"),
        (["--lora_scale", "0.5"], "--lora_scale / --lora_base apply to a LoRA"),
        (["--student_weights", "/typo/weights"], "--student_weights /typo/weights: no such path"),
        (["--reference_stats", "/typo.npz"], "--reference_stats /typo.npz: no such file"),
        (["--prompts_file", "/typo.txt"], "--prompts_file /typo.txt: no such file"),
        (["--images", "/typo_dir"], "--images /typo_dir: no such folder"),
        (["--sigmas", "1.0", "0.5", "--num_inference_steps", "2"], "drop --num_inference_steps"),
        (["--sigmas", "1.0", "-0.5"], "--sigmas >= 0"),
        (["--timesteps", "999", "-1"], "--timesteps >= 0"),
        (["--guidance_scale", "-1"], "--guidance_scale >= 0"),
    ],
)
def test_parse_args_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = ["--pretrained_model_name_or_path", "org/model", "--prompts_file", str(tmp_path / "prompts.txt"),
            "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err
