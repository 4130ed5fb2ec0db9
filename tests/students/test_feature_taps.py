"""FeatureTap: module resolution, shapes on a tiny SDXL-structured UNet, hook removal, checkpointing, DDP."""

from __future__ import annotations

import copy
import importlib
import os
import sys
import tempfile

import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, OptionError
from diffdistill.students import FeatureTap, in_backward_pass, resolve_module_names
from tests import preloaded_launch

TINY_SDXL = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}


def tiny_unet(seed: int = 0) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")  # imported lazily: the DDP workers do not need it
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_SDXL)


def unet_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([999, 250][:batch])
    cond = {
        "encoder_hidden_states": torch.randn(batch, 3, 32, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g),
        },
    }
    return x, t, cond


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on a shared 2-core machine are ~50x slower for these tiny UNets."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_capture_expected_modules_and_shapes_and_leave_no_hooks() -> None:
    unet = tiny_unet()
    x, t, cond = unet_inputs()
    patterns = [
        "down_blocks.*.attentions.*",
        "down_blocks.*.resnets.*",
        "mid_block",
        "up_blocks.0.attentions.*.transformer_blocks.*",
        "up_blocks.*",
    ]
    with FeatureTap(unet, patterns) as tap:
        assert hook_count(unet) == len(tap) > 0
        unet(x, t, **cond)
        feats = tap.pop()
        assert tap.pop() == {}  # nothing kept after the step
    assert hook_count(unet) == 0 and tap.closed
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    expected = {
        "down_blocks.0.resnets.0": (2, 32, 16, 16),
        "down_blocks.0.resnets.1": (2, 32, 16, 16),
        "down_blocks.1.resnets.0": (2, 64, 8, 8),
        "down_blocks.1.resnets.1": (2, 64, 8, 8),
        "down_blocks.1.attentions.0": (2, 64, 8, 8),
        "down_blocks.1.attentions.1": (2, 64, 8, 8),
        "mid_block": (2, 64, 8, 8),
        "up_blocks.0": (2, 64, 16, 16),  # the up block output includes its upsampler
        "up_blocks.1": (2, 32, 16, 16),
        **{
            f"up_blocks.0.attentions.{a}.transformer_blocks.{b}": (2, 64, 64)
            for a in range(3)
            for b in range(2)
        },
    }
    assert shapes == expected
    # Glob '*' stays within one component: no sub-modules of the resnets were tapped.
    assert not any(k.count(".") > 3 and "transformer_blocks" not in k for k in shapes)


def test_tuple_outputs_give_element_zero() -> None:
    unet = tiny_unet()
    x, t, cond = unet_inputs()
    inner = {}
    handle = unet.down_blocks[1].register_forward_hook(lambda m, a, o: inner.update(out=o))
    with FeatureTap(unet, ["down_blocks.1"]) as tap:
        unet(x, t, **cond)
        feats = tap.pop()
    handle.remove()
    assert isinstance(inner["out"], tuple)
    assert feats["down_blocks.1"] is inner["out"][0]


def test_resolution_rules_and_errors() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    assert resolve_module_names(net, "*") == ["0", "1"]
    assert resolve_module_names(net, "**") == ["0", "0.0", "0.1", "1"]
    assert resolve_module_names(net, ["0.*", "1"]) == ["0.0", "0.1", "1"]
    with pytest.raises(
        OptionError, match=r"Expected '0\.2' in `patterns` to name a sub-module of Sequential.*Close names"
    ):
        resolve_module_names(net, "0.2")
    with pytest.raises(OptionError, match=r"pattern 'x\.\*' in `patterns` to match at least one module"):
        resolve_module_names(net, "x.*")
    with pytest.raises(OptionError, match=r"name exactly one module, but it matched 2"):
        FeatureTap(net, {"a": "0.*"})
    with pytest.raises(
        TypeError, match=r"Expected every entry of `patterns` to be a module name \(str\), but got int 1"
    ):
        resolve_module_names(net, [1])  # type: ignore[list-item]


def test_mapping_keys_detach_clear_and_repr() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    tap = FeatureTap(net, {"hidden": "0"}, detach=True)
    net(torch.randn(4, 2))
    assert tap.calls == {"hidden": 1}
    assert not tap.features["hidden"].requires_grad
    assert "recorded=['hidden']" in repr(tap)
    tap.clear()
    assert tap.features == {} and tap.calls == {"hidden": 0}
    tap.close()
    tap.close()  # idempotent
    net(torch.randn(4, 2))
    assert tap.features == {} and "closed" in repr(tap)


def test_unwraps_dataparallel_and_compile_wrappers() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(net, backend="eager")
    assert resolve_module_names(compiled, "*") == ["0"]
    with FeatureTap(nn.DataParallel(net), ["0"]) as tap:
        nn.DataParallel(net)(torch.randn(3, 2))
        assert tuple(tap.pop()["0"].shape) == (3, 2)
    assert hook_count(net) == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_records_once_with_same_features(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    plain = tiny_unet()
    ckpt = copy.deepcopy(plain)
    if reentrant:  # recomputation runs inside backward() and fires the forward hooks again
        ckpt.enable_gradient_checkpointing(lambda m, *a: checkpoint(m.__call__, *a, use_reentrant=True))
    else:  # diffusers' default
        ckpt.enable_gradient_checkpointing()
    x, t, cond = unet_inputs()
    names = [
        "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.1.transformer_blocks.1",
        "up_blocks.0.resnets.2",
    ]
    seen_in_backward: list[bool] = []
    recorder = (
        ckpt.down_blocks[1]
        .resnets[0]
        .register_forward_hook(lambda *a: seen_in_backward.append(in_backward_pass()))
    )
    with FeatureTap(plain, names) as tap_p, FeatureTap(ckpt, names) as tap_c:
        plain(x, t, **cond).sample.square().mean().backward()
        out = ckpt(x, t, **cond).sample
        feats_c_forward = tap_c.features
        out.square().mean().backward()
        if reentrant:
            assert seen_in_backward == [False, True]
        assert tap_c.calls == dict.fromkeys(names, 1)
        feats_p, feats_c = tap_p.pop(), tap_c.pop()
    recorder.remove()
    for name in names:
        assert feats_c[name] is feats_c_forward[name]  # not replaced by a recomputation
        torch.testing.assert_close(feats_c[name], feats_p[name])
    if not reentrant:  # features inside non-reentrant checkpoints keep their autograd graph
        assert all(feats_c[n].requires_grad for n in names)
    # Checkpointing recomputes the same forward with the same kernels on the same inputs: the gradients are
    # equal up to the order in which autograd accumulates them (a few float32 ulps, hence rtol 1e-5); a tap
    # that altered the recomputed activations would change them by a fraction of their own size.
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, atol=1e-6, rtol=1e-5)


def _tap_worker_module():  # type: ignore[no-untyped-def]
    """Import the DDP worker by its top-level name, so spawned children (which inherit sys.path) find it."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("ddp_tap_worker")


def test_ddp_two_processes_same_features_as_plain_model() -> None:
    worker = _tap_worker_module()
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        # forked from the preloaded server (which only imported), not from this process: a forked child cannot
        # run autograd once its parent (a pytest worker that already ran backward passes) started autograd's threads.
        preloaded_launch.start_workers(worker.run_worker, (2, init_file, out_dir), 2)
        for rank in range(2):
            res = torch.load(f"{out_dir}/{rank}.pt", weights_only=True)
            assert res["hooks"] == 0
            assert sorted(res["calls"]) == ["blocks.0", "blocks.1", "head"]
            assert set(res["calls"].values()) == {1}
            for name, ref in res["ref"].items():
                torch.testing.assert_close(res["feats"][name], ref)


def test_ddp_wrapped_unet_single_process_group_same_features() -> None:
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            unet = tiny_unet()
            ddp = nn.parallel.DistributedDataParallel(unet)
            x, t, cond = unet_inputs()
            names = ["down_blocks.1.attentions.0", "mid_block", "up_blocks.1.resnets.2"]
            with FeatureTap(ddp, names) as tap:
                ddp(x, t, **cond).sample.mean().backward()
                feats = tap.pop()
                assert set(tap.calls.values()) == {1}
            assert hook_count(unet) == 0
        finally:
            dist.destroy_process_group()
    plain = tiny_unet()
    with torch.no_grad(), FeatureTap(plain, names) as tap_plain:
        plain(x, t, **cond)
        ref = tap_plain.pop()
    for name in names:
        torch.testing.assert_close(feats[name], ref[name])


def test_copies_made_after_the_tap_do_not_record() -> None:
    # EMA and X0Conversion deep-copy the model, which copies its forward hooks: the copy's forward must
    # neither overwrite the tapped features nor count as a call.
    from diffdistill.students import EMA

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with FeatureTap(net, ["0"]) as tap:
        x = torch.randn(3, 4)
        net(x)
        copied = copy.deepcopy(net)
        ema = EMA(net, decay=0.9)
        with torch.no_grad():
            copied[0].weight.add_(1.0)
        copied(torch.randn(3, 4))
        ema(torch.randn(3, 4))
        assert tap.calls == {"0": 1}
        torch.testing.assert_close(tap.pop()["0"], net[0](x))


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---


@pytest.mark.parametrize(
    ("model", "modules", "kwargs", "error", "match"),
    [
        (None, ["0"], {}, DTypeError, r"Expected `model` to be a torch.nn.Module, but got NoneType"),
        ("net", None, {}, DTypeError, r"Expected `modules` to be a module name or a list of names"),
        ("net", 0, {}, DTypeError, r"Expected `modules` to be a module name or a list .* but got int"),
        ("net", [], {}, OptionError, r"Expected `modules` to name at least one module, but it is empty"),
        (
            "net",
            {},
            {},
            OptionError,
            r"Expected `modules` to name at least one module, but the mapping is empty",
        ),
        (
            "net",
            {"a": 0},
            {},
            DTypeError,
            r"Expected `modules` to map keys to module names \(str\), but key 'a'",
        ),
        ("net", ["0", 1], {}, DTypeError, r"Expected every entry of `modules` to be a module name \(str\)"),
        ("net", ["9"], {}, OptionError, r"Expected '9' in `modules` to name a sub-module of Sequential"),
        ("net", ["0"], {"detach": "yes"}, DTypeError, r"Expected `detach` to be True or False, but got str"),
    ],
)
def test_feature_tap_refuses_bad_arguments(model, modules, kwargs, error, match) -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(error, match=match):
        FeatureTap(net if model == "net" else model, modules, **kwargs)
    assert all(not m._forward_hooks for m in net.modules())


def test_resolve_module_names_refuses_bad_arguments() -> None:
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got NoneType"):
        resolve_module_names(None, "0")  # type: ignore[arg-type]
    with pytest.raises(
        DTypeError, match=r"Expected `patterns` to be a module name or a list .* got NoneType"
    ):
        resolve_module_names(nn.Linear(2, 2), None)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"Expected `patterns` to name at least one module"):
        resolve_module_names(nn.Linear(2, 2), [])


def test_a_module_without_tensor_output_is_named() -> None:
    class NoTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    net = nn.Sequential(NoTensor())
    with FeatureTap(net, ["0"]), pytest.raises(DTypeError, match=r"module '0' to return a tensor"):
        net(torch.zeros(1))
