"""examples/flow_dmd2.py: DMD2 / SiD / SIM few-step generators on one shared SD3 / FLUX transformer (issue 23, part 2).

CPU smoke runs on the tiny pipelines of :mod:`tests.examples.tiny_flow` (2 steps, a checkpoint after step 1,
resumed into a fresh folder): one copy of the base weights while training, the base bit-identical afterwards
(only the adapters train), exact resume, the generator's LoRA loaded by the diffusers pipeline and sampling
there as the script's DMD2 sampler does; SiD, SIM and the GAN term; the zero DMD gradient of a guidance-distilled
FLUX at initialisation (why the fake-score update runs first); 2-process DDP vs FSDP2 (the base sharded once) and
the FSDP2 run resumed, with the GAN term; DeepSpeed refused; option errors.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.example_modules import count_ema_updates, load_example
from tests.examples.flow_scripts import (  # noqa: F401 (autouse fixture)
    deterministic_runs,
    flow_critics,
    flow_dmd2,
    flow_encoding,
    flow_models,
    loop,
)
from tests.examples.tiny_flow import (
    IMAGE_SIZE,
    T5_LENGTH,
    smoke_argv,
    write_tiny_flow_models,
)
from tests.state_compare import assert_same_update


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_flow_models(tmp_path_factory.mktemp("tiny_flow_dmd2"), captions=["a cat", "a dog", ""])


def _argv(tiny: dict[str, Path], family: str, out: Path, *extra: str, prompts: bool = True) -> list[str]:
    return smoke_argv(tiny, family, out, "--lora_rank", "4", *extra, data="prompts" if prompts else None)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the loaded components and, when training starts, the number of live copies of the base weights.

    The fingerprint is the loaded transformer's ``norm_out.linear.weight`` (a base weight no adapter targets):
    every live tensor of its shape and values is one copy, counted once per storage (views share it).
    """
    seen: dict[str, Any] = {"copies": []}
    load_flow, train_loop = flow_models.load_flow, loop.train_loop

    def recording_load(args: Any) -> Any:
        parts = load_flow(args)
        seen["parts"] = parts
        seen["start"] = {k: v.clone() for k, v in parts.transformer.state_dict().items()}
        return parts

    def counting_loop(*args: Any, **kwargs: Any) -> Any:
        want = seen["start"]["norm_out.linear.weight"]
        gc.collect()
        storages = set()
        for obj in gc.get_objects():
            same_kind = (
                issubclass(type(obj), torch.Tensor) and obj.shape == want.shape and obj.is_floating_point()
            )
            if same_kind and torch.equal(obj.detach().float().cpu(), want.float()):
                storages.add(obj.untyped_storage().data_ptr())
        seen["copies"].append(len(storages - {want.untyped_storage().data_ptr()}))
        return train_loop(*args, **kwargs)

    monkeypatch.setattr(flow_models, "load_flow", recording_load)
    monkeypatch.setattr(loop, "train_loop", counting_loop)
    return seen


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dmd2_trains_only_adapters_of_one_base_resumes_exactly_and_loads_in_the_pipeline(
    family: str, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DMD2 preset (4-step grid, backward simulation) with gradient checkpointing, EMA and a validation grid."""
    seen = _spy(monkeypatch)
    extra = ["--gradient_checkpointing", "--generator_every", "1", "--use_ema", "--ema_decay", "0.5"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    val = ["--validation_prompts", "a cat", "--validation_steps", "2"]
    renoise, first_draws = flow_critics.renoise_steps, []

    def spying_renoise(
        denoiser: Any, noise: torch.Tensor, sigmas: Any, cond: Any, generator: Any, **kw: Any
    ) -> Any:
        ahead = torch.Generator().set_state(
            generator.get_state()
        )  # the first re-noising draw, without taking it
        first_draws.append(torch.equal(torch.randn(noise.shape, generator=ahead), noise.cpu().float()))
        return renoise(denoiser, noise, sigmas, cond, generator, **kw)

    monkeypatch.setattr(flow_critics, "renoise_steps", spying_renoise)
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, family, out_a, *extra, *val)))
    # DMD2's fresh re-noising noise, in training and in validation: never the initial noise again (audit 9: the
    # validation drew both from one seed, so its first step was a deterministic Euler step)
    assert len(first_draws) >= 2 and not any(first_draws)
    monkeypatch.setattr(flow_critics, "renoise_steps", renoise)
    # how evaluate.py samples the student: unguided (FLUX.1-dev: its embedded guidance), the grid of the trained size
    record = json.loads((out_a / "student_sampler.json").read_text())
    assert record == {
        "guidance_scale": 3.5 if family == "flux" else 1.0,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_frames": None,
        "grid_size": [IMAGE_SIZE, IMAGE_SIZE] if family == "flux" else None,  # FLUX's dynamic shift
        "max_sequence_length": T5_LENGTH,
    }
    assert seen["copies"] == [1], seen["copies"]  # one base: no copy of the transformer's weights
    # Only the adapters trained: every base weight is bit-identical to the loaded one.
    trained = seen["parts"].transformer.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == seen["start"].keys()
    assert all(torch.equal(base[k], seen["start"][k]) for k in base), "a base weight changed"
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-2.png"]
    sigmas = json.loads((out_a / "student_sigmas.json").read_text())
    assert len(sigmas) == 4 and sigmas[0] == 1.0

    flow_dmd2.main(
        flow_dmd2.parse_args(
            _argv(tiny, family, out_b, *extra, "--resume_from_checkpoint", str(out_a / "checkpoint-1"))
        )
    )
    ckpt = out_a / "checkpoint-1"
    gen_a, gen_b = (_lora(o / "pytorch_lora_weights.safetensors") for o in (out_a, out_b))
    fake_a, fake_b = (_lora(o / flow_critics.FAKE_LORA_NAME) for o in (out_a, out_b))
    assert all(k.startswith("transformer.") for k in gen_a) and gen_a.keys() == fake_a.keys()
    # Each adapter in its own checkpoint file; the EMA's start is the raw step-1 weights of its own run.
    fake1 = {"transformer." + k: v for k, v in _lora(ckpt / "fake_lora.safetensors").items()}
    assert any(not torch.equal(fake1[k], fake_b[k]) for k in fake_b), "the resumed run did not train"
    assert_same_update(fake_b, fake_a, fake1, what="resumed vs uninterrupted fake score")
    gen1 = {"transformer." + k: v for k, v in _lora(ckpt / "unet_lora.safetensors").items()}
    assert_same_update(gen_b, gen_a, gen1, what="resumed vs uninterrupted generator (EMA)")
    assert any(not torch.equal(gen_a[k], fake_a[k]) for k in gen_a if "lora_B" in k), "adapters trained apart"

    # The pipeline loads the generator's LoRA; with the saved scheduler (shift 1, stochastic sampling) it samples
    # as the script's DMD2 sampler: SD3 on the whole 4-step grid (the same noise stream), FLUX its one-step grid.
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from diffdistill.students import load_lora

    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(str(tiny[family]))
    pipe.load_lora_weights(str(out_a))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out_a), subfolder="scheduler")
    args = flow_dmd2.parse_args(_argv(tiny, family, out_a))
    parts = flow_models.load_flow(args)
    guidance = 3.5 if family == "flux" else None
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    grid = sigmas if family == "sd3" else sigmas[:1]
    torch.manual_seed(7)  # the pipeline's scheduler draws its re-noising noise from the global generator
    with torch.no_grad():
        got = pipe(
            "a cat",
            sigmas=grid,
            guidance_scale=guidance or 1.0,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            latents=flow_models.pack_latents(noise) if family == "flux" else noise,
            max_sequence_length=T5_LENGTH,
            output_type="latent",
        ).images
        student = load_lora(
            parts.transformer, out_a / "pytorch_lora_weights.safetensors", prefix="transformer"
        )
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        denoiser = flow_models.FlowDenoiser(student, family, guidance)
        want = flow_critics.renoise_steps(denoiser, noise, grid, cond, torch.Generator().manual_seed(7))
    if family == "flux":
        got = flow_models.unpack_latents(got, *noise.shape[-2:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flux_fake_score_equals_real_at_init_so_dmd_gradient_is_zero() -> None:
    """The design question of a guidance-distilled teacher: the fake score takes the real score's embedded guidance
    (FastGen) and its adapter starts at zero, so at step 0 the DMD gradient is exactly zero (the script runs the
    fake-score update first); SD3's real score has CFG 7 and the unguided fake score differs from it at once."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from diffdistill.losses import dmd_loss
    from diffdistill.schedulers import TeacherSolver
    from tests.transformer_configs import tiny_flux_transformer_config, tiny_sd3_transformer_config

    schedule = flow_critics.loss_schedule()
    args = type("Args", (), {"lora_rank": 2, "lora_alpha": None, "gradient_checkpointing": False})()
    gen = torch.Generator().manual_seed(0)
    norms = {}
    for family, cls, config in (
        ("flux", FluxTransformer2DModel, tiny_flux_transformer_config(in_channels=16)),
        ("sd3", SD3Transformer2DModel, tiny_sd3_transformer_config()),
    ):
        torch.manual_seed(0)
        base = flow_critics.build_shared_base(args, cls(**config), "cpu", torch.float32, family)
        channels = 4
        x = torch.randn(2, channels, 8, 8, generator=gen, requires_grad=True)
        cond = {
            "encoder_hidden_states": torch.randn(2, 6, config["joint_attention_dim"], generator=gen),
            "pooled_projections": torch.randn(2, config["pooled_projection_dim"], generator=gen),
        }
        fake_model = flow_models.FlowDenoiser(base.view("fake"), family)
        real_model = flow_models.FlowDenoiser(base.view(None), family)
        if family == "flux":
            real = TeacherSolver(real_model, schedule, guidance_scale=3.5, guidance_input="guidance")
            fake = TeacherSolver(fake_model, schedule, guidance_scale=3.5, guidance_input="guidance")
            uncond = None
        else:
            real = TeacherSolver(real_model, schedule, guidance_scale=7.0)
            fake = TeacherSolver(fake_model, schedule)
            uncond = {k: torch.zeros_like(v[:1]) for k, v in cond.items()}
        loss, logs = dmd_loss(x, real, fake, schedule=schedule, cond=cond, uncond=uncond, generator=gen)
        loss.backward()
        norms[family] = (float(logs["grad_norm"]), float(x.grad.abs().max()))
    assert norms["flux"] == (0.0, 0.0), norms
    assert norms["sd3"][0] > 0 and norms["sd3"][1] > 0, norms


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("flux", ["--loss", "sid", "--gradient_checkpointing"]),
        ("sd3", ["--loss", "sim", "--fake_guidance_scale", "2"]),
    ],
)
def test_sid_and_sim_train_both_adapters(
    family: str, extra: list[str], tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SiD (4-step grid) on FLUX.1-dev and one-step SIM with SiD-LSG's guided fake score on SD3: one step. The SIM
    preset starts at SIM's sigma_init (EDM 2.5 = flow 2.5 / 3.5): its generator is fed 0.714 z, in training and in
    the validation grid, and the record tells evaluate.py so."""
    starts: list[float] = []
    renoise = flow_critics.renoise_steps

    def spying_renoise(denoiser, noise, sigmas, cond, generator, steps=None):  # type: ignore[no-untyped-def]
        starts.append(sigmas[0])
        return renoise(denoiser, noise, sigmas, cond, generator, steps=steps)

    monkeypatch.setattr(flow_critics, "renoise_steps", spying_renoise)
    out = tmp_path / "out"
    argv = _argv(tiny, family, out, "--max_train_steps", "1", "--validation_prompts", "a cat", *extra)
    flow_dmd2.main(flow_dmd2.parse_args(argv))
    gen, fake = _lora(out / "pytorch_lora_weights.safetensors"), _lora(out / flow_critics.FAKE_LORA_NAME)
    for name, state in (("generator", gen), ("fake score", fake)):
        assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k), (
            f"the {name} did not train"
        )
    sigmas = json.loads((out / "student_sigmas.json").read_text())
    record = json.loads((out / "student_sampler.json").read_text())
    if "sid" in extra:
        assert len(sigmas) == 4 and sigmas[0] == 1.0 and "initial_noise_scale" not in record
    else:
        assert sigmas == [2.5 / 3.5] and record["initial_noise_scale"] == 2.5 / 3.5
    assert starts and set(starts) == {sigmas[0]}  # training and validation: the run's grid


def test_renoise_steps_start_from_the_zero_image_noised_to_the_first_sigma() -> None:
    """DMD2's sampler starts from sigmas[0] z: z itself (bit for bit) on a grid from 1.0, SiD's sigma_init z on a
    grid from below; the denoiser sees that state at t = 1000 sigma_0, and the prediction is x0 = x - sigma v."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def denoiser(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        seen.append((x.clone(), t.clone()))
        return torch.full_like(x, 0.5)

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(flow_critics.renoise_steps(denoiser, z, [1.0, 0.5], {}, gen, steps=0), z)
    torch.testing.assert_close(
        flow_critics.renoise_steps(denoiser, z, [0.7143], {}, gen, steps=0), 0.7143 * z, rtol=0, atol=0
    )
    x0 = flow_critics.renoise_steps(denoiser, z, [0.7143], {}, gen)
    torch.testing.assert_close(seen[-1][0], 0.7143 * z, rtol=0, atol=0)
    torch.testing.assert_close(seen[-1][1], torch.full((2,), 714.3))
    torch.testing.assert_close(x0, 0.7143 * z - 0.7143 * 0.5)


def test_dmd2_gan_heads_on_the_fake_score(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--gan_weight: LADD heads on the fake view's blocks, trained on real image latents; resumed exactly; the
    same with gradient checkpointing."""
    extra = ["--gan_weight", "--train_data_dir", str(tiny["images"]), "--discriminator_norm_groups", "4"]
    extra += ["--generator_every", "1", "--num_student_steps", "2"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    args = flow_dmd2.parse_args(_argv(tiny, "sd3", out_a, *extra, prompts=False))
    assert args.gan_weight == flow_dmd2.FASTGEN_FLUX_GAN_WEIGHT
    flow_dmd2.main(args)
    resume = ["--resume_from_checkpoint", str(out_a / "checkpoint-1")]
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, "sd3", out_b, *extra, *resume, prompts=False)))
    heads = [p.name for p in (out_a / "checkpoint-1").iterdir() if p.name.startswith("model")]
    assert heads, "the GAN heads are not checkpointed"
    a, b = (_lora(o / flow_critics.FAKE_LORA_NAME) for o in (out_a, out_b))
    step1 = {
        "transformer." + k: v for k, v in _lora(out_a / "checkpoint-1" / "fake_lora.safetensors").items()
    }
    assert_same_update(b, a, step1, what="resumed vs uninterrupted fake score with the GAN classifier")
    # --gradient_checkpointing: the heads' pass recomputes the base's blocks under the fake adapter (the shared
    # base's own checkpointing, which the extractor leaves in force): the same updates as without it.
    out_c = tmp_path / "c"
    flow_dmd2.main(
        flow_dmd2.parse_args(_argv(tiny, "sd3", out_c, *extra, "--gradient_checkpointing", prompts=False))
    )
    c = _lora(out_c / flow_critics.FAKE_LORA_NAME)
    assert_same_update(c, a, step1, what="fake score with the GAN classifier, checkpointed vs not")


def test_dmd2_fsdp2_equals_ddp_and_resumes_on_two_processes(tiny: dict[str, Path], tmp_path: Path) -> None:
    """2 CPU processes (gloo): DDP, and FSDP2 with the frozen base sharded once (``SharedBase.fully_shard``) and each
    view sharding its adapter with its optimiser, then FSDP2 resumed from its sharded step-1 checkpoint. FLUX.1-dev,
    gradient checkpointing, DMD2's GAN term (LADD heads on the fake score's blocks: their pass runs the sharded base
    under the fake adapter), a generator update in both steps, the EMA release of the generator. The generator's
    (EMA) and the fake score's adapters of each run against the size of DDP's step 2 (tests/state_compare.py: the
    engines sum the gradients in another order; a lost shard, optimiser state or EMA would differ by O(1), and so
    did the heads conditioned on sigma instead of sigma * 1000 when FSDP2 renamed the sharded FLUX's class: off by
    41 % of the fake score's update and 71-82 % of the generator's)."""
    from tests.examples.test_sdxl_scripts import _two_process_runs

    extra = ["--generator_every", "1", "--gradient_checkpointing", "--use_ema", "--ema_decay", "0.5"]
    extra += ["--gan_weight", "--train_data_dir", str(tiny["images"]), "--discriminator_norm_groups", "4"]
    out = _two_process_runs(
        "flow_dmd2", _argv(tiny, "flux", tmp_path, *extra, prompts=False), tmp_path, "fsdp"
    )
    ddp_ckpt = out["ddp"] / "checkpoint-1"
    for name, ckpt_file in (
        ("pytorch_lora_weights.safetensors", "unet_lora.safetensors"),
        (flow_critics.FAKE_LORA_NAME, "fake_lora.safetensors"),
    ):
        ddp, fsdp, resumed = (_lora(out[k] / name) for k in ("ddp", "fsdp", "fsdp_resumed"))
        step1 = {"transformer." + k: v for k, v in _lora(ddp_ckpt / ckpt_file).items()}
        assert_same_update(fsdp, ddp, step1, what=f"FSDP2 vs DDP ({name})")
        assert_same_update(resumed, fsdp, step1, what=f"resumed vs uninterrupted FSDP2 ({name})")
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny["flux"]))
    pipe.load_lora_weights(str(out["fsdp"]))  # written from the gathered adapter
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_ladd_heads_of_a_sharded_flux_take_sigma_times_1000() -> None:
    """The cause of the FSDP2 gap above: FSDP2's ``fully_shard`` swaps a module's class for a generated subclass
    ``FSDP<Name>`` (torch's own construction, repeated here without a process group), and the LADD heads' noise
    level, ``timestep * timestep_scale``, must stay sigma * 1000 for the sharded FLUX (which takes sigma)."""
    from diffusers import FluxTransformer2DModel
    from torch.distributed.fsdp import FSDPModule

    from diffdistill.discriminators import LADDDiscriminator
    from tests.transformer_configs import tiny_flux_transformer_config

    flux = FluxTransformer2DModel(**tiny_flux_transformer_config(in_channels=16))
    plain = LADDDiscriminator(flux, [0], norm_groups=4).timestep_scale
    flux.__class__ = type(f"FSDP{type(flux).__name__}", (FSDPModule, type(flux)), {})
    assert (plain, LADDDiscriminator(flux, [0], norm_groups=4).timestep_scale) == (1000.0, 1000.0)


def test_dmd2_refuses_deepspeed(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before any model is loaded, with the engines that work (the GAN term included)."""
    import types

    from accelerate.utils import DistributedType

    runtime = load_example("training.runtime")
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_main_process=True)
    monkeypatch.setattr(runtime, "make_accelerator", lambda args, name, **kw: accelerator)
    monkeypatch.setattr(flow_models, "load_flow", lambda args: pytest.fail("the engine was not refused"))
    images = ["--gan_weight", "--train_data_dir", str(tiny["images"])]
    args = flow_dmd2.parse_args(_argv(tiny, "sd3", tmp_path, *images, prompts=False))
    with pytest.raises(
        ValueError, match=r"runs under DDP, FSDP2 or one process, not DeepSpeed: DeepSpeed wraps"
    ):
        flow_dmd2.main(args)
    fsdp2 = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True)
    flow_critics.check_engine(fsdp2)  # the GAN term under FSDP2: tested equal to DDP above


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--student_sigmas", "0.5", "0.75"], r"strictly decreasing noise levels in \(0, 1\]"),
        (["--student_sigmas", "1.2"], r"strictly decreasing noise levels in \(0, 1\]"),
        (["--student_sigmas", "0.5", "0"], r"strictly decreasing noise levels in \(0, 1\]"),
        (["--loss_sigma_range", "0.5", "0.2"], "0 < LOW <= HIGH < 1"),
        (["--num_student_steps", "0"], "--num_student_steps >= 1"),
        (["--gan_weight"], "pass --train_data_dir"),
        (["--gan_weight", "-1", "--train_data_dir", "IMAGES"], "--gan_weight >= 0"),
        (["--guidance_scale", "-3"], r"--guidance_scale >= 1 \(1: no classifier-free guidance\), but got -3"),
        (["--fake_guidance_scale", "0"], r"--fake_guidance_scale >= 1 .*but got 0"),
        (["--fake_guidance", "-1"], r"--fake_guidance > 0 \(FLUX.1-dev's embedded guidance"),
    ],
)
def test_dmd2_options_are_checked(
    tiny: dict[str, Path], tmp_path: Path, extra: list[str], match: str
) -> None:
    extra = [str(tiny["images"]) if a == "IMAGES" else a for a in extra]  # an image folder (checked first)
    with pytest.raises(ValueError, match=match):
        flow_dmd2.parse_args(_argv(tiny, "sd3", tmp_path, *extra, prompts="--train_data_dir" not in extra))


def test_dmd2_presets_and_family_guidance(tiny: dict[str, Path], tmp_path: Path) -> None:
    argv = _argv(tiny, "flux", tmp_path)
    del argv[argv.index("--learning_rate") : argv.index("--learning_rate") + 2]  # the preset's value
    args = flow_dmd2.parse_args(argv)
    assert (args.preset, args.loss, args.num_student_steps, args.learning_rate) == ("dmd2", "dmd", 4, 1e-5)
    assert (args.generator_every, args.use_lora, args.loss_sigma_range) == (5, True, (0.001, 0.999))
    sid = flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path, "--loss", "sid", "--learning_rate", "2e-6"))
    assert (sid.preset, sid.sid_alpha, sid.adam_beta1, sid.learning_rate) == ("sid", 1.0, 0.0, 2e-6)
    assert sid.student_sigmas is None and args.student_sigmas is None  # the model's grid from pure noise
    # SIM: one step fed SIM's sigma_init z (EDM 2.5 = flow 2.5 / 3.5) unless the grid is given otherwise
    sim = flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path, "--loss", "sim"))
    assert (sim.preset, sim.student_sigmas, sim.num_student_steps) == ("sim", [2.5 / 3.5], 1)
    assert sim.student_sigmas is not flow_dmd2.PRESETS["sim"]["student_sigmas"]  # a copy
    four = flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path, "--loss", "sim", "--num_student_steps", "4"))
    assert (four.student_sigmas, four.num_student_steps) == (None, 4)
    pure = flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path, "--loss", "sim", "--student_sigmas", "1.0"))
    assert (pure.student_sigmas, pure.num_student_steps) == ([1.0], 1)
    parts = flow_models.load_flow(args)
    flow_dmd2.check_family_args(args, parts)
    assert (
        args.guidance == args.fake_guidance == 3.5
    )  # FastGen: the fake score takes the real score's guidance
    bad = flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path, "--guidance_scale", "4"))
    with pytest.raises(ValueError, match=r"FLUX\.1 has no unconditional pass"):
        flow_dmd2.check_family_args(bad, parts)
    sd3 = flow_dmd2.parse_args(_argv(tiny, "sd3", tmp_path, "--fake_guidance", "2"))
    with pytest.raises(ValueError, match=r"SD3 / SD3\.5 takes --fake_guidance_scale"):
        flow_dmd2.check_family_args(sd3, flow_models.load_flow(sd3))


def test_release_average_moves_once_per_generator_update(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--use_ema with --generator_every 2 over 3 steps: the generator steps at steps 0 and 2, and so does its
    average (audit 9: updated every step, the EMA decayed --generator_every times per generator update)."""
    updates = count_ema_updates(monkeypatch)
    steps = []
    step = flow_critics.FlowScoreDistillation._generator_step

    def recording(self: Any) -> Any:
        steps.append(self.loop.step_count)
        return step(self)

    monkeypatch.setattr(flow_critics.FlowScoreDistillation, "_generator_step", recording)
    extra = ["--use_ema", "--generator_every", "2", "--max_train_steps", "3", "--checkpointing_steps", "0"]
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, "sd3", tmp_path / "out", *extra)))
    assert steps == [0, 2] and len(updates) == 2


def test_flux_gan_heads_read_the_fake_score_at_its_guidance(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX.1-dev with --fake_guidance 2 (the real score's --guidance 3.5): DMD2's classifier reads the fake score's
    features, the base under the fake adapter at the fake score's guidance input (audit 9: it read them at 3.5)."""
    built: list[Any] = []
    init = flow_critics.FakeFeatureGAN.__init__

    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(flow_critics.FakeFeatureGAN, "__init__", recording)
    extra = ["--gan_weight", "--train_data_dir", str(tiny["images"]), "--discriminator_norm_groups", "4"]
    extra += ["--fake_guidance", "2", "--max_train_steps", "1", "--checkpointing_steps", "0"]
    flow_dmd2.main(flow_dmd2.parse_args(_argv(tiny, "flux", tmp_path / "out", *extra, prompts=False)))
    assert [gan.features.guidance for gan in built] == [2.0]
