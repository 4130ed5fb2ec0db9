"""The SD3 / FLUX plumbing of the examples (``examples/training/flow_*.py``) against diffusers' own pipelines.

Every check runs the tiny pipelines of :mod:`tests.examples.tiny_flow` (written offline) through the diffusers
pipeline class and compares: one Euler step of :class:`FlowDenoiser` on :mod:`flow_encoding`'s conditions equals
the pipeline's one-step latents (so the packing, ``img_ids``, ``txt_ids``, FLUX's ``timestep / 1000`` and
``guidance``, and the prompt encoding are the pipeline's), the decoded images equal the pipeline's, and the
schedule's shift equals the pipeline's at a resolution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.flow_scripts import flow_encoding, flow_models, flow_options
from tests.examples.tiny_flow import IMAGE_SIZE, T5_LENGTH, save_tiny_flux_pipeline, save_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flow")
    return {"sd3": save_tiny_sd3_pipeline(root / "sd3"), "flux": save_tiny_flux_pipeline(root / "flux")}


def _args(model: Path, **over: Any) -> argparse.Namespace:
    base = {
        "pretrained_model_name_or_path": str(model),
        "revision": None,
        "variant": None,
        "pretrained_vae_model_name_or_path": None,
        "max_sequence_length": T5_LENGTH,
        "cache_dir": None,
        "guidance": None,
        "resolution": IMAGE_SIZE,
        "uncond": "empty_prompt",
    }
    return argparse.Namespace(**{**base, **over})


def _pipeline(family: str, path: Path) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(str(path))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_euler_step_equals_the_pipeline(family: str, tiny_flow: dict[str, Path]) -> None:
    """The pipeline at one step (sigma 1 -> 0: ``x - v``) from given latents, vs FlowDenoiser on our conditions."""
    pipe = _pipeline(family, tiny_flow[family])
    args = flow_options.check_flow_args(
        _args(tiny_flow[family]), flow_models.load_flow(_args(tiny_flow[family]))
    )
    parts = flow_models.load_flow(args)
    assert parts.family == family and args.guidance == (3.5 if family == "flux" else None)
    prompts = [
        "a red cube",
        "an astronaut riding a horse on the moon",
    ]  # the second is truncated to 8 T5 tokens
    noise = torch.randn(
        flow_models.latent_shape(parts, 2, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    given = flow_models.pack_latents(noise) if family == "flux" else noise
    call: dict[str, Any] = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 1.0}
    with torch.no_grad():
        want, images = (
            pipe(
                prompts,
                num_inference_steps=1,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                latents=given,
                max_sequence_length=T5_LENGTH,
                output_type=output,
                **call,
            ).images
            for output in ("latent", "pt")
        )
        cond = flow_encoding.conditions(parts, prompts, args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(parts.transformer, family, args.guidance)
        got = flow_models.euler_sample(denoiser, noise, [1.0], cond)
        decoded = flow_models.decode_latents(parts.vae, got)
    if family == "flux":
        want = flow_models.unpack_latents(want, *noise.shape[-2:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, images.float(), rtol=1e-4, atol=1e-4)


def test_flux_packing_and_ids_are_the_pipelines() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    packed = flow_models.pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(flow_models.unpack_latents(packed, 6, 10), x)
    want_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(flow_models.image_ids(6, 10, "cpu", torch.float32), want_ids)


def test_flux_guidance_reaches_the_transformer(tiny_flow: dict[str, Path]) -> None:
    """The embedded guidance changes the output; a per-sample ``guidance`` condition overrides the default."""
    parts = flow_models.load_flow(_args(tiny_flow["flux"]))
    cond = flow_encoding.conditions(parts, ["a cat"], _args(tiny_flow["flux"]), "cpu", torch.float32)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([700.0])
    with torch.no_grad():
        a = flow_models.FlowDenoiser(parts.transformer, "flux", 3.5)(x, t, **cond)
        b = flow_models.FlowDenoiser(parts.transformer, "flux", 1.0)(x, t, **cond)
        c = flow_models.FlowDenoiser(parts.transformer, "flux", 1.0)(
            x, t, **cond, guidance=torch.tensor([3.5])
        )
    assert not torch.allclose(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="embedded guidance scale"):
        flow_models.FlowDenoiser(parts.transformer, "flux")(x, t, **cond)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_cache_returns_the_encoding(family: str, tiny_flow: dict[str, Path], tmp_path: Path) -> None:
    args = _args(tiny_flow[family], cache_dir=str(tmp_path))
    parts = flow_models.load_flow(args)
    prompts = ["a cat", "a dog", "a cat"]
    plain = flow_encoding.encode_prompts(parts, prompts, "cpu", T5_LENGTH)
    first = flow_encoding.encode_prompts_cached(parts, prompts, "cpu", T5_LENGTH, str(tmp_path))
    again = flow_encoding.encode_prompts_cached(parts, prompts, "cpu", T5_LENGTH, str(tmp_path))
    assert len(list((tmp_path / "text").iterdir())) == 2
    assert plain.keys() == first.keys() == again.keys() == {"encoder_hidden_states", "pooled_projections"}
    for k in plain:
        torch.testing.assert_close(first[k], plain[k], rtol=1e-6, atol=1e-6)
        assert torch.equal(again[k], first[k])
    longer = flow_encoding.encode_prompts_cached(parts, ["a cat"], "cpu", T5_LENGTH + 2, str(tmp_path))
    assert len(list((tmp_path / "text").iterdir())) == 3  # the T5 length is part of the key
    key = "encoder_hidden_states"
    assert longer[key].shape[1] == plain[key].shape[1] + 2
    uncond = flow_encoding.uncond_conditions(parts, args, "cpu", torch.float32)
    torch.testing.assert_close(
        uncond["pooled_projections"],
        flow_encoding.encode_prompts(parts, [""], "cpu", 8)["pooled_projections"],
    )
    # a bf16 run (encoders in bf16) encodes again instead of reading the float32 run's states
    for encoder in parts.text_encoders:
        encoder.to(torch.bfloat16)
    half = flow_encoding.encode_prompts_cached(parts, ["a cat"], "cpu", T5_LENGTH, str(tmp_path))
    assert len(list((tmp_path / "text").iterdir())) == 5  # 2 + the longer one + ("" above) + the bf16 one
    assert half["encoder_hidden_states"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_latent_normalisation_round_trip(family: str, tiny_flow: dict[str, Path]) -> None:
    """``(z - shift) * scale`` with the family's factors from the VAE config, and back."""
    vae = flow_models.load_flow(_args(tiny_flow[family])).vae
    shift, scale = {"sd3": (0.0609, 1.5305), "flux": (0.1159, 0.3611)}[family]
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (shift, scale)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    latents = flow_models.encode_latents(vae, images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(latents, (dist.mean + dist.std * eps - shift) * scale)
        want = ((vae.decode(latents / scale + shift).sample.clamp(-1, 1) + 1) / 2).float()
    torch.testing.assert_close(flow_models.decode_latents(vae, latents), want)


def test_schedule_shift_equals_the_pipelines(tiny_flow: dict[str, Path]) -> None:
    """SD3: the static shift-3 table; FLUX: ``mu`` of the image token count, the 4-step grid of FluxPipeline."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from diffdistill.schedulers import flow_pipeline_grid

    sd3 = flow_models.load_flow(_args(tiny_flow["sd3"]))
    table = flow_models.flow_schedule(sd3, 1024).sigma(torch.arange(1000)).float()
    assert torch.equal(table, sd3.noise_scheduler.sigmas.flip(0).float())
    flux = flow_models.load_flow(_args(tiny_flow["flux"]))
    for resolution in (512, 1024):
        schedule = flow_models.flow_schedule(flux, resolution)
        cfg = flux.noise_scheduler.config
        tokens = (resolution // 16) ** 2
        mu = calculate_shift(
            tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
        assert schedule.flow_config.mu == pytest.approx(mu, abs=1e-12)
        flux.noise_scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
        grid = flow_pipeline_grid(schedule, 4, pipeline="flux").sigmas
        torch.testing.assert_close(grid.float(), flux.noise_scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_lora_targets_cover_attention_and_feed_forward(tiny_flow: dict[str, Path]) -> None:
    for family in ("sd3", "flux"):
        parts = flow_models.load_flow(_args(tiny_flow[family]))
        args = argparse.Namespace(use_lora=True, lora_rank=2, lora_alpha=None, gradient_checkpointing=True)
        model = flow_models.make_trainable(args, parts.transformer, "cpu", torch.float32)
        trained = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        assert (
            "transformer_blocks.0.attn.add_k_proj" in trained and "transformer_blocks.0.ff.net.2" in trained
        )
        assert model.gradient_checkpointing


def test_lora_targets_cover_sd35_mediums_second_attention() -> None:
    """SD3.5-Medium's MMDiT-X blocks (dual_attention_layers) have a second image-stream attention, attn2: adapted
    too (audit 9: the attn.* suffixes missed it, 123 M weights of SD3.5-Medium without an adapter)."""
    from diffusers import SD3Transformer2DModel

    from tests.transformer_configs import tiny_sd3_transformer_config

    config = tiny_sd3_transformer_config(dual_attention_layers=(0,), qk_norm="rms_norm")
    args = argparse.Namespace(use_lora=True, lora_rank=2, lora_alpha=None, gradient_checkpointing=False)
    model = flow_models.make_trainable(args, SD3Transformer2DModel(**config), "cpu", torch.float32)
    trained = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    linears = {f"transformer_blocks.0.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert linears <= trained and not any("transformer_blocks.1.attn2" in n for n in trained)


def test_flow_options_are_checked(tiny_flow: dict[str, Path], tmp_path: Path) -> None:
    sd3 = flow_models.load_flow(_args(tiny_flow["sd3"]))
    with pytest.raises(ValueError, match="no guidance embedding: drop --guidance"):
        flow_options.check_flow_args(_args(tiny_flow["sd3"], guidance=3.5), sd3)
    with pytest.raises(ValueError, match="multiple of 16"):
        flow_options.check_flow_args(_args(tiny_flow["sd3"], resolution=72), sd3)
    with pytest.raises(ValueError, match=r"--max_sequence_length <= 512 for SD3 / SD3\.5"):
        flow_options.check_flow_args(_args(tiny_flow["sd3"], max_sequence_length=600), sd3)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="names 'StableDiffusionXLPipeline'"):
        flow_models.load_flow(_args(tmp_path))
    with pytest.raises(ValueError, match="family 'sd3', 'flux', 'qwen' or 'wan'"):
        flow_models.FlowDenoiser(sd3.transformer, "sdxl")
