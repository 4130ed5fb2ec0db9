"""TransformerFeatureExtractor reproduces the image stream of SD3 / FLUX blocks (forward hooks on the full forward),
stops after the last readout, checkpoints, lets gradients reach the input only (or LoRA), and checks its inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffdistill._checks import DTypeError, NonFiniteError, OptionError, ShapeError
from diffdistill.discriminators import TransformerFeatureExtractor, transformer_block_names
from tests.transformer_configs import (
    tiny_flux_transformer,
    tiny_sd3_transformer,
)

diffusers = pytest.importorskip("diffusers")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd3() -> nn.Module:
    return tiny_sd3_transformer()


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux_transformer()


def sd3_inputs(batch: int = 2, h: int = 8, w: int = 12, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    return x, {
        "timestep": torch.linspace(100.0, 900.0, batch),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }


def flux_image_ids(h: int, w: int) -> torch.Tensor:
    """FLUX's ``latent_image_ids`` (0, row, col), row-major as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flux_inputs(batch: int = 2, h: int = 3, w: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, 16, generator=g)  # packed 2x2 patches of a 4-channel latent
    return x, {
        "timestep": torch.linspace(0.1, 0.9, batch),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "img_ids": flux_image_ids(h, w),
        "txt_ids": torch.zeros(5, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def hooked_image_tokens(model: nn.Module, x: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """Image stream of every block, read by forward hooks on the model's full forward (the reference)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name in transformer_block_names(model):
        block = model.get_submodule(name)
        handles.append(block.register_forward_hook(lambda m, a, o, n=name: acts.__setitem__(n, o[1])))
    try:
        with torch.no_grad():
            model(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return acts


def as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Independent reshape: feature (i, j) is token i * w + j (row-major patch grid)."""
    out = torch.empty(tokens.shape[0], tokens.shape[2], h, w, dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, i * w + j]
    return out


def count_calls(model: nn.Module, names: list[str]) -> tuple[dict[str, int], list]:
    calls = dict.fromkeys(names, 0)
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
        for n in names
    ]
    return calls, handles


# ----------------------------------------------------------------------------------------------- values
def test_block_names(sd3, flux) -> None:
    assert transformer_block_names(sd3) == tuple(f"transformer_blocks.{i}" for i in range(4))
    assert transformer_block_names(flux) == (
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
        "single_transformer_blocks.2",
    )


@pytest.mark.parametrize("backbone", ["shared", "own", "copy"])
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_sd3_matches_hooked_hidden_states(sd3, backbone, size) -> None:
    x, kw = sd3_inputs(h=size[0], w=size[1])
    ref = hooked_image_tokens(sd3, x, kw)
    # Every block (the last one is context_pre_only: its text output is None), by index and by name.
    ext = TransformerFeatureExtractor(sd3, (0, "transformer_blocks.1", 2, -1), backbone=backbone)
    with torch.no_grad():
        feats = ext(x, **kw)
    h, w = size[0] // 2, size[1] // 2
    assert list(feats) == list(ref)
    for name, tokens in ref.items():
        assert feats[name].shape == (2, 16, h, w)
        torch.testing.assert_close(feats[name], as_map(tokens, h, w), rtol=0, atol=0)


def test_flux_double_and_single_blocks_give_the_image_stream(flux) -> None:
    x, kw = flux_inputs(h=3, w=4)
    ref = hooked_image_tokens(flux, x, kw)
    assert all(t.shape == (2, 12, 16) for t in ref.values())  # 0.42: single blocks return (txt, img)
    names = transformer_block_names(flux)
    ext = TransformerFeatureExtractor(flux, names)
    with torch.no_grad():
        feats = ext(x, grid_size=(3, 4), **kw)
    for name in names:
        torch.testing.assert_close(feats[name], as_map(ref[name], 3, 4), rtol=0, atol=0)
    # The image stream is not the text: the text tokens of a single block differ from every feature.
    assert feats["single_transformer_blocks.0"].shape == (2, 16, 3, 4)


def test_readout_hooks_stay_inside_compiled_blocks(flux) -> None:
    """Blocks compiled one at a time (``module.compile``, as the scripts' ``--compile``): the readout hooks run inside
    each block's graph without a graph break (the image-stream element is looked up when the hook is registered;
    dynamo cannot iterate over a class's MRO inside the graph), and the features are eager's."""
    import torch._dynamo

    x, kw = flux_inputs(h=3, w=4)
    names = transformer_block_names(flux)
    with torch.no_grad():
        want = TransformerFeatureExtractor(flux, names)(x, grid_size=(3, 4), **kw)
    model = copy.deepcopy(flux)
    for name in names:
        model.get_submodule(name).compile(backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with torch.no_grad():
            got = TransformerFeatureExtractor(model, names)(x, grid_size=(3, 4), **kw)
        counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    finally:
        torch._dynamo.reset()
    assert counters.get("stats", {}).get("unique_graphs", 0) >= 2 and not counters.get("graph_break"), (
        counters
    )
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_grid_follows_flux_image_ids(flux) -> None:
    """A feature at (i, j) comes from the token whose RoPE position (img_ids) is (i, j)."""
    x, kw = flux_inputs(batch=1, h=2, w=3)
    ext = TransformerFeatureExtractor(flux, 0)
    with torch.no_grad():
        base = ext(x, grid_size=(2, 3), **kw)["transformer_blocks.0"]
        # Swapping two tokens together with their position ids permutes the outputs in the same way
        # (attention is permutation-equivariant given the RoPE positions).
        perm = torch.tensor([0, 1, 2, 5, 4, 3])
        kw_p = dict(kw, img_ids=kw["img_ids"][perm])
        moved = ext(x[:, perm], grid_size=(2, 3), **kw_p)["transformer_blocks.0"]
    torch.testing.assert_close(moved[:, :, 1, 0], base[:, :, 1, 2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved[:, :, 0, :], base[:, :, 0, :], rtol=1e-5, atol=1e-6)


def test_qwen_image_transformer_by_its_block_list() -> None:
    """Another diffusers transformer (Qwen-Image: packed tokens, joint blocks, no pooled text) works unchanged."""
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).requires_grad_(False)
    x = torch.randn(2, 12, 16)
    kw = {
        "encoder_hidden_states": torch.randn(2, 5, 16),
        "encoder_hidden_states_mask": torch.ones(2, 5, dtype=torch.long),
        "timestep": torch.tensor([0.3, 0.7]),
        "img_shapes": [[(1, 3, 4)]] * 2,
    }
    ref = hooked_image_tokens(model, x, kw)
    feats = TransformerFeatureExtractor(model, (0, 1))(x, grid_size=(3, 4), **kw)
    for name in ("transformer_blocks.0", "transformer_blocks.1"):
        torch.testing.assert_close(feats[name], as_map(ref[name], 3, 4), rtol=0, atol=0)


class _TokenBlock(nn.Module):
    """A per-token block; ``joint=True`` mimics FLUX.2 / legacy FLUX.1 single blocks returning one [txt; img] tensor."""

    def __init__(self, width: int, joint: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.joint = joint

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([txt, img], dim=1) if self.joint else img)


class _ListedBlocksModel(nn.Module):
    """A generic transformer: its blocks live in ``layers`` (not a diffusers name)."""

    def __init__(self, width: int = 6, joint_from: int = 2, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_TokenBlock(width, i >= joint_from) for i in range(depth)])
        self.joint_from = joint_from
        self.norm_out = nn.LayerNorm(width)

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        for i, block in enumerate(self.layers):
            x = block(x, text)
            if i >= self.joint_from:
                x = x[:, text.shape[1] :]  # the model itself splits the joint sequence after each block
        return self.norm_out(x)


def test_blocks_listed_by_name_and_joint_sequences() -> None:
    torch.manual_seed(0)
    model = _ListedBlocksModel().requires_grad_(False)
    with pytest.raises(OptionError, match=r"Found no transformer blocks on _ListedBlocksModel"):
        transformer_block_names(model)
    assert transformer_block_names(model, ["layers"]) == tuple(f"layers.{i}" for i in range(4))
    x, text = torch.randn(2, 6, 6), torch.randn(2, 3, 6)
    ext = TransformerFeatureExtractor(model, (1, 2), block_lists=("layers",), channels=6)
    feats = ext(x, grid_size=(2, 3), text=text)
    # Independent computation: block 1 per token; block 2 sees [txt; img] and its image part is the last 6 tokens.
    h1 = model.layers[1].lin(model.layers[0].lin(x))
    h2 = model.layers[2].lin(torch.cat([text, h1], 1))[:, 3:]
    torch.testing.assert_close(feats["layers.1"], as_map(h1, 2, 3))
    torch.testing.assert_close(feats["layers.2"], as_map(h2, 2, 3))


# ----------------------------------------------------------------------------------------------- early exit
def test_early_exit_sd3(sd3) -> None:
    x, kw = sd3_inputs()
    names = [*transformer_block_names(sd3), "norm_out", "proj_out"]
    ext = TransformerFeatureExtractor(sd3, 1)
    calls, handles = count_calls(sd3, names)
    try:
        ext(x, **kw)
    finally:
        for h in handles:
            h.remove()
    assert calls == {
        "transformer_blocks.0": 1,
        "transformer_blocks.1": 1,
        "transformer_blocks.2": 0,
        "transformer_blocks.3": 0,
        "norm_out": 0,
        "proj_out": 0,
    }


@pytest.mark.parametrize("ckpt", [False, True])
def test_early_exit_flux_double_and_last_block(flux, ckpt) -> None:
    x, kw = flux_inputs()
    names = [*transformer_block_names(flux), "proj_out"]
    for read, ran in ((1, 2), (-1, 5)):
        ext = TransformerFeatureExtractor(flux, read, gradient_checkpointing=ckpt)
        calls, handles = count_calls(flux, names)
        try:
            ext(x.clone().requires_grad_(True), grid_size=(3, 4), **kw)
        finally:
            for h in handles:
                h.remove()
        assert [calls[n] for n in names[:-1]] == [1] * ran + [0] * (5 - ran)
        assert calls["proj_out"] == 0  # reading the last block stops before norm_out / proj_out


# ----------------------------------------------------------------------------------------------- gradients
def test_frozen_backbone_no_grad_input_grad(sd3) -> None:
    x, kw = sd3_inputs()
    x.requires_grad_(True)
    ext = TransformerFeatureExtractor(sd3, (0, 2))
    feats = ext(x, **kw)
    sum(f.square().mean() for f in feats.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd3.parameters())
    assert list(ext.parameters()) == [] and ext.state_dict() == {}  # shared: not registered


def test_lora_adapters_get_grads_base_does_not(flux) -> None:
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(flux)
    model.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    x, kw = flux_inputs()
    x.requires_grad_(True)
    ext = TransformerFeatureExtractor(model, "single_transformer_blocks.0")
    ext(x, grid_size=(3, 4), **kw)["single_transformer_blocks.0"].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, n
        elif n.startswith(("transformer_blocks.", "single_transformer_blocks.0.")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:  # blocks after the readout do not run
            assert p.grad is None, n


def test_gradient_checkpointing_same_values_grads_and_restores_flag(flux) -> None:
    model = copy.deepcopy(flux).requires_grad_(True)
    x, kw = flux_inputs()
    results, runs = [], []
    owner_func = model._gradient_checkpointing_func
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        ext = TransformerFeatureExtractor(model, (0, 3), gradient_checkpointing=ckpt)
        xi = x.clone().requires_grad_(True)
        calls, handles = count_calls(model, ["transformer_blocks.1"])
        feats = ext(xi, grid_size=(3, 4), **kw)
        sum(f.square().mean() for f in feats.values()).backward()
        for h in handles:
            h.remove()
        runs.append(calls["transformer_blocks.1"])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((feats, xi.grad, grads))
        assert model.gradient_checkpointing is False and model._gradient_checkpointing_func is owner_func
    assert runs == [1, 2]  # checkpointing recomputes the block in the backward pass
    (f0, x0, g0), (f1, x1, g1) = results
    for k in f0:
        torch.testing.assert_close(f0[k], f1[k])
    torch.testing.assert_close(x0, x1)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6)


def test_owner_checkpointing_is_restored(sd3) -> None:
    model = copy.deepcopy(sd3)
    model.enable_gradient_checkpointing()
    func = model._gradient_checkpointing_func
    ext = TransformerFeatureExtractor(model, 1)  # our setting (off) applies during the call only
    x, kw = sd3_inputs()
    ext(x.requires_grad_(True), **kw)["transformer_blocks.1"].sum().backward()
    assert model.gradient_checkpointing is True and model._gradient_checkpointing_func is func


def test_none_keeps_the_owners_checkpointing(flux) -> None:
    """gradient_checkpointing=None: the owner's checkpointing function runs the blocks (here a counting wrapper
    around torch's checkpoint), values and gradients equal a run without any checkpointing."""
    model = copy.deepcopy(flux).requires_grad_(True)
    x, kw = flux_inputs()
    results = []
    for owner in (False, True):
        model.zero_grad(set_to_none=True)
        used: list[int] = []
        if owner:

            def owner_func(block, *args, _used=used, **kwargs):
                _used.append(1)
                return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)

            model.gradient_checkpointing, model._gradient_checkpointing_func = True, owner_func
        ext = TransformerFeatureExtractor(model, (0, 3), gradient_checkpointing=None)
        xi = x.clone().requires_grad_(True)
        calls, handles = count_calls(model, ["transformer_blocks.1"])
        feats = ext(xi, grid_size=(3, 4), **kw)
        sum(f.square().mean() for f in feats.values()).backward()
        for h in handles:
            h.remove()
        assert calls["transformer_blocks.1"] == (2 if owner else 1)  # recomputed by the owner's checkpoint
        assert bool(used) is owner and model.gradient_checkpointing is owner
        if owner:
            assert model._gradient_checkpointing_func is owner_func
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((feats, xi.grad, grads))
    (f0, x0, g0), (f1, x1, g1) = results
    for k in f0:
        torch.testing.assert_close(f0[k], f1[k])
    torch.testing.assert_close(x0, x1)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6)


def test_bf16_sample_float32_model(sd3) -> None:
    x, kw = sd3_inputs()
    xb = x.to(torch.bfloat16).requires_grad_(True)
    ext = TransformerFeatureExtractor(sd3, 0)
    out = ext(xb, **kw)["transformer_blocks.0"]
    assert out.dtype == torch.float32
    out.sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16


def test_number_timestep_and_trainable_copy(sd3) -> None:
    x, kw = sd3_inputs()
    ext = TransformerFeatureExtractor(sd3, 0, backbone="copy", trainable=True)
    assert all(p.requires_grad for p in ext.parameters()) and all(
        not p.requires_grad for p in sd3.parameters()
    )
    frozen = TransformerFeatureExtractor(sd3, 0, backbone="copy", trainable=False).train()
    assert not frozen.trunk.training
    with torch.no_grad():
        a = ext(x, **dict(kw, timestep=500.0))["transformer_blocks.0"]
        b = ext(x, **dict(kw, timestep=torch.tensor([500.0, 500.0])))["transformer_blocks.0"]
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs(sd3, flux) -> None:
    x, kw = sd3_inputs()
    ext = TransformerFeatureExtractor(sd3, 1)
    with pytest.raises(
        ShapeError, match=r"Expected `hidden_states` laid out as \(B, C, H, W\) to have the model's 4 input"
    ):
        ext(x[:, :3], **kw)
    with pytest.raises(ShapeError, match=r"Expected `hidden_states` to have 3 or 4 dimensions"):
        ext(x[0, 0], **kw)
    with pytest.raises(DTypeError, match=r"Expected `hidden_states` to be a floating-point tensor"):
        ext(x.long(), **kw)
    with pytest.raises(ShapeError, match=r"multiples of the patch size 2, but got shape \(2, 4, 7, 12\)"):
        ext(x[:, :, :7], **kw)
    with pytest.raises(ShapeError, match=r"Expected `grid_size` to be None or \(4, 6\)"):
        ext(x, grid_size=(6, 4), **kw)
    with pytest.raises(
        ShapeError, match=r"Expected `encoder_hidden_states` laid out as \(B, L, D\) to have the batch"
    ):
        ext(x, **dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][:1]))
    with pytest.raises(
        ShapeError, match=r"Expected `timestep` to be a number, a 0-d tensor or shape \(1,\) or \(2,\)"
    ):
        ext(x, **dict(kw, timestep=torch.ones(3)))
    with pytest.raises(NonFiniteError, match=r"hidden_states"):
        ext(x.index_fill(0, torch.tensor([0]), float("nan")), **kw)
    xf, kwf = flux_inputs()
    fext = TransformerFeatureExtractor(flux, 0)
    with pytest.raises(OptionError, match=r"pass grid_size=\(h, w\) with h \* w tokens"):
        fext(xf, **kwf)
    with pytest.raises(
        ShapeError, match=r"h \* w equal to the 12 tokens of `hidden_states`, but got \(4, 4\)"
    ):
        fext(xf, grid_size=(4, 4), **kwf)
    with pytest.raises(DTypeError, match=r"Expected `grid_size` to be a pair"):
        fext(xf, grid_size=12, **kwf)
    with pytest.raises(
        ShapeError, match=r"laid out as packed \(B, L, C\) to have the model's 16 input channels in dim 2"
    ):
        fext(xf[..., :4], grid_size=(3, 4), **kwf)


def test_bad_options(sd3) -> None:
    with pytest.raises(OptionError, match=r"Expected every index in `blocks` to lie in \[-4, 3\]"):
        TransformerFeatureExtractor(sd3, 4)
    with pytest.raises(OptionError, match=r"Expected every name in `blocks` to be a block of the model"):
        TransformerFeatureExtractor(sd3, "transformer_blocks.9")
    with pytest.raises(OptionError, match=r"Expected `blocks` without repeats"):
        TransformerFeatureExtractor(sd3, (1, "transformer_blocks.1"))
    with pytest.raises(OptionError, match=r"Expected `blocks` to name at least one"):
        TransformerFeatureExtractor(sd3, ())
    with pytest.raises(DTypeError, match=r"Expected every entry of `blocks` to be an int index or a str"):
        TransformerFeatureExtractor(sd3, (1.0,))
    with pytest.raises(
        DTypeError, match=r"Expected `blocks` to be a block index, a block name or a sequence"
    ):
        TransformerFeatureExtractor(sd3, {1})
    with pytest.raises(OptionError, match=r"`trainable` must be None"):
        TransformerFeatureExtractor(sd3, 0, trainable=False)
    with pytest.raises(OptionError, match=r"Expected `backbone` to be one of"):
        TransformerFeatureExtractor(sd3, 0, backbone="clone")
    with pytest.raises(OptionError, match=r"to name an nn.ModuleList attribute of the model, but "):
        TransformerFeatureExtractor(sd3, 0, block_lists=("pos_embed",))
    with pytest.raises(DTypeError, match=r"Expected `block_lists` to be None or attribute names"):
        TransformerFeatureExtractor(sd3, 0, block_lists=(1,))
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module"):
        TransformerFeatureExtractor("sd3", 0)
    with pytest.raises(OptionError, match=r"has no `gradient_checkpointing` attribute"):
        TransformerFeatureExtractor(
            _ListedBlocksModel(), 0, block_lists="layers", gradient_checkpointing=True
        )
    with pytest.raises(OptionError, match=r"Cannot tell the token width of _ListedBlocksModel"):
        TransformerFeatureExtractor(_ListedBlocksModel(), 0, block_lists="layers")


# ------------------------------------------------------------------------------- SharedBase checkpointing
def test_checkpointing_true_on_a_shared_base_uses_its_checkpoint_or_refuses():
    """gradient_checkpointing=True on a SharedBase's model (audit 10, defect 6): with the base's own checkpoint
    installed (base.enable_gradient_checkpointing()) the blocks are recomputed under the adapter they ran with,
    so the fake adapter's gradients equal those of the uncheckpointed call (the same float ops recomputed, default
    float32 tolerance); without it, a call with an adapter active is refused with the supported route; with every
    adapter off (a discriminator on the teacher outside any view) torch's plain checkpoint stays."""
    pytest.importorskip("peft")
    from diffdistill.students import SharedBase

    x, cond = sd3_inputs()

    def shared(enable_base):
        model = tiny_sd3_transformer()
        base = SharedBase(model, adapters={"fake": {"rank": 2, "init_lora_weights": False}})
        if enable_base:
            base.enable_gradient_checkpointing()
        return model, base

    def grads(model_base, ckpt, adapter="fake"):
        model, base = model_base
        fake = base.view("fake")
        fake.zero_grad(set_to_none=True)
        ext = TransformerFeatureExtractor(model, (0, 1), gradient_checkpointing=ckpt)
        xin = x.clone().requires_grad_()
        with base.active(adapter):
            feats = ext(xin, **cond)
        sum(f.square().mean() for f in feats.values()).backward()
        named = {n: p.grad for n, p in fake.named_parameters() if p.grad is not None}
        return {**named, "input": xin.grad}

    plain, enabled = shared(False), shared(True)
    reference = grads(plain, False)
    assert len(reference) > 8  # the adapters of the blocks read (the later ones do not run: early exit)
    torch.testing.assert_close(grads(enabled, True), reference)
    with pytest.raises(
        OptionError,
        match=r"a LoRA adapter is active.*gradient_checkpointing=None.*base\.enable_gradient_checkpointing\(\)",
    ):
        grads(plain, True)
    off = grads(
        plain, True, adapter=None
    )  # adapters off in forward and backward: the plain checkpoint is right
    torch.testing.assert_close(off, grads(plain, False, adapter=None))
