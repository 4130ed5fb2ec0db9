"""Multi-aspect training (``--aspect_buckets``, ``examples/training/aspect_buckets.py``): LADD's and prompt-only
flow_kd's teacher samples made at several sizes (each shard the pipeline's own samples at its size, FLUX's ``mu``
that size's), images cropped to their nearest size (flow_kd, sdxl_ssd1b_kd with SDXL's bucket conditioning),
batches of one size that draw every sample as often as without buckets, each size's schedule in the KD's
noising, DMD2's generator and TSCD's teacher, heads and noising at each micro-batch's own size and grid, and the
option checks."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.example_modules import load_example
from tests.examples.flow_scripts import (  # noqa: F401 (autouse fixture)
    caption_folders,
    data_sources,
    deterministic_runs,
    flow_critics,
    flow_dmd2,
    flow_kd,
    flow_ladd,
    flow_models,
    flow_tscd,
)
from tests.examples.tiny_flow import (
    NUM_FRAMES,
    T5_LENGTH,
    save_tiny_wan_pipeline,
    smoke_argv,
    write_captioned_videos,
    write_tiny_flow_models,
)
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline, write_captioned_images

from training import aspect_buckets, teacher_pairs  # isort: skip  (examples/ is on sys.path via flow_scripts)

# 128 x 256 px: 16 x 32 latents, 128 FLUX tokens (mu 0.478) against 64 x 64's 16 (mu 0.459): distinct grids
BUCKETS = ["64x64", "128x256"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_flow_models(tmp_path_factory.mktemp("tiny_buckets"), captions=["a red cube", ""])


def _samples_argv(samples: Path, count: int = 4) -> list[str]:
    return [
        *("--teacher_samples_dir", str(samples), "--num_teacher_samples", str(count)),
        *("--teacher_samples_shard_size", "2", "--teacher_steps", "2"),
    ]


def _shard(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return (
            f.get_tensor("noise"),
            f.get_tensor("latent"),
            json.loads(meta["prompts"]),
            json.loads(meta["settings"]),
        )


def test_parse_size_and_its_errors() -> None:
    assert aspect_buckets.parse_size("832x1216") == (832, 1216)
    assert aspect_buckets.parse_size(" 64X96 ") == (64, 96)
    for bad in ("832", "832x", "x64", "0x64", "64*64", "-64x64"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"HEIGHTxWIDTH.*but got '{re.escape(bad)}'"):
            aspect_buckets.parse_size(bad)


def test_one_group_draws_as_before_and_several_draw_each_item_uniformly() -> None:
    """One group: exactly the draws of ``torch.randint`` over all items (runs without buckets keep their data order,
    and resume from checkpoints made before buckets existed). Several: a batch lies in one group, and each item is
    drawn with probability 1 / total, the group with probability proportional to its size."""
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        want = torch.randint(7, (3,), generator=gen_b).tolist()
        assert aspect_buckets.draw_grouped([list(range(7))], 3, gen_a) == want
    groups = [[0], [1, 2, 3], [4, 5, 6, 7, 8, 9]]  # sizes 1, 3, 6 of 10 items
    gen = torch.Generator().manual_seed(0)
    counts, trials, batch = torch.zeros(10), 6000, 4
    for _ in range(trials):
        drawn = aspect_buckets.draw_grouped(groups, batch, gen)
        assert sum(any(i in g for i in drawn) for g in groups) == 1, drawn  # one group per batch
        counts += torch.bincount(torch.tensor(drawn), minlength=10)
    # each draw hits item i with p = 1/10; items within one batch are not independent across groups, so bound the
    # count by 6 standard deviations of the batch-level variance (batch draws of one item: at most `batch` each).
    n, p = trials * batch, 0.1
    sd = math.sqrt(
        trials * batch**2 * p
    )  # >= the count's standard deviation (second moment of a batch's hits)
    assert ((counts - n * p).abs() < 6 * sd).all(), counts.tolist()
    with pytest.raises(AssertionError):  # the bound is tight enough to see a group drawn uniformly instead
        assert ((torch.tensor([n / 3] + [n / 9] * 3 + [n / 18] * 6) - n * p).abs() < 6 * sd).all()


def test_bucket_sizes_find_a_batchs_bucket_and_draw_one_per_micro_batch(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """``BucketSizes`` (flow_dmd2, flow_tscd and ``BucketSchedules``): the size of a batch from its latent shape
    (``flow_models.latent_shape`` at each size), a clear error for latents of no bucket, and per micro-batch a size
    drawn uniformly with the draw of ``torch.randint`` on the caller's generator -- none with one size."""
    args = flow_dmd2.parse_args([*smoke_argv(tiny, "flux", tmp_path / "o"), "--aspect_buckets", *BUCKETS])
    parts = flow_models.load_flow(args)
    buckets = aspect_buckets.BucketSizes(parts, args)
    assert buckets.sizes == [(64, 64), (128, 256)]
    for h, w in buckets.sizes:
        assert buckets.of(torch.zeros(flow_models.latent_shape(parts, 3, h, None, w))) == (h, w)
    with pytest.raises(
        ValueError,
        match=r"Expected latents of one of the buckets' shapes \[\(8, 8\), \(16, 32\)\], but got \(8, 16\)",
    ):
        buckets.of(torch.zeros(1, 16, 8, 16))
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = [buckets.draw(gen) for _ in range(400)]
    assert drawn == [buckets.sizes[int(torch.randint(2, (1,), generator=ref))] for _ in range(400)]
    assert 150 < drawn.count((64, 64)) < 250  # binomial(400, 1/2): sd 10
    one = aspect_buckets.BucketSizes(parts, flow_dmd2.parse_args(smoke_argv(tiny, "flux", tmp_path / "p")))
    state = gen.get_state()
    assert one.sizes == [(args.resolution, args.resolution)] and one.draw(gen) == one.sizes[0]
    assert torch.equal(
        gen.get_state(), state
    )  # runs without buckets draw nothing: their random streams unchanged


def test_ladd_makes_each_shard_at_its_size_as_the_pipeline_and_trains_on_batches_of_one_size(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX LADD with two buckets: shard 0 at 64 x 64, shard 1 at 128 x 256, each ``FluxPipeline``'s own sample of
    its prompts at that size (its ``mu``: a 64 x 64 grid on the 128 x 256 noise differs); training batches hold one
    size and both sizes train; a run without buckets reuses the square bucket's shard (the same samples)."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    shapes: list[tuple[int, ...]] = []
    batch = teacher_pairs.PairShards.batch

    def recording_batch(self: Any, gen: torch.Generator) -> Any:
        out = batch(self, gen)
        shapes.append(tuple(out[1].shape))
        return out

    monkeypatch.setattr(teacher_pairs.PairShards, "batch", recording_batch)
    samples, out = tmp_path / "samples", tmp_path / "ladd"
    argv = smoke_argv(tiny, "flux", out, *_samples_argv(samples), "--use_lora", "--lora_rank", "2")
    argv += ["--discriminator_norm_groups", "4", "--max_train_steps", "6", "--checkpointing_steps", "6"]
    flow_ladd.main(flow_ladd.parse_args([*argv, "--aspect_buckets", *BUCKETS]))

    first, second = sorted(samples.glob("samples-*.safetensors"))
    _, latent0, _, settings0 = _shard(first)
    noise1, latent1, prompts1, settings1 = _shard(second)
    assert (latent0.shape, latent1.shape) == ((2, 16, 8, 8), (2, 16, 16, 32))
    assert (settings0["resolution"], settings0["width"]) == (64, None)
    assert (settings1["resolution"], settings1["width"]) == (128, 256)
    pipe = FluxPipeline.from_pretrained(str(tiny["flux"]))
    pipe.set_progress_bar_config(disable=True)

    def pipeline_sample(noise: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """``FluxPipeline`` at the noise's size: its ``mu`` of the token count, or a static ``shift``."""
        if shift is not None:  # a static shift e^mu gives the exponential time shift of that mu exactly
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, use_dynamic_shifting=False, shift=shift
            )
        with torch.no_grad():
            packed = pipe(
                prompts1,
                height=8 * noise.shape[-2],
                width=8 * noise.shape[-1],
                num_inference_steps=2,
                guidance_scale=3.5,
                latents=flow_models.pack_latents(noise),
                max_sequence_length=T5_LENGTH,
                output_type="latent",
            ).images
        return flow_models.unpack_latents(packed, *noise.shape[-2:])

    torch.testing.assert_close(latent1, pipeline_sample(noise1), rtol=1e-4, atol=1e-4)
    # mutation: the same noise on the grid of 64 x 64's mu (16 tokens) is off by far more than the tolerance
    config = pipe.scheduler.config
    mu_64 = calculate_shift(
        16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert (pipeline_sample(noise1, shift=math.exp(mu_64)) - latent1).abs().max() > 1e-3
    assert shapes and {s[1:] for s in shapes} == {(16, 8, 8), (16, 16, 32)}, (
        shapes
    )  # both sizes, one per batch

    # a run without buckets at 64 px reuses shard 0 (the same prompts, noise and samples) untouched
    stamp = first.stat().st_mtime_ns
    plain = smoke_argv(tiny, "flux", tmp_path / "plain", *_samples_argv(samples, 2), "--use_lora")
    plain += ["--lora_rank", "2", "--discriminator_norm_groups", "4", "--max_train_steps", "1"]
    flow_ladd.main(flow_ladd.parse_args(plain))
    assert first.stat().st_mtime_ns == stamp


# (height, width) of the images: square, 2:1 wide, near-square, 2:1 wide -> buckets 64x64 and 128x256 (both 1:1, 1:2)
IMAGE_SIZES = [(64, 64), (60, 120), (70, 66), (50, 100)]


def _images(folder: Path) -> Path:
    return write_captioned_images(
        folder, ["a red cube", "a wide road", "", "a long table"], sizes=IMAGE_SIZES
    )


@pytest.mark.parametrize("data", ["prompts", "images"])
def test_kd_noises_each_batch_on_its_sizes_schedule(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str
) -> None:
    """``flow_kd.py --aspect_buckets``, prompt-only (teacher samples at the sizes) or on images (each cropped to its
    nearest size): each training batch is noised on the schedule of its own size (FLUX: the ``mu`` of its token
    count, as ``flow_schedule`` at that size), not on ``--resolution``'s."""
    seen: list[tuple[tuple[int, ...], Any]] = []
    lookup = aspect_buckets.BucketSchedules.__call__

    def recording_lookup(self: Any, latents: torch.Tensor) -> Any:
        schedule = lookup(self, latents)
        seen.append((tuple(latents.shape[2:]), schedule))
        return schedule

    monkeypatch.setattr(aspect_buckets.BucketSchedules, "__call__", recording_lookup)
    source = {**tiny, "images": _images(tmp_path / "images")}
    extra = _samples_argv(tmp_path / "samples") if data == "prompts" else []
    argv = smoke_argv(source, "flux", tmp_path / "kd", *extra, "--keep_blocks", "0", data=data)
    argv += ["--keep_single_blocks", "0", "--max_train_steps", "6", "--checkpointing_steps", "6"]
    args = flow_kd.parse_args([*argv, "--aspect_buckets", *BUCKETS])
    flow_kd.main(args)
    assert {shape for shape, _ in seen} == {(8, 8), (16, 32)}, [s for s, _ in seen]
    parts = flow_models.load_flow(args)
    t = torch.arange(0, 1000, 37)
    want = {
        (8, 8): flow_models.flow_schedule(parts, 64),
        (16, 32): flow_models.flow_schedule(parts, 128, width=256),
    }
    for shape, schedule in seen:
        torch.testing.assert_close(schedule.sigma(t), want[shape].sigma(t), rtol=0, atol=0)
    assert (want[(8, 8)].sigma(t) - want[(16, 32)].sigma(t)).abs().max() > 1e-3  # the sizes' tables differ


@pytest.mark.parametrize("data", ["prompts", "images"])
def test_dmd2_generates_each_micro_batch_at_its_size_on_that_sizes_grid(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str
) -> None:
    """``flow_dmd2.py --aspect_buckets`` on FLUX: prompt-only, each micro-batch's size drawn among the buckets; with
    the GAN term, the size of its real images' bucket. The generator's noise has that size and its backward
    simulation runs on that size's grid (FLUX's shifted linspace with the ``mu`` of its token count), which the
    run saves per size; ``student_sigmas.json`` stays the grid of ``--resolution`` (validation's)."""
    seen: list[tuple[tuple[int, ...], list[float]]] = []
    real: list[tuple[int, ...]] = []
    renoise, latents_batch = flow_critics.renoise_steps, data_sources.StepData.latents_batch

    def recording_renoise(denoiser: Any, noise: torch.Tensor, sigmas: Any, *a: Any, **k: Any) -> Any:
        seen.append((tuple(noise.shape[2:]), list(sigmas)))
        return renoise(denoiser, noise, sigmas, *a, **k)

    def recording_batch(self: Any, *a: Any, **k: Any) -> Any:
        out = latents_batch(self, *a, **k)
        real.append(tuple(out[0].shape[2:]))
        return out

    monkeypatch.setattr(flow_critics, "renoise_steps", recording_renoise)
    monkeypatch.setattr(data_sources.StepData, "latents_batch", recording_batch)
    source = {**tiny, "images": _images(tmp_path / "images")}
    extra = ["--gan_weight", "--discriminator_norm_groups", "4"] if data == "images" else []
    argv = smoke_argv(source, "flux", tmp_path / "dmd2", "--lora_rank", "4", *extra, data=data)
    argv += ["--num_student_steps", "2", "--generator_every", "1", "--max_train_steps", "6"]
    args = flow_dmd2.parse_args([*argv, "--checkpointing_steps", "6", "--aspect_buckets", *BUCKETS])
    flow_dmd2.main(args)
    parts = flow_models.load_flow(args)
    want = {
        (h // 8, w // 8): flow_critics.student_grid(
            flow_models.flow_schedule(parts, h, width=w, terminal_stretch=False), 2
        )
        for h, w in (aspect_buckets.parse_size(b) for b in BUCKETS)
    }
    assert len(seen) == 6 and {shape for shape, _ in seen} == set(want), [s for s, _ in seen]
    for shape, sigmas in seen:
        assert sigmas == want[shape]
    assert want[(8, 8)][1] != want[(16, 32)][1]  # the sizes' grids differ
    if data == "images":  # the samples are made at the size of the batch's images
        assert real == [shape for shape, _ in seen]
    saved = json.loads((tmp_path / "dmd2" / aspect_buckets.GRIDS_FILE).read_text())
    assert saved == {"64x64": want[(8, 8)], "128x256": want[(16, 32)]}
    assert json.loads((tmp_path / "dmd2" / "student_sigmas.json").read_text()) == want[(8, 8)]


@pytest.mark.parametrize("data", ["prompts", "images"])
def test_tscd_trains_each_micro_batch_on_its_sizes_schedule(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str
) -> None:
    """``flow_tscd.py --aspect_buckets`` on FLUX with the hybrid distance: each micro-batch (prompt-only: a drawn
    size; images: its bucket) is noised, solved by the teacher and judged by the heads on its own size's schedule
    (FLUX's ``mu`` of its token count), and the run saves the last stage's grid at each size."""
    from diffdistill.discriminators import LADDDiscriminator

    events: list[tuple[str, Any]] = []
    segments, sides, forward = flow_tscd.tscd_segments, flow_tscd.tscd_sides, LADDDiscriminator.forward

    def recording_segments(*args: Any, **kwargs: Any) -> Any:
        sample = segments(*args, **kwargs)
        events.append(("t_end", sample.t_end.detach().cpu()))
        return sample

    def recording_sides(student: Any, target: Any, teacher: Any, x_t: torch.Tensor, *args: Any) -> Any:
        events.append(("size", (tuple(x_t.shape[2:]), teacher.schedule)))
        return sides(student, target, teacher, x_t, *args)

    def recording_heads(self: Any, hidden: Any, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        events.append(("heads", timestep.detach().float().cpu()))
        return forward(self, hidden, timestep, *args, **kwargs)

    monkeypatch.setattr(flow_tscd, "tscd_segments", recording_segments)
    monkeypatch.setattr(flow_tscd, "tscd_sides", recording_sides)
    monkeypatch.setattr(LADDDiscriminator, "forward", recording_heads)
    source = {**tiny, "images": _images(tmp_path / "images")}
    extra = ["--use_lora", "--lora_rank", "2", "--segments", "2,1", "--distance", "hybrid"]
    extra += ["--discriminator_norm_groups", "4", "--max_train_steps", "6", "--checkpointing_steps", "0"]
    args = flow_tscd.parse_args(
        [*smoke_argv(source, "flux", tmp_path / "tscd", *extra, data=data), "--aspect_buckets", *BUCKETS]
    )
    flow_tscd.main(args)
    parts = flow_models.load_flow(args)
    want = {
        (h // 8, w // 8): flow_models.flow_schedule(parts, h, width=w)
        for h, w in (aspect_buckets.parse_size(b) for b in BUCKETS)
    }
    t = torch.arange(0, 1000, 37)
    sizes, heads = [], 0
    t_end, shape = None, None
    for kind, value in events:
        if kind == "t_end":
            t_end = value
        elif kind == "size":
            shape, schedule = value
            sizes.append(shape)
            torch.testing.assert_close(schedule.sigma(t), want[shape].sigma(t), rtol=0, atol=0)
        else:  # the heads' timestep: the sigma of t_end on the micro-batch's own schedule (0 at the clean end)
            assert t_end is not None and shape is not None
            sigma = torch.where(t_end < 0, 0.0, want[shape].sigma(t_end.clamp(min=0)).float())
            scale = 1000.0 if float(value.max()) > 1.5 else 1.0
            torch.testing.assert_close(value, scale * sigma, rtol=1e-6, atol=1e-4)
            heads += 1
    assert set(sizes) == set(want) and len(sizes) == 6, sizes
    assert heads > 0, "the heads never ran"
    assert (want[(8, 8)].sigma(t) - want[(16, 32)].sigma(t)).abs().max() > 1e-3  # the sizes' tables differ
    saved = json.loads((tmp_path / "tscd" / aspect_buckets.GRIDS_FILE).read_text())
    assert saved == {
        "64x64": flow_tscd.student_grid(want[(8, 8)], 1)["sigmas"],
        "128x256": flow_tscd.student_grid(want[(16, 32)], 1)["sigmas"],
    }


def test_dmd2_buckets_on_two_processes_fsdp2_equals_ddp(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``flow_dmd2.py --aspect_buckets`` on 2 CPU processes whose micro-batches have different sizes in one step:
    FSDP2 (the shared base sharded once, each rank's blocks run at its own token count) makes the same LoRA updates
    as DDP (tests/state_compare.py's bound, relative to the update)."""
    from safetensors.torch import load_file

    from tests.examples.test_sdxl_scripts import _two_process_runs
    from tests.state_compare import assert_same_update

    argv = smoke_argv(tiny, "flux", tmp_path / "x", "--lora_rank", "4", "--generator_every", "1")
    argv += ["--aspect_buckets", *BUCKETS]
    # the sizes the two ranks draw (as train_step: the prompts, then the size, from the micro-step's generator)
    args = flow_dmd2.parse_args(argv)
    args.train_batch_size = 1
    data = data_sources.StepData(args, need_images=False)
    drawn = {}
    for step in range(2):
        for rank in range(2):
            gen = data_sources.step_generator(args.seed, step, rank, 0)
            data.batch(gen)
            drawn[step, rank] = BUCKETS[int(torch.randint(len(BUCKETS), (1,), generator=gen))]
    assert any(drawn[step, 0] != drawn[step, 1] for step in range(2)), drawn  # the case under test
    out = _two_process_runs("flow_dmd2", argv, tmp_path, "fsdp", resume=False)
    step1 = {
        "transformer." + k: v
        for k, v in load_file(str(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors")).items()
    }
    ddp, fsdp = (load_file(str(out[k] / "pytorch_lora_weights.safetensors")) for k in ("ddp", "fsdp"))
    assert_same_update(fsdp, ddp, step1, what="flow_dmd2 buckets: FSDP2 vs DDP, ranks at different sizes")


def test_image_folder_crops_each_image_to_its_nearest_bucket(tmp_path: Path) -> None:
    """Each image goes to the bucket of the nearest aspect ratio in log scale and is resized (bicubic) by the
    smallest factor that covers the bucket, then centre-cropped (derived here by hand with PIL); the folder's
    groups are the buckets' images; cache keys name the crop (square keys are unchanged without buckets); a
    StepData batch holds one bucket's images."""
    import numpy as np
    from PIL import Image

    folder = _images(tmp_path / "images")
    buckets = [(64, 64), (32, 96), (96, 32)]  # 1:1, 1:3 wide, 3:1 tall
    data = caption_folders.ImageCaptionFolder(folder, 64, buckets)
    # log aspects: 0, log 2 = 0.69 (nearest log 3 = 1.10, not 0), log(66/70) = -0.06, log 2: -> 0, 1, 0, 1
    assert data.bucket_of == [0, 1, 0, 1] and data.groups == [[0, 2], [1, 3]]
    # image 1 (60 x 120) into 32 x 96: scale max(32/60, 96/120) = 0.8 -> 48 x 96, rows 8..40
    with Image.open(folder / "1.png") as img:
        rgb = img.convert("RGB").resize((96, 48), Image.BICUBIC).crop((0, 8, 96, 40))
    want = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    pixels, caption = data[1]
    assert caption == "a wide road" and pixels.shape == (3, 32, 96)
    torch.testing.assert_close(pixels, want, rtol=0, atol=0)
    assert data[2][0].shape == (3, 64, 64) and data.cache_key(1).endswith("|32x96")
    assert caption_folders.ImageCaptionFolder(folder, 64).cache_key(1).endswith("|64")  # as before buckets
    args = argparse.Namespace(
        train_batch_size=3,
        train_data_dir=str(folder),
        prompts_file=None,
        resolution=64,
        aspect_buckets=buckets,
    )
    steps = data_sources.StepData(args, need_images=True)
    for step in range(8):
        idx, _ = steps.draw(data_sources.step_generator(0, step))
        assert {data.bucket_of[i] for i in idx} in ({0}, {1}), idx


def test_ssd1b_kd_conditions_each_batch_on_its_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sdxl_ssd1b_kd.py --aspect_buckets``: each KD batch holds one bucket's latents and the UNet's ``time_ids``
    carry that size as original and target size (SDXL's bucket conditioning), both sizes train."""
    from diffdistill.students import LayerKD

    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []
    forward = LayerKD.forward

    def recording(self: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((tuple(sample.shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(LayerKD, "forward", recording)
    script = load_example("sdxl_ssd1b_kd")
    model = save_tiny_sdxl_pipeline(tmp_path / "sdxl", seed=0)
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")]
    argv += ["--train_data_dir", str(_images(tmp_path / "images")), "--preset", "vega", "--resolution", "64"]
    argv += ["--train_batch_size", "2", "--max_train_steps", "6", "--report_to", "none", "--seed", "3"]
    script.main(script.parse_args([*argv, "--aspect_buckets", "64x64", "64x128"]))
    assert {shape for shape, _ in seen} == {(8, 8), (8, 16)}, [s for s, _ in seen]
    for (h, w), time_ids in seen:
        want = torch.tensor([8 * h, 8 * w, 0, 0, 8 * h, 8 * w], dtype=time_ids.dtype)
        assert torch.equal(time_ids, want.expand_as(time_ids)), time_ids
    with pytest.raises(
        ValueError, match=r"multiples of 8 \(SDXL's VAE factor, as --resolution\), but got 64x100"
    ):
        script.parse_args([*argv, "--aspect_buckets", "64x100"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--aspect_buckets", "64x72"], r"multiples of 16 .* but got 64x72: round it, e.g. to 64x64"),
        (
            ["--aspect_buckets", "64x64", "32x64", "64X64"],
            r"distinct --aspect_buckets sizes, but 64x64 is listed",
        ),
        (
            ["--aspect_buckets", "64x64", "32x64", "64x32"],
            r"3 sizes are listed .* make 2: raise --num_teacher_samples",
        ),
    ],
)
def test_bucket_options_are_checked(
    tiny: dict[str, Path], tmp_path: Path, extra: list[str], match: str
) -> None:
    argv = smoke_argv(tiny, "flux", tmp_path, *_samples_argv(tmp_path / "samples"), *extra)
    with pytest.raises(ValueError, match=match):
        flow_ladd.parse_args(argv)


def test_wan_clips_refuse_buckets(tmp_path: Path) -> None:
    """Wan's clips are cropped to one size: ``--aspect_buckets`` with ``--train_data_dir`` is refused for Wan."""
    tiny = {"wan": save_tiny_wan_pipeline(tmp_path / "wan")}
    tiny["images"] = write_captioned_videos(tmp_path / "clips", ["a", "b"])
    argv = smoke_argv(
        tiny, "wan", tmp_path / "out", "--keep_blocks", "0", "--num_frames", str(NUM_FRAMES), data="images"
    )
    with pytest.raises(
        ValueError, match=r"Wan's --train_data_dir clips are cropped to one.*drop --aspect_buckets"
    ):
        flow_kd.parse_args([*argv, "--aspect_buckets", *BUCKETS])


def test_image_buckets_need_distinct_aspect_ratios_and_image_runs_need_no_shards(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Images go to the size nearest their aspect ratio, so two sizes of one ratio would leave the second empty:
    refused; an image run makes no teacher samples, so the shard-per-size rule does not apply to it."""
    with pytest.raises(ValueError, match=r"distinct aspect ratios .* but 64x64, 128x128 share one"):
        caption_folders.ImageCaptionFolder(
            _images(tmp_path / "images"), 64, [(64, 64), (128, 128), (64, 128)]
        )
    source = {**tiny, "images": _images(tmp_path / "more")}
    sizes = [
        f"{16 * k}x{16 * (k + 1)}" for k in range(1, 6)
    ]  # 5 sizes; --num_teacher_samples 4 would make 2 shards
    argv = smoke_argv(
        source, "flux", tmp_path / "kd", *_samples_argv(tmp_path / "s"), "--keep_blocks", "0", data="images"
    )
    args = flow_kd.parse_args([*argv, "--aspect_buckets", *sizes])
    assert len(args.aspect_buckets) == 5
