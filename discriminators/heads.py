r"""Discriminator heads that turn UNet features into real/fake logits, run in float32.

=======================  =========================================================  ============================
head                     layers                                                     used by
=======================  =========================================================  ============================
:class:`StridedConvHead` [4×4 conv s2, GroupNorm, SiLU] × k, r×r conv s r, GN,       SDXL-Lightning, DMD2
                         SiLU, 1×1 conv → 1 logit ``(B, 1, 1, 1)``
:class:`PointwiseConvHead` 1×1 conv, GN, LeakyReLU, residual [1×1 conv, GN,         PCM
                         LeakyReLU], 1×1 conv → patch logits ``(B, 1, h, w)``
:class:`ReadoutHead`     GN, SiLU, 3×3 conv → patch logits ``(B, 1, h, w)``         Diffusion2GAN
=======================  =========================================================  ============================

:func:`run_head_float32` runs a head outside autocast on features cast to the head's dtype (float32
unless the caller cast the head), so that the logits and the GAN loss keep float32 precision when
the backbone runs in bf16/fp16. Called directly, each head also casts its features to its own dtype, so a
bf16 feature map works with a float32 head without autocast.

References:
    * S. Lin, A. Wang, X. Yang, "SDXL-Lightning", arXiv:2402.13929, Sec. 3.3.
    * T. Yin et al., "Improved Distribution Matching Distillation" (DMD2), arXiv:2405.14867
      (``cls_pred_branch``: 32 → 16 → 8 → 4 by 4×4 stride-2 convs, a 4×4 stride-4 conv, a 1×1 conv).
    * F.-Y. Wang et al., "Phased Consistency Model" (PCM), arXiv:2405.18407 (``discriminator_sdxl.py``).
    * M. Kang et al., "Distilling Diffusion Models into Conditional GANs" (Diffusion2GAN), arXiv:2405.05967.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_all_finite,
    check_float_input,
    check_int,
    check_module,
    check_optional_int,
    check_real,
)
from ._inputs import shape_str

__all__ = [
    "PointwiseConvHead",
    "ReadoutHead",
    "StridedConvHead",
    "reset_module_parameters",
    "run_head_float32",
]


def _check_groups(groups: int, channels: int, what: str, fix: str) -> None:
    """Raise :class:`OptionError` unless ``groups`` divides ``channels`` (``what`` and ``fix`` name the
    arguments the caller passed)."""
    if channels % groups != 0:
        raise OptionError(
            f"Expected {what} ({channels}) to be divisible by `norm_groups` ({groups}). Pass a `norm_groups` "
            f"that divides {channels}{fix}."
        )


def _group_norm(groups: int, channels: int, what: str, fix: str) -> nn.GroupNorm:
    _check_groups(groups, channels, what, fix)
    return nn.GroupNorm(groups, channels)


def _module_dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def reset_module_parameters(module: nn.Module) -> None:
    """Re-initialise every sub-module of ``module`` that has ``reset_parameters`` (convs, norms, linears).

    Args:
        module: the module whose sub-modules (itself included) are re-initialised in place.

    Raises:
        DTypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> conv = nn.Conv2d(2, 2, 1); before = conv.weight.clone()
        >>> _ = torch.manual_seed(1); reset_module_parameters(conv)
        >>> bool(torch.equal(before, conv.weight))
        False
    """
    check_module(module, "module")
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _run_head(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """:func:`run_head_float32` without the input checks (features computed by a discriminator)."""
    dtype = _module_dtype(head)
    device_type = features.device.type
    out_dtype = torch.promote_types(dtype, torch.float32)
    if not torch.amp.is_autocast_available(device_type):  # e.g. "meta" (FLOP counting)
        return head(features.to(dtype)).to(out_dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        return head(features.to(dtype)).to(out_dtype)


def run_head_float32(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Run ``head`` with autocast disabled on ``features`` cast to the head's dtype.

    The logits keep at least float32 precision when the backbone runs in bf16/fp16 under autocast; a float64
    head (reference tests, gradcheck) gives float64.

    Args:
        head: the head module (its first parameter's dtype is the compute dtype; float32 if it has none).
        features: the features to classify, any floating dtype.

    Returns:
        ``head(features)`` in ``promote_types(head dtype, float32)``.

    Raises:
        DTypeError: ``head`` is not an ``nn.Module``; ``features`` is not a floating-point tensor.
        ShapeError: ``features`` is empty.
        NonFiniteError: ``features`` holds NaN / Inf (a value check).

    Example:
        >>> head = nn.Conv2d(4, 1, 1)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     run_head_float32(head, torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    if not isinstance(head, nn.Module):
        raise DTypeError(f"Expected `head` to be a torch.nn.Module, but got {type(head).__name__}.")
    check_float_input(features, "features", finite=False)
    check_all_finite([("features", features)])
    return _run_head(head, features)


class _Head(nn.Module):
    """Input handling shared by the heads: checks of ``features`` and the cast to the head's dtype."""

    in_channels: int
    #: Off for the heads of a discriminator, whose features are computed, not passed by the caller.
    _check_feature_values: bool = True

    def _features(self, features: Any, min_size: int = 1) -> torch.Tensor:
        check_float_input(features, "features", ndim=4, layout="(B, C, H, W)", finite=False)
        if features.shape[1] != self.in_channels or min(features.shape[-2:]) < min_size:
            size = f" with H, W >= {min_size} (the resolution the head was sized for)" if min_size > 1 else ""
            raise ShapeError(
                f"Expected `features` of shape (B, {self.in_channels}, H, W){size}, but got "
                f"{shape_str(features.shape)}. Build the head with the channels{' and feature resolution' if size else ''} "
                "of its backbone level.",
                name="features",
                expected=(self.in_channels, min_size),
                actual=tuple(features.shape),
            )
        if self._check_feature_values:
            check_all_finite([("features", features)])
        return features.to(_module_dtype(self))


class StridedConvHead(_Head):
    r"""SDXL-Lightning / DMD2 head: strided 4×4 convs from the feature resolution down to one logit.

    With feature resolution :math:`r_0` the head halves it with ``k`` blocks
    ``[Conv4×4 stride 2 (pad 1), GroupNorm, SiLU]`` until :math:`r_k \le 4`, then applies
    ``[Conv r_k×r_k stride r_k, GroupNorm, SiLU]`` to reach 1×1 and a 1×1 conv to one channel. For SDXL's
    32×32 bottleneck this is DMD2's ``cls_pred_branch`` (32 → 16 → 8 → 4 → 1). Inputs whose sides are
    multiples of :math:`r_0` give a patch map of logits (the UNet discriminators refuse other sizes: the last
    strided conv would leave a strip of the map out of every logit). The GroupNorm after the last conv sees a 1×1 map, so each
    group should hold several channels (SDXL: 1280 / 32 = 40); for narrow test backbones pass a smaller
    ``norm_groups`` (with 2 channels per group the normalised values are only ±1).

    Args:
        in_channels: feature channels ``C`` (``2C`` for a conditional discriminator's concatenation).
        feature_resolution: spatial size :math:`r_0` of the features the head is sized for.
        channels: width of the hidden convs (default None: ``in_channels``).
        norm_groups: GroupNorm groups (32 in the papers); must divide the hidden width.

    Raises:
        DTypeError: a size is not an int.
        OptionError: a size is < 1, or ``norm_groups`` does not divide the hidden width.

    Shapes:
        ``(B, in_channels, r_0, r_0) -> (B, 1, 1, 1)``.

    Example:
        >>> head = StridedConvHead(64, 32, norm_groups=32)
        >>> len([m for m in head.modules() if isinstance(m, nn.Conv2d)])  # 32->16->8->4, 4->1, 1x1
        5
        >>> head(torch.randn(2, 64, 32, 32)).shape
        torch.Size([2, 1, 1, 1])
    """

    def __init__(
        self, in_channels: int, feature_resolution: int, *, channels: int | None = None, norm_groups: int = 32
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        feature_resolution = check_int(feature_resolution, "feature_resolution", minimum=1)
        hidden = check_optional_int(channels, "channels", minimum=1)
        norm_groups = check_int(norm_groups, "norm_groups", minimum=1)
        width = hidden or in_channels
        fix = f", or set `channels` to a multiple of {norm_groups}"
        layers: list[nn.Module] = []
        res, c_in = feature_resolution, in_channels
        while res > 4:
            layers += [
                nn.Conv2d(c_in, width, 4, 2, 1),
                _group_norm(norm_groups, width, "the head channels", fix),
                nn.SiLU(),
            ]
            res, c_in = res // 2, width
        layers += [
            nn.Conv2d(c_in, width, res, res),
            _group_norm(norm_groups, width, "the head channels", fix),
            nn.SiLU(),
        ]
        layers.append(nn.Conv2d(width, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.feature_resolution = feature_resolution

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of ``features`` (cast to the head's dtype first).

        Args:
            features: ``(B, in_channels, H, W)`` with ``H, W >= feature_resolution``, any floating dtype.

        Returns:
            ``(B, 1, 1, 1)`` logits for ``H = W = feature_resolution`` (a patch map for larger inputs).

        Raises:
            DTypeError: ``features`` is not a floating-point tensor.
            ShapeError: ``features`` is not 4-D, is empty, has other channels or is smaller than
                ``feature_resolution``.
            NonFiniteError: ``features`` holds NaN / Inf (a value check).
        """
        return self.layers(self._features(features, self.feature_resolution))


class PointwiseConvHead(_Head):
    r"""PCM head: per-pixel 1×1 convs with a residual block, giving a patch map of logits.

    .. math::

        h = \mathrm{LReLU}(\mathrm{GN}(W_1 x)),\quad h \leftarrow h + \mathrm{LReLU}(\mathrm{GN}(W_2 h)),
        \quad \text{logits} = W_3 h

    Args:
        in_channels: feature channels.
        channels: hidden width (default None: ``in_channels``).
        norm_groups: GroupNorm groups; must divide the hidden width.
        negative_slope: LeakyReLU slope (PCM's ``nn.LeakyReLU()`` default, 0.01).

    Raises:
        DTypeError: a size is not an int, or ``negative_slope`` is not a number.
        OptionError: a size is < 1, or ``norm_groups`` does not divide the hidden width.

    Shapes:
        ``(B, in_channels, h, w) -> (B, 1, h, w)``.

    Example:
        >>> PointwiseConvHead(32, norm_groups=8)(torch.randn(2, 32, 5, 5)).shape
        torch.Size([2, 1, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int | None = None,
        norm_groups: int = 32,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        hidden = check_optional_int(channels, "channels", minimum=1)
        norm_groups = check_int(norm_groups, "norm_groups", minimum=1)
        check_real(negative_slope, "negative_slope")
        width = hidden or in_channels
        fix = f", or set `channels` to a multiple of {norm_groups}"
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 1),
            _group_norm(norm_groups, width, "the head channels", fix),
            nn.LeakyReLU(negative_slope),
        )
        self.residual = nn.Sequential(
            nn.Conv2d(width, width, 1),
            _group_norm(norm_groups, width, "the head channels", fix),
            nn.LeakyReLU(negative_slope),
        )
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Patch logits of ``features`` (cast to the head's dtype first).

        Args:
            features: ``(B, in_channels, h, w)``, any floating dtype.

        Returns:
            ``(B, 1, h, w)`` logits.

        Raises:
            DTypeError: ``features`` is not a floating-point tensor.
            ShapeError: ``features`` is not 4-D, is empty or has other channels.
            NonFiniteError: ``features`` holds NaN / Inf (a value check).
        """
        h = self.stem(self._features(features))
        return self.out(h + self.residual(h))


class ReadoutHead(_Head):
    r"""Diffusion2GAN-style readout at one decoder scale: GroupNorm, SiLU, 3×3 conv to one channel.

    Args:
        in_channels: feature channels of the decoder level.
        norm_groups: GroupNorm groups; must divide ``in_channels``.

    Raises:
        DTypeError: a size is not an int.
        OptionError: a size is < 1, or ``norm_groups`` does not divide ``in_channels``.

    Shapes:
        ``(B, in_channels, h, w) -> (B, 1, h, w)``.

    Example:
        >>> ReadoutHead(32, norm_groups=8)(torch.randn(2, 32, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(self, in_channels: int, *, norm_groups: int = 32) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        norm_groups = check_int(norm_groups, "norm_groups", minimum=1)
        self.in_channels = in_channels
        self.layers = nn.Sequential(
            _group_norm(norm_groups, in_channels, "the readout channels (`in_channels`)", ""),
            nn.SiLU(),
            nn.Conv2d(in_channels, 1, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Patch logits of ``features`` (cast to the head's dtype first).

        Args:
            features: ``(B, in_channels, h, w)``, any floating dtype.

        Returns:
            ``(B, 1, h, w)`` logits.

        Raises:
            DTypeError: ``features`` is not a floating-point tensor.
            ShapeError: ``features`` is not 4-D, is empty or has other channels.
            NonFiniteError: ``features`` holds NaN / Inf (a value check).
        """
        return self.layers(self._features(features))
