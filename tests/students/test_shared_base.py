"""SharedBase: one frozen base with named LoRA adapters as independent views (real score, fake score, generator).

Views against independent copies (bit for bit), gradient isolation, nested calls, gradient checkpointing, adapter
files, the peft internals SharedBase switches, bad inputs; 2-process DDP and FSDP2 (gloo) against one process.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, OptionError
from diffdistill.students import (
    AdapterView,
    SharedBase,
    add_guidance_embedding,
    add_lora,
    frozen,
    load_lora,
    merge_lora,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_transformer_block_removal import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3  # noqa: E402

from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet_config  # noqa: E402
from tests import preloaded_launch  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
# The generator adapts every LCM-LoRA target; the fake score only the attention projections (two adapters need
# not cover the same layers).
GEN_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
]
FAKE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv2"]
TRANSFORMER_GEN = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
TRANSFORMER_FAKE = ["to_q", "to_v", "add_q_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**tiny_sdxl_unet_config())


def unet_inputs(batch: int = 2, seed: int = 3) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([999, 300, 50, 700][:batch])
    ehs, added = sdxl_conditions(tiny_sdxl_unet_config(), batch, seq_len=4, generator=g)
    return (x, t), {"encoder_hidden_states": ehs, "added_cond_kwargs": added, "return_dict": False}


def family(
    name: str, seed: int = 0
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], list[str], list[str]]:
    """``(model, args, kwargs, generator targets, fake targets)`` of a tiny SDXL UNet, SD3 or FLUX transformer."""
    if name == "sdxl":
        args, kwargs = unet_inputs()
        return tiny_unet(seed), args, kwargs, GEN_TARGETS, FAKE_TARGETS
    model = tiny_sd3(seed) if name == "sd3" else tiny_flux(seed)
    x, t, cond = sd3_inputs() if name == "sd3" else flux_inputs()
    return model, (x,), {"timestep": t, **cond, "return_dict": False}, TRANSFORMER_GEN, TRANSFORMER_FAKE


def with_adapters(model: nn.Module, gen_targets: list[str], fake_targets: list[str]) -> nn.Module:
    """Random (non-zero) generator (rank 4) and fake (rank 2) adapters, so every view differs from the base."""
    torch.manual_seed(11)
    add_lora(model, rank=4, targets=gen_targets, adapter_name="generator", init_lora_weights=False)
    add_lora(model, rank=2, alpha=4.0, targets=fake_targets, adapter_name="fake", init_lora_weights=False)
    return model


def out(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "name,dtype", [("sdxl", torch.float64), ("sd3", torch.float32), ("flux", torch.float32)]
)
def test_each_view_equals_an_independent_copy_with_only_that_adapter(name: str, dtype: torch.dtype) -> None:
    model, args, kwargs, gen_t, fake_t = family(name)
    model = with_adapters(model, gen_t, fake_t).to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    kwargs = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()
    }
    if "added_cond_kwargs" in kwargs:
        kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in kwargs["added_cond_kwargs"].items()}
    copies = {}
    for keep, drop in (("generator", "fake"), ("fake", "generator")):
        ref = copy.deepcopy(model)
        ref.delete_adapters(drop)
        ref.set_adapter(keep)
        copies[keep] = ref
    plain = (tiny_unet() if name == "sdxl" else tiny_sd3() if name == "sd3" else tiny_flux()).to(dtype)
    plain.requires_grad_(False)  # as the shared base (CPU float64 kernels may differ with the flag)
    base = SharedBase(model)
    with torch.no_grad():
        for adapter, ref in copies.items():
            assert torch.equal(out(base.view(adapter)(*args, **kwargs)), out(ref(*args, **kwargs))), adapter
        real = out(base.view(None)(*args, **kwargs))
        assert torch.equal(real, out(plain(*args, **kwargs)))
        # the views differ from each other (the test is not vacuous)
        assert not torch.equal(real, out(base.view("fake")(*args, **kwargs)))
        assert not torch.equal(real, out(base.view("generator")(*args, **kwargs)))


def test_views_hold_only_their_adapter_and_share_the_parameter_objects() -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    gen, fake, real = base.view("generator"), base.view("fake"), base.view(None)
    assert base.view("fake") is fake and isinstance(gen, AdapterView)
    params = dict(model.named_parameters())
    for view, adapter in ((gen, "generator"), (fake, "fake")):
        names = dict(view.named_parameters())
        expected = {n.replace(f".{adapter}.", "."): p for n, p in params.items() if f".{adapter}." in n}
        assert set(names) == set(expected) and all(names[n] is expected[n] for n in names)
        assert list(view.state_dict()) == list(names)
    assert list(real.parameters()) == [] and list(real.state_dict()) == []
    # the base is frozen, every adapter weight trainable, the base in eval mode
    assert all(p.requires_grad == ("lora_" in n) for n, p in params.items())
    assert not model.training
    gen.train()
    assert all(m.training for m in gen.modules()) and not model.conv_in.training


def test_peft_internals_that_shared_base_switches() -> None:
    """Pins what SharedBase relies on: a tuner layer's ``active_adapters`` reads ``_active_adapter``,
    ``disable_adapters`` reads ``_disable_adapters``, and its forward runs exactly the active adapters; setting them
    changes no ``requires_grad``. A peft release that renames or changes these fails here."""
    from peft.tuners.lora import LoraLayer

    model = with_adapters(nn.Sequential(nn.Linear(3, 3)), ["0"], ["0"])
    layer = model[0]
    assert isinstance(layer, LoraLayer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(5, 3)
    base_out = layer.base_layer(x)

    def term(adapter: str) -> torch.Tensor:
        return layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.scaling[adapter]

    layer._active_adapter, layer._disable_adapters = ["fake"], False
    assert layer.active_adapters == ["fake"] and layer.disable_adapters is False
    assert torch.allclose(layer(x), base_out + term("fake"), atol=1e-6)
    layer._active_adapter = ["generator"]
    assert torch.allclose(layer(x), base_out + term("generator"), atol=1e-6)
    layer._disable_adapters = True
    assert layer.disable_adapters is True and torch.equal(layer(x), base_out)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert layer.merged_adapters == [] and "generator" in layer.lora_dropout


def test_switching_never_touches_requires_grad_and_restores_the_state() -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    base.view("fake").requires_grad_(False)  # e.g. a frozen fake score in the generator's step
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    args, kwargs = unet_inputs()
    layer = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        base.view("generator")(*args, **kwargs)
        with base.active("fake"):
            assert layer.active_adapters == ["fake"] and not layer.disable_adapters
            with base.active(None):
                assert layer.disable_adapters
                base.view("generator")(*args, **kwargs)
                assert layer.disable_adapters
            assert layer.active_adapters == ["fake"] and not layer.disable_adapters
        assert layer.disable_adapters  # outside any call: every adapter off
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_view_called_inside_another_views_forward_does_not_change_it() -> None:
    """Re-entrant calls: a hook inside the generator's forward runs the fake score and the real score (as a
    discriminator's feature extractor could); the generator's output is unchanged."""
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    args, kwargs = unet_inputs()
    with torch.no_grad():
        expected = out(base.view("generator")(*args, **kwargs))
        fake_expected = out(base.view("fake")(*args, **kwargs))
    inner: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: Any) -> None:
        if base._state == "generator":
            inner.append(out(base.view("fake")(*args, **kwargs)))
            base.view(None)(*args, **kwargs)

    handle = model.mid_block.register_forward_pre_hook(hook)
    with torch.no_grad():
        nested = out(base.view("generator")(*args, **kwargs))
    handle.remove()
    assert torch.equal(nested, expected) and len(inner) == 1 and torch.equal(inner[0], fake_expected)


def test_gradients_reach_only_the_adapter_being_trained() -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    gen, fake, real = base.view("generator"), base.view("fake"), base.view(None)
    (x, t), kwargs = unet_inputs()
    base_params = {n: p for n, p in model.named_parameters() if "lora_" not in n}

    # a generator loss: generator adapter only
    out(gen(x, t, **kwargs)).square().mean().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(gen).values())
    assert all(g is None for g in grads(fake).values()) and all(p.grad is None for p in base_params.values())
    gen.zero_grad(set_to_none=True)

    # the SIM pattern: x_gen = gen(z); loss = f(real(x_gen), fake(x_gen)); the fake score frozen as the scripts do
    z = x.clone().requires_grad_(True)
    x_gen = out(gen(z, t, **kwargs))
    with frozen(fake):  # backward inside the block, as AlternatingUpdate does
        loss = (out(real(x_gen, t, **kwargs)) - out(fake(x_gen, t, **kwargs))).square().mean()
        loss.backward()
    assert all(g is not None for g in grads(gen).values()) and z.grad is not None
    assert all(g is None for g in grads(fake).values()) and all(p.grad is None for p in base_params.values())
    gen.zero_grad(set_to_none=True)

    # the fake-score loss on detached samples: fake adapter only
    out(fake(x_gen.detach(), t, **kwargs)).square().mean().backward()
    assert all(g is not None for g in grads(fake).values())
    assert all(g is None for g in grads(gen).values()) and all(p.grad is None for p in base_params.values())


def test_alternating_steps_train_both_adapters_and_never_the_base() -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    gen, fake, real = base.view("generator"), base.view("fake"), base.view(None)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    gen_before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    fake_before = {n: p.detach().clone() for n, p in fake.named_parameters()}
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-3)
    (x, t), kwargs = unet_inputs()
    for _ in range(2):
        x_gen = out(gen(x, t, **kwargs))
        with frozen(fake):
            loss_g = (out(real(x_gen, t, **kwargs)) - out(fake(x_gen, t, **kwargs))).square().mean()
            loss_g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        fake_before_step = {n: p.detach().clone() for n, p in fake.named_parameters()}
        out(fake(x_gen.detach(), t, **kwargs)).sub(x).square().mean().backward()
        assert all(p.grad is None for p in gen.parameters())
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        assert any(not torch.equal(p, fake_before_step[n]) for n, p in fake.named_parameters())
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert all(not torch.equal(p, gen_before[n]) for n, p in gen.named_parameters())
    assert all(not torch.equal(p, fake_before[n]) for n, p in fake.named_parameters())


def sim_grads(base: SharedBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Gradients of a SIM-like generator loss (generator adapter and input) and of a fake-score loss."""
    gen, fake, real = base.view("generator"), base.view("fake"), base.view(None)
    x = args[0].clone().requires_grad_(True)
    x_gen = out(gen(x, *args[1:], **kwargs))
    with frozen(
        fake
    ):  # backward inside: a checkpointed recomputation needs the forward's requires_grad flags
        loss = (out(real(x_gen, *args[1:], **kwargs)) - out(fake(x_gen, *args[1:], **kwargs))).square().mean()
        loss.backward()
    result = {"input": x.grad, **{"gen." + n: g for n, g in grads(gen).items()}}
    gen.zero_grad(set_to_none=True)
    out(fake(x_gen.detach(), *args[1:], **kwargs)).square().mean().backward()
    result.update({"fake." + n: g for n, g in grads(fake).items()})
    fake.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients_for_each_view(name: str) -> None:
    """Checkpointed blocks are recomputed in backward under the adapter of their forward: same gradients as
    without checkpointing. Both paths run the same float32 operations (the recomputation repeats the forward);
    only the order in which autograd accumulates a gradient may differ, a rounding of a few ulps of the largest
    accumulated term: the tolerance is 64 float32 ulps of each gradient's largest entry."""
    model, args, kwargs, gen_t, fake_t = family(name)
    base = SharedBase(with_adapters(model, gen_t, fake_t))
    plain = sim_grads(base, args, kwargs)
    base.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    ckpt = sim_grads(base, args, kwargs)
    assert set(plain) == set(ckpt) and len(plain) > 3
    for key, g in plain.items():
        assert g is not None and ckpt[key] is not None, key
        torch.testing.assert_close(ckpt[key], g, rtol=0, atol=64 * EPS32 * float(g.abs().max()), msg=key)


def test_feature_extractor_under_an_adapter_keeps_the_shared_checkpointing() -> None:
    """DMD2's GAN heads read the fake score's blocks (``base.active("fake")``) through a
    TransformerFeatureExtractor with ``gradient_checkpointing=None``: the shared base's checkpointing stays in
    force, so each block before the last readout is recomputed in backward, under the fake adapter: the fake
    adapter's gradients equal those without checkpointing (64 float32 ulps of each gradient's largest entry).
    ``False`` switches checkpointing off for the call (one run per block)."""
    from diffdistill.discriminators import TransformerFeatureExtractor

    model, _, _, gen_t, fake_t = family("flux")
    base = SharedBase(with_adapters(model, gen_t, fake_t))
    x, t, cond = flux_inputs()
    block = model.get_submodule("transformer_blocks.1")

    def run(setting: bool | None) -> tuple[dict[str, torch.Tensor | None], int]:
        calls = [0]
        handle = block.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        ext = TransformerFeatureExtractor(model, (0, 3), gradient_checkpointing=setting)
        view = base.view("fake")
        view.zero_grad(set_to_none=True)
        with base.active("fake"):
            feats = ext(x, grid_size=(4, 4), timestep=t, **cond)
        sum(f.square().mean() for f in feats.values()).backward()
        handle.remove()
        return grads(view), calls[0]

    plain, calls_plain = run(None)
    base.enable_gradient_checkpointing()
    ckpt, calls_ckpt = run(None)
    _, calls_off = run(False)
    assert (calls_plain, calls_ckpt, calls_off) == (1, 2, 1)
    reached = {k for k, g in plain.items() if g is not None}  # blocks after the last readout do not run
    assert reached == {k for k, g in ckpt.items() if g is not None} and len(reached) > 3
    for key in reached:
        g = plain[key]
        torch.testing.assert_close(ckpt[key], g, rtol=0, atol=64 * EPS32 * float(g.abs().max()), msg=key)


def test_double_backward_through_checkpointed_views_recomputes_each_block_twice() -> None:
    """Exact R1 (``autograd.grad(..., create_graph=True)``, then ``backward``) recomputes a checkpointed block once
    per backward: the recomputation context must be re-enterable. The penalty's gradients in the adapter equal
    those without checkpointing (64 float32 ulps of each gradient's largest entry, as above), the base's adapter
    state is back to "none" afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def r1_grads(base: SharedBase) -> dict[str, torch.Tensor | None]:
        (x, t), kwargs = unet_inputs(batch=1)
        x = x.requires_grad_(True)
        view = base.view("fake")
        view.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            (g,) = torch.autograd.grad(out(view(x, t, **kwargs)).square().sum(), x, create_graph=True)
            g.square().sum().backward()
        return grads(view)

    base = SharedBase(with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS))
    plain = r1_grads(base)
    base.enable_gradient_checkpointing()
    ckpt = r1_grads(base)
    assert base._state is None
    assert set(plain) == set(ckpt) and len(plain) > 3
    for key, g in plain.items():
        assert g is not None and ckpt[key] is not None, key
        torch.testing.assert_close(ckpt[key], g, rtol=0, atol=64 * EPS32 * float(g.abs().max()), msg=key)


def test_checkpointing_switched_on_by_the_model_is_refused() -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    model.enable_gradient_checkpointing()
    args, kwargs = unet_inputs()
    with pytest.raises(OptionError, match=r"base.enable_gradient_checkpointing\(\) instead"):
        base.view("generator")(*args, **kwargs)


def test_each_adapter_is_saved_alone_and_reproduces_the_views_in_a_fresh_base(tmp_path: Path) -> None:
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    args, kwargs = unet_inputs()
    for adapter in ("generator", "fake"):
        base.view(adapter).save(tmp_path / f"{adapter}.safetensors")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "fake.safetensors")
    assert set(saved) == {"unet." + k for k in base.view("fake").state_dict()}
    fresh_model = tiny_unet()
    for adapter in ("generator", "fake"):
        load_lora(fresh_model, tmp_path / f"{adapter}.safetensors", adapter_name=adapter)
    fresh = SharedBase(fresh_model)
    # and through the views' state dicts (what accelerate's save_state writes per prepared view)
    other = SharedBase(with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS))
    with torch.no_grad():
        for p in other.view("generator").parameters():
            p.add_(1.0)
    other.view("generator").load_state_dict(base.view("generator").state_dict())
    with torch.no_grad():
        for adapter in ("generator", "fake", None):
            expected = out(base.view(adapter)(*args, **kwargs))
            assert torch.equal(out(fresh.view(adapter)(*args, **kwargs)), expected), adapter
        assert torch.equal(
            out(other.view("generator")(*args, **kwargs)), out(base.view("generator")(*args, **kwargs))
        )
    # a gathered state dict (as accelerator.get_state_dict(view) returns) saves the same file
    base.view("fake").save(tmp_path / "gathered.safetensors", state_dict=base.view("fake").state_dict())
    again = load_file(tmp_path / "gathered.safetensors")
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_adapters_option_adds_them_and_refuses_bad_entries() -> None:
    base = SharedBase(
        tiny_unet(), adapters={"generator": {"rank": 2}, "fake": {"rank": 2, "targets": ["to_q"]}}
    )
    assert base.adapter_names == ("fake", "generator")
    assert "SharedBase(UNet2DConditionModel" in repr(base) and "adapter='fake'" in repr(base.view("fake"))
    with pytest.raises(DTypeError, match="`adapters` to be a mapping"):
        SharedBase(tiny_unet(), adapters=["fake"])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`adapters\['fake'\]` to be a mapping"):
        SharedBase(tiny_unet(), adapters={"fake": 64})  # type: ignore[dict-item]
    with pytest.raises(OptionError, match="other than adapter_name and freeze_base"):
        SharedBase(tiny_unet(), adapters={"fake": {"adapter_name": "x"}})
    with pytest.raises(OptionError, match="non-empty string without"):
        SharedBase(tiny_unet(), adapters={"a.b": {"rank": 2}})


def test_bad_models_and_names_are_refused() -> None:
    with pytest.raises(DTypeError, match=r"`model` to be a torch\.nn\.Module"):
        SharedBase("unet")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="to have LoRA adapters, but it has none"):
        SharedBase(tiny_unet())
    base = SharedBase(with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS))
    with pytest.raises(OptionError, match=r"one of the model's adapters \['fake', 'generator'\]"):
        base.view("critic")
    with pytest.raises(OptionError, match="one of the model's adapters"), base.active("critic"):
        pass
    with pytest.raises(DTypeError, match="`adapter_name` to be a string"):
        base.view(0)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match="`base` to be a SharedBase"):
        AdapterView(object(), "fake")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="view of None"):
        base.view(None).save("x.safetensors")
    with pytest.raises(OptionError, match=r"has none\. Checkpoint its blocks yourself"):
        SharedBase(
            nn.Sequential(nn.Linear(2, 2)), adapters={"g": {"rank": 1, "targets": ["0"]}}
        ).enable_gradient_checkpointing()
    with pytest.raises(OptionError, match="other than `ignored_params`"):
        base.fully_shard(ignored_params=set())
    if not torch.distributed.is_initialized():
        with pytest.raises(OptionError, match="Expected an initialised process group"):
            base.fully_shard()
    embedding = nn.ModuleDict({"emb": nn.Embedding(4, 2), "lin": nn.Linear(2, 2)})
    with pytest.raises(OptionError, match="adapts an embedding"):
        SharedBase(embedding, adapters={"g": {"rank": 1, "targets": ["emb"]}})
    guided = add_guidance_embedding(tiny_unet(), 8)
    with pytest.raises(OptionError, match="no guidance embedding trained with the adapters"):
        SharedBase(guided, adapters={"g": {"rank": 2}})


def test_views_of_removed_or_merged_adapters_are_refused() -> None:
    args, kwargs = unet_inputs()
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    fake = base.view("fake")
    model.delete_adapters("fake")
    with pytest.raises(OptionError, match="deleted or merged since"):
        fake(*args, **kwargs)
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    model.down_blocks[1].attentions[0].proj_in.merge(adapter_names=["generator"])
    with pytest.raises(OptionError, match=r"adapter\(s\) \['generator'\] are merged"):
        base.view("fake")(*args, **kwargs)
    model = with_adapters(tiny_unet(), GEN_TARGETS, FAKE_TARGETS)
    base = SharedBase(model)
    merge_lora(model)
    with pytest.raises(OptionError, match=r"LoRA layers, but they were removed"):
        base.view(None)(*args, **kwargs)


# ---- 2 processes (gloo, CPU): DDP and FSDP2 through accelerate, against one process on the whole batch ----

WORKER = Path(__file__).with_name("shared_base_worker.py")


def _launch(mode: str, out_dir: Path) -> None:
    """The worker on 2 processes, forked from the preloaded server (``tests/preloaded_launch.py``): DDP with the
    environment of ``accelerate launch --multi_gpu``, FSDP2 as ``torchrun sharded_cpu_launch.py`` runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if mode == "fsdp2":
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    argv = [str(out_dir), *(["--shard_base"] if mode == "fsdp2" else [])]
    code, output = preloaded_launch.launch_script(WORKER, argv, env, sharded=mode == "fsdp2")
    assert code == 0, output[-6000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_train_the_adapters_as_one_process_on_the_whole_batch(
    mode: str, tmp_path: Path
) -> None:
    """Two views prepared separately (``accelerator.prepare(gen, opt_g)``, ``accelerator.prepare(fake, opt_f)``;
    FSDP2: with the frozen base sharded by ``SharedBase.fully_shard``, then restored into a replicated one),
    alternating SGD steps on 2 processes x half the batch against one process on the whole batch (written by the
    worker). The gradient of a mean over the batch is the mean of the two half-batch gradients: the paths differ
    only in float32 summation order, a relative error of a few hundred ulps of the gradient (the loss sums 2 x 4 x
    16 x 16 terms); after the steps that is a fraction 1e-4 of the total change of each adapter tensor plus
    rounding of the weights themselves (4 ulps)."""
    _launch(mode, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = torch.load(tmp_path / "reference.pt")
    for rank in ranks:
        assert rank["kind"] == ("FSDP" if mode == "fsdp2" else "MULTI_CPU"), rank["kind"]
        assert rank["base_unchanged"] and rank["shared"]
        assert rank["sharded"] == rank["base_sharded"] == (mode == "fsdp2")
        for adapter in ("generator", "fake"):
            got, want, start = rank[adapter], ref[adapter], ref[adapter + "_start"]
            assert set(got) == set(want) and len(got) > 4
            for key, value in want.items():
                change = float((value - start[key]).abs().max())
                assert change > 0, key
                tol = 1e-4 * change + 4 * EPS32 * float(value.abs().max())
                torch.testing.assert_close(got[key], value, rtol=0, atol=tol, msg=f"{adapter} {key}")
        # the checkpoint written by save_state and read back by load_state into a fresh base
        for adapter in ("generator", "fake"):
            loaded = rank["loaded_" + adapter]
            assert all(torch.equal(loaded[k], rank[adapter][k]) for k in rank[adapter])
        assert torch.equal(rank["loaded_output"], rank["output"])
    assert ranks[0]["saved_file"]  # the generator adapter saved alone from the gathered state dict
    for adapter in ("generator", "fake"):  # identical on both ranks
        assert all(torch.equal(ranks[0][adapter][k], ranks[1][adapter][k]) for k in ranks[0][adapter])
