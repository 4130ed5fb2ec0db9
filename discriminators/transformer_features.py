r"""Image-token features of a diffusers transformer backbone (SD3/SD3.5 MMDiT, FLUX, Wan, any listed blocks).

:class:`TransformerFeatureExtractor` runs the model's **own** ``forward`` with the keyword arguments the model
takes and reads the output of chosen blocks with forward hooks, so it follows the installed diffusers exactly
(LoRA adapters, attention processors and all). Blocks are named by their module name
(``"transformer_blocks.3"``, ``"single_transformer_blocks.0"``) or by their index in execution order over
the block lists (FLUX.1-dev: 0-18 the double-stream blocks, 19-56 the single-stream ones); see
:func:`transformer_block_names`.

Each readout is the **image stream** reshaped to a feature map ``(B, C, H/p, W/p)`` (``C`` the model's width):

=====================================================  ==============================================
block output                                           image stream
=====================================================  ==============================================
a tuple ``(encoder_hidden_states, hidden_states)``     the last element (diffusers' joint / double-stream
(SD3 ``JointTransformerBlock``, FLUX.1 double *and*    blocks, and FLUX.1 single blocks since diffusers
single blocks in diffusers 0.42, Qwen-Image)           PR #11180)
one tensor of ``N_txt + N_img`` tokens (FLUX.2 single  the last ``N_img`` tokens: the joint sequence is
blocks, FLUX.1 single blocks before PR #11180)         ``[txt; img]``, text first
one tensor of ``N_img`` tokens (DiT, SANA, ...)        the tensor itself
=====================================================  ==============================================

Tokens are in row-major order of the patch grid (SD3's ``PatchEmbed`` and FLUX's 2×2 packing both flatten
rows first), so ``tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)`` is the feature map.

**Video (Wan).** ``WanTransformer3DModel`` takes video latents ``(B, C, F, H, W)`` and patchifies them with a
``Conv3d`` of kernel = stride = ``patch_size`` ``(p_t, p_h, p_w)`` (Wan 2.1 / 2.2: ``(1, 2, 2)``), then
``flatten(2).transpose(1, 2)``: token ``n = (f * H' + i) * W' + j`` is the patch at frame ``f``, row ``i``, column
``j`` of the grid ``(F', H', W') = (F / p_t, H / p_h, W / p_w)`` (checked against diffusers 0.42.1; the model's
unpatchify reshapes its output tokens in the same order). Its blocks (``blocks.0`` ...) carry image tokens only
(text enters by cross-attention) and return one ``(B, F'H'W', D)`` tensor, so a readout is
``tokens.unflatten(1, (F', H', W')).movedim(-1, 1)``: a ``(B, D, F', H', W')`` map. Frame counts and sizes must be
multiples of the patch size (the ``Conv3d`` would silently drop a remainder).

**Early exit**: the blocks after the last readout do not run (the forward is stopped by a pre-hook on the
next block, or on ``norm_out`` when the last block is read). **Gradient checkpointing**
(``gradient_checkpointing=True``) uses the model's own checkpointing loop (diffusers'
``_gradient_checkpointing_func``) with a non-reentrant ``torch.utils.checkpoint`` for the duration of
the call, whatever the owner set (a :class:`~diffdistill.students.SharedBase`'s own checkpoint function, if
its ``enable_gradient_checkpointing()`` installed one); the owner's setting is restored afterwards. Gradients flow to the input
(the generator is trained through a discriminator built on these features) and to whatever parameters of the
model require grad (a LoRA-trainable teacher); a frozen model gets none. The early exit is a Python exception
caught here, so under ``torch.compile`` compile the blocks (diffusers' ``compile_repeated_blocks``), not the
whole model's forward.

The model is held like :class:`~diffdistill.discriminators.UNetFeatureExtractor`'s trunk (``backbone``):
``"shared"`` (by reference, not registered: a frozen teacher shared with other losses is neither saved nor
moved with the extractor), ``"own"`` (registered) or ``"copy"`` (a registered deep copy).

References:
    * P. Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3),
      arXiv:2403.03206, Sec. 4 (MMDiT joint blocks: separate text and image streams).
    * A. Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation"
      (LADD), arXiv:2403.12015 (discriminator features from the teacher's transformer blocks, reshaped to
      their spatial layout).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

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
    check_int,
    check_module,
    check_option,
    check_optional_int,
)
from .._modules import unwrap_model
from .._transformer_blocks import (
    block_lists_of,
    check_block_lists,
    image_stream_index,
    transformer_block_names,
)
from ._inputs import shape_str, timestep_batch
from .unet_features import BackboneMode

__all__ = ["TransformerFeatureExtractor", "transformer_block_names"]

logger = logging.getLogger(__name__)

#: Block lists looked up by default, in execution order (diffusers' MMDiT / DiT transformers; Wan: ``blocks``).
_BACKBONE_MODES = ("copy", "own", "shared")


class _EarlyExit(Exception):
    """Raised by the pre-hook of the first module after the last readout to stop the model's forward."""


def _config(model: Any) -> Mapping[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return cfg if isinstance(cfg, Mapping) else dict(vars(cfg))


def _resolve_blocks(blocks: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """``blocks`` (an int / name or a sequence of them) as distinct block names in execution order."""
    if isinstance(blocks, (int, str)) and not isinstance(blocks, bool):
        blocks = (blocks,)
    if not isinstance(blocks, Sequence) or isinstance(blocks, (str, bytes)):
        raise DTypeError(
            "Expected `blocks` to be a block index, a block name or a sequence of them, but got "
            f"{type(blocks).__name__}."
        )
    if not blocks:
        raise OptionError(f"Expected `blocks` to name at least one of the {len(names)} blocks, but got ().")
    out = []
    for b in blocks:
        if isinstance(b, str):
            if b not in names:
                raise OptionError(
                    f"Expected every name in `blocks` to be a block of the model ({names[0]!r} ... {names[-1]!r}, "
                    f"see transformer_block_names(model)), but got {b!r}."
                )
            out.append(b)
        elif isinstance(b, int) and not isinstance(b, bool):
            if not -len(names) <= b < len(names):
                raise OptionError(
                    f"Expected every index in `blocks` to lie in [{-len(names)}, {len(names) - 1}] (the model has "
                    f"{len(names)} blocks), but got {b}."
                )
            out.append(names[b])
        else:
            raise DTypeError(
                f"Expected every entry of `blocks` to be an int index or a str block name, but got {b!r} "
                f"({type(b).__name__})."
            )
    if len(set(out)) != len(out):
        raise OptionError(f"Expected `blocks` without repeats, but got {out}.")
    return tuple(sorted(out, key=names.index))


def _model_width(model: Any, channels: int | None) -> int:
    if channels is not None:
        return channels
    width = getattr(model, "inner_dim", None)
    if isinstance(width, int):
        return width
    cfg = _config(model)
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    raise OptionError(
        f"Cannot tell the token width of {type(model).__name__} (no `inner_dim` attribute, no "
        "num_attention_heads / attention_head_dim in its config). Pass `channels`."
    )


def _patch_size(value: Any, model: str) -> int | tuple[int, ...]:
    """The config's ``patch_size``: an int (2-D latents) or a ``(p_t, p_h, p_w)`` triple (video, Wan)."""
    if value is None:
        return 1
    if isinstance(value, (list, tuple)):
        if len(value) != 3 or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in value
        ):
            raise OptionError(
                f"Expected the config's `patch_size` of {model} to be an int or a (p_t, p_h, p_w) triple of ints "
                f">= 1 (Wan: (1, 2, 2)), but got {value!r}."
            )
        return tuple(int(p) for p in value)
    return int(value)


def _image_stream(output: Any, num_image_tokens: int, block: str) -> torch.Tensor:
    """The image tokens ``(B, N_img, C)`` of a block's output (see the module docstring's table)."""
    tokens = output[-1] if isinstance(output, (tuple, list)) else output
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] < num_image_tokens:
        what = shape_str(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ShapeError(
            f"Expected block {block!r} to return image tokens (B, N, C) with N >= {num_image_tokens} (the patch "
            f"grid of `hidden_states`), or a tuple ending with them, but got {what}. Check `grid_size`, or read "
            "another block.",
            name=block,
            expected=num_image_tokens,
            actual=what,
        )
    if tokens.shape[1] > num_image_tokens:  # one joint sequence [txt; img]: keep the image tokens
        tokens = tokens[:, tokens.shape[1] - num_image_tokens :]
    return tokens


class TransformerFeatureExtractor(nn.Module):
    r"""Image-stream hidden states of a diffusers transformer at chosen blocks, as ``(B, C, h, w)`` maps.

    ``extractor(hidden_states, grid_size=None, **model_kwargs)`` calls
    ``model(hidden_states, **model_kwargs)`` (the keyword arguments the model itself takes: SD3
    ``encoder_hidden_states``, ``pooled_projections``, ``timestep`` = σ·1000; FLUX also ``img_ids``,
    ``txt_ids``, ``guidance`` and ``timestep`` = σ; Wan ``encoder_hidden_states`` and ``timestep`` = σ·1000),
    stops it after the last requested block and returns ``{block name: (B, C, h, w)}`` in execution order, with
    ``(h, w)`` the patch grid (Wan's video latents: ``(B, C, f, h, w)``, see the module docstring).
    ``timestep`` and ``guidance`` may be numbers, ``()``, ``(1,)`` or ``(B,)`` tensors (expanded to ``(B,)``;
    Wan 2.2 TI2V's per-token ``(B, N)`` timesteps are refused).

    Dtypes: ``hidden_states``, ``encoder_hidden_states`` and ``pooled_projections`` are cast to the model's
    dtype (:attr:`compute_dtype`), as a diffusers pipeline does, so a bf16 sample works with a float32
    teacher; the gradient flows back to the input in its own dtype. Features come in the dtype the blocks
    produce.

    Args:
        model: the transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``QwenImageTransformer2DModel``,
            ``WanTransformer3DModel`` or any module whose ``forward(hidden_states, **kwargs)`` runs the blocks of ``block_lists``),
            possibly wrapped in DDP / ``torch.compile``; it may carry LoRA adapters.
        blocks: the blocks to read: an index in execution order (negative counts from the end), a module name
            such as ``"single_transformer_blocks.0"``, or a sequence of them (distinct).
        block_lists: attribute names of the model's ``nn.ModuleList`` s of blocks in execution order
            (default None: ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, those present).
        backbone: ``"shared"`` (default: held by reference, not registered), ``"own"`` or ``"copy"``.
        trainable: ``True`` / ``False`` set ``requires_grad`` of an ``"own"`` / ``"copy"`` model (``False``
            also keeps it in eval mode); None (default) leaves it as it is. Must be None for ``"shared"``.
        gradient_checkpointing: recompute each block in the backward pass (non-reentrant
            ``torch.utils.checkpoint``) through the model's own checkpointing loop; needs a model with
            ``gradient_checkpointing`` support (every diffusers transformer). ``True`` / ``False`` (default)
            apply during the extractor's call only (the owner's setting is restored after it); ``None``
            leaves the model's own setting and checkpointing function in force, e.g. a
            :class:`~diffdistill.students.SharedBase` whose checkpointing recomputes each block under the
            adapter it ran with. ``True`` on a SharedBase's model uses the base's checkpoint function when
            ``base.enable_gradient_checkpointing()`` installed it (the same recomputation), and is refused
            (OptionError at the call) while a LoRA adapter is active without it: torch's plain checkpoint would
            recompute the blocks under the adapter active at backward time. The supported route there is
            ``None`` plus ``base.enable_gradient_checkpointing()``.
        channels: the token width ``C`` (default None: the model's ``inner_dim``, or
            ``num_attention_heads * attention_head_dim`` of its config).

    Attributes:
        blocks: the block names read, in execution order.
        channels: ``{block name: C}``.
        patch_size: the config's ``patch_size``: an int (the stride of the feature maps for a ``(B, C, H, W)``
            input) or, for a video model, the ``(p_t, p_h, p_w)`` tuple (Wan: ``(1, 2, 2)``).

    Raises:
        DTypeError: ``model`` is not a module; ``blocks`` / ``block_lists`` have the wrong types; a flag is not
            a bool.
        OptionError: a block index / name does not exist or repeats; ``backbone`` is unknown; ``trainable``
            is set with ``"shared"``; ``gradient_checkpointing`` on a model without support; the width cannot
            be found.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        ...     pooled_projection_dim=16, pos_embed_max_size=16).requires_grad_(False)
        >>> ext = TransformerFeatureExtractor(sd3, blocks=(0, "transformer_blocks.1"))
        >>> x = torch.randn(2, 4, 8, 12, requires_grad=True)
        >>> feats = ext(x, timestep=torch.tensor([250.0, 750.0]), encoder_hidden_states=torch.randn(2, 5, 16),
        ...             pooled_projections=torch.randn(2, 16))
        >>> {k: tuple(v.shape) for k, v in feats.items()}  # 8x12 latents, patch 2: a 4x6 grid of 16-wide tokens
        {'transformer_blocks.0': (2, 16, 4, 6), 'transformer_blocks.1': (2, 16, 4, 6)}
        >>> feats["transformer_blocks.1"].sum().backward(); x.grad.shape
        torch.Size([2, 4, 8, 12])
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: int | str | Sequence[int | str],
        *,
        block_lists: Sequence[str] | None = None,
        backbone: BackboneMode = "shared",
        trainable: bool | None = None,
        gradient_checkpointing: bool | None = False,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        check_module(model, "model")
        check_option(backbone, "backbone", _BACKBONE_MODES)
        check_bool(trainable, "trainable", allow_none=True)
        check_bool(gradient_checkpointing, "gradient_checkpointing", allow_none=True)
        channels = check_optional_int(channels, "channels", minimum=1)
        if backbone == "shared" and trainable is not None:
            raise OptionError(
                "A `backbone='shared'` model belongs to its owner, so `trainable` must be None; set requires_grad "
                "on the model itself (e.g. only its LoRA adapters) or use backbone='own'."
            )
        net: Any = unwrap_model(model)
        lists = check_block_lists(block_lists)
        names = transformer_block_names(net, lists)
        self.block_lists = tuple(name for name, _ in block_lists_of(net, lists))
        self.blocks = _resolve_blocks(blocks, names)
        self._all_blocks = names
        if gradient_checkpointing and not hasattr(net, "gradient_checkpointing"):
            raise OptionError(
                f"`gradient_checkpointing=True` needs a model with diffusers' gradient checkpointing loop, but "
                f"{type(net).__name__} has no `gradient_checkpointing` attribute. Pass gradient_checkpointing=False."
            )
        self.gradient_checkpointing = gradient_checkpointing
        width = _model_width(net, channels)
        self.channels = {name: width for name in self.blocks}
        cfg = _config(net)
        self.patch_size = _patch_size(cfg.get("patch_size"), type(net).__name__)
        self.in_channels = cfg.get("in_channels")
        self.backbone_mode = backbone
        if backbone == "copy":
            net = copy.deepcopy(net)
        if backbone == "shared":
            self._shared: tuple[nn.Module, ...] = (net,)
        else:
            self._shared = ()
            self.model = net
            if trainable is not None:
                net.requires_grad_(bool(trainable))
                if not trainable:
                    net.eval()
        self._frozen = trainable is False
        last = names.index(self.blocks[-1])
        self._stop_name = names[last + 1] if last + 1 < len(names) else None
        logger.debug("TransformerFeatureExtractor: blocks=%s, stop before %s", self.blocks, self._stop_name)

    # ----------------------------------------------------------------------------------------- access
    @property
    def trunk(self) -> Any:
        """The transformer this extractor runs (registered or shared)."""
        return self._shared[0] if self._shared else self.model

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: that of the model's first floating parameter (read at each call)."""
        for p in self.trunk.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def train(self, mode: bool = True) -> TransformerFeatureExtractor:
        """Set training mode; a frozen (``trainable=False``) model stays in eval mode.

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
            self.model.eval()
        return self

    def _module(self, name: str) -> nn.Module:
        return self.trunk.get_submodule(name)

    # ----------------------------------------------------------------------------------------- checks
    def _check_sample(self, sample: Any, name: str = "sample") -> torch.Tensor:
        """Static checks of a model input: floating ``(B, C_in, H, W)`` (SD3), packed ``(B, L, C_in)`` (FLUX) or
        video ``(B, C_in, F, H, W)`` (Wan)."""
        video = isinstance(self.patch_size, tuple)
        if not video and isinstance(sample, torch.Tensor) and sample.ndim == 5:
            raise ShapeError(
                f"Expected `{name}` laid out as (B, C, H, W) or packed (B, L, C): video latents (B, C, F, H, W) need a "
                f"model with a 3-D patch size (p_t, p_h, p_w) such as Wan, but this model's is {self.patch_size}; got "
                f"shape {shape_str(sample.shape)}.",
                name=name,
                expected=4,
                actual=tuple(sample.shape),
            )
        if video and isinstance(sample, torch.Tensor) and sample.ndim != 5:
            raise ShapeError(
                f"Expected `{name}` to be video latents (B, C, F, H, W): the model's patch size {self.patch_size} is "
                f"3-D (a video transformer such as Wan), but got shape {shape_str(sample.shape)}. Add the frame axis "
                "(x.unsqueeze(2) for one frame).",
                name=name,
                expected=5,
                actual=tuple(sample.shape),
            )
        layout = "(B, C, F, H, W)" if video else "(B, C, H, W) or packed (B, L, C)"
        check_float_input(sample, name, ndim=5 if video else (3, 4), layout=layout, finite=False)
        if isinstance(self.in_channels, int):
            dim = 2 if sample.ndim == 3 else 1
            if sample.shape[dim] != self.in_channels:
                layout = {3: "packed (B, L, C)", 4: "(B, C, H, W)", 5: "(B, C, F, H, W)"}[sample.ndim]
                raise ShapeError(
                    f"Expected `{name}` laid out as {layout} to have the model's {self.in_channels} input channels in dim "
                    f"{dim}, but got shape {shape_str(sample.shape)}. FLUX takes packed 2x2 patches: "
                    "(B, h*w/4, 4*C_latent).",
                    name=name,
                    expected=self.in_channels,
                    actual=tuple(sample.shape),
                )
        return sample

    def _grid(self, sample: torch.Tensor, grid_size: Any, name: str) -> tuple[int, ...]:
        """The patch grid: ``(h, w)`` of a 2-D input, ``(f, h, w)`` of a video input."""
        if sample.ndim in (4, 5):
            patch = (self.patch_size,) * 2 if isinstance(self.patch_size, int) else self.patch_size
            sizes = tuple(sample.shape[2:])
            if any(n % p for n, p in zip(sizes, patch)):
                what = "frames, height and width" if sample.ndim == 5 else "height and width"
                raise ShapeError(
                    f"Expected the {what} of `{name}` to be multiples of the patch size {self.patch_size}, but got "
                    f"shape {shape_str(sample.shape)}.",
                    name=name,
                    expected=patch,
                    actual=tuple(sample.shape),
                )
            grid = tuple(n // p for n, p in zip(sizes, patch))
            if grid_size is not None and tuple(grid_size) != grid:
                raise ShapeError(
                    f"Expected `grid_size` to be None or {grid} for `{name}` of shape {shape_str(sample.shape)} and "
                    f"patch size {self.patch_size}, but got {grid_size!r}.",
                    name="grid_size",
                    expected=grid,
                    actual=grid_size,
                )
            return grid
        if grid_size is None:
            raise OptionError(
                f"`{name}` is a packed token sequence {shape_str(sample.shape)}, whose patch grid cannot be read off "
                "its shape: pass grid_size=(h, w) with h * w tokens (FLUX: latent height / 2, latent width / 2)."
            )
        if not isinstance(grid_size, Sequence) or len(grid_size) != 2:
            raise DTypeError(f"Expected `grid_size` to be a pair (h, w) of ints, but got {grid_size!r}.")
        h = check_int(grid_size[0], "grid_size[0]", minimum=1)
        w = check_int(grid_size[1], "grid_size[1]", minimum=1)
        if h * w != sample.shape[1]:
            raise ShapeError(
                f"Expected `grid_size` (h, w) with h * w equal to the {sample.shape[1]} tokens of `{name}`, but got "
                f"{(h, w)} ({h * w} tokens).",
                name="grid_size",
                expected=sample.shape[1],
                actual=(h, w),
            )
        return h, w

    def _prepare_kwargs(
        self, batch: int, device: torch.device, kwargs: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        """Static checks and casts of the conditions the extractor knows; returns tensors for the value check."""
        named: list[tuple[str, Any]] = []
        dtype = self.compute_dtype
        for key in ("timestep", "guidance"):
            if kwargs.get(key) is not None:
                kwargs[key] = timestep_batch(kwargs[key], batch, device, key)
                named.append((key, kwargs[key]))
        for key, ndim, layout in (
            ("encoder_hidden_states", 3, "(B, L, D)"),
            ("pooled_projections", 2, "(B, D)"),
            ("encoder_hidden_states_image", 3, "(B, L, D)"),  # Wan image-to-video
        ):
            value = kwargs.get(key)
            if value is None:
                continue
            check_float_input(value, key, ndim=ndim, layout=layout, finite=False)
            if value.shape[0] != batch:
                raise ShapeError(
                    f"Expected `{key}` laid out as {layout} to have the batch size of `hidden_states` ({batch}) in "
                    f"dim 0, but got shape {shape_str(value.shape)}. Pass one entry per sample.",
                    name=key,
                    expected=batch,
                    actual=tuple(value.shape),
                )
            named.append((key, value))
            kwargs[key] = value.to(dtype)
        return named

    # ----------------------------------------------------------------------------------------- forward
    def _checkpoint_func(self, model: nn.Module) -> Callable[..., Any] | None:
        """With ``gradient_checkpointing=True`` on a :class:`~diffdistill.students.SharedBase`'s model: the base's
        own checkpoint (it recomputes each block under the adapter that was active in its forward pass), if
        ``base.enable_gradient_checkpointing()`` installed it; else None for torch's plain checkpoint, refused
        while a LoRA adapter is active (its blocks would be recomputed under whatever adapter is active at
        backward time: none, once a SharedBase view has returned)."""
        from ..students.shared_base import _AdapterCheckpoint

        func = vars(model).get("_gradient_checkpointing_func")
        if isinstance(func, _AdapterCheckpoint):
            return func
        active = [
            name
            for name, m in model.named_modules()
            if getattr(m, "lora_A", None) and getattr(m, "_disable_adapters", True) is False
        ]
        if active:
            raise OptionError(
                f"`gradient_checkpointing=True` recomputes the model's blocks in the backward pass with torch's plain "
                f"checkpoint, but a LoRA adapter is active in this call ({active[0]!r}, e.g. inside a SharedBase "
                "view or `with base.active(name):`): the recomputation would run under whatever adapter is active at "
                "backward time (a SharedBase switches it off when the call returns). Build the extractor / "
                "discriminator with gradient_checkpointing=None and switch checkpointing on where the adapters are "
                "managed: base.enable_gradient_checkpointing() for a SharedBase (each block is then recomputed under "
                "the adapter it ran with), or model.enable_gradient_checkpointing() for a model whose adapter never "
                "changes."
            )
        return None

    @contextlib.contextmanager
    def _hooks(self, store: dict[str, Any]) -> Iterator[None]:
        """Readout hooks, the early-exit pre-hook and the checkpointing switch, removed / restored on exit."""
        model = self.trunk
        shared_checkpoint = self._checkpoint_func(model) if self.gradient_checkpointing else None
        handles = []

        def save(name: str) -> Callable[..., None]:
            # A known joint block: its image-stream element, looked up here, not in the hook: a hook runs inside a
            # compiled block's graph, where dynamo cannot iterate over a class's MRO (a graph break per block).
            index = image_stream_index(self._module(name))

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                known = index is not None and isinstance(output, (tuple, list)) and len(output) > index
                store[name] = output[index] if known else output

            return hook

        def stop(module: nn.Module, args: Any) -> None:
            raise _EarlyExit

        for name in self.blocks:
            handles.append(self._module(name).register_forward_hook(save(name)))
        stop_module = self._module(self._stop_name) if self._stop_name else getattr(model, "norm_out", None)
        if isinstance(stop_module, nn.Module):
            handles.append(stop_module.register_forward_pre_hook(stop, prepend=True))  # before FSDP's unshard
        # None: the owner's checkpointing setting stays in force (nothing to set or restore).
        has_flag = hasattr(model, "gradient_checkpointing") and self.gradient_checkpointing is not None
        saved_flag = getattr(model, "gradient_checkpointing", None)
        has_func = "_gradient_checkpointing_func" in vars(model)
        saved_func = vars(model).get("_gradient_checkpointing_func")

        def run_checkpointed(block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if block is stop_module:  # stop before entering the checkpoint
                raise _EarlyExit
            if shared_checkpoint is not None:  # a SharedBase's: the block's adapter travels with it
                return shared_checkpoint(block, *args, **kwargs)
            return checkpoint(block, *args, use_reentrant=False, **kwargs)

        try:
            if has_flag:
                model.gradient_checkpointing = self.gradient_checkpointing
                if self.gradient_checkpointing:
                    model._gradient_checkpointing_func = run_checkpointed
            yield
        finally:
            for handle in handles:
                handle.remove()
            if has_flag:
                model.gradient_checkpointing = saved_flag
                if has_func:
                    model._gradient_checkpointing_func = saved_func
                elif "_gradient_checkpointing_func" in vars(model):
                    del model._gradient_checkpointing_func

    def forward(
        self, hidden_states: torch.Tensor, *, grid_size: Sequence[int] | None = None, **model_kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Run the model up to the last requested block and return the image-stream feature maps.

        Args:
            hidden_states: the model's input: latents ``(B, C_in, H, W)`` (SD3), packed tokens
                ``(B, L, C_in)`` (FLUX) or video latents ``(B, C_in, F, H, W)`` (Wan), any floating dtype (cast to
                the model's).
            grid_size: the patch grid ``(h, w)``: None for a ``(B, C, H, W)`` input (then ``(H/p, W/p)``) or a
                video input (then ``(F/p_t, H/p_h, W/p_w)``; a given value must equal it), required for packed
                tokens (FLUX: half the latent height and width).
            **model_kwargs: the keyword arguments the model's ``forward`` takes (SD3: ``timestep``,
                ``encoder_hidden_states``, ``pooled_projections``; FLUX: also ``img_ids``, ``txt_ids``,
                ``guidance``; Wan: ``timestep``, ``encoder_hidden_states``, ``encoder_hidden_states_image``;
                ``joint_attention_kwargs`` ...), passed through.

        Returns:
            ``{block name: (B, C, h, w)}`` (video: ``(B, C, f, h, w)``) for :attr:`blocks`, in execution order.

        Raises:
            DTypeError: ``hidden_states`` or a text condition is not a floating tensor; ``timestep`` /
                ``guidance`` is not a number or a real tensor; ``grid_size`` is not a pair of ints.
            ShapeError: ``hidden_states`` is not 3-D / 4-D / 5-D, is 5-D for a model with a 2-D patch (or not
                5-D for a video model), has other input channels or a size that is not a multiple of the patch
                size; ``grid_size`` does not match the tokens; a condition has another batch size; ``timestep``
                is not one value per sample; a block returns no image tokens of the grid's size.
            OptionError: ``grid_size`` is missing for packed tokens, or ``gradient_checkpointing=True`` meets an
                active LoRA adapter without a SharedBase's checkpoint function (see the class's Args).
            NonFiniteError: an input holds NaN / Inf (a value check).
        """
        sample = self._check_sample(hidden_states, "hidden_states")
        batch = sample.shape[0]
        grid = self._grid(sample, grid_size, "hidden_states")
        kwargs = dict(model_kwargs)
        named = self._prepare_kwargs(batch, sample.device, kwargs)
        check_all_finite([("hidden_states", sample), *named])
        store: dict[str, Any] = {}
        # _EarlyExit is raised before the first module after the last readout block runs (early exit).
        with self._hooks(store), contextlib.suppress(_EarlyExit):
            self.trunk(sample.to(self.compute_dtype), **kwargs)
        out = {}
        for name in self.blocks:
            tokens = _image_stream(store.get(name), math.prod(grid), name)
            out[name] = tokens.unflatten(1, grid).movedim(-1, 1)
        return out

    def extra_repr(self) -> str:
        return f"blocks={list(self.blocks)}, backbone={self.backbone_mode!r}"
