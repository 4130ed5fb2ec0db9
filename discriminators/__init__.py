"""Diffusion-UNet discriminators for adversarial distillation (SDXL-Lightning, DMD2, PCM, Diffusion2GAN).

Every discriminator wraps a diffusers ``UNet2DConditionModel`` the caller built (diffusers is never
imported here) and returns a list of logits in at least float32 (float64 for a float64 model), one tensor per head:

* :class:`UNetEncoderDiscriminator` -- SDXL-Lightning, (un)conditional, encoder + mid block copy;
* :class:`BottleneckHead` -- DMD2's classifier head on a shared UNet's bottleneck;
* :class:`MultiLevelDiscriminator` -- PCM's 1×1-conv heads on several encoder levels;
* :class:`MultiScaleConditionalDiscriminator` -- Diffusion2GAN's full-UNet D(c, z, x).

:class:`UNetFeatureExtractor` is the backbone they share.
"""

from __future__ import annotations

from .discriminator_base import UNetDiscriminatorBase
from .heads import PointwiseConvHead, ReadoutHead, StridedConvHead, reset_module_parameters, run_head_float32
from .multi_level import MultiLevelDiscriminator
from .multi_scale import MultiScaleConditionalDiscriminator, decoder_scale_levels
from .unet_configs import sdxl_conditions, sdxl_unet_config, tiny_sdxl_unet, tiny_sdxl_unet_config
from .unet_encoder import BottleneckHead, UNetEncoderDiscriminator
from .unet_features import BackboneMode, UNetFeatureExtractor, unet_feature_levels

__all__ = [
    "BackboneMode",
    "BottleneckHead",
    "MultiLevelDiscriminator",
    "MultiScaleConditionalDiscriminator",
    "PointwiseConvHead",
    "ReadoutHead",
    "StridedConvHead",
    "UNetDiscriminatorBase",
    "UNetEncoderDiscriminator",
    "UNetFeatureExtractor",
    "decoder_scale_levels",
    "reset_module_parameters",
    "run_head_float32",
    "sdxl_conditions",
    "sdxl_unet_config",
    "tiny_sdxl_unet",
    "tiny_sdxl_unet_config",
    "unet_feature_levels",
]
