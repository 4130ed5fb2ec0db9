"""UNetFeatureExtractor reproduces the UNet's own activations (forward hooks on the real forward)."""

from __future__ import annotations

import pytest
import torch

from diffdistill._checks import OptionError, ShapeError
from diffdistill.discriminators import UNetFeatureExtractor, tiny_sdxl_unet, unet_feature_levels


def _hooked_activations(unet, sample, t, ehs, added):
    acts: dict[str, torch.Tensor] = {}
    handles = [unet.conv_in.register_forward_hook(lambda m, i, o: acts.__setitem__("conv_in", o))]
    for i, block in enumerate(unet.down_blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(f"down.{i}", o[0])))
    handles.append(unet.mid_block.register_forward_hook(lambda m, i, o: acts.__setitem__("mid", o)))
    for i, block in enumerate(unet.up_blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(f"up.{i}", o)))
    try:
        with torch.no_grad():
            acts["out"] = unet(sample, t, ehs, added_cond_kwargs=added).sample
    finally:
        for h in handles:
            h.remove()
    return acts


@pytest.mark.parametrize("backbone", ["copy", "own", "shared"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_matches_unet_activations(unet, conds, backbone, size) -> None:
    ehs, added = conds
    sample = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 700])
    ref = _hooked_activations(unet, sample, t, ehs, added)
    levels = unet_feature_levels(unet)
    assert levels == ("conv_in", "down.0", "down.1", "mid", "up.0", "up.1", "out")
    ext = UNetFeatureExtractor(unet, levels, backbone=backbone)
    with torch.no_grad():
        feats = ext(sample, t, ehs, added)
    assert list(feats) == list(levels)
    for level in levels:
        torch.testing.assert_close(feats[level], ref[level], rtol=0, atol=0)
        h, w = size
        s = ext.strides[level]
        assert feats[level].shape == (2, ext.channels[level], -(-h // s), -(-w // s))


def test_scalar_and_float_timesteps(unet, conds, latents) -> None:
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("out",), backbone="shared")
    with torch.no_grad():
        for t in (500, 499.5, torch.tensor(500), torch.tensor([500])):
            torch.testing.assert_close(
                ext(latents, t, ehs, added)["out"], unet(latents, t, ehs, added_cond_kwargs=added).sample
            )


def test_encoder_only_trunk_and_early_stop(unet, conds, latents) -> None:
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="copy")
    names = {n.split(".")[0] for n, _ in ext.trunk.named_parameters()}
    assert "up_blocks" not in names and "conv_out" not in names
    assert len(ext.trunk.down_blocks) == 2 and ext.trunk.mid_block is not None
    ext_d0 = UNetFeatureExtractor(unet, ("down.0",), backbone="copy")
    assert len(ext_d0.trunk.down_blocks) == 1 and ext_d0.trunk.mid_block is None
    # copy: independent parameters; trunk state_dict keys are the UNet's keys
    p_unet = dict(unet.named_parameters())
    for name, p in ext.trunk.named_parameters():
        assert name in p_unet and p.data_ptr() != p_unet[name].data_ptr()
    own = UNetFeatureExtractor(unet, ("mid",), backbone="own")
    assert own.trunk.conv_in.weight is unet.conv_in.weight


def test_shared_trunk_is_not_registered(unet) -> None:
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="shared")
    assert list(ext.parameters()) == [] and ext.state_dict() == {}
    assert ext.trunk.conv_in is unet.conv_in


def test_frozen_copy_stays_in_eval_and_gets_no_grad(unet, conds, latents) -> None:
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="copy", trainable=False)
    ext.train()
    assert not ext.trunk.training
    x = latents.clone().requires_grad_(True)
    ext(x, 10, ehs, added)["mid"].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ext.trunk.parameters())


def test_gradient_checkpointing_same_values_and_grads(unet, conds, latents) -> None:
    ehs, added = conds
    plain = UNetFeatureExtractor(unet, ("down.1", "up.1"), backbone="copy", trainable=True)
    ckpt = UNetFeatureExtractor(
        unet, ("down.1", "up.1"), backbone="copy", trainable=True, gradient_checkpointing=True
    )
    outs = []
    runs = []  # forward calls of a block per step: checkpointing recomputes it in backward
    for ext in (plain, ckpt):
        calls = [0]
        hook = ext.trunk.down_blocks[1].register_forward_pre_hook(
            lambda m, a, c=calls: c.__setitem__(0, c[0] + 1)
        )
        f = ext(latents, 300, ehs, added)
        (f["down.1"].square().mean() + f["up.1"].mean()).backward()
        hook.remove()
        runs.append(calls[0])
        outs.append((f, {n: p.grad.clone() for n, p in ext.named_parameters() if p.grad is not None}))
    assert runs == [1, 2]
    (f0, g0), (f1, g1) = outs
    for k in f0:
        torch.testing.assert_close(f0[k], f1[k])
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6)


def test_additions_feed_level_output_and_skip(unet, conds, latents) -> None:
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("down.0", "out"), backbone="shared")
    with torch.no_grad():
        base = ext(latents, 10, ehs, added)
        delta = torch.ones_like(base["down.0"])
        moved = ext(latents, 10, ehs, added, additions={"down.0": delta})
    torch.testing.assert_close(moved["down.0"], base["down.0"] + delta)
    assert not torch.allclose(moved["out"], base["out"])


def test_sd15_style_unet_without_added_conditions(conds, latents) -> None:
    unet = tiny_sdxl_unet(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    ehs, _ = conds
    ext = UNetFeatureExtractor(unet, ("out",), backbone="shared")
    with torch.no_grad():
        torch.testing.assert_close(ext(latents, 5, ehs)["out"], unet(latents, 5, ehs).sample)


def test_text_projection_unet_takes_its_encoder_width(conds, latents) -> None:
    # encoder_hid_dim_type="text_proj": the UNet projects 24-wide text states to its cross_attention_dim 32.
    unet = tiny_sdxl_unet(
        addition_embed_type=None,
        projection_class_embeddings_input_dim=None,
        encoder_hid_dim=24,
        encoder_hid_dim_type="text_proj",
    )
    ehs = torch.randn(latents.shape[0], 5, 24)
    ext = UNetFeatureExtractor(unet, ("out",), backbone="shared")
    with torch.no_grad():
        torch.testing.assert_close(ext(latents, 5, ehs)["out"], unet(latents, 5, ehs).sample)
    with pytest.raises(ShapeError, match=r"of shape \(2, L, 24\)"):
        ext(latents, 5, torch.randn(latents.shape[0], 5, 32))


def test_asymmetric_unet_like_ssd1b(conds, latents) -> None:
    """Different depths per level (SSD-1B / Vega remove blocks unevenly): skips are sliced per up block."""
    unet = tiny_sdxl_unet(layers_per_block=(1, 2), transformer_layers_per_block=(1, 2))
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("mid", "out"), backbone="shared")
    with torch.no_grad():
        torch.testing.assert_close(
            ext(latents, 7, ehs, added)["out"], unet(latents, 7, ehs, added_cond_kwargs=added).sample
        )


# ----------------------------------------------------------------------------------------------- errors
def test_error_missing_added_cond_kwargs(unet, conds, latents) -> None:
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="shared")
    with pytest.raises(
        ValueError, match=r"addition_embed_type='text_time' \(SDXL\), which needs `added_cond_kwargs`"
    ):
        ext(latents, 10, ehs)
    with pytest.raises(ValueError, match=r"needs `added_cond_kwargs\['text_embeds'\]`"):
        ext(latents, 10, ehs, {"time_ids": added["time_ids"]})
    with pytest.raises(ValueError, match=r"needs `added_cond_kwargs\['time_ids'\]`"):
        ext(latents, 10, ehs, {"text_embeds": added["text_embeds"]})
    with pytest.raises(
        ShapeError, match=r"to equal the UNet's projection_class_embeddings_input_dim 80, but got 16"
    ):
        ext(latents, 10, ehs, {"text_embeds": added["text_embeds"][:, :16], "time_ids": added["time_ids"]})
    with pytest.raises(
        ShapeError,
        match=r"Expected `added_cond_kwargs\['text_embeds'\]` to have the batch size of `sample` \(2\)",
    ):
        ext(latents, 10, ehs, {"text_embeds": added["text_embeds"][:1], "time_ids": added["time_ids"]})


def test_error_shapes_and_options(unet, conds, latents) -> None:
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="shared")
    with pytest.raises(ValueError, match=r"use cross-attention, which needs `encoder_hidden_states`"):
        ext(latents, 10, None, added)
    with pytest.raises(ShapeError, match=r"Expected `encoder_hidden_states` of shape \(2, L, 32\)"):
        ext(latents, 10, ehs[:1], added)
    with pytest.raises(
        ShapeError, match=r"Expected `encoder_hidden_states` of shape \(2, L, 32\).* got \(2, 8, 16\)"
    ):
        ext(latents, 10, ehs[..., :16], added)  # the text width, not only the batch
    # Additions at levels the extractor does not run (or that do not exist) are refused, not dropped.
    with pytest.raises(OptionError, match=r"Expected `additions` keys among the levels this extractor runs"):
        ext(latents, 10, ehs, added, additions={"up.1": torch.zeros(1)})
    with pytest.raises(OptionError, match=r"got \['down_0'\]"):
        ext(latents, 10, ehs, added, additions={"down_0": torch.zeros(1)})
    with pytest.raises(ShapeError, match=r"Expected `sample` to have the UNet's 4 input channels"):
        ext(latents[:, :3], 10, ehs, added)
    with pytest.raises(ShapeError, match=r"Expected `sample` to have 4 dimensions"):
        ext(latents[0], 10, ehs, added)
    with pytest.raises(
        ShapeError, match=r"Expected `timestep` to be a number, a 0-d tensor or shape \(1,\) or \(2,\)"
    ):
        ext(latents, torch.tensor([1, 2, 3]), ehs, added)
    with pytest.raises(OptionError, match=r"Expected every entry of `levels` to be one of \['conv_in'"):
        UNetFeatureExtractor(unet, ("down.7",))
    with pytest.raises(OptionError, match=r"Expected `backbone` to be one of \['copy', 'own', 'shared'\]"):
        UNetFeatureExtractor(unet, backbone="clone")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`trainable` must be None"):
        UNetFeatureExtractor(unet, backbone="shared", trainable=True)
    with pytest.raises(TypeError, match=r"Expected `unet` to be a diffusers UNet2DConditionModel"):
        UNetFeatureExtractor(torch.nn.Linear(2, 2))
