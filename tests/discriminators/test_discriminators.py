"""Behaviour of the four UNet discriminators: shapes, conditional batching, gradients, init, state, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdistill._checks import OptionError, ShapeError
from diffdistill.discriminators import (
    BottleneckHead,
    MultiLevelDiscriminator,
    MultiScaleConditionalDiscriminator,
    StridedConvHead,
    UNetEncoderDiscriminator,
    UNetFeatureExtractor,
)
from diffdistill.losses import LatentAugment, gan_discriminator_loss, lazy_r1_penalty, mix_and_match


def _build(kind: str, unet: nn.Module) -> nn.Module:
    if kind == "lightning_cond":
        return UNetEncoderDiscriminator(unet, conditional=True)
    if kind == "lightning_uncond":
        return UNetEncoderDiscriminator(unet, conditional=False)
    if kind == "bottleneck":
        return BottleneckHead(unet)
    if kind == "multi_level":
        return MultiLevelDiscriminator(unet)
    return MultiScaleConditionalDiscriminator(unet)


def _call(kind: str, disc: nn.Module, x: torch.Tensor, conds, **extra):
    ehs, added = conds
    if kind == "lightning_cond":
        return disc(x, 250, ehs, added, cond_sample=extra.get("cond", torch.zeros_like(x)), cond_timestep=500)
    if kind == "multi_scale":
        return disc(x, 0, ehs, added, noise=extra.get("noise"))
    return disc(x, 500, ehs, added)


KINDS = ["lightning_cond", "lightning_uncond", "bottleneck", "multi_level", "multi_scale"]
SHAPES = {
    "lightning_cond": [(2, 1, 1, 1)],
    "lightning_uncond": [(2, 1, 1, 1)],
    "bottleneck": [(2, 1, 1, 1)],
    "multi_level": [(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 8, 8)],  # down.0, down.1, mid
    "multi_scale": [(2, 1, 8, 8), (2, 1, 16, 16)],  # mid, up.1: one readout per decoder scale
}


@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes_dtype_and_param_split(kind, unet, conds, latents) -> None:
    disc = _build(kind, unet)
    logits = _call(kind, disc, latents, conds)
    assert isinstance(logits, list)
    assert [tuple(t.shape) for t in logits] == SHAPES[kind]
    assert all(t.dtype == torch.float32 for t in logits)
    ids = {id(p) for p in disc.parameters()}
    head_ids = {id(p) for p in disc.head_parameters()}
    backbone_ids = {id(p) for p in disc.backbone_parameters()}
    assert head_ids and not (head_ids & backbone_ids) and head_ids | backbone_ids == ids
    groups = disc.parameter_groups(head_lr=1e-4, backbone_lr=1e-5)
    assert groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_built_on_the_backbone_device(kind, unet) -> None:
    # Heads and new input layers follow the UNet (meta stands in for a GPU here): a D built from a UNet on
    # the GPU runs there without a .to() (the first H200 run failed on heads left on the CPU).
    disc = _build(kind, copy.deepcopy(unet).to("meta"))
    assert {p.device.type for p in disc.parameters()} == {"meta"}
    assert all(p.dtype == torch.float32 for p in disc.head_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_heads_float32_under_bf16_autocast(kind, unet, conds, latents) -> None:
    disc = _build(kind, unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _call(kind, disc, latents, conds)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in logits)


def test_conditional_equals_two_separate_backbone_calls(unet, conds, latents) -> None:
    ehs, added = conds
    disc = UNetEncoderDiscriminator(unet, conditional=True)
    x_t = torch.randn_like(latents)
    t_prev, t = torch.tensor([250, 100]), torch.tensor([500, 350])
    with torch.no_grad():
        batched = disc(latents, t_prev, ehs, added, cond_sample=x_t, cond_timestep=t)[0]
        f_prev = disc.extractor(latents, t_prev, ehs, added)["mid"]
        f_t = disc.extractor(x_t, t, ehs, added)["mid"]
        separate = disc.heads[0](torch.cat([f_prev, f_t], dim=1))
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    assert disc.heads[0].in_channels == 2 * 64


def test_conditional_backbone_runs_once_with_batch_2b(unet, conds, latents) -> None:
    ehs, added = conds
    disc = UNetEncoderDiscriminator(unet, conditional=True)
    batches: list[int] = []
    handle = disc.extractor.trunk.conv_in.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    disc(latents, 250, ehs, added, cond_sample=latents, cond_timestep=500)
    handle.remove()
    assert batches == [4]


def test_gradients_reach_head_and_trainable_backbone(unet, conds, latents) -> None:
    disc = UNetEncoderDiscriminator(unet, conditional=True)
    sum(t.sum() for t in _call("lightning_cond", disc, latents, conds)).backward()
    assert all(p.grad is not None for p in disc.head_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.backbone_parameters())
    assert all(p.grad is None for p in unet.parameters())  # the teacher is untouched


@pytest.mark.parametrize("kind", ["multi_level", "frozen_copy"])
def test_frozen_teacher_never_gets_gradient(kind, conds, latents) -> None:
    from diffdistill.discriminators import tiny_sdxl_unet

    teacher = tiny_sdxl_unet().requires_grad_(False).eval()
    if kind == "multi_level":
        disc = MultiLevelDiscriminator(teacher)
    else:
        disc = UNetEncoderDiscriminator(teacher, conditional=False, trainable=False)
    x = latents.clone().requires_grad_(True)  # generator step: gradient flows through D to the input
    sum(t.mean() for t in disc(x, 500, *conds)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in disc.backbone_parameters())
    assert all(p.grad is not None for p in disc.head_parameters())


def test_bottleneck_head_shares_backbone_and_trains_it(conds, latents) -> None:
    from diffdistill.discriminators import tiny_sdxl_unet

    fake_unet = tiny_sdxl_unet(seed=3)
    head = BottleneckHead(fake_unet)
    assert list(head.backbone_parameters()) == []
    assert {k.split(".")[0] for k in head.state_dict()} == {"heads"}
    logits = head(latents, 500, *conds)
    logits[0].sum().backward()
    assert fake_unet.conv_in.weight.grad is not None  # the shared fake-score UNet is trained by the GAN loss
    assert fake_unet.conv_out.weight.grad is None  # decoder not run
    feats = UNetFeatureExtractor(fake_unet, ("mid",), backbone="shared")(latents, 500, *conds)
    torch.testing.assert_close(head.classify(feats)[0], logits[0])
    with pytest.raises(
        ValueError, match=r"Expected `features` to hold level 'mid', but it has keys \['down.0'\]"
    ):
        head.classify({"down.0": feats["mid"]})


def test_zero_init_noise_conv_leaves_output_unchanged(unet, conds, latents) -> None:
    disc = MultiScaleConditionalDiscriminator(unet)
    ehs, added = conds
    z = torch.randn_like(latents)
    with torch.no_grad():
        with_z = disc(latents, 0, ehs, added, noise=z)
        without = disc(latents, 0, ehs, added)
        # and equal to readouts on the untouched teacher's decoder features
        teacher_feats = UNetFeatureExtractor(unet, disc.levels, backbone="shared")(latents, 0, ehs, added)
        teacher_logits = [h(teacher_feats[lv]) for h, lv in zip(disc.heads, disc.levels)]
    for a, b, c in zip(with_z, without, teacher_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c)
    assert set(disc.input_strides.values()) == {2}
    sum(t.mean() for t in disc(latents, 0, ehs, added, noise=z)).backward()
    assert disc.noise_conv.weight.grad.abs().sum() > 0  # zero-initialised but trainable
    assert all(c.weight.grad.abs().sum() > 0 for c in disc.input_convs.values())


@pytest.mark.parametrize("kind", ["lightning_cond", "multi_level", "multi_scale"])
def test_reset_head_changes_only_the_head(kind, unet, conds, latents) -> None:
    disc = _build(kind, unet)
    if kind == "multi_scale":  # give the zero-initialised layers a value so the reset is visible
        with torch.no_grad():
            disc.noise_conv.weight.fill_(0.5)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    torch.manual_seed(123)
    disc.reset_head()
    after = disc.state_dict()
    head_keys = {k for k in before if k.startswith("heads.") and k.endswith("weight") and before[k].ndim == 4}
    assert head_keys and all(not torch.equal(before[k], after[k]) for k in head_keys)
    for k in before:
        if k.startswith("extractor."):
            assert torch.equal(before[k], after[k]), k
    if kind == "multi_scale":
        assert disc.noise_conv.weight.abs().sum() == 0


@pytest.mark.parametrize("kind", ["lightning_cond", "multi_scale"])
def test_safetensors_state_dict_round_trip(kind, unet, conds, latents, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    disc = _build(kind, unet)
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ref = _call(kind, disc, latents, conds, noise=torch.ones_like(latents))
    path = tmp_path / "d.safetensors"
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(path))
    fresh = _build(kind, unet)
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        out = _call(kind, fresh, latents, conds, noise=torch.ones_like(latents))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_augment_is_shared_by_the_pair_and_off_in_eval(unet, conds, latents) -> None:
    disc = UNetEncoderDiscriminator(unet, conditional=True, augment=LatentAugment("bgc"))
    ehs, added = conds
    seen: list[torch.Tensor] = []
    handle = disc.extractor.trunk.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    disc.train()
    disc(
        latents,
        250,
        ehs,
        added,
        cond_sample=latents.clone(),
        cond_timestep=250,
        generator=torch.Generator().manual_seed(0),
    )
    disc.eval()
    disc(latents, 250, ehs, added, cond_sample=latents.clone(), cond_timestep=250)
    handle.remove()
    aug_in, eval_in = seen
    torch.testing.assert_close(aug_in[:2], aug_in[2:], rtol=0, atol=0)  # identical draw on the pair
    assert not torch.allclose(aug_in[:2], latents)
    torch.testing.assert_close(eval_in[:2], latents, rtol=0, atol=0)


def test_mix_and_match_and_single_sample_lazy_r1(unet, conds, latents) -> None:
    disc = MultiScaleConditionalDiscriminator(unet)
    ehs, added = conds
    z = torch.randn_like(latents)
    gen = torch.Generator().manual_seed(0)
    neg = mix_and_match(
        latents, {"encoder_hidden_states": ehs, "added_cond_kwargs": added}, z, mismatch="cond", generator=gen
    )
    fake = disc(
        neg.latents, 0, neg.cond["encoder_hidden_states"], neg.cond["added_cond_kwargs"], noise=neg.noise
    )
    real = disc(latents, 0, ehs, added, noise=z)
    d_loss, _ = gan_discriminator_loss(real, fake)
    cond = {"timestep": 0, "encoder_hidden_states": ehs, "added_cond_kwargs": added, "noise": z}
    # R1 differentiates twice; the fused SDPA kernels have no double backward, the math kernel does.
    with sdpa_kernel(SDPBackend.MATH):
        r1, logs = lazy_r1_penalty(disc, latents, step=0, every=16, num_samples=1, cond=cond, generator=gen)
    assert torch.isfinite(d_loss) and float(r1.detach()) > 0 and float(logs["r1_active"]) == 1.0
    (d_loss + r1).backward()
    assert all(p.grad is not None for p in disc.head_parameters())


def test_gradient_checkpointing_discriminator(unet, conds, latents) -> None:
    torch.manual_seed(0)
    a = UNetEncoderDiscriminator(unet, conditional=False)
    torch.manual_seed(0)
    b = UNetEncoderDiscriminator(unet, conditional=False, gradient_checkpointing=True)
    runs = []  # forward calls of a block per step: checkpointing recomputes it in backward
    for d in (a, b):
        calls = [0]
        block = d.extractor.trunk.down_blocks[0]
        hook = block.register_forward_pre_hook(lambda m, args, c=calls: c.__setitem__(0, c[0] + 1))
        d(latents, 500, *conds)[0].sum().backward()
        hook.remove()
        runs.append(calls[0])
    assert runs == [1, 2]
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- errors
def test_errors_name_the_missing_condition(unet, conds, latents) -> None:
    ehs, added = conds
    cond_d = UNetEncoderDiscriminator(unet, conditional=True)
    with pytest.raises(ValueError, match=r"conditional=True and needs \['cond_sample', 'cond_timestep'\]"):
        cond_d(latents, 250, ehs, added)
    with pytest.raises(
        ShapeError, match=r"Expected `cond_sample` to have the shape of `sample` \(2, 4, 16, 16\)"
    ):
        cond_d(latents, 250, ehs, added, cond_sample=latents[:1], cond_timestep=500)
    with pytest.raises(
        ShapeError, match=r"Expected `added_cond_kwargs\['text_embeds'\]` to have the batch size"
    ):
        cond_d(
            latents,
            250,
            ehs,
            {**added, "text_embeds": added["text_embeds"][:1]},
            cond_sample=latents,
            cond_timestep=5,
        )
    with pytest.raises(
        ValueError, match=r"which needs `added_cond_kwargs` with 'text_embeds' and 'time_ids'"
    ):
        cond_d(latents, 250, ehs, None, cond_sample=latents, cond_timestep=500)
    uncond = UNetEncoderDiscriminator(unet, conditional=False)
    with pytest.raises(OptionError, match=r"conditional=False, so it takes no `cond_sample`"):
        uncond(latents, 250, ehs, added, cond_sample=latents, cond_timestep=500)
    ms = MultiScaleConditionalDiscriminator(unet)
    with pytest.raises(
        ShapeError, match=r"Expected `noise` \(the generator's input z\) of shape \(2, 4, 16, 16\)"
    ):
        ms(latents, 0, ehs, added, noise=latents[:, :2])
    with pytest.raises(ValueError, match=r"needs `encoder_hidden_states`"):
        MultiLevelDiscriminator(unet)(latents, 0, None, added)


def test_head_errors(unet) -> None:
    with pytest.raises(OptionError, match=r"head channels \(48\) to be divisible by `norm_groups` \(32\)"):
        StridedConvHead(48, 8)
    with pytest.raises(ShapeError, match=r"Expected `features` of shape \(B, 64, H, W\) with H, W >= 8"):
        StridedConvHead(64, 8)(torch.zeros(1, 64, 4, 4))
    with pytest.raises(OptionError, match=r"divisible by `norm_groups`"):
        UNetEncoderDiscriminator(unet, head_channels=40)
    with pytest.raises(TypeError, match=r"Expected `augment` to be a module"):
        UNetEncoderDiscriminator(unet, augment="bgc")  # type: ignore[arg-type]


def test_bf16_backbone_with_float32_new_layers_without_autocast(conds, latents) -> None:
    from diffdistill.discriminators import tiny_sdxl_unet

    unet = tiny_sdxl_unet().to(torch.bfloat16)
    disc = MultiScaleConditionalDiscriminator(
        unet
    )  # backbone copy in bf16, z-conv / input convs / heads float32
    ehs, added = conds
    bf = torch.bfloat16
    logits = disc(
        latents.to(bf), 0, ehs.to(bf), {k: v.to(bf) for k, v in added.items()}, noise=latents.to(bf)
    )
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in logits)
    assert disc.noise_conv.weight.dtype == torch.float32


def test_heads_keep_float64_for_reference_checks() -> None:
    # Logits come out in at least float32: bf16 features with a float32 head give float32, a float64 head
    # gives float64 (exactly the head's own output), so float64 references and gradcheck keep their precision.
    from diffdistill.discriminators import StridedConvHead, run_head_float32

    torch.manual_seed(0)
    head = StridedConvHead(8, 8, norm_groups=4).double()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    out = run_head_float32(head, x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, head(x), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: run_head_float32(head, t), (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run_head_float32(head.float(), x.detach().bfloat16())
    assert low.dtype == torch.float32


def test_default_levels_at_sdxl_structure() -> None:
    # PCM's discriminator_sdxl.py reads the 3 down blocks and the mid block (320/640/1280/1280 channels);
    # Diffusion2GAN reads one level per decoder scale (SDXL: 32, 64 and 128 latent px at 1024 px).
    from diffusers import UNet2DConditionModel

    from diffdistill.discriminators import decoder_scale_levels, sdxl_unet_config

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**sdxl_unet_config())
    pcm = MultiLevelDiscriminator(sdxl.requires_grad_(False))
    assert pcm.levels == ("down.0", "down.1", "down.2", "mid")
    assert [pcm.extractor.channels[level] for level in pcm.levels] == [320, 640, 1280, 1280]
    levels = decoder_scale_levels(sdxl)
    assert levels == ("mid", "up.0", "up.2")
    assert decoder_scale_levels(nn.DataParallel(sdxl)) == levels  # wrapped UNets, as the extractor takes
    assert [pcm.extractor.strides[level] for level in levels] == [4, 2, 1]
