"""The SDXL scripts under DeepSpeed (accelerate's integration): ZeRO-1, ZeRO-2 and ZeRO-3 on 2 CPU processes.

Each run is compared with a DDP run of the same global batch. The two-engine cases are the point: a
generator with a discriminator or fake score is two DeepSpeed engines, and ``accelerator.backward`` only
ever drives the first one (``training.runtime.backward`` routes each loss to its own engine). Helpers and the
tiny pipeline come from ``test_sdxl_scripts.py``.
"""

# ruff: noqa: F811

from __future__ import annotations

import argparse
import json
import logging
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# The fixture is imported (not copied): its name is then a test parameter, which ruff reads as a redefinition.
from tests.examples.test_sdxl_scripts import (  # noqa: F401
    _common_argv,
    _launch_two_processes,
    _load,
    _lora_state,
    _two_process_runs,
    runtime,
    tiny_sdxl,
)
from tests.state_compare import REL, adam_first_update_norm, assert_same_update


def _needs_deepspeed() -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make install`")


def _assert_discriminator_and_lora_match_ddp(
    out: dict[str, Path], mode: str = "zero2"
) -> dict[str, torch.Tensor]:
    """A LoRA student + discriminator run under ZeRO (``out[mode]``, default ZeRO-2) against DDP's (``out["ddp"]``):
    D's first step and the student's second step the same updates up to summation order (both judged against
    the size of the update, tests/state_compare.py); returns the ZeRO-2 LoRA."""
    ddp_ckpt, ds_ckpt = out["ddp"] / "checkpoint-1", out[mode] / "checkpoint-1"
    # The discriminator's step 1: DDP stepped it (Adam state), and DeepSpeed's second engine holds the same
    # weights (a D that never stepped would sit ~lr = 1e-3 away from DDP's in every entry).
    ddp_d_optimizer = torch.load(ddp_ckpt / "optimizer_1.bin", weights_only=False)
    ddp_d_opt = ddp_d_optimizer["state"]
    assert ddp_d_opt and max(float(s["exp_avg"].abs().max()) for s in ddp_d_opt.values()) > 0
    from safetensors.torch import load_file

    ddp_d = load_file(str(ddp_ckpt / "model.safetensors"))
    ds_d = torch.load(ds_ckpt / "pytorch_model_1" / "mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    assert ddp_d.keys() == ds_d.keys() and ddp_d
    # D's weights before the step are not saved; the step's size is recovered from the Adam moments it left
    # (every entry moves by ~lr, so its norm is ~lr·sqrt(#entries)). Reduction order changes D's gradient in
    # its last bits (measured on one CPU: 1.47e-6 at one entry, ~1e-3 of lr; absolute float32 tolerances
    # failed there), while a penalty dropped or counted twice by one engine flips signs: O(1) of the step.
    step_norm = adam_first_update_norm(ddp_d_optimizer)
    gap = torch.cat([(ds_d[k].double() - ddp_d[k].double()).flatten() for k in ddp_d])
    assert step_norm > 0 and float(gap.norm()) <= REL * step_norm, (float(gap.norm()), step_norm)
    # The student's second step, taken against the updated D, matches DDP's up to the reduction order of the
    # accumulated gradients, which Adam amplifies at near-zero gradients (measured gap / update 1e-3).
    name = "pytorch_lora_weights.safetensors"
    step1 = {"unet." + k: v for k, v in _lora_state(ddp_ckpt / "unet_lora.safetensors").items()}
    ddp, ds = _lora_state(out["ddp"] / name), _lora_state(out[mode] / name)
    assert ddp.keys() == ds.keys() == step1.keys() and ddp
    assert_same_update(ds, ddp, step1, rel=0.02, what=f"{mode} vs DDP student step 2")
    return ds


def test_lightning_adversarial_lora_under_zero2_and_zero1_matches_ddp(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    # LoRA student and discriminator are two ZeRO-2 engines; gradient accumulation over 2 micro-batches.
    _needs_deepspeed()
    extra = ["--train_data_dir", str(tiny_sdxl["images"]), "--stage", "4->2/conditional", "--from_base"]
    extra += ["--gradient_accumulation_steps", "2"]
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), *extra]
    out = _two_process_runs("sdxl_lightning", argv, tmp_path, "zero2", resume=False)
    ds = _assert_discriminator_and_lora_match_ddp(out)
    # ZeRO-1 (accelerate enters the engines' no_sync during accumulation, which ZeRO-2 does not): the same updates
    zero1 = list(argv)
    zero1[zero1.index("--output_dir") + 1] = str(tmp_path / "zero1")
    zero1[zero1.index("--train_batch_size") + 1] = "1"  # per process, as _two_process_runs
    _launch_two_processes("sdxl_lightning", zero1, mode="zero1")
    _assert_discriminator_and_lora_match_ddp({**out, "zero1": tmp_path / "zero1"}, mode="zero1")
    name = "pytorch_lora_weights.safetensors"
    # bf16: DeepSpeed holds the engines' weights in bf16 (the released LoRA too) and the step runs under
    # torch.autocast (training.runtime.autocast; accelerate's does nothing under DeepSpeed, and float32 inputs
    # met bf16 weights). It trains like the float32 run up to bf16 noise, which Adam's normalised first
    # steps make large here: cosine of the released LoRA-B weights (the --use_ema average) with the float32
    # run's measured 0.42 (0.38 without --use_ema; DDP bf16 vs float32: 0.44); an untrained B is zero.
    # The average stays float32 (a bf16 one would not move at decay 0.9999) and is released as bf16.
    bf16_argv = [*_common_argv(tiny_sdxl, tmp_path / "bf16", lora=True), *extra, "--mixed_precision", "bf16"]
    bf16_argv[bf16_argv.index("--train_batch_size") + 1] = "1"
    _launch_two_processes("sdxl_lightning", [*bf16_argv, "--use_ema"], mode="zero2")
    average = torch.load(tmp_path / "bf16" / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)
    lora_average = {k: v for k, v in average.items() if "lora" in k}
    assert lora_average and all(v.dtype == torch.float32 for v in lora_average.values())
    bf16 = _lora_state(tmp_path / "bf16" / name)
    assert bf16.keys() == ds.keys() and all(v.dtype == torch.bfloat16 for v in bf16.values())
    b_keys = [k for k in ds if "lora_B" in k]
    b32, b16 = (torch.cat([w[k].float().flatten() for k in b_keys]) for w in (ds, bf16))
    assert float(torch.nn.functional.cosine_similarity(b32, b16, dim=0)) > 0.2


def test_diffusion2gan_approximate_r1_under_zero2_matches_ddp(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    # APT's finite-difference R1 has no double backward, so it runs sharded (exact R1 is refused there); it
    # is added to the D loss for one backward, i.e. one step of D's engine per update, as under DDP.
    _needs_deepspeed()
    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--pairs_dir", str(tmp_path / "pairs")]
    extra += [
        "--num_pairs",
        "4",
        "--pairs_shard_size",
        "2",
        "--teacher_steps",
        "2",
        "--lpips_weights",
        "random",
    ]
    extra += ["--r1_every", "1", "--r1_approximate_sigma", "0.1", "--r1_gamma", "10"]
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), *extra]
    out = _two_process_runs("sdxl_diffusion2gan", argv, tmp_path, "zero2", resume=False)
    # D's first Adam step moves each weight by about the learning rate times the sign of its gradient: a
    # penalty dropped (or counted twice) by the sharded run would flip signs and miss DDP's D by ~1e-3.
    _assert_discriminator_and_lora_match_ddp(out)


def test_sim_full_unets_under_zero3_match_ddp_and_resume(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    # Generator and fake score are two ZeRO-3 engines (parameters partitioned across the processes), the
    # frozen fake score is called through its module in the generator's update, and the final UNet is
    # gathered from the partitions; the resumed run loads both engines' checkpoints.
    _needs_deepspeed()
    from diffusers import UNet2DConditionModel

    extra = ["--prompts_file", str(tiny_sdxl["prompts"]), "--loss", "dmd", "--learning_rate", "1e-4"]
    extra += ["--generator_every", "1", "--uncond", "empty_prompt"]
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=False), *extra]
    out = _two_process_runs("sdxl_sim", argv, tmp_path, "zero3")
    assert (out["zero3"] / "checkpoint-1" / "pytorch_model_1").is_dir()  # the fake score's engine
    config = json.loads((out["zero3"] / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    ddp, ds, resumed = (
        UNet2DConditionModel.from_pretrained(str(out[k] / "unet")).state_dict()
        for k in ("ddp", "zero3", "zero3_resumed")
    )
    start = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet").state_dict()
    assert all(v.dtype == torch.float32 for v in ds.values())
    # Measured gap / update 5e-5: the clipped gradient norm is summed in another order (as under FSDP).
    assert_same_update(ds, ddp, start, what="ZeRO-3 vs DDP")
    assert_same_update(resumed, ds, start, what="resumed vs uninterrupted ZeRO-3")


class _Engine(torch.nn.Module):
    """Records the calls accelerate's ``DeepSpeedEngineWrapper`` makes on a DeepSpeed engine."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2)
        self.calls: list[Any] = []

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append("backward")

    def step(self) -> None:
        self.calls.append("step")


class _DeepSpeedAccelerator:
    """The parts of a DeepSpeed ``Accelerator`` that helpers of ``examples/training/`` read."""

    def __init__(self, plugin: Any = None, sync_gradients: bool = True) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.state = types.SimpleNamespace(deepspeed_plugin=plugin)
        self.sync_gradients = sync_gradients
        self.gradient_accumulation_steps, self.num_processes = 1, 2

    def backward(self, loss: torch.Tensor) -> None:
        raise AssertionError("accelerator.backward drives the first engine only")

    def unwrap_model(self, model: _Engine) -> torch.nn.Module:
        return model.module


def test_backward_and_forward_model_use_the_models_own_engine() -> None:
    loss = torch.zeros(())
    for sync in (True, False):
        engine = _Engine()
        runtime.backward(_DeepSpeedAccelerator(sync_gradients=sync), loss, engine)
        # DeepSpeed steps inside backward at the end of an accumulation cycle only.
        assert engine.calls == [("boundary", sync), "backward", *(["step"] if sync else [])]
    engine = _Engine()
    assert runtime.forward_model(_DeepSpeedAccelerator(), engine) is engine.module
    ddp = types.SimpleNamespace(distributed_type="MULTI_CPU")
    assert runtime.forward_model(ddp, engine) is engine


def _plugin(stage: int, **config: Any) -> Any:
    """A DeepSpeed plugin of a config file with ``config``'s entries (``None``: left out)."""
    from accelerate.utils import DeepSpeedPlugin

    _needs_deepspeed()
    ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    ds_config.update(gradient_clipping="auto", gradient_accumulation_steps="auto")
    ds_config.update(config)
    return DeepSpeedPlugin(hf_ds_config={k: v for k, v in ds_config.items() if v is not None})


def test_configure_deepspeed_fills_auto_values_and_refuses_ema_under_zero3(
    caplog: pytest.LogCaptureFixture,
) -> None:
    args = argparse.Namespace(train_batch_size=3, max_grad_norm=0.5, use_ema=False)
    plugin = _plugin(2)
    runtime.configure_deepspeed(_DeepSpeedAccelerator(plugin), args)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert runtime.zero_stage(_DeepSpeedAccelerator(plugin)) == 2
    # An explicit value in the user's config is kept (DeepSpeed applies it), and the mismatch is logged.
    plugin = _plugin(3, gradient_clipping=2.0)
    with caplog.at_level(logging.WARNING, logger="training"):
        runtime.configure_deepspeed(_DeepSpeedAccelerator(plugin), args)
    assert plugin.deepspeed_config["gradient_clipping"] == 2.0
    assert "sets gradient_clipping = 2.0 (used); the script's options give 0.5" in caplog.text
    # ZeRO-3 must gather the partitions to write the final weights.
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # A config file without the keys gets them too (DeepSpeed's defaults: micro batch 1, no clipping).
    plugin = _plugin(2, gradient_clipping=None, train_micro_batch_size_per_gpu=None)
    runtime.configure_deepspeed(_DeepSpeedAccelerator(plugin), args)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    # --use_ema and --compile under ZeRO-3: refused here, before any model loads (audit 17: --compile was refused
    # only after SDXL loaded); under ZeRO-2 both run
    for option, fix in (("use_ema", "ZeRO stage 1 or 2"), ("compile", "drop --compile")):
        with pytest.raises(ValueError, match=rf"--{option} is not supported under DeepSpeed ZeRO-3.*{fix}"):
            runtime.configure_deepspeed(
                _DeepSpeedAccelerator(_plugin(3)), argparse.Namespace(**{**vars(args), option: True})
            )
        runtime.configure_deepspeed(
            _DeepSpeedAccelerator(_plugin(2)), argparse.Namespace(**{**vars(args), option: True})
        )


@pytest.mark.parametrize("script_name", ["sdxl_sim", "sdxl_mlcm"])
def test_gan_term_under_deepspeed_is_refused_before_the_models_load(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script_name: str
) -> None:
    """DMD2's classifier under a sharding engine: refused right after the accelerator is made (audit 17: after
    SDXL loaded and the generator's and fake score's engines were prepared)."""
    script = _load(script_name)
    monkeypatch.setattr(
        runtime, "make_accelerator", lambda args, name, **kw: _DeepSpeedAccelerator(_plugin(2))
    )

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the models were loaded before the refusal")

    monkeypatch.setattr(script.sdxl_models, "load_sdxl", no_load)
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--gan_weight", "1e-3"]
    if script_name == "sdxl_sim":
        argv += ["--train_data_dir", str(tiny_sdxl["images"])]
    else:
        argv += ["--prompts_file", str(tiny_sdxl["prompts"]), "--stage1_steps", "1", "--dmd_steps", "1"]
    with pytest.raises(ValueError, match=r"--gan_weight: DMD2's classifier .* FSDP / DeepSpeed engine"):
        script.main(script.parse_args(argv))


def test_hyper_sd_ema_target_is_refused_under_zero3(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load("sdxl_hyper_sd")
    monkeypatch.setattr(
        runtime, "make_accelerator", lambda args, name, **kw: _DeepSpeedAccelerator(_plugin(3))
    )
    argv = [*_common_argv(tiny_sdxl, tmp_path, lora=True), "--train_data_dir", str(tiny_sdxl["images"])]
    with pytest.raises(ValueError, match=r"--target ema .* ZeRO-3 .* or pass --target online"):
        script.main(script.parse_args(argv))


def test_an_accumulation_other_than_the_option_is_refused() -> None:
    # accelerate's DeepSpeed launch exports the config's gradient_accumulation_steps (1 by default), which
    # Accelerator() prefers to its argument; a DeepSpeed config file may set its own.
    args = argparse.Namespace(gradient_accumulation_steps=4)
    accelerator = _DeepSpeedAccelerator(_plugin(2))
    accelerator.gradient_accumulation_steps = 1
    with pytest.raises(ValueError, match=r"accelerate config .* = 4, but it is 1: set"):
        runtime.check_accumulation(accelerator, args)
    accelerator = _DeepSpeedAccelerator(_plugin(2, gradient_accumulation_steps=2))
    accelerator.gradient_accumulation_steps = 4
    with pytest.raises(ValueError, match=r"DeepSpeed config to be .* = 4, but it is 2: .*\"auto\""):
        runtime.check_accumulation(accelerator, args)
    accelerator = _DeepSpeedAccelerator(_plugin(2))
    accelerator.gradient_accumulation_steps = 4
    runtime.check_accumulation(accelerator, args)  # "auto" in the DeepSpeed config: accelerate fills it
    ddp = types.SimpleNamespace(distributed_type="MULTI_GPU", gradient_accumulation_steps=4)
    runtime.check_accumulation(ddp, args)
