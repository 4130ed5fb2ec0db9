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
the backbone runs in bf16/fp16.

References:
    * S. Lin, A. Wang, X. Yang, "SDXL-Lightning", arXiv:2402.13929, Sec. 3.3.
    * T. Yin et al., "Improved Distribution Matching Distillation" (DMD2), arXiv:2405.14867
      (``cls_pred_branch``: 32 → 16 → 8 → 4 by 4×4 stride-2 convs, a 4×4 stride-4 conv, a 1×1 conv).
    * F.-Y. Wang et al., "Phased Consistency Model" (PCM), arXiv:2405.18407 (``discriminator_sdxl.py``).
    * M. Kang et al., "Distilling Diffusion Models into Conditional GANs" (Diffusion2GAN), arXiv:2405.05967.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import OptionError, ShapeError, check_ndim, check_tensor

__all__ = [
    "PointwiseConvHead",
    "ReadoutHead",
    "StridedConvHead",
    "reset_module_parameters",
    "run_head_float32",
]


def _group_norm(groups: int, channels: int, what: str) -> nn.GroupNorm:
    if groups < 1 or channels % groups != 0:
        raise OptionError(
            f"Expected the {what} channels ({channels}) to be divisible by `norm_groups` ({groups}). Pass "
            f"norm_groups equal to a divisor of {channels} or set `head_channels` to a multiple of {groups}."
        )
    return nn.GroupNorm(groups, channels)


def reset_module_parameters(module: nn.Module) -> None:
    """Re-initialise every sub-module of ``module`` that has ``reset_parameters`` (convs, norms, linears).

    Example:
        >>> conv = nn.Conv2d(2, 2, 1); before = conv.weight.clone()
        >>> _ = torch.manual_seed(1); reset_module_parameters(conv)
        >>> bool(torch.equal(before, conv.weight))
        False
    """
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def run_head_float32(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Run ``head`` with autocast disabled on ``features`` cast to the head's dtype; return logits in at
    least float32 (a float64 head, e.g. for reference tests and gradcheck, gives float64).

    Example:
        >>> head = nn.Conv2d(4, 1, 1)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     run_head_float32(head, torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    param = next(head.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device_type = features.device.type
    out_dtype = torch.promote_types(dtype, torch.float32)
    if not torch.amp.is_autocast_available(device_type):  # e.g. "meta" (FLOP counting)
        return head(features.to(dtype)).to(out_dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        return head(features.to(dtype)).to(out_dtype)


class StridedConvHead(nn.Module):
    r"""SDXL-Lightning / DMD2 head: strided 4×4 convs from the feature resolution down to one logit.

    With feature resolution :math:`r_0` the head halves it with ``k`` blocks
    ``[Conv4×4 stride 2 (pad 1), GroupNorm, SiLU]`` until :math:`r_k \le 4`, then applies
    ``[Conv r_k×r_k stride r_k, GroupNorm, SiLU]`` to reach 1×1 and a 1×1 conv to one channel. For SDXL's
    32×32 bottleneck this is DMD2's ``cls_pred_branch`` (32 → 16 → 8 → 4 → 1). Inputs larger than
    :math:`r_0` give a patch map of logits. The GroupNorm after the last conv sees a 1×1 map, so each
    group should hold several channels (SDXL: 1280 / 32 = 40); for narrow test backbones pass a smaller
    ``norm_groups`` (with 2 channels per group the normalised values are only ±1).

    Args:
        in_channels: feature channels ``C`` (``2C`` for a conditional discriminator's concatenation).
        feature_resolution: spatial size :math:`r_0` of the features the head is sized for.
        channels: width of the hidden convs (default: ``in_channels``).
        norm_groups: GroupNorm groups (32 in the papers).

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
        if feature_resolution < 1:
            raise OptionError(f"Expected `feature_resolution` to be >= 1, but got {feature_resolution!r}.")
        width = int(channels or in_channels)
        layers: list[nn.Module] = []
        res, c_in = int(feature_resolution), int(in_channels)
        while res > 4:
            layers += [nn.Conv2d(c_in, width, 4, 2, 1), _group_norm(norm_groups, width, "head"), nn.SiLU()]
            res, c_in = res // 2, width
        layers += [nn.Conv2d(c_in, width, res, res), _group_norm(norm_groups, width, "head"), nn.SiLU()]
        layers.append(nn.Conv2d(width, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.in_channels = int(in_channels)
        self.feature_resolution = int(feature_resolution)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_tensor(features, "features")
        check_ndim(features, "features", 4, "(B, C, H, W)")
        if features.shape[1] != self.in_channels or min(features.shape[-2:]) < self.feature_resolution:
            raise ShapeError(
                f"Expected `features` of shape (B, {self.in_channels}, H, W) with H, W >= "
                f"{self.feature_resolution} (the resolution the head was sized for), but got "
                f"{tuple(features.shape)}. Build the head with the feature resolution and channels of its "
                "backbone level.",
                name="features",
                expected=(self.in_channels, self.feature_resolution),
                actual=tuple(features.shape),
            )
        return self.layers(features)


class PointwiseConvHead(nn.Module):
    r"""PCM head: per-pixel 1×1 convs with a residual block, giving a patch map of logits.

    .. math::

        h = \mathrm{LReLU}(\mathrm{GN}(W_1 x)),\quad h \leftarrow h + \mathrm{LReLU}(\mathrm{GN}(W_2 h)),
        \quad \text{logits} = W_3 h

    Args:
        in_channels: feature channels.
        channels: hidden width (default: ``in_channels``).
        norm_groups: GroupNorm groups.
        negative_slope: LeakyReLU slope (PCM's ``nn.LeakyReLU()`` default, 0.01).

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
        width = int(channels or in_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 1),
            _group_norm(norm_groups, width, "head"),
            nn.LeakyReLU(negative_slope),
        )
        self.residual = nn.Sequential(
            nn.Conv2d(width, width, 1), _group_norm(norm_groups, width, "head"), nn.LeakyReLU(negative_slope)
        )
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.stem(features)
        return self.out(h + self.residual(h))


class ReadoutHead(nn.Module):
    r"""Diffusion2GAN-style readout at one decoder scale: GroupNorm, SiLU, 3×3 conv to one channel.

    Args:
        in_channels: feature channels of the decoder level.
        norm_groups: GroupNorm groups.

    Shapes:
        ``(B, in_channels, h, w) -> (B, 1, h, w)``.

    Example:
        >>> ReadoutHead(32, norm_groups=8)(torch.randn(2, 32, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(self, in_channels: int, *, norm_groups: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _group_norm(norm_groups, in_channels, "readout"),
            nn.SiLU(),
            nn.Conv2d(in_channels, 1, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
