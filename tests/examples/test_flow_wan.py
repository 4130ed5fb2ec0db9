"""Wan 2.1 text-to-video in the flow scripts: ``examples/flow_dmd2.py``, ``flow_ladd.py`` and ``flow_tscd.py`` on a
tiny ``WanPipeline`` (:func:`tests.examples.tiny_flow.save_tiny_wan_pipeline`), checked against the pipeline itself.

- the pieces: :class:`training.flow_models.FlowDenoiser` is the transformer call ``WanPipeline`` makes, the prompt
  conditions are its ``encode_prompt``'s, a sample decoded by :func:`training.flow_models.decode_latents` is the
  pipeline's own video;
- DMD2: only the two adapters train, and the generator's LoRA loaded into ``WanPipeline`` with the scheduler the
  script saves samples as the script's DMD2 sampler does (the recipe its docstring gives);
- LADD: the cached teacher samples are ``WanPipeline``'s own videos of those prompts (UniPC, CFG 5 against the
  empty prompt), and the student trains against LADD heads on the teacher's video features;
- TSCD: prompt-only (teacher-noised states) with the hybrid distance's heads;
- KD: prompt-only, on the teacher's own videos (``WanPipeline``'s), into a block-removed ``WanTransformer3DModel``;
- the Wan variants read from ``model_index.json``; what is refused, with the reason: a ``--num_frames`` that is not
  ``4k + 1`` or given to an image model, image data for a video model, video pipelines in ``evaluate.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
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
)
from tests.examples.tiny_flow import (
    IMAGE_SIZE,
    T5_LENGTH,
    read_lora,
    save_tiny_wan_pipeline,
    smoke_argv,
    use_sigmas,
    wan_frames,
    wan_pipeline,
)
from tests.examples.tiny_sdxl import write_captioned_images

FRAMES = 5  # (5 - 1) / 4 + 1 = 2 latent frames


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_wan")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat walking\n\na dog running on grass\n")
    return {"wan": save_tiny_wan_pipeline(root / "wan"), "prompts": prompts}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return smoke_argv(tiny, "wan", out, "--num_frames", str(FRAMES), "--lora_rank", "4", *extra)


def test_denoiser_conditions_and_decoding_are_the_pipelines(tiny: dict[str, Path]) -> None:
    """The three pieces the scripts build a Wan step from, each against what ``WanPipeline`` does itself."""
    pipe = wan_pipeline(tiny["wan"])
    args = flow_dmd2.parse_args(_argv(tiny, tiny["wan"].parent / "unused"))
    parts = flow_models.load_flow(args)
    assert (parts.family, parts.is_video, parts.uses_cfg) == ("wan", True, True)
    flow_options.check_flow_args(args, parts)
    shape = flow_models.latent_shape(parts, 2, IMAGE_SIZE, FRAMES)
    assert shape == (2, 16, 2, IMAGE_SIZE // 8, IMAGE_SIZE // 8)

    prompts = ["a cat walking", "a dog running on grass"]
    cond = flow_encoding.conditions(parts, prompts, args, "cpu", torch.float32)
    assert cond.keys() == {"encoder_hidden_states"}  # Wan has no pooled embedding
    want, negative = pipe.encode_prompt(prompts, max_sequence_length=T5_LENGTH, device=torch.device("cpu"))
    # float32's default tolerance: the same encoder on the same tokens, loaded twice (kernel summation order)
    torch.testing.assert_close(cond["encoder_hidden_states"], want)
    uncond = flow_encoding.uncond_conditions(parts, args, "cpu", torch.float32)
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative[:1])  # the "" prompt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([980.0, 310.5])
    with torch.no_grad():
        got = flow_models.FlowDenoiser(parts.transformer, "wan")(x, t, **cond, pooled_projections=None)
        direct = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=want, return_dict=False)[
            0
        ]
    torch.testing.assert_close(got, direct)

    # One pipeline step from given latents: its latents and its decoded video (float "pt" output in [0, 1]).
    def run(output: str) -> torch.Tensor:
        torch.manual_seed(0)
        return wan_frames(pipe, x[:1], 1, output, prompt_embeds=want[:1])

    video = flow_models.decode_latents(parts.vae, run("latent"))
    expected = run("pt")  # (B, F, 3, H, W) from diffusers' video processor
    assert video.shape == (1, 3, FRAMES, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(video, expected.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-6)


def test_dmd2_on_wan_trains_two_adapters_and_samples_in_the_pipeline(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DMD2 (4-step grid, CFG 5 real score): the base untouched, both adapters trained, a validation video; the
    generator's LoRA in ``WanPipeline`` with the saved scheduler and the docstring's ``set_timesteps`` override
    samples as the script's DMD2 sampler on the same noise."""

    from diffdistill.students import WAN_LORA_TARGETS, load_lora

    seen: dict[str, Any] = {}
    load_flow = flow_models.load_flow

    def recording_load(args: Any) -> Any:
        parts = load_flow(args)
        seen["parts"], seen["args"] = parts, args
        seen["start"] = {k: v.clone() for k, v in parts.transformer.state_dict().items()}
        return parts

    monkeypatch.setattr(flow_models, "load_flow", recording_load)
    out = tmp_path / "dmd2"
    val = ["--validation_prompts", "a cat", "--validation_steps", "2", "--generator_every", "1"]
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, out, *val)))
    assert seen["args"].guidance_scale == 5.0  # WanPipeline's CFG
    trained = seen["parts"].transformer.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert all(torch.equal(base[k], seen["start"][k]) for k in seen["start"]), "a base weight changed"
    gen_lora, fake_lora = (
        read_lora(out / "pytorch_lora_weights.safetensors"),
        read_lora(out / flow_critics.FAKE_LORA_NAME),
    )
    assert gen_lora.keys() == fake_lora.keys()
    assert any(n in k for k in gen_lora for n in WAN_LORA_TARGETS)
    for lora in (gen_lora, fake_lora):
        assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "an adapter did not train"
    gif = out / "samples" / "step-2-0.gif"
    from PIL import Image

    with Image.open(gif) as im:
        assert (im.n_frames, im.size) == (FRAMES, (IMAGE_SIZE, IMAGE_SIZE))
    with Image.open(out / "samples" / "step-2.png") as im:  # the frames of one video in a row
        assert im.size == (FRAMES * IMAGE_SIZE, IMAGE_SIZE)

    sigmas = json.loads((out / "student_sigmas.json").read_text())
    assert len(sigmas) == 4 and sigmas[0] == 1.0
    pipe = wan_pipeline(tiny["wan"])
    pipe.load_lora_weights(str(out))
    use_sigmas(pipe, out, sigmas)
    args = flow_dmd2.parse_args(_argv(tiny, out))
    parts = load_flow(args)
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, IMAGE_SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(7)  # the scheduler's re-noising draws from the global generator
    got = wan_frames(pipe, noise, len(sigmas), guidance_scale=1.0, prompt="a cat")
    with torch.no_grad():
        student = load_lora(parts.transformer, out / "pytorch_lora_weights.safetensors", prefix="transformer")
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(student, "wan")
        want = flow_critics.renoise_steps(denoiser, noise, sigmas, cond, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_runs_keep_the_modules_wan_keeps_in_float32(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``--mixed_precision bf16`` the shared base is bf16 but Wan's ``_keep_in_fp32_modules`` (rope, time
    embedder, modulation tables, norms) stay float32, as ``WanPipeline.from_pretrained(torch_dtype=bf16)`` keeps
    them: the LoRA trains against the base it is deployed on."""
    seen: dict[str, Any] = {}
    load_flow = flow_models.load_flow

    def recording_load(args: Any) -> Any:
        seen["parts"] = load_flow(args)
        return seen["parts"]

    monkeypatch.setattr(flow_models, "load_flow", recording_load)
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state: the in-process runs before this one fixed mixed precision "no"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, tmp_path / "bf16", "--mixed_precision", "bf16")))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    keep = type(seen["parts"].transformer)._keep_in_fp32_modules
    dtypes = {
        n: p.dtype
        for n, p in seen["parts"].transformer.named_parameters()
        if "lora_" not in n and "base_layer" not in n
    }
    kept = {n for n in dtypes if any(k in n.split(".") for k in keep)}
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    assert {dtypes[n] for n in dtypes if n not in kept} == {torch.bfloat16}
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(
        str(tiny["wan"]), subfolder="transformer", torch_dtype=torch.bfloat16
    )
    assert {n for n, p in reference.named_parameters() if p.dtype == torch.float32} == kept


def test_ladd_on_wan_learns_from_the_pipelines_own_teacher_videos(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The cached teacher samples are ``WanPipeline(prompt)``'s videos from the stored noise (its UniPC solver,
    CFG 5 against the empty prompt); LADD heads read the teacher's video features (text pooled by the mean) and
    the student's LoRA trains against them."""
    from safetensors import safe_open

    out = tmp_path / "ladd"
    extra = ["--use_lora", "--num_teacher_samples", "2", "--teacher_samples_shard_size", "2"]
    extra += ["--teacher_steps", "3", "--discriminator_norm_groups", "4"]
    flow_ladd.main(flow_ladd.parse_args(_argv(tiny, out, *extra)))
    shard = out / "teacher_samples" / "samples-00000.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        settings = json.loads(f.metadata()["settings"])
        noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
    assert (settings["num_frames"], settings["teacher_guidance_scale"]) == (FRAMES, 5.0)
    assert latent.shape == (2, 16, 2, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    want = wan_frames(wan_pipeline(tiny["wan"]), noise, 3, guidance_scale=5.0, prompt=prompts)
    # the same solve; the prompt states of the encoder loaded twice differ by float32 rounding (see the first test)
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
    lora = read_lora(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "the student did not train"


def test_kd_on_wan_prompt_only_learns_from_the_pipelines_own_teacher_videos(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flow_kd.py --prompts_file``: the teacher's own videos (``WanPipeline``'s, CFG 5, cached in shards as LADD's)
    are the clean latents of the layer KD of a block-removed Wan; the student is a ``WanTransformer3DModel`` folder
    and its report counts the FLOPs of the training videos' latents (frames, height, width)."""
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    seen: list[torch.Tensor] = []
    batch = flow_kd.teacher_pairs.PairShards.batch

    def recording_batch(self: Any, gen: torch.Generator) -> Any:
        out = batch(self, gen)
        seen.append(out[1])
        return out

    monkeypatch.setattr(flow_kd.teacher_pairs.PairShards, "batch", recording_batch)
    out = tmp_path / "kd"
    extra = ["--keep_blocks", "0", "2", "--num_teacher_samples", "3", "--teacher_samples_shard_size", "2"]
    flow_kd.main(flow_kd.parse_args([*smoke_argv(tiny, "wan", out, "--num_frames", str(FRAMES)), *extra,
                                     "--teacher_steps", "2"]))  # fmt: skip
    shards = sorted((out / "teacher_samples").glob("samples-*.safetensors"))
    assert len(shards) == 2  # 3 samples in shards of 2
    latents = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            assert json.loads(f.metadata()["settings"])["teacher_guidance_scale"] == 5.0  # WanPipeline's CFG
            noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
        want = wan_frames(wan_pipeline(tiny["wan"]), noise, 2, guidance_scale=5.0, prompt=prompts)
        torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)  # as the LADD test above
        latents.append(latent)
    pool = torch.cat(latents)
    assert len(seen) == 2 and all(any(torch.equal(row, p) for p in pool) for x0 in seen for row in x0)
    student = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    assert student.config.num_layers == 2
    report = json.loads((out / "transformer" / flow_kd.REPORT).read_text())
    assert report["flops_at"]["latent_size"] == [2, IMAGE_SIZE // 8, IMAGE_SIZE // 8]
    with pytest.raises(ValueError, match=r"Pass --train_data_dir .* or --prompts_file .* one of them"):
        flow_kd.parse_args(smoke_argv(tiny, "wan", out, "--keep_blocks", "0", data=None))
    with pytest.raises(ValueError, match=r"--sample_guidance_scale is a CFG \(>= 1\) .* got 0.5"):
        flow_kd.parse_args(
            [*smoke_argv(tiny, "wan", out, "--keep_blocks", "0"), "--sample_guidance_scale", "0.5"]
        )
    flux = SimpleNamespace(uses_cfg=False, name="FLUX.1")
    with pytest.raises(ValueError, match=r"FLUX\.1 has no unconditional pass"):
        flow_kd.sample_guidance(SimpleNamespace(sample_guidance_scale=3.0), flux)


def test_tscd_on_wan_prompt_only_with_the_hybrid_distance(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Hyper-SD's two-stage plan on teacher-noised video states (CFG 5), with LADD heads in the second stage."""
    out = tmp_path / "tscd"
    extra = ["--use_lora", "--segments", "2,1", "--discriminator_norm_groups", "4", "--noise_offset", "0.1"]
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, out, *extra)))
    lora = read_lora(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "the student did not train"
    grid = json.loads((out / flow_tscd.GRID_FILE).read_text())
    assert grid["num_inference_steps"] == 1
    # the LoRA in WanPipeline with the saved (unshifted) scheduler and the trained grid samples as validation does

    from diffdistill.students import load_lora

    pipe = wan_pipeline(tiny["wan"])
    pipe.load_lora_weights(str(out))
    use_sigmas(pipe, out, grid["sigmas"])
    args = flow_tscd.parse_args(_argv(tiny, out, *extra))
    parts = flow_models.load_flow(args)
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, IMAGE_SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    got = wan_frames(pipe, noise, len(grid["sigmas"]), guidance_scale=1.0, prompt="a cat")
    with torch.no_grad():
        student = load_lora(parts.transformer, out / "pytorch_lora_weights.safetensors", prefix="transformer")
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        want = flow_models.euler_sample(flow_models.FlowDenoiser(student, "wan"), noise, grid["sigmas"], cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_non_square_wan_videos_with_width(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``--width`` (Wan's native aspect is 480 x 832): LADD's teacher videos and the student's validation videos are
    ``--resolution`` x ``--width``; the teacher shards are ``WanPipeline``'s at that size."""
    from PIL import Image
    from safetensors import safe_open

    out = tmp_path / "wide"
    extra = ["--use_lora", "--num_teacher_samples", "2", "--teacher_samples_shard_size", "2", "--width", "96"]
    extra += ["--teacher_steps", "2", "--discriminator_norm_groups", "4", "--max_train_steps", "1"]
    extra += ["--validation_prompts", "a cat", "--validation_steps", "1"]
    flow_ladd.main(flow_ladd.parse_args(_argv(tiny, out, *extra)))
    with safe_open(str(out / "teacher_samples" / "samples-00000.safetensors"), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
    assert latent.shape == (2, 16, 2, IMAGE_SIZE // 8, 96 // 8)
    want = wan_frames(wan_pipeline(tiny["wan"]), noise, 2, guidance_scale=5.0, prompt=prompts, width=96)
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
    with Image.open(out / "samples" / "step-1-0.gif") as im:
        assert im.size == (96, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"--width to be a positive multiple of 16.*but got 100"):
        flow_ladd.parse_args(_argv(tiny, out, "--use_lora", "--width", "100"))


def _variant(tiny: dict[str, Path], tmp_path: Path, **index: Any) -> Path:
    """A copy of the tiny Wan folder whose ``model_index.json`` has ``index`` merged in."""
    folder = tmp_path / "variant"
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny["wan"], folder)
    path = folder / "model_index.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | index))
    return folder


def test_wan_variants_are_read_from_model_index(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Wan 2.1, Wan 2.2 TI2V-5B (``expand_timesteps``) and A14B (two experts) are told apart by
    ``model_index.json`` (tests/examples/test_flow_wan22.py trains them); an index with one of A14B's two keys only
    is refused."""
    assert flow_families.model_variant(str(tiny["wan"])) == "wan"
    two = {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    assert flow_families.model_variant(str(_variant(tiny, tmp_path / "a", **two))) == "wan-a14b"
    assert (
        flow_families.model_variant(str(_variant(tiny, tmp_path / "b", expand_timesteps=True))) == "wan-ti2v"
    )
    assert flow_families.model_family(str(_variant(tiny, tmp_path / "c", expand_timesteps=True))) == "wan"
    with pytest.raises(ValueError, match=r"both transformer_2 and boundary_ratio .* or neither"):
        flow_families.model_variant(str(_variant(tiny, tmp_path / "d", boundary_ratio=0.9)))
    with pytest.raises(ValueError, match=r"two experts and expand_timesteps, which no published Wan has"):
        flow_families.model_variant(str(_variant(tiny, tmp_path / "e", expand_timesteps=True, **two)))


def test_wan_options_are_checked(tiny: dict[str, Path], tmp_path: Path) -> None:
    args = flow_dmd2.parse_args(_argv(tiny, tmp_path / "a"))
    parts = flow_models.load_flow(args)
    args.num_frames = 6
    with pytest.raises(ValueError, match=r"--num_frames to be 4k \+ 1 .* but got 6: use 5 or 9"):
        flow_options.check_flow_args(args, parts)
    argv = smoke_argv(tiny, "wan", tmp_path / "b")
    del argv[argv.index("--resolution") : argv.index("--resolution") + 2]
    defaults = flow_dmd2.parse_args(argv)
    assert defaults.resolution == 480  # Wan 2.1's 480p, not the image models' 1024 (read at parse time)
    flow_options.check_flow_args(defaults, parts)
    assert defaults.num_frames == 81  # WanPipeline's default
    hub = argparse.Namespace(resolution=None)  # a hub id: filled once the model is loaded
    flow_options.fill_resolution(hub, None)
    assert hub.resolution is None
    flow_options.fill_resolution(hub, "flux")
    assert hub.resolution == 1024
    with pytest.raises(ValueError, match="--num_frames is the video length of Wan, but this is a SD3"):
        flow_options.check_family_options(SimpleNamespace(num_frames=5, max_sequence_length=None), "sd3")
    with pytest.raises(ValueError, match=r"--num_frames >= 1"):
        flow_dmd2.parse_args(_argv(tiny, tmp_path / "c", "--num_frames", "0"))
    images = write_captioned_images(tmp_path / "images", ["a cat", "a dog"])
    kd_argv = smoke_argv(
        {**tiny, "images": images}, "wan", tmp_path / "d", "--preset", "wan-half", data="images"
    )
    with pytest.raises(
        ValueError, match=r"video clips for a video model \(Wan\), but it holds images directly"
    ):
        flow_kd.parse_args(kd_argv)  # refused from model_index.json, before any load
    with pytest.raises(ValueError, match=r"WanPipeline \(video\).*no video metric"):
        generation.check_image_pipeline(json.loads((tiny["wan"] / "model_index.json").read_text()))
    generation.check_image_pipeline({"_class_name": "StableDiffusion3Pipeline"})  # images pass
