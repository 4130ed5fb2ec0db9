"""Tiny configs of the rectified-flow transformers (SD3 MMDiT, FLUX, Qwen-Image, Wan) for CPU tests, with the
published ones.

The tiny configs keep each architecture's structure (SD3: joint blocks, the last one context-pre-only, optional
dual-attention layers; FLUX: double-stream then single-stream blocks, guidance embedding, RoPE axes) at widths
that run in milliseconds. The published configs (``stabilityai/stable-diffusion-3.5-large`` / ``-medium``,
``black-forest-labs/FLUX.1-dev`` ``transformer/config.json``) are for meta-device shape and FLOP checks only.
"""

from __future__ import annotations

from typing import Any


def tiny_sd3_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A 4-block SD3-structured ``SD3Transformer2DModel`` config: 8x8 latents of 4 channels, patch 2 (16 tokens),
    2 heads of 8, text tokens of width 16, pooled width 16; ``overrides`` replace any entry."""
    config: dict[str, Any] = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 4,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 16,
        "pos_embed_max_size": 16,
    }
    config.update(overrides)
    return config


def tiny_flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A FLUX-structured ``FluxTransformer2DModel`` config with 2 double-stream and 3 single-stream blocks: packed
    latents of 16 channels (4 latent channels x 2x2 patches), 2 heads of 8 (RoPE axes 2+2+4), text width 16,
    pooled width 16, guidance embedding (as FLUX.1-dev); ``overrides`` replace any entry."""
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 2,
        "num_single_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 16,
        "guidance_embeds": True,
        "axes_dims_rope": (2, 2, 4),
    }
    config.update(overrides)
    return config


def tiny_wan_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A 3-block Wan-structured ``WanTransformer3DModel`` config (Wan 2.1 text-to-video): video latents
    ``(B, 4, F, 8, 8)``, patch (1, 2, 2) (16 tokens per frame), 2 heads of 12 (3-D RoPE axes: 4 for frames, 4 + 4
    for height and width, as Wan splits the head dimension), text tokens of width 16, timestep frequencies 16,
    feed-forward width 32, RMS q/k norm across heads (as Wan 2.1); ``overrides`` replace any entry."""
    config: dict[str, Any] = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 3,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    }
    config.update(overrides)
    return config


def tiny_qwen_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A 2-block Qwen-Image-structured ``QwenImageTransformer2DModel`` config: packed latents of 64 channels
    (16 latent channels x 2x2 patches), 16 output channels, 2 heads of 8 (RoPE axes 2 + 2 + 4 for frame, height,
    width, summing to the head dimension), text width 16 (the tiny Qwen2.5-VL's, :mod:`tests.examples.tiny_qwen`), no guidance embedding (Qwen-Image uses
    true CFG); ``overrides`` replace any entry."""
    config: dict[str, Any] = {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "guidance_embeds": False,
        "axes_dims_rope": (2, 2, 4),
    }
    config.update(overrides)
    return config


#: ``Qwen/Qwen-Image`` ``transformer/config.json`` (reference/flow.md: 60 blocks, 24 heads of 128, text width 3584).
QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


#: ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` ``transformer/config.json`` (1.42 B parameters as built); the 14B model
#: is this with 40 heads, 40 layers and ``ffn_dim`` 13824 (diffusers' defaults).
WAN21_T2V_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

#: ``black-forest-labs/FLUX.1-dev`` ``transformer/config.json`` (11.90 B parameters as diffusers builds it).
FLUX1_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

#: ``stabilityai/stable-diffusion-3.5-medium`` ``transformer/config.json`` (MMDiT-X; 2.24 B parameters as built).
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

#: ``stabilityai/stable-diffusion-3.5-large`` ``transformer/config.json`` (8.06 B parameters as built).
SD35_LARGE_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}


def tiny_sd3_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A frozen, eval-mode ``SD3Transformer2DModel`` of :func:`tiny_sd3_transformer_config`, seeded."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**tiny_sd3_transformer_config(**overrides)).requires_grad_(False).eval()


def tiny_flux_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A frozen, eval-mode ``FluxTransformer2DModel`` of :func:`tiny_flux_transformer_config`, seeded."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**tiny_flux_transformer_config(**overrides)).requires_grad_(False).eval()


def tiny_wan_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A frozen, eval-mode ``WanTransformer3DModel`` of :func:`tiny_wan_transformer_config`, seeded."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_wan_transformer_config(**overrides)).requires_grad_(False).eval()
