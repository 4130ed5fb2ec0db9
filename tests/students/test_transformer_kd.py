"""FeatureTap / LayerKD on SD3 and FLUX transformer blocks: the image stream by name or index, gradient
checkpointing, DDP and FSDP2 (one-process gloo groups on the CPU), bad inputs."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from diffdistill.errors import DTypeError, OptionError
from diffdistill.students import (
    IMAGE_STREAM_OUTPUT,
    FeatureTap,
    LayerKD,
    build_transformer_student,
    image_stream,
    transformer_block_names,
)

diffusers = pytest.importorskip("diffusers")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_transformer_block_removal import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3  # noqa: E402


@pytest.fixture
def group() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def family(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    net = tiny_sd3(seed) if name == "sd3" else tiny_flux(seed)
    return (net, *(sd3_inputs() if name == "sd3" else flux_inputs()))


def returned_image_streams(net: nn.Module, names: list[str]) -> tuple[dict, list]:
    """What each block returned as ``hidden_states`` (element 1), recorded by plain hooks: the reference."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out[1])) for n in names
    ]
    return seen, handles


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_block_names_in_execution_order() -> None:
    assert transformer_block_names(tiny_sd3()) == tuple(f"transformer_blocks.{i}" for i in range(4))
    assert transformer_block_names(nn.DataParallel(tiny_flux())) == (
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
        "single_transformer_blocks.2",
    )
    with pytest.raises(OptionError, match="Found no transformer blocks on Linear"):
        transformer_block_names(nn.Linear(2, 2))
    assert set(IMAGE_STREAM_OUTPUT) >= {
        "JointTransformerBlock",
        "FluxTransformerBlock",
        "FluxSingleTransformerBlock",
    }


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_taps_record_the_image_stream_by_index_and_name(name: str) -> None:
    net, x, t, cond = family(name)
    blocks = transformer_block_names(net)
    seen, handles = returned_image_streams(net, blocks)
    with (
        torch.no_grad(),
        FeatureTap(net, list(range(len(blocks)))) as by_index,
        FeatureTap(net, blocks[-2:]) as by_name,
    ):
        net(x, timestep=t, **cond)
        feats, named = by_index.pop(), by_name.pop()
    for h in handles:
        h.remove()
    assert tuple(feats) == blocks and hook_count(net) == 0
    for block in blocks:  # the image tokens (16), never the text tokens (5) nor [text; image] (21)
        assert feats[block] is seen[block] and tuple(feats[block].shape) == (2, 16, 16)
    for block in blocks[-2:]:
        assert named[block] is seen[block]
    if name == "sd3":  # the context-pre-only last block returns (None, hidden_states)
        assert net.transformer_blocks[-1].context_pre_only


def test_negative_index_and_unknown_classes_keep_first_tensor() -> None:
    net, x, t, cond = family("flux")
    with torch.no_grad(), FeatureTap(net, [-1, "transformer_blocks.0.attn"]) as tap:
        net(x, timestep=t, **cond)
        feats = tap.pop()
    assert list(feats) == ["transformer_blocks.0.attn", "single_transformer_blocks.2"]
    assert tuple(feats["transformer_blocks.0.attn"].shape) == (
        2,
        16,
        16,
    )  # FluxAttention: (img, txt) -> element 0


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_gradient_checkpointing_records_once_with_the_same_features_and_gradients(name: str) -> None:
    plain, x, t, cond = family(name)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()  # diffusers' default: non-reentrant torch.utils.checkpoint
    blocks = transformer_block_names(plain)
    with FeatureTap(plain, blocks) as tap_p, FeatureTap(ckpt, blocks) as tap_c:
        plain(x, timestep=t, **cond).sample.square().mean().backward()
        out = ckpt(x, timestep=t, **cond).sample
        forward_feats = tap_c.features
        out.square().mean().backward()
        assert tap_c.calls == dict.fromkeys(blocks, 1)  # the recomputation in backward() is not recorded
        feats_p, feats_c = tap_p.pop(), tap_c.pop()
    for block in blocks:
        assert feats_c[block] is forward_feats[block] and feats_c[block].requires_grad
        torch.testing.assert_close(feats_c[block], feats_p[block])
    # Same kernels on the same inputs: gradients equal up to accumulation order (a few float32 ulps).
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        if p_plain.grad is None:
            assert p_ckpt.grad is None
        else:
            torch.testing.assert_close(p_ckpt.grad, p_plain.grad, atol=1e-6, rtol=1e-5)


def kd_step(
    student: nn.Module, teacher: nn.Module, pairs: dict, x, t, cond, target
) -> tuple[torch.Tensor, dict]:
    with LayerKD(student, teacher, pairs, normalize=True) as kd:
        loss, logs = kd(x, t, target=target, **cond)
        loss.backward()
    return loss.detach(), logs


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_layer_kd_with_a_removed_student_trains_only_the_student(name: str) -> None:
    teacher, x, t, cond = family(name)
    teacher.requires_grad_(False)
    spec = "sd3-early" if name == "sd3" else "flux-mini"
    student, report = build_transformer_student(teacher, spec, count_flops=False)
    target = torch.randn_like(x)
    loss, logs = kd_step(student, teacher, report.kd_pairs(), x, t, cond, target)
    assert torch.isfinite(loss) and set(logs) >= {f"feature/{s}" for s in report.kd_pairs().values()}
    if (
        name == "sd3"
    ):  # both kept blocks see the teacher's inputs and weights (the last one converted exactly)
        assert logs["feature/transformer_blocks.0"].item() < 1e-10
        assert logs["feature/transformer_blocks.1"].item() < 1e-10
        assert logs["output_kd"].item() > 0  # blocks 2 and 3 are missing
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.transformer_blocks[0].parameters())
    # the student's gradient-checkpointed run gives the same loss and gradients
    ckpt = copy.deepcopy(student)
    ckpt.zero_grad(set_to_none=True)
    ckpt.enable_gradient_checkpointing()
    loss_c, _ = kd_step(ckpt, teacher, report.kd_pairs(), x, t, cond, target)
    torch.testing.assert_close(loss_c, loss)
    for p, q in zip(student.parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


def test_layer_kd_passes_timestep_by_keyword_only_to_transformers() -> None:
    teacher, x, t, cond = family("flux")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.transformer_blocks[1].ff.net[2].bias.add_(0.1)
    with LayerKD(student, teacher, [1, 3]) as kd:  # block indices, resolved in both networks
        assert kd._timestep_kw == (True, True) and kd.pairs == {
            "transformer_blocks.1": "transformer_blocks.1",
            "single_transformer_blocks.1": "single_transformer_blocks.1",
        }
        _, logs = kd(x, t, **cond)
    assert logs["feature/transformer_blocks.1"].item() > 0


def test_ddp_wrapped_transformer_gives_the_plain_loss_and_gradients(group: None) -> None:
    teacher, x, t, cond = family("sd3")
    teacher.requires_grad_(False)
    student, report = build_transformer_student(teacher, "sd3-half", count_flops=False)
    twin = copy.deepcopy(student)
    target = torch.randn_like(x)
    loss_ref, _ = kd_step(student, teacher, report.kd_pairs(), x, t, cond, target)
    ddp = nn.parallel.DistributedDataParallel(twin)
    loss_ddp, _ = kd_step(ddp, teacher, report.kd_pairs(), x, t, cond, target)
    assert hook_count(twin) == 0
    torch.testing.assert_close(loss_ddp, loss_ref)
    for p, q in zip(student.parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # diffusers returns views (FLUX single blocks)
def test_fsdp2_sharded_transformer_gives_the_plain_loss_and_gradients(group: None) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    teacher, x, t, cond = family("flux")
    teacher.requires_grad_(False)
    student, report = build_transformer_student(teacher, "flux-mini", count_flops=False)
    twin = copy.deepcopy(student)
    target = torch.randn_like(x)
    loss_ref, _ = kd_step(student, teacher, report.kd_pairs(), x, t, cond, target)
    for block in [
        *twin.transformer_blocks,
        *twin.single_transformer_blocks,
    ]:  # as accelerate's FSDP2 wrap policy
        fsdp.fully_shard(block)
    fsdp.fully_shard(twin)
    loss_fsdp, _ = kd_step(twin, teacher, report.kd_pairs(), x, t, cond, target)
    torch.testing.assert_close(loss_fsdp, loss_ref)
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    for n, q in twin.named_parameters():
        if n in grads:
            full = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            torch.testing.assert_close(full, grads[n], atol=1e-6, rtol=1e-5)


def test_bad_block_indices_and_outputs_are_refused() -> None:
    net = tiny_flux()
    with pytest.raises(OptionError, match=r"Expected the block index 5 in `modules` to lie in \[0, 5\)"):
        FeatureTap(net, [5])
    with pytest.raises(OptionError, match=r"Expected the block index -6 in `layers` to lie in \[0, 5\)"):
        LayerKD(net, tiny_flux(1), [-6])
    with pytest.raises(DTypeError, match=r"Expected every entry of `modules` to be a module name \(str\)"):
        FeatureTap(net, [True])  # a bool is not an index
    assert hook_count(net) == 0

    class FluxTransformerBlock(nn.Module):  # a block of another output layout, under a known class name
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x,)

    with pytest.raises(
        DTypeError, match=r"to return its image stream as element 1 of a tuple, but got a tuple of 1"
    ):
        image_stream(FluxTransformerBlock(), (torch.zeros(1),), "module 'b'")
    wrapped = nn.Sequential(FluxTransformerBlock())
    with FeatureTap(wrapped, ["0"]), pytest.raises(DTypeError, match=r"module '0' \(FluxTransformerBlock\)"):
        wrapped(torch.zeros(1))
