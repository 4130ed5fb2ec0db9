"""``--compile`` under FSDP2 and DeepSpeed (examples/training/compilation.py), 2 CPU processes: compiled == eager.

Each case runs a script twice under the same engine, eager and with ``--compile --compile_backend eager`` (dynamo
captures, guards and recompiles each block as with inductor, and runs the captured graphs: see
test_script_compile.py for the choice), through the test launcher ``sharded_cpu_launch.py``, whose
``DYNAMO_STATS_DIR`` makes the compiled run fail on reaching a recompile limit (no block falls back to eager) and
writes dynamo's counters of each process. Compared: the weights after two steps, against the size of the second
step's update (from the step-1 checkpoint; :func:`tests.state_compare.assert_same_update`, bound 1e-2: the
engines sum the same gradients in the same order here, and a compiler's float32 reordering moves Adam's
sign-like early updates by at most ~1e-3 of the update; a block run under the wrong adapter, with stale sharded
weights or a missed reduction, changes the update by O(1)). Measured gap / update: 0 (bitwise) in both cases; by
hand, over the suite's time budget, with ``aot_eager`` (AOT autograd's joint graphs) 0 for FSDP2 and 5.5e-4 for
ZeRO-2's student, and with inductor (CPU code generation, 2 min) 2.5e-4 for FSDP2's generator.

* FSDP2, ``flow_dmd2`` (FLUX, generator and fake-score adapters on one shared base, gradient checkpointing): the
  hardest case -- the frozen base is sharded block by block (``SharedBase.fully_shard``) *before* its blocks are
  compiled (FSDP2 renamed their classes), each view shards its adapter with its optimiser, and a block meets the
  adapter of the view not running as a sharded ``DTensor`` (another guard: 11 variants of a block, over dynamo's
  default limit of 8 that compilation.py had used; this case failed with that limit).
* DeepSpeed ZeRO-2, ``sdxl_lightning`` with its discriminator (two engines, two accumulated micro-batches): the
  run test_deepspeed.py checks against DDP; D's blocks (a copy of the UNet encoder) are compiled too.

Checked by hand, not in the suite (time), all bitwise equal to eager with no graph break: ``sdxl_lightning`` (MSE
stage, LoRA) under FSDP2 with accelerate's default wrap (the root only) and with
``FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP`` (``fully_shard`` on blocks already compiled in place), and under
DDP; ``sdxl_sim --shared_base`` (SDXL's shared base, block-wise sharded) under FSDP2. ZeRO-3 breaks every block
at each layer's parameter-fetching hook and is refused (tested below without a launch).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tests.examples.example_modules import load_example
from tests.examples.sharded_cpu_launch import DYNAMO_STATS_DIR
from tests.examples.test_sdxl_scripts import _common_argv, _launch_two_processes
from tests.examples.tiny_flow import smoke_argv, write_tiny_flow_models
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline, write_captioned_images
from tests.state_compare import assert_same_update

BACKEND = "eager"  # as test_script_compile.py: dynamo's capture, guards and recompiles, no code generation
compilation = load_example("training.compilation")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL pipeline with captioned images, and the tiny FLUX pipeline with a prompt file."""
    root = tmp_path_factory.mktemp("tiny_compile_sharded")
    models = write_tiny_flow_models(root / "flow")
    images = write_captioned_images(root / "images", ["a red cube", "a blue sphere", ""])
    return {**models, "model": save_tiny_sdxl_pipeline(root / "sdxl", seed=0), "images": images}


def _eager_and_compiled(
    monkeypatch: pytest.MonkeyPatch, script: str, argv: list[str], tmp_path: Path, mode: str
) -> dict[str, Path]:
    """Run ``script`` under ``mode`` eager, then compiled; return the output folders and assert dynamo's counters
    of the compiled run: blocks compiled, no graph break (the recompile limit failing the run is the launcher's)."""
    out = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    argv = list(argv)
    argv[argv.index("--train_batch_size") + 1] = "1"  # per process
    i = argv.index("--output_dir") + 1
    argv[i] = str(out["eager"])
    _launch_two_processes(script, argv, mode=mode)
    stats = tmp_path / "dynamo"
    stats.mkdir()
    monkeypatch.setenv(DYNAMO_STATS_DIR, str(stats))
    argv[i] = str(out["compiled"])
    _launch_two_processes(script, [*argv, "--compile", "--compile_backend", BACKEND], mode=mode)
    for rank in (0, 1):
        counters = json.loads((stats / f"rank{rank}.json").read_text())
        assert counters.get("stats", {}).get("unique_graphs", 0) >= 2, counters  # the blocks were compiled
        assert not counters.get("graph_break"), counters  # each block variant is one graph
    return out


def _load(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {prefix + k: v for k, v in load_file(str(path)).items()}


def _fsdp_checkpoint(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model state of an FSDP2 sharded checkpoint (``pytorch_model_fsdp_<i>``), gathered in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(scratch))
    return torch.load(scratch, weights_only=True)["model"]


def test_flow_dmd2_compiled_under_fsdp2_equals_eager(
    monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path], tmp_path: Path
) -> None:
    argv = smoke_argv(tiny, "flux", tmp_path / "unused", "--lora_rank", "4", "--gradient_checkpointing")
    out = _eager_and_compiled(monkeypatch, "flow_dmd2", [*argv, "--generator_every", "1"], tmp_path, "fsdp")
    flow_critics = load_example("training.flow_critics")
    # The views' sharded step-1 states: the generator's adapter (model 0) and the fake score's (model 1).
    for i, name in enumerate(("pytorch_lora_weights.safetensors", flow_critics.FAKE_LORA_NAME)):
        state = _fsdp_checkpoint(
            out["eager"] / "checkpoint-1" / f"pytorch_model_fsdp_{i}", tmp_path / f"{i}.pt"
        )
        step1 = {"transformer." + k: v for k, v in state.items()}
        eager, compiled = _load(out["eager"] / name), _load(out["compiled"] / name)
        assert eager and eager.keys() == compiled.keys()
        assert_same_update(compiled, eager, step1, what=f"FSDP2 --compile vs eager ({name})")


def test_lightning_adversarial_compiled_under_zero2_equals_eager(
    monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path], tmp_path: Path
) -> None:
    argv = [*_common_argv(tiny, tmp_path / "unused", lora=True), "--train_data_dir", str(tiny["images"])]
    argv += ["--stage", "4->2/conditional", "--from_base", "--gradient_accumulation_steps", "2"]
    out = _eager_and_compiled(monkeypatch, "sdxl_lightning", argv, tmp_path, "zero2")
    ckpt = out["eager"] / "checkpoint-1"
    # ZeRO-2 keeps whole weights in each engine's model states: the student's LoRA and D at step 1.
    unet = torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    step1 = {"unet." + k.replace(".default", ""): v for k, v in unet.items() if "lora_" in k}
    name = "pytorch_lora_weights.safetensors"
    eager, compiled = _load(out["eager"] / name), _load(out["compiled"] / name)
    assert eager and eager.keys() == compiled.keys()
    assert_same_update(compiled, eager, step1, what="ZeRO-2 --compile vs eager (student)")
    disc = torch.load(ckpt / "pytorch_model_1" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    name = "discriminator/discriminator.safetensors"
    eager, compiled = _load(out["eager"] / name), _load(out["compiled"] / name)
    assert_same_update(compiled, eager, disc, what="ZeRO-2 --compile vs eager (discriminator)")


def _deepspeed(stage: int) -> Any:
    """What ``runtime.zero_stage`` reads of a DeepSpeed accelerator: its type and ``state.deepspeed_plugin``."""
    from accelerate.utils import DistributedType

    plugin = types.SimpleNamespace(get_value=lambda key, default=None: stage, selected=True)
    state = types.SimpleNamespace(deepspeed_plugin=plugin)
    return types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=state)


def test_compile_is_refused_under_zero3() -> None:
    """The scripts pass their accelerator, whose engine is checked; the benchmarks (one process) pass none."""
    import argparse

    options = load_example("training.options")
    p = argparse.ArgumentParser()
    options.add_compile_args(p)
    args = p.parse_args(["--compile", "--compile_backend", BACKEND])
    with pytest.raises(
        ValueError, match=r"--compile is not supported under DeepSpeed ZeRO-3: .* ZeRO stage 1 or 2"
    ):
        compilation.compile_networks(args, whole=(torch.nn.Linear(2, 2),), accelerator=_deepspeed(3))
    net = torch.nn.Linear(2, 2)
    assert compilation.compile_networks(args, whole=(net,), accelerator=_deepspeed(2)) == [net]
    assert compilation.compile_networks(args, whole=(torch.nn.Linear(2, 2),), accelerator=None)  # one process
    assert compilation.compile_networks(argparse.Namespace(compile=False), torch.nn.Linear(2, 2)) == []
