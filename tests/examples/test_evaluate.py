"""Tests of ``examples/evaluate.py`` and its package ``examples/evaluation/`` on tiny random-weight stand-ins.

Tiny SDXL and FLUX pipelines (``tiny_sdxl.py`` / ``tiny_flow.py``) generate 64 px images; the FID runs on a random
conv net's 8 features and the CLIP score on a random 2-layer ``CLIPModel`` (``tiny_metrics.py``): no downloads.
Checked: resume generates only the missing images and gives bit-identical numbers; a folder against itself has
FID 0; a LoRA / full-UNet student changes the images as loading it into diffusers does; ``--compare`` refuses runs
under different protocols; 2 processes give the numbers of one; the COCO prompt files follow their rules.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import preloaded_launch
from tests.examples import tiny_metrics
from tests.examples.example_modules import EXAMPLES, load_example, load_script
from tests.examples.tiny_flow import save_tiny_flux_pipeline
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a cat", "a red car", "an apple on a table", "two dogs"]


_load = load_example


evaluate = load_script("evaluate")
coco_prompts = _load("evaluation.coco_prompts")
generation = _load("evaluation.generation")
scoring = _load("evaluation.scoring")
metric_specs = _load("evaluation.metric_specs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SDXL pipeline, a tiny FLUX pipeline and a prompt file."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {
        "sdxl": save_tiny_sdxl_pipeline(root / "sdxl"),
        "flux": save_tiny_flux_pipeline(root / "flux"),
        "prompts": root / "prompts.txt",
    }


def _argv(tiny: dict[str, Path], out: Path, *extra: str, model: str = "sdxl") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny[model]), "--prompts_file", str(tiny["prompts"]),
        "--resolution", "64", "--num_inference_steps", "2", "--batch_size", "2", "--output_dir", str(out),
        "--seed", "3", *extra,
    ]  # fmt: skip


def _png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_resume_generates_only_missing_images_and_gives_the_same_numbers(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "teacher"
    # batches of 1: the regenerated images are computed exactly as before (on a GPU, kernels may round differently
    # for another batch composition, and one PNG level could flip)
    args = evaluate.parse_args(_argv(tiny, out, "--teacher", "--guidance_scale", "2.0", "--batch_size", "1"))
    first = evaluate.main(args, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    images = out / "images"
    before = _png_bytes(images)
    assert sorted(before) == [f"{i:06d}.png" for i in range(len(PROMPTS))]
    # a stopped run: two images missing, the others must not be regenerated
    (images / "000001.png").unlink()
    (images / "000002.png").unlink()
    kept = {n: (images / n).stat().st_mtime_ns for n in ("000000.png", "000003.png")}
    second = evaluate.main(args, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    assert {n: (images / n).stat().st_mtime_ns for n in kept} == kept
    assert _png_bytes(images) == before  # per-image seeds: the regenerated images are the same bytes
    assert second["metrics"] == first["metrics"]
    record = json.loads((out / "results.json").read_text())
    generator = record["protocol"]["generator"]
    assert generator["role"] == "teacher" and generator["guidance_scale"] == 2.0
    assert generator["num_inference_steps"] == 2 and record["protocol"]["prompt_count"] == len(PROMPTS)
    # another guidance into the same folder: refused (the images would mix two samplers), nothing written
    (images / "000002.png").unlink()
    other = evaluate.parse_args(_argv(tiny, out, "--teacher", "--guidance_scale", "3.0", "--batch_size", "1"))
    with pytest.raises(ValueError, match=r"'guidance_scale': 2.0.* and this run has .*'guidance_scale': 3.0"):
        evaluate.main(other, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    assert not (images / "000002.png").exists()
    # the other quantisation into the same folder: refused (a half-level shift of every pixel)
    truncating = evaluate.parse_args(
        _argv(
            tiny,
            out,
            "--teacher",
            "--guidance_scale",
            "2.0",
            "--batch_size",
            "1",
            "--quantization",
            "truncate",
        )
    )
    with pytest.raises(ValueError, match=r"quantization = 'round' and this run has 'truncate'"):
        evaluate.main(truncating, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    assert not (images / "000002.png").exists()
    assert record["protocol"]["preprocessing"]["quantization"] == "round"
    # the folder scored as --images: its record names the sampler
    scored = evaluate.main(
        evaluate.parse_args(
            [*_argv(tiny, tmp_path / "scored", "--images", str(images)), "--num_prompts", "2"]
        ),
        metrics={"clip_score": tiny_metrics.tiny_clip_score()},
    )
    assert scored["protocol"]["generator"] == generator


def test_image_i_is_drawn_from_seed_plus_i_whatever_the_batches(tmp_path: Path) -> None:
    def sample(prompts: list[str], gens: list[torch.Generator]) -> torch.Tensor:
        return torch.stack([torch.rand(3, 4, 4, generator=g) for g in gens])

    generation.generate_images(sample, PROMPTS * 2, [6, 1, 4, 3, 7], tmp_path / "a", seed=10, batch_size=3)
    done = generation.generate_images(sample, PROMPTS * 2, range(8), tmp_path / "a", seed=10, batch_size=2)
    assert done == [0, 2, 5]  # the others existed
    for i in range(8):
        expected = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(10 + i)) * 255).round()
        got = scoring.load_image(tmp_path / "a" / f"{i:06d}.png") * 255
        assert torch.equal(got.round(), expected), i


def test_truncation_differs_from_rounding_exactly_where_the_fraction_says(tmp_path: Path) -> None:
    """``y = 255 x`` (float32). Rounding (halves to even) and DMD2's truncation (``(x * 255).to(torch.uint8)``) give
    ``floor(y) + 1`` and ``floor(y)`` where the fraction of ``y`` exceeds 1/2 or equals it above an odd level, the
    same value everywhere else; the PNG files hold those values."""
    levels = torch.arange(256, dtype=torch.float64)
    # every level, exactly and nudged by +-1e-3 / +-0.49 / +-0.51 of a level, exact halves, and random values
    offsets = torch.tensor([0.0, 1e-3, -1e-3, 0.49, 0.5, 0.51, -0.49, -0.51])
    grid = ((levels[:, None] + offsets[None]) / 255).flatten().float()
    x = torch.cat([grid, torch.rand(4000, generator=torch.Generator().manual_seed(0))]).clamp(0, 1)
    side = 24  # lay the values out as (N, 3, 24, 24) images
    pad = (-x.numel()) % (3 * side * side)
    images = torch.cat([x, torch.zeros(pad)]).reshape(-1, 3, side, side)
    rounded = generation.to_uint8(images, "round").long()
    truncated = generation.to_uint8(images, "truncate").long()
    y = images.float().permute(0, 2, 3, 1) * 255  # the float32 product both modes start from
    floor = torch.floor(y.double())
    frac = y.double() - floor
    up = (frac > 0.5) | ((frac == 0.5) & (floor % 2 == 1))
    assert torch.equal(truncated, floor.long())
    assert torch.equal(rounded - truncated, up.long())
    assert 0.4 < up[: x.numel()].double().mean() < 0.6  # about half the pixels move by one level
    assert up.any() and (~up).any() and ((frac == 0.5) & ~up).any()  # ties below an even level do not move
    with pytest.raises(
        ValueError, match=r"Expected quantization in \('round', 'truncate'\), but got 'floor'"
    ):
        generation.to_uint8(images, "floor")
    # generate_images writes what to_uint8 gives
    batch = images[:2]
    generation.generate_images(
        lambda prompts, gens: batch[: len(prompts)], ["a", "b"], [0, 1], tmp_path, seed=0, batch_size=2,
        quantization="truncate",
    )  # fmt: skip
    for i in (0, 1):
        got = (scoring.load_image(tmp_path / f"{i:06d}.png") * 255).round().long().permute(1, 2, 0)
        assert torch.equal(got, truncated[i])


def test_student_weights_are_hashed_by_the_main_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under accelerate, process 0 hashes the weights and broadcasts the digest (``broadcast_object_list``); the
    others never read the files. One process (or no accelerator): hashed in place."""
    import accelerate.utils

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    want = hashlib.sha256(b"w.safetensors\0weights").hexdigest()
    broadcasts: list[list[Any]] = []

    def fake_broadcast(objects: list[Any], from_process: int = 0) -> list[Any]:
        assert from_process == 0
        broadcasts.append(list(objects))
        objects[0] = broadcasts[0][0]  # what process 0 sent (the first call below is process 0's)
        return objects

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake_broadcast)
    main, other = (argparse.Namespace(num_processes=2, is_main_process=m) for m in (True, False))
    assert generation.shared_weights_sha256("lora", weights, main) == want
    hashed: list[Path] = []
    monkeypatch.setattr(generation, "weights_sha256", lambda kind, path: hashed.append(path) or "x")
    assert generation.shared_weights_sha256("lora", weights, other) == want  # received, not computed
    assert hashed == [] and broadcasts == [[want], [None]]
    assert generation.shared_weights_sha256("lora", weights, None) == "x" and hashed == [weights]
    single = argparse.Namespace(num_processes=1, is_main_process=True)
    assert generation.shared_weights_sha256("lora", weights, single) == "x" and len(broadcasts) == 2


def test_resume_refuses_images_made_with_other_settings_seed_or_prompts(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    record = {
        "model": "m",
        "num_inference_steps": 4,
        "guidance_scale": 0.0,
        "student_weights": {"sha256": "ab"},
    }
    generation.check_resume(folder, PROMPTS, 0, record, write=True)  # a fresh folder: recorded
    for i in (0, 1):
        generation.save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), generation.image_path(folder, i))
    generation.check_resume(folder, PROMPTS, 0, record, write=True)  # the same run resumes
    # more prompts (or fewer) with the same ones at the indices already drawn: resumes, and the record keeps all
    generation.check_resume(folder, [*PROMPTS, "a boat"], 0, record, write=True)
    generation.check_resume(folder, PROMPTS[:2], 0, record, write=True)
    assert generation.read_manifest(folder)["prompts"] == [*PROMPTS, "a boat"]
    with pytest.raises(ValueError, match=r"this run's generator, but they were made with generator"):
        generation.check_resume(folder, PROMPTS, 0, record | {"num_inference_steps": 2}, write=False)
    retrained = record | {"student_weights": {"sha256": "cd"}}  # same path, other weights
    with pytest.raises(ValueError, match=r"this run's generator"):
        generation.check_resume(folder, PROMPTS, 0, retrained, write=False)
    with pytest.raises(ValueError, match=r"this run's seed, but they were made with seed = 0"):
        generation.check_resume(folder, PROMPTS, 1, record, write=False)
    with pytest.raises(ValueError, match=r"image 000001.png .* prompt 1 of this run \('another'\)"):
        generation.check_resume(folder, [PROMPTS[0], "another"], 0, record, write=False)
    with pytest.raises(
        ValueError, match=r"this run's quantization, but they were made with quantization = 'round'"
    ):
        generation.check_resume(folder, PROMPTS, 0, record, write=False, quantization="truncate")
    assert generation.read_manifest(folder)["quantization"] == "round"
    # a record written before the option (no "quantization"): its images were rounded
    manifest = generation.read_manifest(folder)
    del manifest["quantization"]
    (folder / generation.MANIFEST_NAME).write_text(json.dumps(manifest))
    generation.check_resume(folder, PROMPTS, 0, record, write=False)
    with pytest.raises(ValueError, match=r"quantization = 'round' and this run has 'truncate'"):
        generation.check_resume(folder, PROMPTS, 0, record, write=False, quantization="truncate")
    (folder / generation.MANIFEST_NAME).unlink()  # images of unknown origin
    with pytest.raises(ValueError, match=r"holds 2 images without a record. Score them with --images"):
        generation.check_resume(folder, PROMPTS, 0, record, write=False)


def test_center_crop_resize_is_gigagans_center_crop_long_edge_and_lanczos() -> None:
    """GigaGAN's and DMD2's preparation: ``transforms.functional.center_crop(img, min(img.size))`` (their
    ``CenterCropLongEdge``), then ``img.resize((s, s), Image.LANCZOS)``; odd margins round as torchvision does."""
    from PIL import Image
    from torchvision.transforms import functional as tvf

    rng = np.random.default_rng(0)
    for w, h in ((41, 30), (30, 41), (33, 33), (64, 43), (43, 64)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = tvf.center_crop(image, min(image.size)).resize((16, 16), Image.LANCZOS)
        got = scoring.center_crop_resize(image, 16)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (w, h)
    assert scoring.center_crop_resize(image, None) is image


def test_every_setting_that_moves_the_numbers_changes_the_protocol(tmp_path: Path) -> None:
    """The protocol record differs (and ``check_comparable`` refuses) when the prompts, seed, generated resolution,
    evaluation resize, CLIP prefix or a backbone differ; the sampler (steps, guidance, scheduler, weights) lives under
    ``generator``, which differs between a teacher and its students by design and is recorded, not compared."""
    from diffdistill.errors import ProtocolMismatchError
    from diffdistill.metrics.protocol import EvaluationProtocol, check_comparable

    class Stub:
        def __init__(self, **protocol: Any) -> None:
            self._protocol = protocol

        def protocol(self) -> dict[str, Any]:
            return dict(self._protocol)

    (tmp_path / "p.txt").write_text("a\nb\n")
    base = dict(prompts_file=str(tmp_path / "p.txt"), prompt_set=None, seed=0, eval_resolution=256,
                clip_eval_resolution=None, clip_prefix="A photo depicts ")  # fmt: skip
    clip = Stub(metric="clip_score", backbone="open_clip ViT-g-14 pretrained=laion2b_s12b_b42k")
    generator = {"num_inference_steps": 4, "guidance_scale": 0.0, "student_weights": {"sha256": "ab"}}

    def protocol(prompts: tuple[str, ...] = ("a", "b"), size: tuple[int, int] = (512, 512), gen: Any = generator,
                 metric: Any = clip, quantization: str = "round", **changes: Any) -> EvaluationProtocol:  # fmt: skip
        args = argparse.Namespace(**(base | changes))
        record = metric_specs.evaluation_protocol(
            args, list(prompts), {"clip_score": metric}, generator=gen, image_size=size, reference=None,
            quantization=quantization,
        )  # fmt: skip
        return EvaluationProtocol.from_dict(record)

    reference = protocol()
    check_comparable(reference, protocol(gen=generator | {"num_inference_steps": 50, "guidance_scale": 5.0}))
    variants = {
        "prompt_sha256": protocol(prompts=("a", "c")),
        "seeds": protocol(seed=1),
        "resolution": protocol(size=(1024, 1024)),
        "preprocessing.eval_resolution": protocol(eval_resolution=512),
        "preprocessing.clip_eval_resolution": protocol(clip_eval_resolution=224),
        "preprocessing.clip_prefix": protocol(clip_prefix=""),
        "preprocessing.quantization": protocol(quantization="truncate"),
        "backbones.clip_score.backbone": protocol(
            metric=Stub(metric="clip_score", backbone="open_clip ViT-B-32")
        ),
    }
    for field, other in variants.items():
        with pytest.raises(ProtocolMismatchError, match=re.escape(field)):
            check_comparable(reference, other)
    with pytest.raises(ProtocolMismatchError, match=r"generator.student_weights.sha256"):
        check_comparable(
            reference, protocol(gen=generator | {"student_weights": {"sha256": "cd"}}), ignore=()
        )


def test_folder_against_itself_has_fid_zero(tiny: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    generation.generate_images(
        lambda prompts, gens: torch.stack([torch.rand(3, 24, 24, generator=g) for g in gens]),
        PROMPTS * 3,
        range(12),
        images,
        seed=0,
        batch_size=5,
    )
    argv = ["--images", str(images), "--reference_dir", str(images), "--fid_features",
            "tests.examples.tiny_metrics:tiny_features", "--prompts_file", str(tmp_path / "p.txt"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS * 3))
    stats = tmp_path / "reference.npz"
    record = evaluate.main(evaluate.parse_args([*argv, "--save_reference_stats", str(stats)]))
    # identical statistics: |mu1 - mu2|^2 = 0 and tr(S + S - 2 sqrtm(S S)) = 0 up to sqrtm's float64 round-off,
    # which is ~1e-13 relative to tr(S) (the features are O(0.1), tr(S) ~ 1e-2)
    assert abs(record["metrics"]["fid"]) < 1e-9
    assert record["protocol"]["extra"]["fid_reference"]["images"] == 12
    # no generation.json: the seed and quantisation are the options', recorded as declared
    declared = {"seed": 0, "quantization": "round", "quantization_source": "default"}
    assert record["protocol"]["generator"]["declared"] == declared
    # the saved reference statistics given instead of the folder: the same FID, and the same protocol (the
    # statistics' .json names the folder they came from), so the runs compare
    i = argv.index("--reference_dir")
    argv[i : i + 2] = ["--reference_stats", str(stats)]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "again")
    again = evaluate.main(evaluate.parse_args(argv))
    assert abs(again["metrics"]["fid"]) < 1e-9
    assert again["protocol"] == record["protocol"]
    evaluate.records.comparison_table([tmp_path / "out", tmp_path / "again"])
    Path(
        f"{stats}.json"
    ).unlink()  # statistics of unknown origin: identified by their own hash, with a warning
    with pytest.warns(UserWarning, match=r"has no reference.npz.json .* crop, resize and resolution"):
        third = evaluate.main(evaluate.parse_args(argv))
    from diffdistill.metrics import FeatureStatistics

    unknown = {"stats_sha256": FeatureStatistics.load(stats).sha256(), "preprocessing": "unknown"}
    assert third["protocol"]["extra"]["fid_reference"] == unknown


def _random_lora_file(unet: Any, folder: Path) -> Path:
    from diffdistill.students import add_lora, save_lora

    add_lora(unet, rank=2)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    folder.mkdir(parents=True)
    save_lora(unet, folder / "pytorch_lora_weights.safetensors")
    return folder


def test_lora_and_full_unet_students_sample_as_diffusers_loads_them(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet")
    lora = _random_lora_file(unet, tmp_path / "lora_run")
    full = tmp_path / "full_run"
    unet = UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(-1.5)
    unet.save_pretrained(full / "unet")
    sampler = ["--scheduler", "EulerDiscreteScheduler", "--scheduler_config", "timestep_spacing=trailing"]
    folders = {}
    for name, weights in (("lora", lora), ("full", full)):
        args = evaluate.parse_args(_argv(tiny, tmp_path / name, "--student_weights", str(weights), *sampler))
        record = evaluate.main(args, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
        generator = record["protocol"]["generator"]
        assert generator["scheduler_config"] == {"timestep_spacing": "trailing"}
        # the weights are identified by their bytes (retraining into the same path changes the record)
        student = generator["student_weights"]
        if name == "lora":
            lora_bytes = (weights / "pytorch_lora_weights.safetensors").read_bytes()
            want = hashlib.sha256(b"pytorch_lora_weights.safetensors\0" + lora_bytes).hexdigest()
            assert student == {"path": str(weights), "kind": "lora", "sha256": want, "lora_scale": 1.0}
        else:
            assert student["kind"] == "denoiser" and len(student["sha256"]) == 64
        folders[name] = tmp_path / name / "images"
    # the same prompts and seeds through diffusers with the weights loaded its own way (LoRA unfused)
    for name in ("lora", "full"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
        if name == "lora":
            pipe.load_lora_weights(str(lora))
        else:
            pipe.unet = UNet2DConditionModel.from_pretrained(full / "unet")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
        ref = pipe(
            PROMPTS[:2], generator=gens, height=64, width=64, num_inference_steps=2, output_type="pt"
        ).images
        got = torch.stack([scoring.load_image(folders[name] / f"{i:06d}.png") for i in range(2)])
        # PNG stores round(255 x): one quantisation step (1/255), plus the fused-vs-unfused LoRA float round-off
        assert torch.allclose(got, ref.float(), atol=1.5 / 255), (name, (got - ref).abs().max())
    teacher = tmp_path / "teacher"
    evaluate.main(
        evaluate.parse_args(_argv(tiny, teacher, "--teacher", "--num_prompts", "2", *sampler)),
        metrics={"clip_score": tiny_metrics.tiny_clip_score()},
    )
    for name in ("lora", "full"):
        assert _png_bytes(folders[name])["000000.png"] != _png_bytes(teacher / "images")["000000.png"]


def test_a_teacher_without_steps_runs_and_records_its_pipelines_default(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """``--teacher`` without ``--num_inference_steps``: StableDiffusionXLPipeline's own 50 steps, not the students'
    4, in the call and in the record (audit 12, item 5)."""
    argv = _argv(tiny, tmp_path / "teacher", "--teacher", "--guidance_scale", "1", "--num_prompts", "1")
    i = argv.index("--num_inference_steps")
    del argv[i : i + 2]
    record = evaluate.main(evaluate.parse_args(argv), metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    generator = record["protocol"]["generator"]
    assert generator["num_inference_steps"] == 50
    assert generator["sampler_sources"]["steps"] == "pipeline default 50"


def test_flux_student_and_compare_table(tiny: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("teacher", ["--teacher", "--num_inference_steps", "3"]), ("student", [])):
        runs[name] = tmp_path / name
        args = evaluate.parse_args(_argv(tiny, runs[name], "--guidance_scale", "3.5", *extra, model="flux"))
        evaluate.main(args, metrics={"clip_score": tiny_metrics.tiny_clip_score()})
        assert len(list((runs[name] / "images").glob("*.png"))) == len(PROMPTS)
    table = evaluate.records.comparison_table([runs["teacher"], runs["student"] / "results.json"])
    lines = table.splitlines()
    assert lines[0] == "| run | sampler | guidance | clip_score |"
    assert lines[2].startswith("| teacher | FlowMatchEulerDiscreteScheduler, 3 steps | 3.5 |")
    assert lines[3].startswith("| student | FlowMatchEulerDiscreteScheduler, 2 steps | 3.5 |")
    # another prompt set: refused, naming the differing fields
    other = tmp_path / "other_prompts.txt"
    other.write_text("\n".join(reversed(PROMPTS)))
    argv = _argv(tiny, tmp_path / "other", model="flux")
    argv[argv.index("--prompts_file") + 1] = str(other)
    evaluate.main(evaluate.parse_args(argv), metrics={"clip_score": tiny_metrics.tiny_clip_score()})
    with pytest.raises(ValueError, match=r"(?s)different protocols.*prompt_sha256"):
        evaluate.main(evaluate.parse_args(["--compare", str(runs["student"]), str(tmp_path / "other")]))


def _accelerate(argv: list[str], processes: int) -> None:
    """Run ``examples/evaluate.py`` in ``processes`` CPU processes (gloo) with the environment of
    ``accelerate launch --multi_gpu`` (``tests/preloaded_launch.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    code, output = preloaded_launch.launch_script(EXAMPLES / "evaluate.py", argv, env, nprocs=processes)
    assert code == 0, output[-6000:]


def test_precision_recall_against_the_reference_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--precision_recall --nearest_k 2``: the four numbers of ``diffdistill.metrics.precision_recall`` on the FID
    extractor's features of the reference folder and of the images, as read for scoring; recorded with k and the
    extractor; refused without the reference images or with a k of its own."""
    from diffdistill.metrics import precision_recall

    folders = {}
    for name, seed, scale in (("images", 0, 0.9), ("reference", 100, 1.0)):
        folders[name] = tmp_path / name
        generation.generate_images(
            lambda prompts, gens, s=scale: torch.stack(
                [s * torch.rand(3, 24, 24, generator=g) for g in gens]
            ),
            PROMPTS * 3,
            range(12),
            folders[name],
            seed=seed,
            batch_size=5,
        )
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS * 3))
    argv = ["--images", str(folders["images"]), "--reference_dir", str(folders["reference"]), "--fid_features",
            "tests.examples.tiny_metrics:tiny_features", "--prompts_file", str(tmp_path / "p.txt"),
            "--output_dir", str(tmp_path / "out"), "--precision_recall", "--nearest_k", "2"]  # fmt: skip
    record = evaluate.main(evaluate.parse_args(argv))
    extractor = tiny_metrics.tiny_features()
    with torch.no_grad():
        feats = {
            name: extractor(
                torch.stack([evaluate.scoring.load_image(f) for f in evaluate.scoring.image_files(folder)])
            )
            for name, folder in folders.items()
        }
    want = precision_recall(feats["reference"], feats["images"], 2)
    assert {k: record["metrics"][k] for k in want} == want
    assert (
        0 < want["precision"] < 1 or 0 < want["coverage"] < 1
    )  # the sets differ: not a trivial 1 everywhere
    entry = record["protocol"]["backbones"]["precision_recall"]
    assert entry["nearest_k"] == 2 and entry["feature_extractor"] == "TinyFeatures"
    assert entry["feature_extractor_factory"] == "tests.examples.tiny_metrics:tiny_features"
    i = argv.index("--reference_dir")
    for bad, message in (
        (
            [*argv[:i], *argv[i + 2 :]],
            "--precision_recall compares with the reference images' features one by one",
        ),
        ([a for a in argv if a != "--precision_recall"], "--nearest_k is --precision_recall's k"),
        ([*argv[:-1], "0"], "expected --nearest_k >= 1, but got 0"),
    ):
        with pytest.raises(SystemExit):
            evaluate.parse_args(bad)
        assert message in capsys.readouterr().err


def test_two_processes_give_the_numbers_of_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    generation.generate_images(
        lambda prompts, gens: torch.stack([torch.rand(3, 64, 64, generator=g) for g in gens]),
        PROMPTS * 2,
        range(7),
        reference,
        seed=100,
        batch_size=8,
    )
    # 5 prompts and 7 reference images on 2 processes: uneven shards (3 / 2 and 4 / 3), nothing dropped or doubled
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, "a boat"]) + "\n")
    hooks = ["--fid_features", "tests.examples.tiny_metrics:tiny_features"]
    hooks += ["--clip", "tests.examples.tiny_metrics:tiny_clip_score", "--reference_dir", str(reference)]
    hooks += ["--precision_recall", "--nearest_k", "2"]  # every feature gathered onto both processes
    # a LoRA student: its weights are hashed by process 0 only and the digest broadcast to process 1
    from diffusers import UNet2DConditionModel

    lora = _random_lora_file(
        UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet"), tmp_path / "lora"
    )
    lora_bytes = (lora / "pytorch_lora_weights.safetensors").read_bytes()
    digest = hashlib.sha256(b"pytorch_lora_weights.safetensors\0" + lora_bytes).hexdigest()
    hooks += ["--student_weights", str(lora)]
    records = {}
    # batches of 1 (generation and scoring): every image and every feature vector is computed alone, so none can
    # depend on how the prompts were split (float32 kernels give last-bit differences between batch sizes, 1e-7
    # relative, which would hide a reduction error of that size)
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        argv = _argv(tiny, out, "--batch_size", "1", "--eval_batch_size", "1", *hooks)
        argv[argv.index("--prompts_file") + 1] = str(prompts)
        if n == 1:  # one process: in this interpreter, through the same command line
            evaluate.main(evaluate.parse_args(argv))
        else:
            _accelerate(argv, n)
        records[n] = json.loads((out / "results.json").read_text())
    assert _png_bytes(tmp_path / "p1" / "images") == _png_bytes(tmp_path / "p2" / "images")
    assert len(_png_bytes(tmp_path / "p2" / "images")) == 5
    one, two = records[1]["metrics"], records[2]["metrics"]
    # the same images and features; only the order of the float64 sums over the processes differs (1e-16
    # relative per sum), which the CLIP mean keeps at that size and FID's covariance square root (condition
    # number of the 8x8 covariances ~1e3) amplifies to ~1e-13: rel 1e-9 leaves a wide margin
    assert one.keys() == two.keys() == {"fid", "clip_score", "precision", "recall", "density", "coverage"}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12)
    for key in ("precision", "recall", "density", "coverage"):  # counts of the same features: equal
        assert two[key] == one[key]
    assert records[1]["protocol"] == records[2]["protocol"]
    # process 1 checked its sampler record, hash included, against the generation.json process 0 wrote (a
    # different digest would have stopped it); both name the file's own SHA-256
    for n in (1, 2):
        assert records[n]["protocol"]["generator"]["student_weights"]["sha256"] == digest
        assert (
            generation.read_manifest(tmp_path / f"p{n}" / "images")["generator"]["student_weights"]["sha256"]
            == digest
        )


def _write_annotations(path: Path) -> dict[int, list[str]]:
    """A fake captions_val2014.json: 9 images with 1-6 captions (one caption empty, one over two lines)."""
    rng = np.random.default_rng(5)
    images, anns, captions = [], [], {}
    ann_id = 1000
    for k in range(9):
        image_id = 50 + 7 * k
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
        for c in range(1 + k % 6):
            text = f"image {image_id} caption {c}" + (" on\ntwo lines" if (k, c) == (2, 1) else "")
            anns.append({"image_id": image_id, "id": ann_id, "caption": "" if (k, c) == (3, 0) else text})
            captions.setdefault(image_id, []).append(" ".join(text.split()))
            ann_id += int(rng.integers(1, 5))
    captions[50 + 21] = captions[50 + 21][1:]  # the empty caption is dropped
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return captions


def test_coco_prompt_files_follow_the_rules(tmp_path: Path) -> None:
    ann = tmp_path / "captions_val2014.json"
    captions = _write_annotations(ann)
    path = coco_prompts.build_prompt_file("coco2014-30k", tmp_path / "a", annotations=ann, count=6)
    again = coco_prompts.build_prompt_file("coco2014-30k", tmp_path / "b", annotations=ann, count=6)
    assert path.read_bytes() == again.read_bytes()  # deterministic
    record = json.loads((tmp_path / "a" / "selection.json").read_text())
    picked = record["selection"]
    assert len({s["image_id"] for s in picked}) == 6  # distinct images, one caption each
    for s, line in zip(picked, path.read_text().splitlines()):
        assert s["caption"] == line and line in captions[s["image_id"]]
    assert record["rule"].startswith("our choice") and record["protocol"]["count"] == 30_000
    # the drawn images linked as the FID reference
    coco = tmp_path / "val2014"
    coco.mkdir()
    for s in json.loads(ann.read_text())["images"]:
        (coco / s["file_name"]).write_bytes(str(s["id"]).encode())
    coco_prompts.main(
        coco_prompts.parse_args(
            ["--protocol", "dmd2-coco10k", "--annotations", str(ann), "--output_dir", str(tmp_path / "r"),
             "--count", "6", "--link_reference_images", str(coco)]
        )
    )  # fmt: skip
    linked = sorted(p.name for p in (tmp_path / "r" / "reference").iterdir())
    assert linked == sorted(s["file_name"] for s in picked)  # the same draw (same seed) as above
    other = coco_prompts.build_prompt_file(
        "dmd2-coco10k", tmp_path / "c", annotations=ann, count=6, selection_seed=1
    )
    assert other.read_text() != path.read_text()
    with pytest.raises(ValueError, match="at least 10 captioned images"):
        coco_prompts.build_prompt_file("dmd2-coco10k", tmp_path / "d", annotations=ann, count=10)
    # published files are used as they are
    txt = tmp_path / "captions.txt"
    txt.write_text(" a b \n\nc d\ne\n")
    used = coco_prompts.build_prompt_file("coco2014-30k", tmp_path / "e", published_prompts=txt, count=3)
    assert used.read_text() == "a b\nc d\ne\n"
    with pytest.raises(ValueError, match="to hold 30000 prompts for coco2014-30k, but it holds 3"):
        coco_prompts.build_prompt_file("coco2014-30k", tmp_path / "f", published_prompts=txt)
    pkl = tmp_path / "all_prompts.pkl"
    pkl.write_bytes(pickle.dumps(["x  y", "z"]))
    assert coco_prompts.read_published_prompts(pkl) == ["x y", "z"]
    # DMD2 samples a None entry as "" at its index: refused, not dropped (dropping would shift later prompts)
    pkl.write_bytes(pickle.dumps(["x y", None, "z"]))
    with pytest.raises(ValueError, match=r"1 are None or blank \(first: index 1\)"):
        coco_prompts.read_published_prompts(pkl)
    pkl.write_bytes(pickle.dumps(OrderedDict(a="b")))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load it"):
        coco_prompts.read_published_prompts(pkl)
    with pytest.raises(ValueError, match="Expected --annotations"):
        coco_prompts.build_prompt_file("coco2014-30k", tmp_path / "g")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--teacher", "--student_weights", "x"],
            "--teacher samples the base pipeline: drop --student_weights",
        ),
        (
            ["--reference_dir", "a", "--reference_stats", "b"],
            "give --reference_dir or --reference_stats, not both",
        ),
        (["--timesteps", "999", "--sigmas", "1.0"], "give --timesteps or --sigmas, not both"),
        (
            ["--save_reference_stats", "s.npz"],
            "--save_reference_stats saves the statistics of --reference_dir",
        ),
    ],
)
def test_contradictory_options_are_refused(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--pretrained_model_name_or_path", "m", "--prompts_file", "p.txt", "--output_dir", "o"]
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, *extra])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--prompts_file", "p.txt", "--output_dir", "o"])
    assert "--pretrained_model_name_or_path is needed" in capsys.readouterr().err
