"""LoRA students through peft, their teacher view, adapter files, and the LCM guidance-scale embedding.

LCM-LoRA (Luo et al. 2023, arXiv:2311.05556) and the diffusers ``train_lcm_distill_lora_sdxl.py``
script train a LoRA on the teacher UNet; the teacher is the *same* UNet with its adapters disabled,
so one copy of the weights serves both. SDXL-Lightning (Lin et al. 2024, arXiv:2402.13929) trains its
LoRAs on "all conv/linear layers except conv_in/conv_out and the shared time-embedding linears",
which is the :data:`LCM_LORA_TARGETS` list. The full (non-LoRA) LCM student takes the guidance scale
``w`` through ``time_cond_proj_dim`` (:func:`add_guidance_embedding`, :func:`guidance_scale_embedding`).

A LoRA student with a guidance embedding (a ``w``-conditioned LCM-LoRA) works in either order: the embedding
that :func:`add_guidance_embedding` adds is marked as trained *with* the adapters, so
``add_lora(freeze_base=True)`` keeps it trainable (it would otherwise stay a frozen zero matrix and never
learn), and :func:`lora_state_dict`, :func:`save_lora` and :func:`load_lora` carry its weight
(``time_embedding.cond_proj.weight``) beside the adapter's.

peft and safetensors are imported inside the functions (``pip install 'diffdistill[train]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_float_input,
    check_generator,
    check_int,
    check_module,
    check_option,
    check_real,
)
from .._modules import unwrap_model

__all__ = [
    "FLOW_LORA_TARGETS",
    "LCM_LORA_TARGETS",
    "QWEN_IMAGE_LORA_TARGETS",
    "WAN_LORA_TARGETS",
    "TeacherView",
    "adapters_disabled",
    "add_guidance_embedding",
    "add_lora",
    "guidance_scale_embedding",
    "load_lora",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
]

logger = logging.getLogger(__name__)

LCM_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""The 14 module-name suffixes of diffusers' LCM-LoRA SDXL script and DMD2: attention q/k/v/out, the
transformer ``proj_in``/``proj_out`` and feed-forward, every resnet conv / shortcut / time projection and
the down/up-sampler convs. Not targeted: ``conv_in``, ``conv_out``, ``time_embedding.linear_1/2`` and
SDXL's ``add_embedding`` linears."""

FLOW_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
"""The 12 module-name suffixes of the default ``target_modules`` of diffusers' ``train_dreambooth_lora_flux.py``
for SD3 / FLUX transformers: attention q/k/v/out of the image and text streams and both feed-forwards (FLUX's
single-stream blocks get their ``attn.to_q/k/v``). They match no module of Wan's transformer (its attentions
are ``attn1`` / ``attn2``): use :data:`WAN_LORA_TARGETS` there, and :data:`QWEN_IMAGE_LORA_TARGETS` for Qwen-Image
(whose feed-forwards are ``img_mlp`` / ``txt_mlp``)."""

QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = (
    *FLOW_LORA_TARGETS[:8],
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
"""The 12 module-name suffixes of :data:`FLOW_LORA_TARGETS` on ``QwenImageTransformer2DModel``'s double-stream
blocks: attention q/k/v/out of the image and text streams (``attn.to_*`` / ``attn.add_*_proj`` / ``attn.to_add_out``)
and both feed-forwards (``img_mlp`` / ``txt_mlp``). Our choice: the attention + feed-forward set of the SD3 / FLUX
LoRAs; diffusers' ``train_dreambooth_lora_qwen_image.py`` targets the four image-stream attention projections
(``to_k``, ``to_q``, ``to_v``, ``to_out.0``) by default."""

WAN_LORA_TARGETS: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
"""The 8 module-name suffixes of the Wan LoRA examples of finetrainers, the diffusers team's video trainer
(``--target_modules "blocks.*(to_q|to_k|to_v|to_out.0)"``, a-r-r-o-w/finetrainers
``examples/training/sft/wan/crush_smol_lora/train.sh``): q/k/v/out of every ``WanTransformerBlock``'s
self-attention (``attn1``) and cross-attention (``attn2``); diffusers ships no Wan LoRA training script of its own.
DiffSynth-Studio's Wan default (``--lora_target_modules "q,k,v,o,ffn.0,ffn.2"``, ``examples/wanvideo/
train_wan_t2v.py``) also adapts the feed-forward: add ``"ffn.net.0.proj"`` and ``"ffn.net.2"`` (its ``ffn.0`` /
``ffn.2`` under diffusers' names). Wan 2.1 image-to-video's ``attn2.add_k_proj`` / ``add_v_proj`` (the image
tokens' keys and values) are in neither set."""

_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Set on modules that are trained together with the adapters although they are not LoRA layers (the guidance
# embedding of add_guidance_embedding): add_lora(freeze_base=True) keeps them trainable and the adapter files
# carry their weights. An attribute of the module survives deepcopy and DDP / FSDP / compile wrappers.
_TRAINED_WITH_ADAPTERS = "_diffdistill_trained_with_adapters"
# Name components that wrappers insert into module names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# peft's adapter weight names: "<module>.lora_A.<adapter>.weight" in the model, "<module>.lora_A.weight" in files.
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.")
_LORA_EMBEDDING = re.compile(r"\.(lora_embedding_A|lora_embedding_B)$")


def _peft(what: str) -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is installed in dev environments
        raise ImportError(f"`{what}` requires `peft`: pip install 'diffdistill[train]'") from err
    return peft


def _tuner_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft tuner layer (typed ``Any``: peft's layer API is dynamic)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, BaseTunerLayer)]


def _clean(name: str) -> str:
    """A module or parameter name without the components wrappers insert (the name in a state dict)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _trained_with_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules marked as trained with the adapters (the guidance embedding)."""
    return [
        (_clean(n), m)
        for n, m in unwrap_model(model).named_modules()
        if getattr(m, _TRAINED_WITH_ADAPTERS, False)
    ]


def _check_adapter_name(adapter_name: Any) -> str:
    if not isinstance(adapter_name, str):
        raise DTypeError(
            f"Expected `adapter_name` to be a string, but got {type(adapter_name).__name__} {adapter_name!r}; e.g. "
            "adapter_name='default'."
        )
    if not adapter_name or "." in adapter_name:
        raise OptionError(
            f"Expected `adapter_name` to be a non-empty string without '.', but got {type(adapter_name).__name__} "
            f"{adapter_name!r}; e.g. adapter_name='default'."
        )
    return adapter_name


def _check_targets(targets: Any, inner: nn.Module) -> list[str]:
    """``targets`` as a list of suffixes, at least one of which names a module of ``inner`` (peft's rule)."""
    if isinstance(targets, str):
        targets = [targets]  # list("to_q") would be its characters
    if not isinstance(targets, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in targets):
        raise DTypeError(
            f"Expected `targets` to be a module-name suffix or a list of them (str), but got "
            f"{type(targets).__name__} {targets!r}; e.g. targets=['to_q', 'to_k', 'to_v', 'to_out.0']."
        )
    targets = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if not targets:
        raise OptionError(
            "Expected `targets` to name at least one module suffix, but it is empty. Pass e.g. "
            "LCM_LORA_TARGETS or ['to_q', 'to_k', 'to_v', 'to_out.0']."
        )
    names = [n for n, _ in inner.named_modules() if n]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise OptionError(
            f"Expected `targets` to match module names of {type(inner).__name__} (a target matches a name "
            f"equal to it or ending in '.<target>'), but none of {targets[:6]} does. Its modules include "
            f"{names[:6]}."
        )
    return targets


def add_lora(
    model: nn.Module,
    *,
    rank: int = 64,
    alpha: float | None = None,
    targets: Sequence[str] = LCM_LORA_TARGETS,
    adapter_name: str = "default",
    dropout: float = 0.0,
    freeze_base: bool = True,
    init_lora_weights: bool | str = True,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Add a peft LoRA adapter (``W + (alpha / rank) B A``) to ``model`` in place and return it.

    A guidance embedding added by :func:`add_guidance_embedding` (before or after this call) is trained with the
    adapter: ``freeze_base`` leaves it trainable and the adapter files carry it (see the module docstring).

    Args:
        model: A diffusers model (its ``add_adapter`` is used, so diffusers' LoRA APIs work on it) or any
            ``nn.Module`` (peft ``inject_adapter_in_model``); wrappers are unwrapped.
        rank: LoRA rank ``r`` (a positive int; LCM-LoRA SDXL uses 64, the default).
        alpha: ``lora_alpha`` (> 0). Defaults to ``None``: ``alpha = rank``, a scale of 1 (LCM-LoRA SDXL uses
            r = alpha = 64).
        targets: Module-name suffixes to adapt (a module is adapted when its name equals a suffix or ends in
            ``".<suffix>"``; at least one must match). A single string is one suffix. Default
            :data:`LCM_LORA_TARGETS` (the SDXL UNet's LCM-LoRA set). On SD3 / FLUX / Qwen-Image / Wan transformers
            it matches only the image-stream attention, feed-forward and the final ``proj_out``, none of the text
            stream: pass :data:`FLOW_LORA_TARGETS`, :data:`QWEN_IMAGE_LORA_TARGETS` or :data:`WAN_LORA_TARGETS`
            (the diffusers training scripts' sets).
        adapter_name: peft adapter name (non-empty, no ``"."``), not yet used on ``model``.
        dropout: LoRA dropout probability in [0, 1) (default 0).
        freeze_base: Set ``requires_grad=False`` on every parameter that is neither this adapter's nor a
            guidance embedding's (those are set trainable). ``False`` leaves every flag as it is (the new
            adapter's weights are trainable).
        init_lora_weights: peft's option (default ``True``: ``B = 0``, so the model is unchanged at first;
            ``False``: random A and B; a peft init name such as ``"gaussian"``).
        adapter_dtype: Floating dtype of the adapter's weights where peft made them half precision (it follows
            the base layer: a bf16 / fp16 base gives bf16 / fp16 adapters, whose Adam updates mostly round away);
            default float32, the trainable weights in full precision as diffusers' training scripts keep them
            (``cast_training_params``). ``None`` keeps peft's dtype.

    Returns:
        ``model`` (the object passed in, its modules replaced in place by LoRA layers).

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``rank``, ``targets``, ``adapter_name``, ``freeze_base``,
            ``alpha`` or ``dropout`` has the wrong type.
        OptionError: ``rank`` < 1; ``alpha`` not > 0; ``dropout`` outside [0, 1); ``targets`` empty
            or matching no module; ``adapter_name`` empty, holding a ``"."`` or already used on ``model``;
            ``adapter_dtype`` not a floating torch dtype (or None).
        ImportError: peft is not installed.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> net = add_lora(net, rank=2, targets=["0"])
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.lora_A.default.weight', '0.lora_B.default.weight']
    """
    check_module(model, "model")
    peft = _peft("add_lora")
    rank = check_int(
        rank,
        "rank",
        minimum=1,
        hint=" Pass e.g. rank=64 (peft would truncate a float rank while alpha keeps it, so the scaling "
        "alpha / rank changes).",
    )
    alpha_value = float(rank) if alpha is None else check_real(alpha, "alpha", low=0.0, strict=True)
    dropout = check_real(dropout, "dropout", low=0.0, high=1.0, high_strict=True)
    check_bool(freeze_base, "freeze_base")
    if adapter_dtype is not None and not (
        isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point
    ):
        raise OptionError(
            f"Expected `adapter_dtype` to be a floating torch dtype (default torch.float32) or None (peft's: the "
            f"base layer's dtype), but got {adapter_dtype!r}."
        )
    _check_adapter_name(adapter_name)
    inner: Any = unwrap_model(model)  # diffusers/peft attributes are dynamic
    target_list = _check_targets(targets, inner)
    existing = getattr(inner, "peft_config", None) or {}
    if adapter_name in existing:
        raise OptionError(
            f"Expected a new `adapter_name`, but {type(inner).__name__} already has an adapter {adapter_name!r} "
            f"(adapters: {sorted(existing)}). Pass another adapter_name, or load weights into the existing one "
            "with load_lora."
        )
    config = peft.LoraConfig(
        r=int(rank),
        lora_alpha=alpha_value,
        target_modules=target_list,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
    )
    if callable(getattr(inner, "add_adapter", None)) and hasattr(inner, "config"):
        inner.add_adapter(config, adapter_name=adapter_name)
    else:
        peft.inject_adapter_in_model(config, inner, adapter_name=adapter_name)
        configs = dict(getattr(inner, "peft_config", {}) or {})
        configs[adapter_name] = config
        inner.peft_config = configs
    if adapter_dtype is not None:
        for name, param in inner.named_parameters():
            if (
                "lora_" in name
                and f".{adapter_name}." in name
                and param.dtype in (torch.float16, torch.bfloat16)
            ):
                param.data = param.data.to(adapter_dtype)
    if freeze_base:
        for name, param in inner.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
            elif f".{adapter_name}." in name:
                param.requires_grad_(True)
        extras = _trained_with_adapters(inner)
        for _, module in extras:
            module.requires_grad_(True)
        if extras:
            logger.info("trained with the adapter (kept trainable): %s", [n for n, _ in extras])
    n_train = sum(p.numel() for n, p in inner.named_parameters() if "lora_" in n and f".{adapter_name}." in n)
    logger.info(
        "LoRA %r: rank %d, %d layer(s), %d parameters", adapter_name, rank, len(_tuner_layers(inner)), n_train
    )
    return model


def _require_adapters(layers: list[Any], model: nn.Module, what: str) -> None:
    if not layers:
        raise OptionError(
            f"Expected `model` ({type(unwrap_model(model)).__name__}) to have LoRA adapters for {what}, but it "
            "has none (never added, or removed by merge_lora): the 'teacher' would be the student itself. "
            "Keep a separate frozen copy of the teacher for a full (or merged) student."
        )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` runs without its LoRA adapters (the LCM-LoRA teacher).

    The adapters' ``requires_grad`` flags are restored on exit (peft's ``enable_adapters`` would reset
    them), and so is each layer's enabled state. A guidance embedding (:func:`add_guidance_embedding`) is not
    a LoRA layer and stays active: call the teacher without ``timestep_cond``.

    Args:
        model: A model with LoRA layers (:func:`add_lora`, or diffusers' ``load_lora_adapter``); wrappers are
            unwrapped.

    Yields:
        ``model`` itself, with its adapters disabled inside the block.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``.
        OptionError: ``model`` has no LoRA layers (e.g. after :func:`merge_lora`), so it would run unchanged
            as its own "teacher".

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> _ = torch.nn.init.ones_(net[0].lora_B["default"].weight)
        >>> x = torch.randn(3, 2)
        >>> with adapters_disabled(net):
        ...     torch.allclose(net(x), x @ net[0].base_layer.weight.T + net[0].base_layer.bias)
        True
    """
    check_module(model, "model")
    layers = [m for _, m in _tuner_layers(model)]
    _require_adapters(layers, model, "adapters_disabled")
    grads = {p: p.requires_grad for m in layers for p in m.parameters()}
    was_disabled = [bool(m.disable_adapters) for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield model
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, flag in grads.items():
            p.requires_grad_(flag)


class TeacherView:
    """The teacher of a LoRA student: the same model, run under ``torch.no_grad`` with adapters disabled.

    With ``grad=True`` the autograd graph is kept (the adapters stay disabled), as SIM / SiD need for the
    real score: their generator gradient flows through the teacher's *input*. The model's own parameters
    then receive gradients too, so step only the generator's optimiser (or freeze them).

    Not an ``nn.Module`` (it holds no weights of its own), so attaching it to a module does not register
    the model twice. ``TeacherView(unet)(x, t, **cond)`` returns what ``unet`` returns.

    Args:
        model: The LoRA student (it must have LoRA layers; wrappers are fine).
        grad: Keep the autograd graph (still only where grad mode is on). Default ``False``: run under
            ``torch.no_grad``.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``grad`` is not a bool.
        OptionError: ``model`` has no LoRA layers (e.g. after :func:`merge_lora`): the "teacher" would be the
            student itself.

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> teacher = TeacherView(net)
        >>> teacher(torch.randn(1, 2)).requires_grad
        False
        >>> TeacherView(net, grad=True)(torch.randn(1, 2, requires_grad=True)).requires_grad
        True
    """

    def __init__(self, model: nn.Module, *, grad: bool = False) -> None:
        check_module(model, "model")
        check_bool(grad, "grad")
        _require_adapters(_tuner_layers(model), model, "TeacherView")
        self.model = model
        self.grad = grad

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()), adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TeacherView({type(unwrap_model(self.model)).__name__})"


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights and remove every LoRA layer (peft ``merge_and_unload``).

    The returned model (the same object, unwrapped modules replaced in place) has the plain layer types
    again, computes what the adapter model computed, and no longer reports a peft config. Inactive adapters
    are dropped without being merged. A guidance embedding stays (it is a plain layer of the model).

    Args:
        model: A model with LoRA layers (wrappers are unwrapped); merged in place.

    Returns:
        ``model`` itself, without LoRA layers.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``.
        OptionError: ``model`` has no LoRA layers (never added, or merged already): nothing would be merged.
        ValueError: peft's safe merge found NaN / Inf in a merged weight (the base weights are left as they
            were).

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> _ = torch.nn.init.ones_(net[0].lora_B["default"].weight)
        >>> x = torch.randn(3, 2)
        >>> y = net(x)
        >>> merged = merge_lora(net)
        >>> type(merged[0]).__name__, torch.allclose(merged(x), y, atol=1e-6)
        ('Linear', True)
    """
    check_module(model, "model")
    inner: Any = unwrap_model(model)
    layers = _tuner_layers(inner)
    if not layers:
        raise OptionError(
            f"Expected `model` ({type(inner).__name__}) to have LoRA layers to merge, but it has none (never "
            "added, or merged already). Load the adapter first, e.g. merge_lora(load_lora(model, path))."
        )
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer.get_base_layer())
    if hasattr(inner, "peft_config"):
        with contextlib.suppress(AttributeError):
            del inner.peft_config
    if getattr(inner, "_hf_peft_config_loaded", False):
        inner._hf_peft_config_loaded = False
    logger.info("merged and removed %d LoRA layer(s)", len(layers))
    return model


def _lora_config(model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(unwrap_model(model), "peft_config", None) or {}
    if adapter_name not in configs:
        raise OptionError(
            f"Expected `adapter_name` to be one of {sorted(configs)}, but got {adapter_name!r}. "
            "Add the adapter with add_lora() first."
        )
    return configs[adapter_name]


def _n_adapter_layers(model: nn.Module, adapter_name: str) -> int:
    """How many LoRA layers of ``model`` hold ``adapter_name`` (one ``lora_A`` weight each)."""
    return sum(
        adapter_name in (getattr(m, "lora_A", None) or {})
        or adapter_name in (getattr(m, "lora_embedding_A", None) or {})
        for _, m in _tuner_layers(model)
    )


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft/diffusers form: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.

    The weights of a guidance embedding (:func:`add_guidance_embedding`), which trains with the adapters,
    come along under their model names (``time_embedding.cond_proj.weight``).

    Args:
        model: The model with the adapter (wrappers are unwrapped).
        adapter_name: Which adapter (default ``"default"``).
        state_dict: Take the values from this full state dict of ``model`` (same keys as
            ``model.state_dict()``) instead of the model's own tensors -- e.g. the gathered
            ``accelerator.get_state_dict(model)`` of a model sharded by FSDP, whose parameters are shards.
            Defaults to ``None``: the model's tensors (not copies).

    Returns:
        ``{key: tensor}``: two entries per adapted layer (``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``
        for a linear layer), plus the guidance embedding's weight when there is one.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``state_dict`` is not a mapping.
        OptionError: ``model`` has no adapter ``adapter_name``; ``state_dict`` lacks some of its weights
            (a state dict of another model, or of the model before :func:`add_lora`).
        ImportError: peft is not installed.

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> sorted(lora_state_dict(net))
        ['0.lora_A.weight', '0.lora_B.weight']
    """
    check_module(model, "model")
    peft = _peft("lora_state_dict")
    _lora_config(model, adapter_name)
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise DTypeError(
            f"Expected `state_dict` to be a mapping {{name: tensor}} (model.state_dict()), but got "
            f"{type(state_dict).__name__}."
        )
    inner = unwrap_model(model)
    out = dict(
        peft.get_peft_model_state_dict(
            inner, state_dict=None if state_dict is None else dict(state_dict), adapter_name=adapter_name
        )
    )
    expected = _n_adapter_layers(inner, adapter_name)
    got = sum(".lora_A." in k or k.endswith(".lora_A.weight") or "lora_embedding_A" in k for k in out)
    if got != expected:
        raise OptionError(
            f"Expected `state_dict` to hold the weights of adapter {adapter_name!r} ({expected} LoRA layers), but "
            f"it holds {got}. Pass the full state dict of this model after add_lora (model.state_dict(), or "
            "accelerator.get_state_dict(model) for a sharded model)."
        )
    for name, module in _trained_with_adapters(inner):
        for pname, param in module.named_parameters():
            key = f"{name}.{pname}"
            if state_dict is None:
                out[key] = param.detach()
            elif key in state_dict:
                out[key] = state_dict[key]
            else:
                raise OptionError(
                    f"Expected `state_dict` to hold `{key}` (a guidance embedding trained with the adapters), but "
                    "it does not. Pass the full state dict of this model (model.state_dict())."
                )
    return out


def _config_metadata(config: Any) -> dict[str, Any]:
    targets = config.target_modules
    return {
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "lora_dropout": float(config.lora_dropout),
        "bias": str(config.bias),
        "use_dora": bool(getattr(config, "use_dora", False)),
    }


def _check_path(path: Any, must_exist: bool) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise DTypeError(
            f"Expected `path` to be a file path (str or os.PathLike), but got {type(path).__name__}; e.g. "
            "path='out/pytorch_lora_weights.safetensors'."
        )
    text = os.fspath(path)
    if must_exist and not os.path.isfile(text):
        raise FileNotFoundError(
            f"Expected `path` to be an existing safetensors file, but {text!r} is not a file."
        )
    folder = os.path.dirname(text) or "."
    if not must_exist and not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Expected the folder of `path` to exist, but {folder!r} does not. Create it first "
            "(os.makedirs(folder, exist_ok=True))."
        )
    return text


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise DTypeError(
            f"Expected `prefix` to be a string ('unet', or '' for bare peft keys), but got {type(prefix).__name__}."
        )
    return f"{prefix}." if prefix else ""


def save_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    prefix: str = "unet",
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save an adapter as one safetensors file in diffusers' LoRA form.

    Keys are ``f"{prefix}.{module}.lora_A.weight"`` etc. and the file metadata holds the LoRA config under
    ``lora_adapter_metadata`` (keys ``f"{prefix}.r"``, ...), so ``unet.load_lora_adapter(folder,
    weight_name=..., prefix="unet")`` and ``pipe.load_lora_weights`` read it (rank *and* alpha), and
    :func:`load_lora` reads it back into any model. A guidance embedding trained with the adapters is saved
    too (``f"{prefix}.time_embedding.cond_proj.weight"``): :func:`load_lora` restores it (adding the layer to a
    UNet without one); diffusers' ``load_lora_adapter`` loads it into a UNet that has the layer
    (``time_cond_proj_dim`` in its config) and skips it otherwise.

    Args:
        model: The model with the adapter (wrappers are unwrapped).
        path: The ``.safetensors`` file to write (its folder must exist); overwritten if present.
        adapter_name: Which adapter (default ``"default"``).
        prefix: Key prefix (default ``"unet"``, as diffusers' SDXL / SD LoRA files); ``""`` writes bare peft
            keys.
        state_dict: The values to write, as for :func:`lora_state_dict` (a sharded model's gathered full state
            dict). Defaults to ``None``: the model's own tensors.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``path`` is not a path; ``prefix`` is not a string;
            ``state_dict`` is not a mapping.
        FileNotFoundError: the folder of ``path`` does not exist.
        OptionError: ``model`` has no adapter ``adapter_name``; ``state_dict`` lacks its weights.
        ImportError: peft is not installed.

    Example:
        >>> import tempfile, os
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_lora(net, os.path.join(d, "a.safetensors"))
        ...     fresh = load_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), os.path.join(d, "a.safetensors"))
        >>> type(fresh[0]).__name__
        'Linear'
    """
    from safetensors.torch import save_file

    check_module(model, "model")
    target = _check_path(path, must_exist=False)
    pre = _check_prefix(prefix)
    config = _lora_config(model, adapter_name)
    tensors = {
        pre + k: v.detach().contiguous().cpu()
        for k, v in lora_state_dict(model, adapter_name, state_dict=state_dict).items()
    }
    meta = {pre + k: v for k, v in _config_metadata(config).items()}
    save_file(tensors, target, metadata={"format": "pt", _META_KEY: json.dumps(meta, sort_keys=True)})
    logger.info("saved LoRA %r (%d tensors) to %s", adapter_name, len(tensors), target)


def _model_key(key: str, adapter_name: str) -> str | None:
    """The model's parameter name of a file key (the adapter name re-inserted), or None for another key."""
    if _LORA_PART.search(key):
        return _LORA_PART.sub(lambda m: f".{m.group(1)}.{adapter_name}.", key, count=1)
    if _LORA_EMBEDDING.search(key):
        return _LORA_EMBEDDING.sub(lambda m: f".{m.group(1)}.{adapter_name}", key, count=1)
    return None


def _check_adapter_shapes(
    inner: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str, path: str
) -> None:
    """Refuse file weights whose shapes differ from the adapter's (another rank or another architecture)."""
    params = {_clean(n): p for n, p in inner.named_parameters()}
    for key, value in state.items():
        name = _model_key(key, adapter_name)
        param = params.get(name) if name is not None else None
        if param is None or param.shape == value.shape:
            continue
        file_rank = ", ".join(
            str(r) for r in sorted({v.shape[0] for k, v in state.items() if ".lora_A." in k})
        )
        model_rank = ", ".join(
            str(r) for r in sorted({p.shape[0] for n, p in params.items() if f".lora_A.{adapter_name}." in n})
        )
        if ".lora_" in key and value.ndim == param.ndim and file_rank != model_rank:
            why = (
                f"the file holds a rank-{file_rank} adapter but the model's adapter {adapter_name!r} has "
                f"rank {model_rank}. Load it into a model without that adapter (it is then created with "
                "the file's rank and alpha) or pass another adapter_name."
            )
        else:
            why = (
                "the file was saved from a model of another architecture (its layer sizes differ). Load it into "
                "the model it was trained on."
            )
        raise ShapeError(
            f"Expected the weight `{key}` of {path} to have the shape of the model's `{name}` "
            f"{tuple(param.shape)}, but got {tuple(value.shape)}: {why}",
            name=key,
            expected=tuple(param.shape),
            actual=tuple(value.shape),
        )


def _load_extras(
    inner: Any, extras: Mapping[str, torch.Tensor], path: str, strict: bool, trainable: bool
) -> None:
    """Load the non-LoRA weights of a file (a guidance embedding) and mark their modules as trained with the
    adapters (``trainable``: also set them trainable, as add_lora does); a missing guidance embedding is added
    first."""
    guidance_key = "time_embedding.cond_proj.weight"
    params = {_clean(n): p for n, p in inner.named_parameters()}
    if guidance_key in extras and guidance_key not in params and extras[guidance_key].ndim == 2:
        add_guidance_embedding(inner, int(extras[guidance_key].shape[1]))
        params = {_clean(n): p for n, p in inner.named_parameters()}
    modules = {_clean(n): m for n, m in inner.named_modules()}
    for key, value in extras.items():
        param = params.get(key)
        if param is None:
            if strict:
                raise OptionError(
                    f"Expected the model to have `{key}` (a weight trained with the adapter in {path}), but it has "
                    "no such parameter. Load the file into the model it was trained on, or pass strict=False "
                    "to skip it."
                )
            logger.warning("load_lora: the model has no `%s`; that weight of %s is skipped", key, path)
            continue
        if param.shape != value.shape:
            raise ShapeError(
                f"Expected the weight `{key}` of {path} to have the shape of the model's {tuple(param.shape)}, but "
                f"got {tuple(value.shape)}: the file was saved from a model of another architecture (or another "
                "time_cond_proj_dim).",
                name=key,
                expected=tuple(param.shape),
                actual=tuple(value.shape),
            )
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        owner = modules.get(key.rpartition(".")[0])
        if owner is not None:
            setattr(owner, _TRAINED_WITH_ADAPTERS, True)
            if trainable:
                owner.requires_grad_(True)


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    prefix: str = "unet",
    strict: bool = True,
) -> nn.Module:
    """Load a :func:`save_lora` file (or a diffusers LoRA file with metadata) into ``model`` and return it.

    A missing adapter ``adapter_name`` is created first with the file's rank, alpha and targets (by
    :func:`add_lora`, which freezes the base weights); without metadata the rank is read from the ``lora_A``
    shapes and alpha defaults to the rank. A guidance embedding saved with the adapter is loaded too (and
    added first, with the file's ``time_cond_proj_dim``, to a UNet without one).

    Args:
        model: The model to load into (wrappers are unwrapped): the architecture the file was saved from.
        path: The ``.safetensors`` file.
        adapter_name: The adapter to load into (created when missing). Default ``"default"``.
        prefix: The key prefix the file was saved with (default ``"unet"``; ``""`` for bare peft keys).
        strict: Refuse a file whose adapter weights do not match the adapter's exactly (missing or unexpected
            layers). ``False`` loads the layers both have. Shapes must match either way.

    Returns:
        ``model`` (the object passed in) with the adapter's weights loaded.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``path`` is not a path; ``prefix`` or ``adapter_name``
            is not a string; ``strict`` is not a bool.
        FileNotFoundError: ``path`` is not a file.
        OptionError: ``path`` is not a safetensors file; the file has no key under ``prefix`` or no LoRA
            weight; (``strict``) some adapter weights are missing or unexpected, or the model lacks a saved
            non-LoRA weight.
        ShapeError: a weight of the file has another shape than the model's: an adapter of another rank
            already on the model, or a file saved from another architecture.
        OptionError: the adapter already on the model has another alpha than the file records (its update would
            be rescaled).
        ImportError: peft or safetensors is not installed.
    """
    check_module(model, "model")
    peft = _peft("load_lora")
    from safetensors import SafetensorError, safe_open

    source = _check_path(path, must_exist=True)
    pre = _check_prefix(prefix)
    _check_adapter_name(adapter_name)
    check_bool(strict, "strict")
    try:
        with safe_open(source, framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except SafetensorError as err:
        raise OptionError(
            f"Expected `path` to be a safetensors file, but {source!r} could not be read as one ({err}). Pass the "
            "file written by save_lora (or a diffusers LoRA .safetensors)."
        ) from err
    state = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
    if not state:
        raise OptionError(
            f"Expected keys starting with {pre!r} in {source}, but found {sorted(tensors)[:3]}. "
            "Pass the prefix it was saved with (prefix='' for bare peft keys)."
        )
    lora_state = {k: v for k, v in state.items() if "lora_" in k}
    extras = {k: v for k, v in state.items() if "lora_" not in k}
    ranks = {v.shape[0] for k, v in lora_state.items() if ".lora_A." in k}
    if not ranks:
        raise OptionError(
            f"Expected LoRA weights (`<module>.lora_A.weight`, ...) under {pre!r} in {source}, but found none "
            f"(keys: {sorted(state)[:3]}). Pass a LoRA file."
        )
    meta = json.loads(raw_meta) if raw_meta else {}
    meta = {k[len(pre) :]: v for k, v in meta.items() if k.startswith(pre)}
    inner: Any = unwrap_model(model)
    created = adapter_name not in (getattr(inner, "peft_config", None) or {})
    if created:
        rank = int(meta.get("r", max(ranks)))
        targets = meta.get("target_modules") or sorted(
            {k.split(".lora_A.")[0] for k in lora_state if ".lora_A." in k}
        )
        add_lora(
            inner,
            rank=rank,
            alpha=meta.get("lora_alpha", rank),
            targets=targets,
            adapter_name=adapter_name,
            dropout=float(meta.get("lora_dropout", 0.0)),
        )
    _check_adapter_shapes(inner, lora_state, adapter_name, source)
    if not created and "lora_alpha" in meta:
        _check_adapter_alpha(inner, float(meta["lora_alpha"]), adapter_name, source)
    result = peft.set_peft_model_state_dict(inner, lora_state, adapter_name=adapter_name)
    if strict:
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        missing = [
            k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k
        ]
        if unexpected or missing:
            raise OptionError(
                f"Expected the file to match adapter {adapter_name!r} exactly, but {len(missing)} weight(s) are "
                f"missing (e.g. {missing[:2]}) and {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
                "Check `prefix` and the targets, or pass strict=False."
            )
    _load_extras(inner, extras, source, strict, trainable=created)
    return model


def _check_adapter_alpha(model: nn.Module, alpha: float, adapter_name: str, source: str) -> None:
    """Refuse to load weights trained with LoRA alpha ``alpha`` into an existing adapter of another alpha: the
    update ``(alpha / r) B A`` would be rescaled silently (shapes cannot tell)."""
    config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    have = getattr(config, "lora_alpha", None)
    if have is None or math.isclose(float(have), alpha):
        return
    raise OptionError(
        f"Expected the file's LoRA alpha to match adapter {adapter_name!r}'s, but {source} was saved with alpha "
        f"{alpha:g} and the adapter has alpha {float(have):g}: its update (alpha / rank) B A would be scaled by "
        f"{float(have) / alpha:g}. Create the adapter with alpha {alpha:g} (e.g. --lora_alpha {alpha:g}), or load "
        "into a new adapter name (it is then created with the file's rank and alpha)."
    )


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales, as LCM's ``get_guidance_scale_embedding`` (``w`` · 1000).

    .. math:: e(w) = [\\sin(1000 w f_k), \\cos(1000 w f_k)]_k,\\quad f_k = 10000^{-k/(d/2 - 1)}

    Args:
        w: ``(B,)`` guidance scales, floating point (e.g. ``torch.tensor([7.5])``).
        embedding_dim: ``d`` (the UNet's ``time_cond_proj_dim``), an int >= 4; odd sizes are zero-padded.
            Default 256 (LCM).
        dtype: Floating dtype of the computation and the result (default float32, as diffusers).

    Returns:
        ``(B, embedding_dim)`` embedding on ``w``'s device, passed as ``unet(..., timestep_cond=...)``.

    Raises:
        DTypeError: ``w`` is not a floating-point tensor; ``embedding_dim`` is not an int; ``dtype`` is not a
            floating torch dtype.
        ShapeError: ``w`` is not 1-D or is empty.
        OptionError: ``embedding_dim < 4``.
        NonFiniteError: ``w`` holds NaN or Inf (a value check).

    Example:
        >>> guidance_scale_embedding(torch.tensor([0.0, 7.5]), 8).shape
        torch.Size([2, 8])
    """
    check_float_input(w, "w", ndim=1, layout="(B,)")
    embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=4)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(
            f"Expected `dtype` to be a floating torch dtype (torch.float32, torch.bfloat16, ...), but got {dtype!r}."
        )
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]  # scaled in w's dtype first, as diffusers
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def add_guidance_embedding(
    unet: nn.Module,
    time_cond_proj_dim: int = 256,
    *,
    init: str = "zeros",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Give a diffusers UNet a guidance-scale input: ``time_embedding.cond_proj`` and ``time_cond_proj_dim``.

    diffusers' ``TimestepEmbedding`` adds ``cond_proj(timestep_cond)`` to the sinusoidal time features
    when ``timestep_cond`` is passed. ``init="zeros"`` keeps the teacher's output exactly (the LCM student
    starts as the teacher); ``init="uniform"`` is ``nn.Linear``'s default, what the full LCM script gets
    from ``from_config`` (LCM issue #45: random init). The config is updated, so ``save_pretrained`` /
    ``from_config`` rebuild the same layer.

    With LoRA, the order does not matter: the new layer is marked as trained with the adapters, so
    :func:`add_lora` with ``freeze_base=True`` (before or after this call) leaves it trainable -- a frozen zero
    layer would never learn -- and :func:`lora_state_dict` / :func:`save_lora` / :func:`load_lora` carry its
    weight. The teacher view of such a student (:class:`TeacherView`) disables the adapters but not this layer:
    call the teacher without ``timestep_cond``.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (or a model with ``time_embedding.linear_1``); wrappers are
            unwrapped. Modified in place.
        time_cond_proj_dim: Width of the guidance embedding (an int >= 1; LCM: 256), the ``embedding_dim`` of
            :func:`guidance_scale_embedding`.
        init: ``"zeros"`` (default: the output is unchanged at first) or ``"uniform"`` (``nn.Linear``'s init).
        generator: Random source of ``init="uniform"`` (on the weight's device). Defaults to ``None``: torch's
            global generator. Unused for ``"zeros"``.

    Returns:
        ``unet`` (the object passed in), with ``time_embedding.cond_proj`` (a bias-free ``nn.Linear`` in the
        time embedding's dtype and device, trainable) and ``config.time_cond_proj_dim`` set.

    Raises:
        DTypeError: ``unet`` is not an ``nn.Module``; ``time_cond_proj_dim`` is not an int; ``generator`` is
            not a ``torch.Generator``.
        OptionError: ``time_cond_proj_dim < 1``; an unknown ``init``; ``unet`` has no
            ``time_embedding.linear_1`` or already has a guidance embedding.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8, mid_block_type=None)
        >>> x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 2, 8)
        >>> before = unet(x, t, c).sample
        >>> unet = add_guidance_embedding(unet, 16)
        >>> after = unet(x, t, c, timestep_cond=guidance_scale_embedding(torch.tensor([7.5]), 16)).sample
        >>> unet.config.time_cond_proj_dim, torch.allclose(before, after)
        (16, True)
    """
    check_module(unet, "unet")
    time_cond_proj_dim = check_int(time_cond_proj_dim, "time_cond_proj_dim", minimum=1)
    check_option(init, "init", ["zeros", "uniform"])
    check_generator(generator)
    inner: Any = unwrap_model(unet)
    embedding: Any = getattr(inner, "time_embedding", None)
    linear_1 = getattr(embedding, "linear_1", None)
    if not isinstance(linear_1, nn.Linear):
        raise OptionError(
            f"Expected a diffusers UNet with `time_embedding.linear_1`, but {type(inner).__name__} has none."
        )
    if getattr(embedding, "cond_proj", None) is not None:
        raise OptionError(
            "Expected a UNet without a guidance embedding, but `time_embedding.cond_proj` exists already "
            f"(time_cond_proj_dim={getattr(getattr(inner, 'config', None), 'time_cond_proj_dim', '?')})."
        )
    proj = nn.Linear(
        time_cond_proj_dim,
        linear_1.in_features,
        bias=False,
        device=linear_1.weight.device,
        dtype=linear_1.weight.dtype,
    )
    with torch.no_grad():
        if init == "zeros":
            proj.weight.zero_()
        else:
            bound = 1.0 / math.sqrt(time_cond_proj_dim)
            proj.weight.uniform_(-bound, bound, generator=generator)
    setattr(proj, _TRAINED_WITH_ADAPTERS, True)
    embedding.cond_proj = proj
    if callable(getattr(inner, "register_to_config", None)):
        changes: dict[str, Any] = {"time_cond_proj_dim": time_cond_proj_dim}
        defaults = inner.config.get("_use_default_values")
        if defaults is not None:  # from_config would otherwise reset the key to its default (None)
            changes["_use_default_values"] = [k for k in defaults if k != "time_cond_proj_dim"]
        inner.register_to_config(**changes)
    return unet
