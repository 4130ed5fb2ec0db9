r"""PCM-style multi-level discriminator: 1×1-conv heads on several encoder levels of a (frozen) UNet.

PCM (``discriminator_sdxl.py``) runs a frozen copy of the teacher UNet through its down blocks and mid
block (skipping the decoder) and puts a trainable per-pixel head on each down-block output and on the
mid-block output (320 / 640 / 1280 / 1280 channels for SDXL); each head gives a patch map of logits,
and the hinge loss is averaged over heads. FastGen's
``Discriminator_SDXL`` generalises the choice of feature indices; both are ``levels`` here.

.. math::

    D_l(x, t, c) = \mathrm{head}_l\big(f_l(x, t, c)\big) \in \mathbb{R}^{B \times 1 \times h_l \times w_l},
    \qquad l \in \text{levels}

Reference:
    F.-Y. Wang et al., "Phased Consistency Model", NeurIPS 2024, arXiv:2405.18407.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._checks import check_int, check_optional_int
from .._modules import unwrap_model
from ._inputs import check_levels
from .discriminator_base import DiscriminatorBase
from .heads import PointwiseConvHead, _check_groups
from .unet_features import BackboneMode, UNetFeatureExtractor, _level_geometry, unet_feature_levels

__all__ = ["MultiLevelDiscriminator"]


class MultiLevelDiscriminator(DiscriminatorBase):
    r"""1×1-conv heads (PCM) on several levels of a frozen or trainable UNet encoder (arXiv:2405.18407).

    Args:
        unet: the teacher ``UNet2DConditionModel``.
        levels: the levels to read (default None: every down block and the mid block, as PCM); one name or
            a sequence of distinct names of :func:`~diffdistill.discriminators.unet_feature_levels`.
        backbone: ``"shared"`` (default: the teacher by reference, PCM's frozen teacher, not saved with
            the discriminator), ``"copy"`` or ``"own"``.
        trainable: ``requires_grad`` of a ``"copy"`` / ``"own"`` backbone (None: unchanged).
        head_channels: hidden width of every head (default None: the level's channels).
        norm_groups: GroupNorm groups of the heads; must divide every head's width.
        augment: optional DiffAugment-style module applied to ``sample`` in training mode (default None).
        gradient_checkpointing: recompute backbone blocks in the backward pass.

    ``sample`` is cast to the backbone's dtype (see
    :class:`~diffdistill.discriminators.DiscriminatorBase`), so a bf16 generator output works with a
    float32 teacher, with or without autocast.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``; ``levels`` is not a str or a sequence; a
            size is not an int; a flag is not a bool; ``augment`` is not callable.
        OptionError: ``levels`` is empty, repeats a level or names one the UNet lacks; ``backbone`` is
            unknown; ``trainable`` is set with ``backbone="shared"``; a size is < 1; ``norm_groups`` does
            not divide a head's width.

    Example:
        >>> from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
        >>> teacher = tiny_sdxl_unet().requires_grad_(False)
        >>> disc = MultiLevelDiscriminator(teacher)
        >>> ehs, added = sdxl_conditions(teacher, 2)
        >>> [tuple(l.shape) for l in disc(torch.randn(2, 4, 16, 16), 500, ehs, added)]
        [(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 8, 8)]
    """

    def __init__(
        self,
        unet: nn.Module,
        levels: Sequence[str] | None = None,
        *,
        backbone: BackboneMode = "shared",
        trainable: bool | None = None,
        head_channels: int | None = None,
        norm_groups: int = 32,
        augment: nn.Module | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        available = unet_feature_levels(unet)
        if levels is None:
            levels = tuple(level for level in available if level.startswith("down.") or level == "mid")
        levels = check_levels(levels, available, "levels")
        width = check_optional_int(head_channels, "head_channels", minimum=1)
        groups = check_int(norm_groups, "norm_groups", minimum=1)
        channels = _level_geometry(unwrap_model(unet))[0]
        for level in levels:
            _check_groups(
                groups,
                width or channels[level],
                "`head_channels`" if width else f"the channels of level {level!r} (the default head width)",
                f", or set `head_channels` to a multiple of {groups}",
            )
        self.extractor = UNetFeatureExtractor(
            unet,
            levels,
            backbone=backbone,
            trainable=trainable,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.levels = self.extractor.levels
        self.heads = nn.ModuleList(
            [
                PointwiseConvHead(
                    self.extractor.channels[level], channels=head_channels, norm_groups=norm_groups
                )
                for level in self.levels
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
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Patch logits, one per level, in ``levels`` order.

        Args:
            sample: the latents to judge ``(B, C_in, H, W)``, any floating dtype (cast to the backbone's).
            timestep: their timestep (number, ``()``, ``(1,)`` or ``(B,)``).
            encoder_hidden_states: text hidden states ``(B, L, D)`` (None only for a UNet without
                cross-attention up to the deepest level).
            added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}`` (None only for a UNet without added
                conditions).
            generator: randomness of ``augment`` (None: the global generator).

        Returns:
            One ``(B, 1, ceil(H / s_l), ceil(W / s_l))`` float32 tensor per level ``l`` (stride ``s_l``).

        Raises:
            DTypeError: ``sample`` or a condition is not a floating-point tensor; ``timestep`` is not a number
                or an integer / floating tensor; ``added_cond_kwargs`` is not a dict.
            ShapeError: ``sample`` is not ``(B, C_in, H, W)`` or is empty; a timestep or condition has another
                batch size or layout.
            NonFiniteError: ``sample``, ``timestep`` or a condition holds NaN / Inf (a value check).
            ValueError: a condition the UNet needs is None.
        """
        sample = self._prepare_sample(sample)
        (sample,) = self._augment(sample, generator=generator)
        feats = self.extractor(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        return self._run_heads([feats[level] for level in self.levels])

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}"
