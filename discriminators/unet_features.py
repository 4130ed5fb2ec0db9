r"""Feature extraction from a diffusers ``UNet2DConditionModel`` without modifying it.

:class:`UNetFeatureExtractor` runs the UNet's own sub-modules in the order of
``UNet2DConditionModel.forward`` (diffusers 0.42) and returns the hidden states at chosen *levels*:

==============  ======================================================================================
level           tensor
==============  ======================================================================================
``"conv_in"``   output of ``conv_in`` (full latent resolution)
``"down.i"``    output of down block ``i`` (after its downsampler, if any)
``"mid"``       output of the mid block (the bottleneck; 1280 × 32 × 32 for SDXL at 1024 px)
``"up.i"``      output of up block ``i`` (after its upsampler, if any)
``"out"``       the UNet's prediction (``conv_norm_out`` → ``conv_act`` → ``conv_out``)
==============  ======================================================================================

The embedding follows the UNet exactly: sinusoidal ``time_proj`` → ``time_embedding`` (+ class
embedding) + the added embedding (``"text"``, or SDXL's ``"text_time"``:
``add_embedding(concat(text_embeds, add_time_proj(time_ids)))``) → ``time_embed_act``; the text
goes through ``encoder_hid_proj`` when present. Only the blocks up to the deepest requested level
run, so an encoder-only discriminator never pays for the decoder.

The extractor holds only the modules it needs (a *trunk* whose attribute names match the UNet's,
so ``trunk.load_state_dict(unet.state_dict(), strict=False)`` loads teacher weights), in one of three
ways (``backbone``):

* ``"copy"``: a deep copy (a trainable discriminator initialised from the teacher, SDXL-Lightning);
* ``"own"``: the UNet's modules themselves, registered as sub-modules (a UNet built for the
  discriminator alone);
* ``"shared"``: the UNet's modules held by reference and **not** registered, so they are absent from
  ``parameters()`` / ``state_dict()`` and ``.to()`` (a frozen teacher shared with other losses, PCM;
  DMD2's fake-score UNet, whose optimiser and gradient sync belong to its owner).

References:
    * S. Lin, A. Wang, X. Yang, "SDXL-Lightning", arXiv:2402.13929, Sec. 3.3 (encoder + mid block).
    * T. Yin et al., "Improved Distribution Matching Distillation" (DMD2), arXiv:2405.14867.
    * F.-Y. Wang et al., "Phased Consistency Model" (PCM), arXiv:2405.18407.
    * M. Kang et al., "Distilling Diffusion Models into Conditional GANs" (Diffusion2GAN), arXiv:2405.05967.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_all_finite,
    check_bool,
    check_float_input,
    check_option,
    check_tensor,
)
from .._modules import unwrap_model
from ._inputs import check_latent, check_levels, shape_str, timestep_batch

__all__ = ["BackboneMode", "UNetFeatureExtractor", "unet_feature_levels"]

logger = logging.getLogger(__name__)

BackboneMode = Literal["copy", "own", "shared"]
_BACKBONE_MODES = ("copy", "own", "shared")
_EMBED_PARTS = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "class_embedding",
    "add_time_proj",
    "add_embedding",
    "encoder_hid_proj",
    "time_embed_act",
)
_OUT_PARTS = ("conv_norm_out", "conv_act", "conv_out")


def _check_unet(unet: Any) -> None:
    missing = [
        name for name in ("config", "conv_in", "time_embedding", "down_blocks") if not hasattr(unet, name)
    ]
    if missing:
        raise DTypeError(
            f"Expected `unet` to be a diffusers UNet2DConditionModel (with conv_in, time_embedding, down_blocks "
            f"and config), but {type(unet).__name__} lacks {missing}."
        )


def _cfg(unet: Any) -> Mapping[str, Any]:
    cfg = unet.config
    return cfg if isinstance(cfg, Mapping) else dict(vars(cfg))


def unet_feature_levels(unet: Any) -> tuple[str, ...]:
    """The level names a :class:`UNetFeatureExtractor` can return for ``unet``, in network order.

    Args:
        unet: A diffusers ``UNet2DConditionModel``, possibly wrapped in DDP / ``torch.compile``.

    Returns:
        ``("conv_in", "down.0", ..., "mid", "up.0", ..., "out")``: the levels this UNet has.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel`` (it lacks ``conv_in``, ``time_embedding``,
            ``down_blocks`` or ``config``).

    Example:
        >>> from diffdistill.discriminators import tiny_sdxl_unet
        >>> unet_feature_levels(tiny_sdxl_unet())
        ('conv_in', 'down.0', 'down.1', 'mid', 'up.0', 'up.1', 'out')
    """
    unet = unwrap_model(unet)
    _check_unet(unet)
    levels = ["conv_in"] + [f"down.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        levels.append("mid")
    levels += [f"up.{i}" for i in range(len(getattr(unet, "up_blocks", ())))]
    if getattr(unet, "conv_out", None) is not None:
        levels.append("out")
    return tuple(levels)


def _level_geometry(unet: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Channels and downsampling factor (relative to the latent) of every level."""
    channels: dict[str, int] = {"conv_in": int(unet.conv_in.out_channels)}
    strides: dict[str, int] = {"conv_in": 1}
    stride = 1
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "downsamplers", None) is not None:
            stride *= 2
        channels[f"down.{i}"] = int(block.resnets[-1].out_channels)
        strides[f"down.{i}"] = stride
    if getattr(unet, "mid_block", None) is not None:
        channels["mid"] = int(unet.mid_block.resnets[-1].out_channels)
        strides["mid"] = stride
    for i, block in enumerate(getattr(unet, "up_blocks", ())):
        if getattr(block, "upsamplers", None) is not None:
            stride = max(stride // 2, 1)
        channels[f"up.{i}"] = int(block.resnets[-1].out_channels)
        strides[f"up.{i}"] = stride
    if getattr(unet, "conv_out", None) is not None:
        channels["out"] = int(unet.conv_out.out_channels)
        strides["out"] = stride
    return channels, strides


class _UNetTrunk(nn.Module):
    """The sub-modules of a UNet that an extractor needs, under the UNet's own attribute names.

    Args:
        config: the UNet's config.
        parts: ``{attribute name: module or None}``.
        num_upsamplers: the UNet's ``num_upsamplers``.
    """

    def __init__(self, config: Mapping[str, Any], parts: Mapping[str, Any], num_upsamplers: int) -> None:
        super().__init__()
        self.config = dict(config)
        self.num_upsamplers = int(num_upsamplers)
        for name, module in parts.items():
            setattr(self, name, module)


class _Inputs(NamedTuple):
    """Validated inputs of one extractor call, cast to the trunk's dtype."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    added_cond_kwargs: Mapping[str, torch.Tensor] | None
    class_labels: torch.Tensor | None
    timestep_cond: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None


def _check_batch(x: torch.Tensor, name: str, batch: int, layout: str) -> None:
    if x.ndim == 0 or x.shape[0] != batch:
        raise ShapeError(
            f"Expected `{name}` to have the batch size of `sample` ({batch}) in dim 0, laid out as {layout}, but "
            f"got shape {shape_str(x.shape)}. Pass one entry per sample.",
            name=name,
            expected=(batch,),
            actual=tuple(x.shape),
        )


class UNetFeatureExtractor(nn.Module):
    r"""Hidden states of a ``UNet2DConditionModel`` at chosen levels, computed with the UNet's own modules.

    ``extractor(sample, timestep, encoder_hidden_states, added_cond_kwargs)`` reproduces the UNet's
    forward pass up to the deepest requested level and returns ``{level: tensor}``; with
    ``levels=("out",)`` it returns exactly ``unet(...).sample``. Level ``l`` has shape
    ``(B, channels[l], H / strides[l], W / strides[l])``.

    Dtypes: ``sample``, ``encoder_hidden_states`` and ``timestep_cond`` are cast to the dtype of the trunk's
    ``conv_in`` weight, so a bf16 sample works with a float32 extractor (and a float32 sample with a bf16
    one) without autocast, as a diffusers pipeline's ``latents.to(unet.dtype)`` does. Under ``torch.autocast``
    the autocast dtype then decides the compute dtype, as for any module; the returned features are in the
    dtype the blocks produce.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.5, SDXL, SSD-1B...), possibly wrapped in DDP /
            ``torch.compile``. ``"copy"`` and ``"shared"`` leave it as it is; ``"own"`` with ``trainable``
            set changes its ``requires_grad`` (and, with ``False``, puts it in eval mode).
        levels: the levels to return, see :func:`unet_feature_levels` (default: the bottleneck ``"mid"``); one
            name or a sequence of distinct names.
        backbone: ``"copy"`` (deep copy), ``"own"`` (register the UNet's modules) or ``"shared"`` (hold
            them by reference, unregistered); see the module docstring.
        trainable: ``True`` / ``False`` set ``requires_grad`` of a ``"copy"`` / ``"own"`` trunk (``False``
            also keeps it in eval mode); ``None`` (default) leaves it as it is. Must be ``None`` for
            ``"shared"``.
        gradient_checkpointing: recompute each block in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) instead of storing its activations.

    Attributes:
        channels: ``{level: channels}`` for every level of the UNet.
        strides: ``{level: downsampling factor relative to the latent}``.

    Raises:
        DTypeError: ``unet`` is not a ``UNet2DConditionModel``; ``levels`` is not a str or a sequence;
            ``trainable`` / ``gradient_checkpointing`` is not a bool.
        OptionError: ``levels`` is empty, repeats a level or names one the UNet lacks; ``backbone`` is not
            ``"copy"``, ``"own"`` or ``"shared"``; ``trainable`` is set with ``backbone="shared"``.

    Example:
        >>> from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
        >>> unet = tiny_sdxl_unet()
        >>> ext = UNetFeatureExtractor(unet, levels=("down.0", "mid"), backbone="shared")
        >>> ehs, added = sdxl_conditions(unet, 2)
        >>> feats = ext(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), ehs, added)
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'down.0': (2, 32, 8, 8), 'mid': (2, 64, 8, 8)}
        >>> sum(p.numel() for p in ext.parameters())  # a shared trunk is not registered
        0
    """

    def __init__(
        self,
        unet: nn.Module,
        levels: Sequence[str] = ("mid",),
        *,
        backbone: BackboneMode = "copy",
        trainable: bool | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_option(backbone, "backbone", _BACKBONE_MODES)
        check_bool(trainable, "trainable", allow_none=True)
        check_bool(gradient_checkpointing, "gradient_checkpointing")
        net: Any = unwrap_model(unet)  # diffusers attributes, duck-typed
        _check_unet(net)
        available = unet_feature_levels(net)
        levels = check_levels(levels, available, "levels")
        if backbone == "shared" and trainable is not None:
            raise OptionError(
                "A `backbone='shared'` UNet belongs to its owner, so `trainable` must be None; set "
                "requires_grad on the UNet itself or use backbone='copy'."
            )
        self.levels = levels
        self.backbone_mode = backbone
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.channels, self.strides = _level_geometry(net)
        self.in_channels = int(net.conv_in.in_channels)
        config = _cfg(net)
        self.sample_size = config.get("sample_size")
        deepest = max(available.index(level) for level in levels)
        self._deepest = available[deepest]
        self._reachable = tuple(available[: deepest + 1])  # the levels a forward runs through
        needed = set(available[: deepest + 1])
        n_down = sum(1 for level in needed if level.startswith("down."))
        n_up = sum(1 for level in needed if level.startswith("up."))
        parts: dict[str, Any] = {name: getattr(net, name, None) for name in _EMBED_PARTS}
        parts["down_blocks"] = nn.ModuleList(list(net.down_blocks)[:n_down])
        parts["mid_block"] = net.mid_block if "mid" in needed else None
        parts["up_blocks"] = nn.ModuleList(list(net.up_blocks)[:n_up]) if n_up else nn.ModuleList()
        for name in _OUT_PARTS:
            parts[name] = getattr(net, name, None) if "out" in needed else None
        self._num_up_total = len(getattr(net, "up_blocks", ()))
        num_upsamplers = int(getattr(net, "num_upsamplers", max(self._num_up_total - 1, 0)))
        trunk = _UNetTrunk(config, parts, num_upsamplers)
        if backbone == "copy":
            trunk = copy.deepcopy(trunk)
        if backbone == "shared":
            self._shared: tuple[_UNetTrunk, ...] = (trunk,)
        else:
            self._shared = ()
            self.trunk_module = trunk
            if trainable is not None:
                trunk.requires_grad_(bool(trainable))
                if not trainable:
                    trunk.eval()
        self._frozen = trainable is False
        logger.debug(
            "UNetFeatureExtractor: levels=%s, backbone=%s, deepest=%s", levels, backbone, self._deepest
        )

    # ----------------------------------------------------------------------------------------- access
    @property
    def trunk(self) -> Any:
        """The UNet sub-modules this extractor runs (registered or shared)."""
        return self._shared[0] if self._shared else self.trunk_module

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: that of the trunk's ``conv_in`` weight (read at each call, so a
        shared UNet cast by its owner is followed)."""
        conv = self.trunk.conv_in
        weight = getattr(conv, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        param = next(conv.parameters(), None)
        return param.dtype if param is not None and param.is_floating_point() else torch.float32

    def train(self, mode: bool = True) -> UNetFeatureExtractor:
        """Set training mode; a frozen (``trainable=False``) trunk stays in eval mode.

        Args:
            mode: ``True`` for training mode, ``False`` for eval mode.

        Returns:
            This extractor.

        Raises:
            DTypeError: ``mode`` is not a bool.
        """
        check_bool(mode, "mode")
        super().train(mode)
        if self._frozen and not self._shared:
            self.trunk_module.eval()
        return self

    def _run(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    # ----------------------------------------------------------------------------------------- checks
    def _check_sample(self, sample: Any, name: str = "sample") -> torch.Tensor:
        """Static checks of a latent the trunk takes: a floating ``(B, in_channels, H, W)`` tensor."""
        return check_latent(sample, name, self.in_channels, "the UNet's {n} input channels")

    def _needs_text(self) -> bool:
        trunk = self.trunk
        return trunk.config.get("addition_embed_type") == "text" or any(
            getattr(b, "has_cross_attention", False)
            for b in [*trunk.down_blocks, trunk.mid_block, *trunk.up_blocks]
        )

    def _check_conditions(
        self,
        batch: int,
        encoder_hidden_states: Any,
        added_cond_kwargs: Any,
        class_labels: Any = None,
        timestep_cond: Any = None,
        encoder_attention_mask: Any = None,
        *,
        need_text: bool = True,
    ) -> list[tuple[str, torch.Tensor]]:
        """Static checks of the conditions for a batch of ``batch``; returns the tensors to check for finiteness."""
        trunk = self.trunk
        cfg = trunk.config
        named: list[tuple[str, torch.Tensor]] = []
        cross = cfg.get("cross_attention_dim")
        if trunk.encoder_hid_proj is not None:  # the text is projected to cross_attention_dim first
            cross = cfg.get("encoder_hid_dim")
        needs_text = self._needs_text()
        if encoder_hidden_states is None:
            if needs_text and need_text:
                raise ValueError(
                    "The UNet blocks up to level "
                    f"{self._deepest!r} use cross-attention, which needs `encoder_hidden_states` of shape "
                    f"(B, L, {cross}), but it is None. Pass the text encoder's hidden states."
                )
        else:
            check_float_input(
                encoder_hidden_states, "encoder_hidden_states", ndim=3, layout="(B, L, D)", finite=False
            )
            if encoder_hidden_states.shape[0] != batch or (
                isinstance(cross, int) and needs_text and encoder_hidden_states.shape[2] != cross
            ):
                raise ShapeError(
                    f"Expected `encoder_hidden_states` of shape ({batch}, L, {cross}) to match the batch of "
                    f"`sample` ({batch}) and the UNet's text width, but got "
                    f"{shape_str(encoder_hidden_states.shape)}. Pass the hidden states of the text encoder "
                    "the UNet was trained with.",
                    name="encoder_hidden_states",
                    expected=(batch, "L", cross),
                    actual=tuple(encoder_hidden_states.shape),
                )
            named.append(("encoder_hidden_states", encoder_hidden_states))
        named += self._check_added(batch, added_cond_kwargs)
        if class_labels is not None:
            if trunk.class_embedding is None:
                raise OptionError(
                    "Expected `class_labels` to be None: the UNet has no class embedding (num_class_embeds / "
                    "class_embed_type unset), so the labels would be ignored."
                )
            check_tensor(class_labels, "class_labels")
            _check_batch(class_labels, "class_labels", batch, "(B,)")
            named.append(("class_labels", class_labels))
        if timestep_cond is not None:
            cond_proj = getattr(trunk.time_embedding, "cond_proj", None)
            if cond_proj is None:
                raise OptionError(
                    "Expected `timestep_cond` to be None: the UNet has no guidance embedding "
                    "(time_cond_proj_dim=None), so it cannot take one."
                )
            check_float_input(timestep_cond, "timestep_cond", ndim=2, layout="(B, D)", finite=False)
            _check_batch(timestep_cond, "timestep_cond", batch, "(B, D)")
            width = getattr(cond_proj, "in_features", None)
            if isinstance(width, int) and timestep_cond.shape[1] != width:
                raise ShapeError(
                    f"Expected `timestep_cond` of shape ({batch}, {width}) (the UNet's time_cond_proj_dim), but got "
                    f"{shape_str(timestep_cond.shape)}.",
                    name="timestep_cond",
                    expected=(batch, width),
                    actual=tuple(timestep_cond.shape),
                )
            named.append(("timestep_cond", timestep_cond))
        if encoder_attention_mask is not None:
            check_tensor(encoder_attention_mask, "encoder_attention_mask")
            length = (
                encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else None
            )
            want = (batch, "L" if length is None else length)
            if (
                encoder_attention_mask.ndim != 2
                or encoder_attention_mask.shape[0] != batch
                or (length is not None and encoder_attention_mask.shape[1] != length)
            ):
                raise ShapeError(
                    f"Expected `encoder_attention_mask` (a keep-mask of the text tokens) of shape "
                    f"({want[0]}, {want[1]}) to match `encoder_hidden_states`, but got "
                    f"{shape_str(encoder_attention_mask.shape)}.",
                    name="encoder_attention_mask",
                    expected=want,
                    actual=tuple(encoder_attention_mask.shape),
                )
        return named

    def _check_added(self, batch: int, added_cond_kwargs: Any) -> list[tuple[str, torch.Tensor]]:
        if added_cond_kwargs is not None and not isinstance(added_cond_kwargs, Mapping):
            raise DTypeError(
                "Expected `added_cond_kwargs` to be a dict such as {'text_embeds': (B, D), 'time_ids': (B, 6)} "
                f"or None, but got {type(added_cond_kwargs).__name__}."
            )
        trunk = self.trunk
        kind = trunk.config.get("addition_embed_type")
        if kind is None or trunk.add_embedding is None or kind == "text":
            return []
        if kind != "text_time":
            raise OptionError(
                f"Expected the UNet config `addition_embed_type` to be None, 'text' or 'text_time' (SD / SDXL), but "
                f"got {kind!r}; the discriminators do not support Kandinsky-style image conditions."
            )
        fix = (
            "Pass added_cond_kwargs={'text_embeds': pooled (B, D), 'time_ids': (B, 6)}, the same dict the "
            "SDXL UNet gets."
        )
        if added_cond_kwargs is None:
            raise ValueError(
                "The UNet has addition_embed_type='text_time' (SDXL), which needs `added_cond_kwargs` with "
                f"'text_embeds' and 'time_ids', but added_cond_kwargs is None. {fix}"
            )
        for key in ("text_embeds", "time_ids"):
            if key not in added_cond_kwargs:
                raise ValueError(
                    f"The UNet has addition_embed_type='text_time' (SDXL), which needs `added_cond_kwargs['{key}']`, "
                    f"but added_cond_kwargs has keys {sorted(map(str, added_cond_kwargs))}. {fix}"
                )
        text_name, ids_name = "added_cond_kwargs['text_embeds']", "added_cond_kwargs['time_ids']"
        text_embeds = check_float_input(
            added_cond_kwargs["text_embeds"], text_name, ndim=2, layout="(B, D)", finite=False
        )
        time_ids = check_tensor(added_cond_kwargs["time_ids"], ids_name)
        if time_ids.dtype == torch.bool or time_ids.is_complex():
            raise DTypeError(
                f"Expected `{ids_name}` to hold the SDXL size conditions (H, W, top, left, H, W) as numbers, but "
                f"got dtype {time_ids.dtype}. Pass a float tensor of shape (B, 6)."
            )
        if time_ids.ndim != 2:
            raise ShapeError(
                f"Expected `{ids_name}` to have 2 dimensions laid out as (B, 6), but got shape "
                f"{shape_str(time_ids.shape)}.",
                name=ids_name,
                expected=2,
                actual=tuple(time_ids.shape),
            )
        _check_batch(text_embeds, text_name, batch, "(B, D)")
        _check_batch(time_ids, ids_name, batch, "(B, 6)")
        time_dim = int(trunk.config.get("addition_time_embed_dim") or 0)
        want = trunk.config.get("projection_class_embeddings_input_dim")
        got = text_embeds.shape[1] + time_ids.shape[1] * time_dim
        if want is not None and got != want:
            raise ShapeError(
                f"Expected added_cond_kwargs['text_embeds'].shape[1] + added_cond_kwargs['time_ids'].shape[1] * "
                f"{time_dim} to equal the UNet's projection_class_embeddings_input_dim {want}, but got "
                f"{text_embeds.shape[1]} + {time_ids.shape[1]} * {time_dim} = {got}.",
                name="added_cond_kwargs",
                expected=want,
                actual=got,
            )
        return [(text_name, text_embeds), (ids_name, time_ids)]

    def _check_additions(
        self, additions: Any
    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
        if additions is None:
            return {}, []
        if not isinstance(additions, Mapping):
            raise DTypeError(
                f"Expected `additions` to be a dict {{level: tensor}} or None, but got {type(additions).__name__}."
            )
        unknown = [name for name in additions if name not in self._reachable]
        if unknown:
            raise OptionError(
                f"Expected `additions` keys among the levels this extractor runs, {list(self._reachable)}, but "
                f"got {unknown}: an addition anywhere else would be dropped. Request a deeper level to reach it."
            )
        named = []
        for level, value in additions.items():
            name = f"additions[{level!r}]"
            check_float_input(value, name, ndim=4, layout="(B, C, H, W)", finite=False)
            named.append((name, value))
        return dict(additions), named

    def _validate(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        added_cond_kwargs: Any,
        class_labels: Any,
        timestep_cond: Any,
        encoder_attention_mask: Any,
        extra: Sequence[tuple[str, torch.Tensor]] = (),
        *,
        need_text: bool = True,
    ) -> _Inputs:
        """All checks of one call (one device sync for the value checks); inputs cast to the trunk's dtype."""
        self._check_sample(sample)
        batch = sample.shape[0]
        timesteps = timestep_batch(timestep, batch, sample.device, "timestep")
        named = [("sample", sample), ("timestep", timesteps)]
        named += self._check_conditions(
            batch,
            encoder_hidden_states,
            added_cond_kwargs,
            class_labels,
            timestep_cond,
            encoder_attention_mask,
            need_text=need_text,
        )
        check_all_finite([*named, *extra])
        dtype = self.compute_dtype
        return _Inputs(
            sample.to(dtype),
            timesteps,
            None if encoder_hidden_states is None else encoder_hidden_states.to(dtype),
            added_cond_kwargs,
            class_labels,
            None if timestep_cond is None else timestep_cond.to(dtype),
            encoder_attention_mask,
        )

    # ----------------------------------------------------------------------------------------- conditions
    def _added_embedding(self, emb: torch.Tensor, inputs: _Inputs) -> torch.Tensor | None:
        trunk = self.trunk
        kind = trunk.config.get("addition_embed_type")
        if kind is None or trunk.add_embedding is None:
            return None
        if kind == "text":
            return trunk.add_embedding(inputs.encoder_hidden_states)
        added = cast(Mapping[str, torch.Tensor], inputs.added_cond_kwargs)  # not None: see _check_added
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]
        time_embeds = trunk.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
        add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        return trunk.add_embedding(add_embeds)

    def embed(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's embedding (time + class + added conditions) and processed text states.

        Args:
            sample: noisy latents ``(B, C_in, H, W)`` (only their batch size, device and the trunk's dtype
                are used).
            timestep: a number, ``()``, ``(1,)`` or ``(B,)``.
            encoder_hidden_states: text hidden states ``(B, L, D)``, or None (then the second result is None).
            added_cond_kwargs: SDXL's ``{"text_embeds": (B, D), "time_ids": (B, 6)}`` (None for UNets without
                added conditions).
            class_labels: ``(B,)`` labels, for UNets with a class embedding (None otherwise).
            timestep_cond: ``(B, time_cond_proj_dim)``, for UNets with a guidance embedding (None otherwise).

        Returns:
            ``(emb (B, D_emb), encoder_hidden_states)``, the latter through ``encoder_hid_proj`` when the UNet
            has one, in the trunk's dtype.

        Raises:
            DTypeError: a tensor argument is not a tensor, ``sample`` / ``encoder_hidden_states`` /
                ``text_embeds`` / ``timestep_cond`` is not floating, ``timestep`` is not a number or an
                integer / floating tensor, ``added_cond_kwargs`` is not a dict.
            ShapeError: wrong number of dimensions, input channels, an empty batch, a ``timestep`` or
                condition whose batch differs from ``sample``'s, or added conditions that do not fit the
                UNet's ``projection_class_embeddings_input_dim``.
            NonFiniteError: an input holds NaN / Inf (value check).
            ValueError: the UNet needs ``added_cond_kwargs`` (SDXL) or ``class_labels`` and they are missing.
            OptionError: ``class_labels`` / ``timestep_cond`` is passed to a UNet without a class / guidance
                embedding; the UNet uses an unsupported ``addition_embed_type`` / ``encoder_hid_dim_type``.
        """
        inputs = self._validate(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs,
            class_labels,
            timestep_cond,
            None,
            need_text=False,
        )
        return self._embed(inputs)

    def _embed(self, inputs: _Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        trunk = self.trunk
        cfg = trunk.config
        dtype = inputs.sample.dtype
        t_emb = trunk.time_proj(inputs.timesteps).to(dtype=dtype)
        emb = trunk.time_embedding(t_emb, inputs.timestep_cond)
        class_labels = inputs.class_labels
        if trunk.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    "The UNet has a class embedding (num_class_embeds / class_embed_type), which needs "
                    "`class_labels`, but class_labels is None. Pass class_labels=..."
                )
            if cfg.get("class_embed_type") == "timestep":
                class_labels = trunk.time_proj(class_labels).to(dtype=dtype)
            class_emb = trunk.class_embedding(class_labels).to(dtype=dtype)
            emb = (
                torch.cat([emb, class_emb], dim=-1) if cfg.get("class_embeddings_concat") else emb + class_emb
            )
        aug_emb = self._added_embedding(emb, inputs)
        if aug_emb is not None:
            emb = emb + aug_emb
        if trunk.time_embed_act is not None:
            emb = trunk.time_embed_act(emb)
        encoder_hidden_states = inputs.encoder_hidden_states
        if trunk.encoder_hid_proj is not None:
            if cfg.get("encoder_hid_dim_type") != "text_proj":
                raise OptionError(
                    "Expected the UNet config `encoder_hid_dim_type` to be None or 'text_proj', but got "
                    f"{cfg.get('encoder_hid_dim_type')!r}; image projections are not supported."
                )
            if encoder_hidden_states is not None:
                encoder_hidden_states = trunk.encoder_hid_proj(encoder_hidden_states)
        return emb, encoder_hidden_states

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        additions: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the UNet up to the deepest requested level.

        ``sample``, ``encoder_hidden_states`` and ``timestep_cond`` are cast to :attr:`compute_dtype` (the
        trunk's dtype) first; see the class docstring.

        Args:
            sample: noisy latents ``(B, C_in, H, W)``.
            timestep: a number, ``()``, ``(1,)`` or ``(B,)``.
            encoder_hidden_states: text hidden states ``(B, L, cross_attention_dim)`` (needed when a block
                that runs has cross-attention; None otherwise).
            added_cond_kwargs: SDXL's ``{"text_embeds": (B, D), "time_ids": (B, 6)}`` (None for UNets
                without added conditions).
            class_labels: ``(B,)``, for UNets with a class embedding (None otherwise).
            timestep_cond: ``(B, time_cond_proj_dim)``, for UNets with ``time_cond_proj_dim`` (LCM guidance
                embedding; None otherwise).
            encoder_attention_mask: ``(B, L)`` keep-mask of the text tokens (None: attend to all).
            cross_attention_kwargs: passed to the attention processors (None: their defaults).
            additions: ``{level: tensor}`` added to that level's output before the rest of the network uses
                it (its skip connection included); each tensor must have exactly the level's output shape
                (no broadcasting). Used to inject inputs at several resolutions (Diffusion2GAN's multi-scale
                input). None: nothing added.

        Returns:
            ``{level: (B, channels[level], H / strides[level], W / strides[level])}`` in the order of
            ``levels``.

        Raises:
            DTypeError: a tensor argument is not a tensor; ``sample``, ``encoder_hidden_states``,
                ``added_cond_kwargs['text_embeds']``, ``timestep_cond`` or an addition is not floating (an
                integer or bool tensor); ``timestep`` is not a number or an integer / floating tensor;
                ``added_cond_kwargs`` / ``additions`` / ``cross_attention_kwargs`` is not a dict.
            ShapeError: ``sample`` is not ``(B, in_channels, H, W)`` or its batch is empty; ``timestep`` or a
                condition has another batch size or layout; ``encoder_hidden_states`` has another text
                width; added conditions do not fit the UNet's ``projection_class_embeddings_input_dim``;
                an addition does not have its level's output shape.
            NonFiniteError: ``sample``, ``timestep``, a condition or an addition holds NaN / Inf (a value
                check: skipped when value checks are off).
            ValueError: a condition the UNet needs (``encoder_hidden_states``, ``added_cond_kwargs``,
                ``class_labels``) is None.
            OptionError: an ``additions`` key is not a level this extractor runs; ``class_labels`` /
                ``timestep_cond`` is passed to a UNet without a class / guidance embedding; the UNet uses an
                unsupported ``addition_embed_type`` / ``encoder_hid_dim_type``.
        """
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, Mapping):
            raise DTypeError(
                "Expected `cross_attention_kwargs` to be a dict or None, but got "
                f"{type(cross_attention_kwargs).__name__}."
            )
        adds, add_named = self._check_additions(additions)
        inputs = self._validate(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs,
            class_labels,
            timestep_cond,
            encoder_attention_mask,
            add_named,
        )
        return self._forward(inputs, adds, cross_attention_kwargs)

    def _forward(
        self,
        inputs: _Inputs,
        additions: Mapping[str, torch.Tensor],
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> dict[str, torch.Tensor]:
        trunk = self.trunk
        cfg = trunk.config
        sample = inputs.sample
        wanted = set(self.levels)
        found: dict[str, torch.Tensor] = {}

        def record(name: str, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
            if name in additions:
                addition = additions[name]
                if addition.shape != hidden.shape:
                    raise ShapeError(
                        f"Expected `additions[{name!r}]` to have the shape of the output of level {name!r}, "
                        f"{shape_str(hidden.shape)}, but got {shape_str(addition.shape)}; it would broadcast. "
                        f"Pass one map per sample with channels[{name!r}] = {self.channels[name]} channels.",
                        name=f"additions[{name!r}]",
                        expected=tuple(hidden.shape),
                        actual=tuple(addition.shape),
                    )
                hidden = hidden + addition.to(hidden.dtype)
            if name in wanted:
                found[name] = hidden
            return hidden, name == self._deepest

        forward_upsample_size = any(dim % (2**trunk.num_upsamplers) != 0 for dim in sample.shape[-2:])
        encoder_attention_mask = inputs.encoder_attention_mask
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if cfg.get("center_input_sample"):
            sample = 2 * sample - 1.0
            inputs = inputs._replace(sample=sample)
        emb, encoder_hidden_states = self._embed(inputs)
        attn_kwargs = {
            "encoder_hidden_states": encoder_hidden_states,
            "attention_mask": None,
            "cross_attention_kwargs": cross_attention_kwargs,
            "encoder_attention_mask": encoder_attention_mask,
        }
        hidden, done = record("conv_in", trunk.conv_in(sample))
        if done:
            return self._ordered(found)
        res_samples: tuple[torch.Tensor, ...] = (hidden,)
        for i, block in enumerate(trunk.down_blocks):
            if getattr(block, "has_cross_attention", False):
                hidden, res = self._run(block, hidden_states=hidden, temb=emb, **attn_kwargs)
            else:
                hidden, res = self._run(block, hidden_states=hidden, temb=emb)
            hidden, done = record(f"down.{i}", hidden)
            res_samples += (*res[:-1], hidden)
            if done:
                return self._ordered(found)
        if trunk.mid_block is not None:
            if getattr(trunk.mid_block, "has_cross_attention", False):
                hidden = self._run(trunk.mid_block, hidden, emb, **attn_kwargs)
            else:
                hidden = self._run(trunk.mid_block, hidden, emb)
            hidden, done = record("mid", hidden)
            if done:
                return self._ordered(found)
        upsample_size = None
        for i, block in enumerate(trunk.up_blocks):
            is_final = i == self._num_up_total - 1
            n_res = len(block.resnets)
            skips, res_samples = res_samples[-n_res:], res_samples[:-n_res]
            if not is_final and forward_upsample_size:
                upsample_size = res_samples[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                hidden = self._run(
                    block,
                    hidden_states=hidden,
                    temb=emb,
                    res_hidden_states_tuple=skips,
                    upsample_size=upsample_size,
                    **attn_kwargs,
                )
            else:
                hidden = self._run(
                    block,
                    hidden_states=hidden,
                    temb=emb,
                    res_hidden_states_tuple=skips,
                    upsample_size=upsample_size,
                )
            hidden, done = record(f"up.{i}", hidden)
            if done:
                return self._ordered(found)
        if trunk.conv_norm_out is not None:
            hidden = trunk.conv_act(trunk.conv_norm_out(hidden))
        record("out", trunk.conv_out(hidden))
        return self._ordered(found)

    def _ordered(self, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {level: found[level] for level in self.levels}

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, backbone={self.backbone_mode!r}, "
            f"gradient_checkpointing={self.gradient_checkpointing}"
        )
