"""``--compile`` in the example scripts (examples/training/compilation.py): tiny runs, compiled == eager.

The compiled runs use dynamo with its ``eager`` backend: dynamo captures each block as a graph, guards it and
recompiles it exactly as with inductor (adapter switches, grad mode, shapes -- what can break or explode), but
the graphs run as captured, without AOT autograd or code generation. Our choice (why): ``aot_eager`` (AOT
autograd's joint graphs too) costs 45-90 s per script on the 2-core test machine against ~15-40 s here, over
the suite's budget (both tests below pass with it, run by hand: 147 s); inductor's numerics are for the GPU
session (``benchmarks/gpu_sdxl.py --compile``). Two scripts, the shared-base ones, where a whole-model compile
breaks: ``sdxl_sim.py --shared_base`` (LoRA generator and fake score on one SDXL UNet) and ``flow_dmd2.py``
(the same on one FLUX transformer). The plain-LoRA SDXL scripts compile the same blocks with fewer adapter
states; ``sdxl_sim`` with three UNets passed once (35 s) and is left out of the suite for time. Compared:

* The first step's losses (before any update). dynamo's ``eager`` backend runs the captured torch calls in
  order, so they agree to the bit; the bound allows float32 reordering as a graph compiler may do it, a few ulps
  per op, ``~k · 2^-24`` relative after ``k`` dependent ops. A loss here runs two network calls in sequence
  (generator, then the scores), each under 500 dependent ops (12 blocks of ~35 captured ops, plus glue), so
  ``k < 1000``: ``1000 · 2^-24 ≈ 6e-5``. A missed adapter switch or a block recomputed under the wrong adapter
  changes the loss by O(1) of its size.
* The weights after two steps, against the size of the second step's update (from the step-1 checkpoint;
  :func:`tests.state_compare.assert_same_update`: last-bit gradient changes move Adam's sign-like early updates by
  at most ~1e-3 of the update; bound 1e-2).
* dynamo's recompiles: the compiled run fails on reaching the recompile limit ``compile_networks`` sets
  (``fail_on_recompile_limit_hit``: no block falls back to eager; dynamo's default limit of 8 is hit by these
  runs), and its counters show no graph break.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.example_modules import load_example
from tests.examples.tiny_flow import smoke_argv, write_tiny_flow_models
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

BACKEND = "eager"  # dynamo capture, guards and recompiles without code generation (module docstring)
REL_LOSS = 1000 * 2.0**-24  # float32 reordering over < 1000 dependent ops (module docstring)


_load = load_example


compilation = _load("training.compilation")
loop = _load("training.loop")
options = _load("training.options")
TRAIN_LOOP = loop.train_loop  # the original, wrapped afresh by each run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL and FLUX pipelines and a prompt file."""
    root = tmp_path_factory.mktemp("tiny_compile")
    models = write_tiny_flow_models(root / "flow")
    return {**models, "sdxl": save_tiny_sdxl_pipeline(root / "sdxl", seed=0)}


def _sdxl_argv(tiny: dict[str, Path], *extra: str) -> list[str]:
    return [
        *("--pretrained_model_name_or_path", str(tiny["sdxl"]), "--prompts_file", str(tiny["prompts"])),
        *(
            "--resolution",
            "64",
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "1",
        ),
        *("--learning_rate", "1e-3", "--report_to", "none", "--seed", "3"),
        *("--use_lora", "--lora_rank", "4", "--gradient_checkpointing", *extra),
    ]


def _load_lora(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {prefix + k: v for k, v in load_file(str(path)).items()}


def _run(
    monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str], out: Path, prefix: str
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run a script into ``out``; return its per-step logs, its final LoRA and the LoRA of its step-1 checkpoint."""
    logs: list[dict[str, float]] = []

    def recording(accelerator: Any, args: Any, start: int, train_step: Any, *a: Any, **kw: Any) -> Any:
        def step(gen: torch.Generator, i: int) -> Any:
            result = train_step(gen, i)
            logs.append(loop.scalar_logs(result or {}))
            return result

        return TRAIN_LOOP(accelerator, args, start, step, *a, **kw)

    monkeypatch.setattr(loop, "train_loop", recording)
    script = _load(name)
    script.main(script.parse_args([*argv, "--output_dir", str(out)]))
    step1 = _load_lora(out / "checkpoint-1" / "unet_lora.safetensors", prefix)
    return logs, _load_lora(out / "pytorch_lora_weights.safetensors"), step1


def _compare(
    monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str], tmp_path: Path, prefix: str
) -> None:
    """Eager run, then the compiled run: same losses at step 1, same update at step 2, bounded compiles."""
    import torch._dynamo

    eager_logs, eager, eager_step1 = _run(monkeypatch, name, argv, tmp_path / "eager", prefix)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_argv = [*argv, "--compile", "--compile_backend", BACKEND]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a fallback to eager fails the run
        compiled_logs, compiled, _ = _run(monkeypatch, name, compiled_argv, tmp_path / "compiled", prefix)
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    torch._dynamo.reset()
    assert len(eager_logs) == len(compiled_logs) == 2
    for key, value in eager_logs[0].items():
        assert compiled_logs[0][key] == pytest.approx(value, rel=REL_LOSS, abs=1e-12), key
    # Step 2 moves every LoRA matrix (step 1 moves only B: A's gradient is 0 while B = 0).
    assert_same_update(compiled, eager, eager_step1, what=f"{name} --compile vs eager")
    graphs = counters.get("stats", {}).get("unique_graphs", 0)
    assert graphs >= 2, counters  # the blocks were compiled
    assert not counters.get("graph_break"), counters  # each block is one graph
    # Every graph is a compiled block's (no glue, no whole network): at most the limit per block class.
    assert graphs <= torch._dynamo.config.recompile_limit * len(compilation.REGIONS), counters


def test_sdxl_sim_shared_base_compiled_equals_eager(
    monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """ONE SDXL UNet: generator and fake-score adapter views, real score = adapters off; the checkpointed blocks
    recompute under their adapter (the checkpoint's ``context_fn``), calling the compiled blocks."""
    argv = _sdxl_argv(tiny, "--loss", "sim", "--shared_base")
    _compare(monkeypatch, "sdxl_sim", argv, tmp_path, "unet.")


def test_flow_dmd2_compiled_equals_eager(
    monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """FLUX (dual- and single-stream blocks) on one shared base: generator and fake-score adapters, teacher = none."""
    argv = smoke_argv(tiny, "flux", tmp_path / "unused", "--lora_rank", "4", "--gradient_checkpointing")
    _compare(monkeypatch, "flow_dmd2", [*argv, "--generator_every", "1"], tmp_path, "transformer.")


def test_flow_dmd2_on_wan_a14b_compiled_equals_eager(
    monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Wan 2.2 A14B's two experts on one shared base (``WanExperts`` splits each batch between them, so a block
    sees sub-batches of varying size): the blocks of both experts compile, the losses and both experts' updates are
    eager's."""
    import torch._dynamo

    from tests.examples.tiny_flow import save_tiny_wan_pipeline

    models = {"wan": save_tiny_wan_pipeline(tmp_path / "a14b", variant="a14b"), "prompts": tiny["prompts"]}
    argv = smoke_argv(models, "wan", tmp_path / "unused", "--lora_rank", "4", "--gradient_checkpointing")
    argv += ["--num_frames", "5", "--generator_every", "1", "--fake_sigma_range", "0.8", "0.95"]

    def both_experts(out: Path) -> dict[str, torch.Tensor]:  # the two LoRA files under the WanExperts names
        low = _load_lora(out / "pytorch_lora_weights_transformer_2.safetensors")
        high = _load_lora(out / "pytorch_lora_weights.safetensors")
        return {**high, **{k.replace("transformer.", "transformer_2.", 1): v for k, v in low.items()}}

    eager_logs, _, step1 = _run(monkeypatch, "flow_dmd2", argv, tmp_path / "eager", "")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_argv = [*argv, "--compile", "--compile_backend", BACKEND]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled_logs, _, _ = _run(monkeypatch, "flow_dmd2", compiled_argv, tmp_path / "compiled", "")
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    torch._dynamo.reset()
    for key, value in eager_logs[0].items():
        assert compiled_logs[0][key] == pytest.approx(value, rel=REL_LOSS, abs=1e-12), key
    eager = both_experts(tmp_path / "eager")
    assert {k.split(".")[0] for k in eager} == {"transformer", "transformer_2"}
    assert_same_update(both_experts(tmp_path / "compiled"), eager, step1, what="A14B --compile vs eager")
    assert counters.get("stats", {}).get("unique_graphs", 0) >= 2 and not counters.get("graph_break"), (
        counters
    )


def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    from diffdistill.discriminators import tiny_sdxl_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_sdxl_unet_config())


def _compile_options(*extra: str) -> Any:
    import argparse

    p = argparse.ArgumentParser()
    options.add_compile_args(p)
    args = p.parse_args(list(extra))
    options.check_compile_args(args)
    return args


def test_compile_networks_compiles_each_block_once_in_place() -> None:
    """Nothing runs here: which modules get a compiled forward, and the recompile limit."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=8):
        _check_compiled_blocks()


def _check_compiled_blocks() -> None:
    from diffdistill.students import SharedBase, TeacherView

    assert compilation.compile_networks(_compile_options(), _tiny_unet()) == []  # no --compile: nothing
    args = _compile_options("--compile", "--compile_backend", "eager")
    unet = _tiny_unet()
    base = SharedBase(unet, adapters={"generator": {"rank": 2}, "fake": {"rank": 2}})
    keys = list(unet.state_dict())
    head = torch.nn.Linear(2, 2)
    done = compilation.compile_networks(
        args, base.view("generator"), base.view("fake"), TeacherView(unet), None, whole=(head,)
    )
    blocks = [m for m in unet.modules() if type(m).__name__ in compilation.REGIONS]
    assert {id(m) for m in done} == {id(m) for m in blocks} | {id(head)}  # each block once, the head whole
    assert len(done) == len(blocks) + 1 and all(m._compiled_call_impl is not None for m in done)
    assert unet._compiled_call_impl is None  # the UNet itself (its glue) stays eager
    assert list(unet.state_dict()) == keys  # in place: parameter names (checkpoints, prepare) unchanged
    # dynamo's default 8 compiles per block class, times the distinct resnet shapes (the most varied class), times
    # the adapter states: generator, fake, or both off (the teacher)
    resnet_shapes = {
        tuple(tuple(p.shape) for p in m.parameters()) for m in blocks if type(m).__name__ == "ResnetBlock2D"
    }
    assert len(resnet_shapes) > 1
    assert torch._dynamo.config.recompile_limit == 8 * len(resnet_shapes) * 3
    assert compilation.compile_networks(args, unet) == []  # compiled already: not again
    # FSDP2's fully_shard swaps each sharded module's class for a generated "FSDP<Name>" subclass (torch's own
    # construction, repeated here without a process group): its blocks are still found by the MRO.
    from torch.distributed.fsdp import FSDPModule

    sharded = _tiny_unet()
    for m in sharded.modules():
        if type(m).__name__ in compilation.REGIONS:
            m.__class__ = type(f"FSDP{type(m).__name__}", (FSDPModule, type(m)), {})
    renamed = [m for m in sharded.modules() if type(m).__name__.startswith("FSDP")]
    assert renamed and {id(m) for m in compilation.compile_networks(args, sharded)} == {
        id(m) for m in renamed
    }


def test_exact_r1_discriminator_stays_eager_or_is_refused() -> None:
    """Diffusion2GAN's exact R1 differentiates D's input gradient: its blocks stay eager (a copy), and a D on the
    generator's own (shared) blocks is refused with the fix."""
    from diffdistill.discriminators import MultiScaleConditionalDiscriminator
    from diffdistill.students import SharedBase

    args = _compile_options("--compile", "--compile_backend", "eager")
    unet = _tiny_unet()
    disc = MultiScaleConditionalDiscriminator(unet, norm_groups=8)  # a copy of the encoder
    done = compilation.compile_networks(args, unet, disc, double_backward=(disc,))
    assert done and all(m._compiled_call_impl is None for m in disc.modules())
    base = SharedBase(_tiny_unet(), adapters={"generator": {"rank": 2}, "discriminator": {"rank": 2}})
    shared = MultiScaleConditionalDiscriminator(base.model, backbone="shared", norm_groups=8)
    critic = _load("training.shared_critics").ActiveAdapter(shared, base, "discriminator", owns_adapter=True)
    with pytest.raises(ValueError, match=r"differentiated twice .* pass --r1_approximate_sigma"):
        compilation.compile_networks(args, base.view("generator"), critic, double_backward=(critic,))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--compile", "--compile_backend", "nope"], "Expected --compile_backend to be one of"),
        (
            ["--compile", "--compile_backend", "eager", "--compile_mode", "max-autotune"],
            "is an inductor mode",
        ),
        (["--compile_backend", "eager"], "--compile is not given: add --compile"),
    ],
)
def test_compile_options_are_checked(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _compile_options(*argv)
    assert _compile_options("--compile", "--compile_mode", "reduce-overhead").compile_backend == "inductor"


@pytest.mark.parametrize("family", ["wan", "qwen"])
def test_wan_and_qwen_blocks_are_compile_regions(family: str) -> None:
    """``--compile`` compiles every block of Wan's and Qwen-Image's transformers (their block classes are
    :data:`compilation.REGIONS`; a transformer without any would be left eager), and the compiled forward equals
    the eager one (dynamo's eager backend: the same kernels in the same order)."""
    import argparse

    from tests.tiny_wan import wan_batch
    from tests.transformer_configs import tiny_qwen_transformer_config, tiny_wan_transformer

    torch.manual_seed(0)
    if family == "wan":
        model = tiny_wan_transformer()
        x, t, cond = wan_batch()
        blocks = model.blocks

        def forward() -> torch.Tensor:
            return model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
    else:
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(**tiny_qwen_transformer_config()).eval()
        g = torch.Generator().manual_seed(0)
        tokens, text = torch.randn(2, 16, 64, generator=g), torch.randn(2, 5, 16, generator=g)
        blocks = model.transformer_blocks

        def forward() -> torch.Tensor:
            return model(
                hidden_states=tokens,
                encoder_hidden_states=text,
                timestep=torch.tensor([0.9, 0.3]),
                img_shapes=[[(1, 4, 4)]] * 2,
                return_dict=False,
            )[0]

    with torch.no_grad():
        eager = forward()
    args = argparse.Namespace(compile=True, compile_mode="default", compile_backend=BACKEND)
    torch._dynamo.reset()
    done = compilation.compile_networks(args, model)
    assert len(done) == len(blocks) > 0 and all(any(b is d for d in done) for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(forward(), eager, rtol=0, atol=0)
