"""DMD2's 1-step SDXL recipe: an ODE-pair regression run, then DMD2 from it (``sdxl_sim.py --preset dmd2-1step``).

DMD2 (Yin et al. 2024, arXiv:2405.14867; tianweiy/DMD2 ``experiments/sdxl/README.md``): "For 1-step model, we need
an extra regression loss pretraining" (``main/train_sd_ode.py``, conditioning timestep 399), whose checkpoint the
DMD2 run loads as its generator (``--generator_ckpt_path``) while the real and fake scores start from the teacher.
Here the regression run is ``sdxl_diffusion2gan.py --gan_weight 0`` (no discriminator) and the DMD2 run starts its
generator with ``--init_unet`` / ``--init_lora``. The start is checked by running the DMD2 stage at a learning rate
so small (1e-30) that its one step cannot move a float32 weight of the tiny pipeline: its output then IS its start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.examples.example_modules import load_example
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# A step of AdamW at this rate moves a weight by about 1e-30 (Adam's normalised step; weight decay 0.01 x 1e-30):
# below float32's resolution of every nonzero weight of the tiny UNet, so the output equals the start to atol 1e-20.
FROZEN_LR = "1e-30"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_sdxl_dmd2_1step")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nan astronaut riding a horse\n")
    return {"model": save_tiny_sdxl_pipeline(root / "model", seed=0), "prompts": prompts, "root": root}


def _argv(tiny: dict[str, Path], out: Path, *extra: str, lr: str = "1e-3") -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(tiny["model"]), "--output_dir", str(out)]
    argv += ["--prompts_file", str(tiny["prompts"]), "--resolution", "128", "--train_batch_size", "2"]
    argv += ["--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "none", "--seed", "3"]
    return [*argv, "--learning_rate", lr, *extra]


def _regression_run(tiny: dict[str, Path], out: Path, *extra: str) -> Path:
    """``sdxl_diffusion2gan.py --gan_weight 0 --generator_timestep 399`` (DMD2's ODE pretraining), 2 steps."""
    script = load_example("sdxl_diffusion2gan")
    argv = _argv(tiny, out, "--gan_weight", "0", "--generator_timestep", "399", "--lpips_weights", "random")
    argv += ["--pairs_dir", str(tiny["root"] / "pairs"), "--num_pairs", "4", "--pairs_shard_size", "2"]
    script.main(script.parse_args([*argv, "--teacher_steps", "2", *extra]))
    return out


def _unet_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder)).state_dict()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_regression_only_then_dmd2_one_step_from_its_full_unet(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ode = _regression_run(tiny, tmp_path / "ode")
    # no discriminator: the checkpoints hold the generator alone (accelerate numbers a second model model_1)
    assert sorted(p.name for p in (ode / "checkpoint-1").glob("model*.safetensors")) == ["model.safetensors"]
    assert json.loads((ode / "student_timesteps.json").read_text()) == [399]
    regressed = _unet_state(ode / "unet")
    teacher = _unet_state(tiny["model"] / "unet")
    assert _max_difference(regressed, teacher) > 1e-6, "the regression run did not train"

    script = load_example("sdxl_sim")
    argv = _argv(
        tiny, tmp_path / "dmd2", "--preset", "dmd2-1step", "--init_unet", str(ode / "unet"), lr=FROZEN_LR
    )
    args = script.parse_args([*argv, "--max_train_steps", "1"])
    assert (args.loss, args.generator_timestep, args.generator_input, args.guidance_scale) == (
        "dmd",
        399,
        "noise",
        8.0,
    )
    script.main(args)
    out = tmp_path / "dmd2"
    # the generator started from the regression run's UNet, the fake score from the teacher's
    assert _max_difference(_unet_state(out / "unet"), regressed) < 1e-20
    fake = load_file(str(out / "checkpoint-1" / "model_1.safetensors"))
    assert _max_difference(fake, {k: teacher[k] for k in fake}) < 1e-20
    assert json.loads((out / "student_timesteps.json").read_text()) == [399]


@pytest.mark.parametrize("shared_base", [False, True], ids=["copies", "shared_base"])
def test_dmd2_one_step_starts_the_generator_lora_from_the_regression_lora(
    tiny: dict[str, Path], tmp_path: Path, shared_base: bool
) -> None:
    from safetensors.torch import load_file

    lora = ["--use_lora", "--lora_rank", "4", *(["--shared_base"] * shared_base)]
    ode = _regression_run(tiny, tmp_path / "ode", *lora)
    if shared_base:  # one adapter on the shared base: the discriminator's is not built either
        assert sorted(p.name for p in (ode / "checkpoint-1").glob("*.safetensors")) == [
            "unet_lora.safetensors"
        ]
    start = load_file(str(ode / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in start.items() if "lora_B" in k), (
        "the regression LoRA is zero"
    )

    script = load_example("sdxl_sim")
    init = ["--init_lora", str(ode / "pytorch_lora_weights.safetensors")]
    argv = _argv(tiny, tmp_path / "dmd2", "--preset", "dmd2-1step", *lora, *init, lr=FROZEN_LR)
    script.main(script.parse_args([*argv, "--max_train_steps", "1"]))
    released = load_file(str(tmp_path / "dmd2" / "pytorch_lora_weights.safetensors"))
    assert _max_difference(released, start) < 1e-20
    # the fake score's LoRA starts fresh (its B is zero), not from the regression run's
    fake = load_file(str(tmp_path / "dmd2" / "checkpoint-1" / "fake_lora.safetensors"))
    assert all(float(v.abs().max()) < 1e-20 for k, v in fake.items() if "lora_B" in k)


def test_init_options_are_checked(tiny: dict[str, Path], tmp_path: Path) -> None:
    script = load_example("sdxl_sim")
    base = _argv(tiny, tmp_path / "o")
    with pytest.raises(
        ValueError,
        match=r"--preset dmd2-1step starts the generator from an ODE-pair regression .* "
        r"--gan_weight 0 --generator_timestep 399 .* use --preset dmd2",
    ):
        script.parse_args([*base, "--preset", "dmd2-1step"])
    unet_dir = tmp_path / "run" / "unet"
    unet_dir.mkdir(parents=True)
    (unet_dir / "config.json").write_text("{}")
    lora_file = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    lora_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"Expected one of --init_unet .* and --init_lora .* but got both"):
        script.parse_args([*base, "--use_lora", "--init_unet", str(unet_dir), "--init_lora", str(lora_file)])
    with pytest.raises(
        ValueError, match=r"--init_unet starts a full-UNet generator, but --use_lora .* --init_lora"
    ):
        script.parse_args([*base, "--use_lora", "--init_unet", str(unet_dir)])
    with pytest.raises(ValueError, match="--init_lora starts the generator's LoRA: it needs --use_lora"):
        script.parse_args([*base, "--init_lora", str(lora_file)])
    with pytest.raises(ValueError, match="not a UNet folder"):
        script.parse_args([*base, "--init_unet", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--init_lora .*: no such file"):
        script.parse_args([*base, "--use_lora", "--init_lora", str(tmp_path / "missing.safetensors")])
    # a pipeline's unet/ (its scheduler/ is the pipeline's: SDXL-base's "leading") is not a one-step record
    (tmp_path / "run" / "scheduler").mkdir()
    (tmp_path / "run" / "scheduler" / "scheduler_config.json").write_text('{"timestep_spacing": "leading"}')
    assert (
        script.parse_args([*base, "--preset", "sim", "--init_unet", str(unet_dir)]).generator_input
        == "noised"
    )
    # a start trained for another timestep or input (the run folder's one-step sampler record) is refused
    (tmp_path / "run" / "student_timesteps.json").write_text("[399]\n")
    with pytest.raises(
        ValueError, match=r"trained as a one-step generator at t = \[399\] .* --generator_timestep 999"
    ):
        script.parse_args([*base, "--preset", "dmd2", "--init_unet", str(unet_dir)])
    with pytest.raises(ValueError, match=r"trained on the 'noise' input .* --generator_input noised"):
        script.parse_args(
            [*base, "--preset", "sim", "--generator_timestep", "399", "--init_unet", str(unet_dir)]
        )
    args = script.parse_args([*base, "--preset", "dmd2-1step", "--init_unet", str(unet_dir)])
    assert (args.generator_timestep, args.init_unet) == (399, str(unet_dir))


def test_regression_only_refuses_discriminator_options(tiny: dict[str, Path], tmp_path: Path) -> None:
    script = load_example("sdxl_diffusion2gan")
    base = [*_argv(tiny, tmp_path / "o"), "--lpips_weights", "random", "--gan_weight", "0"]
    for flag in (
        ["--r1_gamma", "1"],
        ["--r1_every", "4"],
        ["--discriminator_learning_rate", "1e-4"],
        ["--r1_approximate_sigma", "0.1"],
        ["--no_mix_and_match"],
    ):
        with pytest.raises(
            ValueError, match=f"--gan_weight 0 .* builds no discriminator, so {flag[0]} would be ignored"
        ):
            script.parse_args([*base, *flag])
    assert script.parse_args(base).r1_gamma == 0.0
    # a GAN run cannot resume a regression-only checkpoint (it has no discriminator): refused before any model loads
    ckpt = tmp_path / "o" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "step.json").write_text(json.dumps({"step": 1, "options": {"gan_weight": 0.0}}))
    resume = [*base[:-2], "--resume_from_checkpoint", "latest"]
    with pytest.raises(
        ValueError, match=r"saved by a regression-only run \(--gan_weight 0\): it holds no discrim"
    ):
        script.parse_args(resume)
    assert script.parse_args([*resume, "--gan_weight", "0"]).gan_weight == 0.0
    assert script.parse_args([*base[:-2], "--gan_weight", "0.5"]).r1_gamma == 1.0  # the default with a GAN
