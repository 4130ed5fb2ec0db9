"""Wan (``WanTransformer3DModel``, video latents) as a discriminator backbone: TransformerFeatureExtractor reads
(B, D, F', H', W') maps equal to a hand-run of the blocks in diffusers' token order, stops early, checkpoints;
LADDDiscriminator folds frames into its 2-D heads (checked frame by frame), conditions on sigma only or on the
mean text token, keeps Wan's sigma * 1000 timestep, runs every GAN loss and exact / approximate R1; bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdistill._checks import OptionError, ShapeError
from diffdistill.discriminators import (
    LADDDiscriminator,
    TransformerFeatureExtractor,
    mean_text_embedding,
    noise_level_embedding,
    transformer_block_names,
)
from diffdistill.losses import approximate_r1_penalty, gan_discriminator_loss, gan_generator_loss, r1_penalty
from tests.tiny_wan import FRAMES, GRID, hand_run, wan_batch
from tests.transformer_configs import tiny_sd3_transformer, tiny_wan_transformer

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def wan() -> nn.Module:
    return tiny_wan_transformer()


def as_video_map(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Independent reshape: feature (f, i, j) is token (f * H' + i) * W' + j."""
    f_, h_, w_ = grid
    out = torch.empty(tokens.shape[0], tokens.shape[2], f_, h_, w_, dtype=tokens.dtype)
    for f in range(f_):
        for i in range(h_):
            for j in range(w_):
                out[:, :, f, i, j] = tokens[:, (f * h_ + i) * w_ + j]
    return out


def build(model: nn.Module, **kw) -> LADDDiscriminator:
    if "blocks" not in kw:
        kw.setdefault("every", 1)
    return LADDDiscriminator(model, norm_groups=4, head_channels=8, cond_dim=16, **kw)


# ----------------------------------------------------------------------------------------------- extractor
def test_wan_blocks_found_by_name(wan) -> None:
    assert transformer_block_names(wan) == ("blocks.0", "blocks.1", "blocks.2")
    ext = TransformerFeatureExtractor(wan, ("blocks.1", 0))
    assert ext.blocks == ("blocks.0", "blocks.1") and ext.patch_size == (1, 2, 2)
    assert ext.channels == {"blocks.0": 24, "blocks.1": 24}


def test_token_order_is_frame_row_column(wan) -> None:
    """The token the blocks see at index (f * H' + i) * W' + j is the patch embedding of frame f, rows 2i:2i+2,
    columns 2j:2j+2 (computed here from the Conv3d weights), i.e. diffusers flattens (F', H', W') in that order."""
    x, t, cond = wan_batch(batch=1)
    seen = {}
    handle = wan.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0]))
    try:
        with torch.no_grad():
            wan(x, t, **cond)
    finally:
        handle.remove()
    weight, bias = wan.patch_embedding.weight, wan.patch_embedding.bias  # (D, C, 1, 2, 2)
    _, h_, w_ = GRID
    for f, i, j in [(0, 0, 0), (0, 1, 3), (1, 2, 0), (2, 3, 3)]:
        patch = x[0, :, f : f + 1, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        expected = torch.einsum("dcfhw,cfhw->d", weight, patch) + bias
        torch.testing.assert_close(seen["tokens"][0, (f * h_ + i) * w_ + j], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["shared", "copy"])
def test_features_equal_a_hand_run_of_the_blocks(wan, backbone) -> None:
    x, t, cond = wan_batch()
    ref = hand_run(wan, x, t, cond["encoder_hidden_states"])
    ext = TransformerFeatureExtractor(wan, (0, 1, 2), backbone=backbone)
    with torch.no_grad():
        feats = ext(x, timestep=t, **cond)
    for k, name in enumerate(ext.blocks):
        assert feats[name].shape == (2, 24, *GRID)
        torch.testing.assert_close(feats[name], as_video_map(ref[k], GRID), rtol=0, atol=0)


def test_one_frame_and_grid_size(wan) -> None:
    x, t, cond = wan_batch(frames=1)
    ext = TransformerFeatureExtractor(wan, 1)
    with torch.no_grad():
        a = ext(x, timestep=t, **cond)["blocks.1"]
        b = ext(x, grid_size=(1, 4, 4), timestep=t, **cond)["blocks.1"]
    assert a.shape == (2, 24, 1, 4, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(
        a, as_video_map(hand_run(wan, x, t, cond["encoder_hidden_states"])[1], (1, 4, 4))
    )


def test_image_to_video_conditions_pass_through_cast() -> None:
    """Wan 2.1 I2V: image tokens (encoder_hidden_states_image) reach the model, cast to its dtype like the text
    (float64 tokens into the float32 model would raise), and the features equal the blocks' outputs in a full
    forward (hooks)."""
    i2v = tiny_wan_transformer(image_dim=8, added_kv_proj_dim=24)
    x, t, cond = wan_batch()
    image = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    seen = {}
    handle = i2v.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("tokens", out))
    try:
        with torch.no_grad():
            i2v(x, t, **cond, encoder_hidden_states_image=image)
    finally:
        handle.remove()
    ext = TransformerFeatureExtractor(i2v, 1)
    with torch.no_grad():
        feats = ext(
            x.double(),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].double(),
            encoder_hidden_states_image=image.double(),
        )["blocks.1"]
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, as_video_map(seen["tokens"], GRID), rtol=0, atol=0)


@pytest.mark.parametrize("ckpt", [False, True])
def test_early_exit(wan, ckpt) -> None:
    x, t, cond = wan_batch()
    names = [*transformer_block_names(wan), "norm_out", "proj_out"]
    calls = dict.fromkeys(names, 0)
    handles = [
        wan.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
        for n in names
    ]
    try:
        TransformerFeatureExtractor(wan, 0, gradient_checkpointing=ckpt)(
            x.requires_grad_(True), timestep=t, **cond
        )
    finally:
        for h in handles:
            h.remove()
    assert calls == {"blocks.0": 1, "blocks.1": 0, "blocks.2": 0, "norm_out": 0, "proj_out": 0}
    assert not wan.gradient_checkpointing  # the owner's setting is restored


def test_gradient_checkpointing_gives_the_same_input_gradient(wan) -> None:
    """Checkpointing recomputes the same float32 operations in the same order: the gradients are equal."""
    x, t, cond = wan_batch()
    grads = []
    for ckpt in (False, True):
        ext = TransformerFeatureExtractor(wan, (0, 2), gradient_checkpointing=ckpt)
        xi = x.clone().requires_grad_(True)
        feats = ext(xi, timestep=t, **cond)
        (feats["blocks.0"].square().mean() + feats["blocks.2"].sum()).backward()
        grads.append(xi.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert all(p.grad is None for p in wan.parameters())


def test_extractor_bad_inputs(wan) -> None:
    x, t, cond = wan_batch()
    ext = TransformerFeatureExtractor(wan, 1)
    with pytest.raises(ShapeError, match=r"Expected `hidden_states` to be video latents \(B, C, F, H, W\)"):
        ext(x[:, :, 0], timestep=t, **cond)
    with pytest.raises(
        ShapeError, match=r"laid out as \(B, C, F, H, W\) to have the model's 4 input channels"
    ):
        ext(x[:, :3], timestep=t, **cond)
    with pytest.raises(
        ShapeError, match=r"frames, height and width of `hidden_states` to be multiples of the patch"
    ):
        ext(x[..., :7], timestep=t, **cond)
    with pytest.raises(ShapeError, match=r"Expected `grid_size` to be None or \(3, 4, 4\)"):
        ext(x, grid_size=(4, 4), timestep=t, **cond)
    with pytest.raises(ShapeError, match=r"Expected `timestep` to be a number, a 0-d tensor or shape \(1,\)"):
        ext(x, timestep=t[:, None].expand(2, 48), **cond)  # Wan 2.2 TI2V's per-token timesteps
    with pytest.raises(
        ShapeError, match=r"`encoder_hidden_states` laid out as \(B, L, D\) to have the batch size"
    ):
        ext(x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"][:1])
    sd3_ext = TransformerFeatureExtractor(tiny_sd3_transformer(), 0)
    with pytest.raises(
        ShapeError, match=r"video latents \(B, C, F, H, W\) need a model with a 3-D patch size"
    ):
        sd3_ext(x, timestep=t)
    temporal = tiny_wan_transformer(patch_size=(2, 2, 2))
    with pytest.raises(
        ShapeError, match=r"multiples of the patch size \(2, 2, 2\), but got shape \(2, 4, 3, 8, 8\)"
    ):
        TransformerFeatureExtractor(temporal, 0)(x, timestep=t, **cond)


# ----------------------------------------------------------------------------------------------- LADD
def test_ladd_defaults_on_wan(wan) -> None:
    disc = build(wan, every=None)
    assert disc.blocks == ("blocks.0", "blocks.1", "blocks.2")  # every max(1, 3 // 4) = 1
    assert disc.timestep_scale == 1.0  # Wan takes sigma * 1000 unscaled (class name, as SD3)
    assert disc.pooled_dim == 0 and disc.text_pooling is None  # no pooled text: noise level only
    x, t, cond = wan_batch()
    logits = disc(x, t, **cond)
    assert [tuple(lg.shape) for lg in logits] == [(2, 1, *GRID)] * 3
    assert all(lg.dtype == torch.float32 for lg in logits)


def test_frames_are_folded_into_the_2d_heads(wan) -> None:
    """Each frame's logits are the head applied to that frame's map with its sample's conditioning (sigma only)."""
    disc = build(wan, blocks=(0, 2))
    for head in disc.heads:  # a conditioned head (FiLM starts at zero)
        nn.init.normal_(head.film.weight, std=0.5)
    x, t, cond = wan_batch()
    with torch.no_grad():
        logits = disc(x, t, **cond)
        feats = TransformerFeatureExtractor(wan, (0, 2))(x, timestep=t, **cond)
        e = disc.cond_embed(noise_level_embedding(t.float()))  # timestep_scale 1
        for k, name in enumerate(disc.blocks):
            for f in range(FRAMES):
                expected = disc.heads[k](feats[name][:, :, f], e)
                torch.testing.assert_close(logits[k][:, :, f], expected, rtol=1e-5, atol=1e-6)
    # The noise level conditions the heads: another sigma, other logits (same latents).
    with torch.no_grad():
        other = disc(x, t.flip(0), **cond)
    assert not torch.allclose(other[0], logits[0])


def test_mean_text_embedding_skips_zero_padding() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5]
    tokens = torch.zeros(3, 5, 4)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randn(n, 4, generator=g)
    pooled = mean_text_embedding(tokens)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(pooled[b], tokens[b, :n].mean(0))
    assert torch.equal(mean_text_embedding(torch.zeros(1, 3, 4)), torch.zeros(1, 4))


def test_text_pooling_mean_conditions_the_heads(wan) -> None:
    disc = build(wan, blocks=1, text_pooling="mean")
    assert disc.pooled_dim == 16  # the config's text_dim
    nn.init.normal_(disc.heads[0].film.weight, std=0.5)
    x, t, cond = wan_batch()
    text = cond["encoder_hidden_states"]
    with torch.no_grad():
        logits = disc(x, t, **cond)[0]
        feats = TransformerFeatureExtractor(wan, 1)(x, timestep=t, **cond)["blocks.1"]
        e = disc.cond_embed(torch.cat([noise_level_embedding(t.float()), text.mean(1)], dim=1))
        for f in range(FRAMES):
            torch.testing.assert_close(
                logits[:, :, f], disc.heads[0](feats[:, :, f], e), rtol=1e-5, atol=1e-6
            )


def test_pooled_projections_reach_the_heads_not_wan(wan) -> None:
    """Wan's forward takes no pooled_projections: a pooled condition of the caller's goes to the heads only."""
    disc = build(wan, blocks=0, pooled_dim=8)
    x, t, cond = wan_batch()
    pooled = torch.randn(2, 8)
    logits = disc(x, t, pooled_projections=pooled, **cond)
    assert logits[0].shape == (2, 1, *GRID)
    with pytest.raises(ValueError, match=r"`pooled_projections` is None"):
        disc(x, t, **cond)


@pytest.mark.parametrize("loss", ["hinge", "non_saturating", "least_squares"])
def test_gan_losses_train_heads_and_generator_not_teacher(wan, loss) -> None:
    disc = build(wan, blocks=(1, 2))
    x, t, cond = wan_batch()
    fake = (0.5 * x.flip(0)).detach()
    d_loss, _ = gan_discriminator_loss(disc(x, t, **cond), disc(fake, t, **cond), loss=loss)
    d_loss.backward()
    assert torch.isfinite(d_loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    assert all(p.grad is None for p in wan.parameters())
    disc.zero_grad(set_to_none=True)
    gen_out = (0.5 * x).requires_grad_(True)
    g_loss, _ = gan_generator_loss(disc(gen_out, t, **cond), loss=loss)
    g_loss.backward()
    assert gen_out.grad is not None and gen_out.grad.abs().sum() > 0 and torch.isfinite(gen_out.grad).all()
    assert all(p.grad is None for p in wan.parameters())


def _directional(disc: LADDDiscriminator, x: torch.Tensor, t: torch.Tensor, cond: dict, eps: torch.Tensor):
    """``(grad_x D, grad_x D . eps)`` per sample, D = the sum of every logit of a sample (R1's D)."""
    xi = x.clone().requires_grad_(True)
    total = sum(lg.reshape(lg.shape[0], -1).sum(1) for lg in disc(xi, t, **cond))
    (grad,) = torch.autograd.grad(total.sum(), xi)
    return grad, (grad * eps).reshape(x.shape[0], -1).sum(1)


@pytest.mark.parametrize("ckpt", [False, True])
def test_exact_r1_equals_the_input_gradient_norm(wan, ckpt) -> None:
    """R1 on Wan's D (with and without checkpointed blocks: a double backward through the recomputation) equals
    gamma / 2 ||grad_x D||^2 from a separate autograd call."""
    disc = build(wan, blocks=(0, 2), gradient_checkpointing=ckpt)
    x, t, cond = wan_batch()
    grad, _ = _directional(disc, x, t, cond, torch.zeros_like(x))
    real = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # double backward through Wan's attention
        penalty, _ = r1_penalty(disc(real, t, **cond), real, gamma=0.2)
        penalty.backward()
    # Two heads, equal weights 1/2: D_b = (sum of head 0 + sum of head 1) / 2.
    expected = 0.5 * 0.2 * (0.5 * grad).reshape(2, -1).square().sum(1).mean()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-5, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in disc.heads.parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert all(p.grad is None for p in wan.parameters())


def test_approximate_r1_is_the_finite_difference_of_exact_r1(wan) -> None:
    """Along one direction eps, approximate R1 = gamma / 2 ((D(x + s eps) - D(x)) / s)^2, and the forward difference
    is grad D . eps + s / 2 eps^T H eps + O(s^2): its relative error against exact R1 along eps (autograd) is first
    order in s. Measured (heads seeded 0): 6.8 % at s = 4e-2, 1.8 % at 1e-2 (ratio 0.26 ~ 1/4); float32 rounding of D over s
    (~1e-6 / 1e-2) is two orders below, so the ratio is checked in [0.2, 0.3]. The heads are seeded: their
    initialisation sets the curvature term, and an unseeded one (drawn from whatever the tests before left in the
    global generator) can put the ratio at 0.15, where s = 4e-2 is not yet in the first-order regime."""
    torch.manual_seed(0)
    disc = build(wan, blocks=(1, 2))
    x, t, cond = wan_batch()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    _, slope = _directional(disc, x, t, cond, eps)
    slope = 0.5 * slope  # two heads, weights 1/2
    exact = (0.5 * slope.square()).mean()  # gamma = 1, along eps
    errors = []
    with torch.no_grad():
        base = disc(x, t, **cond)
        d0 = sum(lg.reshape(2, -1).sum(1) for lg in base) / 2
        for step in (4e-2, 1e-2):
            moved = disc(x + step * eps, t, **cond)
            approx, _ = approximate_r1_penalty(base, moved, sigma=step)
            d1 = sum(lg.reshape(2, -1).sum(1) for lg in moved) / 2
            torch.testing.assert_close(approx, (0.5 * ((d1 - d0) / step).square()).mean(), rtol=1e-5, atol=0)
            errors.append(abs(approx.item() - exact.item()) / exact.item())
    assert errors[1] < 0.05 and 0.2 < errors[1] / errors[0] < 0.3
    # Differentiable in the heads without a double backward.
    approx, _ = approximate_r1_penalty(disc(x, t, **cond), disc(x + 1e-2 * eps, t, **cond), sigma=1e-2)
    approx.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert all(p.grad is None for p in wan.parameters())


def test_ladd_bad_options_and_inputs(wan) -> None:
    with pytest.raises(OptionError, match=r"Expected `text_pooling` to be None .* or 'mean'"):
        build(wan, text_pooling="max")
    with pytest.raises(OptionError, match=r"Expected `pooled_dim` > 0 with text_pooling='mean'"):
        build(wan, text_pooling="mean", pooled_dim=0)
    disc = build(wan, blocks=0, text_pooling="mean")
    x, t, cond = wan_batch()
    with pytest.raises(ValueError, match=r"text_pooling='mean' .* but `encoder_hidden_states` is None"):
        disc(x, t)
    with pytest.raises(ShapeError, match=r"Expected `encoder_hidden_states` of shape \(2, L, 16\)"):
        disc(x, t, encoder_hidden_states=torch.randn(2, 5, 8))
    with pytest.raises(ShapeError, match=r"Expected `hidden_states` to be video latents"):
        disc(x[:, :, 0], t, **cond)
