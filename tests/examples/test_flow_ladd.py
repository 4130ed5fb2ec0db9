"""Smoke tests of examples/flow_ladd.py (LADD) on tiny SD3 and FLUX pipelines: 2 optimisation steps, the LoRA
student and its teacher on one base (one copy, base unchanged), exact resume, the released LoRA / transformer
loaded by the diffusers pipeline, 2-process DDP / FSDP2 / ZeRO-3 runs against one process, option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.examples.flow_scripts import (  # noqa: F401 (autouse fixture)
    data_sources,
    deterministic_runs,
    flow_encoding,
    flow_ladd,
    flow_models,
)
from tests.examples.test_flow_dmd2 import _spy
from tests.examples.test_sdxl_scripts import _launch_two_processes
from tests.examples.tiny_flow import (
    IMAGE_SIZE,
    T5_LENGTH,
    smoke_argv,
    write_tiny_flow_models,
)
from tests.state_compare import assert_same_update

STUDENT_SIGMAS = ["1.0", "0.75", "0.5", "0.25"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_flow_models(tmp_path_factory.mktemp("tiny_flow_ladd"))


def _argv(tiny: dict[str, Path], family: str, out: Path, samples: Path, *extra: str) -> list[str]:
    return smoke_argv(
        tiny,
        family,
        out,
        *("--teacher_samples_dir", str(samples), "--num_teacher_samples", "4"),
        *("--teacher_samples_shard_size", "2", "--teacher_steps", "2", "--discriminator_norm_groups", "4"),
        *("--student_sigmas", *STUDENT_SIGMAS),
        *extra,
    )


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_ladd_lora_on_one_base_resumes_exactly_and_loads_in_the_pipeline(
    family: str, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LoRA student and its teacher are one transformer (the adapter on / off): one copy of the base
    weights while training, the base bit-identical afterwards; exact resume; the LoRA samples in the pipeline."""
    seen = _spy(monkeypatch)
    # alpha != rank: the pipeline must read the scale alpha / rank from the file's metadata
    lora = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8"]
    val = ["--validation_prompts", "a cat", "", "--validation_steps", "1"]
    out_a, out_b, samples = tmp_path / "a", tmp_path / "b", tmp_path / "samples"
    flow_ladd.main(
        flow_ladd.parse_args(
            _argv(
                tiny,
                family,
                out_a,
                samples,
                *lora,
                "--gradient_checkpointing",
                *val,
                "--report_to",
                "tensorboard",
            )
        )
    )
    assert seen["copies"] == [1], seen["copies"]  # the teacher is no second copy of the transformer
    trained = seen["parts"].transformer.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == seen["start"].keys()
    assert all(torch.equal(base[k], seen["start"][k]) for k in base), "a base weight changed"
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-1.png", "step-2.png"]
    assert len(list(samples.iterdir())) == 2 and any((out_a / "logs").rglob("events.out.tfevents.*"))
    # Resumed WITHOUT gradient checkpointing: its second step must equal the checkpointed run's, whose backward
    # recomputed the student's blocks under its adapter and the discriminator's teacher blocks with it off.
    resume = ["--resume_from_checkpoint", str(out_a / "checkpoint-1")]
    flow_ladd.main(flow_ladd.parse_args(_argv(tiny, family, out_b, samples, *lora, *resume)))
    a, b = (
        _lora(out_a / "pytorch_lora_weights.safetensors"),
        _lora(out_b / "pytorch_lora_weights.safetensors"),
    )
    step1 = {
        "transformer." + k: v for k, v in _lora(out_a / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert a.keys() == b.keys() == step1.keys() and all(k.startswith("transformer.") for k in a)
    assert any(not torch.equal(step1[k], b[k]) for k in b), "the resumed run did not train"
    assert_same_update(b, a, step1, what="resumed (not checkpointed) vs uninterrupted (checkpointed) LoRA")

    # The pipeline loads the LoRA and, with the saved scheduler, samples on the student's sigmas exactly as the
    # script's validation sampler does with the same adapter loaded by diffdistill.
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from diffdistill.students import load_lora

    pipe_class = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = pipe_class.from_pretrained(str(tiny[family]))
    pipe.load_lora_weights(str(out_a))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out_a), subfolder="scheduler")
    args = flow_ladd.parse_args(_argv(tiny, family, out_a, samples))
    parts = flow_models.load_flow(args)
    guidance = 3.5 if family == "flux" else None
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    sigmas = [float(s) for s in STUDENT_SIGMAS]
    assert json.loads((out_a / "student_sigmas.json").read_text()) == sigmas  # what evaluate.py samples on
    record = json.loads(
        (out_a / "student_sampler.json").read_text()
    )  # and with what (training.student_sampler)
    assert (record["guidance_scale"], record["grid_size"]) == (
        guidance or 1.0,
        None,
    )  # explicit sigmas: any size
    with torch.no_grad():
        got = pipe(
            "a cat",
            sigmas=sigmas,
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
        want = flow_models.euler_sample(
            flow_models.FlowDenoiser(student, family, guidance), noise, sigmas, cond
        )
    if family == "flux":
        got = flow_models.unpack_latents(got, *noise.shape[-2:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ladd_full_flux_transformer_bf16_with_ema_and_r1(tiny: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    extra = [
        "--use_ema",
        "--r1_gamma",
        "0.1",
        "--r1_approximate_sigma",
        "0.1",
        "--gan_loss",
        "non_saturating",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
    ]
    out = tmp_path / "full"
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state: the in-process runs before this one fixed mixed precision "no".
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        flow_ladd.main(flow_ladd.parse_args(_argv(tiny, "flux", out, tmp_path / "samples", *extra)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    start = FluxTransformer2DModel.from_pretrained(str(tiny["flux"]), subfolder="transformer").state_dict()
    trained = FluxTransformer2DModel.from_pretrained(str(out / "transformer")).state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the transformer did not train"
    ema = torch.load(out / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)
    assert "num_updates" in ema
    # the script's whole sampler record replaces the size-only one save_unet wrote before it (audit 18)
    record = json.loads((out / "student_sampler.json").read_text())
    assert record["guidance_scale"] == 3.5 and record["max_sequence_length"] > 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero3"])
def test_ladd_lora_on_two_processes_equals_one_process_on_the_whole_batch(
    mode: str, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 CPU processes (gloo) under DDP, accelerate's FSDP2 (the shared base sharded once, the adapter by its view)
    or DeepSpeed ZeRO-3 (the adapter partitioned by the student's engine) make the same 2 LoRA steps as ONE process
    accumulating the same two micro-batches (tests/state_compare.py: they differ in the order float32 gradients
    are summed). The one-process run's micro-batch ``m`` draws from process ``m``'s generator; the generator and
    the discriminator both update once per step from gradients averaged over the two micro-batches, as the
    processes' all-reduce averages them."""
    if mode == "zero3":
        pytest.importorskip("deepspeed")
    samples = tmp_path / "samples"
    out = {name: tmp_path / name for name in (mode, "one")}
    argv = {
        name: _argv(tiny, "sd3", folder, samples, "--use_lora", "--lora_rank", "4")
        for name, folder in out.items()
    }
    argv[mode][argv[mode].index("--train_batch_size") + 1] = "1"  # per process
    argv["one"][argv["one"].index("--train_batch_size") + 1] = "1"  # per micro-batch
    _launch_two_processes("flow_ladd", argv[mode], mode=mode)
    assert (out[mode] / "checkpoint-1" / "random_states_1.pkl").is_file(), f"{mode} ran in one process"
    sharded = {"fsdp": "pytorch_model_fsdp_0", "zero3": "pytorch_model_1"}.get(mode)  # FSDP2's / 2nd engine's
    assert sharded is None or (out[mode] / "checkpoint-1" / sharded).is_dir(), (
        f"{mode} wrote no sharded state"
    )
    assert len(list(samples.iterdir())) == 2  # one shard per process, reused by the one-process run
    per_process = data_sources.step_generator
    monkeypatch.setattr(
        data_sources,
        "step_generator",
        lambda seed, step, process_index=0, micro=0: per_process(seed, step, micro, process_index),
    )
    flow_ladd.main(flow_ladd.parse_args([*argv["one"], "--gradient_accumulation_steps", "2"]))
    two, one = (_lora(out[name] / "pytorch_lora_weights.safetensors") for name in (mode, "one"))
    step1 = {
        "transformer." + k: v for k, v in _lora(out["one"] / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert_same_update(two, one, step1, what=f"{mode} on 2 processes vs one process on the whole batch")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--student_sigmas", "0.5", "1.0"], "strictly decreasing noise levels"),
        (["--student_sigma_weights", "1", "1"], "4 non-negative weights"),
        (["--r1_gamma", "1"], "needs --r1_approximate_sigma"),
        (["--teacher_steps", "0"], "--teacher_steps >= 1"),
    ],
)
def test_ladd_options_are_checked(
    tiny: dict[str, Path], tmp_path: Path, extra: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        flow_ladd.parse_args(_argv(tiny, "sd3", tmp_path, tmp_path, *extra))


def test_ladd_refuses_stale_samples_and_flux_cfg(tiny: dict[str, Path], tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    one_step = ["--max_train_steps", "1", "--use_lora", "--lora_rank", "2"]
    flow_ladd.main(flow_ladd.parse_args(_argv(tiny, "sd3", tmp_path / "a", samples, *one_step)))
    stale = _argv(tiny, "sd3", tmp_path / "b", samples, *one_step)
    stale[stale.index("--teacher_steps") + 1] = "3"
    with pytest.raises(
        ValueError, match="was made with teacher_steps=2 and this run asks for teacher_steps=3"
    ):
        flow_ladd.main(flow_ladd.parse_args(stale))
    flux = _argv(tiny, "flux", tmp_path / "c", tmp_path / "s2", "--teacher_guidance_scale", "4")
    with pytest.raises(ValueError, match=r"FLUX\.1 takes its guidance as an input"):
        flow_ladd.main(flow_ladd.parse_args(flux))
    images = tmp_path / "images"  # a folder with an image: the shared check of --train_data_dir passes
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="pass --prompts_file"):
        flow_ladd.parse_args([*_argv(tiny, "sd3", tmp_path, tmp_path), "--train_data_dir", str(images)])


def test_synthetic_samples_cover_the_prompt_list_once_per_epoch() -> None:
    """Teacher samples (LADD, prompt-only KD) and Diffusion2GAN's pairs take their prompts by
    ``data_sources.covering_prompts``: each block of N samples (N prompts) uses every prompt once, in an order drawn
    per block; a shard's prompts depend only on its sample range (audit 9: independent draws with replacement left
    27 of 64 prompts unused at 64 samples)."""
    prompts = [f"prompt {i}" for i in range(10)]
    picked = data_sources.covering_prompts(prompts, 0, 25, seed=3)
    assert sorted(picked[:10]) == sorted(prompts) and sorted(picked[10:20]) == sorted(prompts)
    assert len(set(picked[20:])) == 5
    assert picked[:10] != picked[10:20] and picked[:10] != prompts  # a fresh order per block, not the list's
    shards = [
        data_sources.covering_prompts(prompts, first, n, seed=3) for first, n in ((0, 7), (7, 11), (18, 7))
    ]
    assert [p for shard in shards for p in shard] == picked  # any split into shards, made in any order
    assert data_sources.covering_prompts(prompts, 0, 10, seed=4) != picked[:10]
