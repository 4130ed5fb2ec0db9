"""Smoke tests of examples/sdxl_*.py: 2 optimisation steps with a tiny SDXL-structured pipeline.

On CPU in CI; where a GPU is present accelerate runs the scripts there, and the tests switch PyTorch to
deterministic kernels (:func:`_deterministic_kernels`).

Each script runs in-process (``main(parse_args([...]))``) twice: once for 2 steps with a checkpoint after
step 1, once resumed from that checkpoint into a fresh output folder. The resumed run must end with the
same weights as the uninterrupted one (resume gives the same next step), and the final weights must load
back into diffusers (``UNet2DConditionModel.from_pretrained`` or ``load_lora_adapter``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import preloaded_launch
from tests.examples.example_modules import EXAMPLES, load_example
from tests.examples.tiny_sdxl import (
    TINY_SDXL_3LEVEL_UNET,
    deterministic_kernels,
    save_tiny_sdxl_pipeline,
    write_captioned_images,
)
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# cuBLAS is deterministic only with a fixed workspace; read when its first handle is made, so set at import.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _deterministic_kernels() -> Any:
    """Deterministic kernels while a script runs on a GPU (:func:`tiny_sdxl.deterministic_kernels`)."""
    with deterministic_kernels():
        yield


_load = load_example


# The examples' shared package (examples/training/), imported as the scripts import it.
checkpoints = _load("training.checkpoints")
data_sources = _load("training.data_sources")
caption_folders = _load("training.caption_folders")
loop = _load("training.loop")
runtime = _load("training.runtime")
sdxl_encoding = _load("training.sdxl_encoding")
sdxl_models = _load("training.sdxl_models")
teacher_pairs = _load("training.teacher_pairs")
validation = _load("training.validation")


def record_optimisers(monkeypatch: pytest.MonkeyPatch) -> list[torch.optim.Optimizer]:
    """Spy on ``training.runtime.adamw``: the returned list fills with every optimiser the scripts build."""
    made: list[torch.optim.Optimizer] = []
    adamw = runtime.adamw

    def recording_adamw(*a: Any, **kw: Any) -> torch.optim.Optimizer:
        made.append(adamw(*a, **kw))
        return made[-1]

    monkeypatch.setattr(runtime, "adamw", recording_adamw)
    return made


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SDXL pipeline folder, 3 captioned 128 px images and a prompt file."""

    root = tmp_path_factory.mktemp("tiny_sdxl")
    model = save_tiny_sdxl_pipeline(root / "model", seed=0)
    images = write_captioned_images(root / "images", ["a red cube", "a blue sphere", ""])
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nan astronaut riding a horse\n")
    return {"model": model, "images": images, "prompts": prompts}


@pytest.fixture(scope="module")
def tiny_sdxl_3level(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: dict[str, Path]) -> Path:
    """The tiny pipeline with a 3-level, 2-layers-per-block UNet (SDXL's layout, for --preset ssd-1b)."""
    root = tmp_path_factory.mktemp("tiny_sdxl_3level")
    return save_tiny_sdxl_pipeline(root / "model", seed=0, unet_overrides=TINY_SDXL_3LEVEL_UNET)


def _common_argv(tiny: dict[str, Path], out: Path, *, lora: bool) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny["model"]),
        "--output_dir",
        str(out),
        "--resolution",
        "128",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "3",
        "--validation_prompts",
        "a cat",
        "",
        "--validation_steps",
        "1",
    ]
    return argv + (["--use_lora", "--lora_rank", "4"] if lora else [])


def _lora_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _run_and_resume(name: str, argv_a: list[str], argv_b: list[str], out_a: Path) -> None:
    script = _load(name)
    script.main(script.parse_args(argv_a))
    assert (out_a / "checkpoint-1").is_dir()
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-1.png", "step-2.png"]
    script.main(script.parse_args([*argv_b, "--resume_from_checkpoint", str(out_a / "checkpoint-1")]))


def _assert_lora_roundtrip(tiny: dict[str, Path], out_a: Path, out_b: Path, *, exact: bool = True) -> None:
    """Resumed == uninterrupted LoRA (``exact=False``: a run with no deterministic GPU kernels, keys only)."""
    from diffusers import UNet2DConditionModel

    a, b = (
        _lora_state(out_a / "pytorch_lora_weights.safetensors"),
        _lora_state(out_b / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys() and a
    assert any(bool(v.abs().sum() > 0) for k, v in a.items() if "lora_B" in k), "LoRA did not train"
    # The resumed run did its own step 2: its weights differ from the step-1 checkpoint it started from.
    # LoRA checkpoints hold the adapter only (accelerate save/load hooks), in peft keys.
    ckpt = _lora_state(out_a / "checkpoint-1" / "unet_lora.safetensors")
    at_step1 = {"unet." + k: v for k, v in ckpt.items()}
    assert at_step1.keys() == b.keys()
    assert any(not torch.equal(at_step1[k], b[k]) for k in b), "the resumed run did not train"
    if exact:  # step 2 of both runs, against the size of that step (tests/state_compare.py)
        assert_same_update(b, a, at_step1, what="resumed vs uninterrupted LoRA")
    unet = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out_a), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    assert any("lora" in n for n, _ in unet.named_parameters())


def _assert_unet_roundtrip(tiny: dict[str, Path], out_a: Path, out_b: Path) -> None:
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet").state_dict()

    a = UNet2DConditionModel.from_pretrained(str(out_a / "unet")).state_dict()
    b = UNet2DConditionModel.from_pretrained(str(out_b / "unet")).state_dict()
    # Both runs' two steps from the pretrained weights, against the size of those steps (state_compare.py).
    assert_same_update(b, a, start, what="resumed vs uninterrupted UNet")


def test_hyper_sd_lora(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "2,1", "--num_inference_steps", "4"]
    cache = ["--cache_dir", str(tmp_path / "cache")]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_hyper_sd",
        # Both runs go through one disk cache of latents and prompt embeddings (the first fills it).
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra, "--report_to", "tensorboard", *cache],
        # The resumed run prefetches with a loader worker (posteriors come from the cache).
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra, *cache, "--dataloader_num_workers", "1"],
        out_a,
    )
    # The EMA target of the LoRA student is checkpointed as its LoRA entries (+ the update count).
    target = torch.load(out_a / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)
    assert "num_updates" in target and all(".lora_" in k for k in target if k != "num_updates")
    assert len(list((tmp_path / "cache" / "latents").iterdir())) >= 1
    assert len(list((tmp_path / "cache" / "text").iterdir())) >= 2  # a caption and the empty prompt
    assert sorted(p.name for p in out_a.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert any((out_a / "logs").rglob("events.out.tfevents.*"))
    assert not (out_a / "tscd").exists()  # no one-step stage, no intermediate release
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)


REWARD_CALLS: list[dict[str, object]] = []


def tiny_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward model for --reward_model: brighter is better (10 x mean pixel value), one score per image."""
    REWARD_CALLS.append(
        {
            "shape": tuple(images.shape),
            "prompts": list(prompts),
            "range": (float(images.detach().min()), float(images.detach().max())),
            "grad": images.requires_grad,
        }
    )
    return 10.0 * images.mean(dim=(1, 2, 3))


def test_hyper_sd_reward_options_are_checked(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    script = _load("sdxl_hyper_sd")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--train_data_dir", str(tiny_sdxl["images"])]
    with pytest.raises(ValueError, match="as 'module:callable'"):
        script.parse_args([*argv, "--reward_model", "tiny_reward", "--reward_margin", "1"])
    with pytest.raises(ValueError, match="needs --reward_margin"):
        script.parse_args([*argv, "--reward_model", f"{__name__}:tiny_reward"])
    with pytest.raises(ValueError, match="to name a callable"):
        script.parse_args([*argv, "--reward_model", f"{__name__}:REWARD_CALLS", "--reward_margin", "1"])


def test_hyper_sd_one_step_score_distillation_stage(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TSCD k = 1 for one step, then 2 steps of the one-step stage (DMD + MSE + reward); resume inside it."""
    from diffusers import UNet2DConditionModel

    loads: list[int] = []
    get_image = caption_folders.ImageCaptionFolder.__getitem__

    def counted(self, index: int):  # type: ignore[no-untyped-def]
        loads.append(index)
        return get_image(self, index)

    monkeypatch.setattr(caption_folders.ImageCaptionFolder, "__getitem__", counted)

    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "1", "--num_inference_steps", "4"]
    extra += ["--one_step_steps", "2", "--one_step_teacher_steps", "2", "--generator_timestep", "800"]
    extra += ["--reward_model", f"{__name__}:tiny_reward", "--reward_margin", "5"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    argv_a = [*_common_argv(tiny_sdxl, out_a, lora=True), *extra]
    argv_a[argv_a.index("--max_train_steps") + 1] = "3"
    argv_b = [*_common_argv(tiny_sdxl, out_b, lora=True), *extra]
    argv_b[argv_b.index("--max_train_steps") + 1] = "3"
    script = _load("sdxl_hyper_sd")
    REWARD_CALLS.clear()
    script.main(script.parse_args(argv_a))
    # The reward scores only the one-step generator's samples (steps 2, 3): the TSCD stages train no reward
    # (Hyper-SD's human feedback is its own LoRA phase, --feedback_steps; tests/examples/test_hyper_sd_feedback.py).
    assert len(REWARD_CALLS) == 2 and all(call["grad"] for call in REWARD_CALLS)
    # Only the TSCD step decodes images (its batch of 2); the one-step stage needs only the captions.
    assert len(loads) == 2
    ckpt = out_a / "checkpoint-2"  # after the first one-step step: the fake score is checkpointed too
    assert sorted(p.name for p in out_a.glob("checkpoint-*")) == [ckpt.name, "checkpoint-3"]
    assert (ckpt / "fake_lora.safetensors").is_file() and (ckpt / "unet_lora.safetensors").is_file()
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == [f"step-{i}.png" for i in (1, 2, 3)]
    loads.clear()
    script.main(script.parse_args([*argv_b, "--resume_from_checkpoint", str(ckpt)]))
    assert loads == []  # resumed inside the one-step stage
    a = _lora_state(out_a / "pytorch_lora_weights.safetensors")
    b = _lora_state(out_b / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    at_step2 = {"unet." + k: v for k, v in _lora_state(ckpt / "unet_lora.safetensors").items()}
    assert any(not torch.equal(at_step2[k], b[k]) for k in b), "the one-step stage did not train"
    assert_same_update(b, a, at_step2, what="resumed vs uninterrupted one-step stage")
    # The multi-step TSCD student of step 1 is released too (written once, by the run that crossed step 1)
    # and equals what a TSCD-only run of 1 step releases (every step draws from its own seeded generator).
    tscd = _lora_state(out_a / "tscd" / "pytorch_lora_weights.safetensors")
    assert tscd.keys() == a.keys() and not (out_b / "tscd").exists()
    assert any(not torch.equal(tscd[k], a[k]) for k in a), "tscd/ holds the one-step weights"
    out_c = tmp_path / "c"
    argv_c = [*_common_argv(tiny_sdxl, out_c, lora=True), *extra[: extra.index("--one_step_steps")]]
    argv_c[argv_c.index("--max_train_steps") + 1] = "1"  # TSCD only: no one-step options (they are refused)
    script.main(script.parse_args(argv_c))
    tscd_only = _lora_state(out_c / "pytorch_lora_weights.safetensors")
    # Both are one step from peft's initial adapter, which is not saved: its B is zero (so step 1's update of
    # B is B itself) and its A gets no gradient through a zero B (step 1 leaves A where it started).
    init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tscd_only.items()}
    assert_same_update(tscd, tscd_only, init, what="tscd/ vs a TSCD-only run")
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out_a), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    assert any("lora" in n for n, _ in unet.named_parameters())
    with pytest.raises(ValueError, match="--one_step_steps < --max_train_steps"):
        script.parse_args([*argv_a, "--one_step_steps", "3"])


class _FakeAccelerator:
    """The part of ``Accelerator`` that the checkpoint helpers use."""

    is_main_process = True

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)

    def load_state(self, path: str) -> None:
        self.loaded.append(Path(path).name)


def test_step_source_prefetch_follows_the_steps_and_says_when_out_of_step() -> None:

    class Numbers(data_sources.StepSource):
        def __init__(self) -> None:
            self.num_workers = 1

        def draw(self, generator: torch.Generator) -> tuple[list[int], list[str]]:
            idx = torch.randint(1000, (3,), generator=generator).tolist()
            return idx, [str(i) for i in idx]

        def load(self, idx: list[int]) -> list[int]:
            return [2 * i for i in idx]

    data = Numbers()
    data.start(5, 8, seed=1, process_index=0, accumulation=1)
    for step in (5, 6):  # resumed at step 5: the worker's items are the steps' own draws
        idx, texts, items = data.fetch(data_sources.step_generator(1, step))
        assert items == [2 * i for i in idx] and texts == [str(i) for i in idx]
    with pytest.raises(RuntimeError, match=r"out of step: it prefetched indices .* Call Numbers.start"):
        data.fetch(data_sources.step_generator(1, 3))  # step 7 was prefetched
    data.close()
    assert data.fetch(data_sources.step_generator(1, 3))[2] == [
        2 * i for i in data.draw(data_sources.step_generator(1, 3))[0]
    ]
    # Steps from load_until_step on use only the texts: their workers load nothing (item None), the loader
    # stays in step, and a step that still asks for the items gets them loaded in-process.
    data.load_until_step = 6
    data.start(5, 8, seed=1, process_index=0, accumulation=1)
    idx, _, items = data.fetch(data_sources.step_generator(1, 5))
    assert items == [2 * i for i in idx]
    assert data.fetch(data_sources.step_generator(1, 6), load=False)[2] == [None] * 3
    idx, _, items = data.fetch(data_sources.step_generator(1, 7))
    assert items == [2 * i for i in idx]
    data.close()
    assert data.fetch(data_sources.step_generator(1, 3), load=False)[2] == [None] * 3


def test_checkpoint_pruning_and_latest(tmp_path: Path) -> None:
    import argparse

    (tmp_path / "checkpoint-x").mkdir()
    acc = _FakeAccelerator()
    args = argparse.Namespace(
        output_dir=str(tmp_path), checkpoints_total_limit=2, resume_from_checkpoint=None
    )
    for step in (5, 10, 20, 100):
        checkpoints.save_checkpoint(acc, args, step)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-20", "checkpoint-100"]
    assert checkpoints.resume(acc, args) == 0
    args.resume_from_checkpoint = "latest"
    assert checkpoints.resume(acc, args) == 100
    args.resume_from_checkpoint = "checkpoint-20"
    assert checkpoints.resume(acc, args) == 20 and acc.loaded == ["checkpoint-100", "checkpoint-20"]
    args.resume_from_checkpoint = "latest"
    assert (
        checkpoints.resume(acc, argparse.Namespace(**{**vars(args), "output_dir": str(tmp_path / "new")}))
        == 0
    )
    g1, g2 = data_sources.step_generator(0, 5, 0, 0), data_sources.step_generator(0, 5, 0, 0)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
    assert not torch.equal(
        torch.randn(3, generator=data_sources.step_generator(0, 5, 1, 0)),
        torch.randn(3, generator=data_sources.step_generator(0, 5, 0, 0)),
    )


def _launch_two_processes(script: str, argv: list[str], *, mode: str = "ddp") -> str:
    """Run ``examples/{script}.py`` in 2 CPU processes (gloo): ``mode="ddp"`` with the environment of
    ``accelerate launch --multi_gpu``; ``"fsdp"`` (accelerate's FSDP2), ``"zero1"``, ``"zero2"`` or ``"zero3"``
    (DeepSpeed ZeRO stage 1 / 2 / 3 on DeepSpeed's CPU accelerator) as ``torchrun`` runs the test launcher
    ``sharded_cpu_launch.py``. The processes are forked from a server that has imported the libraries
    (``tests/preloaded_launch.py``; ``tests/test_preloaded_launch.py`` checks that a run writes what it writes
    under the real launchers).

    (``accelerate launch --cpu --num_processes 2`` starts *one* process unless MPI is installed;
    ``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` starts two that train on the CPU.) Returns the processes'
    output.
    """
    env = {**os.environ, **launch_env(mode)}
    code, output = preloaded_launch.launch_script(EXAMPLES / f"{script}.py", argv, env, sharded=mode != "ddp")
    assert code == 0, output[-6000:]
    return output


def launch_env(mode: str) -> dict[str, str]:
    """The environment variables that select ``mode`` ("ddp", "fsdp", "zero1", "zero2", "zero3") on CPU processes."""
    sharded = {
        "ddp": {},
        "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
        "zero1": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
        "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
        "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    }
    if mode not in sharded:
        raise ValueError(f"Expected `mode` to be one of {sorted(sharded)}, got {mode!r}.")
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **sharded[mode]}
    if mode.startswith("zero"):
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _two_process_runs(
    script: str, argv: list[str], tmp_path: Path, sharded: str = "fsdp", *, resume: bool = True
) -> dict[str, Path]:
    """DDP, the ``sharded`` mode of :func:`_launch_two_processes`, and (``resume``) that mode resumed from its
    step-1 checkpoint: the output folders ``out["ddp"]``, ``out[sharded]``, ``out[sharded + "_resumed"]``."""
    names = ["ddp", sharded, *([sharded + "_resumed"] if resume else [])]
    out = {name: tmp_path / name for name in names}

    def with_output(name: str) -> list[str]:
        args = list(argv)
        args[args.index("--output_dir") + 1] = str(out[name])
        args[args.index("--train_batch_size") + 1] = "1"  # per process: the same global batch as 2 x 1
        return args

    _launch_two_processes(script, with_output("ddp"))
    _launch_two_processes(script, with_output(sharded), mode=sharded)
    if resume:
        ckpt = str(out[sharded] / "checkpoint-1")
        _launch_two_processes(
            script, [*with_output(sharded + "_resumed"), "--resume_from_checkpoint", ckpt], mode=sharded
        )
    ddp_ckpt, sharded_ckpt = out["ddp"] / "checkpoint-1", out[sharded] / "checkpoint-1"
    assert (ddp_ckpt / "random_states_1.pkl").is_file(), "DDP ran in one process"
    states = "pytorch_model_fsdp_0" if sharded == "fsdp" else "pytorch_model"  # DeepSpeed: one per engine
    assert (sharded_ckpt / states).is_dir(), f"{sharded} did not write its sharded model states"
    return out


def test_fsdp1_is_refused_with_the_fix() -> None:
    import types

    from accelerate.utils import DistributedType

    fsdp1 = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(ValueError, match=r"FSDP2 only.*selects FSDP1: set fsdp_version: 2"):
        runtime.check_fsdp_version(fsdp1)
    runtime.check_fsdp_version(types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))
    runtime.check_fsdp_version(
        types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False)
    )


@pytest.mark.parametrize("script", ["sdxl_mlcm", "sdxl_lightning"])
def test_sharded_lora_teacher_with_sample_dependent_calls_under_fsdp2_block_units_equals_ddp(
    script: str, tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LoRA student with its adapters off is the teacher, sharded by FSDP2 with the UNet's blocks as units (each
    block gathered in every call), and the number of teacher calls depends on each process's timesteps: MLCM's
    teacher-noised states (prompt-only MLCD) and SDXL-Lightning's strided teacher (a 4->2 sample at t = 249 needs one
    call, others two). TeacherSolver(synchronize=True) keeps the processes' calls in step (without it gloo aborts
    or times out); the two steps equal DDP's (tests/state_compare.py)."""
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")  # read by the FSDP2 run only
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicTransformerBlock,ResnetBlock2D")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    if script == "sdxl_mlcm":
        extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--num_segments", "8", "--stage1_steps", "2"]
    else:
        extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--stage", "4->2/conditional", "--from_base"]
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), *extra]
    out = _two_process_runs(script, argv, tmp_path, "fsdp", resume=False)
    name = "pytorch_lora_weights.safetensors"
    ddp, fsdp = _lora_state(out["ddp"] / name), _lora_state(out["fsdp"] / name)
    step1 = {
        "unet." + k: v for k, v in _lora_state(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert ddp.keys() == fsdp.keys() and ddp
    assert_same_update(fsdp, ddp, step1, what=f"{script}: FSDP2 (block units) vs DDP")


def test_hyper_sd_lora_under_fsdp_equals_ddp_and_resumes(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    # A LoRA student sharded by FSDP2 with a frozen-then-trained discriminator (frozen() reshards it), the
    # target EMA of the adapters fed by their gathered shards, and the adapter written from the gathered
    # state dict.
    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "2,1", "--num_inference_steps", "4"]
    out = _two_process_runs(
        "sdxl_hyper_sd", [*_common_argv(tiny_sdxl, tmp_path, lora=True), *extra], tmp_path
    )
    assert (out["ddp"] / "checkpoint-1" / "unet_lora.safetensors").is_file()  # DDP: adapter-only checkpoints
    name = "pytorch_lora_weights.safetensors"
    ddp, fsdp, resumed = (_lora_state(out[k] / name) for k in ("ddp", "fsdp", "fsdp_resumed"))
    assert ddp.keys() == fsdp.keys() == resumed.keys() and ddp
    # Step 2 of each run against the size of DDP's step 2 (state_compare.py): the engines sum the gradients
    # in another order; a lost shard or optimizer state would change the step by O(1).
    step1 = {
        "unet." + k: v for k, v in _lora_state(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert_same_update(fsdp, ddp, step1, what="FSDP vs DDP")
    assert_same_update(resumed, fsdp, step1, what="resumed vs uninterrupted FSDP")
    assert any(bool(v.abs().sum() > 0) for k, v in fsdp.items() if "lora_B" in k), "LoRA did not train"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out["fsdp"]), weight_name=name, prefix="unet")
    assert any("lora" in n for n, _ in unet.named_parameters())


def test_sim_full_unet_with_ema_under_fsdp_equals_ddp_and_resumes(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    # Two sharded full UNets (generator and fake score, equally many parameters), the fake frozen in the
    # generator step, the released EMA of sharded parameters (swapped in for validation, checkpointed
    # whole), and the full UNet written from the gathered state dict.
    import json

    from diffusers import AutoModel, UNet2DConditionModel

    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "dmd", "--learning_rate", "1e-4"]
    extra += ["--use_ema", "--ema_decay", "0.5"]
    # Both steps update the generator under sharding (the dmd2 preset's --generator_every 5 would leave
    # the second step a fake-score-only step).
    extra += ["--generator_every", "1"]
    # With the encoded empty prompt as the real score's unconditional branch the gradient norm stays under
    # --max_grad_norm here, and DDP and FSDP end bitwise equal. With --uncond zeros (the default) the
    # clipping is active: FSDP's norm over the shards differs from DDP's in the last bit, and Adam's
    # normalisation amplifies that at a few near-zero-gradient entries (measured: gap / update norm 5e-5,
    # at most 5e-6 on updates of 1.8e-4; 0 with --max_grad_norm 0).
    extra += ["--uncond", "empty_prompt"]
    out = _two_process_runs("sdxl_sim", [*_common_argv(tiny_sdxl, tmp_path, lora=False), *extra], tmp_path)
    # The config names diffusers' class, not FSDP2's generated FSDPUNet2DConditionModel: AutoModel loads it.
    assert (
        json.loads((out["fsdp"] / "unet" / "config.json").read_text())["_class_name"]
        == "UNet2DConditionModel"
    )
    assert isinstance(AutoModel.from_pretrained(str(out["fsdp"] / "unet")), UNet2DConditionModel)
    ddp, fsdp, resumed = (
        UNet2DConditionModel.from_pretrained(str(out[k] / "unet")).state_dict()
        for k in ("ddp", "fsdp", "fsdp_resumed")
    )
    start = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet").state_dict()
    # The two steps of each run against their size (state_compare.py).
    assert_same_update(fsdp, ddp, start, what="FSDP vs DDP")
    assert_same_update(resumed, fsdp, start, what="resumed vs uninterrupted FSDP")
    # bf16 mixed precision (accelerate's FSDP2 policy: bf16 compute and gathers, float32 shards): the same
    # two updates up to bf16 rounding, which Adam's normalisation amplifies where gradients are tiny:
    # |bf16 update - float32 update| / |float32 update| measured 0.35 (1.0 if bf16 did not train).
    argv = [*_common_argv(tiny_sdxl, tmp_path / "bf16", lora=False), *extra, "--mixed_precision", "bf16"]
    argv[argv.index("--train_batch_size") + 1] = "1"
    _launch_two_processes("sdxl_sim", argv, mode="fsdp")
    bf16 = UNet2DConditionModel.from_pretrained(str(tmp_path / "bf16" / "unet")).state_dict()
    assert all(v.dtype == torch.float32 for v in bf16.values())
    update = torch.cat([(fsdp[k] - start[k]).flatten() for k in fsdp])
    gap = torch.cat([(bf16[k] - fsdp[k]).flatten() for k in fsdp])
    assert 0.01 < float(gap.norm() / update.norm()) < 0.6


def test_sim_lora(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    # Checkpointed generator, fake and real scores: the generator's gradient flows through both scores.
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "sim", "--gradient_checkpointing"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_sim",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra],
        # The resumed run loads its prompts through a loader worker: same steps as the in-process loading.
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra, "--dataloader_num_workers", "1"],
        out_a,
    )
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)
    assert (out_a / "checkpoint-1" / "fake_lora.safetensors").is_file()
    # the trained size beside the weights, for evaluate.py (checkpoints.save_unet; audit 17), and the one-step
    # generator's sampler: unguided, at --preset sim's t = 625 on the noised zero image (SIM's sigma_init z)
    record = json.loads((out_a / "student_sampler.json").read_text())
    assert record == {"height": 128, "width": 128, "num_frames": None, "guidance_scale": 1.0}
    assert json.loads((out_a / "student_timesteps.json").read_text()) == [625]


def _ema_in_checkpoint(folder: Path, index: int = 0) -> dict[str, torch.Tensor]:
    """The --use_ema average of a checkpoint, keyed like the released LoRA file."""
    state = torch.load(folder / f"custom_checkpoint_{index}.pkl", weights_only=True, map_location="cpu")
    pre = "module.params."
    return {
        "unet." + k[len(pre) :].replace("/", ".").replace(".default.", "."): v
        for k, v in state.items()
        if k.startswith(pre)
    }


def test_use_ema_releases_the_average_and_resumes(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffdistill.schedulers import NoiseSchedule

    samples: dict[tuple[str, int], tuple[torch.Tensor, dict, torch.Tensor]] = {}
    log_validation = validation.log_validation

    def recording(accelerator, args, parts, sample_fn, step):  # type: ignore[no-untyped-def]
        def recorded(z: torch.Tensor, cond: dict) -> torch.Tensor:
            out = sample_fn(z, cond)
            samples[(Path(args.output_dir).name, step)] = (z.clone(), cond, out.detach().clone())
            return out

        return log_validation(accelerator, args, parts, recorded, step)

    monkeypatch.setattr(validation, "log_validation", recording)
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "sim"]
    ema = ["--use_ema", "--ema_decay", "0.5"]
    out_a, out_b, out_raw = tmp_path / "a", tmp_path / "b", tmp_path / "raw"
    _run_and_resume(
        "sdxl_sim",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra, *ema],
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra, *ema],
        out_a,
    )
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)  # resumed EMA run == uninterrupted EMA run
    script = _load("sdxl_sim")
    script.main(script.parse_args([*_common_argv(tiny_sdxl, out_raw, lora=True), *extra]))
    released = _lora_state(out_a / "pytorch_lora_weights.safetensors")
    raw = _lora_state(out_raw / "pytorch_lora_weights.safetensors")  # the online weights after step 2
    ema_1 = _ema_in_checkpoint(out_a / "checkpoint-1")  # the average after step 1
    online_1 = {
        "unet." + k: v for k, v in _lora_state(out_a / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert ema_1.keys() == released.keys() == raw.keys() == online_1.keys()
    # --ema_warmup linear (the default): update k's decay is min(ema_decay, (1 + k) / (10 + k)), with k the
    # update index - 1: update 1 copies the online weights, update 2 uses min(0.5, 2 / 11).
    d2 = 2 / 11
    for k in released:  # update 1 copies the online weights: the same numbers
        torch.testing.assert_close(ema_1[k], online_1[k], rtol=0, atol=0)
    # EMA after step 2 = d2 * EMA after step 1 + (1 - d2) * online weights after step 2, where the online
    # weights come from another run (no EMA): compared against the size of the average's move in update 2.
    want_2 = {k: d2 * ema_1[k] + (1 - d2) * raw[k] for k in released}
    assert_same_update(released, want_2, ema_1, what="released EMA vs the EMA formula")
    assert any(not torch.allclose(released[k], raw[k]) for k in released if "lora_B" in k)
    # Validation samples the average: at step 2 it is the released weights (swapped in, then back --
    # the formula above shows training went on with the online weights), unlike the online run's samples.
    z, cond, got = samples[("a", 2)]
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out_a), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    schedule = NoiseSchedule.from_scheduler(
        DDPMScheduler.from_pretrained(str(tiny_sdxl["model"]), subfolder="scheduler")
    )
    with torch.no_grad():  # on the device the script sampled on (the GPU where there is one)
        # --preset sim's generator input: the zero image noised to t = 625 (SIM's sigma_init z)
        want = validation.one_step_x0(unet.to(z.device), schedule, z, 625, cond, "noised")
    for step in (1, 2):
        assert torch.equal(samples[("a", step)][0], samples[("raw", step)][0])  # the same noise
    # Samples are compared against what the average changes in them at step 2 (the online run's sample vs
    # the average's): a sampler that used the online weights would be off by 100 % of it, while two float32
    # evaluations of the same weights differ by rounding only.
    effect = float((samples[("raw", 2)][2].to(want.device) - want).norm())
    assert effect > 0, "after update 2 the average equals the online weights"

    def assert_same_sample(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        ratio = float((x.to(y.device) - y).norm()) / effect
        assert ratio <= 1e-2, f"{what}: differs by {ratio:.3g} of the average's effect on the sample"

    assert_same_sample(got, want, "validation sample vs the released average")
    # After update 1 the average is the online weights; the resumed run samples the same average.
    assert_same_sample(samples[("a", 1)][2], samples[("raw", 1)][2], "step-1 samples, average vs online")
    assert_same_sample(samples[("b", 2)][2], got, "resumed vs uninterrupted step-2 sample")


def test_sim_full_unet_dmd_with_accumulation(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    extra = [
        "--prompts_file",
        str(tiny_sdxl["prompts"]),
        "--loss",
        "dmd",
        "--generator_every",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-4",
        "--use_ema",  # a full-UNet EMA: checkpointed, resumed, released
        "--ema_decay",
        "0.9",
    ]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_sim",
        [*_common_argv(tiny_sdxl, out_a, lora=False), *extra],
        [*_common_argv(tiny_sdxl, out_b, lora=False), *extra],
        out_a,
    )
    _assert_unet_roundtrip(tiny_sdxl, out_a, out_b)


def test_mlcm_both_stages_lora(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--num_segments", "4", "--stage1_steps", "1"]
    extra += ["--stage2_learning_rate", "1e-3"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_mlcm",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra],
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra],
        out_a,
    )
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)
    # The LoRA checkpoint holds the adapter, the optimiser and the RNG states, not the UNet.
    from diffusers import UNet2DConditionModel

    ckpt = out_a / "checkpoint-1"
    assert not list(ckpt.glob("model*.safetensors")) and (ckpt / "unet_lora.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet_bytes = sum(v.numel() * v.element_size() for v in unet.state_dict().values())
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())
    assert ckpt_bytes < unet_bytes / 3, (ckpt_bytes, unet_bytes)


def test_ssd1b_kd_full_student(tiny_sdxl: dict[str, Path], tiny_sdxl_3level: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    # The SSD-1B preset needs SDXL's 3 levels x 2 layers: the 3-level tiny UNet has them.
    tiny = {**tiny_sdxl, "model": tiny_sdxl_3level}
    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--preset", "ssd-1b", "--learning_rate", "1e-4"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_ssd1b_kd",
        [*_common_argv(tiny, out_a, lora=False), *extra],
        [*_common_argv(tiny, out_b, lora=False), *extra],
        out_a,
    )
    a = UNet2DConditionModel.from_pretrained(str(out_a / "unet"))
    b = UNet2DConditionModel.from_pretrained(str(out_b / "unet"))
    teacher = UNet2DConditionModel.from_pretrained(str(tiny_sdxl_3level), subfolder="unet")
    assert a.config.mid_block_type == "UNetMidBlock2D"  # SSD-1B keeps one mid resnet, no attention
    assert list(a.config.transformer_layers_per_block) == [1, 2, 2]  # level 3: 0.4 x 4 layers
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in teacher.parameters())
    # Resume against the size of the second step (state_compare.py): the student at step 1 is in the
    # full-model checkpoint that accelerate wrote.
    from safetensors.torch import load_file

    at_step1 = load_file(str(out_a / "checkpoint-1" / "model.safetensors"))
    assert_same_update(b.state_dict(), a.state_dict(), at_step1, what="resumed vs uninterrupted student")


def test_ssd1b_preset_on_a_2_level_unet_says_why(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    script = _load("sdxl_ssd1b_kd")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=False), "--train_data_dir", str(tiny_sdxl["images"])]
    with pytest.raises(ValueError, match=r"--preset ssd-1b does not fit this UNet \(2 levels.*--preset vega"):
        script.main(script.parse_args([*argv, "--preset", "ssd-1b"]))


@pytest.mark.parametrize("stage", ["128->32", "4->2/conditional", "2->1/x0-conversion", "2->1/full"])
def test_lightning_stage(tiny_sdxl: dict[str, Path], tmp_path: Path, stage: str) -> None:
    lora = stage in ("128->32", "4->2/conditional")
    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--stage", stage, "--learning_rate", "1e-3"]
    extra += [] if stage == "128->32" else ["--from_base"]  # the tiny stages start from the base UNet
    # 128->32: the resumed run decodes its images in a loader worker (no cache), with 2 accumulated
    # micro-batches per step, and must still match the uninterrupted in-process run.
    workers = ["--dataloader_num_workers", "1"] if stage == "128->32" else []
    accumulate = ["--gradient_accumulation_steps", "2"] if stage == "128->32" else []
    # Checkpointed student and discriminator: the frozen-D generator pass must recompute identically.
    accumulate += ["--gradient_checkpointing"] if stage == "4->2/conditional" else []
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_lightning",
        [*_common_argv(tiny_sdxl, out_a, lora=lora), *extra, *accumulate],
        [*_common_argv(tiny_sdxl, out_b, lora=lora), *extra, *accumulate, *workers],
        out_a,
    )
    if lora:
        _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)
    else:
        _assert_unet_roundtrip(tiny_sdxl, out_a, out_b)
    if stage == "128->32":
        from diffusers import UNet2DConditionModel

        merged = UNet2DConditionModel.from_pretrained(str(out_a / "unet_merged"))
        assert not any("lora" in n for n, _ in merged.named_parameters())
        # The merge is the released adapter on the base: it computes what base + LoRA computes.
        with_lora = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
        with_lora.load_lora_adapter(str(out_a), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 250])
        config = merged.config
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond = {
            "encoder_hidden_states": torch.randn(2, 77, merged.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, text_dim, generator=g),
                "time_ids": torch.rand(2, 6, generator=g) * 128,
            },
        }
        base = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
        with torch.no_grad():
            want, got = with_lora(x, t, **cond).sample, merged(x, t, **cond).sample
            effect = float((base(x, t, **cond).sample - want).norm())
        # The merge folds B·A into W, which rounds differently from adding the low-rank branch: judged against
        # what the adapter changes in the output (a merge that dropped or doubled it would be off by 100 %).
        assert effect > 0, "the adapter did not train"
        assert float((got - want).norm()) <= 1e-2 * effect


def test_diffusion2gan_r1_under_sharding_says_why(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from accelerate.utils import DistributedType

    script = _load("sdxl_diffusion2gan")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    argv += ["--lpips_weights", "random"]
    with pytest.raises(ValueError, match=r"Expected --r1_gamma >= 0, but got -1.0"):
        script.parse_args([*argv, "--r1_gamma", "-1"])
    with pytest.raises(ValueError, match=r"Expected --r1_approximate_sigma > 0, but got 0.0; leave it out"):
        script.parse_args([*argv, "--r1_approximate_sigma", "0"])
    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP)
    monkeypatch.setattr(runtime, "make_accelerator", lambda args, name, **kw: fsdp)
    with pytest.raises(
        ValueError,
        match=r"double backward.*FSDP.*run Diffusion2GAN with DDP, pass --r1_approximate_sigma \(e\.g\. 0\.1\) "
        r"for the finite-difference R1, or --r1_gamma 0",
    ):
        script.main(script.parse_args(argv))
    assert runtime.is_sharded(fsdp) and not runtime.is_sharded(
        types.SimpleNamespace(distributed_type="MULTI_CPU")
    )


def test_diffusion2gan_exact_r1_under_ddp_two_process(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    # Exact R1 has its own (synchronised) backward; DDP wants a gradient for every trainable parameter there,
    # and R1 gives none to the heads' last biases: without the zero-weighted completion the second step's
    # forward failed with "Expected to have finished reduction in the prior iteration".
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ddp"
    argv = [*_common_argv(tiny_sdxl, out, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    argv += ["--pairs_dir", str(tmp_path / "pairs"), "--num_pairs", "4", "--pairs_shard_size", "2"]
    argv += ["--teacher_steps", "2", "--lpips_weights", "random", "--r1_every", "1", "--r1_gamma", "10"]
    argv[argv.index("--train_batch_size") + 1] = "1"
    _launch_two_processes("sdxl_diffusion2gan", [*argv, "--report_to", "tensorboard"])
    assert (out / "checkpoint-1" / "random_states_1.pkl").is_file(), "DDP ran in one process"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    r1 = [e.value for e in events.Scalars("r1")]
    assert len(r1) == 2 and all(v > 0 for v in r1), r1  # R1 ran on both steps


def test_diffusion2gan_pairs_then_gan_lora(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--pairs_dir", str(pairs), "--num_pairs", "5"]
    extra += [
        "--lpips_weights",
        "random",
        "--pairs_shard_size",
        "2",
        "--teacher_steps",
        "2",
        "--r1_every",
        "2",
        "--gradient_checkpointing",
    ]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _run_and_resume(
        "sdxl_diffusion2gan",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *extra],
        # The resumed run reads its pairs in a loader worker: the same steps as in-process reading.
        [*_common_argv(tiny_sdxl, out_b, lora=True), *extra, "--dataloader_num_workers", "1"],
        out_a,
    )
    assert sorted(p.name for p in pairs.iterdir()) == [f"pairs-0000{i}.safetensors" for i in range(3)]
    # the one-step sampler evaluate.py uses: pure noise (the pair's) at --generator_timestep 999, unguided
    assert json.loads((out_a / "student_timesteps.json").read_text()) == [999]
    assert (
        json.loads((out_a / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"]
        == "leading"
    )
    assert json.loads((out_a / "student_sampler.json").read_text())["guidance_scale"] == 1.0
    # On CUDA the E-LatentLPIPS augmentation's grid_sample backward has no deterministic kernel (H200 run,
    # 2026-11-27): resumed == uninterrupted is checked on the CPU only.
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b, exact=not torch.cuda.is_available())


def _graph_reaches(loss: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``target`` (a non-leaf tensor) is in the autograd graph of ``loss``."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        if fn is target.grad_fn:
            return True
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def test_diffusion2gan_approximate_r1_in_the_discriminator_update(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--r1_approximate_sigma: the lazy penalty is APT's, off the math-attention kernel, in D's one backward."""
    script = _load("sdxl_diffusion2gan")
    penalties: list[tuple[float | None, torch.Tensor, bool]] = []
    backward_losses: list[torch.Tensor] = []
    lazy, backward = script.lazy_r1_penalty, runtime.backward

    def recording_lazy(*args: Any, **kwargs: Any) -> Any:
        loss, logs = lazy(*args, **kwargs)
        penalties.append((kwargs["approximate_sigma"], loss, torch.backends.cuda.flash_sdp_enabled()))
        return loss, logs

    def recording_backward(accelerator: Any, loss: torch.Tensor, model: Any) -> None:
        backward_losses.append(loss)
        backward(accelerator, loss, model)

    monkeypatch.setattr(script, "lazy_r1_penalty", recording_lazy)
    monkeypatch.setattr(runtime, "backward", recording_backward)
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    argv += ["--lpips_weights", "random", "--num_pairs", "2", "--teacher_steps", "2", "--r1_every", "1"]
    argv += ["--r1_approximate_sigma", "0.05", "--pairs_dir", str(tmp_path / "pairs")]
    argv[argv.index("--max_train_steps") + 1] = "1"
    script.main(script.parse_args(argv))
    ((sigma, penalty, fused_attention),) = penalties
    assert sigma == 0.05 and fused_attention and penalty.requires_grad and float(penalty) > 0
    # Generator, then discriminator: D's single backward carries the penalty.
    assert len(backward_losses) == 2 and _graph_reaches(backward_losses[1], penalty)
    assert not _graph_reaches(backward_losses[0], penalty)


def _perturbed_unet(tiny: dict[str, Path], folder: Path) -> Path:
    """The tiny base UNet with every weight moved a little: a stand-in for a previous stage's student."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny["model"]), subfolder="unet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(str(folder))
    return folder


def test_lightning_full_stage_teacher_schedule_and_discriminator_inputs(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4->2/full from a previous student (--init_unet) with the base as --teacher_unet: the teacher is the
    base, the training schedule feeds pure noise at t = 999 (Sec. 3.5), D sees re-noised clean samples
    (the student's x0_hat, also where the 2-step jump ends at t_prev >= 0), and the optimiser takes the
    plan's beta1 with the flags that were given."""
    from diffusers import UNet2DConditionModel

    script = _load("sdxl_lightning")
    init = _perturbed_unet(tiny_sdxl, tmp_path / "init")
    argv = [
        *_common_argv(tiny_sdxl, tmp_path / "out", lora=False),
        "--train_data_dir",
        str(tiny_sdxl["images"]),
    ]
    argv[argv.index("--max_train_steps") + 1] = "1"
    argv[argv.index("--train_batch_size") + 1] = "4"
    argv += ["--stage", "4->2/full", "--init_unet", str(init)]
    with pytest.raises(ValueError, match=r"must not be its own teacher: pass --teacher_unet"):
        script.parse_args(argv)
    x0_argv = [a if a != "4->2/full" else "2->1/x0-conversion" for a in argv]
    with pytest.raises(ValueError, match=r"own frozen copy \(Eq. 29\): drop --teacher_unet"):
        script.parse_args([*x0_argv, "--teacher_unet", str(init)])

    teachers: list[torch.nn.Module] = []
    solver = script.TeacherSolver

    def recording_solver(model, schedule, **kwargs):  # type: ignore[no-untyped-def]
        teachers.append(model)
        return solver(model, schedule, **kwargs)

    pairs: list[dict[str, torch.Tensor]] = []
    pair_fn = script.consistency_pair

    def recording_pair(student, teacher, x_t, sample, cond, uncond, **kwargs):  # type: ignore[no-untyped-def]
        assert teacher.schedule.terminal_pure_noise, "training must see pure noise at t = 999"
        with torch.no_grad():  # the student's own x0 prediction, computed independently of the script
            out = student(x_t, sample.t, **cond).sample.float()
            x0_hat = teacher.schedule.to_x0(out, x_t, sample.t, kwargs["prediction_type"])
        pairs.append({"t": sample.t.clone(), "t_prev": sample.t_prev.clone(), "x0_hat": x0_hat})
        return pair_fn(student, teacher, x_t, sample, cond, uncond, **kwargs)

    d_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    renoise = script.renoise_for_discriminator

    def recording_renoise(real, fake, **kwargs):  # type: ignore[no-untyped-def]
        d_inputs.append((real.detach().clone(), fake.detach().clone()))
        return renoise(real, fake, **kwargs)

    optimisers = record_optimisers(monkeypatch)
    monkeypatch.setattr(script, "TeacherSolver", recording_solver)
    monkeypatch.setattr(script, "consistency_pair", recording_pair)
    monkeypatch.setattr(script, "renoise_for_discriminator", recording_renoise)
    flags = ["--teacher_unet", str(tiny_sdxl["model"] / "unet"), "--adam_beta2", "0.95"]
    flags += ["--adam_weight_decay", "0.01", "--fresh_discriminator"]  # no 4->2/unconditional D to continue
    script.main(script.parse_args([*argv, *flags]))

    base = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet").state_dict()
    started = UNet2DConditionModel.from_pretrained(str(init)).state_dict()
    (teacher,) = teachers
    state = {k: v.cpu() for k, v in teacher.state_dict().items()}  # on the GPU where there is one
    assert all(torch.equal(state[k], base[k]) for k in base), "the teacher is not --teacher_unet"
    assert any(not torch.equal(state[k], started[k]) for k in base)
    assert not any(p.requires_grad for p in teacher.parameters())
    # D's inputs are the student's x0_hat, not its noisy move output where the jump ends at t_prev >= 0.
    (pair,), ((real, fake),) = pairs, d_inputs
    assert bool((pair["t_prev"] >= 0).any()), "seed 3 should draw a jump to t_prev >= 0"
    torch.testing.assert_close(fake, pair["x0_hat"], rtol=1e-4, atol=1e-4)
    assert real.shape == fake.shape and bool(torch.isfinite(real).all())
    # Plan betas (0, 0.99) for the adversarial stage, with --adam_beta2 / --adam_weight_decay given.
    assert len(optimisers) == 2  # the student's and the discriminator's
    for opt in optimisers:
        assert opt.defaults["betas"] == (0.0, 0.95) and opt.defaults["weight_decay"] == 0.01
    assert UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / "unet")) is not None


def test_lightning_jump_x0_is_the_clean_sample_of_the_move() -> None:
    """The x0 a DDIM jump implies is the model's x0 prediction, at t_prev >= 0 and at the clean end,
    with pure noise at t = 999 (terminal_pure_noise) -- unlike the noisy move output itself."""
    from diffdistill.schedulers import NoiseSchedule

    script = _load("sdxl_lightning")
    schedule = NoiseSchedule.from_betas(terminal_pure_noise=True)
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([999, 749, 999, 249]), torch.tensor([499, 249, -1, -1])
    x_t = schedule.add_noise(x0, eps, t)
    assert torch.equal(x_t[0], eps[0])  # pure noise at t = 999
    x_prev = schedule.ddim_step(out, t, x_t, t_prev)
    got = script.jump_x0(schedule, x_prev, x_t, t, t_prev)
    torch.testing.assert_close(got, schedule.to_x0(out, x_t, t), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[2:], x_prev[2:])  # the clean end: the move output is x0 already
    assert not torch.allclose(got[:2], x_prev[:2], atol=1e-2)


def test_lightning_optimizer_options_default_to_the_plan(tmp_path: Path) -> None:
    script = _load("sdxl_lightning")
    plan = script.StagePlan.sdxl_lightning()
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)]
    args = script.parse_args([*argv, "--stage", "128->32", "--use_lora"])
    assert script.optimizer_options(args, plan["128->32"]) == {
        "lr": 1e-5,
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
    }
    args = script.parse_args([*argv, "--stage", "4->2/conditional", "--use_lora", "--from_base"])
    assert script.optimizer_options(args, plan["4->2/conditional"]) == {
        "lr": 1e-6,
        "betas": (0.0, 0.99),
        "weight_decay": 0.0,
    }
    flags = [
        "--adam_beta1",
        "0.5",
        "--adam_beta2",
        "0.9",
        "--adam_weight_decay",
        "0.1",
        "--learning_rate",
        "2e-6",
    ]
    args = script.parse_args([*argv, "--stage", "4->2/full", "--from_base", "--fresh_discriminator", *flags])
    assert script.optimizer_options(args, plan["4->2/full"]) == {
        "lr": 2e-6,
        "betas": (0.5, 0.9),
        "weight_decay": 0.1,
    }


def test_clip_and_step_unscales_only_its_optimizer() -> None:
    """fp16 with two optimisers: clipping the generator's gradients must leave the discriminator's
    accumulated (still scaled) gradients alone. accelerate's ``clip_grad_norm_`` unscales every prepared
    optimiser; the fake accelerator below runs accelerate's own methods with a CPU GradScaler."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    class FakeFp16Accelerator:
        unscale_gradients = Accelerator.unscale_gradients
        clip_grad_norm_ = Accelerator.clip_grad_norm_
        _clip_grad_norm_dtensor_aware = Accelerator._clip_grad_norm_dtensor_aware
        native_amp, mixed_precision, sync_gradients = True, "fp16", True
        distributed_type = DistributedType.NO

        def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
            self._optimizers = optimizers
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    gen_param, disc_param = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_g = torch.optim.SGD([gen_param], lr=0.0)
    opt_d = torch.optim.SGD([disc_param], lr=0.0)
    acc = FakeFp16Accelerator([opt_g, opt_d])
    acc.scaler.scale(disc_param.sum()).backward()  # D's first micro-batch, accumulated and scaled
    acc.scaler.scale(3.0 * gen_param.sum()).backward()
    runtime.clip_and_step(acc, opt_g, [gen_param], max_norm=1e6)
    assert gen_param.grad is None  # stepped and zeroed
    torch.testing.assert_close(
        disc_param.grad, torch.full((3,), 1024.0)
    )  # still scaled: unscaled once, later
    acc.scaler.unscale_(opt_d)
    torch.testing.assert_close(disc_param.grad, torch.ones(3))
    # The generator's own gradients were unscaled before clipping: the norm clipped is the true one.
    acc.scaler.update()
    acc.scaler.scale(3.0 * gen_param.sum()).backward()
    runtime.clip_and_step(acc, opt_g, [gen_param], max_norm=1.0)
    assert gen_param.grad is None


def test_uncond_defaults_to_zero_embeddings(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    """--uncond zeros (default): zero prompt and pooled embeddings with the conditional time_ids, as
    diffusers' SDXL pipeline with force_zeros_for_empty_prompt; --uncond empty_prompt: the encoded ""."""
    script = _load("sdxl_sim")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    args = script.parse_args(argv)
    assert args.uncond == "zeros"
    parts = sdxl_models.load_sdxl(args)
    uncond = sdxl_encoding.uncond_conditions(args, parts, "cpu", torch.float32)
    empty = sdxl_encoding.unet_conditions(parts, [""], args.resolution, "cpu", torch.float32)
    assert uncond["encoder_hidden_states"].shape == empty["encoder_hidden_states"].shape
    assert not uncond["encoder_hidden_states"].any() and not uncond["added_cond_kwargs"]["text_embeds"].any()
    assert uncond["added_cond_kwargs"]["text_embeds"].shape == empty["added_cond_kwargs"]["text_embeds"].shape
    assert torch.equal(uncond["added_cond_kwargs"]["time_ids"], empty["added_cond_kwargs"]["time_ids"])
    assert empty["encoder_hidden_states"].any()
    args = script.parse_args([*argv, "--uncond", "empty_prompt"])
    got = sdxl_encoding.uncond_conditions(args, parts, "cpu", torch.float32)
    assert torch.equal(got["encoder_hidden_states"], empty["encoder_hidden_states"])
    assert torch.equal(got["added_cond_kwargs"]["text_embeds"], empty["added_cond_kwargs"]["text_embeds"])
    # Every script builds its unconditional branch through --uncond.
    for path in EXAMPLES.glob("sdxl_*.py"):
        source = path.read_text()
        assert 'unet_conditions(parts, [""]' not in source, path.name
        if "uncond" in source and "uncond=" in source.replace(" ", ""):
            assert "sdxl_encoding.uncond_conditions(args, parts" in source, path.name


# ------------------------------------------------------------------------- review findings (examples)
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("sdxl_hyper_sd", ["--segments", "2,1", "--num_inference_steps", "4"]),
        ("sdxl_lightning", ["--stage", "4->2/conditional", "--from_base"]),
    ],
)
def test_discriminator_head_follows_the_resolution(
    tiny_sdxl: dict[str, Path], tmp_path: Path, name: str, extra: list[str]
) -> None:
    """At --resolution 64 (half of 8 x the tiny UNet's sample_size 16) the UNet-encoder discriminator reads
    4 x 4 bottleneck features: a head sized from sample_size (8 x 8) failed at the first adversarial step."""
    from diffdistill.discriminators import UNetEncoderDiscriminator

    heads: list[int] = []
    init = UNetEncoderDiscriminator.__init__

    def recording_init(self: Any, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        heads.append(self.heads[0].feature_resolution)

    out = tmp_path / "out"
    argv = [*_common_argv(tiny_sdxl, out, lora=True), "--train_data_dir", str(tiny_sdxl["images"]), *extra]
    argv += ["--resolution", "64", "--checkpointing_steps", "10", "--validation_steps", "10"]
    script = _load(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNetEncoderDiscriminator, "__init__", recording_init)
        script.main(script.parse_args(argv))
    assert heads == [4]  # latent 64 / 8 = 8, bottleneck stride 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_discriminator_feature_resolution_rounds_up_like_the_strided_convs() -> None:
    from diffdistill.discriminators import tiny_sdxl_unet

    unet = tiny_sdxl_unet()  # sample_size 16, bottleneck stride 2
    assert sdxl_models.discriminator_feature_resolution(unet, 128) == 8
    assert sdxl_models.discriminator_feature_resolution(unet, 64) == 4
    assert sdxl_models.discriminator_feature_resolution(unet, 72) == 5  # latent 9 -> ceil(9 / 2)
    assert sdxl_models.discriminator_feature_resolution(unet, 72, level="conv_in") == 9


def _complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "step.json").write_text("{}")
    return folder


def test_resume_latest_skips_checkpoints_without_the_completion_marker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import argparse

    _complete(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-20").mkdir()  # a save that never finished (no step.json)
    (tmp_path / "checkpoint-30").mkdir()
    (tmp_path / "checkpoint-30" / "model.safetensors").write_text("partial")
    acc = _FakeAccelerator()
    args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level("WARNING", logger="training"):
        assert checkpoints.resume(acc, args) == 10
    assert acc.loaded == ["checkpoint-10"]
    assert "checkpoint-30" in caplog.text and "checkpoint-20" in caplog.text
    assert "step.json" in caplog.text
    # Only incomplete folders: nothing to resume from, said so.
    partial_root = tmp_path / "only_partial"
    (partial_root / "checkpoint-5").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="training"):
        assert (
            checkpoints.resume(
                acc, argparse.Namespace(output_dir=str(partial_root), resume_from_checkpoint="latest")
            )
            == 0
        )
    assert "checkpoint-5" in caplog.text


class _FailingSave(_FakeAccelerator):
    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text("partial")
        raise OSError("disk full")


def test_a_failed_save_keeps_the_older_checkpoints(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(
        output_dir=str(tmp_path), checkpoints_total_limit=1, resume_from_checkpoint=None
    )
    checkpoints.save_checkpoint(_FakeAccelerator(), args, 10)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(_FailingSave(), args, 20)
    assert (tmp_path / "checkpoint-10" / "step.json").is_file()  # the limit pruned nothing before the save
    assert not (tmp_path / "checkpoint-20" / "step.json").exists()
    acc = _FakeAccelerator()
    assert (
        checkpoints.resume(acc, argparse.Namespace(**{**vars(args), "resume_from_checkpoint": "latest"}))
        == 10
    )
    # The next complete save prunes the old complete checkpoint and the abandoned partial one.
    checkpoints.save_checkpoint(_FakeAccelerator(), args, 30)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-30"]
    assert (tmp_path / "checkpoint-30" / "step.json").is_file()


def test_step_generator_keys_do_not_collide() -> None:

    def draw(*key: int) -> torch.Tensor:
        return torch.randn(8, generator=data_sources.step_generator(*key))

    # Each pair collided under the former linear key ((seed * 1_000_003 + step) * 1_009 + process) * 101 + micro.
    for a, b in [
        ((0, 0, 1, 0), (0, 0, 0, 101)),
        ((0, 1, 0, 0), (0, 0, 1009, 0)),
        ((1, 0, 0, 0), (0, 1_000_003, 0, 0)),
    ]:
        assert not torch.equal(draw(*a), draw(*b)), (a, b)
    assert torch.equal(draw(3, 7, 1, 2), draw(3, 7, 1, 2))
    # Deterministic across processes and runs: a fixed key gives a pinned seed (no Python hash salt).
    assert data_sources.step_generator(3, 7, 1, 2).initial_seed() == 7674004941594573099
    seeds = {
        data_sources.step_generator(s, t, p, m).initial_seed()
        for s in range(3)
        for t in range(20)
        for p in range(4)
        for m in range(3)
    }
    assert len(seeds) == 3 * 20 * 4 * 3


def test_image_methods_refuse_a_prompts_file_beside_the_images(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    both = ["--train_data_dir", str(tiny_sdxl["images"]), "--prompts_file", str(tiny_sdxl["prompts"])]
    extras = {"sdxl_hyper_sd": [], "sdxl_lightning": ["--stage", "4->2/conditional"], "sdxl_ssd1b_kd": []}
    for name, extra in extras.items():
        script = _load(name)
        lora = name != "sdxl_ssd1b_kd"
        argv = [*_common_argv(tiny_sdxl, tmp_path, lora=lora), *extra, *both]
        with pytest.raises(ValueError, match=r"trains on images and their captions.*drop --prompts_file"):
            script.parse_args(argv)
    # A prompt-only method still takes both (the prompt list is its data).
    _load("sdxl_sim").parse_args([*_common_argv(tiny_sdxl, tmp_path, lora=True), *both])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--resolution", "0", r"Expected --resolution to be a positive multiple of 8 .*, but got 0"),
        ("--resolution", "-1024", r"Expected --resolution to be a positive multiple of 8 .*, but got -1024"),
        ("--resolution", "100", r"Expected --resolution to be a positive multiple of 8 .*, but got 100"),
        ("--lora_rank", "0", r"Expected --lora_rank >= 1, but got 0"),
        ("--lora_alpha", "-3", r"Expected --lora_alpha > 0 .*, but got -3.0"),
        ("--lora_alpha", "0", r"Expected --lora_alpha > 0 .*, but got 0.0"),
        ("--max_grad_norm", "-1", r"Expected --max_grad_norm >= 0 \(0: no clipping\), but got -1.0"),
        ("--max_grad_norm", "nan", r"Expected --max_grad_norm >= 0 \(0: no clipping\), but got nan"),
    ],
)
def test_common_options_are_checked(
    tiny_sdxl: dict[str, Path], tmp_path: Path, flag: str, value: str, message: str
) -> None:
    script = _load("sdxl_sim")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    with pytest.raises(ValueError, match=message):
        script.parse_args([*argv, flag, value])


def test_accumulation_with_two_networks_is_refused_where_it_would_misweight(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    import types

    script = _load("sdxl_sim")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    with pytest.raises(ValueError, match=r"--fake_steps 2 with --gradient_accumulation_steps 2: each micro"):
        script.parse_args([*argv, "--fake_steps", "2", "--gradient_accumulation_steps", "2"])
    assert script.parse_args([*argv, "--fake_steps", "2"]).fake_steps == 2  # fine without accumulation
    # fp16's shared loss scale with two trained networks and accumulation (DeepSpeed: one scale per engine).
    pairs = [(torch.nn.Linear(2, 2), None), (torch.nn.Linear(2, 2), None)]

    def accelerator(precision: str, steps: int, kind: str = "MULTI_GPU") -> Any:
        return types.SimpleNamespace(
            mixed_precision=precision,
            gradient_accumulation_steps=steps,
            distributed_type=kind,
            prepare=lambda model, opt: [model, opt],
        )

    with pytest.raises(ValueError, match=r"fp16 with --gradient_accumulation_steps > 1 trains two networks"):
        runtime.prepare(accelerator("fp16", 2), *pairs)
    for ok in (accelerator("bf16", 2), accelerator("fp16", 1), accelerator("fp16", 2, "DEEPSPEED")):
        assert len(runtime.prepare(ok, *pairs)) == 4
    assert len(runtime.prepare(accelerator("fp16", 2), pairs[0])) == 2  # one network: one scale, no issue


def test_max_grad_norm_zero_still_means_no_clipping(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    script = _load("sdxl_sim")
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--prompts_file", str(tiny_sdxl["prompts"])]
    assert script.parse_args([*argv, "--max_grad_norm", "0"]).max_grad_norm == 0.0


def test_disk_caches_are_keyed_by_model_and_image_version(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse
    import shutil

    cache = str(tmp_path / "cache")
    # Prompt embeddings: a second model sharing the cache gets its own, not the first model's.
    encoded: list[float] = []

    def fake_encode(components: Any, prompts: list[str], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        value = float(components.text_encoder)
        encoded.append(value)
        return torch.full((len(prompts), 2, 3), value), torch.full((len(prompts), 3), value)

    monkeypatch.setattr(sdxl_encoding, "encode_prompts", fake_encode)

    def parts(value: float, tag: str) -> Any:
        return sdxl_models.SDXLComponents(None, None, value, None, None, None, None, cache_tag=tag)

    for value, tag in ((1.0, "model=a"), (2.0, "model=b"), (1.0, "model=a")):
        ehs, _ = sdxl_encoding.encode_prompts_cached(parts(value, tag), ["a cat"], "cpu", cache)
        assert float(ehs.max()) == value
    assert encoded == [1.0, 2.0]  # the third call read model a's file
    base = {"pretrained_model_name_or_path": "m", "revision": None, "variant": None}
    tag = sdxl_models.model_cache_tag(argparse.Namespace(**base, pretrained_vae_model_name_or_path=None))
    assert tag != sdxl_models.model_cache_tag(
        argparse.Namespace(**{**base, "variant": "fp16"}, pretrained_vae_model_name_or_path=None)
    )
    # Latents: the key follows the VAE and the image file's version (an edited image is encoded again).
    images = tmp_path / "images"
    shutil.copytree(tiny_sdxl["images"], images)

    def latent_file(vae: str | None) -> Path:
        args = argparse.Namespace(
            **base,
            pretrained_vae_model_name_or_path=vae,
            train_batch_size=1,
            cache_dir=cache,
            dataloader_num_workers=0,
            train_data_dir=str(images),
            prompts_file=None,
            resolution=64,
        )
        return data_sources.StepData(args, need_images=True)._latent_cache(0)

    before = latent_file(None)
    assert latent_file(None) == before and latent_file("madebyollin/sdxl-vae-fp16-fix") != before
    first = sorted(images.glob("*.png"))[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert latent_file(None) != before


def test_after_step_runs_before_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stage's output written by after_step (Hyper-SD's tscd/) must not be lost when the run dies right after
    # the checkpoint of that step: it is written first.
    import argparse
    import types

    order: list[tuple[str, int]] = []
    monkeypatch.setattr(
        checkpoints, "save_checkpoint", lambda acc, args, step: order.append(("checkpoint", step))
    )
    accelerator = types.SimpleNamespace(
        is_local_main_process=False, process_index=0, log=lambda *a, **k: None
    )
    args = argparse.Namespace(
        max_train_steps=3, checkpointing_steps=1, gradient_accumulation_steps=1, seed=0, validation_steps=10
    )
    loop.train_loop(
        accelerator, args, 0, lambda gen, step: {}, after_step=lambda step: order.append(("after", step))
    )
    assert order == [
        ("after", 1),
        ("checkpoint", 1),
        ("after", 2),
        ("checkpoint", 2),
        ("after", 3),
        ("checkpoint", 3),
    ]
