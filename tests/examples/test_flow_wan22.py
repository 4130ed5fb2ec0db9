"""Wan 2.2 in the flow scripts, each checked against ``WanPipeline`` itself on tiny pipelines
(:func:`tests.examples.tiny_flow.save_tiny_wan_pipeline`).

- TI2V-5B (``expand_timesteps``, the 16x VAE of 48 channels; here 8): the denoiser's one timestep per sample is the
  pipeline's per-token call, the decoded video is the pipeline's, a DMD2 LoRA samples in the pipeline as the
  script's sampler, and its defaults (704 px, 121 frames, multiples of 32) are the model's;
- A14B (two experts switched at ``boundary_ratio``): :class:`training.wan_experts.WanExperts` runs each sample on
  the pipeline's expert, the teacher's per-expert CFG (4 / 3) is the pipeline's sampling, DMD2 and TSCD train
  adapters on both experts that ``WanPipeline`` loads (``load_into_transformer_2=True``) and samples as the
  scripts' samplers, LADD's teacher samples are the pipeline's and its discriminator judges each sample with the
  heads on its expert (:class:`training.wan_experts.ExpertDiscriminators`), and DDP / FSDP2 on 2 processes whose
  samples need different experts make one process's update; what is refused, with the reason.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from diffdistill.students import load_lora
from tests import preloaded_launch
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
    wan_experts,
)
from tests.examples.tiny_flow import (
    T5_LENGTH,
    read_lora,
    save_tiny_wan_pipeline,
    smoke_argv,
    use_sigmas,
    wan_frames,
    wan_pipeline,
    write_captioned_videos,
)
from tests.state_compare import assert_same_update

FRAMES = 5  # 2 latent frames
SIZE = 64  # TI2V's 16x VAE: 4 x 4 latents; A14B's 8x: 8 x 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_wan22")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat walking\n\na dog running on grass\n")
    return {
        "ti2v": save_tiny_wan_pipeline(root / "ti2v", variant="ti2v"),
        "a14b": save_tiny_wan_pipeline(root / "a14b", variant="a14b"),
        "prompts": prompts,
    }


def _argv(tiny: dict[str, Path], variant: str, out: Path, *extra: str) -> list[str]:
    return smoke_argv(tiny, variant, out, "--num_frames", str(FRAMES), "--lora_rank", "4", *extra)


def _trained(lora: dict[str, torch.Tensor]) -> bool:
    return any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)


# ----------------------------------------------------------------------------------------------- TI2V-5B
def test_ti2v_denoiser_and_decoding_are_the_pipelines(tiny: dict[str, Path]) -> None:
    pipe = wan_pipeline(tiny["ti2v"])
    args = flow_dmd2.parse_args(_argv(tiny, "ti2v", tiny["ti2v"].parent / "unused"))
    parts = flow_models.load_flow(args)
    assert (parts.family, parts.variant, parts.name) == ("wan", "wan-ti2v", "Wan 2.2 TI2V-5B")
    assert flow_models.latent_shape(parts, 2, SIZE, FRAMES) == (2, 8, 2, SIZE // 16, SIZE // 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 2, SIZE // 16, SIZE // 16, generator=g)
    text, _ = pipe.encode_prompt(
        ["a cat", "a dog"], max_sequence_length=T5_LENGTH, device=torch.device("cpu")
    )
    t = torch.tensor([980.0, 310.0])
    # WanPipeline with expand_timesteps passes one timestep per latent token (the first-frame mask of its
    # image-to-video mode is all ones here): (B, f * h/2 * w/2) copies of the step's timestep
    tokens = 2 * (SIZE // 32) ** 2
    with torch.no_grad():
        got = flow_models.FlowDenoiser(parts.transformer, "wan")(x, t, encoder_hidden_states=text)
        want = pipe.transformer(
            hidden_states=x,
            timestep=t[:, None].expand(2, tokens),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
    # the same per-token arithmetic batched as (B,) or (B * L,) rows (float32 kernel blocking)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def run(output: str) -> torch.Tensor:
        torch.manual_seed(0)
        return wan_frames(pipe, x[:1], 1, output, prompt_embeds=text[:1])

    video = flow_models.decode_latents(parts.vae, run("latent"))
    assert video.shape == (1, 3, FRAMES, SIZE, SIZE)
    torch.testing.assert_close(video, run("pt").permute(0, 2, 1, 3, 4), rtol=0, atol=1e-6)


def test_dmd2_on_ti2v_samples_in_the_pipeline(tiny: dict[str, Path], tmp_path: Path) -> None:

    out = tmp_path / "dmd2"
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, "ti2v", out, "--generator_every", "1")))
    lora = read_lora(out / "pytorch_lora_weights.safetensors")
    assert _trained(lora)
    sigmas = json.loads((out / "student_sigmas.json").read_text())
    pipe = wan_pipeline(tiny["ti2v"])
    pipe.load_lora_weights(str(out))
    use_sigmas(pipe, out, sigmas)
    args = flow_dmd2.parse_args(_argv(tiny, "ti2v", out))
    parts = flow_models.load_flow(args)
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(7)  # the stochastic scheduler re-noises from the global generator
    got = wan_frames(pipe, noise, len(sigmas), prompt="a cat")
    with torch.no_grad():
        student = load_lora(parts.transformer, out / "pytorch_lora_weights.safetensors", prefix="transformer")
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(student, "wan")
        want = flow_critics.renoise_steps(denoiser, noise, sigmas, cond, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ti2v_defaults_and_sizes(tiny: dict[str, Path], tmp_path: Path) -> None:
    argv = smoke_argv(tiny, "ti2v", tmp_path / "a")
    del argv[argv.index("--resolution") : argv.index("--resolution") + 2]
    args = flow_dmd2.parse_args(argv)
    assert args.resolution == 704  # TI2V-5B's 704 x 1280, read from model_index.json at parse time
    parts = flow_models.load_flow(args)
    flow_options.check_flow_args(args, parts)
    assert args.num_frames == 121  # 5 s at 24 fps
    # the 16x VAE with 2x2 patches: multiples of 32, read from the folder's vae/config.json at parse time and
    # checked against the loaded VAE (a hub id is checked only then)
    match = r"--width to be a positive multiple of 32 \(the VAE's factor 16.*got 48"
    with pytest.raises(ValueError, match=match):
        flow_dmd2.parse_args(_argv(tiny, "ti2v", tmp_path / "b", "--width", "48"))
    args.width = 48
    with pytest.raises(ValueError, match=match):
        flow_options.check_flow_args(args, parts)


# ----------------------------------------------------------------------------------------------- A14B
def test_experts_run_each_sample_on_the_pipelines_expert(tiny: dict[str, Path]) -> None:
    pipe = wan_pipeline(tiny["a14b"])
    args = flow_dmd2.parse_args(_argv(tiny, "a14b", tiny["a14b"].parent / "unused"))
    parts = flow_models.load_flow(args)
    assert (parts.variant, parts.has_experts, parts.name) == ("wan-a14b", True, "Wan 2.2 A14B")
    experts = parts.transformer
    assert experts.boundary_timestep == 875.0  # boundary_ratio 0.875 x 1000 train timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 2, 8, 8, generator=g)
    text = torch.randn(4, 6, 16, generator=g)
    t = torch.tensor([100.0, 875.0, 874.5, 990.0])  # WanPipeline: t >= 875 -> transformer, else transformer_2
    with torch.no_grad():
        got = experts(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
        for i, expert in enumerate(
            [pipe.transformer_2, pipe.transformer, pipe.transformer_2, pipe.transformer]
        ):
            want = expert(
                hidden_states=x[i : i + 1], timestep=t[i : i + 1], encoder_hidden_states=text[i : i + 1]
            )
            # one sample alone vs within a sub-batch (float32 kernel blocking)
            torch.testing.assert_close(got[i : i + 1], want[0], rtol=1e-5, atol=1e-5)
        whole = experts(hidden_states=x, timestep=torch.full((4,), 900.0), encoder_hidden_states=text)[0]
        own = pipe.transformer(hidden_states=x, timestep=torch.full((4,), 900.0), encoder_hidden_states=text)[
            0
        ]
    assert torch.equal(whole, own)  # a batch on one expert is that expert's own call
    with pytest.raises(ValueError, match=r"one timestep per sample \(4,\).*got shape \(\)"):
        experts(hidden_states=x, timestep=torch.tensor(900.0), encoder_hidden_states=text)


def test_a14b_teacher_guidance_is_the_pipelines_per_expert_cfg(tiny: dict[str, Path]) -> None:
    """Two Euler steps, one on each expert: ``WanPipeline(guidance_scale=4, guidance_scale_2=3)`` and the scripts'
    teacher (``TeacherSolver`` with :func:`training.flow_families.expert_guidance`) from the same latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffdistill.schedulers import TeacherSolver

    pipe = wan_pipeline(tiny["a14b"])
    args = flow_dmd2.parse_args(_argv(tiny, "a14b", tiny["a14b"].parent / "unused"))
    parts = flow_models.load_flow(args)
    cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
    uncond = flow_encoding.uncond_conditions(parts, args, "cpu", torch.float32)
    schedule = flow_critics.loss_schedule()  # unshifted: index i is sigma (i + 1) / 1000
    steps = [949, 599]  # sigma 0.95 (timestep 950: transformer) then 0.6 (600: transformer_2)
    x = torch.randn(
        flow_models.latent_shape(parts, 1, SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=[0.95, 0.6], device=device)
    negative = uncond["encoder_hidden_states"]
    got = wan_frames(
        pipe, x, 2, prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=negative,
        guidance_scale=4.0, guidance_scale_2=3.0,
    )  # fmt: skip

    def euler(scale: Any) -> torch.Tensor:
        solver = TeacherSolver(
            flow_models.FlowDenoiser(parts.transformer, "wan"), schedule, guidance_scale=scale
        )
        state = x.clone()
        for i, s_next in zip(steps, [0.6, 0.0]):
            v = solver.predict(state, i, cond, uncond)
            state = state + (s_next - (i + 1) / 1000) * v
        return state

    want = euler(flow_families.expert_guidance(parts, 4.0, 3.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same arithmetic, float32 batching
    assert not torch.allclose(got, euler(4.0), rtol=1e-3, atol=1e-3)  # one scale for both experts differs


def test_dmd2_on_a14b_trains_both_experts_and_samples_in_the_pipeline(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    seen: dict[str, Any] = {}
    load_flow = flow_models.load_flow

    def recording_load(args: Any) -> Any:
        parts = load_flow(args)
        seen["args"], seen["start"] = args, {k: v.clone() for k, v in parts.transformer.state_dict().items()}
        seen["parts"] = parts
        return parts

    monkeypatch.setattr(flow_models, "load_flow", recording_load)
    out = tmp_path / "dmd2"
    # the fake score's sigmas around the boundary, so both experts' fake adapters train in 2 steps
    extra = ("--generator_every", "1", "--fake_sigma_range", "0.8", "0.95")
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, "a14b", out, *extra)))
    assert (seen["args"].guidance_scale, seen["args"].guidance_scale_2) == (4.0, 3.0)  # Wan 2.2 T2V A14B's
    trained = seen["parts"].transformer.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert all(torch.equal(base[k], seen["start"][k]) for k in seen["start"]), "a base weight changed"
    files = {
        name: wan_experts.lora_files(out, weight)
        for name, weight in (
            ("generator", "pytorch_lora_weights.safetensors"),
            ("fake", flow_critics.FAKE_LORA_NAME),
        )
    }
    for per_expert in files.values():
        for path in per_expert.values():
            assert _trained(read_lora(path)), f"{path.name}: an expert's adapter did not train"
    sigmas = json.loads((out / "student_sigmas.json").read_text())
    assert sigmas[1] >= 0.875 > sigmas[2]  # the 4-step grid (flow_shift 3) runs both experts

    pipe = wan_pipeline(tiny["a14b"])
    pipe.load_lora_weights(str(out))
    pipe.load_lora_weights(
        str(out), weight_name=files["generator"]["transformer_2"].name, load_into_transformer_2=True
    )
    use_sigmas(pipe, out, sigmas)
    args = flow_dmd2.parse_args(_argv(tiny, "a14b", out))
    parts = load_flow(args)
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(7)
    got = wan_frames(pipe, noise, len(sigmas), prompt="a cat")
    with torch.no_grad():
        for name, expert in parts.transformer.experts():
            load_lora(expert, files["generator"][name], prefix="transformer")
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(parts.transformer, "wan")
        want = flow_critics.renoise_steps(denoiser, noise, sigmas, cond, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dmd2_gan_on_a14b_videos_trains_both_experts_heads(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DMD2's GAN classifier (``--gan_weight``) on Wan 2.2 A14B with video clips: LADD heads on each expert's fake-score
    features (:class:`training.wan_experts.ExpertDiscriminators`); noised to sigmas on both sides of the switch,
    both experts' heads and adapters train."""
    seen: dict[str, Any] = {}
    build = flow_critics.FakeFeatureGAN.build.__func__

    def recording_build(cls: Any, *args: Any, **kwargs: Any) -> Any:
        gan = build(cls, *args, **kwargs)
        heads = gan.accelerator.unwrap_model(gan.head).module
        seen["heads"], seen["start"] = heads, {k: v.clone() for k, v in heads.state_dict().items()}
        return gan

    monkeypatch.setattr(flow_critics.FakeFeatureGAN, "build", classmethod(recording_build))
    clips = write_captioned_videos(tmp_path / "clips", ["a cat walking", "a dog"], FRAMES)
    out = tmp_path / "dmd2"
    argv = smoke_argv({**tiny, "images": clips}, "a14b", out, "--num_frames", str(FRAMES), data="images")
    extra = [
        "--lora_rank",
        "4",
        "--generator_every",
        "1",
        "--gan_weight",
        "0.1",
        "--discriminator_norm_groups",
        "4",
    ]
    extra += [
        "--loss_sigma_range",
        "0.6",
        "0.99",
        "--max_train_steps",
        "3",
    ]  # GAN sigmas on both sides of 0.875
    flow_dmd2.main(flow_dmd2.parse_args([*argv, *extra]))
    heads = seen["heads"]
    assert isinstance(heads, wan_experts.ExpertDiscriminators)
    moved = {
        name: any(
            not torch.equal(v, seen["start"][k])
            for k, v in heads.state_dict().items()
            if k.startswith(name + ".")
        )
        for name in ("discriminator", "discriminator_2")
    }
    assert moved == {"discriminator": True, "discriminator_2": True}, moved
    for path in wan_experts.lora_files(out, "pytorch_lora_weights.safetensors").values():
        assert _trained(read_lora(path))


def test_tscd_hybrid_on_a14b_trains_both_experts_heads(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TSCD's hybrid distance on Wan 2.2 A14B: heads on each expert of the teacher copy
    (:class:`training.wan_experts.ExpertDiscriminators`) train in the adversarial stage; both experts' adapters train."""
    seen: dict[str, Any] = {}
    per_expert = wan_experts.per_expert

    def recording(model: Any, build: Any) -> Any:  # flow_critics.ladd_heads calls it
        heads = per_expert(model, build)
        seen["heads"], seen["start"] = heads, {k: v.clone() for k, v in heads.state_dict().items()}
        return heads

    monkeypatch.setattr(wan_experts, "per_expert", recording)
    out = tmp_path / "hybrid"
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, "a14b", out, "--use_lora", "--segments", "2,1",
                                              "--discriminator_norm_groups", "4", "--max_train_steps", "4")))  # fmt: skip
    assert isinstance(seen["heads"], wan_experts.ExpertDiscriminators)
    assert any(not torch.equal(v, seen["start"][k]) for k, v in seen["heads"].state_dict().items())
    files = wan_experts.lora_files(out, "pytorch_lora_weights.safetensors")
    assert all(_trained(read_lora(path)) for path in files.values())


def test_tscd_on_a14b_trains_both_experts(tiny: dict[str, Path], tmp_path: Path) -> None:

    out = tmp_path / "tscd"
    extra = ("--use_lora", "--segments", "2,1", "--distance", "mse")
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, "a14b", out, *extra)))
    files = wan_experts.lora_files(out, "pytorch_lora_weights.safetensors")
    assert all(_trained(read_lora(path)) for path in files.values())
    grid = json.loads((out / flow_tscd.GRID_FILE).read_text())
    pipe = wan_pipeline(tiny["a14b"])
    pipe.load_lora_weights(str(out))
    pipe.load_lora_weights(str(out), weight_name=files["transformer_2"].name, load_into_transformer_2=True)
    use_sigmas(pipe, out, grid["sigmas"])
    args = flow_tscd.parse_args(_argv(tiny, "a14b", out, *extra))
    parts = flow_models.load_flow(args)
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, SIZE, FRAMES), generator=torch.Generator().manual_seed(0)
    )
    got = wan_frames(pipe, noise, len(grid["sigmas"]), prompt="a cat")
    with torch.no_grad():
        for name, expert in parts.transformer.experts():
            load_lora(expert, files[name], prefix="transformer")
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        want = flow_models.euler_sample(
            flow_models.FlowDenoiser(parts.transformer, "wan"), noise, grid["sigmas"], cond
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ladd_on_a14b_judges_each_sample_on_its_experts_features(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """LADD on Wan 2.2 A14B: the teacher samples are ``WanPipeline``'s own (both experts, CFG 4 / 3); the
    discriminator's logits of each sample are those of the heads on the expert the pipeline runs at its re-noised
    level (bitwise for a batch on one expert); a loss on a mixed batch trains both sets of heads, a batch on one
    expert only its own; the student's LoRA trains on both experts."""
    from safetensors import safe_open

    out = tmp_path / "ladd"
    extra = ["--use_lora", "--num_teacher_samples", "2", "--teacher_samples_shard_size", "2"]
    extra += ["--teacher_steps", "3", "--discriminator_norm_groups", "4", "--max_train_steps", "3"]
    args = flow_ladd.parse_args(_argv(tiny, "a14b", out, *extra))
    flow_ladd.main(args)
    with safe_open(str(out / "teacher_samples" / "samples-00000.safetensors"), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        settings = json.loads(f.metadata()["settings"])
        noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
    assert (settings["teacher_guidance_scale"], settings["teacher_guidance_scale_2"]) == (4.0, 3.0)
    want = wan_frames(
        wan_pipeline(tiny["a14b"]), noise, 3, guidance_scale=4.0, guidance_scale_2=3.0, prompt=prompts
    )
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
    files = wan_experts.lora_files(out, "pytorch_lora_weights.safetensors")
    assert all(_trained(read_lora(path)) for path in files.values())

    parts = flow_models.load_flow(args)
    disc = flow_critics.ladd_heads(args, parts.family, parts.transformer, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 2, 8, 8, generator=g)
    text = torch.randn(3, 6, 16, generator=g)
    t = torch.tensor([990.0, 300.0, 875.0])  # high, low, high (WanPipeline: t >= 875 -> transformer)
    logits = disc(x, t, encoder_hidden_states=text)
    judges = [disc.discriminator, disc.discriminator_2, disc.discriminator]
    for i, judge in enumerate(judges):
        own = judge(x[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1])
        for got, one in zip(logits, own):  # one sample alone vs within a sub-batch (float32 kernel blocking)
            torch.testing.assert_close(got[i : i + 1], one, rtol=1e-5, atol=1e-5)
    whole = disc(x, torch.full((3,), 100.0), encoder_hidden_states=text)
    alone = disc.discriminator_2(x, torch.full((3,), 100.0), encoder_hidden_states=text)
    assert all(torch.equal(a, b) for a, b in zip(whole, alone))  # a batch on one expert is its own call

    def head_grads(loss: torch.Tensor) -> list[bool]:
        disc.zero_grad(set_to_none=True)
        loss.backward()
        return [
            any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads.parameters())
            for d in (disc.discriminator, disc.discriminator_2)
        ]

    assert head_grads(sum(m.square().mean() for m in disc(x, t, encoder_hidden_states=text))) == [True, True]
    low = disc(x, torch.full((3,), 100.0), encoder_hidden_states=text)
    assert head_grads(sum(m.square().mean() for m in low)) == [False, True]


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_kd_on_one_a14b_expert(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expert: str
) -> None:
    """``flow_kd.py --expert``: one A14B expert becomes a block-removed student, trained on the timesteps WanPipeline
    runs that expert at (t >= 875 for ``transformer``, below for ``transformer_2``), initialised from and distilled
    against that expert, on the teacher's own videos (both experts, CFG 4 / 3); saved as the pipeline component it
    replaces."""
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    from diffdistill.students import LayerKD

    seen: list[torch.Tensor] = []
    forward = LayerKD.forward

    def recording(self: Any, sample: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(timestep.detach().clone())
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(LayerKD, "forward", recording)
    out = tmp_path / "kd"
    argv = smoke_argv(
        tiny, "a14b", out, "--num_frames", str(FRAMES), "--keep_blocks", "0", "--expert", expert
    )
    argv += ["--num_teacher_samples", "2", "--teacher_samples_shard_size", "2", "--teacher_steps", "2"]
    flow_kd.main(flow_kd.parse_args(argv))
    t = torch.cat(seen)
    assert len(t) == 4 and ((t >= 875).all() if expert == "transformer" else (t < 875).all()), t
    with safe_open(str(out / "teacher_samples" / "samples-00000.safetensors"), framework="pt") as f:
        prompts, noise = json.loads(f.metadata()["prompts"]), f.get_tensor("noise")
        latent = f.get_tensor("latent")
    want = wan_frames(
        wan_pipeline(tiny["a14b"]), noise, 2, guidance_scale=4.0, guidance_scale_2=3.0, prompt=prompts
    )
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
    student = WanTransformer3DModel.from_pretrained(str(out / expert))
    assert len(student.blocks) == 1
    parts = flow_models.load_flow(flow_kd.parse_args(argv))  # validation: WanPipeline's per-expert CFG, 4 / 3
    scale = flow_kd.validation_guidance(flow_kd.parse_args(argv), parts)
    assert scale(torch.tensor([990.0, 875.0, 874.0, 10.0])).tolist() == [4.0, 4.0, 3.0, 3.0]
    assert json.loads((out / expert / flow_kd.REPORT).read_text())["expert"] == expert
    # initialised from (and close to, after 2 small steps) its own expert's block 0, not the other expert's
    teachers = {
        name: WanTransformer3DModel.from_pretrained(str(tiny["a14b"]), subfolder=name)
        for name in wan_experts.EXPERTS
    }
    key = "blocks.0.attn1.to_q.weight"
    mine = (student.state_dict()[key] - teachers[expert].state_dict()[key]).abs().max()
    other = next(n for n in wan_experts.EXPERTS if n != expert)
    assert mine < (student.state_dict()[key] - teachers[other].state_dict()[key]).abs().max() / 10


def test_a14b_refusals(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"A14B trains as LoRA adapters on both experts: pass --use_lora"):
        flow_ladd.parse_args(smoke_argv(tiny, "a14b", tmp_path / "a", "--num_frames", str(FRAMES)))
    kd = smoke_argv(tiny, "a14b", tmp_path / "k", "--num_frames", str(FRAMES), "--keep_blocks", "0")
    with pytest.raises(
        ValueError, match=r"A14B is two experts: pass --expert transformer .* or --expert transformer_2"
    ):
        flow_kd.parse_args(kd)
    kd = smoke_argv(tiny, "ti2v", tmp_path / "k", "--num_frames", str(FRAMES), "--keep_blocks", "0")
    with pytest.raises(ValueError, match=r"--expert transformer picks a Wan 2\.2 A14B expert"):
        flow_kd.parse_args([*kd, "--expert", "transformer"])
    with pytest.raises(ValueError, match=r"--sample_guidance_scale_2 is a CFG \(>= 1\) .* but got 0\.5"):
        flow_kd.parse_args([*smoke_argv(tiny, "a14b", tmp_path / "k", "--num_frames", str(FRAMES)),
                            "--keep_blocks", "0", "--expert", "transformer", "--sample_guidance_scale_2", "0.5"])  # fmt: skip
    with pytest.raises(ValueError, match=r"A14B trains as LoRA adapters on both experts: pass --use_lora"):
        flow_tscd.parse_args(smoke_argv(tiny, "a14b", tmp_path / "b", "--distance", "mse"))
    args = flow_dmd2.parse_args(_argv(tiny, "ti2v", tmp_path / "d", "--guidance_scale_2", "3"))
    with pytest.raises(ValueError, match=r"--guidance_scale_2 is the CFG scale of Wan 2\.2 A14B's low-noise"):
        flow_dmd2.check_family_args(args, flow_models.load_flow(args))
    # unset, the low-noise scale follows a given --guidance_scale, as WanPipeline's guidance_scale_2 does
    args = flow_dmd2.parse_args(_argv(tiny, "a14b", tmp_path / "f", "--guidance_scale", "5"))
    flow_dmd2.check_family_args(args, flow_models.load_flow(args))
    assert (args.guidance_scale, args.guidance_scale_2) == (5.0, 5.0)
    args = flow_tscd.parse_args(_argv(tiny, "a14b", tmp_path / "g", "--use_lora", "--distance", "mse"))
    flow_tscd.check_guidance_args(args, flow_models.load_flow(args))
    assert (args.teacher_guidance_scale, args.teacher_guidance_scale_2) == (4.0, 3.0)
    args = flow_dmd2.parse_args(_argv(tiny, "a14b", tmp_path / "e", "--guidance_scale_2", "0.5"))
    with pytest.raises(ValueError, match=r"Expected --guidance_scale_2 >= 1"):
        flow_dmd2.check_family_args(args, flow_models.load_flow(args))


# ----------------------------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_processes_needing_different_experts_stay_in_step(tmp_path: Path, engine: str) -> None:
    """Step 1: rank 0's sample needs only the high-noise expert, rank 1's only the low-noise one: each runs the
    other's expert on its sample weighted 0, so DDP reduces every gradient and FSDP2 gathers match. Step 2: both need
    the high-noise expert: the low-noise one, unused everywhere, gets no AdamW step (its zero gradient dropped). The
    two updates are one process's on both samples."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    worker = importlib.import_module("wan_experts_worker")
    preloaded_launch.start_workers(worker.run_worker, (2, _free_port(), str(tmp_path), engine), 2)
    single = worker.build()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    worker.train_steps(single, slice(0, 2), 1)
    got = torch.load(tmp_path / f"{engine}_state.pt")
    # the same update up to float32 summation order (tests/state_compare.py); both experts moved
    assert_same_update(got, single.state_dict(), start, what=f"{engine} vs 1 process")
    for prefix in wan_experts.EXPERTS:
        assert any(not torch.equal(got[k], start[k]) for k in got if k.startswith(prefix + "."))


def test_each_optimiser_keeps_its_own_usage_and_late_adapters_count() -> None:
    """One process, the optimisers of one model stepping one after another: the fake score's (low-noise expert)
    and then the generator's (high-noise expert), over two micro-batches each, must keep every gradient they have;
    so must an adapter added after a first forward (audit 14: a drop forgot every adapter's usage, so the second
    optimiser's gradients were all dropped, and a first forward without adapters hid them for good)."""
    from types import SimpleNamespace

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    worker = importlib.import_module("wan_experts_worker")
    model = worker.build()
    x, _, text = worker.data(0)
    with torch.enable_grad():  # a first forward with gradients, before any adapter exists
        model(hidden_states=x, timestep=torch.tensor([950.0, 300.0]), encoder_hidden_states=text)
    model.zero_grad(set_to_none=True)
    from diffdistill.students import SharedBase

    lora = {"rank": 2, "targets": ["to_q", "to_v"], "init_lora_weights": False}
    base = SharedBase(model, adapters={"gen": lora, "fake": lora})
    gen, fake = base.view("gen"), base.view("fake")
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    for _ in range(2):  # micro-batches: usage accumulates until the optimisers' drops
        fake(hidden_states=x, timestep=torch.tensor([300.0, 200.0]), encoder_hidden_states=text)[
            0
        ].square().mean().backward()
        gen(hidden_states=x, timestep=torch.tensor([990.0, 900.0]), encoder_hidden_states=text)[
            0
        ].square().mean().backward()
    had = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".fake." in n and n.startswith("transformer_2.") for n in had)
    assert any(".gen." in n and n.startswith("transformer.") for n in had)
    wan_experts.drop_unused_grads(accelerator, list(fake.parameters()))
    wan_experts.drop_unused_grads(accelerator, list(gen.parameters()))
    assert {n for n, p in model.named_parameters() if p.grad is not None} == had


def test_an_adapter_unused_everywhere_is_not_stepped_though_its_expert_ran(tmp_path: Path) -> None:
    """DDP, two LoRA adapters on both experts (a shared base's generator and fake score): in step 2 the generator
    runs on the high-noise expert only and the fake score, differentiated to its input (SiD), on the low-noise one.
    The generator's low-noise adapter had a gradient in step 1 and none in step 2: AdamW must skip it there, as one
    process does (a per-expert drop kept its zero gradient because the expert ran, and took a momentum step)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    worker = importlib.import_module("wan_experts_worker")
    preloaded_launch.start_workers(worker.run_worker, (2, _free_port(), str(tmp_path), "ddp_adapters"), 2)
    model, gen, fake = worker.build_adapters()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    worker.train_adapter_steps(gen, fake, slice(0, 2), 1)
    got = torch.load(tmp_path / "ddp_adapters.pt")
    # the same update up to float32 summation order (tests/state_compare.py)
    assert_same_update(got, model.state_dict(), start, what="ddp vs 1 process, per-adapter usage")
    moved = {k for k in got if not torch.equal(got[k], start[k])}
    assert moved and all(".gen." in k for k in moved)  # only the generator's adapter trains
    assert any(k.startswith("transformer_2.") for k in moved)  # the low-noise one in step 1


@pytest.mark.parametrize(
    ("script", "mode", "extra"),
    [
        ("flow_tscd", "ddp", ("--use_lora", "--segments", "2", "--distance", "mse")),
        ("flow_tscd", "fsdp", ("--use_lora", "--segments", "2", "--distance", "mse")),
        ("flow_dmd2", "ddp", ("--generator_every", "1")),
        ("flow_ladd", "ddp", ("--use_lora", "--num_teacher_samples", "2", "--teacher_steps", "2",
                              "--discriminator_norm_groups", "4")),
        ("flow_ladd", "fsdp", ("--use_lora", "--num_teacher_samples", "2", "--teacher_steps", "2",
                               "--discriminator_norm_groups", "4")),
        ("flow_kd", "fsdp", ("--keep_blocks", "0", "--expert", "transformer_2", "--num_teacher_samples", "2",
                             "--teacher_steps", "2")),
    ],
)  # fmt: skip
def test_a14b_scripts_run_on_two_processes(
    tiny: dict[str, Path], tmp_path: Path, script: str, mode: str, extra: tuple[str, ...]
) -> None:
    """2 CPU processes x batch 1, 4 steps: TSCD's teacher trajectories make a different number of teacher calls on
    each process, and DMD2 has steps where no process needs one expert; both must stay in step (an expert
    collective per call hung TSCD under DDP and aborted it under FSDP2; DDP then failed DMD2's next step)."""
    from tests.examples.test_sdxl_scripts import _launch_two_processes

    out = tmp_path / "out"
    argv = _argv(tiny, "a14b", out, *extra)
    argv[argv.index("--train_batch_size") + 1] = "1"
    argv[argv.index("--max_train_steps") + 1] = "4"
    argv[argv.index("--checkpointing_steps") + 1] = "0"
    if script == "flow_kd":  # a full student: no LoRA rank
        del argv[argv.index("--lora_rank") : argv.index("--lora_rank") + 2]
    output = _launch_two_processes(script, argv, mode=mode)
    if script == "flow_kd":  # the block-removed expert, saved after the last step's validation
        assert (out / "transformer_2" / "config.json").is_file()
        # FSDP2 shards the frozen teacher: each expert its own root (the main process logs each)
        assert output.count("sharded the frozen teacher over 2 processes") == 2, output[-3000:]
        return
    files = wan_experts.lora_files(out, "pytorch_lora_weights.safetensors")
    assert all(_trained(read_lora(path)) for path in files.values())
