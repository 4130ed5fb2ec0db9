r"""Diffusion2GAN's conditional multi-scale discriminator on the full teacher UNet (encoder and decoder).

The discriminator judges :math:`x` given the text :math:`c` (through the UNet's cross-attention) and
the noise :math:`z` the generator mapped to :math:`x` (pix2pix-style conditioning: a zero-initialised
conv embeds :math:`z` and adds it to the input). Down-scaled copies of :math:`x` enter the encoder at
each resolution (MSG-GAN style), and readout heads at several decoder scales give independent
real/fake patch maps, so every UNet level receives gradient:

.. math::

    h_0 = x + W_z * z, \qquad
    h_{\text{down}_i} \leftarrow h_{\text{down}_i} + W_i * \mathrm{avgpool}_{s_i}(x), \qquad
    D_l = \mathrm{readout}_l(h_{\text{up}_l})

:math:`W_z` and the input convs :math:`W_i` start at zero, so the initial features are exactly the
teacher's. Train it with the mix-and-match negatives (:func:`~diffdistill.losses.mix_and_match`) and
single-sample lazy R1 (:func:`~diffdistill.losses.lazy_r1_penalty`, ``num_samples=1, every=16``). R1
differentiates the logits twice, and the fused ``scaled_dot_product_attention`` kernels that
diffusers' attention uses (flash / memory-efficient) have no double backward: run the R1 pass under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.

Reference:
    M. Kang, R. Zhang, C. Barnes, S. Paris, S. Kwak, J. Park, E. Shechtman, J.-Y. Zhu, T. Park,
    "Distilling Diffusion Models into Conditional GANs" (Diffusion2GAN), ECCV 2024, arXiv:2405.05967.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    ShapeError,
    check_all_finite,
    check_bool,
    check_float_input,
    check_int,
    check_optional_int,
)
from .._modules import unwrap_model
from ._inputs import check_levels, shape_str
from .discriminator_base import DiscriminatorBase, _default_trainable
from .heads import ReadoutHead, _check_groups
from .unet_features import BackboneMode, UNetFeatureExtractor, _level_geometry, unet_feature_levels

__all__ = ["MultiScaleConditionalDiscriminator", "decoder_scale_levels"]


def decoder_scale_levels(unet: nn.Module) -> tuple[str, ...]:
    """One feature level per decoder resolution: the last of ``mid`` and the ``up.*`` levels at each stride.

    Levels are recorded after each block's upsampler, so on SDXL ``up.0`` is at stride 2 and both
    ``up.1`` and ``up.2`` at stride 1; the decoder's stride-4 scale is the mid block's output. Reading the
    deepest level at each scale gives ``("mid", "up.0", "up.2")``.

    Args:
        unet: A diffusers ``UNet2DConditionModel``, possibly wrapped in DDP / ``torch.compile``.

    Returns:
        The level names, deepest (coarsest) scale first.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``.

    Example:
        >>> from diffdistill.discriminators import tiny_sdxl_unet
        >>> decoder_scale_levels(tiny_sdxl_unet())  # 2-level UNet: two scales
        ('mid', 'up.1')
    """
    unet = unwrap_model(unet)  # DDP / compile wrappers, as the extractor accepts them
    levels = unet_feature_levels(unet)  # checks that it is a UNet
    strides = _level_geometry(unet)[1]
    last: dict[int, str] = {}
    for level in levels:
        if level == "mid" or level.startswith("up."):
            last[strides[level]] = level
    return tuple(last[s] for s in sorted(last, reverse=True))


class MultiScaleConditionalDiscriminator(DiscriminatorBase):
    r"""Diffusion2GAN discriminator :math:`D(c, z, x)`: full UNet, z-conv, multi-scale input and readouts.

    Args:
        unet: the teacher ``UNet2DConditionModel`` (encoder and decoder are used).
        readout_levels: decoder levels with a readout head (default None: :func:`decoder_scale_levels`, one
            per decoder resolution: ``("mid", "up.0", "up.2")`` on SDXL, i.e. 32 / 64 / 128 latent pixels at
            1024 px -- Diffusion2GAN's three readouts at the decoder scales); one name or a sequence of
            distinct names of :func:`~diffdistill.discriminators.unet_feature_levels`.
        noise_channels: channels of the noise ``z`` (default None: the UNet's input channels).
        multiscale_input: feed down-scaled copies of ``sample`` at each encoder resolution.
        backbone: ``"copy"`` (default: a trainable copy), ``"own"`` or ``"shared"``.
        trainable: ``requires_grad`` of a copied/owned backbone (default None: True).
        norm_groups: GroupNorm groups of the readouts; must divide every readout level's channels.
        augment: optional DiffAugment-style module, one draw shared by ``sample`` and ``noise`` (default
            None).
        gradient_checkpointing: recompute backbone blocks in the backward pass.

    ``sample`` is cast to the backbone's dtype and ``noise`` to the z-conv's (see
    :class:`~diffdistill.discriminators.DiscriminatorBase`), so bf16 latents work with a float32
    discriminator, with or without autocast.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``; ``readout_levels`` is not a str or a
            sequence; a size is not an int; a flag is not a bool; ``augment`` is not callable.
        OptionError: ``readout_levels`` is empty, repeats a level or names one the UNet lacks; ``backbone``
            is unknown; ``trainable`` is set with ``backbone="shared"``; a size is < 1; ``norm_groups``
            does not divide a readout level's channels.

    Example:
        >>> from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
        >>> unet = tiny_sdxl_unet()
        >>> disc = MultiScaleConditionalDiscriminator(unet)
        >>> ehs, added = sdxl_conditions(unet, 2)
        >>> x, z = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
        >>> logits = disc(x, 0, ehs, added, noise=z)
        >>> [tuple(l.shape) for l in logits]
        [(2, 1, 8, 8), (2, 1, 16, 16)]
        >>> all(torch.equal(a, b) for a, b in zip(logits, disc(x, 0, ehs, added)))  # z-conv starts at zero
        True
    """

    _new_layer_names = ("noise_conv", "input_convs")

    def __init__(
        self,
        unet: nn.Module,
        readout_levels: Sequence[str] | None = None,
        *,
        noise_channels: int | None = None,
        multiscale_input: bool = True,
        backbone: BackboneMode = "copy",
        trainable: bool | None = None,
        norm_groups: int = 32,
        augment: nn.Module | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        available = unet_feature_levels(unet)
        if readout_levels is None:
            readout_levels = decoder_scale_levels(unet)
        readout_levels = check_levels(readout_levels, available, "readout_levels")
        check_optional_int(noise_channels, "noise_channels", minimum=1)
        check_bool(multiscale_input, "multiscale_input")
        groups = check_int(norm_groups, "norm_groups", minimum=1)
        channels = _level_geometry(unwrap_model(unet))[0]
        for level in readout_levels:
            _check_groups(groups, channels[level], f"the readout channels of level {level!r}", "")
        self.extractor = UNetFeatureExtractor(
            unet,
            readout_levels,
            backbone=backbone,
            trainable=_default_trainable(backbone, trainable),
            gradient_checkpointing=gradient_checkpointing,
        )
        self.levels = self.extractor.levels
        in_channels = self.extractor.in_channels
        self.noise_channels = int(noise_channels or in_channels)
        self.noise_conv = nn.Conv2d(self.noise_channels, in_channels, 3, padding=1)
        # The first down level that reaches each new resolution gets a copy of the input.
        self.input_strides: dict[str, int] = {}
        if multiscale_input:
            seen = {1}
            for level, stride in self.extractor.strides.items():
                if level.startswith("down.") and stride not in seen:
                    seen.add(stride)
                    self.input_strides[level] = stride
        self.input_convs = nn.ModuleDict(
            {
                level.replace(".", "_"): nn.Conv2d(in_channels, self.extractor.channels[level], 3, padding=1)
                for level in self.input_strides
            }
        )
        self.heads = nn.ModuleList(
            [ReadoutHead(self.extractor.channels[level], norm_groups=norm_groups) for level in self.levels]
        )
        self._init_new_layers()
        self._finish_init(augment)

    def _init_new_layers(self) -> None:
        for conv in [self.noise_conv, *self.input_convs.values()]:
            for param in conv.parameters():
                nn.init.zeros_(param)

    @staticmethod
    def _new_layer(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a new input conv in its own dtype (it may be float32 beside a bf16 backbone copy)."""
        return conv(x.to(next(conv.parameters()).dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Patch logits, one per readout level.

        Args:
            sample: latents to judge ``x``, ``(B, C_in, H, W)``, any floating dtype (cast to the backbone's).
            timestep: the timestep given to the UNet (Diffusion2GAN does not state one; e.g. 0 for clean
                latents, or the re-noising timestep).
            encoder_hidden_states: text hidden states ``(B, L, D)`` (None only for a UNet without
                cross-attention).
            added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}`` (None only for a UNet without added
                conditions).
            noise: the generator's input noise ``z``, ``(B, noise_channels, H, W)``; None drops the
                z-condition (no z-conv added; equal to zero noise only while the z-conv's bias is zero,
                as initialised).
            generator: randomness of ``augment`` (None: the global generator).

        Returns:
            One ``(B, 1, ceil(H / s_l), ceil(W / s_l))`` float32 tensor per readout level ``l`` (stride
            ``s_l``).

        Raises:
            DTypeError: ``sample``, ``noise`` or a condition is not a floating-point tensor; ``timestep`` is not
                a number or an integer / floating tensor; ``added_cond_kwargs`` is not a dict.
            ShapeError: ``sample`` is not ``(B, C_in, H, W)`` or is empty; ``noise`` is not ``(B,
                noise_channels, H, W)``; a timestep or condition has another batch size or layout.
            NonFiniteError: ``sample``, ``noise``, ``timestep`` or a condition holds NaN / Inf (a value
                check).
            ValueError: a condition the UNet needs is None.
        """
        sample = self._prepare_sample(sample)
        if noise is not None:
            check_float_input(noise, "noise", ndim=4, layout="(B, C, H, W)", finite=False)
            want = (sample.shape[0], self.noise_channels, *sample.shape[2:])
            if tuple(noise.shape) != want:
                raise ShapeError(
                    f"Expected `noise` (the generator's input z) of shape {want} to match `sample` "
                    f"{shape_str(sample.shape)}, but got {shape_str(noise.shape)}.",
                    name="noise",
                    expected=want,
                    actual=tuple(noise.shape),
                )
            check_all_finite([("noise", noise)])
            sample, noise = self._augment(sample, noise, generator=generator)
            x_in = sample + self._new_layer(self.noise_conv, noise).to(sample.dtype)
        else:
            (sample,) = self._augment(sample, generator=generator)
            x_in = sample
        additions = {
            level: self._new_layer(
                self.input_convs[level.replace(".", "_")], F.avg_pool2d(sample, stride, ceil_mode=True)
            )
            for level, stride in self.input_strides.items()
        }
        feats = self.extractor(x_in, timestep, encoder_hidden_states, added_cond_kwargs, additions=additions)
        return self._run_heads([feats[level] for level in self.levels])

    def extra_repr(self) -> str:
        return f"readout_levels={list(self.levels)}, multiscale_input={list(self.input_strides)}"
