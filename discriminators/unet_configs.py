"""UNet configurations and dummy SDXL conditions for building discriminators without a model hub.

:func:`sdxl_unet_config` is the ``UNet2DConditionModel`` config of SDXL-base 1.0 (random weights are
enough for speed and memory measurements); :func:`tiny_sdxl_unet_config` keeps its block structure
(a plain down block, cross-attention blocks, ``"text_time"`` added conditions) at a width that builds
and runs in milliseconds on a CPU, for examples, tests and benchmarks. :func:`sdxl_conditions` draws
matching ``encoder_hidden_states`` and ``added_cond_kwargs``.

diffusers is imported only inside :func:`tiny_sdxl_unet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._checks import DTypeError, OptionError, check_generator, check_int

__all__ = ["sdxl_conditions", "sdxl_unet_config", "tiny_sdxl_unet", "tiny_sdxl_unet_config"]


def sdxl_unet_config() -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of SDXL-base 1.0 (2.6 B parameters, 128×128 latents).

    Returns:
        A new dict of ``UNet2DConditionModel`` keyword arguments (``UNet2DConditionModel(**cfg)``).

    Example:
        >>> cfg = sdxl_unet_config()
        >>> cfg["block_out_channels"], cfg["projection_class_embeddings_input_dim"]
        ((320, 640, 1280), 2816)
    """
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    }


def tiny_sdxl_unet_config(**overrides: Any) -> dict[str, Any]:
    """A tiny ``UNet2DConditionModel`` config with the SDXL block structure (2 levels, 16×16 latents).

    Widths 32/64, one layer per block, cross-attention dim 32, ``"text_time"`` added conditions with
    32-dim pooled text embeddings and 8-dim time-id embeddings (``8 * 6 + 32 = 80`` projection inputs).

    Args:
        **overrides: config entries to replace or add (any ``UNet2DConditionModel`` argument).

    Returns:
        A new dict of ``UNet2DConditionModel`` keyword arguments.

    Example:
        >>> tiny_sdxl_unet_config(sample_size=32)["sample_size"]
        32
    """
    cfg: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": (2, 4),
        "transformer_layers_per_block": 1,
        "cross_attention_dim": 32,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32,
        "norm_num_groups": 16,
    }
    cfg.update(overrides)
    return cfg


def tiny_sdxl_unet(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Build a ``UNet2DConditionModel`` from :func:`tiny_sdxl_unet_config` with seeded random weights.

    The global random state is left as it was.

    Args:
        seed: seed of the weight initialisation (same seed, same weights).
        **overrides: config entries to replace, as for :func:`tiny_sdxl_unet_config`.

    Returns:
        The UNet, float32, on the CPU, in training mode.

    Raises:
        DTypeError: ``seed`` is not an int.
        OptionError: ``seed`` is negative.
        ImportError: diffusers is not installed (``pip install diffusers``).
        TypeError: an override is not a ``UNet2DConditionModel`` argument (raised by diffusers).

    Example:
        >>> unet = tiny_sdxl_unet()
        >>> type(unet).__name__, unet.config.sample_size
        ('UNet2DConditionModel', 16)
    """
    seed = check_int(seed, "seed", minimum=0)
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet: torch.nn.Module = UNet2DConditionModel(**tiny_sdxl_unet_config(**overrides))  # type: ignore[assignment]
    return unet


def sdxl_conditions(
    unet: Any,
    batch_size: int,
    *,
    seq_len: int = 8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random ``encoder_hidden_states`` and SDXL ``added_cond_kwargs`` that fit ``unet``'s config.

    ``D_text = projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``; the time ids are
    ``(H, W, 0, 0, H, W)`` in pixels (8 × the latent ``sample_size``, which may be an ``(h, w)`` pair).

    Args:
        unet: a ``UNet2DConditionModel`` (or anything with its ``config``) or a config dict; it must have
            SDXL's ``addition_embed_type="text_time"``.
        batch_size: ``B`` (>= 1).
        seq_len: number of text tokens ``L`` (>= 1).
        generator: source of randomness (None: the global generator); the tensors are drawn on its device.
        device: device of the returned tensors (None: the generator's device, else the CPU).
        dtype: floating dtype of the embeddings and time ids.

    Returns:
        ``(encoder_hidden_states (B, L, cross_attention_dim), {"text_embeds": (B, D_text), "time_ids":
        (B, 6)})``.

    Raises:
        DTypeError: ``unet`` has no config; ``batch_size`` / ``seq_len`` is not an int; ``dtype`` is not a
            floating torch dtype; ``generator`` is not a ``torch.Generator``.
        OptionError: ``batch_size`` or ``seq_len`` is < 1; the config lacks an SDXL entry
            (``cross_attention_dim``, ``addition_embed_type="text_time"``, ``addition_time_embed_dim``,
            ``projection_class_embeddings_input_dim``, ``sample_size``).

    Example:
        >>> ehs, added = sdxl_conditions(tiny_sdxl_unet_config(), 2)
        >>> ehs.shape, added["text_embeds"].shape, added["time_ids"].shape
        (torch.Size([2, 8, 32]), torch.Size([2, 32]), torch.Size([2, 6]))
    """
    cfg = unet if isinstance(unet, Mapping) else getattr(unet, "config", None)
    if cfg is None:
        raise DTypeError(
            f"Expected `unet` to be a UNet2DConditionModel or its config dict, but got {type(unet).__name__}."
        )
    if not isinstance(cfg, Mapping):
        cfg = dict(vars(cfg))
    batch_size = check_int(
        batch_size, "batch_size", minimum=1, hint=" Draw conditions for at least one sample."
    )
    seq_len = check_int(seq_len, "seq_len", minimum=1, hint=" Draw at least one text token.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(
            f"Expected `dtype` to be a floating torch dtype such as torch.float32, but got {dtype!r}."
        )
    check_generator(generator)
    if cfg.get("addition_embed_type") != "text_time":
        raise OptionError(
            "Expected `unet` to be an SDXL-style UNet with addition_embed_type='text_time', but its config has "
            f"addition_embed_type={cfg.get('addition_embed_type')!r}; such a UNet takes no added_cond_kwargs "
            "(draw only encoder_hidden_states, e.g. torch.randn(B, L, cross_attention_dim))."
        )
    needed = (
        "cross_attention_dim",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "sample_size",
    )
    missing = [key for key in needed if cfg.get(key) is None]
    if missing:
        raise OptionError(
            f"Expected `unet`'s config to set {missing} (SDXL entries), but they are missing or None."
        )
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    text_dim = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
    if text_dim < 1:
        raise OptionError(
            "Expected `unet`'s projection_class_embeddings_input_dim to exceed 6 * addition_time_embed_dim (room "
            f"for the pooled text embeddings), but got {cfg['projection_class_embeddings_input_dim']} and "
            f"{cfg['addition_time_embed_dim']}."
        )
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    ehs = torch.randn(batch_size, seq_len, int(cross), generator=generator, device=gen_dev, dtype=dtype)
    text = torch.randn(batch_size, text_dim, generator=generator, device=gen_dev, dtype=dtype)
    size = cfg["sample_size"]
    height, width = (size, size) if isinstance(size, (int, float)) else tuple(size)
    height, width = float(height) * 8, float(width) * 8
    time_ids = torch.tensor([height, width, 0.0, 0.0, height, width], dtype=dtype).repeat(batch_size, 1)
    dev = torch.device(device) if device is not None else gen_dev
    return ehs.to(dev), {"text_embeds": text.to(dev), "time_ids": time_ids.to(dev)}
