"""Tests of the ADA-style latent augmentation (diffdistill.losses.latent_augment)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError
from diffdistill.losses.latent_augment import (
    AUGMENT_GROUPS,
    AugmentParams,
    LatentAugment,
    augment_ops,
    sym6_filter,
)

SPECS = ["b", "g", "c", "o", "co", "bg", "bgc", "bgco"]
ALL_OPS = [op for ops in AUGMENT_GROUPS.values() for op in ops]
HAS_REFERENCE = importlib.util.find_spec("elatentlpips") is not None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("channels", [4, 16])
def test_same_draw_reaches_every_tensor(spec: str, channels: int) -> None:
    x = torch.randn(3, channels, 12, 10, generator=_gen(0))
    a, b, c = LatentAugment(spec)(x, x.clone(), x * 1.0, generator=_gen(1))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.shape == x.shape
    assert not torch.equal(a, x)


def test_target_without_grad_stays_out_of_the_graph() -> None:
    x = torch.randn(2, 4, 8, 8, generator=_gen(0))
    y = torch.randn(2, 4, 8, 8, generator=_gen(1))
    aug = LatentAugment("bgco")
    a0, b0 = aug(x, y, generator=_gen(2))
    a1, b1 = aug(x.clone().requires_grad_(True), y, generator=_gen(2))
    assert a1.requires_grad and not b1.requires_grad
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=0)
    torch.testing.assert_close(b1, b0, atol=1e-6, rtol=0)


def test_single_tensor_returns_tensor_and_none_is_identity() -> None:
    x = torch.randn(2, 4, 8, 8)
    assert isinstance(LatentAugment("bg")(x), torch.Tensor)
    assert LatentAugment(None)(x) is x


def test_generator_reproducibility() -> None:
    x = torch.randn(4, 4, 16, 16, generator=_gen(0))
    aug = LatentAugment("bgco")
    assert torch.equal(aug(x, generator=_gen(7)), aug(x, generator=_gen(7)))
    assert not torch.equal(aug(x, generator=_gen(7)), aug(x, generator=_gen(8)))
    # The default generator follows torch.manual_seed.
    torch.manual_seed(3)
    first = aug(x)
    torch.manual_seed(3)
    assert torch.equal(first, aug(x))


def test_params_replay() -> None:
    aug = LatentAugment("bgco")
    x = torch.randn(2, 4, 8, 8)
    prm = aug.sample(2, generator=_gen(0))
    assert torch.equal(aug(x, params=prm), aug(x, params=prm))
    assert torch.equal(aug(x, params=prm), aug(x, generator=_gen(0)))


def test_golden_checksum() -> None:
    """Pinned output of a seeded draw, so CI checks the pipeline without the reference package."""
    x = torch.linspace(-2, 2, 2 * 4 * 16 * 16).reshape(2, 4, 16, 16)
    y = LatentAugment("bgco")(x, generator=_gen(0))
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum(), torch.tensor(GOLDEN_AUG_SUM), atol=1e-3, rtol=0)
    torch.testing.assert_close(y.abs().sum(), torch.tensor(GOLDEN_AUG_ABS_SUM), atol=1e-3, rtol=0)


GOLDEN_AUG_SUM = -550.17572
GOLDEN_AUG_ABS_SUM = 1762.48889


def test_identity_draw_is_near_identity() -> None:
    # p = 0 disables every op; the filtered resampling alone is an (almost) perfect reconstruction.
    x = torch.randn(2, 4, 16, 16, generator=_gen(0))
    y = LatentAugment("bgco", p=0.0)(x, generator=_gen(1))
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)


def test_xflip_and_rotate90_act_as_blits() -> None:
    # Like ADA, blits run through the filtered resampling, so they are exact only up to the
    # anti-aliasing filter: compare on a smooth (band-limited) input.
    coarse = torch.randn(1, 4, 4, 4, generator=_gen(0))
    x = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bicubic", align_corners=False)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    flipped = LatentAugment(["xflip"])(x, params=AugmentParams(xflip=torch.ones(1)))
    assert rel(flipped, x.flip(-1)) < 0.05
    rot = LatentAugment(["rotate90"])(x, params=AugmentParams(rotate90=torch.ones(1)))
    assert min(rel(rot, torch.rot90(x, k, dims=(-2, -1))) for k in (1, 3)) < 0.05
    assert rel(rot, x) > 0.5


def test_parameter_statistics_match_ada() -> None:
    n = 40_000
    prm = LatentAugment("bgco").sample(n, generator=_gen(0))
    assert abs(prm.xflip.mean().item() - 0.5) < 0.01
    counts = torch.bincount(prm.rotate90.long(), minlength=4).float() / n
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.01, rtol=0)
    assert prm.xint.abs().max().item() <= 0.125
    assert abs(prm.xint.std().item() - 0.125 / math.sqrt(3)) < 0.003  # uniform(-a, a)
    assert abs(torch.log2(prm.scale).std().item() - 0.2) < 0.004
    assert abs(torch.log2(prm.scale).mean().item()) < 0.004
    assert abs(torch.log2(prm.aniso).std().item() - 0.2) < 0.004
    for theta in (prm.rotate_pre, prm.rotate_post):
        assert theta.abs().max().item() <= math.pi
        assert abs(theta.std().item() - math.pi / math.sqrt(3)) < 0.03
    assert abs(prm.xfrac.std().item() - 0.125) < 0.003
    assert prm.brightness.min() >= -0.5 and prm.brightness.max() <= 0.5
    assert prm.contrast.min() >= 0.5 and prm.contrast.max() <= 1.5
    assert prm.saturation.min() >= 0.0 and prm.saturation.max() <= 2.0
    assert torch.all(prm.cutout_size == 0.5)
    assert prm.cutout_center.min() >= 0 and prm.cutout_center.max() <= 1


def test_probability_multiplier() -> None:
    n = 40_000
    prm = LatentAugment("bgco", p=0.3).sample(n, generator=_gen(0))
    assert abs((prm.scale != 1).float().mean().item() - 0.3) < 0.01
    assert abs((prm.cutout_size > 0).float().mean().item() - 0.3) < 0.01
    assert abs(prm.xflip.mean().item() - 0.15) < 0.01  # fires w.p. 0.3, flips half of those
    # Either rotation fires w.p. 1 - sqrt(1 - p), so at least one w.p. p.
    any_rot = (prm.rotate_pre != 0) | (prm.rotate_post != 0)
    assert abs(any_rot.float().mean().item() - 0.3) < 0.01
    zero = LatentAugment("bgco", p=0.0).sample(1000, generator=_gen(0))
    assert torch.all(zero.xflip == 0) and torch.all(zero.scale == 1) and torch.all(zero.cutout_size == 0)


@pytest.mark.parametrize("op", ALL_OPS)
def test_gradcheck_each_op(op: str) -> None:
    aug = LatentAugment([op])
    prm = aug.sample(2, generator=_gen(0), dtype=torch.float64)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    y = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: aug(a, b, params=prm), (x, y), fast_mode=True)


def test_float64_and_device_of_params() -> None:
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert LatentAugment("bgco")(x, generator=_gen(0)).dtype == torch.float64


def test_augment_ops_and_errors() -> None:
    assert augment_ops(None) == ()
    assert augment_ops("gb") == augment_ops("bg")
    with pytest.raises(OptionError, match=r"string of the letters \['b', 'g', 'c', 'o'\].*got 'bx'"):
        augment_ops("bx")
    with pytest.raises(OptionError, match=r"unknown \['warp'\]"):
        augment_ops(["warp"])
    with pytest.raises(OptionError, match=r"Expected `p` to be <= 1, but got 2"):
        LatentAugment("b", p=2)
    aug = LatentAugment("b")
    with pytest.raises(ShapeError, match=r"tensors\[1\] has \(2, 4, 8, 9\)"):
        aug(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 9))
    with pytest.raises(ShapeError, match=r"Expected `tensors\[0\]` to have 4 dimensions"):
        aug(torch.zeros(4, 8, 8))
    with pytest.raises(DTypeError, match=r"floating-point tensor, but got dtype torch.int64"):
        aug(torch.zeros(1, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"at least one tensor"):
        aug()
    # A replayed draw must come from a batch of the same size (a 1-sample draw is not broadcast).
    for spec, drawn, applied in (("bgco", 3, 2), ("g", 1, 4), ("o", 1, 4)):
        params = LatentAugment(spec).sample(drawn, generator=_gen(0))
        with pytest.raises(
            ShapeError, match=rf"parameters for a batch of {applied} .* `params\.\w+` has shape \({drawn}"
        ):
            LatentAugment(spec)(torch.zeros(applied, 4, 8, 8), params=params)


def test_sym6_filter_is_orthogonal_lowpass() -> None:
    f = sym6_filter(torch.float64) * math.sqrt(2)
    assert abs(float((f * f).sum()) - 1) < 1e-12
    assert abs(float((f[:-2] * f[2:]).sum())) < 1e-12  # orthogonal to its even shifts


@pytest.mark.skipif(not HAS_REFERENCE, reason="reference package elatentlpips not installed")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("channels", [4, 16])
def test_matches_reference_pipeline(spec: str, channels: int) -> None:
    """Seeded identically, our pipeline reproduces the official AdaAugment draw by draw."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from elatentlpips.ada_aug import AdaAugment
        from elatentlpips.elatentlpips import ada_augpipe

    ref = AdaAugment(**ada_augpipe[spec])
    ref.p = torch.tensor(1.0)
    x = torch.randn(3, channels, 12, 14, generator=_gen(0))
    y = torch.randn(3, channels, 12, 14, generator=_gen(1))
    torch.manual_seed(11)
    ra, rb = ref(x, y)
    torch.manual_seed(11)
    oa, ob = LatentAugment(spec)(x, y)
    torch.testing.assert_close(oa, ra, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ob, rb, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Dtypes and bad inputs


def test_each_output_keeps_its_input_dtype() -> None:
    x = torch.randn(2, 4, 8, 8, generator=_gen(0))
    a, b = LatentAugment("bgc")(x, x.double(), generator=_gen(1))
    assert a.dtype == torch.float32 and b.dtype == torch.float64  # was: both float32
    torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
    h, f = LatentAugment("bg")(x.bfloat16(), x, generator=_gen(1))
    assert h.dtype == torch.bfloat16 and f.dtype == torch.float32


_X = torch.zeros(2, 4, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"p": float("nan")}, OptionError, r"`p` to be a finite number, but got nan"),
        ({"p": "1"}, DTypeError, r"`p` to be a real number, but got str"),
        ({"xint_max": -0.1}, OptionError, r"`xint_max` to be >= 0, but got -0.1"),
        ({"scale_std": -1}, OptionError, r"`scale_std` to be >= 0, but got -1"),
        ({"rotate_max": float("inf")}, OptionError, r"`rotate_max` to be a finite number"),
        ({"aniso_std": None}, DTypeError, r"`aniso_std` to be a real number, but got NoneType"),
        ({"xfrac_std": -0.5}, OptionError, r"`xfrac_std` to be >= 0"),
        ({"cutout_size": 2}, OptionError, r"`cutout_size` to be <= 1, but got 2"),  # was: all erased
        ({"augment": 3}, DTypeError, r"`augment` to be a string of group letters .*but got int"),
        ({"augment": ["xflip", 1]}, OptionError, r"unknown \[1\]"),
    ],
)
def test_bad_options(kwargs: dict, error: type, pattern: str) -> None:
    augment = kwargs.pop("augment", "bgco")
    with pytest.raises(error, match=pattern):
        LatentAugment(augment, **kwargs)


def test_p_assignment_is_checked() -> None:
    aug = LatentAugment("b")
    aug.p = 0.5
    assert aug.p == 0.5
    with pytest.raises(OptionError, match=r"`p` to be <= 1, but got 1.5"):
        aug.p = 1.5


def test_bad_sample_arguments() -> None:
    aug = LatentAugment("bgco")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(OptionError, match=r"`batch_size` to be an int >= 1"):
            aug.sample(bad)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`dtype` to be a floating-point torch.dtype, but got torch.int64"):
        aug.sample(2, dtype=torch.int64)  # was: brightness silently -0.5 for every sample
    with pytest.raises(DTypeError, match=r"`generator` to be a torch.Generator or None, but got int"):
        aug.sample(2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`dtype` to be a floating-point torch.dtype"):
        sym6_filter(torch.int64)  # was: all-zero integer taps


@pytest.mark.parametrize(
    ("tensors", "error", "pattern"),
    [
        ((None,), DTypeError, r"`tensors\[0\]` to be a torch.Tensor, but got NoneType"),
        ((_X, _X.bool()), DTypeError, r"`tensors\[1\]` to be a floating-point tensor.*torch.bool"),
        ((_X[:0],), ShapeError, r"`tensors\[0\]` to hold at least one sample"),  # was: torch's "output size"
        ((_X, torch.full_like(_X, float("nan"))), NonFiniteError, r"`tensors\[1\]` to be finite"),
        (
            (_X, torch.zeros(1, 4, 8, 8)),
            ShapeError,
            r"shape of tensors\[0\] \(2, 4, 8, 8\), but tensors\[1\]",
        ),
    ],
)
def test_bad_forward_inputs(tensors: tuple, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        LatentAugment("bgco")(*tensors, generator=_gen(0))


def test_nan_passes_with_value_checks_off() -> None:
    from diffdistill.errors import value_checks

    nan = torch.full((1, 4, 8, 8), float("nan"))
    with value_checks(False):
        assert torch.isnan(LatentAugment("bg")(nan, generator=_gen(0))).all()


def test_bad_params() -> None:
    aug = LatentAugment("bgco")
    with pytest.raises(DTypeError, match=r"`params` to be an AugmentParams .*but got dict"):
        aug(_X, params={})  # type: ignore[arg-type]
    with pytest.raises(
        ShapeError, match=r"`params.xint` to have shape \(2, 2\) \(an \(x, y\) pair per sample\)"
    ):
        aug(_X, params=AugmentParams(xint=torch.zeros(2)))  # was: IndexError
    with pytest.raises(ShapeError, match=r"`params.scale` to have shape \(2,\)"):
        aug(_X, params=AugmentParams(scale=torch.ones(2, 1)))
    with pytest.raises(
        OptionError, match=r"`params.cutout_size` and `params.cutout_center` to be given together"
    ):
        aug(_X, params=AugmentParams(cutout_size=torch.full((2,), 0.5)))  # was: no cutout, silently
    with pytest.raises(NonFiniteError, match=r"`params.rotate_pre` to be finite"):
        aug(_X, params=AugmentParams(rotate_pre=torch.tensor([0.0, float("nan")])))
    with pytest.raises(DTypeError, match=r"`params.scale` to be a torch.Tensor, but got list"):
        aug(_X, params=AugmentParams(scale=[1.0, 1.0]))  # type: ignore[arg-type]


def test_bad_transform_inputs() -> None:
    aug = LatentAugment("b")
    prm = aug.sample(2, generator=_gen(0))
    with pytest.raises(DTypeError, match=r"`tensors` to be a tuple of tensors, but got Tensor; pass \(x,\)"):
        aug.transform(_X, prm)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"tensors\[1\] is torch.float64"):
        aug.transform((_X, _X.double()), prm)
    with pytest.raises(ShapeError, match=r"at least one tensor"):
        aug.transform((), prm)


def _ada_inverse_matrix(prm: AugmentParams, n: int, h: int, w: int) -> torch.Tensor:
    """ADA's inverse warp as the plain product of its 3×3 factors (float64), the reference of the closed form."""

    def mat(*rows: tuple) -> torch.Tensor:  # type: ignore[type-arg]
        return torch.stack(
            [torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in r], -1) for r in rows],
            -2,
        )

    def d(t: torch.Tensor | None, default: float) -> torch.Tensor:
        return t.double() if t is not None else torch.full((n,), default, dtype=torch.float64)

    def rot(a: torch.Tensor) -> torch.Tensor:
        return mat((a.cos(), -a.sin(), 0.0), (a.sin(), a.cos(), 0.0), (0.0, 0.0, 1.0))

    def trans(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        return mat((1.0, 0.0, tx), (0.0, 1.0, ty), (0.0, 0.0, 1.0))

    def scale(sx: torch.Tensor | float, sy: torch.Tensor | float) -> torch.Tensor:
        return mat((sx, 0.0, 0.0), (0.0, sy, 0.0), (0.0, 0.0, 1.0))

    xint = prm.xint.double() if prm.xint is not None else torch.zeros(n, 2, dtype=torch.float64)
    xfrac = prm.xfrac.double() if prm.xfrac is not None else torch.zeros(n, 2, dtype=torch.float64)
    a, s = d(prm.aniso, 1.0), d(prm.scale, 1.0)
    return (
        scale(1 - 2 * d(prm.xflip, 0.0), 1.0)
        @ rot(math.pi / 2 * d(prm.rotate90, 0.0))
        @ trans(-torch.round(xint[:, 0] * w), -torch.round(xint[:, 1] * h))
        @ scale(1 / s, 1 / s)
        @ rot(d(prm.rotate_pre, 0.0))
        @ scale(1 / a, a)
        @ rot(d(prm.rotate_post, 0.0))
        @ trans(-xfrac[:, 0] * w, -xfrac[:, 1] * h)
    )


@pytest.mark.parametrize("spec", ["bg", "b", "g", ("xint",), ("rotate", "xfrac"), ("scale", "aniso")])
def test_closed_form_theta_is_the_ada_matrix_product(spec: str | tuple[str, ...]) -> None:
    """The closed-form sampling matrix equals ADA's product of 3×3 factors and frame changes, to float64 rounding."""
    from diffdistill.losses import latent_augment as la

    n, h, w = 5, 12, 14
    prm = LatentAugment(spec, p=0.7).sample(n, generator=_gen(0))
    up, out = la._geometry_sizes(h, w, 12)
    assert up == ((3 * h - 2) * 2, (3 * w - 2) * 2) and out == (2 * h + 10, 2 * w + 10)
    g = _ada_inverse_matrix(prm, n, h, w)

    def fixed(*rows: tuple) -> torch.Tensor:  # type: ignore[type-arg]
        return torch.tensor(rows, dtype=torch.float64)

    # ADA's embedding: centred pixel units of the two 2x grids, then [-1, 1] in the grid_sample convention.
    up_h, up_w = up
    out_h, out_w = out
    left = fixed((2 / up_w, 0, 0), (0, 2 / up_h, 0), (0, 0, 1)) @ fixed((1, 0, -0.5), (0, 1, -0.5), (0, 0, 1))
    left = left @ fixed((2, 0, 0), (0, 2, 0), (0, 0, 1))
    right = fixed((0.5, 0, 0), (0, 0.5, 0), (0, 0, 1)) @ fixed((1, 0, 0.5), (0, 1, 0.5), (0, 0, 1))
    right = right @ fixed((out_w / 2, 0, 0), (0, out_h / 2, 0), (0, 0, 1))
    want = (left @ g @ right)[:, :2, :]
    got = la._sampling_theta(prm, n, (h, w), out, up)
    assert got.dtype == torch.float64 and got.shape == (n, 2, 3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_colour_matrix_equals_the_sequential_chain() -> None:
    """One colour transform per sample == brightness, then contrast, then saturation (DiffAugment's order)."""
    from diffdistill.losses import latent_augment as la

    n, c, h, w = 4, 4, 6, 5
    prm = LatentAugment("c").sample(n, generator=_gen(0))
    x = torch.randn(n, c, h, w, generator=_gen(1)) * 3 + 1
    y = torch.randn(n, c, h, w, generator=_gen(2))

    def chain(t: torch.Tensor, p: AugmentParams = prm) -> torch.Tensor:  # float64, one op after the other
        def v(f: torch.Tensor | None, neutral: float) -> torch.Tensor | float:
            return f.double().view(n, 1, 1, 1) if f is not None else neutral

        t = t.double() + v(p.brightness, 0.0)
        m = t.mean(dim=(1, 2, 3), keepdim=True)
        t = (t - m) * v(p.contrast, 1.0) + m
        mu = t.mean(dim=1, keepdim=True)
        return (t - mu) * v(p.saturation, 1.0) + mu

    got = la._apply_colour(torch.cat([x, y], dim=1), prm, c)  # two tensors stacked, own statistics each
    want = torch.cat([chain(x), chain(y)], dim=1)
    # Float32 evaluation of a few fused terms of magnitude <= max|want| (+ the means): a few ulps of that.
    tol = 8 * torch.finfo(torch.float32).eps * float(want.abs().max() + x.abs().max())
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    # Each op alone (the others neutral), and one channel (saturation is then the identity, as in the chain).
    for op in ("brightness", "contrast", "saturation"):
        only = AugmentParams(**{op: getattr(prm, op)})
        (got,) = LatentAugment([op]).transform((x,), only)
        torch.testing.assert_close(got.double(), chain(x, only), atol=tol, rtol=0)
    one = AugmentParams(saturation=prm.saturation)
    assert torch.equal(LatentAugment("c").transform((x[:, :1],), one)[0], x[:, :1])


@pytest.mark.parametrize("n", [3, 20])  # below and above the CPU generators' vectorised block of 16
def test_draws_are_adas_formulas_bit_for_bit(n: int) -> None:
    """Every field of a p = 1 draw equals ADA's formula on the same random stream, exactly (no tolerance).

    The draws use ``uniform_(low, high)`` in place of ADA's ``rand() * (high - low) + low``; this pins that
    both read the same numbers from the generator and round them the same.
    """
    got = LatentAugment("bgc").sample(n, generator=_gen(5))
    g = _gen(5)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    want: dict[str, torch.Tensor] = {}
    # ADA's order (augment.py): each value, then its (always passing) gate draw.
    want["xflip"], _ = torch.floor(rand(n) * 2), rand(n)
    want["rotate90"], _ = torch.floor(rand(n) * 4), rand(n)
    want["xint"], _ = (rand(n, 2) * 2 - 1) * 0.125, rand(n, 1)
    want["scale"], _ = torch.exp2(randn(n) * 0.2), rand(n)
    want["rotate_pre"], _ = (rand(n) * 2 - 1) * math.pi * 1.0, rand(n)
    want["aniso"], _ = torch.exp2(randn(n) * 0.2), rand(n)
    want["rotate_post"], _ = (rand(n) * 2 - 1) * math.pi * 1.0, rand(n)
    want["xfrac"], _ = randn(n, 2) * 0.125, rand(n, 1)
    # DiffAugment's colour draws, no gate at p = 1.
    want["brightness"] = rand(n, 1, 1, 1).reshape(n) - 0.5
    want["contrast"] = rand(n, 1, 1, 1).reshape(n) + 0.5
    want["saturation"] = rand(n, 1, 1, 1).reshape(n) * 2
    for name, value in want.items():
        assert torch.equal(getattr(got, name), value), name


def test_closed_form_theta_gradcheck_float64() -> None:
    """The in-place blocks of the closed-form matrix keep it differentiable in the continuous parameters."""
    from diffdistill.losses import latent_augment as la

    n, h, w = 3, 6, 7
    prm = LatentAugment("bg").sample(n, generator=_gen(0), dtype=torch.float64)
    up, out = la._geometry_sizes(h, w, 12)
    names = ("scale", "aniso", "rotate_pre", "rotate_post", "xfrac")
    start = tuple(getattr(prm, k).double().requires_grad_(True) for k in names)

    def theta(*values: torch.Tensor) -> torch.Tensor:
        fixed = {k: getattr(prm, k) for k in ("xflip", "rotate90", "xint")}
        return la._sampling_theta(AugmentParams(**fixed, **dict(zip(names, values))), n, (h, w), out, up)

    assert torch.autograd.gradcheck(theta, start)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_cast_to_half_precision_keeps_the_filter_exact(dtype: torch.dtype) -> None:
    """``LatentAugment(...).to(bf16)`` (e.g. inside ``ELatentLPIPS(...).to(torch.bfloat16)``) must not round the
    resampling filter: its taps would sum to ~1.0025 and every resampled latent be scaled by ~1%. The augmentation
    computes in float32 or wider, so the cast module gives the float32 module's output (same draw) exactly."""
    reference, cast = LatentAugment("g"), LatentAugment("g").to(dtype)
    assert cast.filter.dtype == torch.float32
    torch.testing.assert_close(cast.filter, sym6_filter(), atol=0, rtol=0)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    want = reference(x, generator=torch.Generator().manual_seed(1))
    got = cast(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert LatentAugment("g").double().filter.dtype == torch.float64  # wider casts are kept
