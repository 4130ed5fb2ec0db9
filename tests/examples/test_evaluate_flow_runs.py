"""Tests of ``examples/evaluate.py`` on the flow scripts' run folders (tiny random-weight SD3, FLUX.1-dev and
FLUX.1-schnell pipelines of :mod:`tests.examples.tiny_flow`), for audit 9's defects 1, 3, 6 and 7.

Checked:

- DMD2's stochastic sampler (the run's ``scheduler/``, ``stochastic_sampling``) re-noises from
  ``student_sampler.renoise_seed`` of the image's seed: its first re-noising draw is not the initial noise (nor, for
  FLUX's packed latents, a permutation of it), the images are ``pipe(...)``'s with that documented seeding, and an
  image does not depend on its batch;
- the guidance and the prompt length come from the run's ``student_sampler.json`` when the options do not give them
  (recorded with the file as their source, no warning), the options win, and a folder without the file keeps the old
  behaviour (the pipeline's default guidance and its warning);
- FLUX.1-schnell (no guidance embedding) records guidance None, with no CFG warning, and says that its CFG is
  ``true_cfg_scale``; a FLUX.1-dev run's recorded guidance is used rather than the pipeline's 3.5;
- ``--max_sequence_length`` reaches SD3 / FLUX pipelines (the image changes with it) and is refused for a pipeline
  without a text length; a ``--resolution`` the pipeline would change is refused with the nearest sizes it keeps; a
  FLUX grid shifted for the trained size warns when evaluated at another size, and the record holds both sizes;
- a student trained at a non-square size is generated at it when no size is given (the record's ``height`` x
  ``width``, named as the size's source), ``--width`` makes non-square images of any image pipeline, and a
  ``--width`` the pipeline would change is refused.
"""

from __future__ import annotations

import json
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples import tiny_metrics
from tests.examples.example_modules import load_example, load_script
from tests.examples.tiny_flow import IMAGE_SIZE, T5_LENGTH, quiet_pipeline, write_tiny_flow_models

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

PROMPTS = ["a cat", "a red car"]
SIGMAS = [1.0, 0.75, 0.5]  # a 3-step DMD2 grid (two re-noising draws per image)
# The script writes round(255 x) of the same float32 computation diffusers does here: half a uint8 level apart.
PNG_TOLERANCE = 0.5 / 255 + 1e-6

evaluate = load_script("evaluate")
generation = load_example("evaluation.generation")
scoring = load_example("evaluation.scoring")
student_sampler = load_example("training.student_sampler")
aspect_buckets = load_example("training.aspect_buckets")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_flow_models(
        tmp_path_factory.mktemp("flow_runs"), prompts="\n".join(PROMPTS) + "\n", schnell=True
    )


def _pipeline(tiny: dict[str, Path], family: str) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return quiet_pipeline(StableDiffusion3Pipeline if family == "sd3" else FluxPipeline, tiny[family])


def _run_folder(
    tiny: dict[str, Path],
    family: str,
    run: Path,
    *,
    stochastic: bool = False,
    guidance: float | None = None,
    shifted_grid: bool = False,
    width: int | None = None,
    buckets: dict[tuple[int, int], list[float]] | None = None,
    initial_noise_scale: float = 1.0,
) -> Path:
    """A flow run folder: the teacher's transformer as a full student, a flow_dmd2-style ``scheduler/`` (unshifted;
    ``stochastic``: DMD2's re-noising) with :data:`SIGMAS`, and the ``student_sampler.json`` the scripts write
    (``training.student_sampler.write_record``: trained at 64 px and :data:`T5_LENGTH` tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shutil.copytree(tiny[family] / "transformer", run / "transformer")
    config = FlowMatchEulerDiscreteScheduler.load_config(tiny[family], subfolder="scheduler")
    FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=stochastic
    ).save_pretrained(run / "scheduler")
    (run / "student_sigmas.json").write_text(json.dumps(SIGMAS) + "\n")
    args = types.SimpleNamespace(
        output_dir=str(run),
        resolution=IMAGE_SIZE,
        width=width,
        guidance=guidance,
        aspect_buckets=list(buckets or []),
    )
    if buckets:  # flow_dmd2 --aspect_buckets: each bucket's grid
        aspect_buckets.write_grids(run, buckets)
    dynamic = types.SimpleNamespace(use_dynamic_shifting=family != "sd3")
    parts = types.SimpleNamespace(
        family="sd3" if family == "sd3" else "flux",
        noise_scheduler=types.SimpleNamespace(config=dynamic),
        has_experts=False,
    )
    student_sampler.write_record(
        args, parts, T5_LENGTH, shifted_grid=shifted_grid, initial_noise_scale=initial_noise_scale
    )
    return run


def _argv(tiny: dict[str, Path], family: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny[family]), "--prompts_file", str(tiny["prompts"]),
        "--resolution", str(IMAGE_SIZE), "--output_dir", str(out), "--seed", "3", *extra,
    ]  # fmt: skip


def _run(argv: list[str]) -> dict[str, Any]:
    return evaluate.main(evaluate.parse_args(argv), metrics={"clip_score": tiny_metrics.tiny_clip_score()})


def _saved(out: Path, index: int) -> torch.Tensor:
    return scoring.load_image(out / "images" / f"{index:06d}.png")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dmd2_sampler_renoises_with_fresh_noise_whatever_the_batch(
    tiny: dict[str, Path], tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as euler

    run = _run_folder(tiny, family, tmp_path / "dmd2", stochastic=True, guidance=3.5)
    args = evaluate.parse_args(_argv(tiny, family, tmp_path / "e", "--student_weights", str(run)))
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    assert pipe.scheduler.config.stochastic_sampling and args.sigmas == SIGMAS
    kwargs = generation.call_kwargs(args, pipe)
    sample = generation.pipeline_sampler(pipe, kwargs)

    latents, draws = [], []
    prepare, randn = pipe.prepare_latents, euler.randn_tensor

    def spy_prepare(*a: Any, **k: Any) -> Any:
        out = prepare(*a, **k)
        latents.append((out[0] if isinstance(out, tuple) else out).clone())  # FLUX: (packed latents, ids)
        return out

    def spy_randn(*a: Any, **k: Any) -> torch.Tensor:
        draws.append(randn(*a, **k).clone())
        return draws[-1]

    monkeypatch.setattr(pipe, "prepare_latents", spy_prepare)
    monkeypatch.setattr(euler, "randn_tensor", spy_randn)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    both = sample(PROMPTS, gens)
    # one pipeline call per image, a re-noising draw per step (the last one weighted by sigma 0)
    assert len(latents) == 2 and len(draws) == 2 * len(SIGMAS)
    for k in range(2):
        first = draws[len(SIGMAS) * k]
        assert first.shape == latents[k].shape
        # not the initial noise, nor its numbers in another order (FLUX's packed draw of the same stream)
        assert not torch.equal(first.flatten().sort().values, latents[k].flatten().sort().values)
    monkeypatch.setattr(euler, "randn_tensor", randn)
    monkeypatch.setattr(pipe, "prepare_latents", prepare)

    torch.rand(3)  # the global generator moves on between calls, as in a run
    later = [sample([PROMPTS[k]], [torch.Generator().manual_seed(10 + k)]) for k in (1, 0)]  # one at a time
    assert torch.equal(both, torch.cat(later[::-1]))  # the same images in another batch and order
    # the documented seeding: the pipeline's own call after seeding the global generator with renoise_seed
    with torch.no_grad():
        torch.manual_seed(student_sampler.renoise_seed(10))
        want = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(10), output_type="pt", **kwargs)
        assert torch.equal(both[0], want.images[0])
        # the old seeding (the image's own seed) made another image: the fix changes what is sampled
        torch.manual_seed(10)
        old = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(10), output_type="pt", **kwargs)
    assert not torch.allclose(both[0], old.images[0])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_grid_starting_below_one_scales_the_initial_noise(
    tiny: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """flow_dmd2 with ``--student_sigmas`` from sigma_0 < 1 (SiD's input) starts its generator from sigma_0 z: its
    record's ``initial_noise_scale`` makes the pipeline's initial latents sigma_0 times what they are otherwise (the
    same draw; FLUX: the packed latents), the transformer's first input, and the protocol records it and its source.
    With --sigmas given the saved grid, and so its scale, is not used."""
    plain = _run_folder(tiny, family, tmp_path / "plain", stochastic=True)
    scaled = _run_folder(tiny, family, tmp_path / "scaled", stochastic=True, initial_noise_scale=0.5)
    first: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, run in (("plain", plain), ("scaled", scaled)):
        args = evaluate.parse_args(_argv(tiny, family, tmp_path / f"e-{name}", "--student_weights", str(run)))
        pipe = generation.load_pipeline(args, "cpu", torch.float32)
        records[name] = generation.sampler_record(pipe, args)

        def record_input(module: Any, a: tuple[Any, ...], kw: dict[str, Any], _name: str = name) -> None:
            first.setdefault(_name, kw["hidden_states"].clone())

        pipe.transformer.register_forward_pre_hook(record_input, with_kwargs=True)
        kwargs = generation.call_kwargs(args, pipe)
        with torch.no_grad():
            torch.manual_seed(0)
            pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs)
    assert torch.equal(first["scaled"], 0.5 * first["plain"])  # a power of two: exact
    assert records["scaled"]["initial_noise_scale"] == 0.5 and "initial_noise_scale" not in records["plain"]
    assert records["scaled"]["sampler_sources"]["initial_noise_scale"] == str(
        scaled / student_sampler.RECORD_FILE
    )
    given = _argv(
        tiny, family, tmp_path / "e-given", "--student_weights", str(scaled), "--sigmas", *map(str, SIGMAS)
    )
    args = evaluate.parse_args(given)
    assert "initial_noise_scale" not in args.saved_sampler


def test_guidance_and_text_length_come_from_the_run_record(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An SD3 run (audit 9 #3: sampled at the pipeline's CFG 7 before): 1.0 and 8 tokens from student_sampler.json."""
    run = _run_folder(tiny, "sd3", tmp_path / "ladd")
    record_file = str(run / student_sampler.RECORD_FILE)
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "default guidance_scale" warning
        record = _run(_argv(tiny, "sd3", out, "--student_weights", str(run)))
    generator = record["protocol"]["generator"]
    keys = ("guidance_scale", "max_sequence_length", "sigmas")
    assert [generator[k] for k in keys] == [1.0, T5_LENGTH, SIGMAS]
    sources = generator["sampler_sources"]
    assert sources["guidance_scale"] == record_file and sources["max_sequence_length"] == record_file
    assert "grid_size" not in generator  # SD3: the grid does not depend on the size
    pipe = _pipeline(tiny, "sd3")
    pipe.scheduler = type(pipe.scheduler).from_pretrained(run, subfolder="scheduler")
    call = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "sigmas": SIGMAS, "guidance_scale": 1.0}
    with torch.no_grad():
        images = {
            length: pipe(
                PROMPTS,
                generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
                max_sequence_length=length,
                output_type="pt",
                **call,
            ).images
            for length in (T5_LENGTH, 256)
        }
    got = torch.stack([_saved(out, i) for i in range(2)])
    assert (got - images[T5_LENGTH]).abs().max() <= PNG_TOLERANCE
    # not at the pipeline's default length 256: its padding tokens take part in SD3's joint attention
    assert (got - images[256]).abs().max() > 10 * PNG_TOLERANCE

    # the options win over the record
    args = evaluate.parse_args(_argv(tiny, "sd3", tmp_path / "o", "--student_weights", str(run),
                                     "--guidance_scale", "2", "--max_sequence_length", "6"))  # fmt: skip
    assert (args.guidance_scale, args.max_sequence_length) == (2.0, 6)
    assert args.saved_sampler["sources"]["guidance_scale"] == "--guidance_scale"
    assert args.saved_sampler["sources"]["max_sequence_length"] == "--max_sequence_length"
    assert generation.call_kwargs(args, pipe)["max_sequence_length"] == 6
    # a folder without the record (an older run): the pipeline's default guidance, with the warning
    (run / student_sampler.RECORD_FILE).unlink()
    args = evaluate.parse_args(_argv(tiny, "sd3", tmp_path / "o", "--student_weights", str(run)))
    assert args.guidance_scale is None and args.max_sequence_length is None
    with pytest.warns(UserWarning, match=r"StableDiffusion3Pipeline's default guidance_scale 7.0"):
        generator = generation.sampler_record(pipe, args)
    assert (
        generator["guidance_scale"] == 7.0
        and generator["sampler_sources"]["guidance_scale"] == "pipeline default"
    )
    assert generator["max_sequence_length"] == 256  # StableDiffusion3Pipeline's default
    assert generator["sampler_sources"]["max_sequence_length"] == "pipeline default"


def test_flux_guidance_dev_from_the_record_schnell_none(tiny: dict[str, Path], tmp_path: Path) -> None:
    """FLUX.1-dev trained with --guidance 2 (sampled at 3.5 silently before); FLUX.1-schnell (audit 9 #6: recorded 3.5
    with a false "2 denoiser calls" warning)."""
    dev = _run_folder(tiny, "flux", tmp_path / "dev", guidance=2.0)
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "e", "--student_weights", str(dev)))
    assert args.guidance_scale == 2.0
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    assert generation.call_kwargs(args, pipe)["guidance_scale"] == 2.0
    generator = generation.sampler_record(pipe, args)
    assert generator["guidance_scale"] == 2.0
    assert generator["sampler_sources"]["guidance_scale"] == str(dev / student_sampler.RECORD_FILE)

    schnell = _run_folder(tiny, "schnell", tmp_path / "schnell", guidance=None)
    assert json.loads((schnell / student_sampler.RECORD_FILE).read_text())["guidance_scale"] is None
    for extra in (
        ("--student_weights", str(schnell)),
        ("--teacher",),
        ("--teacher", "--guidance_scale", "0"),
    ):
        args = evaluate.parse_args(_argv(tiny, "schnell", tmp_path / "s", *extra))
        pipe = generation.load_pipeline(args, "cpu", torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            generator = generation.sampler_record(pipe, args)
        assert generator["guidance_scale"] is None, extra
        assert "no guidance embedding" in generator["sampler_sources"]["guidance_scale"]
        assert "true_cfg_scale" in generator["sampler_sources"]["guidance_scale"]
    assert not generation.ignores_guidance_scale(_pipeline(tiny, "flux"))


def test_options_the_pipeline_would_change_are_refused(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for family in ("flux", "sd3"):
        args = evaluate.parse_args(_argv(tiny, family, tmp_path / "e", "--teacher", "--resolution", "72"))
        message = r"--resolution a multiple of 16 for \w+Pipeline .* got 72.*Pass --resolution 64 or 80\."
        with pytest.raises(ValueError, match=message):
            generation.load_pipeline(args, "cpu", torch.float32)
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "e", "--teacher", "--resolution", "8"))
    with pytest.raises(ValueError, match=r"got 8: .*Pass --resolution 16\.$"):
        generation.load_pipeline(args, "cpu", torch.float32)
    # --max_sequence_length: taken by SD3 / FLUX (parsed, passed), refused where the pipeline has no text length
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "e", "--teacher", "--max_sequence_length", "8"))
    assert generation.call_kwargs(args, _pipeline(tiny, "flux"))["max_sequence_length"] == 8

    class ClipOnly:  # an SDXL-like pipeline: no max_sequence_length in its call
        image_processor = types.SimpleNamespace(config=types.SimpleNamespace(vae_scale_factor=8))

        def __call__(self, prompt: str, height: int = 1024, width: int = 1024) -> None: ...

    args.saved_sampler = None
    message = r"for --max_sequence_length \(8\), but ClipOnly takes none .*: drop --max_sequence_length\.$"
    with pytest.raises(ValueError, match=message):
        generation.check_pipeline_options(ClipOnly(), args)
    args.saved_sampler = {"sources": {"max_sequence_length": "run/student_sampler.json"}}  # from the record
    message = r"of run/student_sampler.json \(8\), but ClipOnly .*: evaluate the run with the pipeline it was"
    with pytest.raises(ValueError, match=message):
        generation.check_pipeline_options(ClipOnly(), args)
    args.max_sequence_length, args.resolution = None, 72
    generation.check_pipeline_options(ClipOnly(), args)  # SDXL keeps multiples of 8
    # one video option on an image pipeline: the message's grammar
    with pytest.raises(SystemExit):
        evaluate.parse_args(_argv(tiny, "sd3", tmp_path / "e", "--teacher", "--num_frames", "5"))
    assert (
        "--num_frames applies to a video pipeline (WanPipeline), but this run evaluates images: drop it."
        in (capsys.readouterr().err)
    )


def test_flux_grid_of_another_size_warns_and_records_both(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = _run_folder(tiny, "flux", tmp_path / "dmd2", guidance=3.5, shifted_grid=True)
    assert json.loads((run / student_sampler.RECORD_FILE).read_text())["grid_size"] == [
        IMAGE_SIZE,
        IMAGE_SIZE,
    ]
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "e", "--student_weights", str(run)))
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        generator = generation.sampler_record(pipe, args)  # the trained size: no warning
    assert generator["grid_size"] == [IMAGE_SIZE, IMAGE_SIZE] and generator["resolution"] == IMAGE_SIZE
    args = evaluate.parse_args(
        _argv(tiny, "flux", tmp_path / "e", "--student_weights", str(run), "--resolution", "96")
    )
    with pytest.warns(
        UserWarning, match=r"shifted for 64 x 64 .* generated at 96 x 96.*Pass --resolution 64"
    ):
        generator = generation.sampler_record(pipe, args)
    assert generator["grid_size"] == [IMAGE_SIZE, IMAGE_SIZE] and generator["resolution"] == 96
    # the run's grid not used (--num_inference_steps: the pipeline's own schedule at this size): no grid size to
    # compare, but the student was trained at 64 x 64 (audit 14: the recorded size was never read)
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "e", "--student_weights", str(run), "--resolution", "96",
                                     "--num_inference_steps", "2"))  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"trained at 64 x 64 .* generated at 96 x 96\. Pass --resolution 64"
    ):
        generator = generation.sampler_record(pipe, args)
    assert "grid_size" not in generator and generator["trained_size"] == [IMAGE_SIZE, IMAGE_SIZE]


def test_the_trained_size_is_the_default_and_width_makes_non_square_images(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FLUX.1-dev run trained at 64 x 96 (flow scripts' --width): evaluated at that size when the options give none
    (the warning of another size told users to pass --width, which image runs refused before)."""
    wide = IMAGE_SIZE + 32
    run = _run_folder(tiny, "flux", tmp_path / "dmd2", guidance=3.5, shifted_grid=True, width=wide)
    record_file = str(run / student_sampler.RECORD_FILE)
    argv = _argv(tiny, "flux", tmp_path / "e", "--student_weights", str(run), "--num_prompts", "1")
    no_size = [a for i, a in enumerate(argv) if "--resolution" not in argv[max(i - 1, 0) : i + 1]]
    assert "--resolution" not in no_size and len(no_size) == len(argv) - 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the trained size: no size warning
        record = _run(no_size)
    generator = record["protocol"]["generator"]
    assert (generator["resolution"], generator["width"]) == (IMAGE_SIZE, wide)
    assert generator["sampler_sources"]["size"] == record_file
    assert generator["grid_size"] == [IMAGE_SIZE, wide] == generator["trained_size"]
    pipe = _pipeline(tiny, "flux")
    pipe.scheduler = type(pipe.scheduler).from_pretrained(run, subfolder="scheduler")
    with torch.no_grad():
        want = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), height=IMAGE_SIZE, width=wide,
                    sigmas=SIGMAS, guidance_scale=3.5, max_sequence_length=T5_LENGTH, output_type="pt").images  # fmt: skip
    got = _saved(tmp_path / "e", 0)
    assert got.shape[-2:] == (IMAGE_SIZE, wide)
    assert (got - want[0]).abs().max() <= PNG_TOLERANCE

    # --resolution alone: square, as before, with the trained-size warning naming --width
    args = evaluate.parse_args(_argv(tiny, "flux", tmp_path / "s", "--student_weights", str(run)))
    assert (args.resolution, args.width) == (IMAGE_SIZE, IMAGE_SIZE) and "size" not in args.saved_sampler[
        "sources"
    ]
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    with pytest.warns(
        UserWarning, match=rf"shifted for 64 x 96 .* generated at 64 x 64.*--resolution 64 --width {wide}"
    ):
        generation.sampler_record(pipe, args)
    # --width on an image pipeline (an SD3 teacher): non-square images, recorded
    args = evaluate.parse_args(_argv(tiny, "sd3", tmp_path / "t", "--teacher", "--width", str(wide),
                                     "--num_inference_steps", "2"))  # fmt: skip
    assert generation.call_kwargs(args)["width"] == wide
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    assert generation.sampler_record(pipe, args)["width"] == wide
    # a width the pipeline would round: refused with the nearest sizes
    args.width = wide + 8
    with pytest.raises(
        ValueError, match=r"Expected --width a multiple of 16 .* got 104: .* 64 x 104 .* 96 or 112"
    ):
        generation.check_pipeline_options(pipe, args)


def test_a_multi_aspect_run_is_sampled_on_each_buckets_grid(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A FLUX flow_dmd2 --aspect_buckets run (validation size 64 x 64, buckets 64 x 64 and 64 x 96): at a bucket the
    student samples on that bucket's saved grid, with no size warning; at an untrained size, the validation grid
    and a warning naming every trained size (audit 18: the by-size grids were never read, and the warnings called
    the validation size "the trained size"). --width alone keeps the trained height."""
    wide = [1.0, 0.7, 0.4]
    run = _run_folder(tiny, "flux", tmp_path / "dmd2", guidance=3.5, shifted_grid=True,
                      buckets={(IMAGE_SIZE, IMAGE_SIZE): SIGMAS, (IMAGE_SIZE, 96): wide})  # fmt: skip
    record = json.loads((run / student_sampler.RECORD_FILE).read_text())
    assert record["aspect_buckets"] == [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 96]]
    argv = _argv(tiny, "flux", tmp_path / "e", "--student_weights", str(run))
    at = argv.index("--resolution")
    no_size = argv[:at] + argv[at + 2 :]
    args = evaluate.parse_args([*no_size, "--width", "96"])  # the trained height, the wide bucket
    assert (args.resolution, args.width) == (IMAGE_SIZE, 96) and args.sigmas == wide
    assert args.saved_sampler["sources"]["steps"] == str(run / aspect_buckets.GRIDS_FILE)
    pipe = generation.load_pipeline(args, "cpu", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        generator = generation.sampler_record(pipe, args)
    assert generator["sigmas"] == wide and generator["grid_size"] == [IMAGE_SIZE, 96]
    args = evaluate.parse_args(no_size)  # the validation size: its own grid (student_sigmas.json's)
    assert args.sigmas == SIGMAS and args.saved_sampler["sources"]["steps"] == str(
        run / aspect_buckets.GRIDS_FILE
    )
    args = evaluate.parse_args([*no_size, "--resolution", "96"])  # 96 x 96: never trained
    assert args.sigmas == SIGMAS and args.saved_sampler["sources"]["steps"] == str(
        run / "student_sigmas.json"
    )
    with pytest.warns(
        UserWarning, match=r"shifted for 64 x 64 .* generated at 96 x 96.*by_size.json holds the grid"
    ):
        generation.sampler_record(pipe, args)
    args.sigmas = None  # the pipeline's own grid: the trained-size warning names every bucket
    with pytest.warns(UserWarning, match=r"trained at 64 x 64 / 64 x 96 \(its run's student_sampler.json\)"):
        generation.sampler_record(pipe, args)
