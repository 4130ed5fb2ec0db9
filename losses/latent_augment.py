"""Differentiable ADA-style augmentation for latents (and images), one draw shared by several tensors.

The pipeline follows the adaptive discriminator augmentation of Karras et al., "Training Generative
Adversarial Networks with Limited Data" (ADA, NeurIPS 2020), in the configuration that E-LatentLPIPS
(Kang et al., "Distilling Diffusion Models into Conditional GANs", ECCV 2024, arXiv:2405.05967) uses
to ensemble its latent perceptual distance. Ops are grouped by letter:

=====  ======================================================================================
``b``  pixel blitting: x-flip, 90° rotations, integer translation
``g``  general geometry: isotropic scaling, rotation, anisotropic scaling, fractional translation
``c``  colour: brightness, contrast, saturation (the DiffAugment ranges E-LatentLPIPS uses)
``o``  cutout
=====  ======================================================================================

Every op draws its parameters per sample; all tensors passed in one call receive the *same* draw,
so ``aug(x, x)`` returns two identical tensors. The geometric ops compose one affine sampling matrix
per sample in closed form (float64; ADA's chain of eight 3×3 factors and both frame changes, written
out) and resample once: reflect padding, 2× upsampling with the orthogonal ``sym6`` low-pass filter,
bilinear ``grid_sample`` through a single sampling grid, then filtered 2× downsampling --
differentiable with respect to the inputs, on any number of channels. The colour ops collapse to one
affine colour transform per sample (three fused multiply-adds), and tensors with the same
``requires_grad`` go through every pass together, stacked along channels. No op reads a value back to
the host and no shape depends on a draw, so the module runs under ``torch.compile(fullgraph=True)``
and CUDA-graph capture (with ``generator=None``: dynamo does not trace ``torch.Generator`` objects).

Not taken from kornia: its ``warp_affine`` normalises and re-inverts the warp in the image dtype (2-3×
the float32 error of this float64 composition), its contrast and saturation clamp to ``[0, 1]`` and
use RGB luminance, its erasing draws its own randomness by area and aspect ratio, and its ``filter2d``
has no stride for the decimating filter; its frame conversion and brightness shift matched, but cost
more kernels than the closed forms here.

With ``p = 1`` and the default generator the random numbers are drawn in the same order as the
reference ADA pipeline, so a seeded call reproduces it.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_finite,
    check_float_input,
    check_not_video,
    check_real,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["AUGMENT_GROUPS", "AugmentParams", "LatentAugment", "augment_ops", "sym6_filter"]


#: The op names behind each letter of an ``augment`` string, in execution order.
AUGMENT_GROUPS: dict[str, tuple[str, ...]] = {
    "b": ("xflip", "rotate90", "xint"),
    "g": ("scale", "rotate", "aniso", "xfrac"),
    "c": ("brightness", "contrast", "saturation"),
    "o": ("cutout",),
}
_ALL_OPS: tuple[str, ...] = tuple(op for ops in AUGMENT_GROUPS.values() for op in ops)
_GEOMETRIC_OPS = frozenset(AUGMENT_GROUPS["b"] + AUGMENT_GROUPS["g"])
# Fields of AugmentParams holding a pair (x, y) per sample; every other field holds one value per sample.
_PAIR_FIELDS = frozenset({"xint", "xfrac", "cutout_center"})

# Orthogonal Symlet-6 decomposition low-pass filter (PyWavelets ``sym6``), the anti-aliasing filter
# ADA uses around its geometric resampling. Normalised to unit DC gain where it is used.
_SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)


def _promote(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


_cached_promote = functools.lru_cache(maxsize=None)(_promote)


def _working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32 and at least as precise as each of ``dtypes`` (looked up on the host: no op recorded)."""
    return _promote(dtypes) if torch.compiler.is_compiling() else _cached_promote(dtypes)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; ``t`` itself when it already is (no ``aten::to`` call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DTypeError(
            f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}. "
            "Pass torch.Generator(device).manual_seed(seed) for reproducible draws."
        )


def sym6_filter(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 12-tap ``sym6`` low-pass filter normalised to sum 1, shape ``(12,)``.

    Args:
        dtype: floating dtype of the result.
        device: device of the result; ``None`` is the CPU.

    Returns:
        The filter taps, shape ``(12,)``, summing to 1.

    Raises:
        DTypeError: if ``dtype`` is not a floating-point ``torch.dtype`` (the taps would be truncated).

    Example:
        >>> f = sym6_filter()
        >>> f.shape, round(float(f.sum()), 6)
        (torch.Size([12]), 1.0)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(
            f"Expected `dtype` to be a floating-point torch.dtype (e.g. torch.float32), but got {dtype!r}; "
            "integer taps would be truncated to 0."
        )
    f = torch.tensor(_SYM6, dtype=torch.float64)
    return (f / f.sum()).to(dtype=dtype, device=device)


def augment_ops(augment: str | Iterable[str] | None) -> tuple[str, ...]:
    """Resolve an ``augment`` spec to the op names it enables, in execution order.

    Args:
        augment: a string of group letters (``"b"``, ``"g"``, ``"c"``, ``"o"``, e.g. ``"bg"``,
            ``"bgco"``), an iterable of op names (``("xflip", "scale")``), or ``None`` (no op).

    Returns:
        The enabled op names, ordered as the pipeline runs them.

    Raises:
        OptionError: on an unknown letter or op name, or an empty string.
        DTypeError: if ``augment`` is neither a string, an iterable of op names nor ``None``.

    Example:
        >>> augment_ops("bg")
        ('xflip', 'rotate90', 'xint', 'scale', 'rotate', 'aniso', 'xfrac')
        >>> augment_ops(["cutout", "xflip"])
        ('xflip', 'cutout')
    """
    if augment is None:
        return ()
    if isinstance(augment, str):
        bad = [ch for ch in augment if ch not in AUGMENT_GROUPS]
        if bad or not augment:
            raise OptionError(
                f"Expected `augment` to be a non-empty string of the letters {list(AUGMENT_GROUPS)} "
                f"(e.g. 'bg', 'bgco') or a list of op names, but got {augment!r}."
            )
        wanted = {op for ch in augment for op in AUGMENT_GROUPS[ch]}
    else:
        if not isinstance(augment, Iterable) or isinstance(augment, (bytes, torch.Tensor)):
            raise DTypeError(
                f"Expected `augment` to be a string of group letters (e.g. 'bg'), a list of op names from "
                f"{list(_ALL_OPS)} or None, but got {type(augment).__name__} ({augment!r})."
            )
        names = list(augment)
        unknown = sorted({repr(op) for op in names if not isinstance(op, str) or op not in _ALL_OPS})
        if unknown:
            raise OptionError(
                f"Expected `augment` op names from {list(_ALL_OPS)}, but got unknown [{', '.join(unknown)}]."
            )
        wanted = set(names)
    return tuple(op for op in _ALL_OPS if op in wanted)


@dataclass
class AugmentParams:
    """One draw of augmentation parameters for ``N`` samples (``None`` where an op is disabled).

    Translations are relative to the image size, so a draw can be replayed at any resolution.

    Attributes:
        xflip: ``(N,)`` 1 for a horizontal flip, else 0.
        rotate90: ``(N,)`` number of counter-clockwise quarter turns, 0..3.
        xint: ``(N, 2)`` integer-translation fraction (x, y), rounded to whole pixels when applied.
        scale: ``(N,)`` isotropic scale factor (log-normal, ``log2`` std ``scale_std``).
        rotate_pre: ``(N,)`` rotation in radians before the anisotropic scaling.
        aniso: ``(N,)`` anisotropic factor; x is scaled by it and y by its inverse.
        rotate_post: ``(N,)`` rotation in radians after the anisotropic scaling.
        xfrac: ``(N, 2)`` fractional translation (x, y), relative to the image size.
        brightness: ``(N,)`` additive offset.
        contrast: ``(N,)`` factor around each tensor's per-sample mean.
        saturation: ``(N,)`` factor around each tensor's per-pixel channel mean.
        cutout_size: ``(N,)`` side of the erased square relative to the image (0 = no cutout).
        cutout_center: ``(N, 2)`` centre (x, y) of the erased square relative to the image; given
            together with ``cutout_size``.
    """

    xflip: torch.Tensor | None = None
    rotate90: torch.Tensor | None = None
    xint: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    rotate_pre: torch.Tensor | None = None
    aniso: torch.Tensor | None = None
    rotate_post: torch.Tensor | None = None
    xfrac: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    cutout_size: torch.Tensor | None = None
    cutout_center: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AugmentParams:
        """Return a copy with every tensor moved to ``device``.

        Args:
            device: the target device.

        Returns:
            A new :class:`AugmentParams`; fields that are ``None`` stay ``None``.

        Raises:
            RuntimeError: from torch, if ``device`` names no device.

        Example:
            >>> AugmentParams(xflip=torch.ones(2)).to("cpu").xflip
            tensor([1., 1.])
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return AugmentParams(**{k: (v.to(device) if v is not None else None) for k, v in values.items()})

    def check_batch(self, n: int) -> None:
        """Check that every parameter holds one entry per sample of a batch of ``n``.

        Args:
            n: the batch size the draw is applied to.

        Raises:
            DTypeError: if a field is neither a tensor nor ``None``.
            ShapeError: if a field's first dimension is not ``n`` (a draw replays only on the batch it was
                drawn for), ``xint`` / ``xfrac`` / ``cutout_center`` are not ``(n, 2)`` or another field is not
                ``(n,)``.
            OptionError: if only one of ``cutout_size`` and ``cutout_center`` is given.

        Example:
            >>> AugmentParams(xflip=torch.zeros(3)).check_batch(3)
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            check_tensor(value, f"params.{f.name}")
            if value.ndim == 0 or value.shape[0] != n:
                raise ShapeError(
                    f"Expected augmentation parameters for a batch of {n} (each field's first dimension), "
                    f"but `params.{f.name}` has shape {tuple(value.shape)}: a draw replays only on the batch "
                    "it was drawn for.",
                    name=f"params.{f.name}",
                    expected=(n,),
                    actual=tuple(value.shape),
                )
            want = (n, 2) if f.name in _PAIR_FIELDS else (n,)
            if tuple(value.shape) != want:
                raise ShapeError(
                    f"Expected `params.{f.name}` to have shape {want} "
                    f"({'an (x, y) pair' if f.name in _PAIR_FIELDS else 'one value'} per sample), but got "
                    f"{tuple(value.shape)}.",
                    name=f"params.{f.name}",
                    expected=want,
                    actual=tuple(value.shape),
                )
        if (self.cutout_size is None) != (self.cutout_center is None):
            raise OptionError(
                "Expected `params.cutout_size` and `params.cutout_center` to be given together (a cutout needs "
                f"both its size and its centre), but got only `params."
                f"{'cutout_size' if self.cutout_center is None else 'cutout_center'}`."
            )

    @property
    def has_geometry(self) -> bool:
        """Whether any geometric parameter is present."""
        names = ("xflip", "rotate90", "xint", "scale", "rotate_pre", "aniso", "rotate_post", "xfrac")
        return any(getattr(self, n) is not None for n in names)


# ----------------------------------------------------------------------------------------------
# The geometric chain as one affine sampling matrix, composed in closed form (float64, per sample).

# The draw's geometric fields in the order they are gathered into one float64 matrix (scales first: their
# logarithms are taken in place), and their number of columns.
_THETA_FIELDS: tuple[tuple[str, int], ...] = (
    ("scale", 1),
    ("aniso", 1),
    ("xflip", 1),
    ("rotate90", 1),
    ("rotate_pre", 1),
    ("rotate_post", 1),
    ("xint", 2),
    ("xfrac", 2),
)
# Columns of the affine pre-map Z of _sampling_theta: six angles (their cos taken in place), two log2 scales
# (exp2 in place), the flip sign, and the right factors (1, fx, fy, ix, iy), whose ix, iy are rounded in place.
_Z_TRIG = slice(0, 6)
_Z_LOG = slice(6, 8)
_Z_FLIP = 8
_Z_RIGHT = slice(9, 14)
_Z_INT = slice(12, 14)
_Z_COLS = 14


def _theta_constants(
    names: tuple[str, ...],
    size: tuple[int, int],
    out: tuple[int, int],
    up: tuple[int, int],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The constant float64 matrices of :func:`_sampling_theta` for the fields ``names`` and the given sizes.

    Returns ``(bias, A, E, e0, C, s1, s2, O)``: ``Z = bias + V A`` (the affine pre-map of the gathered
    fields ``V``), ``[p, p, q, q, 1, 1] = exp2(Z_log) E + e0``, the bilinear form ``C`` (30 × 6) that maps the
    products ``left_j right_k`` to the six entries of ``theta`` (frame changes included), and the flip's row
    scaling ``S = F s1 + s2`` and offset ``O`` (``theta = (left ⊗ right) C ⊙ S + O``).
    """
    (h, w), (out_h, out_w), (up_h, up_w) = size, out, up
    f64 = torch.float64
    widths = dict(_THETA_FIELDS)
    row, col = {}, 0
    for name in names:
        row[name] = col
        col += widths[name]
    bias = torch.zeros(_Z_COLS, dtype=f64)
    a = torch.zeros(col, _Z_COLS, dtype=f64)
    half_pi = math.pi / 2
    # Angles: columns 0-5 are (sigma, sigma - pi/2, delta, delta - pi/2, alpha, alpha - pi/2), so that one cos
    # gives (cos, sin) of each: sigma = alpha + pre + post, delta = alpha + pre - post, alpha = pi/2 * rotate90.
    bias[[1, 3, 5]] = -half_pi
    if "rotate90" in row:
        a[row["rotate90"], 0:6] = half_pi
    if "rotate_pre" in row:
        a[row["rotate_pre"], 0:4] = 1.0
    if "rotate_post" in row:
        a[row["rotate_post"], 0:2] = 1.0
        a[row["rotate_post"], 2:4] = -1.0
    # Scales (their log2 in V): columns 6, 7 = log2 of 1 / (aniso * scale) and aniso / scale.
    if "scale" in row:
        a[row["scale"], 6:8] = -1.0
    if "aniso" in row:
        a[row["aniso"], 6] = -1.0
        a[row["aniso"], 7] = 1.0
    # Flip sign F = 1 - 2 xflip; then the right factors (1, fx, fy, ix, iy) of the translation.
    bias[_Z_FLIP] = 1.0
    if "xflip" in row:
        a[row["xflip"], _Z_FLIP] = -2.0
    bias[9], bias[10], bias[11] = 1.0, 0.25, 0.25  # the right frame change's offset (1/4, 1/4)
    if "xfrac" in row:
        a[row["xfrac"], 10], a[row["xfrac"] + 1, 11] = -w, -h
    if "xint" in row:
        a[row["xint"], 12], a[row["xint"] + 1, 13] = -w, -h
    # (p, p, q, q, 1, 1) from (u1, u2) = (1 / (aniso scale), aniso / scale): p = (u1 + u2) / 2, q = (u1 - u2) / 2.
    e = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0, 0.0], [0.5, 0.5, -0.5, -0.5, 0.0, 0.0]], dtype=f64)
    e0 = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=f64)
    # left = (p cos s, p sin s, q cos d, q sin d, cos a, sin a), right = (1, fx, fy, ix, iy); entry m of the
    # unflipped G^-1 (2 x 3, row-major) is sum_jk C[j, k, m] left_j right_k, scaled by the frame changes.
    c = torch.zeros(6, 5, 6, dtype=f64)
    l00, l01 = {0: 1.0, 2: 1.0}, {3: 1.0, 1: -1.0}  # p R(sigma) + q Ref(delta)
    l10, l11 = {1: 1.0, 3: 1.0}, {0: 1.0, 2: -1.0}
    # Frame changes: input (left: u -> 4u / up - 1 / up, the offset in O), output (right: v -> v out / 4 + 1 / 4).
    ax, ay = 4 / up_w, 4 / up_h
    for m, entries, k, scale in (
        (0, l00, 0, ax * out_w / 4),
        (1, l01, 0, ax * out_h / 4),
        (3, l10, 0, ay * out_w / 4),
        (4, l11, 0, ay * out_h / 4),
        (2, l00, 1, ax),  # t_x = L00 fx + L01 fy + (cos a ix - sin a iy)
        (2, l01, 2, ax),
        (5, l10, 1, ay),  # t_y = L10 fx + L11 fy + (sin a ix + cos a iy)
        (5, l11, 2, ay),
    ):
        for j, sign in entries.items():
            c[j, k, m] += sign * scale
    c[4, 3, 2], c[5, 4, 2], c[5, 3, 5], c[4, 4, 5] = ax, -ax, ay, ay
    s1 = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=f64)  # the flip scales row 0
    s2 = 1.0 - s1
    o = torch.tensor([0.0, 0.0, -1 / up_w, 0.0, 0.0, -1 / up_h], dtype=f64)
    return tuple(t.to(device) for t in (bias, a, e, e0, c.view(30, 6), s1, s2, o))


_cached_theta_constants = functools.lru_cache(maxsize=64)(_theta_constants)


def _sampling_theta(
    params: AugmentParams, n: int, size: tuple[int, int], out: tuple[int, int], up: tuple[int, int]
) -> torch.Tensor:
    r"""The ``(N, 2, 3)`` float64 ``affine_grid`` matrix of the whole geometric chain, in one composition.

    ADA (Karras et al., NeurIPS 2020, App. B.2 / ``augment.py``) composes the inverse warp
    :math:`G^{-1} = F \, R_{90} \, T_{int} \, S \, R_{pre} \, A \, R_{post} \, T_{frac}` (output pixel ->
    input pixel, centred coordinates, each factor a 3×3 matrix) and embeds it between the two 2× grids.
    Here the product is written out: the isotropic scale commutes with rotations, so the linear part is
    :math:`L = F\, L'` with :math:`L' = s^{-1} R(\alpha + \theta_{pre})\, \mathrm{diag}(a^{-1}, a)\,
    R(\theta_{post}) = p\, R(\sigma) + q\, \mathrm{Ref}(\delta)` (from :math:`R(\phi)\,\mathrm{diag}(u, v)\,R(\psi)
    = \tfrac{u+v}{2} R(\phi+\psi) + \tfrac{u-v}{2} \mathrm{Ref}(\phi-\psi)`), :math:`\sigma = \alpha +
    \theta_{pre} + \theta_{post}`, :math:`\delta = \alpha + \theta_{pre} - \theta_{post}`,
    :math:`p, q = (a^{-1} \pm a) / 2s`, and the translation is :math:`F (R_{90} t_{int} + L' t_{frac})`.
    The frame changes are per-axis affine maps with constant coefficients: from the output's ``[-1, 1]``
    coordinates ``v`` to centred original-resolution pixels ``v·out/4 + 1/4`` on the right, from centred
    pixels ``u`` to the upsampled input's ``[-1, 1]`` frame ``4u/up - 1/up`` on the left.

    Our choice (few kernels, no host sync): every entry is then a bilinear form in
    :math:`\mathrm{left} = (p\cos\sigma, p\sin\sigma, q\cos\delta, q\sin\delta, \cos\alpha, \sin\alpha)` and
    :math:`\mathrm{right} = (1, f_x, f_y, i_x, i_y)` (the translations with the frame offset), times
    :math:`F` on the first row. The fields present are gathered into one float64 matrix ``V`` (scales as
    ``log2``), one affine map ``Z = b + V A`` gives the angles, ``log2`` of :math:`1/(as)` and :math:`a/s`,
    :math:`F` and the right factors; ``cos`` (``sin`` as ``cos(· - π/2)``), ``exp2`` and ``round`` (the
    integer translation) act on column blocks of ``Z`` in place; one matrix product with the constant
    bilinear form ``C`` (frame changes folded in) and one scaling by :math:`F` give ``theta`` -- about 25
    small ops instead of ADA's eight 3×3 products and an inverse (133). The constants depend only on the
    fields present and the sizes (cached per device in eager mode). Equal to the matrix product to float64
    rounding (tested).

    Args:
        params: the draw; at least one geometric field is set.
        n: batch size.
        size: ``(H, W)`` of the images.
        out: ``(H, W)`` of the sampled (2×) output grid.
        up: ``(H, W)`` of the padded, upsampled input.

    Returns:
        ``theta`` of shape ``(N, 2, 3)``, float64, on the parameters' device.
    """
    present = [
        (name, getattr(params, name)) for name, _ in _THETA_FIELDS if getattr(params, name) is not None
    ]
    dev = present[0][1].device
    names = tuple(name for name, _ in present)
    build = _theta_constants if torch.compiler.is_compiling() else _cached_theta_constants
    bias, a, e, e0, c, s1, s2, o = build(names, size, out, up, dev)
    v = torch.column_stack([t if t.device == dev else t.to(dev) for _, t in present]).to(torch.float64)
    logs = sum(name in ("scale", "aniso") for name in names)
    if logs:
        v[:, :logs].log2_()
    z = torch.addmm(bias, v, a)
    trig = z[:, _Z_TRIG].cos_()  # (cos, sin) of sigma, delta, alpha
    if "xint" in names:
        z[:, _Z_INT].round_()  # whole pixels, as ADA's integer translation
    left = trig * torch.addmm(e0, z[:, _Z_LOG].exp2_(), e)  # (p, p, q, q, 1, 1) * trig
    right = z[:, _Z_RIGHT]
    theta = (left.unsqueeze(2) * right.unsqueeze(1)).flatten(1) @ c
    if "xflip" in names:
        theta = torch.addcmul(o, theta, torch.addcmul(s2, z[:, _Z_FLIP : _Z_FLIP + 1], s1))
    else:
        theta = theta + o
    return theta.view(n, 2, 3)


# ----------------------------------------------------------------------------------------------
# Filtered resampling (separable FIR filters as depthwise convolutions).


def _resampling_filters(f: torch.Tensor, channels: int) -> tuple[torch.Tensor, ...]:
    """Depthwise weights of the separable filter ``f`` for ``channels`` channels, built once per call.

    Returns ``(up_w, up_h, down_w, down_h)``: the 2× upsampling taps ``2 f`` (gain 2 per axis keeps the DC
    level) along the width ``(C, 1, 1, k)`` and the height ``(C, 1, k, 1)``, then the decimating taps ``f``.
    """
    k = f.numel()
    down_w = f.expand(channels, 1, 1, k)
    up_w = down_w * 2
    return up_w, up_w.transpose(2, 3), down_w, down_w.transpose(2, 3)


def _upsample2x(x: torch.Tensor, up_w: torch.Tensor, up_h: torch.Tensor) -> torch.Tensor:
    """2× upsampling with the even-length FIR taps ``up_w`` / ``up_h`` (:func:`_resampling_filters`), polyphase form.

    Equal to inserting zeros, padding by ``((k + 1) // 2, (k - 2) // 2)`` and convolving with the filter; a
    stride-2 transposed convolution per axis skips the multiplications by the inserted zeros, and its
    ``padding`` of ``k // 2 - 1`` drops the surplus ``k - 2`` border outputs symmetrically (no slice).
    """
    c, k = x.shape[1], up_w.shape[-1]
    x = F.conv_transpose2d(x, up_w, stride=(1, 2), padding=(0, k // 2 - 1), groups=c)
    return F.conv_transpose2d(x, up_h, stride=(2, 1), padding=(k // 2 - 1, 0), groups=c)


def _downsample2x(x: torch.Tensor, down_w: torch.Tensor, down_h: torch.Tensor) -> torch.Tensor:
    """Low-pass with the FIR taps ``down_w`` / ``down_h`` and keep every second pixel (no padding: the caller sized ``x``).

    A stride-2 convolution per axis computes only the kept outputs.
    """
    c = x.shape[1]
    x = F.conv2d(x, down_w, stride=(1, 2), groups=c)
    return F.conv2d(x, down_h, stride=(2, 1), groups=c)


def _geometry_sizes(h: int, w: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(up, out)``: the padded, 2× upsampled input size and the sampled grid size of :func:`_apply_geometry`."""
    return (2 * (3 * h - 2), 2 * (3 * w - 2)), (2 * h + k - 2, 2 * w + k - 2)


def _sampling_grid(theta: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``grid_sample`` grid of :func:`_apply_geometry` for images shaped like ``x``, in ``x``'s dtype."""
    n, c, h, w = x.shape
    _, (out_h, out_w) = _geometry_sizes(h, w, k)
    return F.affine_grid(theta.to(x.dtype), [n, c, out_h, out_w], align_corners=False)


def _apply_geometry(x: torch.Tensor, grid: torch.Tensor, filters: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Resample ``x`` (N, C, H, W) through ``grid`` (:func:`_sampling_grid`): one ``grid_sample``.

    ADA's filtered warp (Karras et al., NeurIPS 2020, ``augment.py``): reflect padding, 2× upsampling
    with the filter, bilinear sampling of a 2× output grid through the composed inverse warp, then filtered
    2× downsampling. The reference pads the sampled grid by ``k/2 - 1`` and crops ``k/2`` before the
    decimating filter (``k`` = 12 taps): the net one-pixel crop per side is folded into the sampled grid
    (our choice: it samples ``2H + k - 2`` rows instead of ``2H + k``, and the downsampling needs no pad
    and no slice; the kept outputs are the same). The grid and the ``filters`` (:func:`_resampling_filters`)
    are built once per call and shared by every tensor resampled with the same draw.
    """
    _, _, h, w = x.shape
    # Static reflect padding: the largest the image allows, so no draw ever samples the zero border
    # needlessly, and shapes never depend on the draw (no host sync, torch.compile friendly).
    my, mx = h - 1, w - 1
    x = F.pad(x, [mx, mx, my, my], mode="reflect") if (mx or my) else x
    up_w, up_h, down_w, down_h = filters
    x = _upsample2x(x, up_w, up_h)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(x, down_w, down_h)


def _apply_colour(x: torch.Tensor, params: AugmentParams, channels: int) -> torch.Tensor:
    r"""Brightness, contrast and saturation (DiffAugment's ops, as E-LatentLPIPS uses them) as one affine map.

    ``x`` is ``(N, K·C, H, W)``: ``K`` tensors of ``C`` channels stacked along channels, each with its own
    statistics. The sequential chain -- :math:`x + b`, then contrast :math:`c` around the per-sample mean
    :math:`m`, then saturation :math:`s` around the per-pixel channel mean :math:`\mu` -- is affine in
    :math:`x` with means that move along, so it collapses to one colour matrix per sample,

    .. math:: T(x) = s c\, x + (c - s c)\, \mu(x) + (1 - c)\, m(x) + b,

    i.e. :math:`(s c\, I + \tfrac{c - s c}{C} \mathbf{1}\mathbf{1}^\top) x` plus an offset (our choice:
    three fused multiply-adds instead of a dozen element-wise passes; equal to the chain up to float
    rounding). With one channel :math:`\mu(x) = x` and the saturation has no effect, as in the chain.
    """
    n, kc, h, w = x.shape
    v = x.view(n, kc // channels, channels, h, w)

    def coef(t: torch.Tensor | None, neutral: float) -> torch.Tensor | float:
        return t.to(x).view(n, 1, 1, 1, 1) if t is not None else neutral

    saturate = params.saturation is not None and channels > 1  # one channel: the identity, skipped
    b, c, s = coef(params.brightness, 0.0), coef(params.contrast, 1.0), coef(params.saturation, 1.0)
    out = v
    if saturate or params.contrast is not None:
        mu = v.mean(dim=2, keepdim=True)
        sc = s * c
        out = v * sc + mu * (c - sc) if saturate else v * c
        if params.contrast is not None:
            out = out + mu.mean(dim=(3, 4), keepdim=True) * (1 - c)
    if params.brightness is not None:
        out = out + b
    return out.view(n, kc, h, w)


class LatentAugment(nn.Module):
    r"""ADA-style differentiable augmentation with one shared draw per sample, for any channel count.

    For a draw :math:`T` (a random geometric warp :math:`G`, colour transform :math:`C` and cutout
    mask :math:`M`), every tensor :math:`x` passed in the same call becomes
    :math:`T(x) = M \odot C(\mathrm{resample}(x, G^{-1}))`. ``aug(input, target)`` therefore
    returns a consistently augmented pair, and ``aug(x)`` is a DiffAugment-style op for a
    discriminator. Each op fires per sample with probability ``p`` times its multiplier (1).

    Distributions (ADA defaults): x-flip with probability 1/2; a uniform number of quarter turns;
    integer translation uniform in ``±xint_max`` of the size; isotropic scale
    :math:`2^{\mathcal N(0, \sigma_s^2)}`; two rotations uniform in ``±rotate_max·π``, each with
    probability :math:`1 - \sqrt{1 - p}`; anisotropic scale :math:`2^{\mathcal N(0, \sigma_a^2)}`;
    fractional translation :math:`\mathcal N(0, \sigma_t^2)` of the size; brightness
    :math:`+\mathcal U(-\tfrac12, \tfrac12)`; contrast :math:`\times\mathcal U(\tfrac12, \tfrac32)`
    around the sample mean; saturation :math:`\times\mathcal U(0, 2)` around the channel mean; cutout
    of a square of side ``cutout_size`` at a uniform centre.

    Precision: the resampling runs outside autocast in at least float32 (half-precision inputs are upcast
    and the outputs cast back to each input's dtype; float64 stays float64), the warp matrices in float64.

    Image-only by design (2-D warps of ``(N, C, H, W)`` latents, as ADA augments images): 5-D video latents
    ``(B, C, F, H, W)`` are refused with a :class:`ShapeError` that says so, since a per-frame draw would
    break the video's temporal coherence and one shared draw per video is a choice the paper does not make.

    Args:
        augment: group letters (``"b"``, ``"g"``, ``"c"``, ``"o"``, e.g. ``"bg"``) or op names,
            see :func:`augment_ops`; ``None`` is the identity.
        p: overall probability multiplier in [0, 1] (ADA's adaptive ``p``); change ``aug.p`` freely.
        xint_max: integer-translation range relative to the size, in [0, 1].
        scale_std: ``log2`` standard deviation of the isotropic scaling, >= 0.
        rotate_max: rotation range, 1 = full circle, >= 0.
        aniso_std: ``log2`` standard deviation of the anisotropic scaling, >= 0.
        xfrac_std: fractional-translation standard deviation relative to the size, >= 0.
        cutout_size: cutout side relative to the size, in [0, 1].

    Raises:
        OptionError: on an unknown ``augment`` letter or op name, or an option outside its range (``p``,
            ``xint_max`` or ``cutout_size`` outside [0, 1], a negative standard deviation or
            ``rotate_max``, a NaN or infinite value).
        DTypeError: if an option is not a real number or ``augment`` is not a string / list of op names.

    Shapes:
        every input ``(N, C, H, W)`` with the same shape, floating point; outputs have the same shape.

    Example:
        >>> aug = LatentAugment("bgco")
        >>> x = torch.randn(2, 4, 16, 16)
        >>> a, b = aug(x, x.clone(), generator=torch.Generator().manual_seed(0))
        >>> a.shape, bool(torch.equal(a, b))
        (torch.Size([2, 4, 16, 16]), True)
        >>> aug(x).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(
        self,
        augment: str | Iterable[str] | None = "bg",
        *,
        p: float = 1.0,
        xint_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_max: float = 1.0,
        aniso_std: float = 0.2,
        xfrac_std: float = 0.125,
        cutout_size: float = 0.5,
    ) -> None:
        super().__init__()
        self.ops = augment_ops(augment)
        self.p = p
        self.xint_max = check_real(xint_max, "xint_max", low=0, high=1)
        self.scale_std = check_real(scale_std, "scale_std", low=0)
        self.rotate_max = check_real(rotate_max, "rotate_max", low=0)
        self.aniso_std = check_real(aniso_std, "aniso_std", low=0)
        self.xfrac_std = check_real(xfrac_std, "xfrac_std", low=0)
        self.cutout_size = check_real(cutout_size, "cutout_size", low=0, high=1)
        # Constant, not part of the state dict.
        self.filter: torch.Tensor
        self.register_buffer("filter", sym6_filter(), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> LatentAugment:
        """``.to()`` / ``.cuda()`` / ``.half()`` move the resampling filter but never round it below float32.

        The augmentation computes in float32 or wider (``forward``), so a filter cast to bf16 / fp16 with the
        module (e.g. ``ELatentLPIPS(...).to(torch.bfloat16)``) would only round its taps (their sum to 1.0025:
        every resampled latent scaled by ~1%); it is rebuilt in float32 on its new device instead.
        """
        super()._apply(fn, recurse)
        if self.filter.dtype not in (torch.float32, torch.float64):
            self.filter = sym6_filter(torch.float32, self.filter.device)
        return self

    @property
    def p(self) -> float:
        """The probability multiplier in [0, 1]; assigning it is checked like the constructor argument."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_real(value, "p", low=0, high=1)

    def extra_repr(self) -> str:
        return f"ops={list(self.ops)}, p={self.p}"

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AugmentParams:
        """Draw parameters for ``batch_size`` samples (see :class:`AugmentParams`).

        Random numbers come from ``generator`` on the generator's device (the default generator of
        ``device`` when ``None``), drawn in float32 whatever ``dtype`` is (so a seed gives the same draw for
        float32 and float64 data), and are returned on ``device``; the colour factors in ``dtype``.

        Args:
            batch_size: number of samples ``N`` to draw for, >= 1.
            generator: source of randomness; ``None`` uses the default generator of the device.
            device: where the parameters are returned; ``None`` is the CPU.
            dtype: floating dtype of the colour factors (the geometry is always float32).

        Returns:
            The draw, with ``None`` for the ops this module does not enable.

        Raises:
            OptionError: if ``batch_size`` is not an int >= 1.
            DTypeError: if ``generator`` is not a ``torch.Generator`` or ``dtype`` is not floating.

        Example:
            >>> aug = LatentAugment("b")
            >>> prm = aug.sample(4, generator=torch.Generator().manual_seed(0))
            >>> prm.xflip.shape, prm.scale is None
            (torch.Size([4]), True)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise OptionError(f"Expected `batch_size` to be an int >= 1, but got {batch_size!r}.")
        _check_generator(generator)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DTypeError(f"Expected `dtype` to be a floating-point torch.dtype, but got {dtype!r}.")
        return self._sample(int(batch_size), generator, device, dtype)

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> AugmentParams:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        gdev = generator.device if generator is not None else dev
        ops, p = set(self.ops), self.p

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float32)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=gdev)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            # u (high - low) + low inside the generator's kernel (one kernel instead of three): the same numbers
            # as rand(...) * (high - low) + low from the same stream, bit for bit for the ranges used here
            # (the scaling by 2 or 4 is exact, so the shift by -1 rounds the same exact value once).
            draw = torch.empty(shape, device=gdev, dtype=torch.float32)
            return draw.uniform_(low, high, generator=generator)

        def gate(
            value: torch.Tensor, prob: float | torch.Tensor, neutral: float, *gshape: int
        ) -> torch.Tensor:
            keep = rand(*gshape)  # drawn even when it always passes: the stream stays ADA's
            # rand < 1 always: eager mode skips the select kernels; a traced graph keeps them, else its
            # dead-code elimination would drop this draw and shift every later one.
            if isinstance(prob, float) and prob >= 1.0 and not torch.compiler.is_compiling():
                return value
            return torch.where(keep < prob, value, torch.full_like(value, neutral))

        out = AugmentParams()
        if "xflip" in ops:
            out.xflip = gate(torch.floor(uniform(0, 2, n)), p, 0.0, n)
        if "rotate90" in ops:
            out.rotate90 = gate(torch.floor(uniform(0, 4, n)), p, 0.0, n)
        if "xint" in ops:
            out.xint = gate(uniform(-1, 1, n, 2) * self.xint_max, p, 0.0, n, 1)
        if "scale" in ops:
            out.scale = gate(torch.exp2(randn(n) * self.scale_std), p, 1.0, n)
        p_rot = 1 - math.sqrt(min(max(1 - p, 0.0), 1.0))  # P(pre or post) = p
        if "rotate" in ops:
            out.rotate_pre = gate(uniform(-1, 1, n) * math.pi * self.rotate_max, p_rot, 0.0, n)
        if "aniso" in ops:
            out.aniso = gate(torch.exp2(randn(n) * self.aniso_std), p, 1.0, n)
        if "rotate" in ops:
            out.rotate_post = gate(uniform(-1, 1, n) * math.pi * self.rotate_max, p_rot, 0.0, n)
        if "xfrac" in ops:
            out.xfrac = gate(randn(n, 2) * self.xfrac_std, p, 0.0, n, 1)
        # Colour draws follow DiffAugment's ranges; a gate is drawn only when p < 1.
        if "brightness" in ops:
            v = rand(n, 1, 1, 1).reshape(n).to(dtype) - 0.5
            out.brightness = gate(v, p, 0.0, n) if p < 1 else v
        if "contrast" in ops:
            v = rand(n, 1, 1, 1).reshape(n).to(dtype) + 0.5
            out.contrast = gate(v, p, 1.0, n) if p < 1 else v
        if "saturation" in ops:
            v = rand(n, 1, 1, 1).reshape(n).to(dtype) * 2
            out.saturation = gate(v, p, 1.0, n) if p < 1 else v
        if "cutout" in ops:
            size = gate(torch.full((n,), self.cutout_size, device=gdev), p, 0.0, n)
            out.cutout_size = size
            out.cutout_center = rand(n, 2, 1, 1, 1).reshape(n, 2)
        return out.to(dev) if torch.device(gdev) != dev else out  # already there: no op per field

    def _check_tensors(self, tensors: tuple[Any, ...], name: str) -> None:
        """The static checks of every tensor passed (and, as a value check, finiteness)."""
        if not tensors:
            raise ShapeError(f"Expected at least one tensor in `{name}` to augment, but got none.", name=name)
        for i, t in enumerate(tensors):
            check_not_video(
                t,
                f"{name}[{i}]",
                "LatentAugment (2-D geometric / colour augmentation of image latents)",
                "(N, C, H, W)",
            )
            check_float_input(t, f"{name}[{i}]", ndim=4, layout="(N, C, H, W)")
            if t.shape != tensors[0].shape:
                raise ShapeError(
                    f"Expected every tensor to have the shape of {name}[0] {tuple(tensors[0].shape)}, "
                    f"but {name}[{i}] has {tuple(t.shape)}. All tensors of one call share one draw per sample.",
                    name=f"{name}[{i}]",
                    expected=tuple(tensors[0].shape),
                    actual=tuple(t.shape),
                )

    @staticmethod
    def _check_params(params: Any, n: int) -> None:
        if not isinstance(params, AugmentParams):
            raise DTypeError(
                f"Expected `params` to be an AugmentParams (from LatentAugment.sample) or None, but got "
                f"{type(params).__name__}."
            )
        params.check_batch(n)
        if value_checks_enabled():
            for f in fields(params):
                value = getattr(params, f.name)
                if value is not None and value.is_floating_point():
                    check_finite(value, f"params.{f.name}")

    def transform(self, tensors: tuple[torch.Tensor, ...], params: AugmentParams) -> tuple[torch.Tensor, ...]:
        """Apply one draw ``params`` to every tensor of ``tensors`` (same shape ``(N, C, H, W)``).

        Unlike :meth:`forward` this runs in the tensors' dtype and under the caller's autocast, and
        expects the tensors to share one dtype.

        Args:
            tensors: the tensors to augment, all of one shape ``(N, C, H, W)`` and floating dtype.
            params: the draw to apply, for a batch of ``N`` (see :meth:`sample`).

        Returns:
            The augmented tensors, in the order given.

        Raises:
            ShapeError: if ``tensors`` is empty, a tensor is 5-D (image-only), not 4-D or empty, or shapes differ;
                if a ``params`` field does not fit a batch of ``N`` (see :meth:`AugmentParams.check_batch`).
            DTypeError: if an entry is not a floating tensor, dtypes differ or ``params`` is not an
                :class:`AugmentParams`.
            NonFiniteError: if a tensor or a parameter holds NaN/Inf (a value check).

        Example:
            >>> aug = LatentAugment("o")
            >>> x = torch.ones(1, 4, 8, 8)
            >>> prm = AugmentParams(cutout_size=torch.tensor([0.5]), cutout_center=torch.tensor([[0.5, 0.5]]))
            >>> (y,) = aug.transform((x,), prm)
            >>> float(y.mean())  # the central quarter of the image is erased
            0.75
        """
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (tuple, list)):
            raise DTypeError(
                f"Expected `tensors` to be a tuple of tensors, but got {type(tensors).__name__}; "
                "pass (x,) for a single tensor."
            )
        tensors = tuple(tensors)
        self._check_tensors(tensors, "tensors")
        for i, t in enumerate(tensors):
            if t.dtype != tensors[0].dtype:
                raise DTypeError(
                    f"Expected every tensor of `tensors` to have the dtype of tensors[0] ({tensors[0].dtype}), "
                    f"but tensors[{i}] is {t.dtype}. Cast them to one dtype, or call the module (forward), "
                    "which computes in a common dtype."
                )
        self._check_params(params, tensors[0].shape[0])
        return self._transform(tensors, params)

    def _transform(
        self, tensors: tuple[torch.Tensor, ...], params: AugmentParams
    ) -> tuple[torch.Tensor, ...]:
        n, c, h, w = tensors[0].shape
        ref = tensors[0]
        # Tensors with equal requires_grad share each pass (stacked along channels: one grid, one colour
        # transform per sample); otherwise each runs alone, keeping tensors without gradient out of the graph.
        together = len(tensors) > 1 and all(t.requires_grad == ref.requires_grad for t in tensors)
        groups = [torch.cat(tensors, dim=1)] if together else list(tensors)
        if params.has_geometry:
            f = self.filter
            f = (
                f
                if (f.dtype, f.device) == (ref.dtype, ref.device)
                else f.to(device=ref.device, dtype=ref.dtype)
            )
            up, out_size = _geometry_sizes(h, w, f.numel())
            grid = _sampling_grid(_sampling_theta(params, n, (h, w), out_size, up), ref, f.numel())
            filters = _resampling_filters(f, groups[0].shape[1])  # every group has the same channel count
            groups = [_apply_geometry(g, grid, filters) for g in groups]
        if params.brightness is not None or params.contrast is not None or params.saturation is not None:
            groups = [_apply_colour(g, params, c) for g in groups]
        if params.cutout_size is not None and params.cutout_center is not None:
            size = params.cutout_size.to(ref).reshape(n, 1, 1)
            center = params.cutout_center.to(ref)
            xs = (torch.arange(w, device=ref.device, dtype=ref.dtype) + 0.5) / w
            ys = (torch.arange(h, device=ref.device, dtype=ref.dtype) + 0.5) / h
            keep_x = (xs.reshape(1, 1, w) - center[:, 0].reshape(n, 1, 1)).abs() >= size / 2
            keep_y = (ys.reshape(1, h, 1) - center[:, 1].reshape(n, 1, 1)).abs() >= size / 2
            mask = (keep_x | keep_y).to(ref.dtype).unsqueeze(1)
            groups = [g * mask for g in groups]
        out = [part for g in groups for part in (g.split(c, dim=1) if together else (g,))]
        return tuple(out)

    def forward(
        self,
        *tensors: torch.Tensor,
        generator: torch.Generator | None = None,
        params: AugmentParams | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Augment every tensor with one shared draw; returns a tensor for one input, else a tuple.

        The resampling runs outside autocast, in at least float32 and at least the precision of the
        most precise input (half-precision inputs are upcast); each output comes back in its input's
        dtype. Under bf16 autocast the filter convolutions would otherwise round the augmented latents
        to bf16.

        Args:
            *tensors: ``(N, C, H, W)`` floating tensors of one shape (dtypes may differ).
            generator: source of randomness (reproducible draws); ``None`` uses the default generator of
                the tensors' device.
            params: replay this draw instead of sampling one (see :meth:`sample`); ``None`` draws one.

        Returns:
            The augmented tensor for one input, else a tuple in the order given, each with its input's
            shape and dtype.

        Raises:
            ShapeError: if no tensor is given, a tensor is 5-D video latents (image-only) or not 4-D
                ``(N, C, H, W)`` or has an empty batch, shapes differ, or ``params`` was drawn for another batch size.
            DTypeError: if an input is not a floating tensor, ``generator`` is not a ``torch.Generator`` or
                ``params`` is not an :class:`AugmentParams`.
            NonFiniteError: if an input or ``params`` holds NaN/Inf (a value check, see
                :func:`diffdistill.errors.value_checks`).
        """
        self._check_tensors(tensors, "tensors")
        _check_generator(generator)
        if params is not None:
            self._check_params(params, tensors[0].shape[0])
        if not self.ops and params is None:
            return tensors[0] if len(tensors) == 1 else tuple(tensors)
        out = self._run(tensors, generator, params)
        return out[0] if len(out) == 1 else out

    def _run(
        self,
        tensors: tuple[torch.Tensor, ...],
        generator: torch.Generator | None,
        params: AugmentParams | None,
    ) -> tuple[torch.Tensor, ...]:
        """Forward without the input checks (for callers that have checked already)."""
        work = _working_dtype(*(t.dtype for t in tensors))
        if params is None:
            params = self._sample(tensors[0].shape[0], generator, tensors[0].device, work)
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            out = self._transform(tuple(_cast(t, work) for t in tensors), params)
        return tuple(_cast(o, t.dtype) for o, t in zip(out, tensors, strict=True))
