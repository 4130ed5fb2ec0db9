"""examples/flow_kd.py: layer-level KD into a block-removed SD3 / FLUX transformer (issue 23, part 4).

CPU smoke runs of 2 steps on the tiny pipelines of :mod:`tests.examples.tiny_flow` (SD3: 4 joint blocks; FLUX: 2
double-stream + 3 single-stream blocks, guidance-embedded as FLUX.1-dev), each resumed from its step-1 checkpoint
into a fresh folder (the resumed run must make the uninterrupted run's second step), the removal report checked
against the saved student, and the student run in the diffusers pipeline. 2-process DDP and FSDP2 runs, each
compared with one process accumulating the same two micro-batches.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from tests.examples.example_modules import load_example
from tests.examples.test_sdxl_scripts import _launch_two_processes
from tests.examples.tiny_flow import (
    CLIP_LENGTH,
    IMAGE_SIZE,
    T5_LENGTH,
    smoke_argv,
    write_tiny_flow_models,
)
from tests.examples.tiny_sdxl import deterministic_kernels
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(autouse=True)
def _deterministic_kernels() -> Any:
    """Deterministic kernels on a GPU (resume is compared against the size of one step); a no-op on CPU."""
    with deterministic_kernels():
        yield


def _script() -> ModuleType:
    return load_example("flow_kd")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD3 and FLUX pipelines (FLUX.1-dev's layout and, ``schnell``, one without the guidance
    embedding) and 3 images, two captioned."""
    return write_tiny_flow_models(
        tmp_path_factory.mktemp("flow_kd"),
        prompts=None,
        captions=["a red cube", "a blue sphere", ""],
        schnell=True,
    )


def _argv(tiny: dict[str, Path], family: str, out: Path, *extra: str) -> list[str]:
    return smoke_argv(
        tiny,
        family,
        out,
        *("--checkpoints_total_limit", "2", "--validation_inference_steps", "2"),
        *extra,
        data="images",
        learning_rate="1e-4",
    )


def _transformer(family: str, path: Path, **kw: Any) -> Any:
    import diffusers

    return getattr(diffusers, CLASSES[family]).from_pretrained(str(path), **kw)


def _run_and_resume(tiny: dict[str, Path], family: str, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """Run 2 steps (checkpoint and validation grid after each), then the same run resumed from checkpoint-1;
    assert that both made the same second step. Returns both output folders."""
    script = _script()
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    grid = ("--validation_prompts", "a cat", "", "--validation_steps", "1")
    script.main(script.parse_args(_argv(tiny, family, out_a, *extra, *grid)))
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-1.png", "step-2.png"]
    ckpt = out_a / "checkpoint-1"
    script.main(
        script.parse_args([*_argv(tiny, family, out_b, *extra), "--resume_from_checkpoint", str(ckpt)])
    )
    from safetensors.torch import load_file

    # The step-1 student is in the full-model checkpoint accelerate wrote (with --use_ema the released weights
    # are the average: a resume that lost the average's state would differ from it by O(the update)).
    at_step1 = load_file(str(ckpt / "model.safetensors"))
    a = _transformer(family, out_a / "transformer").state_dict()
    b = _transformer(family, out_b / "transformer").state_dict()
    assert_same_update(b, a, at_step1, what=f"resumed vs uninterrupted {family} student")
    return out_a, out_b


def _check_report(tiny: dict[str, Path], family: str, out: Path) -> dict[str, Any]:
    """The report JSON (before training and beside the student's config) against the saved student."""
    record = json.loads((out / "transformer" / "transformer_block_removal.json").read_text())
    assert record == json.loads((out / "transformer_block_removal.json").read_text())
    student = _transformer(family, out / "transformer")
    teacher = _transformer(family, tiny[family], subfolder="transformer")
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert record["student_parameters"] == n_student < n_teacher == record["teacher_parameters"]
    assert record["removed_fraction"] == pytest.approx(1 - n_student / n_teacher)
    assert 0 < record["student_flops"] < record["teacher_flops"]
    # FLOPs at the run's latents and text length (SD3: CLIP tokens + T5 tokens side by side; FLUX: T5 only).
    tokens = T5_LENGTH + (CLIP_LENGTH if family == "sd3" else 0)
    assert record["flops_at"] == {"latent_size": IMAGE_SIZE // 8, "text_tokens": tokens}
    assert record["family"] == family and record["teacher"] == str(tiny[family].resolve())
    assert record["initialized"] is True
    for key in ("num_layers", "num_single_layers"):
        if key in record["config"]:
            assert student.config[key] == record["config"][key]
    return record


def _run_pipeline(tiny: dict[str, Path], family: str, out: Path) -> None:
    """The student runs in the family's diffusers pipeline (one step, latents out)."""
    import diffusers

    student = _transformer(family, out / "transformer")
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(tiny[family]), transformer=student)
    with torch.no_grad():
        latents = pipe(
            "a cat",
            num_inference_steps=1,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            max_sequence_length=T5_LENGTH,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
    assert torch.isfinite(latents).all()


def test_sd3_half_trains_resumes_and_runs_in_the_pipeline(tiny: dict[str, Path], tmp_path: Path) -> None:
    out_a, _ = _run_and_resume(tiny, "sd3", tmp_path, "--preset", "sd3-half")
    record = _check_report(tiny, "sd3", out_a)
    # sd3-half on 4 joint blocks: spread 0.5 keeps blocks 0 and 3 (the context-pre-only last one).
    assert record["module_map"] == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.1": "transformer_blocks.3",
    }
    assert record["removed"] == ["transformer_blocks.1", "transformer_blocks.2"]
    assert record["kd_pairs"] == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.3": "transformer_blocks.1",
    }
    _run_pipeline(tiny, "sd3", out_a)


def test_flux_mini_with_ema_and_checkpointing_resumes_and_runs_in_the_pipeline(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    extra = ("--preset", "flux-mini", "--use_ema", "--ema_decay", "0.5", "--gradient_checkpointing")
    out_a, _ = _run_and_resume(tiny, "flux", tmp_path, *extra)
    record = _check_report(tiny, "flux", out_a)
    # flux-mini: every 4th of the 5 blocks in execution order: double 0 and single 2 (execution index 4).
    assert record["module_map"] == {
        "transformer_blocks.0": "transformer_blocks.0",
        "single_transformer_blocks.0": "single_transformer_blocks.2",
    }
    student = _transformer("flux", out_a / "transformer")
    assert student.config.guidance_embeds  # FLUX.1-dev's guidance input is kept
    # the trained size for evaluate.py (checkpoints.save_unet; audit 17 / 18)
    size = json.loads((out_a / "student_sampler.json").read_text())
    assert size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_frames": None}
    _run_pipeline(tiny, "flux", out_a)


def test_kd_pairs_and_features_reach_the_loss(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explicit keep lists, ``--kd_target span_end`` and a guided teacher: the pairs LayerKD gets, a non-zero
    feature term per pair, and the output-KD target of the guided teacher."""
    script = _script()
    made: list[Any] = []
    layer_kd = script.LayerKD

    def spy(*a: Any, **kw: Any) -> Any:
        made.append(layer_kd(*a, **kw))
        return made[-1]

    monkeypatch.setattr(script, "LayerKD", spy)
    logs: list[dict[str, torch.Tensor]] = []
    scalar_logs = script.loop.scalar_logs
    monkeypatch.setattr(script.loop, "scalar_logs", lambda d, *a: logs.append(d) or scalar_logs(d, *a))
    extra = ("--keep_blocks", "0", "2", "--kd_target", "span_end", "--teacher_guidance_scale", "3")
    argv = _argv(tiny, "sd3", tmp_path / "out", *extra)
    argv[argv.index("--max_train_steps") + 1] = "1"
    script.main(script.parse_args(argv))
    (kd,) = made
    # Student block 0 stands for teacher blocks 0-1, student block 1 (teacher 2, made context-pre-only) for 2-3.
    assert kd.pairs == {
        "transformer.transformer_blocks.0": "transformer.transformer_blocks.1",
        "transformer.transformer_blocks.1": "transformer.transformer_blocks.3",
    }
    (step,) = logs
    # Logged per student block, by its name in the transformer.
    features = {k: float(v) for k, v in step.items() if k.startswith("feature/")}
    assert sorted(features) == ["feature/transformer_blocks.0", "feature/transformer_blocks.1"]
    assert all(v > 0 for v in features.values())
    assert float(step["output_kd"]) > 0 and float(step["task"]) > 0
    record = json.loads((tmp_path / "out" / "transformer_block_removal.json").read_text())
    assert record["spec"]["blocks"] == [0, 2] and record["kd_target"] == "span_end"
    assert any("context-pre-only" in note for note in record["notes"])


def test_flux_without_guidance_embedding_with_a_guided_teacher(tiny: dict[str, Path], tmp_path: Path) -> None:
    """FLUX.1-schnell's layout: explicit keep lists of both block kinds, the teacher's CFG in the output-KD target,
    an unguided validation grid (FluxPipeline's true_cfg_scale 1), and the student in the pipeline."""
    script = _script()
    keep = ("--keep_blocks", "1", "--keep_single_blocks", "0", "2", "--teacher_guidance_scale", "2")
    argv = _argv(tiny, "schnell", tmp_path, *keep, "--validation_prompts", "a cat", "--validation_steps", "1")
    argv[argv.index("--max_train_steps") + 1] = "1"
    script.main(script.parse_args(argv))
    record = json.loads((tmp_path / "transformer" / "transformer_block_removal.json").read_text())
    assert record["module_map"] == {
        "transformer_blocks.0": "transformer_blocks.1",
        "single_transformer_blocks.0": "single_transformer_blocks.0",
        "single_transformer_blocks.1": "single_transformer_blocks.2",
    }
    assert (tmp_path / "samples" / "step-1.png").is_file()
    one = {"has_experts": False, "variant": ""}
    assert script.validation_guidance(script.parse_args(argv), SimpleNamespace(family="flux", **one)) == 1.0
    assert script.validation_guidance(script.parse_args(argv), SimpleNamespace(family="sd3", **one)) == 7.0
    _run_pipeline({**tiny, "flux": tiny["schnell"]}, "flux", tmp_path)


def test_guided_teacher_taps_the_conditional_pass(tiny: dict[str, Path]) -> None:
    """CFG ``u + w (c - u)`` in the output, and the tapped features are those of the conditional pass."""
    from diffdistill.students import FeatureTap

    script = _script()
    flow_models, flow_encoding = script.flow_models, script.flow_encoding
    args = script.parse_args(_argv(tiny, "sd3", Path("unused"), "--preset", "sd3-half"))
    parts = flow_models.load_flow(args)
    net = flow_models.FlowDenoiser(parts.transformer, "sd3")
    cond = flow_encoding.conditions(parts, ["a red cube", "a cat"], args, "cpu", torch.float32)
    uncond = flow_encoding.uncond_conditions(parts, args, "cpu", torch.float32)
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 300.0])
    with torch.no_grad(), FeatureTap(net, ["transformer.transformer_blocks.1"]) as tap:
        c = net(x, t, **cond)
        want = tap.pop()
        u = net(x, t, **{k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
        got = script.guided_teacher(net, uncond, 4.0)(x, t, **cond)
        feats = tap.pop()
    torch.testing.assert_close(got, u + 4.0 * (c - u))
    assert torch.equal(feats["transformer.transformer_blocks.1"], want["transformer.transformer_blocks.1"])
    assert script.guided_teacher(net, uncond, 1.0) is None  # the conditional teacher: LayerKD's own call


def test_options_are_checked(tiny: dict[str, Path], tmp_path: Path) -> None:
    script = _script()
    base = _argv(tiny, "sd3", tmp_path)
    with pytest.raises(ValueError, match="Choose the student: --preset"):
        script.parse_args(base)
    with pytest.raises(ValueError, match=r"trains the whole block-removed student.*drop --use_lora"):
        script.parse_args([*base, "--preset", "sd3-half", "--use_lora"])
    with pytest.raises(ValueError, match="--preset or --keep_blocks"):
        script.parse_args([*base, "--preset", "sd3-half", "--keep_blocks", "0"])
    with pytest.raises(ValueError, match="--teacher_guidance_scale >= 1"):
        script.parse_args([*base, "--preset", "sd3-half", "--teacher_guidance_scale", "0.5"])
    with pytest.raises(
        ValueError, match=r"--validation_guidance_scale >= 1 \(1: no classifier-free guidance\)"
    ):
        script.parse_args([*base, "--preset", "sd3-half", "--validation_guidance_scale", "-2"])
    with pytest.raises(
        ValueError, match=r"--preset flux-mini is for FLUX.*use one of \['sd3-early', 'sd3-half'\]"
    ):
        script.main(script.parse_args([*base, "--preset", "flux-mini"]))
    with pytest.raises(ValueError, match="--keep_single_blocks applies to FLUX only"):
        script.main(script.parse_args([*base, "--keep_blocks", "0", "--keep_single_blocks", "0"]))
    flux = _argv(tiny, "flux", tmp_path, "--preset", "flux-mini")
    with pytest.raises(ValueError, match=r"guidance-distilled.*Drop --teacher_guidance_scale 2\.0"):
        script.main(script.parse_args([*flux, "--teacher_guidance_scale", "2"]))
    with pytest.raises(ValueError, match=r"guidance-distilled.*Drop --validation_guidance_scale 3\.0"):
        script.main(script.parse_args([*flux, "--validation_guidance_scale", "3"]))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_flux_lite_on_two_processes_equals_one_process_on_the_whole_batch(
    mode: str, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two CPU processes (gloo), one image each, under DDP or accelerate's FSDP2 (which also shards the frozen
    teacher), against ONE process that accumulates the same two micro-batches: both make the same two steps
    (tests/state_compare.py: the runs differ only in the order float32 gradients are summed), and the gathered
    student keeps the preset's blocks.

    The one-process run sees the two processes' data and noise: its micro-batch ``m`` draws from process ``m``'s
    generator (``step_generator(seed, step, process=m, micro=0)``), and accumulating two micro-batches of one
    averages their gradients as the all-reduce (DDP) or reduce-scatter (FSDP2) of two processes does (the loss
    has no batch statistics: the two are the same batch of 2).
    """
    from safetensors.torch import load_file

    argv = _argv(tiny, "flux", tmp_path / "x", "--preset", "flux-lite-8b", "--gradient_checkpointing")
    argv += [
        "--use_ema",
        "--ema_decay",
        "0.5",
    ]  # the released average is gathered from the shards under FSDP2
    argv[argv.index("--train_batch_size") + 1] = "1"  # per process / per micro-batch
    out = {name: tmp_path / name for name in (mode, "one")}

    def with_output(name: str) -> list[str]:
        args = list(argv)
        args[args.index("--output_dir") + 1] = str(out[name])
        return args

    output = _launch_two_processes("flow_kd", with_output(mode), mode=mode)
    sharded_teacher = "sharded the frozen teacher over 2 processes"
    if mode == "ddp":
        assert (out[mode] / "checkpoint-1" / "random_states_1.pkl").is_file(), "DDP ran in one process"
        assert sharded_teacher not in output
    else:
        assert (out[mode] / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir(), "FSDP2 did not shard"
        # the frozen teacher too (runtime.shard_frozen_teacher; logged by the main process); the same steps as one
        # process
        assert output.count(sharded_teacher) == 1, output[-3000:]
    data_sources = importlib.import_module("training.data_sources")
    per_process = data_sources.step_generator
    monkeypatch.setattr(
        data_sources,
        "step_generator",
        lambda seed, step, process_index=0, micro=0: per_process(seed, step, micro, process_index),
    )
    script = _script()
    script.main(script.parse_args([*with_output("one"), "--gradient_accumulation_steps", "2"]))

    record = _check_report(tiny, "flux", out[mode])
    # flux-lite-8b keeps 8/19 of the double blocks (1 of 2 here) and every single block.
    assert record["removed"] == ["transformer_blocks.1"]
    start = load_file(str(out["one"] / "checkpoint-1" / "model.safetensors"))
    one, two = (_transformer("flux", out[name] / "transformer").state_dict() for name in ("one", mode))
    assert any(not torch.equal(one[k], start[k]) for k in one), "the second step did not train"
    assert_same_update(two, one, start, what=f"{mode} on 2 processes vs one process on the whole batch")
