"""Bad inputs to every discriminator, head and the feature extractor: a clear error naming the argument as the
caller passed it (issue 18), never a silent result or torch's internal error; and the dtype rule (inputs are
cast to the backbone's dtype, with or without autocast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffdistill.discriminators import (
    BottleneckHead,
    MultiLevelDiscriminator,
    MultiScaleConditionalDiscriminator,
    PointwiseConvHead,
    ReadoutHead,
    StridedConvHead,
    UNetEncoderDiscriminator,
    UNetFeatureExtractor,
    decoder_scale_levels,
    reset_module_parameters,
    run_head_float32,
    sdxl_conditions,
    tiny_sdxl_unet,
    tiny_sdxl_unet_config,
    unet_feature_levels,
)
from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks

NAN = float("nan")
INF = float("inf")
KINDS = ["lightning_cond", "lightning_uncond", "bottleneck", "multi_level", "multi_scale", "extractor"]


@pytest.fixture(scope="module")
def models(unet: nn.Module) -> dict[str, nn.Module]:
    """One of each discriminator (and a shared extractor), built once: the tests only call them."""
    return {
        "lightning_cond": UNetEncoderDiscriminator(unet, conditional=True),
        "lightning_uncond": UNetEncoderDiscriminator(unet, conditional=False),
        "bottleneck": BottleneckHead(unet),
        "multi_level": MultiLevelDiscriminator(unet),
        "multi_scale": MultiScaleConditionalDiscriminator(unet),
        "extractor": UNetFeatureExtractor(unet, ("down.0", "mid"), backbone="shared"),
    }


def _call(kind: str, model: nn.Module, x, t=250, ehs=None, added=None, **extra):
    if kind == "lightning_cond":
        extra.setdefault("cond_sample", torch.zeros(2, 4, 16, 16))
        extra.setdefault("cond_timestep", 500)
    if kind == "multi_scale":
        extra.setdefault("noise", torch.zeros(2, 4, 16, 16))
    with torch.no_grad():
        return model(x, t, ehs, added, **extra)


def _outputs(kind: str, out) -> list[torch.Tensor]:
    return list(out.values()) if kind == "extractor" else out


# ----------------------------------------------------------------------------------------------- samples
SAMPLE_CASES = {
    "int": (
        lambda x: x.long(),
        DTypeError,
        r"Expected `sample` to be a floating-point tensor, but got dtype torch.int64",
    ),
    "bool": (
        lambda x: x > 0,
        DTypeError,
        r"Expected `sample` to be a floating-point tensor, but got dtype torch.bool",
    ),
    "list": (lambda x: x.tolist(), DTypeError, r"Expected `sample` to be a torch.Tensor, but got list"),
    "none": (lambda x: None, DTypeError, r"Expected `sample` to be a torch.Tensor, but got NoneType"),
    "empty": (
        lambda x: x[:0],
        ShapeError,
        r"Expected `sample` to hold at least one sample, but got shape \(0, 4, 16, 16\)",
    ),
    "empty_spatial": (lambda x: x[..., :0], ShapeError, r"Expected `sample` to hold at least one sample"),
    "nan": (
        lambda x: x.index_fill(0, torch.tensor([1]), NAN),
        NonFiniteError,
        r"Expected `sample` to be finite",
    ),
    "inf": (
        lambda x: x.index_fill(2, torch.tensor([3]), INF),
        NonFiniteError,
        r"Expected `sample` to be finite",
    ),
    "ndim": (
        lambda x: x[0],
        ShapeError,
        r"Expected `sample` to have 4 dimensions laid out as \(B, C, H, W\)",
    ),
    "channels": (lambda x: x[:, :3], ShapeError, r"Expected `sample` to have the UNet's 4 input channels"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_sample(kind, case, models, conds, latents) -> None:
    make, error, message = SAMPLE_CASES[case]
    with pytest.raises(error, match=message):
        _call(kind, models[kind], make(latents), 250, *conds)


TIMESTEP_CASES = {
    "2d": (
        torch.zeros(2, 1),
        ShapeError,
        r"Expected `timestep` to be a number, a 0-d tensor or shape \(1,\) or \(2,\)",
    ),
    "batch": (torch.tensor([1, 2, 3]), ShapeError, r"`timestep` .* for a batch of 2, but got shape \(3,\)"),
    "empty": (torch.zeros(0), ShapeError, r"`timestep` .* but got shape \(0,\)"),
    "none": (None, DTypeError, r"Expected `timestep` to be a number or a tensor"),
    "list": ([1, 2], DTypeError, r"Expected `timestep` to be a number or a tensor .* but got list"),
    "bool": (
        torch.tensor([True, False]),
        DTypeError,
        r"Expected `timestep` to hold integer or floating timesteps",
    ),
    "nan_number": (NAN, NonFiniteError, r"Expected `timestep` to be finite, but got nan"),
    "nan_tensor": (torch.tensor([1.0, NAN]), NonFiniteError, r"Expected `timestep` to be finite"),
}


@pytest.mark.parametrize("case", list(TIMESTEP_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_timestep(kind, case, models, conds, latents) -> None:
    t, error, message = TIMESTEP_CASES[case]
    with pytest.raises(error, match=message):
        _call(kind, models[kind], latents, t, *conds)


def _bad_conditions(ehs, added):
    text, ids = added["text_embeds"], added["time_ids"]
    return {
        "ehs_batch": (
            (ehs[:1], added),
            ShapeError,
            r"Expected `encoder_hidden_states` of shape \(2, L, 32\) .* but got \(1, 8, 32\)",
        ),
        "ehs_width": (
            (ehs[..., :16], added),
            ShapeError,
            r"Expected `encoder_hidden_states` of shape \(2, L, 32\) .* but got \(2, 8, 16\)",
        ),
        "ehs_int": (
            (ehs.long(), added),
            DTypeError,
            r"`encoder_hidden_states` to be a floating-point tensor",
        ),
        "ehs_ndim": ((ehs[0], added), ShapeError, r"`encoder_hidden_states` to have 3 dimensions"),
        "ehs_empty": ((ehs[:, :0], added), ShapeError, r"`encoder_hidden_states` to hold at least one"),
        "ehs_nan": ((ehs * NAN, added), NonFiniteError, r"Expected `encoder_hidden_states` to be finite"),
        "added_tuple": ((ehs, (text, ids)), DTypeError, r"Expected `added_cond_kwargs` to be a dict"),
        "text_batch": (
            (ehs, {"text_embeds": text[:1], "time_ids": ids}),
            ShapeError,
            r"Expected `added_cond_kwargs\['text_embeds'\]` to have the batch size of `sample` \(2\)",
        ),
        "ids_batch": (
            (ehs, {"text_embeds": text, "time_ids": ids[:1]}),
            ShapeError,
            r"Expected `added_cond_kwargs\['time_ids'\]` to have the batch size of `sample` \(2\)",
        ),
        "text_int": (
            (ehs, {"text_embeds": text.long(), "time_ids": ids}),
            DTypeError,
            r"`added_cond_kwargs\['text_embeds'\]` to be a floating-point tensor",
        ),
        "ids_bool": (
            (ehs, {"text_embeds": text, "time_ids": ids > 0}),
            DTypeError,
            r"`added_cond_kwargs\['time_ids'\]` to hold the SDXL size conditions",
        ),
        "ids_ndim": (
            (ehs, {"text_embeds": text, "time_ids": ids[:, 0]}),
            ShapeError,
            r"`added_cond_kwargs\['time_ids'\]` to have 2 dimensions laid out as \(B, 6\)",
        ),
        "text_nan": (
            (ehs, {"text_embeds": text * NAN, "time_ids": ids}),
            NonFiniteError,
            r"Expected `added_cond_kwargs\['text_embeds'\]` to be finite",
        ),
        "ids_inf": (
            (ehs, {"text_embeds": text, "time_ids": ids * INF}),
            NonFiniteError,
            r"Expected `added_cond_kwargs\['time_ids'\]` to be finite",
        ),
    }


CONDITION_CASES = list(
    _bad_conditions(torch.zeros(2, 8, 32), {"text_embeds": torch.zeros(2, 32), "time_ids": torch.ones(2, 6)})
)


@pytest.mark.parametrize("case", CONDITION_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_conditions(kind, case, models, conds, latents) -> None:
    # The conditional D runs a batch of 2B; its messages still speak of the caller's batch B = 2.
    (ehs, added), error, message = _bad_conditions(*conds)[case]
    with pytest.raises(error, match=message):
        _call(kind, models[kind], latents, 250, ehs, added)


def test_bad_cond_sample_and_cond_timestep(models, conds, latents) -> None:
    disc = models["lightning_cond"]
    cases = [
        (
            {"cond_sample": latents.long()},
            DTypeError,
            r"Expected `cond_sample` to be a floating-point tensor",
        ),
        ({"cond_sample": latents[:0]}, ShapeError, r"Expected `cond_sample` to hold at least one sample"),
        ({"cond_sample": latents * NAN}, NonFiniteError, r"Expected `cond_sample` to be finite"),
        (
            {"cond_sample": latents[:, :3]},
            ShapeError,
            r"Expected `cond_sample` to have the UNet's 4 input channels",
        ),
        ({"cond_sample": latents[:1]}, ShapeError, r"Expected `cond_sample` to have the shape of `sample`"),
        (
            {"cond_timestep": torch.zeros(3)},
            ShapeError,
            r"Expected `cond_timestep` to be a number, a 0-d tensor",
        ),
        ({"cond_timestep": NAN}, NonFiniteError, r"Expected `cond_timestep` to be finite"),
        (
            {"cond_timestep": torch.tensor([1.0, INF])},
            NonFiniteError,
            r"Expected `cond_timestep` to be finite",
        ),
        ({"cond_timestep": "500"}, DTypeError, r"Expected `cond_timestep` to be a number or a tensor"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            _call("lightning_cond", disc, latents, 250, *conds, **extra)


def test_bad_noise(models, conds, latents) -> None:
    disc = models["multi_scale"]
    cases = [
        (latents.long(), DTypeError, r"Expected `noise` to be a floating-point tensor"),
        (latents[:0], ShapeError, r"Expected `noise` to hold at least one sample"),
        (latents * INF, NonFiniteError, r"Expected `noise` to be finite"),
        (latents[0], ShapeError, r"Expected `noise` to have 4 dimensions"),
        (latents[:1], ShapeError, r"Expected `noise` \(the generator's input z\) of shape \(2, 4, 16, 16\)"),
    ]
    for noise, error, message in cases:
        with pytest.raises(error, match=message):
            _call("multi_scale", disc, latents, 0, *conds, noise=noise)


def test_sample_too_small_for_the_head_names_sample(models, conds, latents) -> None:
    # The head was sized for 8x8 'mid' features (16x16 latents): 8x8 latents used to fail inside the head
    # with a message about `features`, an argument the caller never passed.
    small = latents[..., :8, :8]
    for kind in ("lightning_cond", "lightning_uncond", "bottleneck"):
        extra = {"cond_sample": small} if kind == "lightning_cond" else {}
        with pytest.raises(
            ShapeError, match=r"Expected `sample` of at least 15x15 latent pixels.*feature_resolution=8"
        ):
            _call(kind, models[kind], small, 250, *conds, **extra)
    assert [
        tuple(o.shape) for o in _call("bottleneck", models["bottleneck"], latents[..., :15, :15], 250, *conds)
    ] == [(2, 1, 1, 1)]


def test_sample_the_strided_head_does_not_tile_is_refused(models, conds, latents) -> None:
    # 16x24 latents: 8x12 'mid' features for a head sized for 8x8; its last strided conv would leave the right third
    # of the map out of every logit (audit 13), silently. A multiple of 8 on both sides (16x32) is judged whole.
    wide = torch.cat([latents, latents[..., :8]], dim=-1)
    for kind in ("lightning_cond", "lightning_uncond", "bottleneck"):
        extra = {"cond_sample": wide} if kind == "lightning_cond" else {}
        with pytest.raises(ShapeError, match=r"feature map \(8x12, stride 2\) tiles the head's feature_resolution=8.*"
                           r"multiples of 16"):  # fmt: skip
            _call(kind, models[kind], wide, 250, *conds, **extra)
    twice = torch.cat([latents, latents], dim=-1)
    assert [tuple(o.shape) for o in _call("bottleneck", models["bottleneck"], twice, 250, *conds)] == [
        (2, 1, 1, 2)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_value_checks_off_let_nan_through(kind, models, conds, latents) -> None:
    # No device sync when switched off: the NaN propagates to the output instead of raising.
    with value_checks(False):
        out = _outputs(kind, _call(kind, models[kind], latents * NAN, 250, *conds))
    assert all(torch.isnan(o).any() for o in out)
    with value_checks(False):  # a NaN timestep number is accepted too
        _call(kind, models[kind], latents, NAN, *conds)


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_and_float64_samples_are_cast_to_the_backbone_dtype(kind, models, conds, latents) -> None:
    # A bf16 sample into a float32 discriminator used to fail inside torch ("mat1 and mat2 must have the same
    # dtype"); it is cast to the backbone's dtype, exactly like the caller's own .float().
    ehs, added = conds
    model = models[kind]
    for dtype in (torch.bfloat16, torch.float64):
        x = latents.to(dtype)
        low = _outputs(
            kind, _call(kind, model, x, 250, ehs.to(dtype), {k: v.to(dtype) for k, v in added.items()})
        )
        rounded = {k: v.to(dtype).float() for k, v in added.items()}
        ref = _outputs(kind, _call(kind, model, x.float(), 250, ehs.to(dtype).float(), rounded))
        for a, b in zip(low, ref):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lightning_cond", "multi_level", "multi_scale"])
def test_bf16_latents_under_autocast_keep_float32_logits(kind, models, conds, latents) -> None:
    # A mixed-precision training loop passes bf16 latents and conditions into a float32 D under autocast.
    ehs, added = conds
    bf = torch.bfloat16
    extra = {"cond_sample": latents.to(bf)} if kind == "lightning_cond" else {}
    if kind == "multi_scale":
        extra["noise"] = latents.to(bf)
    with torch.autocast("cpu", dtype=bf):
        out = _call(
            kind,
            models[kind],
            latents.to(bf),
            250,
            ehs.to(bf),
            {k: v.to(bf) for k, v in added.items()},
            **extra,
        )
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)


def test_gradient_reaches_a_bf16_sample_in_its_dtype(models, conds) -> None:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_(True)
    # (a D with its own backbone copy: the session UNet must never receive gradients)
    models["lightning_uncond"](x, 250, *conds)[0].sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


def test_float32_inputs_into_a_bf16_backbone_without_autocast(conds, latents) -> None:
    unet = tiny_sdxl_unet().to(torch.bfloat16)
    ext = UNetFeatureExtractor(unet, ("mid",), backbone="shared")
    assert ext.compute_dtype == torch.bfloat16
    ehs, added = conds
    with torch.no_grad():
        feats = ext(latents, 10, ehs, added)["mid"]
        cast = ext(latents.bfloat16(), 10, ehs.bfloat16(), added)["mid"]  # what the caller's own cast gives
    assert feats.dtype == torch.bfloat16
    torch.testing.assert_close(feats, cast, rtol=0, atol=0)
    disc = BottleneckHead(unet)
    with torch.no_grad():
        assert disc(latents, 10, ehs, added)[0].dtype == torch.float32


def test_discriminator_runs_on_the_meta_device(unet) -> None:
    # FLOP counting (benchmarks/discriminators.py --flops) runs on meta tensors: the value checks skip them.
    import copy

    disc = UNetEncoderDiscriminator(copy.deepcopy(unet).to("meta"), conditional=False)
    ehs, added = sdxl_conditions(unet, 2, device="meta")
    out = disc(torch.empty(2, 4, 16, 16, device="meta"), 250, ehs, added)
    assert out[0].shape == (2, 1, 1, 1) and out[0].device.type == "meta"


# ----------------------------------------------------------------------------------------------- constructors
def test_constructor_messages_name_the_public_parameter(unet) -> None:
    cases = [
        (
            lambda: UNetEncoderDiscriminator(unet, level=("mid",)),
            DTypeError,
            r"Expected `level` to be one level name \(a str\)",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, level="down.7"),
            OptionError,
            r"Expected `level` to be one of \['conv_in'",
        ),
        (lambda: BottleneckHead(unet, level="bottleneck"), OptionError, r"Expected `level` to be one of"),
        (
            lambda: MultiLevelDiscriminator(unet, levels=("mid", "up.9")),
            OptionError,
            r"every entry of `levels` to be one of",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, levels=()),
            OptionError,
            r"Expected `levels` to name at least one level",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, levels=("mid", "mid")),
            OptionError,
            r"Expected `levels` without repeats",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, levels=5),
            DTypeError,
            r"Expected `levels` to be a level name or a sequence",
        ),
        (
            lambda: MultiScaleConditionalDiscriminator(unet, readout_levels=("up.7",)),
            OptionError,
            r"every entry of `readout_levels` to be one of",
        ),
        (
            lambda: UNetFeatureExtractor(unet, ("down.7",)),
            OptionError,
            r"every entry of `levels` to be one of",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, head_channels=0),
            OptionError,
            r"Expected `head_channels` to be an int >= 1, but got 0",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, head_channels=0),
            OptionError,
            r"Expected `head_channels` to be an int >= 1",
        ),
        (
            lambda: MultiScaleConditionalDiscriminator(unet, noise_channels=0),
            OptionError,
            r"`noise_channels` to be an int >= 1",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, norm_groups=0),
            OptionError,
            r"Expected `norm_groups` to be an int >= 1",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, feature_resolution=0),
            OptionError,
            r"`feature_resolution` to be an int >= 1",
        ),
        (
            lambda: BottleneckHead(unet, head_channels=2.5),
            DTypeError,
            r"Expected `head_channels` to be an int >= 1 or None",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, head_channels=40),
            OptionError,
            r"Expected `head_channels` \(40\) to be divisible by `norm_groups` \(32\).*set `head_channels`",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, norm_groups=24),
            OptionError,
            r"the channels of level 'down.0' \(the default head width\) \(32\) to be divisible by `norm_groups` \(24\)",
        ),
        (
            lambda: MultiScaleConditionalDiscriminator(unet, norm_groups=24),
            OptionError,
            r"the readout channels of level 'mid' \(64\) to be divisible by `norm_groups` \(24\)",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, conditional="yes"),
            DTypeError,
            r"Expected `conditional` to be True or False",
        ),
        (
            lambda: UNetEncoderDiscriminator(unet, trainable="no"),
            DTypeError,
            r"Expected `trainable` to be True or False or None",
        ),
        (
            lambda: MultiScaleConditionalDiscriminator(unet, multiscale_input=1),
            DTypeError,
            r"`multiscale_input` to be True",
        ),
        (
            lambda: MultiLevelDiscriminator(unet, gradient_checkpointing=None),
            DTypeError,
            r"`gradient_checkpointing` to be",
        ),
        (
            lambda: decoder_scale_levels(nn.Linear(2, 2)),
            DTypeError,
            r"Expected `unet` to be a diffusers UNet2DConditionModel",
        ),
        (
            lambda: unet_feature_levels(None),
            DTypeError,
            r"Expected `unet` to be a diffusers UNet2DConditionModel",
        ),
        (
            lambda: MultiLevelDiscriminator(nn.Conv2d(4, 4, 1)),
            DTypeError,
            r"Expected `unet` to be a diffusers",
        ),
    ]
    for build, error, message in cases:
        with pytest.raises(error, match=message):
            build()


def test_parameter_groups_and_train_mode_checks(models) -> None:
    disc = models["lightning_uncond"]
    with pytest.raises(OptionError, match=r"Expected `head_lr` to be >= 0, but got -0.1"):
        disc.parameter_groups(head_lr=-0.1, backbone_lr=1e-5)
    with pytest.raises(DTypeError, match=r"Expected `backbone_lr` to be a real number"):
        disc.parameter_groups(head_lr=1e-4, backbone_lr="1e-5")
    with pytest.raises(DTypeError, match=r"Expected `mode` to be True or False"):
        models["extractor"].train("eval")


# ----------------------------------------------------------------------------------------------- heads
HEADS = {
    "strided": lambda: StridedConvHead(16, 4, norm_groups=8),
    "pointwise": lambda: PointwiseConvHead(16, norm_groups=8),
    "readout": lambda: ReadoutHead(16, norm_groups=8),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_head_bad_features(name) -> None:
    head = HEADS[name]()
    f = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cases = [
        (f.long(), DTypeError, r"Expected `features` to be a floating-point tensor"),
        (f > 0, DTypeError, r"Expected `features` to be a floating-point tensor"),
        (f[:0], ShapeError, r"Expected `features` to hold at least one sample"),
        (f * NAN, NonFiniteError, r"Expected `features` to be finite"),
        (f[0], ShapeError, r"Expected `features` to have 4 dimensions"),
        (f[:, :8], ShapeError, r"Expected `features` of shape \(B, 16, H, W\)"),
        ("f", DTypeError, r"Expected `features` to be a torch.Tensor"),
    ]
    for features, error, message in cases:
        with pytest.raises(error, match=message):
            head(features)
    with value_checks(False):
        assert torch.isnan(head(f * NAN)).all()
    # A bf16 feature map into the float32 head (no autocast) is cast to the head's dtype.
    torch.testing.assert_close(head(f.bfloat16()), head(f.bfloat16().float()), rtol=0, atol=0)
    assert head(f.double()).dtype == torch.float32


def test_head_constructor_checks() -> None:
    cases = [
        (lambda: StridedConvHead(0, 4), OptionError, r"Expected `in_channels` to be an int >= 1, but got 0"),
        (lambda: StridedConvHead(16, -1), OptionError, r"Expected `feature_resolution` to be an int >= 1"),
        (
            lambda: StridedConvHead(16, 4, channels=0),
            OptionError,
            r"Expected `channels` to be an int >= 1, but got 0",
        ),
        (lambda: StridedConvHead(16, 4.0), DTypeError, r"Expected `feature_resolution` to be an int >= 1"),
        (
            lambda: StridedConvHead(16, 4, norm_groups=0),
            OptionError,
            r"Expected `norm_groups` to be an int >= 1",
        ),
        (
            lambda: StridedConvHead(16, 4, channels=12, norm_groups=8),
            OptionError,
            r"the head channels \(12\) to be divisible by `norm_groups` \(8\).*set `channels` to a multiple of 8",
        ),
        (
            lambda: PointwiseConvHead(16, channels=0, norm_groups=8),
            OptionError,
            r"`channels` to be an int >= 1",
        ),
        (
            lambda: PointwiseConvHead(16, norm_groups=8, negative_slope="0.2"),
            DTypeError,
            r"`negative_slope` to be a real number",
        ),
        (
            lambda: ReadoutHead(12, norm_groups=8),
            OptionError,
            r"readout channels \(`in_channels`\) \(12\) to be divisible",
        ),
        (lambda: ReadoutHead(None), DTypeError, r"Expected `in_channels` to be an int >= 1"),
    ]
    for build, error, message in cases:
        with pytest.raises(error, match=message):
            build()


def test_run_head_float32_and_reset_checks() -> None:
    head = nn.Conv2d(4, 1, 1)
    with pytest.raises(DTypeError, match=r"Expected `head` to be a torch.nn.Module, but got function"):
        run_head_float32(lambda f: f, torch.zeros(1, 4, 2, 2))
    with pytest.raises(DTypeError, match=r"Expected `features` to be a floating-point tensor"):
        run_head_float32(head, torch.zeros(1, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"Expected `features` to hold at least one sample"):
        run_head_float32(head, torch.zeros(0, 4, 2, 2))
    with pytest.raises(NonFiniteError, match=r"Expected `features` to be finite"):
        run_head_float32(head, torch.full((1, 4, 2, 2), INF))
    with pytest.raises(DTypeError, match=r"Expected `module` to be a torch.nn.Module, but got str"):
        reset_module_parameters("heads")


def test_bottleneck_classify_checks(models) -> None:
    head = models["bottleneck"]
    f = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=r"Expected `features\['mid'\]` to be finite"):
        head.classify({"mid": f * NAN})
    with pytest.raises(DTypeError, match=r"Expected `features` to be a floating-point tensor"):
        head.classify(f.long())
    with pytest.raises(DTypeError, match=r"Expected `features` to be a torch.Tensor, but got list"):
        head.classify([f])
    with pytest.raises(ShapeError, match=r"Expected `features` of shape \(B, 64, H, W\) with H, W >= 8"):
        head.classify(f[..., :4, :4])
    with pytest.raises(OptionError, match=r"Expected `features` to hold level 'mid'"):
        head.classify({"down.1": f})


# ----------------------------------------------------------------------------------------------- extractor
def test_extractor_additions_and_extra_conditions(models, conds, latents) -> None:
    ext = models["extractor"]
    ehs, added = conds
    # An addition that broadcasts used to change every sample silently.
    with pytest.raises(
        ShapeError, match=r"Expected `additions\['down.0'\]` to have the shape of the output of level"
    ):
        ext(latents, 10, ehs, added, additions={"down.0": torch.ones(1, 32, 1, 1)})
    with pytest.raises(DTypeError, match=r"Expected `additions\['down.0'\]` to be a floating-point tensor"):
        ext(latents, 10, ehs, added, additions={"down.0": torch.ones(2, 32, 8, 8, dtype=torch.long)})
    with pytest.raises(NonFiniteError, match=r"Expected `additions\['down.0'\]` to be finite"):
        ext(latents, 10, ehs, added, additions={"down.0": torch.full((2, 32, 8, 8), NAN)})
    with pytest.raises(DTypeError, match=r"Expected `additions` to be a dict"):
        ext(latents, 10, ehs, added, additions=[torch.ones(2, 32, 8, 8)])
    with pytest.raises(ShapeError, match=r"Expected `encoder_attention_mask` .* of shape \(2, 8\)"):
        ext(latents, 10, ehs, added, encoder_attention_mask=torch.ones(2, 7))
    with pytest.raises(DTypeError, match=r"Expected `cross_attention_kwargs` to be a dict or None"):
        ext(latents, 10, ehs, added, cross_attention_kwargs=0.5)
    # Conditions the UNet has no embedding for would be dropped (diffusers crashes on timestep_cond).
    with pytest.raises(
        OptionError, match=r"Expected `timestep_cond` to be None: the UNet has no guidance embedding"
    ):
        ext(latents, 10, ehs, added, timestep_cond=torch.zeros(2, 8))
    with pytest.raises(
        OptionError, match=r"Expected `class_labels` to be None: the UNet has no class embedding"
    ):
        ext(latents, 10, ehs, added, class_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(DTypeError, match=r"Expected `sample` to be a floating-point tensor"):
        ext.embed(latents.long(), 10, ehs, added)
    with pytest.raises(NonFiniteError, match=r"Expected `added_cond_kwargs\['text_embeds'\]` to be finite"):
        ext.embed(latents, 10, ehs, {**added, "text_embeds": added["text_embeds"] * NAN})


def test_guidance_embedding_unet_timestep_cond(conds, latents) -> None:
    # timestep_cond is checked against time_cond_proj_dim and cast to the trunk's dtype like the sample.
    unet = tiny_sdxl_unet(time_cond_proj_dim=8)
    ehs, added = conds
    ext = UNetFeatureExtractor(unet, ("out",), backbone="shared")
    w = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = unet(latents, 5, ehs, timestep_cond=w, added_cond_kwargs=added).sample
        torch.testing.assert_close(ext(latents, 5, ehs, added, timestep_cond=w)["out"], ref, rtol=0, atol=0)
        torch.testing.assert_close(
            ext(latents, 5, ehs, added, timestep_cond=w.double())["out"], ref, rtol=0, atol=0
        )
    with pytest.raises(
        ShapeError, match=r"Expected `timestep_cond` of shape \(2, 8\) \(the UNet's time_cond_proj_dim\)"
    ):
        ext(latents, 5, ehs, added, timestep_cond=torch.zeros(2, 4))
    with pytest.raises(
        ShapeError, match=r"Expected `timestep_cond` to have the batch size of `sample` \(2\)"
    ):
        ext(latents, 5, ehs, added, timestep_cond=torch.zeros(1, 8))
    with pytest.raises(DTypeError, match=r"Expected `timestep_cond` to be a floating-point tensor"):
        ext(latents, 5, ehs, added, timestep_cond=torch.zeros(2, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- unet configs
def test_sdxl_conditions_checks(unet) -> None:
    cases = [
        (
            lambda: sdxl_conditions(unet, -1),
            OptionError,
            r"Expected `batch_size` to be an int >= 1, but got -1",
        ),
        (
            lambda: sdxl_conditions(unet, 0),
            OptionError,
            r"Expected `batch_size` to be an int >= 1, but got 0",
        ),
        (
            lambda: sdxl_conditions(unet, 1.5),
            DTypeError,
            r"Expected `batch_size` to be an int >= 1, but got float 1.5",
        ),
        (lambda: sdxl_conditions(unet, True), DTypeError, r"Expected `batch_size` to be an int"),
        (lambda: sdxl_conditions(unet, "2"), DTypeError, r"Expected `batch_size` to be an int"),
        (lambda: sdxl_conditions(unet, 2, seq_len=0), OptionError, r"Expected `seq_len` to be an int >= 1"),
        (
            lambda: sdxl_conditions(unet, 2, dtype=torch.int64),
            DTypeError,
            r"Expected `dtype` to be a floating torch dtype",
        ),
        (
            lambda: sdxl_conditions(unet, 2, generator=0),
            DTypeError,
            r"Expected `generator` to be a torch.Generator",
        ),
        (
            lambda: sdxl_conditions(None, 2),
            DTypeError,
            r"Expected `unet` to be a UNet2DConditionModel or its config",
        ),
        (
            lambda: sdxl_conditions(tiny_sdxl_unet_config(addition_embed_type=None), 2),
            OptionError,
            r"Expected `unet` to be an SDXL-style UNet with addition_embed_type='text_time'",
        ),
        (
            lambda: sdxl_conditions(tiny_sdxl_unet_config(addition_time_embed_dim=None), 2),
            OptionError,
            r"Expected `unet`'s config to set \['addition_time_embed_dim'\]",
        ),
        (lambda: tiny_sdxl_unet(seed="0"), DTypeError, r"Expected `seed` to be an int >= 0"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # A non-square sample_size gives (H, W, 0, 0, H, W) pixel time ids (it used to fail in float()).
    _, added = sdxl_conditions(tiny_sdxl_unet_config(sample_size=(16, 24)), 1)
    assert added["time_ids"].tolist() == [[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]]
