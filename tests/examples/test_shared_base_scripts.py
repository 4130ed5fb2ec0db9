"""``--shared_base`` in examples/sdxl_sim.py and examples/sdxl_diffusion2gan.py (issue 22, part 3).

One frozen UNet holds the generator's and the fake score's / discriminator's LoRA adapters; the real score /
teacher is that UNet with the adapters off. The tests run the scripts on the tiny pipeline of
``test_sdxl_scripts.py`` (2 steps, a checkpoint after step 1, resumed into a fresh folder) and check that no
second copy of the base weights exists while training, that the run equals the run with separate copies where
the math is the same, that each adapter is checkpointed in its own file and that resume is exact.
"""

# The fixture is imported (not copied): its name is then a test parameter, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.test_sdxl_scripts import (  # noqa: F401 - fixtures: the tiny pipeline, deterministic kernels
    _assert_lora_roundtrip,
    _common_argv,
    _deterministic_kernels,
    _launch_two_processes,
    _load,
    _lora_state,
    _run_and_resume,
    _two_process_runs,
    tiny_sdxl,
)
from tests.state_compare import assert_same_update

loop = _load("training.loop")
runtime = _load("training.runtime")
sdxl_models = _load("training.sdxl_models")
shared_critics = _load("training.shared_critics")


def count_base_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the scripts: when training starts, count the live copies of the loaded UNet's base weights.

    The fingerprint is the loaded UNet's ``conv_in.weight`` (a base weight every network of the teacher's
    architecture holds, LoRA or not): every live tensor of its shape and values is one copy, counted once per
    storage (views and ``detach()`` share it). Returns the list that each run appends its count to.
    """
    counts: list[int] = []
    fingerprint: list[torch.Tensor] = []
    load_sdxl, train_loop = sdxl_models.load_sdxl, loop.train_loop

    def recording_load(args: Any) -> Any:
        parts = load_sdxl(args)
        fingerprint[:] = [parts.unet.conv_in.weight.detach().clone()]
        return parts

    def counting_loop(*args: Any, **kwargs: Any) -> Any:
        want = fingerprint[0]
        gc.collect()  # the networks of an earlier run in this process
        storages = set()
        for obj in gc.get_objects():
            same_shape = issubclass(type(obj), torch.Tensor) and obj.shape == want.shape
            if (
                same_shape
                and obj.is_floating_point()
                and torch.equal(obj.detach().float().cpu(), want.float())
            ):
                storages.add(obj.untyped_storage().data_ptr())
        counts.append(len(storages - {want.untyped_storage().data_ptr()}))
        return train_loop(*args, **kwargs)

    monkeypatch.setattr(sdxl_models, "load_sdxl", recording_load)
    monkeypatch.setattr(loop, "train_loop", counting_loop)
    return counts


def d2g_pairs_argv(tiny: dict[str, Path], tmp_path: Path) -> list[str]:
    """Diffusion2GAN's options for 4 teacher pairs of 2 DDIM steps, and the random E-LatentLPIPS trunk."""
    pairs = ["--pairs_dir", str(tmp_path / "pairs"), "--num_pairs", "4", "--pairs_shard_size", "2"]
    return [
        "--prompts_file",
        str(tiny["prompts"]),
        *pairs,
        "--teacher_steps",
        "2",
        "--lpips_weights",
        "random",
    ]


def test_shared_base_needs_lora_and_a_tested_engine(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from accelerate.utils import DistributedType

    d2g = ["--lpips_weights", "random", "--r1_approximate_sigma", "0.1"]  # R1 allowed under sharding
    refused = (
        ("sdxl_sim", [], DistributedType.DEEPSPEED, r"runs under DDP, FSDP2 or one process: DeepSpeed wraps"),
        (
            "sdxl_diffusion2gan",
            d2g,
            DistributedType.FSDP,
            r"runs under DDP or one process: .*not tested under FSDP2",
        ),
    )
    for name, extra, engine, why in refused:
        script = _load(name)
        flags = ["--prompts_file", str(tiny_sdxl["prompts"]), *extra, "--shared_base"]
        with pytest.raises(ValueError, match=r"--shared_base shares one frozen UNet.*add --use_lora"):
            script.parse_args([*_common_argv(tiny_sdxl, tmp_path, lora=False), *flags])
        args = script.parse_args([*_common_argv(tiny_sdxl, tmp_path, lora=True), *flags])
        accelerator = types.SimpleNamespace(distributed_type=engine, is_main_process=True)
        monkeypatch.setattr(runtime, "make_accelerator", lambda args, name, acc=accelerator, **kw: acc)
        with pytest.raises(ValueError, match=why):
            script.main(args)
    flags = ["--prompts_file", str(tiny_sdxl["prompts"]), "--lpips_weights", "random", "--shared_base"]
    # exact R1 with gradient checkpointing: allowed (the base recomputes blocks under the D adapter in both
    # backward passes of the double backward; tests/students/test_shared_base.py checks the gradients)
    args = _load("sdxl_diffusion2gan").parse_args(
        [*_common_argv(tiny_sdxl, tmp_path, lora=True), *flags, "--gradient_checkpointing"]
    )
    assert args.r1_approximate_sigma is None and args.gradient_checkpointing


def test_sim_shared_base_is_the_two_copy_run_on_one_unet(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIM with gradient checkpointing and an EMA release: one UNet instead of three, the same generator and fake
    score as the run with separate copies (float32: the same arithmetic), exact resume, adapters in their own
    files, the release loadable by diffusers' SDXL pipeline."""
    copies = count_base_copies(monkeypatch)
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "sim", "--gradient_checkpointing"]
    extra += ["--use_ema", "--ema_decay", "0.5"]  # the released average of the generator's adapter
    out_copies, out_a, out_b = tmp_path / "copies", tmp_path / "a", tmp_path / "b"
    script = _load("sdxl_sim")
    script.main(script.parse_args([*_common_argv(tiny_sdxl, out_copies, lora=True), *extra]))
    shared = [*extra, "--shared_base"]
    _run_and_resume(
        "sdxl_sim",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *shared],
        [*_common_argv(tiny_sdxl, out_b, lora=True), *shared],
        out_a,
    )
    # The detector sees the real score, the generator's base and the fake score's base as 3 copies.
    assert copies == [3, 1, 1], copies
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b)  # resume exact; loads with diffusers' load_lora_adapter
    name = "pytorch_lora_weights.safetensors"
    got, want = _lora_state(out_a / name), _lora_state(out_copies / name)
    ckpt, ckpt_copies = (
        {n: _lora_state(out / "checkpoint-1" / f"{n}_lora.safetensors") for n in ("unet", "fake")}
        for out in (out_a, out_copies)
    )
    at_step1 = {"unet." + k: v for k, v in ckpt["unet"].items()}
    # The same two updates (the views compute what the copies compute: base layer alone for the real score,
    # base + the one active adapter for the others), judged against the size of step 2 (state_compare.py):
    # the arithmetic is the same op for op (measured: bit-identical on the CPU), but the copies are other
    # allocations, whose alignment may pick other SIMD paths on other machines.
    assert_same_update(got, want, at_step1, what="shared base vs separate copies (generator)")
    assert ckpt["fake"].keys() == ckpt_copies["fake"].keys() and ckpt["fake"]
    init_fake = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in ckpt_copies["fake"].items()}
    assert_same_update(
        ckpt["fake"], ckpt_copies["fake"], init_fake, what="shared base vs copies (fake score)"
    )
    # Each adapter in its own file: the generator's and the fake score's differ (they trained apart).
    assert any(not torch.equal(ckpt["unet"][k], ckpt["fake"][k]) for k in ckpt["unet"] if "lora_B" in k)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["model"]))
    pipe.load_lora_weights(str(out_a), weight_name=name)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_diffusion2gan_shared_base_trains_a_discriminator_adapter(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Diffusion2GAN: the discriminator is a LoRA adapter of the generator's frozen UNet (+ its own layers), with
    gradient checkpointing and APT's R1 at every step (exact R1 runs in the 2-process test)."""
    from safetensors.torch import load_file

    copies = count_base_copies(monkeypatch)
    extra = d2g_pairs_argv(tiny_sdxl, tmp_path)
    extra += ["--r1_every", "1", "--r1_approximate_sigma", "0.1", "--gradient_checkpointing"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    shared = [*extra, "--shared_base"]
    _run_and_resume(
        "sdxl_diffusion2gan",
        [*_common_argv(tiny_sdxl, out_a, lora=True), *shared],
        [*_common_argv(tiny_sdxl, out_b, lora=True), *shared],
        out_a,
    )
    assert copies == [1, 1], copies  # without the flag: the generator's base and D's trainable copy
    _assert_lora_roundtrip(tiny_sdxl, out_a, out_b, exact=not torch.cuda.is_available())  # as the D2G test
    # The discriminator is accelerate's one model file (the generator's adapter has its own): its adapter
    # (trained by step 1: B left zero) and its own layers, no base weight.
    disc = load_file(str(out_a / "checkpoint-1" / "model.safetensors"))
    adapter = {k: v for k, v in disc.items() if k.startswith("adapter.")}
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if ".lora_B." in k), (
        "D's adapter did not train"
    )
    assert set(disc) - set(adapter) and all(
        k.startswith("module.") and "lora" not in k for k in set(disc) - set(adapter)
    )
    assert not any("base_layer" in k for k in disc)


def test_dmd2_gan_shared_base_under_ddp(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    """2-process DDP, DMD2 with its GAN classifier on the fake score's adapter, gradient checkpointing: the
    generator's and the fake score's views and the classifier head are three DDP models over one UNet.
    (That the views compute what separate copies compute is the single-process test's comparison.)"""
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    argv = [*_common_argv(tiny_sdxl, out, lora=True), "--train_data_dir", str(tiny_sdxl["images"])]
    argv += ["--preset", "dmd2", "--gan_weight", "--generator_every", "1", "--gradient_checkpointing"]
    argv += ["--shared_base"]
    argv[argv.index("--train_batch_size") + 1] = "1"  # per process
    _launch_two_processes("sdxl_sim", argv)
    ckpt = out / "checkpoint-1"
    assert (ckpt / "random_states_1.pkl").is_file(), "DDP ran in one process"
    gen, fake = _lora_state(ckpt / "unet_lora.safetensors"), _lora_state(ckpt / "fake_lora.safetensors")
    assert gen.keys() == fake.keys() and gen
    for adapter in (gen, fake):  # both trained in step 1 (B starts at zero), and apart
        assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k)
    assert any(not torch.equal(gen[k], fake[k]) for k in gen if "lora_B" in k)
    head = load_file(str(ckpt / "model.safetensors"))  # the classifier head alone: no UNet weight
    assert head and all(k.startswith("module.heads.") for k in head), sorted(head)[:5]
    final = _lora_state(out / "pytorch_lora_weights.safetensors")
    assert final.keys() == {"unet." + k for k in gen}


def test_sim_shared_base_under_fsdp2_equals_ddp(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    """2-process FSDP2: the frozen base sharded once (SharedBase.fully_shard), each view sharding its adapter;
    the same two updates as DDP (judged against their size, state_compare.py), the release written from the
    gathered adapter and loadable by diffusers."""
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "sim", "--gradient_checkpointing"]
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), *extra, "--shared_base"]
    out = _two_process_runs("sdxl_sim", argv, tmp_path, "fsdp", resume=False)
    name = "pytorch_lora_weights.safetensors"
    ddp, fsdp = _lora_state(out["ddp"] / name), _lora_state(out["fsdp"] / name)
    step1 = _lora_state(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors")
    assert_same_update(
        fsdp, ddp, {"unet." + k: v for k, v in step1.items()}, what="FSDP2 vs DDP (shared base)"
    )
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out["fsdp"]), weight_name=name, prefix="unet")
    assert any("lora" in n for n, _ in unet.named_parameters())


def test_diffusion2gan_shared_base_exact_r1_under_ddp(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    """2-process DDP with exact R1 at every step and gradient checkpointing: R1's double backward runs through the
    discriminator's adapter (the DDP wrapper holds the adapter and D's own layers), recomputing the base's blocks
    under that adapter in both backward passes, and completes the synchronised backward."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ddp"
    argv = [*_common_argv(tiny_sdxl, out, lora=True), *d2g_pairs_argv(tiny_sdxl, tmp_path)]
    argv += ["--r1_every", "1", "--r1_gamma", "10", "--gradient_checkpointing"]
    argv += ["--shared_base", "--report_to", "tensorboard"]
    argv[argv.index("--train_batch_size") + 1] = "1"
    _launch_two_processes("sdxl_diffusion2gan", argv)
    assert (out / "checkpoint-1" / "random_states_1.pkl").is_file(), "DDP ran in one process"
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    r1 = [e.value for e in events.Scalars("r1")]
    assert len(r1) == 2 and all(v > 0 for v in r1), r1
    disc = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert any(
        bool(v.abs().sum() > 0) for k, v in disc.items() if k.startswith("adapter.") and ".lora_B." in k
    )
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    assert any("lora" in n for n, _ in unet.named_parameters())


def test_gpu_benchmark_shared_base_runs_tiny_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/gpu_sdxl.py --shared_base: its CPU smoke path (what a GPU run measures the memory of)."""
    from tests.benchmarks.test_gpu_sdxl import _load as load_benchmark

    bench = load_benchmark()
    tiny = ["--tiny", "--device", "cpu", "--max_batch", "1", "--warmup", "0", "--no_reference"]
    for bad, why in ((["--full"], r"leave out --full"),):
        with pytest.raises(SystemExit):
            bench.parse_args([*tiny, "--shared_base", *bad])
        assert re.search(why, capsys.readouterr().err)
    flags = ["--methods", "sim", "diffusion2gan", "--shared_base", "--r1_approximate_sigma", "0.1"]
    out = bench.main(bench.parse_args([*tiny, *flags]))
    assert "shared base (sim, diffusion2gan)" in out.splitlines()[0]
    for row in ("| sim | LoRA, shared base | 1 |", "| diffusion2gan | LoRA, shared base | 1 |"):
        assert row in out, out
