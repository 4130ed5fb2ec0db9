"""Discriminators for adversarial distillation on diffusion UNets and transformers (SDXL-Lightning, DMD2, PCM,
Diffusion2GAN, LADD).

Every discriminator wraps a diffusers ``UNet2DConditionModel`` or transformer the caller built (diffusers is never
imported here) and returns a list of logits in at least float32 (float64 for a float64 model), one tensor per head:

* :class:`UNetEncoderDiscriminator` -- SDXL-Lightning, (un)conditional, encoder + mid block copy;
* :class:`BottleneckHead` -- DMD2's classifier head on a shared UNet's bottleneck;
* :class:`MultiLevelDiscriminator` -- PCM's 1×1-conv heads on several encoder levels;
* :class:`MultiScaleConditionalDiscriminator` -- Diffusion2GAN's full-UNet D(c, z, x);
* :class:`LADDDiscriminator` -- LADD's (SD3-Turbo) noise-level and text conditioned heads on every k-th block of
  a frozen transformer teacher (SD3 / FLUX / Wan video / any listed blocks).

:class:`UNetFeatureExtractor` is the backbone of the UNet ones, :class:`TransformerFeatureExtractor` (image-token
maps of chosen transformer blocks, ``(B, C, f, h, w)`` for Wan's video latents) that of the transformer ones.
"""

from __future__ import annotations

from .discriminator_base import DiscriminatorBase, UNetDiscriminatorBase
from .heads import PointwiseConvHead, ReadoutHead, StridedConvHead, reset_module_parameters, run_head_float32
from .ladd import LADDDiscriminator, LADDHead, ladd_renoise_sigma, mean_text_embedding, noise_level_embedding
from .multi_level import MultiLevelDiscriminator
from .multi_scale import MultiScaleConditionalDiscriminator, decoder_scale_levels
from .transformer_features import TransformerFeatureExtractor, transformer_block_names
from .unet_configs import sdxl_conditions, sdxl_unet_config, tiny_sdxl_unet, tiny_sdxl_unet_config
from .unet_encoder import BottleneckHead, UNetEncoderDiscriminator
from .unet_features import BackboneMode, UNetFeatureExtractor, unet_feature_levels

__all__ = [
    "BackboneMode",
    "BottleneckHead",
    "DiscriminatorBase",
    "LADDDiscriminator",
    "LADDHead",
    "MultiLevelDiscriminator",
    "MultiScaleConditionalDiscriminator",
    "PointwiseConvHead",
    "ReadoutHead",
    "StridedConvHead",
    "TransformerFeatureExtractor",
    "UNetDiscriminatorBase",
    "UNetEncoderDiscriminator",
    "UNetFeatureExtractor",
    "decoder_scale_levels",
    "ladd_renoise_sigma",
    "mean_text_embedding",
    "noise_level_embedding",
    "reset_module_parameters",
    "run_head_float32",
    "sdxl_conditions",
    "sdxl_unet_config",
    "tiny_sdxl_unet",
    "tiny_sdxl_unet_config",
    "transformer_block_names",
    "unet_feature_levels",
]
