"""Tests of ``examples/evaluate.py`` on Wan text-to-video pipelines (tiny random-weight ``WanPipeline`` folders of
:func:`tests.examples.tiny_flow.save_tiny_wan_pipeline`: Wan 2.1, Wan 2.2 TI2V-5B and A14B; 64 px, 5 frames).

Checked: the saved frames are ``WanPipeline``'s own frames for each seed with the student's LoRA(s) and sigmas (the
A14B student's second LoRA included: the test fails without it; a full ``transformer/`` student) and the teacher's
UniPC sampler; the numbers (frame FID against a teacher run's ``videos/`` folder, CLIPSIM, frame consistency; FVD with
a TorchScript I3D stand-in against clip folders) equal a computation by hand over the frames; resume generates only missing videos and refuses other settings; video / image runs are not compared;
options that do not fit the pipeline are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.examples import tiny_metrics
from tests.examples.example_modules import load_example, load_script
from tests.examples.tiny_flow import T5_LENGTH, save_tiny_wan_pipeline, use_sigmas, wan_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("scipy")

PROMPTS = ["a cat walking", "a red car on a road"]
FRAMES = 5
SIZE = 64
SIGMAS = [1.0, 0.9, 0.6, 0.3]  # A14B (boundary 0.875): two steps on each expert
# A PNG holds round(255 x); the pipeline here runs the unfused LoRA where the script fused it (float32 round-off of
# the LoRA product, ~1e-6 relative in the weights, which the few steps keep well under 1e-4 in [0, 1] pixels)
PNG_TOLERANCE = 0.5 / 255 + 1e-4

evaluate = load_script("evaluate")
generation = load_example("evaluation.generation")
scoring = load_example("evaluation.scoring")
video_generation = load_example("evaluation.video_generation")
student_sampler = load_example("training.student_sampler")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_video")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {
        "wan": save_tiny_wan_pipeline(root / "wan"),
        "a14b": save_tiny_wan_pipeline(root / "a14b", variant="a14b"),
        "ti2v": save_tiny_wan_pipeline(root / "ti2v", variant="ti2v"),
        "prompts": root / "prompts.txt",
        "root": root,
    }


def _argv(tiny: dict[str, Path], model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny[model]), "--prompts_file", str(tiny["prompts"]),
        "--resolution", str(SIZE), "--num_frames", str(FRAMES), "--max_sequence_length", str(T5_LENGTH),
        "--batch_size", "2", "--output_dir", str(out), "--seed", "3", *extra,
    ]  # fmt: skip


def _run(argv: list[str], **metrics: Any) -> dict[str, Any]:
    return evaluate.main(
        evaluate.parse_args(argv), metrics=metrics or {"clip_score": tiny_metrics.tiny_clip_score()}
    )


def _student(pipe: Any, run: Path, *, second: bool = False) -> Path:
    """A flow_dmd2-style run folder: random LoRA(s) on the Wan targets, DMD2's stochastic scheduler, its sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffdistill.students import WAN_LORA_TARGETS, add_lora, save_lora

    run.mkdir(parents=True)
    experts = [("pytorch_lora_weights.safetensors", pipe.transformer)]
    if second:
        experts.append(("pytorch_lora_weights_transformer_2.safetensors", pipe.transformer_2))
    for k, (name, transformer) in enumerate(experts):
        add_lora(transformer, rank=2, targets=WAN_LORA_TARGETS)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + k)
            for key, p in transformer.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.5)
        save_lora(transformer, run / name, prefix="transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True).save_pretrained(run / "scheduler")
    (run / "student_sigmas.json").write_text(json.dumps(SIGMAS) + "\n")
    return run


def _pipeline_frames(pipe: Any, index: int, width: int = SIZE, **kwargs: Any) -> torch.Tensor:
    """``WanPipeline``'s frames (F, 3, H, W) of prompt ``index`` from seed 3 + index (the global generator, which the
    stochastic scheduler re-noises from, seeded with its ``student_sampler.renoise_seed``)."""
    torch.manual_seed(student_sampler.renoise_seed(3 + index))
    with torch.no_grad():
        return pipe(
            [PROMPTS[index]], generator=[torch.Generator().manual_seed(3 + index)], height=SIZE, width=width,
            num_frames=FRAMES, max_sequence_length=T5_LENGTH, output_type="pt", **kwargs,
        ).frames[0].float()  # fmt: skip


def _saved_frames(out: Path, index: int) -> torch.Tensor:
    return torch.stack(
        [scoring.load_image(out / "videos" / f"{index:06d}" / f"{f:03d}.png") for f in range(FRAMES)]
    )


def _tree(folder: Path) -> dict[str, bytes]:
    """The frames of a video folder by relative path (hidden temporary folders left out)."""
    files = sorted(p for p in folder.rglob("*.png") if not p.relative_to(folder).parts[0].startswith("."))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _fid_by_hand(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance of the stand-in features (float64 numpy, scipy's sqrtm): ||mu1 - mu2||^2 + tr(S1 + S2 -
    2 (S1 S2)^1/2)."""
    from scipy import linalg

    features = tiny_metrics.tiny_features()
    with torch.no_grad():
        a, b = (features(x).double().numpy() for x in (fake, real))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_wan_student_frames_metrics_and_resume(tiny: dict[str, Path], tmp_path: Path) -> None:
    # the teacher: WanPipeline's UniPC sampler and CFG, its frames as the pipeline makes them
    teacher = tmp_path / "teacher"
    _run(_argv(tiny, "wan", teacher, "--teacher", "--num_inference_steps", "2", "--guidance_scale", "3"))
    pipe = wan_pipeline(tiny["wan"])
    for i in range(2):
        want = _pipeline_frames(pipe, i, num_inference_steps=2, guidance_scale=3.0)
        assert (_saved_frames(teacher, i) - want).abs().max() <= 0.5 / 255 + 1e-6
    # the student, scored against the teacher's videos/ folder (every frame, read recursively)
    run = _student(wan_pipeline(tiny["wan"]), tmp_path / "run")
    out = tmp_path / "student"
    features = tiny_metrics.tiny_features()
    argv = _argv(tiny, "wan", out, "--student_weights", str(run), "--guidance_scale", "1",
                 "--reference_dir", str(teacher / "videos"))  # fmt: skip
    clip = tiny_metrics.tiny_clip_score()
    record = _run(argv, clip_score=clip, fid=_fid(features))
    student = wan_pipeline(tiny["wan"])
    student.load_lora_weights(str(run))
    use_sigmas(student, run, SIGMAS)
    frames = {i: _saved_frames(out, i) for i in range(2)}
    for i in range(2):
        want = _pipeline_frames(student, i, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
        assert (frames[i] - want).abs().max() <= PNG_TOLERANCE, (i, (frames[i] - want).abs().max())
        assert (frames[i] - _saved_frames(teacher, i)).abs().max() > 0.05  # the student is not the teacher
    # the numbers, by hand over the saved frames
    every = torch.cat([frames[0], frames[1]])
    prompts = [PROMPTS[0]] * FRAMES + [PROMPTS[1]] * FRAMES
    clip_by_hand = float(clip.cosines(every, prompts).mean())  # CLIPSIM: every frame with its video's prompt
    with torch.no_grad():
        emb = torch.stack([clip.image_encoder(clip.preprocess(frames[i])).double() for i in range(2)])
    emb = emb / emb.norm(dim=-1, keepdim=True)
    consistency = float((emb[:, 1:] * emb[:, :-1]).sum(-1).mean())  # consecutive frames, mean over videos
    reference = torch.stack([scoring.load_image(p) for p in sorted((teacher / "videos").rglob("*.png"))])
    assert len(reference) == 2 * FRAMES
    numbers = record["metrics"]
    assert set(numbers) == {"clip_score", "frame_consistency", "fid"}
    assert numbers["clip_score"] == pytest.approx(clip_by_hand, rel=1e-9)
    assert numbers["frame_consistency"] == pytest.approx(consistency, rel=1e-9)
    # float32 features summed in float64 by the metric, numpy's float64 here: sqrtm of 8x8 covariances of 10 rows
    assert numbers["fid"] == pytest.approx(_fid_by_hand(every, reference), rel=1e-6, abs=1e-9)
    protocol = record["protocol"]
    assert protocol["extra"]["video"]["num_frames"] == FRAMES and protocol["resolution"] == [SIZE, SIZE]
    assert protocol["extra"]["fid_reference"]["images"] == 2 * FRAMES
    assert record["num_videos"] == 2 and record["num_images"] == 2 * FRAMES
    generator = protocol["generator"]
    assert (generator["pipeline"], generator["num_frames"], generator["width"]) == (
        "WanPipeline",
        FRAMES,
        SIZE,
    )
    assert generator["sigmas"] == SIGMAS and generator["sampler_sources"]["steps"].endswith(
        "student_sigmas.json"
    )
    assert (
        generator["scheduler"] == "FlowMatchEulerDiscreteScheduler" and generator["max_sequence_length"] == 8
    )
    assert "guidance_scale_2" not in generator

    # resume: a missing video (and a stopped run's temporary folder) -> only that video is generated again
    before = _tree(out / "videos")
    shutil.rmtree(out / "videos" / "000001")
    (out / "videos" / ".000001.99.tmp").mkdir()
    (out / "videos" / ".000001.99.tmp" / "000.png").write_bytes(
        (out / "videos" / "000000" / "000.png").read_bytes()
    )
    kept = (out / "videos" / "000000" / "000.png").stat().st_mtime_ns
    again = _run(argv, clip_score=tiny_metrics.tiny_clip_score(), fid=_fid(features))
    assert (out / "videos" / "000000" / "000.png").stat().st_mtime_ns == kept
    assert _tree(out / "videos") == before and again["metrics"] == numbers
    # other settings into the same folder: refused, nothing written
    shutil.rmtree(out / "videos" / "000001")
    with pytest.raises(ValueError, match=r"'num_frames': 5.* and this run has .*'num_frames': 9"):
        _run(
            [
                *argv[: argv.index("--num_frames")],
                "--num_frames",
                "9",
                *argv[argv.index("--num_frames") + 2 :],
            ]
        )
    assert not (out / "videos" / "000001").exists()

    # an image run of the same prompts (frame 0 of each video as the image) is not compared with the video run
    images = tmp_path / "as_images"
    images.mkdir()
    for i in range(2):
        shutil.copy(teacher / "videos" / f"{i:06d}" / "000.png", images / f"{i:06d}.png")
    _run(
        [
            "--prompts_file",
            str(tiny["prompts"]),
            "--images",
            str(images),
            "--output_dir",
            str(tmp_path / "img"),
        ]
    )
    with pytest.raises(ValueError, match=r"extra\.video"):
        evaluate.main(evaluate.parse_args(["--compare", str(teacher), str(tmp_path / "img")]))
    # the teacher's videos/ folder scored on its own (--images): its record names the sampler
    scored = _run(["--prompts_file", str(tiny["prompts"]), "--images", str(teacher / "videos"),
                   "--output_dir", str(tmp_path / "scored"), "--seed", "3"])  # fmt: skip
    teacher_record = json.loads((teacher / "results.json").read_text())
    assert scored["protocol"] == teacher_record["protocol"] and scored["metrics"] == teacher_record["metrics"]


def _fid(features: Any) -> Any:
    from diffdistill.metrics import FID

    return FID(features)


def test_a14b_student_loads_both_loras(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = _student(wan_pipeline(tiny["a14b"]), tmp_path / "run", second=True)
    out = tmp_path / "student"
    argv = _argv(
        tiny, "a14b", out, "--student_weights", str(run), "--guidance_scale", "1", "--num_prompts", "1"
    )
    record = _run(argv)
    got = _saved_frames(out, 0)
    both = wan_pipeline(tiny["a14b"])
    both.load_lora_weights(str(run))
    both.load_lora_weights(
        str(run), weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True
    )
    use_sigmas(both, run, SIGMAS)
    want = _pipeline_frames(both, 0, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
    assert (got - want).abs().max() <= PNG_TOLERANCE, (got - want).abs().max()
    # the low-noise expert's LoRA matters: without it the frames are far from the script's
    first_only = wan_pipeline(tiny["a14b"])
    first_only.load_lora_weights(str(run))
    use_sigmas(first_only, run, SIGMAS)
    other = _pipeline_frames(first_only, 0, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
    assert (got - other).abs().max() > 20 * PNG_TOLERANCE
    generator = record["protocol"]["generator"]
    weights = generator["student_weights"]
    assert weights["sha256"] == generation.weights_sha256("lora", run / "pytorch_lora_weights.safetensors")
    second = run / "pytorch_lora_weights_transformer_2.safetensors"
    assert weights["sha256_transformer_2"] == generation.weights_sha256("lora", second)
    assert generator["guidance_scale_2"] == 1.0  # WanPipeline's rule: guidance_scale when not given
    # an A14B folder without the second file: refused (its low-noise steps would be the teacher's)
    lone = tmp_path / "lone"
    shutil.copytree(run, lone)
    (lone / second.name).unlink()
    with pytest.raises(ValueError, match=r"pytorch_lora_weights_transformer_2.safetensors beside .* missing"):
        _run([*argv[: argv.index("--student_weights")], "--student_weights", str(lone), "--guidance_scale", "1",
              "--num_prompts", "1", "--output_dir", str(tmp_path / "lone_out")])  # fmt: skip


def test_a14b_guidance_and_text_length_come_from_the_run_record(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The run's ``student_sampler.json`` (``training.student_sampler.write_record`` of an A14B run) gives
    ``guidance_scale``, ``guidance_scale_2`` and ``max_sequence_length`` when the options do not; the options win."""
    import types

    run = _student(wan_pipeline(tiny["a14b"]), tmp_path / "run", second=True)
    args = types.SimpleNamespace(
        output_dir=str(run), resolution=SIZE, width=None, num_frames=FRAMES, guidance=None
    )
    parts = types.SimpleNamespace(
        family="wan", noise_scheduler=types.SimpleNamespace(config=types.SimpleNamespace()), has_experts=True
    )
    record_file = str(student_sampler.write_record(args, parts, 6, shifted_grid=True))
    argv = ["--pretrained_model_name_or_path", str(tiny["a14b"]), "--prompts_file", str(tiny["prompts"]),
            "--resolution", str(SIZE), "--num_frames", str(FRAMES), "--output_dir", str(tmp_path / "o"),
            "--student_weights", str(run)]  # fmt: skip
    args = evaluate.parse_args(argv)
    pipe = video_generation.load_pipeline(args, "cpu", torch.float32)
    generator = video_generation.sampler_record(pipe, args)
    keys = ("guidance_scale", "guidance_scale_2", "max_sequence_length")
    assert [generator[k] for k in keys] == [1.0, 1.0, 6]
    assert "grid_size" not in generator  # Wan: no size-dependent shift
    assert [generator["sampler_sources"][k] for k in keys] == [record_file] * 3
    kwargs = video_generation.call_kwargs(args, pipe)
    assert [kwargs[k] for k in keys] == [1.0, 1.0, 6]
    # the options win
    args = evaluate.parse_args([*argv, "--guidance_scale_2", "2", "--max_sequence_length", str(T5_LENGTH)])
    pipe = video_generation.load_pipeline(args, "cpu", torch.float32)
    generator = video_generation.sampler_record(pipe, args)
    assert (generator["guidance_scale_2"], generator["max_sequence_length"]) == (2.0, T5_LENGTH)
    assert generator["sampler_sources"]["guidance_scale_2"] == "--guidance_scale_2"
    assert generator["sampler_sources"]["max_sequence_length"] == "--max_sequence_length"
    # no size, no frame count: the trained ones (the record's), named as their source
    args = evaluate.parse_args(
        [a for a in argv if a not in ("--resolution", "--num_frames", str(SIZE), str(FRAMES))]
    )
    assert (args.resolution, args.width, args.num_frames) == (SIZE, SIZE, FRAMES)
    assert args.saved_sampler["sources"]["size"] == record_file == args.saved_sampler["sources"]["num_frames"]
    # another frame count than the trained one: warned and recorded (audit 18)
    args = evaluate.parse_args([*argv, "--num_frames", str(FRAMES + 4)])
    with pytest.warns(UserWarning, match=rf"trained on {FRAMES}-frame videos .* {FRAMES + 4} frames"):
        generator = video_generation.sampler_record(pipe, args)
    assert (generator["num_frames"], generator["trained_num_frames"]) == (FRAMES + 4, FRAMES)


def test_full_transformer_student(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A full ``transformer/`` student (``flow_tscd.py`` without ``--use_lora``) replaces the pipeline's transformer:
    the frames are ``WanPipeline``'s with that transformer and the run's sigmas; the record hashes the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    run = tmp_path / "run"
    pipe = wan_pipeline(tiny["wan"])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.transformer.save_pretrained(run / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True).save_pretrained(run / "scheduler")
    (run / "student_sigmas.json").write_text(json.dumps(SIGMAS) + "\n")
    out = tmp_path / "student"
    argv = _argv(
        tiny, "wan", out, "--student_weights", str(run), "--guidance_scale", "1", "--num_prompts", "1"
    )
    record = _run(argv)
    use_sigmas(pipe, run, SIGMAS)
    want = _pipeline_frames(pipe, 0, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
    got = _saved_frames(out, 0)
    assert (got - want).abs().max() <= PNG_TOLERANCE, (got - want).abs().max()
    teacher = wan_pipeline(tiny["wan"])  # mutation: the teacher's transformer on the same sigmas is far off
    use_sigmas(teacher, run, SIGMAS)
    other = _pipeline_frames(teacher, 0, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
    assert (got - other).abs().max() > 20 * PNG_TOLERANCE
    weights = record["protocol"]["generator"]["student_weights"]
    assert weights["kind"] != "lora" and weights["sha256"] == generation.weights_sha256(
        weights["kind"], run / "transformer"
    )


def test_a14b_expert_student_replaces_its_expert(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A14B block-removal students (``flow_kd.py --expert``): a run folder holding ``transformer_2/`` replaces the
    low-noise expert only; the frames are ``WanPipeline``'s with that expert swapped, and the record names it."""
    from diffusers import WanTransformer3DModel

    run = tmp_path / "run"
    student = WanTransformer3DModel.from_pretrained(str(tiny["a14b"]), subfolder="transformer_2")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.save_pretrained(run / "transformer_2")
    out = tmp_path / "student"
    argv = _argv(tiny, "a14b", out, "--student_weights", str(run), "--guidance_scale", "1", "--num_prompts", "1",
                 "--num_inference_steps", "4")  # fmt: skip
    record = _run(argv)
    pipe = wan_pipeline(tiny["a14b"])
    teacher_frames = _pipeline_frames(pipe, 0, num_inference_steps=4, guidance_scale=1.0)
    pipe.transformer_2 = student
    want = _pipeline_frames(pipe, 0, num_inference_steps=4, guidance_scale=1.0)
    got = _saved_frames(out, 0)
    assert (got - want).abs().max() <= PNG_TOLERANCE, (got - want).abs().max()
    assert (got - teacher_frames).abs().max() > 20 * PNG_TOLERANCE  # the low-noise steps ran the student
    weights = record["protocol"]["generator"]["student_weights"]
    assert weights["experts"] == ["transformer_2"] and weights["loaded"] == str(run / "transformer_2")


def test_ti2v_student_at_another_width(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Wan 2.2 TI2V-5B (``expand_timesteps``, the 16x VAE): a non-square video, the LoRA and sigmas as the pipeline
    samples them."""
    run = _student(wan_pipeline(tiny["ti2v"]), tmp_path / "run")
    out = tmp_path / "student"
    argv = _argv(tiny, "ti2v", out, "--student_weights", str(run), "--guidance_scale", "1", "--width", "96")
    record = _run([*argv, "--num_prompts", "1"])
    pipe = wan_pipeline(tiny["ti2v"])
    pipe.load_lora_weights(str(run))
    use_sigmas(pipe, run, SIGMAS)
    want = _pipeline_frames(pipe, 0, width=96, num_inference_steps=len(SIGMAS), guidance_scale=1.0)
    got = _saved_frames(out, 0)
    assert got.shape == (FRAMES, 3, SIZE, 96)
    assert (got - want).abs().max() <= PNG_TOLERANCE, (got - want).abs().max()
    assert record["protocol"]["resolution"] == [SIZE, 96] and record["protocol"]["generator"]["width"] == 96


def test_teacher_guidance_2_is_the_pipelines(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    extra = ("--teacher", "--num_inference_steps", "2", "--guidance_scale", "4", "--guidance_scale_2", "2",
             "--num_prompts", "1")  # fmt: skip
    record = _run(_argv(tiny, "a14b", out, *extra))
    want = _pipeline_frames(wan_pipeline(tiny["a14b"]), 0, num_inference_steps=2, guidance_scale=4.0,
                            guidance_scale_2=2.0)  # fmt: skip
    assert (_saved_frames(out, 0) - want).abs().max() <= 0.5 / 255 + 1e-6
    generator = record["protocol"]["generator"]
    assert (generator["guidance_scale"], generator["guidance_scale_2"]) == (4.0, 2.0)
    assert generator["scheduler"] == "UniPCMultistepScheduler" and generator["role"] == "teacher"


def test_options_that_do_not_fit_are_refused(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    image_model = tmp_path / "sdxl"
    image_model.mkdir()
    (image_model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    other_video = tmp_path / "hunyuan"
    other_video.mkdir()
    (other_video / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    out = str(tmp_path / "o")
    videos = tmp_path / "videos" / "000000"  # an --images folder of one (one-frame) video
    videos.mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE)).save(videos / "000.png")
    cases = [
        (_argv(tiny, "wan", tmp_path / "o", "--teacher", "--guidance_scale_2", "3"),
         "--guidance_scale_2 is the CFG of Wan 2.2 A14B's low-noise expert"),
        (_argv(tiny, "wan", tmp_path / "o", "--teacher", "--num_frames", "6"), "--num_frames of the form 4k + 1"),
        (_argv(tiny, "wan", tmp_path / "o", "--teacher", "--timesteps", "999"), "give --sigmas instead"),
        (["--prompts_file", str(tiny["prompts"]), "--images", str(videos.parent), "--output_dir", out,
          "--num_frames", "5"], "--images scores the folder's videos as they are"),
        (["--prompts_file", str(tiny["prompts"]), "--images", str(videos.parent), "--output_dir", out,
          "--reference_dir", str(videos.parent), "--precision_recall"], "--precision_recall on videos would pool"),
        (["--pretrained_model_name_or_path", str(image_model), "--prompts_file", str(tiny["prompts"]),
          "--output_dir", out, "--num_frames", "5", "--guidance_scale_2", "3"],
         "--num_frames / --guidance_scale_2 apply to a video pipeline"),
        (["--pretrained_model_name_or_path", str(other_video), "--prompts_file", str(tiny["prompts"]),
          "--output_dir", out], "HunyuanVideoPipeline: examples/evaluate.py generates videos with WanPipeline"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
        assert message in capsys.readouterr().err, message


def test_two_processes_give_the_videos_and_numbers_of_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    """3 prompts on 2 processes (shards of 2 and 1 videos), an A14B student (both LoRA hashes broadcast by process
    0), frame FID, CLIPSIM and frame consistency summed over the processes."""
    from PIL import Image

    from tests.examples.test_evaluate import _accelerate

    run = _student(wan_pipeline(tiny["a14b"]), tmp_path / "run", second=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, "a boat"]) + "\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for k in range(7):
        pixels = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"{k}.png")
    hooks = ["--fid_features", "tests.examples.tiny_metrics:tiny_features", "--reference_dir", str(reference)]
    hooks += ["--clip", "tests.examples.tiny_metrics:tiny_clip_score", "--student_weights", str(run)]
    records = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        # batches of 1: every video and feature vector is computed alone, whatever the split
        argv = _argv(
            tiny, "a14b", out, "--guidance_scale", "1", "--batch_size", "1", "--eval_batch_size", "1", *hooks
        )
        argv[argv.index("--prompts_file") + 1] = str(prompts)
        if n == 1:
            evaluate.main(evaluate.parse_args(argv))
        else:
            _accelerate(argv, n)
        records[n] = json.loads((out / "results.json").read_text())
    assert _tree(tmp_path / "p1" / "videos") == _tree(tmp_path / "p2" / "videos")
    assert len(_tree(tmp_path / "p2" / "videos")) == 3 * FRAMES
    one, two = records[1]["metrics"], records[2]["metrics"]
    assert one.keys() == two.keys() == {"fid", "clip_score", "frame_consistency"}
    # the same frames and features; only the order of the float64 sums differs (see test_evaluate.py's 2-process
    # test: FID's covariance square root amplifies 1e-16 to ~1e-13)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12)
    assert records[1]["protocol"] == records[2]["protocol"]
    weights = records[2]["protocol"]["generator"]["student_weights"]
    second = run / "pytorch_lora_weights_transformer_2.safetensors"
    assert weights["sha256_transformer_2"] == generation.weights_sha256("lora", second)


class TwoFeatureI3D(torch.nn.Module):
    """An I3D stand-in (its TorchScript call signature): per uint8 clip (N, 3, T, H, W) the mean of the clip and of
    its last frame, over 255 -- so the numbers depend on which frames form the clip and on their order."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if x.dtype != torch.uint8 or not (rescale and resize and return_features):
            raise RuntimeError("expected StyleGAN-V's call on uint8 clips")
        clip = x.float().mean(dim=(1, 2, 3, 4))
        last = x[:, :, -1].float().mean(dim=(1, 2, 3))
        return torch.stack([clip, last], dim=1) / 255


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fvd_of_a_video_folder_against_reference_clips(tmp_path: Path) -> None:
    """``--images`` videos scored with ``--fvd_detector`` (a TorchScript stand-in) against a ``--reference_dir`` of
    clip folders whose frames sort by number (``frame_2`` before ``frame_10``): FVD of the first ``--fvd_frames``
    frames equals the Frechet distance computed by hand; the protocol records the clip; options are checked."""
    from PIL import Image
    from scipy import linalg

    rng = np.random.default_rng(0)
    detector = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(TwoFeatureI3D()).save(str(detector))
    videos, reference = tmp_path / "videos", tmp_path / "reference"
    fake, real = [], []
    for i in range(5):  # generated: videos/{i:06d}/{f:03d}.png, 5 frames
        frames = rng.integers(0, 256, (FRAMES, 16, 16, 3), dtype=np.uint8)
        (videos / f"{i:06d}").mkdir(parents=True)
        for f, frame in enumerate(frames):
            Image.fromarray(frame).save(videos / f"{i:06d}" / f"{f:03d}.png")
        fake.append(frames)
    # real: clips of 11 frames frame_1 ... frame_11 (name order would put 10 first), at two sizes
    for i in range(6):
        frames = rng.integers(0, 256, (11, *((16, 16) if i % 3 else (12, 20)), 3), dtype=np.uint8)
        (reference / f"clip{i}").mkdir(parents=True)
        for f, frame in enumerate(frames):
            Image.fromarray(frame).save(reference / f"clip{i}" / f"frame_{f + 1}.png")
        real.append(frames)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(5)) + "\n")
    argv = ["--prompts_file", str(prompts), "--images", str(videos), "--output_dir", str(tmp_path / "out"),
            "--reference_dir", str(reference), "--fvd_detector", str(detector), "--eval_batch_size", "4",
            "--fvd_frames", "4"]  # fmt: skip
    record = _run(argv)

    def features(clips: list[np.ndarray]) -> np.ndarray:
        return np.array([[c[:4].mean(), c[3].mean()] for c in clips], dtype=np.float64) / 255

    a, b = features(fake), features(real)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert record["metrics"]["fvd"] == pytest.approx(want, rel=1e-5)
    protocol = record["protocol"]
    fvd = protocol["backbones"]["fvd"]
    assert (
        fvd["metric"] == "fvd" and fvd["num_frames"] == 4 and "i3d_torchscript.pt" in fvd["feature_extractor"]
    )
    assert "first fvd_frames frames" in protocol["extra"]["video"]["fvd"]
    assert protocol["extra"]["fid_reference"]["images"] == 6 * 11  # the reference folder's identity
    # the options: FVD needs both; clips longer than the videos, or a reference clip shorter than the clip length,
    # are refused by name before anything is scored
    with pytest.raises(ValueError, match=r"--fvd_frames 6 is longer than the videos \(5 frames\)"):
        _run([*argv[:-1], "6", "--output_dir", str(tmp_path / "out6")])
    with pytest.raises(SystemExit):
        evaluate.parse_args([*argv[: argv.index("--fvd_detector")], "--fvd_frames", "4"])
    (reference / "clip0" / "frame_11.png").rename(reference / "clip0" / "x.txt")
    for f in range(5, 11):
        (reference / "clip0" / f"frame_{f}.png").unlink()
    with pytest.raises(ValueError, match=r"at least --fvd_frames 5 frames, but .*clip0 has 4"):
        _run([*argv[:-1], "5", "--output_dir", str(tmp_path / "out5")])
