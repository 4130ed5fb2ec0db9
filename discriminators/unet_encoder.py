r"""UNet-encoder discriminators: SDXL-Lightning's (un)conditional D and DMD2's bottleneck classifier head.

SDXL-Lightning (Sec. 3.3, Eq. 22) builds its discriminator from a trainable copy of the teacher's
encoder and mid block :math:`d` and a small head:

.. math::

    D(x_{t-ns}, x_t, t-ns, t, c) = \sigma\big(\mathrm{head}([\,d(x_{t-ns}, t-ns, c);\ d(x_t, t, c)\,])\big)
    \quad\text{(conditional)}, \qquad
    D(x, t, c) = \sigma(\mathrm{head}(d(x, t, c))) \quad\text{(unconditional)}

where :math:`[\cdot;\cdot]` concatenates channels (2 × 1280 × 32 × 32 for SDXL at 1024 px). The
modules here return the logit (before the sigmoid), as the losses in
:mod:`diffdistill.losses.adversarial` expect. DMD2 (``cls_pred_branch``) puts the same head on the
bottleneck of its fake-score UNet, sharing the backbone with the fake-score loss.

References:
    * S. Lin, A. Wang, X. Yang, "SDXL-Lightning: Progressive Adversarial Diffusion Distillation",
      arXiv:2402.13929, Sec. 3.3.
    * T. Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2),
      arXiv:2405.14867.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_all_finite,
    check_bool,
    check_float_input,
    check_int,
    check_optional_int,
)
from .._modules import unwrap_model
from ._inputs import check_level, shape_str, timestep_batch
from .discriminator_base import DiscriminatorBase, _default_trainable, _repeat_batch
from .heads import StridedConvHead, _check_groups, _run_head
from .unet_features import BackboneMode, UNetFeatureExtractor, _level_geometry, unet_feature_levels

__all__ = ["BottleneckHead", "UNetEncoderDiscriminator"]


def _feature_resolution(extractor: UNetFeatureExtractor, level: str, given: int | None) -> int:
    if given is not None:
        return int(given)
    size = extractor.sample_size
    if isinstance(size, (list, tuple)):
        size = min(size)
    if size is None:
        raise OptionError(
            "The UNet config has no `sample_size`, so the head cannot be sized; pass `feature_resolution` "
            f"(the spatial size of level {level!r} for your latents)."
        )
    return max(int(size) // extractor.strides[level], 1)


def _check_head_options(
    unet: Any,
    level: Any,
    head_channels: Any,
    norm_groups: Any,
    feature_resolution: Any,
    augment: Any,
    gradient_checkpointing: Any,
) -> str:
    """Validate the options of a strided-conv-head discriminator before its backbone is copied; return ``level``."""
    level = check_level(level, unet_feature_levels(unet), "level")
    width = check_optional_int(head_channels, "head_channels", minimum=1)
    groups = check_int(norm_groups, "norm_groups", minimum=1)
    check_optional_int(feature_resolution, "feature_resolution", minimum=1)
    check_bool(gradient_checkpointing, "gradient_checkpointing")
    if augment is not None and not callable(augment):
        raise DTypeError(
            f"Expected `augment` to be a module such as LatentAugment('bgc'), or None, but got {type(augment).__name__}."
        )
    channels = _level_geometry(unwrap_model(unet))[0][level]
    if width is None:
        _check_groups(
            groups,
            channels,
            f"the channels of level {level!r} (the default head width)",
            f", or set `head_channels` to a multiple of {groups}",
        )
    else:
        _check_groups(
            groups,
            width,
            "`head_channels`",
            f", or set `head_channels` to a multiple of {groups}",
        )
    return level


def _check_sample_size(
    disc: UNetEncoderDiscriminator | BottleneckHead, sample: torch.Tensor, level: str, name: str
) -> None:
    """Refuse latents too small for the strided-conv head (it was sized for ``feature_resolution``), or whose
    feature map it does not tile: each side of the level's map must be a multiple of ``feature_resolution``, else
    the last strided conv (``r_k x r_k``, stride ``r_k``) leaves a strip out of every logit (audit 13)."""
    res = getattr(disc.heads[0], "feature_resolution", None)
    if res is None:
        return
    stride = disc.extractor.strides[level]
    need = (int(res) - 1) * stride + 1  # a level has ceil(H / stride) pixels
    if min(sample.shape[-2:]) < need:
        raise ShapeError(
            f"Expected `{name}` of at least {need}x{need} latent pixels: the head was built for "
            f"feature_resolution={res} at level {level!r} (stride {stride}), but got {shape_str(sample.shape)}. "
            f"Build the discriminator with feature_resolution=ceil(H / {stride}) for these latents.",
            name=name,
            expected=(need, need),
            actual=tuple(sample.shape),
        )
    # the level's map: ceil(H / stride) x ceil(W / stride)
    h, w = (-(-int(side) // stride) for side in sample.shape[-2:])
    if h % int(res) or w % int(res):
        step = int(res) * stride
        raise ShapeError(
            f"Expected `{name}` whose level-{level!r} feature map ({h}x{w}, stride {stride}) tiles the head's "
            f"feature_resolution={res} on both sides, but got {shape_str(sample.shape)}: the head's last strided conv "
            f"would leave the right / bottom strip of the map out of every logit (that part of the image not judged). "
            f"Use latents whose sides are multiples of {step} (e.g. crop or bucket to them), or build the "
            f"discriminator for a size it tiles.",
            name=name,
            expected=(step, step),
            actual=tuple(sample.shape),
        )


class UNetEncoderDiscriminator(DiscriminatorBase):
    r"""SDXL-Lightning discriminator: a UNet encoder + mid block with a strided-conv head (arXiv:2402.13929).

    ``conditional=True``: the sample to judge :math:`(x_{t-ns}, t-ns)` and the input it was denoised from
    :math:`(x_t, t)` go through the backbone in **one** batched call of size ``2B`` (same text condition),
    and their level features are concatenated along channels before the head:
    ``(B, 2C, r, r) -> (B, 1, 1, 1)``. ``conditional=False`` judges :math:`(x, t)` alone.
    :meth:`reset_head` re-initialises only the head (the trained backbone stays). SDXL-Lightning
    re-initialises the whole discriminator at each progressive stage (128 → 32 → 8 → 4 → 2 → 1 steps),
    backbone re-copied from the teacher plus a new head: build a new instance for that (as
    ``examples/sdxl_lightning.py`` does); :meth:`parameter_groups` gives the head and the backbone their own learning rates.

    ``sample`` and ``cond_sample`` are cast to the backbone's dtype (see
    :class:`~diffdistill.discriminators.DiscriminatorBase`): a bf16 generator output works with a float32
    discriminator, with or without autocast.

    Args:
        unet: the teacher ``UNet2DConditionModel`` (left as it is with ``backbone="copy"`` or ``"shared"``;
            ``"own"`` sets its ``requires_grad`` from ``trainable``).
        conditional: pair each sample with its conditioning input (Eq. 22) or not.
        level: backbone level the head reads (default the bottleneck ``"mid"``), one of
            :func:`~diffdistill.discriminators.unet_feature_levels`.
        backbone: ``"copy"`` (default: a trainable copy of encoder + mid block), ``"own"`` or ``"shared"``.
        trainable: ``requires_grad`` of a copied/owned backbone (default None: True); ``False`` freezes it.
        head_channels: hidden width of the head (default None: the level's channels ``C``).
        norm_groups: GroupNorm groups of the head (32 in the paper); must divide the head's width.
        feature_resolution: spatial size of ``level`` the head is sized for (default None:
            ``sample_size / stride`` from the UNet config); latents must give at least this size at ``level``.
        augment: optional DiffAugment-style module (e.g. ``LatentAugment("bgc")``) applied in training mode
            with one draw shared by ``sample`` and ``cond_sample`` (default None: no augmentation).
        gradient_checkpointing: recompute backbone blocks in the backward pass.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``; ``level`` is not a str; a size is not an int;
            a flag is not a bool; ``augment`` is not callable.
        OptionError: ``level`` is not a level of ``unet``; ``backbone`` is unknown; a size is < 1;
            ``norm_groups`` does not divide the head width; the UNet config has no ``sample_size`` and
            ``feature_resolution`` is None.

    Example:
        >>> from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
        >>> unet = tiny_sdxl_unet()
        >>> disc = UNetEncoderDiscriminator(unet, conditional=True)
        >>> ehs, added = sdxl_conditions(unet, 2)
        >>> x_prev, x_t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
        >>> logits = disc(x_prev, 250, ehs, added, cond_sample=x_t, cond_timestep=500)
        >>> [tuple(l.shape) for l in logits], logits[0].dtype
        ([(2, 1, 1, 1)], torch.float32)
    """

    extractor: UNetFeatureExtractor

    def __init__(
        self,
        unet: nn.Module,
        *,
        conditional: bool = True,
        level: str = "mid",
        backbone: BackboneMode = "copy",
        trainable: bool | None = None,
        head_channels: int | None = None,
        norm_groups: int = 32,
        feature_resolution: int | None = None,
        augment: nn.Module | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_bool(conditional, "conditional")
        level = _check_head_options(
            unet, level, head_channels, norm_groups, feature_resolution, augment, gradient_checkpointing
        )
        self.extractor = UNetFeatureExtractor(
            unet,
            (level,),
            backbone=backbone,
            trainable=_default_trainable(backbone, trainable),
            gradient_checkpointing=gradient_checkpointing,
        )
        self.conditional = bool(conditional)
        self.level = level
        channels = self.extractor.channels[level]
        resolution = _feature_resolution(self.extractor, level, feature_resolution)
        in_channels = 2 * channels if self.conditional else channels
        self.heads = nn.ModuleList(
            [
                StridedConvHead(
                    in_channels, resolution, channels=head_channels or channels, norm_groups=norm_groups
                )
            ]
        )
        self._finish_init(augment)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        *,
        cond_sample: torch.Tensor | None = None,
        cond_timestep: torch.Tensor | float | int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Logits ``[(B, 1, 1, 1)]`` (float32) for ``sample`` at ``timestep``.

        Args:
            sample: the (noised) latents to judge, :math:`x_{t-ns}`, ``(B, C_in, H, W)``, any floating dtype
                (cast to the backbone's).
            timestep: their timestep (number, ``()``, ``(1,)`` or ``(B,)``).
            encoder_hidden_states: text hidden states ``(B, L, D)`` (None only for a UNet without
                cross-attention).
            added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}`` (None only for a UNet without added
                conditions).
            cond_sample: the conditioning input :math:`x_t`, shape of ``sample`` (required in conditional
                mode, must be None otherwise).
            cond_timestep: its timestep :math:`t` (required in conditional mode, must be None otherwise).
            generator: randomness of ``augment`` (None: the global generator).

        Returns:
            A one-element list with the ``(B, 1, 1, 1)`` float32 logits (a patch map for latents larger than
            the head was sized for).

        Raises:
            DTypeError: ``sample`` / ``cond_sample`` / a condition is not a floating-point tensor (an integer
                or bool tensor); ``timestep`` / ``cond_timestep`` is not a number or an integer / floating
                tensor; ``added_cond_kwargs`` is not a dict.
            ShapeError: ``sample`` is not ``(B, C_in, H, W)``, is empty or too small for the head;
                ``cond_sample`` differs from ``sample`` in shape; a timestep or condition has another batch
                size or layout.
            NonFiniteError: ``sample``, ``cond_sample``, a timestep or a condition holds NaN / Inf (a value
                check).
            OptionError: ``cond_sample`` / ``cond_timestep`` passed to an unconditional discriminator.
            ValueError: ``cond_sample`` / ``cond_timestep`` missing in conditional mode, or a condition the UNet
                needs is None.
        """
        sample = self._prepare_sample(sample)
        batch = sample.shape[0]
        if not self.conditional:
            if cond_sample is not None or cond_timestep is not None:
                raise OptionError(
                    "This UNetEncoderDiscriminator has conditional=False, so it takes no `cond_sample` / "
                    "`cond_timestep`; build it with conditional=True to judge (x_{t-ns}, x_t) pairs."
                )
            _check_sample_size(self, sample, self.level, "sample")
            (sample,) = self._augment(sample, generator=generator)
            feats = self.extractor(sample, timestep, encoder_hidden_states, added_cond_kwargs)[self.level]
            return self._run_heads([feats])
        if cond_sample is None or cond_timestep is None:
            missing = [
                n for n, v in (("cond_sample", cond_sample), ("cond_timestep", cond_timestep)) if v is None
            ]
            raise ValueError(
                f"This UNetEncoderDiscriminator has conditional=True and needs {missing}: the input x_t the "
                "sample was denoised from and its timestep t. Pass them, or build it with conditional=False."
            )
        cond_sample = self._prepare_sample(cond_sample, "cond_sample")
        if cond_sample.shape != sample.shape:
            raise ShapeError(
                f"Expected `cond_sample` to have the shape of `sample` {shape_str(sample.shape)}, but got "
                f"{shape_str(cond_sample.shape)}.",
                name="cond_sample",
                expected=tuple(sample.shape),
                actual=tuple(cond_sample.shape),
            )
        _check_sample_size(self, sample, self.level, "sample")
        t = timestep_batch(timestep, batch, sample.device, "timestep")
        ct = timestep_batch(cond_timestep, batch, sample.device, "cond_timestep")
        # Static checks of the conditions against the caller's batch B (the extractor sees 2B and checks values).
        self.extractor._check_conditions(batch, encoder_hidden_states, added_cond_kwargs)
        check_all_finite(
            [("sample", sample), ("cond_sample", cond_sample), ("timestep", t), ("cond_timestep", ct)]
        )
        sample, cond_sample = self._augment(sample, cond_sample, generator=generator)
        t_dtype = torch.promote_types(t.dtype, ct.dtype)
        feats = self.extractor(
            torch.cat([sample, cond_sample], dim=0),
            torch.cat([t.to(t_dtype), ct.to(t_dtype)], dim=0),
            _repeat_batch(encoder_hidden_states, batch, 2, "encoder_hidden_states"),
            _repeat_batch(added_cond_kwargs, batch, 2, "added_cond_kwargs"),
        )[self.level]
        return self._run_heads([torch.cat(feats.chunk(2, dim=0), dim=1)])

    def extra_repr(self) -> str:
        return f"conditional={self.conditional}, level={self.level!r}"


class BottleneckHead(DiscriminatorBase):
    r"""DMD2 classifier head on the bottleneck of an existing UNet whose weights it shares (arXiv:2405.14867).

    The UNet (DMD2: the fake-score UNet) is held by reference and not registered, so this module's
    ``parameters()`` and ``state_dict()`` are the head's alone and the UNet keeps its owner's optimiser;
    the GAN loss still back-propagates into the UNet's trainable weights, as in DMD2 where the
    classifier and the fake-score loss train one network. ``forward`` runs the UNet encoder + mid block
    (the ``classify_forward`` of DMD2) and the :class:`~diffdistill.discriminators.StridedConvHead`
    (``cls_pred_branch``); :meth:`classify` applies the head to features already computed. ``sample`` is
    cast to the UNet's dtype (see :class:`~diffdistill.discriminators.DiscriminatorBase`).

    Under DDP, wrap a module that owns both the UNet and this head (DMD2's guidance model) so the
    UNet's gradients are synchronised by that wrapper.

    Args:
        unet: the UNet to share (e.g. the fake-score UNet).
        level: level the head reads (default ``"mid"``), one of
            :func:`~diffdistill.discriminators.unet_feature_levels`.
        head_channels: hidden width of the head (default None: the level's channels).
        norm_groups: GroupNorm groups (32); must divide the head's width.
        feature_resolution: spatial size of ``level`` the head is sized for (default None: from the UNet
            config's ``sample_size``).
        augment: optional DiffAugment-style module applied to ``sample`` in training mode (default None).
        gradient_checkpointing: recompute the backbone blocks in the backward pass.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``; ``level`` is not a str; a size is not an int;
            ``gradient_checkpointing`` is not a bool; ``augment`` is not callable.
        OptionError: ``level`` is not a level of ``unet``; a size is < 1; ``norm_groups`` does not divide
            the head width; the UNet config has no ``sample_size`` and ``feature_resolution`` is None.

    Example:
        >>> from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
        >>> fake_unet = tiny_sdxl_unet()
        >>> head = BottleneckHead(fake_unet)
        >>> ehs, added = sdxl_conditions(fake_unet, 2)
        >>> [tuple(l.shape) for l in head(torch.randn(2, 4, 16, 16), 500, ehs, added)]
        [(2, 1, 1, 1)]
        >>> sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in head.head_parameters())
        True
    """

    extractor: UNetFeatureExtractor

    def __init__(
        self,
        unet: nn.Module,
        *,
        level: str = "mid",
        head_channels: int | None = None,
        norm_groups: int = 32,
        feature_resolution: int | None = None,
        augment: nn.Module | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        level = _check_head_options(
            unet, level, head_channels, norm_groups, feature_resolution, augment, gradient_checkpointing
        )
        self.extractor = UNetFeatureExtractor(
            unet, (level,), backbone="shared", gradient_checkpointing=gradient_checkpointing
        )
        self.level = level
        channels = self.extractor.channels[level]
        resolution = _feature_resolution(self.extractor, level, feature_resolution)
        self.heads = nn.ModuleList(
            [
                StridedConvHead(
                    channels, resolution, channels=head_channels or channels, norm_groups=norm_groups
                )
            ]
        )
        self._finish_init(augment)

    def shared_backbone_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the shared UNet trunk this head back-propagates into.

        Returns:
            The trunk parameters with ``requires_grad`` (they belong to the UNet's owner and its optimiser).
        """
        return [p for p in self.extractor.trunk.parameters() if p.requires_grad]

    def classify(self, features: torch.Tensor | Mapping[str, Any]) -> list[torch.Tensor]:
        """Head logits from precomputed features (DMD2's ``cls_pred_branch`` on ``classify_forward``'s output).

        Args:
            features: the ``(B, C, r, r)`` features of ``level`` (``C`` the level's channels, ``r >=
                feature_resolution``), or a ``{level: tensor}`` dict as a
                :class:`~diffdistill.discriminators.UNetFeatureExtractor` returns.

        Returns:
            A one-element list with the ``(B, 1, 1, 1)`` float32 logits.

        Raises:
            DTypeError: ``features`` is neither a tensor nor a dict, or is not floating.
            OptionError: the dict has no entry for ``level``.
            ShapeError: the features are not 4-D, are empty, have other channels or are smaller than
                ``feature_resolution``.
            NonFiniteError: the features hold NaN / Inf (a value check).
        """
        name = "features"
        if isinstance(features, Mapping):
            if self.level not in features:
                raise OptionError(
                    f"Expected `features` to hold level {self.level!r}, but it has keys {sorted(map(str, features))}. "
                    f"Extract it with UNetFeatureExtractor(unet, levels=({self.level!r},))."
                )
            features, name = features[self.level], f"features[{self.level!r}]"
        tensor = check_float_input(features, name, ndim=4, layout="(B, C, H, W)", finite=False)
        check_all_finite([(name, tensor)])
        return [_run_head(self.heads[0], tensor)]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Logits of ``sample`` (DMD2 noises real and fake latents to ``t ~ U[0, 1000)`` first).

        Args:
            sample: the noised latents ``(B, C_in, H, W)``, any floating dtype (cast to the UNet's).
            timestep: their timestep (number, ``()``, ``(1,)`` or ``(B,)``).
            encoder_hidden_states: text hidden states ``(B, L, D)`` (None only for a UNet without
                cross-attention).
            added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}`` (None only for a UNet without added
                conditions).
            generator: randomness of ``augment`` (None: the global generator).

        Returns:
            A one-element list with the ``(B, 1, 1, 1)`` float32 logits.

        Raises:
            DTypeError: ``sample`` or a condition is not a floating-point tensor; ``timestep`` is not a number
                or an integer / floating tensor; ``added_cond_kwargs`` is not a dict.
            ShapeError: ``sample`` is not ``(B, C_in, H, W)``, is empty or too small for the head; a timestep
                or condition has another batch size or layout.
            NonFiniteError: ``sample``, ``timestep`` or a condition holds NaN / Inf (a value check).
            ValueError: a condition the UNet needs is None.
        """
        sample = self._prepare_sample(sample)
        _check_sample_size(self, sample, self.level, "sample")
        (sample,) = self._augment(sample, generator=generator)
        feats = self.extractor(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        return self._run_heads([feats[self.level]])
