"""Qwen-Image in the flow scripts: ``examples/flow_dmd2.py``, ``flow_ladd.py`` and ``flow_tscd.py`` on a tiny
``QwenImagePipeline`` (:func:`tests.examples.tiny_qwen.save_tiny_qwen_pipeline`), checked against the pipeline.

- the pieces: the prompt conditions are ``encode_prompt``'s (padded to ``--max_sequence_length`` with their mask),
  the denoiser is the packed transformer call the pipeline makes, the guided teacher velocity (CFG 4 with the true-CFG
  renormalisation) is the pipeline's first step, latents decode to the pipeline's image and images encode as its
  img2img pipeline encodes them;
- DMD2: the generator's LoRA in ``QwenImagePipeline`` with the saved scheduler and ``sigmas`` samples as the
  script's DMD2 sampler; with ``--gan_weight`` on captioned images (the VAE path, LADD heads on the mean token);
- LADD: the cached teacher samples are ``QwenImagePipeline(prompt, negative_prompt=" ", true_cfg_scale=4)``'s;
- TSCD: prompt-only with the hybrid distance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.flow_scripts import (  # noqa: F401 (autouse fixture)
    deterministic_runs,
    flow_critics,
    flow_dmd2,
    flow_encoding,
    flow_families,
    flow_kd,
    flow_ladd,
    flow_models,
    flow_options,
    flow_tscd,
    generation,
    sdxl_encoding,
)
from tests.examples.tiny_flow import T5_LENGTH, smoke_argv
from tests.examples.tiny_qwen import IMAGE_SIZE, save_tiny_qwen_pipeline
from tests.examples.tiny_sdxl import write_captioned_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_qwen")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\n\na red bird on a branch\n")
    return {
        "qwen": save_tiny_qwen_pipeline(root / "qwen"),
        "prompts": prompts,
        "images": write_captioned_images(root / "images", ["a cat", "a dog", ""]),
    }


def _argv(tiny: dict[str, Path], out: Path, *extra: str, data: str = "prompts") -> list[str]:
    return smoke_argv(tiny, "qwen", out, "--lora_rank", "4", *extra, data=data)


def _pipeline(tiny: dict[str, Path], cls: Any = None) -> Any:
    from diffusers import QwenImagePipeline

    pipe = (cls or QwenImagePipeline).from_pretrained(str(tiny["qwen"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _parts(tiny: dict[str, Path], tmp_path: Path) -> tuple[Any, Any]:
    args = flow_dmd2.parse_args(_argv(tiny, tmp_path / "unused"))
    return args, flow_models.load_flow(args)


def _run(pipe: Any, noise: torch.Tensor, steps: int, output: str = "latent", **kwargs: Any) -> torch.Tensor:
    """``pipe``'s output (``.images``) from the unpacked ``noise`` at its size (the VAE's factor 8: :data:`IMAGE_SIZE`
    px for 8 x 8 latents), ``kwargs`` the prompt, guidance and the rest."""
    with torch.no_grad():
        return pipe(
            num_inference_steps=steps,
            height=8 * noise.shape[-2],
            width=8 * noise.shape[-1],
            latents=flow_models.pack_latents(noise),
            max_sequence_length=T5_LENGTH,
            output_type=output,
            **kwargs,
        ).images


def _trained(path: Path) -> bool:
    from safetensors.torch import load_file

    return any(v.abs().max() > 0 for k, v in load_file(str(path)).items() if "lora_B" in k)


def test_conditions_denoiser_and_vae_are_the_pipelines(tiny: dict[str, Path], tmp_path: Path) -> None:
    pipe = _pipeline(tiny)
    args, parts = _parts(tiny, tmp_path)
    assert (parts.family, parts.uses_cfg, parts.is_video) == ("qwen", True, False)
    prompts = ["a cat", "a red bird"]
    cond = flow_encoding.conditions(parts, prompts, args, "cpu", torch.float32)
    want, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=T5_LENGTH)
    n = want.shape[1]
    assert cond["encoder_hidden_states"].shape[1] == T5_LENGTH >= n
    # float32's default tolerance: the same encoder on the same tokens, loaded twice
    torch.testing.assert_close(cond["encoder_hidden_states"][:, :n], want)
    assert not cond["encoder_hidden_states"][:, n:].any()  # padding: zeros, masked out
    full_mask = torch.ones(want.shape[:2], dtype=torch.long) if mask is None else mask
    assert torch.equal(cond["encoder_hidden_states_mask"][:, :n], full_mask)
    assert not cond["encoder_hidden_states_mask"][:, n:].any()
    uncond = flow_encoding.uncond_conditions(parts, args, "cpu", torch.float32)
    blank, _ = pipe.encode_prompt([" "], device=torch.device("cpu"), max_sequence_length=T5_LENGTH)
    torch.testing.assert_close(uncond["encoder_hidden_states"][:, : blank.shape[1]], blank)

    # the denoiser: the pipeline's packed call (sigma as the timestep, img_shapes, the mask)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g)
    t = torch.tensor([1000.0, 420.0])
    with torch.no_grad():
        got = flow_models.FlowDenoiser(parts.transformer, "qwen")(x, t, **cond)
        direct = pipe.transformer(
            hidden_states=flow_models.pack_latents(x),
            timestep=t / 1000,
            encoder_hidden_states=want,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
    # the padded text tokens are masked keys: same outputs up to float32 rounding of the longer softmax
    torch.testing.assert_close(flow_models.pack_latents(got), direct, rtol=1e-5, atol=1e-5)

    # the guided teacher velocity at sigma 1 is the pipeline's first step: true CFG 4 against " ", renormalised
    from diffdistill.schedulers import TeacherSolver

    schedule = flow_models.flow_schedule(parts, IMAGE_SIZE)
    teacher = TeacherSolver(
        flow_models.FlowDenoiser(parts.transformer, "qwen"),
        schedule,
        guidance_scale=4.0,
        guidance_rescale=flow_families.guidance_rescale("qwen"),
    )
    assert float(schedule.sigma(schedule.num_train_timesteps - 1)) == 1.0
    c1 = {k: v[:1] for k, v in cond.items()}
    seen: dict[str, Any] = {}

    def record(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.setdefault("latents", kwargs["latents"].clone())
        return {}

    embeds = {"prompt_embeds": want[:1], "prompt_embeds_mask": None if mask is None else mask[:1]}
    _run(pipe, x[:1], 2, negative_prompt=" ", true_cfg_scale=4.0, callback_on_step_end=record, **embeds)
    with torch.no_grad():
        v = teacher.predict(x[:1], schedule.num_train_timesteps - 1, c1, uncond)
    sigmas = pipe.scheduler.sigmas  # [1, sigma_1, 0] of the 2-step run
    v_pipe = (flow_models.unpack_latents(seen["latents"], 8, 8) - x[:1]) / (sigmas[1] - sigmas[0])
    torch.testing.assert_close(v, v_pipe, rtol=1e-4, atol=1e-5)  # through one float32 Euler step

    # VAE: the pipeline's decode of the latents, and its img2img encode (the same posterior draw)
    from diffusers import QwenImageImg2ImgPipeline

    image, final = (_run(pipe, x[:1], 2, output, **embeds) for output in ("pt", "latent"))
    decoded = flow_models.decode_latents(parts.vae, flow_models.unpack_latents(final, 8, 8))
    torch.testing.assert_close(decoded, image, rtol=0, atol=1e-6)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    img2img = _pipeline(tiny, QwenImageImg2ImgPipeline)
    with torch.no_grad():
        theirs = img2img._encode_vae_image(pixels.unsqueeze(2), torch.Generator().manual_seed(5))
    ours = sdxl_encoding.sample_posterior(
        parts.vae, *sdxl_encoding.posterior(parts.vae, pixels), torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(ours, theirs.squeeze(2), rtol=1e-5, atol=1e-6)


def test_dmd2_on_qwen_samples_in_the_pipeline(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A 4-step DMD2 generator (real score: CFG 4 with the renormalisation); its LoRA in ``QwenImagePipeline``
    with the saved scheduler (no shift, no terminal stretch) and ``sigmas`` samples as the script's sampler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffdistill.students import QWEN_IMAGE_LORA_TARGETS, load_lora

    out = tmp_path / "dmd2"
    args = flow_dmd2.parse_args(_argv(tiny, out, "--generator_every", "1"))
    flow_dmd2.main(args)
    assert args.guidance_scale == 4.0  # QwenImagePipeline's true_cfg_scale
    assert _trained(out / "pytorch_lora_weights.safetensors") and _trained(out / flow_critics.FAKE_LORA_NAME)
    sigmas = json.loads((out / "student_sigmas.json").read_text())
    assert len(sigmas) == 4 and sigmas[0] == 1.0 and sigmas[-1] > 0.1  # no terminal stretch to 0.02
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert scheduler.config.shift_terminal is None and not scheduler.config.use_dynamic_shifting

    pipe = _pipeline(tiny)
    pipe.load_lora_weights(str(out))
    parts = flow_models.load_flow(flow_dmd2.parse_args(_argv(tiny, out)))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(scheduler: Any, grid: list[float]) -> torch.Tensor:
        pipe.scheduler = scheduler
        torch.manual_seed(7)  # a stochastic scheduler's re-noising draws from the global generator
        return _run(pipe, noise, len(grid), prompt="a cat", sigmas=grid, true_cfg_scale=1.0)

    with torch.no_grad():
        student = load_lora(parts.transformer, out / "pytorch_lora_weights.safetensors", prefix="transformer")
        assert any(n in name for name, _ in student.named_modules() for n in QWEN_IMAGE_LORA_TARGETS[-4:])
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(student, "qwen")
        # the saved (stochastic) scheduler on the one-step grid: DMD2's x0 prediction (the pipeline draws its
        # re-noising noise in the packed layout, so longer grids differ from ours by the noise's arrangement)
        want = flow_critics.renoise_steps(denoiser, noise, sigmas[:1], cond, torch.Generator().manual_seed(7))
        # the whole grid kept as given (no shift, no terminal stretch): the same scheduler without re-noising
        euler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, stochastic_sampling=False)
        want_grid = flow_models.euler_sample(denoiser, noise, sigmas, cond)
    got = flow_models.unpack_latents(sample(scheduler, sigmas[:1]), 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got_grid = flow_models.unpack_latents(sample(euler, sigmas), 8, 8)
    torch.testing.assert_close(got_grid, want_grid, rtol=1e-4, atol=1e-4)


def test_dmd2_gan_on_qwen_images(tiny: dict[str, Path], tmp_path: Path) -> None:
    """DMD2's GAN term on captioned images: Qwen-Image's VAE encodes them (one-frame videos, per-channel
    normalisation) and LADD heads on the fake score read the mean prompt token."""
    out = tmp_path / "gan"
    flow_dmd2.main(
        flow_dmd2.parse_args(
            _argv(
                tiny,
                out,
                "--gan_weight",
                "--discriminator_norm_groups",
                "4",
                "--num_student_steps",
                "1",
                data="images",
            )
        )
    )
    assert _trained(out / "pytorch_lora_weights.safetensors")


def test_ladd_on_qwen_learns_from_the_pipelines_own_teacher_images(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open

    out = tmp_path / "ladd"
    extra = ["--use_lora", "--num_teacher_samples", "4", "--teacher_samples_shard_size", "2"]
    extra += [
        "--teacher_steps",
        "3",
        "--discriminator_norm_groups",
        "4",
        "--aspect_buckets",
        "64x64",
        "32x96",
    ]
    flow_ladd.main(flow_ladd.parse_args(_argv(tiny, out, *extra)))
    for shard, size in (("samples-00000", (8, 8)), ("samples-00001", (4, 12))):  # each at its bucket's size
        with safe_open(str(out / "teacher_samples" / f"{shard}.safetensors"), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
        assert latent.shape[-2:] == size
        want = _run(
            _pipeline(tiny),
            noise,
            3,
            prompt=prompts,
            negative_prompt=[" "] * len(prompts),
            true_cfg_scale=4.0,
        )
        # the same solve; our fixed-length text padding is masked out (float32 rounding of the longer softmax)
        torch.testing.assert_close(latent, flow_models.unpack_latents(want, *size), rtol=1e-4, atol=1e-5)
    assert _trained(out / "pytorch_lora_weights.safetensors")


def test_tscd_on_qwen_prompt_only_with_the_hybrid_distance(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tscd"
    extra = ["--use_lora", "--segments", "2,1", "--discriminator_norm_groups", "4"]
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, out, *extra)))
    assert _trained(out / "pytorch_lora_weights.safetensors")


def test_qwen_options(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Qwen-Image takes up to 1024 text tokens (its pipeline's limit; T5 families 512); ``--num_frames`` and
    FLUX's ``--keep_single_blocks`` are refused at parse time (from the folder's ``model_index.json``)."""
    args, parts = _parts(tiny, tmp_path)
    args.max_sequence_length = 1024
    flow_options.check_flow_args(args, parts)
    args.max_sequence_length = 1025
    with pytest.raises(ValueError, match=r"--max_sequence_length in \[1, 1024\].*Qwen-Image up to 1024"):
        flow_options.check_flow_values(args)
    args.max_sequence_length = 1024
    args.num_frames = 5
    with pytest.raises(
        ValueError, match="--num_frames is the video length of Wan, but this is a Qwen-Image image"
    ):
        flow_options.check_flow_values(args)


def test_kd_into_the_qwen_half_student(tiny: dict[str, Path], tmp_path: Path) -> None:
    """flow_kd on Qwen-Image images: the "qwen-half" student (1 of the tiny teacher's 2 blocks) trains with task +
    output + feature KD and is saved as a transformer folder diffusers loads, with its removal report."""
    from diffusers import QwenImageTransformer2DModel

    with pytest.raises(
        ValueError, match="--keep_single_blocks applies to FLUX only: QWEN has one block list"
    ):
        flow_kd.parse_args(
            smoke_argv(
                tiny, "qwen", tmp_path / "x", "--keep_blocks", "0", "--keep_single_blocks", "0", data="images"
            )
        )
    out = tmp_path / "kd"
    flow_kd.main(flow_kd.parse_args(smoke_argv(tiny, "qwen", out, "--preset", "qwen-half", data="images")))
    student = QwenImageTransformer2DModel.from_pretrained(str(out / "transformer"))
    assert student.config.num_layers == 1
    record = json.loads((out / "transformer" / "transformer_block_removal.json").read_text())
    assert record["family"] == "qwen" and record["removed"] == ["transformer_blocks.1"]
    teacher = QwenImageTransformer2DModel.from_pretrained(str(tiny["qwen"]), subfolder="transformer")
    moved = student.transformer_blocks[0].attn.to_q.weight
    assert not torch.equal(moved, teacher.transformer_blocks[0].attn.to_q.weight)  # trained from block 0


def test_evaluate_guides_qwen_with_true_cfg(tiny: dict[str, Path]) -> None:
    """``evaluate.py --guidance_scale 4`` on Qwen-Image runs the pipeline's true CFG (``true_cfg_scale`` with the
    negative prompt ``" "``): ``guidance_scale`` alone would be ignored there (it is a guidance-distilled model's
    input), so the recorded guidance would not be the one that ran."""
    import argparse

    pipe = _pipeline(tiny)
    args = argparse.Namespace(resolution=IMAGE_SIZE, timesteps=None, sigmas=None, num_inference_steps=2)
    args.guidance_scale = 4.0
    kwargs = generation.call_kwargs(args, pipe)
    assert (kwargs["true_cfg_scale"], kwargs["negative_prompt"]) == (
        4.0,
        " ",
    ) and "guidance_scale" not in kwargs
    prompts, gens = ["a cat", "a dog"], [torch.Generator().manual_seed(i) for i in (0, 1)]
    got = generation.pipeline_sampler(pipe, kwargs)(prompts, gens)
    want = pipe(
        prompt=prompts,
        negative_prompt=[" ", " "],
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
        output_type="pt",
    ).images
    unguided = pipe(
        prompt=prompts,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
        output_type="pt",
    ).images
    assert torch.equal(got, want) and not torch.allclose(got, unguided)
    args.guidance_scale = 1.0
    assert "negative_prompt" not in generation.call_kwargs(args, pipe)
    # no --guidance_scale: the pipeline's own behaviour (no CFG without a negative prompt), recorded as None
    assert generation.default_guidance(pipe) is None
    args.guidance_scale = None
    assert not {"guidance_scale", "true_cfg_scale"} & set(generation.call_kwargs(args, pipe))


def test_evaluate_seeds_a_stochastic_scheduler_per_image(tiny: dict[str, Path]) -> None:
    """flow_dmd2's saved scheduler re-noises from torch's global generator: evaluate.py samples each image alone
    after seeding it with the image's seed, so an image does not depend on its batch or on what ran before."""
    import argparse

    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipeline(tiny)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config,
        shift=1.0,
        use_dynamic_shifting=False,
        shift_terminal=None,
        stochastic_sampling=True,
    )
    args = argparse.Namespace(
        resolution=IMAGE_SIZE, timesteps=None, sigmas=[1.0, 0.6], num_inference_steps=None
    )
    args.guidance_scale = None
    sample = generation.pipeline_sampler(pipe, generation.call_kwargs(args, pipe))

    def gens(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = sample(["a cat", "a dog"], gens(10, 11))
    torch.rand(3)  # the global generator moves on between calls, as in a run
    alone = torch.cat([sample(["a cat"], gens(10)), sample(["a dog"], gens(11))])
    assert torch.equal(both, alone)
    assert not torch.equal(both[0], both[1])


def test_width_sets_the_dynamic_shift_of_a_non_square_resolution(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """``--width``: the schedule's ``mu`` is the one ``QwenImagePipeline`` computes for ``height x width`` (its
    ``calculate_shift`` of the packed token count), so the FLUX-recipe grid equals the pipeline scheduler's."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from diffdistill.schedulers import flow_pipeline_grid

    _, parts = _parts(tiny, tmp_path)
    schedule = flow_models.flow_schedule(parts, IMAGE_SIZE, width=2 * IMAGE_SIZE, terminal_stretch=True)
    scheduler = parts.noise_scheduler
    tokens = (IMAGE_SIZE // 16) * (2 * IMAGE_SIZE // 16)
    mu = calculate_shift(
        tokens,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    grid = flow_pipeline_grid(schedule, 4, pipeline="flux")
    # diffusers shifts and stretches in float32: the shift's roundings are relative (rtol); the stretch computes
    # 1 - (1 - sigma) c, whose roundings are relative to 1, i.e. absolute (atol: a few float32 ulps of 1)
    torch.testing.assert_close(grid.sigmas.float(), scheduler.sigmas, atol=4 * 2.0**-24, rtol=3 * 2.0**-23)
    square = flow_pipeline_grid(flow_models.flow_schedule(parts, IMAGE_SIZE), 4, pipeline="flux")
    assert not torch.allclose(square.sigmas, grid.sigmas)  # the width changed mu
    with pytest.raises(ValueError, match="--width trains non-square samples from prompts"):
        flow_dmd2.parse_args(_argv(tiny, tmp_path / "w", "--width", "128", "--gan_weight", data="images"))
