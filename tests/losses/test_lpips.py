"""Tests of LatentLPIPS, ELatentLPIPS and PixelLPIPS (diffdistill.losses.lpips)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.losses import ELatentLPIPS, LatentLPIPS, PixelLPIPS
from diffdistill.losses.latent_augment import sym6_filter
from diffdistill.losses.lpips import (
    LATENT_SPECS,
    RELEASED_WEIGHTS_URL,
    LatentVGG16BN,
    download_weights,
    load_latent_lpips_state_dict,
    main,
)

HAS_REFERENCE = importlib.util.find_spec("elatentlpips") is not None
needs_reference = pytest.mark.skipif(not HAS_REFERENCE, reason="reference package elatentlpips not installed")

# Per-sample values (reduction="none") of the seeded weights and inputs below; computed by this
# implementation and equal to the official package's `ensembling=False` output (see
# test_parity_with_reference). Keys: latent -> (without normalize, with normalize=True).
GOLDEN = {
    "sdxl": ([1.302738, 1.294568, 1.333765], [0.195337, 0.194360, 0.200500]),
    "sd3": ([1.307427, 1.321056, 1.346761], [1.913859, 1.932140, 1.968588]),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded_state_dict(model: LatentLPIPS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic, non-trivial state dict (random BN statistics, positive heads)."""
    g = _gen(seed)
    out = {}
    for key, v in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = v.clone()
        elif key.startswith("lin"):
            out[key] = torch.rand(v.shape, generator=g) * 0.2
        elif key.endswith("running_var"):
            out[key] = 1 + 0.2 * torch.rand(v.shape, generator=g)
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim == 4:
            out[key] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        else:  # BN weight
            out[key] = 1 + 0.1 * torch.randn(v.shape, generator=g)
    return out


def official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the reference layout: duplicate `lins.N` heads plus augmentation buffers."""
    out = dict(sd)
    for k in range(5):
        out[f"lins.{k}.model.1.weight"] = sd[f"lin{k}.model.1.weight"].clone()
    out["augment.p"] = torch.tensor(1.0)
    out["augment.Hz_geom"] = sym6_filter()
    return out


def _inputs(channels: int, size: int = 16, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(123)
    return torch.randn(batch, channels, size, size, generator=g), torch.randn(
        batch, channels, size, size, generator=g
    )


@pytest.fixture(scope="module")
def models() -> dict[str, LatentLPIPS]:
    out = {}
    for latent in ("sdxl", "sd3"):
        m = LatentLPIPS(latent, weights=None, reduction="none")
        m.load_state_dict(seeded_state_dict(m))
        out[latent] = m
    return out


# ------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("latent", ["sdxl", "sd3"])
def test_golden_values(models: dict[str, LatentLPIPS], latent: str) -> None:
    m = models[latent]
    x, y = _inputs(m.in_channels)
    with torch.no_grad():
        plain, norm = m(x, y), m(x, y, normalize=True)
    want_plain, want_norm = GOLDEN[latent]
    torch.testing.assert_close(plain, torch.tensor(want_plain), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm, torch.tensor(want_norm), atol=1e-5, rtol=0)


def _reference_model(latent: str, augment: str | None = None):  # type: ignore[no-untyped-def]
    from unittest import mock

    def keep(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return t

    # Building the reference allocates two full torchvision VGG16-BNs (with 100M-parameter
    # classifiers); skip their random init, every tensor used is overwritten by a seeded state dict.
    no_init = [
        mock.patch.object(torch.nn.init, n, keep)
        for n in ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from elatentlpips import ELatentLPIPS as Reference
        from elatentlpips.vgg16 import LatentVGG16BN as ReferenceTrunk

        channels = LATENT_SPECS[latent][0]
        for patch in no_init:
            patch.start()
        try:
            ref = Reference(pretrained=False, pnet_rand=True, encoder=latent, augment=augment, verbose=False)
            # The reference's random-trunk option builds an RGB VGG (3 input channels, all pools):
            # swap in its latent trunk so the architectures agree.
            latent_features = ReferenceTrunk(channels).model.features
        finally:
            for patch in no_init:
                patch.stop()
    for k in range(1, 6):
        part = getattr(ref.net, f"slice{k}")
        for name in list(part._modules):
            part._modules[name] = latent_features[int(name)]
    return ref.eval()


@pytest.fixture(scope="module")
def reference_models() -> dict[str, torch.nn.Module]:
    if not HAS_REFERENCE:
        pytest.skip("reference package elatentlpips not installed")
    torch.manual_seed(0)
    return {latent: _reference_model(latent, augment="bg") for latent in ("sdxl", "sd3")}


@needs_reference
@pytest.mark.parametrize("latent", ["sdxl", "sd3"])
def test_parity_with_reference(
    models: dict[str, LatentLPIPS], reference_models: dict[str, torch.nn.Module], latent: str
) -> None:
    ref = reference_models[latent]
    ours = models[latent]
    ref.load_state_dict(official_layout(ours.state_dict()), strict=True)
    x, y = _inputs(ours.in_channels)
    with torch.no_grad():
        for normalize in (False, True):
            want = ref(x, y, ensembling=False, normalize=normalize).flatten()
            torch.testing.assert_close(ours(x, y, normalize=normalize), want, atol=1e-5, rtol=0)
        want = ref(x, y, ensembling=False, add_l1_loss=False).flatten()
        no_l1 = LatentLPIPS(latent, weights=None, l1_weight=0, reduction="none")
        no_l1.load_state_dict(ours.state_dict())
        torch.testing.assert_close(no_l1(x, y), want, atol=1e-5, rtol=0)


@needs_reference
@pytest.mark.parametrize("latent", ["sdxl", "sd3"])
def test_reference_state_dict_loads_strict_and_ensemble_matches(
    reference_models: dict[str, torch.nn.Module], latent: str
) -> None:
    ref = reference_models[latent]
    seeded = LatentLPIPS(latent, weights=None)
    ref.load_state_dict(official_layout(seeded_state_dict(seeded, seed=1)), strict=True)
    sd = ref.state_dict()
    assert any(k.startswith("lins.") for k in sd) and "augment.Hz_geom" in sd
    ours = ELatentLPIPS(latent, weights=None, augment="bg", reduction="none")
    ours.load_state_dict(sd, strict=True)
    x, y = _inputs(ours.in_channels)
    with torch.no_grad():
        torch.manual_seed(5)
        want = ref(x, y).flatten()  # ensembling=True, one draw from the global generator
        torch.manual_seed(5)
        got = ours(x, y)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("augment", ["b", "g", "c", "o", "co", "bg", "bgc", "bgco"])
@pytest.mark.parametrize("latent", ["sdxl", "sd3"])
def test_identical_inputs_give_exact_zero_for_every_draw(latent: str, augment: str) -> None:
    m = ELatentLPIPS(latent, weights=None, augment=augment, num_draws=3, reduction="none")
    x, _ = _inputs(m.in_channels, size=8, batch=2)
    with torch.no_grad():
        d = m(x, x.clone(), generator=_gen(0))
    assert torch.equal(d, torch.zeros(2))


def test_reductions_and_spatial(models: dict[str, LatentLPIPS]) -> None:
    ours = models["sdxl"]
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        per = ours(x, y)
        mean = LatentLPIPS("sdxl", weights=None, reduction="mean")
        mean.load_state_dict(ours.state_dict())
        total = LatentLPIPS("sdxl", weights=None, reduction="sum")
        total.load_state_dict(ours.state_dict())
        torch.testing.assert_close(mean(x, y), per.mean())
        torch.testing.assert_close(total(x, y), per.sum())
        m = ours(x, y, spatial=True)
    assert per.shape == (2,) and m.shape == (2, 1, 8, 8)
    assert torch.all(m >= 0)


def test_num_draws_is_one_batched_call_of_k_draws(models: dict[str, LatentLPIPS]) -> None:
    k = 3
    ens = ELatentLPIPS("sdxl", weights=None, augment="bg", num_draws=k, reduction="none")
    ens.load_state_dict(models["sdxl"].state_dict())
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        got = ens(x, y, generator=_gen(4))
        prm = ens.augment.sample(k * 2, generator=_gen(4))
        xa, ya = ens.augment(x.repeat(k, 1, 1, 1), y.repeat(k, 1, 1, 1), params=prm)
        plain = LatentLPIPS("sdxl", weights=None, l1_weight=0, reduction="none")
        plain.load_state_dict(models["sdxl"].state_dict())
        want = plain(xa, ya).reshape(k, 2).mean(0) + (x - y).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Reproducible with a generator, different across generators.
    with torch.no_grad():
        assert torch.equal(ens(x, y, generator=_gen(4)), got)
        assert not torch.equal(ens(x, y, generator=_gen(5)), got)


def test_augment_none_equals_latent_lpips(models: dict[str, LatentLPIPS]) -> None:
    e = ELatentLPIPS("sd3", weights=None, augment=None, reduction="none")
    e.load_state_dict(models["sd3"].state_dict())
    x, y = _inputs(16, size=8)
    with torch.no_grad():
        torch.testing.assert_close(e(x, y), models["sd3"](x, y))


# ------------------------------------------------------------------------------------------------
# Gradients, precision, frozen weights


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    m = LatentLPIPS("sdxl", weights=None, reduction="sum").double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: m(a, y), (x,), fast_mode=True)


def test_gradcheck_float64_with_augmentation() -> None:
    torch.manual_seed(0)
    m = ELatentLPIPS("sdxl", weights=None, augment="bgco", reduction="sum").double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: m(a, y, generator=_gen(3)), (x,), fast_mode=True)


def test_frozen_and_eval_but_differentiable_in_input() -> None:
    m = ELatentLPIPS("sdxl", weights=None)
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training and not m.net.training
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = torch.randn(2, 4, 8, 8)
    value = m(x, y, generator=_gen(0))  # the target branch runs without an autograd graph
    with torch.no_grad():
        torch.testing.assert_close(value, m(x.detach(), y, generator=_gen(0)), atol=1e-6, rtol=1e-6)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_autocast_gives_finite_float32(models: dict[str, LatentLPIPS]) -> None:
    m = ELatentLPIPS("sdxl", weights=None, augment="bg", reduction="none")
    m.load_state_dict(models["sdxl"].state_dict())
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        ref = m(x, y, generator=_gen(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x.bfloat16(), y.bfloat16(), generator=_gen(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------
# Weights: state dict layout, files, conversion


def test_state_dict_has_reference_names_without_duplicates() -> None:
    sd = ELatentLPIPS("sdxl", weights=None, augment="bgco").state_dict()
    assert "net.slice1.0.weight" in sd and "net.slice5.41.running_var" in sd
    assert [k for k in sd if k.startswith("lin")] == [f"lin{k}.model.1.weight" for k in range(5)]
    assert not any(k.startswith(("lins.", "augment.")) for k in sd)
    assert sd["net.slice1.0.weight"].shape == (64, 4, 3, 3)
    assert len(sd) == 103 - 5 - 2  # the reference holds 5 duplicate heads and 2 augmentation buffers


def test_official_layout_loads_strict_and_duplicates_are_checked(models: dict[str, LatentLPIPS]) -> None:
    sd = official_layout(models["sdxl"].state_dict())
    m = ELatentLPIPS("sdxl", weights=None)
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "lins.0.model.1.weight" in sd  # the caller's dict is not modified
    bad = dict(sd)
    bad["lins.2.model.1.weight"] = bad["lins.2.model.1.weight"] + 1
    with pytest.raises(
        RuntimeError, match=r"duplicate head `lins.2.model.1.weight` \[1, 256, 1, 1\] disagrees"
    ):
        m.load_state_dict(bad, strict=True)
    bad = dict(sd)
    bad["augment.Hz_geom"] = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"`augment.Hz_geom` must be the 12-tap sym6 filter"):
        m.load_state_dict(bad, strict=True)
    missing = dict(sd)
    del missing["net.slice3.14.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "net.slice3.14.weight"'):
        m.load_state_dict(missing, strict=True)
    no_head = dict(sd)
    del no_head["lin4.model.1.weight"]  # its duplicate alone does not stand in for it
    with pytest.raises(RuntimeError, match=r"lin4.model.1.weight"):
        m.load_state_dict(no_head, strict=True)


def test_safetensors_round_trip(models: dict[str, LatentLPIPS], tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    models["sd3"].save_pretrained(path)
    loaded = LatentLPIPS("sd3", weights=path, reduction="none")
    x, y = _inputs(16, size=8)
    with torch.no_grad():
        assert torch.equal(loaded(x, y), models["sd3"](x, y))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["in_channels"] == "16"
        assert not any(k.startswith("lins.") for k in f.keys())  # noqa: SIM118


def test_official_checkpoint_formats(models: dict[str, LatentLPIPS], tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    sd = models["sdxl"].state_dict()
    tuned = tmp_path / "sdxl_latest_vgg16_tuned.pth"
    torch.save(official_layout(sd), tuned)
    x, y = _inputs(4, size=8)
    m = LatentLPIPS("sdxl", weights=tuned, reduction="none")
    with torch.no_grad():
        assert torch.equal(m(x, y), models["sdxl"](x, y))
    # ImageNet trunk: `state_dict` with `module.model.features.N` keys and a classifier.
    trunk_sd = {}
    for key, v in sd.items():
        if key.startswith("net."):
            _, _, idx, param = key.split(".", 3)
            trunk_sd[f"module.model.features.{idx}.{param}"] = v
    trunk_sd["module.model.classifier.0.weight"] = torch.zeros(8, 16)
    trunk = tmp_path / "sdxl_latent_vgg16.pth.tar"
    torch.save({"state_dict": trunk_sd, "best_acc1": torch.tensor(68.9), "epoch": 90}, trunk)
    with caplog.at_level(logging.WARNING, logger="diffdistill.losses.lpips"):
        t = LatentLPIPS("sdxl", weights=trunk)
    assert "uncalibrated" in caplog.text
    for key, v in t.state_dict().items():
        if key.startswith("net."):
            assert torch.equal(v, sd[key]), key
        else:
            assert torch.equal(v, torch.ones_like(v)), key


def test_convert_command(models: dict[str, LatentLPIPS], tmp_path: Path) -> None:
    src = tmp_path / "sd3_latest_vgg16_tuned.pth"
    torch.save(official_layout(models["sd3"].state_dict()), src)
    out = tmp_path / "sd3.safetensors"
    assert main(["convert", str(src), str(out), "--latent", "sd3"]) == 0
    out2 = tmp_path / "sd3_cli.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "diffdistill.losses.lpips", "convert", str(src), str(out2)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # no prints
    a = load_latent_lpips_state_dict(out)[0]
    b = load_latent_lpips_state_dict(out2)[0]
    assert a.keys() == b.keys() == models["sd3"].state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Errors


def test_wrong_channel_count_names_expected_and_found() -> None:
    m = LatentLPIPS("sdxl", weights=None)
    with pytest.raises(
        ShapeError, match=r"Expected `input` to have 4 channels for latent='sdxl'.*got shape \(2, 16, 8, 8\)"
    ):
        m(torch.zeros(2, 16, 8, 8), torch.zeros(2, 16, 8, 8))
    with pytest.raises(
        ShapeError, match=r"same shape, but got input \(2, 4, 8, 8\) and target \(2, 4, 8, 9\)"
    ):
        m(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 9))
    with pytest.raises(ShapeError, match=r"at least 4×4.*\(1, 4, 2, 8\)"):
        m(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))


def test_mismatched_checkpoint_names_keys_and_shapes(models: dict[str, LatentLPIPS], tmp_path: Path) -> None:
    path = tmp_path / "sd3.safetensors"
    models["sd3"].save_pretrained(path)
    with pytest.raises(
        ShapeError,
        match=r"`net.slice1.0.weight` expected \[64, 4, 3, 3\], found \[64, 16, 3, 3\].*16-channel latents.*pass latent=16",
    ):
        LatentLPIPS("sdxl", weights=path)
    sd = dict(models["sdxl"].state_dict())
    del sd["lin3.model.1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(sd, broken)
    with pytest.raises(
        ValueError, match=r"missing keys \['lin3.model.1.weight'\]; unexpected keys \['extra.weight'\]"
    ):
        LatentLPIPS("sdxl", weights=broken)
    not_trunk = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2)}}, not_trunk)
    with pytest.raises(ValueError, match=r"no `module.model.features.N` trunk keys"):
        LatentLPIPS("sdxl", weights=not_trunk)


def test_option_errors() -> None:
    with pytest.raises(
        OptionError, match=r"Expected `latent` to be one of \['sd15', 'sd21', 'sdxl', 'sd3', 'flux'\]"
    ):
        LatentLPIPS("sd2")
    with pytest.raises(OptionError, match=r"Expected `reduction` to be one of \['mean', 'sum', 'none'\]"):
        LatentLPIPS(4, reduction="avg")
    with pytest.raises(OptionError, match=r"Expected `num_draws` to be an int >= 1, but got 0"):
        ELatentLPIPS(num_draws=0)
    with pytest.raises(OptionError, match=r"letters \['b', 'g', 'c', 'o'\]"):
        ELatentLPIPS(augment="bgz")
    with pytest.raises(OptionError, match=r"Expected `l1_weight` to be >= 0"):
        LatentLPIPS(l1_weight=-1)
    with pytest.raises(OptionError, match=r"`normalize=True` needs a known VAE latent, but latent=4"):
        LatentLPIPS(4, weights=None)(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), normalize=True)
    with pytest.raises(
        OptionError, match=r"`spatial=True` is not defined for ELatentLPIPS with augmentation"
    ):
        ELatentLPIPS(weights=None)(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), spatial=True)


# ------------------------------------------------------------------------------------------------
# Pixel-space baseline


def _tiny_decoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Tanh()
    )


def test_pixel_lpips_matches_lpips_on_decoded_images() -> None:
    import lpips

    dec = _tiny_decoder()
    torch.manual_seed(1)
    pix = PixelLPIPS(dec, net="vgg", latent="sdxl", reduction="none")
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        got = pix(x, y)
        scale = LATENT_SPECS["sdxl"][1]
        with warnings.catch_warnings():  # torchvision's deprecation of lpips' `pretrained=`
            warnings.simplefilter("ignore")
            ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        ref.load_state_dict(pix.lpips.state_dict())
        want = ref(dec(x / scale), dec(y / scale)).flatten()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(pix(x / scale, y / scale, normalize=True), want)
        assert pix(x, y, spatial=True).shape == (2, 1, 32, 32)
    assert all(not p.requires_grad for p in pix.parameters())
    xg = x.clone().requires_grad_(True)
    value = pix(xg, y)  # decodes the target without a graph
    torch.testing.assert_close(value.detach(), want)
    value.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_pixel_lpips_without_pretrained_heads_sums_the_layers() -> None:
    """``pretrained_heads=False``: every head weight is 1, so the distance is the plain sum over layers of the mean
    squared difference of unit-normalised features (lpips' ``LPIPS(lpips=False)``), never negative -- the lpips
    package alone would draw the unloaded heads at random (signed)."""
    import lpips

    dec = _tiny_decoder()
    pix = PixelLPIPS(dec, net="alex", latent=None, pretrained_heads=False, reduction="none")
    assert all(bool((head.model[-1].weight == 1).all()) for head in pix.lpips.lins)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = lpips.LPIPS(net="alex", lpips=False, pnet_rand=True, verbose=False)
    plain.net.load_state_dict(pix.lpips.net.state_dict())
    x, y = _inputs(4, size=8, batch=3)
    with torch.no_grad():
        got = pix(x, y)
        want = plain(dec(x), dec(y)).flatten()
    assert bool((got >= 0).all())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_pixel_lpips_trunk_weights(tmp_path: Path) -> None:
    dec = _tiny_decoder()
    pix = PixelLPIPS(dec, net="alex", pretrained_heads=False)
    feats = {
        f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": torch.randn_like(v)
        for k, v in pix.lpips.net.state_dict().items()
    }
    path = tmp_path / "alexnet.pth"
    torch.save(feats, path)
    loaded = PixelLPIPS(dec, net="alex", pretrained_heads=False, trunk_weights=path)
    assert torch.equal(loaded.lpips.net.slice1[0].weight, feats["features.0.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ShapeError, match=r"`features.0.weight` expected \[64, 3, 11, 11\], found \[1\]"):
        PixelLPIPS(dec, net="alex", pretrained_heads=False, trunk_weights=bad)
    with pytest.raises(OptionError, match=r"Expected `net` to be one of \['vgg', 'alex', 'squeeze'\]"):
        PixelLPIPS(dec, net="resnet")


# torch.compile and host synchronisation: tests/losses/test_lpips_compile.py


# ------------------------------------------------------------------------------------------------
# No weights: the random trunk is explicit (weights=None) or warned about


def test_missing_weights_warn_at_the_call_site_and_none_is_silent() -> None:
    with pytest.warns(UserWarning) as record:
        LatentLPIPS("sdxl")
    (w,) = record
    assert w.filename == __file__  # points at the caller's line, not into the library
    msg = str(w.message)
    assert re.search(r"LatentLPIPS\(latent='sdxl'\) was built without `weights`.*randomly initialised", msg)
    assert RELEASED_WEIGHTS_URL.format(latent="sdxl") in msg and "download_weights(" in msg
    assert "weights=None" in msg
    with pytest.warns(UserWarning, match=r"ELatentLPIPS\(latent='sd3'\) was built without `weights`") as rec:
        ELatentLPIPS("sd3")  # through super().__init__: still the caller's line
    assert rec[0].filename == __file__
    with pytest.warns(
        UserWarning, match=r"No weights are released for a 48-channel latent.*train_latent_lpips"
    ):
        LatentLPIPS(48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatentLPIPS("sdxl", weights=None)
        ELatentLPIPS("sdxl", weights=None)


def test_missing_weights_warn_once_per_call_site() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per location
        for _ in range(3):
            LatentLPIPS(4)
    assert len(record) == 1


def test_weight_loaders_are_exported_lazily() -> None:
    import diffdistill.losses as losses
    from diffdistill.losses import lpips as module

    for name in ("download_weights", "load_latent_lpips_state_dict", "RELEASED_WEIGHTS_URL"):
        assert name in losses.__all__ and getattr(losses, name) is getattr(module, name)
    code = (
        "import sys, diffdistill.losses as L; heavy = ('kornia', 'einops', 'safetensors'); "
        "before = [m for m in heavy if m in sys.modules]; L.load_latent_lpips_state_dict; "
        "print(before, 'kornia' in sys.modules, 'einops' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # kornia is no longer needed by the augmentation (closed-form frame change and colour transform).
    assert out.stdout.split() == ["[]", "False", "True"], out.stdout


# ------------------------------------------------------------------------------------------------
# Dtypes at the boundary: inputs are cast to the network's dtype, the loss is >= float32


def _seeded(cls: type, **kwargs: object) -> LatentLPIPS:
    m = cls("sdxl", weights=None, reduction="none", **kwargs)
    m.load_state_dict(seeded_state_dict(m))
    return m


@pytest.mark.parametrize("cls", [LatentLPIPS, ELatentLPIPS])
def test_float64_and_bf16_inputs_into_a_float32_network(cls: type) -> None:
    m = _seeded(cls)
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        want = m(x, y, generator=_gen(0))
        got64 = m(x.double(), y.double(), generator=_gen(0))  # was: RuntimeError "Input type (double)..."
        got_mixed = m(x, y.double(), generator=_gen(0))
        got16 = m(x.bfloat16(), y.bfloat16(), generator=_gen(0))
    assert got64.dtype == got_mixed.dtype == torch.float64 and got16.dtype == torch.float32
    torch.testing.assert_close(got64.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_mixed.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got16, want, atol=5e-2, rtol=5e-2)  # the inputs' bf16 rounding


def test_network_dtype_other_than_the_inputs() -> None:
    m = _seeded(LatentLPIPS)
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        want = m(x, y)
        bf16_net = _seeded(LatentLPIPS).bfloat16()
        got_bf16 = bf16_net(x, y)  # was: RuntimeError "Input type (float) and bias type (BFloat16)..."
        f64_net = _seeded(LatentLPIPS).double()
        got_f64 = f64_net(x, y)
    assert got_bf16.dtype == torch.float32 and got_f64.dtype == torch.float64
    torch.testing.assert_close(got_f64.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_bf16, want, atol=0.1, rtol=0.1)  # bf16 trunk weights and activations
    xg = x.double().requires_grad_(True)
    m(xg, y).sum().backward()  # the gradient reaches a float64 input through the float32 trunk
    assert xg.grad is not None and xg.grad.dtype == torch.float64 and xg.grad.abs().sum() > 0


def test_pixel_lpips_dtypes() -> None:
    dec = _tiny_decoder()
    pix = PixelLPIPS(dec, net="alex", latent="sdxl", pretrained_heads=False, reduction="none")
    x, y = _inputs(4, size=8, batch=2)
    with torch.no_grad():
        want = pix(x, y)
        got64 = pix(x.double(), y.double())
        dec64 = PixelLPIPS(_tiny_decoder().double(), net="alex", latent="sdxl", pretrained_heads=False)
        dec64.lpips.load_state_dict(pix.lpips.state_dict())
        got_dec64 = dec64(x, y, reduction="none")  # was: RuntimeError "Input type (double)..." in lpips
    assert got64.dtype == torch.float64 and got_dec64.dtype == torch.float32
    torch.testing.assert_close(got64.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dec64, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad inputs: every error names the argument as the caller passed it


_X = torch.zeros(2, 4, 8, 8)
_NAN = torch.full((2, 4, 8, 8), float("nan"))
_BAD_FORWARD = [
    ("input None", (None, _X), {}, DTypeError, r"`input` to be a torch.Tensor, but got NoneType"),
    ("target list", (_X, [1.0]), {}, DTypeError, r"`target` to be a torch.Tensor, but got list"),
    ("input int", (_X.long(), _X), {}, DTypeError, r"`input` to be a floating-point tensor.*torch.int64"),
    ("target bool", (_X, _X.bool()), {}, DTypeError, r"`target` to be a floating-point tensor.*torch.bool"),
    ("empty batch", (_X[:0], _X[:0]), {}, ShapeError, r"`input` to hold at least one sample.*\(0, 4, 8, 8\)"),
    ("input nan", (_NAN, _X), {}, NonFiniteError, r"`input` to be finite.*512 NaN/Inf"),
    ("target inf", (_X, _X.clone().fill_(float("inf"))), {}, NonFiniteError, r"`target` to be finite"),
    ("3-d", (_X[0], _X[0]), {}, ShapeError, r"`input` to have 4 dimensions laid out as \(B, C, H, W\)"),
    (
        "batch mismatch",
        (_X, _X[:1]),
        {},
        ShapeError,
        r"same shape, but got input \(2, 4, 8, 8\) and target \(1, 4",
    ),
    ("target channels", (_X, torch.zeros(2, 16, 8, 8)), {}, ShapeError, r"`target` to have 4 channels"),
    ("normalize str", (_X, _X), {"normalize": "yes"}, DTypeError, r"`normalize` to be a bool, but got str"),
    ("spatial int", (_X, _X), {"spatial": 1}, DTypeError, r"`spatial` to be a bool, but got int"),
]


@pytest.mark.parametrize("cls", [LatentLPIPS, ELatentLPIPS])
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [case[1:] for case in _BAD_FORWARD],
    ids=[case[0] for case in _BAD_FORWARD],
)
def test_bad_forward_inputs(cls: type, args: tuple, kwargs: dict, error: type, pattern: str) -> None:
    m = cls("sdxl", weights=None)
    with pytest.raises(error, match=pattern):
        m(*args, **kwargs)


def test_bad_generator_names_it() -> None:
    with pytest.raises(DTypeError, match=r"`generator` to be a torch.Generator or None, but got int"):
        ELatentLPIPS("sdxl", weights=None)(_X, _X, generator=3)  # was: AttributeError 'int' ... 'device'


@pytest.mark.parametrize("cls", [LatentLPIPS, ELatentLPIPS])
def test_nan_passes_with_value_checks_off(cls: type) -> None:
    m = cls("sdxl", weights=None)
    with value_checks(False), torch.no_grad():
        assert torch.isnan(m(_NAN, _X, generator=_gen(0)))


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(DTypeError, match=r"`l1_weight` to be a real number, but got str"):
        LatentLPIPS(weights=None, l1_weight="1")
    with pytest.raises(OptionError, match=r"`l1_weight` to be a finite number, but got inf"):
        LatentLPIPS(weights=None, l1_weight=float("inf"))  # was: an infinite loss
    with pytest.raises(OptionError, match=r"`l1_weight` to be a finite number, but got nan"):
        ELatentLPIPS(weights=None, l1_weight=float("nan"))
    with pytest.raises(OptionError, match=r"Expected `latent` to be > 0, but got 0"):
        LatentLPIPS(0, weights=None)
    with pytest.raises(OptionError, match=r"`latent` to be one of .* or a positive int"):
        LatentLPIPS(True, weights=None)
    with pytest.raises(OptionError, match=r"`num_draws` to be an int >= 1, but got 2.0"):
        ELatentLPIPS(weights=None, num_draws=2.0)
    with pytest.raises(DTypeError, match=r"`weights` to be a file path .*but got dict.*load_state_dict"):
        LatentLPIPS(weights={})
    with pytest.raises(DTypeError, match=r"`weights` to be a file path .*but got int"):
        ELatentLPIPS(weights=3)
    missing = tmp_path / "sdxl_latest_vgg16_tuned.pth"
    with pytest.raises(FileNotFoundError, match=r"`weights` names no file: .*sdxl_latest_vgg16_tuned.pth"):
        LatentLPIPS(
            weights=missing
        )  # was: ValueError "Could not read ... with torch.load(weights_only=True)"
    with pytest.raises(OptionError, match=r"`in_channels` to be an int >= 1, but got 0"):
        LatentVGG16BN(0)


def test_bad_loader_and_trunk_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`path` names no file"):
        load_latent_lpips_state_dict(tmp_path / "none.safetensors")
    with pytest.raises(DTypeError, match=r"`path` to be a file path .*but got int"):
        load_latent_lpips_state_dict(3)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`url` to be a string, but got int"):
        download_weights(3)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`url` to be a non-empty address"):
        download_weights(" ")
    with pytest.raises(DTypeError, match=r"`path` to be a file path .*but got list"):
        LatentLPIPS(4, weights=None).save_pretrained([])  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"`checkpoint` names no file"):
        main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "out.safetensors")])
    trunk = LatentVGG16BN(4)
    with pytest.raises(ShapeError, match=r"`x` to have 4 channels for in_channels=4"):
        trunk(torch.zeros(1, 3, 8, 8))
    with pytest.raises(DTypeError, match=r"`x` to be a floating-point tensor"):
        trunk(torch.zeros(1, 4, 8, 8, dtype=torch.int32))


def test_pixel_lpips_bad_inputs(tmp_path: Path) -> None:
    dec = _tiny_decoder()
    with pytest.raises(DTypeError, match=r"`vae_decoder` to be a module with decode\(z\).*but got int"):
        PixelLPIPS(3)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`pretrained_heads` to be a bool"):
        PixelLPIPS(dec, net="alex", pretrained_heads="yes")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"`trunk_weights` names no file"):
        PixelLPIPS(dec, net="alex", pretrained_heads=False, trunk_weights=tmp_path / "none.pth")
    pix = PixelLPIPS(dec, net="alex", pretrained_heads=False)
    with pytest.raises(ShapeError, match=r"`input` to hold at least one sample"):
        pix(_X[:0], _X[:0])  # was: a NaN loss
    with pytest.raises(NonFiniteError, match=r"`target` to be finite"):
        pix(_X, _NAN)
    with pytest.raises(DTypeError, match=r"`input` to be a floating-point tensor"):
        pix(_X.long(), _X)
    with pytest.raises(OptionError, match=r"`reduction` to be one of"):
        pix(_X, _X, reduction="avg")
    with value_checks(False), torch.no_grad():
        assert torch.isnan(pix(_NAN, _X))
    rgb4 = PixelLPIPS(torch.nn.Upsample(scale_factor=4), net="alex", pretrained_heads=False)
    with pytest.raises(
        ShapeError,
        match=r"`vae_decoder` to return RGB images \(B, 3, H, W\).*returned shape \(4, 4, 32, 32\)",
    ):
        rgb4(_X, _X)  # was: "The size of tensor a (4) must match the size of tensor b (3)" inside lpips

    class Configured(torch.nn.Module):
        config = SimpleNamespace(latent_channels=16)  # as diffusers' AutoencoderKL.config

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z[:, :3]

    with pytest.raises(
        ShapeError, match=r"`input` to have 16 channels \(the decoder's config.latent_channels\)"
    ):
        PixelLPIPS(Configured(), net="alex", pretrained_heads=False)(_X, _X)


# ------------------------------------------------------------------------------------------------
# Batch norm folded into the convolutions (frozen trunk)


def _module_path(trunk: LatentVGG16BN, x: torch.Tensor) -> list[torch.Tensor]:
    """The trunk's slices run module by module (convolution, batch norm, ReLU), the unfolded reference."""
    out = []
    for k in range(5):
        x = getattr(trunk, f"slice{k + 1}")(x)
        out.append(x)
    return out


def test_folded_batch_norm_equals_the_modules_and_follows_weight_changes(
    models: dict[str, LatentLPIPS],
) -> None:
    trunk = copy.deepcopy(models["sdxl"].net).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=_gen(0))
    for got, want in zip(trunk(x), _module_path(trunk, x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)  # float64: the algebra is exact
    # The cache follows the weights: an in-place update, a state-dict load, a dtype change.
    with torch.no_grad():
        getattr(trunk.slice2, "8").running_mean.add_(0.5)  # the first BN of slice 2
    torch.testing.assert_close(trunk(x)[1], _module_path(trunk, x)[1], atol=1e-12, rtol=1e-12)
    trunk.load_state_dict({k: v * 1.1 if v.is_floating_point() else v for k, v in trunk.state_dict().items()})
    torch.testing.assert_close(trunk(x)[4], _module_path(trunk, x)[4], atol=1e-12, rtol=1e-12)
    trunk.float()
    (got, want) = trunk(x.float())[4], _module_path(trunk, x.float())[4]
    # Float32: one rounding of s*w instead of a separate affine pass; a few ulps of the features' scale.
    torch.testing.assert_close(
        got, want, atol=64 * torch.finfo(torch.float32).eps * float(want.abs().max()), rtol=0
    )


def test_trainable_trunk_keeps_its_batch_norm_modules() -> None:
    trunk = LatentVGG16BN(4).eval()
    trunk.requires_grad_(True)  # e.g. fine-tuning: gradients must reach the BN parameters
    sum(f.sum() for f in trunk(torch.randn(1, 4, 4, 4))).backward()  # type: ignore[union-attr]
    assert trunk.slice1[1].weight.grad is not None  # type: ignore[index, union-attr]
    assert "_fold_cache" not in trunk.__dict__
    trunk.requires_grad_(False)
    seen: list[torch.Size] = []
    trunk.slice3.register_forward_hook(
        lambda m, args, out: seen.append(out.shape)
    )  # hooks see the layers run
    trunk(torch.randn(1, 4, 4, 4))
    assert seen == [torch.Size([1, 256, 4, 4])] and "_fold_cache" not in trunk.__dict__
    with torch.inference_mode():  # inference tensors have no version counter: folded, not cached
        built = LatentVGG16BN(4).eval().requires_grad_(False)
        x = torch.randn(1, 4, 4, 4)
        got, want = built(x)[4], _module_path(built, x)[4]
        tol = 64 * torch.finfo(torch.float32).eps * float(want.abs().max())  # as in the float32 case above
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert "_fold_cache" not in built.__dict__


def test_a_validation_call_under_inference_mode_leaves_training_calls_working() -> None:
    """Folds made under ``torch.inference_mode()`` are inference tensors: cached, they would make the next
    training call's backward fail ("Inference tensors cannot be saved for backward")."""
    loss = LatentLPIPS("sdxl", weights=None, reduction="none")
    x, y = torch.randn(2, 4, 8, 8, generator=_gen(1)), torch.randn(2, 4, 8, 8, generator=_gen(2))
    with torch.inference_mode():
        validation = loss(x, y)
    assert "_fold_cache" not in loss.net.__dict__
    student = x.clone().requires_grad_(True)
    value = loss(student, y)
    value.sum().backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    torch.testing.assert_close(value.detach(), validation)  # same weights, same folds
    with torch.inference_mode():  # a cache filled outside inference mode still serves inside it
        torch.testing.assert_close(loss(x, y), validation)


def test_weights_written_through_data_are_folded_after_refresh_folded() -> None:
    """``p.data.copy_`` (diffusers' ``EMAModel.copy_to``) bumps no version counter: the cached folds stay until
    :meth:`LatentVGG16BN.refresh_folded`, after which the loss equals a module built with those weights."""
    loss = LatentLPIPS("sdxl", weights=None, reduction="none")
    source = LatentLPIPS("sdxl", weights=None, reduction="none")
    with torch.no_grad():
        for name, buf in source.net.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0, generator=_gen(3))
    x, y = torch.randn(2, 4, 8, 8, generator=_gen(4)), torch.randn(2, 4, 8, 8, generator=_gen(5))
    before = loss(x, y)
    for mine, theirs in zip(loss.state_dict().values(), source.state_dict().values(), strict=True):
        mine.data.copy_(theirs.data)
    torch.testing.assert_close(loss(x, y), before)  # documented: not noticed without the refresh
    loss.net.refresh_folded()
    after = loss(x, y)
    torch.testing.assert_close(after, source(x, y))
    assert not torch.allclose(after, before)  # the copy changed the loss


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("needs", ["xyw", "x", "y", "w"])
def test_layer_distance_gradients_float64(spatial: bool, needs: str) -> None:
    """The hand-written backward of one layer term against finite differences: features of both sides and the head.

    ``needs`` names the inputs that require a gradient (the forward saves only what those need; "x" is the
    loss's usual case, a target without gradient).
    """
    from diffdistill.losses.lpips import _LayerDistance

    g = _gen(0)
    fx = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad="x" in needs)
    fy = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad="y" in needs)
    head = torch.rand(1, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad="w" in needs)
    assert torch.autograd.gradcheck(lambda a, b, w: _LayerDistance.apply(a, b, w, spatial), (fx, fy, head))
    # The value is LPIPS' layer term, written out independently.
    nx = fx / torch.sqrt(fx.pow(2).sum(1, keepdim=True) + 1e-8)
    ny = fy / torch.sqrt(fy.pow(2).sum(1, keepdim=True) + 1e-8)
    want = ((nx - ny) ** 2 * head).sum(1, keepdim=True)
    want = want if spatial else want.mean(dim=(1, 2, 3))
    torch.testing.assert_close(_LayerDistance.apply(fx, fy, head, spatial), want, atol=1e-12, rtol=1e-12)


def test_heads_get_gradients_for_calibration(models: dict[str, LatentLPIPS]) -> None:
    m = copy.deepcopy(models["sdxl"])
    heads = [h.model[1].weight for h in m.heads]  # type: ignore[index, union-attr]
    for w in heads:
        w.requires_grad_(True)
    x, y = _inputs(4, size=8, batch=2)
    m(x, y).sum().backward()
    assert all(w.grad is not None and bool(w.grad.abs().sum() > 0) for w in heads)


def test_head_dropout_in_training_mode_drops_terms_of_the_squared_difference(
    models: dict[str, LatentLPIPS],
) -> None:
    """Calibration (examples/train_latent_lpips.py) switches the heads' dropout on, as LPIPS' trainer does: the
    distance then equals the per-layer formula with the dropout mask applied to the squared difference (the same
    draws, replayed from the seed); switched off (eval), the fused path is unchanged."""
    m = copy.deepcopy(models["sdxl"]).double()
    x, y = (t.double() for t in _inputs(4, size=8, batch=2))
    plain = m(x, y)
    for h in m.heads:
        h.model[0].train()  # type: ignore[index, union-attr]
    torch.manual_seed(5)
    dropped = m(x, y)
    assert not torch.allclose(dropped, plain)  # the mask changed the value
    torch.manual_seed(
        5
    )  # the reference: the same trunk features, each layer's dropout drawn in the same order
    feats_x = m.net(torch.cat([x, y]))
    b = x.shape[0]
    want = torch.zeros(b, dtype=torch.float64)
    for k, f in enumerate(feats_x):
        fx, fy = f[:b], f[b:]
        nx = fx / torch.sqrt(fx.square().sum(1, keepdim=True) + 1e-8)
        ny = fy / torch.sqrt(fy.square().sum(1, keepdim=True) + 1e-8)
        sq = torch.nn.functional.dropout((nx - ny).square(), p=m.heads[k].model[0].p, training=True)  # type: ignore[index, union-attr]
        want = want + (sq * m.heads[k].model[1].weight).sum(1).mean(dim=(1, 2))  # type: ignore[index, union-attr]
    torch.testing.assert_close(dropped - m.l1_weight * (x - y).abs().mean(dim=(1, 2, 3)), want)
    for h in m.heads:
        h.model[0].eval()  # type: ignore[index, union-attr]
    torch.testing.assert_close(m(x, y), plain, rtol=0, atol=0)
